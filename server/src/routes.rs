//! The HTTP routes the engine hands to the server (SPEC §2, §11). On the shard this module only
//! routes, checks the request's shape (method, `Content-Type`, JSON, field types, bounds), CORS,
//! the bearer token and the cheap per-IP limits; everything that touches storage or bcrypt is
//! handed to a blocking pool and answered later. It never blocks a shard.

use std::sync::Arc;

use engine::{
    Authenticator, ClientInfo, HttpRequest, HttpResponse, HttpRoutes, Identity, Routed,
    pending_response,
};
use protocol::ErrorCode;
use protocol::http::percent_decode_path;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

use crate::accounts::{self, Accounts, Client};
use crate::api_error::{Answer, ApiError, respond};
use crate::clock::now_ms;
use crate::limiter::{BucketTable, ip_key};
use crate::observe::ServerMetrics;
use crate::pool::Pool;
use crate::rooms::{NewRoom, RoomService};
use crate::tokens::JwtAuthenticator;

/// Longest accepted `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY: usize = 128;

/// Deepest nesting of an HTTP JSON body, checked before parsing: the parser recurses, and a
/// 64 KiB body of `[` must not reach it.
const MAX_BODY_DEPTH: usize = 64;

/// The deepest `[`/`{` nesting of `json`, outside strings; stops counting past the bound.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
                if deepest > MAX_BODY_DEPTH {
                    return deepest;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The route table.
pub struct Routes {
    metrics: Arc<ServerMetrics>,
    accounts: Arc<Accounts>,
    rooms: Arc<RoomService>,
    auth: Arc<JwtAuthenticator>,
    storage_pool: Arc<Pool>,
    hash_pool: Arc<Pool>,
    /// `allowed_origins` in force (CORS; the engine checks upgrades).
    cors: Arc<crate::origins::Origins>,
    /// This process's name, answered by `/healthz`.
    node_id: Arc<str>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes").finish_non_exhaustive()
    }
}

/// A parsed JSON object body.
struct Body(Value);

impl Body {
    /// A string field; `Err` names it when missing or not a string.
    fn string(&self, field: &'static str) -> Result<&str, ApiError> {
        match self.0.get(field) {
            Some(v) => v
                .as_str()
                .ok_or_else(|| ApiError::invalid_input(field, "must be a string")),
            None => Err(ApiError::invalid_input(field, "is required")),
        }
    }

    /// A list of strings (at most 1,000); `Err` names the field when missing or malformed.
    fn string_list(&self, field: &'static str) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::invalid_input(field, "must be a list of strings");
        let list = self
            .0
            .get(field)
            .ok_or_else(|| ApiError::invalid_input(field, "is required"))?
            .as_array()
            .ok_or_else(bad)?;
        if list.len() > 1000 {
            return Err(bad());
        }
        list.iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect()
    }

    fn optional_bool(&self, field: &'static str) -> Result<Option<bool>, ApiError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ApiError::invalid_input(field, "must be true or false")),
        }
    }

    /// A positive count up to ten million.
    fn optional_count(&self, field: &'static str) -> Result<Option<u32>, ApiError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|n| (1..=10_000_000).contains(n))
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid_input(field, "must be an integer from 1 to 10000000")
                }),
        }
    }

    fn optional_string(&self, field: &'static str) -> Result<Option<&str>, ApiError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(v) if v.is_null() => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| ApiError::invalid_input(field, "must be a string")),
        }
    }
}

impl Routes {
    /// The route table over the accounts service and the pools.
    pub fn new(
        metrics: Arc<ServerMetrics>,
        accounts: Arc<Accounts>,
        rooms: Arc<RoomService>,
        auth: Arc<JwtAuthenticator>,
        storage_pool: Arc<Pool>,
        hash_pool: Arc<Pool>,
        cors: Arc<crate::origins::Origins>,
    ) -> Self {
        Self {
            metrics,
            accounts,
            rooms,
            auth,
            storage_pool,
            hash_pool,
            cors,
            node_id: Arc::from(""),
        }
    }

