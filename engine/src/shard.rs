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

use protocol::CloseCode;
use protocol::compression::{Compressor, DEFAULT_LEVEL, Decompressor};
use protocol::envelope::RoomId;

use crate::buffers::BufferPool;
use crate::clock::now_ms;
use crate::conn::{Conn, ConnId, shard_of};
use crate::frames::Delivery;
use crate::msg::{Reply, ShardMsg};
use crate::room::{RoomCore, RoomRules};
use crate::shared::Shared;
use crate::sys::ReadySet;
use crate::writer::Writer;

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
    /// Scratch buffers for reads and for writes the kernel could not take at once.
    pub(crate) buffers: Rc<BufferPool>,
    /// The write path of this shard's connections.
    pub(crate) writer: Rc<Writer<Conn>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop_waker: RefCell<Option<std::task::Waker>>,
    /// Messages to send once due ([`crate::clock::monotonic_us`]), oldest first: the leaves of
    /// connections dropped abnormally, held for presence's grace (SPEC §6). Sent by [`ticker`].
    pub(crate) delayed: RefCell<std::collections::VecDeque<(u64, usize, ShardMsg)>>,
    /// The WebSocket connections, read by [`reader`] as they turn readable.
    pub(crate) ready_set: ReadySet,
}

impl Shard {
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
        Ok(Self {
            id,
            shared,
            conns: RefCell::new(HashMap::new()),
            local_rooms: RefCell::new(HashMap::new()),
            rooms: RefCell::new(rooms),
            delayed: RefCell::new(std::collections::VecDeque::new()),
            next_conn: Cell::new(1),
            compressor: RefCell::new(Compressor::new(DEFAULT_LEVEL).map_err(zstd)?),
            decompressor: RefCell::new(Decompressor::new().map_err(zstd)?),
            buffers,
            writer,
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
                    self.writer.close(&c, code);
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
                    self.writer.close(&conn, code);
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
                self.writer.enqueue(conn, frame);
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
            if conn.closing().is_some() || !conn.outbound.is_ready() {
                continue;
            }
            let mono = crate::clock::monotonic_ms32();
            if u64::from(mono.wrapping_sub(conn.last_seen_ms.get())) > idle_limit {
                shard.writer.close(&conn, CloseCode::IDLE_TIMEOUT);
                continue;
            }
            let (expires, revoked) = {
                let identity = conn.identity.borrow();
                (identity.expires_at_ms, shard.shared.auth.revoked(&identity))
            };
            if let Some(revoked) = revoked {
                shard.writer.close(&conn, revoked.close_code());
                continue;
            }
            // The warning goes first even when a busy shard scans only after expiry, so that a
            // client always learns why it is closed.
            if !conn.refresh_warned.get() && now + 60_000 >= expires {
                conn.refresh_warned.set(true);
                crate::ws::send_refresh_required(&shard, &conn, expires);
            }
            if now >= expires.saturating_add(grace) {
                shard.writer.close(&conn, CloseCode::UNAUTHORIZED);
                continue;
            }
            if u64::from(mono.wrapping_sub(conn.last_ping_ms.get())) >= heartbeat {
                conn.last_ping_ms.set(mono);
                crate::ws::send_ping(&shard, &conn);
            }
        }
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
