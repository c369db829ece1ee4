//! A shard: one thread, one monoio runtime, its own listener on the shared port, and everything
//! it owns (connections, its part of each room's members, the rooms homed on it). Shards talk only
//! through their mailboxes; state shared by all of them is connect-time bookkeeping in `Shared`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use monoio::net::TcpStream;
use protocol::CloseCode;
use protocol::compression::{Compressor, DEFAULT_LEVEL, Decompressor};
use protocol::envelope::RoomId;

use crate::clock::now_ms;
use crate::conn::{Conn, ConnId, shard_of};
use crate::frames::Delivery;
use crate::msg::{Reply, ShardMsg};
use crate::room::{RoomCore, RoomRules};
use crate::shared::Shared;
use crate::sys::ReadySet;

/// One shard's own state.
pub(crate) struct Shard {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) conns: RefCell<HashMap<ConnId, Rc<Conn>>>,
    pub(crate) local_rooms: RefCell<HashMap<RoomId, Vec<Rc<Conn>>>>,
    /// The rooms homed here (see [`crate::home`]).
    pub(crate) rooms: RefCell<RoomCore>,
    next_conn: Cell<u64>,
    pub(crate) compressor: RefCell<Compressor>,
    pub(crate) decompressor: RefCell<Decompressor>,
    buffers: RefCell<Vec<Vec<u8>>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop_waker: RefCell<Option<std::task::Waker>>,
    /// Messages to send once due ([`crate::clock::monotonic_us`]), oldest first: the leaves of
    /// connections dropped abnormally, held for presence's grace (SPEC §6). Sent by [`ticker`].
    pub(crate) delayed: RefCell<std::collections::VecDeque<(u64, usize, ShardMsg)>>,
    /// Connections with frames queued since the last flush, for [`flusher`].
    to_flush: RefCell<Vec<Rc<Conn>>>,
    /// Connections whose flush waits for the write delay, with when it is due
    /// ([`crate::clock::monotonic_us`]); sent by [`deferred_flusher`].
    deferred: RefCell<std::collections::VecDeque<(u64, Rc<Conn>)>>,
    deferred_waker: RefCell<Option<std::task::Waker>>,
    /// The write delay that this shard's load calls for now (see [`Self::probe_load`]), in µs.
    busy_delay_us: Cell<u32>,
    load: RefCell<LoadProbe>,
    flusher_waker: RefCell<Option<std::task::Waker>>,
    /// The WebSocket connections, read by [`reader`] as they turn readable.
    pub(crate) ready_set: ReadySet,
}

/// Size of the buffers a shard lends for reads and writes.
pub(crate) const BUFFER_SIZE: usize = 16 * 1024;
/// Buffers kept for reuse per shard.
const POOLED_BUFFERS: usize = 32;

impl Shard {
    pub(crate) fn new(id: usize, shared: Arc<Shared>) -> std::io::Result<Self> {
        let zstd = |e: protocol::compression::ZstdError| std::io::Error::other(e.to_string());
        let rooms = RoomCore::new(
            id,
            RoomRules::of(&shared.config),
            Arc::from(shared.instance.as_str()),
        );
        Ok(Self {
            id,
            shared,
            conns: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            rooms: RefCell::new(rooms),
            delayed: RefCell::new(std::collections::VecDeque::new()),
            to_flush: RefCell::new(Vec::new()),
            deferred: RefCell::new(std::collections::VecDeque::new()),
            deferred_waker: RefCell::new(None),
            busy_delay_us: Cell::new(0),
            load: RefCell::new(LoadProbe::default()),
            flusher_waker: RefCell::new(None),
            next_conn: Cell::new(1),
            compressor: RefCell::new(Compressor::new(DEFAULT_LEVEL).map_err(zstd)?),
            decompressor: RefCell::new(Decompressor::new().map_err(zstd)?),
            buffers: RefCell::new(Vec::new()),
            stopping: Cell::new(false),
            stop_waker: RefCell::new(None),
            ready_set: ReadySet::new()?,
        })
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        let n = self.next_conn.get();
        self.next_conn.set(n + 1);
        ((self.id as u64) << 48) | (n & 0xFFFF_FFFF_FFFF)
    }

