//! Rooms on their home shard: the one place where a room's `seq` is assigned, its history kept,
//! its member count checked against `max_members` and its presence aggregated. Every join, leave
//! and publish of a room passes here in mailbox order, which is what gives every member the same
//! order without a lock.
//!
//! A personal room (SPEC §5) holds its owner whenever the owner is connected, so its home never
//! counts the owner: it asks [`crate::shard::Shared::online_user`] where the owner's connections
//! are, and keeps state for the room only once a message, a history query, a resume, an explicit
//! join or another member (an admin) needs it. An idle user costs its home nothing.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::ErrorCode;
use protocol::envelope::{MessageRecord, PresenceEntry, PresenceUser, Push, RoomId, Value};
use protocol::socketio;

use crate::conn::{ConnId, shard_of};
use crate::frames::{FRAME_KEYS, FrameKey, Frames};
use crate::history::{HistoryRooms, RoomBounds, RoomHistory, StoredMessage};
use crate::limits::{Bucket, Verdict};
use crate::now_ms;
use crate::rooms::RoomSettings;
use crate::shard::{Delivery, Joined, OnlineUser, Reply, Shard, ShardMsg};

/// Mailbox messages waiting on a shard above which its presence flushes are put off.
const PRESENCE_DELAY_BACKLOG: usize = 4096;

/// A room as its home shard knows it.
pub(crate) struct HomeRoom {
    seq: u64,
    /// See [`crate::shard::Shared::epoch_name`].
    epoch: u64,
    members: u32,
    max_members: u32,
    /// Members per shard: where to deliver.
    shard_members: Box<[u32]>,
    /// Members per wire format: what to encode.
    key_counts: [u32; FRAME_KEYS],
    presence: PresenceTable,
    /// Net presence changes since the last flush: user → (name, joined?).
    /// Boxed, made on the first change: most rooms have none waiting, and every room carries
    /// this field's size.
    pending_diff: Option<Box<PresenceDiff>>,
    /// Listed in the shard's `presence_dirty` (once, however long a flush is put off).
    presence_listed: bool,
    /// Ephemeral rooms vanish with their last member.
    ephemeral: bool,
    /// Presence diffs kept and sent (a persistent room may switch them off).
    presence_on: bool,
    /// History kept (a persistent room may switch it off).
    history_on: bool,
    /// Made on the first publish: many rooms (every idle personal room) never see one.
    traffic: Option<Box<Traffic>>,
}

/// A room's history and publish bucket.
struct Traffic {
    history: RoomHistory,
    /// Tells this room's entry in the shard's eviction order from one of an earlier room of the
    /// same id.
    generation: u64,
    /// Made full on the first publish, which is what a bucket made with the room would be by
    /// then (it refills up to its capacity).
    publish_bucket: Bucket,
}

impl HistoryRooms for HashMap<RoomId, Box<HomeRoom>> {
    fn history_of(&mut self, room: &RoomId, generation: u64) -> Option<&mut RoomHistory> {
        let traffic = self.get_mut(room)?.traffic.as_mut()?;
        (traffic.generation == generation).then_some(&mut traffic.history)
    }
}

/// Users present in one room with their connection counts. Most rooms (every personal room) hold
/// one or a few users: up to [`SMALL_PRESENCE`] of them live in a vector grown one slot at a time
/// (one 40-byte allocation for a personal room, where a hash map takes about 180); a larger room
/// moves to a hash map, and back to a list once it is down to half that many users.
enum PresenceTable {
    Small(Vec<(Arc<str>, Arc<str>, u32)>),
    Large(Box<PresenceCounts>),
}

/// user → (name, connections).
type PresenceCounts = HashMap<Arc<str>, (Arc<str>, u32)>;

/// Net presence changes of a room since its last flush: user → (name, joined?).
type PresenceDiff = HashMap<Arc<str>, (Arc<str>, bool)>;

/// Users above which a room's presence is a hash map.
const SMALL_PRESENCE: usize = 8;

