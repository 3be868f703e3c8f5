//! Every callback family at one relay: a Mini Program (XML and JSON), an
//! Open Platform (its authorisation URL and its message URL), a WeCom app,
//! beside an Official Account. Each kind's URL check, its pushes in every
//! mode it has, its routing keys, and its refusals: each a 4xx with a reason,
//! a verdict and a log line, and nothing stored.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{metric, Answer, TestRelay};
use std::time::Duration;
use wxrelay::config::{render_check, Settings};
use wxrelay::wechat::crypto::{decrypt, encrypt, AesKey};
use wxrelay::wechat::push::{self, Push, PushParams, Sealing};
use wxrelay::wechat::signature::sign;

pub const NOW: i64 = 1_717_000_000;
const WAIT: Duration = Duration::from_secs(20);

/// One account of a family: its id and credentials.
pub struct Kind {
    pub id: &'static str,
    pub receive_id: &'static str,
    pub token: &'static str,
    pub key: &'static str,
}

pub const OA: Kind = Kind {
    id: "main",
    receive_id: "wx5f3c9a1e7d2b4c60",
    token: "Relay2024Token",
    key: "R3layV3ct0rsEncodingAesKeyForTests0123456Zq",
};
pub const MP: Kind = Kind {
    id: "mp",
    receive_id: "wx0a1b2c3d4e5f6071",
    token: "MiniProgramToken1",
    key: "M1n1ProgramEncodingAesKeyForTests0123456789",
};
pub const OP: Kind = Kind {
    id: "platform",
    receive_id: "wx1122334455667788",
    token: "PlatformToken1",
    key: "P1atformEncodingAesKeyForTests0123456789abc",
};
pub const WECOM: Kind = Kind {
    id: "corp",
    receive_id: "ww0123456789abcdef",
    token: "WeComToken1",
    key: "WeC0mEncodingAesKeyForTests0123456789abcdef",
};
pub const AUTHORIZER: &str = "wx00000000000000aa";

impl Kind {
    pub fn aes(&self) -> AesKey {
        AesKey::from_encoding(self.key).unwrap()
    }

    fn params<'a>(&'a self, nonce: &'a str, openid: Option<&'a str>) -> PushParams<'a> {
        PushParams {
            token: self.token,
            app_id: self.receive_id,
            timestamp: NOW,
            nonce,
            openid,
            random: &[b'R'; 16],
        }
    }

    /// The `[accounts.ID]` section; `extra` adds keys such as the kind.
    pub fn section(&self, extra: &str) -> String {
        let id_key = if self.id == WECOM.id {
            "corp_id"
        } else {
            "app_id"
        };
        format!(
            "[accounts.{}]\n{id_key} = \"{}\"\ntoken = \"{}\"\nencoding_aes_key = \"{}\"\n{extra}\n",
            self.id, self.receive_id, self.token, self.key
        )
    }
}

/// The four kinds: an Official Account in secure mode, a Mini Program in
/// JSON (`mode`), an Open Platform and a WeCom app.
pub fn accounts(mp_mode: &str) -> String {
    [
        OA.section("mode = \"secure\""),
        MP.section(&format!(
            "kind = \"mini_program\"\ndata_format = \"json\"\nmode = \"{mp_mode}\""
        )),
        OP.section("kind = \"open_platform\""),
        WECOM.section("kind = \"wecom\""),
    ]
    .concat()
}

pub fn relay_config(accounts: &str, rest: &str) -> String {
    format!(
        "[server]\nreply_budget = \"2s\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{accounts}\n{rest}"
    )
}

/// A WeCom message from `user`, for app `agent`.
pub fn wecom_text(user: &str, agent: &str, msg_id: u64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>\
         <CreateTime>{NOW}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content>\
         <MsgId>{msg_id}</MsgId><AgentID>{agent}</AgentID></xml>",
        WECOM.receive_id
    )
}

/// An Official Account's (or an authoriser's) message from `user`.
pub fn text_xml(to: &str, user: &str, msg_id: u64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[{to}]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName>\
         <CreateTime>{NOW}</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hi]]></Content>\
         <MsgId>{msg_id}</MsgId></xml>"
    )
}

/// An Open Platform's `component_verify_ticket`.
pub fn ticket_xml(ticket: &str, create_time: i64) -> String {
    format!(
        "<xml><AppId><![CDATA[{}]]></AppId><CreateTime>{create_time}</CreateTime>\
         <InfoType><![CDATA[component_verify_ticket]]></InfoType>\
         <ComponentVerifyTicket><![CDATA[{ticket}]]></ComponentVerifyTicket></xml>",
        OP.receive_id
    )
}

/// A Mini Program's JSON message: its MsgId above 2^53.
pub fn mp_json(msg_id: &str) -> String {
    format!(
        r#"{{"ToUserName":"gh_0a1b2c3d4e5f","FromUserName":"oMiniUser","CreateTime":{NOW},"MsgType":"text","Content":"你好","MsgId":{msg_id}}}"#
    )
}

/// `xml` sealed for the Open Platform (secure, with its keys), to `path`.
pub fn op_push(xml: &str, nonce: &str) -> Push {
    let key = OP.aes();
    push::build(xml, Sealing::Secure(&key), &OP.params(nonce, None))
}

pub fn wecom_push(xml: &str, nonce: &str) -> Push {
    push::build_wecom(xml, &WECOM.aes(), &WECOM.params(nonce, None))
}

pub fn mp_push(json: &str, sealing: &str, nonce: &str) -> Push {
    let key = MP.aes();
    let sealing = match sealing {
        "plaintext" => Sealing::Plaintext,
        "compat" => Sealing::Compat(&key),
        _ => Sealing::Secure(&key),
    };
    push::build_json(json, sealing, &MP.params(nonce, Some("oMiniUser")))
}

async fn post(relay: &TestRelay, path: &str, push: &Push) -> Answer {
    relay
        .post(&format!("{path}?{}", push.query), push.body.clone())
        .await
}

