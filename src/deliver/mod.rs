//! Delivery: one worker loop per target leases due deliveries from the spool,
//! sends them (at most `concurrency` at once per target, so a slow or dead
//! target only ever holds its own slots), and records each outcome.
//!
//! The loop moves bytes only: the request comes from [`mod@format`], the meaning of
//! the answer and the next attempt's time from [`retry`].

pub mod adapter;
pub mod breaker;
pub mod format;
pub mod retry;

use crate::clock::Clock;
use crate::config::{Format, Ordering::PerUser, Settings, Target};
use crate::metrics::Metrics;
use crate::server::stopping;
use crate::spool::{
    DeadReason, DeliveryId, Event, Lease, LeaseToken, Schedule, Settle, Settlement, Spool,
    SpoolError, UnixMs,
};
use arc_swap::ArcSwap;
use breaker::{Circuit, Gate, Phase};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use retry::Verdict;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// The outbound HTTP client: pooled keep-alive connections, HTTP and HTTPS
/// (rustls with the webpki roots).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The most of a target's answer that is read: enough for a passive reply.
const MAX_ANSWER: usize = 64 * 1024;
/// How much of a refusing answer is kept in the dead-letter record.
const SNIPPET: usize = 200;
/// How often an idle worker looks for retries that have become due.
const IDLE_POLL: Duration = Duration::from_millis(250);

pub fn client() -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https)
}

/// The result of one attempt.
#[derive(Debug)]
pub struct Attempt {
    pub verdict: Verdict,
    pub status: Option<StatusCode>,
    /// The target's answer (up to 64 KiB), for a passive reply.
    pub body: Bytes,
}

/// Sends `event` to `target` once, within `timeout`. `account_app_id` is the
/// AppID of the event's account, which a `wechat` target may seal with.
pub async fn attempt(
    client: &HttpClient,
    clock: &dyn Clock,
    target: &Target,
    (event, account_app_id): (&Event, Option<&str>),
    timeout: Duration,
) -> Attempt {
    let failed = |verdict| Attempt {
        verdict,
        status: None,
        body: Bytes::new(),
    };
    let stamp = format::Stamp {
        now_secs: clock.now_secs(),
        account_app_id,
    };
    let outbound = match format::build(target, event, stamp) {
        Ok(outbound) => outbound,
        Err(e) => {
            return failed(Verdict::Reject {
                error: e.to_string(),
            })
        }
    };
    let mut request = Request::post(outbound.uri.as_str())
        .header(CONTENT_TYPE, outbound.content_type)
        .header(USER_AGENT, concat!("wxrelay/", env!("CARGO_PKG_VERSION")));
    for (name, value) in &outbound.headers {
        request = request.header(*name, value.as_str());
    }
    let request = match request.body(Full::new(outbound.body)) {
        Ok(request) => request,
        Err(e) => {
            return failed(Verdict::Reject {
                error: format!("bad request: {e}"),
            })
        }
    };
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let (parts, body) = response.into_parts();
        // A refusal's body is only evidence; an unreadable one does not change
        // what the status says.
        let body = Limited::new(body, MAX_ANSWER)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Ok::<_, String>((parts, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => failed(Verdict::Retry {
            error: format!("no answer within {}", humantime::format_duration(timeout)),
            retry_after: None,
        }),
        Ok(Err(error)) => failed(Verdict::Retry {
            error,
            retry_after: None,
        }),
        Ok(Ok((parts, body))) => answered(parts, body, clock),
    }
}

/// What an HTTP answer means for the delivery.
fn answered(parts: http::response::Parts, body: Bytes, clock: &dyn Clock) -> Attempt {
    let retry_after = parts
        .headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, UnixMs(clock.now_ms()).to_system_time()));
    let snippet: String = String::from_utf8_lossy(&body)
        .chars()
        .take(SNIPPET)
        .collect::<String>()
        .replace(['\r', '\n'], " ");
    Attempt {
        verdict: retry::classify(parts.status, retry_after, snippet.trim()),
        status: Some(parts.status),
        body,
    }
}

