//! Engine.IO v4 / Socket.IO v5 over WebSocket (SPEC §8): packet parsing and encoding, and the
//! mapping of the four client events (`join`, `leave`, `message`, `presence`) to native requests
//! and of native pushes back to Socket.IO events and acks.
//!
//! One WebSocket text message holds one Engine.IO packet: a type digit and its payload. A
//! `message` packet (`4`) carries one Socket.IO packet: `<type>[<attachments>-][<nsp>,][<ack id>][JSON]`.
//! Binary attachments and namespaces other than `/` are refused.

use serde::Serialize;

use crate::ErrorCode;
use crate::envelope::{
    DecodeLimits, EventName, MessageRecord, Op, PresenceEntry, PresenceUser, Request, RoomId,
    Strings, Value, ValueSeed, deserialize_seed, has_control,
};

/// Why a packet or event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketIoError {
    /// Not a valid Engine.IO or Socket.IO packet: the connection is closed (1002/1003 at the edge).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A namespace other than `/`.
    #[error("unknown namespace")]
    Namespace,
    /// Binary events and acks are not supported.
    #[error("binary attachments are not supported")]
    Binary,
}

/// An Engine.IO v4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// `0`: handshake (server to client only).
    Open,
    /// `1`: close the transport.
    Close,
    /// `2`: ping with optional payload (`probe` during upgrades).
    Ping(&'a str),
    /// `3`: pong.
    Pong(&'a str),
    /// `4`: a Socket.IO packet.
    Message(&'a str),
    /// `5`: transport upgrade (never used over a WebSocket-only transport).
    Upgrade,
    /// `6`: no-op.
    Noop,
}

/// Parses the Engine.IO packet in one WebSocket text message.
pub fn parse_engine_packet(text: &str) -> Result<EnginePacket<'_>, SocketIoError> {
    let mut chars = text.chars();
    let kind = chars
        .next()
        .ok_or(SocketIoError::Malformed("empty packet"))?;
    let payload = chars.as_str();
    Ok(match kind {
        '0' => EnginePacket::Open,
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(payload),
        '3' => EnginePacket::Pong(payload),
        '4' => EnginePacket::Message(payload),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        _ => return Err(SocketIoError::Malformed("unknown Engine.IO packet type")),
    })
}

/// Socket.IO v5 packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketType {
    /// `0`
    Connect,
    /// `1`
    Disconnect,
    /// `2`
    Event,
    /// `3`
    Ack,
    /// `4`
    ConnectError,
    /// `5`
    BinaryEvent,
    /// `6`
    BinaryAck,
}

/// A Socket.IO packet (inside an Engine.IO `message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPacket<'a> {
    /// Packet type.
    pub kind: PacketType,
    /// Namespace (`/` when omitted).
    pub namespace: &'a str,
    /// Ack id, when the sender wants an acknowledgement.
    pub ack_id: Option<u64>,
    /// The JSON payload, unparsed.
    pub data: Option<&'a str>,
}

/// Largest ack id accepted (fits a JavaScript number exactly, like native ids).
pub const MAX_ACK_ID: u64 = (1 << 53) - 1;

/// Parses a Socket.IO packet.
pub fn parse_socket_packet(text: &str) -> Result<SocketPacket<'_>, SocketIoError> {
    let bytes = text.as_bytes();
    let kind = match bytes.first() {
        Some(b'0') => PacketType::Connect,
        Some(b'1') => PacketType::Disconnect,
        Some(b'2') => PacketType::Event,
        Some(b'3') => PacketType::Ack,
        Some(b'4') => PacketType::ConnectError,
        Some(b'5') => PacketType::BinaryEvent,
        Some(b'6') => PacketType::BinaryAck,
        _ => return Err(SocketIoError::Malformed("unknown Socket.IO packet type")),
    };
    if matches!(kind, PacketType::BinaryEvent | PacketType::BinaryAck) {
        return Err(SocketIoError::Binary);
    }
    let mut rest = &text[1..];
    let mut namespace = "/";
    if rest.starts_with('/') {
        let end = rest.find(',').unwrap_or(rest.len());
        namespace = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack_id = if digits > 0 {
        let id: u64 = rest[..digits]
            .parse()
            .map_err(|_| SocketIoError::Malformed("ack id too large"))?;
        if id > MAX_ACK_ID {
            return Err(SocketIoError::Malformed("ack id too large"));
        }
        rest = &rest[digits..];
        Some(id)
    } else {
        None
    };
    if namespace != "/" {
        return Err(SocketIoError::Namespace);
    }
    let data = if rest.is_empty() { None } else { Some(rest) };
    Ok(SocketPacket {
        kind,
        namespace,
        ack_id,
        data,
    })
}

