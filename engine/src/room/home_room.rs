//! One room as its home shard keeps it: members per shard and per wire format, `max_members`,
//! presence and the diff waiting for the next flush, history and the publish bucket; and the rules
//! that read one room alone (its presence answer, the resume decision). Plain data, used by
//! [`super::RoomCore`].

use std::collections::HashMap;
use std::sync::Arc;

use protocol::envelope::{PresenceEntry, RoomId};

use super::history::{HistoryRooms, RoomBounds, RoomHistory, StoredMessage};
use super::presence::{PresenceDiff, PresenceTable};
use super::types::{OnlineUser, Recovery, ResumeFrom, RoomRules};
use crate::frames::FRAME_KEYS;
use crate::limits::Bucket;
use crate::rooms::RoomSettings;

/// A room as its home shard knows it.
pub(crate) struct HomeRoom {
    pub(super) seq: u64,
    /// Names this history's lifetime (see [`RoomCore::epoch_name`]).
    pub(super) epoch: u64,
    /// The epoch the shared broker names (several nodes), which then wins over `epoch`.
    pub(super) shared_epoch: Option<Arc<str>>,
    pub(super) members: u32,
    pub(super) max_members: u32,
    /// Members per shard: where to deliver.
    pub(super) shard_members: Box<[u32]>,
    /// Members per wire format: what to encode.
    pub(super) key_counts: [u32; FRAME_KEYS],
    pub(super) presence: PresenceTable,
    /// Net presence changes since the last flush: user → (name, joined?).
    /// Boxed, made on the first change: most rooms have none waiting, and every room carries
    /// this field's size.
    pub(super) pending_diff: Option<Box<PresenceDiff>>,
    /// Listed in `presence_dirty` (once, however long a flush is put off).
    pub(super) presence_listed: bool,
    /// Ephemeral rooms vanish with their last member.
    pub(super) ephemeral: bool,
    /// Presence diffs kept and sent (a persistent room may switch them off).
    pub(super) presence_on: bool,
    /// History kept (a persistent room may switch it off).
    pub(super) history_on: bool,
    /// Made on the first publish: many rooms (every idle personal room) never see one.
    pub(super) traffic: Option<Box<Traffic>>,
}

/// A room's history and publish bucket.
pub(super) struct Traffic {
    pub(super) history: RoomHistory,
    /// Tells this room's entry in the shard's eviction order from one of an earlier room of the
    /// same id.
    pub(super) generation: u64,
    /// Made full on the first publish, which is what a bucket made with the room would be by
    /// then (it refills up to its capacity).
    pub(super) publish_bucket: Bucket,
}

/// The rooms of one shard, by id. Boxed: the map holds thousands of (personal) rooms, and its
/// spare buckets stay small.
pub(super) type Rooms = HashMap<RoomId, Box<HomeRoom>>;

impl HistoryRooms for Rooms {
    fn history_of(&mut self, room: &RoomId, generation: u64) -> Option<&mut RoomHistory> {
        let traffic = self.get_mut(room)?.traffic.as_mut()?;
        (traffic.generation == generation).then_some(&mut traffic.history)
    }
}

impl HomeRoom {
    pub(super) fn new(rules: &RoomRules, epoch: u64, ephemeral: bool) -> Self {
        Self {
            seq: 0,
            epoch,
            shared_epoch: None,
            members: 0,
            max_members: rules.max_room_members,
            shard_members: vec![0; rules.shards].into_boxed_slice(),
            key_counts: [0; FRAME_KEYS],
            presence: PresenceTable::default(),
            pending_diff: None,
            presence_listed: false,
            ephemeral,
            presence_on: true,
            history_on: true,
            traffic: None,
        }
    }

    /// A persistent room's current settings (they may have changed since the last join).
    pub(super) fn apply(&mut self, settings: &RoomSettings) {
        self.ephemeral = false;
        self.max_members = settings.max_members;
        self.presence_on = settings.presence;
        self.history_on = settings.history;
        if !settings.history
            && let Some(traffic) = self.traffic.as_mut()
        {
            traffic.history.clear();
        }
        if !settings.presence {
            self.pending_diff = None;
        }
    }

    /// The shards that hold members: where a delivery goes.
    pub(super) fn member_shards(&self) -> Vec<usize> {
        self.shard_members
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(s, _)| s)
            .collect()
    }

    /// Records a presence change; true when the room must be listed for the next flush.
    pub(super) fn note_presence(&mut self, user: &Arc<str>, name: &Arc<str>, joined: bool) -> bool {
        let diff = self.pending_diff.get_or_insert_default();
        match diff.get(user) {
            // A join and a leave within one window cancel out.
            Some((_, was_joined)) if *was_joined != joined => {
                diff.remove(user);
            }
            _ => {
                diff.insert(user.clone(), (name.clone(), joined));
            }
        }
        !std::mem::replace(&mut self.presence_listed, true)
    }

    /// The messages kept, oldest first.
    pub(super) fn history(&self) -> impl Iterator<Item = &Arc<StoredMessage>> {
        self.traffic.iter().flat_map(|t| t.history.iter())
    }

    /// Drops what the room's bounds no longer allow at `now` (before answering from history).
    pub(super) fn prune_history(&mut self, now: u64, bounds: RoomBounds) {
        if let Some(traffic) = self.traffic.as_mut() {
            traffic.history.prune(bounds, now);
        }
    }
}

/// A room's presence, sorted by user: its counted members, plus a personal room's connected owner.
pub(super) fn presence_entries(
    home: Option<&HomeRoom>,
    owner: Option<(&str, &OnlineUser)>,
) -> Vec<PresenceEntry> {
    let mut list = home.map(|h| h.presence.entries()).unwrap_or_default();
    if let Some((user, online)) = owner {
        list.push(PresenceEntry {
            user: user.to_owned(),
            name: online.name.to_string(),
            conns: online.conns,
        });
        list.sort_by(|a, b| a.user.cmp(&b.user));
    }
    list
}

/// The messages a resuming client missed in `home`, if history still holds all of them and,
/// together, no more than `max_bytes` (what is recovered goes to the connection's queue at once:
/// past half its bound it would close the connection as a slow consumer, so the client is told to
/// reload instead).
pub(super) fn recover(
    home: &mut HomeRoom,
    from: &ResumeFrom,
    epoch: &str,
    bounds: RoomBounds,
    max_bytes: usize,
    now: u64,
) -> Recovery {
    if !from.valid || from.epoch != epoch {
        return Recovery::Lost;
    }
    let first = from.seq.saturating_add(1);
    let last = from.upto.unwrap_or(home.seq).min(home.seq);
    if first > last {
        return Recovery::Recovered(Vec::new());
    }
    home.prune_history(now, bounds);
    match home.history().next() {
        Some(oldest) if oldest.seq <= first => {
            let missed: Vec<Arc<StoredMessage>> = home
                .history()
                .filter(|m| m.seq >= first && m.seq <= last)
                .cloned()
                .collect();
            let bytes: usize = missed.iter().map(|m| m.cost()).sum();
            if bytes > max_bytes {
                Recovery::Lost
            } else {
                Recovery::Recovered(missed)
            }
        }
        _ => Recovery::Lost,
    }
}
