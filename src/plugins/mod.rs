//! The plugin runtime: one wasmtime `Engine` (pooling allocator, epoch interruption), one
//! `Linker` per world, one `Store` per plugin instance. Components are checked against their
//! slot before anything runs: world, WIT version and imports against the deployment's grants.

pub mod bindings;
pub mod builtin;
pub mod host;
pub mod inspect;
pub mod scenario;
pub mod slots;

use crate::config::{Deployment, PluginSection};
use crate::storage::cassandra::Cassandra;
use crate::storage::sqlite::DatabaseFile;
use bindings::{NoticeHandler, SaveErrorPolicy, TranscriptStore};
use host::{MemoryLimit, PluginState};
use sha2::{Digest, Sha256};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::WasiCtxBuilder;

/// How often the engine's epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// The largest linear memory any instance may reach; each slot sets its own lower limit.
const POOL_MAX_MEMORY: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Intermediate,
    Final,
    SaveErrorPolicy,
    NoticeHandler,
}

impl Slot {
    pub const ALL: [Slot; 4] = [Slot::Intermediate, Slot::Final, Slot::SaveErrorPolicy, Slot::NoticeHandler];

    pub fn name(self) -> &'static str {
        match self {
            Slot::Intermediate => "intermediate",
            Slot::Final => "final",
            Slot::SaveErrorPolicy => "save-error-policy",
            Slot::NoticeHandler => "notice-handler",
        }
    }

    fn world(self) -> WorldKind {
        match self {
            Slot::Intermediate | Slot::Final => WorldKind::Store,
            Slot::SaveErrorPolicy => WorldKind::Policy,
            Slot::NoticeHandler => WorldKind::Notices,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorldKind {
    Store,
    Policy,
    Notices,
}

impl WorldKind {
    pub fn world_name(self) -> &'static str {
        match self {
            WorldKind::Store => "transcript-store",
            WorldKind::Policy => "save-error-policy",
            WorldKind::Notices => "notice-handler",
        }
    }
    /// The interface a component of this world exports.
    pub fn export(self) -> &'static str {
        match self {
            WorldKind::Store => "store",
            WorldKind::Policy => "policy",
            WorldKind::Notices => "notices",
        }
    }
    fn from_export(name: &str) -> Option<Self> {
        [WorldKind::Store, WorldKind::Policy, WorldKind::Notices].into_iter().find(|w| w.export() == name)
    }
}

/// Host capabilities a deployment can grant a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    Sql,
    Cql,
    Log,
    Clock,
    Random,
    Http,
}

impl Grant {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sql" => Grant::Sql,
            "cql" => Grant::Cql,
            "log" => Grant::Log,
            "clock" => Grant::Clock,
            "random" => Grant::Random,
            "http" => Grant::Http,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Grant::Sql => "sql",
            Grant::Cql => "cql",
            Grant::Log => "log",
            Grant::Clock => "clock",
            Grant::Random => "random",
            Grant::Http => "http",
        }
    }
}

/// Why a plugin could not be loaded into its slot; printed as one line at startup.
#[derive(Debug, thiserror::Error)]
#[error("slot {slot}: {file}: {problem}")]
pub struct LoadError {
    pub slot: &'static str,
    pub file: String,
    pub problem: String,
}

/// Why one call into a plugin failed. The instance is discarded and re-created for the next call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginFault {
    #[error("plugin trapped: {0}")]
    Trap(String),
    #[error("plugin ran past its {0} ms deadline")]
    Deadline(u64),
    #[error("plugin exceeded its {0} MiB memory limit")]
    MemoryLimit(u64),
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
    #[error("plugin worker is gone")]
    Gone,
}

/// A plugin checked and compiled for its slot.
pub struct Plugin {
    pub slot: Slot,
    pub file: String,
    pub component: Component,
    pub grants: Vec<Grant>,
    pub settings: Vec<(String, String)>,
    pub memory_mb: u64,
    pub deadline_ms: u64,
    /// host:port pairs the `http` capability may reach.
    pub http_hosts: Vec<String>,
}

pub struct Runtime {
    engine: Engine,
    cache_dir: PathBuf,
    /// Where call latencies go.
    kpi: Arc<crate::kpi::Kpi>,
    store_linker: Linker<PluginState>,
    policy_linker: Linker<PluginState>,
    notice_linker: Linker<PluginState>,
    /// The Cassandra session plugins granted `cql` run on (with a `[cassandra]` section).
    cql: std::sync::OnceLock<Arc<Cassandra>>,
}

