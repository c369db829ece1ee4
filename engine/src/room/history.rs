//! Room history kept as the encoded messages that were sent (SPEC §7), bounded per room (count,
//! age, bytes) and per shard (its share of `history_total_bytes`, oldest message of any room
//! dropped first). Plain data and the rules over it: no runtime, no shard, no I/O.
//!
//! A message is kept as its `message` push encoded in the wire formats its room's members used
//! (JSON and/or MessagePack; the broadcast frame's payload, shared, not copied). A reader of
//! another format gets it transcoded at query time, one message at a time, so a decoded value
//! tree (which may be ~35× the wire size for tiny nested arrays) is never kept. This module must
//! not hold decoded values or touch sockets.

use std::borrow::Cow;
use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use protocol::envelope::{DecodeLimits, Format, RoomId, decode_value, encode_value};

/// Bookkeeping counted per message beside its bytes (the record, its `Arc`, the queue slot).
pub(crate) const MESSAGE_OVERHEAD: usize = 96;

/// One message as history keeps it.
#[derive(Debug)]
pub(crate) struct StoredMessage {
    pub(crate) seq: u64,
    /// Publish time, epoch ms.
    pub(crate) ts: u64,
    /// The `message` push in JSON, when a JSON reader was there to send it to.
    json: Option<Bytes>,
    /// The `message` push in MessagePack, likewise (or when nobody needed JSON).
    msgpack: Option<Bytes>,
}

impl StoredMessage {
    /// A message kept in the encodings given (at least one).
    pub(crate) fn new(seq: u64, ts: u64, json: Option<Bytes>, msgpack: Option<Bytes>) -> Self {
        debug_assert!(json.is_some() || msgpack.is_some());
        Self {
            seq,
            ts,
            json,
            msgpack,
        }
    }

    /// What this message counts against the history bounds.
    pub(crate) fn cost(&self) -> usize {
        MESSAGE_OVERHEAD
            + self.json.as_ref().map_or(0, Bytes::len)
            + self.msgpack.as_ref().map_or(0, Bytes::len)
    }

    /// The `message` push in `format`: the kept bytes, or a transcoding of the other format.
    /// `max_depth` bounds the transcoding's decoder (`data` nests one level below the push).
    /// `None` only if a kept encoding does not decode, which would be a bug (logged by callers).
    pub(crate) fn encoded(&self, format: Format, max_depth: usize) -> Option<Cow<'_, [u8]>> {
        let (wanted, other, other_format) = match format {
            Format::Json => (&self.json, &self.msgpack, Format::MsgPack),
            Format::MsgPack => (&self.msgpack, &self.json, Format::Json),
        };
        if let Some(bytes) = wanted {
            return Some(Cow::Borrowed(bytes));
        }
        let limits = DecodeLimits {
            max_message_bytes: usize::MAX,
            max_depth: max_depth.saturating_add(1),
            max_resume_rooms: 0,
        };
        let value = decode_value(other.as_ref()?, other_format, &limits).ok()?;
        encode_value(&value, format).ok().map(Cow::Owned)
    }
}

/// A shard's account of the bytes its rooms' histories hold. Shared (`Rc`) by every
/// [`RoomHistory`] of the shard, which adds and removes its own bytes, so that no way of dropping
/// a room can leave the count wrong.
#[derive(Debug, Default)]
pub(crate) struct HistoryLedger {
    used: Cell<usize>,
    /// Histories listed in the shard's [`EvictionOrder`].
    listed: Cell<usize>,
}

impl HistoryLedger {
    /// Bytes held now.
    pub(crate) fn used(&self) -> usize {
        self.used.get()
    }

    fn add(&self, bytes: usize) {
        self.used.set(self.used.get().saturating_add(bytes));
    }

    fn sub(&self, bytes: usize) {
        self.used.set(self.used.get().saturating_sub(bytes));
    }
}

/// The bounds one room's history keeps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RoomBounds {
    /// Most messages (`history_size`).
    pub(crate) max_len: usize,
    /// Most bytes (`history_room_bytes`).
    pub(crate) max_bytes: usize,
    /// Oldest age in ms (`history_ttl`).
    pub(crate) ttl_ms: u64,
}

