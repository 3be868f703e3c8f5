//! Wall-clock time, injected: freshness checks, spool timestamps and retry
//! schedules read it through [`Clock`], so tests can pin "now" (the WeChat test
//! vectors are all relative to a fixed reference time).

#[cfg(any(test, feature = "test-util"))]
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;

    fn now_secs(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that stays where it is set, for tests.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct FixedClock(AtomicI64);

#[cfg(any(test, feature = "test-util"))]
impl FixedClock {
    pub fn at_secs(secs: i64) -> Self {
        Self(AtomicI64::new(secs * 1000))
    }

    pub fn set_secs(&self, secs: i64) {
        self.0.store(secs * 1000, Ordering::SeqCst);
    }

    pub fn advance_ms(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Clock for FixedClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
