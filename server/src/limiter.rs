//! The keyed limiters of the HTTP side (SPEC §9), shared by accounts, rooms and the route table:
//! token buckets per key ([`BucketTable`]: per IP, per session, per user) and the per-account
//! failure counter with its lockout ([`Lockouts`]). Keys are IPs, session ids, user ids and e-mail
//! blind indexes (never plain e-mails). Tables are pruned when they grow, so a flood of distinct
//! keys costs bounded memory. Time is the caller's (`now_ms`, Unix milliseconds), so the rules are
//! tested without a clock. In process memory; with Redis (several nodes) the service-wide count
//! is asked too, after these allowed a request (`shared_ask`; the lockout through `Accounts`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::config::Rate;

/// The key a per-IP limit counts under: the engine's [`engine::ip_group`] (the address for IPv4,
/// the /64 for IPv6), as bytes.
pub fn ip_key(ip: IpAddr) -> Vec<u8> {
    match engine::ip_group(ip) {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets()[..8].to_vec(),
    }
}

/// Entries a table may hold before expired ones are swept.
const SWEEP_AT: usize = 50_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Token buckets keyed by a string.
#[derive(Debug)]
pub struct BucketTable {
    rate: Rate,
    /// Tokens a full bucket holds (the burst; `rate.count` unless given).
    capacity: u32,
    buckets: Mutex<HashMap<Vec<u8>, Bucket>>,
    next_sweep_ms: AtomicI64,
}

fn per_ms(rate: Rate) -> f64 {
    let ms = rate.per.as_secs_f64() * 1000.0;
    if ms <= 0.0 {
        0.0
    } else {
        f64::from(rate.count) / ms
    }
}

/// Seconds (at least 1) until `deficit` tokens refill.
fn retry_after(deficit: f64, per_ms: f64) -> u64 {
    if per_ms <= 0.0 {
        return 1;
    }
    // Bounded by the rate's period (at most a day in validated configurations).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let secs = (deficit / per_ms / 1000.0).ceil() as u64;
    secs.max(1)
}

impl BucketTable {
    /// Buckets of capacity `rate.count`, refilled at `rate`; `0/…` disables the limit.
    pub fn new(rate: Rate) -> Self {
        Self::with_burst(rate, rate.count)
    }

    /// Buckets of capacity `burst` (at least 1), refilled at `rate`.
    pub fn with_burst(rate: Rate, burst: u32) -> Self {
        Self {
            rate,
            capacity: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
            next_sweep_ms: AtomicI64::new(0),
        }
    }

    /// The question this bucket asks of the limit every node shares (Redis), for `key` of the
    /// limit `name`; `None` when the limit is off.
    pub fn shared_ask(&self, name: &str, key: &[u8]) -> Option<engine::shared_limits::SharedAsk> {
        if self.rate.count == 0 {
            return None;
        }
        let per_token_ms = self.rate.per.as_secs_f64() * 1000.0 / f64::from(self.rate.count);
        Some(engine::shared_limits::SharedAsk::Take {
            key: format!("{name}:{}", data_encoding::HEXLOWER.encode(key)),
            per_token_ms,
            burst: self.capacity,
        })
    }

    /// Takes one token for `key`; `Err(retry_after_secs)` when none is left.
    pub fn take(&self, key: &[u8], now_ms: i64) -> Result<(), u64> {
        if self.rate.count == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.capacity);
        let refill = per_ms(self.rate);
        let mut table = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= SWEEP_AT && now_ms >= self.next_sweep_ms.load(Ordering::Relaxed) {
            // At most one sweep per second, however full the table stays.
            self.next_sweep_ms.store(now_ms + 1000, Ordering::Relaxed);
            table.retain(|_, b| {
                let elapsed = now_ms.saturating_sub(b.at_ms).max(0) as f64;
                b.tokens + refill * elapsed < capacity
            });
        }
        let bucket = table.entry(key.to_vec()).or_insert(Bucket {
            tokens: capacity,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms).max(0) as f64;
        bucket.tokens = (bucket.tokens + elapsed * refill).min(capacity);
        bucket.at_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(retry_after(1.0 - bucket.tokens, refill))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    window_start_ms: i64,
    count: u32,
    locked_until_ms: i64,
}

/// Failed logins per account (by e-mail blind index, whether or not the account exists) and
/// the lockout they trigger.
#[derive(Debug)]
pub struct Lockouts {
    rate: Rate,
    lockout: Duration,
    table: Mutex<HashMap<Vec<u8>, Failures>>,
    next_sweep_ms: AtomicI64,
    /// Sweeps made (tests).
    sweeps: AtomicU64,
}

impl Lockouts {
    /// `rate.count` failures within `rate.per` lock the account for `lockout`.
    pub fn new(rate: Rate, lockout: Duration) -> Self {
        Self {
            rate,
            lockout,
            table: Mutex::new(HashMap::new()),
            next_sweep_ms: AtomicI64::new(0),
            sweeps: AtomicU64::new(0),
        }
    }