/// A refusal: the status, a one-line reason, and nothing more stored.
async fn assert_refused(relay: &TestRelay, answer: &Answer, status: u16, what: &str) {
    assert_eq!(answer.status, status, "{what}: {}", answer.text());
    let reason = answer.text();
    assert!(
        !reason.trim().is_empty() && reason.len() < 120 && reason.lines().count() == 1,
        "{what}: {reason}"
    );
    assert!(relay.unrouted().await.is_empty(), "{what}: nothing stored");
    assert!(relay.nothing_pending().await, "{what}: nothing stored");
}

fn refused(m: &str, account: &str, verdict: &str) -> f64 {
    metric(
        m,
        "wxrelay_pushes_total",
        &[("account", account), ("verdict", verdict)],
    )
}

// ---- configuration ----

#[test]
fn each_kind_takes_its_own_keys_and_a_bad_one_is_named() {
    let token = "token = \"Token123\"\n";
    let key = format!("encoding_aes_key = \"{}\"\n", WECOM.key);
    let corp = "corp_id = \"ww0123456789abcdef\"\n";
    let app = format!("app_id = \"{}\"\n", OA.receive_id);
    let cases = [
        (
            format!("kind = \"wecom\"\n{key}"),
            "corp_id",
            "required for kind = \"wecom\"",
        ),
        (
            format!("kind = \"wecom\"\n{corp}{app}{key}"),
            "app_id",
            "not used for kind = \"wecom\"",
        ),
        (
            format!("kind = \"wecom\"\n{corp}{key}mode = \"plaintext\"\n"),
            "mode",
            "must be \"secure\"",
        ),
        (
            format!("kind = \"wecom\"\ncorp_id = \"ww 1\"\n{key}"),
            "corp_id",
            "letters and digits",
        ),
        (
            format!("kind = \"wecom\"\n{corp}"),
            "encoding_aes_key",
            "required when mode is secure",
        ),
        (
            format!("kind = \"open_platform\"\n{app}{key}mode = \"compat\"\n"),
            "mode",
            "must be \"secure\"",
        ),
        (
            format!("kind = \"open_platform\"\n{key}"),
            "app_id",
            "the platform's own (component) AppID",
        ),
        (
            format!(
                "kind = \"mini_program\"\n{app}{key}mode = \"secure\"\ndata_format = \"yaml\"\n"
            ),
            "data_format",
            "expected one of xml, json",
        ),
        (
            format!("{app}{key}mode = \"secure\"\ndata_format = \"json\"\n"),
            "data_format",
            "only for kind = \"mini_program\"",
        ),
        (
            format!("{app}{corp}{key}mode = \"secure\"\n"),
            "corp_id",
            "not used for kind = \"official_account\"",
        ),
        (
            format!("kind = \"channels\"\n{app}{key}mode = \"secure\"\n"),
            "kind",
            "unknown kind \"channels\"",
        ),
    ];
    for (keys, key_name, message) in cases {
        let toml = format!("[accounts.corp]\n{token}{keys}");
        let err = Settings::from_toml_str(&toml).unwrap_err().to_string();
        let path = format!("accounts.corp.{key_name}: ");
        let line = err
            .lines()
            .find(|l| l.starts_with(&path))
            .unwrap_or_else(|| panic!("{path} not named in:\n{err}\n---\n{toml}"));
        assert!(line.contains(message), "{line}");
    }
    // Each kind with what it needs, and nothing it does not use.
    let toml = relay_config(
        &accounts("plaintext"),
        "[targets.h]\nurl = \"http://127.0.0.1:1/\"\n[[routes]]\nto = [\"h\"]\n",
    );
    let settings = Settings::from_toml_str(&toml).unwrap();
    let corp = &settings.accounts["corp"];
    assert_eq!(corp.app_id, WECOM.receive_id);
    assert_eq!(
        corp.mode,
        wxrelay::config::Mode::Secure,
        "WeCom is always sealed"
    );
    assert_eq!(
        settings.accounts["platform"].mode,
        wxrelay::config::Mode::Secure
    );
    assert_eq!(settings.accounts["mp"].codec.as_str(), "json");
    assert_eq!(settings.accounts["main"].kind.as_str(), "official_account");
}

