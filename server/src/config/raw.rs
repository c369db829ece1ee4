//! The first stage of configuration: every key of SPEC §1 and §9 with its default, as written
//! (durations and rates still strings). Unknown keys are refused by serde; bounds are checked by
//! [`super::Config::validate`].

use serde::{Deserialize, Serialize};

use super::values::{lenient, lenient_bool, lenient_list, parse_bytes};

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Integer(i) => {
            u64::try_from(i).map_err(|_| serde::de::Error::custom("size must be positive"))
        }
        toml::Value::String(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!(
            "expected a size, found {}",
            other.type_str()
        ))),
    }
}

fn optional_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    // An empty string (e.g. `RINGHUB_DATABASE_URL=`) means "not set".
    let s = String::deserialize(d)?;
    Ok(if s.trim().is_empty() { None } else { Some(s) })
}

fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

macro_rules! defaults {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(fn $name() -> $ty { $value })*
    };
}

defaults! {
    d_listen: String = "127.0.0.1:8080".into();
    d_mode: String = "development".into();
    d_data_dir: String = "./ringhub-data".into();
    d_database_pool: u32 = 8;
    d_breaker_failures: u32 = 5;
    d_breaker_probe: String = "2s".into();
    d_jwt_algorithm: String = "HS256".into();
    d_access_ttl: String = "15m".into();
    d_refresh_ttl: String = "24h".into();
    d_session_max_age: String = "30d".into();
    d_token_binding: String = "ip_and_user_agent".into();
    d_bcrypt_cost: u32 = 12;
    d_hash_queue: u32 = 64;
    d_true: bool = true;
    d_max_message_bytes: u64 = 65536;
    d_max_json_depth: u32 = 32;
    d_compression_threshold: u64 = 1024;
    d_default_rooms: Vec<String> = vec!["lobby".into()];
    d_max_room_members: u32 = 10_000;
    d_max_connections_per_user: u32 = 10;
    d_session_conflict: String = "close_oldest".into();
    d_max_connections_per_ip: u32 = 1000;
    d_max_rooms_per_connection: u32 = 128;
    d_max_queued_bytes: u64 = 1 << 20;
    d_refresh_reuse_interval: String = "10s".into();
    d_history_size: u32 = 100;
    d_history_ttl: String = "5m".into();
    d_history_room_bytes: u64 = 1 << 20;
    d_history_total_bytes: u64 = 256 << 20;
    d_http_head_timeout: String = "10s".into();
    d_http_body_timeout: String = "10s".into();
    d_max_pending_per_ip: u32 = 64;
    d_resume_ttl: String = "5m".into();
    d_heartbeat: String = "25s".into();
    d_presence_batch: String = "100ms".into();
    d_expiry_grace: String = "0s".into();
    d_write_delay: String = "0ms".into();
    d_busy_write_delay: String = "20ms".into();
    d_io_driver: String = "auto".into();
    d_log_format: String = "json".into();
    d_log_level: String = "info".into();
    d_redis_prefix: String = "ringhub".into();
    d_node_ttl: String = "10s".into();
    d_user_cache_ttl: String = "24h".into();
    d_tls_handshake_timeout: String = "10s".into();
    d_login_per_ip: String = "30/1m".into();
    d_failed_logins: String = "5/15m".into();
    d_lockout: String = "15m".into();
    d_register_per_ip: String = "10/1h".into();
    d_refresh_per_session: String = "10/1m".into();
    d_connect_per_ip: String = "50/1s".into();
    d_connect_burst: u32 = 100;
    d_publish_per_connection: String = "20/1s".into();
    d_publish_burst: u32 = 40;
    d_publish_per_room: String = "1000/1s".into();
    d_query_per_connection: String = "10/1s".into();
    d_join_per_connection: String = "10/1s".into();
    d_join_burst: u32 = 50;
}

