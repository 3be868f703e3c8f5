//! The SQLite engine's own tests: every layout an earlier release wrote
//! opens and migrates, a newer one is refused, and the writer's batches.

use super::writer::{commit_batch, Command};
use super::*;
use crate::spool::{DeadReason, DeliveryId, Lease, NewDelivery, Schedule, Settlement, UnixMs};
use rusqlite::Connection;

fn event(key: &str, body_bytes: usize) -> NewEvent {
    NewEvent {
        event: Event {
            dedup_key: key.into(),
            account: "main".into(),
            received_at: UnixMs(1),
            query: String::new(),
            body: vec![b'x'; body_bytes].into(),
            xml: "<xml/>".into(),
            fields: "{}".into(),
            msg_type: "event".into(),
            event_type: None,
            origin: Default::default(),
            trace_context: None,
        },
        targets: vec![NewDelivery {
            target: "hooks".into(),
            due_at: UnixMs(1),
            order_key: None,
        }],
        replay: None,
        trail: None,
    }
}

/// `event(key, 0)` for the target `t`, in the order of user `user`.
fn ordered(key: &str, user: &str) -> NewEvent {
    let mut e = event(key, 0);
    e.targets[0].target = "t".into();
    e.targets[0].due_at = UnixMs(0);
    e.targets[0].order_key = Some(format!("main|{user}"));
    e
}

const WINDOW: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_millis(1);

async fn stored(spool: &SqliteSpool, e: NewEvent) -> DeliveryId {
    match spool.enqueue(e, UnixMs(0), WINDOW).await.unwrap() {
        Enqueued::Stored { deliveries, .. } => deliveries[0],
        other => panic!("unexpected {other:?}"),
    }
}

async fn leased(spool: &SqliteSpool, target: &str, now: i64) -> Vec<Lease> {
    spool.lease(target, UnixMs(now), 10, LEASE).await.unwrap()
}

fn ids(leases: &[Lease]) -> Vec<DeliveryId> {
    leases.iter().map(|l| l.delivery_id).collect()
}

fn rows(ids: &[i64]) -> Vec<DeliveryId> {
    ids.iter().map(|&i| DeliveryId(i)).collect()
}

/// Records `settlement` under its lease in `leases`.
async fn settle(spool: &SqliteSpool, leases: &[Lease], settlement: Settlement, now: i64) {
    let lease = leases
        .iter()
        .find(|l| l.delivery_id == settlement.delivery_id())
        .unwrap()
        .token;
    let settle = Settle {
        lease,
        settlement,
        trail: None,
    };
    spool.record(vec![settle], UnixMs(now)).await.unwrap();
}

fn dead(delivery_id: DeliveryId, reason: DeadReason) -> Settlement {
    Settlement::Dead {
        delivery_id,
        reason,
        error: "gone".into(),
    }
}

fn delivered(delivery_id: DeliveryId) -> Settlement {
    Settlement::Delivered { delivery_id }
}

/// A replayed dead letter is its user's earliest pending delivery again:
/// it goes before the later ones, which wait for it as before.
#[tokio::test]
async fn a_replayed_dead_letter_goes_before_its_users_later_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let spool = SqliteSpool::open(&dir.path().join("spool.db")).unwrap();
    let a = stored(&spool, ordered("a", "u1")).await;
    let b = stored(&spool, ordered("b", "u1")).await;
    let c = stored(&spool, ordered("c", "u1")).await;
    let first = leased(&spool, "t", 0).await;
    assert_eq!(ids(&first), vec![a]);
    settle(&spool, &first, dead(a, DeadReason::Expired), 1).await;
    assert_eq!(ids(&leased(&spool, "t", 2).await), vec![b], "c waits for b");
    // b's lease runs out; a is replayed and holds back b and c again.
    let filter = DeadFilter {
        delivery_id: Some(a),
        ..DeadFilter::default()
    };
    assert_eq!(spool.replay(filter, UnixMs(3)).await.unwrap(), 1);
    let replayed = leased(&spool, "t", 4).await;
    assert_eq!(ids(&replayed), vec![a]);
    settle(&spool, &replayed, delivered(a), 5).await;
    assert_eq!(ids(&leased(&spool, "t", 6).await), vec![b]);
    // Retired, the user's deliveries are all dead; replayed, the earliest is
    // the head again and the others wait behind it.
    spool.retire_targets(vec![], UnixMs(7)).await.unwrap();
    let all = DeadFilter::default();
    assert_eq!(spool.replay(all, UnixMs(8)).await.unwrap(), 2);
    let again = leased(&spool, "t", 9).await;
    assert_eq!(ids(&again), vec![b]);
    settle(&spool, &again, dead(b, DeadReason::Rejected), 10).await;
    assert_eq!(ids(&leased(&spool, "t", 11).await), vec![c]);
}

