//! Several nodes as one service (SPEC §10) through the real binary: two or three `ringhub`
//! processes on one Redis (the local one, each test under a prefix of its own; the failure test
//! starts a `redis-server` of its own), clients spread over them.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use protocol::envelope::Value;
use ringhub_tests::{
    Client, Ended, OwnCluster, OwnRedis, Server, n, obj, s, shared_redis_url, start_nodes,
};

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{key} missing in {v:?}"))
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{key} missing in {v:?}"))
}

fn connect(server: &Server, user: &str) -> Client {
    let mut client = server.connect(&server.token(user), None);
    client.expect("welcome", None);
    client.set_timeout(Duration::from_secs(10));
    client
}

/// Joins `room`; the reply.
fn join(client: &mut Client, room: &str) -> Value {
    let id = client.request("join", &[("room", s(room))]);
    client.expect("reply", Some(id))
}

/// The next `message` of `room`, skipping everything else.
fn next_message(client: &mut Client, room: &str) -> Value {
    loop {
        let m = client.expect("message", None);
        if str_of(&m, "room") == room {
            return m;
        }
    }
}

/// A room's `presence` answer as (user, connections) pairs.
fn presence(client: &mut Client, room: &str) -> Vec<(String, u64)> {
    let id = client.request("presence", &[("room", s(room))]);
    let reply = client.expect("reply", Some(id));
    reply
        .get("presence")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|e| (str_of(e, "user").to_owned(), u64_of(e, "conns")))
        .collect()
}

/// Waits (bounded) until `f` holds, asking again every 50 ms.
fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within {within:?}");
}

/// Messages published concurrently on two nodes reach every member on every node in one order,
/// with consecutive `seq`s.
#[test]
fn fan_out_and_order_are_the_same_on_every_node() {
    let nodes = start_nodes("order", 2, &shared_redis_url(), &["--shards", "2"]);
    fan_out_and_order(&nodes, "order");
}

/// Three members per node and one publisher per node in `room`; each publisher sends 30 messages
/// at once; every member sees them all, in one order, with consecutive `seq`s.
fn fan_out_and_order(nodes: &[Server], room: &str) {
    let mut members: Vec<Client> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..3 {
            let mut c = connect(node, &format!("m{i}{j}"));
            join(&mut c, room);
            members.push(c);
        }
    }
    const EACH: u64 = 30;
    let publishers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut p = connect(node, &format!("pub{i}"));
            join(&mut p, room);
            p
        })
        .collect();
    let threads: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, mut p)| {
            let room = room.to_owned();
            std::thread::spawn(move || {
                for k in 0..EACH {
                    p.send_value(
                        &obj(&[
                            ("op", s("publish")),
                            ("room", s(&room)),
                            ("data", obj(&[("node", n(i as u64)), ("k", n(k))])),
                        ]),
                        false,
                    );
                }
                p
            })
        })
        .collect();
    let publishers: Vec<Client> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let mut orders = Vec::new();
    for member in members
        .iter_mut()
        .chain(publishers.into_iter().collect::<Vec<_>>().iter_mut())
    {
        let mut seen = Vec::new();
        for _ in 0..nodes.len() as u64 * EACH {
            let m = next_message(member, room);
            let data = m.get("data").unwrap();
            seen.push((u64_of(&m, "seq"), u64_of(data, "node"), u64_of(data, "k")));
        }
        let seqs: Vec<u64> = seen.iter().map(|t| t.0).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "consecutive seqs: {seqs:?}"
        );
        // Each publisher's messages in the order it sent them.
        for node in 0..nodes.len() as u64 {
            let ks: Vec<u64> = seen.iter().filter(|t| t.1 == node).map(|t| t.2).collect();
            assert_eq!(ks, (0..EACH).collect::<Vec<_>>());
        }
        orders.push(seen);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every member sees the same order"
    );
    let id = members[0].request("ping", &[]);
    members[0].expect("pong", Some(id));
}

