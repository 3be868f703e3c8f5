//! A target's circuit breaker: after failures in a row its deliveries wait in
//! the spool untouched, one probe at a time is sent on a backoff, and a
//! successful probe closes the circuit and releases the backlog. The clock
//! is the injected one, so the backoff passes when the test moves it.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{eventually, generated, hooks_config, metric, push_text, reference_now, TestRelay};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

async fn circuit(relay: &TestRelay) -> f64 {
    metric(
        &relay.metrics().await,
        "wxrelay_target_circuit",
        &[("target", "hooks")],
    )
}

async fn until_circuit(relay: &TestRelay, phase: f64) -> bool {
    eventually(WAIT, || async move { circuit(relay).await == phase }).await
}

async fn retried(relay: &TestRelay) -> f64 {
    metric(
        &relay.metrics().await,
        "wxrelay_deliveries_total",
        &[("target", "hooks"), ("outcome", "retried")],
    )
}

#[tokio::test]
async fn an_open_circuit_sends_one_probe_at_a_time_and_a_success_releases_the_backlog() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(503));
    let breaker = "breaker = { failures = 3, backoff = \"1s\", max_backoff = \"4s\" }";
    let toml = hooks_config(&g, &hooks.url("/"), &format!("concurrency = 1\n{breaker}"));
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    assert_eq!(circuit(&relay).await, 0.0, "closed");

    for i in 0..3 {
        push_text(&relay, &g, i, &format!("before {i}")).await;
    }
    assert!(
        until_circuit(&relay, 1.0).await,
        "open after three failures"
    );
    let attempts_when_opened = hooks.count();
    let writes_when_opened = retried(&relay).await;
    assert_eq!(attempts_when_opened, 3);

    // While open, new deliveries wait in the spool: no attempt, no write.
    for i in 10..40 {
        push_text(&relay, &g, i, &format!("while open {i}")).await;
    }
    let waiting = relay.spool.waiting("hooks", 1_000).await.unwrap();
    assert_eq!(waiting.len(), 33);
    assert_eq!(waiting.iter().filter(|w| w.attempts == 0).count(), 30);
    assert_eq!(hooks.count(), attempts_when_opened);

    // After the backoff (1 s ± 20 %), one probe; it fails: one write, open again.
    relay.clock.advance_ms(1_300);
    assert!(
        hooks.wait_for(attempts_when_opened + 1, WAIT).await,
        "probed"
    );
    assert!(until_circuit(&relay, 1.0).await);
    assert!(
        eventually(WAIT, || async {
            retried(&relay).await == writes_when_opened + 1.0
        })
        .await
    );
    assert_eq!(hooks.count(), attempts_when_opened + 1, "one probe");

    // The backoff doubled: 1.3 s later is too soon; 2.5 s is not.
    hooks.set_default(Behaviour::Hold(200));
    relay.clock.advance_ms(1_300);
    assert_eq!(circuit(&relay).await, 1.0);
    relay.clock.advance_ms(1_200);
    assert!(
        hooks.wait_for(attempts_when_opened + 2, WAIT).await,
        "probed"
    );
    assert_eq!(circuit(&relay).await, 2.0, "probing while the probe is out");
    assert_eq!(
        hooks.count(),
        attempts_when_opened + 2,
        "one probe at a time"
    );

    // It succeeds: the circuit closes and everything is sent.
    hooks.set_default(Behaviour::status(200));
    hooks.release_hung();
    assert!(until_circuit(&relay, 0.0).await, "closed by the probe");
    assert!(relay.until_nothing_pending("hooks").await);
    let delivered: std::collections::BTreeSet<String> = hooks
        .received()
        .iter()
        .filter(|r| r.text().contains("while open"))
        .map(|r| r.text())
        .collect();
    assert_eq!(delivered.len(), 30, "every event reached the target");
    relay.stop().await;
}

#[tokio::test]
async fn refusals_do_not_open_the_circuit() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(400));
    let toml = hooks_config(&g, &hooks.url("/"), "breaker = { failures = 2 }");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    for i in 0..6 {
        push_text(&relay, &g, i, &format!("refused {i}")).await;
    }
    assert!(hooks.wait_for(6, WAIT).await, "each one is sent");
    assert!(relay.until_nothing_pending("hooks").await);
    assert_eq!(circuit(&relay).await, 0.0, "a 4xx is the event's fault");
    relay.stop().await;
}

