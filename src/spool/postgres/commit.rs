//! Group commit: the enqueues waiting when the writer is free go into one
//! transaction, a handful of multi-row statements (`INSERT … SELECT … FROM
//! unnest(…)`) whatever the batch's size, and one commit answers them all.
//!
//! Of a batch, the replay guards are written first, then the dedup keys,
//! each sorted by key: every transaction takes its row locks in one global
//! order, so two replicas' batches can wait for each other but never
//! deadlock. A key another transaction is inserting makes this one wait for
//! it, then see the conflict: of two racing copies, one is stored and the
//! other answered as a duplicate, on one replica or two.

use super::prepared::Prepared;
use super::row::{column, get};
use super::wake::Notifier;
use crate::spool::vocab::PROBE;
use crate::spool::{
    rows, DeadReason, DeliveryId, DeliveryState, Enqueued, EventId, NewEvent, SpoolError,
    Supervision, UnixMs,
};
use deadpool_postgres::{ClientWrapper, Object, Pool};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::Statement;

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// What the writer is asked to do. Nearly every request is a push: boxing
/// it would only add an allocation per push.
#[allow(clippy::large_enum_variant)]
pub(super) enum Request {
    /// Store a push.
    Push(Push),
    /// Write through the push connection, behind the pushes waiting (readiness).
    Probe(Reply<()>),
}

/// An enqueue waiting for its commit.
pub(super) struct Push {
    pub event: NewEvent,
    pub now: UnixMs,
    pub window: Duration,
    pub reply: Reply<Enqueued>,
}

/// What one request of a batch came to, before its event is handed back.
enum Outcome {
    Stored(EventId, Vec<DeliveryId>),
    Duplicate,
    Replayed,
}

/// What one commit carries at most, in bytes of bodies, XML and fields:
/// well under PostgreSQL's limits on a value and a message, whatever
/// `max_body` is.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// The parts of the spool the writer answers through.
pub(super) struct Writer {
    pub pool: Pool,
    pub notifier: Notifier,
    pub prune: super::prune::Pruner,
    /// For the tests' injected failure.
    #[cfg_attr(not(any(test, feature = "test-util")), allow(dead_code))]
    pub supervision: Supervision,
    pub analyze: super::analyze::Analyzer,
    /// The trail's settings, while it is on.
    pub trail: crate::spool::TrailSlot,
}

/// Commits the waiting pushes, a batch at a time, then answers the probes
/// that came with them, until every sender is gone. `max_batch` of 1 commits
/// each push on its own (to measure what grouping is worth).
pub(super) async fn run(writer: Writer, mut requests: mpsc::Receiver<Request>, max_batch: usize) {
    let mut waiting = Vec::with_capacity(max_batch);
    let mut pushes = Vec::with_capacity(max_batch);
    let mut probes = Vec::new();
    let mut prepared = Prepared::default();
    while requests.recv_many(&mut waiting, max_batch).await > 0 {
        for request in waiting.drain(..) {
            match request {
                Request::Push(push) => pushes.push(push),
                Request::Probe(reply) => probes.push(reply),
            }
        }
        while !pushes.is_empty() {
            #[cfg(any(test, feature = "test-util"))]
            writer.supervision.panic_if_asked();
            let batch: Vec<Push> = pushes.drain(..fitting(&pushes)).collect();
            writer.commit_and_answer(batch, &mut prepared).await;
        }
        if !probes.is_empty() {
            writer.probe(std::mem::take(&mut probes)).await;
        }
    }
}

/// How many of the first pushes fit in one commit: at least one.
fn fitting(requests: &[Push]) -> usize {
    let mut bytes = 0;
    let n = requests
        .iter()
        .take_while(|r| {
            let e = &r.event.event;
            bytes += e.body.len() + e.xml.len() + e.fields.len();
            bytes <= MAX_BATCH_BYTES
        })
        .count();
    n.max(1)
}

impl Writer {
    /// A real write on the push connection, answering every probe waiting.
    async fn probe(&self, probes: Vec<Reply<()>>) {
        let written = super::on_connection(&self.pool, "probe", |c| {
            Box::pin(async move {
                let statement = c.prepare_cached(PROBE).await?;
                c.execute(&statement, &[]).await?;
                Ok(())
            })
        })
        .await;
        for probe in probes {
            let _ = probe.send(written.clone());
        }
    }

