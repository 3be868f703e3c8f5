//! The spans themselves: a push's, drawn before its commit and built once it
//! is answered, and an attempt's, drawn before it is sent and built once its
//! outcome is known. Their attributes are the relay's own facts about the
//! push (account, types, verdict, target, attempt, status, outcome): never a
//! secret, the ciphertext or the message's content, and the OpenID only
//! hashed.

use super::Telemetry;
use crate::spool::{DeliveryId, EventId};
use http::HeaderValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceState,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, SpanData, SpanEvents, SpanLinks};
use std::collections::HashMap;
use std::time::SystemTime;
use tokio::time::Instant;

/// The W3C header (and stored trace context) that names a span.
pub const TRACEPARENT: &str = "traceparent";

const EVENT_ID: &str = "wxrelay.event_id";
const ACCOUNT: &str = "wxrelay.account";
const TARGET: &str = "wxrelay.target";
const OUTCOME: &str = "wxrelay.outcome";

/// A push being traced: its span's place in the trace, drawn before its
/// event is stored (the event keeps it), and when its steps began and ended.
#[derive(Debug)]
pub struct PushTrace {
    span: SpanContext,
    started: Instant,
    verified: Instant,
    commit: Option<(Instant, Instant)>,
    reply: Option<(Instant, Instant)>,
    /// The sender's OpenID, hashed as the logs hash identifiers.
    openid_hash: Option<String>,
}

/// What the push's spans say about it, besides its times.
#[derive(Debug)]
pub struct PushFacts<'a> {
    pub event_id: EventId,
    pub account: &'a str,
    pub msg_type: &'a str,
    /// The `Event` of an event push, empty otherwise.
    pub event: &'a str,
    pub verdict: &'a str,
    /// The reply target, and what its answer gave WeChat.
    pub reply: Option<(&'a str, &'a str)>,
}

/// An attempt being traced: its span, the push's span it belongs to, and
/// the header that names it to the target.
#[derive(Debug)]
pub struct AttemptTrace {
    span: SpanContext,
    /// `None` for an event stored while traces were off: the attempt starts
    /// a trace of its own.
    parent: Option<SpanId>,
    started: Instant,
    header: Option<HeaderValue>,
}

/// What an attempt's span says about it, besides its times.
#[derive(Debug)]
pub struct AttemptFacts<'a> {
    pub event_id: EventId,
    pub delivery_id: DeliveryId,
    pub account: &'a str,
    pub target: &'a str,
    /// 1 for the first.
    pub attempt: u32,
    /// Made by the request path for WeChat's answer, not by a worker.
    pub inline: bool,
    pub status: Option<u16>,
    /// As counted: delivered, retried, dead_lettered.
    pub outcome: &'a str,
}

impl PushTrace {
    /// The W3C trace context its event is stored with.
    pub fn context(&self) -> String {
        traceparent(&self.span)
    }

    /// The spool commit ran from `from` until now.
    pub fn committed(&mut self, from: Instant) {
        self.commit = Some((from, Instant::now()));
    }

    /// The reply target's inline attempt and its judging ran from `from`
    /// until now.
    pub fn replied(&mut self, from: Instant) {
        self.reply = Some((from, Instant::now()));
    }
}

impl AttemptTrace {
    /// The `traceparent` the attempt's request carries.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }
}

impl Telemetry {
    /// A push verified now, whose request arrived at `started`, from `openid`.
    pub fn push(&self, started: Instant, openid: Option<&str>) -> PushTrace {
        PushTrace {
            span: self.context(self.ids.new_trace_id()),
            started,
            verified: Instant::now(),
            commit: None,
            reply: None,
            openid_hash: openid.map(crate::short_hash),
        }
    }

