//! `signature` covers only (token, timestamp, nonce), not the body: a signed
//! query captured from a plaintext or compat push must not carry another body
//! to the targets within its freshness window.

use crate::common;

use common::target::FakeTarget;
use common::{
    body, broker_routes, config, generated, metric, path, reference_now, target, vector, TestRelay,
};
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const GENUINE_SCENE: &str = "login:7f3c2a9e1b";
const FORGED_SCENE: &str = "login:attacker00";

async fn relay_with_broker(g: &Value) -> (TestRelay, FakeTarget) {
    let broker = FakeTarget::start().await;
    let targets = [target("broker", &broker.url("/broker"), "")];
    let relay = TestRelay::start(&config(g, &targets, broker_routes()), reference_now(g)).await;
    (relay, broker)
}

/// The genuine plaintext SCAN with the attacker's scene in it.
fn forged_scan(g: &Value) -> Vec<u8> {
    let genuine = String::from_utf8(body(&vector(g, "plaintext.scan_str")["request"])).unwrap();
    assert!(genuine.contains(GENUINE_SCENE));
    genuine.replace(GENUINE_SCENE, FORGED_SCENE).into_bytes()
}

/// The query without what marks it encrypted: a plaintext push's query.
fn stripped(query_path: &str) -> String {
    let (path, query) = query_path.split_once('?').unwrap();
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.starts_with("encrypt_type=") && !p.starts_with("msg_signature="))
        .collect();
    format!("{path}?{}", kept.join("&"))
}

/// The broker got the genuine SCAN once and the forged one never.
async fn assert_broker_got_only_the_genuine_scan(relay: &TestRelay, broker: &FakeTarget) {
    assert!(broker.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("broker").await);
    let received = broker.received();
    assert_eq!(received.len(), 1, "one event, delivered once");
    assert!(received[0].text().contains(GENUINE_SCENE));
    assert!(received.iter().all(|r| !r.text().contains(FORGED_SCENE)));
}

async fn pushes(relay: &TestRelay, account: &str, verdict: &str) -> f64 {
    let text = relay.metrics().await;
    metric(
        &text,
        "wxrelay_pushes_total",
        &[("account", account), ("verdict", verdict)],
    )
}

/// Takes the genuine SCAN of `account`, then the forged body under its query
/// as `forge_query` makes it, then the genuine push again.
async fn a_forgery_after_the_genuine_push_is_refused(
    account: &str,
    forge_query: impl Fn(&str) -> String,
) {
    let g = generated();
    let (relay, broker) = relay_with_broker(&g).await;
    let v = vector(&g, &format!("{account}.scan_str"));
    let query = path(account, &v["request"]);
    let genuine = body(&v["request"]);
    assert_eq!(relay.post(&query, genuine.clone()).await.status, 200);

    let forged = relay.post(&forge_query(&query), forged_scan(&g)).await;
    assert_eq!(forged.status, 403, "{}", forged.text());
    assert!(forged.text().contains("replayed"), "{}", forged.text());

    let again = relay.post(&query, genuine).await;
    assert_eq!(again.status, 200, "a byte-identical re-send is a duplicate");
    assert_broker_got_only_the_genuine_scan(&relay, &broker).await;
    assert_eq!(pushes(&relay, account, "replayed").await, 1.0);
    assert_eq!(pushes(&relay, account, "duplicate").await, 1.0);
    assert_eq!(pushes(&relay, account, "ok").await, 1.0);
    relay.stop().await;
}

#[tokio::test]
async fn a_plaintext_query_replayed_with_another_body_is_refused() {
    a_forgery_after_the_genuine_push_is_refused("plaintext", str::to_string).await;
}

#[tokio::test]
async fn a_compat_query_stripped_of_its_encryption_and_replayed_is_refused() {
    a_forgery_after_the_genuine_push_is_refused("compat", stripped).await;
}

#[tokio::test]
async fn racing_bodies_under_one_query_store_exactly_one() {
    let g = generated();
    let (relay, broker) = relay_with_broker(&g).await;
    let v = vector(&g, "plaintext.scan_str");
    let query = path("plaintext", &v["request"]);
    let genuine = String::from_utf8(body(&v["request"])).unwrap();
    let sends: Vec<_> = (0..8)
        .map(|i| {
            let body = genuine.replace(GENUINE_SCENE, &format!("login:racer{i:05}"));
            tokio::spawn(relay.post_later(query.clone(), body.into_bytes()))
        })
        .collect();
    let mut statuses = Vec::new();
    for send in sends {
        statuses.push(send.await.unwrap().status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 403, 403, 403, 403, 403, 403, 403]);
    assert!(broker.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("broker").await);
    assert_eq!(broker.count(), 1);
    relay.stop().await;
}

#[tokio::test]
async fn an_identical_secure_replay_stays_a_duplicate_while_its_query_is_fresh() {
    let g = generated();
    let v = vector(&g, "secure.CLICK");
    let sent: i64 = v["request"]["query_string"]
        .as_str()
        .unwrap()
        .split('&')
        .find_map(|p| p.strip_prefix("timestamp="))
        .unwrap()
        .parse()
        .unwrap();
    // The shortest dedup window the check allows, and a relay clock 250 s
    // behind WeChat's: the query stays fresh for 550 s of the relay's time.
    let toml = config(&g, &[], "[spool]\ndedup_window = \"300s\"\n");
    let relay = TestRelay::start(&toml, sent - 250).await;
    let (query, push) = (path("secure", &v["request"]), body(&v["request"]));
    assert_eq!(relay.post(&query, push.clone()).await.status, 200);
    relay.clock.advance_ms(320_000);
    assert_eq!(relay.post(&query, push).await.status, 200);
    assert_eq!(relay.unrouted().await.len(), 1, "stored once");
    assert_eq!(pushes(&relay, "secure", "duplicate").await, 1.0);
    relay.stop().await;
}

/// WeChat may seal a re-sent push afresh (a new random prefix, so another
/// `<Encrypt>` and `msg_signature`) under the same timestamp and nonce: the
/// message is the same, so it is a duplicate, not a replay.
#[tokio::test]
async fn a_compat_push_sealed_afresh_under_the_same_query_is_a_duplicate() {
    use wxrelay::wechat::crypto::AesKey;
    use wxrelay::wechat::push::{self, PushParams, Sealing};
    let g = generated();
    let (relay, broker) = relay_with_broker(&g).await;
    let c = &g["config"];
    let key = AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap();
    let xml = String::from_utf8(body(&vector(&g, "plaintext.scan_str")["request"])).unwrap();
    let sealed = |random: [u8; 16]| {
        let envelope = PushParams {
            token: c["token"].as_str().unwrap(),
            app_id: c["appid"].as_str().unwrap(),
            timestamp: reference_now(&g),
            nonce: "1520398187",
            openid: None,
            random: &random,
        };
        push::build(&xml, Sealing::Compat(&key), &envelope)
    };
    let (first, again) = (sealed([b'a'; 16]), sealed([b'b'; 16]));
    assert_eq!(first.query.split('&').nth(2), again.query.split('&').nth(2));
    assert_ne!(first.body, again.body, "sealed afresh");
    for push in [first, again] {
        let answer = relay
            .post(
                &format!("/wx/compat?{}", push.query),
                push.body.into_bytes(),
            )
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    assert_eq!(pushes(&relay, "compat", "duplicate").await, 1.0);
    assert_eq!(pushes(&relay, "compat", "replayed").await, 0.0);
    assert_broker_got_only_the_genuine_scan(&relay, &broker).await;
    relay.stop().await;
}
