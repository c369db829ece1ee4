//! The shared broker of a shard (SPEC §10 points 1–4 and 9): with Redis configured, the rooms
//! homed on this shard are counted, sequenced and kept in Redis, so that several nodes act as
//! one. A publish is one `EVALSHA` that assigns the room's `seq`, keeps the message in the room's
//! stream and sends it on the room's channel; every node with members (this one included)
//! delivers what arrives on the channel, in channel order, which is `seq` order. A join is one
//! script that checks `max_members` over every node, counts the connection, renews this node's
//! lease and answers the room's epoch, `seq`, presence and what a resume missed. Presence diffs
//! arrive on the channel too. A node whose lease passed is purged by the next script that sees it.
//!
//! The room core still holds this node's members (where to deliver, in which formats); this
//! module carries Redis's answers into it and out to connections through `answers`. While Redis
//! is unreachable the home shard goes on locally (`home` checks [`is_up`]); here only what was
//! in flight when the connection dropped falls back. It must not block: every command is queued
//! on the link of the master serving its key and answered by its reply handler.
//!
//! With a Redis Cluster it also keeps the shard's map of slots: read from a master when a
//! connection comes up, every 5 s and after a `MOVED`; commands answered `MOVED` or `ASK` are sent
//! again where the answer points; channels whose slot moved are subscribed where they live now.

pub(crate) mod state;

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::ErrorCode;
use protocol::envelope::{
    DecodeLimits, Format, MessageRecord, PresenceEntry, Push, RoomId, Value, decode_value,
    encode_push, encode_value,
};
use redis::RedisError;

use crate::answers::{
    answer_join, count_refused_publish, fan_out, join_locally, online_owner, refuse_publish,
};
use crate::clock::{monotonic_ms32, now_ms};
use crate::conn::ConnId;
use crate::msg::{JoinMsg, Reply};
use crate::redis::cluster::SlotMap;
use crate::redis::keys::{self, RoomKeys};
use crate::redis::link::LinkEvents;
use crate::redis::resp::{bytes, int, items, message};
use crate::redis::scripts;
use crate::room::history::StoredMessage;
use crate::room::{JoinAnswer, Recovery, ResumeFrom, owner_of};
use crate::rooms::{Answer, RoomSettings};
use crate::shard::Shard;
use state::{Broker, Channel, HeldJoin, HeldKind, Master, Pending};

/// How long a room's epoch and `seq` outlive its last publish in Redis.
const META_TTL_SECS: u64 = 30 * 24 * 3600;
/// The longest a join waits for the messages its answer names.
const HOLD_MS: u32 = 1000;
/// How often a Redis Cluster's map of slots is read again (besides after a `MOVED`).
const SLOTS_EVERY_MS: u32 = 5000;
/// A burst of redirections asks for the map once per this long.
const SLOTS_AT_MOST_EVERY_MS: u32 = 200;
/// A command redirected more often than this is answered as failed.
const MAX_REDIRECTS: u8 = 5;

/// The broker of `shard`, when Redis is configured.
fn broker(shard: &Shard) -> Option<&Broker> {
    shard.broker.as_ref()
}

/// Whether rooms go through the shared broker now (configured and reachable).
pub(crate) fn is_up(shard: &Shard) -> bool {
    broker(shard).is_some_and(Broker::is_up)
}

fn limits(shard: &Shard) -> DecodeLimits {
    let cfg = &shard.shared.config;
    DecodeLimits {
        // A body is the message's fields around its data: a little over the data's bound.
        max_message_bytes: cfg.max_message_bytes.saturating_mul(2).saturating_add(4096),
        max_depth: cfg.max_json_depth + 1,
        max_resume_rooms: 0,
    }
}

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

/// Counts `msg`'s connection in its room through Redis (the room's channel is subscribed first).
pub(crate) fn join(shard: &Rc<Shard>, msg: JoinMsg) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let personal_owner = owner_of(&msg.room) == Some(&*msg.user);
    if !personal_owner
        && !msg.room.is_personal()
        && msg.settings.is_none()
        && !shard.shared.config.implicit_rooms
    {
        // Refused before Redis is asked (the room core would refuse the same way).
        let answer = join_locally(shard, &msg);
        answer_join(shard, msg, answer);
        return;
    }
    let msg = Box::new(msg);
    let mut channels = broker.channels.borrow_mut();
    let subscribed = match channels.get_mut(&msg.room) {
        Some(channel) if channel.subscribed => true,
        Some(channel) => {
            channel.waiting.push(msg);
            return;
        }
        None => {
            let channel_name = keys::channel(&broker.settings.prefix, &msg.room);
            if !broker.subscription(&channel_name, true) {
                drop(channels);
                local_join(shard, *msg);
                return;
            }
            let room = msg.room.clone();
            channels.insert(
                room,
                Channel {
                    waiting: vec![msg],
                    ..Channel::default()
                },
            );
            return;
        }
    };
    drop(channels);
    if subscribed {
        ask_join(shard, msg);
    }
}

/// Joins counted here alone (Redis unreachable): the room goes on under a local epoch.
fn local_join(shard: &Rc<Shard>, msg: JoinMsg) {
    if shard.rooms.borrow_mut().go_local(&msg.room) {
        let metrics = &shard.shared.metrics.redis;
        metrics.local_fallbacks.fetch_add(1, Ordering::Relaxed);
    }
    let answer = join_locally(shard, &msg);
    answer_join(shard, msg, answer);
}

/// Sends the join script (or, for a personal room's owner, the history script) for `msg`.
fn ask_join(shard: &Rc<Shard>, msg: Box<JoinMsg>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let settings = &broker.settings;
    let keys = RoomKeys::new(&settings.prefix, &msg.room);
    let cfg = &shard.shared.config;
    if owner_of(&msg.room) == Some(&*msg.user) {
        // The owner is never counted (SPEC §5); its join needs the room's state only when the
        // answer names it.
        if msg.id.is_none() && msg.resume.is_none() {
            let answer = join_locally(shard, &msg);
            answer_join(shard, *msg, answer);
            return;
        }
        let after = msg.resume.as_ref().map_or(u64::MAX >> 1, |r| r.seq);
        let mut cmd = scripts::HISTORY.call(&[&keys.meta, &keys.hist]);
        cmd.arg(after)
            .arg(cfg.history_size.max(1))
            .arg(broker.new_epoch())
            .arg(META_TTL_SECS);
        if let Err(pending) = broker.send(&keys.meta, &cmd, Pending::PersonalJoin(msg)) {
            fail(shard, pending);
        }
        return;
    }
    let max = msg
        .settings
        .as_ref()
        .map_or(cfg.max_room_members, |s| s.max_members);
    let presence_on = msg.settings.as_ref().is_none_or(|s| s.presence);
    let resume_from = match &msg.resume {
        Some(from) if !msg.already || from.valid => i128::from(from.seq),
        _ => -1,
    };
    let mut cmd = scripts::JOIN.call(&[
        &keys.count,
        &keys.users,
        &keys.names,
        &keys.leases,
        &keys.channel,
        &keys.meta,
        &keys.hist,
    ]);
    cmd.arg(&settings.node_id)
        .arg(&*msg.user)
        .arg(&*msg.name)
        .arg(if msg.already { 0 } else { max })
        .arg(now_ms())
        .arg(broker.lease_ms())
        .arg(flag(presence_on))
        .arg(&keys.nu)
        .arg(broker.new_epoch())
        .arg(META_TTL_SECS)
        .arg(flag(msg.id.is_some()))
        .arg(resume_from.to_string())
        .arg(cfg.history_size.max(1))
        .arg(flag(!msg.already));
    let conn = msg.conn;
    let room = msg.room.clone();
    match broker.send(&keys.meta, &cmd, Pending::Join(msg)) {
        Ok(()) => {
            if let Some(channel) = broker.channels.borrow_mut().get_mut(&room) {
                channel.in_flight.push(conn);
            }
        }
        Err(pending) => fail(shard, pending),
    }
}

/// After the room core counted a connection out of `room`: Redis counts it out too (or, for a
/// join not answered yet, when its answer comes), and the channel is given up with the room's
/// last member here.
pub(crate) fn left(shard: &Rc<Shard>, room: &RoomId, conn: ConnId, user: &Arc<str>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let (counted_in_redis, abandoned) = {
        let mut channels = broker.channels.borrow_mut();
        let Some(channel) = channels.get_mut(room) else {
            return;
        };
        if let Some(at) = channel.waiting.iter().position(|m| m.conn == conn) {
            // Never sent to Redis.
            (false, Some(channel.waiting.remove(at)))
        } else if let Some(at) = channel.held.iter().position(|h| h.msg.conn == conn) {
            // Counted in Redis, not here yet.
            (
                !channel.held[at].msg.already,
                Some(channel.held.remove(at).msg),
            )
        } else if channel.in_flight.contains(&conn) {
            channel.cancelled.push(conn);
            (false, None)
        } else {
            (true, None)
        }
    };
    if counted_in_redis && owner_of(room) != Some(&**user) {
        send_leave(shard, broker, room, user);
    }
    if let Some(msg) = abandoned {
        answer_abandoned(shard, *msg);
    }
    release_channel(shard, room);
}