impl Runtime {
    pub fn new(cache_dir: PathBuf, kpi: Arc<crate::kpi::Kpi>) -> anyhow::Result<Arc<Self>> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(64)
            .total_core_instances(512)
            .total_memories(128)
            .total_tables(512)
            .max_memory_size(POOL_MAX_MEMORY)
            .table_elements(100_000)
            .max_component_instance_size(8 << 20)
            .max_core_instance_size(8 << 20)
            .max_memories_per_component(16)
            .max_tables_per_component(64);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;
        let ticker = engine.weak();
        std::thread::Builder::new().name("parley-epoch".into()).spawn(move || {
            while let Some(engine) = ticker.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
        let store_linker = linker::<TranscriptStore>(&engine)?;
        let policy_linker = linker::<SaveErrorPolicy>(&engine)?;
        let notice_linker = linker::<NoticeHandler>(&engine)?;
        Ok(Arc::new(Self { engine, cache_dir, kpi, store_linker, policy_linker, notice_linker, cql: Default::default() }))
    }

    /// Gives plugins granted `cql` this session (once, at startup).
    pub fn connect_cql(&self, session: Arc<Cassandra>) {
        let _ = self.cql.set(session);
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn linker(&self, world: WorldKind) -> &Linker<PluginState> {
        match world {
            WorldKind::Store => &self.store_linker,
            WorldKind::Policy => &self.policy_linker,
            WorldKind::Notices => &self.notice_linker,
        }
    }

    /// Loads the plugin a deployment names for `slot` (or the built-in default) and checks it.
    pub fn load_slot(&self, deployment: &Deployment, slot: Slot) -> Result<Plugin, LoadError> {
        let section = match slot {
            Slot::Intermediate => &deployment.plugins.intermediate,
            Slot::Final => &deployment.plugins.final_,
            Slot::SaveErrorPolicy => &deployment.plugins.save_error_policy,
            Slot::NoticeHandler => &deployment.plugins.notice_handler,
        };
        let default_section;
        let section = match section {
            Some(s) => s,
            None => {
                default_section = builtin::default_section(slot, deployment.cassandra.as_ref());
                &default_section
            }
        };
        self.load(slot, section, &deployment.base_dir)
    }

    pub fn load(&self, slot: Slot, section: &PluginSection, base_dir: &Path) -> Result<Plugin, LoadError> {
        let fail = |problem: String| LoadError { slot: slot.name(), file: section.file.clone(), problem };
        let bytes: std::borrow::Cow<'static, [u8]> = match section.file.strip_prefix("builtin:") {
            Some(name) => builtin::bytes(name)
                .ok_or_else(|| fail(format!("no built-in plugin named {name:?} (built-ins: {})", builtin::NAMES.join(", "))))?
                .into(),
            None => {
                let path = base_dir.join(&section.file);
                std::fs::read(&path).map_err(|e| fail(format!("cannot read the component: {e}")))?.into()
            }
        };
        let component = self.compile(&bytes).map_err(fail)?;
        let grants = match &section.grants {
            Some(names) => names
                .iter()
                .map(|n| Grant::parse(n).ok_or_else(|| fail(format!("unknown grant {n:?} (known: sql, cql, log, clock, random, http)"))))
                .collect::<Result<Vec<_>, _>>()?,
            None => builtin::default_grants(slot.world()),
        };
        check_contract(&self.engine, &component, slot.world(), &grants).map_err(fail)?;
        let imports_cql = component.component_type().imports(&self.engine).any(|(name, _)| parse_parley(name).is_some_and(|(i, _)| i == "cql"));
        if imports_cql && self.cql.get().is_none() {
            return Err(fail("imports cql, but the deployment has no [cassandra] section to connect it to".into()));
        }
        // Every import must be one this host links (a WASI interface it does not offer, such
        // as wasi:http, would otherwise fail only when the first instance is made).
        self.linker(slot.world()).instantiate_pre(&component).map_err(|e| fail(format!("asks for an import this host does not provide: {e}")))?;
        let settings = section
            .settings
            .iter()
            .map(|(k, v)| (k.clone(), match v {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            }))
            .collect();
        Ok(Plugin {
            slot,
            file: section.file.clone(),
            component,
            grants,
            settings,
            memory_mb: section.memory_mb,
            deadline_ms: section.deadline_ms,
            http_hosts: section.http_hosts.clone(),
        })
    }

    /// Compiles a component, or reuses the compiled artifact cached for these exact bytes and
    /// this engine configuration (compiling a Python or JavaScript component takes seconds).
    fn compile(&self, bytes: &[u8]) -> Result<Component, String> {
        check_header(bytes)?;
        let mut engine_hash = std::hash::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let key = format!("{}-{:016x}.cwasm", hex::encode(Sha256::digest(bytes)), engine_hash.finish());
        let cached = self.cache_dir.join(key);
        if cached.exists() {
            // SAFETY: the cache directory is written only by this host, from components it compiled.
            if let Ok(c) = unsafe { Component::deserialize_file(&self.engine, &cached) } {
                return Ok(c);
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| format!("is not a valid component: {e:#}"))?;
        if let Ok(artifact) = component.serialize() {
            let tmp = cached.with_extension("tmp");
            if std::fs::create_dir_all(&self.cache_dir).is_ok() && std::fs::write(&tmp, artifact).is_ok() {
                let _ = std::fs::rename(&tmp, &cached);
            }
        }
        Ok(component)
    }

    /// An instance of `plugin` that is instantiated on first use and after every fault.
    pub fn instance<W: World>(self: &Arc<Self>, plugin: Arc<Plugin>, database: Option<DatabaseFile>) -> Instance<W> {
        Instance { runtime: self.clone(), plugin, database, live: None }
    }
}

fn linker<W: World>(engine: &Engine) -> anyhow::Result<Linker<PluginState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    W::add_to_linker(&mut linker)?;
    Ok(linker)
}

/// Checks a component against the slot's world: the export it must offer, the WIT version,
/// and that every host capability it imports was granted.
pub fn check_contract(engine: &wasmtime::Engine, component: &Component, world: WorldKind, grants: &[Grant]) -> Result<(), String> {
    let ty = component.component_type();
    let exports: Vec<String> = ty.exports(engine).map(|(name, _)| name.to_string()).collect();
    let ours: Vec<(String, String)> = exports.iter().filter_map(|e| parse_parley(e)).collect();
    let wanted = format!("{}/{}@{}", bindings::PACKAGE, world.export(), bindings::VERSION);
    if !exports.contains(&wanted) {
        let problem = match ours.iter().find(|(name, _)| name == world.export()) {
            Some((_, version)) => format!(
                "speaks {}@{version}, but this host supports {}@{}",
                bindings::PACKAGE,
                bindings::PACKAGE,
                bindings::VERSION
            ),
            None => match ours.iter().find_map(|(name, _)| WorldKind::from_export(name)) {
                Some(other) => format!(
                    "is a {} plugin, but this slot needs a {} plugin (exporting {wanted})",
                    other.world_name(),
                    world.world_name()
                ),
                None => format!(
                    "is not a Parley {} plugin: it does not export {wanted} (it exports: {})",
                    world.world_name(),
                    if exports.is_empty() { "nothing".to_string() } else { exports.join(", ") }
                ),
            },
        };
        return Err(problem);
    }
    for (name, _) in ty.imports(engine) {
        let needed = match grant_for_import(name) {
            None | Some(Ok(None)) => continue,
            Some(Ok(Some(grant))) => grant,
            Some(Err(problem)) => return Err(problem),
        };
        if !grants.contains(&needed) {
            return Err(format!(
                "imports {name}, but the deployment does not grant it (add \"{}\" to this slot's grants)",
                needed.name()
            ));
        }
    }
    Ok(())
}

/// Which grant a Parley import needs: None for a non-Parley import, Ok(None) for the shared
/// types, an error for a version or interface this host does not offer.
fn grant_for_import(name: &str) -> Option<Result<Option<Grant>, String>> {
    let (interface, version) = parse_parley(name)?;
    if version != bindings::VERSION {
        return Some(Err(format!("imports {name}, but this host offers {}@{}", bindings::PACKAGE, bindings::VERSION)));
    }
    Some(match interface.as_str() {
        "sql" => Ok(Some(Grant::Sql)),
        "cql" => Ok(Some(Grant::Cql)),
        "log" => Ok(Some(Grant::Log)),
        "clock" => Ok(Some(Grant::Clock)),
        "http" => Ok(Some(Grant::Http)),
        "types" => Ok(None),
        other => Err(format!("imports {name}, which this host does not offer (interface {other:?})")),
    })
}

/// Tells a component from a core module or a file that is not WebAssembly at all.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    match bytes {
        [0, b'a', b's', b'm', _, _, 0, 0, ..] => {
            Err("is a core WebAssembly module, not a component (build it for wasm32-wasip2 or wrap it with `wasm-tools component new`)".into())
        }
        [0, b'a', b's', b'm', ..] => Ok(()),
        _ => Err("is not a WebAssembly component (no \\0asm header)".into()),
    }
}