impl Default for PresenceTable {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

impl PresenceTable {
    /// Counts one more connection of `user`; returns the user's count.
    fn add(&mut self, user: &Arc<str>, name: &Arc<str>) -> u32 {
        match self {
            Self::Small(list) => {
                if let Some(entry) = list.iter_mut().find(|(u, _, _)| u == user) {
                    entry.2 += 1;
                    return entry.2;
                }
                if list.len() < SMALL_PRESENCE {
                    if list.is_empty() {
                        list.reserve_exact(1);
                    }
                    list.push((user.clone(), name.clone(), 1));
                    return 1;
                }
                let mut map: HashMap<_, _> = std::mem::take(list)
                    .into_iter()
                    .map(|(u, n, c)| (u, (n, c)))
                    .collect();
                map.insert(user.clone(), (name.clone(), 1));
                *self = Self::Large(Box::new(map));
                1
            }
            Self::Large(map) => {
                let entry = map.entry(user.clone()).or_insert_with(|| (name.clone(), 0));
                entry.1 += 1;
                entry.1
            }
        }
    }

    /// Counts one connection fewer of `user`; returns its count left (`None`: it was not there).
    /// A user whose count reaches 0 is removed.
    fn remove(&mut self, user: &Arc<str>) -> Option<u32> {
        match self {
            Self::Small(list) => {
                let pos = list.iter().position(|(u, _, _)| u == user)?;
                let left = list[pos].2.saturating_sub(1);
                list[pos].2 = left;
                if left == 0 {
                    list.swap_remove(pos);
                }
                Some(left)
            }
            Self::Large(map) => {
                let entry = map.get_mut(user)?;
                entry.1 = entry.1.saturating_sub(1);
                let left = entry.1;
                if left == 0 {
                    map.remove(user);
                    // Back to a list once well below the switch (no flapping at the edge).
                    if map.len() <= SMALL_PRESENCE / 2 {
                        let list = std::mem::take(&mut **map)
                            .into_iter()
                            .map(|(u, (n, c))| (u, n, c))
                            .collect();
                        *self = Self::Small(list);
                    }
                }
                Some(left)
            }
        }
    }

    /// Every user present, sorted by id.
    fn entries(&self) -> Vec<PresenceEntry> {
        let entry = |user: &Arc<str>, name: &Arc<str>, conns: u32| PresenceEntry {
            user: user.to_string(),
            name: name.to_string(),
            conns,
        };
        let mut list: Vec<PresenceEntry> = match self {
            Self::Small(list) => list.iter().map(|(u, n, c)| entry(u, n, *c)).collect(),
            Self::Large(map) => map.iter().map(|(u, (n, c))| entry(u, n, *c)).collect(),
        };
        list.sort_by(|a, b| a.user.cmp(&b.user));
        list
    }
}

impl HomeRoom {
    fn new(shard: &Shard, ephemeral: bool) -> Self {
        let cfg = &shard.shared.config;
        Self {
            seq: 0,
            epoch: shard.shared.new_epoch(),
            members: 0,
            max_members: cfg.max_room_members,
            shard_members: vec![0; cfg.shards].into_boxed_slice(),
            key_counts: [0; FRAME_KEYS],
            presence: PresenceTable::default(),
            pending_diff: None,
            presence_listed: false,
            ephemeral,
            presence_on: true,
            history_on: true,
            traffic: None,
        }
    }

    /// A persistent room's current settings (they may have changed since the last join).
    fn apply(&mut self, settings: &RoomSettings) {
        self.ephemeral = false;
        self.max_members = settings.max_members;
        self.presence_on = settings.presence;
        self.history_on = settings.history;
        if !settings.history
            && let Some(traffic) = self.traffic.as_mut()
        {
            traffic.history.clear();
        }
        if !settings.presence {
            self.pending_diff = None;
        }
    }

    /// The shards that hold members: where a delivery goes.
    fn member_shards(&self) -> Vec<usize> {
        self.shard_members
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| s)
            .collect()
    }

    /// Records a presence change; true when the room must be listed for the next flush.
    fn note_presence(&mut self, user: &Arc<str>, name: &Arc<str>, joined: bool) -> bool {
        let diff = self.pending_diff.get_or_insert_default();
        match diff.get(user) {
            // A join and a leave within one window cancel out.
            Some((_, was_joined)) if *was_joined != joined => {
                diff.remove(user);
            }
            _ => {
                diff.insert(user.clone(), (name.clone(), joined));
            }
        }
        !std::mem::replace(&mut self.presence_listed, true)
    }

    /// The messages kept, oldest first.
    fn history(&self) -> impl Iterator<Item = &Arc<StoredMessage>> {
        self.traffic.iter().flat_map(|t| t.history.iter())
    }

