//! Opening the configured spool, handing it out by role, and closing it the
//! way its kind needs.

use super::postgres::OnOpen;
use super::{
    DueListener, Health, Intake, Operator, PostgresSpool, SpoolError, SqliteSpool, Supervision,
    Tickets, TrailLog, TrailSetup, Work,
};
use crate::config::{SpoolBackend, SpoolSettings};
use std::sync::Arc;

/// The spool the configuration names, opened.
#[derive(Clone)]
pub enum OpenSpool {
    Sqlite(Arc<SqliteSpool>),
    Postgres(Arc<PostgresSpool>),
}

/// For a test on the real binary: set, the spool's writer panics when it
/// takes the first push (see [`Supervision::fail_writer_at_next_push`]).
#[cfg(any(test, feature = "test-util"))]
pub const FAIL_WRITER_VAR: &str = "WXRELAY_TEST_FAIL_SPOOL_WRITER";

/// Hands out one role of either engine.
macro_rules! roles {
    ($($(#[$doc:meta])* $name:ident: $role:ident;)*) => {$(
        $(#[$doc])*
        pub fn $name(&self) -> Arc<dyn $role> {
            match self {
                OpenSpool::Sqlite(s) => s.clone(),
                OpenSpool::Postgres(s) => s.clone(),
            }
        }
    )*};
}

impl OpenSpool {
    /// Opens the configured spool; a PostgreSQL one is migrated or checked
    /// as `on_open` says (a SQLite file is always brought up to date).
    pub async fn open(settings: &SpoolSettings, on_open: OnOpen) -> Result<Self, SpoolError> {
        let opened = match &settings.backend {
            SpoolBackend::Sqlite { path } => OpenSpool::Sqlite(Arc::new(SqliteSpool::open(path)?)),
            SpoolBackend::Postgres(pg) => {
                OpenSpool::Postgres(Arc::new(PostgresSpool::open(pg, on_open).await?))
            }
        };
        #[cfg(any(test, feature = "test-util"))]
        if std::env::var_os(FAIL_WRITER_VAR).is_some() {
            opened.supervision().fail_writer_at_next_push();
        }
        Ok(opened)
    }

    roles! {
        /// What ingest uses: storing pushes.
        intake: Intake;
        /// What the delivery workers use.
        work: Work;
        /// What the operator's commands use.
        operator: Operator;
        /// What readiness and the metrics use.
        health: Health;
        /// Wake-ups from the other replicas on the same spool.
        due_listener: DueListener;
        /// An Open Platform's ticket: kept by ingest, read by the admin
        /// API, `wxrelay ticket` and the metrics.
        tickets: Tickets;
        /// The event trail: the command line, the admin API and the pages.
        trail: TrailLog;
    }

    /// Turns the trail on (it is off until this is called).
    pub async fn start_trail(&self, setup: TrailSetup) -> Result<(), SpoolError> {
        match self {
            OpenSpool::Sqlite(s) => s.start_trail(setup).await,
            OpenSpool::Postgres(s) => s.start_trail(setup).await,
        }
    }

    /// The watch on the spool's tasks: the relay stops when one fails.
    pub fn supervision(&self) -> Supervision {
        match self {
            OpenSpool::Sqlite(s) => s.supervision(),
            OpenSpool::Postgres(s) => s.supervision(),
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
