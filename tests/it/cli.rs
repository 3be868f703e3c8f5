//! The operator's commands against the real relay: `simulate` pushes that the
//! relay accepts and delivers in every mode, `route` agrees with the relay's
//! routing, `dlq` lists without personal data and replays a dead letter to a
//! target that is back, and `keygen` prints credentials the config accepts.
//! The last test runs the binary for its exit statuses.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{broker_routes, config, generated, generated_config, target, TestRelay};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use wxrelay::cli::dlq::{self, DlqCommand, Selection};
use wxrelay::cli::route::{self, RouteArgs};
use wxrelay::cli::simulate::{self, MessageOptions, Payload, PushKind, SimulateArgs, DEFAULT_FROM};
use wxrelay::cli::{keygen, CliError};
use wxrelay::clock::{Clock, SystemClock};
use wxrelay::config::Settings;
use wxrelay::short_hash;
use wxrelay::spool::{DeadFilter, Operator, SqliteSpool};
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::message::Message;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const MODES: [&str; 3] = ["plaintext", "compat", "secure"];

/// `simulate` stamps the system time; the relay's clock must agree.
async fn relay_now(toml: &str) -> TestRelay {
    TestRelay::start(toml, SystemClock.now_ms() / 1000).await
}

fn settings(toml: &str) -> Settings {
    Settings::from_toml_str(toml).unwrap()
}

fn push(relay: &TestRelay, account: &str, payload: Payload) -> SimulateArgs {
    SimulateArgs {
        account: Some(account.to_owned()),
        url: format!("http://{}", relay.addr),
        verify_url: false,
        message: MessageOptions::default(),
        payload: Some(payload),
    }
}

/// Every kind `simulate` builds, and one XML file, with the MsgType and
/// Event the targets must see.
fn every_kind(dir: &Path) -> Vec<(Payload, &'static str, Option<&'static str>)> {
    let file = dir.join("push.xml");
    std::fs::write(
        &file,
        "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName><FromUserName><![CDATA[oFromAFile000000000000000000]]></FromUserName><CreateTime>1717000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[from a file]]></Content><MsgId>24602147850099999</MsgId></xml>",
    )
    .unwrap();
    let kind = |k: PushKind, msg_type, event| (Payload::PushKind(k), msg_type, event);
    let event = |k: PushKind, name| kind(k, "event", Some(name));
    vec![
        kind(
            PushKind::Text {
                content: "hello".into(),
            },
            "text",
            None,
        ),
        kind(PushKind::Image, "image", None),
        kind(PushKind::Voice, "voice", None),
        kind(PushKind::Video, "video", None),
        kind(PushKind::Shortvideo, "shortvideo", None),
        kind(PushKind::Location, "location", None),
        kind(PushKind::Link, "link", None),
        event(PushKind::Subscribe { scene: None }, "subscribe"),
        event(
            PushKind::Subscribe {
                scene: Some("login_1".into()),
            },
            "subscribe",
        ),
        event(PushKind::Unsubscribe, "unsubscribe"),
        event(
            PushKind::Scan {
                scene: "login_2".into(),
            },
            "SCAN",
        ),
        event(
            PushKind::Click {
                key: "V1001".into(),
            },
            "CLICK",
        ),
        event(
            PushKind::View {
                key: "https://www.example.com/".into(),
            },
            "VIEW",
        ),
        event(PushKind::LocationEvent, "LOCATION"),
        event(PushKind::ScancodePush, "scancode_push"),
        event(PushKind::Templatesendjobfinish, "TEMPLATESENDJOBFINISH"),
        event(PushKind::Masssendjobfinish, "MASSSENDJOBFINISH"),
        event(PushKind::Publishjobfinish, "PUBLISHJOBFINISH"),
        event(PushKind::SubscribeMsgPopup, "subscribe_msg_popup_event"),
        (Payload::Xml { file }, "text", None),
    ]
}

