//! The database going away under a stream of pushes, with the real binary:
//! every connection between the relay and PostgreSQL is cut (a proxy drops
//! them and refuses new ones), as a crash or a failover to a standby would,
//! and restored a few seconds later. While it is down the relay answers 503
//! (never 200 for a push it could not commit) and `/readyz` answers 503; it
//! recovers without a restart, and every push it answered 200 is delivered.

use crate::common;
use crate::harness;

use common::database::Database;
use common::proxy::{self, CutProxy};
use common::replicas::Replicas;
use common::target::FakeTarget;
use common::wechat::nonce_of;
use http::{Method, StatusCode};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn config(public: SocketAddr, admin: SocketAddr, spool: &str, hooks: &str) -> String {
    let schedule =
        r#"retry_schedule = ["300ms", "300ms", "300ms", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]"#;
    format!(
        "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\nreply_budget = \"2s\"\n\
         shutdown_timeout = \"3s\"\n\n[spool]\n{spool}\n{}\n{}\n[[routes]]\nto = [\"hooks\"]\n",
        harness::account(),
        common::target("hooks", hooks, &format!("format = \"plain\"\n{schedule}")),
    )
}

async fn readyz(admin: SocketAddr) -> Option<StatusCode> {
    let answer = common::try_send(admin, Method::GET, "/readyz", bytes::Bytes::new()).await;
    answer.ok().map(|a| a.status)
}

