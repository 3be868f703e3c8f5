//! Searching the trail: by OpenID, MsgId, scene, time range and outcome;
//! the results a table, newest first, OpenIDs masked.
//!
//! The form is posted, so that an OpenID typed into it stays out of the
//! address bar, the browser's history and a proxy's access log; and it is
//! not written back into the page either: the field shows it masked. The
//! same search also answers `GET /ui/search?…`, for a link.

use super::{layout, when, Chrome};
use crate::spool::UnixMs;
use crate::trail::{parse_filter, TrailEvent, TrailOutcome};
use crate::ui::{PageError, Refusal, Ui};
use http::StatusCode;
use maud::{html, Markup};

/// What the form was filled with, shown again above the results.
#[derive(Debug, Default)]
pub(in crate::ui) struct Asked {
    /// The OpenID searched, masked.
    pub openid: String,
    pub msg_id: String,
    pub scene: String,
    pub since: String,
    pub until: String,
    pub outcome: String,
}

impl Asked {
    pub(in crate::ui) fn of(query: &[(String, String)]) -> Self {
        let get = |name: &str| {
            query
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default()
        };
        Asked {
            openid: crate::trail::mask(&get("openid")),
            msg_id: get("msg_id"),
            scene: get("scene"),
            since: get("since"),
            until: get("until"),
            outcome: get("outcome"),
        }
    }
}

/// A search's results, and the note when it stopped at its cap of rows read.
pub(in crate::ui) struct Shown {
    pub events: Vec<TrailEvent>,
    pub note: Option<String>,
}

/// The search page: the form, then the results, or why there are none.
pub(in crate::ui) fn page(
    chrome: Chrome<'_>,
    asked: &Asked,
    found: Result<Option<Shown>, String>,
) -> Markup {
    layout(
        "Search",
        chrome,
        html! {
            h1 { "Search the trail" }
            section.card { (form(asked, chrome.csrf.unwrap_or(""))) }
            @match found {
                Err(problem) => section.card { p.problem { (problem) } },
                Ok(None) => {},
                Ok(Some(shown)) => section.card {
                    @if let Some(note) = &shown.note { p.problem { (note) } }
                    (results(&shown.events))
                },
            }
        },
    )
}

fn form(asked: &Asked, csrf: &str) -> Markup {
    let field = |name: &str, label: &str, value: &str, hint: &str| {
        html! {
            div {
                label for=(name) { (label) }
                input id=(name) name=(name) value=(value) placeholder=(hint) autocomplete="off";
            }
        }
    };
    html! {
        form method="post" action="/ui/search" {
            input type="hidden" name="csrf" value=(csrf);
            div.fields {
                div {
                    label for="openid" { "OpenID" }
                    @let hint = if asked.openid.is_empty() { "the full OpenID".to_owned() } else { format!("searched {}", asked.openid) };
                    input #openid name="openid" placeholder=(hint) autocomplete="off";
                }
                (field("msg_id", "MsgId", &asked.msg_id, ""))
                (field("scene", "Scene (EventKey)", &asked.scene, "qrscene_…"))
                (field("since", "Since", &asked.since, "2h, or RFC 3339"))
                (field("until", "Until", &asked.until, "30m, or RFC 3339"))
                div {
                    label for="outcome" { "Outcome" }
                    select #outcome name="outcome" {
                        option value="" { "any" }
                        @for o in TrailOutcome::ALL {
                            option value=(o.as_str()) selected[asked.outcome == o.as_str()] { (o.as_str()) }
                        }
                    }
                }
            }
            button type="submit" { "Search" }
        }
    }
}

fn results(events: &[TrailEvent]) -> Markup {
    html! {
        @if events.is_empty() {
            p.muted { "No push matches." }
        } @else {
            p.muted { (events.len()) " found, newest first." }
            div.scroll { table {
                thead { tr {
                    th { "Received" } th { "Account" } th { "Type" } th { "Scene" }
                    th { "OpenID" } th { "MsgId" } th { "Outcome" } th.num { "Attempts" }
                } }
                tbody { @for e in events { (row(e)) } }
            } }
        }
    }
}

fn row(e: &TrailEvent) -> Markup {
    let kind = match (&e.msg_type, &e.event) {
        (Some(t), Some(ev)) => format!("{t} / {ev}"),
        (Some(t), None) => t.clone(),
        (None, _) => "–".into(),
    };
    html! {
        tr {
            td.nowrap {
                @match e.event_id {
                    Some(id) => a href={ "/ui/event/" (id) } { (when(e.received_at)) },
                    None => (when(e.received_at)),
                }
            }
            td { (e.account) }
            td { (kind) }
            td { (e.scene.as_deref().unwrap_or("–")) }
            td.mono { (e.openid.as_deref().unwrap_or("–")) }
            td.mono { (e.msg_id.as_deref().unwrap_or("–")) }
            td { (outcome(e)) }
            td.num { (e.attempts.len()) }
        }
    }
}

/// The outcome's badge: a refused push shows its reason, a duplicate says so.
pub(super) fn outcome(e: &TrailEvent) -> Markup {
    let name = e.outcome.as_str();
    html! {
        span class={ "badge " (name) } { (name) }
        @if let Some(r) = &e.refusal { " " span.muted { (r.reason) } }
        @if e.dedup == crate::trail::Dedup::Duplicate { " " span.badge.duplicate { "duplicate" } }
    }
}

/// Serves the search, asked by a link's query or the posted form (less its
/// CSRF token): the form alone until something is asked; a search it cannot
/// read answers 400 with the reason beside the form.
pub(in crate::ui) async fn show(
    ui: &Ui,
    asked: &[(String, String)],
    chrome: Chrome<'_>,
) -> Result<(StatusCode, Markup), PageError> {
    let pairs: Vec<&(String, String)> = asked.iter().filter(|(n, _)| n != "csrf").collect();
    let asked = Asked::of(asked);
    if pairs.iter().all(|(_, v)| v.trim().is_empty()) {
        return Ok((StatusCode::OK, page(chrome, &asked, Ok(None))));
    }
    if !ui.config.load().trail.enabled {
        let off = "The trail is off ([trail] enabled = false): no push is recorded to search.";
        return Ok((StatusCode::OK, page(chrome, &asked, Err(off.into()))));
    }
    let now = UnixMs(ui.clock.now_ms());
    let pairs = pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()));
    match parse_filter(pairs, now) {
        Err(problem) => {
            ui.count_refusal(Refusal::BadQuery, "/ui/search");
            Ok((StatusCode::BAD_REQUEST, page(chrome, &asked, Err(problem))))
        }
        Ok(mut filter) => {
            filter.scan = ui.config.load().trail.search_rows;
            let found = ui.trail.find(filter.clone()).await?;
            let note = found.cut_short_note(&filter);
            let shown = Shown {
                events: found.events,
                note,
            };
            Ok((StatusCode::OK, page(chrome, &asked, Ok(Some(shown)))))
        }
    }
}