    /// Names this process in `/healthz` (SPEC §10 `node_id`).
    #[must_use]
    pub fn with_node_id(mut self, node_id: &str) -> Self {
        self.node_id = Arc::from(node_id);
        self
    }

    /// Runs `job` on `pool` (its log lines carry the request id); 503 when the queue is full.
    fn defer(
        pool: &Pool,
        request: &HttpRequest<'_>,
        job: impl FnOnce() -> Answer + Send + 'static,
    ) -> Routed {
        let (sender, pending) = pending_response();
        let request_id = request.request_id.to_owned();
        let run = move || respond(crate::logging::with_request_id(&request_id, job));
        match pool.submit(move || sender.send(run())) {
            Ok(()) => Routed::Later(pending),
            Err(_) => Routed::Now(ApiError::busy().into()),
        }
    }

    /// The JSON object body, or the 415/400 answer.
    fn json_body(request: &HttpRequest<'_>) -> Result<Body, ApiError> {
        let content_type = request
            .head
            .header_str("content-type")
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if content_type != "application/json" {
            return Err(ApiError::new(
                415,
                ErrorCode::Unsupported,
                "the body must be Content-Type: application/json",
            ));
        }
        if nesting_depth(request.body) > MAX_BODY_DEPTH {
            return Err(ApiError::new(
                400,
                ErrorCode::BadRequest,
                "the body nests too deeply",
            ));
        }
        let value: Value = sonic_rs::from_slice(request.body)
            .map_err(|_| ApiError::new(400, ErrorCode::BadRequest, "the body is not valid JSON"))?;
        if !value.is_object() {
            return Err(ApiError::new(
                400,
                ErrorCode::BadRequest,
                "the body must be a JSON object",
            ));
        }
        Ok(Body(value))
    }

    /// A JSON body when one was sent; `None` for an empty body.
    fn optional_json_body(request: &HttpRequest<'_>) -> Result<Option<Body>, ApiError> {
        if request.body.is_empty() {
            Ok(None)
        } else {
            Self::json_body(request).map(Some)
        }
    }

    fn client(request: &HttpRequest<'_>) -> Client {
        Client {
            ip: request.client_ip,
            user_agent: request
                .head
                .header_str("user-agent")
                .unwrap_or("")
                .to_owned(),
        }
    }

    /// The verified identity of the bearer token, or 401.
    fn authenticate(&self, request: &HttpRequest<'_>) -> Result<Identity, ApiError> {
        let token = request.head.header_str("authorization").and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        let client = ClientInfo {
            ip: request.client_ip,
            user_agent: request.head.header_str("user-agent"),
        };
        let started = std::time::Instant::now();
        let verified = match token {
            Some(t) => self.auth.verify_access(t, &client),
            None => Err(engine::AuthFailure::Missing),
        };
        self.metrics.token_validation.observe("", started.elapsed());
        verified.map_err(|reason| {
            self.metrics.engine.auth_failure(reason);
            tracing::info!(
                request_id = %request.request_id,
                reason = reason.label(),
                "auth failed"
            );
            ApiError::invalid_token().challenge()
        })
    }

    /// The `Idempotency-Key`, validated.
    fn idempotency_key(request: &HttpRequest<'_>) -> Result<Option<String>, ApiError> {
        let Some(raw) = request.head.header("idempotency-key") else {
            return Ok(None);
        };
        if raw.is_empty()
            || raw.len() > MAX_IDEMPOTENCY_KEY
            || !raw.iter().all(|b| b.is_ascii_graphic())
        {
            return Err(ApiError::invalid_input(
                "Idempotency-Key",
                "must be 1 to 128 visible ASCII characters",
            ));
        }
        Ok(Some(String::from_utf8_lossy(raw).into_owned()))
    }

