//! `format = "wechat"`: each target is sent the push WeChat would send a
//! server holding the target's own credentials, and nothing that verifies
//! under the account's; a reply target's answer is opened with the target's
//! credentials and sealed again with the account's. The broker adapters, the
//! login funnel's metrics, and `wxrelay target check`.

use crate::common;

use common::target::{Behaviour, FakeTarget, Received};
use common::{config, generated, metric, reference_now, target, TestRelay};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wxrelay::cli::simulate::{message_xml, MessageOptions, PushKind};
use wxrelay::clock::Clock;
use wxrelay::config::Settings;
use wxrelay::wechat::crypto::{decrypt, AesKey, KeyRing};
use wxrelay::wechat::message::Message;
use wxrelay::wechat::reply::{self, envelope, random_bytes};
use wxrelay::wechat::signature::{sign, verify};

const WAIT: Duration = Duration::from_secs(20);
const MODES: [&str; 3] = ["plaintext", "compat", "secure"];
/// The broker's own credentials, which WeChat never sees.
const TARGET_TOKEN: &str = "brokerOwnToken2026";
const TARGET_KEY: &str = "TargetKeyTargetKeyTargetKeyTargetKeyTarget1";
const SENDER: &str = "oWechatFormatSender000000000";

/// The keys of a `wechat` target in `mode` with the broker's credentials.
fn wechat_keys(mode: &str) -> String {
    format!(
        "format = \"wechat\"\nmode = \"{mode}\"\ntoken = \"{TARGET_TOKEN}\"\nencoding_aes_key = \"{TARGET_KEY}\"\n"
    )
}

fn target_key() -> AesKey {
    AesKey::from_encoding(TARGET_KEY).unwrap()
}

struct Account {
    token: String,
    key: AesKey,
    app_id: String,
}

fn account(g: &Value) -> Account {
    let c = &g["config"];
    Account {
        token: c["token"].as_str().unwrap().to_owned(),
        key: AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap(),
        app_id: c["appid"].as_str().unwrap().to_owned(),
    }
}

/// The message XML of `kind`, from [`SENDER`], created `now`.
fn xml(kind: &PushKind, now: i64, msg_id: u64) -> String {
    let opts = MessageOptions {
        to: "gh_3f1a2b9c8d7e".to_owned(),
        from: SENDER.to_owned(),
    };
    message_xml(kind, &opts, now, msg_id)
}

fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(&format!("{name}=")))
}

/// Whether `query`'s `signature` verifies with `token`.
fn signed_with(query: &str, token: &str) -> bool {
    let (Some(sig), Some(ts), Some(nonce)) = (
        param(query, "signature"),
        param(query, "timestamp"),
        param(query, "nonce"),
    ) else {
        return false;
    };
    verify(sig, &[token, ts, nonce])
}

/// The delivery's message, opened as a server holding `token` and `key`
/// would: `None` when its signatures or its frame do not hold for them.
fn open_delivery(r: &Received, token: &str, key: &AesKey, app_id: &str) -> Option<String> {
    let query = r.query();
    if !signed_with(query, token) {
        return None;
    }
    if param(query, "encrypt_type") != Some("aes") {
        return Some(r.text());
    }
    let outer = Message::parse(&r.body).ok()?;
    let encrypted = outer.get("Encrypt")?;
    let parts = [
        token,
        param(query, "timestamp")?,
        param(query, "nonce")?,
        encrypted,
    ];
    if !verify(param(query, "msg_signature")?, &parts) {
        return None;
    }
    decrypt(key, encrypted, app_id).ok()
}

