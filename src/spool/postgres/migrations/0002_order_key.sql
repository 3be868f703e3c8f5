-- Per-user ordering: a delivery with an order key (account and user) is not
-- leased while an earlier delivery of the same target and key is pending.
ALTER TABLE deliveries ADD COLUMN order_key text;
CREATE INDEX deliveries_order ON deliveries (target, order_key, id)
    WHERE state = 0 AND order_key IS NOT NULL;
