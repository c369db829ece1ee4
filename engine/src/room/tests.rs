//! The room rules of SPEC §4–§7 that live in the core, checked without a runtime: order and `seq`,
//! epochs, `max_members`, the per-room rate, personal rooms, presence diffs, history bounds and the
//! resume decision; and a property test over any sequence of joins, leaves and publishes.

use std::time::Duration;

use proptest::prelude::*;
use protocol::compression::{Compressor, DEFAULT_LEVEL};
use protocol::envelope::{Format, Value, decode_value};

use super::*;
use crate::config::RateSpec;
use history::RoomBounds;

fn rules() -> RoomRules {
    RoomRules {
        shared: false,
        shards: 2,
        max_room_members: 1000,
        implicit_rooms: true,
        history: RoomBounds {
            max_len: 100,
            max_bytes: 1 << 20,
            ttl_ms: 300_000,
        },
        history_budget: 16 << 20,
        publish_per_room: RateSpec {
            count: 0,
            per: Duration::from_secs(1),
            burst: 0,
        },
        compression_threshold: 1024,
        max_recovery_bytes: 1 << 20,
    }
}

fn new_core() -> RoomCore {
    RoomCore::new(0, rules(), Arc::from("inst"))
}

fn room(id: &str) -> RoomId {
    RoomId::parse(id).unwrap()
}

fn user(id: &str) -> Arc<str> {
    Arc::from(id)
}

struct Env {
    core: RoomCore,
    zstd: Compressor,
    now: u64,
}

impl Env {
    fn new(core: RoomCore) -> Self {
        Self {
            core,
            zstd: Compressor::new(DEFAULT_LEVEL).unwrap(),
            now: 1_000,
        }
    }

    fn join_as(&mut self, r: &str, u: &str, shard: usize) -> Result<JoinAnswer, Refused> {
        self.join_with(r, u, shard, None, None)
    }

    fn join_with(
        &mut self,
        r: &str,
        u: &str,
        shard: usize,
        resume: Option<&ResumeFrom>,
        settings: Option<&RoomSettings>,
    ) -> Result<JoinAnswer, Refused> {
        let (r, u) = (room(r), user(u));
        let request = JoinRequest {
            room: &r,
            user: &u,
            name: &u,
            shard,
            key: FrameKey::Json,
            wants_presence: true,
            already: false,
            resume,
            settings,
        };
        self.core.join(&request, None, self.now)
    }

    fn leave_as(&mut self, r: &str, u: &str, shard: usize) {
        let u = user(u);
        self.core
            .leave(&room(r), shard, &u, &u, FrameKey::Json, || false);
    }

    fn publish(&mut self, r: &str, u: &str, n: u64) -> Result<Published, Refused> {
        let u = user(u);
        let message = NewMessage {
            room: room(r),
            user: &u,
            name: &u,
            data: Value::UInt(n),
            event: None,
        };
        self.core.publish(message, None, self.now, &mut self.zstd)
    }

    fn history(&mut self, r: &str, since: u64) -> (Vec<u64>, Arc<str>) {
        let (messages, epoch) = self.core.history(&room(r), since, 100, None, self.now);
        (messages.iter().map(|m| m.seq).collect(), epoch)
    }
}

/// The `data` of a delivered message frame (JSON key).
fn delivered_data(published: &Published) -> Value {
    let frame = published
        .fanout
        .delivery
        .frames
        .get(FrameKey::Json)
        .expect("a JSON frame");
    // A server frame: 2 header bytes below 126 bytes of payload.
    let message = decode_value(&frame[2..], Format::Json, &Default::default()).unwrap();
    message.get("data").cloned().unwrap()
}

