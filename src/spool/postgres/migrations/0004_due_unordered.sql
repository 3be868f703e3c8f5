-- Due deliveries without an order key, apart from ordered ones: the lease
-- reads them in due order without stepping over a large ordered backlog,
-- whose deliveries it reaches through deliveries_order, one per key.
CREATE INDEX deliveries_due_unordered ON deliveries (target, next_at, id)
    WHERE state = 0 AND order_key IS NULL;
