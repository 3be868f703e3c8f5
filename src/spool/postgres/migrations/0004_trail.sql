-- The event trail: what became of each push the relay answered, kept for a
-- retention period after its event has left the queue; shared by every
-- replica. The same tables as the SQLite spool's (see its 0009_trail.sql).
-- Rows are pruned from the oldest in small batches: each table asks for a
-- vacuum once 1% of its rows are dead, as the queue's do.

CREATE TABLE trail_events (
    id          bigserial PRIMARY KEY,
    event_id    bigint,
    received_at bigint   NOT NULL,
    account     text     NOT NULL,
    mode        text     NOT NULL,
    msg_type    text,
    event       text,
    scene       text,
    msg_id      text,
    ticket      smallint NOT NULL DEFAULT 0,
    openid_hash bytea,
    openid_mask text,
    duplicate   smallint NOT NULL DEFAULT 0,
    route       text     NOT NULL DEFAULT '',
    reply       text,
    reply_ms    bigint,
    budget_ms   bigint,
    refusal     text,
    source      text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX trail_events_event ON trail_events (event_id) WHERE event_id IS NOT NULL;
CREATE INDEX trail_events_openid ON trail_events (openid_hash) WHERE openid_hash IS NOT NULL;

CREATE TABLE trail_steps (
    id         bigserial PRIMARY KEY,
    event_id   bigint   NOT NULL,
    at         bigint   NOT NULL,
    target     text     NOT NULL DEFAULT '',
    attempt    integer,
    inline     smallint NOT NULL DEFAULT 0,
    status     integer,
    error      text,
    latency_ms bigint,
    response   text,
    circuit    text,
    end_kind   text,
    reason     text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX trail_steps_event ON trail_steps (event_id);

CREATE TABLE trail_bodies (
    event_id      bigint PRIMARY KEY,
    dedup_key     text   NOT NULL,
    account       text   NOT NULL,
    received_at   bigint NOT NULL,
    query         text   NOT NULL,
    body          bytea  NOT NULL,
    xml           text   NOT NULL,
    fields        text   NOT NULL,
    msg_type      text   NOT NULL,
    event         text,
    family        text,
    codec         text,
    appid         text,
    agent_id      text,
    info_type     text,
    trace_context text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);

CREATE TABLE trail_key (
    id  integer PRIMARY KEY CHECK (id = 1),
    key bytea   NOT NULL
);
