-- The W3C trace context (a `traceparent` value) of the push that stored
-- the event, when traces are exported: every delivery attempt, by any
-- worker, however late, joins the push's trace. NULL when they are not.
ALTER TABLE events ADD COLUMN trace_context TEXT;
