//! The engine's view of the configuration: limits, timings and rates, already validated by the
//! server. Plain data; nothing here parses or reads files.

use std::net::SocketAddr;
use std::time::Duration;

use protocol::envelope::RoomId;

/// A token-bucket rate: `count` per `per`, holding at most `burst` (0 count disables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// Events per window; 0 disables the limit.
    pub count: u32,
    /// The window.
    pub per: Duration,
    /// Bucket capacity.
    pub burst: u32,
}

impl RateSpec {
    /// No limit.
    pub const UNLIMITED: RateSpec = RateSpec {
        count: 0,
        per: Duration::from_secs(1),
        burst: 0,
    };
}

/// What happens past `max_connections_per_user`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictPolicy {
    /// Close the oldest connection with 4509.
    CloseOldest,
    /// Refuse the new one with HTTP 409.
    RejectNew,
}

/// Everything the engine needs to know.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Listen address (port 0 picks a free port, shared by every shard).
    pub listen: SocketAddr,
    /// Shards (threads).
    pub shards: usize,
    /// Largest client message after decompression (inclusive).
    pub max_message_bytes: usize,
    /// Deepest nesting.
    pub max_json_depth: usize,
    /// Outbound compression threshold for zstd connections.
    pub compression_threshold: usize,
    /// Rooms joined at connect.
    pub default_rooms: Vec<RoomId>,
    /// Joining an unknown room creates it.
    pub implicit_rooms: bool,
    /// Default room size limit.
    pub max_room_members: u32,
    /// Live connections per user.
    pub max_connections_per_user: u32,
    /// Policy past it.
    pub session_conflict: ConflictPolicy,
    /// Live connections per IP.
    pub max_connections_per_ip: u32,
    /// Rooms per connection.
    pub max_rooms_per_connection: u32,
    /// Outbound bytes waiting per connection before 4011.
    pub max_queued_bytes: usize,
    /// History length per room.
    pub history_size: usize,
    /// History lifetime.
    pub history_ttl: Duration,
    /// Most bytes of encoded messages one room's history keeps.
    pub history_room_bytes: usize,
    /// Most bytes of encoded messages all histories keep, split evenly among shards.
    pub history_total_bytes: usize,
    /// A request head must be complete this long after its first byte (slow-loris).
    pub http_head_timeout: Duration,
    /// A request body must be complete this long after its head.
    pub http_body_timeout: Duration,
    /// Connections per IP that are not (yet) an authenticated WebSocket.
    pub max_pending_per_ip: u32,
    /// Resume window.
    pub resume_ttl: Duration,
    /// Server ping interval.
    pub heartbeat: Duration,
    /// Presence coalescing window.
    pub presence_batch: Duration,
    /// Grace after token expiry.
    pub expiry_grace: Duration,
    /// Least time between two writes to one connection: frames queued meanwhile go out together
    /// (zero: every flush goes out at once).
    pub write_delay: Duration,
    /// The most that frames to a busy connection wait to share a write while a shard is
    /// saturated (the delay adapts to the shard's load; zero: never).
    pub busy_write_delay: Duration,
    /// Run the shards on the epoll driver even where io_uring is allowed (the fallback's path,
    /// chosen by itself where the kernel refuses io_uring).
    pub force_epoll: bool,
    /// Allowed origins (empty = any).
    pub allowed_origins: Vec<String>,
    /// Allow requests without `Origin`.
    pub allow_missing_origin: bool,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<crate::Cidr>,
    /// WebSocket connects per IP.
    pub connect_per_ip: RateSpec,
    /// Publishes per connection.
    pub publish_per_connection: RateSpec,
    /// Publishes per room.
    pub publish_per_room: RateSpec,
    /// `presence` + `history` per connection.
    pub query_per_connection: RateSpec,
    /// Joins per connection.
    pub join_per_connection: RateSpec,
    /// How long shutdown waits for connections to drain.
    pub shutdown_grace: Duration,
    /// Redis, when several nodes act as one (SPEC §10); `None` keeps every shared state in this
    /// process (the embedded default).
    pub redis: Option<RedisSettings>,
    /// TLS on the listener (HTTP, `/ws` and `/socket.io/` on the same port); `None`: plain TCP.
    pub tls: Option<crate::tls::TlsSettings>,
}

/// How this node reaches Redis and names itself there.
#[derive(Clone)]
pub struct RedisSettings {
    /// `host:port` of the Redis server, or (cluster) of the seed nodes asked for the map of
    /// slots.
    pub seeds: Vec<String>,
    /// A Redis Cluster: commands go to the master of their key's slot.
    pub cluster: bool,
    /// ACL user (`None`: the default user).
    pub username: Option<String>,
    /// Password (never logged).
    pub password: Option<String>,
    /// Database number.
    pub db: u32,
    /// Every key and channel starts with it.
    pub prefix: String,
    /// This node's name in Redis, logs and metrics.
    pub node_id: String,
    /// A node that has not renewed its leases for this long is dead.
    pub node_ttl: Duration,
    /// `rediss://`: TLS to every Redis connection, with this client configuration (the
    /// certificate checked against the roots and the server's host name).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("seeds", &self.seeds)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("prefix", &self.prefix)
            .field("node_id", &self.node_id)
            .field("node_ttl", &self.node_ttl)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl EngineConfig {
    /// The SPEC defaults on `listen`, for tests and benchmarks.
    pub fn with_defaults(listen: SocketAddr, shards: usize) -> Self {
        let rate = |count, secs, burst| RateSpec {
            count,
            per: Duration::from_secs(secs),
            burst,
        };
        Self {
            listen,
            shards,
            max_message_bytes: 65536,
            max_json_depth: 32,
            compression_threshold: 1024,
            default_rooms: vec![RoomId::parse("lobby").unwrap_or_else(|_| unreachable!())],
            implicit_rooms: true,
            max_room_members: 10_000,
            max_connections_per_user: 10,
            session_conflict: ConflictPolicy::CloseOldest,
            max_connections_per_ip: 1000,
            max_rooms_per_connection: 128,
            max_queued_bytes: 1 << 20,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            history_room_bytes: 1 << 20,
            history_total_bytes: 256 << 20,
            http_head_timeout: Duration::from_secs(10),
            http_body_timeout: Duration::from_secs(10),
            max_pending_per_ip: 64,
            resume_ttl: Duration::from_secs(300),
            heartbeat: Duration::from_secs(25),
            presence_batch: Duration::from_millis(100),
            expiry_grace: Duration::ZERO,
            write_delay: Duration::ZERO,
            busy_write_delay: Duration::from_millis(20),
            force_epoll: false,
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            trusted_proxies: Vec::new(),
            connect_per_ip: rate(50, 1, 100),
            publish_per_connection: rate(20, 1, 40),
            publish_per_room: rate(1000, 1, 1000),
            query_per_connection: rate(10, 1, 10),
            join_per_connection: rate(10, 1, 50),
            shutdown_grace: Duration::from_secs(5),
            redis: None,
            tls: None,
        }
    }
}
