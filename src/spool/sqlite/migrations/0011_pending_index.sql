-- One index for the pending deliveries instead of two. `deliveries_due`
-- (every pending delivery by target and due time) and `deliveries_heads`
-- (the same, only those no earlier delivery of their user holds back) were
-- both written for every delivery stored, moved and settled. Ordered by
-- target, then `blocked`, then due time, this one serves both: a lease
-- reads its heads (`blocked = 0`) in due order, and the listings of a
-- target's waiting deliveries read its two parts in due order and merge them.
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_heads;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (target, blocked, next_at)
    WHERE state = 0;
