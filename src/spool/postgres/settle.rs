//! Claiming due deliveries and recording what became of them.

use super::{event_from, EVENT_COLUMNS};
use crate::spool::{
    DeliveryId, EventId, Lease, LeaseToken, Schedule, Settle, Settlement, SpoolError, UnixMs,
};
use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;

/// Claims up to `limit` due deliveries nobody holds, each under a new token
/// until `now + lease_ms`.
pub(super) async fn lease(
    c: &Object,
    target: &str,
    now: UnixMs,
    limit: usize,
    lease_ms: i64,
    owner: &str,
) -> Result<Vec<Lease>, SpoolError> {
    let statement = c
        .prepare_cached(&format!(
            "WITH due AS (
                 SELECT d.id FROM deliveries d
                 WHERE d.state = 0 AND d.target = $1 AND d.next_at <= $2 AND d.lease_until <= $2
                   AND (d.order_key IS NULL OR NOT EXISTS (
                       SELECT 1 FROM deliveries p
                       WHERE p.target = $1 AND p.order_key = d.order_key AND p.id < d.id
                         AND p.state = 0 AND p.order_key IS NOT NULL))
                 ORDER BY d.next_at, d.id LIMIT $3
                 FOR UPDATE OF d SKIP LOCKED
             ), leased AS (
                 UPDATE deliveries d
                 SET lease_owner = $4, lease_until = $2 + $5, lease_token = nextval('lease_tokens')
                 FROM due WHERE d.id = due.id
                 RETURNING d.id, d.event_id, d.attempts, d.step, d.scheduled_at, d.lease_token,
                           d.next_at
             )
             SELECT l.id, l.event_id, l.attempts, l.step, l.scheduled_at, l.lease_token,
                    {EVENT_COLUMNS}
             FROM leased l JOIN events e ON e.id = l.event_id
             ORDER BY l.next_at, l.id"
        ))
        .await?;
    let rows = c
        .query(
            &statement,
            &[&target, &now.0, &(limit as i64), &owner, &lease_ms],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| Lease {
            delivery_id: DeliveryId(row.get(0)),
            target: target.to_owned(),
            attempts: row.get::<_, i32>(2) as u32,
            schedule: Schedule {
                step: row.get::<_, i32>(3) as u32,
                due_at: UnixMs(row.get(4)),
            },
            event_id: EventId(row.get(1)),
            event: event_from(row, 6),
            token: LeaseToken(row.get(5)),
        })
        .collect())
}

/// Writes outcomes in one transaction, three statements at most, each
/// applied only where the row still holds the outcome's lease token. A
/// delivered outcome also settles a delivery retired (`target_removed`)
/// while its attempt was in flight: the target has it.
pub(super) async fn record(
    c: &mut Object,
    settles: &[Settle],
    now: UnixMs,
) -> Result<(), SpoolError> {
    let o = Outcomes::of(settles);
    let tx = c.transaction().await?;
    if !o.delivered.0.is_empty() {
        let events = lock_events_of(&tx, "d.id = ANY($1)", &[&o.delivered.0]).await?;
        let delete = tx
            .prepare_cached(
                "DELETE FROM deliveries d USING unnest($1::bigint[], $2::bigint[]) AS s(id, token)
                 WHERE d.id = s.id AND d.lease_token = s.token
                   AND (d.state = 0 OR (d.state = 2 AND d.reason = 'target_removed'))",
            )
            .await?;
        tx.execute(&delete, &[&o.delivered.0, &o.delivered.1])
            .await?;
        drop_events_if_done(&tx, &events).await?;
    }
    if !o.retry.ids.is_empty() {
        let update = tx
            .prepare_cached(
                "UPDATE deliveries d SET attempts = d.attempts + 1, next_at = s.next_at,
                    last_error = s.error, updated_at = $8, not_before = s.not_before,
                    step = s.step, scheduled_at = s.scheduled_at, lease_until = 0
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[],
                             $6::int[], $7::bigint[])
                      AS s(id, token, next_at, error, not_before, step, scheduled_at)
                 WHERE d.id = s.id AND d.state = 0 AND d.lease_token = s.token",
            )
            .await?;
        let r = &o.retry;
        let params: [&(dyn ToSql + Sync); 8] = [
            &r.ids,
            &r.tokens,
            &r.next_at,
            &r.errors,
            &r.not_before,
            &r.steps,
            &r.scheduled_at,
            &now.0,
        ];
        tx.execute(&update, &params).await?;
    }
    if !o.dead.0.is_empty() {
        let update = tx
            .prepare_cached(
                "UPDATE deliveries d SET state = 2, attempts = d.attempts + 1, reason = s.reason,
                    last_error = s.error, updated_at = $5, lease_until = 0
                 FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                      AS s(id, token, reason, error)
                 WHERE d.id = s.id AND d.state = 0 AND d.lease_token = s.token",
            )
            .await?;
        let d = &o.dead;
        tx.execute(&update, &[&d.0, &d.1, &d.2, &d.3, &now.0])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Outcomes as columns, one set per statement.
#[derive(Default)]
struct Outcomes<'a> {
    /// Ids and tokens.
    delivered: (Vec<i64>, Vec<i64>),
    retry: RetryColumns<'a>,
    /// Ids, tokens, reasons and errors.
    dead: (Vec<i64>, Vec<i64>, Vec<&'a str>, Vec<&'a str>),
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
}

impl<'a> Outcomes<'a> {
    fn of(settles: &'a [Settle]) -> Self {
        let mut o = Outcomes::default();
        for Settle { lease, settlement } in settles {
            match settlement {
                Settlement::Delivered { delivery_id } => {
                    o.delivered.0.push(delivery_id.0);
                    o.delivered.1.push(lease.0);
                }
                Settlement::Retry {
                    delivery_id,
                    next_at,
                    schedule,
                    not_before,
                    error,
                } => {
                    let r = &mut o.retry;
                    r.ids.push(delivery_id.0);
                    r.tokens.push(lease.0);
                    r.next_at.push(next_at.0);
                    r.errors.push(error);
                    r.not_before.push(not_before.0);
                    r.steps.push(schedule.step as i32);
                    r.scheduled_at.push(schedule.due_at.0);
                }
                Settlement::Dead {
                    delivery_id,
                    reason,
                    error,
                } => {
                    o.dead.0.push(delivery_id.0);
                    o.dead.1.push(lease.0);
                    o.dead.2.push(reason.as_str());
                    o.dead.3.push(error);
                }
            }
        }
        o
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
    Ok(tx
        .query(&lock, params)
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
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
