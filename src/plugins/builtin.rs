//! The default plugins, compiled from plugins/ by build.rs and embedded in the binary so the
//! default deployment needs no files at all.

use super::{Grant, Slot, WorldKind};
use crate::config::{CassandraSection, PluginSection};

macro_rules! plugin_wasm {
    ($file:literal) => {
        include_bytes!(concat!(env!("PARLEY_PLUGIN_DIR"), "/", $file))
    };
}

pub const NAMES: [&str; 4] = ["sqlite-store", "cassandra-store", "default-policy", "default-notices"];

pub fn bytes(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "sqlite-store" => plugin_wasm!("sqlite_store.wasm"),
        "cassandra-store" => plugin_wasm!("cassandra_store.wasm"),
        "default-policy" => plugin_wasm!("default_policy.wasm"),
        "default-notices" => plugin_wasm!("default_notices.wasm"),
        _ => return None,
    })
}

/// Where build.rs left the compiled first-party and test plugins (for tests and examples).
pub const PLUGIN_DIR: &str = env!("PARLEY_PLUGIN_DIR");

/// With a `[cassandra]` section the intermediate slot (and with it the cluster's leases and
/// claims) goes to Cassandra; the final slot stays on the embedded store.
pub fn default_section(slot: Slot, cassandra: Option<&CassandraSection>) -> PluginSection {
    if let (Some(c), Slot::Intermediate) = (cassandra, slot) {
        return PluginSection {
            file: "builtin:cassandra-store".to_string(),
            grants: None,
            memory_mb: 64,
            // A claim is up to three round trips, each bounded by the driver's request timeout.
            deadline_ms: 10_000,
            http_hosts: Vec::new(),
            settings: [("keyspace".to_string(), toml::Value::String(c.keyspace.clone()))].into(),
        };
    }
    let file = match slot.world() {
        WorldKind::Store => "builtin:sqlite-store",
        WorldKind::Policy => "builtin:default-policy",
        WorldKind::Notices => "builtin:default-notices",
    };
    PluginSection {
        file: file.to_string(),
        grants: None,
        memory_mb: 64,
        deadline_ms: 2000,
        http_hosts: Vec::new(),
        settings: Default::default(),
    }
}

/// Grants a slot gets when the deployment names none: what that world's contract imports.
pub fn default_grants(world: WorldKind) -> Vec<Grant> {
    match world {
        WorldKind::Store => vec![Grant::Sql, Grant::Cql, Grant::Log, Grant::Clock],
        WorldKind::Policy => vec![Grant::Log, Grant::Clock],
        // The notice handler may post webhooks, but only to the hosts a deployment lists.
        WorldKind::Notices => vec![Grant::Log, Grant::Clock, Grant::Http],
    }
}
