//! The reader: a thread with its own connection for leases and listings, so
//! that they never wait behind a commit. The trail's searches run the same
//! loop on a thread and connection of their own.

use super::dead::dead_letters;
use super::file::OpenedFile;
use super::held::Prepared;
use super::leases::{self, Leased};
use super::Reply;
use crate::spool::vocab::{EVENT_COLUMNS, PENDING, TICKETS};
use crate::spool::{
    rows, ComponentTicket, DeadFilter, DeadLetter, Event, EventId, Lease, SpoolError, TargetDepth,
    TrailSlot, UnixMs, WaitingDelivery,
};
use crate::trail::{TrailFilter, TrailFound};
use const_format::formatcp;
use rusqlite::{params, Connection};
use std::sync::mpsc;
use std::time::Duration;

/// What the reader does.
pub(super) enum Read {
    Lease(String, UnixMs, usize, Duration, Reply<Vec<Lease>>),
    DeadLetters(DeadFilter, usize, Reply<Vec<DeadLetter>>),
    Depth(Reply<Vec<TargetDepth>>),
    Waiting(String, usize, Reply<Vec<WaitingDelivery>>),
    Event(EventId, Reply<Option<Event>>),
    Tickets(Reply<Vec<ComponentTicket>>),
    Trail(TrailFilter, Reply<TrailFound>),
}

/// Answers reads until the spool closes; none from a file no longer at the
/// spool's path.
pub(super) fn run(
    conn: Connection,
    rx: mpsc::Receiver<Read>,
    (leased, trail): (Leased, TrailSlot),
    file: &OpenedFile,
) {
    let held = Prepared::new(&conn);
    while let Ok(read) = rx.recv() {
        if let Err(e) = file.check() {
            fail(read, e);
            continue;
        }
        match read {
            Read::Lease(target, now, limit, lease, r) => {
                let _ = r.send(leases::lease(&held, &leased, &target, now, limit, lease));
            }
            Read::DeadLetters(f, limit, r) => {
                let _ = r.send(dead_letters(&conn, &f, limit));
            }
            Read::Depth(r) => {
                let _ = r.send(depth(&conn));
            }
            Read::Waiting(target, limit, r) => {
                let _ = r.send(waiting(&conn, &target, limit));
            }
            Read::Event(id, r) => {
                let _ = r.send(stored_event(&conn, id));
            }
            Read::Tickets(r) => {
                let _ = r.send(read_rows(&conn, TICKETS, [], |row| rows::ticket(row)));
            }
            Read::Trail(filter, r) => {
                let _ = r.send(match trail.load().as_deref() {
                    Some(store) => super::trail::search(&conn, &store.key, &filter),
                    None => Err(SpoolError::Refused(
                        "the trail is off ([trail] enabled = false)".into(),
                    )),
                });
            }
        }
    }
}

fn fail(read: Read, err: SpoolError) {
    match read {
        Read::Lease(_, _, _, _, r) => drop(r.send(Err(err))),
        Read::DeadLetters(_, _, r) => drop(r.send(Err(err))),
        Read::Depth(r) => drop(r.send(Err(err))),
        Read::Waiting(_, _, r) => drop(r.send(Err(err))),
        Read::Event(_, r) => drop(r.send(Err(err))),
        Read::Tickets(r) => drop(r.send(Err(err))),
        Read::Trail(_, r) => drop(r.send(Err(err))),
    }
}

/// Each row of `statement` with `params`, read by `map`.
pub(super) fn read_rows<T>(
    c: &Connection,
    statement: &str,
    params: impl rusqlite::Params,
    map: impl Fn(&rusqlite::Row<'_>) -> Result<T, SpoolError>,
) -> Result<Vec<T>, SpoolError> {
    let mut select = c.prepare_cached(statement)?;
    let mut rows = select.query(params)?;
    let mut read = Vec::new();
    while let Some(row) = rows.next()? {
        read.push(map(row)?);
    }
    Ok(read)
}

const DEPTH: &str = formatcp!(
    "SELECT d.target, COUNT(*) AS pending, MIN(e.received_at) AS oldest_received_at
     FROM deliveries d JOIN events e ON e.id = d.event_id
     WHERE d.state = {PENDING} GROUP BY d.target ORDER BY d.target"
);

fn depth(c: &Connection) -> Result<Vec<TargetDepth>, SpoolError> {
    read_rows(c, DEPTH, [], |row| rows::depth(row))
}

/// A target's waiting deliveries, first due first: the heads and those held
/// back behind them, each part read in due order from the pending index and
/// the two merged, so no listing sorts a whole backlog.
pub(super) const WAITING: &str = formatcp!(
    "SELECT {WAITING_COLUMNS} FROM deliveries
     WHERE state = {PENDING} AND target = ?1 AND blocked = 0
     UNION ALL
     SELECT {WAITING_COLUMNS} FROM deliveries
     WHERE state = {PENDING} AND target = ?1 AND blocked = 1
     ORDER BY next_at, id LIMIT ?2"
);

const WAITING_COLUMNS: &str =
    "id, event_id, attempts, next_at, last_error, step, scheduled_at, not_before";

fn waiting(c: &Connection, target: &str, limit: usize) -> Result<Vec<WaitingDelivery>, SpoolError> {
    read_rows(c, WAITING, params![target, limit as i64], |row| {
        rows::waiting(row)
    })
}

const EVENT: &str = formatcp!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.id = ?1");

fn stored_event(c: &Connection, id: EventId) -> Result<Option<Event>, SpoolError> {
    let mut select = c.prepare_cached(EVENT)?;
    let mut rows = select.query(params![id])?;
    rows.next()?.map(rows::event).transpose()
}
