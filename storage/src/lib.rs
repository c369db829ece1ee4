//! ringhub's durable state behind narrow traits, one per concern: [`Users`], [`Sessions`]
//! (refresh-token families), [`Revocations`], [`Idempotency`] and [`Rooms`] (persistent rooms and
//! their memberships), gathered by [`Store`].
//!
//! Two implementations share one schema and one test suite: [`sqlite::SqliteStore`] (the embedded
//! default, a WAL-mode file in `data_dir`) and [`postgres::PgStore`] (the sync `postgres` client,
//! pooled). Every call blocks: callers run them on blocking threads, never on a shard. Values
//! that must stay secret at rest (e-mails, the child pair of a rotation, idempotent responses)
//! arrive here already encrypted; refresh tokens arrive hashed. This crate never sees a key.
//!
//! Open a store with [`open`]; it applies the versioned migrations of `migrations/` first.
#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::Arc;

mod breaker;
pub mod migrations;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

pub use breaker::{BreakerSettings, BreakerState};

/// What went wrong, classified for the edge: the server maps each variant to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was hit; the payload names it (`"email"`, `"username"`, `"id"`,
    /// `"key"`). The caller answers 409 with the matching code.
    #[error("already exists: {0}")]
    Conflict(&'static str),
    /// The database cannot be reached or timed out. The caller answers 503 `unavailable`.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug, a corrupt row). The caller answers 500 `internal` and logs it.
    #[error("storage error: {0}")]
    Internal(String),
}

/// Shorthand for results of this crate.
pub type StoreResult<T> = Result<T, StoreError>;

/// A global role (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An ordinary user.
    User,
    /// May do everything with rooms.
    Admin,
}

impl Role {
    /// The stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(Self::User),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// One account. Times are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// UUID string.
    pub id: String,
    /// As registered; unique ignoring ASCII case among live accounts.
    pub username: String,
    /// The e-mail encrypted by the caller (AES-256-GCM, key id prefixed).
    pub email_cipher: Vec<u8>,
    /// HMAC blind index of the normalized e-mail; unique among live accounts.
    pub email_index: Vec<u8>,
    /// The bcrypt hash.
    pub password_hash: String,
    /// Global role.
    pub role: Role,
    /// Creation time.
    pub created_at_ms: i64,
}

/// Accounts.
pub trait Users {
    /// Inserts a user. `Conflict("email")` or `Conflict("username")` when a live account holds
    /// that e-mail index or username (ignoring ASCII case).
    fn create_user(&self, user: &UserRecord) -> StoreResult<()>;
    /// A live (not deleted) user by id.
    fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRecord>>;
    /// A live user by e-mail blind index.
    fn user_by_email_index(&self, index: &[u8]) -> StoreResult<Option<UserRecord>>;
    /// Replaces the password hash of a live user; false when there is none.
    fn set_password(&self, id: &str, password_hash: &str) -> StoreResult<bool>;
    /// Replaces a live user's password hash only while it is still `old_hash` (a re-hash of the
    /// same password at another cost must never undo a concurrent password change); false when
    /// it changed or there is no such user.
    fn rehash_password(&self, id: &str, old_hash: &str, new_hash: &str) -> StoreResult<bool>;
    /// Sets the role of a live user; false when there is none.
    fn set_role(&self, id: &str, role: Role) -> StoreResult<bool>;
    /// Soft-deletes a live user: marks it deleted at `now_ms`, erases its e-mail cipher and
    /// index (so the e-mail and username are free again) and its password hash, and removes its
    /// room memberships, in one transaction. Rooms it owns stay. False (and nothing written) when
    /// there was no live user.
    fn soft_delete_user(&self, id: &str, now_ms: i64) -> StoreResult<bool>;
    /// The ids of the live users whose role is [`Role::Admin`], ascending (byte order).
    fn admins(&self) -> StoreResult<Vec<String>>;
}