#[tokio::test]
async fn a_wechat_target_gets_every_push_under_its_own_credentials_and_never_the_accounts() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets: Vec<String> = MODES
        .iter()
        .map(|mode| {
            let url = broker.url(&format!("/{mode}?tenant=7"));
            target(&format!("w_{mode}"), &url, &wechat_keys(mode))
        })
        .collect();
    let routes = "[[routes]]\nto = [\"w_plaintext\", \"w_compat\", \"w_secure\"]\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let mut sent = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        let content = format!("from a {mode} account: 你好 😀𝄞");
        let xml = xml(
            &PushKind::Text { content },
            reference_now(&g),
            100 + i as u64,
        );
        let (query, _) = common::push_as_wechat(&relay, &g, mode, &xml, SENDER).await;
        // The account's own request holds nothing the target's Token signs.
        assert!(signed_with(&query, &a.token) && !signed_with(&query, TARGET_TOKEN));
        sent.push(xml);
    }
    assert!(broker.wait_for(9, WAIT).await, "got {}", broker.count());

    for r in broker.received() {
        let mode = r.uri.split(['/', '?']).nth(1).unwrap().to_owned();
        let query = r.query().to_owned();
        assert_eq!(param(&query, "tenant"), Some("7"), "{query}");
        assert_eq!(param(&query, "openid"), Some(SENDER), "{query}");
        let now = relay.clock.now_secs().to_string();
        assert_eq!(param(&query, "timestamp"), Some(now.as_str()));
        let opened = open_delivery(&r, TARGET_TOKEN, &target_key(), &a.app_id)
            .unwrap_or_else(|| panic!("{mode}: does not open with the target's credentials"));
        assert!(sent.contains(&opened), "{mode}: {opened}");
        // Nothing verifies or decrypts under the account's credentials.
        assert!(!signed_with(&query, &a.token), "{mode}: {query}");
        assert_eq!(open_delivery(&r, &a.token, &a.key, &a.app_id), None);
        let encrypted = mode != "plaintext";
        assert_eq!(param(&query, "encrypt_type") == Some("aes"), encrypted);
        if encrypted {
            let outer = Message::parse(&r.body).unwrap();
            let frame = outer.get("Encrypt").unwrap();
            assert!(decrypt(&a.key, frame, &a.app_id).is_err(), "{mode}");
            assert_eq!(outer.get("Content").is_some(), mode == "compat");
        }
    }
    relay.stop().await;
}

/// A text reply to the sender, as a broker composes it.
fn reply_xml(content: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{SENDER}]]></ToUserName><FromUserName><![CDATA[gh_3f1a2b9c8d7e]]></FromUserName>\
         <CreateTime>1717000001</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[{content}]]></Content></xml>"
    )
}

#[tokio::test]
async fn a_wechat_targets_reply_is_opened_with_its_credentials_and_sealed_with_the_accounts() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets = [
        target("w_secure", &broker.url("/secure"), &wechat_keys("secure")),
        target(
            "w_plain",
            &broker.url("/plaintext"),
            &wechat_keys("plaintext"),
        ),
    ];
    let routes = "[[routes]]\nmatch = { account = \"secure\" }\nto = [\"w_secure\"]\nreply_from = \"w_secure\"\n\n\
                  [[routes]]\nto = [\"w_plain\"]\nreply_from = \"w_plain\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let seal = |token: &str, key: &AesKey, content: &str| {
        let xml = reply_xml(content);
        envelope(
            key,
            token,
            &a.app_id,
            &xml,
            "1717000001",
            "77",
            &random_bytes(),
        )
    };
    let answers = [
        // Sealed with the target's own credentials: re-sealed for WeChat.
        seal(TARGET_TOKEN, &target_key(), "sealed by the broker"),
        // Sealed with the account's: the broker must not hold them.
        seal(&a.token, &a.key, "sealed with the account's key"),
        // Plaintext from a server in secure mode: WeChat would refuse it.
        reply_xml("plaintext from a secure server"),
    ];
    broker.script(
        answers
            .iter()
            .map(|body| Behaviour::body(200, "text/xml", body)),
    );
    let scan = |i: u64| {
        xml(
            &PushKind::Scan {
                scene: format!("s{i}"),
            },
            reference_now(&g),
            i,
        )
    };
    let open_answer = |answer: &common::Answer| {
        let ring = KeyRing {
            current: a.key.clone(),
            previous: None,
        };
        reply::open_envelope(Some(&ring), &a.token, &a.app_id, &answer.body).map(|(x, _)| x)
    };

    let (_, first) = common::push_as_wechat(&relay, &g, "secure", &scan(1), SENDER).await;
    assert_eq!(
        open_answer(&first).unwrap(),
        reply_xml("sealed by the broker")
    );
    let (_, second) = common::push_as_wechat(&relay, &g, "secure", &scan(2), SENDER).await;
    assert_eq!(second.text(), "success");
    let (_, third) = common::push_as_wechat(&relay, &g, "secure", &scan(3), SENDER).await;
    assert_eq!(third.text(), "success");

    // A plaintext-mode server's plaintext reply, to a secure account: sealed.
    let plain_answer = reply_xml("plaintext from a plaintext server");
    broker.script([Behaviour::body(200, "text/xml", &plain_answer)]);
    let (_, fourth) = common::push_as_wechat(&relay, &g, "rotating", &scan(4), SENDER).await;
    assert_eq!(open_answer(&fourth).unwrap(), plain_answer);

    let m = relay.metrics().await;
    let replies = |account, outcome| {
        metric(
            &m,
            "wxrelay_replies_total",
            &[("account", account), ("outcome", outcome)],
        )
    };
    assert_eq!(replies("secure", "encrypted"), 1.0, "{m}");
    assert_eq!(replies("secure", "unverifiable"), 2.0, "{m}");
    assert_eq!(replies("rotating", "encrypted"), 1.0, "{m}");
    relay.stop().await;
}

