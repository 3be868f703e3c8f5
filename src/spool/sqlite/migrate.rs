//! The spool file's schema versions, by the mechanism PostgreSQL's schema
//! uses (see `spool::migration`): the migrations below, each applied once
//! in order, the version reached kept in the file's `user_version`.
//!
//! A file from before versions (`user_version` 0, with tables) is placed by
//! the columns its release had added, then takes the steps after that: every
//! layout an earlier release wrote opens.

use crate::spool::migration::{self, Migrated, Migration};
use crate::spool::SpoolError;
use rusqlite::{Connection, TransactionBehavior};
use std::path::Path;

const MIGRATIONS: &[Migration] = &[
    Migration::new(1, "queue", include_str!("migrations/0001_queue.sql")),
    Migration::new(
        2,
        "retry_after",
        include_str!("migrations/0002_retry_after.sql"),
    ),
    Migration::new(3, "schedule", include_str!("migrations/0003_schedule.sql")),
    Migration::new(
        4,
        "order_key",
        include_str!("migrations/0004_order_key.sql"),
    ),
    Migration::new(5, "blocked", include_str!("migrations/0005_blocked.sql")),
    Migration::new(
        6,
        "created_at_open",
        include_str!("migrations/0006_created_at_open.sql"),
    ),
    Migration::new(7, "families", include_str!("migrations/0007_families.sql")),
    Migration::new(
        8,
        "trace_context",
        include_str!("migrations/0008_trace_context.sql"),
    ),
    Migration::new(
        9,
        "late_replies",
        include_str!("migrations/0009_late_replies.sql"),
    ),
    Migration::new(10, "trail", include_str!("migrations/0010_trail.sql")),
    Migration::new(
        11,
        "pending_index",
        include_str!("migrations/0011_pending_index.sql"),
    ),
    Migration::new(
        12,
        "trail_refusals",
        include_str!("migrations/0012_trail_refusals.sql"),
    ),
];

/// The column each step before versions added, by the version it is.
const UNVERSIONED: [(i32, &str); 4] = [
    (2, "not_before"),
    (3, "step"),
    (4, "order_key"),
    (5, "blocked"),
];

/// The newest version this binary knows.
pub fn latest() -> i32 {
    migration::latest(MIGRATIONS)
}

/// Applies the migrations the file lacks, or refuses a file newer than this
/// binary knows. Immediate, so that of two processes opening an old file at
/// once the second finds it migrated.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<Migrated, SpoolError> {
    let store = format!("spool file {}", path.display());
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let from = match version {
        0 => unversioned(&tx)?,
        v => v,
    };
    migration::refuse_newer(MIGRATIONS, &store, from)?;
    for m in migration::after(MIGRATIONS, from) {
        tx.execute_batch(m.sql)?;
    }
    if version != latest() {
        tx.pragma_update(None, "user_version", latest())?;
    }
    tx.commit()?;
    Ok(Migrated::of(
        store,
        from,
        migration::after(MIGRATIONS, from),
    ))
}

/// Where a file from before versions stands: 0 when it has no tables yet.
fn unversioned(c: &Connection) -> rusqlite::Result<i32> {
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('deliveries')")?
        .query_map([], |r| r.get("name"))?
        .collect::<rusqlite::Result<_>>()?;
    if columns.is_empty() {
        return Ok(0);
    }
    Ok(UNVERSIONED
        .iter()
        .rev()
        .find(|(_, column)| columns.iter().any(|c| c == column))
        .map_or(1, |(version, _)| *version))
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_numbered_without_gaps() {
        assert!(crate::spool::migration::numbered_without_gaps(
            super::MIGRATIONS
        ));
    }
}
