//! Late replies and access tokens in the file: each operation a command of
//! the writer, so that a lease or a take is one write among the others.

use super::held::Prepared;
use super::reader::read_rows;
use super::writer::{deferred, in_savepoint, Answer};
use super::Reply;
use crate::spool::late::{
    self, ApiToken, DeadLateReply, HeldLateReply, LateOutcome, LateReplyId, NewLateReply,
};
use crate::spool::{LeaseToken, SpoolError, UnixMs};
use rusqlite::{params, Connection};
use std::time::Duration;

pub(in crate::spool) enum LateCommand {
    Keep(NewLateReply, Reply<LateReplyId>),
    Lease(UnixMs, usize, Duration, String, Reply<Vec<HeldLateReply>>),
    Settle(LateReplyId, LeaseToken, LateOutcome, UnixMs, Reply<bool>),
    TakeNext(String, String, UnixMs, Reply<Option<HeldLateReply>>),
    Dead(usize, Reply<Vec<DeadLateReply>>),
    Prune(UnixMs, usize, Reply<u64>),
    Token(String, Reply<Option<ApiToken>>),
    KeepToken(ApiToken, Reply<()>),
}

/// The statement with SQLite's numbered parameters: `?2` is the second
/// wherever it first appears, while `$2` would be numbered by appearance.
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

pub(super) fn fail(cmd: LateCommand, err: SpoolError) {
    match cmd {
        LateCommand::Keep(_, r) => drop(r.send(Err(err))),
        LateCommand::Lease(_, _, _, _, r) => drop(r.send(Err(err))),
        LateCommand::Settle(_, _, _, _, r) => drop(r.send(Err(err))),
        LateCommand::TakeNext(_, _, _, r) => drop(r.send(Err(err))),
        LateCommand::Dead(_, r) => drop(r.send(Err(err))),
        LateCommand::Prune(_, _, r) => drop(r.send(Err(err))),
        LateCommand::Token(_, r) => drop(r.send(Err(err))),
        LateCommand::KeepToken(_, r) => drop(r.send(Err(err))),
    }
}

pub(super) fn apply(
    tx: &Prepared<'_>,
    cmd: LateCommand,
    savepoint: bool,
) -> (Answer, Option<SpoolError>) {
    match cmd {
        LateCommand::Keep(reply, r) => {
            deferred(r, in_savepoint(tx, savepoint, |c| keep(c, &reply)))
        }
        LateCommand::Lease(now, n, hold, owner, r) => deferred(r, lease(tx, now, n, hold, &owner)),
        LateCommand::Settle(id, lease, outcome, now, r) => deferred(
            r,
            in_savepoint(tx, savepoint, |c| settle(c, id, lease, &outcome, now)),
        ),
        LateCommand::TakeNext(account, openid, now, r) => {
            deferred(r, take_next(tx, savepoint, (&account, &openid), now))
        }
        LateCommand::Dead(limit, r) => deferred(r, dead_list(tx, limit)),
        LateCommand::Prune(cutoff, batch, r) => deferred(r, prune(tx, savepoint, cutoff, batch)),
        LateCommand::Token(account, r) => deferred(r, token(tx, &account)),
        LateCommand::KeepToken(token, r) => {
            deferred(r, in_savepoint(tx, savepoint, |c| keep_token(c, &token)))
        }
    }
}

/// Leases up to `n` due late replies to `owner` for `hold`.
fn lease(
    tx: &Connection,
    now: UnixMs,
    n: usize,
    hold: Duration,
    owner: &str,
) -> Result<Vec<HeldLateReply>, SpoolError> {
    let until = now + hold;
    let limit = i64::try_from(n).unwrap_or(i64::MAX);
    read_rows(
        tx,
        &numbered(late::LEASE_LATE_SQLITE),
        params![now.0, until.0, limit, owner],
        |row| late::held(row),
    )
}

/// Takes the user's next late reply, once the expired ones are set aside.
fn take_next(
    tx: &Prepared<'_>,
    savepoint: bool,
    (account, openid): (&str, &str),
    now: UnixMs,
) -> Result<Option<HeldLateReply>, SpoolError> {
    let expired = in_savepoint(tx, savepoint, |c| {
        c.prepare_cached(&numbered(late::EXPIRE_NEXT))?
            .execute(params![account, openid, now.0, late::EXPIRED])
    });
    let taken = expired.and_then(|_| {
        read_rows(
            tx,
            &numbered(late::TAKE_NEXT_SQLITE),
            params![account, openid, now.0],
            |row| late::held(row),
        )
    });
    taken.map(|rows| rows.into_iter().next())
}

fn dead_list(tx: &Connection, limit: usize) -> Result<Vec<DeadLateReply>, SpoolError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    read_rows(tx, &numbered(late::DEAD_LATE_LIST), params![limit], |row| {
        late::dead(row)
    })
}

/// Deletes up to `batch` late replies done with by `cutoff`: the dead, and
/// the unsent ones for a next message that expired.
fn prune(
    tx: &Prepared<'_>,
    savepoint: bool,
    cutoff: UnixMs,
    batch: usize,
) -> Result<u64, SpoolError> {
    let batch = i64::try_from(batch).unwrap_or(i64::MAX);
    let pruned = in_savepoint(tx, savepoint, |c| {
        c.prepare_cached(&numbered(late::PRUNE_LATE))?
            .execute(params![cutoff.0, batch])
    });
    pruned.map(|n| n as u64)
}

fn token(tx: &Connection, account: &str) -> Result<Option<ApiToken>, SpoolError> {
    let rows = read_rows(tx, &numbered(late::API_TOKEN), params![account], |row| {
        late::api_token(row)
    });
    rows.map(|rows| rows.into_iter().next())
}

fn keep_token(c: &Connection, token: &ApiToken) -> rusqlite::Result<()> {
    c.prepare_cached(&numbered(late::KEEP_API_TOKEN))?
        .execute(params![token.account, token.token, token.expires_at.0])
        .map(drop)
}

fn keep(c: &Connection, reply: &NewLateReply) -> rusqlite::Result<LateReplyId> {
    c.prepare_cached(&numbered(late::INSERT_LATE))?.query_row(
        params![
            reply.account,
            reply.openid,
            reply.channel.as_str(),
            reply.message,
            reply.pushed_at.0,
            reply.expires_at.0,
            reply.due_at.0
        ],
        |row| row.get(0).map(LateReplyId),
    )
}

fn settle(
    c: &Connection,
    id: LateReplyId,
    lease: LeaseToken,
    outcome: &LateOutcome,
    now: UnixMs,
) -> rusqlite::Result<bool> {
    let changed = match outcome {
        LateOutcome::Sent => c
            .prepare_cached(&numbered(late::SENT_LATE))?
            .execute(params![id.0, lease.0])?,
        LateOutcome::Retry {
            next_at,
            errcode,
            errmsg,
        } => c
            .prepare_cached(&numbered(late::RETRY_LATE))?
            .execute(params![id.0, lease.0, next_at.0, errcode, errmsg])?,
        LateOutcome::Dead { errcode, errmsg } => c
            .prepare_cached(&numbered(late::DEAD_LATE))?
            .execute(params![id.0, lease.0, errcode, errmsg, now.0])?,
    };
    Ok(changed > 0)
}
