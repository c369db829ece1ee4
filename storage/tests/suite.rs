//! The storage contract, checked against both backends: every body below runs once on SQLite (a
//! fresh temporary directory) and once on PostgreSQL (a fresh schema of the database at
//! `RINGHUB_TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`). The
//! PostgreSQL half fails, never skips, when the server cannot be reached.
// The bodies are plain functions called by the generated `#[test]`s, which clippy's
// `allow-unwrap-in-tests` does not see as tests.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{SystemTime, UNIX_EPOCH};

use storage::migrations;
use storage::postgres::{PgStore, drop_schema, scratch_schema_url};
use storage::{
    Backend, IDEMPOTENCY_TTL_MS, Idempotency, IdempotencyRecord, MemberRole, Permission,
    Revocation, RevocationKind, Role, RoomRecord, RoomUpdate, Rooms, Rotation, SessionRecord,
    Sessions, Store, StoreError, UserRecord, Users,
};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn database_url() -> String {
    std::env::var("RINGHUB_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.into())
}

/// `<prefix>_<pid>_<counter>_<nanos>`: unique across the tests of this run and across runs.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Where one test's data lives; removed on drop, also when the test fails.
enum Env {
    Sqlite {
        dir: PathBuf,
    },
    Postgres {
        base: String,
        schema: String,
        url: String,
    },
}

impl Env {
    fn sqlite() -> Self {
        Self::Sqlite {
            dir: std::env::temp_dir().join(unique("ringhub_st")),
        }
    }

    fn postgres() -> Self {
        let base = database_url();
        let schema = unique("st");
        let url = scratch_schema_url(&base, &schema).unwrap_or_else(|e| {
            panic!("PostgreSQL must be reachable at {base} (RINGHUB_TEST_DATABASE_URL): {e}")
        });
        Self::Postgres { base, schema, url }
    }

    /// Opens (and migrates) a store through the public `open`. PostgreSQL gets a read pool on
    /// the same schema, so that both pools are exercised.
    fn open(&self) -> Arc<dyn Store> {
        let backend = match self {
            Self::Sqlite { dir } => Backend::Sqlite { dir },
            Self::Postgres { url, .. } => Backend::Postgres {
                url,
                read_url: Some(url),
                pool: 2,
                breaker: storage::BreakerSettings::default(),
                ca_file: None,
            },
        };
        storage::open(&backend).unwrap()
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        match self {
            Self::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Self::Postgres { base, schema, .. } => {
                let _ = drop_schema(base, schema);
            }
        }
    }
}

/// Generates `sqlite::<name>` and `postgres::<name>` for each body `fn <name>(&Env)`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(&super::Env::sqlite()); } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(&super::Env::postgres()); } )*
        }
    };
}

both!(
    open_reports_kind_and_schema_version,
    migrations_twice_are_idempotent,
    concurrent_opens_migrate_once,
    version_1_database_is_upgraded,
    users_create_lookup_and_conflicts,
    username_conflict_ignores_ascii_case,
    soft_delete_frees_email_and_username,
    set_password_and_role,
    session_requires_existing_user,
    sessions_listing_orders_and_filters,
    revoke_session_once,
    adopted_session_written_once_with_one_current_token,
    revoke_user_sessions_keeps_one,
    rotation_happy_path,
    second_rotation_of_same_token_writes_nothing,
    rotation_refused_when_session_revoked_or_mismatched,
    concurrent_rotation_has_one_winner,
    revocations_add_upsert_live_prune,
    idempotency_put_get_conflict_since_prune,
    idempotency_expired_record_is_replaced,
    prune_sessions_drops_expired_and_revoked,
    refresh_children_are_erased_after_their_window,
    admins_are_live_admins,
    rooms_create_get_conflict_and_list,
    update_room_is_partial,
    delete_room_cascades_memberships,
    put_member_inserts_then_replaces_and_needs_a_room,
    remove_member_once,
    members_are_ordered_by_user_id,
    soft_delete_leaves_rooms_but_not_memberships,
    put_member_racing_delete_room_leaves_no_orphan,
    key_fingerprints_are_recorded_once_then_replaced,
    settings_are_absent_then_set_then_replaced,
);

fn settings_are_absent_then_set_then_replaced(env: &Env) {
    let store = env.open();
    assert_eq!(store.setting("allowed_origins").unwrap(), None);
    store
        .put_setting("allowed_origins", r#"["https://a"]"#, 1)
        .unwrap();
    assert_eq!(
        store.setting("allowed_origins").unwrap().as_deref(),
        Some(r#"["https://a"]"#)
    );
    store.put_setting("allowed_origins", "[]", 2).unwrap();
    assert_eq!(
        store.setting("allowed_origins").unwrap().as_deref(),
        Some("[]")
    );
}

/// The first fingerprint recorded for a key stays (a second node with another key sees the
/// first); replacing is explicit (a rotation).
fn key_fingerprints_are_recorded_once_then_replaced(env: &Env) {
    let store = env.open();
    assert_eq!(store.key_fingerprint("jwt", "aaaa", 1).unwrap(), "aaaa");
    assert_eq!(store.key_fingerprint("jwt", "bbbb", 2).unwrap(), "aaaa");
    assert_eq!(
        store.key_fingerprint("blind_index_key", "cccc", 3).unwrap(),
        "cccc"
    );
    store.replace_key_fingerprint("jwt", "bbbb", 4).unwrap();
    assert_eq!(store.key_fingerprint("jwt", "dddd", 5).unwrap(), "bbbb");
    store
        .replace_key_fingerprint("encryption_key", "eeee", 6)
        .unwrap();
    assert_eq!(
        store.key_fingerprint("encryption_key", "ffff", 7).unwrap(),
        "eeee"
    );
}

// ---------------------------------------------------------------------------------------------
// Fixtures

fn user(id: &str, username: &str, email: &str) -> UserRecord {
    UserRecord {
        id: id.into(),
        username: username.into(),
        email_cipher: format!("cipher:{email}").into_bytes(),
        email_index: format!("index:{email}").into_bytes(),
        password_hash: format!("$2b$12$hash-of-{id}"),
        role: Role::User,
        created_at_ms: 1_000,
    }
}

fn session(id: &str, user_id: &str, created_at_ms: i64, expires_at_ms: i64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        user_id: user_id.into(),
        created_at_ms,
        last_used_at_ms: created_at_ms,
        expires_at_ms,
        ip: "192.0.2.1".into(),
        user_agent: "test-agent/1".into(),
        revoked_at_ms: None,
    }
}

/// A user `u1` with a session `s1` whose current refresh token is `t0`.
fn user_with_session(store: &dyn Store) -> SessionRecord {
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    let s = session("s1", "u1", 10_000, 50_000);
    store.create_session(&s, b"t0").unwrap();
    s
}

fn rotation<'a>(old: &'a [u8], new: &'a [u8], now_ms: i64, child: &'a [u8]) -> Rotation<'a> {
    Rotation {
        old_hash: old,
        new_hash: new,
        session_id: "s1",
        now_ms,
        expires_at_ms: now_ms + 40_000,
        ip: "198.51.100.7",
        user_agent: "rotated-agent/2",
        child_cipher: child,
    }
}

