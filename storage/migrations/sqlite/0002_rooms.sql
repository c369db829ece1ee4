-- 0002: persistent rooms (`POST /rooms`) and their memberships (SPEC §5); live admins by index.
-- SQLite dialect: STRICT tables; booleans INTEGER 0/1, epoch-ms times INTEGER.
-- Keep in step with ../postgres/0002_rooms.sql (same tables, columns and index names).

CREATE TABLE rooms (
    id            TEXT    NOT NULL PRIMARY KEY,
    permission    TEXT    NOT NULL
                          CHECK (permission IN ('public', 'restricted', 'private', 'owner_only')),
    owner_id      TEXT    NOT NULL,           -- not a foreign key: a deleted owner keeps the room
    max_members   INTEGER NOT NULL CHECK (max_members BETWEEN 0 AND 4294967295),
    presence      INTEGER NOT NULL CHECK (presence IN (0, 1)),
    history       INTEGER NOT NULL CHECK (history IN (0, 1)),
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE room_members (
    room_id     TEXT    NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id     TEXT    NOT NULL,
    role        TEXT    NOT NULL CHECK (role IN ('member', 'moderator')),
    added_at_ms INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
) STRICT;
CREATE INDEX room_members_user ON room_members (user_id);

-- `Users::admins`: the few live admins, without scanning every account.
CREATE INDEX users_admins_live ON users (id) WHERE role = 'admin' AND deleted_at_ms IS NULL;