/// How long a worker holds a delivery it leased: longer than the attempt's
/// timeout, so a slow answer is not sent twice; a worker that dies leaves it
/// to expire and be sent again.
fn lease_ms(target: &Target) -> i64 {
    (target.timeout.as_millis() as i64) * 2 + 2_000
}

/// Past the inline attempt's end, so the workers do not send it at the same time.
const AFTER_INLINE_MS: i64 = 1_000;

/// How often pending deliveries of targets that are no longer configured are
/// dead-lettered: a request that began under the previous configuration can
/// store one just after a reload retired the rest.
const RETIRE_EVERY: Duration = Duration::from_secs(30);

/// Owns delivery: the target workers and their wake signals, each target's
/// health, retiring removed targets, and the one way an attempt is made and
/// recorded, for the workers and the request path's inline reply alike.
pub struct Dispatcher {
    config: Arc<ArcSwap<Settings>>,
    spool: Arc<dyn Spool>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    client: HttpClient,
    /// Signalled after a reload, so new targets get a worker.
    config_changed: Notify,
    targets: Mutex<HashMap<String, Arc<TargetState>>>,
    /// Outcomes of inline attempts still being written; awaited at shutdown.
    records: Mutex<JoinSet<()>>,
    /// Set by [`Dispatcher::poll_idle_every`]; [`IDLE_POLL`] otherwise.
    idle_poll: std::sync::OnceLock<Duration>,
}

/// What the dispatcher knows of one target between attempts.
#[derive(Default)]
struct TargetState {
    /// What its worker waits on when it has nothing due.
    wake: Notify,
    health: Health,
    circuit: Circuit,
    faults: Faults,
}

/// Which delivery an attempt is for, and where it stands on its schedule.
#[derive(Debug, Clone, Copy)]
struct Due {
    delivery_id: DeliveryId,
    /// Attempts made before this one.
    attempts: u32,
    schedule: Schedule,
    /// The lease the attempt is made under.
    lease: LeaseToken,
    /// The one attempt an open circuit lets through.
    probe: bool,
}

/// How an attempt's outcome is written to the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Before the attempt returns: a worker's slot is free only once it is.
    Awaited,
    /// In the background, tracked until shutdown: WeChat's answer does not
    /// depend on it, and if the record is lost the delivery is sent again.
    Tracked,
}

