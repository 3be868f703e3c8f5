//! The schema's versions, embedded in the binary, and applying them.
//!
//! Each migration runs once, in order, recorded in `schema_migrations` in
//! the configured schema. All of them run in one transaction holding an
//! advisory lock derived from the schema's name, so replicas that start
//! together apply them once: the second waits, then finds nothing to do.

use crate::spool::migration::{self, Migrated, Migration};
use crate::spool::SpoolError;
use sha2::Digest;

const MIGRATIONS: &[Migration] = &[
    Migration::new(1, "queue", include_str!("migrations/0001_queue.sql")),
    Migration::new(2, "families", include_str!("migrations/0002_families.sql")),
    Migration::new(
        3,
        "trace_context",
        include_str!("migrations/0003_trace_context.sql"),
    ),
    Migration::new(
        4,
        "late_replies",
        include_str!("migrations/0004_late_replies.sql"),
    ),
    Migration::new(5, "trail", include_str!("migrations/0005_trail.sql")),
    Migration::new(
        6,
        "trail_refusals",
        include_str!("migrations/0006_trail_refusals.sql"),
    ),
];

/// The newest schema version this binary knows.
pub fn latest() -> i32 {
    migration::latest(MIGRATIONS)
}

/// The advisory lock's key: the same for every process using this schema.
fn lock_key(schema: &str) -> i64 {
    let digest = sha2::Sha256::digest(format!("wxrelay migrate {schema}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// Creates the schema if needed and applies the migrations it lacks.
/// Refuses a schema newer than this binary knows.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<Migrated, SpoolError> {
    let tx = client.transaction().await?;
    // A migration may rebuild a large table: it is not bounded like the
    // queue's own statements.
    // But it gives up rather than wait long for a table lock: while it
    // waits, every replica's pushes would queue behind it.
    tx.batch_execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '5s'")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(schema)])
        .await?;
    // The schema is a checked identifier; quoted all the same.
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET LOCAL search_path TO \"{schema}\";
         CREATE TABLE IF NOT EXISTS schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let from = version_in(&tx).await?;
    migration::refuse_newer(MIGRATIONS, &store(schema), from)?;
    for m in migration::after(MIGRATIONS, from) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Migrated::of(
        store(schema),
        from,
        migration::after(MIGRATIONS, from),
    ))
}

/// Checks that the schema is exactly the version this binary knows, for the
/// operator commands, which never change it.
pub async fn require_current(
    client: &tokio_postgres::Client,
    schema: &str,
) -> Result<(), SpoolError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM information_schema.tables
             WHERE table_schema = $1 AND table_name = 'schema_migrations'",
            &[&schema],
        )
        .await?
        .is_some();
    let version = if exists { version_in(client).await? } else { 0 };
    migration::refuse_newer(MIGRATIONS, &store(schema), version)?;
    if version < latest() {
        return Err(SpoolError::Schema(format!(
            "schema {schema} is at version {version}, this wxrelay needs {}: \
             start the relay or run `wxrelay migrate` first",
            latest()
        )));
    }
    Ok(())
}

/// How messages name the schema.
fn store(schema: &str) -> String {
    format!("schema {schema}")
}

async fn version_in(client: &impl tokio_postgres::GenericClient) -> Result<i32, SpoolError> {
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) AS version FROM schema_migrations",
            &[],
        )
        .await?;
    Ok(row.try_get("version")?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_numbered_without_gaps() {
        assert!(crate::spool::migration::numbered_without_gaps(
            super::MIGRATIONS
        ));
    }
}