#[test]
fn a_rule_is_refused_what_the_families_it_matches_cannot_do() {
    let hooks = "[targets.hooks]\nurl = \"http://127.0.0.1:1/h\"\n\
                 [targets.broker]\nurl = \"http://127.0.0.1:1/b\"\nformat = \"wechat\"\ntoken = \"abc123\"\nmode = \"plaintext\"\n";
    let with = |routes: &str| relay_config(&accounts("secure"), &format!("{hooks}\n{routes}"));
    let err = Settings::from_toml_str(&with(
        "[[routes]]\nmatch = { event = \"SCAN\" }\nto = [\"hooks\"]\nreply_from = \"hooks\"\n[[routes]]\nto = [\"hooks\"]\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("routes[0].reply_from: refused for kind = \"mini_program\""),
        "{err}"
    );
    // Restricted to the accounts that take replies, the same rule is fine.
    Settings::from_toml_str(&with(
        "[[routes]]\nmatch = { event = \"SCAN\", account = [\"main\", \"corp\", \"platform\"] }\nto = [\"hooks\"]\nreply_from = \"hooks\"\n[[routes]]\nto = [\"hooks\"]\n",
    ))
    .unwrap();
    let err = Settings::from_toml_str(&with(
        "[[routes]]\nmatch = { appid = \"$APPID$\" }\nto = [\"hooks\"]\n[[routes]]\nto = [\"broker\"]\n",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("routes[0].match.appid: \"$APPID$\" is not an AppID"),
        "{err}"
    );
    assert!(
        err.contains("routes[1].to: target \"broker\" has no encoding_aes_key"),
        "{err}"
    );
}

#[test]
fn check_prints_the_urls_each_console_takes() {
    let toml = relay_config(
        &accounts("secure"),
        "[targets.hooks]\nurl = \"http://127.0.0.1:1/h\"\n[[routes]]\nto = [\"hooks\"]\n",
    );
    let report = render_check(&Settings::from_toml_str(&toml).unwrap());
    for expected in [
        "account main at /wx/main\n  kind              official_account\n  URL               https://<host>/wx/main",
        "account mp at /wx/mp\n  kind              mini_program\n  URL               https://<host>/wx/mp",
        "  data_format       json",
        "  authorisation URL https://<host>/wx/platform  (授权事件接收URL)",
        "  message URL       https://<host>/wx/platform/$APPID$  (消息与事件接收URL)",
        "  app_id            wx1122334455667788 (the platform's)",
        "account corp at /wx/corp\n  kind              wecom\n  URL               https://<host>/wx/corp",
        "  corp_id           ww0123456789abcdef",
    ] {
        assert!(report.contains(expected), "missing {expected:?} in:\n{report}");
    }
    assert!(
        !report.contains(WECOM.token) && !report.contains(OP.key),
        "{report}"
    );
}

// ---- WeCom ----

/// WeCom's URL check for `echo`, sealed for `receive_id` with `key`.
fn wecom_url_check(echo: &str, receive_id: &str, key: &AesKey, token: &str) -> String {
    let echostr = encrypt(key, &[b'E'; 16], echo, receive_id);
    let (ts, nonce) = (NOW.to_string(), "5150");
    let msg_signature = sign(&[token, &ts, nonce, &echostr]);
    let query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("msg_signature", msg_signature.as_str()),
            ("timestamp", &ts),
            ("nonce", nonce),
            ("echostr", &echostr),
        ])
        .finish();
    format!("/wx/corp?{query}")
}

#[tokio::test]
async fn wecom_answers_its_url_check_with_the_plaintext_exactly() {
    let logs = common::logs::logs();
    let relay = TestRelay::start(&relay_config(&accounts("secure"), ""), NOW).await;
    let ok = wecom_url_check(
        "8741596034627413065",
        WECOM.receive_id,
        &WECOM.aes(),
        WECOM.token,
    );
    let answer = relay.get(&ok).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        &answer.body[..],
        b"8741596034627413065",
        "no quotes, BOM or newline"
    );
    assert_eq!(answer.headers["content-type"], "text/plain; charset=utf-8");

    // Sealed for another corporation (a suite's SuiteID, a copied CorpID).
    let other = wecom_url_check("1", "wwffffffffffffffff", &WECOM.aes(), WECOM.token);
    let answer = relay.get(&other).await;
    assert_eq!(answer.status, 403);
    assert!(
        answer.text().contains("receive id mismatch"),
        "{}",
        answer.text()
    );
    assert!(answer.text().contains("-40007"), "{}", answer.text());
    // The Official Account's key (and its AppID) for WeCom: not a WeCom frame.
    let oa = wecom_url_check("1", OA.receive_id, &OA.aes(), WECOM.token);
    assert!(relay.get(&oa).await.status.is_client_error());
    // A tampered echostr no longer matches its msg_signature.
    let tampered = ok.replacen("echostr=", "echostr=A", 1);
    let answer = relay.get(&tampered).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.text().trim(), "bad msg_signature");
    // An Official Account's check (signature, a plain echostr) is not WeCom's.
    let ts = NOW.to_string();
    let plain = format!(
        "/wx/corp?signature={}&timestamp={ts}&nonce=1&echostr=abc",
        sign(&[WECOM.token, &ts, "1"])
    );
    assert_eq!(relay.get(&plain).await.status, 401);

    let m = relay.metrics().await;
    let checks = |verdict| {
        metric(
            &m,
            "wxrelay_url_checks_total",
            &[("account", "corp"), ("verdict", verdict)],
        )
    };
    assert_eq!(checks("ok"), 1.0, "{m}");
    assert_eq!(checks("bad_receive_id"), 1.0, "{m}");
    assert_eq!(checks("bad_msg_signature"), 1.0, "{m}");
    let log = logs.text();
    assert!(
        log.lines().any(
            |l| l.contains("bad_receive_id") && l.contains("receive_id=\"wwffffffffffffffff\"")
        ),
        "the log says which receive id was found"
    );
    assert!(!log.contains(WECOM.key) && !log.contains(WECOM.token));
    relay.stop().await;
}

#[tokio::test]
async fn wecom_refuses_a_push_for_another_receive_id_and_stores_nothing() {
    let relay = TestRelay::start(&relay_config(&accounts("secure"), ""), NOW).await;
    let xml = wecom_text("zhangsan", "1000002", 7);
    // Sealed for the Official Account's AppID with WeCom's own key and Token.
    let wrong_id = push::build_wecom(
        &xml,
        &WECOM.aes(),
        &PushParams {
            token: WECOM.token,
            ..OA.params("2", None)
        },
    );
    let answer = post(&relay, "/wx/corp", &wrong_id).await;
    assert_refused(&relay, &answer, 403, "a wrong receive id").await;
    assert!(answer.text().contains("receive id mismatch"));
    // The Official Account's key and Token: refused before anything is decrypted.
    let oa_keys = push::build_wecom(&xml, &OA.aes(), &OA.params("3", None));
    let answer = post(&relay, "/wx/corp", &oa_keys).await;
    assert_refused(&relay, &answer, 401, "the Official Account's credentials").await;
    // WeCom's Token, the Official Account's key.
    let oa_key = push::build_wecom(
        &xml,
        &OA.aes(),
        &PushParams {
            app_id: WECOM.receive_id,
            ..WECOM.params("4", None)
        },
    );
    let answer = post(&relay, "/wx/corp", &oa_key).await;
    assert!(answer.status.is_client_error(), "{}", answer.text());
    assert!(relay.unrouted().await.is_empty());

    // The same push for WeCom's own CorpID is taken.
    let answer = post(&relay, "/wx/corp", &wecom_push(&xml, "5")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let stored = relay.unrouted().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].xml, xml);
    let m = relay.metrics().await;
    assert_eq!(refused(&m, "corp", "bad_receive_id"), 1.0, "{m}");
    relay.stop().await;
}