impl Dispatcher {
    pub fn new(
        config: Arc<ArcSwap<Settings>>,
        spool: Arc<dyn Spool>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            config,
            spool,
            clock,
            metrics,
            client: client(),
            config_changed: Notify::new(),
            targets: Mutex::new(HashMap::new()),
            records: Mutex::new(JoinSet::new()),
            idle_poll: std::sync::OnceLock::new(),
        })
    }

    /// How often idle workers look in the spool unprompted, instead of
    /// [`IDLE_POLL`]; set before [`Dispatcher::start`].
    pub fn poll_idle_every(&self, every: Duration) {
        let _ = self.idle_poll.set(every);
    }

    /// Starts the delivery workers: one loop per configured target, and a
    /// supervisor that starts loops for targets added by a reload (a loop
    /// whose target disappears ends by itself).
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) -> JoinSet<()> {
        // Deliveries another replica makes due wake the workers here too.
        let dispatcher = Arc::downgrade(self);
        self.spool.on_due_elsewhere(Box::new(move |target| {
            if let Some(d) = dispatcher.upgrade() {
                if d.config.load().targets.contains_key(target) {
                    d.wake(target);
                }
            }
        }));
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().supervise(stop));
        tasks
    }

    /// When the workers may send a delivery that the request path attempts
    /// inline first, within `budget` from `now_ms`: once that attempt is over.
    pub fn reply_due_at(&self, now_ms: UnixMs, budget: Duration) -> UnixMs {
        now_ms + (budget.as_millis() as i64 + AFTER_INLINE_MS)
    }

    /// The signal a target's worker waits on when it has nothing due.
    /// Tells a target's worker that a delivery is due now.
    pub fn wake(&self, target: &str) {
        self.target_state(target).wake.notify_one();
    }

    fn idle_poll(&self) -> Duration {
        self.idle_poll.get().copied().unwrap_or(IDLE_POLL)
    }

    /// Tells the workers the configuration changed: targets may have come or gone.
    pub fn reconfigured(&self) {
        self.config_changed.notify_waiters();
    }

    fn target_state(&self, target: &str) -> Arc<TargetState> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up on every push: no new name is allocated for a known target.
        if let Some(state) = targets.get(target) {
            return state.clone();
        }
        targets.entry(target.to_string()).or_default().clone()
    }

    /// Pending deliveries of targets no longer configured can never be sent:
    /// they become dead letters an operator can see and replay.
    pub async fn retire_removed_targets(&self, settings: &Settings) -> Result<(), SpoolError> {
        let targets: Vec<String> = settings.targets.keys().cloned().collect();
        for (target, n) in self
            .spool
            .retire_targets(targets, UnixMs(self.clock.now_ms()))
            .await?
        {
            tracing::warn!(target = %target, retired = n, "pending deliveries of a removed target dead-lettered");
            self.metrics
                .dead_letters
                .with_label_values(&[target.as_str(), DeadReason::TargetRemoved.as_str()])
                .inc_by(n);
        }
        Ok(())
    }

    /// The request path's one attempt at the reply target, within `timeout`.
    /// Recorded like a worker's; the record is written in the background.
    pub async fn attempt_inline(
        self: &Arc<Self>,
        target: &Target,
        delivery_id: DeliveryId,
        event: &Event,
        timeout: Duration,
    ) -> Attempt {
        // An open circuit sends nothing, this included: the delivery waits in
        // the spool and WeChat gets `success`.
        if self.target_state(&target.name).circuit.phase() != Phase::Closed {
            return Attempt {
                verdict: Verdict::Retry {
                    error: "the target's circuit is open".into(),
                    retry_after: None,
                },
                status: None,
                body: Bytes::new(),
            };
        }
        let due = Due {
            delivery_id,
            attempts: 0,
            schedule: Schedule::default(),
            lease: LeaseToken::NONE,
            probe: false,
        };
        self.attempt_and_record(target, due, event, timeout, Record::Tracked)
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

    /// One attempt and its record: the attempt, the retry decision, the
    /// metrics, the log line and the spool's record. A failure as if the
    /// target were down (no answer, or a 5xx) marks it down; the first
    /// success after that makes its backed-off deliveries due at once, so a
    /// backlog drains at full speed when the target returns rather than as
    /// each backoff ends.
    async fn attempt_and_record(
        self: &Arc<Self>,
        target: &Target,
        due: Due,
        event: &Event,
        timeout: Duration,
        record: Record,
    ) -> Attempt {
        let started = tokio::time::Instant::now();
        let started_ms = self.clock.now_ms();
        // Only a `wechat` target may need its account's AppID.
        let config = (target.format == Format::Wechat).then(|| self.config.load_full());
        let app_id = config
            .as_ref()
            .and_then(|c| c.accounts.get(&event.account))
            .map(|a| a.app_id.as_str());
        let result = attempt(&self.client, &*self.clock, target, (event, app_id), timeout).await;
        let state = self.target_state(&target.name);
        let release = match (&result.verdict, result.status) {
            (Verdict::Delivered, _) => state.health.answered(self.clock.now_ms()),
            (Verdict::Retry { .. }, status) if status.is_none_or(|s| s.is_server_error()) => {
                state.health.failed();
                false
            }
            _ => false,
        };
        let closed = self.observe_circuit(target, &state, due.probe, &result.verdict);
        let release = release || closed;
        let unit: f64 = rand::thread_rng().gen();
        let settlement = retry::decide(
            due.delivery_id,
            &target.retry,
            due.schedule,
            result.verdict.clone(),
            UnixMs(started_ms),
            UnixMs(self.clock.now_ms()),
            unit,
        );
        let outcome = count(&self.metrics, &target.name, &settlement, started.elapsed());
        if matches!(settlement, Settlement::Delivered { .. }) {
            observe_login(&self.metrics, &target.name, event, self.clock.now_ms());
        }
        tracing::info!(
            target = %target.name,
            delivery_id = due.delivery_id.0,
            attempt = due.attempts + 1,
            status = result.status.map(|s| s.as_u16()),
            outcome,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "delivery attempt"
        );
        let this = self.clone();
        let name = target.name.clone();
        let write = async move {
            if release {
                this.release_backlog(&name).await;
            }
            let settle = Settle {
                lease: due.lease,
                settlement,
            };
            this.record(&name, &state.faults, vec![settle]).await;
        };
        match record {
            Record::Awaited => write.await,
            Record::Tracked => self.track(write),
        }
        result
    }

    /// Tells the target's circuit what an attempt said about the target;
    /// true when that closed it, so its backlog is released.
    fn observe_circuit(
        &self,
        target: &Target,
        state: &TargetState,
        probe: bool,
        verdict: &Verdict,
    ) -> bool {
        let health = match verdict {
            Verdict::Retry { retry_after, .. } => breaker::Health::Down {
                retry_after: *retry_after,
            },
            Verdict::Delivered | Verdict::Reject { .. } => breaker::Health::Up,
        };
        let unit: f64 = rand::thread_rng().gen();
        let (before, after) =
            state
                .circuit
                .observe(&target.breaker, probe, health, self.clock.now_ms(), unit);
        if before != after {
            self.show_circuit(&target.name, after);
            if before == Phase::Probing {
                // The worker waits for the probe's end to go on.
                state.wake.notify_one();
            }
            match after {
                Phase::Open if before == Phase::Closed => {
                    tracing::warn!(target = %target.name, failures = target.breaker.failures, "target failing: its circuit is open, deliveries wait and it is probed")
                }
                Phase::Closed => {
                    tracing::info!(target = %target.name, "target answers again: its circuit is closed")
                }
                Phase::Open | Phase::Probing => {}
            }
        }
        before != Phase::Closed && after == Phase::Closed
    }

    fn show_circuit(&self, target: &str, phase: Phase) {
        self.metrics
            .target_circuit
            .with_label_values(&[target])
            .set(phase as i64);
    }

    /// Writes an attempt's outcome. When the spool cannot, the delivery stays
    /// leased; when the lease ends it is sent again: at least once. A user's
    /// next delivery waits for one that ends here: the worker is woken for it.
    async fn record(&self, target: &str, faults: &Faults, settles: Vec<Settle>) {
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
                        tracing::error!(target = %target, delivery_id = delivery_id.0, error = %e, "cannot record a delivery outcome; it is held until its lease ends, then sent again")
                    }
                    Repeat::Summary(n) => {
                        tracing::error!(target = %target, error = %e, failures = n, "still cannot record delivery outcomes")
                    }
                    Repeat::Quiet => {}
                }
            }
        }
        let config = self.config.load();
        if ends
            && config
                .targets
                .get(target)
                .is_some_and(|t| t.ordering == PerUser)
        {
            self.wake(target);
        }
    }

    async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut loops = JoinSet::new();
        let mut names: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut tick = tokio::time::interval(RETIRE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let config = self.config.load_full();
            for name in config.targets.keys() {
                if !names.values().any(|n| n == name) {
                    let task = loops.spawn(self.clone().run_target(name.clone(), stop.clone()));
                    names.insert(task.id(), name.clone());
                }
            }
            tokio::select! {
                _ = self.config_changed.notified() => {}
                _ = tick.tick() => {
                    if let Err(e) = self.retire_removed_targets(&config).await {
                        tracing::warn!(error = %e, "cannot retire the deliveries of removed targets");
                    }
                }
                Some(ended) = loops.join_next_with_id() => {
                    let id = match &ended {
                        Ok((id, _)) => *id,
                        Err(e) => e.id(),
                    };
                    if let Some(name) = names.remove(&id) {
                        if ended.is_err() {
                            tracing::error!(target = %name, "a delivery loop ended unexpectedly; starting it again");
                        }
                    }
                }
                _ = stopping(&mut stop) => break,
            }
        }
        while loops.join_next().await.is_some() {}
    }
}

