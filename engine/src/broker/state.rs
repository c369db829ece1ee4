//! What a shard keeps of the shared broker (Redis) for the rooms homed on it: its two
//! connections to each Redis master (one master, or each master of a Redis Cluster with the map
//! of its slots), the room channels it subscribed and what waits on them, and the handlers of
//! the commands in flight. Plain state, held by the shard; `broker` acts on it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use protocol::ErrorCode;
use protocol::envelope::{PresenceEntry, RoomId};

use crate::config::RedisSettings;
use crate::conn::ConnId;
use crate::msg::JoinMsg;
use crate::redis::cluster::{self, SlotMap};
use crate::redis::link::{Link, Role};
use crate::rooms::{Answer, Countdown};

/// What to do with a command's reply.
pub(crate) enum Pending {
    /// Nothing (a leave, a lease renewal, an announcement).
    Ignore,
    /// A join counted in Redis; the connection is counted here with the answer.
    Join(Box<JoinMsg>),
    /// A personal room's state (its owner's explicit join or resume).
    PersonalJoin(Box<JoinMsg>),
    /// A connection's publish: its `seq` goes back as the reply.
    Publish {
        conn: ConnId,
        id: Option<u64>,
        trace: u64,
        room: RoomId,
    },
    /// An HTTP publish.
    PublishExternal {
        answer: Arc<Answer<Result<u64, ErrorCode>>>,
    },
    /// A connection's `presence`.
    Presence { conn: ConnId, id: Option<u64> },
    /// The HTTP presence of a room.
    PresenceExternal {
        answer: Arc<Answer<Vec<PresenceEntry>>>,
    },
    /// A connection's `history`.
    History {
        conn: ConnId,
        id: Option<u64>,
        room: RoomId,
        since: u64,
    },
    /// A deleted room's keys removed (the countdown ticks on the reply).
    Dropped(Arc<Countdown>),
    /// A resumable session looked up (and taken) in Redis for this user.
    Resume(Box<crate::msg::ResumeCheck>, Arc<str>),
    /// A reply a task waits for (an upgrade asking the connection cap).
    Wake(Rc<Awaited>),
    /// The count of live nodes.
    Nodes,
    /// The messages of a gap, read from the room's stream.
    Repair { room: RoomId, upto: u64 },
    /// A Redis Cluster's map of slots (asked of the master at this address).
    Slots(Rc<str>),
    /// A shared limit's answer.
    Limit(Arc<Answer<crate::shared_limits::Verdict>>),
    /// A held value's answer, read as the question's kind says.
    Held(HeldKind, Arc<Answer<crate::held::HeldReply>>),
    /// A command sent to a Redis Cluster: sent again where a `MOVED` or `ASK` points.
    Routed(Box<Routed>),
}

impl Pending {
    /// What a cluster command was for, without its routing.
    pub(crate) fn unrouted(self) -> Pending {
        match self {
            Pending::Routed(routed) => routed.pending,
            other => other,
        }
    }
}

/// How a held value's reply reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeldKind {
    /// A value or nil.
    Value,
    /// 1 or 0.
    Done,
    /// `{id, token, record}` or empty.
    Found,
    /// A flat list of triples.
    Sessions,
}

/// A cluster command kept until its reply, so that a redirection can send it again.
pub(crate) struct Routed {
    pub(crate) pending: Pending,
    pub(crate) packed: Vec<u8>,
    pub(crate) redirects: u8,
}

/// One Redis master's connections, owned by this shard.
pub(crate) struct Master {
    pub(crate) addr: Rc<str>,
    pub(crate) commands: Rc<Link<Pending>>,
    pub(crate) subscriber: Rc<Link<()>>,
}

impl Master {
    pub(crate) fn new(addr: &str) -> Self {
        Self {
            addr: Rc::from(addr),
            commands: Rc::new(Link::new(Role::Commands)),
            subscriber: Rc::new(Link::new(Role::Subscriber)),
        }
    }
}

