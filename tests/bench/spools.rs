//! The spools side by side, in one run on one machine. Release build, from the
//! repository root, with a PostgreSQL server (the tests' one will do):
//!
//! ```text
//! WXRELAY_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo bench --bench spools -- [PUSHES] [BACKLOG] [backlog [analyze]]
//! ```
//!
//! (`backlog` runs the third part alone; `one-user [EVENTS]` the fourth;
//! `trail [PUSHES]` the fifth alone; `trail-size [PUSHES] [MAX_EVENTS]
//! [sqlite|postgres]` the sixth, which no other part runs.)
//!
//! 1. Ingest and fan-out, for SQLite, PostgreSQL with one replica and
//!    PostgreSQL with two: the real binaries, each in its own process, with
//!    the targets paused; PUSHES pushes (default 50,000) of the load harness's
//!    mix over 64 keep-alive connections spread over the replicas give pushes/s
//!    with a durable commit; then a reload releases the targets, and the time
//!    from 1 % to 99 % of the deliveries reaching two local sinks gives
//!    deliveries/s. No target answers inline (`reply_from`), so that fan-out
//!    is measured on its own.
//! 2. Group commit on PostgreSQL: the relay in this process on a spool that
//!    batches up to 512 pushes per commit, then on one that commits each push
//!    alone, with the same client (as `cargo bench --bench ingest` does for
//!    SQLite).
//! 3. A backlog on PostgreSQL, one replica: BACKLOG pushes (default
//!    1,000,000) taken in with the targets paused, then drained, twice; the
//!    sizes of the spool's tables (`pg_total_relation_size`, indexes and
//!    TOAST included) are sampled as it goes, and once autovacuum has cleaned
//!    up after each drain. The dedup window is one minute, so keys expire and
//!    are pruned during the run. Where autovacuum is off, the benchmark runs
//!    the plain VACUUM it would after each drain, and leaves the statistics
//!    to the relay; `analyze` makes it an ANALYZE too, as autovacuum would.
//! 4. One user's backlog on a `per_user` target, for SQLite and PostgreSQL:
//!    EVENTS text messages (default 1,000) from one user taken in with the
//!    targets paused, then drained to a sink that answers each after 20 ms.
//!    Only one of them can be in flight at a time, so the rate is bound by
//!    how soon the next is sent once one is delivered.
//! 5. The event trail's cost: the relay in this process, its targets paused,
//!    PUSHES pushes (default 20,000) with the trail on, then off
//!    (`[trail] enabled = false`), twice over, on SQLite and on PostgreSQL;
//!    the best run of each and the ratio on/off.
//! 6. The event trail's size when full: the real binary, its targets
//!    delivering to a local sink (so that each push also leaves its attempts
//!    and ends in the trail, and the queue stays small), PUSHES pushes
//!    (default 2,000,000) with `[trail] max_events = MAX_EVENTS` (default
//!    1,000,000); every 250,000 pushes, the trail's rows and its bytes on
//!    disk per table, indexes included (SQLite: `dbstat`, and the file and
//!    its WAL; PostgreSQL: `pg_total_relation_size`), and the bytes per kept
//!    event. On SQLite, or PostgreSQL with `postgres`.
//!
//! The client, the sinks, the relays and PostgreSQL share the machine's cores.
//! Each PostgreSQL run has a schema of its own, dropped at the end.

// The integration tests' helpers, which the load harness builds on; a bench
// uses only a few of them.
#[path = "../it/common/mod.rs"]
#[allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
mod common;
#[path = "harness/mod.rs"]
mod harness;

use common::database::Database;
use common::replicas::Replicas;
use harness::{Report, Sink};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wxrelay::spool::postgres::OnOpen;
use wxrelay::spool::{OpenSpool, PostgresSpool};

const CONNECTIONS: usize = 64;

/// Where a run's spool is.
enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(Database),
}

