//! `wxrelay dlq`: the dead letters in the spool file — list, show, replay,
//! purge.
//!
//! It opens the configured spool file itself, which is safe while the relay
//! runs (SQLite in WAL mode, with a busy timeout): replayed deliveries become
//! due at once and the running relay's workers send them within a second.
//!
//! Dead letters hold people's messages, so nothing here prints an OpenID or
//! message content unless the operator asks (`show --content`): the dedup key
//! appears as its short hash, as in the relay's logs. Replay and purge act on
//! every dead letter their filter selects, so they refuse to run without a
//! filter unless `--all` says that is meant.

use super::CliError;
use crate::config::{Settings, SpoolBackend};
use crate::ingest::short_hash;
use crate::spool::postgres::OnOpen;
use crate::spool::{
    DeadFilter, DeadLateReply, DeadLetter, DeadReason, DeliveryId, LateReplies, OpenSpool,
    Operator, SpoolError, UnixMs,
};
use crate::wechat::message::Message;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How much of a last error fits in a table row.
pub(super) const ERROR_WIDTH: usize = 60;

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        select: Selection,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter in detail.
    Show {
        #[arg(long)]
        id: i64,
        /// Also print the decrypted message XML (it holds the user's OpenID and message).
        #[arg(long)]
        content: bool,
    },
    /// Make the selected dead letters due again, with their attempts reset.
    Replay {
        #[command(flatten)]
        select: Selection,
        /// Replay every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
        /// Also replay expired deliveries: they waited longer than their
        /// target's max_age, and sent now they arrive that late.
        #[arg(long)]
        force: bool,
    },
    /// Delete the selected dead letters (with `--all`, the late replies that
    /// could not be sent too).
    Purge {
        #[command(flatten)]
        select: Selection,
        /// Purge every dead letter (needed when no filter is given).
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters a command acts on; every option narrows the selection.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct Selection {
    /// Only this target's.
    #[arg(long)]
    pub target: Option<String>,
    /// Only this reason: rejected, exhausted, unrouted, target_removed or expired.
    #[arg(long)]
    pub reason: Option<DeadReason>,
    /// Dead-lettered at or after TIME: RFC 3339 (2024-05-29T08:00:00Z) or a time ago (2h, 30m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<When>,
    /// Dead-lettered before TIME (as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<When>,
    /// Only the dead letter with this id.
    #[arg(long)]
    pub id: Option<i64>,
}

impl Selection {
    fn is_everything(&self) -> bool {
        *self == Selection::default()
    }

    fn filter(&self, now_ms: i64) -> DeadFilter {
        DeadFilter {
            target: self.target.clone(),
            reason: self.reason,
            since: self.since.map(|w| UnixMs(w.at_ms(now_ms))),
            until: self.until.map(|w| UnixMs(w.at_ms(now_ms))),
            delivery_id: self.id.map(DeliveryId),
        }
    }
}

/// A point in time on the command line: absolute, or a duration before now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    At(SystemTime),
    Ago(Duration),
}

impl When {
    fn at_ms(self, now_ms: i64) -> i64 {
        match self {
            When::At(t) => t
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            When::Ago(d) => now_ms.saturating_sub(d.as_millis() as i64),
        }
    }
}

impl FromStr for When {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(s)
            .map(When::At)
            .or_else(|_| humantime::parse_duration(s).map(When::Ago))
            .map_err(|_| {
                format!("{s:?} is neither RFC 3339 (2024-05-29T08:00:00Z) nor a duration (2h, 30m)")
            })
    }
}

/// Opens the configured spool. Refuses to create a SQLite file, since a
/// missing file means a wrong config or a relay that never ran; a PostgreSQL
/// schema must be at this binary's version and is never changed.
pub async fn open(settings: &Settings) -> Result<OpenSpool, CliError> {
    if let SpoolBackend::Sqlite { path } = &settings.spool.backend {
        if !path.exists() {
            return Err(CliError::Failed(format!(
                "no spool at {}: has the relay run with this configuration?",
                path.display()
            )));
        }
    }
    OpenSpool::open(&settings.spool, OnOpen::RequireCurrent)
        .await
        .map_err(failed)
}

