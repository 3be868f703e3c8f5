//! Every metric the relay exports, in one registry of its own, all prefixed
//! `wxrelay_`. The README lists each with its meaning.
//!
//! Label values come from the configuration (account and target names) or from
//! small fixed sets (verdicts, outcomes, reasons), never from a request that
//! was not authenticated: an unknown account is counted as `-`.

use crate::spool::{Health, Tickets};
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Answer latency buckets, dense around the reply budget and WeChat's 5 s.
const ANSWER_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 4.5, 5.0,
];
/// Login delivery buckets: fine below a second, where a waiting user is.
const LOGIN_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
    60.0, 120.0,
];
const DELIVERY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    /// POSTs by account and verdict (ok, duplicate, or why they were refused).
    pub pushes: IntCounterVec,
    /// GET URL checks by account and verdict.
    pub url_checks: IntCounterVec,
    /// Time from request to answer for POSTs.
    pub answer_seconds: HistogramVec,
    /// Accepted (not duplicate) events by account, MsgType and Event.
    pub events: IntCounterVec,
    /// Delivery attempts by target and outcome (delivered, retried, dead_lettered).
    pub deliveries: IntCounterVec,
    pub delivery_seconds: HistogramVec,
    pub spool_pending: IntGaugeVec,
    pub spool_oldest_age: GaugeVec,
    /// Dead letters by target ("" for unrouted) and reason.
    pub dead_letters: IntCounterVec,
    pub previous_key_decrypts: IntCounterVec,
    /// Reloads by result (ok, failed).
    pub reloads: IntCounterVec,
    /// What the reply target's inline attempt gave WeChat: passed (its XML as
    /// is), encrypted (sealed by the relay), ignored (not valid for WeChat, so
    /// success), unverifiable (an envelope or reply that does not verify with
    /// the credentials it must be sealed with, is ambiguous or too large, or
    /// is a target's stale or replayed envelope, so success), none (no answer
    /// in time or an error, so success).
    pub replies: IntCounterVec,
    /// Accepted login events by account and kind: subscribe_scene (a first
    /// follow by a parametric QR code), subscribe_plain (a follow without a
    /// scene), scan (a follower's scan).
    pub login_events: IntCounterVec,
    /// From a login event's arrival to a target's 2xx, inline or by a worker.
    pub login_delivery_seconds: HistogramVec,
    /// Late replies (a reply target's answer after the reply budget) by
    /// account, channel (customer_service, next_message) and outcome:
    /// stored, sent, given (as the passive reply to the next push), retried,
    /// dead_lettered, no_message (the late answer was `success` or no
    /// message WeChat can send), or lost (the spool could not store it).
    pub late_replies: IntCounterVec,
    /// From the push's arrival to the late reply's user-visible send.
    pub late_reply_seconds: Histogram,
    /// Delivery work the spool refused, by target and operation (settle:
    /// an outcome not recorded; lease: due deliveries not read; release).
    pub spool_failures: IntCounterVec,
    /// The delivery workers' leases by target and result: `found` (at least
    /// one delivery handed out) or `empty` (a read of the spool that found
    /// nothing due), so wasted reads show.
    pub leases: IntCounterVec,
    /// Connections open on the public address.
    pub open_connections: IntGauge,
    /// Connections refused with a canned 503: the cap was reached and every
    /// connection had a request in progress.
    pub connections_refused: IntCounter,
    /// Idle connections closed to make room for a new one at the cap.
    pub idle_connections_closed: IntCounter,
    /// Connections on the public address that ended in an error, by kind:
    /// `malformed` (hyper answered 400), `uri_too_long` (414),
    /// `headers_too_large` (431), `header_timeout`, `incomplete`, `other`.
    pub http_errors: IntCounterVec,
    /// Bytes reserved for request bodies being read or processed.
    pub body_bytes_in_flight: IntGauge,
    /// Each target's circuit: 0 closed, 1 open (left alone), 2 probing.
    pub target_circuit: IntGaugeVec,
    /// Each Open Platform's latest ticket's age, read at each scrape.
    pub component_ticket_age: GaugeVec,
    /// Spans not exported, by reason: `queue_full` (the collector is slower
    /// than the relay makes spans), `export_failed` (it refused them or did
    /// not answer).
    pub trace_spans_dropped: IntCounterVec,
    /// Requests the pages refused, by reason (`csrf`, `bad_token`…).
    pub ui_refusals: IntCounterVec,
    /// Requests the admin listener refused before reading them, by reason
    /// (`host`: a `Host` that is not the listener's).
    pub admin_refusals: IntCounterVec,
    /// The last hour's login latencies and refusals, for the overview page.
    pub recent: crate::recent::Recent,
    /// Trail notes (a reply, a refusal) not written: the spool was busy.
    pub trail_notes_dropped: IntCounter,
    /// Refused pushes over an account's trail rate, counted only.
    pub trail_refusals_dropped: IntCounterVec,
}

