-- Every callback family at one relay. An event keeps what was verified
-- beyond its message, which its targets' formats need long after the
-- request: its family and codec (NULL for an Official Account's XML, which
-- every earlier event was) and the family's identifiers (an Open Platform's
-- authoriser and InfoType, a WeCom app's AgentID). Adding NULL columns
-- rewrites nothing.
ALTER TABLE events
    ADD COLUMN family    text,
    ADD COLUMN codec     text,
    ADD COLUMN appid     text,
    ADD COLUMN agent_id  text,
    ADD COLUMN info_type text;

-- Each Open Platform's latest component_verify_ticket, shared by every
-- replica: the one with the newest CreateTime (unix seconds), and when it
-- was received (unix ms).
CREATE TABLE component_tickets (
    account     text   PRIMARY KEY,
    ticket      text   NOT NULL,
    create_time bigint NOT NULL,
    received_at bigint NOT NULL
);
