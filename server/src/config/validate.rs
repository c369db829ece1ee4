//! The second stage of configuration: every bound of SPEC §1 and §9 checked and every value parsed,
//! one function per section (storage, accounts, transport, engine, logs), each error naming the key
//! and where its value came from. Builds the engine's [`EngineConfig`] directly, so that no value
//! is declared twice. Reads nothing but the raw configuration and its layers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use engine::{ConflictPolicy, EngineConfig, RateSpec, RedisSettings};
use protocol::envelope::RoomId;

use super::{
    AccountSettings, Cidr, Config, ConfigError, JwtAlgorithm, Layers, LogFormat, Mode, Rate,
    RawConfig, StorageConfig, TokenBinding, format_duration, parse_duration,
};

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(86_400);
/// How long a stopping server waits for connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

    /// A size in range, as `usize`.
    fn size(&self, key: &str, v: u64, lo: u64, hi: u64) -> Result<usize, ConfigError> {
        let v = self.range(key, v, lo, hi)?;
        usize::try_from(v).map_err(|_| self.fail(key, "too large for this machine"))
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

    /// A rate whose bucket holds `burst` tokens; a burst of 0 on an enabled rate is refused.
    fn burst_rate(
        &self,
        key: &str,
        text: &str,
        burst_key: &str,
        burst: u32,
    ) -> Result<RateSpec, ConfigError> {
        let rate = self.rate(key, text)?;
        if burst == 0 && !rate.is_disabled() {
            return Err(self.fail(
                burst_key,
                "a burst of 0 would refuse everything; disable the rate with \"0/1s\" instead",
            ));
        }
        Ok(RateSpec {
            count: rate.count,
            per: rate.per,
            burst,
        })
    }

    /// A rate whose bucket holds one window's worth.
    fn plain_rate(&self, key: &str, text: &str) -> Result<RateSpec, ConfigError> {
        let rate = self.rate(key, text)?;
        Ok(RateSpec {
            count: rate.count,
            per: rate.per,
            burst: rate.count,
        })
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

impl Config {
    /// The second stage: checks every bound and parses every value of `raw`.
    pub fn validate(raw: RawConfig, layers: &Layers) -> Result<Config, ConfigError> {
        let c = Checker { layers };
        let mode = c.choice(
            "mode",
            &raw.mode,
            &[
                ("development", Mode::Development),
                ("production", Mode::Production),
            ],
        )?;
        let storage = storage(&c, &raw)?;
        let accounts = accounts(&c, &raw)?;
        let tls = tls(&c, &raw, mode)?;
        let tls_handshake_timeout = c.duration(
            "tls_handshake_timeout",
            &raw.tls_handshake_timeout,
            Duration::from_millis(100),
            Duration::from_secs(60),
        )?;
        if tls.is_none() && tls_handshake_timeout != Duration::from_secs(10) {
            return Err(c.fail(
                "tls_handshake_timeout",
                "needs tls_cert_file and tls_key_file",
            ));
        }
        let node_id = node_id(&c, &raw)?;
        let mut engine = engine(&c, &raw)?;
        engine.redis = redis(&c, &raw, &node_id)?;
        let redis_tls = raw
            .redis_url
            .as_deref()
            .is_some_and(|url| url.trim_start().starts_with("rediss://"));
        let (log_format, log_level) = logs(&c, &raw)?;
        Ok(Config {
            mode,
            node_id,
            storage,
            accounts,
            engine,
            tls,
            tls_handshake_timeout,
            redis_tls,
            redis_ca_file: raw.redis_ca_file.as_ref().map(PathBuf::from),
            behind_proxy: raw.behind_proxy,
            transparent_huge_pages: raw.transparent_huge_pages,
            log_format,
            log_level,
            raw,
        })
    }
}

fn storage(c: &Checker<'_>, raw: &RawConfig) -> Result<StorageConfig, ConfigError> {
    if raw.data_dir.trim().is_empty() {
        return Err(c.fail("data_dir", "must not be empty"));
    }
    for (key, url) in [
        ("database_url", &raw.database_url),
        ("database_read_url", &raw.database_read_url),
    ] {
        if let Some(url) = url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(c.fail(key, "must start with postgres:// or postgresql://"));
        }
    }
    if raw.database_read_url.is_some() && raw.database_url.is_none() {
        return Err(c.fail("database_read_url", "needs database_url"));
    }
    let breaker_failures = c.range("breaker_failures", raw.breaker_failures, 1, 1000)?;
    let breaker_probe = c.duration(
        "breaker_probe",
        &raw.breaker_probe,
        Duration::from_millis(100),
        Duration::from_secs(60),
    )?;
    if raw.database_url.is_none() {
        // The breaker guards PostgreSQL: without it a changed setting would do nothing.
        for (key, changed) in [
            ("breaker_failures", breaker_failures != 5),
            ("breaker_probe", breaker_probe != Duration::from_secs(2)),
        ] {
            if changed {
                return Err(c.fail(key, "needs database_url (the breaker guards PostgreSQL)"));
            }
        }
    }
    if raw.database_ca_file.is_some() && raw.database_url.is_none() {
        return Err(c.fail("database_ca_file", "needs database_url"));
    }
    let mut verifying = false;
    for (key, url) in [
        ("database_url", &raw.database_url),
        ("database_read_url", &raw.database_read_url),
    ] {
        if let Some(url) = url {
            let (mode, _) = storage::pg_tls::split_sslmode(url).map_err(|why| c.fail(key, why))?;
            verifying |= matches!(
                mode,
                storage::pg_tls::SslMode::VerifyCa | storage::pg_tls::SslMode::VerifyFull
            );
        }
    }
    // The roots are read only to verify: with any other sslmode the file would do nothing.
    if raw.database_ca_file.is_some() && !verifying {
        return Err(c.fail(
            "database_ca_file",
            "needs sslmode=verify-ca or verify-full in database_url",
        ));
    }
    Ok(StorageConfig {
        database_ca_file: raw.database_ca_file.as_ref().map(PathBuf::from),
        data_dir: PathBuf::from(&raw.data_dir),
        database_url: raw.database_url.clone(),
        database_read_url: raw.database_read_url.clone(),
        database_pool: c.range("database_pool", raw.database_pool, 1, 256)?,
        breaker_failures,
        breaker_probe,
    })
}

fn accounts(c: &Checker<'_>, raw: &RawConfig) -> Result<AccountSettings, ConfigError> {
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
    let user_cache_ttl = c.duration(
        "user_cache_ttl",
        &raw.user_cache_ttl,
        Duration::ZERO,
        30 * DAY,
    )?;
    if raw.redis_url.is_none() && user_cache_ttl != DAY {
        // The cache lives in Redis: without it a changed setting would do nothing.
        return Err(c.fail(
            "user_cache_ttl",
            "needs redis_url (the cache lives in Redis)",
        ));
    }
    let rl = &raw.rate_limits;
    Ok(AccountSettings {
        user_cache_ttl,
        jwt_algorithm,
        jwt_private_key_file: raw.jwt_private_key_file.as_ref().map(PathBuf::from),
        access_ttl,
        refresh_ttl,
        session_max_age,
        token_binding,
        bcrypt_cost: c.range("bcrypt_cost", raw.bcrypt_cost, 4, 16)?,
        hash_queue: c.range("hash_queue", raw.hash_queue, 1, 1_000_000)?,
        refresh_reuse_interval: c.duration(
            "refresh_reuse_interval",
            &raw.refresh_reuse_interval,
            Duration::ZERO,
            Duration::from_secs(300),
        )?,
        refresh_cookie: raw.refresh_cookie,
        login_per_ip: c.rate("rate_limits.login_per_ip", &rl.login_per_ip)?,
        failed_logins_per_account: c.rate(
            "rate_limits.failed_logins_per_account",
            &rl.failed_logins_per_account,
        )?,
        lockout: c.duration("rate_limits.lockout", &rl.lockout, Duration::ZERO, DAY)?,
        register_per_ip: c.rate("rate_limits.register_per_ip", &rl.register_per_ip)?,
        refresh_per_session: c.rate("rate_limits.refresh_per_session", &rl.refresh_per_session)?,
    })
}

type TlsFiles = Option<(PathBuf, PathBuf)>;

fn tls(c: &Checker<'_>, raw: &RawConfig, mode: Mode) -> Result<TlsFiles, ConfigError> {
    let tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert), Some(key)) => Some((PathBuf::from(cert), PathBuf::from(key))),
        (None, None) => None,
        (Some(_), None) => return Err(c.fail("tls_key_file", "is required with tls_cert_file")),
        (None, Some(_)) => return Err(c.fail("tls_cert_file", "is required with tls_key_file")),
    };
    if mode == Mode::Production && tls.is_none() && !raw.behind_proxy {
        return Err(ConfigError(
            "production mode refuses plaintext: configure tls_cert_file and tls_key_file, or set \
             behind_proxy = true when a proxy terminates TLS"
                .into(),
        ));
    }
    Ok(tls)
}

