//! The trail in the shared database: the pushes' rows in their group
//! commit, the attempts and ends in their settles' transaction (a statement
//! each, whatever the batch's size), the notes that need no flush of their
//! own, the search, redelivery and pruning.

use super::analyze::TrailPruned;
use super::commit::Push;
use super::row::get;
use crate::spool::trail_rows::{self, route_text, Param, RESTORE_EVENT, STEP_COLUMNS};
use crate::spool::{
    DeadReason, DeliveryId, EventId, Settle, Settlement, SpoolError, TrailStore, UnixMs,
};
use crate::trail::{TrailEvent, TrailFilter, TrailFound, TrailKey, TrailNote};
use bytes::BytesMut;
use deadpool_postgres::{ClientWrapper, Object, Pool, Transaction};
use std::collections::HashMap;
use tokio::sync::mpsc;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::Statement;

/// A batch's trail rows with their statements prepared, so that
/// [`PushRows::write`] sends them all at once, behind the batch's inserts
/// and ahead of its `COMMIT`: the trail adds no round trip to a commit.
pub(super) struct PushRows<'a> {
    columns: PushColumns<'a>,
    insert: Statement,
    ends: Option<Statement>,
    keep: Option<Statement>,
}

impl<'a> PushRows<'a> {
    /// The rows of a batch's pushes, stored (`Some(event id)`) or
    /// duplicates (`None`); the replayed ones are refusals, noted apart.
    /// `None` when no push carries a trail record.
    pub(super) async fn of(
        c: &ClientWrapper,
        p: &mut super::prepared::Prepared,
        store: &TrailStore,
        written: &[(&'a Push, Option<EventId>)],
    ) -> Result<Option<Self>, SpoolError> {
        let columns = PushColumns::of(store, written);
        if columns.received.is_empty() {
            return Ok(None);
        }
        let insert = p.get(c, INSERT_PUSHES).await?;
        let ends = match columns.unrouted.is_empty() {
            true => None,
            false => Some(p.get(c, UNROUTED_ENDS).await?),
        };
        let keep = match columns.kept.is_empty() {
            true => None,
            false => Some(p.get(c, KEEP_BODIES).await?),
        };
        Ok(Some(Self {
            columns,
            insert,
            ends,
            keep,
        }))
    }

    /// Sends every statement on the first poll, in order, then waits for
    /// each answer: any failure fails the write (and so the batch's commit).
    pub(super) async fn write(&self, c: &ClientWrapper) -> Result<(), SpoolError> {
        let columns = &self.columns;
        let rows = columns.params();
        let ends: [&(dyn ToSql + Sync); 2] = [&columns.unrouted, &columns.unrouted_at];
        let keep: [&(dyn ToSql + Sync); 1] = [&columns.kept];
        tokio::try_join!(
            biased;
            c.execute(&self.insert, &rows),
            execute_some(c, self.ends.as_ref(), &ends),
            execute_some(c, self.keep.as_ref(), &keep),
        )?;
        Ok(())
    }
}

/// `statement`, where there is one.
async fn execute_some(
    c: &ClientWrapper,
    statement: Option<&Statement>,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    match statement {
        Some(statement) => c.execute(statement, params).await,
        None => Ok(0),
    }
}

const INSERT_PUSHES: &str = "INSERT INTO trail_events (event_id, received_at, account, mode, msg_type, event,
         scene, msg_id, ticket, openid_hash, openid_mask, duplicate, route, reply, reply_ms, budget_ms)
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
         $6::text[], $7::text[], $8::text[], $9::smallint[], $10::bytea[], $11::text[],
         $12::smallint[], $13::text[], $14::text[], $15::bigint[], $16::bigint[])";

const UNROUTED_ENDS: &str = "INSERT INTO trail_steps (event_id, at, target, end_kind, reason)
     SELECT e, t, '', 'dead', 'unrouted' FROM unnest($1::bigint[], $2::bigint[]) AS u(e, t)";

