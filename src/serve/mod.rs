//! The long-running process: the HTTP API over a store, and `serve` itself (ingestion
//! plus the API).

mod access;
pub mod api;
pub mod client;
pub mod run;