/// Whether a target looks down, and whether its backlog is owed a release.
#[derive(Default)]
struct Health(Mutex<HealthState>);

#[derive(Default)]
struct HealthState {
    /// The target's last answer was a failure as if it were down.
    down: bool,
    /// It answered after being down, and its backlog has not been released
    /// since (the release waits for [`RELEASE_AT_MOST_EVERY_MS`]).
    owed: bool,
    released_at_ms: Option<i64>,
}

/// A flapping target (some answers, some 5xx) must not get its whole backlog
/// back on every success.
const RELEASE_AT_MOST_EVERY_MS: i64 = 10_000;

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self) {
        self.state().down = true;
    }

    /// The target answered: true when its backlog should be released now.
    /// A release the rate limit holds back is owed, not forgotten: the worker
    /// loop asks [`Health::release_due`] until it is made.
    fn answered(&self, now_ms: i64) -> bool {
        let mut s = self.state();
        if std::mem::take(&mut s.down) {
            s.owed = true;
        }
        s.take_release(now_ms)
    }

    /// True when an owed release may be made now; false while the target's
    /// last answer was a failure (its next success will release).
    fn release_due(&self, now_ms: i64) -> bool {
        let mut s = self.state();
        !s.down && s.take_release(now_ms)
    }
}

impl HealthState {
    fn take_release(&mut self, now_ms: i64) -> bool {
        let allowed = self
            .released_at_ms
            .is_none_or(|last| now_ms - last >= RELEASE_AT_MOST_EVERY_MS);
        if !self.owed || !allowed {
            return false;
        }
        self.owed = false;
        self.released_at_ms = Some(now_ms);
        true
    }
}

