-- The targets each replica's configuration names, as each last said (unix
-- ms). A pending delivery is retired (target_removed) only when no replica
-- seen lately names its target: during a rolling change of the
-- configuration, a replica on the older one does not retire the deliveries
-- of a target the newer one added.
CREATE TABLE replica_targets (
    replica text   NOT NULL,
    target  text   NOT NULL,
    seen_at bigint NOT NULL,
    PRIMARY KEY (replica, target)
);