#[tokio::test]
async fn wecom_pushes_are_routed_by_agent_id_and_replies_sealed_for_the_corp() {
    let (sales, rest) = (FakeTarget::start().await, FakeTarget::start().await);
    let reply = text_xml("zhangsan", WECOM.receive_id, 0).replace("<MsgId>0</MsgId>", "");
    sales.set_default(Behaviour::body(200, "application/xml", &reply));
    let routes = format!(
        "{}{}[[routes]]\nmatch = {{ agent_id = \"1000002\" }}\nto = [\"sales\"]\nreply_from = \"sales\"\n\
         [[routes]]\nto = [\"rest\"]\n",
        common::target("sales", &sales.url("/s"), ""),
        common::target("rest", &rest.url("/r"), "")
    );
    let relay = TestRelay::start(&relay_config(&accounts("secure"), &routes), NOW).await;
    let answer = post(
        &relay,
        "/wx/corp",
        &wecom_push(&wecom_text("zhangsan", "1000002", 1), "1"),
    )
    .await;
    assert_eq!(answer.status, 200);
    // The reply, sealed as WeCom expects: for the CorpID, with WeCom's Token.
    let envelope = wxrelay::wechat::message::Message::parse(&answer.body).unwrap();
    let encrypted = envelope.get("Encrypt").expect("a sealed reply");
    let (ts, nonce) = (
        envelope.get("TimeStamp").unwrap(),
        envelope.get("Nonce").unwrap(),
    );
    assert!(wxrelay::wechat::signature::verify(
        envelope.get("MsgSignature").unwrap(),
        &[WECOM.token, ts, nonce, encrypted]
    ));
    assert_eq!(
        decrypt(&WECOM.aes(), encrypted, WECOM.receive_id).unwrap(),
        reply
    );

    let answer = post(
        &relay,
        "/wx/corp",
        &wecom_push(&wecom_text("lisi", "1000003", 2), "2"),
    )
    .await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "success")
    );
    assert!(rest.wait_for(1, WAIT).await);
    // `raw`: the push as WeCom sent it, its app named beside the ciphertext.
    let received = &rest.received()[0];
    assert!(received
        .text()
        .contains("<AgentID><![CDATA[1000003]]></AgentID>"));
    assert!(received.query().starts_with("msg_signature="));
    assert_eq!(sales.count(), 1);
    // One MsgId of two apps of the corporation: two events.
    let answer = post(
        &relay,
        "/wx/corp",
        &wecom_push(&wecom_text("lisi", "1000004", 2), "3"),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(rest.wait_for(2, WAIT).await);
    relay.stop().await;
}

// ---- Mini Program ----

#[tokio::test]
async fn a_mini_program_in_json_is_taken_in_every_mode_with_every_digit() {
    for mode in ["plaintext", "compat", "secure"] {
        let hooks = FakeTarget::start().await;
        let routes = format!(
            "{}[[routes]]\nmatch = {{ account = \"mp\", msg_type = \"text\" }}\nto = [\"hooks\"]\n",
            common::target(
                "hooks",
                &hooks.url("/h"),
                "format = \"json\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\""
            )
        );
        let relay = TestRelay::start(&relay_config(&accounts(mode), &routes), NOW).await;
        let json = mp_json("24602152426471537123");
        let answer = post(&relay, "/wx/mp", &mp_push(&json, mode, "1")).await;
        assert_eq!(answer.status, 200, "{mode}: {}", answer.text());
        assert_eq!(answer.text(), "success");
        assert!(hooks.wait_for(1, WAIT).await, "{mode}: routed on msg_type");
        let body: serde_json::Value = serde_json::from_slice(&hooks.received()[0].body).unwrap();
        assert_eq!(body["fields"]["MsgId"], "24602152426471537123", "{mode}");
        assert_eq!(body["fields"]["CreateTime"], NOW.to_string(), "{mode}");
        assert_eq!(body["from_user"], "oMiniUser");
        // WeChat's re-send is the same event.
        let again = post(&relay, "/wx/mp", &mp_push(&json, mode, "2")).await;
        assert_eq!(again.status, 200);
        let m = relay.metrics().await;
        assert_eq!(refused(&m, "mp", "duplicate"), 1.0, "{mode}: {m}");
        relay.stop().await;
    }
}