    pub(crate) fn take_buffer(&self) -> Vec<u8> {
        self.buffers
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE))
    }

    pub(crate) fn put_buffer(&self, mut buf: Vec<u8>) {
        let mut pool = self.buffers.borrow_mut();
        // Oversized buffers (a large write batch) are not kept, nor small ones (a read needs the
        // whole scratch size: a `recv` into no spare room would read as end of stream).
        if pool.len() < POOLED_BUFFERS && (BUFFER_SIZE..=4 * BUFFER_SIZE).contains(&buf.capacity())
        {
            buf.clear();
            pool.push(buf);
        }
    }

    /// Waits until `stream` is readable, then reads what it holds into a pooled buffer (empty at
    /// the end of the stream). No buffer is held while waiting; the caller puts it back. `eager`
    /// tries the read before waiting: worth it where bytes have usually arrived already (a request
    /// head right after the accept), one wasted syscall where they have not.
    pub(crate) async fn read_ready(
        &self,
        stream: &TcpStream,
        eager: bool,
    ) -> std::io::Result<Vec<u8>> {
        let mut wait = !eager;
        loop {
            if wait {
                stream.readable(false).await?;
            }
            wait = true;
            if let Some(read) = self.try_read(stream) {
                return read;
            }
        }
    }

    /// One non-blocking read into a pooled buffer: `None` while nothing has arrived. The caller
    /// puts the buffer back.
    pub(crate) fn try_read(&self, stream: &TcpStream) -> Option<std::io::Result<Vec<u8>>> {
        let mut buf = self.take_buffer();
        match crate::sys::recv_now(stream, &mut buf) {
            Ok(_) => Some(Ok(buf)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                self.put_buffer(buf);
                None
            }
            Err(e) => {
                self.put_buffer(buf);
                Some(Err(e))
            }
        }
    }

    /// How long a connection written to less than this ago waits before its next write, in µs:
    /// `write_delay`, or more while the shard is saturated (up to `busy_write_delay`).
    pub(crate) fn write_delay_us(&self) -> u32 {
        let fixed = u32::try_from(self.shared.config.write_delay.as_micros()).unwrap_or(u32::MAX);
        fixed.max(self.busy_delay_us.get())
    }

    /// Holds a listed connection's flush for `wait_us` (see [`deferred_flusher`]).
    pub(crate) fn defer_flush(&self, conn: Rc<Conn>, wait_us: u64) {
        self.shared
            .metrics
            .deferred_flushes
            .fetch_add(1, Ordering::Relaxed);
        let mut deferred = self.deferred.borrow_mut();
        deferred.push_back((crate::clock::monotonic_us() + wait_us, conn));
        if deferred.len() == 1
            && let Some(waker) = self.deferred_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    /// Sets the write delay that the shard's load calls for, at most every [`LOAD_PROBE_US`]:
    /// from the share of wall time that this shard's thread spent running or waiting to run
    /// (`/proc/thread-self/schedstat`). A thread that wants the CPU nearly all the time (≥ 90 %)
    /// is saturated: the delay doubles (from 1 ms, up to `busy_write_delay`), so that frames to a
    /// busy connection leave in fewer, larger writes, which costs the kernel and the clients
    /// less per message. Under 50 % it halves back towards zero, and a pause in flushing resets
    /// it. The demand is smoothed over about four probes. Measured on 2 cores shared with the load
    /// generator: 90–99 % near saturation without the delay, 72–78 % at saturation with it (a
    /// floor of 70 % made the delay flap and lost ~15 % of the peak), ~60 % at a third of the
    /// peak (where the delay stays off).
    /// Costs one `pread` of a procfs file per probe, made only while the shard flushes.
    pub(crate) fn probe_load(&self) {
        let max =
            u32::try_from(self.shared.config.busy_write_delay.as_micros()).unwrap_or(u32::MAX);
        if max == 0 {
            return;
        }
        let now = crate::clock::monotonic_us();
        let mut probe = self.load.borrow_mut();
        let elapsed = now.saturating_sub(probe.at_us);
        if elapsed < LOAD_PROBE_US {
            return;
        }
        let Some(demand_ns) = probe.read_demand_ns() else {
            return;
        };
        let used_ns = demand_ns.saturating_sub(probe.demand_ns);
        let first = probe.at_us == 0;
        (probe.at_us, probe.demand_ns) = (now, demand_ns);
        if first {
            return;
        }
        let permille = used_ns.saturating_mul(1000) / elapsed.saturating_mul(1000).max(1);
        // Smoothed over about four probes (~80 ms): one 20 ms sample is too noisy to act on.
        probe.demand_permille = if elapsed > 10 * LOAD_PROBE_US {
            permille
        } else {
            probe.demand_permille - probe.demand_permille / 4 + permille / 4
        };
        let current = self.busy_delay_us.get();
        let next = next_busy_delay(current, probe.demand_permille, elapsed, max);
        if next != current {
            self.busy_delay_us.set(next);
            self.shared
                .metrics
                .write_delay(self.id, self.write_delay_us());
        }
    }

    /// Lists a connection for the next flush (see [`flusher`]).
    pub(crate) fn list_for_flush(&self, conn: Rc<Conn>) {
        let mut list = self.to_flush.borrow_mut();
        list.push(conn);
        if list.len() == 1
            && let Some(waker) = self.flusher_waker.borrow_mut().take()
        {
            waker.wake();
        }
    }

    pub(crate) fn conn(&self, id: ConnId) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Handles one message from a mailbox.
    pub(crate) fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Join(join) => crate::home::join(self, join),
            ShardMsg::Leave {
                room,
                conn,
                user,
                name,
                key,
            } => crate::home::leave(self, &room, conn, &user, &name, key),
            ShardMsg::Publish {
                room,
                conn,
                user,
                name,
                data,
                id,
            } => crate::home::publish(self, room, conn, &user, &name, data, id),
            ShardMsg::PresenceQuery { room, conn, id } => {
                crate::home::presence_query(self, &room, conn, id);
            }
            ShardMsg::HistoryQuery {
                room,
                conn,
                id,
                since,
                limit,
            } => crate::home::history_query(self, &room, conn, id, since, limit),
            ShardMsg::Joined(joined) => crate::ws::on_joined(self, *joined),
            ShardMsg::JoinFailed {
                room,
                conn,
                id,
                initial,
                code,
                message,
            } => {
                crate::ws::on_join_failed(self, &room, conn, id, initial, code, message);
            }
            ShardMsg::Deliver(delivery) => self.deliver(&delivery),
            ShardMsg::Reply { conn, reply } => crate::ws::on_reply(self, conn, reply),
            ShardMsg::Close { conn, code } => {
                if let Some(c) = self.conn(conn) {
                    c.close(self, code);
                }
            }
            ShardMsg::CloseAuthorized {
                user,
                session,
                code,
            } => {
                let matching: Vec<Rc<Conn>> = self
                    .conns
                    .borrow()
                    .values()
                    .filter(|c| {
                        let identity = c.identity.borrow();
                        identity.user_id == user
                            && session.as_ref().is_none_or(|s| *s == identity.session_id)
                    })
                    .cloned()
                    .collect();
                for conn in matching {
                    conn.close(self, code);
                }
            }
            ShardMsg::Kick {
                room,
                user,
                reason,
                done,
            } => {
                for conn in self.conns_in(&room) {
                    if user.as_ref().is_none_or(|u| *u == conn.user_id()) {
                        crate::ws::kick(self, &conn, &room, reason);
                    }
                }
                done.tick();
            }
            ShardMsg::Reauthorize { room, done } => {
                for conn in self.conns_in(&room) {
                    crate::ws::reauthorize(self, &conn, &room);
                }
                done.tick();
            }
            ShardMsg::ReauthorizeUser { user, done } => {
                let conns: Vec<Rc<Conn>> = self
                    .conns
                    .borrow()
                    .values()
                    .filter(|c| c.user_id() == user)
                    .cloned()
                    .collect();
                for conn in conns {
                    let rooms: Vec<RoomId> =
                        conn.rooms.borrow().iter().map(|(r, _)| r.clone()).collect();
                    for room in rooms {
                        crate::ws::reauthorize(self, &conn, &room);
                    }
                }
                done.tick();
            }
            ShardMsg::DropRoom { room, done } => {
                crate::home::drop_room(self, &room);
                done.tick();
            }
            ShardMsg::PublishExternal {
                room,
                user,
                name,
                data,
                settings,
                answer,
            } => {
                let result =
                    crate::home::publish_external(self, room, &user, &name, data, settings);
                answer.set(result);
            }
            ShardMsg::PresenceExternal { room, answer } => {
                answer.set(crate::home::presence_of(self, &room));
            }
            ShardMsg::Shutdown => {
                self.stopping.set(true);
                if let Some(w) = self.stop_waker.borrow_mut().take() {
                    w.wake();
                }
            }
        }
    }

    fn deliver(self: &Rc<Self>, delivery: &Delivery) {
        // A personal room's owner is in no member list (see `Conn::personal`): its connections
        // here are found by user, once their initial join was answered.
        let owner: Vec<Rc<Conn>> =
            match delivery.room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX) {
                Some(user) => {
                    let conns = self.conns.borrow();
                    self.shared
                        .user_conns(user)
                        .iter()
                        .filter(|id| shard_of(**id) == self.id)
                        .filter_map(|id| conns.get(id))
                        .filter(|c| c.receives_personal())
                        .cloned()
                        .collect()
                }
                None => Vec::new(),
            };
        // Iterating under the borrow (no copy of the member list): `enqueue` and what it may call
        // (`close`, spawning a writer) never touch `local_rooms`.
        let rooms = self.local_rooms.borrow();
        let listed = rooms.get(&delivery.room).map_or(&[][..], |m| &m[..]);
        let mut count = 0u64;
        let mut shed = 0u64;
        // Presence is the first thing dropped under overload: a connection whose queue is already
        // past half its bound gets no diff (it would only move it toward the 4011 close); the
        // `presence` op still answers exactly.
        let shed_above = self.shared.config.max_queued_bytes / 2;
        for conn in listed.iter().chain(&owner) {
            if let Some(frame) = delivery.frames.get(conn.key) {
                if delivery.sheddable && conn.backlog() > shed_above {
                    shed += 1;
                    continue;
                }
                conn.enqueue(self, frame);
                count += 1;
            }
        }
        if shed > 0 {
            self.shared
                .metrics
                .presence_shed
                .fetch_add(shed, Ordering::Relaxed);
        }
        self.shared
            .metrics
            .deliveries
            .fetch_add(count, Ordering::Relaxed);
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

    /// Handles `msg` here when `target` is this shard, else puts it in `target`'s mailbox.
    pub(crate) fn dispatch(self: &Rc<Self>, target: usize, msg: ShardMsg) {
        if target == self.id {
            self.handle(msg);
        } else {
            self.shared.send(target, msg);
        }
    }

    /// This shard's connections that hold (or are joining) `room`.
    fn conns_in(&self, room: &RoomId) -> Vec<Rc<Conn>> {
        self.conns
            .borrow()
            .values()
            .filter(|c| c.membership(room).is_some())
            .cloned()
            .collect()
    }

    /// Sends a reply to a connection, wherever it lives.
    pub(crate) fn reply(self: &Rc<Self>, conn: ConnId, reply: Reply) {
        if shard_of(conn) == self.id {
            crate::ws::on_reply(self, conn, reply);
        } else {
            self.shared
                .send(shard_of(conn), ShardMsg::Reply { conn, reply });
        }
    }
}