/// Answers a join whose connection left the room before it was counted: the connection side
/// finds the room gone and only notes the answer (an initial room's answer lets the welcome out).
fn answer_abandoned(shard: &Rc<Shard>, msg: JoinMsg) {
    let answer = JoinAnswer {
        seq: 0,
        epoch: Arc::from(""),
        presence: Vec::new(),
        recovery: None,
    };
    answer_join(shard, msg, Ok(answer));
}

fn send_leave(shard: &Shard, broker: &Broker, room: &RoomId, user: &Arc<str>) {
    let keys = RoomKeys::new(&broker.settings.prefix, room);
    let mut cmd = scripts::LEAVE.call(&keys.membership());
    cmd.arg(&broker.settings.node_id)
        .arg(&**user)
        .arg(now_ms())
        .arg(flag(presence_on(shard, room)))
        .arg(&keys.nu);
    let _ = broker.send(&keys.count, &cmd, Pending::Ignore);
}

/// Whether presence diffs are on for `room` (a persistent room may switch them off).
fn presence_on(shard: &Shard, room: &RoomId) -> bool {
    shard.rooms.borrow().switches(room).0
}

/// Unsubscribes `room`'s channel when nobody here needs it any more: no member held here, no
/// join waiting or in flight, and (a personal room) its owner not connected to this node.
fn release_channel(shard: &Shard, room: &RoomId) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if shard.rooms.borrow().local_members(room) > 0
        || (room.is_personal() && online_owner(shard, room).is_some())
    {
        return;
    }
    let mut channels = broker.channels.borrow_mut();
    let Some(channel) = channels.get(room) else {
        return;
    };
    if !channel.waiting.is_empty() || !channel.held.is_empty() || !channel.in_flight.is_empty() {
        return;
    }
    channels.remove(room);
    broker.subscription(&keys::channel(&broker.settings.prefix, room), false);
}

/// A connection's publish, sent to Redis (the room core admitted it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn publish(
    shard: &Rc<Shard>,
    trace: u64,
    room: RoomId,
    conn: ConnId,
    (user, name): (&Arc<str>, &Arc<str>),
    (data, event): (&Value, Option<&protocol::envelope::EventName>),
    id: Option<u64>,
) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let owner = online_owner(shard, &room);
    if let Err(refused) = shard
        .rooms
        .borrow_mut()
        .admit_publish(&room, owner.as_ref(), now_ms())
    {
        refuse_publish(shard, conn, id, &refused);
        return;
    }
    let history_on = shard.rooms.borrow().switches(&room).1;
    let Some(cmd) = publish_cmd(
        shard,
        broker,
        &room,
        (Some(user), name),
        (data, event),
        history_on,
    ) else {
        shard.reply(
            conn,
            Reply::Error {
                id,
                code: ErrorCode::Internal,
                message: "the message cannot be encoded",
            },
        );
        return;
    };
    let key = keys::channel(&broker.settings.prefix, &room);
    let pending = Pending::Publish {
        conn,
        id,
        trace,
        room,
    };
    send(shard, broker, &key, &cmd, pending);
}

/// The publish script's call for a message.
fn publish_cmd(
    shard: &Shard,
    broker: &Broker,
    room: &RoomId,
    (user, name): (Option<&Arc<str>>, &Arc<str>),
    (data, event): (&Value, Option<&protocol::envelope::EventName>),
    history_on: bool,
) -> Option<redis::Cmd> {
    let cfg = &shard.shared.config;
    let user = user.map(|u| &**u);
    // `[from, name, ts, data]`, and the event's name fifth when there is one (a plain message
    // keeps the four fields older nodes read).
    let body = match event {
        None => encode_value(&(user, &**name, now_ms(), data), Format::MsgPack),
        Some(event) => encode_value(
            &(user, &**name, now_ms(), data, event.as_str()),
            Format::MsgPack,
        ),
    }
    .ok()?;
    let keys = RoomKeys::new(&broker.settings.prefix, room);
    let mut cmd = scripts::PUBLISH.call(&[&keys.meta, &keys.hist, &keys.channel]);
    let ttl_ms = u64::try_from(cfg.history_ttl.as_millis()).unwrap_or(u64::MAX);
    let rate = &cfg.publish_per_room;
    let per_publish_ms = if rate.count == 0 {
        0.0
    } else {
        rate.per.as_secs_f64() * 1000.0 / f64::from(rate.count)
    };
    cmd.arg(body)
        .arg(if history_on { cfg.history_size } else { 0 })
        .arg(ttl_ms)
        .arg(META_TTL_SECS)
        .arg(broker.new_epoch())
        .arg(per_publish_ms)
        .arg(rate.burst.max(1))
        .arg(now_ms());
    Some(cmd)
}

/// An HTTP publish, sent to Redis; the room's `seq` comes back through `answer`.
pub(crate) fn publish_external(
    shard: &Rc<Shard>,
    room: &RoomId,
    (user, name): (&Arc<str>, &Arc<str>),
    (data, event): (&Value, Option<&protocol::envelope::EventName>),
    settings: Option<&RoomSettings>,
    answer: Arc<Answer<Result<u64, ErrorCode>>>,
) {
    let Some(broker) = broker(shard) else {
        answer.set(Err(ErrorCode::Unavailable));
        return;
    };
    // The room's rate on this node, where the room is held here (the script counts it over every
    // node too).
    if shard.rooms.borrow().local_members(room) > 0
        && let Err(refused) = shard.rooms.borrow_mut().admit_publish(room, None, now_ms())
    {
        answer.set(Err(count_refused_publish(shard, &refused)));
        return;
    }
    let history_on = settings.is_none_or(|s| s.history);
    let Some(cmd) = publish_cmd(
        shard,
        broker,
        room,
        (Some(user), name),
        (data, event),
        history_on,
    ) else {
        answer.set(Err(ErrorCode::Internal));
        return;
    };
    let key = keys::channel(&broker.settings.prefix, room);
    send(
        shard,
        broker,
        &key,
        &cmd,
        Pending::PublishExternal { answer },
    );
}

fn presence_cmd(broker: &Broker, shard: &Shard, room: &RoomId) -> redis::Cmd {
    let keys = RoomKeys::new(&broker.settings.prefix, room);
    let mut cmd = scripts::PRESENCE.call(&keys.membership());
    cmd.arg(now_ms())
        .arg(flag(presence_on(shard, room)))
        .arg(&keys.nu);
    cmd
}

/// A connection's `presence`, answered from Redis (every node's connections).
pub(crate) fn presence_query(shard: &Rc<Shard>, room: &RoomId, conn: ConnId, id: Option<u64>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if room.is_personal() {
        // A personal room's presence is its owner (never counted in Redis).
        let presence = shard
            .rooms
            .borrow()
            .presence(room, online_owner(shard, room).as_ref());
        shard.reply(conn, Reply::Presence { id, presence });
        return;
    }
    let cmd = presence_cmd(broker, shard, room);
    let key = keys::channel(&broker.settings.prefix, room);
    send(shard, broker, &key, &cmd, Pending::Presence { conn, id });
}

/// A room's presence for the HTTP API, from Redis.
pub(crate) fn presence_external(
    shard: &Rc<Shard>,
    room: &RoomId,
    answer: Arc<Answer<Vec<PresenceEntry>>>,
) {
    let Some(broker) = broker(shard) else {
        answer.set(Vec::new());
        return;
    };
    let cmd = presence_cmd(broker, shard, room);
    let key = keys::channel(&broker.settings.prefix, room);
    send(
        shard,
        broker,
        &key,
        &cmd,
        Pending::PresenceExternal { answer },
    );
}

/// A connection's `history`, read from the room's stream.
pub(crate) fn history_query(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    id: Option<u64>,
    since: u64,
    limit: u64,
) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let keys = RoomKeys::new(&broker.settings.prefix, room);
    let mut cmd = scripts::HISTORY.call(&[&keys.meta, &keys.hist]);
    cmd.arg(since)
        .arg(limit.max(1))
        .arg(broker.new_epoch())
        .arg(META_TTL_SECS);
    let pending = Pending::History {
        conn,
        id,
        room: room.clone(),
        since,
    };
    send(shard, broker, &keys.meta, &cmd, pending);
}

/// A deleted room: its keys in Redis go too.
pub(crate) fn drop_room(shard: &Rc<Shard>, room: &RoomId, done: &Arc<crate::rooms::Countdown>) {
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        done.tick();
        return;
    };
    let keys = RoomKeys::new(&broker.settings.prefix, room);
    let mut cmd = redis::cmd("DEL");
    for key in [
        &keys.meta,
        &keys.hist,
        &keys.count,
        &keys.users,
        &keys.names,
        &keys.leases,
    ] {
        cmd.arg(key);
    }
    send(
        shard,
        broker,
        &keys.meta,
        &cmd,
        Pending::Dropped(done.clone()),
    );
}

/// Whether this shard has Redis configured and unreachable.
pub(crate) fn is_down(shard: &Shard) -> bool {
    broker(shard).is_some_and(|b| !b.is_up())
}