#[test]
fn seq_counts_messages_in_order_and_every_member_shard_gets_them() {
    let mut env = Env::new(new_core());
    env.join_as("chat", "a", 0).unwrap();
    env.join_as("chat", "b", 1).unwrap();
    let seqs: Vec<u64> = (0..5)
        .map(|n| env.publish("chat", "a", n).unwrap().seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let published = env.publish("chat", "b", 42).unwrap();
    assert_eq!(published.fanout.targets, [0, 1]);
    assert_eq!(delivered_data(&published), Value::UInt(42));
    // A join answers the room's latest seq, past which it receives messages.
    assert_eq!(env.join_as("chat", "c", 1).unwrap().seq, 6);
    // A room with no member has no home state: a publish there is refused.
    assert_eq!(
        env.publish("nowhere", "a", 1).unwrap_err().code,
        ErrorCode::NotJoined
    );
}

#[test]
fn an_ephemeral_room_gets_a_new_epoch_when_it_comes_back() {
    let mut env = Env::new(new_core());
    let first = env.join_as("tmp", "a", 0).unwrap().epoch;
    assert!(first.starts_with("inst"));
    env.publish("tmp", "a", 1).unwrap();
    env.leave_as("tmp", "a", 0);
    let second = env.join_as("tmp", "a", 0).unwrap();
    assert_ne!(second.epoch, first);
    assert_eq!(second.seq, 0, "its history and seq went with it");
    // An unknown room answers history with a fresh epoch every time.
    let (none, e1) = env.history("ghost", 0);
    let (_, e2) = env.history("ghost", 0);
    assert!(none.is_empty());
    assert_ne!(e1, e2);
}

#[test]
fn a_room_is_full_at_its_limit_and_a_full_new_room_leaves_no_state() {
    let mut env = Env::new(new_core());
    let settings = RoomSettings {
        max_members: 2,
        presence: true,
        history: true,
    };
    env.join_with("club", "a", 0, None, Some(&settings))
        .unwrap();
    env.join_with("club", "b", 1, None, Some(&settings))
        .unwrap();
    let refused = env
        .join_with("club", "c", 0, None, Some(&settings))
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::RoomFull);
    env.leave_as("club", "a", 0);
    assert!(env.join_with("club", "c", 0, None, Some(&settings)).is_ok());
    // A limit of zero: the ephemeral room made for the join goes again.
    let mut core = new_core();
    core.rules.max_room_members = 0;
    let mut env = Env::new(core);
    assert_eq!(
        env.join_as("empty", "a", 0).unwrap_err().code,
        ErrorCode::RoomFull
    );
    assert!(env.core.rooms.is_empty());
    // No implicit rooms: an unknown room is not found.
    let mut core = new_core();
    core.rules.implicit_rooms = false;
    let mut env = Env::new(core);
    assert_eq!(
        env.join_as("unknown", "a", 0).unwrap_err().code,
        ErrorCode::NotFound
    );
}

#[test]
fn the_per_room_rate_refuses_without_taking_a_seq() {
    let mut core = new_core();
    core.rules.publish_per_room = RateSpec {
        count: 2,
        per: Duration::from_secs(60),
        burst: 0,
    };
    let mut env = Env::new(core);
    env.join_as("busy", "a", 0).unwrap();
    assert_eq!(env.publish("busy", "a", 1).unwrap().seq, 1);
    assert_eq!(env.publish("busy", "a", 2).unwrap().seq, 2);
    assert_eq!(
        env.publish("busy", "a", 3).unwrap_err().code,
        ErrorCode::RateLimited
    );
    env.now += 30_000;
    assert_eq!(env.publish("busy", "a", 4).unwrap().seq, 3);
}

