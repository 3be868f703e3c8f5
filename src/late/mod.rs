//! Late replies: a reply target's answer that comes after the reply budget,
//! on a route with `late_reply`, still reaches the user.
//!
//! The request path answers WeChat `success` when the budget runs out but
//! keeps waiting for the target, up to its `timeout` (the delivery stays due
//! only after that, so no worker calls the target a second time meanwhile;
//! a restart that cuts the wait short leaves the delivery to the workers,
//! whose answer is taken the same way).
//! A late answer that is a passive reply WeChat would take becomes a
//! [`LateMessage`] and is stored on the spool **before** anything is sent:
//!
//! - `customer_service`: the sender here leases it, sends it through
//!   `custom/send` (retried on transient failures with the durable retry
//!   schedule, dead-lettered with WeChat's errcode and errmsg otherwise);
//! - `next_message`: it waits for the user's next push to the account, which
//!   is answered with it (sealed as any reply) within `late_reply_ttl`.
//!
//! Every outcome is counted in `wxrelay_late_replies_total`; the time from
//! the push to the user-visible send in `wxrelay_late_reply_seconds`.

pub mod api;

use crate::clock::Clock;
use crate::config::{Account, RetryClass, RetryPolicy, Settings};
use crate::deliver::HttpClient;
use crate::metrics::Metrics;
use crate::route::LateReply;
use crate::server::stopping;
use crate::short_hash;
use crate::spool::{HeldLateReply, LateOutcome, LateReplies, NewLateReply, UnixMs};
use crate::wechat::customer_service::LateMessage;
use api::{ApiError, Failed, WechatApi};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// How often the sender looks for retries that have become due.
const POLL: Duration = Duration::from_secs(1);
/// Late replies sent at once.
const BATCH: usize = 8;
/// How often late replies that are over are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3_600);
/// How long a dead late reply stays for the operator (`dlq list`), and an
/// untaken `next_message` one after it expired.
const KEEP_OVER: Duration = Duration::from_secs(7 * 24 * 3_600);
/// Late replies deleted per statement, and statements per prune: a large
/// backlog never holds the spool's writer long.
const PRUNE_BATCH: usize = 500;
const PRUNE_BATCHES: usize = 20;
/// How long a send holds its late reply: two API calls and a token fetch,
/// with room to spare; a sender that dies leaves it to come due again.
const HOLD: Duration = Duration::from_secs(60);
/// The last post of a send starts this long before its hold ends, so that
/// it is over (within [`api::CALL_TIMEOUT`]) while the send still holds the
/// late reply: never sent beside another sender that leased it since.
const LAST_POST_BEFORE_HOLD_ENDS: Duration = Duration::from_secs(15);

/// What became of a late reply, as counted (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    Sent,
    Given,
    Retried,
    /// Retried, but WeChat refused the account's setup (the secret, the
    /// AppID, the IP allowlist): the operator's to fix, so it alerts.
    Refused,
    DeadLettered,
    /// The late answer was `success`, or no message WeChat can send.
    NoMessage,
    /// The spool could not store it: that answer is lost, and its delivery
    /// is tried again for another.
    Lost,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::Sent => "sent",
            Outcome::Given => "given",
            Outcome::Retried => "retried",
            Outcome::Refused => "refused",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::NoMessage => "no_message",
            Outcome::Lost => "lost",
        }
    }
}

/// Who a late answer is for: the account, the user, the channel, and when
/// the push it answers arrived.
#[derive(Debug, Clone)]
pub struct Addressed {
    pub account: String,
    pub openid: String,
    pub channel: LateReply,
    pub ttl: Duration,
    pub pushed_at: UnixMs,
}

/// The late path's state: where late replies are kept, the API they are
/// sent through, and the sender's wake-up.
pub struct Late {
    config: Arc<ArcSwap<Settings>>,
    spool: Arc<dyn LateReplies>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    api: WechatApi,
    wake: Notify,
}

impl Late {
    pub fn new(
        config: Arc<ArcSwap<Settings>>,
        spool: Arc<dyn LateReplies>,
        (clock, metrics): (Arc<dyn Clock>, Arc<Metrics>),
        client: HttpClient,
    ) -> Arc<Late> {
        let api = WechatApi::new(client, spool.clone(), clock.clone());
        Arc::new(Late {
            config,
            spool,
            clock,
            metrics,
            api,
            wake: Notify::new(),
        })
    }

