//! One live WebSocket connection's state on its shard: identity, joined rooms, rate buckets, and
//! the bounded outbound queue with its writer. Encoded frames are copied once into the
//! connection's outbound buffer; a flush writes the whole buffer in one submission. Every idle
//! connection carries this struct, so rarely used state is boxed on first use. Nothing here
//! decodes client input (see `ws` and `sio`).

use std::cell::{Cell, RefCell, UnsafeCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::io::{AsyncWriteRentExt, OwnedWriteHalf};
use monoio::net::TcpStream;
use protocol::CloseCode;
use protocol::envelope::{RoomId, Value};
use protocol::ws;

use crate::auth::Identity;
use crate::frames::FrameKey;
use crate::limits::Bucket;
use crate::shard::Shard;
use crate::sys::{self, Shutdown};

/// First capacity of a connection's outbound buffer (it grows by doubling while frames wait).
const FIRST_OUT_CAPACITY: usize = 512;

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
    stream: Rc<UnsafeCell<TcpStream>>,
    writer: RefCell<Option<OwnedWriteHalf<TcpStream>>>,
    /// Frames encoded and waiting, in order: a delivery is copied here once (no refcount per
    /// member), and a flush writes the whole buffer. Empty with no capacity while idle.
    out: RefCell<Vec<u8>>,
    writing: Cell<bool>,
    /// When the last write started ([`crate::monotonic_us`]); kept only with `write_delay`.
    last_write_us: Cell<u64>,
    /// Set once a close has been decided; the code sent.
    pub(crate) closing: Cell<Option<CloseCode>>,
    /// Whether the peer went away without a close handshake (drives presence's 5 s delay later).
    pub(crate) abnormal: Cell<bool>,
    /// The first frame (welcome / Socket.IO CONNECT) has been queued: writes may start.
    pub(crate) ready: Cell<bool>,
    pub(crate) identity: RefCell<Identity>,
    pub(crate) ip: IpAddr,
    /// The number in this connection's session id (see [`Conn::session`]).
    session_number: u64,
    pub(crate) rooms: RefCell<Vec<(RoomId, Membership)>>,
    pub(crate) last_seen_ms: Cell<u64>,
    pub(crate) last_ping_ms: Cell<u64>,
    pub(crate) refresh_warned: Cell<bool>,
    /// Rate buckets (publish, join, query), made on the first limited attempt: an idle
    /// connection carries a pointer instead of three buckets.
    pub(crate) buckets: Cell<Option<Box<[Bucket; 3]>>>,
    /// Initial joins (default rooms, personal room) still unanswered.
    pub(crate) pending_initial: Cell<u32>,
    /// Boxed: rare, and every idle connection would carry its size.
    pub(crate) resume: RefCell<Option<Box<PendingResume>>>,
    /// Joined persistent rooms where this user may read but not publish (usually absent). A thin
    /// pointer in a `Cell` on purpose: 8 bytes where a `RefCell<Vec>` is 32, and the whole `Conn`
    /// must stay within mimalloc's 320-byte size class with the `Rc` header.
    #[allow(clippy::box_collection)]
    read_only: Cell<Option<Box<Vec<RoomId>>>>,
    /// Publishes waiting for their room's join to be answered (usually absent; thin for the
    /// same reason as `read_only`).
    #[allow(clippy::box_collection)]
    held: Cell<Option<Box<Vec<HeldPublish>>>>,
}

/// A publish sent while its room's join was still unanswered. It waits for the answer rather than
/// going to the room at once, so that a refused join (`room_full`, `forbidden`) cannot let a
/// non-member publish; a client may still pipeline `join` and `publish` without waiting.
#[derive(Debug)]
pub(crate) struct HeldPublish {
    pub(crate) room: RoomId,
    pub(crate) data: Value,
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
    pub(crate) stream: Rc<UnsafeCell<TcpStream>>,
    pub(crate) writer: OwnedWriteHalf<TcpStream>,
    pub(crate) identity: Identity,
    pub(crate) ip: IpAddr,
    pub(crate) session_number: u64,
}

