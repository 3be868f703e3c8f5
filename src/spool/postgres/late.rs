//! Late replies and access tokens on PostgreSQL: each operation one
//! statement (two for a take) on a pool connection, committed as durably as
//! a push; leases and takes skip rows another replica holds.

use super::{BoxedOp, PostgresSpool};
use crate::spool::late::{
    self, ApiToken, DeadLateReply, HeldLateReply, LateOutcome, LateReplies, LateReplyId,
    NewLateReply,
};
use crate::spool::{LeaseToken, SpoolError, SpoolFuture, UnixMs};
use deadpool_postgres::Object;
use std::time::Duration;
use tokio_postgres::types::ToSql;

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

/// Runs `sql` with `params` and maps every row it returns.
fn rows_of<'c, T: Send + 'c>(
    c: &'c mut Object,
    sql: &'static str,
    params: Params<'c>,
    map: fn(&tokio_postgres::Row) -> Result<T, SpoolError>,
) -> BoxedOp<'c, Vec<T>> {
    Box::pin(async move {
        let statement = c.prepare_cached(sql).await?;
        let rows = c.query(&statement, &params).await?;
        rows.iter().map(map).collect()
    })
}

fn execute<'c>(c: &'c mut Object, sql: &'static str, params: Params<'c>) -> BoxedOp<'c, u64> {
    Box::pin(async move {
        let statement = c.prepare_cached(sql).await?;
        Ok(c.execute(&statement, &params).await?)
    })
}

impl LateReplies for PostgresSpool {
    fn keep_late(&self, reply: NewLateReply) -> SpoolFuture<LateReplyId> {
        self.with_client("keep late reply", move |c| {
            Box::pin(async move {
                let r = &reply;
                let channel = r.channel.as_str();
                let params: Params<'_> = vec![
                    &r.account,
                    &r.openid,
                    &channel,
                    &r.message,
                    &r.pushed_at.0,
                    &r.expires_at.0,
                    &r.due_at.0,
                ];
                let statement = c.prepare_cached(late::INSERT_LATE).await?;
                let row = c.query_one(&statement, &params).await?;
                Ok(LateReplyId(row.try_get(0)?))
            })
        })
    }

    fn lease_late(&self, now: UnixMs, n: usize, hold: Duration) -> SpoolFuture<Vec<HeldLateReply>> {
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let until = (now + hold).0;
        self.with_client("lease late replies", move |c| {
            Box::pin(async move {
                let params: Params<'_> = vec![&now.0, &until, &limit];
                rows_of(c, late::LEASE_LATE_POSTGRES, params, late::held).await
            })
        })
    }

    fn settle_late(
        &self,
        id: LateReplyId,
        lease: LeaseToken,
        outcome: LateOutcome,
        now: UnixMs,
    ) -> SpoolFuture<bool> {
        self.with_client("settle late reply", move |c| {
            Box::pin(async move {
                let changed = match &outcome {
                    LateOutcome::Sent => execute(c, late::SENT_LATE, vec![&id.0, &lease.0]).await?,
                    LateOutcome::Retry {
                        next_at,
                        errcode,
                        errmsg,
                    } => {
                        let params: Params<'_> = vec![&id.0, &lease.0, &next_at.0, errcode, errmsg];
                        execute(c, late::RETRY_LATE, params).await?
                    }
                    LateOutcome::Dead { errcode, errmsg } => {
                        let params: Params<'_> = vec![&id.0, &lease.0, errcode, errmsg, &now.0];
                        execute(c, late::DEAD_LATE, params).await?
                    }
                };
                Ok(changed > 0)
            })
        })
    }

    fn take_next_late(
        &self,
        account: &str,
        openid: &str,
        now: UnixMs,
    ) -> SpoolFuture<Option<HeldLateReply>> {
        let (account, openid) = (account.to_owned(), openid.to_owned());
        self.with_client("take late reply", move |c| {
            Box::pin(async move {
                let expired = late::EXPIRED;
                let params: Params<'_> = vec![&account, &openid, &now.0, &expired];
                execute(c, late::EXPIRE_NEXT, params).await?;
                let params: Params<'_> = vec![&account, &openid, &now.0];
                let taken = rows_of(c, late::TAKE_NEXT_POSTGRES, params, late::held).await?;
                Ok(taken.into_iter().next())
            })
        })
    }

    fn dead_late(&self, limit: usize) -> SpoolFuture<Vec<DeadLateReply>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_client("dead late replies", move |c| {
            Box::pin(
                async move { rows_of(c, late::DEAD_LATE_LIST, vec![&limit], late::dead).await },
            )
        })
    }

    fn prune_late(&self, cutoff: UnixMs, batch: usize) -> SpoolFuture<u64> {
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        self.with_client("prune late replies", move |c| {
            Box::pin(async move { execute(c, late::PRUNE_LATE, vec![&cutoff.0, &batch]).await })
        })
    }

    fn api_token(&self, account: &str) -> SpoolFuture<Option<ApiToken>> {
        let account = account.to_owned();
        self.with_client("api token", move |c| {
            Box::pin(async move {
                let rows = rows_of(c, late::API_TOKEN, vec![&account], late::api_token).await?;
                Ok(rows.into_iter().next())
            })
        })
    }

    fn keep_api_token(&self, token: ApiToken) -> SpoolFuture<()> {
        self.with_client("keep api token", move |c| {
            Box::pin(async move {
                let t = &token;
                let params: Params<'_> = vec![&t.account, &t.token, &t.expires_at.0];
                execute(c, late::KEEP_API_TOKEN, params).await.map(drop)
            })
        })
    }
}
