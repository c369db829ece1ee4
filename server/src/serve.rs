//! `ringhub serve`: builds the services from the validated configuration (storage, accounts,
//! pools, routes), starts the engine with its section of the configuration, and shuts down
//! gracefully on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use engine::Metrics;
use storage::StoreError;

use crate::accounts::Accounts;
use crate::config::{Config, secrets::Secrets};
use crate::observe::ServerMetrics;
use crate::pool::Pool;
use crate::revocation::RevocationList;
use crate::routes::Routes;
use crate::tokens::{JwtAuthenticator, TokenService};

/// Why the server could not start (or a command could not reach what it needs).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `jwt_algorithm = "EdDSA"` without a key file.
    #[error("jwt_algorithm = \"EdDSA\" needs jwt_private_key_file")]
    NoSigningKey,
    /// The key file cannot be read.
    #[error("jwt_private_key_file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file does not hold a usable key.
    #[error("{0}")]
    BadSigningKey(String),
    /// Storage cannot be opened or read at start.
    #[error("cannot {what}: {source}")]
    Storage {
        /// What was being done: `open storage`, `load revocations`, `load rooms`.
        what: &'static str,
        /// Why.
        source: StoreError,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A key differs from the one that wrote the database (production mode).
    #[error(
        "{key} differs from the key that wrote this database (its fingerprint is kept there): \
         every node of a service needs the same jwt_secret (or EdDSA key), encryption_key and \
         blind_index_key"
    )]
    KeyMismatch {
        /// The configuration key.
        key: &'static str,
    },
    /// Redis cannot be reached (or refuses the credentials) at start.
    #[error("{0}")]
    Redis(String),
    /// The signal handler cannot be installed.
    #[error("cannot install signal handler: {0}")]
    Signals(std::io::Error),
}

/// The token service of the configured algorithm.
pub fn token_service(config: &Config, secrets: &Secrets) -> Result<TokenService, ServeError> {
    match config.accounts.jwt_algorithm {
        crate::config::JwtAlgorithm::Hs256 => Ok(TokenService::hs256(
            &secrets.jwt_secret,
            &secrets.jwt_secrets_old,
        )),
        crate::config::JwtAlgorithm::EdDsa => {
            let path = config
                .accounts
                .jwt_private_key_file
                .as_ref()
                .ok_or(ServeError::NoSigningKey)?;
            let pem = std::fs::read_to_string(path).map_err(|source| ServeError::KeyFile {
                path: path.clone(),
                source,
            })?;
            TokenService::eddsa(&pem).map_err(ServeError::BadSigningKey)
        }
    }
}

/// Opens the configured store (applying migrations).
pub fn open_store(config: &Config) -> Result<Arc<dyn storage::Store>, ServeError> {
    let settings = &config.storage;
    let pool = usize::try_from(settings.database_pool).unwrap_or(8);
    let backend = match &settings.database_url {
        Some(url) => storage::Backend::Postgres {
            url,
            read_url: settings.database_read_url.as_deref(),
            pool,
            breaker: storage::BreakerSettings {
                failures: settings.breaker_failures,
                probe: settings.breaker_probe,
            },
            ca_file: settings.database_ca_file.as_deref(),
        },
        None => storage::Backend::Sqlite {
            dir: &settings.data_dir,
        },
    };
    storage::open(&backend).map_err(|source| ServeError::Storage {
        what: "open storage",
        source,
    })
}