    async fn commit_and_answer(&self, batch: Vec<Push>, prepared: &mut Prepared) {
        let result = super::bounded("commit", async {
            let mut checkout = super::Checkout::of(&self.pool).await?;
            let store = self.trail.load_full();
            // Boxed: the commit's future is large, and the timeout would
            // otherwise copy it whole at every move.
            let (outcomes, clean) =
                Box::pin(commit(checkout.get()?, prepared, &batch, store.as_deref())).await;
            if clean {
                checkout.finished();
            }
            outcomes
        })
        .await;
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                for request in batch {
                    let _ = request.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let (mut due, mut stored) = (BTreeSet::new(), 0);
        for (request, outcome) in batch.into_iter().zip(outcomes) {
            if let Outcome::Stored(..) = outcome {
                due.extend(request.event.targets.iter().map(|t| t.target.clone()));
                stored += request.event.targets.len().max(1) as u64;
            }
            self.prune.saw(request.now);
            let answer = match outcome {
                Outcome::Stored(event_id, deliveries) => Enqueued::Stored {
                    event_id,
                    deliveries,
                    event: Box::new(request.event.event),
                },
                Outcome::Duplicate => Enqueued::Duplicate,
                Outcome::Replayed => Enqueued::Replayed,
            };
            let _ = request.reply.send(Ok(answer));
        }
        self.notifier.due(due);
        self.analyze.stored(stored);
    }
}

/// Stores a batch in one transaction, and answers whether the connection
/// is outside any transaction, fit to go back to the pool: after a failure
/// only once its `ROLLBACK` was answered (a connection that could not roll
/// back is discarded, never handed to the next user inside a transaction).
async fn commit(
    client: &mut Object,
    p: &mut Prepared,
    batch: &[Push],
    trail: Option<&crate::spool::TrailStore>,
) -> (Result<Vec<Outcome>, SpoolError>, bool) {
    let stored = in_transaction(client, p, batch, trail).await;
    if stored.is_ok() {
        return (stored, true);
    }
    // A statement failed before the `COMMIT` went out, or with it (which
    // then answered `ROLLBACK` and only warns of this one).
    let rolled_back = client.batch_execute("ROLLBACK").await.is_ok();
    (stored, rolled_back)
}

/// The batch's statements in at most four round trips whatever its size
/// (three without replay guards): `BEGIN` with the first statement; the
/// dedup keys (which depend on the replay
/// guards' answer); the order locks with the ids; then the rows, the trail's
/// and the `COMMIT` together. Statements pipelined on one connection run in
/// the order sent, each in the transaction, and a `COMMIT` after a failed
/// statement answers `ROLLBACK` without an error: so every statement's own
/// answer is checked, and any failure fails the whole batch. That rests on
/// one rule, kept by every change here: each statement sent is a future
/// awaited inside the batch's joins, none sent and left, and the `COMMIT`
/// is the last future of the last join.
async fn in_transaction(
    c: &ClientWrapper,
    p: &mut Prepared,
    batch: &[Push],
    trail: Option<&crate::spool::TrailStore>,
) -> Result<Vec<Outcome>, SpoolError> {
    let (passed, took) = begin_and_check_keys(c, p, batch).await?;
    let stored: Vec<&Push> = batch
        .iter()
        .zip(&took)
        .filter(|(_, took)| **took)
        .map(|(r, _)| r)
        .collect();
    let rows: usize = stored.iter().map(|r| r.event.targets.len().max(1)).sum();
    let (inserts, event_ids, delivery_ids) = if stored.is_empty() {
        (None, Vec::new(), Vec::new())
    } else {
        let (events, deliveries) = draw_ids(c, p, &stored, rows).await?;
        (Some(Inserts::prepare(c, p).await?), events, deliveries)
    };
    let outcomes = outcomes(batch, &passed, &took, &event_ids, &delivery_ids);
    let trail_rows = match trail {
        Some(store) => {
            super::trail::PushRows::of(c, p, store, &trail_written(batch, &outcomes)).await?
        }
        None => None,
    };
    // Every statement is prepared by now: each future below sends its
    // statements on its first poll, in this order.
    let rows = async {
        match &inserts {
            Some(i) => i.run(c, &stored, &event_ids, &delivery_ids, rows).await,
            None => Ok(()),
        }
    };
    let trail_rows = async {
        match &trail_rows {
            Some(t) => t.write(c).await,
            None => Ok(()),
        }
    };
    let commit = async { Ok::<_, SpoolError>(c.batch_execute("COMMIT").await?) };
    tokio::try_join!(biased; rows, trail_rows, commit)?;
    Ok(outcomes)
}

/// Opens the transaction and answers, per request, whether it got past its
/// replay guard and whether it took its dedup key. `BEGIN` goes out with
/// the first statement, not a round trip before it.
async fn begin_and_check_keys(
    c: &ClientWrapper,
    p: &mut Prepared,
    batch: &[Push],
) -> Result<(Vec<bool>, Vec<bool>), SpoolError> {
    let begin = async { Ok::<_, SpoolError>(c.batch_execute("BEGIN").await?) };
    if batch.iter().any(|r| r.event.replay.is_some()) {
        let ((), passed) = tokio::try_join!(biased; begin, guards(c, p, batch))?;
        let took = dedup(c, p, batch, &passed).await?;
        Ok((passed, took))
    } else {
        let passed = vec![true; batch.len()];
        let ((), took) = tokio::try_join!(biased; begin, dedup(c, p, batch, &passed))?;
        Ok((passed, took))
    }
}

/// The pushes of a batch that have a trail row: the stored (with their
/// event ids) and the duplicates; the replayed are refusals, noted apart.
fn trail_written<'b>(batch: &'b [Push], outcomes: &[Outcome]) -> Vec<(&'b Push, Option<EventId>)> {
    batch
        .iter()
        .zip(outcomes)
        .filter_map(|(push, outcome)| match outcome {
            Outcome::Stored(id, _) => Some((push, Some(*id))),
            Outcome::Duplicate => Some((push, None)),
            Outcome::Replayed => None,
        })
        .collect()
}

