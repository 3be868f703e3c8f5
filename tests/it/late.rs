//! A reply target's answer after WeChat's five seconds still reaches the
//! user (`late_reply`): through the Customer Service API, or as the passive
//! reply to the user's next push; once, across WeChat's retries, restarts
//! (`kill -9`, the real binary) and replicas (two relays on PostgreSQL).
//! WeChat's API is a fake on a real socket ([`FakeWechatApi`]).

use crate::common;

use common::database::Database;
use common::replicas::Replicas;
use common::target::{Behaviour, FakeTarget};
use common::wechat_api::FakeWechatApi;
use common::{
    admin_request, eventually, generated, generated_config, metric, reference_now, try_send,
    TestRelay,
};
use http::Method;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wxrelay::wechat::crypto::{decrypt, AesKey};
use wxrelay::wechat::message::Message;
use wxrelay::wechat::push::{self, PushParams, Sealing};

const SECRET: &str = "app-secret-of-the-late-tests";
const ACCOUNT_ID: &str = "gh_3f1a2b9c8d7e";
const WAIT: Duration = Duration::from_secs(20);
const LATE: &str = "wxrelay_late_replies_total";

fn app_id(g: &Value) -> &str {
    g["config"]["appid"].as_str().unwrap()
}

/// The vectors' accounts, a `broker` that may think for 10 s, text messages
/// to the secure account answered by it with `late_reply = late`, and the
/// secure account's API at `api_base`.
fn late_config(g: &Value, broker: &str, api_base: &str, late: &str) -> String {
    format!(
        "[server]\nreply_budget = \"1s\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}\n{}",
        generated_config(g),
        late_sections(broker, api_base, late)
    )
}

/// The target, the route and the secure account's API.
fn late_sections(broker: &str, api_base: &str, late: &str) -> String {
    format!(
        "[targets.broker]\nurl = \"{broker}\"\ntimeout = \"10s\"\nretry = \"login\"\n\n\
         [[routes]]\nmatch = {{ account = \"secure\", msg_type = \"text\" }}\nto = [\"broker\"]\n\
         reply_from = \"broker\"\nlate_reply = \"{late}\"\n\n\
         [accounts.secure.api]\napp_secret = \"{SECRET}\"\napi_base = \"{api_base}\"\n"
    )
}

/// A text message from `openid` to the secure account, sealed and signed as
/// WeChat sends it at `now_secs`: the same path and body for each re-send.
fn text_from(g: &Value, now_secs: i64, openid: &str, msg_id: u64) -> (String, String) {
    let fields = format!(
        "<MsgType><![CDATA[text]]></MsgType><Content><![CDATA[question {msg_id}]]></Content><MsgId>{msg_id}</MsgId>"
    );
    push_from(g, (now_secs, openid, msg_id), &fields)
}

/// A push from `openid` with these `fields`, sealed and signed as WeChat
/// sends it at `now_secs`; `msg_id` tells one push's nonce from another's.
fn push_from(
    g: &Value,
    (now_secs, openid, msg_id): (i64, &str, u64),
    fields: &str,
) -> (String, String) {
    let xml = format!(
        "<xml><ToUserName><![CDATA[{ACCOUNT_ID}]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
         <CreateTime>{now_secs}</CreateTime>{fields}</xml>"
    );
    let key = aes(g);
    let nonce = format!("{msg_id}{}", openid.len());
    let push = push::build(
        &xml,
        Sealing::Secure(&key),
        &PushParams {
            token: g["config"]["token"].as_str().unwrap(),
            app_id: app_id(g),
            timestamp: now_secs,
            nonce: &nonce,
            openid: Some(openid),
            random: &[b'L'; 16],
        },
    );
    (format!("/wx/secure?{}", push.query), push.body)
}

fn aes(g: &Value) -> AesKey {
    AesKey::from_encoding(g["config"]["encoding_aes_key"].as_str().unwrap()).unwrap()
}

