//! Room history as its bounds promise (SPEC §7, and the `history_*` keys): kept as the encoded
//! messages within its byte budgets under an amplification attack, expired by age in rooms that
//! see no traffic, read back in either format, and fed by an HTTP publish that is rate-limited
//! like a WebSocket publisher.

use std::time::{Duration, Instant};

use protocol::envelope::Value;
use ringhub_tests::{Client, Server, n, obj, s};

fn joined(client: &mut Client, room: &str) {
    let id = client.request("join", &[("room", s(room))]);
    client.expect("reply", Some(id));
}

fn history(client: &mut Client, room: &str, limit: u64) -> Vec<Value> {
    let id = client.request(
        "history",
        &[("room", s(room)), ("since", n(0)), ("limit", n(limit))],
    );
    let reply = client.expect("reply", Some(id));
    reply
        .get("messages")
        .and_then(Value::as_array)
        .expect("messages")
        .to_vec()
}

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m.get("seq").and_then(Value::as_u64).expect("seq"))
        .collect()
}

const MIB: u64 = 1 << 20;

#[test]
fn history_stays_within_its_byte_budget_under_amplification() {
    if ringhub_tests::over_redis() {
        // The budget is the embedded store's; over Redis, history is Redis's memory.
        return;
    }
    // 4 MiB for the whole process (each room alone could keep 4 MiB); each message below
    // decodes to a ~2 MiB value tree, which history used to keep (100 per room).
    let server = Server::start(
        "history-budget",
        &[
            "--shards",
            "2",
            "--history-total-bytes",
            "4MiB",
            "--history-room-bytes",
            "4MiB",
            "--rate-limits.publish-per-connection",
            "0/1s",
            "--rate-limits.publish-per-room",
            "0/1s",
        ],
    );
    let token = server.token("attacker");
    let mut publisher = server.connect(&token, Some("ringhub.v1.msgpack"));
    publisher.expect("welcome", None);
    publisher.set_timeout(Duration::from_secs(20));
    let rooms = ["amp-a", "amp-b", "amp-c"];
    for room in rooms {
        joined(&mut publisher, room);
    }
    // 65,400 empty arrays: one byte each in MessagePack, the whole request within 64 KiB.
    let tiny_arrays = Value::Array(vec![Value::Array(Vec::new()); 65_400]);
    let publish = |client: &mut Client, room: &str| {
        let id = client.request(
            "publish",
            &[("room", s(room)), ("data", tiny_arrays.clone())],
        );
        client.expect("reply", Some(id));
        // Its own copies of the messages are not needed: keep the test's memory flat.
        client.clear();
    };
    publish(&mut publisher, "amp-a");
    std::thread::sleep(Duration::from_millis(300));
    let baseline = server.rss_bytes();
    for round in 0..100 {
        for room in rooms {
            publish(&mut publisher, room);
        }
        if round % 20 == 0 {
            let grown = server.rss_bytes().saturating_sub(baseline);
            assert!(grown < 40 * MIB, "round {round}: RSS grew {grown} bytes");
        }
    }
    std::thread::sleep(Duration::from_millis(600));
    let grown = server.rss_bytes().saturating_sub(baseline);
    let kept = server
        .metric_sum("ringhub_shard_history_bytes")
        .expect("history gauge");
    let evicted = server
        .metric_sum("ringhub_history_evicted_total")
        .expect("eviction counter");
    eprintln!(
        "RSS grew {:.1} MiB over 301 publishes of 64 KiB; history holds {:.2} MiB; {evicted} evicted",
        grown as f64 / MIB as f64,
        kept / MIB as f64
    );
    assert!(kept <= (4 * MIB) as f64, "history holds {kept} bytes");
    assert!(kept >= MIB as f64, "history still holds messages: {kept}");
    assert!(evicted >= 200.0, "{evicted}");
    assert!(
        grown < 4 * MIB + 28 * MIB,
        "RSS grew {grown} bytes, past the 4 MiB budget plus slack"
    );
    // The newest messages are still there, read back in JSON (kept only as MessagePack). A
    // reply holds what fits half the connection's queue bound: the client pages with `since`.
    let mut reader = server.connect(&server.token("reader"), None);
    reader.expect("welcome", None);
    reader.set_timeout(Duration::from_secs(20));
    let mut got = Vec::new();
    let mut since = 0;
    for _ in 0..200 {
        let id = reader.request(
            "history",
            &[("room", s("amp-c")), ("since", n(since)), ("limit", n(100))],
        );
        let reply = reader.expect("reply", Some(id));
        let page = reply
            .get("messages")
            .and_then(Value::as_array)
            .expect("messages");
        if page.is_empty() {
            break;
        }
        let data = page[0].get("data").and_then(Value::as_array).expect("data");
        assert_eq!(data.len(), 65_400);
        got.extend(seqs(page));
        since = *got.last().unwrap();
        reader.clear();
    }
    assert!(!got.is_empty(), "amp-c kept nothing");
    assert_eq!(
        *got.last().unwrap(),
        100,
        "the newest message is kept: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "no gap: {got:?}");
    // And the server still serves.
    let id = reader.request("ping", &[]);
    reader.expect("pong", Some(id));
}

#[test]
fn an_idle_rooms_history_expires_after_its_ttl() {
    if ringhub_tests::over_redis() {
        // Read through the embedded store's gauge; over Redis the TTL is applied when read.
        return;
    }
    let server = Server::start("history-ttl", &["--history-ttl", "1s"]);
    let mut client = server.connect(&server.token("quiet"), None);
    client.expect("welcome", None);
    joined(&mut client, "quiet-room");
    for i in 0..3 {
        let id = client.request(
            "publish",
            &[("room", s("quiet-room")), ("data", obj(&[("i", n(i))]))],
        );
        client.expect("reply", Some(id));
    }
    // The gauge is refreshed by the ticker (every 250 ms).
    std::thread::sleep(Duration::from_millis(400));
    let held = server
        .metric_sum("ringhub_shard_history_bytes")
        .expect("history gauge");
    assert!(held > 0.0, "the messages are kept at first");
    // No publish, no history query, no resume: the ticker alone drops them.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut left = held;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        left = server
            .metric_sum("ringhub_shard_history_bytes")
            .expect("history gauge");
        if left == 0.0 {
            break;
        }
    }
    assert_eq!(left, 0.0, "history bytes left after the TTL");
    assert!(history(&mut client, "quiet-room", 100).is_empty());
}

