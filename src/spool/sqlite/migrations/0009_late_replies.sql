-- A reply target's answer that came after WeChat's five seconds, kept per
-- account and user before anything is sent: `customer_service` ones wait for
-- a sender (leased like deliveries, retried, dead-lettered with WeChat's
-- errcode and errmsg); `next_message` ones wait for the user's next push
-- until `expires_at`. A sent one is deleted.
CREATE TABLE late_replies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account     TEXT    NOT NULL,
    openid      TEXT    NOT NULL,
    channel     TEXT    NOT NULL,
    message     TEXT    NOT NULL,
    pushed_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'pending',
    attempts    INTEGER NOT NULL DEFAULT 0,
    due_at      INTEGER NOT NULL,
    lease_token INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER NOT NULL DEFAULT 0,
    -- The process that holds the lease: one lease taken by a process that
    -- has stopped (a crash, a kill -9) holds nothing.
    lease_owner TEXT    NOT NULL DEFAULT '',
    errcode     INTEGER NOT NULL DEFAULT 0,
    errmsg      TEXT    NOT NULL DEFAULT '',
    dead_at     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX late_replies_due ON late_replies (state, channel, due_at);
CREATE INDEX late_replies_user ON late_replies (account, openid, state);

-- An account's access token for WeChat's API, shared by every process on
-- the spool so that one fetch serves them all.
CREATE TABLE api_tokens (
    account    TEXT    PRIMARY KEY,
    token      TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
