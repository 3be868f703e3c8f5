//! An event's page: what it was, and its timeline: received → verified →
//! routed → the reply against its budget → each attempt → how each delivery
//! ended, with a button to replay a dead letter and one to redeliver when
//! the body was kept.

use super::search::outcome;
use super::{action, layout, span, when, Chrome};
use crate::spool::{DeadFilter, DeliveryId, EventId, SpoolError, UnixMs};
use crate::trail::{Dedup, ReplyOutcome, TrailAttempt, TrailEnd, TrailEvent, TrailFilter};
use crate::ui::{PageError, Refusal, Ui};
use maud::{html, Markup};

/// What the page offers besides the event: its dead letters still in the
/// spool, by target, and the targets a redelivery may go to.
pub(in crate::ui) struct Offers {
    pub dead: Vec<(String, DeliveryId)>,
    pub targets: Vec<String>,
}

/// One step of the timeline.
struct Step {
    at: UnixMs,
    /// `ok`, `fail`, `warn` or empty: the dot's colour.
    class: &'static str,
    what: String,
    detail: String,
    /// A target's response, as the trail kept it.
    body: Option<String>,
    action: Option<Markup>,
}

pub(in crate::ui) fn page(chrome: Chrome<'_>, e: &TrailEvent, offers: &Offers) -> Markup {
    let csrf = chrome.csrf.unwrap_or("");
    let title = match e.event_id {
        Some(id) => format!("Event {id}"),
        None => format!("Push {}", e.id),
    };
    layout(
        &title,
        chrome,
        html! {
            h1 { (title) " " (outcome(e)) }
            section.card { h2 { "What it was" } (facts(e)) }
            section.card {
                h2 { "Timeline" }
                ol.timeline {
                    @for step in steps(e, offers, csrf) {
                        li class=(step.class) {
                            span.at { (when(step.at)) } " "
                            span.what { (step.what) }
                            @if !step.detail.is_empty() { div.detail { (step.detail) } }
                            @if let Some(body) = &step.body { div.body { (body) } }
                            @if let Some(action) = &step.action { div { (action) } }
                        }
                    }
                }
            }
            @if let (true, Some(id)) = (e.body_kept, e.event_id) {
                section.card { h2 { "Redeliver" } (redeliver(id, offers, csrf)) }
            }
        },
    )
}

fn facts(e: &TrailEvent) -> Markup {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "–".into());
    html! {
        dl.facts {
            dt { "Account" } dd { (e.account) }
            dt { "Mode" } dd { (e.mode) }
            dt { "Type" } dd { (or_dash(&e.msg_type)) @if let Some(ev) = &e.event { " / " (ev) } }
            dt { "Scene" } dd { (or_dash(&e.scene)) }
            dt { "MsgId" } dd.mono { (or_dash(&e.msg_id)) }
            dt { "OpenID" } dd.mono { (or_dash(&e.openid)) }
            dt { "Ticket" } dd { @if e.ticket { "present" } @else { "none" } }
            dt { "Body kept" } dd { @if e.body_kept { "yes" } @else { "no" } }
        }
    }
}

fn steps(e: &TrailEvent, offers: &Offers, csrf: &str) -> Vec<Step> {
    let mut steps = arrival(e);
    let mut later: Vec<Step> = e.attempts.iter().map(attempt).collect();
    later.extend(e.ends.iter().map(|end| ending(e, end, offers, csrf)));
    // Attempts before the ends they led to; the sort is stable.
    later.sort_by_key(|s| s.at);
    steps.extend(later);
    steps
}

fn step(at: UnixMs, class: &'static str, what: String, detail: String) -> Step {
    Step {
        at,
        class,
        what,
        detail,
        body: None,
        action: None,
    }
}

/// Received, then verified or refused, deduplicated, routed, answered.
fn arrival(e: &TrailEvent) -> Vec<Step> {
    let at = e.received_at;
    let mut steps = vec![step(at, "", "received".into(), String::new())];
    if let Some(r) = &e.refusal {
        let why = format!("reason: {} · from {}", r.reason, r.source);
        steps.push(step(at, "fail", "refused".into(), why));
        return steps;
    }
    steps.push(step(
        at,
        "ok",
        "verified".into(),
        format!("{} mode", e.mode),
    ));
    if e.dedup == Dedup::Duplicate {
        let why = "a re-send of a push already taken: answered, nothing stored".to_owned();
        steps.push(step(at, "warn", "duplicate".into(), why));
    } else if e.route.is_empty() {
        let why = "dead-lettered as unrouted".to_owned();
        steps.push(step(at, "fail", "matched no route".into(), why));
    } else {
        let to = format!("to {}", e.route.join(", "));
        steps.push(step(at, "", "routed".into(), to));
    }
    if let Some(reply) = &e.reply {
        let (class, said) = match reply.outcome {
            ReplyOutcome::None => ("ok", "answered success"),
            ReplyOutcome::Sealed => ("ok", "answered with the target's reply, sealed"),
            ReplyOutcome::Passed => ("ok", "answered with the target's reply"),
            ReplyOutcome::Unverifiable => ("warn", "target's reply unusable: answered success"),
            ReplyOutcome::TimedOut => ("warn", "no reply in time: answered success"),
            ReplyOutcome::Failed => ("warn", "reply target failed: answered success"),
            ReplyOutcome::Unknown => ("", "answered (a reply this version does not know)"),
        };
        let detail = format!(
            "{} of a {} budget",
            span(reply.latency_ms as i64),
            span(reply.budget_ms as i64)
        );
        steps.push(step(
            at + reply.latency_ms as i64,
            class,
            said.into(),
            detail,
        ));
    }
    steps
}