fn engine(c: &Checker<'_>, raw: &RawConfig) -> Result<EngineConfig, ConfigError> {
    let listen: SocketAddr = raw.listen.parse().map_err(|_| {
        c.fail(
            "listen",
            format!("`{}` is not an IP:port address", raw.listen),
        )
    })?;
    let trusted_proxies = raw
        .trusted_proxies
        .iter()
        .map(|text| {
            text.parse::<Cidr>()
                .map_err(|e| c.fail("trusted_proxies", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for origin in &raw.allowed_origins {
        if !is_origin(origin) {
            return Err(c.fail(
                "allowed_origins",
                format!("`{origin}` is not an origin like https://app.example.com"),
            ));
        }
    }
    let mut default_rooms = Vec::with_capacity(raw.default_rooms.len());
    for room in &raw.default_rooms {
        let id =
            RoomId::parse(room).map_err(|e| c.fail("default_rooms", format!("`{room}`: {e}")))?;
        if id.is_personal() {
            return Err(c.fail(
                "default_rooms",
                format!("`{room}`: personal rooms are joined automatically"),
            ));
        }
        default_rooms.push(id);
    }
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
    let rl = &raw.rate_limits;
    Ok(EngineConfig {
        listen,
        shards: c.range("shards", raw.shards, 1, 256)?,
        max_message_bytes: c.size("max_message_bytes", raw.max_message_bytes, 128, 16 << 20)?,
        max_json_depth: c.range("max_json_depth", raw.max_json_depth, 2, 128)? as usize,
        compression_threshold: c.size(
            "compression_threshold",
            raw.compression_threshold,
            0,
            16 << 20,
        )?,
        default_rooms,
        implicit_rooms: raw.implicit_rooms,
        max_room_members: c.range("max_room_members", raw.max_room_members, 1, 10_000_000)?,
        max_connections_per_user: c.range(
            "max_connections_per_user",
            raw.max_connections_per_user,
            1,
            100_000,
        )?,
        session_conflict: c.choice(
            "session_conflict",
            &raw.session_conflict,
            &[
                ("close_oldest", ConflictPolicy::CloseOldest),
                ("reject_new", ConflictPolicy::RejectNew),
            ],
        )?,
        max_connections_per_ip: c.range(
            "max_connections_per_ip",
            raw.max_connections_per_ip,
            1,
            10_000_000,
        )?,
        max_rooms_per_connection,
        max_queued_bytes: c.size("max_queued_bytes", raw.max_queued_bytes, 4096, 1 << 30)?,
        history_size: c.range("history_size", raw.history_size, 0, 100_000)? as usize,
        history_ttl: c.duration("history_ttl", &raw.history_ttl, Duration::ZERO, 30 * DAY)?,
        history_room_bytes: c.size("history_room_bytes", raw.history_room_bytes, 4096, 1 << 30)?,
        history_total_bytes: c.size(
            "history_total_bytes",
            raw.history_total_bytes,
            1 << 20,
            64 << 30,
        )?,
        http_head_timeout: c.duration(
            "http_head_timeout",
            &raw.http_head_timeout,
            SECOND,
            Duration::from_secs(300),
        )?,
        http_body_timeout: c.duration(
            "http_body_timeout",
            &raw.http_body_timeout,
            SECOND,
            Duration::from_secs(300),
        )?,
        max_pending_per_ip: c.range("max_pending_per_ip", raw.max_pending_per_ip, 1, 1_000_000)?,
        resume_ttl: c.duration("resume_ttl", &raw.resume_ttl, Duration::ZERO, DAY)?,
        heartbeat: c.duration(
            "heartbeat",
            &raw.heartbeat,
            SECOND,
            Duration::from_secs(600),
        )?,
        presence_batch: c.duration(
            "presence_batch",
            &raw.presence_batch,
            Duration::ZERO,
            Duration::from_secs(10),
        )?,
        expiry_grace: c.duration(
            "expiry_grace",
            &raw.expiry_grace,
            Duration::ZERO,
            Duration::from_secs(300),
        )?,
        write_delay: c.duration(
            "write_delay",
            &raw.write_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?,
        busy_write_delay: c.duration(
            "busy_write_delay",
            &raw.busy_write_delay,
            Duration::ZERO,
            Duration::from_millis(100),
        )?,
        force_epoll: c.choice(
            "io_driver",
            &raw.io_driver,
            &[("auto", false), ("epoll", true)],
        )?,
        allowed_origins: raw.allowed_origins.clone(),
        allow_missing_origin: raw.allow_missing_origin,
        trusted_proxies,
        connect_per_ip: c.burst_rate(
            "rate_limits.connect_per_ip",
            &rl.connect_per_ip,
            "rate_limits.connect_burst",
            rl.connect_burst,
        )?,
        publish_per_connection: c.burst_rate(
            "rate_limits.publish_per_connection",
            &rl.publish_per_connection,
            "rate_limits.publish_burst",
            rl.publish_burst,
        )?,
        publish_per_room: c.plain_rate("rate_limits.publish_per_room", &rl.publish_per_room)?,
        query_per_connection: c
            .plain_rate("rate_limits.query_per_connection", &rl.query_per_connection)?,
        join_per_connection: c.burst_rate(
            "rate_limits.join_per_connection",
            &rl.join_per_connection,
            "rate_limits.join_burst",
            rl.join_burst,
        )?,
        shutdown_grace: SHUTDOWN_GRACE,
        redis: None,
        // The files are read by `serve` (and checked by `check-config`).
        tls: None,
    })
}

/// `node_id`, or a new one: 12 hex digits of a random UUID.
fn node_id(c: &Checker<'_>, raw: &RawConfig) -> Result<String, ConfigError> {
    let id = raw.node_id.trim();
    if id.is_empty() {
        return Ok(uuid::Uuid::new_v4().simple().to_string()[..12].to_owned());
    }
    let ok = id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(c.fail("node_id", "must be 1 to 64 of A-Z a-z 0-9 . _ -"));
    }
    Ok(id.to_owned())
}

/// The Redis section (SPEC §10): the URL parsed, the prefix and lease checked.
fn redis(
    c: &Checker<'_>,
    raw: &RawConfig,
    node_id: &str,
) -> Result<Option<RedisSettings>, ConfigError> {
    let prefix = raw.redis_prefix.trim();
    let prefix_ok = !prefix.is_empty()
        && prefix.len() <= 64
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'{' | b'}'));
    if !prefix_ok {
        return Err(c.fail(
            "redis_prefix",
            "must be 1 to 64 visible characters without { or }",
        ));
    }
    let node_ttl = c.duration(
        "node_ttl",
        &raw.node_ttl,
        Duration::from_secs(2),
        Duration::from_secs(300),
    )?;
    let Some(url) = &raw.redis_url else {
        if raw.redis_cluster {
            return Err(c.fail("redis_cluster", "needs redis_url"));
        }
        if raw.redis_ca_file.is_some() {
            return Err(c.fail("redis_ca_file", "needs a rediss:// redis_url"));
        }
        return Ok(None);
    };
    let target =
        parse_redis_urls(url, raw.redis_cluster).map_err(|why| c.fail("redis_url", why))?;
    if raw.redis_ca_file.is_some() && !target.tls {
        return Err(c.fail("redis_ca_file", "needs a rediss:// redis_url"));
    }
    Ok(Some(RedisSettings {
        seeds: target.seeds,
        cluster: raw.redis_cluster,
        username: target.username,
        password: target.password,
        db: target.db,
        prefix: prefix.to_owned(),
        node_id: node_id.to_owned(),
        node_ttl,
        // `rediss://`: made by `serve` from `redis_ca_file` (see `Config::redis_tls`).
        tls: None,
    }))
}

/// Where a `redis://` URL points.
#[derive(Debug, PartialEq, Eq)]
struct RedisTarget {
    addr: String,
    username: Option<String>,
    password: Option<String>,
    db: u32,
    /// `rediss://`.
    tls: bool,
}

/// Where `redis_url` points: one URL, or (cluster) a comma-separated list of seed nodes, which
/// must agree on the credentials; a cluster has only database 0.
#[derive(Debug, PartialEq, Eq)]
struct RedisTargets {
    seeds: Vec<String>,
    username: Option<String>,
    password: Option<String>,
    db: u32,
    tls: bool,
}

fn parse_redis_urls(text: &str, cluster: bool) -> Result<RedisTargets, String> {
    let urls: Vec<&str> = text.split(',').map(str::trim).collect();
    if urls.len() > 1 && !cluster {
        return Err("a list of seed nodes needs redis_cluster = true".into());
    }
    if urls.len() > 64 {
        return Err("at most 64 seed nodes".into());
    }
    let mut targets = urls.into_iter().map(parse_redis_url);
    let first = targets.next().unwrap_or_else(|| Err("is empty".into()))?;
    let mut seeds = vec![first.addr];
    for target in targets {
        let target = target?;
        if (&target.username, &target.password) != (&first.username, &first.password) {
            return Err("every seed node must name the same user and password".into());
        }
        if target.db != first.db {
            return Err("every seed node must name the same database".into());
        }
        if target.tls != first.tls {
            return Err("every seed node must use the same scheme (redis:// or rediss://)".into());
        }
        seeds.push(target.addr);
    }
    if cluster && first.db != 0 {
        return Err("a Redis Cluster has only database 0".into());
    }
    Ok(RedisTargets {
        seeds,
        username: first.username,
        password: first.password,
        db: first.db,
        tls: first.tls,
    })
}

/// `redis[s]://[user:pass@]host[:port][/db]` (percent-escapes decoded in user and password).
fn parse_redis_url(url: &str) -> Result<RedisTarget, String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("redis://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (rest, true)
    } else {
        return Err("must start with redis:// or rediss://".into());
    };
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
            .map_err(|_| "the user or password is not valid UTF-8".to_owned())
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(info) => match info.split_once(':') {
            Some((user, pass)) => (
                Some(decode(user)?).filter(|u| !u.is_empty()),
                Some(decode(pass)?),
            ),
            None => (Some(decode(info)?).filter(|u| !u.is_empty()), None),
        },
    };
    if hostport.is_empty() {
        return Err("names no host".into());
    }
    let has_port = match hostport.rfind(']') {
        Some(end) => hostport[end..].contains(':'),
        None => hostport.contains(':'),
    };
    let addr = if has_port {
        let port = hostport
            .rsplit_once(':')
            .map(|(_, p)| p)
            .unwrap_or_default();
        if port.parse::<u16>().is_err() {
            return Err(format!("`{port}` is not a port"));
        }
        hostport.to_owned()
    } else {
        format!("{hostport}:6379")
    };
    let db = match path.split('?').next().unwrap_or_default() {
        "" => 0,
        db => db
            .parse::<u32>()
            .map_err(|_| format!("`{db}` is not a database number"))?,
    };
    if path.contains('?') {
        return Err("query parameters are not supported".into());
    }
    Ok(RedisTarget {
        addr,
        username,
        password,
        db,
        tls,
    })
}