fn idem(scope: &str, key: &str, created_at_ms: i64, body: &[u8]) -> IdempotencyRecord {
    IdempotencyRecord {
        scope: scope.into(),
        key: key.into(),
        body_hash: body.to_vec(),
        status: 201,
        response_cipher: [b"resp:", body].concat(),
        token_hash: Some(b"token".to_vec()),
        created_at_ms,
    }
}

// ---------------------------------------------------------------------------------------------
// Opening and migrations

fn open_reports_kind_and_schema_version(env: &Env) {
    let store = env.open();
    assert_eq!(store.kind(), env.kind());
    store.ping().unwrap();
    let latest = migrations::latest(match env {
        Env::Sqlite { .. } => migrations::SQLITE,
        Env::Postgres { .. } => migrations::POSTGRES,
    });
    assert_eq!(latest, 5);
    assert_eq!(store.schema_version().unwrap(), latest);
}

fn migrations_twice_are_idempotent(env: &Env) {
    let first = env.open();
    let version = first.schema_version().unwrap();
    first
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    // A second open while the first is still open, then a third after both are gone.
    let second = env.open();
    assert_eq!(second.schema_version().unwrap(), version);
    assert!(
        second.user_by_id("u1").unwrap().is_some(),
        "data survives a reopen"
    );
    drop((first, second));
    let third = env.open();
    assert_eq!(third.schema_version().unwrap(), version);
    assert_eq!(third.user_by_id("u1").unwrap().unwrap().username, "alice");
}

fn concurrent_opens_migrate_once(env: &Env) {
    let barrier = Barrier::new(4);
    let versions: Vec<u32> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    env.open().schema_version().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(versions.iter().all(|&v| v == 5), "{versions:?}");
}

/// Builds, without the store, the database a version-1 build left: the shipped first migration,
/// its bookkeeping row, and an admin `u1` with a session `s1` (refresh token `t0`).
fn create_version_1(env: &Env) {
    let user = (
        "u1",
        "alice",
        "alice",
        &b"cipher"[..],
        &b"index"[..],
        "hash",
        "admin",
        1_000_i64,
    );
    let insert_user = "INSERT INTO users (id, username, username_lower, email_cipher, \
                       email_index, password_hash, role, created_at_ms)";
    let insert_session = "INSERT INTO sessions (id, user_id, created_at_ms, last_used_at_ms, \
                          expires_at_ms, ip, user_agent)";
    match env {
        Env::Sqlite { dir } => {
            std::fs::create_dir_all(dir).unwrap();
            let conn = rusqlite::Connection::open(dir.join(storage::sqlite::FILE_NAME)).unwrap();
            conn.execute_batch(migrations::SCHEMA_MIGRATIONS_DDL)
                .unwrap();
            conn.execute_batch(migrations::SQLITE[0].1).unwrap();
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (1, 0)",
                [],
            )
            .unwrap();
            conn.execute(
                &format!("{insert_user} VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
                rusqlite::params![
                    user.0, user.1, user.2, user.3, user.4, user.5, user.6, user.7
                ],
            )
            .unwrap();
            conn.execute(
                &format!("{insert_session} VALUES ('s1', 'u1', 1, 1, 50000, 'ip', 'ua')"),
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                 VALUES (?1, 's1', 1)",
                [&b"t0"[..]],
            )
            .unwrap();
        }
        Env::Postgres { url, .. } => {
            let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
            client
                .batch_execute(migrations::SCHEMA_MIGRATIONS_DDL)
                .unwrap();
            client.batch_execute(migrations::POSTGRES[0].1).unwrap();
            client
                .batch_execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (1, 0)",
                )
                .unwrap();
            client
                .execute(
                    &format!("{insert_user} VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"),
                    &[
                        &user.0, &user.1, &user.2, &user.3, &user.4, &user.5, &user.6, &user.7,
                    ],
                )
                .unwrap();
            client
                .batch_execute(&format!(
                    "{insert_session} VALUES ('s1', 'u1', 1, 1, 50000, 'ip', 'ua'); \
                     INSERT INTO refresh_tokens (token_hash, session_id, created_at_ms) \
                     VALUES ('\\x7430'::bytea, 's1', 1)"
                ))
                .unwrap();
        }
    }
}

fn version_1_database_is_upgraded(env: &Env) {
    create_version_1(env);
    let store = env.open();
    assert_eq!(store.schema_version().unwrap(), 5);
    // Version 1's data is intact and the new index serves it.
    let alice = store.user_by_id("u1").unwrap().unwrap();
    assert_eq!(
        (alice.username.as_str(), alice.role),
        ("alice", Role::Admin)
    );
    assert_eq!(store.admins().unwrap(), vec!["u1".to_string()]);
    assert_eq!(store.session("s1").unwrap().unwrap().expires_at_ms, 50_000);
    assert!(store.refresh_token(b"t0").unwrap().is_some());
    // Version 2's tables work, with their cascade.
    store.create_room(&room("lobby", "u1")).unwrap();
    assert!(
        store
            .put_member("lobby", "u1", MemberRole::Member, 2)
            .unwrap()
    );
    drop(store);
    // Reopening applies nothing again.
    let again = env.open();
    assert_eq!(again.schema_version().unwrap(), 5);
    assert_eq!(again.members("lobby").unwrap().len(), 1);
    assert!(again.delete_room("lobby").unwrap());
    assert_eq!(again.all_members().unwrap(), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Users

fn users_create_lookup_and_conflicts(env: &Env) {
    let store = env.open();
    let alice = user("u1", "Alice", "alice@example.com");
    store.create_user(&alice).unwrap();
    assert_eq!(store.user_by_id("u1").unwrap(), Some(alice.clone()));
    assert_eq!(
        store
            .user_by_email_index(b"index:alice@example.com")
            .unwrap(),
        Some(alice)
    );
    assert_eq!(store.user_by_id("nobody").unwrap(), None);
    assert_eq!(store.user_by_email_index(b"index:nobody").unwrap(), None);

    let same_email = user("u2", "bob", "alice@example.com");
    assert!(matches!(
        store.create_user(&same_email),
        Err(StoreError::Conflict("email"))
    ));
    let same_id = user("u1", "carol", "carol@example.com");
    assert!(matches!(
        store.create_user(&same_id),
        Err(StoreError::Conflict("id"))
    ));
    assert_eq!(
        store.user_by_id("u2").unwrap(),
        None,
        "a conflict writes nothing"
    );

    let mut admin = user("u3", "dave", "dave@example.com");
    admin.role = Role::Admin;
    store.create_user(&admin).unwrap();
    assert_eq!(store.user_by_id("u3").unwrap().unwrap().role, Role::Admin);
}

fn username_conflict_ignores_ascii_case(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "Alice", "alice@example.com"))
        .unwrap();
    for name in ["alice", "ALICE", "aLiCe"] {
        let clash = user("u2", name, "other@example.com");
        assert!(
            matches!(
                store.create_user(&clash),
                Err(StoreError::Conflict("username"))
            ),
            "{name}"
        );
    }
    // Only ASCII case folds: a non-ASCII look-alike is another name.
    store
        .create_user(&user("u2", "Alİce", "other@example.com"))
        .unwrap();
    assert_eq!(
        store.user_by_id("u1").unwrap().unwrap().username,
        "Alice",
        "kept as registered"
    );
}