const KEEP_BODIES: &str =
    "INSERT INTO trail_bodies (event_id, dedup_key, account, received_at, query, body, xml,
         fields, msg_type, event, family, codec, appid, agent_id, info_type, trace_context)
     SELECT id, dedup_key, account, received_at, query, body, xml, fields, msg_type, event, family,
         codec, appid, agent_id, info_type, trace_context FROM events WHERE id = ANY($1)";

/// A batch's pushes, as the columns of [`INSERT_PUSHES`], borrowed from the
/// batch: no copy of each push's text to make and free.
#[derive(Default)]
struct PushColumns<'a> {
    event_ids: Vec<Option<i64>>,
    received: Vec<i64>,
    accounts: Vec<&'a str>,
    modes: Vec<&'static str>,
    msg_types: Vec<&'a str>,
    events: Vec<Option<&'a str>>,
    scenes: Vec<Option<&'a str>>,
    msg_ids: Vec<Option<&'a str>>,
    tickets: Vec<i16>,
    hashes: Vec<Option<&'a [u8]>>,
    masks: Vec<Option<&'a str>>,
    duplicates: Vec<i16>,
    routes: Vec<String>,
    replies: Vec<Option<&'static str>>,
    reply_ms: Vec<Option<i64>>,
    budgets: Vec<i64>,
    unrouted: Vec<i64>,
    unrouted_at: Vec<i64>,
    kept: Vec<i64>,
}

