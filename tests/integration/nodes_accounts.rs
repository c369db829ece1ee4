//! The accounts side of several nodes and its outages (SPEC §10 points 5–8 and "Failures")
//! through the real binary: two nodes on one Redis and one PostgreSQL schema — what one node
//! revokes or changes, the other applies within a second, on HTTP, at upgrade and on live
//! connections; shared limits; one set of keys; PostgreSQL cut through a relay (the breaker).

use std::time::{Duration, Instant};

use protocol::envelope::Value;
use ringhub_tests::{
    Client, Db, Ended, OwnRedis, Relay, Schema, Server, s, shared_redis_url, start_nodes,
};

const UA: (&str, &str) = ("User-Agent", "ringhub-tests");
const WITHIN: Duration = Duration::from_secs(1);

/// Two nodes sharing a fresh PostgreSQL schema and the local Redis; the schema guard outlives
/// them (fields drop in order).
struct Pair {
    nodes: Vec<Server>,
    _schema: Option<Schema>,
}

fn pair(name: &str) -> Pair {
    pair_on(name, &shared_redis_url())
}

fn pair_on(name: &str, redis_url: &str) -> Pair {
    let (db_flags, schema) = Db::Postgres.flags(name);
    let mut flags: Vec<&str> = db_flags.iter().map(String::as_str).collect();
    flags.extend(["--bcrypt-cost", "4", "--refresh-reuse-interval", "1s"]);
    let nodes = start_nodes(name, 2, redis_url, &flags);
    Pair {
        nodes,
        _schema: schema,
    }
}

fn login(server: &Server, email: &str, password: &str) -> (String, String) {
    let body = format!(r#"{{"email":"{email}","password":"{password}"}}"#);
    let answer = server.api("POST", "/login", &[], Some(&body));
    assert_eq!(answer.status, 200, "login: {answer:?}");
    (
        answer.str_at("access_token"),
        answer.str_at("refresh_token"),
    )
}

fn connect(server: &Server, token: &str) -> Client {
    let mut client = server
        .try_connect(token, None, &[UA])
        .unwrap_or_else(|e| panic!("connect: {e}"));
    client.expect("welcome", None);
    client
}

/// The node refuses `token` on HTTP within a second (asked every 20 ms), and at upgrade.
fn refused_within_a_second(server: &Server, token: &str, what: &str) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let status = server.api_as(token, "GET", "/me", None).status;
        if status == 401 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: /me still {status} after 1 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = server.try_connect(token, None, &[UA]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("401")),
        "{what}: upgrade {:?}",
        refused.map(|_| "accepted")
    );
}

/// The live connection ends with `code` within a second.
fn closed_within_a_second(ws: &mut Client, code: u16, what: &str) {
    ws.set_timeout(WITHIN);
    assert_eq!(ws.ended(), Ended::Closed(code), "{what}");
}

