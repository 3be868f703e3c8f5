-- Releases before versions created their tables and indexes at every open
-- (CREATE … IF NOT EXISTS), the later ones among them as they came: a file
-- of any earlier layout may lack any of these. A new file has the first
-- three from the first migration.

CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, next_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (updated_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);

-- Signed queries whose signature does not cover the body, with the body
-- they were first taken with (see ReplayGuard).
CREATE TABLE IF NOT EXISTS replay (
    key        TEXT    PRIMARY KEY,
    body_hash  BLOB    NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
-- One row, rewritten by the readiness probe: a real page write and fsync.
CREATE TABLE IF NOT EXISTS probe (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    probes INTEGER NOT NULL
);
