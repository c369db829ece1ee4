//! A shard's own state: one thread, one monoio runtime, and everything it owns — its connections
//! and its part of each room's members (the connection side), the rooms homed on it (the room
//! side, a [`RoomCore`]), its write path, buffers and compressors — and how it sends a message to
//! a shard (itself included). The handlers of those messages are `home` and `session`; the tasks
//! that run them are in `tasks`. Nothing here handles a message.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;

use protocol::compression::{Compressor, DEFAULT_LEVEL, Decompressor};
use protocol::envelope::RoomId;

use crate::broker::state::Broker;
use crate::buffers::BufferPool;
use crate::conn::{Conn, ConnId, shard_of};
use crate::msg::{ConnMsg, Reply, ShardMsg};
use crate::room::{RoomCore, RoomRules};
use crate::shared::Shared;
use crate::sys::ReadySet;
use crate::writer::Writer;

/// One shard's own state.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    /// The `Origin`s connections upgraded with, each once (at most [`MAX_ORIGINS_SEEN`]).
    pub(crate) origins_seen: RefCell<Vec<Arc<str>>>,
    pub(crate) local_rooms: RefCell<HashMap<RoomId, Vec<Rc<Conn>>>>,
    /// The rooms homed here, fed by the room side (`home`).
    pub(crate) rooms: RefCell<RoomCore>,
    next_conn: Cell<u64>,
    /// The trace id of the request being handled (see [`Shard::begin_trace`]).
    trace: Cell<u64>,
    next_trace: Cell<u64>,
    pub(crate) compressor: RefCell<Compressor>,
    pub(crate) decompressor: RefCell<Decompressor>,
    /// Scratch buffers for reads and for writes the kernel could not take at once.
    pub(crate) buffers: Rc<BufferPool>,
    /// The write path of this shard's connections.
    pub(crate) writer: Rc<Writer<Conn>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop_waker: RefCell<Option<Waker>>,
    /// Messages to send once due ([`crate::clock::monotonic_us`]), oldest first: the leaves of
    /// connections dropped abnormally, held for presence's grace (SPEC §6). Sent by the ticker.
    pub(crate) delayed: RefCell<VecDeque<(u64, usize, ShardMsg)>>,
    /// The WebSocket connections, read by the shard's reader as they turn readable.
    pub(crate) ready_set: ReadySet,
    /// Messages this shard sent itself, in order (see [`Shard::dispatch`]).
    outbox: RefCell<VecDeque<ShardMsg>>,
    /// The dispatcher, parked while the outbox and the mailbox are empty.
    pub(crate) outbox_waker: RefCell<Option<Waker>>,
    /// The shared broker's connections and channels, when Redis is configured.
    pub(crate) broker: Option<Broker>,
}

/// The trace of one client request, current until dropped (see [`Shard::begin_trace`]).
pub(crate) struct TraceScope<'a> {
    shard: &'a Shard,
    id: u64,
}

impl TraceScope<'_> {
    /// The trace id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for TraceScope<'_> {
    fn drop(&mut self) {
        self.shard.trace.set(0);
    }
}

/// Distinct `Origin`s a shard keeps for its connections; past it a connection's origin is not
/// kept (and a change of `allowed_origins` does not close it).
pub(crate) const MAX_ORIGINS_SEEN: usize = 1024;

