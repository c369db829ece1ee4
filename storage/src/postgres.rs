//! The PostgreSQL backend: [`PgStore`], over the synchronous `postgres` client (no TLS), with
//! two small connection pools of its own: the primary, and an optional read pool for the reads
//! that tolerate replica lag.
//!
//! It owns those connections: every pool is opened in full at start (pre-warmed), every
//! connection runs `SET statement_timeout = '5s'` once connected (so a stuck query fails with
//! [`StoreError::Unavailable`] instead of holding a blocking thread), keeps its own cache of
//! prepared statements, and is replaced at its next checkout once it is found broken (closed,
//! or an I/O or protocol error happened on it). A checkout waits at most [`CHECKOUT_WAIT`] for a
//! free connection. It also owns [`scratch_schema_url`] and [`drop_schema`], which give tests (or
//! tenants) a schema of their own. It must not build SQL from values (every value is a `$n`
//! parameter), nor apply schema changes other than [`crate::migrations`].
//!
//! Reads from the read pool: [`Users::user_by_id`], [`Users::user_by_email_index`],
//! [`Sessions::session`], [`Sessions::live_sessions`], [`Rooms::room`] and [`Rooms::members`].
//! Everything else, including refresh token lookups, rotation, revocations, idempotency records
//! and the loads that grant rights ([`Users::admins`], [`Rooms::all_rooms`],
//! [`Rooms::all_members`]: a lagging replica would revive a removed member or a demoted admin),
//! runs on the primary.
//!
//! Errors: SQLSTATE 23505 (`unique_violation`) becomes [`StoreError::Conflict`] named after the
//! constraint (SQLSTATE 23503, `foreign_key_violation`, is an answer only to
//! [`Rooms::put_member`]: the room is missing); connection failures, timeouts, cancellations,
//! admin shutdowns, lack of resources, serialization failures and deadlocks become
//! [`StoreError::Unavailable`]; the rest [`StoreError::Internal`].

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, Config, NoTls, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::breaker::{Breaker, BreakerSettings, BreakerState};
use crate::migrations::{self, conflict_kind};
use crate::{
    Idempotency, IdempotencyRecord, MemberRole, Permission, RefreshRecord, Revocation,
    RevocationKind, Revocations, Role, RoomRecord, RoomUpdate, Rooms, Rotation, SessionRecord,
    Sessions, Store, StoreError, StoreResult, UserRecord, Users,
};

/// How long a call waits for a free pooled connection before failing with `Unavailable`.
pub const CHECKOUT_WAIT: Duration = Duration::from_secs(5);

/// The `statement_timeout` every pooled connection sets.
pub const STATEMENT_TIMEOUT: &str = "5s";

/// How long opening a connection may take, unless the URL says otherwise (`connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store. See the module documentation.
pub struct PgStore {
    primary: Pool,
    replica: Option<Pool>,
    /// In front of both pools.
    breaker: Arc<Breaker>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgStore")
            .field("pool", &self.primary.size)
            .field("read_pool", &self.replica.as_ref().map(|pool| pool.size))
            .finish()
    }
}

impl PgStore {
    /// Opens `pool` connections (at least one) to `url`, and as many to `read_url` when given,
    /// then applies the pending migrations on the primary.
    pub fn open(
        url: &str,
        read_url: Option<&str>,
        pool: usize,
        breaker: BreakerSettings,
    ) -> StoreResult<Self> {
        Self::open_with(url, read_url, pool, breaker, None)
    }

    /// [`PgStore::open`], with `ca_file` as the roots that `sslmode=verify-ca`/`verify-full`
    /// check the server's certificate against (else the system's bundle).
    pub fn open_with(
        url: &str,
        read_url: Option<&str>,
        pool: usize,
        breaker: BreakerSettings,
        ca_file: Option<&Path>,
    ) -> StoreResult<Self> {
        let size = pool.max(1);
        let breaker = Arc::new(Breaker::new(breaker));
        let primary = Pool::open("primary", url, size, breaker.clone(), ca_file)?;
        primary.run(|conn| migrate(&mut conn.client))??;
        let replica = read_url
            .map(|url| Pool::open("read", url, size, breaker.clone(), ca_file))
            .transpose()?;
        Ok(Self {
            primary,
            replica,
            breaker,
        })
    }

    /// The pool for reads that tolerate replica lag.
    fn reads(&self) -> &Pool {
        self.replica.as_ref().unwrap_or(&self.primary)
    }
}

/// Validates a schema name: `[a-z0-9_]{1,60}`.
fn check_schema(schema: &str) -> StoreResult<()> {
    let ok = (1..=60).contains(&schema.len())
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Internal(format!(
            "invalid schema name {schema:?}: want [a-z0-9_]{{1,60}}"
        )))
    }
}

/// Runs one administrative statement on a fresh connection to `base_url`.
fn admin(base_url: &str, sql: &str) -> StoreResult<()> {
    let mut client = connect(&parse(base_url, None)?)?;
    client.batch_execute(sql).map_err(map_err)?;
    client.close().map_err(map_err)
}