impl Conn {
    pub(crate) fn new(parts: ConnParts) -> Self {
        let now = crate::now_ms();
        Self {
            id: parts.id,
            key: parts.key,
            stream: parts.stream,
            writer: RefCell::new(Some(parts.writer)),
            out: RefCell::new(Vec::new()),
            writing: Cell::new(false),
            last_write_us: Cell::new(0),
            closing: Cell::new(None),
            abnormal: Cell::new(false),
            ready: Cell::new(false),
            identity: RefCell::new(parts.identity),
            ip: parts.ip,
            session_number: parts.session_number,
            rooms: RefCell::new(Vec::new()),
            last_seen_ms: Cell::new(now),
            last_ping_ms: Cell::new(now),
            refresh_warned: Cell::new(false),
            buckets: Cell::new(None),
            pending_initial: Cell::new(0),
            resume: RefCell::new(None),
            read_only: Cell::new(None),
            held: Cell::new(None),
        }
    }

    /// The session id given in `welcome` (and the Socket.IO `sid`), formatted when asked for so
    /// that an idle connection does not carry the string.
    pub(crate) fn session(&self, shard: &Shard) -> String {
        format!("c_{}{:x}", shard.shared.instance, self.session_number)
    }

    pub(crate) fn stream(&self) -> &Rc<UnsafeCell<TcpStream>> {
        &self.stream
    }

    pub(crate) fn user_id(&self) -> std::sync::Arc<str> {
        self.identity.borrow().user_id.clone()
    }

    pub(crate) fn username(&self) -> std::sync::Arc<str> {
        self.identity.borrow().username.clone()
    }

    pub(crate) fn membership(&self, room: &RoomId) -> Option<Membership> {
        self.rooms
            .borrow()
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, m)| *m)
    }

    /// Holds a publish until its room's join is answered; false when too many already wait.
    pub(crate) fn hold_publish(&self, publish: HeldPublish) -> bool {
        let mut list = self.held.take().unwrap_or_default();
        let has_space = list.len() < MAX_HELD_PUBLISHES;
        if has_space {
            list.push(publish);
        }
        self.held.set(Some(list));
        has_space
    }

    /// Takes the publishes held for `room` (every room with `None`), in the order they were sent.
    pub(crate) fn take_held(&self, room: Option<&RoomId>) -> Vec<HeldPublish> {
        let Some(mut list) = self.held.take() else {
            return Vec::new();
        };
        let (taken, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut *list)
            .into_iter()
            .partition(|p| room.is_none_or(|r| p.room == *r));
        if !kept.is_empty() {
            *list = kept;
            self.held.set(Some(list));
        }
        taken
    }

    /// Whether this user may read `room` but not publish in it.
    pub(crate) fn is_read_only(&self, room: &RoomId) -> bool {
        let list = self.read_only.take();
        let read_only = list.as_ref().is_some_and(|l| l.contains(room));
        self.read_only.set(list);
        read_only
    }

    /// Records whether this user may only read `room`.
    pub(crate) fn set_read_only(&self, room: &RoomId, read_only: bool) {
        let mut slot = self.read_only.take();
        let pos = slot
            .as_ref()
            .and_then(|list| list.iter().position(|r| r == room));
        match (pos, read_only) {
            (None, true) => slot.get_or_insert_default().push(room.clone()),
            (Some(i), false) => {
                if let Some(list) = slot.as_mut() {
                    list.swap_remove(i);
                    if list.is_empty() {
                        slot = None;
                    }
                }
            }
            _ => {}
        }
        self.read_only.set(slot);
    }

    /// Bytes queued and not yet handed to the kernel.
    pub(crate) fn backlog(&self) -> usize {
        self.out.borrow().len()
    }

    /// Queues a frame; starts the writer when the connection is ready. Past `max_queued_bytes`
    /// the connection is a slow consumer and is closed with 4011.
    pub(crate) fn enqueue(self: &Rc<Self>, shard: &Rc<Shard>, frame: &[u8]) {
        if self.closing.get().is_some() {
            return;
        }
        {
            let mut out = self.out.borrow_mut();
            if out.len() + frame.len() > shard.shared.config.max_queued_bytes {
                drop(out);
                self.close(shard, CloseCode::SLOW_CONSUMER);
                return;
            }
            if out.capacity() == 0 {
                // Sized to the need, not a pooled 16 KiB: a broadcast to every connection of a
                // shard must not pin a scratch buffer per connection.
                out.reserve(frame.len().max(FIRST_OUT_CAPACITY));
            }
            out.extend_from_slice(frame);
        }
        self.kick_writer(shard);
    }

    /// Queues a frame ahead of everything else (the welcome).
    pub(crate) fn enqueue_first(self: &Rc<Self>, shard: &Rc<Shard>, frame: &[u8]) {
        {
            let mut out = self.out.borrow_mut();
            out.splice(0..0, frame.iter().copied());
        }
        self.kick_writer(shard);
    }

    /// Marks the connection ready (first frame queued) and starts writing.
    pub(crate) fn set_ready(self: &Rc<Self>, shard: &Rc<Shard>) {
        self.ready.set(true);
        self.kick_writer(shard);
    }

    fn kick_writer(self: &Rc<Self>, shard: &Rc<Shard>) {
        if self.ready.get() && !self.writing.get() && !self.out.borrow().is_empty() {
            self.writing.set(true);
            monoio::spawn(write_loop(shard.clone(), self.clone()));
        }
    }

    /// Starts the close handshake with `code`: queued frames are dropped for a slow consumer and
    /// kept otherwise, the close frame goes last, then the socket's write side is shut. A peer that
    /// does not finish the handshake within 2 s (30 s for a slow consumer) is cut off.
    pub(crate) fn close(self: &Rc<Self>, shard: &Rc<Shard>, code: CloseCode) {
        if self.closing.get().is_some() {
            return;
        }
        self.closing.set(Some(code));
        {
            let mut out = self.out.borrow_mut();
            if code == CloseCode::SLOW_CONSUMER {
                // What waits is dropped; the buffer goes with it.
                *out = Vec::new();
            }
            if self.key == FrameKey::SocketIo && code != CloseCode::SLOW_CONSUMER {
                // Engine.IO close packet first, so that Socket.IO clients see a server disconnect.
                ws::encode_frame(&mut out, ws::frame::TEXT, b"1");
            }
            ws::encode_close(&mut out, code);
        }
        self.ready.set(true);
        self.kick_writer(shard);
        // A slow consumer gets longer to drain what its kernel buffers hold and read the 4011: its
        // queue is already dropped, so waiting costs no memory of ours.
        let grace = if code == CloseCode::SLOW_CONSUMER {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        };
        let conn = self.clone();
        monoio::spawn(async move {
            monoio::time::sleep(grace).await;
            sys::shutdown(&conn.stream, Shutdown::Both);
        });
    }

    /// Cuts the socket at once (the reader sees EOF and cleans up).
    pub(crate) fn abort(&self) {
        sys::shutdown(&self.stream, Shutdown::Both);
    }
}