#[test]
fn a_personal_room_follows_its_owner_without_counting_it() {
    let mut env = Env::new(new_core());
    let owner = user("u1");
    let r = room("user:u1");
    let online = OnlineUser {
        name: Arc::from("ann"),
        conns: 2,
        shards: vec![0, 1],
    };
    // The initial join at connect keeps no state.
    let initial = JoinRequest {
        room: &r,
        user: &owner,
        name: &owner,
        shard: 0,
        key: FrameKey::Json,
        wants_presence: false,
        already: false,
        resume: None,
        settings: None,
    };
    assert!(!initial.needs_owner());
    let answer = env.core.join(&initial, None, env.now).unwrap();
    assert_eq!((answer.seq, &*answer.epoch), (0, ""));
    assert!(env.core.rooms.is_empty());
    // A message brings it up and reaches the owner's shards.
    let message = NewMessage {
        room: r.clone(),
        user: &owner,
        name: &owner,
        data: Value::Null,
        event: None,
    };
    let published = env
        .core
        .publish(message, Some(&online), env.now, &mut env.zstd)
        .unwrap();
    assert_eq!((published.seq, published.fanout.targets), (1, vec![0, 1]));
    // Presence shows the owner with its connections, counted nowhere else.
    let presence = env.core.presence(&r, Some(&online));
    assert_eq!(presence.len(), 1);
    assert_eq!((presence[0].user.as_str(), presence[0].conns), ("u1", 2));
    // Another user (an admin) needs the owner online to get in.
    let admin = user("root");
    let by_admin = JoinRequest {
        user: &admin,
        name: &admin,
        wants_presence: true,
        ..initial.clone()
    };
    assert!(by_admin.needs_owner());
    let mut offline = Env::new(new_core());
    assert_eq!(
        offline.core.join(&by_admin, None, 0).unwrap_err().code,
        ErrorCode::NotFound
    );
    assert_eq!(env.core.join(&by_admin, Some(&online), 0).unwrap().seq, 1);
    // It lasts while the owner is online, and goes with the owner's last connection.
    env.core
        .leave(&r, 0, &admin, &admin, FrameKey::Json, || true);
    env.core
        .leave(&r, 0, &owner, &owner, FrameKey::Json, || true);
    assert!(env.core.rooms.contains_key(&r));
    env.core
        .leave(&r, 0, &owner, &owner, FrameKey::Json, || false);
    assert!(env.core.rooms.is_empty());
}

#[test]
fn presence_diffs_coalesce_per_window_and_cancel_out() {
    let mut env = Env::new(new_core());
    env.join_as("lobby", "a", 0).unwrap();
    env.join_as("lobby", "b", 1).unwrap();
    // A second connection of `a` is no new presence.
    env.join_as("lobby", "a", 1).unwrap();
    let fanouts = env.core.flush_presence(&mut env.zstd);
    assert_eq!(fanouts.len(), 1);
    assert_eq!(fanouts[0].targets, [0, 1]);
    assert!(fanouts[0].delivery.sheddable);
    let frame = fanouts[0].delivery.frames.get(FrameKey::Json).unwrap();
    let diff = decode_value(&frame[2..], Format::Json, &Default::default()).unwrap();
    let joined: Vec<&str> = diff
        .get("joined")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|e| e.get("user").and_then(Value::as_str).unwrap())
        .collect();
    assert_eq!(joined, ["a", "b"]);
    // A join and a leave within one window cancel out; one connection of two leaving is none.
    env.join_as("lobby", "c", 0).unwrap();
    env.leave_as("lobby", "c", 0);
    env.leave_as("lobby", "a", 1);
    assert!(env.core.flush_presence(&mut env.zstd).is_empty());
    assert!(!env.core.presence_waiting());
    // The last connection of `a`: one diff with `left`.
    env.leave_as("lobby", "a", 0);
    assert_eq!(env.core.flush_presence(&mut env.zstd).len(), 1);
    // A room with presence switched off sends none, and its query still answers.
    let quiet = RoomSettings {
        max_members: 10,
        presence: false,
        history: true,
    };
    env.join_with("quiet", "a", 0, None, Some(&quiet)).unwrap();
    assert!(env.core.flush_presence(&mut env.zstd).is_empty());
    assert_eq!(env.core.presence(&room("quiet"), None).len(), 1);
}

fn resume_from(seq: u64, epoch: &str) -> ResumeFrom {
    ResumeFrom {
        seq,
        epoch: epoch.to_owned(),
        upto: None,
        valid: true,
    }
}