/// Asks Redis a shared limit's question (one script); the answer goes to `answer`
/// ([`Verdict::Unknown`](crate::shared_limits::Verdict::Unknown) when Redis cannot be asked).
pub(crate) fn shared_limit(
    shard: &Rc<Shard>,
    ask: &crate::shared_limits::SharedAsk,
    answer: Arc<Answer<crate::shared_limits::Verdict>>,
) {
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        answer.set(crate::shared_limits::Verdict::Unknown);
        return;
    };
    let (key, cmd) = limit_cmd(broker, ask);
    send(shard, broker, &key, &cmd, Pending::Limit(answer));
}

/// Asks Redis about a held value (one command or script); the answer goes to `answer`
/// ([`HeldReply::Unknown`](crate::held::HeldReply::Unknown) when Redis cannot be asked).
pub(crate) fn held(
    shard: &Rc<Shard>,
    ask: &crate::held::HeldAsk,
    answer: Arc<Answer<crate::held::HeldReply>>,
) {
    use crate::held::HeldAsk;
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        answer.set(crate::held::HeldReply::Unknown);
        return;
    };
    let key = format!("{}:{}", broker.settings.prefix, ask.key());
    let (kind, cmd) = match ask {
        HeldAsk::CacheGet { .. } => {
            let mut cmd = redis::cmd("HGET");
            cmd.arg(&key).arg("v");
            (HeldKind::Value, cmd)
        }
        HeldAsk::CachePut {
            value,
            read_at_ms,
            ttl_ms,
            ..
        } => {
            let mut cmd = scripts::CACHE_PUT.call(&[&key]);
            cmd.arg(value.as_slice()).arg(*read_at_ms).arg(*ttl_ms);
            (HeldKind::Done, cmd)
        }
        HeldAsk::CacheDrop { at_ms, ttl_ms, .. } => {
            let mut cmd = scripts::CACHE_DROP.call(&[&key]);
            cmd.arg(*at_ms).arg(*ttl_ms);
            (HeldKind::Done, cmd)
        }
        HeldAsk::SessionHold { session, limit } => {
            let mut cmd = scripts::SESSION_HOLD.call(&[&key]);
            cmd.arg(&session.id)
                .arg(&session.token)
                .arg(session.value.as_slice())
                .arg(*limit);
            (HeldKind::Done, cmd)
        }
        HeldAsk::SessionFind { token } => {
            let mut cmd = scripts::SESSION_FIND.call(&[&key]);
            cmd.arg(token);
            (HeldKind::Found, cmd)
        }
        HeldAsk::SessionRotate { session, old } => {
            let mut cmd = scripts::SESSION_ROTATE.call(&[&key]);
            cmd.arg(&session.id)
                .arg(old)
                .arg(&session.token)
                .arg(session.value.as_slice());
            (HeldKind::Done, cmd)
        }
        HeldAsk::SessionsHeld { limit } => {
            let mut cmd = scripts::SESSIONS_HELD.call(&[&key]);
            cmd.arg(*limit);
            (HeldKind::Sessions, cmd)
        }
        HeldAsk::SessionRelease { id, token } => {
            let mut cmd = scripts::SESSION_RELEASE.call(&[&key]);
            cmd.arg(id).arg(token);
            (HeldKind::Done, cmd)
        }
    };
    send(shard, broker, &key, &cmd, Pending::Held(kind, answer));
}

/// A held value's answer from its reply; an error reply is [`HeldReply::Unknown`].
fn held_reply(kind: HeldKind, value: &redis::Value) -> crate::held::HeldReply {
    use crate::held::{HeldReply, HeldSession};
    let text = |v: &redis::Value| bytes(v).map(|b| String::from_utf8_lossy(b).into_owned());
    let triple = |parts: &[redis::Value]| {
        Some(HeldSession {
            id: text(parts.first()?)?,
            token: text(parts.get(1)?)?,
            value: bytes(parts.get(2)?)?.to_vec(),
        })
    };
    match (kind, value) {
        (_, redis::Value::ServerError(_)) => HeldReply::Unknown,
        (HeldKind::Value, redis::Value::Nil) => HeldReply::Value(None),
        (HeldKind::Value, v) => {
            bytes(v).map_or(HeldReply::Unknown, |b| HeldReply::Value(Some(b.to_vec())))
        }
        (HeldKind::Done, v) => int(v).map_or(HeldReply::Unknown, |n| HeldReply::Done(n == 1)),
        (HeldKind::Found, v) => HeldReply::Found(triple(items(v))),
        (HeldKind::Sessions, v) => {
            HeldReply::Sessions(items(v).chunks_exact(3).filter_map(triple).collect())
        }
    }
}

/// The same question from a task of the shard (the upgrade), awaited.
pub(crate) async fn shared_limit_here(
    shard: &Rc<Shard>,
    ask: &crate::shared_limits::SharedAsk,
) -> crate::shared_limits::Verdict {
    use crate::shared_limits::Verdict;
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        return Verdict::Unknown;
    };
    let (key, cmd) = limit_cmd(broker, ask);
    let slot = Rc::new(state::Awaited::default());
    if broker
        .send(&key, &cmd, Pending::Wake(slot.clone()))
        .is_err()
    {
        return Verdict::Unknown;
    }
    match state::Reply(slot).await {
        Some(value) => limit_verdict(&value),
        None => Verdict::Unknown,
    }
}

/// A shared limit's answer from its script's reply.
fn limit_verdict(value: &redis::Value) -> crate::shared_limits::Verdict {
    use crate::shared_limits::Verdict;
    let parts = items(value);
    match (parts.first().and_then(int), parts.get(1).and_then(int)) {
        (Some(1), _) => Verdict::Allowed,
        (Some(0), Some(ms)) => Verdict::Limited {
            retry_after_ms: u64::try_from(ms).unwrap_or(1).max(1),
        },
        _ => Verdict::Unknown,
    }
}

/// The key and script call of a shared limit's question.
fn limit_cmd(broker: &Broker, ask: &crate::shared_limits::SharedAsk) -> (String, redis::Cmd) {
    use crate::shared_limits::SharedAsk;
    let key = format!("{}:{{l:{}}}", broker.settings.prefix, ask.key());
    let now = now_ms();
    let cmd = match ask {
        SharedAsk::Take {
            per_token_ms,
            burst,
            ..
        } => {
            let mut cmd = scripts::LIMIT.call(&[&key]);
            cmd.arg(now).arg(*per_token_ms).arg(*burst);
            cmd
        }
        SharedAsk::Locked { .. } => {
            let mut cmd = scripts::FAILURES.call(&[&key]);
            cmd.arg("check").arg(now).arg(0).arg(0).arg(0);
            cmd
        }
        SharedAsk::Failed {
            window_ms,
            limit,
            lockout_ms,
            ..
        } => {
            let mut cmd = scripts::FAILURES.call(&[&key]);
            cmd.arg("fail")
                .arg(now)
                .arg(*window_ms)
                .arg(*limit)
                .arg(*lockout_ms);
            cmd
        }
        SharedAsk::Succeeded { .. } => {
            let mut cmd = scripts::FAILURES.call(&[&key]);
            cmd.arg("ok").arg(now).arg(0).arg(0).arg(0);
            cmd
        }
    };
    (key, cmd)
}

/// Sends `cmd` (about `key`); when the connection is down, what it was for falls back at once.
fn send(shard: &Rc<Shard>, broker: &Broker, key: &str, cmd: &redis::Cmd, pending: Pending) {
    if let Err(pending) = broker.send(key, cmd, pending) {
        fail(shard, pending);
    }
}

/// The node registry: node → lease deadline.
fn registry_key(broker: &Broker) -> String {
    format!("{}:nodes", broker.settings.prefix)
}

/// A node's control channel.
fn node_channel(prefix: &str, node: &str) -> String {
    format!("{prefix}:node:{node}")
}

/// The service channel every node listens on (shard 0): announcements (see `announce`).
fn service_channel(prefix: &str) -> String {
    format!("{prefix}:{{svc}}:all")
}

/// Tells the other nodes `message` on the service channel, as `node|message` (nodes skip their
/// own). Dropped while Redis is unreachable: the others reload when they notice (`missed`).
pub(crate) fn tell_nodes(shard: &Rc<Shard>, message: &[u8]) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let channel = service_channel(&broker.settings.prefix);
    let mut payload = Vec::with_capacity(broker.settings.node_id.len() + 1 + message.len());
    payload.extend_from_slice(broker.settings.node_id.as_bytes());
    payload.push(b'|');
    payload.extend_from_slice(message);
    let mut cmd = redis::cmd("SPUBLISH");
    cmd.arg(&channel).arg(payload);
    if broker.send(&channel, &cmd, Pending::Ignore).is_err() {
        tracing::warn!("redis is unreachable: an announcement to the other nodes was dropped");
    }
}

/// The key of a user's connections on every node (hash-tagged by the user).
fn user_key(broker: &Broker, user: &str) -> String {
    format!("{}:{{u:{user}}}:conns", broker.settings.prefix)
}

