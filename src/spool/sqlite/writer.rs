//! The writer: one thread that commits whatever requests are waiting in one
//! transaction (group commit), so a burst of pushes costs one fsync, not one
//! per push.

use super::file::OpenedFile;
use super::held::Prepared;
use super::late::{self, LateCommand};
use super::{commit, dead, settle, trail, Reply};
use crate::spool::vocab::{PROBE, PRUNE_EVERY};
use crate::spool::{
    ComponentTicket, DeadFilter, DeliveryId, Enqueued, EventId, NewEvent, Release, Settle,
    SpoolError, Supervision, TrailSlot, TrailStore, UnixMs,
};
use crate::trail::{TrailKey, TrailNote};
use rusqlite::{params, Connection};
use std::sync::mpsc;
use std::time::Duration;

/// What the writer does, each in the next group commit.
pub(super) enum Command {
    Enqueue(Box<NewEvent>, UnixMs, Duration, Reply<Enqueued>),
    Record(Vec<Settle>, UnixMs, Reply<()>),
    Retire(Vec<String>, UnixMs, Reply<Vec<(String, u64)>>),
    Replay(DeadFilter, UnixMs, Reply<u64>),
    Purge(DeadFilter, Reply<u64>),
    Release(Release, UnixMs, Reply<u64>),
    Probe(Reply<()>),
    KeepTicket(ComponentTicket, Reply<bool>),
    Late(LateCommand),
    /// Rides with the next commit; nothing waits for it.
    Note(TrailNote),
    TrailKey(Reply<TrailKey>),
    Redeliver(EventId, String, UnixMs, Reply<DeliveryId>),
}

/// Commits the waiting commands, a batch at a time, until the spool closes.
/// The trail is pruned in commits of its own, after a batch's answers have
/// gone: no push waits for a prune.
pub(super) fn run(
    conn: Connection,
    rx: mpsc::Receiver<Command>,
    max_batch: usize,
    (file, trail): (&OpenedFile, &TrailSlot),
    supervision: &Supervision,
) {
    let held = Prepared::new(&conn);
    let mut batch = Vec::with_capacity(max_batch);
    let mut pruned_at = UnixMs(0);
    let mut trail_pruning = TrailPruning::default();
    let mut next = None;
    while let Some(first) = next.take().or_else(|| rx.recv().ok()) {
        batch.push(first);
        gather(&rx, &mut batch, max_batch);
        // Keep the dedup and replay tables to their windows, now and then rather than on
        // every push; the clock is the pushes' own, so tests can move it.
        let now = batch.iter().filter_map(|c| match c {
            Command::Enqueue(_, now, _, _) => Some(*now),
            _ => None,
        });
        #[cfg(any(test, feature = "test-util"))]
        if now.clone().next().is_some() {
            supervision.panic_if_asked();
        }
        let _ = supervision;
        let prune = now.max().filter(|&now| now >= pruned_at + PRUNE_EVERY);
        if let Some(now) = prune {
            pruned_at = now;
        }
        let store = trail.load_full();
        let trail_due = trail_pruning.due(now_of(&batch));
        commit_batch(&held, &mut batch, prune, (file, store.as_deref()));
        if let (Some(store), Some(now)) = (store.as_deref(), trail_due) {
            next = prune_trail(&held, &rx, (file, store, now), &mut trail_pruning);
        }
    }
}

/// Prunes the trail a bounded batch per commit while it is behind and no
/// command waits; the command that came meanwhile, to commit next.
fn prune_trail(
    conn: &Prepared<'_>,
    rx: &mpsc::Receiver<Command>,
    (file, store, now): (&OpenedFile, &TrailStore, UnixMs),
    pruning: &mut TrailPruning,
) -> Option<Command> {
    loop {
        // What a prune deletes is no promise made to WeChat: a crash that
        // loses it leaves it to the next one.
        relax_sync(conn, true);
        let pruned = begin(conn, file).ok().and_then(|()| {
            let pruned = prune_trail_rows(conn, store, now);
            commit_or_roll_back(conn, file)
                .is_none()
                .then_some(pruned)?
        });
        relax_sync(conn, false);
        pruning.done(pruned);
        if pruned.is_none() || !pruning.behind {
            return None;
        }
        match rx.try_recv() {
            Ok(cmd) => return Some(cmd),
            Err(mpsc::TryRecvError::Empty) => continue,
            Err(mpsc::TryRecvError::Disconnected) => return None,
        }
    }
}

