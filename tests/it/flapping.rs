//! Delivery under a target that fails some of the time: a release of the
//! backlog never uses up a delivery's retry schedule, and a target that
//! recovers gets its whole backlog, however its last failures were timed.
//! Real relay, real spool, real sockets; the clock is the injected one.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{eventually, generated, hooks_config, push_text, quiet, reference_now, TestRelay};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wxrelay::clock::Clock;
use wxrelay::config::{RetryClass, RetryPolicy};
use wxrelay::spool::DeadFilter;

/// A durable delivery the target always refuses, while it answers the rest of
/// a steady stream of pushes alternately 503 and 200: every success after a
/// failure releases the backlog, yet the delivery's schedule is kept, and it
/// is dead-lettered only after the schedule's last attempt, about a day on.
#[tokio::test]
async fn a_durable_delivery_keeps_its_schedule_while_its_target_flaps() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let answered = Arc::new(AtomicUsize::new(0));
    let n = answered.clone();
    hooks.respond_with(move |r| {
        if r.text().contains("TRACKED") {
            return Some(Behaviour::status(503));
        }
        let status = if n.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
            503
        } else {
            200
        };
        Some(Behaviour::status(status))
    });
    let toml = hooks_config(
        &g,
        &hooks.url("/"),
        "format = \"plain\"\nretry = \"durable\"",
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let t0 = relay.clock.now_ms();
    let delays = RetryPolicy::for_class(RetryClass::Durable).delays;
    let tracked_count = || {
        hooks
            .received()
            .iter()
            .filter(|r| r.text().contains("TRACKED"))
            .count()
    };

    push_text(&relay, &g, 1, "TRACKED").await;
    assert!(quiet(&relay, "hooks").await);
    let first = relay.spool.waiting("hooks", 1).await.unwrap()[0].clone();
    let tracked = first.delivery_id;
    assert_eq!(tracked_count(), 1);
    eprintln!("attempt 1 at +0 s: the first");

    // The times of the attempts that moved the delivery along its schedule.
    let mut on_schedule = vec![t0];
    let mut seen = 1;
    let mut early = 0;
    let mut early_in_step = 0;
    let mut due_in_step = first.schedule.due_at.0;
    let mut msg_id = 100;
    let secs = |ms: i64| (ms - t0) as f64 / 1000.0;
    let dead = loop {
        let step = on_schedule.len();
        let delay = delays[(step - 1).min(delays.len() - 1)].as_millis() as i64;
        let tick = (delay / 10).clamp(1_000, 600_000);
        relay.clock.advance_ms(tick);
        msg_id += 1;
        push_text(&relay, &g, msg_id, &format!("traffic {msg_id}")).await;
        assert!(quiet(&relay, "hooks").await, "the relay settles each round");
        let now = relay.clock.now_ms();
        let state = relay
            .spool
            .waiting("hooks", 100_000)
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.delivery_id == tracked);
        let attempts = tracked_count();
        if attempts > seen {
            let sent = attempts - seen;
            seen = attempts;
            let last = *on_schedule.last().unwrap();
            let (from, to) = (last + delay * 8 / 10, last + delay * 12 / 10 + tick);
            // Only an attempt on schedule moves the delivery to its next step.
            // A release can follow it within the round: the first of the
            // round's attempts was then the scheduled one, the rest early.
            let advanced = state
                .as_ref()
                .is_none_or(|p| p.schedule.step as usize == step + 1);
            if advanced {
                eprintln!(
                    "attempt {} at +{:.0} s: scheduled attempt {} (window +{:.0}..+{:.0} s), \
                     after {early_in_step} sent early by releases, each due again at +{:.0} s",
                    attempts + 1 - sent,
                    secs(now),
                    step + 1,
                    secs(from),
                    secs(to),
                    secs(due_in_step),
                );
                assert!(
                    (from..=to).contains(&now),
                    "scheduled attempt {} at +{:.0} s, outside its window +{:.0}..+{:.0} s",
                    step + 1,
                    secs(now),
                    secs(from),
                    secs(to)
                );
                on_schedule.push(now);
                early_in_step = 0;
                if let Some(p) = &state {
                    due_in_step = p.schedule.due_at.0;
                }
            }
            let sent_early = sent - usize::from(advanced);
            early += sent_early;
            early_in_step += sent_early;
            if let Some(p) = state.as_ref().filter(|_| sent_early > 0) {
                assert!(
                    p.next_at >= p.schedule.due_at,
                    "not sooner than its schedule"
                );
                assert_eq!(
                    p.schedule.due_at.0,
                    due_in_step,
                    "an early attempt moved the schedule from +{:.0} s to +{:.0} s",
                    secs(due_in_step),
                    secs(p.schedule.due_at.0)
                );
            }
        }
        if state.is_none() {
            let filter = DeadFilter {
                delivery_id: Some(tracked),
                ..DeadFilter::default()
            };
            let dead = relay.spool.dead_letters(filter, 1).await.unwrap();
            assert_eq!(dead.len(), 1, "the refused delivery is never delivered");
            break dead.into_iter().next().unwrap();
        }
        assert!(
            secs(now) < 2.0 * 86_400.0,
            "still pending two days on, at scheduled attempt {step}"
        );
    };
    eprintln!(
        "dead-lettered ({}) at +{:.1} h after {} attempts, {} of them on schedule, {early} released early",
        dead.reason,
        secs(relay.clock.now_ms()) / 3600.0,
        dead.attempts,
        on_schedule.len()
    );
    assert_eq!(dead.reason.as_str(), "exhausted");
    assert_eq!(
        on_schedule.len(),
        delays.len() + 1,
        "dead-lettered after {} of its {} scheduled attempts",
        on_schedule.len(),
        delays.len() + 1
    );
    let span = delays.iter().sum::<Duration>().as_millis() as i64;
    assert!(
        relay.clock.now_ms() - t0 >= span * 8 / 10,
        "exhausted at +{:.0} s, before the schedule's span of {} s",
        secs(relay.clock.now_ms()),
        span / 1000
    );
    relay.stop().await;
}

