//! The requests of SPEC §4 on a live connection, in both dialects: each op's checks (token still
//! valid, rate limits and the 3× close, permissions, membership, `max_rooms_per_connection`) and
//! what it asks of a room's home. Answers are encoded by `reply`; memberships are kept by
//! `membership`.

use std::rc::Rc;

use protocol::envelope::{Op, Push, Request, RoomId};
use protocol::{CloseCode, ErrorCode};

use crate::clock::now_ms;
use crate::conn::{Conn, HeldPublish, Membership};
use crate::limits::{Bucket, Verdict};
use crate::msg::RoomMsg;
use crate::room::ResumeFrom;
use crate::rooms::RoomAccess;
use crate::shard::Shard;
use crate::state::Resumes;

use super::membership::{
    dispatch_publish, is_foreign_personal, leave_room, request_join, request_join_from, room_access,
};
use super::reply::{send, send_ack, send_error};

/// The checks before joining or reading a room, in order: token still valid (else 4001), rate
/// limit `which` (else `rate_limited` or 4008), not another user's personal room (else
/// `forbidden`). False when the request must stop.
pub(crate) fn may_read_room(
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
pub(crate) fn token_still_valid(shard: &Rc<Shard>, conn: &Rc<Conn>) -> bool {
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

pub(crate) fn rate(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    which: &'static str,
    id: Option<u64>,
) -> bool {
    rate_n(shard, conn, which, id, 1)
}

/// [`rate`] for a request that costs `tokens` (see [`Bucket::attempt_n`]).
pub(crate) fn rate_n(
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
    let trace = shard.begin_trace();
    trace_request(conn, &request, trace.id());
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
        Op::Publish { room, data, event } => {
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
                let trace = shard.trace();
                let held = HeldPublish {
                    trace,
                    room,
                    data,
                    event,
                    id,
                };
                if !conn.hold_publish(held) {
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
            let trace = shard.trace();
            let publish = HeldPublish {
                trace,
                room,
                data,
                event,
                id,
            };
            dispatch_publish(shard, conn, publish);
        }
        Op::Presence { room } => {
            if !may_read_room(shard, conn, &room, "query_per_connection", id) {
                return;
            }
            let home = shard.shared.home_of(&room);
            let msg = RoomMsg::PresenceQuery {
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
            let msg = RoomMsg::HistoryQuery {
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
pub(crate) fn resume(
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
    let user = conn.user_id();
    // Sessions kept while Redis was unreachable are in this process.
    let valid = shard.shared.state.take(session, &user);
    if !valid && crate::broker::is_up(shard) {
        // Closed on another node, perhaps: asked of Redis, the resume goes on with the answer.
        let check = crate::msg::ResumeCheck {
            conn: conn.id,
            id,
            session: session.to_owned(),
            rooms,
            valid: false,
        };
        let placeholder = || crate::conn::PendingResume {
            id,
            waiting: Vec::new(),
            results: Vec::new(),
        };
        conn.with_rare(|rare| rare.resume = Some(Box::new(placeholder())));
        if crate::broker::check_session(shard, check, user) {
            return;
        }
        // Not sent (Redis just went down): the check is lost with its rooms; answer none.
        conn.with_rare(|rare| rare.resume = None);
        send(shard, conn, &Push::ResumeReply { id, recovered: &[] });
        return;
    }
    resume_rooms(shard, conn, id, rooms, valid);
}

/// The rooms of a `resume`, once the session's validity is known.
pub(crate) fn resume_rooms(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    id: Option<u64>,
    rooms: Vec<(RoomId, protocol::envelope::ResumePoint)>,
    valid: bool,
) {
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

/// The debug line of a client request: who asked what, and its trace id (which the room's home
/// repeats). Its fields are computed only when debug lines are on.
fn trace_request(conn: &Conn, request: &Request, trace: u64) {
    let room = match &request.op {
        Op::Join { room }
        | Op::Leave { room }
        | Op::Publish { room, .. }
        | Op::Presence { room }
        | Op::History { room, .. } => Some(room.as_str()),
        _ => None,
    };
    tracing::debug!(
        conn = conn.id,
        user_id = %conn.user_id(),
        session_id = %conn.identity.borrow().session_id,
        op = request.op.name(),
        room,
        request = request.id,
        trace_id = %format_args!("{trace:x}"),
        "request"
    );
}
