//! Engine counters (SPEC §11), plain atomics incremented with relaxed ordering and rendered in
//! Prometheus text format. Cheap enough for the hot path: no labels are built per event.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::auth::AuthFailure;

/// Outcome labels of `ringhub_connects_total{result}`.
pub const CONNECT_RESULTS: [&str; 7] = [
    "ok",
    "unauthorized",
    "origin_forbidden",
    "rate_limited",
    "capacity",
    "conflict",
    "bad_request",
];
/// Close codes counted by `ringhub_disconnects_total{code}`.
pub const CLOSE_CODES: [u16; 16] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 4001, 4008, 4010, 4011, 4509, 4510,
];
/// Ops counted by `ringhub_messages_in_total{op}` (`invalid` for undecodable messages).
pub const OPS: [&str; 9] = [
    "join", "leave", "publish", "presence", "history", "resume", "refresh", "ping", "invalid",
];
/// Limits counted by `ringhub_rate_limited_total{limit}` (the HTTP ones are counted by the
/// server's routes).
pub const LIMITS: [&str; 11] = [
    "connect_per_ip",
    "pending_per_ip",
    "publish_per_user",
    "publish_per_connection",
    "publish_per_room",
    "query_per_connection",
    "join_per_connection",
    "login_per_ip",
    "failed_logins_per_account",
    "register_per_ip",
    "refresh_per_session",
];
/// Authentication failure reasons found by the accounts routes, beside [`AuthFailure`]'s.
pub const ACCOUNT_AUTH_FAILURES: [&str; 6] = [
    "bad_password",
    "no_account",
    "locked",
    "unknown_refresh",
    "session_ended",
    "refresh_reused",
];

/// The engine's counters.
#[derive(Debug)]
pub struct Metrics {
    /// Live WebSocket connections.
    pub connections: AtomicI64,
    connects: [AtomicU64; CONNECT_RESULTS.len()],
    disconnects: [AtomicU64; CLOSE_CODES.len()],
    messages_in: [AtomicU64; OPS.len()],
    /// Messages queued to connections.
    pub deliveries: AtomicU64,
    /// Presence diffs not delivered to a connection that was falling behind (SPEC §6 shedding).
    pub presence_shed: AtomicU64,
    /// Presence flushes put off because the shard's mailbox was backed up.
    pub presence_delayed: AtomicU64,
    /// Rooms whose presence diffs were dropped unsent while the node was degraded.
    pub presence_degraded: AtomicU64,
    /// Bytes read from WebSockets.
    pub bytes_in: AtomicU64,
    /// Bytes written to WebSockets.
    pub bytes_out: AtomicU64,
    /// Writes to WebSocket sockets (deliveries / writes = frames per write: batching at work).
    pub socket_writes: AtomicU64,
    /// Flushes held back by the write delay (fixed, or grown by a saturated shard).
    pub deferred_flushes: AtomicU64,
    rate_limited: [AtomicU64; LIMITS.len()],
    auth_failures: [AtomicU64; AuthFailure::ALL.len()],
    account_auth_failures: [AtomicU64; ACCOUNT_AUTH_FAILURES.len()],
    /// Joins refused with `room_full`.
    pub room_full: AtomicU64,
    /// Entries of the per-IP table behind the WebSocket caps (bounded by sweeping).
    pub ip_entries: AtomicI64,
    /// Connections not (yet) an authenticated WebSocket (`max_pending_per_ip` counts these).
    pub pending_connections: AtomicI64,
    /// Messages dropped from room histories to keep within `history_total_bytes`.
    pub history_evicted: AtomicU64,
    /// TLS handshakes by outcome: finished, failed (not TLS, no shared version or suite, a
    /// reset), cut at `tls_handshake_timeout`.
    pub tls_handshakes: [AtomicU64; 3],
    /// 1 while the listener serves TLS (user space: rustls).
    pub tls_on: AtomicU64,
    shard_queue_depth: Vec<AtomicI64>,
    shard_write_delay_us: Vec<AtomicU64>,
    shard_history_bytes: Vec<AtomicU64>,
    /// Redis (several nodes), rendered only when configured.
    pub redis: RedisMetrics,
}

