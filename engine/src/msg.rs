//! The messages shards send each other: to a room's home (join, leave, publish, queries), to a
//! connection's shard (answers, deliveries, closes), and to every shard (kicks, revocations,
//! shutdown). Plain data; the handlers live with their owners (`home`, `ws`).

use std::sync::Arc;

use protocol::envelope::{PresenceEntry, RoomId, Value};
use protocol::{CloseCode, ErrorCode};

use crate::conn::ConnId;
use crate::frames::{Delivery, FrameKey};
use crate::home::JoinMsg;
use crate::room::Recovery;
use crate::room::history::StoredMessage;
use crate::rooms::{Answer, Countdown, RoomSettings};

/// A message between shards.
pub(crate) enum ShardMsg {
    /// To a room's home: count a connection in.
    Join(JoinMsg),
    /// To a room's home: count a connection out.
    Leave {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        key: FrameKey,
    },
    /// To a room's home: sequence and fan out.
    Publish {
        room: RoomId,
        conn: ConnId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        id: Option<u64>,
    },
    /// To a room's home.
    PresenceQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
    },
    /// To a room's home.
    HistoryQuery {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        since: u64,
        limit: u64,
    },
    /// To a connection's shard: the join was counted.
    Joined(Box<Joined>),
    /// To a connection's shard: the join was refused.
    JoinFailed {
        room: RoomId,
        conn: ConnId,
        id: Option<u64>,
        initial: bool,
        code: ErrorCode,
        message: &'static str,
    },
    /// To every shard with members: a message or presence diff for a room.
    Deliver(Arc<Delivery>),
    /// To a connection's shard: an answer to one request.
    Reply { conn: ConnId, reply: Reply },
    /// To a connection's shard: close it.
    Close { conn: ConnId, code: CloseCode },
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
    /// To every shard: ask the policy again for every room each connection of `user` holds (the
    /// user lost the admin role).
    ReauthorizeUser {
        user: Arc<str>,
        done: Arc<Countdown>,
    },
    /// To a room's home: forget the room (deleted), history included.
    DropRoom { room: RoomId, done: Arc<Countdown> },
    /// To a room's home: a publish from outside a connection (the HTTP API).
    PublishExternal {
        room: RoomId,
        user: Arc<str>,
        name: Arc<str>,
        data: Value,
        settings: Option<RoomSettings>,
        answer: Arc<Answer<Result<u64, ErrorCode>>>,
    },
    /// To a room's home: its presence, for the HTTP API.
    PresenceExternal {
        room: RoomId,
        answer: Arc<Answer<Vec<PresenceEntry>>>,
    },
    /// Stop accepting, close every connection with 1001, exit.
    Shutdown,
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