/// Runs one `dlq` command; `now_ms` resolves `--since 2h` and is when
/// replayed deliveries become due.
pub async fn run(
    (spool, late): (&dyn Operator, &dyn LateReplies),
    command: &DlqCommand,
    now_ms: i64,
) -> Result<String, CliError> {
    match command {
        DlqCommand::List { select, limit } => list((spool, late), select, *limit, now_ms).await,
        DlqCommand::Show { id, content } => show(spool, *id, *content).await,
        DlqCommand::Replay { select, all, force } => {
            guard("replay", select, *all)?;
            let filter = select.filter(now_ms);
            let expired = count_reason(spool, &filter, DeadReason::Expired).await?;
            if expired > 0 && !force {
                return Err(CliError::Usage(format!(
                    "refusing to replay {expired} expired {}: {} waited longer than the target's \
                     max_age, and a login event sent that late is noise at best and a surprise \
                     login at worst. Say --force to send {} anyway, or narrow the selection \
                     (e.g. --reason exhausted).",
                    plural(expired, "delivery", "deliveries"),
                    plural(expired, "it", "they"),
                    plural(expired, "it", "them"),
                )));
            }
            let unrouted = count_reason(spool, &filter, DeadReason::Unrouted).await?;
            let replayed = spool.replay(filter, UnixMs(now_ms)).await.map_err(failed)?;
            let mut out = match replayed {
                0 => "no delivery was made due again\n".to_owned(),
                n => format!(
                    "{n} {} due again; the relay's workers send {} within a second\n",
                    plural(n, "delivery is", "deliveries are"),
                    plural(n, "it", "them"),
                ),
            };
            if unrouted > 0 {
                let _ = writeln!(
                    out,
                    "{unrouted} unrouted {} cannot be replayed: no target was chosen for {}. \
                     Fix the routes for new pushes; `dlq purge --reason unrouted` removes these.",
                    plural(unrouted, "event", "events"),
                    plural(unrouted, "it", "them"),
                );
            }
            Ok(out)
        }
        DlqCommand::Purge { select, all } => {
            guard("purge", select, *all)?;
            let purged = spool.purge(select.filter(now_ms)).await.map_err(failed)?;
            let mut out = format!(
                "{purged} dead {} deleted\n",
                plural(purged, "letter", "letters")
            );
            if select.is_everything() {
                let late = purge_late(late, now_ms).await?;
                let replies = plural(late, "late reply", "late replies");
                let _ = writeln!(out, "{late} {replies} deleted");
            }
            Ok(out)
        }
    }
}

/// The selected dead letters; and, unfiltered, the late replies that could
/// not be sent (they are no deliveries: no target, reason or event).
async fn list(
    (spool, late): (&dyn Operator, &dyn LateReplies),
    select: &Selection,
    limit: usize,
    now_ms: i64,
) -> Result<String, CliError> {
    let dead = spool
        .dead_letters(select.filter(now_ms), limit)
        .await
        .map_err(failed)?;
    let mut out = table(&dead, limit);
    if select.is_everything() {
        let letters = late.dead_late(limit).await.map_err(failed)?;
        if !letters.is_empty() {
            out.push('\n');
            out.push_str(&late_table(&letters, limit));
        }
    }
    Ok(out)
}

/// Every late reply that is over (dead, or untaken and expired), as with
/// `list`, unfiltered: they are no deliveries, with no target or reason.
async fn purge_late(late: &dyn LateReplies, now_ms: i64) -> Result<u64, CliError> {
    const BATCH: usize = 500;
    let mut purged = 0;
    loop {
        let n = late
            .prune_late(UnixMs(now_ms), BATCH)
            .await
            .map_err(failed)?;
        purged += n;
        if n < BATCH as u64 {
            return Ok(purged);
        }
    }
}

