//! The messages shards send each other, by owner: [`RoomMsg`] to a room's home (handled by
//! `home`), [`ConnMsg`] to a connection's shard or to every shard (handled by `session`), and the
//! shard's own shutdown. Plain data: this module handles nothing.

use std::sync::Arc;

use protocol::envelope::{PresenceEntry, RoomId, Value};
use protocol::{CloseCode, ErrorCode};

use crate::conn::ConnId;
use crate::frames::{Delivery, FrameKey};
use crate::room::history::StoredMessage;
use crate::room::{Recovery, ResumeFrom};
use crate::rooms::{Answer, Countdown, RoomSettings};

/// A message in a shard's mailbox (or, to itself, its outbox).
pub(crate) enum ShardMsg {
    /// For the room side.
    Room(RoomMsg),
    /// For the connection side.
    Conn(ConnMsg),
    /// Stop accepting, close every connection with 1001, exit.
    Shutdown,
    /// To shard 0: tell the other nodes (see [`crate::announce`]).
    Announce(Vec<u8>),
    /// A question to a limit counted by every node, and where its answer goes.
    #[allow(clippy::type_complexity)]
    SharedLimit(
        Box<(
            crate::shared_limits::SharedAsk,
            Arc<Answer<crate::shared_limits::Verdict>>,
        )>,
    ),
    /// A question about a value kept in Redis, and where its answer goes.
    Held(Box<(crate::held::HeldAsk, Arc<Answer<crate::held::HeldReply>>)>),
}

/// To a room's home.
pub(crate) enum RoomMsg {
    /// Count a connection in.
    Join(JoinMsg),
    /// Count a connection out.
    Leave {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        key: FrameKey,
    },
    /// Sequence and fan out.
    Publish {
        /// The request's trace (see `Shard::begin_trace`).
        trace: u64,
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        /// The custom event it is published as (SPEC §8).
        event: Option<protocol::envelope::EventName>,
        id: Option<u64>,
    },
    /// The room's presence, for a connection.
    PresenceQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
    },
    /// The room's history, for a connection.
    HistoryQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        since: u64,
        limit: u64,
    },
    /// Forget the room (deleted), history included.
    DropRoom { room: RoomId, done: Arc<Countdown> },
    /// A publish from outside a connection (the HTTP API).
    PublishExternal {
        room: RoomId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        event: Option<protocol::envelope::EventName>,
        settings: Option<RoomSettings>,
        answer: Arc<Answer<Result<u64, ErrorCode>>>,
    },
    /// The room's presence, for the HTTP API.
    PresenceExternal {
        room: RoomId,
        answer: Arc<Answer<Vec<PresenceEntry>>>,
    },
}

/// A join as its home receives it.
pub(crate) struct JoinMsg {
    /// The request's trace (see `Shard::begin_trace`; 0 for the joins at connect).
    pub(crate) trace: u64,
    pub(crate) room: RoomId,
    pub(crate) conn: ConnId,
    pub(crate) user: Arc<str>,
    pub(crate) name: Arc<str>,
    pub(crate) key: FrameKey,
    pub(crate) id: Option<u64>,
    pub(crate) initial: bool,
    pub(crate) already: bool,
    pub(crate) resume: Option<ResumeFrom>,
    /// A persistent room's settings (`None` for ephemeral and personal rooms).
    pub(crate) settings: Option<RoomSettings>,
}

/// To a connection's shard, or to every shard.
pub(crate) enum ConnMsg {
    /// The join was counted.
    Joined(Box<Joined>),
    /// The join was refused.
    JoinFailed {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        initial: bool,
        code: ErrorCode,
        message: &'static str,
    },
    /// A message or presence diff for a room, to every shard with members.
    Deliver(Arc<Delivery>),
    /// An answer to one request.
    Reply { conn: ConnId, reply: Reply },
    /// Close a connection.
    Close { conn: ConnId, code: CloseCode },
    /// To every shard: close the connections the authenticator now finds revoked.
    CloseAllRevoked,
    /// To every shard: `allowed_origins` changed; close the connections whose origin is no longer
    /// allowed (4503).
    OriginsChanged,
    /// To every shard: close the connections of a user (of one session only, when given).
    CloseAuthorized {
        user: Arc<str>,
        session: Option<Arc<str>>,
        code: CloseCode,
    },
    /// To every shard: remove the connections of `user` (every user when None) from `room` and
    /// send them `kicked`.
    Kick {
        room: RoomId,
        user: Option<Arc<str>>,
        reason: &'static str,
        done: Arc<Countdown>,
    },
    /// To every shard: ask the policy again for every connection in `room` (its permission
    /// changed); those denied are kicked, the publish right of the others is updated.
    Reauthorize { room: RoomId, done: Arc<Countdown> },
    /// Whether a `resume`'s session was found in the shared store (several nodes); the resume
    /// goes on with that answer.
    ResumeChecked(Box<ResumeCheck>),
    /// To every shard: ask the policy again for every room each connection of `user` holds (the
    /// user lost the admin role).
    ReauthorizeUser {
        user: Arc<str>,
        done: Arc<Countdown>,
    },
}

/// A `resume` whose session is looked up in the shared store.
pub(crate) struct ResumeCheck {
    pub(crate) conn: ConnId,
    pub(crate) id: Option<u64>,
    pub(crate) session: String,
    pub(crate) rooms: Vec<(RoomId, protocol::envelope::ResumePoint)>,
    /// The session belongs to this user and has not expired.
    pub(crate) valid: bool,
}

/// A counted join, answered to the connection's shard.
pub(crate) struct Joined {
    pub(crate) room: RoomId,
    pub(crate) conn: ConnId,
    pub(crate) id: Option<u64>,
    pub(crate) initial: bool,
    /// The room's `seq` when the join was counted.
    pub(crate) seq: u64,
    pub(crate) epoch: Arc<str>,
    pub(crate) presence: Vec<PresenceEntry>,
    /// For a join made by `resume`: the missed messages, or that they are lost.
    pub(crate) recovery: Option<Recovery>,
}

/// An answer computed on a room's home, encoded on the connection's shard in its format.
pub(crate) enum Reply {
    Published {
        id: Option<u64>,
        seq: u64,
    },
    Presence {
        id: Option<u64>,
        presence: Vec<PresenceEntry>,
    },
    History {
        id: Option<u64>,
        messages: Vec<Arc<StoredMessage>>,
        epoch: Arc<str>,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: &'static str,
    },
}

impl From<RoomMsg> for ShardMsg {
    fn from(msg: RoomMsg) -> Self {
        Self::Room(msg)
    }
}

impl From<ConnMsg> for ShardMsg {
    fn from(msg: ConnMsg) -> Self {
        Self::Conn(msg)
    }
}
