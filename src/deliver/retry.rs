//! What an attempt's outcome means, as data: 2xx is delivered; 408, 429, 5xx
//! and transport errors are retried on the target's schedule (with jitter, and
//! never sooner than a `Retry-After`); any other status is a rejection that
//! dead-letters at once. An attempt made before the schedule had it due (the
//! backlog was released) that fails leaves the schedule where it was. Pure:
//! the worker loop only applies it.

use crate::config::RetryPolicy;
use crate::spool::{DeadReason, DeliveryId, Schedule, Settlement, UnixMs};
use http::StatusCode;
use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured; a target asking for more is retried
/// after this, so an event is not parked indefinitely by one header.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How one attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    Reject {
        error: String,
    },
}

/// Classifies an HTTP answer. `snippet` is the start of the answer's body,
/// kept in the dead-letter record so an operator can see why.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, snippet: &str) -> Verdict {
    let error = if snippet.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {snippet}", status.as_u16())
    };
    if status.is_success() {
        Verdict::Delivered
    } else if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Verdict::Retry { error, retry_after }
    } else {
        Verdict::Reject { error }
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Spreads retries of many deliveries that failed together: ±20 %.
/// `unit` is a uniform random number in [0, 1).
pub fn jittered(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

impl Verdict {
    /// The verdict with its `Retry-After` cut to what `breaker` honours.
    pub fn honouring(self, breaker: &crate::config::Breaker) -> Verdict {
        match self {
            Verdict::Retry { error, retry_after } => Verdict::Retry {
                error,
                retry_after: breaker.honoured(retry_after),
            },
            other => other,
        }
    }
}

/// What the spool should record for a delivery at `schedule` after this
/// attempt's verdict; the attempt started at `started_ms` and ended at `now_ms`.
pub fn decide(
    delivery_id: DeliveryId,
    policy: &RetryPolicy,
    schedule: Schedule,
    verdict: Verdict,
    started_ms: UnixMs,
    now_ms: UnixMs,
    unit: f64,
) -> Settlement {
    match verdict {
        Verdict::Delivered => Settlement::Delivered { delivery_id },
        Verdict::Reject { error } => Settlement::Dead {
            delivery_id,
            reason: DeadReason::Rejected,
            error,
        },
        Verdict::Retry { error, retry_after } => {
            let not_before = retry_after.map_or(UnixMs(0), |d| now_ms + d.as_millis() as i64);
            // Released ahead of its schedule: a release is not the schedule's
            // attempt, so failing it uses up no step and moves nothing on.
            if started_ms < schedule.due_at {
                return Settlement::Retry {
                    delivery_id,
                    next_at: schedule.due_at.max(not_before),
                    schedule,
                    not_before,
                    error,
                };
            }
            let step = schedule.step + 1;
            match policy.delay_after(step as usize) {
                None => Settlement::Dead {
                    delivery_id,
                    reason: DeadReason::Exhausted,
                    error,
                },
                Some(delay) => {
                    let wait = jittered(delay, unit).max(retry_after.unwrap_or_default());
                    let next_at = now_ms + wait.as_millis() as i64;
                    Settlement::Retry {
                        delivery_id,
                        next_at,
                        schedule: Schedule {
                            step,
                            due_at: next_at,
                        },
                        not_before,
                        error,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RetryClass;

    fn policy(secs: &[u64]) -> RetryPolicy {
        RetryPolicy {
            class: RetryClass::Durable,
            delays: secs.iter().copied().map(Duration::from_secs).collect(),
        }
    }

    #[test]
    fn classifies_statuses() {
        assert_eq!(classify(StatusCode::OK, None, ""), Verdict::Delivered);
        assert_eq!(
            classify(StatusCode::NO_CONTENT, None, ""),
            Verdict::Delivered
        );
        for retried in [408, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(retried).unwrap();
            assert!(
                matches!(classify(status, None, ""), Verdict::Retry { .. }),
                "{retried}"
            );
        }
        for rejected in [400, 401, 403, 404, 410, 422, 301] {
            let status = StatusCode::from_u16(rejected).unwrap();
            assert!(
                matches!(classify(status, None, ""), Verdict::Reject { .. }),
                "{rejected}"
            );
        }
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, "no such user"),
            Verdict::Reject {
                error: "HTTP 400: no such user".into()
            }
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("9999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    const ID: DeliveryId = DeliveryId(1);

    fn at(step: u32, due_at: i64) -> Schedule {
        Schedule {
            step,
            due_at: UnixMs(due_at),
        }
    }

    #[test]
    fn follows_the_schedule_then_dead_letters() {
        let p = policy(&[10, 60]);
        let retry = || Verdict::Retry {
            error: "HTTP 503".into(),
            retry_after: None,
        };
        assert_eq!(
            decide(ID, &p, at(0, 0), retry(), UnixMs(0), UnixMs(0), 0.5),
            Settlement::Retry {
                delivery_id: ID,
                next_at: UnixMs(10_000),
                schedule: at(1, 10_000),
                not_before: UnixMs(0),
                error: "HTTP 503".into()
            }
        );
        assert_eq!(
            decide(ID, &p, at(1, 0), retry(), UnixMs(0), UnixMs(0), 0.5),
            Settlement::Retry {
                delivery_id: ID,
                next_at: UnixMs(60_000),
                schedule: at(2, 60_000),
                not_before: UnixMs(0),
                error: "HTTP 503".into()
            }
        );
        assert_eq!(
            decide(ID, &p, at(2, 0), retry(), UnixMs(0), UnixMs(0), 0.5),
            Settlement::Dead {
                delivery_id: ID,
                reason: DeadReason::Exhausted,
                error: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn retry_after_is_never_undercut() {
        let p = policy(&[1]);
        let verdict = Verdict::Retry {
            error: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            decide(ID, &p, at(0, 0), verdict, UnixMs(1_000), UnixMs(1_000), 0.0),
            Settlement::Retry {
                delivery_id: ID,
                next_at: UnixMs(31_000),
                schedule: at(1, 31_000),
                not_before: UnixMs(31_000),
                error: "HTTP 429".into()
            }
        );
    }

    #[test]
    fn a_failed_early_attempt_keeps_the_schedule_and_its_step() {
        let p = policy(&[10, 60]);
        let retry = |retry_after| Verdict::Retry {
            error: "HTTP 503".into(),
            retry_after,
        };
        // Due on its schedule at 70 s after one failure; released and sent at 20 s.
        assert_eq!(
            decide(
                ID,
                &p,
                at(1, 70_000),
                retry(None),
                UnixMs(20_000),
                UnixMs(20_500),
                0.9
            ),
            Settlement::Retry {
                delivery_id: ID,
                next_at: UnixMs(70_000),
                schedule: at(1, 70_000),
                not_before: UnixMs(0),
                error: "HTTP 503".into()
            }
        );
        // At the last step, an early failure does not exhaust it.
        assert!(matches!(
            decide(
                ID,
                &p,
                at(2, 70_000),
                retry(None),
                UnixMs(20_000),
                UnixMs(20_000),
                0.5
            ),
            Settlement::Retry { .. }
        ));
        // A Retry-After beyond the schedule's time still holds.
        assert_eq!(
            decide(
                ID,
                &p,
                at(1, 70_000),
                retry(Some(Duration::from_secs(120))),
                UnixMs(20_000),
                UnixMs(20_000),
                0.5
            ),
            Settlement::Retry {
                delivery_id: ID,
                next_at: UnixMs(140_000),
                schedule: at(1, 70_000),
                not_before: UnixMs(140_000),
                error: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Duration::from_secs(100);
        assert_eq!(jittered(d, 0.0), Duration::from_secs(80));
        assert!(jittered(d, 0.999) < Duration::from_secs(120));
        assert_eq!(jittered(d, 0.5), d);
    }
}
