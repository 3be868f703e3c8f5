//! The shared spool: PostgreSQL, for any number of replicas on one queue.
//!
//! # Durability
//!
//! [`Intake::enqueue`] resolves once the transaction holding the event, its
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
//! [`Work::lease`] claims due deliveries with `FOR UPDATE SKIP LOCKED` and
//! writes the lease into the row: owner (this process's replica id), end, and
//! a token from a sequence. A replica that dies leaves its leases to end;
//! then any replica takes the deliveries, under new tokens. An outcome is
//! written only while the row still holds the token it was leased under.
//! A delivery with an order key (per-user ordering) is not claimed while an
//! earlier delivery of its target and key is pending, leased or not.
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
//! [`connect::POOL_WAIT`] for one at most, and every operation but a schema
//! migration is bounded by [`OPERATION_TIMEOUT`], in the database too
//! (`statement_timeout`). A connection the database dropped is discarded
//! and a new one opened on the next request, so the spool recovers by itself
//! when the database is back.
//!
//! # Tasks
//!
//! The group commit of pushes (which also answers the readiness probe), the
//! recorder of outcomes, the notifier, the pruners and the listener run as
//! supervised tasks (see [`Supervision`]).

mod analyze;
mod commit;
mod connect;
mod dead;
mod late;
mod migrate;
mod opening;
mod prepared;
mod prune;
mod row;
mod settle;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
mod trail;
mod wake;

use super::Migrated;
pub use analyze::{ANALYZE_AFTER_ROWS, VACUUM_AFTER_ROWS};
pub use connect::postgres_display;
pub use migrate::latest as latest_schema_version;
pub use settle::{REPLICA_FORGOTTEN_MS, TARGETS_HOLD_MS};

use super::vocab::{EVENT_COLUMNS, KEEP_TICKET, PENDING, QUEUE, TICKETS};
use super::DeliveryId;
use super::{
    rows, ComponentTicket, DeadFilter, DeadLetter, DueListener, DueWaker, Enqueued, Event, EventId,
    Health, Intake, Leases, NewEvent, Operator, Release, Settle, SpoolError, SpoolFuture,
    Supervision, TargetDepth, Tickets, TrailLog, TrailSetup, TrailSlot, UnixMs, WaitingDelivery,
    Work,
};
use crate::config::PostgresSettings;
use crate::trail::{TrailFilter, TrailFound, TrailNote};
use const_format::formatcp;
use deadpool_postgres::{Object, Pool};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use super::vocab::DEFAULT_MAX_BATCH;

/// Any one database operation, at most.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that store pushes (the one group-commit writer's), beside
/// `pool_size` for everything else.
pub const PUSH_CONNECTIONS: usize = 1;
/// Trail searches that run at once, at most: each holds a connection of the
/// pool the deliveries' leases and outcomes use, so a few slow searches
/// from the admin page must not take them all.
pub const SEARCHES: usize = 2;
/// How long each statement of a trail search may run: well within
/// [`OPERATION_TIMEOUT`], so that a search over a large trail is stopped
/// with a word on how to narrow it rather than lost in a timeout.
pub const SEARCH_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a reading of the queue's depth is answered again: each is a
/// count of the whole backlog, and every replica's every scrape asks.
pub const DEPTH_EVERY: Duration = Duration::from_secs(5);

impl From<tokio_postgres::Error> for SpoolError {
    fn from(e: tokio_postgres::Error) -> Self {
        SpoolError::caused("database", e)
    }
}

impl From<deadpool_postgres::PoolError> for SpoolError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        SpoolError::caused("database connection", e)
    }
}

/// What opening the spool does to the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnOpen {
    /// Apply the migrations it lacks.
    Migrate,
    /// As `Migrate`, but a database that cannot be reached does not stop
    /// the opening: the spool refuses every operation, saying why, and
    /// tries again in the background until the database answers (the
    /// relay at start).
    MigrateWhenReachable,
    /// Require the version this binary knows; change nothing (the operator
    /// commands, which may run beside replicas of another version).
    RequireCurrent,
}

