//! Delivery contracts over real sockets: every routed target gets each event
//! (in its format), retries follow the schedule and `Retry-After`, refusals and
//! unroutable events become dead letters, the reply target's answer reaches
//! WeChat within the budget, and one slow target delays no other.

use crate::common;

use base64::Engine as _;
use common::target::{Behaviour, FakeTarget, Received};
use common::{
    body, broker_routes, config, generated, path, reference_now, target, vector, TestRelay,
};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Duration;
use wxrelay::spool::DeadFilter;
use wxrelay::wechat::crypto::{decrypt, AesKey};
use wxrelay::wechat::message::Message;
use wxrelay::wechat::{reply, signature};

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn send(relay: &TestRelay, v: &Value, account: &str) -> common::Answer {
    relay
        .post(&path(account, &v["request"]), body(&v["request"]))
        .await
}

fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
}

#[tokio::test]
async fn each_format_carries_the_event_as_its_consumer_expects() {
    let g = generated();
    let (raw, plain, json, demo) = (
        FakeTarget::start().await,
        FakeTarget::start().await,
        FakeTarget::start().await,
        FakeTarget::start().await,
    );
    let targets = [
        target("raw", &raw.url("/raw?tenant=7"), "format = \"raw\""),
        target("plain", &plain.url("/api/webhook"), "format = \"plain\""),
        target(
            "json",
            &json.url("/events"),
            &format!("format = \"json\"\nsecret = \"{SECRET}\""),
        ),
        target("demo", &demo.url("/demo"), "format = \"authing-demo-json\""),
    ];
    let routes = "[[routes]]\nmatch = { event = [\"subscribe\", \"SCAN\"] }\nto = [\"raw\", \"plain\", \"json\", \"demo\"]\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let token = g["config"]["token"].as_str().unwrap();

    let broker_vectors: Vec<&Value> = g["positive"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["expected"].get("authing_demo_forward").is_some())
        .collect();
    assert_eq!(broker_vectors.len(), 15, "5 login events in 3 modes");
    for v in &broker_vectors {
        let answer = send(&relay, v, v["mode"].as_str().unwrap()).await;
        assert_eq!(answer.status, 200, "{}", v["id"]);
    }
    let n = broker_vectors.len();
    for t in [&raw, &plain, &json, &demo] {
        assert!(t.wait_for(n, WAIT).await, "{} of {n} delivered", t.count());
    }

    for v in &broker_vectors {
        let id = v["id"].as_str().unwrap();
        let request = &v["request"];
        let query = request["query_string"].as_str().unwrap();
        let plaintext = v["expected"]["plaintext_xml"].as_str().unwrap();

        // raw: WeChat's query and body byte for byte, after the target's own query.
        let got = raw.received();
        let r = got
            .iter()
            .find(|r| r.body == body(request))
            .unwrap_or_else(|| panic!("{id}: raw body"));
        assert_eq!(r.uri, format!("/raw?tenant=7&{query}"), "{id}");
        assert_eq!(r.headers["content-type"], "text/xml");

        // plain: the decrypted XML under a plaintext-mode query that still verifies.
        let got = plain.received();
        let r = got
            .iter()
            .find(|r| r.text() == plaintext)
            .unwrap_or_else(|| panic!("{id}: plain"));
        let q = r.query();
        assert!(
            query_param(q, "encrypt_type").is_none() && query_param(q, "msg_signature").is_none(),
            "{id}"
        );
        let (ts, nonce) = (
            query_param(q, "timestamp").unwrap(),
            query_param(q, "nonce").unwrap(),
        );
        assert!(
            signature::verify(query_param(q, "signature").unwrap(), &[token, ts, nonce]),
            "{id}"
        );
        assert_eq!(r.headers["content-type"], "text/xml");

        // json: the fields as strings, the XML, a valid Standard Webhooks signature.
        let got = json.received();
        let r = got
            .iter()
            .find(|r| {
                let e: Value = serde_json::from_str(&r.text()).unwrap();
                e["xml"] == plaintext && e["account"] == v["mode"]
            })
            .unwrap_or_else(|| panic!("{id}: json"));
        let envelope: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(envelope["fields"], v["expected"]["fields"], "{id}");
        assert_eq!(envelope["account"], v["mode"]);
        assert_eq!(envelope["event"], v["expected"]["fields"]["Event"]);
        assert_eq!(
            envelope["from_user"],
            v["expected"]["fields"]["FromUserName"]
        );
        assert_eq!(
            r.headers["webhook-id"].to_str().unwrap(),
            envelope["id"].as_str().unwrap()
        );
        assert!(verify_standard_webhook(r, SECRET), "{id}: signature");
        assert!(
            !verify_standard_webhook(r, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            "{id}"
        );

        // authing-demo-json: exactly what Authing's demo relay would post.
        let expected = &v["expected"]["authing_demo_forward"]["json"];
        let got = demo.received();
        let r = got
            .iter()
            .find(|r| &serde_json::from_str::<Value>(&r.text()).unwrap() == expected)
            .unwrap_or_else(|| panic!("{id}: authing-demo-json"));
        assert_eq!(r.uri, "/demo");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    relay.stop().await;
}

/// The relay with one fake target `name` (with `extra` keys) and `routes`.
async fn with_one_target(
    g: &Value,
    name: &str,
    extra: &str,
    routes: &str,
) -> (FakeTarget, TestRelay) {
    let fake = FakeTarget::start().await;
    let targets = [target(name, &fake.url("/events"), extra)];
    let relay = TestRelay::start(&config(g, &targets, routes), reference_now(g)).await;
    (fake, relay)
}

/// A plaintext push of `xml` to account `plaintext`, signed with the vectors' Token.
fn plaintext_push(g: &Value, xml: &str) -> (String, Vec<u8>) {
    let token = g["config"]["token"].as_str().unwrap();
    // A nonce per message, as WeChat sends: one signed query taken with two
    // bodies is a replay.
    let nonce = u32::from_be_bytes(Sha256::digest(xml.as_bytes())[..4].try_into().unwrap());
    let (ts, nonce) = (reference_now(g).to_string(), nonce.to_string());
    let sig = signature::sign(&[token, &ts, &nonce]);
    (
        format!("/wx/plaintext?signature={sig}&timestamp={ts}&nonce={nonce}&openid=oUser"),
        xml.as_bytes().to_vec(),
    )
}

/// Standard Webhooks verification written from the specification, as
/// Python's and Node's servers do it: the header bytes read as Latin-1, the
/// signed content `{id}.{timestamp}.{body}` encoded as UTF-8.
fn verify_standard_webhook(r: &Received, secret: &str) -> bool {
    let header = |name: &str| -> String {
        r.headers[name]
            .as_bytes()
            .iter()
            .map(|&b| b as char)
            .collect()
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let signed = format!(
        "{}.{}.{}",
        header("webhook-id"),
        header("webhook-timestamp"),
        r.text()
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    header("webhook-signature")
        .split(' ')
        .any(|sig| sig.strip_prefix("v1,") == Some(expected.as_str()))
}

#[tokio::test]
async fn json_deliveries_of_non_ascii_event_keys_verify_and_keep_their_id_across_retries() {
    let g = generated();
    let extra = format!("format = \"json\"\nsecret = \"{SECRET}\"\nretry_schedule = [\"1s\"]");
    let (hooks, relay) =
        with_one_target(&g, "hooks", &extra, "[[routes]]\nto = [\"hooks\"]\n").await;
    // Each event's first attempt fails, so each is sent twice.
    hooks.script([Behaviour::status(503), Behaviour::status(503)]);
    let now = reference_now(&g);
    let event = |event: &str, key: &str| {
        format!(
            "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\
             <FromUserName><![CDATA[oUser]]></FromUserName><CreateTime>{now}</CreateTime>\
             <MsgType><![CDATA[event]]></MsgType><Event><![CDATA[{event}]]></Event>\
             <EventKey><![CDATA[{key}]]></EventKey></xml>"
        )
    };
    for xml in [
        event("subscribe", "qrscene_登录:1"),
        event("CLICK", "菜单_1"),
    ] {
        let (path, body) = plaintext_push(&g, &xml);
        assert_eq!(relay.post(&path, body).await.status, 200);
    }
    assert!(hooks.wait_for(2, WAIT).await);
    // Both failures recorded before the clock moves, or a retry would be
    // scheduled from the moved clock and never come due.
    assert!(common::quiet(&relay, "hooks").await);
    relay.clock.advance_ms(2_000);
    assert!(hooks.wait_for(4, WAIT).await, "{} of 4", hooks.count());
    assert!(relay.until_nothing_pending("hooks").await);

    let got = hooks.received();
    let mut ids = std::collections::BTreeMap::<String, Vec<String>>::new();
    for r in &got {
        assert!(
            verify_standard_webhook(r, SECRET),
            "the signature fails as a Latin-1 server reads it: {:?}",
            r.headers["webhook-id"]
        );
        let id = r.headers["webhook-id"].as_bytes();
        assert!(id.is_ascii(), "webhook-id is not ASCII: {id:?}");
        let id = String::from_utf8(id.to_vec()).unwrap();
        assert!(id.starts_with("msg_") && id.len() > 4, "{id}");
        let envelope: Value = serde_json::from_str(&r.text()).unwrap();
        assert_eq!(envelope["id"], id.as_str());
        ids.entry(envelope["event_key"].as_str().unwrap().to_owned())
            .or_default()
            .push(id);
    }
    assert_eq!(ids.keys().collect::<Vec<_>>(), ["qrscene_登录:1", "菜单_1"]);
    for (key, ids) in &ids {
        assert_eq!(ids.len(), 2, "{key}: two attempts");
        assert_eq!(ids[0], ids[1], "{key}: the id is stable across retries");
    }
    let distinct: std::collections::BTreeSet<_> = ids.values().map(|v| &v[0]).collect();
    assert_eq!(distinct.len(), 2, "two events, two ids");
    relay.stop().await;
}

/// The `json` body, byte for byte, as the README documents it: top-level
/// values are strings or `null`; `fields` keeps document order, nests child
/// elements as objects and makes `item` and `List` entries arrays, even of one.
#[tokio::test]
async fn the_json_body_is_exactly_as_documented_for_each_nested_kind() {
    let g = generated();
    let extra = format!("format = \"json\"\nsecret = \"{SECRET}\"");
    let (hooks, relay) =
        with_one_target(&g, "hooks", &extra, "[[routes]]\nto = [\"hooks\"]\n").await;
    let now = reference_now(&g);
    let head = |msg_type: &str| {
        format!(
            "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\
             <FromUserName><![CDATA[oUser]]></FromUserName><CreateTime>{now}</CreateTime>\
             <MsgType><![CDATA[{msg_type}]]></MsgType>"
        )
    };
    let fields_head = |msg_type: &str| {
        format!(
            r#""ToUserName":"gh_3f1a2b9c8d7e","FromUserName":"oUser","CreateTime":"{now}","MsgType":"{msg_type}""#
        )
    };
    let cases = [
        (
            format!(
                "{}<Event><![CDATA[scancode_push]]></Event><EventKey><![CDATA[扫码_1]]></EventKey>\
                 <ScanCodeInfo><ScanType><![CDATA[qrcode]]></ScanType>\
                 <ScanResult><![CDATA[1]]></ScanResult></ScanCodeInfo></xml>",
                head("event")
            ),
            r#""event":"scancode_push","event_key":"扫码_1""#.to_owned(),
            format!(
                r#"{},"Event":"scancode_push","EventKey":"扫码_1","ScanCodeInfo":{{"ScanType":"qrcode","ScanResult":"1"}}"#,
                fields_head("event")
            ),
        ),
        (
            format!(
                "{}<Event><![CDATA[pic_sysphoto]]></Event><EventKey><![CDATA[6]]></EventKey>\
                 <SendPicsInfo><Count>1</Count><PicList><item><PicMd5Sum><![CDATA[1b5f7c23b5bf75682a53e7b6d163e185]]></PicMd5Sum>\
                 </item></PicList></SendPicsInfo></xml>",
                head("event")
            ),
            r#""event":"pic_sysphoto","event_key":"6""#.to_owned(),
            format!(
                r#"{},"Event":"pic_sysphoto","EventKey":"6","SendPicsInfo":{{"Count":"1","PicList":{{"item":[{{"PicMd5Sum":"1b5f7c23b5bf75682a53e7b6d163e185"}}]}}}}"#,
                fields_head("event")
            ),
        ),
        (
            format!(
                "{}<Event><![CDATA[PUBLISHJOBFINISH]]></Event><PublishEventInfo>\
                 <publish_id>2247503051</publish_id><publish_status>0</publish_status>\
                 <article_id><![CDATA[b5O2OUs25HBxRceL7hfReg]]></article_id><article_detail>\
                 <count>2</count><item><idx>1</idx><article_url><![CDATA[https://mp.weixin.qq.com/s/a]]></article_url></item>\
                 <item><idx>2</idx><article_url><![CDATA[https://mp.weixin.qq.com/s/b]]></article_url></item>\
                 </article_detail></PublishEventInfo></xml>",
                head("event")
            ),
            r#""event":"PUBLISHJOBFINISH","event_key":null"#.to_owned(),
            format!(
                r#"{},"Event":"PUBLISHJOBFINISH","PublishEventInfo":{{"publish_id":"2247503051","publish_status":"0","article_id":"b5O2OUs25HBxRceL7hfReg","article_detail":{{"count":"2","item":[{{"idx":"1","article_url":"https://mp.weixin.qq.com/s/a"}},{{"idx":"2","article_url":"https://mp.weixin.qq.com/s/b"}}]}}}}"#,
                fields_head("event")
            ),
        ),
        (
            format!(
                "{}<Content><![CDATA[你好]]></Content><MsgId>24602152426471537</MsgId></xml>",
                head("text")
            ),
            r#""event":null,"event_key":null"#.to_owned(),
            format!(
                r#"{},"Content":"你好","MsgId":"24602152426471537""#,
                fields_head("text")
            ),
        ),
    ];
    for (xml, _, _) in &cases {
        let (path, body) = plaintext_push(&g, xml);
        assert_eq!(relay.post(&path, body).await.status, 200);
    }
    assert!(hooks.wait_for(cases.len(), WAIT).await);

    let received_at =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_secs(now as u64));
    let got = hooks.received();
    for (xml, event, fields) in &cases {
        let xml_json = serde_json::to_string(xml).unwrap();
        let r = got
            .iter()
            .find(|r| r.text().ends_with(&format!(r#""xml":{xml_json}}}"#)))
            .unwrap_or_else(|| panic!("not delivered: {xml}"));
        let id = r.headers["webhook-id"].to_str().unwrap();
        let msg_type = if event.contains("null,") {
            "text"
        } else {
            "event"
        };
        let expected = format!(
            r#"{{"id":"{id}","account":"plaintext","received_at":"{received_at}","msg_type":"{msg_type}",{event},"from_user":"oUser","to_user":"gh_3f1a2b9c8d7e","create_time":"{now}","fields":{{{fields}}},"xml":{xml_json}}}"#
        );
        assert_eq!(r.text(), expected);
        assert!(verify_standard_webhook(r, SECRET));
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_target_answering_503_twice_then_200_gets_the_event_on_the_third_attempt() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.script([Behaviour::status(503), Behaviour::status(503)]);
    let targets = [target(
        "hooks",
        &hooks.url("/"),
        "retry_schedule = [\"1s\", \"1s\", \"1s\"]",
    )];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"),
        reference_now(&g),
    )
    .await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );

    for attempt in 1..=2u32 {
        assert!(hooks.wait_for(attempt as usize, WAIT).await);
        let recorded = relay.until_attempts("hooks", attempt).await;
        assert!(recorded, "attempt {attempt} counted");
        let p = &relay.spool.waiting("hooks", 1).await.unwrap()[0];
        assert!(p.last_error.starts_with("HTTP 503"), "{}", p.last_error);
        relay.clock.advance_ms(2_000);
    }
    assert!(hooks.wait_for(3, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    assert_eq!(hooks.count(), 3);
    assert!(relay
        .spool
        .dead_letters(DeadFilter::default(), 10)
        .await
        .unwrap()
        .is_empty());
    relay.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured_over_the_schedule() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.script([Behaviour::Answer {
        status: 429,
        headers: vec![("retry-after", "120".into())],
        body: String::new(),
    }]);
    let targets = [target(
        "hooks",
        &hooks.url("/"),
        "retry_schedule = [\"1s\"]",
    )];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"),
        reference_now(&g),
    )
    .await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_attempts("hooks", 1).await);
    let due_in = relay.spool.waiting("hooks", 1).await.unwrap()[0].next_at.0
        - wxrelay::clock::Clock::now_ms(&*relay.clock);
    assert!(
        (120_000..=121_000).contains(&due_in),
        "next attempt in {due_in} ms, not the schedule's 1 s"
    );
    relay.clock.advance_ms(121_000);
    assert!(
        hooks.wait_for(2, WAIT).await,
        "retried once Retry-After has passed"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_retry_after_date_is_read_against_the_relays_clock() {
    let g = generated();
    let now = reference_now(&g);
    let hooks = FakeTarget::start().await;
    let at = std::time::UNIX_EPOCH + Duration::from_secs((now + 120) as u64);
    hooks.script([Behaviour::Answer {
        status: 503,
        headers: vec![("retry-after", httpdate::fmt_http_date(at))],
        body: String::new(),
    }]);
    let targets = [target(
        "hooks",
        &hooks.url("/"),
        "retry_schedule = [\"1s\"]",
    )];
    let relay =
        TestRelay::start(&config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"), now).await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );
    assert!(relay.until_attempts("hooks", 1).await);
    let due_in = relay.spool.waiting("hooks", 1).await.unwrap()[0].next_at.0
        - wxrelay::clock::Clock::now_ms(&*relay.clock);
    assert!(
        (119_000..=121_000).contains(&due_in),
        "next attempt in {due_in} ms, not at the date the target named"
    );
    relay.stop().await;
}

#[tokio::test]
async fn a_400_dead_letters_at_once_with_its_reason() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::body(400, "text/plain", "unknown user\n"));
    let relay = TestRelay::start(
        &config(
            &g,
            &[target("hooks", &hooks.url("/"), "")],
            "[[routes]]\nto = [\"hooks\"]\n",
        ),
        reference_now(&g),
    )
    .await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );
    assert!(relay.until_dead_letter(DeadFilter::default()).await);
    let dead = relay
        .spool
        .dead_letters(DeadFilter::default(), 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].target.as_deref(), Some("hooks"));
    assert_eq!(dead[0].reason.as_str(), "rejected");
    assert_eq!(dead[0].last_error, "HTTP 400: unknown user");
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(hooks.count(), 1, "no retry after a 4xx");
    relay.stop().await;
}

#[tokio::test]
async fn exhausted_retries_dead_letter_with_the_last_error() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::status(502));
    let targets = [target(
        "hooks",
        &hooks.url("/"),
        "retry_schedule = [\"1s\"]",
    )];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"),
        reference_now(&g),
    )
    .await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_attempts("hooks", 1).await);
    relay.clock.advance_ms(2_000);
    assert!(relay.until_dead_letter(DeadFilter::default()).await);
    let dead = &relay
        .spool
        .dead_letters(DeadFilter::default(), 10)
        .await
        .unwrap()[0];
    assert_eq!((dead.reason.as_str(), dead.attempts), ("exhausted", 2));
    assert_eq!(dead.last_error, "HTTP 502");
    relay.stop().await;
}

