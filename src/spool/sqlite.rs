//! The embedded spool: one SQLite file in WAL mode with `synchronous=FULL`,
//! written by one thread that commits whatever requests are waiting in one
//! transaction (group commit), so a burst of pushes costs one fsync, not one
//! per push. Reads (leases, listings) run on a second thread with its own
//! connection, so they never wait behind a commit.
//!
//! A lease is held in memory, not written: the database still shows the
//! delivery as due, and the in-memory mark hides it from the next lease until
//! it is settled or the lease ends. A crash loses only the marks, so the
//! leased deliveries are due again at the next start: at least once, with no
//! fsync spent on handing work out. The mark holds the lease's token: an
//! outcome under another token than the mark's is dropped, and an outcome
//! being written keeps its mark to the end, so no new lease is taken on the
//! delivery meanwhile.
//!
//! # When the file goes away
//!
//! A full disk fails the commit itself, and the storage error (e.g. "database
//! or disk is full") reaches every request of that commit. The readiness probe
//! rewrites a one-row table through the writer like any other command, so it
//! fails in the same way, and recovers by itself once there is space again.
//!
//! A file removed or replaced under the running relay (a cleanup job, a
//! restore copied over it) does not fail any write: SQLite keeps writing into
//! the file it has open, which nothing can open again after the relay stops.
//! So before each commit and again before answering it, the writer compares
//! the device and inode at the spool's path with those of the file it opened;
//! on a mismatch it refuses every write (pushes get 503, and WeChat retries
//! them) and the reader refuses every read, so no work is handed out from the
//! lost file. `/readyz` then answers 503 with that reason. The relay does not
//! reopen the path by itself, because what it accepted earlier is only in the
//! old file: while the relay still runs, the operator can copy that file (and
//! its `-wal`) back from `/proc/<pid>/fd/`, then restarts the relay, which
//! opens the file at the path (creating an empty one if there is none).

use super::{
    DeadFilter, DeadLetter, DeadReason, DeliveryId, DeliveryState, Enqueued, Event, EventId, Lease,
    LeaseToken, NewEvent, Release, ReplayGuard, Schedule, Settle, Settlement, Spool, SpoolError,
    SpoolFuture, TargetDepth, UnixMs, WaitingDelivery,
};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, ToSql, Transaction};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use tokio::sync::oneshot;

/// The `state` column's value for [`DeliveryState::Pending`]. A macro, so
/// that statements can spell it as a literal: a bound value would keep
/// SQLite from using the partial indexes on the state.
macro_rules! pending {
    () => {
        0
    };
}

/// The `state` column's value for [`DeliveryState::Dead`] (see [`pending!`]).
macro_rules! dead {
    () => {
        2
    };
}

impl ToSql for DeliveryState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        let code: i64 = match self {
            DeliveryState::Pending => pending!(),
            DeliveryState::Dead => dead!(),
        };
        Ok(code.into())
    }
}

impl ToSql for DeadReason {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

/// Ids (row ids) and times (unix milliseconds) are integers in the file.
macro_rules! sql_integer {
    ($($id:ident),*) => {$(
        impl ToSql for $id {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(self.0.into())
            }
        }

        impl FromSql for $id {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_i64().map($id)
            }
        }
    )*};
}

sql_integer!(EventId, DeliveryId, UnixMs);

impl FromSql for DeadReason {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e: String| FromSqlError::Other(e.into()))
    }
}

/// Requests waiting for the writer (or the reader) at most.
const QUEUE: usize = 8192;

/// How many requests one commit may carry at most.
pub const DEFAULT_MAX_BATCH: usize = 512;

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key   TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    query       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    xml         TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    msg_type    TEXT    NOT NULL,
    event       TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    INTEGER NOT NULL REFERENCES events(id),
    target      TEXT,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT '',
    reason      TEXT    NOT NULL DEFAULT '',
    updated_at  INTEGER NOT NULL,
    -- Set by a Retry-After: the target asked not to be called before this.
    not_before  INTEGER NOT NULL DEFAULT 0,
    -- The retry schedule's place, apart from next_at (which a release moves).
    step         INTEGER NOT NULL DEFAULT 0,
    scheduled_at INTEGER NOT NULL DEFAULT 0,
    -- Account and sender, for a target that takes one user's events in order.
    order_key    TEXT,
    blocked      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, next_at) WHERE state = ",
    pending!(),
    ";
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (updated_at) WHERE state = ",
    dead!(),
    ";
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Signed queries whose signature does not cover the body, with the body
-- they were first taken with (see ReplayGuard).
CREATE TABLE IF NOT EXISTS replay (
    key        TEXT    PRIMARY KEY,
    body_hash  BLOB    NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
-- One row, rewritten by the readiness probe: a real page write and fsync.
CREATE TABLE IF NOT EXISTS probe (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    probes INTEGER NOT NULL
);
"
);

/// Finds the pending deliveries of one user, to find the next head; and the
/// due deliveries that no earlier one of their user holds back, which is all
/// a lease reads. A pending delivery's `blocked` is 1 while an earlier pending
/// delivery of the same target and `order_key` exists: it is set at enqueue
/// and cleared for the next one when the head is delivered or dead-lettered,
/// and a replay sets it again for the deliveries behind a replayed one. Created once the columns exist: a file from before them is
/// migrated first.
const ORDER_INDEX: &str = concat!(
    "CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (target, order_key, id)
     WHERE state = ",
    pending!(),
    " AND order_key IS NOT NULL;
     CREATE INDEX IF NOT EXISTS deliveries_heads ON deliveries (target, next_at)
     WHERE state = ",
    pending!(),
    " AND blocked = 0;"
);

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// What the writer does, each in the next group commit.
enum Command {
    Enqueue(Box<NewEvent>, UnixMs, i64, Reply<Enqueued>),
    Record(Vec<Settlement>, UnixMs, Reply<()>),
    Retire(Vec<String>, UnixMs, Reply<Vec<(String, u64)>>),
    Replay(DeadFilter, UnixMs, Reply<u64>),
    Purge(DeadFilter, Reply<u64>),
    Release(Release, UnixMs, Reply<u64>),
    Probe(Reply<()>),
}

