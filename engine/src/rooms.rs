//! Room permissions as the engine sees them (SPEC §5): the [`RoomPolicy`] the server provides
//! answers, without blocking, whether a user may read and publish in a room and with which
//! settings the room runs; the engine asks once per join (and per `history`/`presence` query) and
//! keeps the publish decision with the membership, so a publish costs no lookup. Changes reach
//! live connections through [`crate::Control`] (kick, re-authorize).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use protocol::envelope::RoomId;

/// How a persistent room runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomSettings {
    /// Members allowed at once, across all shards.
    pub max_members: u32,
    /// Whether presence diffs are kept and sent.
    pub presence: bool,
    /// Whether history is kept.
    pub history: bool,
}

/// A user's access to a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomAccess {
    /// Not a persistent room: the implicit-room rules apply (`implicit_rooms`, personal rooms).
    Unknown,
    /// A persistent room this user may not read.
    Denied,
    /// A persistent room this user may read (join, history, presence), and publish when `publish`.
    Granted {
        /// May publish.
        publish: bool,
        /// The room's settings.
        settings: RoomSettings,
    },
}

/// Answers permission questions on a shard: must not block (an in-memory directory).
pub trait RoomPolicy: Send + Sync + 'static {
    /// The access of `user` to `room`.
    fn access(&self, room: &RoomId, user: &str) -> RoomAccess;

    /// Whether `user` has the global admin role (admins may read other users' personal rooms).
    fn is_admin(&self, _user: &str) -> bool {
        false
    }
}

/// Every room is ephemeral and public (no rooms API).
#[derive(Debug, Default, Clone, Copy)]
pub struct OpenRooms;

impl RoomPolicy for OpenRooms {
    fn access(&self, _room: &RoomId, _user: &str) -> RoomAccess {
        RoomAccess::Unknown
    }
}

/// A one-shot answer a blocking thread waits for (bounded) while shards work.
pub(crate) struct Answer<T> {
    value: Mutex<Option<T>>,
    ready: Condvar,
}

impl<T> Answer<T> {
    pub(crate) fn new() -> Self {
        Self {
            value: Mutex::new(None),
            ready: Condvar::new(),
        }
    }

    pub(crate) fn set(&self, value: T) {
        let mut slot = self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = Some(value);
        self.ready.notify_all();
    }

    /// Waits up to `limit`; `None` when no answer came.
    pub(crate) fn wait(&self, limit: Duration) -> Option<T> {
        let slot = self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut slot, _) = self
            .ready
            .wait_timeout_while(slot, limit, |v| v.is_none())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.take()
    }
}

/// Counts shards down to zero; the waiting thread wakes when every shard has acted.
pub(crate) struct Countdown {
    left: Mutex<usize>,
    done: Condvar,
}

impl Countdown {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            left: Mutex::new(n),
            done: Condvar::new(),
        }
    }

    pub(crate) fn tick(&self) {
        let mut left = self
            .left
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *left = left.saturating_sub(1);
        if *left == 0 {
            self.done.notify_all();
        }
    }

    /// Waits up to `limit`; true when every shard ticked.
    pub(crate) fn wait(&self, limit: Duration) -> bool {
        let left = self
            .left
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (left, _) = self
            .done
            .wait_timeout_while(left, limit, |n| *n > 0)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *left == 0
    }
}
