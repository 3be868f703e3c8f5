//! The spool's types in SQLite's values: ids and times are integers,
//! states their codes, reasons their names; and rows read by column name,
//! asking SQLite for the names or, in hot queries, from a list ([`Listed`]).

use crate::spool::rows::Columns;
use crate::spool::{DeadReason, DeliveryId, DeliveryState, EventId, SpoolError, UnixMs};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Row, ToSql};
use std::cell::Cell;

impl ToSql for DeliveryState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(i64::from(self.code()).into())
    }
}

impl ToSql for DeadReason {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl FromSql for DeadReason {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e: String| FromSqlError::Other(e.into()))
    }
}

/// Ids (row ids) and times (unix milliseconds) are integers in the file.
macro_rules! sql_integer {
    ($($id:ident),*) => {$(
        impl ToSql for $id {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(self.0.into())
            }
        }

        impl FromSql for $id {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_i64().map($id)
            }
        }
    )*};
}

sql_integer!(EventId, DeliveryId, UnixMs);

impl Columns for Row<'_> {
    fn int(&self, name: &str) -> Result<i64, SpoolError> {
        Ok(self.get(name)?)
    }

    fn opt_int(&self, name: &str) -> Result<Option<i64>, SpoolError> {
        Ok(self.get(name)?)
    }

    fn opt_text(&self, name: &str) -> Result<Option<String>, SpoolError> {
        Ok(self.get(name)?)
    }

    fn blob(&self, name: &str) -> Result<Vec<u8>, SpoolError> {
        Ok(self.get(name)?)
    }
}

/// A row whose column names are listed in the order the query selects
/// them, so reading one by name is a search of the list: rusqlite asks SQLite
/// for every column's name on each read, and a lease reads twenty columns.
/// A name not listed is an error, and a test holds each list to its query.
pub(super) struct Listed<'r, 's> {
    row: &'r Row<'s>,
    names: &'static [&'static str],
    /// Just past the last name found: reads mostly follow the list, so each
    /// search starts there and finds its name at the first look.
    next: Cell<usize>,
}

impl<'r, 's> Listed<'r, 's> {
    pub(super) fn new(row: &'r Row<'s>, names: &'static [&'static str]) -> Self {
        Listed {
            row,
            names,
            next: Cell::new(0),
        }
    }

    fn index(&self, name: &str) -> Result<usize, SpoolError> {
        let (start, len) = (self.next.get(), self.names.len());
        let found = (start..len)
            .chain(0..start)
            .find(|&i| self.names[i] == name)
            .ok_or_else(|| SpoolError::storage(format!("column {name} is not in the query")))?;
        self.next.set(found + 1);
        Ok(found)
    }
}

impl Columns for Listed<'_, '_> {
    fn int(&self, name: &str) -> Result<i64, SpoolError> {
        Ok(self.row.get(self.index(name)?)?)
    }

    fn opt_int(&self, name: &str) -> Result<Option<i64>, SpoolError> {
        Ok(self.row.get(self.index(name)?)?)
    }

    fn opt_text(&self, name: &str) -> Result<Option<String>, SpoolError> {
        Ok(self.row.get(self.index(name)?)?)
    }

    fn blob(&self, name: &str) -> Result<Vec<u8>, SpoolError> {
        Ok(self.row.get(self.index(name)?)?)
    }
}

/// `first` then `then`, in a constant.
pub(super) const fn joined<const A: usize, const B: usize, const N: usize>(
    first: [&'static str; A],
    then: [&'static str; B],
) -> [&'static str; N] {
    assert!(A + B == N, "the joined list's length is the sum of both");
    let mut out = [""; N];
    let mut i = 0;
    while i < A {
        out[i] = first[i];
        i += 1;
    }
    while i < N {
        out[i] = then[i - A];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::rows::Columns;

    /// Names are found wherever the last search stopped, in any order, and a
    /// name not in the list is an error.
    #[test]
    fn a_listed_row_finds_its_columns_in_any_order() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let mut select = conn.prepare("SELECT 1, 2, 3").unwrap();
        let mut rows = select.query([]).unwrap();
        let row = rows.next().unwrap().unwrap();
        let listed = Listed::new(row, &["a", "b", "c"]);
        let read: Vec<i64> = ["a", "b", "c", "b", "a", "c", "c"]
            .iter()
            .map(|name| listed.int(name).unwrap())
            .collect();
        assert_eq!(read, [1, 2, 3, 2, 1, 3, 3]);
        assert!(listed.int("d").is_err());
    }
}