/// What the reader does.
enum Read {
    Lease(String, UnixMs, usize, i64, Reply<Vec<Lease>>),
    DeadLetters(DeadFilter, usize, Reply<Vec<DeadLetter>>),
    Depth(Reply<Vec<TargetDepth>>),
    Waiting(String, usize, Reply<Vec<WaitingDelivery>>),
    Event(EventId, Reply<Option<Event>>),
}

/// Deliveries handed out and not settled yet.
type Leased = Arc<Mutex<Held>>;

#[derive(Default)]
struct Held {
    /// Id → (target, lease end, token).
    marks: HashMap<DeliveryId, (String, UnixMs, LeaseToken)>,
    /// The last token handed out.
    last_token: i64,
}

/// A lease end no clock reaches: the mark of an outcome being written.
const WRITING: UnixMs = UnixMs(i64::MAX);

/// The SQLite spool. Dropping it (or calling [`SqliteSpool::close`]) lets the
/// writer finish what it has queued and close the file.
pub struct SqliteSpool {
    tx: Mutex<Option<mpsc::SyncSender<Command>>>,
    reads: Mutex<Option<mpsc::SyncSender<Read>>>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    leased: Leased,
}

impl SqliteSpool {
    /// Opens (creating if needed) the spool file and starts its writer.
    pub fn open(path: &Path) -> Result<Self, SpoolError> {
        Self::open_with_batch(path, DEFAULT_MAX_BATCH)
    }

    /// As [`SqliteSpool::open`], with at most `max_batch` requests per commit
    /// (1 turns group commit off; used to measure what it is worth).
    pub fn open_with_batch(path: &Path, max_batch: usize) -> Result<Self, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                SpoolError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = open_connection(path)?;
        let file = Arc::new(OpenedFile::of(path)?);
        let read_conn = open_connection(path)?;
        let leased = Leased::default();
        // Bounded: while the disk stalls, requests are refused at once (503,
        // and WeChat retries) rather than queued in memory without limit.
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (reads, read_rx) = mpsc::sync_channel(QUEUE);
        let start_error =
            |e: std::io::Error| SpoolError::Storage(format!("cannot start the spool threads: {e}"));
        let writer = thread::Builder::new()
            .name("spool-writer".into())
            .spawn({
                let file = file.clone();
                move || run_writer(conn, rx, max_batch.max(1), &file)
            })
            .map_err(start_error)?;
        let held = leased.clone();
        let reader = thread::Builder::new()
            .name("spool-reader".into())
            .spawn(move || run_reader(read_conn, read_rx, held, &file))
            .map_err(start_error)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            reads: Mutex::new(Some(reads)),
            threads: Mutex::new(vec![writer, reader]),
            leased,
        })
    }

    /// Finishes the queued requests and closes the file. Blocks until done.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut reads) = self.reads.lock() {
            reads.take();
        }
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }

    fn submit<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Command) -> SpoolFuture<T> {
        send_to(&self.tx, make)
    }

    fn read<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Read) -> SpoolFuture<T> {
        send_to(&self.reads, make)
    }
}

fn send_to<C, T: Send + 'static>(
    channel: &Mutex<Option<mpsc::SyncSender<C>>>,
    make: impl FnOnce(Reply<T>) -> C,
) -> SpoolFuture<T> {
    let (reply, rx) = oneshot::channel();
    let sent = match channel.lock().ok().as_ref().and_then(|tx| tx.as_ref()) {
        None => Err(SpoolError::Closed),
        Some(tx) => tx.try_send(make(reply)).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => SpoolError::Busy,
            mpsc::TrySendError::Disconnected(_) => SpoolError::Closed,
        }),
    };
    Box::pin(async move {
        sent?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    })
}

fn run_reader(conn: Connection, rx: mpsc::Receiver<Read>, leased: Leased, file: &OpenedFile) {
    while let Ok(read) = rx.recv() {
        if let Err(e) = file.check() {
            fail_read(read, e);
            continue;
        }
        match read {
            Read::Lease(target, now, limit, lease_ms, r) => {
                let _ = r.send(
                    lease(&conn, &leased, &target, now, limit, lease_ms).map_err(SpoolError::from),
                );
            }
            Read::DeadLetters(f, limit, r) => {
                let _ = r.send(dead_letters(&conn, &f, limit).map_err(SpoolError::from));
            }
            Read::Depth(r) => {
                let _ = r.send(depth(&conn).map_err(SpoolError::from));
            }
            Read::Waiting(target, limit, r) => {
                let _ = r.send(waiting(&conn, &target, limit).map_err(SpoolError::from));
            }
            Read::Event(id, r) => {
                let _ = r.send(stored_event(&conn, id).map_err(SpoolError::from));
            }
        }
    }
}

fn fail_read(read: Read, err: SpoolError) {
    match read {
        Read::Lease(_, _, _, _, r) => drop(r.send(Err(err))),
        Read::DeadLetters(_, _, r) => drop(r.send(Err(err))),
        Read::Depth(r) => drop(r.send(Err(err))),
        Read::Waiting(_, _, r) => drop(r.send(Err(err))),
        Read::Event(_, r) => drop(r.send(Err(err))),
    }
}

/// The file the spool opened, to notice when its path no longer leads to it.
struct OpenedFile {
    path: PathBuf,
    id: (u64, u64),
}

impl OpenedFile {
    fn of(path: &Path) -> Result<Self, SpoolError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| SpoolError::Storage(format!("cannot stat {}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            id: file_id(&meta),
        })
    }

    /// One `stat`: cheap next to the fsync of a commit.
    fn check(&self) -> Result<(), SpoolError> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if file_id(&meta) == self.id => Ok(()),
            Ok(_) => Err(SpoolError::Gone(self.path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SpoolError::Gone(self.path.display().to_string()))
            }
            Err(e) => Err(SpoolError::Storage(format!(
                "cannot stat {}: {e}",
                self.path.display()
            ))),
        }
    }
}

