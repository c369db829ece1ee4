//! Helpers of the black-box tests: find the real `ringhub` binary, run it with a controlled
//! environment in a scratch directory, and read what it printed.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The `ringhub` binary: `TEST_RINGHUB_BIN`, else the one built next to this test executable
/// (`cargo build -p ringhub` must have run; the README's test command does it).
pub fn ringhub_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TEST_RINGHUB_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .skip(1)
        .map(|dir| dir.join("ringhub"))
        .find(|p| p.is_file())
        .expect("ringhub binary not found: run `cargo build -p ringhub` first")
}

/// A fresh, empty directory for one test.
pub fn scratch_dir(name: &str) -> Scratch {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ringhub-test-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    Scratch(dir)
}

/// Whether this run puts every test server on Redis (`RINGHUB_TEST_REDIS`): the tests of the
/// embedded history store (its byte budget, its gauge) and of a room's lifetime in one process
/// do not apply there, where history lives in Redis.
pub fn over_redis() -> bool {
    std::env::var("RINGHUB_TEST_REDIS").is_ok_and(|u| !u.is_empty())
}

/// A Redis prefix no other test (or earlier run) uses.
pub fn redis_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "t{}x{}x{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A scratch directory, removed when dropped (unless kept by [`Scratch::keep`]).
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// The path, no longer removed by this guard (its new owner removes it).
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `ringhub ARGS` in `cwd` with only `env` (plus PATH) in its environment.
pub fn ringhub(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Run {
    let mut cmd = Command::new(ringhub_bin());
    cmd.args(args).current_dir(cwd).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ringhub").into()
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use protocol::compression::{Compressor, Decompressor, is_zstd};
use protocol::envelope::{DecodeLimits, Format, Value, decode_value, encode_value};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

/// A running `ringhub serve` on a free loopback port, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// The bound port.
    pub port: u16,
    /// Its data directory.
    pub dir: PathBuf,
    /// The flags it was started with (reused by [`Server::token`]).
    flags: Vec<String>,
    /// The caller's flags, for a restart.
    extra: Vec<String>,
    /// The server's `listening` log line (address, shards, I/O driver, storage).
    pub listening: String,
    /// Every line the server has written to standard output so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the server with `flags` (besides `--listen 127.0.0.1:0` and `--data-dir`) and
    /// waits for its `listening` line.
    pub fn start(name: &str, flags: &[&str]) -> Server {
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        Self::start_in(scratch_dir(name).keep(), &flags)
    }

    /// Starts the server in an existing scratch directory (its `data` subdirectory is the data
    /// directory), as a restart does.
    pub fn start_in(dir: PathBuf, flags: &[String]) -> Server {
        let mut all: Vec<String> =
            vec!["--data-dir".into(), dir.join("data").display().to_string()];
        all.extend(flags.iter().cloned());
        // `RINGHUB_TEST_REDIS=redis://…` runs every single-node test over Redis (the shared
        // broker), each server under a prefix of its own.
        if let Ok(url) = std::env::var("RINGHUB_TEST_REDIS")
            && !url.is_empty()
            && !all.iter().any(|f| f == "--redis-url")
        {
            all.extend(["--redis-url".to_owned(), url, "--redis-prefix".to_owned()]);
            all.push(redis_prefix());
        }
        let mut cmd = Command::new(ringhub_bin());
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(&all)
            .current_dir(&dir)
            .env_clear();
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn ringhub serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && line.contains("\"msg\":\"listening\"") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                // Bounded: a test reads the lines of a few requests, not of a load run.
                let mut kept = kept
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if kept.len() < 100_000 {
                    kept.push(line);
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not report listening within 20 s");
        let addr = line
            .split("\"addr\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("addr");
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        Server {
            child,
            port,
            dir,
            flags: all,
            extra: flags.to_vec(),
            listening: line,
            lines,
        }
    }

    /// Opens the server's own database beside it (SQLite in its data directory, or its
    /// PostgreSQL schema), to look at what it keeps at rest.
    pub fn open_store(&self) -> std::sync::Arc<dyn storage::Store> {
        let url = self
            .flags
            .iter()
            .position(|f| f == "--database-url")
            .and_then(|i| self.flags.get(i + 1));
        let data = self.dir.join("data");
        let backend = match url {
            Some(url) => storage::Backend::Postgres {
                url,
                read_url: None,
                pool: 1,
                breaker: storage::BreakerSettings::default(),
                ca_file: None,
            },
            None => storage::Backend::Sqlite { dir: &data },
        };
        storage::open(&backend).expect("open the server's store")
    }

    /// The log lines written so far that contain every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .cloned()
            .collect()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory in bytes (`VmRSS` of `/proc/PID/status`).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// The sum of every sample of a metric in `/metrics` (labels ignored); `None` when absent.
    pub fn metric_sum(&self, name: &str) -> Option<f64> {
        let (_, text) = self.http("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let samples: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!samples.is_empty()).then(|| samples.iter().sum())
    }

    /// Runs another `ringhub` command against this server's configuration (data directory,
    /// database).
    pub fn cli(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.flags.iter().map(String::as_str));
        ringhub(&all, &[], &self.dir)
    }

    /// Stops the server (SIGTERM) and starts it again on the same data and flags.
    pub fn restart(self) -> Server {
        let mut old = self;
        assert_eq!(old.terminate(), Some(0), "clean exit before restart");
        // The old handle must not delete the directory the new process uses.
        let dir = std::mem::take(&mut old.dir);
        Self::start_in(dir, &old.extra)
    }

    /// Stops the server (SIGTERM) and starts it again on the same data with `more` flags after
    /// its own (a later flag wins).
    pub fn restart_with(self, more: &[&str]) -> Server {
        let mut old = self;
        assert_eq!(old.terminate(), Some(0), "clean exit before restart");
        let dir = std::mem::take(&mut old.dir);
        let mut flags = old.extra.clone();
        flags.extend(more.iter().map(|f| (*f).to_owned()));
        Self::start_in(dir, &flags)
    }

    /// One JSON API call. `User-Agent: ringhub-tests` and, with a body, `Content-Type:
    /// application/json` are sent unless `headers` name them.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Answer {
        let named = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
        let mut raw =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        if !named("user-agent") {
            raw.push_str("User-Agent: ringhub-tests\r\n");
        }
        if body.is_some() && !named("content-type") {
            raw.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or("");
        raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let (status, text) = self.http(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        Answer {
            status,
            head: head.to_owned(),
            body: body.to_owned(),
        }
    }

    /// `POST /register`.
    pub fn register(&self, username: &str, email: &str, password: &str) -> Answer {
        let body =
            format!(r#"{{"username":"{username}","email":"{email}","password":"{password}"}}"#);
        self.api("POST", "/register", &[], Some(&body))
    }

    /// Registers and logs in; returns (user id, access token).
    pub fn account(&self, username: &str) -> (String, String) {
        let email = format!("{username}@example.com");
        let created = self.register(username, &email, "correct horse");
        assert_eq!(created.status, 201, "register {username}: {created:?}");
        let body = format!(r#"{{"email":"{email}","password":"correct horse"}}"#);
        let login = self.api("POST", "/login", &[], Some(&body));
        assert_eq!(login.status, 200, "login {username}: {login:?}");
        (created.str_at("user.id"), login.str_at("access_token"))
    }

    /// Connects with the tests' User-Agent (what bound tokens need) and reads the welcome.
    pub fn connect_bound(&self, token: &str) -> Client {
        let mut client = self
            .try_connect(token, None, &[("User-Agent", "ringhub-tests")])
            .unwrap_or_else(|e| panic!("connect: {e}"));
        client.expect("welcome", None);
        client
    }

    /// `api` with a bearer token.
    pub fn api_as(&self, token: &str, method: &str, path: &str, body: Option<&str>) -> Answer {
        let auth = format!("Bearer {token}");
        self.api(method, path, &[("Authorization", &auth)], body)
    }

    /// Mints an access token for `user` with the server's key.
    pub fn token(&self, user: &str) -> String {
        self.token_ttl(user, "15m")
    }

    /// Mints an access token valid for `ttl`.
    pub fn token_ttl(&self, user: &str, ttl: &str) -> String {
        let mut args = vec!["token", "--user", user, "--ttl", ttl];
        args.extend(self.flags.iter().map(String::as_str));
        let run = ringhub(&args, &[], &self.dir);
        assert_eq!(run.code, 0, "token: {run:?}");
        run.stdout.trim().to_owned()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// One raw HTTP/1.1 request; returns (status, headers+body text).
    pub fn http(&self, raw: &str) -> (u16, String) {
        http_to(self.port, raw)
    }

    /// A `GET` with the WebSocket upgrade headers plus `extra` header lines.
    pub fn upgrade_raw(&self, path: &str, extra: &str) -> (u16, String) {
        self.http(&format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ))
    }

    /// Connects a native client with `subprotocol` (None offers nothing).
    pub fn connect(&self, token: &str, subprotocol: Option<&str>) -> Client {
        self.try_connect(token, subprotocol, &[])
            .unwrap_or_else(|e| panic!("connect failed: {e}"))
    }

    /// Connects, or returns the refusal.
    pub fn try_connect(
        &self,
        token: &str,
        subprotocol: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Client, String> {
        self.try_connect_over(token, subprotocol, headers, None)
    }

    /// Connects over TLS (`wss://localhost`), trusting the certificate `ca_pem`.
    pub fn try_connect_tls(
        &self,
        token: &str,
        subprotocol: Option<&str>,
        ca_pem: &[u8],
    ) -> Result<Client, String> {
        let agent = [("User-Agent", "ringhub-tests")];
        self.try_connect_over(token, subprotocol, &agent, Some(ca_pem))
    }

    fn try_connect_over(
        &self,
        token: &str,
        subprotocol: Option<&str>,
        headers: &[(&str, &str)],
        tls: Option<&[u8]>,
    ) -> Result<Client, String> {
        let url = if tls.is_some() {
            format!("wss://localhost:{}/ws", self.port)
        } else {
            format!("ws://127.0.0.1:{}/ws", self.port)
        };
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {token}").parse().map_err(|_| "header")?,
        );
        if let Some(p) = subprotocol {
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().map_err(|_| "header")?);
        }
        for (k, v) in headers {
            let name =
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).map_err(|_| "header")?;
            request
                .headers_mut()
                .insert(name, v.parse().map_err(|_| "header")?);
        }
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let stream = match tls {
            None => Wire::Plain(tcp),
            Some(ca) => Wire::tls(tcp, ca)?,
        };
        let (socket, response) =
            tungstenite::client::client(request, stream).map_err(|e| match e {
                tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                    format!(
                        "HTTP {} {}",
                        resp.status().as_u16(),
                        String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    )
                }
                other => other.to_string(),
            })?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("ringhub.v1.json");
        let format = if chosen.contains("msgpack") {
            Format::MsgPack
        } else {
            Format::Json
        };
        Ok(Client {
            socket,
            format,
            zstd: chosen.ends_with("+zstd"),
            next_id: 1,
            backlog: Vec::new(),
        })
    }
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Status line and headers.
    pub head: String,
    /// Body text.
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        decode_value(self.body.as_bytes(), Format::Json, &LIMITS)
            .unwrap_or_else(|e| panic!("not JSON ({e:?}): {self:?}"))
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()
            .get("error")
            .and_then(|e| e.get("code"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no error code: {self:?}"))
            .to_owned()
    }

    /// A string field at `path` (dot-separated) of the body.
    pub fn str_at(&self, path: &str) -> String {
        let json = self.json();
        let mut v = &json;
        for part in path.split('.') {
            v = v
                .get(part)
                .unwrap_or_else(|| panic!("no `{path}` in {self:?}"));
        }
        v.as_str()
            .unwrap_or_else(|| panic!("`{path}` is not a string in {self:?}"))
            .to_owned()
    }
}

/// One raw HTTP/1.1 request to the server on `port`; returns (status, headers+body text).
pub fn http_to(port: u16, raw: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(raw.as_bytes()).expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the peer closes or the response is complete by Content-Length.
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if head.starts_with("HTTP/1.1 101") || len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// The status of `method path` with `token` as the bearer, on the server at `port` (for threads
/// that cannot borrow a [`Server`]).
pub fn status_of(port: u16, method: &str, path: &str, token: &str) -> u16 {
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         User-Agent: ringhub-tests\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n"
    );
    http_to(port, &raw).0
}

impl Server {
    /// Kills the process at once (SIGKILL: no goodbye to anybody).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Redis the several-nodes tests share (`RINGHUB_TEST_REDIS_URL`, else the local one).
pub fn shared_redis_url() -> String {
    std::env::var("RINGHUB_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Starts `count` nodes of one service on `redis_url`: the same secrets (what every node of a
/// service shares), a Redis prefix of their own, node ids `n0`, `n1`…, each with `flags`.
pub fn start_nodes(name: &str, count: usize, redis_url: &str, flags: &[&str]) -> Vec<Server> {
    const SECRET: &str = "several-nodes-share-this-secret-0123456789";
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let prefix = redis_prefix();
    (0..count)
        .map(|i| {
            let mut all: Vec<String> = [
                "--redis-url",
                redis_url,
                "--redis-prefix",
                &prefix,
                "--node-id",
                &format!("n{i}"),
                "--jwt-secret",
                SECRET,
                "--encryption-key",
                KEY,
                "--blind-index-key",
                SECRET,
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            all.extend(flags.iter().map(|f| (*f).to_owned()));
            Server::start_in(scratch_dir(&format!("{name}-n{i}")).keep(), &all)
        })
        .collect()
}

/// A `redis-server` of a test's own on a free loopback port (no persistence), killed when
/// dropped; [`OwnRedis::stop`] and [`OwnRedis::restart`] for failure tests.
#[derive(Debug)]
pub struct OwnRedis {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
}

impl OwnRedis {
    /// Starts one and waits until it answers.
    pub fn start() -> OwnRedis {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            probe.local_addr().expect("addr").port()
        };
        let mut redis = OwnRedis { child: None, port };
        redis.restart();
        redis
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one inline command and returns the first line of its reply.
    pub fn command(&self, line: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("redis answers");
        stream
            .write_all(format!("{line}\r\n").as_bytes())
            .expect("write");
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `redis-cli -p port args…` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills it (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing was persisted).
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.write_all(b"PING\r\n");
                let mut buf = [0u8; 16];
                let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
                if matches!(stream.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"+PONG")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on port {}", self.port);
    }
}

/// A Redis Cluster of a test's own: `masters` `redis-server --cluster-enabled yes` on free
/// loopback ports (each with its bus port, +10000, free too), joined by
/// `redis-cli --cluster create` with no replicas; killed when dropped.
#[derive(Debug)]
pub struct OwnCluster {
    children: Vec<Child>,
    /// The masters' ports.
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl OwnCluster {
    /// Starts one and waits until every node says `cluster_state:ok`.
    pub fn start(name: &str, masters: usize) -> OwnCluster {
        let dir = scratch_dir(&format!("cluster-{name}")).keep();
        let mut ports = Vec::new();
        let mut held = Vec::new();
        while ports.len() < masters {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = probe.local_addr().expect("addr").port();
            let bus_free =
                port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok();
            if bus_free && !ports.contains(&port) {
                ports.push(port);
            }
            held.push(probe);
        }
        drop(held);
        let mut cluster = OwnCluster {
            children: Vec::new(),
            ports: ports.clone(),
            dir,
        };
        for port in &ports {
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &cluster
                        .dir
                        .join(format!("nodes-{port}.conf"))
                        .display()
                        .to_string(),
                    "--cluster-node-timeout",
                    "2000",
                    "--dir",
                    &cluster.dir.display().to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            cluster.children.push(child);
        }
        for port in &ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while cluster.cli(*port, &["PING"]).trim() != "PONG" {
                assert!(
                    Instant::now() < deadline,
                    "redis-server on {port} did not start"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &ports {
            while !cluster
                .cli(*port, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "the cluster did not become ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        cluster
    }

    /// `redis_url` for the cluster: every master as a seed.
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `redis-cli -p port args…` and returns what it printed.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be installed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the master serving `key`'s slot, and the slot.
    pub fn owner_of(&self, key: &str) -> (u16, u16) {
        let slot: u16 = self
            .cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("a slot");
        let nodes = self.cli(self.ports[0], &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a port");
            for range in &fields[8..] {
                let (start, end) = match range.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => {
                        let one = range.parse().unwrap_or(u16::MAX);
                        (one, one)
                    }
                };
                if (start..=end).contains(&slot) {
                    return (port, slot);
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Moves `slot`, with its keys, from the master on `from` to the one on `to` (the steps of
    /// a resharding: importing, migrating, `MIGRATE` of each key, the new owner told to all).
    pub fn move_slot(&self, slot: u16, from: u16, to: u16) {
        let id = |port: u16| self.cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
        let (from_id, to_id) = (id(from), id(to));
        let slot = slot.to_string();
        self.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        self.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if !keys.is_empty() {
            let port = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            let out = self.cli(from, &args);
            assert!(out.contains("OK"), "MIGRATE: {out}");
        }
        for port in &self.ports {
            self.cli(*port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay from a free loopback port to `target`, which a test can cut (every connection
/// through it closed, new ones closed at once) and restore: a dependency going away without its
/// process dying. Stopped when dropped.
#[derive(Debug)]
pub struct Relay {
    /// The port to connect to instead of the target's.
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    /// Starts relaying to `target` (`host:port`).
    pub fn start(target: &str) -> Relay {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let relay = Relay {
            port,
            cut: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            live: Arc::new(Mutex::new(Vec::new())),
        };
        let (cut, stop, live) = (relay.cut.clone(), relay.stop.clone(), relay.live.clone());
        let target = target.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                if cut.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let pairs = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                {
                    let mut live = live
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    live.push(client);
                    live.push(server);
                }
                for pair in pairs {
                    if let (Ok(mut from), Ok(mut to)) = pair {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        relay
    }

    /// Closes every connection through the relay and every new one until [`Relay::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for stream in live.drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Relays again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A native protocol client (blocking, tungstenite).
#[derive(Debug)]
pub struct Client {
    /// The WebSocket.
    pub socket: tungstenite::WebSocket<Wire>,
    /// The negotiated encoding.
    pub format: Format,
    /// Whether zstd was negotiated.
    pub zstd: bool,
    next_id: u64,
    backlog: Vec<Value>,
}

/// A client's connection: plain TCP or TLS over it.
#[derive(Debug)]
pub enum Wire {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (rustls) over TCP.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    /// TLS to `localhost`, trusting `ca_pem`; the handshake happens with the first write.
    pub fn tls(tcp: TcpStream, ca_pem: &[u8]) -> Result<Wire, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(cert.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name =
            rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .map_err(|e| e.to_string())?;
        Ok(Wire::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Wire::Plain(s) => s.flush(),
            Wire::Tls(s) => s.flush(),
        }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (ECDSA P-256) written to `dir`:
/// (certificate file, key file, certificate PEM).
pub fn tls_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate().expect("key pair");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    let cert_file = dir.join(format!("{name}.crt"));
    let key_file = dir.join(format!("{name}.key"));
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(&cert_file, cert.pem()).expect("write cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key");
    (cert_file, key_file, cert.pem().into_bytes())
}

/// How a connection ended, as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
    /// Nothing within the timeout.
    Timeout,
}

const LIMITS: DecodeLimits = DecodeLimits {
    max_message_bytes: 1 << 24,
    max_depth: 128,
    max_resume_rooms: 1024,
};

/// Builds a JSON-like map value.
pub fn obj(pairs: &[(&str, Value)]) -> Value {
    Value::Map(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

/// A string value.
pub fn s(text: &str) -> Value {
    Value::Str(text.to_owned())
}

/// An unsigned integer value.
pub fn n(v: u64) -> Value {
    Value::UInt(v)
}

impl Client {
    /// Sends a request map as this connection's encoding (compressed when `zstd` and asked).
    pub fn send_value(&mut self, value: &Value, compress: bool) {
        let bytes = encode_value(value, self.format).expect("encode");
        let message = if compress {
            Message::Binary(
                Compressor::new(3)
                    .expect("zstd")
                    .compress(&bytes)
                    .expect("compress")
                    .into(),
            )
        } else if self.format == Format::Json {
            Message::Text(String::from_utf8(bytes).expect("utf8").into())
        } else {
            Message::Binary(bytes.into())
        };
        self.socket.send(message).expect("send");
    }

    /// Sends `{op, id, ...fields}` and returns the id.
    pub fn request(&mut self, op: &str, fields: &[(&str, Value)]) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut pairs = vec![("op", s(op)), ("id", n(id))];
        pairs.extend(fields.iter().cloned());
        self.send_value(&obj(&pairs), false);
        id
    }

    /// The next decoded message (or how the connection ended).
    pub fn recv(&mut self) -> Result<Value, Ended> {
        if !self.backlog.is_empty() {
            return Ok(self.backlog.remove(0));
        }
        loop {
            match self.socket.read() {
                Ok(Message::Text(t)) => {
                    return Ok(
                        decode_value(t.as_bytes(), Format::Json, &LIMITS).expect("decode text")
                    );
                }
                Ok(Message::Binary(b)) => {
                    let plain = if is_zstd(&b) {
                        Decompressor::new()
                            .expect("zstd")
                            .decompress(&b, 1 << 24)
                            .expect("inflate")
                    } else {
                        b.to_vec()
                    };
                    return Ok(decode_value(&plain, self.format, &LIMITS).expect("decode binary"));
                }
                Ok(Message::Close(frame)) => {
                    return Err(Ended::Closed(frame.map_or(1005, |f| u16::from(f.code))));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Ended::Timeout);
                }
                Err(_) => return Err(Ended::Dropped),
            }
        }
    }

    /// Reads until a message with `op` (and `id`, when given) arrives; others are kept for later.
    pub fn expect(&mut self, op: &str, id: Option<u64>) -> Value {
        let mut skipped = Vec::new();
        let found = loop {
            match self.recv() {
                Ok(v) => {
                    let op_matches = v.get("op").and_then(Value::as_str) == Some(op);
                    let id_matches = id.is_none() || v.get("id").and_then(Value::as_u64) == id;
                    if op_matches && id_matches {
                        break v;
                    }
                    skipped.push(v);
                }
                Err(e) => panic!("waiting for {op} {id:?}: {e:?}; skipped {skipped:?}"),
            }
        };
        skipped.append(&mut self.backlog);
        self.backlog = skipped;
        found
    }

    /// Reads until the connection ends; returns how.
    pub fn ended(&mut self) -> Ended {
        self.backlog.clear();
        loop {
            match self.recv() {
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    /// Drops queued messages already received.
    pub fn clear(&mut self) {
        self.backlog.clear();
    }

    /// Sets the read timeout.
    pub fn set_timeout(&mut self, d: Duration) {
        self.socket
            .get_ref()
            .tcp()
            .set_read_timeout(Some(d))
            .expect("timeout");
    }
}

/// Where a test server keeps its durable data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    /// The embedded SQLite default in the scratch directory.
    Embedded,
    /// A fresh schema in the local PostgreSQL (`RINGHUB_TEST_DATABASE_URL` overrides the base).
    Postgres,
}

/// A PostgreSQL schema made for one test, dropped with it.
#[derive(Debug)]
pub struct Schema {
    base: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = storage::postgres::drop_schema(&self.base, &self.name);
    }
}

impl Db {
    /// The flags selecting this database (none for the embedded one) and the schema guard.
    pub fn flags(self, name: &str) -> (Vec<String>, Option<Schema>) {
        match self {
            Db::Embedded => (Vec::new(), None),
            Db::Postgres => {
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let base = std::env::var("RINGHUB_TEST_DATABASE_URL")
                    .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
                let schema = format!(
                    "it_{}_{}_{}",
                    name.chars()
                        .filter(char::is_ascii_alphanumeric)
                        .take(20)
                        .collect::<String>()
                        .to_ascii_lowercase(),
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                );
                let url = storage::postgres::scratch_schema_url(&base, &schema)
                    .unwrap_or_else(|e| panic!("PostgreSQL must be reachable at {base}: {e}"));
                (
                    vec!["--database-url".to_owned(), url],
                    Some(Schema { base, name: schema }),
                )
            }
        }
    }
}

/// A server on a database, with the schema guard that must outlive it.
#[derive(Debug)]
pub struct Fixture {
    /// The server.
    pub server: Server,
    /// The PostgreSQL schema, dropped after the server.
    pub schema: Option<Schema>,
}

impl Db {
    /// Starts a server on this database with `flags`.
    pub fn start(self, name: &str, flags: &[&str]) -> Fixture {
        let (mut all, schema) = self.flags(name);
        all.extend(flags.iter().map(|f| (*f).to_owned()));
        Fixture {
            server: Server::start_in(scratch_dir(name).keep(), &all),
            schema,
        }
    }
}

/// Declares, for each function `f(db: Db)` named, a module `f` with the tests `embedded` and
/// `postgres` that run it on each database.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn embedded() {
                    super::$name($crate::Db::Embedded);
                }
                #[test]
                fn postgres() {
                    super::$name($crate::Db::Postgres);
                }
            }
        )*
    };
}
