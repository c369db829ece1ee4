//! The embedded backend: [`SqliteStore`], one WAL-mode SQLite file `ringhub.db` in `data_dir`.
//!
//! It owns the SQLite connections of one process: a single writer connection behind a mutex
//! (SQLite admits one writer at a time anyway; serializing them here keeps `SQLITE_BUSY` for the
//! rare second process) and [`READERS`] `query_only` reader connections, which WAL lets read
//! while the writer writes. Every connection has `synchronous=NORMAL`, `foreign_keys=ON`, a
//! 5 s busy timeout and a cache of prepared statements (`prepare_cached`). It must not keep any
//! state outside the database, nor apply schema changes other than [`crate::migrations`].
//!
//! Errors: a UNIQUE or PRIMARY KEY violation becomes [`StoreError::Conflict`] named after the
//! index or column involved (a FOREIGN KEY violation is an answer only to [`Rooms::put_member`]:
//! the room is missing), `SQLITE_BUSY`/`SQLITE_LOCKED` (the busy timeout ran out), a file that
//! cannot be opened and a full disk become [`StoreError::Unavailable`], the rest
//! [`StoreError::Internal`]. A mutex poisoned by a panic is recovered, and any transaction the
//! panic left open is rolled back before the connection is used again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};

use crate::migrations::{self, conflict_kind};
use crate::{
    Idempotency, IdempotencyRecord, MemberRole, Permission, RefreshRecord, Revocation,
    RevocationKind, Revocations, Role, RoomRecord, RoomUpdate, Rooms, Rotation, SessionRecord,
    Sessions, Store, StoreError, StoreResult, UserRecord, Users,
};

/// The database file's name inside the data directory.
pub const FILE_NAME: &str = "ringhub.db";

/// How many read-only connections a store keeps besides its writer.
pub const READERS: usize = 4;

/// How long a statement waits for another process's lock before failing with `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements cached per connection.
const STATEMENT_CACHE: usize = 64;

/// The SQLite store. See the module documentation.
pub struct SqliteStore {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("readers", &self.readers.len())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Creates `dir` if missing, opens (or creates) `dir/ringhub.db` in WAL mode and applies the
    /// pending migrations.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Unavailable(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join(FILE_NAME);
        let mut writer = connect(&path)?;
        let mode: String =
            retry_busy(|| writer.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)))
                .map_err(map_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Internal(format!(
                "{} refused WAL mode (journal_mode is {mode})",
                path.display()
            )));
        }
        migrate(&mut writer)?;
        let readers = (0..READERS)
            .map(|_| {
                let conn = connect(&path)?;
                conn.execute_batch("PRAGMA query_only = ON")
                    .map_err(map_err)?;
                Ok(Mutex::new(conn))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Self {
            path,
            writer: Mutex::new(writer),
            readers,
            next_reader: AtomicUsize::new(0),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writer connection.
    fn write<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        let mut conn = recover(self.writer.lock())?;
        f(&mut conn).map_err(map_err)
    }

    /// Runs `f` on an idle reader connection (or waits for one).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        let start = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let n = self.readers.len();
        let idle = (0..n).find_map(|i| match self.readers[(start + i) % n].try_lock() {
            Ok(guard) => Some(Ok(guard)),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(Err(p)),
            Err(std::sync::TryLockError::WouldBlock) => None,
        });
        let guard = match idle {
            Some(locked) => recover(locked)?,
            None => recover(self.readers[start % n].lock())?,
        };
        f(&guard).map_err(map_err)
    }
}

