-- A reply target's answer that came after WeChat's five seconds, kept per
-- account and user before anything is sent: `customer_service` ones wait for
-- a sender (leased like deliveries, retried, dead-lettered with WeChat's
-- errcode and errmsg); `next_message` ones wait for the user's next push
-- until `expires_at`. A sent one is deleted.
CREATE TABLE late_replies (
    id          bigserial PRIMARY KEY,
    account     text      NOT NULL,
    openid      text      NOT NULL,
    channel     text      NOT NULL,
    message     text      NOT NULL,
    pushed_at   bigint    NOT NULL,
    expires_at  bigint    NOT NULL,
    state       text      NOT NULL DEFAULT 'pending',
    attempts    bigint    NOT NULL DEFAULT 0,
    due_at      bigint    NOT NULL,
    lease_token bigint    NOT NULL DEFAULT 0,
    lease_until bigint    NOT NULL DEFAULT 0,
    errcode     bigint    NOT NULL DEFAULT 0,
    errmsg      text      NOT NULL DEFAULT '',
    dead_at     bigint    NOT NULL DEFAULT 0
);
CREATE INDEX late_replies_due ON late_replies (state, channel, due_at);
CREATE INDEX late_replies_user ON late_replies (account, openid, state);

-- An account's access token for WeChat's API, shared by every replica so
-- that one fetch serves them all.
CREATE TABLE api_tokens (
    account    text   PRIMARY KEY,
    token      text   NOT NULL,
    expires_at bigint NOT NULL
);
