//! The trail in the file: a push's row written in its commit, each
//! attempt and end in its settle's, the notes that ride with the next
//! commit, the search, redelivery and pruning.

use super::held::Prepared;
use crate::spool::trail_rows::{self, Param, RESTORE_EVENT, STEP_COLUMNS};
use crate::spool::vocab::{EVENT_COLUMNS, PENDING};
use crate::spool::{rows, DeadReason, DeliveryId, Event, EventId, SpoolError, TrailStore, UnixMs};
use crate::trail::{
    TrailAttempt, TrailEvent, TrailFilter, TrailFound, TrailKey, TrailNote, TrailPush,
};
use const_format::formatcp;
use rusqlite::types::ToSqlOutput;
use rusqlite::{params, Connection, OptionalExtension, ToSql};

const INSERT_PUSH: &str = "INSERT INTO trail_events (event_id, received_at, account, mode, msg_type, event,
         scene, msg_id, ticket, openid_hash, openid_mask, duplicate, route, reply, reply_ms, budget_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";

/// A push's trail row, in its commit: `event_id` is `None` for a duplicate.
/// Unless a reply target is tried inline, the answer leaves once the push is
/// stored: its reply is written with it. Its statements are held, like the
/// push's own: every push writes one.
pub(super) fn push(
    c: &Prepared<'_>,
    store: &TrailStore,
    (trail, e, route): (&TrailPush, &Event, &str),
    event_id: Option<EventId>,
) -> rusqlite::Result<()> {
    let duplicate = event_id.is_none();
    let (reply, reply_ms) = if duplicate || !trail.reply_inline {
        let ms = trail.started.elapsed().as_millis() as i64;
        (Some("none"), Some(ms))
    } else {
        (None, None)
    };
    c.statement(INSERT_PUSH)?.borrow_mut().execute(params![
        event_id,
        e.received_at,
        e.account,
        trail.mode,
        e.msg_type,
        e.event_type,
        trail.scene,
        trail.msg_id,
        trail.ticket,
        trail.openid_hash,
        trail.openid_mask,
        duplicate,
        route,
        reply,
        reply_ms,
        trail.budget_ms as i64,
    ])?;
    if store.keep_bodies {
        if let Some(id) = event_id {
            c.statement(KEEP_BODY)?.borrow_mut().execute(params![id])?;
        }
    }
    Ok(())
}

const KEEP_BODY: &str =
    "INSERT INTO trail_bodies (event_id, dedup_key, account, received_at, query, body, xml,
         fields, msg_type, event, family, codec, appid, agent_id, info_type, trace_context)
     SELECT id, dedup_key, account, received_at, query, body, xml, fields, msg_type, event, family,
         codec, appid, agent_id, info_type, trace_context FROM events WHERE id = ?1";

const INSERT_STEP: &str =
    "INSERT INTO trail_steps (event_id, at, target, attempt, inline, status, error,
         latency_ms, response, circuit, end_kind, reason)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// One attempt (when there was one) and the end it brought (when it did).
/// Held, as nearly every settle writes one.
pub(super) fn step(
    c: &Prepared<'_>,
    (event_id, target): (i64, &str),
    at: UnixMs,
    note: Option<&TrailAttempt>,
    end: Option<(&str, Option<DeadReason>)>,
) -> rusqlite::Result<()> {
    if note.is_none() && end.is_none() {
        return Ok(());
    }
    let (end_kind, reason) = end.unzip();
    c.statement(INSERT_STEP)?.borrow_mut().execute(params![
        event_id,
        note.map_or(at, |n| n.at),
        target,
        note.map(|n| n.attempt),
        note.is_some_and(|n| n.inline),
        note.and_then(|n| n.status),
        note.and_then(|n| n.error.as_deref()),
        note.map(|n| n.latency_ms as i64),
        note.map(|n| n.response.as_str()),
        note.map(|n| n.circuit.as_str()),
        end_kind,
        reason.flatten(),
    ])?;
    Ok(())
}