/// Runs `step` again while SQLite answers busy or locked at once, for up to [`BUSY_TIMEOUT`] in
/// all. SQLite skips the busy handler where waiting could deadlock, as when several connections
/// switch a new file to WAL together (concurrent first starts), so the timeout alone does not
/// cover that.
fn retry_busy<T>(mut step: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match step() {
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if matches!(
                    failure.code,
                    ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Opens one connection with the pragmas every connection has.
fn connect(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path).map_err(map_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(map_err)?;
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")
        .map_err(map_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Takes a lock even if a panic poisoned it, rolling back whatever transaction the panic left.
fn recover<'a>(
    locked: Result<MutexGuard<'a, Connection>, PoisonError<MutexGuard<'a, Connection>>>,
) -> StoreResult<MutexGuard<'a, Connection>> {
    let conn = locked.unwrap_or_else(PoisonError::into_inner);
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK").map_err(map_err)?;
    }
    Ok(conn)
}

/// Applies the pending migrations in one `BEGIN IMMEDIATE` transaction; returns the version.
fn migrate(conn: &mut Connection) -> StoreResult<u32> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    tx.execute_batch(migrations::SCHEMA_MIGRATIONS_DDL)
        .map_err(map_err)?;
    let applied: u32 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(map_err)?;
    let latest = migrations::latest(migrations::SQLITE);
    if applied > latest {
        return Err(StoreError::Internal(format!(
            "the database is at schema version {applied}, newer than this build's {latest}"
        )));
    }
    for &(version, sql) in migrations::pending(migrations::SQLITE, applied) {
        tx.execute_batch(sql).map_err(map_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?1, ?2)",
            params![version, migrations::now_ms()],
        )
        .map_err(map_err)?;
    }
    tx.commit().map_err(map_err)?;
    Ok(latest)
}

/// Classifies a SQLite error (see the module documentation).
#[expect(
    clippy::needless_pass_by_value,
    reason = "the shape `Result::map_err` calls"
)]
fn map_err(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, message) = &e {
        match failure.code {
            ErrorCode::ConstraintViolation
                if matches!(
                    failure.extended_code,
                    rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                        | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                ) =>
            {
                return StoreError::Conflict(conflict_kind(message.as_deref().unwrap_or("")));
            }
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::CannotOpen
            | ErrorCode::DiskFull => return StoreError::Unavailable(e.to_string()),
            _ => {}
        }
    }
    StoreError::Internal(e.to_string())
}

/// A column that holds a value this crate never writes.
fn corrupt(column: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, Type::Text, format!("bad {what}").into())
}

const USER_COLUMNS: &str =
    "id, username, email_cipher, email_index, password_hash, role, created_at_ms";

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    let role: String = row.get(5)?;
    Ok(UserRecord {
        id: row.get(0)?,
        username: row.get(1)?,
        email_cipher: row.get(2)?,
        email_index: row.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default(),
        password_hash: row.get(4)?,
        role: Role::parse(&role).ok_or_else(|| corrupt(5, "role"))?,
        created_at_ms: row.get(6)?,
    })
}

const SESSION_COLUMNS: &str =
    "id, user_id, created_at_ms, last_used_at_ms, expires_at_ms, ip, user_agent, revoked_at_ms";

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRecord> {
    Ok(SessionRecord {
        id: row.get(0)?,
        user_id: row.get(1)?,
        created_at_ms: row.get(2)?,
        last_used_at_ms: row.get(3)?,
        expires_at_ms: row.get(4)?,
        ip: row.get(5)?,
        user_agent: row.get(6)?,
        revoked_at_ms: row.get(7)?,
    })
}

const ROOM_COLUMNS: &str =
    "id, permission, owner_id, max_members, presence, history, created_at_ms";

fn room_from_row(row: &Row<'_>) -> rusqlite::Result<RoomRecord> {
    let permission: String = row.get(1)?;
    Ok(RoomRecord {
        id: row.get(0)?,
        permission: Permission::parse(&permission).ok_or_else(|| corrupt(1, "permission"))?,
        owner_id: row.get(2)?,
        max_members: row.get(3)?,
        presence: row.get(4)?,
        history: row.get(5)?,
        created_at_ms: row.get(6)?,
    })
}

fn member_role(row: &Row<'_>, column: usize) -> rusqlite::Result<MemberRole> {
    let role: String = row.get(column)?;
    MemberRole::parse(&role).ok_or_else(|| corrupt(column, "member role"))
}

