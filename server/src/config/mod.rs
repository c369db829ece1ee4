//! Configuration of the `ringhub` binary (SPEC §1 and §9), in two stages: [`RawConfig`] is what
//! the layers (defaults, TOML file, `RINGHUB_*` environment, flags) say, with unknown keys refused;
//! [`Config`] is the validated value with every bound checked and every duration and rate parsed.
//! Secrets are resolved separately ([`secrets`]), because only `serve` may generate them.
//!
//! This module reads files and the environment it is given; it starts nothing.

pub mod keys;
mod layers;
mod net;
mod raw;
pub mod secrets;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use layers::{ENV_CONFIG_FILE, ENV_PREFIX, Layer, Layers, Origin};
pub use net::Cidr;
pub use raw::{RawConfig, RawRateLimits, SECRET_KEYS};
pub use values::{Rate, format_duration, parse_bytes, parse_duration};

/// A configuration error, naming the key, the offending value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Missing secrets are generated into `data_dir`.
    Development,
    /// Secrets must be given and strong; plaintext needs `behind_proxy` or TLS.
    Production,
}

/// `jwt_algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with `jwt_secret`.
    Hs256,
    /// Ed25519 with `jwt_private_key_file`; `/.well-known/jwks.json` serves the public key.
    EdDsa,
}

/// `token_binding` (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBinding {
    /// Fingerprint of IP and User-Agent.
    IpAndUserAgent,
    /// Fingerprint of User-Agent only.
    UserAgent,
    /// No binding.
    None,
}

/// `session_conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionConflict {
    /// Close the user's oldest connection with 4509.
    CloseOldest,
    /// Refuse the new connection (HTTP 409 `conflict`).
    RejectNew,
}

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// A limit with its burst (token bucket capacity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstRate {
    /// Refill rate.
    pub rate: Rate,
    /// Bucket capacity.
    pub burst: u32,
}

/// `[rate_limits]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    /// Login attempts per IP.
    pub login_per_ip: Rate,
    /// Failed logins per account.
    pub failed_logins_per_account: Rate,
    /// Lockout duration.
    pub lockout: Duration,
    /// Registrations per IP.
    pub register_per_ip: Rate,
    /// Refreshes per session.
    pub refresh_per_session: Rate,
    /// WebSocket connects per IP.
    pub connect_per_ip: BurstRate,
    /// Publishes per connection.
    pub publish_per_connection: BurstRate,
    /// Publishes per room.
    pub publish_per_room: Rate,
    /// `presence` + `history` per connection.
    pub query_per_connection: Rate,
    /// Joins per connection.
    pub join_per_connection: BurstRate,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// What was written, for `check-config`.
    pub raw: RawConfig,
    /// Listen address.
    pub listen: SocketAddr,
    /// Runtime threads.
    pub shards: usize,
    /// Development or production.
    pub mode: Mode,
    /// Data directory.
    pub data_dir: PathBuf,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// PostgreSQL read replica.
    pub database_read_url: Option<String>,
    /// PostgreSQL pool size.
    pub database_pool: u32,
    /// Redis URL.
    pub redis_url: Option<String>,
    /// Signing algorithm.
    pub jwt_algorithm: JwtAlgorithm,
    /// Ed25519 key file.
    pub jwt_private_key_file: Option<PathBuf>,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime.
    pub refresh_ttl: Duration,
    /// Session lifetime cap.
    pub session_max_age: Duration,
    /// Token binding.
    pub token_binding: TokenBinding,
    /// Trusted proxy networks.
    pub trusted_proxies: Vec<Cidr>,
    /// bcrypt cost.
    pub bcrypt_cost: u32,
    /// Hash queue bound.
    pub hash_queue: u32,
    /// Allowed origins (empty = any).
    pub allowed_origins: Vec<String>,
    /// Allow requests without `Origin`.
    pub allow_missing_origin: bool,
    /// TLS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// TLS terminated in front.
    pub behind_proxy: bool,
    /// Keep transparent huge pages for the process (off by default).
    pub transparent_huge_pages: bool,
    /// Refresh token as cookie.
    pub refresh_cookie: bool,
    /// Largest client message.
    pub max_message_bytes: usize,
    /// Deepest nesting.
    pub max_json_depth: usize,
    /// Compression threshold.
    pub compression_threshold: usize,
    /// Default rooms.
    pub default_rooms: Vec<protocol::envelope::RoomId>,
    /// Implicit room creation.
    pub implicit_rooms: bool,
    /// Default room size limit.
    pub max_room_members: u32,
    /// Connections per user.
    pub max_connections_per_user: u32,
    /// What to do past it.
    pub session_conflict: SessionConflict,
    /// Connections per IP.
    pub max_connections_per_ip: u32,
    /// Rooms per connection.
    pub max_rooms_per_connection: u32,
    /// Outbound queue bound per connection.
    pub max_queued_bytes: usize,
    /// Refresh reuse window.
    pub refresh_reuse_interval: Duration,
    /// History length per room.
    pub history_size: u32,
    /// History lifetime.
    pub history_ttl: Duration,
    /// History bytes per room.
    pub history_room_bytes: usize,
    /// History bytes per process.
    pub history_total_bytes: usize,
    /// Time for a request head, from its first byte.
    pub http_head_timeout: Duration,
    /// Time for a request body, from the end of its head.
    pub http_body_timeout: Duration,
    /// Connections per IP not yet an authenticated WebSocket.
    pub max_pending_per_ip: u32,
    /// Resume window.
    pub resume_ttl: Duration,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Presence coalescing window.
    pub presence_batch: Duration,
    /// Grace after token expiry.
    pub expiry_grace: Duration,
    /// Least time between two writes to one connection.
    pub write_delay: Duration,
    /// The most the write delay grows to while a shard is saturated.
    pub busy_write_delay: Duration,
    /// `epoll`: the shards use the epoll driver even where io_uring is allowed.
    pub force_epoll: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: String,
    /// Rate limits.
    pub rate_limits: RateLimits,
}

