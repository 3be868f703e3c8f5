//! The event trail through the real relay: pushes over HTTP, a fake target
//! that fails once and then takes the event, the trail read back through
//! the admin API and the `wxrelay trail` binary, refusals capped per
//! account, and nothing secret or personal in any of it.

use crate::common;

use common::target::{Behaviour, FakeTarget};
use common::{config, eventually, generated, metric, push_as_wechat, reference_now, target};
use common::{wxrelay, TestRelay};
use http::Method;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
const OPENID: &str = "oTrailUserOpenId0123456789ab";
const SCENE: &str = "qrscene_login_77";
const TRAIL_KEY: &str = "the trail key of the integration tests";

fn scan(now: i64) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_relay]]></ToUserName><FromUserName><![CDATA[{OPENID}]]></FromUserName>\
         <CreateTime>{now}</CreateTime><MsgType><![CDATA[event]]></MsgType><Event><![CDATA[SCAN]]></Event>\
         <EventKey><![CDATA[{SCENE}]]></EventKey><Ticket><![CDATA[gQTicket77]]></Ticket></xml>"
    )
}

/// The relay's configuration, its spool at `spool` so that the binary
/// reads the same file; `trail` is the `[trail]` section.
fn relay_config(g: &Value, hooks: &FakeTarget, spool: &Path, trail: &str) -> String {
    let spool = format!("path = \"{}\"", spool.display());
    config_on(g, hooks, &spool, trail)
}

/// As [`relay_config`], with `spool` the `[spool]` section's keys.
fn config_on(g: &Value, hooks: &FakeTarget, spool: &str, trail: &str) -> String {
    let targets = [target(
        "hooks",
        &hooks.url("/hooks"),
        "retry_schedule = [\"1s\"]",
    )];
    format!(
        "[spool]\n{spool}\n\n{}\n{trail}\n",
        config(g, &targets, "[[routes]]\nto = [\"hooks\"]\n")
    )
}

/// The trail as the admin API answers `query`.
async fn admin_trail(relay: &TestRelay, query: &str) -> Vec<Value> {
    let answer = relay
        .admin(Method::GET, &format!("/admin/trail?{query}"), None)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    serde_json::from_str(&answer.text()).unwrap()
}

/// Every row of the trail's tables, as SQLite quotes them.
fn trail_tables(spool: &Path) -> String {
    let c = rusqlite::Connection::open(spool).unwrap();
    let mut dump = String::new();
    for table in ["trail_events", "trail_steps", "trail_bodies", "trail_key"] {
        let columns: Vec<String> = c
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let quoted: Vec<String> = columns.iter().map(|c| format!("quote({c})")).collect();
        let select = format!("SELECT {} FROM {table}", quoted.join(" || ' ' || "));
        let rows: Vec<String> = c
            .prepare(&select)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        dump.push_str(&rows.join("\n"));
        dump.push('\n');
    }
    dump
}

/// The secrets and the personal data none of the trail's output may hold.
fn assert_nothing_secret(g: &Value, what: &str, text: &str, ciphertext: &str) {
    let c = &g["config"];
    for (name, secret) in [
        ("the OpenID", OPENID),
        ("the Token", c["token"].as_str().unwrap()),
        (
            "the EncodingAESKey",
            c["encoding_aes_key"].as_str().unwrap(),
        ),
        ("the trail key", TRAIL_KEY),
        ("the ciphertext", ciphertext),
    ] {
        assert!(!text.contains(secret), "{what} holds {name}:\n{text}");
    }
}

/// The `Encrypt` of a secure push's body.
fn ciphertext(body: &[u8]) -> String {
    let body = String::from_utf8_lossy(body);
    let start = body.find("<Encrypt><![CDATA[").unwrap() + "<Encrypt><![CDATA[".len();
    let end = body[start..].find("]]>").unwrap();
    body[start..start + end].to_owned()
}

