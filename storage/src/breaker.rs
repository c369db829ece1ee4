//! The circuit breaker in front of PostgreSQL (SPEC §10 "Failures"): closed → open after
//! `failures` consecutive calls that found the database unreachable (a connection error, a
//! timeout; a busy pool is not the database's failure) → one probe every `probe` (half-open) → closed on the first
//! success. While open, calls fail at once with [`StoreError::Unavailable`] instead of each
//! waiting for its own timeout, so that a dead database costs the server nothing but quick 503s.
//! Answers that prove the database is there (a conflict, a constraint) are not failures.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::StoreError;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// One call goes through to see whether the database is back.
    HalfOpen,
    /// Calls fail at once.
    Open,
}

impl BreakerState {
    /// The value of `ringhub_breaker_state`: 0 closed, 1 half-open, 2 open.
    pub const fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

/// When the breaker opens and how often it probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open it.
    pub failures: u32,
    /// How long it stays open before the next probe.
    pub probe: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failures: 5,
            probe: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
struct Inner {
    consecutive: u32,
    open_since: Option<Instant>,
    probing: bool,
}

/// A breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
}

/// Whether a call went through as a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Probe(bool);

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                consecutive: 0,
                open_since: None,
                probing: false,
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lets a call through, or refuses it while open.
    pub(crate) fn admit(&self, now: Instant) -> Result<Probe, StoreError> {
        let mut inner = self.inner();
        let Some(since) = inner.open_since else {
            return Ok(Probe(false));
        };
        if !inner.probing && now.saturating_duration_since(since) >= self.settings.probe {
            inner.probing = true;
            return Ok(Probe(true));
        }
        Err(StoreError::Unavailable(
            "the database is unreachable (circuit open; probing again shortly)".into(),
        ))
    }

    /// A call let through that never reached the database (the pool was busy): a probe may go
    /// again.
    pub(crate) fn abandon(&self, probe: Probe) {
        if probe.0 {
            self.inner().probing = false;
        }
    }

    /// What a call that went through found.
    pub(crate) fn record(&self, probe: Probe, reachable: bool, now: Instant) {
        let mut inner = self.inner();
        if reachable {
            inner.consecutive = 0;
            inner.open_since = None;
            inner.probing = false;
            return;
        }
        inner.consecutive = inner.consecutive.saturating_add(1);
        if probe.0 {
            inner.probing = false;
            inner.open_since = Some(now);
        } else if inner.open_since.is_none() && inner.consecutive >= self.settings.failures.max(1) {
            inner.open_since = Some(now);
        }
    }

    /// Where it stands now.
    pub(crate) fn state(&self, now: Instant) -> BreakerState {
        let inner = self.inner();
        match inner.open_since {
            None => BreakerState::Closed,
            Some(_) if inner.probing => BreakerState::HalfOpen,
            Some(since) if now.saturating_duration_since(since) >= self.settings.probe => {
                BreakerState::HalfOpen
            }
            Some(_) => BreakerState::Open,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            failures: 3,
            probe: Duration::from_secs(2),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_probes_then_closes() {
        let b = breaker();
        let t0 = Instant::now();
        for _ in 0..2 {
            let p = b.admit(t0).unwrap();
            b.record(p, false, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        let p = b.admit(t0).unwrap();
        b.record(p, false, t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(b.admit(t0 + Duration::from_secs(1)).is_err());
        // After the probe interval one call goes through; others still fail fast.
        let t1 = t0 + Duration::from_secs(2);
        let probe = b.admit(t1).unwrap();
        assert!(b.admit(t1).is_err());
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        // A failed probe opens it again for another interval.
        b.record(probe, false, t1);
        assert!(b.admit(t1 + Duration::from_secs(1)).is_err());
        let t2 = t1 + Duration::from_secs(2);
        let probe = b.admit(t2).unwrap();
        b.record(probe, true, t2);
        assert_eq!(b.state(t2), BreakerState::Closed);
        assert!(b.admit(t2).is_ok());
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = breaker();
        let t = Instant::now();
        for reachable in [false, false, true, false, false] {
            let p = b.admit(t).unwrap();
            b.record(p, reachable, t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
    }
}