/// "parley:plugin/store@0.1.0" -> ("store", "0.1.0")
fn parse_parley(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix(bindings::PACKAGE)?.strip_prefix('/')?;
    let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
    Some((interface.to_string(), version.to_string()))
}

/// What the host needs of each world's generated bindings.
pub trait World: Sized + Send + 'static {
    const KIND: WorldKind;
    /// What the startup line says when `start` returns an error.
    const REFUSAL: &str;
    fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()>;
    fn instantiate(
        store: &mut Store<PluginState>,
        component: &Component,
        linker: &Linker<PluginState>,
    ) -> impl Future<Output = wasmtime::Result<Self>> + Send;
    /// Hands the plugin its settings (`init` / `configure`). A `&Vec`, as the generated
    /// bindings take it.
    #[allow(clippy::ptr_arg)]
    fn start(&self, store: &mut Store<PluginState>, settings: &Vec<(String, String)>) -> impl Future<Output = wasmtime::Result<Result<(), String>>> + Send;
}

impl World for TranscriptStore {
    const KIND: WorldKind = WorldKind::Store;
    /// `init` checks the database as well as the settings.
    const REFUSAL: &str = "could not start";
    fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
        TranscriptStore::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
    }
    async fn instantiate(store: &mut Store<PluginState>, component: &Component, linker: &Linker<PluginState>) -> wasmtime::Result<Self> {
        TranscriptStore::instantiate_async(store, component, linker).await
    }
    async fn start(&self, store: &mut Store<PluginState>, settings: &Vec<(String, String)>) -> wasmtime::Result<Result<(), String>> {
        let r = self.parley_plugin_store().call_init(store, settings).await?;
        Ok(r.map_err(|e| slots::store_error_message(&e)))
    }
}