#[tokio::test]
async fn every_kind_is_accepted_in_every_mode_and_reaches_the_targets() {
    let g = generated();
    let (raw, plain, json) = (
        FakeTarget::start().await,
        FakeTarget::start().await,
        FakeTarget::start().await,
    );
    let targets = [
        target("raw", &raw.url("/"), ""),
        target("plain", &plain.url("/"), "format = \"plain\""),
        target(
            "json",
            &json.url("/"),
            &format!("format = \"json\"\nsecret = \"{SECRET}\""),
        ),
    ];
    let toml = config(
        &g,
        &targets,
        "[[routes]]\nto = [\"raw\", \"plain\", \"json\"]\n",
    );
    let relay = relay_now(&toml).await;
    let settings = settings(&toml);
    let kinds = every_kind(relay.dir.path());

    let mut expected = Vec::new();
    for account in MODES {
        for (payload, msg_type, event) in &kinds {
            let report = simulate::run(
                &settings,
                &push(&relay, account, payload.clone()),
                &SystemClock,
            )
            .await
            .unwrap();
            assert!(report.ok, "{account} {payload:?}: {}", report.text);
            assert!(
                report.text.contains("HTTP 200") && report.text.contains("success"),
                "{}",
                report.text
            );
            expected.push((msg_type.to_string(), event.map(str::to_string)));
        }
    }
    expected.sort();

    let n = expected.len();
    // Raw is WeChat's request as sent: each mode's shape, a third of them each.
    assert!(raw.wait_for(n, WAIT).await, "raw got {}", raw.count());
    let mut shapes = [0; 3];
    for r in raw.received() {
        let body = Message::parse(&r.body).unwrap();
        let encrypted = r.query().contains("encrypt_type=aes");
        assert_eq!(encrypted, body.get("Encrypt").is_some(), "{}", r.uri);
        assert!(r.query().contains("openid="), "{}", r.uri);
        let shape = match (encrypted, body.msg_type().is_some()) {
            (false, true) => 0, // plaintext
            (true, true) => 1,  // compat: the plain fields beside Encrypt
            (true, false) => 2, // secure: only ToUserName and Encrypt
            (false, false) => panic!("neither plain nor sealed: {}", r.text()),
        };
        shapes[shape] += 1;
    }
    assert_eq!(shapes, [n / 3; 3]);
    assert!(plain.wait_for(n, WAIT).await, "plain got {}", plain.count());
    assert!(json.wait_for(n, WAIT).await, "json got {}", json.count());
    let mut seen: Vec<(String, Option<String>)> = plain
        .received()
        .iter()
        .map(|r| {
            let m = Message::parse(&r.body).unwrap();
            (
                m.msg_type().unwrap().to_owned(),
                m.event().map(str::to_owned),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, expected, "plain");
    let mut seen: Vec<(String, Option<String>)> = json
        .received()
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            (
                v["msg_type"].as_str().unwrap().to_owned(),
                v["event"].as_str().map(str::to_owned),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(seen, expected, "json");
    relay.stop().await;
}

fn reply_xml() -> &'static str {
    "<xml><ToUserName><![CDATA[oSimulatedUser00000000000000]]></ToUserName><FromUserName><![CDATA[gh_000000000000]]></FromUserName><CreateTime>1717000000</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[欢迎!]]></Content></xml>"
}

#[tokio::test]
async fn a_secure_reply_is_verified_and_printed_decrypted() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::body(200, "text/xml", reply_xml()));
    let toml = config(
        &g,
        &[target("broker", &broker.url("/"), "retry = \"login\"")],
        broker_routes(),
    );
    let relay = relay_now(&toml).await;
    let scan = Payload::PushKind(PushKind::Scan {
        scene: "login_1".into(),
    });
    let report = simulate::run(
        &settings(&toml),
        &push(&relay, "secure", scan),
        &SystemClock,
    )
    .await
    .unwrap();
    assert!(report.ok, "{}", report.text);
    assert!(report.text.contains("<Encrypt>"), "{}", report.text);
    assert!(
        report
            .text
            .contains("MsgSignature valid; decrypted with the current key"),
        "{}",
        report.text
    );
    assert!(report.text.contains(reply_xml()), "{}", report.text);
    relay.stop().await;
}