impl Shard {
    /// The index (plus one) of `origin` among those seen here, added if new; 0 for none,
    /// `u16::MAX` when the table is full.
    pub(crate) fn intern_origin(&self, origin: Option<&str>) -> u16 {
        let Some(origin) = origin else {
            return 0;
        };
        let mut seen = self.origins_seen.borrow_mut();
        let index = match seen.iter().position(|o| &**o == origin) {
            Some(i) => i,
            None if seen.len() < MAX_ORIGINS_SEEN => {
                seen.push(Arc::from(origin));
                seen.len() - 1
            }
            None => return u16::MAX,
        };
        u16::try_from(index + 1).unwrap_or(u16::MAX)
    }

    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> std::io::Result<Self> {
        let zstd = |e: protocol::compression::ZstdError| std::io::Error::other(e.to_string());
        let buffers = Rc::new(BufferPool::default());
        let writer = Rc::new(Writer::new(
            id,
            &shared.config,
            shared.metrics.clone(),
            buffers.clone(),
        ));
        let rooms = RoomCore::new(
            id,
            RoomRules::of(&shared.config),
            Arc::from(shared.instance.as_str()),
        );
        let broker = shared
            .config
            .redis
            .clone()
            .map(|settings| Broker::new(settings, id));
        Ok(Self {
            id,
            shared,
            conns: RefCell::new(HashMap::new()),
            origins_seen: RefCell::new(Vec::new()),
            local_rooms: RefCell::new(HashMap::new()),
            rooms: RefCell::new(rooms),
            delayed: RefCell::new(VecDeque::new()),
            next_conn: Cell::new(1),
            trace: Cell::new(0),
            next_trace: Cell::new(1),
            compressor: RefCell::new(Compressor::new(DEFAULT_LEVEL).map_err(zstd)?),
            decompressor: RefCell::new(Decompressor::new().map_err(zstd)?),
            buffers,
            writer,
            stopping: Cell::new(false),
            stop_waker: RefCell::new(None),
            ready_set: ReadySet::new()?,
            outbox: RefCell::new(VecDeque::new()),
            outbox_waker: RefCell::new(None),
            broker,
        })
    }

    /// Starts the trace of a client request: a fresh id (the shard in the top 16 bits), carried
    /// by the messages the request makes and named `trace_id` in their log lines, so that one
    /// request can be followed from the connection's shard to the room's home.
    /// It lasts as long as the returned scope: messages made after it (a join at connect, a
    /// re-check) carry 0, never the id of a request that has ended.
    pub(crate) fn begin_trace(&self) -> TraceScope<'_> {
        let n = self.next_trace.get();
        self.next_trace.set(n + 1);
        let id = ((self.id as u64) << 48) | (n & 0xFFFF_FFFF_FFFF);
        self.trace.set(id);
        TraceScope { shard: self, id }
    }

    /// The trace of the request being handled (0 outside one).
    pub(crate) fn trace(&self) -> u64 {
        self.trace.get()
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        ((self.id as u64) << 48) | (n & 0xFFFF_FFFF_FFFF)
    }

    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Removes a connection from local room tables (membership only; the home is told apart).
    pub(crate) fn drop_local_member(&self, room: &RoomId, conn: ConnId) {
        let mut rooms = self.local_rooms.borrow_mut();
        if let Some(members) = rooms.get_mut(room) {
            members.retain(|c| c.id != conn);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Sends `msg` to shard `target`: its mailbox, or this shard's outbox (handled by the shard's
    /// dispatcher right after the message or read that produced it, in order).
    pub(crate) fn dispatch(&self, target: usize, msg: impl Into<ShardMsg>) {
        if target == self.id {
            self.outbox.borrow_mut().push_back(msg.into());
            if let Some(waker) = self.outbox_waker.borrow_mut().take() {
                waker.wake();
            }
        } else {
            self.shared.send(target, msg.into());
        }
    }

    /// Whether messages this shard sent itself wait.
    pub(crate) fn has_local(&self) -> bool {
        !self.outbox.borrow().is_empty()
    }

    /// Takes the next message this shard sent itself.
    pub(crate) fn next_local(&self) -> Option<ShardMsg> {
        self.outbox.borrow_mut().pop_front()
    }

    /// Sends a reply to a connection, wherever it lives.
    pub(crate) fn reply(&self, conn: ConnId, reply: Reply) {
        self.dispatch(shard_of(conn), ConnMsg::Reply { conn, reply });
    }
}
