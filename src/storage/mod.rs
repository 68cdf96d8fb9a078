//! Storage capabilities the host lends to store plugins.

pub mod cassandra;
pub mod sqlite;
