//! The spool's contract as one suite, run against every implementation
//! [`spools`] lists: a new backend joins the list and must pass it all.

use super::*;
use sha2::Digest;
use std::sync::Arc;

const WINDOW_MS: i64 = 600_000;
const WINDOW: Duration = Duration::from_millis(WINDOW_MS as u64);

/// Every role of a spool, for the suite to use them all.
trait Roles: Intake + Work + Operator + Health + DueListener + Tickets + LateReplies {}
impl<T: Intake + Work + Operator + Health + DueListener + Tickets + LateReplies> Roles for T {}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn event(key: &str, targets: &[&str], now: i64) -> NewEvent {
    NewEvent {
        event: Event {
            dedup_key: key.into(),
            account: "main".into(),
            received_at: UnixMs(now),
            query: format!("signature=s&timestamp=1&nonce={key}"),
            body: format!("<xml>{key}</xml>").into_bytes().into(),
            xml: format!("<xml><K>{key}</K></xml>"),
            fields: format!("{{\"K\":\"{key}\"}}"),
            msg_type: "event".into(),
            event_type: Some("CLICK".into()),
            origin: Origin::default(),
            trace_context: Some(format!("00-{:032x}-{:016x}-01", now + 1, now + 1)),
        },
        targets: targets
            .iter()
            .map(|t| NewDelivery {
                target: t.to_string(),
                due_at: UnixMs(now),
                order_key: None,
            })
            .collect(),
        replay: None,
        trail: None,
    }
}

/// What the spool makes of a guarded event, at the time it was received.
async fn guarded_outcome(spool: &dyn Roles, e: NewEvent) -> Enqueued {
    let now = e.event.received_at;
    spool.enqueue(e, now, WINDOW).await.unwrap()
}

/// `event` under a guard on `query` for `body`, stale from `expires_at`.
fn guarded(key: &str, query: &str, body: &str, now: i64, expires_at: i64) -> NewEvent {
    NewEvent {
        replay: Some(ReplayGuard {
            key: query.into(),
            body_hash: sha2::Sha256::digest(body.as_bytes()).into(),
            expires_at: UnixMs(expires_at),
        }),
        ..event(key, &["a"], now)
    }
}

async fn stored(spool: &dyn Roles, e: NewEvent, now: i64) -> (EventId, Vec<DeliveryId>) {
    match spool.enqueue(e, UnixMs(now), WINDOW).await.unwrap() {
        Enqueued::Stored {
            event_id,
            deliveries,
            ..
        } => (event_id, deliveries),
        other => panic!("unexpected {other:?}"),
    }
}

/// The events and deliveries tables as the first versions created them.
const EARLIER_TABLES: &str = "
    CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, dedup_key TEXT NOT NULL,
        account TEXT NOT NULL, received_at INTEGER NOT NULL, query TEXT NOT NULL,
        body BLOB NOT NULL, xml TEXT NOT NULL, fields TEXT NOT NULL, msg_type TEXT NOT NULL,
        event TEXT);
    CREATE TABLE deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id INTEGER NOT NULL REFERENCES events(id), target TEXT, state INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0, next_at INTEGER NOT NULL,
        last_error TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
        updated_at INTEGER NOT NULL, not_before INTEGER NOT NULL DEFAULT 0);";

/// A spool file in the earlier tables holding one event and one delivery
/// with `delivery` as its (event_id, target, state, attempts, next_at,
/// last_error, updated_at).
fn earlier_file(delivery: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(EARLIER_TABLES).unwrap();
    c.execute_batch(&format!(
        "INSERT INTO events VALUES (1, 'k', 'main', 0, 'q', x'00', '<xml/>', '{{}}', 'text', NULL);
         INSERT INTO deliveries (event_id, target, state, attempts, next_at, last_error, updated_at)
            VALUES ({delivery});"
    ))
    .unwrap();
    (dir, path)
}

/// A first failure, the next attempt due at 120 s, held by Retry-After to
/// `not_before` (0: not held).
fn failed_once(id: DeliveryId, not_before: i64) -> Settlement {
    Settlement::Retry {
        delivery_id: id,
        next_at: UnixMs(120_000),
        schedule: Schedule {
            step: 1,
            due_at: UnixMs(120_000),
        },
        not_before: UnixMs(not_before),
        error: "HTTP 503".into(),
    }
}

/// Records `settlements`, each under the token of its delivery's lease in
/// `leases`, or as never leased.
async fn settle(spool: &dyn Roles, leases: &[Lease], settlements: Vec<Settlement>, now: i64) {
    let settles = settlements
        .into_iter()
        .map(|settlement| Settle {
            lease: leases
                .iter()
                .find(|l| l.delivery_id == settlement.delivery_id())
                .map_or(LeaseToken::NONE, |l| l.token),
            settlement,
            trail: None,
        })
        .collect();
    spool.record(settles, UnixMs(now)).await.unwrap();
}

/// What a spool of [`spools`] leaves behind and removes when dropped.
type Cleanup = Box<dyn std::any::Any>;

/// Every spool the relay ships, each fresh: SQLite in a temp dir, and
/// PostgreSQL in a schema of its own when the test database is configured
/// (see [`postgres::testing::test_url`]).
async fn spools() -> Vec<(&'static str, Arc<dyn Roles>, Cleanup)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteSpool::open(&dir.path().join("spool.db")).unwrap();
    let mut spools: Vec<(&'static str, Arc<dyn Roles>, Cleanup)> =
        vec![("sqlite", Arc::new(sqlite), Box::new(dir))];
    if let Some(url) = postgres::testing::test_url() {
        let schema = postgres::testing::TestSchema::new(&url);
        let pg = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
            .await
            .unwrap_or_else(|e| panic!("the test database at {url}: {e}"));
        spools.push(("postgres", Arc::new(pg), Box::new(schema)));
    }
    spools
}

#[tokio::test]
async fn dedup_key_is_unique_within_the_window_and_reusable_after() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, event("k1", &["a"], 1_000), 1_000).await;
        let again = spool
            .enqueue(event("k1", &["a"], 2_000), UnixMs(2_000), WINDOW)
            .await
            .unwrap();
        assert_eq!(again, Enqueued::Duplicate, "{name}");
        let later = 1_000 + WINDOW_MS;
        let after = spool
            .enqueue(event("k1", &["a"], later), UnixMs(later), WINDOW)
            .await
            .unwrap();
        assert!(
            matches!(after, Enqueued::Stored { .. }),
            "{name}: expired key is reusable"
        );
    }
}

#[tokio::test]
async fn racing_enqueues_of_one_key_store_exactly_one() {
    for (name, spool, _cleanup) in spools().await {
        let attempts: Vec<_> = (0..16)
            .map(|_| spool.enqueue(event("race", &["a", "b"], 5), UnixMs(5), WINDOW))
            .collect();
        let mut stored = 0;
        for a in attempts {
            if matches!(a.await.unwrap(), Enqueued::Stored { .. }) {
                stored += 1;
            }
        }
        assert_eq!(stored, 1, "{name}");
        let leased = spool.lease("a", UnixMs(5), 100, ms(1_000)).await.unwrap();
        assert_eq!(leased.len(), 1, "{name}");
    }
}

#[tokio::test]
async fn lease_hides_a_delivery_until_the_lease_ends() {
    for (name, spool, _cleanup) in spools().await {
        let (_, ids) = stored(&*spool, event("k", &["a", "b"], 10), 10).await;
        let first = spool.lease("a", UnixMs(10), 10, ms(1_000)).await.unwrap();
        assert_eq!(first.len(), 1, "{name}");
        assert_eq!(first[0].delivery_id, ids[0]);
        assert_eq!(first[0].event.xml, "<xml><K>k</K></xml>");
        assert_eq!(first[0].event.body, &b"<xml>k</xml>"[..]);
        assert!(
            spool
                .lease("a", UnixMs(500), 10, ms(1_000))
                .await
                .unwrap()
                .is_empty(),
            "{name}: hidden"
        );
        let again = spool
            .lease("a", UnixMs(1_010), 10, ms(1_000))
            .await
            .unwrap();
        assert_eq!(again.len(), 1, "{name}: due again after the lease");
        assert_eq!(
            spool
                .lease("b", UnixMs(10), 10, ms(1_000))
                .await
                .unwrap()
                .len(),
            1,
            "{name}"
        );
    }
}

