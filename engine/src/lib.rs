//! ringhub's engine: a thread-per-core WebSocket gateway on monoio (io_uring, or epoll where
//! io_uring is refused). Each shard owns its listener (`SO_REUSEPORT` on one port), its
//! connections and the rooms homed on it; shards exchange messages through lock-free mailboxes.
//!
//! The engine serves `/ws` (the native protocol of SPEC §4) and `/socket.io/` (SPEC §8) itself and
//! hands every other HTTP request to the [`HttpRoutes`] the server provides. It verifies tokens
//! through the [`Authenticator`] the server provides and never sees a key. It must not block a
//! shard: anything slow (password hashing, databases) belongs to the server's blocking pools.
//!
//! Main types: [`start`] → [`Engine`]; [`EngineConfig`]; [`Metrics`].
#![deny(unsafe_code)]

pub mod announce;
mod answers;
pub mod auth;
mod broker;
mod buffers;
mod clock;
pub mod config;
mod conn;
mod frames;
pub mod held;
mod home;
mod http;
mod limits;
mod mailbox;
pub mod metrics;
mod msg;
mod net;
mod pending;
mod redis;
mod response;
mod room;
pub mod rooms;
mod router;
mod routes;
mod session;
mod shard;
mod shared;
pub mod shared_limits;
mod sio;
mod state;
pub(crate) mod sys;
mod tasks;
pub mod tls;
mod transport;
mod upgrade;
mod writer;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

pub use auth::{AuthFailure, Authenticator, ClientInfo, Identity, Revoked};
pub use config::{ConflictPolicy, EngineConfig, RateSpec, RedisSettings};
pub use metrics::Metrics;
use msg::{ConnMsg, RoomMsg, ShardMsg};
pub use net::{Cidr, client_ip, ip_group};
pub use pending::{PendingResponse, ResponseSender, pending_response};
pub use redis::check as check_redis;
pub use redis::tell_nodes_blocking;
pub use response::HttpResponse;
pub use rooms::{OpenRooms, RoomAccess, RoomPolicy, RoomSettings};
pub use routes::{HttpRequest, HttpRoutes, Routed};
use shard::Shard;
use shared::Shared;
pub use sys::{disable_transparent_huge_pages, lower_thread_priority};

/// A running engine.
pub struct Engine {
    local_addr: SocketAddr,
    driver: &'static str,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("local_addr", &self.local_addr)
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Binds every shard's listener and starts the shards. Returns once each shard's runtime is up.
pub fn start(
    config: EngineConfig,
    auth: Arc<dyn Authenticator>,
    routes: Arc<dyn HttpRoutes>,
    policy: Arc<dyn RoomPolicy>,
    metrics: Arc<Metrics>,
) -> std::io::Result<Engine> {
    let shards = config.shards.max(1);
    let first = bind(config.listen)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(bind(local_addr)?);
    }
    if let Some(settings) = &config.redis {
        let redis = &metrics.redis;
        redis.configured.store(true, Ordering::Relaxed);
        // Two connections per master per shard; a cluster's are counted again once its map of
        // slots is read.
        let links = i64::try_from(shards * 2 * settings.seeds.len()).unwrap_or(i64::MAX);
        if settings.cluster {
            let missing = i64::try_from(shards).unwrap_or(i64::MAX);
            redis.maps_missing.store(missing, Ordering::Relaxed);
        }
        redis.links_expected.store(links, Ordering::Relaxed);
    }
    if config.tls.is_some() {
        metrics.tls_on.store(1, Ordering::Relaxed);
    }
    let shared = Arc::new(Shared::new(config, auth, routes, policy, metrics));
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<&'static str>>();
    let mut threads = Vec::with_capacity(shards);
    for (id, listener) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let ready = ready_tx.clone();
        let core = if cores.is_empty() {
            None
        } else {
            Some(cores[id % cores.len()])
        };
        let thread = std::thread::Builder::new()
            .name(format!("ringhub-shard-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                run_shard(id, shared, listener, &ready);
            })?;
        threads.push(thread);
    }
    drop(ready_tx);
    let mut driver = "io_uring";
    for _ in 0..shards {
        match ready_rx.recv() {
            Ok(Ok(d)) => driver = d,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::other("a shard died while starting")),
        }
    }
    Ok(Engine {
        local_addr,
        driver,
        threads,
        shared,
    })
}

fn run_shard(
    id: usize,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    ready: &std::sync::mpsc::Sender<std::io::Result<&'static str>>,
) {
    let runtime = if shared.config.force_epoll {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .attach_thread_pool(Box::new(monoio::blocking::DefaultThreadPool::new(1)))
            .build()
            .map(monoio::FusionRuntime::from)
    } else {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .with_entries(4096)
            .attach_thread_pool(Box::new(monoio::blocking::DefaultThreadPool::new(1)))
            .build()
    };
    let mut runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let driver = match &runtime {
        monoio::FusionRuntime::Uring(_) => "io_uring",
        monoio::FusionRuntime::Legacy(_) => "epoll",
    };
    runtime.block_on(async move {
        let shard = match Shard::new(id, shared) {
            Ok(s) => Rc::new(s),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let listener = match monoio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(driver));
        tasks::shard_main(shard, listener).await;
    });
}