#[test]
fn history_reads_the_same_in_every_format_whoever_published() {
    let server = Server::start("history-formats", &[]);
    // Published by a JSON client only: kept as JSON, read back by MessagePack and zstd clients.
    let mut json = server.connect(&server.token("json"), None);
    json.expect("welcome", None);
    joined(&mut json, "mixed");
    let data = obj(&[
        ("text", s("héllo \"quoted\"")),
        ("n", Value::Float(2.5)),
        ("neg", Value::Int(-7)),
        ("list", Value::Array(vec![Value::Null, Value::Bool(true)])),
    ]);
    for _ in 0..3 {
        let id = json.request("publish", &[("room", s("mixed")), ("data", data.clone())]);
        json.expect("reply", Some(id));
    }
    let from_json = history(&mut json, "mixed", 10);
    for protocol in [
        "ringhub.v1.msgpack",
        "ringhub.v1.msgpack+zstd",
        "ringhub.v1.json+zstd",
    ] {
        let mut other = server.connect(&server.token("other"), Some(protocol));
        other.expect("welcome", None);
        let got = history(&mut other, "mixed", 10);
        assert_eq!(got, from_json, "{protocol}");
        assert_eq!(got[0].get("data"), Some(&data), "{protocol}");
    }
    assert_eq!(seqs(&from_json), [1, 2, 3]);
}