/// The token of a CONNECT packet's auth payload `{"token": "…"}`.
pub fn connect_token(packet: &SocketPacket<'_>, limits: &DecodeLimits) -> Option<String> {
    let data = packet.data?;
    let value = parse_json(data, 1, limits).ok()?;
    value
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 8192 && !has_control(t))
        .map(str::to_owned)
}

/// A client event that could not be turned into a request: answer with a failed ack (or an
/// `error` event when the client asked for no ack).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct EventError {
    /// The ack id, if any.
    pub ack_id: Option<u64>,
    /// `invalid_message`, `unknown_op` or `too_large`.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// Maps an EVENT packet to a native request; the ack id becomes the request id.
///
/// Depth is counted as in the native envelope: the arguments object is level 1, so a `message`
/// may nest as deep as a native `data`.
pub fn decode_event(
    packet: &SocketPacket<'_>,
    limits: &DecodeLimits,
) -> Result<Request, EventError> {
    let ack_id = packet.ack_id;
    let fail = |code: ErrorCode, message: &str| EventError {
        ack_id,
        code,
        message: message.to_owned(),
    };
    let data = packet
        .data
        .ok_or_else(|| fail(ErrorCode::InvalidMessage, "event without payload"))?;
    if data.len() > limits.max_message_bytes {
        return Err(fail(ErrorCode::TooLarge, "event too large"));
    }
    let value = parse_json(data, 0, limits).map_err(|e| fail(ErrorCode::InvalidMessage, &e))?;
    let items = value
        .as_array()
        .ok_or_else(|| fail(ErrorCode::InvalidMessage, "event must be an array"))?;
    let name = items
        .first()
        .and_then(Value::as_str)
        .ok_or_else(|| fail(ErrorCode::InvalidMessage, "missing event name"))?;
    if has_control(name) {
        return Err(fail(
            ErrorCode::InvalidMessage,
            "event name holds a control character",
        ));
    }
    let args = items.get(1);
    let room = || -> Result<RoomId, EventError> {
        let id = args
            .and_then(|a| a.get("room_id"))
            .and_then(Value::as_str)
            .ok_or_else(|| fail(ErrorCode::InvalidMessage, "room_id must be a string"))?;
        RoomId::parse(id).map_err(|e| fail(ErrorCode::InvalidMessage, &format!("room_id: {e}")))
    };
    let op = match name {
        "join" => Op::Join { room: room()? },
        "leave" => Op::Leave { room: room()? },
        "presence" => Op::Presence { room: room()? },
        "message" => {
            let room = room()?;
            let mut message = args
                .and_then(|a| a.get("message"))
                .cloned()
                .ok_or_else(|| fail(ErrorCode::InvalidMessage, "missing message"))?;
            // The payload is `data`: cleaned like it. Everything else was read as sent.
            message.strip_c0_in_place();
            Op::Publish {
                room,
                data: message,
                event: None,
            }
        }
        other => {
            // A custom event (SPEC §8): published to `room_id` as event `other`, its payload
            // the first argument without `room_id`.
            let event =
                EventName::parse(other).map_err(|why| fail(ErrorCode::InvalidMessage, why))?;
            if items.len() > 2 {
                return Err(fail(
                    ErrorCode::InvalidMessage,
                    "a custom event takes one argument",
                ));
            }
            let room = room()?;
            let mut payload = match args {
                Some(Value::Map(entries)) => Value::Map(
                    entries
                        .iter()
                        .filter(|(k, _)| k.as_str() != "room_id")
                        .cloned()
                        .collect(),
                ),
                _ => return Err(fail(ErrorCode::InvalidMessage, "room_id must be a string")),
            };
            payload.strip_c0_in_place();
            Op::Publish {
                room,
                data: payload,
                event: Some(event),
            }
        }
    };
    Ok(Request { id: ack_id, op })
}

fn parse_json(data: &str, level: usize, limits: &DecodeLimits) -> Result<Value, String> {
    deserialize_seed(
        data.as_bytes(),
        crate::envelope::Format::Json,
        // Kept as sent: the event name and `room_id` are refused when they hold a control
        // character; only the `message` payload is cleaned (`decode_event`).
        ValueSeed {
            level,
            max_depth: limits.max_depth,
            strings: Strings::Keep,
        },
    )
}