/// Each kind of revocation made on node A is refused by node B within a second — on HTTP, at
/// upgrade, and on B's live connections with the right close code.
#[test]
fn every_revocation_made_on_one_node_reaches_the_other_within_a_second() {
    let p = pair("revoke");
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let created = a.register("ivan", "ivan@example.com", "correct horse");
    assert_eq!(created.status, 201, "{created:?}");

    // Password change on A: the other session goes everywhere (4001).
    let (this, _) = login(a, "ivan@example.com", "correct horse");
    let (other, _) = login(b, "ivan@example.com", "correct horse");
    let mut other_ws = connect(b, &other);
    let changed = a.api_as(
        &this,
        "POST",
        "/password",
        Some(r#"{"current_password":"correct horse","new_password":"battery staple"}"#),
    );
    assert_eq!(changed.status, 204, "{changed:?}");
    closed_within_a_second(&mut other_ws, 4001, "password change");
    refused_within_a_second(b, &other, "password change");
    assert_eq!(b.api_as(&this, "GET", "/me", None).status, 200);

    // A session deleted on A.
    let (third, _) = login(b, "ivan@example.com", "battery staple");
    let mut third_ws = connect(b, &third);
    let sessions = a.api_as(&this, "GET", "/sessions", None).json();
    let Some(Value::Array(list)) = sessions.get("sessions") else {
        panic!("{sessions:?}");
    };
    let third_id = list
        .iter()
        .find(|s| s.get("current") == Some(&Value::Bool(false)))
        .and_then(|s| s.get("id"))
        .and_then(Value::as_str)
        .unwrap()
        .to_owned();
    let deleted = a.api_as(&this, "DELETE", &format!("/sessions/{third_id}"), None);
    assert_eq!(deleted.status, 204);
    closed_within_a_second(&mut third_ws, 4001, "session delete");
    refused_within_a_second(b, &third, "session delete");

    // Logout on A.
    let (fourth, _) = login(a, "ivan@example.com", "battery staple");
    let mut fourth_ws = connect(b, &fourth);
    assert_eq!(a.api_as(&fourth, "POST", "/logout", None).status, 204);
    closed_within_a_second(&mut fourth_ws, 4001, "logout");
    refused_within_a_second(b, &fourth, "logout");

    // Refresh reuse detected on A: the family's tokens die on B.
    let (fifth, first_refresh) = login(a, "ivan@example.com", "battery staple");
    let mut fifth_ws = connect(b, &fifth);
    let body = |t: &str| format!(r#"{{"refresh_token":"{t}"}}"#);
    let rotated = a.api("POST", "/refresh", &[], Some(&body(&first_refresh)));
    assert_eq!(rotated.status, 200);
    std::thread::sleep(Duration::from_millis(1200));
    let stolen = a.api("POST", "/refresh", &[], Some(&body(&first_refresh)));
    assert_eq!((stolen.status, stolen.code()), (401, "token_reused".into()));
    closed_within_a_second(&mut fifth_ws, 4001, "refresh reuse");
    refused_within_a_second(b, &rotated.str_at("access_token"), "refresh reuse");

    // Logout everywhere on A: every connection on B closes with 4510, sessionless tokens too.
    let (sixth, _) = login(b, "ivan@example.com", "battery staple");
    let mut sixth_ws = connect(b, &sixth);
    let ops = b.cli(&["token", "--user", "ivan@example.com"]);
    let ops = ops.stdout.trim().to_owned();
    assert_eq!(b.api_as(&ops, "GET", "/me", None).status, 200);
    assert_eq!(a.api_as(&this, "POST", "/logout/all", None).status, 204);
    closed_within_a_second(&mut sixth_ws, 4510, "logout all");
    refused_within_a_second(b, &sixth, "logout all");
    refused_within_a_second(b, &ops, "logout all (a token without a session)");

    // Account deletion on A.
    let (last, _) = login(b, "ivan@example.com", "battery staple");
    let mut last_ws = connect(b, &last);
    let gone = a.api_as(
        &last,
        "DELETE",
        "/me",
        Some(r#"{"password":"battery staple"}"#),
    );
    assert_eq!(gone.status, 204, "{gone:?}");
    closed_within_a_second(&mut last_ws, 4510, "account deletion");
    refused_within_a_second(b, &last, "account deletion");
}

/// Sends `op` for `room` and returns its answer: the `reply` or the `error` with its id.
fn call(ws: &mut Client, op: &str, room: &str) -> Value {
    let id = ws.request(op, &[("room", s(room))]);
    loop {
        let v = ws.recv().unwrap_or_else(|e| panic!("{op} {room}: {e:?}"));
        if v.get("id").and_then(Value::as_u64) == Some(id) {
            return v;
        }
    }
}

/// Room changes made through node A reach members on node B within a second: a removed member
/// is kicked, a permission change kicks who may no longer read, a deleted room kicks everyone;
/// an admin demoted with `ringhub user set-role` loses, on B, the rooms only the role opened.
#[test]
fn room_and_role_changes_on_one_node_reach_the_other_within_a_second() {
    let p = pair("roomchange");
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let (_, owner) = a.account("olga");
    let (member_id, member) = a.account("mike");
    let (_, boss) = a.account("boss");
    let granted = a.cli(&["user", "set-role", "boss@example.com", "admin"]);
    assert_eq!(granted.code, 0, "{granted:?}");
    let body = r#"{"id":"club","permission":"private"}"#;
    assert_eq!(a.api_as(&owner, "POST", "/rooms", Some(body)).status, 201);
    let put = a.api_as(
        &owner,
        "PUT",
        &format!("/rooms/club/members/{member_id}"),
        Some(r#"{"role":"member"}"#),
    );
    assert_eq!(put.status, 204);

    // The membership made on A lets the member in on B.
    let mut member_ws = b.connect_bound(&member);
    let deadline = Instant::now() + WITHIN;
    loop {
        let reply = call(&mut member_ws, "join", "club");
        if reply.get("op").and_then(Value::as_str) == Some("reply") {
            break;
        }
        assert!(Instant::now() < deadline, "the membership never reached B");
        std::thread::sleep(Duration::from_millis(20));
    }
    let removed = a.api_as(
        &owner,
        "DELETE",
        &format!("/rooms/club/members/{member_id}"),
        None,
    );
    assert_eq!(removed.status, 204);
    member_ws.set_timeout(WITHIN);
    let kicked = member_ws.expect("kicked", None);
    assert_eq!(
        (
            kicked.get("room").and_then(Value::as_str),
            kicked.get("reason").and_then(Value::as_str)
        ),
        (Some("club"), Some("removed"))
    );

    // A permission change on A: a reader of a public room on B who may no longer read is kicked.
    let body = r#"{"id":"stage","permission":"public"}"#;
    assert_eq!(a.api_as(&owner, "POST", "/rooms", Some(body)).status, 201);
    member_ws.set_timeout(Duration::from_secs(5));
    let deadline = Instant::now() + WITHIN;
    loop {
        let reply = call(&mut member_ws, "join", "stage");
        if reply.get("op").and_then(Value::as_str) == Some("reply") {
            break;
        }
        assert!(Instant::now() < deadline, "the room never reached B");
        std::thread::sleep(Duration::from_millis(20));
    }
    let private = a.api_as(
        &owner,
        "PATCH",
        "/rooms/stage",
        Some(r#"{"permission":"private"}"#),
    );
    assert_eq!(private.status, 200, "{private:?}");
    member_ws.set_timeout(WITHIN);
    let kicked = member_ws.expect("kicked", None);
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("permission_changed")
    );

    // An admin on B, in a private room only the role opens; demoted by the CLI: kicked on B.
    let mut boss_ws = b.connect_bound(&boss);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = call(&mut boss_ws, "join", "club");
        if reply.get("op").and_then(Value::as_str) == Some("reply") {
            break;
        }
        assert!(Instant::now() < deadline, "the admin role never reached B");
        std::thread::sleep(Duration::from_millis(100));
    }
    let demoted = a.cli(&["user", "set-role", "boss@example.com", "user"]);
    assert_eq!(demoted.code, 0, "{demoted:?}");
    assert!(!demoted.stdout.contains("within 2 s"), "{demoted:?}");
    boss_ws.set_timeout(WITHIN);
    let kicked = boss_ws.expect("kicked", None);
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("permission_changed")
    );

    // A room deleted on A: its members on B are kicked.
    let mut owner_ws = b.connect_bound(&owner);
    assert_eq!(
        call(&mut owner_ws, "join", "club")
            .get("op")
            .and_then(Value::as_str),
        Some("reply")
    );
    assert_eq!(a.api_as(&owner, "DELETE", "/rooms/club", None).status, 204);
    owner_ws.set_timeout(WITHIN);
    let kicked = owner_ws.expect("kicked", None);
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("room_deleted")
    );
}

/// A revocation made while Redis was down (its announcement lost) still reaches the other node:
/// once Redis is back, that node reloads the revocations from storage and closes what they
/// cover.
#[test]
fn a_revocation_missed_while_redis_was_down_is_reloaded() {
    let mut redis = OwnRedis::start();
    let p = pair_on("missed", &redis.url());
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let (_, token) = a.account("nina");
    let mut ws = connect(b, &token);
    redis.stop();
    // The logout is written to PostgreSQL; its announcement has nowhere to go.
    assert_eq!(a.api_as(&token, "POST", "/logout", None).status, 204);
    redis.restart();
    // B's subscriber reconnects (backoff up to 5 s), reloads, closes the connection.
    ws.set_timeout(Duration::from_secs(15));
    assert_eq!(ws.ended(), Ended::Closed(4001));
    assert_eq!(b.api_as(&token, "GET", "/me", None).status, 401);
}

/// While Redis stays down, a node reads the revocations from PostgreSQL every half second: a
/// logout on A still closes B's connection (4001) and is refused by B within a second or so,
/// with Redis never coming back during the test.
#[test]
fn revocations_reach_the_other_node_while_redis_is_down() {
    let mut redis = OwnRedis::start();
    let p = pair_on("outage", &redis.url());
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let (_, token) = a.account("nora");
    let mut ws = connect(b, &token);
    redis.stop();
    eventually_down(b);
    assert_eq!(a.api_as(&token, "POST", "/logout", None).status, 204);
    // Half a second between reads, plus the read: 1.5 s leaves room for a loaded machine.
    ws.set_timeout(Duration::from_millis(1500));
    assert_eq!(ws.ended(), Ended::Closed(4001));
    assert_eq!(b.api_as(&token, "GET", "/me", None).status, 401);
}

/// Degraded mode: while Redis is unreachable no presence diff is sent (the node could only tell
/// half of it), `/readyz` names what runs degraded, messages still flow locally; once Redis is
/// back, diffs flow again.
#[test]
fn while_redis_is_down_presence_diffs_are_shed_first_and_readyz_names_them() {
    let mut redis = OwnRedis::start();
    let p = pair_on("degraded", &redis.url());
    let a = &p.nodes[0];
    let mut watcher = connect(a, &a.token("watcher"));
    let third_token = a.token("third");
    assert_eq!(
        call(&mut watcher, "join", "hall")
            .get("op")
            .and_then(Value::as_str),
        Some("reply")
    );
    // The diff of the watcher's own join (in "hall"; its default room's may come first).
    while watcher
        .expect("presence", None)
        .get("room")
        .and_then(Value::as_str)
        != Some("hall")
    {}
    watcher.clear();
    redis.stop();
    eventually_down(a);
    let (status, text) = a.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains(r#""failing":["redis"]"#) && text.contains("presence_diffs"),
        "{text}"
    );
    assert!(
        text.contains("cross_node_delivery") && text.contains("shared_limits"),
        "{text}"
    );
    let mut late = connect(a, &a.token("late"));
    assert_eq!(
        call(&mut late, "join", "hall")
            .get("op")
            .and_then(Value::as_str),
        Some("reply")
    );
    // Messages still flow on the node; the diff of the join never comes.
    let id = late.request("publish", &[("room", s("hall")), ("data", s("local"))]);
    late.expect("reply", Some(id));
    let m = watcher.expect("message", None);
    assert_eq!(m.get("data").and_then(Value::as_str), Some("local"));
    watcher.set_timeout(Duration::from_millis(600));
    match watcher.recv() {
        Err(Ended::Timeout) => {}
        other => panic!("nothing but silence while degraded: {other:?}"),
    }

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").0 != 200 {
        assert!(Instant::now() < deadline, "redis never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Diffs flow again: a third user's join in "hall" on the other node is told. (What is
    // published on a room's channel before this node has subscribed it again is not seen: the
    // join is retried until it is, bounded.)
    let mut third = connect(&p.nodes[1], &third_token);
    watcher.set_timeout(Duration::from_millis(1000));
    let deadline = Instant::now() + Duration::from_secs(15);
    'told: loop {
        assert!(Instant::now() < deadline, "no presence diff after recovery");
        assert_eq!(
            call(&mut third, "join", "hall")
                .get("op")
                .and_then(Value::as_str),
            Some("reply")
        );
        while let Ok(diff) = watcher.recv() {
            if diff.get("op").and_then(Value::as_str) == Some("presence")
                && diff.get("room").and_then(Value::as_str) == Some("hall")
                && format!("{diff:?}").contains("third")
            {
                break 'told;
            }
        }
        call(&mut third, "leave", "hall");
    }
}

/// Waits (bounded) until `node` says Redis is down.
fn eventually_down(node: &Server) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").0 != 503 {
        assert!(Instant::now() < deadline, "the node never saw redis go");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every node of a service must share its keys: the first node records their fingerprints in
/// the database; a node with another key refuses to start in production mode (naming the key,
/// never its value) and warns in development mode; a rotated key (the old one kept as retired)
/// is accepted and becomes the record.
#[test]
fn a_node_with_other_keys_is_refused_in_production_and_warned_in_development() {
    let (db_flags, _schema) = Db::Postgres.flags("keys");
    let secret = "the-service-jwt-secret-0123456789abcdef";
    let other = "another-jwt-secret-0123456789abcdef-xyz";
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let flags = |jwt: &str| -> Vec<String> {
        let mut all = db_flags.clone();
        all.extend(
            [
                "--jwt-secret",
                jwt,
                "--encryption-key",
                key,
                "--blind-index-key",
                secret,
            ]
            .map(str::to_owned),
        );
        all
    };
    // The first node records the service's keys.
    let first = Server::start_in(ringhub_tests::scratch_dir("keys-a").keep(), &flags(secret));
    drop(first);
    // Production, another JWT secret: refused, the key named, its value not shown.
    let dir = ringhub_tests::scratch_dir("keys-prod");
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"];
    let other_flags = flags(other);
    args.extend(other_flags.iter().map(String::as_str));
    let env = [
        ("RINGHUB_MODE", "production"),
        ("RINGHUB_BEHIND_PROXY", "true"),
    ];
    let run = ringhub_tests::ringhub(&args, &env, &dir);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("jwt_secret differs from the key that wrote this database"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(other), "{}", run.stderr);
    // Development, the same: it starts and says which key differs.
    let dev = Server::start_in(ringhub_tests::scratch_dir("keys-dev").keep(), &other_flags);
    let warned = dev.log_lines_with(&["\"key\":\"jwt_secret\"", "differs"]);
    assert_eq!(warned.len(), 1, "{warned:?}");
    drop(dev);
    // A rotation: the recorded secret kept as retired, the new one current: accepted, recorded.
    let mut rotated = flags(other);
    rotated.extend(["--jwt-secrets-old".to_owned(), format!("[\"{secret}\"]")]);
    let node = Server::start_in(ringhub_tests::scratch_dir("keys-rot").keep(), &rotated);
    assert!(node.log_lines_with(&["differs"]).is_empty());
    drop(node);
    // The rotated key is the service's now: a node with it alone is no longer warned.
    let again = Server::start_in(ringhub_tests::scratch_dir("keys-new").keep(), &other_flags);
    assert!(again.log_lines_with(&["differs"]).is_empty());
}

/// Limits count every node's requests together: logins from one address spread over two nodes
/// hit `login_per_ip` as on one node, and wrong passwords spread over two nodes lock the account
/// on both (the right password is then 429 on the other node too).
#[test]
fn login_limits_and_lockouts_count_every_node() {
    let (db_flags, _schema) = Db::Postgres.flags("shlimits");
    let mut flags: Vec<&str> = db_flags.iter().map(String::as_str).collect();
    flags.extend([
        "--bcrypt-cost",
        "4",
        "--rate-limits.login-per-ip",
        "6/1m",
        "--rate-limits.failed-logins-per-account",
        "4/15m",
    ]);
    let nodes = start_nodes("shlimits", 2, &shared_redis_url(), &flags);
    let (a, b) = (&nodes[0], &nodes[1]);
    for who in ["lena", "otto"] {
        let created = a.register(who, &format!("{who}@example.com"), "correct horse");
        assert_eq!(created.status, 201, "{created:?}");
    }
    let body = |who: &str, password: &str| {
        format!(r#"{{"email":"{who}@example.com","password":"{password}"}}"#)
    };
    // Four wrong passwords, two on each node: the account is locked everywhere.
    for node in [a, b, a, b] {
        let wrong = node.api("POST", "/login", &[], Some(&body("lena", "wrong guess")));
        assert_eq!(wrong.status, 401, "{wrong:?}");
    }
    let right = b.api("POST", "/login", &[], Some(&body("lena", "correct horse")));
    assert_eq!((right.status, right.code()), (429, "rate_limited".into()));
    assert!(right.header("Retry-After").is_some());
    // Logins from this address: 6 per minute for the whole service (5 made above, one left).
    let ok = a.api("POST", "/login", &[], Some(&body("otto", "correct horse")));
    assert_eq!(ok.status, 200, "{ok:?}");
    let past = b.api("POST", "/login", &[], Some(&body("otto", "correct horse")));
    assert_eq!((past.status, past.code()), (429, "rate_limited".into()));
    let metrics = b.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
    assert!(
        metrics.contains("ringhub_shared_limit_fallbacks_total 0"),
        "{metrics}"
    );
}

/// With Redis unreachable a node counts its limits alone (and says so in its metrics): never
/// "no limit".
#[test]
fn with_redis_down_a_node_keeps_its_own_limits() {
    let mut redis = OwnRedis::start();
    let (db_flags, _schema) = Db::Postgres.flags("limdown");
    let mut flags: Vec<&str> = db_flags.iter().map(String::as_str).collect();
    flags.extend(["--bcrypt-cost", "4", "--rate-limits.login-per-ip", "3/1m"]);
    let nodes = start_nodes("limdown", 1, &redis.url(), &flags);
    let node = &nodes[0];
    let created = node.register("pia", "pia@example.com", "correct horse");
    assert_eq!(created.status, 201, "{created:?}");
    redis.stop();
    let body = r#"{"email":"pia@example.com","password":"correct horse"}"#;
    for _ in 0..3 {
        assert_eq!(node.api("POST", "/login", &[], Some(body)).status, 200);
    }
    let past = node.api("POST", "/login", &[], Some(body));
    assert_eq!((past.status, past.code()), (429, "rate_limited".into()));
    let fallbacks = node
        .metric_sum("ringhub_shared_limit_fallbacks_total")
        .unwrap_or(0.0);
    assert!(fallbacks >= 3.0, "{fallbacks}");
}

/// `PUT /admin/origins` on node A (admin only, validated, kept in storage) applies on node B
/// within a second: upgrades and CORS from an origin no longer listed are refused there, and a
/// live connection from it is closed with 4503; a restarted node keeps the list.
#[test]
fn allowed_origins_changed_at_run_time_apply_on_every_node() {
    let p = pair("origins");
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let (_, admin) = a.account("root");
    let (_, plain) = a.account("joe");
    assert_eq!(
        a.cli(&["user", "set-role", "root@example.com", "admin"])
            .code,
        0
    );
    // An admin's role reaches both nodes (announced); until then the API answers 403.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.api_as(&admin, "GET", "/admin/origins", None).status != 200 {
        assert!(
            Instant::now() < deadline,
            "the admin role never took effect"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let evil = ("Origin", "https://evil.example");
    let mut live = b
        .try_connect(&b.token("watcher"), None, &[evil])
        .unwrap_or_else(|e| panic!("connect: {e}"));
    live.expect("welcome", None);

    let put = |token: &str, body: &str| a.api_as(token, "PUT", "/admin/origins", Some(body));
    assert_eq!(put(&plain, r#"{"origins":[]}"#).status, 403);
    let bad = put(&admin, r#"{"origins":["https://ok.example/path"]}"#);
    assert_eq!((bad.status, bad.code()), (400, "invalid_input".into()));
    let set = put(&admin, r#"{"origins":["https://good.example"]}"#);
    assert_eq!(set.status, 200, "{set:?}");
    assert!(set.body.contains("https://good.example"), "{set:?}");

    closed_within_a_second(&mut live, 4503, "origin no longer allowed");
    let refused = b.try_connect(&b.token("other"), None, &[evil]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "{:?}",
        refused.map(|_| "accepted")
    );
    let good = b.try_connect(
        &b.token("other"),
        None,
        &[("Origin", "https://good.example")],
    );
    assert!(good.is_ok(), "{:?}", good.err());
    let cors = b.api("GET", "/healthz", &[evil], None);
    assert_eq!(cors.status, 403);
    let listed = b.api_as(&admin, "GET", "/admin/origins", None);
    assert!(listed.body.contains("https://good.example"), "{listed:?}");
    // Kept in storage: a restarted node starts with the list, over its configuration.
    let mut p = p;
    let b = p.nodes.remove(1).restart();
    let refused = b.try_connect(&b.token("later"), None, &[evil]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "{:?}",
        refused.map(|_| "accepted")
    );
}

/// PostgreSQL cut under load (through a relay the test cuts, the database itself untouched):
/// after `breaker_failures` failures the breaker opens and account requests fail at once with
/// 503 `unavailable` and `Retry-After`; `/readyz` names storage; WebSockets keep delivering.
/// Restored, a probe closes the breaker and nothing written before is lost.
#[test]
fn a_postgresql_outage_opens_the_breaker_and_websockets_keep_delivering() {
    let (db_flags, _schema) = Db::Postgres.flags("breaker");
    let relay = Relay::start("127.0.0.1:5432");
    let mut flags: Vec<String> = db_flags
        .iter()
        .map(|f| f.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port)))
        .collect();
    flags.extend(
        [
            "--bcrypt-cost",
            "4",
            "--breaker-failures",
            "3",
            "--breaker-probe",
            "500ms",
            "--database-pool",
            "2",
            "--rate-limits.register-per-ip",
            "1000/1m",
        ]
        .map(str::to_owned),
    );
    let server = Server::start_in(ringhub_tests::scratch_dir("breaker").keep(), &flags);
    let (_, alice) = server.account("alice");
    let mut a = connect(&server, &alice);
    let mut b = connect(&server, &server.token("bob"));
    for ws in [&mut a, &mut b] {
        assert_eq!(
            call(ws, "join", "live").get("op").and_then(Value::as_str),
            Some("reply")
        );
    }

    let carol = server.token("carol");
    relay.cut();
    let mut unavailable = 0;
    for i in 0..8 {
        let answer = server.register(
            &format!("late{i}"),
            &format!("late{i}@example.com"),
            "correct horse",
        );
        assert_eq!(
            (answer.status, answer.code()),
            (503, "unavailable".into()),
            "{answer:?}"
        );
        assert!(answer.header("Retry-After").is_some());
        unavailable += 1;
    }
    assert_eq!(unavailable, 8);
    let metrics = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
    assert!(
        metrics.contains("ringhub_breaker_state{dependency=\"postgres\"} 2")
            || metrics.contains("ringhub_breaker_state{dependency=\"postgres\"} 1"),
        "{metrics}"
    );
    let (status, text) = server.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("storage"), "{text}");
    assert!(text.contains("presence_diffs"), "{text}");
    // The WebSockets do not need the database.
    let id = a.request("publish", &[("room", s("live")), ("data", s("still here"))]);
    a.expect("reply", Some(id));
    let m = b.expect("message", None);
    assert_eq!(m.get("data").and_then(Value::as_str), Some("still here"));
    // Degraded mode sheds presence diffs first: a join while the breaker is open is not told
    // (the node learns of the breaker within half a second).
    std::thread::sleep(Duration::from_millis(700));
    b.clear();
    let mut c = connect(&server, &carol);
    assert_eq!(
        call(&mut c, "join", "live")
            .get("op")
            .and_then(Value::as_str),
        Some("reply")
    );
    let id = c.request(
        "publish",
        &[("room", s("live")), ("data", s("after carol"))],
    );
    c.expect("reply", Some(id));
    let m = b.expect("message", None);
    assert_eq!(m.get("data").and_then(Value::as_str), Some("after carol"));
    b.set_timeout(Duration::from_millis(500));
    match b.recv() {
        Err(Ended::Timeout) => {}
        other => panic!("no presence diff while degraded: {other:?}"),
    }
    b.set_timeout(Duration::from_secs(5));
    assert!(
        server
            .metric_sum("ringhub_presence_degraded_total")
            .unwrap_or(0.0)
            >= 1.0,
        "carol's join counted as shed"
    );

    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answer = server.register("after", "after@example.com", "correct horse");
        if answer.status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the breaker never closed: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = server.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
    assert!(
        metrics.contains("ringhub_breaker_state{dependency=\"postgres\"} 0"),
        "{metrics}"
    );
    // What was written before the outage is there.
    let body = r#"{"email":"alice@example.com","password":"correct horse"}"#;
    assert_eq!(server.api("POST", "/login", &[], Some(body)).status, 200);
    let id = b.request("ping", &[]);
    b.expect("pong", Some(id));
}

/// Two nodes, their own Redis, PostgreSQL behind a relay: the sessions of the outage.
struct Outage {
    nodes: Vec<Server>,
    redis: OwnRedis,
    relay: Relay,
    _schema: Option<Schema>,
}

fn outage(name: &str) -> Outage {
    let (db_flags, schema) = Db::Postgres.flags(name);
    let relay = Relay::start("127.0.0.1:5432");
    let redis = OwnRedis::start();
    let db_flags: Vec<String> = db_flags
        .iter()
        .map(|f| f.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port)))
        .collect();
    let mut flags: Vec<&str> = db_flags.iter().map(String::as_str).collect();
    flags.extend([
        "--bcrypt-cost",
        "4",
        "--breaker-failures",
        "3",
        "--breaker-probe",
        "500ms",
        "--database-pool",
        "2",
        "--rate-limits.register-per-ip",
        "1000/1m",
        "--rate-limits.login-per-ip",
        "1000/1m",
    ]);
    let nodes = start_nodes(name, 2, &redis.url(), &flags);
    Outage {
        nodes,
        redis,
        relay,
        _schema: schema,
    }
}

fn login_answer(server: &Server, email: &str, password: &str) -> ringhub_tests::Answer {
    let body = format!(r#"{{"email":"{email}","password":"{password}"}}"#);
    server.api("POST", "/login", &[UA], Some(&body))
}

fn refresh_answer(server: &Server, refresh: &str) -> ringhub_tests::Answer {
    let body = format!(r#"{{"refresh_token":"{refresh}"}}"#);
    server.api("POST", "/refresh", &[UA], Some(&body))
}

/// Every key of `redis` outside the rooms' keys, with its value as text (lossy).
fn readable_outside_rooms(redis: &OwnRedis) -> String {
    let mut out = String::new();
    for key in redis
        .cli(&["--scan"])
        .lines()
        .filter(|k| !k.contains("{r:"))
    {
        let value = match redis.cli(&["TYPE", key]).trim() {
            "hash" => redis.cli(&["HGETALL", key]),
            "string" => redis.cli(&["GET", key]),
            "zset" => redis.cli(&["ZRANGE", key, "0", "-1"]),
            "set" => redis.cli(&["SMEMBERS", key]),
            "list" => redis.cli(&["LRANGE", key, "0", "-1"]),
            "stream" => redis.cli(&["XRANGE", key, "-", "+"]),
            other => format!("<{other}>"),
        };
        out.push_str(key);
        out.push_str(" = ");
        out.push_str(&value);
        out.push('\n');
    }
    out
}

/// Waits until the node's PostgreSQL breaker is closed again.
fn breaker_closed(node: &Server) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let metrics = node.http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").1;
        if metrics.contains("ringhub_breaker_state{dependency=\"postgres\"} 0") {
            // A probe that succeeded: the next call goes through.
            return;
        }
        assert!(Instant::now() < deadline, "the breaker never closed");
        // Something must call the database for the probe to happen.
        let _ = node.api(
            "POST",
            "/login",
            &[UA],
            Some(r#"{"email":"probe@example.com","password":"correct horse"}"#),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The live sessions of `token`'s user, as PostgreSQL has them (`GET /sessions`).
fn session_count(server: &Server, token: &str) -> Option<usize> {
    let answer = server.api_as(token, "GET", "/sessions", None);
    (answer.status == 200).then(|| match answer.json().get("sessions") {
        Some(Value::Array(list)) => list.len(),
        _ => 0,
    })
}

/// PostgreSQL cut under a login and WebSocket load, two nodes: logins of cached accounts succeed
/// on both nodes (their sessions held in Redis), refresh works for them, registration and
/// unknown e-mails answer 503, wrong passwords 401, WebSockets keep delivering across nodes;
/// nothing in Redis is readable; after the relay is restored every session created meanwhile
/// is in PostgreSQL exactly once and its latest refresh token works there.
#[test]
fn during_a_postgresql_outage_cached_accounts_log_in_and_their_sessions_are_written_back() {
    let Outage {
        nodes,
        redis,
        relay,
        _schema,
    } = outage("heldsessions");
    let (a, b) = (&nodes[0], &nodes[1]);
    let names: Vec<String> = (0..4).map(|i| format!("cached{i}")).collect();
    let mut before = Vec::new();
    for name in &names {
        let email = format!("{name}@example.com");
        assert_eq!(a.register(name, &email, "correct horse").status, 201);
        // One session each before the outage, made on the other node (cached there too).
        let answer = login_answer(b, &email, "correct horse");
        assert_eq!(answer.status, 200, "{answer:?}");
        before.push(answer.str_at("access_token"));
    }
    let mut on_a = connect(a, &before[0]);
    let mut on_b = connect(b, &before[1]);
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            call(ws, "join", "live").get("op").and_then(Value::as_str),
            Some("reply")
        );
    }

    relay.cut();
    // Each account logs in twice during the outage, alternating nodes.
    let mut outage_tokens = Vec::new();
    for round in 0..2 {
        for (i, name) in names.iter().enumerate() {
            let node = &nodes[(i + round) % 2];
            let answer = login_answer(node, &format!("{name}@example.com"), "correct horse");
            assert_eq!(
                answer.status, 200,
                "login of {name} from the cache: {answer:?}"
            );
            assert_eq!(answer.str_at("user.username"), *name);
            assert_eq!(answer.str_at("user.email"), format!("{name}@example.com"));
            outage_tokens.push((
                i,
                answer.str_at("access_token"),
                answer.str_at("refresh_token"),
            ));
        }
    }
    let wrong = login_answer(a, "cached0@example.com", "wrong horse");
    assert_eq!(
        (wrong.status, wrong.code()),
        (401, "invalid_credentials".into())
    );
    let unknown = login_answer(b, "nobody@example.com", "correct horse");
    assert_eq!(
        (unknown.status, unknown.code()),
        (503, "unavailable".into())
    );
    let late = a.register("late", "late@example.com", "correct horse");
    assert_eq!((late.status, late.code()), (503, "unavailable".into()));
    assert!(late.header("Retry-After").is_some());
    // Refresh of a held session, on the node that did not create it. The rotated token again
    // is not accepted: 503, as nothing can tell it from a token only the database knows.
    let (_, _, first_refresh) = &outage_tokens[1];
    let refreshed = refresh_answer(a, first_refresh);
    assert_eq!(refreshed.status, 200, "{refreshed:?}");
    let latest_refresh = refreshed.str_at("refresh_token");
    let again = refresh_answer(b, first_refresh);
    assert_eq!((again.status, again.code()), (503, "unavailable".into()));
    // A token of the outage opens a WebSocket that joins and hears the other node.
    let mut fresh = connect(b, &outage_tokens[2].1);
    assert_eq!(
        call(&mut fresh, "join", "live")
            .get("op")
            .and_then(Value::as_str),
        Some("reply")
    );
    let id = on_a.request("publish", &[("room", s("live")), ("data", s("during"))]);
    on_a.expect("reply", Some(id));
    for ws in [&mut on_b, &mut fresh] {
        let m = ws.expect("message", None);
        assert_eq!(m.get("data").and_then(Value::as_str), Some("during"));
    }
    let hits: f64 = nodes
        .iter()
        .map(|n| n.metric_sum("ringhub_cache_hits_total").unwrap_or(0.0))
        .sum();
    assert!(
        hits >= 9.0,
        "8 logins and 1 wrong password from the cache: {hits}"
    );
    // Nothing of the accounts readable in Redis: no e-mail, username, password hash or user
    // agent in any key or value outside the rooms' own keys (a room's presence names and
    // messages are the room's content, shown to its members; docs/security.md).
    let accounts_side = readable_outside_rooms(&redis);
    assert!(
        accounts_side.contains("{uc:") && accounts_side.contains("{held}"),
        "the cache and the held sessions are there: {accounts_side}"
    );
    for needle in [
        "cached0",
        "cached3",
        "example.com",
        "$2b$",
        "correct horse",
        "ringhub-tests",
    ] {
        assert!(
            !accounts_side.contains(needle),
            "`{needle}` readable in redis: {accounts_side}"
        );
    }

    relay.restore();
    // Every node writes back every 2 s once the breaker closed: 1 + 2 sessions per account.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts: Vec<Option<usize>> =
            before.iter().map(|token| session_count(a, token)).collect();
        if counts.iter().all(|c| *c == Some(3)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions in postgresql after the outage: {counts:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let held = redis.cli(&["--scan", "--pattern", "*{held}*"]);
    let key = held.trim();
    if !key.is_empty() {
        assert_eq!(redis.cli(&["HLEN", key]).trim(), "0", "held: {key}");
    }
    // The latest token of the session refreshed during the outage works from PostgreSQL; its
    // outage access tokens work on both nodes (each node's breaker closes on its own probe).
    breaker_closed(a);
    breaker_closed(b);
    let answer = refresh_answer(b, &latest_refresh);
    assert_eq!(answer.status, 200, "{answer:?}");
    let again = refresh_answer(a, first_refresh);
    assert_eq!((again.status, again.code()), (401, "invalid_token".into()));
    for (i, access, _) in &outage_tokens {
        let me = nodes[i % 2].api_as(access, "GET", "/me", None);
        assert_eq!(me.status, 200, "{me:?}");
    }
    // Still counted once each (two nodes wrote back), as the other node sees them.
    for token in &before {
        assert_eq!(session_count(b, token), Some(3));
    }
}

/// A password change drops the cached account first: during a later outage the old password
/// is refused and the new one (cached by a login after the change) works; with Redis down the
/// change itself is refused (503) rather than leaving an old hash in the cache.
#[test]
fn a_password_change_never_leaves_the_old_password_in_the_cache() {
    let Outage {
        nodes,
        mut redis,
        relay,
        _schema,
    } = outage("cachedpassword");
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(
        a.register("changer", "changer@example.com", "correct horse")
            .status,
        201
    );
    let token = login_answer(a, "changer@example.com", "correct horse").str_at("access_token");
    let change = r#"{"current_password":"correct horse","new_password":"battery staple"}"#;
    let answer = b.api_as(&token, "POST", "/password", Some(change));
    assert_eq!(answer.status, 204, "{answer:?}");
    relay.cut();
    let old = login_answer(a, "changer@example.com", "correct horse");
    assert_eq!(
        (old.status, old.code()),
        (503, "unavailable".into()),
        "no entry: {old:?}"
    );
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(15);
    while login_answer(b, "changer@example.com", "battery staple").status != 200 {
        assert!(Instant::now() < deadline, "the breaker never closed");
        std::thread::sleep(Duration::from_millis(200));
    }
    relay.cut();
    let old = login_answer(a, "changer@example.com", "correct horse");
    assert_eq!(
        (old.status, old.code()),
        (401, "invalid_credentials".into())
    );
    let new = login_answer(a, "changer@example.com", "battery staple");
    assert_eq!(new.status, 200, "{new:?}");
    relay.restore();
    breaker_closed(a);

    redis.stop();
    eventually_down(a);
    let back = r#"{"current_password":"battery staple","new_password":"correct horse"}"#;
    let refused = a.api_as(&new.str_at("access_token"), "POST", "/password", Some(back));
    assert_eq!(
        (refused.status, refused.code()),
        (503, "unavailable".into())
    );
    assert!(refused.body.contains("redis"), "{refused:?}");
    assert!(refused.header("Retry-After").is_some());
    // Nothing changed: the password is still the new one (asked of B once its own breaker,
    // which its write-back may have opened during the second cut, is closed again).
    redis.restart();
    breaker_closed(b);
    let still = login_answer(b, "changer@example.com", "battery staple");
    assert_eq!(still.status, 200, "{still:?}");
}

/// What the durable side holds for `tokens`' users: live sessions per user and live revocations.
fn durable_counts(node: &Server, users: &[String]) -> (Vec<usize>, usize) {
    let store = node.open_store();
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let sessions = users
        .iter()
        .map(|u| store.live_sessions(u, now).unwrap().len())
        .collect();
    (sessions, store.live_revocations(now).unwrap().len())
}

/// Chaos: Redis killed while two nodes validate tokens under load (a thread per node asks
/// `GET /me` with a revoked token and a live one as fast as it can, 4 s bound). Tried: a
/// revocation before the kill, one made on A while Redis is dead, a login-per-IP burst while it
/// is dead, Redis back empty. Holds: no revoked token is ever accepted on either node, a live
/// one always is, the revocation made during the outage reaches B within 1.5 s, the limit falls
/// back to each node's own counter (never "no limit"), recovery is automatic; and nothing was
/// lost: accounts, sessions and revocations counted before and after.
#[test]
fn redis_killed_during_token_validation_loses_nothing_and_accepts_no_revoked_token() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut redis = OwnRedis::start();
    let p = pair_on("chaosval", &redis.url());
    let (a, b) = (&p.nodes[0], &p.nodes[1]);
    let mut users = Vec::new();
    let mut tokens = Vec::new();
    for name in ["val0", "val1", "val2"] {
        let (id, token) = a.account(name);
        users.push(id);
        tokens.push(token);
    }
    let revoked_before = tokens[0].clone();
    assert_eq!(
        a.api_as(&revoked_before, "POST", "/logout", None).status,
        204
    );
    let (sessions_before, revocations_before) = durable_counts(a, &users);
    assert_eq!(sessions_before, vec![0, 1, 1]);

    let stop = Arc::new(AtomicBool::new(false));
    let accepted_revoked = Arc::new(AtomicU64::new(0));
    let refused_live = Arc::new(AtomicU64::new(0));
    let asked = Arc::new(AtomicU64::new(0));
    let hammers: Vec<_> = [a.port, b.port]
        .into_iter()
        .map(|port| {
            let (stop, bad, lost, asked) = (
                stop.clone(),
                accepted_revoked.clone(),
                refused_live.clone(),
                asked.clone(),
            );
            let (revoked, live) = (revoked_before.clone(), tokens[2].clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(4);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if ringhub_tests::status_of(port, "GET", "/me", &revoked) == 200 {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                    if ringhub_tests::status_of(port, "GET", "/me", &live) != 200 {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                    asked.fetch_add(2, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    redis.stop();
    eventually_down(b);
    // A revocation made while Redis is dead reaches B through the database.
    assert_eq!(a.api_as(&tokens[1], "POST", "/logout", None).status, 204);
    refused_within(b, &tokens[1], Duration::from_millis(1500));
    // The login limits (per address, per account) fall back to each node's own counters: never
    // "no limit".
    let limited = (0..40)
        .map(|_| login_answer(b, "val2@example.com", "wrong horse").status)
        .filter(|s| *s == 429)
        .count();
    assert!(limited > 0, "login_per_ip still counted on the node");
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while [a, b]
        .iter()
        .any(|n| n.http("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").0 != 200)
    {
        assert!(Instant::now() < deadline, "no automatic recovery");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for h in hammers {
        h.join().unwrap();
    }
    assert!(asked.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(
        accepted_revoked.load(Ordering::Relaxed),
        0,
        "a revoked token was accepted"
    );
    assert_eq!(
        refused_live.load(Ordering::Relaxed),
        0,
        "a live token was refused"
    );
    // After recovery: the revoked tokens stay refused on both nodes, the live one works.
    for node in [a, b] {
        for token in [&tokens[0], &tokens[1]] {
            assert_eq!(node.api_as(token, "GET", "/me", None).status, 401);
        }
        assert_eq!(node.api_as(&tokens[2], "GET", "/me", None).status, 200);
    }
    let (sessions_after, revocations_after) = durable_counts(b, &users);
    assert_eq!(
        sessions_after,
        vec![0, 0, 1],
        "only the logout's session ended"
    );
    assert_eq!(
        revocations_after,
        revocations_before + 1,
        "one revocation more, none lost"
    );
    for name in ["val0", "val1", "val2"] {
        let login = login_answer(a, &format!("{name}@example.com"), "correct horse");
        assert_eq!(login.status, 200, "account {name} kept: {login:?}");
    }
}

/// `node` refuses `token` on HTTP within `within` (asked every 20 ms).
fn refused_within(node: &Server, token: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while node.api_as(token, "GET", "/me", None).status != 401 {
        assert!(Instant::now() < deadline, "not refused within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
