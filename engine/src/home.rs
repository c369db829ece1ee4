//! The room side of a shard: carries the messages addressed to the rooms homed here into the
//! sans-IO [`RoomCore`](crate::room::RoomCore) and carries its answers out — replies to the
//! connection's shard, frames to every shard holding members, metrics. It looks up what the core
//! must be told (the time, where a personal room's owner is connected) and decides nothing about
//! rooms itself.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::ErrorCode;
use protocol::envelope::{PresenceEntry, RoomId, Value};

use crate::clock::now_ms;
use crate::conn::{ConnId, shard_of};
use crate::frames::FrameKey;
use crate::msg::{ConnMsg, JoinMsg, Joined, Reply, RoomMsg};
use crate::room::{Fanout, JoinRequest, NewMessage, OnlineUser, Published, Refused, owner_of};
use crate::rooms::RoomSettings;
use crate::shard::Shard;
use crate::state::Presence;

/// Mailbox messages waiting on a shard above which its presence flushes are put off.
const PRESENCE_DELAY_BACKLOG: usize = 4096;

fn to_conn(shard: &Rc<Shard>, conn: ConnId, msg: ConnMsg) {
    shard.dispatch(shard_of(conn), msg);
}

/// Handles one message to a room homed here.
pub(crate) fn handle(shard: &Rc<Shard>, msg: RoomMsg) {
    match msg {
        RoomMsg::Join(join) => self::join(shard, join),
        RoomMsg::Leave {
            room,
            conn,
            user,
            name,
            key,
        } => leave(shard, &room, conn, &user, &name, key),
        RoomMsg::Publish {
            trace,
            room,
            conn,
            user,
            name,
            data,
            id,
        } => publish(shard, trace, room, conn, &user, &name, data, id),
        RoomMsg::PresenceQuery { room, conn, id } => presence_query(shard, &room, conn, id),
        RoomMsg::HistoryQuery {
            room,
            conn,
            id,
            since,
            limit,
        } => history_query(shard, &room, conn, id, since, limit),
        RoomMsg::DropRoom { room, done } => {
            shard.rooms.borrow_mut().drop_room(&room);
            done.tick();
        }
        RoomMsg::PublishExternal {
            room,
            user,
            name,
            data,
            settings,
            answer,
        } => answer.set(publish_external(shard, room, &user, &name, data, settings)),
        RoomMsg::PresenceExternal { room, answer } => answer.set(presence_of(shard, &room)),
    }
}

/// The connected owner of `room` when it is a personal room.
fn online_owner(shard: &Shard, room: &RoomId) -> Option<OnlineUser> {
    owner_of(room).and_then(|owner| shard.shared.state.online_user(owner))
}

/// Hands one room's frames to every shard in `targets`.
fn fan_out(shard: &Rc<Shard>, fanout: Fanout) {
    let delivery = Arc::new(fanout.delivery);
    for target in fanout.targets {
        shard.dispatch(target, ConnMsg::Deliver(delivery.clone()));
    }
}

