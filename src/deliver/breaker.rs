//! A target's circuit breaker, as a small state machine with the time and
//! the jitter passed in. After `failures` failures in a row (no answer, 408,
//! 429, 5xx) the circuit opens: the target's deliveries stay due in the spool
//! and no attempt is made, so a dead target costs no connection and no spool
//! write per delivery. Once a backoff has passed, one delivery is sent as a
//! probe; its success closes the circuit, its failure opens it again for
//! twice as long (jittered, capped at `max_backoff`, never sooner than a
//! `Retry-After`, which a `login` target's circuit honours only up to
//! `max_backoff`). Any answer other than a failure closes it: a 4xx is the
//! event's fault, and proves the target is there.

use super::health::Signal;
use super::retry::jittered;
use crate::config::Breaker;
use std::sync::Mutex;
use std::time::Duration;

/// Where a circuit stands; the numbers are the metric's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Closed = 0,
    Open = 1,
    Probing = 2,
}

impl Phase {
    /// Its name on the pages and in the trail.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::Probing => "half_open",
        }
    }
}

/// What the worker may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Send as many as it has slots for.
    Send,
    /// Send one delivery, the probe.
    Probe,
    /// Send nothing before this (unix milliseconds).
    WaitUntil(i64),
    /// Send nothing while the probe is out.
    ProbeOut,
}

#[derive(Debug, Default)]
pub struct Circuit(Mutex<State>);

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Failures in a row while closed.
    failures: u32,
    /// Failed probes since the circuit opened.
    probes_failed: u32,
    /// When the next probe may go, while open.
    probe_at: i64,
}

impl Default for State {
    fn default() -> Self {
        State {
            phase: Phase::Closed,
            failures: 0,
            probes_failed: 0,
            probe_at: 0,
        }
    }
}

impl Circuit {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn phase(&self) -> Phase {
        self.state().phase
    }

    /// What the worker may send at `now_ms`; when a probe is due, the
    /// circuit is probing from here on.
    pub fn gate(&self, config: &Breaker, now_ms: i64) -> Gate {
        let mut s = self.state();
        if config.failures == 0 {
            // Turned off by a reload.
            *s = State::default();
        }
        match s.phase {
            Phase::Closed => Gate::Send,
            Phase::Probing => Gate::ProbeOut,
            Phase::Open if now_ms >= s.probe_at => {
                s.phase = Phase::Probing;
                Gate::Probe
            }
            Phase::Open => Gate::WaitUntil(s.probe_at),
        }
    }

    /// The probe found nothing due to send: open again, probing after the
    /// same wait.
    pub fn nothing_to_probe(&self, config: &Breaker, now_ms: i64, unit: f64) {
        let mut s = self.state();
        if s.phase == Phase::Probing {
            s.phase = Phase::Open;
            s.probe_at = now_ms + wait(config, s.probes_failed, None, unit);
        }
    }

    /// The probe's delivery had expired instead of being sent: probe again
    /// at once, with the next one.
    pub fn probe_again(&self) {
        let mut s = self.state();
        if s.phase == Phase::Probing {
            s.phase = Phase::Open;
        }
    }

    /// Takes what an attempt said about the target; `probe` when it was the
    /// probe. Returns the phase before and after.
    pub fn observe(
        &self,
        config: &Breaker,
        probe: bool,
        signal: Signal,
        now_ms: i64,
        unit: f64,
    ) -> (Phase, Phase) {
        let mut s = self.state();
        let before = s.phase;
        match signal {
            Signal::Unsent => {}
            Signal::Answered => *s = State::default(),
            Signal::Down { retry_after } => match s.phase {
                Phase::Closed => {
                    s.failures += 1;
                    if config.failures > 0 && s.failures >= config.failures {
                        s.phase = Phase::Open;
                        s.probes_failed = 0;
                        s.probe_at = now_ms + wait(config, 0, retry_after, unit);
                    }
                }
                Phase::Probing if probe => {
                    s.probes_failed += 1;
                    s.phase = Phase::Open;
                    s.probe_at = now_ms + wait(config, s.probes_failed, retry_after, unit);
                }
                // An attempt that was under way when the circuit opened.
                Phase::Probing | Phase::Open => {}
            },
        }
        (before, s.phase)
    }
}