impl<'a> PushColumns<'a> {
    fn of(store: &TrailStore, written: &[(&'a Push, Option<EventId>)]) -> Self {
        let mut c = PushColumns::default();
        for &(push, event_id) in written {
            let Some(trail) = push.event.trail.as_deref() else {
                continue;
            };
            let e = &push.event.event;
            c.event_ids.push(event_id.map(|id| id.0));
            c.received.push(e.received_at.0);
            c.accounts.push(e.account.as_str());
            c.modes.push(trail.mode);
            c.msg_types.push(e.msg_type.as_str());
            c.events.push(e.event_type.as_deref());
            c.scenes.push(trail.scene.as_deref());
            c.msg_ids.push(trail.msg_id.as_deref());
            c.tickets.push(i16::from(trail.ticket));
            c.hashes.push(trail.openid_hash.as_deref());
            c.masks.push(trail.openid_mask.as_deref());
            c.duplicates.push(i16::from(event_id.is_none()));
            c.routes
                .push(route_text(push.event.targets.iter().map(|t| &t.target)));
            // Unless a reply target is tried inline, the answer leaves once the
            // push is stored (or found a duplicate).
            let answered = event_id.is_none() || !trail.reply_inline;
            c.replies.push(answered.then_some("none"));
            c.reply_ms
                .push(answered.then(|| trail.started.elapsed().as_millis() as i64));
            c.budgets.push(trail.budget_ms as i64);
            if let (Some(id), true) = (event_id, push.event.targets.is_empty()) {
                c.unrouted.push(id.0);
                c.unrouted_at.push(push.now.0);
            }
            if let (Some(id), true) = (event_id, store.keep_bodies) {
                c.kept.push(id.0);
            }
        }
        c
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 16] {
        [
            &self.event_ids,
            &self.received,
            &self.accounts,
            &self.modes,
            &self.msg_types,
            &self.events,
            &self.scenes,
            &self.msg_ids,
            &self.tickets,
            &self.hashes,
            &self.masks,
            &self.duplicates,
            &self.routes,
            &self.replies,
            &self.reply_ms,
            &self.budgets,
        ]
    }
}

/// The steps of the outcomes that were written: `applied` holds each one's
/// delivery, event and target.
pub(super) async fn steps(
    tx: &Transaction<'_>,
    settles: &[(&Settle, UnixMs)],
    applied: &[(i64, i64, String)],
) -> Result<(), SpoolError> {
    let by_delivery: HashMap<i64, (&Settle, UnixMs)> = settles
        .iter()
        .map(|(s, now)| (s.settlement.delivery_id().0, (*s, *now)))
        .collect();
    let mut c = StepColumns::default();
    for (delivery, event_id, target) in applied {
        let Some((settle, now)) = by_delivery.get(delivery) else {
            continue;
        };
        let note = settle.trail.as_deref();
        let (end, reason) = match &settle.settlement {
            Settlement::Delivered { .. } => (Some("delivered"), None),
            Settlement::Retry { .. } => (None, None),
            Settlement::Dead { reason, .. } => (
                Some(trail_rows::end_of_dead(*reason)),
                Some(reason.as_str()),
            ),
        };
        if note.is_none() && end.is_none() {
            continue;
        }
        c.event_ids.push(*event_id);
        c.at.push(note.map_or(now.0, |n| n.at.0));
        c.targets.push(target.clone());
        c.attempts.push(note.map(|n| n.attempt as i32));
        c.inline.push(i16::from(note.is_some_and(|n| n.inline)));
        c.statuses.push(note.and_then(|n| n.status).map(i32::from));
        c.errors.push(note.and_then(|n| n.error.clone()));
        c.latency.push(note.map(|n| n.latency_ms as i64));
        c.responses.push(note.map(|n| n.response.clone()));
        c.circuits.push(note.map(|n| n.circuit.clone()));
        c.ends.push(end);
        c.reasons.push(reason);
    }
    if c.event_ids.is_empty() {
        return Ok(());
    }
    let insert = tx.prepare_cached(INSERT_STEPS).await?;
    tx.execute(&insert, &c.params()).await?;
    Ok(())
}

/// Only for events whose row is kept: a step of an event pruned while a
/// delivery of it was pending would never be pruned (pruning deletes the
/// steps of the events it prunes, by their ids).
const INSERT_STEPS: &str =
    "INSERT INTO trail_steps (event_id, at, target, attempt, inline, status, error,
         latency_ms, response, circuit, end_kind, reason)
     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::smallint[],
         $6::int[], $7::text[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[])
         AS u(event_id)
     WHERE EXISTS (SELECT 1 FROM trail_events t WHERE t.event_id = u.event_id)";

#[derive(Default)]
struct StepColumns {
    event_ids: Vec<i64>,
    at: Vec<i64>,
    targets: Vec<String>,
    attempts: Vec<Option<i32>>,
    inline: Vec<i16>,
    statuses: Vec<Option<i32>>,
    errors: Vec<Option<String>>,
    latency: Vec<Option<i64>>,
    responses: Vec<Option<String>>,
    circuits: Vec<Option<String>>,
    ends: Vec<Option<&'static str>>,
    reasons: Vec<Option<&'static str>>,
}

impl StepColumns {
    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.event_ids,
            &self.at,
            &self.targets,
            &self.attempts,
            &self.inline,
            &self.statuses,
            &self.errors,
            &self.latency,
            &self.responses,
            &self.circuits,
            &self.ends,
            &self.reasons,
        ]
    }
}

/// The retirement's ends: the retired deliveries' events and targets.
pub(super) async fn retired(
    tx: &Transaction<'_>,
    retired: &[(i64, String)],
    now: UnixMs,
) -> Result<(), SpoolError> {
    if retired.is_empty() {
        return Ok(());
    }
    let (events, targets): (Vec<i64>, Vec<&str>) =
        retired.iter().map(|(e, t)| (*e, t.as_str())).unzip();
    let insert = tx
        .prepare_cached(
            "INSERT INTO trail_steps (event_id, at, target, end_kind, reason)
             SELECT e, $3, t, 'dead', $4 FROM unnest($1::bigint[], $2::text[]) AS r(e, t)
             WHERE EXISTS (SELECT 1 FROM trail_events x WHERE x.event_id = r.e)",
        )
        .await?;
    let reason = DeadReason::TargetRemoved.as_str();
    tx.execute(&insert, &[&events, &targets, &now.0, &reason])
        .await?;
    Ok(())
}