#[tokio::test]
async fn not_due_yet_is_not_leased() {
    for (name, spool, _cleanup) in spools().await {
        let mut e = event("k", &["a"], 10);
        e.targets[0].due_at = UnixMs(4_010);
        stored(&*spool, e, 10).await;
        assert!(
            spool
                .lease("a", UnixMs(4_009), 10, ms(1))
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        assert_eq!(
            spool
                .lease("a", UnixMs(4_010), 10, ms(1))
                .await
                .unwrap()
                .len(),
            1,
            "{name}"
        );
    }
}

#[tokio::test]
async fn delivered_removes_the_event_once_every_target_has_it() {
    for (name, spool, _cleanup) in spools().await {
        let (event_id, ids) = stored(&*spool, event("k", &["a", "b"], 0), 0).await;
        settle(
            &*spool,
            &[],
            vec![Settlement::Delivered {
                delivery_id: ids[0],
            }],
            1,
        )
        .await;
        assert!(
            spool.event(event_id).await.unwrap().is_some(),
            "{name}: b still pending"
        );
        settle(
            &*spool,
            &[],
            vec![Settlement::Delivered {
                delivery_id: ids[1],
            }],
            2,
        )
        .await;
        assert!(spool.event(event_id).await.unwrap().is_none(), "{name}");
        assert!(spool.depth().await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn retry_counts_attempts_and_reschedules() {
    for (name, spool, _cleanup) in spools().await {
        let (_, ids) = stored(&*spool, event("k", &["a"], 0), 0).await;
        let leases = spool.lease("a", UnixMs(0), 1, ms(100)).await.unwrap();
        let retry = Settlement::Retry {
            delivery_id: ids[0],
            next_at: UnixMs(5_000),
            schedule: Schedule {
                step: 1,
                due_at: UnixMs(5_000),
            },
            not_before: UnixMs(0),
            error: "HTTP 503".into(),
        };
        settle(&*spool, &leases, vec![retry], 10).await;
        assert!(
            spool
                .lease("a", UnixMs(4_999), 1, ms(100))
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        let leased = spool.lease("a", UnixMs(5_000), 1, ms(100)).await.unwrap();
        assert_eq!(leased[0].attempts, 1, "{name}");
        assert_eq!(
            leased[0].schedule,
            Schedule {
                step: 1,
                due_at: UnixMs(5_000)
            },
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_settled_lease_is_released_and_backoff_can_be_cut_short() {
    for (name, spool, _cleanup) in spools().await {
        let (_, ids) = stored(&*spool, event("k", &["a"], 0), 0).await;
        let leases = spool.lease("a", UnixMs(0), 10, ms(60_000)).await.unwrap();
        assert_eq!(leases.len(), 1);
        let retry = Settlement::Retry {
            delivery_id: ids[0],
            next_at: UnixMs(30_000),
            schedule: Schedule {
                step: 1,
                due_at: UnixMs(30_000),
            },
            not_before: UnixMs(0),
            error: "HTTP 503".into(),
        };
        settle(&*spool, &leases, vec![retry], 1).await;
        assert!(
            spool
                .lease("a", UnixMs(2), 10, ms(60_000))
                .await
                .unwrap()
                .is_empty(),
            "{name}: backing off"
        );
        assert_eq!(
            spool.release_backoff("a", UnixMs(3)).await.unwrap(),
            1,
            "{name}"
        );
        let again = spool.lease("a", UnixMs(3), 10, ms(60_000)).await.unwrap();
        assert_eq!(
            again.len(),
            1,
            "{name}: due at once, though the lease had not ended"
        );
        assert_eq!(again[0].attempts, 1, "{name}");
        assert_eq!(
            again[0].schedule,
            Schedule {
                step: 1,
                due_at: UnixMs(30_000)
            },
            "{name}: a release leaves the schedule where it was"
        );
    }
}

#[tokio::test]
async fn dead_letters_are_listed_filtered_replayed_and_purged() {
    for (name, spool, _cleanup) in spools().await {
        let (_, a) = stored(&*spool, event("k1", &["a"], 0), 0).await;
        let (_, b) = stored(&*spool, event("k2", &["b"], 0), 0).await;
        stored(&*spool, event("k3", &[], 0), 0).await;
        let dead = |id: DeliveryId, why: DeadReason| Settlement::Dead {
            delivery_id: id,
            reason: why,
            error: "HTTP 400: bad".into(),
        };
        settle(&*spool, &[], vec![dead(a[0], DeadReason::Rejected)], 100).await;
        settle(&*spool, &[], vec![dead(b[0], DeadReason::Exhausted)], 200).await;

        let all = spool
            .dead_letters(DeadFilter::default(), 100)
            .await
            .unwrap();
        assert_eq!(all.len(), 3, "{name}");
        let unrouted: Vec<_> = all
            .iter()
            .filter(|d| d.reason == DeadReason::Unrouted)
            .collect();
        assert_eq!(unrouted.len(), 1, "{name}");
        assert_eq!(unrouted[0].target, None);

        let only_a = DeadFilter {
            target: Some("a".into()),
            ..Default::default()
        };
        let listed = spool.dead_letters(only_a.clone(), 100).await.unwrap();
        assert_eq!(listed.len(), 1, "{name}");
        assert_eq!(listed[0].last_error, "HTTP 400: bad");
        assert_eq!(listed[0].attempts, 1);
        let window = DeadFilter {
            since: Some(UnixMs(150)),
            until: Some(UnixMs(250)),
            ..Default::default()
        };
        assert_eq!(
            spool.dead_letters(window, 100).await.unwrap()[0]
                .target
                .as_deref(),
            Some("b")
        );

        assert_eq!(
            spool.replay(only_a, UnixMs(300)).await.unwrap(),
            1,
            "{name}"
        );
        let back = spool.lease("a", UnixMs(300), 10, ms(100)).await.unwrap();
        assert_eq!(back.len(), 1, "{name}: replayed is due");
        assert_eq!(back[0].attempts, 0, "{name}: attempts reset");

        let unrouted_filter = DeadFilter {
            reason: Some(DeadReason::Unrouted),
            ..Default::default()
        };
        assert_eq!(
            spool
                .replay(unrouted_filter.clone(), UnixMs(300))
                .await
                .unwrap(),
            0,
            "{name}"
        );
        assert_eq!(spool.purge(unrouted_filter).await.unwrap(), 1, "{name}");
        assert_eq!(
            spool
                .dead_letters(DeadFilter::default(), 100)
                .await
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn removed_targets_dead_letter_their_pending_deliveries() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, event("k", &["kept", "gone"], 0), 0).await;
        assert_eq!(
            spool
                .retire_targets(vec!["kept".into()], UnixMs(7))
                .await
                .unwrap(),
            vec![("gone".to_string(), 1)],
            "{name}"
        );
        let dead = spool.dead_letters(DeadFilter::default(), 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, DeadReason::TargetRemoved);
        assert_eq!(dead[0].target.as_deref(), Some("gone"));
        assert_eq!(
            spool
                .lease("kept", UnixMs(0), 10, ms(1))
                .await
                .unwrap()
                .len(),
            1,
            "{name}"
        );
    }
}

#[tokio::test]
async fn depth_counts_pending_per_target_with_the_oldest_arrival() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, event("k1", &["a"], 100), 100).await;
        stored(&*spool, event("k2", &["a", "b"], 200), 200).await;
        let depth = spool.depth().await.unwrap();
        assert_eq!(
            depth,
            vec![
                TargetDepth {
                    target: "a".into(),
                    pending: 2,
                    oldest_received_at: Some(UnixMs(100))
                },
                TargetDepth {
                    target: "b".into(),
                    pending: 1,
                    oldest_received_at: Some(UnixMs(200))
                },
            ],
            "{name}"
        );
    }
}

#[tokio::test]
async fn sqlite_spool_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let event_id = {
        let spool = SqliteSpool::open(&path).unwrap();
        let (event_id, _) = stored(&spool, event("persist", &["a"], 0), 0).await;
        spool.close();
        event_id
    };
    let spool = SqliteSpool::open(&path).unwrap();
    let e = spool
        .event(event_id)
        .await
        .unwrap()
        .expect("event survives");
    assert_eq!(e.dedup_key, "persist");
    assert_eq!(
        spool
            .enqueue(event("persist", &["a"], 1), UnixMs(1), WINDOW)
            .await
            .unwrap(),
        Enqueued::Duplicate,
        "dedup survives a restart"
    );
    assert_eq!(
        spool.lease("a", UnixMs(0), 10, ms(1)).await.unwrap().len(),
        1
    );
}

#[tokio::test]
async fn a_closed_spool_refuses_work() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(&dir.path().join("spool.db")).unwrap();
    spool.close();
    assert!(matches!(spool.probe().await, Err(SpoolError::Closed)));
}

#[tokio::test]
async fn release_spares_untried_deliveries_and_those_held_by_retry_after() {
    for (name, spool, _cleanup) in spools().await {
        // Not tried yet and due later (a reply target's delivery awaiting its inline attempt).
        let mut later = event("later", &["a"], 0);
        later.targets[0].due_at = UnixMs(9_000);
        stored(&*spool, later, 0).await;
        // Failed with Retry-After: 120 s.
        let (_, held) = stored(&*spool, event("held", &["a"], 0), 0).await;
        // Failed without one.
        let (_, plain) = stored(&*spool, event("plain", &["a"], 0), 0).await;
        let leases = spool.lease("a", UnixMs(0), 10, ms(60_000)).await.unwrap();
        settle(
            &*spool,
            &leases,
            vec![failed_once(held[0], 120_000), failed_once(plain[0], 0)],
            1,
        )
        .await;
        assert_eq!(
            spool.release_backoff("a", UnixMs(2)).await.unwrap(),
            1,
            "{name}: only the plain failure"
        );
        let due = spool.lease("a", UnixMs(2), 10, ms(60_000)).await.unwrap();
        assert_eq!(due.len(), 1, "{name}");
        assert_eq!(due[0].delivery_id, plain[0], "{name}");
    }
}

#[tokio::test]
async fn a_record_repeated_after_the_event_is_gone_touches_no_later_event() {
    for (name, spool, _cleanup) in spools().await {
        let (_, first) = stored(&*spool, event("k1", &["a"], 0), 0).await;
        let done = || Settlement::Delivered {
            delivery_id: first[0],
        };
        settle(&*spool, &[], vec![done()], 1).await;
        let (_, second) = stored(&*spool, event("k2", &["a"], 2), 2).await;
        assert_ne!(second[0], first[0], "{name}: ids are never reused");
        settle(&*spool, &[], vec![done()], 3).await;
        assert_eq!(
            spool.waiting("a", 10).await.unwrap().len(),
            1,
            "{name}: k2 still pending"
        );
    }
}

/// A fresh schema on the test database, for the PostgreSQL-only tests;
/// `None` (the test skipped) when none is configured.
fn pg_schema() -> Option<postgres::testing::TestSchema> {
    postgres::testing::test_url().map(|url| postgres::testing::TestSchema::new(&url))
}

/// One replica's spool on `schema`.
async fn pg_replica(schema: &postgres::testing::TestSchema) -> PostgresSpool {
    PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
        .await
        .unwrap()
}

/// Fifty events from `make(i, now)`, each stored with a one-second dedup
/// window ten seconds after the one before and delivered at once: every key
/// but the newest few expires long before the next prune.
async fn fifty_short_lived(spool: &dyn Roles, make: impl Fn(usize, i64) -> NewEvent) {
    let mut now = 0;
    for i in 0..50 {
        let mut e = make(i, now);
        e.event.received_at = UnixMs(now);
        let Enqueued::Stored { deliveries, .. } =
            spool.enqueue(e, UnixMs(now), ms(1_000)).await.unwrap()
        else {
            panic!("stored")
        };
        let done = Settlement::Delivered {
            delivery_id: deliveries[0],
        };
        settle(spool, &[], vec![done], now).await;
        now += 10_000;
    }
}

#[tokio::test]
async fn expired_dedup_keys_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let spool = SqliteSpool::open(&path).unwrap();
    fifty_short_lived(&spool, |i, _| event(&format!("k{i}"), &["a"], 0)).await;
    spool.close();
    let c = rusqlite::Connection::open(&path).unwrap();
    let live: i64 = c
        .query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))
        .unwrap();
    assert!(live <= 4, "{live} dedup keys kept of 50");
}