fn soft_delete_frees_email_and_username(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    assert!(store.soft_delete_user("u1", 5_000).unwrap());
    assert_eq!(store.user_by_id("u1").unwrap(), None);
    assert_eq!(
        store
            .user_by_email_index(b"index:alice@example.com")
            .unwrap(),
        None
    );
    assert!(
        !store.soft_delete_user("u1", 6_000).unwrap(),
        "already deleted"
    );
    assert!(!store.soft_delete_user("nobody", 6_000).unwrap());
    assert!(!store.set_password("u1", "new").unwrap());
    assert!(!store.set_role("u1", Role::Admin).unwrap());

    // The same e-mail and username (any case) are free again; the old id is not.
    let again = user("u2", "ALICE", "alice@example.com");
    store.create_user(&again).unwrap();
    assert_eq!(
        store
            .user_by_email_index(b"index:alice@example.com")
            .unwrap(),
        Some(again)
    );
    let reuse_id = user("u1", "zed", "zed@example.com");
    assert!(matches!(
        store.create_user(&reuse_id),
        Err(StoreError::Conflict("id"))
    ));
    // A second deletion of the new holder frees them once more.
    assert!(store.soft_delete_user("u2", 7_000).unwrap());
    store
        .create_user(&user("u3", "alice", "alice@example.com"))
        .unwrap();
}

fn set_password_and_role(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    assert!(store.set_password("u1", "$2b$12$new").unwrap());
    assert!(store.set_role("u1", Role::Admin).unwrap());
    let got = store.user_by_id("u1").unwrap().unwrap();
    assert_eq!(got.password_hash, "$2b$12$new");
    assert_eq!(got.role, Role::Admin);
    assert!(store.set_role("u1", Role::User).unwrap());
    assert_eq!(store.user_by_id("u1").unwrap().unwrap().role, Role::User);
    assert!(!store.set_password("nobody", "x").unwrap());
    assert!(!store.set_role("nobody", Role::Admin).unwrap());
    // A re-hash applies only over the hash it was made from.
    assert!(
        !store
            .rehash_password("u1", "$2b$04$old", "$2b$13$x")
            .unwrap()
    );
    assert!(
        store
            .rehash_password("u1", "$2b$12$new", "$2b$13$x")
            .unwrap()
    );
    assert_eq!(
        store.user_by_id("u1").unwrap().unwrap().password_hash,
        "$2b$13$x"
    );
    assert!(!store.rehash_password("nobody", "$2b$13$x", "y").unwrap());
}

// ---------------------------------------------------------------------------------------------
// Sessions

fn session_requires_existing_user(env: &Env) {
    let store = env.open();
    let orphan = session("s1", "nobody", 1, 2);
    assert!(matches!(
        store.create_session(&orphan, b"t0"),
        Err(StoreError::Internal(_))
    ));
    assert_eq!(store.session("s1").unwrap(), None, "nothing written");
    assert_eq!(store.refresh_token(b"t0").unwrap(), None);
}

fn sessions_listing_orders_and_filters(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    store
        .create_user(&user("u2", "bob", "bob@example.com"))
        .unwrap();
    let now = 10_000;
    let s1 = session("s1", "u1", 100, 20_000);
    let s2 = session("s2", "u1", 300, 20_000);
    let s3 = session("s3", "u1", 200, 20_000);
    let expired = session("s4", "u1", 400, now); // expires exactly now: not live
    let revoked = session("s5", "u1", 500, 20_000);
    let other = session("s6", "u2", 600, 20_000);
    for (i, s) in [&s1, &s2, &s3, &expired, &revoked, &other]
        .into_iter()
        .enumerate()
    {
        store.create_session(s, format!("t{i}").as_bytes()).unwrap();
    }
    assert!(store.revoke_session("s5", 700).unwrap());

    let live = store.live_sessions("u1", now).unwrap();
    assert_eq!(live, vec![s2.clone(), s3, s1.clone()], "newest first");
    assert_eq!(store.live_sessions("u2", now).unwrap(), vec![other]);
    assert_eq!(store.live_sessions("nobody", now).unwrap(), vec![]);
    assert_eq!(
        store.live_sessions("u1", now - 1).unwrap().len(),
        4,
        "s4 is live before now"
    );

    assert_eq!(store.session("s1").unwrap(), Some(s1));
    let mut revoked_now = revoked;
    revoked_now.revoked_at_ms = Some(700);
    assert_eq!(
        store.session("s5").unwrap(),
        Some(revoked_now),
        "revoked ones are still found"
    );
    assert_eq!(store.session("nope").unwrap(), None);

    let duplicate = session("s2", "u1", 1, 2);
    assert!(matches!(
        store.create_session(&duplicate, b"fresh"),
        Err(StoreError::Conflict("id"))
    ));
    assert_eq!(store.session("s2").unwrap(), Some(s2));
    assert_eq!(
        store.refresh_token(b"fresh").unwrap(),
        None,
        "the transaction rolled back"
    );
}

fn adopted_session_written_once_with_one_current_token(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    let held = session("h1", "u1", 10_000, 50_000);
    store.adopt_session(&held, b"t1", 11_000).unwrap();
    // Written back again (two nodes, or a retry) after a rotation while held: still one session,
    // and only the newest token is current.
    let mut later = held;
    later.last_used_at_ms = 12_000;
    later.expires_at_ms = 60_000;
    store.adopt_session(&later, b"t2", 13_000).unwrap();
    store.adopt_session(&later, b"t2", 14_000).unwrap();
    assert_eq!(store.live_sessions("u1", 20_000).unwrap(), vec![later]);
    let old = store.refresh_token(b"t1").unwrap().unwrap();
    assert_eq!(old.rotated_at_ms, Some(13_000));
    let current = store.refresh_token(b"t2").unwrap().unwrap();
    assert_eq!(
        (current.session_id.as_str(), current.rotated_at_ms),
        ("h1", None)
    );
    // The normal rotation takes over from the adopted token.
    assert!(
        store
            .rotate(&Rotation {
                session_id: "h1",
                ..rotation(b"t2", b"t3", 15_000, b"child")
            })
            .unwrap()
    );
    // A session revoked while it was held is written revoked, and an older copy never
    // un-revokes it.
    let mut revoked = session("h2", "u1", 10_000, 50_000);
    revoked.revoked_at_ms = Some(12_500);
    store.adopt_session(&revoked, b"t9", 13_000).unwrap();
    revoked.revoked_at_ms = None;
    store.adopt_session(&revoked, b"t9", 13_500).unwrap();
    assert_eq!(
        store.session("h2").unwrap().unwrap().revoked_at_ms,
        Some(12_500)
    );
}

