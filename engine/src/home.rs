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

use crate::answers::{
    answer_join, count_refused_publish, fan_out, join_locally, online_owner, refuse_publish,
};
use crate::broker;
use crate::clock::now_ms;
use crate::conn::{ConnId, shard_of};
use crate::frames::FrameKey;
use crate::msg::{JoinMsg, Reply, RoomMsg};
use crate::room::{NewMessage, Published, owner_of};
use crate::rooms::RoomSettings;
use crate::shard::Shard;
use crate::state::Presence;

/// Mailbox messages waiting on a shard above which its presence flushes are put off.
const PRESENCE_DELAY_BACKLOG: usize = 4096;

/// Handles one message to a room homed here: through the shared broker while it is reachable
/// (several nodes), else in this shard's room core alone.
pub(crate) fn handle(shard: &Rc<Shard>, msg: RoomMsg) {
    let shared = broker::is_up(shard);
    match msg {
        RoomMsg::Join(join) if shared => broker::join(shard, join),
        RoomMsg::Join(join) => {
            go_local(shard, &join.room);
            self::join(shard, join);
        }
        RoomMsg::Leave {
            room,
            conn,
            user,
            name,
            key,
        } => {
            leave(shard, &room, conn, &user, &name, key);
            if shard.broker.is_some() {
                broker::left(shard, &room, conn, &user);
            }
        }
        RoomMsg::Publish {
            trace,
            room,
            conn,
            user,
            name,
            data,
            event,
            id,
        } => {
            if shared {
                broker::publish(
                    shard,
                    trace,
                    room,
                    conn,
                    (&user, &name),
                    (&data, event.as_ref()),
                    id,
                );
            } else {
                go_local(shard, &room);
                publish(shard, trace, room, conn, &user, &name, (data, event), id);
            }
        }
        RoomMsg::PresenceQuery { room, conn, id } if shared => {
            broker::presence_query(shard, &room, conn, id);
        }
        RoomMsg::PresenceQuery { room, conn, id } => presence_query(shard, &room, conn, id),
        RoomMsg::HistoryQuery {
            room,
            conn,
            id,
            since,
            limit,
        } => {
            if shared {
                broker::history_query(shard, &room, conn, id, since, limit);
            } else {
                history_query(shard, &room, conn, id, since, limit);
            }
        }
        RoomMsg::DropRoom { room, done } => {
            shard.rooms.borrow_mut().drop_room(&room);
            if shared {
                broker::drop_room(shard, &room, &done);
            } else {
                done.tick();
            }
        }
        RoomMsg::PublishExternal {
            room,
            user,
            name,
            data,
            event,
            settings,
            answer,
        } => {
            if shared {
                broker::publish_external(
                    shard,
                    &room,
                    (&user, &name),
                    (&data, event.as_ref()),
                    settings.as_ref(),
                    answer,
                );
            } else {
                go_local(shard, &room);
                answer.set(publish_external(
                    shard,
                    room,
                    (&user, &name),
                    (data, event),
                    settings,
                ));
            }
        }
        RoomMsg::PresenceExternal { room, answer } if shared => {
            broker::presence_external(shard, &room, answer);
        }
        RoomMsg::PresenceExternal { room, answer } => answer.set(presence_of(shard, &room)),
    }
}

/// With Redis configured but unreachable: `room` goes on in this shard alone, under an epoch of
/// its own (SPEC §10 "Redis unreachable").
fn go_local(shard: &Rc<Shard>, room: &RoomId) {
    if shard.broker.is_some() && shard.rooms.borrow_mut().go_local(room) {
        shard
            .shared
            .metrics
            .redis
            .local_fallbacks
            .fetch_add(1, Ordering::Relaxed);
    }
}

fn join(shard: &Rc<Shard>, msg: JoinMsg) {
    let answer = join_locally(shard, &msg);
    answer_join(shard, msg, answer);
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
    (data, event): (Value, Option<protocol::envelope::EventName>),
    id: Option<u64>,
) {
    let owner = online_owner(shard, &room);
    let message = NewMessage {
        room,
        user,
        name,
        data,
        event,
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
            refuse_publish(shard, conn, id, &refused);
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
    (user, name): (&Arc<str>, &Arc<str>),
    (data, event): (Value, Option<protocol::envelope::EventName>),
    settings: Option<RoomSettings>,
) -> Result<u64, ErrorCode> {
    let owner = online_owner(shard, &room);
    let message = NewMessage {
        room,
        user,
        name,
        data,
        event,
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
        Err(refused) => Err(count_refused_publish(shard, &refused)),
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
    // Degraded (Redis unreachable, or the server says its database is): presence diffs are the
    // first thing shed; `presence` still answers from what the node knows.
    if broker::is_down(shard) || shard.shared.storage_degraded.load(Ordering::Relaxed) {
        let dropped = shard.rooms.borrow_mut().drop_presence();
        shard
            .shared
            .metrics
            .presence_degraded
            .fetch_add(dropped as u64, Ordering::Relaxed);
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
