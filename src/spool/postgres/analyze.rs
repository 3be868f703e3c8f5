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

use crate::spool::{SpoolError, Supervision};
use deadpool_postgres::Pool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Deliveries stored since the last analyze that make a large intake.
pub const ANALYZE_AFTER_ROWS: u64 = 10_000;
/// At most one analyze per this, however fast pushes come in.
pub(super) const ANALYZE_EVERY: Duration = Duration::from_secs(10);
/// The analyze's statistics target, a tenth of PostgreSQL's default: it
/// samples 3,000 rows of each table, which tells how many rows it holds and
/// how the few columns the queue's statements filter on spread, at a tenth
/// of the reads (on a table of a million events, 0.1 s rather than 1.5 s).
const STATISTICS_TARGET: u32 = 10;

/// Counts the deliveries stored, and analyzes the tables after many.
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
    running: bool,
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
    /// intake, no analyze ran lately and none runs now.
    pub(super) fn stored(&self, rows: u64) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.stored += rows;
            let lately = s.analyzed_at.is_some_and(|at| at.elapsed() < ANALYZE_EVERY);
            if s.running || lately || s.stored < ANALYZE_AFTER_ROWS {
                return;
            }
            s.running = true;
            s.stored = 0;
        }
        let this = self.clone();
        self.supervision.spawn_brief("postgres analyzer", async move {
            let started = Instant::now();
            match this.analyze().await {
                Ok(()) => tracing::debug!(took = ?started.elapsed(), "queue tables analyzed"),
                Err(e) => tracing::warn!(error = %crate::error_chain(&e), "cannot analyze the queue tables"),
            }
            let mut s = this.state.lock().unwrap_or_else(|e| e.into_inner());
            s.running = false;
            s.analyzed_at = Some(Instant::now());
        });
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
