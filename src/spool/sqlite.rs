//! The embedded spool: one SQLite file in WAL mode with `synchronous=FULL`,
//! written by one thread that commits whatever requests are waiting in one
//! transaction (group commit), so a burst of pushes costs one fsync, not one
//! per push.

use super::{
    DeadFilter, DeadLetter, Enqueued, Lease, NewEvent, Pending, PendingDelivery, Settlement, Spool,
    SpoolError, StoredEvent, TargetDepth, REASON_TARGET_REMOVED, REASON_UNROUTED,
};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;
use tokio::sync::oneshot;

const PENDING: i64 = 0;
const DEAD: i64 = 2;

/// How many requests one commit may carry at most.
pub const DEFAULT_MAX_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
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
    id          INTEGER PRIMARY KEY,
    event_id    INTEGER NOT NULL REFERENCES events(id),
    target      TEXT,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT '',
    reason      TEXT    NOT NULL DEFAULT '',
    updated_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, next_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (updated_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
";

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    Enqueue(Box<NewEvent>, i64, i64, Reply<Enqueued>),
    Lease(String, i64, usize, i64, Reply<Vec<Lease>>),
    Settle(Vec<Settlement>, i64, Reply<()>),
    Retire(Vec<String>, i64, Reply<Vec<(String, u64)>>),
    DeadLetters(DeadFilter, usize, Reply<Vec<DeadLetter>>),
    Replay(DeadFilter, i64, Reply<u64>),
    Purge(DeadFilter, Reply<u64>),
    Depth(Reply<Vec<TargetDepth>>),
    Pending(String, usize, Reply<Vec<PendingDelivery>>),
    Event(i64, Reply<Option<StoredEvent>>),
    Probe(Reply<()>),
}

/// The SQLite spool. Dropping it (or calling [`SqliteSpool::close`]) lets the
/// writer finish what it has queued and close the file.
pub struct SqliteSpool {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    path: PathBuf,
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
        let (tx, rx) = mpsc::channel();
        let writer = thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || run_writer(conn, rx, max_batch.max(1)))
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool writer: {e}")))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finishes the queued requests and closes the file. Blocks until done.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }

    fn submit<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Pending<T> {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .lock()
            .ok()
            .and_then(|tx| tx.as_ref().map(|tx| tx.send(make(reply)).is_ok()))
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(SpoolError::Closed);
            }
            rx.await.unwrap_or(Err(SpoolError::Closed))
        })
    }
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
    Ok(conn)
}

fn run_writer(mut conn: Connection, rx: mpsc::Receiver<Command>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, &mut batch);
    }
}

/// Applies every command in one transaction, each under its own savepoint so
/// that one failing command does not undo the others, then commits once and
/// only then answers them.
fn commit_batch(conn: &mut Connection, batch: &mut Vec<Command>) {
    let mut answers: Vec<Box<dyn FnOnce(Option<SpoolError>) + Send>> =
        Vec::with_capacity(batch.len());
    let tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let err = SpoolError::from(e);
            for cmd in batch.drain(..) {
                fail(cmd, err.clone());
            }
            return;
        }
    };
    let mut tx = tx;
    for cmd in batch.drain(..) {
        answers.push(apply(&mut tx, cmd));
    }
    let outcome = tx.commit().err().map(SpoolError::from);
    for answer in answers {
        answer(outcome.clone());
    }
}

fn fail(cmd: Command, err: SpoolError) {
    match cmd {
        Command::Enqueue(_, _, _, r) => drop(r.send(Err(err))),
        Command::Lease(_, _, _, _, r) => drop(r.send(Err(err))),
        Command::Settle(_, _, r) => drop(r.send(Err(err))),
        Command::Retire(_, _, r) => drop(r.send(Err(err))),
        Command::DeadLetters(_, _, r) => drop(r.send(Err(err))),
        Command::Replay(_, _, r) => drop(r.send(Err(err))),
        Command::Purge(_, r) => drop(r.send(Err(err))),
        Command::Depth(r) => drop(r.send(Err(err))),
        Command::Pending(_, _, r) => drop(r.send(Err(err))),
        Command::Event(_, r) => drop(r.send(Err(err))),
        Command::Probe(r) => drop(r.send(Err(err))),
    }
}