#[tokio::test]
async fn the_url_check_passes_for_a_served_account_only() {
    let g = generated();
    let toml = config(&g, &[], "");
    let relay = relay_now(&toml).await;
    let check = |account: &str| SimulateArgs {
        verify_url: true,
        payload: None,
        ..push(&relay, account, Payload::PushKind(PushKind::Image))
    };
    let report = simulate::run(&settings(&toml), &check("secure"), &SystemClock)
        .await
        .unwrap();
    assert!(report.ok, "{}", report.text);
    assert!(report.text.contains("echostr echoed"), "{}", report.text);

    // An account this config has and the relay does not serve.
    let ghost = format!(
        "{toml}\n[accounts.ghost]\napp_id = \"wx5f3c9a1e7d2b4c60\"\ntoken = \"Relay2024Token\"\nmode = \"plaintext\"\n"
    );
    let report = simulate::run(&settings(&ghost), &check("ghost"), &SystemClock)
        .await
        .unwrap();
    assert!(!report.ok, "{}", report.text);
    assert!(report.text.contains("HTTP 404"), "{}", report.text);
    assert!(report.text.contains("NOT echoed"), "{}", report.text);

    // An account the config does not have is the operator's mistake.
    let err = simulate::run(&settings(&toml), &check("nobody"), &SystemClock)
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::Usage(_)), "{err}");
    relay.stop().await;
}

#[test]
fn keygen_prints_credentials_the_config_and_wechat_accept() {
    let (first, second) = (keygen::run(), keygen::run());
    assert_ne!(first, second);
    assert!(first.contains("基本配置 → 服务器配置"), "{first}");
    // The output pastes into relay.toml as it is, comment line included.
    let toml =
        format!("[accounts.main]\napp_id = \"wx5f3c9a1e7d2b4c60\"\nmode = \"secure\"\n{first}");
    let settings = Settings::from_toml_str(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let main = &settings.accounts["main"];
    let token = main.token.expose();
    assert!((3..=32).contains(&token.len()));
    assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()));
    let key = first
        .lines()
        .find_map(|l| l.strip_prefix("encoding_aes_key = \""))
        .unwrap()
        .trim_end_matches('"');
    assert_eq!(
        main.keys.as_ref().unwrap().current,
        AesKey::from_encoding(key).unwrap()
    );
    let (a, b) = (keygen::generate(), keygen::generate());
    assert_ne!(a.token, b.token);
    assert_ne!(a.encoding_aes_key, b.encoding_aes_key);
}

#[test]
fn route_names_the_rule_the_relay_would_use() {
    let g = generated();
    let targets = [
        target("broker", "http://127.0.0.1:9/", ""),
        target(
            "hooks",
            "http://127.0.0.1:9/",
            &format!("format = \"json\"\nsecret = \"{SECRET}\""),
        ),
    ];
    let catch_all = format!("{}[[routes]]\nto = [\"hooks\"]\n", broker_routes());
    let with_catch_all = settings(&config(&g, &targets, &catch_all));
    let args = |payload| RouteArgs {
        account: Some("secure".into()),
        message: MessageOptions::default(),
        payload,
    };
    let scan = args(Payload::PushKind(PushKind::Scan {
        scene: "login_1".into(),
    }));
    let text = args(Payload::PushKind(PushKind::Text {
        content: "hi".into(),
    }));

    let out = route::run(&with_catch_all, &scan, &SystemClock).unwrap();
    assert!(out.contains("rule      [0] event=subscribe|SCAN"), "{out}");
    assert!(out.contains("target    broker (raw)"), "{out}");
    assert!(out.contains("reply     broker"), "{out}");
    assert!(!out.contains("hooks"), "{out}");
    assert!(!out.contains(DEFAULT_FROM), "no OpenID: {out}");

    let out = route::run(&with_catch_all, &text, &SystemClock).unwrap();
    assert!(out.contains("rule      [1] *"), "{out}");
    assert!(out.contains("target    hooks (json)"), "{out}");
    assert!(out.contains("reply     none"), "{out}");

    let without = settings(&config(&g, &targets, broker_routes()));
    let out = route::run(&without, &text, &SystemClock).unwrap();
    assert!(out.contains("none matches"), "{out}");
    assert!(out.contains("unrouted"), "{out}");

    let no_account = RouteArgs {
        account: None,
        ..text.clone()
    };
    assert!(matches!(
        route::run(&without, &no_account, &SystemClock),
        Err(CliError::Usage(_))
    ));
}