fn revoke_session_once(env: &Env) {
    let store = env.open();
    user_with_session(&*store);
    assert!(store.revoke_session("s1", 12_000).unwrap());
    assert!(!store.revoke_session("s1", 13_000).unwrap());
    assert!(!store.revoke_session("nope", 13_000).unwrap());
    assert_eq!(
        store.session("s1").unwrap().unwrap().revoked_at_ms,
        Some(12_000)
    );
    assert_eq!(store.live_sessions("u1", 11_000).unwrap(), vec![]);
}

fn revoke_user_sessions_keeps_one(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    store
        .create_user(&user("u2", "bob", "bob@example.com"))
        .unwrap();
    for (id, owner) in [
        ("sa", "u1"),
        ("sc", "u1"),
        ("sb", "u1"),
        ("sd", "u1"),
        ("sx", "u2"),
    ] {
        store
            .create_session(&session(id, owner, 100, 9_000), id.as_bytes())
            .unwrap();
    }
    assert!(store.revoke_session("sd", 150).unwrap());

    let revoked = store.revoke_user_sessions("u1", Some("sa"), 200).unwrap();
    assert_eq!(
        revoked,
        vec!["sb".to_string(), "sc".to_string()],
        "already revoked sd is not"
    );
    let live: Vec<String> = store
        .live_sessions("u1", 300)
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(live, vec!["sa".to_string()]);
    assert_eq!(
        store.session("sb").unwrap().unwrap().revoked_at_ms,
        Some(200)
    );
    assert_eq!(
        store.session("sd").unwrap().unwrap().revoked_at_ms,
        Some(150),
        "untouched"
    );
    assert_eq!(
        store.live_sessions("u2", 300).unwrap().len(),
        1,
        "other users untouched"
    );

    assert_eq!(
        store.revoke_user_sessions("u1", None, 400).unwrap(),
        vec!["sa".to_string()]
    );
    assert_eq!(
        store.revoke_user_sessions("u1", None, 500).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store
            .revoke_user_sessions("nobody", Some("sx"), 500)
            .unwrap(),
        Vec::<String>::new()
    );
}

fn prune_sessions_drops_expired_and_revoked(env: &Env) {
    let store = env.open();
    // `s1` has a family of two tokens, `t0` (rotated) and `t1`; both go with it.
    user_with_session(&*store);
    assert!(
        store
            .rotate(&rotation(b"t0", b"t1", 1_500, b"child"))
            .unwrap()
    );
    let before = 2_000;
    for (id, expires_at_ms) in [
        ("expired", before - 1),
        ("expires_at_limit", before),
        ("revoked_at_limit", 9_000),
        ("live", 9_000),
    ] {
        store
            .create_session(&session(id, "u1", 100, expires_at_ms), id.as_bytes())
            .unwrap();
    }
    assert!(store.revoke_session("s1", before - 1).unwrap());
    assert!(store.revoke_session("revoked_at_limit", before).unwrap());

    assert_eq!(
        store.prune_sessions(before).unwrap(),
        2,
        "expired or revoked strictly before"
    );
    for (gone, tokens) in [("s1", &[&b"t0"[..], b"t1"][..]), ("expired", &[b"expired"])] {
        assert_eq!(store.session(gone).unwrap(), None, "{gone}");
        for token in tokens {
            assert_eq!(store.refresh_token(token).unwrap(), None, "{gone}");
        }
    }
    for kept in ["expires_at_limit", "revoked_at_limit", "live"] {
        assert!(store.session(kept).unwrap().is_some(), "{kept}");
        assert!(
            store.refresh_token(kept.as_bytes()).unwrap().is_some(),
            "{kept}"
        );
    }
    assert_eq!(store.prune_sessions(before).unwrap(), 0);
    assert_eq!(store.live_sessions("u1", before).unwrap().len(), 1, "live");
}

fn refresh_children_are_erased_after_their_window(env: &Env) {
    let store = env.open();
    user_with_session(&*store);
    assert!(
        store
            .rotate(&rotation(b"t0", b"t1", 1_000, b"first"))
            .unwrap()
    );
    assert!(
        store
            .rotate(&rotation(b"t1", b"t2", 3_000, b"second"))
            .unwrap()
    );
    let child = |token: &[u8]| store.refresh_token(token).unwrap().unwrap().child_cipher;
    // Rotated strictly before 3_000: only t0's pair goes; hashes and rotation times stay.
    assert_eq!(store.clear_refresh_children(3_000).unwrap(), 1);
    assert_eq!(child(b"t0"), None);
    assert_eq!(child(b"t1").as_deref(), Some(&b"second"[..]));
    let t0 = store.refresh_token(b"t0").unwrap().unwrap();
    assert_eq!(t0.rotated_at_ms, Some(1_000));
    assert_eq!(store.clear_refresh_children(3_000).unwrap(), 0);
    assert_eq!(store.clear_refresh_children(3_001).unwrap(), 1);
    assert_eq!(child(b"t1"), None);
    // The current token has no pair to erase.
    assert_eq!(child(b"t2"), None);
}

// ---------------------------------------------------------------------------------------------
// Refresh-token rotation

fn rotation_happy_path(env: &Env) {
    let store = env.open();
    let s = user_with_session(&*store);
    let t0 = store.refresh_token(b"t0").unwrap().unwrap();
    assert_eq!(t0.session_id, "s1");
    assert_eq!(t0.created_at_ms, s.created_at_ms);
    assert_eq!((t0.rotated_at_ms, t0.child_cipher), (None, None));

    assert!(
        store
            .rotate(&rotation(b"t0", b"t1", 20_000, b"child-1"))
            .unwrap()
    );
    let used = store.refresh_token(b"t0").unwrap().unwrap();
    assert_eq!(used.rotated_at_ms, Some(20_000));
    assert_eq!(used.child_cipher.as_deref(), Some(&b"child-1"[..]));
    let t1 = store.refresh_token(b"t1").unwrap().unwrap();
    assert_eq!(t1.session_id, "s1");
    assert_eq!((t1.created_at_ms, t1.rotated_at_ms), (20_000, None));
    let after = store.session("s1").unwrap().unwrap();
    assert_eq!(after.created_at_ms, s.created_at_ms);
    assert_eq!(after.last_used_at_ms, 20_000);
    assert_eq!(after.expires_at_ms, 60_000);
    assert_eq!(after.ip, "198.51.100.7");
    assert_eq!(after.user_agent, "rotated-agent/2");
    assert_eq!(after.revoked_at_ms, None);

    assert!(
        store
            .rotate(&rotation(b"t1", b"t2", 30_000, b"child-2"))
            .unwrap()
    );
    assert!(
        store
            .refresh_token(b"t2")
            .unwrap()
            .unwrap()
            .rotated_at_ms
            .is_none()
    );
    assert_eq!(store.session("s1").unwrap().unwrap().expires_at_ms, 70_000);
}