    fn count(&self, to: (&str, LateReply), outcome: Outcome) {
        self.metrics
            .late_replies
            .with_label_values(&[to.0, to.1.as_str(), outcome.as_str()])
            .inc();
    }

    /// Counts a late answer that carried no message to keep.
    pub fn no_message(&self, to: &Addressed) {
        self.count((&to.account, to.channel), Outcome::NoMessage);
    }

    /// Stores `message` durably for `to`, then wakes the sender; false when
    /// the spool cannot store it. That answer is lost (logged as an error
    /// and counted), and its delivery is tried again for another.
    pub async fn keep(&self, to: &Addressed, message: &LateMessage) -> bool {
        let now = UnixMs(self.clock.now_ms());
        let Ok(json) = serde_json::to_string(message) else {
            // A message of strings and lists always serialises.
            return false;
        };
        let reply = NewLateReply {
            account: to.account.clone(),
            openid: to.openid.clone(),
            channel: to.channel,
            message: json,
            pushed_at: to.pushed_at,
            expires_at: to.pushed_at + to.ttl,
            due_at: now,
        };
        let user = short_hash(&to.openid);
        let (account, channel) = (to.account.as_str(), to.channel.as_str());
        match self.spool.keep_late(reply).await {
            Ok(id) => {
                self.count((account, to.channel), Outcome::Stored);
                tracing::info!(
                    account,
                    channel,
                    user,
                    late_reply = id.0,
                    msg_type = message.msg_type(),
                    "late reply stored"
                );
                self.wake.notify_one();
                true
            }
            Err(e) => {
                self.count((account, to.channel), Outcome::Lost);
                tracing::error!(account, channel, user, error = %crate::error_chain(&e), "cannot store a late reply: this answer is lost, its delivery is tried again");
                false
            }
        }
    }

    /// Whether a push to `account` may be answered with a kept late reply:
    /// some route that can match the account keeps them for the next
    /// message. Other pushes spend no spool write on looking.
    pub fn keeps_for_next_message(config: &Settings, account: &str) -> bool {
        config.routes.iter().any(|r| {
            r.late_reply == LateReply::NextMessage
                && r.matcher
                    .account
                    .as_ref()
                    .is_none_or(|ids| ids.iter().any(|id| id == account))
        })
    }

    /// Shows the failures the alert counts at 0 for every account and
    /// channel the configuration sends late replies through: `increase()`
    /// sees a first failure only on a series that was there before it.
    pub fn show_failures(metrics: &Metrics, config: &Settings) {
        let late_routes = config
            .routes
            .iter()
            .filter(|r| r.late_reply != LateReply::None);
        for route in late_routes {
            let accounts = config.accounts.keys().filter(|id| {
                route
                    .matcher
                    .account
                    .as_ref()
                    .is_none_or(|ids| ids.contains(id))
            });
            for account in accounts {
                for outcome in [Outcome::Refused, Outcome::DeadLettered, Outcome::Lost] {
                    let labels = [
                        account.as_str(),
                        route.late_reply.as_str(),
                        outcome.as_str(),
                    ];
                    metrics.late_replies.with_label_values(&labels);
                }
            }
        }
    }

    /// Takes the late reply kept for `openid`'s next push to `account`; one
    /// that does not read back is taken all the same, and counted lost.
    pub async fn take_next(&self, account: &str, openid: &str) -> Option<LateMessage> {
        let now = UnixMs(self.clock.now_ms());
        let held = match self.spool.take_next_late(account, openid, now).await {
            Ok(held) => held?,
            Err(e) => {
                tracing::warn!(account, error = %crate::error_chain(&e), "cannot look for a kept late reply; answering as usual");
                return None;
            }
        };
        // Taken already: one that does not read back is lost, and alerts.
        let Ok(message) = serde_json::from_str::<LateMessage>(&held.message) else {
            self.count((account, LateReply::NextMessage), Outcome::Lost);
            let user = short_hash(openid);
            tracing::error!(
                account,
                user,
                late_reply = held.id.0,
                "a kept late reply does not read back: it is lost"
            );
            return None;
        };
        self.count((account, LateReply::NextMessage), Outcome::Given);
        self.observe_sent(&held);
        Some(message)
    }

