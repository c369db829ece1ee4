//! The end-to-end load generator: starts a real `ringhub serve` (or a trivial raw-socket writer
//! for the `ceiling` scenario), opens authenticated WebSocket connections spread over loopback
//! source addresses 127.0.0.2..=127.0.0.17 (to stay clear of port exhaustion), and prints one JSON
//! line of results per scenario. Every loop is bounded in count and time.
//!
//! ```text
//! loadgen idle    [--conns 15000]
//! loadgen connect [--conns 10000] [--concurrency 64]
//! loadgen fanout  [--rooms 10] [--room-size 100] [--publishers 1] [--payload 64] [--duration 10]
//! loadgen ceiling [--rooms 10] [--room-size 100] [--payload 64] [--duration 10]
//! common: [--server target/release/ringhub] [--shards 2] [--threads 2] [--format json|msgpack] [--zstd]
//! several nodes (fanout): [--nodes 2] [--redis-url redis://127.0.0.1:6379] [--redis-cluster true]
//! server limits: [--connect-per-ip 0/1s] (off by default; e.g. 1000000/1s counts without refusing)
//! ```
//! With `--nodes N` (or `--redis-url`), N servers are started on one Redis (a prefix of their own,
//! the same secrets) and the connections are spread over them round-robin, so that every room has
//! members on every node; the report adds the Redis commands per publish and Redis's CPU per
//! 1,000 publishes (`INFO cpu`, summed over every server of `--redis-url`; with
//! `--redis-cluster true` it lists the cluster's masters as seeds).
//! This machine caps a process at 20,000 open files: keep --conns (and rooms × room-size) under
//! about 18,000, since the load generator holds one descriptor per connection; `connect` closes
//! each connection after its welcome, so there only --concurrency counts (--conns up to 100,000,
//! for a run long enough to measure steadily).
//!
//! `fanout` and `ceiling` also report the CPU time (user + system, `/proc/PID/stat`) that the
//! server and the load generator used per delivery during the window, deliveries per read on the
//! receiving side and payload bytes per delivery (the ceiling writes the engine's exact frames).
// A measuring tool: it panics on any failure (that is its error report) and casts counts freely.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    missing_docs
)]

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use protocol::ws;

#[derive(Debug, Clone)]
struct Opts {
    scenario: String,
    server: String,
    shards: usize,
    threads: usize,
    conns: usize,
    concurrency: usize,
    rooms: usize,
    room_size: usize,
    publishers: usize,
    payload: usize,
    duration: u64,
    msgpack: bool,
    zstd: bool,
    /// Messages per second per publisher (0 = as fast as the bounded batches go).
    rate: u64,
    /// Distinct users the connections spread over (0 = one user per connection).
    users: usize,
    /// Create the fan-out rooms through `POST /rooms` with this permission (owned by each room's
    /// first publisher), so that joins and publishes go through the permission checks.
    permission: Option<String>,
    /// Servers started (several nodes on one Redis when more than one, or with `redis_url`).
    nodes: usize,
    redis_url: Option<String>,
    /// `--redis-url` lists the seed nodes of a Redis Cluster.
    redis_cluster: bool,
    /// The server's `connect_per_ip` (off unless given: the load comes from 16 addresses).
    connect_per_ip: String,
    /// Serve TLS (a certificate made here) and connect over it (the `idle` scenario).
    tls: bool,
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        scenario: args.first().cloned().unwrap_or_else(|| "idle".into()),
        server: "target/release/ringhub".into(),
        shards: 2,
        threads: 2,
        conns: 15000,
        concurrency: 64,
        rooms: 10,
        room_size: 100,
        publishers: 1,
        payload: 64,
        duration: 10,
        msgpack: false,
        zstd: false,
        rate: 0,
        users: 0,
        permission: None,
        nodes: 1,
        redis_url: None,
        redis_cluster: false,
        connect_per_ip: "0/1s".into(),
        tls: false,
    };
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        let num = || {
            value
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--server" => o.server = value.clone(),
            "--shards" => o.shards = num() as usize,
            "--threads" => o.threads = num() as usize,
            "--conns" => o.conns = num() as usize,
            "--concurrency" => o.concurrency = num() as usize,
            "--rooms" => o.rooms = num() as usize,
            "--room-size" => o.room_size = num() as usize,
            "--publishers" => o.publishers = num() as usize,
            "--payload" => o.payload = num() as usize,
            "--duration" => o.duration = num().min(120),
            "--format" => o.msgpack = value == "msgpack",
            "--rate" => o.rate = num(),
            "--users" => o.users = num() as usize,
            "--permission" => o.permission = Some(value.clone()),
            "--nodes" => o.nodes = (num() as usize).max(1),
            "--redis-url" => o.redis_url = Some(value.clone()),
            "--redis-cluster" => o.redis_cluster = value == "true",
            "--connect-per-ip" => o.connect_per_ip = value.clone(),
            "--tls" => o.tls = value == "true",
            "--zstd" => {
                o.zstd = true;
                i += 1;
                continue;
            }
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    // `connect` closes each connection after its welcome, so only `concurrency` are open at once.
    let open_at_once = if o.scenario == "connect" {
        o.concurrency
    } else {
        o.conns
    };
    assert!(
        open_at_once <= 18_000 && o.rooms * o.room_size <= 18_000 && o.conns <= 100_000,
        "stay under the 20,000 open files limit (and 100,000 connections)"
    );
    o
}

