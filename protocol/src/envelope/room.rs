//! Room ids (SPEC §5): `^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$`, and the personal room `user:<id>`.

use std::fmt;
use std::sync::Arc;

/// A validated room id. Shared (`Arc<str>`): the engine keeps one id in many tables and in every
/// delivery, and a clone must cost neither an allocation nor a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(Arc<str>);

/// Why a string is not a room id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RoomIdError {
    /// Empty, or longer than 128 bytes.
    #[error("room id must be 1 to 128 characters")]
    Length,
    /// A character outside the allowed set, or a first character that is not alphanumeric.
    #[error("room id must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,127}}$")]
    Character,
}

impl RoomId {
    /// Longest id in bytes.
    pub const MAX_LEN: usize = 128;
    /// Prefix of personal rooms.
    pub const PERSONAL_PREFIX: &'static str = "user:";

    /// Validates `id`.
    pub fn parse(id: &str) -> Result<Self, RoomIdError> {
        Self::check(id)?;
        Ok(Self(Arc::from(id)))
    }

    /// Validates without allocating.
    pub fn check(id: &str) -> Result<(), RoomIdError> {
        let bytes = id.as_bytes();
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Err(RoomIdError::Length);
        }
        if !bytes[0].is_ascii_alphanumeric() {
            return Err(RoomIdError::Character);
        }
        if bytes[1..].iter().all(|&b| Self::allowed_after_first(b)) {
            Ok(())
        } else {
            Err(RoomIdError::Character)
        }
    }

    /// Whether `b` may appear after a room id's first character.
    fn allowed_after_first(b: u8) -> bool {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-')
    }

    /// Whether `user_id` makes a valid personal room id, without building it.
    pub fn personal_is_valid(user_id: &str) -> bool {
        Self::PERSONAL_PREFIX.len() + user_id.len() <= Self::MAX_LEN
            && user_id.bytes().all(Self::allowed_after_first)
    }

    /// The personal room of a user.
    pub fn personal(user_id: &str) -> Result<Self, RoomIdError> {
        Self::parse(&format!("{}{user_id}", Self::PERSONAL_PREFIX))
    }

    /// Whether this is a personal room (`user:` prefix), never created implicitly.
    pub fn is_personal(&self) -> bool {
        self.0.starts_with(Self::PERSONAL_PREFIX)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RoomId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_spec_alphabet() {
        for ok in [
            "a",
            "lobby",
            "Z9",
            "user:0b6e-42",
            "team.chat@2026:x_y-z",
            &"a".repeat(128),
        ] {
            assert_eq!(RoomId::check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(RoomId::check(""), Err(RoomIdError::Length));
        assert_eq!(RoomId::check(&"a".repeat(129)), Err(RoomIdError::Length));
        for bad in ["-a", "_a", ":a", "a b", "a/b", "é", "a\u{0}", "a#", "room!"] {
            assert_eq!(RoomId::check(bad), Err(RoomIdError::Character), "{bad}");
        }
        assert!(RoomId::personal("abc").unwrap().is_personal());
        for user in ["abc", "", "a b", "é", &"x".repeat(123), &"x".repeat(124)] {
            assert_eq!(
                RoomId::personal_is_valid(user),
                RoomId::personal(user).is_ok(),
                "{user:?}"
            );
        }
    }
}

/// A custom event name (SPEC §8): 1–64 characters of `[A-Za-z0-9_.:-]`, not one of the names
/// Socket.IO and the protocol reserve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventName(Arc<str>);

/// Names a custom event may not take.
pub const RESERVED_EVENTS: [&str; 9] = [
    "join",
    "leave",
    "message",
    "presence",
    "kicked",
    "error",
    "connect",
    "disconnect",
    "connect_error",
];

impl EventName {
    /// Checks `name` against the rules.
    pub fn parse(name: &str) -> Result<Self, &'static str> {
        if name.is_empty() || name.len() > 64 {
            return Err("event must be 1 to 64 characters");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err("event may hold only A-Z a-z 0-9 _ . : -");
        }
        if RESERVED_EVENTS.contains(&name) {
            return Err("event is a reserved name");
        }
        Ok(Self(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod event_tests {
    use super::EventName;

    #[test]
    fn event_names_follow_the_rules() {
        for good in ["dance", "chat.typing", "a:b-c_d", &"x".repeat(64)] {
            assert_eq!(EventName::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "message",
            "join",
            "connect_error",
            "sp ace",
            "é",
            &"x".repeat(65),
        ] {
            assert!(EventName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