    /// Tells the user the account is typing, once; best effort.
    pub async fn typing(&self, account: &str, openid: &str) {
        let config = self.config.load_full();
        let Some((account, api)) = api_of(&config, account) else {
            return;
        };
        let body = serde_json::json!({ "touser": openid, "command": "Typing" });
        let last_post = tokio::time::Instant::now() + api::CALL_TIMEOUT;
        if let Err(e) = self
            .api
            .call((account, api), api::CUSTOM_TYPING, &body, last_post)
            .await
        {
            tracing::info!(account = %account.id, error = %e, "typing not shown");
        }
    }

    fn observe_sent(&self, held: &HeldLateReply) {
        let seconds = (self.clock.now_ms() - held.pushed_at.0).max(0) as f64 / 1000.0;
        self.metrics.late_reply_seconds.observe(seconds);
    }

    /// Sends the `customer_service` late replies as they come due, until
    /// stopped.
    pub async fn send_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut pruned_at: Option<UnixMs> = None;
        loop {
            let now = UnixMs(self.clock.now_ms());
            if pruned_at.is_none_or(|at| now >= at + PRUNE_EVERY) {
                self.prune(now).await;
                pruned_at = Some(now);
            }
            match self.spool.lease_late(now, BATCH, HOLD).await {
                Ok(held) if !held.is_empty() => {
                    let mut sends = JoinSet::new();
                    for reply in held {
                        sends.spawn(self.clone().send(reply));
                    }
                    while sends.join_next().await.is_some() {}
                    continue;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot read the late replies due")
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stopping(&mut stop) => break,
            }
        }
    }

    /// Deletes the late replies that are over (dead, or untaken and
    /// expired) since [`KEEP_OVER`], in bounded batches.
    async fn prune(&self, now: UnixMs) {
        let cutoff = UnixMs(now.0 - KEEP_OVER.as_millis() as i64);
        let mut pruned = 0;
        for _ in 0..PRUNE_BATCHES {
            match self.spool.prune_late(cutoff, PRUNE_BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < PRUNE_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot prune late replies");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "late replies that were over pruned");
        }
    }

    /// One send of a leased late reply, and its record.
    async fn send(self: Arc<Self>, held: HeldLateReply) {
        let last_post = tokio::time::Instant::now() + (HOLD - LAST_POST_BEFORE_HOLD_ENDS);
        let config = self.config.load_full();
        let result = match (
            api_of(&config, &held.account),
            serde_json::from_str::<LateMessage>(&held.message),
        ) {
            (None, _) => Err(ApiError::NoApi),
            (_, Err(_)) => Err(ApiError::Unreadable),
            (Some(to), Ok(message)) => {
                let body = message.custom_send(&held.openid);
                let sent = self.api.call(to, api::CUSTOM_SEND, &body, last_post);
                sent.await
            }
        };
        let now = UnixMs(self.clock.now_ms());
        let (outcome, settle) = decide(&held, result, now);
        let user = short_hash(&held.openid);
        let account = held.account.as_str();
        match &settle {
            LateOutcome::Sent => self.observe_sent(&held),
            LateOutcome::Retry { errmsg, .. } => {
                tracing::warn!(account, user, late_reply = held.id.0, error = %errmsg, "late reply not sent; retrying")
            }
            LateOutcome::Dead { errcode, errmsg } => {
                tracing::warn!(account, user, late_reply = held.id.0, errcode, errmsg = %errmsg, "late reply cannot be sent; dead-lettered")
            }
        }
        self.count((account, LateReply::CustomerService), outcome);
        if let Err(e) = self
            .spool
            .settle_late(held.id, held.lease, settle, now)
            .await
        {
            tracing::error!(account, late_reply = held.id.0, error = %crate::error_chain(&e), "cannot record a late reply's send; it is sent again when its lease ends");
        }
    }
}

/// The account and its API section, when both are configured.
fn api_of<'c>(
    config: &'c Settings,
    account: &str,
) -> Option<(&'c Account, &'c crate::config::AccountApi)> {
    let account = config.accounts.get(account)?;
    Some((account, account.api.as_ref()?))
}

