//! What an attempt says about its target, classified once: [`Signal`]. The
//! one classification drives both notions of a target's health, so they
//! cannot disagree about what a failure is:
//!
//! - its circuit ([`super::breaker`]): failures in a row open it;
//! - its backlog: once it was down and answers again, its backed-off
//!   deliveries are made due at once (at most every 10 s), so a backlog
//!   drains at full speed rather than as each delivery's backoff ends.
//!
//! A target is down-like when it did not answer, timed out, or answered 408,
//! 429 or 5xx; it answered when it gave a 2xx or any other status (a 4xx is
//! the event's fault and proves the target is there). An attempt that was
//! never sent says nothing.

use super::attempt::Attempt;
use super::breaker::{Circuit, Phase};
use super::retry::Verdict;
use super::{Dispatcher, TargetState};
use crate::config::{Breaker, Target};
use crate::spool::UnixMs;
use rand::Rng;
use std::sync::Mutex;
use std::time::Duration;

/// What one attempt says about its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// It answered: a 2xx, or a status that is the event's fault (4xx).
    Answered,
    /// It failed as if down (no answer, a timeout, 408, 429, 5xx); it may
    /// have asked to be left alone this long.
    Down { retry_after: Option<Duration> },
    /// Nothing reached it: the request could not even be built.
    Unsent,
}

impl Signal {
    /// The one classification of an attempt, from its verdict and status.
    pub fn of(attempt: &Attempt) -> Signal {
        match (&attempt.verdict, attempt.status) {
            (Verdict::Retry { retry_after, .. }, _) => Signal::Down {
                retry_after: *retry_after,
            },
            (Verdict::Delivered | Verdict::Reject { .. }, Some(_)) => Signal::Answered,
            (Verdict::Delivered | Verdict::Reject { .. }, None) => Signal::Unsent,
        }
    }
}

/// A target's health: its circuit and its backlog, both fed the same
/// [`Signal`] of each attempt.
#[derive(Default)]
pub struct TargetHealth {
    circuit: Circuit,
    backlog: Backlog,
}

/// What one attempt changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The circuit's phase before and after.
    pub before: Phase,
    pub after: Phase,
    /// The target's backed-off deliveries are to be made due now.
    pub release: bool,
}

impl TargetHealth {
    pub fn phase(&self) -> Phase {
        self.circuit.phase()
    }

    /// The circuit, for the worker's gate and its probes.
    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    /// Takes an attempt's signal (`probe`: it was the circuit's probe). A
    /// circuit that closes releases the backlog at once; otherwise an answer
    /// after being down does, at most every [`RELEASE_AT_MOST_EVERY_MS`].
    pub fn observe(
        &self,
        config: &Breaker,
        probe: bool,
        signal: Signal,
        now_ms: i64,
        unit: f64,
    ) -> Observed {
        let (before, after) = self.circuit.observe(config, probe, signal, now_ms, unit);
        let closed = before != Phase::Closed && after == Phase::Closed;
        let release = self.backlog.observe(signal, closed, now_ms);
        Observed {
            before,
            after,
            release,
        }
    }

    /// True when a release held back by the rate limit may be made now.
    pub fn release_due(&self, now_ms: i64) -> bool {
        self.backlog.release_due(now_ms)
    }
}

/// Whether a target looks down, and whether its backlog is owed a release.
#[derive(Default)]
struct Backlog(Mutex<BacklogState>);

#[derive(Default)]
struct BacklogState {
    /// The target's last signal was [`Signal::Down`].
    down: bool,
    /// It answered after being down, and its backlog has not been released
    /// since (the release waits for [`RELEASE_AT_MOST_EVERY_MS`]).
    owed: bool,
    released_at_ms: Option<i64>,
}

/// A flapping target (some answers, some 5xx) must not get its whole backlog
/// back on every success.
const RELEASE_AT_MOST_EVERY_MS: i64 = 10_000;

impl Backlog {
    fn state(&self) -> std::sync::MutexGuard<'_, BacklogState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a signal: true when the backlog should be released now. An
    /// answer after being down owes a release; `now` (the circuit closed)
    /// makes it whatever the rate limit says. A release the limit holds
    /// back is owed, not forgotten: the worker loop asks
    /// [`Backlog::release_due`] until it is made.
    fn observe(&self, signal: Signal, now: bool, now_ms: i64) -> bool {
        let mut s = self.state();
        match signal {
            Signal::Down { .. } => {
                s.down = true;
                false
            }
            Signal::Unsent => false,
            Signal::Answered => {
                if std::mem::take(&mut s.down) {
                    s.owed = true;
                }
                if now {
                    s.owed = false;
                    s.released_at_ms = Some(now_ms);
                    return true;
                }
                s.take_release(now_ms)
            }
        }
    }

    /// True when an owed release may be made now; false while the target's
    /// last signal was a failure (its next answer will release).
    fn release_due(&self, now_ms: i64) -> bool {
        let mut s = self.state();
        !s.down && s.take_release(now_ms)
    }
}