/// Whoever sees a push's query and the relay's answer to it (WeChat allows
/// plain HTTP on port 80) and can make a reply target answer what it likes
/// must not get a push out of the two: an envelope the relay seals for the
/// account is signed with the account's Token, so it must not be dated and
/// salted with the very timestamp and nonce the push's `signature` covers.
#[tokio::test]
async fn an_answer_the_relay_seals_cannot_be_replayed_as_a_push() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets = [target(
        "w_secure",
        &broker.url("/secure"),
        &wechat_keys("secure"),
    )];
    let routes = "[[routes]]\nto = [\"w_secure\"]\nreply_from = \"w_secure\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let chosen = reply_xml("chosen by whoever runs the broker");
    let sealed = envelope(
        &target_key(),
        TARGET_TOKEN,
        &a.app_id,
        &chosen,
        "1717000001",
        "77",
        &random_bytes(),
    );
    broker.script([Behaviour::body(200, "text/xml", &sealed)]);
    let scan = PushKind::Scan {
        scene: "s1".to_owned(),
    };
    let push = xml(&scan, reference_now(&g), 1);
    let (query, answer) = common::push_as_wechat(&relay, &g, "secure", &push, SENDER).await;
    let ring = KeyRing {
        current: a.key.clone(),
        previous: None,
    };
    let opened = reply::open_envelope(Some(&ring), &a.token, &a.app_id, &answer.body);
    assert_eq!(opened.map(|(xml, _)| xml), Ok(chosen));
    assert!(broker.wait_for(1, WAIT).await);

    let envelope = Message::parse(&answer.body).unwrap();
    let field = |name| envelope.get(name).unwrap();
    let body = format!(
        "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\
         <Encrypt><![CDATA[{}]]></Encrypt></xml>",
        field("Encrypt")
    );
    let signature = param(&query, "signature").unwrap();
    let dated = [
        (
            param(&query, "timestamp").unwrap(),
            param(&query, "nonce").unwrap(),
        ),
        (field("TimeStamp"), field("Nonce")),
    ];
    for (timestamp, nonce) in dated {
        let forged = format!(
            "/wx/secure?signature={signature}&timestamp={timestamp}&nonce={nonce}\
             &encrypt_type=aes&msg_signature={}",
            field("MsgSignature")
        );
        let refused = relay.post(&forged, body.clone()).await;
        assert!(
            refused.status.is_client_error(),
            "{}: {}",
            refused.status,
            refused.text()
        );
    }
    assert_eq!(broker.count(), 1);
    relay.stop().await;
}