/// A push that fails once at the hooks and is then delivered, and WeChat's
/// retry of it: its ciphertext, and the sender's trail as the admin API
/// answers, the duplicate first. Checks what the trail says of both.
async fn failed_then_delivered(
    relay: &TestRelay,
    g: &Value,
    hooks: &FakeTarget,
) -> (String, Vec<Value>) {
    hooks.script([Behaviour::body(503, "text/plain", "busy\r\n\u{1b}[31m")]);
    let cipher = send_scan(relay, g, "1").await;
    // WeChat's retry: a new nonce, the same message.
    send_scan(relay, g, "2").await;
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_attempts("hooks", 1).await);
    relay.clock.advance_ms(2_000);
    assert!(hooks.wait_for(2, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);

    let query = format!("openid={OPENID}");
    let settled = eventually(WAIT, || async {
        let found = admin_trail(relay, &query).await;
        found.len() == 2 && found[1]["outcome"] == "delivered" && found[1]["reply"].is_object()
    })
    .await;
    let found = admin_trail(relay, &query).await;
    assert!(settled, "{found:#?}");
    let (duplicate, push) = (&found[0], &found[1]);
    assert_eq!(duplicate["dedup"], "duplicate");
    assert_eq!(duplicate["outcome"], "delivered");
    assert_eq!(push["dedup"], "new");
    assert_eq!(push["mode"], "secure");
    assert_eq!(push["event"], "SCAN");
    assert_eq!(push["scene"], SCENE);
    assert_eq!(push["ticket"], true);
    assert_eq!(push["openid"], "oTra…89ab");
    assert_eq!(push["route"], serde_json::json!(["hooks"]));
    assert_eq!(push["reply"]["outcome"], "none");
    assert_eq!(push["reply"]["budget_ms"], 1_000);
    let attempts = push["attempts"].as_array().unwrap();
    let statuses: Vec<&Value> = attempts.iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, [&Value::from(503), &Value::from(200)]);
    assert_eq!(attempts[0]["attempt"], 1);
    assert_eq!(attempts[1]["attempt"], 2);
    assert_eq!(attempts[0]["circuit"], "closed");
    assert_eq!(attempts[0]["response"], "busy\\r\\n\\u{1b}[31m");
    assert_eq!(push["ends"][0]["end"], "delivered");
    (cipher, found)
}

#[tokio::test]
async fn a_push_its_failed_and_delivered_attempts_and_its_duplicate_are_found_by_openid() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let trail = format!("[trail]\nkey = \"{TRAIL_KEY}\"");
    let toml = relay_config(&g, &hooks, &spool, &trail);
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &spool).await;
    let (cipher, found) = failed_then_delivered(&relay, &g, &hooks).await;
    let push = &found[1];

    let event_id = push["event_id"].as_i64().unwrap();
    let one = relay
        .admin(Method::GET, &format!("/admin/trail/{event_id}"), None)
        .await;
    assert_eq!(one.status, 200, "{}", one.text());
    let one: Value = serde_json::from_str(&one.text()).unwrap();
    assert_eq!(one, *push);
    let missing = relay.admin(Method::GET, "/admin/trail/999999", None).await;
    assert_eq!(missing.status, 404);
    let bad = relay
        .admin(Method::GET, "/admin/trail?since=yesterday", None)
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("since"), "{}", bad.text());

    let config = dir.path().join("cli.toml");
    std::fs::write(&config, &toml).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = vec!["trail".into(), "--config".into(), config.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let (code, human) = wxrelay(args(&["--openid", OPENID])).await;
    assert_eq!(code, Some(0), "{human}");
    assert!(human.contains(&format!("event {event_id}")), "{human}");
    assert!(
        human.contains("hooks  attempt 1 worker  HTTP 503"),
        "{human}"
    );
    assert!(human.contains("hooks  delivered"), "{human}");
    assert!(human.contains("duplicate"), "{human}");
    let (code, json) = wxrelay(args(&["--scene", SCENE, "--json", "--limit", "1"])).await;
    assert_eq!(code, Some(0), "{json}");
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{json}");
    assert_eq!(lines[0]["dedup"], "duplicate", "newest first");
    let (code, json) = wxrelay(args(&["--event-id", &event_id.to_string(), "--json"])).await;
    assert_eq!(code, Some(0), "{json}");
    let line: Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(line, *push);
    let (code, out) = wxrelay(args(&["--outcome", "lost"])).await;
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("--outcome"), "{out}");

    let sent = relay
        .opened
        .operator()
        .event(wxrelay::spool::EventId(event_id))
        .await
        .unwrap();
    assert!(sent.is_none(), "a delivered event has left the queue");
    for (what, text) in [
        ("the admin JSON", serde_json::to_string(&found).unwrap()),
        ("the human output", human),
        ("the JSON lines", json),
        ("the trail's tables", trail_tables(&spool)),
    ] {
        assert_nothing_secret(&g, what, &text, &cipher);
    }
    relay.stop().await;
}