impl BacklogState {
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
    /// Tells the target's health what an attempt said: shows and logs a
    /// change of its circuit, and returns whether its backlog is to be
    /// released now.
    pub(super) fn observe_health(
        &self,
        target: &Target,
        state: &TargetState,
        probe: bool,
        attempt: &Attempt,
    ) -> bool {
        let unit: f64 = rand::thread_rng().gen();
        let signal = Signal::of(attempt);
        let now = self.clock.now_ms();
        let Observed {
            before,
            after,
            release,
        } = state
            .health
            .observe(&target.breaker, probe, signal, now, unit);
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
        release
    }

    pub(super) fn show_circuit(&self, target: &str, phase: Phase) {
        self.metrics
            .target_circuit
            .with_label_values(&[target])
            .set(phase as i64);
    }

    /// Makes the target's backed-off deliveries due now and wakes its worker.
    pub(super) async fn release_backlog(&self, name: &str) {
        let now = self.clock.now_ms();
        match self.spool.release_backoff(name, UnixMs(now)).await {
            Ok(n) => {
                tracing::info!(target = %name, released = n, "target answers again; its backlog is due now")
            }
            Err(e) => {
                self.spool_failed(name, "release");
                tracing::warn!(target = %name, error = %crate::error_chain(&e), "cannot release the backlog")
            }
        }
        self.wake(name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::attempt::Unread;
    use super::*;
    use bytes::Bytes;
    use http::StatusCode;

    const DOWN: Signal = Signal::Down { retry_after: None };

    fn answer(status: u16) -> Attempt {
        let status = StatusCode::from_u16(status).unwrap();
        let verdict = super::super::retry::classify(status, None, "");
        Attempt {
            verdict,
            status: Some(status),
            body: Ok(Bytes::new()),
        }
    }

    fn no_answer() -> Attempt {
        Attempt {
            verdict: Verdict::Retry {
                error: "no answer within 5s".into(),
                retry_after: None,
            },
            status: None,
            body: Err(Unread::Missing),
        }
    }

    #[test]
    fn an_attempt_is_classified_once_as_answered_down_or_unsent() {
        for status in [200, 204, 400, 404, 410] {
            assert_eq!(Signal::of(&answer(status)), Signal::Answered, "{status}");
        }
        for status in [408, 429, 500, 502, 503] {
            assert_eq!(Signal::of(&answer(status)), DOWN, "{status}");
        }
        assert_eq!(Signal::of(&no_answer()), DOWN);
        let unsent = Attempt {
            verdict: Verdict::Reject {
                error: "bad request".into(),
            },
            status: None,
            body: Err(Unread::Missing),
        };
        assert_eq!(Signal::of(&unsent), Signal::Unsent);
    }

    const BREAKER: Breaker = Breaker {
        failures: 2,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(4),
        retry_after_up_to_max: false,
    };

    #[test]
    fn what_opens_the_circuit_also_owes_the_backlog_a_release() {
        for failing in [408, 429, 503] {
            let health = TargetHealth::default();
            let observe = |attempt: &Attempt, at| {
                health.observe(&BREAKER, false, Signal::of(attempt), at, 0.5)
            };
            observe(&answer(failing), 0);
            let opened = observe(&answer(failing), 0);
            assert_eq!((opened.after, opened.release), (Phase::Open, false));
            // A 4xx is an answer: it closes the circuit and releases.
            let back = health.observe(&BREAKER, false, Signal::Answered, 10, 0.5);
            assert_eq!(
                (back.before, back.after, back.release),
                (Phase::Open, Phase::Closed, true),
                "{failing}"
            );
        }
        // An attempt never sent says nothing about either.
        let health = TargetHealth::default();
        health.observe(&BREAKER, false, DOWN, 0, 0.5);
        let unsent = health.observe(&BREAKER, false, Signal::Unsent, 0, 0.5);
        assert_eq!((unsent.after, unsent.release), (Phase::Closed, false));
        let failed = health.observe(&BREAKER, false, DOWN, 0, 0.5);
        assert_eq!(failed.after, Phase::Open, "the count went on");
    }

    #[test]
    fn a_release_held_back_by_the_limit_is_owed_until_made() {
        let health = TargetHealth::default();
        let observe = |signal, at| health.observe(&BREAKER, false, signal, at, 0.5).release;
        let answered = |at| observe(Signal::Answered, at);
        observe(DOWN, 0);
        assert!(answered(1_000), "the first release is at once");
        observe(DOWN, 1_000);
        assert!(!answered(5_000), "within ten seconds: held back");
        assert!(!health.release_due(9_000));
        observe(DOWN, 9_000);
        assert!(
            !health.release_due(12_000),
            "down again: the next answer releases"
        );
        assert!(answered(12_500));
        assert!(!health.release_due(30_000), "nothing owed any more");
        observe(DOWN, 13_000);
        assert!(!answered(13_000));
        assert!(health.release_due(22_500), "made once the limit allows");
    }
}