    /// Drops what the room's bounds no longer allow at `now` (before answering from history).
    fn prune_history(&mut self, now: u64, bounds: RoomBounds) {
        if let Some(traffic) = self.traffic.as_mut() {
            traffic.history.prune(bounds, now);
        }
    }
}

/// The bounds of one room's history.
fn room_bounds(shard: &Shard) -> RoomBounds {
    let cfg = &shard.shared.config;
    RoomBounds {
        max_len: cfg.history_size,
        max_bytes: cfg.history_room_bytes,
        ttl_ms: u64::try_from(cfg.history_ttl.as_millis()).unwrap_or(u64::MAX),
    }
}

/// This shard's share of `history_total_bytes`.
fn shard_budget(shard: &Shard) -> usize {
    let cfg = &shard.shared.config;
    cfg.history_total_bytes / cfg.shards.max(1)
}

/// Drops the oldest messages of the rooms homed here while the shard is past its share of
/// `history_total_bytes`.
fn enforce_budget(shard: &Shard, rooms: &mut HashMap<RoomId, Box<HomeRoom>>) {
    let budget = shard_budget(shard);
    let ledger = &shard.history_ledger;
    if ledger.used() <= budget {
        return;
    }
    let dropped = shard
        .eviction
        .borrow_mut()
        .drop_oldest(rooms, |_| ledger.used() > budget);
    shard
        .shared
        .metrics
        .history_evicted
        .fetch_add(dropped as u64, Ordering::Relaxed);
}

/// Drops every message older than `history_ttl`, in every room homed here, idle or not (the
/// ticker calls this), and publishes the shard's history bytes.
pub(crate) fn expire_history(shard: &Rc<Shard>) {
    let ttl = room_bounds(shard).ttl_ms;
    let now = now_ms();
    let mut rooms = shard.home.borrow_mut();
    shard
        .eviction
        .borrow_mut()
        .drop_oldest(&mut *rooms, |oldest| now.saturating_sub(oldest) > ttl);
    drop(rooms);
    shard
        .shared
        .metrics
        .history_bytes(shard.id, shard.history_ledger.used());
}

fn to_conn(shard: &Rc<Shard>, conn: ConnId, msg: ShardMsg) {
    shard.dispatch(shard_of(conn), msg);
}

/// The owner of `room` when it is a personal room.
fn owner_of(room: &RoomId) -> Option<&str> {
    room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX)
}

/// The owner of personal room `room`, when it is one and its owner is connected.
fn online_owner(shard: &Shard, room: &RoomId) -> Option<OnlineUser> {
    owner_of(room).and_then(|owner| shard.shared.online_user(owner))
}

/// Brings up the state of personal room `room` if its owner is connected (the owner's last leave
/// drops it again, see [`leave`]); true when the room has state afterwards.
fn bring_up_personal(
    shard: &Shard,
    rooms: &mut HashMap<RoomId, Box<HomeRoom>>,
    room: &RoomId,
) -> bool {
    if rooms.contains_key(room) {
        return true;
    }
    if room.is_personal() && online_owner(shard, room).is_some() {
        rooms.insert(room.clone(), Box::new(HomeRoom::new(shard, true)));
        return true;
    }
    false
}

/// A room's presence, sorted by user: its counted members, plus a personal room's connected owner.
fn presence_entries(
    home: Option<&HomeRoom>,
    owner: Option<(&str, &OnlineUser)>,
) -> Vec<PresenceEntry> {
    let mut list = home.map(|h| h.presence.entries()).unwrap_or_default();
    if let Some((user, online)) = owner {
        list.push(PresenceEntry {
            user: user.to_owned(),
            name: online.name.to_string(),
            conns: online.conns,
        });
        list.sort_by(|a, b| a.user.cmp(&b.user));
    }
    list
}

/// `room`'s presence as its home answers it.
fn presence_now(shard: &Shard, room: &RoomId, home: Option<&HomeRoom>) -> Vec<PresenceEntry> {
    let online = online_owner(shard, room);
    let owner = owner_of(room).zip(online.as_ref());
    presence_entries(home, owner)
}