/// Writes the notes as they come, those waiting together, in transactions
/// that do not wait for the flush: a crash of the database loses a few
/// replies and refusals at most, and a note costs no fsync. Refusals move
/// the pruner's clock as pushes do: refusals alone are pruned too.
pub(super) async fn write_notes(
    pool: Pool,
    mut notes: mpsc::Receiver<TrailNote>,
    pruner: super::prune::Pruner,
) {
    let mut batch = Vec::new();
    while notes.recv_many(&mut batch, NOTES_PER_COMMIT).await > 0 {
        let refused_at = batch
            .iter()
            .filter_map(|n| match n {
                TrailNote::Refused { at, .. } => Some(*at),
                TrailNote::Reply { .. } => None,
            })
            .max();
        let written = super::on_connection(&pool, "trail notes", |c| {
            let batch = std::mem::take(&mut batch);
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.batch_execute("SET LOCAL synchronous_commit = off")
                    .await?;
                for note in &batch {
                    note_one(&tx, note).await?;
                }
                tx.commit().await?;
                Ok(())
            })
        })
        .await;
        if let Err(e) = written {
            tracing::warn!(error = %crate::error_chain(&e), "cannot write trail notes");
        }
        if let Some(at) = refused_at {
            pruner.saw(at);
        }
    }
}

const NOTES_PER_COMMIT: usize = 256;

async fn note_one(tx: &Transaction<'_>, note: &TrailNote) -> Result<(), SpoolError> {
    match note {
        TrailNote::Reply { event_id, reply } => {
            let update = tx
                .prepare_cached(
                    "UPDATE trail_events SET reply = $2, reply_ms = $3, budget_ms = $4 WHERE event_id = $1",
                )
                .await?;
            let params: [&(dyn ToSql + Sync); 4] = [
                &event_id.0,
                &reply.outcome.as_str(),
                &(reply.latency_ms as i64),
                &(reply.budget_ms as i64),
            ];
            tx.execute(&update, &params).await?;
        }
        TrailNote::Refused {
            at,
            account,
            refusal,
        } => {
            let insert = tx
                .prepare_cached(
                    "INSERT INTO trail_refusals (received_at, account, refusal, source)
                     VALUES ($1, $2, $3, $4)",
                )
                .await?;
            tx.execute(&insert, &[&at.0, account, &refusal.reason, &refusal.source])
                .await?;
        }
    }
    Ok(())
}

/// Reads the key kept in the database once it answers (and its schema is
/// there), then turns the trail on with it.
pub(super) async fn key_when_reachable(
    pool: Pool,
    slot: crate::spool::TrailSlot,
    setup: crate::spool::TrailSetup,
) {
    loop {
        tokio::time::sleep(KEY_RETRY).await;
        let read = super::on_connection(&pool, "trail key", |c| Box::pin(stored_key(c))).await;
        if let Ok(key) = read {
            slot.store(Some(std::sync::Arc::new(setup.store(key))));
            tracing::info!("the trail's key is read: the trail is written from now on");
            return;
        }
    }
}

