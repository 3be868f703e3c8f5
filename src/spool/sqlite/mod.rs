//! The embedded spool: one SQLite file in WAL mode with `synchronous=FULL`,
//! written by one thread that commits whatever requests are waiting in one
//! transaction (group commit), so a burst of pushes costs one fsync, not one
//! per push. Reads (leases, listings) run on a second thread with its own
//! connection, so they never wait behind a commit; searches of the trail on
//! a third, so that a long one never holds up a lease.
//!
//! A lease is held in memory, not written (see [`leases`]).
//!
//! # Layout
//!
//! - [`writer`]: the group commit, and the probe through it;
//!   [`commit`]: what a push's commit writes;
//! - [`reader`]: the reading thread, its listings;
//!   [`leases`]: handing out due deliveries;
//! - [`settle`]: outcomes, releases, retirement and per-user order;
//!   [`dead`]: the dead letters;
//! - [`migrate`]: the schema's versions (`migrations/`); [`file`]: the file
//!   and its connections; [`row`]: the spool's types as SQLite values.
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

mod commit;
mod dead;
mod file;
mod held;
mod late;
mod leases;
mod migrate;
mod reader;
mod row;
mod settle;
mod trail;
mod writer;

use super::late::{
    ApiToken, DeadLateReply, HeldLateReply, LateOutcome, LateReplies, LateReplyId, NewLateReply,
};
use super::vocab::{DEFAULT_MAX_BATCH, QUEUE};
use super::LeaseToken;
use super::{
    ComponentTicket, DeadFilter, DeadLetter, DeliveryId, DueListener, DueWaker, Enqueued, Event,
    EventId, Health, Intake, Leases, NewEvent, Operator, Release, Settle, SpoolError, SpoolFuture,
    Supervision, TargetDepth, Tickets, TrailLog, TrailSetup, TrailSlot, UnixMs, WaitingDelivery,
    Work,
};
use crate::trail::{TrailFilter, TrailFound, TrailNote};
use file::{open_connection, OpenedFile};
use late::LateCommand;
use leases::Leased;
use reader::Read;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;
use tokio::sync::oneshot;
use writer::Command;

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// The SQLite spool. Dropping it (or calling [`SqliteSpool::close`]) lets the
/// writer finish what it has queued and close the file.
pub struct SqliteSpool {
    tx: Mutex<Option<mpsc::SyncSender<Command>>>,
    reads: Mutex<Option<mpsc::SyncSender<Read>>>,
    /// The trail's searches, on their own thread and connection.
    searches: Mutex<Option<mpsc::SyncSender<Read>>>,
    threads: Mutex<Vec<thread::JoinHandle<()>>>,
    leased: Leased,
    supervision: Supervision,
    /// This process's name on the late replies it leases.
    owner: String,
    trail: TrailSlot,
}

impl SqliteSpool {
    /// Opens (creating if needed) the spool file, brings its schema up to
    /// date, and starts its writer and reader.
    pub fn open(path: &Path) -> Result<Self, SpoolError> {
        Self::open_with_batch(path, DEFAULT_MAX_BATCH)
    }