#[tokio::test]
async fn a_release_can_pick_one_delivery_and_pass_a_retry_after() {
    for (name, spool, _cleanup) in spools().await {
        let (_, one) = stored(&*spool, event("one", &["a"], 0), 0).await;
        let (_, two) = stored(&*spool, event("two", &["a"], 0), 0).await;
        let (_, held) = stored(&*spool, event("held", &["a"], 0), 0).await;
        let leases = spool.lease("a", UnixMs(0), 10, ms(60_000)).await.unwrap();
        settle(
            &*spool,
            &leases,
            vec![
                failed_once(one[0], 0),
                failed_once(two[0], 0),
                failed_once(held[0], 120_000),
            ],
            1,
        )
        .await;
        let only = |id: DeliveryId, past_retry_after: bool| Release {
            target: "a".into(),
            delivery_id: Some(id),
            past_retry_after,
        };
        assert_eq!(
            spool.release(only(two[0], false), UnixMs(2)).await.unwrap(),
            1
        );
        assert_eq!(
            spool
                .release(only(held[0], false), UnixMs(2))
                .await
                .unwrap(),
            0,
            "{name}: Retry-After holds"
        );
        assert_eq!(
            spool.release(only(held[0], true), UnixMs(2)).await.unwrap(),
            1
        );
        let mut due: Vec<DeliveryId> = spool
            .lease("a", UnixMs(2), 10, ms(60_000))
            .await
            .unwrap()
            .iter()
            .map(|l| l.delivery_id)
            .collect();
        due.sort_unstable();
        assert_eq!(due, vec![two[0], held[0]], "{name}");
        let waiting = spool.waiting("a", 10).await.unwrap();
        let rest = waiting.iter().find(|p| p.delivery_id == one[0]).unwrap();
        assert_eq!(rest.next_at, UnixMs(120_000), "{name}: the others wait");
        assert_eq!(
            rest.schedule,
            Schedule {
                step: 1,
                due_at: UnixMs(120_000)
            },
            "{name}"
        );
        let released = waiting.iter().find(|p| p.delivery_id == held[0]).unwrap();
        assert_eq!(
            (released.schedule.due_at, released.not_before),
            (UnixMs(120_000), UnixMs(120_000)),
            "{name}: due now, its schedule and the target's wish kept"
        );
    }
}

#[tokio::test]
async fn a_guarded_query_refuses_another_body_and_passes_the_same_one_to_dedup() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, guarded("k1", "q", "body", 1_000, 9_000), 1_000).await;
        let forged = guarded_outcome(&*spool, guarded("k2", "q", "forged", 2_000, 9_000)).await;
        assert_eq!(forged, Enqueued::Replayed, "{name}");
        let resent = guarded_outcome(&*spool, guarded("k1", "q", "body", 3_000, 9_000)).await;
        assert_eq!(resent, Enqueued::Duplicate, "{name}");
        // The same body under a fresh query is new when its dedup key is.
        stored(&*spool, guarded("k3", "q2", "forged", 3_000, 9_000), 3_000).await;
        // Unguarded events never meet the guard.
        stored(&*spool, event("k4", &["a"], 3_000), 3_000).await;
        let leased = spool
            .lease("a", UnixMs(3_000), 100, ms(1_000))
            .await
            .unwrap();
        let keys: Vec<&str> = leased.iter().map(|l| l.event.dedup_key.as_str()).collect();
        assert_eq!(
            keys,
            ["k1", "k3", "k4"],
            "{name}: nothing of the replay stored"
        );
    }
}

#[tokio::test]
async fn a_spool_file_from_before_the_schedule_columns_is_migrated() {
    let (_dir, path) = earlier_file("1, 'a', 0, 3, 7000, 'HTTP 503', 0");
    let spool = SqliteSpool::open(&path).unwrap();
    let leased = spool
        .lease("a", UnixMs(7_000), 10, ms(1_000))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(
        (leased[0].attempts, leased[0].schedule),
        (
            3,
            Schedule {
                step: 3,
                due_at: UnixMs(7_000)
            }
        ),
        "its place on the schedule is what it had"
    );
    spool.close();
    // Opening it again (the relay and an operator command) changes nothing.
    let again = SqliteSpool::open(&path).unwrap();
    assert_eq!(again.waiting("a", 10).await.unwrap()[0].schedule.step, 3);
}