/// The backlog was released, the target failed once more within the ten
/// seconds a release must wait, then it answers every request: the release
/// it was owed still happens, without another failure and success.
#[tokio::test]
async fn a_target_that_recovers_inside_the_release_window_gets_its_whole_backlog() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(503));
    let extra = "format = \"plain\"\nretry_schedule = [\"1h\", \"1h\"]";
    let relay =
        TestRelay::start(&hooks_config(&g, &hooks.url("/"), extra), reference_now(&g)).await;
    const BACKLOG: usize = 5;
    for i in 0..BACKLOG as u64 {
        push_text(&relay, &g, 10 + i, &format!("backlog {i}")).await;
    }
    assert!(quiet(&relay, "hooks").await);
    assert_eq!(
        hooks.count(),
        BACKLOG,
        "each failed once; backing off an hour"
    );

    // It answers one push, so the backlog is released and sent, and it
    // refuses all of that: the target is down again.
    hooks.set_default(Behaviour::status(200));
    hooks.script(
        std::iter::once(Behaviour::status(200))
            .chain(std::iter::repeat_n(Behaviour::status(503), BACKLOG)),
    );
    push_text(&relay, &g, 1, "first answer").await;
    assert!(
        hooks
            .wait_for(2 * BACKLOG + 1, Duration::from_secs(20))
            .await,
        "released"
    );
    assert!(quiet(&relay, "hooks").await);

    // Two seconds later it answers again and stays up: a release now would
    // be the second within ten seconds, so it waits.
    relay.clock.advance_ms(2_000);
    push_text(&relay, &g, 2, "second answer").await;
    assert!(quiet(&relay, "hooks").await);
    let waiting = relay.spool.waiting("hooks", 100).await.unwrap();
    assert_eq!(waiting.len(), BACKLOG, "the backlog still waits");

    relay.clock.advance_ms(9_000);
    let started = Instant::now();
    let drained = eventually(Duration::from_secs(10), || async {
        relay.spool.waiting("hooks", 1).await.unwrap().is_empty()
    })
    .await;
    let left = relay.spool.waiting("hooks", 100).await.unwrap();
    let now = relay.clock.now_ms();
    assert!(
        drained,
        "{} deliveries still waiting, due up to {:.1} h from now",
        left.len(),
        left.iter().map(|p| p.next_at.0 - now).max().unwrap_or(0) as f64 / 3_600_000.0
    );
    eprintln!(
        "backlog of {BACKLOG} drained {} ms after the release was allowed",
        started.elapsed().as_millis()
    );
    assert!(relay.nothing_pending().await);
    assert!(relay
        .spool
        .dead_letters(DeadFilter::default(), 10)
        .await
        .unwrap()
        .is_empty());
    relay.stop().await;
}