#[tokio::test]
async fn unrouted_and_removed_target_dead_letters_are_kept_and_listed() {
    let g = generated();
    let kept = FakeTarget::start().await;
    let gone = FakeTarget::start().await;
    gone.set_default(Behaviour::status(503));
    let both = config(
        &g,
        &[
            target("kept", &kept.url("/"), ""),
            target("gone", &gone.url("/"), ""),
        ],
        "[[routes]]\nmatch = { event = \"CLICK\" }\nto = [\"kept\", \"gone\"]\n",
    );
    let mut relay = TestRelay::start(&both, reference_now(&g)).await;
    assert_eq!(
        send(&relay, vector(&g, "secure.CLICK"), "secure")
            .await
            .status,
        200
    );
    assert_eq!(
        send(&relay, vector(&g, "secure.text"), "secure")
            .await
            .status,
        200,
        "unrouted is still accepted"
    );
    assert!(kept.wait_for(1, WAIT).await);
    assert!(gone.wait_for(1, WAIT).await);

    let only_kept = config(
        &g,
        &[target("kept", &kept.url("/"), "")],
        "[[routes]]\nmatch = { event = \"CLICK\" }\nto = [\"kept\"]\n",
    );
    relay.restart(&only_kept).await;
    let dead = relay
        .spool
        .dead_letters(DeadFilter::default(), 10)
        .await
        .unwrap();
    let reasons: Vec<(Option<&str>, &str)> = dead
        .iter()
        .map(|d| (d.target.as_deref(), d.reason.as_str()))
        .collect();
    assert!(reasons.contains(&(None, "unrouted")), "{reasons:?}");
    assert!(
        reasons.contains(&(Some("gone"), "target_removed")),
        "{reasons:?}"
    );
    assert_eq!(reasons.len(), 2);
    let unrouted = dead
        .iter()
        .find(|d| d.reason.as_str() == "unrouted")
        .unwrap();
    assert_eq!(unrouted.msg_type, "text");
    assert_eq!(kept.count(), 1, "the unrouted text reached no target");
    relay.stop().await;
}

