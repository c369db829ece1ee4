//! Rooms with permissions (SPEC §5 and the rooms routes of §2) through the real binary: the whole
//! matrix with five real users over WebSocket and HTTP for all four levels, kicks on removal and
//! deletion, and `max_members` under a concurrent join race across shards — on the embedded
//! default and on PostgreSQL.

use std::time::{Duration, Instant};

use protocol::envelope::Value;
use ringhub_tests::{Client, Db, Fixture, Server, n, s};

fn start(db: Db, name: &str, extra: &[&str]) -> Fixture {
    let mut flags = vec![
        "--bcrypt-cost",
        "4",
        "--shards",
        "2",
        "--default-rooms",
        "",
        "--rate-limits.register-per-ip",
        "0/1s",
        "--rate-limits.login-per-ip",
        "0/1s",
    ];
    flags.extend(extra);
    db.start(name, &flags)
}

ringhub_tests::on_both!(
    permission_matrix_for_five_users_and_four_levels,
    removal_and_deletion_kick_and_stop_delivery,
    max_members_holds_under_a_join_race_across_shards,
    a_demoted_admin_is_kicked_from_rooms_only_the_role_opened,
);

struct User {
    name: &'static str,
    id: String,
    token: String,
}

fn code_of(v: &Value) -> &str {
    v.get("code").and_then(Value::as_str).unwrap_or("")
}

/// Sends `op` and returns `Ok(reply)` or `Err(error code)`.
fn call(client: &mut Client, op: &str, fields: &[(&str, Value)]) -> Result<Value, String> {
    let id = client.request(op, fields);
    loop {
        let v = client
            .recv()
            .unwrap_or_else(|e| panic!("{op}: connection ended: {e:?}"));
        if v.get("id").and_then(Value::as_u64) != Some(id) {
            continue;
        }
        return match v.get("op").and_then(Value::as_str) {
            Some("error") => Err(code_of(&v).to_owned()),
            _ => Ok(v),
        };
    }
}

fn users(server: &Server) -> Vec<User> {
    let users: Vec<User> = ["owner", "moder", "member", "stranger", "admin"]
        .into_iter()
        .map(|name| {
            let (id, token) = server.account(name);
            User { name, id, token }
        })
        .collect();
    let granted = server.cli(&["user", "set-role", "admin@example.com", "admin"]);
    assert_eq!(granted.code, 0, "{granted:?}");
    users
}

