//! A shard: one thread, one monoio runtime, its own listener on the shared port, and everything
//! it owns (connections, its part of each room's members, the rooms homed on it). Shards talk only
//! through their mailboxes; state shared by all of them is connect-time bookkeeping in `Shared`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monoio::net::TcpStream;

use protocol::compression::{Compressor, DEFAULT_LEVEL, Decompressor};
use protocol::envelope::{PresenceEntry, RoomId, Value};
use protocol::{CloseCode, ErrorCode};

use crate::auth::Authenticator;
use crate::config::EngineConfig;
use crate::conn::{Conn, ConnId, shard_of};
use crate::frames::{FrameKey, Frames};
use crate::history::{EvictionOrder, HistoryLedger, StoredMessage};
use crate::home::{HomeRoom, Recovery, ResumeFrom};
use crate::limits::Bucket;
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::rooms::{Answer, Countdown, RoomPolicy, RoomSettings};
use crate::sys::ReadySet;
use crate::{HttpRoutes, now_ms};

/// A message between shards.
pub(crate) enum ShardMsg {
    /// To a room's home: count a connection in.
    Join {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        key: FrameKey,
        id: Option<u64>,
        initial: bool,
        already: bool,
        resume: Option<ResumeFrom>,
        /// A persistent room's settings (None for ephemeral and personal rooms).
        settings: Option<RoomSettings>,
    },
    /// To a room's home: count a connection out.
    Leave {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        key: FrameKey,
    },
    /// To a room's home: sequence and fan out.
    Publish {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        id: Option<u64>,
    },
    /// To a room's home.
    PresenceQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
    },
    /// To a room's home.
    HistoryQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        since: u64,
        limit: u64,
    },
    /// To a connection's shard: the join was counted.
    Joined(Box<Joined>),
    /// To a connection's shard: the join was refused.
    JoinFailed {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        initial: bool,
        code: ErrorCode,
        message: &'static str,
    },
    /// To every shard with members: a message or presence diff for a room.
    Deliver(Arc<Delivery>),
    /// To a connection's shard: an answer to one request.
    Reply { conn: ConnId, reply: Reply },
    /// To a connection's shard: close it.
    Close { conn: ConnId, code: CloseCode },
    /// To every shard: close the connections of a user (of one session only, when given).
    CloseAuthorized {
        user: Arc<str>,
        session: Option<Arc<str>>,
        code: CloseCode,
    },
    /// To every shard: remove the connections of `user` (every user when None) from `room` and
    /// send them `kicked`.
    Kick {
        room: RoomId,
        user: Option<Arc<str>>,
        reason: &'static str,
        done: Arc<Countdown>,
    },
    /// To every shard: ask the policy again for every connection in `room` (its permission
    /// changed); those denied are kicked, the publish right of the others is updated.
    Reauthorize { room: RoomId, done: Arc<Countdown> },
    /// To every shard: ask the policy again for every room each connection of `user` holds (the
    /// user lost the admin role).
    ReauthorizeUser {
        user: Arc<str>,
        done: Arc<Countdown>,
    },
    /// To a room's home: forget the room (deleted), history included.
    DropRoom { room: RoomId, done: Arc<Countdown> },
    /// To a room's home: a publish from outside a connection (the HTTP API).
    PublishExternal {
        room: RoomId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        settings: Option<RoomSettings>,
        answer: Arc<Answer<Result<u64, ErrorCode>>>,
    },
    /// To a room's home: its presence, for the HTTP API.
    PresenceExternal {
        room: RoomId,
        answer: Arc<Answer<Vec<PresenceEntry>>>,
    },
    /// Stop accepting, close every connection with 1001, exit.
    Shutdown,
}

/// A counted join, answered to the connection's shard.
pub(crate) struct Joined {
    pub(crate) room: RoomId,
    pub(crate) conn: ConnId,
    pub(crate) id: Option<u64>,
    pub(crate) initial: bool,
    /// The room's `seq` when the join was counted.
    pub(crate) seq: u64,
    pub(crate) epoch: Arc<str>,
    pub(crate) presence: Vec<PresenceEntry>,
    /// For a join made by `resume`: the missed messages, or that they are lost.
    pub(crate) recovery: Option<Recovery>,
}

/// A room's frames for every wire format in use.
pub(crate) struct Delivery {
    pub(crate) room: RoomId,
    pub(crate) frames: Frames,
    /// A presence diff: shed for connections already falling behind (SPEC §6).
    pub(crate) sheddable: bool,
}

/// An answer computed on a room's home, encoded on the connection's shard in its format.
pub(crate) enum Reply {
    Published {
        id: Option<u64>,
        seq: u64,
    },
    Presence {
        id: Option<u64>,
        presence: Vec<PresenceEntry>,
    },
    History {
        id: Option<u64>,
        messages: Vec<Arc<StoredMessage>>,
        epoch: Arc<str>,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: &'static str,
    },
}

/// Connect-time bookkeeping of one IP group ([`crate::net::ip_group`]): its admitted
/// WebSockets, its connections not yet authenticated, and its connect-rate bucket. An entry that
/// says nothing a new one would not (no connection, a full bucket) is dropped by [`Shared::sweep_ips`]
/// or when its last connection ends.
#[derive(Debug)]
struct IpState {
    conns: u32,
    pending: u32,
    bucket: Bucket,
}

impl IpState {
    fn new(spec: &crate::config::RateSpec, now_ms: u64) -> Self {
        Self {
            conns: 0,
            pending: 0,
            bucket: Bucket::new(spec, now_ms),
        }
    }