/// What a `wechat` target's answer may have the relay seal with the
/// account's key: a passive reply to the push it answers, nothing else.
#[tokio::test]
async fn a_wechat_target_gets_only_a_passive_reply_to_the_push_sealed_for_the_account() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets = [target(
        "w_compat",
        &broker.url("/compat"),
        &wechat_keys("compat"),
    )];
    let routes = "[[routes]]\nto = [\"w_compat\"]\nreply_from = \"w_compat\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    // Each envelope salted anew, as a server does: a stamp used twice is a replay.
    let seal = |xml: &str| {
        envelope(
            &target_key(),
            TARGET_TOKEN,
            &a.app_id,
            xml,
            "1717000001",
            &wxrelay::wechat::push::digits(9),
            &random_bytes(),
        )
    };
    // A login event, as a push would carry it.
    let event = xml(
        &PushKind::Scan {
            scene: "someone_elses_login".to_owned(),
        },
        reference_now(&g),
        9,
    );
    let elsewhere = reply_xml("to another follower").replace(SENDER, "oAnotherFollower00000000000");
    let refused = [
        seal(&event),
        seal(&elsewhere),
        event.clone(),
        elsewhere.clone(),
    ];
    let fine = [seal(&reply_xml("sealed")), reply_xml("plain")];
    broker.script(
        refused
            .iter()
            .chain(&fine)
            .map(|body| Behaviour::body(200, "text/xml", body)),
    );
    let ring = KeyRing {
        current: a.key.clone(),
        previous: None,
    };
    for i in 0..refused.len() + fine.len() {
        let scan = PushKind::Scan {
            scene: format!("s{i}"),
        };
        let push = xml(&scan, reference_now(&g), 100 + i as u64);
        let (_, answer) = common::push_as_wechat(&relay, &g, "secure", &push, SENDER).await;
        let opened = reply::open_envelope(Some(&ring), &a.token, &a.app_id, &answer.body);
        if i < refused.len() {
            assert_eq!(answer.text(), "success", "answer {i}");
        } else {
            assert!(opened.is_ok(), "answer {i}: {}", answer.text());
        }
    }
    let m = relay.metrics().await;
    let replies = |outcome| {
        metric(
            &m,
            "wxrelay_replies_total",
            &[("account", "secure"), ("outcome", outcome)],
        )
    };
    assert_eq!(replies("unverifiable"), 4.0, "{m}");
    assert_eq!(replies("encrypted"), 2.0, "{m}");
    relay.stop().await;
}

/// The scenes a broker has QR codes out for.
const PENDING_SCENE: &str = "login_42";

/// Logins a fake broker completed, by the path it serves.
type Logins = Arc<Mutex<BTreeSet<(String, String)>>>;

/// Answers like the brokers the adapters are for: `/casdoor*` looks the
/// EventKey up as it is (any Event); `/keycloak*` handles only `SCAN`.
fn brokers(broker: &FakeTarget) -> Logins {
    let logins: Logins = Arc::default();
    let seen = logins.clone();
    broker.respond_with(move |r| {
        let path = r.uri.split('?').next().unwrap_or("").to_owned();
        let xml = if path.starts_with("/keycloak") {
            open_delivery(r, TARGET_TOKEN, &target_key(), "wx5f3c9a1e7d2b4c60")?
        } else {
            r.text()
        };
        let m = Message::parse(xml.as_bytes()).ok()?;
        let handled = !path.starts_with("/keycloak") || m.event() == Some("SCAN");
        if handled && m.event_key() == Some(PENDING_SCENE) {
            seen.lock()
                .unwrap()
                .insert((path, PENDING_SCENE.to_owned()));
        }
        None
    });
    logins
}

#[tokio::test]
async fn adapters_let_scene_lookups_and_scan_only_handlers_log_a_first_time_follower_in() {
    let g = generated();
    let broker = FakeTarget::start().await;
    let logins = brokers(&broker);
    let keycloak = format!(
        "{}subscribe_as_scan = true\ncontent_type = \"application/xml\"\n",
        wechat_keys("plaintext")
    );
    let targets = [
        target(
            "casdoor_bare",
            &broker.url("/casdoor_bare"),
            "format = \"plain\"\n",
        ),
        target(
            "casdoor",
            &broker.url("/casdoor"),
            "format = \"plain\"\nevent_key = \"strip_qrscene\"\n",
        ),
        target(
            "keycloak_bare",
            &broker.url("/keycloak_bare"),
            &wechat_keys("plaintext"),
        ),
        target("keycloak", &broker.url("/keycloak"), &keycloak),
    ];
    let routes =
        "[[routes]]\nto = [\"casdoor_bare\", \"casdoor\", \"keycloak_bare\", \"keycloak\"]\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let follow = PushKind::Subscribe {
        scene: Some(PENDING_SCENE.to_owned()),
    };
    common::push_as_wechat(
        &relay,
        &g,
        "secure",
        &xml(&follow, reference_now(&g), 1),
        SENDER,
    )
    .await;
    assert!(broker.wait_for(4, WAIT).await, "got {}", broker.count());

    let logged_in: Vec<String> = logins
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(logged_in, ["/casdoor", "/keycloak"]);
    let received = broker.received();
    let at = |path: &str| {
        received
            .iter()
            .find(|r| r.uri.starts_with(path) && r.uri[path.len()..].starts_with('?'))
            .unwrap()
            .clone()
    };
    let content_type = |r: &Received| r.headers["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type(&at("/keycloak")), "application/xml");
    assert_eq!(content_type(&at("/keycloak_bare")), "text/xml");
    // The rest of the event is as WeChat sent it.
    let casdoor = Message::parse(&at("/casdoor").body).unwrap();
    assert_eq!(casdoor.event(), Some("subscribe"));
    assert_eq!(casdoor.from_user(), Some(SENDER));
    assert!(casdoor.ticket().is_some_and(|t| !t.is_empty()));
    relay.stop().await;
}