#[tokio::test]
async fn a_broker_that_never_answers_does_not_hold_wechat_and_gets_the_event_later() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.script([Behaviour::Hang]);
    let targets = [target(
        "broker",
        &broker.url("/events"),
        "retry = \"login\"",
    )];
    let relay = TestRelay::start(&config(&g, &targets, broker_routes()), reference_now(&g)).await;

    let started = std::time::Instant::now();
    let answer = send(&relay, vector(&g, "secure.scan_str"), "secure").await;
    let took = started.elapsed();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "success");
    // reply_budget is 1 s here; WeChat gives up at 5 s.
    assert!(took < Duration::from_secs(5), "answered after {took:?}");

    broker.release_hung();
    relay.clock.advance_ms(5_000);
    assert!(
        broker.wait_for(2, WAIT).await,
        "the broker gets the event once it answers"
    );
    assert!(relay.until_nothing_pending("broker").await);
    assert_eq!(
        broker.received()[1].body,
        body(&vector(&g, "secure.scan_str")["request"])
    );
    relay.stop().await;
}

/// The inline attempt at the reply target is an attempt like a worker's: a
/// 503 there marks the target down, so its next answer releases the backlog.
#[tokio::test]
async fn an_inline_reply_counts_toward_the_targets_health() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.script([Behaviour::status(503)]);
    broker.set_default(Behaviour::body(200, "text/xml", reply_xml()));
    let targets = [target(
        "broker",
        &broker.url("/events"),
        "retry_schedule = [\"1h\"]",
    )];
    let relay = TestRelay::start(&config(&g, &targets, broker_routes()), reference_now(&g)).await;

    let first = send(&relay, vector(&g, "secure.scan_str"), "secure").await;
    assert_eq!(first.text(), "success", "no reply from a 503");
    assert!(relay.until_attempts("broker", 1).await);
    let second = send(&relay, vector(&g, "secure.scan_id"), "secure").await;
    assert_eq!(second.status, 200);
    assert!(
        broker.wait_for(3, WAIT).await,
        "the first push is sent again when the broker answers, not an hour later: {} requests",
        broker.count()
    );
    assert_eq!(
        broker.received()[2].body,
        body(&vector(&g, "secure.scan_str")["request"])
    );
    relay.stop().await;
}