impl Users for SqliteStore {
    fn create_user(&self, user: &UserRecord) -> StoreResult<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO users (id, username, username_lower, email_cipher, email_index, \
                 password_hash, role, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                user.id,
                user.username,
                user.username.to_ascii_lowercase(),
                user.email_cipher,
                user.email_index,
                user.password_hash,
                user.role.as_str(),
                user.created_at_ms,
            ])
            .map(drop)
        })
    }

    fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE id = ?1 AND deleted_at_ms IS NULL"
            ))?
            .query_row([id], user_from_row)
            .optional()
        })
    }

    fn user_by_email_index(&self, index: &[u8]) -> StoreResult<Option<UserRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users \
                 WHERE email_index = ?1 AND deleted_at_ms IS NULL"
            ))?
            .query_row([index], user_from_row)
            .optional()
        })
    }

    fn set_password(&self, id: &str, password_hash: &str) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached(
                "UPDATE users SET password_hash = ?2 WHERE id = ?1 AND deleted_at_ms IS NULL",
            )?
            .execute([id, password_hash])
            .map(|n| n == 1)
        })
    }

    fn rehash_password(&self, id: &str, old_hash: &str, new_hash: &str) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached(
                "UPDATE users SET password_hash = ?3 \
                 WHERE id = ?1 AND password_hash = ?2 AND deleted_at_ms IS NULL",
            )?
            .execute([id, old_hash, new_hash])
            .map(|n| n == 1)
        })
    }

    fn set_role(&self, id: &str, role: Role) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached(
                "UPDATE users SET role = ?2 WHERE id = ?1 AND deleted_at_ms IS NULL",
            )?
            .execute([id, role.as_str()])
            .map(|n| n == 1)
        })
    }

    fn soft_delete_user(&self, id: &str, now_ms: i64) -> StoreResult<bool> {
        self.write(|conn| {
            // Dropping `tx` without commit rolls back: the early return writes nothing.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let deleted = tx
                .prepare_cached(
                    "UPDATE users SET deleted_at_ms = ?2, email_cipher = X'', \
                     email_index = NULL, password_hash = '' \
                     WHERE id = ?1 AND deleted_at_ms IS NULL",
                )?
                .execute(params![id, now_ms])?;
            if deleted != 1 {
                return Ok(false);
            }
            tx.prepare_cached("DELETE FROM room_members WHERE user_id = ?1")?
                .execute([id])?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn admins(&self) -> StoreResult<Vec<String>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT id FROM users WHERE role = 'admin' AND deleted_at_ms IS NULL ORDER BY id",
            )?
            .query_map([], |row| row.get(0))?
            .collect()
        })
    }
}

/// A session's columns in the order of `INSERT INTO sessions (id, user_id, created_at_ms,
/// last_used_at_ms, expires_at_ms, ip, user_agent, revoked_at_ms)`.
fn session_row(session: &SessionRecord) -> [&dyn rusqlite::ToSql; 8] {
    [
        &session.id,
        &session.user_id,
        &session.created_at_ms,
        &session.last_used_at_ms,
        &session.expires_at_ms,
        &session.ip,
        &session.user_agent,
        &session.revoked_at_ms,
    ]
}

