//! The shared spool: PostgreSQL, for any number of replicas on one queue.
//!
//! # Durability
//!
//! [`Spool::enqueue`] resolves once the transaction holding the event, its
//! deliveries and its dedup key has committed: durable as the database makes
//! commits (`synchronous_commit`, and a synchronous standby if the operator
//! runs one). Concurrent enqueues share one transaction (see [`commit`]).
//! A commit that fails or is cut off answers every request in it with an
//! error, so the handler answers 503 and WeChat retries; if the commit did
//! reach the database and only the answer was lost, the retry is a duplicate
//! of a stored event.
//!
//! # Leases
//!
//! [`Spool::lease`] claims due deliveries with `FOR UPDATE SKIP LOCKED` and
//! writes the lease into the row: owner (this process's replica id), end, and
//! a token from a sequence. A replica that dies leaves its leases to end;
//! then any replica takes the deliveries, under new tokens. An outcome is
//! written only while the row still holds the token it was leased under.
//!
//! # Time
//!
//! Due times and lease ends are the callers' unix milliseconds, as with the
//! SQLite spool: the replicas' clocks are assumed to agree (NTP) to well
//! within a lease, which lasts twice a target's timeout plus two seconds.
//!
//! # A database that misbehaves
//!
//! The pool holds at most `pool_size` connections; a request waits
//! [`connect::POOL_WAIT`] for one at most, and every operation is bounded by
//! [`OPERATION_TIMEOUT`]. A connection the database dropped is discarded
//! and a new one opened on the next request, so the spool recovers by itself
//! when the database is back.

mod commit;
mod connect;
mod migrate;
mod prune;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
mod wake;

pub use connect::postgres_display;
pub use migrate::{latest as latest_schema_version, Migrated};

use super::{
    DeadFilter, DeadLetter, DeadReason, DeliveryId, DueWaker, Enqueued, Event, EventId, Lease,
    LeaseToken, NewEvent, Release, Schedule, Settle, Settlement, Spool, SpoolError, SpoolFuture,
    TargetDepth, UnixMs, WaitingDelivery,
};
use crate::config::PostgresSettings;
use deadpool_postgres::{Object, Pool};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Any one database operation, at most.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Enqueues waiting for the writer at most; past it, pushes get 503.
const QUEUE: usize = 8192;
/// How many enqueues one commit may carry at most.
pub const DEFAULT_MAX_BATCH: usize = 512;

impl From<tokio_postgres::Error> for SpoolError {
    fn from(e: tokio_postgres::Error) -> Self {
        SpoolError::Storage(format!("database: {}", crate::error_chain(&e)))
    }
}

impl From<deadpool_postgres::PoolError> for SpoolError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        SpoolError::Storage(format!("database connection: {}", crate::error_chain(&e)))
    }
}

/// What opening the spool does to the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOpen {
    /// Apply the migrations it lacks (the relay at start).
    Migrate,
    /// Require the version this binary knows; change nothing (the operator
    /// commands, which may run beside replicas of another version).
    RequireCurrent,
}

/// The PostgreSQL spool. [`PostgresSpool::close`] lets the writer finish the
/// commits queued.
pub struct PostgresSpool {
    pool: Pool,
    requests: Mutex<Option<mpsc::Sender<commit::Request>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    notifier: wake::Notifier,
    /// This process's name in lease owners.
    replica: String,
    schema: String,
    listen: (tokio_postgres::Config, MakeRustlsConnect),
}

/// One operation within [`OPERATION_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    operation: impl Future<Output = Result<T, SpoolError>>,
) -> Result<T, SpoolError> {
    tokio::time::timeout(OPERATION_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| {
            Err(SpoolError::Storage(format!(
                "the database did not answer within {}s ({what})",
                OPERATION_TIMEOUT.as_secs()
            )))
        })
}

async fn client(pool: &Pool) -> Result<Object, SpoolError> {
    Ok(pool.get().await?)
}

/// Applies the migrations the database lacks (`wxrelay migrate`).
pub async fn migrate(settings: &PostgresSettings) -> Result<Migrated, SpoolError> {
    let config = connect::driver_config(settings)?;
    let tls = connect::tls(settings)?;
    let pool = connect::pool(settings, config, tls)?;
    let mut client = client(&pool).await?;
    bounded("migrate", migrate::migrate(&mut client, &settings.schema)).await
}