/// Takes what else is waiting, up to `max_batch`. Trail notes alone wait a
/// while (from the first, however many follow) for a command to ride with
/// rather than make a commit of their own.
fn gather(rx: &mpsc::Receiver<Command>, batch: &mut Vec<Command>, max_batch: usize) {
    let deadline = std::time::Instant::now() + NOTES_WAIT;
    loop {
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        let notes_only = batch.iter().all(|c| matches!(c, Command::Note(_)));
        if !notes_only || batch.len() >= max_batch {
            return;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(cmd) => batch.push(cmd),
            Err(_) => return,
        }
    }
}

/// How long trail notes wait for a commit to ride with.
const NOTES_WAIT: Duration = Duration::from_millis(250);

/// The latest push's or refusal's time in the batch: the clock the trail's
/// pruning goes by (refusals alone must be pruned too).
fn now_of(batch: &[Command]) -> Option<UnixMs> {
    batch
        .iter()
        .filter_map(|c| match c {
            Command::Enqueue(_, now, _, _) => Some(*now),
            Command::Note(TrailNote::Refused { at, .. }) => Some(*at),
            _ => None,
        })
        .max()
}

/// When the trail is pruned: once a second of the pushes' clock, and again
/// while a whole batch was pruned last time (it is behind).
#[derive(Default)]
struct TrailPruning {
    at: UnixMs,
    behind: bool,
}

impl TrailPruning {
    fn due(&mut self, now: Option<UnixMs>) -> Option<UnixMs> {
        let now = now?;
        if !self.behind && now < self.at + TRAIL_PRUNE_EVERY_MS {
            return None;
        }
        self.at = now;
        Some(now)
    }

    fn done(&mut self, pruned: Option<usize>) {
        if let Some(n) = pruned {
            self.behind = n as i64 >= trail::PRUNE_BATCH;
        }
    }
}

const TRAIL_PRUNE_EVERY_MS: i64 = 1_000;

/// Applies every command in one transaction, each under its own savepoint so
/// that one failing command does not undo the others, then commits once and
/// only then answers them. A command alone in its batch needs no savepoint
/// (which costs a statement journal): if it fails, the transaction is rolled
/// back instead.
///
/// Nothing is written into a file that is no longer at the spool's path, and
/// a commit that raced with its removal is answered as failed.
pub(super) fn commit_batch(
    conn: &Prepared<'_>,
    batch: &mut Vec<Command>,
    prune_dedup_before: Option<UnixMs>,
    (file, store): (&OpenedFile, Option<&TrailStore>),
) {
    // Trail notes alone need no fsync: what they say is not a promise made
    // to WeChat. Every way out puts `synchronous=FULL` back.
    let notes_only = batch.iter().all(|c| matches!(c, Command::Note(_)));
    if notes_only {
        relax_sync(conn, true);
    }
    commit_in_transaction(conn, batch, prune_dedup_before, (file, store));
    if notes_only {
        relax_sync(conn, false);
    }
}

/// [`commit_batch`] once the connection's durability is set.
fn commit_in_transaction(
    conn: &Prepared<'_>,
    batch: &mut Vec<Command>,
    prune_dedup_before: Option<UnixMs>,
    (file, store): (&OpenedFile, Option<&TrailStore>),
) {
    if let Err(err) = begin(conn, file) {
        for cmd in batch.drain(..) {
            fail(cmd, err.clone());
        }
        return;
    }
    let Some(answers) = apply_batch(conn, batch, (file, store)) else {
        return;
    };
    if let Some(now) = prune_dedup_before {
        prune(conn, now);
    }
    let outcome = commit_or_roll_back(conn, file);
    for answer in answers {
        answer(outcome.clone());
    }
}

/// Opens the batch's transaction, in a file still at the spool's path.
fn begin(conn: &Prepared<'_>, file: &OpenedFile) -> Result<(), SpoolError> {
    file.check()
        .and_then(|()| control(conn, BEGIN).map_err(SpoolError::from))
}

