//! One Parley instance: loads and checks the deployment's plugins (refusing to start with one
//! line naming slot, file and problem), starts a worker per slot, and binds the listener.

use crate::auth::{self, StaffTokens};
use crate::cluster::{self, Cluster, Lease};
use crate::chat::{Chats, Deps};
use crate::config::Deployment;
use crate::kpi::Kpi;
use crate::plugins::bindings::{NoticeHandler, SaveErrorPolicy, TranscriptStore};
use crate::plugins::slots::{NoticeSlot, PolicySlot, StoreSlot};
use crate::plugins::{Instance, LoadError, Runtime, Slot, World};
use crate::server::App;
use crate::storage::sqlite::DatabaseFile;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

pub struct Started {
    pub app: Arc<App>,
    pub listener: tokio::net::TcpListener,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Plugin(#[from] LoadError),
    #[error("{0}")]
    Other(String),
}

pub async fn start(deployment: Deployment) -> Result<Started, StartError> {
    let data = &deployment.server.data;
    std::fs::create_dir_all(data).map_err(|e| StartError::Other(format!("data directory {}: {e}", data.display())))?;
    let instance_id: Arc<str> = deployment.server.instance_id.clone().unwrap_or_else(|| format!("i-{}", &auth::new_id()[..8])).into();
    let kpi = Arc::new(Kpi::default());
    let runtime = Runtime::new(data.join("plugin-cache"), kpi.clone()).map_err(|e| StartError::Other(format!("plugin runtime: {e:#}")))?;
    let mut database = DatabaseFile::new(data.join("parley.db"), deployment.sqlite.synchronous, Duration::from_millis(deployment.sqlite.busy_timeout_ms));
    database.record_commits(kpi.sqlite_commits.clone());
    let checkpoints = database.checkpoint_apart();

    if let Some(c) = &deployment.cassandra {
        let session = crate::storage::cassandra::Cassandra::connect(c).await.map_err(StartError::Other)?;
        runtime.connect_cql(Arc::new(session));
    }
    let (intermediate, final_store, policy, notices) = load_slots(&runtime, &deployment, &database).await?;
    let lease = Arc::new(Lease::new());
    let lease_slot = StoreSlot::spawn_for_leases(intermediate.sibling(), kpi.clone());
    let slots = (
        StoreSlot::spawn(intermediate, deployment.transcript.max_batch, kpi.clone(), Some(lease.clone())),
        StoreSlot::spawn(final_store, 64, kpi.clone(), None),
        PolicySlot::spawn(policy),
        NoticeSlot::spawn(notices),
    );
    let plugins = Plugins {
        runtime: runtime.clone(),
        database: database.clone(),
        source: deployment.source.clone(),
        slots: slots.clone(),
        lease_slot: lease_slot.clone(),
        reloading: tokio::sync::Mutex::new(()),
    };

    let mut staff = StaffTokens::default();
    let decode = |h: &String| {
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out).map(|_| out)
    };
    staff.agents = deployment.auth.agent_token_hashes.iter().filter_map(|h| decode(h).ok()).collect();
    staff.admins = deployment.auth.admin_token_hashes.iter().filter_map(|h| decode(h).ok()).collect();
    if let Ok(t) = std::env::var("PARLEY_AGENT_TOKEN") {
        staff.agents.push(auth::hash(&t));
    }
    if let Ok(t) = std::env::var("PARLEY_ADMIN_TOKEN") {
        staff.admins.push(auth::hash(&t));
    }