/// The broker's passive reply to `openid`.
fn reply_to(openid: &str, content: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{openid}]]></ToUserName><FromUserName><![CDATA[{ACCOUNT_ID}]]></FromUserName>\
         <CreateTime>1717000000</CreateTime><MsgType><![CDATA[text]]></MsgType>\
         <Content><![CDATA[{content}]]></Content></xml>"
    )
}

fn answers(body: &str) -> Behaviour {
    Behaviour::body(200, "text/xml", body)
}

fn late_count(metrics: &str, channel: &str, outcome: &str) -> f64 {
    let labels = [("channel", channel), ("outcome", outcome)];
    metric(metrics, LATE, &labels)
}

/// The acceptance case: a target that answers after 6 seconds. WeChat has
/// `success` within the budget; WeChat's three re-sends call the target no
/// second time; the user gets the text exactly once through `custom/send`,
/// after "typing…".
#[tokio::test]
async fn a_six_second_answer_reaches_the_user_once_through_customer_service() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    let answer = answers(&reply_to("o_late", "答案是 42"));
    broker.set_default(Behaviour::After(Duration::from_secs(6), Box::new(answer)));
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;

    let (path, body) = text_from(&g, reference_now(&g), "o_late", 1);
    let started = tokio::time::Instant::now();
    let first = relay.post(&path, body.clone()).await;
    assert_eq!(
        (first.status.as_u16(), first.text()),
        (200, "success".into())
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // WeChat, having no reply in time, sends the push again, three times.
    for _ in 0..3 {
        let again = relay.post(&path, body.clone()).await;
        assert_eq!(again.text(), "success");
    }
    assert!(
        eventually(WAIT, || async { !api.sent().is_empty() }).await,
        "{:?}",
        api.log()
    );
    let text = json!({"touser": "o_late", "msgtype": "text", "text": {"content": "答案是 42"}});
    assert_eq!(api.sent(), vec![text]);
    assert_eq!(
        api.typing(),
        vec![json!({"touser": "o_late", "command": "Typing"})]
    );
    // The inline attempt was the delivery: past its hold, nothing is sent again.
    relay.clock.advance_ms(60_000);
    assert!(relay.until_nothing_pending("broker").await);
    assert_eq!(broker.count(), 1, "the target thought once");
    let metrics = relay.metrics().await;
    assert_eq!(late_count(&metrics, "customer_service", "sent"), 1.0);
    assert_eq!(
        metric(&metrics, "wxrelay_late_reply_seconds_count", &[]),
        1.0
    );
    println!(
        "the fake WeChat API's calls, 6-second target: {:#?}",
        api.log()
    );
    relay.stop().await;
}

/// Without the Customer Service API: the late answer is the passive reply
/// to the user's next push, sealed as any reply; the push after that is
/// answered as usual.
#[tokio::test]
async fn a_late_answer_is_the_sealed_reply_to_the_users_next_push_only() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    broker.script([Behaviour::Gated(Box::new(answers(&reply_to(
        "o_next",
        "稍后的答案",
    ))))]);
    broker.set_default(Behaviour::status(200));
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "next_message");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let now = reference_now(&g);

    let (path, body) = text_from(&g, now, "o_next", 1);
    assert_eq!(relay.post(&path, body).await.text(), "success");
    // Past the budget, before the answer: no worker calls the target again.
    relay.clock.advance_ms(5_000);
    assert!(common::quiet(&relay, "broker").await);
    assert_eq!(broker.count(), 1);
    broker.release_hung();
    let stored = || async { late_count(&relay.metrics().await, "next_message", "stored") == 1.0 };
    assert!(eventually(WAIT, stored).await);

    let (path, body) = text_from(&g, now + 5, "o_next", 2);
    let next = relay.post(&path, body).await;
    let envelope = Message::parse(&next.body).expect("a sealed reply");
    let sealed = envelope
        .get("Encrypt")
        .expect("sealed for the secure account");
    let reply = Message::parse(decrypt(&aes(&g), sealed, app_id(&g)).unwrap().as_bytes()).unwrap();
    assert_eq!(reply.get("Content"), Some("稍后的答案"));
    assert_eq!(reply.get("ToUserName"), Some("o_next"));
    assert_eq!(reply.get("FromUserName"), Some(ACCOUNT_ID));

    let (path, body) = text_from(&g, now + 10, "o_next", 3);
    assert_eq!(
        relay.post(&path, body).await.text(),
        "success",
        "given once"
    );
    assert!(
        api.sent().is_empty() && api.log().is_empty(),
        "{:?}",
        api.log()
    );
    let metrics = relay.metrics().await;
    assert_eq!(late_count(&metrics, "next_message", "given"), 1.0);
    relay.stop().await;
}

