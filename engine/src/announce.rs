//! Announcements between the nodes of a service (SPEC §10 points 5, 6 and 8): what the server
//! tells every other node (a revocation, a room or role change) and the [`Listener`] it provides
//! to hear what the others told. The engine carries them (through the shared broker's service
//! channel, on shard 0) without reading them; the server gives them meaning. Plain types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// What the server hears from the other nodes. Called on a shard's thread: it must hand any slow
/// work (storage, waiting for shards) to its own threads and return at once.
pub trait Listener: Send + Sync + 'static {
    /// A message another node announced (never one this node sent).
    fn heard(&self, message: &[u8]);
    /// Announcements may have been missed (the service channel was subscribed, first or again
    /// after Redis was unreachable): reload what they would have said.
    fn missed(&self);
}

/// Where a shard finds the server's listener, set once the engine runs.
#[derive(Default)]
pub(crate) struct Listeners {
    listener: OnceLock<Arc<dyn Listener>>,
    /// A miss noticed before the listener was set: told to it when it comes.
    missed_early: AtomicBool,
}

impl Listeners {
    pub(crate) fn set(&self, listener: Arc<dyn Listener>) {
        if self.listener.set(listener).is_ok() && self.missed_early.swap(false, Ordering::AcqRel) {
            self.missed();
        }
    }

    pub(crate) fn heard(&self, message: &[u8]) {
        if let Some(listener) = self.listener.get() {
            listener.heard(message);
        }
    }

    pub(crate) fn missed(&self) {
        match self.listener.get() {
            Some(listener) => listener.missed(),
            None => self.missed_early.store(true, Ordering::Release),
        }
    }
}