/// The wait before the next probe after `probes_failed` failed probes:
/// `backoff` doubled each time up to `max_backoff`, ±20 %, and never less
/// than the target's `Retry-After` (or than `max_backoff`, when that caps
/// it). Milliseconds.
fn wait(config: &Breaker, probes_failed: u32, retry_after: Option<Duration>, unit: f64) -> i64 {
    let doubled = config
        .backoff
        .saturating_mul(1u32 << probes_failed.min(20))
        .min(config.max_backoff);
    let asked = config.honoured(retry_after).unwrap_or_default();
    jittered(doubled, unit).max(asked).as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: Breaker = Breaker {
        failures: 3,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(4),
        retry_after_up_to_max: false,
    };
    const DOWN: Signal = Signal::Down { retry_after: None };

    #[test]
    fn opens_after_failures_in_a_row_and_an_answer_resets_the_count() {
        let c = Circuit::default();
        c.observe(&CONFIG, false, DOWN, 0, 0.5);
        c.observe(&CONFIG, false, DOWN, 0, 0.5);
        c.observe(&CONFIG, false, Signal::Answered, 0, 0.5);
        c.observe(&CONFIG, false, DOWN, 0, 0.5);
        assert_eq!(c.observe(&CONFIG, false, DOWN, 0, 0.5).1, Phase::Closed);
        assert_eq!(
            c.observe(&CONFIG, false, DOWN, 10, 0.5),
            (Phase::Closed, Phase::Open)
        );
        assert_eq!(c.gate(&CONFIG, 10), Gate::WaitUntil(1_010));
    }

    #[test]
    fn probes_one_at_a_time_backing_off_to_the_cap() {
        let c = Circuit::default();
        for _ in 0..3 {
            c.observe(&CONFIG, false, DOWN, 0, 0.5);
        }
        assert_eq!(c.gate(&CONFIG, 999), Gate::WaitUntil(1_000));
        assert_eq!(c.gate(&CONFIG, 1_000), Gate::Probe);
        assert_eq!(
            c.gate(&CONFIG, 1_001),
            Gate::ProbeOut,
            "one probe at a time"
        );
        // Late failures of attempts from before the opening change nothing.
        c.observe(&CONFIG, false, DOWN, 1_002, 0.5);
        assert_eq!(c.phase(), Phase::Probing);
        let mut at = 1_000;
        for expected in [2_000, 4_000, 4_000] {
            assert_eq!(
                c.observe(&CONFIG, true, DOWN, at, 0.5),
                (Phase::Probing, Phase::Open)
            );
            assert_eq!(c.gate(&CONFIG, at), Gate::WaitUntil(at + expected));
            at += expected;
            assert_eq!(c.gate(&CONFIG, at), Gate::Probe);
        }
        assert_eq!(
            c.observe(&CONFIG, true, Signal::Answered, at, 0.5),
            (Phase::Probing, Phase::Closed)
        );
        assert_eq!(c.gate(&CONFIG, at), Gate::Send);
    }

    #[test]
    fn a_retry_after_holds_the_next_probe_back_and_jitter_spreads_it() {
        let c = Circuit::default();
        for _ in 0..3 {
            c.observe(&CONFIG, false, DOWN, 0, 0.0);
        }
        assert_eq!(c.gate(&CONFIG, 0), Gate::WaitUntil(800), "-20 %");
        assert_eq!(c.gate(&CONFIG, 800), Gate::Probe);
        let asked = Signal::Down {
            retry_after: Some(Duration::from_secs(60)),
        };
        c.observe(&CONFIG, true, asked, 800, 0.5);
        assert_eq!(c.gate(&CONFIG, 800), Gate::WaitUntil(60_800));
    }

    #[test]
    fn a_capped_retry_after_holds_the_circuit_for_max_backoff_at_most() {
        let login = Breaker {
            retry_after_up_to_max: true,
            ..CONFIG
        };
        let asked = |secs| Signal::Down {
            retry_after: Some(Duration::from_secs(secs)),
        };
        let c = Circuit::default();
        for _ in 0..3 {
            c.observe(&login, false, asked(3_600), 0, 0.5);
        }
        assert_eq!(c.gate(&login, 0), Gate::WaitUntil(4_000), "max_backoff");
        assert_eq!(c.gate(&login, 4_000), Gate::Probe);
        c.observe(&login, true, asked(2), 4_000, 0.0);
        assert_eq!(
            c.gate(&login, 4_000),
            Gate::WaitUntil(6_000),
            "a shorter one still holds it beyond the jittered backoff"
        );
    }

    #[test]
    fn a_probe_with_nothing_to_send_waits_again_and_zero_failures_is_off() {
        let c = Circuit::default();
        for _ in 0..3 {
            c.observe(&CONFIG, false, DOWN, 0, 0.5);
        }
        assert_eq!(c.gate(&CONFIG, 1_000), Gate::Probe);
        c.nothing_to_probe(&CONFIG, 1_000, 0.5);
        assert_eq!(c.gate(&CONFIG, 1_000), Gate::WaitUntil(2_000));
        assert_eq!(c.gate(&CONFIG, 2_000), Gate::Probe);
        c.probe_again();
        assert_eq!(
            c.gate(&CONFIG, 2_000),
            Gate::Probe,
            "its delivery had expired"
        );
        let off = Breaker {
            failures: 0,
            ..CONFIG
        };
        assert_eq!(c.gate(&off, 1_000), Gate::Send);
        for _ in 0..100 {
            c.observe(&off, false, DOWN, 0, 0.5);
        }
        assert_eq!(c.gate(&off, 0), Gate::Send);
    }
}
