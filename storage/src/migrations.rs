//! The versioned schema: one ordered list of `(version, sql)` migrations per SQL dialect, whose
//! text lives in `storage/migrations/{sqlite,postgres}/NNNN_*.sql`, and the bookkeeping table
//! `schema_migrations` that records which versions a database has applied.
//!
//! This module owns the SQL text and the rules every list obeys (versions start at 1, strictly
//! increasing, the same versions in both dialects). It must not talk to a database: each backend
//! applies the pending entries itself, in one transaction at open, under its own lock (SQLite
//! `BEGIN IMMEDIATE`, PostgreSQL `pg_advisory_xact_lock`), so that a second run, or a second
//! process opening the same database, applies nothing twice.
//!
//! A shipped migration is never edited: a change to the schema is a new, higher version in
//! both lists.

/// The SQLite migrations, in order.
pub const SQLITE: &[(u32, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_rooms.sql")),
    (
        3,
        include_str!("../migrations/sqlite/0003_refresh_children.sql"),
    ),
    (
        4,
        include_str!("../migrations/sqlite/0004_key_fingerprints.sql"),
    ),
    (5, include_str!("../migrations/sqlite/0005_settings.sql")),
];

/// The PostgreSQL migrations, in order.
pub const POSTGRES: &[(u32, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (2, include_str!("../migrations/postgres/0002_rooms.sql")),
    (
        3,
        include_str!("../migrations/postgres/0003_refresh_children.sql"),
    ),
    (
        4,
        include_str!("../migrations/postgres/0004_key_fingerprints.sql"),
    ),
    (5, include_str!("../migrations/postgres/0005_settings.sql")),
];

/// The bookkeeping table, created (if missing) before any migration runs. SQLite and
/// PostgreSQL both accept this spelling.
pub const SCHEMA_MIGRATIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)";

/// The highest version of `migrations` (0 for an empty list): what
/// [`Store::schema_version`](crate::Store::schema_version) reports once they are applied.
pub const fn latest(migrations: &[(u32, &str)]) -> u32 {
    let mut max = 0;
    let mut i = 0;
    while i < migrations.len() {
        if migrations[i].0 > max {
            max = migrations[i].0;
        }
        i += 1;
    }
    max
}

/// The entries of `migrations` newer than `applied` (the highest version already applied), in
/// order.
pub fn pending(
    migrations: &'static [(u32, &'static str)],
    applied: u32,
) -> &'static [(u32, &'static str)] {
    let first = migrations.partition_point(|&(version, _)| version <= applied);
    &migrations[first..]
}

/// Which uniqueness rule a violated constraint, index or column belongs to, for
/// [`StoreError::Conflict`](crate::StoreError::Conflict). `detail` is the PostgreSQL constraint
/// name or SQLite's `UNIQUE constraint failed: table.column` message; both spell the schema's
/// names above (`users_email_live` / `users.email_index`, `users_username_live` /
/// `users.username_lower`, `idempotency_pkey` / `idempotency.scope, idempotency.key`); every other
/// primary key (`rooms_pkey` / `rooms.id` included) is an `"id"`.
pub(crate) fn conflict_kind(detail: &str) -> &'static str {
    if detail.contains("email") {
        "email"
    } else if detail.contains("username") {
        "username"
    } else if detail.contains("idempotency") {
        "key"
    } else {
        "id"
    }
}

/// Now, in epoch milliseconds, for `applied_at_ms` (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(list: &[(u32, &str)]) {
        assert!(!list.is_empty());
        for (i, (version, sql)) in list.iter().enumerate() {
            assert_eq!(
                *version as usize,
                i + 1,
                "versions are 1, 2, 3… without gaps"
            );
            assert!(!sql.trim().is_empty());
        }
    }

    #[test]
    fn lists_are_ordered_and_in_step() {
        check(SQLITE);
        check(POSTGRES);
        let sqlite: Vec<u32> = SQLITE.iter().map(|m| m.0).collect();
        let postgres: Vec<u32> = POSTGRES.iter().map(|m| m.0).collect();
        assert_eq!(sqlite, postgres, "both dialects carry the same versions");
        assert_eq!(latest(SQLITE), latest(POSTGRES));
        assert_eq!(latest(&[]), 0);
    }

    #[test]
    fn conflict_names() {
        assert_eq!(
            conflict_kind("UNIQUE constraint failed: users.email_index"),
            "email"
        );
        assert_eq!(conflict_kind("users_username_live"), "username");
        assert_eq!(conflict_kind("idempotency_pkey"), "key");
        assert_eq!(conflict_kind("UNIQUE constraint failed: users.id"), "id");
        assert_eq!(conflict_kind("sessions_pkey"), "id");
        assert_eq!(conflict_kind("rooms_pkey"), "id");
        assert_eq!(conflict_kind("UNIQUE constraint failed: rooms.id"), "id");
    }

    #[test]
    fn pending_skips_applied_versions() {
        static LIST: &[(u32, &str)] = &[(1, "a"), (2, "b"), (3, "c")];
        assert_eq!(pending(LIST, 0).len(), 3);
        assert_eq!(pending(LIST, 2), &[(3, "c")]);
        assert!(pending(LIST, 3).is_empty());
        assert!(pending(LIST, 9).is_empty());
    }

    #[test]
    fn both_dialects_name_the_same_indexes() {
        let by_version: &[(usize, &[&str])] = &[
            (
                0,
                &[
                    "users_email_live",
                    "users_username_live",
                    "sessions_user",
                    "refresh_tokens_session",
                    "revocations_keep_until",
                    "idempotency_created",
                ],
            ),
            (1, &["room_members_user", "users_admins_live"]),
        ];
        for &(i, names) in by_version {
            for name in names {
                assert!(SQLITE[i].1.contains(name), "{name} in sqlite {}", i + 1);
                assert!(POSTGRES[i].1.contains(name), "{name} in postgres {}", i + 1);
            }
        }
    }
}