/// The Engine.IO open packet (SPEC §8).
pub fn encode_open(
    sid: &str,
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    max_payload: u64,
) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Open<'a> {
        sid: &'a str,
        upgrades: [&'a str; 0],
        ping_interval: u64,
        ping_timeout: u64,
        max_payload: u64,
    }
    let open = Open {
        sid,
        upgrades: [],
        ping_interval: ping_interval_ms,
        ping_timeout: ping_timeout_ms,
        max_payload,
    };
    format!("0{}", to_json(&open))
}

/// The Engine.IO ping the server sends every `pingInterval`.
pub const ENGINE_PING: &str = "2";
/// The Engine.IO pong a client answers with.
pub const ENGINE_PONG: &str = "3";

/// CONNECT accepted on `/`.
pub fn encode_connect_ok(sid: &str) -> String {
    #[derive(Serialize)]
    struct Ok<'a> {
        sid: &'a str,
    }
    format!("40{}", to_json(&Ok { sid }))
}

/// CONNECT refused: `44{"message":…}`.
pub fn encode_connect_error(message: &str) -> String {
    #[derive(Serialize)]
    struct Err<'a> {
        message: &'a str,
    }
    format!("44{}", to_json(&Err { message }))
}

/// An EVENT packet `42["name",payload]`.
pub fn encode_event<T: Serialize + ?Sized>(name: &str, payload: &T) -> String {
    format!("42[{},{}]", to_json(name), to_json(payload))
}

/// An ACK packet `43<id>[payload]`.
pub fn encode_ack<T: Serialize + ?Sized>(ack_id: u64, payload: &T) -> String {
    format!("43{ack_id}[{}]", to_json(payload))
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> String {
    // Our payloads hold only strings, integers and finite floats: serialization cannot fail.
    sonic_rs::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

/// The ack payloads of SPEC §8.
#[derive(Debug, Clone, PartialEq)]
pub enum AckPayload<'a> {
    /// `{ok:true}` (join, leave).
    Ok,
    /// `{ok:true, seq}` (message).
    Published {
        /// The message's seq.
        seq: u64,
    },
    /// `{ok:true, presence:[…]}`.
    Presence(&'a [PresenceEntry]),
    /// `{ok:false, error:{code,message}}`.
    Failed {
        /// Error code.
        code: ErrorCode,
        /// Human-readable reason.
        message: &'a str,
    },
}

impl Serialize for AckPayload<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self {
            AckPayload::Ok => map.serialize_entry("ok", &true)?,
            AckPayload::Published { seq } => {
                map.serialize_entry("ok", &true)?;
                map.serialize_entry("seq", seq)?;
            }
            AckPayload::Presence(entries) => {
                map.serialize_entry("ok", &true)?;
                map.serialize_entry("presence", &PresenceList(entries))?;
            }
            AckPayload::Failed { code, message } => {
                map.serialize_entry("ok", &false)?;
                map.serialize_entry(
                    "error",
                    &ErrorBody {
                        code: code.as_str(),
                        message,
                    },
                )?;
            }
        }
        map.end()
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
}

struct PresenceList<'a>(&'a [PresenceEntry]);

impl Serialize for PresenceList<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Entry<'a> {
            user: &'a str,
            name: &'a str,
            conns: u32,
        }
        serializer.collect_seq(self.0.iter().map(|e| Entry {
            user: &e.user,
            name: &e.name,
            conns: e.conns,
        }))
    }
}

/// The `message` event a Socket.IO client receives for a room message.
pub fn encode_message_event(record: &MessageRecord) -> String {
    #[derive(Serialize)]
    struct MessageEvent<'a> {
        room_id: &'a str,
        user_id: Option<&'a str>,
        username: &'a str,
        message: &'a Value,
        seq: u64,
    }
    // A custom event is emitted under its own name, with the same fields.
    let name = record.event.as_ref().map_or("message", |e| e.as_str());
    encode_event(
        name,
        &MessageEvent {
            room_id: record.room.as_str(),
            user_id: record.from.as_deref(),
            username: &record.name,
            message: &record.data,
            seq: record.seq,
        },
    )
}

