//! The `data` value of the native protocol: any JSON value, decoded from JSON or MessagePack into
//! one tree under a depth bound, with C0 control characters stripped from strings. The envelope's
//! own fields are read with the same seed but never altered ([`Strings::Keep`]): their rules are
//! checked by the caller, so a control character there is refused, not removed.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserializer, Serialize, Serializer};

/// A JSON-compatible value. Maps keep their keys in the order received.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null` / MessagePack nil.
    Null,
    /// A boolean.
    Bool(bool),
    /// A negative integer (non-negative integers are always [`Value::UInt`]).
    Int(i64),
    /// A non-negative integer.
    UInt(u64),
    /// A finite float.
    Float(f64),
    /// A UTF-8 string, C0 controls other than tab, CR and LF removed.
    Str(String),
    /// An array.
    Array(Vec<Value>),
    /// A map with string keys.
    Map(Vec<(String, Value)>),
}

impl Value {
    /// The value under `key` of a map.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is a non-negative one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::UInt(n) => Some(*n),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    /// Builds a map from pairs (tests and pushes).
    pub fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
        Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    /// A string value.
    pub fn str(s: &str) -> Value {
        Value::Str(s.to_owned())
    }

    /// Nesting depth: 0 for a scalar, 1 for a flat array or map.
    pub fn depth(&self) -> usize {
        match self {
            Value::Array(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Map(entries) => 1 + entries.iter().map(|(_, v)| v.depth()).max().unwrap_or(0),
            _ => 0,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Int(n) => serializer.serialize_i64(*n),
            Value::UInt(n) => serializer.serialize_u64(*n),
            Value::Float(f) => serializer.serialize_f64(*f),
            Value::Str(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = serializer.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// Removes C0 control characters except tab, CR and LF (SPEC §4). Borrows when there are none.
pub fn strip_c0(s: &str) -> std::borrow::Cow<'_, str> {
    let is_banned = |c: char| c < '\u{20}' && !matches!(c, '\t' | '\r' | '\n');
    if s.chars().any(is_banned) {
        std::borrow::Cow::Owned(s.chars().filter(|&c| !is_banned(c)).collect())
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Largest number of elements reserved up front for an array or map, whatever its header claims:
/// a MessagePack header may announce 2^32 elements in five bytes.
const MAX_PREALLOC: usize = 256;

/// What decoding does with the strings (values and map keys) it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strings {
    /// C0 controls other than tab, CR and LF are removed (`data`, SPEC §4).
    StripC0,
    /// Kept exactly as sent (envelope fields: the caller checks their rules and refuses).
    Keep,
}

/// Deserializes a [`Value`] whose containers start at nesting level `level` and may not go past
/// `max_depth`. In the envelope, `data` is at level 2 (the envelope itself is 1).
#[derive(Debug, Clone, Copy)]
pub struct ValueSeed {
    /// The level a container found here would have.
    pub level: usize,
    /// The deepest level allowed.
    pub max_depth: usize,
    /// Whether strings are stripped of C0 controls or kept as sent.
    pub strings: Strings,
}

impl ValueSeed {
    fn child(self) -> Self {
        Self {
            level: self.level + 1,
            ..self
        }
    }

    fn enter<E: de::Error>(self) -> Result<(), E> {
        if self.level > self.max_depth {
            Err(E::custom(format_args!(
                "nesting deeper than {} levels",
                self.max_depth
            )))
        } else {
            Ok(())
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value (no binary, extension or non-finite number)")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(u64::try_from(v).map_or(Value::Int(v), Value::UInt))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::UInt(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        if v.is_finite() {
            Ok(Value::Float(v))
        } else {
            Err(E::custom("non-finite number"))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(match self.strings {
            Strings::StripC0 => strip_c0(v).into_owned(),
            Strings::Keep => v.to_owned(),
        }))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        if self.strings == Strings::Keep {
            return Ok(Value::Str(v));
        }
        Ok(match strip_c0(&v) {
            std::borrow::Cow::Borrowed(_) => Value::Str(v),
            std::borrow::Cow::Owned(s) => Value::Str(s),
        })
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Value, E> {
        Err(E::custom("binary values are not allowed"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, _: D) -> Result<Value, D::Error> {
        Err(de::Error::custom("extension values are not allowed"))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("extension values are not allowed"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(MAX_PREALLOC));
        while let Some(key) = map.next_key_seed(KeySeed(self.strings))? {
            let value = map.next_value_seed(self.child())?;
            entries.push((key, value));
        }
        Ok(Value::Map(entries))
    }
}

/// A map key: must be a string (MessagePack integer or binary keys are refused). In `data`, C0
/// controls are stripped from keys too, so that no control character reaches a recipient anywhere
/// in it; elsewhere keys are kept as sent.
struct KeySeed(Strings);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string map key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(match self.0 {
            Strings::StripC0 => strip_c0(v).into_owned(),
            Strings::Keep => v.to_owned(),
        })
    }
}

/// Whether `s` holds a control character (C0, DEL or C1): never allowed in an envelope field.
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

impl Value {
    /// Removes C0 controls (other than tab, CR, LF) from every string and map key at any depth:
    /// what decoding with [`Strings::StripC0`] does, for a value read with [`Strings::Keep`].
    pub fn strip_c0_in_place(&mut self) {
        match self {
            Value::Str(s) => {
                if let std::borrow::Cow::Owned(clean) = strip_c0(s) {
                    *s = clean;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(Value::strip_c0_in_place),
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let std::borrow::Cow::Owned(clean) = strip_c0(k) {
                        *k = clean;
                    }
                    v.strip_c0_in_place();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_c0_keeps_tab_cr_lf_and_non_ascii() {
        assert_eq!(
            strip_c0("a\u{0}b\u{1b}[31mc\td\r\ne\u{7f}é"),
            "ab[31mc\td\r\ne\u{7f}é"
        );
        assert!(matches!(strip_c0("plain"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(Value::Null.depth(), 0);
        assert_eq!(
            Value::Array(vec![Value::map([("a", Value::Array(vec![]))])]).depth(),
            3
        );
    }
}