/// A full disk makes SQLite roll the whole transaction back: what the
/// batch holds after that must not be committed on its own while every
/// request is told the commit failed.
#[tokio::test]
async fn nothing_after_a_rolled_back_command_is_committed_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let file = OpenedFile::of(&path).unwrap();
    // A small database: the second event does not fit.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    conn.pragma_update(None, "max_page_count", pages + 8)
        .unwrap();
    let mut replies = Vec::new();
    let mut batch = Vec::new();
    for (key, size) in [("before", 10), ("too-big", 1 << 20), ("after", 10)] {
        let (reply, rx) = oneshot::channel();
        let e = Box::new(event(key, size));
        batch.push(Command::Enqueue(e, UnixMs(1), WINDOW, reply));
        replies.push(rx);
    }
    commit_batch(&held::Prepared::new(&conn), &mut batch, None, (&file, None));
    for rx in replies {
        let answer = rx.await.unwrap();
        let chain = answer.as_ref().map_err(|e| crate::error_chain(e));
        assert!(matches!(&chain, Err(e) if e.contains("full")), "{answer:?}");
    }
    let stored: i64 = conn
        .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored, 0, "a request told it failed was stored");
}

/// A command that fails halfway leaves nothing of itself, whether alone in
/// its batch (no savepoint: the transaction is rolled back) or with others
/// (its savepoint is): its dedup key is not kept, so WeChat's retry of the
/// push is stored, not taken for a duplicate.
#[tokio::test]
async fn a_command_that_fails_halfway_leaves_nothing_alone_or_batched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let file = OpenedFile::of(&path).unwrap();
    // The event and its dedup key are written before the delivery is refused.
    conn.execute_batch(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON deliveries WHEN NEW.target = 'refused'
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    let refused = |key: &str| {
        let mut e = event(key, 0);
        e.targets[0].target = "refused".into();
        Box::new(e)
    };
    let commit = |events: Vec<Box<NewEvent>>| {
        let mut batch = Vec::new();
        let mut replies = Vec::new();
        for e in events {
            let (reply, rx) = oneshot::channel();
            batch.push(Command::Enqueue(e, UnixMs(1), WINDOW, reply));
            replies.push(rx);
        }
        commit_batch(&held::Prepared::new(&conn), &mut batch, None, (&file, None));
        replies
    };
    let answers = |replies: Vec<oneshot::Receiver<_>>| async move {
        let mut stored = Vec::new();
        for rx in replies {
            let answer: Result<Enqueued, SpoolError> = rx.await.unwrap();
            stored.push(
                answer
                    .map(|e| matches!(e, Enqueued::Stored { .. }))
                    .map_err(|e| e.to_string()),
            );
        }
        stored
    };
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };

    let alone = answers(commit(vec![refused("alone")])).await;
    assert!(alone[0].is_err(), "{alone:?}");
    assert_eq!((count("dedup"), count("events")), (0, 0));

    let batched = answers(commit(vec![refused("batched"), Box::new(event("kept", 0))])).await;
    assert!(batched[0].is_err(), "{batched:?}");
    assert_eq!(batched[1], Ok(true));
    assert_eq!((count("dedup"), count("events")), (1, 1));

    let retried = answers(commit(vec![Box::new(event("alone", 0))])).await;
    assert_eq!(retried[0], Ok(true), "the retry was stored");
    let retried = answers(commit(vec![Box::new(event("batched", 0))])).await;
    assert_eq!(retried[0], Ok(true), "the retry was stored");
}