impl PostgresSpool {
    /// Connects, brings the schema up to date or checks it (`on_open`), and
    /// starts the writer. Fails when the database cannot be reached.
    pub async fn open(settings: &PostgresSettings, on_open: OnOpen) -> Result<Self, SpoolError> {
        Self::open_with_batch(settings, on_open, DEFAULT_MAX_BATCH).await
    }

    /// As [`PostgresSpool::open`], with at most `max_batch` enqueues per
    /// commit (1 turns group commit off; used to measure what it is worth).
    pub async fn open_with_batch(
        settings: &PostgresSettings,
        on_open: OnOpen,
        max_batch: usize,
    ) -> Result<Self, SpoolError> {
        let config = connect::driver_config(settings)?;
        let tls = connect::tls(settings)?;
        let pool = connect::pool(settings, config.clone(), tls.clone())?;
        {
            let mut client = client(&pool).await?;
            match on_open {
                OnOpen::Migrate => {
                    let migrated =
                        bounded("migrate", migrate::migrate(&mut client, &settings.schema)).await?;
                    if !migrated.applied.is_empty() {
                        tracing::info!(schema = %settings.schema, from = migrated.from, to = migrate::latest(), "spool schema migrated");
                    }
                }
                OnOpen::RequireCurrent => {
                    bounded(
                        "schema check",
                        migrate::require_current(&client, &settings.schema),
                    )
                    .await?
                }
            }
        }
        let (requests, rx) = mpsc::channel(QUEUE);
        let notifier = wake::Notifier::new(pool.clone(), settings.schema.clone());
        let writer = tokio::spawn(commit::run(
            pool.clone(),
            rx,
            max_batch.max(1),
            notifier.clone(),
            prune::Pruner::new(pool.clone()),
        ));
        let notify = tokio::spawn(notifier.clone().run());
        let replica: u64 = rand::random();
        Ok(Self {
            pool,
            requests: Mutex::new(Some(requests)),
            tasks: Mutex::new(vec![notify]),
            writer: Mutex::new(Some(writer)),
            notifier,
            replica: format!("{replica:016x}"),
            schema: settings.schema.clone(),
            listen: (config, tls),
        })
    }

    /// Refuses new work, lets the writer commit what is queued, and stops
    /// listening.
    pub async fn close(&self) {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        // An operator's replay is announced before the command exits.
        self.notifier.flush().await;
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        self.pool.close();
    }

