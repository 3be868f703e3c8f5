//! Claiming due deliveries, recording what became of them, and retiring
//! those of targets no replica names any more.

use super::row::{column, get};
use crate::spool::vocab::{DEAD, EVENT_COLUMNS, EXPIRED, PENDING, RETIRED_ERROR, TARGET_REMOVED};
use crate::spool::{
    rows, DeadReason, Lease, LeaseToken, Settle, Settlement, SpoolError, TrailSlot, UnixMs,
};
use const_format::formatcp;
use deadpool_postgres::{Object, Pool};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

/// Claims up to `limit` due deliveries nobody holds, each under a new token
/// until `now + lease`, the first due first. Of the deliveries with an
/// order key, only each key's first pending one may be claimed.
///
/// The lease reads the target's due deliveries in due order, at most
/// [`LOOK_AHEAD`] past `limit`, and claims those that are their key's first
/// pending one (or have no key): a few index entries a call however many
/// deliveries and keys are pending. Only when that window is full of
/// deliveries it may not claim (held back behind their keys' heads, or
/// leased) does it look past it, stepping through the order index one key at
/// a time to the keys' heads, until it has found enough, so that a backlog
/// held back behind its heads is never read in full.
///
/// Each claim is a transaction of its own, sent in one round trip (see
/// [`claim_at_once`]): the workers of a target wait for their next
/// deliveries one round trip, not four.
pub(super) async fn lease(
    c: &mut Object,
    target: &str,
    now: UnixMs,
    limit: usize,
    lease: Duration,
    owner: &str,
) -> Result<Vec<Lease>, SpoolError> {
    let limit = super::sql_limit(limit);
    let window = limit.saturating_add(LOOK_AHEAD);
    let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
    let in_due_order = c.prepare_cached(CLAIM_IN_DUE_ORDER).await?;
    let params: [&(dyn ToSql + Sync); 6] = [&target, &now.0, &limit, &owner, &lease_ms, &window];
    let mut rows = claim_at_once(c, &in_due_order, &params).await?;
    let short = limit - rows.len() as i64;
    if short > 0 && window_full(c, target, now, window).await? {
        let through_heads = c.prepare_cached(CLAIM_THROUGH_HEADS).await?;
        let params: [&(dyn ToSql + Sync); 5] = [&target, &now.0, &short, &owner, &lease_ms];
        rows.extend(claim_at_once(c, &through_heads, &params).await?);
    }
    let mut leases = rows
        .iter()
        .map(|row| {
            let token = LeaseToken(get(row, "lease_token")?);
            Ok((
                get::<i64>(row, "next_at")?,
                rows::lease(row, target, token)?,
            ))
        })
        .collect::<Result<Vec<_>, SpoolError>>()?;
    // The two claims' rows, in due order together.
    leases.sort_by_key(|(next_at, lease)| (*next_at, lease.delivery_id));
    Ok(leases.into_iter().map(|(_, lease)| lease).collect())
}