/// A command whose only company in its batch is trail notes runs without a
/// savepoint; when it fails, what it wrote is undone and the notes are still
/// written, in a transaction of their own.
#[tokio::test]
async fn notes_outlive_a_command_that_fails_beside_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let file = OpenedFile::of(&path).unwrap();
    conn.execute_batch(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON deliveries WHEN NEW.target = 'refused'
         BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    let note = |n: i64| {
        Command::Note(crate::trail::TrailNote::Refused {
            at: UnixMs(n),
            account: "main".into(),
            refusal: crate::trail::TrailRefusal {
                reason: "bad signature".into(),
                source: "127.0.0.1".into(),
            },
        })
    };
    let mut e = event("refused", 0);
    e.targets[0].target = "refused".into();
    let (reply, rx) = oneshot::channel();
    let mut batch = vec![
        note(1),
        Command::Enqueue(Box::new(e), UnixMs(1), WINDOW, reply),
        note(2),
    ];
    commit_batch(&held::Prepared::new(&conn), &mut batch, None, (&file, None));
    let answer = rx.await.unwrap();
    assert!(answer.is_err(), "{answer:?}");
    let count = |table: &str| -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!((count("dedup"), count("events")), (0, 0));
    assert_eq!(count("trail_refusals"), 2, "the notes were written");
    assert!(conn.is_autocommit(), "no transaction left open");
}

// ---- every layout an earlier release wrote ----

