//! The worker loop of each target and their supervisor: lease what is due
//! (as the target's circuit allows), dead-letter what is older than
//! `max_age`, start an attempt per lease within the target's concurrency,
//! and sleep until woken or polled; retire the deliveries of targets a
//! reload removed.

use super::breaker::{Gate, Phase};
use super::faults::Repeat;
use super::record::{Due, Record};
use super::{Dispatcher, TargetState};
use crate::config::{Settings, Target};
use crate::metrics::Metrics;
use crate::server::stopping;
use crate::spool::{DeadReason, Lease, Settle, Settlement, SpoolError, UnixMs};
use prometheus::IntCounter;
use rand::Rng;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// How often an idle worker looks for retries that have become due.
const IDLE_POLL: Duration = Duration::from_millis(250);

impl Dispatcher {
    fn idle_poll(&self) -> Duration {
        self.idle_poll.get().copied().unwrap_or(IDLE_POLL)
    }
}

/// How long a worker holds a delivery it leased: longer than the attempt's
/// timeout, so a slow answer is not sent twice; a worker that dies leaves it
/// to expire and be sent again.
fn lease_length(target: &Target) -> Duration {
    target.timeout * 2 + Duration::from_secs(2)
}

/// How often pending deliveries of targets that are no longer configured are
/// dead-lettered: a request that began under the previous configuration can
/// store one just after a reload retired the rest.
const RETIRE_EVERY: Duration = Duration::from_secs(30);

impl Dispatcher {
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

    pub(super) async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
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
                        tracing::warn!(error = %crate::error_chain(&e), "cannot retire the deliveries of removed targets");
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

    /// Delivers `name`'s due deliveries until stopped or until the target is no
    /// longer configured. Returns the target's name.
    async fn run_target(self: Arc<Self>, name: String, mut stop: watch::Receiver<bool>) -> String {
        let state = self.target_state(&name);
        self.show_circuit(&name, state.health.circuit().phase());
        let counts = LeaseCounts::of(&self.metrics, &name);
        let mut slots: Option<(usize, Arc<Semaphore>)> = None;
        let mut in_flight = JoinSet::new();
        let mut removed = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let config = self.config.load_full();
            let Some(target) = config.targets.get(&name) else {
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
            let pause = match self.next_leases(target, &state, free, &counts).await {
                Ok(Leased {
                    leases,
                    probe,
                    drained,
                }) => {
                    let attempts = (&config, name.as_str(), first, &semaphore);
                    self.spawn_attempts(&mut in_flight, attempts, leases, probe);
                    // Nothing more was due: another lease now would find
                    // nothing; the next delivery stored wakes the worker.
                    if !drained {
                        continue;
                    }
                    Pause::Woken
                }
                Err(pause) => {
                    drop(first);
                    pause
                }
            };
            tokio::select! {
                _ = self.pause(&state, pause) => {}
                _ = stopping(&mut stop) => break,
            }
        }
        // Let the attempts under way end; the caller bounds this with its drain deadline.
        while in_flight.join_next().await.is_some() {}
        if removed {
            self.forget(&name);
        }
        name
    }

    /// Waits as `pause` says: for the target's wake signal or the idle
    /// poll, whichever comes first, or for a time.
    async fn pause(&self, state: &TargetState, pause: Pause) {
        match pause {
            Pause::Woken => {
                tokio::select! {
                    _ = state.wake.notified() => {}
                    _ = tokio::time::sleep(self.idle_poll()) => {}
                }
            }
            Pause::For(wait) => tokio::time::sleep(wait).await,
        }
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
    /// allows, with those past `max_age` dead-lettered; or how long to pause
    /// when there are none.
    async fn next_leases(
        &self,
        target: &Target,
        state: &TargetState,
        free: usize,
        counts: &LeaseCounts,
    ) -> Result<Leased, Pause> {
        // A wake stored before this point is answered by the lease below,
        // which sees all that was stored before it: kept, it would only
        // make the worker lease again for nothing.
        let stored = std::pin::pin!(state.wake.notified());
        stored.enable();
        let now = self.clock.now_ms();
        let before = state.health.circuit().phase();
        let probe = match state.health.circuit().gate(&target.breaker, now) {
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
        counts.count(leases.len());
        // Fewer than asked for: nothing else was due. A probe's one lease
        // says nothing of what is behind it.
        let drained = !probe && leases.len() < limit;
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
        Ok(Leased {
            leases,
            probe,
            drained,
        })
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
            .lease(name, UnixMs(now), free, lease_length(target))
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
                        tracing::error!(target = %name, error = %crate::error_chain(&e), "cannot lease deliveries; trying again every second")
                    }
                    Repeat::Summary(n) => {
                        tracing::error!(target = %name, error = %crate::error_chain(&e), failures = n, "still cannot lease deliveries")
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
            state.health.circuit().probe_again();
        } else {
            let unit: f64 = rand::thread_rng().gen();
            state
                .health
                .circuit()
                .nothing_to_probe(&target.breaker, now, unit);
        }
        self.show_circuit(&target.name, state.health.circuit().phase());
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
                trail: None,
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
    /// one probe. Each attempt reads its target from the configuration it
    /// was leased under, shared rather than copied.
    fn spawn_attempts(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<()>,
        (config, name, first, semaphore): (
            &Arc<Settings>,
            &str,
            OwnedSemaphorePermit,
            &Arc<Semaphore>,
        ),
        leases: Vec<Lease>,
        probe: bool,
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
            let config = config.clone();
            let name = name.to_string();
            in_flight.spawn(async move {
                // Present: the map is the one the worker found the target in.
                let Some(target) = config.targets.get(&name) else {
                    return;
                };
                let due = Due {
                    delivery_id: lease.delivery_id,
                    event_id: lease.event_id,
                    attempts: lease.attempts,
                    schedule: lease.schedule,
                    lease: lease.token,
                    probe,
                    inline: false,
                };
                this.attempt_and_record(target, due, &lease.event, target.timeout, Record::Awaited)
                    .await;
                drop(permit);
            });
        }
    }
}

/// What a worker leased: the deliveries, whether the one is the circuit's
/// probe, and whether the lease found fewer than it asked for, so nothing
/// else is due until the worker is woken or polls.
struct Leased {
    leases: Vec<Lease>,
    probe: bool,
    drained: bool,
}

/// A target's lease counters, resolved once for its worker's life.
struct LeaseCounts {
    found: IntCounter,
    empty: IntCounter,
}

impl LeaseCounts {
    fn of(metrics: &Metrics, target: &str) -> LeaseCounts {
        LeaseCounts {
            found: metrics.leases.with_label_values(&[target, "found"]),
            empty: metrics.leases.with_label_values(&[target, "empty"]),
        }
    }

    fn count(&self, leased: usize) {
        match leased {
            0 => self.empty.inc(),
            _ => self.found.inc(),
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