/// Opens a transaction whose commit does not wait for the database to
/// flush it to disk (`synchronous_commit = off`), as leases and outcomes
/// are: a database crash can lose the last of them, which only means their
/// deliveries are sent again (at least once), and an fsync per lease or
/// outcome would bound fan-out by the disk. Pushes are never stored this
/// way.
const BEGIN_NOT_WAITING: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// Runs one claim in a transaction of its own in one round trip: its
/// opening, the claim and the commit are sent together, and the database
/// answers them in order. A claim that fails leaves the transaction
/// aborted, and the commit then rolls it back: the connection is clean
/// either way. (A connection given up on midway is discarded, never
/// pooled: see `Checkout`.)
async fn claim_at_once(
    c: &Object,
    claim: &tokio_postgres::Statement,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, SpoolError> {
    let client: &tokio_postgres::Client = c;
    let (begun, claimed, committed) = tokio::join!(
        biased;
        Box::pin(client.batch_execute(BEGIN_NOT_WAITING)),
        Box::pin(client.query(claim, params)),
        Box::pin(client.batch_execute("COMMIT")),
    );
    begun?;
    let rows = claimed?;
    committed?;
    Ok(rows)
}

/// How many due deliveries past `limit` a lease reads in due order before it
/// looks for the keys' heads instead: more than a target's attempts in
/// flight, which hold their deliveries (and those of their keys) at the front
/// of the due order.
const LOOK_AHEAD: i64 = 1024;

/// The end of a lease statement: the deliveries a `due` CTE picked and
/// locked are leased, and returned with their events. Parameters: target,
/// now, limit, owner, lease length, and what `due` uses.
const LEASED: &str = formatcp!(
    "leased AS (
         UPDATE deliveries d
         SET lease_owner = $4, lease_until = $2 + $5, lease_token = nextval('lease_tokens')
         FROM due WHERE d.id = due.id
         RETURNING d.id, d.event_id, d.attempts, d.step, d.scheduled_at, d.lease_token,
                   d.next_at
     )
     SELECT l.id, l.event_id, l.attempts, l.step, l.scheduled_at, l.lease_token,
            {EVENT_COLUMNS}, l.next_at
     FROM leased l JOIN events e ON e.id = l.event_id
     ORDER BY l.next_at, l.id"
);

/// Claims in due order, among the first `$6` due deliveries.
const CLAIM_IN_DUE_ORDER: &str = formatcp!(
    "WITH RECURSIVE due AS (
         SELECT d.id FROM (
             SELECT id, order_key, next_at FROM deliveries
             WHERE target = $1 AND state = {PENDING} AND next_at <= $2
             ORDER BY next_at, id LIMIT $6) w
         JOIN deliveries d ON d.id = w.id
         WHERE d.state = {PENDING} AND d.next_at <= $2 AND d.lease_until <= $2
           AND (w.order_key IS NULL OR NOT EXISTS (
               SELECT 1 FROM deliveries p
               WHERE p.target = $1 AND p.state = {PENDING} AND p.order_key = w.order_key
                 AND p.id < w.id))
         ORDER BY w.next_at, w.id LIMIT $3
         FOR UPDATE OF d SKIP LOCKED
     ), {LEASED}"
);

/// Claims through the keys' heads, walking the order index a key at a time.
const CLAIM_THROUGH_HEADS: &str = formatcp!(
    "WITH RECURSIVE heads AS (
         (SELECT order_key, id FROM deliveries
          WHERE target = $1 AND state = {PENDING} AND order_key IS NOT NULL
          ORDER BY order_key, id LIMIT 1)
         UNION ALL
         SELECT next.order_key, next.id FROM heads h CROSS JOIN LATERAL (
             SELECT order_key, id FROM deliveries
             WHERE target = $1 AND state = {PENDING} AND order_key IS NOT NULL
               AND order_key > h.order_key
             ORDER BY order_key, id LIMIT 1) next
     ), candidates AS (
         -- The walk stops once it has found enough heads to claim.
         (SELECT h.id FROM heads h JOIN deliveries x ON x.id = h.id
          WHERE x.next_at <= $2 AND x.lease_until <= $2 LIMIT $3)
         UNION ALL
         (SELECT id FROM deliveries
          WHERE target = $1 AND state = {PENDING} AND order_key IS NULL
            AND next_at <= $2 AND lease_until <= $2
          ORDER BY next_at, id LIMIT $3)
     ), due AS (
         SELECT d.id FROM deliveries d
         WHERE d.id IN (SELECT id FROM candidates)
           AND d.state = {PENDING} AND d.next_at <= $2 AND d.lease_until <= $2
         ORDER BY d.next_at, d.id LIMIT $3
         FOR UPDATE OF d SKIP LOCKED
     ), {LEASED}"
);