/// Records each guard's first body and answers, per request, whether it got
/// past its guard: no guard, or the body the guard holds (its own, or the
/// same body taken earlier). An expired guard is taken over.
async fn guards(
    c: &ClientWrapper,
    p: &mut Prepared,
    batch: &[Push],
) -> Result<Vec<bool>, SpoolError> {
    // The first body of each key in the batch, sorted by key.
    let mut first: BTreeMap<&str, (&[u8], i64)> = BTreeMap::new();
    for r in batch {
        if let Some(g) = &r.event.replay {
            first
                .entry(g.key.as_str())
                .or_insert((&g.body_hash[..], g.expires_at.0));
        }
    }
    if first.is_empty() {
        return Ok(vec![true; batch.len()]);
    }
    let keys: Vec<&str> = first.keys().copied().collect();
    let hashes: Vec<&[u8]> = first.values().map(|(h, _)| *h).collect();
    let expires: Vec<i64> = first.values().map(|(_, e)| *e).collect();
    let now = batch.iter().map(|r| r.now.0).max().unwrap_or(0);
    let insert = p
        .get(
            c,
            "INSERT INTO replay (key, body_hash, expires_at)
             SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[]) ORDER BY 1
             ON CONFLICT (key) DO UPDATE
                SET body_hash = excluded.body_hash, expires_at = excluded.expires_at
                WHERE replay.expires_at <= $4",
        )
        .await?;
    let held = p
        .get(c, "SELECT key, body_hash FROM replay WHERE key = ANY($1)")
        .await?;
    let written: [&(dyn ToSql + Sync); 4] = [&keys, &hashes, &expires, &now];
    let read: [&(dyn ToSql + Sync); 1] = [&keys];
    // Pipelined: the guards are read back after they are written.
    let (_, rows) = tokio::try_join!(
        biased;
        c.execute(&insert, &written),
        c.query(&held, &read),
    )?;
    let holds: HashMap<String, Vec<u8>> = rows
        .iter()
        .map(|row| Ok((get(row, "key")?, get(row, "body_hash")?)))
        .collect::<Result<_, SpoolError>>()?;
    Ok(batch
        .iter()
        .map(|r| match &r.event.replay {
            None => true,
            Some(g) => holds.get(&g.key).is_some_and(|h| h[..] == g.body_hash[..]),
        })
        .collect())
}