impl Backend {
    fn postgres() -> Backend {
        let database = Database::create().unwrap_or_else(|| {
            panic!(
                "set {} to run this benchmark",
                common::database::TEST_URL_VAR
            )
        });
        Backend::Postgres(database)
    }

    fn spool_toml(&self) -> String {
        match self {
            Backend::Sqlite(dir) => harness::sqlite_spool(&dir.path().join("spool.db")),
            Backend::Postgres(database) => database.spool_toml(),
        }
    }
}

/// Replicas on `backend`, all routing to one sink, their targets paused until
/// `paused` is cleared and they are reloaded.
async fn start(
    backend: &Backend,
    replicas: usize,
    sink: SocketAddr,
    paused: Arc<AtomicBool>,
    edit: fn(String) -> String,
) -> Replicas {
    let spool = backend.spool_toml();
    let config = move |public, admin| {
        edit(harness::relay_config_paused(
            public,
            admin,
            &spool,
            &format!("http://{sink}/broker"),
            &format!("http://{sink}/hooks"),
            paused.load(Ordering::SeqCst),
        ))
    };
    Replicas::start(replicas, &[("WXRELAY_LOG", "warn")], Box::new(config)).await
}

/// Pushes `first..first + n`, the connections shared out over `replicas`.
async fn drive(replicas: &Replicas, first: u64, n: usize) -> Report {
    let now = harness::unix_now();
    harness::drive_spread(&replicas.publics(), first, n, CONNECTIONS, None, now).await
}

/// Waits until the sink holds `expected` deliveries; the time it took.
async fn drained(sink: &Sink, expected: u64, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    common::eventually(within, || async { sink.total() >= expected })
        .await
        .then(|| started.elapsed())
}

/// One row of the first table: ingest, then fan-out.
async fn ingest_and_fan_out(name: &str, backend: Backend, replicas: usize, n: usize) -> String {
    let (sink, at) = Sink::start_local().await;
    let paused = Arc::new(AtomicBool::new(true));
    let relays = start(
        &backend,
        replicas,
        at,
        paused.clone(),
        without_inline_replies,
    )
    .await;
    let warm_up = drive(&relays, 90_000_000, 500).await; // delivered with the rest
    let ingest = drive(&relays, 0, n).await;
    paused.store(false, Ordering::SeqCst);
    relays.reload();
    let deliveries =
        ingest.success + ingest.login_success + warm_up.success + warm_up.login_success;
    // The rate from 1 % to 99 % of them: what the relay sustains, apart from
    // how long it takes to start after the reload and the last attempts.
    let start = drained(&sink, deliveries as u64 / 100, Duration::from_secs(60)).await;
    let most = drained(
        &sink,
        deliveries as u64 * 99 / 100,
        Duration::from_secs(600),
    )
    .await;
    let all = drained(&sink, deliveries as u64, Duration::from_secs(600)).await;
    let fan_out = match (start, most, all) {
        (Some(start), Some(most), Some(_)) => format!(
            "{:>6.0} deliveries/s (1 % to 99 % of {deliveries} in {:.1} s; 1 % reached {:.1} s after the reload)",
            deliveries as f64 * 0.98 / most.as_secs_f64(),
            most.as_secs_f64(),
            start.as_secs_f64(),
        ),
        _ => format!("MISSING: {} of {deliveries}", sink.total()),
    };
    let row = format!(
        "{name:<24} {:>7.0} pushes/s (p99 {:>5.1} ms, {} of {} answered)   fan-out {fan_out}",
        ingest.throughput(),
        ingest.percentile_ms(99.0),
        ingest.success,
        ingest.sent,
    );
    println!("{row}");
    drop(relays);
    drop(backend);
    row
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // `backlog` alone: only the third part; `one-user`: only the fourth.
    let backlog_only = std::env::args().any(|a| a == "backlog");
    let analyze = std::env::args().any(|a| a == "analyze");
    let one_user_only = std::env::args().any(|a| a == "one-user");
    let trail_only = std::env::args().any(|a| a == "trail");
    let trail_size_on = std::env::args()
        .any(|a| a == "trail-size")
        .then(|| std::env::args().any(|a| a == "postgres"));
    let n = args.first().copied().unwrap_or(50_000);
    let backlog = args.get(1).copied().unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        if backlog_only {
            backlog_sizes(backlog, analyze).await;
            return;
        }
        if let Some(postgres) = trail_size_on {
            let total = args.first().copied().unwrap_or(2_000_000);
            let max_events = args.get(1).copied().unwrap_or(1_000_000);
            trail_size(total, max_events, postgres).await;
            return;
        }
        if trail_only {
            trail_cost(args.first().copied().unwrap_or(20_000)).await;
            return;
        }
        if one_user_only {
            let events = args.first().copied().unwrap_or(1_000);
            println!("one user's {events} events to a per_user target answering in 20 ms");
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            one_user("SQLite", Backend::Sqlite(dir), events).await;
            one_user("PostgreSQL, 1 replica", Backend::postgres(), events).await;
            return;
        }
        println!("ingest (targets paused), then fan-out to two local sinks: {n} pushes over {CONNECTIONS} connections");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        ingest_and_fan_out("SQLite", Backend::Sqlite(dir), 1, n).await;
        ingest_and_fan_out("PostgreSQL, 1 replica", Backend::postgres(), 1, n).await;
        ingest_and_fan_out("PostgreSQL, 2 replicas", Backend::postgres(), 2, n).await;
        group_commit(n.min(20_000)).await;
        trail_cost(n.min(20_000)).await;
        backlog_sizes(backlog, analyze).await;
    });
}