fn recovered(answer: &JoinAnswer) -> Option<Vec<u64>> {
    match answer.recovery.as_ref()? {
        Recovery::Recovered(messages) => Some(messages.iter().map(|m| m.seq).collect()),
        Recovery::Lost => None,
    }
}

#[test]
fn resume_recovers_exactly_the_gap_or_says_it_is_lost() {
    let mut core = new_core();
    core.rules.history.max_len = 5;
    let mut env = Env::new(core);
    let epoch = env.join_as("feed", "a", 0).unwrap().epoch;
    for n in 1..=8 {
        env.publish("feed", "a", n).unwrap();
    }
    // History holds 4..=8.
    let again =
        |env: &mut Env, from: ResumeFrom| env.join_with("feed", "b", 1, Some(&from), None).unwrap();
    assert_eq!(
        recovered(&again(&mut env, resume_from(5, &epoch))),
        Some(vec![6, 7, 8])
    );
    assert_eq!(
        recovered(&again(&mut env, resume_from(3, &epoch))),
        Some(vec![4, 5, 6, 7, 8])
    );
    assert_eq!(
        recovered(&again(&mut env, resume_from(8, &epoch))),
        Some(vec![])
    );
    // A gap history no longer covers, another epoch, or an invalid session: lost.
    assert_eq!(recovered(&again(&mut env, resume_from(2, &epoch))), None);
    assert_eq!(recovered(&again(&mut env, resume_from(5, "inst99"))), None);
    let invalid = ResumeFrom {
        valid: false,
        ..resume_from(5, &epoch)
    };
    assert_eq!(recovered(&again(&mut env, invalid)), None);
    // A room the connection already holds recovers up to its join's seq only.
    let upto = ResumeFrom {
        upto: Some(7),
        ..resume_from(5, &epoch)
    };
    assert_eq!(recovered(&again(&mut env, upto)), Some(vec![6, 7]));
    // More than the connection's queue could take at once: lost, so the client pages instead.
    env.core.rules.max_recovery_bytes = 2 * history::MESSAGE_OVERHEAD;
    assert_eq!(recovered(&again(&mut env, resume_from(5, &epoch))), None);
}

#[test]
fn history_keeps_to_its_count_age_and_the_shard_budget() {
    let mut core = new_core();
    core.rules.history.max_len = 3;
    core.rules.history.ttl_ms = 10_000;
    let mut env = Env::new(core);
    env.join_as("h", "a", 0).unwrap();
    for n in 1..=5 {
        env.publish("h", "a", n).unwrap();
    }
    assert_eq!(env.history("h", 0).0, [3, 4, 5]);
    assert_eq!(env.history("h", 4).0, [5]);
    // Age, from the expiry sweep alone.
    env.now += 10_001;
    env.core.expire_history(env.now);
    assert_eq!(env.core.history_bytes(), 0);
    assert!(env.history("h", 0).0.is_empty());
    // A shard budget of two messages: the oldest of any room goes first.
    let mut core = new_core();
    let one = {
        let mut probe = Env::new(new_core());
        probe.join_as("p", "a", 0).unwrap();
        probe.publish("p", "a", 1).unwrap();
        probe.core.history_bytes()
    };
    core.rules.history_budget = 2 * one;
    let mut env = Env::new(core);
    env.join_as("x", "a", 0).unwrap();
    env.join_as("y", "a", 0).unwrap();
    env.publish("x", "a", 1).unwrap();
    env.now += 1;
    env.publish("y", "a", 2).unwrap();
    env.now += 1;
    let third = env.publish("y", "a", 3).unwrap();
    assert_eq!(third.evicted, 1);
    assert!(env.history("x", 0).0.is_empty());
    assert_eq!(env.history("y", 0).0, [1, 2]);
    // A room with history switched off keeps none.
    let off = RoomSettings {
        max_members: 10,
        presence: true,
        history: false,
    };
    env.join_with("y", "b", 0, None, Some(&off)).unwrap();
    assert!(env.history("y", 0).0.is_empty());
    env.publish("y", "a", 4).unwrap();
    assert!(env.history("y", 0).0.is_empty());
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Step {
    Join { user: u8, shard: u8, room: u8 },
    Leave { user: u8, shard: u8, room: u8 },
    Publish { room: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4, 0u8..2, 0u8..3).prop_map(|(user, shard, room)| Step::Join { user, shard, room }),
        (0u8..4, 0u8..2, 0u8..3).prop_map(|(user, shard, room)| Step::Leave { user, shard, room }),
        (0u8..3).prop_map(|room| Step::Publish { room }),
    ]
}