/// The PostgreSQL spool. [`PostgresSpool::close`] lets the writer finish the
/// commits queued.
pub struct PostgresSpool {
    pool: Pool,
    requests: Mutex<Option<mpsc::Sender<commit::Request>>>,
    recordings: Mutex<Option<mpsc::Sender<settle::Recording>>>,
    /// The notifier: runs until the spool closes.
    notify: JoinHandle<()>,
    /// The listener for other replicas' notifications, once asked for.
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Until the schema is checked, why not: every operation fails with it.
    ready: Arc<opening::Readiness>,
    /// The task checking the schema while the database cannot be reached.
    opening: Option<JoinHandle<()>>,
    /// The group commit of pushes and the recorder of outcomes: let finish
    /// at close.
    writers: Mutex<Vec<JoinHandle<()>>>,
    supervision: Supervision,
    notifier: wake::Notifier,
    /// The last reading of the depth.
    depth: Arc<LastDepth>,
    /// This process's name in lease owners.
    replica: String,
    schema: String,
    listen: (tokio_postgres::Config, MakeRustlsConnect),
    /// The trail's settings, once the relay has turned it on.
    trail: TrailSlot,
    /// Replies and refusals for the trail, written by a task of their own.
    notes: Mutex<Option<mpsc::Sender<TrailNote>>>,
    /// A permit per trail search running: at most [`SEARCHES`].
    searches: Arc<tokio::sync::Semaphore>,
}

/// One operation within [`OPERATION_TIMEOUT`].
async fn bounded<T>(
    what: &str,
    operation: impl Future<Output = Result<T, SpoolError>>,
) -> Result<T, SpoolError> {
    tokio::time::timeout(OPERATION_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| {
            Err(SpoolError::storage(format!(
                "the database did not answer within {}s ({what})",
                OPERATION_TIMEOUT.as_secs()
            )))
        })
}

async fn client(pool: &Pool) -> Result<Object, SpoolError> {
    Ok(pool.get().await?)
}

/// A pooled connection for one bounded operation. It goes back to the pool
/// only when [`Checkout::finished`] says the operation ended; dropped before
/// (the operation's time ran out), it is discarded: a database that stopped
/// answering on it (a failover, a partition) may well answer a new one.
struct Checkout(Option<Object>);

impl Checkout {
    async fn of(pool: &Pool) -> Result<Self, SpoolError> {
        Ok(Self(Some(client(pool).await?)))
    }

    /// The connection, until finished.
    fn get(&mut self) -> Result<&mut Object, SpoolError> {
        self.0.as_mut().ok_or(SpoolError::Closed)
    }

    /// The operation ended (well or not): the connection may serve again.
    fn finished(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(Object::take(object));
        }
    }
}

/// Runs `operation` on a pooled connection within [`OPERATION_TIMEOUT`].
async fn on_connection<T>(
    pool: &Pool,
    what: &str,
    operation: impl for<'c> FnOnce(&'c mut Object) -> BoxedOp<'c, T>,
) -> Result<T, SpoolError> {
    bounded(what, async {
        let mut checkout = Checkout::of(pool).await?;
        let result = operation(checkout.get()?).await;
        checkout.finished();
        result
    })
    .await
}

