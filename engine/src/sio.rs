//! The Socket.IO v4 endpoint (SPEC §8) on top of the native machinery: the Engine.IO open
//! handshake and CONNECT with its token before a connection is registered, then events mapped to
//! native requests and native answers mapped back to acks and events.

use std::rc::Rc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use protocol::ErrorCode;
use protocol::envelope::{DecodeLimits, Push};
use protocol::socketio::{self, AckPayload, EnginePacket, PacketType};
use protocol::ws::{self, Message, MessageDecoder};

use crate::auth::{ClientInfo, Identity};
use crate::conn::Conn;
use crate::frames::socketio_frame;
use crate::shard::Shard;

fn limits(shard: &Shard) -> DecodeLimits {
    let cfg = &shard.shared.config;
    DecodeLimits {
        max_message_bytes: cfg.max_message_bytes,
        max_depth: cfg.max_json_depth,
        max_resume_rooms: 0,
    }
}

/// What the pre-registration handshake produced.
pub(crate) struct Connected {
    pub(crate) stream: TcpStream,
    pub(crate) leftover: Vec<u8>,
    pub(crate) identity: Identity,
}

/// Most bytes buffered from a socket before its CONNECT: a CONNECT packet with the longest token
/// accepted (8 KiB) fits with room to spare, and an unauthenticated socket holds no more.
const MAX_BEFORE_CONNECT: usize = 16 * 1024;

/// After the 101: sends the Engine.IO open packet and waits (at most `http_head_timeout`, like a
/// request head) for the Socket.IO CONNECT on `/`, whose auth payload (or the `token` query
/// parameter) must hold a valid access token; at most [`MAX_BEFORE_CONNECT`] bytes are buffered
/// meanwhile. On failure a CONNECT_ERROR is sent and `None` returned.
pub(crate) async fn handshake(
    shard: &Rc<Shard>,
    mut stream: TcpStream,
    query_token: Option<String>,
    client: ClientInfo<'_>,
) -> Option<Connected> {
    let cfg = &shard.shared.config;
    let heartbeat = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(25_000);
    let sid = format!("s{}{:x}", shard.shared.instance, shard.next_conn_id());
    let open = socketio::encode_open(
        &sid,
        heartbeat,
        heartbeat + 10_000,
        cfg.max_message_bytes as u64,
    );
    let (result, _) = stream.write_all(socketio_frame(&open)).await;
    result.ok()?;
    let mut decoder = MessageDecoder::new();
    let mut pending: Vec<u8> = Vec::new();
    let wait_ms = u64::try_from(cfg.http_head_timeout.as_millis()).unwrap_or(10_000);
    let deadline = crate::clock::now_ms() + wait_ms;
    loop {
        // Parse what we have.
        let mut offset = 0;
        while offset < pending.len() {
            let decoded = decoder
                .decode(&mut pending[offset..], MAX_BEFORE_CONNECT)
                .ok()?;
            if decoded.consumed == 0 {
                break;
            }
            offset += decoded.consumed;
            let Some(Message::Text(text)) = decoded.message else {
                continue;
            };
            let text = std::str::from_utf8(text.as_bytes()).ok()?.to_owned();
            let Ok(EnginePacket::Message(inner)) = socketio::parse_engine_packet(&text) else {
                continue;
            };
            let packet = match socketio::parse_socket_packet(inner) {
                Ok(p) if p.kind == PacketType::Connect => p,
                Ok(_) => continue,
                Err(_) => {
                    refuse(&mut stream, "invalid namespace").await;
                    return None;
                }
            };
            let token =
                socketio::connect_token(&packet, &limits(shard)).or_else(|| query_token.clone());
            let verified = match token {
                Some(token) => shard.shared.auth.verify_access(&token, &client),
                None => Err(crate::auth::AuthFailure::Missing),
            };
            match verified {
                Ok(identity) => {
                    let leftover = pending[offset..].to_vec();
                    return Some(Connected {
                        stream,
                        leftover,
                        identity,
                    });
                }
                Err(reason) => {
                    shard.shared.metrics.auth_failure(reason);
                    shard.shared.metrics.connect("unauthorized");
                    refuse(&mut stream, "unauthorized").await;
                    return None;
                }
            }
        }
        pending.drain(..offset);
        let remaining = deadline.saturating_sub(crate::clock::now_ms());
        if remaining == 0 || pending.len() > MAX_BEFORE_CONNECT {
            return None;
        }
        let read = monoio::time::timeout(
            Duration::from_millis(remaining),
            shard.buffers.read_ready(&stream, false),
        );
        let Ok(Ok(buf)) = read.await else { return None };
        let eof = buf.is_empty();
        pending.extend_from_slice(&buf);
        shard.buffers.put(buf);
        if eof {
            return None;
        }
    }
}

