//! `ringhub serve`: builds the engine's configuration and services from the validated
//! configuration (storage, accounts, pools, routes), starts the shards, and shuts down
//! gracefully on SIGINT/SIGTERM.

use std::sync::Arc;

use engine::{ConflictPolicy, EngineConfig, Metrics, RateSpec};

use crate::accounts::{Accounts, AccountsConfig};
use crate::config::{BurstRate, Config, Rate, SessionConflict, secrets::Secrets};
use crate::observe::ServerMetrics;
use crate::pool::Pool;
use crate::revocation::RevocationList;
use crate::routes::{Cors, Routes};
use crate::tokens::{JwtAuthenticator, TokenService};

fn rate(rate: Rate, burst: u32) -> RateSpec {
    RateSpec {
        count: rate.count,
        per: rate.per,
        burst,
    }
}

fn burst(b: BurstRate) -> RateSpec {
    rate(b.rate, b.burst)
}

/// The engine's part of the configuration.
pub fn engine_config(config: &Config) -> EngineConfig {
    let rl = &config.rate_limits;
    EngineConfig {
        listen: config.listen,
        shards: config.shards,
        max_message_bytes: config.max_message_bytes,
        max_json_depth: config.max_json_depth,
        compression_threshold: config.compression_threshold,
        default_rooms: config.default_rooms.clone(),
        implicit_rooms: config.implicit_rooms,
        max_room_members: config.max_room_members,
        max_connections_per_user: config.max_connections_per_user,
        session_conflict: match config.session_conflict {
            SessionConflict::CloseOldest => ConflictPolicy::CloseOldest,
            SessionConflict::RejectNew => ConflictPolicy::RejectNew,
        },
        max_connections_per_ip: config.max_connections_per_ip,
        max_rooms_per_connection: config.max_rooms_per_connection,
        max_queued_bytes: config.max_queued_bytes,
        history_size: config.history_size as usize,
        history_ttl: config.history_ttl,
        history_room_bytes: config.history_room_bytes,
        history_total_bytes: config.history_total_bytes,
        http_head_timeout: config.http_head_timeout,
        http_body_timeout: config.http_body_timeout,
        max_pending_per_ip: config.max_pending_per_ip,
        resume_ttl: config.resume_ttl,
        heartbeat: config.heartbeat,
        presence_batch: config.presence_batch,
        expiry_grace: config.expiry_grace,
        write_delay: config.write_delay,
        busy_write_delay: config.busy_write_delay,
        force_epoll: config.force_epoll,
        allowed_origins: config.allowed_origins.clone(),
        allow_missing_origin: config.allow_missing_origin,
        trusted_proxies: config.trusted_proxies.clone(),
        connect_per_ip: burst(rl.connect_per_ip),
        publish_per_connection: burst(rl.publish_per_connection),
        publish_per_room: rate(rl.publish_per_room, rl.publish_per_room.count),
        query_per_connection: rate(rl.query_per_connection, rl.query_per_connection.count),
        join_per_connection: burst(rl.join_per_connection),
        shutdown_grace: std::time::Duration::from_secs(5),
    }
}

/// The token service of the configured algorithm.
pub fn token_service(config: &Config, secrets: &Secrets) -> Result<TokenService, String> {
    match config.jwt_algorithm {
        crate::config::JwtAlgorithm::Hs256 => Ok(TokenService::hs256(
            &secrets.jwt_secret,
            &secrets.jwt_secrets_old,
        )),
        crate::config::JwtAlgorithm::EdDsa => {
            let path = config
                .jwt_private_key_file
                .as_ref()
                .ok_or("jwt_algorithm = \"EdDSA\" needs jwt_private_key_file")?;
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("jwt_private_key_file {}: {e}", path.display()))?;
            TokenService::eddsa(&pem)
        }
    }
}

/// Opens the configured store (applying migrations).
pub fn open_store(config: &Config) -> Result<Arc<dyn storage::Store>, String> {
    let pool = usize::try_from(config.database_pool).unwrap_or(8);
    let backend = match &config.database_url {
        Some(url) => storage::Backend::Postgres {
            url,
            read_url: config.database_read_url.as_deref(),
            pool,
        },
        None => storage::Backend::Sqlite {
            dir: &config.data_dir,
        },
    };
    storage::open(&backend).map_err(|e| format!("cannot open storage: {e}"))
}