#[test]
fn check_refuses_adapters_where_they_would_break_the_body_and_shows_them_elsewhere() {
    let g = generated();
    for (key, value) in [
        ("event_key", "\"strip_qrscene\""),
        ("subscribe_as_scan", "true"),
        ("content_type", "\"application/xml\""),
    ] {
        let raw = target("b", "http://127.0.0.1:1/", &format!("{key} = {value}\n"));
        let toml = config(&g, &[raw], "[[routes]]\nto = [\"b\"]\n");
        let err = Settings::from_toml_str(&toml).unwrap_err().to_string();
        let expected = format!("targets.b.{key}: cannot be used with format = \"raw\"");
        assert!(err.contains(&expected), "{err}");
        assert!(
            err.contains("use format = \"plain\" or \"wechat\""),
            "{err}"
        );
    }
    let json = target(
        "b",
        "http://127.0.0.1:1/",
        "format = \"json\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevent_key = \"strip_qrscene\"\n",
    );
    let toml = config(&g, &[json], "[[routes]]\nto = [\"b\"]\n");
    let err = Settings::from_toml_str(&toml).unwrap_err().to_string();
    assert!(
        err.contains("targets.b.event_key: cannot be used with format = \"json\""),
        "{err}"
    );

    let keys = format!(
        "{}event_key = \"strip_qrscene\"\nsubscribe_as_scan = true\n",
        wechat_keys("secure")
    );
    let toml = config(
        &g,
        &[target("b", "http://127.0.0.1:1/", &keys)],
        "[[routes]]\nto = [\"b\"]\n",
    );
    let report = wxrelay::config::render_check(&Settings::from_toml_str(&toml).unwrap());
    assert!(
        report.contains("adapters          event_key = strip_qrscene, subscribe_as_scan"),
        "{report}"
    );
    assert!(
        !report.contains(TARGET_TOKEN) && !report.contains(TARGET_KEY),
        "{report}"
    );
    assert!(report.contains(&target_key().fingerprint()), "{report}");
}

