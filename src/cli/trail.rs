//! `wxrelay trail`: what became of a push, found by its OpenID, MsgId,
//! scene, event id, target, outcome or time, newest first; and
//! `wxrelay trail redeliver`, which sends a retained event to a target again.
//!
//! The filters are the admin API's and the pages' ([`crate::trail::parse_filter`]).
//! OpenIDs are shown masked; the trail holds no message content.

use super::CliError;
use crate::config::Settings;
use crate::spool::{EventId, OpenSpool, SpoolError, TrailLog, UnixMs};
use crate::trail::{escape_controls as shown, parse_filter, TrailEvent, TrailFilter};
use std::fmt::Write as _;

/// The search's filters, as the admin API names them.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TrailArgs {
    /// The sender's full OpenID (it is hashed before the search; output shows it masked).
    #[arg(long)]
    pub openid: Option<String>,
    #[arg(long)]
    pub msg_id: Option<String>,
    /// The EventKey: a QR code's scene.
    #[arg(long)]
    pub scene: Option<String>,
    /// The spool's event id.
    #[arg(long)]
    pub event_id: Option<String>,
    /// Events with a delivery to this target.
    #[arg(long)]
    pub target: Option<String>,
    /// delivered, pending, dead or refused.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Received at or after TIME: RFC 3339 (2024-05-29T08:00:00Z) or a time ago (2h, 30m).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Received before TIME (as --since).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Show at most this many (newest first).
    #[arg(long, default_value_t = crate::trail::DEFAULT_LIMIT)]
    pub limit: usize,
    /// One JSON object per line, with its `attempts` and `ends` arrays.
    #[arg(long)]
    pub json: bool,
}

impl TrailArgs {
    /// The filter, checked as the admin API checks its query.
    pub fn filter(&self, now: UnixMs) -> Result<TrailFilter, CliError> {
        let limit = self.limit.to_string();
        let pairs = [
            ("openid", self.openid.as_deref()),
            ("msg_id", self.msg_id.as_deref()),
            ("scene", self.scene.as_deref()),
            ("event_id", self.event_id.as_deref()),
            ("target", self.target.as_deref()),
            ("outcome", self.outcome.as_deref()),
            ("since", self.since.as_deref()),
            ("until", self.until.as_deref()),
            ("limit", Some(limit.as_str())),
        ];
        let given = pairs.into_iter().filter_map(|(k, v)| Some((k, v?)));
        parse_filter(given, now).map_err(|e| CliError::Usage(format!("--{}", e.replace('_', "-"))))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum TrailCommand {
    /// Send a retained event to a target again, as a new delivery (a
    /// delivered event only when its body was kept: [trail] keep_bodies).
    Redeliver {
        /// The spool's event id (`wxrelay trail` shows it).
        event_id: i64,
        /// The configured target to send it to.
        #[arg(long)]
        target: String,
    },
}

/// Turns the configured trail on for this process, or says it is off.
pub async fn start(spool: &OpenSpool, settings: &Settings) -> Result<(), CliError> {
    if !settings.trail.enabled {
        return Err(CliError::Usage(
            "the trail is off in this configuration ([trail] enabled = false)".into(),
        ));
    }
    spool
        .start_trail(settings.trail.setup())
        .await
        .map_err(failed)
}

/// Runs the search, reading at most `scan` trail rows, and prints its events.
pub async fn search(
    trail: &dyn TrailLog,
    args: &TrailArgs,
    (now, scan): (UnixMs, usize),
) -> Result<String, CliError> {
    let mut filter = args.filter(now)?;
    filter.scan = scan;
    let found = trail.find(filter.clone()).await.map_err(failed)?;
    let note = found.cut_short_note(&filter);
    let found = found.events;
    if args.json {
        // The lines stay JSON: the note goes to the terminal.
        if let Some(note) = &note {
            eprintln!("wxrelay trail: {note}");
        }
        let mut out = String::new();
        for event in &found {
            let line = serde_json::to_string(event).map_err(|e| CliError::Failed(e.to_string()))?;
            out.push_str(&line);
            out.push('\n');
        }
        return Ok(out);
    }
    let note = note.map(|n| format!("\nnote: {n}\n")).unwrap_or_default();
    if found.is_empty() {
        return Ok(format!("no event in the trail matches\n{note}"));
    }
    let blocks = found.iter().map(block).collect::<Vec<_>>().join("\n");
    Ok(format!("{blocks}{note}"))
}

/// Redelivers an event to a configured target.
pub async fn redeliver(
    trail: &dyn TrailLog,
    settings: &Settings,
    (event_id, target): (i64, &str),
    now: UnixMs,
) -> Result<String, CliError> {
    if !settings.targets.contains_key(target) {
        let names: Vec<&str> = settings.targets.keys().map(String::as_str).collect();
        return Err(CliError::Usage(format!(
            "no target {target:?} in the configuration (it has: {})",
            names.join(", ")
        )));
    }
    match trail
        .redeliver(EventId(event_id), target.to_owned(), now)
        .await
    {
        Ok(id) => Ok(format!(
            "event {event_id} is due again at {target} as delivery {id}; the relay's workers send it within a second\n"
        )),
        Err(SpoolError::Refused(why)) => Err(CliError::Usage(why)),
        Err(e) => Err(failed(e)),
    }
}

fn failed(e: SpoolError) -> CliError {
    CliError::Failed(crate::error_chain(&e))
}

fn time(at: UnixMs) -> String {
    humantime::format_rfc3339_millis(at.to_system_time()).to_string()
}

/// One event and its timeline, as a block of lines. What a push or a
/// target sent is printed with its control characters escaped, so that a
/// push cannot write a terminal's escape sequences or lines of its own.
pub fn block(e: &TrailEvent) -> String {
    let mut out = String::new();
    let id = e
        .event_id
        .map_or_else(|| format!("trail {}", e.id), |id| format!("event {id}"));
    let _ = writeln!(
        out,
        "{id}  {}  {}  {}",
        time(e.received_at),
        shown(&e.account),
        e.outcome.as_str()
    );
    if let Some(r) = &e.refusal {
        let (reason, source) = (shown(&r.reason), shown(&r.source));
        let _ = writeln!(out, "  refused     {reason} (from {source})");
        return out;
    }
    let kind = match (&e.msg_type, &e.event) {
        (Some(t), Some(ev)) if t == "event" => format!("event/{ev}"),
        (Some(t), _) => t.clone(),
        (None, _) => "-".into(),
    };
    let kind = shown(&kind);
    let dedup = match e.dedup {
        crate::trail::Dedup::New => "new",
        crate::trail::Dedup::Duplicate => "duplicate",
    };
    let or_dash = |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), shown);
    let _ = writeln!(
        out,
        "  push        {kind}  scene={}  msg_id={}  openid={}  mode={}  ticket={}  {dedup}",
        or_dash(&e.scene),
        or_dash(&e.msg_id),
        or_dash(&e.openid),
        shown(&e.mode),
        if e.ticket { "yes" } else { "no" },
    );
    let route = if e.route.is_empty() {
        "(unrouted)".to_owned()
    } else {
        shown(&e.route.join(", "))
    };
    let _ = writeln!(out, "  route       {route}");
    if let Some(r) = &e.reply {
        let _ = writeln!(
            out,
            "  reply       {} in {} ms (budget {} ms)",
            r.outcome.as_str(),
            r.latency_ms,
            r.budget_ms
        );
    }
    timeline(&mut out, e);
    out
}