/// The scan, sealed as WeChat seals it for the secure account and sent
/// with `nonce`; its ciphertext.
async fn send_scan(relay: &TestRelay, g: &Value, nonce: &str) -> String {
    let now = wxrelay::clock::Clock::now_secs(&*relay.clock);
    let c = &g["config"];
    let key =
        wxrelay::wechat::crypto::AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap())
            .unwrap();
    let push = wxrelay::wechat::push::build(
        &scan(now),
        wxrelay::wechat::push::Sealing::Secure(&key),
        &wxrelay::wechat::push::PushParams {
            token: c["token"].as_str().unwrap(),
            app_id: c["appid"].as_str().unwrap(),
            timestamp: now,
            nonce,
            openid: Some(OPENID),
            random: &[7; 16],
        },
    );
    let answer = relay
        .post(&format!("/wx/secure?{}", push.query), push.body.clone())
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "success");
    ciphertext(push.body.as_bytes())
}

#[tokio::test]
async fn a_flood_of_refused_pushes_is_capped_per_account_and_counted() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let toml = relay_config(&g, &hooks, &spool, "");
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &spool).await;
    let forged = "/wx/secure?signature=0&timestamp=1&nonce=2&encrypt_type=aes&msg_signature=0";
    for _ in 0..70 {
        let answer = relay.post(forged, "<xml><Encrypt>x</Encrypt></xml>").await;
        assert!(answer.status.is_client_error(), "{}", answer.status);
    }
    let dropped = |text: &str| {
        metric(
            text,
            "wxrelay_trail_refusals_dropped_total",
            &[("account", "secure")],
        )
    };
    assert_eq!(dropped(&relay.metrics().await), 20.0);
    let query = "outcome=refused&limit=1000";
    let written = eventually(WAIT, || async {
        admin_trail(&relay, query).await.len() == 50
    })
    .await;
    let refused = admin_trail(&relay, query).await;
    assert!(written, "{} refusals written", refused.len());
    let reasons: std::collections::BTreeSet<&str> = refused
        .iter()
        .map(|e| e["refusal"]["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert_eq!(refused[0]["refusal"]["source"], "127.0.0.1");
    assert_eq!(refused[0]["account"], "secure");
    assert_eq!(refused[0]["outcome"], "refused");
    relay.stop().await;
}

#[tokio::test]
async fn with_the_trail_off_nothing_is_written_and_the_search_says_so() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let toml = relay_config(&g, &hooks, &spool, "[trail]\nenabled = false");
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &spool).await;
    push_as_wechat(&relay, &g, "secure", &scan(reference_now(&g)), OPENID).await;
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    let answer = relay.admin(Method::GET, "/admin/trail", None).await;
    assert_eq!(answer.status, 404, "{}", answer.text());
    assert!(answer.text().contains("off"), "{}", answer.text());
    let c = rusqlite::Connection::open(&spool).unwrap();
    for table in ["trail_events", "trail_steps", "trail_key"] {
        let n: i64 = c
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    relay.stop().await;
}

/// Every row of the trail's tables in the relay's PostgreSQL schema, as text.
async fn postgres_trail_tables(relay: &TestRelay) -> String {
    let schema = relay.schema.as_ref().unwrap();
    let url = wxrelay::spool::postgres::testing::test_url().unwrap();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut dump = String::new();
    for table in ["trail_events", "trail_steps", "trail_bodies", "trail_key"] {
        let sql = format!(
            "SELECT t::text FROM \"{}\".{table} t",
            schema.settings.schema
        );
        for row in client.query(&sql, &[]).await.unwrap() {
            dump.push_str(row.get::<_, &str>(0));
            dump.push('\n');
        }
    }
    dump
}

#[tokio::test]
async fn on_postgres_a_push_its_attempts_and_its_duplicate_are_in_the_shared_trail() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    // No configured key: the spool makes one and keeps it in the database.
    let toml = config_on(&g, &hooks, "", "");
    let Some(relay) = TestRelay::start_postgres(&toml, reference_now(&g)).await else {
        return;
    };
    let (cipher, found) = failed_then_delivered(&relay, &g, &hooks).await;
    let dump = postgres_trail_tables(&relay).await;
    assert!(dump.contains("oTra…89ab"), "{dump}");
    for (what, text) in [
        ("the admin JSON", serde_json::to_string(&found).unwrap()),
        ("the trail's tables", dump),
    ] {
        assert_nothing_secret(&g, what, &text, &cipher);
    }
    relay.stop().await;
}