    let tls = crate::server::Tls::from_settings(&deployment.server).map_err(StartError::Other)?;
    let listener = tokio::net::TcpListener::bind(deployment.server.listen)
        .await
        .map_err(|e| StartError::Other(format!("cannot listen on {}: {e}", deployment.server.listen)))?;
    let address = match &deployment.cluster.advertise {
        Some(a) => a.clone(),
        None => listener.local_addr().map_err(|e| StartError::Other(format!("listener address: {e}")))?.to_string(),
    };
    let secret = match &deployment.cluster.secret {
        Some(s) => s.clone(),
        None => cluster::secret_of(data).map_err(|e| StartError::Other(format!("cluster key in {}: {e}", data.display())))?,
    };
    let cluster = Cluster::join(instance_id.clone(), address, &deployment.cluster, secret, (lease_slot, lease), kpi.clone())
        .await
        .map_err(StartError::Other)?;
    let deps = Deps::new(&deployment, cluster.clone(), slots, kpi.clone());
    let app = Arc::new(App {
        instance_id,
        cluster: cluster.clone(),
        peers: crate::server::Peers::default(),
        chats: Chats::new(deps),
        staff,
        limits: deployment.limits.clone(),
        kpi,
        draining: AtomicBool::new(false),
        plugins,
        tls,
    });
    let weak = Arc::downgrade(&app);
    cluster.keep_renewing(move || {
        if let Some(app) = weak.upgrade() {
            let dropped = app.chats.abandon_all();
            tokio::spawn(async move { app.chats.take_back(dropped).await });
        }
    });
    checkpoints.start(Duration::from_millis(500)).map_err(|e| StartError::Other(format!("checkpoint thread: {e}")))?;
    Ok(Started { app, listener })
}

type SlotInstances = (Instance<TranscriptStore>, Instance<TranscriptStore>, Instance<SaveErrorPolicy>, Instance<NoticeHandler>);

/// Loads, checks and instantiates the plugin of every slot (at startup and on reload).
async fn load_slots(runtime: &Arc<Runtime>, deployment: &Deployment, database: &DatabaseFile) -> Result<SlotInstances, LoadError> {
    Ok((
        ready(runtime, deployment, Slot::Intermediate, Some(database.clone())).await?,
        ready(runtime, deployment, Slot::Final, Some(database.clone())).await?,
        ready(runtime, deployment, Slot::SaveErrorPolicy, None).await?,
        ready(runtime, deployment, Slot::NoticeHandler, None).await?,
    ))
}

/// Loads a slot's plugin and instantiates it once, so bad settings stop the start, not a chat.
async fn ready<W: World>(runtime: &Arc<Runtime>, deployment: &Deployment, slot: Slot, database: Option<DatabaseFile>) -> Result<Instance<W>, LoadError> {
    let plugin = Arc::new(runtime.load_slot(deployment, slot)?);
    let file = plugin.file.clone();
    let mut instance = runtime.instance::<W>(plugin, database);
    instance.warm_up().await.map_err(|fault| LoadError { slot: slot.name(), file, problem: fault.to_string() })?;
    Ok(instance)
}

/// What plugin reload needs: the runtime, the database plugins are granted, the deployment
/// file, and the slot workers to hand new instances to.
pub struct Plugins {
    runtime: Arc<Runtime>,
    database: DatabaseFile,
    source: Option<std::path::PathBuf>,
    slots: (StoreSlot, StoreSlot, PolicySlot, NoticeSlot),
    lease_slot: StoreSlot,
    reloading: tokio::sync::Mutex<()>,
}

impl Plugins {
    /// Re-reads the deployment file and loads every slot's plugin; only when all four load,
    /// instantiate and accept their settings are they handed to the slots (each takes its new
    /// instance between two calls). Otherwise nothing changes and the problem is returned.
    pub async fn reload(&self) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().await;
        let source = self.source.as_ref().ok_or("this instance runs on the embedded defaults: there is no deployment file to reload")?;
        let deployment = Deployment::from_file(source).map_err(|e| e.to_string())?;
        let (intermediate, final_store, policy, notices) = load_slots(&self.runtime, &deployment, &self.database).await.map_err(|e| e.to_string())?;
        let (s_intermediate, s_final, s_policy, s_notices) = &self.slots;
        self.lease_slot.replace(intermediate.sibling());
        s_intermediate.replace(intermediate);
        s_final.replace(final_store);
        s_policy.replace(policy).await;
        s_notices.replace(notices);
        Ok(())
    }
}
