//! The one way an attempt is made and its outcome recorded, whoever makes
//! it (a worker, or the request path's inline reply): the attempt, what it
//! says about the target, the retry decision, the metrics, the log line and
//! the spool's record.

use super::attempt::{attempt, Attempt, Unread};
use super::breaker::Phase;
use super::faults::{Faults, Repeat};
use super::format;
use super::retry::{self, Verdict};
use super::{Dispatcher, InlineAnswer, Keeping, TargetState};
use crate::config::Target;
use crate::metrics::Metrics;
use crate::spool::{DeliveryId, Event, EventId, LeaseToken, Schedule, Settle, Settlement, UnixMs};
use crate::telemetry::{AttemptFacts, AttemptTrace};
use crate::trail::{kept_response, TrailAttempt};
use rand::Rng;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Past the inline attempt's end, so the workers do not send it at the same time.
const AFTER_INLINE_MS: i64 = 1_000;

/// Which delivery an attempt is for, and where it stands on its schedule.
#[derive(Debug, Clone, Copy)]
pub(super) struct Due {
    pub(super) delivery_id: DeliveryId,
    /// Its event's: what its span is found by.
    pub(super) event_id: EventId,
    /// Attempts made before this one.
    pub(super) attempts: u32,
    pub(super) schedule: Schedule,
    /// The lease the attempt is made under.
    pub(super) lease: LeaseToken,
    /// The one attempt an open circuit lets through.
    pub(super) probe: bool,
    /// Made by the request path for WeChat's answer, not by a worker.
    pub(super) inline: bool,
}

/// Whether the record is awaited or written in the background.
enum Awaiting {
    Awaited,
    Tracked,
}

/// What an attempt settled, written once its answer is kept or not.
struct Outcome {
    lease: LeaseToken,
    settlement: Settlement,
    /// The settlement instead, when the answer being kept is not.
    unkept: Option<Settlement>,
    /// What keeps a delivered attempt's answer.
    keeping: Option<Keeping>,
    /// The attempt, for the trail (while it is on).
    note: Option<Box<TrailAttempt>>,
    /// Whether the attempt releases the target's backlog.
    release: bool,
}

/// How an attempt's outcome is written to the spool.
pub(super) enum Record {
    /// Before the attempt returns: a worker's slot is free only once it is.
    Awaited,
    /// In the background, tracked until shutdown: WeChat's answer does not
    /// depend on it, and if the record is lost the delivery is sent again.
    /// The answer, when one is kept, is kept first.
    Tracked(Option<InlineAnswer>),
}

impl Dispatcher {
    /// When the workers may send a delivery that the request path attempts
    /// inline first, within `budget` from `now_ms`: once that attempt is over.
    pub fn reply_due_at(&self, now_ms: UnixMs, budget: Duration) -> UnixMs {
        now_ms + (budget.as_millis() as i64 + AFTER_INLINE_MS)
    }

    /// The request path's one attempt at the reply target, within `timeout`.
    /// Recorded like a worker's; the record is written in the background,
    /// after `answer` has kept the target's answer when it keeps one.
    pub async fn attempt_inline(
        self: &Arc<Self>,
        target: &Target,
        (event_id, delivery_id): (EventId, DeliveryId),
        event: &Event,
        (timeout, answer): (Duration, Option<InlineAnswer>),
    ) -> Attempt {
        // An open circuit sends nothing, this included: the delivery waits in
        // the spool and WeChat gets `success`.
        if self.target_state(&target.name).health.phase() != Phase::Closed {
            return Attempt {
                verdict: Verdict::Retry {
                    error: "the target's circuit is open".into(),
                    retry_after: None,
                },
                status: None,
                body: Err(Unread::Missing),
            };
        }
        let due = Due {
            delivery_id,
            event_id,
            attempts: 0,
            schedule: Schedule::default(),
            lease: LeaseToken::NONE,
            probe: false,
            inline: true,
        };
        self.attempt_and_record(target, due, event, timeout, Record::Tracked(answer))
            .await
    }