struct ServerProc {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
    /// Started with the secrets every node shares.
    shared_secrets: bool,
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The secrets the nodes of one service share (several-nodes runs).
const SHARED_SECRET: &str = "loadgen-nodes-share-this-secret-0123456789";
const SHARED_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Whether this run starts several nodes on Redis.
fn on_redis(o: &Opts) -> bool {
    o.nodes > 1 || o.redis_url.is_some()
}

/// The servers of a run: one, or `--nodes` on one Redis.
fn start_servers(o: &Opts) -> Vec<ServerProc> {
    if !on_redis(o) {
        return vec![start_server(o, 0, &[])];
    }
    let url = o
        .redis_url
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let prefix = format!("loadgen{}", std::process::id());
    let cluster = if o.redis_cluster { "true" } else { "false" };
    (0..o.nodes)
        .map(|i| {
            let node = format!("n{i}");
            start_server(
                o,
                i,
                &[
                    "--redis-cluster",
                    cluster,
                    "--redis-url",
                    &url,
                    "--redis-prefix",
                    &prefix,
                    "--node-id",
                    &node,
                    "--jwt-secret",
                    SHARED_SECRET,
                    "--encryption-key",
                    SHARED_KEY,
                    "--blind-index-key",
                    SHARED_SECRET,
                ],
            )
        })
        .collect()
}

/// Redis's CPU so far (user + system, every server of `--redis-url`), in ms, from `INFO cpu`.
fn redis_cpu_ms(o: &Opts) -> Option<f64> {
    let url = o.redis_url.as_deref().unwrap_or("redis://127.0.0.1:6379");
    url.split(',').map(|u| server_cpu_ms(u.trim())).sum()
}

/// One Redis server's CPU so far, in ms.
fn server_cpu_ms(url: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("redis://").split('/').next()?;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    stream.write_all(b"INFO cpu\r\n").ok()?;
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((field("used_cpu_user:")? + field("used_cpu_sys:")?) * 1000.0)
}

fn start_server(o: &Opts, node: usize, extra: &[&str]) -> ServerProc {
    let dir = std::env::temp_dir().join(format!("ringhub-loadgen-{}-{node}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shards = o.shards.to_string();
    let data = dir.join("data").display().to_string();
    let mut child = Command::new(&o.server)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            &shards,
            "--data-dir",
            &data,
            "--default-rooms",
            "",
            "--log-level",
            "warn",
        ])
        .args([
            "--rate-limits.connect-per-ip",
            &o.connect_per_ip,
            "--rate-limits.connect-burst",
            "1000000",
            "--max-connections-per-ip",
            "10000000",
            "--max-pending-per-ip",
            "1000000",
            "--max-connections-per-user",
            "100000",
        ])
        .args([
            "--rate-limits.publish-per-connection",
            "0/1s",
            "--rate-limits.publish-per-room",
            "0/1s",
            "--rate-limits.join-per-connection",
            "0/1s",
            "--rate-limits.login-per-ip",
            "0/1s",
            "--rate-limits.register-per-ip",
            "0/1s",
        ])
        .args([
            "--max-room-members",
            "10000000",
            "--max-queued-bytes",
            "16MiB",
            "--compression-threshold",
            "256",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (build it with `cargo build --release -p ringhub`)",
                o.server
            )
        });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(rest) = line.split("\"addr\":\"").nth(1) {
            break rest.split('"').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    ServerProc {
        child,
        addr,
        dir,
        shared_secrets: !extra.is_empty(),
    }
}

fn tokens(server: &ServerProc, count: usize, users: usize) -> Vec<String> {
    let data = server.dir.join("data").display().to_string();
    let mut flags = vec![("--data-dir".to_owned(), data)];
    if server.shared_secrets {
        flags.push(("--jwt-secret".to_owned(), SHARED_SECRET.to_owned()));
        flags.push(("--encryption-key".to_owned(), SHARED_KEY.to_owned()));
        flags.push(("--blind-index-key".to_owned(), SHARED_SECRET.to_owned()));
    }
    let (raw, layers) = server::config::load(None, Vec::new(), &flags).unwrap();
    let config = server::config::Config::validate(raw, &layers).unwrap();
    let (secrets, _) =
        server::config::secrets::resolve(&config, server::config::secrets::Generate::Forbidden)
            .unwrap();
    let secrets = secrets.expect("secrets");
    let svc = server::tokens::TokenService::hs256(&secrets.jwt_secret, &[]);
    // Shaped like the tokens a login issues: a UUID user id, a username, a UUID session id
    // (each connection its own session), so that idle memory counts what real identities cost.
    (0..count)
        .map(|i| {
            let (id, name) = identity(if users == 0 { i } else { i % users });
            let session = format!("{i:08x}-5a0c-4e6b-8d21-{i:012x}");
            svc.mint(&id, &name, &session, 3600, None).unwrap().0
        })
        .collect()
}

/// The user id and username of the load generator's user number `user`.
fn identity(user: usize) -> (String, String) {
    (
        format!("{user:08x}-7e1d-4c2a-9b3f-{user:012x}"),
        format!("user{user}"),
    )
}

/// One counter of a server's `/metrics` (0 when absent).
fn server_counter(addr: SocketAddr, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return 0.0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A server's `/metrics` text, over TLS when `tls` is given.
fn metrics_text(addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> String {
    use std::io::{Read, Write};
    let Ok(stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut text = String::new();
    match tls {
        None => {
            let mut stream = stream;
            let _ = stream.write_all(request);
            let _ = stream.read_to_string(&mut text);
        }
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let Ok(conn) = rustls::ClientConnection::new(config.clone(), name) else {
                return text;
            };
            let mut stream = rustls::StreamOwned::new(conn, stream);
            let _ = stream.write_all(request);
            let _ = stream.read_to_string(&mut text);
        }
    }
    text
}

/// The server's counters of interest, as `"name":value` JSON fields.
fn server_counters(addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> String {
    let text = metrics_text(addr, tls);
    let mut out = String::new();
    for (name, key) in [
        ("ringhub_deliveries_total ", "server_deliveries"),
        (
            "ringhub_messages_in_total{op=\"publish\"} ",
            "server_publishes",
        ),
        ("ringhub_connections ", "server_connections"),
        ("ringhub_socket_writes_total ", "server_socket_writes"),
        ("ringhub_deferred_flushes_total ", "server_deferred_flushes"),
        (
            "ringhub_shard_write_delay_us{shard=\"0\"} ",
            "server_write_delay_us_shard0",
        ),
        (
            "ringhub_shard_write_delay_us{shard=\"1\"} ",
            "server_write_delay_us_shard1",
        ),
    ] {
        if let Some(v) = text.lines().find_map(|l| l.strip_prefix(name)) {
            out.push_str(&format!(",\"{key}\":{v}"));
        }
    }
    // Connections the server closed or lost, by close code (a run whose clients fell behind shows
    // its 4011 slow-consumer closes here rather than as a mysteriously low rate).
    let closed: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ringhub_disconnects_total{code=\""))
        .filter_map(|l| l.split_once("\"} "))
        .filter(|(_, v)| *v != "0")
        .map(|(code, v)| format!("\"{code}\":{v}"))
        .collect();
    out.push_str(&format!(",\"server_disconnects\":{{{}}}", closed.join(",")));
    out
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` figure of `/proc/PID/status` (`VmRSS:`, `VmHWM:` for the peak).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) that process `pid` ("self" for the load generator) has used, in
/// clock ticks of `/proc/PID/stat` (100 per second here).
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the first, utime the 12th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// CPU ticks used during the measuring window by the server (0 for `ceiling`) and the load
/// generator, reported per delivery: a steadier figure of cost than throughput on a shared machine.
#[derive(Default, Clone, Copy)]
struct WindowCpu {
    server_ticks: u64,
    client_ticks: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A blocking connect from a chosen loopback source address, handed to monoio.
fn connect_from(addr: SocketAddr, n: usize) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2 + (n % 16) as u8), 0);
    socket.bind(&src.into())?;
    socket.connect(&addr.into())?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    TcpStream::from_std(socket.into())
}

/// The upgrade request of a native connection.
fn upgrade_request(token: &str, protocol: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {protocol}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
}

/// Splits server frames out of a byte stream.
#[derive(Default)]
struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// After bytes of an upgrade's answer arrived: checks the `101` head once it is whole (the
    /// refusal as the error), then whether a frame (the welcome) came; false while waiting.
    fn upgrade_answered(&mut self, head_done: &mut bool) -> std::io::Result<bool> {
        if !*head_done {
            let Some(pos) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                return Ok(false);
            };
            if !self.buf.starts_with(b"HTTP/1.1 101") {
                return Err(std::io::Error::other(
                    String::from_utf8_lossy(&self.buf).into_owned(),
                ));
            }
            self.buf.drain(..pos + 4);
            *head_done = true;
        }
        let mut welcomed = false;
        self.drain(|_, _| welcomed = true);
        Ok(welcomed)
    }

    /// Calls `f(opcode, payload)` for every complete frame; keeps the rest.
    fn drain(&mut self, mut f: impl FnMut(u8, &[u8])) {
        let mut i = 0;
        loop {
            let b = &self.buf[i..];
            if b.len() < 2 {
                break;
            }
            let (len, header) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                l => (usize::from(l), 2),
            };
            if b.len() < header + len {
                break;
            }
            f(b[0] & 0x0F, &b[header..header + len]);
            i += header + len;
        }
        self.buf.drain(..i);
    }
}

/// A client connection's TLS state (rustls), shared by its read and write halves; `None` for
/// plain TCP. Borrows never cross an await.
type Tls = Option<Rc<RefCell<rustls::ClientConnection>>>;

/// `plain` as it goes on the wire: records over TLS, as it is otherwise.
fn seal(tls: &Tls, plain: Vec<u8>) -> Vec<u8> {
    use std::io::Write;
    let Some(conn) = tls else {
        return plain;
    };
    let mut conn = conn.borrow_mut();
    conn.writer().write_all(&plain).unwrap();
    let mut out = Vec::with_capacity(plain.len() + 64);
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// What `cipher` decrypts to, appended to `out`; false on a TLS error.
fn unseal(conn: &RefCell<rustls::ClientConnection>, cipher: &[u8], out: &mut Vec<u8>) -> bool {
    use std::io::Read;
    let mut conn = conn.borrow_mut();
    let mut rest = cipher;
    loop {
        if !rest.is_empty() && conn.read_tls(&mut rest).is_err() {
            return false;
        }
        if conn.process_new_packets().is_err() {
            return false;
        }
        let mut chunk = [0u8; 16384];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        }
        if rest.is_empty() {
            return true;
        }
    }
}

/// The client side of a TLS handshake on `stream`.
async fn handshake(
    stream: &mut TcpStream,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let conn = Rc::new(RefCell::new(conn));
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        let mut out = Vec::new();
        {
            let mut c = conn.borrow_mut();
            while c.wants_write() {
                c.write_tls(&mut out)?;
            }
        }
        if !out.is_empty() {
            let (res, _) = stream.write_all(out).await;
            res?;
        }
        if !conn.borrow().is_handshaking() {
            return Ok(Some(conn));
        }
        let (res, b) = stream.read(buf).await;
        buf = b;
        if res? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut ignored = Vec::new();
        if !unseal(&conn, &buf, &mut ignored) {
            return Err(std::io::Error::other("tls handshake failed"));
        }
        buf.clear();
    }
}

/// Reads once from any stream (whole or read half) into `reader`; false at end or error.
async fn read_into(
    stream: &mut impl AsyncReadRent,
    reader: &mut FrameReader,
    scratch: Vec<u8>,
    tls: &Tls,
) -> (bool, Vec<u8>) {
    let (res, scratch) = stream.read(scratch).await;
    match res {
        Ok(n) if n > 0 => {
            match tls {
                None => reader.buf.extend_from_slice(&scratch[..n]),
                Some(conn) => {
                    if !unseal(conn, &scratch[..n], &mut reader.buf) {
                        return (false, scratch);
                    }
                }
            }
            (true, scratch)
        }
        Ok(_) => (false, scratch),
        Err(e) => {
            eprintln!("read: {e}");
            (false, scratch)
        }
    }
}

/// Opens a connection and waits for the welcome.
async fn open(
    addr: SocketAddr,
    n: usize,
    token: &str,
    protocol: &str,
) -> std::io::Result<(TcpStream, FrameReader)> {
    let (stream, reader, _) = open_over(addr, n, token, protocol, None).await?;
    Ok((stream, reader))
}

/// [`open`], over TLS when `tls` is given.
async fn open_over(
    addr: SocketAddr,
    n: usize,
    token: &str,
    protocol: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> std::io::Result<(TcpStream, FrameReader, Tls)> {
    let mut stream = connect_from(addr, n)?;
    let secure = match tls {
        Some(config) => handshake(&mut stream, config).await?,
        None => None,
    };
    let req = upgrade_request(token, protocol);
    let (res, _) = stream.write_all(seal(&secure, req.into_bytes())).await;
    res?;
    let mut reader = FrameReader::default();
    let mut scratch = Vec::with_capacity(8192);
    let mut head_done = false;
    let mut welcomed = false;
    while !welcomed {
        let (ok, s) = read_into(&mut stream, &mut reader, scratch, &secure).await;
        scratch = s;
        if !ok {
            return Err(std::io::Error::other(format!(
                "closed during handshake after {:?}",
                String::from_utf8_lossy(&reader.buf)
            )));
        }
        welcomed = reader.upgrade_answered(&mut head_done)?;
    }
    Ok((stream, reader, secure))
}

fn masked(opcode: ws::OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    ws::encode_masked_frame(&mut out, opcode, true, payload, [0x11, 0x22, 0x33, 0x44]);
    out
}

fn protocol_name(o: &Opts) -> &'static str {
    match (o.msgpack, o.zstd) {
        (false, false) => "ringhub.v1.json",
        (false, true) => "ringhub.v1.json+zstd",
        (true, false) => "ringhub.v1.msgpack",
        (true, true) => "ringhub.v1.msgpack+zstd",
    }
}

fn encode(o: &Opts, json: &str) -> Vec<u8> {
    let v = protocol::envelope::decode_value(
        json.as_bytes(),
        protocol::envelope::Format::Json,
        &protocol::envelope::DecodeLimits::default(),
    )
    .unwrap();
    if o.msgpack {
        masked(
            ws::frame::BINARY,
            &protocol::envelope::encode_value(&v, protocol::envelope::Format::MsgPack).unwrap(),
        )
    } else {
        masked(ws::frame::TEXT, json.as_bytes())
    }
}

fn runtime() -> monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
> {
    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .with_entries(4096)
        .build()
        .unwrap()
}

/// A self-signed certificate for 127.0.0.1 written to `dir`: (cert file, key file, cert PEM).
fn tls_files(dir: &std::path::Path) -> (String, String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (c, k) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (
        c.display().to_string(),
        k.display().to_string(),
        cert.pem().into_bytes(),
    )
}

/// A client configuration trusting `pem`.
fn tls_client(pem: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Opens a WebSocket over TLS (blocking) and reads until the welcome.
fn open_tls(
    addr: SocketAddr,
    n: usize,
    token: &str,
    protocol: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let src = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2 + (n % 16) as u8), 0);
    socket.bind(&src.into())?;
    socket.connect(&addr.into())?;
    socket.set_tcp_nodelay(true)?;
    let tcp: std::net::TcpStream = socket.into();
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let req = upgrade_request(token, protocol);
    stream.write_all(req.as_bytes())?;
    let mut reader = FrameReader::default();
    let mut head_done = false;
    let mut welcomed = false;
    let mut scratch = [0u8; 8192];
    while !welcomed {
        let n = stream.read(&mut scratch)?;
        if n == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        reader.buf.extend_from_slice(&scratch[..n]);
        welcomed = reader.upgrade_answered(&mut head_done)?;
    }
    Ok(stream)
}

fn scenario_idle(o: &Opts) {
    if o.tls {
        return scenario_idle_tls(o);
    }
    let server = start_server(o, 0, &[]);
    let pid = server.child.id();
    let tokens = Arc::new(tokens(&server, o.conns, o.users));
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let opened = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..o.threads)
        .map(|t| {
            let (tokens, opened, done, o, addr) = (
                tokens.clone(),
                opened.clone(),
                done.clone(),
                o.clone(),
                server.addr,
            );
            std::thread::spawn(move || {
                runtime().block_on(async move {
                    let mut held = Vec::new();
                    for i in (t..o.conns).step_by(o.threads) {
                        match open(addr, i, &tokens[i], protocol_name(&o)).await {
                            Ok(c) => held.push(c),
                            Err(e) => panic!("connection {i}: {e}"),
                        }
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    while !done.load(Ordering::Relaxed) {
                        monoio::time::sleep(Duration::from_millis(50)).await;
                    }
                    drop(held);
                });
            })
        })
        .collect();
    while opened.load(Ordering::Relaxed) < o.conns as u64
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    done.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    // Every client closed at once: the peak shows what a mass disconnect costs the server.
    std::thread::sleep(Duration::from_secs(2));
    let closed = rss_kib(pid);
    let peak = proc_status_kib(pid, "VmHWM:");
    let n = opened.load(Ordering::Relaxed);
    println!(
        "{{\"scenario\":\"idle\",\"conns\":{n},\"shards\":{},\"format\":\"{}\",\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_conn\":{:.0},\"open_secs\":{open_secs:.2},\"rss_after_close_kib\":{closed},\"peak_rss_kib\":{peak}}}",
        o.shards,
        protocol_name(o),
        (after.saturating_sub(before) * 1024) as f64 / n.max(1) as f64
    );
}

/// `idle` over TLS: the same measure, the connections made by blocking threads (rustls).
fn scenario_idle_tls(o: &Opts) {
    let dir = std::env::temp_dir().join(format!("ringhub-loadgen-tls-{}", std::process::id()));
    let (cert, key, pem) = tls_files(&dir);
    let mut server = start_server(o, 0, &["--tls-cert-file", &cert, "--tls-key-file", &key]);
    // Its own generated secrets: the extra flags are TLS, not a shared service's secrets.
    server.shared_secrets = false;
    let pid = server.child.id();
    let tokens = Arc::new(tokens(&server, o.conns, o.users));
    let config = tls_client(&pem);
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(pid);
    let opened = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let threads = o.threads.max(4);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (tokens, opened, done, config, addr) = (
                tokens.clone(),
                opened.clone(),
                done.clone(),
                config.clone(),
                server.addr,
            );
            let (conns, protocol) = (o.conns, protocol_name(o));
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in (t..conns).step_by(threads) {
                    match open_tls(addr, i, &tokens[i], protocol, &config) {
                        Ok(c) => held.push(c),
                        Err(e) => panic!("connection {i}: {e}"),
                    }
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(held);
            })
        })
        .collect();
    while opened.load(Ordering::Relaxed) < o.conns as u64
        && started.elapsed() < Duration::from_secs(300)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let open_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid);
    let server_cpu_s = cpu_ticks(&pid.to_string()) as f64 / 100.0;
    done.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let n = opened.load(Ordering::Relaxed);
    println!(
        "{{\"scenario\":\"idle\",\"tls\":true,\"conns\":{n},\"shards\":{},\"format\":\"{}\",\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"bytes_per_conn\":{:.0},\"open_secs\":{open_secs:.2},\"server_cpu_s_total\":{server_cpu_s:.2}}}",
        o.shards,
        protocol_name(o),
        (after.saturating_sub(before) * 1024) as f64 / n.max(1) as f64
    );
}

fn scenario_connect(o: &Opts) {
    let server = start_server(o, 0, &[]);
    let tokens = Arc::new(tokens(&server, o.conns, o.users));
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..o.threads)
        .map(|_| {
            let (tokens, next, failed, o, addr) = (
                tokens.clone(),
                next.clone(),
                failed.clone(),
                o.clone(),
                server.addr,
            );
            std::thread::spawn(move || {
                runtime().block_on(async move {
                    let tasks: Vec<_> = (0..o.concurrency / o.threads.max(1))
                        .map(|_| {
                            let (tokens, next, failed, o) =
                                (tokens.clone(), next.clone(), failed.clone(), o.clone());
                            monoio::spawn(async move {
                                loop {
                                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                                    if i >= o.conns {
                                        break;
                                    }
                                    if open(addr, i, &tokens[i], protocol_name(&o)).await.is_err() {
                                        failed.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await;
                    }
                });
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "{{\"scenario\":\"connect\",\"handshakes\":{},\"failed\":{failed},\"shards\":{},\"concurrency\":{},\"secs\":{secs:.3},\"handshakes_per_sec\":{:.0}}}",
        o.conns,
        o.shards,
        o.concurrency,
        (o.conns as u64 - failed) as f64 / secs
    );
}

/// Counts delivered messages and samples latency from the `T<micros>|` prefix of `data`.
#[derive(Default)]
struct Tally {
    delivered: u64,
    /// Payload bytes of the counted messages (to check that `ceiling` writes what `fanout` gets).
    payload_bytes: u64,
    /// Reads that returned data while measuring (fewer, larger reads cost the receiver less).
    reads: u64,
    latencies_us: Vec<u32>,
}

fn note_message(payload: &[u8], measuring: bool, tally: &RefCell<Tally>) {
    let mut t = tally.borrow_mut();
    if !measuring {
        return;
    }
    t.delivered += 1;
    t.payload_bytes += payload.len() as u64;
    if t.delivered.is_multiple_of(8)
        && let Some(pos) = payload.windows(2).position(|w| w == b"|T")
    {
        let digits: u64 = payload[pos + 2..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0, |acc, b| acc * 10 + u64::from(b - b'0'));
        let lat = now_us().saturating_sub(digits);
        // A compressed payload may hold "|T" by chance: no sane timestamp, no sample.
        if t.latencies_us.len() < 2_000_000 && lat < 600_000_000 {
            t.latencies_us.push(u32::try_from(lat).unwrap_or(u32::MAX));
        }
    }
}

fn report_fanout(
    name: &str,
    o: &Opts,
    secs: f64,
    cpu: WindowCpu,
    tallies: Vec<Tally>,
    extra: &str,
) {
    let delivered: u64 = tallies.iter().map(|t| t.delivered).sum();
    let payload_bytes: u64 = tallies.iter().map(|t| t.payload_bytes).sum();
    let reads: u64 = tallies.iter().map(|t| t.reads).sum();
    let mut lat: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies_us).collect();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"scenario\":\"{name}\",\"shards\":{},\"rooms\":{},\"room_size\":{},\"publishers_per_room\":{},\"payload\":{},\"format\":\"{}\",\"secs\":{secs:.2},\"deliveries\":{delivered},\"deliveries_per_sec\":{:.0},\"payload_bytes_per_delivery\":{:.1},\"deliveries_per_read\":{:.1},\"latency_us_p50\":{},\"latency_us_p99\":{},\"latency_us_max\":{},\"server_cpu_ns_per_delivery\":{:.0},\"client_cpu_ns_per_delivery\":{:.0}{extra}}}",
        o.shards,
        o.rooms,
        o.room_size,
        o.publishers,
        o.payload,
        protocol_name(o),
        delivered as f64 / secs,
        payload_bytes as f64 / delivered.max(1) as f64,
        delivered as f64 / reads.max(1) as f64,
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(0),
        cpu.server_ticks as f64 * 1e7 / delivered.max(1) as f64,
        cpu.client_ticks as f64 * 1e7 / delivered.max(1) as f64,
    );
}

fn scenario_fanout(o: &Opts) {
    let tls_dir = std::env::temp_dir().join(format!("ringhub-loadgen-tls-{}", std::process::id()));
    let (servers, tls) = if o.tls {
        assert!(!on_redis(o), "--tls runs one node without Redis");
        let (cert, key, pem) = tls_files(&tls_dir);
        let mut server = start_server(o, 0, &["--tls-cert-file", &cert, "--tls-key-file", &key]);
        server.shared_secrets = false;
        (vec![server], Some(tls_client(&pem)))
    } else {
        (start_servers(o), None)
    };
    let server = &servers[0];
    let addrs: Arc<Vec<SocketAddr>> = Arc::new(servers.iter().map(|s| s.addr).collect());
    let total = o.rooms * o.room_size;
    let tokens = Arc::new(tokens(server, total, o.users));
    if let Some(permission) = &o.permission {
        for room in 0..o.rooms {
            let body =
                format!(r#"{{"id":"r{room}","permission":"{permission}","max_members":1000000}}"#);
            let (status, _) = http_call_as(
                server.addr,
                "POST",
                "/rooms",
                &body,
                Some(&tokens[room * o.room_size]),
            );
            assert_eq!(status, 201, "create room r{room}");
        }
    }
    let ready = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..o.threads)
        .map(|t| {
            let (tokens, ready, measuring, stop, o, addrs, tls) = (tokens.clone(), ready.clone(), measuring.clone(), stop.clone(), o.clone(), addrs.clone(), tls.clone());
            std::thread::spawn(move || {
                let tally = Rc::new(RefCell::new(Tally::default()));
                let tally2 = tally.clone();
                runtime().block_on(async move {
                    let mut tasks = Vec::new();
                    for i in (t..o.rooms * o.room_size).step_by(o.threads) {
                        let (room, member) = (i / o.room_size, i % o.room_size);
                        let addr = addrs[i % addrs.len()];
                        let (mut stream, mut reader, secure) = open_over(addr, i, &tokens[i], protocol_name(&o), tls.as_ref()).await.unwrap();
                        let join = encode(&o, &format!(r#"{{"op":"join","id":1,"room":"r{room}"}}"#));
                        let (res, _) = stream.write_all(seal(&secure, join)).await;
                        res.unwrap();
                        let mut scratch = Vec::with_capacity(64 * 1024);
                        let mut joined = false;
                        while !joined {
                            let (ok, s) = read_into(&mut stream, &mut reader, scratch, &secure).await;
                            scratch = s;
                            assert!(ok, "closed while joining");
                            reader.drain(|_, _| joined = true);
                        }
                        ready.fetch_add(1, Ordering::Relaxed);
                        let publisher = member < o.publishers;
                        let (tally, measuring, stop, o) = (tally.clone(), measuring.clone(), stop.clone(), o.clone());
                        tasks.push(monoio::spawn(async move {
                            let (mut rd, mut wr) = monoio::io::Splitable::into_split(stream);
                            if publisher {
                                let stop2 = stop.clone();
                                let secure = secure.clone();
                                let pad = "x".repeat(o.payload.saturating_sub(24));
                                monoio::spawn(async move {
                                    // Wait for every connection, then publish with a bounded pace:
                                    // batches of 8 and a yield, so the writer never runs unbounded ahead.
                                    let started = Instant::now();
                                    let mut sent: u64 = 0;
                                    while !stop2.load(Ordering::Relaxed) {
                                        // With --rate, publish only when behind schedule; the tick
                                        // stays short either way.
                                        if o.rate > 0 && sent * 1_000_000 / o.rate > started.elapsed().as_micros() as u64 {
                                            monoio::time::sleep(Duration::from_micros(200)).await;
                                            continue;
                                        }
                                        let mut batch = Vec::new();
                                        for _ in 0..8 {
                                            let msg = format!(r#"{{"op":"publish","room":"r{room}","data":"{pad}|T{}"}}"#, now_us());
                                            batch.extend_from_slice(&encode(&o, &msg));
                                        }
                                        sent += 8;
                                        let (res, _) = wr.write_all(seal(&secure, batch)).await;
                                        if res.is_err() {
                                            break;
                                        }
                                        monoio::time::sleep(Duration::from_micros(200)).await;
                                    }
                                });
                            }
                            let mut reader = reader;
                            let mut scratch = Vec::with_capacity(64 * 1024);
                            while !stop.load(Ordering::Relaxed) {
                                let (ok, s) = read_into(&mut rd, &mut reader, scratch, &secure).await;
                                scratch = s;
                                if !ok {
                                    break;
                                }
                                let m = measuring.load(Ordering::Relaxed);
                                tally.borrow_mut().reads += u64::from(m);
                                reader.drain(|op, payload| {
                                    if op == 1 || op == 2 {
                                        note_message(payload, m, &tally);
                                    }
                                });
                            }
                        }));
                    }
                    while !stop.load(Ordering::Relaxed) {
                        monoio::time::sleep(Duration::from_millis(20)).await;
                    }
                    drop(tasks);
                });
                // Tasks blocked in a read may still hold clones: take the counts out.
                std::mem::take(&mut *tally2.borrow_mut())
            })
        })
        .collect();
    let started = Instant::now();
    while ready.load(Ordering::Relaxed) < total as u64
        && started.elapsed() < Duration::from_secs(120)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let storm = (o.scenario == "storm").then(|| Storm::prepare(server.addr, o));
    // Publishers start when their connection is up; measure a steady window after a warm-up.
    std::thread::sleep(Duration::from_secs(1));
    let storm = storm.map(|s| s.run(o.duration));
    let pids: Vec<String> = servers.iter().map(|s| s.child.id().to_string()).collect();
    let servers_ticks = || pids.iter().map(|p| cpu_ticks(p)).sum::<u64>();
    let publishes = || {
        servers
            .iter()
            .map(|s| server_counter(s.addr, "ringhub_messages_in_total{op=\"publish\"} "))
            .sum::<f64>()
    };
    let redis_commands = || {
        servers
            .iter()
            .map(|s| server_counter(s.addr, "ringhub_redis_commands_total "))
            .sum::<f64>()
    };
    let cpu_before = (servers_ticks(), cpu_ticks("self"));
    let redis_before = on_redis(o).then(|| (redis_cpu_ms(o), publishes(), redis_commands()));
    measuring.store(true, Ordering::Relaxed);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(o.duration));
    measuring.store(false, Ordering::Relaxed);
    let secs = window.elapsed().as_secs_f64();
    let cpu = WindowCpu {
        server_ticks: servers_ticks() - cpu_before.0,
        client_ticks: cpu_ticks("self") - cpu_before.1,
    };
    let mut counters = server_counters(server.addr, tls.as_ref());
    let _ = std::fs::remove_dir_all(&tls_dir);
    if let Some((cpu0, pub0, cmd0)) = redis_before {
        let published = (publishes() - pub0).max(1.0);
        let commands = redis_commands() - cmd0;
        let pipelines: f64 = servers
            .iter()
            .map(|s| server_counter(s.addr, "ringhub_redis_pipeline_size_count "))
            .sum();
        let piped: f64 = servers
            .iter()
            .map(|s| server_counter(s.addr, "ringhub_redis_pipeline_size_sum "))
            .sum();
        counters.push_str(&format!(
            ",\"nodes\":{},\"redis_commands_per_publish\":{:.2},\"redis_pipeline_mean\":{:.1}",
            servers.len(),
            commands / published,
            piped / pipelines.max(1.0)
        ));
        if let (Some(before), Some(after)) = (cpu0, redis_cpu_ms(o)) {
            counters.push_str(&format!(
                ",\"redis_cpu_ms_per_1000_publishes\":{:.2}",
                (after - before) * 1000.0 / published
            ));
        }
    }
    if let Some(storm) = storm {
        counters.push_str(&storm.finish());
    }
    stop.store(true, Ordering::Relaxed);
    drop(servers);
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    report_fanout(&o.scenario, o, secs, cpu, tallies, &counters);
}

/// One blocking HTTP/1.1 request; returns the status and how long the answer took.
fn http_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Duration) {
    http_call_as(addr, method, path, body, None)
}

/// [`http_call`] with a bearer token.
fn http_call_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, Duration) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, started.elapsed());
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: loadgen\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, started.elapsed());
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or(b"000"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, started.elapsed())
}

/// Logins (at the default bcrypt cost) fired while the fan-out runs, and `/healthz` probed every
/// 20 ms meanwhile: how much a login burst costs the shards.
struct Storm {
    addr: SocketAddr,
    users: usize,
    concurrency: usize,
    logins: Vec<std::thread::JoinHandle<Vec<(u16, Duration)>>>,
    probe: Option<std::thread::JoinHandle<Vec<Duration>>>,
    stop: Arc<AtomicBool>,
}

impl Storm {
    fn prepare(addr: SocketAddr, o: &Opts) -> Storm {
        let users = o.users.clamp(1, 64);
        for u in 0..users {
            let body = format!(
                r#"{{"username":"storm{u}","email":"storm{u}@example.com","password":"storm password {u}"}}"#
            );
            let (status, _) = http_call(addr, "POST", "/register", &body);
            assert_eq!(status, 201, "register storm{u}");
        }
        Storm {
            addr,
            users,
            concurrency: o.concurrency.clamp(1, 256),
            logins: Vec::new(),
            probe: None,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    fn run(mut self, secs: u64) -> Storm {
        let deadline = Instant::now() + Duration::from_secs(secs);
        for t in 0..self.concurrency {
            let (addr, users, stop) = (self.addr, self.users, self.stop.clone());
            self.logins.push(std::thread::spawn(move || {
                let mut out = Vec::new();
                let mut i = t;
                while Instant::now() < deadline
                    && !stop.load(Ordering::Relaxed)
                    && out.len() < 10_000
                {
                    let u = i % users;
                    let body = format!(
                        r#"{{"email":"storm{u}@example.com","password":"storm password {u}"}}"#
                    );
                    out.push(http_call(addr, "POST", "/login", &body));
                    i += 1;
                }
                out
            }));
        }
        let (addr, stop) = (self.addr, self.stop.clone());
        self.probe = Some(std::thread::spawn(move || {
            let mut out = Vec::new();
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) && out.len() < 100_000
            {
                let (status, took) = http_call(addr, "GET", "/healthz", "");
                if status == 200 {
                    out.push(took);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        }));
        self
    }

    /// The storm's JSON fields.
    fn finish(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        let mut ok = Vec::new();
        let mut refused = 0u64;
        for h in self.logins {
            for (status, took) in h.join().unwrap_or_default() {
                if status == 200 {
                    ok.push(took);
                } else {
                    refused += 1;
                }
            }
        }
        let mut probes = self
            .probe
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        ok.sort_unstable();
        probes.sort_unstable();
        let pct = |v: &[Duration], p: f64| {
            v.get(((v.len() as f64 - 1.0).max(0.0) * p) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        format!(
            ",\"logins_ok\":{},\"logins_refused\":{refused},\"login_ms_p50\":{:.1},\"login_ms_p99\":{:.1},\"healthz_probes\":{},\"healthz_ms_p50\":{:.2},\"healthz_ms_p99\":{:.2},\"healthz_ms_max\":{:.2}",
            ok.len(),
            pct(&ok, 0.5),
            pct(&ok, 0.99),
            probes.len(),
            pct(&probes, 0.5),
            pct(&probes, 0.99),
            pct(&probes, 1.0),
        )
    }
}

/// The `message` frames of the ceiling, exactly as the engine sends them to a member: the same
/// encoding (JSON text or MessagePack binary frames), room, publisher identity (the room's first
/// member, as in `fanout`), epoch-millisecond `ts`, a `seq` of the same magnitude, and the same
/// `data` (padding and send timestamp). zstd is not applied: the ceiling is for plain frames.
/// Each writer keeps one record per room of its share and its batch buffers, so that a round
/// only encodes (as the engine encodes each publish once).
struct CeilingFrames {
    format: protocol::envelope::Format,
    opcode: ws::OpCode,
    pad: String,
    /// The rooms of this writer's share, first room's index and one record each.
    first_room: usize,
    records: Vec<protocol::envelope::MessageRecord>,
    batches: Vec<Vec<u8>>,
}

impl CeilingFrames {
    fn new(o: &Opts, rooms: std::ops::RangeInclusive<usize>) -> Self {
        use protocol::envelope::{Format, MessageRecord, RoomId, Value};
        let (format, opcode) = if o.msgpack {
            (Format::MsgPack, ws::frame::BINARY)
        } else {
            (Format::Json, ws::frame::TEXT)
        };
        let first_room = *rooms.start();
        let records: Vec<MessageRecord> = rooms
            .map(|room| {
                let (from, name) = identity(room * o.room_size);
                MessageRecord {
                    room: RoomId::parse(&format!("r{room}")).unwrap(),
                    seq: 0,
                    from: Some(from),
                    name,
                    ts: 0,
                    data: Value::Null,
                    event: None,
                }
            })
            .collect();
        Self {
            format,
            opcode,
            pad: "x".repeat(o.payload.saturating_sub(24)),
            first_room,
            batches: vec![Vec::new(); records.len()],
            records,
        }
    }

    /// Encodes eight messages per room, numbered from `seq`.
    fn encode_round(&mut self, seq: u64) {
        use protocol::envelope::{Push, Value, encode_push};
        for (record, batch) in self.records.iter_mut().zip(&mut self.batches) {
            batch.clear();
            record.ts = now_us() / 1000;
            for k in 0..8 {
                record.seq = seq + k;
                record.data = Value::str(&format!("{}|T{}", self.pad, now_us()));
                let payload = encode_push(&Push::Message(record), self.format).unwrap();
                ws::encode_frame(batch, self.opcode, &payload);
            }
        }
    }

    fn batch(&self, room: usize) -> &[u8] {
        &self.batches[room - self.first_room]
    }
}

/// The raw ceiling: `shards` writer threads each own an equal share of R × S loopback sockets and
/// write the same message frame to every socket in turn, as a broadcast would; the receivers are
/// the same code as in `fanout`.
fn scenario_ceiling(o: &Opts) {
    let total = o.rooms * o.room_size;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // Receivers connect (blocking) from the same source spread.
    let mut accepted = Vec::with_capacity(total);
    let receivers: Vec<_> = (0..o.threads)
        .map(|t| {
            let (measuring, stop, o) = (measuring.clone(), stop.clone(), o.clone());
            // Accept each connection right after making it: the listen backlog is small.
            let streams: Vec<std::net::TcpStream> = (t..total)
                .step_by(o.threads)
                .map(|i| {
                    use socket2::{Domain, Socket, Type};
                    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                    s.bind(
                        &SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2 + (i % 16) as u8), 0).into(),
                    )
                    .unwrap();
                    s.connect(&addr.into()).unwrap();
                    accepted.push(listener.accept().unwrap().0);
                    s.into()
                })
                .collect();
            std::thread::spawn(move || {
                let tally = Rc::new(RefCell::new(Tally::default()));
                let tally2 = tally.clone();
                runtime().block_on(async move {
                    let tasks: Vec<_> = streams
                        .into_iter()
                        .map(|s| {
                            s.set_nonblocking(true).unwrap();
                            let mut stream = TcpStream::from_std(s).unwrap();
                            let (tally, measuring, stop) =
                                (tally.clone(), measuring.clone(), stop.clone());
                            monoio::spawn(async move {
                                let mut reader = FrameReader::default();
                                let mut scratch = Vec::with_capacity(64 * 1024);
                                while !stop.load(Ordering::Relaxed) {
                                    let (ok, s) =
                                        read_into(&mut stream, &mut reader, scratch, &None).await;
                                    scratch = s;
                                    if !ok {
                                        break;
                                    }
                                    let m = measuring.load(Ordering::Relaxed);
                                    tally.borrow_mut().reads += u64::from(m);
                                    reader.drain(|_, payload| note_message(payload, m, &tally));
                                }
                            })
                        })
                        .collect();
                    while !stop.load(Ordering::Relaxed) {
                        monoio::time::sleep(Duration::from_millis(20)).await;
                    }
                    drop(tasks);
                });
                // Tasks blocked in a read may still hold clones: take the counts out.
                std::mem::take(&mut *tally2.borrow_mut())
            })
        })
        .collect();
    let per_writer = accepted.len().div_ceil(o.shards.max(1));
    let writers: Vec<_> = accepted
        .chunks(per_writer)
        .enumerate()
        .map(|(w, chunk)| {
            let socks: Vec<std::net::TcpStream> =
                chunk.iter().map(|s| s.try_clone().unwrap()).collect();
            let (stop, o) = (stop.clone(), o.clone());
            std::thread::spawn(move || {
                use std::io::Write;
                let mut socks = socks;
                let room_of = |k: usize| ((w * per_writer + k) / o.room_size).min(o.rooms - 1);
                let mut frames =
                    CeilingFrames::new(&o, room_of(0)..=room_of(socks.len().saturating_sub(1)));
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Eight messages per room, written to that room's members in this writer's
                    // share. Eight messages per write, as the engine writes what a connection has
                    // queued (it averages more per write: see `server_socket_writes`).
                    frames.encode_round(seq + 1);
                    seq += 8;
                    for (k, s) in socks.iter_mut().enumerate() {
                        let _ = s.write_all(frames.batch(room_of(k)));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let cpu_before = cpu_ticks("self");
    measuring.store(true, Ordering::Relaxed);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(o.duration));
    measuring.store(false, Ordering::Relaxed);
    let secs = window.elapsed().as_secs_f64();
    let cpu = WindowCpu {
        server_ticks: 0,
        client_ticks: cpu_ticks("self") - cpu_before,
    };
    stop.store(true, Ordering::Relaxed);
    drop(accepted);
    for w in writers {
        let _ = w.join();
    }
    let tallies: Vec<Tally> = receivers
        .into_iter()
        .map(|h| h.join().unwrap_or_default())
        .collect();
    report_fanout("ceiling", o, secs, cpu, tallies, "");
}

fn main() {
    let o = parse_opts();
    match o.scenario.as_str() {
        "idle" => scenario_idle(&o),
        "connect" => scenario_connect(&o),
        "fanout" | "storm" => scenario_fanout(&o),
        "ceiling" => scenario_ceiling(&o),
        other => panic!("unknown scenario {other}: idle, connect, fanout, storm, ceiling"),
    }
}