fn reply_xml() -> &'static str {
    "<xml><ToUserName><![CDATA[oRlyT3stUserOpenId0000000002]]></ToUserName><FromUserName><![CDATA[gh_3f1a2b9c8d7e]]></FromUserName><CreateTime>1717000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[欢迎!]]></Content></xml>"
}

#[tokio::test]
async fn a_brokers_reply_reaches_wechat_sealed_for_secure_accounts() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::body(200, "text/xml", reply_xml()));
    let targets = [target(
        "broker",
        &broker.url("/events"),
        "retry = \"login\"",
    )];
    let relay = TestRelay::start(&config(&g, &targets, broker_routes()), reference_now(&g)).await;

    let answer = send(&relay, vector(&g, "secure.scan_str"), "secure").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.headers["content-type"],
        "application/xml; charset=utf-8"
    );
    let envelope = Message::parse(&answer.body).unwrap();
    let encrypted = envelope.get("Encrypt").expect("an encrypted envelope");
    let key = AesKey::from_encoding(g["config"]["encoding_aes_key"].as_str().unwrap()).unwrap();
    let app_id = g["config"]["appid"].as_str().unwrap();
    assert_eq!(decrypt(&key, encrypted, app_id).unwrap(), reply_xml());
    let token = g["config"]["token"].as_str().unwrap();
    let (ts, nonce) = (
        envelope.get("TimeStamp").unwrap(),
        envelope.get("Nonce").unwrap(),
    );
    assert!(signature::verify(
        envelope.get("MsgSignature").unwrap(),
        &[token, ts, nonce, encrypted]
    ));

    // In plaintext mode the reply goes as it came.
    let answer = send(&relay, vector(&g, "plaintext.scan_str"), "plaintext").await;
    assert_eq!(answer.text(), reply_xml());
    assert_eq!(
        answer.headers["content-type"],
        "application/xml; charset=utf-8"
    );

    // The inline attempt was the delivery: the workers do not send it again.
    assert!(relay.until_nothing_pending("broker").await);
    assert_eq!(broker.count(), 2);
    relay.stop().await;
}

