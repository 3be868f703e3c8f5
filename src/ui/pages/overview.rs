//! The overview: each target's circuit and backlog, the last hour's login
//! delivery latency and refusals, and the dead letters with a replay button.

use super::{action, layout, span, when, Chrome};
use crate::recent::Quantiles;
use crate::spool::{DeadFilter, DeadLetter, SpoolError, TargetDepth, UnixMs};
use crate::ui::Ui;
use maud::{html, Markup};

/// Dead letters listed, oldest first.
const DEAD_LISTED: usize = 50;
/// Spans of the latency chart over the hour: five minutes each.
const SLOTS: usize = 12;

/// One target's row.
struct TargetRow {
    name: String,
    circuit: &'static str,
    pending: u64,
    oldest_age_ms: Option<i64>,
}

pub(in crate::ui) async fn page(ui: &Ui, chrome: Chrome<'_>) -> Result<Markup, SpoolError> {
    let csrf = chrome.csrf.unwrap_or("");
    let now = ui.clock.now_ms();
    let depth = ui.health.depth().await?;
    let dead = ui
        .operator
        .dead_letters(DeadFilter::default(), DEAD_LISTED)
        .await?;
    let rows = target_rows(ui, &depth, now);
    let (spans, hour) = ui.metrics.recent.login_latency(now, SLOTS);
    let refusals = ui.metrics.recent.refusals(now);
    Ok(layout(
        "Overview",
        chrome,
        html! {
            h1 { "Overview" }
            section.card { h2 { "Targets" } (targets(&rows)) }
            section.card {
                h2 { "Login delivery latency, last hour" }
                (latency(&spans, hour))
            }
            section.card { h2 { "Refused pushes, last hour" } (refused(&refusals)) }
            section.card { h2 { "Dead letters" } (dead_letters(&dead, csrf)) }
        },
    ))
}

fn target_rows(ui: &Ui, depth: &[TargetDepth], now: i64) -> Vec<TargetRow> {
    let config = ui.config.load();
    config
        .targets
        .keys()
        .map(|name| {
            let d = depth.iter().find(|d| &d.target == name);
            TargetRow {
                name: name.clone(),
                circuit: ui.dispatcher.circuit(name).as_str(),
                pending: d.map_or(0, |d| d.pending),
                oldest_age_ms: d.and_then(|d| d.oldest_received_at).map(|t| now - t.0),
            }
        })
        .collect()
}

fn targets(rows: &[TargetRow]) -> Markup {
    html! {
        div.scroll { table {
            thead { tr { th { "Target" } th { "Circuit" } th.num { "Pending" } th.num { "Oldest pending" } } }
            tbody {
                @for row in rows {
                    tr {
                        td { (row.name) }
                        td { span class={ "badge " (row.circuit) } { (row.circuit.replace('_', "-")) } }
                        td.num { (row.pending) }
                        td.num { (row.oldest_age_ms.map_or("–".into(), span)) }
                    }
                }
            }
        } }
    }
}

/// Seconds as the chart's labels show them.
fn seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s < 1.0 => format!("≤ {} ms", (s * 1000.0).round()),
        Some(s) => format!("≤ {s} s"),
        None => "over the top bucket".into(),
    }
}

/// The median and 95th percentile per five minutes, as an inline SVG.
fn latency(spans: &[Quantiles], hour: Quantiles) -> Markup {
    if hour.count == 0 {
        return html! { p.muted { "No login event was delivered in the last hour." } };
    }
    let top = spans
        .iter()
        .filter_map(|q| q.p95.or(q.p50))
        .fold(0.1_f64, f64::max);
    let (left, width, base, height) = (48.0, 536.0, 150.0, 126.0);
    let step = width / (spans.len().max(2) - 1) as f64;
    let point = |i: usize, v: Option<f64>| {
        let v = v.unwrap_or(top).min(top);
        (left + i as f64 * step, base - v / top * height)
    };
    let line = |pick: fn(&Quantiles) -> Option<f64>| -> String {
        spans
            .iter()
            .enumerate()
            .filter(|(_, q)| q.count > 0)
            .map(|(i, q)| point(i, pick(q)))
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (p50, p95) = (line(|q| q.p50), line(|q| q.p95));
    html! {
        p {
            "Median " strong { (seconds(hour.p50)) } ", 95th percentile " strong { (seconds(hour.p95)) }
            " over " (hour.count) @if hour.count == 1 { " delivery" } @else { " deliveries" } " (this replica)."
        }
        svg.chart viewBox="0 0 600 180" role="img" aria-label="Login delivery latency per five minutes" {
            line x1=(left) y1=(base) x2=(left + width) y2=(base) stroke="#c8ccd4" {}
            line x1=(left) y1=(base - height) x2=(left + width) y2=(base - height) stroke="#eceef2" {}
            text x="4" y=(base - height + 4.0) font-size="11" fill="#5b6270" { (format!("{top} s")) }
            text x="4" y=(base + 4.0) font-size="11" fill="#5b6270" { "0" }
            text x=(left) y="172" font-size="11" fill="#5b6270" { "60 min ago" }
            text x=(left + width) y="172" font-size="11" fill="#5b6270" text-anchor="end" { "now" }
            polyline points=(p95) fill="none" stroke="#d97706" stroke-width="2" {}
            polyline points=(p50) fill="none" stroke="#2563eb" stroke-width="2" {}
            @for (i, q) in spans.iter().enumerate().filter(|(_, q)| q.count > 0) {
                @let (x, y) = point(i, q.p95);
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="3" fill="#d97706" {}
                @let (x, y) = point(i, q.p50);
                circle cx=(format!("{x:.1}")) cy=(format!("{y:.1}")) r="3" fill="#2563eb" {}
            }
        }
        p.legend { span.key.p50 { "median" } span.key.p95 { "95th percentile" } }
    }
}

fn refused(refusals: &[(&'static str, u64)]) -> Markup {
    html! {
        @if refusals.is_empty() {
            p.muted { "None." }
        } @else {
            div.scroll { table {
                thead { tr { th { "Reason" } th.num { "Pushes" } } }
                tbody { @for (reason, n) in refusals { tr { td { (reason) } td.num { (n) } } } }
            } }
        }
    }
}

fn dead_letters(dead: &[DeadLetter], csrf: &str) -> Markup {
    html! {
        @if dead.is_empty() {
            p.muted { "None." }
        } @else {
            div.scroll { table {
                thead { tr {
                    th { "Delivery" } th { "Event" } th { "Target" } th { "Reason" }
                    th.num { "Attempts" } th { "Dead since" } th { "Last error" } th {}
                } }
                tbody { @for d in dead { (dead_row(d, csrf)) } }
            } }
        }
    }
}

fn dead_row(d: &DeadLetter, csrf: &str) -> Markup {
    let target = d.target.clone().unwrap_or_default();
    html! {
        tr {
            td { (d.delivery_id) }
            td { a href={ "/ui/event/" (d.event_id) } { (d.event_id) } }
            td { @if target.is_empty() { span.muted { "none" } } @else { (target) } }
            td { (d.reason) }
            td.num { (d.attempts) }
            td.nowrap { (when(UnixMs(d.dead_at.0))) }
            td.error { (d.last_error) }
            td { @if d.target.is_some() {
                (action("/ui/replay", csrf, &[
                    ("delivery_id", d.delivery_id.to_string()),
                    ("target", target.clone()),
                    ("back", "/ui".into()),
                ], "Replay"))
            } }
        }
    }
}