    /// Exports a stored push's span and its children, answered now.
    pub fn push_spans(&self, trace: PushTrace, facts: &PushFacts<'_>) {
        let dates = Dates::now();
        let id = KeyValue::new(EVENT_ID, facts.event_id.0);
        let mut attributes = vec![
            id.clone(),
            KeyValue::new(ACCOUNT, facts.account.to_owned()),
            KeyValue::new("wxrelay.msg_type", facts.msg_type.to_owned()),
            KeyValue::new("wxrelay.verdict", facts.verdict.to_owned()),
        ];
        if !facts.event.is_empty() {
            attributes.push(KeyValue::new("wxrelay.event", facts.event.to_owned()));
        }
        if let Some(hash) = &trace.openid_hash {
            attributes.push(KeyValue::new("wxrelay.openid_hash", hash.clone()));
        }
        let parent = trace.span.span_id();
        let child = |name: &'static str, (from, to): (Instant, Instant), more: Vec<KeyValue>| {
            let span = self.context(trace.span.trace_id());
            let attributes = [vec![id.clone()], more].concat();
            let times = (dates.of(from), dates.of(to));
            self.span(span, Some((parent, false)), name, times, attributes)
        };
        self.emit(child("verify", (trace.started, trace.verified), vec![]));
        if let Some(commit) = trace.commit {
            self.emit(child("spool.commit", commit, vec![]));
        }
        if let (Some(reply), Some((target, outcome))) = (trace.reply, facts.reply) {
            let more = vec![
                KeyValue::new(TARGET, target.to_owned()),
                KeyValue::new(OUTCOME, outcome.to_owned()),
            ];
            self.emit(child("reply", reply, more));
        }
        let times = (dates.of(trace.started), dates.now);
        let mut push = self.span(trace.span, None, "wechat.push", times, attributes);
        push.span_kind = SpanKind::Server;
        self.emit(push);
    }

    /// An attempt about to be sent, for the event stored with `push` (the
    /// push's trace context, if it had one).
    pub fn attempt(&self, push: Option<&str>) -> AttemptTrace {
        let parent = push.and_then(parse);
        let trace_id = parent
            .as_ref()
            .map_or_else(|| self.ids.new_trace_id(), SpanContext::trace_id);
        let span = self.context(trace_id);
        AttemptTrace {
            header: HeaderValue::from_str(&traceparent(&span)).ok(),
            span,
            parent: parent.map(|p| p.span_id()),
            started: Instant::now(),
        }
    }

    /// Exports an attempt's span, ended now.
    pub fn attempt_span(&self, trace: AttemptTrace, facts: &AttemptFacts<'_>) {
        let dates = Dates::now();
        let mut attributes = vec![
            KeyValue::new(EVENT_ID, facts.event_id.0),
            KeyValue::new("wxrelay.delivery_id", facts.delivery_id.0),
            KeyValue::new(ACCOUNT, facts.account.to_owned()),
            KeyValue::new(TARGET, facts.target.to_owned()),
            KeyValue::new("wxrelay.attempt", i64::from(facts.attempt)),
            KeyValue::new("wxrelay.inline", facts.inline),
            KeyValue::new(OUTCOME, facts.outcome.to_owned()),
        ];
        if let Some(status) = facts.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        let parent = trace.parent.map(|id| (id, true));
        let times = (dates.of(trace.started), dates.now);
        let mut span = self.span(trace.span, parent, "deliver.attempt", times, attributes);
        span.span_kind = SpanKind::Client;
        if facts.outcome != "delivered" {
            span.status = Status::error(facts.outcome.to_owned());
        }
        self.emit(span);
    }

    /// A new span's place in the trace `trace_id`, sampled.
    fn context(&self, trace_id: opentelemetry::trace::TraceId) -> SpanContext {
        let span_id = self.ids.new_span_id();
        SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        )
    }

    /// A finished internal span; `parent` with whether it is remote (read
    /// back from the spool rather than made here).
    fn span(
        &self,
        context: SpanContext,
        parent: Option<(SpanId, bool)>,
        name: &'static str,
        (start_time, end_time): (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
    ) -> SpanData {
        let (parent_span_id, parent_span_is_remote) = parent.unwrap_or((SpanId::INVALID, false));
        SpanData {
            span_context: context,
            parent_span_id,
            parent_span_is_remote,
            span_kind: SpanKind::Internal,
            name: name.into(),
            start_time,
            end_time,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// Dates monotonic instants by the system clock, as of one reading of each.
struct Dates {
    at: Instant,
    now: SystemTime,
}

impl Dates {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            now: SystemTime::now(),
        }
    }

    fn of(&self, instant: Instant) -> SystemTime {
        self.now - self.at.saturating_duration_since(instant)
    }
}

/// The `traceparent` value naming `span`, as the W3C propagator writes it.
fn traceparent(span: &SpanContext) -> String {
    let mut carrier: HashMap<String, String> = HashMap::new();
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// The span a stored trace context names; `None` for anything the W3C
/// propagator does not take as one.
fn parse(context: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), context.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceId;

    #[test]
    fn a_stored_context_names_the_span_it_was_written_for() {
        let span = SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            SpanId::from(0x00f0_67aa_0ba9_02b7),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        let text = traceparent(&span);
        assert_eq!(
            text,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let back = parse(&text).unwrap();
        assert_eq!(
            (back.trace_id(), back.span_id()),
            (span.trace_id(), span.span_id())
        );
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }
}