/// Creates the schema `schema` (`[a-z0-9_]{1,60}`) in the database of `base_url` if missing and
/// returns a connection string that [`PgStore::open`] (or any libpq-style client) opens with
/// `search_path` set to that schema alone, so every table lives there.
///
/// For a URL (`postgres://…` or `postgresql://…`) this appends the query parameter
/// `options=-c%20search_path%3D<schema>`; for a key-value string (`host=… dbname=…`) it appends
/// `options='-c search_path=<schema>'`. Either replaces any `options` of `base_url`.
pub fn scratch_schema_url(base_url: &str, schema: &str) -> StoreResult<String> {
    check_schema(schema)?;
    admin(
        base_url,
        &format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
    )?;
    let url = if base_url.starts_with("postgres://") || base_url.starts_with("postgresql://") {
        let separator = if base_url.contains('?') { '&' } else { '?' };
        format!("{base_url}{separator}options=-c%20search_path%3D{schema}")
    } else {
        format!("{base_url} options='-c search_path={schema}'")
    };
    Ok(url)
}

/// Drops the schema `schema` and everything in it from the database of `base_url`, if it
/// exists.
pub fn drop_schema(base_url: &str, schema: &str) -> StoreResult<()> {
    check_schema(schema)?;
    admin(
        base_url,
        &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
    )
}

/// Where a pool connects: the client's configuration and, unless `sslmode=disable`, the TLS
/// connector its `sslmode` calls for (`pg_tls`).
#[derive(Clone)]
struct Target {
    config: Config,
    tls: Option<MakeRustlsConnect>,
}

/// Parses a connection string, defaulting the connect timeout and the application name; its
/// `sslmode` chooses the TLS (`ca_file`: the roots of `verify-ca`/`verify-full`).
fn parse(url: &str, ca_file: Option<&Path>) -> StoreResult<Target> {
    let bad = |why: String| StoreError::Internal(format!("bad database url: {why}"));
    let (mode, url) = crate::pg_tls::split_sslmode(url).map_err(bad)?;
    let mut config: Config = url.parse().map_err(|e| bad(describe(&e)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("ringhub");
    }
    let tls = crate::pg_tls::client_config(mode, ca_file)
        .map_err(|why| StoreError::Internal(format!("database TLS: {why}")))?
        .map(MakeRustlsConnect::new);
    Ok(Target { config, tls })
}

/// Opens one client.
fn connect(target: &Target) -> StoreResult<Client> {
    let connected = match &target.tls {
        Some(tls) => target.config.connect(tls.clone()),
        None => target.config.connect(NoTls),
    };
    connected.map_err(|e| StoreError::Unavailable(describe(&e)))
}

/// Applies the pending migrations in one transaction, holding an advisory lock on the current
/// schema so that concurrent openers apply each version once. Returns the schema version.
fn migrate(client: &mut Client) -> Result<StoreResult<u32>, postgres::Error> {
    let mut tx = client.transaction()?;
    // A migration may take long; the lock may be held by another process migrating.
    tx.batch_execute(
        "SET LOCAL statement_timeout = 0; \
         SELECT pg_advisory_xact_lock(hashtext('ringhub.migrations'), \
                                      hashtext(COALESCE(current_schema(), '')));",
    )?;
    tx.batch_execute(migrations::SCHEMA_MIGRATIONS_DDL)?;
    let applied: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?
        .try_get(0)?;
    let Ok(applied) = u32::try_from(applied) else {
        return Ok(Err(StoreError::Internal(format!(
            "bad schema version {applied}"
        ))));
    };
    let latest = migrations::latest(migrations::POSTGRES);
    if applied > latest {
        return Ok(Err(StoreError::Internal(format!(
            "the database is at schema version {applied}, newer than this build's {latest}"
        ))));
    }
    for &(version, sql) in migrations::pending(migrations::POSTGRES, applied) {
        let Ok(version) = i32::try_from(version) else {
            return Ok(Err(StoreError::Internal(format!(
                "bad migration version {version}"
            ))));
        };
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES ($1, $2)",
            &[&version, &migrations::now_ms()],
        )?;
    }
    tx.commit()?;
    Ok(Ok(latest))
}

/// An error's text with its cause (the client's `Display` leaves the cause out). A database
/// error gives its severity, code, message and constraint, never its `DETAIL`, which quotes row
/// values (password and token hashes, ciphertexts) and would carry them into the logs.
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(constraint) = db.constraint() {
            text.push_str(&format!(" (constraint {constraint})"));
        }
        return text;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether `e` means the connection itself failed (rather than one statement).
fn is_connection_error(e: &postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        let code = db.code().code();
        return code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03");
    }
    if e.is_closed() {
        return true;
    }
    if std::error::Error::source(e).is_some_and(|cause| cause.is::<std::io::Error>()) {
        return true;
    }
    let text = e.to_string();
    [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "error parsing response from server",
        "unexpected message from server",
    ]
    .iter()
    .any(|prefix| text.starts_with(prefix))
}

/// Classifies a client error (see the module documentation).
#[expect(
    clippy::needless_pass_by_value,
    reason = "the shape `Result::map_err` calls"
)]
fn map_err(e: postgres::Error) -> StoreError {
    if let Some(db) = e.as_db_error() {
        if *db.code() == SqlState::UNIQUE_VIOLATION {
            return StoreError::Conflict(conflict_kind(db.constraint().unwrap_or("")));
        }
        let code = db.code().code();
        let transient = ["08", "53", "57"]
            .iter()
            .any(|class| code.starts_with(class))
            || matches!(code, "40001" | "40P01" | "55P03" | "25006");
        let text = format!("{code} {db}");
        return if transient {
            StoreError::Unavailable(text)
        } else {
            StoreError::Internal(text)
        };
    }
    if is_connection_error(&e) {
        StoreError::Unavailable(describe(&e))
    } else {
        StoreError::Internal(describe(&e))
    }
}

/// A column that holds a value this crate never writes.
fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("bad {what} in the database"))
}

/// One pooled client and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    broken: bool,
}