impl Sessions for SqliteStore {
    fn create_session(&self, session: &SessionRecord, first_token_hash: &[u8]) -> StoreResult<()> {
        self.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(
                "INSERT INTO sessions (id, user_id, created_at_ms, last_used_at_ms, \
                 expires_at_ms, ip, user_agent, revoked_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(session_row(session))?;
            tx.prepare_cached(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![first_token_hash, session.id, session.created_at_ms])?;
            tx.commit()
        })
    }

    fn adopt_session(
        &self,
        session: &SessionRecord,
        token_hash: &[u8],
        now_ms: i64,
    ) -> StoreResult<()> {
        self.write(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached(
                "INSERT INTO sessions (id, user_id, created_at_ms, last_used_at_ms, \
                 expires_at_ms, ip, user_agent, revoked_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT (id) DO UPDATE SET \
                 last_used_at_ms = MAX(last_used_at_ms, excluded.last_used_at_ms), \
                 expires_at_ms = MAX(expires_at_ms, excluded.expires_at_ms), \
                 revoked_at_ms = COALESCE(revoked_at_ms, excluded.revoked_at_ms)",
            )?
            .execute(session_row(session))?;
            tx.prepare_cached(
                "UPDATE refresh_tokens SET rotated_at_ms = ?3 \
                 WHERE session_id = ?1 AND rotated_at_ms IS NULL AND token_hash <> ?2",
            )?
            .execute(params![session.id, token_hash, now_ms])?;
            tx.prepare_cached(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (token_hash) DO NOTHING",
            )?
            .execute(params![token_hash, session.id, now_ms])?;
            tx.commit()
        })
    }

    fn session(&self, id: &str) -> StoreResult<Option<SessionRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
            ))?
            .query_row([id], session_from_row)
            .optional()
        })
    }

    fn live_sessions(&self, user_id: &str, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions \
                 WHERE user_id = ?1 AND revoked_at_ms IS NULL AND expires_at_ms > ?2 \
                 ORDER BY created_at_ms DESC, id DESC"
            ))?
            .query_map(params![user_id, now_ms], session_from_row)?
            .collect()
        })
    }

    fn refresh_token(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshRecord>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT token_hash, session_id, created_at_ms, rotated_at_ms, child_cipher \
                 FROM refresh_tokens WHERE token_hash = ?1",
            )?
            .query_row([token_hash], |row| {
                Ok(RefreshRecord {
                    token_hash: row.get(0)?,
                    session_id: row.get(1)?,
                    created_at_ms: row.get(2)?,
                    rotated_at_ms: row.get(3)?,
                    child_cipher: row.get(4)?,
                })
            })
            .optional()
        })
    }

    fn rotate(&self, r: &Rotation<'_>) -> StoreResult<bool> {
        self.write(|conn| {
            // Dropping `tx` without commit rolls back: the early returns write nothing.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let used = tx
                .prepare_cached(
                    "UPDATE refresh_tokens SET rotated_at_ms = ?1, child_cipher = ?2 \
                     WHERE token_hash = ?3 AND session_id = ?4 AND rotated_at_ms IS NULL \
                     AND EXISTS (SELECT 1 FROM sessions WHERE id = ?4 AND revoked_at_ms IS NULL)",
                )?
                .execute(params![r.now_ms, r.child_cipher, r.old_hash, r.session_id])?;
            if used != 1 {
                return Ok(false);
            }
            tx.prepare_cached(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![r.new_hash, r.session_id, r.now_ms])?;
            let touched = tx
                .prepare_cached(
                    "UPDATE sessions SET last_used_at_ms = ?2, expires_at_ms = ?3, ip = ?4, \
                     user_agent = ?5 WHERE id = ?1 AND revoked_at_ms IS NULL",
                )?
                .execute(params![
                    r.session_id,
                    r.now_ms,
                    r.expires_at_ms,
                    r.ip,
                    r.user_agent
                ])?;
            if touched != 1 {
                return Ok(false);
            }
            tx.commit()?;
            Ok(true)
        })
    }

    fn revoke_session(&self, id: &str, now_ms: i64) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached(
                "UPDATE sessions SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
            )?
            .execute(params![id, now_ms])
            .map(|n| n == 1)
        })
    }

    fn revoke_user_sessions(
        &self,
        user_id: &str,
        keep: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        let mut ids = self.write(|conn| {
            conn.prepare_cached(
                "UPDATE sessions SET revoked_at_ms = ?3 \
                 WHERE user_id = ?1 AND revoked_at_ms IS NULL AND id IS NOT ?2 RETURNING id",
            )?
            .query_map(params![user_id, keep, now_ms], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()
        })?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn prune_sessions(&self, before_ms: i64) -> StoreResult<u64> {
        // Their refresh tokens go by `ON DELETE CASCADE` (`foreign_keys` is on).
        self.write(|conn| {
            conn.prepare_cached(
                "DELETE FROM sessions WHERE expires_at_ms < ?1 OR revoked_at_ms < ?1",
            )?
            .execute([before_ms])
        })
        .map(|n| n as u64)
    }

    fn clear_refresh_children(&self, rotated_before_ms: i64) -> StoreResult<u64> {
        self.write(|conn| {
            conn.prepare_cached(
                "UPDATE refresh_tokens SET child_cipher = NULL \
                 WHERE child_cipher IS NOT NULL AND rotated_at_ms < ?1",
            )?
            .execute([rotated_before_ms])
        })
        .map(|n| n as u64)
    }
}

impl Revocations for SqliteStore {
    fn add_revocation(&self, revocation: &Revocation) -> StoreResult<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO revocations (kind, subject, revoked_at_ms, keep_until_ms) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (kind, subject) DO UPDATE SET \
                 revoked_at_ms = MAX(revoked_at_ms, excluded.revoked_at_ms), \
                 keep_until_ms = MAX(keep_until_ms, excluded.keep_until_ms)",
            )?
            .execute(params![
                revocation.kind.as_str(),
                revocation.subject,
                revocation.revoked_at_ms,
                revocation.keep_until_ms,
            ])
            .map(drop)
        })
    }

    fn live_revocations(&self, now_ms: i64) -> StoreResult<Vec<Revocation>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT kind, subject, revoked_at_ms, keep_until_ms FROM revocations \
                 WHERE keep_until_ms > ?1 ORDER BY revoked_at_ms, kind, subject",
            )?
            .query_map([now_ms], |row| {
                let kind: String = row.get(0)?;
                Ok(Revocation {
                    kind: RevocationKind::parse(&kind).ok_or_else(|| corrupt(0, "kind"))?,
                    subject: row.get(1)?,
                    revoked_at_ms: row.get(2)?,
                    keep_until_ms: row.get(3)?,
                })
            })?
            .collect()
        })
    }

    fn prune_revocations(&self, now_ms: i64) -> StoreResult<u64> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM revocations WHERE keep_until_ms <= ?1")?
                .execute([now_ms])
        })
        .map(|n| n as u64)
    }
}