/// Replay and purge act on everything selected; an empty selection must be
/// asked for by name.
fn guard(verb: &str, select: &Selection, all: bool) -> Result<(), CliError> {
    if select.is_everything() && !all {
        return Err(CliError::Usage(format!(
            "refusing to {verb} every dead letter: select some with --target, --reason, \
             --since, --until or --id, or say --all"
        )));
    }
    Ok(())
}

/// How many of the selected dead letters have `reason`. Unrouted ones have
/// no target, so a selection by target has none.
async fn count_reason(
    spool: &dyn Operator,
    filter: &DeadFilter,
    reason: DeadReason,
) -> Result<u64, CliError> {
    let no_target = reason == DeadReason::Unrouted && filter.target.is_some();
    if no_target || filter.reason.is_some_and(|r| r != reason) {
        return Ok(0);
    }
    let selected = DeadFilter {
        reason: Some(reason),
        ..filter.clone()
    };
    let found = spool
        .dead_letters(selected, usize::MAX)
        .await
        .map_err(failed)?;
    Ok(found.len() as u64)
}

async fn show(spool: &dyn Operator, id: i64, content: bool) -> Result<String, CliError> {
    let filter = DeadFilter {
        delivery_id: Some(DeliveryId(id)),
        ..DeadFilter::default()
    };
    let dead = spool.dead_letters(filter, 1).await.map_err(failed)?;
    let d = dead
        .first()
        .ok_or_else(|| CliError::Failed(format!("no dead letter with id {id}")))?;
    let mut out = String::new();
    let mut row = |key: &str, value: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{key:<15}{value}");
    };
    row("id", &d.delivery_id);
    row("target", &d.target.as_deref().unwrap_or("- (unrouted)"));
    row("reason", &d.reason);
    row("attempts", &d.attempts);
    row("last error", &d.last_error);
    row("dead at", &rfc3339(d.dead_at));
    row("received at", &rfc3339(d.received_at));
    row("account", &d.account);
    row("type", &kind(d));
    row("key", &short_hash(&d.dedup_key));
    row("event id", &d.event_id);
    let event = spool.event(d.event_id).await.map_err(failed)?;
    let Some(event) = event else {
        row("fields", &"(the event is no longer in the spool)");
        return Ok(out);
    };
    let names = Message::parse(event.xml.as_bytes()).map(|m| {
        let names: Vec<String> = m.fields.into_iter().map(|(name, _)| name).collect();
        names.join(", ")
    });
    match names {
        Ok(names) => row("fields", &names),
        Err(e) => row("fields", &format!("(the stored XML does not parse: {e})")),
    }
    if content {
        let _ = writeln!(out, "\n{}", event.xml.trim_end());
    } else {
        let _ = writeln!(
            out,
            "\nThe message (with the sender's OpenID) is not shown; --content prints it."
        );
    }
    Ok(out)
}

/// The list as a table with aligned columns.
fn table(dead: &[DeadLetter], limit: usize) -> String {
    if dead.is_empty() {
        return "no dead letters match\n".to_owned();
    }
    let header = [
        "ID",
        "DEAD AT",
        "TARGET",
        "REASON",
        "ATTEMPTS",
        "ACCOUNT",
        "TYPE",
        "KEY",
        "LAST ERROR",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 9]> = std::iter::once(header)
        .chain(dead.iter().map(|d| {
            [
                d.delivery_id.to_string(),
                rfc3339(d.dead_at),
                d.target.clone().unwrap_or_else(|| "-".to_owned()),
                d.reason.to_string(),
                d.attempts.to_string(),
                d.account.clone(),
                kind(d),
                short_hash(&d.dedup_key),
                clip(&d.last_error, ERROR_WIDTH),
            ]
        }))
        .collect();
    listing(&rows, limit, ("dead letter", "dead letters"))
}

