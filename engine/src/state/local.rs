//! The in-process implementation of the shared-state seams: striped maps behind mutexes, touched
//! at connect and disconnect (and by a personal room's home, which learns its owner's
//! connections here), never per message of any other room. Also the node's per-IP count of
//! connections in progress (`max_pending_per_ip`), which stays local whatever the backend.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::seams::{CapRefusal, Counters, Presence, Resumes};
use crate::clock::now_ms;
use crate::config::{ConflictPolicy, EngineConfig, RateSpec};
use crate::conn::{ConnId, shard_of};
use crate::limits::{Bucket, Verdict};
use crate::metrics::Metrics;
use crate::room::OnlineUser;

const STRIPES: usize = 16;

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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Connect-time bookkeeping of one IP group ([`crate::net::ip_group`]): its admitted WebSockets,
/// its connections not yet authenticated, and its connect-rate bucket. An entry that says nothing
/// a new one would not (no connection, a full bucket) is dropped by [`IpTable::sweep`] or when its
/// last connection ends.
#[derive(Debug)]
struct IpState {
    conns: u32,
    pending: u32,
    bucket: Bucket,
}

impl IpState {
    fn new(spec: &RateSpec, now_ms: u64) -> Self {
        Self {
            conns: 0,
            pending: 0,
            bucket: Bucket::new(spec, now_ms),
        }
    }

    fn is_idle(&self, spec: &RateSpec, now_ms: u64) -> bool {
        self.conns == 0 && self.pending == 0 && self.bucket.is_full(spec, now_ms)
    }
}

/// The per-IP table.
pub(crate) struct IpTable {
    stripes: Vec<Mutex<HashMap<IpAddr, IpState>>>,
    connect_per_ip: RateSpec,
    max_pending: u32,
    max_conns: u32,
    metrics: Arc<Metrics>,
}

/// A connection counted against `max_pending_per_ip` until it becomes an authenticated WebSocket
/// (or ends): dropping the slot gives it back.
pub(crate) struct PendingSlot {
    table: Arc<IpTable>,
    group: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.table.pending_leave(self.group);
    }
}

impl IpTable {
    /// Runs `f` on the stripe that holds `group`, keeping the entries gauge.
    fn with<R>(&self, group: IpAddr, f: impl FnOnce(&mut HashMap<IpAddr, IpState>) -> R) -> R {
        let mut ips = lock(&self.stripes[stripe(&group)]);
        let before = ips.len();
        let result = f(&mut ips);
        self.count_entries(before, ips.len());
        result
    }

