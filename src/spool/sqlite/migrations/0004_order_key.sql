-- Account and sender, for a target that takes one user's events in order.
-- Deliveries stored before have none, so they keep being sent unordered.
ALTER TABLE deliveries ADD COLUMN order_key TEXT;
-- Finds the pending deliveries of one user, to find the next head.
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (target, order_key, id)
    WHERE state = 0 AND order_key IS NOT NULL;
