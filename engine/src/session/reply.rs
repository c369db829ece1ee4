//! What a connection is sent: every answer and push encoded in its dialect (native JSON or
//! MessagePack, with zstd above the threshold, or Socket.IO) and queued on the shard's writer;
//! the welcome; messages kept in history, transcoded when the connection reads the other format.
//! It decides nothing: the callers decide what to send.

use std::rc::Rc;

use bytes::Bytes;
use protocol::socketio;
use protocol::ws;
use std::sync::Arc;

use protocol::ErrorCode;
use protocol::envelope::{Push, RoomId, WelcomeLimits, encode_history_reply};

use crate::clock::now_ms;
use crate::conn::{Conn, Membership};
use crate::frames::{FrameKey, encode_native, frame_payload, socketio_frame};
use crate::room::history::StoredMessage;
use crate::shard::Shard;

pub(crate) fn send_welcome(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    if conn.key == FrameKey::SocketIo {
        shard.writer.set_ready(conn);
        return;
    }
    let cfg = &shard.shared.config;
    // In configured order (default rooms, then the personal room), whatever order the homes
    // answered in; rooms that refused the join (full) are left out.
    let personal = conn.personal_room();
    let rooms: Vec<RoomId> = cfg
        .default_rooms
        .iter()
        .chain(personal.iter())
        .filter(|r| matches!(conn.membership(r), Some(Membership::Joined(_))))
        .cloned()
        .collect();
    let identity = conn.identity.borrow().clone();
    let session = conn.session(&shard.shared.instance);
    let push = Push::Welcome {
        session: &session,
        user_id: &identity.user_id,
        username: &identity.username,
        rooms: &rooms,
        heartbeat: cfg.heartbeat.as_secs(),
        resume_ttl: cfg.resume_ttl.as_secs(),
        limits: WelcomeLimits {
            max_message_bytes: cfg.max_message_bytes as u64,
            publish_per_sec: per_second(&cfg.publish_per_connection),
        },
    };
    if let Some(frame) = encode(shard, conn, &push) {
        shard.writer.enqueue_first(conn, &frame);
    }
    shard.writer.set_ready(conn);
    // A token that expires within the warning window is warned about at once, not at the next
    // scan of the ticker.
    if now_ms() + 60_000 >= identity.expires_at_ms {
        conn.refresh_warned.set(true);
        send_refresh_required(shard, conn, identity.expires_at_ms);
    }
}

pub(crate) fn per_second(spec: &crate::config::RateSpec) -> u64 {
    let secs = spec.per.as_secs_f64();
    if spec.count == 0 || secs <= 0.0 {
        0
    } else {
        {
            // At most 2^32 per second: fits u64 exactly.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let per_sec = (f64::from(spec.count) / secs).round() as u64;
            per_sec
        }
    }
}

/// Encodes a push for this connection's native format.
pub(crate) fn encode(shard: &Rc<Shard>, conn: &Conn, push: &Push<'_>) -> Option<Bytes> {
    encode_native(
        push,
        conn.key,
        shard.shared.config.compression_threshold,
        &mut shard.compressor.borrow_mut(),
    )
}

pub(crate) fn send(shard: &Rc<Shard>, conn: &Rc<Conn>, push: &Push<'_>) {
    if conn.key == FrameKey::SocketIo {
        if let Some(frame) = crate::sio::push(push) {
            shard.writer.enqueue(conn, &frame);
        }
        return;
    }
    if let Some(frame) = encode(shard, conn, push) {
        shard.writer.enqueue(conn, &frame);
    }
}

pub(crate) fn send_error(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
) {
    send(shard, conn, &Push::Error { id, code, message });
}

pub(crate) fn send_ping(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let frame = if conn.key == FrameKey::SocketIo {
        socketio_frame(socketio::ENGINE_PING)
    } else {
        ws::frame_bytes(ws::frame::PING, b"")
    };
    shard.writer.enqueue(conn, &frame);
}

pub(crate) fn send_refresh_required(shard: &Rc<Shard>, conn: &Rc<Conn>, expires_at: u64) {
    if conn.key != FrameKey::SocketIo {
        send(shard, conn, &Push::RefreshRequired { expires_at });
    }
}

pub(crate) fn send_ack(shard: &Rc<Shard>, conn: &Rc<Conn>, id: Option<u64>) {
    if id.is_some() || conn.key == FrameKey::SocketIo {
        send(shard, conn, &Push::Ack { id });
    }
}

/// Sends a message kept in history (a recovered one) in the connection's format. Socket.IO
/// connections have neither `resume` nor `history`.
pub(crate) fn send_stored(shard: &Rc<Shard>, conn: &Rc<Conn>, message: &StoredMessage) {
    let Some(format) = conn.key.format() else {
        return;
    };
    let cfg = &shard.shared.config;
    let Some(payload) = message.encoded(format, cfg.max_json_depth) else {
        tracing::error!(seq = message.seq, "a history message does not transcode");
        return;
    };
    let frame = frame_payload(
        &payload,
        conn.key,
        cfg.compression_threshold,
        &mut shard.compressor.borrow_mut(),
    );
    if let Some(frame) = frame {
        shard.writer.enqueue(conn, &frame);
    }
}

/// Answers `history` with the kept messages spliced into the reply in the connection's format.
pub(crate) fn send_history(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    messages: &[Arc<StoredMessage>],
    epoch: &str,
) {
    let Some(format) = conn.key.format() else {
        return;
    };
    let cfg = &shard.shared.config;
    // A reply must fit the connection's queue: it holds the oldest messages asked for up to half
    // of `max_queued_bytes` (at least one), and the client pages on with `since`.
    let room_for = cfg.max_queued_bytes / 2;
    let mut size = 0;
    let mut encoded: Vec<std::borrow::Cow<'_, [u8]>> = Vec::with_capacity(messages.len());
    for message in messages {
        let Some(bytes) = message.encoded(format, cfg.max_json_depth) else {
            continue;
        };
        size += bytes.len();
        if size > room_for && !encoded.is_empty() {
            break;
        }
        encoded.push(bytes);
    }
    let parts: Vec<&[u8]> = encoded.iter().map(|m| &**m).collect();
    let frame = encode_history_reply(id, &parts, epoch, format)
        .ok()
        .and_then(|payload| {
            frame_payload(
                &payload,
                conn.key,
                cfg.compression_threshold,
                &mut shard.compressor.borrow_mut(),
            )
        });
    match frame {
        Some(frame) => shard.writer.enqueue(conn, &frame),
        None => send_error(shard, conn, id, ErrorCode::Internal, "internal error"),
    }
}