/// A reply the broker sealed itself reaches WeChat only if WeChat can open it:
/// its MsgSignature verifies with the account's Token and it decrypts with the
/// account's current or previous key for the account's AppID.
#[tokio::test]
async fn a_brokers_own_envelope_is_passed_only_if_wechat_could_open_it() {
    let g = generated();
    let (broker, relay) = with_one_target(&g, "broker", "retry = \"login\"", broker_routes()).await;
    let c = &g["config"];
    let token = c["token"].as_str().unwrap();
    let app_id = c["appid"].as_str().unwrap();
    let key = AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap();
    let previous = AesKey::from_encoding(c["previous_encoding_aes_key"].as_str().unwrap()).unwrap();
    let other_key = AesKey::from_bytes([7; 32]);
    let seal = |key: &AesKey, token: &str, app_id: &str| {
        reply::envelope(
            key,
            token,
            app_id,
            reply_xml(),
            "1717000001",
            "31337",
            &reply::random_bytes(),
        )
    };
    let good = seal(&key, token, app_id);
    let bad_signature = seal(&key, "AnotherToken1", app_id);
    let cases = [
        ("secure", "secure.scan_str", seal(&other_key, token, app_id)),
        (
            "secure",
            "secure.scan_id",
            seal(&key, token, "wx0000000000000000"),
        ),
        ("secure", "secure.subscribe_qrscene_str", bad_signature),
    ];
    for (account, id, envelope) in &cases {
        broker.script([Behaviour::body(200, "text/xml", envelope)]);
        let answer = send(&relay, vector(&g, id), account).await;
        assert_eq!(
            (answer.status.as_u16(), answer.text().as_str()),
            (200, "success"),
            "{id}"
        );
        assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");
    }

    // Sealed with the key that decrypted the push: passed as is.
    broker.script([Behaviour::body(200, "text/xml", &good)]);
    let answer = send(&relay, vector(&g, "secure.subscribe_qrscene_id"), "secure").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), good, "passed as is");
    assert_eq!(
        answer.headers["content-type"],
        "application/xml; charset=utf-8"
    );

    // Sealed with the previous key during a rotation, while WeChat used the
    // current one for the push: re-sealed with the current key.
    let stale = seal(&previous, token, app_id);
    broker.script([Behaviour::body(200, "text/xml", &stale)]);
    let answer = send(&relay, vector(&g, "secure.scan_str"), "rotating").await;
    assert_eq!(answer.status, 200);
    assert_ne!(answer.text(), stale, "not passed as is");
    assert_eq!(
        answer.headers["content-type"],
        "application/xml; charset=utf-8"
    );
    let parsed = Message::parse(&answer.body).unwrap();
    let encrypted = parsed.get("Encrypt").unwrap();
    let parts = [
        token,
        parsed.get("TimeStamp").unwrap(),
        parsed.get("Nonce").unwrap(),
        encrypted,
    ];
    assert!(signature::verify(
        parsed.get("MsgSignature").unwrap(),
        &parts
    ));
    assert_eq!(decrypt(&key, encrypted, app_id).unwrap(), reply_xml());
    assert!(decrypt(&previous, encrypted, app_id).is_err());

    // An unencrypted push (WeChat in plaintext mode) expects a plaintext
    // reply: the envelope is opened and its reply passed.
    broker.script([Behaviour::body(200, "text/xml", &good)]);
    let answer = send(&relay, vector(&g, "plaintext.scan_str"), "plaintext").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), reply_xml(), "opened for a plaintext push");

    let m = relay.metrics().await;
    let replies =
        |outcome: &str| common::metric(&m, "wxrelay_replies_total", &[("outcome", outcome)]);
    assert_eq!(replies("unverifiable"), 3.0, "{m}");
    assert_eq!(replies("passed"), 2.0);
    assert_eq!(replies("encrypted"), 1.0);
    relay.stop().await;
}

