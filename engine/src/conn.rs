//! One live WebSocket connection's state on its shard: identity, joined rooms, rate buckets, the
//! partial frame of a read, and its outbound side (queued and written by [`crate::writer`]). Every
//! idle connection carries this struct, so rarely used state is boxed on first use. Nothing here
//! decodes client input or writes to the socket.

use std::cell::{Cell, RefCell};
use std::net::IpAddr;

use protocol::CloseCode;
use protocol::envelope::{RoomId, Value};
use protocol::ws;

use crate::auth::Identity;
use crate::frames::FrameKey;
use crate::limits::Bucket;
use crate::sys::Shutdown;
use crate::transport::{Stream, Transport};
use crate::writer::{Outbound, Outlet};

/// A connection id: the shard in the top 16 bits, a per-shard counter below. Never reused.
pub(crate) type ConnId = u64;

pub(crate) fn shard_of(id: ConnId) -> usize {
    (id >> 48) as usize
}

/// Membership state of one room on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Membership {
    /// The home shard has not answered yet.
    Pending,
    /// In the room since the room's `seq` was this: receives its messages.
    Joined(u64),
}

/// A `resume` waiting for its rooms' homes to answer.
#[derive(Debug)]
pub(crate) struct PendingResume {
    pub(crate) id: Option<u64>,
    pub(crate) waiting: Vec<RoomId>,
    pub(crate) results: Vec<(RoomId, bool)>,
}

pub(crate) struct Conn {
    pub(crate) id: ConnId,
    pub(crate) key: FrameKey,
    /// Read by the shard's reader and written by the writer.
    stream: Stream,
    /// What waits to be written, and the close decided (see [`crate::writer`]).
    pub(crate) outbound: Outbound,
    /// Whether the peer went away without a close handshake (drives presence's 5 s delay later).
    pub(crate) abnormal: Cell<bool>,
    pub(crate) identity: RefCell<Identity>,
    pub(crate) ip: IpAddr,
    pub(crate) rooms: RefCell<Vec<(RoomId, Membership)>>,
    /// When a frame last arrived and a ping last went out, as [`crate::clock::monotonic_ms32`].
    pub(crate) last_seen_ms: Cell<u32>,
    pub(crate) last_ping_ms: Cell<u32>,
    pub(crate) refresh_warned: Cell<bool>,
    /// The `Origin` it upgraded with, as an index into its shard's interned origins plus one
    /// (0: none, `u16::MAX`: not kept); an origin no longer allowed closes it with 4503.
    pub(crate) origin: Cell<u16>,
    /// Initial joins (default rooms, personal room) still unanswered.
    pub(crate) pending_initial: Cell<u16>,
    /// Bytes read but not yet a whole frame, and a fragmented message in progress; made only
    /// while there are some (a whole frame per read is the usual case).
    partial: Cell<Option<Box<PartialRead>>>,
    /// The personal room's membership (see [`Conn::membership`]): the room's `seq` when the
    /// initial join was answered, [`PERSONAL_PENDING`] until then, [`NO_PERSONAL_ROOM`] when
    /// the user id makes no valid room id. The personal room is in no room list: its owner is in
    /// it while connected (SPEC §5), and an idle connection carries nothing more for it.
    personal: Cell<u64>,
    /// What most connections never need, boxed on first use (see [`Rare`]). Every idle
    /// connection carries this struct: with its `Rc` header it must stay within 248 bytes, the
    /// allocator's 256-byte class (measured: each step past a class costs the whole step).
    rare: Cell<Option<Box<Rare>>>,
}

/// What a connection has read that is not yet a whole message.
pub(crate) struct PartialRead {
    pub(crate) decoder: ws::MessageDecoder,
    pub(crate) pending: Vec<u8>,
}

/// A connection's rarely used state: made on the first rate-limited op, read-only room, publish
/// held behind a join, or resume, and dropped again once empty.
#[derive(Default)]
pub(crate) struct Rare {
    /// Rate buckets (publish, join, query), made full on the first limited attempt (exactly
    /// what buckets made at connect would hold by then).
    pub(crate) buckets: Option<[Bucket; 3]>,
    /// Joined persistent rooms where this user may read but not publish.
    read_only: Vec<RoomId>,
    /// Publishes waiting for their room's join to be answered.
    held: Vec<HeldPublish>,
    /// A `resume` waiting for its rooms' homes.
    pub(crate) resume: Option<Box<PendingResume>>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        self.buckets.is_none()
            && self.read_only.is_empty()
            && self.held.is_empty()
            && self.resume.is_none()
    }
}