/// Pushes/s into a relay in this process on a PostgreSQL spool committing
/// at most `max_batch` pushes at once, its targets paused.
async fn ingest_in_process(max_batch: usize, n: usize, first: u64) -> Report {
    let Backend::Postgres(database) = Backend::postgres() else {
        unreachable!()
    };
    let spool =
        PostgresSpool::open_with_batch(&database.schema.settings, OnOpen::Migrate, max_batch)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let spool = Arc::new(spool);
    let toml = database.spool_toml();
    let report = harness::ingest_in_process(
        OpenSpool::Postgres(spool.clone()),
        &toml,
        first,
        n,
        CONNECTIONS,
    )
    .await;
    spool.close().await;
    report
}

/// Pushes/s into a relay in this process, its targets paused, on a fresh
/// spool of `engine` with `trail` added to its configuration.
async fn ingest_with(engine: &str, trail: &str, n: usize, first: u64) -> Report {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (spool, toml, _database) = if engine == "SQLite" {
        let path = dir.path().join("spool.db");
        let sqlite = wxrelay::spool::SqliteSpool::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let toml = format!("path = \"{}\"", path.display());
        (OpenSpool::Sqlite(Arc::new(sqlite)), toml, None)
    } else {
        let Backend::Postgres(database) = Backend::postgres() else {
            unreachable!()
        };
        let settings = &database.schema.settings;
        let pg = PostgresSpool::open(settings, OnOpen::Migrate)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (
            OpenSpool::Postgres(Arc::new(pg)),
            database.spool_toml(),
            Some(database),
        )
    };
    let toml = format!("{toml}\n\n{trail}");
    let report = harness::ingest_in_process(spool.clone(), &toml, first, n, CONNECTIONS).await;
    spool.close().await;
    report
}