/// The attempts and ends, in time order.
fn timeline(out: &mut String, e: &TrailEvent) {
    let mut lines: Vec<(UnixMs, usize, String)> = Vec::new();
    for (i, a) in e.attempts.iter().enumerate() {
        let answer = match (a.status, &a.error) {
            (Some(status), _) => format!("HTTP {status}"),
            (None, Some(error)) => shown(error),
            (None, None) => "-".into(),
        };
        let how = if a.inline { "inline" } else { "worker" };
        let mut line = format!(
            "{}  attempt {} {how}  {answer}  {} ms  circuit {}",
            shown(&a.target),
            a.attempt,
            a.latency_ms,
            shown(&a.circuit)
        );
        if !a.response.is_empty() {
            let _ = write!(line, "  \"{}\"", shown(&a.response));
        }
        lines.push((a.at, i, line));
    }
    for (i, end) in e.ends.iter().enumerate() {
        let target = if end.target.is_empty() {
            "-".to_owned()
        } else {
            shown(&end.target)
        };
        let reason = end
            .reason
            .as_ref()
            .map(|r| format!(" ({})", shown(r)))
            .unwrap_or_default();
        lines.push((
            end.at,
            e.attempts.len() + i,
            format!("{target}  {}{reason}", shown(&end.end)),
        ));
    }
    lines.sort_by_key(|(at, i, _)| (*at, *i));
    for (at, _, line) in lines {
        let _ = writeln!(out, "  {}  {line}", time(at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::{Dedup, TrailAttempt, TrailEnd, TrailOutcome, TrailRefusal};

    fn pushed(hostile: &str) -> TrailEvent {
        let text = |s: &str| Some(format!("{s}{hostile}"));
        TrailEvent {
            id: 1,
            event_id: Some(EventId(7)),
            received_at: UnixMs(1_700_000_000_000),
            account: "secure".into(),
            mode: "secure".into(),
            msg_type: text("event"),
            event: text("SCAN"),
            scene: text("qrscene_1"),
            msg_id: text("4242"),
            ticket: true,
            openid: text("oAbc…"),
            dedup: Dedup::New,
            route: vec!["hooks".into()],
            reply: None,
            refusal: None,
            body_kept: false,
            outcome: TrailOutcome::Dead,
            attempts: vec![TrailAttempt {
                at: UnixMs(1_700_000_000_100),
                target: "hooks".into(),
                attempt: 1,
                inline: false,
                status: None,
                error: text("connect"),
                latency_ms: 3,
                response: String::new(),
                circuit: "closed".into(),
            }],
            ends: vec![TrailEnd {
                at: UnixMs(1_700_000_000_200),
                target: "hooks".into(),
                end: "dead".into(),
                reason: text("http_4xx"),
            }],
        }
    }

    /// What a push carries reaches the operator's terminal escaped: no
    /// escape sequence, carriage return or line of its own.
    #[test]
    fn a_pushs_fields_are_printed_with_control_characters_escaped() {
        let hostile = "\u{1b}]0;owned\u{7}\r\n\u{1b}[2J";
        let mut refused = pushed(hostile);
        refused.refusal = Some(TrailRefusal {
            reason: format!("bad signature{hostile}"),
            source: "127.0.0.1".into(),
        });
        for event in [pushed(hostile), refused] {
            let out = block(&event);
            assert!(!out.contains('\u{1b}'), "{out:?}");
            assert!(!out.contains('\u{7}'), "{out:?}");
            assert!(!out.contains('\r'), "{out:?}");
            assert!(out.contains("\\u{1b}"), "{out:?}");
            // Each line is one of the block's own.
            assert!(out.lines().all(|l| !l.starts_with('\u{1b}')), "{out:?}");
        }
        assert!(block(&pushed(hostile)).contains("scene=qrscene_1\\u{1b}]0;owned"));
    }
}