/// How often the key is tried while the database is away.
const KEY_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The key kept in the database, made by whichever replica comes first.
pub(super) async fn stored_key(c: &mut Object) -> Result<TrailKey, SpoolError> {
    let fresh = TrailKey::random();
    let insert = c
        .prepare_cached(
            "INSERT INTO trail_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    c.execute(&insert, &[&&fresh.bytes()[..]]).await?;
    let select = c
        .prepare_cached("SELECT key FROM trail_key WHERE id = 1")
        .await?;
    let key: Vec<u8> = get(&c.query_one(&select, &[]).await?, "key")?;
    let bytes: [u8; 32] = key
        .try_into()
        .map_err(|_| SpoolError::storage("the trail's key is not 32 bytes"))?;
    Ok(TrailKey::from_bytes(bytes))
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Int(n) => n.to_sql(ty, out),
            Param::Text(t) => t.to_sql(ty, out),
            Param::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty)
            || <String as ToSql>::accepts(ty)
            || <Vec<u8> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// Events matching `filter`, newest first, with their steps: the answered
/// pushes (at most `filter.scan` trail rows read, see
/// [`trail_rows::indexed`]) and the refused ones, merged. Read in one
/// read-only transaction, each statement within
/// [`super::SEARCH_STATEMENT_TIMEOUT`]: one that runs longer is stopped by
/// the database, and the search refused saying so.
pub(super) async fn search(
    c: &mut Object,
    key: &TrailKey,
    filter: &TrailFilter,
) -> Result<TrailFound, SpoolError> {
    let tx = c.build_transaction().read_only(true).start().await?;
    let ms = super::SEARCH_STATEMENT_TIMEOUT.as_millis();
    tx.batch_execute(&format!("SET LOCAL statement_timeout = {ms}"))
        .await?;
    let found = search_in(&tx, key, filter).await.map_err(too_long)?;
    tx.commit().await?;
    Ok(found)
}

/// `e`, or what to say when it is the database stopping a search's
/// statement at its timeout.
fn too_long(e: SpoolError) -> SpoolError {
    let SpoolError::Storage {
        source: Some(cause),
        ..
    } = &e
    else {
        return e;
    };
    let pg = cause.downcast_ref::<tokio_postgres::Error>();
    if pg.and_then(|pg| pg.code()) != Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) {
        return e;
    }
    SpoolError::Limited(format!(
        "the trail search took longer than {} s and was stopped: narrow it by OpenID, \
         event id or time (since, until)",
        super::SEARCH_STATEMENT_TIMEOUT.as_secs()
    ))
}

/// [`search`], in its transaction.
async fn search_in(
    c: &Transaction<'_>,
    key: &TrailKey,
    filter: &TrailFilter,
) -> Result<TrailFound, SpoolError> {
    let (answered, cut_short) = if trail_rows::wants_answered(filter) {
        answered(c, key, filter).await?
    } else {
        (Vec::new(), false)
    };
    let mut refused = Vec::new();
    if trail_rows::wants_refusals(filter) {
        let (top, bottom) = placed(c, "trail_refusals", filter).await?;
        let window = trail_rows::Window::of(top, bottom, None);
        let (sql, params) = trail_rows::refusals_query(filter, window, |n| format!("${n}"));
        let select = c.prepare_cached(&sql).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        for row in c.query(&select, &refs).await? {
            refused.push(trail_rows::refusal_event(&row)?);
        }
    }
    let found = trail_rows::merged(answered, refused, filter.limit);
    Ok(TrailFound::of(found, cut_short))
}

/// Answered pushes matching `filter`, newest first, with their steps, and
/// whether older rows that were not read remain.
async fn answered(
    c: &Transaction<'_>,
    key: &TrailKey,
    filter: &TrailFilter,
) -> Result<(Vec<TrailEvent>, bool), SpoolError> {
    let (top, bottom) = placed(c, "trail_events", filter).await?;
    let cap = match trail_rows::indexed(filter) {
        true => None,
        false => {
            let offset = trail_rows::floor_offset(filter);
            let (below, above) = trail_rows::Window::floor_bounds(top, bottom);
            let params: [&(dyn ToSql + Sync); 3] = [&below, &above, &offset];
            let floor = c.query_opt(trail_rows::FLOOR, &params).await?;
            floor.map(|r| r.try_get(0)).transpose()?
        }
    };
    let window = trail_rows::Window::of(top, bottom, cap);
    let floor = window.floor;
    let (mut found, mut before, mut read) = (Vec::new(), window.before, 0);
    let steps = c
        .prepare_cached(&format!(
            "SELECT event_id, {STEP_COLUMNS} FROM trail_steps WHERE event_id = ANY($1) ORDER BY id"
        ))
        .await?;
    loop {
        let page = trail_rows::page_size(filter)
            .min(filter.scan.saturating_sub(read))
            .max(1);
        let (sql, params) =
            trail_rows::page_query(filter, key, (before, floor), page, |n| format!("${n}"));
        let select = c.prepare_cached(&sql).await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = c.query(&select, &refs).await?;
        read += rows.len();
        let mut events = rows
            .iter()
            .map(trail_rows::trail_event)
            .collect::<Result<Vec<_>, _>>()?;
        before = events.last().map(|e| e.id);
        let ids: Vec<i64> = events
            .iter()
            .filter_map(|e| e.event_id.map(|id| id.0))
            .collect();
        let mut index: HashMap<i64, usize> = HashMap::new();
        for (i, e) in events.iter().enumerate() {
            if let Some(id) = e.event_id {
                index.insert(id.0, i);
            }
        }
        for row in c.query(&steps, &[&ids]).await? {
            if let Some(&i) = index.get(&get::<i64>(&row, "event_id")?) {
                trail_rows::add_step(&mut events[i], &row)?;
            }
        }
        for mut event in events {
            if trail_rows::judged(&mut event, filter) {
                found.push(event);
                if found.len() == filter.limit {
                    return Ok((found, false));
                }
            }
        }
        if rows.len() < page || read >= filter.scan {
            break;
        }
    }
    // Rows of its time at or below a capped floor were never read, and any
    // of them may match; an indexed search stopped at its cap may have more.
    let cut_short =
        window.capped || (read >= filter.scan && more(c, key, filter, (before, floor)).await?);
    Ok((found, cut_short))
}