#[derive(Debug, thiserror::Error)]
#[error("metric registration: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// A metric's name (after `wxrelay_`), help text and labels: the table of
/// every collector the relay registers.
struct Spec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const fn spec(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Spec {
    Spec { name, help, labels }
}

const ACCOUNT: &[&str] = &["account"];
const TARGET: &[&str] = &["target"];
const NONE: &[&str] = &[];

const PUSHES: Spec = spec(
    "pushes_total",
    "Pushes (POST) by account and verdict.",
    &["account", "verdict"],
);
const URL_CHECKS: Spec = spec(
    "url_checks_total",
    "URL checks (GET) by account and verdict.",
    &["account", "verdict"],
);
const ANSWER_SECONDS: Spec = spec(
    "answer_duration_seconds",
    "Time to answer a push; WeChat gives up at 5 s.",
    ACCOUNT,
);
const EVENTS: Spec = spec(
    "events_total",
    "Accepted events by account, MsgType and Event.",
    &["account", "msg_type", "event"],
);
const DELIVERIES: Spec = spec(
    "deliveries_total",
    "Delivery attempts by target and outcome.",
    &["target", "outcome"],
);
const DELIVERY_SECONDS: Spec = spec(
    "delivery_duration_seconds",
    "Duration of delivery attempts.",
    TARGET,
);
const SPOOL_PENDING: Spec = spec(
    "spool_pending",
    "Deliveries waiting in the spool, per target.",
    TARGET,
);
const SPOOL_OLDEST_AGE: Spec = spec(
    "spool_oldest_pending_age_seconds",
    "Age of the oldest event still waiting for a target.",
    TARGET,
);
const DEAD_LETTERS: Spec = spec(
    "dead_letters_total",
    "Deliveries moved to the dead-letter table, by target and reason.",
    &["target", "reason"],
);
const PREVIOUS_KEY_DECRYPTS: Spec = spec(
    "previous_key_decrypts_total",
    "Pushes that only the previous EncodingAESKey decrypted.",
    ACCOUNT,
);
const RELOADS: Spec = spec(
    "config_reloads_total",
    "Configuration reloads by result.",
    &["result"],
);
const REPLIES: Spec = spec(
    "replies_total",
    "What the reply target's inline attempt gave WeChat.",
    &["account", "outcome"],
);
const LOGIN_EVENTS: Spec = spec(
    "login_events_total",
    "Accepted login events (subscribe_scene, subscribe_plain, scan) by account.",
    &["account", "event"],
);
const LOGIN_DELIVERY_SECONDS: Spec = spec(
    "login_delivery_seconds",
    "Time from a login event's arrival to a target's 2xx.",
    TARGET,
);
const LATE_REPLIES: Spec = spec(
    "late_replies_total",
    "Late replies (a reply target's answer after the reply budget), by channel and outcome.",
    &["account", "channel", "outcome"],
);
const LATE_REPLY_SECONDS: Spec = spec(
    "late_reply_seconds",
    "Time from a push's arrival to its late reply's send.",
    &[],
);
/// A late answer takes from the reply budget to the target's timeout (at
/// most 120 s); a retried send, minutes to hours.
const LATE_BUCKETS: &[f64] = &[
    5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 1800.0, 7200.0, 86400.0,
];
const SPOOL_FAILURES: Spec = spec(
    "spool_failures_total",
    "Delivery work the spool could not do, by target and operation.",
    &["target", "operation"],
);
const LEASES: Spec = spec(
    "delivery_leases_total",
    "Leases of due deliveries by the target's worker, by result (found, empty).",
    &["target", "result"],
);
const OPEN_CONNECTIONS: Spec = spec(
    "open_connections",
    "Connections open on the public address.",
    NONE,
);
const CONNECTIONS_REFUSED: Spec = spec(
    "connections_refused_total",
    "Connections refused with 503 at the connection cap.",
    NONE,
);
const IDLE_CONNECTIONS_CLOSED: Spec = spec(
    "idle_connections_closed_total",
    "Idle connections closed to make room at the connection cap.",
    NONE,
);
const HTTP_ERRORS: Spec = spec(
    "http_errors_total",
    "Public connections that ended in an error, by kind.",
    &["kind"],
);
const BODY_BYTES_IN_FLIGHT: Spec = spec(
    "body_bytes_in_flight",
    "Bytes reserved for request bodies in progress.",
    NONE,
);
const TARGET_CIRCUIT: Spec = spec(
    "target_circuit",
    "A target's circuit: 0 closed, 1 open (no attempts), 2 probing.",
    TARGET,
);
const COMPONENT_TICKET_AGE: Spec = spec(
    "component_ticket_age_seconds",
    "Age of each Open Platform's latest component_verify_ticket; +Inf while none was received.",
    ACCOUNT,
);
const TRACE_SPANS_DROPPED: Spec = spec(
    "trace_spans_dropped_total",
    "Spans not exported to the collector, by reason.",
    &["reason"],
);
const ADMIN_REFUSALS: Spec = spec(
    "admin_refusals_total",
    "Requests to /admin/* and /ui refused before they were read, by reason.",
    &["reason"],
);
const UI_REFUSALS: Spec = spec(
    "ui_refusals_total",
    "Requests to the pages refused, by reason.",
    &["reason"],
);
const TRAIL_NOTES_DROPPED: Spec = spec(
    "trail_notes_dropped_total",
    "Trail notes (replies, refusals) not written because the spool was busy.",
    &[],
);
const TRAIL_REFUSALS_DROPPED: Spec = spec(
    "trail_refusals_dropped_total",
    "Refused pushes beyond the trail's rate per account: counted, not written.",
    ACCOUNT,
);
const BUILD_INFO: Spec = spec("build_info", "The running version; always 1.", &["version"]);

/// Registers collectors of [`Spec`]s in the relay's registry.
struct Registrar(Registry);

impl Registrar {
    fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        collector: C,
    ) -> Result<C, MetricsError> {
        self.0.register(Box::new(collector.clone()))?;
        Ok(collector)
    }

    fn opts(spec: &Spec) -> Opts {
        Opts::new(spec.name, spec.help)
    }

    fn counters(&self, spec: Spec) -> Result<IntCounterVec, MetricsError> {
        self.register(IntCounterVec::new(Self::opts(&spec), spec.labels)?)
    }

    fn counter(&self, spec: Spec) -> Result<IntCounter, MetricsError> {
        self.register(IntCounter::with_opts(Self::opts(&spec))?)
    }

    fn gauge(&self, spec: Spec) -> Result<IntGauge, MetricsError> {
        self.register(IntGauge::with_opts(Self::opts(&spec))?)
    }

    fn gauges(&self, spec: Spec) -> Result<IntGaugeVec, MetricsError> {
        self.register(IntGaugeVec::new(Self::opts(&spec), spec.labels)?)
    }

    fn float_gauges(&self, spec: Spec) -> Result<GaugeVec, MetricsError> {
        self.register(GaugeVec::new(Self::opts(&spec), spec.labels)?)
    }

    fn histogram(&self, spec: Spec, buckets: &[f64]) -> Result<Histogram, MetricsError> {
        let opts = HistogramOpts::new(spec.name, spec.help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }

    fn histograms(&self, spec: Spec, buckets: &[f64]) -> Result<HistogramVec, MetricsError> {
        let opts = HistogramOpts::new(spec.name, spec.help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, spec.labels)?)
    }
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let r = Registrar(Registry::new_custom(Some("wxrelay".into()), None)?);
        r.gauges(BUILD_INFO)?
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Ok(Self {
            pushes: r.counters(PUSHES)?,
            url_checks: r.counters(URL_CHECKS)?,
            answer_seconds: r.histograms(ANSWER_SECONDS, ANSWER_BUCKETS)?,
            events: r.counters(EVENTS)?,
            deliveries: r.counters(DELIVERIES)?,
            delivery_seconds: r.histograms(DELIVERY_SECONDS, DELIVERY_BUCKETS)?,
            spool_pending: r.gauges(SPOOL_PENDING)?,
            spool_oldest_age: r.float_gauges(SPOOL_OLDEST_AGE)?,
            dead_letters: r.counters(DEAD_LETTERS)?,
            previous_key_decrypts: r.counters(PREVIOUS_KEY_DECRYPTS)?,
            reloads: r.counters(RELOADS)?,
            replies: r.counters(REPLIES)?,
            login_events: r.counters(LOGIN_EVENTS)?,
            login_delivery_seconds: r.histograms(LOGIN_DELIVERY_SECONDS, LOGIN_BUCKETS)?,
            late_replies: r.counters(LATE_REPLIES)?,
            late_reply_seconds: r.histogram(LATE_REPLY_SECONDS, LATE_BUCKETS)?,
            spool_failures: r.counters(SPOOL_FAILURES)?,
            leases: r.counters(LEASES)?,
            open_connections: r.gauge(OPEN_CONNECTIONS)?,
            connections_refused: r.counter(CONNECTIONS_REFUSED)?,
            idle_connections_closed: r.counter(IDLE_CONNECTIONS_CLOSED)?,
            http_errors: r.counters(HTTP_ERRORS)?,
            body_bytes_in_flight: r.gauge(BODY_BYTES_IN_FLIGHT)?,
            target_circuit: r.gauges(TARGET_CIRCUIT)?,
            component_ticket_age: r.float_gauges(COMPONENT_TICKET_AGE)?,
            trace_spans_dropped: r.counters(TRACE_SPANS_DROPPED)?,
            ui_refusals: r.counters(UI_REFUSALS)?,
            admin_refusals: r.counters(ADMIN_REFUSALS)?,
            recent: crate::recent::Recent::new(LOGIN_BUCKETS),
            trail_notes_dropped: r.counter(TRAIL_NOTES_DROPPED)?,
            trail_refusals_dropped: r.counters(TRAIL_REFUSALS_DROPPED)?,
            registry: r.0,
        })
    }

    /// The public listener's connection counters.
    pub fn connection_counters(&self) -> crate::server::Counters {
        crate::server::Counters {
            open: self.open_connections.clone(),
            refused: self.connections_refused.clone(),
            idle_closed: self.idle_connections_closed.clone(),
            http_errors: self.http_errors.clone(),
        }
    }

    /// Sets each Open Platform account's ticket age from what the spool
    /// keeps now (shared by every replica of a PostgreSQL spool): `+Inf`
    /// for one that has none yet, as that platform's API calls all fail.
    pub async fn read_tickets(&self, tickets: &dyn Tickets, platforms: &[String], now_ms: i64) {
        let kept = match tickets.tickets().await {
            Ok(kept) => kept,
            Err(e) => {
                let error = crate::error_chain(&e);
                tracing::warn!(%error, "cannot read the tickets for metrics");
                return;
            }
        };
        self.component_ticket_age.reset();
        for account in platforms {
            let age = kept
                .iter()
                .find(|t| &t.account == account)
                .map_or(f64::INFINITY, |t| {
                    (now_ms - t.received_at.0).max(0) as f64 / 1000.0
                });
            self.component_ticket_age
                .with_label_values(&[account])
                .set(age);
        }
    }

    /// The text exposition, with the spool gauges read now. `targets` are the
    /// configured targets, shown at 0 when nothing waits for them.
    pub async fn render(&self, spool: &dyn Health, targets: &[String], now_ms: i64) -> String {
        match spool.depth().await {
            Ok(depth) => {
                self.spool_pending.reset();
                self.spool_oldest_age.reset();
                for t in targets {
                    self.spool_pending.with_label_values(&[t]).set(0);
                    self.spool_oldest_age.with_label_values(&[t]).set(0.0);
                }
                for d in depth {
                    self.spool_pending
                        .with_label_values(&[&d.target])
                        .set(d.pending as i64);
                    let age = d
                        .oldest_received_at
                        .map_or(0.0, |t| (now_ms - t.0).max(0) as f64 / 1000.0);
                    self.spool_oldest_age
                        .with_label_values(&[&d.target])
                        .set(age);
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot read the spool depth for metrics")
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The MsgType and Event labels for an event: WeChat's documented values as
/// they are, anything else as `other`. A plaintext push is not authenticated
/// beyond its signature, so its fields must not be able to grow the labels.
pub fn event_labels<'a>(msg_type: &'a str, event: &'a str) -> (&'a str, &'a str) {
    const MSG_TYPES: &[&str] = &[
        "text",
        "image",
        "voice",
        "video",
        "shortvideo",
        "location",
        "link",
        "event",
        "device_event",
        "device_text",
        "miniprogrampage",
        "file",
    ];
    const EVENTS: &[&str] = &[
        "",
        "subscribe",
        "unsubscribe",
        "SCAN",
        "LOCATION",
        "CLICK",
        "VIEW",
        "scancode_push",
        "scancode_waitmsg",
        "pic_sysphoto",
        "pic_photo_or_album",
        "pic_weixin",
        "location_select",
        "view_miniprogram",
        "TEMPLATESENDJOBFINISH",
        "MASSSENDJOBFINISH",
        "PUBLISHJOBFINISH",
        "subscribe_msg_popup_event",
        "subscribe_msg_change_event",
        "subscribe_msg_sent_event",
        "kf_create_session",
        "kf_close_session",
        "kf_switch_session",
        "card_pass_check",
        "card_not_pass_check",
        "user_get_card",
        "user_del_card",
        "user_consume_card",
        "user_view_card",
        "user_enter_session_from_card",
        "qualification_verify_success",
        "qualification_verify_fail",
        "naming_verify_success",
        "naming_verify_fail",
        "annual_renew",
        "verify_expired",
        "user_info_modified",
        "user_authorization_revoke",
        "wxa_media_check",
    ];
    let known = |set: &[&str], value: &'a str| if set.contains(&value) { value } else { "other" };
    (known(MSG_TYPES, msg_type), known(EVENTS, event))
}

#[cfg(test)]
mod tests {
    use super::event_labels;

    #[test]
    fn unknown_types_and_events_share_one_label() {
        assert_eq!(event_labels("event", "SCAN"), ("event", "SCAN"));
        assert_eq!(event_labels("text", ""), ("text", ""));
        assert_eq!(
            event_labels("x1", "made_up_by_a_stranger"),
            ("other", "other")
        );
    }
}
