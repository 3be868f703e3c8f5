//! Statements prepared once per connection and found again by the address
//! of their SQL text. deadpool's statement cache hashes the whole text
//! (SipHash over a few hundred bytes) and takes a lock on every use, which
//! a push pays for each of its statements.

use deadpool_postgres::{ClientWrapper, StatementCache};
use std::sync::Arc;
use tokio_postgres::{Error, Statement};

/// The statements one task keeps for the connection it uses; another
/// connection (the pool gave a new one) starts afresh.
#[derive(Default)]
pub(super) struct Prepared {
    /// The connection's own statement cache, which identifies it: held, so
    /// that its address cannot become another connection's while the
    /// statements below are kept.
    connection: Option<Arc<StatementCache>>,
    /// By the address and length of their SQL text.
    statements: Vec<((usize, usize), Statement)>,
}

impl Prepared {
    /// `sql` prepared on `c`: kept from an earlier use on the same
    /// connection, or prepared (through deadpool's cache) now.
    pub(super) async fn get(
        &mut self,
        c: &ClientWrapper,
        sql: &'static str,
    ) -> Result<Statement, Error> {
        let same = self
            .connection
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, &c.statement_cache));
        if !same {
            self.statements.clear();
            self.connection = Some(c.statement_cache.clone());
        }
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some((_, statement)) = self.statements.iter().find(|(k, _)| *k == key) {
            return Ok(statement.clone());
        }
        // Boxed: this rare path's large future would otherwise be part of
        // every caller's, and copied with it each time one is moved.
        let statement = Box::pin(c.prepare_cached(sql)).await?;
        self.statements.push((key, statement.clone()));
        Ok(statement)
    }
}