/// A reply a task awaits.
#[derive(Default)]
pub(crate) struct Awaited {
    value: RefCell<Option<Option<redis::Value>>>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Awaited {
    /// The reply (`None`: no reply will come, or an error reply).
    pub(crate) fn set(&self, value: Option<redis::Value>) {
        *self.value.borrow_mut() = Some(value);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// Resolves with an [`Awaited`] reply.
pub(crate) struct Reply(pub(crate) Rc<Awaited>);

impl Future for Reply {
    type Output = Option<redis::Value>;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(value) = self.0.value.borrow_mut().take() {
            return std::task::Poll::Ready(value);
        }
        *self.0.waker.borrow_mut() = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

/// A join whose Redis answer names messages this node has not delivered yet: it completes once
/// they are (or after a second).
pub(crate) struct HeldJoin {
    pub(crate) msg: Box<JoinMsg>,
    pub(crate) epoch: Arc<str>,
    pub(crate) seq: u64,
    pub(crate) presence: Vec<PresenceEntry>,
    pub(crate) recovered: redis::Value,
    pub(crate) since_ms: u32,
}

/// A room channel this shard subscribed (or is subscribing).
#[derive(Default)]
pub(crate) struct Channel {
    /// The subscription is confirmed: what is published from now on arrives.
    pub(crate) subscribed: bool,
    /// The last `seq` delivered here, and its epoch.
    pub(crate) last_seq: u64,
    pub(crate) epoch: Option<Arc<str>>,
    /// Joins waiting for the subscription (Redis is asked once it is confirmed, so that nothing
    /// published after the join's answer can be missed). Boxed: each moves on into a
    /// [`Pending`], which stays small.
    #[allow(clippy::vec_box)]
    pub(crate) waiting: Vec<Box<JoinMsg>>,
    /// Joins answered by Redis ahead of this node's deliveries.
    pub(crate) held: Vec<HeldJoin>,
    /// Connections whose join script is in flight.
    pub(crate) in_flight: Vec<ConnId>,
    /// Of those, the ones that left meanwhile (counted out when the answer comes).
    pub(crate) cancelled: Vec<ConnId>,
    /// A gap is being filled from the stream: the messages that arrived since, in order.
    pub(crate) repairing: Option<Vec<Arrived>>,
}

/// A message that came on a room's channel: its `seq`, epoch and body.
pub(crate) type Arrived = (u64, Arc<str>, Vec<u8>);

/// A shard's part of the shared broker.
pub(crate) struct Broker {
    pub(crate) settings: Rc<RedisSettings>,
    /// The masters this shard talks to: the one Redis, or (cluster) every master of the map.
    pub(crate) masters: RefCell<Vec<Master>>,
    /// Redis Cluster: which master serves each slot (`None` until first read).
    pub(crate) slots: RefCell<Option<SlotMap>>,
    /// Whether `slots` names a master for every slot (kept with it: `is_up` is asked per
    /// message).
    pub(crate) slots_cover: Cell<bool>,
    /// When the slot map was last asked for (monotonic ms): a burst of `MOVED` asks once.
    pub(crate) slots_asked_ms: Cell<u32>,
    /// The nodes of the service whose lease was live at the last look (this one included).
    pub(crate) live_nodes: RefCell<Vec<String>>,
    pub(crate) channels: RefCell<HashMap<RoomId, Channel>>,
    /// Epochs made here: the node, the shard and a counter.
    next_epoch: Cell<u64>,
    shard: usize,
    /// When this shard last renewed its leases (monotonic ms).
    pub(crate) last_touch_ms: Cell<u32>,
    /// Connections that ended while Redis was unreachable: taken out of the user caps in Redis
    /// once it is back.
    pub(crate) unreleased: RefCell<Vec<(Arc<str>, ConnId)>>,
}

impl Broker {
    pub(crate) fn new(settings: RedisSettings, shard: usize) -> Self {
        Self {
            masters: RefCell::new(settings.seeds.iter().map(|a| Master::new(a)).collect()),
            settings: Rc::new(settings),
            slots: RefCell::new(None),
            slots_cover: Cell::new(false),
            slots_asked_ms: Cell::new(0),
            live_nodes: RefCell::new(Vec::new()),
            channels: RefCell::new(HashMap::new()),
            next_epoch: Cell::new(0),
            shard,
            last_touch_ms: Cell::new(0),
            unreleased: RefCell::new(Vec::new()),
        }
    }

    /// Whether commands can be sent now: every master's command connection is up (and, in a
    /// cluster, every slot has a master).
    pub(crate) fn is_up(&self) -> bool {
        if self.settings.cluster && !self.slots_cover.get() {
            return false;
        }
        let masters = self.masters.borrow();
        !masters.is_empty() && masters.iter().all(|m| m.commands.is_up())
    }

    /// The master serving `key` (a key or a shard channel).
    fn route<'m>(&self, masters: &'m [Master], key: &[u8]) -> Option<&'m Master> {
        if !self.settings.cluster {
            return masters.first();
        }
        let slots = self.slots.borrow();
        let addr = slots.as_ref()?.master_of(cluster::slot(key))?;
        masters.iter().find(|m| &*m.addr == addr)
    }

    /// The address of the master serving `key`.
    pub(crate) fn master_addr(&self, key: &[u8]) -> Option<Rc<str>> {
        let masters = self.masters.borrow();
        self.route(&masters, key).map(|m| m.addr.clone())
    }

    /// Queues `cmd` (about `key`) on the connection of the master serving `key`; its reply
    /// goes to `pending`. Refused at once while that connection is down (`pending` comes back).
    pub(crate) fn send(
        &self,
        key: &str,
        cmd: &redis::Cmd,
        pending: Pending,
    ) -> Result<(), Pending> {
        let masters = self.masters.borrow();
        let Some(master) = self.route(&masters, key.as_bytes()) else {
            return Err(pending);
        };
        if self.settings.cluster {
            let routed = Routed {
                pending,
                packed: cmd.get_packed_command(),
                redirects: 0,
            };
            return master
                .commands
                .send(cmd, Pending::Routed(Box::new(routed)))
                .map_err(Pending::unrouted);
        }
        master.commands.send(cmd, pending)
    }

    /// `SSUBSCRIBE`s (or `SUNSUBSCRIBE`s) a shard channel on the connection of its master;
    /// false when that connection is down.
    pub(crate) fn subscription(&self, channel: &str, on: bool) -> bool {
        let masters = self.masters.borrow();
        let Some(master) = self.route(&masters, channel.as_bytes()) else {
            return false;
        };
        let mut cmd = redis::cmd(if on { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" });
        cmd.arg(channel);
        master.subscriber.send(&cmd, ()).is_ok()
    }

    /// An epoch for a room that has none in Redis yet: unique to this node, shard and moment.
    pub(crate) fn new_epoch(&self) -> String {
        let n = self.next_epoch.get();
        self.next_epoch.set(n + 1);
        let ms = crate::clock::now_ms();
        format!("{}-{}-{ms:x}{n:x}", self.settings.node_id, self.shard)
    }

    /// A lease's length in ms: three quarters of `node_ttl`, renewed every quarter, so that a
    /// dead node is noticed within `node_ttl`.
    pub(crate) fn lease_ms(&self) -> u64 {
        u64::try_from(self.settings.node_ttl.as_millis() * 3 / 4).unwrap_or(u64::MAX)
    }

    /// How often leases are renewed (a quarter of `node_ttl`).
    pub(crate) fn touch_every_ms(&self) -> u32 {
        u32::try_from(self.settings.node_ttl.as_millis() / 4).unwrap_or(u32::MAX)
    }
}