/// One login: a refresh-token family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Random id (URL-safe string).
    pub id: String,
    /// Owner.
    pub user_id: String,
    /// Login time.
    pub created_at_ms: i64,
    /// Last refresh (or the login).
    pub last_used_at_ms: i64,
    /// When the current refresh token stops working (sliding, capped by the session's max age).
    pub expires_at_ms: i64,
    /// Client address at the last use.
    pub ip: String,
    /// Client User-Agent at the last use (truncated by the caller).
    pub user_agent: String,
    /// Set once revoked; a revoked session never comes back.
    pub revoked_at_ms: Option<i64>,
}

/// One refresh token of a family, stored by hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// SHA-256 of the token (primary key).
    pub token_hash: Vec<u8>,
    /// Its session.
    pub session_id: String,
    /// Issue time.
    pub created_at_ms: i64,
    /// When it was rotated (used); `None` while it is the family's current token.
    pub rotated_at_ms: Option<i64>,
    /// The pair handed out by its rotation, encrypted by the caller, kept for the
    /// `refresh_reuse_interval` exception.
    pub child_cipher: Option<Vec<u8>>,
}

/// What a rotation writes, all or nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation<'a> {
    /// The token being used.
    pub old_hash: &'a [u8],
    /// The token replacing it.
    pub new_hash: &'a [u8],
    /// The session both belong to.
    pub session_id: &'a str,
    /// Now.
    pub now_ms: i64,
    /// The session's new refresh expiry.
    pub expires_at_ms: i64,
    /// Client address now.
    pub ip: &'a str,
    /// Client User-Agent now.
    pub user_agent: &'a str,
    /// The new pair, encrypted, stored on the old token's row.
    pub child_cipher: &'a [u8],
}

/// Sessions and their refresh tokens.
pub trait Sessions {
    /// Inserts a session with its first refresh token.
    fn create_session(&self, session: &SessionRecord, first_token_hash: &[u8]) -> StoreResult<()>;
    /// Writes back a session that was created elsewhere (held while the database was
    /// unreachable), in one transaction: the session is inserted unless it exists (a session
    /// written back twice is one session), `token_hash` becomes its one current refresh token
    /// (any other current token of the session is marked rotated at `now_ms`), and a revocation
    /// in `session.revoked_at_ms` is kept.
    fn adopt_session(
        &self,
        session: &SessionRecord,
        token_hash: &[u8],
        now_ms: i64,
    ) -> StoreResult<()>;
    /// A session by id, revoked or not.
    fn session(&self, id: &str) -> StoreResult<Option<SessionRecord>>;
    /// The user's sessions that are neither revoked nor expired at `now_ms`, newest first.
    fn live_sessions(&self, user_id: &str, now_ms: i64) -> StoreResult<Vec<SessionRecord>>;
    /// A refresh token by hash.
    fn refresh_token(&self, token_hash: &[u8]) -> StoreResult<Option<RefreshRecord>>;
    /// In one transaction: marks `old_hash` rotated (only if it is still current and its session
    /// is not revoked), inserts `new_hash`, and updates the session's last use, expiry, ip and
    /// user agent. False (and nothing written) when the old token was no longer current: a
    /// concurrent rotation won.
    fn rotate(&self, rotation: &Rotation<'_>) -> StoreResult<bool>;
    /// Revokes one session; false when it was already revoked or does not exist.
    fn revoke_session(&self, id: &str, now_ms: i64) -> StoreResult<bool>;
    /// Revokes every unrevoked session of a user except `keep`; returns the ids revoked.
    fn revoke_user_sessions(
        &self,
        user_id: &str,
        keep: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;
    /// Deletes the sessions that expired, or were revoked, before `before_ms`, with their
    /// refresh tokens; returns how many sessions.
    fn prune_sessions(&self, before_ms: i64) -> StoreResult<u64>;
    /// Erases the encrypted child pair of every token rotated before `rotated_before_ms` (the
    /// reuse window has passed: only hashes stay at rest); returns how many.
    fn clear_refresh_children(&self, rotated_before_ms: i64) -> StoreResult<u64>;
}

/// What a revocation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationKind {
    /// Every token of one session (`subject` = session id).
    Session,
    /// Every token of one user issued at or before `revoked_at_ms` (`subject` = user id).
    User,
}

impl RevocationKind {
    /// The stored spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::User => "user",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "session" => Some(Self::Session),
            "user" => Some(Self::User),
            _ => None,
        }
    }
}

