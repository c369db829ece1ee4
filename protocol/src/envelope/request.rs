//! Client requests of SPEC §4: one map per message with `op`, an optional `id` and the op's
//! fields; decoded into [`Request`] (server) and encoded from it (clients, tests, load generator).

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::value::{Strings, has_control};
use super::{
    DecodeError, DecodeLimits, EventName, Format, RoomId, Value, ValueSeed, deserialize_seed,
};
use crate::ErrorCode;

/// Largest `id` (2^53 − 1, the largest integer a JavaScript number holds exactly).
pub const MAX_ID: u64 = (1 << 53) - 1;
/// Largest `history` `limit`.
pub const MAX_HISTORY_LIMIT: u64 = 100;
/// Longest `session` id accepted in `resume`.
pub const MAX_SESSION_LEN: usize = 128;
/// Longest `epoch` accepted in `resume`.
pub const MAX_EPOCH_LEN: usize = 64;
/// Longest access token accepted in `refresh`.
pub const MAX_TOKEN_LEN: usize = 8192;

/// A decoded client request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The client-chosen correlation id (0..=2^53−1).
    pub id: Option<u64>,
    /// What is asked.
    pub op: Op,
}

/// The operations of SPEC §4.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Join a room.
    Join {
        /// The room.
        room: RoomId,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: RoomId,
    },
    /// Publish `data` to a joined room.
    Publish {
        /// The room.
        room: RoomId,
        /// Any JSON value, C0-stripped.
        data: Value,
        /// A custom event name (SPEC §8); `None` for a plain message.
        event: Option<EventName>,
    },
    /// Ask for a room's presence.
    Presence {
        /// The room.
        room: RoomId,
    },
    /// Ask for messages with `seq > since`, oldest first, at most `limit` (≤ 100).
    History {
        /// The room.
        room: RoomId,
        /// Exclusive lower bound.
        since: u64,
        /// Most messages returned.
        limit: u64,
    },
    /// Resume a dropped connection's rooms.
    Resume {
        /// The old connection's `session`.
        session: String,
        /// Per room, the last position seen.
        rooms: Vec<(RoomId, ResumePoint)>,
    },
    /// Replace the connection's access token.
    Refresh {
        /// A fresh access token.
        token: String,
    },
    /// Liveness check.
    Ping,
}

impl Op {
    /// The wire name.
    pub const fn name(&self) -> &'static str {
        match self {
            Op::Join { .. } => "join",
            Op::Leave { .. } => "leave",
            Op::Publish { .. } => "publish",
            Op::Presence { .. } => "presence",
            Op::History { .. } => "history",
            Op::Resume { .. } => "resume",
            Op::Refresh { .. } => "refresh",
            Op::Ping => "ping",
        }
    }
}

/// The last position a client saw in a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Last `seq` received.
    pub seq: u64,
    /// The room's `epoch` when it was received.
    pub epoch: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Join,
    Leave,
    Publish,
    Presence,
    History,
    Resume,
    Refresh,
    Ping,
    Unknown,
    /// An `op` holding a control character: refused as `invalid_message`, never matched.
    Invalid,
}

#[derive(Clone, Copy)]
enum Field {
    Op,
    Id,
    Room,
    Data,
    Since,
    Limit,
    Session,
    Rooms,
    Token,
    Event,
    Other,
}

/// Identifier visitors that match the string without allocating.
struct Ident<T>(fn(&str) -> T);

impl<'de, T> DeserializeSeed<'de> for Ident<T> {
    type Value = T;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<T> Visitor<'_> for Ident<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
}

fn field(name: &str) -> Field {
    match name {
        "op" => Field::Op,
        "id" => Field::Id,
        "room" => Field::Room,
        "data" => Field::Data,
        "since" => Field::Since,
        "limit" => Field::Limit,
        "session" => Field::Session,
        "rooms" => Field::Rooms,
        "token" => Field::Token,
        "event" => Field::Event,
        _ => Field::Other,
    }
}

