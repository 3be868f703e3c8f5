//! A spool task that fails is loud: a panic injected into the writer of each
//! engine turns every push and `/readyz` into 503 with the reason, logs an
//! ERROR line, and stops the relay with the failure: in process, `Relay::run`
//! returns it; the real binary exits with status 70 for its supervisor to
//! start it again.

use crate::common;

use common::logs::logs;
use common::{body, config, free_port, generated, path, reference_now, vector, TestRelay};
use http::Method;
use serde_json::Value;
use std::time::Duration;
use wxrelay::app::Failure;

fn click(g: &Value) -> (String, Vec<u8>) {
    let v = vector(g, "secure.CLICK");
    (path("secure", &v["request"]), body(&v["request"]))
}

/// What the relay on `engine` does once its writer panics at the next push.
async fn a_failed_writer_stops_the_relay(mut relay: TestRelay, engine: &str) {
    let g = generated();
    let logs = logs();
    let ready = relay.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, 200, "{engine}");
    relay.opened.supervision().fail_writer_at_next_push();
    let (push, push_body) = click(&g);
    let refused = relay.post(&push, push_body.clone()).await;
    assert_eq!(refused.status, 503, "{engine}: {}", refused.text());

    let running = relay.relay.take().unwrap();
    let failed = tokio::time::timeout(Duration::from_secs(10), running.failed())
        .await
        .unwrap_or_else(|_| panic!("{engine}: no failure seen"));
    let reason = format!("the {engine} writer panicked: injected failure of the spool writer");
    assert_eq!(&*failed, reason);
    let ready = relay.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, 503, "{engine}");
    assert!(ready.text().contains(&reason), "{}", ready.text());
    let again = relay.post(&push, push_body).await;
    assert_eq!(again.status, 503, "{engine}: {}", again.text());
    let log = logs.text();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("a spool task failed")
            && l.contains(&reason)),
        "{engine}: the ERROR line:\n{log}"
    );

    // Nothing but the failure stops it: `run` ends on its own, with it.
    let ended = tokio::time::timeout(Duration::from_secs(30), running.run(std::future::pending()))
        .await
        .unwrap_or_else(|_| panic!("{engine}: the relay kept running"));
    assert!(
        matches!(&ended, Err(Failure::Spool(r)) if **r == *reason),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_sqlite_writer_stops_the_relay_with_503s_on_the_way() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    a_failed_writer_stops_the_relay(relay, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_postgres_writer_stops_the_relay_with_503s_on_the_way() {
    let g = generated();
    let Some(relay) = TestRelay::start_postgres(&config(&g, &[], ""), reference_now(&g)).await
    else {
        return;
    };
    a_failed_writer_stops_the_relay(relay, "postgres").await;
}

/// The real binary: its writer fails at the first push, and it exits 70.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_70_when_its_spool_writer_fails() {
    let g = generated();
    let c = &g["config"];
    let dir = tempfile::tempdir().unwrap();
    let (log, config) = (dir.path().join("relay.log"), dir.path().join("relay.toml"));
    let fail = [(wxrelay::spool::FAIL_WRITER_VAR, "1")];
    let mut tries = 0;
    let (mut child, public) = loop {
        let (public, admin) = (free_port(), free_port());
        let toml = format!(
            "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\n\n[spool]\npath = \"{}\"\n\n\
             [accounts.secure]\napp_id = {}\ntoken = {}\nencoding_aes_key = {}\nmode = \"secure\"\ntimestamp_window = \"0s\"\n",
            dir.path().join("spool.db").display(),
            c["appid"],
            c["token"],
            c["encoding_aes_key"]
        );
        std::fs::write(&config, toml).unwrap();
        let args = ["serve".as_ref(), "--config".as_ref(), config.as_os_str()];
        if let Some(child) = common::start_binary(&args, &fail, &log, admin).await {
            break (child, public);
        }
        tries += 1;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(tries < 3, "the relay could not start: {text}");
    };
    let (push, push_body) = click(&g);
    let answer = common::try_send(public, Method::POST, &push, push_body.into()).await;
    assert_eq!(answer.map(|a| a.status.as_u16()), Ok(503));
    let exited = tokio::task::spawn_blocking(move || child.0.wait());
    let status = tokio::time::timeout(Duration::from_secs(30), exited)
        .await
        .expect("the relay kept running")
        .unwrap()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(70), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("ERROR") && l.contains("the sqlite writer panicked")),
        "{text}"
    );
}
