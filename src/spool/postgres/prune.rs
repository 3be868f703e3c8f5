//! Expired dedup keys and replay guards are deleted in small batches, by a
//! task of their own, now and then: never a large `DELETE` holding locks
//! and leaving a table's worth of dead rows at once, and never in the
//! commit a push waits for. Autovacuum (tuned per table in the migration)
//! makes the space reusable behind them; behind the trail's prunes, whose
//! tables grow by what each deletes until a vacuum, the spool's own upkeep
//! does too (see [`super::analyze`]).

use crate::spool::vocab::PRUNE_EVERY;
use crate::spool::{SpoolError, Supervision, TrailSlot, UnixMs};
use deadpool_postgres::Pool;
use std::sync::{Arc, Mutex};

/// Rows deleted per statement.
const BATCH: i64 = 1_000;

#[derive(Clone)]
pub(super) struct Pruner {
    pool: Pool,
    state: Arc<Mutex<State>>,
    supervision: Supervision,
    trail: TrailSlot,
    upkeep: super::analyze::Analyzer,
}

#[derive(Default)]
struct State {
    pruned_at: i64,
    running: bool,
}

impl Pruner {
    pub(super) fn new(
        pool: Pool,
        supervision: Supervision,
        trail: TrailSlot,
        upkeep: super::analyze::Analyzer,
    ) -> Self {
        Self {
            pool,
            state: Arc::default(),
            supervision,
            trail,
            upkeep,
        }
    }

    /// A push was stored, or a refusal noted, at `now`: prune if it is time
    /// and no prune runs.
    pub(super) fn saw(&self, now: UnixMs) {
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.running || now < UnixMs(s.pruned_at) + PRUNE_EVERY {
                return;
            }
            s.running = true;
            s.pruned_at = now.0;
        }
        let this = self.clone();
        self.supervision.spawn_brief("postgres pruner", async move {
            for table in ["dedup", "replay"] {
                if let Err(e) = this.prune(table, now).await {
                    tracing::warn!(error = %crate::error_chain(&e), table, "cannot prune expired keys");
                }
            }
            if let Some(store) = this.trail.load_full() {
                match super::trail::prune(&this.pool, &store, now).await {
                    Ok(pruned) => this.upkeep.pruned(pruned),
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot prune the trail")
                    }
                }
            }
            this.state.lock().unwrap_or_else(|e| e.into_inner()).running = false;
        });
    }

    async fn prune(&self, table: &str, now: UnixMs) -> Result<(), SpoolError> {
        // Rows being taken over by a commit right now are left for next time.
        // The keys are picked by the expiry index and deleted by the
        // primary key: each batch costs the same whatever the table's size.
        let delete = format!(
            "DELETE FROM {table} WHERE key = ANY(ARRAY(
                 SELECT key FROM {table} WHERE expires_at <= $1
                 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))"
        );
        loop {
            let delete = delete.clone();
            let deleted = super::on_connection(&self.pool, "prune", move |client| {
                Box::pin(async move {
                    let statement = client.prepare_cached(&delete).await?;
                    Ok(client.execute(&statement, &[&now.0, &BATCH]).await?)
                })
            })
            .await?;
            if deleted < BATCH as u64 {
                return Ok(());
            }
        }
    }
}