/// The first release's tables (its ids without AUTOINCREMENT).
const ORIGINAL: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY,
    dedup_key   TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    query       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    xml         TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    msg_type    TEXT    NOT NULL,
    event       TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    event_id    INTEGER NOT NULL REFERENCES events(id),
    target      TEXT,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT '',
    reason      TEXT    NOT NULL DEFAULT '',
    updated_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, next_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (updated_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Then: AUTOINCREMENT ids, and Retry-After's `not_before` (no probe or
/// replay table yet).
const RETRY_AFTER: &str = "
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    dedup_key   TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    query       TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    xml         TEXT    NOT NULL,
    fields      TEXT    NOT NULL,
    msg_type    TEXT    NOT NULL,
    event       TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    INTEGER NOT NULL REFERENCES events(id),
    target      TEXT,
    state       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT    NOT NULL DEFAULT '',
    reason      TEXT    NOT NULL DEFAULT '',
    updated_at  INTEGER NOT NULL,
    -- Set by a Retry-After: the target asked not to be called before this.
    not_before  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, next_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (updated_at) WHERE state = 2;
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id);
CREATE TABLE IF NOT EXISTS dedup (
    key        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Then: the schedule's columns (as that release added them to a file), and
/// the probe's table; no replay table yet.
const SCHEDULE: &str = "
ALTER TABLE deliveries ADD COLUMN step INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN scheduled_at INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET step = attempts, scheduled_at = next_at;
CREATE TABLE IF NOT EXISTS probe (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    probes INTEGER NOT NULL
);
";

/// Then: the replay guards' table, and per-user order.
const ORDER_KEY: &str = "
CREATE TABLE IF NOT EXISTS replay (
    key        TEXT    PRIMARY KEY,
    body_hash  BLOB    NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
ALTER TABLE deliveries ADD COLUMN order_key TEXT;
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (target, order_key, id)
     WHERE state = 0 AND order_key IS NOT NULL;
";

/// Then: the `blocked` flag, the last layout before versions.
const BLOCKED: &str = "
ALTER TABLE deliveries ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
UPDATE deliveries SET blocked = 1
WHERE state = 0 AND order_key IS NOT NULL AND EXISTS (
     SELECT 1 FROM deliveries p
     WHERE p.target = deliveries.target AND p.order_key = deliveries.order_key
       AND p.id < deliveries.id AND p.state = 0);
CREATE INDEX IF NOT EXISTS deliveries_heads ON deliveries (target, next_at)
     WHERE state = 0 AND blocked = 0;
";

/// In every layout: an event; a delivery to `a` that failed three times and
/// is due at 7 s; a dead letter of `a`; an unrouted event.
const ROWS: &str = "
INSERT INTO events VALUES (1, 'k1', 'main', 5, 'q', x'01', '<xml>1</xml>', '{}', 'text', NULL);
INSERT INTO events VALUES (2, 'k2', 'main', 6, 'q', x'02', '<xml>2</xml>', '{}', 'event', 'CLICK');
INSERT INTO deliveries (id, event_id, target, state, attempts, next_at, last_error, updated_at)
    VALUES (1, 1, 'a', 0, 3, 7000, 'HTTP 503', 4000);
INSERT INTO deliveries (id, event_id, target, state, attempts, next_at, last_error, reason, updated_at)
    VALUES (2, 1, 'a', 2, 1, 0, 'HTTP 400', 'rejected', 4500);
INSERT INTO deliveries (id, event_id, target, state, next_at, reason, updated_at)
    VALUES (3, 2, NULL, 2, 0, 'unrouted', 6);
";

/// In a layout with order keys: user u1's two deliveries to `t`, user u2's
/// one, and one with no key.
const ORDERED_ROWS: &str = "
INSERT INTO deliveries (id, event_id, target, state, next_at, updated_at, order_key)
    VALUES (4, 2, 't', 0, 0, 0, 'main|u1'), (5, 2, 't', 0, 0, 0, 'main|u1'),
           (6, 2, 't', 0, 0, 0, 'main|u2'), (7, 2, 't', 0, 0, 0, NULL);
";

/// A file in an earlier release's layout (`ddl`, run in order), holding `rows`.
fn earlier_file(ddl: &[&str], rows: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    for sql in ddl.iter().chain(rows) {
        c.execute_batch(sql).unwrap();
    }
    (dir, path)
}

/// Opens a file that an earlier release's `steps` made (its statements and
/// the rows it wrote, in order) and checks that it is at the latest version
/// with its rows intact, and that ordered delivery works: on its own ordered
/// deliveries (`ordered_rows`) and on new ones.
async fn opens_and_orders(steps: &[&str], ordered_rows: bool) {
    let (_dir, path) = earlier_file(steps, &[]);
    let spool = SqliteSpool::open(&path).unwrap();
    let version: i32 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, migrate::latest());
    rows_are_intact(&spool).await;
    if ordered_rows {
        let first = leased(&spool, "t", 0).await;
        assert_eq!(ids(&first), rows(&[4, 6, 7]), "5 waits for 4");
        settle(&spool, &first, delivered(DeliveryId(4)), 1).await;
        // 6 and 7 again too: their leases ran out.
        assert_eq!(ids(&leased(&spool, "t", 2).await), rows(&[5, 6, 7]));
    }
    new_pushes_are_ordered(&spool).await;
    spool.probe().await.unwrap();
}

async fn rows_are_intact(spool: &SqliteSpool) {
    let waiting = spool.waiting("a", 10).await.unwrap();
    assert_eq!(waiting.len(), 1);
    let w = &waiting[0];
    assert_eq!(
        (w.delivery_id, w.attempts, w.next_at),
        (DeliveryId(1), 3, UnixMs(7_000))
    );
    assert_eq!(w.last_error, "HTTP 503");
    let schedule = Schedule {
        step: 3,
        due_at: UnixMs(7_000),
    };
    assert_eq!(
        w.schedule, schedule,
        "its place on the schedule is what it had"
    );
    let dead = spool.dead_letters(DeadFilter::default(), 10).await.unwrap();
    let reasons: Vec<(DeliveryId, DeadReason)> =
        dead.iter().map(|d| (d.delivery_id, d.reason)).collect();
    assert_eq!(
        reasons,
        [
            (DeliveryId(3), DeadReason::Unrouted),
            (DeliveryId(2), DeadReason::Rejected)
        ]
    );
    let event = spool.event(EventId(2)).await.unwrap().unwrap();
    assert_eq!(
        (event.xml.as_str(), &event.body[..]),
        ("<xml>2</xml>", &[2u8][..])
    );
    assert_eq!(event.event_type.as_deref(), Some("CLICK"));
    assert_eq!(
        event.trace_context, None,
        "pushes stored before traces have none"
    );
    let lease = leased(spool, "a", 7_000).await;
    assert_eq!((ids(&lease), lease[0].schedule), (rows(&[1]), schedule));
}

/// Two pushes of one user stored now: the later waits for the earlier.
async fn new_pushes_are_ordered(spool: &SqliteSpool) {
    let first = stored(spool, ordered("n1", "u9")).await;
    let second = stored(spool, ordered("n2", "u9")).await;
    let now = 10_000;
    let heads = leased(spool, "t", now).await;
    assert!(ids(&heads).contains(&first), "{heads:?}");
    assert!(!ids(&heads).contains(&second), "the later push waits");
    settle(spool, &heads, delivered(first), now + 1).await;
    assert!(ids(&leased(spool, "t", now + 2).await).contains(&second));
}

#[tokio::test]
async fn a_file_of_the_first_layout_opens_and_migrates() {
    opens_and_orders(&[ORIGINAL, ROWS], false).await;
}

#[tokio::test]
async fn a_file_from_before_the_schedule_columns_opens_and_migrates() {
    opens_and_orders(&[RETRY_AFTER, ROWS], false).await;
}

#[tokio::test]
async fn a_file_from_before_per_user_order_opens_and_migrates() {
    opens_and_orders(&[RETRY_AFTER, ROWS, SCHEDULE], false).await;
}

#[tokio::test]
async fn a_file_from_before_the_blocked_flag_opens_and_orders() {
    let steps = [RETRY_AFTER, ROWS, SCHEDULE, ORDER_KEY, ORDERED_ROWS];
    opens_and_orders(&steps, true).await;
}

#[tokio::test]
async fn a_file_of_the_last_layout_before_versions_opens_and_orders() {
    let steps = [
        RETRY_AFTER,
        ROWS,
        SCHEDULE,
        ORDER_KEY,
        ORDERED_ROWS,
        BLOCKED,
    ];
    opens_and_orders(&steps, true).await;
}

#[tokio::test]
async fn a_file_newer_than_this_binary_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    SqliteSpool::open(&path).unwrap().close();
    let newer = migrate::latest() + 1;
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let refused = SqliteSpool::open(&path).err().expect("refused");
    let text = refused.to_string();
    assert!(matches!(refused, SpoolError::Schema(_)), "{text}");
    assert!(
        text.contains(&format!("at version {newer}"))
            && text.contains(&format!("knows ({})", migrate::latest())),
        "{text}"
    );
}