impl World for SaveErrorPolicy {
    const KIND: WorldKind = WorldKind::Policy;
    const REFUSAL: &str = "refused its settings";
    fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
        SaveErrorPolicy::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
    }
    async fn instantiate(store: &mut Store<PluginState>, component: &Component, linker: &Linker<PluginState>) -> wasmtime::Result<Self> {
        SaveErrorPolicy::instantiate_async(store, component, linker).await
    }
    async fn start(&self, store: &mut Store<PluginState>, settings: &Vec<(String, String)>) -> wasmtime::Result<Result<(), String>> {
        self.parley_plugin_policy().call_configure(store, settings).await
    }
}

impl World for NoticeHandler {
    const KIND: WorldKind = WorldKind::Notices;
    const REFUSAL: &str = "refused its settings";
    fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
        NoticeHandler::add_to_linker::<PluginState, HasSelf<PluginState>>(linker, |s| s)
    }
    async fn instantiate(store: &mut Store<PluginState>, component: &Component, linker: &Linker<PluginState>) -> wasmtime::Result<Self> {
        NoticeHandler::instantiate_async(store, component, linker).await
    }
    async fn start(&self, store: &mut Store<PluginState>, settings: &Vec<(String, String)>) -> wasmtime::Result<Result<(), String>> {
        self.parley_plugin_notices().call_configure(store, settings).await
    }
}

/// One sandboxed instance of a plugin. Calls run one at a time; a fault discards the instance
/// and the next call starts from a fresh one.
pub struct Instance<W: World> {
    runtime: Arc<Runtime>,
    pub plugin: Arc<Plugin>,
    database: Option<DatabaseFile>,
    live: Option<(Store<PluginState>, W)>,
}

