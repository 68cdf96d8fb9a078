//! Parley: a high-availability customer-service chat server whose storage, save-error policy
//! and notices are WebAssembly components loaded per deployment.

pub mod auth;
pub mod bench;
pub mod chat;
pub mod client;
pub mod cluster;
pub mod config;
pub mod instance;
pub mod kpi;
pub mod local;
pub mod plugins;
pub mod server;
pub mod storage;