/// The retirement's ends: every pending delivery of `target`.
pub(super) fn retired(c: &Connection, target: &str, now: UnixMs) -> rusqlite::Result<()> {
    c.prepare_cached(formatcp!(
        "INSERT INTO trail_steps (event_id, at, target, end_kind, reason)
         SELECT event_id, ?2, target, 'dead', 'target_removed' FROM deliveries
         WHERE state = {PENDING} AND target = ?1"
    ))?
    .execute(params![target, now])?;
    Ok(())
}

/// A note after a push's commit: its reply, or a refused push's row. Held:
/// a push with a reply target tried inline writes one.
pub(super) fn note(c: &Prepared<'_>, note: &TrailNote) -> rusqlite::Result<()> {
    match note {
        TrailNote::Reply { event_id, reply } => {
            c.statement(NOTE_REPLY)?.borrow_mut().execute(params![
                event_id,
                reply.outcome.as_str(),
                reply.latency_ms as i64,
                reply.budget_ms as i64
            ])?;
        }
        TrailNote::Refused {
            at,
            account,
            refusal,
        } => {
            c.statement(NOTE_REFUSAL)?.borrow_mut().execute(params![
                at,
                account,
                refusal.reason,
                refusal.source
            ])?;
        }
    }
    Ok(())
}

const NOTE_REPLY: &str =
    "UPDATE trail_events SET reply = ?2, reply_ms = ?3, budget_ms = ?4 WHERE event_id = ?1";

const NOTE_REFUSAL: &str = "INSERT INTO trail_refusals (received_at, account, refusal, source)
     VALUES (?1, ?2, ?3, ?4)";

/// The key of the OpenIDs' hashes kept in the file, made on first use.
pub(super) fn stored_key(c: &Connection) -> rusqlite::Result<TrailKey> {
    let fresh = TrailKey::random();
    c.prepare_cached("INSERT INTO trail_key (id, key) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING")?
        .execute(params![&fresh.bytes()[..]])?;
    let key: Vec<u8> = c
        .prepare_cached("SELECT key FROM trail_key WHERE id = 1")?
        .query_row([], |r| r.get(0))?;
    let bytes: [u8; 32] = key.try_into().map_err(|_| {
        rusqlite::Error::InvalidColumnType(0, "key".into(), rusqlite::types::Type::Blob)
    })?;
    Ok(TrailKey::from_bytes(bytes))
}

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Param::Int(n) => (*n).into(),
            Param::Text(t) => t.as_str().into(),
            Param::Blob(b) => b.as_slice().into(),
        })
    }
}

/// Events matching `filter`, newest first, with their steps: the answered
/// pushes (at most `filter.scan` trail rows read, see
/// [`trail_rows::indexed`]) and the refused ones, merged.
pub(super) fn search(
    c: &Connection,
    key: &TrailKey,
    filter: &TrailFilter,
) -> Result<TrailFound, SpoolError> {
    let (answered, cut_short) = if trail_rows::wants_answered(filter) {
        answered(c, key, filter)?
    } else {
        (Vec::new(), false)
    };
    let mut refused = Vec::new();
    if trail_rows::wants_refusals(filter) {
        let (top, bottom) = placed(c, "trail_refusals", filter)?;
        let window = trail_rows::Window::of(top, bottom, None);
        let (sql, params) = trail_rows::refusals_query(filter, window, |n| format!("?{n}"));
        let mut select = c.prepare_cached(&sql)?;
        let mut rows = select.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(row) = rows.next()? {
            refused.push(trail_rows::refusal_event(row)?);
        }
    }
    let found = trail_rows::merged(answered, refused, filter.limit);
    Ok(TrailFound::of(found, cut_short))
}