#[test]
fn a_wechat_target_needs_its_credentials_and_other_formats_refuse_them() {
    let g = generated();
    let check = |extra: &str| {
        let toml = config(
            &g,
            &[target("b", "http://127.0.0.1:1/", extra)],
            "[[routes]]\nto = [\"b\"]\n",
        );
        Settings::from_toml_str(&toml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let err = check("format = \"wechat\"\n");
    assert!(err.contains("targets.b.token: required"), "{err}");
    assert!(err.contains("targets.b.mode: required"), "{err}");
    let err = check("format = \"wechat\"\nmode = \"secure\"\ntoken = \"abc123\"\n");
    assert!(
        err.contains("targets.b.encoding_aes_key: required when mode is secure"),
        "{err}"
    );
    let err = check(&format!("{}app_id = \"wx123\"\n", wechat_keys("secure")));
    assert!(
        err.contains("targets.b.app_id: must be \"wx\" followed by 16 hex digits"),
        "{err}"
    );
    let err = check(&format!("token = \"{TARGET_TOKEN}\"\n"));
    assert!(
        err.contains("targets.b.token: is only used with format = \"wechat\", not \"raw\""),
        "{err}"
    );
    // Secrets come from a file as an account's do.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TARGET_TOKEN}\n")).unwrap();
    let from_file = format!(
        "format = \"wechat\"\nmode = \"plaintext\"\ntoken_file = {:?}\n",
        file.to_str().unwrap()
    );
    let toml = config(
        &g,
        &[target("b", "http://127.0.0.1:1/", &from_file)],
        "[[routes]]\nto = [\"b\"]\n",
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let server = settings.targets["b"].wechat.as_ref().unwrap();
    assert_eq!(server.token.expose(), TARGET_TOKEN);
    assert_eq!(format!("{:?}", server.token), "***");
    // The account's own Token on a target defeats the purpose: a warning.
    let shared = "format = \"wechat\"\nmode = \"plaintext\"\ntoken = \"Relay2024Token\"\n";
    let toml = config(
        &g,
        &[target("b", "http://127.0.0.1:1/", shared)],
        "[[routes]]\nto = [\"b\"]\n",
    );
    let warnings = Settings::from_toml_str(&toml)
        .unwrap()
        .warnings()
        .join("\n");
    assert!(warnings.contains("target \"b\" uses account"), "{warnings}");
}

#[tokio::test]
async fn the_login_funnel_counts_each_kind_and_times_every_delivery_to_the_brokers_2xx() {
    let g = generated();
    let broker = FakeTarget::start().await;
    let crm = FakeTarget::start().await;
    // The broker answers after 300 ms, on the wall clock and the relay's.
    let clock = Arc::new(Mutex::new(None::<Arc<wxrelay::clock::FixedClock>>));
    let relay_clock = clock.clone();
    broker.respond_with(move |_| {
        if let Some(c) = relay_clock.lock().unwrap().as_ref() {
            c.advance_ms(300);
        }
        Some(Behaviour::After(
            Duration::from_millis(300),
            Box::new(Behaviour::status(200)),
        ))
    });
    let targets = [
        target("broker", &broker.url("/events"), &wechat_keys("secure")),
        target("crm", &crm.url("/hooks"), ""),
    ];
    let routes = "[[routes]]\nmatch = { event = [\"subscribe\", \"SCAN\"] }\nto = [\"broker\", \"crm\"]\nreply_from = \"broker\"\n\n\
                  [[routes]]\nto = [\"crm\"]\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    *clock.lock().unwrap() = Some(relay.clock.clone());
    let now = reference_now(&g);
    let pushes = [
        PushKind::Subscribe {
            scene: Some("a".into()),
        },
        PushKind::Subscribe {
            scene: Some("b".into()),
        },
        PushKind::Subscribe { scene: None },
        PushKind::Scan { scene: "c".into() },
        PushKind::Scan { scene: "d".into() },
        PushKind::Scan { scene: "e".into() },
        PushKind::Text {
            content: "not a login".into(),
        },
    ];
    for (i, kind) in pushes.iter().enumerate() {
        let (_, answer) =
            common::push_as_wechat(&relay, &g, "secure", &xml(kind, now, i as u64), SENDER).await;
        assert_eq!(answer.text(), "success");
    }
    // WeChat's retry of the first push is a duplicate, not a second login.
    common::push_as_wechat(&relay, &g, "secure", &xml(&pushes[0], now, 0), SENDER).await;
    assert!(relay.until_nothing_pending("broker").await);
    assert!(relay.until_nothing_pending("crm").await);

    let m = relay.metrics().await;
    let logins = |event| {
        metric(
            &m,
            "wxrelay_login_events_total",
            &[("account", "secure"), ("event", event)],
        )
    };
    assert_eq!(logins("subscribe_scene"), 2.0, "{m}");
    assert_eq!(logins("subscribe_plain"), 1.0, "{m}");
    assert_eq!(logins("scan"), 3.0, "{m}");
    let seconds = |name: &str, target: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("target", target)];
        labels.extend_from_slice(extra);
        metric(
            &m,
            &format!("wxrelay_login_delivery_seconds_{name}"),
            &labels,
        )
    };
    assert_eq!(broker.count(), 6);
    assert_eq!(
        seconds("count", "broker", &[]),
        broker.count() as f64,
        "{m}"
    );
    // Every one took the broker's 300 ms, none more than a second.
    assert_eq!(seconds("bucket", "broker", &[("le", "0.2")]), 0.0, "{m}");
    assert_eq!(seconds("bucket", "broker", &[("le", "1")]), 6.0, "{m}");
    assert!(seconds("sum", "broker", &[]) >= 6.0 * 0.3, "{m}");
    // The worker's deliveries of login events count too; the text does not.
    assert_eq!(crm.count(), 7);
    assert_eq!(seconds("count", "crm", &[]), 6.0, "{m}");
    relay.stop().await;
}

#[tokio::test]
async fn target_check_says_whether_the_broker_holds_the_targets_token() {
    let g = generated();
    let broker = FakeTarget::start().await;
    // A WeChat server's URL check, holding the target's Token.
    broker.respond_with(|r| {
        let echostr = param(r.query(), "echostr")?.to_owned();
        Some(if signed_with(r.query(), TARGET_TOKEN) {
            Behaviour::body(200, "text/plain", &echostr)
        } else {
            Behaviour::status(401)
        })
    });
    let other = wechat_keys("secure").replace(TARGET_TOKEN, "someOtherToken");
    let targets = [
        target("good", &broker.url("/wx?tenant=1"), &wechat_keys("secure")),
        target("stale", &broker.url("/wx"), &other),
        target("raw", &broker.url("/wx"), ""),
    ];
    let toml = config(
        &g,
        &targets,
        "[[routes]]\nto = [\"good\", \"stale\", \"raw\"]\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).unwrap();
    let run = |name: &str| {
        let args = ["target", "check", "--config", file.to_str().unwrap(), name];
        common::wxrelay(args.iter().map(|s| s.to_string()).collect())
    };
    let (code, text) = run("good").await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("echostr echoed"), "{text}");
    assert!(broker.received()[0]
        .uri
        .starts_with("/wx?tenant=1&signature="));
    let (code, text) = run("stale").await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("echostr NOT echoed"), "{text}");
    let (code, text) = run("raw").await;
    assert_eq!(code, Some(64), "{text}");
    assert!(text.contains("only a format = \"wechat\" target"), "{text}");
    assert_eq!(broker.count(), 2);
    // What the check signed is the Token the deliveries are signed with.
    let first = broker.received()[0].query().to_owned();
    let (ts, nonce) = (
        param(&first, "timestamp").unwrap(),
        param(&first, "nonce").unwrap(),
    );
    assert_eq!(
        param(&first, "signature").unwrap(),
        sign(&[TARGET_TOKEN, ts, nonce])
    );
}