#[tokio::test]
async fn a_migrated_file_opens_again_unchanged() {
    let (_dir, path) = earlier_file(&[RETRY_AFTER], &[ROWS]);
    SqliteSpool::open(&path).unwrap().close();
    let spool = SqliteSpool::open(&path).unwrap();
    rows_are_intact(&spool).await;
}

/// The state codes are literals in the statements, so the partial indexes
/// serve them: a lease finds its deliveries in the pending index alone, in
/// due order, reading no row of a delivery it passes over.
#[test]
fn the_lease_reads_the_pending_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {}", leases::DUE_IDS))
        .unwrap()
        .query_map(rusqlite::params!["t", 0, 10], |r| {
            r.get::<_, String>("detail")
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("COVERING INDEX deliveries_pending")),
        "{plan:?}"
    );
    assert!(!plan.iter().any(|s| s.contains("TEMP B-TREE")), "{plan:?}");
}

/// A target's waiting deliveries are listed from the pending index in due
/// order, held-back ones merged in, without sorting the backlog.
#[test]
fn the_waiting_listing_reads_the_pending_index_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {}", reader::WAITING))
        .unwrap()
        .query_map(rusqlite::params!["t", 10], |r| r.get::<_, String>("detail"))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let indexed = plan.iter().filter(|s| s.contains("deliveries_pending"));
    assert_eq!(indexed.count(), 2, "{plan:?}");
    assert!(!plan.iter().any(|s| s.contains("TEMP B-TREE")), "{plan:?}");
}

/// The lease reads its columns from a list: the list is the query's.
#[test]
fn the_lease_lists_the_columns_it_selects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut conn = open_connection(&path).unwrap();
    migrate::migrate(&mut conn, &path).unwrap();
    let select = conn.prepare(leases::DUE).unwrap();
    assert_eq!(select.column_names(), leases::DUE_NAMES);
}
