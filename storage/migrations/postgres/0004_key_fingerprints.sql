-- 0004: the fingerprints of the keys that wrote this database (SPEC §10: every node of a service
-- shares jwt_secret or the EdDSA key, encryption_key and blind_index_key). One row per key name;
-- the fingerprint names the key without revealing it.
-- Keep in step with ../sqlite/0004_key_fingerprints.sql.

CREATE TABLE key_fingerprints (
    name           TEXT   NOT NULL PRIMARY KEY,
    fingerprint    TEXT   NOT NULL,
    recorded_at_ms BIGINT NOT NULL
);