    /// Takes one token of a per-IP limit (`limit` names it in the metrics), or 429.
    fn per_ip(
        &self,
        table: &BucketTable,
        limit: &'static str,
        request: &HttpRequest<'_>,
    ) -> Result<(), ApiError> {
        let key = ip_key(request.client_ip);
        table.take(&key, now_ms()).map_err(|retry| {
            self.metrics.engine.rate_limited(limit);
            ApiError::rate_limited(retry)
        })
    }

    fn register(&self, request: &HttpRequest<'_>) -> Result<Routed, ApiError> {
        let body = Self::json_body(request)?;
        let username = accounts::validate::username(body.string("username")?)
            .map_err(|e| ApiError::invalid_input(e.field, e.message))?
            .to_owned();
        let email = accounts::validate::email(body.string("email")?)
            .map_err(|e| ApiError::invalid_input(e.field, e.message))?;
        let password = body.string("password")?.to_owned();
        accounts::validate::password("password", &password)
            .map_err(|e| ApiError::invalid_input(e.field, e.message))?;
        let key = Self::idempotency_key(request)?;
        self.per_ip(&self.accounts.register_per_ip, "register_per_ip", request)?;
        let accounts = self.accounts.clone();
        let raw_body = request.body.to_vec();
        let shared = self
            .accounts
            .register_per_ip
            .shared_ask("register_per_ip", &ip_key(request.client_ip));
        let metrics = self.metrics.clone();
        Ok(Self::defer(&self.hash_pool, request, move || {
            // The service-wide count (several nodes), once this node's allowed it.
            accounts.shared_limit(shared).map_err(|retry| {
                metrics.engine.rate_limited("register_per_ip");
                ApiError::rate_limited(retry)
            })?;
            let idempotency = key.as_deref().map(|k| ("register", k, raw_body.as_slice()));
            accounts.register(&username, &email, &password, idempotency)
        }))
    }

    fn login(&self, request: &HttpRequest<'_>) -> Result<Routed, ApiError> {
        let body = Self::json_body(request)?;
        let email_raw = body.string("email")?;
        let password = body.string("password")?.to_owned();
        let key = Self::idempotency_key(request)?;
        self.per_ip(&self.accounts.login_per_ip, "login_per_ip", request)?;
        // A malformed e-mail or an impossible password cannot match an account; answer as for
        // a wrong password (generic, and after the same bcrypt work, below).
        let email = accounts::validate::email(email_raw)
            .unwrap_or_else(|_| email_raw.trim().to_lowercase());
        let index = self.accounts.email_index(&email);
        if let Err(retry) = self.accounts.lockouts.reserve(&index, now_ms()) {
            self.metrics
                .engine
                .rate_limited("failed_logins_per_account");
            self.metrics.auth_failure("locked");
            return Err(ApiError::rate_limited(retry));
        }
        let client = Self::client(request);
        let accounts = self.accounts.clone();
        let raw_body = request.body.to_vec();
        let shared = self
            .accounts
            .login_per_ip
            .shared_ask("login_per_ip", &ip_key(request.client_ip));
        let metrics = self.metrics.clone();
        let locked_index = index.clone();
        let routed = Self::defer(&self.hash_pool, request, move || {
            // The service-wide count (several nodes), once this node's allowed it.
            if let Err(retry) = accounts.shared_limit(shared) {
                accounts.lockouts.release(&locked_index);
                metrics.engine.rate_limited("login_per_ip");
                return Err(ApiError::rate_limited(retry));
            }
            let idempotency = key.as_deref().map(|k| ("login", k, raw_body.as_slice()));
            accounts.login(&email, &password, &client, idempotency)
        });
        if matches!(routed, Routed::Now(_)) {
            // Not queued (busy): the attempt was never made.
            self.accounts.lockouts.release(&index);
        }
        Ok(routed)
    }

