//! wxrelay: a relay for WeChat server pushes: Official Accounts, Mini
//! Programs, Open Platform third-party platforms and WeCom apps.
//!
//! ```text
//! WeChat ──GET  /wx/{account}──▶ verify signature ──▶ echo echostr
//!                                (WeCom: msg_signature ▶ decrypt ▶ receive id ▶ answer it)
//! WeChat ──POST /wx/{account}[/{authoriser}]──▶ size cap ▶ signature ▶ freshness
//!        ▶ msg_signature ▶ decrypt (current key, then previous) ▶ receive id
//!        ▶ parse XML (no DTD) or JSON (no repeats) ▶ [Open Platform: keep the ticket]
//!        ▶ route ▶ spool: one durable commit of the event, its deliveries and
//!          its dedup key (group commit) ▶ answer `success`
//! spool ─▶ delivery workers ─▶ targets (raw, plain, json, authing-demo-json, wechat)
//! ```
//!
//! The durability contract: WeChat is answered 200 only after the event and a
//! delivery per routed target are committed with fsync; a duplicate (same
//! dedup key within the window) is answered `success` and stores nothing.
//!
//! # Layout
//!
//! - [`wechat`]: the pure protocol: signatures, the AES frame, push and reply
//!   XML, a Mini Program's JSON, and each callback family's differences.
//! - [`config`]: the TOML file → validated [`config::Settings`].
//! - [`route`]: pure rule matching: push → targets.
//! - [`spool`]: the durable queue, its roles (traits by audience), and its SQLite (one replica) and
//!   PostgreSQL (shared by several replicas) implementations.
//! - `deliver`: the dispatcher (delivery workers, target health, one way to
//!   attempt and record), the target formats, the retry policy and the
//!   per-target circuit breaker.
//! - `handler`: the WeChat-facing HTTP shell and its one error type.
//! - `ingest`: route a verified push and store it durably.
//! - `late`: a reply target's answer after the reply budget, kept on the
//!   spool and sent through the Customer Service API or with the next push.
//! - `admin`: the admin listener's routes; `reload`: configuration reload.
//! - `ui`: the pages at `/ui` on the admin listener: signing in, the
//!   overview, searching the trail and an event's timeline.
//! - `recent`: the last hour's login latencies and refusals, for the overview.
//! - `metrics`: the Prometheus registry and every collector.
//! - `server`: the accept loop and graceful drain.
//! - `telemetry`: traces: a span per push and per delivery attempt, exported
//!   over OTLP/HTTP when a collector is configured.
//! - [`trail`]: what became of each push: the trail's filters and records.
//! - [`app`]: wiring and shutdown order.
//! - [`clock`]: injected wall-clock time.
//! - [`cli`]: the operator's commands: simulate, route, dlq, pending, migrate, keygen.

pub(crate) mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod deliver;
pub(crate) mod handler;
pub(crate) mod ingest;
pub(crate) mod late;
pub(crate) mod metrics;
pub(crate) mod recent;
pub(crate) mod reload;
pub mod route;
pub(crate) mod server;
pub mod spool;
pub(crate) mod telemetry;
pub mod trail;
pub(crate) mod ui;
pub mod wechat;

pub use ingest::short_hash;

/// An error and its causes, one after the other: `a: b: c`. A cause whose
/// text the message already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

/// A duration as milliseconds to three decimals, for log fields: a
/// microsecond is finer than anything logged needs, and the float of the
/// whole value prints as `0.24564299999999997`.
pub(crate) fn rounded_ms(d: std::time::Duration) -> f64 {
    // Division is correctly rounded: the result prints as its three decimals.
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_logged_duration_prints_three_decimals() {
        let ms = super::rounded_ms(Duration::from_nanos(1_382_874_321));
        assert_eq!(ms.to_string(), "1382.874");
        let ms = super::rounded_ms(Duration::from_nanos(633_962));
        assert_eq!(ms.to_string(), "0.633");
    }
}
