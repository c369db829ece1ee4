//! `ringhub serve`: builds the engine's configuration and services from the validated
//! configuration, starts the shards, and shuts down gracefully on SIGINT/SIGTERM.

use std::sync::Arc;

use engine::{ConflictPolicy, EngineConfig, Metrics, RateSpec};

use crate::config::{BurstRate, Config, Rate, SessionConflict, secrets::Secrets};
use crate::routes::Routes;
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
        resume_ttl: config.resume_ttl,
        heartbeat: config.heartbeat,
        presence_batch: config.presence_batch,
        expiry_grace: config.expiry_grace,
        allowed_origins: config.allowed_origins.clone(),
        allow_missing_origin: config.allow_missing_origin,
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
            Err("jwt_algorithm = \"EdDSA\" is not built yet (accounts issue); use HS256".into())
        }
    }
}

/// Runs the server until a signal stops it.
pub fn serve(config: &Config, secrets: &Secrets) -> Result<(), String> {
    crate::logging::init(
        config.log_format == crate::config::LogFormat::Pretty,
        &config.log_level,
    );
    if config.tls.is_some() {
        // Never fall back to plaintext silently when TLS was asked for.
        return Err(
            "tls_cert_file/tls_key_file: TLS termination in the server is not built yet; \
                    terminate TLS in a proxy and set behind_proxy = true"
                .into(),
        );
    }
    let tokens = Arc::new(token_service(config, secrets)?);
    let metrics = Arc::new(Metrics::new(config.shards));
    let auth = Arc::new(JwtAuthenticator::new(tokens));
    let routes = Arc::new(Routes::new(metrics.clone()));
    let engine = engine::start(engine_config(config), auth, routes, metrics)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let handle = engine.shutdown_handle();
    ctrlc::set_handler(move || handle.shutdown())
        .map_err(|e| format!("cannot install signal handler: {e}"))?;
    let addr = engine.local_addr().to_string();
    let shards = config.shards.to_string();
    crate::logging::event(
        "listening",
        &[
            ("addr", &addr),
            ("shards", &shards),
            ("driver", engine.driver()),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
    );
    engine.wait();
    crate::logging::event("stopped", &[]);
    Ok(())
}