    fn is_idle(&self, spec: &crate::config::RateSpec, now_ms: u64) -> bool {
        self.conns == 0 && self.pending == 0 && self.bucket.is_full(spec, now_ms)
    }
}

/// A connection counted against `max_pending_per_ip` until it becomes an authenticated WebSocket
/// (or ends): dropping the slot gives it back.
pub(crate) struct PendingSlot {
    shared: Arc<Shared>,
    group: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.shared.pending_leave(self.group);
    }
}

const STRIPES: usize = 16;

/// State every shard reads: configuration, services, mailboxes, and the connect-time maps
/// (per-user and per-IP connection counts). The maps are striped mutexes touched at connect and
/// disconnect, and by a personal room's home (which learns its owner's connections there), never
/// per message of any other room.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) routes: Arc<dyn HttpRoutes>,
    pub(crate) policy: Arc<dyn RoomPolicy>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) mailboxes: Vec<Mailbox<ShardMsg>>,
    users: Vec<Mutex<HashMap<Arc<str>, UserConns>>>,
    ips: Vec<Mutex<HashMap<IpAddr, IpState>>>,
    /// Closed sessions that may be resumed: session → (user, expiry in ms).
    resumable: Vec<Mutex<ResumableSessions>>,
    pub(crate) shutting_down: AtomicBool,
    /// Distinguishes room epochs across restarts of this process.
    pub(crate) instance: String,
    pub(crate) epoch_counter: AtomicU64,
}

/// One user's live connections (oldest first) and name. Most users hold one connection, kept in
/// the map's slot itself (24 bytes, no allocation); more move to a box.
enum UserConns {
    One { conn: ConnId, name: Arc<str> },
    Many(Box<ManyConns>),
}

struct ManyConns {
    name: Arc<str>,
    conns: Vec<ConnId>,
}

impl UserConns {
    fn name(&self) -> &Arc<str> {
        match self {
            Self::One { name, .. } => name,
            Self::Many(many) => &many.name,
        }
    }

    fn conns(&self) -> &[ConnId] {
        match self {
            Self::One { conn, .. } => std::slice::from_ref(conn),
            Self::Many(many) => &many.conns,
        }
    }

    fn push(&mut self, conn: ConnId) {
        match self {
            Self::One { conn: first, name } => {
                *self = Self::Many(Box::new(ManyConns {
                    name: name.clone(),
                    conns: vec![*first, conn],
                }));
            }
            Self::Many(many) => many.conns.push(conn),
        }
    }