#[tokio::test]
async fn ambiguous_json_is_refused_and_nothing_is_stored() {
    let relay = TestRelay::start(&relay_config(&accounts("compat"), ""), NOW).await;
    let cases = [
        (
            r#"{"ToUserName":"gh_1","FromUserName":"oMiniUser","FromUserName":"oOther","CreateTime":1,"MsgType":"text","MsgId":1}"#,
            "appears more than once",
        ),
        (r#"[{"MsgType":"text"}]"#, "root is not a JSON object"),
        (
            r#"{"MsgType":["text","event"],"FromUserName":"oMiniUser"}"#,
            "more than once",
        ),
        (r#"{"MsgType":"text""#, "malformed JSON"),
        ("<xml><MsgType>text</MsgType></xml>", "malformed JSON"),
    ];
    let key = MP.aes();
    for (json, reason) in cases {
        for sealing in ["plaintext", "secure"] {
            let push = push::build_json(
                json,
                if sealing == "plaintext" {
                    Sealing::Plaintext
                } else {
                    Sealing::Secure(&key)
                },
                &MP.params("1", None),
            );
            let answer = post(&relay, "/wx/mp", &push).await;
            assert_refused(&relay, &answer, 400, json).await;
            assert!(answer.text().starts_with("bad JSON: "), "{}", answer.text());
            assert!(answer.text().contains(reason), "{json}: {}", answer.text());
        }
    }
    // The compat body's own copies are covered by nothing: a key twice there
    // is as ambiguous as anywhere.
    let push = mp_push(&mp_json("1"), "compat", "9");
    let twice = push.body.replacen('{', r#"{"Encrypt":"x","#, 1);
    let answer = relay.post(&format!("/wx/mp?{}", push.query), twice).await;
    assert_refused(&relay, &answer, 400, "Encrypt twice").await;
    let m = relay.metrics().await;
    assert_eq!(refused(&m, "mp", "bad_json"), 11.0, "{m}");
    relay.stop().await;
}

#[tokio::test]
async fn a_mini_program_in_xml_is_an_official_accounts_protocol_answered_success() {
    let toml = relay_config(
        &MP.section("kind = \"mini_program\"\nmode = \"secure\""),
        "",
    );
    let relay = TestRelay::start(&toml, NOW).await;
    let xml = text_xml("gh_0a1b2c3d4e5f", "oMiniUser", 5);
    let key = MP.aes();
    let push = push::build(
        &xml,
        Sealing::Secure(&key),
        &MP.params("1", Some("oMiniUser")),
    );
    let answer = post(&relay, "/wx/mp", &push).await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "success")
    );
    assert_eq!(relay.unrouted().await[0].xml, xml);
    let plain = push::build(&xml, Sealing::Plaintext, &MP.params("2", None));
    let answer = post(&relay, "/wx/mp", &plain).await;
    assert_eq!(answer.status, 403, "a downgrade: {}", answer.text());
    assert_eq!(relay.unrouted().await.len(), 1);
    relay.stop().await;
}

// ---- Open Platform ----

#[tokio::test]
async fn an_open_platform_takes_authorisation_events_and_every_authorisers_messages() {
    let (tickets, authorisers, rest) = (
        FakeTarget::start().await,
        FakeTarget::start().await,
        FakeTarget::start().await,
    );
    // A reply target on the ticket's rule: an authorisation event is answered
    // `success` whatever it says, and its delivery is left to the workers.
    tickets.set_default(Behaviour::body(
        200,
        "application/xml",
        "<xml><MsgType>text</MsgType></xml>",
    ));
    let routes = format!(
        "{}{}{}[[routes]]\nmatch = {{ info_type = \"component_verify_ticket\" }}\nto = [\"tickets\"]\nreply_from = \"tickets\"\n\
         [[routes]]\nmatch = {{ appid = \"{AUTHORIZER}\" }}\nto = [\"authorisers\"]\n[[routes]]\nto = [\"rest\"]\n",
        common::target("tickets", &tickets.url("/t"), ""),
        common::target("authorisers", &authorisers.url("/a/$APPID$"), ""),
        common::target("rest", &rest.url("/r"), ""),
    );
    let relay = TestRelay::start(&relay_config(&accounts("secure"), &routes), NOW).await;
    let answer = post(
        &relay,
        "/wx/platform",
        &op_push(&ticket_xml("ticket@@@1", NOW), "1"),
    )
    .await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "success")
    );
    assert!(tickets.wait_for(1, WAIT).await, "routed on info_type");

    let xml = text_xml("gh_authoriser01", "oUserOfTheAuthoriser", 42);
    let to_authoriser = format!("/wx/platform/{AUTHORIZER}");
    let answer = post(&relay, &to_authoriser, &op_push(&xml, "2")).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(authorisers.wait_for(1, WAIT).await, "routed on appid");
    // One MsgId from two authorisers is two events, one from one a duplicate.
    let other = "/wx/platform/wx00000000000000bb";
    assert_eq!(post(&relay, other, &op_push(&xml, "3")).await.status, 200);
    assert_eq!(
        post(&relay, &to_authoriser, &op_push(&xml, "4"))
            .await
            .status,
        200
    );
    assert!(rest.wait_for(1, WAIT).await);
    let m = relay.metrics().await;
    assert_eq!(refused(&m, "platform", "duplicate"), 1.0, "{m}");
    assert_eq!(refused(&m, "platform", "ok"), 3.0, "{m}");
    relay.stop().await;
}

#[tokio::test]
async fn an_open_platform_refuses_what_is_not_its_own_and_stores_nothing() {
    let relay = TestRelay::start(&relay_config(&accounts("secure"), ""), NOW).await;
    let xml = text_xml("gh_authoriser01", "oUser", 42);
    for path in [
        "/wx/platform/$APPID$",
        "/wx/platform/wx123",
        "/wx/platform/WX00000000000000AA",
    ] {
        let answer = post(&relay, path, &op_push(&xml, "1")).await;
        assert_refused(&relay, &answer, 400, path).await;
        assert!(answer.text().contains("not an AppID"), "{}", answer.text());
    }
    // Only an Open Platform has a URL below its own.
    let answer = post(
        &relay,
        &format!("/wx/main/{AUTHORIZER}"),
        &op_push(&xml, "2"),
    )
    .await;
    assert_eq!(answer.status, 404);
    // A message at the authorisation URL has lost its authoriser.
    let answer = post(&relay, "/wx/platform", &op_push(&xml, "3")).await;
    assert_refused(&relay, &answer, 400, "a message at the authorisation URL").await;
    // A ticket signed with another platform's Token (and key).
    let key = OA.aes();
    let foreign = push::build(
        &ticket_xml("ticket@@@forged", NOW),
        Sealing::Secure(&key),
        &PushParams {
            app_id: OP.receive_id,
            ..OA.params("4", None)
        },
    );
    let answer = post(&relay, "/wx/platform", &foreign).await;
    assert_refused(&relay, &answer, 401, "another platform's token").await;
    assert_eq!(answer.text().trim(), "bad signature");
    // Its Token, but sealed for another platform's AppID.
    let other_platform = push::build(
        &ticket_xml("ticket@@@forged", NOW),
        Sealing::Secure(&OP.aes()),
        &PushParams {
            app_id: OA.receive_id,
            ..OP.params("5", None)
        },
    );
    let answer = post(&relay, "/wx/platform", &other_platform).await;
    assert_refused(&relay, &answer, 403, "another platform's AppID").await;
    let plaintext = push::build(
        &ticket_xml("t", NOW),
        Sealing::Plaintext,
        &OP.params("6", None),
    );
    let answer = post(&relay, "/wx/platform", &plaintext).await;
    assert_refused(&relay, &answer, 403, "a plaintext ticket").await;
    let m = relay.metrics().await;
    assert_eq!(refused(&m, "platform", "bad_request"), 4.0, "{m}");
    assert_eq!(refused(&m, "platform", "bad_appid"), 1.0, "{m}");
    // No ticket was kept from the forged ones either.
    let kept = common::admin_request(
        relay.admin,
        http::Method::GET,
        "/admin/ticket/platform",
        None,
    );
    assert_eq!(kept.await.status, 404);
    relay.stop().await;
}