/// Applies the batch's commands in the open transaction; their answers wait
/// for its commit. None when the batch ended early, every command answered:
/// the transaction was rolled back under it, or a command alone failed.
///
/// Trail notes go last and do not count: a command whose only company is
/// notes runs without a savepoint (which copies every page it changes into
/// a statement journal), and if it fails, the notes, not yet written, are
/// written in a transaction of their own.
fn apply_batch(
    conn: &Prepared<'_>,
    batch: &mut Vec<Command>,
    (file, store): (&OpenedFile, Option<&TrailStore>),
) -> Option<Vec<Answer>> {
    batch.sort_by_key(|c| matches!(c, Command::Note(_)));
    let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
    let alone = batch
        .iter()
        .filter(|c| !matches!(c, Command::Note(_)))
        .count()
        <= 1;
    let mut commands = batch.drain(..);
    while let Some(cmd) = commands.next() {
        let (answer, error) = apply(conn, cmd, !alone, store);
        answers.push(answer);
        // A full disk or an I/O error can make SQLite roll the whole
        // transaction back. The next savepoint would then start (and commit)
        // a transaction of its own while every request is told the batch
        // failed: stop here and fail the batch with the cause.
        if conn.is_autocommit() {
            let err =
                error.unwrap_or_else(|| SpoolError::storage("the transaction was rolled back"));
            for cmd in commands {
                fail(cmd, err.clone());
            }
            for answer in answers {
                answer(Some(err.clone()));
            }
            return None;
        }
        if alone && error.is_some() {
            // Nothing else to commit: undo what the command wrote, and answer
            // it with its own error.
            if let Err(e) = control(conn, ROLLBACK) {
                tracing::warn!(error = %e, "cannot roll back a failed command");
            }
            for answer in answers {
                answer(None);
            }
            notes_alone(conn, commands, (file, store));
            return None;
        }
    }
    Some(answers)
}

/// Writes the trail notes that were to ride with a command that failed
/// alone and was rolled back, in a transaction of their own.
fn notes_alone(
    conn: &Prepared<'_>,
    notes: impl ExactSizeIterator<Item = Command>,
    (file, store): (&OpenedFile, Option<&TrailStore>),
) {
    if notes.len() == 0 || begin(conn, file).is_err() {
        return;
    }
    for note in notes {
        // A note's answer does nothing: nothing waits for it.
        let _ = apply(conn, note, false, store);
    }
    if conn.is_autocommit() {
        return;
    }
    if let Some(e) = commit_or_roll_back(conn, file) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot write trail notes");
    }
}

/// How many trail rows were pruned; none when they could not be.
fn prune_trail_rows(conn: &Connection, store: &TrailStore, now: UnixMs) -> Option<usize> {
    match trail::prune(conn, store, now) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "cannot prune the trail");
            None
        }
    }
}

/// Commits the batch; the error its commands are answered with when the
/// commit fails or the file left the spool's path meanwhile.
fn commit_or_roll_back(conn: &Prepared<'_>, file: &OpenedFile) -> Option<SpoolError> {
    let outcome = control(conn, COMMIT)
        .map_err(SpoolError::from)
        .and_then(|()| file.check())
        .err();
    if !conn.is_autocommit() {
        // The commit failed and left the transaction open.
        let _ = control(conn, ROLLBACK);
    }
    outcome
}

fn relax_sync(conn: &Connection, relax: bool) {
    let mode = if relax { "NORMAL" } else { "FULL" };
    if let Err(e) = conn.pragma_update(None, "synchronous", mode) {
        tracing::warn!(error = %e, mode, "cannot set the spool file's synchronous mode");
    }
}