/// Renews this node's lease in the registry and reads the live nodes (each shard keeps the list
/// for the connection caps).
fn register(broker: &Broker) {
    let key = registry_key(broker);
    let mut cmd = scripts::REGISTER.call(&[&key]);
    cmd.arg(&broker.settings.node_id)
        .arg(now_ms())
        .arg(broker.lease_ms());
    let _ = broker.send(&key, &cmd, Pending::Nodes);
}

/// What the connection cap across nodes answered an upgrade.
pub(crate) enum Admission {
    /// Counted (under `close_oldest`, the oldest connection was told to close, wherever it is).
    Admitted,
    /// At `max_connections_per_user` under `reject_new`.
    Refused,
    /// Redis did not answer: the node's own count decided.
    Unanswered,
}

/// Counts a new connection of `user` in Redis against `max_connections_per_user` over every node
/// (SPEC §10 point 4); under `close_oldest` the oldest connection is closed with 4509 wherever it
/// is. Awaited by the upgrade (never by a shard's message handling).
pub(crate) async fn admit_user(shard: &Rc<Shard>, user: &str, conn: ConnId) -> Admission {
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        return Admission::Unanswered;
    };
    let cfg = &shard.shared.config;
    let policy = match cfg.session_conflict {
        crate::config::ConflictPolicy::CloseOldest => "close",
        crate::config::ConflictPolicy::RejectNew => "reject",
    };
    let member = format!("{}|{conn}", broker.settings.node_id);
    let key = user_key(broker, user);
    let mut cmd = scripts::ADMIT.call(&[&key]);
    cmd.arg(&member)
        .arg(now_ms())
        .arg(cfg.max_connections_per_user)
        .arg(policy)
        .arg(7 * 24 * 3600 * 1000u64)
        .arg(u64::try_from(broker.settings.node_ttl.as_millis()).unwrap_or(u64::MAX))
        .arg(&broker.settings.node_id);
    for node in broker.live_nodes.borrow().iter() {
        cmd.arg(node);
    }
    let slot = Rc::new(state::Awaited::default());
    if broker
        .send(&key, &cmd, Pending::Wake(slot.clone()))
        .is_err()
    {
        return Admission::Unanswered;
    }
    let Some(value) = state::Reply(slot).await else {
        return Admission::Unanswered;
    };
    let parts = items(&value);
    if parts.first().and_then(int) != Some(1) {
        return Admission::Refused;
    }
    if let Some(oldest) = parts.get(1).and_then(bytes) {
        close_member(shard, oldest);
    }
    Admission::Admitted
}

/// Closes the connection `node|conn` with 4509: here, or through its node's channel.
fn close_member(shard: &Rc<Shard>, member: &[u8]) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let Some((node, conn)) = std::str::from_utf8(member)
        .ok()
        .and_then(|m| m.rsplit_once('|'))
    else {
        return;
    };
    let Ok(conn) = conn.parse::<ConnId>() else {
        return;
    };
    if node == broker.settings.node_id {
        shard.dispatch(
            crate::conn::shard_of(conn),
            crate::msg::ConnMsg::Close {
                conn,
                code: protocol::CloseCode::SESSION_REPLACED,
            },
        );
        return;
    }
    let channel = node_channel(&broker.settings.prefix, node);
    let mut cmd = redis::cmd("SPUBLISH");
    cmd.arg(&channel).arg(format!(
        "c|{conn}|{}",
        protocol::CloseCode::SESSION_REPLACED.0
    ));
    let _ = broker.send(&channel, &cmd, Pending::Ignore);
}

/// Counts this shard's live connections in their users' caps again (a command connection came
/// back: Redis may have restarted empty, or admitted them while unreachable), for the users whose
/// key the master at `only` serves, or all. `NX`: entries Redis kept keep their connect time.
fn announce_connections(shard: &Rc<Shard>, only: Option<&str>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let now = now_ms();
    let conns: Vec<(Arc<str>, ConnId)> = shard
        .conns
        .borrow()
        .values()
        .map(|c| (c.identity.borrow().user_id.clone(), c.id))
        .collect();
    for (user, conn) in conns {
        let key = user_key(broker, &user);
        if only.is_some_and(|addr| broker.master_addr(key.as_bytes()).as_deref() != Some(addr)) {
            continue;
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(&key)
            .arg("NX")
            .arg(now)
            .arg(format!("{}|{conn}", broker.settings.node_id));
        let _ = broker.send(&key, &cmd, Pending::Ignore);
    }
}

/// A connection of `user` ended: it no longer counts against the cap on any node (once Redis is
/// reachable again, if it is not now).
pub(crate) fn release_user(shard: &Shard, user: &Arc<str>, conn: ConnId) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if !broker.is_up() {
        broker.unreleased.borrow_mut().push((user.clone(), conn));
        return;
    }
    let key = user_key(broker, user);
    let mut cmd = redis::cmd("ZREM");
    cmd.arg(&key)
        .arg(format!("{}|{conn}", broker.settings.node_id));
    let _ = broker.send(&key, &cmd, Pending::Ignore);
}

/// The key of a resumable session (hash-tagged by itself).
fn session_key(broker: &Broker, session: &str) -> String {
    format!("{}:{{s:{session}}}", broker.settings.prefix)
}

/// Keeps a closed connection's session resumable on every node for `resume_ttl`; false when
/// Redis cannot be told (the caller keeps it in this process).
pub(crate) fn remember_session(shard: &Shard, session: &str, user: &str) -> bool {
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        return false;
    };
    let ttl = u64::try_from(shard.shared.config.resume_ttl.as_millis()).unwrap_or(u64::MAX);
    let key = session_key(broker, session);
    let mut cmd = redis::cmd("SET");
    cmd.arg(&key).arg(user).arg("PX").arg(ttl.max(1));
    broker.send(&key, &cmd, Pending::Ignore).is_ok()
}

/// Looks a session up in Redis for a `resume` (another node may have held it); the answer comes
/// back to the connection as [`crate::msg::ConnMsg::ResumeChecked`]. False when Redis cannot be
/// asked (the caller goes on without).
pub(crate) fn check_session(shard: &Shard, check: crate::msg::ResumeCheck, user: Arc<str>) -> bool {
    let Some(broker) = broker(shard).filter(|b| b.is_up()) else {
        return false;
    };
    let key = session_key(broker, &check.session);
    let mut cmd = redis::cmd("GETDEL");
    cmd.arg(&key);
    broker
        .send(&key, &cmd, Pending::Resume(Box::new(check), user))
        .is_ok()
}

/// Renews this node's leases in the rooms held here and completes joins held too long (the
/// ticker calls this).
pub(crate) fn upkeep(shard: &Rc<Shard>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let now = monotonic_ms32();
    // Held joins whose messages never came (a subscription lost meanwhile): answered as they are.
    let overdue: Vec<HeldJoin> = {
        let mut channels = broker.channels.borrow_mut();
        let mut out = Vec::new();
        for channel in channels.values_mut() {
            let (late, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut channel.held)
                .into_iter()
                .partition(|h| now.wrapping_sub(h.since_ms) > HOLD_MS);
            channel.held = keep;
            out.extend(late);
        }
        out
    };
    for held in overdue {
        complete_join(shard, held);
    }
    if broker.settings.cluster && now.wrapping_sub(broker.slots_asked_ms.get()) > SLOTS_EVERY_MS {
        ask_slots(broker);
    }
    if !broker.is_up() || now.wrapping_sub(broker.last_touch_ms.get()) < broker.touch_every_ms() {
        return;
    }
    broker.last_touch_ms.set(now);
    register(broker);
    let rooms: Vec<RoomId> = broker
        .channels
        .borrow()
        .keys()
        .filter(|r| !r.is_personal())
        .cloned()
        .collect();
    for room in rooms {
        if shard.rooms.borrow().local_members(&room) == 0 {
            continue;
        }
        let keys = RoomKeys::new(&broker.settings.prefix, &room);
        let mut cmd = scripts::TOUCH.call(&keys.membership());
        cmd.arg(&broker.settings.node_id)
            .arg(now_ms())
            .arg(broker.lease_ms())
            .arg(flag(presence_on(shard, &room)))
            .arg(&keys.nu);
        let _ = broker.send(&keys.count, &cmd, Pending::Ignore);
    }
}

// ---- what arrives on a room's channel -------------------------------------------------------