fn second_rotation_of_same_token_writes_nothing(env: &Env) {
    let store = env.open();
    user_with_session(&*store);
    assert!(
        store
            .rotate(&rotation(b"t0", b"t1", 20_000, b"child-1"))
            .unwrap()
    );
    let session_before = store.session("s1").unwrap();
    let t0_before = store.refresh_token(b"t0").unwrap();

    let mut late = rotation(b"t0", b"t2", 25_000, b"child-2");
    late.ip = "203.0.113.9";
    assert!(!store.rotate(&late).unwrap());
    assert_eq!(store.refresh_token(b"t2").unwrap(), None);
    assert_eq!(
        store.refresh_token(b"t0").unwrap(),
        t0_before,
        "the first child is kept"
    );
    assert_eq!(store.session("s1").unwrap(), session_before);
    assert!(
        store
            .refresh_token(b"t1")
            .unwrap()
            .unwrap()
            .rotated_at_ms
            .is_none()
    );

    // A token never issued is not current either.
    assert!(
        !store
            .rotate(&rotation(b"never", b"t3", 26_000, b"c"))
            .unwrap()
    );
    assert_eq!(store.refresh_token(b"t3").unwrap(), None);
}

fn rotation_refused_when_session_revoked_or_mismatched(env: &Env) {
    let store = env.open();
    user_with_session(&*store);
    store
        .create_user(&user("u2", "bob", "bob@example.com"))
        .unwrap();
    store
        .create_session(&session("s2", "u2", 10_000, 50_000), b"bob-t0")
        .unwrap();

    // The token belongs to s2, not s1.
    assert!(
        !store
            .rotate(&rotation(b"bob-t0", b"x1", 20_000, b"c"))
            .unwrap()
    );
    assert!(
        store
            .refresh_token(b"bob-t0")
            .unwrap()
            .unwrap()
            .rotated_at_ms
            .is_none()
    );

    assert!(store.revoke_session("s1", 15_000).unwrap());
    let before = store.session("s1").unwrap();
    assert!(!store.rotate(&rotation(b"t0", b"t1", 20_000, b"c")).unwrap());
    assert_eq!(store.refresh_token(b"t1").unwrap(), None);
    let t0 = store.refresh_token(b"t0").unwrap().unwrap();
    assert_eq!((t0.rotated_at_ms, t0.child_cipher), (None, None));
    assert_eq!(store.session("s1").unwrap(), before);
}

