//! Recording what became of leased deliveries, releasing backed-off ones,
//! retiring those of removed targets, and keeping each user's deliveries in
//! order: a pending delivery's `blocked` is 1 while an earlier pending one
//! of its target and `order_key` exists.

use super::held::Prepared;
use super::trail;
use crate::spool::trail_rows::end_of_dead;
use crate::spool::vocab::{DEAD, EXPIRED, PENDING, RETIRED_ERROR, TARGET_REMOVED};
use crate::spool::{
    DeadReason, DeliveryId, Release, Schedule, Settle, Settlement, TrailStore, UnixMs,
};
use const_format::formatcp;
use rusqlite::{params, Connection, OptionalExtension};

pub(super) fn record(
    c: &Prepared<'_>,
    settles: &[Settle],
    now: UnixMs,
    store: Option<&TrailStore>,
) -> rusqlite::Result<()> {
    for settle in settles {
        // The written outcome's delivery: its event and target.
        let written = match &settle.settlement {
            Settlement::Delivered { delivery_id } => delivered(c, *delivery_id)?,
            Settlement::Retry {
                delivery_id,
                next_at,
                schedule,
                not_before,
                error,
            } => retry(c, *delivery_id, *next_at, schedule, *not_before, error, now)?,
            Settlement::Dead {
                delivery_id,
                reason,
                error,
            } => dead(c, *delivery_id, *reason, error, now)?,
        };
        // The trail's step is written only for an outcome that is.
        if let (Some(_), Some((event_id, Some(target)))) = (store, written) {
            let end = match &settle.settlement {
                Settlement::Delivered { .. } => Some(("delivered", None)),
                Settlement::Retry { .. } => None,
                Settlement::Dead { reason, .. } => Some((end_of_dead(*reason), Some(*reason))),
            };
            trail::step(c, (event_id, &target), now, settle.trail.as_deref(), end)?;
        }
    }
    Ok(())
}

/// A delivery retired while its attempt was in flight was still delivered:
/// a replay would send it twice. Read, then deleted by its id: a `RETURNING`
/// clause would cost a temporary table per delivery.
const DELIVERED: &str = formatcp!(
    "SELECT event_id, target, order_key FROM deliveries WHERE id = ?1
       AND (state = {PENDING} OR (state = {DEAD} AND reason = '{TARGET_REMOVED}'))"
);

const DELETE_DELIVERY: &str = "DELETE FROM deliveries WHERE id = ?1";

/// The event and target of a delivery whose outcome was written.
type Written = Option<(i64, Option<String>)>;

fn delivered(c: &Prepared<'_>, id: DeliveryId) -> rusqlite::Result<Written> {
    let found: Option<(i64, Option<String>, Option<String>)> = c
        .statement(DELIVERED)?
        .borrow_mut()
        .query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((event_id, target, order_key)) = found else {
        return Ok(None);
    };
    c.statement(DELETE_DELIVERY)?
        .borrow_mut()
        .execute(params![id])?;
    drop_event_if_done(c, event_id)?;
    unblock_next(c, target.as_deref(), order_key.as_deref())?;
    Ok(Some((event_id, target)))
}

const RETRY: &str = formatcp!(
    "UPDATE deliveries SET attempts = attempts + 1, next_at = ?2, last_error = ?3, updated_at = ?4,
         not_before = ?5, step = ?6, scheduled_at = ?7
     WHERE id = ?1 AND state = {PENDING}
     RETURNING event_id, target"
);

fn retry(
    c: &Prepared<'_>,
    id: DeliveryId,
    next_at: UnixMs,
    schedule: &Schedule,
    not_before: UnixMs,
    error: &str,
    now: UnixMs,
) -> rusqlite::Result<Written> {
    let params = params![
        id,
        next_at,
        error,
        now,
        not_before,
        schedule.step,
        schedule.due_at
    ];
    c.statement(RETRY)?
        .borrow_mut()
        .query_row(params, |r| Ok((r.get("event_id")?, r.get("target")?)))
        .optional()
}

/// An expired delivery is dead-lettered instead of sent: no attempt.
const DEAD_LETTER: &str = formatcp!(
    "UPDATE deliveries SET state = {DEAD}, attempts = attempts + (?2 <> '{EXPIRED}'),
         reason = ?2, last_error = ?3, updated_at = ?4
     WHERE id = ?1 AND state = {PENDING}
     RETURNING event_id, target, order_key"
);

