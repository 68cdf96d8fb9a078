//! Apache Cassandra / ScyllaDB behind the `cql` capability: one scylla `Session` per instance,
//! shared by every plugin instance granted `cql`, with a prepared-statement cache. A `write`
//! or `query` call runs all its rows concurrently, so one group commit costs one round trip
//! of latency however many chats it carries.

use crate::config::{CassandraSection, Consistency, SerialConsistency};
use crate::plugins::bindings::cql::{CqlError, Statement, Value};
use futures_util::future::join_all;
use scylla::client::caching_session::CachingSession;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchStatement, BatchType};
use scylla::errors::{DbError, ExecutionError, PrepareError, RequestAttemptError};
use scylla::value::{CqlValue, Row};
use std::time::Duration;

/// Prepared statements kept per instance: a store uses a few dozen.
const PREPARED_CACHE: usize = 256;
/// An unlogged batch holds at most this many rows and bytes of values: under the node's
/// default warning thresholds (5 KiB, and 10 partitions for a batch across partitions),
/// large enough that a group commit of short messages is a handful of requests.
const BATCH_ROWS: usize = 10;
const BATCH_BYTES: usize = 4 * 1024;

pub struct Cassandra {
    session: CachingSession,
    /// Outer bound on one call, past the driver's own request timeout.
    deadline: Duration,
}

impl Cassandra {
    /// Connects to the contact points. Statements name their tables with the keyspace (the
    /// store plugin gets it as a setting), so the session has no current keyspace.
    pub async fn connect(c: &CassandraSection) -> Result<Self, String> {
        let profile = ExecutionProfile::builder()
            .consistency(match c.consistency {
                Consistency::One => scylla::statement::Consistency::One,
                Consistency::LocalOne => scylla::statement::Consistency::LocalOne,
                Consistency::Quorum => scylla::statement::Consistency::Quorum,
                Consistency::LocalQuorum => scylla::statement::Consistency::LocalQuorum,
                Consistency::EachQuorum => scylla::statement::Consistency::EachQuorum,
                Consistency::All => scylla::statement::Consistency::All,
            })
            .serial_consistency(Some(match c.serial_consistency {
                SerialConsistency::Serial => scylla::statement::SerialConsistency::Serial,
                SerialConsistency::LocalSerial => scylla::statement::SerialConsistency::LocalSerial,
            }))
            .request_timeout(Some(Duration::from_millis(c.request_timeout_ms)))
            .build();
        let mut builder = SessionBuilder::new()
            .known_nodes(&c.contact_points)
            .connection_timeout(Duration::from_millis(c.connect_timeout_ms))
            .keepalive_interval(Duration::from_millis(c.keepalive_ms))
            .keepalive_timeout(Duration::from_millis(c.keepalive_ms * 3))
            .cluster_metadata_refresh_interval(Duration::from_millis(c.metadata_refresh_ms))
            .default_execution_profile_handle(profile.into_handle());
        if let Some(user) = &c.username {
            let password = match (&c.password, &c.password_env) {
                (_, Some(var)) => std::env::var(var).map_err(|_| format!("cassandra.password_env: ${var} is not set"))?,
                (Some(p), None) => p.clone(),
                (None, None) => return Err("cassandra.username is set but neither password nor password_env".into()),
            };
            builder = builder.user(user, password);
        }
        if let Some(ca) = &c.tls_ca_file {
            use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
            let mut tls = SslConnector::builder(SslMethod::tls()).map_err(|e| format!("TLS: {e}"))?;
            tls.set_ca_file(ca).map_err(|e| format!("cassandra.tls_ca_file {}: {e}", ca.display()))?;
            tls.set_verify(SslVerifyMode::PEER);
            if !c.tls_verify_address {
                // The driver checks the certificate against the node's IP; accept a mismatch
                // of that alone (X509_V_ERR_IP_ADDRESS_MISMATCH), nothing else.
                tls.set_verify_callback(SslVerifyMode::PEER, |preverified, ctx| preverified || ctx.error().as_raw() == 64);
            }
            builder = builder.tls_context(Some(tls));
        }
        let session = builder.build().await.map_err(|e| {
            format!("cannot reach Cassandra at {} (keyspace {}): {e}", c.contact_points.join(", "), c.keyspace)
        })?;
        Ok(Self {
            session: CachingSession::from(session, PREPARED_CACHE),
            deadline: Duration::from_millis(c.request_timeout_ms * 2 + 500),
        })
    }

    /// Every statement for every row; the first failure is the call's error. Rows go in
    /// unlogged batches of up to `BATCH_ROWS` (one request each instead of one per row: on
    /// the per-message path the node's per-request cost dominates), all batches concurrently.
    pub async fn write(&self, statements: &[Statement]) -> Result<(), CqlError> {
        let runs = statements.iter().flat_map(|s| {
            batches(&s.rows).map(move |rows| async move {
                if let [row] = rows {
                    return self.session.execute_unpaged(s.cql.as_str(), values(row)).await.map(drop);
                }
                let batch = Batch::new_with_statements(BatchType::Unlogged, vec![BatchStatement::Query(s.cql.as_str().into()); rows.len()]);
                self.session.batch(&batch, rows.iter().map(|r| values(r)).collect::<Vec<_>>()).await.map(drop)
            })
        });
        let results = self.bounded(join_all(runs)).await?;
        for r in results {
            r.map_err(cql_error)?;
        }
        Ok(())
    }