fn concurrent_rotation_has_one_winner(env: &Env) {
    let store = env.open();
    user_with_session(&*store);
    const THREADS: usize = 8;
    let barrier = Barrier::new(THREADS);
    let results: Vec<(usize, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|i| {
                let (store, barrier) = (&store, &barrier);
                scope.spawn(move || {
                    let new = format!("new-{i}");
                    let child = format!("child-{i}");
                    let now = 20_000 + i64::try_from(i).unwrap();
                    barrier.wait();
                    let won = store
                        .rotate(&rotation(b"t0", new.as_bytes(), now, child.as_bytes()))
                        .unwrap();
                    (i, won)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let winners: Vec<usize> = results.iter().filter(|r| r.1).map(|r| r.0).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];
    for i in 0..THREADS {
        let new = store.refresh_token(format!("new-{i}").as_bytes()).unwrap();
        assert_eq!(
            new.is_some(),
            i == winner,
            "only the winner's token exists ({i})"
        );
    }
    let t0 = store.refresh_token(b"t0").unwrap().unwrap();
    assert_eq!(
        t0.child_cipher,
        Some(format!("child-{winner}").into_bytes())
    );
    let session = store.session("s1").unwrap().unwrap();
    assert_eq!(
        session.last_used_at_ms,
        20_000 + i64::try_from(winner).unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Revocations

fn revocation(kind: RevocationKind, subject: &str, at: i64, keep: i64) -> Revocation {
    Revocation {
        kind,
        subject: subject.into(),
        revoked_at_ms: at,
        keep_until_ms: keep,
    }
}

fn revocations_add_upsert_live_prune(env: &Env) {
    let store = env.open();
    let session = revocation(RevocationKind::Session, "s1", 100, 1_000);
    let user = revocation(RevocationKind::User, "u1", 200, 2_000);
    let forever = revocation(RevocationKind::User, "u2", 300, i64::MAX);
    // Same subject, other kind: a separate row.
    let same_subject = revocation(RevocationKind::User, "s1", 50, 1_500);
    for r in [&session, &user, &forever, &same_subject] {
        store.add_revocation(r).unwrap();
    }
    assert_eq!(
        store.live_revocations(0).unwrap(),
        vec![same_subject, session, user.clone(), forever.clone()],
        "ordered by revocation time"
    );

    // Again for the same kind and subject: replaced, not added.
    let newer = revocation(RevocationKind::Session, "s1", 400, 3_000);
    store.add_revocation(&newer).unwrap();
    assert_eq!(store.live_revocations(0).unwrap().len(), 4);
    assert!(store.live_revocations(0).unwrap().contains(&newer));
    // An out-of-order older one never shortens what is recorded.
    store
        .add_revocation(&revocation(RevocationKind::Session, "s1", 10, 20))
        .unwrap();
    assert!(store.live_revocations(0).unwrap().contains(&newer));

    assert_eq!(
        store.live_revocations(1_500).unwrap(),
        vec![user, forever.clone(), newer.clone()]
    );
    assert_eq!(
        store.prune_revocations(2_000).unwrap(),
        2,
        "keep_until <= now goes"
    );
    assert_eq!(
        store.live_revocations(0).unwrap(),
        vec![forever.clone(), newer]
    );
    assert_eq!(store.prune_revocations(2_000).unwrap(), 0);
    assert_eq!(store.prune_revocations(i64::MAX - 1).unwrap(), 1);
    assert_eq!(store.live_revocations(i64::MAX - 1).unwrap(), vec![forever]);
}

// ---------------------------------------------------------------------------------------------
// Idempotency

fn idempotency_put_get_conflict_since_prune(env: &Env) {
    let store = env.open();
    let first = idem("login", "k1", 1_000, b"body-1");
    assert!(store.put_idempotency(&first).unwrap());
    assert_eq!(
        store.idempotency("login", "k1", 0).unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.idempotency("login", "k1", 1_000).unwrap(),
        Some(first.clone())
    );
    assert_eq!(
        store.idempotency("login", "k1", 1_001).unwrap(),
        None,
        "older than since"
    );
    assert_eq!(store.idempotency("login", "k2", 0).unwrap(), None);
    assert_eq!(store.idempotency("register", "k1", 0).unwrap(), None);

    let rival = idem("login", "k1", 1_500, b"body-2");
    assert!(
        !store.put_idempotency(&rival).unwrap(),
        "a first request won"
    );
    assert_eq!(
        store.idempotency("login", "k1", 0).unwrap(),
        Some(first),
        "unchanged"
    );

    let mut other_scope = idem("register", "k1", 2_000, b"body-3");
    other_scope.token_hash = None;
    other_scope.status = 409;
    assert!(store.put_idempotency(&other_scope).unwrap());
    assert_eq!(
        store.idempotency("register", "k1", 0).unwrap(),
        Some(other_scope.clone())
    );

    assert_eq!(
        store.prune_idempotency(1_000).unwrap(),
        0,
        "strictly before"
    );
    assert_eq!(store.prune_idempotency(1_001).unwrap(), 1);
    assert_eq!(store.idempotency("login", "k1", 0).unwrap(), None);
    assert_eq!(
        store.idempotency("register", "k1", 0).unwrap(),
        Some(other_scope)
    );
    assert!(
        store.put_idempotency(&rival).unwrap(),
        "free again after the prune"
    );
    assert_eq!(store.idempotency("login", "k1", 0).unwrap(), Some(rival));
}

fn idempotency_expired_record_is_replaced(env: &Env) {
    let store = env.open();
    let old = idem("login", "k1", 1_000, b"old");
    assert!(store.put_idempotency(&old).unwrap());
    let at_limit = idem("login", "k1", 1_000 + IDEMPOTENCY_TTL_MS, b"limit");
    assert!(
        !store.put_idempotency(&at_limit).unwrap(),
        "exactly 24 h old still counts"
    );
    assert_eq!(store.idempotency("login", "k1", 0).unwrap(), Some(old));
    let later = idem("login", "k1", 1_001 + IDEMPOTENCY_TTL_MS, b"new");
    assert!(
        store.put_idempotency(&later).unwrap(),
        "older than 24 h: replaced"
    );
    assert_eq!(store.idempotency("login", "k1", 0).unwrap(), Some(later));
}

// ---------------------------------------------------------------------------------------------
// Admins and rooms

fn admins_are_live_admins(env: &Env) {
    let store = env.open();
    assert_eq!(store.admins().unwrap(), Vec::<String>::new());
    for (id, name) in [("u2", "bob"), ("u1", "alice"), ("u3", "carol")] {
        store
            .create_user(&user(id, name, &format!("{name}@example.com")))
            .unwrap();
    }
    assert_eq!(store.admins().unwrap(), Vec::<String>::new(), "users only");
    assert!(store.set_role("u2", Role::Admin).unwrap());
    assert!(store.set_role("u1", Role::Admin).unwrap());
    assert_eq!(store.admins().unwrap(), vec!["u1", "u2"], "ascending");
    assert!(store.set_role("u2", Role::User).unwrap());
    assert_eq!(store.admins().unwrap(), vec!["u1"], "demoted");
    assert!(store.soft_delete_user("u1", 5_000).unwrap());
    assert_eq!(
        store.admins().unwrap(),
        Vec::<String>::new(),
        "a deleted admin is none"
    );
    let mut created_admin = user("u4", "dave", "dave@example.com");
    created_admin.role = Role::Admin;
    store.create_user(&created_admin).unwrap();
    assert_eq!(store.admins().unwrap(), vec!["u4"]);
}

fn room(id: &str, owner_id: &str) -> RoomRecord {
    RoomRecord {
        id: id.into(),
        permission: Permission::Private,
        owner_id: owner_id.into(),
        max_members: 100,
        presence: true,
        history: false,
        created_at_ms: 1_000,
    }
}

fn rooms_create_get_conflict_and_list(env: &Env) {
    let store = env.open();
    assert_eq!(store.all_rooms().unwrap(), vec![]);
    let lobby = RoomRecord {
        permission: Permission::Public,
        max_members: u32::MAX,
        presence: false,
        history: true,
        ..room("lobby", "u1")
    };
    let team = RoomRecord {
        permission: Permission::OwnerOnly,
        max_members: 0,
        ..room("Team:a@b", "u2")
    };
    let quiet = RoomRecord {
        permission: Permission::Restricted,
        ..room("quiet.room-1", "u1")
    };
    for r in [&lobby, &team, &quiet] {
        store.create_room(r).unwrap();
    }
    assert_eq!(store.room("lobby").unwrap(), Some(lobby.clone()));
    assert_eq!(store.room("Team:a@b").unwrap(), Some(team.clone()));
    assert_eq!(store.room("LOBBY").unwrap(), None, "ids are case-sensitive");
    assert_eq!(store.room("nowhere").unwrap(), None);
    // Byte order: upper case first.
    assert_eq!(store.all_rooms().unwrap(), vec![team, lobby.clone(), quiet]);

    let clash = room("lobby", "u9");
    assert!(matches!(
        store.create_room(&clash),
        Err(StoreError::Conflict("id"))
    ));
    assert_eq!(store.room("lobby").unwrap(), Some(lobby), "unchanged");
    assert_eq!(store.all_rooms().unwrap().len(), 3);
}

fn update_room_is_partial(env: &Env) {
    let store = env.open();
    let original = room("r1", "u1");
    store.create_room(&original).unwrap();
    store.create_room(&room("r2", "u1")).unwrap();

    let permission_only = RoomUpdate {
        permission: Some(Permission::Restricted),
        ..RoomUpdate::default()
    };
    let expected = RoomRecord {
        permission: Permission::Restricted,
        ..original
    };
    assert_eq!(
        store.update_room("r1", &permission_only).unwrap(),
        Some(expected.clone())
    );
    assert_eq!(store.room("r1").unwrap(), Some(expected.clone()));

    let max_only = RoomUpdate {
        max_members: Some(7),
        ..RoomUpdate::default()
    };
    let expected = RoomRecord {
        max_members: 7,
        ..expected
    };
    assert_eq!(
        store.update_room("r1", &max_only).unwrap(),
        Some(expected.clone())
    );

    let both = RoomUpdate {
        permission: Some(Permission::OwnerOnly),
        max_members: Some(u32::MAX),
    };
    let expected = RoomRecord {
        permission: Permission::OwnerOnly,
        max_members: u32::MAX,
        ..expected
    };
    assert_eq!(
        store.update_room("r1", &both).unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.update_room("r1", &RoomUpdate::default()).unwrap(),
        Some(expected.clone()),
        "nothing to change"
    );
    assert_eq!(store.room("r1").unwrap(), Some(expected));
    assert_eq!(
        store.room("r2").unwrap(),
        Some(room("r2", "u1")),
        "others untouched"
    );

    assert_eq!(store.update_room("nowhere", &both).unwrap(), None);
    assert_eq!(store.room("nowhere").unwrap(), None, "nothing created");
}

fn delete_room_cascades_memberships(env: &Env) {
    let store = env.open();
    store.create_room(&room("r1", "u1")).unwrap();
    store.create_room(&room("r2", "u1")).unwrap();
    for (r, u) in [("r1", "u2"), ("r1", "u3"), ("r2", "u2")] {
        assert!(store.put_member(r, u, MemberRole::Member, 10).unwrap());
    }
    assert!(store.delete_room("r1").unwrap());
    assert_eq!(store.room("r1").unwrap(), None);
    assert_eq!(store.members("r1").unwrap(), vec![]);
    assert_eq!(
        store.all_members().unwrap(),
        vec![("r2".into(), "u2".into(), MemberRole::Member)],
        "the other room's memberships stay"
    );
    assert!(!store.delete_room("r1").unwrap(), "already gone");
    assert!(!store.delete_room("nowhere").unwrap());

    // The id is free again, and the new room starts without the old members.
    store.create_room(&room("r1", "u9")).unwrap();
    assert_eq!(store.members("r1").unwrap(), vec![]);
    assert_eq!(store.room("r1").unwrap().unwrap().owner_id, "u9");
}

fn put_member_inserts_then_replaces_and_needs_a_room(env: &Env) {
    let store = env.open();
    store.create_room(&room("r1", "u1")).unwrap();
    assert!(
        store
            .put_member("r1", "u2", MemberRole::Member, 10)
            .unwrap()
    );
    assert_eq!(
        store.members("r1").unwrap(),
        vec![("u2".into(), MemberRole::Member)]
    );
    assert!(
        store
            .put_member("r1", "u2", MemberRole::Moderator, 20)
            .unwrap()
    );
    assert_eq!(
        store.members("r1").unwrap(),
        vec![("u2".into(), MemberRole::Moderator)],
        "replaced, not added"
    );
    assert!(
        store
            .put_member("r1", "u2", MemberRole::Member, 30)
            .unwrap()
    );
    assert_eq!(
        store.members("r1").unwrap(),
        vec![("u2".into(), MemberRole::Member)],
        "and back"
    );

    assert!(
        !store
            .put_member("nowhere", "u2", MemberRole::Member, 40)
            .unwrap()
    );
    assert_eq!(store.members("nowhere").unwrap(), vec![]);
    assert_eq!(store.all_members().unwrap().len(), 1, "nothing written");
    // The store stays usable after the refused write (the connection is not left broken).
    assert!(
        store
            .put_member("r1", "u3", MemberRole::Member, 50)
            .unwrap()
    );
    assert_eq!(store.members("r1").unwrap().len(), 2);
}

fn remove_member_once(env: &Env) {
    let store = env.open();
    store.create_room(&room("r1", "u1")).unwrap();
    store.create_room(&room("r2", "u1")).unwrap();
    assert!(
        store
            .put_member("r1", "u2", MemberRole::Member, 10)
            .unwrap()
    );
    assert!(
        store
            .put_member("r2", "u2", MemberRole::Member, 10)
            .unwrap()
    );
    assert!(store.remove_member("r1", "u2").unwrap());
    assert!(!store.remove_member("r1", "u2").unwrap(), "already removed");
    assert!(!store.remove_member("r1", "u9").unwrap(), "never a member");
    assert!(!store.remove_member("nowhere", "u2").unwrap());
    assert_eq!(store.members("r1").unwrap(), vec![]);
    assert_eq!(
        store.members("r2").unwrap(),
        vec![("u2".into(), MemberRole::Member)],
        "only that room"
    );
    assert!(store.room("r1").unwrap().is_some(), "the room stays");
}

fn members_are_ordered_by_user_id(env: &Env) {
    let store = env.open();
    store.create_room(&room("b", "owner")).unwrap();
    store.create_room(&room("B", "owner")).unwrap();
    store.create_room(&room("a", "owner")).unwrap();
    store.create_room(&room("empty", "owner")).unwrap();
    // Inserted out of order; byte order puts upper case before lower case.
    for (r, u, role) in [
        ("b", "zed", MemberRole::Member),
        ("b", "amy", MemberRole::Moderator),
        ("b", "Zoe", MemberRole::Member),
        ("b", "bob", MemberRole::Member),
        ("a", "zed", MemberRole::Moderator),
        ("B", "amy", MemberRole::Member),
    ] {
        assert!(store.put_member(r, u, role, 10).unwrap());
    }
    assert_eq!(
        store.members("b").unwrap(),
        vec![
            ("Zoe".into(), MemberRole::Member),
            ("amy".into(), MemberRole::Moderator),
            ("bob".into(), MemberRole::Member),
            ("zed".into(), MemberRole::Member),
        ]
    );
    assert_eq!(store.members("empty").unwrap(), vec![]);
    assert_eq!(store.members("nowhere").unwrap(), vec![]);
    let all: Vec<(String, String, MemberRole)> = [
        ("B", "amy", MemberRole::Member),
        ("a", "zed", MemberRole::Moderator),
        ("b", "Zoe", MemberRole::Member),
        ("b", "amy", MemberRole::Moderator),
        ("b", "bob", MemberRole::Member),
        ("b", "zed", MemberRole::Member),
    ]
    .into_iter()
    .map(|(r, u, role)| (r.into(), u.into(), role))
    .collect();
    assert_eq!(store.all_members().unwrap(), all);
}

fn soft_delete_leaves_rooms_but_not_memberships(env: &Env) {
    let store = env.open();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    store
        .create_user(&user("u2", "bob", "bob@example.com"))
        .unwrap();
    store.create_room(&room("owned", "u1")).unwrap();
    store.create_room(&room("other", "u2")).unwrap();
    for (r, u) in [
        ("owned", "u1"),
        ("owned", "u2"),
        ("other", "u1"),
        ("other", "u2"),
    ] {
        assert!(store.put_member(r, u, MemberRole::Moderator, 10).unwrap());
    }

    assert!(store.soft_delete_user("u1", 5_000).unwrap());
    assert_eq!(
        store.all_members().unwrap(),
        vec![
            ("other".into(), "u2".into(), MemberRole::Moderator),
            ("owned".into(), "u2".into(), MemberRole::Moderator),
        ],
        "u1's memberships are gone, u2's stay"
    );
    assert_eq!(
        store.room("owned").unwrap(),
        Some(room("owned", "u1")),
        "the room it owns stays"
    );
    assert_eq!(store.all_rooms().unwrap().len(), 2);

    // A refused deletion (no live user) writes nothing, not even to memberships.
    assert!(
        store
            .put_member("owned", "u1", MemberRole::Member, 20)
            .unwrap()
    );
    assert!(!store.soft_delete_user("u1", 6_000).unwrap());
    assert!(!store.soft_delete_user("nobody", 6_000).unwrap());
    assert_eq!(store.members("owned").unwrap().len(), 2);
}

fn put_member_racing_delete_room_leaves_no_orphan(env: &Env) {
    let store = env.open();
    const ROOMS: usize = 8;
    for i in 0..ROOMS {
        store.create_room(&room(&format!("r{i}"), "u1")).unwrap();
    }
    let barrier = Barrier::new(2 * ROOMS);
    let (puts, deletes): (Vec<bool>, Vec<bool>) = std::thread::scope(|scope| {
        let puts: Vec<_> = (0..ROOMS)
            .map(|i| {
                let (store, barrier) = (&store, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    store
                        .put_member(&format!("r{i}"), "u2", MemberRole::Member, 10)
                        .unwrap()
                })
            })
            .collect();
        let deletes: Vec<_> = (0..ROOMS)
            .map(|i| {
                let (store, barrier) = (&store, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    store.delete_room(&format!("r{i}")).unwrap()
                })
            })
            .collect();
        (
            puts.into_iter().map(|h| h.join().unwrap()).collect(),
            deletes.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });
    assert!(deletes.iter().all(|&d| d), "{deletes:?}");
    assert_eq!(store.all_rooms().unwrap(), vec![]);
    assert_eq!(
        store.all_members().unwrap(),
        vec![],
        "no membership outlives its room (puts: {puts:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL only: the schema isolation and the pools

#[test]
fn pg_scratch_url_sets_search_path() {
    let env = Env::postgres();
    let Env::Postgres { url, schema, .. } = &env else {
        unreachable!()
    };
    assert!(
        url.contains(&format!("options=-c%20search_path%3D{schema}")),
        "{url}"
    );
    let mut client = ::postgres::Client::connect(url, ::postgres::NoTls).unwrap();
    let current: String = client
        .query_one("SELECT current_schema()", &[])
        .unwrap()
        .get(0);
    assert_eq!(&current, schema);
    let path: String = client.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(&path, schema);

    // The store's tables land in that schema and nowhere else.
    let store = env.open();
    store.ping().unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 \
             ORDER BY table_name",
            &[schema],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        tables,
        [
            "idempotency",
            "key_fingerprints",
            "refresh_tokens",
            "revocations",
            "room_members",
            "rooms",
            "schema_migrations",
            "sessions",
            "settings",
            "users"
        ]
    );
}

#[test]
fn pg_key_value_connection_string_works_too() {
    let base = database_url();
    let config: ::postgres::Config = base.parse().unwrap();
    let host = match &config.get_hosts()[0] {
        ::postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("unexpected host {other:?}"),
    };
    let kv = format!(
        "host={host} port={} user={} dbname={}",
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("test"),
    );
    let schema = unique("stkv");
    let url = scratch_schema_url(&kv, &schema).unwrap();
    let result = std::panic::catch_unwind(|| {
        let store = PgStore::open(&url, None, 1, storage::BreakerSettings::default()).unwrap();
        store
            .create_user(&user("u1", "alice", "alice@example.com"))
            .unwrap();
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        let current: String = client
            .query_one("SELECT current_schema()", &[])
            .unwrap()
            .get(0);
        assert_eq!(current, schema);
    });
    drop_schema(&kv, &schema).unwrap();
    result.unwrap();
}

#[test]
fn pg_schemas_are_isolated() {
    let a = Env::postgres();
    let b = Env::postgres();
    let (store_a, store_b) = (a.open(), b.open());
    store_a
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    assert_eq!(store_b.user_by_id("u1").unwrap(), None);
    store_b
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
}

#[test]
fn pg_reads_use_the_read_pool() {
    // The "replica" is another schema, so what each method reads from is visible.
    let primary = Env::postgres();
    let replica = Env::postgres();
    let (Env::Postgres { url, .. }, Env::Postgres { url: read_url, .. }) = (&primary, &replica)
    else {
        unreachable!()
    };
    drop(replica.open()); // migrates the replica's schema
    let store = PgStore::open(url, Some(read_url), 2, storage::BreakerSettings::default()).unwrap();
    store
        .create_user(&user("u1", "alice", "alice@example.com"))
        .unwrap();
    store
        .create_session(&session("s1", "u1", 1, 100), b"t0")
        .unwrap();
    assert!(store.put_idempotency(&idem("login", "k", 1, b"b")).unwrap());
    assert!(store.set_role("u1", Role::Admin).unwrap());
    store.create_room(&room("r1", "u1")).unwrap();
    assert!(store.put_member("r1", "u1", MemberRole::Member, 1).unwrap());
    // Lag-tolerant reads go to the replica, which has none of it.
    assert_eq!(store.user_by_id("u1").unwrap(), None);
    assert_eq!(
        store
            .user_by_email_index(b"index:alice@example.com")
            .unwrap(),
        None
    );
    assert_eq!(store.session("s1").unwrap(), None);
    assert_eq!(store.live_sessions("u1", 0).unwrap(), vec![]);
    assert_eq!(store.room("r1").unwrap(), None);
    assert_eq!(store.members("r1").unwrap(), vec![]);
    // Consistency-critical ones go to the primary, as do the loads that grant rights.
    assert!(store.refresh_token(b"t0").unwrap().is_some());
    assert!(store.idempotency("login", "k", 0).unwrap().is_some());
    assert!(store.rotate(&rotation(b"t0", b"t1", 2, b"c")).unwrap());
    assert_eq!(store.admins().unwrap(), vec!["u1"]);
    assert_eq!(store.all_rooms().unwrap(), vec![room("r1", "u1")]);
    assert_eq!(store.all_members().unwrap().len(), 1);
    assert!(
        store
            .update_room("r1", &RoomUpdate::default())
            .unwrap()
            .is_some()
    );
    store.ping().unwrap();
}

#[test]
fn pg_broken_connection_is_replaced() {
    let env = Env::postgres();
    let Env::Postgres { base, url, schema } = &env else {
        unreachable!()
    };
    let app = format!("ringhub_{schema}");
    let url = format!("{url}&application_name={app}");
    let store = PgStore::open(&url, None, 1, storage::BreakerSettings::default()).unwrap();
    store.ping().unwrap();
    let mut admin = ::postgres::Client::connect(base, ::postgres::NoTls).unwrap();
    let killed: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) AS t",
            &[&app],
        )
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "the pool's one connection");
    // The first call may see the dead connection (and says so); the next one reconnects.
    match store.ping() {
        Ok(()) | Err(StoreError::Unavailable(_)) => {}
        Err(other) => panic!("a dropped connection is Unavailable, got {other:?}"),
    }
    store.ping().unwrap();
    assert_eq!(store.schema_version().unwrap(), 5);
    assert_eq!(Store::kind(&store), "postgres");
}

#[test]
fn pg_pool_size_zero_means_one() {
    let env = Env::postgres();
    let Env::Postgres { url, .. } = &env else {
        unreachable!()
    };
    let store = PgStore::open(url, None, 0, storage::BreakerSettings::default()).unwrap();
    store.ping().unwrap();
    assert!(format!("{store:?}").contains("pool: 1"));
}