/// Reads the layers: `file` (or `RINGHUB_CONFIG`), then the `RINGHUB_*` variables of `env`,
/// then `flags`; returns the raw configuration and where each key came from.
pub fn load(
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    flags: &[(String, String)],
) -> Result<(RawConfig, Layers), ConfigError> {
    let mut layers = Layers::default();
    let file = file.or_else(|| {
        env.iter()
            .find(|(k, _)| k == ENV_CONFIG_FILE)
            .map(|(_, v)| PathBuf::from(v))
    });
    if let Some(path) = file {
        layers.push(Layer::from_file(&path).map_err(ConfigError)?);
    }
    layers.push(Layer::from_env(env).map_err(ConfigError)?);
    layers.push(Layer::from_flags(flags).map_err(ConfigError)?);
    let merged = toml::Value::Table(layers.merged());
    let raw: RawConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().message().to_owned();
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            // The path already ends with the unknown key; it names the parent in older versions.
            let key = if path == name || path.ends_with(&format!(".{name}")) {
                path
            } else if path == "." || path.is_empty() {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            };
            ConfigError(format!(
                "unknown configuration key `{key}` (from {})",
                layers.origin_of(&key)
            ))
        } else {
            ConfigError(format!(
                "invalid value for `{path}` (from {}): {inner}",
                layers.origin_of(&path)
            ))
        }
    })?;
    Ok((raw, layers))
}

struct Checker<'a> {
    layers: &'a Layers,
}

impl Checker<'_> {
    fn fail(&self, key: &str, why: impl std::fmt::Display) -> ConfigError {
        ConfigError(format!(
            "invalid value for `{key}` (from {}): {why}",
            self.layers.origin_of(key)
        ))
    }

    fn range<T: PartialOrd + std::fmt::Display + Copy>(
        &self,
        key: &str,
        v: T,
        lo: T,
        hi: T,
    ) -> Result<T, ConfigError> {
        if v < lo || v > hi {
            Err(self.fail(key, format!("{v} is out of range {lo}..={hi}")))
        } else {
            Ok(v)
        }
    }

    fn duration(
        &self,
        key: &str,
        text: &str,
        lo: Duration,
        hi: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = parse_duration(text).map_err(|e| self.fail(key, e))?;
        if d < lo || d > hi {
            return Err(self.fail(
                key,
                format!(
                    "{text} is out of range {}..={}",
                    format_duration(lo),
                    format_duration(hi)
                ),
            ));
        }
        Ok(d)
    }

    fn rate(&self, key: &str, text: &str) -> Result<Rate, ConfigError> {
        text.parse().map_err(|e| self.fail(key, e))
    }

    fn choice<T: Copy>(
        &self,
        key: &str,
        text: &str,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        options
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.fail(key, format!("`{text}` is not one of {}", names.join(", ")))
            })
    }
}

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);