/// Runs one command inside a savepoint and returns how to answer it once the
/// commit's outcome is known: a result is only sent after the commit.
fn apply(tx: &mut Transaction<'_>, cmd: Command) -> Box<dyn FnOnce(Option<SpoolError>) + Send> {
    fn deferred<T: Send + 'static>(
        reply: Reply<T>,
        result: Result<T, SpoolError>,
    ) -> Box<dyn FnOnce(Option<SpoolError>) + Send> {
        Box::new(move |commit_error| {
            let _ = reply.send(match commit_error {
                Some(e) => Err(e),
                None => result,
            });
        })
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
            deferred(r, in_savepoint(tx, |c| enqueue(c, &event, now, window)))
        }
        Command::Lease(target, now, limit, lease_ms, r) => deferred(
            r,
            in_savepoint(tx, |c| lease(c, &target, now, limit, lease_ms)),
        ),
        Command::Settle(s, now, r) => deferred(r, in_savepoint(tx, |c| settle(c, &s, now))),
        Command::Retire(keep, now, r) => deferred(r, in_savepoint(tx, |c| retire(c, &keep, now))),
        Command::DeadLetters(f, limit, r) => {
            deferred(r, in_savepoint(tx, |c| dead_letters(c, &f, limit)))
        }
        Command::Replay(f, now, r) => deferred(r, in_savepoint(tx, |c| replay(c, &f, now))),
        Command::Purge(f, r) => deferred(r, in_savepoint(tx, |c| purge(c, &f))),
        Command::Depth(r) => deferred(r, in_savepoint(tx, depth)),
        Command::Pending(target, limit, r) => {
            deferred(r, in_savepoint(tx, |c| pending(c, &target, limit)))
        }
        Command::Event(id, r) => deferred(r, in_savepoint(tx, |c| stored_event(c, id))),
        Command::Probe(r) => deferred(
            r,
            in_savepoint(tx, |c| {
                c.execute("DELETE FROM dedup WHERE key = ''", [])?;
                Ok(())
            }),
        ),
    }
}

fn enqueue(c: &Connection, e: &NewEvent, now: i64, window: i64) -> rusqlite::Result<Enqueued> {
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
        e.body,
        e.xml,
        e.fields,
        e.msg_type,
        e.event
    ])?;
    let event_id = c.last_insert_rowid();
    let mut deliveries = Vec::with_capacity(e.targets.len());
    if e.targets.is_empty() {
        c.prepare_cached(
            "INSERT INTO deliveries (event_id, target, state, next_at, reason, updated_at)
             VALUES (?1, NULL, ?2, 0, ?3, ?4)",
        )?
        .execute(params![event_id, DEAD, REASON_UNROUTED, now])?;
    }
    let mut insert = c.prepare_cached(
        "INSERT INTO deliveries (event_id, target, state, next_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for d in &e.targets {
        insert.execute(params![event_id, d.target, PENDING, d.due_at, now])?;
        deliveries.push(c.last_insert_rowid());
    }
    // Keep the dedup table to its window; cheap with the primary key, done now
    // and then rather than on every push.
    if event_id % 1024 == 0 {
        c.prepare_cached("DELETE FROM dedup WHERE expires_at <= ?1")?
            .execute(params![now])?;
    }
    Ok(Enqueued::Stored {
        event_id,
        deliveries,
    })
}