/// One revocation, kept until no token it covers can still be valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// What it covers.
    pub kind: RevocationKind,
    /// Session id or user id.
    pub subject: String,
    /// When it was made.
    pub revoked_at_ms: i64,
    /// After this no covered token can be valid any more (the longest access-token lifetime
    /// after `revoked_at_ms`; `i64::MAX` for ever).
    pub keep_until_ms: i64,
}

/// The durable record of revocations, loaded into memory at start.
pub trait Revocations {
    /// Records a revocation (the same kind and subject again replaces the older one).
    fn add_revocation(&self, revocation: &Revocation) -> StoreResult<()>;
    /// Every revocation whose `keep_until_ms` is after `now_ms`.
    fn live_revocations(&self, now_ms: i64) -> StoreResult<Vec<Revocation>>;
    /// Deletes revocations no longer needed; returns how many.
    fn prune_revocations(&self, now_ms: i64) -> StoreResult<u64>;
}

/// A stored answer to an `Idempotency-Key` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The route and caller scope, e.g. `login`.
    pub scope: String,
    /// The client's key.
    pub key: String,
    /// SHA-256 of the request body.
    pub body_hash: Vec<u8>,
    /// The first answer's status.
    pub status: u16,
    /// The first answer's body, encrypted by the caller.
    pub response_cipher: Vec<u8>,
    /// For a login: the refresh token handed out, by hash, to tell whether it has been rotated.
    pub token_hash: Option<Vec<u8>>,
    /// When it was stored.
    pub created_at_ms: i64,
}

/// How long an `Idempotency-Key` record counts (24 h), in milliseconds: an older one is replaced
/// by [`Idempotency::put_idempotency`].
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 60 * 60 * 1000;

/// `Idempotency-Key` records (24 h).
pub trait Idempotency {
    /// The record for `(scope, key)` stored at or after `since_ms`.
    fn idempotency(
        &self,
        scope: &str,
        key: &str,
        since_ms: i64,
    ) -> StoreResult<Option<IdempotencyRecord>>;
    /// Stores a record; false when `(scope, key)` already has one (a concurrent first request
    /// won), in which case nothing changes. An existing record stored more than
    /// [`IDEMPOTENCY_TTL_MS`] before `record.created_at_ms` has expired: it is replaced (true),
    /// so callers need not prune before storing.
    fn put_idempotency(&self, record: &IdempotencyRecord) -> StoreResult<bool>;
    /// Deletes records stored before `before_ms`; returns how many.
    fn prune_idempotency(&self, before_ms: i64) -> StoreResult<u64>;
}

/// A room's permission level (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Any user joins, reads and publishes; the owner manages.
    Public,
    /// Any user joins and reads; the owner, moderators and members publish.
    Restricted,
    /// Only the owner, moderators and members join, read and publish.
    Private,
    /// Only the owner.
    OwnerOnly,
}

impl Permission {
    /// The stored (and wire) spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Restricted => "restricted",
            Self::Private => "private",
            Self::OwnerOnly => "owner_only",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "public" => Some(Self::Public),
            "restricted" => Some(Self::Restricted),
            "private" => Some(Self::Private),
            "owner_only" => Some(Self::OwnerOnly),
            _ => None,
        }
    }
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    /// A member.
    Member,
    /// A member who may also manage the room's members (appointed by the owner).
    Moderator,
}

impl MemberRole {
    /// The stored (and wire) spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Moderator => "moderator",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Self::Member),
            "moderator" => Some(Self::Moderator),
            _ => None,
        }
    }
}

/// A persistent room (created with `POST /rooms`). Times are epoch milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    /// The room id (SPEC §5's syntax, checked by the caller).
    pub id: String,
    /// Who may do what.
    pub permission: Permission,
    /// The owner's user id.
    pub owner_id: String,
    /// The most members joined at once.
    pub max_members: u32,
    /// Whether presence is tracked.
    pub presence: bool,
    /// Whether history is kept.
    pub history: bool,
    /// Creation time.
    pub created_at_ms: i64,
}

/// The settings [`Rooms::update_room`] changes; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct RoomUpdate {
    /// A new permission level.
    pub permission: Option<Permission>,
    /// A new member limit.
    pub max_members: Option<u32>,
}

