//! The HTTP abuse limits of SPEC §9 in process memory: token buckets per IP and per session, and
//! the per-account failure counter with its lockout. Keys are IPs, session ids and e-mail blind
//! indexes (never plain e-mails). Tables are pruned when they grow, so a flood of distinct keys
//! costs bounded memory. With Redis (several nodes) these move there.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::config::Rate;

/// Entries a table may hold before expired ones are swept.
const SWEEP_AT: usize = 50_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Token buckets keyed by a string.
#[derive(Debug)]
pub struct BucketTable {
    rate: Rate,
    buckets: Mutex<HashMap<Vec<u8>, Bucket>>,
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
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(retry_after_secs)` when none is left.
    pub fn take(&self, key: &[u8], now_ms: u64) -> Result<(), u64> {
        if self.rate.count == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.rate.count);
        let refill = per_ms(self.rate);
        let mut table = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= SWEEP_AT {
            table.retain(|_, b| {
                let elapsed = now_ms.saturating_sub(b.at_ms) as f64;
                b.tokens + refill * elapsed < capacity
            });
        }
        let bucket = table.entry(key.to_vec()).or_insert(Bucket {
            tokens: capacity,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64;
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
    window_start_ms: u64,
    count: u32,
    locked_until_ms: u64,
}

/// Failed logins per account (by e-mail blind index, whether or not the account exists) and
/// the lockout they trigger.
#[derive(Debug)]
pub struct Lockouts {
    rate: Rate,
    lockout: Duration,
    table: Mutex<HashMap<Vec<u8>, Failures>>,
}

impl Lockouts {
    /// `rate.count` failures within `rate.per` lock the account for `lockout`.
    pub fn new(rate: Rate, lockout: Duration) -> Self {
        Self {
            rate,
            lockout,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }

    /// `Err(retry_after_secs)` while `key` is locked.
    pub fn check(&self, key: &[u8], now_ms: u64) -> Result<(), u64> {
        let table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match table.get(key) {
            Some(f) if f.locked_until_ms > now_ms => {
                Err((f.locked_until_ms - now_ms).div_ceil(1000).max(1))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure; true when it locked the account.
    pub fn fail(&self, key: &[u8], now_ms: u64) -> bool {
        if self.rate.count == 0 {
            return false;
        }
        let window = Self::ms(self.rate.per);
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if table.len() >= SWEEP_AT {
            table.retain(|_, f| {
                f.locked_until_ms > now_ms || now_ms.saturating_sub(f.window_start_ms) < window
            });
        }
        let f = table.entry(key.to_vec()).or_insert(Failures {
            window_start_ms: now_ms,
            count: 0,
            locked_until_ms: 0,
        });
        if now_ms.saturating_sub(f.window_start_ms) >= window {
            f.window_start_ms = now_ms;
            f.count = 0;
        }
        f.count += 1;
        if f.count >= self.rate.count {
            f.locked_until_ms = now_ms.saturating_add(Self::ms(self.lockout));
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
        assert!(!l.fail(b"a", 0));
        assert!(!l.fail(b"a", 1));
        assert!(l.check(b"a", 2).is_ok());
        assert!(l.fail(b"a", 2));
        assert_eq!(l.check(b"a", 1002), Err(29));
        assert!(l.check(b"a", 30_002).is_ok());
        assert!(!l.fail(b"b", 0));
        l.succeed(b"b");
        assert!(!l.fail(b"b", 1));
        assert!(!l.fail(b"b", 2));
    }
}
