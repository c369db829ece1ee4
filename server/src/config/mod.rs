//! Configuration of the `ringhub` binary (SPEC §1 and §9), in two stages: [`RawConfig`] is what
//! the layers (defaults, TOML file, `RINGHUB_*` environment, flags) say, with unknown keys refused;
//! [`Config`] is the validated value with every bound checked and every duration and rate parsed
//! (`validate`, by section; the engine's section is the engine's own [`EngineConfig`]).
//! Secrets are resolved separately ([`secrets`]), because only `serve` may generate them.
//!
//! This module reads files and the environment it is given; it starts nothing.

pub mod keys;
mod layers;
mod net;
mod raw;
pub mod secrets;
pub(crate) mod validate;
mod values;

use std::path::PathBuf;
use std::time::Duration;

pub use engine::EngineConfig;
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

/// `log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Where accounts, sessions and rooms are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Data directory (SQLite, generated secrets).
    pub data_dir: PathBuf,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// PostgreSQL read replica.
    pub database_read_url: Option<String>,
    /// PostgreSQL pool size.
    pub database_pool: u32,
    /// Consecutive unreachable-database failures that open the PostgreSQL circuit breaker.
    pub breaker_failures: u32,
    /// How long the open breaker waits before each probe.
    pub breaker_probe: Duration,
    /// The roots `sslmode=verify-ca`/`verify-full` check PostgreSQL's certificate against.
    pub database_ca_file: Option<PathBuf>,
}

/// Tokens, passwords, sessions and the abuse limits of the account routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSettings {
    /// Signing algorithm.
    pub jwt_algorithm: JwtAlgorithm,
    /// Ed25519 key file.
    pub jwt_private_key_file: Option<PathBuf>,
    /// Access token lifetime.
    pub access_ttl: Duration,
    /// Refresh token lifetime (sliding).
    pub refresh_ttl: Duration,
    /// Session lifetime cap.
    pub session_max_age: Duration,
    /// Token binding.
    pub token_binding: TokenBinding,
    /// bcrypt cost.
    pub bcrypt_cost: u32,
    /// Hash queue bound.
    pub hash_queue: u32,
    /// Reuse window of a rotated refresh token.
    pub refresh_reuse_interval: Duration,
    /// Deliver the refresh token as a cookie.
    pub refresh_cookie: bool,
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
    /// Lifetime of the encrypted user cache in Redis (zero: no cache).
    pub user_cache_ttl: Duration,
}

/// The validated configuration, by section. Every value is held once: the engine's part is the
/// [`EngineConfig`] the engine starts with.
#[derive(Debug, Clone)]
pub struct Config {
    /// What was written, for `check-config`.
    pub raw: RawConfig,
    /// Development or production.
    pub mode: Mode,
    /// This process's name (configured, or generated at start).
    pub node_id: String,
    /// Storage.
    pub storage: StorageConfig,
    /// Accounts and tokens.
    pub accounts: AccountSettings,
    /// The engine: listener, shards, WebSocket and room bounds, timings, origins, proxies and the
    /// WebSocket rate limits.
    pub engine: EngineConfig,
    /// TLS certificate and key files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// `rediss://`: TLS to Redis.
    pub redis_tls: bool,
    /// The roots Redis's certificate is checked against (else the system's).
    pub redis_ca_file: Option<PathBuf>,
    /// TLS terminated in front.
    pub behind_proxy: bool,
    /// Keep transparent huge pages for the process (off by default).
    pub transparent_huge_pages: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level.
    pub log_level: String,
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
        assert_eq!(c.engine.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.mode, Mode::Development);
        assert_eq!(c.accounts.access_ttl, Duration::from_secs(900));
        assert_eq!(c.accounts.session_max_age, Duration::from_secs(30 * 86400));
        assert_eq!(c.engine.max_queued_bytes, 1 << 20);
        assert_eq!(c.engine.default_rooms.len(), 1);
        assert_eq!(c.engine.heartbeat, Duration::from_secs(25));
        assert_eq!(c.engine.connect_per_ip.burst, 100);
        assert_eq!(c.accounts.login_per_ip.to_string(), "30/1m");
        assert_eq!(
            c.engine.session_conflict,
            engine::ConflictPolicy::CloseOldest
        );
        assert!(c.engine.allow_missing_origin);
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
        assert_eq!(c.accounts.bcrypt_cost, 4);
        assert!(!c.engine.implicit_rooms);
        assert_eq!(
            c.engine
                .default_rooms
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(c.engine.allowed_origins, ["https://x.example"]);
        assert_eq!(c.engine.max_queued_bytes, 65536);
        assert_eq!(c.engine.publish_per_connection.burst, 80);
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
        // A CA file only verifying modes read is refused with any other sslmode.
        let url = "postgres://u@h/db?sslmode=require";
        let e = build(
            &[],
            &[("--database-url", url), ("--database-ca-file", "/ca.pem")],
        )
        .unwrap_err()
        .0;
        assert!(
            e.contains("`database_ca_file`") && e.contains("verify-ca"),
            "{e}"
        );
        let url = "postgres://u@h/db?sslmode=verify-full";
        assert!(
            build(
                &[],
                &[("--database-url", url), ("--database-ca-file", "/ca.pem")]
            )
            .is_ok()
        );
        let e = build(&[], &[("--heartbeat", "25")]).unwrap_err().0;
        assert!(
            e.contains("`heartbeat`") && e.contains("not a duration"),
            "{e}"
        );
        let e = build(&[], &[("--default-rooms", "user:x")]).unwrap_err().0;
        assert!(e.contains("personal rooms"), "{e}");
        // The breaker guards PostgreSQL: changing it without a database is refused.
        let e = build(&[], &[("--breaker-probe", "5s")]).unwrap_err().0;
        assert!(
            e.contains("`breaker_probe`") && e.contains("needs database_url"),
            "{e}"
        );
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
