//! The embedded SQLite database (WAL) behind the `sql` capability. Each store plugin instance
//! gets its own connection to the one file under `--data`; statements are prepared once and
//! cached, and a `transaction` call is one SQLite transaction, so one group commit is one fsync.

use crate::config::Synchronous;
use crate::plugins::bindings::sql::{SqlError, Statement, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, ToSql};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Database {
    conn: Connection,
}

#[derive(Clone, Debug)]
pub struct DatabaseFile {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
}

impl DatabaseFile {
    pub fn open(&self) -> Result<Database, rusqlite::Error> {
        Database::open(&self.path, self.synchronous, self.busy_timeout)
    }
}

impl Database {
    pub fn open(path: &Path, synchronous: Synchronous, busy_timeout: Duration) -> Result<Self, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match synchronous {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        // A group commit touches one leaf page per chat: keep the working set in memory, and
        // checkpoint the WAL less often than every 4 MB so checkpoints do not stall commits.
        conn.pragma_update(None, "cache_size", -16384)?;
        conn.pragma_update(None, "wal_autocheckpoint", 16384)?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Self { conn })
    }

    pub fn transaction(&mut self, statements: &[Statement]) -> Result<Vec<Vec<u64>>, SqlError> {
        let tx = self.conn.transaction().map_err(sql_error)?;
        let mut changed = Vec::with_capacity(statements.len());
        for statement in statements {
            let mut counts = Vec::with_capacity(statement.rows.len());
            if !statement.rows.is_empty() {
                let mut prepared = tx.prepare_cached(&statement.sql).map_err(sql_error)?;
                for row in &statement.rows {
                    let n = prepared.execute(rusqlite::params_from_iter(row.iter().map(Param))).map_err(sql_error)?;
                    counts.push(n as u64);
                }
            }
            changed.push(counts);
        }
        tx.commit().map_err(sql_error)?;
        Ok(changed)
    }

    pub fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>, SqlError> {
        let mut prepared = self.conn.prepare_cached(sql).map_err(sql_error)?;
        let columns = prepared.column_count();
        let mut rows = prepared.query(rusqlite::params_from_iter(params.iter().map(Param))).map_err(sql_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(match row.get_ref(i).map_err(sql_error)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(i) => Value::Integer(i),
                    ValueRef::Real(f) => Value::Real(f),
                    ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                });
            }
            out.push(values);
        }
        Ok(out)
    }
}

struct Param<'a>(&'a Value);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            // SQLite keeps NaN as NULL: refuse it rather than hand back something else.
            Value::Real(f) if f.is_nan() => return Err(rusqlite::Error::ToSqlConversionFailure("NaN cannot be stored (SQLite would keep NULL)".into())),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

/// Classifies SQLite errors for plugins without leaking paths.
fn sql_error(e: rusqlite::Error) -> SqlError {
    let message = e.to_string();
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => SqlError::Busy(message),
        Some(ErrorCode::ConstraintViolation) => SqlError::Constraint(message),
        Some(
            ErrorCode::DiskFull | ErrorCode::SystemIoFailure | ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::DatabaseCorrupt,
        ) => SqlError::Io(message),
        _ => SqlError::Invalid(message),
    }
}