/// Whether the target has `window` due pending deliveries or more: then a
/// lease that read them all in due order may have left claimable ones past
/// them.
async fn window_full(
    c: &Object,
    target: &str,
    now: UnixMs,
    window: i64,
) -> Result<bool, SpoolError> {
    let count = c.prepare_cached(DUE_IN_WINDOW).await?;
    let row = c.query_one(&count, &[&target, &now.0, &window]).await?;
    Ok(get::<i64>(&row, "due")? >= window)
}

const DUE_IN_WINDOW: &str = formatcp!(
    "SELECT count(*) AS due FROM (
         SELECT 1 FROM deliveries WHERE target = $1 AND state = {PENDING} AND next_at <= $2
         LIMIT $3) w"
);

/// A `record` call waiting for the next batch of outcomes.
pub(super) struct Recording {
    pub settles: Vec<Settle>,
    pub now: UnixMs,
    pub reply: oneshot::Sender<Result<(), SpoolError>>,
}

/// The `record` calls waiting when the recorder is free go into one
/// transaction, as pushes do: the workers of every target settle together.
/// The deliveries settled go to `upkeep`'s count (see [`super::analyze`]).
pub(super) async fn run(
    pool: Pool,
    mut calls: mpsc::Receiver<Recording>,
    trail: TrailSlot,
    upkeep: super::analyze::Analyzer,
) {
    let mut batch = Vec::new();
    while calls.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let traced = trail.load().is_some();
        let result = super::bounded("record", async {
            let mut checkout = super::Checkout::of(&pool).await?;
            let recorded = record(checkout.get()?, &batch, traced).await;
            checkout.finished();
            recorded
        })
        .await;
        if result.is_ok() {
            upkeep.settled(batch.iter().map(|call| call.settles.len() as u64).sum());
        }
        for call in batch.drain(..) {
            let _ = call.reply.send(result.clone());
        }
    }
}

/// `record` calls in one transaction at most.
const MAX_BATCH: usize = 256;

