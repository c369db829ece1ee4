//! The official `socket.io-client` (npm, v4) and `python-socketio`, unmodified, sharing a room
//! with a native client (SPEC §8). scripts/test.sh installs both (tests/clients/).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use protocol::envelope::Value;
use ringhub_tests::{Client, Server, s};

fn clients_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// Runs one client script against the server while a native client talks to it.
fn exchange(program: &str, script: &str, name: &str, own_text: &str) {
    let server = Server::start(name, &["--shards", "2"]);
    let native = server.connect(&server.token("native"), None);
    let url = format!("http://127.0.0.1:{}", server.port);
    exchange_with(
        &server,
        native,
        &url,
        &[],
        (program, script),
        name,
        own_text,
    );
}

/// Runs one client script (`program script`) at `url`, with `env` added, while `native` (just
/// connected) talks to it in one room.
pub(crate) fn exchange_with(
    server: &Server,
    mut native: Client,
    url: &str,
    env: &[(&str, &str)],
    (program, script): (&str, &str),
    name: &str,
    own_text: &str,
) {
    native.expect("welcome", None);
    let id = native.request("join", &[("room", s("mixed"))]);
    native.expect("reply", Some(id));
    let mut child = Command::new(program)
        .arg(clients_dir().join(script))
        .current_dir(clients_dir())
        .envs(env.iter().copied())
        .env("URL", url)
        .env("TOKEN", server.token(name))
        .env("ROOM", "mixed")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} {script}: {e} (run scripts/test.sh, which installs the clients)")
        });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let joined = lines.next().expect("client output").unwrap();
    // `JOINED {"ok": true}` (Python's JSON has spaces, JavaScript's has none).
    assert_eq!(joined.replace(' ', ""), r#"JOINED{"ok":true}"#);
    // The client's message reaches the native member, then the native one reaches the client.
    let m = native.expect("message", None);
    assert_eq!(m.get("from").and_then(Value::as_str), Some(name));
    assert_eq!(m.get("data").and_then(Value::as_str), Some(own_text));
    assert_eq!(m.get("event"), None, "a plain message names no event");
    // The client's custom event `cheer` reaches the native member as a message carrying it,
    // its payload without `room_id`.
    let cheer = native.expect("message", None);
    assert_eq!(cheer.get("event").and_then(Value::as_str), Some("cheer"));
    assert_eq!(
        cheer
            .get("data")
            .and_then(|d| d.get("level"))
            .and_then(Value::as_u64),
        Some(3)
    );
    assert_eq!(cheer.get("data").and_then(|d| d.get("room_id")), None);
    let id = native.request(
        "publish",
        &[("room", s("mixed")), ("data", s("from native"))],
    );
    native.expect("reply", Some(id));
    // A native custom event reaches the Socket.IO client under its own name.
    let id = native.request(
        "publish",
        &[
            ("room", s("mixed")),
            ("data", ringhub_tests::obj(&[("hand", s("left"))])),
            ("event", s("wave")),
        ],
    );
    native.expect("reply", Some(id));
    let summary = lines.next().expect("summary").unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{summary}");
    assert!(
        summary.contains(r#""seq""#) && summary.contains("from native"),
        "{summary}"
    );
    assert!(
        summary.contains(r#""username""#) && summary.contains(r#""room_id""#),
        "{summary}"
    );
    // The custom event's ack has the seq; the native `wave` arrived with its payload.
    let compact = summary.replace(' ', "");
    assert!(
        compact.contains(r#""cheered":{"ok":true,"seq""#),
        "{summary}"
    );
    assert!(
        compact.contains(r#""message":{"hand":"left"}"#),
        "{summary}"
    );
}

#[test]
fn python_socketio_client_shares_a_room_with_a_native_client() {
    exchange("python3", "sio_python.py", "py-client", "from python");
}

#[test]
fn node_socketio_client_shares_a_room_with_a_native_client() {
    exchange("node", "sio_node.js", "node-client", "from node");
}