/// A value on the subscriber connection.
fn on_push(shard: &Rc<Shard>, value: &redis::Value) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if let Some((channel, payload)) = message(value) {
        if channel == node_channel(&broker.settings.prefix, &broker.settings.node_id).as_bytes() {
            on_node_message(shard, payload);
            return;
        }
        if channel == service_channel(&broker.settings.prefix).as_bytes() {
            if let Some(bar) = payload.iter().position(|b| *b == b'|')
                && &payload[..bar] != broker.settings.node_id.as_bytes()
            {
                shard.shared.listeners.heard(&payload[bar + 1..]);
            }
            return;
        }
        let Some(room) = keys::room_of_channel(&broker.settings.prefix, channel)
            .and_then(|r| RoomId::parse(r).ok())
        else {
            return;
        };
        on_channel(shard, &room, payload);
        return;
    }
    if let redis::Value::ServerError(_) = value {
        // A subscription refused: in a cluster, its slot moved (`MOVED`); read the map again
        // and subscribe where it says.
        if let Err(e) = value.clone().extract_error() {
            if let Some((addr, slot)) = e.redirect_node() {
                let metrics = &shard.shared.metrics.redis;
                metrics.redirects.fetch_add(1, Ordering::Relaxed);
                if let Some(map) = broker.slots.borrow_mut().as_mut() {
                    map.moved(slot, addr);
                }
                ask_slots(broker);
                resubscribe(shard, None);
            } else {
                tracing::warn!(error = %e, "redis refused a subscription");
            }
        }
        return;
    }
    let parts = items(value);
    if let [kind, channel, _] = parts
        && bytes(kind) == Some(b"sunsubscribe")
        && let Some(room) = bytes(channel)
            .and_then(|c| keys::room_of_channel(&broker.settings.prefix, c))
            .and_then(|r| RoomId::parse(r).ok())
        && broker.channels.borrow().contains_key(&room)
    {
        // Not asked for: the channel's slot left that master (a cluster resharded or failed
        // over). Messages published meanwhile are read from the stream with the next one.
        if let Some(channel) = broker.channels.borrow_mut().get_mut(&room) {
            channel.subscribed = false;
        }
        ask_slots(broker);
        let name = keys::channel(&broker.settings.prefix, &room);
        broker.subscription(&name, true);
        return;
    }
    // The service channel subscribed (first, or again): what was announced meanwhile is lost.
    if let [kind, channel, _] = parts
        && bytes(kind) == Some(b"ssubscribe")
        && bytes(channel) == Some(service_channel(&broker.settings.prefix).as_bytes())
    {
        shard.shared.listeners.missed();
        return;
    }
    // `ssubscribe` confirmations: the room's waiting joins may ask Redis now.
    if let [kind, channel, _] = parts
        && bytes(kind) == Some(b"ssubscribe")
        && let Some(room) = bytes(channel)
            .and_then(|c| keys::room_of_channel(&broker.settings.prefix, c))
            .and_then(|r| RoomId::parse(r).ok())
    {
        let waiting = match broker.channels.borrow_mut().get_mut(&room) {
            Some(channel) => {
                channel.subscribed = true;
                std::mem::take(&mut channel.waiting)
            }
            None => Vec::new(),
        };
        for msg in waiting {
            ask_join(shard, msg);
        }
    }
}

/// A message to this node: `c|conn|code` closes one of its connections.
fn on_node_message(shard: &Rc<Shard>, payload: &[u8]) {
    let text = String::from_utf8_lossy(payload);
    let mut fields = text.split('|');
    if let (Some("c"), Some(conn), Some(code)) = (fields.next(), fields.next(), fields.next())
        && let (Ok(conn), Ok(code)) = (conn.parse::<ConnId>(), code.parse::<u16>())
    {
        shard.dispatch(
            crate::conn::shard_of(conn),
            crate::msg::ConnMsg::Close {
                conn,
                code: protocol::CloseCode(code),
            },
        );
    }
}

/// A message (`m|seq|epoch|body`) or a presence change (`p|j|user|name`) of `room`.
fn on_channel(shard: &Rc<Shard>, room: &RoomId, payload: &[u8]) {
    let mut fields = payload.splitn(4, |b| *b == b'|');
    match (fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(b"m"), Some(seq), Some(epoch), Some(body)) => {
            let seq = std::str::from_utf8(seq).ok().and_then(|s| s.parse().ok());
            let epoch = std::str::from_utf8(epoch).ok();
            if let (Some(seq), Some(epoch)) = (seq, epoch) {
                deliver(shard, room, seq, epoch, body);
            }
        }
        (Some(b"p"), Some(kind), Some(user), Some(name)) => {
            let (Ok(user), Ok(name)) = (std::str::from_utf8(user), std::str::from_utf8(name))
            else {
                return;
            };
            shard.rooms.borrow_mut().note_shared_presence(
                room,
                &Arc::from(user),
                &Arc::from(name),
                kind == b"j",
            );
        }
        _ => {}
    }
}

/// The message record a body of the publish script holds.
fn decode_body(shard: &Shard, room: RoomId, seq: u64, body: &[u8]) -> Option<MessageRecord> {
    let Value::Array(fields) = decode_value(body, Format::MsgPack, &limits(shard)).ok()? else {
        return None;
    };
    let mut fields = fields.into_iter();
    let (Some(from), Some(name), Some(ts), Some(data)) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    let event = match fields.next() {
        None => None,
        Some(Value::Str(event)) => Some(protocol::envelope::EventName::parse(&event).ok()?),
        Some(_) => return None,
    };
    if fields.next().is_some() {
        return None;
    }
    let from = match from {
        Value::Str(s) => Some(s),
        _ => None,
    };
    let Value::Str(name) = name else {
        return None;
    };
    let ts = match ts {
        Value::UInt(t) => t,
        _ => return None,
    };
    Some(MessageRecord {
        room,
        seq,
        from,
        name,
        ts,
        data,
        event,
    })
}

/// A room stream's entry as `XRANGE` answers it (`[id "<seq>-0", [field, body]]`): its `seq`
/// and body; `None` for anything else.
fn stream_entry(entry: &redis::Value) -> Option<(u64, &[u8])> {
    let [id, fields] = items(entry) else {
        return None;
    };
    let seq = std::str::from_utf8(bytes(id)?)
        .ok()?
        .split('-')
        .next()?
        .parse()
        .ok()?;
    Some((seq, items(fields).get(1).and_then(bytes)?))
}

/// Delivers a sequenced message to the members held here, in `seq` order.
fn deliver(shard: &Rc<Shard>, room: &RoomId, seq: u64, epoch: &str, body: &[u8]) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let epoch: Arc<str> = {
        let mut channels = broker.channels.borrow_mut();
        let Some(channel) = channels.get_mut(room) else {
            return;
        };
        if let Some(waiting) = channel.repairing.as_mut() {
            // A gap is being filled from the stream: what arrives meanwhile waits behind it.
            waiting.push((seq, Arc::from(epoch), body.to_vec()));
            return;
        }
        let same_epoch = channel.epoch.as_deref() == Some(epoch);
        if same_epoch && seq <= channel.last_seq {
            // Already delivered (a resubscription may repeat).
            return;
        }
        if same_epoch && channel.last_seq > 0 && seq > channel.last_seq + 1 && broker.is_up() {
            // Messages were missed (the subscription was lost for a while): read them from the
            // room's stream, then this one.
            let after = channel.last_seq;
            channel.repairing = Some(vec![(seq, Arc::from(epoch), body.to_vec())]);
            drop(channels);
            let keys = RoomKeys::new(&broker.settings.prefix, room);
            let mut cmd = scripts::HISTORY.call(&[&keys.meta, &keys.hist]);
            cmd.arg(after)
                .arg(seq - after - 1)
                .arg(broker.new_epoch())
                .arg(META_TTL_SECS);
            let pending = Pending::Repair {
                room: room.clone(),
                upto: seq - 1,
            };
            if broker.send(&keys.meta, &cmd, pending).is_err() {
                finish_repair(shard, room, &redis::Value::Nil, seq - 1);
            }
            return;
        }
        channel.last_seq = seq;
        if !same_epoch {
            channel.epoch = Some(Arc::from(epoch));
        }
        channel.epoch.clone().unwrap_or_else(|| Arc::from(epoch))
    };
    deliver_now(shard, room, seq, &epoch, body);
}

/// Encodes a sequenced message for the members held here and hands it to their shards.
fn deliver_now(shard: &Rc<Shard>, room: &RoomId, seq: u64, epoch: &Arc<str>, body: &[u8]) {
    if let Some(record) = decode_body(shard, room.clone(), seq, body) {
        let owner = online_owner(shard, room);
        let fanout = shard.rooms.borrow_mut().deliver_shared(
            &record,
            epoch,
            owner.as_ref(),
            &mut shard.compressor.borrow_mut(),
        );
        if let Some(fanout) = fanout {
            fan_out(shard, fanout);
        }
    }
    release_held(shard, room);
}