/// Runs the server until a signal stops it.
pub fn serve(config: &Config, secrets: &Secrets) -> Result<(), ServeError> {
    crate::logging::init(
        config.log_format == crate::config::LogFormat::Pretty,
        &config.log_level,
    );
    if !config.transparent_huge_pages {
        engine::disable_transparent_huge_pages();
    }
    let mut engine_config = config.engine.clone();
    if let Some(redis) = &mut engine_config.redis {
        if config.redis_tls {
            redis.tls = Some(crate::tls::client_config(config.redis_ca_file.as_deref())?);
        }
        // SPEC §10: a configured Redis that cannot be reached at start is an error.
        engine::check_redis(redis).map_err(ServeError::Redis)?;
    }
    if let Some((cert, key)) = &config.tls {
        let tls = crate::tls::load(cert, key)?;
        engine_config.tls = Some(engine::tls::TlsSettings {
            config: tls,
            handshake_timeout: config.tls_handshake_timeout,
        });
    }
    let store = open_store(config)?;
    let tokens = Arc::new(token_service(config, secrets)?);
    let prints = crate::fingerprints::of_this_node(&tokens, secrets);
    let differ =
        crate::fingerprints::check(&*store, &prints, crate::clock::now_ms()).map_err(|source| {
            ServeError::Storage {
                what: "read the key fingerprints",
                source,
            }
        })?;
    for key in differ {
        if config.mode == crate::config::Mode::Production {
            return Err(ServeError::KeyMismatch { key });
        }
        tracing::warn!(
            key,
            "this key differs from the one that wrote the database: tokens, e-mails or \
             sessions written with the other key will not be readable here"
        );
    }
    let engine_metrics = Arc::new(Metrics::new(config.engine.shards));
    let redis_watch = engine_metrics.clone();
    let metrics = Arc::new(ServerMetrics::new(engine_metrics.clone()));
    let revocations = Arc::new(RevocationList::new());
    let auth = Arc::new(JwtAuthenticator::new(
        tokens.clone(),
        config.accounts.token_binding,
        revocations.clone(),
    ));
    let accounts = Arc::new(Accounts::new(
        store.clone(),
        tokens,
        secrets,
        revocations,
        config.accounts.clone(),
        metrics.clone(),
    ));
    let loaded = accounts
        .load_revocations()
        .map_err(|source| ServeError::Storage {
            what: "load revocations",
            source,
        })?;
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let storage_threads = usize::try_from(config.storage.database_pool)
        .unwrap_or(8)
        .max(2);
    let storage_pool = Arc::new(Pool::new("storage", storage_threads, 1024, false));
    let hash_pool = Arc::new(Pool::new(
        "hash",
        cores,
        usize::try_from(config.accounts.hash_queue).unwrap_or(64),
        true,
    ));
    let directory = Arc::new(
        crate::rooms::RoomDirectory::load(&*store).map_err(|source| ServeError::Storage {
            what: "load rooms",
            source,
        })?,
    );
    let rooms = Arc::new(crate::rooms::RoomService::new(
        store.clone(),
        directory.clone(),
        config.engine.default_rooms.clone(),
        config.engine.max_room_members,
        config.engine.max_message_bytes,
        config.engine.max_json_depth,
        config.engine.publish_per_connection,
    ));
    let origins = Arc::new(crate::origins::Origins::new(
        config.engine.allowed_origins.clone(),
        store.clone(),
        directory.clone(),
    ));
    let warm = accounts.clone();
    let _ = hash_pool.submit(move || warm.warm_up());
    let routes = Arc::new(
        Routes::new(
            metrics,
            accounts.clone(),
            rooms.clone(),
            auth.clone(),
            storage_pool,
            hash_pool,
            origins.clone(),
        )
        .with_node_id(&config.node_id),
    );
    let engine = engine::start(engine_config, auth, routes, directory, engine_metrics).map_err(
        |source| ServeError::Listen {
            addr: config.engine.listen,
            source,
        },
    )?;
    accounts.attach(engine.control());
    rooms.attach(engine.control());
    // A list set at run time (kept in storage) wins over the configuration's.
    origins.attach(engine.control());
    if config.engine.redis.is_some() {
        // What other nodes announce (revocations, room and role changes) is applied here.
        engine
            .control()
            .listen(Arc::new(crate::announce::NodeListener::new(
                accounts.clone(),
                rooms.clone(),
                origins,
            )));
    }
    {
        // Every half second: the engine learns whether the database answers (an open breaker
        // is degraded mode: presence diffs are shed). With Redis: while it is unreachable no
        // revocation is announced, so read them from the database, so that another node's
        // revocation still applies here within a second; while it is there and the database
        // answers, write back the sessions held in Redis during a database outage (every 2 s).
        let (accounts, metrics) = (accounts.clone(), redis_watch);
        let with_redis = config.engine.redis.is_some();
        let control = engine.control();
        let _ = std::thread::Builder::new()
            .name("ringhub-outage".into())
            .spawn(move || {
                for tick in 1u64.. {
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    // Half-open is still an outage until a probe succeeds: this thread probes
                    // (a node without traffic would otherwise stay degraded).
                    if accounts.store().breaker_state() == Some(storage::BreakerState::HalfOpen) {
                        let _ = accounts.store().ping();
                    }
                    let storage_open = matches!(
                        accounts.store().breaker_state(),
                        Some(storage::BreakerState::Open | storage::BreakerState::HalfOpen)
                    );
                    control.set_storage_degraded(storage_open);
                    if !with_redis {
                        continue;
                    }
                    if !metrics.redis.up() {
                        accounts.reload_revocations_quietly();
                    } else if tick % 4 == 0 && !storage_open {
                        accounts.write_back_held_sessions();
                    }
                }
            });
    }
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
    // SIGINT and SIGTERM stop; SIGHUP reloads the TLS certificate (nothing without TLS).
    crate::tls::handle_signals(engine.control(), config.tls.clone())
        .map_err(ServeError::Signals)?;
    tracing::info!(
        target: crate::logging::LIFECYCLE,
        addr = %engine.local_addr(),
        shards = config.engine.shards,
        node_id = %config.node_id,
        redis = %config.engine.redis.as_ref().map_or_else(
            || "none".to_owned(),
            |r| {
                let seeds = r.seeds.join(",");
                if r.cluster { format!("cluster {seeds}") } else { seeds }
            }
        ),
        driver = engine.driver(),
        tls = if config.tls.is_some() { "rustls (user space)" } else { "off" },
        storage = store.kind(),
        revocations_loaded = loaded,
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    engine.wait();
    tracing::info!(target: crate::logging::LIFECYCLE, "stopped");
    Ok(())
}
