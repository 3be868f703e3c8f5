//! Traces. With `[telemetry] otlp_endpoint` set, each stored push becomes a
//! trace and each delivery attempt a span in it, exported over OTLP/HTTP
//! (protobuf) to a collector. Without it none of this exists: the request
//! path and the dispatcher hold no [`Telemetry`], make no span, send no
//! header and allocate nothing for traces.
//!
//! - A push's span (`wechat.push`) and its children (`verify`,
//!   `spool.commit`, `reply`) are built once it is answered, with explicit
//!   start and end times, since only then is its event id known. Its ids are
//!   drawn before the commit ([`PushTrace`]), so that the event is stored
//!   with its W3C trace context.
//! - An attempt's span (`deliver.attempt`), made inline or by a worker on
//!   any replica however late, is a child of the push's span as the event
//!   keeps it ([`AttemptTrace`]); the request carries a `traceparent` naming
//!   the attempt's span, so the target's own spans join the trace.
//! - Every span carries the event id (`wxrelay.event_id`), and never the
//!   Token, a key, the ciphertext or message content; the sender's OpenID
//!   only as the short hash the logs use.
//! - Spans go into a bounded queue that a background task empties in
//!   batches: a slow or dead collector never holds up a push or an attempt.
//!   Spans that find the queue full, or whose export fails, are dropped and
//!   counted (`wxrelay_trace_spans_dropped_total`).
//!
//! Spans are dated by the system's clock, the one a collector compares
//! them with, and timed by the monotonic one.

mod collector;
mod spans;

pub use spans::{AttemptFacts, AttemptTrace, PushFacts, PushTrace, TRACEPARENT};

use crate::config::TelemetrySettings;
use crate::deliver::faults::{Repeat, Repeats};
use crate::deliver::HttpClient;
use crate::metrics::Metrics;
use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{RandomIdGenerator, SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Spans waiting for export at most: a few seconds of a busy relay's.
const QUEUE: usize = 8192;
/// Spans in one export request at most.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others to join it.
const LINGER: Duration = Duration::from_millis(500);
/// How long one export may take, the exporter's retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the relay's spans go: drawing their ids, building them, and
/// handing them to the export without waiting for it.
pub struct Telemetry {
    queue: mpsc::Sender<SpanData>,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
    /// Spans dropped because the queue was full.
    queue_full: IntCounter,
}

#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: cannot export to it: {0}")]
pub struct TelemetryError(String);

/// The background export, flushed and stopped at shutdown.
pub struct Export {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Telemetry {
    /// Starts exporting to the configured collector through `client`; `None`
    /// when no collector is configured.
    pub fn start(
        settings: &TelemetrySettings,
        metrics: &Metrics,
        client: HttpClient,
    ) -> Result<Option<(Arc<Telemetry>, Export)>, TelemetryError> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint).as_str())
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(collector::Collector::new(client, EXPORT_TIMEOUT))
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(settings.service_name.clone())
                .build(),
        );
        let (queue, spans) = mpsc::channel(QUEUE);
        let (stop, stopped) = oneshot::channel();
        let dropped = &metrics.trace_spans_dropped;
        let failed = dropped.with_label_values(&["export_failed"]);
        let task = tokio::spawn(export(exporter, spans, stopped, failed));
        let telemetry = Telemetry {
            queue,
            ids: RandomIdGenerator::default(),
            scope: InstrumentationScope::builder("wxrelay")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            queue_full: dropped.with_label_values(&["queue_full"]),
        };
        tracing::info!(endpoint = %traces_url(endpoint), "exporting traces");
        Ok(Some((Arc::new(telemetry), Export { stop, task })))
    }

    /// Hands a finished span to the export, or drops it when the queue is full.
    fn emit(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.queue_full.inc();
        }
    }
}

impl Export {
    /// Exports what is still queued, for at most `within`, then stops.
    pub async fn finish(self, within: Duration) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(within, &mut task).await.is_err() {
            tracing::warn!("spans still being exported at the drain deadline: dropped");
            task.abort();
        }
    }
}

/// Where OTLP/HTTP takes spans: the collector's `/v1/traces`.
fn traces_url(endpoint: &url::Url) -> url::Url {
    let mut url = endpoint.clone();
    let path = format!("{}/v1/traces", endpoint.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

/// Sends the queued spans in batches of up to [`MAX_BATCH`], each once it is
/// full or [`LINGER`] after its first span, until told to stop; then sends
/// what is left.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut spans: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
    failed: IntCounter,
) {
    let failures = Repeats::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let open = tokio::select! {
            _ = &mut stop => false,
            n = spans.recv_many(&mut batch, MAX_BATCH) => n > 0 && fill(&mut spans, &mut batch).await,
        };
        if !open {
            spans.close();
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
        }
        while !batch.is_empty() {
            let rest = batch.split_off(batch.len().min(MAX_BATCH));
            let sent = std::mem::replace(&mut batch, rest);
            send(&exporter, sent, &failures, &failed).await;
        }
        if !open {
            return;
        }
    }
}

/// Adds to `batch` what arrives within [`LINGER`], up to [`MAX_BATCH`];
/// false once no span can arrive any more.
async fn fill(spans: &mut mpsc::Receiver<SpanData>, batch: &mut Vec<SpanData>) -> bool {
    let linger = tokio::time::sleep(LINGER);
    tokio::pin!(linger);
    while batch.len() < MAX_BATCH {
        tokio::select! {
            n = spans.recv_many(batch, MAX_BATCH - batch.len()) => if n == 0 { return false },
            _ = &mut linger => break,
        }
    }
    true
}

/// One export request; a failure drops the batch, counted, and is logged
/// without a line per failure while the collector stays away.
async fn send(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    failures: &Repeats,
    failed: &IntCounter,
) {
    let n = batch.len() as u64;
    match exporter.export(batch).await {
        Ok(()) => {
            if let Some(unlogged) = failures.succeeded() {
                tracing::info!(unlogged_failures = unlogged, "spans are exported again");
            }
        }
        Err(e) => {
            failed.inc_by(n);
            match failures.failed() {
                Repeat::First => {
                    tracing::warn!(error = %e, spans = n, "cannot export spans to the collector; they are dropped")
                }
                Repeat::Summary(count) => {
                    tracing::warn!(error = %e, failures = count, "still cannot export spans to the collector")
                }
                Repeat::Quiet => {}
            }
        }
    }
}