/// The stream's answer for a gap of `room` (up to `upto`): the missed messages delivered in
/// order, then what arrived meanwhile. What the stream no longer holds stays missed (counted in
/// `ringhub_redis_gaps_total`; the recovered ones in `ringhub_redis_repaired_total`).
fn finish_repair(shard: &Rc<Shard>, room: &RoomId, answer: &redis::Value, upto: u64) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let (after, epoch, waiting) = {
        let mut channels = broker.channels.borrow_mut();
        let Some(channel) = channels.get_mut(room) else {
            return;
        };
        let waiting = channel.repairing.take().unwrap_or_default();
        (channel.last_seq, channel.epoch.clone(), waiting)
    };
    let mut filled = after;
    // The HISTORY script's answer: epoch, last seq, entries. Entries of another epoch (Redis
    // restarted empty meanwhile) are not this gap's.
    let (stream_epoch, entries) = match items(answer) {
        [e, _, entries] => (bytes(e), items(entries)),
        _ => (None, &[][..]),
    };
    if let Some(epoch) = epoch
        .as_ref()
        .filter(|e| stream_epoch == Some(e.as_bytes()))
    {
        for (seq, body) in entries.iter().filter_map(stream_entry) {
            if seq != filled + 1 || seq > upto {
                continue;
            }
            filled = seq;
            if let Some(channel) = broker.channels.borrow_mut().get_mut(room) {
                channel.last_seq = seq;
            }
            deliver_now(shard, room, seq, epoch, body);
        }
    }
    let metrics = &shard.shared.metrics.redis;
    metrics
        .repaired
        .fetch_add(filled - after, Ordering::Relaxed);
    if filled < upto {
        metrics.gaps.fetch_add(upto - filled, Ordering::Relaxed);
        if let Some(channel) = broker.channels.borrow_mut().get_mut(room) {
            // What the stream lost is skipped: the rest follows.
            channel.last_seq = upto;
        }
    }
    for (seq, epoch, body) in waiting {
        deliver(shard, room, seq, &epoch, &body);
    }
}

/// Completes the held joins of `room` whose messages have now been delivered.
fn release_held(shard: &Rc<Shard>, room: &RoomId) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let ready: Vec<HeldJoin> = {
        let mut channels = broker.channels.borrow_mut();
        let Some(channel) = channels.get_mut(room) else {
            return;
        };
        if channel.held.is_empty() {
            return;
        }
        let last = channel.last_seq;
        let epoch = channel.epoch.clone();
        let (ready, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut channel.held)
            .into_iter()
            .partition(|h| h.seq <= last || epoch.as_ref() != Some(&h.epoch));
        channel.held = keep;
        ready
    };
    for held in ready {
        complete_join(shard, held);
    }
}

// ---- replies --------------------------------------------------------------------------------

/// The events of a shard's command connection to the master at `addr`.
pub(crate) struct CommandEvents {
    shard: Rc<Shard>,
    addr: Rc<str>,
}

/// The events of a shard's subscriber connection to the master at `addr`.
pub(crate) struct SubscriberEvents {
    shard: Rc<Shard>,
    addr: Rc<str>,
}

/// Starts the connections of every master the broker of `shard` knows (at start: the one Redis,
/// or a cluster's seed nodes).
pub(crate) fn start(shard: &Rc<Shard>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let masters: Vec<_> = broker
        .masters
        .borrow()
        .iter()
        .map(|m| (m.addr.clone(), m.commands.clone(), m.subscriber.clone()))
        .collect();
    for (addr, commands, subscriber) in masters {
        spawn_links(shard, broker, addr, commands, subscriber);
    }
}

fn spawn_links(
    shard: &Rc<Shard>,
    broker: &Broker,
    addr: Rc<str>,
    commands: Rc<crate::redis::link::Link<Pending>>,
    subscriber: Rc<crate::redis::link::Link<()>>,
) {
    monoio::spawn(crate::redis::link::drive(
        commands,
        addr.clone(),
        broker.settings.clone(),
        &scripts::ALL,
        CommandEvents {
            shard: shard.clone(),
            addr: addr.clone(),
        },
    ));
    monoio::spawn(crate::redis::link::drive(
        subscriber,
        addr.clone(),
        broker.settings.clone(),
        &[],
        SubscriberEvents {
            shard: shard.clone(),
            addr,
        },
    ));
}

impl LinkEvents<Pending> for CommandEvents {
    fn reply(&mut self, handler: Pending, reply: Result<redis::Value, RedisError>) {
        on_reply(&self.shard, handler, reply);
    }

    fn push(&mut self, _value: redis::Value) {}

    fn up(&mut self) {
        let shard = &self.shard;
        let metrics = &shard.shared.metrics.redis;
        metrics.links_up.fetch_add(1, Ordering::Relaxed);
        let Some(broker) = broker(shard) else {
            return;
        };
        if broker.settings.cluster {
            ask_slots(broker);
        }
        register(broker);
        if broker.is_up() {
            let unreleased = std::mem::take(&mut *broker.unreleased.borrow_mut());
            for (user, conn) in unreleased {
                release_user(shard, &user, conn);
            }
        }
        announce_members(shard, Some(&self.addr));
        announce_connections(shard, Some(&self.addr));
    }

    fn down(&mut self, unanswered: Vec<Pending>) {
        let metrics = &self.shard.shared.metrics.redis;
        metrics.links_up.fetch_sub(1, Ordering::Relaxed);
        for handler in unanswered {
            fail(&self.shard, handler);
        }
    }

    fn wrote(&mut self, commands: usize) {
        let metrics = &self.shard.shared.metrics.redis;
        metrics
            .commands
            .fetch_add(commands as u64, Ordering::Relaxed);
        metrics.pipeline_size.observe(commands as u64);
    }

    fn round_trip(&mut self, micros: u64) {
        self.shard
            .shared
            .metrics
            .redis
            .round_trip_us
            .observe(micros);
    }
}

impl LinkEvents<()> for SubscriberEvents {
    fn reply(&mut self, (): (), _reply: Result<redis::Value, RedisError>) {}

    fn push(&mut self, value: redis::Value) {
        // What this made the shard send itself is handled by its dispatcher, which the outbox
        // wakes.
        on_push(&self.shard, &value);
    }

    fn up(&mut self) {
        let metrics = &self.shard.shared.metrics.redis;
        metrics.links_up.fetch_add(1, Ordering::Relaxed);
        resubscribe(&self.shard, Some(&self.addr));
    }

    fn down(&mut self, _unanswered: Vec<()>) {
        let metrics = &self.shard.shared.metrics.redis;
        metrics.links_up.fetch_sub(1, Ordering::Relaxed);
        let Some(broker) = broker(&self.shard) else {
            return;
        };
        let prefix = &broker.settings.prefix;
        for (room, channel) in broker.channels.borrow_mut().iter_mut() {
            let name = keys::channel(prefix, room);
            if broker.master_addr(name.as_bytes()).as_deref() == Some(&*self.addr) {
                channel.subscribed = false;
            }
        }
    }

    fn wrote(&mut self, commands: usize) {
        self.shard
            .shared
            .metrics
            .redis
            .commands
            .fetch_add(commands as u64, Ordering::Relaxed);
    }

    fn round_trip(&mut self, _micros: u64) {}
}

/// Subscribes every room channel held here again (after a subscriber connection came back, or
/// a cluster's slots moved): those served by the master at `only`, or all.
fn resubscribe(shard: &Rc<Shard>, only: Option<&str>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let mut names: Vec<String> = broker
        .channels
        .borrow()
        .keys()
        .map(|room| keys::channel(&broker.settings.prefix, room))
        .collect();
    if shard.id == 0 {
        names.push(node_channel(
            &broker.settings.prefix,
            &broker.settings.node_id,
        ));
        names.push(service_channel(&broker.settings.prefix));
    }
    for name in names {
        if only.is_none_or(|addr| broker.master_addr(name.as_bytes()).as_deref() == Some(addr)) {
            broker.subscription(&name, true);
        }
    }
}

/// Announces this node's connections in every room held here again (after a command
/// connection came back: Redis may have lost them): the rooms served by the master at `only`,
/// or all.
fn announce_members(shard: &Rc<Shard>, only: Option<&str>) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let rooms: Vec<RoomId> = broker
        .channels
        .borrow()
        .keys()
        .filter(|r| !r.is_personal())
        .cloned()
        .collect();
    for room in rooms {
        let keys = RoomKeys::new(&broker.settings.prefix, &room);
        if only
            .is_some_and(|addr| broker.master_addr(keys.count.as_bytes()).as_deref() != Some(addr))
        {
            continue;
        }
        let members = shard.rooms.borrow().presence(&room, None);
        let mut cmd = scripts::ANNOUNCE.call(&keys.membership());
        cmd.arg(&broker.settings.node_id)
            .arg(now_ms())
            .arg(broker.lease_ms())
            .arg(flag(presence_on(shard, &room)))
            .arg(&keys.nu);
        for member in &members {
            cmd.arg(&member.user).arg(member.conns).arg(&member.name);
        }
        let _ = broker.send(&keys.count, &cmd, Pending::Ignore);
    }
}

// ---- a Redis Cluster's slots ----------------------------------------------------------------

/// Asks a master for the cluster's map of slots (at most once per `SLOTS_AT_MOST_EVERY_MS`).
fn ask_slots(broker: &Broker) {
    let now = monotonic_ms32().max(1);
    let asked = broker.slots_asked_ms.get();
    if asked != 0 && now.wrapping_sub(asked) < SLOTS_AT_MOST_EVERY_MS {
        return;
    }
    let masters = broker.masters.borrow();
    // Start at a different master each time, so that one that answers badly is not the only one.
    let start = usize::try_from(now).unwrap_or(0) % masters.len().max(1);
    let Some(master) = masters
        .iter()
        .cycle()
        .skip(start)
        .take(masters.len())
        .find(|m| m.commands.is_up())
    else {
        return;
    };
    broker.slots_asked_ms.set(now);
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let _ = master
        .commands
        .send(&cmd, Pending::Slots(master.addr.clone()));
}