/// Applies the migrations the database lacks (`wxrelay migrate`).
pub async fn migrate(settings: &PostgresSettings) -> Result<Migrated, SpoolError> {
    let config = connect::driver_config(settings)?;
    let tls = connect::tls(settings)?;
    let pool = connect::pool(1, config, tls)?;
    let mut client = client(&pool).await?;
    migrate::migrate(&mut client, &settings.schema).await
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
        let pool = connect::pool(settings.pool_size, config.clone(), tls.clone())?;
        // Pushes are stored on a connection of their own, so that they never
        // wait for one behind the delivery workers' leases and outcomes.
        let push_pool = connect::pool(PUSH_CONNECTIONS, config.clone(), tls.clone())?;
        let supervision = Supervision::default();
        let (ready, opening) =
            opening::schema(&pool, &settings.schema, on_open, &supervision).await?;
        let (requests, rx) = mpsc::channel(QUEUE);
        let replica = format!("{:016x}", rand::random::<u64>());
        let notifier = wake::Notifier::new(pool.clone(), settings.schema.clone(), replica.clone());
        let trail = TrailSlot::default();
        let upkeep = analyze::Analyzer::new(pool.clone(), supervision.clone());
        let pruner = prune::Pruner::new(
            pool.clone(),
            supervision.clone(),
            trail.clone(),
            upkeep.clone(),
        );
        let writer = commit::Writer {
            pool: push_pool,
            notifier: notifier.clone(),
            prune: pruner.clone(),
            supervision: supervision.clone(),
            analyze: upkeep.clone(),
            trail: trail.clone(),
        };
        let writer =
            supervision.spawn("postgres writer", commit::run(writer, rx, max_batch.max(1)));
        let notify = supervision.spawn("postgres notifier", notifier.clone().run());
        let (recordings, recorded) = mpsc::channel(QUEUE);
        let recorder = supervision.spawn(
            "postgres settler",
            settle::run(pool.clone(), recorded, trail.clone(), upkeep),
        );
        let (notes, noted) = mpsc::channel(QUEUE);
        let noter = supervision.spawn(
            "postgres trail notes",
            trail::write_notes(pool.clone(), noted, pruner),
        );
        tracing::info!(replica = %replica, database = %settings.display, schema = %settings.schema, "spool opened");
        Ok(Self {
            pool,
            requests: Mutex::new(Some(requests)),
            recordings: Mutex::new(Some(recordings)),
            notify,
            listener: Mutex::new(None),
            ready,
            opening,
            writers: Mutex::new(vec![writer, recorder, noter]),
            supervision,
            notifier,
            depth: Arc::default(),
            replica,
            schema: settings.schema.clone(),
            listen: (config, tls),
            trail,
            notes: Mutex::new(Some(notes)),
            searches: Arc::new(tokio::sync::Semaphore::new(SEARCHES)),
        })
    }

    /// The watch on this spool's tasks.
    pub fn supervision(&self) -> Supervision {
        self.supervision.clone()
    }

    /// Refuses new work, lets the writers commit what is queued, and stops
    /// listening.
    pub async fn close(&self) {
        self.supervision.closing();
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.recordings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).take();
        let writers = std::mem::take(&mut *self.writers.lock().unwrap_or_else(|e| e.into_inner()));
        for writer in writers {
            let _ = writer.await;
        }
        // An operator's replay is announced before the command exits.
        self.notifier.flush().await;
        self.stop_background();
        self.pool.close();
    }

    /// Ends the tasks that run until told to: the notifier and the listener.
    fn stop_background(&self) {
        self.supervision.closing();
        self.notify.abort();
        if let Some(opening) = &self.opening {
            opening.abort();
        }
        if let Some(listener) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            listener.abort();
        }
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
        let failed = self.supervision.check();
        let ready = self.ready.check();
        Box::pin(async move {
            failed?;
            if closed {
                return Err(SpoolError::Closed);
            }
            ready?;
            on_connection(&pool, what, operation).await
        })
    }

    /// `write`, unless the schema is not checked yet.
    fn when_ready<T: Send + 'static>(
        &self,
        write: impl FnOnce() -> SpoolFuture<T>,
    ) -> SpoolFuture<T> {
        match self.ready.check() {
            Ok(()) => write(),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl Drop for PostgresSpool {
    fn drop(&mut self) {
        self.stop_background();
    }
}

/// A row limit as SQL takes it: "all" (`usize::MAX`) is the largest bigint.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Hands a request to a writer task and resolves with its answer: `Busy`
/// when the task's queue is full, `Closed` once the spool is.
fn submit<T: Send + 'static, R>(
    supervision: &Supervision,
    channel: &Mutex<Option<mpsc::Sender<R>>>,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, SpoolError>>) -> R,
) -> SpoolFuture<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = match channel.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        _ if supervision.check().is_err() => supervision.check(),
        None => Err(SpoolError::Closed),
        Some(tx) => tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SpoolError::Busy,
            mpsc::error::TrySendError::Closed(_) => SpoolError::Closed,
        }),
    };
    let supervision = supervision.clone();
    Box::pin(async move {
        sent?;
        match answer.await {
            Ok(answer) => answer,
            // The task went away with the request: say why, when it failed.
            Err(_) => supervision.check().and(Err(SpoolError::Closed)),
        }
    })
}

type BoxedOp<'c, T> = std::pin::Pin<Box<dyn Future<Output = Result<T, SpoolError>> + Send + 'c>>;

impl PostgresSpool {
    /// Turns the trail on with `setup`, its key the configured one or,
    /// without one, the key kept in the database (made now if there is
    /// none). A relay starts while the database is away: it then reads the
    /// key once the database is back, and writes the trail from then on.
    pub async fn start_trail(&self, setup: TrailSetup) -> Result<(), SpoolError> {
        if let Some(key) = setup.key.clone() {
            self.trail.store(Some(Arc::new(setup.store(key))));
            return Ok(());
        }
        let read = self.with_client("trail key", |c| Box::pin(trail::stored_key(c)));
        match read.await {
            Ok(key) => self.trail.store(Some(Arc::new(setup.store(key)))),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the trail's key yet: the trail starts once the database answers");
                let (pool, slot) = (self.pool.clone(), self.trail.clone());
                let task = trail::key_when_reachable(pool, slot, setup);
                self.supervision.spawn_brief("postgres trail key", task);
            }
        }
        Ok(())
    }
}