/// One room's messages, oldest first, with their cost counted in the shard's ledger.
#[derive(Debug)]
pub(crate) struct RoomHistory {
    messages: VecDeque<Arc<StoredMessage>>,
    bytes: usize,
    /// Has its entry in the shard's [`EvictionOrder`].
    listed: bool,
    ledger: Rc<HistoryLedger>,
}

impl Drop for RoomHistory {
    fn drop(&mut self) {
        self.ledger.sub(self.bytes);
        self.unlist();
    }
}

impl RoomHistory {
    pub(crate) fn new(ledger: Rc<HistoryLedger>) -> Self {
        Self {
            messages: VecDeque::new(),
            bytes: 0,
            listed: false,
            ledger,
        }
    }

    /// Appends a message, then drops from the front what the room's bounds no longer allow at
    /// `now`. True when the room must be listed in the shard's eviction order (it holds messages
    /// and has no entry there): the caller calls [`EvictionOrder::track`].
    pub(crate) fn push(
        &mut self,
        message: Arc<StoredMessage>,
        bounds: RoomBounds,
        now: u64,
    ) -> bool {
        let cost = message.cost();
        self.bytes += cost;
        self.ledger.add(cost);
        self.messages.push_back(message);
        self.prune(bounds, now);
        if self.listed || self.messages.is_empty() {
            return false;
        }
        self.listed = true;
        self.ledger.listed.set(self.ledger.listed.get() + 1);
        true
    }

    /// Its entry left the eviction order.
    fn unlist(&mut self) {
        if std::mem::take(&mut self.listed) {
            self.ledger
                .listed
                .set(self.ledger.listed.get().saturating_sub(1));
        }
    }

    /// Drops from the front the messages past `max_len`, past `max_bytes` or older than the
    /// TTL at `now`.
    pub(crate) fn prune(&mut self, bounds: RoomBounds, now: u64) {
        while self.messages.len() > bounds.max_len
            || self.bytes > bounds.max_bytes
            || self
                .messages
                .front()
                .is_some_and(|m| now.saturating_sub(m.ts) > bounds.ttl_ms)
        {
            if self.pop_oldest().is_none() {
                break;
            }
        }
    }

    /// Drops the oldest message; returns its cost.
    pub(crate) fn pop_oldest(&mut self) -> Option<usize> {
        let message = self.messages.pop_front()?;
        let cost = message.cost();
        self.bytes -= cost;
        self.ledger.sub(cost);
        Some(cost)
    }

    /// Drops everything (history switched off for the room).
    pub(crate) fn clear(&mut self) {
        self.ledger.sub(self.bytes);
        self.bytes = 0;
        self.messages.clear();
    }

    /// The publish time of the oldest message.
    pub(crate) fn oldest_ts(&self) -> Option<u64> {
        self.messages.front().map(|m| m.ts)
    }

    /// The messages, oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<StoredMessage>> {
        self.messages.iter()
    }

    /// Bytes counted for this room.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

/// The shard's order of rooms by their oldest kept message: what the TTL sweep and the per-shard
/// byte budget drop first. One entry per room with history (`generation` tells a room from a
/// later one of the same id); an entry's time is at most the room's oldest message's (fronts only
/// get newer), and a stale entry is corrected when it comes to the top.
#[derive(Debug, Default)]
pub(crate) struct EvictionOrder {
    heap: BinaryHeap<Reverse<(u64, u64, RoomId)>>,
}

/// What the eviction order asks of the room that holds an entry.
pub(crate) trait HistoryRooms {
    /// The history of `room` if the room is still generation `generation`.
    fn history_of(&mut self, room: &RoomId, generation: u64) -> Option<&mut RoomHistory>;
}

impl EvictionOrder {
    /// Lists a room whose [`RoomHistory::push`] asked for it, oldest message at `ts`. When
    /// entries of rooms that are gone (dropped with their history) pile up past twice the listed
    /// rooms, they are cleared out at once (rooms may come and go far faster than their entries
    /// would reach the top).
    pub(crate) fn track(
        &mut self,
        room: RoomId,
        generation: u64,
        ts: u64,
        rooms: &mut impl HistoryRooms,
        ledger: &HistoryLedger,
    ) {
        self.heap.push(Reverse((ts, generation, room)));
        if self.heap.len() > 2 * ledger.listed.get() + 64 {
            self.heap.retain(|Reverse((_, generation, room))| {
                rooms
                    .history_of(room, *generation)
                    .is_some_and(|h| h.listed)
            });
        }
    }