/// The periodic duties of a shard: heartbeats, idle and expiry closes, refresh warnings,
/// revocation checks, presence flushes.
pub(crate) async fn ticker(shard: Rc<Shard>) {
    let cfg = &shard.shared.config;
    let tick = cfg
        .presence_batch
        .clamp(Duration::from_millis(20), Duration::from_millis(500));
    let mut last_scan = 0u64;
    let mut scans = 0usize;
    loop {
        monoio::time::sleep(tick).await;
        if shard.stopping.get() && shard.conns.borrow().is_empty() {
            return;
        }
        send_due(&shard);
        crate::home::flush_presence(&shard);
        let now = now_ms();
        if now.saturating_sub(last_scan) < 250 {
            continue;
        }
        last_scan = now;
        // Each shard sweeps its share of the per-IP table's stripes, one per scan: every stripe
        // is swept about every `STRIPES / shards` scans (2 s on 2 shards).
        scans = scans.wrapping_add(1);
        crate::home::expire_history(&shard);
        shard
            .shared
            .sweep_ips(scans.wrapping_mul(shard.shared.config.shards) + shard.id);
        let heartbeat = u64::try_from(cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
        let idle_limit = heartbeat.saturating_mul(2).saturating_add(10_000);
        let grace = u64::try_from(cfg.expiry_grace.as_millis()).unwrap_or(0);
        let conns: Vec<Rc<Conn>> = shard.conns.borrow().values().cloned().collect();
        for conn in conns {
            if conn.closing.get().is_some() || !conn.ready.get() {
                continue;
            }
            let mono = crate::clock::monotonic_ms32();
            if u64::from(mono.wrapping_sub(conn.last_seen_ms.get())) > idle_limit {
                conn.close(&shard, CloseCode::IDLE_TIMEOUT);
                continue;
            }
            let (expires, revoked) = {
                let identity = conn.identity.borrow();
                (identity.expires_at_ms, shard.shared.auth.revoked(&identity))
            };
            if let Some(revoked) = revoked {
                conn.close(&shard, revoked.close_code());
                continue;
            }
            // The warning goes first even when a busy shard scans only after expiry, so that a
            // client always learns why it is closed.
            if !conn.refresh_warned.get() && now + 60_000 >= expires {
                conn.refresh_warned.set(true);
                crate::ws::send_refresh_required(&shard, &conn, expires);
            }
            if now >= expires.saturating_add(grace) {
                conn.close(&shard, CloseCode::UNAUTHORIZED);
                continue;
            }
            if u64::from(mono.wrapping_sub(conn.last_ping_ms.get())) >= heartbeat {
                conn.last_ping_ms.set(mono);
                crate::ws::send_ping(&shard, &conn);
            }
        }
    }
}

/// Writes what every listed connection has queued, once the task that queued it (the mailbox,
/// the reader, a handshake) yields: everything queued for a connection in that time goes out in
/// one non-blocking `send`, with no task and no io_uring round trip unless the kernel's buffer is
/// full.
pub(crate) async fn flusher(shard: Rc<Shard>) {
    struct Listed<'a>(&'a Shard);
    impl Future for Listed<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0.to_flush.borrow().is_empty() {
                *self.0.flusher_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }
    }
    let mut batch = Vec::new();
    loop {
        Listed(&shard).await;
        std::mem::swap(&mut batch, &mut *shard.to_flush.borrow_mut());
        for conn in batch.drain(..) {
            conn.flush_now(&shard);
        }
        shard.probe_load();
    }
}

