-- Refused pushes in a table of their own, bounded by [trail] max_refusals
-- apart from the answered pushes' max_events: a flood of refusals is pruned
-- by its own count and never evicts the history of answered pushes. Each
-- table's ids only grow, so each bound is a difference of ids.
CREATE TABLE trail_refusals (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    account     TEXT    NOT NULL,
    refusal     TEXT    NOT NULL,
    source      TEXT    NOT NULL DEFAULT ''
);

INSERT INTO trail_refusals (received_at, account, refusal, source)
    SELECT received_at, account, refusal, COALESCE(source, '') FROM trail_events
    WHERE refusal IS NOT NULL ORDER BY id;
DELETE FROM trail_events WHERE refusal IS NOT NULL;

-- No index on the OpenIDs' hashes: each push's hash is a random key, so its
-- index took a page of its own in nearly every push's commit (the rest of
-- the trail's rows and indexes are appended, many pushes to a page). A
-- search by OpenID reads the kept events from the newest back instead,
-- bounded by max_events (see README, "Performance").
DROP INDEX trail_events_openid;
