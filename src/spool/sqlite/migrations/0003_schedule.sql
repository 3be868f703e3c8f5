-- The retry schedule's place, apart from next_at (which a release moves),
-- each delivery's taken from what it had: its failed attempts and its due
-- time.
ALTER TABLE deliveries ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN scheduled_at INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET step = attempts, scheduled_at = next_at;
