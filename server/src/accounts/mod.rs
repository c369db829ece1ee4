//! Accounts, sessions and tokens (SPEC §2, §3): the work behind the account routes. Every
//! function here blocks (bcrypt, storage) and runs on a blocking pool, never on a shard; the
//! route table (`routes`) parses and authenticates on the shard and hands the rest here.
//!
//! Failures the client sees are generic (`invalid_credentials`, `invalid_token`); the precise
//! reason goes to the log and the metrics. Passwords and tokens are never logged.

mod cache;
mod held;
pub mod validate;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use engine::shared_limits::{SharedAsk, Verdict};
use engine::{ClientInfo, HttpResponse, Identity, Revoked};
use protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use storage::{
    IdempotencyRecord, Revocation, RevocationKind, Rotation, SessionRecord, Store, StoreError,
    UserRecord,
};

use crate::announce::Announcement;
use crate::api_error::{Answer, ApiError};
use crate::clock::{ms, now_ms, rfc3339};
use crate::config::AccountSettings;
use crate::crypto::{self, Sealer};
use crate::limiter::{BucketTable, Lockouts};
use crate::observe::ServerMetrics;
use crate::revocation::RevocationList;
use crate::tokens::{TokenService, fingerprint};

/// Idempotency records live this long (SPEC §2).
const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// How long a request waits for a shared limit's answer (Redis) before the node's own counter
/// decides alone.
pub const SHARED_LIMIT_WAIT: std::time::Duration = std::time::Duration::from_millis(250);
/// Longest User-Agent kept with a session.
const MAX_USER_AGENT: usize = 256;

/// The account service.
pub struct Accounts {
    store: Arc<dyn Store>,
    tokens: Arc<TokenService>,
    sealer: Sealer,
    blind_key: Vec<u8>,
    revocations: Arc<RevocationList>,
    control: OnceLock<engine::Control>,
    config: AccountSettings,
    metrics: Arc<ServerMetrics>,
    /// Checked against when the e-mail is unknown, so that timing does not tell. Made on first
    /// need (or by [`Accounts::warm_up`] on a hashing thread), never on a shard.
    dummy_hash: OnceLock<String>,
    /// `login_per_ip`.
    pub login_per_ip: BucketTable,
    /// `register_per_ip`.
    pub register_per_ip: BucketTable,
    /// `refresh_per_session`.
    pub refresh_per_session: BucketTable,
    /// `failed_logins_per_account` and `lockout`.
    pub lockouts: Lockouts,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

/// The client of one request, as the accounts need it.
#[derive(Debug, Clone)]
pub struct Client {
    /// Address (after trusted proxies).
    pub ip: std::net::IpAddr,
    /// User-Agent.
    pub user_agent: String,
}

impl Client {
    fn info(&self) -> ClientInfo<'_> {
        ClientInfo {
            ip: self.ip,
            user_agent: Some(&self.user_agent),
        }
    }
}

/// A stored answer: what an idempotent replay or a refresh inside the reuse window returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredAnswer {
    status: u16,
    body: String,
    cookie: Option<String>,
}

impl StoredAnswer {
    /// A refusal kept as the answer to replay (an idempotent request that failed).
    fn refusal(error: ApiError) -> Self {
        let response = HttpResponse::from(error);
        Self {
            status: response.status,
            body: String::from_utf8_lossy(&response.body).into_owned(),
            cookie: None,
        }
    }

    fn response(&self) -> HttpResponse {
        let mut r = HttpResponse::json(self.status, self.body.clone().into_bytes());
        if let Some(cookie) = &self.cookie {
            r.headers.push(("Set-Cookie", cookie.clone()));
        }
        r
    }
}

#[derive(Serialize)]
struct UserJson<'a> {
    id: &'a str,
    username: &'a str,
    email: &'a str,
    created_at: String,
}

#[derive(Serialize)]
struct TokensJson<'a> {
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    token_type: &'static str,
    expires_in: u64,
    user: UserJson<'a>,
}

/// Runs a storage call, timing it into `ringhub_storage_seconds{op}`.
macro_rules! store {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let result = $call;
        $self.metrics.storage.observe($op, started.elapsed());
        match result {
            Ok(v) => v,
            Err(e) => return Err(ApiError::storage(&e)),
        }
    }};
}