/// Sends one late answer to `openid` through the relay, the broker held
/// until the push has its `success`.
async fn one_late_answer(relay: &TestRelay, g: &Value, broker: &FakeTarget, openid: &str) {
    let before = broker.count();
    broker.script([Behaviour::Gated(Box::new(answers(&reply_to(
        openid, "late",
    ))))]);
    let (path, body) = text_from(g, reference_now(g), openid, 7);
    assert_eq!(relay.post(&path, body).await.text(), "success");
    assert!(broker.wait_for(before + 1, WAIT).await);
    broker.release_hung();
}

#[tokio::test]
async fn a_refused_token_is_fetched_again_once_and_the_send_goes_through() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    api.fail_send_once(40001);
    let broker = FakeTarget::start().await;
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    broker.script([Behaviour::Gated(Box::new(answers(&reply_to(
        "o_token", "late",
    ))))]);
    let (path, body) = text_from(&g, reference_now(&g), "o_token", 7);
    assert_eq!(relay.post(&path, body).await.text(), "success");
    // "Typing…" fetched the first token; the send is refused with it.
    assert!(eventually(WAIT, || async { api.typing().len() == 1 }).await);
    broker.release_hung();
    assert!(
        eventually(WAIT, || async { api.sent().len() == 1 }).await,
        "{:?}",
        api.log()
    );
    assert_eq!(api.token_fetches(), 2, "{:?}", api.log());
    let refused = api
        .log()
        .iter()
        .filter(|l| l.ends_with("errcode 40001"))
        .count();
    assert_eq!(refused, 1, "{:?}", api.log());
    relay.stop().await;
}

#[tokio::test]
async fn a_send_outside_the_48_hour_window_is_a_dead_letter_with_its_errcode() {
    let g = generated();
    let (relay, toml) = refused_with(&g, 45015, "o_gone").await;
    // The operator sees it among the dead letters.
    let spool = format!("[spool]\npath = \"{}\"\n", relay.spool_path.display());
    std::fs::write(relay.config_path(), format!("{toml}\n{spool}")).unwrap();
    let dlq = |verb: &str, all: bool| {
        let mut args = vec!["dlq".into(), verb.into(), "--config".into()];
        args.push(relay.config_path().display().to_string());
        args.extend(all.then(|| "--all".to_owned()));
        common::wxrelay(args)
    };
    let (code, out) = dlq("list", false).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("45015") && out.contains("customer_service"),
        "{out}"
    );
    assert!(!out.contains("o_gone"), "the OpenID is hashed: {out}");
    // And purges it with the rest.
    let (code, out) = dlq("purge", true).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 late reply deleted"), "{out}");
    let late = relay.opened.late_replies();
    assert!(late.dead_late(10).await.unwrap().is_empty());
    relay.stop().await;
}