#[tokio::test]
async fn a_reply_wechat_cannot_take_becomes_success() {
    let g = generated();
    let broker = FakeTarget::start().await;
    let targets = [target(
        "broker",
        &broker.url("/events"),
        "retry = \"login\"",
    )];
    let relay = TestRelay::start(&config(&g, &targets, broker_routes()), reference_now(&g)).await;
    let cases = [
        (
            "secure.scan_str",
            Behaviour::body(200, "application/json", "{\"code\":200,\"message\":\"ok\"}"),
        ),
        (
            "secure.scan_id",
            Behaviour::body(200, "text/html", "<html><body>OK</body></html>"),
        ),
        (
            "secure.subscribe_qrscene_str",
            Behaviour::body(500, "text/xml", reply_xml()),
        ),
        (
            "secure.subscribe_qrscene_id",
            Behaviour::body(200, "text/plain", "OK"),
        ),
    ];
    for (id, behaviour) in cases {
        broker.script([behaviour]);
        let answer = send(&relay, vector(&g, id), "secure").await;
        assert_eq!(
            (answer.status.as_u16(), answer.text().as_str()),
            (200, "success"),
            "{id}"
        );
    }
    relay.stop().await;
}

#[tokio::test]
async fn retries_and_races_of_one_push_are_delivered_once_and_distinct_events_all_are() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let relay = TestRelay::start(
        &config(
            &g,
            &[target("hooks", &hooks.url("/"), "")],
            "[[routes]]\nto = [\"hooks\"]\n",
        ),
        reference_now(&g),
    )
    .await;
    // WeChat's retry: new timestamp and nonce, same content.
    for r in vector(&g, "special.retry_duplicate")["requests"]
        .as_array()
        .unwrap()
    {
        assert_eq!(relay.post(&path("secure", r), body(r)).await.status, 200);
    }
    // The same push sent four times at once.
    let v = vector(&g, "secure.LOCATION");
    let racing: Vec<_> = (0..4)
        .map(|_| tokio::spawn(relay.post_later(path("secure", &v["request"]), body(&v["request"]))))
        .collect();
    for r in racing {
        assert_eq!(r.await.unwrap().status, 200);
    }
    // Two different events from one user in one second.
    for r in vector(&g, "special.same_second_different_events")["requests"]
        .as_array()
        .unwrap()
    {
        assert_eq!(relay.post(&path("secure", r), body(r)).await.status, 200);
    }
    assert!(hooks.wait_for(4, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    assert_eq!(hooks.count(), 4, "1 retried + 1 raced + 2 distinct");
    relay.stop().await;
}

#[tokio::test]
async fn a_hung_target_delays_neither_other_targets_nor_wechat() {
    let g = generated();
    let slow = FakeTarget::start().await;
    slow.set_default(Behaviour::Hang);
    let fast = FakeTarget::start().await;
    let targets = [
        target("slow", &slow.url("/"), "concurrency = 1"),
        target("fast", &fast.url("/"), ""),
    ];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"slow\", \"fast\"]\n"),
        reference_now(&g),
    )
    .await;
    let ids = [
        "secure.CLICK",
        "secure.VIEW",
        "secure.LOCATION",
        "secure.text",
        "secure.image",
    ];
    for id in ids {
        assert_eq!(
            send(&relay, vector(&g, id), "secure").await.status,
            200,
            "{id}"
        );
    }
    assert!(
        fast.wait_for(ids.len(), WAIT).await,
        "fast got {} of {}",
        fast.count(),
        ids.len()
    );
    assert_eq!(slow.count(), 1, "one slot, held by the hung attempt");
    relay.stop().await;
}

