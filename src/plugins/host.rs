//! The capabilities the host offers plugins (SQL, logging, clock) and the per-instance state
//! they run against. A capability the deployment did not grant is absent from the state, and
//! the loader refuses a component that imports it.

use super::bindings::{clock, cql, http, log, sql};
use crate::storage::cassandra::Cassandra;
use crate::storage::sqlite::Database;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, trace, warn};
use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Data of one plugin instance's wasmtime `Store`.
pub struct PluginState {
    pub label: Arc<str>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub memory: MemoryLimit,
    pub sql: Option<Database>,
    /// With the cql grant: the instance's Cassandra session.
    pub cql: Option<Arc<Cassandra>>,
    /// With the http grant: the host:port pairs it may reach.
    pub http_hosts: Option<Vec<String>>,
    pub started: Instant,
}

/// Caps linear memory per instance and remembers that it refused, so the host can report
/// "memory limit" rather than a bare trap.
pub struct MemoryLimit {
    pub max_bytes: usize,
    pub refused: bool,
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = true;
            return Err(wasmtime::format_err!("memory limit of {} MiB reached", self.max_bytes >> 20));
        }
        Ok(true)
    }
    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl log::Host for PluginState {
    fn log(&mut self, level: log::Level, message: String) {
        let plugin = &*self.label;
        match level {
            log::Level::Trace => trace!(target: "parley::plugin", plugin, "{message}"),
            log::Level::Debug => debug!(target: "parley::plugin", plugin, "{message}"),
            log::Level::Info => info!(target: "parley::plugin", plugin, "{message}"),
            log::Level::Warn => warn!(target: "parley::plugin", plugin, "{message}"),
            log::Level::Error => error!(target: "parley::plugin", plugin, "{message}"),
        }
    }
}

impl clock::Host for PluginState {
    fn monotonic_now_ns(&mut self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

impl sql::Host for PluginState {
    #[tracing::instrument(name = "plugin.sql.transaction", skip_all, fields(plugin = %self.label, statements = statements.len()))]
    fn transaction(&mut self, statements: Vec<sql::Statement>) -> Result<Vec<Vec<u64>>, sql::SqlError> {
        match &mut self.sql {
            Some(db) => db.transaction(&statements),
            None => Err(sql::SqlError::Invalid("the sql capability was not granted".into())),
        }
    }

    #[tracing::instrument(name = "plugin.sql.query", skip_all, fields(plugin = %self.label))]
    fn query(&mut self, sql_text: String, params: Vec<sql::Value>) -> Result<Vec<Vec<sql::Value>>, sql::SqlError> {
        match &mut self.sql {
            Some(db) => db.query(&sql_text, &params),
            None => Err(sql::SqlError::Invalid("the sql capability was not granted".into())),
        }
    }
}

impl cql::Host for PluginState {
    #[tracing::instrument(name = "plugin.cql.write", skip_all, fields(plugin = %self.label, statements = statements.len()))]
    async fn write(&mut self, statements: Vec<cql::Statement>) -> Result<(), cql::CqlError> {
        match self.cql.clone() {
            Some(session) => session.write(&statements).await,
            None => Err(cql::CqlError::Invalid("the cql capability was not granted".into())),
        }
    }

    #[tracing::instrument(name = "plugin.cql.query", skip_all, fields(plugin = %self.label, rows = params.len()))]
    async fn query(&mut self, cql_text: String, params: Vec<Vec<cql::Value>>) -> Vec<Result<Vec<Vec<cql::Value>>, cql::CqlError>> {
        match self.cql.clone() {
            Some(session) => session.query(&cql_text, &params).await,
            None => params.iter().map(|_| Err(cql::CqlError::Invalid("the cql capability was not granted".into()))).collect(),
        }
    }
}

impl super::bindings::types::Host for PluginState {}

impl http::Host for PluginState {
    /// A plain HTTP/1.1 POST on a fresh connection with short timeouts: notice webhooks are
    /// rare, and a slow receiver must not hold the notice worker (the plugin's deadline is
    /// the outer bound).
    #[tracing::instrument(name = "plugin.http.post", skip_all, fields(plugin = %self.label))]
    fn post_json(&mut self, url: String, body: String) -> Result<u16, String> {
        use std::io::{Read, Write};
        let hosts = self.http_hosts.as_ref().ok_or("the http capability was not granted")?;
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
        if !hosts.iter().any(|h| h == authority) {
            return Err(format!("{authority} is not among this plugin's http_hosts"));
        }
        let timeout = std::time::Duration::from_millis(1000);
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority).map_err(|e| format!("{authority}: {e}"))?.next().ok_or_else(|| format!("{authority}: no address"))?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{authority}: {e}"))?;
        stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout))).map_err(|e| e.to_string())?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(|e| format!("{authority}: {e}"))?;
        let mut head = [0u8; 64];
        let n = stream.read(&mut head).map_err(|e| format!("{authority}: {e}"))?;
        let status = std::str::from_utf8(&head[..n]).ok().and_then(|h| h.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
        status.ok_or_else(|| format!("{authority}: not an HTTP response"))
    }
}