/// Deletes the dedup keys and replay guards expired by `now`.
fn prune(tx: &Connection, now: UnixMs) {
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

/// Answers a command once the commit's outcome is known (`Some` if it failed).
pub(super) type Answer = Box<dyn FnOnce(Option<SpoolError>) + Send>;

fn fail(cmd: Command, err: SpoolError) {
    match cmd {
        Command::Enqueue(_, _, _, r) => drop(r.send(Err(err))),
        Command::Record(_, _, r) => drop(r.send(Err(err))),
        Command::Retire(_, _, r) => drop(r.send(Err(err))),
        Command::Replay(_, _, r) => drop(r.send(Err(err))),
        Command::Purge(_, r) => drop(r.send(Err(err))),
        Command::Release(_, _, r) => drop(r.send(Err(err))),
        Command::Probe(r) => drop(r.send(Err(err))),
        Command::KeepTicket(_, r) => drop(r.send(Err(err))),
        Command::Late(cmd) => late::fail(cmd, err),
        Command::Note(_) => {}
        Command::TrailKey(r) => drop(r.send(Err(err))),
        Command::Redeliver(_, _, _, r) => drop(r.send(Err(err))),
    }
}

/// Runs one command inside a savepoint and returns how to answer it once the
/// commit's outcome is known: a result is only sent after the commit.
/// Also returns the command's own error, if it failed.
fn apply(
    tx: &Prepared<'_>,
    cmd: Command,
    savepoint: bool,
    store: Option<&TrailStore>,
) -> (Answer, Option<SpoolError>) {
    match cmd {
        Command::Enqueue(event, now, window, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| {
                commit::enqueue(c, *event, now, window, store)
            }),
        ),
        Command::Record(s, now, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| settle::record(c, &s, now, store)),
        ),
        Command::Retire(keep, now, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| {
                settle::retire(c, &keep, now, store.is_some())
            }),
        ),
        Command::Replay(f, now, r) => {
            deferred(r, in_savepoint(tx, savepoint, |c| dead::replay(c, &f, now)))
        }
        Command::Purge(f, r) => deferred(r, in_savepoint(tx, savepoint, |c| dead::purge(c, &f))),
        Command::Release(select, now, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| settle::release(c, &select, now)),
        ),
        Command::Probe(r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| {
                c.prepare_cached(PROBE)?.execute([]).map(drop)
            }),
        ),
        Command::KeepTicket(ticket, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| commit::keep_ticket(c, &ticket)),
        ),
        Command::Late(cmd) => late::apply(tx, cmd, savepoint),
        // One statement, atomic on its own: no savepoint needed.
        Command::Note(note) => {
            if let Err(e) = trail::note(tx, &note) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot write a trail note");
            }
            (Box::new(|_| {}), None)
        }
        Command::TrailKey(r) => deferred(r, in_savepoint(tx, savepoint, |c| trail::stored_key(c))),
        Command::Redeliver(event_id, target, now, r) => {
            // Under a savepoint always: a refusal leaves nothing behind.
            let result = control(tx, SAVEPOINT)
                .map_err(SpoolError::from)
                .and_then(|()| match trail::redeliver(tx, event_id, &target, now) {
                    Ok(id) => Ok(control(tx, RELEASE).map(|()| id)?),
                    Err(e) => {
                        let _ = control(tx, ROLLBACK_TO).and_then(|()| control(tx, RELEASE));
                        Err(e)
                    }
                });
            deferred(r, result)
        }
    }
}

pub(super) fn deferred<T: Send + 'static>(
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

/// Runs `f` under a savepoint, if asked; on failure undoes what it wrote, as
/// a dropped `rusqlite::Savepoint` does.
pub(super) fn in_savepoint<T>(
    c: &Prepared<'_>,
    savepoint: bool,
    f: impl FnOnce(&Prepared<'_>) -> rusqlite::Result<T>,
) -> Result<T, SpoolError> {
    if !savepoint {
        return Ok(f(c)?);
    }
    control(c, SAVEPOINT)?;
    let result = f(c).and_then(|value| control(c, RELEASE).map(|()| value));
    if result.is_err() && !c.is_autocommit() {
        let _ = control(c, ROLLBACK_TO).and_then(|()| control(c, RELEASE));
    }
    Ok(result?)
}

/// Transaction control through held statements, compiled once per
/// connection: rusqlite's `Transaction` and `Savepoint` send theirs through
/// `execute_batch`, which compiles the SQL again on every batch and command.
fn control(c: &Prepared<'_>, sql: &'static str) -> rusqlite::Result<()> {
    c.statement(sql)?.borrow_mut().execute([]).map(drop)
}

const BEGIN: &str = "BEGIN DEFERRED";
const COMMIT: &str = "COMMIT";
const ROLLBACK: &str = "ROLLBACK";
const SAVEPOINT: &str = "SAVEPOINT command";
const RELEASE: &str = "RELEASE command";
const ROLLBACK_TO: &str = "ROLLBACK TO command";