// ---- the operator's tools ----

#[tokio::test]
async fn simulate_sends_each_familys_url_check_and_pushes() {
    use wxrelay::cli::simulate::{
        self, Authorization, FamilyOptions, Payload, PushKind, SimulateArgs,
    };
    use wxrelay::clock::{Clock, SystemClock};
    let toml = relay_config(&accounts("compat"), "");
    let relay = TestRelay::start(&toml, SystemClock.now_secs()).await;
    let settings = Settings::from_toml_str(&toml).unwrap();
    let args = |account: &str, payload: Option<PushKind>| SimulateArgs {
        account: Some(account.to_owned()),
        url: format!("http://{}", relay.addr),
        verify_url: payload.is_none(),
        message: Default::default(),
        payload: payload.map(Payload::PushKind),
    };
    let run = |args: SimulateArgs, family: FamilyOptions| {
        let settings = &settings;
        async move { simulate::run_with(settings, &args, &family, &SystemClock).await }
    };
    let none = FamilyOptions::default;
    for account in ["main", "mp", "platform", "corp"] {
        let report = run(args(account, None), none()).await.unwrap();
        assert!(report.ok, "{account}: {}", report.text);
    }
    let text = || {
        Some(PushKind::Text {
            content: "hi".into(),
        })
    };
    let authoriser = FamilyOptions {
        appid: Some(AUTHORIZER.into()),
        agent_id: None,
    };
    let agent = FamilyOptions {
        appid: None,
        agent_id: Some("1000005".into()),
    };
    let ticket = Some(PushKind::Authorization(Authorization::Ticket));
    let authorized = Some(PushKind::Authorization(Authorization::Authorized));
    for (account, payload, family) in [
        ("mp", text(), none()),
        ("corp", text(), agent),
        ("platform", ticket.clone(), none()),
        ("platform", authorized.clone(), authoriser.clone()),
        ("platform", text(), authoriser.clone()),
    ] {
        let report = run(args(account, payload), family).await.unwrap();
        assert!(report.ok, "{account}: {}", report.text);
    }
    let stored = relay.unrouted().await;
    assert_eq!(stored.len(), 5);
    assert!(
        stored[0].xml.starts_with('{'),
        "a JSON Mini Program's push is JSON"
    );
    assert!(stored[1].xml.contains("<AgentID>1000005</AgentID>"));
    assert!(stored[2].xml.contains("component_verify_ticket"));
    assert!(stored[3]
        .xml
        .contains(&format!("<AuthorizerAppid><![CDATA[{AUTHORIZER}]]>")));
    assert_eq!(stored[4].origin.appid.as_deref(), Some(AUTHORIZER));
    // What a family has no place for is the operator's to fix.
    for (account, payload, family) in [
        ("platform", text(), none()),
        ("platform", authorized, none()),
        ("main", ticket, none()),
        ("mp", text(), authoriser),
    ] {
        let refused = run(args(account, payload), family).await;
        assert!(
            matches!(refused, Err(wxrelay::cli::CliError::Usage(_))),
            "{account}: {refused:?}"
        );
    }
    assert_eq!(relay.unrouted().await.len(), 5);
    let keys = wxrelay::cli::keygen::run();
    for console in ["official_account", "mini_program", "open_platform", "wecom"] {
        assert!(keys.contains(console), "{keys}");
    }
    relay.stop().await;
}

// ---- formats ----

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Every format, each a target of its own, for every push.
async fn every_format() -> (Vec<(&'static str, FakeTarget)>, String) {
    let mut targets = Vec::new();
    let mut toml = String::new();
    for (name, extra) in [
        ("raw", "format = \"raw\""),
        ("plain", "format = \"plain\""),
        (
            "json",
            "format = \"json\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
        ),
    ] {
        let target = FakeTarget::start().await;
        toml += &common::target(name, &target.url(&format!("/{name}/$APPID$")), extra);
        targets.push((name, target));
    }
    let names: Vec<String> = targets.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    toml += &format!("[[routes]]\nto = [{}]\n", names.join(", "));
    (targets, toml)
}

fn json_of(r: &common::target::Received) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap()
}

