//! Hands each message a shard receives to its owner: a [`RoomMsg`](crate::msg::RoomMsg) to the
//! room side (`home`), a [`ConnMsg`](crate::msg::ConnMsg) to the connection side (`session`), a
//! shutdown to the shard; and drains the shard's outbox. Decides nothing itself.

use std::rc::Rc;

use crate::msg::ShardMsg;
use crate::shard::Shard;

/// Handles every message the shard sent itself, in order, until none is left (handling one may
/// send more).
pub(crate) fn pump(shard: &Rc<Shard>) {
    while let Some(msg) = shard.next_local() {
        handle(shard, msg);
    }
}

/// Hands one message to its owner.
pub(crate) fn handle(shard: &Rc<Shard>, msg: ShardMsg) {
    match msg {
        ShardMsg::Room(msg) => crate::home::handle(shard, msg),
        ShardMsg::Conn(msg) => crate::session::handle(shard, msg),
        ShardMsg::Announce(message) => crate::broker::tell_nodes(shard, &message),
        ShardMsg::SharedLimit(ask) => {
            let (ask, answer) = *ask;
            crate::broker::shared_limit(shard, &ask, answer);
        }
        ShardMsg::Held(ask) => {
            let (ask, answer) = *ask;
            crate::broker::held(shard, &ask, answer);
        }
        ShardMsg::Shutdown => {
            shard.stopping.set(true);
            if let Some(w) = shard.stop_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}
