-- 0001: accounts, sessions and their refresh tokens, revocations, idempotency records.
-- PostgreSQL dialect: ids TEXT, epoch-ms times BIGINT, bytes BYTEA. Tables are created in the
-- first schema of the connection's search_path (see `postgres::scratch_schema_url`).
-- Keep in step with ../sqlite/0001_init.sql (same tables, columns and index names).

CREATE TABLE users (
    id             TEXT    NOT NULL PRIMARY KEY,
    username       TEXT    NOT NULL,
    username_lower TEXT    NOT NULL,
    email_cipher   BYTEA   NOT NULL,           -- emptied by a soft delete
    email_index    BYTEA,                      -- NULL once soft-deleted
    password_hash  TEXT    NOT NULL,           -- emptied by a soft delete
    role           TEXT    NOT NULL CHECK (role IN ('user', 'admin')),
    created_at_ms  BIGINT  NOT NULL,
    deleted_at_ms  BIGINT
);
CREATE UNIQUE INDEX users_email_live ON users (email_index) WHERE deleted_at_ms IS NULL;
CREATE UNIQUE INDEX users_username_live ON users (username_lower) WHERE deleted_at_ms IS NULL;

CREATE TABLE sessions (
    id              TEXT    NOT NULL PRIMARY KEY,
    user_id         TEXT    NOT NULL REFERENCES users (id),
    created_at_ms   BIGINT  NOT NULL,
    last_used_at_ms BIGINT  NOT NULL,
    expires_at_ms   BIGINT  NOT NULL,
    ip              TEXT    NOT NULL,
    user_agent      TEXT    NOT NULL,
    revoked_at_ms   BIGINT
);
CREATE INDEX sessions_user ON sessions (user_id);

CREATE TABLE refresh_tokens (
    token_hash    BYTEA   NOT NULL PRIMARY KEY,
    session_id    TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    created_at_ms BIGINT  NOT NULL,
    rotated_at_ms BIGINT,
    child_cipher  BYTEA
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE revocations (
    kind          TEXT    NOT NULL CHECK (kind IN ('session', 'user')),
    subject       TEXT    NOT NULL,
    revoked_at_ms BIGINT  NOT NULL,
    keep_until_ms BIGINT  NOT NULL,
    PRIMARY KEY (kind, subject)
);
CREATE INDEX revocations_keep_until ON revocations (keep_until_ms);

CREATE TABLE idempotency (
    scope           TEXT    NOT NULL,
    key             TEXT    NOT NULL,
    body_hash       BYTEA   NOT NULL,
    status          INTEGER NOT NULL,
    response_cipher BYTEA   NOT NULL,
    token_hash      BYTEA,
    created_at_ms   BIGINT  NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_created ON idempotency (created_at_ms);
