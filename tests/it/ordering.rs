//! Ordered delivery per user: a target with `ordering = "per_user"` gets each
//! user's events one at a time in arrival order, even when some first
//! attempts fail and are retried, while an unordered target on the same
//! stream gets the same set, in whatever order its retries allow.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{config, eventually, generated, reference_now, target, text_push, TestRelay};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wxrelay::clock::Clock;

const USERS: u32 = 200;
const ROUNDS: u32 = 10;

/// (user, round) in the order the target answered 200.
type Log = Arc<Mutex<Vec<(u32, u32)>>>;

/// Answers 503 to the first attempt of every seventh event, 200 otherwise,
/// and logs what it took.
fn failing_first_attempts(t: &FakeTarget) -> Log {
    let log = Log::default();
    let (taken, mut failed) = (log.clone(), HashSet::new());
    t.respond_with(move |r| {
        let text = r.text();
        let tag = text.split("EV-").nth(1)?.split(']').next()?.to_string();
        let (user, round) = tag.split_once('-')?;
        let (user, round): (u32, u32) = (user.parse().ok()?, round.parse().ok()?);
        if (user + round) % 7 == 0 && failed.insert((user, round)) {
            return Some(Behaviour::status(503));
        }
        taken.lock().unwrap().push((user, round));
        Some(Behaviour::status(200))
    });
    log
}

fn per_user(log: &Log) -> BTreeMap<u32, Vec<u32>> {
    let mut users: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (user, round) in log.lock().unwrap().iter() {
        users.entry(*user).or_default().push(*round);
    }
    users
}

#[tokio::test]
async fn a_per_user_target_gets_each_users_events_in_arrival_order() {
    let g = generated();
    let ordered = FakeTarget::start().await;
    let unordered = FakeTarget::start().await;
    let (in_order, any_order) = (
        failing_first_attempts(&ordered),
        failing_first_attempts(&unordered),
    );
    // A long timeout keeps each lease (twice the timeout) longer than the
    // clock is moved on here: an attempt is never sent again while in flight.
    // Once every user waits on an event the target fails, all it is offered
    // fails: a breaker would take it for down. Order is what is tested here.
    let extra = "format = \"plain\"\nretry_schedule = [\"1s\"]\nconcurrency = 16\nbreaker = { failures = 0 }";
    let long = |t: String| t.replace("timeout = \"2s\"", "timeout = \"30m\"");
    let targets = [
        long(target(
            "ordered",
            &ordered.url("/"),
            &format!("{extra}\nordering = \"per_user\""),
        )),
        long(target("unordered", &unordered.url("/"), extra)),
    ];
    let toml = config(
        &g,
        &targets,
        "[[routes]]\nto = [\"ordered\", \"unordered\"]\n",
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;

    // Each round is answered before the next is sent: that is arrival order.
    for round in 0..ROUNDS {
        let now = relay.clock.now_secs();
        let pushes: Vec<_> = (0..USERS)
            .map(|user| {
                let msg_id = u64::from(round) * 100_000 + u64::from(user);
                let content = format!("EV-{user}-{round}");
                let (path, body) = text_push(&g, now, &format!("o_user{user}"), msg_id, &content);
                tokio::spawn(relay.post_later(path, body))
            })
            .collect();
        for push in pushes {
            assert_eq!(push.await.unwrap().status, 200);
        }
    }
    // Retries wait for their time: move the clock on until everything is sent.
    let done = eventually(Duration::from_secs(60), || async {
        relay.clock.advance_ms(250);
        relay.nothing_pending().await
    })
    .await;
    assert!(done, "every event is delivered");

    let expected: Vec<u32> = (0..ROUNDS).collect();
    let in_order = per_user(&in_order);
    assert_eq!(in_order.len(), USERS as usize);
    for (user, rounds) in &in_order {
        assert_eq!(rounds, &expected, "user {user}'s events out of order");
    }
    let any_order = per_user(&any_order);
    let mut same_set = any_order.clone();
    same_set.values_mut().for_each(|r| r.sort_unstable());
    assert_eq!(same_set, in_order, "the unordered target gets the same set");
    let shuffled = any_order.values().filter(|r| **r != expected).count();
    assert!(
        shuffled > 0,
        "the retries reorder some users' events where no order is asked for"
    );
    eprintln!(
        "{} events per target; {shuffled} of {USERS} users out of order at the unordered target",
        USERS * ROUNDS
    );
    relay.stop().await;
}

/// One user's backlog on a `per_user` target, its workers woken but never
/// polling: when a delivery settles, the next one of the user is sent at
/// once, so every event arrives, in order, however many slots are free.
async fn one_users_backlog_drains_by_wake_ups_alone(postgres: bool) {
    const EVENTS: u32 = 30;
    let g = generated();
    let ordered = FakeTarget::start().await;
    let extra = "format = \"plain\"\nconcurrency = 8\nordering = \"per_user\"";
    let toml = config(
        &g,
        &[target("ordered", &ordered.url("/"), extra)],
        "[[routes]]\nto = [\"ordered\"]\n",
    );
    let Some(relay) = TestRelay::start_woken_only(&toml, reference_now(&g), postgres).await else {
        return;
    };
    let now = relay.clock.now_secs();
    for i in 0..EVENTS {
        let (path, body) = text_push(&g, now, "o_one", u64::from(i) + 1, &format!("EV-{i}]"));
        assert_eq!(relay.post(&path, body).await.status, 200);
    }
    let all = ordered
        .wait_for(EVENTS as usize, Duration::from_secs(20))
        .await;
    let got: Vec<u32> = ordered
        .received()
        .iter()
        .filter_map(|r| {
            r.text()
                .split("EV-")
                .nth(1)?
                .split(']')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(all, "all {EVENTS} arrived by wake-ups alone; got {got:?}");
    assert_eq!(got, (0..EVENTS).collect::<Vec<_>>(), "in arrival order");
    relay.stop().await;
}

#[tokio::test]
async fn one_users_backlog_drains_by_wake_ups_alone_on_sqlite() {
    one_users_backlog_drains_by_wake_ups_alone(false).await;
}

#[tokio::test]
async fn one_users_backlog_drains_by_wake_ups_alone_on_postgres() {
    one_users_backlog_drains_by_wake_ups_alone(true).await;
}