#[tokio::test]
async fn an_open_circuit_makes_no_inline_reply_attempt() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::status(503));
    let toml = common::config(
        &g,
        &[common::target(
            "broker",
            &broker.url("/"),
            "breaker = { failures = 1 }",
        )],
        "[[routes]]\nto = [\"broker\"]\nreply_from = \"broker\"\n",
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    push_text(&relay, &g, 1, "first").await;
    assert_eq!(broker.count(), 1, "tried inline");
    let phase = metric(
        &relay.metrics().await,
        "wxrelay_target_circuit",
        &[("target", "broker")],
    );
    assert_eq!(phase, 1.0, "one failure opens this circuit");
    push_text(&relay, &g, 2, "second").await;
    assert_eq!(broker.count(), 1, "no inline attempt while open");
    let waiting = relay.spool.waiting("broker", 10).await.unwrap();
    assert_eq!(waiting.len(), 2, "both wait in the spool");
    relay.stop().await;
}

/// Opens `hooks`'s circuit (one failure does), then applies `reloaded`.
async fn open_then_reload(reloaded: impl Fn(&str) -> String) -> (TestRelay, FakeTarget) {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(503));
    let toml = hooks_config(
        &g,
        &hooks.url("/"),
        "breaker = { failures = 1, backoff = \"1h\", max_backoff = \"1h\" }",
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    push_text(&relay, &g, 1, "opens it").await;
    assert!(until_circuit(&relay, 1.0).await, "open after one failure");
    std::fs::write(relay.config_path(), reloaded(&hooks.url("/"))).unwrap();
    let answer = relay.admin(http::Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    (relay, hooks)
}

#[tokio::test]
async fn a_breaker_turned_off_by_a_reload_shows_the_circuit_closed_and_sends() {
    let g = generated();
    let (relay, hooks) =
        open_then_reload(|url| hooks_config(&g, url, "breaker = { failures = 0 }")).await;
    hooks.set_default(Behaviour::status(200));
    push_text(&relay, &g, 2, "after the reload").await;
    assert!(hooks.wait_for(2, WAIT).await, "sent without a probe");
    assert!(until_circuit(&relay, 0.0).await, "no open circuit is shown");
    relay.stop().await;
}

#[tokio::test]
async fn a_removed_target_leaves_no_circuit_behind() {
    let g = generated();
    let other = FakeTarget::start().await;
    let (relay, _hooks) = open_then_reload(|_| {
        common::config(
            &g,
            &[common::target("other", &other.url("/"), "")],
            "[[routes]]\nto = [\"other\"]\n",
        )
    })
    .await;
    let gone = eventually(WAIT, || async {
        !relay
            .metrics()
            .await
            .contains("wxrelay_target_circuit{target=\"hooks\"}")
    })
    .await;
    assert!(
        gone,
        "an open circuit of a removed target would alert forever"
    );
    assert_eq!(
        metric(
            &relay.metrics().await,
            "wxrelay_target_circuit",
            &[("target", "other")]
        ),
        0.0
    );
    relay.stop().await;
}

/// Users wait at a QR code for a `login` target: a broker's hour-long
/// `Retry-After` holds its circuit for `max_backoff` at most, so the next
/// login is probed within seconds; a `durable` target's circuit honours it.
#[tokio::test]
async fn a_login_targets_circuit_honours_retry_after_only_up_to_max_backoff() {
    let g = generated();
    for (class, probed) in [("login", true), ("durable", false)] {
        let hooks = FakeTarget::start().await;
        hooks.set_default(Behaviour::Answer {
            status: 503,
            headers: vec![("retry-after", "3600".to_owned())],
            body: String::new(),
        });
        let extra = format!(
            "retry = \"{class}\"\nmax_age = \"off\"\n\
             breaker = {{ failures = 1, backoff = \"1s\", max_backoff = \"5s\" }}"
        );
        let relay = TestRelay::start(
            &hooks_config(&g, &hooks.url("/"), &extra),
            reference_now(&g),
        )
        .await;
        push_text(&relay, &g, 1, "asks for an hour").await;
        assert!(until_circuit(&relay, 1.0).await, "{class}: open");
        hooks.set_default(Behaviour::status(200));
        push_text(&relay, &g, 2, "the next login").await;
        // Past max_backoff and its jitter, well short of the hour.
        relay.clock.advance_ms(6_100);
        let sent = eventually(Duration::from_secs(5), || async {
            hooks
                .received()
                .iter()
                .any(|r| r.text().contains("the next login"))
        })
        .await;
        assert_eq!(sent, probed, "{class}: probed after max_backoff");
        assert_eq!(
            circuit(&relay).await,
            if probed { 0.0 } else { 1.0 },
            "{class}"
        );
        // The login that got the hour-long Retry-After is not held for the
        // hour either: its own hold is capped as the circuit's wait is.
        let held_one = eventually(Duration::from_secs(5), || async {
            hooks
                .received()
                .iter()
                .filter(|r| r.text().contains("asks for an hour"))
                .count()
                >= 2
        })
        .await;
        assert_eq!(
            held_one, probed,
            "{class}: the held delivery sent after max_backoff"
        );
        relay.stop().await;
    }
}