impl Idempotency for SqliteStore {
    fn idempotency(
        &self,
        scope: &str,
        key: &str,
        since_ms: i64,
    ) -> StoreResult<Option<IdempotencyRecord>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT scope, key, body_hash, status, response_cipher, token_hash, \
                 created_at_ms FROM idempotency \
                 WHERE scope = ?1 AND key = ?2 AND created_at_ms >= ?3",
            )?
            .query_row(params![scope, key, since_ms], |row| {
                Ok(IdempotencyRecord {
                    scope: row.get(0)?,
                    key: row.get(1)?,
                    body_hash: row.get(2)?,
                    status: row.get(3)?,
                    response_cipher: row.get(4)?,
                    token_hash: row.get(5)?,
                    created_at_ms: row.get(6)?,
                })
            })
            .optional()
        })
    }

    fn put_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO idempotency (scope, key, body_hash, status, response_cipher, \
                 token_hash, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (scope, key) DO UPDATE SET body_hash = excluded.body_hash, \
                 status = excluded.status, response_cipher = excluded.response_cipher, \
                 token_hash = excluded.token_hash, created_at_ms = excluded.created_at_ms \
                 WHERE idempotency.created_at_ms < excluded.created_at_ms - ?8",
            )?
            .execute(params![
                record.scope,
                record.key,
                record.body_hash,
                record.status,
                record.response_cipher,
                record.token_hash,
                record.created_at_ms,
                crate::IDEMPOTENCY_TTL_MS,
            ])
            .map(|n| n == 1)
        })
    }

    fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM idempotency WHERE created_at_ms < ?1")?
                .execute([before_ms])
        })
        .map(|n| n as u64)
    }
}

impl Rooms for SqliteStore {
    fn create_room(&self, room: &RoomRecord) -> StoreResult<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO rooms (id, permission, owner_id, max_members, presence, history, \
                 created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                room.id,
                room.permission.as_str(),
                room.owner_id,
                room.max_members,
                room.presence,
                room.history,
                room.created_at_ms,
            ])
            .map(drop)
        })
    }

    fn room(&self, id: &str) -> StoreResult<Option<RoomRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE id = ?1"))?
                .query_row([id], room_from_row)
                .optional()
        })
    }

    fn all_rooms(&self) -> StoreResult<Vec<RoomRecord>> {
        self.read(|conn| {
            conn.prepare_cached(&format!("SELECT {ROOM_COLUMNS} FROM rooms ORDER BY id"))?
                .query_map([], room_from_row)?
                .collect()
        })
    }

    fn update_room(&self, id: &str, update: &RoomUpdate) -> StoreResult<Option<RoomRecord>> {
        self.write(|conn| {
            conn.prepare_cached(&format!(
                "UPDATE rooms SET permission = COALESCE(?2, permission), \
                 max_members = COALESCE(?3, max_members) WHERE id = ?1 RETURNING {ROOM_COLUMNS}"
            ))?
            .query_row(
                params![
                    id,
                    update.permission.map(Permission::as_str),
                    update.max_members
                ],
                room_from_row,
            )
            .optional()
        })
    }

    fn delete_room(&self, id: &str) -> StoreResult<bool> {
        // The memberships go by `ON DELETE CASCADE`.
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM rooms WHERE id = ?1")?
                .execute([id])
                .map(|n| n == 1)
        })
    }

    fn put_member(
        &self,
        room_id: &str,
        user_id: &str,
        role: MemberRole,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.write(|conn| {
            let put = conn
                .prepare_cached(
                    "INSERT INTO room_members (room_id, user_id, role, added_at_ms) \
                     VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role",
                )?
                .execute(params![room_id, user_id, role.as_str(), now_ms]);
            match put {
                Ok(_) => Ok(true),
                // The table's one foreign key: the room does not exist.
                Err(rusqlite::Error::SqliteFailure(failure, _))
                    if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            }
        })
    }

    fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        self.write(|conn| {
            conn.prepare_cached("DELETE FROM room_members WHERE room_id = ?1 AND user_id = ?2")?
                .execute([room_id, user_id])
                .map(|n| n == 1)
        })
    }

    fn members(&self, room_id: &str) -> StoreResult<Vec<(String, MemberRole)>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT user_id, role FROM room_members WHERE room_id = ?1 ORDER BY user_id",
            )?
            .query_map([room_id], |row| Ok((row.get(0)?, member_role(row, 1)?)))?
            .collect()
        })
    }

    fn all_members(&self) -> StoreResult<Vec<(String, String, MemberRole)>> {
        self.read(|conn| {
            conn.prepare_cached(
                "SELECT room_id, user_id, role FROM room_members ORDER BY room_id, user_id",
            )?
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, member_role(row, 2)?))
            })?
            .collect()
        })
    }
}

