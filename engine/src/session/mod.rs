//! The connection side of a shard: a WebSocket connection from its registration to its cleanup —
//! reading and decoding its frames in either dialect, handing requests to `ops`, and handling the
//! messages addressed to connections (answers, deliveries, closes, kicks). It owns no room state;
//! the shard's tasks feed it.

mod membership;
mod ops;
mod reply;

use membership::{join_initial_rooms, leave_msg, leave_room, leave_room_later, send_later};
use ops::handle_request;
use reply::{send, send_error, send_history};

use std::rc::Rc;
use std::sync::atomic::Ordering;

use protocol::envelope::{Format, Push, RoomId};
use protocol::{CloseCode, ErrorCode};

use crate::conn::{Conn, ConnId};
use crate::msg::{ConnMsg, Reply};
use crate::shard::Shard;
use crate::state::{Counters, Presence, Resumes};

use protocol::compression::{ZstdError, compressed_bound, is_zstd};
use protocol::envelope::{DecodeLimits, decode_request};
use protocol::ws::{self, Message, MessageDecoder};

use crate::auth::{Identity, Revoked};
use crate::conn::{ConnParts, PartialRead, shard_of};
use crate::frames::Delivery;
use crate::frames::Dialect;
use crate::transport::{Stream, Transport};

/// An upgraded, authenticated, admitted connection.
pub(crate) struct Accepted {
    pub(crate) stream: Stream,
    /// Bytes the client sent right after the upgrade request.
    pub(crate) leftover: Vec<u8>,
    pub(crate) identity: Identity,
    pub(crate) dialect: Dialect,
    pub(crate) ip: std::net::IpAddr,
    /// The connection it replaces under `close_oldest`.
    pub(crate) replaced: Option<ConnId>,
    pub(crate) id: ConnId,
    /// Its `Origin`, interned by the shard (see [`Shard::intern_origin`]).
    pub(crate) origin: u16,
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
        origin,
    } = accepted;
    let conn = Rc::new(Conn::new(ConnParts {
        id,
        key: dialect.key(),
        stream,
        identity,
        ip,
        origin,
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
            shard_of(old),
            ConnMsg::Close {
                conn: old,
                code: CloseCode::SESSION_REPLACED,
            },
        );
    }
    if dialect == Dialect::SocketIo {
        let sid = conn.session(&shard.shared.instance);
        shard.writer.enqueue(&conn, &crate::sio::connected(&sid));
    }
    join_initial_rooms(shard, &conn);
    if let Err(e) = shard.ready_set.add(conn.stream().raw_fd(), conn.id) {
        tracing::warn!(shard = shard.id, conn = conn.id, error = %e, "cannot watch a connection");
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

/// Reads what a readable connection holds (one non-blocking `recv` into a pooled buffer) and
/// handles every whole frame; ends the connection at the end of its stream or on an error. Over
/// TLS, reads again while decrypted bytes wait (the socket's readiness does not show them).
pub(crate) fn on_readable(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    while read_once(shard, conn) && conn.stream().buffered() {}
}

/// One read of [`on_readable`]; false when nothing came or the connection ended.
fn read_once(shard: &Rc<Shard>, conn: &Rc<Conn>) -> bool {
    let Some(read) = shard.buffers.try_read(conn.stream()) else {
        return false;
    };
    let Ok(mut buf) = read else {
        conn.abnormal.set(true);
        finish(shard, conn);
        return false;
    };
    let n = buf.len();
    if n == 0 {
        shard.buffers.put(buf);
        if conn.closing().is_none() {
            conn.abnormal.set(true);
        }
        finish(shard, conn);
        return false;
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
        return false;
    }
    true
}

/// Handles the whole frames in what an earlier read left plus `data`; keeps the rest.
pub(crate) fn feed(shard: &Rc<Shard>, conn: &Rc<Conn>, data: &mut [u8]) {
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
pub(crate) fn finish(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    shard.ready_set.remove(conn.stream().raw_fd());
    cleanup(shard, conn);
}

/// The largest frame a connection may send (with zstd, the compressed bound of
/// `max_message_bytes`).
pub(crate) fn frame_limit(shard: &Shard, dialect: Dialect) -> usize {
    let max = shard.shared.config.max_message_bytes;
    match dialect {
        Dialect::Native(p) if p.zstd() => compressed_bound(max),
        _ => max,
    }
}

/// Decodes and handles every complete frame at the start of `data`; returns the bytes consumed.
pub(crate) fn process(
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
                Dialect::SocketIo => on_socketio(shard, conn, payload.as_bytes()),
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

pub(crate) fn on_message(shard: &Rc<Shard>, conn: &Rc<Conn>, bytes: &[u8], format: Format) {
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

pub(crate) fn cleanup(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    // Nobody is left to answer.
    drop(conn.take_held(None));
    let abnormal = conn.abnormal.get() && conn.closing().is_none();
    // Released first: the personal room's home, hearing this connection leave, looks here for
    // the owner's other connections to decide whether the room goes.
    shard
        .shared
        .state
        .release(conn.ip, &conn.user_id(), conn.id);
    crate::broker::release_user(shard, &conn.user_id(), conn.id);
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
        let session = conn.session(&shard.shared.instance);
        // With Redis, there alone (a resume may come to any node); else in this process.
        if !crate::broker::remember_session(shard, &session, &conn.user_id()) {
            shard.shared.state.remember(&session, &conn.user_id());
        }
    }
    let metrics = &shard.shared.metrics;
    metrics.connections.fetch_sub(1, Ordering::Relaxed);
    match conn.closing() {
        Some(code) => metrics.disconnect(code.0),
        None => metrics.disconnect(1006),
    }
    conn.abort();
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

/// Handles one message addressed to this shard's connections.
pub(crate) fn handle(shard: &Rc<Shard>, msg: ConnMsg) {
    match msg {
        ConnMsg::Joined(joined) => membership::on_joined(shard, *joined),
        ConnMsg::JoinFailed {
            room,
            conn,
            id,
            initial,
            code,
            message,
        } => membership::on_join_failed(shard, &room, conn, id, initial, code, message),
        ConnMsg::Deliver(delivery) => deliver(shard, &delivery),
        ConnMsg::ResumeChecked(check) => {
            if let Some(conn) = shard.conn(check.conn) {
                conn.with_rare(|rare| rare.resume = None);
                let check = *check;
                ops::resume_rooms(shard, &conn, check.id, check.rooms, check.valid);
            }
        }
        ConnMsg::Reply { conn, reply } => on_reply(shard, conn, reply),
        ConnMsg::Close { conn, code } => {
            if let Some(c) = shard.conn(conn) {
                shard.writer.close(&c, code);
            }
        }
        ConnMsg::OriginsChanged => {
            let allowed = shard.shared.allowed_origins();
            let refused: Vec<Rc<Conn>> = {
                let seen = shard.origins_seen.borrow();
                shard
                    .conns
                    .borrow()
                    .values()
                    .filter(|c| {
                        let index = usize::from(c.origin.get());
                        index > 0
                            && seen
                                .get(index - 1)
                                .is_some_and(|o| !crate::shared::origin_in(&allowed, o))
                    })
                    .cloned()
                    .collect()
            };
            for conn in refused {
                shard.writer.close(&conn, CloseCode::ORIGIN_FORBIDDEN);
            }
        }
        ConnMsg::CloseAllRevoked => {
            let revoked: Vec<(Rc<Conn>, Revoked)> = shard
                .conns
                .borrow()
                .values()
                .filter_map(|c| {
                    let verdict = shard.shared.auth.revoked(&c.identity.borrow());
                    verdict.map(|r| (c.clone(), r))
                })
                .collect();
            for (conn, why) in revoked {
                shard.writer.close(&conn, why.close_code());
            }
        }
        ConnMsg::CloseAuthorized {
            user,
            session,
            code,
        } => {
            let matching: Vec<Rc<Conn>> = shard
                .conns
                .borrow()
                .values()
                .filter(|c| {
                    let identity = c.identity.borrow();
                    identity.user_id == user
                        && session.as_ref().is_none_or(|s| *s == identity.session_id)
                })
                .cloned()
                .collect();
            for conn in matching {
                shard.writer.close(&conn, code);
            }
        }
        ConnMsg::Kick {
            room,
            user,
            reason,
            done,
        } => {
            for conn in conns_in(shard, &room) {
                if user.as_ref().is_none_or(|u| *u == conn.user_id()) {
                    membership::kick(shard, &conn, &room, reason);
                }
            }
            done.tick();
        }
        ConnMsg::Reauthorize { room, done } => {
            for conn in conns_in(shard, &room) {
                membership::reauthorize(shard, &conn, &room);
            }
            done.tick();
        }
        ConnMsg::ReauthorizeUser { user, done } => {
            let conns: Vec<Rc<Conn>> = shard
                .conns
                .borrow()
                .values()
                .filter(|c| c.user_id() == user)
                .cloned()
                .collect();
            for conn in conns {
                let rooms: Vec<RoomId> =
                    conn.rooms.borrow().iter().map(|(r, _)| r.clone()).collect();
                for room in rooms {
                    membership::reauthorize(shard, &conn, &room);
                }
            }
            done.tick();
        }
    }
}

/// This shard's connections that hold (or are joining) `room`.
fn conns_in(shard: &Shard, room: &RoomId) -> Vec<Rc<Conn>> {
    shard
        .conns
        .borrow()
        .values()
        .filter(|c| c.membership(room).is_some())
        .cloned()
        .collect()
}

fn deliver(shard: &Rc<Shard>, delivery: &Delivery) {
    // A personal room's owner is in no member list (see `Conn::personal`): its connections
    // here are found by user, once their initial join was answered.
    let owner: Vec<Rc<Conn>> = match delivery.room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX) {
        Some(user) => {
            let conns = shard.conns.borrow();
            shard
                .shared
                .state
                .user_conns(user)
                .iter()
                .filter(|id| shard_of(**id) == shard.id)
                .filter_map(|id| conns.get(id))
                .filter(|c| c.receives_personal())
                .cloned()
                .collect()
        }
        None => Vec::new(),
    };
    // Iterating under the borrow (no copy of the member list): `enqueue` and what it may call
    // (`close`, spawning a writer) never touch `local_rooms`.
    let rooms = shard.local_rooms.borrow();
    let listed = rooms.get(&delivery.room).map_or(&[][..], |m| &m[..]);
    let mut count = 0u64;
    let mut shed = 0u64;
    // Presence is the first thing dropped under overload: a connection whose queue is already
    // past half its bound gets no diff (it would only move it toward the 4011 close); the
    // `presence` op still answers exactly.
    let shed_above = shard.shared.config.max_queued_bytes / 2;
    for conn in listed.iter().chain(&owner) {
        if let Some(frame) = delivery.frames.get(conn.key) {
            if delivery.sheddable && conn.backlog() > shed_above {
                shed += 1;
                continue;
            }
            shard.writer.enqueue(conn, frame);
            count += 1;
        }
    }
    if shed > 0 {
        shard
            .shared
            .metrics
            .presence_shed
            .fetch_add(shed, Ordering::Relaxed);
    }
    shard
        .shared
        .metrics
        .deliveries
        .fetch_add(count, Ordering::Relaxed);
}

/// The periodic duties of each connection (the ticker calls this every ~250 ms): the idle close,
/// revocation and expiry (4001, after a `refresh_required` warning), and the server's pings.
pub(crate) fn scan(shard: &Rc<Shard>, now: u64) {
    let cfg = &shard.shared.config;
    let heartbeat = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
    let idle_limit = heartbeat.saturating_mul(2).saturating_add(10_000);
    let grace = u64::try_from(cfg.expiry_grace.as_millis()).unwrap_or(0);
    let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
    for conn in conns {
        if conn.closing().is_some() || !conn.outbound.is_ready() {
            continue;
        }
        let mono = crate::clock::monotonic_ms32();
        if u64::from(mono.wrapping_sub(conn.last_seen_ms.get())) > idle_limit {
            shard.writer.close(&conn, CloseCode::IDLE_TIMEOUT);
            continue;
        }
        let (expires, revoked) = {
            let identity = conn.identity.borrow();
            (identity.expires_at_ms, shard.shared.auth.revoked(&identity))
        };
        if let Some(revoked) = revoked {
            shard.writer.close(&conn, revoked.close_code());
            continue;
        }
        // The warning goes first even when a busy shard scans only after expiry, so that a
        // client always learns why it is closed.
        if !conn.refresh_warned.get() && now + 60_000 >= expires {
            conn.refresh_warned.set(true);
            reply::send_refresh_required(shard, &conn, expires);
        }
        if now >= expires.saturating_add(grace) {
            shard.writer.close(&conn, CloseCode::UNAUTHORIZED);
            continue;
        }
        if u64::from(mono.wrapping_sub(conn.last_ping_ms.get())) >= heartbeat {
            conn.last_ping_ms.set(mono);
            reply::send_ping(shard, &conn);
        }
    }
}

/// One Engine.IO packet from a Socket.IO connection.
fn on_socketio(shard: &Rc<Shard>, conn: &Rc<Conn>, bytes: &[u8]) {
    match crate::sio::decode(bytes, &crate::sio::limits(&shard.shared.config)) {
        crate::sio::Incoming::Request(request) => handle_request(shard, conn, request),
        crate::sio::Incoming::Answer(frame) => shard.writer.enqueue(conn, &frame),
        crate::sio::Incoming::Refused(frame) => {
            shard.shared.metrics.message_in("invalid");
            shard.writer.enqueue(conn, &frame);
        }
        crate::sio::Incoming::Close => shard.writer.close(conn, crate::sio::CLIENT_CLOSE),
        crate::sio::Incoming::Nothing => {}
    }
}
