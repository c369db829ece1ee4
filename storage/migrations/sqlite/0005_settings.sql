-- 0005: settings changed at run time through the API (today: `allowed_origins`, SPEC §10 point 8).
-- One row per setting, its value as JSON text; a stored setting wins over the configuration file.
-- Keep in step with ../postgres/0005_settings.sql.

CREATE TABLE settings (
    name          TEXT   NOT NULL PRIMARY KEY,
    value         TEXT   NOT NULL,
    changed_at_ms INTEGER NOT NULL
) STRICT;