#[tokio::test]
async fn a_delivered_event_is_redelivered_from_the_command_line_when_its_body_was_kept() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let toml = relay_config(&g, &hooks, &spool, "[trail]\nkeep_bodies = true");
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &spool).await;
    send_scan(&relay, &g, "1").await;
    assert!(hooks.wait_for(1, WAIT).await);
    assert!(relay.until_nothing_pending("hooks").await);
    let found = admin_trail(&relay, "outcome=delivered").await;
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0]["body_kept"], true);
    let event_id = found[0]["event_id"].as_i64().unwrap().to_string();
    let config = dir.path().join("cli.toml");
    std::fs::write(&config, &toml).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let redeliver = |target: &str| {
        let args = [
            "trail",
            "redeliver",
            "--config",
            &config,
            &event_id,
            "--target",
            target,
        ];
        wxrelay(args.iter().map(|a| a.to_string()).collect())
    };
    let (code, out) = redeliver("nowhere").await;
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("no target \"nowhere\""), "{out}");
    let (code, out) = redeliver("hooks").await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("due again at hooks"), "{out}");
    // The relay's workers find it in the spool the command wrote to, due
    // at the command's clock.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    relay.clock.set_secs(now.as_secs() as i64 + 1);
    assert!(hooks.wait_for(2, WAIT).await, "redelivered");
    assert_eq!(hooks.received()[1].body, hooks.received()[0].body);
    relay.stop().await;

    let toml = relay_config(&g, &hooks, &spool, "");
    let config = dir.path().join("without.toml");
    std::fs::write(&config, &toml).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let other = fresh.path().join("spool.db");
    let toml = relay_config(&g, &hooks, &other, "");
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &other).await;
    send_scan(&relay, &g, "1").await;
    assert!(relay.until_nothing_pending("hooks").await);
    let found = admin_trail(&relay, "outcome=delivered").await;
    let event_id = found[0]["event_id"].as_i64().unwrap().to_string();
    let config = fresh.path().join("cli.toml");
    std::fs::write(&config, &toml).unwrap();
    let args = [
        "trail",
        "redeliver",
        "--config",
        config.to_str().unwrap(),
        &event_id,
        "--target",
        "hooks",
    ];
    let (code, out) = wxrelay(args.iter().map(|a| a.to_string()).collect()).await;
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("body was not kept"), "{out}");
    relay.stop().await;
}

#[tokio::test]
async fn an_inline_reply_attempt_that_times_out_is_in_the_trail_with_the_reply() {
    let g = generated();
    let broker = FakeTarget::start().await;
    broker.set_default(Behaviour::After(
        Duration::from_secs(3),
        Box::new(Behaviour::status(200)),
    ));
    let targets = [target("broker", &broker.url("/broker"), "")];
    let routes = "[[routes]]\nto = [\"broker\"]\nreply_from = \"broker\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    send_scan(&relay, &g, "1").await;
    let query = format!("openid={OPENID}");
    let replied = eventually(WAIT, || async {
        let found = admin_trail(&relay, &query).await;
        found.len() == 1
            && found[0]["reply"].is_object()
            && !found[0]["attempts"].as_array().unwrap().is_empty()
    })
    .await;
    let found = admin_trail(&relay, &query).await;
    assert!(replied, "{found:#?}");
    let push = &found[0];
    assert_eq!(push["reply"]["outcome"], "timed_out");
    assert_eq!(push["reply"]["budget_ms"], 1_000);
    assert!(
        push["reply"]["latency_ms"].as_u64().unwrap() < 2_000,
        "{push:#}"
    );
    let attempt = &push["attempts"][0];
    assert_eq!(attempt["inline"], true);
    assert_eq!(attempt["error"], "timeout");
    assert_eq!(attempt["status"], Value::Null);
    assert_eq!(push["outcome"], "pending");
    relay.stop().await;
}

/// A reply target that cannot be reached inside the budget: the trail says
/// the reply failed, not that there was none to wait for.
#[tokio::test]
async fn an_unreachable_reply_target_is_a_failed_reply_in_the_trail() {
    let g = generated();
    let nowhere = common::free_port();
    let targets = [target(
        "broker",
        &format!("http://{nowhere}/broker"),
        "retry_schedule = [\"1h\"]",
    )];
    let routes = "[[routes]]\nto = [\"broker\"]\nreply_from = \"broker\"\n";
    let relay = TestRelay::start(&config(&g, &targets, routes), reference_now(&g)).await;
    send_scan(&relay, &g, "1").await;
    let query = format!("openid={OPENID}");
    let replied = eventually(WAIT, || async {
        let found = admin_trail(&relay, &query).await;
        found.len() == 1 && found[0]["reply"].is_object()
    })
    .await;
    let found = admin_trail(&relay, &query).await;
    assert!(replied, "{found:#?}");
    let push = &found[0];
    assert_eq!(push["reply"]["outcome"], "failed", "{push:#}");
    assert!(
        push["reply"]["latency_ms"].as_u64().unwrap() < 1_000,
        "{push:#}"
    );
    let attempt = &push["attempts"][0];
    assert_eq!(attempt["inline"], true);
    assert_eq!(attempt["status"], Value::Null);
    relay.stop().await;
}