#[tokio::test]
async fn raw_and_plain_forward_each_family_as_it_came_and_json_names_it() {
    assert!(!SECRET.is_empty());
    let (targets, routes) = every_format().await;
    let relay = TestRelay::start(&relay_config(&accounts("secure"), &routes), NOW).await;
    let json = mp_json("24602152426471537123");
    let mp = mp_push(&json, "secure", "1");
    let wecom_xml = wecom_text("zhangsan", "1000002", 3);
    let wecom = wecom_push(&wecom_xml, "2");
    let op_xml = text_xml("gh_authoriser01", "oUser", 4);
    let op = op_push(&op_xml, "3");
    let ticket = op_push(&ticket_xml("ticket@@@7", NOW), "4");
    let to_authoriser = format!("/wx/platform/{AUTHORIZER}");
    for (path, push) in [
        ("/wx/mp", &mp),
        ("/wx/corp", &wecom),
        (to_authoriser.as_str(), &op),
        ("/wx/platform", &ticket),
    ] {
        assert_eq!(post(&relay, path, push).await.status, 200, "{path}");
    }
    for (name, target) in &targets {
        assert!(target.wait_for(4, WAIT).await, "{name}");
    }
    let got = |name: &str, needle: &str| {
        let (_, target) = targets.iter().find(|(n, _)| *n == name).unwrap();
        target
            .received()
            .into_iter()
            .find(|r| r.text().contains(needle) || r.query().contains(needle))
            .unwrap_or_else(|| panic!("{name}: nothing with {needle}"))
    };
    // raw: WeChat's request as it came, its type the codec's; plain: the
    // message, decrypted, under the query without the encryption's parameters.
    let raw = got("raw", mp.query.split('&').next().unwrap());
    assert_eq!(
        (raw.text(), raw.query()),
        (mp.body.clone(), mp.query.as_str())
    );
    assert_eq!(raw.headers["content-type"], "application/json");
    let plain = got("plain", "oMiniUser");
    assert_eq!(
        plain.text(),
        json,
        "a JSON push's plain delivery is its JSON"
    );
    assert_eq!(plain.headers["content-type"], "application/json");
    assert!(!plain.query().contains("msg_signature") && plain.query().contains("signature="));
    let plain = got("plain", "zhangsan");
    assert_eq!(plain.text(), wecom_xml);
    assert_eq!(plain.headers["content-type"], "text/xml");
    // The authoriser in the message URL's place, as WeChat fills it.
    let raw = got("raw", op.query.split('&').next().unwrap());
    assert!(
        raw.uri.starts_with(&format!("/raw/{AUTHORIZER}?")),
        "{}",
        raw.uri
    );
    let raw = got("raw", ticket.query.split('&').next().unwrap());
    assert!(
        raw.uri.starts_with(&format!("/raw/{}?", OP.receive_id)),
        "{}",
        raw.uri
    );

    // json: the family and its identifiers, after the account.
    let envelope = json_of(&got("json", "\"mp\""));
    assert_eq!(envelope["family"], "mini_program");
    assert_eq!(envelope["json"], json);
    assert!(envelope.get("xml").is_none());
    assert_eq!(envelope["fields"]["MsgId"], "24602152426471537123");
    let envelope = json_of(&got("json", "1000002"));
    assert_eq!(envelope["family"], "wecom");
    assert_eq!(envelope["agent_id"], "1000002");
    assert_eq!(envelope["appid"], serde_json::Value::Null);
    let envelope = json_of(&got("json", "oUser\""));
    assert_eq!(envelope["appid"], AUTHORIZER);
    assert_eq!(envelope["info_type"], serde_json::Value::Null);
    let envelope = json_of(&got("json", "ticket@@@7"));
    assert_eq!(envelope["info_type"], "component_verify_ticket");
    let keys: Vec<&String> = envelope.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "id",
            "account",
            "family",
            "appid",
            "agent_id",
            "info_type",
            "received_at",
            "msg_type",
            "event",
            "event_key",
            "from_user",
            "to_user",
            "create_time",
            "fields",
            "xml"
        ]
    );
    relay.stop().await;
}

#[tokio::test]
async fn the_wechat_format_reseals_each_family_for_the_targets_own_credentials() {
    let broker = FakeTarget::start().await;
    let key = "Br0kerEncodingAesKeyForTests0123456789abcde";
    let routes = format!(
        "{}[[routes]]\nto = [\"broker\"]\n",
        common::target(
            "broker",
            &broker.url("/b/$APPID$"),
            &format!(
                "format = \"wechat\"\nmode = \"secure\"\ntoken = \"brokerToken1\"\nencoding_aes_key = \"{key}\"\n\
                 app_id = \"wx00000000000000cc\"\ncorp_id = \"ww00000000000000cc\""
            )
        )
    );
    let relay = TestRelay::start(&relay_config(&accounts("compat"), &routes), NOW).await;
    let json = mp_json("24602152426471537123");
    let wecom_xml = wecom_text("zhangsan", "1000002", 3);
    let op_xml = text_xml("gh_authoriser01", "oUser", 4);
    let pushes = [
        ("/wx/mp".to_owned(), mp_push(&json, "compat", "1")),
        ("/wx/corp".to_owned(), wecom_push(&wecom_xml, "2")),
        (format!("/wx/platform/{AUTHORIZER}"), op_push(&op_xml, "3")),
    ];
    for (path, push) in &pushes {
        assert_eq!(post(&relay, path, push).await.status, 200, "{path}");
    }
    assert!(broker.wait_for(3, WAIT).await);
    let aes = AesKey::from_encoding(key).unwrap();
    let opened: Vec<(String, String)> = broker
        .received()
        .iter()
        .map(|r| {
            let q: std::collections::HashMap<String, String> =
                url::form_urlencoded::parse(r.query().as_bytes())
                    .into_owned()
                    .collect();
            let encrypt = if r.headers["content-type"] == "application/json" {
                let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                body["Encrypt"].as_str().unwrap().to_owned()
            } else {
                wxrelay::wechat::message::Message::parse(&r.body)
                    .unwrap()
                    .get("Encrypt")
                    .unwrap()
                    .to_owned()
            };
            let (ts, nonce) = (&q["timestamp"], &q["nonce"]);
            assert!(wxrelay::wechat::signature::verify(
                &q["msg_signature"],
                &["brokerToken1", ts, nonce, &encrypt]
            ));
            let (text, receive_id) =
                wxrelay::wechat::crypto::decrypt_frame(&aes, &encrypt).unwrap();
            (r.uri.clone(), format!("{receive_id} {text}"))
        })
        .collect();
    let find = |needle: &str| {
        opened
            .iter()
            .find(|(_, text)| text.contains(needle))
            .unwrap_or_else(|| panic!("no delivery with {needle}: {opened:?}"))
    };
    // A Mini Program's JSON, sealed as JSON for the target's AppID.
    let (_, mp) = find("oMiniUser");
    assert_eq!(mp, &format!("wx00000000000000cc {json}"));
    // WeCom's, for the target's CorpID, signed with msg_signature alone.
    let (uri, wecom) = find("zhangsan");
    assert_eq!(wecom, &format!("ww00000000000000cc {wecom_xml}"));
    assert!(
        !uri.contains("&signature=") && !uri.contains("?signature="),
        "{uri}"
    );
    // An authoriser's, for the target's AppID, at its URL for the authoriser.
    let (uri, op) = find("gh_authoriser01");
    assert_eq!(op, &format!("wx00000000000000cc {op_xml}"));
    assert!(uri.starts_with(&format!("/b/{AUTHORIZER}?")), "{uri}");
    relay.stop().await;
}

