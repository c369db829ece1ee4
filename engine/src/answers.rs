//! How the room side of a shard answers, whoever decided (the room core alone, or with the shared
//! broker): a join's answer or refusal to the connection's shard, a fan-out to every shard with
//! members, a published message's metrics. Carries answers; decides nothing.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use protocol::ErrorCode;
use protocol::envelope::RoomId;

use crate::clock::now_ms;
use crate::conn::ConnId;
use crate::conn::shard_of;
use crate::msg::{ConnMsg, JoinMsg, Joined, Reply};
use crate::room::{Fanout, JoinAnswer, JoinRequest, OnlineUser, Refused, owner_of};
use crate::shard::Shard;
use crate::state::Presence;

/// Hands one room's frames to every shard in `targets`.
pub(crate) fn fan_out(shard: &Rc<Shard>, fanout: Fanout) {
    let delivery = Arc::new(fanout.delivery);
    for target in fanout.targets {
        shard.dispatch(target, ConnMsg::Deliver(delivery.clone()));
    }
}

/// The connected owner of `room` when it is a personal room.
pub(crate) fn online_owner(shard: &Shard, room: &RoomId) -> Option<OnlineUser> {
    owner_of(room).and_then(|owner| shard.shared.state.online_user(owner))
}

/// Counts `msg`'s connection into its room in the room core of this shard.
pub(crate) fn join_locally(shard: &Rc<Shard>, msg: &JoinMsg) -> Result<JoinAnswer, Refused> {
    let request = JoinRequest {
        room: &msg.room,
        user: &msg.user,
        name: &msg.name,
        shard: shard_of(msg.conn),
        key: msg.key,
        wants_presence: msg.id.is_some(),
        already: msg.already,
        resume: msg.resume.as_ref(),
        settings: msg.settings.as_ref(),
    };
    let owner = if request.needs_owner() {
        online_owner(shard, &msg.room)
    } else {
        None
    };
    shard
        .rooms
        .borrow_mut()
        .join(&request, owner.as_ref(), now_ms())
}

/// Sends a join's answer (or refusal) to the connection's shard.
pub(crate) fn answer_join(shard: &Rc<Shard>, msg: JoinMsg, answer: Result<JoinAnswer, Refused>) {
    if let Ok(answer) = &answer {
        tracing::debug!(
            room = %msg.room,
            conn = msg.conn,
            user_id = %msg.user,
            seq = answer.seq,
            trace_id = %format_args!("{:x}", msg.trace),
            "joined"
        );
    }
    let reply = match answer {
        Ok(answer) => ConnMsg::Joined(Box::new(Joined {
            room: msg.room,
            conn: msg.conn,
            id: msg.id,
            initial: msg.initial,
            seq: answer.seq,
            epoch: answer.epoch,
            presence: answer.presence,
            recovery: answer.recovery,
        })),
        Err(Refused { code, message }) => {
            if code == ErrorCode::RoomFull {
                shard
                    .shared
                    .metrics
                    .room_full
                    .fetch_add(1, Ordering::Relaxed);
            }
            ConnMsg::JoinFailed {
                room: msg.room,
                conn: msg.conn,
                id: msg.id,
                initial: msg.initial,
                code,
                message,
            }
        }
    };
    shard.dispatch(shard_of(msg.conn), reply);
}

/// Counts a refused publish in the metrics (the room's rate) and returns its code.
pub(crate) fn count_refused_publish(shard: &Shard, refused: &Refused) -> ErrorCode {
    if refused.code == ErrorCode::RateLimited {
        shard.shared.metrics.rate_limited("publish_per_room");
    }
    refused.code
}

/// Answers a connection's refused publish (counted as [`count_refused_publish`] does).
pub(crate) fn refuse_publish(shard: &Shard, conn: ConnId, id: Option<u64>, refused: &Refused) {
    let code = count_refused_publish(shard, refused);
    shard.reply(
        conn,
        Reply::Error {
            id,
            code,
            message: refused.message,
        },
    );
}
