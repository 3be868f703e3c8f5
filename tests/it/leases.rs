//! The delivery workers read the spool when there is something to hand out:
//! pushes sent one after another each cost their target's worker one lease,
//! and a reply target whose deliveries are attempted inline is not read at
//! all. Counted by `wxrelay_delivery_leases_total`, with workers that never
//! poll, so every lease is one a wake-up asked for.

use crate::common;
use common::target::FakeTarget;
use common::{
    broker_routes, config, generated, hooks_config, metric, push_as_wechat, reference_now, target,
    text_push, TestRelay,
};
use std::time::Duration;
use wxrelay::clock::Clock;

const WAIT: Duration = Duration::from_secs(20);
const PUSHES: u64 = 8;

/// `target`'s leases so far: (found deliveries, found none).
async fn leases(relay: &TestRelay, target: &str) -> (f64, f64) {
    let text = relay.metrics().await;
    let count = |result| {
        let labels = [("target", target), ("result", result)];
        metric(&text, "wxrelay_delivery_leases_total", &labels)
    };
    (count("found"), count("empty"))
}

#[tokio::test]
async fn each_push_delivered_before_the_next_costs_one_lease_and_no_empty_one() {
    one_lease_per_push(false).await;
}

/// On PostgreSQL the relay also hears its own pushes' `NOTIFY`, which must
/// not wake its workers a second time.
#[tokio::test]
async fn postgres_each_push_costs_one_lease_and_its_own_notify_none() {
    one_lease_per_push(true).await;
}

async fn one_lease_per_push(postgres: bool) {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let toml = hooks_config(&g, &hooks.url("/"), "format = \"plain\"");
    let Some(relay) = TestRelay::start_woken_only(&toml, reference_now(&g), postgres).await else {
        eprintln!("skipped: WXRELAY_TEST_POSTGRES_URL is not set");
        return;
    };
    let now = relay.clock.now_secs();
    let mut before = (0.0, 0.0);
    // The first push after the worker's start, which looks once as it starts.
    for i in 0..=PUSHES {
        let (path, body) = text_push(&g, now, "o_leases", i + 1, &format!("L-{i}"));
        assert_eq!(relay.post(&path, body).await.status, 200);
        assert!(
            hooks.wait_for(i as usize + 1, WAIT).await,
            "push {i} delivered"
        );
        assert!(relay.until_nothing_pending("hooks").await);
        if i == 0 {
            before = leases(&relay, "hooks").await;
        }
    }
    let after = leases(&relay, "hooks").await;
    assert_eq!(
        after.0 - before.0,
        PUSHES as f64,
        "one lease per push found it"
    );
    assert_eq!(after.1 - before.1, 0.0, "no lease found nothing");
    assert_eq!(hooks.count(), PUSHES as usize + 1, "each push sent once");
    relay.stop().await;
}

#[tokio::test]
async fn a_reply_target_answered_inline_is_not_leased_for_its_pushes() {
    let g = generated();
    let broker = FakeTarget::start().await;
    let targets = [target("broker", &broker.url("/events"), "")];
    let toml = config(&g, &targets, broker_routes());
    let relay = TestRelay::start_woken_only(&toml, reference_now(&g), false)
        .await
        .unwrap();
    let now = relay.clock.now_secs();
    let mut before = (0.0, 0.0);
    for i in 0..=PUSHES {
        let openid = format!("o_login_{i}");
        let xml = format!(
            "<xml><ToUserName><![CDATA[gh_relay]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
             <CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
             <Event><![CDATA[SCAN]]></Event><EventKey><![CDATA[{i}]]></EventKey></xml>"
        );
        push_as_wechat(&relay, &g, "plaintext", &xml, &openid).await;
        assert!(
            broker.wait_for(i as usize + 1, WAIT).await,
            "push {i} sent inline"
        );
        assert!(relay.until_nothing_pending("broker").await);
        if i == 0 {
            before = leases(&relay, "broker").await;
        }
    }
    let after = leases(&relay, "broker").await;
    assert_eq!(after, before, "no lease for deliveries sent inline");
    assert_eq!(
        broker.count(),
        PUSHES as usize + 1,
        "each push sent once, inline"
    );
    relay.stop().await;
}
