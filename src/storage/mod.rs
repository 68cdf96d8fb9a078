//! Storage capabilities the host lends to store plugins.

pub mod cassandra;
mod page_cache;
pub mod sqlite;