impl Dispatcher {
    /// Makes the target's backed-off deliveries due now and wakes its worker.
    async fn release_backlog(&self, name: &str) {
        let now = self.clock.now_ms();
        match self.spool.release_backoff(name, UnixMs(now)).await {
            Ok(n) => {
                tracing::info!(target = %name, released = n, "target answers again; its backlog is due now")
            }
            Err(e) => {
                self.spool_failed(name, "release");
                tracing::warn!(target = %name, error = %e, "cannot release the backlog")
            }
        }
        self.wake(name);
    }

    fn spool_failed(&self, target: &str, operation: &str) {
        self.metrics
            .spool_failures
            .with_label_values(&[target, operation])
            .inc();
    }
}

/// How often a spool failure that keeps happening is logged again. A full
/// disk fails every write, and a line per failure would go to that disk.
const REPEAT_LOG_EVERY: Duration = Duration::from_secs(60);

/// One kind of spool failure of one target, for logging it without a line per
/// occurrence: the first, then a count at most every [`REPEAT_LOG_EVERY`],
/// then once when it works again.
#[derive(Default)]
struct Repeats(Mutex<RepeatState>);

#[derive(Default)]
struct RepeatState {
    failing: bool,
    logged_at: Option<std::time::Instant>,
    unlogged: u64,
}

/// What to log for one more failure.
enum Repeat {
    First,
    /// Failures since the last line, this one included.
    Summary(u64),
    Quiet,
}