/// The trail's store is opened at the start only: a reload that turns it
/// on is refused and says a restart is needed.
#[tokio::test]
async fn a_reload_that_turns_the_trail_on_is_refused_until_a_restart() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let off = relay_config(&g, &hooks, &spool, "[trail]\nenabled = false\n");
    let relay = TestRelay::start(&off, reference_now(&g)).await;
    let on = relay_config(&g, &hooks, &spool, "[trail]\nenabled = true\n");
    std::fs::write(relay.config_path(), on).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 422, "{}", answer.text());
    assert!(
        answer.text().contains("[trail] enabled"),
        "{}",
        answer.text()
    );
    assert!(answer.text().contains("restart"), "{}", answer.text());
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_config_reloads_total", &[("result", "failed")]),
        1.0
    );
    relay.stop().await;
}

/// The trail's store keeps the settings it was opened with: a reload that
/// changes them is taken, and its answer says which of them wait for a
/// restart, rather than leaving the operator to believe they apply.
#[tokio::test]
async fn a_reload_says_which_trail_settings_wait_for_a_restart() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let before = relay_config(&g, &hooks, &spool, "[trail]\nmax_events = 1000\n");
    let relay = TestRelay::start(&before, reference_now(&g)).await;
    let same = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(same.status, 200, "{}", same.text());
    assert_eq!(same.text(), "reloaded\n", "nothing changed, nothing to say");
    let after = relay_config(
        &g,
        &hooks,
        &spool,
        "[trail]\nmax_events = 2000\nretain = \"1d\"\n",
    );
    std::fs::write(relay.config_path(), after).unwrap();
    let answer = relay.admin(Method::POST, "/admin/reload", None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let text = answer.text();
    for key in ["[trail]", "retain", "max_events", "next start"] {
        assert!(text.contains(key), "{key}: {text}");
    }
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "wxrelay_config_reloads_total", &[("result", "ok")]),
        2.0
    );
    relay.stop().await;
}

/// A search without an indexed field reads the newest `search_rows` rows
/// only, and both the admin API and the command line say when that cut it
/// short; by OpenID it reaches every row.
#[tokio::test]
async fn a_search_cut_short_by_search_rows_says_so() {
    let g = generated();
    let hooks = FakeTarget::start().await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool.db");
    let trail = format!("[trail]\nkey = \"{TRAIL_KEY}\"\nsearch_rows = 2");
    let toml = relay_config(&g, &hooks, &spool, &trail);
    let relay = TestRelay::start_with_spool_at(&toml, reference_now(&g), &spool).await;
    for nonce in ["1", "2", "3"] {
        send_scan(&relay, &g, nonce).await;
    }
    let query = format!("openid={OPENID}");
    let written = eventually(WAIT, || async {
        admin_trail(&relay, &query).await.len() == 2
    })
    .await;
    assert!(written, "the OpenID's rows are read up to the cap");

    let by_scene = format!("/admin/trail?scene={SCENE}");
    let capped = relay.admin(Method::GET, &by_scene, None).await;
    assert_eq!(capped.status, 200, "{}", capped.text());
    let found: Vec<Value> = serde_json::from_str(&capped.text()).unwrap();
    assert_eq!(found.len(), 2, "the newest two rows only");
    let note = capped.headers["wxrelay-search-cut-short"].to_str().unwrap();
    assert!(note.contains("newest 2 trail rows"), "{note}");
    let whole = relay
        .admin(Method::GET, &format!("{by_scene}&limit=2"), None)
        .await;
    assert!(whole.headers.get("wxrelay-search-cut-short").is_none());

    let config = dir.path().join("cli.toml");
    std::fs::write(&config, &toml).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args = vec![
        "trail".into(),
        "--config".into(),
        config,
        "--scene".into(),
        SCENE.into(),
    ];
    let (code, out) = wxrelay(args).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("note: the search read the newest 2 trail rows"),
        "{out}"
    );
    relay.stop().await;
}
