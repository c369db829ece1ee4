//! Server pushes of SPEC §4 (`welcome`, `reply`, `pong`, `message`, `presence`, `kicked`,
//! `refresh_required`, `error`), serialized as maps in a fixed key order into JSON or MessagePack.
//! A push is encoded once and its bytes shared by every recipient of a broadcast.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::{Format, RoomId, Value};
use crate::ErrorCode;

/// One stored or broadcast message: the `message` push, and the entries of a `history` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageRecord {
    /// The room.
    pub room: RoomId,
    /// The room's sequence number of this message.
    pub seq: u64,
    /// The publisher's user id, `None` for system messages.
    pub from: Option<String>,
    /// The publisher's username.
    pub name: String,
    /// Publish time, epoch milliseconds.
    pub ts: u64,
    /// The payload.
    pub data: Value,
    /// The custom event it was published as (SPEC §8); `None` for a plain message.
    pub event: Option<super::EventName>,
}

/// A member of a room's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEntry {
    /// User id.
    pub user: String,
    /// Username.
    pub name: String,
    /// Connections of this user joined to the room.
    pub conns: u32,
}

/// A user in a presence diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceUser {
    /// User id.
    pub user: String,
    /// Username.
    pub name: String,
}

/// The `limits` of `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WelcomeLimits {
    /// `max_message_bytes`.
    pub max_message_bytes: u64,
    /// Publishes per second allowed to this connection.
    pub publish_per_sec: u64,
}

/// A server push. Borrowed, so that building one costs no copies of its parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Push<'a> {
    /// First message after the upgrade.
    Welcome {
        /// The connection's resumable session id.
        session: &'a str,
        /// User id.
        user_id: &'a str,
        /// Username.
        username: &'a str,
        /// Rooms joined at connect.
        rooms: &'a [RoomId],
        /// Heartbeat interval, seconds.
        heartbeat: u64,
        /// Resume window, seconds.
        resume_ttl: u64,
        /// Limits the client should respect.
        limits: WelcomeLimits,
    },
    /// Reply to `join`.
    JoinReply {
        /// Request id.
        id: Option<u64>,
        /// The room.
        room: &'a str,
        /// The room's latest seq (0 if none).
        seq: u64,
        /// The room's history epoch.
        epoch: &'a str,
        /// Current presence.
        presence: &'a [PresenceEntry],
    },
    /// Reply with no fields (to `leave`).
    Ack {
        /// Request id.
        id: Option<u64>,
    },
    /// Reply to `publish`.
    PublishReply {
        /// Request id.
        id: Option<u64>,
        /// The message's seq.
        seq: u64,
    },
    /// Reply to `presence`.
    PresenceReply {
        /// Request id.
        id: Option<u64>,
        /// Current presence.
        presence: &'a [PresenceEntry],
    },
    /// Reply to `resume`.
    ResumeReply {
        /// Request id.
        id: Option<u64>,
        /// Per room, whether every missed message was delivered.
        recovered: &'a [(RoomId, bool)],
    },
    /// Reply to `refresh`.
    RefreshReply {
        /// Request id.
        id: Option<u64>,
        /// The new token's expiry, epoch ms.
        expires_at: u64,
    },
    /// Reply to `ping`.
    Pong {
        /// Request id.
        id: Option<u64>,
    },
    /// A message in a joined room.
    Message(&'a MessageRecord),
    /// Presence diff.
    Presence {
        /// The room.
        room: &'a str,
        /// Users whose first connection joined.
        joined: &'a [PresenceUser],
        /// Users whose last connection left.
        left: &'a [PresenceUser],
    },
    /// Removed from a room.
    Kicked {
        /// The room.
        room: &'a str,
        /// Why.
        reason: &'a str,
    },
    /// The token expires soon; send `refresh`.
    RefreshRequired {
        /// Expiry, epoch ms.
        expires_at: u64,
    },
    /// A request failed.
    Error {
        /// Request id, when the request had one.
        id: Option<u64>,
        /// The error code.
        code: ErrorCode,
        /// Human-readable text.
        message: &'a str,
    },
}

/// Encoding failed (only possible for values built outside the decoder, e.g. a NaN float).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode push: {0}")]
pub struct EncodeError(pub String);

struct Seq<'a, T>(&'a [T]);

impl<T> Serialize for Seq<'_, T>
where
    for<'b> Item<'b, T>: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(Item))
    }
}

struct Item<'a, T>(&'a T);