/// The ids `filter`'s time range starts above and ends below in `table`
/// (see [`trail_rows::positions`]), each looked up only when it is set.
async fn placed(
    c: &Transaction<'_>,
    table: &str,
    filter: &TrailFilter,
) -> Result<(Option<i64>, Option<i64>), SpoolError> {
    let mut ids = [None, None];
    let (until, since) = trail_rows::positions(filter);
    for (id, at) in ids.iter_mut().zip([until, since]) {
        if let Some(at) = at {
            let position = c.prepare_cached(&trail_rows::position_query(table)).await?;
            *id = c
                .query_opt(&position, &[&at])
                .await?
                .map(|r| get(&r, "lo"))
                .transpose()?;
        }
    }
    Ok((ids[0], ids[1]))
}

/// Whether a row older than `before` (and above `floor`) matches
/// `filter`'s fields.
async fn more(
    c: &Transaction<'_>,
    key: &TrailKey,
    filter: &TrailFilter,
    (before, floor): (Option<i64>, Option<i64>),
) -> Result<bool, SpoolError> {
    let (sql, params) =
        trail_rows::page_query(filter, key, (before, floor), 1, |n| format!("${n}"));
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    Ok(!c.query(&sql, &refs).await?.is_empty())
}

/// Sends the event to `target` again (see the SQLite spool's).
pub(super) async fn redeliver(
    c: &mut Object,
    event_id: EventId,
    target: &str,
    now: UnixMs,
) -> Result<DeliveryId, SpoolError> {
    let tx = c.transaction().await?;
    let queued = tx
        .prepare_cached("SELECT id FROM events WHERE id = $1 FOR UPDATE")
        .await?;
    if tx.query_opt(&queued, &[&event_id.0]).await?.is_none() {
        let restore = tx.prepare_cached(RESTORE_EVENT).await?;
        if tx.execute(&restore, &[&event_id.0]).await? == 0 {
            let traced = tx
                .prepare_cached("SELECT 1 FROM trail_events WHERE event_id = $1 LIMIT 1")
                .await?;
            let why = if tx.query_opt(&traced, &[&event_id.0]).await?.is_some() {
                format!(
                    "event {event_id} was delivered and its body was not kept (keep_bodies is off)"
                )
            } else {
                format!("no event {event_id} in the spool or the trail")
            };
            return Err(SpoolError::Refused(why));
        }
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO deliveries (event_id, target, state, next_at, scheduled_at, updated_at)
             VALUES ($1, $2, 0, $3, $3, $3) RETURNING id",
        )
        .await?;
    let row = tx
        .query_one(&insert, &[&event_id.0, &target, &now.0])
        .await?;
    let id = DeliveryId(get(&row, "id")?);
    tx.commit().await?;
    Ok(id)
}

