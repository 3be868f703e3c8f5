//! The last hour on this replica, for the pages' overview: login delivery
//! latencies and refused pushes, counted per minute. The Prometheus
//! collectors count since the start; an operator at the page wants "now",
//! without a Prometheus to ask. Memory is bounded: sixty minutes of bucket
//! counts (the login histogram's buckets) and one counter per refusal reason.

use std::collections::VecDeque;
use std::sync::Mutex;

/// The window's length in minutes.
const MINUTES: i64 = 60;
const MINUTE_MS: i64 = 60_000;

/// What happened in each of the last sixty minutes.
#[derive(Debug)]
pub struct Recent {
    /// Upper bounds of the latency buckets, in seconds; a last bucket above.
    bounds: &'static [f64],
    minutes: Mutex<VecDeque<Minute>>,
}

#[derive(Debug)]
struct Minute {
    /// Unix milliseconds divided by a minute.
    index: i64,
    /// Login deliveries per latency bucket; the last is past every bound.
    login: Vec<u64>,
    refusals: Vec<(&'static str, u64)>,
}

/// Login delivery latency over a span: its median and 95th percentile, as
/// the upper bound of the bucket each falls in (`None`: above every bound).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantiles {
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
}

impl Recent {
    pub fn new(bounds: &'static [f64]) -> Self {
        Recent {
            bounds,
            minutes: Mutex::new(VecDeque::new()),
        }
    }

    /// Counts a login event's delivery, `seconds` after its arrival.
    pub fn login(&self, now_ms: i64, seconds: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(self.bounds.len());
        self.at(now_ms, |m| m.login[bucket] += 1);
    }

    /// Counts a refused push by its reason (the verdict label).
    pub fn refused(&self, now_ms: i64, reason: &'static str) {
        self.at(now_ms, |m| {
            match m.refusals.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, n)) => *n += 1,
                None => m.refusals.push((reason, 1)),
            }
        });
    }

    fn at(&self, now_ms: i64, count: impl FnOnce(&mut Minute)) {
        let index = now_ms.div_euclid(MINUTE_MS);
        let mut minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        while minutes.front().is_some_and(|m| m.index <= index - MINUTES) {
            minutes.pop_front();
        }
        if minutes.back().is_none_or(|m| m.index < index) {
            minutes.push_back(Minute {
                index,
                login: vec![0; self.bounds.len() + 1],
                refusals: Vec::new(),
            });
        }
        // A clock set back counts in the newest minute.
        if let Some(minute) = minutes.back_mut() {
            count(minute);
        }
    }

    /// Login latency over the last hour, in `slots` spans of equal length,
    /// oldest first, then over the whole hour.
    pub fn login_latency(&self, now_ms: i64, slots: usize) -> (Vec<Quantiles>, Quantiles) {
        let now = now_ms.div_euclid(MINUTE_MS);
        let per_slot = (MINUTES as usize).div_ceil(slots.max(1)) as i64;
        let mut spans = vec![vec![0u64; self.bounds.len() + 1]; slots.max(1)];
        let mut hour = vec![0u64; self.bounds.len() + 1];
        let minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        for m in minutes.iter().filter(|m| m.index > now - MINUTES) {
            let age = (now - m.index).max(0);
            let slot = spans.len() - 1 - ((age / per_slot) as usize).min(spans.len() - 1);
            for (i, n) in m.login.iter().enumerate() {
                spans[slot][i] += n;
                hour[i] += n;
            }
        }
        let spans = spans.iter().map(|c| self.quantiles(c)).collect();
        (spans, self.quantiles(&hour))
    }

    fn quantiles(&self, counts: &[u64]) -> Quantiles {
        let count: u64 = counts.iter().sum();
        let at = |q: f64| {
            if count == 0 {
                return None;
            }
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            let bucket = counts.iter().position(|n| {
                seen += n;
                seen >= rank
            })?;
            self.bounds.get(bucket).copied()
        };
        Quantiles {
            count,
            p50: at(0.5),
            p95: at(0.95),
        }
    }

    /// Refused pushes over the last hour by reason, most first.
    pub fn refusals(&self, now_ms: i64) -> Vec<(&'static str, u64)> {
        let now = now_ms.div_euclid(MINUTE_MS);
        let mut total: Vec<(&'static str, u64)> = Vec::new();
        let minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        for m in minutes.iter().filter(|m| m.index > now - MINUTES) {
            for (reason, n) in &m.refusals {
                match total.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, t)) => *t += n,
                    None => total.push((reason, *n)),
                }
            }
        }
        total.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: &[f64] = &[0.1, 0.5, 1.0];
    const HOUR: i64 = 3_600_000;

    #[test]
    fn quantiles_are_the_bounds_of_their_buckets() {
        let recent = Recent::new(BOUNDS);
        let now = 10 * HOUR;
        for _ in 0..18 {
            recent.login(now, 0.05);
        }
        recent.login(now, 0.4);
        recent.login(now, 7.0);
        let (_, hour) = recent.login_latency(now, 12);
        assert_eq!(
            hour,
            Quantiles {
                count: 20,
                p50: Some(0.1),
                p95: Some(0.5),
            }
        );
        recent.login(now, 7.0);
        assert_eq!(recent.login_latency(now, 12).1.p95, None);
    }

    #[test]
    fn only_the_last_hour_counts_and_each_span_its_own() {
        let recent = Recent::new(BOUNDS);
        let start = 10 * HOUR;
        recent.login(start, 0.05);
        recent.refused(start, "bad_signature");
        let later = start + 30 * MINUTE_MS;
        recent.login(later, 0.7);
        recent.refused(later, "stale");
        recent.refused(later, "stale");
        let (spans, hour) = recent.login_latency(later, 12);
        assert_eq!(hour.count, 2);
        assert_eq!(spans[11].p50, Some(1.0));
        assert_eq!(spans[5].p50, Some(0.1));
        assert_eq!(
            recent.refusals(later),
            vec![("stale", 2), ("bad_signature", 1)]
        );
        let past = start + HOUR;
        assert_eq!(recent.login_latency(past, 12).1.count, 1);
        assert_eq!(recent.refusals(past), vec![("stale", 2)]);
    }
}
