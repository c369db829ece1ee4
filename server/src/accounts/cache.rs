//! The encrypted user cache (SPEC §10 "Failures"): what a login needs — id, username, the
//! e-mail's ciphertext and blind index, the bcrypt hash, role, creation time — kept in Redis for
//! `user_cache_ttl` so that logins go on while PostgreSQL cannot answer.
//!
//! Each value is sealed (AES-256-GCM under `encryption_key`, the key id inside, so rotation
//! works) with its Redis key as associated data: a value moved to another account's entry does
//! not open. Nothing in Redis is readable: the entry's name is the e-mail's blind index (an
//! HMAC), the e-mail inside is its stored ciphertext.
//!
//! The database is the truth. The cache is written after a login read the account from the
//! database and at registration, dropped (leaving a dated tombstone, so that a login that read
//! the old hash before the change cannot cache it again) on password change and deletion, and
//! read only when the database cannot answer. An entry older than an account-wide revocation of
//! its user (logout-all, deletion) is not used. This module must not decide a login while the
//! database can: a drop that did not reach Redis must never let an old password in.

use serde::{Deserialize, Serialize};
use storage::{Role, UserRecord};

use engine::held::{HeldAsk, HeldReply};

use super::{Accounts, SHARED_LIMIT_WAIT};
use crate::clock::ms;

/// The sealed form of a cached account (binary fields in hex).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CachedUser {
    id: String,
    username: String,
    email_cipher: String,
    email_index: String,
    password_hash: String,
    role: String,
    created_at_ms: i64,
    /// When the account was read from the database.
    read_at_ms: i64,
}

impl CachedUser {
    pub(super) fn of(user: &UserRecord, read_at_ms: i64) -> Self {
        let hex = |b: &[u8]| data_encoding::HEXLOWER.encode(b);
        Self {
            id: user.id.clone(),
            username: user.username.clone(),
            email_cipher: hex(&user.email_cipher),
            email_index: hex(&user.email_index),
            password_hash: user.password_hash.clone(),
            role: user.role.as_str().to_owned(),
            created_at_ms: user.created_at_ms,
            read_at_ms,
        }
    }

    /// The account, and when it was read from the database.
    pub(super) fn user(&self) -> Option<(UserRecord, i64)> {
        let unhex = |s: &str| data_encoding::HEXLOWER.decode(s.as_bytes()).ok();
        Some((
            UserRecord {
                id: self.id.clone(),
                username: self.username.clone(),
                email_cipher: unhex(&self.email_cipher)?,
                email_index: unhex(&self.email_index)?,
                password_hash: self.password_hash.clone(),
                role: Role::parse(&self.role)?,
                created_at_ms: self.created_at_ms,
            },
            self.read_at_ms,
        ))
    }
}

impl Accounts {
    /// The engine, when the cache is on (Redis configured, `user_cache_ttl` not zero).
    fn cache(&self) -> Option<&engine::Control> {
        self.control
            .get()
            .filter(|c| c.has_redis() && !self.config.user_cache_ttl.is_zero())
    }

    fn cache_ttl_ms(&self) -> u64 {
        u64::try_from(ms(self.config.user_cache_ttl)).unwrap_or(u64::MAX)
    }

    /// The entry of an e-mail's blind index, and the associated data its value is sealed with.
    fn cache_entry(index: &[u8]) -> (String, Vec<u8>) {
        let key = data_encoding::HEXLOWER.encode(index);
        let context = [b"user-cache:".as_slice(), key.as_bytes()].concat();
        (key, context)
    }

    /// Caches `user`, read from the database at `read_at_ms` (best effort: a cache that cannot
    /// be written only means a later outage finds no entry).
    pub(super) fn cache_user(&self, user: &UserRecord, read_at_ms: i64) {
        let Some(control) = self.cache() else {
            return;
        };
        let Ok(plain) = sonic_rs::to_vec(&CachedUser::of(user, read_at_ms)) else {
            return;
        };
        let (key, context) = Self::cache_entry(&user.email_index);
        let ask = HeldAsk::CachePut {
            value: self.sealer.seal(&plain, &context),
            key,
            read_at_ms,
            ttl_ms: self.cache_ttl_ms(),
        };
        if control.held(ask, SHARED_LIMIT_WAIT) == HeldReply::Unknown {
            tracing::debug!(user_id = %user.id, "user cache not written");
        }
    }

    /// The cached account of an e-mail's blind index (only asked when the database cannot
    /// answer). Counted as a hit or a miss; an entry that does not open, or that an account-wide
    /// revocation made after it was read covers, is a miss.
    pub(super) fn cached_user(&self, index: &[u8]) -> Option<UserRecord> {
        let control = self.cache()?;
        let (key, context) = Self::cache_entry(index);
        let found = match control.held(HeldAsk::CacheGet { key }, SHARED_LIMIT_WAIT) {
            HeldReply::Value(Some(sealed)) => self
                .sealer
                .open(&sealed, &context)
                .and_then(|plain| sonic_rs::from_slice::<CachedUser>(&plain).ok())
                .and_then(|cached| cached.user())
                .filter(|(user, read_at)| {
                    !self.revocations.account_revoked_since(&user.id, *read_at)
                })
                .map(|(user, _)| user),
            _ => None,
        };
        let counter = if found.is_some() {
            &self.metrics.cache_hits
        } else {
            &self.metrics.cache_misses
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        found
    }

    /// Drops the cached account of `index` at `at_ms`; false when the cache is on and Redis did
    /// not confirm it (the caller must not go on with a change the cache could contradict).
    pub(super) fn drop_cached_user(&self, index: &[u8], at_ms: i64) -> bool {
        let Some(control) = self.cache() else {
            return true;
        };
        let (key, _) = Self::cache_entry(index);
        let ask = HeldAsk::CacheDrop {
            key,
            at_ms,
            ttl_ms: self.cache_ttl_ms(),
        };
        control.held(ask, SHARED_LIMIT_WAIT) == HeldReply::Done(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_account_reads_back_as_written() {
        let user = UserRecord {
            id: "u-1".into(),
            username: "alice".into(),
            email_cipher: vec![1, 2, 255],
            email_index: vec![9; 32],
            password_hash: "$2b$04$abc".into(),
            role: Role::Admin,
            created_at_ms: 5,
        };
        let plain = sonic_rs::to_vec(&CachedUser::of(&user, 77)).unwrap();
        let back: CachedUser = sonic_rs::from_slice(&plain).unwrap();
        assert_eq!(back.user(), Some((user, 77)));
    }

    #[test]
    fn an_entry_is_sealed_to_its_own_key() {
        let (key_a, context_a) = Accounts::cache_entry(&[1; 32]);
        let (key_b, context_b) = Accounts::cache_entry(&[2; 32]);
        assert_ne!(key_a, key_b);
        assert_ne!(context_a, context_b);
        assert!(context_a.ends_with(key_a.as_bytes()));
    }
}