fn lease(
    c: &Connection,
    target: &str,
    now: i64,
    limit: usize,
    lease_ms: i64,
) -> rusqlite::Result<Vec<Lease>> {
    let mut select = c.prepare_cached(
        "SELECT d.id, d.event_id, d.attempts, e.dedup_key, e.account, e.received_at, e.query, e.body,
                e.xml, e.fields, e.msg_type, e.event
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = 0 AND d.target = ?1 AND d.next_at <= ?2
         ORDER BY d.next_at, d.id LIMIT ?3",
    )?;
    let leases = select
        .query_map(params![target, now, limit as i64], |row| {
            Ok(Lease {
                delivery_id: row.get(0)?,
                target: target.to_string(),
                attempts: row.get(2)?,
                event: StoredEvent {
                    event_id: row.get(1)?,
                    dedup_key: row.get(3)?,
                    account: row.get(4)?,
                    received_at: row.get(5)?,
                    query: row.get(6)?,
                    body: row.get(7)?,
                    xml: row.get(8)?,
                    fields: row.get(9)?,
                    msg_type: row.get(10)?,
                    event: row.get(11)?,
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut hide = c.prepare_cached("UPDATE deliveries SET next_at = ?2 WHERE id = ?1")?;
    for l in &leases {
        hide.execute(params![l.delivery_id, now + lease_ms])?;
    }
    Ok(leases)
}

fn settle(c: &Connection, settlements: &[Settlement], now: i64) -> rusqlite::Result<()> {
    for s in settlements {
        match s {
            Settlement::Delivered { delivery_id } => {
                let event_id: Option<i64> = c
                    .prepare_cached(
                        "DELETE FROM deliveries WHERE id = ?1 AND state = 0 RETURNING event_id",
                    )?
                    .query_row(params![delivery_id], |r| r.get(0))
                    .optional()?;
                if let Some(event_id) = event_id {
                    drop_event_if_done(c, event_id)?;
                }
            }
            Settlement::Retry {
                delivery_id,
                next_at,
                error,
            } => {
                c.prepare_cached(
                    "UPDATE deliveries SET attempts = attempts + 1, next_at = ?2, last_error = ?3, updated_at = ?4
                     WHERE id = ?1 AND state = 0",
                )?
                .execute(params![delivery_id, next_at, error, now])?;
            }
            Settlement::Dead {
                delivery_id,
                reason,
                error,
            } => {
                c.prepare_cached(
                    "UPDATE deliveries SET state = 2, attempts = attempts + 1, reason = ?2, last_error = ?3,
                     updated_at = ?4 WHERE id = ?1 AND state = 0",
                )?
                .execute(params![delivery_id, reason, error, now])?;
            }
        }
    }
    Ok(())
}

fn drop_event_if_done(c: &Connection, event_id: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "DELETE FROM events WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?1)",
    )?
    .execute(params![event_id])?;
    Ok(())
}

fn retire(c: &Connection, keep: &[String], now: i64) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut targets = c.prepare_cached("SELECT DISTINCT target FROM deliveries WHERE state = 0")?;
    let pending: Vec<String> = targets
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut retired = Vec::new();
    for target in pending.iter().filter(|t| !keep.contains(t)) {
        let n = c
            .prepare_cached(
                "UPDATE deliveries SET state = 2, reason = ?2, updated_at = ?3,
                 last_error = 'the target is no longer in the configuration'
                 WHERE state = 0 AND target = ?1",
            )?
            .execute(params![target, REASON_TARGET_REMOVED, now])? as u64;
        retired.push((target.clone(), n));
    }
    Ok(retired)
}

fn dead_letters(c: &Connection, f: &DeadFilter, limit: usize) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut select = c.prepare_cached(
        "SELECT d.id, d.event_id, d.target, d.reason, d.last_error, d.attempts, e.account, e.dedup_key,
                e.msg_type, e.event, e.received_at, d.updated_at
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = 2
           AND (?1 IS NULL OR d.target = ?1)
           AND (?2 IS NULL OR d.reason = ?2)
           AND (?3 IS NULL OR d.updated_at >= ?3)
           AND (?4 IS NULL OR d.updated_at < ?4)
           AND (?5 IS NULL OR d.id = ?5)
         ORDER BY d.updated_at, d.id LIMIT ?6",
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
                event: row.get(9)?,
                received_at: row.get(10)?,
                dead_at: row.get(11)?,
            })
        },
    )?;
    rows.collect()
}

fn replay(c: &Connection, f: &DeadFilter, now: i64) -> rusqlite::Result<u64> {
    let n = c
        .prepare_cached(
            "UPDATE deliveries SET state = 0, attempts = 0, next_at = ?6, reason = '', updated_at = ?6
             WHERE state = 2 AND target IS NOT NULL
               AND (?1 IS NULL OR target = ?1)
               AND (?2 IS NULL OR reason = ?2)
               AND (?3 IS NULL OR updated_at >= ?3)
               AND (?4 IS NULL OR updated_at < ?4)
               AND (?5 IS NULL OR id = ?5)",
        )?
        .execute(params![f.target, f.reason, f.since, f.until, f.delivery_id, now])?;
    Ok(n as u64)
}