    /// Removes `conn`; true when no connection is left.
    fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            Self::One { conn: only, .. } => *only == conn,
            Self::Many(many) => {
                many.conns.retain(|c| *c != conn);
                match many.conns.as_slice() {
                    [] => true,
                    [last] => {
                        *self = Self::One {
                            conn: *last,
                            name: many.name.clone(),
                        };
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// A connected user as its personal room's home sees it (SPEC §5: the owner is always in the
/// room while connected, so the home keeps no count of its own for the owner).
pub(crate) struct OnlineUser {
    pub(crate) name: Arc<str>,
    pub(crate) conns: u32,
    /// The shards holding its connections, ascending, without repeats.
    pub(crate) shards: Vec<usize>,
}

/// Closed sessions that may be resumed: session id → (user id, expiry in epoch ms).
type ResumableSessions = HashMap<Box<str>, (Arc<str>, u64)>;

/// Why a connect was refused by the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapRefusal {
    TooManyForIp,
    TooManyForUser,
}

/// A hash that is the same on every shard and every run (SipHash with fixed keys).
fn hash<T: std::hash::Hash + ?Sized>(key: &T) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    // The high half is well mixed and fits `usize` everywhere.
    usize::try_from(h >> 32).unwrap_or_default()
}

fn stripe<T: std::hash::Hash + ?Sized>(key: &T) -> usize {
    hash(key) % STRIPES
}

impl Shared {
    pub(crate) fn new(
        config: EngineConfig,
        auth: Arc<dyn Authenticator>,
        routes: Arc<dyn HttpRoutes>,
        policy: Arc<dyn RoomPolicy>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shards = config.shards;
        let time = now_ms().to_le_bytes();
        let pid = std::process::id().to_le_bytes();
        let nonce: [u8; 6] = std::array::from_fn(|i| time[i] ^ pid[i % 4]);
        Self {
            config,
            auth,
            routes,
            policy,
            metrics,
            mailboxes: (0..shards).map(|_| Mailbox::new()).collect(),
            users: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            ips: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            resumable: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            shutting_down: AtomicBool::new(false),
            instance: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            epoch_counter: AtomicU64::new(0),
        }
    }

    pub(crate) fn send(&self, shard: usize, msg: ShardMsg) {
        if let Some(mailbox) = self.mailboxes.get(shard) {
            self.metrics.queue_depth(shard, 1);
            mailbox.push(msg);
        }
    }

    /// The shard that sequences `room` (its "home"): a fixed hash of the id.
    pub(crate) fn home_of(&self, room: &RoomId) -> usize {
        hash(room.as_str()) % self.config.shards
    }

    /// Runs `f` on the stripe of the per-IP table that holds `group`, keeping the entries gauge.
    fn with_ips<R>(&self, group: IpAddr, f: impl FnOnce(&mut HashMap<IpAddr, IpState>) -> R) -> R {
        let mut ips = self.ips[stripe(&group)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = ips.len();
        let result = f(&mut ips);
        self.count_ip_entries(before, ips.len());
        result
    }

    fn count_ip_entries(&self, before: usize, after: usize) {
        let delta = i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
        if delta != 0 {
            self.metrics.ip_entries.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Counts a connection from `ip` that is not yet an authenticated WebSocket; `None` when its
    /// group already has `max_pending_per_ip` of them.
    pub(crate) fn pending_enter(self: &Arc<Self>, ip: IpAddr) -> Option<PendingSlot> {
        let group = crate::net::ip_group(ip);
        let spec = &self.config.connect_per_ip;
        let max = self.config.max_pending_per_ip;
        let admitted = self.with_ips(group, |ips| {
            let state = ips
                .entry(group)
                .or_insert_with(|| IpState::new(spec, now_ms()));
            if state.pending >= max {
                return false;
            }
            state.pending += 1;
            true
        });
        if !admitted {
            return None;
        }
        self.metrics
            .pending_connections
            .fetch_add(1, Ordering::Relaxed);
        Some(PendingSlot {
            shared: self.clone(),
            group,
        })
    }

    fn pending_leave(&self, group: IpAddr) {
        let spec = &self.config.connect_per_ip;
        self.metrics
            .pending_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.with_ips(group, |ips| {
            if let Some(state) = ips.get_mut(&group) {
                state.pending = state.pending.saturating_sub(1);
                if state.is_idle(spec, now_ms()) {
                    ips.remove(&group);
                }
            }
        });
    }

    /// Drops the entries of one stripe of the per-IP table that carry nothing (no connection, a
    /// full bucket): a refused upgrade leaves its spent bucket behind until it has refilled.
    pub(crate) fn sweep_ips(&self, stripe_index: usize) {
        let spec = &self.config.connect_per_ip;
        let now = now_ms();
        if let Some(ips) = self.ips.get(stripe_index % STRIPES) {
            let mut ips = ips
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = ips.len();
            ips.retain(|_, state| !state.is_idle(spec, now));
            self.count_ip_entries(before, ips.len());
        }
    }

    /// The connect-rate check of SPEC §9 (before anything else at upgrade).
    pub(crate) fn check_connect_rate(&self, ip: IpAddr) -> bool {
        let now = now_ms();
        let group = crate::net::ip_group(ip);
        let spec = &self.config.connect_per_ip;
        self.with_ips(group, |ips| {
            let state = ips.entry(group).or_insert_with(|| IpState::new(spec, now));
            state.bucket.attempt(spec, now) == crate::limits::Verdict::Allow
        })
    }

    /// Counts a new connection against the per-IP and per-user caps. Returns the connection to
    /// replace (close with 4509) under `close_oldest`.
    pub(crate) fn admit(
        &self,
        ip: IpAddr,
        user: &Arc<str>,
        name: &Arc<str>,
        conn: ConnId,
    ) -> Result<Option<ConnId>, CapRefusal> {
        let group = crate::net::ip_group(ip);
        let spec = &self.config.connect_per_ip;
        let max_per_ip = self.config.max_connections_per_ip;
        self.with_ips(group, |ips| {
            let state = ips
                .entry(group)
                .or_insert_with(|| IpState::new(spec, now_ms()));
            if state.conns >= max_per_ip {
                return Err(CapRefusal::TooManyForIp);
            }
            state.conns += 1;
            Ok(())
        })?;
        let mut users = self.users[stripe(&**user)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held = users.get(user).map_or(0, |e| e.conns().len());
        let mut replaced = None;
        if held >= self.config.max_connections_per_user as usize {
            match self.config.session_conflict {
                crate::config::ConflictPolicy::RejectNew => {
                    drop(users);
                    self.release_ip(ip);
                    return Err(CapRefusal::TooManyForUser);
                }
                crate::config::ConflictPolicy::CloseOldest => {
                    if let Some(entry) = users.get_mut(user) {
                        let oldest = entry.conns()[0];
                        replaced = Some(oldest);
                        if entry.remove(oldest) {
                            users.remove(user);
                        }
                    }
                }
            }
        }
        match users.get_mut(user) {
            Some(entry) => entry.push(conn),
            None => {
                users.insert(
                    user.clone(),
                    UserConns::One {
                        conn,
                        name: name.clone(),
                    },
                );
            }
        }
        Ok(replaced)
    }

    fn release_ip(&self, ip: IpAddr) {
        let group = crate::net::ip_group(ip);
        let spec = &self.config.connect_per_ip;
        self.with_ips(group, |ips| {
            if let Some(state) = ips.get_mut(&group) {
                state.conns = state.conns.saturating_sub(1);
                if state.is_idle(spec, now_ms()) {
                    ips.remove(&group);
                }
            }
        });
    }

    /// Undoes [`Shared::admit`] when a connection ends.
    pub(crate) fn release(&self, ip: IpAddr, user: &Arc<str>, conn: ConnId) {
        self.release_ip(ip);
        let mut users = self.users[stripe(&**user)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if users.get_mut(user).is_some_and(|entry| entry.remove(conn)) {
            users.remove(user);
        }
    }

    /// `user`'s live connections (oldest first).
    pub(crate) fn user_conns(&self, user: &str) -> Vec<ConnId> {
        let users = self.users[stripe(user)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        users
            .get(user)
            .map(|e| e.conns().to_vec())
            .unwrap_or_default()
    }

    /// `user`'s live connections, for its personal room's home; None when it has none.
    pub(crate) fn online_user(&self, user: &str) -> Option<OnlineUser> {
        let users = self.users[stripe(user)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = users.get(user)?;
        let mut shards: Vec<usize> = entry.conns().iter().map(|c| shard_of(*c)).collect();
        shards.sort_unstable();
        shards.dedup();
        Some(OnlineUser {
            name: entry.name().clone(),
            conns: u32::try_from(entry.conns().len()).unwrap_or(u32::MAX),
            shards,
        })
    }

    /// Remembers a closed session for `resume_ttl`.
    pub(crate) fn store_resumable(&self, session: &str, user: &Arc<str>) {
        let now = now_ms();
        let ttl = u64::try_from(self.config.resume_ttl.as_millis()).unwrap_or(u64::MAX);
        let mut map = self.resumable[stripe(session)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= 1024 {
            map.retain(|_, (_, expires)| *expires > now);
        }
        map.insert(session.into(), (user.clone(), now.saturating_add(ttl)));
    }

    /// Takes a resumable session: true when it exists, is unexpired and belongs to `user`.
    pub(crate) fn take_resumable(&self, session: &str, user: &str) -> bool {
        let mut map = self.resumable[stripe(session)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match map.get(session) {
            Some((owner, expires)) if **owner == *user && *expires > now_ms() => {
                map.remove(session);
                true
            }
            _ => false,
        }
    }

    /// A fresh epoch number, named by [`Shared::epoch_name`].
    pub(crate) fn new_epoch(&self) -> u64 {
        self.epoch_counter.fetch_add(1, Ordering::Relaxed)
    }

    /// An epoch as clients see it: this process's instance, then the number in hex. Rooms keep
    /// the number and name it only in replies (every idle room would carry the string).
    pub(crate) fn epoch_name(&self, epoch: u64) -> Arc<str> {
        Arc::from(format!("{}{epoch:x}", self.instance))
    }
}

/// One shard's own state.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    pub(crate) local_rooms: RefCell<HashMap<RoomId, Vec<Rc<Conn>>>>,
    /// Boxed: the map holds thousands of (personal) rooms, and its spare buckets stay small.
    pub(crate) home: RefCell<HashMap<RoomId, Box<HomeRoom>>>,
    /// The bytes the histories of the rooms homed here hold.
    pub(crate) history_ledger: Rc<HistoryLedger>,
    /// Those rooms by their oldest kept message (TTL and byte budget drop from there).
    pub(crate) eviction: RefCell<EvictionOrder>,
    history_generation: Cell<u64>,
    pub(crate) presence_dirty: RefCell<Vec<RoomId>>,
    next_conn: Cell<u64>,
    pub(crate) compressor: RefCell<Compressor>,
    pub(crate) decompressor: RefCell<Decompressor>,
    buffers: RefCell<Vec<Vec<u8>>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop_waker: RefCell<Option<std::task::Waker>>,
    /// Messages to send once due ([`crate::monotonic_us`]), oldest first: the leaves of
    /// connections dropped abnormally, held for presence's grace (SPEC §6). Sent by [`ticker`].
    pub(crate) delayed: RefCell<std::collections::VecDeque<(u64, usize, ShardMsg)>>,
    /// Connections with frames queued since the last flush, for [`flusher`].
    to_flush: RefCell<Vec<Rc<Conn>>>,
    /// Connections whose flush waits for the write delay, with when it is due
    /// ([`crate::monotonic_us`]); sent by [`deferred_flusher`].
    deferred: RefCell<std::collections::VecDeque<(u64, Rc<Conn>)>>,
    deferred_waker: RefCell<Option<std::task::Waker>>,
    /// The write delay that this shard's load calls for now (see [`Self::probe_load`]), in µs.
    busy_delay_us: Cell<u32>,
    load: RefCell<LoadProbe>,
    flusher_waker: RefCell<Option<std::task::Waker>>,
    /// The WebSocket connections, read by [`reader`] as they turn readable.
    pub(crate) ready_set: ReadySet,
}

/// Size of the buffers a shard lends for reads and writes.
pub(crate) const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse per shard.
const POOLED_BUFFERS: usize = 32;

impl Shard {
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> std::io::Result<Self> {
        let zstd = |e: protocol::compression::ZstdError| std::io::Error::other(e.to_string());
        Ok(Self {
            id,
            shared,
            conns: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            home: RefCell::new(HashMap::new()),
            history_ledger: Rc::new(HistoryLedger::default()),
            eviction: RefCell::new(EvictionOrder::default()),
            history_generation: Cell::new(0),
            presence_dirty: RefCell::new(Vec::new()),
            delayed: RefCell::new(std::collections::VecDeque::new()),
            to_flush: RefCell::new(Vec::new()),
            deferred: RefCell::new(std::collections::VecDeque::new()),
            deferred_waker: RefCell::new(None),
            busy_delay_us: Cell::new(0),
            load: RefCell::new(LoadProbe::default()),
            flusher_waker: RefCell::new(None),
            next_conn: Cell::new(1),
            compressor: RefCell::new(Compressor::new(DEFAULT_LEVEL).map_err(zstd)?),
            decompressor: RefCell::new(Decompressor::new().map_err(zstd)?),
            buffers: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
            stop_waker: RefCell::new(None),
            ready_set: ReadySet::new()?,
        })
    }

    /// A number no other room history of this shard had.
    pub(crate) fn next_history_generation(&self) -> u64 {
        let n = self.history_generation.get();
        self.history_generation.set(n + 1);
        n
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        ((self.id as u64) << 48) | (n & 0xFFFF_FFFF_FFFF)
    }

    pub(crate) fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE))
    }

    pub(crate) fn put_buffer(&self, mut buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        // Oversized buffers (a large write batch) are not kept, nor small ones (a read needs the
        // whole scratch size: a `recv` into no spare room would read as end of stream).
        if pool.len() < POOLED_BUFFERS && (BUFFER_SIZE..=4 * BUFFER_SIZE).contains(&buf.capacity())
        {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Waits until `stream` is readable, then reads what it holds into a pooled buffer (empty at
    /// the end of the stream). No buffer is held while waiting; the caller puts it back. `eager`
    /// tries the read before waiting: worth it where bytes have usually arrived already (a request
    /// head right after the accept), one wasted syscall where they have not.
    pub(crate) async fn read_ready(
        &self,
        stream: &TcpStream,
        eager: bool,
    ) -> std::io::Result<Vec<u8>> {
        let mut wait = !eager;
        loop {
            if wait {
                stream.readable(false).await?;
            }
            wait = true;
            if let Some(read) = self.try_read(stream) {
                return read;
            }
        }
    }

    /// One non-blocking read into a pooled buffer: `None` while nothing has arrived. The caller
    /// puts the buffer back.
    pub(crate) fn try_read(&self, stream: &TcpStream) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = self.take_buffer();
        match crate::sys::recv_now(stream, &mut buf) {
            Ok(_) => Some(Ok(buf)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                self.put_buffer(buf);
                None
            }
            Err(e) => {
                self.put_buffer(buf);
                Some(Err(e))
            }
        }
    }

    /// How long a connection written to less than this ago waits before its next write, in µs:
    /// `write_delay`, or more while the shard is saturated (up to `busy_write_delay`).
    pub(crate) fn write_delay_us(&self) -> u32 {
        let fixed = u32::try_from(self.shared.config.write_delay.as_micros()).unwrap_or(u32::MAX);
        fixed.max(self.busy_delay_us.get())
    }

    /// Holds a listed connection's flush for `wait_us` (see [`deferred_flusher`]).
    pub(crate) fn defer_flush(&self, conn: Rc<Conn>, wait_us: u64) {
        self.shared
            .metrics
            .deferred_flushes
            .fetch_add(1, Ordering::Relaxed);
        let mut deferred = self.deferred.borrow_mut();
        deferred.push_back((crate::monotonic_us() + wait_us, conn));
        if deferred.len() == 1
            && let Some(waker) = self.deferred_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    /// Sets the write delay that the shard's load calls for, at most every [`LOAD_PROBE_US`]:
    /// from the share of wall time that this shard's thread spent running or waiting to run
    /// (`/proc/thread-self/schedstat`). A thread that wants the CPU nearly all the time (≥ 90 %)
    /// is saturated: the delay doubles (from 1 ms, up to `busy_write_delay`), so that frames to a
    /// busy connection leave in fewer, larger writes, which costs the kernel and the clients
    /// less per message. Under 50 % it halves back towards zero, and a pause in flushing resets
    /// it. The demand is smoothed over about four probes. Measured on 2 cores shared with the load
    /// generator: 90–99 % near saturation without the delay, 72–78 % at saturation with it (a
    /// floor of 70 % made the delay flap and lost ~15 % of the peak), ~60 % at a third of the
    /// peak (where the delay stays off).
    /// Costs one `pread` of a procfs file per probe, made only while the shard flushes.
    pub(crate) fn probe_load(&self) {
        let max =
            u32::try_from(self.shared.config.busy_write_delay.as_micros()).unwrap_or(u32::MAX);
        if max == 0 {
            return;
        }
        let now = crate::monotonic_us();
        let mut probe = self.load.borrow_mut();
        let elapsed = now.saturating_sub(probe.at_us);
        if elapsed < LOAD_PROBE_US {
            return;
        }
        let Some(demand_ns) = probe.read_demand_ns() else {
            return;
        };
        let used_ns = demand_ns.saturating_sub(probe.demand_ns);
        let first = probe.at_us == 0;
        (probe.at_us, probe.demand_ns) = (now, demand_ns);
        if first {
            return;
        }
        let permille = used_ns.saturating_mul(1000) / elapsed.saturating_mul(1000).max(1);
        // Smoothed over about four probes (~80 ms): one 20 ms sample is too noisy to act on.
        probe.demand_permille = if elapsed > 10 * LOAD_PROBE_US {
            permille
        } else {
            probe.demand_permille - probe.demand_permille / 4 + permille / 4
        };
        let current = self.busy_delay_us.get();
        let next = next_busy_delay(current, probe.demand_permille, elapsed, max);
        if next != current {
            self.busy_delay_us.set(next);
            self.shared
                .metrics
                .write_delay(self.id, self.write_delay_us());
        }
    }

    /// Lists a connection for the next flush (see [`flusher`]).
    pub(crate) fn list_for_flush(&self, conn: Rc<Conn>) {
        let mut list = self.to_flush.borrow_mut();
        list.push(conn);
        if list.len() == 1
            && let Some(waker) = self.flusher_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Handles one message from a mailbox.
    pub(crate) fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Join {
                room,
                conn,
                user,
                name,
                key,
                id,
                initial,
                already,
                resume,
                settings,
            } => {
                let request = crate::home::JoinRequest {
                    resume,
                    conn,
                    key,
                    id,
                    initial,
                    already,
                    settings,
                };
                crate::home::join(self, &room, &user, &name, request);
            }
            ShardMsg::Leave {
                room,
                conn,
                user,
                name,
                key,
            } => crate::home::leave(self, &room, conn, &user, &name, key),
            ShardMsg::Publish {
                room,
                conn,
                user,
                name,
                data,
                id,
            } => crate::home::publish(self, room, conn, &user, &name, data, id),
            ShardMsg::PresenceQuery { room, conn, id } => {
                crate::home::presence_query(self, &room, conn, id);
            }
            ShardMsg::HistoryQuery {
                room,
                conn,
                id,
                since,
                limit,
            } => crate::home::history_query(self, &room, conn, id, since, limit),
            ShardMsg::Joined(joined) => crate::ws::on_joined(self, *joined),
            ShardMsg::JoinFailed {
                room,
                conn,
                id,
                initial,
                code,
                message,
            } => {
                crate::ws::on_join_failed(self, &room, conn, id, initial, code, message);
            }
            ShardMsg::Deliver(delivery) => self.deliver(&delivery),
            ShardMsg::Reply { conn, reply } => crate::ws::on_reply(self, conn, reply),
            ShardMsg::Close { conn, code } => {
                if let Some(c) = self.conn(conn) {
                    c.close(self, code);
                }
            }
            ShardMsg::CloseAuthorized {
                user,
                session,
                code,
            } => {
                let matching: Vec<Rc<Conn>> = self
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
                    conn.close(self, code);
                }
            }
            ShardMsg::Kick {
                room,
                user,
                reason,
                done,
            } => {
                for conn in self.conns_in(&room) {
                    if user.as_ref().is_none_or(|u| *u == conn.user_id()) {
                        crate::ws::kick(self, &conn, &room, reason);
                    }
                }
                done.tick();
            }
            ShardMsg::Reauthorize { room, done } => {
                for conn in self.conns_in(&room) {
                    crate::ws::reauthorize(self, &conn, &room);
                }
                done.tick();
            }
            ShardMsg::ReauthorizeUser { user, done } => {
                let conns: Vec<Rc<Conn>> = self
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
                        crate::ws::reauthorize(self, &conn, &room);
                    }
                }
                done.tick();
            }
            ShardMsg::DropRoom { room, done } => {
                crate::home::drop_room(self, &room);
                done.tick();
            }
            ShardMsg::PublishExternal {
                room,
                user,
                name,
                data,
                settings,
                answer,
            } => {
                let result =
                    crate::home::publish_external(self, room, &user, &name, data, settings);
                answer.set(result);
            }
            ShardMsg::PresenceExternal { room, answer } => {
                answer.set(crate::home::presence_of(self, &room));
            }
            ShardMsg::Shutdown => {
                self.stopping.set(true);
                if let Some(w) = self.stop_waker.borrow_mut().take() {
                    w.wake();
                }
            }
        }
    }

    fn deliver(self: &Rc<Self>, delivery: &Delivery) {
        // A personal room's owner is in no member list (see `Conn::personal`): its connections
        // here are found by user, once their initial join was answered.
        let owner: Vec<Rc<Conn>> =
            match delivery.room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX) {
                Some(user) => {
                    let conns = self.conns.borrow();
                    self.shared
                        .user_conns(user)
                        .iter()
                        .filter(|id| shard_of(**id) == self.id)
                        .filter_map(|id| conns.get(id))
                        .filter(|c| c.receives_personal())
                        .cloned()
                        .collect()
                }
                None => Vec::new(),
            };
        // Iterating under the borrow (no copy of the member list): `enqueue` and what it may call
        // (`close`, spawning a writer) never touch `local_rooms`.
        let rooms = self.local_rooms.borrow();
        let listed = rooms.get(&delivery.room).map_or(&[][..], |m| &m[..]);
        let mut count = 0u64;
        let mut shed = 0u64;
        // Presence is the first thing dropped under overload: a connection whose queue is already
        // past half its bound gets no diff (it would only move it toward the 4011 close); the
        // `presence` op still answers exactly.
        let shed_above = self.shared.config.max_queued_bytes / 2;
        for conn in listed.iter().chain(&owner) {
            if let Some(frame) = delivery.frames.get(conn.key) {
                if delivery.sheddable && conn.backlog() > shed_above {
                    shed += 1;
                    continue;
                }
                conn.enqueue(self, frame);
                count += 1;
            }
        }
        if shed > 0 {
            self.shared
                .metrics
                .presence_shed
                .fetch_add(shed, Ordering::Relaxed);
        }
        self.shared
            .metrics
            .deliveries
            .fetch_add(count, Ordering::Relaxed);
    }

    /// Removes a connection from local room tables (membership only; the home is told apart).
    pub(crate) fn drop_local_member(&self, room: &RoomId, conn: ConnId) {
        let mut rooms = self.local_rooms.borrow_mut();
        if let Some(members) = rooms.get_mut(room) {
            members.retain(|c| c.id != conn);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Handles `msg` here when `target` is this shard, else puts it in `target`'s mailbox.
    pub(crate) fn dispatch(self: &Rc<Self>, target: usize, msg: ShardMsg) {
        if target == self.id {
            self.handle(msg);
        } else {
            self.shared.send(target, msg);
        }
    }

    /// This shard's connections that hold (or are joining) `room`.
    fn conns_in(&self, room: &RoomId) -> Vec<Rc<Conn>> {
        self.conns
            .borrow()
            .values()
            .filter(|c| c.membership(room).is_some())
            .cloned()
            .collect()
    }

    /// Sends a reply to a connection, wherever it lives.
    pub(crate) fn reply(self: &Rc<Self>, conn: ConnId, reply: Reply) {
        if shard_of(conn) == self.id {
            crate::ws::on_reply(self, conn, reply);
        } else {
            self.shared
                .send(shard_of(conn), ShardMsg::Reply { conn, reply });
        }
    }
}

/// The periodic duties of a shard: heartbeats, idle and expiry closes, refresh warnings,
/// revocation checks, presence flushes.
pub(crate) async fn ticker(shard: Rc<Shard>) {
    let cfg = &shard.shared.config;
    let tick = cfg
        .presence_batch
        .clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut last_scan = 0u64;
    let mut scans = 0usize;
    loop {
        monoio::time::sleep(tick).await;
        if shard.stopping.get() && shard.conns.borrow().is_empty() {
            return;
        }
        send_due(&shard);
        crate::home::flush_presence(&shard);
        let now = now_ms();
        if now.saturating_sub(last_scan) < 250 {
            continue;
        }
        last_scan = now;
        // Each shard sweeps its share of the per-IP table's stripes, one per scan: every stripe
        // is swept about every `STRIPES / shards` scans (2 s on 2 shards).
        scans = scans.wrapping_add(1);
        crate::home::expire_history(&shard);
        shard
            .shared
            .sweep_ips(scans.wrapping_mul(shard.shared.config.shards) + shard.id);
        let heartbeat = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
        let idle_limit = heartbeat.saturating_mul(2).saturating_add(10_000);
        let grace = u64::try_from(cfg.expiry_grace.as_millis()).unwrap_or(0);
        let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
        for conn in conns {
            if conn.closing.get().is_some() || !conn.ready.get() {
                continue;
            }
            let mono = crate::monotonic_ms32();
            if u64::from(mono.wrapping_sub(conn.last_seen_ms.get())) > idle_limit {
                conn.close(&shard, CloseCode::IDLE_TIMEOUT);
                continue;
            }
            let (expires, revoked) = {
                let identity = conn.identity.borrow();
                (identity.expires_at_ms, shard.shared.auth.revoked(&identity))
            };
            if let Some(revoked) = revoked {
                conn.close(&shard, revoked.close_code());
                continue;
            }
            // The warning goes first even when a busy shard scans only after expiry, so that a
            // client always learns why it is closed.
            if !conn.refresh_warned.get() && now + 60_000 >= expires {
                conn.refresh_warned.set(true);
                crate::ws::send_refresh_required(&shard, &conn, expires);
            }
            if now >= expires.saturating_add(grace) {
                conn.close(&shard, CloseCode::UNAUTHORIZED);
                continue;
            }
            if u64::from(mono.wrapping_sub(conn.last_ping_ms.get())) >= heartbeat {
                conn.last_ping_ms.set(mono);
                crate::ws::send_ping(&shard, &conn);
            }
        }
    }
}

/// Writes what every listed connection has queued, once the task that queued it (the mailbox,
/// the reader, a handshake) yields: everything queued for a connection in that time goes out in
/// one non-blocking `send`, with no task and no io_uring round trip unless the kernel's buffer is
/// full.
pub(crate) async fn flusher(shard: Rc<Shard>) {
    struct Listed<'a>(&'a Shard);
    impl Future for Listed<'_> {
        type Output = ();
        fn poll(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0.to_flush.borrow().is_empty() {
                *self.0.flusher_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        }
    }
    let mut batch = Vec::new();
    loop {
        Listed(&shard).await;
        std::mem::swap(&mut batch, &mut *shard.to_flush.borrow_mut());
        for conn in batch.drain(..) {
            conn.flush_now(&shard);
        }
        shard.probe_load();
    }
}

/// Sends the flushes held for the write delay once due (see [`Shard::defer_flush`]).
pub(crate) async fn deferred_flusher(shard: Rc<Shard>) {
    loop {
        std::future::poll_fn(|cx| {
            if shard.deferred.borrow().is_empty() {
                *shard.deferred_waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        let now = crate::monotonic_us();
        let front = shard.deferred.borrow().front().map(|(due, _)| *due);
        if let Some(due) = front
            && due > now
        {
            monoio::time::sleep(Duration::from_micros(due - now)).await;
            continue;
        }
        loop {
            let next = {
                let mut deferred = shard.deferred.borrow_mut();
                match deferred.front() {
                    Some((due, _)) if *due <= now => deferred.pop_front(),
                    _ => None,
                }
            };
            let Some((_, conn)) = next else { break };
            conn.send_queued(&shard);
        }
    }
}

/// The busy write delay after a probe that found the shard's thread wanting the CPU `permille`
/// of the time (smoothed), `elapsed_us` after the last probe (see [`Shard::probe_load`]).
fn next_busy_delay(current: u32, permille: u64, elapsed_us: u64, max: u32) -> u32 {
    if elapsed_us > 10 * LOAD_PROBE_US {
        // The shard stopped flushing for a while: whatever load there was has passed.
        0
    } else if permille >= 900 {
        current.saturating_mul(2).clamp(1000.min(max), max)
    } else if permille < 500 {
        if current / 2 < 500 { 0 } else { current / 2 }
    } else {
        current
    }
}

/// How often a flushing shard looks at its load ([`Shard::probe_load`]), in µs.
const LOAD_PROBE_US: u64 = 20_000;

/// The shard thread's CPU demand so far, from `/proc/thread-self/schedstat` (opened on the shard's
/// thread at the first probe; a kernel without it leaves the busy write delay at zero).
#[derive(Default)]
pub(crate) struct LoadProbe {
    file: Option<std::fs::File>,
    unavailable: bool,
    at_us: u64,
    demand_ns: u64,
    /// The demand's moving average, in thousandths of wall time.
    demand_permille: u64,
}

impl LoadProbe {
    /// Nanoseconds this thread has run plus waited to run.
    fn read_demand_ns(&mut self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        if self.unavailable {
            return None;
        }
        if self.file.is_none() {
            self.file = std::fs::File::open("/proc/thread-self/schedstat").ok();
        }
        let mut buf = [0u8; 96];
        let parsed = self.file.as_ref().and_then(|f| {
            let n = f.read_at(&mut buf, 0).ok()?;
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let mut fields = text.split_ascii_whitespace().map(|v| v.parse::<u64>().ok());
            let (run, wait) = (fields.next()??, fields.next()??);
            Some(run.saturating_add(wait))
        });
        if parsed.is_none() {
            self.unavailable = true;
        }
        parsed
    }
}

/// Sends the delayed messages that are due (they were queued with one fixed delay, so in order).
fn send_due(shard: &Rc<Shard>) {
    let now = crate::monotonic_us();
    loop {
        let next = {
            let mut delayed = shard.delayed.borrow_mut();
            match delayed.front() {
                Some((due, _, _)) if *due <= now => delayed.pop_front(),
                _ => None,
            }
        };
        let Some((_, home, msg)) = next else { break };
        shard.dispatch(home, msg);
    }
}

/// Reads the shard's WebSocket connections as they turn readable: one task for all of them, so
/// that an idle connection costs no task and no operation in flight (see [`ReadySet`]).
pub(crate) async fn reader(shard: Rc<Shard>) {
    let mut tokens = Vec::new();
    loop {
        if let Err(e) = shard.ready_set.wait().await {
            log::error!("shard {}: waiting for readable connections: {e}", shard.id);
            monoio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        loop {
            shard.ready_set.ready(&mut tokens);
            for &id in &tokens {
                if let Some(conn) = shard.conn(id) {
                    crate::ws::on_readable(&shard, &conn);
                }
            }
            if !ReadySet::batch_full(&tokens) {
                break;
            }
            // A long burst: let writers and the mailbox run between batches.
            crate::yield_now().await;
        }
    }
}

/// Drains the shard's mailbox forever.
pub(crate) async fn dispatcher(shard: Rc<Shard>) {
    let mailbox = &shard.shared.mailboxes[shard.id];
    loop {
        mailbox.ready().await;
        let mut handled = 0i64;
        while let Some(msg) = mailbox.pop() {
            handled += 1;
            shard.handle(msg);
            // Let connections and writers run between long bursts.
            if handled % 256 == 0 {
                shard.shared.metrics.queue_depth(shard.id, -256);
                handled = 0;
                crate::yield_now().await;
            }
        }
        shard.shared.metrics.queue_depth(shard.id, -handled);
        if shard.stopping.get() && shard.conns.borrow().is_empty() && mailbox.len() == 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_write_delay_doubles_under_saturation_holds_then_halves_away() {
        let max = 20_000;
        let mut delay = 0;
        let mut seen = Vec::new();
        for _ in 0..7 {
            delay = next_busy_delay(delay, 950, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        // Between the thresholds (the delay itself lowers the load) it holds.
        assert_eq!(next_busy_delay(delay, 899, LOAD_PROBE_US, max), 20_000);
        assert_eq!(next_busy_delay(delay, 500, LOAD_PROBE_US, max), 20_000);
        // Under 50 % it halves, and under half a millisecond it is off.
        let mut seen = Vec::new();
        for _ in 0..6 {
            delay = next_busy_delay(delay, 499, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [10_000, 5000, 2500, 1250, 625, 0]);
        // A pause in flushing resets it at once; a smaller cap bounds the first step too.
        assert_eq!(next_busy_delay(20_000, 1000, 11 * LOAD_PROBE_US, max), 0);
        assert_eq!(next_busy_delay(0, 1000, LOAD_PROBE_US, 300), 300);
    }

    #[test]
    fn the_load_probe_reads_a_growing_demand_or_turns_itself_off() {
        let mut probe = LoadProbe::default();
        let Some(first) = probe.read_demand_ns() else {
            // No schedstat on this kernel: the probe stays off for good.
            assert!(probe.read_demand_ns().is_none());
            return;
        };
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        let second = probe.read_demand_ns().expect("read again");
        assert!(second >= first + 10_000_000, "{first} then {second}");
    }

    #[test]
    fn a_user_with_one_connection_fits_a_map_slot_and_more_move_to_a_box() {
        assert_eq!(size_of::<UserConns>(), 24);
        let mut entry = UserConns::One {
            conn: 1,
            name: Arc::from("ann"),
        };
        entry.push(2);
        entry.push(3);
        assert!(matches!(entry, UserConns::Many(_)));
        assert_eq!(entry.conns(), [1, 2, 3]);
        assert!(!entry.remove(1));
        assert!(!entry.remove(9));
        assert!(!entry.remove(3));
        assert!(matches!(entry, UserConns::One { conn: 2, .. }));
        assert_eq!(&**entry.name(), "ann");
        assert!(entry.remove(2));
    }
}