/// Waits until the server has reloaded its admins (it does every 2 s).
fn wait_for_admin(server: &Server, owner: &User, admin: &User) {
    let body = r#"{"id":"admin-probe","permission":"owner_only"}"#;
    assert_eq!(
        server
            .api_as(&owner.token, "POST", "/rooms", Some(body))
            .status,
        201
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server
        .api_as(&admin.token, "GET", "/rooms/admin-probe", None)
        .status
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the admin role never took effect"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Losing the admin role (`ringhub user set-role ... user`, picked up by the periodic reload)
/// takes a live connection out of the rooms only the role let it into: a private room it is not a
/// member of and another user's personal room. A public room stays.
fn a_demoted_admin_is_kicked_from_rooms_only_the_role_opened(db: Db) {
    let f = start(db, "rooms-demote", &[]);
    let server = &f.server;
    let all = users(server);
    let (owner, admin) = (&all[0], &all[4]);
    wait_for_admin(server, owner, admin);
    let body = r#"{"id":"vault","permission":"private"}"#;
    assert_eq!(
        server
            .api_as(&owner.token, "POST", "/rooms", Some(body))
            .status,
        201
    );
    // The owner is online, so that their personal room exists.
    let _owner_ws = server.connect_bound(&owner.token);
    let personal = format!("user:{}", owner.id);
    let mut ws = server.connect_bound(&admin.token);
    for room in ["vault", personal.as_str(), "square"] {
        call(&mut ws, "join", &[("room", s(room))]).unwrap();
    }
    let demoted = server.cli(&["user", "set-role", "admin@example.com", "user"]);
    assert_eq!(demoted.code, 0, "{demoted:?}");
    let mut kicked: Vec<String> = (0..2)
        .map(|_| {
            let v = ws.expect("kicked", None);
            assert_eq!(
                v.get("reason").and_then(Value::as_str),
                Some("permission_changed")
            );
            v.get("room").and_then(Value::as_str).unwrap().to_owned()
        })
        .collect();
    kicked.sort();
    let mut expected = vec!["vault".to_owned(), personal];
    expected.sort();
    assert_eq!(kicked, expected);
    // Still in the public room; no longer in the others.
    call(
        &mut ws,
        "publish",
        &[("room", s("square")), ("data", s("hi"))],
    )
    .unwrap();
    assert_eq!(
        call(
            &mut ws,
            "publish",
            &[("room", s("vault")), ("data", s("hi"))]
        ),
        Err("not_joined".to_owned())
    );
}

fn permission_matrix_for_five_users_and_four_levels(db: Db) {
    let f = start(db, "rooms-matrix", &[]);
    let server = &f.server;
    let all = users(server);
    let [owner, moder, member, stranger, admin] = [&all[0], &all[1], &all[2], &all[3], &all[4]];
    wait_for_admin(server, owner, admin);

    // (permission, [read, publish] for owner, moder, member, stranger, admin; moderators manage members)
    type Row = (&'static str, [(bool, bool); 5], bool);
    let table: [Row; 4] = [
        ("public", [(true, true); 5], false),
        (
            "restricted",
            [
                (true, true),
                (true, true),
                (true, true),
                (true, false),
                (true, true),
            ],
            true,
        ),
        (
            "private",
            [
                (true, true),
                (true, true),
                (true, true),
                (false, false),
                (true, true),
            ],
            true,
        ),
        (
            "owner_only",
            [
                (true, true),
                (false, false),
                (false, false),
                (false, false),
                (true, true),
            ],
            false,
        ),
    ];
    for (permission, expected, moderators_manage) in table {
        let room = format!("m-{permission}");
        let body = format!(r#"{{"id":"{room}","permission":"{permission}","max_members":50}}"#);
        let created = server.api_as(&owner.token, "POST", "/rooms", Some(&body));
        assert_eq!(created.status, 201, "{created:?}");
        assert_eq!(created.str_at("room.owner"), owner.id);
        assert_eq!(created.str_at("room.permission"), permission);
        let again = server.api_as(&stranger.token, "POST", "/rooms", Some(&body));
        assert_eq!((again.status, again.code()), (409, "room_exists".into()));
        let put = |who: &User, target: &User, role: &str| {
            server
                .api_as(
                    &who.token,
                    "PUT",
                    &format!("/rooms/{room}/members/{}", target.id),
                    Some(&format!(r#"{{"role":"{role}"}}"#)),
                )
                .status
        };
        let del = |who: &User, target: &User| {
            server
                .api_as(
                    &who.token,
                    "DELETE",
                    &format!("/rooms/{room}/members/{}", target.id),
                    None,
                )
                .status
        };
        // Only the owner appoints moderators.
        assert_eq!(put(moder, member, "moderator"), 403, "{permission}");
        assert_eq!(put(stranger, stranger, "member"), 403, "{permission}");
        assert_eq!(put(owner, moder, "moderator"), 204, "{permission}");
        assert_eq!(put(moder, moder, "moderator"), 403, "{permission}");
        // Moderators manage plain members in restricted and private rooms only.
        let by_moderator = put(moder, member, "member");
        assert_eq!(
            by_moderator == 204,
            moderators_manage,
            "{permission}: {by_moderator}"
        );
        if by_moderator != 204 {
            assert_eq!(by_moderator, 403);
            assert_eq!(put(owner, member, "member"), 204);
        }
        assert_ne!(
            del(moder, moder),
            204,
            "a moderator cannot remove a moderator"
        );
        assert_eq!(put(member, stranger, "member"), 403, "{permission}");

        for (user, (read, publish)) in all.iter().zip(expected) {
            let who = format!("{permission}/{}", user.name);
            let get = server.api_as(&user.token, "GET", &format!("/rooms/{room}"), None);
            assert_eq!(get.status, if read { 200 } else { 403 }, "{who}: {get:?}");
            let presence =
                server.api_as(&user.token, "GET", &format!("/rooms/{room}/presence"), None);
            assert_eq!(presence.status, if read { 200 } else { 403 }, "{who}");
            let posted = server.api_as(
                &user.token,
                "POST",
                &format!("/rooms/{room}/messages"),
                Some(&format!(
                    r#"{{"data":{{"via":"http","who":"{}"}}}}"#,
                    user.name
                )),
            );
            assert_eq!(
                posted.status,
                if publish { 202 } else { 403 },
                "{who}: {posted:?}"
            );
            let mut ws = server.connect_bound(&user.token);
            let history = call(&mut ws, "history", &[("room", s(&room)), ("since", n(0))]);
            assert_eq!(history.is_ok(), read, "{who}: history {history:?}");
            let joined = call(&mut ws, "join", &[("room", s(&room))]);
            match joined {
                Ok(reply) => {
                    assert!(read, "{who} joined");
                    assert!(reply.get("seq").is_some());
                }
                Err(code) => {
                    assert!(!read, "{who}: {code}");
                    assert_eq!(code, "forbidden", "{who}");
                    continue;
                }
            }
            let published = call(
                &mut ws,
                "publish",
                &[("room", s(&room)), ("data", s("via ws"))],
            );
            match published {
                Ok(_) => assert!(publish, "{who} published"),
                Err(code) => {
                    assert!(!publish, "{who}: {code}");
                    assert_eq!(code, "forbidden", "{who}");
                }
            }
            let presence = call(&mut ws, "presence", &[("room", s(&room))]);
            assert!(presence.is_ok(), "{who}");
        }
        // Settings: owner and admin only.
        let patch = |who: &User| {
            server
                .api_as(
                    &who.token,
                    "PATCH",
                    &format!("/rooms/{room}"),
                    Some(r#"{"max_members":40}"#),
                )
                .status
        };
        assert_eq!(patch(moder), 403, "{permission}");
        assert_eq!(patch(member), 403, "{permission}");
        let stranger_patch = patch(stranger);
        assert!(stranger_patch == 403, "{permission}: {stranger_patch}");
        assert_eq!(patch(owner), 200, "{permission}");
        assert_eq!(patch(admin), 200, "{permission}");
        let deleted = server.api_as(&moder.token, "DELETE", &format!("/rooms/{room}"), None);
        assert_eq!(deleted.status, 403);
    }
    // Bad input: exact codes, then the server still serves.
    let bad = server.api_as(
        &owner.token,
        "POST",
        "/rooms",
        Some(r#"{"id":"user:x","permission":"public"}"#),
    );
    assert_eq!((bad.status, bad.str_at("error.field")), (400, "id".into()));
    let bad = server.api_as(
        &owner.token,
        "POST",
        "/rooms",
        Some(r#"{"id":"ok","permission":"secret"}"#),
    );
    assert_eq!(
        (bad.status, bad.str_at("error.field")),
        (400, "permission".into())
    );
    let bad = server.api_as(
        &owner.token,
        "POST",
        "/rooms",
        Some(r#"{"id":"ok","permission":"public","max_members":0}"#),
    );
    assert_eq!(
        (bad.status, bad.str_at("error.field")),
        (400, "max_members".into())
    );
    assert_eq!(
        server
            .api_as(&owner.token, "GET", "/rooms/nope", None)
            .status,
        404
    );
    assert_eq!(server.api("GET", "/rooms/m-public", &[], None).status, 401);
    // Personal rooms: the owner and admins push to them over HTTP; others may not.
    let mut inbox = server.connect_bound(&member.token);
    let personal = format!("/rooms/user:{}/messages", member.id);
    let body = Some(r#"{"data":"hello"}"#);
    assert_eq!(
        server
            .api_as(&stranger.token, "POST", &personal, body)
            .status,
        403
    );
    assert_eq!(
        server.api_as(&admin.token, "POST", &personal, body).status,
        202
    );
    let m = inbox.expect("message", None);
    assert_eq!(
        m.get("from").and_then(Value::as_str),
        Some(admin.id.as_str())
    );
    // Admins may join another user's personal room (while it is live); others may not.
    let personal_room = format!("user:{}", member.id);
    let mut admin_ws = server.connect_bound(&admin.token);
    call(&mut admin_ws, "join", &[("room", s(&personal_room))]).unwrap();
    let mut stranger_ws = server.connect_bound(&stranger.token);
    let refused = call(&mut stranger_ws, "join", &[("room", s(&personal_room))]);
    assert_eq!(refused.unwrap_err(), "forbidden");
    // Authentication comes before any check of the body.
    let unauth = server.api("POST", "/rooms", &[], Some("{not json"));
    assert_eq!(
        (unauth.status, unauth.code()),
        (401, "invalid_token".into())
    );
    // Removal from a public room kicks too (SPEC §2), though they may join again.
    let mut member_ws = server.connect_bound(&member.token);
    call(&mut member_ws, "join", &[("room", s("m-public"))]).unwrap();
    let removed = server.api_as(
        &owner.token,
        "DELETE",
        &format!("/rooms/m-public/members/{}", member.id),
        None,
    );
    assert_eq!(removed.status, 204);
    let kicked = member_ws.expect("kicked", None);
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("removed")
    );
    call(&mut member_ws, "join", &[("room", s("m-public"))]).unwrap();
    // Persistent rooms survive a restart.
    let Fixture {
        server,
        schema: _schema,
    } = f;
    let server = server.restart();
    let get = server.api_as(&owner.token, "GET", "/rooms/m-private", None);
    assert_eq!(get.status, 200, "{get:?}");
    assert_eq!(
        server
            .api_as(&stranger.token, "GET", "/rooms/m-private", None)
            .status,
        403
    );
}

fn removal_and_deletion_kick_and_stop_delivery(db: Db) {
    let f = start(db, "rooms-kick", &[]);
    let server = &f.server;
    let (_, owner) = server.account("olga");
    let (member_id, member) = server.account("mike");
    let body = r#"{"id":"club","permission":"private"}"#;
    assert_eq!(
        server.api_as(&owner, "POST", "/rooms", Some(body)).status,
        201
    );
    let put = server.api_as(
        &owner,
        "PUT",
        &format!("/rooms/club/members/{member_id}"),
        Some(r#"{"role":"member"}"#),
    );
    assert_eq!(put.status, 204);
    let mut owner_ws = server.connect_bound(&owner);
    let mut member_ws = server.connect_bound(&member);
    call(&mut owner_ws, "join", &[("room", s("club"))]).unwrap();
    call(&mut member_ws, "join", &[("room", s("club"))]).unwrap();
    call(
        &mut owner_ws,
        "publish",
        &[("room", s("club")), ("data", s("one"))],
    )
    .unwrap();
    member_ws.expect("message", None);
    let removed = server.api_as(
        &owner,
        "DELETE",
        &format!("/rooms/club/members/{member_id}"),
        None,
    );
    assert_eq!(removed.status, 204);
    // The kick arrived before the HTTP answer; nothing published afterwards reaches them.
    let kicked = member_ws.expect("kicked", None);
    assert_eq!(kicked.get("room").and_then(Value::as_str), Some("club"));
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("removed")
    );
    call(
        &mut owner_ws,
        "publish",
        &[("room", s("club")), ("data", s("two"))],
    )
    .unwrap();
    let posted = server.api_as(
        &owner,
        "POST",
        "/rooms/club/messages",
        Some(r#"{"data":"three"}"#),
    );
    assert_eq!(posted.status, 202);
    call(&mut member_ws, "ping", &[]).unwrap();
    member_ws.set_timeout(Duration::from_millis(300));
    assert!(member_ws.recv().is_err(), "nothing more from the room");
    member_ws.set_timeout(Duration::from_secs(5));
    let publish = call(
        &mut member_ws,
        "publish",
        &[("room", s("club")), ("data", s("x"))],
    );
    assert_eq!(publish.unwrap_err(), "not_joined");
    assert_eq!(
        call(&mut member_ws, "join", &[("room", s("club"))]).unwrap_err(),
        "forbidden"
    );

    // A permission change applies to members online at once: readers lose the publish right
    // (and stay), those who may no longer read are kicked.
    let stage = r#"{"id":"stage","permission":"public"}"#;
    assert_eq!(
        server.api_as(&owner, "POST", "/rooms", Some(stage)).status,
        201
    );
    call(&mut member_ws, "join", &[("room", s("stage"))]).unwrap();
    call(
        &mut member_ws,
        "publish",
        &[("room", s("stage")), ("data", s("hi"))],
    )
    .unwrap();
    let patch = |permission: &str| {
        server
            .api_as(
                &owner,
                "PATCH",
                "/rooms/stage",
                Some(&format!(r#"{{"permission":"{permission}"}}"#)),
            )
            .status
    };
    assert_eq!(patch("restricted"), 200);
    let refused = call(
        &mut member_ws,
        "publish",
        &[("room", s("stage")), ("data", s("hi"))],
    );
    assert_eq!(refused.unwrap_err(), "forbidden");
    call(
        &mut member_ws,
        "history",
        &[("room", s("stage")), ("since", n(0))],
    )
    .unwrap();
    assert_eq!(patch("private"), 200);
    let kicked = member_ws.expect("kicked", None);
    assert_eq!(kicked.get("room").and_then(Value::as_str), Some("stage"));
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("permission_changed")
    );

    // Deletion kicks every member, the owner included, and forgets the room.
    let gone = server.api_as(&owner, "DELETE", "/rooms/club", None);
    assert_eq!(gone.status, 204);
    let kicked = owner_ws.expect("kicked", None);
    assert_eq!(
        kicked.get("reason").and_then(Value::as_str),
        Some("room_deleted")
    );
    assert_eq!(
        server.api_as(&owner, "GET", "/rooms/club", None).status,
        404
    );
    let again = server.api_as(&owner, "POST", "/rooms", Some(body));
    assert_eq!(again.status, 201, "the id is free again");

    // Room changes are budgeted per user (each one makes every shard look at its connections).
    let limited = (0..200)
        .map(|i| {
            server.api_as(
                &owner,
                "PATCH",
                "/rooms/club",
                Some(&format!(r#"{{"max_members":{}}}"#, 100 + i)),
            )
        })
        .find(|a| a.status != 200)
        .expect("the budget ends");
    assert_eq!(
        (limited.status, limited.code()),
        (429, "rate_limited".into())
    );
    assert!(limited.header("Retry-After").is_some());
    assert_eq!(
        server.api_as(&owner, "GET", "/rooms/club", None).status,
        200
    );
}

fn max_members_holds_under_a_join_race_across_shards(db: Db) {
    let f = start(db, "rooms-race", &["--max-connections-per-user", "100"]);
    let server = &f.server;
    let (_, owner) = server.account("rita");
    let body = r#"{"id":"tiny","permission":"public","max_members":10}"#;
    assert_eq!(
        server.api_as(&owner, "POST", "/rooms", Some(body)).status,
        201
    );
    let (_, racer) = server.account("racer");
    let mut clients: Vec<Client> = (0..40).map(|_| server.connect_bound(&racer)).collect();
    // Every join goes out before any answer is read.
    let ids: Vec<u64> = clients
        .iter_mut()
        .map(|c| c.request("join", &[("room", s("tiny"))]))
        .collect();
    let mut joined = 0;
    let mut full = 0;
    for (c, id) in clients.iter_mut().zip(ids) {
        loop {
            let v = c.recv().expect("answer");
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            match v.get("op").and_then(Value::as_str) {
                Some("reply") => joined += 1,
                _ => {
                    assert_eq!(code_of(&v), "room_full");
                    full += 1;
                }
            }
            break;
        }
    }
    assert_eq!((joined, full), (10, 30));
    let metrics = server.api("GET", "/metrics", &[], None);
    assert!(
        metrics.body.contains("ringhub_room_full_total 30"),
        "room_full counted"
    );
    let room = server.api_as(&owner, "GET", "/rooms/tiny", None);
    assert_eq!(
        room.json()
            .get("room")
            .and_then(|r| r.get("members_online"))
            .and_then(Value::as_u64),
        Some(1)
    );
}