    fn refresh(&self, request: &HttpRequest<'_>) -> Result<Routed, ApiError> {
        let body = Self::optional_json_body(request)?;
        let from_body = match &body {
            Some(b) => b.optional_string("refresh_token")?.map(str::to_owned),
            None => None,
        };
        let token = from_body.or_else(|| cookie(request, "refresh_token"));
        let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= 256) else {
            return Err(ApiError::new(
                401,
                ErrorCode::InvalidToken,
                "invalid or expired token",
            ));
        };
        let client = Self::client(request);
        let accounts = self.accounts.clone();
        Ok(Self::defer(&self.storage_pool, request, move || {
            accounts.refresh(&token, &client)
        }))
    }

    /// Runs an account job for the already authenticated `identity`.
    fn authenticated(
        &self,
        request: &HttpRequest<'_>,
        identity: Identity,
        job: impl FnOnce(&Accounts, &Identity) -> Answer + Send + 'static,
        hashing: bool,
    ) -> Result<Routed, ApiError> {
        let accounts = self.accounts.clone();
        let pool = if hashing {
            &self.hash_pool
        } else {
            &self.storage_pool
        };
        Ok(Self::defer(pool, request, move || {
            job(&accounts, &identity)
        }))
    }

    /// A rooms route with the caller's identity, run on the storage pool.
    fn room_job(
        &self,
        request: &HttpRequest<'_>,
        identity: Identity,
        job: impl FnOnce(&RoomService, &Identity) -> Answer + Send + 'static,
    ) -> Result<Routed, ApiError> {
        let rooms = self.rooms.clone();
        Ok(Self::defer(&self.storage_pool, request, move || {
            job(&rooms, &identity)
        }))
    }

    fn create_room(&self, request: &HttpRequest<'_>) -> Result<Routed, ApiError> {
        let who = self.authenticate(request)?;
        let body = Self::json_body(request)?;
        let id = body.string("id")?;
        let id = protocol::envelope::RoomId::parse(id)
            .ok()
            .filter(|r| !r.is_personal())
            .ok_or_else(|| {
                ApiError::invalid_input(
                    "id",
                    "must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$ and not start with user:",
                )
            })?;
        let permission =
            storage::Permission::parse(body.string("permission")?).ok_or_else(|| {
                ApiError::invalid_input(
                    "permission",
                    "must be public, restricted, private or owner_only",
                )
            })?;
        let new = NewRoom {
            id,
            permission,
            max_members: body.optional_count("max_members")?,
            presence: body.optional_bool("presence")?.unwrap_or(true),
            history: body.optional_bool("history")?.unwrap_or(true),
        };
        self.room_job(request, who, move |rooms, who| rooms.create(who, &new))
    }

    fn room_routes(&self, request: &HttpRequest<'_>, rest: &str) -> Result<Routed, ApiError> {
        let caller = self.authenticate(request)?;
        let method = request.head.method.as_str();
        let mut parts = rest.split('/');
        let raw_id = parts.next().unwrap_or("");
        let room = percent_decode_path(raw_id)
            .and_then(|id| protocol::envelope::RoomId::parse(&id).ok())
            .ok_or_else(|| ApiError::not_found("no such room"))?;
        let tail: Vec<&str> = parts.collect();
        match (method, tail.as_slice()) {
            ("GET", []) => self.room_job(request, caller, move |r, who| r.get(who, &room)),
            ("PATCH", []) => {
                let body = Self::json_body(request)?;
                let permission = match body.optional_string("permission")? {
                    Some(p) => Some(storage::Permission::parse(p).ok_or_else(|| {
                        ApiError::invalid_input(
                            "permission",
                            "must be public, restricted, private or owner_only",
                        )
                    })?),
                    None => None,
                };
                let update = storage::RoomUpdate {
                    permission,
                    max_members: body.optional_count("max_members")?,
                };
                self.room_job(request, caller, move |r, who| r.update(who, &room, &update))
            }
            ("DELETE", []) => self.room_job(request, caller, move |r, who| r.delete(who, &room)),
            ("GET", ["presence"]) => {
                self.room_job(request, caller, move |r, who| r.presence(who, &room))
            }
            ("POST", ["messages"]) => {
                let body = Self::json_body(request)?;
                let data = body
                    .0
                    .get("data")
                    .ok_or_else(|| ApiError::invalid_input("data", "is required"))?;
                let raw = sonic_rs::to_vec(data).unwrap_or_default();
                // A custom event (SPEC §8), as on a WebSocket's `publish`.
                let event = match body.0.get("event") {
                    None => None,
                    Some(v) if v.is_null() => None,
                    Some(v) => {
                        let name = v
                            .as_str()
                            .ok_or_else(|| ApiError::invalid_input("event", "must be a string"))?;
                        Some(
                            protocol::envelope::EventName::parse(name)
                                .map_err(|why| ApiError::invalid_input("event", why))?,
                        )
                    }
                };
                if let Err(refused) = self.rooms.take_publish(&caller) {
                    self.metrics.engine.rate_limited("publish_per_user");
                    return Err(refused);
                }
                self.room_job(request, caller, move |r, who| {
                    r.publish(who, &room, &raw, event)
                })
            }
            ("PUT", ["members", user]) => {
                let user = path_segment(user, "no such user")?;
                let body = Self::json_body(request)?;
                let role = storage::MemberRole::parse(body.string("role")?).ok_or_else(|| {
                    ApiError::invalid_input("role", "must be member or moderator")
                })?;
                self.room_job(request, caller, move |r, who| {
                    r.put_member(who, &room, &user, role)
                })
            }
            ("DELETE", ["members", user]) => {
                let user = path_segment(user, "not a member of this room")?;
                self.room_job(request, caller, move |r, who| {
                    r.remove_member(who, &room, &user)
                })
            }
            (_, [] | ["presence"] | ["messages"] | ["members", _]) => Err(
                ApiError::method_not_allowed("GET, PATCH, DELETE, PUT, POST"),
            ),
            _ => Err(ApiError::new(404, ErrorCode::NotFound, "no such route")),
        }
    }

    fn route(&self, request: &HttpRequest<'_>) -> Result<Routed, ApiError> {
        let method = request.head.method.as_str();
        let path = request.head.path();
        if let Some(rest) = path.strip_prefix("/rooms/") {
            return self.room_routes(request, rest);
        }
        match (method, path) {
            ("POST", "/rooms") => self.create_room(request),
            ("POST", "/register") => self.register(request),
            ("POST", "/login") => self.login(request),
            ("POST", "/refresh") => self.refresh(request),
            ("POST", "/logout") => {
                let who = self.authenticate(request)?;
                Self::optional_json_body(request)?;
                self.authenticated(request, who, |a, id| a.logout(id), false)
            }
            ("POST", "/logout/all") => {
                let who = self.authenticate(request)?;
                self.authenticated(request, who, |a, id| a.logout_all(id), false)
            }
            ("GET", "/admin/origins") => {
                let who = self.authenticate(request)?;
                let origins = self.cors.clone();
                Ok(Self::defer(&self.storage_pool, request, move || {
                    origins.get(&who)
                }))
            }
            ("PUT", "/admin/origins") => {
                let who = self.authenticate(request)?;
                let body = Self::json_body(request)?;
                let list = body.string_list("origins")?;
                let origins = self.cors.clone();
                Ok(Self::defer(&self.storage_pool, request, move || {
                    origins.put(&who, list)
                }))
            }
            (_, "/admin/origins") => Err(ApiError::method_not_allowed("GET, PUT")),
            ("GET", "/me") => {
                let who = self.authenticate(request)?;
                self.authenticated(request, who, |a, id| a.me(id), false)
            }
            ("DELETE", "/me") => {
                let who = self.authenticate(request)?;
                let body = Self::json_body(request)?;
                let password = body.string("password")?.to_owned();
                self.authenticated(request, who, move |a, id| a.delete_me(id, &password), true)
            }
            ("GET", "/sessions") => {
                let who = self.authenticate(request)?;
                self.authenticated(request, who, |a, id| a.sessions(id), false)
            }
            ("POST", "/password") => {
                let who = self.authenticate(request)?;
                let body = Self::json_body(request)?;
                let current = body.string("current_password")?.to_owned();
                let new_password = body.string("new_password")?.to_owned();
                accounts::validate::password("new_password", &new_password)
                    .map_err(|e| ApiError::invalid_input(e.field, e.message))?;
                self.authenticated(
                    request,
                    who,
                    move |a, id| a.change_password(id, &current, &new_password),
                    true,
                )
            }
            ("DELETE", p) if p.starts_with("/sessions/") => {
                let caller = self.authenticate(request)?;
                let id = p["/sessions/".len()..].to_owned();
                if id.is_empty() || id.len() > 64 || id.contains('/') {
                    return Err(ApiError::new(404, ErrorCode::NotFound, "no such session"));
                }
                self.authenticated(
                    request,
                    caller,
                    move |a, who| a.delete_session(who, &id),
                    false,
                )
            }
            ("GET" | "HEAD", "/healthz") => {
                // `node_id` is validated to [A-Za-z0-9._-]: nothing to escape.
                let body = format!(r#"{{"status":"ok","node_id":"{}"}}"#, self.node_id);
                Ok(HttpResponse::json(200, body.into_bytes()).into())
            }
            ("GET" | "HEAD", "/readyz") => {
                let accounts = self.accounts.clone();
                let redis = &self.metrics.engine.redis;
                let redis = redis
                    .configured
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .then(|| redis.up());
                Ok(Self::defer(&self.storage_pool, request, move || {
                    Ok(readiness(&accounts, redis))
                }))
            }
            ("GET" | "HEAD", "/metrics") => {
                let mut text = self.metrics.render();
                if let Some(state) = self.accounts.store().breaker_state() {
                    use std::fmt::Write as _;
                    let _ = writeln!(
                        text,
                        "# TYPE ringhub_breaker_state gauge\n\
                         ringhub_breaker_state{{dependency=\"postgres\"}} {}",
                        state.gauge()
                    );
                }
                Ok(HttpResponse {
                    status: 200,
                    headers: vec![("Content-Type", "text/plain; version=0.0.4".to_owned())],
                    body: text.into_bytes(),
                }
                .into())
            }
            ("GET" | "HEAD", "/.well-known/jwks.json") => match self.auth.jwks() {
                Some(jwks) => Ok(HttpResponse::json(200, jwks.as_bytes().to_vec()).into()),
                None => Err(ApiError::new(
                    404,
                    ErrorCode::NotFound,
                    "no public keys: jwt_algorithm is HS256",
                )),
            },
            (_, "/register" | "/login" | "/refresh" | "/logout" | "/logout/all" | "/password") => {
                Err(ApiError::method_not_allowed("POST"))
            }
            (_, "/me") => Err(ApiError::method_not_allowed("GET, DELETE")),
            (_, "/rooms") => Err(ApiError::method_not_allowed("POST")),
            (_, "/sessions") => Err(ApiError::method_not_allowed("GET")),
            (_, "/healthz" | "/readyz" | "/metrics") => {
                Err(ApiError::method_not_allowed("GET, HEAD"))
            }
            _ => Err(ApiError::new(404, ErrorCode::NotFound, "no such route")),
        }
    }

    fn cors_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            ("Access-Control-Allow-Origin", origin.to_owned()),
            ("Vary", "Origin".to_owned()),
        ];
        // Credentials (the refresh cookie) only for origins the operator named: with the
        // default "any origin", a page elsewhere must not read answers made with our cookies.
        if self.cors.named() {
            headers.push(("Access-Control-Allow-Credentials", "true".to_owned()));
        }
        headers
    }
}

