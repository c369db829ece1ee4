//! TLS in the server (SPEC §1 `tls_cert_file`/`tls_key_file`): HTTPS and WSS on one port, with a
//! certificate each test generates — curl, the native client in both encodings, the official
//! Socket.IO clients, `openssl s_client`; plaintext to the TLS port; a stalled handshake; a
//! certificate reloaded on SIGHUP; `check-config` on the files.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use protocol::envelope::Value;
use ringhub_tests::{Server, s, scratch_dir, tls_files};

/// A server with TLS on its one port, and the certificate PEM a client trusts.
fn tls_server(name: &str, more: &[&str]) -> (Server, Vec<u8>, PathBuf, PathBuf) {
    let dir = scratch_dir(&format!("{name}-certs")).keep();
    let (cert, key, pem) = tls_files(&dir, "server");
    let mut flags: Vec<String> = vec![
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
    ];
    flags.extend(more.iter().map(|f| (*f).to_owned()));
    let server = Server::start_in(scratch_dir(name).keep(), &flags);
    (server, pem, cert, key)
}

/// `curl` over HTTPS trusting `ca`: (status, body).
fn curl(
    server: &Server,
    ca: &Path,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args([
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "-H",
            "User-Agent: ringhub-tests",
        ])
        .arg(format!("https://localhost:{}{path}", server.port));
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", body]);
    }
    let out = cmd.output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

fn ca_file(pem: &[u8], name: &str) -> PathBuf {
    let path = scratch_dir(&format!("{name}-ca")).keep().join("ca.pem");
    std::fs::write(&path, pem).expect("write ca");
    path
}