/// Writes outcomes in one transaction, each applied only where the row
/// still holds the outcome's lease token. A delivered outcome also settles
/// a delivery retired (`target_removed`) while its attempt was in flight:
/// the target has it.
///
/// The statements go out together once the transaction is open, and the
/// database runs them in order: a batch costs the same few round trips
/// however many outcomes it holds and of what kinds.
async fn record(c: &mut Object, calls: &[Recording], traced: bool) -> Result<(), SpoolError> {
    let mut o = Outcomes::default();
    for call in calls {
        for settle in &call.settles {
            o.add(settle, call.now);
        }
    }
    let all: Vec<i64> = [&o.delivered.0, &o.retry.ids, &o.dead.ids]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    let tx = c.transaction().await?;
    // Prepared before any is sent (from the cache, after the first batch),
    // so that none waits for a statement to be prepared and they go out in
    // the order below.
    let lock_events = tx.prepare_cached(LOCK_EVENTS_OF_DELIVERIES).await?;
    let lock = tx.prepare_cached(LOCK_DELIVERIES).await?;
    let delete = tx.prepare_cached(DELETE_DELIVERED).await?;
    let retry = tx.prepare_cached(&traced_or(RETRY, traced)).await?;
    let dead = tx.prepare_cached(&traced_or(DEAD_LETTER, traced)).await?;
    let (delivered, d) = (&o.delivered, &o.dead);
    let events_params: [&(dyn ToSql + Sync); 1] = [&delivered.0];
    let lock_params: [&(dyn ToSql + Sync); 1] = [&all];
    let delete_params: [&(dyn ToSql + Sync); 2] = [&delivered.0, &delivered.1];
    let retry_params = o.retry.params();
    let dead_params: [&(dyn ToSql + Sync); 5] = [&d.ids, &d.tokens, &d.reasons, &d.errors, &d.now];
    // Rows are locked in one order, events then deliveries, each by id: two
    // batches (two replicas', or a stale outcome and the new owner's) wait
    // for each other rather than deadlock.
    let (set, events, locked, deleted, retried, dead_lettered) = tokio::join!(
        biased;
        // Not waiting for the flush, as a lease's commit (see [`BEGIN_NOT_WAITING`]).
        Box::pin(tx.batch_execute("SET LOCAL synchronous_commit = off")),
        Box::pin(unless_empty(&delivered.0, tx.query(&lock_events, &events_params))),
        Box::pin(tx.execute(&lock, &lock_params)),
        Box::pin(unless_empty(&delivered.0, tx.query(&delete, &delete_params))),
        Box::pin(unless_empty(&o.retry.ids, tx.query(&retry, &retry_params))),
        Box::pin(unless_empty(&d.ids, tx.query(&dead, &dead_params))),
    );
    set?;
    events?;
    locked?;
    // With the trail on, each statement says which outcomes it wrote.
    let mut applied = Vec::new();
    for rows in [deleted?, retried?, dead_lettered?] {
        written(&rows, &mut applied)?;
    }
    if traced {
        let settles: Vec<(&Settle, UnixMs)> = calls
            .iter()
            .flat_map(|call| call.settles.iter().map(|s| (s, call.now)))
            .collect();
        super::trail::steps(&tx, &settles, &applied).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// `query`'s rows, or none without running it when `ids` is empty.
async fn unless_empty(
    ids: &[i64],
    query: impl Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    query.await
}

/// Locks, in id order, the events of the deliveries `$1` names: two batches
/// that remove the last two deliveries of one event take turns, so the
/// second sees the first's removal and removes the event.
const LOCK_EVENTS_OF_DELIVERIES: &str =
    "SELECT id FROM events WHERE id IN (SELECT d.event_id FROM deliveries d WHERE d.id = ANY($1))
     ORDER BY id FOR UPDATE";

/// Locks the deliveries `$1` names, in id order.
const LOCK_DELIVERIES: &str = "SELECT id FROM deliveries WHERE id = ANY($1) ORDER BY id FOR UPDATE";

/// An outcome's statement, returning what it wrote when the trail is on.
fn traced_or(statement: &'static str, traced: bool) -> String {
    if traced {
        format!("{statement} RETURNING d.id, d.event_id, d.target")
    } else {
        statement.to_owned()
    }
}

/// The delivery, event and target of each outcome a statement wrote.
fn written(
    rows: &[tokio_postgres::Row],
    applied: &mut Vec<(i64, i64, String)>,
) -> Result<(), SpoolError> {
    for row in rows {
        let target: Option<String> = get(row, "target")?;
        applied.push((
            get(row, "id")?,
            get(row, "event_id")?,
            target.unwrap_or_default(),
        ));
    }
    Ok(())
}

/// Delivered outcomes: ids and tokens. Each is deleted, and so is its
/// event once no delivery of it is left (its event is locked first, see
/// [`LOCK_EVENTS_OF_DELIVERIES`]); the deliveries deleted are returned.
/// The statement's own deletions are not in the snapshot its event check
/// reads, so it leaves them out by id.
const DELETE_DELIVERED: &str = formatcp!(
    "WITH gone AS (
         DELETE FROM deliveries d USING unnest($1::bigint[], $2::bigint[]) AS s(id, token)
         WHERE d.id = s.id AND d.lease_token = s.token
           AND (d.state = {PENDING} OR (d.state = {DEAD} AND d.reason = '{TARGET_REMOVED}'))
         RETURNING d.id, d.event_id, d.target
     ), dropped AS (
         DELETE FROM events e WHERE e.id IN (SELECT event_id FROM gone)
           AND NOT EXISTS (SELECT 1 FROM deliveries o
                           WHERE o.event_id = e.id AND o.id NOT IN (SELECT id FROM gone))
     )
     SELECT id, event_id, target FROM gone"
);

/// Failed attempts to try again: [`RetryColumns`].
const RETRY: &str = formatcp!(
    "UPDATE deliveries d SET attempts = d.attempts + 1, next_at = s.next_at,
        last_error = s.error, updated_at = s.now, not_before = s.not_before,
        step = s.step, scheduled_at = s.scheduled_at, lease_until = 0
     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[],
                 $6::int[], $7::bigint[], $8::bigint[])
          AS s(id, token, next_at, error, not_before, step, scheduled_at, now)
     WHERE d.id = s.id AND d.state = {PENDING} AND d.lease_token = s.token"
);