proptest! {
    /// Any sequence of joins, leaves and publishes keeps member counts, per-shard counts,
    /// presence and `seq` equal to a plain model of them (a connection is a user on a shard;
    /// the model leaves only what it joined, as connections do).
    #[test]
    fn counts_presence_and_seq_follow_any_sequence(steps in proptest::collection::vec(step(), 0..80)) {
        let mut env = Env::new(new_core());
        // (room, user, shard) → connections; room → seq of its current life.
        let mut joined: HashMap<(u8, u8, u8), u32> = HashMap::new();
        let mut seqs: HashMap<u8, u64> = HashMap::new();
        for step in steps {
            match step {
                Step::Join { user, shard, room } => {
                    let answer = env
                        .join_as(&format!("r{room}"), &format!("u{user}"), usize::from(shard))
                        .unwrap();
                    prop_assert_eq!(answer.seq, seqs.get(&room).copied().unwrap_or(0));
                    *joined.entry((room, user, shard)).or_default() += 1;
                }
                Step::Leave { user, shard, room } => {
                    let Some(n) = joined.get_mut(&(room, user, shard)) else { continue };
                    *n -= 1;
                    if *n == 0 {
                        joined.remove(&(room, user, shard));
                    }
                    env.leave_as(&format!("r{room}"), &format!("u{user}"), usize::from(shard));
                    if !joined.keys().any(|(r, _, _)| *r == room) {
                        // The ephemeral room vanished with its last member.
                        seqs.remove(&room);
                    }
                }
                Step::Publish { room } => {
                    let result = env.publish(&format!("r{room}"), "u0", 0);
                    if joined.keys().any(|(r, _, _)| *r == room) {
                        let seq = seqs.entry(room).or_default();
                        *seq += 1;
                        prop_assert_eq!(result.map(|p| p.seq).ok(), Some(*seq));
                    } else {
                        prop_assert_eq!(result.map(|p| p.seq).map_err(|r| r.code), Err(ErrorCode::NotJoined));
                    }
                }
            }
            for room in 0u8..3 {
                let id = self::room(&format!("r{room}"));
                let members: u32 = joined.iter().filter(|((r, _, _), _)| *r == room).map(|(_, n)| n).sum();
                match env.core.rooms.get(&id) {
                    Some(home) => {
                        prop_assert_eq!(home.members, members);
                        for shard in 0u8..2 {
                            let here: u32 = joined
                                .iter()
                                .filter(|((r, _, s), _)| *r == room && *s == shard)
                                .map(|(_, n)| n)
                                .sum();
                            prop_assert_eq!(home.shard_members[usize::from(shard)], here);
                        }
                        prop_assert_eq!(home.seq, seqs.get(&room).copied().unwrap_or(0));
                    }
                    None => prop_assert_eq!(members, 0),
                }
                let mut expected: Vec<(String, u32)> = (0u8..4)
                    .filter_map(|u| {
                        let n: u32 = joined
                            .iter()
                            .filter(|((r, user, _), _)| *r == room && *user == u)
                            .map(|(_, n)| n)
                            .sum();
                        (n > 0).then(|| (format!("u{u}"), n))
                    })
                    .collect();
                expected.sort();
                let got: Vec<(String, u32)> = env
                    .core
                    .presence(&id, None)
                    .into_iter()
                    .map(|e| (e.user, e.conns))
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }
}