/// What a send's result means: sent, another try on the durable schedule,
/// or a dead letter with WeChat's errcode and errmsg.
fn decide(
    held: &HeldLateReply,
    result: Result<(), ApiError>,
    now: UnixMs,
) -> (Outcome, LateOutcome) {
    let error = match result {
        Ok(()) => return (Outcome::Sent, LateOutcome::Sent),
        Err(error) => error,
    };
    let (errcode, errmsg) = (error.errcode(), error.errmsg());
    let policy = RetryPolicy::for_class(RetryClass::Durable);
    let next = policy.delay_after(held.attempts as usize + 1);
    let outcome = match api::classify(&error) {
        Failed::Transient => Outcome::Retried,
        Failed::Setup => Outcome::Refused,
        Failed::Permanent => Outcome::DeadLettered,
    };
    match (outcome, next) {
        (Outcome::Retried | Outcome::Refused, Some(delay)) => (
            outcome,
            LateOutcome::Retry {
                next_at: now + delay,
                errcode,
                errmsg,
            },
        ),
        _ => (Outcome::DeadLettered, LateOutcome::Dead { errcode, errmsg }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::{LateReplyId, LeaseToken};

    fn held(attempts: u32) -> HeldLateReply {
        HeldLateReply {
            id: LateReplyId(1),
            account: "main".into(),
            openid: "o1".into(),
            message: String::new(),
            pushed_at: UnixMs(0),
            attempts,
            lease: LeaseToken(1),
        }
    }

    fn refused(errcode: i64) -> Result<(), ApiError> {
        Err(ApiError::WeChat {
            path: api::CUSTOM_SEND,
            errcode,
            errmsg: format!("e{errcode}"),
        })
    }

    #[test]
    fn busy_is_retried_on_the_durable_schedule_until_it_runs_out_and_a_refusal_is_final() {
        let now = UnixMs(1_000);
        assert_eq!(
            decide(&held(0), Ok(()), now),
            (Outcome::Sent, LateOutcome::Sent)
        );
        let (outcome, retry) = decide(&held(0), refused(-1), now);
        assert_eq!(outcome, Outcome::Retried);
        let first = RetryPolicy::for_class(RetryClass::Durable).delays[0];
        let expected = LateOutcome::Retry {
            next_at: now + first,
            errcode: -1,
            errmsg: "e-1".into(),
        };
        assert_eq!(retry, expected);
        let last = RetryPolicy::for_class(RetryClass::Durable).delays.len() as u32;
        let (outcome, _) = decide(&held(last), refused(-1), now);
        assert_eq!(outcome, Outcome::DeadLettered, "the schedule is used up");
        let dead = LateOutcome::Dead {
            errcode: 48001,
            errmsg: "e48001".into(),
        };
        assert_eq!(
            decide(&held(0), refused(48001), now),
            (Outcome::DeadLettered, dead)
        );
    }

    /// A wrong secret or AppID, or the relay's address missing from the
    /// account's IP allowlist, is the operator's to fix: retried on the
    /// durable schedule meanwhile, and counted apart so that it alerts.
    #[test]
    fn a_setup_the_operator_can_fix_is_retried_and_counted_as_refused() {
        let now = UnixMs(1_000);
        let first = RetryPolicy::for_class(RetryClass::Durable).delays[0];
        for errcode in [40164, 40125, 40013] {
            let (outcome, settle) = decide(&held(0), refused(errcode), now);
            assert_eq!(outcome, Outcome::Refused, "{errcode}");
            let retry = LateOutcome::Retry {
                next_at: now + first,
                errcode,
                errmsg: format!("e{errcode}"),
            };
            assert_eq!(settle, retry, "{errcode}");
        }
        let last = RetryPolicy::for_class(RetryClass::Durable).delays.len() as u32;
        let (outcome, _) = decide(&held(last), refused(40125), now);
        assert_eq!(outcome, Outcome::DeadLettered, "the schedule is used up");
    }
}
