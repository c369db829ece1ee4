//! The Socket.IO v4 dialect of a live connection (SPEC §8), as pure mapping: an Engine.IO packet
//! from the client becomes a native request (or an answer of its own), and a native answer or push
//! becomes its Socket.IO frame. No socket, no shard: the connection side sends what this returns.
//! The Engine.IO open handshake before registration lives with the upgrade.

use bytes::Bytes;
use protocol::envelope::{DecodeLimits, Push, Request};
use protocol::socketio::{self, AckPayload, EnginePacket, PacketType};
use protocol::{CloseCode, ErrorCode};

use crate::config::EngineConfig;
use crate::frames::socketio_frame;

/// The decoding bounds of a Socket.IO connection.
pub(crate) fn limits(config: &EngineConfig) -> DecodeLimits {
    DecodeLimits {
        max_message_bytes: config.max_message_bytes,
        max_depth: config.max_json_depth,
        max_resume_rooms: 0,
    }
}

/// What one Engine.IO packet from the client asks for.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A request, mapped to its native form (the ack id is the request id).
    Request(Request),
    /// A frame to send back at once (the pong to a ping).
    Answer(Bytes),
    /// A packet that was refused: counted as invalid and answered with this frame.
    Refused(Bytes),
    /// The client is leaving: close normally.
    Close,
    /// Nothing to do.
    Nothing,
}

/// Decodes one Engine.IO packet from the client (a WebSocket text message).
pub(crate) fn decode(bytes: &[u8], limits: &DecodeLimits) -> Incoming {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Incoming::Nothing;
    };
    match socketio::parse_engine_packet(text) {
        Ok(EnginePacket::Ping(payload)) => Incoming::Answer(socketio_frame(&format!("3{payload}"))),
        Ok(
            EnginePacket::Pong(_) | EnginePacket::Noop | EnginePacket::Open | EnginePacket::Upgrade,
        ) => Incoming::Nothing,
        Ok(EnginePacket::Close) => Incoming::Close,
        Ok(EnginePacket::Message(inner)) => match socketio::parse_socket_packet(inner) {
            Ok(packet) => match packet.kind {
                PacketType::Event => match socketio::decode_event(&packet, limits) {
                    Ok(request) => Incoming::Request(request),
                    Err(e) => Incoming::Refused(failure(e.ack_id, e.code, &e.message)),
                },
                PacketType::Disconnect => Incoming::Close,
                _ => Incoming::Nothing,
            },
            Err(e) => Incoming::Refused(failure(None, ErrorCode::InvalidMessage, &e.to_string())),
        },
        Err(_) => Incoming::Refused(failure(
            None,
            ErrorCode::InvalidMessage,
            "malformed Engine.IO packet",
        )),
    }
}

/// The close code a client's Engine.IO close or Socket.IO DISCONNECT is answered with.
pub(crate) const CLIENT_CLOSE: CloseCode = CloseCode::NORMAL;

/// A failed event: its ack, or an `error` event when the client asked for no ack.
pub(crate) fn failure(ack: Option<u64>, code: ErrorCode, message: &str) -> Bytes {
    match ack {
        Some(id) => socketio_frame(&socketio::encode_ack(
            id,
            &AckPayload::Failed { code, message },
        )),
        None => socketio_frame(&socketio::encode_error_event(code, message)),
    }
}

/// The CONNECT acknowledgement for session `sid`.
pub(crate) fn connected(sid: &str) -> Bytes {
    socketio_frame(&socketio::encode_connect_ok(sid))
}

/// An ack, when the event asked for one.
pub(crate) fn ack(ack: Option<u64>, payload: &AckPayload<'_>) -> Option<Bytes> {
    ack.map(|id| socketio_frame(&socketio::encode_ack(id, payload)))
}

/// The Socket.IO form of a native answer or push; `None` for those it has none of (SPEC §8 maps
/// four events only: no welcome, history, resume or refresh).
pub(crate) fn push(push: &Push<'_>) -> Option<Bytes> {
    match push {
        Push::Error { id, code, message } => Some(failure(*id, *code, message)),
        Push::Ack { id } | Push::JoinReply { id, .. } => ack(*id, &AckPayload::Ok),
        Push::PublishReply { id, seq } => ack(*id, &AckPayload::Published { seq: *seq }),
        Push::PresenceReply { id, presence } => ack(*id, &AckPayload::Presence(presence)),
        Push::Kicked { room, reason } => {
            Some(socketio_frame(&socketio::encode_kicked_event(room, reason)))
        }
        _ => None,
    }
}