    /// Entries listed (at most one per room with history, plus stale ones on their way out).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len()
    }

    /// Drops messages oldest first, across rooms, while `drop_more` says so (given the ledger's
    /// bytes and the oldest remaining message's time). Returns how many messages were dropped.
    pub(crate) fn drop_oldest(
        &mut self,
        rooms: &mut impl HistoryRooms,
        mut drop_more: impl FnMut(u64) -> bool,
    ) -> usize {
        let mut dropped = 0;
        while let Some(Reverse((ts, generation, room))) = self.heap.pop() {
            let Some(history) = rooms.history_of(&room, generation) else {
                continue;
            };
            let Some(oldest) = history.oldest_ts() else {
                history.unlist();
                continue;
            };
            if oldest != ts {
                // Stale: the room's front moved on since it was listed.
                self.heap.push(Reverse((oldest, generation, room)));
                continue;
            }
            if !drop_more(oldest) {
                self.heap.push(Reverse((oldest, generation, room)));
                break;
            }
            history.pop_oldest();
            dropped += 1;
            match history.oldest_ts() {
                Some(next) => self.heap.push(Reverse((next, generation, room))),
                None => history.unlist(),
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use protocol::envelope::{MessageRecord, Push, Value, encode_push};

    use super::*;

    const UNBOUNDED: RoomBounds = RoomBounds {
        max_len: usize::MAX,
        max_bytes: usize::MAX,
        ttl_ms: u64::MAX,
    };

    fn message(seq: u64, ts: u64, size: usize) -> Arc<StoredMessage> {
        Arc::new(StoredMessage::new(
            seq,
            ts,
            None,
            Some(Bytes::from(vec![0u8; size])),
        ))
    }

    struct Rooms(HashMap<RoomId, (u64, RoomHistory)>);

    impl HistoryRooms for Rooms {
        fn history_of(&mut self, room: &RoomId, generation: u64) -> Option<&mut RoomHistory> {
            self.0
                .get_mut(room)
                .filter(|(g, _)| *g == generation)
                .map(|(_, h)| h)
        }
    }

    fn room(name: &str) -> RoomId {
        RoomId::parse(name).unwrap()
    }

    #[test]
    fn a_room_keeps_to_its_count_bytes_and_age() {
        let ledger = Rc::new(HistoryLedger::default());
        let mut history = RoomHistory::new(ledger.clone());
        let bounds = RoomBounds {
            max_len: 3,
            max_bytes: 3 * (MESSAGE_OVERHEAD + 100),
            ttl_ms: 1000,
        };
        for seq in 1..=5 {
            history.push(message(seq, seq * 10, 100), bounds, seq * 10);
        }
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(ledger.used(), 3 * (MESSAGE_OVERHEAD + 100));
        // A large message pushes out older ones by bytes.
        history.push(message(6, 60, 250), bounds, 60);
        let seqs: Vec<u64> = history.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [5, 6]);
        assert_eq!(ledger.used(), history.bytes());
        // Age.
        history.prune(bounds, 1055);
        assert_eq!(history.iter().map(|m| m.seq).collect::<Vec<_>>(), [6]);
        // A message larger than the room's bound is not kept at all.
        assert!(!history.push(message(7, 1056, 500), bounds, 1056));
        assert!(history.is_empty());
        assert_eq!(ledger.used(), 0);
    }

    #[test]
    fn dropping_a_history_gives_its_bytes_back() {
        let ledger = Rc::new(HistoryLedger::default());
        let mut a = RoomHistory::new(ledger.clone());
        let mut b = RoomHistory::new(ledger.clone());
        a.push(message(1, 0, 10), UNBOUNDED, 0);
        b.push(message(1, 0, 20), UNBOUNDED, 0);
        assert_eq!(ledger.used(), 2 * MESSAGE_OVERHEAD + 30);
        drop(a);
        assert_eq!(ledger.used(), MESSAGE_OVERHEAD + 20);
        b.clear();
        assert_eq!(ledger.used(), 0);
        drop(b);
        assert_eq!(ledger.used(), 0);
    }

    #[test]
    fn the_oldest_message_of_any_room_goes_first() {
        let ledger = Rc::new(HistoryLedger::default());
        let mut order = EvictionOrder::default();
        let mut rooms = Rooms(HashMap::new());
        // Interleaved publishes in three rooms; room c is replaced by a new generation.
        let names = ["a", "b", "c"];
        for (i, name) in names.iter().enumerate() {
            rooms
                .0
                .insert(room(name), (i as u64, RoomHistory::new(ledger.clone())));
        }
        for t in 0..9u64 {
            let name = names[(t % 3) as usize];
            let (generation, history) = rooms.0.get_mut(&room(name)).unwrap();
            let generation = *generation;
            if history.push(message(t, t, 0), UNBOUNDED, t) {
                order.track(room(name), generation, t, &mut rooms, &ledger);
            }
        }
        assert_eq!(order.len(), 3);
        rooms
            .0
            .insert(room("c"), (9, RoomHistory::new(ledger.clone())));
        assert_eq!(ledger.used(), 6 * MESSAGE_OVERHEAD);
        // Budget of four messages: the two oldest of a and b go (c's old generation is gone).
        let budget = 4 * MESSAGE_OVERHEAD;
        let dropped = order.drop_oldest(&mut rooms, |_| ledger.used() > budget);
        assert_eq!(dropped, 2);
        fn left(rooms: &Rooms, name: &str) -> Vec<u64> {
            rooms.0[&room(name)].1.iter().map(|m| m.seq).collect()
        }
        assert_eq!(left(&rooms, "a"), [3, 6]);
        assert_eq!(left(&rooms, "b"), [4, 7]);
        assert!(left(&rooms, "c").is_empty());
        // Age: everything published before t = 5 goes.
        order.drop_oldest(&mut rooms, |oldest| oldest < 5);
        assert_eq!(left(&rooms, "a"), [6]);
        assert_eq!(left(&rooms, "b"), [7]);
        assert_eq!(order.len(), 2);
        // Emptied rooms leave the order.
        order.drop_oldest(&mut rooms, |_| true);
        assert_eq!(order.len(), 0);
        assert_eq!(ledger.used(), 0);
        assert_eq!(ledger.listed.get(), 0);
    }

    #[test]
    fn entries_of_rooms_that_came_and_went_do_not_pile_up() {
        let ledger = Rc::new(HistoryLedger::default());
        let mut order = EvictionOrder::default();
        let mut rooms = Rooms(HashMap::new());
        for generation in 0..10_000u64 {
            let mut history = RoomHistory::new(ledger.clone());
            assert!(history.push(message(1, generation, 0), UNBOUNDED, generation));
            rooms.0.insert(room("flap"), (generation, history));
            order.track(room("flap"), generation, generation, &mut rooms, &ledger);
            // A room that empties and fills again is listed once.
            let history = &mut rooms.0.get_mut(&room("flap")).unwrap().1;
            history.pop_oldest();
            assert!(!history.push(message(2, generation, 0), UNBOUNDED, generation));
        }
        assert_eq!(ledger.listed.get(), 1);
        assert!(order.len() <= 2 + 64, "{}", order.len());
    }

    #[test]
    fn a_reader_of_the_other_format_gets_the_same_message() {
        let record = MessageRecord {
            room: room("lobby"),
            seq: 3,
            from: Some("u1".into()),
            name: "ann".into(),
            ts: 5,
            data: Value::map([
                ("n", Value::Float(1.5)),
                ("list", Value::Array(vec![Value::Int(-1), Value::Null])),
            ]),
            event: protocol::envelope::EventName::parse("chat.note").ok(),
        };
        let json = encode_push(&Push::Message(&record), Format::Json).unwrap();
        let msgpack = encode_push(&Push::Message(&record), Format::MsgPack).unwrap();
        let only_msgpack = StoredMessage::new(3, 5, None, Some(Bytes::from(msgpack.clone())));
        assert_eq!(&*only_msgpack.encoded(Format::Json, 32).unwrap(), &json[..]);
        assert!(matches!(
            only_msgpack.encoded(Format::MsgPack, 32),
            Some(Cow::Borrowed(_))
        ));
        let only_json = StoredMessage::new(3, 5, Some(Bytes::from(json)), None);
        assert_eq!(
            &*only_json.encoded(Format::MsgPack, 32).unwrap(),
            &msgpack[..]
        );
    }
}
