//! The spool's types in SQLite's values: ids and times are integers,
//! states their codes, reasons their names; and rows read by column name,
//! asking SQLite for the names or, in hot queries, from a list ([`Listed`]).

use crate::spool::rows::Columns;
use crate::spool::{DeadReason, DeliveryId, DeliveryState, EventId, SpoolError, UnixMs};
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Row, ToSql};

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
    pub(super) row: &'r Row<'s>,
    pub(super) names: &'static [&'static str],
}

impl Listed<'_, '_> {
    fn index(&self, name: &str) -> Result<usize, SpoolError> {
        self.names
            .iter()
            .position(|n| *n == name)
            .ok_or_else(|| SpoolError::storage(format!("column {name} is not in the query")))
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