    /// As [`SqliteSpool::open`], with at most `max_batch` requests per commit
    /// (1 turns group commit off; used to measure what it is worth).
    pub fn open_with_batch(path: &Path, max_batch: usize) -> Result<Self, SpoolError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| SpoolError::caused(format!("cannot create {}", dir.display()), e))?;
        }
        let mut conn = open_connection(path)?;
        let migrated = migrate::migrate(&mut conn, path)?;
        if !migrated.applied.is_empty() {
            tracing::info!(path = %path.display(), from = migrated.from, to = migrated.to, "spool file migrated");
        }
        let file = OpenedFile::of(path)?;
        let read_conn = open_connection(path)?;
        let search_conn = open_connection(path)?;
        let supervision = Supervision::default();
        let leased = Leased::default();
        let trail = TrailSlot::default();
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (reads, read_rx) = mpsc::sync_channel(QUEUE);
        let (searches, search_rx) = mpsc::sync_channel(SEARCH_QUEUE);
        let start_error = |e| SpoolError::caused("cannot start the spool threads", e);
        let file = std::sync::Arc::new(file);
        let writer = supervision
            .thread("sqlite writer", {
                let (file, supervision, trail) = (file.clone(), supervision.clone(), trail.clone());
                move || writer::run(conn, rx, max_batch.max(1), (&file, &trail), &supervision)
            })
            .map_err(start_error)?;
        let held = (leased.clone(), trail.clone());
        let reader = supervision
            .thread("sqlite reader", {
                let file = file.clone();
                move || reader::run(read_conn, read_rx, held, &file)
            })
            .map_err(start_error)?;
        // Only searches reach it: its leases are never asked for.
        let held = (Leased::default(), trail.clone());
        let searcher = supervision
            .thread("sqlite trail search", move || {
                reader::run(search_conn, search_rx, held, &file)
            })
            .map_err(start_error)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            reads: Mutex::new(Some(reads)),
            searches: Mutex::new(Some(searches)),
            threads: Mutex::new(vec![writer, reader, searcher]),
            leased,
            supervision,
            owner: crate::wechat::push::digits(16),
            trail,
        })
    }

    /// Turns the trail on with `settings`, its key the configured one or,
    /// without one, the key kept in the file (made now if there is none).
    pub async fn start_trail(&self, setup: TrailSetup) -> Result<(), SpoolError> {
        let key = match setup.key.clone() {
            Some(key) => key,
            None => self.submit(Command::TrailKey).await?,
        };
        self.trail
            .store(Some(std::sync::Arc::new(setup.store(key))));
        Ok(())
    }

    /// The watch on this spool's threads.
    pub fn supervision(&self) -> Supervision {
        self.supervision.clone()
    }

    /// Finishes the queued requests and closes the file. Blocks until done.
    pub fn close(&self) {
        self.supervision.closing();
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Ok(mut reads) = self.reads.lock() {
            reads.take();
        }
        if let Ok(mut searches) = self.searches.lock() {
            searches.take();
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
        send_to(&self.supervision, &self.tx, make)
    }

    fn read<T: Send + 'static>(&self, make: impl FnOnce(Reply<T>) -> Read) -> SpoolFuture<T> {
        send_to(&self.supervision, &self.reads, make)
    }
}

/// Searches waiting for the search thread: beyond, a search is answered
/// `Busy` at once.
const SEARCH_QUEUE: usize = 8;

/// Hands a request to the writer or the reader: `Busy` when its queue is
/// full (while the disk stalls, a push gets 503 at once and WeChat retries),
/// `Closed` once the spool is, `Failed` once one of its threads has.
fn send_to<C, T: Send + 'static>(
    supervision: &Supervision,
    channel: &Mutex<Option<mpsc::SyncSender<C>>>,
    make: impl FnOnce(Reply<T>) -> C,
) -> SpoolFuture<T> {
    let (reply, rx) = oneshot::channel();
    let sent = supervision.check().and_then(|()| {
        match channel.lock().ok().as_ref().and_then(|tx| tx.as_ref()) {
            None => Err(SpoolError::Closed),
            Some(tx) => tx.try_send(make(reply)).map_err(|e| match e {
                mpsc::TrySendError::Full(_) => SpoolError::Busy,
                mpsc::TrySendError::Disconnected(_) => SpoolError::Closed,
            }),
        }
    });
    let supervision = supervision.clone();
    Box::pin(async move {
        sent?;
        match rx.await {
            Ok(answer) => answer,
            // The thread went away with the request: say why, when it failed.
            Err(_) => supervision.check().and(Err(SpoolError::Closed)),
        }
    })
}

impl Drop for SqliteSpool {
    fn drop(&mut self) {
        self.close();
    }
}

impl Intake for SqliteSpool {
    fn enqueue(&self, event: NewEvent, now: UnixMs, window: Duration) -> SpoolFuture<Enqueued> {
        self.submit(|r| Command::Enqueue(Box::new(event), now, window, r))
    }

    fn trail_key(&self) -> Option<crate::trail::TrailKey> {
        self.trail.load().as_ref().map(|store| store.key.clone())
    }

    fn note(&self, note: TrailNote) -> bool {
        let sent = match self.tx.lock().ok().as_ref().and_then(|tx| tx.as_ref()) {
            Some(tx) => tx.try_send(Command::Note(note)).is_ok(),
            None => false,
        };
        sent
    }
}

impl TrailLog for SqliteSpool {
    fn find(&self, filter: TrailFilter) -> SpoolFuture<TrailFound> {
        send_to(&self.supervision, &self.searches, |r| {
            Read::Trail(filter, r)
        })
    }

    fn redeliver(&self, event_id: EventId, target: String, now: UnixMs) -> SpoolFuture<DeliveryId> {
        self.submit(|r| Command::Redeliver(event_id, target, now, r))
    }
}

impl Work for SqliteSpool {
    fn lease(&self, target: &str, now: UnixMs, n: usize, hold: Duration) -> Leases {
        let target = target.to_string();
        self.read(|r| Read::Lease(target, now, n, hold, r))
    }

