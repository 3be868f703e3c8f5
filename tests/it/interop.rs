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
