//! A spool that cannot record an outcome (its disk is full) keeps each
//! delivery held: the target is not sent the same deliveries over and over,
//! and once there is room again every one of them settles.
//!
//! The disk is real: a small tmpfs the test mounts (it needs root), filled
//! with a file while the relay waits on its target.

use crate::common;

use common::disk::{fill, Tmpfs};
use common::logs::logs;
use common::target::{Behaviour, FakeTarget};
use common::{config, generated, metric, push_text, reference_now, TestRelay};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// How many times the target got each push, by its content.
fn per_push(hooks: &FakeTarget) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in hooks.received() {
        let text = r.text();
        let content = text
            .split_once("<Content><![CDATA[")
            .and_then(|(_, rest)| rest.split_once("]]>"))
            .map_or(text.clone(), |(content, _)| content.to_owned());
        *counts.entry(content).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn an_outcome_the_spool_cannot_save_is_not_followed_by_a_flood_of_resends() {
    let Some(disk) = Tmpfs::mount("4m") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    // The captured log is the whole test binary's: this relay's lines are the
    // ones that name its target, which no other test uses.
    const TARGET: &str = "full_disk_hooks";
    let logs = logs();
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::Hang);
    // Timeout 3 s: a lease lasts 2 × 3 + 2 = 8 s of the relay's clock.
    const LEASE_MS: i64 = 8_000;
    let targets = [format!(
        "[targets.{TARGET}]\nurl = \"{}\"\ntimeout = \"3s\"\nconcurrency = 16\nformat = \"plain\"\n",
        hooks.url("/")
    )];
    let spool_path: PathBuf = disk.path().join("spool.db");
    let relay = TestRelay::start_with_spool_at(
        &config(&g, &targets, &format!("[[routes]]\nto = [\"{TARGET}\"]\n")),
        reference_now(&g),
        &spool_path,
    )
    .await;
    const PUSHES: usize = 8;
    for i in 0..PUSHES as u64 {
        push_text(&relay, &g, 1_000 + i, &format!("push {i}")).await;
    }
    assert!(
        hooks.wait_for(PUSHES, Duration::from_secs(20)).await,
        "every delivery leased and sent"
    );

    // The disk fills while the target holds every request; then it answers.
    let filler = disk.path().join("filler");
    fill(&filler);
    hooks.set_default(Behaviour::status(200));
    hooks.release_hung();

    // Each outcome fails to commit. Within the lease nothing is sent again:
    // at most the first send and one more (a resend, were the lease dropped).
    let flooded = hooks.wait_for(3 * PUSHES, Duration::from_secs(3)).await;
    if flooded {
        // Only to say how bad it is: a second more of it.
        hooks.wait_for(usize::MAX, Duration::from_secs(1)).await;
    }
    let counts = per_push(&hooks);
    eprintln!("within the lease: {counts:?}");
    assert!(
        !flooded && counts.values().all(|&n| n <= 2),
        "sent again at once, over and over: {} requests for {PUSHES} deliveries",
        hooks.count()
    );
    let admin = relay.metrics().await;
    assert!(
        metric(
            &admin,
            "wxrelay_spool_failures_total",
            &[("operation", "settle")]
        ) >= 1.0,
        "the failed writes are counted"
    );

    // The lease ends with the disk still full: one more send each, then held again.
    relay.clock.advance_ms(LEASE_MS + 1);
    assert!(hooks.wait_for(2 * PUSHES, Duration::from_secs(20)).await);
    let flooded = hooks.wait_for(3 * PUSHES, Duration::from_secs(2)).await;
    let counts = per_push(&hooks);
    eprintln!("after one lease period: {counts:?}");
    assert!(!flooded && counts.values().all(|&n| n == 2), "{counts:?}");
    let admin = relay.metrics().await;
    let failures = metric(
        &admin,
        "wxrelay_spool_failures_total",
        &[("operation", "settle")],
    );
    assert!(failures >= (2 * PUSHES) as f64, "{failures} counted");
    // One line says what is wrong; the repeats only count, and are summed up
    // in a line at most once a minute.
    let text = logs.text();
    let lines = |what: &str| {
        text.lines()
            .filter(|l| l.contains(what) && l.contains(TARGET))
            .count()
    };
    assert_eq!(
        lines("cannot record a delivery outcome"),
        1,
        "{failures} failures logged as:\n{text}"
    );

    // Room again: at the next lease end every delivery is sent and settles.
    std::fs::remove_file(&filler).unwrap();
    relay.clock.advance_ms(LEASE_MS + 1);
    assert!(
        relay.until_nothing_pending(TARGET).await,
        "every delivery settles once there is room"
    );
    let counts = per_push(&hooks);
    eprintln!("after the disk has room: {counts:?}");
    assert_eq!(counts.len(), PUSHES, "every push arrived");
    assert!(counts.values().all(|&n| n == 3), "{counts:?}");
    assert_eq!(
        logs.text()
            .lines()
            .filter(|l| l.contains("delivery outcomes are recorded again") && l.contains(TARGET))
            .count(),
        1
    );
    assert!(relay.nothing_pending().await);
    relay.stop().await;
    drop(disk);
}
