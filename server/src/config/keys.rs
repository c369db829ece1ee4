//! The list of configuration keys, read from the configuration structs themselves (the field names
//! serde derives for [`RawConfig`] and [`RawRateLimits`]) so that the command line, which offers
//! every key as a flag, cannot fall behind them. Owns no parsing and no defaults of its own.

use serde::de::{self, Deserialize, Deserializer, Visitor};

use super::raw::{RawConfig, RawRateLimits};

/// One configuration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Its name as in the TOML file, with `.` for nesting: `rate_limits.login_per_ip`.
    pub name: String,
    /// Its built-in default as a flag would write it; `None` for keys that are unset by default.
    pub default: Option<String>,
}

/// Every key, in the order the structs declare them.
pub fn all() -> Vec<Key> {
    let defaults = toml::Table::new()
        .try_into::<RawConfig>()
        .ok()
        .and_then(|raw| toml::Table::try_from(raw).ok())
        .unwrap_or_default();
    let mut keys = Vec::new();
    for &field in field_names::<RawConfig>() {
        match defaults.get(field) {
            Some(toml::Value::Table(nested)) if field == "rate_limits" => {
                for &inner in field_names::<RawRateLimits>() {
                    keys.push(Key {
                        name: format!("{field}.{inner}"),
                        default: nested.get(inner).map(as_flag),
                    });
                }
            }
            value => keys.push(Key {
                name: field.to_owned(),
                default: value.map(as_flag),
            }),
        }
    }
    keys
}

fn as_flag(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(items) => items.iter().map(as_flag).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The field names a derived `Deserialize` announces to `deserialize_struct`.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut probe = FieldProbe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

/// A deserializer that only records the fields it is asked for and then gives up.
struct FieldProbe(&'static [&'static str]);

impl<'de> Deserializer<'de> for &mut FieldProbe {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("field probe"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("field probe"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_key_including_the_unset_ones() {
        let keys = all();
        let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
        for expected in [
            "listen",
            "database_url",
            "jwt_secret",
            "tls_key_file",
            "rate_limits.login_per_ip",
            "rate_limits.join_burst",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        assert!(!names.contains(&"rate_limits"));
        let listen = keys
            .iter()
            .find(|k| k.name == "listen")
            .map(|k| k.default.clone());
        assert_eq!(listen, Some(Some("127.0.0.1:8080".to_owned())));
        let url = keys
            .iter()
            .find(|k| k.name == "database_url")
            .map(|k| k.default.clone());
        assert_eq!(url, Some(None));
        let rooms = keys
            .iter()
            .find(|k| k.name == "default_rooms")
            .map(|k| k.default.clone());
        assert_eq!(rooms, Some(Some("lobby".to_owned())));
    }

    #[test]
    fn every_listed_key_is_accepted_and_the_defaults_are_the_defaults() {
        let mut table = toml::Table::new();
        let mut limits = toml::Table::new();
        for key in all() {
            let value = toml::Value::String(key.default.unwrap_or_else(|| "x".to_owned()));
            match key.name.split_once('.') {
                Some((_, inner)) => limits.insert(inner.to_owned(), value),
                None => table.insert(key.name, value),
            };
        }
        table.insert("rate_limits".into(), limits.into());
        let raw: RawConfig = table.try_into().expect("every key is a field");
        let mut expected: RawConfig = toml::Table::new().try_into().expect("defaults");
        expected.database_url = raw.database_url.clone();
        expected.database_read_url = raw.database_read_url.clone();
        expected.redis_url = raw.redis_url.clone();
        expected.jwt_secret = raw.jwt_secret.clone();
        expected.jwt_private_key_file = raw.jwt_private_key_file.clone();
        expected.encryption_key = raw.encryption_key.clone();
        expected.blind_index_key = raw.blind_index_key.clone();
        expected.tls_cert_file = raw.tls_cert_file.clone();
        expected.tls_key_file = raw.tls_key_file.clone();
        expected.database_ca_file = raw.database_ca_file.clone();
        expected.redis_ca_file = raw.redis_ca_file.clone();
        assert_eq!(raw, expected);
    }
}