    fn count_entries(&self, before: usize, after: usize) {
        let delta = i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(0);
        if delta != 0 {
            self.metrics.ip_entries.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Drops `group`'s entry when it no longer says anything.
    fn forget_if_idle(&self, ips: &mut HashMap<IpAddr, IpState>, group: IpAddr) {
        if ips
            .get(&group)
            .is_some_and(|s| s.is_idle(&self.connect_per_ip, now_ms()))
        {
            ips.remove(&group);
        }
    }

    /// Counts a connection from `ip` that is not yet an authenticated WebSocket; `None` when its
    /// group already has `max_pending_per_ip` of them.
    pub(crate) fn pending_enter(self: &Arc<Self>, ip: IpAddr) -> Option<PendingSlot> {
        let group = crate::net::ip_group(ip);
        let admitted = self.with(group, |ips| {
            let state = ips
                .entry(group)
                .or_insert_with(|| IpState::new(&self.connect_per_ip, now_ms()));
            if state.pending >= self.max_pending {
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
            table: self.clone(),
            group,
        })
    }

    fn pending_leave(&self, group: IpAddr) {
        self.metrics
            .pending_connections
            .fetch_sub(1, Ordering::Relaxed);
        self.with(group, |ips| {
            if let Some(state) = ips.get_mut(&group) {
                state.pending = state.pending.saturating_sub(1);
            }
            self.forget_if_idle(ips, group);
        });
    }

    /// Drops the entries of one stripe that carry nothing (no connection, a full bucket): a
    /// refused upgrade leaves its spent bucket behind until it has refilled.
    pub(crate) fn sweep(&self, stripe_index: usize) {
        let spec = &self.connect_per_ip;
        let now = now_ms();
        if let Some(ips) = self.stripes.get(stripe_index % STRIPES) {
            let mut ips = lock(ips);
            let before = ips.len();
            ips.retain(|_, state| !state.is_idle(spec, now));
            self.count_entries(before, ips.len());
        }
    }

    fn connect_allowed(&self, ip: IpAddr) -> bool {
        let now = now_ms();
        let group = crate::net::ip_group(ip);
        let spec = &self.connect_per_ip;
        self.with(group, |ips| {
            let state = ips.entry(group).or_insert_with(|| IpState::new(spec, now));
            state.bucket.attempt(spec, now) == Verdict::Allow
        })
    }

    fn admit(&self, ip: IpAddr) -> Result<(), CapRefusal> {
        let group = crate::net::ip_group(ip);
        self.with(group, |ips| {
            let state = ips
                .entry(group)
                .or_insert_with(|| IpState::new(&self.connect_per_ip, now_ms()));
            if state.conns >= self.max_conns {
                return Err(CapRefusal::TooManyForIp);
            }
            state.conns += 1;
            Ok(())
        })
    }

    fn release(&self, ip: IpAddr) {
        let group = crate::net::ip_group(ip);
        self.with(group, |ips| {
            if let Some(state) = ips.get_mut(&group) {
                state.conns = state.conns.saturating_sub(1);
            }
            self.forget_if_idle(ips, group);
        });
    }
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

/// The shared state of one process.
pub(crate) struct InProcess {
    ips: Arc<IpTable>,
    users: Vec<Mutex<HashMap<Arc<str>, UserConns>>>,
    resumable: Vec<Mutex<ResumableSessions>>,
    max_connections_per_user: usize,
    session_conflict: ConflictPolicy,
    resume_ttl_ms: u64,
}

impl InProcess {
    /// Empty maps under `config`'s limits.
    pub(crate) fn new(config: &EngineConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            ips: Arc::new(IpTable {
                stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
                connect_per_ip: config.connect_per_ip,
                max_pending: config.max_pending_per_ip,
                max_conns: config.max_connections_per_ip,
                metrics,
            }),
            users: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            resumable: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            max_connections_per_user: config.max_connections_per_user as usize,
            session_conflict: config.session_conflict,
            resume_ttl_ms: u64::try_from(config.resume_ttl.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// This node's per-IP table (its connections in progress are this node's alone).
    pub(crate) fn ips(&self) -> &Arc<IpTable> {
        &self.ips
    }
}

impl Counters for InProcess {
    fn connect_allowed(&self, ip: IpAddr) -> bool {
        self.ips.connect_allowed(ip)
    }

    fn admit(
        &self,
        ip: IpAddr,
        user: &Arc<str>,
        name: &Arc<str>,
        conn: ConnId,
    ) -> Result<Option<ConnId>, CapRefusal> {
        self.ips.admit(ip)?;
        let mut users = lock(&self.users[stripe(&**user)]);
        let held = users.get(user).map_or(0, |e| e.conns().len());
        let mut replaced = None;
        // While Redis is up the cap counts every node's connections there (see `broker`).
        let redis = &self.ips.metrics.redis;
        let counted_in_redis = redis.configured.load(Ordering::Relaxed) && redis.up();
        if held >= self.max_connections_per_user && !counted_in_redis {
            match self.session_conflict {
                ConflictPolicy::RejectNew => {
                    drop(users);
                    self.ips.release(ip);
                    return Err(CapRefusal::TooManyForUser);
                }
                ConflictPolicy::CloseOldest => {
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

    fn release(&self, ip: IpAddr, user: &Arc<str>, conn: ConnId) {
        self.ips.release(ip);
        let mut users = lock(&self.users[stripe(&**user)]);
        if users.get_mut(user).is_some_and(|entry| entry.remove(conn)) {
            users.remove(user);
        }
    }

    fn upkeep(&self, turn: usize) {
        self.ips.sweep(turn);
    }
}

impl Presence for InProcess {
    fn user_conns(&self, user: &str) -> Vec<ConnId> {
        lock(&self.users[stripe(user)])
            .get(user)
            .map(|e| e.conns().to_vec())
            .unwrap_or_default()
    }

    fn online_user(&self, user: &str) -> Option<OnlineUser> {
        let users = lock(&self.users[stripe(user)]);
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
}

impl Resumes for InProcess {
    fn remember(&self, session: &str, user: &Arc<str>) {
        let now = now_ms();
        let mut map = lock(&self.resumable[stripe(session)]);
        if map.len() >= 1024 {
            map.retain(|_, (_, expires)| *expires > now);
        }
        map.insert(
            session.into(),
            (user.clone(), now.saturating_add(self.resume_ttl_ms)),
        );
    }

    fn take(&self, session: &str, user: &str) -> bool {
        let mut map = lock(&self.resumable[stripe(session)]);
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
    use std::time::Duration;

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

    fn state(configure: impl FnOnce(&mut EngineConfig)) -> InProcess {
        let mut config = EngineConfig::with_defaults("127.0.0.1:0".parse().unwrap(), 2);
        configure(&mut config);
        InProcess::new(&config, Arc::new(Metrics::new(2)))
    }

    #[test]
    fn caps_per_ip_and_per_user_and_the_oldest_replaced() {
        let s = state(|c| {
            c.max_connections_per_ip = 3;
            c.max_connections_per_user = 2;
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let (ann, bob): (Arc<str>, Arc<str>) = (Arc::from("ann"), Arc::from("bob"));
        assert_eq!(s.admit(ip, &ann, &ann, 1), Ok(None));
        assert_eq!(s.admit(ip, &ann, &ann, 2), Ok(None));
        // A third connection of ann replaces her oldest (close_oldest).
        assert_eq!(s.admit(ip, &ann, &ann, 3), Ok(Some(1)));
        assert_eq!(s.user_conns("ann"), [2, 3]);
        assert_eq!(
            s.admit(ip, &bob, &bob, 4),
            Err(CapRefusal::TooManyForIp),
            "the replaced one was not released yet: three count for the address"
        );
        s.release(ip, &ann, 1);
        assert_eq!(s.admit(ip, &bob, &bob, 4), Ok(None));
        let online = s.online_user("ann").unwrap();
        assert_eq!((online.conns, online.shards), (2, vec![0]));
        s.release(ip, &ann, 2);
        s.release(ip, &ann, 3);
        assert!(s.online_user("ann").is_none());
        // reject_new refuses and keeps the address's count right.
        let strict = state(|c| {
            c.max_connections_per_user = 1;
            c.session_conflict = ConflictPolicy::RejectNew;
        });
        assert_eq!(strict.admit(ip, &ann, &ann, 1), Ok(None));
        assert_eq!(
            strict.admit(ip, &ann, &ann, 2),
            Err(CapRefusal::TooManyForUser)
        );
        strict.release(ip, &ann, 1);
        strict.ips().sweep(stripe(&crate::net::ip_group(ip)));
        assert_eq!(strict.ips.metrics.ip_entries.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_session_is_resumed_once_by_its_own_user_within_its_ttl() {
        let s = state(|c| c.resume_ttl = Duration::from_secs(300));
        let ann: Arc<str> = Arc::from("ann");
        s.remember("c_1", &ann);
        assert!(!s.take("c_1", "bob"));
        assert!(s.take("c_1", "ann"));
        assert!(!s.take("c_1", "ann"), "once");
        let expired = state(|c| c.resume_ttl = Duration::ZERO);
        expired.remember("c_2", &ann);
        assert!(!expired.take("c_2", "ann"));
    }

    #[test]
    fn connections_in_progress_are_capped_per_group_and_given_back() {
        let s = state(|c| c.max_pending_per_ip = 2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        let first = s.ips().pending_enter(a).unwrap();
        let _second = s.ips().pending_enter(b).unwrap();
        assert!(s.ips().pending_enter(a).is_none(), "one /64, one count");
        drop(first);
        assert!(s.ips().pending_enter(b).is_some());
    }
}