impl Conn {
    /// The prepared statement for `sql`, prepared on first use.
    fn statement(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    fn usable(&self) -> bool {
        !self.broken && !self.client.is_closed()
    }
}

/// A fixed-size pool. A slot is `None` when its connection must be (re)opened.
struct Pool {
    name: &'static str,
    config: Target,
    size: usize,
    idle: Mutex<Vec<Option<Conn>>>,
    freed: Condvar,
    breaker: Arc<Breaker>,
}

/// A slot taken from a pool; it goes back on drop, even on a panic.
struct Slot<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pool.idle().push(self.conn.take());
        self.pool.freed.notify_one();
    }
}

impl Pool {
    /// Opens `size` connections to `url`.
    fn open(
        name: &'static str,
        url: &str,
        size: usize,
        breaker: Arc<Breaker>,
        ca_file: Option<&Path>,
    ) -> StoreResult<Self> {
        let config = parse(url, ca_file)?;
        let pool = Self {
            name,
            config,
            size,
            idle: Mutex::new(Vec::with_capacity(size)),
            freed: Condvar::new(),
            breaker,
        };
        for _ in 0..size {
            let conn = pool.connect()?;
            pool.idle().push(Some(conn));
        }
        Ok(pool)
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Option<Conn>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a client and sets it up.
    fn connect(&self) -> StoreResult<Conn> {
        let mut client = connect(&self.config)?;
        client
            .batch_execute(&format!("SET statement_timeout = '{STATEMENT_TIMEOUT}'"))
            .map_err(map_err)?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
            broken: false,
        })
    }

    /// Takes a slot, waiting up to [`CHECKOUT_WAIT`].
    fn take(&self) -> StoreResult<Slot<'_>> {
        let deadline = Instant::now() + CHECKOUT_WAIT;
        let mut idle = self.idle();
        loop {
            if let Some(conn) = idle.pop() {
                return Ok(Slot { pool: self, conn });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "no free {} database connection after {CHECKOUT_WAIT:?}",
                    self.name
                )));
            }
            idle = self
                .freed
                .wait_timeout(idle, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `f` on a pooled connection, replacing it first if it is broken, and marking it
    /// broken when `f` fails with a connection error.
    fn run<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>) -> StoreResult<T> {
        // While the breaker is open this fails at once; what went through is recorded. A busy
        // pool (no free connection in time) says nothing about the database: not recorded.
        let probe = self.breaker.admit(Instant::now())?;
        let slot = match self.take() {
            Ok(slot) => slot,
            Err(e) => {
                self.breaker.abandon(probe);
                return Err(e);
            }
        };
        let result = self.run_on(slot, f);
        let reachable = !matches!(result, Err(StoreError::Unavailable(_)));
        self.breaker.record(probe, reachable, Instant::now());
        result
    }

    fn run_on<T>(
        &self,
        mut slot: Slot<'_>,
        f: impl FnOnce(&mut Conn) -> Result<T, postgres::Error>,
    ) -> StoreResult<T> {
        if !slot.conn.as_ref().is_some_and(Conn::usable) {
            slot.conn = None;
            slot.conn = Some(self.connect()?);
        }
        let Some(conn) = slot.conn.as_mut() else {
            return Err(StoreError::Internal("empty pool slot".into()));
        };
        f(conn).map_err(|e| {
            if is_connection_error(&e) || conn.client.is_closed() {
                conn.broken = true;
            }
            map_err(e)
        })
    }
}

const USER_BY_ID: &str = "SELECT id, username, email_cipher, email_index, password_hash, role, \
     created_at_ms FROM users WHERE id = $1 AND deleted_at_ms IS NULL";
const USER_BY_EMAIL_INDEX: &str = "SELECT id, username, email_cipher, email_index, \
     password_hash, role, created_at_ms FROM users \
     WHERE email_index = $1 AND deleted_at_ms IS NULL";

fn user_from_row(row: &Row) -> StoreResult<UserRecord> {
    let role: String = row.try_get(5).map_err(map_err)?;
    Ok(UserRecord {
        id: row.try_get(0).map_err(map_err)?,
        username: row.try_get(1).map_err(map_err)?,
        email_cipher: row.try_get(2).map_err(map_err)?,
        email_index: row
            .try_get::<_, Option<Vec<u8>>>(3)
            .map_err(map_err)?
            .unwrap_or_default(),
        password_hash: row.try_get(4).map_err(map_err)?,
        role: Role::parse(&role).ok_or_else(|| corrupt("role"))?,
        created_at_ms: row.try_get(6).map_err(map_err)?,
    })
}

const SESSION_BY_ID: &str = "SELECT id, user_id, created_at_ms, last_used_at_ms, \
     expires_at_ms, ip, user_agent, revoked_at_ms FROM sessions WHERE id = $1";
const LIVE_SESSIONS: &str = "SELECT id, user_id, created_at_ms, last_used_at_ms, \
     expires_at_ms, ip, user_agent, revoked_at_ms FROM sessions \
     WHERE user_id = $1 AND revoked_at_ms IS NULL AND expires_at_ms > $2 \
     ORDER BY created_at_ms DESC, id COLLATE \"C\" DESC";

fn session_from_row(row: &Row) -> StoreResult<SessionRecord> {
    Ok(SessionRecord {
        id: row.try_get(0).map_err(map_err)?,
        user_id: row.try_get(1).map_err(map_err)?,
        created_at_ms: row.try_get(2).map_err(map_err)?,
        last_used_at_ms: row.try_get(3).map_err(map_err)?,
        expires_at_ms: row.try_get(4).map_err(map_err)?,
        ip: row.try_get(5).map_err(map_err)?,
        user_agent: row.try_get(6).map_err(map_err)?,
        revoked_at_ms: row.try_get(7).map_err(map_err)?,
    })
}