#[cfg(unix)]
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Elsewhere there is no inode to compare; the check always passes.
#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

impl Drop for SqliteSpool {
    fn drop(&mut self) {
        self.close();
    }
}

fn open_connection(path: &Path) -> Result<Connection, SpoolError> {
    let conn = Connection::open(path)
        .map_err(|e| SpoolError::Storage(format!("cannot open {}: {e}", path.display())))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.execute_batch(SCHEMA)?;
    add_schedule_columns(&conn)?;
    add_order_key(&conn)?;
    add_blocked(&conn)?;
    conn.execute_batch(ORDER_INDEX)?;
    Ok(conn)
}

/// A spool file from before the schedule was kept apart from `next_at` gets
/// the columns, each delivery's schedule taken from what it had: its failed
/// attempts and its due time.
fn add_schedule_columns(conn: &Connection) -> rusqlite::Result<()> {
    add_column(
        conn,
        "step",
        "ALTER TABLE deliveries ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
         ALTER TABLE deliveries ADD COLUMN scheduled_at INTEGER NOT NULL DEFAULT 0;
         UPDATE deliveries SET step = attempts, scheduled_at = next_at;",
    )
}

/// A spool file from before ordered delivery gets the `order_key` column;
/// its deliveries have none, so they keep being sent unordered.
fn add_order_key(conn: &Connection) -> rusqlite::Result<()> {
    add_column(
        conn,
        "order_key",
        "ALTER TABLE deliveries ADD COLUMN order_key TEXT;",
    )
}

/// A spool file from before the `blocked` flag gets it, set on every pending
/// delivery that an earlier pending one of its user holds back.
fn add_blocked(conn: &Connection) -> rusqlite::Result<()> {
    add_column(
        conn,
        "blocked",
        concat!(
            "ALTER TABLE deliveries ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
             UPDATE deliveries SET blocked = 1
             WHERE state = ",
            pending!(),
            " AND order_key IS NOT NULL AND EXISTS (
                 SELECT 1 FROM deliveries p
                 WHERE p.target = deliveries.target AND p.order_key = deliveries.order_key
                   AND p.id < deliveries.id AND p.state = ",
            pending!(),
            ");"
        ),
    )
}

/// Runs `migration` unless `deliveries` has `column` already. Immediate, so
/// that of two processes opening the old file at once the second sees the
/// first's column rather than adding it twice.
fn add_column(conn: &Connection, column: &str, migration: &str) -> rusqlite::Result<()> {
    let has_column = |c: &Connection| -> rusqlite::Result<bool> {
        c.prepare("SELECT 1 FROM pragma_table_info('deliveries') WHERE name = ?1")?
            .exists([column])
    };
    if has_column(conn)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let migrated = (|| {
        if !has_column(conn)? {
            conn.execute_batch(migration)?;
        }
        Ok(())
    })();
    match migrated {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// How often expired dedup keys and replay guards are deleted, in the
/// pushes' own time.
pub(super) const PRUNE_EVERY_MS: i64 = 30_000;

fn run_writer(
    mut conn: Connection,
    rx: mpsc::Receiver<Command>,
    max_batch: usize,
    file: &OpenedFile,
) {
    let mut batch = Vec::with_capacity(max_batch);
    let mut pruned_at = UnixMs(0);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        // Keep the dedup and replay tables to their windows, now and then rather than on
        // every push; the clock is the pushes' own, so tests can move it.
        let now = batch.iter().filter_map(|c| match c {
            Command::Enqueue(_, now, _, _) => Some(*now),
            _ => None,
        });
        let prune = now.max().filter(|&now| now - pruned_at >= PRUNE_EVERY_MS);
        if let Some(now) = prune {
            pruned_at = now;
        }
        commit_batch(&mut conn, &mut batch, prune, file);
    }
}

/// Applies every command in one transaction, each under its own savepoint so
/// that one failing command does not undo the others, then commits once and
/// only then answers them.
///
/// Nothing is written into a file that is no longer at the spool's path, and
/// a commit that raced with its removal is answered as failed.
fn commit_batch(
    conn: &mut Connection,
    batch: &mut Vec<Command>,
    prune_dedup_before: Option<UnixMs>,
    file: &OpenedFile,
) {
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let tx = match file
        .check()
        .and_then(|()| conn.transaction().map_err(SpoolError::from))
    {
        Ok(tx) => tx,
        Err(err) => {
            for cmd in batch.drain(..) {
                fail(cmd, err.clone());
            }
            return;
        }
    };
    let mut tx = tx;
    let mut commands = batch.drain(..);
    while let Some(cmd) = commands.next() {
        let (answer, error) = apply(&mut tx, cmd);
        answers.push(answer);
        // A full disk or an I/O error can make SQLite roll the whole
        // transaction back. The next savepoint would then start (and commit)
        // a transaction of its own while every request is told the batch
        // failed: stop here and fail the batch with the cause.
        if tx.is_autocommit() {
            let err = error
                .unwrap_or_else(|| SpoolError::Storage("the transaction was rolled back".into()));
            for cmd in commands {
                fail(cmd, err.clone());
            }
            for answer in answers {
                answer(Some(err.clone()));
            }
            return;
        }
    }
    if let Some(now) = prune_dedup_before {
        for table in ["dedup", "replay"] {
            let delete = format!("DELETE FROM {table} WHERE expires_at <= ?1");
            if let Err(e) = tx
                .prepare_cached(&delete)
                .and_then(|mut d| d.execute(params![now]))
            {
                tracing::warn!(error = %e, table, "cannot prune expired keys");
            }
        }
    }
    let outcome = tx
        .commit()
        .map_err(SpoolError::from)
        .and_then(|()| file.check())
        .err();
    for answer in answers {
        answer(outcome.clone());
    }
}

/// Answers a command once the commit's outcome is known (`Some` if it failed).
type Answer = Box<dyn FnOnce(Option<SpoolError>) + Send>;

fn fail(cmd: Command, err: SpoolError) {
    match cmd {
        Command::Enqueue(_, _, _, r) => drop(r.send(Err(err))),
        Command::Record(_, _, r) => drop(r.send(Err(err))),
        Command::Retire(_, _, r) => drop(r.send(Err(err))),
        Command::Replay(_, _, r) => drop(r.send(Err(err))),
        Command::Purge(_, r) => drop(r.send(Err(err))),
        Command::Release(_, _, r) => drop(r.send(Err(err))),
        Command::Probe(r) => drop(r.send(Err(err))),
    }
}

/// Runs one command inside a savepoint and returns how to answer it once the
/// commit's outcome is known: a result is only sent after the commit.
/// Also returns the command's own error, if it failed.
fn apply(tx: &mut Transaction<'_>, cmd: Command) -> (Answer, Option<SpoolError>) {
    fn deferred<T: Send + 'static>(
        reply: Reply<T>,
        result: Result<T, SpoolError>,
    ) -> (Answer, Option<SpoolError>) {
        let error = result.as_ref().err().cloned();
        let answer: Answer = Box::new(move |commit_error| {
            let _ = reply.send(match commit_error {
                Some(e) => Err(e),
                None => result,
            });
        });
        (answer, error)
    }
    fn in_savepoint<T>(
        tx: &mut Transaction<'_>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, SpoolError> {
        let sp = tx.savepoint()?;
        let value = f(&sp)?;
        sp.commit()?;
        Ok(value)
    }
    match cmd {
        Command::Enqueue(event, now, window, r) => {
            deferred(r, in_savepoint(tx, |c| enqueue(c, *event, now, window)))
        }
        Command::Record(s, now, r) => deferred(r, in_savepoint(tx, |c| record(c, &s, now))),
        Command::Retire(keep, now, r) => deferred(r, in_savepoint(tx, |c| retire(c, &keep, now))),
        Command::Replay(f, now, r) => deferred(r, in_savepoint(tx, |c| replay(c, &f, now))),
        Command::Purge(f, r) => deferred(r, in_savepoint(tx, |c| purge(c, &f))),
        Command::Release(select, now, r) => {
            deferred(r, in_savepoint(tx, |c| release(c, &select, now)))
        }
        Command::Probe(r) => deferred(
            r,
            in_savepoint(tx, |c| {
                c.prepare_cached(
                    "INSERT INTO probe (id, probes) VALUES (1, 1)
                     ON CONFLICT (id) DO UPDATE SET probes = probes + 1",
                )?
                .execute([])?;
                Ok(())
            }),
        ),
    }
}