/// A new map of slots: connections to new masters are made, those to former masters closed,
/// and what moved is subscribed and announced where it lives now.
fn apply_slots(shard: &Rc<Shard>, map: SlotMap) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if broker.slots.borrow().as_ref() == Some(&map) {
        return;
    }
    if !map.covers_all() {
        tracing::warn!("the redis cluster does not serve every slot (CLUSTER SLOTS)");
    }
    let metrics = &shard.shared.metrics.redis;
    let mut started = Vec::new();
    let gone: Vec<Master> = {
        let mut masters = broker.masters.borrow_mut();
        for addr in &map.masters {
            if !masters.iter().any(|m| &*m.addr == addr) {
                let master = Master::new(addr);
                started.push((
                    master.addr.clone(),
                    master.commands.clone(),
                    master.subscriber.clone(),
                ));
                masters.push(master);
            }
        }
        let (keep, gone) = std::mem::take(&mut *masters)
            .into_iter()
            .partition(|m| map.masters.iter().any(|a| *a == *m.addr));
        *masters = keep;
        gone
    };
    if shard.id == 0 {
        tracing::info!(masters = ?map.masters, "redis cluster slots read");
    }
    let covers = map.covers_all();
    match (broker.slots_cover.replace(covers), covers) {
        (false, true) => metrics.maps_missing.fetch_sub(1, Ordering::Relaxed),
        (true, false) => metrics.maps_missing.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    *broker.slots.borrow_mut() = Some(map);
    let change =
        2 * (i64::try_from(started.len()).unwrap_or(0) - i64::try_from(gone.len()).unwrap_or(0));
    metrics.links_expected.fetch_add(change, Ordering::Relaxed);
    for master in gone {
        master.commands.retire();
        master.subscriber.retire();
    }
    for (addr, commands, subscriber) in started {
        spawn_links(shard, broker, addr, commands, subscriber);
    }
    resubscribe(shard, None);
    announce_members(shard, None);
}

/// A cluster command answered `MOVED` or `ASK`: sent again to the master named (after
/// `ASKING` for `ASK`); a `MOVED` also updates the map and asks for it anew.
fn redirect(shard: &Rc<Shard>, mut routed: state::Routed, addr: &str, slot: u16, ask: bool) {
    let Some(broker) = broker(shard) else {
        return;
    };
    if routed.redirects >= MAX_REDIRECTS {
        tracing::warn!(slot, "redis cluster: too many redirections");
        fail(shard, routed.pending);
        return;
    }
    routed.redirects += 1;
    let metrics = &shard.shared.metrics.redis;
    metrics.redirects.fetch_add(1, Ordering::Relaxed);
    if !ask {
        if let Some(map) = broker.slots.borrow_mut().as_mut() {
            map.moved(slot, addr);
        }
        ask_slots(broker);
    }
    let masters = broker.masters.borrow();
    let Some(master) = masters.iter().find(|m| &*m.addr == addr) else {
        // A master not met yet: the map, asked for above, will name it.
        drop(masters);
        fail(shard, routed.pending);
        return;
    };
    if ask {
        let _ = master.commands.send(&redis::cmd("ASKING"), Pending::Ignore);
    }
    let packed = routed.packed.clone();
    if let Err(pending) = master
        .commands
        .send_packed(&packed, Pending::Routed(Box::new(routed)))
    {
        drop(masters);
        fail(shard, pending.unrouted());
    }
}

/// A command that will never be answered (the connection dropped): what it was for falls back.
fn fail(shard: &Rc<Shard>, handler: Pending) {
    match handler {
        Pending::Ignore | Pending::Slots(_) => {}
        Pending::Limit(answer) => answer.set(crate::shared_limits::Verdict::Unknown),
        Pending::Held(_, answer) => answer.set(crate::held::HeldReply::Unknown),
        Pending::Routed(routed) => fail(shard, routed.pending),
        Pending::Join(msg) | Pending::PersonalJoin(msg) => local_join(shard, *msg),
        Pending::Publish { conn, id, .. } => shard.reply(
            conn,
            Reply::Error {
                id,
                code: ErrorCode::Unavailable,
                message: "redis is unreachable; publish again",
            },
        ),
        Pending::PublishExternal { answer } => answer.set(Err(ErrorCode::Unavailable)),
        Pending::Presence { conn, id } => shard.reply(
            conn,
            Reply::Error {
                id,
                code: ErrorCode::Unavailable,
                message: "redis is unreachable",
            },
        ),
        Pending::PresenceExternal { answer } => answer.set(Vec::new()),
        Pending::History { conn, id, .. } => shard.reply(
            conn,
            Reply::Error {
                id,
                code: ErrorCode::Unavailable,
                message: "redis is unreachable",
            },
        ),
        Pending::Wake(slot) => slot.set(None),
        Pending::Nodes => {}
        Pending::Repair { room, upto } => finish_repair(shard, &room, &redis::Value::Nil, upto),
        Pending::Dropped(done) => done.tick(),
        Pending::Resume(check, _) => {
            let conn = check.conn;
            shard.dispatch(
                crate::conn::shard_of(conn),
                crate::msg::ConnMsg::ResumeChecked(check),
            );
        }
    }
}

fn on_reply(shard: &Rc<Shard>, handler: Pending, reply: Result<redis::Value, RedisError>) {
    let handler = match handler {
        Pending::Routed(routed) => {
            if let Err(e) = &reply
                && let Some((addr, slot)) = e.redirect_node()
            {
                let ask = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask);
                redirect(shard, *routed, addr, slot, ask);
                return;
            }
            routed.pending
        }
        other => other,
    };
    let value = match reply {
        Ok(value) => value,
        Err(e) => {
            tracing::warn!(error = %e, "redis command failed");
            fail(shard, handler);
            return;
        }
    };
    match handler {
        Pending::Ignore => {}
        Pending::Join(msg) => on_joined(shard, msg, &value),
        Pending::PersonalJoin(msg) => on_personal_joined(shard, msg, &value),
        Pending::Publish {
            conn,
            id,
            trace,
            room,
        } => {
            let parts = items(&value);
            let seq = parts.first().and_then(int).unwrap_or(0);
            if seq < 0 {
                // Past `publish_per_room` counted over every node.
                shard.shared.metrics.rate_limited("publish_per_room");
                shard.reply(
                    conn,
                    Reply::Error {
                        id,
                        code: ErrorCode::RateLimited,
                        message: "the room's publish rate is exceeded",
                    },
                );
                return;
            }
            tracing::debug!(
                room = %room,
                seq,
                conn,
                trace_id = %format_args!("{trace:x}"),
                "published"
            );
            if id.is_some() {
                shard.reply(
                    conn,
                    Reply::Published {
                        id,
                        seq: u64::try_from(seq).unwrap_or(0),
                    },
                );
            }
        }
        Pending::PublishExternal { answer } => {
            let seq = items(&value).first().and_then(int).unwrap_or(0);
            if seq < 0 {
                shard.shared.metrics.rate_limited("publish_per_room");
                answer.set(Err(ErrorCode::RateLimited));
                return;
            }
            answer.set(Ok(u64::try_from(seq).unwrap_or(0)));
        }
        Pending::Presence { conn, id } => {
            let presence = presence_list(&value);
            shard.reply(conn, Reply::Presence { id, presence });
        }
        Pending::PresenceExternal { answer } => answer.set(presence_list(&value)),
        Pending::History {
            conn,
            id,
            room,
            since,
        } => {
            let parts = items(&value);
            let epoch: Arc<str> = parts
                .first()
                .and_then(bytes)
                .map(|e| Arc::from(String::from_utf8_lossy(e).as_ref()))
                .unwrap_or_else(|| Arc::from(""));
            let messages = stored_messages(shard, &room, parts.get(2), since);
            shard.reply(
                conn,
                Reply::History {
                    id,
                    messages,
                    epoch,
                },
            );
        }
        Pending::Wake(slot) => slot.set(Some(value)),
        Pending::Held(kind, answer) => answer.set(held_reply(kind, &value)),
        Pending::Repair { room, upto } => finish_repair(shard, &room, &value, upto),
        Pending::Nodes => {
            let live: Vec<String> = items(&value)
                .iter()
                .filter_map(bytes)
                .map(|node| String::from_utf8_lossy(node).into_owned())
                .collect();
            if shard.id == 0 {
                let metrics = &shard.shared.metrics.redis;
                let count = i64::try_from(live.len()).unwrap_or(i64::MAX);
                metrics.nodes.store(count, Ordering::Relaxed);
            }
            if let Some(broker) = broker(shard) {
                *broker.live_nodes.borrow_mut() = live;
            }
        }
        Pending::Slots(addr) => {
            match SlotMap::from_cluster_slots(&value, crate::redis::cluster::host_of(&addr)) {
                Ok(map) => apply_slots(shard, map),
                Err(why) => {
                    tracing::warn!(addr = %addr, why, "redis cluster: unreadable CLUSTER SLOTS");
                }
            }
        }
        Pending::Routed(routed) => on_reply(shard, routed.pending, Ok(value)),
        Pending::Limit(answer) => answer.set(limit_verdict(&value)),
        Pending::Dropped(done) => done.tick(),
        Pending::Resume(mut check, user) => {
            check.valid = bytes(&value) == Some(user.as_bytes());
            let conn = check.conn;
            shard.dispatch(
                crate::conn::shard_of(conn),
                crate::msg::ConnMsg::ResumeChecked(check),
            );
        }
    }
}