/// Every configuration key, as written. Field docs are the README's key table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// HTTP + WebSocket listen address.
    #[serde(default = "d_listen")]
    pub listen: String,
    /// Runtime threads, one per core.
    #[serde(default = "default_shards", deserialize_with = "lenient")]
    pub shards: usize,
    /// `development` or `production`.
    #[serde(default = "d_mode")]
    pub mode: String,
    /// Embedded database and generated development secrets.
    #[serde(default = "d_data_dir")]
    pub data_dir: String,
    /// PostgreSQL URL; unset = embedded SQLite.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub database_url: Option<String>,
    /// PostgreSQL read replica URL.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub database_read_url: Option<String>,
    /// PostgreSQL connections.
    #[serde(default = "d_database_pool", deserialize_with = "lenient")]
    pub database_pool: u32,
    /// PEM roots for `sslmode=verify-ca`/`verify-full` in `database_url` (else the system's).
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub database_ca_file: Option<String>,
    /// Consecutive unreachable-database failures that open the PostgreSQL circuit breaker.
    #[serde(default = "d_breaker_failures", deserialize_with = "lenient")]
    pub breaker_failures: u32,
    /// How long the breaker stays open before it probes the database again.
    #[serde(default = "d_breaker_probe")]
    pub breaker_probe: String,
    /// Redis URL; unset = in-process state.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub redis_url: Option<String>,
    /// PEM roots for `rediss://` (else the system's).
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub redis_ca_file: Option<String>,
    /// Redis Cluster instead of one Redis server.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub redis_cluster: bool,
    /// Every Redis key and channel starts with it.
    #[serde(default = "d_redis_prefix")]
    pub redis_prefix: String,
    /// This process's name (empty: generated at start).
    #[serde(default)]
    pub node_id: String,
    /// A node that has not renewed its leases for this long is dead.
    #[serde(default = "d_node_ttl")]
    pub node_ttl: String,
    /// How long the encrypted user cache in Redis keeps what a login needs (`0s`: no cache).
    #[serde(default = "d_user_cache_ttl")]
    pub user_cache_ttl: String,
    /// HS256 signing secret (≥ 32 bytes in production; generated in development).
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwt_secret: Option<String>,
    /// `HS256` or `EdDSA`.
    #[serde(default = "d_jwt_algorithm")]
    pub jwt_algorithm: String,
    /// PEM Ed25519 private key for `EdDSA`.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub jwt_private_key_file: Option<String>,
    /// Retired HS256 secrets still accepted for verification.
    #[serde(default, deserialize_with = "lenient_list")]
    pub jwt_secrets_old: Vec<String>,
    /// base64 of 32 bytes: AES-256-GCM key of stored e-mails and cached user data.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub encryption_key: Option<String>,
    /// Retired encryption keys still accepted for reading.
    #[serde(default, deserialize_with = "lenient_list")]
    pub encryption_keys_old: Vec<String>,
    /// HMAC key of the e-mail blind index (never rotated).
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub blind_index_key: Option<String>,
    /// Access token lifetime.
    #[serde(default = "d_access_ttl")]
    pub access_ttl: String,
    /// Refresh token lifetime (sliding).
    #[serde(default = "d_refresh_ttl")]
    pub refresh_ttl: String,
    /// Longest a session lives however often it is refreshed.
    #[serde(default = "d_session_max_age")]
    pub session_max_age: String,
    /// `ip_and_user_agent`, `user_agent` or `none`.
    #[serde(default = "d_token_binding")]
    pub token_binding: String,
    /// CIDRs whose `X-Forwarded-For` is believed.
    #[serde(default, deserialize_with = "lenient_list")]
    pub trusted_proxies: Vec<String>,
    /// bcrypt cost, 4..=16.
    #[serde(default = "d_bcrypt_cost", deserialize_with = "lenient")]
    pub bcrypt_cost: u32,
    /// Password hashes waiting for the hashing threads before 503.
    #[serde(default = "d_hash_queue", deserialize_with = "lenient")]
    pub hash_queue: u32,
    /// Exact origins allowed for WebSockets and CORS (empty = any).
    #[serde(default, deserialize_with = "lenient_list")]
    pub allowed_origins: Vec<String>,
    /// Whether requests without `Origin` (non-browser clients) are allowed.
    #[serde(default = "d_true", deserialize_with = "lenient_bool")]
    pub allow_missing_origin: bool,
    /// PEM certificate chain for TLS.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_cert_file: Option<String>,
    /// PEM private key for TLS.
    #[serde(
        default,
        deserialize_with = "optional_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_key_file: Option<String>,
    /// A TLS handshake not finished within this is cut.
    #[serde(default = "d_tls_handshake_timeout")]
    pub tls_handshake_timeout: String,
    /// TLS is terminated by a proxy in front.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub behind_proxy: bool,
    /// Let the kernel back the process's memory with transparent huge pages (off by default: idle
    /// connections cost far less resident memory, and fan-out measured no different).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub transparent_huge_pages: bool,
    /// Deliver the refresh token as an HttpOnly cookie instead of in the body.
    #[serde(default, deserialize_with = "lenient_bool")]
    pub refresh_cookie: bool,
    /// Largest client message after decompression (inclusive).
    #[serde(default = "d_max_message_bytes", deserialize_with = "size")]
    pub max_message_bytes: u64,
    /// Deepest JSON/MessagePack nesting, the envelope counting as 1.
    #[serde(default = "d_max_json_depth", deserialize_with = "lenient")]
    pub max_json_depth: u32,
    /// Outbound messages larger than this are compressed for zstd connections.
    #[serde(default = "d_compression_threshold", deserialize_with = "size")]
    pub compression_threshold: u64,
    /// Rooms joined on connect (plus the personal room).
    #[serde(default = "d_default_rooms", deserialize_with = "lenient_list")]
    pub default_rooms: Vec<String>,
    /// Joining an unknown room creates an ephemeral public room.
    #[serde(default = "d_true", deserialize_with = "lenient_bool")]
    pub implicit_rooms: bool,
    /// Default room size limit.
    #[serde(default = "d_max_room_members", deserialize_with = "lenient")]
    pub max_room_members: u32,
    /// Live connections per user.
    #[serde(default = "d_max_connections_per_user", deserialize_with = "lenient")]
    pub max_connections_per_user: u32,
    /// `close_oldest` or `reject_new`.
    #[serde(default = "d_session_conflict")]
    pub session_conflict: String,
    /// Live connections per client IP.
    #[serde(default = "d_max_connections_per_ip", deserialize_with = "lenient")]
    pub max_connections_per_ip: u32,
    /// Rooms one connection may be in.
    #[serde(default = "d_max_rooms_per_connection", deserialize_with = "lenient")]
    pub max_rooms_per_connection: u32,
    /// Bytes waiting to be written before a connection is closed with 4011.
    #[serde(default = "d_max_queued_bytes", deserialize_with = "size")]
    pub max_queued_bytes: u64,
    /// Window in which a rotated refresh token returns the same new pair.
    #[serde(default = "d_refresh_reuse_interval")]
    pub refresh_reuse_interval: String,
    /// Messages kept per room for recovery.
    #[serde(default = "d_history_size", deserialize_with = "lenient")]
    pub history_size: u32,
    /// How long they are kept.
    #[serde(default = "d_history_ttl")]
    pub history_ttl: String,
    /// Most bytes of encoded messages one room's history keeps.
    #[serde(default = "d_history_room_bytes", deserialize_with = "size")]
    pub history_room_bytes: u64,
    /// Most bytes of encoded messages all histories of the process keep (split among shards).
    #[serde(default = "d_history_total_bytes", deserialize_with = "size")]
    pub history_total_bytes: u64,
    /// A request head must be complete this long after its first byte.
    #[serde(default = "d_http_head_timeout")]
    pub http_head_timeout: String,
    /// A request body must be complete this long after its head.
    #[serde(default = "d_http_body_timeout")]
    pub http_body_timeout: String,
    /// Connections per IP that are not (yet) an authenticated WebSocket.
    #[serde(default = "d_max_pending_per_ip", deserialize_with = "lenient")]
    pub max_pending_per_ip: u32,
    /// How long a closed connection's state can be resumed.
    #[serde(default = "d_resume_ttl")]
    pub resume_ttl: String,
    /// Server ping interval.
    #[serde(default = "d_heartbeat")]
    pub heartbeat: String,
    /// Presence changes are coalesced over this window.
    #[serde(default = "d_presence_batch")]
    pub presence_batch: String,
    /// Grace after token expiry before the 4001 close (at most 5m).
    #[serde(default = "d_expiry_grace")]
    pub expiry_grace: String,
    /// Least time between two writes to one connection (at most 100ms).
    #[serde(default = "d_write_delay")]
    pub write_delay: String,
    /// The most the write delay grows to while a shard is saturated (at most 100ms; 0 = never).
    #[serde(default = "d_busy_write_delay")]
    pub busy_write_delay: String,
    /// `auto` (io_uring where the kernel allows it, else epoll) or `epoll`.
    #[serde(default = "d_io_driver")]
    pub io_driver: String,
    /// `json` or `pretty`.
    #[serde(default = "d_log_format")]
    pub log_format: String,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "d_log_level")]
    pub log_level: String,
    /// SPEC §9.
    #[serde(default)]
    pub rate_limits: RawRateLimits,
}

