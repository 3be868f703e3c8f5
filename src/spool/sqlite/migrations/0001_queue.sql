-- The queue as the first release laid it out: events, their deliveries and
-- the dedup keys. A spool file from before versions was made by these
-- statements (its deliveries' ids without AUTOINCREMENT).
--
-- state: 0 pending, 2 dead (the codes of spool::vocab, stored: never changed).

CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key   TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    query       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    xml         TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    msg_type    TEXT    NOT NULL,
    event       TEXT
);
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    INTEGER NOT NULL REFERENCES events(id),
    target      TEXT,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT '',
    reason      TEXT    NOT NULL DEFAULT '',
    updated_at  INTEGER NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (target, next_at) WHERE state = 0;
CREATE INDEX deliveries_dead ON deliveries (updated_at) WHERE state = 2;
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE TABLE dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