/// Inserts the dedup keys of the requests past their guards; returns, per
/// request, whether it took its key: the first of the batch with the key,
/// and the key was free (or expired).
async fn dedup(
    c: &ClientWrapper,
    p: &mut Prepared,
    batch: &[Push],
    passed: &[bool],
) -> Result<Vec<bool>, SpoolError> {
    let mut first: BTreeMap<&str, (usize, i64)> = BTreeMap::new();
    for (i, r) in batch.iter().enumerate().filter(|(i, _)| passed[*i]) {
        first
            .entry(r.event.event.dedup_key.as_str())
            .or_insert((i, (r.now + r.window).0));
    }
    if first.is_empty() {
        return Ok(vec![false; batch.len()]);
    }
    let keys: Vec<&str> = first.keys().copied().collect();
    let expires: Vec<i64> = first.values().map(|(_, e)| *e).collect();
    let now = batch.iter().map(|r| r.now.0).max().unwrap_or(0);
    let insert = p
        .get(
            c,
            "INSERT INTO dedup (key, expires_at)
             SELECT * FROM unnest($1::text[], $2::bigint[]) ORDER BY 1
             ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
                WHERE dedup.expires_at <= $3
             RETURNING key",
        )
        .await?;
    let rows = c.query(&insert, &[&keys, &expires, &now]).await?;
    let taken: HashSet<String> = column(&rows, "key")?.into_iter().collect();
    let mut took = vec![false; batch.len()];
    for (key, (i, _)) in first {
        took[i] = taken.contains(key);
    }
    Ok(took)
}

/// What each request came to, given the ids drawn for the stored ones in
/// batch order (an event's, and one per delivery row: one for an unrouted
/// event).
fn outcomes(
    batch: &[Push],
    passed: &[bool],
    took: &[bool],
    event_ids: &[i64],
    delivery_ids: &[i64],
) -> Vec<Outcome> {
    let mut events = event_ids.iter().copied().map(EventId);
    let mut deliveries = delivery_ids.iter().copied().map(DeliveryId);
    batch
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if !passed[i] {
                return Outcome::Replayed;
            }
            if !took[i] {
                return Outcome::Duplicate;
            }
            let event_id = events.next().unwrap_or(EventId(0));
            let n = r.event.targets.len().max(1);
            let ids: Vec<DeliveryId> = deliveries.by_ref().take(n).collect();
            let ids = if r.event.targets.is_empty() {
                Vec::new()
            } else {
                ids
            };
            Outcome::Stored(event_id, ids)
        })
        .collect()
}

/// Draws the stored events' and delivery rows' ids, sorted, in one round
/// trip with the order locks.
///
/// Per-user order follows delivery ids. Two pushes of one user stored on
/// two replicas at once could take ids in one order and commit in the
/// other, and the later push be leased while the earlier one is not yet
/// visible. So a batch takes a lock per order key (sorted, after its dedup
/// keys, as every batch does) before drawing ids: of two such batches, the
/// second draws its ids once the first has committed. Pipelined, the lock
/// statement still runs before the ids' one.
async fn draw_ids(
    c: &ClientWrapper,
    p: &mut Prepared,
    stored: &[&Push],
    rows: usize,
) -> Result<(Vec<i64>, Vec<i64>), SpoolError> {
    let keys: BTreeSet<&str> = stored
        .iter()
        .flat_map(|r| r.event.targets.iter())
        .filter_map(|t| t.order_key.as_deref())
        .collect();
    let keys: Vec<&str> = keys.into_iter().collect();
    let lock = match keys.is_empty() {
        true => None,
        false => Some(
            p.get(
                c,
                "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '|' || k, 0))
                 FROM unnest($1::text[]) AS k ORDER BY k",
            )
            .await?,
        ),
    };
    let ids = p
        .get(
            c,
            "SELECT ARRAY(SELECT nextval('events_id_seq') FROM generate_series(1, $1::int)) AS events,
                    ARRAY(SELECT nextval('deliveries_id_seq') FROM generate_series(1, $2::int))
                        AS deliveries",
        )
        .await?;
    let locked = async {
        match &lock {
            Some(lock) => c.execute(lock, &[&keys]).await,
            None => Ok(0),
        }
    };
    let (events, rows) = (stored.len() as i32, rows as i32);
    let counts: [&(dyn ToSql + Sync); 2] = [&events, &rows];
    let (_, row) = tokio::try_join!(biased; locked, c.query_one(&ids, &counts))?;
    let mut event_ids: Vec<i64> = get(&row, "events")?;
    let mut delivery_ids: Vec<i64> = get(&row, "deliveries")?;
    event_ids.sort_unstable();
    delivery_ids.sort_unstable();
    Ok((event_ids, delivery_ids))
}