impl Store for SqliteStore {
    fn ping(&self) -> StoreResult<()> {
        self.read(|conn| {
            conn.prepare_cached("SELECT 1")?
                .query_row([], |row| row.get::<_, i64>(0))
        })
        .map(drop)
    }

    fn schema_version(&self) -> StoreResult<u32> {
        self.read(|conn| {
            conn.prepare_cached("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")?
                .query_row([], |row| row.get(0))
        })
    }

    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn key_fingerprint(&self, name: &str, fingerprint: &str, now_ms: i64) -> StoreResult<String> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO key_fingerprints (name, fingerprint, recorded_at_ms) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
            )?
            .execute(params![name, fingerprint, now_ms])?;
            conn.prepare_cached("SELECT fingerprint FROM key_fingerprints WHERE name = ?1")?
                .query_row(params![name], |row| row.get(0))
        })
    }

    fn setting(&self, name: &str) -> StoreResult<Option<String>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT value FROM settings WHERE name = ?1")?
                .query_row(params![name], |row| row.get(0))
                .optional()
        })
    }

    fn put_setting(&self, name: &str, value: &str, now_ms: i64) -> StoreResult<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO settings (name, value, changed_at_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET value = ?2, changed_at_ms = ?3",
            )?
            .execute(params![name, value, now_ms])
            .map(drop)
        })
    }

    fn replace_key_fingerprint(
        &self,
        name: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.write(|conn| {
            conn.prepare_cached(
                "INSERT INTO key_fingerprints (name, fingerprint, recorded_at_ms) \
                 VALUES (?1, ?2, ?3) ON CONFLICT (name) \
                 DO UPDATE SET fingerprint = ?2, recorded_at_ms = ?3",
            )?
            .execute(params![name, fingerprint, now_ms])
            .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "ringhub-sqlite-unit-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn opens_in_wal_mode_with_pragmas() {
        let dir = temp_dir("wal");
        let store = SqliteStore::open(&dir.join("nested")).unwrap();
        assert!(store.path().ends_with(FILE_NAME));
        let (mode, fk, sync): (String, i64, i64) = store
            .write(|conn| {
                Ok((
                    conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?,
                    conn.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?,
                    conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?,
                ))
            })
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(fk, 1);
        assert_eq!(sync, 1, "NORMAL");
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn poisoned_writer_is_recovered_and_rolled_back() {
        let dir = temp_dir("poison");
        let store = SqliteStore::open(&dir).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let conn = store.writer.lock().unwrap();
            conn.execute_batch("BEGIN; DELETE FROM schema_migrations;")
                .unwrap();
            panic!("boom");
        }));
        assert!(panicked.is_err());
        assert!(store.writer.is_poisoned());
        store.ping().unwrap();
        let rows: i64 = store
            .write(|conn| {
                conn.query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
            })
            .unwrap();
        assert_eq!(
            rows,
            i64::from(migrations::latest(migrations::SQLITE)),
            "rolled back"
        );
        assert!(!store.revoke_session("nope", 1).unwrap());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn busy_is_unavailable_and_unique_is_conflict() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        );
        assert!(matches!(map_err(busy), StoreError::Unavailable(_)));
        let unique = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE),
            Some("UNIQUE constraint failed: users.username_lower".into()),
        );
        assert!(matches!(map_err(unique), StoreError::Conflict("username")));
        let other = rusqlite::Error::QueryReturnedNoRows;
        assert!(matches!(map_err(other), StoreError::Internal(_)));
    }
}
