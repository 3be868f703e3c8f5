-- The shared queue: events, their deliveries, dedup keys and replay guards.
-- Applied with search_path set to the configured schema.
--
-- Rows here are short-lived: an event and its deliveries are deleted as the
-- targets take them, dedup keys and replay guards when they expire. Such
-- queue tables leave dead row versions behind faster than autovacuum's
-- defaults (a vacuum once a fifth of the table is dead) clean them up, so
-- each table asks for a vacuum once 1% of its rows (and at least 1,000) are
-- dead: the space is reused by the next inserts and the tables stay at
-- the size of what they hold, rather than what they once held.

CREATE TABLE events (
    id          bigserial PRIMARY KEY,
    dedup_key   text   NOT NULL,
    account     text   NOT NULL,
    received_at bigint NOT NULL,
    query       text   NOT NULL,
    body        bytea  NOT NULL,
    xml         text   NOT NULL,
    fields      text   NOT NULL,
    msg_type    text   NOT NULL,
    event       text
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);

-- state: 0 pending, 2 dead. A lease is the owner (a replica's id), the time
-- it ends (unix ms) and a token taken from lease_tokens for every lease, which
-- an outcome must match to be recorded.
CREATE TABLE deliveries (
    id           bigserial PRIMARY KEY,
    event_id     bigint   NOT NULL REFERENCES events (id),
    target       text,
    state        smallint NOT NULL,
    attempts     integer  NOT NULL DEFAULT 0,
    next_at      bigint   NOT NULL,
    last_error   text     NOT NULL DEFAULT '',
    reason       text     NOT NULL DEFAULT '',
    updated_at   bigint   NOT NULL,
    not_before   bigint   NOT NULL DEFAULT 0,
    step         integer  NOT NULL DEFAULT 0,
    scheduled_at bigint   NOT NULL DEFAULT 0,
    lease_owner  text,
    lease_until  bigint   NOT NULL DEFAULT 0,
    lease_token  bigint   NOT NULL DEFAULT 0,
    -- Per-user ordering: a delivery with an order key (account and user) is
    -- not leased while an earlier delivery of its target and key is pending.
    order_key    text
    -- Room on each page, so that a lease (which changes no indexed column)
    -- is written as a HOT update beside the row.
) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);

CREATE SEQUENCE lease_tokens;
CREATE INDEX deliveries_due ON deliveries (target, next_at, id) WHERE state = 0;
-- Due deliveries without an order key, apart from ordered ones: the lease
-- reads them in due order without stepping over a large ordered backlog,
-- whose deliveries it reaches through deliveries_order, one per key.
CREATE INDEX deliveries_due_unordered ON deliveries (target, next_at, id)
    WHERE state = 0 AND order_key IS NULL;
CREATE INDEX deliveries_order ON deliveries (target, order_key, id)
    WHERE state = 0 AND order_key IS NOT NULL;
CREATE INDEX deliveries_dead ON deliveries (updated_at, id) WHERE state = 2;
CREATE INDEX deliveries_event ON deliveries (event_id);

CREATE TABLE dedup (
    key        text   PRIMARY KEY,
    expires_at bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX dedup_expires ON dedup (expires_at);

CREATE TABLE replay (
    key        text   PRIMARY KEY,
    body_hash  bytea  NOT NULL,
    expires_at bigint NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
CREATE INDEX replay_expires ON replay (expires_at);

-- One row, rewritten by the readiness probe: a real write and commit.
CREATE TABLE probe (
    id     integer PRIMARY KEY CHECK (id = 1),
    probes bigint  NOT NULL
);

-- The targets each replica's configuration names, as each last said (unix
-- ms). A pending delivery is retired (target_removed) only when no replica
-- seen lately names its target: during a rolling change of the
-- configuration, a replica on the older one does not retire the deliveries
-- of a target the newer one added.
CREATE TABLE replica_targets (
    replica text   NOT NULL,
    target  text   NOT NULL,
    seen_at bigint NOT NULL,
    PRIMARY KEY (replica, target)
);