impl Serialize for Item<'_, PresenceEntry> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("user", &self.0.user)?;
        map.serialize_entry("name", &self.0.name)?;
        map.serialize_entry("conns", &self.0.conns)?;
        map.end()
    }
}

impl Serialize for Item<'_, PresenceUser> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(2))?;
        map.serialize_entry("user", &self.0.user)?;
        map.serialize_entry("name", &self.0.name)?;
        map.end()
    }
}

impl Serialize for Item<'_, MessageRecord> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(7))?;
        write_message_fields(&mut map, self.0)?;
        map.end()
    }
}

fn write_message_fields<M: SerializeMap>(map: &mut M, m: &MessageRecord) -> Result<(), M::Error> {
    map.serialize_entry("op", "message")?;
    map.serialize_entry("room", m.room.as_str())?;
    map.serialize_entry("seq", &m.seq)?;
    map.serialize_entry("from", &m.from)?;
    map.serialize_entry("name", &m.name)?;
    map.serialize_entry("ts", &m.ts)?;
    map.serialize_entry("data", &m.data)?;
    if let Some(event) = &m.event {
        map.serialize_entry("event", event.as_str())?;
    }
    Ok(())
}

struct Recovered<'a>(&'a [(RoomId, bool)]);

impl Serialize for Recovered<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(room, ok)| (room.as_str(), ok)))
    }
}

fn reply_head<M: SerializeMap>(map: &mut M, op: &str, id: Option<u64>) -> Result<(), M::Error> {
    map.serialize_entry("op", op)?;
    if let Some(id) = id {
        map.serialize_entry("id", &id)?;
    }
    Ok(())
}

impl Serialize for Push<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self {
            Push::Welcome {
                session,
                user_id,
                username,
                rooms,
                heartbeat,
                resume_ttl,
                limits,
            } => {
                struct User<'a>(&'a str, &'a str);
                impl Serialize for User<'_> {
                    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                        let mut m = s.serialize_map(Some(2))?;
                        m.serialize_entry("id", self.0)?;
                        m.serialize_entry("username", self.1)?;
                        m.end()
                    }
                }
                struct Limits(WelcomeLimits);
                impl Serialize for Limits {
                    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                        let mut m = s.serialize_map(Some(2))?;
                        m.serialize_entry("max_message_bytes", &self.0.max_message_bytes)?;
                        m.serialize_entry("publish_per_sec", &self.0.publish_per_sec)?;
                        m.end()
                    }
                }
                map.serialize_entry("op", "welcome")?;
                map.serialize_entry("session", session)?;
                map.serialize_entry("user", &User(user_id, username))?;
                map.serialize_entry("rooms", &Rooms(rooms))?;
                map.serialize_entry("heartbeat", heartbeat)?;
                map.serialize_entry("resume_ttl", resume_ttl)?;
                map.serialize_entry("limits", &Limits(*limits))?;
            }
            Push::JoinReply {
                id,
                room,
                seq,
                epoch,
                presence,
            } => {
                reply_head(&mut map, "reply", *id)?;
                map.serialize_entry("room", room)?;
                map.serialize_entry("seq", seq)?;
                map.serialize_entry("epoch", epoch)?;
                map.serialize_entry("presence", &Seq(presence))?;
            }
            Push::Ack { id } => reply_head(&mut map, "reply", *id)?,
            Push::PublishReply { id, seq } => {
                reply_head(&mut map, "reply", *id)?;
                map.serialize_entry("seq", seq)?;
            }
            Push::PresenceReply { id, presence } => {
                reply_head(&mut map, "reply", *id)?;
                map.serialize_entry("presence", &Seq(presence))?;
            }
            Push::ResumeReply { id, recovered } => {
                reply_head(&mut map, "reply", *id)?;
                map.serialize_entry("recovered", &Recovered(recovered))?;
            }
            Push::RefreshReply { id, expires_at } => {
                reply_head(&mut map, "reply", *id)?;
                map.serialize_entry("expires_at", expires_at)?;
            }
            Push::Pong { id } => reply_head(&mut map, "pong", *id)?,
            Push::Message(record) => write_message_fields(&mut map, record)?,
            Push::Presence { room, joined, left } => {
                map.serialize_entry("op", "presence")?;
                map.serialize_entry("room", room)?;
                map.serialize_entry("joined", &Seq(joined))?;
                map.serialize_entry("left", &Seq(left))?;
            }
            Push::Kicked { room, reason } => {
                map.serialize_entry("op", "kicked")?;
                map.serialize_entry("room", room)?;
                map.serialize_entry("reason", reason)?;
            }
            Push::RefreshRequired { expires_at } => {
                map.serialize_entry("op", "refresh_required")?;
                map.serialize_entry("expires_at", expires_at)?;
            }
            Push::Error { id, code, message } => {
                reply_head(&mut map, "error", *id)?;
                map.serialize_entry("code", code.as_str())?;
                map.serialize_entry("message", message)?;
            }
        }
        map.end()
    }
}