    /// One statement per parameter row, concurrently; one result per row.
    pub async fn query(&self, cql: &str, params: &[Vec<Value>]) -> Vec<Result<Vec<Vec<Value>>, CqlError>> {
        let runs = params.iter().map(|row| async move {
            let result = self.session.execute_unpaged(cql, values(row)).await.map_err(cql_error)?;
            let Ok(rows) = result.into_rows_result() else { return Ok(Vec::new()) };
            let rows = rows.rows::<Row>().map_err(|e| CqlError::Invalid(format!("{cql}: {e}")))?;
            rows.map(|r| r.map(|r| r.columns.into_iter().map(value_of).collect()).map_err(|e| CqlError::Invalid(format!("{cql}: {e}"))))
                .collect()
        });
        match self.bounded(join_all(runs)).await {
            Ok(results) => results,
            Err(e) => params.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Runs one unprepared statement (schema changes of `parley storage init`).
    pub async fn run(&self, cql: &str) -> Result<(), String> {
        self.session.get_session().query_unpaged(cql, ()).await.map(drop).map_err(|e| e.to_string())
    }

    async fn bounded<T>(&self, f: impl Future<Output = T>) -> Result<T, CqlError> {
        tokio::time::timeout(self.deadline, f)
            .await
            .map_err(|_| CqlError::Unavailable(format!("no answer within {} ms", self.deadline.as_millis())))
    }
}

/// Splits rows into consecutive batches within `BATCH_ROWS` and `BATCH_BYTES` (a row larger
/// than the budget goes alone).
fn batches(rows: &[Vec<Value>]) -> impl Iterator<Item = &[Vec<Value>]> {
    let size = |row: &Vec<Value>| -> usize {
        row.iter()
            .map(|v| match v {
                Value::Text(s) => s.len(),
                Value::Blob(b) => b.len(),
                _ => 8,
            })
            .sum()
    };
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= rows.len() {
            return None;
        }
        let (mut end, mut bytes) = (start, 0);
        while end < rows.len() && end - start < BATCH_ROWS && (end == start || bytes + size(&rows[end]) <= BATCH_BYTES) {
            bytes += size(&rows[end]);
            end += 1;
        }
        let batch = &rows[start..end];
        start = end;
        Some(batch)
    })
}

/// A row of the WIT `cql` interface's values as the driver binds them (None = null).
pub fn values(row: &[Value]) -> Vec<Option<CqlValue>> {
    row.iter()
        .map(|v| match v {
            Value::Null => None,
            Value::Bigint(i) => Some(CqlValue::BigInt(*i)),
            Value::Int(i) => Some(CqlValue::Int(*i)),
            Value::Boolean(b) => Some(CqlValue::Boolean(*b)),
            Value::Text(s) => Some(CqlValue::Text(s.clone())),
            Value::Blob(b) => Some(CqlValue::Blob(b.clone())),
        })
        .collect()
}

/// A value the driver read, as the WIT `cql` interface hands it to a plugin.
pub fn value_of(v: Option<CqlValue>) -> Value {
    match v {
        None | Some(CqlValue::Empty) => Value::Null,
        Some(CqlValue::BigInt(i)) => Value::Bigint(i),
        Some(CqlValue::Counter(c)) => Value::Bigint(c.0),
        Some(CqlValue::Int(i)) => Value::Int(i),
        Some(CqlValue::Boolean(b)) => Value::Boolean(b),
        Some(CqlValue::Text(s) | CqlValue::Ascii(s)) => Value::Text(s),
        Some(CqlValue::Blob(b)) => Value::Blob(b),
        Some(other) => Value::Text(format!("{other:?}")),
    }
}

/// A statement the database rejects as wrong is `invalid`; everything else (no connection,
/// timeouts, too few replicas, overload) may pass and is `unavailable`.
fn cql_error(e: ExecutionError) -> CqlError {
    let message = e.to_string();
    let db = match &e {
        ExecutionError::BadQuery(_) => return CqlError::Invalid(message),
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => Some(db),
        ExecutionError::PrepareError(PrepareError::AllAttemptsFailed { first_attempt: RequestAttemptError::DbError(db, _) }) => Some(db),
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => return CqlError::Invalid(message),
        _ => None,
    };
    match db {
        Some(DbError::SyntaxError | DbError::Invalid | DbError::ConfigError | DbError::Unauthorized | DbError::AlreadyExists { .. }) => {
            CqlError::Invalid(message)
        }
        _ => CqlError::Unavailable(message),
    }
}

/// cassandra/schema.cql with the deployment's parameters filled in, one statement per item.
pub fn schema(c: &CassandraSection) -> Vec<String> {
    let replication = std::iter::once(format!("'class': '{}'", c.replication_strategy))
        .chain(c.replication.iter().map(|(k, v)| format!("'{k}': {v}")))
        .collect::<Vec<_>>()
        .join(", ");
    let script = include_str!("../../cassandra/schema.cql")
        .replace("${keyspace}", &c.keyspace)
        .replace("${replication}", &format!("{{{replication}}}"))
        .replace("${ttl_seconds}", &c.ttl_seconds.to_string())
        .replace("${gc_grace_seconds}", &c.gc_grace_seconds.to_string());
    let code: String = script
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// `parley storage init`: creates the keyspace and tables (IF NOT EXISTS), so no cqlsh is needed.
pub async fn init_schema(c: &CassandraSection) -> Result<usize, String> {
    let session = Cassandra::connect(c).await?;
    let statements = schema(c);
    for statement in &statements {
        let first_line = statement.lines().next().unwrap_or_default();
        session.run(statement).await.map_err(|e| format!("{first_line}: {e}"))?;
    }
    Ok(statements.len())
}