/// A relay whose late reply to `openid` WeChat refuses with `errcode`, once
/// it is a dead letter with that errcode after one attempt; and its config.
async fn refused_with(g: &Value, errcode: i64, openid: &str) -> (TestRelay, String) {
    let api = FakeWechatApi::start(app_id(g), SECRET).await;
    api.fail_sends(errcode);
    let broker = FakeTarget::start().await;
    let toml = late_config(g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(g)).await;
    one_late_answer(&relay, g, &broker, openid).await;
    let late = relay.opened.late_replies();
    let dead = || async { !late.dead_late(10).await.unwrap().is_empty() };
    assert!(eventually(WAIT, dead).await, "{:?}", api.log());
    let letters = late.dead_late(10).await.unwrap();
    assert_eq!((letters[0].errcode, letters[0].attempts), (errcode, 1));
    assert_eq!(letters[0].errmsg, format!("refused with {errcode}"));
    assert!(api.sent().is_empty());
    let metrics = relay.metrics().await;
    assert_eq!(
        late_count(&metrics, "customer_service", "dead_lettered"),
        1.0
    );
    (relay, toml)
}

/// An account without the Customer Service API (unverified): WeChat's 48001
/// is final, a dead letter that says so.
#[tokio::test]
async fn an_account_without_the_customer_service_api_is_a_dead_letter_with_48001() {
    let g = generated();
    let (relay, _) = refused_with(&g, 48001, "o_unverified").await;
    relay.stop().await;
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A real relay process's configuration on `spool`.
fn binary_config(
    (public, admin): (SocketAddr, SocketAddr),
    g: &Value,
    (broker, api_base): (&str, &str),
    spool: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\nreply_budget = \"1s\"\n\
         shutdown_timeout = \"3s\"\n\n[spool]\n{spool}\n{}\n{}",
        generated_config(g),
        late_sections(broker, api_base, "customer_service")
    )
}

async fn stored_by(admin: SocketAddr) -> f64 {
    let scrape = admin_request(admin, Method::GET, "/metrics", None).await;
    late_count(&scrape.text(), "customer_service", "stored")
}

async fn push_now(to: SocketAddr, g: &Value, openid: &str, msg_id: u64) {
    let (path, body) = text_from(g, now_secs(), openid, msg_id);
    let answer = try_send(to, Method::POST, &path, body.into())
        .await
        .unwrap();
    assert_eq!(
        (answer.status.as_u16(), answer.text()),
        (200, "success".into())
    );
}

/// `kill -9` after the target answered (the late reply is stored) and before
/// the send (WeChat's token endpoint holds its answer): the restarted relay
/// sends it, once.
#[tokio::test]
async fn a_late_reply_stored_before_a_kill_9_is_sent_once_after_the_restart() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    api.close_token_gate();
    let broker = FakeTarget::start().await;
    broker.script([Behaviour::Gated(Box::new(answers(&reply_to(
        "o_kill", "survives",
    ))))]);
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("path = \"{}\"\n", dir.path().join("spool.db").display());
    let (broker_url, base, g2) = (broker.url("/think"), api.base(), g.clone());
    let config =
        move |public, admin| binary_config((public, admin), &g2, (&broker_url, &base), &spool);
    let mut relays = Replicas::start(1, &[], Box::new(config)).await;
    push_now(relays.replica(0).public, &g, "o_kill", 1).await;
    assert!(broker.wait_for(1, WAIT).await);
    broker.release_hung();
    let admin = relays.replica(0).admin;
    assert!(eventually(WAIT, || async { stored_by(admin).await == 1.0 }).await);
    relays.kill(0);
    assert!(api.sent().is_empty(), "not sent before the kill");

    api.open_token_gate();
    relays.restart(0).await;
    assert!(
        eventually(WAIT, || async { !api.sent().is_empty() }).await,
        "{:?}",
        api.log()
    );
    let admin = relays.replica(0).admin;
    let settled = || async {
        let scrape = admin_request(admin, Method::GET, "/metrics", None).await;
        late_count(&scrape.text(), "customer_service", "sent") == 1.0
    };
    assert!(eventually(WAIT, settled).await);
    let text = json!({"touser": "o_kill", "msgtype": "text", "text": {"content": "survives"}});
    assert_eq!(api.sent(), vec![text], "once: {:?}", api.log());
}

