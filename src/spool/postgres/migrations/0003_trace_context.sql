-- The W3C trace context (a `traceparent` value) of the push that stored
-- the event, when traces are exported: every delivery attempt, by any
-- replica's worker, however late, joins the push's trace. NULL when they
-- are not. Nullable with no default: adding it rewrites no row.
ALTER TABLE events ADD COLUMN trace_context text;