#[test]
fn http_publish_is_rate_limited_per_user_like_a_websocket_publisher() {
    let server = Server::start(
        "http-publish-rate",
        &[
            "--bcrypt-cost",
            "4",
            "--rate-limits.publish-per-connection",
            "2/1m",
            "--rate-limits.publish-burst",
            "3",
        ],
    );
    let (_, alice) = server.account("alice");
    let (_, bob) = server.account("bob");
    let created = server.api_as(
        &alice,
        "POST",
        "/rooms",
        Some(r#"{"id":"news","permission":"public"}"#),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let post = |token: &str, i: u32| {
        server.api_as(
            token,
            "POST",
            "/rooms/news/messages",
            Some(&format!(r#"{{"data":{{"i":{i}}}}}"#)),
        )
    };
    for i in 1..=3 {
        let ok = post(&alice, i);
        assert_eq!(ok.status, 202, "{i}: {ok:?}");
    }
    let refused = post(&alice, 4);
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (429, "rate_limited")
    );
    let retry: u64 = refused
        .header("Retry-After")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=30).contains(&retry), "{retry}");
    // Another user has a bucket of their own, and the refused message took no seq.
    let ok = post(&bob, 5);
    assert_eq!((ok.status, ok.body.as_str()), (202, r#"{"seq":4}"#));
    let (_, metrics) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        metrics.contains("ringhub_rate_limited_total{limit=\"publish_per_user\"} 1"),
        "{metrics}"
    );
}

/// Custom events (SPEC §8) on the native protocol: `publish` with `event` is delivered as a
/// `message` carrying it in both formats, shares the room's `seq`, is kept in history and
/// recovered by `resume`; a bad name is `invalid_message` (with the request's id), and the
/// connection and the room go on.
#[test]
fn custom_events_share_seq_history_and_resume() {
    let server = Server::start("events", &["--shards", "2"]);
    let mut json = server.connect(&server.token("ann"), Some("ringhub.v1.json"));
    let welcome = json.expect("welcome", None);
    let session = welcome
        .get("session")
        .and_then(Value::as_str)
        .expect("session")
        .to_owned();
    let mut packed = server.connect(&server.token("ben"), Some("ringhub.v1.msgpack"));
    packed.expect("welcome", None);
    joined(&mut json, "party");
    joined(&mut packed, "party");
    let id = packed.request(
        "publish",
        &[
            ("room", s("party")),
            ("data", obj(&[("step", n(2))])),
            ("event", s("dance.step")),
        ],
    );
    let reply = packed.expect("reply", Some(id));
    assert_eq!(reply.get("seq").and_then(Value::as_u64), Some(1));
    let id = packed.request("publish", &[("room", s("party")), ("data", s("plain"))]);
    packed.expect("reply", Some(id));
    for client in [&mut json, &mut packed] {
        let first = client.expect("message", None);
        assert_eq!(
            first.get("event").and_then(Value::as_str),
            Some("dance.step")
        );
        assert_eq!(first.get("seq").and_then(Value::as_u64), Some(1));
        let second = client.expect("message", None);
        assert_eq!(second.get("event"), None);
    }
    // Bad names: the exact error, the request's id; nothing published.
    for (bad, why) in [
        (s("message"), "reserved"),
        (s("two words"), "characters"),
        (n(7), "string"),
    ] {
        let id = json.request(
            "publish",
            &[("room", s("party")), ("data", n(0)), ("event", bad)],
        );
        let error = json.expect("error", Some(id));
        assert_eq!(
            error.get("code").and_then(Value::as_str),
            Some("invalid_message"),
            "{why}"
        );
    }
    // History has the event, in both formats.
    for client in [&mut json, &mut packed] {
        let kept = history(client, "party", 10);
        assert_eq!(seqs(&kept), [1, 2], "the refused publishes took no seq");
        assert_eq!(
            kept[0].get("event").and_then(Value::as_str),
            Some("dance.step")
        );
        assert_eq!(kept[1].get("event"), None);
    }
    // Resume recovers a missed custom event.
    let id = json.request(
        "history",
        &[("room", s("party")), ("since", n(0)), ("limit", n(1))],
    );
    let epoch = json
        .expect("reply", Some(id))
        .get("epoch")
        .and_then(Value::as_str)
        .expect("epoch")
        .to_owned();
    drop(json);
    let id = packed.request(
        "publish",
        &[("room", s("party")), ("data", n(3)), ("event", s("cheer"))],
    );
    packed.expect("reply", Some(id));
    let mut again = server.connect(&server.token("ann"), Some("ringhub.v1.json"));
    again.expect("welcome", None);
    let rooms = obj(&[("party", obj(&[("seq", n(2)), ("epoch", s(&epoch))]))]);
    let id = again.request("resume", &[("session", s(&session)), ("rooms", rooms)]);
    let recovered = again.expect("message", None);
    assert_eq!(recovered.get("seq").and_then(Value::as_u64), Some(3));
    assert_eq!(
        recovered.get("event").and_then(Value::as_str),
        Some("cheer")
    );
    let reply = again.expect("reply", Some(id));
    assert_eq!(
        reply.get("recovered"),
        Some(&obj(&[("party", Value::Bool(true))]))
    );
}

/// `POST /rooms/{id}/messages` takes the same optional `event` (SPEC §8): a member hears a
/// `message` carrying it; a bad name is 400 `invalid_input` naming `event`, and nothing is
/// published.
#[test]
fn http_publish_names_a_custom_event() {
    let server = Server::start("http-event", &["--bcrypt-cost", "4"]);
    let (_, alice) = server.account("alice");
    let created = server.api_as(
        &alice,
        "POST",
        "/rooms",
        Some(r#"{"id":"stage","permission":"public"}"#),
    );
    assert_eq!(created.status, 201, "{created:?}");
    let mut bob = server.connect(&server.token("bob"), None);
    bob.expect("welcome", None);
    joined(&mut bob, "stage");
    let bad = server.api_as(
        &alice,
        "POST",
        "/rooms/stage/messages",
        Some(r#"{"data":1,"event":"presence"}"#),
    );
    assert_eq!((bad.status, bad.code().as_str()), (400, "invalid_input"));
    assert!(bad.body.contains(r#""field":"event""#), "{bad:?}");
    let ok = server.api_as(
        &alice,
        "POST",
        "/rooms/stage/messages",
        Some(r#"{"data":{"lights":"on"},"event":"cue"}"#),
    );
    assert_eq!(ok.status, 202, "{ok:?}");
    let m = bob.expect("message", None);
    assert_eq!(m.get("event").and_then(Value::as_str), Some("cue"));
    assert_eq!(
        m.get("seq").and_then(Value::as_u64),
        Some(1),
        "the refused one took no seq"
    );
}
