//! Several replicas on one PostgreSQL spool, with the real binary: three relay
//! processes share one queue and one dedup table, WeChat's pushes are spread
//! over them, two of them are killed with SIGKILL in turn while pushes keep
//! coming, and WeChat re-sends what was not answered 200. Every push answered
//! 200 must reach each target its route names; the copies a target gets twice
//! are counted and bounded by the leases the killed replicas left behind.

use crate::common;
use crate::harness;

use common::database::Database;
use common::replicas::Replicas;
use common::target::{Behaviour, FakeTarget};
use common::wechat::{nonce_of, WeChat};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deliveries a replica's worker holds at once, per target: what one killed
/// replica can leave leased, and so sent again by another.
const CONCURRENCY: usize = 4;

/// How long a target takes to answer: long enough that a replica killed
/// mid-stream dies with attempts under way, whose deliveries the others
/// take over once the leases end.
const TAKES: Duration = Duration::from_millis(100);

/// A replica's configuration: the load harness's account, a `broker` (login
/// events) and `hooks` (everything) that are retried every 300 ms, so that a
/// target coming back is not waited for.
fn config(public: SocketAddr, admin: SocketAddr, spool: &str, broker: &str, hooks: &str) -> String {
    let schedule = vec!["\"300ms\""; 100].join(", ");
    let target = |name, url, format| {
        let keys = format!(
            "format = \"{format}\"\nconcurrency = {CONCURRENCY}\nretry_schedule = [{schedule}]"
        );
        common::target(name, url, &keys)
    };
    format!(
        "[server]\nlisten = \"{public}\"\nadmin_listen = \"{admin}\"\nshutdown_timeout = \"3s\"\n\n\
         [spool]\n{spool}\n{}\n{}\n{}\n\
         [[routes]]\nmatch = {{ event = [\"subscribe\", \"SCAN\"] }}\nto = [\"broker\", \"hooks\"]\n\n\
         [[routes]]\nto = [\"hooks\"]\n",
        harness::account(),
        target("broker", broker, "raw"),
        target("hooks", hooks, "plain"),
    )
}

/// A target that answers 503 while `failing`, else 200 after [`TAKES`], and
/// notes when each push (by nonce) reached it while it was not failing.
struct Recorded {
    target: FakeTarget,
    failing: Arc<AtomicBool>,
    arrivals: Arc<Mutex<BTreeMap<String, Vec<Instant>>>>,
}

impl Recorded {
    async fn start(failing: bool) -> Recorded {
        let target = FakeTarget::start().await;
        let failing = Arc::new(AtomicBool::new(failing));
        let arrivals = Arc::new(Mutex::new(BTreeMap::<String, Vec<Instant>>::new()));
        let (f, a) = (failing.clone(), arrivals.clone());
        target.respond_with(move |r| {
            if f.load(Ordering::SeqCst) {
                return Some(Behaviour::status(503));
            }
            let mut a = a.lock().unwrap();
            a.entry(nonce_of(r.query()))
                .or_default()
                .push(Instant::now());
            Some(Behaviour::After(TAKES, Box::new(Behaviour::status(200))))
        });
        Recorded {
            target,
            failing,
            arrivals,
        }
    }

    fn url(&self) -> String {
        self.target.url("/events")
    }

    /// Every push delivered, once or more.
    fn delivered(&self) -> BTreeSet<String> {
        self.arrivals.lock().unwrap().keys().cloned().collect()
    }

    /// Deliveries beyond the first of each push.
    fn duplicates(&self) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals.values().map(|a| a.len() - 1).sum()
    }

    fn first_arrival(&self, nonce: &str) -> Option<Instant> {
        self.arrivals.lock().unwrap().get(nonce).map(|a| a[0])
    }
}

/// No delivery is waiting in the shared spool, as replica `admin` reports it.
async fn spool_empty(admin: SocketAddr) -> bool {
    let metrics = common::admin_request(admin, http::Method::GET, "/metrics", None).await;
    metrics.status == 200 && common::metric(&metrics.text(), "wxrelay_spool_pending", &[]) == 0.0
}

/// `n` replicas on `database`, sending to `broker` and `hooks`.
async fn start(n: usize, database: &Database, broker: &Recorded, hooks: &Recorded) -> Replicas {
    let (spool, broker, hooks) = (database.spool_toml(), broker.url(), hooks.url());
    let config = move |public, admin| config(public, admin, &spool, &broker, &hooks);
    Replicas::start(n, &[], Box::new(config)).await
}

