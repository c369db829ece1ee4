//! Value syntaxes of the configuration: durations (`"15m"`, read by `humantime`), rates
//! (`"30/1m"`), byte sizes (`"1MiB"`), and lenient deserializers that accept the string form every
//! environment variable and flag arrives in. The size parser is hand-written (a dozen lines): it
//! reads exactly the units the documentation lists, where size crates differ on whether `KB`
//! means 1000 or 1024.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `"250ms"`, `"10s"`, `"15m"`, `"24h"`, `"30d"`, or a sum such as `"1h30m"`, through
/// `humantime` (which also reads the long unit names: `"15min"`, `"2 hours"`, `"1week"`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration (expected e.g. \"300ms\", \"15m\", \"24h\"): {e}")
    })
}

/// Formats a duration the way the configuration writes it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A rate `"COUNT/DURATION"`; `COUNT = 0` disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per `per`.
    pub count: u32,
    /// The window.
    pub per: Duration,
}

impl Rate {
    /// Whether this limit is switched off (`"0/…"`).
    pub const fn is_disabled(&self) -> bool {
        self.count == 0
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (count, per) = text.split_once('/').ok_or_else(|| {
            format!("`{text}` is not a rate (expected \"COUNT/DURATION\", e.g. \"30/1m\")")
        })?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: COUNT must be a whole number"))?;
        let per = per.trim();
        // "10/s" reads as "10/1s".
        let per = if per.bytes().next().is_some_and(|b| b.is_ascii_alphabetic()) {
            parse_duration(&format!("1{per}"))?
        } else {
            parse_duration(per)?
        };
        if per.is_zero() {
            return Err(format!("`{text}`: the window must be longer than zero"));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, format_duration(self.per))
    }
}

/// Parses a byte size: `65536`, `"64KiB"`, `"1MiB"`, `"1 MiB"`, `"2MB"` (decimal).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!(
            "`{text}` is not a size (expected e.g. 65536, \"64KiB\", \"1MiB\")"
        ));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("`{text}`: too large"))?;
    let factor: u64 = match t[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("`{text}`: too large"))
}

/// Reads a scalar that TOML may give natively (integer, boolean) or as a string (environment
/// variables and flags), and parses it with `FromStr`.
pub(super) fn lenient<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a number or a string, found {}",
                other.type_str()
            )));
        }
    };
    text.trim()
        .parse::<T>()
        .map_err(|e| serde::de::Error::custom(format!("`{text}`: {e}")))
}

/// Reads a list of strings: a TOML array, or a string holding a TOML array (`'["a","b"]'`) or a
/// comma-separated list (`"a,b"`; empty means none).
pub(super) fn lenient_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let items = match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items,
        toml::Value::String(s) if s.trim_start().starts_with('[') => {
            #[derive(Deserialize)]
            struct Wrapper {
                v: Vec<toml::Value>,
            }
            toml::from_str::<Wrapper>(&format!("v = {s}"))
                .map_err(|e| serde::de::Error::custom(format!("not a list: {}", e.message())))?
                .v
        }
        toml::Value::String(s) => {
            return Ok(s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect());
        }
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a list of strings, found {}",
                other.type_str()
            )));
        }
    };
    items
        .into_iter()
        .map(|item| match item {
            toml::Value::String(s) => Ok(s),
            other => Err(serde::de::Error::custom(format!(
                "list items must be strings, found {}",
                other.type_str()
            ))),
        })
        .collect()
}

/// A boolean that also accepts `"true"`/`"false"`/`"1"`/`"0"`/`"yes"`/`"no"` strings.
pub(super) fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::Boolean(b) => Ok(b),
        toml::Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(serde::de::Error::custom(format!("`{s}` is not a boolean"))),
        },
        other => Err(serde::de::Error::custom(format!(
            "expected a boolean, found {}",
            other.type_str()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86400)));
        assert_eq!(parse_duration("15min"), Ok(Duration::from_secs(900)));
        assert!(parse_duration("15").unwrap_err().contains("not a duration"));
        assert!(
            parse_duration("15q")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(format_duration(Duration::from_secs(900)), "15m");
        assert_eq!(format_duration(Duration::from_millis(100)), "100ms");
    }

    #[test]
    fn rates() {
        assert_eq!(
            "30/1m".parse(),
            Ok(Rate {
                count: 30,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            "10/s".parse(),
            Ok(Rate {
                count: 10,
                per: Duration::from_secs(1)
            })
        );
        assert!("0/1s".parse::<Rate>().unwrap().is_disabled());
        assert!("30".parse::<Rate>().is_err());
        assert!("x/1s".parse::<Rate>().is_err());
        assert!("1/0s".parse::<Rate>().is_err());
        assert_eq!(
            Rate {
                count: 5,
                per: Duration::from_secs(900)
            }
            .to_string(),
            "5/15m"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert!(parse_bytes("1XB").is_err());
    }
}
