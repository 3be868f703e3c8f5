//! `wxrelay pending`, the real binary beside a running relay: it lists a
//! target's backed-off deliveries without message content, and `retry-now`
//! has the relay send them at once, keeping their retry schedules and (unless
//! told otherwise) a target's Retry-After.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{eventually, generated, hooks_config, push_text, quiet, TestRelay};
use std::time::Duration;
use wxrelay::clock::{Clock, SystemClock};

const WAIT: Duration = Duration::from_secs(20);

/// The relay on `toml`, and the path of the same configuration naming its
/// spool file, for the command. The relay's clock starts at the system time,
/// which the command reads.
async fn relay_and_operator_config(toml: &str) -> (TestRelay, String) {
    let relay = TestRelay::start(toml, SystemClock.now_ms() / 1000).await;
    let spool = relay.spool_path.clone();
    let path = relay.dir.path().join("operator.toml");
    std::fs::write(
        &path,
        format!("[spool]\npath = \"{}\"\n{toml}", spool.display()),
    )
    .unwrap();
    (relay, path.to_str().unwrap().to_owned())
}

/// Brings the relay's clock up to the system time the command used.
fn catch_up(relay: &TestRelay) {
    let behind = SystemClock.now_ms() - wxrelay::clock::Clock::now_ms(&*relay.clock);
    relay.clock.advance_ms(behind.max(0) + 1);
}

#[tokio::test]
async fn pending_lists_a_backlog_and_retry_now_has_the_running_relay_send_it() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(503));
    // The second push is answered 429 with an hour's Retry-After.
    hooks.script([
        Behaviour::status(503),
        Behaviour::Answer {
            status: 429,
            headers: vec![("retry-after", "3600".into())],
            body: String::new(),
        },
    ]);
    let extra = "format = \"plain\"\nretry_schedule = [\"1h\", \"1h\"]";
    let (relay, config) =
        relay_and_operator_config(&hooks_config(&g, &hooks.url("/"), extra)).await;
    let command = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--config".to_owned(), config.clone()]);
        let relay = &relay;
        async move {
            let outcome = common::wxrelay(all).await;
            catch_up(relay);
            outcome
        }
    };

    for i in 0..3u64 {
        push_text(&relay, &g, 10 + i, &format!("secret words {i}")).await;
        assert!(hooks.wait_for(i as usize + 1, WAIT).await);
        assert!(quiet(&relay, "hooks").await);
    }
    let before = relay.spool.waiting("hooks", 10).await.unwrap();
    assert_eq!(before.len(), 3);

    let (code, out) = command(&["pending", "list", "--target", "hooks"]).await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 pending deliveries"), "{out}");
    assert!(
        out.contains("HTTP 503") && out.contains("HTTP 429"),
        "{out}"
    );
    for p in &before {
        assert!(out.contains(&p.delivery_id.to_string()), "{out}");
    }
    assert!(!out.contains("secret words"), "no message content: {out}");

    let (code, out) = command(&["pending", "list", "--target", "nobody"]).await;
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("no target \"nobody\""), "{out}");

    // The target is back. One delivery first, then the rest.
    hooks.set_default(Behaviour::status(200));
    let first = before
        .iter()
        .find(|p| p.not_before.0 == 0)
        .unwrap()
        .delivery_id;
    let (code, out) = command(&[
        "pending",
        "retry-now",
        "--target",
        "hooks",
        "--delivery",
        &first.to_string(),
    ])
    .await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("1 delivery of hooks is due now"), "{out}");
    assert!(hooks.wait_for(4, WAIT).await, "the running relay sent it");
    // It was answered: the relay releases the rest of the backlog itself,
    // all but the delivery the target asked to hold.
    assert!(hooks.wait_for(5, WAIT).await);
    assert!(
        eventually(WAIT, || async {
            relay.spool.waiting("hooks", 10).await.unwrap().len() == 1
        })
        .await
    );

    let (code, out) = command(&["pending", "retry-now", "--target", "hooks"]).await;
    eprintln!("{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("no delivery of hooks was made due now"),
        "{out}"
    );
    assert!(
        out.contains("1 held by the target's Retry-After") && out.contains("--ignore-retry-after"),
        "{out}"
    );
    let held = &relay.spool.waiting("hooks", 10).await.unwrap()[0];
    assert!(
        held.not_before.0 > SystemClock.now_ms(),
        "the 429's delivery waits"
    );

    let (code, out) = command(&[
        "pending",
        "retry-now",
        "--target",
        "hooks",
        "--ignore-retry-after",
    ])
    .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("1 delivery of hooks is due now"), "{out}");
    assert!(relay.until_nothing_pending("hooks").await);
    assert_eq!(hooks.count(), 6, "each sent once more, none twice");

    let (code, out) = command(&["pending", "list", "--target", "hooks"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out, "no delivery of hooks is pending\n");
    let (code, out) = command(&[
        "pending",
        "retry-now",
        "--target",
        "hooks",
        "--delivery",
        "999",
    ])
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no pending delivery 999"), "{out}");
    relay.stop().await;
}

/// A retry-now attempt that fails again is not counted against the schedule:
/// the delivery waits for the time its schedule had, at the same step.
#[tokio::test]
async fn retry_now_on_a_target_still_down_keeps_the_schedule() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(503));
    let extra = "format = \"plain\"\nretry_schedule = [\"1h\"]";
    let (relay, config) =
        relay_and_operator_config(&hooks_config(&g, &hooks.url("/"), extra)).await;
    push_text(&relay, &g, 1, "one").await;
    assert!(quiet(&relay, "hooks").await);
    let before = relay.spool.waiting("hooks", 1).await.unwrap()[0].clone();

    for round in 0..3 {
        let (code, out) = common::wxrelay(vec![
            "pending".into(),
            "retry-now".into(),
            "--target".into(),
            "hooks".into(),
            "--config".into(),
            config.clone(),
        ])
        .await;
        catch_up(&relay);
        assert_eq!(code, Some(0), "{out}");
        assert!(hooks.wait_for(round + 2, WAIT).await);
        assert!(quiet(&relay, "hooks").await);
    }
    let after = relay.spool.waiting("hooks", 1).await.unwrap()[0].clone();
    assert_eq!(after.attempts, 4, "every attempt is counted");
    assert_eq!(
        after.schedule, before.schedule,
        "a one-step schedule, not exhausted by three early attempts"
    );
    assert_eq!(after.next_at, before.schedule.due_at);
    relay.stop().await;
}
