//! The trail's part of the spool's contract, on every engine: what a push,
//! each attempt and each end write, what a search finds, and what is never
//! kept.

use super::*;
use crate::trail::{Dedup, ReplyOutcome, TrailOutcome, TrailRefusal, TrailReply};

const WINDOW: Duration = Duration::from_secs(600);
const OPENID: &str = "oAbcDEFghijKLMnopQRSTuvwxyz9";
const KEY: &str = "a trail key for the contract tests";

trait TrailRoles: Intake + Work + Operator + TrailLog {}
impl<T: Intake + Work + Operator + TrailLog> TrailRoles for T {}

fn setup(keep_bodies: bool, max_events: u64) -> TrailSetup {
    TrailSetup {
        key: Some(TrailKey::from_secret(KEY)),
        keep_bodies,
        retain: Duration::from_secs(3600),
        max_events,
        max_refusals: 100_000,
    }
}

/// An engine's name, the spool, what it leaves behind and removes when
/// dropped, and its file (SQLite), for looking through it.
type Opened = (
    &'static str,
    Arc<dyn TrailRoles>,
    Box<dyn std::any::Any>,
    Option<std::path::PathBuf>,
);

/// Each engine with the trail on.
async fn spools(setup: TrailSetup) -> Vec<Opened> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let sqlite = SqliteSpool::open(&path).unwrap();
    sqlite.start_trail(setup.clone()).await.unwrap();
    let mut spools: Vec<Opened> = vec![("sqlite", Arc::new(sqlite), Box::new(dir), Some(path))];
    if let Some(url) = postgres::testing::test_url() {
        let schema = postgres::testing::TestSchema::new(&url);
        let pg = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
            .await
            .unwrap_or_else(|e| panic!("the test database at {url}: {e}"));
        pg.start_trail(setup).await.unwrap();
        spools.push(("postgres", Arc::new(pg), Box::new(schema), None));
    }
    spools
}

