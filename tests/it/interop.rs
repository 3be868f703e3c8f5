//! Interop with an independent implementation: wechatpy, pinned in
//! `tests/interop/requirements.txt`, plays the broker behind every
//! `format = "wechat"` target (it verifies and decrypts each delivery with
//! the target's credentials, and replies encrypted or in plaintext) and plays
//! WeChat opening the relay's answers with the account's credentials.
//!
//! The peer runs as a real process (`tests/interop/wechatpy_peer.py`) under
//! the interpreter named by `WXRELAY_TEST_PYTHON`, which `.ci/run` sets up in
//! a venv; without it the test says so in one line and does nothing else.

use crate::common;

use common::{generated, generated_config, reference_now, Process, TestRelay};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, Write as _};
use std::net::SocketAddr;
use std::time::Duration;
use wxrelay::cli::simulate::{message_xml, MessageOptions, PushKind};
use wxrelay::clock::Clock;

const PEER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/wechatpy_peer.py"
);
const MODES: [&str; 3] = ["plaintext", "compat", "secure"];
const SENDER: &str = "oInteropSender00000000000000";
const TARGET_TOKEN: &str = "interopBroker42";
const TARGET_KEY: &str = "InteropBrokerKey0123456789abcdefghijKLMNOPQ";
/// One target seals with an AppID of its own rather than the account's.
const OWN_APP_ID: &str = "wx00000000000000aa";
/// Reply targets: (name, mode, how the peer replies).
const REPLIERS: [(&str, &str, &str); 4] = [
    ("r_secure_encrypted", "secure", "encrypted"),
    ("r_compat_encrypted", "compat", "encrypted"),
    ("r_compat_plaintext", "compat", "plaintext"),
    ("r_plaintext_plaintext", "plaintext", "plaintext"),
];

/// Writes past the test harness's capture: the skip line and the counts are
/// for whoever runs the suite.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn python() -> Option<String> {
    std::env::var("WXRELAY_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
}