fn attempt(a: &TrailAttempt) -> Step {
    let answer = match (a.status, &a.error) {
        (Some(status), _) => format!("HTTP {status}"),
        (None, Some(error)) => error.clone(),
        (None, None) => "no answer".into(),
    };
    let ok = a.status.is_some_and(|s| (200..300).contains(&s));
    let by = if a.inline { "inline" } else { "worker" };
    let detail = format!(
        "attempt {} · {by} · {} · circuit {}",
        a.attempt,
        span(a.latency_ms as i64),
        a.circuit
    );
    Step {
        body: (!a.response.is_empty()).then(|| a.response.clone()),
        ..step(
            a.at,
            if ok { "ok" } else { "fail" },
            format!("{} → {answer}", a.target),
            detail,
        )
    }
}

fn ending(e: &TrailEvent, end: &TrailEnd, offers: &Offers, csrf: &str) -> Step {
    let class = if end.end == "delivered" { "ok" } else { "fail" };
    let detail = end.reason.clone().unwrap_or_default();
    // A dead letter replayed and dead again ended twice: the last end offers it.
    let last = e.ends.iter().rev().find(|x| x.target == end.target);
    let dead = offers
        .dead
        .iter()
        .find(|(t, _)| *t == end.target)
        .filter(|_| last.is_some_and(|last| std::ptr::eq(last, end)));
    let action = match (end.end.as_str(), dead, e.event_id) {
        ("dead" | "expired", Some((target, delivery)), Some(id)) => Some(action(
            "/ui/replay",
            csrf,
            &[
                ("delivery_id", delivery.to_string()),
                ("target", target.clone()),
                ("back", format!("/ui/event/{id}")),
            ],
            "Replay this dead letter",
        )),
        _ => None,
    };
    Step {
        action,
        ..step(
            end.at,
            class,
            format!("{}: {}", end.target, end.end),
            detail,
        )
    }
}

fn redeliver(id: EventId, offers: &Offers, csrf: &str) -> Markup {
    html! {
        p.muted { "Sends the kept body to a target again, as a new delivery." }
        form method="post" action="/ui/redeliver" {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="event_id" value=(id);
            input type="hidden" name="back" value={ "/ui/event/" (id) };
            label for="target" { "Target" }
            select #target name="target" {
                @for t in &offers.targets { option value=(t) { (t) } }
            }
            button type="submit" { "Redeliver" }
        }
    }
}

/// Serves an event's page, by its spool id.
pub(in crate::ui) async fn show(
    ui: &Ui,
    id: &str,
    chrome: Chrome<'_>,
) -> Result<Markup, PageError> {
    let id = id.parse().map(EventId).map_err(|_| Refusal::NotFound)?;
    let filter = TrailFilter {
        event_id: Some(id),
        limit: 1,
        ..Default::default()
    };
    let found = ui.trail.search(filter).await?.into_iter().next();
    let event = found.ok_or(Refusal::NotFound)?;
    let offers = Offers {
        dead: dead_letters(ui, &event).await?,
        targets: ui.config.load().targets.keys().cloned().collect(),
    };
    Ok(page(chrome, &event, &offers))
}

/// The event's deliveries still in the dead-letter table, by target: each
/// looked up around the time the trail says it ended.
async fn dead_letters(
    ui: &Ui,
    event: &TrailEvent,
) -> Result<Vec<(String, DeliveryId)>, SpoolError> {
    let mut dead = Vec::new();
    let Some(event_id) = event.event_id else {
        return Ok(dead);
    };
    for end in event.ends.iter().filter(|e| e.end != "delivered") {
        let filter = DeadFilter {
            target: Some(end.target.clone()),
            since: Some(UnixMs(end.at.0 - 1_000)),
            until: Some(end.at + 1_001),
            ..Default::default()
        };
        let letters = ui.operator.dead_letters(filter, 100).await?;
        if let Some(d) = letters.iter().find(|d| d.event_id == event_id) {
            dead.push((end.target.clone(), d.delivery_id));
        }
    }
    Ok(dead)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trail::TrailOutcome;

    fn end(at: i64, end: &str) -> TrailEnd {
        TrailEnd {
            at: UnixMs(at),
            target: "hooks".into(),
            end: end.into(),
            reason: Some("rejected".into()),
        }
    }

    fn event(ends: Vec<TrailEnd>) -> TrailEvent {
        TrailEvent {
            id: 1,
            event_id: Some(EventId(7)),
            received_at: UnixMs(1_000),
            account: "main".into(),
            mode: "secure".into(),
            msg_type: Some("event".into()),
            event: Some("SCAN".into()),
            scene: Some("<b>scene</b>".into()),
            msg_id: None,
            ticket: true,
            openid: Some("oAbc…xyz9".into()),
            dedup: Dedup::New,
            route: vec!["hooks".into()],
            reply: None,
            refusal: None,
            body_kept: false,
            outcome: TrailOutcome::Dead,
            attempts: Vec::new(),
            ends,
        }
    }

    #[test]
    fn only_the_last_end_of_a_target_offers_its_dead_letter() {
        let offers = Offers {
            dead: vec![("hooks".into(), DeliveryId(3))],
            targets: vec!["hooks".into()],
        };
        let chrome = Chrome {
            csrf: Some("token"),
            guarded: true,
        };
        let twice = event(vec![end(2_000, "dead"), end(9_000, "dead")]);
        let page = page(chrome, &twice, &offers).into_string();
        assert_eq!(page.matches("Replay this dead letter").count(), 1, "{page}");
        assert!(page.contains("&lt;b&gt;scene&lt;/b&gt;"), "{page}");
        let delivered = event(vec![end(2_000, "dead"), end(9_000, "delivered")]);
        let page = super::page(chrome, &delivered, &offers).into_string();
        assert!(!page.contains("Replay this dead letter"), "{page}");
    }
}
