//! HTTP/1.1 framing and the holds a peer can try before it is authenticated (SPEC §2, §4):
//! chunked bodies, slow heads and bodies, the per-IP cap on connections in progress, a Socket.IO
//! socket that never sends CONNECT, and the per-IP table behind the upgrade limits. Each test
//! asserts the exact answer, then shows the server still serves.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ringhub_tests::Server;

/// `GET /healthz` answers 200.
fn healthy(server: &Server) {
    let (status, text) =
        server.http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, 200, "{text}");
}

/// A metric's value from `/metrics` (the first line that starts with `name`).
fn metric(server: &Server, name: &str) -> Option<f64> {
    let (_, text) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A chunked POST of `body` (in chunks of `chunk` bytes) with extra header lines.
fn chunked(path: &str, extra: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: ringhub-tests\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n{extra}\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk.max(1)) {
        raw.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nX-Trailer: ignored\r\n\r\n");
    raw
}

/// Sends raw bytes and reads until the peer closes; returns (status, text, closed by the peer).
fn exchange(server: &Server, raw: &[u8]) -> (u16, String, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // The server may answer (and close) before the whole request is written.
    let _ = stream.write_all(raw);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text, closed)
}

#[test]
fn chunked_bodies_are_decoded_and_bad_framing_is_refused_and_closed() {
    let server = Server::start("chunked", &["--bcrypt-cost", "4"]);
    // A registration whose body arrives in 7-byte chunks with extensions and a trailer.
    let body = br#"{"username":"chunky","email":"chunky@example.com","password":"correct horse"}"#;
    let (status, text, _) = exchange(&server, &chunked("/register", "", body, 7));
    assert_eq!(status, 201, "{text}");
    assert!(text.contains(r#""username":"chunky""#), "{text}");
    // The account exists: the same body again is a conflict, framed by Content-Length this time.
    let again = server.api(
        "POST",
        "/register",
        &[],
        Some(std::str::from_utf8(body).unwrap()),
    );
    assert_eq!(
        (again.status, again.code().as_str()),
        (409, "username_taken")
    );

    // One byte past 64 KiB of decoded body: 413, and the connection is closed.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024 - 9));
    assert_eq!(big.len(), 64 * 1024 + 1);
    let (status, text, closed) = exchange(&server, &chunked("/register", "", big.as_bytes(), 4096));
    assert_eq!(status, 413, "{text}");
    assert!(text.contains(r#""code":"too_large""#), "{text}");
    assert!(closed);

    // Both framings, another coding, or a malformed chunk: 400 bad_request, connection closed.
    for (name, raw) in [
        (
            "length and chunked",
            chunked("/login", "Content-Length: 5\r\n", b"{}", 2),
        ),
        (
            "gzip, chunked",
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "chunked twice",
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "size not hex",
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
        (
            "data longer than its size",
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{}\r\n0\r\n\r\n".to_vec(),
        ),
    ] {
        let (status, text, closed) = exchange(&server, &raw);
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains(r#""code":"bad_request""#), "{name}: {text}");
        assert!(text.contains("Connection: close"), "{name}: {text}");
        assert!(closed, "{name}");
    }

    // Keep-alive: a chunked request followed by another on the same connection.
    let mut two = chunked("/healthz-not-a-route", "", b"{}", 1);
    let marker = b"Connection: close\r\n";
    let at = two
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("marker");
    two.drain(at..at + marker.len());
    two.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, text, _) = exchange(&server, &two);
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains(r#"{"status":"ok","node_id":""#),
        "second response: {text}"
    );
    healthy(&server);
}

/// A connection that sends `bytes` one at a time, `every` apart, and notes when the server
/// closes it.
struct Trickle {
    stream: TcpStream,
    bytes: Vec<u8>,
    sent: usize,
    started: Instant,
    closed_after: Option<Duration>,
}

impl Trickle {
    fn open(server: &Server, bytes: Vec<u8>) -> Trickle {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        stream.set_nonblocking(true).expect("nonblocking");
        Trickle {
            stream,
            bytes,
            sent: 0,
            started: Instant::now(),
            closed_after: None,
        }
    }

    /// Sends the next byte (if the server has not closed) and checks for the close.
    fn step(&mut self) {
        if self.closed_after.is_some() {
            return;
        }
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.closed_after = Some(self.started.elapsed());
                    return;
                }
                // An answer (e.g. 408) is allowed; the close is what counts.
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.closed_after = Some(self.started.elapsed());
                    return;
                }
            }
        }
        if self.sent < self.bytes.len()
            && self
                .stream
                .write(&self.bytes[self.sent..=self.sent])
                .is_ok()
        {
            self.sent += 1;
        }
    }
}

#[test]
fn slow_heads_and_bodies_are_cut_while_others_are_served() {
    let server = Server::start(
        "slowloris",
        &["--http-head-timeout", "2s", "--http-body-timeout", "2s"],
    );
    // 40 heads and 10 bodies trickled at one byte every 100 ms: each head would take ~10 s.
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n".to_vec();
    let mut slow_body = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n".to_vec();
    let body_starts = slow_body.len();
    slow_body.extend_from_slice(&[b' '; 200]);
    let mut trickles: Vec<Trickle> = (0..40)
        .map(|_| Trickle::open(&server, head.clone()))
        .collect();
    // The body trickles send their head at once, then the body byte by byte.
    for _ in 0..10 {
        let mut t = Trickle::open(&server, slow_body.clone());
        t.stream.write_all(&slow_body[..body_starts]).expect("head");
        t.sent = body_starts;
        t.started = Instant::now();
        trickles.push(t);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served = 0;
    while Instant::now() < deadline && trickles.iter().any(|t| t.closed_after.is_none()) {
        for t in &mut trickles {
            t.step();
        }
        // A normal client is served throughout.
        healthy(&server);
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let times: Vec<Option<Duration>> = trickles.iter().map(|t| t.closed_after).collect();
    assert!(
        times
            .iter()
            .all(|t| t.is_some_and(|d| d < Duration::from_secs(4))),
        "every trickling connection is closed within the 2 s bound (plus slack): {times:?}"
    );
    assert!(
        times
            .iter()
            .all(|t| t.is_some_and(|d| d >= Duration::from_millis(1900))),
        "and not before it: {times:?}"
    );
    assert!(served >= 15, "the normal client was served {served} times");
    healthy(&server);
}

#[test]
fn connections_in_progress_are_capped_per_ip() {
    let server = Server::start("pending", &["--max-pending-per-ip", "8"]);
    // Eight connections that send nothing yet hold the eight places of 127.0.0.1.
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, text, closed) = exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 429, "{text}");
    assert!(text.contains(r#""code":"rate_limited""#), "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    assert!(closed);
    // One ends: its place is free again.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    healthy(&server);
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let (_, metrics) = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(
        metrics.contains("ringhub_rate_limited_total{limit=\"pending_per_ip\"} 1"),
        "{metrics}"
    );
    // A WebSocket that is authenticated no longer counts: nine clients at once are fine.
    let token = server.token("many");
    let clients: Vec<_> = (0..9).map(|_| server.connect(&token, None)).collect();
    assert_eq!(clients.len(), 9);
    healthy(&server);
}

#[test]
fn a_socketio_socket_without_connect_is_cut_after_the_head_timeout() {
    let server = Server::start("sio-hold", &["--http-head-timeout", "2s"]);
    let open = |server: &Server| {
        let mut stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        stream
            .write_all(
                b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                  Sec-WebSocket-Version: 13\r\n\r\n",
            )
            .expect("write");
        stream
            .set_read_timeout(Some(Duration::from_secs(8)))
            .expect("timeout");
        stream
    };
    let mut sockets: Vec<TcpStream> = (0..5).map(|_| open(&server)).collect();
    let started = Instant::now();
    for stream in &mut sockets {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&seen);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("\"sid\""), "the open packet went out: {text}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    // Only the request that asks is in progress.
    assert_eq!(metric(&server, "ringhub_pending_connections"), Some(1.0));
    healthy(&server);
}

#[test]
fn the_per_ip_table_groups_ipv6_by_64_and_forgets_refused_addresses() {
    let server = Server::start(
        "ip-table",
        &[
            "--trusted-proxies",
            "127.0.0.1/32",
            "--rate-limits.connect-per-ip",
            "1/1m",
            "--rate-limits.connect-burst",
            "5",
        ],
    );
    // Five addresses of one /64 share its bucket: the sixth is over the connect rate.
    for n in 1..=5 {
        let (status, text) =
            server.upgrade_raw("/ws", &format!("X-Forwarded-For: 2001:db8:1:2::{n:x}\r\n"));
        assert_eq!(status, 401, "{n}: {text}");
    }
    let (status, text) = server.upgrade_raw("/ws", "X-Forwarded-For: 2001:db8:1:2:ffff::9\r\n");
    assert_eq!(status, 429, "{text}");
    // Another /64 has its own.
    let (status, _) = server.upgrade_raw("/ws", "X-Forwarded-For: 2001:db8:1:3::1\r\n");
    assert_eq!(status, 401);
    healthy(&server);
}

#[test]
fn refused_upgrades_leave_no_entry_behind() {
    let server = Server::start(
        "ip-sweep",
        &[
            "--trusted-proxies",
            "127.0.0.1/32",
            "--rate-limits.connect-per-ip",
            "100/1s",
            "--rate-limits.connect-burst",
            "1",
        ],
    );
    for n in 0..200u32 {
        let (status, _) = server.upgrade_raw(
            "/ws",
            &format!("X-Forwarded-For: 198.18.{}.{}\r\n", n / 250, n % 250 + 1),
        );
        assert_eq!(status, 401);
    }
    let entries = metric(&server, "ringhub_ip_table_entries").expect("gauge");
    assert!(
        entries >= 150.0,
        "{entries} entries right after the refusals"
    );
    // Their buckets refill in 10 ms; every stripe is swept within ~2 s.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut left = entries;
    while Instant::now() < deadline {
        left = metric(&server, "ringhub_ip_table_entries").expect("gauge");
        if left == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(left, 0.0, "entries left after the sweep");
    healthy(&server);
}