/// Ingest with the trail on against off, alternately, on each spool.
async fn trail_cost(n: usize) {
    println!("the trail's cost, relay in this process: {n} pushes over {CONNECTIONS} connections, targets paused, best of two");
    let mut first = 90_000_000;
    for engine in ["SQLite", "PostgreSQL"] {
        let mut best = [0.0f64; 2];
        for _ in 0..2 {
            for (i, trail) in ["", "[trail]\nenabled = false\n"].into_iter().enumerate() {
                let report = ingest_with(engine, trail, n, first).await;
                first += n as u64;
                best[i] = best[i].max(report.throughput());
            }
        }
        println!(
            "{engine:<12} trail on {:>7.0} pushes/s, off {:>7.0} pushes/s: on/off {:.2}",
            best[0],
            best[1],
            best[0] / best[1]
        );
    }
}

/// Group commit against one commit per push, on PostgreSQL.
async fn group_commit(n: usize) {
    ingest_in_process(512, 500, 80_000_000).await; // warm-up
    let grouped = ingest_in_process(512, n, 60_000_000).await;
    let single = ingest_in_process(1, n, 70_000_000).await;
    println!("group commit on PostgreSQL, relay in this process: {n} pushes over {CONNECTIONS} connections, targets paused");
    println!("{}", grouped.line("grouped"));
    println!("{}", single.line("single"));
    println!(
        "ratio group/single: {:.1}x",
        grouped.throughput() / single.throughput()
    );
}

/// The harness's configuration without `reply_from`: the broker, paused,
/// would otherwise be tried inline for every login push, and its circuit
/// breaker would hold its backlog for a few seconds once it is released.
fn without_inline_replies(toml: String) -> String {
    toml.replace("reply_from = \"broker\"\n", "")
}

/// The backlog's configuration: pushes stay fresh for a minute and their
/// dedup keys are kept as long, so that keys expire during the run.
fn short_windows(toml: String) -> String {
    without_inline_replies(toml)
        .replace("[spool]\n", "[spool]\ndedup_window = \"60s\"\n")
        .replace(
            "mode = \"secure\"\n",
            "mode = \"secure\"\ntimestamp_window = \"60s\"\n",
        )
}

