//! `wxrelay pending`: the deliveries a target has not got yet — list them,
//! or make them due now (the target is known to be back).
//!
//! Like `dlq`, it opens the configured spool file itself, which is safe while
//! the relay runs: deliveries made due are sent by the running relay's
//! workers within a second. Making a delivery due now is a release, not an
//! attempt: its place on the retry schedule stays, and if the attempt fails
//! it waits for the time its schedule had. A delivery the target asked, with
//! `Retry-After`, not to be sent yet stays held unless `--ignore-retry-after`
//! says the operator knows better.
//!
//! Nothing here prints message content or an OpenID.

use super::dlq::{clip, failed, listing, plural, rfc3339, ERROR_WIDTH};
use super::CliError;
use crate::config::Settings;
use crate::spool::{DeliveryId, Operator, Release, UnixMs, WaitingDelivery};
use std::fmt::Write as _;

/// How many pending deliveries `retry-now` looks at to say which it left held.
const HELD_SCAN: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum PendingCommand {
    /// List a target's pending deliveries, soonest due first.
    List {
        /// The target, as named in the configuration.
        #[arg(long)]
        target: String,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Make a target's backed-off deliveries due now; their retry schedules
    /// are kept.
    RetryNow {
        /// The target, as named in the configuration.
        #[arg(long)]
        target: String,
        /// Only this delivery.
        #[arg(long, value_name = "ID")]
        delivery: Option<i64>,
        /// Also send those the target asked (Retry-After) to hold.
        #[arg(long)]
        ignore_retry_after: bool,
    },
}

impl PendingCommand {
    fn target(&self) -> &str {
        match self {
            PendingCommand::List { target, .. } | PendingCommand::RetryNow { target, .. } => target,
        }
    }
}

/// Refuses a target the configuration does not have: its deliveries, if any,
/// are dead letters (`target_removed`), and a typo should not look like an
/// empty queue.
pub fn check_target(settings: &Settings, command: &PendingCommand) -> Result<(), CliError> {
    let target = command.target();
    if settings.targets.contains_key(target) {
        return Ok(());
    }
    let names: Vec<&str> = settings.targets.keys().map(String::as_str).collect();
    Err(CliError::Usage(format!(
        "no target {target:?} in the configuration (it has: {})",
        names.join(", ")
    )))
}

/// Runs one `pending` command; `now_ms` is when released deliveries become due.
pub async fn run(
    spool: &dyn Operator,
    command: &PendingCommand,
    now_ms: i64,
) -> Result<String, CliError> {
    let now_ms = UnixMs(now_ms);
    match command {
        PendingCommand::List { target, limit } => {
            let pending = spool.waiting(target, *limit).await.map_err(failed)?;
            Ok(table(target, &pending, *limit, now_ms))
        }
        PendingCommand::RetryNow {
            target,
            delivery,
            ignore_retry_after,
        } => retry_now(spool, target, *delivery, *ignore_retry_after, now_ms).await,
    }
}

async fn retry_now(
    spool: &dyn Operator,
    target: &str,
    delivery: Option<i64>,
    ignore_retry_after: bool,
    now_ms: UnixMs,
) -> Result<String, CliError> {
    let delivery = delivery.map(DeliveryId);
    let release = Release {
        target: target.to_owned(),
        delivery_id: delivery,
        past_retry_after: ignore_retry_after,
    };
    let released = spool.release(release, now_ms).await.map_err(failed)?;
    let waiting = spool.waiting(target, HELD_SCAN).await.map_err(failed)?;
    let selected = |p: &&WaitingDelivery| delivery.is_none_or(|id| p.delivery_id == id);
    if let Some(id) = delivery {
        if !waiting.iter().any(|p| p.delivery_id == id) && waiting.len() < HELD_SCAN {
            return Err(CliError::Failed(format!(
                "no pending delivery {id} of target {target:?} (delivered, dead-lettered, or another target's)"
            )));
        }
    }
    let mut out = match released {
        0 => format!("no delivery of {target} was made due now\n"),
        n => format!(
            "{n} {} of {target} {} due now; the relay's workers send {} within a second. \
             Retry schedules are kept: one that fails again waits for its scheduled time.\n",
            plural(n, "delivery", "deliveries"),
            plural(n, "is", "are"),
            plural(n, "it", "them"),
        ),
    };
    let held: Vec<&WaitingDelivery> = waiting
        .iter()
        .filter(selected)
        .filter(|p| p.not_before > now_ms)
        .collect();
    if !held.is_empty() && !ignore_retry_after {
        let until = held.iter().map(|p| p.not_before).max().unwrap_or(now_ms);
        let _ = writeln!(
            out,
            "{} held by the target's Retry-After (the last until {}) {} left; \
             --ignore-retry-after sends {} too.",
            held.len(),
            rfc3339(until),
            plural(held.len() as u64, "was", "were"),
            plural(held.len() as u64, "it", "them"),
        );
    }
    let untried = waiting
        .iter()
        .filter(selected)
        .filter(|p| p.attempts == 0 && p.next_at > now_ms)
        .count();
    if untried > 0 {
        let _ = writeln!(
            out,
            "{untried} not tried yet {} left: {} due within seconds (a reply target's delivery \
             waits for its inline attempt).",
            plural(untried as u64, "was", "were"),
            plural(untried as u64, "it is", "they are"),
        );
    }
    Ok(out)
}

/// The list as a table with aligned columns.
fn table(target: &str, pending: &[WaitingDelivery], limit: usize, now_ms: UnixMs) -> String {
    if pending.is_empty() {
        return format!("no delivery of {target} is pending\n");
    }
    let header = [
        "ID",
        "EVENT",
        "ATTEMPTS",
        "STEP",
        "DUE",
        "SCHEDULED",
        "HELD UNTIL",
        "LAST ERROR",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 8]> = std::iter::once(header)
        .chain(pending.iter().map(|p| {
            [
                p.delivery_id.to_string(),
                p.event_id.to_string(),
                p.attempts.to_string(),
                p.schedule.step.to_string(),
                if p.next_at <= now_ms {
                    "now".to_owned()
                } else {
                    rfc3339(p.next_at)
                },
                rfc3339(p.schedule.due_at),
                if p.not_before > now_ms {
                    rfc3339(p.not_before)
                } else {
                    "-".to_owned()
                },
                clip(&p.last_error, ERROR_WIDTH),
            ]
        }))
        .collect();
    listing(&rows, limit, ("pending delivery", "pending deliveries"))
}
