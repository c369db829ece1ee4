//! The server's log lines (SPEC §11): structured JSON lines whose fields name the HTTP request
//! (`request_id`), the user and session, and a WebSocket request followed from the connection's
//! shard to the room's home (`conn`, `room`, `trace_id`); and no secret in any of them.

use std::time::{Duration, Instant};

use ringhub_tests::{Server, n, s};

/// The value of a string field in a JSON log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = line.find(&key)? + key.len();
    line[start..].split('"').next()
}

/// Waits (bounded) for log lines holding every needle.
fn wait_for(server: &Server, needles: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = server.log_lines_with(needles);
        if !lines.is_empty() || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn log_lines_carry_request_user_session_room_conn_and_trace() {
    let server = Server::start("logs", &["--log-level", "debug", "--bcrypt-cost", "4"]);
    let (user_id, token) = server.account("lena");
    let user = format!("\"user_id\":\"{user_id}\"");

    // HTTP: the login line is in its request's span.
    let login = wait_for(&server, &["\"msg\":\"login\"", &user]);
    assert_eq!(login.len(), 1, "{login:?}");
    let request_id = field(&login[0], "request_id").expect("request_id");
    assert!(field(&login[0], "session_id").is_some(), "{}", login[0]);
    let http = wait_for(
        &server,
        &[
            "\"msg\":\"http\"",
            &format!("\"request_id\":\"{request_id}\""),
        ],
    );
    assert!(
        http.iter()
            .any(|l| l.contains("\"path\":\"/login\"") && l.contains("\"status\":200")),
        "{http:?}"
    );

    // WebSocket: a join and a publish, each followed to the room's home by its trace id.
    let mut ws = server.connect_bound(&token);
    let id = ws.request("join", &[("room", s("log-room"))]);
    ws.expect("reply", Some(id));
    let id = ws.request("publish", &[("room", s("log-room")), ("data", n(7))]);
    ws.expect("reply", Some(id));
    for (op, at_home) in [("join", "joined"), ("publish", "published")] {
        let asked = wait_for(
            &server,
            &[
                "\"msg\":\"request\"",
                &format!("\"op\":\"{op}\""),
                "\"room\":\"log-room\"",
                &user,
            ],
        );
        assert_eq!(asked.len(), 1, "{op}: {asked:?}");
        let line = &asked[0];
        assert!(line.contains("\"conn\":"), "{line}");
        assert!(
            field(line, "session_id").is_some_and(|s| !s.is_empty()),
            "{line}"
        );
        let trace = field(line, "trace_id").expect("trace_id");
        let home = wait_for(
            &server,
            &[
                &format!("\"msg\":\"{at_home}\""),
                "\"room\":\"log-room\"",
                &format!("\"trace_id\":\"{trace}\""),
            ],
        );
        assert_eq!(home.len(), 1, "{op} at the home: {home:?}");
    }

    // No secret anywhere: not the access token, not the password.
    assert!(server.log_lines_with(&[&token]).is_empty());
    assert!(server.log_lines_with(&["correct horse"]).is_empty());
    assert!(server.log_lines_with(&["lena@example.com"]).is_empty());
}