impl Repeats {
    fn state(&self) -> std::sync::MutexGuard<'_, RepeatState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self) -> Repeat {
        self.failed_at(std::time::Instant::now())
    }

    fn failed_at(&self, now: std::time::Instant) -> Repeat {
        let mut s = self.state();
        if !std::mem::replace(&mut s.failing, true) {
            s.logged_at = Some(now);
            s.unlogged = 0;
            return Repeat::First;
        }
        s.unlogged += 1;
        if s.logged_at
            .is_some_and(|at| now.duration_since(at) < REPEAT_LOG_EVERY)
        {
            return Repeat::Quiet;
        }
        s.logged_at = Some(now);
        Repeat::Summary(std::mem::take(&mut s.unlogged))
    }

    /// `Some(failures not logged yet)` when this success ends a run of failures.
    fn succeeded(&self) -> Option<u64> {
        let mut s = self.state();
        std::mem::take(&mut s.failing).then(|| std::mem::take(&mut s.unlogged))
    }
}

/// The spool failures a target's worker has seen.
#[derive(Default)]
struct Faults {
    lease: Repeats,
    settle: Repeats,
}

impl Dispatcher {
    /// Delivers `name`'s due deliveries until stopped or until the target is no
    /// longer configured. Returns the target's name.
    async fn run_target(self: Arc<Self>, name: String, mut stop: watch::Receiver<bool>) -> String {
        let state = self.target_state(&name);
        self.show_circuit(&name, state.circuit.phase());
        let mut slots: Option<(usize, Arc<Semaphore>)> = None;
        let mut in_flight = JoinSet::new();
        let mut removed = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let config = self.config.load_full();
            let Some(target) = config.targets.get(&name).cloned() else {
                removed = true;
                break;
            };
            if target.paused {
                // Held on purpose: wait for a reload rather than poll the spool.
                tokio::select! {
                    _ = self.config_changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stopping(&mut stop) => break,
                }
                continue;
            }
            let semaphore = slots_for(&mut slots, target.concurrency);
            let first = tokio::select! {
                permit = semaphore.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stopping(&mut stop) => break,
            };
            while in_flight.try_join_next().is_some() {}
            let free = semaphore.available_permits() + 1;
            match self.next_leases(&target, &state, free).await {
                Ok((leases, probe)) => {
                    self.spawn_attempts(&mut in_flight, &target, leases, probe, first, &semaphore);
                }
                Err(pause) => {
                    drop(first);
                    let resume = async {
                        match pause {
                            Pause::Woken => {
                                tokio::select! {
                                    _ = state.wake.notified() => {}
                                    _ = tokio::time::sleep(self.idle_poll()) => {}
                                }
                            }
                            Pause::For(wait) => tokio::time::sleep(wait).await,
                        }
                    };
                    tokio::select! {
                        _ = resume => {}
                        _ = stopping(&mut stop) => break,
                    }
                }
            }
        }
        // Let the attempts under way end; the caller bounds this with its drain deadline.
        while in_flight.join_next().await.is_some() {}
        if removed {
            self.forget(&name);
        }
        name
    }

    /// A target a reload removed leaves no circuit behind: no series that
    /// would keep an open circuit's alert firing, and a fresh start if a
    /// later reload brings it back.
    fn forget(&self, name: &str) {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        targets.remove(name);
        // Absent when it was never shown; nothing to remove then.
        let _ = self.metrics.target_circuit.remove_label_values(&[name]);
    }

    /// The deliveries to send now, up to `free` of them, as the circuit
    /// allows (true: the one is its probe), with those past `max_age`
    /// dead-lettered; or how long to pause when there are none.
    async fn next_leases(
        &self,
        target: &Target,
        state: &TargetState,
        free: usize,
    ) -> Result<(Vec<Lease>, bool), Pause> {
        let now = self.clock.now_ms();
        let before = state.circuit.phase();
        let probe = match state.circuit.gate(&target.breaker, now) {
            Gate::Send => {
                if before != Phase::Closed {
                    // A reload turned the breaker off.
                    self.show_circuit(&target.name, Phase::Closed);
                }
                false
            }
            Gate::Probe => {
                self.show_circuit(&target.name, Phase::Probing);
                true
            }
            // Not past IDLE_POLL: a reload may change the breaker.
            Gate::WaitUntil(at) => {
                let wait = Duration::from_millis((at - now).max(1) as u64);
                return Err(Pause::For(wait.min(IDLE_POLL)));
            }
            Gate::ProbeOut => return Err(Pause::Woken),
        };
        if !probe && state.health.release_due(now) {
            self.release_backlog(&target.name).await;
        }
        let limit = if probe { 1 } else { free };
        let Some(leases) = self.lease(&target.name, target, state, now, limit).await else {
            self.no_probe(target, state, probe, false, now);
            return Err(Pause::For(Duration::from_secs(1)));
        };
        let (leases, expired) = self.expire(target, state, leases, now).await;
        if leases.is_empty() {
            self.no_probe(target, state, probe, expired > 0, now);
            // What expired may hide due deliveries behind it: look again at
            // once, not at the next wake, or a backlog of stale ones would
            // hold back the fresh ones (and the probe) by a pause each.
            return Err(if expired > 0 {
                Pause::For(Duration::ZERO)
            } else {
                Pause::Woken
            });
        }
        Ok((leases, probe))
    }

    /// Leases up to `free` due deliveries; `None` when the spool cannot,
    /// logged without a line per failure.
    async fn lease(
        &self,
        name: &str,
        target: &Target,
        state: &TargetState,
        now: i64,
        free: usize,
    ) -> Option<Vec<Lease>> {
        match self
            .spool
            .lease(name, UnixMs(now), free, lease_ms(target))
            .await
        {
            Ok(leases) => {
                if let Some(unlogged) = state.faults.lease.succeeded() {
                    tracing::info!(target = %name, unlogged_failures = unlogged, "the spool hands out deliveries again");
                }
                Some(leases)
            }
            Err(e) => {
                self.spool_failed(name, "lease");
                match state.faults.lease.failed() {
                    Repeat::First => {
                        tracing::error!(target = %name, error = %e, "cannot lease deliveries; trying again every second")
                    }
                    Repeat::Summary(n) => {
                        tracing::error!(target = %name, error = %e, failures = n, "still cannot lease deliveries")
                    }
                    Repeat::Quiet => {}
                }
                None
            }
        }
    }

    /// A probe found nothing it could send: the circuit waits again, or,
    /// when what it found had expired, probes again at once with the next.
    fn no_probe(&self, target: &Target, state: &TargetState, probe: bool, expired: bool, now: i64) {
        if !probe {
            return;
        }
        if expired {
            state.circuit.probe_again();
        } else {
            let unit: f64 = rand::thread_rng().gen();
            state.circuit.nothing_to_probe(&target.breaker, now, unit);
        }
        self.show_circuit(&target.name, state.circuit.phase());
    }

    /// Dead-letters the leased deliveries whose event arrived longer ago than
    /// the target's `max_age`, in one write; returns the others and how many
    /// expired.
    async fn expire(
        &self,
        target: &Target,
        state: &TargetState,
        leases: Vec<Lease>,
        now: i64,
    ) -> (Vec<Lease>, usize) {
        let Some(max_age) = target.max_age else {
            return (leases, 0);
        };
        let max_ms = max_age.as_millis() as i64;
        // The age counts from the event's arrival; for a delivery not tried
        // since an operator replayed it, from the replay: `dlq replay --force`
        // sends an expired one once.
        let since = |l: &Lease| match l.attempts {
            0 => l.event.received_at.max(l.schedule.due_at),
            _ => l.event.received_at,
        };
        let (stale, fresh): (Vec<Lease>, Vec<Lease>) = leases
            .into_iter()
            .partition(|l| UnixMs(now) - since(l) > max_ms);
        if stale.is_empty() {
            return (fresh, 0);
        }
        let error = format!(
            "older than the target's max_age of {}",
            humantime::format_duration(max_age)
        );
        let expired: Vec<Settle> = stale
            .iter()
            .map(|l| Settle {
                lease: l.token,
                settlement: Settlement::Dead {
                    delivery_id: l.delivery_id,
                    reason: DeadReason::Expired,
                    error: error.clone(),
                },
            })
            .collect();
        self.metrics
            .dead_letters
            .with_label_values(&[target.name.as_str(), DeadReason::Expired.as_str()])
            .inc_by(expired.len() as u64);
        let n = expired.len();
        tracing::warn!(target = %target.name, expired = n, "deliveries older than max_age dead-lettered instead of sent");
        self.record(&target.name, &state.faults, expired).await;
        (fresh, n)
    }

    /// Starts an attempt per lease, each holding a slot: `first`, then the
    /// free ones the lease was sized by. `probe`: the lease is the circuit's
    /// one probe.
    fn spawn_attempts(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<()>,
        target: &Target,
        leases: Vec<Lease>,
        probe: bool,
        first: OwnedSemaphorePermit,
        semaphore: &Arc<Semaphore>,
    ) {
        let mut permit = Some(first);
        for lease in leases {
            let permit = match permit.take() {
                Some(p) => p,
                None => match semaphore.clone().try_acquire_owned() {
                    Ok(p) => p,
                    // Not reached: the lease asked for no more than the free slots.
                    Err(_) => break,
                },
            };
            let this = self.clone();
            let target = target.clone();
            in_flight.spawn(async move {
                let due = Due {
                    delivery_id: lease.delivery_id,
                    attempts: lease.attempts,
                    schedule: lease.schedule,
                    lease: lease.token,
                    probe,
                };
                this.attempt_and_record(
                    &target,
                    due,
                    &lease.event,
                    target.timeout,
                    Record::Awaited,
                )
                .await;
                drop(permit);
            });
        }
    }
}