impl TrailLog for PostgresSpool {
    fn find(&self, filter: TrailFilter) -> SpoolFuture<TrailFound> {
        let Some(store) = self.trail.load_full() else {
            return Box::pin(async { Err(trail_off()) });
        };
        // Refused at once beyond the bound: the page or command says so,
        // and its user tries again, rather than waiting unseen.
        let Ok(permit) = self.searches.clone().try_acquire_owned() else {
            return Box::pin(async {
                Err(SpoolError::Limited(format!(
                    "{SEARCHES} trail searches are running already: try again once they end"
                )))
            });
        };
        let search = self.with_client("trail search", move |c| {
            Box::pin(async move { trail::search(c, &store.key, &filter).await })
        });
        Box::pin(async move {
            let found = search.await;
            drop(permit);
            found
        })
    }

    fn redeliver(&self, event_id: EventId, target: String, now: UnixMs) -> SpoolFuture<DeliveryId> {
        let notifier = self.notifier.clone();
        let done = self.with_client("redeliver", move |c| {
            Box::pin(async move {
                let id = trail::redeliver(c, event_id, &target, now).await?;
                Ok((id, target))
            })
        });
        Box::pin(async move {
            let (id, target) = done.await?;
            notifier.due([target]);
            Ok(id)
        })
    }
}

fn trail_off() -> SpoolError {
    SpoolError::Refused("the trail is off ([trail] enabled = false)".into())
}

impl Intake for PostgresSpool {
    fn trail_key(&self) -> Option<crate::trail::TrailKey> {
        self.trail.load().as_ref().map(|store| store.key.clone())
    }

    fn note(&self, note: TrailNote) -> bool {
        let notes = self.notes.lock().unwrap_or_else(|e| e.into_inner());
        notes.as_ref().is_some_and(|tx| tx.try_send(note).is_ok())
    }

    fn enqueue(&self, event: NewEvent, now: UnixMs, window: Duration) -> SpoolFuture<Enqueued> {
        self.when_ready(|| {
            submit(&self.supervision, &self.requests, |reply| {
                commit::Request::Push(commit::Push {
                    event,
                    now,
                    window,
                    reply,
                })
            })
        })
    }
}

impl Work for PostgresSpool {
    fn lease(&self, target: &str, now: UnixMs, n: usize, hold: Duration) -> Leases {
        let target = target.to_owned();
        let owner = self.replica.clone();
        self.with_client("lease", move |c| {
            Box::pin(async move { settle::lease(c, &target, now, n, hold, &owner).await })
        })
    }

    fn record(&self, settlements: Vec<Settle>, now: UnixMs) -> SpoolFuture<()> {
        self.when_ready(|| {
            submit(&self.supervision, &self.recordings, |reply| {
                settle::Recording {
                    settles: settlements,
                    now,
                    reply,
                }
            })
        })
    }

    fn release_backoff(&self, target: &str, now: UnixMs) -> SpoolFuture<u64> {
        self.release_now(Release::backlog(target), now)
    }

    fn retire_targets(&self, targets: Vec<String>, now: UnixMs) -> SpoolFuture<Vec<(String, u64)>> {
        let replica = self.replica.clone();
        let traced = self.trail.load().is_some();
        self.with_client("retire", move |c| {
            Box::pin(async move { settle::retire(c, &replica, (&targets, traced), now).await })
        })
    }
}

/// Makes waiting deliveries due now (see [`Release`]).
const RELEASE: &str = formatcp!(
    "UPDATE deliveries SET next_at = $2
     WHERE state = {PENDING} AND target = $1 AND next_at > $2 AND attempts > 0
       AND ($3::bigint IS NULL OR id = $3) AND ($4 OR not_before <= $2)"
);

impl PostgresSpool {
    fn release_now(&self, release: Release, now: UnixMs) -> SpoolFuture<u64> {
        let notifier = self.notifier.clone();
        self.with_client("release", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(RELEASE).await?;
                let id = release.delivery_id.map(|d| d.0);
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                    [&release.target, &now.0, &id, &release.past_retry_after];
                let n = c.execute(&statement, &params).await?;
                if n > 0 {
                    notifier.due([release.target]);
                }
                Ok(n)
            })
        })
    }
}

impl Operator for PostgresSpool {
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>> {
        self.with_client("dead letters", move |c| {
            Box::pin(async move { dead::dead_letters(c, &filter, limit).await })
        })
    }