async fn dead_letters(spool: &dyn Operator) -> Vec<wxrelay::spool::DeadLetter> {
    spool
        .dead_letters(DeadFilter::default(), 100)
        .await
        .unwrap()
}

#[tokio::test]
async fn dlq_lists_without_openids_replays_to_a_target_that_is_back_and_purges() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    hooks.set_default(Behaviour::body(400, "text/plain", "unknown user\n"));
    let toml = config(
        &g,
        &[target("hooks", &hooks.url("/"), "")],
        "[[routes]]\nmatch = { event = \"CLICK\" }\nto = [\"hooks\"]\n",
    );
    let relay = relay_now(&toml).await;
    let settings = settings(&toml);
    for payload in [
        Payload::PushKind(PushKind::Click { key: "k".into() }),
        Payload::PushKind(PushKind::Text {
            content: "a secret".into(),
        }),
    ] {
        let report = simulate::run(&settings, &push(&relay, "secure", payload), &SystemClock)
            .await
            .unwrap();
        assert!(report.ok, "{}", report.text);
    }
    let relay_spool = relay.spool.clone();
    assert!(
        common::eventually(WAIT, || {
            let s = relay_spool.clone();
            async move { dead_letters(&*s).await.len() == 2 }
        })
        .await
    );
    let dead = dead_letters(&*relay.spool).await;
    let rejected = dead
        .iter()
        .find(|d| d.reason.as_str() == "rejected")
        .unwrap();

    // The command's own handle on the file, as beside a running relay.
    let spool = SqliteSpool::open(&relay.spool_path).unwrap();
    let now = relay.clock.now_ms();
    let run = |command: DlqCommand| {
        let spool = &spool;
        async move { dlq::run((spool, spool), &command, now).await }
    };
    let list = || DlqCommand::List {
        select: Selection::default(),
        limit: 100,
    };

    let out = run(list()).await.unwrap();
    assert!(out.contains("hooks") && out.contains("rejected"), "{out}");
    assert!(out.contains("HTTP 400: unknown user"), "{out}");
    assert!(
        out.contains("unrouted") && out.contains("event/CLICK"),
        "{out}"
    );
    assert!(out.contains("2 dead letters"), "{out}");
    for d in &dead {
        assert!(out.contains(&short_hash(&d.dedup_key)), "{out}");
        assert!(!out.contains(&d.dedup_key), "{out}");
    }
    assert!(!out.contains(DEFAULT_FROM), "no OpenID: {out}");

    let show = |content| DlqCommand::Show {
        id: rejected.delivery_id.0,
        content,
    };
    let out = run(show(false)).await.unwrap();
    assert!(
        out.contains("EventKey") && out.contains("event/CLICK"),
        "{out}"
    );
    assert!(!out.contains(DEFAULT_FROM), "no OpenID: {out}");
    let out = run(show(true)).await.unwrap();
    assert!(
        out.contains(&format!("<![CDATA[{DEFAULT_FROM}]]>")),
        "{out}"
    );

    let everything = |all| DlqCommand::Replay {
        select: Selection::default(),
        all,
        force: false,
    };
    assert!(matches!(
        run(everything(false)).await,
        Err(CliError::Usage(_))
    ));

    hooks.set_default(Behaviour::status(200));
    let out = run(DlqCommand::Replay {
        select: Selection {
            target: Some("hooks".into()),
            ..Selection::default()
        },
        all: false,
        force: false,
    })
    .await
    .unwrap();
    assert!(out.starts_with("1 delivery is due again"), "{out}");
    assert!(
        hooks.wait_for(2, WAIT).await,
        "the replayed delivery arrives"
    );
    assert!(
        common::eventually(WAIT, || async {
            relay.nothing_pending().await && dead_letters(&spool).await.len() == 1
        })
        .await,
        "delivered, only the unrouted one is left"
    );
    assert_eq!(hooks.received()[1].body, hooks.received()[0].body);

    let out = run(DlqCommand::Replay {
        select: Selection {
            reason: Some(wxrelay::spool::DeadReason::Unrouted),
            ..Selection::default()
        },
        all: false,
        force: false,
    })
    .await
    .unwrap();
    assert!(out.starts_with("no delivery was made due again"), "{out}");
    assert!(out.contains("1 unrouted event cannot be replayed"), "{out}");

    assert!(matches!(
        run(DlqCommand::Purge {
            select: Selection::default(),
            all: false
        })
        .await,
        Err(CliError::Usage(_))
    ));
    let out = run(DlqCommand::Purge {
        select: Selection {
            reason: Some(wxrelay::spool::DeadReason::Unrouted),
            ..Selection::default()
        },
        all: false,
    })
    .await
    .unwrap();
    assert_eq!(out, "1 dead letter deleted\n");
    assert_eq!(run(list()).await.unwrap(), "no dead letters match\n");
    spool.close();
    relay.stop().await;
}

