//! The plain types the room core is asked with and answers with: the rules it keeps to, a join
//! request and its answer, a resume point and its recovery, a published message and where it goes.

use std::sync::Arc;

use protocol::ErrorCode;
use protocol::envelope::{PresenceEntry, RoomId, Value};

use super::history::{RoomBounds, StoredMessage};
use crate::config::{EngineConfig, RateSpec};
use crate::frames::{Delivery, FrameKey};
use crate::rooms::RoomSettings;

/// What the room core needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct RoomRules {
    /// Shards: a room counts its members per shard.
    pub(crate) shards: usize,
    /// `max_room_members`, for rooms without settings of their own.
    pub(crate) max_room_members: u32,
    /// Joining an unknown room creates it.
    pub(crate) implicit_rooms: bool,
    /// `history_size`, `history_room_bytes`, `history_ttl`.
    pub(crate) history: RoomBounds,
    /// This shard's share of `history_total_bytes`.
    pub(crate) history_budget: usize,
    /// `publish_per_room`.
    pub(crate) publish_per_room: RateSpec,
    /// Outbound compression threshold (zstd keys).
    pub(crate) compression_threshold: usize,
    /// The most a resume may recover in bytes (half of `max_queued_bytes`).
    pub(crate) max_recovery_bytes: usize,
    /// Several nodes share the rooms through a broker (Redis): `seq`, history and presence diffs
    /// come from it, the core keeps the local members and encodes what arrives.
    pub(crate) shared: bool,
}

impl RoomRules {
    /// The rules `config` sets, for one of its shards.
    pub(crate) fn of(config: &EngineConfig) -> Self {
        Self {
            shards: config.shards.max(1),
            max_room_members: config.max_room_members,
            implicit_rooms: config.implicit_rooms,
            history: RoomBounds {
                max_len: config.history_size,
                max_bytes: config.history_room_bytes,
                ttl_ms: u64::try_from(config.history_ttl.as_millis()).unwrap_or(u64::MAX),
            },
            history_budget: config.history_total_bytes / config.shards.max(1),
            publish_per_room: config.publish_per_room,
            compression_threshold: config.compression_threshold,
            max_recovery_bytes: config.max_queued_bytes / 2,
            shared: config.redis.is_some(),
        }
    }
}

/// A connected user as its personal room's home sees it (SPEC §5: the owner is in the room while
/// connected, so the home keeps no count of its own for the owner).
#[derive(Debug, Clone)]
pub(crate) struct OnlineUser {
    pub(crate) name: Arc<str>,
    pub(crate) conns: u32,
    /// The shards holding its connections, ascending, without repeats.
    pub(crate) shards: Vec<usize>,
}

/// Where a resuming client left a room (SPEC §7).
#[derive(Debug, Clone)]
pub(crate) struct ResumeFrom {
    /// The last `seq` the client saw.
    pub(crate) seq: u64,
    /// The `epoch` it saw it in.
    pub(crate) epoch: String,
    /// For a room the new connection already joined: its join `seq`, past which it is already
    /// receiving live messages (so recovery stops there: no duplicate).
    pub(crate) upto: Option<u64>,
    /// Whether the session was found, unexpired and of the same user.
    pub(crate) valid: bool,
}

/// The answer to a resuming join.
#[derive(Debug)]
pub(crate) enum Recovery {
    /// Every missed message, in order.
    Recovered(Vec<Arc<StoredMessage>>),
    /// History no longer covers the gap, or the epoch differs: the client must reload.
    Lost,
}

/// A connection asking to be counted in a room.
#[derive(Debug, Clone)]
pub(crate) struct JoinRequest<'a> {
    pub(crate) room: &'a RoomId,
    pub(crate) user: &'a Arc<str>,
    pub(crate) name: &'a Arc<str>,
    /// The shard that holds the connection.
    pub(crate) shard: usize,
    pub(crate) key: FrameKey,
    /// Whether the join's answer tells the client the room's presence (an explicit join).
    pub(crate) wants_presence: bool,
    /// The connection is already counted (a resume of a room it holds).
    pub(crate) already: bool,
    pub(crate) resume: Option<&'a ResumeFrom>,
    /// A persistent room's current settings (`None` for ephemeral and personal rooms).
    pub(crate) settings: Option<&'a RoomSettings>,
}

impl JoinRequest<'_> {
    /// Whether [`RoomCore::join`] needs to know where a personal room's owner is connected: for
    /// the owner's own join only when its answer names the room's state, for another user (an
    /// admin) always; never for other rooms. Asking costs a look into a shared map, which the
    /// initial join at every connect must not pay.
    pub(crate) fn needs_owner(&self) -> bool {
        match owner_of(self.room) {
            None => false,
            Some(owner) if owner == &**self.user => self.wants_presence || self.resume.is_some(),
            Some(_) => true,
        }
    }
}

/// A counted join.
#[derive(Debug)]
pub(crate) struct JoinAnswer {
    /// The room's `seq` when the join was counted.
    pub(crate) seq: u64,
    /// The room's epoch as clients see it (empty for a personal room with no state yet).
    pub(crate) epoch: Arc<str>,
    /// The room's presence, when asked for.
    pub(crate) presence: Vec<PresenceEntry>,
    /// For a resuming join: the missed messages, or that they are lost.
    pub(crate) recovery: Option<Recovery>,
}

/// A join refused: the error for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) code: ErrorCode,
    pub(crate) message: &'static str,
}

pub(super) const fn refused(code: ErrorCode, message: &'static str) -> Refused {
    Refused { code, message }
}

/// Frames for every shard in `targets`.
#[derive(Debug)]
pub(crate) struct Fanout {
    pub(crate) targets: Vec<usize>,
    pub(crate) delivery: Delivery,
}

/// A message published to a room, before it has a `seq`.
#[derive(Debug)]
pub(crate) struct NewMessage<'a> {
    pub(crate) room: RoomId,
    /// The publisher's user id and name.
    pub(crate) user: &'a Arc<str>,
    pub(crate) name: &'a Arc<str>,
    pub(crate) data: Value,
    /// The custom event it is published as (SPEC §8).
    pub(crate) event: Option<protocol::envelope::EventName>,
}

/// A message that entered a room.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) seq: u64,
    pub(crate) fanout: Fanout,
    /// Messages dropped from the shard's histories to keep within its byte budget.
    pub(crate) evicted: usize,
}

/// The owner of `room` when it is a personal room.
pub(crate) fn owner_of(room: &RoomId) -> Option<&str> {
    room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX)
}