/// Answered pushes matching `filter`, newest first, with their steps, and
/// whether older rows that were not read remain.
fn answered(
    c: &Connection,
    key: &TrailKey,
    filter: &TrailFilter,
) -> Result<(Vec<TrailEvent>, bool), SpoolError> {
    let (top, bottom) = placed(c, "trail_events", filter)?;
    let cap = match trail_rows::indexed(filter) {
        true => None,
        false => {
            let (below, above) = trail_rows::Window::floor_bounds(top, bottom);
            c.prepare_cached(trail_rows::FLOOR)?
                .query_row(
                    params![below, above, trail_rows::floor_offset(filter)],
                    |r| r.get(0),
                )
                .optional()?
        }
    };
    let window = trail_rows::Window::of(top, bottom, cap);
    let floor = window.floor;
    let (mut found, mut before, mut read) = (Vec::new(), window.before, 0);
    loop {
        let page = trail_rows::page_size(filter)
            .min(filter.scan.saturating_sub(read))
            .max(1);
        let (sql, params) =
            trail_rows::page_query(filter, key, (before, floor), page, |n| format!("?{n}"));
        let mut select = c.prepare_cached(&sql)?;
        let mut rows = select.query(rusqlite::params_from_iter(params.iter()))?;
        let mut in_page = 0;
        while let Some(row) = rows.next()? {
            in_page += 1;
            let mut event = trail_rows::trail_event(row)?;
            before = Some(event.id);
            if let Some(id) = event.event_id {
                steps(c, id, &mut event)?;
            }
            if trail_rows::judged(&mut event, filter) {
                found.push(event);
                if found.len() == filter.limit {
                    return Ok((found, false));
                }
            }
        }
        read += in_page;
        if in_page < page || read >= filter.scan {
            break;
        }
    }
    // Rows of its time at or below a capped floor were never read, and any
    // of them may match; an indexed search stopped at its cap may have more.
    let cut_short = window.capped
        || (read >= filter.scan && {
            let (sql, params) =
                trail_rows::page_query(filter, key, (before, floor), 1, |n| format!("?{n}"));
            c.prepare_cached(&sql)?
                .query(rusqlite::params_from_iter(params.iter()))?
                .next()?
                .is_some()
        });
    Ok((found, cut_short))
}

/// The ids `filter`'s time range starts above and ends below in `table`
/// (see [`trail_rows::positions`]), each looked up only when it is set.
fn placed(
    c: &Connection,
    table: &str,
    filter: &TrailFilter,
) -> Result<(Option<i64>, Option<i64>), SpoolError> {
    let mut ids = [None, None];
    let (until, since) = trail_rows::positions(filter);
    for (id, at) in ids.iter_mut().zip([until, since]) {
        if let Some(at) = at {
            let mut position = c.prepare_cached(&trail_rows::position_query(table))?;
            *id = position.query_row(params![at], |r| r.get(0)).optional()?;
        }
    }
    Ok((ids[0], ids[1]))
}

fn steps(c: &Connection, id: EventId, event: &mut TrailEvent) -> Result<(), SpoolError> {
    let mut select = c.prepare_cached(formatcp!(
        "SELECT {STEP_COLUMNS} FROM trail_steps WHERE event_id = ?1 ORDER BY id"
    ))?;
    let mut rows = select.query(params![id])?;
    while let Some(row) = rows.next()? {
        trail_rows::add_step(event, row)?;
    }
    Ok(())
}

/// Sends the event to `target` again: a new delivery of the event while it
/// is in the queue, or of its kept copy, put back in the queue under its own
/// id, once it has left.
pub(super) fn redeliver(
    c: &Connection,
    event_id: EventId,
    target: &str,
    now: UnixMs,
) -> Result<DeliveryId, SpoolError> {
    let queued: bool = c
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE id = ?1)")?
        .query_row(params![event_id], |r| r.get(0))?;
    if !queued {
        let restored = c
            .prepare_cached(RESTORE_EVENT)?
            .execute(params![event_id])?;
        if restored == 0 {
            let traced: bool = c
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM trail_events WHERE event_id = ?1)")?
                .query_row(params![event_id], |r| r.get(0))?;
            return Err(SpoolError::Refused(if traced {
                format!(
                    "event {event_id} was delivered and its body was not kept (keep_bodies is off)"
                )
            } else {
                format!("no event {event_id} in the spool or the trail")
            }));
        }
    }
    c.prepare_cached(
        "INSERT INTO deliveries (event_id, target, state, next_at, scheduled_at, updated_at)
         VALUES (?1, ?2, 0, ?3, ?3, ?3)",
    )?
    .execute(params![event_id, target, now])?;
    Ok(DeliveryId(c.last_insert_rowid()))
}