/// `user, conns, name` triples as presence entries, sorted by user.
fn presence_list(value: &redis::Value) -> Vec<PresenceEntry> {
    let mut list: Vec<PresenceEntry> = items(value)
        .chunks_exact(3)
        .filter_map(|t| {
            Some(PresenceEntry {
                user: String::from_utf8_lossy(bytes(&t[0])?).into_owned(),
                conns: u32::try_from(int(&t[1])?).ok()?,
                name: String::from_utf8_lossy(bytes(&t[2])?).into_owned(),
            })
        })
        .filter(|e| e.conns > 0)
        .collect();
    list.sort_by(|a, b| a.user.cmp(&b.user));
    list
}

/// Stream entries (`[id, [d, body]]`) after `since`, as history keeps messages, within
/// `history_ttl`.
fn stored_messages(
    shard: &Shard,
    room: &RoomId,
    entries: Option<&redis::Value>,
    since: u64,
) -> Vec<Arc<StoredMessage>> {
    let ttl = u64::try_from(shard.shared.config.history_ttl.as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    let mut out = Vec::new();
    let entries = entries.map(items).unwrap_or_default();
    for (seq, body) in entries.iter().filter_map(stream_entry) {
        if seq <= since {
            continue;
        }
        let Some(record) = decode_body(shard, room.clone(), seq, body) else {
            continue;
        };
        if ttl > 0 && now.saturating_sub(record.ts) > ttl {
            continue;
        }
        let Ok(encoded) = encode_push(&Push::Message(&record), Format::MsgPack) else {
            continue;
        };
        out.push(Arc::new(StoredMessage::new(
            seq,
            record.ts,
            None,
            Some(bytes::Bytes::from(encoded)),
        )));
    }
    out
}

/// The join script's answer.
fn on_joined(shard: &Rc<Shard>, msg: Box<JoinMsg>, value: &redis::Value) {
    let Some(broker) = broker(shard) else {
        return;
    };
    let room = msg.room.clone();
    let cancelled = {
        let mut channels = broker.channels.borrow_mut();
        match channels.get_mut(&room) {
            Some(channel) => {
                channel.in_flight.retain(|c| *c != msg.conn);
                let at = channel.cancelled.iter().position(|c| *c == msg.conn);
                at.map(|at| channel.cancelled.swap_remove(at)).is_some()
            }
            None => false,
        }
    };
    let parts = items(value);
    if parts.first().and_then(int) != Some(1) {
        if cancelled {
            answer_abandoned(shard, *msg);
        } else {
            let full = crate::room::Refused {
                code: ErrorCode::RoomFull,
                message: "room is full",
            };
            answer_join(shard, *msg, Err(full));
        }
        release_channel(shard, &room);
        return;
    }
    if cancelled {
        // The connection left while Redis counted it in: counted out again.
        if !msg.already {
            send_leave(shard, broker, &room, &msg.user);
        }
        answer_abandoned(shard, *msg);
        release_channel(shard, &room);
        return;
    }
    let epoch: Arc<str> = parts
        .get(1)
        .and_then(bytes)
        .map(|e| Arc::from(String::from_utf8_lossy(e).as_ref()))
        .unwrap_or_else(|| Arc::from(""));
    let seq = parts
        .get(2)
        .and_then(int)
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    let presence = parts.get(3).map(presence_list).unwrap_or_default();
    let recovered = parts.get(4).cloned().unwrap_or(redis::Value::Nil);
    let held = HeldJoin {
        msg,
        epoch,
        seq,
        presence,
        recovered,
        since_ms: monotonic_ms32(),
    };
    let mut channels = broker.channels.borrow_mut();
    let Some(channel) = channels.get_mut(&room) else {
        drop(channels);
        complete_join(shard, held);
        return;
    };
    match &channel.epoch {
        None => {
            // The first answer for this channel: deliveries start after it.
            channel.epoch = Some(held.epoch.clone());
            channel.last_seq = channel.last_seq.max(held.seq);
        }
        Some(e) if *e == held.epoch && channel.last_seq < held.seq => {
            // Messages before this join are still on their way here: the join waits for them.
            channel.held.push(held);
            return;
        }
        Some(e) if *e != held.epoch => {
            channel.epoch = Some(held.epoch.clone());
            channel.last_seq = held.seq;
        }
        Some(_) => {}
    }
    drop(channels);
    complete_join(shard, held);
}

/// Counts a join here with Redis's answer: the room's `seq` for this node (what was delivered
/// here), its epoch, presence and recovery.
fn complete_join(shard: &Rc<Shard>, held: HeldJoin) {
    let last_here = broker(shard)
        .and_then(|b| b.channels.borrow().get(&held.msg.room).map(|c| c.last_seq))
        .unwrap_or(held.seq);
    let seq = last_here.max(held.seq);
    let answer = join_locally(shard, &held.msg);
    let answer = answer.map(|local| {
        let recovery = held.msg.resume.as_ref().map(|from| {
            recover(
                shard,
                &held.msg.room,
                from,
                &held.epoch,
                seq,
                &held.recovered,
            )
        });
        JoinAnswer {
            seq,
            epoch: held.epoch.clone(),
            presence: if held.msg.id.is_some() {
                held.presence
            } else {
                local.presence
            },
            recovery,
        }
    });
    if answer.is_err()
        && !held.msg.already
        && owner_of(&held.msg.room) != Some(&*held.msg.user)
        && let Some(broker) = broker(shard)
    {
        // Refused here after Redis counted it: counted out again.
        send_leave(shard, broker, &held.msg.room, &held.msg.user);
    }
    answer_join(shard, *held.msg, answer);
}

/// The resume decision over what Redis returned (SPEC §7): every missed message, in order,
/// within the recovery bound, or `Lost`.
fn recover(
    shard: &Shard,
    room: &RoomId,
    from: &ResumeFrom,
    epoch: &str,
    seq: u64,
    entries: &redis::Value,
) -> Recovery {
    if !from.valid || from.epoch != epoch {
        return Recovery::Lost;
    }
    let first = from.seq.saturating_add(1);
    let last = from.upto.unwrap_or(seq).min(seq);
    if first > last {
        return Recovery::Recovered(Vec::new());
    }
    let messages: Vec<Arc<StoredMessage>> = stored_messages(shard, room, Some(entries), from.seq)
        .into_iter()
        .filter(|m| m.seq <= last)
        .collect();
    let contiguous = messages.first().map(|m| m.seq) == Some(first)
        && messages.last().map(|m| m.seq) == Some(last)
        && messages.len() as u64 == last - first + 1;
    let bytes: usize = messages.iter().map(|m| m.cost()).sum();
    let max_bytes = shard.shared.config.max_queued_bytes / 2;
    if contiguous && bytes <= max_bytes {
        Recovery::Recovered(messages)
    } else {
        Recovery::Lost
    }
}

/// A personal room's owner asked for its state: the history script's answer.
fn on_personal_joined(shard: &Rc<Shard>, msg: Box<JoinMsg>, value: &redis::Value) {
    let parts = items(value);
    let epoch: Arc<str> = parts
        .first()
        .and_then(bytes)
        .map(|e| Arc::from(String::from_utf8_lossy(e).as_ref()))
        .unwrap_or_else(|| Arc::from(""));
    let seq = parts
        .get(1)
        .and_then(int)
        .and_then(|s| u64::try_from(s).ok())
        .unwrap_or(0);
    let recovered = parts.get(2).cloned().unwrap_or(redis::Value::Nil);
    if let Some(broker) = broker(shard)
        && let Some(channel) = broker.channels.borrow_mut().get_mut(&msg.room)
        && channel.epoch.is_none()
    {
        channel.epoch = Some(epoch.clone());
        channel.last_seq = channel.last_seq.max(seq);
    }
    let held = HeldJoin {
        msg,
        epoch,
        seq,
        presence: Vec::new(),
        recovered,
        since_ms: monotonic_ms32(),
    };
    complete_join(shard, held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_triples_become_sorted_entries() {
        let v = redis::Value::Array(vec![
            redis::Value::BulkString(b"u2".to_vec()),
            redis::Value::Int(2),
            redis::Value::BulkString(b"Bob".to_vec()),
            redis::Value::BulkString(b"u1".to_vec()),
            redis::Value::BulkString(b"1".to_vec()),
            redis::Value::BulkString(b"Ann".to_vec()),
        ]);
        let list = presence_list(&v);
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].user.as_str(), list[0].conns), ("u1", 1));
        assert_eq!(list[1].name, "Bob");
    }
}