/// Hands one room's frames to every shard in `targets`.
fn fan_out(shard: &Rc<Shard>, targets: Vec<usize>, delivery: Delivery) {
    let delivery = Arc::new(delivery);
    for target in targets {
        shard.dispatch(target, ShardMsg::Deliver(delivery.clone()));
    }
}

/// The parts of a join that are not the room and the user.
#[derive(Debug, Clone)]
pub(crate) struct JoinRequest {
    pub(crate) conn: ConnId,
    pub(crate) key: FrameKey,
    pub(crate) id: Option<u64>,
    pub(crate) initial: bool,
    pub(crate) already: bool,
    pub(crate) resume: Option<ResumeFrom>,
    pub(crate) settings: Option<RoomSettings>,
}

/// Where a resuming client left a room (SPEC §7).
#[derive(Debug, Clone)]
pub(crate) struct ResumeFrom {
    /// The last `seq` the client saw.
    pub(crate) seq: u64,
    /// The `epoch` it saw it in.
    pub(crate) epoch: String,
    /// For a room the new connection already joined: its join `seq`, past which it is already
    /// receiving live messages (so recovery stops there: no duplicate).
    pub(crate) upto: Option<u64>,
    /// Whether the session was found, unexpired and of the same user.
    pub(crate) valid: bool,
}

/// The answer to a resuming join.
#[derive(Debug)]
pub(crate) enum Recovery {
    /// Every missed message, in order.
    Recovered(Vec<Arc<StoredMessage>>),
    /// History no longer covers the gap, or the epoch differs: the client must reload.
    Lost,
}

pub(crate) fn join(
    shard: &Rc<Shard>,
    room: &RoomId,
    user: &Arc<str>,
    name: &Arc<str>,
    request: JoinRequest,
) {
    let JoinRequest {
        conn,
        key,
        id,
        initial,
        already,
        resume,
        settings,
    } = request;
    let cfg = &shard.shared.config;
    let fail = |code: ErrorCode, message: &'static str| ShardMsg::JoinFailed {
        room: room.clone(),
        conn,
        id,
        initial,
        code,
        message,
    };
    let mut rooms = shard.home.borrow_mut();
    if owner_of(room) == Some(&**user) {
        // The owner is never counted here (see the module doc). A join whose answer tells the
        // client the room's `seq` and `epoch` (an explicit join, a resume) brings the room up, so
        // that they stay true; the initial join at connect does not.
        if id.is_some() || resume.is_some() {
            bring_up_personal(shard, &mut rooms, room);
        }
        let home = rooms.get_mut(room);
        let presence = if id.is_some() {
            presence_now(shard, room, home.as_ref().map(|h| &***h))
        } else {
            Vec::new()
        };
        let (seq, epoch, recovery) = match home {
            Some(home) => (
                home.seq,
                shard.shared.epoch_name(home.epoch),
                resume.map(|from| recover(home, &from, shard)),
            ),
            // No state: nothing was ever published while the owner has been connected.
            None => (0, Arc::from(""), None),
        };
        drop(rooms);
        let reply = Joined {
            room: room.clone(),
            conn,
            id,
            initial,
            seq,
            epoch,
            presence,
            recovery,
        };
        to_conn(shard, conn, ShardMsg::Joined(Box::new(reply)));
        return;
    }
    if !rooms.contains_key(room) {
        let open = if room.is_personal() {
            // Another user's personal room (an admin: checked before the join was sent) exists
            // while its owner is connected.
            bring_up_personal(shard, &mut rooms, room)
        } else {
            settings.is_some() || cfg.implicit_rooms
        };
        if !open {
            drop(rooms);
            to_conn(shard, conn, fail(ErrorCode::NotFound, "no such room"));
            return;
        }
        rooms
            .entry(room.clone())
            .or_insert_with(|| Box::new(HomeRoom::new(shard, true)));
    }
    let Some(home) = rooms.get_mut(room) else {
        return;
    };
    if let Some(settings) = &settings {
        home.apply(settings);
    }
    if !already {
        if home.members >= home.max_members {
            shard
                .shared
                .metrics
                .room_full
                .fetch_add(1, Ordering::Relaxed);
            let empty = home.members == 0;
            if empty && home.ephemeral {
                rooms.remove(room);
            }
            drop(rooms);
            to_conn(shard, conn, fail(ErrorCode::RoomFull, "room is full"));
            return;
        }
        home.members += 1;
        home.shard_members[shard_of(conn)] += 1;
        home.key_counts[key.index()] += 1;
        let conns = home.presence.add(user, name);
        // A personal room has one possible member: its diffs would tell the owner only about
        // itself, so none are sent (the `presence` query still answers).
        if conns == 1
            && !room.is_personal()
            && home.presence_on
            && home.note_presence(user, name, true)
        {
            shard.presence_dirty.borrow_mut().push(room.clone());
        }
    }
    let recovery = resume.map(|from| recover(home, &from, shard));
    let presence = if id.is_some() {
        presence_now(shard, room, Some(home))
    } else {
        Vec::new()
    };
    let reply = ShardMsg::Joined(Box::new(Joined {
        room: room.clone(),
        conn,
        id,
        initial,
        seq: home.seq,
        epoch: shard.shared.epoch_name(home.epoch),
        presence,
        recovery,
    }));
    drop(rooms);
    to_conn(shard, conn, reply);
}