#[tokio::test]
async fn when_a_down_target_answers_again_its_backed_off_deliveries_go_at_once() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.script([Behaviour::status(503)]);
    let targets = [target(
        "hooks",
        &hooks.url("/"),
        "retry_schedule = [\"60s\"]",
    )];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"),
        reference_now(&g),
    )
    .await;
    let first = vector(&g, "secure.CLICK");
    assert_eq!(send(&relay, first, "secure").await.status, 200);
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(
        relay.until_attempts("hooks", 1).await,
        "backing off for a minute"
    );
    // The clock does not move: only the next success can bring the first back.
    assert_eq!(
        send(&relay, vector(&g, "secure.VIEW"), "secure")
            .await
            .status,
        200
    );
    assert!(
        hooks.wait_for(3, WAIT).await,
        "the backed-off delivery followed the success"
    );
    assert_eq!(hooks.received()[2].body, body(&first["request"]));
    relay.stop().await;
}

/// A 2xx is the delivery, even when the body after it stalls past the
/// target's `timeout`: the target took the event, and sending it again
/// would give it twice.
#[tokio::test]
async fn a_2xx_whose_body_stalls_is_delivered_once() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::StallBody(200));
    let targets = [target("hooks", &hooks.url("/events"), "")];
    let relay = TestRelay::start(
        &config(&g, &targets, "[[routes]]\nto = [\"hooks\"]\n"),
        reference_now(&g),
    )
    .await;
    assert_eq!(
        send(&relay, vector(&g, "secure.text"), "secure")
            .await
            .status,
        200
    );
    assert!(relay.until_nothing_pending("hooks").await, "delivered");
    let m = relay.metrics().await;
    let outcome = |o| common::metric(&m, "wxrelay_deliveries_total", &[("outcome", o)]);
    assert_eq!(
        (outcome("delivered"), outcome("retried")),
        (1.0, 0.0),
        "{m}"
    );
    assert_eq!(hooks.count(), 1, "sent once");
    relay.stop().await;
}