fn op_kind(name: &str) -> OpKind {
    if has_control(name) {
        return OpKind::Invalid;
    }
    match name {
        "join" => OpKind::Join,
        "leave" => OpKind::Leave,
        "publish" => OpKind::Publish,
        "presence" => OpKind::Presence,
        "history" => OpKind::History,
        "resume" => OpKind::Resume,
        "refresh" => OpKind::Refresh,
        "ping" => OpKind::Ping,
        _ => OpKind::Unknown,
    }
}

/// The envelope's fields as read, before the op decides which are required.
#[derive(Default)]
struct RawEnvelope {
    op: Option<OpKind>,
    id: Option<Value>,
    room: Option<Value>,
    data: Option<Value>,
    since: Option<Value>,
    limit: Option<Value>,
    session: Option<Value>,
    rooms: Option<Value>,
    token: Option<Value>,
    event: Option<Value>,
}

/// Reads the envelope map; records a valid `id` in `seen_id` as soon as it is read, so that an
/// error later in the message can still carry it.
#[derive(Clone, Copy)]
struct EnvelopeSeed<'a> {
    max_depth: usize,
    seen_id: &'a std::cell::Cell<Option<u64>>,
}

impl<'de> DeserializeSeed<'de> for EnvelopeSeed<'_> {
    type Value = RawEnvelope;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<RawEnvelope, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for EnvelopeSeed<'_> {
    type Value = RawEnvelope;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map with an \"op\" key")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawEnvelope, A::Error> {
        let mut raw = RawEnvelope::default();
        // Only `data` is cleaned of control characters; every other field is kept as sent so
        // that its rule refuses what it holds (SPEC §4: `"lob\u0000by"` never names `lobby`).
        let field_seed = ValueSeed {
            level: 2,
            max_depth: self.max_depth,
            strings: Strings::Keep,
        };
        let data_seed = ValueSeed {
            strings: Strings::StripC0,
            ..field_seed
        };
        while let Some(key) = map.next_key_seed(Ident(field))? {
            let slot = match key {
                Field::Op => {
                    if raw.op.is_some() {
                        return Err(de::Error::custom("duplicate key \"op\""));
                    }
                    raw.op = Some(map.next_value_seed(Ident(op_kind))?);
                    continue;
                }
                Field::Other => {
                    map.next_value_seed(field_seed)?;
                    continue;
                }
                Field::Id => &mut raw.id,
                Field::Room => &mut raw.room,
                Field::Data => &mut raw.data,
                Field::Since => &mut raw.since,
                Field::Limit => &mut raw.limit,
                Field::Session => &mut raw.session,
                Field::Rooms => &mut raw.rooms,
                Field::Token => &mut raw.token,
                Field::Event => &mut raw.event,
            };
            if slot.is_some() {
                return Err(de::Error::custom("duplicate key"));
            }
            let seed = if matches!(key, Field::Data) {
                data_seed
            } else {
                field_seed
            };
            let value = map.next_value_seed(seed)?;
            if let (Field::Id, Value::UInt(id)) = (key, &value)
                && *id <= MAX_ID
            {
                self.seen_id.set(Some(*id));
            }
            *slot = Some(value);
        }
        Ok(raw)
    }
}