const ROOM_BY_ID: &str = "SELECT id, permission, owner_id, max_members, presence, history, \
     created_at_ms FROM rooms WHERE id = $1";
const ALL_ROOMS: &str = "SELECT id, permission, owner_id, max_members, presence, history, \
     created_at_ms FROM rooms ORDER BY id COLLATE \"C\"";
const UPDATE_ROOM: &str = "UPDATE rooms SET permission = COALESCE($2, permission), \
     max_members = COALESCE($3, max_members) WHERE id = $1 \
     RETURNING id, permission, owner_id, max_members, presence, history, created_at_ms";

fn room_from_row(row: &Row) -> StoreResult<RoomRecord> {
    let permission: String = row.try_get(1).map_err(map_err)?;
    let max_members: i64 = row.try_get(3).map_err(map_err)?;
    Ok(RoomRecord {
        id: row.try_get(0).map_err(map_err)?,
        permission: Permission::parse(&permission).ok_or_else(|| corrupt("permission"))?,
        owner_id: row.try_get(2).map_err(map_err)?,
        max_members: u32::try_from(max_members).map_err(|_| corrupt("max_members"))?,
        presence: row.try_get(4).map_err(map_err)?,
        history: row.try_get(5).map_err(map_err)?,
        created_at_ms: row.try_get(6).map_err(map_err)?,
    })
}

fn member_role(row: &Row, column: usize) -> StoreResult<MemberRole> {
    let role: String = row.try_get(column).map_err(map_err)?;
    MemberRole::parse(&role).ok_or_else(|| corrupt("member role"))
}

/// A session's columns in the order of `INSERT INTO sessions (id, user_id, created_at_ms,
/// last_used_at_ms, expires_at_ms, ip, user_agent, revoked_at_ms)`.
fn session_row(session: &SessionRecord) -> [&(dyn postgres::types::ToSql + Sync); 8] {
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

const INSERT_TOKEN: &str =
    "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) VALUES ($1, $2, $3)";

impl Users for PgStore {
    fn create_user(&self, user: &UserRecord) -> StoreResult<()> {
        let lower = user.username.to_ascii_lowercase();
        self.primary.run(|conn| {
            let insert = conn.statement(
                "INSERT INTO users (id, username, username_lower, email_cipher, email_index, \
                 password_hash, role, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )?;
            conn.client
                .execute(
                    &insert,
                    &[
                        &user.id,
                        &user.username,
                        &lower,
                        &user.email_cipher,
                        &user.email_index,
                        &user.password_hash,
                        &user.role.as_str(),
                        &user.created_at_ms,
                    ],
                )
                .map(drop)
        })
    }

    fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        self.reads()
            .run(|conn| {
                let select = conn.statement(USER_BY_ID)?;
                conn.client.query_opt(&select, &[&id])
            })?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    fn user_by_email_index(&self, index: &[u8]) -> StoreResult<Option<UserRecord>> {
        self.reads()
            .run(|conn| {
                let select = conn.statement(USER_BY_EMAIL_INDEX)?;
                conn.client.query_opt(&select, &[&index])
            })?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    fn set_password(&self, id: &str, password_hash: &str) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let update = conn.statement(
                "UPDATE users SET password_hash = $2 WHERE id = $1 AND deleted_at_ms IS NULL",
            )?;
            conn.client
                .execute(&update, &[&id, &password_hash])
                .map(|n| n == 1)
        })
    }

    fn rehash_password(&self, id: &str, old_hash: &str, new_hash: &str) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let update = conn.statement(
                "UPDATE users SET password_hash = $3 \
                 WHERE id = $1 AND password_hash = $2 AND deleted_at_ms IS NULL",
            )?;
            conn.client
                .execute(&update, &[&id, &old_hash, &new_hash])
                .map(|n| n == 1)
        })
    }

    fn set_role(&self, id: &str, role: Role) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let update = conn
                .statement("UPDATE users SET role = $2 WHERE id = $1 AND deleted_at_ms IS NULL")?;
            conn.client
                .execute(&update, &[&id, &role.as_str()])
                .map(|n| n == 1)
        })
    }

    fn soft_delete_user(&self, id: &str, now_ms: i64) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let update = conn.statement(
                "UPDATE users SET deleted_at_ms = $2, email_cipher = '\\x'::bytea, \
                 email_index = NULL, password_hash = '' WHERE id = $1 AND deleted_at_ms IS NULL",
            )?;
            let leave_rooms = conn.statement("DELETE FROM room_members WHERE user_id = $1")?;
            // Dropping `tx` without commit rolls back: the early return writes nothing.
            let mut tx = conn.client.transaction()?;
            if tx.execute(&update, &[&id, &now_ms])? != 1 {
                return Ok(false);
            }
            tx.execute(&leave_rooms, &[&id])?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn admins(&self) -> StoreResult<Vec<String>> {
        let rows = self.primary.run(|conn| {
            let select = conn.statement(
                "SELECT id FROM users WHERE role = 'admin' AND deleted_at_ms IS NULL \
                 ORDER BY id COLLATE \"C\"",
            )?;
            conn.client.query(&select, &[])
        })?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(map_err))
            .collect()
    }
}

