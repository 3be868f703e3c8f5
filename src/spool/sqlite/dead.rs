//! The dead-letter table: listing, replaying and purging by filter.

use super::held::Prepared;
use super::reader::read_rows;
use super::settle::{drop_event_if_done, reorder};
use crate::spool::vocab::{DEAD, PENDING};
use crate::spool::{rows, DeadFilter, DeadLetter, SpoolError, UnixMs};
use const_format::formatcp;
use rusqlite::{params, Connection};
use std::collections::BTreeSet;

/// The dead letters a filter selects, as a condition on `deliveries` with
/// the filter's five parameters.
const DEAD_SELECTION: &str = formatcp!(
    "state = {DEAD}
       AND (?1 IS NULL OR target = ?1)
       AND (?2 IS NULL OR reason = ?2)
       AND (?3 IS NULL OR updated_at >= ?3)
       AND (?4 IS NULL OR updated_at < ?4)
       AND (?5 IS NULL OR id = ?5)"
);

const DEAD_LETTERS: &str = formatcp!(
    "SELECT d.id, d.event_id, d.target, d.reason, d.last_error, d.attempts, e.account,
            e.dedup_key, e.msg_type, e.event, e.received_at, d.updated_at
     FROM deliveries d JOIN events e ON e.id = d.event_id
     WHERE d.state = {DEAD}
       AND (?1 IS NULL OR d.target = ?1)
       AND (?2 IS NULL OR d.reason = ?2)
       AND (?3 IS NULL OR d.updated_at >= ?3)
       AND (?4 IS NULL OR d.updated_at < ?4)
       AND (?5 IS NULL OR d.id = ?5)
     ORDER BY d.updated_at, d.id LIMIT ?6"
);

pub(super) fn dead_letters(
    c: &Connection,
    f: &DeadFilter,
    limit: usize,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let params = params![
        f.target,
        f.reason,
        f.since,
        f.until,
        f.delivery_id,
        limit as i64
    ];
    read_rows(c, DEAD_LETTERS, params, |row| rows::dead_letter(row))
}

const REPLAY: &str = formatcp!(
    "UPDATE deliveries SET state = {PENDING}, attempts = 0, next_at = ?6, reason = '', updated_at = ?6,
         step = 0, scheduled_at = ?6, not_before = 0, blocked = 0
     WHERE {DEAD_SELECTION} AND target IS NOT NULL
     RETURNING target, order_key"
);

/// Makes the selected dead letters (those with a target) due at `now`, with
/// their attempts and schedules reset; each replayed user's deliveries wait
/// behind its earliest again.
pub(super) fn replay(c: &Connection, f: &DeadFilter, now: UnixMs) -> rusqlite::Result<u64> {
    let mut update = c.prepare_cached(REPLAY)?;
    let replayed: Vec<(String, Option<String>)> = update
        .query_map(
            params![f.target, f.reason, f.since, f.until, f.delivery_id, now],
            |r| Ok((r.get("target")?, r.get("order_key")?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let users: BTreeSet<(&str, &str)> = replayed
        .iter()
        .filter_map(|(target, key)| Some((target.as_str(), key.as_deref()?)))
        .collect();
    for (target, order_key) in users {
        reorder(c, target, order_key)?;
    }
    Ok(replayed.len() as u64)
}

const PURGE: &str = formatcp!("DELETE FROM deliveries WHERE {DEAD_SELECTION} RETURNING event_id");

/// Deletes the selected dead letters, and their events once no delivery of
/// them is left. Returns how many.
pub(super) fn purge(c: &Prepared<'_>, f: &DeadFilter) -> rusqlite::Result<u64> {
    let mut delete = c.prepare_cached(PURGE)?;
    let events: Vec<i64> = delete
        .query_map(
            params![f.target, f.reason, f.since, f.until, f.delivery_id],
            |r| r.get("event_id"),
        )?
        .collect::<rusqlite::Result<_>>()?;
    for event_id in &events {
        drop_event_if_done(c, *event_id)?;
    }
    Ok(events.len() as u64)
}