#[test]
fn the_binary_exits_0_on_success_64_on_usage_and_1_on_failure() {
    let g = generated();
    let dir = tempfile::tempdir().unwrap();
    let spool_path = dir.path().join("spool.db");
    SqliteSpool::open(&spool_path).unwrap().close();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\npath = \"{}\"\n\n{}",
            spool_path.display(),
            generated_config(&g)
        ),
    )
    .unwrap();
    let wxrelay = |args: &[&str]| {
        let _environment = common::ENVIRONMENT.blocking_lock();
        let out = Command::new(env!("CARGO_BIN_EXE_wxrelay"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let config = config.to_str().unwrap();

    let (code, out) = wxrelay(&["keygen"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("encoding_aes_key = \""), "{out}");

    let (code, out) = wxrelay(&["dlq", "list", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no dead letters match"), "{out}");

    let (code, out) = wxrelay(&["dlq", "replay", "--config", config]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("--all"), "{out}");

    let missing = dir.path().join("missing.toml");
    let (code, out) = wxrelay(&[
        "simulate",
        "--config",
        missing.to_str().unwrap(),
        "--url",
        "http://127.0.0.1:9",
        "text",
    ]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("invalid configuration"), "{out}");

    let (code, out) = wxrelay(&["simulate", "--config", config, "--bogus"]);
    assert_eq!(code, Some(64), "{out}");

    // Nothing listens there: the push could not be made.
    let nowhere = format!("http://{}", common::free_port());
    let (code, out) = wxrelay(&[
        "simulate",
        "--config",
        config,
        "--account",
        "secure",
        "--url",
        &nowhere,
        "click",
    ]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot reach the relay"), "{out}");
}

#[tokio::test]
async fn the_sink_prints_what_the_relay_delivers_to_it() {
    let g = generated();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let printed = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let seen = printed.clone();
    let show: std::sync::Arc<dyn Fn(String) + Send + Sync> =
        std::sync::Arc::new(move |text| seen.lock().unwrap().push(text));
    let sink = tokio::spawn(wxrelay::cli::sink::serve(listener, show, stopped));

    let toml = config(
        &g,
        &[target(
            "hooks",
            &format!("http://{at}/events"),
            &format!("format = \"json\"\nsecret = \"{SECRET}\""),
        )],
        "[[routes]]\nto = [\"hooks\"]\n",
    );
    let relay = relay_now(&toml).await;
    let follow = Payload::PushKind(PushKind::Subscribe {
        scene: Some("login:42".into()),
    });
    let report = simulate::run(
        &settings(&toml),
        &push(&relay, "secure", follow),
        &SystemClock,
    )
    .await
    .unwrap();
    assert!(report.ok, "{}", report.text);
    let arrived = common::eventually(Duration::from_secs(20), || {
        let printed = printed.clone();
        async move { !printed.lock().unwrap().is_empty() }
    })
    .await;
    assert!(arrived, "the sink got the delivery");
    let text = printed.lock().unwrap()[0].clone();
    assert!(text.starts_with("POST /events\n"), "{text}");
    assert!(text.contains("webhook-signature: v1,"), "{text}");
    assert!(text.contains("qrscene_login:42"), "{text}");
    relay.stop().await;
    let _ = stop.send(true);
    sink.await.unwrap();
}