fn join(shard: &Rc<Shard>, msg: JoinMsg) {
    let request = JoinRequest {
        room: &msg.room,
        user: &msg.user,
        name: &msg.name,
        shard: shard_of(msg.conn),
        key: msg.key,
        wants_presence: msg.id.is_some(),
        already: msg.already,
        resume: msg.resume.as_ref(),
        settings: msg.settings.as_ref(),
    };
    let owner = if request.needs_owner() {
        online_owner(shard, &msg.room)
    } else {
        None
    };
    let answer = shard
        .rooms
        .borrow_mut()
        .join(&request, owner.as_ref(), now_ms());
    if let Ok(answer) = &answer {
        tracing::debug!(
            room = %msg.room,
            conn = msg.conn,
            user_id = %msg.user,
            seq = answer.seq,
            trace_id = %format_args!("{:x}", msg.trace),
            "joined"
        );
    }
    let reply = match answer {
        Ok(answer) => ConnMsg::Joined(Box::new(Joined {
            room: msg.room,
            conn: msg.conn,
            id: msg.id,
            initial: msg.initial,
            seq: answer.seq,
            epoch: answer.epoch,
            presence: answer.presence,
            recovery: answer.recovery,
        })),
        Err(Refused { code, message }) => {
            if code == ErrorCode::RoomFull {
                shard
                    .shared
                    .metrics
                    .room_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            ConnMsg::JoinFailed {
                room: msg.room,
                conn: msg.conn,
                id: msg.id,
                initial: msg.initial,
                code,
                message,
            }
        }
    };
    to_conn(shard, msg.conn, reply);
}

fn leave(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    user: &Arc<str>,
    name: &Arc<str>,
    key: FrameKey,
) {
    // The connection that closed was released before its leaves were sent, so the owner's
    // other connections are what is left.
    let owner_online =
        || owner_of(room).is_some_and(|o| shard.shared.state.online_user(o).is_some());
    shard
        .rooms
        .borrow_mut()
        .leave(room, shard_of(conn), user, name, key, owner_online);
}

/// Publishes for a connection; the `reply` (or `error`) goes to it.
#[allow(clippy::too_many_arguments)]
fn publish(
    shard: &Rc<Shard>,
    trace: u64,
    room: RoomId,
    conn: ConnId,
    user: &Arc<str>,
    name: &Arc<str>,
    data: Value,
    id: Option<u64>,
) {
    let owner = online_owner(shard, &room);
    let message = NewMessage {
        room,
        user,
        name,
        data,
    };
    let result = shard.rooms.borrow_mut().publish(
        message,
        owner.as_ref(),
        now_ms(),
        &mut shard.compressor.borrow_mut(),
    );
    match result {
        Ok(published) => {
            let seq = published.seq;
            tracing::debug!(
                room = %published.fanout.delivery.room,
                seq,
                conn,
                shards = published.fanout.targets.len(),
                trace_id = %format_args!("{trace:x}"),
                "published"
            );
            deliver(shard, published);
            if id.is_some() {
                shard.reply(conn, Reply::Published { id, seq });
            }
        }
        Err(refused) => {
            if refused.code == ErrorCode::RateLimited {
                shard.shared.metrics.rate_limited("publish_per_room");
            }
            shard.reply(
                conn,
                Reply::Error {
                    id,
                    code: refused.code,
                    message: refused.message,
                },
            );
        }
    }
}

/// Fans a published message out and counts what history dropped for it.
fn deliver(shard: &Rc<Shard>, published: Published) {
    if published.evicted > 0 {
        shard
            .shared
            .metrics
            .history_evicted
            .fetch_add(published.evicted as u64, Ordering::Relaxed);
    }
    fan_out(shard, published.fanout);
}

/// A publish from the HTTP API; the room's `seq` (0 when it reached nobody), or the error.
fn publish_external(
    shard: &Rc<Shard>,
    room: RoomId,
    user: &Arc<str>,
    name: &Arc<str>,
    data: Value,
    settings: Option<RoomSettings>,
) -> Result<u64, ErrorCode> {
    let owner = online_owner(shard, &room);
    let message = NewMessage {
        room,
        user,
        name,
        data,
    };
    let result = shard.rooms.borrow_mut().publish_external(
        message,
        settings.as_ref(),
        owner.as_ref(),
        now_ms(),
        &mut shard.compressor.borrow_mut(),
    );
    match result {
        Ok(Some(published)) => {
            let seq = published.seq;
            deliver(shard, published);
            Ok(seq)
        }
        Ok(None) => Ok(0),
        Err(refused) => {
            if refused.code == ErrorCode::RateLimited {
                shard.shared.metrics.rate_limited("publish_per_room");
            }
            Err(refused.code)
        }
    }
}

/// A room's presence for the HTTP API (empty when nobody is in it).
fn presence_of(shard: &Rc<Shard>, room: &RoomId) -> Vec<PresenceEntry> {
    let owner = online_owner(shard, room);
    shard.rooms.borrow().presence(room, owner.as_ref())
}

fn presence_query(shard: &Rc<Shard>, room: &RoomId, conn: ConnId, id: Option<u64>) {
    let presence = presence_of(shard, room);
    shard.reply(conn, Reply::Presence { id, presence });
}

fn history_query(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    id: Option<u64>,
    since: u64,
    limit: u64,
) {
    let owner = online_owner(shard, room);
    let (messages, epoch) =
        shard
            .rooms
            .borrow_mut()
            .history(room, since, limit, owner.as_ref(), now_ms());
    shard.reply(
        conn,
        Reply::History {
            id,
            messages,
            epoch,
        },
    );
}

/// Drops every message older than `history_ttl` in the rooms homed here, idle or not (the ticker
/// calls this), and publishes the shard's history bytes.
pub(crate) fn expire_history(shard: &Rc<Shard>) {
    let mut rooms = shard.rooms.borrow_mut();
    rooms.expire_history(now_ms());
    let bytes = rooms.history_bytes();
    drop(rooms);
    shard.shared.metrics.history_bytes(shard.id, bytes);
}

/// Sends the coalesced presence diffs of rooms homed here.
pub(crate) fn flush_presence(shard: &Rc<Shard>) {
    if !shard.rooms.borrow().presence_waiting() {
        return;
    }
    // Under overload presence waits (SPEC §6): while this shard's mailbox holds a backlog of joins,
    // leaves and publishes, the diffs keep coalescing in their rooms and go out once it drains.
    if shard.shared.mailboxes[shard.id].len() > PRESENCE_DELAY_BACKLOG {
        shard
            .shared
            .metrics
            .presence_delayed
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    let fanouts = shard
        .rooms
        .borrow_mut()
        .flush_presence(&mut shard.compressor.borrow_mut());
    for fanout in fanouts {
        fan_out(shard, fanout);
    }
}