    /// Waits for the inline attempts' records still being written.
    pub async fn records_written(&self) {
        let mut records = {
            let mut guard = self.records.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *guard)
        };
        while records.join_next().await.is_some() {}
    }

    fn track(&self, write: impl Future<Output = ()> + Send + 'static) {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        while records.try_join_next().is_some() {}
        records.spawn(write);
    }

    /// One attempt and its record: the attempt, what it says about the
    /// target's health (which may release the target's backlog), the retry
    /// decision, the metrics, the log line and the spool's record.
    pub(super) async fn attempt_and_record(
        self: &Arc<Self>,
        target: &Target,
        due: Due,
        event: &Event,
        timeout: Duration,
        record: Record,
    ) -> Attempt {
        let started = tokio::time::Instant::now();
        let started_ms = UnixMs(self.clock.now_ms());
        // Only a `wechat` target, or a URL with `$APPID$`, may need its
        // account's receive id.
        let config = format::needs_receive_id(target).then(|| self.config.load_full());
        let app_id = config
            .as_ref()
            .and_then(|c| c.accounts.get(&event.account))
            .map(|a| a.app_id.as_str());
        let trace = self
            .telemetry
            .as_ref()
            .map(|t| t.attempt(event.trace_context.as_deref()));
        let traceparent = trace.as_ref().and_then(|t| t.header());
        let sent = (event, app_id, traceparent);
        let state = self.target_state(&target.name);
        let circuit = self.trail_circuit(&state);
        let result = attempt(&self.client, &*self.clock, target, sent, timeout).await;
        let (record, keeping) = self.keeping(record, target, event, &result);
        let release = self.observe_health(target, &state, due.probe, &result);
        let unit: f64 = rand::thread_rng().gen();
        let verdict = result.verdict.clone().honouring(&target.breaker);
        let settlement = self.decide(target, &due, verdict, started_ms, unit);
        let unkept = keeping
            .is_some()
            .then(|| self.unkept(target, &due, started_ms, unit));
        let note = circuit.map(|circuit| {
            let took = started.elapsed();
            let noted = (&due, target.name.as_str(), event);
            Box::new(attempt_note(noted, started_ms, took, &result, circuit))
        });
        let taken = (started, trace);
        self.observe_attempt(target, &due, event, &result, &settlement, taken);
        let outcome = Outcome {
            lease: due.lease,
            settlement,
            unkept,
            keeping,
            note,
            release,
        };
        let write = self
            .clone()
            .record_outcome(target.name.clone(), state, outcome);
        match record {
            Awaiting::Awaited => write.await,
            Awaiting::Tracked => self.track(write),
        }
        result
    }

    /// The settlement of a delivered attempt whose answer the spool could
    /// not keep: it is asked for again, as after a failure.
    fn unkept(&self, target: &Target, due: &Due, started_ms: UnixMs, unit: f64) -> Settlement {
        let verdict = Verdict::Retry {
            error: "the answer could not be kept".into(),
            retry_after: None,
        };
        self.decide(target, due, verdict, started_ms, unit)
    }

    /// The retry decision on `due`'s attempt, started at `started_ms`, as of now.
    fn decide(
        &self,
        target: &Target,
        due: &Due,
        verdict: Verdict,
        started_ms: UnixMs,
        unit: f64,
    ) -> Settlement {
        let now = UnixMs(self.clock.now_ms());
        let (id, schedule) = (due.delivery_id, due.schedule);
        retry::decide(id, &target.retry, schedule, verdict, started_ms, now, unit)
    }

    /// The circuit as an attempt finds it, for the trail (while it is on).
    fn trail_circuit(&self, state: &TargetState) -> Option<&'static str> {
        let trail_on = self.config.load().trail.enabled;
        trail_on.then(|| circuit_name(state.health.phase()))
    }

    /// Writes an attempt's outcome, once the backlog it releases is released
    /// and the answer being kept is kept (or is not, and the delivery is
    /// asked for again).
    async fn record_outcome(
        self: Arc<Self>,
        target: String,
        state: Arc<TargetState>,
        outcome: Outcome,
    ) {
        if outcome.release {
            self.release_backlog(&target).await;
        }
        let kept = match outcome.keeping {
            Some(keeping) => keeping.await,
            None => true,
        };
        let settlement = match outcome.unkept {
            Some(unkept) if !kept => unkept,
            _ => outcome.settlement,
        };
        let settle = Settle {
            lease: outcome.lease,
            settlement,
            trail: outcome.note,
        };
        self.record(&target, &state.faults, vec![settle]).await;
    }

    /// What keeps a delivered attempt's answer before it is recorded: the
    /// request path's, or the one told of every worker's answer.
    fn keeping(
        &self,
        record: Record,
        target: &Target,
        event: &Event,
        result: &Attempt,
    ) -> (Awaiting, Option<Keeping>) {
        let delivered = matches!(result.verdict, Verdict::Delivered);
        match record {
            Record::Tracked(answer) => {
                let keeping = answer
                    .filter(|_| delivered)
                    .and_then(|answer| answer(result));
                (Awaiting::Tracked, keeping)
            }
            Record::Awaited => {
                let keeping = match (&result.body, self.worker_answers.get()) {
                    (Ok(body), Some(hook)) if delivered => hook(target, event, body.clone()),
                    _ => None,
                };
                (Awaiting::Awaited, keeping)
            }
        }
    }

    /// An attempt's metrics, log line and span (when traced), from what the
    /// spool will record.
    fn observe_attempt(
        &self,
        target: &Target,
        due: &Due,
        event: &Event,
        result: &Attempt,
        settlement: &Settlement,
        (started, trace): (tokio::time::Instant, Option<AttemptTrace>),
    ) {
        let outcome = count(&self.metrics, &target.name, settlement, started.elapsed());
        if matches!(settlement, Settlement::Delivered { .. }) {
            observe_login(&self.metrics, &target.name, event, self.clock.now_ms());
        }
        tracing::info!(
            target = %target.name,
            delivery_id = due.delivery_id.0,
            attempt = due.attempts + 1,
            status = result.status.map(|s| s.as_u16()),
            outcome,
            latency_ms = crate::rounded_ms(started.elapsed()),
            "delivery attempt"
        );
        if let (Some(telemetry), Some(trace)) = (&self.telemetry, trace) {
            let facts = AttemptFacts {
                event_id: due.event_id,
                delivery_id: due.delivery_id,
                account: &event.account,
                target: &target.name,
                attempt: due.attempts + 1,
                inline: due.inline,
                status: result.status.map(|s| s.as_u16()),
                outcome,
            };
            telemetry.attempt_span(trace, &facts);
        }
    }

    /// Writes an attempt's outcome. When the spool cannot, the delivery stays
    /// leased; when the lease ends it is sent again: at least once.
    /// A user's next delivery waits for one that ends here: the worker is
    /// woken for it.
    pub(super) async fn record(&self, target: &str, faults: &Faults, settles: Vec<Settle>) {
        let Some(delivery_id) = settles.first().map(|s| s.settlement.delivery_id()) else {
            return;
        };
        let ends = settles
            .iter()
            .any(|s| !matches!(s.settlement, Settlement::Retry { .. }));
        match self
            .spool
            .record(settles, UnixMs(self.clock.now_ms()))
            .await
        {
            Ok(()) => {
                if let Some(unlogged) = faults.settle.succeeded() {
                    tracing::info!(target = %target, unlogged_failures = unlogged, "delivery outcomes are recorded again");
                }
            }
            Err(e) => {
                self.spool_failed(target, "settle");
                match faults.settle.failed() {
                    Repeat::First => {
                        tracing::error!(target = %target, delivery_id = delivery_id.0, error = %crate::error_chain(&e), "cannot record a delivery outcome; it is held until its lease ends, then sent again")
                    }
                    Repeat::Summary(n) => {
                        tracing::error!(target = %target, error = %crate::error_chain(&e), failures = n, "still cannot record delivery outcomes")
                    }
                    Repeat::Quiet => {}
                }
            }
        }
        let per_user = self
            .config
            .load()
            .targets
            .get(target)
            .is_some_and(|t| t.ordering == crate::config::Ordering::PerUser);
        if ends && per_user {
            self.wake(target);
        }
    }
}