fn push(key: &str, targets: &[&str], now: i64) -> NewEvent {
    NewEvent {
        event: Event {
            dedup_key: key.into(),
            account: "main".into(),
            received_at: UnixMs(now),
            query: "signature=s&timestamp=1&nonce=n".into(),
            body: format!("<xml><FromUserName>{OPENID}</FromUserName></xml>")
                .into_bytes()
                .into(),
            xml: format!("<xml><FromUserName>{OPENID}</FromUserName></xml>"),
            fields: "{}".into(),
            msg_type: "event".into(),
            event_type: Some("SCAN".into()),
            origin: Origin::default(),
            trace_context: None,
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
        trail: Some(Box::new(TrailPush {
            mode: "secure",
            scene: Some(format!("scene-{key}")),
            msg_id: None,
            ticket: true,
            openid_hash: Some(TrailKey::from_secret(KEY).hash(OPENID)),
            openid_mask: Some(crate::trail::mask(OPENID)),
            budget_ms: 4_000,
            reply_inline: key == "inline",
            started: std::time::Instant::now(),
        })),
    }
}

fn attempt(n: u32, status: Option<u16>, at: i64) -> Option<Box<TrailAttempt>> {
    Some(Box::new(TrailAttempt {
        at: UnixMs(at),
        target: "a".into(),
        attempt: n,
        inline: false,
        status,
        error: status.is_none().then(|| "timeout".to_owned()),
        latency_ms: 12,
        response: "busy\\n".into(),
        circuit: "closed".into(),
    }))
}

async fn one(spool: &dyn TrailRoles, filter: TrailFilter) -> TrailEvent {
    let mut found = spool.search(filter).await.unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");
    found.remove(0)
}

fn by_event(id: EventId) -> TrailFilter {
    TrailFilter {
        event_id: Some(id),
        ..TrailFilter::default()
    }
}

/// A push stored at `now`, for pruning to follow the clock.
async fn after_notes(spool: &dyn TrailRoles, now: i64) {
    spool
        .enqueue(push(&format!("flush-{now}"), &[], now), UnixMs(now), WINDOW)
        .await
        .unwrap();
}

/// The one event `filter` selects once `written` holds: notes are written
/// after the commit they follow, with the next one or by a task of their
/// own; `None` after 10 s.
async fn once(
    spool: &dyn TrailRoles,
    filter: TrailFilter,
    written: impl Fn(&TrailEvent) -> bool,
) -> Option<TrailEvent> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let found = spool.search(filter.clone()).await.unwrap();
        if let [event] = &found[..] {
            if written(event) {
                return Some(event.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Stores a push; its event and delivery ids.
async fn stored(
    spool: &dyn TrailRoles,
    key: &str,
    targets: &[&str],
    now: i64,
) -> (EventId, Vec<DeliveryId>) {
    let e = push(key, targets, now);
    match spool.enqueue(e, UnixMs(now), WINDOW).await.unwrap() {
        Enqueued::Stored {
            event_id,
            deliveries,
            ..
        } => (event_id, deliveries),
        other => panic!("not stored: {other:?}"),
    }
}

#[tokio::test]
async fn a_push_its_attempts_in_order_and_its_end_are_in_the_trail() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        let (event_id, deliveries) = stored(&*spool, "inline", &["a"], 1_000).await;
        let lease = spool
            .lease("a", UnixMs(1_000), 1, Duration::from_secs(30))
            .await
            .unwrap();
        let failed = Settle {
            lease: lease[0].token,
            settlement: Settlement::Retry {
                delivery_id: deliveries[0],
                next_at: UnixMs(2_000),
                schedule: Schedule::default(),
                not_before: UnixMs(0),
                error: "no answer".into(),
            },
            trail: attempt(1, None, 1_100),
        };
        spool.record(vec![failed], UnixMs(1_200)).await.unwrap();
        let pending = one(&*spool, by_event(event_id)).await;
        assert_eq!(pending.outcome, TrailOutcome::Pending, "{name}");
        let lease = spool
            .lease("a", UnixMs(2_000), 1, Duration::from_secs(30))
            .await
            .unwrap();
        let delivered = Settle {
            lease: lease[0].token,
            settlement: Settlement::Delivered {
                delivery_id: deliveries[0],
            },
            trail: attempt(2, Some(200), 2_100),
        };
        spool.record(vec![delivered], UnixMs(2_200)).await.unwrap();
        assert!(spool.note(TrailNote::Reply {
            event_id,
            reply: TrailReply {
                outcome: ReplyOutcome::None,
                latency_ms: 7,
                budget_ms: 4_000,
            },
        }));
        let e = once(&*spool, by_event(event_id), |e| e.reply.is_some())
            .await
            .unwrap_or_else(|| panic!("{name}: the reply is not in the trail"));
        assert_eq!(e.event_id, Some(event_id), "{name}");
        assert_eq!(e.outcome, TrailOutcome::Delivered, "{name}");
        assert_eq!(e.dedup, Dedup::New, "{name}");
        assert_eq!(e.route, vec!["a".to_owned()], "{name}");
        assert_eq!((e.mode.as_str(), e.ticket), ("secure", true), "{name}");
        assert_eq!(e.scene.as_deref(), Some("scene-inline"), "{name}");
        assert_eq!(e.openid.as_deref(), Some("oAbc…xyz9"), "{name}");
        let attempts: Vec<_> = e
            .attempts
            .iter()
            .map(|a| (a.attempt, a.status, a.error.as_deref()))
            .collect();
        assert_eq!(
            attempts,
            vec![(1, None, Some("timeout")), (2, Some(200), None)],
            "{name}"
        );
        assert_eq!(e.attempts[0].response, "busy\\n", "{name}");
        assert_eq!(e.attempts[0].circuit, "closed", "{name}");
        assert_eq!(e.ends.len(), 1, "{name}");
        assert_eq!(
            (e.ends[0].target.as_str(), e.ends[0].end.as_str()),
            ("a", "delivered"),
            "{name}"
        );
        let reply = e.reply.expect("reply");
        assert_eq!(
            (reply.outcome, reply.latency_ms, reply.budget_ms),
            (ReplyOutcome::None, 7, 4_000),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_search_by_the_full_openid_finds_its_pushes_and_duplicates_are_marked() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        spool
            .enqueue(push("k1", &["a"], 1_000), UnixMs(1_000), WINDOW)
            .await
            .unwrap();
        let again = spool
            .enqueue(push("k1", &["a"], 1_500), UnixMs(1_500), WINDOW)
            .await
            .unwrap();
        assert_eq!(again, Enqueued::Duplicate, "{name}");
        let found = spool
            .search(TrailFilter {
                openid: Some(OPENID.into()),
                ..TrailFilter::default()
            })
            .await
            .unwrap();
        let dedup: Vec<Dedup> = found.iter().map(|e| e.dedup).collect();
        assert_eq!(
            dedup,
            vec![Dedup::Duplicate, Dedup::New],
            "{name}: newest first"
        );
        assert_eq!(found[0].outcome, TrailOutcome::Delivered, "{name}");
        assert_eq!(
            found[0].reply.as_ref().map(|r| r.outcome),
            Some(ReplyOutcome::None),
            "{name}"
        );
        let other = TrailFilter {
            openid: Some("oSomeoneElse0000000000000000".into()),
            ..TrailFilter::default()
        };
        assert!(spool.search(other).await.unwrap().is_empty(), "{name}");
        let by_scene = TrailFilter {
            scene: Some("scene-k1".into()),
            target: Some("a".into()),
            since: Some(UnixMs(1_200)),
            ..TrailFilter::default()
        };
        assert_eq!(
            one(&*spool, by_scene).await.dedup,
            Dedup::Duplicate,
            "{name}"
        );
        let wrong_target = TrailFilter {
            target: Some("b".into()),
            ..TrailFilter::default()
        };
        assert!(
            spool.search(wrong_target).await.unwrap().is_empty(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn dead_expired_retired_and_unrouted_ends_are_recorded() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        let (rejected, d1) = stored(&*spool, "rejected", &["a"], 1_000).await;
        let (expired, d2) = stored(&*spool, "expired", &["a"], 1_000).await;
        let (retired, _) = stored(&*spool, "retired", &["gone"], 1_000).await;
        let (unrouted, _) = stored(&*spool, "unrouted", &[], 1_000).await;
        let settles = vec![
            Settle {
                lease: LeaseToken::NONE,
                settlement: Settlement::Dead {
                    delivery_id: d1[0],
                    reason: DeadReason::Rejected,
                    error: "HTTP 400".into(),
                },
                trail: attempt(1, Some(400), 1_100),
            },
            Settle {
                lease: LeaseToken::NONE,
                settlement: Settlement::Dead {
                    delivery_id: d2[0],
                    reason: DeadReason::Expired,
                    error: "too old".into(),
                },
                trail: None,
            },
        ];
        spool.record(settles, UnixMs(1_200)).await.unwrap();
        spool
            .retire_targets(vec!["a".into()], UnixMs(1_300))
            .await
            .unwrap();
        let ends = |e: &TrailEvent| -> Vec<(String, String, Option<String>)> {
            e.ends
                .iter()
                .map(|x| (x.target.clone(), x.end.clone(), x.reason.clone()))
                .collect()
        };
        let e = one(&*spool, by_event(rejected)).await;
        assert_eq!(
            ends(&e),
            vec![("a".into(), "dead".into(), Some("rejected".into()))],
            "{name}"
        );
        assert_eq!(
            (e.outcome, e.attempts.len()),
            (TrailOutcome::Dead, 1),
            "{name}"
        );
        let e = one(&*spool, by_event(expired)).await;
        assert_eq!(
            ends(&e),
            vec![("a".into(), "expired".into(), Some("expired".into()))],
            "{name}"
        );
        assert!(
            e.attempts.is_empty(),
            "{name}: an expired delivery was not sent"
        );
        let e = one(&*spool, by_event(retired)).await;
        assert_eq!(
            ends(&e),
            vec![("gone".into(), "dead".into(), Some("target_removed".into()))],
            "{name}"
        );
        let e = one(&*spool, by_event(unrouted)).await;
        assert_eq!(
            (e.outcome, e.route.len()),
            (TrailOutcome::Dead, 0),
            "{name}"
        );
        let dead = TrailFilter {
            outcome: Some(TrailOutcome::Dead),
            ..TrailFilter::default()
        };
        assert_eq!(spool.search(dead).await.unwrap().len(), 4, "{name}");
    }
}

#[tokio::test]
async fn a_refused_push_is_recorded_with_its_reason_and_source() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        assert!(spool.note(TrailNote::Refused {
            at: UnixMs(1_000),
            account: "main".into(),
            refusal: TrailRefusal {
                reason: "bad signature".into(),
                source: "192.0.2.7".into(),
            },
        }));
        let refused = TrailFilter {
            outcome: Some(TrailOutcome::Refused),
            ..TrailFilter::default()
        };
        let e = once(&*spool, refused, |_| true)
            .await
            .unwrap_or_else(|| panic!("{name}: the refusal is not in the trail"));
        let refusal = e.refusal.expect("refusal");
        assert_eq!(
            (refusal.reason.as_str(), refusal.source.as_str()),
            ("bad signature", "192.0.2.7"),
            "{name}"
        );
        assert_eq!((e.account.as_str(), e.event_id), ("main", None), "{name}");
    }
}

#[tokio::test]
async fn a_delivered_event_is_redelivered_only_when_its_body_was_kept() {
    for keep in [false, true] {
        for (name, spool, _keep, _) in spools(setup(keep, 1_000)).await {
            let (event_id, deliveries) = stored(&*spool, "k1", &["a"], 1_000).await;
            let delivered = Settle {
                lease: LeaseToken::NONE,
                settlement: Settlement::Delivered {
                    delivery_id: deliveries[0],
                },
                trail: attempt(1, Some(200), 1_100),
            };
            spool.record(vec![delivered], UnixMs(1_200)).await.unwrap();
            assert_eq!(
                one(&*spool, by_event(event_id)).await.body_kept,
                keep,
                "{name}"
            );
            let again = spool.redeliver(event_id, "b".into(), UnixMs(1_300)).await;
            if !keep {
                let e = again.expect_err("refused");
                assert!(e.to_string().contains("not kept"), "{name}: {e}");
                continue;
            }
            again.unwrap_or_else(|e| panic!("{name}: {e}"));
            let leased = spool
                .lease("b", UnixMs(1_300), 10, Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(leased.len(), 1, "{name}");
            assert_eq!(leased[0].event_id, event_id, "{name}");
            assert!(leased[0].event.xml.contains("FromUserName"), "{name}");
        }
    }
}

#[tokio::test]
async fn pruning_keeps_at_most_max_events() {
    for (name, spool, _keep, _) in spools(setup(false, 50)).await {
        // Pruning follows the pushes' clock, a bounded batch at a time:
        // with each push (SQLite) or by a task of its own now and then
        // (PostgreSQL).
        let mut now = 0;
        for i in 0..400 {
            now = 1_000 + i * 1_000;
            let e = push(&format!("k{i}"), &["a"], now);
            spool.enqueue(e, UnixMs(now), WINDOW).await.unwrap();
        }
        let all = TrailFilter {
            limit: 1_000,
            ..TrailFilter::default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let kept = loop {
            now += 31_000;
            after_notes(&*spool, now).await;
            let kept = spool.search(all.clone()).await.unwrap();
            if kept.len() <= 51 || std::time::Instant::now() > deadline {
                break kept;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(kept.len() <= 51, "{name}: {} kept", kept.len());
        assert!(kept.len() >= 40, "{name}: {} kept", kept.len());
        let newest = kept
            .iter()
            .any(|e| e.scene.as_deref() == Some("scene-k399"));
        assert!(newest, "{name}: the newest stay");
    }
}

fn refused(at: i64) -> TrailNote {
    TrailNote::Refused {
        at: UnixMs(at),
        account: "main".into(),
        refusal: TrailRefusal {
            reason: "bad signature".into(),
            source: "192.0.2.7".into(),
        },
    }
}

fn refusals() -> TrailFilter {
    TrailFilter {
        outcome: Some(TrailOutcome::Refused),
        limit: 1_000,
        ..TrailFilter::default()
    }
}

/// Notes a refusal a pruning period later each time, until `done` holds of
/// the refusals found (after 10 s, the last count): notes are written after
/// a while, and the refusals' clock drives pruning too.
async fn refusals_until(
    spool: &dyn TrailRoles,
    mut now: i64,
    done: impl Fn(usize) -> bool,
) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        now += 31_000;
        assert!(spool.note(refused(now)));
        let kept = spool.search(refusals()).await.unwrap().len();
        if done(kept) || std::time::Instant::now() > deadline {
            return kept;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_refusals(max_events: u64, max_refusals: u64) -> TrailSetup {
    TrailSetup {
        max_refusals,
        ..setup(false, max_events)
    }
}

#[tokio::test]
async fn refusals_alone_are_pruned_to_max_refusals() {
    for (name, spool, _keep, _) in spools(with_refusals(1_000, 20)).await {
        for i in 0..300 {
            assert!(spool.note(refused(1_000 + i * 1_000)), "{name}");
        }
        let kept = refusals_until(&*spool, 301_000, |n| (10..=21).contains(&n)).await;
        assert!(kept <= 21, "{name}: {kept} refusals kept");
        assert!(kept >= 10, "{name}: {kept} refusals kept");
    }
}

#[tokio::test]
async fn a_flood_of_refusals_leaves_the_answered_pushes_alone() {
    for (name, spool, _keep, _) in spools(with_refusals(100, 20)).await {
        for i in 0..30 {
            stored(&*spool, &format!("k{i}"), &["a"], 1_000 + i * 1_000).await;
        }
        for i in 0..300 {
            assert!(spool.note(refused(31_000 + i * 1_000)), "{name}");
        }
        // A push after the flood prunes as well.
        after_notes(&*spool, 331_000).await;
        let kept = refusals_until(&*spool, 331_000, |n| (10..=21).contains(&n)).await;
        assert!(kept <= 21, "{name}: {kept} refusals kept");
        let answered = spool
            .search(TrailFilter {
                target: Some("a".into()),
                limit: 1_000,
                ..TrailFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(answered.len(), 30, "{name}: the answered pushes are kept");
    }
}

/// The rows of a trail table, in either engine.
fn rows_in(keep: &dyn std::any::Any, path: Option<&std::path::Path>, table: &str) -> i64 {
    match path {
        Some(path) => rusqlite::Connection::open(path)
            .unwrap()
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap(),
        None => keep
            .downcast_ref::<postgres::testing::TestSchema>()
            .expect("the test schema")
            .count(table),
    }
}

#[tokio::test]
async fn steps_written_after_their_event_was_pruned_are_pruned_too() {
    for (name, spool, keep, path) in spools(setup(false, 10)).await {
        let (old, deliveries) = stored(&*spool, "old", &["a"], 1_000).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut now = 1_000;
        // Pushes until the old event's row is pruned (its delivery waits on).
        while !spool.search(by_event(old)).await.unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "{name}: never pruned");
            now += 31_000;
            stored(&*spool, &format!("k{now}"), &["b"], now).await;
        }
        let delivered = Settle {
            lease: LeaseToken::NONE,
            settlement: Settlement::Delivered {
                delivery_id: deliveries[0],
            },
            trail: attempt(1, Some(200), now),
        };
        spool.record(vec![delivered], UnixMs(now)).await.unwrap();
        let mut steps = rows_in(&*keep, path.as_deref(), "trail_steps");
        while steps > 0 && std::time::Instant::now() < deadline {
            now += 31_000;
            stored(&*spool, &format!("k{now}"), &["b"], now).await;
            steps = rows_in(&*keep, path.as_deref(), "trail_steps");
        }
        assert_eq!(steps, 0, "{name}: the pruned event's step is left behind");
    }
}

#[tokio::test]
async fn the_trail_holds_no_openid_in_the_clear_and_no_key() {
    for (name, spool, _keep, path) in spools(setup(false, 1_000)).await {
        let Some(path) = path else { continue };
        for i in 0..5 {
            spool
                .enqueue(push(&format!("k{i}"), &["a"], 1_000), UnixMs(1_000), WINDOW)
                .await
                .unwrap();
        }
        let c = rusqlite::Connection::open(&path).unwrap();
        let dump: Vec<String> = c
            .prepare("SELECT quote(id) || quote(event_id) || quote(account) || quote(mode) || quote(scene)
                          || quote(openid_hash) || quote(openid_mask) || quote(route) FROM trail_events")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(dump.len(), 5, "{name}");
        for row in &dump {
            assert!(!row.contains(OPENID), "{name}: {row}");
            assert!(!row.contains(KEY), "{name}: {row}");
        }
        let kept: i64 = c
            .query_row("SELECT COUNT(*) FROM trail_bodies", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 0, "{name}: no message is kept without keep_bodies");
    }
}

/// The trail's tables in the file, in bytes (pages, indexes included).
fn trail_bytes(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row(
        "SELECT SUM(pgsize) FROM dbstat WHERE name LIKE 'trail%'",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// A steady stream of pushes, each attempted and delivered, `from` to `to`.
async fn stream(spool: &dyn TrailRoles, from: i64, to: i64) {
    for chunk in (from..to).collect::<Vec<_>>().chunks(250) {
        let pushes = chunk.iter().map(|&i| {
            let now = 1_000 + i * 10;
            spool.enqueue(push(&format!("k{i}"), &["a"], now), UnixMs(now), WINDOW)
        });
        let mut settles = Vec::new();
        for stored in answers(pushes).await {
            if let Enqueued::Stored { deliveries, .. } = stored {
                settles.push(Settle {
                    lease: LeaseToken::NONE,
                    settlement: Settlement::Delivered {
                        delivery_id: deliveries[0],
                    },
                    trail: attempt(1, Some(200), 0),
                });
            }
        }
        spool
            .record(settles, UnixMs(1_000 + to * 10))
            .await
            .unwrap();
    }
}

/// Each answer, in order: the requests were all sent when made, so the
/// spool takes them together.
async fn answers<T>(futures: impl Iterator<Item = SpoolFuture<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for f in futures.collect::<Vec<_>>() {
        out.push(f.await.unwrap());
    }
    out
}

#[tokio::test]
async fn sqlite_trail_disk_use_stays_flat_once_full() {
    let (name, spool, _keep, path) = spools(setup(false, 1_000)).await.remove(0);
    let path = path.unwrap();
    stream(&*spool, 0, 2_000).await;
    let full = trail_bytes(&path);
    stream(&*spool, 2_000, 8_000).await;
    let later = trail_bytes(&path);
    let kept = spool
        .search(TrailFilter {
            limit: 2_000,
            ..TrailFilter::default()
        })
        .await
        .unwrap()
        .len();
    println!("{name}: trail {full} bytes after 2,000 pushes, {later} after 8,000; {kept} events kept, {} bytes each", later / kept as i64);
    // Pruning runs with a commit once a second of the pushes' clock (100
    // pushes here): past max_events, at most the pushes since then wait.
    assert!(kept <= 1_250, "{kept} kept");
    assert!(later <= full + full / 10, "{full} → {later} bytes");
}

#[tokio::test]
async fn without_a_configured_key_the_spool_keeps_one_for_every_opener() {
    let keyless = TrailSetup {
        key: None,
        ..setup(false, 1_000)
    };
    for (name, spool, keep, path) in spools(keyless.clone()).await {
        let mut e = push("k1", &["a"], 1_000);
        // The request path hashes with the key the spool has.
        let key = spool.trail_key().expect("the spool's own key");
        if let Some(trail) = e.trail.as_mut() {
            trail.openid_hash = Some(key.hash(OPENID));
        }
        spool.enqueue(e, UnixMs(1_000), WINDOW).await.unwrap();
        // Another opener of the same data: a restart, or another replica.
        let other: Arc<dyn TrailRoles> = match &path {
            Some(path) => {
                let sqlite = SqliteSpool::open(path).unwrap();
                sqlite.start_trail(keyless.clone()).await.unwrap();
                Arc::new(sqlite)
            }
            None => {
                let schema = keep.downcast_ref::<postgres::testing::TestSchema>();
                let settings = &schema.unwrap().settings;
                let pg = PostgresSpool::open(settings, postgres::OnOpen::Migrate)
                    .await
                    .unwrap();
                pg.start_trail(keyless.clone()).await.unwrap();
                Arc::new(pg)
            }
        };
        let by_openid = TrailFilter {
            openid: Some(OPENID.into()),
            ..TrailFilter::default()
        };
        let found = other.search(by_openid).await.unwrap();
        assert_eq!(found.len(), 1, "{name}: the same key hashes alike");
    }
}

/// A search reads at most its `scan` rows: without an indexed field the
/// newest ones only, and says when it stopped short of older rows.
#[tokio::test]
async fn a_search_reads_at_most_its_cap_of_rows_and_says_so() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        for i in 0..6 {
            let now = 1_000 + i * 1_000;
            let e = push(&format!("k{i}"), &["a"], now);
            spool.enqueue(e, UnixMs(now), WINDOW).await.unwrap();
        }
        let scene = |key: &str, scan: usize| TrailFilter {
            scene: Some(format!("scene-{key}")),
            scan,
            ..TrailFilter::default()
        };
        let oldest = spool.find(scene("k0", 3)).await.unwrap();
        assert!(oldest.events.is_empty(), "{name}: {oldest:#?}");
        assert!(oldest.cut_short, "{name}: the cap is said");
        let note = oldest.cut_short_note(&scene("k0", 3)).unwrap();
        assert!(
            note.contains("newest 3 trail rows") && note.contains("by OpenID"),
            "{note}"
        );
        let newest = spool.find(scene("k5", 3)).await.unwrap();
        assert_eq!(newest.events.len(), 1, "{name}");
        let uncapped = spool.find(scene("k0", 100)).await.unwrap();
        assert_eq!(uncapped.events.len(), 1, "{name}");
        assert!(!uncapped.cut_short, "{name}");

        // By OpenID (indexed): the matching rows count against the cap.
        let by_openid = |scan: usize| TrailFilter {
            openid: Some(OPENID.into()),
            scan,
            ..TrailFilter::default()
        };
        let capped = spool.find(by_openid(4)).await.unwrap();
        assert_eq!(capped.events.len(), 4, "{name}");
        assert!(capped.cut_short, "{name}");
        let note = capped.cut_short_note(&by_openid(4)).unwrap();
        assert!(
            !note.contains("by OpenID") && note.contains("since"),
            "{note}"
        );
        let all = spool.find(by_openid(100)).await.unwrap();
        assert_eq!(all.events.len(), 6, "{name}");
        assert!(!all.cut_short, "{name}");
        let exactly = spool.find(by_openid(6)).await.unwrap();
        assert_eq!(exactly.events.len(), 6, "{name}");
        assert!(!exactly.cut_short, "{name}: nothing older is left");
        // An event by its id is found however old.
        let id = all.events[5].event_id.unwrap();
        let by_id = TrailFilter {
            event_id: Some(id),
            scan: 1,
            ..TrailFilter::default()
        };
        assert_eq!(spool.find(by_id).await.unwrap().events.len(), 1, "{name}");
    }
}

/// Refusals are not in the window of a search that can match only answered
/// pushes: a burst of them pushes no stored push out of it.
#[tokio::test]
async fn refusals_do_not_push_stored_events_out_of_the_search_window() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        for i in 0..3 {
            let now = 1_000 + i * 1_000;
            let e = push(&format!("k{i}"), &["a"], now);
            spool.enqueue(e, UnixMs(now), WINDOW).await.unwrap();
        }
        for i in 0..10 {
            assert!(spool.note(TrailNote::Refused {
                at: UnixMs(5_000 + i),
                account: "main".into(),
                refusal: TrailRefusal {
                    reason: "bad signature".into(),
                    source: "192.0.2.7".into(),
                },
            }));
        }
        let refused = TrailFilter {
            outcome: Some(TrailOutcome::Refused),
            ..TrailFilter::default()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spool.search(refused.clone()).await.unwrap().len() < 10 {
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: refusals not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let oldest = TrailFilter {
            scene: Some("scene-k0".into()),
            scan: 3,
            ..TrailFilter::default()
        };
        let found = spool.find(oldest).await.unwrap();
        assert_eq!(found.events.len(), 1, "{name}: {found:#?}");
        assert!(!found.cut_short, "{name}: nothing older is left");
        let capped = TrailFilter {
            outcome: Some(TrailOutcome::Refused),
            scan: 4,
            ..TrailFilter::default()
        };
        // Refusals are kept apart, bounded by max_refusals: the answered
        // pushes' window does not cut their search.
        let found = spool.find(capped).await.unwrap();
        assert_eq!(found.events.len(), 10, "{name}");
        assert!(!found.cut_short, "{name}: every refusal was read");
    }
}

/// The trail's tables on PostgreSQL, each vacuumed after a prune deleted
/// rows from it.
const PG_TRAIL_TABLES: [&str; 3] = ["trail_events", "trail_steps", "trail_refusals"];

/// After a prune the spool vacuums the trail's tables itself: the space of
/// the rows it deleted is reused by the next ones while autovacuum is off
/// (as here) or late, and the trail's bytes stay bounded as its rows do.
#[tokio::test]
async fn postgres_a_pruned_trail_is_vacuumed_without_autovacuum() {
    let Some(url) = postgres::testing::test_url() else {
        return;
    };
    let schema = postgres::testing::TestSchema::new(&url);
    let spool = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
        .await
        .unwrap();
    spool.start_trail(with_refusals(10, 10)).await.unwrap();
    for table in PG_TRAIL_TABLES {
        let s = &schema.settings.schema;
        schema.execute(&format!(
            "ALTER TABLE \"{s}\".{table} SET (autovacuum_enabled = off)"
        ));
    }
    // Thirty of each within a pruning period: none is pruned yet.
    let mut now = 1_000;
    for i in 0..30 {
        now += 500;
        let (_, deliveries) = stored(&spool, &format!("k{i}"), &["a"], now).await;
        let delivered = Settle {
            lease: LeaseToken::NONE,
            settlement: Settlement::Delivered {
                delivery_id: deliveries[0],
            },
            trail: attempt(1, Some(200), now),
        };
        spool.record(vec![delivered], UnixMs(now)).await.unwrap();
        assert!(spool.note(refused(now)));
    }
    for table in PG_TRAIL_TABLES {
        assert_eq!(schema.vacuums(table), 0, "{table}: nothing pruned yet");
    }
    // Pruning follows the pushes' and refusals' clock: on, a pruning period
    // at a time, until every table was vacuumed (or 30 s went by).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let unvacuumed = || {
        PG_TRAIL_TABLES
            .into_iter()
            .filter(|t| schema.vacuums(t) == 0)
    };
    while unvacuumed().next().is_some() && std::time::Instant::now() < deadline {
        now += 31_000;
        after_notes(&spool, now).await;
        assert!(spool.note(refused(now)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<&str> = unvacuumed().collect();
    assert!(left.is_empty(), "not vacuumed after pruning: {left:?}");
    assert!(schema.count("trail_events") <= 12, "the trail was pruned");
    spool.close().await;
}

/// On PostgreSQL, trail searches share the pool with the deliveries'
/// leases: at most [`postgres::SEARCHES`] run at once, one more is refused
/// saying why, the leases still find a connection, and a search held up
/// past its statement timeout is stopped with a word on how to narrow it.
#[tokio::test]
async fn postgres_searches_are_bounded_and_leave_connections_to_the_leases() {
    let Some(url) = postgres::testing::test_url() else {
        return;
    };
    let mut schema = postgres::testing::TestSchema::new(&url);
    // One connection beyond the searches' bound, for the leases.
    schema.settings.pool_size = postgres::SEARCHES + 1;
    let spool = PostgresSpool::open(&schema.settings, postgres::OnOpen::Migrate)
        .await
        .unwrap();
    spool.start_trail(setup(false, 1_000)).await.unwrap();
    stored(&spool, "k0", &["a"], 1_000).await;
    // An operator's transaction holds the trail's table: searches wait.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let table = format!("\"{}\".trail_events", schema.settings.schema);
    client
        .batch_execute(&format!(
            // Ended by the database too, should the test end first.
            "SET idle_in_transaction_session_timeout = '20s';
             BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    let held: Vec<_> = (0..postgres::SEARCHES)
        .map(|_| tokio::spawn(spool.find(TrailFilter::default())))
        .collect();
    let waiting = format!(
        "SELECT count(*) FROM pg_locks WHERE relation = '{table}'::regclass AND NOT granted"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while schema_number(&client, &waiting).await < postgres::SEARCHES as i64 {
        assert!(std::time::Instant::now() < deadline, "searches not waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = spool.find(TrailFilter::default()).await.unwrap_err();
    assert!(matches!(refused, SpoolError::Limited(_)), "{refused:?}");
    assert!(refused.to_string().contains("try again"), "{refused}");
    let leased = spool.lease("a", UnixMs(2_000), 10, Duration::from_secs(60));
    let leased = leased.await;
    assert_eq!(leased.unwrap().len(), 1, "the delivery is leased meanwhile");
    for search in held {
        let stopped = search.await.unwrap().unwrap_err();
        assert!(matches!(stopped, SpoolError::Limited(_)), "{stopped:?}");
        assert!(stopped.to_string().contains("narrow it"), "{stopped}");
    }
    client.batch_execute("ROLLBACK").await.unwrap();
    let found = spool.search(TrailFilter::default()).await.unwrap();
    assert_eq!(
        found.len(),
        1,
        "searches run again once the permits are back"
    );
    spool.close().await;
}

async fn schema_number(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A search by time reads the rows of its time, wherever they lie: with
/// `until` far back it finds the old pushes a window of the newest rows
/// would not reach, and with `since` it stops at the first of its time,
/// having read them all.
#[tokio::test]
async fn a_search_by_time_reads_the_rows_of_its_time() {
    for (name, spool, _keep, _) in spools(setup(false, 1_000)).await {
        // A minute apart: further than pushes' times stray from their order.
        let at = |i: i64| 1_000 + i * 60_000;
        for i in 0..8 {
            stored(&*spool, &format!("k{i}"), &["a"], at(i)).await;
        }
        let scenes = |found: &TrailFound| -> Vec<String> {
            let scenes = found.events.iter().map(|e| e.scene.clone().unwrap());
            scenes.collect()
        };
        let old = TrailFilter {
            until: Some(UnixMs(at(3))),
            scan: 3,
            ..TrailFilter::default()
        };
        let found = spool.find(old).await.unwrap();
        assert_eq!(scenes(&found), ["scene-k2", "scene-k1"], "{name}");
        assert!(found.cut_short, "{name}: k0 was not read");
        let range = TrailFilter {
            since: Some(UnixMs(at(1))),
            until: Some(UnixMs(at(3))),
            scan: 3,
            ..TrailFilter::default()
        };
        let found = spool.find(range).await.unwrap();
        assert_eq!(scenes(&found), ["scene-k2", "scene-k1"], "{name}");
        assert!(!found.cut_short, "{name}: every row of its time was read");
        let recent = TrailFilter {
            since: Some(UnixMs(at(6))),
            scan: 2,
            ..TrailFilter::default()
        };
        let found = spool.find(recent).await.unwrap();
        assert_eq!(scenes(&found), ["scene-k7", "scene-k6"], "{name}");
        assert!(!found.cut_short, "{name}: nothing older is of its time");
        let between = TrailFilter {
            since: Some(UnixMs(at(4) + 1)),
            until: Some(UnixMs(at(5))),
            ..TrailFilter::default()
        };
        assert!(spool.find(between).await.unwrap().events.is_empty());
        let refused = TrailFilter {
            outcome: Some(TrailOutcome::Refused),
            until: Some(UnixMs(at(3))),
            ..TrailFilter::default()
        };
        assert!(spool.find(refused).await.unwrap().events.is_empty());
    }
}
