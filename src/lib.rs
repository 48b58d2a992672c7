//! giststream: streaming sentence-anchored gist compression of long documents.
//!
//! The folders follow the data; each imports only from folders listed before it
//! (`scripts/import-graph.py` checks this):
//!
//! - [`text`]: text to sentences to tokens (segmenter, tokenizer, chat templates, the
//!   document encoder and the carry that resumes it between parts);
//! - [`model`]: config, loading, our Llama forward, every attention mask and plan;
//! - [`engine`]: documents through the model (incremental per-document and slots, the
//!   whole-document path, compress);
//! - [`store`]: states, text and metadata in sled; documents that arrive in parts;
//! - [`query`]: questions and scores answered from a stored state;
//! - [`service`]: what ingestion and the HTTP API share (store, model, metrics);
//! - [`ingest`]: Kafka (pipeline file, consumer, dead letters, the state topic, produce);
//! - [`jobs`]: background jobs over a store (re-index);
//! - [`serve`]: the HTTP API, its client, and the `serve` process;
//! - [`train`]: training and evaluation;
//! - [`bench`]: measurements and dev tools (bench, crosscheck, demo);
//! - [`cli`]: one file per command; `main.rs` prints errors with their cause chain.

pub mod bench;
pub mod cli;
pub mod engine;
pub mod ingest;
pub mod jobs;
pub mod model;
pub mod query;
pub mod serve;
pub mod service;
pub mod store;
pub mod text;
pub mod train;
