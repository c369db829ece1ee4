//! Signing and encryption secrets: taken from the configuration, or in development mode loaded
//! from (and on first start generated into) `data_dir/secrets.toml`, mode 0600. Production mode
//! refuses missing or weak secrets. Secret values never reach `Debug` output or logs.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, JwtAlgorithm, Mode};

/// The file in `data_dir` holding generated development secrets.
pub const SECRETS_FILE: &str = "secrets.toml";
/// Shortest secret accepted in production, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// The resolved secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// HS256 signing secret (empty with EdDSA).
    pub jwt_secret: Vec<u8>,
    /// Retired HS256 secrets, accepted for verification.
    pub jwt_secrets_old: Vec<Vec<u8>>,
    /// AES-256-GCM key.
    pub encryption_key: [u8; 32],
    /// Retired AES keys, accepted for reading.
    pub encryption_keys_old: Vec<[u8; 32]>,
    /// HMAC key of the e-mail blind index.
    pub blind_index_key: Vec<u8>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets { *** }")
    }
}

/// Whether missing development secrets may be written to disk now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generate {
    /// `serve`, `token`, `migrate`: create what is missing.
    Allowed,
    /// `check-config`: read only.
    Forbidden,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredSecrets {
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    encryption_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blind_index_key: Option<String>,
}

/// (key, where its value comes from), for `check-config`.
pub type SecretNotes = Vec<(&'static str, String)>;

/// Resolves the secrets of `config`. Returns `None` when some are still to be generated and
/// `generate` forbids it, and in every case notes (key, where it comes from) for `check-config`.
pub fn resolve(
    config: &Config,
    generate: Generate,
) -> Result<(Option<Secrets>, SecretNotes), ConfigError> {
    let raw = &config.raw;
    let production = config.mode == Mode::Production;
    let needs_jwt_secret = config.accounts.jwt_algorithm == JwtAlgorithm::Hs256;
    let path = config.storage.data_dir.join(SECRETS_FILE);
    let mut stored = if production {
        StoredSecrets::default()
    } else {
        read_stored(&path)?
    };
    let mut notes = Vec::new();
    let mut changed = false;
    let mut missing = false;

    let mut take = |key: &'static str,
                    configured: &Option<String>,
                    slot: &mut Option<String>,
                    make: fn() -> Result<String, ConfigError>|
     -> Result<Option<String>, ConfigError> {
        if let Some(value) = configured {
            return Ok(Some(value.clone()));
        }
        if production {
            return Err(ConfigError(format!(
                "production mode requires `{key}` (at least {MIN_SECRET_BYTES} bytes; set it in the config file or RINGHUB_{})",
                key.to_ascii_uppercase()
            )));
        }
        if let Some(value) = slot {
            notes.push((key, format!("from {}", path.display())));
            return Ok(Some(value.clone()));
        }
        if generate == Generate::Allowed {
            let value = make()?;
            *slot = Some(value.clone());
            changed = true;
            notes.push((key, format!("generated into {}", path.display())));
            Ok(Some(value))
        } else {
            missing = true;
            notes.push((
                key,
                format!("will be generated into {} at first start", path.display()),
            ));
            Ok(None)
        }
    };

    let jwt_secret = if needs_jwt_secret {
        take(
            "jwt_secret",
            &raw.jwt_secret,
            &mut stored.jwt_secret,
            random_base64,
        )?
    } else {
        Some(String::new())
    };
    let encryption_key = take(
        "encryption_key",
        &raw.encryption_key,
        &mut stored.encryption_key,
        random_base64,
    )?;
    let blind_index_key = take(
        "blind_index_key",
        &raw.blind_index_key,
        &mut stored.blind_index_key,
        random_base64,
    )?;
    if changed {
        write_stored(&config.storage.data_dir, &path, &stored)?;
    }
    let strong = |key: &str, value: &str| -> Result<(), ConfigError> {
        if production && value.len() < MIN_SECRET_BYTES {
            return Err(ConfigError(format!(
                "production mode refuses `{key}`: shorter than {MIN_SECRET_BYTES} bytes"
            )));
        }
        if value.is_empty() {
            return Err(ConfigError(format!("`{key}` must not be empty")));
        }
        Ok(())
    };
    // Check every value that is known now, even when others are still to be generated.
    for old in &raw.jwt_secrets_old {
        strong("jwt_secrets_old", old)?;
    }
    if let (true, Some(secret)) = (needs_jwt_secret, &jwt_secret) {
        strong("jwt_secret", secret)?;
    }
    if let Some(key) = &blind_index_key {
        strong("blind_index_key", key)?;
    }
    let encryption_key = encryption_key
        .map(|k| aes_key("encryption_key", &k))
        .transpose()?;
    let encryption_keys_old = raw
        .encryption_keys_old
        .iter()
        .map(|k| aes_key("encryption_keys_old", k))
        .collect::<Result<Vec<_>, _>>()?;
    let (false, Some(jwt_secret), Some(encryption_key), Some(blind_index_key)) =
        (missing, jwt_secret, encryption_key, blind_index_key)
    else {
        return Ok((None, notes));
    };
    let secrets = Secrets {
        jwt_secret: jwt_secret.into_bytes(),
        jwt_secrets_old: raw
            .jwt_secrets_old
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        encryption_key,
        encryption_keys_old,
        blind_index_key: blind_index_key.into_bytes(),
    };
    Ok((Some(secrets), notes))
}

fn aes_key(key: &str, text: &str) -> Result<[u8; 32], ConfigError> {
    let bytes = data_encoding::BASE64
        .decode(text.trim().as_bytes())
        .map_err(|_| {
            ConfigError(format!(
                "`{key}` must be base64 (e.g. from `openssl rand -base64 32`)"
            ))
        })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        ConfigError(format!(
            "`{key}` must decode to exactly 32 bytes, got {}",
            bytes.len()
        ))
    })
}

fn random_base64() -> Result<String, ConfigError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ConfigError(format!("no randomness for secrets: {e}")))?;
    Ok(data_encoding::BASE64.encode(&bytes))
}

fn read_stored(path: &Path) -> Result<StoredSecrets, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.message()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoredSecrets::default()),
        Err(e) => Err(ConfigError(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Writes the file with mode 0600 through a temporary file and a rename, so that a crash never
/// leaves a half-written secret behind.
fn write_stored(dir: &Path, path: &Path, stored: &StoredSecrets) -> Result<(), ConfigError> {
    let io = |e: std::io::Error| ConfigError(format!("cannot write {}: {e}", path.display()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let text = toml::to_string(stored).map_err(|e| ConfigError(e.to_string()))?;
    let tmp: PathBuf = dir.join(format!(".{SECRETS_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(b"# Generated by ringhub in development mode. Keep private; do not commit.\n")
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