/// Dead letters: [`DeadColumns`]. An expired delivery is dead-lettered
/// instead of sent: no attempt.
const DEAD_LETTER: &str = formatcp!(
    "UPDATE deliveries d SET state = {DEAD},
        attempts = d.attempts + (s.reason <> '{EXPIRED}')::int, reason = s.reason,
        last_error = s.error, updated_at = s.now, lease_until = 0
     FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])
          AS s(id, token, reason, error, now)
     WHERE d.id = s.id AND d.state = {PENDING} AND d.lease_token = s.token"
);

/// Outcomes as columns, one set per statement.
#[derive(Default)]
struct Outcomes<'a> {
    /// Ids and tokens.
    delivered: (Vec<i64>, Vec<i64>),
    retry: RetryColumns<'a>,
    dead: DeadColumns<'a>,
}

#[derive(Default)]
struct RetryColumns<'a> {
    ids: Vec<i64>,
    tokens: Vec<i64>,
    next_at: Vec<i64>,
    errors: Vec<&'a str>,
    not_before: Vec<i64>,
    steps: Vec<i32>,
    scheduled_at: Vec<i64>,
    now: Vec<i64>,
}

impl RetryColumns<'_> {
    /// The parameters of [`RETRY`].
    fn params(&self) -> [&(dyn ToSql + Sync); 8] {
        [
            &self.ids,
            &self.tokens,
            &self.next_at,
            &self.errors,
            &self.not_before,
            &self.steps,
            &self.scheduled_at,
            &self.now,
        ]
    }
}

#[derive(Default)]
struct DeadColumns<'a> {
    ids: Vec<i64>,
    tokens: Vec<i64>,
    reasons: Vec<&'a str>,
    errors: Vec<&'a str>,
    now: Vec<i64>,
}

impl<'a> Outcomes<'a> {
    /// One outcome, recorded at `now`.
    fn add(
        &mut self,
        Settle {
            lease, settlement, ..
        }: &'a Settle,
        now: UnixMs,
    ) {
        match settlement {
            Settlement::Delivered { delivery_id } => {
                self.delivered.0.push(delivery_id.0);
                self.delivered.1.push(lease.0);
            }
            Settlement::Retry {
                delivery_id,
                next_at,
                schedule,
                not_before,
                error,
            } => {
                let r = &mut self.retry;
                r.ids.push(delivery_id.0);
                r.tokens.push(lease.0);
                r.next_at.push(next_at.0);
                r.errors.push(error);
                r.not_before.push(not_before.0);
                r.steps.push(schedule.step as i32);
                r.scheduled_at.push(schedule.due_at.0);
                r.now.push(now.0);
            }
            Settlement::Dead {
                delivery_id,
                reason,
                error,
            } => {
                let d = &mut self.dead;
                d.ids.push(delivery_id.0);
                d.tokens.push(lease.0);
                d.reasons.push(reason.as_str());
                d.errors.push(error);
                d.now.push(now.0);
            }
        }
    }
}

