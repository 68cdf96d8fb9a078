//! The WIT values of the storage capabilities. `sql`: any row a plugin writes through the host
//! into a real SQLite file reads back as written (or the write is refused with an error, never
//! silently changed). `cql`: any row converts to the driver's values and back unchanged.

#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use parley::config::Synchronous;
use parley::plugins::bindings::{cql, sql};
use parley::storage::sqlite::Database;
use std::sync::{Mutex, OnceLock};

#[derive(Arbitrary, Debug, Clone)]
enum V {
    Null,
    Integer(i64),
    Int(i32),
    Real(f64),
    Boolean(bool),
    Text(String),
    Blob(Vec<u8>),
}

fn database() -> &'static Mutex<Database> {
    static DB: OnceLock<Mutex<Database>> = OnceLock::new();
    DB.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("parley-fuzz-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut db = Database::open(&path, Synchronous::Normal, std::time::Duration::from_secs(1)).unwrap();
        db.transaction(&[sql::Statement { sql: "CREATE TABLE t (k INTEGER PRIMARY KEY, v)".into(), rows: vec![vec![]] }]).unwrap();
        Mutex::new(db)
    })
}

fn to_sql(v: &V) -> sql::Value {
    match v {
        V::Null => sql::Value::Null,
        V::Integer(i) => sql::Value::Integer(*i),
        V::Int(i) => sql::Value::Integer(i64::from(*i)),
        V::Real(f) => sql::Value::Real(*f),
        V::Boolean(b) => sql::Value::Integer(i64::from(*b)),
        V::Text(s) => sql::Value::Text(s.clone()),
        V::Blob(b) => sql::Value::Blob(b.clone()),
    }
}

fn to_cql(v: &V) -> cql::Value {
    match v {
        V::Null | V::Real(_) => cql::Value::Null,
        V::Integer(i) => cql::Value::Bigint(*i),
        V::Int(i) => cql::Value::Int(*i),
        V::Boolean(b) => cql::Value::Boolean(*b),
        V::Text(s) => cql::Value::Text(s.clone()),
        V::Blob(b) => cql::Value::Blob(b.clone()),
    }
}

fn same_sql(a: &sql::Value, b: &sql::Value) -> bool {
    match (a, b) {
        (sql::Value::Null, sql::Value::Null) => true,
        (sql::Value::Integer(x), sql::Value::Integer(y)) => x == y,
        (sql::Value::Real(x), sql::Value::Real(y)) => x == y,
        (sql::Value::Text(x), sql::Value::Text(y)) => x == y,
        (sql::Value::Blob(x), sql::Value::Blob(y)) => x == y,
        _ => false,
    }
}

fn same_cql(a: &cql::Value, b: &cql::Value) -> bool {
    match (a, b) {
        (cql::Value::Null, cql::Value::Null) => true,
        (cql::Value::Bigint(x), cql::Value::Bigint(y)) => x == y,
        (cql::Value::Int(x), cql::Value::Int(y)) => x == y,
        (cql::Value::Boolean(x), cql::Value::Boolean(y)) => x == y,
        (cql::Value::Text(x), cql::Value::Text(y)) => x == y,
        (cql::Value::Blob(x), cql::Value::Blob(y)) => x == y,
        _ => false,
    }
}

fuzz_target!(|row: Vec<V>| {
    let cql_row: Vec<cql::Value> = row.iter().map(to_cql).collect();
    let back: Vec<cql::Value> = parley::storage::cassandra::values(&cql_row).into_iter().map(parley::storage::cassandra::value_of).collect();
    assert!(cql_row.iter().zip(&back).all(|(a, b)| same_cql(a, b)) && back.len() == cql_row.len(), "{cql_row:?} came back as {back:?}");

    let mut db = database().lock().unwrap();
    for (k, v) in row.iter().enumerate() {
        let written = to_sql(v);
        let insert = sql::Statement { sql: "INSERT OR REPLACE INTO t (k, v) VALUES (?, ?)".into(), rows: vec![vec![sql::Value::Integer(k as i64), written.clone()]] };
        if db.transaction(&[insert]).is_err() {
            continue; // refused with an error: the plugin is told, nothing half-written
        }
        let read = db.query("SELECT v FROM t WHERE k = ?", &[sql::Value::Integer(k as i64)]).expect("a written row reads back");
        assert!(read.len() == 1 && read[0].len() == 1, "{read:?}");
        assert!(same_sql(&written, &read[0][0]), "wrote {written:?}, read {:?}", read[0][0]);
    }
});
