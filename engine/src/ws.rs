//! The native protocol on a live connection (SPEC §4): reading and decoding frames, dispatching
//! requests to room homes, and encoding the answers and pushes in the connection's format.

use std::cell::UnsafeCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::compression::{ZstdError, compressed_bound, is_zstd};
use protocol::envelope::{
    DecodeLimits, Format, Op, Push, Request, RoomId, WelcomeLimits, decode_request,
    encode_history_reply,
};
use protocol::socketio::{self, AckPayload};
use protocol::ws::{self, Message, MessageDecoder};
use protocol::{CloseCode, ErrorCode};

use crate::auth::Identity;
use crate::clock::now_ms;
use crate::conn::{Conn, ConnId, ConnParts, HeldPublish, Membership, PartialRead};
use crate::frames::{Dialect, FrameKey, encode_native, frame_payload, socketio_frame};
use crate::home::JoinMsg;
use crate::limits::{Bucket, Verdict};
use crate::msg::{Joined, Reply, ShardMsg};
use crate::room::history::StoredMessage;
use crate::room::{Recovery, ResumeFrom};
use crate::rooms::RoomAccess;
use crate::shard::Shard;
use crate::sys;

/// An upgraded, authenticated, admitted connection.
pub(crate) struct Accepted {
    pub(crate) stream: TcpStream,
    /// Bytes the client sent right after the upgrade request.
    pub(crate) leftover: Vec<u8>,
    pub(crate) identity: Identity,
    pub(crate) dialect: Dialect,
    pub(crate) ip: std::net::IpAddr,
    /// The connection it replaces under `close_oldest`.
    pub(crate) replaced: Option<ConnId>,
    pub(crate) id: ConnId,
}

/// Registers an upgraded connection and hands it to its shard's reader (see
/// [`crate::sys::ReadySet`]): from here on it has no task of its own.
pub(crate) fn run(shard: &Rc<Shard>, accepted: Accepted) {
    let Accepted {
        stream,
        leftover,
        identity,
        dialect,
        ip,
        replaced,
        id,
    } = accepted;
    // One handle on the stream, shared by the shard's reader and the writer (see
    // `sys::stream_ref`).
    let raw: Rc<UnsafeCell<TcpStream>> = Rc::new(UnsafeCell::new(stream));
    let conn = Rc::new(Conn::new(ConnParts {
        id,
        key: dialect.key(),
        stream: raw,
        identity,
        ip,
    }));
    shard.conns.borrow_mut().insert(id, conn.clone());
    shard
        .shared
        .metrics
        .connections
        .fetch_add(1, Ordering::Relaxed);
    shard.shared.metrics.connect("ok");
    if let Some(old) = replaced {
        shard.shared.send(
            crate::conn::shard_of(old),
            ShardMsg::Close {
                conn: old,
                code: CloseCode::SESSION_REPLACED,
            },
        );
    }
    if dialect == Dialect::SocketIo {
        crate::sio::on_connected(shard, &conn);
    }
    join_initial_rooms(shard, &conn);
    if let Err(e) = shard.ready_set.add(conn.stream(), conn.id) {
        log::warn!("shard {}: cannot watch a connection: {e}", shard.id);
        conn.abnormal.set(true);
        cleanup(shard, &conn);
        return;
    }
    let mut leftover = leftover;
    if !leftover.is_empty() {
        feed(shard, &conn, &mut leftover);
        if conn.closing().is_some() && conn.abnormal.get() {
            finish(shard, &conn);
        }
    }
}

fn join_initial_rooms(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let cfg = &shard.shared.config;
    let mut rooms: Vec<RoomId> = cfg.default_rooms.clone();
    if let Some(personal) = conn.personal_room() {
        rooms.push(personal);
    }
    // At most 9,999 default rooms (configuration bounds `max_rooms_per_connection`).
    conn.pending_initial
        .set(u16::try_from(rooms.len()).unwrap_or(u16::MAX));
    if rooms.is_empty() {
        send_welcome(shard, conn);
        return;
    }
    for room in rooms {
        request_join(shard, conn, room, None, true);
    }
}