/// Starts the peer and waits (at most 30 s) for the port it listens on.
fn start_peer(python: &str, config: &Value) -> (Process, SocketAddr) {
    let mut child = std::process::Command::new(python)
        .arg(PEER)
        .arg(config.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let process = Process(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the wechatpy peer starts within 30 s");
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the peer did not start (is wechatpy installed?): {line:?}"));
    (process, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Every kind `simulate` knows, and the texts that stretch an implementation.
fn kinds() -> Vec<(String, PushKind)> {
    let text = |content: String| PushKind::Text { content };
    let huge: String = "长文本 with emoji 😀 and 𝄞; ".repeat(200 * 1024 / 32);
    assert!(huge.len() >= 200 * 1024);
    vec![
        ("text".into(), text("hello".into())),
        ("text_emoji".into(), text("登录 😀🎉 𝄞 𠀋".into())),
        ("text_200KiB".into(), text(huge)),
        ("image".into(), PushKind::Image),
        ("voice".into(), PushKind::Voice),
        ("video".into(), PushKind::Video),
        ("shortvideo".into(), PushKind::Shortvideo),
        ("location".into(), PushKind::Location),
        ("link".into(), PushKind::Link),
        ("subscribe".into(), PushKind::Subscribe { scene: None }),
        (
            "subscribe_scene".into(),
            PushKind::Subscribe {
                scene: Some("login_1".into()),
            },
        ),
        ("unsubscribe".into(), PushKind::Unsubscribe),
        (
            "SCAN".into(),
            PushKind::Scan {
                scene: "login_2".into(),
            },
        ),
        (
            "CLICK".into(),
            PushKind::Click {
                key: "V1001".into(),
            },
        ),
        (
            "VIEW".into(),
            PushKind::View {
                key: "https://www.example.com/".into(),
            },
        ),
        ("LOCATION".into(), PushKind::LocationEvent),
        ("scancode_push".into(), PushKind::ScancodePush),
        (
            "TEMPLATESENDJOBFINISH".into(),
            PushKind::Templatesendjobfinish,
        ),
        ("MASSSENDJOBFINISH".into(), PushKind::Masssendjobfinish),
        ("PUBLISHJOBFINISH".into(), PushKind::Publishjobfinish),
        (
            "subscribe_msg_popup_event".into(),
            PushKind::SubscribeMsgPopup,
        ),
    ]
}

fn relay_config(g: &Value, peer: SocketAddr) -> String {
    let mut toml = format!(
        "[server]\nreply_budget = \"3s\"\nmax_body = \"1MiB\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n{}\n",
        generated_config(g)
    );
    let mut wechat_target = |name: &str, mode: &str, reply: &str, extra: &str| {
        toml += &format!(
            "[targets.{name}]\nurl = \"http://{peer}/broker/{name}/{reply}\"\ntimeout = \"10s\"\n\
             format = \"wechat\"\nmode = \"{mode}\"\ntoken = \"{TARGET_TOKEN}\"\nencoding_aes_key = \"{TARGET_KEY}\"\n{extra}\n"
        );
    };
    for mode in MODES {
        let own = if mode == "secure" {
            format!("app_id = \"{OWN_APP_ID}\"\n")
        } else {
            String::new()
        };
        wechat_target(&format!("w_{mode}"), mode, "none", &own);
    }
    for (name, mode, reply) in REPLIERS {
        wechat_target(name, mode, reply, "");
    }
    for (name, _, _) in REPLIERS {
        toml += &format!(
            "[[routes]]\nmatch = {{ event_key = \"{name}\" }}\nto = [\"{name}\"]\nreply_from = \"{name}\"\n\n"
        );
    }
    toml + "[[routes]]\nto = [\"w_plaintext\", \"w_compat\", \"w_secure\"]\n"
}

fn peer_config(g: &Value) -> Value {
    let c = &g["config"];
    let creds = |token: &str, key: &str, app_id: &str| json!({"token": token, "encoding_aes_key": key, "app_id": app_id});
    let app_id = c["appid"].as_str().unwrap();
    let mut targets = serde_json::Map::new();
    for mode in MODES {
        let own = if mode == "secure" { OWN_APP_ID } else { app_id };
        targets.insert(format!("w_{mode}"), creds(TARGET_TOKEN, TARGET_KEY, own));
    }
    for (name, _, _) in REPLIERS {
        targets.insert(name.to_owned(), creds(TARGET_TOKEN, TARGET_KEY, app_id));
    }
    let account = creds(
        c["token"].as_str().unwrap(),
        c["encoding_aes_key"].as_str().unwrap(),
        app_id,
    );
    let accounts: serde_json::Map<String, Value> = MODES
        .iter()
        .map(|m| (m.to_string(), account.clone()))
        .collect();
    json!({"targets": targets, "accounts": accounts})
}

async fn peer_request(
    peer: SocketAddr,
    method: http::Method,
    path: &str,
    body: bytes::Bytes,
) -> common::Answer {
    common::send(peer, method, path, body).await
}

#[tokio::test]
async fn wechatpy_verifies_every_delivery_and_its_replies_reach_wechat() {
    let Some(python) = python() else {
        say("interop: skipped: WXRELAY_TEST_PYTHON is not set (.ci/run installs wechatpy in a venv and sets it)");
        return;
    };
    let g = generated();
    let (_peer_process, peer) = start_peer(&python, &peer_config(&g));
    let relay = TestRelay::start(&relay_config(&g, peer), reference_now(&g)).await;
    let opts = MessageOptions {
        to: "gh_3f1a2b9c8d7e".to_owned(),
        from: SENDER.to_owned(),
    };

    // Every kind, from an account in each mode, to a target in each mode.
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let mut msg_id = 24602147850000000;
    for account in MODES {
        for (label, kind) in kinds() {
            msg_id += 1;
            let xml = message_xml(&kind, &opts, relay.clock.now_secs(), msg_id);
            common::push_as_wechat(&relay, &g, account, &xml, SENDER).await;
            sent.insert(xml, label);
        }
    }
    for mode in MODES {
        assert!(relay.until_nothing_pending(&format!("w_{mode}")).await);
    }

    // Replies, encrypted and in plaintext, through the relay to "WeChat".
    let mut replies = Vec::new();
    for (name, _, reply) in REPLIERS {
        for account in ["secure", "compat"] {
            let xml = message_xml(
                &PushKind::Scan {
                    scene: name.to_owned(),
                },
                &opts,
                relay.clock.now_secs(),
                0,
            );
            let (_, answer) = common::push_as_wechat(&relay, &g, account, &xml, SENDER).await;
            let opened = peer_request(
                peer,
                http::Method::POST,
                &format!("/wechat/{account}"),
                answer.body.clone(),
            )
            .await;
            assert_eq!(
                opened.status,
                200,
                "{name} to {account}: {}: {}",
                opened.text(),
                answer.text()
            );
            let opened: Value = serde_json::from_slice(&opened.body).unwrap();
            assert_eq!(
                opened["reply"]["Content"],
                format!("echo event from {name}"),
                "{opened}"
            );
            assert_eq!(opened["reply"]["ToUserName"], SENDER);
            if account == "secure" {
                assert_eq!(
                    opened["encrypted"], true,
                    "a secure account's reply is sealed"
                );
            }
            replies.push(format!(
                "{name} ({reply}) -> {account} account: opened, encrypted={}",
                opened["encrypted"]
            ));
        }
    }

    let results = peer_request(peer, http::Method::GET, "/results", bytes::Bytes::new()).await;
    let results: Vec<Value> = serde_json::from_slice(&results.body).unwrap();
    let failed: Vec<&Value> = results.iter().filter(|r| r["ok"] != true).collect();
    assert!(failed.is_empty(), "wechatpy refused: {failed:?}");
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in results
        .iter()
        .filter(|r| r["target"].as_str().unwrap().starts_with("w_"))
    {
        let xml = r["xml"].as_str().unwrap();
        let label = sent
            .get(xml)
            .unwrap_or_else(|| panic!("{} got a message nobody sent", r["target"]));
        let mode = r["target"]
            .as_str()
            .unwrap()
            .trim_start_matches("w_")
            .to_owned();
        *counts.entry((mode, label.clone())).or_default() += 1;
    }
    say("interop: wechatpy verified and decrypted, per target mode and kind (one per account mode):");
    for mode in MODES {
        let row: Vec<String> = kinds()
            .iter()
            .map(|(label, _)| {
                let n = counts
                    .get(&(mode.to_owned(), label.clone()))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(n, MODES.len(), "{mode} target, {label}");
                format!("{label}={n}")
            })
            .collect();
        let total: usize = row.len() * MODES.len();
        say(&format!(
            "interop: {mode:<9} {total} deliveries: {}",
            row.join(" ")
        ));
    }
    for line in &replies {
        say(&format!("interop: reply {line}"));
    }
    assert_eq!(replies.len(), REPLIERS.len() * 2);

    // The target check reaches the same wechatpy server with the target's Token.
    let (code, text) = common::wxrelay(
        [
            "target",
            "check",
            "--config",
            relay.config_path().to_str().unwrap(),
            "w_secure",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    )
    .await;
    assert_eq!(code, Some(0), "{text}");
    relay.stop().await;
}

// ---- every callback family, built by wechatpy ----

/// The families' accounts: a Mini Program in XML and one in JSON per mode,
/// an Open Platform and a WeCom app, with the families tests' credentials.
fn families_config() -> String {
    use crate::families::{Kind, MP, OP, WECOM};
    let mp = |id: &str, mode: &str, format: &str| {
        let kind = Kind { id: "", ..MP };
        kind.section(&format!(
            "kind = \"mini_program\"\nmode = \"{mode}\"\ndata_format = \"{format}\"\ntimestamp_window = \"0s\""
        ))
        .replacen("[accounts.]", &format!("[accounts.{id}]"), 1)
    };
    let mut toml = "[server]\nreply_budget = \"3s\"\nmax_body = \"1MiB\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n".to_owned();
    toml += &mp("mp_xml", "secure", "xml");
    for mode in MODES {
        toml += &mp(&format!("mp_{mode}"), mode, "json");
    }
    toml += &OP.section("kind = \"open_platform\"\ntimestamp_window = \"0s\"");
    toml += &WECOM.section("kind = \"wecom\"\ntimestamp_window = \"0s\"");
    toml
}

/// Asks the peer to build a push (or, with `echo`, a URL check).
async fn wechatpy_build(peer: SocketAddr, spec: Value) -> (String, String) {
    let answer = peer_request(peer, http::Method::POST, "/build", spec.to_string().into()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let built: Value = serde_json::from_slice(&answer.body).unwrap();
    (
        built["query"].as_str().unwrap().to_owned(),
        built["body"].as_str().unwrap().to_owned(),
    )
}

fn spec(kind: &crate::families::Kind, family: &str, now: i64, nonce: u64) -> Value {
    json!({"family": family, "token": kind.token, "encoding_aes_key": kind.key,
           "receive_id": kind.receive_id, "timestamp": now.to_string(), "nonce": nonce.to_string()})
}

#[tokio::test]
async fn wechatpy_builds_every_familys_pushes_and_opens_the_relays_replies() {
    use crate::families::{AUTHORIZER, MP, OP, WECOM};
    use wxrelay::cli::simulate::{as_json, family_xml, Authorization, FamilyOptions};
    let Some(python) = python() else {
        say("interop: skipped: WXRELAY_TEST_PYTHON is not set (.ci/run installs wechatpy in a venv and sets it)");
        return;
    };
    let creds = |k: &crate::families::Kind, family: &str| json!({"token": k.token, "encoding_aes_key": k.key, "app_id": k.receive_id, "family": family});
    let peer_config = json!({"targets": {}, "accounts": {"corp": creds(&WECOM, "wecom"), "platform": creds(&OP, "xml")}});
    let (_peer_process, peer) = start_peer(&python, &peer_config);
    let replier = common::target::FakeTarget::start().await;
    let reply = "<xml><ToUserName><![CDATA[oUser]]></ToUserName><FromUserName><![CDATA[gh_1]]></FromUserName>\
                 <CreateTime>1</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[sealed for you]]></Content></xml>";
    replier.set_default(common::target::Behaviour::body(
        200,
        "application/xml",
        reply,
    ));
    let routes = format!(
        "{}[[routes]]\nmatch = {{ account = [\"corp\", \"platform\"], event = \"SCAN\" }}\nto = [\"replier\"]\nreply_from = \"replier\"\n",
        common::target("replier", &replier.url("/r"), "")
    );
    let relay = TestRelay::start(&(families_config() + &routes), 1_717_000_000).await;
    let now = relay.clock.now_secs();
    let opts = MessageOptions {
        to: "gh_3f1a2b9c8d7e".to_owned(),
        from: SENDER.to_owned(),
    };
    let mut nonce = 0;
    let mut sent: Vec<(String, String, String)> = Vec::new(); // (family/mode, kind, message)
    let mut msg_id = 24602147850000000;
    let mut push = |label: &str, kind: &str, path: String, message: String, spec: Value| {
        nonce += 1;
        let mut spec = spec;
        spec["message"] = message.clone().into();
        spec["nonce"] = nonce.to_string().into();
        let relay = &relay;
        let entry = (label.to_owned(), kind.to_owned(), message);
        sent.push(entry);
        async move {
            let (query, body) = wechatpy_build(peer, spec).await;
            let answer = relay.post(&format!("{path}?{query}"), body).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        }
    };
    for (label, kind) in kinds() {
        if matches!(kind, PushKind::Scan { .. }) {
            continue; // the replies' own, below
        }
        msg_id += 1;
        let xml = message_xml(&kind, &opts, now, msg_id);
        let mut s = spec(&MP, "mini_program", now, 0);
        s["mode"] = "secure".into();
        s["openid"] = SENDER.into();
        push(
            "mini_program/xml/secure",
            &label,
            "/wx/mp_xml".into(),
            xml.clone(),
            s.clone(),
        )
        .await;
        for mode in MODES {
            s["mode"] = mode.into();
            s["codec"] = "json".into();
            let json = as_json(&xml).unwrap();
            push(
                &format!("mini_program/json/{mode}"),
                &label,
                format!("/wx/mp_{mode}"),
                json,
                s.clone(),
            )
            .await;
        }
        let mut s = spec(&OP, "open_platform", now, 0);
        s["mode"] = "secure".into();
        push(
            "open_platform/message",
            &label,
            format!("/wx/platform/{AUTHORIZER}"),
            xml,
            s,
        )
        .await;
        let wecom = FamilyOptions {
            appid: None,
            agent_id: Some("1000002".into()),
        };
        let opts = MessageOptions {
            to: WECOM.receive_id.to_owned(),
            ..opts.clone()
        };
        let xml = family_xml(&kind, &opts, &wecom, now, msg_id);
        push(
            "wecom",
            &label,
            "/wx/corp".into(),
            xml,
            spec(&WECOM, "wecom", now, 0),
        )
        .await;
    }
    for (label, event) in [
        ("ticket", Authorization::Ticket),
        ("authorized", Authorization::Authorized),
        ("unauthorized", Authorization::Unauthorized),
        ("updateauthorized", Authorization::Updateauthorized),
    ] {
        msg_id += 1;
        let opts = MessageOptions {
            to: OP.receive_id.to_owned(),
            ..opts.clone()
        };
        let family = FamilyOptions {
            appid: Some(AUTHORIZER.into()),
            agent_id: None,
        };
        let xml = family_xml(&PushKind::Authorization(event), &opts, &family, now, msg_id);
        let mut s = spec(&OP, "open_platform", now, 0);
        s["mode"] = "secure".into();
        push(
            "open_platform/authorisation",
            label,
            "/wx/platform".into(),
            xml,
            s,
        )
        .await;
    }

    // What the relay stored is what wechatpy sealed, for every push.
    let stored: Vec<String> = relay.unrouted().await.into_iter().map(|e| e.xml).collect();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (label, kind, message) in &sent {
        assert!(
            stored.contains(message),
            "{label} {kind}: not stored as sealed"
        );
        *counts.entry(label.clone()).or_default() += 1;
    }
    assert_eq!(stored.len(), sent.len());
    for (label, n) in &counts {
        say(&format!(
            "interop: wechatpy built, the relay verified and stored: {label}: {n} pushes"
        ));
    }
    assert_eq!(counts["open_platform/authorisation"], 4);
    assert_eq!(counts["mini_program/json/compat"], kinds().len() - 1);

    // WeCom's URL check, built by wechatpy's enterprise crypto.
    let mut s = spec(&WECOM, "wecom", now, 900);
    s["echo"] = "6480519872014652389".into();
    let (query, _) = wechatpy_build(peer, s.clone()).await;
    let answer = relay.get(&format!("/wx/corp?{query}")).await;
    assert_eq!(
        (answer.status.as_u16(), answer.text().as_str()),
        (200, "6480519872014652389")
    );
    s["receive_id"] = "wwffffffffffffffff".into();
    let (query, _) = wechatpy_build(peer, s).await;
    assert_eq!(relay.get(&format!("/wx/corp?{query}")).await.status, 403);
    let mut s = spec(&OP, "open_platform", now, 901);
    s["echo"] = "1".into();
    let (query, _) = wechatpy_build(peer, s).await;
    assert_eq!(
        relay.get(&format!("/wx/platform?{query}")).await.text(),
        "1"
    );

    // The relay's sealed replies, opened by wechatpy as WeCom and as WeChat
    // opens an Open Platform's.
    for (account, path, kind, family) in [
        ("corp", "/wx/corp".to_owned(), &WECOM, "wecom"),
        (
            "platform",
            format!("/wx/platform/{AUTHORIZER}"),
            &OP,
            "open_platform",
        ),
    ] {
        msg_id += 1;
        let opts = MessageOptions {
            to: kind.receive_id.to_owned(),
            ..opts.clone()
        };
        let ids = FamilyOptions {
            appid: None,
            agent_id: (family == "wecom").then(|| "1000002".into()),
        };
        let scan = PushKind::Scan {
            scene: "login_9".into(),
        };
        let mut s = spec(kind, family, now, 950 + msg_id);
        s["mode"] = "secure".into();
        s["message"] = family_xml(&scan, &opts, &ids, now, msg_id).into();
        let (query, body) = wechatpy_build(peer, s).await;
        let answer = relay.post(&format!("{path}?{query}"), body).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let opened = peer_request(
            peer,
            http::Method::POST,
            &format!("/wechat/{account}"),
            answer.body.clone(),
        )
        .await;
        assert_eq!(
            opened.status,
            200,
            "{account}: {}: {}",
            opened.text(),
            answer.text()
        );
        let opened: Value = serde_json::from_slice(&opened.body).unwrap();
        assert_eq!(opened["encrypted"], true, "{opened}");
        assert_eq!(opened["reply"]["Content"], "sealed for you", "{opened}");
        say(&format!(
            "interop: reply to a {family} push sealed by the relay, opened by wechatpy"
        ));
    }

    // Refused, built by wechatpy: JSON with a key twice; a ticket under another
    // platform's Token.
    let mut s = spec(&MP, "mini_program", now, 990);
    s["mode"] = "secure".into();
    s["codec"] = "json".into();
    s["message"] = r#"{"ToUserName":"gh_1","FromUserName":"a","FromUserName":"b","MsgType":"text","CreateTime":1,"MsgId":1}"#.into();
    let (query, body) = wechatpy_build(peer, s).await;
    assert_eq!(
        relay
            .post(&format!("/wx/mp_secure?{query}"), body)
            .await
            .status,
        400
    );
    let mut s = spec(&OP, "open_platform", now, 991);
    s["token"] = "AnotherPlatform9".into();
    s["mode"] = "secure".into();
    s["message"] = crate::families::ticket_xml("ticket@@@forged", now).into();
    let (query, body) = wechatpy_build(peer, s).await;
    assert_eq!(
        relay
            .post(&format!("/wx/platform?{query}"), body)
            .await
            .status,
        401
    );
    assert_eq!(
        relay.unrouted().await.len(),
        sent.len(),
        "nothing more stored"
    );
    relay.stop().await;
}

/// The `wechat` targets of every family, each with credentials of its own:
/// (name, the peer's family, mode, the receive id it seals for).
const FAMILY_TARGETS: [(&str, &str, &str, &str); 6] = [
    ("w_mp_json_plaintext", "json", "plaintext", OWN_APP_ID),
    ("w_mp_json_compat", "json", "compat", OWN_APP_ID),
    ("w_mp_json_secure", "json", "secure", OWN_APP_ID),
    ("w_mp_xml", "xml", "secure", OWN_APP_ID),
    ("w_platform", "xml", "secure", "wx00000000000000bb"),
    ("w_corp", "wecom", "secure", "ww00000000000000bb"),
];

#[tokio::test]
async fn wechatpy_verifies_each_familys_wechat_deliveries_with_the_targets_credentials() {
    use crate::families::{self, AUTHORIZER, MP, OP, WECOM};
    use wxrelay::cli::simulate::{as_json, family_xml, Authorization, FamilyOptions};
    let Some(python) = python() else {
        say("interop: skipped: WXRELAY_TEST_PYTHON is not set (.ci/run installs wechatpy in a venv and sets it)");
        return;
    };
    let mut targets = serde_json::Map::new();
    for (name, family, _, receive_id) in FAMILY_TARGETS {
        let creds = json!({"token": TARGET_TOKEN, "encoding_aes_key": TARGET_KEY, "app_id": receive_id, "family": family});
        targets.insert(name.to_owned(), creds);
    }
    let (_peer_process, peer) = start_peer(&python, &json!({"targets": targets, "accounts": {}}));
    let mut toml = "[server]\nreply_budget = \"3s\"\nmax_body = \"1MiB\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n".to_owned();
    toml += &MP
        .section("kind = \"mini_program\"\nmode = \"secure\"\ndata_format = \"json\"")
        .replacen("[accounts.mp]", "[accounts.mp_json]", 1);
    toml += &MP
        .section("kind = \"mini_program\"\nmode = \"secure\"")
        .replacen("[accounts.mp]", "[accounts.mp_xml]", 1);
    toml += &OP.section("kind = \"open_platform\"");
    toml += &WECOM.section("kind = \"wecom\"");
    for (name, _, mode, receive_id) in FAMILY_TARGETS {
        let id_key = if receive_id.starts_with("ww") {
            "corp_id"
        } else {
            "app_id"
        };
        toml += &format!(
            "[targets.{name}]\nurl = \"http://{peer}/broker/{name}/none/$APPID$\"\ntimeout = \"10s\"\nformat = \"wechat\"\n\
             mode = \"{mode}\"\ntoken = \"{TARGET_TOKEN}\"\nencoding_aes_key = \"{TARGET_KEY}\"\n{id_key} = \"{receive_id}\"\n\n"
        );
    }
    for (account, to) in [
        (
            "mp_json",
            "\"w_mp_json_plaintext\", \"w_mp_json_compat\", \"w_mp_json_secure\"",
        ),
        ("mp_xml", "\"w_mp_xml\""),
        ("platform", "\"w_platform\""),
        ("corp", "\"w_corp\""),
    ] {
        toml += &format!("[[routes]]\nmatch = {{ account = \"{account}\" }}\nto = [{to}]\n");
    }
    let relay = TestRelay::start(&toml, families::NOW).await;
    let opts = MessageOptions {
        to: "gh_3f1a2b9c8d7e".to_owned(),
        from: SENDER.to_owned(),
    };
    let now = families::NOW;
    let post = |path: String, push: wxrelay::wechat::push::Push| {
        let relay = &relay;
        async move {
            let answer = relay
                .post(&format!("{path}?{}", push.query), push.body)
                .await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.text());
        }
    };
    let mut sent: BTreeMap<String, String> = BTreeMap::new(); // message → label
    let mut msg_id = 24602147860000000;
    for (label, kind) in kinds() {
        msg_id += 1;
        let nonce = msg_id.to_string();
        let xml = message_xml(&kind, &opts, now, msg_id);
        let json = as_json(&xml).unwrap();
        let key = MP.aes();
        let params = wxrelay::wechat::push::PushParams {
            token: MP.token,
            app_id: MP.receive_id,
            timestamp: now,
            nonce: &nonce,
            openid: Some(SENDER),
            random: &[b'M'; 16],
        };
        let secure = wxrelay::wechat::push::Sealing::Secure(&key);
        let mp_json = wxrelay::wechat::push::build_json(&json, secure, &params);
        post("/wx/mp_json".into(), mp_json).await;
        let mp_xml = wxrelay::wechat::push::build(&xml, secure, &params);
        post("/wx/mp_xml".into(), mp_xml).await;
        post(
            format!("/wx/platform/{AUTHORIZER}"),
            families::op_push(&xml, &nonce),
        )
        .await;
        let wecom = FamilyOptions {
            appid: None,
            agent_id: Some("1000002".into()),
        };
        let corp = MessageOptions {
            to: WECOM.receive_id.to_owned(),
            ..opts.clone()
        };
        let wecom_xml = family_xml(&kind, &corp, &wecom, now, msg_id);
        post("/wx/corp".into(), families::wecom_push(&wecom_xml, &nonce)).await;
        sent.insert(json, format!("mp_json/{label}"));
        sent.insert(xml, label.clone());
        sent.insert(wecom_xml, format!("wecom/{label}"));
    }
    for (label, event) in [
        ("ticket", Authorization::Ticket),
        ("authorized", Authorization::Authorized),
        ("unauthorized", Authorization::Unauthorized),
        ("updateauthorized", Authorization::Updateauthorized),
    ] {
        msg_id += 1;
        let platform = MessageOptions {
            to: OP.receive_id.to_owned(),
            ..opts.clone()
        };
        let ids = FamilyOptions {
            appid: Some(AUTHORIZER.into()),
            agent_id: None,
        };
        let xml = family_xml(
            &PushKind::Authorization(event),
            &platform,
            &ids,
            now,
            msg_id,
        );
        post(
            "/wx/platform".into(),
            families::op_push(&xml, &msg_id.to_string()),
        )
        .await;
        sent.insert(xml, format!("authorisation/{label}"));
    }
    for (name, _, _, _) in FAMILY_TARGETS {
        assert!(relay.until_nothing_pending(name).await, "{name}");
    }

    let results = peer_request(peer, http::Method::GET, "/results", bytes::Bytes::new()).await;
    let results: Vec<Value> = serde_json::from_slice(&results.body).unwrap();
    let failed: Vec<&Value> = results.iter().filter(|r| r["ok"] != true).collect();
    assert!(failed.is_empty(), "wechatpy refused: {failed:?}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        let target = r["target"].as_str().unwrap();
        let xml = r["xml"].as_str().unwrap();
        let label = sent
            .get(xml)
            .unwrap_or_else(|| panic!("{target} got a message nobody sent: {xml}"));
        if target == "w_platform" {
            // The authoriser in the target's URL, as WeChat fills $APPID$;
            // an authorisation event has none: the platform's own AppID.
            let expected = if label.starts_with("authorisation/") {
                OP.receive_id
            } else {
                AUTHORIZER
            };
            assert_eq!(r["path"], json!([expected]), "{label}");
        }
        if label == "authorisation/ticket" {
            assert!(
                r["ticket"].as_str().unwrap().starts_with("ticket@@@"),
                "{r}"
            );
        }
        *counts.entry(target.to_owned()).or_default() += 1;
    }
    let per_family = kinds().len();
    for (name, _, mode, _) in FAMILY_TARGETS {
        let n = counts.get(name).copied().unwrap_or(0);
        let expected = per_family + if name == "w_platform" { 4 } else { 0 };
        assert_eq!(n, expected, "{name}");
        say(&format!("interop: wechatpy verified with the target's own credentials: {name} ({mode}): {n} deliveries"));
    }
    relay.stop().await;
}
