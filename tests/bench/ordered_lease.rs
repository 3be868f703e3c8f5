//! Leasing from an ordered (`per_user`) backlog, in one run on one file.
//!
//! `cargo bench --bench ordered_lease [-- DELIVERIES USERS CALLS]` fills a
//! fresh SQLite spool with DELIVERIES ordered deliveries to one target over
//! USERS users (default 100,000 over 1,000), so that all but each user's head
//! wait behind it. It then times CALLS lease calls of 64 (default 20) twice:
//! once with every head leased (in flight), once with every head backing off.
//! Either way there is nothing to hand out, which is what a backlog behind a
//! slow target looks like to its workers.
//!
//! The baseline is the lease query the spool used before it kept a `blocked`
//! flag: it looked for an earlier pending delivery of the user for every due
//! row. It runs on the same file through a connection of its own, reading
//! every row the spool's lease would have read (the held heads first); it
//! skips the spool's request channel, which only flatters it.

use rusqlite::{params, Connection};
use std::path::Path;
use std::time::{Duration, Instant};
use wxrelay::spool::{
    Enqueued, Event, Intake, Lease, NewDelivery, NewEvent, Schedule, Settle, Settlement,
    SqliteSpool, UnixMs, Work,
};

const TARGET: &str = "ordered";
const LIMIT: usize = 64;
const LEASE_MS: i64 = 3_600_000;
const LEASE: Duration = Duration::from_millis(LEASE_MS as u64);

/// The lease query before the `blocked` flag, word for word.
const BEFORE: &str =
    "SELECT d.id, d.event_id, d.attempts, e.dedup_key, e.account, e.received_at, e.query, e.body,
        e.xml, e.fields, e.msg_type, e.event, d.step, d.scheduled_at
 FROM deliveries d JOIN events e ON e.id = d.event_id
 WHERE d.state = 0 AND d.target = ?1 AND d.next_at <= ?2
   AND (d.order_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM deliveries p
        WHERE p.target = ?1 AND p.order_key = d.order_key AND p.id < d.id
          AND p.state = 0 AND p.order_key IS NOT NULL))
 ORDER BY d.next_at, d.id LIMIT ?3";

fn event(i: usize, users: usize) -> NewEvent {
    let user = i % users;
    NewEvent {
        event: Event {
            dedup_key: format!("k{i}"),
            account: "main".into(),
            received_at: UnixMs(0),
            query: String::new(),
            body: format!("<xml>{i}</xml>").into_bytes().into(),
            xml: format!("<xml>{i}</xml>"),
            fields: "{}".into(),
            msg_type: "text".into(),
            event_type: None,
            origin: Default::default(),
            trace_context: None,
        },
        targets: vec![NewDelivery {
            target: TARGET.into(),
            due_at: UnixMs(0),
            order_key: Some(format!("main|user{user}")),
        }],
        replay: None,
        trail: None,
    }
}

/// Enqueues in bursts, so that the writer commits them in groups.
async fn fill(spool: &SqliteSpool, n: usize, users: usize) {
    for start in (0..n).step_by(4_096) {
        let burst: Vec<_> = (start..n.min(start + 4_096))
            .map(|i| spool.enqueue(event(i, users), UnixMs(0), Duration::from_secs(60)))
            .collect();
        for enqueued in burst {
            let stored = enqueued.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(stored, Enqueued::Stored { .. }), "{stored:?}");
        }
    }
}

/// Leases every head; returns their ids.
async fn lease_heads(spool: &SqliteSpool, now: i64, users: usize) -> Vec<Lease> {
    let mut heads = Vec::new();
    loop {
        let leases = spool
            .lease(TARGET, UnixMs(now), LIMIT, LEASE)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if leases.is_empty() {
            break;
        }
        heads.extend(leases);
    }
    assert_eq!(heads.len(), users, "one head per user");
    heads
}

async fn time_spool(spool: &SqliteSpool, now: i64, calls: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..calls {
        let leases = spool
            .lease(TARGET, UnixMs(now), LIMIT, LEASE)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(leases.is_empty(), "only blocked deliveries are due");
    }
    start.elapsed() / calls as u32
}

/// The old lease: `held` leased heads come first and are read past.
fn time_before(path: &Path, now: i64, held: usize, calls: usize) -> Duration {
    let conn = Connection::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut select = conn.prepare(BEFORE).unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    for _ in 0..calls {
        let mut rows = select
            .query(params![TARGET, now, (LIMIT + held) as i64])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut read = 0;
        while let Some(row) = rows.next().unwrap_or_else(|e| panic!("{e}")) {
            let _body: Vec<u8> = row.get(7).unwrap_or_else(|e| panic!("{e}"));
            read += 1;
        }
        assert_eq!(read, held, "only the held heads are found");
    }
    start.elapsed() / calls as u32
}

fn report(case: &str, before: Duration, after: Duration) {
    println!("  {case}");
    println!(
        "    before (NOT EXISTS per due row): {:>10.3} ms per lease",
        before.as_secs_f64() * 1e3
    );
    println!(
        "    after (heads only):              {:>10.3} ms per lease",
        after.as_secs_f64() * 1e3
    );
    println!(
        "    ratio before/after:              {:>10.1}x",
        before.as_secs_f64() / after.as_secs_f64()
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(100_000);
    let users = args.get(1).copied().unwrap_or(1_000);
    let calls = args.get(2).copied().unwrap_or(20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("spool.db");
        let spool = SqliteSpool::open(&path).unwrap_or_else(|e| panic!("{e}"));
        fill(&spool, n, users).await;
        println!(
            "lease of {LIMIT} from {n} ordered deliveries over {users} users, {calls} calls each"
        );

        let heads = lease_heads(&spool, 1, users).await;
        let after = time_spool(&spool, 2, calls).await;
        let before = time_before(&path, 2, users, calls);
        report("every head leased (in flight)", before, after);

        let backing_off = heads
            .iter()
            .map(|head| Settle {
                trail: None,
                lease: head.token,
                settlement: Settlement::Retry {
                    delivery_id: head.delivery_id,
                    next_at: UnixMs(LEASE_MS),
                    schedule: Schedule {
                        step: 1,
                        due_at: UnixMs(LEASE_MS),
                    },
                    not_before: UnixMs(0),
                    error: "HTTP 503".into(),
                },
            })
            .collect();
        spool
            .record(backing_off, UnixMs(3))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let after = time_spool(&spool, 4, calls).await;
        let before = time_before(&path, 4, 0, calls);
        report("every head backing off", before, after);
        spool.close();
    });
}
