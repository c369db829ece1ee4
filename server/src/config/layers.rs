//! Where configuration comes from and in which order (SPEC §1): built-in defaults, a TOML file,
//! `RINGHUB_*` environment variables (`__` for nesting), command-line flags; later wins. Every
//! value remembers its source so that an error names the file, variable or flag to fix.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "RINGHUB_";
/// The environment variable naming the configuration file (an alternative to `--config`).
pub const ENV_CONFIG_FILE: &str = "RINGHUB_CONFIG";

/// The source of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable (its name).
    Env(String),
    /// A command-line flag (as written).
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in default"),
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Env(name) => write!(f, "environment variable {name}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One source's values, with a per-key origin for env and flags (each key has its own).
#[derive(Debug, Clone)]
pub struct Layer {
    table: Table,
    origins: Vec<(String, Origin)>,
    file: Option<PathBuf>,
}

impl Layer {
    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let table: Table =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        Ok(Self {
            table,
            origins: Vec::new(),
            file: Some(path.to_owned()),
        })
    }

    /// The `RINGHUB_*` variables among `vars` (`RINGHUB_RATE_LIMITS__LOGIN_PER_IP` →
    /// `rate_limits.login_per_ip`). `RINGHUB_CONFIG` is not a key and is skipped.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut layer = Self {
            table: Table::new(),
            origins: Vec::new(),
            file: None,
        };
        for (name, value) in vars {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if name == ENV_CONFIG_FILE || key.is_empty() {
                continue;
            }
            let path: Vec<String> = key.split("__").map(str::to_ascii_lowercase).collect();
            layer.insert(&path, value, Origin::Env(name.clone()))?;
        }
        Ok(layer)
    }

    /// Flags `--key value` / `--key=value` (`-` and `_` alike, `.` for nesting).
    pub fn from_flags(flags: &[(String, String)]) -> Result<Self, String> {
        let mut layer = Self {
            table: Table::new(),
            origins: Vec::new(),
            file: None,
        };
        for (flag, value) in flags {
            let key = flag.trim_start_matches('-');
            let path: Vec<String> = key.split('.').map(|p| p.replace('-', "_")).collect();
            layer.insert(&path, value.clone(), Origin::Flag(format!("--{key}")))?;
        }
        Ok(layer)
    }

    fn insert(&mut self, path: &[String], value: String, origin: Origin) -> Result<(), String> {
        if path.iter().any(String::is_empty) {
            return Err(format!("{origin}: malformed key"));
        }
        let mut table = &mut self.table;
        for part in &path[..path.len() - 1] {
            let entry = table
                .entry(part.clone())
                .or_insert_with(|| Value::Table(Table::new()));
            table = match entry {
                Value::Table(t) => t,
                _ => return Err(format!("{origin}: `{part}` is not a table")),
            };
        }
        table.insert(path[path.len() - 1].clone(), Value::String(value));
        self.origins.push((path.join("."), origin));
        Ok(())
    }

    fn origin_of(&self, key: &str) -> Option<Origin> {
        if let Some((_, origin)) = self.origins.iter().rev().find(|(k, _)| k == key) {
            return Some(origin.clone());
        }
        let file = self.file.as_ref()?;
        let mut value: Option<&Value> = None;
        let mut table = &self.table;
        for part in key.split('.') {
            value = table.get(part);
            match value {
                Some(Value::Table(t)) => table = t,
                Some(_) => {}
                None => return None,
            }
        }
        value.map(|_| Origin::File(file.clone()))
    }
}

/// The merged layers.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    layers: Vec<Layer>,
}

impl Layers {
    /// Adds a layer on top (later wins).
    pub fn push(&mut self, layer: Layer) {
        self.layers.push(layer);
    }

    /// The merged table.
    pub fn merged(&self) -> Table {
        let mut out = Table::new();
        for layer in &self.layers {
            merge(&mut out, &layer.table);
        }
        out
    }

    /// Which source set `key` last (dotted path).
    pub fn origin_of(&self, key: &str) -> Origin {
        self.layers
            .iter()
            .rev()
            .find_map(|l| l.origin_of(key))
            .unwrap_or(Origin::Default)
    }
}

fn merge(into: &mut Table, from: &Table) {
    for (key, value) in from {
        match (into.get_mut(key), value) {
            (Some(Value::Table(a)), Value::Table(b)) => merge(a, b),
            _ => {
                into.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_nest_with_double_underscore_and_later_layers_win() {
        let env = Layer::from_env([
            (
                "RINGHUB_RATE_LIMITS__LOGIN_PER_IP".to_owned(),
                "5/1m".to_owned(),
            ),
            ("RINGHUB_LISTEN".to_owned(), "127.0.0.1:1".to_owned()),
            ("RINGHUB_CONFIG".to_owned(), "x.toml".to_owned()),
            ("OTHER".to_owned(), "ignored".to_owned()),
        ])
        .unwrap();
        let flags =
            Layer::from_flags(&[("--listen".to_owned(), "127.0.0.1:2".to_owned())]).unwrap();
        let mut layers = Layers::default();
        layers.push(env);
        layers.push(flags);
        let merged = layers.merged();
        assert_eq!(merged["listen"].as_str(), Some("127.0.0.1:2"));
        assert_eq!(merged["rate_limits"]["login_per_ip"].as_str(), Some("5/1m"));
        assert!(merged.get("config").is_none());
        assert_eq!(layers.origin_of("listen"), Origin::Flag("--listen".into()));
        assert_eq!(
            layers.origin_of("rate_limits.login_per_ip"),
            Origin::Env("RINGHUB_RATE_LIMITS__LOGIN_PER_IP".into())
        );
        assert_eq!(layers.origin_of("shards"), Origin::Default);
    }

    #[test]
    fn flags_accept_dashes_and_dots() {
        let flags =
            Layer::from_flags(&[("--rate-limits.join-burst".to_owned(), "7".to_owned())]).unwrap();
        let mut layers = Layers::default();
        layers.push(flags);
        assert_eq!(
            layers.merged()["rate_limits"]["join_burst"].as_str(),
            Some("7")
        );
    }
}