/// Runs the server until a signal stops it.
pub fn serve(config: &Config, secrets: &Secrets) -> Result<(), String> {
    crate::logging::init(
        config.log_format == crate::config::LogFormat::Pretty,
        &config.log_level,
    );
    if !config.transparent_huge_pages {
        engine::disable_transparent_huge_pages();
    }
    if config.redis_url.is_some() {
        // A configured key is never ignored: until several nodes are built, a Redis URL would
        // promise shared state that this node does not share.
        return Err(
            "redis_url: Redis (several nodes acting as one) is not built yet; this node keeps \
             presence, limits and history in process memory. Remove redis_url to run a single node"
                .into(),
        );
    }
    if config.tls.is_some() {
        // Never fall back to plaintext silently when TLS was asked for.
        return Err(
            "tls_cert_file/tls_key_file: TLS termination in the server is not built yet; \
                    terminate TLS in a proxy and set behind_proxy = true"
                .into(),
        );
    }
    let store = open_store(config)?;
    let tokens = Arc::new(token_service(config, secrets)?);
    let engine_metrics = Arc::new(Metrics::new(config.shards));
    let metrics = Arc::new(ServerMetrics::new(engine_metrics.clone()));
    let revocations = Arc::new(RevocationList::new());
    let auth = Arc::new(JwtAuthenticator::new(
        tokens.clone(),
        config.token_binding,
        revocations.clone(),
    ));
    let accounts = Arc::new(Accounts::new(
        store.clone(),
        tokens,
        secrets,
        revocations,
        AccountsConfig {
            access_ttl: config.access_ttl,
            refresh_ttl: config.refresh_ttl,
            session_max_age: config.session_max_age,
            binding: config.token_binding,
            bcrypt_cost: config.bcrypt_cost,
            refresh_reuse_interval: config.refresh_reuse_interval,
            refresh_cookie: config.refresh_cookie,
        },
        &config.rate_limits,
        metrics.clone(),
    )?);
    let loaded = accounts
        .load_revocations()
        .map_err(|e| format!("cannot load revocations: {e}"))?;
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let storage_threads = usize::try_from(config.database_pool).unwrap_or(8).max(2);
    let storage_pool = Arc::new(Pool::new("storage", storage_threads, 1024, false));
    let hash_pool = Arc::new(Pool::new(
        "hash",
        cores,
        usize::try_from(config.hash_queue).unwrap_or(64),
        true,
    ));
    let directory = Arc::new(
        crate::rooms::RoomDirectory::load(&*store)
            .map_err(|e| format!("cannot load rooms: {e}"))?,
    );
    let rooms = Arc::new(crate::rooms::RoomService::new(
        store.clone(),
        directory.clone(),
        config.default_rooms.clone(),
        config.max_room_members,
        config.max_message_bytes,
        config.max_json_depth,
        config.rate_limits.publish_per_connection,
    ));
    let warm = accounts.clone();
    let _ = hash_pool.submit(move || warm.warm_up());
    let routes = Arc::new(Routes::new(
        metrics,
        accounts.clone(),
        rooms.clone(),
        auth.clone(),
        storage_pool,
        hash_pool,
        Cors {
            allowed_origins: config.allowed_origins.clone(),
        },
    ));
    let engine = engine::start(
        engine_config(config),
        auth,
        routes,
        directory,
        engine_metrics,
    )
    .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    accounts.attach(engine.control());
    rooms.attach(engine.control());
    let pruner = accounts;
    let _ = std::thread::Builder::new()
        .name("ringhub-upkeep".into())
        .spawn(move || {
            // Admins change through `ringhub user set-role`, another process: reload them often.
            for tick in 1u64.. {
                std::thread::sleep(std::time::Duration::from_secs(2));
                rooms.reload_admins();
                pruner.erase_refresh_children();
                if tick % 30 == 0 {
                    pruner.prune();
                }
            }
        });
    let handle = engine.control();
    ctrlc::set_handler(move || handle.shutdown())
        .map_err(|e| format!("cannot install signal handler: {e}"))?;
    tracing::info!(
        target: crate::logging::LIFECYCLE,
        addr = %engine.local_addr(),
        shards = config.shards,
        driver = engine.driver(),
        storage = store.kind(),
        revocations_loaded = loaded,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    engine.wait();
    tracing::info!(target: crate::logging::LIFECYCLE, "stopped");
    Ok(())
}
