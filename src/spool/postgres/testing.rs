//! For tests: a PostgreSQL spool in a schema of its own, dropped when the
//! test ends (also when it panics), so tests run side by side and leave
//! nothing behind.

use crate::config::{PostgresSettings, Secret, SslMode};
use std::io::Write as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

/// Names the test database; unset, the PostgreSQL tests are skipped.
pub const TEST_URL_VAR: &str = "WXRELAY_TEST_POSTGRES_URL";

/// The test database's URL; `None`, after saying so once, when unset.
pub fn test_url() -> Option<String> {
    static SKIPPED: Once = Once::new();
    match std::env::var(TEST_URL_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            // Straight to stderr: the test harness would swallow `eprintln!`
            // of a passing test.
            SKIPPED.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "PostgreSQL spool tests skipped: set {TEST_URL_VAR}=postgres://postgres@127.0.0.1:5432/test to run them"
                );
            });
            None
        }
    }
}

/// A fresh schema on the test database, dropped with this value.
pub struct TestSchema {
    url: String,
    pub settings: PostgresSettings,
}

impl TestSchema {
    /// A schema no other test uses, on the database at `url`.
    pub fn new(url: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let schema = format!(
            "wxrelay_t{}_{n}_{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let config: tokio_postgres::Config = url
            .parse()
            .unwrap_or_else(|e| panic!("{TEST_URL_VAR} is not a connection string: {e}"));
        Self {
            url: url.to_owned(),
            settings: PostgresSettings {
                url: Secret::new(url),
                display: super::postgres_display(&config),
                schema,
                pool_size: 8,
                sslmode: SslMode::Disable,
                ca_file: None,
            },
        }
    }

    /// Runs `sql` on the test database, outside any spool (to set a scene).
    pub fn execute(&self, sql: &str) {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        on_own_runtime(move || async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The rows in one of the schema's tables.
    pub fn count(&self, table: &str) -> i64 {
        self.number(&format!(
            "SELECT count(*) FROM \"{}\".{table}",
            self.settings.schema
        ))
    }

    /// How many times one of the schema's tables was vacuumed (by hand or
    /// by the spool; autovacuum's runs are counted apart).
    pub fn vacuums(&self, table: &str) -> i64 {
        self.number(&format!(
            "SELECT vacuum_count FROM pg_stat_user_tables
             WHERE schemaname = '{}' AND relname = '{table}'",
            self.settings.schema
        ))
    }

    /// The one bigint `sql` selects.
    fn number(&self, sql: &str) -> i64 {
        let (url, sql) = (self.url.clone(), sql.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        on_own_runtime(move || async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            let row = client
                .query_one(&sql, &[])
                .await
                .map_err(|e| e.to_string())?;
            let _ = tx.send(row.try_get::<_, i64>(0).map_err(|e| e.to_string())?);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        rx.recv().unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.settings.schema);
        let url = self.url.clone();
        let dropped = on_own_runtime(move || async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await.map_err(|e| e.to_string())
        });
        if let Err(e) = dropped {
            eprintln!("cannot drop test schema {}: {e}", self.settings.schema);
        }
    }
}

/// Runs a future on a thread and runtime of its own: usable from `Drop` and
/// from inside another runtime alike.
fn on_own_runtime<F, Fut>(make: F) -> Result<(), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(make())
    })
    .join()
    .unwrap_or_else(|_| Err("the thread panicked".to_owned()))
}