fn request_join(shard: &Rc<Shard>, conn: &Rc<Conn>, room: RoomId, id: Option<u64>, initial: bool) {
    request_join_from(shard, conn, room, id, initial, None);
}

fn request_join_from(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    room: RoomId,
    id: Option<u64>,
    initial: bool,
    resume: Option<ResumeFrom>,
) {
    let settings = match room_access(shard, conn, &room) {
        RoomAccess::Denied => {
            on_join_failed(
                shard,
                &room,
                conn.id,
                id,
                initial,
                ErrorCode::Forbidden,
                "not allowed to join this room",
            );
            return;
        }
        RoomAccess::Granted { publish, settings } => {
            conn.set_read_only(&room, !publish);
            Some(settings)
        }
        RoomAccess::Unknown => {
            conn.set_read_only(&room, false);
            None
        }
    };
    let already = conn.membership(&room).is_some();
    // The personal room is never listed (see `Conn::personal`); its membership is always known.
    if !already {
        let mut rooms = conn.rooms.borrow_mut();
        // Most connections hold one or two rooms: grow one at a time (a plain push reserves four).
        rooms.reserve_exact(1);
        rooms.push((room.clone(), Membership::Pending));
    }
    let home = shard.shared.home_of(&room);
    let msg = ShardMsg::Join(JoinMsg {
        room,
        conn: conn.id,
        user: conn.user_id(),
        name: conn.username(),
        key: conn.key,
        id,
        initial,
        already,
        resume,
        settings,
    });
    shard.dispatch(home, msg);
}

/// The policy's answer for this connection's user (personal rooms follow their own rule).
fn room_access(shard: &Rc<Shard>, conn: &Conn, room: &RoomId) -> RoomAccess {
    if room.is_personal() {
        RoomAccess::Unknown
    } else {
        shard.shared.policy.access(room, &conn.user_id())
    }
}

/// Removes the connection from `room` and tells it why (SPEC §5: a removed member, or a member
/// of a deleted room, stops receiving the room's messages at once).
pub(crate) fn kick(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId, reason: &str) {
    conn.set_read_only(room, false);
    if leave_room(shard, conn, room) {
        send(
            shard,
            conn,
            &Push::Kicked {
                room: room.as_str(),
                reason,
            },
        );
    }
}

/// Applies a changed permission to a connection in `room`.
pub(crate) fn reauthorize(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) {
    // Another user's personal room is open to admins only.
    if is_foreign_personal(conn, room) {
        if !shard.shared.policy.is_admin(&conn.user_id()) {
            kick(shard, conn, room, "permission_changed");
        }
        return;
    }
    match room_access(shard, conn, room) {
        RoomAccess::Denied => kick(shard, conn, room, "permission_changed"),
        RoomAccess::Granted { publish, .. } => conn.set_read_only(room, !publish),
        RoomAccess::Unknown => conn.set_read_only(room, false),
    }
}