/// [`Conn::personal`] while the initial join of the personal room is unanswered.
const PERSONAL_PENDING: u64 = u64::MAX;
/// [`Conn::personal`] of a user whose id makes no valid room id.
const NO_PERSONAL_ROOM: u64 = u64::MAX - 1;

/// A publish sent while its room's join was still unanswered. It waits for the answer rather than
/// going to the room at once, so that a refused join (`room_full`, `forbidden`) cannot let a
/// non-member publish; a client may still pipeline `join` and `publish` without waiting.
#[derive(Debug)]
pub(crate) struct HeldPublish {
    /// The trace of the request that sent it.
    pub(crate) trace: u64,
    pub(crate) room: RoomId,
    pub(crate) data: Value,
    /// The custom event it is published as (SPEC §8).
    pub(crate) event: Option<protocol::envelope::EventName>,
    pub(crate) id: Option<u64>,
}

/// Publishes one connection may have waiting for joins; more are answered `rate_limited`.
const MAX_HELD_PUBLISHES: usize = 64;

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// What a new connection is made of.
pub(crate) struct ConnParts {
    pub(crate) id: ConnId,
    pub(crate) key: FrameKey,
    pub(crate) stream: Stream,
    pub(crate) identity: Identity,
    pub(crate) ip: IpAddr,
    pub(crate) origin: u16,
}

impl Conn {
    pub(crate) fn new(parts: ConnParts) -> Self {
        let now = crate::clock::monotonic_ms32();
        let personal_room_valid = RoomId::personal_is_valid(&parts.identity.user_id);
        Self {
            id: parts.id,
            key: parts.key,
            stream: parts.stream,
            outbound: Outbound::default(),
            abnormal: Cell::new(false),
            identity: RefCell::new(parts.identity),
            ip: parts.ip,
            rooms: RefCell::new(Vec::new()),
            last_seen_ms: Cell::new(now),
            last_ping_ms: Cell::new(now),
            refresh_warned: Cell::new(false),
            origin: Cell::new(parts.origin),
            pending_initial: Cell::new(0),
            partial: Cell::new(None),
            personal: Cell::new(if personal_room_valid {
                PERSONAL_PENDING
            } else {
                NO_PERSONAL_ROOM
            }),
            rare: Cell::new(None),
        }
    }

    /// Takes what an earlier read left unfinished.
    pub(crate) fn take_partial(&self) -> Option<Box<PartialRead>> {
        self.partial.take()
    }

    /// Keeps what this read left unfinished, if anything.
    pub(crate) fn keep_partial(&self, partial: Box<PartialRead>) {
        if partial.decoder.in_message() || !partial.pending.is_empty() {
            self.partial.set(Some(partial));
        }
    }

    /// Runs `f` on the rare state, making it first.
    pub(crate) fn with_rare<R>(&self, f: impl FnOnce(&mut Rare) -> R) -> R {
        let mut rare = self.rare.take().unwrap_or_default();
        let result = f(&mut rare);
        if !rare.is_empty() {
            self.rare.set(Some(rare));
        }
        result
    }

    /// Runs `f` on the rare state when it exists (without making it).
    fn peek_rare<R>(&self, f: impl FnOnce(&mut Rare) -> R) -> Option<R> {
        let mut rare = self.rare.take()?;
        let result = f(&mut rare);
        if !rare.is_empty() {
            self.rare.set(Some(rare));
        }
        Some(result)
    }

    /// Whether a `resume` is waiting for answers.
    pub(crate) fn resume_pending(&self) -> bool {
        self.peek_rare(|r| r.resume.is_some()).unwrap_or(false)
    }

    /// Whether a pending `resume` waits for `room`.
    pub(crate) fn resume_waits_for(&self, room: &RoomId) -> bool {
        self.peek_rare(|r| r.resume.as_ref().is_some_and(|p| p.waiting.contains(room)))
            .unwrap_or(false)
    }

    /// Records `room`'s outcome in the pending `resume`; returns the resume once every room has
    /// answered.
    pub(crate) fn resume_answered(
        &self,
        room: &RoomId,
        recovered: bool,
    ) -> Option<Box<PendingResume>> {
        self.peek_rare(|rare| {
            let p = rare.resume.as_mut()?;
            let pos = p.waiting.iter().position(|r| r == room)?;
            p.waiting.remove(pos);
            p.results.push((room.clone(), recovered));
            if p.waiting.is_empty() {
                rare.resume.take()
            } else {
                None
            }
        })
        .flatten()
    }

    /// The session id given in `welcome` (and the Socket.IO `sid`), formatted when asked for so
    /// that an idle connection does not carry the string.
    pub(crate) fn session(&self, instance: &str) -> String {
        format!("c_{instance}{:x}", self.id)
    }

