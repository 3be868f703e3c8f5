//! Reading PostgreSQL rows by column name, with `try_get`: a column missing
//! or of an unexpected type is an error the operation returns, never a panic.

use crate::spool::rows::Columns;
use crate::spool::SpoolError;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Row;

/// The value of column `name`.
pub(super) fn get<'r, T: FromSql<'r>>(row: &'r Row, name: &str) -> Result<T, SpoolError> {
    Ok(row.try_get(name)?)
}

/// Column `name` of every row.
pub(super) fn column<'r, T: FromSql<'r>>(
    rows: &'r [Row],
    name: &str,
) -> Result<Vec<T>, SpoolError> {
    rows.iter().map(|row| get(row, name)).collect()
}

impl Columns for Row {
    fn int(&self, name: &str) -> Result<i64, SpoolError> {
        self.opt_int(name)?
            .ok_or_else(|| SpoolError::storage(format!("column {name} is NULL")))
    }

    fn opt_int(&self, name: &str) -> Result<Option<i64>, SpoolError> {
        let ty = self
            .columns()
            .iter()
            .find(|c| c.name() == name)
            .map(|c| c.type_().clone());
        Ok(match ty {
            Some(Type::INT2) => get::<Option<i16>>(self, name)?.map(i64::from),
            Some(Type::INT4) => get::<Option<i32>>(self, name)?.map(i64::from),
            _ => get::<Option<i64>>(self, name)?,
        })
    }

    fn opt_text(&self, name: &str) -> Result<Option<String>, SpoolError> {
        get(self, name)
    }

    fn blob(&self, name: &str) -> Result<Vec<u8>, SpoolError> {
        get(self, name)
    }
}