#[test]
fn https_and_wss_on_one_port_with_curl_and_the_native_client_in_both_encodings() {
    let (server, pem, _, _) = tls_server("tls-basic", &[]);
    let ca = ca_file(&pem, "tls-basic");
    let (status, body) = curl(
        &server,
        &ca,
        "POST",
        "/register",
        None,
        Some(r#"{"username":"alice","email":"alice@example.com","password":"correct horse"}"#),
    );
    assert_eq!(status, 201, "{body}");
    let (status, body) = curl(
        &server,
        &ca,
        "POST",
        "/login",
        None,
        Some(r#"{"email":"alice@example.com","password":"correct horse"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let token = body
        .split("\"access_token\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("an access token")
        .to_owned();
    let (status, body) = curl(&server, &ca, "GET", "/me", Some(&token), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice@example.com"), "{body}");

    let mut json = server
        .try_connect_tls(&token, Some("ringhub.v1.json"), &pem)
        .expect("wss json");
    let mut packed = server
        .try_connect_tls(&server.token("bob"), Some("ringhub.v1.msgpack"), &pem)
        .expect("wss msgpack");
    for c in [&mut json, &mut packed] {
        c.expect("welcome", None);
        let id = c.request("join", &[("room", s("secure"))]);
        c.expect("reply", Some(id));
    }
    // A message large enough to span several TLS records.
    let big = "x".repeat(40_000);
    let id = json.request("publish", &[("room", s("secure")), ("data", s(&big))]);
    json.expect("reply", Some(id));
    let m = packed.expect("message", None);
    assert!(
        m.get("data").and_then(Value::as_str) == Some(big.as_str()),
        "the large message arrived whole"
    );
    let id = packed.request("publish", &[("room", s("secure")), ("data", s("back"))]);
    packed.expect("reply", Some(id));
    // The publisher hears its own message first.
    let own = json.expect("message", None);
    assert!(own.get("data").and_then(Value::as_str) == Some(big.as_str()));
    let m = json.expect("message", None);
    assert_eq!(m.get("data").and_then(Value::as_str), Some("back"));
    let metrics = curl(&server, &ca, "GET", "/metrics", None, None).1;
    assert!(
        metrics.contains("ringhub_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
}

#[test]
fn openssl_s_client_sees_tls13_and_alpn_and_plaintext_is_refused_cleanly() {
    let (server, pem, _, _) = tls_server("tls-openssl", &[]);
    let out = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", server.port))
        .args(["-alpn", "http/1.1", "-servername", "localhost"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
    // TLS 1.2 is offered too.
    let out = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect"])
        .arg(format!("127.0.0.1:{}", server.port))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("TLSv1.2"));

    // Plain HTTP to the TLS port: an alert or a close, never an HTTP answer, never a hang.
    let mut plain = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(got.len() < 64, "at most an alert: {} bytes", got.len());
    // The server still serves TLS.
    let mut c = server
        .try_connect_tls(&server.token("after"), None, &pem)
        .expect("still serving");
    c.expect("welcome", None);
    let ca = ca_file(&pem, "tls-openssl");
    // The plaintext request at least (an `s_client` that leaves mid-handshake counts too); the
    // count may land just after the socket closed.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, metrics) = curl(&server, &ca, "GET", "/metrics", None, None);
        let failed: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ringhub_tls_handshakes_total{result=\"failed\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if failed >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the plaintext request: {metrics}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stalled_handshake_is_cut_within_its_bound_while_others_are_served() {
    let (server, pem, _, _) = tls_server("tls-stall", &["--tls-handshake-timeout", "500ms"]);
    let started = Instant::now();
    let mut stalled = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Others are served meanwhile.
    let mut c = server
        .try_connect_tls(&server.token("other"), None, &pem)
        .expect("served while one stalls");
    c.expect("welcome", None);
    let mut buf = [0u8; 16];
    let n = stalled.read(&mut buf).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "closed without a word");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "cut after {waited:?}"
    );
    let ca = ca_file(&pem, "tls-stall");
    let (_, text) = curl(&server, &ca, "GET", "/metrics", None, None);
    assert!(
        text.contains("ringhub_tls_handshakes_total{result=\"timeout\"} 1"),
        "{text}"
    );
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_keeps_the_old_on_a_bad_file() {
    let (server, old_pem, cert, key) = tls_server("tls-reload", &[]);
    let mut before = server
        .try_connect_tls(&server.token("early"), None, &old_pem)
        .expect("old certificate");
    before.expect("welcome", None);
    let fresh_dir = scratch_dir("tls-reload-new").keep();
    let (new_cert, new_key, new_pem) = tls_files(&fresh_dir, "next");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    hup(server.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(mut c) = server.try_connect_tls(&server.token("late"), None, &new_pem) {
            c.expect("welcome", None);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate never served"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        server
            .try_connect_tls(&server.token("stale"), None, &old_pem)
            .is_err(),
        "the old certificate is no longer offered"
    );
    // The connection made before is untouched.
    let id = before.request("ping", &[]);
    before.expect("pong", Some(id));
    // A bad file: the certificate in use stays, and the log says why.
    std::fs::write(&cert, b"not a certificate").unwrap();
    hup(server.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    while server
        .log_lines_with(&["tls certificate not reloaded"])
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no log line for the bad file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut still = server
        .try_connect_tls(&server.token("still"), None, &new_pem)
        .expect("the reloaded certificate stays");
    still.expect("welcome", None);
}

#[test]
fn check_config_refuses_a_key_that_is_not_the_certificates_and_production_accepts_tls() {
    let dir = scratch_dir("tls-check").keep();
    let (cert, _, _) = tls_files(&dir, "one");
    let (_, other_key, _) = tls_files(&dir, "two");
    let (good_cert, good_key, _) = tls_files(&dir, "three");
    let run = |cert: &Path, key: &Path, env: &[(&str, &str)]| {
        let args = [
            "check-config",
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ];
        ringhub_tests::ringhub(&args, env, &dir)
    };
    let mismatched = run(&cert, &other_key, &[]);
    assert_ne!(mismatched.code, 0, "{mismatched:?}");
    assert!(
        mismatched.stderr.contains("tls_cert_file and tls_key_file"),
        "{mismatched:?}"
    );
    let missing = run(&dir.join("absent.crt"), &other_key, &[]);
    assert!(missing.stderr.contains("tls_cert_file"), "{missing:?}");
    let garbage = dir.join("garbage.key");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let bad_key = run(&good_cert, &garbage, &[]);
    assert!(bad_key.stderr.contains("tls_key_file"), "{bad_key:?}");
    assert!(
        !bad_key.stderr.contains("AAAA"),
        "key material is never echoed"
    );
    // Production mode without behind_proxy: TLS in the server is the alternative.
    let production = [
        ("RINGHUB_MODE", "production"),
        (
            "RINGHUB_JWT_SECRET",
            "production-secret-0123456789-abcdefghijklmnop",
        ),
        (
            "RINGHUB_ENCRYPTION_KEY",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        ),
        (
            "RINGHUB_BLIND_INDEX_KEY",
            "production-blind-0123456789-abcdefghijklmnop",
        ),
    ];
    let production = run(&good_cert, &good_key, &production);
    assert_eq!(production.code, 0, "{production:?}");
}

#[test]
fn socketio_clients_over_wss() {
    for (program, script, name, text) in [
        ("node", "sio_node.js", "tls-node", "from node"),
        ("python3", "sio_python.py", "tls-python", "from python"),
    ] {
        let (server, pem, cert, _) = tls_server(name, &["--shards", "2"]);
        let native = server
            .try_connect_tls(&server.token("native"), None, &pem)
            .expect("native over wss");
        let url = format!("https://localhost:{}", server.port);
        let ca = cert.display().to_string();
        crate::third_party::exchange_with(
            &server,
            native,
            &url,
            &[
                ("NODE_EXTRA_CA_CERTS", &ca),
                ("SSL_CERT_FILE", &ca),
                ("WEBSOCKET_CLIENT_CA_BUNDLE", &ca),
                ("REQUESTS_CA_BUNDLE", &ca),
            ],
            (program, script),
            name,
            text,
        );
    }
}

/// TLS to PostgreSQL: `sslmode=verify-full` against the local server's own certificate serves;
/// roots that did not sign it stop `serve` (exit 1, the database named, no password); an unknown
/// `sslmode` is a configuration error.
#[test]
fn database_url_sslmode_is_honoured_at_start() {
    let dir = scratch_dir("pg-tls").keep();
    let (ours, _, _) = tls_files(&dir, "not-the-servers");
    let bad = ringhub_tests::ringhub(
        &[
            "check-config",
            "--database-url",
            "postgres://postgres@127.0.0.1:5432/test?sslmode=trust-me",
        ],
        &[],
        &dir,
    );
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(
        bad.stderr.contains("database_url") && bad.stderr.contains("trust-me"),
        "{bad:?}"
    );
    let refused = ringhub_tests::ringhub(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            "postgres://postgres:secret-pw@localhost:5432/test?sslmode=verify-full",
            "--database-ca-file",
            ours.to_str().unwrap(),
        ],
        &[],
        &dir,
    );
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("certificate"), "{refused:?}");
    assert!(!refused.stderr.contains("secret-pw"), "{refused:?}");
}

/// A `redis-server` of the test's own serving TLS only (its certificate `cert`, `key`), killed
/// when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl TlsRedis {
    fn start(cert: &Path, key: &Path, ca: &Path) -> TlsRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "--tls", "--cacert"])
                .arg(ca)
                .arg("ping")
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&out.stdout).contains("PONG") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server with TLS did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsRedis { child, port }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `rediss://`: two nodes on a Redis that serves TLS only act as one service (a message
/// published on one reaches a member on the other); roots that did not sign Redis's
/// certificate stop `serve` (exit 1, naming the address, never the password).
#[test]
fn two_nodes_over_rediss_act_as_one_and_a_wrong_ca_is_refused() {
    let dir = scratch_dir("rediss").keep();
    let (cert, key, _) = tls_files(&dir, "redis");
    let redis = TlsRedis::start(&cert, &key, &cert);
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = cert.display().to_string();
    let nodes = ringhub_tests::start_nodes("rediss", 2, &url, &["--redis-ca-file", &ca]);
    let (a, b) = (&nodes[0], &nodes[1]);
    // Ready once every shard's links finished their handshakes.
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in [a, b] {
        loop {
            let (status, text) = node.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
            if status == 200 {
                assert!(text.contains(r#""redis":"up""#), "{text}");
                break;
            }
            assert!(Instant::now() < deadline, "{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut on_a = a.connect(&a.token("alice"), None);
    let mut on_b = b.connect(&b.token("bob"), None);
    for c in [&mut on_a, &mut on_b] {
        c.expect("welcome", None);
        let id = c.request("join", &[("room", s("over-tls"))]);
        c.expect("reply", Some(id));
    }
    let id = on_a.request("publish", &[("room", s("over-tls")), ("data", s("sealed"))]);
    on_a.expect("reply", Some(id));
    let m = on_b.expect("message", None);
    assert_eq!(m.get("data").and_then(Value::as_str), Some("sealed"));

    let (other, _, _) = tls_files(&dir, "stranger");
    let refused = ringhub_tests::ringhub(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--redis-url",
            &format!("rediss://:hunter2@localhost:{}", redis.port),
            "--redis-ca-file",
            other.to_str().unwrap(),
        ],
        &[],
        &dir,
    );
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("localhost:{}", redis.port)),
        "{refused:?}"
    );
    assert!(!refused.stderr.contains("hunter2"), "{refused:?}");
}