#[derive(Default)]
struct Counts {
    ok: BTreeSet<String>,
    unavailable: usize,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_503_and_loses_nothing_answered() {
    const PER_SECOND: f64 = 100.0;
    const SENDERS: usize = 4;
    // The outage: from push CUT_AT until the relay was seen refusing for
    // this long.
    const CUT_AT: usize = 200;
    const DOWN_FOR: Duration = Duration::from_secs(3);
    // Pushes sent after the database came back.
    const AFTER: usize = 200;

    let Some(database) = Database::create() else {
        return;
    };
    let proxy = CutProxy::start(proxy::upstream(database.url.as_str())).await;
    let hooks = FakeTarget::start().await;
    let (spool, hooks_url) = (
        database.spool_toml_at(&proxy.url_through(database.url.as_str())),
        hooks.url("/hooks"),
    );
    let replicas = Replicas::start(
        1,
        &[],
        Box::new(move |public, admin| config(public, admin, &spool, &hooks_url)),
    )
    .await;
    let (public, admin) = (replicas.replica(0).public, replicas.replica(0).admin);

    let key = Arc::new(harness::key());
    let now = harness::unix_now();
    let next = Arc::new(AtomicUsize::new(0));
    let stop_at = Arc::new(AtomicUsize::new(usize::MAX));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let start = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (key, next, stop_at, counts) =
                (key.clone(), next.clone(), stop_at.clone(), counts.clone());
            tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    if k >= stop_at.load(Ordering::SeqCst) {
                        break;
                    }
                    let push = harness::push(k as u64, now, &key);
                    let due = start + Duration::from_secs_f64(k as f64 / PER_SECOND);
                    tokio::time::sleep_until(due.into()).await;
                    let answer =
                        common::try_send(public, Method::POST, &push.path, push.body).await;
                    let mut counts = counts.lock().unwrap();
                    match answer {
                        Ok(a) if a.status == 200 => {
                            counts.ok.insert(nonce_of(&push.path));
                        }
                        Ok(a) if a.status == 503 => counts.unavailable += 1,
                        Ok(a) => counts.other.push(format!("{} {}", a.status, a.text())),
                        Err(e) => counts.other.push(e),
                    }
                }
            })
        })
        .collect();
    let sent_at_least = |n| common::until_reached(&next, n);

    sent_at_least(CUT_AT).await;
    assert_eq!(
        readyz(admin).await,
        Some(StatusCode::OK),
        "ready before the cut"
    );
    proxy.cut();
    let cut_at = Instant::now();
    let refused = common::eventually(Duration::from_secs(10), || {
        let counts = counts.clone();
        async move { counts.lock().unwrap().unavailable > 0 }
    })
    .await;
    assert!(
        refused,
        "pushes are answered 503 while the database is away"
    );
    let not_ready = common::eventually(Duration::from_secs(10), || async {
        readyz(admin).await == Some(StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
    assert!(not_ready, "/readyz answers 503 while the database is away");
    tokio::time::sleep_until((cut_at + DOWN_FOR).into()).await;
    let answered_while_down = counts.lock().unwrap().ok.len();
    proxy.restore();
    let restored_at = Instant::now();

    let ready = common::eventually(Duration::from_secs(15), || async {
        readyz(admin).await == Some(StatusCode::OK)
    })
    .await;
    let recovered_in = restored_at.elapsed();
    stop_at.store(next.load(Ordering::SeqCst) + AFTER, Ordering::SeqCst);
    for s in senders {
        s.await.unwrap();
    }
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    let sent = next
        .load(Ordering::SeqCst)
        .min(stop_at.load(Ordering::SeqCst));

    let delivered = || -> BTreeSet<String> {
        hooks
            .received()
            .iter()
            .map(|r| nonce_of(r.query()))
            .collect()
    };
    let all_there = common::eventually(Duration::from_secs(30), || {
        let ok = delivered().is_superset(&counts.ok);
        async move { ok }
    })
    .await;
    println!(
        "sent {sent}: answered 200 {}, 503 {}, other {} ({:?}); \
         ready again {recovered_in:?} after the database came back; delivered {} of the {} answered 200",
        counts.ok.len(),
        counts.unavailable,
        counts.other.len(),
        counts.other.iter().take(3).collect::<Vec<_>>(),
        delivered().intersection(&counts.ok).count(),
        counts.ok.len(),
    );
    assert!(ready, "/readyz answers 200 again without a restart");
    assert!(
        all_there,
        "every push answered 200 was delivered, those around the cut included"
    );
    assert!(
        counts.ok.len() >= answered_while_down + AFTER * 9 / 10,
        "pushes are answered 200 again after the database came back: {} then {}",
        answered_while_down,
        counts.ok.len()
    );
    assert!(
        counts.other.is_empty(),
        "only 200 or 503: {:?}",
        counts.other
    );
}

/// A replica started while the database cannot be reached (the proxy
/// refuses every connection) stays up: `/healthz` answers 200, `/readyz` 503
/// with the reason, pushes 503, and it tries again, waiting longer each
/// time. Once the database answers it checks the schema and becomes ready
/// by itself, and takes pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_the_database_is_down_waits_for_it() {
    let Some(database) = Database::create() else {
        return;
    };
    let proxy = CutProxy::start(proxy::upstream(database.url.as_str())).await;
    proxy.cut();
    let hooks = FakeTarget::start().await;
    let (spool, hooks_url) = (
        database.spool_toml_at(&proxy.url_through(database.url.as_str())),
        hooks.url("/hooks"),
    );
    // Up means /healthz answers: the relay that gave up did not get there.
    let replicas = Replicas::start(
        1,
        &[],
        Box::new(move |public, admin| config(public, admin, &spool, &hooks_url)),
    )
    .await;
    let (public, admin) = (replicas.replica(0).public, replicas.replica(0).admin);

    let ready = common::try_send(admin, Method::GET, "/readyz", bytes::Bytes::new()).await;
    let ready = ready.unwrap();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.text().contains("waiting for the database"),
        "{}",
        ready.text()
    );
    let (key, now) = (harness::key(), harness::unix_now());
    let push = harness::push(1, now, &key);
    let refused = common::try_send(public, Method::POST, &push.path, push.body.clone()).await;
    assert_eq!(
        refused.unwrap().status,
        503,
        "a push is refused, not stored"
    );
    // It keeps trying, past the first few seconds.
    let attempts = |log: &str| log.matches("still waiting for the database").count();
    let retried = common::eventually(Duration::from_secs(30), || {
        let log = replicas.log(0);
        async move { attempts(&log) >= 4 }
    })
    .await;
    assert!(retried, "{}", replicas.log(0));
    let health = common::try_send(admin, Method::GET, "/healthz", bytes::Bytes::new()).await;
    assert_eq!(health.unwrap().status, StatusCode::OK, "still up");

    proxy.restore();
    let became_ready = common::eventually(Duration::from_secs(30), || async {
        readyz(admin).await == Some(StatusCode::OK)
    })
    .await;
    assert!(became_ready, "{}", replicas.log(0));
    // The trail, whose key is kept in the database, starts once it answers.
    let trail_on = common::eventually(Duration::from_secs(20), || {
        let log = replicas.log(0);
        async move { log.contains("the trail's key is read") }
    });
    assert!(trail_on.await, "{}", replicas.log(0));
    let stored = common::try_send(public, Method::POST, &push.path, push.body).await;
    assert_eq!(stored.unwrap().status, 200);
    assert!(
        hooks.wait_for(1, Duration::from_secs(20)).await,
        "delivered"
    );
    let trailed = common::eventually(Duration::from_secs(20), || async {
        let answer = common::try_send(admin, Method::GET, "/admin/trail", bytes::Bytes::new());
        answer
            .await
            .is_ok_and(|a| a.status == 200 && a.text().contains("\"event_id\""))
    });
    assert!(trailed.await, "{}", replicas.log(0));
}
