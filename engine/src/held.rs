//! What the server keeps in Redis besides rooms (SPEC §10 "Failures"): the encrypted user cache
//! and the sessions created while PostgreSQL is unreachable, held until they are written back.
//! Here are the questions ([`HeldAsk`]) and the answers ([`HeldReply`]); the shared broker runs
//! each as one command or one script. Values are opaque bytes: the server seals them before they
//! leave it (nothing readable is ever stored), so this module never sees a secret in clear.
//! Plain types.

/// A session held in Redis: its id, the hash (hex) of its current refresh token, and the sealed
/// record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSession {
    /// Session id.
    pub id: String,
    /// Hex of the SHA-256 of the current refresh token.
    pub token: String,
    /// The sealed session record.
    pub value: Vec<u8>,
}

/// One question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldAsk {
    /// The cached value under `key`, if any (a tombstone reads as none).
    CacheGet {
        /// The entry (without the prefix), e.g. the e-mail's blind index in hex.
        key: String,
    },
    /// Caches `value` for `ttl_ms`, unless the entry was dropped after `read_at_ms` (the value
    /// was read from the database before a change that must win).
    CachePut {
        /// The entry.
        key: String,
        /// The sealed value.
        value: Vec<u8>,
        /// When the value was read from the database.
        read_at_ms: i64,
        /// How long it is kept.
        ttl_ms: u64,
    },
    /// Drops the entry and leaves a tombstone dated `at_ms` for `ttl_ms`, so that a value read
    /// before `at_ms` is never cached again.
    CacheDrop {
        /// The entry.
        key: String,
        /// When the change happened.
        at_ms: i64,
        /// How long the tombstone is kept (the cache's lifetime).
        ttl_ms: u64,
    },
    /// Holds a new session (refused when `limit` sessions are held already).
    SessionHold {
        /// The session.
        session: HeldSession,
        /// Most sessions held at once.
        limit: u32,
    },
    /// The held session whose current refresh token hashes to `token`.
    SessionFind {
        /// Hex of the token's hash.
        token: String,
    },
    /// Rotates a held session's refresh token from `old` to `session.token` and stores its new
    /// record, only if `old` is still current.
    SessionRotate {
        /// The new state.
        session: HeldSession,
        /// Hex of the hash the client presented.
        old: String,
    },
    /// Up to `limit` held sessions (for the write-back).
    SessionsHeld {
        /// Most returned.
        limit: u32,
    },
    /// Forgets a held session once written back, only if `token` is still its current one.
    SessionRelease {
        /// The session id.
        id: String,
        /// Hex of the token hash that was written back.
        token: String,
    },
}

impl HeldAsk {
    /// The key it is about (without the service's prefix): the cache entry's own, or the one
    /// hash every held session lives in.
    pub(crate) fn key(&self) -> String {
        match self {
            Self::CacheGet { key } | Self::CachePut { key, .. } | Self::CacheDrop { key, .. } => {
                format!("{{uc:{key}}}")
            }
            Self::SessionHold { .. }
            | Self::SessionFind { .. }
            | Self::SessionRotate { .. }
            | Self::SessionsHeld { .. }
            | Self::SessionRelease { .. } => "{held}:sessions".to_owned(),
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldReply {
    /// A value, or none.
    Value(Option<Vec<u8>>),
    /// Done (true) or refused by its condition (false).
    Done(bool),
    /// A held session, or none.
    Found(Option<HeldSession>),
    /// Held sessions.
    Sessions(Vec<HeldSession>),
    /// Redis did not answer (or is not configured).
    Unknown,
}