/// Persistent rooms and their memberships, loaded into the server's directory at start.
pub trait Rooms {
    /// Inserts a room; `Conflict("id")` when the id exists.
    fn create_room(&self, room: &RoomRecord) -> StoreResult<()>;
    /// A room by id.
    fn room(&self, id: &str) -> StoreResult<Option<RoomRecord>>;
    /// Every room, by id ascending (byte order; the server loads its directory from this at
    /// start).
    fn all_rooms(&self) -> StoreResult<Vec<RoomRecord>>;
    /// Applies the given changes; returns the updated room, None when it does not exist.
    fn update_room(&self, id: &str, update: &RoomUpdate) -> StoreResult<Option<RoomRecord>>;
    /// Deletes the room and its memberships; false when it did not exist.
    fn delete_room(&self, id: &str) -> StoreResult<bool>;
    /// Inserts or replaces a membership (a replaced one keeps its original `now_ms`); false
    /// (nothing written) when the room does not exist.
    fn put_member(
        &self,
        room_id: &str,
        user_id: &str,
        role: MemberRole,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Removes a membership; false when there was none.
    fn remove_member(&self, room_id: &str, user_id: &str) -> StoreResult<bool>;
    /// The memberships of a room, by user id ascending (byte order).
    fn members(&self, room_id: &str) -> StoreResult<Vec<(String, MemberRole)>>;
    /// Every membership of every room (room_id, user_id, role), by room id then user id
    /// ascending, for loading the directory.
    fn all_members(&self) -> StoreResult<Vec<(String, String, MemberRole)>>;
}

/// Everything durable, as one object the server holds.
pub trait Store: Users + Sessions + Revocations + Idempotency + Rooms + Send + Sync {
    /// A cheap round trip proving the database answers (for `/readyz`).
    fn ping(&self) -> StoreResult<()>;
    /// The schema version after migrations.
    fn schema_version(&self) -> StoreResult<u32>;
    /// `"sqlite"` or `"postgres"`.
    fn kind(&self) -> &'static str;
    /// The fingerprint recorded for the key `name`, recording `fingerprint` first when there is
    /// none (the first node to start writes it; the answer is what the database holds).
    fn key_fingerprint(&self, name: &str, fingerprint: &str, now_ms: i64) -> StoreResult<String>;
    /// Replaces the fingerprint of the key `name` (the key was rotated).
    fn replace_key_fingerprint(
        &self,
        name: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// A setting changed at run time (its JSON text), if it was ever set.
    fn setting(&self, name: &str) -> StoreResult<Option<String>>;
    /// Sets a run-time setting.
    fn put_setting(&self, name: &str, value: &str, now_ms: i64) -> StoreResult<()>;
    /// The circuit breaker in front of the database, where there is one (PostgreSQL).
    fn breaker_state(&self) -> Option<BreakerState> {
        None
    }
}

/// Where the durable data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend<'a> {
    /// The embedded default: `ringhub.db` in this directory.
    Sqlite {
        /// `data_dir`.
        dir: &'a Path,
    },
    /// PostgreSQL.
    Postgres {
        /// `database_url`.
        url: &'a str,
        /// `database_read_url`, for reads that tolerate replica lag.
        read_url: Option<&'a str>,
        /// `database_pool`: connections opened (and pre-warmed) per pool.
        pool: usize,
        /// `breaker_failures`, `breaker_probe`.
        breaker: BreakerSettings,
        /// `database_ca_file`: the roots of `sslmode=verify-ca`/`verify-full`.
        ca_file: Option<&'a Path>,
    },
}

/// Opens the store and applies pending migrations.
pub fn open(backend: &Backend<'_>) -> StoreResult<Arc<dyn Store>> {
    match backend {
        Backend::Sqlite { dir } => Ok(Arc::new(sqlite::SqliteStore::open(dir)?)),
        Backend::Postgres {
            url,
            read_url,
            pool,
            breaker,
            ca_file,
        } => Ok(Arc::new(postgres::PgStore::open_with(
            url, *read_url, *pool, *breaker, *ca_file,
        )?)),
    }
}
