//! Delivery: one worker loop per target leases due deliveries from the spool,
//! sends them (at most `concurrency` at once per target, so a slow or dead
//! target only ever holds its own slots), and records each outcome.
//!
//! Who owns what:
//!
//! - this file: the [`Dispatcher`], which holds what delivery shares (the
//!   configuration, the spool, the clock, the metrics, the HTTP client) and
//!   each target's state between attempts;
//! - [`mod@attempt`]: one attempt over HTTP and what its answer means, and
//!   the outbound client;
//! - `worker`: the worker loop per target and its supervisor: leasing what is
//!   due as the circuit allows, expiring what is too old, retiring removed
//!   targets;
//! - `record`: the one way an attempt is made and its outcome recorded, for
//!   the workers and the request path's inline reply alike, with its
//!   metrics and log line;
//! - `health`: what an attempt says about its target, the one classification
//!   that drives both the target's circuit ([`breaker`]) and the release of
//!   its backed-off deliveries when it answers again;
//! - `faults`: logging a spool failure that keeps happening without a line
//!   per occurrence.
//!
//! The loop moves bytes only: the request comes from [`mod@format`], the meaning of
//! the answer and the next attempt's time from [`retry`].

pub mod adapter;
pub mod attempt;
pub mod breaker;
pub(crate) mod faults;
pub mod format;
mod health;
mod record;
pub mod retry;
mod worker;

pub use attempt::{client, HttpClient, Unread};

use crate::clock::Clock;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::spool::{DueWaker, Work};
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use faults::Faults;
use health::TargetHealth;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

/// Owns delivery: the target workers and their wake signals, each target's
/// health, retiring removed targets, and the one way an attempt is made and
/// recorded, for the workers and the request path's inline reply alike.
pub struct Dispatcher {
    config: Arc<ArcSwap<Settings>>,
    spool: Arc<dyn Work>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    client: HttpClient,
    /// Where attempts' spans go, when traces are exported.
    telemetry: Option<Arc<Telemetry>>,
    /// Signalled after a reload, so new targets get a worker.
    config_changed: Notify,
    targets: Mutex<HashMap<String, Arc<TargetState>>>,
    /// Outcomes of inline attempts still being written; awaited at shutdown.
    records: Mutex<JoinSet<()>>,
    /// Set by [`Dispatcher::poll_idle_every`]; the workers' default otherwise.
    idle_poll: std::sync::OnceLock<std::time::Duration>,
    /// Told of every answer a worker's delivery got ([`Dispatcher::on_worker_answer`]).
    worker_answers: std::sync::OnceLock<WorkerAnswers>,
}

/// What is told of a worker's delivered attempt and its target's answer:
/// a reply target's answer that a worker got (its inline attempt cut short by
/// a restart, or failed) may still be one for the user, kept before the
/// delivery is recorded delivered.
pub type WorkerAnswers = Box<
    dyn Fn(&crate::config::Target, &crate::spool::Event, bytes::Bytes) -> Option<Keeping>
        + Send
        + Sync,
>;

/// What is told of an inline attempt's delivered answer: the answer may be
/// one to keep (a late reply) before the delivery is recorded delivered.
pub type InlineAnswer = Box<dyn FnOnce(&attempt::Attempt) -> Option<Keeping> + Send>;

/// Keeps a target's answer before its delivery is recorded delivered;
/// resolves to whether it was kept. One that was not leaves the delivery to
/// be tried again, so the answer is asked for again rather than lost.
pub type Keeping = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// What the dispatcher knows of one target between attempts.
#[derive(Default)]
struct TargetState {
    /// What its worker waits on when it has nothing due.
    wake: Notify,
    /// Its circuit and whether its backlog is owed a release, both driven
    /// by what each attempt says about it.
    health: TargetHealth,
    /// The spool failures its worker has seen, for logging them quietly.
    faults: Faults,
}

impl Dispatcher {
    pub fn new(
        config: Arc<ArcSwap<Settings>>,
        spool: Arc<dyn Work>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        telemetry: Option<Arc<Telemetry>>,
    ) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            config,
            spool,
            clock,
            metrics,
            client: client(),
            telemetry,
            config_changed: Notify::new(),
            targets: Mutex::new(HashMap::new()),
            records: Mutex::new(JoinSet::new()),
            idle_poll: std::sync::OnceLock::new(),
            worker_answers: std::sync::OnceLock::new(),
        })
    }

    /// Starts the delivery workers: one loop per configured target, and a
    /// supervisor that starts loops for targets added by a reload (a loop
    /// whose target disappears ends by itself).
    pub fn start(self: &Arc<Self>, stop: watch::Receiver<bool>) -> JoinSet<()> {
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().supervise(stop));
        tasks
    }

    /// Wakes the workers of a configured target when another replica makes
    /// its deliveries due.
    pub fn due_waker(self: &Arc<Self>) -> DueWaker {
        let dispatcher = Arc::downgrade(self);
        Box::new(move |target| {
            if let Some(d) = dispatcher.upgrade() {
                if d.config.load().targets.contains_key(target) {
                    d.wake(target);
                }
            }
        })
    }

    /// How often idle workers look in the spool unprompted, instead of the
    /// default; set before [`Dispatcher::start`].
    pub fn poll_idle_every(&self, every: std::time::Duration) {
        let _ = self.idle_poll.set(every);
    }

    /// Has `hook` told of each answer a worker's delivery gets; set once,
    /// before [`Dispatcher::start`].
    pub fn on_worker_answer(&self, hook: WorkerAnswers) {
        let _ = self.worker_answers.set(hook);
    }

    /// Tells a target's worker that a delivery is due now.
    pub fn wake(&self, target: &str) {
        self.target_state(target).wake.notify_one();
    }

    /// Tells the workers the configuration changed: targets may have come or gone.
    pub fn reconfigured(&self) {
        self.config_changed.notify_waiters();
    }

    /// Where a target's circuit stands now, for the pages.
    pub fn circuit(&self, target: &str) -> breaker::Phase {
        self.target_state(target).health.phase()
    }

    fn target_state(&self, target: &str) -> Arc<TargetState> {
        let mut targets = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        // Looked up on every push: no new name is allocated for a known target.
        if let Some(state) = targets.get(target) {
            return state.clone();
        }
        targets.entry(target.to_string()).or_default().clone()
    }
}