/// `target check` prints what it sent and what came back, but not the
/// password of the target's URL, and no control characters of the broker's
/// answer that a terminal would act on.
#[tokio::test]
async fn target_check_prints_no_url_password_and_no_terminal_controls() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.respond_with(|_| {
        Some(Behaviour::body(
            200,
            "text/plain",
            "\u{1b}]0;retitled\u{7}\u{1b}[2Jnot the echostr",
        ))
    });
    let url = broker.url("/wx").replace("://", "://relay:UrlPassw0rd@");
    let targets = [target("w", &url, &wechat_keys("plaintext"))];
    let toml = config(&g, &targets, "[[routes]]\nto = [\"w\"]\n");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).unwrap();
    let args = ["target", "check", "--config", file.to_str().unwrap(), "w"];
    let (code, text) = common::wxrelay(args.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(broker.count(), 1);
    assert!(text.contains("not the echostr"), "{text}");
    assert!(!text.contains("UrlPassw0rd"), "{text}");
    assert!(text.contains("relay:***@"), "{text}");
    assert!(!text.contains(['\u{1b}', '\u{7}']), "{text:?}");
}

#[test]
fn content_type_must_be_a_media_type() {
    let g = generated();
    let check = |value: &str| {
        let extra = format!("format = \"plain\"\ncontent_type = {value:?}\n");
        let toml = config(
            &g,
            &[target("b", "http://127.0.0.1:1/", &extra)],
            "[[routes]]\nto = [\"b\"]\n",
        );
        Settings::from_toml_str(&toml).err().map(|e| e.to_string())
    };
    for fine in [
        "application/xml",
        "text/plain",
        "text/xml; charset=utf-8",
        "application/xml;charset=\"UTF-8\"",
        "application/vnd.wechat+xml",
    ] {
        assert_eq!(check(fine), None, "{fine}");
    }
    for bad in [
        "/",
        "text/",
        "/xml",
        "text /xml",
        "text/xml/x",
        "text/xml,application/json",
        "text/xml; charset",
        "text/xml; charset=\"utf-8",
        "text/(xml)",
        "text/xml\r\nX-Injected: 1",
    ] {
        let err = check(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(
            err.contains("targets.b.content_type: must be a media type"),
            "{err}"
        );
    }
}

/// A `wechat` target's reply is read as strictly as a push: one with a
/// top-level field twice could be read as addressed to the sender by the
/// relay and to someone else by WeChat, so it is never sealed or passed.
#[tokio::test]
async fn a_wechat_targets_reply_with_a_repeated_field_is_unverifiable() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets = [
        target("w_secure", &broker.url("/secure"), &wechat_keys("secure")),
        target(
            "w_plain",
            &broker.url("/plaintext"),
            &wechat_keys("plaintext"),
        ),
    ];
    let routes = "[[routes]]\nmatch = { account = \"secure\" }\nto = [\"w_secure\"]\nreply_from = \"w_secure\"\n\n\
                  [[routes]]\nto = [\"w_plain\"]\nreply_from = \"w_plain\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let reply = reply_xml("hello");
    let twice = |field: &str, value: &str| {
        let at = reply.find("<CreateTime>").unwrap();
        let mut xml = reply.clone();
        xml.insert_str(at, &format!("<{field}><![CDATA[{value}]]></{field}>"));
        xml
    };
    let doubled = [
        twice("ToUserName", "oTheVictim000000000000000000"),
        twice("FromUserName", "gh_another_account"),
        twice("MsgType", "event"),
    ];
    let mut answers: Vec<String> = doubled
        .iter()
        .enumerate()
        .map(|(i, xml)| {
            let nonce = format!("{}", 900 + i);
            envelope(
                &target_key(),
                TARGET_TOKEN,
                &a.app_id,
                xml,
                "1717000001",
                &nonce,
                &random_bytes(),
            )
        })
        .collect();
    answers.push(doubled[0].clone());
    broker.script(
        answers
            .iter()
            .map(|body| Behaviour::body(200, "text/xml", body)),
    );
    for i in 0..answers.len() {
        let account = if i < doubled.len() {
            "secure"
        } else {
            "plaintext"
        };
        let scan = PushKind::Scan {
            scene: format!("s{i}"),
        };
        let push = xml(&scan, reference_now(&g), 200 + i as u64);
        let (_, answer) = common::push_as_wechat(&relay, &g, account, &push, SENDER).await;
        assert_eq!(answer.text(), "success", "answer {i}");
    }
    let m = relay.metrics().await;
    let unverifiable = |account| {
        metric(
            &m,
            "wxrelay_replies_total",
            &[("account", account), ("outcome", "unverifiable")],
        )
    };
    assert_eq!(unverifiable("secure"), 3.0, "{m}");
    assert_eq!(unverifiable("plaintext"), 1.0, "{m}");
    relay.stop().await;
}

