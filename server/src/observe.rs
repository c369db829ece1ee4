//! The server's metrics beside the engine's counters (SPEC §11): the latency histograms
//! `ringhub_login_seconds`, `ringhub_token_validation_seconds` and `ringhub_storage_seconds{op}`,
//! and the cache counters. Rendering appends to the engine's text. Observing takes a short lock
//! only for labelled histograms, which are off the WebSocket hot path.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::Metrics;

/// Upper bounds of the buckets, in seconds.
const BOUNDS: [f64; 14] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// One histogram.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BOUNDS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in BOUNDS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Histograms keyed by a static label value.
#[derive(Debug)]
pub struct Family {
    name: &'static str,
    label: &'static str,
    members: Mutex<Vec<(&'static str, Arc<Histogram>)>>,
}

impl Family {
    fn new(name: &'static str, label: &'static str) -> Self {
        Self {
            name,
            label,
            members: Mutex::new(Vec::new()),
        }
    }

    /// Records one duration under `value` (ignored when the family has no label).
    pub fn observe(&self, value: &'static str, d: Duration) {
        let histogram = {
            let mut members = self
                .members
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, h)) = members.iter().find(|(v, _)| *v == value) {
                h.clone()
            } else {
                let h = Arc::new(Histogram::default());
                members.push((value, h.clone()));
                h
            }
        };
        histogram.observe(d);
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let members = self
            .members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if members.is_empty() && self.label.is_empty() {
            Histogram::default().render(out, self.name, "");
        }
        for (value, h) in members {
            let labels = if self.label.is_empty() {
                String::new()
            } else {
                format!("{}=\"{value}\"", self.label)
            };
            h.render(out, self.name, &labels);
        }
    }
}

/// Everything `/metrics` shows.
#[derive(Debug)]
pub struct ServerMetrics {
    /// The engine's counters.
    pub engine: Arc<Metrics>,
    /// `ringhub_login_seconds`.
    pub login: Family,
    /// `ringhub_token_validation_seconds`.
    pub token_validation: Family,
    /// `ringhub_storage_seconds{op}`.
    pub storage: Family,
    /// `ringhub_cache_hits_total` (the user cache arrives with Redis; 0 until then).
    pub cache_hits: AtomicU64,
    /// `ringhub_cache_misses_total`.
    pub cache_misses: AtomicU64,
}

impl ServerMetrics {
    /// Around the engine's counters.
    pub fn new(engine: Arc<Metrics>) -> Self {
        Self {
            engine,
            login: Family::new("ringhub_login_seconds", ""),
            token_validation: Family::new("ringhub_token_validation_seconds", ""),
            storage: Family::new("ringhub_storage_seconds", "op"),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        }
    }

    /// Counts an authentication failure found by the accounts routes.
    pub fn auth_failure(&self, reason: &str) {
        self.engine.account_auth_failure(reason);
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        self.engine.render(&mut out);
        self.login.render(&mut out);
        self.token_validation.render(&mut out);
        self.storage.render(&mut out);
        let _ = writeln!(
            out,
            "# TYPE ringhub_cache_hits_total counter\nringhub_cache_hits_total {}",
            self.cache_hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE ringhub_cache_misses_total counter\nringhub_cache_misses_total {}",
            self.cache_misses.load(Ordering::Relaxed)
        );
        out
    }
}