    /// Takes an attempt for `key` before the password is checked, so that concurrent attempts
    /// count: `Err(retry_after_secs)` while the key is locked, or while as many attempts as the
    /// limit are already counted (in flight or failed) in the window.
    pub fn reserve(&self, key: &[u8], now_ms: i64) -> Result<(), u64> {
        if self.rate.count == 0 {
            return Ok(());
        }
        let window = crate::clock::ms(self.rate.per);
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= SWEEP_AT && now_ms >= self.next_sweep_ms.load(Ordering::Relaxed) {
            // At most one sweep per second, however full the table stays (a table of live
            // entries would otherwise be scanned on every login).
            self.next_sweep_ms.store(now_ms + 1000, Ordering::Relaxed);
            self.sweeps.fetch_add(1, Ordering::Relaxed);
            table.retain(|_, f| {
                f.locked_until_ms > now_ms || now_ms.saturating_sub(f.window_start_ms) < window
            });
        }
        let f = table.entry(key.to_vec()).or_insert(Failures {
            window_start_ms: now_ms,
            count: 0,
            locked_until_ms: 0,
        });
        if f.locked_until_ms > now_ms {
            let wait_ms = u64::try_from(f.locked_until_ms - now_ms).unwrap_or(1);
            return Err(wait_ms.div_ceil(1000).max(1));
        }
        if now_ms.saturating_sub(f.window_start_ms) >= window {
            f.window_start_ms = now_ms;
            f.count = 0;
        }
        if f.count >= self.rate.count {
            return Err(1);
        }
        f.count += 1;
        Ok(())
    }

    /// Gives back a reserved attempt that was never checked (a replay, a busy server).
    pub fn release(&self, key: &[u8]) {
        if let Some(f) = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(key)
        {
            f.count = f.count.saturating_sub(1);
        }
    }

    /// The reserved attempt failed; true when that locked the key.
    pub fn fail(&self, key: &[u8], now_ms: i64) -> bool {
        if self.rate.count == 0 {
            return false;
        }
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(f) = table.get_mut(key) else {
            return false;
        };
        if f.count >= self.rate.count && f.locked_until_ms <= now_ms {
            f.locked_until_ms = now_ms.saturating_add(crate::clock::ms(self.lockout));
            f.count = 0;
            f.window_start_ms = now_ms;
            return true;
        }
        false
    }

    /// Forgets the failures of `key` after a successful login.
    pub fn succeed(&self, key: &[u8]) {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    #[test]
    fn buckets_refill_and_say_when() {
        let t = BucketTable::new(rate(2, 10));
        assert!(t.take(b"ip", 0).is_ok());
        assert!(t.take(b"ip", 0).is_ok());
        assert_eq!(t.take(b"ip", 0), Err(5));
        assert!(t.take(b"other", 0).is_ok());
        assert!(t.take(b"ip", 5_000).is_ok());
        assert!(BucketTable::new(rate(0, 1)).take(b"x", 0).is_ok());
    }

    #[test]
    fn lockout_after_failures_then_expires() {
        let l = Lockouts::new(rate(3, 60), Duration::from_secs(30));
        let attempt = |key: &[u8], now: i64, ok: bool| -> Result<bool, u64> {
            l.reserve(key, now)?;
            if ok {
                l.succeed(key);
                Ok(false)
            } else {
                Ok(l.fail(key, now))
            }
        };
        assert_eq!(attempt(b"a", 0, false), Ok(false));
        assert_eq!(attempt(b"a", 1, false), Ok(false));
        assert_eq!(attempt(b"a", 2, false), Ok(true));
        assert_eq!(
            attempt(b"a", 1002, true),
            Err(29),
            "locked even for the right password"
        );
        assert_eq!(attempt(b"a", 30_002, true), Ok(false));
        assert_eq!(attempt(b"b", 0, false), Ok(false));
        assert_eq!(attempt(b"b", 1, true), Ok(false));
        assert_eq!(attempt(b"b", 2, false), Ok(false));
        assert_eq!(attempt(b"b", 3, false), Ok(false));
    }

    #[test]
    fn a_full_lockout_table_is_swept_at_most_once_a_second() {
        let l = Lockouts::new(rate(5, 900), Duration::from_secs(900));
        // Live entries (inside their window): a sweep cannot shrink the table.
        for i in 0..SWEEP_AT as u64 {
            l.reserve(&i.to_le_bytes(), 0).unwrap();
        }
        for now in 0..500 {
            l.reserve(b"probe", now).unwrap_or_default();
        }
        assert_eq!(
            l.sweeps.load(Ordering::Relaxed),
            1,
            "one sweep in the first second"
        );
        l.reserve(b"later", 1000).unwrap();
        assert_eq!(l.sweeps.load(Ordering::Relaxed), 2);
        // Once the window has passed, a sweep empties it.
        l.reserve(b"much later", 901_000).unwrap();
        assert_eq!(l.sweeps.load(Ordering::Relaxed), 3);
        assert!(l.table.lock().unwrap().len() < 10);
    }

    #[test]
    fn concurrent_attempts_count_before_they_finish() {
        let l = Lockouts::new(rate(3, 60), Duration::from_secs(30));
        for _ in 0..3 {
            assert!(l.reserve(b"k", 0).is_ok());
        }
        assert_eq!(
            l.reserve(b"k", 0),
            Err(1),
            "a fourth guess waits for the others"
        );
        l.release(b"k");
        assert!(l.reserve(b"k", 0).is_ok());
    }
}