impl Config {
    /// The second stage: checks every bound and parses every value of `raw`.
    pub fn validate(raw: RawConfig, layers: &Layers) -> Result<Config, ConfigError> {
        let c = Checker { layers };
        let listen: SocketAddr = raw.listen.parse().map_err(|_| {
            c.fail(
                "listen",
                format!("`{}` is not an IP:port address", raw.listen),
            )
        })?;
        let shards = c.range("shards", raw.shards, 1, 256)?;
        let mode = c.choice(
            "mode",
            &raw.mode,
            &[
                ("development", Mode::Development),
                ("production", Mode::Production),
            ],
        )?;
        if raw.data_dir.trim().is_empty() {
            return Err(c.fail("data_dir", "must not be empty"));
        }
        for key in ["database_url", "database_read_url"] {
            let url = if key == "database_url" {
                &raw.database_url
            } else {
                &raw.database_read_url
            };
            if let Some(url) = url
                && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
            {
                return Err(c.fail(key, "must start with postgres:// or postgresql://"));
            }
        }
        if raw.database_read_url.is_some() && raw.database_url.is_none() {
            return Err(c.fail("database_read_url", "needs database_url"));
        }
        let database_pool = c.range("database_pool", raw.database_pool, 1, 256)?;
        if let Some(url) = &raw.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(c.fail("redis_url", "must start with redis:// or rediss://"));
        }
        let jwt_algorithm = c.choice(
            "jwt_algorithm",
            &raw.jwt_algorithm,
            &[
                ("HS256", JwtAlgorithm::Hs256),
                ("EdDSA", JwtAlgorithm::EdDsa),
            ],
        )?;
        if jwt_algorithm == JwtAlgorithm::EdDsa && raw.jwt_private_key_file.is_none() {
            return Err(c.fail(
                "jwt_private_key_file",
                "is required when jwt_algorithm = \"EdDSA\"",
            ));
        }
        let access_ttl = c.duration("access_ttl", &raw.access_ttl, SECOND, DAY)?;
        let refresh_ttl = c.duration("refresh_ttl", &raw.refresh_ttl, SECOND, 365 * DAY)?;
        let session_max_age =
            c.duration("session_max_age", &raw.session_max_age, SECOND, 3650 * DAY)?;
        if refresh_ttl > session_max_age {
            return Err(c.fail("refresh_ttl", "must not be longer than session_max_age"));
        }
        let token_binding = c.choice(
            "token_binding",
            &raw.token_binding,
            &[
                ("ip_and_user_agent", TokenBinding::IpAndUserAgent),
                ("user_agent", TokenBinding::UserAgent),
                ("none", TokenBinding::None),
            ],
        )?;
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .map(|text| {
                text.parse::<Cidr>()
                    .map_err(|e| c.fail("trusted_proxies", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bcrypt_cost = c.range("bcrypt_cost", raw.bcrypt_cost, 4, 16)?;
        let hash_queue = c.range("hash_queue", raw.hash_queue, 1, 1_000_000)?;
        for origin in &raw.allowed_origins {
            if !is_origin(origin) {
                return Err(c.fail(
                    "allowed_origins",
                    format!("`{origin}` is not an origin like https://app.example.com"),
                ));
            }
        }
        let tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
            (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
            (None, None) => None,
            (Some(_), None) => return Err(c.fail("tls_key_file", "is required with tls_cert_file")),
            (None, Some(_)) => return Err(c.fail("tls_cert_file", "is required with tls_key_file")),
        };
        if mode == Mode::Production && tls.is_none() && !raw.behind_proxy {
            return Err(ConfigError(
                "production mode refuses plaintext: configure tls_cert_file and tls_key_file, or set behind_proxy = true when a proxy terminates TLS".into(),
            ));
        }
        let max_message_bytes =
            c.range("max_message_bytes", raw.max_message_bytes, 128, 16 << 20)?;
        let max_json_depth = c.range("max_json_depth", raw.max_json_depth, 2, 128)?;
        let compression_threshold = c.range(
            "compression_threshold",
            raw.compression_threshold,
            0,
            16 << 20,
        )?;
        let mut default_rooms = Vec::with_capacity(raw.default_rooms.len());
        for room in &raw.default_rooms {
            let id = protocol::envelope::RoomId::parse(room)
                .map_err(|e| c.fail("default_rooms", format!("`{room}`: {e}")))?;
            if id.is_personal() {
                return Err(c.fail(
                    "default_rooms",
                    format!("`{room}`: personal rooms are joined automatically"),
                ));
            }
            default_rooms.push(id);
        }
        let max_room_members = c.range("max_room_members", raw.max_room_members, 1, 10_000_000)?;
        let max_connections_per_user = c.range(
            "max_connections_per_user",
            raw.max_connections_per_user,
            1,
            100_000,
        )?;
        let session_conflict = c.choice(
            "session_conflict",
            &raw.session_conflict,
            &[
                ("close_oldest", SessionConflict::CloseOldest),
                ("reject_new", SessionConflict::RejectNew),
            ],
        )?;
        let max_connections_per_ip = c.range(
            "max_connections_per_ip",
            raw.max_connections_per_ip,
            1,
            10_000_000,
        )?;
        let max_rooms_per_connection = c.range(
            "max_rooms_per_connection",
            raw.max_rooms_per_connection,
            1,
            10_000,
        )?;
        if default_rooms.len() + 1 > max_rooms_per_connection as usize {
            return Err(c.fail(
                "default_rooms",
                "plus the personal room exceed max_rooms_per_connection",
            ));
        }
        let max_queued_bytes = c.range("max_queued_bytes", raw.max_queued_bytes, 4096, 1 << 30)?;
        let refresh_reuse_interval = c.duration(
            "refresh_reuse_interval",
            &raw.refresh_reuse_interval,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        let history_size = c.range("history_size", raw.history_size, 0, 100_000)?;
        let history_ttl = c.duration("history_ttl", &raw.history_ttl, Duration::ZERO, 30 * DAY)?;
        let history_room_bytes =
            c.range("history_room_bytes", raw.history_room_bytes, 4096, 1 << 30)?;
        let history_total_bytes = c.range(
            "history_total_bytes",
            raw.history_total_bytes,
            1 << 20,
            64 << 30,
        )?;
        let http_head_timeout = c.duration(
            "http_head_timeout",
            &raw.http_head_timeout,
            SECOND,
            Duration::from_secs(300),
        )?;
        let http_body_timeout = c.duration(
            "http_body_timeout",
            &raw.http_body_timeout,
            SECOND,
            Duration::from_secs(300),
        )?;
        let max_pending_per_ip =
            c.range("max_pending_per_ip", raw.max_pending_per_ip, 1, 1_000_000)?;
        let resume_ttl = c.duration("resume_ttl", &raw.resume_ttl, Duration::ZERO, DAY)?;
        let heartbeat = c.duration(
            "heartbeat",
            &raw.heartbeat,
            SECOND,
            Duration::from_secs(600),
        )?;
        let presence_batch = c.duration(
            "presence_batch",
            &raw.presence_batch,
            Duration::ZERO,
            Duration::from_secs(10),
        )?;
        let expiry_grace = c.duration(
            "expiry_grace",
            &raw.expiry_grace,
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        let write_delay = c.duration(
            "write_delay",
            &raw.write_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?;
        let busy_write_delay = c.duration(
            "busy_write_delay",
            &raw.busy_write_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?;
        let force_epoll = c.choice(
            "io_driver",
            &raw.io_driver,
            &[("auto", false), ("epoll", true)],
        )?;
        let log_format = c.choice(
            "log_format",
            &raw.log_format,
            &[("json", LogFormat::Json), ("pretty", LogFormat::Pretty)],
        )?;
        c.choice(
            "log_level",
            &raw.log_level,
            &[
                ("error", ()),
                ("warn", ()),
                ("info", ()),
                ("debug", ()),
                ("trace", ()),
            ],
        )?;
        let rl = &raw.rate_limits;
        let burst = |key: &str, rate: Rate, burst: u32| -> Result<BurstRate, ConfigError> {
            if burst == 0 && !rate.is_disabled() {
                return Err(c.fail(
                    key,
                    "a burst of 0 would refuse everything; disable the rate with \"0/1s\" instead",
                ));
            }
            Ok(BurstRate { rate, burst })
        };
        let rate_limits = RateLimits {
            login_per_ip: c.rate("rate_limits.login_per_ip", &rl.login_per_ip)?,
            failed_logins_per_account: c.rate(
                "rate_limits.failed_logins_per_account",
                &rl.failed_logins_per_account,
            )?,
            lockout: c.duration("rate_limits.lockout", &rl.lockout, Duration::ZERO, DAY)?,
            register_per_ip: c.rate("rate_limits.register_per_ip", &rl.register_per_ip)?,
            refresh_per_session: c
                .rate("rate_limits.refresh_per_session", &rl.refresh_per_session)?,
            connect_per_ip: burst(
                "rate_limits.connect_burst",
                c.rate("rate_limits.connect_per_ip", &rl.connect_per_ip)?,
                rl.connect_burst,
            )?,
            publish_per_connection: burst(
                "rate_limits.publish_burst",
                c.rate(
                    "rate_limits.publish_per_connection",
                    &rl.publish_per_connection,
                )?,
                rl.publish_burst,
            )?,
            publish_per_room: c.rate("rate_limits.publish_per_room", &rl.publish_per_room)?,
            query_per_connection: c
                .rate("rate_limits.query_per_connection", &rl.query_per_connection)?,
            join_per_connection: burst(
                "rate_limits.join_burst",
                c.rate("rate_limits.join_per_connection", &rl.join_per_connection)?,
                rl.join_burst,
            )?,
        };
        Ok(Config {
            listen,
            shards,
            mode,
            data_dir: PathBuf::from(&raw.data_dir),
            database_url: raw.database_url.clone(),
            database_read_url: raw.database_read_url.clone(),
            database_pool,
            redis_url: raw.redis_url.clone(),
            jwt_algorithm,
            jwt_private_key_file: raw.jwt_private_key_file.as_ref().map(PathBuf::from),
            access_ttl,
            refresh_ttl,
            session_max_age,
            token_binding,
            trusted_proxies,
            bcrypt_cost,
            hash_queue,
            allowed_origins: raw.allowed_origins.clone(),
            allow_missing_origin: raw.allow_missing_origin,
            tls,
            behind_proxy: raw.behind_proxy,
            transparent_huge_pages: raw.transparent_huge_pages,
            refresh_cookie: raw.refresh_cookie,
            max_message_bytes: usize::try_from(max_message_bytes)
                .map_err(|_| c.fail("max_message_bytes", "too large"))?,
            max_json_depth: max_json_depth as usize,
            compression_threshold: usize::try_from(compression_threshold)
                .map_err(|_| c.fail("compression_threshold", "too large"))?,
            default_rooms,
            implicit_rooms: raw.implicit_rooms,
            max_room_members,
            max_connections_per_user,
            session_conflict,
            max_connections_per_ip,
            max_rooms_per_connection,
            max_queued_bytes: usize::try_from(max_queued_bytes)
                .map_err(|_| c.fail("max_queued_bytes", "too large"))?,
            refresh_reuse_interval,
            history_size,
            history_ttl,
            history_room_bytes: usize::try_from(history_room_bytes)
                .map_err(|_| c.fail("history_room_bytes", "too large"))?,
            history_total_bytes: usize::try_from(history_total_bytes)
                .map_err(|_| c.fail("history_total_bytes", "too large"))?,
            http_head_timeout,
            http_body_timeout,
            max_pending_per_ip,
            resume_ttl,
            heartbeat,
            presence_batch,
            expiry_grace,
            write_delay,
            busy_write_delay,
            force_epoll,
            log_format,
            log_level: raw.log_level.clone(),
            rate_limits,
            raw,
        })
    }
}

/// `scheme://host[:port]` with no path, as browsers send `Origin`.
fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && !rest.contains('/')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Masks the password of a URL: `postgres://user:***@host/db`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest
        .split_once('/')
        .map_or((rest, None), |(a, t)| (a, Some(t)));
    let masked = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    // Query strings may carry passwords too (`?password=`): drop them from the display.
    let tail = tail.map(|t| t.split('?').next().unwrap_or_default().to_owned());
    match tail {
        Some(t) => format!("{scheme}://{masked}/{t}"),
        None => format!("{scheme}://{masked}"),
    }
}

impl Config {
    /// The effective configuration as TOML, secrets masked: `check-config`'s output.
    pub fn to_masked_toml(&self, secret_notes: &[(&str, String)]) -> String {
        let mut table = toml::Table::try_from(&self.raw).unwrap_or_default();
        for key in SECRET_KEYS {
            if let Some(value) = table.get_mut(key) {
                *value = match value {
                    toml::Value::Array(items) => {
                        toml::Value::Array(items.iter().map(|_| "***".into()).collect())
                    }
                    _ => "***".into(),
                };
            }
        }
        for key in ["database_url", "database_read_url", "redis_url"] {
            if let Some(toml::Value::String(url)) = table.get_mut(key) {
                *url = mask_url(url);
            }
        }
        let mut out = toml::to_string(&table).unwrap_or_default();
        for (key, note) in secret_notes {
            out.push_str(&format!("# {key} = *** ({note})\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(env: &[(&str, &str)], flags: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let flags: Vec<(String, String)> = flags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let (raw, layers) = load(None, env, &flags)?;
        Config::validate(raw, &layers)
    }

    #[test]
    fn defaults_are_the_spec_defaults() {
        let c = build(&[], &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.mode, Mode::Development);
        assert_eq!(c.access_ttl, Duration::from_secs(900));
        assert_eq!(c.session_max_age, Duration::from_secs(30 * 86400));
        assert_eq!(c.max_queued_bytes, 1 << 20);
        assert_eq!(c.default_rooms.len(), 1);
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert_eq!(c.rate_limits.connect_per_ip.burst, 100);
        assert_eq!(c.rate_limits.login_per_ip.to_string(), "30/1m");
        assert_eq!(c.session_conflict, SessionConflict::CloseOldest);
        assert!(c.allow_missing_origin);
    }

    #[test]
    fn env_values_are_typed_leniently() {
        let c = build(
            &[
                ("RINGHUB_BCRYPT_COST", "4"),
                ("RINGHUB_IMPLICIT_ROOMS", "false"),
                ("RINGHUB_DEFAULT_ROOMS", "a,b"),
                ("RINGHUB_ALLOWED_ORIGINS", r#"["https://x.example"]"#),
                ("RINGHUB_MAX_QUEUED_BYTES", "64KiB"),
                ("RINGHUB_RATE_LIMITS__PUBLISH_BURST", "80"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.bcrypt_cost, 4);
        assert!(!c.implicit_rooms);
        assert_eq!(
            c.default_rooms
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(c.allowed_origins, ["https://x.example"]);
        assert_eq!(c.max_queued_bytes, 65536);
        assert_eq!(c.rate_limits.publish_per_connection.burst, 80);
    }

    #[test]
    fn errors_name_the_key_and_its_source() {
        let e = build(&[("RINGHUB_NO_SUCH_KEY", "1")], &[]).unwrap_err().0;
        assert!(e.contains("unknown configuration key `no_such_key`"), "{e}");
        assert!(e.contains("RINGHUB_NO_SUCH_KEY"), "{e}");
        let e = build(&[], &[("--rate-limits.nope", "1")]).unwrap_err().0;
        assert!(
            e.contains("`rate_limits.nope`") && e.contains("--rate-limits.nope"),
            "{e}"
        );
        let e = build(&[("RINGHUB_BCRYPT_COST", "99")], &[]).unwrap_err().0;
        assert!(
            e.contains("`bcrypt_cost`")
                && e.contains("99 is out of range 4..=16")
                && e.contains("RINGHUB_BCRYPT_COST"),
            "{e}"
        );
        let e = build(&[], &[("--bcrypt-cost", "abc")]).unwrap_err().0;
        assert!(e.contains("`bcrypt_cost`") && e.contains("abc"), "{e}");
        let e = build(&[], &[("--heartbeat", "25")]).unwrap_err().0;
        assert!(
            e.contains("`heartbeat`") && e.contains("unit is required"),
            "{e}"
        );
        let e = build(&[], &[("--default-rooms", "user:x")]).unwrap_err().0;
        assert!(e.contains("personal rooms"), "{e}");
    }

    #[test]
    fn production_refuses_plaintext_without_proxy() {
        let e = build(&[("RINGHUB_MODE", "production")], &[]).unwrap_err().0;
        assert!(e.contains("plaintext"), "{e}");
        assert!(
            build(
                &[
                    ("RINGHUB_MODE", "production"),
                    ("RINGHUB_BEHIND_PROXY", "true")
                ],
                &[]
            )
            .is_ok()
        );
    }

    #[test]
    fn urls_are_masked() {
        assert_eq!(
            mask_url("postgres://u:secret@h:5432/db?password=x"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(mask_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(mask_url("redis://:pw@h"), "redis://:***@h");
    }
}
