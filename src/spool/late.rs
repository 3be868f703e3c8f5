//! Late replies and access tokens: the spool's side of a reply target's
//! answer that came after WeChat's five seconds.
//!
//! # Contract
//!
//! - [`LateReplies::keep_late`] resolves once the late reply is durable, and
//!   nothing is sent before it has: a crash after the target answered loses
//!   nothing that is then sent.
//! - A `customer_service` late reply is handed out by [`LateReplies::lease_late`]
//!   only when due and not leased, with a fresh lease token; its outcome is
//!   recorded under that token only ([`LateReplies::settle_late`]). A lease
//!   that ends unsettled (a crash mid-send) makes it due again: at least once.
//! - A sent late reply is deleted; one that cannot be sent stays as a dead
//!   letter with WeChat's `errcode` and `errmsg`.
//! - A `next_message` late reply is taken once by the user's next push while
//!   it is younger than its `expires_at` ([`LateReplies::take_next_late`]);
//!   of two racing takes, one gets it. Expired ones become dead letters.
//! - An account's access token is kept once per spool, so that every replica
//!   uses the one a single fetch got ([`LateReplies::api_token`]).

use super::rows::Columns;
use super::{LeaseToken, SpoolError, SpoolFuture, UnixMs};
use crate::route::LateReply;
use std::time::Duration;

/// A late reply's id in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LateReplyId(pub i64);

impl std::fmt::Display for LateReplyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A late reply to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLateReply {
    pub account: String,
    /// The user it answers (personal data: never logged as is).
    pub openid: String,
    pub channel: LateReply,
    /// The message as JSON ([`crate::wechat::customer_service::LateMessage`]).
    pub message: String,
    /// When the push it answers arrived: what the latency is measured from.
    pub pushed_at: UnixMs,
    /// When a `next_message` reply is no longer given.
    pub expires_at: UnixMs,
    /// When it is first due to be sent.
    pub due_at: UnixMs,
}

/// A late reply handed out to be sent (leased) or given (taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldLateReply {
    pub id: LateReplyId,
    pub account: String,
    pub openid: String,
    pub message: String,
    pub pushed_at: UnixMs,
    /// Attempts made before this one.
    pub attempts: u32,
    /// What the outcome is recorded under.
    pub lease: LeaseToken,
}

/// What became of one attempt to send a late reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LateOutcome {
    Sent,
    Retry {
        next_at: UnixMs,
        errcode: i64,
        errmsg: String,
    },
    Dead {
        errcode: i64,
        errmsg: String,
    },
}

/// A late reply that could not be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLateReply {
    pub id: LateReplyId,
    pub account: String,
    pub openid: String,
    pub channel: String,
    pub attempts: u32,
    /// WeChat's `errcode` (0 when WeChat gave none).
    pub errcode: i64,
    pub errmsg: String,
    pub pushed_at: UnixMs,
    pub dead_at: UnixMs,
}

/// An account's access token for WeChat's API: a credential, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub account: String,
    pub token: String,
    /// When the relay stops using it: ahead of WeChat's expiry, so that no
    /// call carries a token about to expire.
    pub expires_at: UnixMs,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("account", &self.account)
            .field("token", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What the late path needs: keeping late replies, sending or giving them,
/// and the access tokens they are sent with. See the module doc.
pub trait LateReplies: Send + Sync + 'static {
    fn keep_late(&self, reply: NewLateReply) -> SpoolFuture<LateReplyId>;
    /// Up to `n` due `customer_service` late replies, each held for `hold`.
    fn lease_late(&self, now: UnixMs, n: usize, hold: Duration) -> SpoolFuture<Vec<HeldLateReply>>;
    /// Records an attempt's outcome while the reply holds no later lease;
    /// whether it did.
    fn settle_late(
        &self,
        id: LateReplyId,
        lease: LeaseToken,
        outcome: LateOutcome,
        now: UnixMs,
    ) -> SpoolFuture<bool>;
    /// Takes (deletes) the oldest unexpired `next_message` late reply to
    /// `openid` of `account`; dead-letters the expired ones.
    fn take_next_late(
        &self,
        account: &str,
        openid: &str,
        now: UnixMs,
    ) -> SpoolFuture<Option<HeldLateReply>>;
    /// The late replies that could not be sent, oldest first.
    fn dead_late(&self, limit: usize) -> SpoolFuture<Vec<DeadLateReply>>;
    /// Deletes up to `batch` late replies that are over: dead ones dead by
    /// `cutoff`, and `next_message` ones nobody took that expired by then.
    /// How many went.
    fn prune_late(&self, cutoff: UnixMs, batch: usize) -> SpoolFuture<u64>;
    fn api_token(&self, account: &str) -> SpoolFuture<Option<ApiToken>>;
    fn keep_api_token(&self, token: ApiToken) -> SpoolFuture<()>;
}

/// Why an expired `next_message` late reply was dead-lettered.
pub const EXPIRED: &str = "expired: the user sent nothing within late_reply_ttl";

const HELD_COLUMNS: &str = "id, account, openid, message, pushed_at, attempts, lease_token";

