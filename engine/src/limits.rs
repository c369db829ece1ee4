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
    /// Refused, and more than 3 × COUNT attempts within one window: close with 4008.
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
            self.tokens -= 1.0;
            Verdict::Allow
        } else if self.window_attempts > spec.count.saturating_mul(3) {
            Verdict::Abusive
        } else {
            Verdict::Limited
        }
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
        assert_eq!(b.attempt(&spec, 500), Verdict::Limited);
        // 6 = 3 × COUNT attempts are merely limited; the 7th in the window is abusive.
        assert_eq!(b.attempt(&spec, 600), Verdict::Abusive);
        assert_eq!(b.attempt(&spec, 1000), Verdict::Allow);
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