/// `POST /rooms/{id}/messages` on one node reaches the room's member on another.
#[test]
fn an_http_publish_reaches_a_member_on_another_node() {
    let nodes = start_nodes("httppub", 2, &shared_redis_url(), &[]);
    let token = nodes[1].token("pat");
    let mut pat = nodes[1].connect(&token, None);
    pat.expect("welcome", None);
    pat.set_timeout(Duration::from_secs(10));
    let token0 = nodes[0].token("pat");
    let answer = nodes[0].api_as(
        &token0,
        "POST",
        "/rooms/user:pat/messages",
        Some(r#"{"data":{"hello":"from n0"}}"#),
    );
    assert_eq!(answer.status, 202, "{answer:?}");
    let seq = answer.json().get("seq").and_then(Value::as_u64).unwrap();
    let m = next_message(&mut pat, "user:pat");
    assert_eq!(u64_of(&m, "seq"), seq);
    assert_eq!(str_of(m.get("data").unwrap(), "hello"), "from n0");
}

/// History read on one node holds what was published on another; a connection closed on one
/// node resumes on another and gets exactly what it missed, in order, before the reply.
#[test]
fn history_and_resume_span_nodes() {
    let nodes = start_nodes("resume", 2, &shared_redis_url(), &[]);
    let mut reader = connect(&nodes[0], "rita");
    let mut leaving = nodes[0].connect(&nodes[0].token("rita"), None);
    let welcome = leaving.expect("welcome", None);
    let session = str_of(&welcome, "session").to_owned();
    leaving.set_timeout(Duration::from_secs(10));
    let joined = join(&mut leaving, "story");
    let epoch = str_of(&joined, "epoch").to_owned();
    join(&mut reader, "story");
    let mut writer = connect(&nodes[1], "walt");
    join(&mut writer, "story");
    let publish = |w: &mut Client, i: u64| {
        let id = w.request(
            "publish",
            &[("room", s("story")), ("data", obj(&[("i", n(i))]))],
        );
        w.expect("reply", Some(id));
    };
    for i in 1..=3 {
        publish(&mut writer, i);
    }
    let mut last = 0;
    for _ in 0..3 {
        last = u64_of(&next_message(&mut leaving, "story"), "seq");
    }
    assert_eq!(last, 3);
    leaving.socket.close(None).unwrap();
    assert_eq!(leaving.ended(), Ended::Closed(1000));
    // The TCP connection ends too: the node lets go of it (and keeps its session) then.
    drop(leaving);
    for i in 4..=5 {
        publish(&mut writer, i);
    }
    // History on the other node holds every message.
    let mut other = connect(&nodes[1], "olga");
    join(&mut other, "story");
    let id = other.request("history", &[("room", s("story")), ("since", n(0))]);
    let history = other.expect("reply", Some(id));
    let seqs: Vec<u64> = history
        .get("messages")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|m| u64_of(m, "seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    assert_eq!(str_of(&history, "epoch"), epoch);
    // The closed connection resumes on node 1.
    let mut back = nodes[1].connect(&nodes[1].token("rita"), None);
    back.expect("welcome", None);
    back.set_timeout(Duration::from_secs(10));
    let id = back.request(
        "resume",
        &[
            ("session", s(&session)),
            (
                "rooms",
                obj(&[("story", obj(&[("seq", n(3)), ("epoch", s(&epoch))]))]),
            ),
        ],
    );
    let mut got = Vec::new();
    let reply = loop {
        let v = back.recv().expect("resume answers");
        match str_of(&v, "op") {
            "message" if str_of(&v, "room") == "story" => got.push(u64_of(&v, "seq")),
            "reply" if v.get("id").and_then(Value::as_u64) == Some(id) => break v,
            _ => {}
        }
    };
    assert_eq!(
        got,
        [4, 5],
        "exactly the missed messages, before the reply: {reply:?}"
    );
    assert_eq!(
        reply.get("recovered").and_then(|r| r.get("story")),
        Some(&Value::Bool(true)),
        "{reply:?}"
    );
    // A session resumes once: a second attempt anywhere is not recovered.
    let mut again = nodes[0].connect(&nodes[0].token("rita"), None);
    again.expect("welcome", None);
    let id = again.request(
        "resume",
        &[
            ("session", s(&session)),
            (
                "rooms",
                obj(&[("story", obj(&[("seq", n(3)), ("epoch", s(&epoch))]))]),
            ),
        ],
    );
    let reply = again.expect("reply", Some(id));
    assert_eq!(
        reply.get("recovered").and_then(|r| r.get("story")),
        Some(&Value::Bool(false))
    );
}

/// Presence lists users connected anywhere; a user on two nodes is one entry with its
/// connections summed; diffs reach members on every node, and a user's first and last
/// connection anywhere are what they report.
#[test]
fn presence_spans_nodes() {
    let nodes = start_nodes("presence", 2, &shared_redis_url(), &[]);
    let mut watcher = connect(&nodes[0], "wes");
    join(&mut watcher, "hall");
    let mut u_here = connect(&nodes[0], "uma");
    join(&mut u_here, "hall");
    let mut u_there = connect(&nodes[1], "uma");
    join(&mut u_there, "hall");
    let mut v = connect(&nodes[1], "vic");
    join(&mut v, "hall");
    eventually("presence on node 0", Duration::from_secs(5), || {
        presence(&mut watcher, "hall")
            == [
                ("uma".to_owned(), 2),
                ("vic".to_owned(), 1),
                ("wes".to_owned(), 1),
            ]
    });
    assert_eq!(
        presence(&mut v, "hall"),
        [
            ("uma".to_owned(), 2),
            ("vic".to_owned(), 1),
            ("wes".to_owned(), 1)
        ]
    );
    // Uma leaves node 0 but stays on node 1: nobody is told she left. Vic leaves: everyone is.
    u_here.socket.close(None).unwrap();
    assert_eq!(u_here.ended(), Ended::Closed(1000));
    v.socket.close(None).unwrap();
    assert_eq!(v.ended(), Ended::Closed(1000));
    let mut left = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !left.contains("vic") {
        let p = watcher.expect("presence", None);
        for e in p.get("left").and_then(Value::as_array).unwrap() {
            left.insert(str_of(e, "user").to_owned());
        }
    }
    assert!(left.contains("vic"), "{left:?}");
    assert!(!left.contains("uma"), "{left:?}");
    assert_eq!(
        presence(&mut watcher, "hall"),
        [("uma".to_owned(), 1), ("wes".to_owned(), 1)]
    );
}

/// A node killed without a goodbye: its users are reported `left` on the other nodes within
/// `node_ttl` + `presence_batch`, and the others go on.
#[test]
fn a_killed_nodes_users_are_reported_left() {
    let mut nodes = start_nodes("killed", 2, &shared_redis_url(), &["--node-ttl", "2s"]);
    let mut watcher = connect(&nodes[0], "wanda");
    join(&mut watcher, "vigil");
    let mut doomed = connect(&nodes[1], "xavier");
    join(&mut doomed, "vigil");
    eventually("both present", Duration::from_secs(5), || {
        presence(&mut watcher, "vigil").len() == 2
    });
    watcher.clear();
    let killed = Instant::now();
    nodes[1].kill();
    let mut reported = false;
    while killed.elapsed() < Duration::from_secs(8) {
        let p = watcher.expect("presence", None);
        if p.get("left")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .any(|e| str_of(e, "user") == "xavier")
        {
            reported = true;
            break;
        }
    }
    let took = killed.elapsed();
    assert!(reported, "xavier reported left");
    // node_ttl (2 s) + presence_batch (100 ms), with a margin for a loaded machine.
    assert!(took < Duration::from_secs(4), "reported after {took:?}");
    assert_eq!(presence(&mut watcher, "vigil"), [("wanda".to_owned(), 1)]);
    let id = watcher.request(
        "publish",
        &[("room", s("vigil")), ("data", s("still here"))],
    );
    watcher.expect("reply", Some(id));
}

/// `max_members` holds over every node when joins race on both.
#[test]
fn max_members_holds_across_nodes_under_a_join_race() {
    let nodes = start_nodes(
        "maxmembers",
        2,
        &shared_redis_url(),
        &["--max-room-members", "5", "--shards", "2"],
    );
    let mut clients: Vec<Client> = (0..10)
        .map(|i| connect(&nodes[i % 2], &format!("racer{i}")))
        .collect();
    let threads: Vec<_> = clients
        .drain(..)
        .map(|mut c| {
            std::thread::spawn(move || {
                let id = c.request("join", &[("room", s("tight"))]);
                let answer = loop {
                    let v = c.recv().expect("an answer");
                    if v.get("id").and_then(Value::as_u64) == Some(id) {
                        break v;
                    }
                };
                (c, answer)
            })
        })
        .collect();
    let results: Vec<(Client, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted = results
        .iter()
        .filter(|(_, a)| str_of(a, "op") == "reply")
        .count();
    let full = results
        .iter()
        .filter(|(_, a)| str_of(a, "op") == "error" && str_of(a, "code") == "room_full")
        .count();
    assert_eq!(
        (admitted, full),
        (5, 5),
        "{:?}",
        results.iter().map(|r| &r.1).collect::<Vec<_>>()
    );
    let (mut member, _) = results
        .into_iter()
        .find(|(_, a)| str_of(a, "op") == "reply")
        .unwrap();
    let total: u64 = presence(&mut member, "tight").iter().map(|p| p.1).sum();
    assert_eq!(total, 5);
}

/// Redis killed under traffic: each node keeps delivering to its own members (a new epoch),
/// `/readyz` names redis, and once Redis is back cross-node delivery comes back by itself.
#[test]
fn redis_down_keeps_local_delivery_and_recovers() {
    let mut redis = OwnRedis::start();
    let nodes = start_nodes("redisdown", 2, &redis.url(), &[]);
    let mut a = connect(&nodes[0], "ann");
    let mut a2 = connect(&nodes[0], "amy");
    let mut b = connect(&nodes[1], "bob");
    for c in [&mut a, &mut a2, &mut b] {
        join(c, "live");
    }
    let id = a.request("publish", &[("room", s("live")), ("data", s("before"))]);
    a.expect("reply", Some(id));
    assert_eq!(str_of(&next_message(&mut b, "live"), "data"), "before");
    assert_eq!(str_of(&next_message(&mut a2, "live"), "data"), "before");
    redis.stop();
    eventually("readyz names redis", Duration::from_secs(10), || {
        let (status, text) = nodes[0].http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
        status == 503 && text.contains(r#""failing":["redis"]"#)
    });
    let metrics = nodes[0].http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
    assert!(metrics.contains("ringhub_redis_up 0"), "{metrics}");
    // Local delivery goes on.
    let id = a.request("publish", &[("room", s("live")), ("data", s("alone"))]);
    a.expect("reply", Some(id));
    assert_eq!(str_of(&next_message(&mut a2, "live"), "data"), "alone");
    redis.restart();
    eventually("readyz again", Duration::from_secs(15), || {
        nodes
            .iter()
            .all(|n| n.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").0 == 200)
    });
    // Cross-node delivery is back (the subscriptions were renewed by themselves).
    let mut delivered = false;
    for attempt in 0..20 {
        let id = a.request("publish", &[("room", s("live")), ("data", n(attempt))]);
        a.expect("reply", Some(id));
        b.set_timeout(Duration::from_millis(500));
        loop {
            match b.recv() {
                Ok(v) if str_of(&v, "op") == "message" && v.get("data") == Some(&n(attempt)) => {
                    delivered = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if delivered {
            break;
        }
    }
    assert!(delivered, "cross-node delivery came back");
    b.set_timeout(Duration::from_secs(10));
    assert!(presence(&mut b, "live").len() >= 2);
}

/// `max_connections_per_user` counts every node: under `close_oldest` the oldest connection is
/// closed with 4509 on whichever node holds it; under `reject_new` a connection past the cap is
/// refused on any node.
#[test]
fn connection_caps_count_every_node() {
    let nodes = start_nodes(
        "caps",
        2,
        &shared_redis_url(),
        &["--max-connections-per-user", "2"],
    );
    eventually("both nodes registered", Duration::from_secs(5), || {
        nodes[0]
            .http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .1
            .contains("ringhub_nodes 2")
    });
    let mut first = connect(&nodes[0], "carol");
    let _second = connect(&nodes[1], "carol");
    let _third = connect(&nodes[1], "carol");
    // The oldest, on the other node, is closed as replaced.
    assert_eq!(first.ended(), Ended::Closed(4509));

    let strict = start_nodes(
        "capsreject",
        2,
        &shared_redis_url(),
        &[
            "--max-connections-per-user",
            "1",
            "--session-conflict",
            "reject_new",
        ],
    );
    let mut only = connect(&strict[0], "dave");
    let Err(error) = strict[1].try_connect(&strict[1].token("dave"), None, &[]) else {
        panic!("a connection past the cap was accepted");
    };
    assert!(error.contains("409"), "{error}");
    let id = only.request("ping", &[]);
    only.expect("pong", Some(id));
    drop(only);
    // Its release frees the slot on every node.
    eventually("the slot is free again", Duration::from_secs(5), || {
        strict[1]
            .try_connect(&strict[1].token("dave"), None, &[])
            .is_ok()
    });
}

/// A node's subscriber connections cut (Redis `CLIENT KILL TYPE pubsub`) while another node
/// publishes: the messages published before the subscription came back are read from the room's
/// stream and delivered in order before the next one, so the member misses nothing.
#[test]
fn a_lost_subscription_is_repaired_from_the_stream() {
    let redis = OwnRedis::start();
    let nodes = start_nodes(
        "repair",
        2,
        &redis.url(),
        &[
            "--shards",
            "1",
            "--rate-limits.publish-per-connection",
            "1000/1s",
        ],
    );
    let mut publisher = connect(&nodes[0], "pia");
    let mut member = connect(&nodes[1], "mo");
    join(&mut publisher, "steady");
    join(&mut member, "steady");
    const TOTAL: u64 = 60;
    let mut killed = String::new();
    for k in 0..TOTAL {
        if k == 10 {
            killed = redis.command("CLIENT KILL TYPE pubsub");
        }
        let id = publisher.request("publish", &[("room", s("steady")), ("data", n(k))]);
        publisher.expect("reply", Some(id));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(killed.starts_with(':'), "CLIENT KILL answered {killed}");
    let mut seqs = Vec::new();
    for k in 0..TOTAL {
        let m = next_message(&mut member, "steady");
        assert_eq!(m.get("data"), Some(&n(k)), "message {k} in order: {m:?}");
        seqs.push(u64_of(&m, "seq"));
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let repaired = nodes[1]
        .metric_sum("ringhub_redis_repaired_total")
        .unwrap_or(0.0);
    assert!(repaired >= 1.0, "the gap was filled from the stream");
    assert_eq!(nodes[1].metric_sum("ringhub_redis_gaps_total"), Some(0.0));
}

/// Waits until every node answers `/readyz` with 200 (its Redis connections are up and, on a
/// cluster, every shard knows where each slot is served).
fn wait_ready(nodes: &[Server]) {
    eventually("every node ready", Duration::from_secs(15), || {
        nodes
            .iter()
            .all(|n| n.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").0 == 200)
    });
}

/// Rooms whose keys are served by each master of `cluster`, one per master.
fn rooms_on_every_master(cluster: &OwnCluster) -> Vec<String> {
    let mut rooms = Vec::new();
    let mut owners = HashSet::new();
    for i in 0..200 {
        let room = format!("c{i}");
        let (port, _) = cluster.owner_of(&format!("{{r:{room}}}"));
        if owners.insert(port) {
            rooms.push(room);
        }
        if owners.len() == cluster.ports.len() {
            break;
        }
    }
    assert_eq!(owners.len(), cluster.ports.len(), "rooms on every master");
    rooms
}

/// Three nodes on a Redis Cluster of three masters act as one: fan-out and order in rooms
/// served by each master; `history` and `presence` from another node; the connection cap over
/// every node (its script runs in the user's slot; the live nodes come from the registry, in
/// another slot).
#[test]
fn several_nodes_act_as_one_on_a_redis_cluster() {
    let cluster = OwnCluster::start("act-as-one", 3);
    let nodes = start_nodes(
        "cluster",
        3,
        &cluster.url(),
        &["--redis-cluster", "true", "--max-connections-per-user", "2"],
    );
    wait_ready(&nodes);
    let metrics = nodes[0].http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
    assert!(metrics.contains("ringhub_redis_up 1"), "{metrics}");
    let rooms = rooms_on_every_master(&cluster);
    for room in &rooms {
        fan_out_and_order(&nodes, room);
    }
    // History and presence of each room, asked on the third node by a newcomer.
    let mut reader = connect(&nodes[2], "reader");
    for room in &rooms {
        join(&mut reader, room);
        let id = reader.request("history", &[("room", s(room)), ("since", n(0))]);
        let history = reader.expect("reply", Some(id));
        let messages = history.get("messages").and_then(Value::as_array).unwrap();
        assert_eq!(messages.len(), 90, "{room}: every node's messages");
        assert!(
            presence(&mut reader, room)
                .iter()
                .any(|(u, _)| u == "reader")
        );
    }
    // The cap counts every node.
    eventually("every node registered", Duration::from_secs(5), || {
        nodes[2]
            .http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .1
            .contains("ringhub_nodes 3")
    });
    let mut first = connect(&nodes[0], "carol");
    let _second = connect(&nodes[1], "carol");
    let _third = connect(&nodes[2], "carol");
    assert_eq!(first.ended(), Ended::Closed(4509));
}

/// A room's slot moved to another master while it is in use (a resharding): publishes follow
/// the `MOVED` answer, the member's node subscribes where the channel lives now, and the member
/// misses nothing (what it missed meanwhile is read from the stream).
#[test]
fn a_slot_moved_between_masters_is_followed() {
    let cluster = OwnCluster::start("reshard", 3);
    let nodes = start_nodes(
        "reshard",
        2,
        &cluster.url(),
        &[
            "--redis-cluster",
            "true",
            "--shards",
            "1",
            "--rate-limits.publish-per-connection",
            "1000/1s",
        ],
    );
    wait_ready(&nodes);
    let room = "moving";
    let (from, slot) = cluster.owner_of(&format!("{{r:{room}}}"));
    let to = *cluster.ports.iter().find(|p| **p != from).unwrap();
    let mut publisher = connect(&nodes[0], "pia");
    let mut member = connect(&nodes[1], "mo");
    join(&mut publisher, room);
    join(&mut member, room);
    const TOTAL: u64 = 40;
    for k in 0..TOTAL {
        if k == 10 {
            cluster.move_slot(slot, from, to);
            assert_eq!(cluster.owner_of(&format!("{{r:{room}}}")).0, to);
        }
        let id = publisher.request("publish", &[("room", s(room)), ("data", n(k))]);
        let reply = publisher.expect("reply", Some(id));
        assert_eq!(u64_of(&reply, "seq"), k + 1, "{reply:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut seqs = Vec::new();
    for k in 0..TOTAL {
        let m = next_message(&mut member, room);
        assert_eq!(m.get("data"), Some(&n(k)), "message {k} in order: {m:?}");
        seqs.push(u64_of(&m, "seq"));
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let redirected = nodes[0]
        .metric_sum("ringhub_redis_redirects_total")
        .unwrap_or(0.0);
    assert!(redirected >= 1.0, "the publisher's node followed a MOVED");
    // The room's state moved with its slot: a newcomer on either node sees the whole history.
    let mut late = connect(&nodes[0], "late");
    join(&mut late, room);
    let id = late.request("history", &[("room", s(room)), ("since", n(0))]);
    let history = late.expect("reply", Some(id));
    let messages = history.get("messages").and_then(Value::as_array).unwrap();
    assert_eq!(messages.len() as u64, TOTAL);
}

/// A Redis with ACL users only: nodes given `redis://user:password@…` work across nodes; a
/// wrong password stops `serve` naming the address, never the password.
#[test]
fn acl_users_authenticate_and_a_wrong_password_is_not_shown() {
    let redis = OwnRedis::start();
    assert_eq!(
        redis.command("ACL SETUSER app on >s3cret-pass ~* &* +@all"),
        "+OK"
    );
    assert_eq!(redis.command("ACL SETUSER default off"), "+OK");
    let url = format!("redis://app:s3cret-pass@127.0.0.1:{}", redis.port);
    let nodes = start_nodes("acl", 2, &url, &[]);
    wait_ready(&nodes);
    let mut a = connect(&nodes[0], "ann");
    let mut b = connect(&nodes[1], "bob");
    join(&mut a, "acl");
    join(&mut b, "acl");
    let id = a.request("publish", &[("room", s("acl")), ("data", s("through acl"))]);
    a.expect("reply", Some(id));
    assert_eq!(str_of(&next_message(&mut b, "acl"), "data"), "through acl");

    let dir = ringhub_tests::scratch_dir("acl-wrong");
    let wrong = format!("redis://app:not-the-pass@127.0.0.1:{}", redis.port);
    let run = ringhub_tests::ringhub(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "data",
            "--redis-url",
            &wrong,
        ],
        &[],
        &dir,
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{}", redis.port)),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("not-the-pass"), "{}", run.stderr);
}

/// `connect_per_ip` counts the attempts made on every node: with a burst of 4 per minute,
/// alternating nodes, the fifth upgrade is refused (429) though each node saw only two or three.
#[test]
fn connection_attempts_per_ip_count_every_node() {
    let nodes = start_nodes(
        "connrate",
        2,
        &shared_redis_url(),
        &[
            "--rate-limits.connect-per-ip",
            "4/1m",
            "--rate-limits.connect-burst",
            "4",
        ],
    );
    wait_ready(&nodes);
    let mut open = Vec::new();
    for i in 0..4 {
        let node = &nodes[i % 2];
        open.push(
            node.try_connect(&node.token(&format!("u{i}")), None, &[])
                .unwrap_or_else(|e| panic!("attempt {i}: {e}")),
        );
    }
    let refused = nodes[0].try_connect(&nodes[0].token("u4"), None, &[]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("429")),
        "{:?}",
        refused.map(|_| "accepted")
    );
}

/// `publish_per_room` counts the room's publishes on every node: with 4 per minute, two
/// publishers on two nodes get four through between them, then `rate_limited`.
#[test]
fn the_rooms_publish_rate_counts_every_node() {
    let nodes = start_nodes(
        "roomrate",
        2,
        &shared_redis_url(),
        &["--rate-limits.publish-per-room", "4/1m"],
    );
    wait_ready(&nodes);
    let mut a = connect(&nodes[0], "ann");
    let mut b = connect(&nodes[1], "bob");
    join(&mut a, "busy");
    join(&mut b, "busy");
    for i in 0..4u64 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let id = c.request("publish", &[("room", s("busy")), ("data", n(i))]);
        c.expect("reply", Some(id));
    }
    let id = a.request("publish", &[("room", s("busy")), ("data", n(4))]);
    let refused = a.expect("error", Some(id));
    assert_eq!(str_of(&refused, "code"), "rate_limited");
    // Nothing of the refused one was delivered: four messages, then nothing.
    let seqs: Vec<u64> = (0..4)
        .map(|_| u64_of(&next_message(&mut b, "busy"), "seq"))
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
}

/// Redis restarted empty learns the connections of every node again: the user cap still holds
/// afterwards (a third connection, on another node, past a cap of two closes an older one with
/// 4509).
#[test]
fn connection_caps_survive_a_redis_restart() {
    let mut redis = OwnRedis::start();
    let nodes = start_nodes(
        "capsrestart",
        2,
        &redis.url(),
        &["--max-connections-per-user", "2"],
    );
    wait_ready(&nodes);
    let mut first = connect(&nodes[0], "carl");
    let mut second = connect(&nodes[0], "carl");
    redis.restart();
    // The node reconnects and counts its two connections again.
    let counted =
        "EVAL \"return redis.call('ZCARD', redis.call('KEYS', '*u:carl*')[1] or 'none')\" 0";
    eventually(
        "the connections counted again",
        Duration::from_secs(15),
        || redis.command(counted) == ":2",
    );
    wait_ready(&nodes);
    // On the other node, which holds none of them: only Redis can know.
    let mut third = connect(&nodes[1], "carl");
    first.set_timeout(Duration::from_secs(2));
    second.set_timeout(Duration::from_secs(2));
    let ended = [first.ended(), second.ended()];
    assert_eq!(
        ended.iter().filter(|e| **e == Ended::Closed(4509)).count(),
        1,
        "{ended:?}"
    );
    let id = third.request("ping", &[]);
    third.expect("pong", Some(id));
}