#[tokio::test]
async fn a_release_does_not_hand_out_a_delivery_being_sent() {
    for (name, spool, _cleanup) in spools().await {
        let (_, ids) = stored(&*spool, event("k", &["a"], 0), 0).await;
        let leases = spool.lease("a", UnixMs(0), 10, ms(60_000)).await.unwrap();
        settle(&*spool, &leases, vec![failed_once(ids[0], 0)], 1).await;
        assert_eq!(
            spool.release_backoff("a", UnixMs(2)).await.unwrap(),
            1,
            "{name}"
        );
        assert_eq!(
            spool
                .lease("a", UnixMs(2), 10, ms(60_000))
                .await
                .unwrap()
                .len(),
            1
        );
        // Released again (another success, an operator) while it is being sent.
        spool.release_backoff("a", UnixMs(3)).await.unwrap();
        assert!(
            spool
                .lease("a", UnixMs(3), 10, ms(60_000))
                .await
                .unwrap()
                .is_empty(),
            "{name}: still held by its lease"
        );
    }
}

#[tokio::test]
async fn a_guard_expires_when_its_query_goes_stale() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, guarded("k1", "q", "body", 1_000, 5_000), 1_000).await;
        let before = guarded_outcome(&*spool, guarded("k2", "q", "other", 4_999, 5_000)).await;
        assert_eq!(before, Enqueued::Replayed, "{name}");
        stored(&*spool, guarded("k3", "q", "other", 5_000, 9_000), 5_000).await;
        let after = guarded_outcome(&*spool, guarded("k4", "q", "third", 6_000, 9_000)).await;
        assert_eq!(
            after,
            Enqueued::Replayed,
            "{name}: the new body holds the guard"
        );
    }
}

#[tokio::test]
async fn racing_bodies_under_one_guard_store_exactly_one() {
    for (name, spool, _cleanup) in spools().await {
        let attempts: Vec<_> = (0..16)
            .map(|i| {
                let e = guarded(&format!("k{i}"), "q", &format!("body{i}"), 5, 9_000);
                spool.enqueue(e, UnixMs(5), WINDOW)
            })
            .collect();
        let mut outcomes = (0, 0);
        for a in attempts {
            match a.await.unwrap() {
                Enqueued::Stored { .. } => outcomes.0 += 1,
                Enqueued::Replayed => outcomes.1 += 1,
                Enqueued::Duplicate => panic!("{name}: distinct dedup keys"),
            }
        }
        assert_eq!(outcomes, (1, 15), "{name}");
    }
}

#[tokio::test]
async fn a_spool_file_from_before_the_replay_guard_opens_and_guards() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let old = rusqlite::Connection::open(&path).unwrap();
    old.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    old.execute_batch(EARLIER_TABLES).unwrap();
    old.execute_batch(
        "CREATE TABLE dedup (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;",
    )
    .unwrap();
    drop(old);
    let spool = SqliteSpool::open(&path).unwrap();
    stored(&spool, guarded("k1", "q", "body", 1_000, 9_000), 1_000).await;
    let forged = guarded_outcome(&spool, guarded("k2", "q", "forged", 2_000, 9_000)).await;
    assert_eq!(forged, Enqueued::Replayed);
    spool.probe().await.unwrap();
}

#[tokio::test]
async fn expired_replay_guards_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let spool = SqliteSpool::open(&path).unwrap();
    let mut now = 0;
    for i in 0..50 {
        let e = guarded(&format!("k{i}"), &format!("q{i}"), "b", now, now + 1_000);
        stored(&spool, e, now).await;
        now += vocab::PRUNE_EVERY.as_millis() as i64 / 3;
    }
    spool.close();
    let c = rusqlite::Connection::open(&path).unwrap();
    let live: i64 = c
        .query_row("SELECT COUNT(*) FROM replay", [], |r| r.get(0))
        .unwrap();
    assert!(live <= 4, "{live} replay guards kept of 50");
}