impl Sessions for PgStore {
    fn create_session(&self, session: &SessionRecord, first_token_hash: &[u8]) -> StoreResult<()> {
        self.primary.run(|conn| {
            let insert_session = conn.statement(
                "INSERT INTO sessions (id, user_id, created_at_ms, last_used_at_ms, \
                 expires_at_ms, ip, user_agent, revoked_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )?;
            let insert_token = conn.statement(INSERT_TOKEN)?;
            let mut tx = conn.client.transaction()?;
            tx.execute(&insert_session, &session_row(session))?;
            tx.execute(
                &insert_token,
                &[&first_token_hash, &session.id, &session.created_at_ms],
            )?;
            tx.commit()
        })
    }

    fn adopt_session(
        &self,
        session: &SessionRecord,
        token_hash: &[u8],
        now_ms: i64,
    ) -> StoreResult<()> {
        self.primary.run(|conn| {
            let insert_session = conn.statement(
                "INSERT INTO sessions (id, user_id, created_at_ms, last_used_at_ms, \
                 expires_at_ms, ip, user_agent, revoked_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO UPDATE SET \
                 last_used_at_ms = GREATEST(sessions.last_used_at_ms, EXCLUDED.last_used_at_ms), \
                 expires_at_ms = GREATEST(sessions.expires_at_ms, EXCLUDED.expires_at_ms), \
                 revoked_at_ms = COALESCE(sessions.revoked_at_ms, EXCLUDED.revoked_at_ms)",
            )?;
            let retire = conn.statement(
                "UPDATE refresh_tokens SET rotated_at_ms = $3 \
                 WHERE session_id = $1 AND rotated_at_ms IS NULL AND token_hash <> $2",
            )?;
            let insert_token = conn.statement(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                 VALUES ($1, $2, $3) ON CONFLICT (token_hash) DO NOTHING",
            )?;
            let mut tx = conn.client.transaction()?;
            tx.execute(&insert_session, &session_row(session))?;
            tx.execute(&retire, &[&session.id, &token_hash, &now_ms])?;
            tx.execute(&insert_token, &[&token_hash, &session.id, &now_ms])?;
            tx.commit()
        })
    }

    fn session(&self, id: &str) -> StoreResult<Option<SessionRecord>> {
        self.reads()
            .run(|conn| {
                let select = conn.statement(SESSION_BY_ID)?;
                conn.client.query_opt(&select, &[&id])
            })?
            .as_ref()
            .map(session_from_row)
            .transpose()
    }

    fn live_sessions(&self, user_id: &str, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        self.reads()
            .run(|conn| {
                let select = conn.statement(LIVE_SESSIONS)?;
                conn.client.query(&select, &[&user_id, &now_ms])
            })?
            .iter()
            .map(session_from_row)
            .collect()
    }

    fn refresh_token(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshRecord>> {
        let row = self.primary.run(|conn| {
            let select = conn.statement(
                "SELECT token_hash, session_id, created_at_ms, rotated_at_ms, child_cipher \
                 FROM refresh_tokens WHERE token_hash = $1",
            )?;
            conn.client.query_opt(&select, &[&token_hash])
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(RefreshRecord {
            token_hash: row.try_get(0).map_err(map_err)?,
            session_id: row.try_get(1).map_err(map_err)?,
            created_at_ms: row.try_get(2).map_err(map_err)?,
            rotated_at_ms: row.try_get(3).map_err(map_err)?,
            child_cipher: row.try_get(4).map_err(map_err)?,
        }))
    }

    fn rotate(&self, r: &Rotation<'_>) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let lock_session =
                conn.statement("SELECT revoked_at_ms FROM sessions WHERE id = $1 FOR UPDATE")?;
            let use_token = conn.statement(
                "UPDATE refresh_tokens SET rotated_at_ms = $1, child_cipher = $2 \
                 WHERE token_hash = $3 AND session_id = $4 AND rotated_at_ms IS NULL",
            )?;
            let insert_token = conn.statement(INSERT_TOKEN)?;
            let touch_session = conn.statement(
                "UPDATE sessions SET last_used_at_ms = $2, expires_at_ms = $3, ip = $4, \
                 user_agent = $5 WHERE id = $1",
            )?;
            // Dropping `tx` without commit rolls back: the early returns write nothing.
            let mut tx = conn.client.transaction()?;
            // The session's row lock orders this rotation after any concurrent rotation or
            // revocation of the same session.
            let Some(session) = tx.query_opt(&lock_session, &[&r.session_id])? else {
                return Ok(false);
            };
            if session.try_get::<_, Option<i64>>(0)?.is_some() {
                return Ok(false);
            }
            let used = tx.execute(
                &use_token,
                &[&r.now_ms, &r.child_cipher, &r.old_hash, &r.session_id],
            )?;
            if used != 1 {
                return Ok(false);
            }
            tx.execute(&insert_token, &[&r.new_hash, &r.session_id, &r.now_ms])?;
            tx.execute(
                &touch_session,
                &[
                    &r.session_id,
                    &r.now_ms,
                    &r.expires_at_ms,
                    &r.ip,
                    &r.user_agent,
                ],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    fn revoke_session(&self, id: &str, now_ms: i64) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let update = conn.statement(
                "UPDATE sessions SET revoked_at_ms = $2 WHERE id = $1 AND revoked_at_ms IS NULL",
            )?;
            conn.client
                .execute(&update, &[&id, &now_ms])
                .map(|n| n == 1)
        })
    }

    fn revoke_user_sessions(
        &self,
        user_id: &str,
        keep: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        let rows = self.primary.run(|conn| {
            let update = conn.statement(
                "UPDATE sessions SET revoked_at_ms = $3 WHERE user_id = $1 \
                 AND revoked_at_ms IS NULL AND id IS DISTINCT FROM $2 RETURNING id",
            )?;
            conn.client.query(&update, &[&user_id, &keep, &now_ms])
        })?;
        let mut ids = rows
            .iter()
            .map(|row| row.try_get(0).map_err(map_err))
            .collect::<StoreResult<Vec<String>>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn prune_sessions(&self, before_ms: i64) -> StoreResult<u64> {
        // Their refresh tokens go by `ON DELETE CASCADE`. A concurrent rotation holds the
        // session's row lock; this delete waits for it and then rechecks the new expiry.
        self.primary.run(|conn| {
            let delete = conn
                .statement("DELETE FROM sessions WHERE expires_at_ms < $1 OR revoked_at_ms < $1")?;
            conn.client.execute(&delete, &[&before_ms])
        })
    }

    fn clear_refresh_children(&self, rotated_before_ms: i64) -> StoreResult<u64> {
        self.primary.run(|conn| {
            let clear = conn.statement(
                "UPDATE refresh_tokens SET child_cipher = NULL \
                 WHERE child_cipher IS NOT NULL AND rotated_at_ms < $1",
            )?;
            conn.client.execute(&clear, &[&rotated_before_ms])
        })
    }
}

impl Revocations for PgStore {
    fn add_revocation(&self, revocation: &Revocation) -> StoreResult<()> {
        self.primary.run(|conn| {
            let upsert = conn.statement(
                "INSERT INTO revocations (kind, subject, revoked_at_ms, keep_until_ms) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (kind, subject) DO UPDATE SET \
                 revoked_at_ms = GREATEST(revocations.revoked_at_ms, EXCLUDED.revoked_at_ms), \
                 keep_until_ms = GREATEST(revocations.keep_until_ms, EXCLUDED.keep_until_ms)",
            )?;
            conn.client
                .execute(
                    &upsert,
                    &[
                        &revocation.kind.as_str(),
                        &revocation.subject,
                        &revocation.revoked_at_ms,
                        &revocation.keep_until_ms,
                    ],
                )
                .map(drop)
        })
    }

    fn live_revocations(&self, now_ms: i64) -> StoreResult<Vec<Revocation>> {
        let rows = self.primary.run(|conn| {
            let select = conn.statement(
                "SELECT kind, subject, revoked_at_ms, keep_until_ms FROM revocations \
                 WHERE keep_until_ms > $1 \
                 ORDER BY revoked_at_ms, kind COLLATE \"C\", subject COLLATE \"C\"",
            )?;
            conn.client.query(&select, &[&now_ms])
        })?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get(0).map_err(map_err)?;
                Ok(Revocation {
                    kind: RevocationKind::parse(&kind).ok_or_else(|| corrupt("revocation kind"))?,
                    subject: row.try_get(1).map_err(map_err)?,
                    revoked_at_ms: row.try_get(2).map_err(map_err)?,
                    keep_until_ms: row.try_get(3).map_err(map_err)?,
                })
            })
            .collect()
    }

    fn prune_revocations(&self, now_ms: i64) -> StoreResult<u64> {
        self.primary.run(|conn| {
            let delete = conn.statement("DELETE FROM revocations WHERE keep_until_ms <= $1")?;
            conn.client.execute(&delete, &[&now_ms])
        })
    }
}

impl Idempotency for PgStore {
    fn idempotency(
        &self,
        scope: &str,
        key: &str,
        since_ms: i64,
    ) -> StoreResult<Option<IdempotencyRecord>> {
        let row = self.primary.run(|conn| {
            let select = conn.statement(
                "SELECT scope, key, body_hash, status, response_cipher, token_hash, \
                 created_at_ms FROM idempotency \
                 WHERE scope = $1 AND key = $2 AND created_at_ms >= $3",
            )?;
            conn.client.query_opt(&select, &[&scope, &key, &since_ms])
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let status: i32 = row.try_get(3).map_err(map_err)?;
        Ok(Some(IdempotencyRecord {
            scope: row.try_get(0).map_err(map_err)?,
            key: row.try_get(1).map_err(map_err)?,
            body_hash: row.try_get(2).map_err(map_err)?,
            status: u16::try_from(status).map_err(|_| corrupt("status"))?,
            response_cipher: row.try_get(4).map_err(map_err)?,
            token_hash: row.try_get(5).map_err(map_err)?,
            created_at_ms: row.try_get(6).map_err(map_err)?,
        }))
    }

    fn put_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<bool> {
        let status = i32::from(record.status);
        self.primary.run(|conn| {
            let insert = conn.statement(
                "INSERT INTO idempotency (scope, key, body_hash, status, response_cipher, \
                 token_hash, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (scope, key) DO UPDATE SET body_hash = EXCLUDED.body_hash, \
                 status = EXCLUDED.status, response_cipher = EXCLUDED.response_cipher, \
                 token_hash = EXCLUDED.token_hash, created_at_ms = EXCLUDED.created_at_ms \
                 WHERE idempotency.created_at_ms < EXCLUDED.created_at_ms - $8",
            )?;
            conn.client
                .execute(
                    &insert,
                    &[
                        &record.scope,
                        &record.key,
                        &record.body_hash,
                        &status,
                        &record.response_cipher,
                        &record.token_hash,
                        &record.created_at_ms,
                        &crate::IDEMPOTENCY_TTL_MS,
                    ],
                )
                .map(|n| n == 1)
        })
    }

    fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64> {
        self.primary.run(|conn| {
            let delete = conn.statement("DELETE FROM idempotency WHERE created_at_ms < $1")?;
            conn.client.execute(&delete, &[&before_ms])
        })
    }
}

impl Rooms for PgStore {
    fn create_room(&self, room: &RoomRecord) -> StoreResult<()> {
        let max_members = i64::from(room.max_members);
        self.primary.run(|conn| {
            let insert = conn.statement(
                "INSERT INTO rooms (id, permission, owner_id, max_members, presence, history, \
                 created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )?;
            conn.client
                .execute(
                    &insert,
                    &[
                        &room.id,
                        &room.permission.as_str(),
                        &room.owner_id,
                        &max_members,
                        &room.presence,
                        &room.history,
                        &room.created_at_ms,
                    ],
                )
                .map(drop)
        })
    }

    fn room(&self, id: &str) -> StoreResult<Option<RoomRecord>> {
        self.reads()
            .run(|conn| {
                let select = conn.statement(ROOM_BY_ID)?;
                conn.client.query_opt(&select, &[&id])
            })?
            .as_ref()
            .map(room_from_row)
            .transpose()
    }

    fn all_rooms(&self) -> StoreResult<Vec<RoomRecord>> {
        self.primary
            .run(|conn| {
                let select = conn.statement(ALL_ROOMS)?;
                conn.client.query(&select, &[])
            })?
            .iter()
            .map(room_from_row)
            .collect()
    }

    fn update_room(&self, id: &str, update: &RoomUpdate) -> StoreResult<Option<RoomRecord>> {
        let permission = update.permission.map(Permission::as_str);
        let max_members = update.max_members.map(i64::from);
        self.primary
            .run(|conn| {
                let update = conn.statement(UPDATE_ROOM)?;
                conn.client
                    .query_opt(&update, &[&id, &permission, &max_members])
            })?
            .as_ref()
            .map(room_from_row)
            .transpose()
    }

    fn delete_room(&self, id: &str) -> StoreResult<bool> {
        // The memberships go by `ON DELETE CASCADE`.
        self.primary.run(|conn| {
            let delete = conn.statement("DELETE FROM rooms WHERE id = $1")?;
            conn.client.execute(&delete, &[&id]).map(|n| n == 1)
        })
    }

    fn put_member(
        &self,
        room_id: &str,
        user_id: &str,
        role: MemberRole,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let upsert = conn.statement(
                "INSERT INTO room_members (room_id, user_id, role, added_at_ms) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (room_id, user_id) DO UPDATE SET role = EXCLUDED.role",
            )?;
            // The foreign key check locks the room's row, so a concurrent `delete_room` either
            // waits for this insert (and cascades it away) or has won (and this fails).
            match conn
                .client
                .execute(&upsert, &[&room_id, &user_id, &role.as_str(), &now_ms])
            {
                Ok(_) => Ok(true),
                // The table's one foreign key: the room does not exist.
                Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool> {
        self.primary.run(|conn| {
            let delete =
                conn.statement("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")?;
            conn.client
                .execute(&delete, &[&room_id, &user_id])
                .map(|n| n == 1)
        })
    }

    fn members(&self, room_id: &str) -> StoreResult<Vec<(String, MemberRole)>> {
        let rows = self.reads().run(|conn| {
            let select = conn.statement(
                "SELECT user_id, role FROM room_members WHERE room_id = $1 \
                 ORDER BY user_id COLLATE \"C\"",
            )?;
            conn.client.query(&select, &[&room_id])
        })?;
        rows.iter()
            .map(|row| Ok((row.try_get(0).map_err(map_err)?, member_role(row, 1)?)))
            .collect()
    }

    fn all_members(&self) -> StoreResult<Vec<(String, String, MemberRole)>> {
        let rows = self.primary.run(|conn| {
            let select = conn.statement(
                "SELECT room_id, user_id, role FROM room_members \
                 ORDER BY room_id COLLATE \"C\", user_id COLLATE \"C\"",
            )?;
            conn.client.query(&select, &[])
        })?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get(0).map_err(map_err)?,
                    row.try_get(1).map_err(map_err)?,
                    member_role(row, 2)?,
                ))
            })
            .collect()
    }
}

impl Store for PgStore {
    fn ping(&self) -> StoreResult<()> {
        let ping = |pool: &Pool| {
            pool.run(|conn| {
                let select = conn.statement("SELECT 1")?;
                conn.client.query_one(&select, &[]).map(drop)
            })
        };
        ping(&self.primary)?;
        self.replica.as_ref().map_or(Ok(()), ping)
    }

