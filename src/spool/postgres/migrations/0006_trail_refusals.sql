-- Refused pushes in a table of their own, bounded by [trail] max_refusals
-- apart from the answered pushes' max_events (see the SQLite spool's
-- 0012_trail_refusals.sql).
CREATE TABLE trail_refusals (
    id          bigserial PRIMARY KEY,
    received_at bigint NOT NULL,
    account     text   NOT NULL,
    refusal     text   NOT NULL,
    source      text   NOT NULL DEFAULT ''
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);

INSERT INTO trail_refusals (received_at, account, refusal, source)
    SELECT received_at, account, refusal, COALESCE(source, '') FROM trail_events
    WHERE refusal IS NOT NULL ORDER BY id;
DELETE FROM trail_events WHERE refusal IS NOT NULL;

-- No index on the OpenIDs' hashes (see the SQLite spool's
-- 0012_trail_refusals.sql): a search by OpenID reads the kept events from
-- the newest back, bounded by max_events.
DROP INDEX trail_events_openid;
