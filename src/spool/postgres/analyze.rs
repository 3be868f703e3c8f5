//! The queue tables' planner statistics, kept fresh by the spool itself.
//!
//! A queue table swings from empty to a million rows and back. Once a
//! vacuum or an analyze has seen it empty, the planner takes it for empty
//! however full it grows again (new rows fill the space the old ones left,
//! so the file does not grow either), and plans for a handful of rows: on a
//! large backlog the claim and the outcomes' statements then crawl. So after
//! a large intake the spool analyzes the tables itself, whether autovacuum
//! runs or not: in a task of its own, never in a commit a push waits for, and
//! at most once per [`ANALYZE_EVERY`].
//!
//! A drain leaves the other trace: every delivery settled (deleted, or
//! updated to a later due time) leaves its entry in the due index, at the
//! front of it, where the claim starts reading. Until a vacuum removes them,
//! each claim steps over all the entries of the deliveries settled before
//! it, so a drain slows as it goes, the more the larger the backlog. So
//! after [`VACUUM_AFTER_ROWS`] settled deliveries the spool vacuums the
//! `deliveries` table itself, whether autovacuum runs or not: a plain
//! `VACUUM`, which blocks no reads nor writes, skipped if another one runs
//! on the table, never truncating it (that would lock it briefly), at most
//! once per [`VACUUM_EVERY`], in a task of its own, and never at the same
//! time as this spool's analyze.
//!
//! Pruning the trail leaves the same: the space of the rows it deleted is
//! reused only once a vacuum has seen them, so without one the trail's
//! tables grow by what each prune deleted, though their rows stay bounded.
//! So after a prune that deleted rows the spool vacuums the tables it
//! deleted from, the same way, one upkeep at a time: the pruner runs at
//! most once per pruning period, which bounds these vacuums too.

use crate::spool::{SpoolError, Supervision};
use deadpool_postgres::Pool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deliveries stored since the last analyze that make a large intake.
pub const ANALYZE_AFTER_ROWS: u64 = 10_000;
/// At most one analyze per this, however fast pushes come in.
pub(super) const ANALYZE_EVERY: Duration = Duration::from_secs(10);
/// Deliveries settled since the last vacuum that make a large drain: a few
/// seconds of one, whose dead index entries a claim steps over in well under
/// a millisecond.
pub const VACUUM_AFTER_ROWS: u64 = 10_000;
/// At most one vacuum per this, however fast deliveries are settled.
pub(super) const VACUUM_EVERY: Duration = Duration::from_secs(5);
/// How long a vacuum may run: it reads the whole table and its indexes,
/// which takes longer than any other operation's bound on a large backlog.
const VACUUM_TIMEOUT: Duration = Duration::from_secs(300);
/// The vacuum: see the module's documentation.
const VACUUM: &str = "VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP ON) deliveries";
/// The vacuum of the answered pushes' trail, after a prune deleted some (a
/// push's steps and kept body go with its row).
const VACUUM_TRAIL_EVENTS: &str =
    "VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP ON) trail_events, trail_steps, trail_bodies";
/// The vacuum of the refused pushes' trail, after a prune deleted some.
const VACUUM_TRAIL_REFUSALS: &str =
    "VACUUM (SKIP_LOCKED, TRUNCATE false, INDEX_CLEANUP ON) trail_refusals";

/// The analyze's statistics target, a tenth of PostgreSQL's default: it
/// samples 3,000 rows of each table, which tells how many rows it holds and
/// how the few columns the queue's statements filter on spread, at a tenth
/// of the reads (on a table of a million events, 0.1 s rather than 1.5 s).
const STATISTICS_TARGET: u32 = 10;

/// Counts the deliveries stored and settled, and analyzes the tables after
/// many stored, vacuums `deliveries` after many settled and the trail's
/// tables after a prune.
#[derive(Clone)]
pub(super) struct Analyzer {
    pool: Pool,
    state: Arc<Mutex<State>>,
    supervision: Supervision,
}

#[derive(Default)]
struct State {
    stored: u64,
    analyzed_at: Option<Instant>,
    settled: u64,
    vacuumed_at: Option<Instant>,
    /// The trail's tables pruned since their last vacuum.
    trail_pruned: TrailPruned,
    /// An analyze or a vacuum runs: they would wait for each other.
    running: bool,
}

/// Which of the trail's tables a prune deleted rows from.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct TrailPruned {
    /// The answered pushes' rows (and so their steps and bodies).
    pub events: bool,
    /// The refused pushes' rows.
    pub refusals: bool,
}

impl TrailPruned {
    fn any(self) -> bool {
        self.events || self.refusals
    }

    fn or(self, other: TrailPruned) -> TrailPruned {
        TrailPruned {
            events: self.events || other.events,
            refusals: self.refusals || other.refusals,
        }
    }
}

/// The kinds of upkeep.
#[derive(Clone, Copy)]
enum Upkeep {
    Analyze,
    Vacuum,
    VacuumTrail(TrailPruned),
}

impl Analyzer {
    pub(super) fn new(pool: Pool, supervision: Supervision) -> Self {
        Self {
            pool,
            state: Arc::default(),
            supervision,
        }
    }