/// Sends the flushes held for the write delay once due (see [`Shard::defer_flush`]).
pub(crate) async fn deferred_flusher(shard: Rc<Shard>) {
    loop {
        std::future::poll_fn(|cx| {
            if shard.deferred.borrow().is_empty() {
                *shard.deferred_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let now = crate::clock::monotonic_us();
        let front = shard.deferred.borrow().front().map(|(due, _)| *due);
        if let Some(due) = front
            && due > now
        {
            monoio::time::sleep(Duration::from_micros(due - now)).await;
            continue;
        }
        loop {
            let next = {
                let mut deferred = shard.deferred.borrow_mut();
                match deferred.front() {
                    Some((due, _)) if *due <= now => deferred.pop_front(),
                    _ => None,
                }
            };
            let Some((_, conn)) = next else { break };
            conn.send_queued(&shard);
        }
    }
}

/// The busy write delay after a probe that found the shard's thread wanting the CPU `permille`
/// of the time (smoothed), `elapsed_us` after the last probe (see [`Shard::probe_load`]).
fn next_busy_delay(current: u32, permille: u64, elapsed_us: u64, max: u32) -> u32 {
    if elapsed_us > 10 * LOAD_PROBE_US {
        // The shard stopped flushing for a while: whatever load there was has passed.
        0
    } else if permille >= 900 {
        current.saturating_mul(2).clamp(1000.min(max), max)
    } else if permille < 500 {
        if current / 2 < 500 { 0 } else { current / 2 }
    } else {
        current
    }
}

/// How often a flushing shard looks at its load ([`Shard::probe_load`]), in µs.
const LOAD_PROBE_US: u64 = 20_000;

/// The shard thread's CPU demand so far, from `/proc/thread-self/schedstat` (opened on the shard's
/// thread at the first probe; a kernel without it leaves the busy write delay at zero).
#[derive(Default)]
pub(crate) struct LoadProbe {
    file: Option<std::fs::File>,
    unavailable: bool,
    at_us: u64,
    demand_ns: u64,
    /// The demand's moving average, in thousandths of wall time.
    demand_permille: u64,
}

impl LoadProbe {
    /// Nanoseconds this thread has run plus waited to run.
    fn read_demand_ns(&mut self) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        if self.unavailable {
            return None;
        }
        if self.file.is_none() {
            self.file = std::fs::File::open("/proc/thread-self/schedstat").ok();
        }
        let mut buf = [0u8; 96];
        let parsed = self.file.as_ref().and_then(|f| {
            let n = f.read_at(&mut buf, 0).ok()?;
            let text = std::str::from_utf8(&buf[..n]).ok()?;
            let mut fields = text.split_ascii_whitespace().map(|v| v.parse::<u64>().ok());
            let (run, wait) = (fields.next()??, fields.next()??);
            Some(run.saturating_add(wait))
        });
        if parsed.is_none() {
            self.unavailable = true;
        }
        parsed
    }
}

/// Sends the delayed messages that are due (they were queued with one fixed delay, so in order).
fn send_due(shard: &Rc<Shard>) {
    let now = crate::clock::monotonic_us();
    loop {
        let next = {
            let mut delayed = shard.delayed.borrow_mut();
            match delayed.front() {
                Some((due, _, _)) if *due <= now => delayed.pop_front(),
                _ => None,
            }
        };
        let Some((_, home, msg)) = next else { break };
        shard.dispatch(home, msg);
    }
}

/// Reads the shard's WebSocket connections as they turn readable: one task for all of them, so
/// that an idle connection costs no task and no operation in flight (see [`ReadySet`]).
pub(crate) async fn reader(shard: Rc<Shard>) {
    let mut tokens = Vec::new();
    loop {
        if let Err(e) = shard.ready_set.wait().await {
            log::error!("shard {}: waiting for readable connections: {e}", shard.id);
            monoio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        loop {
            shard.ready_set.ready(&mut tokens);
            for &id in &tokens {
                if let Some(conn) = shard.conn(id) {
                    crate::ws::on_readable(&shard, &conn);
                }
            }
            if !ReadySet::batch_full(&tokens) {
                break;
            }
            // A long burst: let writers and the mailbox run between batches.
            yield_now().await;
        }
    }
}

/// Drains the shard's mailbox forever.
pub(crate) async fn dispatcher(shard: Rc<Shard>) {
    let mailbox = &shard.shared.mailboxes[shard.id];
    loop {
        mailbox.ready().await;
        let mut handled = 0i64;
        while let Some(msg) = mailbox.pop() {
            handled += 1;
            shard.handle(msg);
            // Let connections and writers run between long bursts.
            if handled % 256 == 0 {
                shard.shared.metrics.queue_depth(shard.id, -256);
                handled = 0;
                yield_now().await;
            }
        }
        shard.shared.metrics.queue_depth(shard.id, -handled);
        if shard.stopping.get() && shard.conns.borrow().is_empty() && mailbox.len() == 0 {
            return;
        }
    }
}

/// Yields once to the shard's other tasks.
pub(crate) fn yield_now() -> impl Future<Output = ()> {
    struct YieldNow(bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
    YieldNow(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_write_delay_doubles_under_saturation_holds_then_halves_away() {
        let max = 20_000;
        let mut delay = 0;
        let mut seen = Vec::new();
        for _ in 0..7 {
            delay = next_busy_delay(delay, 950, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        // Between the thresholds (the delay itself lowers the load) it holds.
        assert_eq!(next_busy_delay(delay, 899, LOAD_PROBE_US, max), 20_000);
        assert_eq!(next_busy_delay(delay, 500, LOAD_PROBE_US, max), 20_000);
        // Under 50 % it halves, and under half a millisecond it is off.
        let mut seen = Vec::new();
        for _ in 0..6 {
            delay = next_busy_delay(delay, 499, LOAD_PROBE_US, max);
            seen.push(delay);
        }
        assert_eq!(seen, [10_000, 5000, 2500, 1250, 625, 0]);
        // A pause in flushing resets it at once; a smaller cap bounds the first step too.
        assert_eq!(next_busy_delay(20_000, 1000, 11 * LOAD_PROBE_US, max), 0);
        assert_eq!(next_busy_delay(0, 1000, LOAD_PROBE_US, 300), 300);
    }

    #[test]
    fn the_load_probe_reads_a_growing_demand_or_turns_itself_off() {
        let mut probe = LoadProbe::default();
        let Some(first) = probe.read_demand_ns() else {
            // No schedstat on this kernel: the probe stays off for good.
            assert!(probe.read_demand_ns().is_none());
            return;
        };
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        let second = probe.read_demand_ns().expect("read again");
        assert!(second >= first + 10_000_000, "{first} then {second}");
    }
}