#[tokio::test]
async fn an_enqueue_hands_back_the_event_as_stored_with_its_id() {
    for (name, spool, _cleanup) in spools().await {
        let new = event("k", &["a"], 10);
        let given = new.event.clone();
        let Enqueued::Stored {
            event_id, event, ..
        } = spool.enqueue(new, UnixMs(10), WINDOW).await.unwrap()
        else {
            panic!("{name}: stored")
        };
        assert_eq!(*event, given, "{name}");
        assert_eq!(
            spool.event(event_id).await.unwrap().as_ref(),
            Some(&given),
            "{name}"
        );
        let leased = spool.lease("a", UnixMs(10), 1, ms(1_000)).await.unwrap();
        assert_eq!(
            (leased[0].event_id, &leased[0].event),
            (event_id, &given),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_settle_after_the_lease_was_taken_over_changes_nothing() {
    for (name, spool, _cleanup) in spools().await {
        let late_outcomes = [
            |id| Settlement::Dead {
                delivery_id: id,
                reason: DeadReason::Rejected,
                error: "HTTP 400".into(),
            },
            |id| Settlement::Delivered { delivery_id: id },
            |id| failed_once(id, 0),
        ];
        for (i, late) in late_outcomes.into_iter().enumerate() {
            let now = 10_000 * i as i64;
            let (_, ids) = stored(&*spool, event(&format!("k{i}"), &["a"], now), now).await;
            let first = spool.lease("a", UnixMs(now), 10, ms(1_000)).await.unwrap();
            // The first worker's lease ends; another worker takes the delivery.
            let second = spool.lease("a", UnixMs(now + 1_000), 10, ms(1_000));
            let second = second.await.unwrap();
            assert_eq!(second.len(), 1, "{name}: taken over once the lease ended");
            assert_ne!(first[0].token, second[0].token, "{name}");
            settle(&*spool, &first, vec![late(ids[0])], now + 1_100).await;
            let dead = spool.dead_letters(DeadFilter::default(), 10).await;
            assert!(
                dead.unwrap().is_empty(),
                "{name} {i}: the late outcome is ignored"
            );
            let waiting = spool.waiting("a", 10).await.unwrap();
            assert_eq!(waiting.len(), 1, "{name} {i}");
            assert_eq!(
                (waiting[0].attempts, waiting[0].next_at),
                (0, UnixMs(now)),
                "{name} {i}: no attempt counted, not rescheduled"
            );
            // The new owner's outcome is recorded.
            let done = Settlement::Delivered {
                delivery_id: ids[0],
            };
            settle(&*spool, &second, vec![done], now + 1_200).await;
            // Not `depth`, which a shared spool reads at most every few seconds.
            let waiting = spool.waiting("a", 10).await.unwrap();
            assert!(waiting.is_empty(), "{name} {i}");
        }
    }
}

/// `event` with the given order key on each of its deliveries.
fn ordered(key: &str, targets: &[&str], now: i64, order_key: &str) -> NewEvent {
    let mut e = event(key, targets, now);
    for d in &mut e.targets {
        d.order_key = Some(order_key.into());
    }
    e
}

/// The waiting listing holds a target's pending deliveries first due first,
/// those held back behind an earlier one of their user among the rest.
#[tokio::test]
async fn waiting_lists_held_back_deliveries_in_due_order() {
    for (name, spool, _cleanup) in spools().await {
        let (_, first) = stored(&*spool, ordered("k1", &["a"], 10, "u"), 10).await;
        let (_, free) = stored(&*spool, event("k2", &["a"], 20), 20).await;
        let (_, held) = stored(&*spool, ordered("k3", &["a"], 30, "u"), 30).await;
        let (_, later) = stored(&*spool, event("k4", &["a"], 40), 40).await;
        let listed: Vec<(DeliveryId, UnixMs)> = spool
            .waiting("a", 10)
            .await
            .unwrap()
            .iter()
            .map(|w| (w.delivery_id, w.next_at))
            .collect();
        let expected = [(&first, 10), (&free, 20), (&held, 30), (&later, 40)]
            .map(|(d, at)| (d[0], UnixMs(at)));
        assert_eq!(listed, expected, "{name}");
        let leased = spool.lease("a", UnixMs(40), 10, ms(60_000)).await.unwrap();
        assert_eq!(ids(&leased), [first[0], free[0], later[0]], "{name}");
        let two: Vec<DeliveryId> = spool
            .waiting("a", 2)
            .await
            .unwrap()
            .iter()
            .map(|w| w.delivery_id)
            .collect();
        assert_eq!(two, [first[0], free[0]], "{name}");
    }
}

fn ids(leases: &[Lease]) -> Vec<DeliveryId> {
    leases.iter().map(|l| l.delivery_id).collect()
}

#[tokio::test]
async fn a_delivered_outcome_settles_a_delivery_retired_while_in_flight() {
    for (name, spool, _cleanup) in spools().await {
        let (event_id, d) = stored(&*spool, event("k", &["gone"], 0), 0).await;
        let leases = spool
            .lease("gone", UnixMs(0), 10, ms(60_000))
            .await
            .unwrap();
        assert_eq!(ids(&leases), d);
        // A reload removes the target while the attempt is in flight.
        spool.retire_targets(vec![], UnixMs(5)).await.unwrap();
        let filter = DeadFilter {
            reason: Some(DeadReason::TargetRemoved),
            ..DeadFilter::default()
        };
        assert_eq!(
            spool.dead_letters(filter.clone(), 10).await.unwrap().len(),
            1,
            "{name}"
        );
        // The attempt succeeded: the target has it, nothing is left to replay.
        settle(
            &*spool,
            &leases,
            vec![Settlement::Delivered { delivery_id: d[0] }],
            10,
        )
        .await;
        assert!(
            spool.dead_letters(filter, 10).await.unwrap().is_empty(),
            "{name}"
        );
        assert_eq!(spool.event(event_id).await.unwrap(), None, "{name}");
        // Only a retirement yields: a refused delivery stays dead.
        let (_, r) = stored(&*spool, event("r", &["a"], 20), 20).await;
        let leases = spool.lease("a", UnixMs(20), 10, ms(60_000)).await.unwrap();
        let refused = Settlement::Dead {
            delivery_id: r[0],
            reason: DeadReason::Rejected,
            error: "HTTP 400".into(),
        };
        settle(&*spool, &leases, vec![refused], 21).await;
        settle(
            &*spool,
            &leases,
            vec![Settlement::Delivered { delivery_id: r[0] }],
            22,
        )
        .await;
        let dead = spool.dead_letters(DeadFilter::default(), 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{name}");
        assert_eq!(dead[0].reason, DeadReason::Rejected, "{name}");
    }
}

#[tokio::test]
async fn expired_deliveries_are_dead_letters_that_can_be_selected() {
    for (name, spool, _cleanup) in spools().await {
        let (_, d) = stored(&*spool, event("old", &["broker"], 0), 0).await;
        stored(&*spool, event("other", &["broker"], 0), 0).await;
        let leases = spool
            .lease("broker", UnixMs(0), 1, ms(60_000))
            .await
            .unwrap();
        let expired = Settlement::Dead {
            delivery_id: d[0],
            reason: DeadReason::Expired,
            error: "waited 11m, longer than max_age 10m".into(),
        };
        settle(&*spool, &leases, vec![expired], 660_000).await;
        let filter = DeadFilter {
            reason: Some(DeadReason::Expired),
            ..DeadFilter::default()
        };
        let dead = spool.dead_letters(filter.clone(), 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{name}");
        assert_eq!(
            (dead[0].delivery_id, dead[0].reason),
            (d[0], DeadReason::Expired)
        );
        assert_eq!(dead[0].attempts, 0, "{name}: expired, not sent");
        assert_eq!(
            spool.replay(filter, UnixMs(700_000)).await.unwrap(),
            1,
            "{name}"
        );
        // Replayed, it is untried and due from the replay on: its age for
        // max_age counts from there.
        let again = spool
            .lease("broker", UnixMs(700_000), 10, ms(1_000))
            .await
            .unwrap();
        let replayed = again.iter().find(|l| l.delivery_id == d[0]).unwrap();
        assert_eq!(
            (replayed.attempts, replayed.schedule.due_at),
            (0, UnixMs(700_000))
        );
    }
}

#[tokio::test]
async fn an_ordered_delivery_waits_while_an_earlier_one_of_its_user_is_pending() {
    for (name, spool, _cleanup) in spools().await {
        let (_, u1a) = stored(&*spool, ordered("1a", &["t", "u"], 0, "main|u1"), 0).await;
        let (_, u1b) = stored(&*spool, ordered("1b", &["t", "u"], 0, "main|u1"), 0).await;
        let (_, u2a) = stored(&*spool, ordered("2a", &["t"], 0, "main|u2"), 0).await;
        let (_, free) = stored(&*spool, event("free", &["t"], 0), 0).await;
        let first = spool.lease("t", UnixMs(0), 10, ms(1_000)).await.unwrap();
        assert_eq!(
            ids(&first),
            vec![u1a[0], u2a[0], free[0]],
            "{name}: 1b waits for 1a"
        );
        // The key holds back only its own target's deliveries.
        assert_eq!(
            ids(&spool.lease("u", UnixMs(0), 1, ms(1_000)).await.unwrap()),
            vec![u1a[1]]
        );
        // Backing off, the earlier one still holds the later one back.
        settle(&*spool, &first, vec![failed_once(u1a[0], 0)], 1).await;
        assert!(
            spool
                .lease("t", UnixMs(2), 10, ms(1_000))
                .await
                .unwrap()
                .is_empty(),
            "{name}: 1b waits while 1a backs off"
        );
        // Dead-lettered, it no longer does.
        let refused = Settlement::Dead {
            delivery_id: u1a[0],
            reason: DeadReason::Rejected,
            error: "HTTP 400".into(),
        };
        settle(&*spool, &first, vec![refused], 3).await;
        assert_eq!(
            ids(&spool.lease("t", UnixMs(4), 10, ms(1_000)).await.unwrap()),
            vec![u1b[0]]
        );
        // Delivered, it no longer does either.
        let (_, u2b) = stored(&*spool, ordered("2b", &["t"], 5, "main|u2"), 5).await;
        assert!(
            spool
                .lease("t", UnixMs(5), 10, ms(1_000))
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        settle(
            &*spool,
            &first,
            vec![Settlement::Delivered {
                delivery_id: u2a[0],
            }],
            6,
        )
        .await;
        assert_eq!(
            ids(&spool.lease("t", UnixMs(6), 10, ms(1_000)).await.unwrap()),
            vec![u2b[0]]
        );
    }
}

#[tokio::test]
async fn a_user_is_served_behind_a_long_backlog_of_another_held_back() {
    // More of one user's deliveries than a lease reads ahead in due order.
    const HELD: usize = 1_100;
    for (name, spool, _cleanup) in spools().await {
        let backlog: Vec<_> = (0..HELD)
            .map(|i| {
                let e = ordered(&format!("1-{i}"), &["t"], 0, "main|u1");
                spool.enqueue(e, UnixMs(0), WINDOW)
            })
            .collect();
        for enqueued in backlog {
            assert!(matches!(enqueued.await.unwrap(), Enqueued::Stored { .. }));
        }
        let (_, u2) = stored(&*spool, ordered("2", &["t"], 0, "main|u2"), 0).await;
        let (_, free) = stored(&*spool, event("free", &["t"], 0), 0).await;
        let head = spool.lease("t", UnixMs(0), 1, ms(1_000)).await.unwrap();
        assert_eq!(head.len(), 1, "{name}");
        assert_eq!(
            ids(&spool.lease("t", UnixMs(0), 10, ms(1_000)).await.unwrap()),
            vec![u2[0], free[0]],
            "{name}: the first user's backlog waits for its head, the others do not"
        );
    }
}

#[tokio::test]
async fn settles_of_many_deliveries_are_recorded_together() {
    for (name, spool, _cleanup) in spools().await {
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(
                stored(&*spool, event(&format!("k{i}"), &["a"], 0), 0)
                    .await
                    .1[0],
            );
        }
        let leases = spool.lease("a", UnixMs(0), 10, ms(60_000)).await.unwrap();
        assert_eq!(leases.len(), 6, "{name}");
        let dead = |id| Settlement::Dead {
            delivery_id: id,
            reason: DeadReason::Exhausted,
            error: "HTTP 503".into(),
        };
        let done = |id| Settlement::Delivered { delivery_id: id };
        settle(
            &*spool,
            &leases,
            vec![
                done(ids[0]),
                failed_once(ids[1], 0),
                dead(ids[2]),
                done(ids[3]),
                failed_once(ids[4], 0),
                dead(ids[5]),
            ],
            5,
        )
        .await;
        let waiting: Vec<DeliveryId> = spool
            .waiting("a", 10)
            .await
            .unwrap()
            .iter()
            .map(|w| w.delivery_id)
            .collect();
        assert_eq!(waiting, vec![ids[1], ids[4]], "{name}");
        let dead: Vec<DeliveryId> = spool
            .dead_letters(DeadFilter::default(), 10)
            .await
            .unwrap()
            .iter()
            .map(|d| d.delivery_id)
            .collect();
        assert_eq!(dead, vec![ids[2], ids[5]], "{name}");
    }
}

#[tokio::test]
async fn postgres_prunes_expired_keys_and_delivered_events() {
    let Some(schema) = pg_schema() else { return };
    let spool = pg_replica(&schema).await;
    fifty_short_lived(&spool, |i, now| {
        guarded(&format!("k{i}"), &format!("q{i}"), "b", now, now + 1_000)
    })
    .await;
    // Pruning runs beside the commits; wait for its last round.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while (schema.count("dedup") > 4 || schema.count("replay") > 4)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        schema.count("dedup") <= 4,
        "{} dedup keys kept of 50",
        schema.count("dedup")
    );
    assert!(
        schema.count("replay") <= 4,
        "{} guards kept of 50",
        schema.count("replay")
    );
    assert_eq!(schema.count("events"), 0, "delivered events are deleted");
    assert_eq!(schema.count("deliveries"), 0);
    spool.close().await;
}

#[tokio::test]
async fn a_spool_file_from_before_ordered_delivery_opens_and_orders() {
    let (_dir, path) = earlier_file("1, 't', 0, 0, 0, '', 0");
    let spool = SqliteSpool::open(&path).unwrap();
    let (_, a) = stored(&spool, ordered("a", &["t"], 0, "main|u1"), 0).await;
    stored(&spool, ordered("b", &["t"], 0, "main|u1"), 0).await;
    let leased = spool.lease("t", UnixMs(0), 10, ms(1_000)).await.unwrap();
    assert_eq!(
        leased.len(),
        2,
        "the old delivery has no key and is not held back"
    );
    assert_eq!(leased[1].delivery_id, a[0]);
    spool.close();
    let again = SqliteSpool::open(&path).unwrap();
    assert_eq!(again.waiting("t", 10).await.unwrap().len(), 3);
}

#[tokio::test]
async fn postgres_a_delivery_stored_by_one_replica_wakes_the_others_workers() {
    let Some(schema) = pg_schema() else { return };
    let (here, there) = (pg_replica(&schema).await, pg_replica(&schema).await);
    let (woken, mut wakes) = tokio::sync::mpsc::unbounded_channel();
    there.on_due_elsewhere(Box::new(move |target| {
        let _ = woken.send(target.to_owned());
    }));
    // The listener connects in the background: store until it hears one.
    let mut heard = None;
    for i in 0..100 {
        stored(&here, event(&format!("k{i}"), &["hooks", "crm"], 0), 0).await;
        let wait = std::time::Duration::from_millis(100);
        if let Ok(Some(target)) = tokio::time::timeout(wait, wakes.recv()).await {
            heard = Some(target);
            break;
        }
    }
    let first = heard.expect("the other replica is woken");
    let second = tokio::time::timeout(std::time::Duration::from_secs(5), wakes.recv())
        .await
        .unwrap()
        .unwrap();
    let mut targets = [first, second];
    targets.sort();
    assert_eq!(targets, ["crm", "hooks"]);
    here.close().await;
    there.close().await;
}

#[tokio::test]
async fn postgres_retires_only_targets_no_live_replica_names() {
    let Some(schema) = pg_schema() else { return };
    let (newer, older) = (pg_replica(&schema).await, pg_replica(&schema).await);
    let names = |n: &[&str]| n.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    stored(&newer, event("k", &["hooks", "added"], 0), 0).await;
    // A rolling change: one replica's configuration has the new target,
    // the other's not yet.
    let retired = newer.retire_targets(names(&["hooks", "added"]), UnixMs(1_000));
    assert_eq!(retired.await.unwrap(), vec![]);
    let retired = older.retire_targets(names(&["hooks"]), UnixMs(1_000));
    assert_eq!(retired.await.unwrap(), vec![], "another replica names it");
    // Once no replica heard from lately names it, it is retired.
    let later = 1_000 + postgres::TARGETS_HOLD_MS - 1;
    assert_eq!(
        older
            .retire_targets(names(&["hooks"]), UnixMs(later))
            .await
            .unwrap(),
        vec![],
        "the newer replica's word still holds"
    );
    let lapsed = UnixMs(later + 1);
    assert_eq!(
        older
            .retire_targets(names(&["hooks"]), lapsed)
            .await
            .unwrap(),
        vec![("added".to_string(), 1)]
    );
    // A replica that drops a target from its own list lets it go at once.
    stored(&newer, event("k2", &["hooks", "gone"], 0), 0).await;
    let now = UnixMs(later + 2);
    newer
        .retire_targets(names(&["hooks", "gone"]), now)
        .await
        .unwrap();
    assert_eq!(
        newer.retire_targets(names(&["hooks"]), now).await.unwrap(),
        vec![("gone".to_string(), 1)]
    );
    newer.close().await;
    older.close().await;
}

/// Two replicas store the same 400 pushes at once, one in ascending and the
/// other in descending order: every one is answered (no deadlock), each
/// stored once.
#[tokio::test]
async fn postgres_two_replicas_racing_store_each_push_once() {
    let Some(schema) = pg_schema() else { return };
    let (a, b) = (
        Arc::new(pg_replica(&schema).await),
        Arc::new(pg_replica(&schema).await),
    );
    let keys: Vec<String> = (0..400).map(|i| format!("key{i:04}")).collect();
    let mut racing = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let reversed = keys[keys.len() - 1 - i].clone();
        for (spool, key) in [(a.clone(), key.clone()), (b.clone(), reversed)] {
            racing.spawn(async move {
                let answer = spool
                    .enqueue(event(&key, &["t"], 5), UnixMs(5), WINDOW)
                    .await;
                (key, answer)
            });
        }
    }
    let mut stored = std::collections::HashMap::<String, u32>::new();
    while let Some(raced) = racing.join_next().await {
        let (key, answer) = raced.unwrap();
        match answer.unwrap() {
            Enqueued::Stored { .. } => *stored.entry(key).or_default() += 1,
            Enqueued::Duplicate => {}
            Enqueued::Replayed => panic!("no guard here"),
        }
    }
    assert_eq!(stored.len(), 400);
    assert!(stored.values().all(|n| *n == 1), "{stored:?}");
    assert_eq!(a.depth().await.unwrap()[0].pending, 400);
    a.close().await;
    b.close().await;
}

/// A push of a user stored while another replica's batch holding a push of
/// the same user is in flight draws its ids after that batch commits, so
/// ids (and the per-user order) follow the commits.
#[tokio::test]
async fn postgres_an_ordered_push_waits_for_a_batch_of_its_user_in_flight() {
    let Some(schema) = pg_schema() else { return };
    let spool = pg_replica(&schema).await;
    let (other, connection) =
        tokio_postgres::connect(schema.settings.url.expose(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let lock = format!(
        "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('{}|main|u1', 0))",
        schema.settings.schema
    );
    other.batch_execute(&lock).await.unwrap();
    let stored = spool.enqueue(ordered("k", &["t"], 0, "main|u1"), UnixMs(0), WINDOW);
    let mut stored = tokio::spawn(stored);
    let waited = tokio::time::timeout(std::time::Duration::from_millis(300), &mut stored).await;
    assert!(
        waited.is_err(),
        "stored while the user's other batch was in flight"
    );
    other.batch_execute("COMMIT").await.unwrap();
    let stored = stored.await.unwrap().unwrap();
    assert!(matches!(stored, Enqueued::Stored { .. }), "{stored:?}");
    spool.close().await;
}

/// The operator commands list "everything" as a limit of `usize::MAX`.
#[tokio::test]
async fn a_limit_of_everything_lists_everything() {
    for (name, spool, _cleanup) in spools().await {
        stored(&*spool, event("k", &[], 0), 0).await;
        stored(&*spool, event("w", &["a"], 0), 0).await;
        let dead = spool.dead_letters(DeadFilter::default(), usize::MAX).await;
        assert_eq!(dead.unwrap().len(), 1, "{name}");
        let waiting = spool.waiting("a", usize::MAX).await;
        assert_eq!(waiting.unwrap().len(), 1, "{name}");
    }
}

/// More dead letters than one purge batch holds are purged all the same.
#[tokio::test]
async fn a_large_purge_removes_every_selected_dead_letter_and_its_event() {
    for (name, spool, _cleanup) in spools().await {
        let stores: Vec<_> = (0..1_500)
            .map(|i| spool.enqueue(event(&format!("k{i}"), &[], 0), UnixMs(0), WINDOW))
            .collect();
        let mut first = None;
        for store in stores {
            if let Enqueued::Stored { event_id, .. } = store.await.unwrap() {
                first.get_or_insert(event_id);
            }
        }
        let all = DeadFilter::default();
        assert_eq!(spool.purge(all.clone()).await.unwrap(), 1_500, "{name}");
        assert!(
            spool.dead_letters(all, 10).await.unwrap().is_empty(),
            "{name}"
        );
        let first = first.unwrap();
        assert_eq!(spool.event(first).await.unwrap(), None, "{name}");
    }
}

#[tokio::test]
async fn an_event_keeps_its_family_codec_and_identifiers() {
    use crate::wechat::family::{Codec, Family};
    for (name, spool, _cleanup) in spools().await {
        let mut platform = event("op", &["a"], 1_000);
        platform.event.origin = Origin {
            appid: Some("wx00000000000000aa".into()),
            info_type: Some("authorized".into()),
            ..Origin::of(Family::OpenPlatform, Codec::Xml)
        };
        let mut mini = event("mp", &[], 1_000);
        mini.event.origin = Origin::of(Family::MiniProgram, Codec::Json);
        let mut wecom = event("wc", &["a"], 1_000);
        wecom.event.origin = Origin {
            agent_id: Some("1000002".into()),
            ..Origin::of(Family::Wecom, Codec::Xml)
        };
        let oa = event("oa", &["a"], 1_000);
        for e in [&platform, &mini, &wecom, &oa] {
            let (event_id, _) = stored(&*spool, e.clone(), 1_000).await;
            let read = spool.event(event_id).await.unwrap().unwrap();
            assert_eq!(read.origin, e.event.origin, "{name}");
        }
        let leased = spool
            .lease("a", UnixMs(1_000), 10, ms(1_000))
            .await
            .unwrap();
        let origins: Vec<&Origin> = leased.iter().map(|l| &l.event.origin).collect();
        assert_eq!(
            origins,
            [
                &platform.event.origin,
                &wecom.event.origin,
                &oa.event.origin
            ],
            "{name}"
        );
    }
}

fn ticket(account: &str, ticket: &str, create_time: i64, received_at: i64) -> ComponentTicket {
    ComponentTicket {
        account: account.into(),
        ticket: ticket.into(),
        create_time,
        received_at: UnixMs(received_at),
    }
}

#[tokio::test]
async fn the_newest_ticket_of_each_platform_is_kept() {
    for (name, spool, _cleanup) in spools().await {
        assert!(spool.tickets().await.unwrap().is_empty(), "{name}");
        assert!(spool.keep(ticket("op", "t1", 100, 1_000)).await.unwrap());
        assert!(spool.keep(ticket("op", "t3", 300, 3_000)).await.unwrap());
        // Older, or as old, arriving late (another replica, a re-send): ignored.
        assert!(
            !spool.keep(ticket("op", "t2", 200, 4_000)).await.unwrap(),
            "{name}"
        );
        assert!(
            !spool.keep(ticket("op", "t3b", 300, 5_000)).await.unwrap(),
            "{name}"
        );
        assert!(spool.keep(ticket("other", "u1", 50, 6_000)).await.unwrap());
        assert_eq!(
            spool.tickets().await.unwrap(),
            [
                ticket("op", "t3", 300, 3_000),
                ticket("other", "u1", 50, 6_000)
            ],
            "{name}"
        );
    }
}

fn late_reply(openid: &str, channel: crate::route::LateReply, at: i64) -> NewLateReply {
    NewLateReply {
        account: "main".into(),
        openid: openid.into(),
        channel,
        message: format!("{{\"msgtype\":\"text\",\"content\":\"{openid}\"}}"),
        pushed_at: UnixMs(at),
        expires_at: UnixMs(at + 1_000),
        due_at: UnixMs(at),
    }
}

/// The `customer_service` late replies due at `at`, each leased for a second.
async fn lease_at(spool: &dyn Roles, at: i64) -> Vec<HeldLateReply> {
    spool.lease_late(UnixMs(at), 10, ms(1_000)).await.unwrap()
}

/// A `customer_service` late reply is leased once at a time, settled only
/// under its own lease, due again when its lease ends unsettled, deleted
/// when sent and kept with WeChat's errcode when dead.
#[tokio::test]
async fn a_late_reply_is_leased_once_and_settled_under_its_lease() {
    use crate::route::LateReply::{CustomerService, NextMessage};
    for (name, spool, _cleanup) in spools().await {
        let first = spool
            .keep_late(late_reply("o1", CustomerService, 100))
            .await
            .unwrap();
        spool
            .keep_late(late_reply("o2", NextMessage, 100))
            .await
            .unwrap();
        let held = lease_at(&*spool, 100).await;
        assert_eq!(held.len(), 1, "{name}: only customer_service is sent");
        assert_eq!((held[0].id, held[0].openid.as_str()), (first, "o1"));
        assert!(lease_at(&*spool, 500).await.is_empty(), "{name}");
        // The lease ends unsettled (a crash mid-send): due again, a new lease.
        let again = lease_at(&*spool, 1_100).await;
        assert_eq!(again.len(), 1, "{name}");
        assert_ne!(again[0].lease, held[0].lease, "{name}");
        let stale = spool.settle_late(first, held[0].lease, LateOutcome::Sent, UnixMs(1_200));
        assert!(
            !stale.await.unwrap(),
            "{name}: the first lease's outcome changes nothing"
        );
        let retry = LateOutcome::Retry {
            next_at: UnixMs(5_000),
            errcode: -1,
            errmsg: "busy".into(),
        };
        assert!(spool
            .settle_late(first, again[0].lease, retry, UnixMs(1_200))
            .await
            .unwrap());
        assert!(lease_at(&*spool, 4_999).await.is_empty(), "{name}");
        let third = lease_at(&*spool, 5_000).await;
        assert_eq!(third[0].attempts, 1, "{name}");
        let dead = LateOutcome::Dead {
            errcode: 45015,
            errmsg: "response out of time limit".into(),
        };
        assert!(spool
            .settle_late(first, third[0].lease, dead, UnixMs(5_100))
            .await
            .unwrap());
        let letters = spool.dead_late(10).await.unwrap();
        assert_eq!(letters.len(), 1, "{name}");
        assert_eq!(
            (letters[0].errcode, letters[0].attempts),
            (45015, 2),
            "{name}"
        );
        assert_eq!(letters[0].channel, "customer_service", "{name}");
        let sent = spool
            .keep_late(late_reply("o3", CustomerService, 6_000))
            .await
            .unwrap();
        let held = lease_at(&*spool, 6_000).await;
        assert_eq!(held[0].id, sent);
        assert!(spool
            .settle_late(sent, held[0].lease, LateOutcome::Sent, UnixMs(6_100))
            .await
            .unwrap());
        assert!(lease_at(&*spool, 99_000).await.is_empty(), "{name}");
    }
}

/// A `next_message` late reply is taken once, by its own user's next push,
/// while it is fresh; an expired one becomes a dead letter.
#[tokio::test]
async fn a_next_message_late_reply_is_taken_once_while_fresh() {
    use crate::route::LateReply::NextMessage;
    for (name, spool, _cleanup) in spools().await {
        spool
            .keep_late(late_reply("o1", NextMessage, 100))
            .await
            .unwrap();
        spool
            .keep_late(late_reply("o2", NextMessage, 100))
            .await
            .unwrap();
        assert!(
            spool
                .take_next_late("other", "o1", UnixMs(200))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        let taken = spool
            .take_next_late("main", "o1", UnixMs(200))
            .await
            .unwrap();
        assert_eq!(taken.map(|t| t.openid), Some("o1".to_owned()), "{name}");
        assert!(
            spool
                .take_next_late("main", "o1", UnixMs(300))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        // o2's expires at 1_100.
        assert!(
            spool
                .take_next_late("main", "o2", UnixMs(1_100))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        let letters = spool.dead_late(10).await.unwrap();
        assert_eq!(letters.len(), 1, "{name}");
        assert_eq!(letters[0].errmsg, late::EXPIRED, "{name}");
    }
}

#[tokio::test]
async fn an_access_token_is_kept_per_account() {
    for (name, spool, _cleanup) in spools().await {
        assert!(spool.api_token("main").await.unwrap().is_none(), "{name}");
        let token = |t: &str, at: i64| ApiToken {
            account: "main".into(),
            token: t.into(),
            expires_at: UnixMs(at),
        };
        spool.keep_api_token(token("t1", 1_000)).await.unwrap();
        spool.keep_api_token(token("t2", 2_000)).await.unwrap();
        assert_eq!(
            spool.api_token("main").await.unwrap(),
            Some(token("t2", 2_000)),
            "{name}"
        );
        assert!(spool.api_token("other").await.unwrap().is_none(), "{name}");
    }
}

/// A replica not heard from for [`postgres::REPLICA_FORGOTTEN_MS`] (one
/// stopped for good, or renamed by its restart) leaves no row behind: the
/// next round of any live replica deletes its names. One heard from since
/// keeps them.
#[tokio::test]
async fn postgres_a_replica_long_gone_leaves_no_names_behind() {
    let Some(schema) = pg_schema() else { return };
    let spool = pg_replica(&schema).await;
    let now = 10 * postgres::REPLICA_FORGOTTEN_MS;
    let (gone, quiet) = (
        now - postgres::REPLICA_FORGOTTEN_MS,
        now - postgres::REPLICA_FORGOTTEN_MS + 1,
    );
    schema.execute(&format!(
        "INSERT INTO \"{}\".replica_targets (replica, target, seen_at)
         VALUES ('gone', 'hooks', {gone}), ('gone', 'crm', {gone}), ('quiet', 'hooks', {quiet})",
        schema.settings.schema
    ));
    let retired = spool.retire_targets(vec!["hooks".into()], UnixMs(now));
    assert_eq!(retired.await.unwrap(), vec![]);
    let rows =
        |replica: &str| schema.count(&format!("replica_targets WHERE replica = '{replica}'"));
    assert_eq!(rows("gone"), 0, "the gone replica's names are deleted");
    assert_eq!(
        rows("quiet"),
        1,
        "a replica heard from since keeps its names"
    );
    assert_eq!(
        schema.count("replica_targets"),
        2,
        "and the live one has its own"
    );
    spool.close().await;
}

/// After a large intake the spool analyzes its queue tables itself: the
/// planner's statistics do not wait for autovacuum, which may be off (as
/// here) or late, while a backlog built on tables it last saw empty.
#[tokio::test]
async fn postgres_a_large_intake_gets_fresh_statistics_without_autovacuum() {
    let Some(schema) = pg_schema() else { return };
    let spool = pg_replica(&schema).await;
    let s = &schema.settings.schema;
    for table in ["events", "deliveries", "dedup", "replay"] {
        schema.execute(&format!(
            "ALTER TABLE \"{s}\".{table} SET (autovacuum_enabled = off)"
        ));
    }
    let (client, connection) =
        tokio_postgres::connect(schema.settings.url.expose(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let planned = || async {
        let row = client
            .query_one(
                "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = 'deliveries'",
                &[s],
            )
            .await
            .unwrap();
        row.get::<_, f32>(0)
    };
    assert!(planned().await < 1.0, "never analyzed yet");
    let targets: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let rows = postgres::ANALYZE_AFTER_ROWS as usize;
    let stores: Vec<_> = (0..rows / targets.len())
        .map(|i| spool.enqueue(event(&format!("k{i}"), &targets, 0), UnixMs(0), WINDOW))
        .collect();
    for store in stores {
        assert!(matches!(store.await.unwrap(), Enqueued::Stored { .. }));
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while planned().await < rows as f32 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let planned = planned().await;
    assert!(
        planned >= rows as f32,
        "the planner counts {planned} deliveries"
    );
    spool.close().await;
}

/// After a large drain the spool vacuums its deliveries itself: the dead
/// index entries of the deliveries settled do not pile up in front of the
/// claim while autovacuum is off (as here) or late.
#[tokio::test]
async fn postgres_a_large_drain_is_vacuumed_without_autovacuum() {
    let Some(schema) = pg_schema() else { return };
    let spool = pg_replica(&schema).await;
    let s = &schema.settings.schema;
    for table in ["events", "deliveries", "dedup", "replay"] {
        schema.execute(&format!(
            "ALTER TABLE \"{s}\".{table} SET (autovacuum_enabled = off)"
        ));
    }
    let (client, connection) =
        tokio_postgres::connect(schema.settings.url.expose(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let vacuums = || async {
        let row = client
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables
                 WHERE schemaname = $1 AND relname = 'deliveries'",
                &[s],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let targets: Vec<String> = (0..10).map(|t| format!("t{t}")).collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let rows = postgres::VACUUM_AFTER_ROWS as usize;
    let stores: Vec<_> = (0..rows / targets.len())
        .map(|i| spool.enqueue(event(&format!("k{i}"), &targets, 0), UnixMs(0), WINDOW))
        .collect();
    for store in stores {
        assert!(matches!(store.await.unwrap(), Enqueued::Stored { .. }));
    }
    assert_eq!(vacuums().await, 0, "nothing settled, nothing vacuumed");
    let mut settled = 0;
    for target in &targets {
        let leases = spool
            .lease(target, UnixMs(1), rows, ms(60_000))
            .await
            .unwrap();
        let done = leases
            .iter()
            .map(|l| Settlement::Delivered {
                delivery_id: l.delivery_id,
            })
            .collect();
        settled += leases.len();
        settle(&spool, &leases, done, 2).await;
    }
    assert_eq!(settled, rows);
    assert_eq!(schema.count("deliveries"), 0);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while vacuums().await == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(vacuums().await > 0, "the deliveries were vacuumed");
    spool.close().await;
}

/// Dead late replies, and `next_message` ones nobody took, go once they are
/// older than the cutoff, a bounded batch at a time; pending ones that may
/// still be sent or given stay.
#[tokio::test]
async fn old_dead_and_untaken_late_replies_are_pruned_in_batches() {
    use crate::route::LateReply::{CustomerService, NextMessage};
    for (name, spool, _cleanup) in spools().await {
        let dead = LateOutcome::Dead {
            errcode: 45015,
            errmsg: "out of time".into(),
        };
        for (i, openid) in ["o1", "o2", "o3"].into_iter().enumerate() {
            spool
                .keep_late(late_reply(openid, CustomerService, 100))
                .await
                .unwrap();
            let held = lease_at(&*spool, 100 + i as i64 * 2_000).await;
            let settled = spool.settle_late(held[0].id, held[0].lease, dead.clone(), UnixMs(200));
            assert!(settled.await.unwrap(), "{name}");
        }
        // Untaken: it expires at 1_100.
        spool
            .keep_late(late_reply("o4", NextMessage, 100))
            .await
            .unwrap();
        // Still to be sent, and still fresh: never pruned.
        spool
            .keep_late(late_reply("o5", CustomerService, 50_000))
            .await
            .unwrap();
        spool
            .keep_late(late_reply("o6", NextMessage, 50_000))
            .await
            .unwrap();
        assert_eq!(
            spool.prune_late(UnixMs(150), 10).await.unwrap(),
            0,
            "{name}"
        );
        assert_eq!(
            spool.prune_late(UnixMs(10_000), 2).await.unwrap(),
            2,
            "{name}"
        );
        assert_eq!(
            spool.prune_late(UnixMs(10_000), 10).await.unwrap(),
            2,
            "{name}"
        );
        assert_eq!(
            spool.prune_late(UnixMs(10_000), 10).await.unwrap(),
            0,
            "{name}"
        );
        assert!(spool.dead_late(10).await.unwrap().is_empty(), "{name}");
        assert_eq!(lease_at(&*spool, 50_000).await.len(), 1, "{name}");
        let fresh = spool.take_next_late("main", "o6", UnixMs(50_100)).await;
        assert!(fresh.unwrap().is_some(), "{name}");
    }
}
