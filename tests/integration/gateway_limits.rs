//! Refusals and close codes of the gateway (SPEC §4, §9) through the real binary: each asserts
//! the exact status or code, then shows that the server still serves.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use protocol::envelope::Value;
use protocol::ws;
use ringhub_tests::{Client, Ended, Server, n, obj, s};

fn welcome(client: &mut Client) {
    client.expect("welcome", None);
}

fn still_serves(server: &Server) {
    let mut c = server.connect(&server.token("probe"), None);
    welcome(&mut c);
    let id = c.request("ping", &[]);
    c.expect("pong", Some(id));
}

#[test]
fn upgrade_refusals_have_the_spec_statuses() {
    let server = Server::start(
        "refusals",
        &[
            "--allowed-origins",
            "https://app.example",
            "--allow-missing-origin",
            "true",
        ],
    );
    let token = server.token("alice");
    let (status, text) = server.upgrade_raw("/ws", "Authorization: Bearer nope\r\n");
    assert_eq!(status, 401, "{text}");
    assert!(text.contains(r#""code":"invalid_token""#), "{text}");
    let (status, _) = server.upgrade_raw("/ws", "");
    assert_eq!(status, 401);
    let (status, text) = server.upgrade_raw(
        "/ws",
        &format!("Authorization: Bearer {token}\r\nOrigin: https://evil.example\r\n"),
    );
    assert_eq!(status, 403, "{text}");
    let (status, _) = server.upgrade_raw(
        &format!("/ws?token={token}"),
        "Origin: https://app.example\r\n",
    );
    assert_eq!(status, 101);
    let (status, text) = server.upgrade_raw(
        "/ws",
        &format!("Authorization: Bearer {token}\r\nSec-WebSocket-Protocol: chat\r\n"),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("unsupported"), "{text}");
    let (status, text) = server.http("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
    assert_eq!(status, 426, "{text}");
    assert!(text.contains("Sec-WebSocket-Version: 13"));
    let (status, text) = server.http("GET /socket.io/?EIO=3&transport=polling HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("unsupported"));
    let (status, text) = server.http("GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("X-Request-Id: "));
    let (status, text) =
        server.http("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-42\r\n\r\n");
    assert_eq!(status, 200);
    assert!(
        text.contains("X-Request-Id: trace-42") && text.contains(r#"{"status":"ok","node_id":""#),
        "{text}"
    );
    let (_, metrics) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        metrics.contains("ringhub_connects_total{result=\"unauthorized\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringhub_connects_total{result=\"origin_forbidden\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ringhub_auth_failures_total{reason=\"missing\"} 1"),
        "{metrics}"
    );
    still_serves(&server);
}

#[test]
fn connect_rate_per_ip_answers_429() {
    let server = Server::start(
        "connrate",
        &[
            "--rate-limits.connect-per-ip",
            "2/1m",
            "--rate-limits.connect-burst",
            "2",
        ],
    );
    let token = server.token("alice");
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut c = server.connect(&token, None);
        welcome(&mut c);
        kept.push(c);
    }
    let (status, text) = server.upgrade_raw("/ws", &format!("Authorization: Bearer {token}\r\n"));
    assert_eq!(status, 429, "{text}");
    assert!(
        text.contains(r#""code":"rate_limited""#) && text.contains("Retry-After"),
        "{text}"
    );
    // Plain HTTP is not a connect: health still answers.
    assert_eq!(
        server.http("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").0,
        200
    );
}

#[test]
fn connection_caps_close_oldest_or_reject_new() {
    let server = Server::start("capsold", &["--max-connections-per-user", "1"]);
    let mut first = server.connect(&server.token("alice"), None);
    welcome(&mut first);
    let mut second = server.connect(&server.token("alice"), None);
    welcome(&mut second);
    assert_eq!(first.ended(), Ended::Closed(4509));
    let id = second.request("ping", &[]);
    second.expect("pong", Some(id));

    let server = Server::start(
        "capsnew",
        &[
            "--max-connections-per-user",
            "1",
            "--session-conflict",
            "reject_new",
        ],
    );
    let mut first = server.connect(&server.token("alice"), None);
    welcome(&mut first);
    let refused = server
        .try_connect(&server.token("alice"), None, &[])
        .unwrap_err();
    assert!(
        refused.starts_with("HTTP 409") && refused.contains("conflict"),
        "{refused}"
    );
    let id = first.request("ping", &[]);
    first.expect("pong", Some(id));
}

#[test]
fn publish_rate_limit_answers_then_closes_past_three_times() {
    let server = Server::start(
        "ratelimit",
        &[
            "--rate-limits.publish-per-connection",
            "5/1m",
            "--rate-limits.publish-burst",
            "5",
        ],
    );
    let mut alice = server.connect(&server.token("alice"), None);
    welcome(&mut alice);
    let mut codes = Vec::new();
    for i in 0..16u64 {
        alice.send_value(
            &obj(&[
                ("op", s("publish")),
                ("id", n(i)),
                ("room", s("lobby")),
                ("data", n(i)),
            ]),
            false,
        );
    }
    let ended = loop {
        match alice.recv() {
            Ok(v) if v.get("op").and_then(Value::as_str) == Some("error") => {
                codes.push(v.get("code").and_then(Value::as_str).unwrap().to_owned());
            }
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    // 5 allowed, attempts 6..=15 limited (10 errors), the 16th (> 3 × 5) closes.
    assert_eq!(codes, vec!["rate_limited"; 10]);
    assert_eq!(ended, Ended::Closed(4008));
    still_serves(&server);
}

#[test]
fn a_client_that_spends_its_burst_sees_rate_limited_before_4008() {
    // The join defaults' shape, over a minute so that no token refills during the test:
    // COUNT 10, burst 50, so the close comes past 3 × max(COUNT, burst) = 150 attempts.
    let server = Server::start(
        "burst-then-close",
        &[
            "--rate-limits.join-per-connection",
            "10/1m",
            "--rate-limits.join-burst",
            "50",
            "--max-rooms-per-connection",
            "1000",
        ],
    );
    let mut alice = server.connect(&server.token("alice"), None);
    welcome(&mut alice);
    let join = |client: &mut Client, i: u64| {
        client.send_value(
            &obj(&[
                ("op", s("join")),
                ("id", n(i)),
                ("room", s(&format!("burst-{i}"))),
            ]),
            false,
        );
    };
    for i in 0..150u64 {
        join(&mut alice, i);
    }
    let mut replies = 0;
    let mut limited = Vec::new();
    while replies + limited.len() < 150 {
        let v = alice.recv().expect("an answer to every join");
        match v.get("op").and_then(Value::as_str) {
            Some("reply") => replies += 1,
            Some("error") => {
                assert_eq!(v.get("code").and_then(Value::as_str), Some("rate_limited"));
                limited.push(v.get("id").and_then(Value::as_u64).unwrap());
            }
            _ => {}
        }
    }
    // Joins 0..50 allowed, 50..150 answered `rate_limited` (the 51st first, not a close).
    assert_eq!(replies, 50);
    assert_eq!(limited, (50..150).collect::<Vec<u64>>());
    // The 151st attempt in the window is past 3 × max(COUNT, burst): closed.
    join(&mut alice, 150);
    assert_eq!(alice.ended(), Ended::Closed(4008));
    still_serves(&server);
}

#[test]
fn resume_is_charged_to_the_join_bucket() {
    let server = Server::start(
        "resume-charged",
        &[
            "--rate-limits.join-per-connection",
            "10/1m",
            "--rate-limits.join-burst",
            "50",
            "--default-rooms",
            "",
        ],
    );
    let token = server.token("alice");
    let mut first = server.connect(&token, None);
    let session = welcome_session(&mut first);
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut second = server.connect(&token, None);
    welcome(&mut second);
    // A resume that names 60 rooms rejoins them all, and takes 60 join tokens.
    let rooms: Vec<(String, Value)> = (0..60)
        .map(|i| {
            (
                format!("resume-{i}"),
                obj(&[("seq", n(0)), ("epoch", s("none"))]),
            )
        })
        .collect();
    let rooms_value = Value::Map(rooms);
    let id = second.request(
        "resume",
        &[("session", s(&session)), ("rooms", rooms_value.clone())],
    );
    let reply = second.expect("reply", Some(id));
    let recovered = reply.get("recovered").expect("recovered");
    assert!(
        matches!(recovered, Value::Map(m) if m.len() == 60),
        "{reply:?}"
    );
    // The bucket is spent: the next join and the next resume are refused.
    let id = second.request("join", &[("room", s("one-more"))]);
    let err = second.expect("error", Some(id));
    assert_eq!(
        err.get("code").and_then(Value::as_str),
        Some("rate_limited")
    );
    let id = second.request(
        "resume",
        &[("session", s(&session)), ("rooms", rooms_value)],
    );
    let err = second.expect("error", Some(id));
    assert_eq!(
        err.get("code").and_then(Value::as_str),
        Some("rate_limited")
    );
    let id = second.request("ping", &[]);
    second.expect("pong", Some(id));
}

fn welcome_session(client: &mut Client) -> String {
    client
        .expect("welcome", None)
        .get("session")
        .and_then(Value::as_str)
        .expect("session")
        .to_owned()
}

#[test]
fn oversized_messages_and_zstd_bombs_close_with_1009() {
    let server = Server::start("toobig", &["--max-message-bytes", "1024"]);
    let mut alice = server.connect(&server.token("alice"), None);
    welcome(&mut alice);
    let big = format!(
        r#"{{"op":"publish","room":"lobby","data":"{}"}}"#,
        "x".repeat(1100)
    );
    let _ = alice.socket.send(tungstenite::Message::Text(big.into()));
    assert_eq!(alice.ended(), Ended::Closed(1009));

    let mut bob = server.connect(&server.token("bob"), Some("ringhub.v1.json+zstd"));
    welcome(&mut bob);
    // 1 MiB of spaces inside a JSON string, compressed to a few hundred bytes.
    let inflated = format!(
        r#"{{"op":"publish","room":"lobby","data":"{}"}}"#,
        " ".repeat(1 << 20)
    );
    let bomb = protocol::compression::Compressor::new(19)
        .unwrap()
        .compress(inflated.as_bytes())
        .unwrap();
    assert!(bomb.len() < 1024);
    let _ = bob.socket.send(tungstenite::Message::Binary(bomb.into()));
    assert_eq!(bob.ended(), Ended::Closed(1009));
    still_serves(&server);
}

fn raw_ws(server: &Server) -> TcpStream {
    let token = server.token("raw");
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    stream
}

/// Reads the raw stream until a close frame; returns its code.
fn close_code(stream: &mut TcpStream) -> Option<u16> {
    use std::io::Read;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
    }
    let start = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let mut i = start;
    while i + 2 <= data.len() {
        let opcode = data[i] & 0x0F;
        let mut len = usize::from(data[i + 1] & 0x7F);
        let mut header = 2;
        if len == 126 {
            len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
            header = 4;
        }
        if opcode == 8 {
            return Some(u16::from_be_bytes([data[i + header], data[i + header + 1]]));
        }
        i += header + len;
    }
    None
}

/// A client that leaves a default room in the same TCP write as its upgrade (so before the
/// room's home answered the initial join) still gets its `welcome`. Eight connections, so that
/// some land on the shard that is not the room's home.
#[test]
fn an_initial_room_left_before_its_join_answers_still_gets_a_welcome() {
    use std::io::Read;
    let server = Server::start("earlyleave", &["--shards", "2"]);
    for i in 0..8 {
        let token = server.token(&format!("early{i}"));
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut bytes = format!("GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes();
        ws::encode_masked_frame(
            &mut bytes,
            ws::frame::TEXT,
            true,
            br#"{"op":"leave","id":1,"room":"lobby"}"#,
            [1, 2, 3, 4],
        );
        stream.write_all(&bytes).unwrap();
        let mut data = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&data).contains(r#""op":"welcome""#) {
            match stream.read(&mut buf) {
                Ok(n) if n > 0 => data.extend_from_slice(&buf[..n]),
                other => panic!(
                    "connection {i}: no welcome ({other:?}): {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }
    still_serves(&server);
}

#[test]
fn protocol_violations_close_with_1002_and_bad_utf8_with_1007() {
    let server = Server::start("violations", &[]);
    let mut stream = raw_ws(&server);
    // An unmasked client frame.
    let mut frame = Vec::new();
    ws::encode_frame(&mut frame, ws::frame::TEXT, br#"{"op":"ping"}"#);
    stream.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut stream), Some(1002));

    let mut stream = raw_ws(&server);
    let mut frame = Vec::new();
    ws::encode_masked_frame(
        &mut frame,
        ws::frame::TEXT,
        true,
        &[b'{', 0xFF, b'}'],
        [1, 2, 3, 4],
    );
    stream.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut stream), Some(1007));

    // A binary frame on a JSON connection is unsupported data.
    let mut stream = raw_ws(&server);
    let mut frame = Vec::new();
    ws::encode_masked_frame(
        &mut frame,
        ws::frame::BINARY,
        true,
        b"\x81\xa2op\xa4ping",
        [1, 2, 3, 4],
    );
    stream.write_all(&frame).unwrap();
    assert_eq!(close_code(&mut stream), Some(1003));
    still_serves(&server);
}

#[test]
fn slow_consumer_is_closed_with_4011_and_others_keep_receiving() {
    let server = Server::start(
        "slow",
        &[
            "--max-queued-bytes",
            "65536",
            "--rate-limits.publish-per-connection",
            "0/1s",
            "--rate-limits.publish-per-room",
            "0/1s",
        ],
    );
    // The slow reader: shrink its receive buffer and never read.
    let mut slow = server.connect(&server.token("slow"), None);
    welcome(&mut slow);
    let id = slow.request("join", &[("room", s("firehose"))]);
    slow.expect("reply", Some(id));
    let mut fast = server.connect(&server.token("fast"), None);
    welcome(&mut fast);
    let id = fast.request("join", &[("room", s("firehose"))]);
    fast.expect("reply", Some(id));
    let chunk = "y".repeat(16 * 1024);
    // Enough to fill the kernel buffers (a few MiB) and then the 64 KiB queue.
    for i in 0..1000u64 {
        fast.send_value(
            &obj(&[
                ("op", s("publish")),
                ("room", s("firehose")),
                ("data", obj(&[("i", n(i)), ("t", s(&chunk))])),
            ]),
            false,
        );
        // Keep reading our own copies so that `fast` is not the slow one.
        let m = fast.expect("message", None);
        assert_eq!(
            m.get("data")
                .and_then(|d| d.get("i"))
                .and_then(Value::as_u64),
            Some(i)
        );
    }
    slow.set_timeout(Duration::from_secs(10));
    let mut last = None;
    let ended = loop {
        match slow.recv() {
            Ok(v) => last = v.get("seq").and_then(Value::as_u64),
            Err(e) => break e,
        }
    };
    assert_eq!(ended, Ended::Closed(4011), "after seq {last:?}");
    assert!(last.unwrap_or(0) < 1000);
    let id = fast.request("ping", &[]);
    fast.expect("pong", Some(id));
}

/// The server's `ringhub_presence_shed_total`.
fn presence_shed(server: &Server) -> u64 {
    let (_, text) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    text.lines()
        .find_map(|l| l.strip_prefix("ringhub_presence_shed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Under overload presence goes first (SPEC §6): a member whose queue is past half its bound gets
/// no presence diffs, while every message still reaches it, in order, and the `presence` query
/// still answers exactly. Members that keep up get every diff.
#[test]
fn presence_diffs_are_shed_for_a_lagging_member_and_nothing_else_is() {
    let server = Server::start(
        "shed",
        &[
            "--max-queued-bytes",
            "524288",
            "--presence-batch",
            "20ms",
            "--rate-limits.publish-per-connection",
            "0/1s",
            "--rate-limits.publish-per-room",
            "0/1s",
            "--default-rooms",
            "",
        ],
    );
    let join = |c: &mut Client, room: &str| {
        let id = c.request("join", &[("room", s(room))]);
        c.expect("reply", Some(id));
    };
    let mut lagging = server.connect(&server.token("lagging"), None);
    welcome(&mut lagging);
    join(&mut lagging, "hose");
    let mut fast = server.connect(&server.token("fast"), None);
    welcome(&mut fast);
    join(&mut fast, "hose");
    let mut toggler = server.connect(&server.token("toggler"), None);
    welcome(&mut toggler);
    let chunk = "z".repeat(16 * 1024);
    let mut published = 0u64;
    let mut inside = false;
    // Fill the kernel's buffers and then `lagging`'s queue, changing presence every 8 messages,
    // until a diff has been shed (the queue is then past 256 KiB and below 384 KiB: no 4011).
    while presence_shed(&server) == 0 {
        assert!(published < 2000, "no diff was shed");
        for _ in 0..8 {
            fast.send_value(
                &obj(&[
                    ("op", s("publish")),
                    ("room", s("hose")),
                    ("data", obj(&[("i", n(published)), ("t", s(&chunk))])),
                ]),
                false,
            );
            fast.expect("message", None);
            published += 1;
        }
        let op = if inside { "leave" } else { "join" };
        let id = toggler.request(op, &[("room", s("hose"))]);
        toggler.expect("reply", Some(id));
        inside = !inside;
        std::thread::sleep(Duration::from_millis(30));
    }
    // One more change, seen by the member that keeps up and shed for the lagging one.
    let mut late = server.connect(&server.token("late"), None);
    welcome(&mut late);
    join(&mut late, "hose");
    loop {
        let diff = fast.expect("presence", None);
        let joined = diff.get("joined").and_then(Value::as_array).unwrap();
        if joined
            .iter()
            .any(|u| u.get("user").and_then(Value::as_str) == Some("late"))
        {
            break;
        }
    }
    // The lagging member drains: every message, in order, and no diff naming `late`.
    lagging.set_timeout(Duration::from_secs(10));
    let mut next = 0u64;
    while next < published {
        let v = lagging.recv().unwrap();
        match v.get("op").and_then(Value::as_str) {
            Some("message") => {
                let i = v
                    .get("data")
                    .and_then(|d| d.get("i"))
                    .and_then(Value::as_u64);
                assert_eq!(i, Some(next));
                next += 1;
            }
            Some("presence") => {
                let text = format!("{v:?}");
                assert!(!text.contains("late"), "a shed diff arrived: {text}");
            }
            _ => {}
        }
    }
    let id = lagging.request("presence", &[("room", s("hose"))]);
    let reply = lagging.expect("reply", Some(id));
    let users: Vec<&str> = reply
        .get("presence")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .filter_map(|e| e.get("user").and_then(Value::as_str))
        .collect();
    assert!(
        users.contains(&"late") && users.contains(&"lagging"),
        "{users:?}"
    );
    assert!(presence_shed(&server) >= 2);
}

#[test]
fn silent_connections_close_with_4010() {
    let server = Server::start("idle", &["--heartbeat", "1s"]);
    let token = server.token("sleepy");
    // A raw client that never answers pings nor sends anything: closed after 2 × 1 s + 10 s.
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let started = std::time::Instant::now();
    assert_eq!(close_code(&mut stream), Some(4010));
    assert!(
        started.elapsed() >= Duration::from_secs(11),
        "{:?}",
        started.elapsed()
    );
}

/// `welcome.rooms` lists the default rooms actually joined, in configured order, then the
/// personal room: a full default room is skipped, and listed again once there is space.
#[test]
fn welcome_lists_the_default_rooms_joined_in_order() {
    let server = Server::start(
        "welcomerooms",
        &[
            "--max-room-members",
            "1",
            "--default-rooms",
            "b.room,a.room",
        ],
    );
    let rooms = |c: &mut Client| -> Vec<String> {
        c.expect("welcome", None)
            .get("rooms")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let mut first = server.connect(&server.token("u0"), None);
    assert_eq!(rooms(&mut first), ["b.room", "a.room", "user:u0"]);
    let mut second = server.connect(&server.token("u1"), None);
    assert_eq!(rooms(&mut second), ["user:u1"]);
    let id = first.request("leave", &[("room", s("b.room"))]);
    first.expect("reply", Some(id));
    let mut third = server.connect(&server.token("u2"), None);
    assert_eq!(rooms(&mut third), ["b.room", "user:u2"]);
    // The server still serves the ones that were refused a room.
    let id = second.request("ping", &[]);
    second.expect("pong", Some(id));
}

/// A publish pipelined behind a join waits for the join's answer: behind a refused join it is
/// `not_joined` and reaches nobody; behind an accepted one it goes out in order. Each outsider
/// sends both frames in one TCP write, and there are eight of them so that some land on the shard
/// that is not the room's home (where the join's answer comes later than the publish is read).
#[test]
fn publish_behind_a_refused_join_reaches_nobody() {
    let server = Server::start(
        "heldpublish",
        &[
            "--shards",
            "2",
            "--max-room-members",
            "1",
            "--default-rooms",
            "",
        ],
    );
    let mut member = server.connect(&server.token("member"), None);
    welcome(&mut member);
    let id = member.request("join", &[("room", s("full"))]);
    member.expect("reply", Some(id));

    let pipelined = |client: &mut Client, room: &str, publishes: u64| {
        let text = |t: String| tungstenite::Message::Text(t.into());
        client
            .socket
            .write(text(format!(r#"{{"op":"join","id":100,"room":"{room}"}}"#)))
            .unwrap();
        for i in 1..=publishes {
            let frame = format!(
                r#"{{"op":"publish","id":{},"room":"{room}","data":{{"x":{i}}}}}"#,
                100 + i
            );
            client.socket.write(text(frame)).unwrap();
        }
        client.socket.flush().unwrap();
    };
    let code = |v: &Value| v.get("code").and_then(Value::as_str).map(str::to_owned);
    let mut outsiders = Vec::new();
    for i in 0..8 {
        let mut outsider = server.connect(&server.token(&format!("outsider{i}")), None);
        welcome(&mut outsider);
        pipelined(&mut outsider, "full", 1);
        outsiders.push(outsider);
    }
    for outsider in &mut outsiders {
        let refused = outsider.expect("error", Some(100));
        assert_eq!(code(&refused).as_deref(), Some("room_full"));
        let refused = outsider.expect("error", Some(101));
        assert_eq!(code(&refused).as_deref(), Some("not_joined"));
    }
    // Nothing reached the member: no message before its own pong (presence diffs may come).
    let id = member.request("ping", &[]);
    loop {
        let next = member.recv().unwrap();
        let op = next.get("op").and_then(Value::as_str);
        assert_ne!(op, Some("message"), "{next:?}");
        if op == Some("pong") && next.get("id").and_then(Value::as_u64) == Some(id) {
            break;
        }
    }

    // Pipelined behind an accepted join, publishes are sequenced in the order sent.
    for (i, outsider) in outsiders.iter_mut().enumerate() {
        let room = format!("open{i}");
        pipelined(outsider, &room, 2);
        outsider.expect("reply", Some(100));
        let seq = |v: Value| v.get("seq").and_then(Value::as_u64);
        assert_eq!(seq(outsider.expect("reply", Some(101))), Some(1));
        assert_eq!(seq(outsider.expect("reply", Some(102))), Some(2));
    }
}

#[test]
fn room_size_limit_answers_room_full() {
    let server = Server::start(
        "roomfull",
        &["--max-room-members", "2", "--default-rooms", ""],
    );
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = server.connect(&server.token(&format!("u{i}")), None);
        welcome(&mut c);
        let id = c.request("join", &[("room", s("small"))]);
        let v = loop {
            let v = c.recv().unwrap();
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                break v;
            }
        };
        let op = v.get("op").and_then(Value::as_str).unwrap().to_owned();
        clients.push((c, op, v));
    }
    assert_eq!(clients[0].1, "reply");
    assert_eq!(clients[1].1, "reply");
    assert_eq!(clients[2].1, "error");
    assert_eq!(
        clients[2].2.get("code").and_then(Value::as_str),
        Some("room_full")
    );
    let (_, metrics) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(metrics.contains("ringhub_room_full_total 1"), "{metrics}");
}

#[test]
fn socketio_client_shares_rooms_with_native_clients() {
    let server = Server::start("sio", &["--shards", "2"]);
    let token = server.token("sio-user");
    let url = format!(
        "ws://127.0.0.1:{}/socket.io/?EIO=4&transport=websocket",
        server.port
    );
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut sio, _) = tungstenite::client::client(url.as_str(), stream).unwrap();
    let read_text = |sio: &mut tungstenite::WebSocket<TcpStream>| loop {
        match sio.read().unwrap() {
            tungstenite::Message::Text(t) if t.as_str() != "2" => return t.as_str().to_owned(),
            tungstenite::Message::Text(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    let open = read_text(&mut sio);
    assert!(
        open.starts_with(r#"0{"sid":""#)
            && open.contains(r#""pingInterval":25000,"pingTimeout":35000"#),
        "{open}"
    );
    sio.send(tungstenite::Message::Text(
        format!(r#"40{{"token":"{token}"}}"#).into(),
    ))
    .unwrap();
    let connected = read_text(&mut sio);
    assert!(connected.starts_with(r#"40{"sid":"#), "{connected}");
    sio.send(tungstenite::Message::Text(
        r#"421["join",{"room_id":"mixed"}]"#.into(),
    ))
    .unwrap();
    assert_eq!(read_text(&mut sio), r#"431[{"ok":true}]"#);

    let mut native = server.connect(&server.token("native"), None);
    welcome(&mut native);
    let id = native.request("join", &[("room", s("mixed"))]);
    native.expect("reply", Some(id));

    sio.send(tungstenite::Message::Text(
        r#"422["message",{"room_id":"mixed","message":{"text":"from sio"}}]"#.into(),
    ))
    .unwrap();
    let mut got_ack = false;
    let mut got_event = false;
    while !(got_ack && got_event) {
        let text = read_text(&mut sio);
        if text == r#"432[{"ok":true,"seq":1}]"# {
            got_ack = true;
        } else if text.starts_with(r#"42["message""#) {
            assert_eq!(
                text,
                r#"42["message",{"room_id":"mixed","user_id":"sio-user","username":"sio-user","message":{"text":"from sio"},"seq":1}]"#
            );
            got_event = true;
        }
    }
    let m = native.expect("message", None);
    assert_eq!(m.get("from").and_then(Value::as_str), Some("sio-user"));
    assert_eq!(m.get("data"), Some(&obj(&[("text", s("from sio"))])));
    let id = native.request(
        "publish",
        &[("room", s("mixed")), ("data", s("from native"))],
    );
    native.expect("reply", Some(id));
    loop {
        let text = read_text(&mut sio);
        if text.starts_with(r#"42["message""#) {
            assert!(
                text.contains(r#""message":"from native","seq":2"#),
                "{text}"
            );
            break;
        }
    }
    // A failed event with an ack gets {ok:false} (a custom event without its room); without an
    // ack, an `error` event.
    sio.send(tungstenite::Message::Text(r#"423["dance",{}]"#.into()))
        .unwrap();
    assert_eq!(
        read_text(&mut sio),
        r#"433[{"ok":false,"error":{"code":"invalid_message","message":"room_id must be a string"}}]"#
    );
    sio.send(tungstenite::Message::Text(
        r#"42["leave",{"room_id":"never"}]"#.into(),
    ))
    .unwrap();
    assert_eq!(
        read_text(&mut sio),
        r#"42["error",{"code":"not_joined","message":"not joined to this room"}]"#
    );

    // A bad token is a CONNECT_ERROR.
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (mut bad, _) = tungstenite::client::client(url.as_str(), stream).unwrap();
    let _open = read_text(&mut bad);
    bad.send(tungstenite::Message::Text(r#"40{"token":"nope"}"#.into()))
        .unwrap();
    assert_eq!(read_text(&mut bad), r#"44{"message":"unauthorized"}"#);
}

/// Reads the raw stream until its text holds `needle`; panics with what arrived otherwise.
fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    use std::io::Read;
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&data).into_owned();
        if text.contains(needle) {
            return text;
        }
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => data.extend_from_slice(&buf[..n]),
            other => panic!("waiting for {needle} ({other:?}): {text}"),
        }
    }
}

/// A frame that arrives one byte per read, and a message fragmented over frames written one at a
/// time with a control frame between them, are assembled exactly: a shard's reader keeps what a
/// read leaves unfinished, per connection, until the rest arrives.
#[test]
fn frames_split_across_reads_and_fragmented_messages_are_reassembled() {
    let server = Server::start("trickle", &["--default-rooms", ""]);
    let mut stream = raw_ws(&server);
    read_until(&mut stream, r#""op":"welcome""#);
    let mut ping = Vec::new();
    ws::encode_masked_frame(
        &mut ping,
        ws::frame::TEXT,
        true,
        br#"{"op":"ping","id":7}"#,
        [9, 8, 7, 6],
    );
    for byte in &ping {
        stream.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    read_until(&mut stream, r#"{"op":"pong","id":7}"#);
    let parts: [(ws::OpCode, bool, &[u8]); 4] = [
        (ws::frame::TEXT, false, br#"{"op":"pi"#),
        (ws::frame::CONTINUE, false, b"ng\",\"id\""),
        (ws::frame::PING, true, b"mid"),
        (ws::frame::CONTINUE, true, b":8}"),
    ];
    for (opcode, fin, payload) in parts {
        let mut frame = Vec::new();
        ws::encode_masked_frame(&mut frame, opcode, fin, payload, [1, 2, 3, 4]);
        stream.write_all(&frame).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = read_until(&mut stream, r#"{"op":"pong","id":8}"#);
    assert!(
        text.contains("mid"),
        "the control frame between fragments is answered"
    );
    still_serves(&server);
}