async fn write_loop(shard: Rc<Shard>, conn: Rc<Conn>) {
    let taken = conn.writer.borrow_mut().take();
    let Some(mut writer) = taken else {
        conn.writing.set(false);
        return;
    };
    let mut failed = false;
    let delay_us = u64::try_from(shard.shared.config.write_delay.as_micros()).unwrap_or(u64::MAX);
    loop {
        if delay_us > 0 && conn.closing.get().is_none() {
            // At most one write per `write_delay`: what arrives meanwhile joins this write, which
            // means fewer, larger writes for the kernel and for the reader. A connection not
            // written to for that long is written at once.
            let due = conn.last_write_us.get().saturating_add(delay_us);
            let now = crate::monotonic_us();
            if due > now {
                monoio::time::sleep(Duration::from_micros(due - now)).await;
            }
            conn.last_write_us.set(crate::monotonic_us());
        }
        // Everything queued goes out in one write; frames queued meanwhile start a new buffer.
        let buf = std::mem::take(&mut *conn.out.borrow_mut());
        if buf.is_empty() {
            break;
        }
        let len = buf.len() as u64;
        let (result, written) = writer.write_all(buf).await;
        shard.put_buffer(written);
        if result.is_err() {
            failed = true;
            *conn.out.borrow_mut() = Vec::new();
            break;
        }
        let metrics = &shard.shared.metrics;
        metrics.bytes_out.fetch_add(len, Ordering::Relaxed);
        metrics.socket_writes.fetch_add(1, Ordering::Relaxed);
    }
    conn.writer.replace(Some(writer));
    conn.writing.set(false);
    if failed {
        conn.abnormal.set(true);
        conn.abort();
    } else if conn.closing.get().is_some() {
        sys::shutdown(&conn.stream, Shutdown::Write);
    }
}
