//! Accounts, tokens and sessions over HTTP (SPEC §2, §3), each flow once on the embedded default
//! and once on PostgreSQL (a fresh schema per test), through the real binary.

use std::time::Duration;

use ringhub_tests::{Answer, Client, Db, Ended, Fixture, Server, s};

const UA: (&str, &str) = ("User-Agent", "ringhub-tests");

fn start(db: Db, name: &str, extra: &[&str]) -> Fixture {
    let mut flags = vec!["--bcrypt-cost", "4"];
    flags.extend(extra);
    db.start(name, &flags)
}

fn register(server: &Server, username: &str, email: &str, password: &str) -> Answer {
    let body = format!(r#"{{"username":"{username}","email":"{email}","password":"{password}"}}"#);
    server.api("POST", "/register", &[], Some(&body))
}

/// Logs in; returns (access token, refresh token).
fn login(server: &Server, email: &str, password: &str) -> (String, String) {
    let answer = try_login(server, email, password, &[]);
    assert_eq!(answer.status, 200, "login: {answer:?}");
    (
        answer.str_at("access_token"),
        answer.str_at("refresh_token"),
    )
}

fn try_login(server: &Server, email: &str, password: &str, headers: &[(&str, &str)]) -> Answer {
    let body = format!(r#"{{"email":"{email}","password":"{password}"}}"#);
    server.api("POST", "/login", headers, Some(&body))
}

fn refresh(server: &Server, token: &str) -> Answer {
    server.api(
        "POST",
        "/refresh",
        &[],
        Some(&format!(r#"{{"refresh_token":"{token}"}}"#)),
    )
}

fn connect(server: &Server, token: &str) -> Client {
    let mut client = server
        .try_connect(token, None, &[UA])
        .unwrap_or_else(|e| panic!("connect: {e}"));
    client.expect("welcome", None);
    client
}

ringhub_tests::on_both!(
    register_login_me_and_input_rules,
    refresh_rotates_and_reuse_revokes_the_session,
    revocation_survives_a_restart,
    token_binding_rejects_another_user_agent,
    idempotency_keys_replay_the_first_answer,
    failed_logins_lock_the_account_even_for_the_right_password,
    logout_all_password_change_and_deletion_close_live_connections,
    migrate_set_role_and_token_commands,
    a_forwarded_for_line_appended_by_the_proxy_decides_the_client,
    refresh_pairs_are_erased_once_their_reuse_window_has_passed,
    a_login_rehashes_a_password_made_at_another_cost,
);

fn sha256(text: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).to_vec()
}

fn a_forwarded_for_line_appended_by_the_proxy_decides_the_client(db: Db) {
    let f = start(db, "acc-xff", &["--trusted-proxies", "127.0.0.1/32"]);
    let server = &f.server;
    assert_eq!(
        register(server, "xena", "xena@example.com", "correct horse").status,
        201
    );
    // Logged in through the proxy from 198.51.100.1: the token is bound to that address.
    let bound = ("X-Forwarded-For", "198.51.100.1");
    let answer = try_login(server, "xena@example.com", "correct horse", &[bound]);
    assert_eq!(answer.status, 200, "{answer:?}");
    let auth = format!("Bearer {}", answer.str_at("access_token"));
    let me = |lines: &[(&str, &str)]| {
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(lines);
        server.api("GET", "/me", &headers, None)
    };
    assert_eq!(me(&[bound]).status, 200);
    // A thief at 203.0.113.66 writes the bound address; the proxy appends the address it saw, on
    // a line of its own or on the same one: the client is the address the proxy appended.
    for lines in [
        &[bound, ("X-Forwarded-For", "203.0.113.66")][..],
        &[("X-Forwarded-For", "198.51.100.1, 203.0.113.66")],
    ] {
        let stolen = me(lines);
        assert_eq!(
            (stolen.status, stolen.code().as_str()),
            (401, "invalid_token"),
            "{lines:?}"
        );
    }
    let upgrade = |xff: &str| {
        server.upgrade_raw(
            "/ws",
            &format!("Authorization: {auth}\r\nUser-Agent: ringhub-tests\r\n{xff}"),
        )
    };
    let (status, text) =
        upgrade("X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.66\r\n");
    assert_eq!(status, 401, "{text}");
    let (status, text) = upgrade("X-Forwarded-For: 198.51.100.1\r\n");
    assert_eq!(status, 101, "{text}");
    // Trusted hops are skipped across lines too.
    let hops = me(&[bound, ("X-Forwarded-For", "127.0.0.1")]);
    assert_eq!(hops.status, 200, "{hops:?}");
}

fn refresh_pairs_are_erased_once_their_reuse_window_has_passed(db: Db) {
    let f = start(db, "acc-child", &["--refresh-reuse-interval", "1s"]);
    let server = &f.server;
    assert_eq!(
        register(server, "yuri", "yuri@example.com", "correct horse").status,
        201
    );
    let (_, first) = login(server, "yuri@example.com", "correct horse");
    let rotated = refresh(server, &first);
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let second = rotated.str_at("refresh_token");
    // Within the window another tab gets the same pair: it is held, encrypted, meanwhile.
    let again = refresh(server, &first);
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.str_at("refresh_token"), second);
    let store = server.open_store();
    let row = |token: &str| {
        store
            .refresh_token(&sha256(token))
            .expect("read")
            .expect("row")
    };
    assert!(row(&first).child_cipher.is_some());
    // Past the window (and one upkeep tick of 2 s), only the hash and the rotation time remain.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while row(&first).child_cipher.is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let kept = row(&first);
    assert_eq!(kept.child_cipher, None, "the pair is still at rest");
    assert!(kept.rotated_at_ms.is_some());
    // A reuse now is theft: the session goes.
    let reused = refresh(server, &first);
    assert_eq!(
        (reused.status, reused.code().as_str()),
        (401, "token_reused")
    );
    assert_eq!(refresh(server, &second).status, 401);
}

fn a_login_rehashes_a_password_made_at_another_cost(db: Db) {
    let f = start(db, "acc-rehash", &[]);
    let created = register(&f.server, "zoe", "zoe@example.com", "correct horse");
    assert_eq!(created.status, 201);
    let id = created.str_at("user.id");
    let hash_of = |server: &Server| {
        server
            .open_store()
            .user_by_id(&id)
            .expect("read")
            .expect("user")
            .password_hash
    };
    assert!(hash_of(&f.server).starts_with("$2b$04$"));
    let Fixture {
        server,
        schema: _schema,
    } = f;
    let server = server.restart_with(&["--bcrypt-cost", "5"]);
    // A wrong password changes nothing.
    let wrong = try_login(&server, "zoe@example.com", "wrong horse", &[]);
    assert_eq!(wrong.status, 401);
    assert!(hash_of(&server).starts_with("$2b$04$"));
    // The right one logs in and leaves a hash at the configured cost, still for that password.
    login(&server, "zoe@example.com", "correct horse");
    assert!(
        hash_of(&server).starts_with("$2b$05$"),
        "{}",
        hash_of(&server)
    );
    login(&server, "zoe@example.com", "correct horse");
}

fn migrate_set_role_and_token_commands(db: Db) {
    let f = start(db, "acc-cli", &[]);
    let server = &f.server;
    let migrate = server.cli(&["migrate"]);
    assert_eq!(migrate.code, 0, "{migrate:?}");
    assert!(
        migrate.stdout.contains("schema at version 5"),
        "{migrate:?}"
    );
    assert_eq!(
        register(server, "judy", "judy@example.com", "correct horse").status,
        201
    );
    let granted = server.cli(&["user", "set-role", "Judy@Example.com", "admin"]);
    assert_eq!(granted.code, 0, "{granted:?}");
    assert!(granted.stdout.contains("role admin"), "{granted:?}");
    let unknown = server.cli(&["user", "set-role", "nobody@example.com", "admin"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(unknown.stderr.contains("no account"), "{unknown:?}");
    // `token --user EMAIL` speaks for the registered account.
    let minted = server.cli(&["token", "--user", "judy@example.com"]);
    assert_eq!(minted.code, 0, "{minted:?}");
    let me = server.api_as(minted.stdout.trim(), "GET", "/me", None);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.str_at("user.username"), "judy");
    let missing = server.cli(&["token", "--user", "nobody@example.com"]);
    assert_eq!(missing.code, 1, "{missing:?}");
}

fn register_login_me_and_input_rules(db: Db) {
    let f = start(db, "acc-basic", &[]);
    let server = &f.server;
    let created = register(server, "alice", "  Alice@Example.COM ", "correct horse");
    assert_eq!(created.status, 201, "{created:?}");
    assert_eq!(created.str_at("user.email"), "alice@example.com");
    assert_eq!(created.str_at("user.username"), "alice");
    let id = created.str_at("user.id");
    assert_eq!(id.len(), 36);
    assert!(created.str_at("user.created_at").ends_with('Z'));
    assert!(created.header("X-Request-Id").is_some());

    let again = register(server, "alice2", "alice@example.com", "correct horse");
    assert_eq!((again.status, again.code()), (409, "email_taken".into()));
    let again = register(server, "ALICE", "other@example.com", "correct horse");
    assert_eq!((again.status, again.code()), (409, "username_taken".into()));
    for (body, field) in [
        (
            r#"{"username":"a","email":"x@y.z","password":"correct horse"}"#,
            "username",
        ),
        (
            r#"{"username":"bob","email":"nope","password":"correct horse"}"#,
            "email",
        ),
        (
            r#"{"username":"bob","email":"b@y.z","password":"short"}"#,
            "password",
        ),
        (r#"{"username":"bob","email":"b@y.z"}"#, "password"),
        (
            r#"{"username":"bob","email":"b@y.z","password":7}"#,
            "password",
        ),
    ] {
        let answer = server.api("POST", "/register", &[], Some(body));
        assert_eq!(
            (answer.status, answer.code()),
            (400, "invalid_input".into()),
            "{body}"
        );
        assert_eq!(answer.str_at("error.field"), field, "{body}");
    }
    // 73 bytes: bcrypt would truncate; refused instead.
    let long = "x".repeat(73);
    let answer = register(server, "bob", "bob@example.com", &long);
    assert_eq!(answer.str_at("error.field"), "password");
    // Shapes of bad bodies: 415, 400, 413; then the server still serves.
    let answer = server.api(
        "POST",
        "/register",
        &[("Content-Type", "text/plain")],
        Some("{}"),
    );
    assert_eq!((answer.status, answer.code()), (415, "unsupported".into()));
    let answer = server.api("POST", "/login", &[], Some("{not json"));
    assert_eq!((answer.status, answer.code()), (400, "bad_request".into()));
    let huge = format!(r#"{{"email":"a@b.c","password":"{}"}}"#, "x".repeat(70_000));
    let answer = server.api("POST", "/login", &[], Some(&huge));
    assert_eq!((answer.status, answer.code()), (413, "too_large".into()));

    // A body nested 60,000 deep never reaches the (recursive) JSON parser.
    let deep = "[".repeat(60_000);
    let answer = server.api("POST", "/login", &[], Some(&deep));
    assert_eq!((answer.status, answer.code()), (400, "bad_request".into()));
    assert_eq!(server.api("GET", "/healthz", &[], None).status, 200);

    // Generic failures: a wrong password and an unknown e-mail look the same.
    let wrong = try_login(server, "alice@example.com", "wrong password", &[]);
    let unknown = try_login(server, "nobody@example.com", "wrong password", &[]);
    assert_eq!(
        (wrong.status, wrong.code()),
        (401, "invalid_credentials".into())
    );
    assert_eq!(wrong.body, unknown.body);

    let answer = try_login(server, "ALICE@example.com", "correct horse", &[]);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.str_at("token_type"), "Bearer");
    assert_eq!(
        answer.json().get("expires_in").and_then(|v| v.as_u64()),
        Some(900)
    );
    let access = answer.str_at("access_token");
    let me = server.api_as(&access, "GET", "/me", None);
    assert_eq!(me.status, 200, "{me:?}");
    assert_eq!(me.str_at("user.id"), id);
    let sessions = server.api_as(&access, "GET", "/sessions", None);
    assert_eq!(sessions.status, 200);
    let json = sessions.json();
    let list = json.get("sessions").unwrap();
    let protocol::envelope::Value::Array(list) = list else {
        panic!("sessions is not a list: {sessions:?}");
    };
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].get("user_agent").unwrap().as_str(),
        Some("ringhub-tests")
    );
    assert_eq!(list[0].get("ip").unwrap().as_str(), Some("127.0.0.1"));
    assert_eq!(
        list[0].get("current"),
        Some(&protocol::envelope::Value::Bool(true))
    );
    // A refresh token is no access token, and garbage is no token.
    let (_, refresh_token) = login(server, "alice@example.com", "correct horse");
    for token in [refresh_token.as_str(), "garbage"] {
        let answer = server.api_as(token, "GET", "/me", None);
        assert_eq!(
            (answer.status, answer.code()),
            (401, "invalid_token".into())
        );
    }
    let answer = server.api("GET", "/me", &[], None);
    assert_eq!(answer.status, 401);
    // The WebSocket takes the same token, with the same User-Agent.
    let mut ws = connect(server, &access);
    let id = ws.request("ping", &[]);
    ws.expect("pong", Some(id));
    let ready = server.api("GET", "/readyz", &[], None);
    assert_eq!(ready.status, 200, "{ready:?}");
}

fn refresh_rotates_and_reuse_revokes_the_session(db: Db) {
    let f = start(db, "acc-refresh", &["--refresh-reuse-interval", "1s"]);
    let server = &f.server;
    assert_eq!(
        register(server, "carol", "carol@example.com", "correct horse").status,
        201
    );
    let (access, first) = login(server, "carol@example.com", "correct horse");
    let mut ws = connect(server, &access);

    let rotated = refresh(server, &first);
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let second = rotated.str_at("refresh_token");
    assert_ne!(second, first);
    // Within the reuse window the same new pair comes back (several tabs).
    let again = refresh(server, &first);
    assert_eq!(again.status, 200);
    assert_eq!(again.str_at("refresh_token"), second);
    assert_eq!(again.str_at("access_token"), rotated.str_at("access_token"));
    // The new pair works and rotates in turn.
    let third = refresh(server, &second);
    assert_eq!(third.status, 200);
    std::thread::sleep(Duration::from_millis(1200));
    // After the window, the rotated token is theft: the whole session goes.
    let stolen = refresh(server, &first);
    assert_eq!((stolen.status, stolen.code()), (401, "token_reused".into()));
    let latest = refresh(server, &third.str_at("refresh_token"));
    assert_eq!(
        (latest.status, latest.code()),
        (401, "invalid_token".into())
    );
    for token in [access.as_str(), &third.str_at("access_token")] {
        let answer = server.api_as(token, "GET", "/me", None);
        assert_eq!(
            (answer.status, answer.code()),
            (401, "invalid_token".into())
        );
    }
    ws.set_timeout(Duration::from_secs(5));
    assert_eq!(ws.ended(), Ended::Closed(4001));
    // An access token is no refresh token.
    let (access, _) = login(server, "carol@example.com", "correct horse");
    let answer = refresh(server, &access);
    assert_eq!(
        (answer.status, answer.code()),
        (401, "invalid_token".into())
    );
}

fn revocation_survives_a_restart(db: Db) {
    let f = start(db, "acc-restart", &[]);
    let server = &f.server;
    assert_eq!(
        register(server, "dave", "dave@example.com", "correct horse").status,
        201
    );
    let (revoked, _) = login(server, "dave@example.com", "correct horse");
    let (kept, kept_refresh) = login(server, "dave@example.com", "correct horse");
    let mut ws = connect(server, &revoked);
    let logout = server.api_as(&revoked, "POST", "/logout", None);
    assert_eq!(logout.status, 204, "{logout:?}");
    ws.set_timeout(Duration::from_secs(5));
    assert_eq!(ws.ended(), Ended::Closed(4001));
    assert_eq!(server.api_as(&revoked, "GET", "/me", None).status, 401);

    let Fixture {
        server,
        schema: _schema,
    } = f;
    let server = server.restart();
    assert_eq!(server.api_as(&revoked, "GET", "/me", None).status, 401);
    let refused = server.try_connect(&revoked, None, &[UA]);
    assert!(refused.is_err_and(|e| e.contains("401")));
    // Nothing else was lost: the other session, its refresh token, the account.
    assert_eq!(server.api_as(&kept, "GET", "/me", None).status, 200);
    assert_eq!(refresh(&server, &kept_refresh).status, 200);
    login(&server, "dave@example.com", "correct horse");
}

fn token_binding_rejects_another_user_agent(db: Db) {
    let f = start(db, "acc-binding", &[]);
    let server = &f.server;
    assert_eq!(
        register(server, "erin", "erin@example.com", "correct horse").status,
        201
    );
    let (access, refresh_token) = login(server, "erin@example.com", "correct horse");
    let auth = format!("Bearer {access}");
    let other = server.api(
        "GET",
        "/me",
        &[("Authorization", &auth), ("User-Agent", "curl/8")],
        None,
    );
    assert_eq!((other.status, other.code()), (401, "invalid_token".into()));
    let refused = server.try_connect(&access, None, &[("User-Agent", "curl/8")]);
    assert!(refused.is_err_and(|e| e.contains("401")));
    let refused = server.try_connect(&access, None, &[]);
    assert!(refused.is_err_and(|e| e.contains("401")));
    assert_eq!(server.api_as(&access, "GET", "/me", None).status, 200);
    let mut ws = connect(server, &access);
    // A refresh on the live connection must carry the same binding.
    let fresh = refresh(server, &refresh_token).str_at("access_token");
    let id = ws.request("refresh", &[("token", s(&fresh))]);
    ws.expect("reply", Some(id));
}

fn idempotency_keys_replay_the_first_answer(db: Db) {
    let f = start(db, "acc-idem", &[]);
    let server = &f.server;
    let body = r#"{"username":"frank","email":"frank@example.com","password":"correct horse"}"#;
    let key = [("Idempotency-Key", "reg-1")];
    let first = server.api("POST", "/register", &key, Some(body));
    assert_eq!(first.status, 201);
    let replay = server.api("POST", "/register", &key, Some(body));
    assert_eq!((replay.status, &replay.body), (201, &first.body));
    let other = body.replace("frank@", "frank2@");
    let reused = server.api("POST", "/register", &key, Some(&other));
    assert_eq!(
        (reused.status, reused.code()),
        (422, "idempotency_key_reused".into())
    );
    let bad = server.api(
        "POST",
        "/register",
        &[("Idempotency-Key", "a b")],
        Some(body),
    );
    assert_eq!((bad.status, bad.code()), (400, "invalid_input".into()));

    let login_body = r#"{"email":"frank@example.com","password":"correct horse"}"#;
    let key = [("Idempotency-Key", "login-1")];
    let first = server.api("POST", "/login", &key, Some(login_body));
    assert_eq!(first.status, 200);
    let replay = server.api("POST", "/login", &key, Some(login_body));
    assert_eq!((replay.status, &replay.body), (200, &first.body));
    let sessions = server.api_as(&first.str_at("access_token"), "GET", "/sessions", None);
    assert_eq!(
        sessions.body.matches("\"id\"").count(),
        1,
        "one login, one session"
    );
    assert_eq!(refresh(server, &first.str_at("refresh_token")).status, 200);
    let stale = server.api("POST", "/login", &key, Some(login_body));
    assert_eq!((stale.status, stale.code()), (409, "conflict".into()));
}

fn failed_logins_lock_the_account_even_for_the_right_password(db: Db) {
    let f = start(
        db,
        "acc-lockout",
        &[
            "--rate-limits.failed-logins-per-account",
            "3/15m",
            "--rate-limits.lockout",
            "15m",
        ],
    );
    let server = &f.server;
    assert_eq!(
        register(server, "gina", "gina@example.com", "correct horse").status,
        201
    );
    for _ in 0..3 {
        let answer = try_login(server, "gina@example.com", "wrong password", &[]);
        assert_eq!(answer.status, 401);
    }
    let locked = try_login(server, "gina@example.com", "correct horse", &[]);
    assert_eq!((locked.status, locked.code()), (429, "rate_limited".into()));
    let retry: u64 = locked.header("Retry-After").unwrap().parse().unwrap();
    assert!(retry > 800 && retry <= 900, "{retry}");
    // Unknown e-mails are counted and locked the same way.
    for _ in 0..3 {
        try_login(server, "ghost@example.com", "wrong password", &[]);
    }
    let ghost = try_login(server, "ghost@example.com", "wrong password", &[]);
    assert_eq!(ghost.status, 429);
    // Other accounts are not affected.
    assert_eq!(
        register(server, "hank", "hank@example.com", "correct horse").status,
        201
    );
    login(server, "hank@example.com", "correct horse");
    let metrics = server.api("GET", "/metrics", &[], None);
    assert!(
        metrics
            .body
            .contains("ringhub_auth_failures_total{reason=\"locked\"} 2")
    );
    assert!(metrics.body.contains("ringhub_login_seconds_count"));
}

fn logout_all_password_change_and_deletion_close_live_connections(db: Db) {
    let f = start(db, "acc-close", &[]);
    let server = &f.server;
    assert_eq!(
        register(server, "ivan", "ivan@example.com", "correct horse").status,
        201
    );
    // Password change: the other session goes (4001), this one stays.
    let (this, _) = login(server, "ivan@example.com", "correct horse");
    let (other, _) = login(server, "ivan@example.com", "correct horse");
    let mut other_ws = connect(server, &other);
    let mut this_ws = connect(server, &this);
    let wrong = server.api_as(
        &this,
        "POST",
        "/password",
        Some(r#"{"current_password":"nope nope","new_password":"battery staple"}"#),
    );
    assert_eq!((wrong.status, wrong.code()), (403, "forbidden".into()));
    let changed = server.api_as(
        &this,
        "POST",
        "/password",
        Some(r#"{"current_password":"correct horse","new_password":"battery staple"}"#),
    );
    assert_eq!(changed.status, 204, "{changed:?}");
    other_ws.set_timeout(Duration::from_secs(5));
    assert_eq!(other_ws.ended(), Ended::Closed(4001));
    assert_eq!(server.api_as(&other, "GET", "/me", None).status, 401);
    assert_eq!(server.api_as(&this, "GET", "/me", None).status, 200);
    let id = this_ws.request("ping", &[]);
    this_ws.expect("pong", Some(id));
    assert_eq!(
        try_login(server, "ivan@example.com", "correct horse", &[]).status,
        401
    );

    // Deleting one session by id closes its connections with 4001; unknown ids are 404.
    let (third, _) = login(server, "ivan@example.com", "battery staple");
    let mut third_ws = connect(server, &third);
    let sessions = server.api_as(&this, "GET", "/sessions", None);
    let json = sessions.json();
    let protocol::envelope::Value::Array(list) = json.get("sessions").unwrap() else {
        panic!("{sessions:?}");
    };
    let third_id = list
        .iter()
        .find(|s| s.get("current") == Some(&protocol::envelope::Value::Bool(false)))
        .and_then(|s| s.get("id"))
        .and_then(|v| v.as_str())
        .unwrap()
        .to_owned();
    let gone = server.api_as(&this, "DELETE", "/sessions/nope", None);
    assert_eq!(gone.status, 404);
    let deleted = server.api_as(&this, "DELETE", &format!("/sessions/{third_id}"), None);
    assert_eq!(deleted.status, 204);
    third_ws.set_timeout(Duration::from_secs(5));
    assert_eq!(third_ws.ended(), Ended::Closed(4001));

    // Logout everywhere: 4510 on every connection, every token dead.
    let (fourth, _) = login(server, "ivan@example.com", "battery staple");
    let mut fourth_ws = connect(server, &fourth);
    let ops = server.cli(&["token", "--user", "ivan@example.com"]);
    let ops = ops.stdout.trim().to_owned();
    assert_eq!(server.api_as(&ops, "GET", "/me", None).status, 200);
    let all = server.api_as(&this, "POST", "/logout/all", None);
    assert_eq!(all.status, 204);
    assert_eq!(
        server.api_as(&ops, "GET", "/me", None).status,
        401,
        "tokens without a session are revoked too"
    );
    for ws in [&mut this_ws, &mut fourth_ws] {
        ws.set_timeout(Duration::from_secs(5));
        assert_eq!(ws.ended(), Ended::Closed(4510));
    }
    assert_eq!(server.api_as(&fourth, "GET", "/me", None).status, 401);

    // Deletion: wrong password 403; then 4510, no login, the e-mail and name are free again.
    let (last, _) = login(server, "ivan@example.com", "battery staple");
    let mut last_ws = connect(server, &last);
    let refused = server.api_as(&last, "DELETE", "/me", Some(r#"{"password":"nope nope"}"#));
    assert_eq!(refused.status, 403);
    let deleted = server.api_as(
        &last,
        "DELETE",
        "/me",
        Some(r#"{"password":"battery staple"}"#),
    );
    assert_eq!(deleted.status, 204, "{deleted:?}");
    last_ws.set_timeout(Duration::from_secs(5));
    assert_eq!(last_ws.ended(), Ended::Closed(4510));
    assert_eq!(server.api_as(&last, "GET", "/me", None).status, 401);
    assert_eq!(
        try_login(server, "ivan@example.com", "battery staple", &[]).status,
        401
    );
    let again = register(server, "ivan", "ivan@example.com", "correct horse");
    assert_eq!(again.status, 201, "{again:?}");
}

/// HTTP edges that do not depend on the database: per-IP limits, CORS, the refresh cookie,
/// addresses from trusted proxies.
#[test]
fn ip_limits_cors_cookie_and_trusted_proxies() {
    let f = start(
        Db::Embedded,
        "acc-edges",
        &[
            "--rate-limits.login-per-ip",
            "2/1m",
            "--rate-limits.register-per-ip",
            "2/1h",
            "--allowed-origins",
            "https://app.example",
            "--refresh-cookie",
            "--trusted-proxies",
            "127.0.0.1/32",
        ],
    );
    let server = &f.server;
    assert_eq!(
        register(server, "kate", "kate@example.com", "correct horse").status,
        201
    );
    assert_eq!(
        register(server, "kate2", "kate2@example.com", "correct horse").status,
        201
    );
    let third = register(server, "kate3", "kate3@example.com", "correct horse");
    assert_eq!((third.status, third.code()), (429, "rate_limited".into()));
    assert!(third.header("Retry-After").is_some());
    // Another client address (from the trusted proxy) has its own budget.
    let body = r#"{"username":"kate3","email":"kate3@example.com","password":"correct horse"}"#;
    let proxied = server.api(
        "POST",
        "/register",
        &[("X-Forwarded-For", "203.0.113.7")],
        Some(body),
    );
    assert_eq!(proxied.status, 201, "{proxied:?}");

    // The refresh token travels as a cookie, not in the body.
    let login = try_login(server, "kate@example.com", "correct horse", &[]);
    assert_eq!(login.status, 200);
    assert!(login.json().get("refresh_token").is_none(), "{login:?}");
    let cookie = login.header("Set-Cookie").unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("Secure"));
    assert!(cookie.contains("SameSite=Strict") && cookie.contains("Path=/refresh"));
    let pair = cookie.split(';').next().unwrap();
    let refreshed = server.api("POST", "/refresh", &[("Cookie", pair)], None);
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
    assert!(refreshed.header("Set-Cookie").is_some_and(|c| c != cookie));

    // The session records the forwarded address; a token bound to it is refused from another.
    let via_proxy = try_login(
        server,
        "kate2@example.com",
        "correct horse",
        &[("X-Forwarded-For", "198.51.100.4")],
    );
    assert_eq!(via_proxy.status, 200);
    let auth = format!("Bearer {}", via_proxy.str_at("access_token"));
    let same = server.api(
        "GET",
        "/sessions",
        &[
            ("Authorization", &auth),
            ("X-Forwarded-For", "198.51.100.4"),
        ],
        None,
    );
    assert_eq!(same.status, 200);
    assert!(same.body.contains("198.51.100.4"), "{same:?}");
    let direct = server.api("GET", "/me", &[("Authorization", &auth)], None);
    assert_eq!(direct.status, 401);

    // The third login from this address in the minute is refused; the server keeps serving.
    assert_eq!(
        try_login(server, "kate@example.com", "correct horse", &[]).status,
        200
    );
    let limited = try_login(server, "kate@example.com", "correct horse", &[]);
    assert_eq!(
        (limited.status, limited.code()),
        (429, "rate_limited".into())
    );

    // CORS: an allowed origin gets its headers and a preflight; another is refused.
    let origin = ("Origin", "https://app.example");
    let preflight = server.api(
        "OPTIONS",
        "/login",
        &[origin, ("Access-Control-Request-Method", "POST")],
        None,
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    assert!(
        preflight
            .header("Access-Control-Allow-Headers")
            .is_some_and(|h| h.contains("Authorization"))
    );
    let health = server.api("GET", "/healthz", &[origin], None);
    assert_eq!(
        health.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    let evil = server.api(
        "GET",
        "/healthz",
        &[("Origin", "https://evil.example")],
        None,
    );
    assert_eq!((evil.status, evil.code()), (403, "forbidden".into()));
    let echoed = server.api("GET", "/healthz", &[("X-Request-Id", "trace-42")], None);
    assert_eq!(echoed.header("X-Request-Id"), Some("trace-42"));
}

/// `jwt_algorithm = "EdDSA"`: tokens are signed with the Ed25519 key and its public half is served
/// at `/.well-known/jwks.json` (404 with HS256).
#[test]
fn eddsa_tokens_and_the_jwks_endpoint() {
    let dir = ringhub_tests::scratch_dir("acc-eddsa");
    // RFC 8032's first test key, as PKCS#8 (what `openssl genpkey -algorithm ed25519` writes).
    let key = dir.join("ed25519.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let flags: Vec<String> = [
        "--bcrypt-cost",
        "4",
        "--jwt-algorithm",
        "EdDSA",
        "--jwt-private-key-file",
        key.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec();
    let server = Server::start_in(dir.keep(), &flags);
    let jwks = server.api("GET", "/.well-known/jwks.json", &[], None);
    assert_eq!(jwks.status, 200, "{jwks:?}");
    assert!(jwks.body.contains(r#""kty":"OKP""#) && jwks.body.contains(r#""crv":"Ed25519""#));
    assert!(
        jwks.body
            .contains("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    );
    let (_, token) = server.account("leo");
    let header = token.split('.').next().unwrap();
    let header = String::from_utf8(
        data_encoding::BASE64URL_NOPAD
            .decode(header.as_bytes())
            .unwrap(),
    )
    .unwrap();
    assert!(header.contains(r#""alg":"EdDSA""#), "{header}");
    assert_eq!(server.api_as(&token, "GET", "/me", None).status, 200);
    let mut ws = server.connect_bound(&token);
    let id = ws.request("ping", &[]);
    ws.expect("pong", Some(id));
    let minted = server.cli(&["token", "--user", "leo@example.com"]);
    assert_eq!(minted.code, 0, "{minted:?}");
    assert_eq!(
        server
            .api_as(minted.stdout.trim(), "GET", "/me", None)
            .status,
        200
    );

    let hs = Server::start("acc-hs256", &[]);
    let none = hs.api("GET", "/.well-known/jwks.json", &[], None);
    assert_eq!((none.status, none.code()), (404, "not_found".into()));
}