/// Why a worker has nothing to send, and what it waits for.
enum Pause {
    /// Its wake signal, or the idle poll: nothing is due.
    Woken,
    /// A time: the spool failed, or the circuit is open; none after
    /// expiring deliveries.
    For(Duration),
}

/// The target's slots. The concurrency limit may change on reload; a new
/// limit takes a new semaphore, and attempts under the old one finish under it.
fn slots_for(slots: &mut Option<(usize, Arc<Semaphore>)>, concurrency: usize) -> Arc<Semaphore> {
    match slots {
        Some((n, s)) if *n == concurrency => s.clone(),
        _ => {
            let s = Arc::new(Semaphore::new(concurrency));
            *slots = Some((concurrency, s.clone()));
            s
        }
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_failure_is_logged_first_then_counted_once_a_minute() {
        let repeats = Repeats::default();
        let t0 = std::time::Instant::now();
        assert!(matches!(repeats.failed_at(t0), Repeat::First));
        for s in 1..60 {
            let at = t0 + Duration::from_secs(s);
            assert!(matches!(repeats.failed_at(at), Repeat::Quiet), "{s} s");
        }
        let later = t0 + REPEAT_LOG_EVERY;
        assert!(matches!(repeats.failed_at(later), Repeat::Summary(60)));
        assert!(matches!(
            repeats.failed_at(later + Duration::from_secs(1)),
            Repeat::Quiet
        ));
        assert_eq!(repeats.succeeded(), Some(1));
        assert_eq!(repeats.succeeded(), None);
        assert!(matches!(repeats.failed_at(later), Repeat::First));
    }

    #[test]
    fn a_release_held_back_by_the_limit_is_owed_until_made() {
        let health = Health::default();
        health.failed();
        assert!(health.answered(1_000), "the first release is at once");
        health.failed();
        assert!(!health.answered(5_000), "within ten seconds: held back");
        assert!(!health.release_due(9_000));
        health.failed();
        assert!(
            !health.release_due(12_000),
            "down again: the next success releases"
        );
        assert!(health.answered(12_500));
        assert!(!health.release_due(30_000), "nothing owed any more");
        health.failed();
        assert!(!health.answered(13_000));
        assert!(health.release_due(22_500), "made once the limit allows");
    }
}