/// The cost a bcrypt hash was made with (`$2b$12$…` → 12).
fn bcrypt_cost_of(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

/// The outcome of a password check against a stored hash. bcrypt reads only 72 bytes, so a
/// longer candidate never matches (registration refuses such passwords); it still costs the
/// same hashing time.
fn password_matches(password: &str, hash: &str) -> bool {
    let matches = bcrypt::verify(password, hash).unwrap_or(false);
    matches && password.len() <= 72
}

impl Accounts {
    /// The service over `store`, signing with `tokens`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        tokens: Arc<TokenService>,
        secrets: &crate::config::secrets::Secrets,
        revocations: Arc<RevocationList>,
        config: AccountSettings,
        metrics: Arc<ServerMetrics>,
    ) -> Self {
        Self {
            login_per_ip: BucketTable::new(config.login_per_ip),
            register_per_ip: BucketTable::new(config.register_per_ip),
            refresh_per_session: BucketTable::new(config.refresh_per_session),
            lockouts: Lockouts::new(config.failed_logins_per_account, config.lockout),
            store,
            tokens,
            sealer: Sealer::new(&secrets.encryption_key, &secrets.encryption_keys_old),
            blind_key: secrets.blind_index_key.clone(),
            revocations,
            control: OnceLock::new(),
            config,
            metrics,
            dummy_hash: OnceLock::new(),
        }
    }

    /// The hash an unknown e-mail's password is checked against.
    fn dummy_hash(&self) -> &str {
        self.dummy_hash.get_or_init(|| {
            let mut password = [0u8; 16];
            crypto::random_fill(&mut password);
            let password = data_encoding::HEXLOWER.encode(&password);
            bcrypt::hash(password, self.config.bcrypt_cost).unwrap_or_default()
        })
    }

    /// Prepares the costly parts ahead of the first login (call on a hashing thread).
    pub fn warm_up(&self) {
        let _ = self.dummy_hash();
    }

    /// Connects the running engine, so that revocations close live connections.
    pub fn attach(&self, control: engine::Control) {
        let _ = self.control.set(control);
    }

    /// Asks a limit every node shares (Redis), after this node's own counter allowed it;
    /// `Err(retry_after_secs)` when the service as a whole is past it. Without Redis, or when it
    /// does not answer within [`SHARED_LIMIT_WAIT`], the node's own counter has decided.
    pub fn shared_limit(&self, ask: Option<SharedAsk>) -> Result<(), u64> {
        let (Some(ask), Some(control)) = (ask, self.control.get()) else {
            return Ok(());
        };
        match control.shared_limit(ask, SHARED_LIMIT_WAIT) {
            Verdict::Limited { retry_after_ms } => Err(retry_after_ms.div_ceil(1000).max(1)),
            Verdict::Allowed | Verdict::Unknown => Ok(()),
        }
    }

    /// The shared lockout key of an e-mail's blind index.
    fn lockout_key(index: &[u8]) -> String {
        format!("lockout:{}", data_encoding::HEXLOWER.encode(index))
    }

    /// Records a revocation written to storage here: in memory, then told to the other nodes
    /// (`user` owns what it covers).
    fn revoked_here(&self, revocation: Revocation, user: &str) {
        self.revocations.insert(revocation.clone());
        Announcement::Revoked {
            revocation,
            user: user.to_owned(),
        }
        .tell(self.control.get());
    }

    /// A revocation another node made (and wrote to storage): refused here too, and the live
    /// connections it covers closed (4001 for a session, 4510 for an account).
    pub fn revoked_elsewhere(
        &self,
        revocation: Revocation,
        user: &str,
        session: Option<&str>,
        reach: Revoked,
    ) {
        self.revocations.insert(revocation);
        if let Some(control) = self.control.get() {
            control.close_revoked(user, session, reach);
        }
    }

    /// Reloads the durable revocations (announcements may have been missed) and closes the live
    /// connections they cover.
    pub fn reload_revocations(&self) {
        match self.load_revocations() {
            Ok(n) => {
                tracing::info!(revocations = n, "revocations reloaded");
                if let Some(control) = self.control.get() {
                    control.close_revoked_anywhere();
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload revocations"),
        }
    }

    /// [`Accounts::reload_revocations`] every half second while Redis is unreachable: logged
    /// only when it closes something new or fails.
    pub fn reload_revocations_quietly(&self) {
        let before = self.revocations.len();
        match self.load_revocations() {
            Ok(_) if self.revocations.len() == before => {}
            Ok(n) => {
                tracing::info!(
                    revocations = n,
                    "revocations read while redis is unreachable"
                );
                if let Some(control) = self.control.get() {
                    control.close_revoked_anywhere();
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read revocations"),
        }
    }

    /// Loads the durable revocations into memory (at start).
    pub fn load_revocations(&self) -> Result<usize, StoreError> {
        let live = self.store.live_revocations(now_ms())?;
        let n = live.len();
        for r in live {
            self.revocations.insert(r);
        }
        Ok(n)
    }

    /// The store (for `/readyz`).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The blind index of a normalized e-mail.
    pub fn email_index(&self, email: &str) -> Vec<u8> {
        crypto::blind_index(&self.blind_key, email)
    }

    fn user_json<'a>(&self, user: &'a UserRecord, email: &'a str) -> UserJson<'a> {
        UserJson {
            id: &user.id,
            username: &user.username,
            email,
            created_at: rfc3339(user.created_at_ms),
        }
    }

    fn email_of(&self, user: &UserRecord) -> String {
        self.sealer
            .open(&user.email_cipher, b"email")
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default()
    }

    // ---- idempotency -------------------------------------------------------------------

    /// A replay of `(scope, key)` if one is stored: the first answer, 422 for another body, or
    /// 409 for a login whose refresh token has been rotated since.
    pub fn replay(&self, scope: &str, key: &str, body: &[u8]) -> Option<Answer> {
        let since = now_ms() - IDEMPOTENCY_TTL_MS;
        let record = match self.store.idempotency(scope, key, since) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            // What follows needs the database too, except a login served from the cache: the
            // key cannot be honoured without the database (docs/api.md).
            Err(StoreError::Unavailable(_)) => return None,
            Err(e) => return Some(Err(ApiError::storage(&e))),
        };
        if !crypto::constant_time_eq(&record.body_hash, &crypto::sha256(body)) {
            return Some(Err(ApiError::new(
                422,
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with another request body",
            )));
        }
        if let Some(hash) = &record.token_hash {
            let live = self.store.refresh_token(hash).and_then(|t| match t {
                Some(t) if t.rotated_at_ms.is_none() => self
                    .store
                    .session(&t.session_id)
                    .map(|s| s.is_some_and(|s| s.revoked_at_ms.is_none())),
                _ => Ok(false),
            });
            match live {
                Ok(true) => {}
                Ok(false) => {
                    return Some(Err(ApiError::new(
                        409,
                        ErrorCode::Conflict,
                        "the session of this login has moved on; log in again",
                    )));
                }
                Err(e) => return Some(Err(ApiError::storage(&e))),
            }
        }
        let answer: StoredAnswer = self
            .sealer
            .open(&record.response_cipher, b"idempotency")
            .and_then(|plain| sonic_rs::from_slice(&plain).ok())?;
        Some(Ok(answer.response()))
    }

    /// Stores the answer to `(scope, key)`; a concurrent first request that stored before us
    /// wins, and its answer is returned instead.
    fn remember(
        &self,
        idempotency: Option<(&str, &str, &[u8])>,
        answer: &StoredAnswer,
        token_hash: Option<Vec<u8>>,
    ) -> Option<Answer> {
        let (scope, key, body) = idempotency?;
        let plain = sonic_rs::to_vec(answer).ok()?;
        let record = IdempotencyRecord {
            scope: scope.to_owned(),
            key: key.to_owned(),
            body_hash: crypto::sha256(body),
            status: answer.status,
            response_cipher: self.sealer.seal(&plain, b"idempotency"),
            token_hash,
            created_at_ms: now_ms(),
        };
        match self.store.put_idempotency(&record) {
            Ok(true) => None,
            Ok(false) => self.replay(scope, key, body),
            Err(e) => {
                tracing::warn!(error = %e, "idempotency record not stored");
                None
            }
        }
    }

    // ---- register ----------------------------------------------------------------------

    /// `POST /register`, after the shard validated the fields and the IP limit.
    pub fn register(
        &self,
        username: &str,
        email: &str,
        password: &str,
        idempotency: Option<(&str, &str, &[u8])>,
    ) -> Answer {
        let _ = self.store.prune_idempotency(now_ms() - IDEMPOTENCY_TTL_MS);
        if let Some((scope, key, body)) = idempotency
            && let Some(replayed) = self.replay(scope, key, body)
        {
            return replayed;
        }
        let hash = match bcrypt::hash(password, self.config.bcrypt_cost) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "bcrypt failed");
                return Err(ApiError::internal());
            }
        };
        let user = UserRecord {
            id: crypto::uuid_v4(),
            username: username.to_owned(),
            email_cipher: self.sealer.seal(email.as_bytes(), b"email"),
            email_index: self.email_index(email),
            password_hash: hash,
            role: storage::Role::User,
            created_at_ms: now_ms(),
        };
        let answer = match self.store.create_user(&user) {
            Ok(()) => {
                self.cache_user(&user, user.created_at_ms);
                #[derive(Serialize)]
                struct Created<'a> {
                    user: UserJson<'a>,
                }
                let body = sonic_rs::to_string(&Created {
                    user: self.user_json(&user, email),
                })
                .unwrap_or_default();
                tracing::info!(
                    user_id = %user.id,
                    email = %crate::logging::mask_email(email),
                    "registered"
                );
                StoredAnswer {
                    status: 201,
                    body,
                    cookie: None,
                }
            }
            Err(StoreError::Conflict("email")) => StoredAnswer::refusal(ApiError::new(
                409,
                ErrorCode::EmailTaken,
                "this e-mail is already registered",
            )),
            Err(StoreError::Conflict(_)) => StoredAnswer::refusal(ApiError::new(
                409,
                ErrorCode::UsernameTaken,
                "this username is taken",
            )),
            Err(e) => return Err(ApiError::storage(&e)),
        };
        self.remember(idempotency, &answer, None)
            .unwrap_or_else(|| Ok(answer.response()))
    }

    // ---- login -------------------------------------------------------------------------

    /// `POST /login`, after the shard validated the body and the IP limit.
    pub fn login(
        &self,
        email: &str,
        password: &str,
        client: &Client,
        idempotency: Option<(&str, &str, &[u8])>,
    ) -> Answer {
        let started = Instant::now();
        let response = self.login_inner(email, password, client, idempotency);
        self.metrics.login.observe("", started.elapsed());
        response
    }

    fn login_inner(
        &self,
        email: &str,
        password: &str,
        client: &Client,
        idempotency: Option<(&str, &str, &[u8])>,
    ) -> Answer {
        let _ = self.store.prune_idempotency(now_ms() - IDEMPOTENCY_TTL_MS);
        let index = self.email_index(email);
        if let Some((scope, key, body)) = idempotency
            && let Some(replayed) = self.replay(scope, key, body)
        {
            self.lockouts.release(&index);
            return replayed;
        }
        let now = now_ms();
        // Failures counted on every node (Redis) lock the account here too.
        if let Err(retry) = self.shared_limit(Some(SharedAsk::Locked {
            key: Self::lockout_key(&index),
        })) {
            self.lockouts.release(&index);
            self.metrics
                .engine
                .rate_limited("failed_logins_per_account");
            self.metrics.auth_failure("locked");
            return Err(ApiError::rate_limited(retry));
        }
        let read_at = now_ms();
        let (user, from_cache) = match self.store.user_by_email_index(&index) {
            Ok(user) => (user, false),
            Err(StoreError::Unavailable(why)) => {
                // The database cannot answer: the encrypted cache may (SPEC §10). A miss
                // answers 503 like the database would have, known account or not.
                if let Some(user) = self.cached_user(&index) {
                    tracing::info!(error = %why, "login served from the user cache");
                    (Some(user), true)
                } else {
                    self.lockouts.release(&index);
                    return Err(ApiError::storage(&StoreError::Unavailable(why)));
                }
            }
            Err(e) => {
                self.lockouts.release(&index);
                return Err(ApiError::storage(&e));
            }
        };
        // The same bcrypt work whether or not the account exists.
        let hash = user
            .as_ref()
            .map_or_else(|| self.dummy_hash(), |u| u.password_hash.as_str());
        let matches = password_matches(password, hash);
        let known = user.is_some();
        let Some(user) = user.filter(|_| matches) else {
            let reason = if known { "bad_password" } else { "no_account" };
            self.metrics.auth_failure(reason);
            let locked_here = self.lockouts.fail(&index, now);
            let limit = self.config.failed_logins_per_account;
            let locked = self
                .shared_limit((limit.count > 0).then(|| SharedAsk::Failed {
                    key: Self::lockout_key(&index),
                    window_ms: u64::try_from(ms(limit.per)).unwrap_or(u64::MAX),
                    limit: limit.count,
                    lockout_ms: u64::try_from(ms(self.config.lockout)).unwrap_or(u64::MAX),
                }))
                .is_err()
                || locked_here;
            // The e-mail (masked) only when it names an account: what was typed into the field
            // of an unknown one may be anything, a password included.
            let email = if known {
                crate::logging::mask_email(email)
            } else {
                "-".to_owned()
            };
            tracing::info!(reason, email = %email, locked, "login failed");
            let answer = StoredAnswer::refusal(ApiError::invalid_credentials());
            return self
                .remember(idempotency, &answer, None)
                .unwrap_or_else(|| Ok(answer.response()));
        };
        self.lockouts.succeed(&index);
        let _ = self.shared_limit(Some(SharedAsk::Succeeded {
            key: Self::lockout_key(&index),
        }));
        if !from_cache {
            self.rehash_if_cost_changed(&user, password);
            self.cache_user(&user, read_at);
        }
        let now = now_ms();
        let session = SessionRecord {
            id: crypto::random_token(16),
            user_id: user.id.clone(),
            created_at_ms: now,
            last_used_at_ms: now,
            expires_at_ms: now
                .saturating_add(ms(self.config.refresh_ttl))
                .min(now.saturating_add(ms(self.config.session_max_age))),
            ip: client.ip.to_string(),
            user_agent: client.user_agent.chars().take(MAX_USER_AGENT).collect(),
            revoked_at_ms: None,
        };
        let refresh = crypto::random_token(32);
        let refresh_hash = crypto::sha256(refresh.as_bytes());
        let started = Instant::now();
        let created = self.store.create_session(&session, &refresh_hash);
        self.metrics
            .storage
            .observe("create_session", started.elapsed());
        match created {
            Ok(()) => {}
            // Kept in Redis until the database is back (written back then).
            Err(StoreError::Unavailable(_))
                if self.hold_session(&session, &user, &refresh_hash) =>
            {
                tracing::info!(session_id = %session.id, "session held in redis");
            }
            Err(e) => return Err(ApiError::storage(&e)),
        }
        let answer =
            self.token_answer(&user, &session.id, &refresh, client, session.expires_at_ms)?;
        tracing::info!(user_id = %user.id, session_id = %session.id, "login");
        self.remember(idempotency, &answer, Some(refresh_hash))
            .unwrap_or_else(|| Ok(answer.response()))
    }

    /// After a successful login: a hash made with another `bcrypt_cost` than the configured one is
    /// replaced by one at the configured cost, so that every account costs a login the same time
    /// as an unknown e-mail does (otherwise the timing tells old accounts apart). The swap is
    /// conditional on the old hash, so it never undoes a concurrent password change.
    fn rehash_if_cost_changed(&self, user: &UserRecord, password: &str) {
        if bcrypt_cost_of(&user.password_hash) == Some(self.config.bcrypt_cost) {
            return;
        }
        let Ok(new_hash) = bcrypt::hash(password, self.config.bcrypt_cost) else {
            return;
        };
        match self
            .store
            .rehash_password(&user.id, &user.password_hash, &new_hash)
        {
            Ok(true) => tracing::info!(
                user_id = %user.id,
                cost = self.config.bcrypt_cost,
                "password re-hashed"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(user_id = %user.id, error = %e, "cannot re-hash password"),
        }
    }

    /// The login/refresh answer: a fresh access token for `session` bound to `client`.
    fn token_answer(
        &self,
        user: &UserRecord,
        session: &str,
        refresh: &str,
        client: &Client,
        refresh_expires_ms: i64,
    ) -> Result<StoredAnswer, ApiError> {
        let ttl = self.config.access_ttl.as_secs().max(1);
        let (access, _) = self
            .tokens
            .mint(
                &user.id,
                &user.username,
                session,
                ttl,
                fingerprint(self.config.token_binding, &client.info()),
            )
            .map_err(|e| {
                tracing::error!(error = %e, "token signing failed");
                ApiError::internal()
            })?;
        let email = self.email_of(user);
        let cookie = self.config.refresh_cookie.then(|| {
            let max_age = (refresh_expires_ms - now_ms()).max(0) / 1000;
            format!(
                "refresh_token={refresh}; HttpOnly; Secure; SameSite=Strict; Path=/refresh; Max-Age={max_age}"
            )
        });
        let body = sonic_rs::to_string(&TokensJson {
            access_token: &access,
            refresh_token: (!self.config.refresh_cookie).then_some(refresh),
            token_type: "Bearer",
            expires_in: ttl,
            user: self.user_json(user, &email),
        })
        .unwrap_or_default();
        Ok(StoredAnswer {
            status: 200,
            body,
            cookie,
        })
    }

    // ---- refresh -----------------------------------------------------------------------

    /// `POST /refresh`.
    pub fn refresh(&self, refresh: &str, client: &Client) -> Answer {
        let hash = crypto::sha256(refresh.as_bytes());
        let started = Instant::now();
        let found = self.store.refresh_token(&hash);
        self.metrics
            .storage
            .observe("refresh_token", started.elapsed());
        let record = match found {
            Ok(Some(record)) => record,
            Ok(None) | Err(StoreError::Unavailable(_))
                if let Some((session, user)) = self.held_session(&hash) =>
            {
                return self.refresh_held(&session, &user, &hash, client);
            }
            Ok(None) => {
                self.metrics.auth_failure("unknown_refresh");
                return Err(ApiError::invalid_token());
            }
            Err(e) => return Err(ApiError::storage(&e)),
        };
        let now = now_ms();
        self.take_refresh(&record.session_id, now)?;
        let Some(session) = store!(self, "session", self.store.session(&record.session_id)) else {
            return Err(ApiError::invalid_token());
        };
        if session.revoked_at_ms.is_some() || session.expires_at_ms <= now {
            self.metrics.auth_failure("session_ended");
            return Err(ApiError::invalid_token());
        }
        if let Some(rotated_at) = record.rotated_at_ms {
            return self.reused(&record, &session, rotated_at, now);
        }
        let Some(user) = store!(self, "user_by_id", self.store.user_by_id(&session.user_id)) else {
            return Err(ApiError::invalid_token());
        };
        let next = crypto::random_token(32);
        let next_hash = crypto::sha256(next.as_bytes());
        let expires = now.saturating_add(ms(self.config.refresh_ttl)).min(
            session
                .created_at_ms
                .saturating_add(ms(self.config.session_max_age)),
        );
        let answer = self.token_answer(&user, &session.id, &next, client, expires)?;
        let Ok(plain) = sonic_rs::to_vec(&answer) else {
            return Err(ApiError::internal());
        };
        let child = self.sealer.seal(&plain, b"refresh-child");
        let user_agent: String = client.user_agent.chars().take(MAX_USER_AGENT).collect();
        let ip = client.ip.to_string();
        let rotated = store!(
            self,
            "rotate",
            self.store.rotate(&Rotation {
                old_hash: &hash,
                new_hash: &next_hash,
                session_id: &session.id,
                now_ms: now,
                expires_at_ms: expires,
                ip: &ip,
                user_agent: &user_agent,
                child_cipher: &child,
            })
        );
        if !rotated {
            // A concurrent refresh with the same token won: answer as a reuse (inside the
            // window that returns the winner's pair).
            return match store!(self, "refresh_token", self.store.refresh_token(&hash)) {
                Some(r) if r.rotated_at_ms.is_some() => {
                    let at = r.rotated_at_ms.unwrap_or(now);
                    self.reused(&r, &session, at, now)
                }
                _ => Err(ApiError::invalid_token()),
            };
        }
        Ok(answer.response())
    }

    /// One refresh of `session` against `refresh_per_session`: this node's bucket, then the
    /// one every node shares.
    fn take_refresh(&self, session: &str, now: i64) -> Result<(), ApiError> {
        let key = session.as_bytes();
        self.refresh_per_session
            .take(key, now)
            .and_then(|()| {
                self.shared_limit(
                    self.refresh_per_session
                        .shared_ask("refresh_per_session", key),
                )
            })
            .map_err(|retry| {
                self.metrics.engine.rate_limited("refresh_per_session");
                ApiError::rate_limited(retry)
            })
    }

    /// `POST /refresh` for a session held in Redis (created while the database could not
    /// answer): rotated there.
    fn refresh_held(
        &self,
        session: &SessionRecord,
        user: &UserRecord,
        hash: &[u8],
        client: &Client,
    ) -> Answer {
        let now = now_ms();
        self.take_refresh(&session.id, now)?;
        let created = u64::try_from(session.created_at_ms).unwrap_or(0);
        if session.expires_at_ms <= now
            || self
                .revocations
                .check(&session.user_id, &session.id, created)
                .is_some()
        {
            self.metrics.auth_failure("session_ended");
            return Err(ApiError::invalid_token());
        }
        let next = crypto::random_token(32);
        let next_hash = crypto::sha256(next.as_bytes());
        let expires = now.saturating_add(ms(self.config.refresh_ttl)).min(
            session
                .created_at_ms
                .saturating_add(ms(self.config.session_max_age)),
        );
        let answer = self.token_answer(user, &session.id, &next, client, expires)?;
        let rotated = SessionRecord {
            last_used_at_ms: now,
            expires_at_ms: expires,
            ip: client.ip.to_string(),
            user_agent: client.user_agent.chars().take(MAX_USER_AGENT).collect(),
            ..session.clone()
        };
        if !self.rotate_held(&rotated, user, hash, &next_hash) {
            // Rotated meanwhile (a reuse, or a concurrent refresh), or Redis did not answer.
            self.metrics.auth_failure("refresh_reused");
            return Err(ApiError::invalid_token());
        }
        Ok(answer.response())
    }

    /// A rotated refresh token presented again: within `refresh_reuse_interval` the same new
    /// pair; after it, theft — the whole session is revoked.
    fn reused(
        &self,
        record: &storage::RefreshRecord,
        session: &SessionRecord,
        rotated_at: i64,
        now: i64,
    ) -> Answer {
        if now.saturating_sub(rotated_at) <= ms(self.config.refresh_reuse_interval)
            && let Some(answer) = record
                .child_cipher
                .as_deref()
                .and_then(|c| self.sealer.open(c, b"refresh-child"))
                .and_then(|plain| sonic_rs::from_slice::<StoredAnswer>(&plain).ok())
        {
            return Ok(answer.response());
        }
        self.metrics.auth_failure("refresh_reused");
        tracing::warn!(
            user_id = %session.user_id,
            session_id = %session.id,
            "refresh token reused: the session is revoked"
        );
        if let Err(e) =
            self.revoke_sessions(&session.user_id, std::slice::from_ref(&session.id), now)
        {
            return Err(ApiError::storage(&e));
        }
        Err(ApiError::new(
            401,
            ErrorCode::TokenReused,
            "this refresh token was already used; the session is revoked",
        ))
    }

    /// The password check of `DELETE /me` and `POST /password`: 403 when wrong, and counted
    /// against the same failure limit as logins (a stolen access token must not become a
    /// password oracle).
    fn check_password(&self, user: &UserRecord, password: &str) -> Result<(), ApiError> {
        let key = format!("user:{}", user.id).into_bytes();
        let now = now_ms();
        if let Err(retry) = self.lockouts.reserve(&key, now) {
            self.metrics.auth_failure("locked");
            return Err(ApiError::rate_limited(retry));
        }
        if password_matches(password, &user.password_hash) {
            self.lockouts.succeed(&key);
            Ok(())
        } else {
            self.metrics.auth_failure("bad_password");
            self.lockouts.fail(&key, now);
            Err(ApiError::new(403, ErrorCode::Forbidden, "wrong password"))
        }
    }

    // ---- revocation --------------------------------------------------------------------

    /// Revokes `sessions` of `user` (durably, in memory, and on live connections, 4001). The
    /// revocation is written before the session is ended: the writes are not one transaction, so
    /// a failure between them leaves the session's access tokens refused (fail closed) with its
    /// refresh token still live until the client's retry ends it.
    fn revoke_sessions(&self, user: &str, sessions: &[String], now: i64) -> Result<(), StoreError> {
        for sid in sessions {
            let revocation = Revocation {
                kind: RevocationKind::Session,
                subject: sid.clone(),
                revoked_at_ms: now,
                keep_until_ms: now.saturating_add(ms(self.config.access_ttl)),
            };
            self.store.add_revocation(&revocation)?;
            self.revoked_here(revocation, user);
            self.store.revoke_session(sid, now)?;
        }
        if let Some(control) = self.control.get() {
            for sid in sessions {
                control.close_revoked(user, Some(sid), Revoked::Session);
            }
        }
        Ok(())
    }

    /// `POST /logout`: this session.
    pub fn logout(&self, identity: &Identity) -> Answer {
        if !identity.session_id.is_empty() {
            let sid = identity.session_id.to_string();
            if let Err(e) = self.revoke_sessions(&identity.user_id, &[sid], now_ms()) {
                return Err(ApiError::storage(&e));
            }
        }
        tracing::info!(
            user_id = %identity.user_id,
            session_id = %identity.session_id,
            "logout"
        );
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `POST /logout/all`: every session; live connections close with 4510. The account-wide
    /// revocation is written first (it refuses every access token issued until now), so a
    /// failure in a later write leaves none of them working; the client's retry ends the
    /// sessions.
    pub fn logout_all(&self, identity: &Identity) -> Answer {
        let now = now_ms();
        // Tokens without a session (`ringhub token`) issued until now, for as long as any could
        // still be valid.
        let everything = Revocation {
            kind: RevocationKind::User,
            subject: identity.user_id.to_string(),
            revoked_at_ms: now,
            keep_until_ms: now.saturating_add(365 * 24 * 3600 * 1000),
        };
        store!(
            self,
            "add_revocation",
            self.store.add_revocation(&everything)
        );
        self.revoked_here(everything, &identity.user_id);
        let revoked = store!(
            self,
            "revoke_user_sessions",
            self.store
                .revoke_user_sessions(&identity.user_id, None, now)
        );
        for sid in &revoked {
            let revocation = Revocation {
                kind: RevocationKind::Session,
                subject: sid.clone(),
                revoked_at_ms: now,
                keep_until_ms: now.saturating_add(ms(self.config.access_ttl)),
            };
            store!(
                self,
                "add_revocation",
                self.store.add_revocation(&revocation)
            );
            self.revoked_here(revocation, &identity.user_id);
        }
        if let Some(control) = self.control.get() {
            control.close_revoked(&identity.user_id, None, Revoked::Account);
        }
        tracing::info!(
            user_id = %identity.user_id,
            sessions = revoked.len(),
            "logout_all"
        );
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `GET /me`.
    pub fn me(&self, identity: &Identity) -> Answer {
        let Some(user) = store!(self, "user_by_id", self.store.user_by_id(&identity.user_id))
        else {
            return Err(ApiError::invalid_token());
        };
        #[derive(Serialize)]
        struct Me<'a> {
            user: UserJson<'a>,
        }
        let email = self.email_of(&user);
        Ok(HttpResponse::json(
            200,
            sonic_rs::to_vec(&Me {
                user: self.user_json(&user, &email),
            })
            .unwrap_or_default(),
        ))
    }

    /// `DELETE /me`: soft delete after the password check; everything revoked, 4510.
    pub fn delete_me(&self, identity: &Identity, password: &str) -> Answer {
        let Some(user) = store!(self, "user_by_id", self.store.user_by_id(&identity.user_id))
        else {
            return Err(ApiError::invalid_token());
        };
        self.check_password(&user, password)?;
        let now = now_ms();
        // The revocation first: if a later step fails, no token of the account works anyway.
        // It covers every token of this account, whenever issued, for ever.
        let revocation = Revocation {
            kind: RevocationKind::User,
            subject: user.id.clone(),
            revoked_at_ms: i64::MAX,
            keep_until_ms: i64::MAX,
        };
        store!(
            self,
            "add_revocation",
            self.store.add_revocation(&revocation)
        );
        self.revoked_here(revocation, &user.id);
        // Best effort: the revocation above already makes every node ignore the entry.
        let _ = self.drop_cached_user(&user.email_index, now);
        store!(
            self,
            "soft_delete_user",
            self.store.soft_delete_user(&user.id, now)
        );
        store!(
            self,
            "revoke_user_sessions",
            self.store.revoke_user_sessions(&user.id, None, now)
        );
        if let Some(control) = self.control.get() {
            control.close_revoked(&user.id, None, Revoked::Account);
        }
        tracing::info!(user_id = %user.id, "account deleted");
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `GET /sessions`.
    pub fn sessions(&self, identity: &Identity) -> Answer {
        let list = store!(
            self,
            "live_sessions",
            self.store.live_sessions(&identity.user_id, now_ms())
        );
        #[derive(Serialize)]
        struct SessionJson<'a> {
            id: &'a str,
            created_at: String,
            last_used_at: String,
            ip: &'a str,
            user_agent: &'a str,
            current: bool,
        }
        #[derive(Serialize)]
        struct Sessions<'a> {
            sessions: Vec<SessionJson<'a>>,
        }
        let sessions = list
            .iter()
            .map(|s| SessionJson {
                id: &s.id,
                created_at: rfc3339(s.created_at_ms),
                last_used_at: rfc3339(s.last_used_at_ms),
                ip: &s.ip,
                user_agent: &s.user_agent,
                current: *s.id == *identity.session_id,
            })
            .collect();
        Ok(HttpResponse::json(
            200,
            sonic_rs::to_vec(&Sessions { sessions }).unwrap_or_default(),
        ))
    }

    /// `DELETE /sessions/{id}`: 404 unless it is a live session of the caller.
    pub fn delete_session(&self, identity: &Identity, id: &str) -> Answer {
        let session = store!(self, "session", self.store.session(id));
        let Some(session) = session.filter(|s| {
            s.user_id == *identity.user_id
                && s.revoked_at_ms.is_none()
                && s.expires_at_ms > now_ms()
        }) else {
            return Err(ApiError::not_found("no such session"));
        };
        if let Err(e) = self.revoke_sessions(
            &session.user_id,
            std::slice::from_ref(&session.id),
            now_ms(),
        ) {
            return Err(ApiError::storage(&e));
        }
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `POST /password`: every other session is revoked.
    pub fn change_password(
        &self,
        identity: &Identity,
        current: &str,
        new_password: &str,
    ) -> Answer {
        let Some(user) = store!(self, "user_by_id", self.store.user_by_id(&identity.user_id))
        else {
            return Err(ApiError::invalid_token());
        };
        self.check_password(&user, current)?;
        // The cached account goes first, and must: an old hash left in the cache would let
        // the old password in during a later database outage.
        if !self.drop_cached_user(&user.email_index, now_ms()) {
            return Err(cache_unreachable());
        }
        let hash = match bcrypt::hash(new_password, self.config.bcrypt_cost) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "bcrypt failed");
                return Err(ApiError::internal());
            }
        };
        store!(
            self,
            "set_password",
            self.store.set_password(&user.id, &hash)
        );
        // Again after the write: a login that read the old hash before it cannot cache it now
        // (the tombstone is dated after its read).
        let _ = self.drop_cached_user(&user.email_index, now_ms());
        let now = now_ms();
        let keep = (!identity.session_id.is_empty()).then_some(&*identity.session_id);
        let others = store!(
            self,
            "revoke_user_sessions",
            self.store.revoke_user_sessions(&user.id, keep, now)
        );
        if let Err(e) = self.revoke_sessions(&user.id, &others, now) {
            return Err(ApiError::storage(&e));
        }
        tracing::info!(
            user_id = %user.id,
            revoked = others.len(),
            "password changed"
        );
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// Erases the encrypted child pairs whose `refresh_reuse_interval` has passed: past it a
    /// reuse is theft, so the pair is never needed again, and at rest only hashes remain (SPEC
    /// §3). Called every 2 s by the upkeep thread.
    pub fn erase_refresh_children(&self) {
        let before = now_ms().saturating_sub(ms(self.config.refresh_reuse_interval));
        if let Err(e) = self.store.clear_refresh_children(before) {
            tracing::warn!(error = %e, "cannot erase expired refresh pairs");
        }
    }

    /// Drops in-memory revocations that can no longer matter.
    pub fn prune(&self) {
        let now = now_ms();
        self.revocations.prune(now);
        let _ = self.store.prune_revocations(now);
        // Sessions ended (expired or revoked) a day ago answer `invalid_token` either way.
        let _ = self.store.prune_sessions(now - 24 * 3600 * 1000);
    }
}

/// 503 for a change that needs the user cache in Redis dropped first, when Redis cannot confirm.
fn cache_unreachable() -> ApiError {
    ApiError::new(
        503,
        ErrorCode::Unavailable,
        "redis is unreachable; retry later",
    )
    .retry_after(1)
}

/// Looks up a live user by id or e-mail (for `ringhub token` and `user set-role`).
pub fn find_user(
    store: &dyn Store,
    blind_key: &[u8],
    id_or_email: &str,
) -> Result<Option<UserRecord>, StoreError> {
    if id_or_email.contains('@') {
        let Ok(email) = validate::email(id_or_email) else {
            return Ok(None);
        };
        store.user_by_email_index(&crypto::blind_index(blind_key, &email))
    } else {
        store.user_by_id(id_or_email)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cost_of_a_bcrypt_hash() {
        assert_eq!(
            bcrypt_cost_of("$2b$12$abcdefghijklmnopqrstuuABCDEFGHIJKLMNOPQRSTUVWXYZ01234"),
            Some(12)
        );
        assert_eq!(bcrypt_cost_of("$2y$04$x"), Some(4));
        assert_eq!(bcrypt_cost_of("not a hash"), None);
        assert_eq!(bcrypt_cost_of(""), None);
    }
}