/// Two replicas on one PostgreSQL spool: the token one fetched serves the other.
#[tokio::test]
async fn one_token_fetch_serves_two_replicas() {
    let Some(db) = Database::create() else { return };
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    let (broker_url, base, g2, spool) =
        (broker.url("/think"), api.base(), g.clone(), db.spool_toml());
    let config =
        move |public, admin| binary_config((public, admin), &g2, (&broker_url, &base), &spool);
    let relays = Replicas::start(2, &[], Box::new(config)).await;
    for (i, openid) in ["o_first", "o_second"].into_iter().enumerate() {
        broker.script([Behaviour::Gated(Box::new(answers(&reply_to(
            openid, "shared",
        ))))]);
        push_now(relays.replica(i).public, &g, openid, 10 + i as u64).await;
        assert!(broker.wait_for(i + 1, WAIT).await);
        // The "typing…" past the budget takes the token first: released
        // only then, the send never races it to a fetch of its own.
        let typed = || async { api.typing().len() == i + 1 };
        assert!(eventually(WAIT, typed).await, "{:?}", api.log());
        broker.release_hung();
        let sent = || async { api.sent().len() == i + 1 };
        assert!(eventually(WAIT, sent).await, "{:?}", api.log());
    }
    assert_eq!(api.token_fetches(), 1, "{:?}", api.log());
}

/// WeChat issues a token for the account's AppID and secret only: a wrong
/// secret is the operator's to fix, so the reply is kept and retried with
/// WeChat's errcode, and counted as refused (which alerts).
#[tokio::test]
async fn a_wrong_secret_gets_no_token_and_the_reply_waits_for_the_fix() {
    let g = generated();
    let logs = common::logs::logs();
    let api = FakeWechatApi::start(app_id(&g), "the-right-secret").await;
    let broker = FakeTarget::start().await;
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    one_late_answer(&relay, &g, &broker, "o_secret").await;
    let refused =
        || async { late_count(&relay.metrics().await, "customer_service", "refused") == 1.0 };
    assert!(eventually(WAIT, refused).await, "{:?}", api.log());
    let late = relay.opened.late_replies();
    assert!(late.dead_late(10).await.unwrap().is_empty(), "not final");
    assert_eq!(api.token_fetches(), 0);
    assert!(api.sent().is_empty());
    let logged = logs.text();
    assert!(logged.contains("late reply not sent"), "{logged}");
    assert!(!logged.contains(SECRET), "the secret is in no log line");
    assert!(!logged.contains("o_secret"), "the OpenID is hashed");
    relay.stop().await;
}

/// `kill -9` while the target is still thinking: the inline attempt dies
/// with the relay, its delivery comes due after the target's timeout, a
/// worker sends it again, and that answer reaches the user: never lost.
#[tokio::test]
async fn an_answer_a_restart_cut_short_is_asked_again_and_reaches_the_user() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    broker.script([Behaviour::Gated(Box::new(Behaviour::status(503)))]);
    broker.set_default(answers(&reply_to("o_cut", "asked again")));
    let dir = tempfile::tempdir().unwrap();
    let spool = format!("path = \"{}\"\n", dir.path().join("spool.db").display());
    let (broker_url, base, g2) = (broker.url("/think"), api.base(), g.clone());
    let config = move |public, admin| {
        binary_config((public, admin), &g2, (&broker_url, &base), &spool)
            .replace("timeout = \"10s\"", "timeout = \"2s\"")
    };
    let mut relays = Replicas::start(1, &[], Box::new(config)).await;
    push_now(relays.replica(0).public, &g, "o_cut", 1).await;
    assert!(broker.wait_for(1, WAIT).await);
    relays.kill(0);
    relays.restart(0).await;
    assert!(broker.wait_for(2, WAIT).await, "the worker asks again");
    assert!(
        eventually(WAIT, || async { !api.sent().is_empty() }).await,
        "{:?}",
        api.log()
    );
    let text = json!({"touser": "o_cut", "msgtype": "text", "text": {"content": "asked again"}});
    assert_eq!(api.sent(), vec![text]);
}

