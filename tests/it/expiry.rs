//! Stale login events expire: a delivery to a `retry = "login"` target whose
//! event arrived longer ago than its `max_age` (10 minutes by default) is
//! dead-lettered as `expired` when the broker returns, instead of being sent;
//! younger ones are sent, and a durable webhook gets every one.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{config, generated, metric, push_text, quiet, reference_now, target, TestRelay};
use std::time::Duration;
use wxrelay::cli::dlq::{self, DlqCommand, Selection};
use wxrelay::cli::CliError;
use wxrelay::clock::Clock;
use wxrelay::spool::{DeadFilter, DeadReason};

const MINUTE_MS: i64 = 60_000;

#[tokio::test]
async fn login_deliveries_older_than_max_age_expire_when_the_broker_returns() {
    let g = generated();
    let broker = FakeTarget::start().await;
    let crm = FakeTarget::start().await;
    broker.set_default(Behaviour::status(503));
    crm.set_default(Behaviour::status(503));
    let targets = [
        target(
            "broker",
            &broker.url("/"),
            "format = \"plain\"\nretry = \"login\"",
        ),
        target(
            "crm",
            &crm.url("/"),
            "format = \"plain\"\nretry = \"durable\"",
        ),
    ];
    let toml = config(&g, &targets, "[[routes]]\nto = [\"broker\", \"crm\"]\n");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;

    push_text(&relay, &g, 1, "OLD").await;
    assert!(quiet(&relay, "broker").await && quiet(&relay, "crm").await);
    relay.clock.advance_ms(6 * MINUTE_MS);
    push_text(&relay, &g, 2, "YOUNG").await;
    assert!(quiet(&relay, "broker").await && quiet(&relay, "crm").await);

    let answered = |t: &FakeTarget, text: &str| {
        t.received()
            .iter()
            .filter(|r| r.text().contains(text))
            .count()
    };
    let tries_before_return = answered(&broker, "OLD");
    assert!(tries_before_return >= 1);

    // Both come back when OLD is 11 minutes old and YOUNG 5.
    broker.set_default(Behaviour::status(200));
    crm.set_default(Behaviour::status(200));
    relay.clock.advance_ms(5 * MINUTE_MS);
    assert!(relay.until_nothing_pending("broker").await);
    assert!(relay.until_nothing_pending("crm").await);

    let expired = DeadFilter {
        reason: Some(DeadReason::Expired),
        ..DeadFilter::default()
    };
    let dead = relay.spool.dead_letters(expired, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].target.as_deref(), Some("broker"));
    let event = relay.spool.event(dead[0].event_id).await.unwrap().unwrap();
    assert!(event.xml.contains("OLD"));
    assert!(
        dead[0].last_error.contains("max_age"),
        "{}",
        dead[0].last_error
    );
    assert_eq!(
        dead[0].attempts as usize, tries_before_return,
        "expiring it is not an attempt"
    );
    assert!(
        broker.received().iter().any(|r| r.text().contains("YOUNG")),
        "the younger one is sent"
    );
    assert_eq!(
        answered(&broker, "OLD"),
        tries_before_return,
        "the expired one is not sent after the return"
    );
    let metrics = relay.metrics().await;
    let counted = metric(
        &metrics,
        "wxrelay_dead_letters_total",
        &[("target", "broker"), ("reason", "expired")],
    );
    assert_eq!(counted, 1.0);
    // The durable webhook is not touched by max_age.
    assert!(crm.received().iter().any(|r| r.text().contains("OLD")));
    assert!(crm.received().iter().any(|r| r.text().contains("YOUNG")));
    assert_eq!(
        relay
            .spool
            .dead_letters(DeadFilter::default(), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Replaying it takes --force, and the refusal says why.
    let replay = |force| DlqCommand::Replay {
        select: Selection {
            reason: Some(DeadReason::Expired),
            ..Selection::default()
        },
        all: false,
        force,
    };
    let now = relay.clock.now_ms();
    let sent_before = broker.count();
    match dlq::run(operator(&relay), &replay(false), now).await {
        Err(CliError::Usage(why)) => {
            assert!(why.contains("--force") && why.contains("max_age"), "{why}");
            assert!(!why.contains("  "), "one sentence, not a layout: {why}");
        }
        other => panic!("replayed without --force: {other:?}"),
    }
    let out = dlq::run(operator(&relay), &replay(true), now)
        .await
        .unwrap();
    assert!(out.starts_with("1 delivery is due again"), "{out}");
    assert!(
        broker
            .wait_for(sent_before + 1, Duration::from_secs(20))
            .await,
        "a forced replay is sent"
    );
    assert!(relay.until_nothing_pending("broker").await);
    assert_eq!(answered(&broker, "OLD"), tries_before_return + 1);
    relay.stop().await;
}

#[tokio::test]
async fn a_backlog_of_expired_deliveries_does_not_hold_back_the_probe() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::status(503));
    let breaker = "breaker = { failures = 1, backoff = \"1s\", max_backoff = \"1s\" }";
    let extra = format!("format = \"plain\"\nretry = \"login\"\n{breaker}");
    let toml = config(
        &g,
        &[target("broker", &broker.url("/"), &extra)],
        "[[routes]]\nto = [\"broker\"]\n",
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    push_text(&relay, &g, 1, "opens the circuit").await;
    assert!(broker.wait_for(1, Duration::from_secs(20)).await);
    let stale = 200;
    for i in 0..stale {
        push_text(&relay, &g, 100 + i, &format!("STALE {i}")).await;
    }
    // Eleven minutes on, the broker is back and a login arrives.
    relay.clock.advance_ms(11 * MINUTE_MS);
    broker.set_default(Behaviour::status(200));
    push_text(&relay, &g, 2, "FRESH").await;
    // Each stale one is dead-lettered as the probe takes it; none may cost
    // the probe a pause, or the broker would wait minutes for its logins.
    let fresh_sent = common::eventually(Duration::from_secs(20), || async {
        broker.received().iter().any(|r| r.text().contains("FRESH"))
    })
    .await;
    assert!(fresh_sent, "the fresh login is sent");
    let expired = metric(
        &relay.metrics().await,
        "wxrelay_dead_letters_total",
        &[("target", "broker"), ("reason", "expired")],
    );
    assert!(expired >= stale as f64, "{expired}");
    relay.stop().await;
}

/// The spool as `wxrelay dlq` sees it: its dead letters and its late replies.
fn operator(
    relay: &TestRelay,
) -> (
    &dyn wxrelay::spool::Operator,
    &dyn wxrelay::spool::LateReplies,
) {
    let late: &dyn wxrelay::spool::LateReplies = match &relay.opened {
        wxrelay::spool::OpenSpool::Sqlite(s) => &**s,
        wxrelay::spool::OpenSpool::Postgres(s) => &**s,
    };
    (&*relay.spool, late)
}