    fn schema_version(&self) -> StoreResult<u32> {
        let version: i32 = self.primary.run(|conn| {
            let select =
                conn.statement("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")?;
            conn.client.query_one(&select, &[])?.try_get(0)
        })?;
        u32::try_from(version).map_err(|_| corrupt("schema version"))
    }

    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn breaker_state(&self) -> Option<BreakerState> {
        Some(self.breaker.state(Instant::now()))
    }

    fn key_fingerprint(&self, name: &str, fingerprint: &str, now_ms: i64) -> StoreResult<String> {
        self.primary.run(|conn| {
            let insert = conn.statement(
                "INSERT INTO key_fingerprints (name, fingerprint, recorded_at_ms) \
                 VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
            )?;
            let select =
                conn.statement("SELECT fingerprint FROM key_fingerprints WHERE name = $1")?;
            conn.client
                .execute(&insert, &[&name, &fingerprint, &now_ms])?;
            conn.client.query_one(&select, &[&name])?.try_get(0)
        })
    }

    fn setting(&self, name: &str) -> StoreResult<Option<String>> {
        self.primary.run(|conn| {
            let select = conn.statement("SELECT value FROM settings WHERE name = $1")?;
            conn.client
                .query_opt(&select, &[&name])?
                .map(|row| row.try_get(0))
                .transpose()
        })
    }