/// The size of each of the schema's tables, indexes and TOAST included.
async fn table_sizes(client: &tokio_postgres::Client, schema: &str) -> Vec<(String, i64)> {
    let rows = client
        .query(
            "SELECT c.relname::text, pg_total_relation_size(c.oid) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY c.relname",
            &[&schema],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn sample(client: &tokio_postgres::Client, schema: &str, header: &mut bool, when: &str) {
    let sizes = table_sizes(client, schema).await;
    if !*header {
        let names: Vec<String> = sizes.iter().map(|(n, _)| format!("{n:>18}")).collect();
        println!("{:<44} {}", "", names.join(""));
        *header = true;
    }
    let values: Vec<String> = sizes
        .iter()
        .map(|(_, bytes)| format!("{:>18.1}", *bytes as f64 / 1_048_576.0))
        .collect();
    println!("{when:<44} {}", values.join(""));
}

/// Two rounds of a backlog of `total / 2` pushes taken in with the targets
/// paused, then drained, with the tables' sizes along the way; where
/// autovacuum is off, vacuumed after each drain (and analyzed, with
/// `analyze`).
async fn backlog_sizes(total: usize, analyze: bool) {
    const CHUNK: usize = 100_000;
    let backend = Backend::postgres();
    let Backend::Postgres(database) = &backend else {
        unreachable!()
    };
    let client = database.client().await;
    let autovacuum: String = client
        .query_one("SHOW autovacuum", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    let autovacuum_on = autovacuum == "on";
    let (sink, at) = Sink::start_local().await;
    let paused = Arc::new(AtomicBool::new(true));
    let relays = start(&backend, 1, at, paused.clone(), short_windows).await;
    let public = relays.replica(0).public;
    println!("backlog on PostgreSQL, 1 replica: {total} pushes in two rounds, each taken in with the targets paused, then drained; table sizes in MiB, indexes and TOAST included; autovacuum {autovacuum}");
    let round = total / 2;
    let (mut first, mut expected, mut header) = (0u64, 0u64, false);
    for r in 1..=2 {
        paused.store(true, Ordering::SeqCst);
        relays.reload();
        let (mut taken, before) = (0, expected);
        while taken < round {
            let n = CHUNK.min(round - taken);
            let report =
                harness::drive(public, first, n, CONNECTIONS, None, harness::unix_now()).await;
            first += n as u64;
            taken += n;
            expected += (report.success + report.login_success) as u64;
            let when = format!(
                "round {r}: {taken} in ({:.0} pushes/s)",
                report.throughput()
            );
            sample(&client, database.name(), &mut header, &when).await;
        }
        paused.store(false, Ordering::SeqCst);
        relays.reload();
        let started = Instant::now();
        loop {
            let done = drained(&sink, expected, Duration::from_secs(20))
                .await
                .is_some();
            let when = if done {
                let took = started.elapsed().as_secs_f64();
                let deliveries = expected - before;
                format!(
                    "round {r}: {deliveries} delivered in {took:.0} s ({:.0}/s)",
                    deliveries as f64 / took
                )
            } else {
                format!("round {r}: draining, {} delivered", sink.total())
            };
            sample(&client, database.name(), &mut header, &when).await;
            if done {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(3_600),
                "the backlog drained within an hour"
            );
        }
        // Deleted rows are reused once vacuumed: the next round should then
        // fit where this one was. Autovacuum does it where it runs (within a
        // minute, by default); where it is off, this does it in its place.
        let waited = Instant::now();
        let autovacuumed = autovacuum_on
            && common::eventually(Duration::from_secs(90), || {
                dead_rows_cleaned(&client, database.name())
            })
            .await;
        let took = waited.elapsed().as_secs_f64();
        let when = if autovacuumed {
            format!("round {r}: autovacuumed within {took:.0} s")
        } else if analyze {
            vacuum(&client, database.name(), "VACUUM ANALYZE").await;
            format!("round {r}: vacuumed and analyzed (no autovacuum)")
        } else {
            vacuum(&client, database.name(), "VACUUM").await;
            format!("round {r}: vacuumed (no autovacuum)")
        };
        sample(&client, database.name(), &mut header, &when).await;
    }
    drop(relays);
}

/// What autovacuum would do: `command`, a plain VACUUM (no lock against the
/// relay) of the queue tables, with or without an ANALYZE. The statistics
/// of a table a drain emptied make the planner take it for small once it is
/// full again: the relay analyzes the tables after a large intake itself.
async fn vacuum(client: &tokio_postgres::Client, schema: &str, command: &str) {
    for table in ["events", "deliveries", "dedup", "replay"] {
        client
            .batch_execute(&format!("{command} \"{schema}\".{table}"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Autovacuum has cleaned the queue tables of the rows deleted from them.
async fn dead_rows_cleaned(client: &tokio_postgres::Client, schema: &str) -> bool {
    let row = client
        .query_one(
            "SELECT coalesce(max(n_dead_tup), 0) FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname IN ('events', 'deliveries', 'dedup')",
            &[&schema],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    row.get::<_, i64>(0) <= 1_000
}

/// The harness's configuration, its webhooks taking each user's events in
/// order.
fn per_user_webhooks(toml: String) -> String {
    without_inline_replies(toml).replace(
        "[targets.webhooks]\n",
        "[targets.webhooks]\nordering = \"per_user\"\n",
    )
}

/// Text message `i` from the one user, sealed for the harness's account.
fn one_user_push(i: usize, now: i64, key: &wxrelay::wechat::crypto::AesKey) -> (String, Vec<u8>) {
    use wxrelay::wechat::push::{build, PushParams, Sealing};
    let xml = format!(
        "<xml><ToUserName><![CDATA[gh_3f1a2b9c8d7e]]></ToUserName>\
         <FromUserName><![CDATA[oOneUser]]></FromUserName><CreateTime>{now}</CreateTime>\
         <MsgType><![CDATA[text]]></MsgType><Content><![CDATA[message {i}]]></Content>\
         <MsgId>{}</MsgId></xml>",
        25_000_000_000_000_000 + i
    );
    let nonce = (2_000_000_000 + i).to_string();
    let params = PushParams {
        token: harness::TOKEN,
        app_id: harness::APP_ID,
        timestamp: now,
        nonce: &nonce,
        openid: Some("oOneUser"),
        random: &[b'U'; 16],
    };
    let p = build(&xml, Sealing::Secure(key), &params);
    (format!("/wx/main?{}", p.query), p.body.into_bytes())
}

/// One row of the fourth table: one user's backlog drained to a target that
/// answers in 20 ms.
async fn one_user(name: &str, backend: Backend, events: usize) {
    let (sink, at) = Sink::start_local().await;
    sink.set_delay(Duration::from_millis(20));
    let paused = Arc::new(AtomicBool::new(true));
    let relays = start(&backend, 1, at, paused.clone(), per_user_webhooks).await;
    let (public, key, now) = (
        relays.replica(0).public,
        harness::key(),
        harness::unix_now(),
    );
    for i in 0..events {
        let (path, body) = one_user_push(i, now, &key);
        let answer = common::send(public, http::Method::POST, &path, body.into()).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    paused.store(false, Ordering::SeqCst);
    relays.reload();
    let first = drained(&sink, 1, Duration::from_secs(60)).await;
    let rest = drained(&sink, events as u64, Duration::from_secs(600)).await;
    match (first, rest) {
        (Some(first), Some(rest)) => println!(
            "{name:<24} {:>6.1} deliveries/s ({} after the first in {:.1} s; the first {:.1} s after the reload)",
            (events - 1) as f64 / rest.as_secs_f64(),
            events - 1,
            rest.as_secs_f64(),
            first.as_secs_f64(),
        ),
        _ => println!("{name:<24} MISSING: {} of {events}", sink.total()),
    }
    drop(relays);
    drop(backend);
}

/// Pushes per sample of the trail's size.
const TRAIL_SAMPLE: usize = 250_000;

/// The trail's size as a steady stream of pushes fills it and goes on past
/// `max_events`, its targets delivering all along.
async fn trail_size(total: usize, max_events: usize, postgres: bool) {
    let backend = if postgres {
        Backend::postgres()
    } else {
        Backend::Sqlite(tempfile::tempdir().unwrap_or_else(|e| panic!("{e}")))
    };
    let (sink, at) = Sink::start_local().await;
    let spool = backend.spool_toml();
    let config = move |public, admin| {
        let relay = harness::relay_config_paused(
            public,
            admin,
            &spool,
            &format!("http://{at}/broker"),
            &format!("http://{at}/hooks"),
            false,
        );
        format!(
            "{}\n[trail]\nmax_events = {max_events}\n",
            without_inline_replies(relay)
        )
    };
    let relays = Replicas::start(1, &[("WXRELAY_LOG", "warn")], Box::new(config)).await;
    let public = relays.replica(0).public;
    let engine = if postgres { "PostgreSQL" } else { "SQLite" };
    println!("the trail's size on {engine}: {total} pushes over {CONNECTIONS} connections, targets delivering to a local sink, [trail] max_events = {max_events}; sizes in MiB, indexes included");
    let (mut sent, mut due, mut header) = (0usize, 0usize, true);
    while sent < total {
        let n = TRAIL_SAMPLE.min(total - sent);
        let report = harness::drive(
            public,
            sent as u64,
            n,
            CONNECTIONS,
            None,
            harness::unix_now(),
        )
        .await;
        sent += n;
        due += report.success + report.login_success;
        let sizes = match &backend {
            Backend::Sqlite(dir) => sqlite_trail_sizes(&dir.path().join("spool.db")),
            Backend::Postgres(database) => {
                postgres_trail_sizes(&database.client().await, database.name()).await
            }
        };
        let when = format!(
            "{sent} pushes ({:.0}/s; {} of {due} delivered)",
            report.throughput(),
            sink.total(),
        );
        print_trail_sizes(&when, &sizes, &mut header);
    }
    if let Backend::Sqlite(dir) = &backend {
        openid_scan(&dir.path().join("spool.db"));
    }
    drop(relays);
}

/// How long a search by an OpenID that has no push takes, the worst case
/// without an index on the hashes: every kept event is read.
fn openid_scan(path: &std::path::Path) {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..2 {
        let started = Instant::now();
        let found: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM (SELECT id FROM trail_events WHERE openid_hash = ?1 \
                 ORDER BY id DESC LIMIT 50)",
                [&[7u8; 32][..]],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "a search by an OpenID with no push: {found} found in {:.0} ms (every kept event read)",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// A sample: each table's rows (`None`: not a table) and bytes.
type TrailSizes = Vec<(String, Option<i64>, i64)>;

fn print_trail_sizes(when: &str, sizes: &TrailSizes, header: &mut bool) {
    if std::mem::take(header) {
        let names: Vec<String> = sizes.iter().map(|(n, _, _)| format!("{n:>26}")).collect();
        println!("{:<52}{}{:>16}", "", names.join(""), "bytes/event");
    }
    let cells: Vec<String> = sizes
        .iter()
        .map(|(_, rows, bytes)| {
            let mib = *bytes as f64 / 1_048_576.0;
            match rows {
                Some(rows) => format!("{:>26}", format!("{rows} rows {mib:.1}")),
                None => format!("{mib:>26.1}"),
            }
        })
        .collect();
    let events = sizes
        .iter()
        .find(|(n, _, _)| n == "trail_events")
        .and_then(|(_, rows, _)| *rows)
        .unwrap_or(0);
    let trail: i64 = sizes
        .iter()
        .filter(|(n, rows, _)| n.starts_with("trail") && rows.is_some())
        .map(|(_, _, bytes)| bytes)
        .sum();
    println!(
        "{when:<52}{}{:>16.0}",
        cells.join(""),
        trail as f64 / events.max(1) as f64
    );
}

/// The trail's tables in the file, each with its indexes (`dbstat`), then
/// the file and its WAL.
fn sqlite_trail_sizes(path: &std::path::Path) -> TrailSizes {
    let c = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{e}"));
    let bytes_of = |table: &str| -> i64 {
        c.query_row(
            "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ?1
                 OR name IN (SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1)",
            [table],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut sizes = TrailSizes::new();
    for table in TRAIL_TABLES {
        let rows: i64 = c
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{e}"));
        sizes.push((table.to_owned(), Some(rows), bytes_of(table)));
    }
    let len = |p: std::path::PathBuf| std::fs::metadata(p).map_or(0, |m| m.len() as i64);
    let wal = path.with_extension("db-wal");
    sizes.push(("file".into(), None, len(path.to_owned())));
    sizes.push(("wal".into(), None, len(wal)));
    sizes
}

const TRAIL_TABLES: [&str; 3] = ["trail_events", "trail_steps", "trail_refusals"];

/// The trail's tables in the schema, indexes and TOAST included, then the
/// whole schema's.
async fn postgres_trail_sizes(client: &tokio_postgres::Client, schema: &str) -> TrailSizes {
    let mut sizes = TrailSizes::new();
    for table in TRAIL_TABLES {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*), pg_total_relation_size('\"{schema}\".{table}') FROM \"{schema}\".{table}"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        sizes.push((table.to_owned(), Some(row.get(0)), row.get(1)));
    }
    let all: i64 = table_sizes(client, schema)
        .await
        .iter()
        .map(|(_, bytes)| bytes)
        .sum();
    sizes.push(("schema".into(), None, all));
    sizes
}