/// The reply target's inline attempt needs the body for WeChat's answer: a
/// stalled one gives `success` (no reply in time), but the 2xx is still
/// the delivery, which the workers do not send again.
#[tokio::test]
async fn a_reply_targets_2xx_whose_body_stalls_answers_success_and_is_delivered() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::StallBody(200));
    let targets = [target("broker", &broker.url("/events"), "")];
    let relay = TestRelay::start(&config(&g, &targets, broker_routes()), reference_now(&g)).await;
    let answer = send(&relay, vector(&g, "secure.scan_str"), "secure").await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "success")
    );
    assert!(relay.until_nothing_pending("broker").await, "delivered");
    let m = relay.metrics().await;
    let reply = common::metric(&m, "wxrelay_replies_total", &[("outcome", "none")]);
    assert_eq!(reply, 1.0, "{m}");
    let outcome = |o| common::metric(&m, "wxrelay_deliveries_total", &[("outcome", o)]);
    assert_eq!(
        (outcome("delivered"), outcome("retried")),
        (1.0, 0.0),
        "{m}"
    );
    assert_eq!(broker.count(), 1, "sent once");
    relay.stop().await;
}

/// WeChat takes a text reply's `Content` up to 2,048 bytes: a reply far
/// beyond what WeChat takes (60,000 bytes of it in plaintext, 10,000 sealed
/// by the target, 70,000, more than the relay reads of an answer) is never
/// passed or sealed, but answered `success` and counted `unverifiable`.
#[tokio::test]
async fn a_reply_larger_than_wechat_takes_becomes_success() {
    let g = generated();
    let (broker, relay) = with_one_target(&g, "broker", "retry = \"login\"", broker_routes()).await;
    let c = &g["config"];
    let key = AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap();
    let with_content = |content: &str| reply_xml().replace("欢迎!", content);
    let longest = with_content(&"字".repeat(2_048 / 3));
    let huge = with_content(&"a".repeat(60_000));
    let huge_sealed = reply::envelope(
        &key,
        c["token"].as_str().unwrap(),
        c["appid"].as_str().unwrap(),
        &with_content(&"a".repeat(10_000)),
        "1717000001",
        "31337",
        &reply::random_bytes(),
    );
    // More than the relay reads of an answer at all.
    let unread = with_content(&"a".repeat(70_000));
    let cases = [
        ("secure.scan_str", &longest, false),
        ("secure.scan_id", &huge, true),
        ("secure.subscribe_qrscene_str", &huge_sealed, true),
        ("secure.subscribe_qrscene_id", &unread, true),
    ];
    for (id, body, refused) in cases {
        broker.script([Behaviour::body(200, "text/xml", body)]);
        let answer = send(&relay, vector(&g, id), "secure").await;
        assert_eq!(answer.status, 200, "{id}");
        assert_eq!(answer.text() == "success", refused, "{id}");
    }
    let m = relay.metrics().await;
    let replies =
        |outcome: &str| common::metric(&m, "wxrelay_replies_total", &[("outcome", outcome)]);
    assert_eq!(replies("unverifiable"), 3.0, "{m}");
    assert_eq!(replies("encrypted"), 1.0, "{m}");
    relay.stop().await;
}