/// A decoded path segment, or 404 (`missing` says what was not found) for a bad escape.
fn path_segment(raw: &str, missing: &'static str) -> Result<String, ApiError> {
    percent_decode_path(raw)
        .map(std::borrow::Cow::into_owned)
        .ok_or_else(|| ApiError::not_found(missing))
}

/// A cookie's value from the `Cookie` header.
fn cookie(request: &HttpRequest<'_>, name: &str) -> Option<String> {
    request
        .head
        .headers_named("cookie")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
}

/// `/readyz`: 200 while storage answers and (when configured) every Redis connection is up;
/// 503 naming what fails and what runs degraded because of it.
fn readiness(accounts: &Accounts, redis_up: Option<bool>) -> HttpResponse {
    let store = accounts.store();
    let storage_ok = match store.ping() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "readiness: storage fails");
            false
        }
    };
    let mut failing = Vec::new();
    if !storage_ok {
        failing.push("storage");
    }
    if redis_up == Some(false) {
        failing.push("redis");
    }
    let status = if failing.is_empty() {
        "ready"
    } else {
        "unavailable"
    };
    // What runs degraded meanwhile (docs/http-api.md, degraded mode).
    let mut degraded: Vec<&str> = Vec::new();
    if !storage_ok {
        degraded.extend(["account_changes", "logins", "presence_diffs"]);
    }
    if redis_up == Some(false) {
        degraded.extend(["cross_node_delivery", "shared_limits"]);
        if !degraded.contains(&"presence_diffs") {
            degraded.push("presence_diffs");
        }
    }
    let mut body = format!(r#"{{"status":"{status}""#);
    if !failing.is_empty() {
        body.push_str(&format!(r#","failing":["{}"]"#, failing.join(r#"",""#)));
        body.push_str(&format!(r#","degraded":["{}"]"#, degraded.join(r#"",""#)));
    }
    body.push_str(&format!(r#","storage":"{}""#, store.kind()));
    if let Some(up) = redis_up {
        body.push_str(&format!(r#","redis":"{}""#, if up { "up" } else { "down" }));
    }
    body.push('}');
    let code = if failing.is_empty() { 200 } else { 503 };
    HttpResponse::json(code, body.into_bytes())
}

/// Adds headers to an answer, whether it is ready now or later.
fn with_headers(routed: Routed, headers: Vec<(&'static str, String)>) -> Routed {
    match routed {
        Routed::Now(mut r) => {
            r.headers.extend(headers);
            Routed::Now(r)
        }
        Routed::Later(mut pending) => {
            pending.add_headers(headers);
            Routed::Later(pending)
        }
    }
}

impl HttpRoutes for Routes {
    fn handle(&self, request: &HttpRequest<'_>) -> Routed {
        let origin = request.head.header_str("origin").map(str::to_owned);
        let mut extra = Vec::new();
        if let Some(origin) = &origin {
            if !self.cors.allows(origin) {
                return Routed::Now(
                    ApiError::new(403, ErrorCode::Forbidden, "origin not allowed").into(),
                );
            }
            extra = self.cors_headers(origin);
            if request.head.method == "OPTIONS" {
                let mut r = HttpResponse {
                    status: 204,
                    headers: Vec::new(),
                    body: Vec::new(),
                };
                r.headers.extend(extra);
                r.headers.push((
                    "Access-Control-Allow-Methods",
                    "GET, POST, PUT, PATCH, DELETE".to_owned(),
                ));
                r.headers.push((
                    "Access-Control-Allow-Headers",
                    "Authorization, Content-Type, Idempotency-Key, X-Request-Id".to_owned(),
                ));
                r.headers.push(("Access-Control-Max-Age", "600".to_owned()));
                return Routed::Now(r);
            }
        }
        let routed = match self.route(request) {
            Ok(routed) => routed,
            Err(refusal) => Routed::Now(refusal.into()),
        };
        with_headers(routed, extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_ignores_strings_and_stops_early() {
        assert_eq!(nesting_depth(br#"{"a":[1,{"b":"[[[["}]}"#), 3);
        assert_eq!(nesting_depth(br#"{"a":"\"[["}"#), 1);
        assert_eq!(nesting_depth(&[b'['; 65_536]), MAX_BODY_DEPTH + 1);
        assert_eq!(nesting_depth(b"7"), 0);
    }
}