impl Engine {
    /// The bound address (the real port when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `io_uring` or `epoll`.
    pub fn driver(&self) -> &'static str {
        self.driver
    }

    /// Starts a graceful shutdown: stop accepting, close WebSockets with 1001, drain.
    pub fn shutdown(&self) {
        if self.shared.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for shard in 0..self.shared.mailboxes.len() {
            self.shared.send(shard, ShardMsg::Shutdown);
        }
    }

    /// A handle for other threads: shutdown (a signal handler), closing revoked connections
    /// (the accounts routes).
    pub fn control(&self) -> Control {
        Control(self.shared.clone())
    }

    /// Waits for every shard to finish.
    pub fn wait(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Drives a running engine from any thread.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

/// How long the HTTP API waits for the shards to act on a room change.
const ROOM_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl Control {
    fn every_shard(&self, msg: impl Fn(Arc<rooms::Countdown>) -> ConnMsg) -> bool {
        let shards = self.0.mailboxes.len();
        let done = Arc::new(rooms::Countdown::new(shards));
        for shard in 0..shards {
            self.0.send(shard, msg(done.clone()));
        }
        done.wait(ROOM_CHANGE_WAIT)
    }

    /// Removes `user` (every member when None) from `room` on every shard and sends `kicked`
    /// with `reason`. Blocks (call it from a blocking thread) until every shard has acted, so
    /// that no message published afterwards reaches them; false if a shard did not answer in
    /// time.
    pub fn kick(
        &self,
        room: &protocol::envelope::RoomId,
        user: Option<&str>,
        reason: &'static str,
    ) -> bool {
        let user: Option<Arc<str>> = user.map(Arc::from);
        self.every_shard(|done| ConnMsg::Kick {
            room: room.clone(),
            user: user.clone(),
            reason,
            done,
        })
    }

    /// Asks the policy again for every connection in `room`. Blocks like [`Control::kick`].
    pub fn reauthorize(&self, room: &protocol::envelope::RoomId) -> bool {
        self.every_shard(|done| ConnMsg::Reauthorize {
            room: room.clone(),
            done,
        })
    }

    /// Asks the policy again for every room the live connections of `user` hold (call it when
    /// the user loses the admin role). Blocks like [`Control::kick`].
    pub fn reauthorize_user(&self, user: &str) -> bool {
        let user: Arc<str> = Arc::from(user);
        self.every_shard(|done| ConnMsg::ReauthorizeUser {
            user: user.clone(),
            done,
        })
    }

    /// Kicks every member of a deleted room and forgets it (history included).
    pub fn delete_room(&self, room: &protocol::envelope::RoomId) -> bool {
        let kicked = self.kick(room, None, "room_deleted");
        let done = Arc::new(rooms::Countdown::new(1));
        self.0.send(
            self.0.home_of(room),
            RoomMsg::DropRoom {
                room: room.clone(),
                done: done.clone(),
            },
        );
        done.wait(ROOM_CHANGE_WAIT) && kicked
    }

    /// Publishes `data` to `room` as `user` (the HTTP API); the room's `seq`, or the error.
    pub fn publish(
        &self,
        room: &protocol::envelope::RoomId,
        user: &str,
        name: &str,
        (data, event): (
            protocol::envelope::Value,
            Option<protocol::envelope::EventName>,
        ),
        settings: Option<RoomSettings>,
    ) -> Result<u64, protocol::ErrorCode> {
        let answer = Arc::new(rooms::Answer::new());
        self.0.send(
            self.0.home_of(room),
            RoomMsg::PublishExternal {
                room: room.clone(),
                user: Arc::from(user),
                name: Arc::from(name),
                data,
                event,
                settings,
                answer: answer.clone(),
            },
        );
        answer
            .wait(ROOM_CHANGE_WAIT)
            .unwrap_or(Err(protocol::ErrorCode::Unavailable))
    }

    /// The room's presence (users with their connection counts).
    pub fn presence(
        &self,
        room: &protocol::envelope::RoomId,
    ) -> Option<Vec<protocol::envelope::PresenceEntry>> {
        let answer = Arc::new(rooms::Answer::new());
        self.0.send(
            self.0.home_of(room),
            RoomMsg::PresenceExternal {
                room: room.clone(),
                answer: answer.clone(),
            },
        );
        answer.wait(ROOM_CHANGE_WAIT)
    }

    /// Closes, on every shard, the live connections of `user` (only those of `session`, when
    /// given) with the close code `revoked` implies. Returns once every shard has been told; each
    /// shard acts on its next turn.
    pub fn close_revoked(&self, user: &str, session: Option<&str>, revoked: Revoked) {
        let user: Arc<str> = Arc::from(user);
        let session: Option<Arc<str>> = session.map(Arc::from);
        for shard in 0..self.0.mailboxes.len() {
            self.0.send(
                shard,
                ConnMsg::CloseAuthorized {
                    user: user.clone(),
                    session: session.clone(),
                    code: revoked.close_code(),
                },
            );
        }
    }

    /// Closes, on every shard, the live connections whose identity the authenticator now finds
    /// revoked (after revocations were reloaded). Returns once every shard has been told.
    pub fn close_revoked_anywhere(&self) {
        for shard in 0..self.0.mailboxes.len() {
            self.0.send(shard, ConnMsg::CloseAllRevoked);
        }
    }

    /// Replaces `allowed_origins` at run time: later upgrades are checked against `origins`
    /// (empty: every origin), and live connections whose origin is no longer allowed are closed
    /// with 4503 (each shard on its next turn).
    pub fn set_allowed_origins(&self, origins: Vec<String>) {
        *self
            .0
            .origins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::from(origins);
        for shard in 0..self.0.mailboxes.len() {
            self.0.send(shard, ConnMsg::OriginsChanged);
        }
    }

    /// `allowed_origins` in force.
    pub fn allowed_origins(&self) -> Vec<String> {
        self.0.allowed_origins().to_vec()
    }

    /// The shard that asks Redis about `key` (spread over the shards, the same shard for one key).
    fn shard_of_key(&self, key: &str) -> usize {
        let hash = key.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        hash % self.0.mailboxes.len().max(1)
    }

    /// Asks a limit counted by every node (Redis); blocks (call it from a blocking thread) up to
    /// `within`. [`shared_limits::Verdict::Unknown`] without Redis, while it is unreachable, or
    /// when it did not answer in time: the caller's own counters decide.
    pub fn shared_limit(
        &self,
        ask: shared_limits::SharedAsk,
        within: std::time::Duration,
    ) -> shared_limits::Verdict {
        if self.0.config.redis.is_none() {
            return shared_limits::Verdict::Unknown;
        }
        let answer = Arc::new(rooms::Answer::new());
        let shard = self.shard_of_key(ask.key());
        self.0.send(
            shard,
            ShardMsg::SharedLimit(Box::new((ask, answer.clone()))),
        );
        let verdict = answer
            .wait(within)
            .unwrap_or(shared_limits::Verdict::Unknown);
        if verdict == shared_limits::Verdict::Unknown {
            let metrics = &self.0.metrics.redis;
            metrics.limit_fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Asks about a value kept in Redis (the user cache, held sessions); blocks (call it from a
    /// blocking thread) up to `within`. [`held::HeldReply::Unknown`] without Redis, while it is
    /// unreachable, or when it did not answer in time.
    pub fn held(&self, ask: held::HeldAsk, within: std::time::Duration) -> held::HeldReply {
        if self.0.config.redis.is_none() {
            return held::HeldReply::Unknown;
        }
        let answer = Arc::new(rooms::Answer::new());
        let shard = self.shard_of_key(&ask.key());
        self.0
            .send(shard, ShardMsg::Held(Box::new((ask, answer.clone()))));
        answer.wait(within).unwrap_or(held::HeldReply::Unknown)
    }

    /// Says whether the server's database can answer (false: degraded mode, presence diffs are
    /// shed until it can again).
    pub fn set_storage_degraded(&self, degraded: bool) {
        self.0.storage_degraded.store(degraded, Ordering::Relaxed);
    }

    /// Replaces the TLS configuration new handshakes use (a reloaded certificate); open
    /// connections keep theirs. False when the listener does not serve TLS.
    pub fn set_tls_config(&self, config: Arc<rustls::ServerConfig>) -> bool {
        let Some(slot) = &self.0.tls else {
            return false;
        };
        *slot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
        true
    }

    /// Whether Redis is configured (the held values and shared limits can be asked).
    pub fn has_redis(&self) -> bool {
        self.0.config.redis.is_some()
    }

    /// Sets the listener of what other nodes announce (several nodes; never called without
    /// Redis).
    pub fn listen(&self, listener: Arc<dyn announce::Listener>) {
        self.0.listeners.set(listener);
    }

    /// Tells every other node of the service `message` (through Redis; false when no Redis is
    /// configured). Delivery is best effort: a node that misses it is told
    /// [`announce::Listener::missed`] when it is back.
    pub fn announce(&self, message: Vec<u8>) -> bool {
        if self.0.config.redis.is_none() {
            return false;
        }
        self.0.send(0, ShardMsg::Announce(message));
        true
    }

    /// See [`Engine::shutdown`].
    pub fn shutdown(&self) {
        if self.0.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        for shard in 0..self.0.mailboxes.len() {
            self.0.send(shard, ShardMsg::Shutdown);
        }
    }
}
