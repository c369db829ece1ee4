//! What every shard of a node reads: the configuration, the server's services, the mailboxes,
//! and the shared-state backend (`state`). Nothing here is touched per message of a room.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use protocol::envelope::RoomId;

use crate::auth::Authenticator;
use crate::clock::now_ms;
use crate::config::EngineConfig;
use crate::mailbox::Mailbox;
use crate::metrics::Metrics;
use crate::msg::ShardMsg;
use crate::rooms::RoomPolicy;
use crate::routes::HttpRoutes;
use crate::state::{Backend, InProcess, PendingSlot};

/// What every shard of a node reads.
pub(crate) struct Shared {
    pub(crate) config: EngineConfig,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) routes: Arc<dyn HttpRoutes>,
    pub(crate) policy: Arc<dyn RoomPolicy>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) mailboxes: Vec<Mailbox<ShardMsg>>,
    /// Connection caps and rates, who is connected where, resumable sessions.
    pub(crate) state: Backend,
    pub(crate) shutting_down: AtomicBool,
    /// Distinguishes room epochs and session ids across restarts of this process.
    pub(crate) instance: String,
    /// The server's listener of other nodes' announcements.
    pub(crate) listeners: crate::announce::Listeners,
    /// `allowed_origins` in force (the configuration's, or as last set at run time); read once
    /// per upgrade.
    pub(crate) origins: std::sync::RwLock<Arc<[String]>>,
    /// The server says its database cannot answer (degraded mode: presence diffs are shed).
    pub(crate) storage_degraded: AtomicBool,
    /// The TLS configuration new handshakes use (replaced on reload); `None`: plain TCP.
    pub(crate) tls: Option<std::sync::RwLock<Arc<rustls::ServerConfig>>>,
}

impl Shared {
    pub(crate) fn new(
        config: EngineConfig,
        auth: Arc<dyn Authenticator>,
        routes: Arc<dyn HttpRoutes>,
        policy: Arc<dyn RoomPolicy>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shards = config.shards;
        let time = now_ms().to_le_bytes();
        let pid = std::process::id().to_le_bytes();
        let nonce: [u8; 6] = std::array::from_fn(|i| time[i] ^ pid[i % 4]);
        let state = Backend::InProcess(InProcess::new(&config, metrics.clone()));
        let origins = std::sync::RwLock::new(Arc::from(config.allowed_origins.clone()));
        let tls = config
            .tls
            .as_ref()
            .map(|t| std::sync::RwLock::new(t.config.clone()));
        Self {
            state,
            config,
            auth,
            routes,
            policy,
            metrics,
            mailboxes: (0..shards).map(|_| Mailbox::new()).collect(),
            shutting_down: AtomicBool::new(false),
            instance: nonce.iter().map(|b| format!("{b:02x}")).collect(),
            listeners: crate::announce::Listeners::default(),
            origins,
            storage_degraded: AtomicBool::new(false),
            tls,
        }
    }

    /// The TLS configuration for a new handshake, when the listener serves TLS.
    pub(crate) fn tls_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls.as_ref().map(|slot| {
            slot.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        })
    }

    /// `allowed_origins` in force.
    pub(crate) fn allowed_origins(&self) -> Arc<[String]> {
        self.origins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn send(&self, shard: usize, msg: impl Into<ShardMsg>) {
        if let Some(mailbox) = self.mailboxes.get(shard) {
            self.metrics.queue_depth(shard, 1);
            mailbox.push(msg.into());
        }
    }

    /// The shard that sequences `room` (its "home"): a fixed hash of the id (SipHash with fixed
    /// keys: the same on every shard and every run).
    pub(crate) fn home_of(&self, room: &RoomId) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(room.as_str());
        // The high half is well mixed and fits `usize` everywhere.
        usize::try_from(h >> 32).unwrap_or_default() % self.config.shards
    }

    /// Counts a connection from `ip` that is not yet an authenticated WebSocket (see
    /// `max_pending_per_ip`); `None` past the cap.
    pub(crate) fn pending_enter(&self, ip: IpAddr) -> Option<PendingSlot> {
        self.state.local().ips().pending_enter(ip)
    }
}

/// Whether `origin` is allowed by `allowed` (an empty list allows every origin).
pub(crate) fn origin_in(allowed: &[String], origin: &str) -> bool {
    allowed.is_empty() || allowed.iter().any(|o| o == origin)
}
