//! State every shard reads: configuration, the server's services, the mailboxes, and the
//! connect-time maps (per-user connections, per-IP counts and buckets, resumable sessions). The
//! maps are striped mutexes touched at connect and disconnect (and by a personal room's home,
//! which learns its owner's connections there), never per message of any other room.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use protocol::envelope::RoomId;

use crate::auth::Authenticator;
use crate::clock::now_ms;
use crate::config::EngineConfig;
use crate::conn::{ConnId, shard_of};
use crate::limits::Bucket;
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::msg::ShardMsg;
use crate::room::OnlineUser;
use crate::rooms::RoomPolicy;
use crate::routes::HttpRoutes;

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
    /// Distinguishes room epochs and session ids across restarts of this process.
    pub(crate) instance: String,
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
        }
    }

    pub(crate) fn send(&self, shard: usize, msg: impl Into<ShardMsg>) {
        if let Some(mailbox) = self.mailboxes.get(shard) {
            self.metrics.queue_depth(shard, 1);
            mailbox.push(msg.into());
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