fn logs(c: &Checker<'_>, raw: &RawConfig) -> Result<(LogFormat, String), ConfigError> {
    let format = c.choice(
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
    Ok((format, raw.log_level.clone()))
}

/// `scheme://host[:port]` with no path, as browsers send `Origin`.
pub(crate) fn is_origin(text: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        let t = parse_redis_url("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.db, t.password),
            ("127.0.0.1:6380", 2, None)
        );
        let t = parse_redis_url("redis://app:p%40ss@cache.internal").unwrap();
        assert_eq!(t.addr, "cache.internal:6379");
        assert_eq!(t.username.as_deref(), Some("app"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = parse_redis_url("redis://:secret@[::1]:7000").unwrap();
        assert_eq!((t.addr.as_str(), t.username), ("[::1]:7000", None));
        assert_eq!(t.password.as_deref(), Some("secret"));
        let secure = parse_redis_url("rediss://h:6380").unwrap();
        assert!(secure.tls && secure.addr == "h:6380");
        assert!(
            parse_redis_urls("redis://a,rediss://b", true)
                .unwrap_err()
                .contains("same scheme")
        );
        assert!(parse_redis_url("http://h").is_err());
        assert!(parse_redis_url("redis://h:port").is_err());
        assert!(parse_redis_url("redis://h/x").is_err());
        assert!(parse_redis_url("redis://").is_err());
    }

    #[test]
    fn seed_lists_are_for_a_cluster_and_agree() {
        let t = parse_redis_urls("redis://a:7000, redis://b:7001", true).unwrap();
        assert_eq!(t.seeds, ["a:7000", "b:7001"]);
        assert!(
            parse_redis_urls("redis://a:7000,redis://b:7001", false)
                .unwrap_err()
                .contains("redis_cluster")
        );
        assert!(
            parse_redis_urls("redis://u:p@a,redis://u:q@b", true)
                .unwrap_err()
                .contains("same user")
        );
        assert!(
            parse_redis_urls("redis://a/1", true)
                .unwrap_err()
                .contains("database 0")
        );
        assert!(parse_redis_urls("redis://a,", true).is_err());
        let t = parse_redis_urls("redis://a/3", false).unwrap();
        assert_eq!((t.seeds.len(), t.db), (1, 3));
    }
}
