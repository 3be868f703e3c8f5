-- The event trail: what became of each push the relay answered, kept for a
-- retention period after its event has left the queue.
--
-- trail_events: one row per answered push (stored, duplicate or refused).
-- event_id is the queue's event id of a stored push (ids are never reused);
-- OpenIDs are kept only as a keyed hash and a mask. route holds the routed
-- targets, each followed by a newline.
CREATE TABLE trail_events (
    id          INTEGER PRIMARY KEY,
    event_id    INTEGER,
    received_at INTEGER NOT NULL,
    account     TEXT    NOT NULL,
    mode        TEXT    NOT NULL,
    msg_type    TEXT,
    event       TEXT,
    scene       TEXT,
    msg_id      TEXT,
    ticket      INTEGER NOT NULL DEFAULT 0,
    openid_hash BLOB,
    openid_mask TEXT,
    duplicate   INTEGER NOT NULL DEFAULT 0,
    route       TEXT    NOT NULL DEFAULT '',
    reply       TEXT,
    reply_ms    INTEGER,
    budget_ms   INTEGER,
    refusal     TEXT,
    source      TEXT
);
CREATE INDEX trail_events_event ON trail_events (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX trail_events_openid ON trail_events (openid_hash) WHERE openid_hash IS NOT NULL;

-- trail_steps: each delivery attempt, and each delivery's end (delivered,
-- dead, expired), by the queue's event id. An attempt that ended its
-- delivery carries the end too; an end with no attempt (expired, retired,
-- unrouted) has attempt NULL.
CREATE TABLE trail_steps (
    id         INTEGER PRIMARY KEY,
    event_id   INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    target     TEXT    NOT NULL DEFAULT '',
    attempt    INTEGER,
    inline     INTEGER NOT NULL DEFAULT 0,
    status     INTEGER,
    error      TEXT,
    latency_ms INTEGER,
    response   TEXT,
    circuit    TEXT,
    end_kind   TEXT,
    reason     TEXT
);
CREATE INDEX trail_steps_event ON trail_steps (event_id);

-- With keep_bodies: a copy of each stored event, so that one delivered (and
-- so gone from events) can be redelivered while its trail is kept.
CREATE TABLE trail_bodies (
    event_id    INTEGER PRIMARY KEY,
    dedup_key   TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    query       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    xml         TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    msg_type    TEXT    NOT NULL,
    event       TEXT,
    family      TEXT,
    codec       TEXT,
    appid       TEXT,
    agent_id    TEXT,
    info_type   TEXT,
    trace_context TEXT
);

-- The key of the OpenIDs' hashes when the configuration sets none: made
-- once, shared by whatever opens the file.
CREATE TABLE trail_key (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    key BLOB    NOT NULL
);