/// `token_source = "url"`: the token comes from the team's token service.
#[tokio::test]
async fn a_token_service_url_is_where_the_token_comes_from() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service").replace(
        &format!("app_secret = \"{SECRET}\"\n"),
        &format!(
            "token_source = \"url\"\ntoken_url = \"{}/token-service\"\n",
            api.base()
        ),
    );
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    one_late_answer(&relay, &g, &broker, "o_service").await;
    assert!(
        eventually(WAIT, || async { api.sent().len() == 1 }).await,
        "{:?}",
        api.log()
    );
    let log = api.log();
    assert!(
        log.iter().any(|l| l.starts_with("GET /token-service")),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.contains("stable_token")), "{log:?}");
    relay.stop().await;
}

/// A late answer the spool cannot store is not recorded as delivered: the
/// delivery is tried again, and that answer reaches the user. At least
/// once, never lost between the delivery's record and the late reply's.
#[tokio::test]
async fn a_late_answer_the_spool_could_not_store_is_asked_again_and_reaches_the_user() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    broker.set_default(answers(&reply_to("o_again", "stored at last")));
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    // The spool refuses late replies for a while: a full disk, a lock.
    let file = rusqlite::Connection::open(&relay.spool_path).unwrap();
    file.execute_batch(
        "CREATE TRIGGER refuse_late BEFORE INSERT ON late_replies \
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    one_late_answer(&relay, &g, &broker, "o_again").await;
    let lost = || async { late_count(&relay.metrics().await, "customer_service", "lost") == 1.0 };
    assert!(eventually(WAIT, lost).await);
    file.execute_batch("DROP TRIGGER refuse_late;").unwrap();

    relay.clock.advance_ms(60_000);
    assert!(
        broker.wait_for(2, WAIT).await,
        "the delivery is tried again"
    );
    assert!(
        eventually(WAIT, || async { !api.sent().is_empty() }).await,
        "{:?}",
        api.log()
    );
    let text =
        json!({"touser": "o_again", "msgtype": "text", "text": {"content": "stored at last"}});
    assert_eq!(api.sent(), vec![text]);
    relay.stop().await;
}

/// A relay on `next_message` that keeps one late reply for `openid`, with
/// the fake API and the target it needs running.
async fn kept_for_next_message(g: &Value, openid: &str) -> (TestRelay, FakeWechatApi, FakeTarget) {
    let api = FakeWechatApi::start(app_id(g), SECRET).await;
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::status(200));
    let toml = late_config(g, &broker.url("/think"), &api.base(), "next_message");
    let relay = TestRelay::start(&toml, reference_now(g)).await;
    one_late_answer(&relay, g, &broker, openid).await;
    let stored = || async { late_count(&relay.metrics().await, "next_message", "stored") == 1.0 };
    assert!(eventually(WAIT, stored).await);
    (relay, api, broker)
}

/// A kept late reply waits for a push whose passive reply the user sees: an
/// unfollow, a menu link, a location report or a template's receipt
/// (WeChat shows no reply to those) leaves it for the user's next message.
#[tokio::test]
async fn a_kept_late_reply_waits_for_a_push_the_user_sees_the_answer_to() {
    let g = generated();
    let (relay, _api, _broker) = kept_for_next_message(&g, "o_unseen").await;

    let now = reference_now(&g);
    let unseen = [
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[unsubscribe]]></Event><EventKey><![CDATA[]]></EventKey>",
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[VIEW]]></Event><EventKey><![CDATA[https://example.com/]]></EventKey>",
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[LOCATION]]></Event><Latitude>23.1</Latitude><Longitude>113.3</Longitude><Precision>65</Precision>",
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[TEMPLATESENDJOBFINISH]]></Event><MsgID>200163836</MsgID><Status><![CDATA[success]]></Status>",
    ];
    for (i, fields) in unseen.into_iter().enumerate() {
        let (path, body) = push_from(&g, (now + 1 + i as i64, "o_unseen", 20 + i as u64), fields);
        let answer = relay.post(&path, body).await;
        assert_eq!(
            (answer.status.as_u16(), answer.text()),
            (200, "success".into()),
            "{fields}"
        );
    }
    let (path, body) = text_from(&g, now + 10, "o_unseen", 30);
    let next = relay.post(&path, body).await;
    let envelope = Message::parse(&next.body).expect("a sealed reply");
    let sealed = envelope.get("Encrypt").expect("sealed");
    let reply = Message::parse(decrypt(&aes(&g), sealed, app_id(&g)).unwrap().as_bytes()).unwrap();
    assert_eq!(reply.get("Content"), Some("late"));
    let metrics = relay.metrics().await;
    assert_eq!(late_count(&metrics, "next_message", "given"), 1.0);
    relay.stop().await;
}