#[test]
fn route_dry_runs_a_push_as_its_family_sees_it() {
    use wxrelay::cli::route::{self, RouteArgs};
    use wxrelay::cli::simulate::{Authorization, FamilyOptions, Payload, PushKind};
    use wxrelay::clock::SystemClock;
    let routes = "[targets.t]\nurl = \"http://127.0.0.1:1/t\"\n[targets.op]\nurl = \"http://127.0.0.1:1/op\"\n\
                  [[routes]]\nmatch = { info_type = \"component_verify_ticket\" }\nto = [\"t\"]\nreply_from = \"t\"\n\
                  [[routes]]\nmatch = { appid = \"wx00000000000000aa\" }\nto = [\"op\"]\n";
    let settings = Settings::from_toml_str(&relay_config(&accounts("secure"), routes)).unwrap();
    let args = |account: &str, kind| RouteArgs {
        account: Some(account.into()),
        message: Default::default(),
        payload: Payload::PushKind(kind),
    };
    let authoriser = FamilyOptions {
        appid: Some(AUTHORIZER.into()),
        agent_id: None,
    };
    let text = || PushKind::Text {
        content: "hi".into(),
    };
    let out = route::run_with(
        &settings,
        &args("platform", text()),
        &authoriser,
        &SystemClock,
    );
    let out = out.unwrap();
    assert!(out.contains(&format!("appid={AUTHORIZER}")), "{out}");
    assert!(
        out.contains("rule      [1] appid=wx00000000000000aa"),
        "{out}"
    );
    let ticket = PushKind::Authorization(Authorization::Ticket);
    let out = route::run_with(
        &settings,
        &args("platform", ticket),
        &FamilyOptions::default(),
        &SystemClock,
    );
    let out = out.unwrap();
    assert!(out.contains("info_type=component_verify_ticket"), "{out}");
    assert!(
        out.contains("reply     none: WeChat takes no reply to this push"),
        "{out}"
    );
}

/// WeCom's official sample and wechatpy's WeCom suite, over HTTP, at a
/// `kind = "wecom"` account: each URL check answered with the plaintext the
/// source expects (or refused), each push stored as it decrypts.
#[tokio::test]
async fn wecoms_public_vectors_pass_at_a_wecom_account() {
    let all = common::fixture("public-vectors.json")["vectors"]
        .as_array()
        .unwrap()
        .clone();
    let wecom: Vec<&serde_json::Value> = all
        .iter()
        .filter(|v| v["platform"] == "wecom" && v["kind"] != "encrypt")
        .collect();
    let mut toml = String::new();
    for (i, v) in wecom.iter().enumerate() {
        let input = &v["input"];
        let corp = input.get("corpid").or(input.get("appid")).unwrap();
        toml += &format!(
            "[accounts.w{i}]\nkind = \"wecom\"\ncorp_id = {corp}\ntoken = {}\nencoding_aes_key = {}\ntimestamp_window = \"0s\"\n\n",
            input["token"], input["encoding_aes_key"]
        );
    }
    let relay = TestRelay::start(&relay_config(&toml, ""), NOW).await;
    let mut ran = Vec::new();
    for (i, v) in wecom.iter().enumerate() {
        let (input, expected) = (&v["input"], &v["expected"]);
        let s = |name: &str| input[name].as_str().unwrap();
        let query = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("msg_signature", s("msg_signature")),
                ("timestamp", s("timestamp")),
                ("nonce", s("nonce")),
            ])
            .finish();
        let id = v["id"].as_str().unwrap();
        if v["kind"] == "url_verify_encrypted" {
            let echostr: String =
                url::form_urlencoded::byte_serialize(s("encrypt").as_bytes()).collect();
            let answer = relay
                .get(&format!("/wx/w{i}?{query}&echostr={echostr}"))
                .await;
            match expected["plaintext"].as_str() {
                Some(plain) => assert_eq!(
                    (answer.status.as_u16(), answer.text()),
                    (200, plain.to_owned()),
                    "{id}"
                ),
                None => assert_eq!(answer.status, 401, "{id}"),
            }
        } else {
            let body = format!(
                "<xml><ToUserName><![CDATA[{}]]></ToUserName><AgentID><![CDATA[1]]></AgentID><Encrypt><![CDATA[{}]]></Encrypt></xml>",
                s("appid"),
                s("encrypt")
            );
            let answer = relay.post(&format!("/wx/w{i}?{query}"), body).await;
            assert_eq!(answer.status, 200, "{id}: {}", answer.text());
            let stored = relay.unrouted().await;
            assert_eq!(
                stored.last().unwrap().xml,
                expected["plaintext"].as_str().unwrap(),
                "{id}"
            );
        }
        ran.push(id);
    }
    eprintln!("WeCom public vectors over HTTP at wecom accounts: {ran:?}");
    assert_eq!(ran.len(), 5);
    relay.stop().await;
}