/// The `presence` event.
pub fn encode_presence_event(room: &str, joined: &[PresenceUser], left: &[PresenceUser]) -> String {
    #[derive(Serialize)]
    struct User<'a> {
        user: &'a str,
        name: &'a str,
    }
    #[derive(Serialize)]
    struct PresenceEvent<'a> {
        room_id: &'a str,
        joined: Vec<User<'a>>,
        left: Vec<User<'a>>,
    }
    fn users(list: &[PresenceUser]) -> Vec<User<'_>> {
        list.iter()
            .map(|u| User {
                user: &u.user,
                name: &u.name,
            })
            .collect()
    }
    encode_event(
        "presence",
        &PresenceEvent {
            room_id: room,
            joined: users(joined),
            left: users(left),
        },
    )
}

/// The `kicked` event.
pub fn encode_kicked_event(room: &str, reason: &str) -> String {
    #[derive(Serialize)]
    struct Kicked<'a> {
        room_id: &'a str,
        reason: &'a str,
    }
    encode_event(
        "kicked",
        &Kicked {
            room_id: room,
            reason,
        },
    )
}

/// The `error` event for a failed event sent without an ack.
pub fn encode_error_event(code: ErrorCode, message: &str) -> String {
    encode_event(
        "error",
        &ErrorBody {
            code: code.as_str(),
            message,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_message_bytes: 65536,
        max_depth: 32,
        max_resume_rooms: 128,
    };

    #[test]
    fn engine_packets_from_the_protocol_document() {
        assert_eq!(parse_engine_packet("2"), Ok(EnginePacket::Ping("")));
        assert_eq!(
            parse_engine_packet("3probe"),
            Ok(EnginePacket::Pong("probe"))
        );
        assert_eq!(
            parse_engine_packet("4hello"),
            Ok(EnginePacket::Message("hello"))
        );
        assert_eq!(parse_engine_packet("6"), Ok(EnginePacket::Noop));
        assert!(parse_engine_packet("").is_err());
        assert!(parse_engine_packet("9").is_err());
        assert_eq!(
            encode_open("lv_VI97HAXpY6yYWAAAC", 25000, 35000, 65536),
            r#"0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":[],"pingInterval":25000,"pingTimeout":35000,"maxPayload":65536}"#
        );
    }

    #[test]
    fn socket_packets_from_the_protocol_document() {
        // Examples of the Socket.IO v5 protocol document.
        assert_eq!(
            parse_socket_packet("0{\"token\":\"123\"}"),
            Ok(SocketPacket {
                kind: PacketType::Connect,
                namespace: "/",
                ack_id: None,
                data: Some("{\"token\":\"123\"}")
            })
        );
        assert_eq!(
            parse_socket_packet("2[\"foo\"]"),
            Ok(SocketPacket {
                kind: PacketType::Event,
                namespace: "/",
                ack_id: None,
                data: Some("[\"foo\"]")
            })
        );
        assert_eq!(
            parse_socket_packet("212[\"foo\"]"),
            Ok(SocketPacket {
                kind: PacketType::Event,
                namespace: "/",
                ack_id: Some(12),
                data: Some("[\"foo\"]")
            })
        );
        assert_eq!(
            parse_socket_packet("2/admin,[\"bar\"]"),
            Err(SocketIoError::Namespace)
        );
        assert_eq!(
            parse_socket_packet("51-[\"baz\",{\"_placeholder\":true,\"num\":0}]"),
            Err(SocketIoError::Binary)
        );
        assert_eq!(
            parse_socket_packet("1").unwrap().kind,
            PacketType::Disconnect
        );
        assert_eq!(parse_socket_packet("2/,1[\"a\"]").unwrap().ack_id, Some(1));
        assert!(parse_socket_packet("299999999999999999999[]").is_err());
        assert_eq!(encode_connect_ok("abc"), r#"40{"sid":"abc"}"#);
        assert_eq!(
            encode_connect_error("unauthorized"),
            r#"44{"message":"unauthorized"}"#
        );
        assert_eq!(encode_ack(12, &AckPayload::Ok), r#"4312[{"ok":true}]"#);
    }

    #[test]
    fn connect_auth_token() {
        let p = parse_socket_packet(r#"0{"token":"abc"}"#).unwrap();
        assert_eq!(connect_token(&p, &LIMITS).as_deref(), Some("abc"));
        assert_eq!(
            connect_token(&parse_socket_packet("0").unwrap(), &LIMITS),
            None
        );
        assert_eq!(
            connect_token(&parse_socket_packet(r#"0{"token":5}"#).unwrap(), &LIMITS),
            None
        );
    }

    #[test]
    fn events_map_to_native_requests() {
        let p =
            parse_socket_packet(r#"23["message",{"room_id":"lobby","message":{"t":"hi\u0001"}}]"#)
                .unwrap();
        let req = decode_event(&p, &LIMITS).unwrap();
        assert_eq!(req.id, Some(3));
        assert_eq!(
            req.op,
            Op::Publish {
                room: RoomId::parse("lobby").unwrap(),
                data: Value::map([("t", Value::str("hi"))]),
                event: None,
            }
        );
        // A custom event: the payload without `room_id`, under its name.
        let p = parse_socket_packet(r#"25["dance",{"room_id":"lobby","step":2}]"#).unwrap();
        let req = decode_event(&p, &LIMITS).unwrap();
        assert_eq!(
            req.op,
            Op::Publish {
                room: RoomId::parse("lobby").unwrap(),
                data: Value::map([("step", Value::UInt(2))]),
                event: Some(EventName::parse("dance").unwrap()),
            }
        );
        for bad in [
            r#"27["dance",{"room_id":"lobby"},2]"#,
            r#"27["two words",{"room_id":"lobby"}]"#,
            r#"27["kicked",{"room_id":"lobby"}]"#,
        ] {
            let p = parse_socket_packet(bad).unwrap();
            let err = decode_event(&p, &LIMITS).unwrap_err();
            assert_eq!(
                (err.code, err.ack_id),
                (ErrorCode::InvalidMessage, Some(7)),
                "{bad}"
            );
        }
        let p = parse_socket_packet(r#"2["join",{"room_id":"lobby"}]"#).unwrap();
        assert_eq!(
            decode_event(&p, &LIMITS).unwrap().op,
            Op::Join {
                room: RoomId::parse("lobby").unwrap()
            }
        );
        let p = parse_socket_packet(r#"27["dance",{}]"#).unwrap();
        let err = decode_event(&p, &LIMITS).unwrap_err();
        assert_eq!((err.code, err.ack_id), (ErrorCode::InvalidMessage, Some(7)));
        let p = parse_socket_packet(r#"27["join",{"room_id":"-x"}]"#).unwrap();
        assert_eq!(
            decode_event(&p, &LIMITS).unwrap_err().code,
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn room_ids_and_event_names_with_control_characters_are_refused() {
        for packet in [
            r#"27["join",{"room_id":"lob\u0000by"}]"#,
            r#"27["message",{"room_id":"a\u0007b","message":"x"}]"#,
            r#"27["mess\u0000age",{"room_id":"lobby","message":"x"}]"#,
        ] {
            let p = parse_socket_packet(packet).unwrap();
            let err = decode_event(&p, &LIMITS).unwrap_err();
            assert_eq!(
                (err.code, err.ack_id),
                (ErrorCode::InvalidMessage, Some(7)),
                "{packet}"
            );
        }
        let p = parse_socket_packet(r#"0{"token":"ab\u0000c"}"#).unwrap();
        assert_eq!(connect_token(&p, &LIMITS), None);
    }

    #[test]
    fn server_events() {
        let record = MessageRecord {
            room: RoomId::parse("lobby").unwrap(),
            seq: 4,
            from: Some("u1".into()),
            name: "alice".into(),
            ts: 1,
            data: Value::str("hi"),
            event: None,
        };
        assert_eq!(
            encode_message_event(&record),
            r#"42["message",{"room_id":"lobby","user_id":"u1","username":"alice","message":"hi","seq":4}]"#
        );
        let custom = MessageRecord {
            event: Some(EventName::parse("dance").unwrap()),
            ..record
        };
        assert_eq!(
            encode_message_event(&custom),
            r#"42["dance",{"room_id":"lobby","user_id":"u1","username":"alice","message":"hi","seq":4}]"#
        );
        assert_eq!(
            encode_ack(
                1,
                &AckPayload::Failed {
                    code: ErrorCode::Forbidden,
                    message: "no"
                }
            ),
            r#"431[{"ok":false,"error":{"code":"forbidden","message":"no"}}]"#
        );
        assert_eq!(
            encode_kicked_event("r", "removed"),
            r#"42["kicked",{"room_id":"r","reason":"removed"}]"#
        );
        let users = [PresenceUser {
            user: "u".into(),
            name: "n".into(),
        }];
        assert_eq!(
            encode_presence_event("r", &users, &[]),
            r#"42["presence",{"room_id":"r","joined":[{"user":"u","name":"n"}],"left":[]}]"#
        );
    }
}