/// `[rate_limits]` of SPEC §9.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// Login attempts per IP.
    #[serde(default = "d_login_per_ip")]
    pub login_per_ip: String,
    /// Failed logins per account before lockout.
    #[serde(default = "d_failed_logins")]
    pub failed_logins_per_account: String,
    /// Lockout duration.
    #[serde(default = "d_lockout")]
    pub lockout: String,
    /// Registrations per IP.
    #[serde(default = "d_register_per_ip")]
    pub register_per_ip: String,
    /// Refreshes per session.
    #[serde(default = "d_refresh_per_session")]
    pub refresh_per_session: String,
    /// WebSocket connects per IP.
    #[serde(default = "d_connect_per_ip")]
    pub connect_per_ip: String,
    /// Burst of connects per IP.
    #[serde(default = "d_connect_burst", deserialize_with = "lenient")]
    pub connect_burst: u32,
    /// Publishes per connection.
    #[serde(default = "d_publish_per_connection")]
    pub publish_per_connection: String,
    /// Burst of publishes per connection.
    #[serde(default = "d_publish_burst", deserialize_with = "lenient")]
    pub publish_burst: u32,
    /// Publishes per room.
    #[serde(default = "d_publish_per_room")]
    pub publish_per_room: String,
    /// `presence` + `history` requests per connection.
    #[serde(default = "d_query_per_connection")]
    pub query_per_connection: String,
    /// Joins per connection.
    #[serde(default = "d_join_per_connection")]
    pub join_per_connection: String,
    /// Burst of joins per connection.
    #[serde(default = "d_join_burst", deserialize_with = "lenient")]
    pub join_burst: u32,
}

impl Default for RawRateLimits {
    fn default() -> Self {
        Self {
            login_per_ip: d_login_per_ip(),
            failed_logins_per_account: d_failed_logins(),
            lockout: d_lockout(),
            register_per_ip: d_register_per_ip(),
            refresh_per_session: d_refresh_per_session(),
            connect_per_ip: d_connect_per_ip(),
            connect_burst: d_connect_burst(),
            publish_per_connection: d_publish_per_connection(),
            publish_burst: d_publish_burst(),
            publish_per_room: d_publish_per_room(),
            query_per_connection: d_query_per_connection(),
            join_per_connection: d_join_per_connection(),
            join_burst: d_join_burst(),
        }
    }
}

/// The keys that hold secrets: masked by `check-config`, never logged.
pub const SECRET_KEYS: [&str; 5] = [
    "jwt_secret",
    "jwt_secrets_old",
    "encryption_key",
    "encryption_keys_old",
    "blind_index_key",
];
