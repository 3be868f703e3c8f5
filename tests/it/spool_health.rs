//! Readiness and pushes follow what the spool's disk really does: a full disk
//! and a spool file removed or replaced under the running relay both turn
//! `/readyz` and every push into 503, with the cause in the log line.

use crate::common;

use common::disk::{fill, Tmpfs};
use common::logs::logs;
use common::{body, config, generated, path, reference_now, vector, TestRelay};
use http::{Method, StatusCode};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use wxrelay::spool::{SpoolError, UnixMs};

fn click(g: &Value) -> (String, Vec<u8>) {
    let v = vector(g, "secure.CLICK");
    (path("secure", &v["request"]), body(&v["request"]))
}

async fn ready(relay: &TestRelay) -> (StatusCode, String) {
    let answer = relay.admin(Method::GET, "/readyz", None).await;
    (answer.status, answer.text())
}

#[tokio::test]
async fn a_full_disk_makes_the_relay_unready_and_refuse_pushes_with_the_cause() {
    let Some(disk) = Tmpfs::mount("2m") else {
        println!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let g = generated();
    let logs = logs();
    let relay = TestRelay::start_with_spool_at(
        &config(&g, &[], ""),
        reference_now(&g),
        &disk.path().join("spool.db"),
    )
    .await;
    assert_eq!(ready(&relay).await.0, 200);

    let filler = disk.path().join("filler");
    fill(&filler);
    let (status, reason) = ready(&relay).await;
    assert_eq!(status, 503, "not ready on a full disk: {reason}");
    assert!(reason.contains("database or disk is full"), "{reason}");
    let (push, push_body) = click(&g);
    let refused = relay.post(&push, push_body.clone()).await;
    assert_eq!(refused.status, 503);
    let log = logs.text();
    assert!(
        log.lines().any(|l| l.contains("push not accepted")
            && l.contains("verdict=\"spool_unavailable\"")
            && l.contains("database or disk is full")),
        "the refusal's log line names the cause:\n{log}"
    );

    std::fs::remove_file(&filler).unwrap();
    assert_eq!(ready(&relay).await, (StatusCode::OK, "ready\n".into()));
    let accepted = relay.post(&push, push_body).await;
    assert_eq!(accepted.status, 200);
    assert_eq!(
        relay.unrouted().await.len(),
        1,
        "stored once space was back"
    );
    relay.stop().await;
}

fn spool_files(relay: &TestRelay) -> Vec<PathBuf> {
    ["spool.db", "spool.db-wal", "spool.db-shm"]
        .iter()
        .map(|f| relay.spool_path.with_file_name(f))
        .collect()
}

async fn assert_refused_as_gone(relay: &TestRelay, g: &Value) {
    let (status, reason) = ready(relay).await;
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains("removed or replaced"), "{reason}");
    let (push, push_body) = click(g);
    let answer = relay.post(&push, push_body).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    // Nor is any work handed out from the lost file.
    let lease = relay
        .opened
        .work()
        .lease("hooks", UnixMs(0), 1, Duration::from_secs(1))
        .await;
    assert!(matches!(lease, Err(SpoolError::Gone(_))), "{lease:?}");
}

#[tokio::test]
async fn a_deleted_spool_file_makes_the_relay_unready_and_refuse_pushes() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    assert_eq!(ready(&relay).await.0, 200);
    for file in spool_files(&relay) {
        std::fs::remove_file(file).unwrap();
    }
    assert_refused_as_gone(&relay, &g).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_replaced_spool_file_makes_the_relay_unready_and_refuse_pushes() {
    let g = generated();
    let relay = TestRelay::start(&config(&g, &[], ""), reference_now(&g)).await;
    assert_eq!(ready(&relay).await.0, 200);
    let db = relay.spool_path.clone();
    let copy = db.with_file_name("restored.db");
    std::fs::copy(&db, &copy).unwrap();
    std::fs::rename(&copy, &db).unwrap();
    assert_refused_as_gone(&relay, &g).await;
    relay.stop().await;
}