/// Sends CONNECT_ERROR and a close frame.
pub(crate) async fn refuse(stream: &mut TcpStream, message: &str) {
    let mut out = socketio_frame(&socketio::encode_connect_error(message)).to_vec();
    ws::encode_close(&mut out, protocol::CloseCode::POLICY);
    let _ = stream.write_all(out).await;
}

/// Queues the CONNECT acknowledgement (written once the initial rooms are joined).
pub(crate) fn on_connected(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    shard.writer.enqueue(
        conn,
        &socketio_frame(&socketio::encode_connect_ok(
            &conn.session(&shard.shared.instance),
        )),
    );
}

/// One Engine.IO packet from the client.
pub(crate) fn on_text(shard: &Rc<Shard>, conn: &Rc<Conn>, bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match socketio::parse_engine_packet(text) {
        Ok(EnginePacket::Ping(payload)) => {
            shard
                .writer
                .enqueue(conn, &socketio_frame(&format!("3{payload}")));
        }
        Ok(
            EnginePacket::Pong(_) | EnginePacket::Noop | EnginePacket::Open | EnginePacket::Upgrade,
        ) => {}
        Ok(EnginePacket::Close) => shard.writer.close(conn, protocol::CloseCode::NORMAL),
        Ok(EnginePacket::Message(inner)) => match socketio::parse_socket_packet(inner) {
            Ok(packet) => match packet.kind {
                PacketType::Event => match socketio::decode_event(&packet, &limits(shard)) {
                    Ok(request) => crate::ws::handle_request(shard, conn, request),
                    Err(e) => {
                        shard.shared.metrics.message_in("invalid");
                        fail(shard, conn, e.ack_id, e.code, &e.message);
                    }
                },
                PacketType::Disconnect => shard.writer.close(conn, protocol::CloseCode::NORMAL),
                _ => {}
            },
            Err(e) => {
                shard.shared.metrics.message_in("invalid");
                fail(shard, conn, None, ErrorCode::InvalidMessage, &e.to_string());
            }
        },
        Err(_) => {
            shard.shared.metrics.message_in("invalid");
            fail(
                shard,
                conn,
                None,
                ErrorCode::InvalidMessage,
                "malformed Engine.IO packet",
            );
        }
    }
}

fn fail(shard: &Rc<Shard>, conn: &Rc<Conn>, ack: Option<u64>, code: ErrorCode, message: &str) {
    match ack {
        Some(id) => shard.writer.enqueue(
            conn,
            &socketio_frame(&socketio::encode_ack(
                id,
                &AckPayload::Failed { code, message },
            )),
        ),
        None => shard.writer.enqueue(
            conn,
            &socketio_frame(&socketio::encode_error_event(code, message)),
        ),
    }
}

/// Sends an ack when the event asked for one.
pub(crate) fn send_ack(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    ack: Option<u64>,
    payload: &AckPayload<'_>,
) {
    if let Some(id) = ack {
        shard
            .writer
            .enqueue(conn, &socketio_frame(&socketio::encode_ack(id, payload)));
    }
}

/// Maps a native answer to its Socket.IO form.
pub(crate) fn send_push(shard: &Rc<Shard>, conn: &Rc<Conn>, push: &Push<'_>) {
    match push {
        Push::Error { id, code, message } => fail(shard, conn, *id, *code, message),
        Push::Ack { id } | Push::JoinReply { id, .. } => {
            send_ack(shard, conn, *id, &AckPayload::Ok);
        }
        Push::PublishReply { id, seq } => {
            send_ack(shard, conn, *id, &AckPayload::Published { seq: *seq });
        }
        Push::PresenceReply { id, presence } => {
            send_ack(shard, conn, *id, &AckPayload::Presence(presence));
        }
        Push::Kicked { room, reason } => shard.writer.enqueue(
            conn,
            &socketio_frame(&socketio::encode_kicked_event(room, reason)),
        ),
        // No Socket.IO form (SPEC §8 maps four events only).
        _ => {}
    }
}