/// The two inserts of a batch's rows, prepared before anything is sent, so
/// that [`Inserts::run`] sends both at once.
struct Inserts {
    events: Statement,
    deliveries: Statement,
}

impl Inserts {
    async fn prepare(c: &ClientWrapper, p: &mut Prepared) -> Result<Self, SpoolError> {
        let events = p
            .get(
                c,
                "INSERT INTO events (id, dedup_key, account, received_at, query, body, xml, fields,
                                     msg_type, event, family, codec, appid, agent_id, info_type,
                                     trace_context)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                      $6::bytea[], $7::text[], $8::text[], $9::text[], $10::text[],
                                      $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
                                      $16::text[])",
            )
            .await?;
        let deliveries = p
            .get(
                c,
                "INSERT INTO deliveries (id, event_id, target, state, next_at, scheduled_at, reason,
                                         updated_at, order_key)
                 SELECT id, event_id, target, state, next_at, next_at, reason, updated_at, order_key
                 FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::smallint[], $5::bigint[],
                             $6::text[], $7::bigint[], $8::text[])
                      AS t(id, event_id, target, state, next_at, reason, updated_at, order_key)",
            )
            .await?;
        Ok(Self { events, deliveries })
    }

    /// The stored events and their delivery rows (an unrouted event gets its
    /// dead letter), under the ids drawn; both statements sent on the first
    /// poll, events first.
    async fn run(
        &self,
        c: &ClientWrapper,
        stored: &[&Push],
        event_ids: &Vec<i64>,
        delivery_ids: &Vec<i64>,
        rows: usize,
    ) -> Result<(), SpoolError> {
        let e = EventColumns::of(stored);
        let d = DeliveryColumns::of(stored, event_ids, rows);
        let event_params: [&(dyn ToSql + Sync); 16] = [
            event_ids,
            &e.keys,
            &e.accounts,
            &e.received,
            &e.queries,
            &e.bodies,
            &e.xmls,
            &e.fields,
            &e.msg_types,
            &e.kinds,
            &e.families,
            &e.codecs,
            &e.appids,
            &e.agent_ids,
            &e.info_types,
            &e.traces,
        ];
        let delivery_params = d.params(delivery_ids);
        tokio::try_join!(
            biased;
            c.execute(&self.events, &event_params),
            c.execute(&self.deliveries, &delivery_params),
        )?;
        Ok(())
    }
}

/// The stored requests' events, as columns.
struct EventColumns<'a> {
    keys: Vec<&'a str>,
    accounts: Vec<&'a str>,
    received: Vec<i64>,
    queries: Vec<&'a str>,
    bodies: Vec<&'a [u8]>,
    xmls: Vec<&'a str>,
    fields: Vec<&'a str>,
    msg_types: Vec<&'a str>,
    kinds: Vec<Option<&'a str>>,
    families: Vec<Option<&'static str>>,
    codecs: Vec<Option<&'static str>>,
    appids: Vec<Option<&'a str>>,
    agent_ids: Vec<Option<&'a str>>,
    info_types: Vec<Option<&'a str>>,
    traces: Vec<Option<&'a str>>,
}

