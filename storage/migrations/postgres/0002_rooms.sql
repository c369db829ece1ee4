-- 0002: persistent rooms (`POST /rooms`) and their memberships (SPEC §5); live admins by index.
-- PostgreSQL dialect: booleans BOOLEAN, epoch-ms times BIGINT.
-- Keep in step with ../sqlite/0002_rooms.sql (same tables, columns and index names).

CREATE TABLE rooms (
    id            TEXT    NOT NULL PRIMARY KEY,
    permission    TEXT    NOT NULL
                          CHECK (permission IN ('public', 'restricted', 'private', 'owner_only')),
    owner_id      TEXT    NOT NULL,           -- not a foreign key: a deleted owner keeps the room
    max_members   BIGINT  NOT NULL CHECK (max_members BETWEEN 0 AND 4294967295),
    presence      BOOLEAN NOT NULL,
    history       BOOLEAN NOT NULL,
    created_at_ms BIGINT  NOT NULL
);

CREATE TABLE room_members (
    room_id     TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    role        TEXT    NOT NULL CHECK (role IN ('member', 'moderator')),
    added_at_ms BIGINT  NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

-- `Users::admins`: the few live admins, without scanning every account.
CREATE INDEX users_admins_live ON users (id) WHERE role = 'admin' AND deleted_at_ms IS NULL;
