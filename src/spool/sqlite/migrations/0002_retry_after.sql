-- Set by a Retry-After: the target asked not to be called before this.
ALTER TABLE deliveries ADD COLUMN not_before INTEGER NOT NULL DEFAULT 0;
