//! Storage capabilities the host lends to store plugins.

pub mod sqlite;