/// A circuit's state as the trail shows it.
fn circuit_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Closed => "closed",
        Phase::Open => "open",
        Phase::Probing => "half_open",
    }
}

/// What the trail keeps of one attempt: when, how it went, how long it
/// took, and the start of the answer.
fn attempt_note(
    (due, target, event): (&Due, &str, &Event),
    at: UnixMs,
    took: Duration,
    result: &Attempt,
    circuit: &'static str,
) -> TrailAttempt {
    let error = match (&result.status, &result.verdict) {
        (Some(_), _) => None,
        (None, Verdict::Retry { error, .. } | Verdict::Reject { error }) => {
            Some(error_class(error))
        }
        (None, _) => Some("connect"),
    };
    TrailAttempt {
        at,
        target: target.to_owned(),
        attempt: due.attempts + 1,
        inline: due.inline,
        status: result.status.map(|s| s.as_u16()),
        error: error.map(str::to_owned),
        latency_ms: took.as_millis() as u64,
        response: kept_response(
            result.status.map(|s| s.as_u16()),
            result.body.as_deref().unwrap_or_default(),
            || sender(event),
        ),
        circuit: circuit.to_owned(),
    }
}

/// The event's `FromUserName`, read only for an answer the trail keeps.
fn sender(event: &Event) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Sender {
        #[serde(rename = "FromUserName")]
        from: Option<String>,
    }
    serde_json::from_str::<Sender>(&event.fields).ok()?.from
}

