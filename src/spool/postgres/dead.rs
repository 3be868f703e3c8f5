//! The dead-letter table: listing, replaying and purging by filter.

use super::row::column;
use super::settle::{drop_events_if_done, lock_events_of};
use crate::spool::vocab::{DEAD, PENDING};
use crate::spool::{rows, DeadFilter, DeadLetter, DeadReason, SpoolError, UnixMs};
use const_format::formatcp;
use deadpool_postgres::Object;

/// A [`DeadFilter`] as statement parameters.
pub(super) struct FilterParams<'a> {
    target: Option<&'a str>,
    reason: Option<&'static str>,
    since: Option<i64>,
    until: Option<i64>,
    id: Option<i64>,
}

impl<'a> FilterParams<'a> {
    pub(super) fn of(f: &'a DeadFilter) -> Self {
        Self {
            target: f.target.as_deref(),
            reason: f.reason.map(DeadReason::as_str),
            since: f.since.map(|t| t.0),
            until: f.until.map(|t| t.0),
            id: f.delivery_id.map(|d| d.0),
        }
    }
}

/// The dead letters a filter selects, as a condition on `deliveries d` with
/// the filter's five parameters.
pub(super) const DEAD_SELECTION: &str = formatcp!(
    "d.state = {DEAD}
    AND ($1::text IS NULL OR d.target = $1)
    AND ($2::text IS NULL OR d.reason = $2)
    AND ($3::bigint IS NULL OR d.updated_at >= $3)
    AND ($4::bigint IS NULL OR d.updated_at < $4)
    AND ($5::bigint IS NULL OR d.id = $5)"
);

const DEAD_LETTERS: &str = formatcp!(
    "SELECT d.id, d.event_id, d.target, d.reason, d.last_error, d.attempts, e.account,
            e.dedup_key, e.msg_type, e.event, e.received_at, d.updated_at
     FROM deliveries d JOIN events e ON e.id = d.event_id
     WHERE {DEAD_SELECTION}
     ORDER BY d.updated_at, d.id LIMIT $6"
);

const REPLAY: &str = formatcp!(
    "UPDATE deliveries d SET state = {PENDING}, attempts = 0, next_at = $6, reason = '',
        updated_at = $6, step = 0, scheduled_at = $6, not_before = 0, lease_until = 0
     WHERE {DEAD_SELECTION} AND d.target IS NOT NULL
     RETURNING d.target"
);

const PURGE_PICK: &str = formatcp!(
    "SELECT d.id FROM deliveries d WHERE {DEAD_SELECTION}
     ORDER BY d.id LIMIT {PURGE_BATCH}"
);

const PURGE: &str = formatcp!("DELETE FROM deliveries WHERE id = ANY($1) AND state = {DEAD}");

pub(super) async fn dead_letters(
    c: &Object,
    filter: &DeadFilter,
    limit: usize,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let statement = c.prepare_cached(DEAD_LETTERS).await?;
    let f = FilterParams::of(filter);
    let rows = c
        .query(
            &statement,
            &[
                &f.target,
                &f.reason,
                &f.since,
                &f.until,
                &f.id,
                &super::sql_limit(limit),
            ],
        )
        .await?;
    rows.iter().map(rows::dead_letter).collect()
}

/// Makes the selected dead letters (those with a target) due at `now`, with
/// their attempts and schedules reset; returns their targets.
pub(super) async fn replay(
    c: &Object,
    filter: &DeadFilter,
    now: UnixMs,
) -> Result<Vec<String>, SpoolError> {
    let statement = c.prepare_cached(REPLAY).await?;
    let f = FilterParams::of(filter);
    let rows = c
        .query(
            &statement,
            &[&f.target, &f.reason, &f.since, &f.until, &f.id, &now.0],
        )
        .await?;
    column(&rows, "target")
}

/// Dead letters purged per transaction: a large purge never holds many
/// events' locks (and the outcomes of their other deliveries) for long.
const PURGE_BATCH: i64 = 1_000;

/// Deletes the selected dead letters, and their events once no delivery of
/// them is left, a batch at a time. Returns how many.
pub(super) async fn purge(c: &mut Object, filter: &DeadFilter) -> Result<u64, SpoolError> {
    let f = FilterParams::of(filter);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&f.target, &f.reason, &f.since, &f.until, &f.id];
    let mut purged = 0;
    loop {
        let tx = c.transaction().await?;
        let pick = tx.prepare_cached(PURGE_PICK).await?;
        let ids: Vec<i64> = column(&tx.query(&pick, &params).await?, "id")?;
        // Events first, then deliveries, as outcomes lock them.
        let events = lock_events_of(&tx, "d.id = ANY($1)", &[&ids]).await?;
        let delete = tx.prepare_cached(PURGE).await?;
        purged += tx.execute(&delete, &[&ids]).await?;
        drop_events_if_done(&tx, &events).await?;
        tx.commit().await?;
        if (ids.len() as i64) < PURGE_BATCH {
            return Ok(purged);
        }
    }
}