/// Decodes one client message.
///
/// Errors: `too_large` past `max_message_bytes`; `unknown_op` for a well-formed envelope with an
/// `op` we do not know; `invalid_message` for everything else (not a map, bad types, missing
/// fields, depth, bad room id, `limit` > 100, binary or extension values, NaN, trailing bytes).
pub fn decode_request(
    bytes: &[u8],
    format: Format,
    limits: &DecodeLimits,
) -> Result<Request, DecodeError> {
    if bytes.len() > limits.max_message_bytes {
        return Err(DecodeError {
            code: ErrorCode::TooLarge,
            id: None,
            reason: "message too large".into(),
        });
    }
    let seen_id = std::cell::Cell::new(None);
    let seed = EnvelopeSeed {
        max_depth: limits.max_depth,
        seen_id: &seen_id,
    };
    let raw = deserialize_seed(bytes, format, seed)
        .map_err(|e| DecodeError::invalid(seen_id.get(), e))?;
    let id = match &raw.id {
        None | Some(Value::Null) => None,
        Some(Value::UInt(n)) if *n <= MAX_ID => Some(*n),
        Some(_) => {
            return Err(DecodeError::invalid(
                None,
                "id must be an integer in 0..2^53-1",
            ));
        }
    };
    let invalid = |reason: &str| DecodeError::invalid(id, reason);
    let room = || -> Result<RoomId, DecodeError> {
        let text = raw
            .room
            .as_ref()
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("room must be a string"))?;
        RoomId::parse(text).map_err(|e| invalid(&format!("room: {e}")))
    };
    let op = match raw.op {
        None => return Err(invalid("missing op")),
        Some(OpKind::Invalid) => return Err(invalid("op holds a control character")),
        Some(OpKind::Unknown) => {
            return Err(DecodeError {
                code: ErrorCode::UnknownOp,
                id,
                reason: "unknown op".into(),
            });
        }
        Some(OpKind::Join) => Op::Join { room: room()? },
        Some(OpKind::Leave) => Op::Leave { room: room()? },
        Some(OpKind::Presence) => Op::Presence { room: room()? },
        Some(OpKind::Publish) => {
            let room = room()?;
            let data = raw.data.clone().ok_or_else(|| invalid("missing data"))?;
            let event = match &raw.event {
                None | Some(Value::Null) => None,
                Some(value) => {
                    let name = value
                        .as_str()
                        .ok_or_else(|| invalid("event must be a string"))?;
                    Some(EventName::parse(name).map_err(invalid)?)
                }
            };
            Op::Publish { room, data, event }
        }
        Some(OpKind::History) => {
            let room = room()?;
            let since = optional_u64(raw.since.as_ref())
                .ok_or_else(|| invalid("since must be an integer"))?;
            let limit = optional_u64(raw.limit.as_ref())
                .ok_or_else(|| invalid("limit must be an integer"))?;
            let limit = limit.unwrap_or(MAX_HISTORY_LIMIT);
            if limit > MAX_HISTORY_LIMIT {
                return Err(invalid("limit must be at most 100"));
            }
            Op::History {
                room,
                since: since.unwrap_or(0),
                limit,
            }
        }
        Some(OpKind::Resume) => {
            let session = bounded_str(raw.session.as_ref(), MAX_SESSION_LEN).ok_or_else(|| {
                invalid("session must be a string of at most 128 bytes without control characters")
            })?;
            let rooms =
                resume_rooms(raw.rooms.as_ref(), limits.max_resume_rooms).map_err(&invalid)?;
            Op::Resume { session, rooms }
        }
        Some(OpKind::Refresh) => {
            let token = bounded_str(raw.token.as_ref(), MAX_TOKEN_LEN).ok_or_else(|| {
                invalid("token must be a string of at most 8192 bytes without control characters")
            })?;
            Op::Refresh { token }
        }
        Some(OpKind::Ping) => Op::Ping,
    };
    Ok(Request { id, op })
}

/// `Some(None)` when absent or null, `Some(Some(n))` for a non-negative integer, `None` otherwise.
fn optional_u64(value: Option<&Value>) -> Option<Option<u64>> {
    match value {
        None | Some(Value::Null) => Some(None),
        Some(Value::UInt(n)) => Some(Some(*n)),
        Some(_) => None,
    }
}

/// A non-empty string of at most `max` bytes without control characters.
fn bounded_str(value: Option<&Value>, max: usize) -> Option<String> {
    value
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= max && !has_control(s))
        .map(str::to_owned)
}

fn resume_rooms(
    value: Option<&Value>,
    max_rooms: usize,
) -> Result<Vec<(RoomId, ResumePoint)>, &'static str> {
    let Some(Value::Map(entries)) = value else {
        return Err("rooms must be a map of room to {seq, epoch}");
    };
    if entries.len() > max_rooms {
        return Err("rooms names more rooms than a connection may join");
    }
    let mut rooms = Vec::with_capacity(entries.len());
    for (name, point) in entries {
        let room = RoomId::parse(name).map_err(|_| "rooms has an invalid room id")?;
        if rooms
            .iter()
            .any(|(r, _): &(RoomId, ResumePoint)| *r == room)
        {
            return Err("rooms names a room twice");
        }
        let seq = point
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or("rooms.*.seq must be an integer")?;
        let epoch = match point.get("epoch") {
            Some(Value::Str(s)) if s.len() <= MAX_EPOCH_LEN && !has_control(s) => s.clone(),
            _ => {
                return Err(
                    "rooms.*.epoch must be a string of at most 64 bytes without control characters",
                );
            }
        };
        rooms.push((room, ResumePoint { seq, epoch }));
    }
    Ok(rooms)
}

