//! Bringing the schema up to date as the spool opens, and opening while the
//! database cannot be reached: the relay then starts all the same, every
//! operation failing with the reason (pushes get 503, `/readyz` 503), and
//! the schema is checked and migrated in the background, waiting longer
//! after each failure, until the database answers.

use super::wake::RECONNECT_MAX;
use super::{bounded, client, migrate, OnOpen};
use crate::spool::{SpoolError, Supervision};
use deadpool_postgres::Pool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

/// The wait after the first failed attempt; it doubles up to
/// [`RECONNECT_MAX`].
const FIRST_WAIT: Duration = Duration::from_millis(500);

/// Whether the schema has been checked since the spool opened; until it
/// has, why not.
#[derive(Debug, Default)]
pub(super) struct Readiness(Mutex<Option<String>>);

impl Readiness {
    /// `Ok` once the schema is checked; the last reason it is not, before.
    pub(super) fn check(&self) -> Result<(), SpoolError> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(SpoolError::storage(format!(
                "waiting for the database to check the spool's schema (trying again): {reason}"
            ))),
        }
    }

    /// Waiting, for this reason; `None`: ready.
    fn set(&self, reason: Option<&SpoolError>) {
        let reason = reason.map(|e| crate::error_chain(e));
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = reason;
    }
}

/// Brings the schema up to date or checks it, as `on_open` says. With
/// [`OnOpen::MigrateWhenReachable`], a database that cannot be reached (or
/// fails otherwise) leaves the spool waiting, and the task that keeps
/// trying is returned; a schema newer than this binary knows is refused at
/// once all the same.
pub(super) async fn schema(
    pool: &Pool,
    schema: &str,
    on_open: OnOpen,
    supervision: &Supervision,
) -> Result<(Arc<Readiness>, Option<JoinHandle<()>>), SpoolError> {
    let readiness = Arc::new(Readiness::default());
    match on_open {
        OnOpen::Migrate => migrate_now(pool, schema).await?,
        OnOpen::RequireCurrent => {
            let client = client(pool).await?;
            bounded("schema check", migrate::require_current(&client, schema)).await?
        }
        OnOpen::MigrateWhenReachable => match migrate_now(pool, schema).await {
            Ok(()) => {}
            Err(e @ SpoolError::Schema(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the database cannot be reached: the relay starts without it (pushes get 503, /readyz 503) and tries again");
                readiness.set(Some(&e));
                let task = until_migrated(pool.clone(), schema.to_owned(), readiness.clone());
                return Ok((
                    readiness,
                    Some(supervision.spawn_brief("postgres schema check", task)),
                ));
            }
        },
    }
    Ok((readiness, None))
}

/// Applies the migrations the schema lacks, saying so when it applied any.
async fn migrate_now(pool: &Pool, schema: &str) -> Result<(), SpoolError> {
    let mut client = client(pool).await?;
    let migrated = migrate::migrate(&mut client, schema).await?;
    if !migrated.applied.is_empty() {
        tracing::info!(schema = %schema, from = migrated.from, to = migrate::latest(), "spool schema migrated");
    }
    Ok(())
}

/// Tries [`migrate_now`] until it succeeds, waiting longer after each
/// failure, then marks the spool ready.
async fn until_migrated(pool: Pool, schema: String, readiness: Arc<Readiness>) {
    let mut wait = FIRST_WAIT;
    loop {
        tokio::time::sleep(wait).await;
        match migrate_now(&pool, &schema).await {
            Ok(()) => {
                readiness.set(None);
                tracing::info!(schema = %schema, "the database answers: spool schema checked, the spool is ready");
                return;
            }
            Err(e) => {
                wait = (wait * 2).min(RECONNECT_MAX);
                match e {
                    SpoolError::Schema(_) => {
                        tracing::error!(error = %e, "still waiting for the database: its schema cannot be used")
                    }
                    _ => {
                        tracing::warn!(error = %e, next_in = ?wait, "still waiting for the database")
                    }
                }
                readiness.set(Some(&e));
            }
        }
    }
}