struct Rooms<'a>(&'a [RoomId]);

impl Serialize for Rooms<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(RoomId::as_str))
    }
}

/// Appends the encoding of `push` to `out`.
pub fn encode_push_into(
    push: &Push<'_>,
    format: Format,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    encode_value_into(push, format, out)
}

/// Encodes the reply to `history`: `{op:"reply", id?, messages:[…], epoch}`, where `messages` are
/// `message` pushes already encoded in `format` (history keeps messages encoded, and a reply
/// splices them in without decoding them). Written by hand: neither serializer embeds raw bytes.
pub fn encode_history_reply(
    id: Option<u64>,
    messages: &[&[u8]],
    epoch: &str,
    format: Format,
) -> Result<Vec<u8>, EncodeError> {
    let bytes: usize = messages.iter().map(|m| m.len() + 1).sum();
    let mut out = Vec::with_capacity(64 + epoch.len() + bytes);
    match format {
        Format::Json => {
            out.extend_from_slice(br#"{"op":"reply","#);
            if let Some(id) = id {
                out.extend_from_slice(br#""id":"#);
                out.extend_from_slice(id.to_string().as_bytes());
                out.push(b',');
            }
            out.extend_from_slice(br#""messages":["#);
            for (i, message) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(message);
            }
            out.extend_from_slice(br#"],"epoch":"#);
            sonic_rs::to_writer(&mut out, epoch).map_err(|e| EncodeError(e.to_string()))?;
            out.push(b'}');
        }
        Format::MsgPack => {
            let fail = |e: rmp::encode::ValueWriteError| EncodeError(e.to_string());
            let len = u32::try_from(messages.len()).map_err(|_| EncodeError("too many".into()))?;
            rmp::encode::write_map_len(&mut out, if id.is_some() { 4 } else { 3 }).map_err(fail)?;
            rmp::encode::write_str(&mut out, "op").map_err(fail)?;
            rmp::encode::write_str(&mut out, "reply").map_err(fail)?;
            if let Some(id) = id {
                rmp::encode::write_str(&mut out, "id").map_err(fail)?;
                rmp::encode::write_uint(&mut out, id).map_err(fail)?;
            }
            rmp::encode::write_str(&mut out, "messages").map_err(fail)?;
            rmp::encode::write_array_len(&mut out, len).map_err(fail)?;
            for message in messages {
                out.extend_from_slice(message);
            }
            rmp::encode::write_str(&mut out, "epoch").map_err(fail)?;
            rmp::encode::write_str(&mut out, epoch).map_err(fail)?;
        }
    }
    Ok(out)
}

/// Encodes `push` into a new buffer.
pub fn encode_push(push: &Push<'_>, format: Format) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    encode_push_into(push, format, &mut out)?;
    Ok(out)
}

/// Encodes any serializable value the way pushes are encoded (maps, not arrays, in MessagePack).
pub fn encode_value<T: Serialize + ?Sized>(
    value: &T,
    format: Format,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(128);
    encode_value_into(value, format, &mut out)?;
    Ok(out)
}

fn encode_value_into<T: Serialize + ?Sized>(
    value: &T,
    format: Format,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    match format {
        Format::Json => sonic_rs::to_writer(out, value).map_err(|e| EncodeError(e.to_string())),
        Format::MsgPack => {
            rmp_serde::encode::write_named(out, value).map_err(|e| EncodeError(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{DecodeLimits, decode_value};

    fn record() -> MessageRecord {
        MessageRecord {
            room: RoomId::parse("lobby").unwrap(),
            seq: 7,
            from: Some("u1".into()),
            name: "alice".into(),
            ts: 1_700_000_000_000,
            data: Value::map([("text", Value::str("<b>hi</b>"))]),
            event: None,
        }
    }

    #[test]
    fn message_push_golden_json() {
        let r = record();
        let json = encode_push(&Push::Message(&r), Format::Json).unwrap();
        assert_eq!(
            String::from_utf8(json).unwrap(),
            r#"{"op":"message","room":"lobby","seq":7,"from":"u1","name":"alice","ts":1700000000000,"data":{"text":"<b>hi</b>"}}"#
        );
    }

    #[test]
    fn welcome_and_error_golden_json() {
        let rooms = [
            RoomId::parse("lobby").unwrap(),
            RoomId::parse("user:u1").unwrap(),
        ];
        let welcome = Push::Welcome {
            session: "c_9f",
            user_id: "u1",
            username: "alice",
            rooms: &rooms,
            heartbeat: 25,
            resume_ttl: 300,
            limits: WelcomeLimits {
                max_message_bytes: 65536,
                publish_per_sec: 20,
            },
        };
        assert_eq!(
            String::from_utf8(encode_push(&welcome, Format::Json).unwrap()).unwrap(),
            r#"{"op":"welcome","session":"c_9f","user":{"id":"u1","username":"alice"},"rooms":["lobby","user:u1"],"heartbeat":25,"resume_ttl":300,"limits":{"max_message_bytes":65536,"publish_per_sec":20}}"#
        );
        let error = Push::Error {
            id: None,
            code: ErrorCode::RateLimited,
            message: "slow down",
        };
        assert_eq!(
            String::from_utf8(encode_push(&error, Format::Json).unwrap()).unwrap(),
            r#"{"op":"error","code":"rate_limited","message":"slow down"}"#
        );
    }

    #[test]
    fn json_and_msgpack_carry_the_same_maps() {
        let r = record();
        let presence = [PresenceEntry {
            user: "u1".into(),
            name: "alice".into(),
            conns: 2,
        }];
        let users = [PresenceUser {
            user: "u2".into(),
            name: "bob".into(),
        }];
        let recovered = [(RoomId::parse("lobby").unwrap(), true)];
        let pushes = [
            Push::Message(&r),
            Push::JoinReply {
                id: Some(1),
                room: "lobby",
                seq: 7,
                epoch: "e",
                presence: &presence,
            },
            Push::ResumeReply {
                id: None,
                recovered: &recovered,
            },
            Push::Presence {
                room: "lobby",
                joined: &users,
                left: &[],
            },
            Push::Kicked {
                room: "lobby",
                reason: "removed",
            },
            Push::RefreshRequired { expires_at: 5 },
            Push::Pong { id: Some(3) },
        ];
        let limits = DecodeLimits::default();
        for push in &pushes {
            let from_json = decode_value(
                &encode_push(push, Format::Json).unwrap(),
                Format::Json,
                &limits,
            )
            .unwrap();
            let from_msgpack = decode_value(
                &encode_push(push, Format::MsgPack).unwrap(),
                Format::MsgPack,
                &limits,
            )
            .unwrap();
            assert_eq!(from_json, from_msgpack, "{push:?}");
            assert!(from_json.get("op").is_some());
        }
    }

    #[test]
    fn history_replies_splice_encoded_messages_in_both_formats() {
        let r = record();
        let limits = DecodeLimits::default();
        for format in Format::ALL {
            let one = encode_push(&Push::Message(&r), format).unwrap();
            for id in [Some(2), None] {
                let reply = encode_history_reply(id, &[&one, &one], "e\"1", format).unwrap();
                let value = decode_value(&reply, format, &limits).unwrap();
                let message = decode_value(&one, format, &limits).unwrap();
                let mut expected = vec![("op", Value::str("reply"))];
                if let Some(id) = id {
                    expected.push(("id", Value::UInt(id)));
                }
                expected.push(("messages", Value::Array(vec![message.clone(), message])));
                expected.push(("epoch", Value::str("e\"1")));
                assert_eq!(
                    value,
                    Value::Map(
                        expected
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v))
                            .collect()
                    ),
                    "{format:?}"
                );
            }
            let empty = encode_history_reply(Some(1), &[], "e", format).unwrap();
            assert_eq!(
                decode_value(&empty, format, &limits)
                    .unwrap()
                    .get("messages"),
                Some(&Value::Array(vec![]))
            );
        }
        assert_eq!(
            encode_history_reply(Some(9), &[br#"{"op":"message"}"#], "e", Format::Json).unwrap(),
            br#"{"op":"reply","id":9,"messages":[{"op":"message"}],"epoch":"e"}"#
        );
    }
}
