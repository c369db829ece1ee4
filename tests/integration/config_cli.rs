//! `ringhub check-config` and the configuration layers (SPEC §1), through the real binary.

use ringhub_tests::{ringhub, scratch_dir};

fn value_of<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key} = ")))
}

#[test]
fn check_config_prints_every_default() {
    let dir = scratch_dir("defaults");
    let run = ringhub(&["check-config"], &[], &dir);
    assert_eq!(run.code, 0, "{run:?}");
    let out = &run.stdout;
    for (key, value) in [
        ("listen", r#""127.0.0.1:8080""#),
        ("mode", r#""development""#),
        ("data_dir", r#""./ringhub-data""#),
        ("access_ttl", r#""15m""#),
        ("refresh_ttl", r#""24h""#),
        ("session_max_age", r#""30d""#),
        ("token_binding", r#""ip_and_user_agent""#),
        ("bcrypt_cost", "12"),
        ("hash_queue", "64"),
        ("max_message_bytes", "65536"),
        ("max_json_depth", "32"),
        ("compression_threshold", "1024"),
        ("default_rooms", r#"["lobby"]"#),
        ("max_room_members", "10000"),
        ("max_connections_per_user", "10"),
        ("session_conflict", r#""close_oldest""#),
        ("max_connections_per_ip", "1000"),
        ("max_rooms_per_connection", "128"),
        ("max_queued_bytes", "1048576"),
        ("refresh_reuse_interval", r#""10s""#),
        ("history_size", "100"),
        ("history_ttl", r#""5m""#),
        ("resume_ttl", r#""5m""#),
        ("heartbeat", r#""25s""#),
        ("presence_batch", r#""100ms""#),
        ("login_per_ip", r#""30/1m""#),
        ("failed_logins_per_account", r#""5/15m""#),
        ("connect_burst", "100"),
        ("publish_per_room", r#""1000/1s""#),
        ("join_burst", "50"),
        ("history_room_bytes", "1048576"),
        ("history_total_bytes", "268435456"),
        ("http_head_timeout", r#""10s""#),
        ("http_body_timeout", r#""10s""#),
        ("max_pending_per_ip", "64"),
    ] {
        assert_eq!(value_of(out, key), Some(value), "{key} in\n{out}");
    }
    // check-config never writes secrets; it says where they will come from.
    assert!(
        out.contains("# jwt_secret = *** (will be generated into"),
        "{out}"
    );
    assert!(!dir.join("ringhub-data").exists());
}

#[test]
fn file_then_env_then_flags_later_wins() {
    let dir = scratch_dir("layers");
    std::fs::write(
        dir.join("ringhub.toml"),
        "listen = \"127.0.0.1:7000\"\nbcrypt_cost = 10\nheartbeat = \"30s\"\n[rate_limits]\njoin_burst = 5\n",
    )
    .unwrap();
    let run = ringhub(
        &[
            "check-config",
            "--config",
            "ringhub.toml",
            "--heartbeat",
            "40s",
        ],
        &[
            ("RINGHUB_BCRYPT_COST", "8"),
            ("RINGHUB_HEARTBEAT", "35s"),
            ("RINGHUB_RATE_LIMITS__JOIN_BURST", "6"),
        ],
        &dir,
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(value_of(&run.stdout, "listen"), Some(r#""127.0.0.1:7000""#));
    assert_eq!(value_of(&run.stdout, "bcrypt_cost"), Some("8"));
    assert_eq!(value_of(&run.stdout, "heartbeat"), Some(r#""40s""#));
    assert_eq!(value_of(&run.stdout, "join_burst"), Some("6"));
    // RINGHUB_CONFIG names the file too.
    let run = ringhub(
        &["check-config"],
        &[("RINGHUB_CONFIG", "ringhub.toml")],
        &dir,
    );
    assert_eq!(value_of(&run.stdout, "bcrypt_cost"), Some("10"), "{run:?}");
}

#[test]
fn unknown_keys_are_rejected_with_their_name_and_source() {
    let dir = scratch_dir("unknown");
    std::fs::write(
        dir.join("bad.toml"),
        "listen = \"127.0.0.1:1\"\n[rate_limits]\nlogin_per_hour = \"1/1h\"\n",
    )
    .unwrap();
    let run = ringhub(&["check-config", "--config", "bad.toml"], &[], &dir);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("unknown configuration key `rate_limits.login_per_hour`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("bad.toml"), "{}", run.stderr);

    let run = ringhub(
        &["check-config"],
        &[("RINGHUB_MAX_MESAGE_BYTES", "1")],
        &dir,
    );
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("`max_mesage_bytes`")
            && run.stderr.contains("RINGHUB_MAX_MESAGE_BYTES"),
        "{}",
        run.stderr
    );

    let run = ringhub(&["check-config", "--colour", "blue"], &[], &dir);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("`colour`") && run.stderr.contains("--colour"),
        "{}",
        run.stderr
    );
}

#[test]
fn out_of_range_values_are_rejected_with_key_value_and_bound() {
    let dir = scratch_dir("range");
    /// (flags, environment, what the error must mention)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: [Case<'_>; 10] = [
        (
            &["--history-room-bytes", "1KiB"],
            &[],
            &["`history_room_bytes`", "1024 is out of range 4096..="],
        ),
        (
            &["--http-head-timeout", "0s"],
            &[],
            &["`http_head_timeout`", "out of range 1s..=5m"],
        ),
        (
            &[],
            &[("RINGHUB_MAX_PENDING_PER_IP", "0")],
            &[
                "`max_pending_per_ip`",
                "0 is out of range 1..=",
                "RINGHUB_MAX_PENDING_PER_IP",
            ],
        ),
        (
            &["--bcrypt-cost", "3"],
            &[],
            &["`bcrypt_cost`", "3 is out of range 4..=16", "--bcrypt-cost"],
        ),
        (
            &[],
            &[("RINGHUB_MAX_JSON_DEPTH", "1000")],
            &["`max_json_depth`", "1000", "RINGHUB_MAX_JSON_DEPTH"],
        ),
        (
            &["--expiry-grace", "6m"],
            &[],
            &["`expiry_grace`", "out of range", "5m"],
        ),
        (
            &["--write-delay", "1s"],
            &[],
            &["`write_delay`", "out of range", "100ms"],
        ),
        (
            &[],
            &[("RINGHUB_BUSY_WRITE_DELAY", "101ms")],
            &["`busy_write_delay`", "out of range", "100ms"],
        ),
        (
            &["--rate-limits.login-per-ip", "lots"],
            &[],
            &["`rate_limits.login_per_ip`", "COUNT/DURATION"],
        ),
        (&["--listen", "localhost"], &[], &["`listen`", "IP:port"]),
    ];
    for (flags, env, needles) in cases {
        let mut args = vec!["check-config"];
        args.extend_from_slice(flags);
        let run = ringhub(&args, env, &dir);
        assert_eq!(run.code, 2, "{flags:?} {env:?}: {run:?}");
        for needle in needles {
            assert!(
                run.stderr.contains(needle),
                "{needle} not in {}",
                run.stderr
            );
        }
    }
}

#[test]
fn secrets_are_masked_and_production_demands_strong_ones() {
    let dir = scratch_dir("secrets");
    let secret = "s3cr3t-value-that-is-long-enough-0123456789";
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // base64 of bytes 0..32
    let env = [
        ("RINGHUB_JWT_SECRET", secret),
        ("RINGHUB_BLIND_INDEX_KEY", secret),
        ("RINGHUB_ENCRYPTION_KEY", key),
        (
            "RINGHUB_DATABASE_URL",
            "postgres://app:dbpass@127.0.0.1:5432/test",
        ),
    ];
    let run = ringhub(&["check-config"], &env, &dir);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !run.stdout.contains(secret) && !run.stdout.contains(key) && !run.stdout.contains("dbpass"),
        "{}",
        run.stdout
    );
    assert_eq!(value_of(&run.stdout, "jwt_secret"), Some(r#""***""#));
    assert_eq!(
        value_of(&run.stdout, "database_url"),
        Some(r#""postgres://app:***@127.0.0.1:5432/test""#)
    );

    let prod = [
        ("RINGHUB_MODE", "production"),
        ("RINGHUB_BEHIND_PROXY", "true"),
    ];
    let run = ringhub(&["check-config"], &prod, &dir);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("production mode requires `jwt_secret`"),
        "{}",
        run.stderr
    );
    let weak = [
        prod[0],
        prod[1],
        ("RINGHUB_JWT_SECRET", "short"),
        ("RINGHUB_BLIND_INDEX_KEY", secret),
        ("RINGHUB_ENCRYPTION_KEY", key),
    ];
    let run = ringhub(&["check-config"], &weak, &dir);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("shorter than 32 bytes"),
        "{}",
        run.stderr
    );
    let run = ringhub(&["check-config"], &[("RINGHUB_MODE", "production")], &dir);
    assert!(run.stderr.contains("plaintext"), "{}", run.stderr);
    let bad_key = [("RINGHUB_ENCRYPTION_KEY", "bm90IDMyIGJ5dGVz")];
    let run = ringhub(&["check-config"], &bad_key, &dir);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("exactly 32 bytes"), "{}", run.stderr);
}

#[test]
fn development_secrets_are_generated_once_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("devsecrets");
    // Every command that needs secrets (here `token`) generates the missing ones; check-config never does.
    let first = ringhub(&["token", "--user", "u1", "--data-dir", "data"], &[], &dir);
    assert_eq!(first.code, 0, "{first:?}");
    let path = dir.join("data/secrets.toml");
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{e}: {first:?}"));
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let content = std::fs::read_to_string(&path).unwrap();
    assert!(
        content.contains("jwt_secret")
            && content.contains("encryption_key")
            && content.contains("blind_index_key")
    );
    let second = ringhub(&["token", "--user", "u1", "--data-dir", "data"], &[], &dir);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        content,
        "secrets must be generated only once"
    );
    let run = ringhub(&["check-config", "--data-dir", "data"], &[], &dir);
    assert!(
        run.stdout.contains("# jwt_secret = *** (from"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains(
            content
                .lines()
                .nth(1)
                .unwrap_or("x")
                .split('"')
                .nth(1)
                .unwrap_or("x")
        )
    );
}

#[test]
fn redis_settings_are_checked_and_an_unreachable_redis_stops_serve() {
    let dir = scratch_dir("redis-checked");
    // The syntax is checked...
    let bad = ringhub(&["check-config", "--redis-url", "http://h"], &[], &dir);
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("`redis_url`"), "{}", bad.stderr);
    // ...a CA file without TLS to Redis is a mistake, not something to ignore...
    let tls = ringhub(
        &[
            "check-config",
            "--redis-url",
            "redis://h:6380",
            "--redis-ca-file",
            "/tmp/ca.pem",
        ],
        &[],
        &dir,
    );
    assert_eq!(tls.code, 2, "{tls:?}");
    assert!(tls.stderr.contains("redis_ca_file"), "{}", tls.stderr);
    let prefix = ringhub(&["check-config", "--redis-prefix", "a{b}"], &[], &dir);
    assert_eq!(prefix.code, 2, "{prefix:?}");
    assert!(
        prefix.stderr.contains("`redis_prefix`"),
        "{}",
        prefix.stderr
    );
    // ...and a Redis nobody answers at makes `serve` stop at once, naming the address (a server
    // that starts is killed after 10 s and fails the test).
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        probe.local_addr().expect("addr").port()
    };
    let url = format!("redis://127.0.0.1:{port}");
    for (flags, expected) in [
        (
            vec!["--redis-url", url.as_str()],
            format!("127.0.0.1:{port}"),
        ),
        (
            vec!["--redis-url", "redis://127.0.0.1:6379", "--redis-cluster"],
            "is not a Redis Cluster node, but redis_cluster = true".to_owned(),
        ),
    ] {
        let mut child = std::process::Command::new(ringhub_tests::ringhub_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
            .args(&flags)
            .current_dir(&*dir)
            .env_clear()
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let run: ringhub_tests::Run = child.wait_with_output().expect("output").into();
        let status = status.unwrap_or_else(|| panic!("serve ran with {flags:?}: {run:?}"));
        assert!(!status.success(), "{run:?}");
        assert!(run.stderr.contains(&expected), "{}", run.stderr);
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = scratch_dir("usage");
    let run = ringhub(&["frobnicate"], &[], &dir);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("unknown command `frobnicate`"));
    let run = ringhub(&["--version"], &[], &dir);
    assert_eq!(
        (run.code, run.stdout.trim()),
        (0, concat!("ringhub ", env!("CARGO_PKG_VERSION")))
    );
}
