//! Durable before 200, with the real binary: pushes are answered while every
//! target is down, the relay is killed with SIGKILL mid-stream, started again
//! and the targets come back. Every push that was answered 200 must reach each
//! target its route names, and no target gets a push its route does not name.

use crate::common;

use common::target::FakeTarget;
use common::wechat::nonce_of;
use common::{free_port, generated, try_send};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use wxrelay::wechat::crypto::AesKey;
use wxrelay::wechat::push::{self, PushParams, Sealing};

const PUSHES: usize = 300;
const KILL_AFTER: usize = 150;

struct Ports {
    public: SocketAddr,
    admin: SocketAddr,
    broker: SocketAddr,
    hooks: SocketAddr,
}

fn write_config(dir: &Path, ports: &Ports, g: &serde_json::Value) -> std::path::PathBuf {
    let c = &g["config"];
    let schedule = vec!["\"300ms\""; 60].join(", ");
    let toml = format!(
        r#"[server]
listen = "{public}"
admin_listen = "{admin}"
shutdown_timeout = "3s"

[spool]
path = "{spool}"

[accounts.main]
app_id = {app_id}
token = {token}
encoding_aes_key = {key}
mode = "secure"

[targets.broker]
url = "http://{broker}/events"
format = "raw"
timeout = "1s"
retry_schedule = [{schedule}]

[targets.hooks]
url = "http://{hooks}/hooks"
format = "plain"
timeout = "1s"
retry_schedule = [{schedule}]

[[routes]]
match = {{ event = ["subscribe", "SCAN"] }}
to = ["broker", "hooks"]

[[routes]]
to = ["hooks"]
"#,
        public = ports.public,
        admin = ports.admin,
        spool = dir.join("spool.db").display(),
        app_id = c["appid"],
        token = c["token"],
        key = c["encoding_aes_key"],
        broker = ports.broker,
        hooks = ports.hooks,
    );
    let path = dir.join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

/// Starts the relay on `config`; `None` if it exits before it is healthy.
async fn start_relay(config: &Path, log: &Path, admin: SocketAddr) -> Option<common::Process> {
    let args = ["serve".as_ref(), "--config".as_ref(), config.as_os_str()];
    common::start_binary(&args, &[], log, admin).await
}

/// One push per index: every third a SCAN (for the broker and the hooks), the
/// rest text messages (hooks only). The nonce identifies it downstream.
fn pushes(g: &serde_json::Value, now: i64) -> Vec<(String, String, bool)> {
    let c = &g["config"];
    let key = AesKey::from_encoding(c["encoding_aes_key"].as_str().unwrap()).unwrap();
    (0..PUSHES)
        .map(|i| {
            let user = format!("oCrashTestUser{i:014}");
            let login = i % 3 == 0;
            let body = if login {
                format!("<Event><![CDATA[SCAN]]></Event><EventKey><![CDATA[login:{i}]]></EventKey><Ticket><![CDATA[t{i}]]></Ticket>")
            } else {
                format!("<Content><![CDATA[message {i}]]></Content><MsgId>{}</MsgId>", 7_000_000_000_000_000_000u64 + i as u64)
            };
            let msg_type = if login { "event" } else { "text" };
            let xml = format!(
                "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName><FromUserName><![CDATA[{user}]]></FromUserName><CreateTime>{now}</CreateTime><MsgType><![CDATA[{msg_type}]]></MsgType>{body}</xml>"
            );
            let nonce = format!("{}", 100_000 + i);
            let p = push::build(
                &xml,
                Sealing::Secure(&key),
                &PushParams {
                    token: c["token"].as_str().unwrap(),
                    app_id: c["appid"].as_str().unwrap(),
                    timestamp: now,
                    nonce: &nonce,
                    openid: Some(&user),
                    random: &[b'r'; 16],
                },
            );
            (format!("/wx/main?{}", p.query), p.body, login)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_push_answered_200_is_lost_across_a_kill_9() {
    let g = generated();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("relay.log");
    // Ports are chosen before the relay binds them; another process may take
    // one meanwhile, so a failed start is tried again with fresh ones.
    let mut tries = 0;
    let (ports, config, first) = loop {
        let ports = Ports {
            public: free_port(),
            admin: free_port(),
            broker: free_port(),
            hooks: free_port(),
        };
        let config = write_config(dir.path(), &ports, &g);
        if let Some(relay) = start_relay(&config, &log, ports.admin).await {
            break (ports, config, relay);
        }
        tries += 1;
        assert!(
            tries < 3,
            "the relay could not start: {}",
            std::fs::read_to_string(&log).unwrap()
        );
    };
    let child = Arc::new(Mutex::new(first));

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let all = pushes(&g, now);
    let queue = Arc::new(Mutex::new(all.clone()));
    let answered = Arc::new(Mutex::new(BTreeSet::new()));
    let ok = Arc::new(AtomicUsize::new(0));

    // The killer: SIGKILL once half the pushes were answered, senders still going.
    let killer = {
        let (ok, child) = (ok.clone(), child.clone());
        tokio::spawn(async move {
            while ok.load(Ordering::SeqCst) < KILL_AFTER {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            child.lock().unwrap().0.kill().unwrap();
            child.lock().unwrap().0.wait().unwrap();
        })
    };
    let senders: Vec<_> = (0..8)
        .map(|_| {
            let (queue, answered, ok) = (queue.clone(), answered.clone(), ok.clone());
            let public = ports.public;
            tokio::spawn(async move {
                loop {
                    let Some((path, body, _)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let result = try_send(public, http::Method::POST, &path, body.into()).await;
                    if let Ok(a) = result {
                        if a.status == 200 && a.text() == "success" {
                            answered.lock().unwrap().insert(nonce_of(&path));
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    killer.await.unwrap();
    let answered = answered.lock().unwrap().clone();
    assert!(
        answered.len() >= KILL_AFTER && answered.len() < PUSHES,
        "answered {}",
        answered.len()
    );

    // Back up: the relay first, then the targets.
    let restarted = start_relay(&config, &log, ports.admin).await;
    *child.lock().unwrap() = restarted.expect("the relay restarts on its own ports");
    let broker = FakeTarget::start_on(ports.broker).await;
    let hooks = FakeTarget::start_on(ports.hooks).await;

    let login: BTreeSet<String> = all.iter().filter(|p| p.2).map(|p| nonce_of(&p.0)).collect();
    let answered_login: BTreeSet<String> = answered.intersection(&login).cloned().collect();
    let nonces = |t: &FakeTarget| -> BTreeSet<String> {
        t.received().iter().map(|r| nonce_of(r.query())).collect()
    };
    let all_there = common::eventually(Duration::from_secs(60), || {
        let ok =
            nonces(&hooks).is_superset(&answered) && nonces(&broker).is_superset(&answered_login);
        async move { ok }
    })
    .await;
    let (to_hooks, to_broker) = (nonces(&hooks), nonces(&broker));
    println!(
        "sent {PUSHES}, answered 200: {} ({} login), delivered: hooks {} of {}, broker {} of {}",
        answered.len(),
        answered_login.len(),
        to_hooks.intersection(&answered).count(),
        answered.len(),
        to_broker.intersection(&answered_login).count(),
        answered_login.len()
    );
    assert!(
        all_there,
        "every push answered 200 was delivered to each of its targets"
    );
    assert!(
        to_broker.is_subset(&login),
        "the broker got only login events"
    );
    let sent: BTreeSet<String> = all.iter().map(|p| nonce_of(&p.0)).collect();
    assert!(to_hooks.is_subset(&sent));

    // A clean stop: SIGTERM drains and exits 0.
    let status = child.lock().unwrap().terminate();
    assert!(status.success(), "graceful stop: {status:?}");
}
