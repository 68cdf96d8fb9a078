//! The capabilities the host offers plugins (SQL, logging, clock) and the per-instance state
//! they run against. A capability the deployment did not grant is absent from the state, and
//! the loader refuses a component that imports it.

use super::bindings::{clock, log, sql};
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

impl super::bindings::types::Host for PluginState {}
