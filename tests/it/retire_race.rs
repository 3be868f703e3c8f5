//! A reload that removes a target while one of its attempts is in flight:
//! the attempt's success wins over the retirement, so the delivery is not
//! left dead-lettered to be sent twice by a later replay.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{config, eventually, generated, push_text, reference_now, target, TestRelay};
use http::Method;
use std::time::Duration;
use wxrelay::spool::{DeadFilter, DeadReason};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_success_in_flight_wins_over_a_reload_that_retires_its_target() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let other = FakeTarget::start().await;
    hooks.set_default(Behaviour::Hold(200));
    let to = |name: &str| format!("[[routes]]\nto = [\"{name}\"]\n");
    let before = config(&g, &[target("hooks", &hooks.url("/"), "")], &to("hooks"));
    let relay = TestRelay::start(&before, reference_now(&g)).await;

    push_text(&relay, &g, 1, "in flight").await;
    assert!(hooks.wait_for(1, WAIT).await, "the attempt is under way");

    let after = config(&g, &[target("other", &other.url("/"), "")], &to("other"));
    std::fs::write(relay.config_path(), after).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let retired = DeadFilter {
        reason: Some(DeadReason::TargetRemoved),
        ..DeadFilter::default()
    };
    assert!(
        relay.until_dead_letter(retired.clone()).await,
        "the reload retired the delivery"
    );

    hooks.release_hung();
    let spool = relay.spool.clone();
    let settled = eventually(WAIT, || {
        let (spool, retired) = (spool.clone(), retired.clone());
        async move { spool.dead_letters(retired, 10).await.unwrap().is_empty() }
    })
    .await;
    assert!(settled, "the delivered attempt is recorded, not left dead");
    assert!(relay.nothing_pending().await);
    assert!(
        relay
            .spool
            .dead_letters(DeadFilter::default(), 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing is left for a replay to send twice"
    );
    assert_eq!(hooks.count(), 1);
    relay.stop().await;
}
