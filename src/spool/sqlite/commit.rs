//! What a push's commit writes: its replay guard, its dedup key, the event
//! and a delivery per target (or its `unrouted` dead letter).

use super::trail;
use crate::spool::trail_rows::route_text;
use crate::spool::vocab::KEEP_TICKET;
use crate::spool::vocab::{PENDING, UNROUTED};
use crate::spool::{
    rows, ComponentTicket, DeadReason, DeliveryId, DeliveryState, Enqueued, Event, EventId,
    NewDelivery, NewEvent, ReplayGuard, TrailStore, UnixMs,
};
use crate::trail::TrailPush;

/// An unrouted event's end in the trail.
const UNROUTED_END: &str = "dead";
use super::held::Prepared;
use const_format::formatcp;
use rusqlite::{params, Connection};
use std::time::Duration;

pub(super) fn enqueue(
    c: &Prepared<'_>,
    new: NewEvent,
    now: UnixMs,
    window: Duration,
    store: Option<&TrailStore>,
) -> rusqlite::Result<Enqueued> {
    let NewEvent {
        event: e,
        targets,
        replay,
        trail: push,
    } = new;
    // Only while the relay has the trail on and the spool has its settings.
    let trail = store.zip(push.as_deref());
    if let Some(guard) = &replay {
        if !first_body_under(c, guard, now)? {
            return Ok(Enqueued::Replayed);
        }
    }
    if !take_key(c, &e.dedup_key, now, window)? {
        if let Some(trail) = trail {
            push_trail(c, trail, (&e, &targets), None)?;
        }
        return Ok(Enqueued::Duplicate);
    }
    let event_id = insert_event(c, &e)?;
    let deliveries = insert_deliveries(c, event_id, &targets, now)?;
    if let Some(trail) = trail {
        push_trail(c, trail, (&e, &targets), Some(event_id))?;
        if targets.is_empty() {
            let end = Some((UNROUTED_END, Some(DeadReason::Unrouted)));
            trail::step(c, (event_id.0, ""), now, None, end)?;
        }
    }
    Ok(Enqueued::Stored {
        event_id,
        deliveries,
        event: Box::new(e),
    })
}

/// Takes the push's dedup key; false when a live one makes it a duplicate.
/// An expired key is taken over by the new event.
fn take_key(c: &Prepared<'_>, key: &str, now: UnixMs, window: Duration) -> rusqlite::Result<bool> {
    let inserted = c
        .statement(TAKE_KEY)?
        .borrow_mut()
        .execute(params![key, now + window, now])?;
    Ok(inserted != 0)
}

fn insert_event(c: &Prepared<'_>, e: &Event) -> rusqlite::Result<EventId> {
    let (family, codec) = rows::origin_names(&e.origin);
    c.statement(INSERT_EVENT)?.borrow_mut().execute(params![
        e.dedup_key,
        e.account,
        e.received_at,
        e.query,
        &e.body[..],
        e.xml,
        e.fields,
        e.msg_type,
        e.event_type,
        family,
        codec,
        e.origin.appid,
        e.origin.agent_id,
        e.origin.info_type,
        e.trace_context
    ])?;
    Ok(EventId(c.last_insert_rowid()))
}

/// A pending delivery per target, or the event's `unrouted` dead letter
/// when it has none.
fn insert_deliveries(
    c: &Prepared<'_>,
    event_id: EventId,
    targets: &[NewDelivery],
    now: UnixMs,
) -> rusqlite::Result<Vec<DeliveryId>> {
    if targets.is_empty() {
        c.statement(INSERT_UNROUTED)?.borrow_mut().execute(params![
            event_id,
            DeliveryState::Dead,
            now
        ])?;
    }
    let mut deliveries = Vec::with_capacity(targets.len());
    let insert = c.statement(INSERT_DELIVERY)?;
    let mut insert = insert.borrow_mut();
    for d in targets {
        let state = DeliveryState::Pending;
        insert.execute(params![
            event_id,
            d.target,
            state,
            d.due_at,
            now,
            d.order_key
        ])?;
        deliveries.push(DeliveryId(c.last_insert_rowid()));
    }
    Ok(deliveries)
}

/// The push in the trail, with the route it took; a duplicate has no event id.
fn push_trail(
    c: &Prepared<'_>,
    (store, push): (&TrailStore, &TrailPush),
    (e, targets): (&Event, &[NewDelivery]),
    event_id: Option<EventId>,
) -> rusqlite::Result<()> {
    let route = route_text(targets.iter().map(|t| &t.target));
    trail::push(c, store, (push, e, &route), event_id)
}

const TAKE_KEY: &str = "INSERT INTO dedup (key, expires_at) VALUES (?1, ?2)
     ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
     WHERE dedup.expires_at <= ?3";

const INSERT_EVENT: &str = "INSERT INTO events (dedup_key, account, received_at, query, body, xml, fields, msg_type, event,
                         family, codec, appid, agent_id, info_type, trace_context)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)";

const INSERT_UNROUTED: &str = formatcp!(
    "INSERT INTO deliveries (event_id, target, state, next_at, reason, updated_at)
     VALUES (?1, NULL, ?2, 0, '{UNROUTED}', ?3)"
);

/// Ids only grow, so a new delivery is blocked by any pending one of its user.
const INSERT_DELIVERY: &str = formatcp!(
    "INSERT INTO deliveries (event_id, target, state, next_at, scheduled_at, updated_at, order_key, blocked)
     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?6 IS NOT NULL AND EXISTS (
         SELECT 1 FROM deliveries p WHERE p.target = ?2 AND p.order_key = ?6 AND p.state = {PENDING}))"
);

/// Records the guard's query with its body hash; false when the query was
/// already taken, unexpired, with another body. An expired entry is taken
/// over, like an expired dedup key.
fn first_body_under(c: &Prepared<'_>, guard: &ReplayGuard, now: UnixMs) -> rusqlite::Result<bool> {
    let inserted = c.statement(GUARD)?.borrow_mut().execute(params![
        guard.key,
        &guard.body_hash[..],
        guard.expires_at,
        now
    ])?;
    if inserted == 1 {
        return Ok(true);
    }
    let seen: Vec<u8> = c
        .statement(GUARDED_BODY)?
        .borrow_mut()
        .query_row(params![guard.key], |r| r.get("body_hash"))?;
    Ok(seen == guard.body_hash)
}

const GUARD: &str = "INSERT INTO replay (key, body_hash, expires_at) VALUES (?1, ?2, ?3)
     ON CONFLICT (key) DO UPDATE SET body_hash = excluded.body_hash, expires_at = excluded.expires_at
     WHERE replay.expires_at <= ?4";

const GUARDED_BODY: &str = "SELECT body_hash FROM replay WHERE key = ?1";

/// Keeps `ticket` unless its account has one as new or newer; whether it did.
pub(super) fn keep_ticket(c: &Connection, ticket: &ComponentTicket) -> rusqlite::Result<bool> {
    let mut keep = c.prepare_cached(KEEP_TICKET)?;
    let mut kept = keep.query(params![
        ticket.account,
        ticket.ticket,
        ticket.create_time,
        ticket.received_at
    ])?;
    Ok(kept.next()?.is_some())
}
