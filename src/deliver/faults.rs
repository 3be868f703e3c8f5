//! Spool failures a target's worker keeps meeting, logged without a line
//! per occurrence: a full disk fails every write, and a line per failure
//! would go to that disk. The span export logs a collector that stays away
//! the same way.

use super::Dispatcher;
use std::sync::Mutex;
use std::time::Duration;

/// How often a spool failure that keeps happening is logged again. A full
/// disk fails every write, and a line per failure would go to that disk.
const REPEAT_LOG_EVERY: Duration = Duration::from_secs(60);

/// One kind of spool failure of one target, for logging it without a line per
/// occurrence: the first, then a count at most every [`REPEAT_LOG_EVERY`],
/// then once when it works again.
#[derive(Default)]
pub(crate) struct Repeats(Mutex<RepeatState>);

#[derive(Default)]
struct RepeatState {
    failing: bool,
    logged_at: Option<std::time::Instant>,
    unlogged: u64,
}

/// What to log for one more failure.
pub(crate) enum Repeat {
    First,
    /// Failures since the last line, this one included.
    Summary(u64),
    Quiet,
}

impl Repeats {
    fn state(&self) -> std::sync::MutexGuard<'_, RepeatState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn failed(&self) -> Repeat {
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
    pub(crate) fn succeeded(&self) -> Option<u64> {
        let mut s = self.state();
        std::mem::take(&mut s.failing).then(|| std::mem::take(&mut s.unlogged))
    }
}

/// The spool failures a target's worker has seen.
#[derive(Default)]
pub(super) struct Faults {
    pub(super) lease: Repeats,
    pub(super) settle: Repeats,
}

impl Dispatcher {
    /// Counts delivery work the spool could not do.
    pub(super) fn spool_failed(&self, target: &str, operation: &str) {
        self.metrics
            .spool_failures
            .with_label_values(&[target, operation])
            .inc();
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
}