    pub(crate) fn stream(&self) -> &Stream {
        &self.stream
    }

    pub(crate) fn user_id(&self) -> std::sync::Arc<str> {
        self.identity.borrow().user_id.clone()
    }

    pub(crate) fn username(&self) -> std::sync::Arc<str> {
        self.identity.borrow().username.clone()
    }

    pub(crate) fn membership(&self, room: &RoomId) -> Option<Membership> {
        if self.is_own_personal(room) {
            return match self.personal.get() {
                NO_PERSONAL_ROOM => None,
                PERSONAL_PENDING => Some(Membership::Pending),
                seq => Some(Membership::Joined(seq)),
            };
        }
        self.rooms
            .borrow()
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, m)| *m)
    }

    /// Whether `room` is this connection's user's personal room.
    pub(crate) fn is_own_personal(&self, room: &RoomId) -> bool {
        room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX)
            == Some(&*self.identity.borrow().user_id)
    }

    /// This user's personal room, when its id is valid.
    pub(crate) fn personal_room(&self) -> Option<RoomId> {
        if self.personal.get() == NO_PERSONAL_ROOM {
            return None;
        }
        RoomId::personal(&self.identity.borrow().user_id).ok()
    }

    /// Records the answer to the personal room's initial join; false when it was answered before.
    pub(crate) fn personal_joined(&self, seq: u64) -> bool {
        if self.personal.get() != PERSONAL_PENDING {
            return false;
        }
        // A seq this large cannot happen (one per message); kept below the markers regardless.
        self.personal.set(seq.min(NO_PERSONAL_ROOM - 1));
        true
    }

    /// Whether messages of the personal room reach this connection (its join was answered).
    pub(crate) fn receives_personal(&self) -> bool {
        !matches!(self.personal.get(), PERSONAL_PENDING | NO_PERSONAL_ROOM)
    }

    /// Rooms joined or joining, the personal room included (SPEC §4: every joined room counts
    /// toward `max_rooms_per_connection`).
    pub(crate) fn room_count(&self) -> usize {
        self.rooms.borrow().len() + usize::from(self.personal.get() != NO_PERSONAL_ROOM)
    }

    /// Holds a publish until its room's join is answered; false when too many already wait.
    pub(crate) fn hold_publish(&self, publish: HeldPublish) -> bool {
        self.with_rare(|rare| {
            let has_space = rare.held.len() < MAX_HELD_PUBLISHES;
            if has_space {
                rare.held.push(publish);
            }
            has_space
        })
    }

    /// Takes the publishes held for `room` (every room with `None`), in the order they were sent.
    pub(crate) fn take_held(&self, room: Option<&RoomId>) -> Vec<HeldPublish> {
        self.peek_rare(|rare| {
            let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut rare.held)
                .into_iter()
                .partition(|p| room.is_none_or(|r| p.room == *r));
            rare.held = kept;
            taken
        })
        .unwrap_or_default()
    }

    /// Whether this user may read `room` but not publish in it.
    pub(crate) fn is_read_only(&self, room: &RoomId) -> bool {
        self.peek_rare(|rare| rare.read_only.contains(room))
            .unwrap_or(false)
    }

    /// Records whether this user may only read `room`.
    pub(crate) fn set_read_only(&self, room: &RoomId, read_only: bool) {
        if read_only {
            self.with_rare(|rare| {
                if !rare.read_only.contains(room) {
                    rare.read_only.push(room.clone());
                }
            });
        } else {
            self.peek_rare(|rare| rare.read_only.retain(|r| r != room));
        }
    }

    /// Bytes queued and not yet handed to the kernel.
    pub(crate) fn backlog(&self) -> usize {
        self.outbound.backlog()
    }

    /// The close code, once a close has been decided.
    pub(crate) fn closing(&self) -> Option<CloseCode> {
        self.outbound.closing()
    }

    /// Cuts the socket at once (the reader sees EOF and cleans up).
    pub(crate) fn abort(&self) {
        self.stream.shutdown(Shutdown::Both);
    }
}

impl Outlet for Conn {
    fn outbound(&self) -> &Outbound {
        &self.outbound
    }

    fn socket(&self) -> &Stream {
        &self.stream
    }

    fn speaks_socketio(&self) -> bool {
        self.key == FrameKey::SocketIo
    }

    fn write_failed(&self) {
        self.abnormal.set(true);
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    /// Every idle connection carries a `Conn` in an `Rc`: 16 bytes of counts, and the whole must
    /// stay within the allocator's 256-byte class (see the `rare` field).
    #[test]
    fn a_connection_fits_the_256_byte_class() {
        assert!(size_of::<super::Conn>() + 16 <= 248);
    }
}