/// A histogram with fixed upper bounds (the last bucket is `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, value: u64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        bump(&self.buckets[i]);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Prometheus text; bounds and sum divided by `scale` (1e6 turns microseconds into seconds).
    fn render(&self, out: &mut String, name: &str, scale: f64) {
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let le = *b as f64 / scale;
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 / scale;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// What the Redis connections of a node do.
#[derive(Debug)]
pub struct RedisMetrics {
    /// Redis is configured (the metrics are rendered).
    pub configured: std::sync::atomic::AtomicBool,
    /// Connections the node keeps (two per shard).
    pub links_expected: AtomicI64,
    /// Connections up now.
    pub links_up: AtomicI64,
    /// Commands sent.
    pub commands: AtomicU64,
    /// Commands per write.
    pub pipeline_size: Histogram,
    /// Time from a command's write to its reply, in microseconds (sampled).
    pub round_trip_us: Histogram,
    /// Messages of a room missed by a subscription (lost meanwhile) that its stream no longer
    /// held: skipped.
    pub gaps: AtomicU64,
    /// Messages missed by a subscription and read back from the room's stream.
    pub repaired: AtomicU64,
    /// Redis Cluster: commands and subscriptions sent again where a `MOVED` or `ASK` pointed.
    pub redirects: AtomicU64,
    /// Shared limits answered by the node's own counters (Redis unreachable or too slow).
    pub limit_fallbacks: AtomicU64,
    /// Rooms gone on locally (a new epoch) because Redis was unreachable.
    pub local_fallbacks: AtomicU64,
    /// Nodes whose lease was live at the last look (this one included).
    pub nodes: AtomicI64,
    /// Redis Cluster: shards that do not know a master for every slot yet.
    pub maps_missing: AtomicI64,
}

impl RedisMetrics {
    fn new() -> Self {
        Self {
            configured: std::sync::atomic::AtomicBool::new(false),
            links_expected: AtomicI64::new(0),
            links_up: AtomicI64::new(0),
            commands: AtomicU64::new(0),
            pipeline_size: Histogram::new(&[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]),
            round_trip_us: Histogram::new(&[
                50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
            ]),
            gaps: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            redirects: AtomicU64::new(0),
            limit_fallbacks: AtomicU64::new(0),
            local_fallbacks: AtomicU64::new(0),
            nodes: AtomicI64::new(0),
            maps_missing: AtomicI64::new(0),
        }
    }

    /// Whether every Redis connection of the node is up (and, with a cluster, every shard
    /// knows where each slot is served).
    pub fn up(&self) -> bool {
        self.links_up.load(Ordering::Relaxed) >= self.links_expected.load(Ordering::Relaxed)
            && self.maps_missing.load(Ordering::Relaxed) <= 0
    }

    fn render(&self, out: &mut String) {
        if !self.configured.load(Ordering::Relaxed) {
            return;
        }
        let _ = writeln!(
            out,
            "# TYPE ringhub_redis_up gauge\nringhub_redis_up {}",
            u8::from(self.up())
        );
        let _ = writeln!(
            out,
            "# TYPE ringhub_nodes gauge\nringhub_nodes {}",
            self.nodes.load(Ordering::Relaxed)
        );
        for (name, counter) in [
            ("ringhub_redis_commands_total", &self.commands),
            ("ringhub_redis_gaps_total", &self.gaps),
            ("ringhub_redis_repaired_total", &self.repaired),
            ("ringhub_redis_redirects_total", &self.redirects),
            (
                "ringhub_shared_limit_fallbacks_total",
                &self.limit_fallbacks,
            ),
            ("ringhub_redis_local_fallbacks_total", &self.local_fallbacks),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        self.pipeline_size
            .render(out, "ringhub_redis_pipeline_size", 1.0);
        self.round_trip_us
            .render(out, "ringhub_redis_roundtrip_seconds", 1e6);
    }
}

fn zeros<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counters for `shards` shards.
    pub fn new(shards: usize) -> Self {
        Self {
            connections: AtomicI64::new(0),
            connects: zeros(),
            disconnects: zeros(),
            messages_in: zeros(),
            deliveries: AtomicU64::new(0),
            presence_shed: AtomicU64::new(0),
            presence_delayed: AtomicU64::new(0),
            presence_degraded: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            socket_writes: AtomicU64::new(0),
            deferred_flushes: AtomicU64::new(0),
            rate_limited: zeros(),
            auth_failures: zeros(),
            account_auth_failures: zeros(),
            room_full: AtomicU64::new(0),
            ip_entries: AtomicI64::new(0),
            pending_connections: AtomicI64::new(0),
            history_evicted: AtomicU64::new(0),
            tls_handshakes: std::array::from_fn(|_| AtomicU64::new(0)),
            tls_on: AtomicU64::new(0),
            shard_queue_depth: (0..shards).map(|_| AtomicI64::new(0)).collect(),
            shard_write_delay_us: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            shard_history_bytes: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            redis: RedisMetrics::new(),
        }
    }

    /// Counts a connect attempt's outcome (a label of [`CONNECT_RESULTS`]).
    pub fn connect(&self, result: &str) {
        if let Some(i) = CONNECT_RESULTS.iter().position(|r| *r == result) {
            bump(&self.connects[i]);
        }
    }

    /// Counts a close code.
    pub fn disconnect(&self, code: u16) {
        if let Some(i) = CLOSE_CODES.iter().position(|c| *c == code) {
            bump(&self.disconnects[i]);
        }
    }

    /// Counts an incoming message by op (a label of [`OPS`]).
    pub fn message_in(&self, op: &str) {
        if let Some(i) = OPS.iter().position(|o| *o == op) {
            bump(&self.messages_in[i]);
        }
    }

    /// Counts a rate-limited event (a label of [`LIMITS`]).
    pub fn rate_limited(&self, limit: &str) {
        if let Some(i) = LIMITS.iter().position(|l| *l == limit) {
            bump(&self.rate_limited[i]);
        }
    }

    /// Counts an authentication failure.
    pub fn auth_failure(&self, reason: AuthFailure) {
        if let Some(i) = AuthFailure::ALL.iter().position(|r| *r == reason) {
            bump(&self.auth_failures[i]);
        }
    }

    /// Counts an accounts failure (a label of [`ACCOUNT_AUTH_FAILURES`]).
    pub fn account_auth_failure(&self, reason: &str) {
        if let Some(i) = ACCOUNT_AUTH_FAILURES.iter().position(|r| *r == reason) {
            bump(&self.account_auth_failures[i]);
        }
    }

    /// Adjusts a shard's cross-shard queue depth gauge.
    pub fn queue_depth(&self, shard: usize, delta: i64) {
        if let Some(g) = self.shard_queue_depth.get(shard) {
            g.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Sets a shard's current write delay gauge (µs).
    pub fn write_delay(&self, shard: usize, us: u32) {
        if let Some(g) = self.shard_write_delay_us.get(shard) {
            g.store(u64::from(us), Ordering::Relaxed);
        }
    }

    /// Sets a shard's history bytes gauge (encoded messages kept by the rooms homed there).
    pub fn history_bytes(&self, shard: usize, bytes: usize) {
        if let Some(g) = self.shard_history_bytes.get(shard) {
            g.store(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
        }
    }

    /// Appends the Prometheus text of every engine metric.
    pub fn render(&self, out: &mut String) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# TYPE ringhub_connections gauge\nringhub_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE ringhub_connects_total counter");
        for (label, c) in CONNECT_RESULTS.iter().zip(&self.connects) {
            let _ = writeln!(
                out,
                "ringhub_connects_total{{result=\"{label}\"}} {}",
                load(c)
            );
        }
        let _ = writeln!(out, "# TYPE ringhub_disconnects_total counter");
        for (code, c) in CLOSE_CODES.iter().zip(&self.disconnects) {
            let _ = writeln!(
                out,
                "ringhub_disconnects_total{{code=\"{code}\"}} {}",
                load(c)
            );
        }
        let _ = writeln!(out, "# TYPE ringhub_messages_in_total counter");
        for (op, c) in OPS.iter().zip(&self.messages_in) {
            let _ = writeln!(out, "ringhub_messages_in_total{{op=\"{op}\"}} {}", load(c));
        }
        for (name, counter) in [
            ("ringhub_deliveries_total", &self.deliveries),
            ("ringhub_presence_shed_total", &self.presence_shed),
            ("ringhub_presence_delayed_total", &self.presence_delayed),
            ("ringhub_presence_degraded_total", &self.presence_degraded),
            ("ringhub_bytes_in_total", &self.bytes_in),
            ("ringhub_bytes_out_total", &self.bytes_out),
            ("ringhub_socket_writes_total", &self.socket_writes),
            ("ringhub_deferred_flushes_total", &self.deferred_flushes),
            ("ringhub_history_evicted_total", &self.history_evicted),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", load(counter));
        }
        if load(&self.tls_on) == 1 {
            let _ = writeln!(
                out,
                "# TYPE ringhub_tls_userspace gauge\nringhub_tls_userspace 1"
            );
            let _ = writeln!(out, "# TYPE ringhub_tls_handshakes_total counter");
            for (result, c) in ["ok", "failed", "timeout"].iter().zip(&self.tls_handshakes) {
                let _ = writeln!(
                    out,
                    "ringhub_tls_handshakes_total{{result=\"{result}\"}} {}",
                    load(c)
                );
            }
        }
        let _ = writeln!(out, "# TYPE ringhub_rate_limited_total counter");
        for (limit, c) in LIMITS.iter().zip(&self.rate_limited) {
            let _ = writeln!(
                out,
                "ringhub_rate_limited_total{{limit=\"{limit}\"}} {}",
                load(c)
            );
        }
        let _ = writeln!(out, "# TYPE ringhub_auth_failures_total counter");
        for (reason, c) in AuthFailure::ALL.iter().zip(&self.auth_failures) {
            let _ = writeln!(
                out,
                "ringhub_auth_failures_total{{reason=\"{}\"}} {}",
                reason.label(),
                load(c)
            );
        }
        for (reason, c) in ACCOUNT_AUTH_FAILURES
            .iter()
            .zip(&self.account_auth_failures)
        {
            let _ = writeln!(
                out,
                "ringhub_auth_failures_total{{reason=\"{reason}\"}} {}",
                load(c)
            );
        }
        let _ = writeln!(
            out,
            "# TYPE ringhub_room_full_total counter\nringhub_room_full_total {}",
            load(&self.room_full)
        );
        for (name, gauge) in [
            ("ringhub_ip_table_entries", &self.ip_entries),
            ("ringhub_pending_connections", &self.pending_connections),
        ] {
            let _ = writeln!(
                out,
                "# TYPE {name} gauge\n{name} {}",
                gauge.load(Ordering::Relaxed)
            );
        }
        render_per_shard(
            out,
            "ringhub_shard_queue_depth",
            self.shard_queue_depth
                .iter()
                .map(|g| i128::from(g.load(Ordering::Relaxed))),
        );
        render_per_shard(
            out,
            "ringhub_shard_write_delay_us",
            self.shard_write_delay_us
                .iter()
                .map(|g| i128::from(g.load(Ordering::Relaxed))),
        );
        render_per_shard(
            out,
            "ringhub_shard_history_bytes",
            self.shard_history_bytes
                .iter()
                .map(|g| i128::from(g.load(Ordering::Relaxed))),
        );
        self.redis.render(out);
    }
}

/// One gauge with a `shard` label per value, in shard order.
fn render_per_shard(out: &mut String, name: &str, values: impl Iterator<Item = i128>) {
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (shard, value) in values.enumerate() {
        let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {value}");
    }
}