fn dead(
    c: &Prepared<'_>,
    id: DeliveryId,
    reason: DeadReason,
    error: &str,
    now: UnixMs,
) -> rusqlite::Result<Written> {
    let died: Option<(i64, Option<String>, Option<String>)> = c
        .statement(DEAD_LETTER)?
        .borrow_mut()
        .query_row(params![id, reason, error, now], |r| {
            Ok((r.get("event_id")?, r.get("target")?, r.get("order_key")?))
        })
        .optional()?;
    let Some((event_id, target, order_key)) = died else {
        return Ok(None);
    };
    unblock_next(c, target.as_deref(), order_key.as_deref())?;
    Ok(Some((event_id, target)))
}

/// Once a pending delivery of `order_key` is gone (delivered or dead), the
/// earliest pending one left of that user is the head: a lease may take it.
const UNBLOCK_NEXT: &str = formatcp!(
    "UPDATE deliveries SET blocked = 0 WHERE blocked = 1 AND id = (
         SELECT MIN(id) FROM deliveries
         WHERE target = ?1 AND order_key = ?2 AND order_key IS NOT NULL AND state = {PENDING})"
);

fn unblock_next(
    c: &Prepared<'_>,
    target: Option<&str>,
    order_key: Option<&str>,
) -> rusqlite::Result<()> {
    let (Some(target), Some(order_key)) = (target, order_key) else {
        return Ok(());
    };
    c.statement(UNBLOCK_NEXT)?
        .borrow_mut()
        .execute(params![target, order_key])?;
    Ok(())
}

/// After a replay made dead deliveries of `order_key` pending again, the
/// earliest pending one is the head and every later one waits behind it,
/// whether it was replayed or already pending.
const REORDER: &str = formatcp!(
    "UPDATE deliveries SET blocked = blocked_now FROM (
         SELECT id AS row_id, id > MIN(id) OVER () AS blocked_now FROM deliveries
         WHERE target = ?1 AND order_key = ?2 AND order_key IS NOT NULL AND state = {PENDING})
     WHERE id = row_id AND blocked IS NOT blocked_now"
);

pub(super) fn reorder(c: &Connection, target: &str, order_key: &str) -> rusqlite::Result<()> {
    c.prepare_cached(REORDER)?
        .execute(params![target, order_key])?;
    Ok(())
}

const DROP_EVENT_IF_DONE: &str =
    "DELETE FROM events WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?1)";

pub(super) fn drop_event_if_done(c: &Prepared<'_>, event_id: i64) -> rusqlite::Result<()> {
    c.statement(DROP_EVENT_IF_DONE)?
        .borrow_mut()
        .execute(params![event_id])?;
    Ok(())
}

/// Makes the selected waiting deliveries due now (see [`Release`]); only
/// `next_at` moves, so the schedule is where it was.
const RELEASE: &str = formatcp!(
    "UPDATE deliveries SET next_at = ?2
     WHERE state = {PENDING} AND target = ?1 AND next_at > ?2 AND attempts > 0
       AND (?3 IS NULL OR id = ?3) AND (?4 OR not_before <= ?2)"
);

pub(super) fn release(c: &Connection, r: &Release, now: UnixMs) -> rusqlite::Result<u64> {
    let n = c.prepare_cached(RELEASE)?.execute(params![
        r.target,
        now,
        r.delivery_id,
        r.past_retry_after
    ])?;
    Ok(n as u64)
}

const PENDING_TARGETS: &str =
    formatcp!("SELECT DISTINCT target FROM deliveries WHERE state = {PENDING}");

const RETIRE: &str = formatcp!(
    "UPDATE deliveries SET state = {DEAD}, reason = '{TARGET_REMOVED}', updated_at = ?2,
         last_error = '{RETIRED_ERROR}'
     WHERE state = {PENDING} AND target = ?1"
);

/// Dead-letters the pending deliveries of every target not in `keep`.
pub(super) fn retire(
    c: &Connection,
    keep: &[String],
    now: UnixMs,
    traced: bool,
) -> rusqlite::Result<Vec<(String, u64)>> {
    let pending: Vec<String> = c
        .prepare_cached(PENDING_TARGETS)?
        .query_map([], |r| r.get("target"))?
        .collect::<rusqlite::Result<_>>()?;
    let mut retired = Vec::new();
    for target in pending.iter().filter(|t| !keep.contains(t)) {
        if traced {
            trail::retired(c, target, now)?;
        }
        let n = c.prepare_cached(RETIRE)?.execute(params![target, now])? as u64;
        retired.push((target.clone(), n));
    }
    Ok(retired)
}
