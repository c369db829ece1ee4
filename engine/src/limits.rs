//! Token buckets and the "3× its limit" rule of SPEC §9, for state owned by one shard (no atomics).

use std::time::Duration;

use crate::config::RateSpec;

/// A token bucket with a fixed window counter for the 3× rule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f64,
    last_ms: u64,
    window_start_ms: u64,
    window_attempts: u32,
}

/// The verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Allowed.
    Allow,
    /// Refused: answer `rate_limited`.
    Limited,
    /// Refused, and more than 3 × max(COUNT, burst) attempts within one window: close with 4008.
    Abusive,
}

impl Bucket {
    pub(crate) fn new(spec: &RateSpec, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(capacity(spec)),
            last_ms: now_ms,
            window_start_ms: now_ms,
            window_attempts: 0,
        }
    }

    /// Counts one attempt at `now_ms`.
    pub(crate) fn attempt(&mut self, spec: &RateSpec, now_ms: u64) -> Verdict {
        self.attempt_n(spec, now_ms, 1)
    }

    /// Counts one attempt at `now_ms` that costs `tokens` (a `resume` rejoining that many rooms):
    /// allowed while the bucket holds at least one token, which it may then take below zero, so
    /// that a large request is possible at all and what follows waits for the refill.
    pub(crate) fn attempt_n(&mut self, spec: &RateSpec, now_ms: u64, tokens: u32) -> Verdict {
        if spec.count == 0 {
            return Verdict::Allow;
        }
        let per_ms = duration_ms(spec.per).max(1);
        if now_ms.saturating_sub(self.window_start_ms) >= per_ms {
            self.window_start_ms = now_ms;
            self.window_attempts = 0;
        }
        self.window_attempts = self.window_attempts.saturating_add(1);
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.last_ms = now_ms;
        let refill = elapsed * f64::from(spec.count) / per_ms as f64;
        self.tokens = (self.tokens + refill).min(f64::from(capacity(spec)));
        if self.tokens >= 1.0 {
            self.tokens -= f64::from(tokens.max(1));
            Verdict::Allow
        } else if self.window_attempts > capacity(spec).max(spec.count).saturating_mul(3) {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
    }
}

impl Bucket {
    /// Whether the bucket would be full at `now_ms`: it then says nothing that a new bucket
    /// would not, and its entry may be dropped.
    pub(crate) fn is_full(&self, spec: &RateSpec, now_ms: u64) -> bool {
        if spec.count == 0 {
            return true;
        }
        let per_ms = duration_ms(spec.per).max(1);
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        let refill = elapsed * f64::from(spec.count) / per_ms as f64;
        self.tokens + refill >= f64::from(capacity(spec))
    }
}

fn capacity(spec: &RateSpec) -> u32 {
    if spec.burst == 0 {
        spec.count
    } else {
        spec.burst
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_then_abuse() {
        let spec = RateSpec {
            count: 2,
            per: Duration::from_secs(1),
            burst: 3,
        };
        let mut b = Bucket::new(&spec, 0);
        assert_eq!(
            [
                b.attempt(&spec, 0),
                b.attempt(&spec, 0),
                b.attempt(&spec, 0)
            ],
            [Verdict::Allow; 3]
        );
        assert_eq!(b.attempt(&spec, 0), Verdict::Limited);
        assert_eq!(b.attempt(&spec, 500), Verdict::Allow);
        for _ in 0..4 {
            assert_eq!(b.attempt(&spec, 500), Verdict::Limited);
        }
        // 9 = 3 × max(COUNT, burst) attempts are merely limited; the 10th in the window is
        // abusive.
        assert_eq!(b.attempt(&spec, 600), Verdict::Abusive);
        assert_eq!(b.attempt(&spec, 1000), Verdict::Allow);
    }

    #[test]
    fn a_client_that_spends_its_burst_is_limited_before_it_is_abusive() {
        // The defaults of `join_per_connection`: 10/1s with a burst of 50.
        let spec = RateSpec {
            count: 10,
            per: Duration::from_secs(1),
            burst: 50,
        };
        let mut b = Bucket::new(&spec, 0);
        let verdicts: Vec<Verdict> = (0..151).map(|_| b.attempt(&spec, 0)).collect();
        assert!(verdicts[..50].iter().all(|v| *v == Verdict::Allow));
        assert!(verdicts[50..150].iter().all(|v| *v == Verdict::Limited));
        assert_eq!(verdicts[150], Verdict::Abusive);
    }

    #[test]
    fn a_costly_attempt_may_take_the_bucket_below_zero() {
        let spec = RateSpec {
            count: 10,
            per: Duration::from_secs(1),
            burst: 50,
        };
        let mut b = Bucket::new(&spec, 0);
        assert_eq!(b.attempt_n(&spec, 0, 128), Verdict::Allow);
        assert_eq!(b.attempt(&spec, 0), Verdict::Limited);
        // 78 tokens of debt refill in 7.8 s, the 79th token at 7.9 s.
        assert_eq!(b.attempt(&spec, 7_800), Verdict::Limited);
        assert_eq!(b.attempt(&spec, 7_900), Verdict::Allow);
    }

    #[test]
    fn a_bucket_is_full_again_once_refilled() {
        let spec = RateSpec {
            count: 10,
            per: Duration::from_secs(1),
            burst: 20,
        };
        let mut b = Bucket::new(&spec, 0);
        assert!(b.is_full(&spec, 0));
        b.attempt(&spec, 0);
        assert!(!b.is_full(&spec, 50));
        assert!(b.is_full(&spec, 100));
    }

    #[test]
    fn zero_count_disables() {
        let spec = RateSpec {
            count: 0,
            per: Duration::from_secs(1),
            burst: 0,
        };
        let mut b = Bucket::new(&spec, 0);
        assert!((0..1000).all(|_| b.attempt(&spec, 0) == Verdict::Allow));
    }
}