impl Serialize for Request {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("op", self.op.name())?;
        if let Some(id) = self.id {
            map.serialize_entry("id", &id)?;
        }
        match &self.op {
            Op::Join { room } | Op::Leave { room } | Op::Presence { room } => {
                map.serialize_entry("room", room.as_str())?;
            }
            Op::Publish { room, data, event } => {
                map.serialize_entry("room", room.as_str())?;
                map.serialize_entry("data", data)?;
                if let Some(event) = event {
                    map.serialize_entry("event", event.as_str())?;
                }
            }
            Op::History { room, since, limit } => {
                map.serialize_entry("room", room.as_str())?;
                map.serialize_entry("since", since)?;
                map.serialize_entry("limit", limit)?;
            }
            Op::Resume { session, rooms } => {
                map.serialize_entry("session", session)?;
                map.serialize_entry("rooms", &ResumeRooms(rooms))?;
            }
            Op::Refresh { token } => map.serialize_entry("token", token)?,
            Op::Ping => {}
        }
        map.end()
    }
}

struct ResumeRooms<'a>(&'a [(RoomId, ResumePoint)]);

impl Serialize for ResumeRooms<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Point<'a> {
            seq: u64,
            epoch: &'a str,
        }
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (room, point) in self.0 {
            map.serialize_entry(
                room.as_str(),
                &Point {
                    seq: point.seq,
                    epoch: &point.epoch,
                },
            )?;
        }
        map.end()
    }
}