/// The messages a resuming client missed in `home`, if history still holds all of them.
fn recover(home: &mut HomeRoom, from: &ResumeFrom, shard: &Shard) -> Recovery {
    if !from.valid || *from.epoch != *shard.shared.epoch_name(home.epoch) {
        return Recovery::Lost;
    }
    let first = from.seq.saturating_add(1);
    let last = from.upto.unwrap_or(home.seq).min(home.seq);
    if first > last {
        return Recovery::Recovered(Vec::new());
    }
    home.prune_history(now_ms(), room_bounds(shard));
    match home.history().next() {
        Some(oldest) if oldest.seq <= first => {
            let missed: Vec<Arc<StoredMessage>> = home
                .history()
                .filter(|m| m.seq >= first && m.seq <= last)
                .cloned()
                .collect();
            // What is recovered goes to the connection's queue at once: more than half its bound
            // would close it as a slow consumer, so the client is told to reload instead.
            let bytes: usize = missed.iter().map(|m| m.cost()).sum();
            if bytes > shard.shared.config.max_queued_bytes / 2 {
                Recovery::Lost
            } else {
                Recovery::Recovered(missed)
            }
        }
        _ => Recovery::Lost,
    }
}

pub(crate) fn leave(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    user: &Arc<str>,
    name: &Arc<str>,
    key: FrameKey,
) {
    let mut rooms = shard.home.borrow_mut();
    let Some(home) = rooms.get_mut(room) else {
        return;
    };
    let owner = owner_of(room);
    // A personal room's owner was never counted (see the module doc).
    if owner != Some(&**user) {
        home.members = home.members.saturating_sub(1);
        let s = &mut home.shard_members[shard_of(conn)];
        *s = s.saturating_sub(1);
        let k = &mut home.key_counts[key.index()];
        *k = k.saturating_sub(1);
        if home.presence.remove(user) == Some(0)
            && owner.is_none()
            && home.presence_on
            && home.note_presence(user, name, false)
        {
            shard.presence_dirty.borrow_mut().push(room.clone());
        }
    }
    // A personal room lasts while its owner is connected (the connection that closed was
    // released before its leaves were sent).
    if home.members == 0
        && home.ephemeral
        && owner.is_none_or(|o| shard.shared.online_user(o).is_none())
    {
        rooms.remove(room);
    }
}

pub(crate) fn publish(
    shard: &Rc<Shard>,
    room: RoomId,
    conn: ConnId,
    user: &Arc<str>,
    name: &Arc<str>,
    data: Value,
    id: Option<u64>,
) {
    match sequence(shard, room, user, name, data) {
        Ok(seq) => {
            if id.is_some() {
                shard.reply(conn, Reply::Published { id, seq });
            }
        }
        Err((code, message)) => shard.reply(conn, Reply::Error { id, code, message }),
    }
}

/// A publish from the HTTP API: a persistent room that has no member yet is brought up here.
pub(crate) fn publish_external(
    shard: &Rc<Shard>,
    room: RoomId,
    user: &Arc<str>,
    name: &Arc<str>,
    data: Value,
    settings: Option<RoomSettings>,
) -> Result<u64, ErrorCode> {
    {
        let mut rooms = shard.home.borrow_mut();
        match (rooms.get_mut(&room), &settings) {
            (Some(home), Some(s)) => home.apply(s),
            (None, Some(s)) => {
                let mut home = Box::new(HomeRoom::new(shard, false));
                home.apply(s);
                rooms.insert(room.clone(), home);
            }
            // A personal room whose owner is offline: the message has nobody to reach, and
            // there is no room to keep history in.
            (None, None) => {
                if !bring_up_personal(shard, &mut rooms, &room) {
                    return Ok(0);
                }
            }
            (Some(_), None) => {}
        }
    }
    sequence(shard, room, user, name, data).map_err(|(code, _)| code)
}