    fn replay(&self, filter: DeadFilter, now: UnixMs) -> SpoolFuture<u64> {
        let notifier = self.notifier.clone();
        self.with_client("replay", move |c| {
            Box::pin(async move {
                let targets = dead::replay(c, &filter, now).await?;
                let n = targets.len() as u64;
                notifier.due(targets);
                Ok(n)
            })
        })
    }

    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64> {
        self.with_client("purge", move |c| {
            Box::pin(async move { dead::purge(c, &filter).await })
        })
    }

    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>> {
        let target = target.to_owned();
        self.with_client("waiting", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(WAITING).await?;
                let rows = c.query(&statement, &[&target, &sql_limit(limit)]).await?;
                rows.iter().map(rows::waiting).collect()
            })
        })
    }

    fn release(&self, release: Release, now: UnixMs) -> SpoolFuture<u64> {
        self.release_now(release, now)
    }

    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>> {
        self.with_client("event", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(EVENT).await?;
                let row = c.query_opt(&statement, &[&event_id.0]).await?;
                row.as_ref().map(rows::event).transpose()
            })
        })
    }
}

/// A target's waiting deliveries, soonest due first.
const WAITING: &str = formatcp!(
    "SELECT id, event_id, attempts, next_at, last_error, step, scheduled_at, not_before
     FROM deliveries WHERE state = {PENDING} AND target = $1
     ORDER BY next_at, id LIMIT $2"
);

/// One stored event.
const EVENT: &str = formatcp!("SELECT {EVENT_COLUMNS} FROM events e WHERE id = $1");

/// Pending deliveries per target, counted from the due index alone: the
/// oldest is the event of each target's first pending delivery (ids are
/// drawn as pushes arrive), one lookup per target rather than a join of the
/// whole backlog.
const DEPTH: &str = formatcp!(
    "WITH pending AS (
         SELECT target, count(*) AS n, min(id) AS first
         FROM deliveries WHERE state = {PENDING} GROUP BY target
     )
     SELECT p.target, p.n AS pending, e.received_at AS oldest_received_at
     FROM pending p
     JOIN deliveries d ON d.id = p.first
     JOIN events e ON e.id = d.event_id
     ORDER BY p.target"
);

impl Health for PostgresSpool {
    /// A write through the push writer, behind the pushes waiting for it.
    fn probe(&self) -> SpoolFuture<()> {
        self.when_ready(|| submit(&self.supervision, &self.requests, commit::Request::Probe))
    }

    /// Read from the database at most every [`DEPTH_EVERY`]; calls in
    /// between, on this replica, get the last reading.
    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>> {
        let read = self.with_client("depth", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(DEPTH).await?;
                let rows = c.query(&statement, &[]).await?;
                rows.iter().map(rows::depth).collect()
            })
        });
        Box::pin(last_or_read(self.depth.clone(), read))
    }
}

impl Tickets for PostgresSpool {
    /// On a connection of the pool, committed as durably as a push.
    fn keep(&self, ticket: ComponentTicket) -> SpoolFuture<bool> {
        self.with_client("keep ticket", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(KEEP_TICKET).await?;
                let t = &ticket;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                    [&t.account, &t.ticket, &t.create_time, &t.received_at.0];
                Ok(c.query_opt(&statement, &params).await?.is_some())
            })
        })
    }

    fn tickets(&self) -> SpoolFuture<Vec<ComponentTicket>> {
        self.with_client("tickets", move |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(TICKETS).await?;
                let rows = c.query(&statement, &[]).await?;
                rows.iter().map(rows::ticket).collect()
            })
        })
    }
}

impl DueListener for PostgresSpool {
    fn on_due_elsewhere(&self, wake: DueWaker) {
        let (config, tls) = self.listen.clone();
        let listen = wake::listen(config, tls, self.schema.clone(), self.replica.clone(), wake);
        let task = self.supervision.spawn("postgres listener", listen);
        // A relay started again on the same spool listens for its new workers.
        let previous = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task);
        if let Some(previous) = previous {
            previous.abort();
        }
    }
}

/// A reading of the depth and when it was taken; locked while one is taken,
/// so that scrapes at once wait for the one reading.
type LastDepth = tokio::sync::Mutex<Option<(std::time::Instant, Vec<TargetDepth>)>>;

/// The last reading while it is younger than [`DEPTH_EVERY`], else `read`.
async fn last_or_read(
    last: Arc<LastDepth>,
    read: SpoolFuture<Vec<TargetDepth>>,
) -> Result<Vec<TargetDepth>, SpoolError> {
    let mut last = last.lock().await;
    if let Some((at, depth)) = &*last {
        if at.elapsed() < DEPTH_EVERY {
            return Ok(depth.clone());
        }
    }
    let depth = read.await?;
    *last = Some((std::time::Instant::now(), depth.clone()));
    Ok(depth)
}
