//! The spool's types in SQLite's values: ids and times are integers,
//! states their codes, reasons their names; and rows read by column name.

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
