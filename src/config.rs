//! The deployment: the TOML file (all optional) merged with command-line flags and the
//! development token variables. Every reference-guide option has its field here.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("deployment file {path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deployment {
    pub server: ServerSection,
    pub transcript: TranscriptSection,
    pub restore: RestoreSection,
    pub cluster: ClusterSection,
    /// Present: the `intermediate` slot (and with it cluster coordination) moves to Cassandra
    /// or ScyllaDB, as in the reference guide's "Deploying Chat Server with Cassandra".
    pub cassandra: Option<CassandraSection>,
    pub limits: LimitsSection,
    pub auth: AuthSection,
    pub sqlite: SqliteSection,
    pub plugins: PluginsSection,
    /// Directory the deployment file lives in; relative plugin paths resolve against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The deployment file itself, if there is one (plugin reload re-reads it).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub instance_id: Option<String>,
    /// On SIGTERM: how long a draining instance waits for its chats to end before it hands
    /// the rest over to the other instances.
    pub drain_deadline_ms: u64,
    /// TLS on the listener: the certificate chain (PEM, leaf first) and its private key. Set
    /// both or neither. A cluster is all TLS or all plain: requests passed on to another
    /// instance use TLS too.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that signed the instances' certificates, checked when passing requests on
    /// to another instance. Required with TLS: an instance trusts only its cluster's CA.
    pub tls_peer_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranscriptSection {
    /// transcript-auto-save: 0 no intermediate saves, 1 save before every ack, 2 also notify.
    pub auto_save: u8,
    /// Most chat deltas one store call carries (group commit).
    pub max_batch: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestoreMode {
    None,
    Simple,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestoreSection {
    /// session-restoration-mode.
    pub mode: RestoreMode,
    /// session-restore-extend-by: who may trigger a restore by reaching the chat.
    pub allowed_initiators: Vec<Initiator>,
    /// session-restore-do-purge: the old owner drops a chat as soon as it learns another
    /// instance restored it. Off, it keeps its stale copy read-only until the linger time.
    pub purge_old_owner: bool,
}

/// Who reaches a chat: its customer, one of its agents, or the workflow (admin token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initiator {
    Customer,
    Agent,
    Workflow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// How long an instance's lease lasts after each renewal. A dead instance's chats can be
    /// restored once it runs out, so this bounds failover time; shorter means more renewals.
    pub lease_ms: u64,
    /// How often the lease is renewed (one store write each time).
    pub renew_ms: u64,
    /// The address other instances reach this one on; default: the listen address.
    pub advertise: Option<String>,
    /// The secret instances present to each other when passing requests on. Default: a key
    /// generated once in the data directory, shared by the instances on one host.
    pub secret: Option<String>,
}

/// The one CQL session the `cql` capability runs on, and what `parley storage init` creates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CassandraSection {
    /// host:port of nodes to start from; the driver discovers the rest of the cluster.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// Consistency of reads and writes: `quorum` / `local_quorum` for production (RF 3),
    /// `local_one` / `one` acceptable for a one-node development setup.
    pub consistency: Consistency,
    /// Consistency of the lightweight transactions (claims, leases): `serial` or `local_serial`.
    pub serial_consistency: SerialConsistency,
    pub username: Option<String>,
    /// The password itself, or (better) the environment variable holding it.
    pub password: Option<String>,
    pub password_env: Option<String>,
    /// TLS to the nodes: PEM file of the CA that signed the nodes' certificates.
    pub tls_ca_file: Option<PathBuf>,
    /// With TLS: check that the node's certificate names the address it was reached on (an
    /// IP subject alternative name); off only for certificates issued without one.
    pub tls_verify_address: bool,
    /// Client timeout of one request (the driver retries per its policy within it).
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Reconnect policy: idle connections are probed this often, so a dead node is noticed
    /// and its pool refilled in the background (with the driver's backoff) once it is back.
    pub keepalive_ms: u64,
    /// How often the driver refreshes topology and schema (nodes joining or leaving).
    pub metadata_refresh_ms: u64,
    /// `parley storage init`: the keyspace's replication, e.g. `SimpleStrategy` with
    /// `replication_factor = 1` for development, `NetworkTopologyStrategy` with `dc1 = 3`.
    pub replication_strategy: String,
    pub replication: BTreeMap<String, u32>,
    /// `parley storage init`: rows of open chats expire after this long without a write
    /// (default_time_to_live), and tombstones are kept this long (gc_grace_seconds).
    pub ttl_seconds: u64,
    pub gc_grace_seconds: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    One,
    LocalOne,
    Quorum,
    LocalQuorum,
    EachQuorum,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialConsistency {
    Serial,
    LocalSerial,
}

impl Default for CassandraSection {
    fn default() -> Self {
        Self {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "parley".into(),
            consistency: Consistency::LocalQuorum,
            serial_consistency: SerialConsistency::LocalSerial,
            username: None,
            password: None,
            password_env: None,
            tls_ca_file: None,
            tls_verify_address: true,
            request_timeout_ms: 2000,
            connect_timeout_ms: 2000,
            keepalive_ms: 2000,
            metadata_refresh_ms: 60_000,
            replication_strategy: "SimpleStrategy".into(),
            replication: BTreeMap::from([("replication_factor".to_string(), 1)]),
            ttl_seconds: 7 * 24 * 3600,
            gc_grace_seconds: 3 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_message_chars: usize,
    pub max_body_bytes: usize,
    /// A client must send a request's headers within this, and its body within
    /// `body_read_timeout_ms`: slow or stalled clients cannot hold connections and tasks.
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    /// Open client connections; beyond it a new connection gets 503 `too_many_connections`
    /// and is closed, so descriptors and memory stay bounded. 0: no limit.
    pub max_connections: usize,
    pub max_nickname_chars: usize,
    /// How long a closed chat stays in memory for late readers before only its final
    /// transcript remains.
    pub closed_chat_linger_ms: u64,
    /// The reference's limit-for-sessions: open chats this instance takes; beyond it new chats
    /// get 503 `too_many_chats` (clients try another instance). Restores are always taken:
    /// failover must not fail on a full instance. 0: no limit.
    pub max_chats: usize,
    /// Participants (customer and agents, present or gone) one chat may have; one more gets
    /// 409 `chat_full`.
    pub max_participants: usize,
    /// Messages each participant may send per second on average, and at once above that
    /// (token bucket); over it, 429 `rate_limited` with Retry-After. 0: no limit.
    pub messages_per_second: f64,
    pub message_burst: u32,
    /// Saved events each chat keeps in memory for readers, the newest; older ones are read
    /// back from the store, so a long chat's memory stays bounded. 0: all of them. Only with
    /// `transcript.auto_save` >= 1 (otherwise memory is the only copy, and keeps everything).
    pub events_in_memory: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// SHA-256 hex digests of agent tokens (`parley token hash` prints one).
    pub agent_token_hashes: Vec<String>,
    pub admin_token_hashes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteSection {
    /// FULL survives power loss; NORMAL (WAL) survives a process crash only.
    pub synchronous: Synchronous,
    pub busy_timeout_ms: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsSection {
    pub intermediate: Option<PluginSection>,
    #[serde(rename = "final")]
    pub final_: Option<PluginSection>,
    #[serde(rename = "save-error-policy")]
    pub save_error_policy: Option<PluginSection>,
    #[serde(rename = "notice-handler")]
    pub notice_handler: Option<PluginSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// A component file, or `builtin:NAME` for a plugin compiled into the host.
    pub file: String,
    /// Host capabilities this plugin may import: "sql", "log", "clock", "random".
    #[serde(default)]
    pub grants: Option<Vec<String>>,
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// With the "http" grant: the host:port pairs the plugin may post to (none by default).
    #[serde(default)]
    pub http_hosts: Vec<String>,
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
}

fn default_memory_mb() -> u64 {
    64
}
fn default_deadline_ms() -> u64 {
    2000
}

impl Default for ServerSection {
    fn default() -> Self {
        Self { listen: "127.0.0.1:8080".parse().unwrap(), data: PathBuf::from("parley-data"), instance_id: None, drain_deadline_ms: 30_000, tls_cert_file: None, tls_key_file: None, tls_peer_ca_file: None }
    }
}
impl Default for TranscriptSection {
    fn default() -> Self {
        Self { auto_save: 1, max_batch: 4096 }
    }
}
impl Default for RestoreSection {
    fn default() -> Self {
        Self { mode: RestoreMode::Simple, allowed_initiators: vec![Initiator::Customer, Initiator::Agent, Initiator::Workflow], purge_old_owner: true }
    }
}
impl Default for ClusterSection {
    fn default() -> Self {
        Self { lease_ms: 1500, renew_ms: 300, advertise: None, secret: None }
    }
}
impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_message_chars: 4096,
            max_body_bytes: 64 * 1024,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            max_connections: 10_000,
            max_nickname_chars: 64,
            closed_chat_linger_ms: 600_000,
            max_chats: 10_000,
            max_participants: 8,
            messages_per_second: 50.0,
            message_burst: 200,
            events_in_memory: 256,
        }
    }
}
impl Default for SqliteSection {
    fn default() -> Self {
        Self { synchronous: Synchronous::Full, busy_timeout_ms: 5000 }
    }
}
impl Default for Deployment {
    fn default() -> Self {
        Self {
            server: ServerSection::default(),
            transcript: TranscriptSection::default(),
            restore: RestoreSection::default(),
            cluster: ClusterSection::default(),
            cassandra: None,
            limits: LimitsSection::default(),
            auth: AuthSection::default(),
            sqlite: SqliteSection::default(),
            plugins: PluginsSection::default(),
            base_dir: PathBuf::from("."),
            source: None,
        }
    }
}

impl Deployment {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let problem = |p: String| ConfigError::File { path: path.to_path_buf(), problem: p };
        let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
        let mut d: Deployment = toml::from_str(&text).map_err(|e| problem(e.message().to_string()))?;
        d.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        d.source = Some(path.to_path_buf());
        d.validate()?;
        Ok(d)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.transcript.auto_save > 2 {
            return Err(ConfigError::Invalid(format!("transcript.auto_save must be 0, 1 or 2, not {}", self.transcript.auto_save)));
        }
        if self.transcript.max_batch == 0 {
            return Err(ConfigError::Invalid("transcript.max_batch must be at least 1".into()));
        }
        let c = &self.cluster;
        if c.renew_ms == 0 || c.lease_ms < 3 * c.renew_ms {
            return Err(ConfigError::Invalid(format!(
                "cluster.lease_ms ({}) must be at least three times cluster.renew_ms ({}), so one slow renewal does not lose the lease",
                c.lease_ms, c.renew_ms
            )));
        }
        let l = &self.limits;
        if l.messages_per_second < 0.0 || (l.messages_per_second > 0.0 && l.message_burst == 0) || l.max_participants < 2 {
            return Err(ConfigError::Invalid(
                "limits: messages_per_second must be >= 0 with message_burst >= 1, and max_participants >= 2 (a customer and an agent)".into(),
            ));
        }
        if let Some(c) = &self.cassandra {
            if c.contact_points.is_empty() {
                return Err(ConfigError::Invalid("cassandra.contact_points must name at least one node (host:port)".into()));
            }
            let plain = |s: &str| !s.is_empty() && s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !plain(&c.keyspace) || !plain(&c.replication_strategy) || !c.replication.keys().all(|k| plain(k)) {
                return Err(ConfigError::Invalid(format!(
                    "cassandra: keyspace {:?}, replication_strategy and replication keys may only use letters, digits and _",
                    c.keyspace
                )));
            }
        }
        for hash in self.auth.agent_token_hashes.iter().chain(&self.auth.admin_token_hashes) {
            if hash.len() != 64 || hex::decode(hash).is_err() {
                return Err(ConfigError::Invalid(format!("auth: {hash:?} is not a SHA-256 hex digest")));
            }
        }
        Ok(())
    }
}