/// The id a replica's leases carry, from what it logged when it opened the
/// spool.
fn lease_owner(log: &str) -> String {
    let at = log
        .find("replica=")
        .unwrap_or_else(|| panic!("no replica id in the log: {log}"));
    log[at + "replica=".len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

/// Per target, the deliveries `owner` (just killed) still holds a lease on:
/// what the other replicas take over when the leases end, and so the only
/// deliveries a target may get twice.
async fn left_leased(database: &Database, owner: &str) -> BTreeMap<String, usize> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let sql = format!(
        "SELECT target, count(*) FROM \"{}\".deliveries \
         WHERE lease_owner = $1 AND lease_until > $2 AND state = 0 GROUP BY target",
        database.name()
    );
    let client = database.client().await;
    let rows = client.query(&sql, &[&owner, &now_ms]).await.unwrap();
    rows.iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as usize))
        .collect()
}

fn add(total: &mut BTreeMap<String, usize>, more: BTreeMap<String, usize>) {
    for (target, n) in more {
        *total.entry(target).or_default() += n;
    }
}

/// A push as sent, and what came of it.
struct Outcome {
    nonce: String,
    login: bool,
    answered_at: Option<Instant>,
    /// A try went unanswered after it reached a relay: the push may be
    /// stored under a lease of the replica that died with it.
    lost_a_try: bool,
    tries: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_deliver_every_answered_push_when_two_are_killed() {
    const PUSHES: usize = 900;
    const PER_SECOND: f64 = 60.0;
    const SENDERS: usize = 6;
    // Moments of the stream, by pushes sent.
    const TARGETS_BACK: usize = 150;
    const FIRST_KILL: usize = 250;
    const FIRST_BACK: usize = 450;
    const SECOND_KILL: usize = 600;

    let Some(database) = Database::create() else {
        return;
    };
    let broker = Recorded::start(true).await;
    let hooks = Recorded::start(true).await;
    let mut replicas = start(3, &database, &broker, &hooks).await;
    let wechat = Arc::new(WeChat::new(replicas.publics()));

    let key = harness::key();
    let now = harness::unix_now();
    let pushes: Arc<Vec<harness::Push>> = Arc::new(
        (0..PUSHES as u64)
            .map(|i| harness::push(i, now, &key))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (pushes, next, wechat) = (pushes.clone(), next.clone(), wechat.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let k = next.fetch_add(1, Ordering::SeqCst);
                    let Some(push) = pushes.get(k) else { break };
                    let due = start + Duration::from_secs_f64(k as f64 / PER_SECOND);
                    tokio::time::sleep_until(due.into()).await;
                    let sent = wechat.push(&push.path, &push.body).await;
                    outcomes.push(Outcome {
                        nonce: nonce_of(&push.path),
                        login: push.kind == harness::PushKind::Login,
                        answered_at: sent.answered.then(Instant::now),
                        lost_a_try: sent.statuses.iter().any(|s| s == "-"),
                        tries: sent.statuses.len(),
                    });
                }
                outcomes
            })
        })
        .collect();

    // The conductor: targets back, then one replica killed and started again,
    // then another killed for good, each once enough pushes were sent.
    let sent_at_least = |n| common::until_reached(&next, n);
    sent_at_least(TARGETS_BACK).await;
    broker.failing.store(false, Ordering::SeqCst);
    hooks.failing.store(false, Ordering::SeqCst);
    sent_at_least(FIRST_KILL).await;
    let mut takeovers = BTreeMap::new();
    let database = &database;
    let kill = |replicas: &mut Replicas, i: usize| {
        replicas.kill(i);
        let owner = lease_owner(&replicas.log(i));
        async move { left_leased(database, &owner).await }
    };
    add(&mut takeovers, kill(&mut replicas, 0).await);
    let first_dead = Instant::now();
    sent_at_least(FIRST_BACK).await;
    replicas.restart(0).await;
    let first_back = Instant::now();
    sent_at_least(SECOND_KILL).await;
    add(&mut takeovers, kill(&mut replicas, 1).await);
    let second_dead = Instant::now();

    let mut outcomes = Vec::new();
    for s in senders {
        outcomes.extend(s.await.unwrap());
    }
    let stream_end = Instant::now();
    let answered: BTreeSet<String> = outcomes
        .iter()
        .filter(|o| o.answered_at.is_some())
        .map(|o| o.nonce.clone())
        .collect();
    let logins: BTreeSet<String> = outcomes
        .iter()
        .filter(|o| o.login)
        .map(|o| o.nonce.clone())
        .collect();
    let answered_logins: BTreeSet<String> = answered.intersection(&logins).cloned().collect();

    // Everything answered arrives, and the spool empties (no copy left to come).
    let all_there = common::eventually(Duration::from_secs(30), || {
        let ok = hooks.delivered().is_superset(&answered)
            && broker.delivered().is_superset(&answered_logins);
        async move { ok }
    })
    .await;
    let drained = common::eventually(Duration::from_secs(30), || {
        spool_empty(replicas.replica(2).admin)
    })
    .await;

    // Login events answered while one replica was dead reach the broker
    // within seconds all the same (but for one a killed replica may have
    // stored and leased before it died, which waits for the lease to end).
    let one_dead = |t: Instant| (t >= first_dead && t < first_back) || t >= second_dead;
    let mut waits: Vec<Duration> = outcomes
        .iter()
        .filter(|o| o.login && !o.lost_a_try && o.answered_at.is_some_and(one_dead))
        .filter_map(|o| {
            Some(
                broker
                    .first_arrival(&o.nonce)?
                    .saturating_duration_since(o.answered_at?),
            )
        })
        .collect();
    waits.sort();
    let slowest = waits.last().copied().unwrap_or_default();

    let taken_over = |target: &str| takeovers.get(target).copied().unwrap_or(0);
    println!(
        "sent {PUSHES} in {:.1} s, answered 200: {} ({} login), not answered: {}, \
         re-sent by WeChat: {}; delivered: hooks {} of {}, broker {} of {}; \
         duplicates: hooks {}, broker {}; leases taken over from the killed replicas: \
         hooks {}, broker {}; \
         broker wait while a replica was dead: {} logins, median {:?}, slowest {slowest:?}",
        (stream_end - start).as_secs_f64(),
        answered.len(),
        answered_logins.len(),
        PUSHES - answered.len(),
        outcomes.iter().map(|o| o.tries).sum::<usize>() - PUSHES,
        hooks.delivered().intersection(&answered).count(),
        answered.len(),
        broker.delivered().intersection(&answered_logins).count(),
        answered_logins.len(),
        hooks.duplicates(),
        broker.duplicates(),
        taken_over("hooks"),
        taken_over("broker"),
        waits.len(),
        waits.get(waits.len() / 2).copied().unwrap_or_default(),
    );
    assert!(
        all_there,
        "every push answered 200 reached each of its targets"
    );
    assert!(drained, "the shared spool drained");
    let sent: BTreeSet<String> = outcomes.iter().map(|o| o.nonce.clone()).collect();
    assert!(hooks.delivered().is_subset(&sent));
    assert!(
        broker.delivered().is_subset(&logins),
        "the broker got only login events"
    );
    assert!(
        answered.len() * 100 >= PUSHES * 99,
        "WeChat's re-sends got nearly every push answered: {} of {PUSHES}",
        answered.len()
    );
    for (name, target) in [("hooks", &hooks), ("broker", &broker)] {
        assert!(
            target.duplicates() <= taken_over(name),
            "{name}: {} duplicates, more than the {} leases the killed replicas left",
            target.duplicates(),
            taken_over(name)
        );
    }
    assert!(
        !waits.is_empty(),
        "login events were answered while a replica was dead"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "the broker got each login event within seconds: slowest {slowest:?}"
    );
}

