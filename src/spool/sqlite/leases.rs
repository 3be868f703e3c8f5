//! Leases, held in memory: the file still shows a leased delivery as due,
//! and its mark here hides it from the next lease until it is settled or the
//! lease ends. A crash loses only the marks, so the leased deliveries are
//! due again at the next start: at least once, with no fsync spent on
//! handing work out. The mark holds the lease's token: an outcome under
//! another token than the mark's is dropped, and an outcome being written
//! keeps its mark to the end, so no new lease is taken on the delivery
//! meanwhile.

use super::held::Prepared;
use super::row::{joined, Listed};
use crate::spool::rows;
use crate::spool::vocab::{EVENT_COLUMNS, EVENT_NAMES, PENDING};
use crate::spool::SpoolError;
use crate::spool::{DeliveryId, Lease, LeaseToken, Settle, UnixMs};
use const_format::formatcp;
use rusqlite::{params, Statement};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Deliveries handed out and not settled yet.
pub(super) type Leased = Arc<Mutex<Held>>;

#[derive(Default)]
pub(super) struct Held {
    /// Id → (target, lease end, token).
    marks: HashMap<DeliveryId, (String, UnixMs, LeaseToken)>,
    /// The last token handed out.
    last_token: i64,
}

/// A lease end no clock reaches: the mark of an outcome being written.
const WRITING: UnixMs = UnixMs(i64::MAX);

/// The due deliveries that no earlier one of their user holds back, first
/// due first: their ids alone, read from the pending index without a look
/// at their rows. Deliveries held by a lease are still due in the file and
/// come first; passing over them costs an index entry each, not a row and
/// its event.
pub(super) const DUE_IDS: &str = formatcp!(
    "SELECT id FROM deliveries
     WHERE state = {PENDING} AND blocked = 0 AND target = ?1 AND next_at <= ?2
     ORDER BY next_at, id LIMIT ?3"
);

/// A due delivery to lease, with its event. Read while [`DUE_IDS`] is still
/// stepping, so in the same read transaction: the row is the one the index
/// showed.
pub(super) const DUE: &str = formatcp!(
    "SELECT d.id, d.event_id, d.attempts, d.step, d.scheduled_at, {EVENT_COLUMNS}
     FROM deliveries d JOIN events e ON e.id = d.event_id
     WHERE d.id = ?1"
);

/// The names of [`DUE`]'s columns, in order.
pub(super) const DUE_NAMES: [&str; 20] = joined(
    ["id", "event_id", "attempts", "step", "scheduled_at"],
    EVENT_NAMES,
);

/// Up to `limit` due deliveries of `target` that are not held by a lease,
/// each then held until `now + lease` or until it is settled.
pub(super) fn lease(
    c: &Prepared<'_>,
    leased: &Leased,
    target: &str,
    now: UnixMs,
    limit: usize,
    lease: Duration,
) -> Result<Vec<Lease>, SpoolError> {
    let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
    let held = &mut *held;
    held.marks.retain(|_, (_, until, _)| *until > now);
    // Held deliveries are still due in the file and come first; read past them.
    let skip = held.marks.values().filter(|(t, _, _)| t == target).count();
    let due = c.statement(DUE_IDS)?;
    let mut due = due.borrow_mut();
    let mut ids = due.query(params![target, now, (limit + skip) as i64])?;
    let select = c.statement(DUE)?;
    let mut select = select.borrow_mut();
    let mut leases = Vec::with_capacity(limit);
    while let Some(id) = ids.next()? {
        let delivery_id = DeliveryId(id.get(0)?);
        if held.marks.contains_key(&delivery_id) {
            continue;
        }
        let token = LeaseToken(held.last_token + 1);
        let Some(found) = leased_row(&mut select, delivery_id, target, token)? else {
            continue;
        };
        held.last_token = token.0;
        leases.push(found);
        held.marks
            .insert(delivery_id, (target.to_string(), now + lease, token));
        if leases.len() == limit {
            break;
        }
    }
    Ok(leases)
}

/// The delivery `id` with its event, leased under `token`; none if its row
/// is gone.
fn leased_row(
    select: &mut Statement<'_>,
    id: DeliveryId,
    target: &str,
    token: LeaseToken,
) -> Result<Option<Lease>, SpoolError> {
    let mut rows = select.query(params![id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let row = Listed::new(row, &DUE_NAMES);
    Ok(Some(rows::lease(&row, target, token)?))
}

/// The outcomes to write: those whose delivery is unleased or leased under
/// their own token, each such lease marked as being written, with the lease
/// end to restore if the write fails.
pub(super) fn take_marks(
    leased: &Leased,
    settles: Vec<Settle>,
) -> (Vec<Settle>, Vec<(DeliveryId, UnixMs, LeaseToken)>) {
    let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
    let mut writing = Vec::new();
    let mut settlements = Vec::with_capacity(settles.len());
    for settle in settles {
        let (id, lease) = (settle.settlement.delivery_id(), settle.lease);
        match held.marks.get_mut(&id) {
            Some((_, until, token)) if *token == lease => {
                writing.push((id, *until, lease));
                *until = WRITING;
            }
            Some(_) => continue,
            None => {}
        }
        settlements.push(settle);
    }
    (settlements, writing)
}

/// The outcomes' write ended: a lease is let go only once its outcome is in
/// the file, so the reader can never hand out a delivery whose outcome is
/// being written; one that could not be written keeps its lease to the end,
/// so the delivery is sent again then, not at once and over and over.
pub(super) fn written(leased: &Leased, writing: Vec<(DeliveryId, UnixMs, LeaseToken)>, ok: bool) {
    let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
    for (id, until, token) in writing {
        let ours = held.marks.get(&id).is_some_and(|(_, _, t)| *t == token);
        if !ours {
            continue;
        }
        if ok {
            held.marks.remove(&id);
        } else if let Some(mark) = held.marks.get_mut(&id) {
            mark.1 = until;
        }
    }
}
