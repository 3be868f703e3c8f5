//! The words both engines store and share: a delivery's state codes, the
//! dead-letter reasons as stored, the events' columns, and the limits every
//! engine keeps. Statements spell them by name (`formatcp!`, at compile time),
//! so each is written once and the final SQL still carries the literal: a
//! partial index on `state = 0` is used only by a statement whose text says
//! `state = 0`, not by one that binds the value.
//!
//! The codes and names are what the files and databases hold: they never
//! change. The migrations, which create what an earlier release read, spell
//! them as the literals they were (`0` pending, `2` dead).

use super::{DeadReason, DeliveryState};
use std::time::Duration;

/// The `state` column's value for [`DeliveryState::Pending`].
pub const PENDING: i16 = 0;
/// The `state` column's value for [`DeliveryState::Dead`].
pub const DEAD: i16 = 2;

/// The `reason` column's values, as [`DeadReason::as_str`] names them.
pub const REJECTED: &str = "rejected";
pub const EXHAUSTED: &str = "exhausted";
pub const UNROUTED: &str = "unrouted";
pub const TARGET_REMOVED: &str = "target_removed";
pub const EXPIRED: &str = "expired";

/// The last error of a delivery whose target was removed.
pub const RETIRED_ERROR: &str = "the target is no longer in the configuration";

/// The events table's columns, as selected under the alias `e`; read back by
/// name (see `rows::event`).
pub const EVENT_COLUMNS: &str =
    "e.dedup_key, e.account, e.received_at, e.query, e.body, e.xml, e.fields, e.msg_type, e.event, \
     e.family, e.codec, e.appid, e.agent_id, e.info_type, e.trace_context";

/// The names of [`EVENT_COLUMNS`], in their order: where a hot query finds
/// them without asking the engine each column's name.
pub const EVENT_NAMES: [&str; 15] = [
    "dedup_key",
    "account",
    "received_at",
    "query",
    "body",
    "xml",
    "fields",
    "msg_type",
    "event",
    "family",
    "codec",
    "appid",
    "agent_id",
    "info_type",
    "trace_context",
];

/// Keeps a ticket unless its account has one as new or newer; the
/// parameters are the account, the ticket, its `CreateTime` and when it was
/// received. Returns the account when it was kept.
pub const KEEP_TICKET: &str =
    "INSERT INTO component_tickets (account, ticket, create_time, received_at)
     VALUES ($1, $2, $3, $4)
     ON CONFLICT (account) DO UPDATE
        SET ticket = excluded.ticket, create_time = excluded.create_time,
            received_at = excluded.received_at
        WHERE component_tickets.create_time < excluded.create_time
     RETURNING account";

/// Every account's latest ticket.
pub const TICKETS: &str =
    "SELECT account, ticket, create_time, received_at FROM component_tickets ORDER BY account";

/// The readiness probe's write: one row rewritten, a real write and commit.
pub const PROBE: &str = "INSERT INTO probe (id, probes) VALUES (1, 1)
     ON CONFLICT (id) DO UPDATE SET probes = probe.probes + 1";

/// Requests waiting for a writer (or SQLite's reader) at most; past it, they
/// are refused at once (`Busy`: a push gets 503 and WeChat retries it) rather
/// than queued in memory without limit while the disk or database stalls.
pub const QUEUE: usize = 8192;

/// How many pushes one group commit carries at most.
pub const DEFAULT_MAX_BATCH: usize = 512;

/// How often expired dedup keys and replay guards are deleted, in the
/// pushes' own time (tests move it with their clock).
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);

impl DeliveryState {
    /// What the `state` column holds for it.
    pub const fn code(self) -> i16 {
        match self {
            DeliveryState::Pending => PENDING,
            DeliveryState::Dead => DEAD,
        }
    }
}

impl DeadReason {
    /// What the `reason` column holds, the metrics label and the logs show,
    /// and `dlq --reason` takes.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => REJECTED,
            DeadReason::Exhausted => EXHAUSTED,
            DeadReason::Unrouted => UNROUTED,
            DeadReason::TargetRemoved => TARGET_REMOVED,
            DeadReason::Expired => EXPIRED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes are stored: files and databases written by earlier releases
    /// hold these values, and the migrations' partial indexes name them.
    #[test]
    fn the_event_names_are_the_event_columns() {
        let columns: Vec<String> = EVENT_NAMES.iter().map(|n| format!("e.{n}")).collect();
        let listed: Vec<&str> = EVENT_COLUMNS.split(',').map(str::trim).collect();
        assert_eq!(listed, columns);
    }

    #[test]
    fn the_stored_codes_never_change() {
        assert_eq!((PENDING, DEAD), (0, 2));
        let names: Vec<&str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "rejected",
                "exhausted",
                "unrouted",
                "target_removed",
                "expired"
            ]
        );
    }
}
