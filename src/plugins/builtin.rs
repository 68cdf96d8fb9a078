//! The default plugins, compiled from plugins/ by build.rs and embedded in the binary so the
//! default deployment needs no files at all.

use super::{Grant, Slot, WorldKind};
use crate::config::PluginSection;

macro_rules! plugin_wasm {
    ($file:literal) => {
        include_bytes!(concat!(env!("PARLEY_PLUGIN_DIR"), "/", $file))
    };
}

pub const NAMES: [&str; 3] = ["sqlite-store", "default-policy", "default-notices"];

pub fn bytes(name: &str) -> Option<&'static [u8]> {
    Some(match name {
        "sqlite-store" => plugin_wasm!("sqlite_store.wasm"),
        "default-policy" => plugin_wasm!("default_policy.wasm"),
        "default-notices" => plugin_wasm!("default_notices.wasm"),
        _ => return None,
    })
}

/// Where build.rs left the compiled first-party and test plugins (for tests and examples).
pub const PLUGIN_DIR: &str = env!("PARLEY_PLUGIN_DIR");

pub fn default_section(slot: Slot) -> PluginSection {
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
        WorldKind::Store => vec![Grant::Sql, Grant::Log, Grant::Clock],
        WorldKind::Policy => vec![Grant::Log, Grant::Clock],
        // The notice handler may post webhooks, but only to the hosts a deployment lists.
        WorldKind::Notices => vec![Grant::Log, Grant::Clock, Grant::Http],
    }
}
