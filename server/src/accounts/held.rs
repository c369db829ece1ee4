//! Sessions created while PostgreSQL cannot answer (SPEC §10 "Failures"): a login served from
//! the user cache keeps its session in Redis, sealed (AES-256-GCM, the session id as associated
//! data) together with what a refresh needs of the account; refresh works for it (rotating in
//! Redis, one atomic script); once the database answers again, every node writes the held
//! sessions back (`adopt_session`: inserted once, with the current refresh token as the one
//! current token, revoked if a revocation of it was made meanwhile) and forgets each one whose
//! token did not move since it was read. None is lost (a session leaves Redis only after its
//! write committed) and none is duplicated (the write is keyed by the session id).
//!
//! While held, a rotated refresh token presented again is refused (`invalid_token`) without the
//! reuse window or the session's revocation: neither can be written without the database.

use serde::{Deserialize, Serialize};
use storage::{SessionRecord, UserRecord};

use engine::held::{HeldAsk, HeldReply, HeldSession};

use super::cache::CachedUser;
use super::{Accounts, SHARED_LIMIT_WAIT};

/// Most sessions held at once over the whole service; past it, logins during the outage answer
/// 503 like the rest.
const MOST_HELD: u32 = 100_000;
/// Sessions written back per round.
const WRITE_BACK_BATCH: u32 = 200;

/// A held session's sealed record.
#[derive(Debug, Serialize, Deserialize)]
struct HeldRecord {
    user_id: String,
    created_at_ms: i64,
    last_used_at_ms: i64,
    expires_at_ms: i64,
    ip: String,
    user_agent: String,
    /// What a refresh needs of the account (the database may still be away).
    user: CachedUser,
}

fn hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(bytes)
}

fn context(id: &str) -> Vec<u8> {
    [b"held-session:".as_slice(), id.as_bytes()].concat()
}

impl Accounts {
    fn held_store(&self) -> Option<&engine::Control> {
        self.control.get().filter(|c| c.has_redis())
    }

    fn seal_held(&self, session: &SessionRecord, user: &UserRecord, token: &[u8]) -> HeldSession {
        let record = HeldRecord {
            user_id: session.user_id.clone(),
            created_at_ms: session.created_at_ms,
            last_used_at_ms: session.last_used_at_ms,
            expires_at_ms: session.expires_at_ms,
            ip: session.ip.clone(),
            user_agent: session.user_agent.clone(),
            user: CachedUser::of(user, session.last_used_at_ms),
        };
        let plain = sonic_rs::to_vec(&record).unwrap_or_default();
        HeldSession {
            id: session.id.clone(),
            token: hex(token),
            value: self.sealer.seal(&plain, &context(&session.id)),
        }
    }

    fn open_held(&self, held: &HeldSession) -> Option<(SessionRecord, UserRecord)> {
        let plain = self.sealer.open(&held.value, &context(&held.id))?;
        let record: HeldRecord = sonic_rs::from_slice(&plain).ok()?;
        let (user, _) = record.user.user()?;
        Some((
            SessionRecord {
                id: held.id.clone(),
                user_id: record.user_id,
                created_at_ms: record.created_at_ms,
                last_used_at_ms: record.last_used_at_ms,
                expires_at_ms: record.expires_at_ms,
                ip: record.ip,
                user_agent: record.user_agent,
                revoked_at_ms: None,
            },
            user,
        ))
    }

    /// Holds a session the database could not take; false when Redis could not either.
    pub(super) fn hold_session(
        &self,
        session: &SessionRecord,
        user: &UserRecord,
        token_hash: &[u8],
    ) -> bool {
        let Some(control) = self.held_store() else {
            return false;
        };
        let ask = HeldAsk::SessionHold {
            session: self.seal_held(session, user, token_hash),
            limit: MOST_HELD,
        };
        control.held(ask, SHARED_LIMIT_WAIT) == HeldReply::Done(true)
    }

    /// The held session whose current refresh token hashes to `token_hash`, with its account.
    pub(super) fn held_session(&self, token_hash: &[u8]) -> Option<(SessionRecord, UserRecord)> {
        let control = self.held_store()?;
        let ask = HeldAsk::SessionFind {
            token: hex(token_hash),
        };
        match control.held(ask, SHARED_LIMIT_WAIT) {
            HeldReply::Found(Some(held)) if held.token == hex(token_hash) => self.open_held(&held),
            _ => None,
        }
    }

    /// Rotates a held session from `old_hash` to `new_hash` with its new state; false when the
    /// old token was no longer current (or Redis did not answer).
    pub(super) fn rotate_held(
        &self,
        session: &SessionRecord,
        user: &UserRecord,
        old_hash: &[u8],
        new_hash: &[u8],
    ) -> bool {
        let Some(control) = self.held_store() else {
            return false;
        };
        let ask = HeldAsk::SessionRotate {
            session: self.seal_held(session, user, new_hash),
            old: hex(old_hash),
        };
        control.held(ask, SHARED_LIMIT_WAIT) == HeldReply::Done(true)
    }

    /// Writes the held sessions back to the database (call while it answers); returns how many
    /// were written. A session whose token rotated meanwhile is written again next round.
    pub fn write_back_held_sessions(&self) -> usize {
        let Some(control) = self.held_store() else {
            return 0;
        };
        let HeldReply::Sessions(held) = control.held(
            HeldAsk::SessionsHeld {
                limit: WRITE_BACK_BATCH,
            },
            SHARED_LIMIT_WAIT,
        ) else {
            return 0;
        };
        let mut written = 0;
        for entry in held {
            let Some((mut session, _)) = self.open_held(&entry) else {
                tracing::warn!(session_id = %entry.id, "a held session does not open; left in redis");
                continue;
            };
            let Ok(token) = data_encoding::HEXLOWER.decode(entry.token.as_bytes()) else {
                continue;
            };
            let now = crate::clock::now_ms();
            if self
                .revocations
                .check(
                    &session.user_id,
                    &session.id,
                    u64::try_from(session.created_at_ms).unwrap_or(0),
                )
                .is_some()
            {
                session.revoked_at_ms = Some(now);
            }
            if let Err(e) = self.store.adopt_session(&session, &token, now) {
                tracing::debug!(error = %e, "held sessions not written back yet");
                break;
            }
            written += 1;
            let release = HeldAsk::SessionRelease {
                id: entry.id.clone(),
                token: entry.token,
            };
            let _ = control.held(release, SHARED_LIMIT_WAIT);
        }
        if written > 0 {
            tracing::info!(sessions = written, "held sessions written back");
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_records_are_bound_to_their_session() {
        assert_ne!(context("a"), context("b"));
        assert_eq!(hex(&[0xab, 0x01]), "ab01");
    }
}
