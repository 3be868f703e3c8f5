//! Opening the configured spool, and closing it the way its kind needs.

use super::postgres::OnOpen;
use super::{PostgresSpool, Spool, SpoolError, SqliteSpool};
use crate::config::{SpoolBackend, SpoolSettings};
use std::sync::Arc;

/// The spool the configuration names, opened.
#[derive(Clone)]
pub enum OpenSpool {
    Sqlite(Arc<SqliteSpool>),
    Postgres(Arc<PostgresSpool>),
}

impl OpenSpool {
    /// Opens the configured spool; a PostgreSQL one is migrated or checked
    /// as `on_open` says.
    pub async fn open(settings: &SpoolSettings, on_open: OnOpen) -> Result<Self, SpoolError> {
        Ok(match &settings.backend {
            SpoolBackend::Sqlite { path } => OpenSpool::Sqlite(Arc::new(SqliteSpool::open(path)?)),
            SpoolBackend::Postgres(pg) => {
                OpenSpool::Postgres(Arc::new(PostgresSpool::open(pg, on_open).await?))
            }
        })
    }

    pub fn spool(&self) -> Arc<dyn Spool> {
        match self {
            OpenSpool::Sqlite(s) => s.clone(),
            OpenSpool::Postgres(s) => s.clone(),
        }
    }

    /// Finishes the queued writes and closes the file or the connections.
    pub async fn close(self) {
        match self {
            OpenSpool::Sqlite(s) => {
                let _ = tokio::task::spawn_blocking(move || s.close()).await;
            }
            OpenSpool::Postgres(s) => s.close().await,
        }
    }
}