    fn record(&self, settlements: Vec<Settle>, now: UnixMs) -> SpoolFuture<()> {
        let (settlements, writing) = leases::take_marks(&self.leased, settlements);
        let committed = self.submit(|r| Command::Record(settlements, now, r));
        let leased = self.leased.clone();
        Box::pin(async move {
            let result = committed.await;
            leases::written(&leased, writing, result.is_ok());
            result
        })
    }

    fn release_backoff(&self, target: &str, now: UnixMs) -> SpoolFuture<u64> {
        self.submit(|r| Command::Release(Release::backlog(target), now, r))
    }

    fn retire_targets(&self, targets: Vec<String>, now: UnixMs) -> SpoolFuture<Vec<(String, u64)>> {
        self.submit(|r| Command::Retire(targets, now, r))
    }
}

impl Operator for SqliteSpool {
    fn dead_letters(&self, filter: DeadFilter, limit: usize) -> SpoolFuture<Vec<DeadLetter>> {
        self.read(|r| Read::DeadLetters(filter, limit, r))
    }

    fn replay(&self, filter: DeadFilter, now: UnixMs) -> SpoolFuture<u64> {
        self.submit(|r| Command::Replay(filter, now, r))
    }

    fn purge(&self, filter: DeadFilter) -> SpoolFuture<u64> {
        self.submit(|r| Command::Purge(filter, r))
    }

    fn waiting(&self, target: &str, limit: usize) -> SpoolFuture<Vec<WaitingDelivery>> {
        let target = target.to_string();
        self.read(|r| Read::Waiting(target, limit, r))
    }

    fn release(&self, release: Release, now: UnixMs) -> SpoolFuture<u64> {
        self.submit(|r| Command::Release(release, now, r))
    }

    fn event(&self, event_id: EventId) -> SpoolFuture<Option<Event>> {
        self.read(|r| Read::Event(event_id, r))
    }
}

impl Health for SqliteSpool {
    /// A one-row rewrite through the writer, like any other command: it
    /// fails as a push's commit would (a full disk, a file gone).
    fn probe(&self) -> SpoolFuture<()> {
        self.submit(Command::Probe)
    }

    fn depth(&self) -> SpoolFuture<Vec<TargetDepth>> {
        self.read(Read::Depth)
    }
}

impl Tickets for SqliteSpool {
    fn keep(&self, ticket: ComponentTicket) -> SpoolFuture<bool> {
        self.submit(|r| Command::KeepTicket(ticket, r))
    }

    fn tickets(&self) -> SpoolFuture<Vec<ComponentTicket>> {
        self.read(Read::Tickets)
    }
}

impl LateReplies for SqliteSpool {
    fn keep_late(&self, reply: NewLateReply) -> SpoolFuture<LateReplyId> {
        self.submit(|r| Command::Late(LateCommand::Keep(reply, r)))
    }

    fn lease_late(&self, now: UnixMs, n: usize, hold: Duration) -> SpoolFuture<Vec<HeldLateReply>> {
        let owner = self.owner.clone();
        self.submit(|r| Command::Late(LateCommand::Lease(now, n, hold, owner, r)))
    }

    fn settle_late(
        &self,
        id: LateReplyId,
        lease: LeaseToken,
        outcome: LateOutcome,
        now: UnixMs,
    ) -> SpoolFuture<bool> {
        self.submit(|r| Command::Late(LateCommand::Settle(id, lease, outcome, now, r)))
    }

    fn take_next_late(
        &self,
        account: &str,
        openid: &str,
        now: UnixMs,
    ) -> SpoolFuture<Option<HeldLateReply>> {
        let (account, openid) = (account.to_owned(), openid.to_owned());
        self.submit(|r| Command::Late(LateCommand::TakeNext(account, openid, now, r)))
    }

    fn dead_late(&self, limit: usize) -> SpoolFuture<Vec<DeadLateReply>> {
        self.submit(|r| Command::Late(LateCommand::Dead(limit, r)))
    }

    fn prune_late(&self, cutoff: UnixMs, batch: usize) -> SpoolFuture<u64> {
        self.submit(|r| Command::Late(LateCommand::Prune(cutoff, batch, r)))
    }

    fn api_token(&self, account: &str) -> SpoolFuture<Option<ApiToken>> {
        let account = account.to_owned();
        self.submit(|r| Command::Late(LateCommand::Token(account, r)))
    }

    fn keep_api_token(&self, token: ApiToken) -> SpoolFuture<()> {
        self.submit(|r| Command::Late(LateCommand::KeepToken(token, r)))
    }
}

/// Only this process writes the file: its workers are woken in-process.
impl DueListener for SqliteSpool {
    fn on_due_elsewhere(&self, wake: DueWaker) {
        drop(wake);
    }
}

#[cfg(test)]
mod tests;
