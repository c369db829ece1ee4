//! A connection's rooms: the joins it asks of the rooms' homes (initial rooms, `join`, `resume`)
//! and their answers, leaves (at once, or after presence's grace for an abnormal drop), kicks and
//! re-checks of a changed permission, and the publishes held behind an unanswered join. It sends
//! to homes through the shard and never touches a room's state itself.

use std::rc::Rc;

use protocol::ErrorCode;
use protocol::envelope::{Push, RoomId};
use protocol::socketio::AckPayload;

use crate::conn::{Conn, ConnId, HeldPublish, Membership};
use crate::frames::FrameKey;
use crate::msg::{JoinMsg, Joined, RoomMsg};
use crate::room::{Recovery, ResumeFrom};
use crate::rooms::RoomAccess;
use crate::shard::Shard;

use super::reply::{send, send_error, send_stored, send_welcome};

pub(crate) fn join_initial_rooms(shard: &Rc<Shard>, conn: &Rc<Conn>) {
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

pub(crate) fn request_join(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    room: RoomId,
    id: Option<u64>,
    initial: bool,
) {
    request_join_from(shard, conn, room, id, initial, None);
}

pub(crate) fn request_join_from(
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
    let msg = RoomMsg::Join(JoinMsg {
        trace: shard.trace(),
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
pub(crate) fn room_access(shard: &Rc<Shard>, conn: &Conn, room: &RoomId) -> RoomAccess {
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

/// Whether `room` is another user's personal room (owner-only, SPEC §5).
pub(crate) fn is_foreign_personal(conn: &Conn, room: &RoomId) -> bool {
    room.as_str()
        .strip_prefix(RoomId::PERSONAL_PREFIX)
        .is_some_and(|owner| owner != &*conn.user_id())
}

/// Removes `room` from the connection (and the shard's member table); the `Leave` its home must
/// hear, or None when it was not a member.
pub(crate) fn detach(
    shard: &Rc<Shard>,
    conn: &Rc<Conn>,
    room: &RoomId,
) -> Option<(usize, RoomMsg)> {
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
pub(crate) fn leave_msg(conn: &Conn, room: RoomId) -> RoomMsg {
    RoomMsg::Leave {
        room,
        conn: conn.id,
        user: conn.user_id(),
        name: conn.username(),
        key: conn.key,
    }
}

/// Removes `room` from the connection and tells the home. False when it was not a member.
pub(crate) fn leave_room(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) -> bool {
    let Some((home, msg)) = detach(shard, conn, room) else {
        return false;
    };
    shard.dispatch(home, msg);
    true
}

/// Sends a publish to its room's home, which sequences it.
pub(crate) fn dispatch_publish(shard: &Rc<Shard>, conn: &Conn, publish: HeldPublish) {
    let HeldPublish {
        trace,
        room,
        data,
        event,
        id,
    } = publish;
    let home = shard.shared.home_of(&room);
    let msg = RoomMsg::Publish {
        trace,
        room,
        conn: conn.id,
        user: conn.user_id(),
        name: conn.username(),
        data,
        event,
        id,
    };
    shard.dispatch(home, msg);
}

/// Answers `not_joined` to the publishes held for a room the connection did not get into.
pub(crate) fn refuse_held(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) {
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

/// After an abnormal drop the connection stops receiving at once, but its home hears of the leave
/// 5 s later, so that a client resuming within them causes no `left`/`joined` flap (SPEC §6).
pub(crate) fn leave_room_later(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId) {
    let Some((home, msg)) = detach(shard, conn, room) else {
        return;
    };
    send_later(shard, home, msg);
}

/// Sends `msg` to shard `home` after [`PRESENCE_GRACE_US`]. Queued on the shard rather than a
/// timer task each: a mass disconnect of 15,000 clients held 1.3 KB per dropped connection in
/// those tasks. The ticker sends them (up to one tick late).
pub(crate) fn send_later(shard: &Rc<Shard>, home: usize, msg: RoomMsg) {
    let due = crate::clock::monotonic_us().saturating_add(PRESENCE_GRACE_US);
    shard
        .delayed
        .borrow_mut()
        .push_back((due, home, msg.into()));
}

/// How long a dropped connection still counts in its rooms' presence, in microseconds.
pub(crate) const PRESENCE_GRACE_US: u64 = 5_000_000;

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
        if let Some(frame) = crate::sio::ack(id, &AckPayload::Ok) {
            shard.writer.enqueue(&conn, &frame);
        }
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

/// Records one room's outcome of a pending `resume`; the reply goes once every room answered.
pub(crate) fn resume_answered(shard: &Rc<Shard>, conn: &Rc<Conn>, room: &RoomId, recovered: bool) {
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

pub(crate) fn initial_done(shard: &Rc<Shard>, conn: &Rc<Conn>) {
    let left = conn.pending_initial.get().saturating_sub(1);
    conn.pending_initial.set(left);
    if left == 0 {
        send_welcome(shard, conn);
    }
}