    /// Runs `operation` on a pooled connection, bounded.
    fn with_client<T, F>(&self, what: &'static str, operation: F) -> SpoolFuture<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut Object) -> BoxedOp<'c, T> + Send + 'static,
    {
        let pool = self.pool.clone();
        let closed = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        Box::pin(async move {
            if closed {
                return Err(SpoolError::Closed);
            }
            bounded(what, async move {
                let mut client = client(&pool).await?;
                operation(&mut client).await
            })
            .await
        })
    }
}

impl Drop for PostgresSpool {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}

type BoxedOp<'c, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, SpoolError>> + Send + 'c>>;

impl Spool for PostgresSpool {
    fn enqueue(
        &self,
        event: NewEvent,
        now_ms: UnixMs,
        dedup_window_ms: i64,
    ) -> SpoolFuture<Enqueued> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = commit::Request {
            event,
            now: now_ms,
            window: dedup_window_ms,
            reply,
        };
        let sent = match self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            None => Err(SpoolError::Closed),
            Some(tx) => tx.try_send(request).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SpoolError::Busy,
                mpsc::error::TrySendError::Closed(_) => SpoolError::Closed,
            }),
        };
        Box::pin(async move {
            sent?;
            answer.await.unwrap_or(Err(SpoolError::Closed))
        })
    }

    fn lease(
        &self,
        target: &str,
        now_ms: UnixMs,
        limit: usize,
        lease_ms: i64,
    ) -> SpoolFuture<Vec<Lease>> {
        let target = target.to_owned();
        let owner = self.replica.clone();
        self.with_client("lease", move |c| {
            Box::pin(async move { lease(c, &target, now_ms, limit, lease_ms, &owner).await })
        })
    }

    fn record(&self, settlements: Vec<Settle>, now_ms: UnixMs) -> SpoolFuture<()> {
        self.with_client("record", move |c| {
            Box::pin(async move { record(c, &settlements, now_ms).await })
        })
    }

    fn release(&self, release: Release, now_ms: UnixMs) -> SpoolFuture<u64> {
        let notifier = self.notifier.clone();
        self.with_client("release", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "UPDATE deliveries SET next_at = $2
                         WHERE state = 0 AND target = $1 AND next_at > $2 AND attempts > 0
                           AND ($3::bigint IS NULL OR id = $3) AND ($4 OR not_before <= $2)",
                    )
                    .await?;
                let id = release.delivery_id.map(|d| d.0);
                let n = c
                    .execute(
                        &statement,
                        &[&release.target, &now_ms.0, &id, &release.past_retry_after],
                    )
                    .await?;
                if n > 0 {
                    notifier.due([release.target]);
                }
                Ok(n)
            })
        })
    }

    fn retire_targets(
        &self,
        targets: Vec<String>,
        now_ms: UnixMs,
    ) -> SpoolFuture<Vec<(String, u64)>> {
        self.with_client("retire", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "UPDATE deliveries SET state = 2, reason = $2, updated_at = $3,
                            last_error = 'the target is no longer in the configuration'
                         WHERE state = 0 AND target IS NOT NULL AND NOT (target = ANY($1))
                         RETURNING target",
                    )
                    .await?;
                let rows = c
                    .query(
                        &statement,
                        &[&targets, &DeadReason::TargetRemoved.as_str(), &now_ms.0],
                    )
                    .await?;
                let mut retired: BTreeMap<String, u64> = BTreeMap::new();
                for row in rows {
                    *retired.entry(row.get(0)).or_default() += 1;
                }
                Ok(retired.into_iter().collect())
            })
        })
    }

    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>> {
        self.with_client("dead letters", move |c| {
            Box::pin(async move { dead_letters(c, &filter, limit).await })
        })
    }

    fn replay(&self, filter: DeadFilter, now_ms: UnixMs) -> SpoolFuture<u64> {
        let notifier = self.notifier.clone();
        self.with_client("replay", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "UPDATE deliveries SET state = 0, attempts = 0, next_at = $6, reason = '',
                            updated_at = $6, step = 0, scheduled_at = $6, not_before = 0,
                            lease_until = 0
                         WHERE state = 2 AND target IS NOT NULL
                           AND ($1::text IS NULL OR target = $1)
                           AND ($2::text IS NULL OR reason = $2)
                           AND ($3::bigint IS NULL OR updated_at >= $3)
                           AND ($4::bigint IS NULL OR updated_at < $4)
                           AND ($5::bigint IS NULL OR id = $5)
                         RETURNING target",
                    )
                    .await?;
                let f = FilterParams::of(&filter);
                let rows = c
                    .query(
                        &statement,
                        &[&f.target, &f.reason, &f.since, &f.until, &f.id, &now_ms.0],
                    )
                    .await?;
                let targets: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                let n = targets.len() as u64;
                notifier.due(targets);
                Ok(n)
            })
        })
    }

    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64> {
        self.with_client("purge", move |c| {
            Box::pin(async move { purge(c, &filter).await })
        })
    }

    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>> {
        self.with_client("depth", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "SELECT d.target, COUNT(*), MIN(e.received_at)
                         FROM deliveries d JOIN events e ON e.id = d.event_id
                         WHERE d.state = 0 GROUP BY d.target ORDER BY d.target",
                    )
                    .await?;
                Ok(c.query(&statement, &[])
                    .await?
                    .iter()
                    .map(|row| TargetDepth {
                        target: row.get(0),
                        pending: row.get::<_, i64>(1) as u64,
                        oldest_received_at: row.get::<_, Option<i64>>(2).map(UnixMs),
                    })
                    .collect())
            })
        })
    }

    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>> {
        let target = target.to_owned();
        self.with_client("waiting", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "SELECT id, event_id, attempts, next_at, last_error, step, scheduled_at,
                                not_before
                         FROM deliveries WHERE state = 0 AND target = $1
                         ORDER BY next_at, id LIMIT $2",
                    )
                    .await?;
                Ok(c.query(&statement, &[&target, &(limit as i64)])
                    .await?
                    .iter()
                    .map(|row| WaitingDelivery {
                        delivery_id: DeliveryId(row.get(0)),
                        event_id: EventId(row.get(1)),
                        attempts: row.get::<_, i32>(2) as u32,
                        next_at: UnixMs(row.get(3)),
                        schedule: Schedule {
                            step: row.get::<_, i32>(5) as u32,
                            due_at: UnixMs(row.get(6)),
                        },
                        not_before: UnixMs(row.get(7)),
                        last_error: row.get(4),
                    })
                    .collect())
            })
        })
    }

    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>> {
        self.with_client("event", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e WHERE id = $1"
                    ))
                    .await?;
                let row = c.query_opt(&statement, &[&event_id.0]).await?;
                Ok(row.map(|row| event_from(&row, 0)))
            })
        })
    }

    fn probe(&self) -> SpoolFuture<()> {
        self.with_client("probe", move |c| {
            Box::pin(async move {
                let statement = c
                    .prepare_cached(
                        "INSERT INTO probe (id, probes) VALUES (1, 1)
                         ON CONFLICT (id) DO UPDATE SET probes = probe.probes + 1",
                    )
                    .await?;
                c.execute(&statement, &[]).await?;
                Ok(())
            })
        })
    }

    fn on_due_elsewhere(&self, wake: DueWaker) {
        let (config, tls) = self.listen.clone();
        let task = tokio::spawn(wake::listen(config, tls, self.schema.clone(), wake));
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }
}