fn enqueue(c: &Connection, new: NewEvent, now: UnixMs, window: i64) -> rusqlite::Result<Enqueued> {
    let NewEvent {
        event: e,
        targets,
        replay,
    } = new;
    if let Some(guard) = &replay {
        if !first_body_under(c, guard, now)? {
            return Ok(Enqueued::Replayed);
        }
    }
    // An expired key is taken over by the new event; a live one makes it a duplicate.
    let inserted = c
        .prepare_cached(
            "INSERT INTO dedup (key, expires_at) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
             WHERE dedup.expires_at <= ?3",
        )?
        .execute(params![e.dedup_key, now + window, now])?;
    if inserted == 0 {
        return Ok(Enqueued::Duplicate);
    }
    c.prepare_cached(
        "INSERT INTO events (dedup_key, account, received_at, query, body, xml, fields, msg_type, event)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.dedup_key,
        e.account,
        e.received_at,
        e.query,
        &e.body[..],
        e.xml,
        e.fields,
        e.msg_type,
        e.event_type
    ])?;
    let event_id = EventId(c.last_insert_rowid());
    let mut deliveries = Vec::with_capacity(targets.len());
    if targets.is_empty() {
        c.prepare_cached(
            "INSERT INTO deliveries (event_id, target, state, next_at, reason, updated_at)
             VALUES (?1, NULL, ?2, 0, ?3, ?4)",
        )?
        .execute(params![
            event_id,
            DeliveryState::Dead,
            DeadReason::Unrouted,
            now
        ])?;
    }
    // Ids only grow, so a new delivery is blocked by any pending one of its user.
    let mut insert = c.prepare_cached(concat!(
        "INSERT INTO deliveries (event_id, target, state, next_at, scheduled_at, updated_at, order_key, blocked)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?6 IS NOT NULL AND EXISTS (
             SELECT 1 FROM deliveries p WHERE p.target = ?2 AND p.order_key = ?6 AND p.state = ",
        pending!(),
        "))"
    ))?;
    for d in &targets {
        insert.execute(params![
            event_id,
            d.target,
            DeliveryState::Pending,
            d.due_at,
            now,
            d.order_key
        ])?;
        deliveries.push(DeliveryId(c.last_insert_rowid()));
    }
    Ok(Enqueued::Stored {
        event_id,
        deliveries,
        event: Box::new(e),
    })
}

/// Records the guard's query with its body hash; false when the query was
/// already taken, unexpired, with another body. An expired entry is taken
/// over, like an expired dedup key.
fn first_body_under(c: &Connection, guard: &ReplayGuard, now: UnixMs) -> rusqlite::Result<bool> {
    let inserted = c
        .prepare_cached(
            "INSERT INTO replay (key, body_hash, expires_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET body_hash = excluded.body_hash, expires_at = excluded.expires_at
             WHERE replay.expires_at <= ?4",
        )?
        .execute(params![guard.key, &guard.body_hash[..], guard.expires_at, now])?;
    if inserted == 1 {
        return Ok(true);
    }
    let seen: Vec<u8> = c
        .prepare_cached("SELECT body_hash FROM replay WHERE key = ?1")?
        .query_row(params![guard.key], |r| r.get(0))?;
    Ok(seen == guard.body_hash)
}

