//! Statements held for the life of a connection's thread and found by the
//! address of their SQL text. rusqlite's statement cache hashes the whole
//! text and copies it into a new allocation on every use, which on the push
//! path cost more than some of the statements themselves.

use rusqlite::{Connection, Statement};
use std::cell::RefCell;
use std::ops::Deref;
use std::rc::Rc;

/// A connection with the statements its thread prepared, each kept until
/// the thread ends. Everything else goes to the connection (`Deref`).
pub(super) struct Prepared<'c> {
    conn: &'c Connection,
    /// (address and length of the SQL text, its statement).
    statements: RefCell<Vec<((usize, usize), Shared<'c>)>>,
}

/// One held statement; a caller borrows it while it runs.
pub(super) type Shared<'c> = Rc<RefCell<Statement<'c>>>;

impl<'c> Prepared<'c> {
    pub(super) fn new(conn: &'c Connection) -> Self {
        Prepared {
            conn,
            statements: RefCell::new(Vec::new()),
        }
    }

    /// `sql`'s statement, prepared on its first use. The same text at another
    /// address is prepared again: found by address, each is still its own.
    pub(super) fn statement(&self, sql: &'static str) -> rusqlite::Result<Shared<'c>> {
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some((_, held)) = self.statements.borrow().iter().find(|(k, _)| *k == key) {
            return Ok(Rc::clone(held));
        }
        let held = Rc::new(RefCell::new(self.conn.prepare(sql)?));
        self.statements.borrow_mut().push((key, Rc::clone(&held)));
        Ok(held)
    }
}

impl Deref for Prepared<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_prepared_once_and_runs_again() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        let held = Prepared::new(&conn);
        const INSERT: &str = "INSERT INTO t (v) VALUES (?1)";
        for v in 0..3 {
            held.statement(INSERT)
                .unwrap()
                .borrow_mut()
                .execute([v])
                .unwrap();
        }
        assert_eq!(held.statements.borrow().len(), 1);
        let n: i64 = held
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
    }
}