impl<'a> EventColumns<'a> {
    fn of(stored: &[&'a Push]) -> Self {
        let events = || stored.iter().map(|r| &r.event.event);
        let origins = || events().map(|e| &e.origin);
        let (families, codecs) = origins().map(rows::origin_names).unzip();
        Self {
            families,
            codecs,
            appids: origins().map(|o| o.appid.as_deref()).collect(),
            agent_ids: origins().map(|o| o.agent_id.as_deref()).collect(),
            info_types: origins().map(|o| o.info_type.as_deref()).collect(),
            keys: events().map(|e| e.dedup_key.as_str()).collect(),
            accounts: events().map(|e| e.account.as_str()).collect(),
            received: events().map(|e| e.received_at.0).collect(),
            queries: events().map(|e| e.query.as_str()).collect(),
            bodies: events().map(|e| &e.body[..]).collect(),
            xmls: events().map(|e| e.xml.as_str()).collect(),
            fields: events().map(|e| e.fields.as_str()).collect(),
            msg_types: events().map(|e| e.msg_type.as_str()).collect(),
            kinds: events().map(|e| e.event_type.as_deref()).collect(),
            traces: events().map(|e| e.trace_context.as_deref()).collect(),
        }
    }
}

/// The delivery rows of the stored requests, as columns: one per target, or
/// an `unrouted` dead letter for an event with none.
struct DeliveryColumns<'a> {
    event_ids: Vec<i64>,
    targets: Vec<Option<&'a str>>,
    states: Vec<i16>,
    next_at: Vec<i64>,
    reasons: Vec<&'a str>,
    order_keys: Vec<Option<&'a str>>,
    now: Vec<i64>,
}

impl<'a> DeliveryColumns<'a> {
    /// The parameters of the deliveries' insert, with their ids.
    fn params<'p>(&'p self, ids: &'p Vec<i64>) -> [&'p (dyn ToSql + Sync); 8] {
        [
            ids,
            &self.event_ids,
            &self.targets,
            &self.states,
            &self.next_at,
            &self.reasons,
            &self.now,
            &self.order_keys,
        ]
    }

    fn of(stored: &[&'a Push], event_ids: &[i64], rows: usize) -> Self {
        let mut d = DeliveryColumns {
            event_ids: Vec::with_capacity(rows),
            targets: Vec::with_capacity(rows),
            states: Vec::with_capacity(rows),
            next_at: Vec::with_capacity(rows),
            reasons: Vec::with_capacity(rows),
            order_keys: Vec::with_capacity(rows),
            now: Vec::with_capacity(rows),
        };
        for (r, event_id) in stored.iter().zip(event_ids) {
            if r.event.targets.is_empty() {
                d.event_ids.push(*event_id);
                d.targets.push(None);
                d.states.push(DeliveryState::Dead.code());
                d.next_at.push(0);
                d.reasons.push(DeadReason::Unrouted.as_str());
                d.order_keys.push(None);
                d.now.push(r.now.0);
            }
            for t in &r.event.targets {
                d.event_ids.push(*event_id);
                d.targets.push(Some(&t.target));
                d.states.push(DeliveryState::Pending.code());
                d.next_at.push(t.due_at.0);
                d.reasons.push("");
                d.order_keys.push(t.order_key.as_deref());
                d.now.push(r.now.0);
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Event;

    fn request(body_bytes: usize) -> Push {
        let event = Event {
            dedup_key: "k".into(),
            account: "main".into(),
            received_at: UnixMs(0),
            query: String::new(),
            body: vec![b'x'; body_bytes].into(),
            xml: String::new(),
            fields: String::new(),
            msg_type: "event".into(),
            event_type: None,
            origin: Default::default(),
            trace_context: None,
        };
        Push {
            event: NewEvent {
                event,
                targets: Vec::new(),
                replay: None,
                trail: None,
            },
            now: UnixMs(0),
            window: Duration::ZERO,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_commit_carries_as_many_requests_as_fit_and_never_none() {
        let small: Vec<Push> = (0..3).map(|_| request(100)).collect();
        assert_eq!(fitting(&small), 3);
        let large: Vec<Push> = (0..3).map(|_| request(MAX_BATCH_BYTES / 2 + 1)).collect();
        assert_eq!(fitting(&large), 1);
        let huge = [request(MAX_BATCH_BYTES + 1)];
        assert_eq!(fitting(&huge), 1, "one is always taken");
    }
}
