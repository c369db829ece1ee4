//! The in-memory revocation list checked on every authenticated request and WebSocket
//! operation: a Bloom filter of atomic words (lock-free, no allocation) in front of the exact map
//! of live revocations. The filter is double-buffered: pruning refills the spare one from the
//! map and swaps, so bits of forgotten revocations do not pile up; a reader that overlaps a
//! refill (a generation counter, as in a seqlock) falls back to the map. The common case, a token of an unrevoked session, costs a few hashes and
//! atomic loads. The map is filled from storage at start and on every revocation made here; the
//! durable copy lives in storage (`Revocations`), so a restart forgets nothing. This module does
//! no I/O.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};

use storage::{Revocation, RevocationKind};

/// Bits in the filter: 2^22 bits (512 KiB) keeps the false-positive rate under 1% up to about
/// 400,000 live revocations with 4 hashes.
const FILTER_BITS: usize = 1 << 22;
const HASHES: usize = 4;

/// Revoked sessions and users.
pub struct RevocationList {
    /// Readers use `filters[active]`; a refill writes the other one, then swaps.
    filters: [Box<[AtomicU64]>; 2],
    active: AtomicUsize,
    /// Odd while a refill runs; a reader that sees it change checks the exact map instead.
    generation: AtomicU64,
    exact: RwLock<HashMap<(RevocationKind, String), Revocation>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationList")
            .field("live", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for RevocationList {
    fn default() -> Self {
        Self::new()
    }
}

impl RevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self {
            filters: [empty_filter(), empty_filter()],
            active: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            exact: RwLock::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn positions(&self, kind: RevocationKind, subject: &str) -> [usize; HASHES] {
        let mut h = self.hasher.build_hasher();
        h.write_u8(kind as u8);
        h.write(subject.as_bytes());
        let a = h.finish();
        let b = a.rotate_left(32) | 1;
        let mut out = [0usize; HASHES];
        for (i, slot) in out.iter_mut().enumerate() {
            let mixed = a.wrapping_add(b.wrapping_mul(i as u64));
            // FILTER_BITS is a power of two far below 2^32: the mask keeps the value in range.
            #[allow(clippy::cast_possible_truncation)]
            let bit = (mixed as usize) & (FILTER_BITS - 1);
            *slot = bit;
        }
        out
    }

    fn maybe(&self, kind: RevocationKind, subject: &str) -> bool {
        let positions = self.positions(kind, subject);
        let before = self.generation.load(Ordering::Acquire);
        let filter = &self.filters[self.active.load(Ordering::Acquire) % 2];
        let hit = positions
            .iter()
            .all(|&bit| filter[bit / 64].load(Ordering::Acquire) & (1u64 << (bit % 64)) != 0);
        if hit || before % 2 == 1 {
            return true;
        }
        // The bit loads happen before the second read of the generation (seqlock reader).
        fence(Ordering::Acquire);
        self.generation.load(Ordering::Relaxed) != before
    }

    fn set_bits(&self, filter: &[AtomicU64], kind: RevocationKind, subject: &str) {
        for bit in self.positions(kind, subject) {
            filter[bit / 64].fetch_or(1u64 << (bit % 64), Ordering::Release);
        }
    }

    /// Refills the spare filter from `exact` and makes it the active one. Runs under the map's
    /// write lock, so no insert lands in the map meanwhile (one that set its bits just before is
    /// in the map, hence in the refill).
    fn refill(&self, exact: &HashMap<(RevocationKind, String), Revocation>) {
        let generation = self.generation.load(Ordering::Relaxed);
        self.generation.store(generation + 1, Ordering::Relaxed);
        // Readers that see any cleared word below also see the odd generation.
        fence(Ordering::Release);
        let spare = (self.active.load(Ordering::Relaxed) + 1) % 2;
        let filter = &self.filters[spare];
        for word in filter.iter() {
            word.store(0, Ordering::Relaxed);
        }
        for (kind, subject) in exact.keys() {
            self.set_bits(filter, *kind, subject);
        }
        self.active.store(spare, Ordering::Release);
        self.generation.store(generation + 2, Ordering::Release);
    }

    /// Adds (or replaces) a revocation. The exact map is written before the filter bits are set,
    /// so a reader that sees the bits finds the entry.
    pub fn insert(&self, revocation: Revocation) {
        let (kind, subject) = (revocation.kind, revocation.subject.clone());
        self.exact
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((kind, subject.clone()), revocation);
        // Both filters: whichever is active after a refill holds it.
        for filter in &self.filters {
            self.set_bits(filter, kind, &subject);
        }
    }

    /// Whether a token of `user`, `session`, issued at `issued_at_ms`, is revoked, and how far.
    pub fn check(&self, user: &str, session: &str, issued_at_ms: u64) -> Option<engine::Revoked> {
        let user_hit = self.maybe(RevocationKind::User, user);
        let session_hit = !session.is_empty() && self.maybe(RevocationKind::Session, session);
        if !user_hit && !session_hit {
            return None;
        }
        let exact = self
            .exact
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if user_hit
            && let Some(r) = exact.get(&(RevocationKind::User, user.to_owned()))
            && i64::try_from(issued_at_ms).unwrap_or(i64::MAX) <= r.revoked_at_ms
        {
            return Some(engine::Revoked::Account);
        }
        if session_hit && exact.contains_key(&(RevocationKind::Session, session.to_owned())) {
            return Some(engine::Revoked::Session);
        }
        None
    }

    /// Whether an account-wide revocation of `user` (logout-all, deletion) was made at or after
    /// `at_ms`: what was true of the account before it may no longer be.
    pub fn account_revoked_since(&self, user: &str, at_ms: i64) -> bool {
        if !self.maybe(RevocationKind::User, user) {
            return false;
        }
        self.exact
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(RevocationKind::User, user.to_owned()))
            .is_some_and(|r| r.revoked_at_ms >= at_ms)
    }

    /// Forgets revocations that can no longer matter, and refills the filter without their bits
    /// when any went.
    pub fn prune(&self, now_ms: i64) {
        let mut exact = self
            .exact
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = exact.len();
        exact.retain(|_, r| r.keep_until_ms > now_ms);
        if exact.len() != before {
            self.refill(&exact);
        }
    }

    /// Live revocations held.
    pub fn len(&self) -> usize {
        self.exact
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn empty_filter() -> Box<[AtomicU64]> {
    (0..FILTER_BITS / 64).map(|_| AtomicU64::new(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(kind: RevocationKind, subject: &str, at: i64) -> Revocation {
        Revocation {
            kind,
            subject: subject.to_owned(),
            revoked_at_ms: at,
            keep_until_ms: at + 1000,
        }
    }

    #[test]
    fn account_revocations_date_what_was_read_before_them() {
        let list = RevocationList::new();
        assert!(!list.account_revoked_since("u1", 0));
        list.insert(revocation(RevocationKind::User, "u1", 100));
        list.insert(revocation(RevocationKind::Session, "u2", 100));
        assert!(list.account_revoked_since("u1", 100));
        assert!(list.account_revoked_since("u1", 50));
        assert!(!list.account_revoked_since("u1", 101), "read after it");
        assert!(
            !list.account_revoked_since("u2", 0),
            "a session's id is not an account"
        );
    }

    #[test]
    fn sessions_and_users() {
        let list = RevocationList::new();
        assert_eq!(list.check("u1", "s1", 10), None);
        list.insert(revocation(RevocationKind::Session, "s1", 100));
        assert_eq!(list.check("u1", "s1", 10), Some(engine::Revoked::Session));
        assert_eq!(list.check("u1", "s2", 10), None);
        list.insert(revocation(RevocationKind::User, "u2", 100));
        assert_eq!(list.check("u2", "s9", 100), Some(engine::Revoked::Account));
        assert_eq!(
            list.check("u2", "s9", 101),
            None,
            "issued after the revocation"
        );
        list.prune(1101);
        assert_eq!(list.check("u1", "s1", 10), None);
        assert!(list.is_empty());
    }

    fn bits_set(list: &RevocationList) -> u32 {
        list.filters[list.active.load(Ordering::Relaxed)]
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones())
            .sum()
    }

    #[test]
    fn pruning_clears_the_filter_of_forgotten_revocations() {
        let list = RevocationList::new();
        for i in 0..1000 {
            list.insert(revocation(RevocationKind::Session, &format!("old{i}"), 1));
        }
        list.insert(revocation(RevocationKind::Session, "kept", 5000));
        assert!(bits_set(&list) > 1000);
        list.prune(2000);
        assert_eq!(list.len(), 1);
        assert!(bits_set(&list) <= 4, "only the kept entry's bits");
        assert!(list.check("u", "kept", 0).is_some());
        assert!(list.check("u", "old1", 0).is_none());
        // Entries survive refills into either filter.
        list.insert(revocation(RevocationKind::User, "u9", 5000));
        for now in [3000, 3001] {
            list.insert(revocation(RevocationKind::Session, "brief", now - 2000));
            list.prune(now);
            assert_eq!(list.check("u9", "", 10), Some(engine::Revoked::Account));
            assert!(list.check("u", "kept", 0).is_some());
            assert!(list.check("u", "brief", 0).is_none());
        }
    }

    #[test]
    fn many_revocations_stay_exact() {
        let list = RevocationList::new();
        for i in 0..20_000 {
            list.insert(revocation(RevocationKind::Session, &format!("s{i}"), 1));
        }
        for i in 0..20_000 {
            assert!(list.check("u", &format!("s{i}"), 0).is_some());
            assert!(list.check("u", &format!("t{i}"), 0).is_none());
        }
    }
}
