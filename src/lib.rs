//! giststream: streaming sentence-anchored gist compression of long documents.
//!
//! Data flows through the modules in this order:
//!
//! - [`segment`] splits text, arriving in chunks, into sentences (the rule belongs to the
//!   model);
//! - [`tokenize`] turns each sentence into model segments, never letting a token cross a
//!   boundary;
//! - [`model`] loads an HF Llama directory plus `gist.json` and runs our own forward
//!   ([`model::llama`]), with the sentence-attention mask;
//! - [`state`] holds a document's compressed state ([`state::GistState`]: per-layer K/V of
//!   the gist tokens) and advances it sentence by sentence, batched across documents;
//!   [`slots`] does the same with the batch's caches in one tensor (the GPU default);
//! - [`store`] turns states into versioned, checksummed records in sled;
//! - [`update`] applies documents that arrive in parts, appending to their stored states;
//! - [`ingest`] consumes document messages from Kafka into the store (`serve`, configured
//!   by a [`pipeline`]), and [`changelog`] mirrors state updates to a compacted topic;
//! - [`reindex`] rebuilds stored states with a new model or precision, switching each
//!   document atomically;
//! - [`query`] answers questions from a stored state (wrapped by the model's [`chat`]
//!   template when it has one);
//! - [`parallel`] runs whole documents at once (training, evaluation, equivalence checks);
//! - [`compress`] drives whole documents through the incremental path;
//! - [`api`] serves a store over local HTTP (with [`metrics`]) and is the CLI's client of
//!   a running process;
//! - [`bench`] measures the paths; [`crosscheck`] compares a device and precision with
//!   the CPU in f32; [`cli`] is the command line.
//!
//! [`tiny`] writes small random models for tests and benchmarks.

pub mod api;
pub mod bench;
pub mod changelog;
pub mod chat;
pub mod cli;
pub mod compress;
pub mod crosscheck;
pub mod demo;
pub mod eval;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod pipeline;
pub mod produce;
pub mod query;
pub mod reindex;
pub mod segment;
pub mod serve;
pub mod slots;
pub mod state;
pub mod store;
pub mod tiny;
pub mod tokenize;
pub mod train;
pub mod update;