/// The events table's columns, in the order [`event_from`] reads them.
const EVENT_COLUMNS: &str =
    "e.dedup_key, e.account, e.received_at, e.query, e.body, e.xml, e.fields, e.msg_type, e.event";

fn event_from(row: &tokio_postgres::Row, first: usize) -> Event {
    Event {
        dedup_key: row.get(first),
        account: row.get(first + 1),
        received_at: UnixMs(row.get(first + 2)),
        query: row.get(first + 3),
        body: row.get::<_, Vec<u8>>(first + 4).into(),
        xml: row.get(first + 5),
        fields: row.get(first + 6),
        msg_type: row.get(first + 7),
        event_type: row.get(first + 8),
    }
}

/// Claims up to `limit` due deliveries nobody holds, each under a new token
/// until `now + lease_ms`.
async fn lease(
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
                 SELECT id FROM deliveries
                 WHERE state = 0 AND target = $1 AND next_at <= $2 AND lease_until <= $2
                 ORDER BY next_at, id LIMIT $3
                 FOR UPDATE SKIP LOCKED
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
/// applied only where the row still holds the outcome's lease token.
async fn record(c: &mut Object, settles: &[Settle], now: UnixMs) -> Result<(), SpoolError> {
    let mut done = (Vec::new(), Vec::new());
    let mut retry = RetryColumns::default();
    let mut dead: (Vec<i64>, Vec<i64>, Vec<&str>, Vec<&str>) = Default::default();
    for Settle { lease, settlement } in settles {
        match settlement {
            Settlement::Delivered { delivery_id } => {
                done.0.push(delivery_id.0);
                done.1.push(lease.0);
            }
            Settlement::Retry {
                delivery_id,
                next_at,
                schedule,
                not_before,
                error,
            } => {
                retry.ids.push(delivery_id.0);
                retry.tokens.push(lease.0);
                retry.next_at.push(next_at.0);
                retry.errors.push(error);
                retry.not_before.push(not_before.0);
                retry.steps.push(schedule.step as i32);
                retry.scheduled_at.push(schedule.due_at.0);
            }
            Settlement::Dead {
                delivery_id,
                reason,
                error,
            } => {
                dead.0.push(delivery_id.0);
                dead.1.push(lease.0);
                dead.2.push(reason.as_str());
                dead.3.push(error);
            }
        }
    }
    let tx = c.transaction().await?;
    if !done.0.is_empty() {
        let events = lock_events_of(&tx, "d.id = ANY($1)", &[&done.0]).await?;
        let delete = tx
            .prepare_cached(
                "DELETE FROM deliveries d USING unnest($1::bigint[], $2::bigint[]) AS s(id, token)
                 WHERE d.id = s.id AND d.state = 0 AND d.lease_token = s.token",
            )
            .await?;
        tx.execute(&delete, &[&done.0, &done.1]).await?;
        drop_events_if_done(&tx, &events).await?;
    }
    if !retry.ids.is_empty() {
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
        let r = &retry;
        tx.execute(
            &update,
            &[
                &r.ids,
                &r.tokens,
                &r.next_at,
                &r.errors,
                &r.not_before,
                &r.steps,
                &r.scheduled_at,
                &now.0,
            ],
        )
        .await?;
    }
    if !dead.0.is_empty() {
        let update = tx
            .prepare_cached(
                "UPDATE deliveries d SET state = 2, attempts = d.attempts + 1, reason = s.reason,
                    last_error = s.error, updated_at = $5, lease_until = 0
                 FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                      AS s(id, token, reason, error)
                 WHERE d.id = s.id AND d.state = 0 AND d.lease_token = s.token",
            )
            .await?;
        tx.execute(&update, &[&dead.0, &dead.1, &dead.2, &dead.3, &now.0])
            .await?;
    }
    tx.commit().await?;
    Ok(())
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

/// Locks, in id order, the events of the deliveries `selection` picks (a
/// condition on `deliveries d`). Two transactions that remove the last two
/// deliveries of one event then take turns, so the second sees the first's
/// removal and removes the event; and the order keeps them from deadlocking.
async fn lock_events_of(
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

async fn drop_events_if_done(
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

/// A [`DeadFilter`] as statement parameters.
struct FilterParams<'a> {
    target: Option<&'a str>,
    reason: Option<&'static str>,
    since: Option<i64>,
    until: Option<i64>,
    id: Option<i64>,
}

impl<'a> FilterParams<'a> {
    fn of(f: &'a DeadFilter) -> Self {
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
const DEAD_SELECTION: &str = "d.state = 2
    AND ($1::text IS NULL OR d.target = $1)
    AND ($2::text IS NULL OR d.reason = $2)
    AND ($3::bigint IS NULL OR d.updated_at >= $3)
    AND ($4::bigint IS NULL OR d.updated_at < $4)
    AND ($5::bigint IS NULL OR d.id = $5)";

async fn dead_letters(
    c: &Object,
    filter: &DeadFilter,
    limit: usize,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let statement = c
        .prepare_cached(&format!(
            "SELECT d.id, d.event_id, d.target, d.reason, d.last_error, d.attempts, e.account,
                    e.dedup_key, e.msg_type, e.event, e.received_at, d.updated_at
             FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE {DEAD_SELECTION}
             ORDER BY d.updated_at, d.id LIMIT $6"
        ))
        .await?;
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
                &(limit as i64),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let reason: String = row.get(3);
            Ok(DeadLetter {
                delivery_id: DeliveryId(row.get(0)),
                event_id: EventId(row.get(1)),
                target: row.get(2),
                reason: reason.parse().map_err(SpoolError::Storage)?,
                last_error: row.get(4),
                attempts: row.get::<_, i32>(5) as u32,
                account: row.get(6),
                dedup_key: row.get(7),
                msg_type: row.get(8),
                event_type: row.get(9),
                received_at: UnixMs(row.get(10)),
                dead_at: UnixMs(row.get(11)),
            })
        })
        .collect()
}

async fn purge(c: &mut Object, filter: &DeadFilter) -> Result<u64, SpoolError> {
    let f = FilterParams::of(filter);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&f.target, &f.reason, &f.since, &f.until, &f.id];
    let tx = c.transaction().await?;
    let events = lock_events_of(&tx, DEAD_SELECTION, &params).await?;
    let delete = tx
        .prepare_cached(&format!("DELETE FROM deliveries d WHERE {DEAD_SELECTION}"))
        .await?;
    let n = tx.execute(&delete, &params).await?;
    drop_events_if_done(&tx, &events).await?;
    tx.commit().await?;
    Ok(n)
}
