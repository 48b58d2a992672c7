//! The command line: one file per command, each owning its flags and calling the library;
//! [`flags`] holds the model, device and precision flags they share. Flags become ready
//! objects (device, dtype, loaded model) once, here at the edge.

mod api;
mod bench;
mod compress;
mod crosscheck;
mod demo;
mod docs;
mod eval;
pub mod flags;
mod passkey;
mod produce;
mod query;
mod reindex;
mod reread;
mod serve;
mod store;
mod train;

use clap::{Parser, Subcommand};

/// Streaming sentence-anchored gist compression of long documents.
#[derive(Debug, Parser)]
#[command(name = "giststream", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compress text files into gist states and report, per document, tokens, sentences,
    /// gist tokens, compression ratio R_c, KV bytes (full cache vs gist state) and time.
    Compress(compress::CompressArgs),
    /// Measure tokens/s and peak memory of the incremental (1 and N documents), parallel
    /// and full-attention paths on a random model of the paper-comparison shape (hidden
    /// 256, 4 layers, 4/2 heads, vocab 4096, N_g 4, sentences of ~27 tokens).
    Bench(bench::BenchArgs),
    /// Train a byte-level BPE tokenizer on a folder of text, with BOS/EOS and gist tokens
    /// as special tokens.
    TrainTokenizer(train::TrainTokenizerArgs),
    /// Train a gist model (or a full-attention baseline) and write an HF-format directory.
    Train(Box<train::TrainArgs>),
    /// Perplexity on long documents: gist models on the incremental path (what users
    /// get), baselines with full attention; R_c, stored bytes per token, and a long-range
    /// check (second halves scored after their compressed first half vs alone).
    Eval(eval::EvalArgs),
    /// Questions over documents (JSON lines from scripts/make-qa.py): each document stored
    /// as gists, its question answered greedily from the state (or, with --reread, from the
    /// whole text); prints each answer, whether it holds the key, and the accuracy.
    EvalQa(eval::EvalQaArgs),
    /// Passkey retrieval: a five-digit key at a random depth in filler text, asked for
    /// after the document (in a new paragraph, or with --chat through the chat template);
    /// gist models answer from the gist state, baselines with full attention. Prints each
    /// trial and the accuracy per length.
    Passkey(passkey::PasskeyArgs),
    /// Ask a stored document a question: resumes from its gist state (not its text) and
    /// generates the answer token by token; `--score TEXT` gives the log-likelihood of a
    /// continuation instead.
    Query(query::QueryArgs),
    /// The reference answer: read a text file whole with full attention (every token kept,
    /// up to the model's trained positions) and answer a question, to set beside what
    /// `query` answers from the same text's stored gist state.
    Reread(reread::RereadArgs),
    /// List the documents of a store.
    Docs(docs::DocsArgs),
    /// Show one stored document's metadata (JSON), checking its state record.
    Inspect(docs::InspectArgs),
    /// A damaged store: `verify` names every damaged document, `salvage` copies the intact
    /// ones into a new store.
    Store(store::StoreArgs),
    /// Serve a store over the local HTTP API without ingesting (a query node): `query`,
    /// `docs` and `inspect` on the same store go through it while it runs.
    Api(api::ApiArgs),
    /// Consume document messages from Kafka into the store, as a pipeline file says
    /// (broker, topics, group, model, store, batching); serves the local HTTP API too.
    /// With no brokers configured it starts the embedded broker and prints its address.
    Serve(serve::ServeArgs),
    /// Send files, folders of .txt files, or JSON lines from stdin to Kafka as document
    /// messages (large texts split into ordered parts).
    Produce(produce::ProduceArgs),
    /// Rebuild a store from a pipeline's state topic, without running the model.
    Restore(serve::RestoreArgs),
    /// Re-index stored documents with a new model or precision: recompress from the stored
    /// text, switch each document atomically, drop the old generation at the end.
    /// Resumable (a rerun skips finished documents); runs inside `serve` when one holds
    /// the store.
    Reindex(reindex::ReindexArgs),
    /// End-to-end tokens/s through Kafka (produce to stored and committed) against the
    /// bare incremental forward on the same documents, per batch size, in one run.
    BenchIngest(bench::BenchIngestArgs),
    /// Re-index throughput against the bare incremental forward on the same documents.
    BenchReindex(bench::BenchReindexArgs),
    /// The whole path on the embedded defaults: bundled texts produced to the embedded
    /// broker, ingested by the project's model into a temporary store, then a stored state
    /// resumed (a continuation, and the perplexity of a held-back passage).
    Demo(demo::DemoArgs),
    /// Check a device and precision against the CPU in f32: the bundled texts through the
    /// incremental path (batched), the parallel path and the training ops, logit by logit,
    /// and the gist states, against the precision's stated tolerance. Prints a JSON report;
    /// exits non-zero beyond tolerance.
    Crosscheck(crosscheck::CrosscheckArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compress(args) => compress::run(args),
        Command::Bench(args) => bench::run(args),
        Command::TrainTokenizer(args) => train::run_tokenizer(args),
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::EvalQa(args) => eval::run_qa(args),
        Command::Passkey(args) => passkey::run(args),
        Command::Query(args) => query::run(args),
        Command::Reread(args) => reread::run(args),
        Command::Docs(args) => docs::run_docs(args),
        Command::Inspect(args) => docs::run_inspect(args),
        Command::Store(args) => store::run(args),
        Command::Api(args) => api::run(args),
        Command::Serve(args) => serve::run_serve(args),
        Command::Produce(args) => produce::run(args),
        Command::Restore(args) => serve::run_restore(args),
        Command::Reindex(args) => reindex::run(args),
        Command::BenchIngest(args) => bench::run_ingest(args),
        Command::BenchReindex(args) => bench::run_reindex(args),
        Command::Demo(args) => demo::run(args),
        Command::Crosscheck(args) => crosscheck::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_flags_parse() {
        let cli = Cli::try_parse_from([
            "giststream",
            "compress",
            "--model",
            "m",
            "a.txt",
            "b.txt",
            "--json",
        ])
        .unwrap();
        let Command::Compress(a) = cli.command else {
            panic!("compress")
        };
        assert_eq!(a.files.len(), 2);
        assert!(a.json);
        assert_eq!(a.batch, 8);
        assert!(Cli::try_parse_from(["giststream", "compress", "--model", "m"]).is_err());
    }
}
