//! The one place host bindings for the WIT contract are generated; everything else imports
//! the worlds and types from here.

pub mod store_world {
    wasmtime::component::bindgen!({
        world: "transcript-store",
        path: "wit",
        exports: { default: async },
        // CQL calls wait on the network: async, so they hold no worker thread.
        imports: {
            "parley:plugin/cql.write": async,
            "parley:plugin/cql.query": async,
        },
    });
}

pub mod policy_world {
    wasmtime::component::bindgen!({
        world: "save-error-policy",
        path: "wit",
        exports: { default: async },
        with: {
            "parley:plugin/types": super::store_world::parley::plugin::types,
            "parley:plugin/log": super::store_world::parley::plugin::log,
            "parley:plugin/clock": super::store_world::parley::plugin::clock,
        },
    });
}

pub mod notice_world {
    wasmtime::component::bindgen!({
        world: "notice-handler",
        path: "wit",
        exports: { default: async },
        with: {
            "parley:plugin/types": super::store_world::parley::plugin::types,
            "parley:plugin/log": super::store_world::parley::plugin::log,
            "parley:plugin/clock": super::store_world::parley::plugin::clock,
        },
    });
}

pub use notice_world::NoticeHandler;
pub use notice_world::exports::parley::plugin::notices;
pub use policy_world::SaveErrorPolicy;
pub use policy_world::exports::parley::plugin::policy;
pub use store_world::TranscriptStore;
pub use store_world::exports::parley::plugin::store;
pub use notice_world::parley::plugin::http;
pub use store_world::parley::plugin::{clock, cql, log, sql, types};

/// The WIT package version this host speaks.
pub const PACKAGE: &str = "parley:plugin";
pub const VERSION: &str = "0.1.0";