/// The late replies that could not be sent, with WeChat's errcode and
/// errmsg; the user as a hash of the OpenID.
fn late_table(dead: &[DeadLateReply], limit: usize) -> String {
    let header = [
        "LATE REPLY",
        "DEAD AT",
        "CHANNEL",
        "ERRCODE",
        "ATTEMPTS",
        "ACCOUNT",
        "USER",
        "ERRMSG",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 8]> = std::iter::once(header)
        .chain(dead.iter().map(|d| {
            [
                d.id.to_string(),
                rfc3339(d.dead_at),
                d.channel.clone(),
                d.errcode.to_string(),
                d.attempts.to_string(),
                d.account.clone(),
                short_hash(&d.openid),
                clip(&d.errmsg, ERROR_WIDTH),
            ]
        }))
        .collect();
    listing(
        &rows,
        limit,
        ("late reply not sent", "late replies not sent"),
    )
}

/// A table of `rows` (a header, then one a line), then how many lines there
/// are, by `noun` (one, many), and whether the limit cut the list.
pub(super) fn listing<const N: usize>(
    rows: &[[String; N]],
    limit: usize,
    noun: (&str, &str),
) -> String {
    let mut out = aligned(rows);
    let shown = rows.len().saturating_sub(1);
    let _ = write!(out, "{shown} {}", if shown == 1 { noun.0 } else { noun.1 });
    if shown == limit {
        let _ = write!(out, " (the limit; --limit shows more)");
    }
    out.push('\n');
    out
}

/// Rows as lines of left-aligned columns, two spaces apart.
fn aligned<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// `event/SCAN` or `text`, as the relay's logs name pushes.
fn kind(d: &DeadLetter) -> String {
    match &d.event_type {
        Some(event) => format!("event/{event}"),
        None => d.msg_type.clone(),
    }
}

pub(super) fn rfc3339(at: UnixMs) -> String {
    humantime::format_rfc3339_seconds(at.to_system_time()).to_string()
}

/// One line of at most `max` characters.
pub(super) fn clip(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let kept: String = flat.chars().take(max - 1).collect();
    format!("{kept}…")
}

pub(super) fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

pub(super) fn failed(e: SpoolError) -> CliError {
    CliError::Failed(crate::error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = 1_717_000_000_000;
        let at = |s: &str| s.parse::<When>().unwrap().at_ms(now);
        assert_eq!(at("2h"), now - 7_200_000);
        assert_eq!(at("30m"), now - 1_800_000);
        assert_eq!(at("2024-05-29T16:26:40Z"), now);
        assert_eq!(at("2024-05-29 16:26:40"), now);
        assert!("yesterday".parse::<When>().is_err());
    }

    #[test]
    fn clip_keeps_one_line_within_the_width() {
        assert_eq!(clip("HTTP 400: bad\nthing", 60), "HTTP 400: bad thing");
        let long = "é".repeat(100);
        let clipped = clip(&long, 60);
        assert_eq!(clipped.chars().count(), 60);
        assert!(clipped.ends_with('…'));
    }

    #[test]
    fn an_unknown_reason_is_refused_with_the_known_ones() {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            select: Selection,
        }
        use clap::Parser as _;
        let parsed = Args::try_parse_from(["dlq", "--reason", "target_removed"]);
        assert_eq!(
            parsed.map(|a| a.select.reason).ok(),
            Some(Some(DeadReason::TargetRemoved))
        );
        let refused = Args::try_parse_from(["dlq", "--reason", "rejcted"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("unknown reason \"rejcted\""), "{refused}");
        assert!(
            refused.contains("rejected, exhausted, unrouted, target_removed"),
            "{refused}"
        );
    }

    #[test]
    fn replay_and_purge_need_a_filter_or_all() {
        assert!(guard("replay", &Selection::default(), false).is_err());
        assert!(guard("replay", &Selection::default(), true).is_ok());
        let some = Selection {
            reason: Some(DeadReason::Rejected),
            ..Selection::default()
        };
        assert!(guard("purge", &some, false).is_ok());
    }
}