/// Up to `limit` due deliveries of `target` that are not held by a lease,
/// each then held until `now + lease_ms` or until it is settled.
fn lease(
    c: &Connection,
    leased: &Leased,
    target: &str,
    now: UnixMs,
    limit: usize,
    lease_ms: i64,
) -> rusqlite::Result<Vec<Lease>> {
    let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
    let held = &mut *held;
    held.marks.retain(|_, (_, until, _)| *until > now);
    // Held deliveries are still due in the file and come first; read past them.
    let skip = held.marks.values().filter(|(t, _, _)| t == target).count();
    let mut select = c.prepare_cached(
        concat!("SELECT d.id, d.event_id, d.attempts, e.dedup_key, e.account, e.received_at, e.query, e.body,
                e.xml, e.fields, e.msg_type, e.event, d.step, d.scheduled_at
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = ", pending!(), " AND d.blocked = 0 AND d.target = ?1 AND d.next_at <= ?2
         ORDER BY d.next_at, d.id LIMIT ?3"),
    )?;
    let mut rows = select.query(params![target, now, (limit + skip) as i64])?;
    let mut leases = Vec::with_capacity(limit);
    while let Some(row) = rows.next()? {
        let delivery_id: DeliveryId = row.get(0)?;
        if held.marks.contains_key(&delivery_id) {
            continue;
        }
        held.last_token += 1;
        let token = LeaseToken(held.last_token);
        leases.push(Lease {
            delivery_id,
            target: target.to_string(),
            attempts: row.get(2)?,
            schedule: Schedule {
                step: row.get(12)?,
                due_at: row.get(13)?,
            },
            event_id: row.get(1)?,
            event: event_from(row, 3)?,
            token,
        });
        held.marks
            .insert(delivery_id, (target.to_string(), now + lease_ms, token));
        if leases.len() == limit {
            break;
        }
    }
    Ok(leases)
}

/// Makes the selected waiting deliveries due now (see [`Release`]); only
/// `next_at` moves, so the schedule is where it was.
fn release(c: &Connection, r: &Release, now: UnixMs) -> rusqlite::Result<u64> {
    let n = c
        .prepare_cached(concat!(
            "UPDATE deliveries SET next_at = ?2
             WHERE state = ",
            pending!(),
            " AND target = ?1 AND next_at > ?2 AND attempts > 0
               AND (?3 IS NULL OR id = ?3) AND (?4 OR not_before <= ?2)"
        ))?
        .execute(params![r.target, now, r.delivery_id, r.past_retry_after])?;
    Ok(n as u64)
}

fn record(c: &Connection, settlements: &[Settlement], now: UnixMs) -> rusqlite::Result<()> {
    for s in settlements {
        match s {
            Settlement::Delivered { delivery_id } => {
                // A delivery retired while its attempt was in flight was
                // still delivered: a replay would send it twice.
                let deleted: Option<(i64, Option<String>, Option<String>)> = c
                    .prepare_cached(concat!(
                        "DELETE FROM deliveries WHERE id = ?1 AND (state = ",
                        pending!(),
                        " OR (state = ",
                        dead!(),
                        " AND reason = ?2)) RETURNING event_id, target, order_key"
                    ))?
                    .query_row(params![delivery_id, DeadReason::TargetRemoved], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .optional()?;
                if let Some((event_id, target, order_key)) = deleted {
                    drop_event_if_done(c, event_id)?;
                    unblock_next(c, target, order_key)?;
                }
            }
            Settlement::Retry {
                delivery_id,
                next_at,
                schedule,
                not_before,
                error,
            } => {
                c.prepare_cached(
                    concat!("UPDATE deliveries SET attempts = attempts + 1, next_at = ?2, last_error = ?3, updated_at = ?4,
                     not_before = ?5, step = ?6, scheduled_at = ?7 WHERE id = ?1 AND state = ", pending!(), ""),
                )?
                .execute(params![
                    delivery_id,
                    next_at,
                    error,
                    now,
                    not_before,
                    schedule.step,
                    schedule.due_at
                ])?;
            }
            Settlement::Dead {
                delivery_id,
                reason,
                error,
            } => {
                // An expired delivery is dead-lettered instead of sent: no attempt.
                let attempted = i64::from(*reason != DeadReason::Expired);
                let died: Option<(Option<String>, Option<String>)> = c
                    .prepare_cached(concat!(
                        "UPDATE deliveries SET state = ",
                        dead!(),
                        ", attempts = attempts + ?5, reason = ?2, last_error = ?3,
                         updated_at = ?4 WHERE id = ?1 AND state = ",
                        pending!(),
                        " RETURNING target, order_key"
                    ))?
                    .query_row(params![delivery_id, reason, error, now, attempted], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((target, order_key)) = died {
                    unblock_next(c, target, order_key)?;
                }
            }
        }
    }
    Ok(())
}

/// The outcomes to write: those whose delivery is unleased or leased under
/// their own token, each such lease marked as being written (see the module
/// doc), with the lease end to restore if the write fails.
fn take_marks(
    leased: &Leased,
    settles: Vec<Settle>,
) -> (Vec<Settlement>, Vec<(DeliveryId, UnixMs, LeaseToken)>) {
    let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
    let mut writing = Vec::new();
    let mut settlements = Vec::with_capacity(settles.len());
    for Settle { lease, settlement } in settles {
        let id = settlement.delivery_id();
        match held.marks.get_mut(&id) {
            Some((_, until, token)) if *token == lease => {
                writing.push((id, *until, lease));
                *until = WRITING;
            }
            Some(_) => continue,
            None => {}
        }
        settlements.push(settlement);
    }
    (settlements, writing)
}

/// Once a pending delivery of `order_key` is gone (delivered or dead), the
/// earliest pending one left of that user is the head: a lease may take it.
fn unblock_next(
    c: &Connection,
    target: Option<String>,
    order_key: Option<String>,
) -> rusqlite::Result<()> {
    let (Some(target), Some(order_key)) = (target, order_key) else {
        return Ok(());
    };
    c.prepare_cached(concat!(
        "UPDATE deliveries SET blocked = 0 WHERE blocked = 1 AND id = (
             SELECT MIN(id) FROM deliveries
             WHERE target = ?1 AND order_key = ?2 AND order_key IS NOT NULL AND state = ",
        pending!(),
        ")"
    ))?
    .execute(params![target, order_key])?;
    Ok(())
}

/// After a replay made dead deliveries of `order_key` pending again, the
/// earliest pending one is the head and every later one waits behind it,
/// whether it was replayed or already pending.
fn reorder(c: &Connection, target: &str, order_key: &str) -> rusqlite::Result<()> {
    c.prepare_cached(concat!(
        "UPDATE deliveries SET blocked = blocked_now FROM (
             SELECT id AS row_id, id > MIN(id) OVER () AS blocked_now FROM deliveries
             WHERE target = ?1 AND order_key = ?2 AND order_key IS NOT NULL AND state = ",
        pending!(),
        ") WHERE id = row_id AND blocked IS NOT blocked_now"
    ))?
    .execute(params![target, order_key])?;
    Ok(())
}

fn drop_event_if_done(c: &Connection, event_id: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "DELETE FROM events WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?1)",
    )?
    .execute(params![event_id])?;
    Ok(())
}

fn retire(c: &Connection, keep: &[String], now: UnixMs) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut targets = c.prepare_cached(concat!(
        "SELECT DISTINCT target FROM deliveries WHERE state = ",
        pending!()
    ))?;
    let pending: Vec<String> = targets
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut retired = Vec::new();
    for target in pending.iter().filter(|t| !keep.contains(t)) {
        let n = c
            .prepare_cached(concat!(
                "UPDATE deliveries SET state = ",
                dead!(),
                ", reason = ?2, updated_at = ?3,
                 last_error = 'the target is no longer in the configuration'
                 WHERE state = ",
                pending!(),
                " AND target = ?1"
            ))?
            .execute(params![target, DeadReason::TargetRemoved, now])? as u64;
        retired.push((target.clone(), n));
    }
    Ok(retired)
}

fn dead_letters(c: &Connection, f: &DeadFilter, limit: usize) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut select = c.prepare_cached(
        concat!("SELECT d.id, d.event_id, d.target, d.reason, d.last_error, d.attempts, e.account, e.dedup_key,
                e.msg_type, e.event, e.received_at, d.updated_at
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = ", dead!(), "
           AND (?1 IS NULL OR d.target = ?1)
           AND (?2 IS NULL OR d.reason = ?2)
           AND (?3 IS NULL OR d.updated_at >= ?3)
           AND (?4 IS NULL OR d.updated_at < ?4)
           AND (?5 IS NULL OR d.id = ?5)
         ORDER BY d.updated_at, d.id LIMIT ?6"),
    )?;
    let rows = select.query_map(
        params![
            f.target,
            f.reason,
            f.since,
            f.until,
            f.delivery_id,
            limit as i64
        ],
        |row| {
            Ok(DeadLetter {
                delivery_id: row.get(0)?,
                event_id: row.get(1)?,
                target: row.get(2)?,
                reason: row.get(3)?,
                last_error: row.get(4)?,
                attempts: row.get(5)?,
                account: row.get(6)?,
                dedup_key: row.get(7)?,
                msg_type: row.get(8)?,
                event_type: row.get(9)?,
                received_at: row.get(10)?,
                dead_at: row.get(11)?,
            })
        },
    )?;
    rows.collect()
}

fn replay(c: &Connection, f: &DeadFilter, now: UnixMs) -> rusqlite::Result<u64> {
    let mut update = c.prepare_cached(concat!(
        "UPDATE deliveries SET state = ",
        pending!(),
        ", attempts = 0, next_at = ?6, reason = '', updated_at = ?6,
                step = 0, scheduled_at = ?6, not_before = 0, blocked = 0
         WHERE state = ",
        dead!(),
        " AND target IS NOT NULL
           AND (?1 IS NULL OR target = ?1)
           AND (?2 IS NULL OR reason = ?2)
           AND (?3 IS NULL OR updated_at >= ?3)
           AND (?4 IS NULL OR updated_at < ?4)
           AND (?5 IS NULL OR id = ?5)
         RETURNING target, order_key"
    ))?;
    let replayed: Vec<(String, Option<String>)> = update
        .query_map(
            params![f.target, f.reason, f.since, f.until, f.delivery_id, now],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let users: std::collections::BTreeSet<(&str, &str)> = replayed
        .iter()
        .filter_map(|(target, key)| Some((target.as_str(), key.as_deref()?)))
        .collect();
    for (target, order_key) in users {
        reorder(c, target, order_key)?;
    }
    Ok(replayed.len() as u64)
}

fn purge(c: &Connection, f: &DeadFilter) -> rusqlite::Result<u64> {
    let mut delete = c.prepare_cached(concat!(
        "DELETE FROM deliveries
         WHERE state = ",
        dead!(),
        "
           AND (?1 IS NULL OR target = ?1)
           AND (?2 IS NULL OR reason = ?2)
           AND (?3 IS NULL OR updated_at >= ?3)
           AND (?4 IS NULL OR updated_at < ?4)
           AND (?5 IS NULL OR id = ?5)
         RETURNING event_id"
    ))?;
    let events: Vec<i64> = delete
        .query_map(
            params![f.target, f.reason, f.since, f.until, f.delivery_id],
            |r| r.get(0),
        )?
        .collect::<rusqlite::Result<_>>()?;
    for event_id in &events {
        drop_event_if_done(c, *event_id)?;
    }
    Ok(events.len() as u64)
}

fn depth(c: &Connection) -> rusqlite::Result<Vec<TargetDepth>> {
    let mut select = c.prepare_cached(concat!(
        "SELECT d.target, COUNT(*), MIN(e.received_at)
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = ",
        pending!(),
        " GROUP BY d.target ORDER BY d.target"
    ))?;
    let rows = select.query_map([], |row| {
        Ok(TargetDepth {
            target: row.get(0)?,
            pending: row.get::<_, i64>(1)? as u64,
            oldest_received_at: row.get(2)?,
        })
    })?;
    rows.collect()
}

fn waiting(c: &Connection, target: &str, limit: usize) -> rusqlite::Result<Vec<WaitingDelivery>> {
    let mut select = c.prepare_cached(concat!(
        "SELECT id, event_id, attempts, next_at, last_error, step, scheduled_at, not_before
         FROM deliveries WHERE state = ",
        pending!(),
        " AND target = ?1 ORDER BY next_at, id LIMIT ?2"
    ))?;
    let rows = select.query_map(params![target, limit as i64], |row| {
        Ok(WaitingDelivery {
            delivery_id: row.get(0)?,
            event_id: row.get(1)?,
            attempts: row.get(2)?,
            next_at: row.get(3)?,
            schedule: Schedule {
                step: row.get(5)?,
                due_at: row.get(6)?,
            },
            not_before: row.get(7)?,
            last_error: row.get(4)?,
        })
    })?;
    rows.collect()
}

fn stored_event(c: &Connection, id: EventId) -> rusqlite::Result<Option<Event>> {
    c.prepare_cached(
        "SELECT dedup_key, account, received_at, query, body, xml, fields, msg_type, event
         FROM events WHERE id = ?1",
    )?
    .query_row(params![id], |row| event_from(row, 0))
    .optional()
}

/// The event in the row's columns from `first` on, in the order of the
/// events table: dedup_key, account, received_at, query, body, xml, fields,
/// msg_type, event.
fn event_from(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Event> {
    Ok(Event {
        dedup_key: row.get(first)?,
        account: row.get(first + 1)?,
        received_at: row.get(first + 2)?,
        query: row.get(first + 3)?,
        body: row.get::<_, Vec<u8>>(first + 4)?.into(),
        xml: row.get(first + 5)?,
        fields: row.get(first + 6)?,
        msg_type: row.get(first + 7)?,
        event_type: row.get(first + 8)?,
    })
}

impl Spool for SqliteSpool {
    fn enqueue(
        &self,
        event: NewEvent,
        now_ms: UnixMs,
        dedup_window_ms: i64,
    ) -> SpoolFuture<Enqueued> {
        self.submit(|r| Command::Enqueue(Box::new(event), now_ms, dedup_window_ms, r))
    }
    fn lease(
        &self,
        target: &str,
        now_ms: UnixMs,
        limit: usize,
        lease_ms: i64,
    ) -> SpoolFuture<Vec<Lease>> {
        let target = target.to_string();
        self.read(|r| Read::Lease(target, now_ms, limit, lease_ms, r))
    }
    fn record(&self, settlements: Vec<Settle>, now_ms: UnixMs) -> SpoolFuture<()> {
        let (settlements, writing) = take_marks(&self.leased, settlements);
        let committed = self.submit(|r| Command::Record(settlements, now_ms, r));
        let leased = self.leased.clone();
        // The lease is let go only once the outcome is in the file, so the
        // reader can never hand out a delivery whose outcome is being written.
        // An outcome that could not be written keeps its lease to the end:
        // the delivery is sent again then, not at once and over and over.
        Box::pin(async move {
            let result = committed.await;
            let mut held = leased.lock().unwrap_or_else(|e| e.into_inner());
            for (id, until, token) in writing {
                let ours = held.marks.get(&id).is_some_and(|(_, _, t)| *t == token);
                if !ours {
                    continue;
                }
                if result.is_ok() {
                    held.marks.remove(&id);
                } else if let Some(mark) = held.marks.get_mut(&id) {
                    mark.1 = until;
                }
            }
            result
        })
    }
    fn release(&self, release: Release, now_ms: UnixMs) -> SpoolFuture<u64> {
        self.submit(|r| Command::Release(release, now_ms, r))
    }
    fn retire_targets(
        &self,
        targets: Vec<String>,
        now_ms: UnixMs,
    ) -> SpoolFuture<Vec<(String, u64)>> {
        self.submit(|r| Command::Retire(targets, now_ms, r))
    }
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>> {
        self.read(|r| Read::DeadLetters(filter, limit, r))
    }
    fn replay(&self, filter: DeadFilter, now_ms: UnixMs) -> SpoolFuture<u64> {
        self.submit(|r| Command::Replay(filter, now_ms, r))
    }
    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64> {
        self.submit(|r| Command::Purge(filter, r))
    }
    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>> {
        self.read(Read::Depth)
    }
    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>> {
        let target = target.to_string();
        self.read(|r| Read::Waiting(target, limit, r))
    }
    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>> {
        self.read(|r| Read::Event(event_id, r))
    }
    fn probe(&self) -> SpoolFuture<()> {
        self.submit(Command::Probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{Event, NewDelivery};

    fn event(key: &str, body_bytes: usize) -> NewEvent {
        NewEvent {
            event: Event {
                dedup_key: key.into(),
                account: "main".into(),
                received_at: UnixMs(1),
                query: String::new(),
                body: vec![b'x'; body_bytes].into(),
                xml: "<xml/>".into(),
                fields: "{}".into(),
                msg_type: "event".into(),
                event_type: None,
            },
            targets: vec![NewDelivery {
                target: "hooks".into(),
                due_at: UnixMs(1),
                order_key: None,
            }],
            replay: None,
        }
    }

    /// `event(key, 0)` for the target `t`, in the order of user `user`.
    fn ordered(key: &str, user: &str) -> NewEvent {
        let mut e = event(key, 0);
        e.targets[0].target = "t".into();
        e.targets[0].due_at = UnixMs(0);
        e.targets[0].order_key = Some(format!("main|{user}"));
        e
    }

    async fn stored(spool: &SqliteSpool, e: NewEvent) -> DeliveryId {
        match spool.enqueue(e, UnixMs(0), 1_000).await.unwrap() {
            Enqueued::Stored { deliveries, .. } => deliveries[0],
            other => panic!("unexpected {other:?}"),
        }
    }

    async fn leased(spool: &SqliteSpool, now: i64) -> Vec<Lease> {
        spool.lease("t", UnixMs(now), 10, 1).await.unwrap()
    }

    fn ids(leases: &[Lease]) -> Vec<DeliveryId> {
        leases.iter().map(|l| l.delivery_id).collect()
    }

    /// Records `settlement` under its lease in `leases`.
    async fn settle(spool: &SqliteSpool, leases: &[Lease], settlement: Settlement, now: i64) {
        let lease = leases
            .iter()
            .find(|l| l.delivery_id == settlement.delivery_id())
            .unwrap()
            .token;
        let settle = Settle { lease, settlement };
        spool.record(vec![settle], UnixMs(now)).await.unwrap();
    }

    fn dead(delivery_id: DeliveryId, reason: DeadReason) -> Settlement {
        Settlement::Dead {
            delivery_id,
            reason,
            error: "gone".into(),
        }
    }

    /// A replayed dead letter is its user's earliest pending delivery again:
    /// it goes before the later ones, which wait for it as before.
    #[tokio::test]
    async fn a_replayed_dead_letter_goes_before_its_users_later_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let spool = SqliteSpool::open(&dir.path().join("spool.db")).unwrap();
        let a = stored(&spool, ordered("a", "u1")).await;
        let b = stored(&spool, ordered("b", "u1")).await;
        let c = stored(&spool, ordered("c", "u1")).await;
        let first = leased(&spool, 0).await;
        assert_eq!(ids(&first), vec![a]);
        settle(&spool, &first, dead(a, DeadReason::Expired), 1).await;
        assert_eq!(ids(&leased(&spool, 2).await), vec![b], "c waits for b");
        // b's lease runs out; a is replayed and holds back b and c again.
        let filter = DeadFilter {
            delivery_id: Some(a),
            ..DeadFilter::default()
        };
        assert_eq!(spool.replay(filter, UnixMs(3)).await.unwrap(), 1);
        let replayed = leased(&spool, 4).await;
        assert_eq!(ids(&replayed), vec![a]);
        settle(
            &spool,
            &replayed,
            Settlement::Delivered { delivery_id: a },
            5,
        )
        .await;
        assert_eq!(ids(&leased(&spool, 6).await), vec![b]);
        // Retired, the user's deliveries are all dead; replayed, the earliest is
        // the head again and the others wait behind it.
        spool.retire_targets(vec![], UnixMs(7)).await.unwrap();
        assert_eq!(
            spool
                .replay(DeadFilter::default(), UnixMs(8))
                .await
                .unwrap(),
            2
        );
        let again = leased(&spool, 9).await;
        assert_eq!(ids(&again), vec![b]);
        settle(&spool, &again, dead(b, DeadReason::Rejected), 10).await;
        assert_eq!(ids(&leased(&spool, 11).await), vec![c]);
    }

    /// A file whose deliveries were written before the `blocked` flag: the
    /// later deliveries of a user get it and wait for the earliest.
    #[tokio::test]
    async fn a_spool_file_from_before_the_blocked_flag_opens_and_orders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c.execute_batch(
                "ALTER TABLE deliveries DROP COLUMN blocked;
                 INSERT INTO events VALUES (1, 'k', 'main', 0, 'q', x'00', '<xml/>', '{}', 'text', NULL);
                 INSERT INTO deliveries (event_id, target, state, next_at, updated_at, order_key)
                    VALUES (1, 't', 0, 0, 0, 'main|u1'), (1, 't', 0, 0, 0, 'main|u1'),
                           (1, 't', 0, 0, 0, 'main|u2'), (1, 't', 0, 0, 0, NULL);",
            )
            .unwrap();
        }
        let spool = SqliteSpool::open(&path).unwrap();
        let rows = |ids: &[i64]| ids.iter().map(|&i| DeliveryId(i)).collect::<Vec<_>>();
        let first = leased(&spool, 0).await;
        assert_eq!(ids(&first), rows(&[1, 3, 4]), "2 waits for 1");
        let delivered = Settlement::Delivered {
            delivery_id: DeliveryId(1),
        };
        settle(&spool, &first, delivered, 1).await;
        // 3 and 4 again too: their leases ran out.
        assert_eq!(ids(&leased(&spool, 2).await), rows(&[2, 3, 4]));
    }

    /// A full disk makes SQLite roll the whole transaction back: what the
    /// batch holds after that must not be committed on its own while every
    /// request is told the commit failed.
    #[tokio::test]
    async fn nothing_after_a_rolled_back_command_is_committed_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut conn = open_connection(&path).unwrap();
        let file = OpenedFile::of(&path).unwrap();
        // A small database: the second event does not fit.
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "max_page_count", pages + 8)
            .unwrap();
        let mut replies = Vec::new();
        let mut batch = Vec::new();
        for (key, size) in [("before", 10), ("too-big", 1 << 20), ("after", 10)] {
            let (reply, rx) = oneshot::channel();
            batch.push(Command::Enqueue(
                Box::new(event(key, size)),
                UnixMs(1),
                1_000,
                reply,
            ));
            replies.push(rx);
        }
        commit_batch(&mut conn, &mut batch, None, &file);
        for rx in replies {
            let answer = rx.await.unwrap();
            assert!(
                matches!(&answer, Err(SpoolError::Storage(e)) if e.contains("full")),
                "{answer:?}"
            );
        }
        let stored: i64 = conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 0, "a request told it failed was stored");
    }
}