/// Assigns the next `seq`, keeps history, fans out: the one place a message enters a room.
fn sequence(
    shard: &Rc<Shard>,
    room: RoomId,
    user: &Arc<str>,
    name: &Arc<str>,
    data: Value,
) -> Result<u64, (ErrorCode, &'static str)> {
    let cfg = &shard.shared.config;
    let now = now_ms();
    let mut rooms = shard.home.borrow_mut();
    // A personal room's owner may publish before anything brought the room up.
    let online = online_owner(shard, &room);
    if online.is_some() && !rooms.contains_key(&room) {
        rooms.insert(room.clone(), Box::new(HomeRoom::new(shard, true)));
    }
    let Some(home) = rooms.get_mut(&room) else {
        return Err((ErrorCode::NotJoined, "not joined to this room"));
    };
    let traffic = home.traffic.get_or_insert_with(|| {
        Box::new(Traffic {
            history: RoomHistory::new(shard.history_ledger.clone()),
            generation: shard.next_history_generation(),
            publish_bucket: Bucket::new(&cfg.publish_per_room, now),
        })
    });
    if traffic.publish_bucket.attempt(&cfg.publish_per_room, now) != Verdict::Allow {
        drop(rooms);
        shard.shared.metrics.rate_limited("publish_per_room");
        return Err((ErrorCode::RateLimited, "room publish rate exceeded"));
    }
    home.seq += 1;
    let record = MessageRecord {
        room: room.clone(),
        seq: home.seq,
        from: Some(user.to_string()),
        name: name.to_string(),
        ts: now,
        data,
    };
    // The owner's connections are not counted by wire format: a personal room's message is
    // encoded in every format (such messages are rare; an idle user costs nothing instead).
    let in_use = if room.is_personal() {
        [1; FRAME_KEYS]
    } else {
        home.key_counts
    };
    let keep = cfg.history_size > 0 && home.history_on;
    let (frames, stored) = Frames::message(
        &record,
        &in_use,
        cfg.compression_threshold,
        &mut shard.compressor.borrow_mut(),
        keep,
    );
    // The decoded value is not kept: history holds the encoded message.
    drop(record);
    let mut listing = None;
    if let (Some(stored), Some(traffic)) = (stored, home.traffic.as_mut())
        && traffic
            .history
            .push(Arc::new(stored), room_bounds(shard), now)
    {
        listing = traffic
            .history
            .oldest_ts()
            .map(|ts| (traffic.generation, ts));
    }
    let seq = home.seq;
    let mut targets = home.member_shards();
    if let Some(owner) = online {
        targets.extend(owner.shards);
        targets.sort_unstable();
        targets.dedup();
    }
    if let Some((generation, ts)) = listing {
        shard.eviction.borrow_mut().track(
            room.clone(),
            generation,
            ts,
            &mut *rooms,
            &shard.history_ledger,
        );
    }
    enforce_budget(shard, &mut rooms);
    drop(rooms);
    fan_out(
        shard,
        targets,
        Delivery {
            room,
            frames,
            sheddable: false,
        },
    );
    Ok(seq)
}

/// A room's presence for the HTTP API (empty when nobody is in it).
pub(crate) fn presence_of(shard: &Rc<Shard>, room: &RoomId) -> Vec<PresenceEntry> {
    presence_now(shard, room, shard.home.borrow().get(room).map(|h| &**h))
}

/// Forgets a deleted room. Its members were kicked first; their leaves that arrive later find
/// nothing and change nothing.
pub(crate) fn drop_room(shard: &Rc<Shard>, room: &RoomId) {
    shard.home.borrow_mut().remove(room);
}

pub(crate) fn presence_query(shard: &Rc<Shard>, room: &RoomId, conn: ConnId, id: Option<u64>) {
    let presence = presence_now(shard, room, shard.home.borrow().get(room).map(|h| &**h));
    shard.reply(conn, Reply::Presence { id, presence });
}

