//! The schema's versions, embedded in the binary, and applying them.
//!
//! Each migration runs once, in order, recorded in `schema_migrations` in
//! the configured schema. All of them run in one transaction holding an
//! advisory lock derived from the schema's name, so replicas that start
//! together apply them once: the second waits, then finds nothing to do.

use crate::spool::SpoolError;
use sha2::Digest;

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "queue",
    sql: include_str!("migrations/0001_queue.sql"),
}];

/// The newest schema version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub schema: String,
    /// The version before.
    pub from: i32,
    /// Applied now, in order: version and name.
    pub applied: Vec<(i32, &'static str)>,
}

impl std::fmt::Display for Migrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() {
            return write!(
                f,
                "schema {} is up to date at version {}",
                self.schema, self.from
            );
        }
        for (version, name) in &self.applied {
            writeln!(f, "applied {version} {name}")?;
        }
        write!(
            f,
            "schema {} migrated from version {} to {}",
            self.schema,
            self.from,
            latest()
        )
    }
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
    too_new(schema, from)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > from) {
        tx.batch_execute(m.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await?;
        applied.push((m.version, m.name));
    }
    tx.commit().await?;
    Ok(Migrated {
        schema: schema.to_owned(),
        from,
        applied,
    })
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
    too_new(schema, version)?;
    if version < latest() {
        return Err(SpoolError::Schema(format!(
            "schema {schema} is at version {version}, this wxrelay needs {}: \
             start the relay or run `wxrelay migrate` first",
            latest()
        )));
    }
    Ok(())
}

async fn version_in(client: &impl tokio_postgres::GenericClient) -> Result<i32, SpoolError> {
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

fn too_new(schema: &str, version: i32) -> Result<(), SpoolError> {
    if version > latest() {
        return Err(SpoolError::Schema(format!(
            "schema {schema} is at version {version}, newer than this wxrelay knows ({}): \
             a newer release has migrated it; run that release (or newer)",
            latest()
        )));
    }
    Ok(())
}