/// An attempt that got no answer, by kind: its error's text may name hosts
/// and addresses, which the trail has no need of.
fn error_class(error: &str) -> &'static str {
    if error.starts_with("no answer within") {
        "timeout"
    } else if error.contains("circuit is open") {
        "circuit_open"
    } else if error.starts_with("bad request") || error.contains("format") {
        "request"
    } else if error.contains("dns") || error.contains("resolve") {
        "dns"
    } else if error.contains("tls") || error.contains("certificate") {
        "tls"
    } else {
        "connect"
    }
}

/// Counts one attempt by what the spool will record; returns the outcome label.
pub fn count(
    metrics: &Metrics,
    target: &str,
    settlement: &Settlement,
    took: Duration,
) -> &'static str {
    let outcome = match settlement {
        Settlement::Delivered { .. } => "delivered",
        Settlement::Retry { .. } => "retried",
        Settlement::Dead { reason, .. } => {
            metrics
                .dead_letters
                .with_label_values(&[target, reason.as_str()])
                .inc();
            "dead_lettered"
        }
    };
    metrics
        .deliveries
        .with_label_values(&[target, outcome])
        .inc();
    metrics
        .delivery_seconds
        .with_label_values(&[target])
        .observe(took.as_secs_f64());
    outcome
}

/// A login event's time from its push's arrival to a target's 2xx, whoever
/// sent it (the inline reply or a worker), on the relay's clock.
fn observe_login(metrics: &Metrics, target: &str, event: &Event, now_ms: i64) {
    let login = event
        .event_type
        .as_deref()
        .is_some_and(|e| e.eq_ignore_ascii_case("subscribe") || e.eq_ignore_ascii_case("SCAN"));
    if login {
        let seconds = (now_ms - event.received_at.0).max(0) as f64 / 1000.0;
        metrics
            .login_delivery_seconds
            .with_label_values(&[target])
            .observe(seconds);
        metrics.recent.login(now_ms, seconds);
    }
}
