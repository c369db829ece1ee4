//! The rooms homed on one shard, sans-IO (SPEC §4–§7): the one place where a room's `seq` is
//! assigned, its history kept, its member count checked against `max_members`, its publish rate
//! limited and its presence aggregated. Every join, leave and publish of a room passes here in
//! mailbox order, which is what gives every member the same order without a lock.
//!
//! [`RoomCore`] is plain data: each operation takes what it needs (the time, the connected owner
//! of a personal room, a compressor to encode with) and returns what must happen — the answer to
//! the connection, and the frames to hand to each shard holding members. It has no runtime, no
//! shard and no mailbox; `home` feeds it and carries its answers out. It must not read clocks,
//! shared maps or sockets itself.
//!
//! A personal room (SPEC §5) holds its owner whenever the owner is connected, so its home never
//! counts the owner: the caller says where the owner's connections are ([`OnlineUser`]), and the
//! core keeps state for the room only once a message, a history query, a resume, an explicit join
//! or another member (an admin) needs it. An idle user costs its home nothing.

pub(crate) mod history;
mod home_room;
mod presence;
mod types;

pub(crate) use types::owner_of;
use types::refused;
pub(crate) use types::{
    Fanout, JoinAnswer, JoinRequest, NewMessage, OnlineUser, Published, Recovery, Refused,
    ResumeFrom, RoomRules,
};

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use protocol::ErrorCode;
use protocol::compression::Compressor;
use protocol::envelope::{MessageRecord, PresenceEntry, PresenceUser, Push, RoomId};
use protocol::socketio;

use crate::frames::{Delivery, FRAME_KEYS, FrameKey, Frames};
use crate::limits::{Bucket, Verdict};
use crate::rooms::RoomSettings;
use history::{EvictionOrder, HistoryLedger, RoomHistory, StoredMessage};
use home_room::{HomeRoom, Rooms, Traffic, presence_entries, recover};

/// The rooms homed on one shard.
pub(crate) struct RoomCore {
    rules: RoomRules,
    /// This process's instance: epochs are named after it, so they change with a restart.
    instance: Arc<str>,
    rooms: Rooms,
    /// Epochs made here: the shard in the top 16 bits, a counter below (unique in the process).
    next_epoch: u64,
    /// The bytes the histories of these rooms hold.
    ledger: Rc<HistoryLedger>,
    /// These rooms by their oldest kept message (TTL and byte budget drop from there).
    eviction: EvictionOrder,
    next_generation: u64,
    /// Rooms with presence changes waiting for the next flush (a room may be listed twice).
    presence_dirty: Vec<RoomId>,
}

impl RoomCore {
    /// The rooms of shard `shard` of the process instance `instance`.
    pub(crate) fn new(shard: usize, rules: RoomRules, instance: Arc<str>) -> Self {
        Self {
            rules,
            instance,
            rooms: HashMap::new(),
            next_epoch: (shard as u64) << 48,
            ledger: Rc::new(HistoryLedger::default()),
            eviction: EvictionOrder::default(),
            next_generation: 0,
            presence_dirty: Vec::new(),
        }
    }