/// Encodes a request as a client sends it.
pub fn encode_request(request: &Request, format: Format) -> Vec<u8> {
    match format {
        // Serializing our own types to a Vec cannot fail: keys are strings, floats are finite.
        Format::Json => sonic_rs::to_vec(request).unwrap_or_default(),
        Format::MsgPack => rmp_serde::to_vec_named(request).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<Request, DecodeError> {
        decode_request(s.as_bytes(), Format::Json, &DecodeLimits::default())
    }

    fn code(r: Result<Request, DecodeError>) -> (ErrorCode, Option<u64>) {
        let e = r.unwrap_err();
        (e.code, e.id)
    }

    #[test]
    fn publish_takes_an_optional_event_under_the_rules() {
        let limits = DecodeLimits::default();
        let req = decode_request(
            br#"{"op":"publish","id":1,"room":"r","data":1,"event":"dance"}"#,
            Format::Json,
            &limits,
        )
        .unwrap();
        assert!(matches!(req.op, Op::Publish { event: Some(ref e), .. } if e.as_str() == "dance"));
        for bad in [
            &br#"{"op":"publish","id":2,"room":"r","data":1,"event":"message"}"#[..],
            br#"{"op":"publish","id":2,"room":"r","data":1,"event":7}"#,
            br#"{"op":"publish","id":2,"room":"r","data":1,"event":"no spaces"}"#,
        ] {
            let err = decode_request(bad, Format::Json, &limits).unwrap_err();
            assert_eq!((err.code, err.id), (ErrorCode::InvalidMessage, Some(2)));
        }
    }

    #[test]
    fn decodes_every_op() {
        let room = RoomId::parse("lobby").unwrap();
        assert_eq!(
            json(r#"{"op":"join","room":"lobby"}"#).unwrap().op,
            Op::Join { room: room.clone() }
        );
        assert_eq!(
            json(r#"{"op":"leave","room":"lobby","id":1}"#).unwrap().id,
            Some(1)
        );
        assert_eq!(
            json(r#"{"op":"publish","room":"lobby","data":{"t":"hi\u0007"}}"#)
                .unwrap()
                .op,
            Op::Publish {
                room: room.clone(),
                data: Value::map([("t", Value::str("hi"))]),
                event: None,
            }
        );
        assert_eq!(
            json(r#"{"op":"history","room":"lobby","since":5}"#)
                .unwrap()
                .op,
            Op::History {
                room: room.clone(),
                since: 5,
                limit: 100
            }
        );
        assert_eq!(
            json(r#"{"op":"resume","session":"c_1","rooms":{"lobby":{"seq":3,"epoch":"e1"}}}"#)
                .unwrap()
                .op,
            Op::Resume {
                session: "c_1".into(),
                rooms: vec![(
                    room.clone(),
                    ResumePoint {
                        seq: 3,
                        epoch: "e1".into()
                    }
                )]
            }
        );
        assert_eq!(
            json(r#"{"op":"refresh","token":"t"}"#).unwrap().op,
            Op::Refresh { token: "t".into() }
        );
        assert_eq!(
            json(r#"{"op":"ping","id":9007199254740991}"#).unwrap().id,
            Some(MAX_ID)
        );
        assert_eq!(
            json(r#"{"op":"presence","room":"lobby","extra":[1,2]}"#)
                .unwrap()
                .op,
            Op::Presence { room }
        );
    }

    #[test]
    fn unknown_op_is_not_invalid_message() {
        assert_eq!(
            code(json(r#"{"op":"dance","id":4}"#)),
            (ErrorCode::UnknownOp, Some(4))
        );
        assert_eq!(
            code(json(r#"{"id":4}"#)),
            (ErrorCode::InvalidMessage, Some(4))
        );
        assert_eq!(code(json(r#"{"op":5}"#)).0, ErrorCode::InvalidMessage);
        assert_eq!(code(json(r#"[1]"#)).0, ErrorCode::InvalidMessage);
        assert_eq!(
            code(json(r#"{"op":"ping"} x"#)).0,
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn field_errors_are_invalid_message_with_the_id() {
        let cases = [
            r#"{"op":"join","id":3}"#,
            r#"{"op":"join","id":3,"room":"-bad"}"#,
            r#"{"op":"join","id":3,"room":7}"#,
            r#"{"op":"publish","id":3,"room":"a"}"#,
            r#"{"op":"history","id":3,"room":"a","limit":101}"#,
            r#"{"op":"history","id":3,"room":"a","since":-1}"#,
            r#"{"op":"resume","id":3,"session":"s","rooms":{"a":{"seq":1}}}"#,
            r#"{"op":"refresh","id":3,"token":""}"#,
        ];
        for case in cases {
            assert_eq!(
                code(json(case)),
                (ErrorCode::InvalidMessage, Some(3)),
                "{case}"
            );
        }
        assert_eq!(
            code(json(r#"{"op":"ping","id":9007199254740992}"#)),
            (ErrorCode::InvalidMessage, None)
        );
        assert_eq!(
            code(json(r#"{"op":"ping","id":-1}"#)),
            (ErrorCode::InvalidMessage, None)
        );
        assert_eq!(
            code(json(r#"{"op":"ping","op":"ping"}"#)).0,
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn envelope_fields_with_control_characters_are_refused_never_cleaned() {
        let cases = [
            r#"{"op":"join","room":"lob\u0000by","id":7}"#,
            r#"{"op":"join","room":"a\u0007b","id":7}"#,
            r#"{"id":7,"op":"jo\u0000in","room":"lobby"}"#,
            r#"{"op":"publish","room":"lobby\u001f","data":1,"id":7}"#,
            r#"{"op":"resume","session":"c_1\u0000","rooms":{},"id":7}"#,
            r#"{"op":"resume","session":"c_1","rooms":{"lob\u0000by":{"seq":1,"epoch":"e"}},"id":7}"#,
            r#"{"op":"resume","session":"c_1","rooms":{"lobby":{"seq":1,"epoch":"e\u0085"}},"id":7}"#,
            r#"{"op":"refresh","token":"abc\u007f","id":7}"#,
        ];
        for case in cases {
            assert_eq!(
                code(json(case)),
                (ErrorCode::InvalidMessage, Some(7)),
                "{case}"
            );
        }
        // `data` is still cleaned, keys included.
        assert_eq!(
            json(r#"{"op":"publish","room":"lobby","data":{"k\u0001":"v\u0000"}}"#)
                .unwrap()
                .op,
            Op::Publish {
                room: RoomId::parse("lobby").unwrap(),
                data: Value::map([("k", Value::str("v"))]),
                event: None,
            }
        );
    }

    #[test]
    fn depth_counts_the_envelope_as_one() {
        let limits = DecodeLimits {
            max_depth: 3,
            ..DecodeLimits::default()
        };
        let ok = br#"{"op":"publish","room":"a","data":{"b":[1]}}"#;
        assert!(decode_request(ok, Format::Json, &limits).is_ok());
        let deep = br#"{"op":"publish","room":"a","data":{"b":[[1]]}}"#;
        assert_eq!(
            decode_request(deep, Format::Json, &limits)
                .unwrap_err()
                .code,
            ErrorCode::InvalidMessage
        );
        // Unknown fields are bounded too.
        let deep_other = br#"{"op":"ping","x":{"b":[[1]]}}"#;
        assert!(decode_request(deep_other, Format::Json, &limits).is_err());
        // 10k levels do not overflow the stack.
        let bomb = format!(
            r#"{{"op":"publish","room":"a","data":{}}}"#,
            "[".repeat(10_000)
        );
        assert!(json(&bomb).is_err());
    }

    #[test]
    fn size_bound_is_inclusive() {
        let msg = br#"{"op":"ping"}"#;
        let limits = DecodeLimits {
            max_message_bytes: msg.len(),
            ..DecodeLimits::default()
        };
        assert!(decode_request(msg, Format::Json, &limits).is_ok());
        let limits = DecodeLimits {
            max_message_bytes: msg.len() - 1,
            ..DecodeLimits::default()
        };
        assert_eq!(
            decode_request(msg, Format::Json, &limits).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn msgpack_refuses_bin_ext_nan_and_integer_keys() {
        let limits = DecodeLimits::default();
        let publish = |data: &[u8]| {
            let mut out = Vec::new();
            rmp::encode::write_map_len(&mut out, 3).unwrap();
            rmp::encode::write_str(&mut out, "op").unwrap();
            rmp::encode::write_str(&mut out, "publish").unwrap();
            rmp::encode::write_str(&mut out, "room").unwrap();
            rmp::encode::write_str(&mut out, "a").unwrap();
            rmp::encode::write_str(&mut out, "data").unwrap();
            out.extend_from_slice(data);
            decode_request(&out, Format::MsgPack, &limits)
        };
        assert!(publish(&[0xc0]).is_ok());
        let mut bin = Vec::new();
        rmp::encode::write_bin(&mut bin, b"xy").unwrap();
        let mut ext = Vec::new();
        rmp::encode::write_ext_meta(&mut ext, 1, 5).unwrap();
        ext.push(0);
        let mut nan = Vec::new();
        rmp::encode::write_f64(&mut nan, f64::NAN).unwrap();
        let mut int_key = Vec::new();
        rmp::encode::write_map_len(&mut int_key, 1).unwrap();
        rmp::encode::write_uint(&mut int_key, 1).unwrap();
        rmp::encode::write_nil(&mut int_key).unwrap();
        // An array header claiming 2^32-1 elements must not reserve them.
        let huge_array = [0xdd, 0xff, 0xff, 0xff, 0xff];
        for bad in [&bin[..], &ext, &nan, &int_key, &huge_array] {
            assert_eq!(
                publish(bad).unwrap_err().code,
                ErrorCode::InvalidMessage,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn encode_then_decode_is_identity_in_both_formats() {
        let req = Request {
            id: Some(42),
            op: Op::Publish {
                room: RoomId::parse("r").unwrap(),
                data: Value::map([("n", Value::Int(-3))]),
                event: None,
            },
        };
        for format in Format::ALL {
            let bytes = encode_request(&req, format);
            assert_eq!(
                decode_request(&bytes, format, &DecodeLimits::default()).unwrap(),
                req
            );
        }
    }
}