/// Whether the exposition has the late-reply series of the secure account
/// for `channel` and `outcome`, at any value.
fn late_series_shown(metrics: &str, channel: &str, outcome: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with(&format!("{LATE}{{"))
            && l.contains("account=\"secure\"")
            && l.contains(&format!("channel=\"{channel}\""))
            && l.contains(&format!("outcome=\"{outcome}\""))
    })
}

/// The failures the alert counts are shown at 0 before the first one, from
/// the start and after a reload: `increase()` sees the first failure only
/// on a series that existed before it.
#[tokio::test]
async fn late_reply_failures_are_shown_at_zero_before_the_first() {
    let g = generated();
    let api = FakeWechatApi::start(app_id(&g), SECRET).await;
    let broker = FakeTarget::start().await;
    let toml = late_config(&g, &broker.url("/think"), &api.base(), "customer_service");
    let relay = TestRelay::start(&toml, reference_now(&g)).await;
    let metrics = relay.metrics().await;
    for outcome in ["refused", "dead_lettered", "lost"] {
        assert!(
            late_series_shown(&metrics, "customer_service", outcome),
            "{outcome}"
        );
    }
    assert_eq!(
        late_count(&metrics, "customer_service", "dead_lettered"),
        0.0
    );
    assert!(!late_series_shown(&metrics, "next_message", "lost"));

    let reloaded = late_config(&g, &broker.url("/think"), &api.base(), "next_message");
    std::fs::write(relay.config_path(), reloaded).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let metrics = relay.metrics().await;
    assert!(late_series_shown(&metrics, "next_message", "lost"));
    relay.stop().await;
}

/// A kept reply that no longer reads back (a damaged row) is taken all the
/// same, and counted lost, which alerts: the user's push is answered as
/// usual.
#[tokio::test]
async fn a_kept_reply_that_does_not_read_back_is_counted_lost() {
    let g = generated();
    let (relay, _api, _broker) = kept_for_next_message(&g, "o_damaged").await;
    let file = rusqlite::Connection::open(&relay.spool_path).unwrap();
    let damaged = file
        .execute("UPDATE late_replies SET message = 'not a message'", [])
        .unwrap();
    assert_eq!(damaged, 1);

    let (path, body) = text_from(&g, reference_now(&g) + 5, "o_damaged", 40);
    assert_eq!(relay.post(&path, body).await.text(), "success");
    let metrics = relay.metrics().await;
    assert_eq!(late_count(&metrics, "next_message", "lost"), 1.0);
    assert_eq!(late_count(&metrics, "next_message", "given"), 0.0);
    relay.stop().await;
}

/// Dead late replies are kept a week for the operator, then pruned: the
/// spool does not grow with them.
#[tokio::test]
async fn a_dead_late_reply_is_pruned_after_a_week() {
    let g = generated();
    // A dead letter, listed (the relay prunes from its start on).
    let (relay, _) = refused_with(&g, 45015, "o_pruned").await;
    let late = relay.opened.late_replies();
    relay.clock.advance_ms(8 * 24 * 3_600_000);
    let pruned = || async { late.dead_late(10).await.unwrap().is_empty() };
    assert!(eventually(WAIT, pruned).await);
    relay.stop().await;
}