pub(super) const INSERT_LATE: &str = "INSERT INTO late_replies
     (account, openid, channel, message, pushed_at, expires_at, due_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id";

/// `$1` now, `$2` the lease's end, `$3` how many. A lease still running
/// holds the reply, except in SQLite, where one taken by another process
/// (`$4` is this one's) was taken by a relay that has stopped: only one
/// relay writes the file.
pub(super) const LEASE_LATE_POSTGRES: &str = const_format::concatcp!(
    "UPDATE late_replies SET lease_token = lease_token + 1, lease_until = $2
     WHERE id IN (SELECT id FROM late_replies
         WHERE state = 'pending' AND channel = 'customer_service'
           AND due_at <= $1 AND lease_until <= $1
         ORDER BY due_at, id LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING ",
    HELD_COLUMNS
);
pub(super) const LEASE_LATE_SQLITE: &str = const_format::concatcp!(
    "UPDATE late_replies SET lease_token = lease_token + 1, lease_until = $2, lease_owner = $4
     WHERE id IN (SELECT id FROM late_replies
         WHERE state = 'pending' AND channel = 'customer_service'
           AND due_at <= $1 AND (lease_until <= $1 OR lease_owner <> $4)
         ORDER BY due_at, id LIMIT $3) RETURNING ",
    HELD_COLUMNS
);

pub(super) const SENT_LATE: &str =
    "DELETE FROM late_replies WHERE id = $1 AND lease_token = $2 AND state = 'pending'";
pub(super) const RETRY_LATE: &str = "UPDATE late_replies
     SET attempts = attempts + 1, due_at = $3, lease_until = 0, errcode = $4, errmsg = $5
     WHERE id = $1 AND lease_token = $2 AND state = 'pending'";
pub(super) const DEAD_LATE: &str = "UPDATE late_replies
     SET attempts = attempts + 1, state = 'dead', errcode = $3, errmsg = $4, dead_at = $5
     WHERE id = $1 AND lease_token = $2 AND state = 'pending'";

/// `$1` account, `$2` openid, `$3` now, `$4` [`EXPIRED`].
pub(super) const EXPIRE_NEXT: &str = "UPDATE late_replies
     SET state = 'dead', errmsg = $4, dead_at = $3
     WHERE account = $1 AND openid = $2 AND channel = 'next_message'
       AND state = 'pending' AND expires_at <= $3";
macro_rules! take_next {
    ($lock:literal) => {
        const_format::concatcp!(
            "DELETE FROM late_replies WHERE id = (SELECT id FROM late_replies
                 WHERE account = $1 AND openid = $2 AND channel = 'next_message'
                   AND state = 'pending' AND expires_at > $3
                 ORDER BY id LIMIT 1 ",
            $lock,
            ") RETURNING ",
            HELD_COLUMNS
        )
    };
}
pub(super) const TAKE_NEXT_SQLITE: &str = take_next!("");
pub(super) const TAKE_NEXT_POSTGRES: &str = take_next!("FOR UPDATE SKIP LOCKED");

pub(super) const DEAD_LATE_LIST: &str = "SELECT id, account, openid, channel, attempts,
     errcode, errmsg, pushed_at, dead_at
     FROM late_replies WHERE state = 'dead' ORDER BY id LIMIT $1";

/// `$1` the cutoff, `$2` the batch.
pub(super) const PRUNE_LATE: &str = "DELETE FROM late_replies WHERE id IN (
     SELECT id FROM late_replies
     WHERE (state = 'dead' AND dead_at <= $1)
        OR (state = 'pending' AND channel = 'next_message' AND expires_at <= $1)
     ORDER BY id LIMIT $2)";

pub(super) const API_TOKEN: &str =
    "SELECT account, token, expires_at FROM api_tokens WHERE account = $1";
pub(super) const KEEP_API_TOKEN: &str = "INSERT INTO api_tokens (account, token, expires_at)
     VALUES ($1, $2, $3)
     ON CONFLICT (account) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at";

pub(super) fn held(row: &impl Columns) -> Result<HeldLateReply, SpoolError> {
    Ok(HeldLateReply {
        id: LateReplyId(row.int("id")?),
        account: row.text("account")?,
        openid: row.text("openid")?,
        message: row.text("message")?,
        pushed_at: row.time("pushed_at")?,
        attempts: row.count("attempts")?,
        lease: LeaseToken(row.int("lease_token")?),
    })
}

pub(super) fn dead(row: &impl Columns) -> Result<DeadLateReply, SpoolError> {
    Ok(DeadLateReply {
        id: LateReplyId(row.int("id")?),
        account: row.text("account")?,
        openid: row.text("openid")?,
        channel: row.text("channel")?,
        attempts: row.count("attempts")?,
        errcode: row.int("errcode")?,
        errmsg: row.text("errmsg")?,
        pushed_at: row.time("pushed_at")?,
        dead_at: row.time("dead_at")?,
    })
}

pub(super) fn api_token(row: &impl Columns) -> Result<ApiToken, SpoolError> {
    Ok(ApiToken {
        account: row.text("account")?,
        token: row.text("token")?,
        expires_at: row.time("expires_at")?,
    })
}