fn send_welcome(shard: &Rc<Shard>, conn: &Rc<Conn>) {
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

fn per_second(spec: &crate::config::RateSpec) -> u64 {
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

fn send(shard: &Rc<Shard>, conn: &Rc<Conn>, push: &Push<'_>) {
    if conn.key == FrameKey::SocketIo {
        crate::sio::send_push(shard, conn, push);
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

/// Reads what a readable connection holds (one non-blocking `recv` into a pooled buffer) and
/// handles every whole frame; ends the connection at the end of its stream or on an error.
pub(crate) fn on_readable(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let Some(read) = shard.buffers.try_read(sys::stream_ref(conn.stream())) else {
        return;
    };
    let Ok(mut buf) = read else {
        conn.abnormal.set(true);
        finish(shard, conn);
        return;
    };
    let n = buf.len();
    if n == 0 {
        shard.buffers.put(buf);
        if conn.closing().is_none() {
            conn.abnormal.set(true);
        }
        finish(shard, conn);
        return;
    }
    shard
        .shared
        .metrics
        .bytes_in
        .fetch_add(n as u64, Ordering::Relaxed);
    conn.last_seen_ms.set(crate::clock::monotonic_ms32());
    feed(shard, conn, &mut buf[..n]);
    shard.buffers.put(buf);
    if conn.closing().is_some() && conn.abnormal.get() {
        finish(shard, conn);
    }
}

/// Handles the whole frames in what an earlier read left plus `data`; keeps the rest.
fn feed(shard: &Rc<Shard>, conn: &Rc<Conn>, data: &mut [u8]) {
    let dialect = conn.key.dialect();
    let limit = frame_limit(shard, dialect);
    match conn.take_partial() {
        // The usual case: nothing waiting, the frames are handled where they were read, and
        // nothing is allocated unless a frame is cut short.
        None => {
            let mut decoder = MessageDecoder::new();
            let consumed = process(shard, conn, &mut decoder, data, limit, dialect);
            let rest = &data[consumed.min(data.len())..];
            if !rest.is_empty() || decoder.in_message() {
                conn.keep_partial(Box::new(PartialRead {
                    decoder,
                    pending: rest.to_vec(),
                }));
            }
        }
        Some(mut partial) => {
            partial.pending.extend_from_slice(data);
            let consumed = process(
                shard,
                conn,
                &mut partial.decoder,
                &mut partial.pending,
                limit,
                dialect,
            );
            partial.pending.drain(..consumed.min(partial.pending.len()));
            conn.keep_partial(partial);
        }
    }
}

/// The connection's stream has ended: it leaves its shard's reader, then everything else.
fn finish(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    shard.ready_set.remove(conn.stream());
    cleanup(shard, conn);
}

/// The largest frame a connection may send (with zstd, the compressed bound of
/// `max_message_bytes`).
fn frame_limit(shard: &Shard, dialect: Dialect) -> usize {
    let max = shard.shared.config.max_message_bytes;
    match dialect {
        Dialect::Native(p) if p.zstd() => compressed_bound(max),
        _ => max,
    }
}

/// Decodes and handles every complete frame at the start of `data`; returns the bytes consumed.
fn process(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    decoder: &mut MessageDecoder,
    data: &mut [u8],
    frame_limit: usize,
    dialect: Dialect,
) -> usize {
    let mut offset = 0;
    while offset < data.len() {
        let decoded = match decoder.decode(&mut data[offset..], frame_limit) {
            Ok(d) => d,
            Err(e) => {
                shard.writer.close(conn, e.close_code());
                return data.len();
            }
        };
        if decoded.consumed == 0 {
            break;
        }
        offset += decoded.consumed;
        let Some(message) = decoded.message else {
            continue;
        };
        match message {
            Message::Ping(payload) => {
                shard
                    .writer
                    .enqueue(conn, &ws::frame_bytes(ws::frame::PONG, payload));
            }
            Message::Pong(_) => {}
            Message::Close(code, _) => {
                let reply = if code == CloseCode::NO_STATUS {
                    CloseCode::NORMAL
                } else {
                    code
                };
                shard.shared.metrics.disconnect(code.0);
                shard.writer.close(conn, reply);
                return data.len();
            }
            Message::Text(payload) | Message::Binary(payload) if conn.closing().is_some() => {
                drop(payload);
            }
            Message::Text(payload) => match dialect {
                Dialect::SocketIo => crate::sio::on_text(shard, conn, payload.as_bytes()),
                Dialect::Native(p) if p.format() == Format::Json => {
                    on_message(shard, conn, payload.as_bytes(), Format::Json);
                }
                Dialect::Native(_) => shard.writer.close(conn, CloseCode::UNSUPPORTED_DATA),
            },
            Message::Binary(payload) => match dialect {
                Dialect::Native(p) if p.zstd() && is_zstd(payload.as_bytes()) => {
                    let max = shard.shared.config.max_message_bytes;
                    let result = shard
                        .decompressor
                        .borrow_mut()
                        .decompress(payload.as_bytes(), max);
                    match result {
                        Ok(plain) => on_message(shard, conn, &plain, p.format()),
                        Err(ZstdError::TooLarge(_)) => shard.writer.close(conn, CloseCode::TOO_BIG),
                        Err(_) => {
                            shard.shared.metrics.message_in("invalid");
                            send_error(
                                shard,
                                conn,
                                None,
                                ErrorCode::InvalidMessage,
                                "corrupt zstd frame",
                            );
                        }
                    }
                }
                Dialect::Native(p) if p.format() == Format::MsgPack => {
                    on_message(shard, conn, payload.as_bytes(), Format::MsgPack);
                }
                _ => shard.writer.close(conn, CloseCode::UNSUPPORTED_DATA),
            },
        }
        if conn.closing().is_some() {
            return data.len();
        }
    }
    offset
}

fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, bytes: &[u8], format: Format) {
    let cfg = &shard.shared.config;
    let limits = DecodeLimits {
        max_message_bytes: cfg.max_message_bytes,
        max_depth: cfg.max_json_depth,
        max_resume_rooms: cfg.max_rooms_per_connection as usize,
    };
    match decode_request(bytes, format, &limits) {
        Ok(request) => handle_request(shard, conn, request),
        Err(e) => {
            shard.shared.metrics.message_in("invalid");
            if e.code == ErrorCode::TooLarge {
                shard.writer.close(conn, CloseCode::TOO_BIG);
            } else {
                send_error(shard, conn, e.id, e.code, &e.reason);
            }
        }
    }
}

/// Whether `room` is another user's personal room (owner-only, SPEC §5).
fn is_foreign_personal(conn: &Conn, room: &RoomId) -> bool {
    room.as_str()
        .strip_prefix(RoomId::PERSONAL_PREFIX)
        .is_some_and(|owner| owner != &*conn.user_id())
}

/// The checks before joining or reading a room, in order: token still valid (else 4001), rate
/// limit `which` (else `rate_limited` or 4008), not another user's personal room (else
/// `forbidden`). False when the request must stop.
fn may_read_room(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    room: &RoomId,
    which: &'static str,
    id: Option<u64>,
) -> bool {
    if !token_still_valid(shard, conn) || !rate(shard, conn, which, id) {
        return false;
    }
    let foreign = is_foreign_personal(conn, room) && !shard.shared.policy.is_admin(&conn.user_id());
    if foreign || room_access(shard, conn, room) == RoomAccess::Denied {
        send_error(
            shard,
            conn,
            id,
            ErrorCode::Forbidden,
            "not allowed to read this room",
        );
        return false;
    }
    true
}

/// Checks the token before a sensitive operation; closes with 4001 when it no longer holds.
fn token_still_valid(shard: &Rc<Shard>, conn: &Rc<Conn>) -> bool {
    let (expires, revoked) = {
        let identity = conn.identity.borrow();
        (identity.expires_at_ms, shard.shared.auth.revoked(&identity))
    };
    if let Some(revoked) = revoked {
        shard.writer.close(conn, revoked.close_code());
        return false;
    }
    let grace = u64::try_from(shard.shared.config.expiry_grace.as_millis()).unwrap_or(0);
    if now_ms() >= expires.saturating_add(grace) {
        shard.writer.close(conn, CloseCode::UNAUTHORIZED);
        return false;
    }
    true
}

fn rate(shard: &Rc<Shard>, conn: &Rc<Conn>, which: &'static str, id: Option<u64>) -> bool {
    rate_n(shard, conn, which, id, 1)
}

/// [`rate`] for a request that costs `tokens` (see [`Bucket::attempt_n`]).
fn rate_n(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    which: &'static str,
    id: Option<u64>,
    tokens: u32,
) -> bool {
    let cfg = &shard.shared.config;
    let now = now_ms();
    let (index, spec) = match which {
        "publish_per_connection" => (0, &cfg.publish_per_connection),
        "join_per_connection" => (1, &cfg.join_per_connection),
        _ => (2, &cfg.query_per_connection),
    };
    if spec.count == 0 {
        return true;
    }
    // Buckets made now are full, exactly as if made at connect and left to refill since.
    let verdict = conn.with_rare(|rare| {
        let buckets = rare.buckets.get_or_insert_with(|| {
            [
                Bucket::new(&cfg.publish_per_connection, now),
                Bucket::new(&cfg.join_per_connection, now),
                Bucket::new(&cfg.query_per_connection, now),
            ]
        });
        buckets[index].attempt_n(spec, now, tokens)
    });
    match verdict {
        Verdict::Allow => true,
        Verdict::Limited => {
            shard.shared.metrics.rate_limited(which);
            send_error(
                shard,
                conn,
                id,
                ErrorCode::RateLimited,
                "rate limit exceeded",
            );
            false
        }
        Verdict::Abusive => {
            shard.shared.metrics.rate_limited(which);
            shard.writer.close(conn, CloseCode::RATE_LIMITED);
            false
        }
    }
}

/// Dispatches one decoded request (native or mapped from Socket.IO).
pub(crate) fn handle_request(shard: &Rc<Shard>, conn: &Rc<Conn>, request: Request) {
    let metrics = &shard.shared.metrics;
    metrics.message_in(request.op.name());
    let id = request.id;
    match request.op {
        Op::Ping => send(shard, conn, &Push::Pong { id }),
        Op::Join { room } => {
            if !may_read_room(shard, conn, &room, "join_per_connection", id) {
                return;
            }
            let already = conn.membership(&room).is_some();
            let max = shard.shared.config.max_rooms_per_connection as usize;
            if !already && conn.room_count() >= max {
                send_error(
                    shard,
                    conn,
                    id,
                    ErrorCode::Forbidden,
                    "max_rooms_per_connection reached",
                );
                return;
            }
            request_join(shard, conn, room, id, false);
        }
        Op::Leave { room } => {
            if room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX) == Some(&*conn.user_id()) {
                send_error(
                    shard,
                    conn,
                    id,
                    ErrorCode::Forbidden,
                    "the personal room cannot be left",
                );
                return;
            }
            if !leave_room(shard, conn, &room) {
                send_error(
                    shard,
                    conn,
                    id,
                    ErrorCode::NotJoined,
                    "not joined to this room",
                );
                return;
            }
            send_ack(shard, conn, id);
        }
        Op::Publish { room, data } => {
            if !token_still_valid(shard, conn) || !rate(shard, conn, "publish_per_connection", id) {
                return;
            }
            let membership = conn.membership(&room);
            if membership.is_none() {
                send_error(
                    shard,
                    conn,
                    id,
                    ErrorCode::NotJoined,
                    "join the room before publishing",
                );
                return;
            }
            if conn.is_read_only(&room) {
                send_error(
                    shard,
                    conn,
                    id,
                    ErrorCode::Forbidden,
                    "not allowed to publish in this room",
                );
                return;
            }
            if membership == Some(Membership::Pending) {
                if !conn.hold_publish(HeldPublish { room, data, id }) {
                    send_error(
                        shard,
                        conn,
                        id,
                        ErrorCode::RateLimited,
                        "too many publishes waiting for a join",
                    );
                }
                return;
            }
            dispatch_publish(shard, conn, HeldPublish { room, data, id });
        }
        Op::Presence { room } => {
            if !may_read_room(shard, conn, &room, "query_per_connection", id) {
                return;
            }
            let home = shard.shared.home_of(&room);
            let msg = ShardMsg::PresenceQuery {
                room,
                conn: conn.id,
                id,
            };
            shard.dispatch(home, msg);
        }
        Op::History { room, since, limit } => {
            if !may_read_room(shard, conn, &room, "query_per_connection", id) {
                return;
            }
            let home = shard.shared.home_of(&room);
            let msg = ShardMsg::HistoryQuery {
                room,
                conn: conn.id,
                id,
                since,
                limit,
            };
            shard.dispatch(home, msg);
        }
        Op::Resume { session, rooms } => {
            // Every room it names is a join: charged to the join bucket (one request, so one
            // attempt toward the 3× close).
            let joins = u32::try_from(rooms.len()).unwrap_or(u32::MAX);
            if !token_still_valid(shard, conn)
                || !rate_n(shard, conn, "join_per_connection", id, joins)
            {
                return;
            }
            resume(shard, conn, id, &session, rooms);
        }
        Op::Refresh { token } => {
            // Each costs a signature check: limited like the other queries.
            if !rate(shard, conn, "query_per_connection", id) {
                return;
            }
            let verified = {
                let current = conn.identity.borrow();
                shard.shared.auth.verify_refresh(&token, &current)
            };
            match verified {
                Ok(identity) if identity.user_id == conn.user_id() => {
                    let expires_at = identity.expires_at_ms;
                    *conn.identity.borrow_mut() = identity;
                    conn.refresh_warned.set(false);
                    send(shard, conn, &Push::RefreshReply { id, expires_at });
                }
                Ok(_) => {
                    metrics.auth_failure(crate::auth::AuthFailure::Malformed);
                    send_error(shard, conn, id, ErrorCode::InvalidToken, "invalid token");
                }
                Err(reason) => {
                    metrics.auth_failure(reason);
                    send_error(shard, conn, id, ErrorCode::InvalidToken, "invalid token");
                }
            }
        }
    }
}

/// SPEC §7: rejoins the rooms (permissions re-checked), recovering missed messages where the
/// session is this user's, unexpired, and history covers the gap; answers once every room did.
fn resume(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    session: &str,
    rooms: Vec<(RoomId, protocol::envelope::ResumePoint)>,
) {
    if conn.resume_pending() {
        send_error(
            shard,
            conn,
            id,
            ErrorCode::Conflict,
            "a resume is already in progress",
        );
        return;
    }
    let valid = shard.shared.take_resumable(session, &conn.user_id());
    let max = shard.shared.config.max_rooms_per_connection as usize;
    let mut results = Vec::new();
    let mut joins = Vec::new();
    for (room, point) in rooms {
        let foreign_personal = is_foreign_personal(conn, &room);
        let membership = conn.membership(&room);
        let full = membership.is_none() && conn.room_count() + joins.len() >= max;
        if foreign_personal || full || membership == Some(Membership::Pending) {
            results.push((room, false));
            continue;
        }
        let upto = match membership {
            Some(Membership::Joined(seq)) => Some(seq),
            _ => None,
        };
        joins.push((
            room,
            ResumeFrom {
                seq: point.seq,
                epoch: point.epoch,
                upto,
                valid,
            },
        ));
    }
    if joins.is_empty() {
        send(
            shard,
            conn,
            &Push::ResumeReply {
                id,
                recovered: &results,
            },
        );
        return;
    }
    let waiting = joins.iter().map(|(r, _)| r.clone()).collect();
    conn.with_rare(|rare| {
        rare.resume = Some(Box::new(crate::conn::PendingResume {
            id,
            waiting,
            results,
        }));
    });
    for (room, from) in joins {
        request_join_from(shard, conn, room, None, false, Some(from));
    }
}

fn send_ack(shard: &Rc<Shard>, conn: &Rc<Conn>, id: Option<u64>) {
    if id.is_some() || conn.key == FrameKey::SocketIo {
        send(shard, conn, &Push::Ack { id });
    }
}

/// Removes `room` from the connection (and the shard's member table); the `Leave` its home must
/// hear, or None when it was not a member.
fn detach(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) -> Option<(usize, ShardMsg)> {
    let membership = {
        let mut rooms = conn.rooms.borrow_mut();
        let pos = rooms.iter().position(|(r, _)| r == room)?;
        rooms.remove(pos).1
    };
    match membership {
        Membership::Joined(_) => shard.drop_local_member(room, conn.id),
        // Left before the join was answered: its held publishes were never in the room.
        Membership::Pending => refuse_held(shard, conn, room),
    }
    Some((shard.shared.home_of(room), leave_msg(conn, room.clone())))
}

/// What a room's home hears when `conn` leaves `room`.
fn leave_msg(conn: &Conn, room: RoomId) -> ShardMsg {
    ShardMsg::Leave {
        room,
        conn: conn.id,
        user: conn.user_id(),
        name: conn.username(),
        key: conn.key,
    }
}

/// Removes `room` from the connection and tells the home. False when it was not a member.
fn leave_room(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) -> bool {
    let Some((home, msg)) = detach(shard, conn, room) else {
        return false;
    };
    shard.dispatch(home, msg);
    true
}

/// Sends a publish to its room's home, which sequences it.
fn dispatch_publish(shard: &Rc<Shard>, conn: &Conn, publish: HeldPublish) {
    let HeldPublish { room, data, id } = publish;
    let home = shard.shared.home_of(&room);
    let msg = ShardMsg::Publish {
        room,
        conn: conn.id,
        user: conn.user_id(),
        name: conn.username(),
        data,
        id,
    };
    shard.dispatch(home, msg);
}

/// Answers `not_joined` to the publishes held for a room the connection did not get into.
fn refuse_held(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) {
    for held in conn.take_held(Some(room)) {
        send_error(
            shard,
            conn,
            held.id,
            ErrorCode::NotJoined,
            "join the room before publishing",
        );
    }
}

fn cleanup(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    // Nobody is left to answer.
    drop(conn.take_held(None));
    let abnormal = conn.abnormal.get() && conn.closing().is_none();
    // Released first: the personal room's home, hearing this connection leave, looks here for
    // the owner's other connections to decide whether the room goes.
    shard.shared.release(conn.ip, &conn.user_id(), conn.id);
    let rooms: Vec<RoomId> = conn.rooms.borrow().iter().map(|(r, _)| r.clone()).collect();
    for room in &rooms {
        if abnormal {
            leave_room_later(shard, conn, room);
        } else {
            leave_room(shard, conn, room);
        }
    }
    // The personal room's home hears of it too: the owner's last connection ends the room.
    if let Some(room) = conn.personal_room() {
        let home = shard.shared.home_of(&room);
        let msg = leave_msg(conn, room);
        if abnormal {
            send_later(shard, home, msg);
        } else {
            shard.dispatch(home, msg);
        }
    }
    shard.conns.borrow_mut().remove(&conn.id);
    if !shard.shared.config.resume_ttl.is_zero() {
        shard
            .shared
            .store_resumable(&conn.session(&shard.shared.instance), &conn.user_id());
    }
    let metrics = &shard.shared.metrics;
    metrics.connections.fetch_sub(1, Ordering::Relaxed);
    match conn.closing() {
        Some(code) => metrics.disconnect(code.0),
        None => metrics.disconnect(1006),
    }
    conn.abort();
}

/// After an abnormal drop the connection stops receiving at once, but its home hears of the leave
/// 5 s later, so that a client resuming within them causes no `left`/`joined` flap (SPEC §6).
fn leave_room_later(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) {
    let Some((home, msg)) = detach(shard, conn, room) else {
        return;
    };
    send_later(shard, home, msg);
}

/// Sends `msg` to shard `home` after [`PRESENCE_GRACE_US`]. Queued on the shard rather than a
/// timer task each: a mass disconnect of 15,000 clients held 1.3 KB per dropped connection in
/// those tasks. The ticker sends them (up to one tick late).
fn send_later(shard: &Rc<Shard>, home: usize, msg: ShardMsg) {
    let due = crate::clock::monotonic_us().saturating_add(PRESENCE_GRACE_US);
    shard.delayed.borrow_mut().push_back((due, home, msg));
}

/// How long a dropped connection still counts in its rooms' presence, in microseconds.
const PRESENCE_GRACE_US: u64 = 5_000_000;

pub(crate) fn on_joined(shard: &Rc<Shard>, joined: Joined) {
    let Joined {
        room,
        conn,
        id,
        initial,
        seq,
        epoch,
        presence,
        recovery,
    } = joined;
    let Some(conn) = shard.conn(conn) else { return };
    let newly_joined = if conn.is_own_personal(&room) {
        // Its messages reach the connection from now on (`Shard::deliver`), in no member list.
        Some(conn.personal_joined(seq))
    } else {
        let mut rooms = conn.rooms.borrow_mut();
        match rooms.iter_mut().find(|(r, _)| *r == room) {
            Some((_, m)) if *m == Membership::Pending => {
                *m = Membership::Joined(seq);
                Some(true)
            }
            Some(_) => Some(false),
            // Left (or kicked, or closed) while the join was in flight: its Leave follows this
            // in order.
            None => None,
        }
    };
    let Some(newly_joined) = newly_joined else {
        // An initial room left before its answer still counts as answered, or the welcome
        // would never go out.
        if initial {
            initial_done(shard, &conn);
        }
        return;
    };
    // Missed messages go out before anything newer: the home answered this join in the same
    // ordered mailbox that carries the room's later messages.
    if let Some(Recovery::Recovered(missed)) = &recovery {
        for message in missed {
            send_stored(shard, &conn, message);
        }
    }
    if newly_joined {
        if !conn.is_own_personal(&room) {
            let mut local_rooms = shard.local_rooms.borrow_mut();
            let members = local_rooms.entry(room.clone()).or_default();
            // A room with one member here holds one slot, not the four a first push reserves.
            if members.is_empty() {
                members.reserve_exact(1);
            }
            members.push(conn.clone());
        }
        // Publishes sent behind the join go to the room now, in the order they were sent.
        for held in conn.take_held(Some(&room)) {
            dispatch_publish(shard, &conn, held);
        }
    }
    if let Some(recovery) = recovery {
        resume_answered(
            shard,
            &conn,
            &room,
            matches!(recovery, Recovery::Recovered(_)),
        );
        return;
    }
    if initial {
        initial_done(shard, &conn);
        return;
    }
    if conn.key == FrameKey::SocketIo {
        crate::sio::send_ack(shard, &conn, id, &AckPayload::Ok);
    } else if id.is_some() {
        send(
            shard,
            &conn,
            &Push::JoinReply {
                id,
                room: room.as_str(),
                seq,
                epoch: &epoch,
                presence: &presence,
            },
        );
    }
}

/// Sends a message kept in history (a recovered one) in the connection's format. Socket.IO
/// connections have neither `resume` nor `history`.
fn send_stored(shard: &Rc<Shard>, conn: &Rc<Conn>, message: &StoredMessage) {
    let Some(format) = conn.key.format() else {
        return;
    };
    let cfg = &shard.shared.config;
    let Some(payload) = message.encoded(format, cfg.max_json_depth) else {
        log::error!("history message seq={} does not transcode", message.seq);
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
fn send_history(
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

/// Records one room's outcome of a pending `resume`; the reply goes once every room answered.
fn resume_answered(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId, recovered: bool) {
    if let Some(done) = conn.resume_answered(room, recovered) {
        send(
            shard,
            conn,
            &Push::ResumeReply {
                id: done.id,
                recovered: &done.results,
            },
        );
    }
}

pub(crate) fn on_join_failed(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    id: Option<u64>,
    initial: bool,
    code: ErrorCode,
    message: &str,
) {
    let Some(conn) = shard.conn(conn) else { return };
    {
        let mut rooms = conn.rooms.borrow_mut();
        if let Some(pos) = rooms
            .iter()
            .position(|(r, m)| r == room && *m == Membership::Pending)
        {
            rooms.remove(pos);
        }
    }
    refuse_held(shard, &conn, room);
    if conn.resume_waits_for(room) {
        resume_answered(shard, &conn, room, false);
        return;
    }
    if initial {
        initial_done(shard, &conn);
        return;
    }
    send_error(shard, &conn, id, code, message);
}

fn initial_done(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let left = conn.pending_initial.get().saturating_sub(1);
    conn.pending_initial.set(left);
    if left == 0 {
        send_welcome(shard, conn);
    }
}

pub(crate) fn on_reply(shard: &Rc<Shard>, conn: ConnId, reply: Reply) {
    let Some(conn) = shard.conn(conn) else { return };
    match reply {
        Reply::Published { id, seq } => send(shard, &conn, &Push::PublishReply { id, seq }),
        Reply::Presence { id, presence } => send(
            shard,
            &conn,
            &Push::PresenceReply {
                id,
                presence: &presence,
            },
        ),
        Reply::History {
            id,
            messages,
            epoch,
        } => send_history(shard, &conn, id, &messages, &epoch),
        Reply::Error { id, code, message } => send_error(shard, &conn, id, code, message),
    }
}