    /// A commit stored `rows` deliveries: analyze if that makes a large
    /// intake and no analyze ran lately (see [`Analyzer::poke`]).
    pub(super) fn stored(&self, rows: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stored += rows;
        self.poke();
    }

    /// A batch of outcomes settled `rows` deliveries: vacuum if that makes a
    /// large drain and no vacuum ran lately (see [`Analyzer::poke`]).
    pub(super) fn settled(&self, rows: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).settled += rows;
        self.poke();
    }

    /// A prune deleted rows from the trail's tables in `pruned`: vacuum
    /// them once no other upkeep runs (see [`Analyzer::poke`]).
    pub(super) fn pruned(&self, pruned: TrailPruned) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.trail_pruned = s.trail_pruned.or(pruned);
        drop(s);
        self.poke();
    }

    /// Starts the upkeep that is due, unless one runs: the deliveries'
    /// vacuum first, then the trail's, then the analyze. One that waited
    /// for another starts when it ends.
    fn poke(&self) {
        let upkeep = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let lately =
                |at: Option<Instant>, every| at.is_some_and(|at: Instant| at.elapsed() < every);
            let upkeep = if s.running {
                None
            } else if s.settled >= VACUUM_AFTER_ROWS && !lately(s.vacuumed_at, VACUUM_EVERY) {
                s.settled = 0;
                Some(Upkeep::Vacuum)
            } else if s.trail_pruned.any() {
                Some(Upkeep::VacuumTrail(std::mem::take(&mut s.trail_pruned)))
            } else if s.stored >= ANALYZE_AFTER_ROWS && !lately(s.analyzed_at, ANALYZE_EVERY) {
                s.stored = 0;
                Some(Upkeep::Analyze)
            } else {
                None
            };
            s.running |= upkeep.is_some();
            upkeep
        };
        if let Some(upkeep) = upkeep {
            self.start(upkeep);
        }
    }

    /// Runs `upkeep` in a task of its own; the caller has marked it running.
    fn start(&self, upkeep: Upkeep) {
        let this = self.clone();
        self.supervision.spawn_brief("postgres upkeep", async move {
            let started = Instant::now();
            let (done, what) = match upkeep {
                Upkeep::Analyze => (this.analyze().await, "analyze the queue tables"),
                Upkeep::Vacuum => (this.vacuum(&[VACUUM]).await, "vacuum the deliveries"),
                Upkeep::VacuumTrail(pruned) => {
                    let vacuums = [
                        (pruned.events, VACUUM_TRAIL_EVENTS),
                        (pruned.refusals, VACUUM_TRAIL_REFUSALS),
                    ];
                    let vacuums: Vec<&str> = vacuums
                        .iter()
                        .filter(|(p, _)| *p)
                        .map(|(_, v)| *v)
                        .collect();
                    (this.vacuum(&vacuums).await, "vacuum the trail")
                }
            };
            match done {
                Ok(()) => tracing::debug!(took = ?started.elapsed(), "did {what}"),
                Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot {what}"),
            }
            let mut s = this.state.lock().unwrap_or_else(|e| e.into_inner());
            s.running = false;
            match upkeep {
                Upkeep::Analyze => s.analyzed_at = Some(Instant::now()),
                Upkeep::Vacuum => s.vacuumed_at = Some(Instant::now()),
                Upkeep::VacuumTrail(_) => {}
            }
            drop(s);
            this.poke();
        });
    }

    /// The `vacuums` in turn, within [`VACUUM_TIMEOUT`] together (in the
    /// database too). A connection given up on is discarded, not pooled,
    /// with its timeout.
    async fn vacuum(&self, vacuums: &[&str]) -> Result<(), SpoolError> {
        let pool = self.pool.clone();
        let vacuums: Vec<String> = vacuums.iter().map(|v| v.to_string()).collect();
        let run = async move {
            let mut checkout = super::Checkout::of(&pool).await?;
            let c = checkout.get()?;
            let ms = VACUUM_TIMEOUT.as_millis();
            c.batch_execute(&format!("SET statement_timeout = {ms}"))
                .await?;
            // Each apart: a vacuum runs outside a transaction, and a string
            // of several statements is one.
            let mut vacuumed = Ok(());
            for vacuum in &vacuums {
                vacuumed = c.batch_execute(vacuum).await;
                if vacuumed.is_err() {
                    break;
                }
            }
            c.batch_execute("RESET statement_timeout").await?;
            checkout.finished();
            Ok(vacuumed?)
        };
        tokio::time::timeout(VACUUM_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| Err(SpoolError::storage("the vacuum did not end in time")))
    }

    async fn analyze(&self) -> Result<(), SpoolError> {
        super::on_connection(&self.pool, "analyze", |client| {
            Box::pin(async move {
                let tx = client.transaction().await?;
                tx.batch_execute(&format!(
                    "SET LOCAL default_statistics_target = {STATISTICS_TARGET};
                     ANALYZE events, deliveries, dedup, replay"
                ))
                .await?;
                tx.commit().await?;
                Ok(())
            })
        })
        .await
    }
}