fn purge(c: &Connection, f: &DeadFilter) -> rusqlite::Result<u64> {
    let mut delete = c.prepare_cached(
        "DELETE FROM deliveries
         WHERE state = 2
           AND (?1 IS NULL OR target = ?1)
           AND (?2 IS NULL OR reason = ?2)
           AND (?3 IS NULL OR updated_at >= ?3)
           AND (?4 IS NULL OR updated_at < ?4)
           AND (?5 IS NULL OR id = ?5)
         RETURNING event_id",
    )?;
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
    let mut select = c.prepare_cached(
        "SELECT d.target, COUNT(*), MIN(e.received_at)
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.state = 0 GROUP BY d.target ORDER BY d.target",
    )?;
    let rows = select.query_map([], |row| {
        Ok(TargetDepth {
            target: row.get(0)?,
            pending: row.get::<_, i64>(1)? as u64,
            oldest_received_at: row.get(2)?,
        })
    })?;
    rows.collect()
}

fn pending(c: &Connection, target: &str, limit: usize) -> rusqlite::Result<Vec<PendingDelivery>> {
    let mut select = c.prepare_cached(
        "SELECT id, event_id, attempts, next_at, last_error FROM deliveries
         WHERE state = 0 AND target = ?1 ORDER BY next_at, id LIMIT ?2",
    )?;
    let rows = select.query_map(params![target, limit as i64], |row| {
        Ok(PendingDelivery {
            delivery_id: row.get(0)?,
            event_id: row.get(1)?,
            attempts: row.get(2)?,
            next_at: row.get(3)?,
            last_error: row.get(4)?,
        })
    })?;
    rows.collect()
}

fn stored_event(c: &Connection, id: i64) -> rusqlite::Result<Option<StoredEvent>> {
    c.prepare_cached(
        "SELECT id, dedup_key, account, received_at, query, body, xml, fields, msg_type, event
         FROM events WHERE id = ?1",
    )?
    .query_row(params![id], |row| {
        Ok(StoredEvent {
            event_id: row.get(0)?,
            dedup_key: row.get(1)?,
            account: row.get(2)?,
            received_at: row.get(3)?,
            query: row.get(4)?,
            body: row.get(5)?,
            xml: row.get(6)?,
            fields: row.get(7)?,
            msg_type: row.get(8)?,
            event: row.get(9)?,
        })
    })
    .optional()
}

impl Spool for SqliteSpool {
    fn enqueue(&self, event: NewEvent, now_ms: i64, dedup_window_ms: i64) -> Pending<Enqueued> {
        self.submit(|r| Command::Enqueue(Box::new(event), now_ms, dedup_window_ms, r))
    }
    fn lease(&self, target: &str, now_ms: i64, limit: usize, lease_ms: i64) -> Pending<Vec<Lease>> {
        let target = target.to_string();
        self.submit(|r| Command::Lease(target, now_ms, limit, lease_ms, r))
    }
    fn settle(&self, settlements: Vec<Settlement>, now_ms: i64) -> Pending<()> {
        self.submit(|r| Command::Settle(settlements, now_ms, r))
    }
    fn retire_targets(&self, targets: Vec<String>, now_ms: i64) -> Pending<Vec<(String, u64)>> {
        self.submit(|r| Command::Retire(targets, now_ms, r))
    }
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> Pending<Vec<DeadLetter>> {
        self.submit(|r| Command::DeadLetters(filter, limit, r))
    }
    fn replay(&self, filter: DeadFilter, now_ms: i64) -> Pending<u64> {
        self.submit(|r| Command::Replay(filter, now_ms, r))
    }
    fn purge(&self, filter: DeadFilter) -> Pending<u64> {
        self.submit(|r| Command::Purge(filter, r))
    }
    fn depth(&self) -> Pending<Vec<TargetDepth>> {
        self.submit(Command::Depth)
    }
    fn pending(&self, target: &str, limit: usize) -> Pending<Vec<PendingDelivery>> {
        let target = target.to_string();
        self.submit(|r| Command::Pending(target, limit, r))
    }
    fn event(&self, event_id: i64) -> Pending<Option<StoredEvent>> {
        self.submit(|r| Command::Event(event_id, r))
    }
    fn probe(&self) -> Pending<()> {
        self.submit(Command::Probe)
    }
}
