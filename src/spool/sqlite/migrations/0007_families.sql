-- Every callback family at one relay. An event keeps what was verified
-- beyond its message, which its targets' formats need long after the
-- request: its family and codec (NULL for an Official Account's XML, which
-- every earlier event was) and the family's identifiers (an Open Platform's
-- authoriser and InfoType, a WeCom app's AgentID).
ALTER TABLE events ADD COLUMN family TEXT;
ALTER TABLE events ADD COLUMN codec TEXT;
ALTER TABLE events ADD COLUMN appid TEXT;
ALTER TABLE events ADD COLUMN agent_id TEXT;
ALTER TABLE events ADD COLUMN info_type TEXT;

-- Each Open Platform's latest component_verify_ticket: the one with the
-- newest CreateTime (unix seconds), and when it was received (unix ms).
CREATE TABLE component_tickets (
    account     TEXT    PRIMARY KEY,
    ticket      TEXT    NOT NULL,
    create_time INTEGER NOT NULL,
    received_at INTEGER NOT NULL
) WITHOUT ROWID;