pub(crate) fn history_query(
    shard: &Rc<Shard>,
    room: &RoomId,
    conn: ConnId,
    id: Option<u64>,
    since: u64,
    limit: u64,
) {
    let now = now_ms();
    let mut rooms = shard.home.borrow_mut();
    // The answer names the epoch: a personal room is brought up so that it stays true.
    bring_up_personal(shard, &mut rooms, room);
    let reply = match rooms.get_mut(room) {
        Some(home) => {
            home.prune_history(now, room_bounds(shard));
            let messages = home
                .history()
                .filter(|m| m.seq > since)
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .cloned()
                .collect();
            Reply::History {
                id,
                messages,
                epoch: shard.shared.epoch_name(home.epoch),
            }
        }
        None => Reply::History {
            id,
            messages: Vec::new(),
            epoch: shard.shared.epoch_name(shard.shared.new_epoch()),
        },
    };
    drop(rooms);
    shard.reply(conn, reply);
}

/// Sends the coalesced presence diffs of rooms homed here.
pub(crate) fn flush_presence(shard: &Rc<Shard>) {
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
    let dirty: Vec<RoomId> = std::mem::take(&mut *shard.presence_dirty.borrow_mut());
    if dirty.is_empty() {
        return;
    }
    let cfg = &shard.shared.config;
    let mut sent: Vec<&RoomId> = Vec::new();
    for room in &dirty {
        if sent.contains(&room) {
            continue;
        }
        sent.push(room);
        let mut rooms = shard.home.borrow_mut();
        let Some(home) = rooms.get_mut(room) else {
            continue;
        };
        home.presence_listed = false;
        // `take`: an idle room keeps no table.
        let Some(diff) = home.pending_diff.take().filter(|d| !d.is_empty()) else {
            continue;
        };
        let mut joined = Vec::new();
        let mut left = Vec::new();
        for (user, (name, is_join)) in *diff {
            let entry = PresenceUser {
                user: user.to_string(),
                name: name.to_string(),
            };
            if is_join {
                joined.push(entry);
            } else {
                left.push(entry);
            }
        }
        joined.sort_by(|a, b| a.user.cmp(&b.user));
        left.sort_by(|a, b| a.user.cmp(&b.user));
        let push = Push::Presence {
            room: room.as_str(),
            joined: &joined,
            left: &left,
        };
        let frames = Frames::push(
            &push,
            || socketio::encode_presence_event(room.as_str(), &joined, &left),
            &home.key_counts,
            cfg.compression_threshold,
            &mut shard.compressor.borrow_mut(),
        );
        let targets = home.member_shards();
        drop(rooms);
        fan_out(
            shard,
            targets,
            Delivery {
                room: room.clone(),
                frames,
                sheddable: true,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(table: &PresenceTable) -> Vec<(String, u32)> {
        table
            .entries()
            .into_iter()
            .map(|e| (e.user, e.conns))
            .collect()
    }

    #[test]
    fn presence_table_counts_across_the_list_and_map_switch() {
        let mut table = PresenceTable::default();
        let ids: Vec<Arc<str>> = (0..12).map(|i| Arc::from(format!("u{i:02}"))).collect();
        let name: Arc<str> = Arc::from("n");
        for id in &ids {
            assert_eq!(table.add(id, &name), 1);
        }
        assert_eq!(table.add(&ids[3], &name), 2);
        assert!(matches!(table, PresenceTable::Large(_)));
        assert_eq!(table.remove(&ids[3]), Some(1));
        for id in &ids[5..] {
            assert_eq!(table.remove(id), Some(0));
        }
        assert_eq!(table.remove(&ids[11]), None);
        // Five users left: above half the switch, still a map.
        assert!(matches!(table, PresenceTable::Large(_)));
        assert_eq!(table.remove(&ids[4]), Some(0));
        assert!(matches!(table, PresenceTable::Small(_)));
        assert_eq!(
            users(&table),
            [("u00", 1), ("u01", 1), ("u02", 1), ("u03", 1)].map(|(u, c)| (u.to_owned(), c))
        );
        assert_eq!(table.add(&ids[0], &name), 2);
        assert_eq!(table.remove(&ids[0]), Some(1));
    }
}