/// A `wechat` target's sealed reply is dated and salted like a push: one
/// stamped outside the freshness window, or with a (`TimeStamp`, `Nonce`)
/// it already used, is a replay and is never sealed for the account.
#[tokio::test]
async fn a_wechat_targets_stale_or_replayed_reply_is_unverifiable() {
    let g = generated();
    let a = account(&g);
    let broker = FakeTarget::start().await;
    let targets = [target(
        "w_secure",
        &broker.url("/secure"),
        &wechat_keys("secure"),
    )];
    let routes = "[[routes]]\nto = [\"w_secure\"]\nreply_from = \"w_secure\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    let now = reference_now(&g);
    let sealed = |timestamp: i64, nonce: &str| {
        let reply = reply_xml("stamped");
        let timestamp = timestamp.to_string();
        envelope(
            &target_key(),
            TARGET_TOKEN,
            &a.app_id,
            &reply,
            &timestamp,
            nonce,
            &random_bytes(),
        )
    };
    let answers = [
        (sealed(now - 301, "1"), false),
        (sealed(now + 301, "2"), false),
        (sealed(now - 290, "3"), true),
        // The same stamp on another, equally valid, reply.
        (sealed(now - 290, "3"), false),
        (sealed(now - 290, "4"), true),
    ];
    broker.script(
        answers
            .iter()
            .map(|(body, _)| Behaviour::body(200, "text/xml", body)),
    );
    for (i, (_, sealed)) in answers.iter().enumerate() {
        let scan = PushKind::Scan {
            scene: format!("s{i}"),
        };
        let push = xml(&scan, now, 300 + i as u64);
        let (_, answer) = common::push_as_wechat(&relay, &g, "secure", &push, SENDER).await;
        assert_eq!(answer.text() != "success", *sealed, "answer {i}");
    }
    let m = relay.metrics().await;
    let replies = |outcome| {
        metric(
            &m,
            "wxrelay_replies_total",
            &[("account", "secure"), ("outcome", outcome)],
        )
    };
    assert_eq!(replies("unverifiable"), 3.0, "{m}");
    assert_eq!(replies("encrypted"), 2.0, "{m}");
    relay.stop().await;
}