/// Rows pruned per statement.
const PRUNE_BATCH: i64 = 1_000;

/// Deletes the oldest answered pushes past `retain` or beyond `max_events`,
/// and the oldest refusals past `retain` or beyond `max_refusals`, a bounded
/// batch per transaction, until none is left to prune. Returns which tables
/// it deleted rows from, for their vacuum.
pub(super) async fn prune(
    pool: &Pool,
    store: &TrailStore,
    now: UnixMs,
) -> Result<TrailPruned, SpoolError> {
    let cutoff = trail_rows::cutoff(now, store.retain);
    let mut pruned = TrailPruned::default();
    for (table, keep) in [
        (Pruned::Events, store.max_events),
        (Pruned::Refusals, store.max_refusals),
    ] {
        let keep = keep.min(i64::MAX as u64) as i64;
        loop {
            let n = super::on_connection(pool, "trail prune", move |c| {
                Box::pin(async move { prune_batch(c, table, cutoff, keep).await })
            })
            .await?;
            match table {
                Pruned::Events => pruned.events |= n > 0,
                Pruned::Refusals => pruned.refusals |= n > 0,
            }
            if n < PRUNE_BATCH as u64 {
                break;
            }
        }
    }
    Ok(pruned)
}

/// The table a prune batch deletes from.
#[derive(Clone, Copy)]
enum Pruned {
    Events,
    Refusals,
}

impl Pruned {
    fn oldest(self) -> &'static str {
        match self {
            Pruned::Events => {
                "SELECT id, event_id, received_at, (SELECT max(id) FROM trail_events) AS newest
                 FROM trail_events ORDER BY id LIMIT $1"
            }
            Pruned::Refusals => {
                "SELECT id, NULL::bigint AS event_id, received_at,
                     (SELECT max(id) FROM trail_refusals) AS newest
                 FROM trail_refusals ORDER BY id LIMIT $1"
            }
        }
    }
}

/// The steps of the events just pruned, each found by its event id (a range
/// would walk the dead index entries of every earlier batch until a vacuum).
const DELETE_STEPS: &str = "DELETE FROM trail_steps WHERE event_id = ANY($1)";

/// The kept bodies of the events just pruned, as [`DELETE_STEPS`].
const DELETE_BODIES: &str = "DELETE FROM trail_bodies WHERE event_id = ANY($1)";

async fn prune_batch(
    c: &mut Object,
    table: Pruned,
    cutoff: UnixMs,
    keep: i64,
) -> Result<u64, SpoolError> {
    let oldest = c.prepare_cached(table.oldest()).await?;
    let rows = c.query(&oldest, &[&PRUNE_BATCH]).await?;
    let (mut upto, mut events) = (None, Vec::new());
    for row in &rows {
        let newest: i64 = get(row, "newest")?;
        let id: i64 = get(row, "id")?;
        let received: i64 = get(row, "received_at")?;
        if id > newest.saturating_sub(keep) && received >= cutoff.0 {
            break;
        }
        upto = Some(id);
        events.extend(get::<Option<i64>>(row, "event_id")?);
    }
    let Some(upto) = upto else {
        return Ok(0);
    };
    let tx = c.transaction().await?;
    let pruned = match table {
        Pruned::Refusals => {
            let delete = tx
                .prepare_cached("DELETE FROM trail_refusals WHERE id <= $1")
                .await?;
            tx.execute(&delete, &[&upto]).await?
        }
        Pruned::Events => {
            let delete = tx
                .prepare_cached("DELETE FROM trail_events WHERE id <= $1")
                .await?;
            let pruned = tx.execute(&delete, &[&upto]).await?;
            if !events.is_empty() {
                for sql in [DELETE_STEPS, DELETE_BODIES] {
                    let delete = tx.prepare_cached(sql).await?;
                    tx.execute(&delete, &[&events]).await?;
                }
            }
            pruned
        }
    };
    tx.commit().await?;
    Ok(pruned)
}