/// A kept event as stored, for tests and the command line.
#[allow(dead_code)]
pub(super) fn kept_event(c: &Connection, id: EventId) -> Result<Option<Event>, SpoolError> {
    let mut select = c.prepare_cached(formatcp!(
        "SELECT {EVENT_COLUMNS} FROM trail_bodies e WHERE e.event_id = ?1"
    ))?;
    let mut rows = select.query(params![id])?;
    rows.next()?.map(rows::event).transpose()
}

/// Rows pruned per statement: small enough that a prune never holds the
/// writer for long.
pub(super) const PRUNE_BATCH: i64 = 2_000;

/// Deletes one bounded batch of the oldest answered pushes past `retain` or
/// beyond `max_events`, with their steps and kept bodies, and one of the
/// oldest refusals past `retain` or beyond `max_refusals`. Returns the larger
/// of the two counts: a whole batch means pruning is behind.
///
/// Each table's ids only grow, and `received_at` and the queue's event ids
/// with them: the rows to prune are the lowest, read from the bottom, at most
/// a batch. A step is deleted with its event, or later, when its event's row
/// was pruned before the step was written (a delivery outliving its event's
/// trail): by the event ids below the newest pruned one.
pub(super) fn prune(c: &Connection, store: &TrailStore, now: UnixMs) -> rusqlite::Result<usize> {
    let cutoff = trail_rows::cutoff(now, store.retain);
    let mut events = 0;
    if let Some((upto, horizon)) = oldest(c, OLDEST_EVENTS, store.max_events, cutoff)? {
        if let Some(horizon) = horizon {
            c.prepare_cached("DELETE FROM trail_steps WHERE event_id <= ?1")?
                .execute(params![horizon])?;
            c.prepare_cached("DELETE FROM trail_bodies WHERE event_id <= ?1")?
                .execute(params![horizon])?;
        }
        events = c
            .prepare_cached("DELETE FROM trail_events WHERE id <= ?1")?
            .execute(params![upto])?;
    }
    let mut refusals = 0;
    if let Some((upto, _)) = oldest(c, OLDEST_REFUSALS, store.max_refusals, cutoff)? {
        refusals = c
            .prepare_cached("DELETE FROM trail_refusals WHERE id <= ?1")?
            .execute(params![upto])?;
    }
    Ok(events.max(refusals))
}

const OLDEST_EVENTS: [&str; 2] = [
    "SELECT MAX(id) FROM trail_events",
    "SELECT id, event_id, received_at FROM trail_events ORDER BY id LIMIT ?1",
];
const OLDEST_REFUSALS: [&str; 2] = [
    "SELECT MAX(id) FROM trail_refusals",
    "SELECT id, NULL, received_at FROM trail_refusals ORDER BY id LIMIT ?1",
];

/// The highest id of a table's rows to prune now (at most a batch of them),
/// and the highest event id among them.
fn oldest(
    c: &Connection,
    [newest, bottom]: [&str; 2],
    keep: u64,
    cutoff: UnixMs,
) -> rusqlite::Result<Option<(i64, Option<i64>)>> {
    let newest: Option<i64> = c.prepare_cached(newest)?.query_row([], |r| r.get(0))?;
    let Some(newest) = newest else {
        return Ok(None);
    };
    let beyond = newest.saturating_sub(keep.min(i64::MAX as u64) as i64);
    let mut oldest = c.prepare_cached(bottom)?;
    let mut rows = oldest.query(params![PRUNE_BATCH])?;
    let (mut upto, mut horizon) = (None, None);
    while let Some(row) = rows.next()? {
        let (id, event_id, received_at): (i64, Option<i64>, UnixMs) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        if id > beyond && received_at >= cutoff {
            break;
        }
        upto = Some(id);
        horizon = horizon.max(event_id);
    }
    Ok(upto.map(|upto| (upto, horizon)))
}
