-- 1 while an earlier pending delivery of the same target and order_key
-- exists: set at enqueue, cleared for the next one when the head is
-- delivered or dead-lettered, and set again by a replay for the deliveries
-- behind a replayed one. Set now on every pending delivery that an earlier
-- pending one of its user holds back.
ALTER TABLE deliveries ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET blocked = 1
WHERE state = 0 AND order_key IS NOT NULL AND EXISTS (
    SELECT 1 FROM deliveries p
    WHERE p.target = deliveries.target AND p.order_key = deliveries.order_key
      AND p.id < deliveries.id AND p.state = 0);
-- The due deliveries that no earlier one of their user holds back: all a
-- lease reads.
CREATE INDEX IF NOT EXISTS deliveries_heads ON deliveries (target, next_at)
    WHERE state = 0 AND blocked = 0;