impl<W: World> Instance<W> {
    async fn instantiate(&mut self) -> Result<(Store<PluginState>, W), PluginFault> {
        let plugin = &self.plugin;
        let sql = match (&self.database, plugin.grants.contains(&Grant::Sql)) {
            (Some(db), true) => Some(db.open().map_err(|e| PluginFault::Instantiate(format!("database: {e}")))?),
            _ => None,
        };
        let mut wasi = WasiCtxBuilder::new();
        if !plugin.grants.contains(&Grant::Random) {
            // std's HashMap asks for a random seed even in plugins that need no entropy: give
            // ungranted plugins a fixed stream instead of the host's.
            wasi.secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a; 32]));
            wasi.insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5; 32]));
            wasi.insecure_random_seed(0);
        }
        if !plugin.grants.contains(&Grant::Clock) {
            wasi.wall_clock(StoppedClock);
            wasi.monotonic_clock(StoppedClock);
        }
        let state = PluginState {
            label: format!("{}:{}", plugin.slot.name(), plugin.file).into(),
            wasi: wasi.build(),
            table: Default::default(),
            memory: MemoryLimit { max_bytes: (plugin.memory_mb as usize) << 20, refused: false },
            sql,
            cql: if plugin.grants.contains(&Grant::Cql) { self.runtime.cql.get().cloned() } else { None },
            http_hosts: if plugin.grants.contains(&Grant::Http) { Some(plugin.http_hosts.clone()) } else { None },
            started: Instant::now(),
        };
        let mut store = Store::new(self.runtime.engine(), state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let bindings = W::instantiate(&mut store, &plugin.component, self.runtime.linker(W::KIND))
            .await
            .map_err(|e| self.fault(&store, e))?;
        store.set_epoch_deadline(self.deadline_ticks());
        match bindings.start(&mut store, &plugin.settings).await {
            Ok(Ok(())) => Ok((store, bindings)),
            Ok(Err(problem)) => Err(PluginFault::Instantiate(format!("{}: {problem}", W::REFUSAL))),
            Err(e) => Err(self.fault(&store, e)),
        }
    }

    fn deadline_ticks(&self) -> u64 {
        (self.plugin.deadline_ms / EPOCH_TICK.as_millis() as u64).max(1)
    }

    fn fault(&self, store: &Store<PluginState>, e: wasmtime::Error) -> PluginFault {
        if store.data().memory.refused {
            return PluginFault::MemoryLimit(self.plugin.memory_mb);
        }
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => PluginFault::Deadline(self.plugin.deadline_ms),
            _ => PluginFault::Trap(format!("{e:#}")),
        }
    }

    /// Instantiates now, so a deployment with a broken plugin fails at startup, not mid-chat.
    /// Another instance of the same plugin with the same grants, instantiated on first use.
    pub fn sibling(&self) -> Self {
        Self { runtime: self.runtime.clone(), plugin: self.plugin.clone(), database: self.database.clone(), live: None }
    }

    /// Time this instance's SQL import spent in write transactions (zero before the first call
    /// and without the sql grant).
    pub fn sql_time(&self) -> crate::storage::sqlite::SqlTime {
        self.live.as_ref().and_then(|(store, _)| store.data().sql.as_ref()).map(|db| db.spent).unwrap_or_default()
    }

    pub async fn warm_up(&mut self) -> Result<(), PluginFault> {
        if self.live.is_none() {
            self.live = Some(self.instantiate().await?);
        }
        Ok(())
    }

    /// Runs one export call under the deadline and memory limit.
    pub async fn call<R>(&mut self, f: impl AsyncFnOnce(&W, &mut Store<PluginState>) -> wasmtime::Result<R>) -> Result<R, PluginFault> {
        self.warm_up().await?;
        let (store, bindings) = self.live.as_mut().expect("instantiated above");
        store.set_epoch_deadline(self.plugin.deadline_ms / EPOCH_TICK.as_millis() as u64 + 1);
        let started = std::time::Instant::now();
        let result = f(bindings, store).await;
        let slot = Slot::ALL.iter().position(|s| *s == self.plugin.slot).expect("a known slot");
        self.runtime.kpi.plugin_calls[slot].record(started.elapsed());
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let (store, _) = self.live.take().expect("instantiated above");
                let fault = self.fault(&store, e);
                tracing::error!(event_id = "plugin.fault", plugin = %store.data().label, cause = %fault, "plugin call failed; the instance will be re-created");
                Err(fault)
            }
        }
    }
}

/// The clock ungranted plugins see: always zero.
struct StoppedClock;

impl wasmtime_wasi::HostWallClock for StoppedClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for StoppedClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
