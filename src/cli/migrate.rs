//! `wxrelay migrate`: brings the PostgreSQL spool's schema to this binary's
//! version, for operators who change the schema ahead of a rollout rather
//! than have the first new replica do it at start. Safe while replicas run:
//! the migrations are taken under the same advisory lock as at start, and
//! running it again changes nothing.

use super::dlq::failed;
use super::CliError;
use crate::config::{Settings, SpoolBackend};
use crate::spool::postgres;

/// Applies the migrations the configured database lacks; says what it did.
pub async fn run(settings: &Settings) -> Result<String, CliError> {
    match &settings.spool.backend {
        SpoolBackend::Sqlite { path } => Ok(format!(
            "the spool is the SQLite file {}: it is brought up to date when the relay opens it\n",
            path.display()
        )),
        SpoolBackend::Postgres(pg) => {
            let migrated = postgres::migrate(pg).await.map_err(failed)?;
            Ok(format!("database {}\n{migrated}\n", pg.display))
        }
    }
}