    fn put_setting(&self, name: &str, value: &str, now_ms: i64) -> StoreResult<()> {
        self.primary.run(|conn| {
            let upsert = conn.statement(
                "INSERT INTO settings (name, value, changed_at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET value = $2, changed_at_ms = $3",
            )?;
            conn.client
                .execute(&upsert, &[&name, &value, &now_ms])
                .map(drop)
        })
    }

    fn replace_key_fingerprint(
        &self,
        name: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.primary.run(|conn| {
            let upsert = conn.statement(
                "INSERT INTO key_fingerprints (name, fingerprint, recorded_at_ms) \
                 VALUES ($1, $2, $3) ON CONFLICT (name) \
                 DO UPDATE SET fingerprint = $2, recorded_at_ms = $3",
            )?;
            conn.client
                .execute(&upsert, &[&name, &fingerprint, &now_ms])
                .map(drop)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        for good in ["a", "st_1_2_3", &"x".repeat(60)] {
            assert!(check_schema(good).is_ok(), "{good}");
        }
        for bad in ["", "A", "a-b", "a\"b", "a;drop", "é", &"x".repeat(61)] {
            assert!(check_schema(bad).is_err(), "{bad}");
            assert!(scratch_schema_url("postgres://nowhere.invalid/x", bad).is_err());
            assert!(drop_schema("postgres://nowhere.invalid/x", bad).is_err());
        }
    }

    #[test]
    fn scratch_url_parses_with_the_search_path_option() {
        // The URL shape only; the suite checks `current_schema()` on a live server.
        let url = "postgres://postgres@127.0.0.1:5432/test?options=-c%20search_path%3Dabc_1";
        let config: Config = url.parse().unwrap();
        assert_eq!(config.get_options(), Some("-c search_path=abc_1"));
        let kv: Config = "host=127.0.0.1 dbname=test options='-c search_path=abc_1'"
            .parse()
            .unwrap();
        assert_eq!(kv.get_options(), Some("-c search_path=abc_1"));
    }

    /// Whether the session of a client opened by `url` (and `ca_file`) is encrypted.
    fn encrypted(url: &str, ca_file: Option<&Path>) -> StoreResult<bool> {
        let mut client = connect(&parse(url, ca_file)?)?;
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .map_err(map_err)?;
        Ok(row.get(0))
    }

    /// sslmode as libpq reads it, against the local server's own certificate (`ssl_cert_file`,
    /// `localhost` on Debian's snakeoil): `disable` is plain; `require` encrypts without checking;
    /// `verify-ca` checks the chain; `verify-full` also the host name, so 127.0.0.1 is refused
    /// and `localhost` accepted; roots that did not sign the certificate are refused.
    #[test]
    fn sslmode_is_carried_out_with_rustls() {
        let base = "postgres://postgres@127.0.0.1:5432/test";
        let mut admin = connect(&parse(&format!("{base}?sslmode=disable"), None).unwrap()).unwrap();
        let on: String = admin.query_one("SHOW ssl", &[]).unwrap().get(0);
        assert_eq!(
            on, "on",
            "the local PostgreSQL serves TLS (Debian's default)"
        );
        let cert: String = admin.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
        let ca = Path::new(&cert);
        assert!(!encrypted(&format!("{base}?sslmode=disable"), None).unwrap());
        assert!(encrypted(&format!("{base}?sslmode=require"), None).unwrap());
        assert!(encrypted(base, None).unwrap(), "prefer, libpq's default");
        assert!(encrypted(&format!("{base}?sslmode=verify-ca"), Some(ca)).unwrap());
        let wrong_name = encrypted(&format!("{base}?sslmode=verify-full"), Some(ca)).unwrap_err();
        assert!(
            matches!(&wrong_name, StoreError::Unavailable(why) if why.contains("certificate")),
            "{wrong_name:?}"
        );
        let by_name = "postgres://postgres@localhost:5432/test?sslmode=verify-full";
        assert!(encrypted(by_name, Some(ca)).unwrap());
        // Roots that did not sign it: the system's bundle.
        let unknown = encrypted(&format!("{base}?sslmode=verify-ca"), None).unwrap_err();
        assert!(matches!(unknown, StoreError::Unavailable(_)), "{unknown:?}");
    }

    #[test]
    fn pooled_connections_have_the_statement_timeout() {
        let url = std::env::var("RINGHUB_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let pool = Pool::open(
            "primary",
            &url,
            2,
            Arc::new(Breaker::new(BreakerSettings::default())),
            None,
        )
        .unwrap();
        for _ in 0..2 {
            let timeout: String = pool
                .run(|conn| {
                    conn.client
                        .query_one("SHOW statement_timeout", &[])?
                        .try_get(0)
                })
                .unwrap();
            assert_eq!(timeout, STATEMENT_TIMEOUT);
        }
        let err = pool
            .run(|conn| conn.client.batch_execute("SELECT pg_sleep(6)"))
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        pool.run(|conn| conn.client.batch_execute("SELECT 1"))
            .unwrap();
    }

    #[test]
    fn unreachable_server_is_unavailable() {
        // Port 1 on loopback: nothing listens there.
        let err = PgStore::open(
            "postgres://postgres@127.0.0.1:1/test",
            None,
            1,
            BreakerSettings::default(),
        )
        .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