/// The same push sent at the same moment to two replicas is stored once: one
/// replica answers it as new, the other as a duplicate, and each target gets
/// it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_sent_to_two_replicas_at_once_is_one_event() {
    const PUSHES: u64 = 60;
    let Some(database) = Database::create() else {
        return;
    };
    let broker = Recorded::start(false).await;
    let hooks = Recorded::start(false).await;
    let replicas = start(2, &database, &broker, &hooks).await;
    let key = harness::key();
    let now = harness::unix_now();
    let (a, b) = (replicas.replica(0).public, replicas.replica(1).public);
    let mut logins = 0;
    for i in 0..PUSHES {
        let push = harness::push(i, now, &key);
        logins += usize::from(push.kind == harness::PushKind::Login);
        let send = |at| common::send(at, http::Method::POST, &push.path, push.body.clone());
        let (first, second) = tokio::join!(send(a), send(b));
        assert_eq!(
            (first.status.as_u16(), second.status.as_u16()),
            (200, 200),
            "push {i}"
        );
    }

    let verdicts = |verdict: &'static str| {
        let replicas = &replicas;
        async move {
            let mut sum = 0.0;
            for i in 0..2 {
                let text = common::admin_request(
                    replicas.replica(i).admin,
                    http::Method::GET,
                    "/metrics",
                    None,
                )
                .await
                .text();
                sum += common::metric(&text, "wxrelay_pushes_total", &[("verdict", verdict)]);
            }
            sum
        }
    };
    assert_eq!(
        verdicts("ok").await,
        PUSHES as f64,
        "one copy of each stored"
    );
    assert_eq!(
        verdicts("duplicate").await,
        PUSHES as f64,
        "the other a duplicate"
    );
    let drained = common::eventually(Duration::from_secs(20), || {
        spool_empty(replicas.replica(0).admin)
    })
    .await;
    assert!(drained, "the shared spool drained");
    assert_eq!(hooks.delivered().len(), PUSHES as usize);
    assert_eq!(broker.delivered().len(), logins);
    assert_eq!(
        (hooks.duplicates(), broker.duplicates()),
        (0, 0),
        "each target got each push once"
    );
}