/// Locks, in id order, the events of the deliveries `selection` picks (a
/// condition on `deliveries d`). Two transactions that remove the last two
/// deliveries of one event then take turns, so the second sees the first's
/// removal and removes the event; and the order keeps them from deadlocking.
pub(super) async fn lock_events_of(
    tx: &deadpool_postgres::Transaction<'_>,
    selection: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<i64>, SpoolError> {
    let lock = tx
        .prepare_cached(&format!(
            "SELECT id FROM events WHERE id IN (SELECT d.event_id FROM deliveries d WHERE {selection})
             ORDER BY id FOR UPDATE"
        ))
        .await?;
    column(&tx.query(&lock, params).await?, "id")
}

pub(super) async fn drop_events_if_done(
    tx: &deadpool_postgres::Transaction<'_>,
    events: &[i64],
) -> Result<(), SpoolError> {
    let delete = tx
        .prepare_cached(
            "DELETE FROM events e WHERE e.id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)",
        )
        .await?;
    tx.execute(&delete, &[&events]).await?;
    Ok(())
}

/// How long a replica's word on its targets holds: several of the relay's
/// retirement rounds (every 30 s), so that a live replica never lapses.
pub const TARGETS_HOLD_MS: i64 = 120_000;
/// When the names of a replica not heard from are deleted (one stopped for
/// good, or a restart under a new id): long past the time its word holds.
pub const REPLICA_FORGOTTEN_MS: i64 = 10 * TARGETS_HOLD_MS;

/// Records that `replica` names `targets` (forgetting the replicas not
/// heard from for [`REPLICA_FORGOTTEN_MS`]), then dead-letters the pending
/// deliveries of every target that no replica heard from within
/// [`TARGETS_HOLD_MS`] names. Returns how many, per target.
pub(super) async fn retire(
    c: &mut Object,
    replica: &str,
    (targets, traced): (&[String], bool),
    now: UnixMs,
) -> Result<Vec<(String, u64)>, SpoolError> {
    let tx = c.transaction().await?;
    let forget = tx
        .prepare_cached(
            "DELETE FROM replica_targets
             WHERE (replica = $1 AND NOT (target = ANY($2))) OR seen_at <= $3 - $4::bigint",
        )
        .await?;
    tx.execute(
        &forget,
        &[&replica, &targets, &now.0, &REPLICA_FORGOTTEN_MS],
    )
    .await?;
    let name = tx
        .prepare_cached(
            "INSERT INTO replica_targets (replica, target, seen_at)
             SELECT $1, t, $3 FROM unnest($2::text[]) AS t ORDER BY 2
             ON CONFLICT (replica, target) DO UPDATE SET seen_at = excluded.seen_at",
        )
        .await?;
    tx.execute(&name, &[&replica, &targets, &now.0]).await?;
    let retire = tx.prepare_cached(RETIRE).await?;
    let rows = tx
        .query(
            &retire,
            &[
                &DeadReason::TargetRemoved.as_str(),
                &now.0,
                &TARGETS_HOLD_MS,
            ],
        )
        .await?;
    if traced {
        let ends: Vec<(i64, String)> = rows
            .iter()
            .map(|row| Ok((get(row, "event_id")?, get(row, "target")?)))
            .collect::<Result<_, SpoolError>>()?;
        super::trail::retired(&tx, &ends, now).await?;
    }
    tx.commit().await?;
    let mut retired: BTreeMap<String, u64> = BTreeMap::new();
    for target in column::<String>(&rows, "target")? {
        *retired.entry(target).or_default() += 1;
    }
    Ok(retired.into_iter().collect())
}

/// Dead-letters the pending deliveries of targets that no replica heard from
/// lately names. Parameters: the reason, now, how long a replica's word holds.
const RETIRE: &str = formatcp!(
    "UPDATE deliveries d SET state = {DEAD}, reason = $1, updated_at = $2,
        last_error = '{RETIRED_ERROR}'
     WHERE d.state = {PENDING} AND d.target IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM replica_targets r
                       WHERE r.target = d.target AND r.seen_at > $2 - $3::bigint)
     RETURNING d.target, d.event_id"
);