    /// A fresh epoch number (for a new room, or a history answer on an unknown room).
    fn new_epoch(&mut self) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        epoch
    }

    /// An epoch as clients see it: this process's instance, then the number in hex. Rooms keep
    /// the number and name it only in answers (every idle room would carry the string).
    fn epoch_name(&self, epoch: u64) -> Arc<str> {
        Arc::from(format!("{}{epoch:x}", self.instance))
    }

    /// A room's epoch as clients see it: the shared broker's, else this process's.
    fn epoch_of(&self, home: &HomeRoom) -> Arc<str> {
        match &home.shared_epoch {
            Some(shared) => shared.clone(),
            None => self.epoch_name(home.epoch),
        }
    }

    fn new_room(&mut self, ephemeral: bool) -> Box<HomeRoom> {
        let epoch = self.new_epoch();
        Box::new(HomeRoom::new(&self.rules, epoch, ephemeral))
    }

    /// Brings up the state of personal room `room` if its owner is connected (the owner's last
    /// leave drops it again, see [`Self::leave`]); true when the room has state afterwards.
    fn bring_up_personal(&mut self, room: &RoomId, owner: Option<&OnlineUser>) -> bool {
        if self.rooms.contains_key(room) {
            return true;
        }
        if room.is_personal() && owner.is_some() {
            let home = self.new_room(true);
            self.rooms.insert(room.clone(), home);
            return true;
        }
        false
    }

    /// Counts a connection into a room (SPEC §5: permissions were checked by the caller;
    /// `max_members` and `implicit_rooms` are checked here). `owner` is the connected owner of a
    /// personal room (`None` for other rooms).
    pub(crate) fn join(
        &mut self,
        request: &JoinRequest<'_>,
        owner: Option<&OnlineUser>,
        now: u64,
    ) -> Result<JoinAnswer, Refused> {
        let room = request.room;
        let bounds = self.rules.history;
        if owner_of(room) == Some(&**request.user) {
            // The owner is never counted here (see the module doc). A join whose answer tells
            // the client the room's `seq` and `epoch` (an explicit join, a resume) brings the
            // room up, so that they stay true; the initial join at connect does not.
            if request.wants_presence || request.resume.is_some() {
                self.bring_up_personal(room, owner);
            }
            let presence = if request.wants_presence {
                presence_entries(
                    self.rooms.get(room).map(|h| &**h),
                    owner_of(room).zip(owner),
                )
            } else {
                Vec::new()
            };
            let max_bytes = self.rules.max_recovery_bytes;
            let epoch = self.rooms.get(room).map(|h| self.epoch_of(h));
            return Ok(match (self.rooms.get_mut(room), epoch) {
                (Some(home), Some(epoch)) => JoinAnswer {
                    seq: home.seq,
                    recovery: request
                        .resume
                        .map(|from| recover(home, from, &epoch, bounds, max_bytes, now)),
                    epoch,
                    presence,
                },
                // No state: nothing was ever published while the owner has been connected.
                _ => JoinAnswer {
                    seq: 0,
                    epoch: Arc::from(""),
                    presence,
                    recovery: None,
                },
            });
        }
        if !self.rooms.contains_key(room) {
            let open = if room.is_personal() {
                // Another user's personal room (an admin: checked before the join was sent)
                // exists while its owner is connected.
                self.bring_up_personal(room, owner)
            } else {
                request.settings.is_some() || self.rules.implicit_rooms
            };
            if !open {
                return Err(refused(ErrorCode::NotFound, "no such room"));
            }
            if !self.rooms.contains_key(room) {
                let home = self.new_room(true);
                self.rooms.insert(room.clone(), home);
            }
        }
        let max_bytes = self.rules.max_recovery_bytes;
        let instance = self.instance.clone();
        let Some(home) = self.rooms.get_mut(room) else {
            return Err(refused(ErrorCode::NotFound, "no such room"));
        };
        if let Some(settings) = request.settings {
            home.apply(settings);
        }
        if !request.already {
            if home.members >= home.max_members {
                if home.members == 0 && home.ephemeral {
                    self.rooms.remove(room);
                }
                return Err(refused(ErrorCode::RoomFull, "room is full"));
            }
            home.members += 1;
            home.shard_members[request.shard] += 1;
            home.key_counts[request.key.index()] += 1;
            let conns = home.presence.add(request.user, request.name);
            // A personal room has one possible member: its diffs would tell the owner only about
            // itself, so none are sent (the `presence` query still answers).
            // With a shared broker the diffs come from it, for the user's connections anywhere.
            if conns == 1
                && !self.rules.shared
                && !room.is_personal()
                && home.presence_on
                && home.note_presence(request.user, request.name, true)
            {
                self.presence_dirty.push(room.clone());
            }
        }
        let epoch: Arc<str> = match &home.shared_epoch {
            Some(shared) => shared.clone(),
            None => Arc::from(format!("{instance}{:x}", home.epoch)),
        };
        let recovery = request
            .resume
            .map(|from| recover(home, from, &epoch, bounds, max_bytes, now));
        let presence = if request.wants_presence {
            presence_entries(Some(home), owner_of(room).zip(owner))
        } else {
            Vec::new()
        };
        Ok(JoinAnswer {
            seq: home.seq,
            epoch,
            presence,
            recovery,
        })
    }

    /// Counts a connection out of a room. `owner_online` says whether a personal room's owner
    /// still has a connection (its room lasts while it does); it is asked only when that decides.
    pub(crate) fn leave(
        &mut self,
        room: &RoomId,
        shard: usize,
        user: &Arc<str>,
        name: &Arc<str>,
        key: FrameKey,
        owner_online: impl FnOnce() -> bool,
    ) {
        let Some(home) = self.rooms.get_mut(room) else {
            return;
        };
        let owner = owner_of(room);
        // A personal room's owner was never counted (see the module doc).
        if owner != Some(&**user) {
            home.members = home.members.saturating_sub(1);
            let s = &mut home.shard_members[shard];
            *s = s.saturating_sub(1);
            let k = &mut home.key_counts[key.index()];
            *k = k.saturating_sub(1);
            if home.presence.remove(user) == Some(0)
                && owner.is_none()
                && !self.rules.shared
                && home.presence_on
                && home.note_presence(user, name, false)
            {
                self.presence_dirty.push(room.clone());
            }
        }
        if home.members == 0 && home.ephemeral && (owner.is_none() || !owner_online()) {
            self.rooms.remove(room);
        }
    }

    /// Assigns the next `seq`, keeps history, and says where the message goes: the one place a
    /// message enters a room. `owner` is a personal room's connected owner.
    pub(crate) fn publish(
        &mut self,
        message: NewMessage<'_>,
        owner: Option<&OnlineUser>,
        now: u64,
        compressor: &mut Compressor,
    ) -> Result<Published, Refused> {
        let NewMessage {
            room,
            user,
            name,
            data,
            event,
        } = message;
        self.admit_publish(&room, owner, now)?;
        let Some(home) = self.rooms.get_mut(&room) else {
            return Err(refused(ErrorCode::NotJoined, "not joined to this room"));
        };
        let rules = &self.rules;
        home.seq += 1;
        let record = MessageRecord {
            room: room.clone(),
            seq: home.seq,
            from: Some(user.to_string()),
            name: name.to_string(),
            ts: now,
            data,
            event,
        };
        // The owner's connections are not counted by wire format: a personal room's message is
        // encoded in every format (such messages are rare; an idle user costs nothing instead).
        let in_use = if room.is_personal() {
            [1; FRAME_KEYS]
        } else {
            home.key_counts
        };
        let keep = rules.history.max_len > 0 && home.history_on;
        let (frames, kept) = Frames::message(
            &record,
            &in_use,
            rules.compression_threshold,
            compressor,
            keep,
        );
        // The decoded value is not kept: history holds the encoded message.
        drop(record);
        let mut listing = None;
        if let (Some((json, msgpack)), Some(traffic)) = (kept, home.traffic.as_mut()) {
            let stored = StoredMessage::new(home.seq, now, json, msgpack);
            if traffic.history.push(Arc::new(stored), rules.history, now) {
                listing = traffic
                    .history
                    .oldest_ts()
                    .map(|ts| (traffic.generation, ts));
            }
        }
        let seq = home.seq;
        let mut targets = home.member_shards();
        if let Some(owner) = owner {
            targets.extend(owner.shards.iter().copied());
            targets.sort_unstable();
            targets.dedup();
        }
        if let Some((generation, ts)) = listing {
            self.eviction
                .track(room.clone(), generation, ts, &mut self.rooms, &self.ledger);
        }
        let evicted = self.enforce_budget();
        Ok(Published {
            seq,
            fanout: Fanout {
                targets,
                delivery: Delivery {
                    room,
                    frames,
                    sheddable: false,
                },
            },
            evicted,
        })
    }

    /// A publish from the HTTP API: a persistent room that has no member yet is brought up here.
    /// `Ok(None)`: a personal room whose owner is offline — the message has nobody to reach, and
    /// there is no room to keep history in.
    pub(crate) fn publish_external(
        &mut self,
        message: NewMessage<'_>,
        settings: Option<&RoomSettings>,
        owner: Option<&OnlineUser>,
        now: u64,
        compressor: &mut Compressor,
    ) -> Result<Option<Published>, Refused> {
        let room = message.room.clone();
        match (self.rooms.get_mut(&room), settings) {
            (Some(home), Some(s)) => home.apply(s),
            (None, Some(s)) => {
                let mut home = self.new_room(false);
                home.apply(s);
                self.rooms.insert(room.clone(), home);
            }
            (None, None) => {
                if !self.bring_up_personal(&room, owner) {
                    return Ok(None);
                }
            }
            (Some(_), None) => {}
        }
        self.publish(message, owner, now, compressor).map(Some)
    }

    /// Whether a message may enter `room` — the room is held here (or is the personal room of a
    /// connected `owner`, brought up if needed) and its publish rate allows it. [`Self::publish`]
    /// asks it first; with a shared broker it is asked alone and the broker assigns the `seq`
    /// (the message comes back through [`Self::deliver_shared`]).
    pub(crate) fn admit_publish(
        &mut self,
        room: &RoomId,
        owner: Option<&OnlineUser>,
        now: u64,
    ) -> Result<(), Refused> {
        if owner.is_some() && !self.rooms.contains_key(room) {
            let home = self.new_room(true);
            self.rooms.insert(room.clone(), home);
        }
        let generation = self.next_generation;
        let Some(home) = self.rooms.get_mut(room) else {
            return Err(refused(ErrorCode::NotJoined, "not joined to this room"));
        };
        let rules = &self.rules;
        let traffic = home.traffic.get_or_insert_with(|| {
            Box::new(Traffic {
                history: RoomHistory::new(self.ledger.clone()),
                generation,
                publish_bucket: Bucket::new(&rules.publish_per_room, now),
            })
        });
        if traffic.generation == generation {
            self.next_generation += 1;
        }
        if traffic.publish_bucket.attempt(&rules.publish_per_room, now) != Verdict::Allow {
            return Err(refused(
                ErrorCode::RateLimited,
                "room publish rate exceeded",
            ));
        }
        Ok(())
    }

    /// With a shared broker: a message the broker sequenced (on any node) for `room`, encoded
    /// for the members held here (and a personal room's connected `owner`); `None` when nobody
    /// here is in the room. The room takes the message's `seq` and the broker's `epoch`.
    pub(crate) fn deliver_shared(
        &mut self,
        record: &MessageRecord,
        epoch: &Arc<str>,
        owner: Option<&OnlineUser>,
        compressor: &mut Compressor,
    ) -> Option<Fanout> {
        let room = &record.room;
        if owner.is_some() {
            self.bring_up_personal(room, owner);
        }
        let home = self.rooms.get_mut(room)?;
        home.seq = record.seq;
        if home.shared_epoch.as_ref() != Some(epoch) {
            home.shared_epoch = Some(epoch.clone());
        }
        let in_use = if room.is_personal() {
            [1; FRAME_KEYS]
        } else {
            home.key_counts
        };
        let mut targets = home.member_shards();
        if let Some(owner) = owner {
            targets.extend(owner.shards.iter().copied());
            targets.sort_unstable();
            targets.dedup();
        }
        if targets.is_empty() {
            return None;
        }
        let (frames, _) = Frames::message(
            record,
            &in_use,
            self.rules.compression_threshold,
            compressor,
            false,
        );
        Some(Fanout {
            targets,
            delivery: Delivery {
                room: room.clone(),
                frames,
                sheddable: false,
            },
        })
    }

    /// With a shared broker: a user joined or left `room` across nodes (its first connection
    /// anywhere, or its last), for the next presence flush of the members held here.
    pub(crate) fn note_shared_presence(
        &mut self,
        room: &RoomId,
        user: &Arc<str>,
        name: &Arc<str>,
        joined: bool,
    ) {
        let Some(home) = self.rooms.get_mut(room) else {
            return;
        };
        if home.presence_on && home.note_presence(user, name, joined) {
            self.presence_dirty.push(room.clone());
        }
    }

    /// With a shared broker: the broker is unreachable, so `room` goes on locally under an epoch
    /// of this process (a later resume across the gap answers `false`).
    /// True when the room switched now (it was following the broker).
    pub(crate) fn go_local(&mut self, room: &RoomId) -> bool {
        let following = self
            .rooms
            .get(room)
            .is_some_and(|h| h.shared_epoch.is_some());
        if following {
            let epoch = self.new_epoch();
            if let Some(home) = self.rooms.get_mut(room) {
                home.shared_epoch = None;
                home.epoch = epoch;
            }
        }
        following
    }

    /// The connections held here in `room`.
    pub(crate) fn local_members(&self, room: &RoomId) -> u32 {
        self.rooms.get(room).map_or(0, |h| h.members)
    }

    /// Whether `room` keeps presence diffs and history (a persistent room's settings as last
    /// applied here; on for rooms not held here).
    pub(crate) fn switches(&self, room: &RoomId) -> (bool, bool) {
        self.rooms
            .get(room)
            .map_or((true, true), |h| (h.presence_on, h.history_on))
    }

    /// Drops the oldest messages of these rooms while past this shard's history budget; returns
    /// how many.
    fn enforce_budget(&mut self) -> usize {
        let budget = self.rules.history_budget;
        let ledger = &self.ledger;
        if ledger.used() <= budget {
            return 0;
        }
        self.eviction
            .drop_oldest(&mut self.rooms, |_| ledger.used() > budget)
    }

    /// Drops every message older than `history_ttl`, in every room, idle or not.
    pub(crate) fn expire_history(&mut self, now: u64) {
        let ttl = self.rules.history.ttl_ms;
        self.eviction
            .drop_oldest(&mut self.rooms, |oldest| now.saturating_sub(oldest) > ttl);
    }

    /// Bytes the histories of these rooms hold.
    pub(crate) fn history_bytes(&self) -> usize {
        self.ledger.used()
    }

    /// A room's presence (its counted members, plus a personal room's connected `owner`).
    pub(crate) fn presence(&self, room: &RoomId, owner: Option<&OnlineUser>) -> Vec<PresenceEntry> {
        presence_entries(
            self.rooms.get(room).map(|h| &**h),
            owner_of(room).zip(owner),
        )
    }

    /// Messages with `seq > since` (at most `limit`, oldest first) and the room's epoch; an
    /// unknown room answers none with a fresh epoch.
    pub(crate) fn history(
        &mut self,
        room: &RoomId,
        since: u64,
        limit: u64,
        owner: Option<&OnlineUser>,
        now: u64,
    ) -> (Vec<Arc<StoredMessage>>, Arc<str>) {
        // The answer names the epoch: a personal room is brought up so that it stays true.
        self.bring_up_personal(room, owner);
        let bounds = self.rules.history;
        match self.rooms.get_mut(room) {
            Some(home) => {
                home.prune_history(now, bounds);
                let messages = home
                    .history()
                    .filter(|m| m.seq > since)
                    .take(usize::try_from(limit).unwrap_or(usize::MAX))
                    .cloned()
                    .collect();
                let (shared, number) = (home.shared_epoch.clone(), home.epoch);
                (messages, shared.unwrap_or_else(|| self.epoch_name(number)))
            }
            None => {
                let epoch = self.new_epoch();
                (Vec::new(), self.epoch_name(epoch))
            }
        }
    }

    /// Forgets a deleted room. Its members were kicked first; their leaves that arrive later
    /// find nothing and change nothing.
    pub(crate) fn drop_room(&mut self, room: &RoomId) {
        self.rooms.remove(room);
    }

    /// Drops the coalesced presence diffs of every room with changes, unsent (degraded mode:
    /// presence diffs are the first thing shed); returns how many rooms had one.
    pub(crate) fn drop_presence(&mut self) -> usize {
        let mut dropped = 0;
        for room in std::mem::take(&mut self.presence_dirty) {
            if let Some(home) = self.rooms.get_mut(&room) {
                home.presence_listed = false;
                if home.pending_diff.take().is_some_and(|d| !d.is_empty()) {
                    dropped += 1;
                }
            }
        }
        dropped
    }

    /// The coalesced presence diffs of the rooms with changes, as frames for their members'
    /// shards (SPEC §6). Every room listed is flushed (and unlisted).
    pub(crate) fn flush_presence(&mut self, compressor: &mut Compressor) -> Vec<Fanout> {
        let dirty = std::mem::take(&mut self.presence_dirty);
        let mut out = Vec::new();
        let mut sent: Vec<&RoomId> = Vec::new();
        for room in &dirty {
            if sent.contains(&room) {
                continue;
            }
            sent.push(room);
            let Some(home) = self.rooms.get_mut(room) else {
                continue;
            };
            home.presence_listed = false;
            // `take`: an idle room keeps no table.
            let Some(diff) = home.pending_diff.take().filter(|d| !d.is_empty()) else {
                continue;
            };
            let mut joined = Vec::new();
            let mut left = Vec::new();
            for (user, (name, is_join)) in *diff {
                let entry = PresenceUser {
                    user: user.to_string(),
                    name: name.to_string(),
                };
                if is_join {
                    joined.push(entry);
                } else {
                    left.push(entry);
                }
            }
            joined.sort_by(|a, b| a.user.cmp(&b.user));
            left.sort_by(|a, b| a.user.cmp(&b.user));
            let push = Push::Presence {
                room: room.as_str(),
                joined: &joined,
                left: &left,
            };
            let frames = Frames::push(
                &push,
                || socketio::encode_presence_event(room.as_str(), &joined, &left),
                &home.key_counts,
                self.rules.compression_threshold,
                compressor,
            );
            out.push(Fanout {
                targets: home.member_shards(),
                delivery: Delivery {
                    room: room.clone(),
                    frames,
                    sheddable: true,
                },
            });
        }
        out
    }

    /// Whether presence changes wait for a flush.
    pub(crate) fn presence_waiting(&self) -> bool {
        !self.presence_dirty.is_empty()
    }
}

#[cfg(test)]
mod tests;
