//! The command line: flags as typed ([`Cli`]), turned into ready objects (device, dtype,
//! loaded model) once, at the edge, then one function per command.

use crate::compress::{compress, Document, Report};
use crate::model::{GistModel, LoadOptions};
use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

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
    Compress(CompressArgs),
    /// Measure tokens/s and peak memory of the incremental (1 and N documents), parallel
    /// and full-attention paths on a random model of the paper-comparison shape (hidden
    /// 256, 4 layers, 4/2 heads, vocab 4096, N_g 4, sentences of ~27 tokens).
    Bench(BenchArgs),
    /// Train a byte-level BPE tokenizer on a folder of text, with BOS/EOS and gist tokens
    /// as special tokens.
    TrainTokenizer(TrainTokenizerArgs),
    /// Train a gist model (or a full-attention baseline) and write an HF-format directory.
    Train(TrainArgs),
    /// Perplexity on long documents: gist models on the incremental path (what users
    /// get), baselines with full attention; R_c, stored bytes per token, and a long-range
    /// check (second halves scored after their compressed first half vs alone).
    Eval(EvalArgs),
    /// Ask a stored document a question: resumes from its gist state (not its text) and
    /// generates the answer token by token; `--score TEXT` gives the log-likelihood of a
    /// continuation instead.
    Query(QueryArgs),
    /// List the documents of a store.
    Docs(DocsArgs),
    /// Show one stored document's metadata (JSON), checking its state record.
    Inspect(InspectArgs),
    /// Serve a store over the local HTTP API without ingesting (a query node): `query`,
    /// `docs` and `inspect` on the same store go through it while it runs.
    Api(ApiArgs),
    /// Consume document messages from Kafka into the store, as a pipeline file says
    /// (broker, topics, group, model, store, batching); serves the local HTTP API too.
    /// With no brokers configured it starts the embedded broker and prints its address.
    Serve(ServeArgs),
    /// Send files, folders of .txt files, or JSON lines from stdin to Kafka as document
    /// messages (large texts split into ordered parts).
    Produce(ProduceArgs),
    /// Rebuild a store from a pipeline's state topic, without running the model.
    Restore(RestoreArgs),
    /// Re-index stored documents with a new model or precision: recompress from the stored
    /// text, switch each document atomically, drop the old generation at the end.
    /// Resumable (a rerun skips finished documents); runs inside `serve` when one holds
    /// the store.
    Reindex(ReindexArgs),
    /// End-to-end tokens/s through Kafka (produce to stored and committed) against the
    /// bare incremental forward on the same documents, per batch size, in one run.
    BenchIngest(BenchIngestArgs),
    /// Re-index throughput against the bare incremental forward on the same documents.
    BenchReindex(BenchReindexArgs),
    /// The whole path on the embedded defaults: bundled texts produced to the embedded
    /// broker, ingested by the project's model into a temporary store, then a stored state
    /// resumed (a continuation, and the perplexity of a held-back passage).
    Demo(DemoArgs),
    /// Check a device and precision against the CPU in f32: the bundled texts through the
    /// incremental path (batched), the parallel path and the training ops, logit by logit,
    /// and the gist states, against the precision's stated tolerance. Prints a JSON report;
    /// exits non-zero beyond tolerance.
    Crosscheck(CrosscheckArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Gist model directories, scored on the incremental path.
    #[arg(long = "model", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// Full-attention baseline directories, scored with plain causal attention.
    #[arg(long = "baseline", value_name = "DIR")]
    pub baselines: Vec<PathBuf>,
    /// Folder of .txt documents.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Regular tokens kept from the start of each document (whole sentences; 0: all).
    #[arg(long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// Instead of one prefix per document: cut each into consecutive windows of
    /// --max-tokens (each starting with BOS, like training sequences) and score the first
    /// this many of each (0: prefixes).
    #[arg(long, default_value_t = 0)]
    pub windows: usize,
    /// Documents advancing together on the incremental path.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// One JSON object per model instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct TrainTokenizerArgs {
    /// Folder of .txt files to learn from.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Where to write tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Gist tokens to reserve (`<end_of_sentence_0>`...); a model uses the first N_g.
    #[arg(long, default_value_t = 8)]
    pub gist_tokens: usize,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Folder of .txt training documents.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Output model directory (checkpoints go to DIR/checkpoint).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Continue the checkpoint in --out (its settings win over these flags).
    #[arg(long)]
    pub resume: bool,
    /// Start from this HF model directory instead of random weights.
    #[arg(long, value_name = "DIR", conflicts_with = "tokenizer")]
    pub from: Option<PathBuf>,
    /// tokenizer.json for a model trained from scratch (see train-tokenizer).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Gist tokens per sentence (N_g).
    #[arg(long, default_value_t = 4)]
    pub num_gists: usize,
    /// gist: sentence attention with gists; full: the plain causal baseline.
    #[arg(long, value_enum, default_value = "gist")]
    pub attention: crate::train::Attention,
    /// Recipe: `scratch` (one stage, everything trained) or `paper` (the paper's three
    /// stages: embeddings only, everything, large-batch cool-down).
    #[arg(long, default_value = "scratch", value_parser = ["scratch", "paper"])]
    pub recipe: String,
    /// Regular tokens to train on, all stages together.
    #[arg(long, default_value_t = 1_000_000)]
    pub tokens: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Sequences per optimizer step (stage 1 of the paper recipe; later stages scale it).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Sequences per forward (gradients of a step's micro-batches are summed).
    #[arg(long, default_value_t = 8)]
    pub micro_batch: usize,
    /// Regular tokens per training sequence.
    #[arg(long, default_value_t = 256)]
    pub seq_tokens: usize,
    /// Also score predictions of gist tokens.
    #[arg(long)]
    pub gist_loss: bool,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Shape of a model trained from scratch: hidden size.
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 2)]
    pub kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    pub intermediate: usize,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Stop within this many seconds: after the first steps, token budgets shrink to fit
    /// (schedules still run to their end).
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Precision of the saved weights: f32, or bf16 (half the size; loads as f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub save_dtype: String,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Document lengths in regular tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [2048, 16384, 65536])]
    pub lengths: Vec<usize>,
    /// Paths to measure (default: the four inference paths; the train-* paths time one
    /// training step and are chosen explicitly, e.g. with --lengths 1024,4096).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub paths: Vec<crate::bench::Path>,
    /// Documents in the batched incremental measurement; several sizes (8,32) measure it
    /// once each.
    #[arg(long, value_delimiter = ',', default_values_t = [8])]
    pub batch: Vec<usize>,
    /// Shape of the random model: `paper` (small, f32 weights) or `llama-3.2-1b` (1.24B
    /// weights in bf16; meant for a GPU with `--dtype bf16`).
    #[arg(long, value_enum, default_value = "paper")]
    pub shape: crate::bench::Shape,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Also write the measurements as a JSON array to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run one measurement in this process and print it as JSON (used by the parent run).
    #[arg(long, hide = true, value_enum)]
    pub one: Option<crate::bench::Path>,
    /// Incremental engine: `per-document` (attention per document) or `slots` (all
    /// documents' caches in one tensor, attention batched). Default: per-document on the
    /// CPU, slots on a GPU.
    #[arg(long, value_enum)]
    pub incremental: Option<crate::model::Incremental>,
    /// Keep the random model in DIR: written there on first use, reused after (the 1B
    /// shape takes a while to write). Default: a temporary folder per run.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
}

/// Which model to load, where, and at what precision.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// HF-format model directory: config.json, model.safetensors (or a sharded index),
    /// tokenizer.json, and gist.json for a gist checkpoint. Default: the project's own
    /// model, embedded in the binary.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16 or f16 (weights are converted on load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Gist tokens per sentence (N_g) when the checkpoint has no gist.json.
    #[arg(long, default_value_t = 4)]
    pub num_gists: usize,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        parse_device(&self.device)
    }

    pub fn dtype(&self) -> anyhow::Result<DType> {
        parse_dtype(&self.dtype)
    }

    pub fn load(&self) -> anyhow::Result<GistModel> {
        let opts = LoadOptions {
            num_gists: self.num_gists,
            ..LoadOptions::default()
        };
        let dir = match &self.model {
            Some(d) => d.clone(),
            None => crate::model::embedded::dir()?,
        };
        GistModel::load(&dir, &self.device()?, self.dtype()?, &opts)
            .with_context(|| format!("loading model {}", dir.display()))
    }
}

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let Some(rest) = s.strip_prefix("cuda") else {
                bail!("unknown device {s:?}: expected cpu, cuda or cuda:N");
            };
            let ordinal = match rest.strip_prefix(':') {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA ordinal in {s:?}"))?,
                None if rest.is_empty() => 0,
                None => bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
            };
            Device::new_cuda(ordinal).with_context(|| format!("opening {s}"))
        }
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        _ => bail!("unknown dtype {s:?}: expected f32, bf16 or f16"),
    }
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text files, one document each.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Documents compressed together, one sentence of each per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// One JSON object per document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also store each document (state, text, metadata) in this sled store; the id is the
    /// file name without its extension.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Storage precision of the states.
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: crate::store::codec::Precision,
    /// Version recorded for the stored documents.
    #[arg(long, default_value_t = 1)]
    pub doc_version: u64,
    /// With --store: send each file as parts of at most this many bytes, each appended to
    /// the stored state as it would arrive from Kafka (0: whole files).
    #[arg(long, value_name = "BYTES", default_value_t = 0, requires = "store")]
    pub part_bytes: usize,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sled store (when a process serves it, the query goes through its API and its
    /// model answers; --model is then not needed).
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Document id.
    #[arg(long, value_name = "ID")]
    pub doc: String,
    /// The question (optional with --score).
    pub question: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Score this text as the continuation (after the question, if given) instead of
    /// generating.
    #[arg(long, value_name = "TEXT")]
    pub score: Option<String>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Send the question as plain text even when the model has a chat template.
    #[arg(long)]
    pub no_chat_template: bool,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sled store to serve.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Address to listen on (port 0: any free port; the address goes to DIR/api.json).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Pipeline definition (TOML; see pipelines/local.toml).
    #[arg(long, value_name = "FILE", default_value = "pipelines/local.toml")]
    pub pipeline: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Files (one document each; the id is the file name without extension), folders
    /// (their .txt files), or `-` for JSON lines of document messages on stdin (the
    /// default with no paths).
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Pipeline whose brokers and topic to use.
    #[arg(long, value_name = "FILE", default_value = "pipelines/local.toml")]
    pub pipeline: PathBuf,
    /// Bootstrap servers (default: the pipeline's, or the embedded broker of the `serve`
    /// running on the pipeline's store).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Topic (default: the pipeline's).
    #[arg(long)]
    pub topic: Option<String>,
    /// Version of the documents sent from files.
    #[arg(long, default_value_t = 1)]
    pub doc_version: u64,
    /// Largest part of a text in one message (bytes): larger texts go as ordered parts.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    pub part_bytes: usize,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Pipeline whose brokers and state topic to read.
    #[arg(long, value_name = "FILE", default_value = "pipelines/local.toml")]
    pub pipeline: PathBuf,
    /// Store to write (default: the pipeline's); it must not be in use.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Bootstrap servers (default: the pipeline's).
    #[arg(long)]
    pub brokers: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// Pipeline whose store to re-index.
    #[arg(long, value_name = "FILE", default_value = "pipelines/local.toml")]
    pub pipeline: PathBuf,
    /// Store (default: the pipeline's).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The new model (default: the embedded model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Device for the new model: `cpu`, or `cuda`/`cuda:N` in a `cuda` build.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision of the new model: f32, bf16 (GPU) or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Which documents: conditions on id, version, fingerprint, precision, num_gists,
    /// tokens, e.g. "version>=2,id=news-*" (default: all; documents already made by the
    /// new model at the target precision are skipped either way).
    #[arg(long = "where", value_name = "EXPR", default_value = "")]
    pub filter: String,
    /// New storage precision (default: each document keeps its own).
    #[arg(long, value_enum)]
    pub precision: Option<crate::store::codec::Precision>,
    /// Keep the old generation of states after the job completes.
    #[arg(long)]
    pub keep_old: bool,
    /// Report what would change and the estimated time; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Documents compressed together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Take the new states from replaying the pipeline's document topic from its earliest
    /// offsets (into a scratch store beside the store) instead of the stored text. Offline
    /// only.
    #[arg(long)]
    pub from_kafka: bool,
}

#[derive(Debug, Args)]
pub struct BenchReindexArgs {
    #[arg(long, default_value_t = 32)]
    pub docs: usize,
    /// Tokens per document (about: byte-level text).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

#[derive(Debug, Args)]
pub struct BenchIngestArgs {
    /// Model directory (default: a random model of the benchmark shape).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Documents per measurement.
    #[arg(long, default_value_t = 32)]
    pub docs: usize,
    /// Tokens per document (about: byte-level text).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Batch sizes (messages per batch, documents per forward).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub batches: Vec<usize>,
    /// Bootstrap servers (default: the embedded broker).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Also write the measurements to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the store here instead of a temporary folder.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Model directory (default: the embedded model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DocsArgs {
    /// The sled store.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// One JSON object per document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CrosscheckArgs {
    /// The model, and the device and precision to check (e.g. `--device cuda --dtype bf16`).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Bytes of each bundled text to run (two documents, batched).
    #[arg(long, default_value_t = 4000)]
    pub bytes: usize,
    /// Also write the report to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The sled store.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Document id.
    pub id: String,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compress(args) => run_compress(args),
        Command::Bench(args) => run_bench(args),
        Command::TrainTokenizer(args) => run_train_tokenizer(args),
        Command::Train(args) => run_train(args),
        Command::Eval(args) => run_eval(args),
        Command::Query(args) => run_query(args),
        Command::Docs(args) => run_docs(args),
        Command::Inspect(args) => run_inspect(args),
        Command::Api(args) => run_api(args),
        Command::Serve(args) => crate::serve::run_serve(args),
        Command::Produce(args) => crate::produce::run(args),
        Command::Restore(args) => crate::serve::run_restore(args),
        Command::Reindex(args) => run_reindex(args),
        Command::BenchIngest(args) => run_bench_ingest(args),
        Command::BenchReindex(args) => {
            let m = crate::reindex::bench(args.docs, args.tokens, args.batch)?;
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        Command::Demo(args) => crate::demo::run(args),
        Command::Crosscheck(args) => run_crosscheck(args),
    }
}

fn run_crosscheck(args: CrosscheckArgs) -> anyhow::Result<()> {
    let checked = args.model.load()?;
    let reference = ModelArgs {
        device: "cpu".into(),
        dtype: "f32".into(),
        ..args.model.clone()
    }
    .load()?;
    let mut docs = Vec::new();
    for (name, text) in crate::demo::TEXTS {
        let mut end = args.bytes.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let segments = reference
            .segments(&text[..end])
            .with_context(|| format!("segmenting {name}"))?;
        docs.push(segments);
    }
    let report = crate::crosscheck::run(&reference, &checked, &docs)?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(f) = &args.json {
        std::fs::write(f, &json).with_context(|| format!("writing {}", f.display()))?;
    }
    for p in &report.paths {
        let mut line = format!("{:<24}", p.path);
        if let Some(l) = &p.logits {
            line += &format!(
                " max |dlogit| {:.3e} ({:.3e} of the spread), top-1 {:.4}",
                l.max_abs_diff,
                l.max_relative_diff,
                l.top1_agreement.unwrap_or(f64::NAN)
            );
        }
        if let Some(d) = p.mean_abs_nll_diff {
            line += &format!(", mean |dNLL| {d:.3e}");
        }
        if let Some(s) = &p.states {
            line += &format!(" states {:.3e} of the spread", s.max_relative_diff);
        }
        eprintln!("{line}");
    }
    if !report.pass {
        let bad: Vec<String> = report
            .paths
            .iter()
            .filter(|p| !p.exceeded.is_empty())
            .map(|p| format!("{}: {}", p.path, p.exceeded.join("; ")))
            .collect();
        bail!(
            "{} {} is beyond the {} tolerance: {}",
            report.device,
            report.dtype,
            report.dtype,
            bad.join(" | ")
        );
    }
    Ok(())
}

fn run_query(args: QueryArgs) -> anyhow::Result<()> {
    use crate::query::{answer, score, Sampling};
    if args.score.is_none() && args.question.as_deref().is_none_or(|q| q.trim().is_empty()) {
        bail!("the question is empty: give a question, or --score TEXT");
    }
    let mut out = std::io::stdout().lock();
    let json = args.json;
    if let Some(client) = crate::api::Client::discover(&args.store) {
        let req = crate::api::QueryRequest {
            doc: args.doc.clone(),
            question: args.question.clone(),
            score: args.score.clone(),
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
            chat_template: !args.no_chat_template,
        };
        let via = || {
            format!(
                "asking the process serving {} ({})",
                args.store.display(),
                client.address()
            )
        };
        if args.score.is_some() {
            let s = client.score(&req).with_context(via)?;
            return print_score(&mut out, &s, json);
        }
        let mut write_err = None;
        let a = client
            .ask(&req, |piece| {
                if !json && write_err.is_none() {
                    write_err = write!(out, "{piece}").and_then(|_| out.flush()).err();
                }
            })
            .with_context(via)?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        return print_answer_end(&mut out, &args.doc, &a, json);
    }
    let model = args.model.load()?;
    let store = crate::store::Store::open(&args.store)?;
    let (_, state) = store.load(&args.doc, &model)?;
    drop(store);
    if let Some(text) = &args.score {
        let s = score(
            &model,
            state,
            args.question.as_deref(),
            !args.no_chat_template,
            text,
        )?;
        return print_score(&mut out, &s, json);
    }
    let sampling = Sampling {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        chat_template: !args.no_chat_template,
    };
    let question = args.question.as_deref().unwrap_or_default();
    let mut write_err = None;
    let a = answer(&model, state, question, &sampling, |piece| {
        if !json && write_err.is_none() {
            write_err = write!(out, "{piece}").and_then(|_| out.flush()).err();
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    print_answer_end(&mut out, &args.doc, &a, json)
}

fn print_score(out: &mut impl Write, s: &crate::query::Score, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
    } else {
        writeln!(
            out,
            "{} tokens, log-likelihood {:.3}, perplexity {:.3}",
            s.tokens, s.logprob, s.perplexity
        )?;
    }
    Ok(())
}

/// After a streamed answer: a newline, or with --json the whole answer as one object.
fn print_answer_end(
    out: &mut impl Write,
    doc: &str,
    a: &crate::query::Answer,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({"doc": doc, "answer": a.text, "tokens": a.tokens,
            "time_to_first_token_ms": a.time_to_first_token_ms, "seconds": a.seconds});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

fn run_bench_ingest(args: BenchIngestArgs) -> anyhow::Result<()> {
    println!(
        "{:>5} {:>5} {:>8} {:>12} {:>12} {:>15} {:>9}",
        "batch", "docs", "tokens", "bare tok/s", "segment s", "pipeline tok/s", "overhead"
    );
    let all = crate::ingest::bench::run(
        args.model.as_deref(),
        args.docs,
        args.tokens,
        &args.batches,
        args.brokers.as_deref(),
        |m| {
            println!(
                "{:>5} {:>5} {:>8} {:>12.0} {:>12.3} {:>15.0} {:>8.1}%",
                m.batch,
                m.documents,
                m.tokens,
                m.bare_tokens_per_second,
                m.segment_seconds,
                m.pipeline_tokens_per_second,
                100.0 * m.overhead
            )
        },
    )?;
    if let Some(f) = &args.json {
        std::fs::write(f, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

fn run_reindex(args: ReindexArgs) -> anyhow::Result<()> {
    use crate::reindex::{Filter, JobSpec, Progress};
    let p = if args.pipeline.exists() {
        crate::pipeline::Pipeline::from_file(&args.pipeline)?
    } else {
        crate::pipeline::Pipeline::default()
    };
    let store_dir = args.store.clone().unwrap_or(p.store.path.clone());
    let spec = JobSpec {
        precision: args.precision,
        filter: Filter::parse(&args.filter)?,
        keep_old: args.keep_old,
        dry_run: args.dry_run,
        batch: args.batch,
    };
    let show = |pr: &Progress| {
        eprintln!(
            "{}: {} {}/{} documents, {}/{} tokens, {:.0} tok/s, ETA {:.0} s, {} up to date, {} skipped",
            pr.job,
            pr.state,
            pr.done_documents,
            pr.total_documents,
            pr.done_tokens,
            pr.total_tokens,
            pr.tokens_per_second,
            pr.eta_seconds,
            pr.up_to_date,
            pr.skipped.len()
        )
    };
    let finish = |pr: &Progress| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(pr)?);
        for s in &pr.skipped {
            eprintln!("giststream: skipped {s}");
        }
        Ok(())
    };
    let served = crate::api::Client::discover(&store_dir);
    if args.from_kafka && served.is_some() {
        bail!(
            "--from-kafka runs offline, and a process serves {}: stop it, or re-index from the stored text",
            store_dir.display()
        );
    }
    if let Some(client) = served {
        let model = match &args.model {
            Some(m) => Some(
                std::fs::canonicalize(m)
                    .with_context(|| format!("finding {}", m.display()))?
                    .display()
                    .to_string(),
            ),
            None => None,
        };
        let asked_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let answer = client.reindex(&crate::api::ReindexRequest { model, spec })?;
        if args.dry_run {
            let pr: Progress = serde_json::from_value(answer)?;
            return finish(&pr);
        }
        // Follow the job's progress until it is done (records of earlier runs are older).
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let jobs = client.jobs()?;
            if let Some(pr) = jobs
                .iter()
                .filter(|j| j.started_unix_ms + 1000 >= asked_ms)
                .max_by_key(|j| j.started_unix_ms)
            {
                show(pr);
                if pr.state == "done" {
                    return finish(pr);
                }
                if pr.state == "failed" {
                    bail!(
                        "the re-index job failed in the serving process: {}",
                        pr.error.as_deref().unwrap_or("no reason given")
                    );
                }
            }
        }
    }
    let model = ModelArgs {
        model: args.model.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        num_gists: 4,
    }
    .load()?;
    let store = crate::store::Store::open(&store_dir)?;
    if !args.from_kafka {
        let pr = crate::reindex::run(&store, &model, &spec, show)?;
        return finish(&pr);
    }
    anyhow::ensure!(
        !p.kafka.brokers.is_empty(),
        "--from-kafka needs the pipeline's brokers (the embedded broker keeps nothing between runs)"
    );
    let mut scratch_dir = store_dir.clone().into_os_string();
    scratch_dir.push(".replay");
    let scratch_dir = PathBuf::from(scratch_dir);
    let pr = {
        let scratch = crate::store::Store::open(&scratch_dir)?;
        let n = crate::reindex::replay(
            crate::ingest::client_config(&p, &p.kafka.brokers),
            &p.kafka.topic,
            &scratch,
            &model,
            args.batch,
            p.batch.max_message_bytes,
        )?;
        eprintln!(
            "giststream: replayed {n} messages of {} into {}",
            p.kafka.topic,
            scratch_dir.display()
        );
        crate::reindex::run_from(&store, Some(&scratch), &model, &spec, show)?
    };
    if !spec.dry_run {
        std::fs::remove_dir_all(&scratch_dir)
            .with_context(|| format!("removing {}", scratch_dir.display()))?;
    }
    finish(&pr)
}

fn run_api(args: ApiArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let store = crate::store::Store::open(&args.store)?;
    let svc = crate::api::Service::new(store, model);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::api::serve(
        svc,
        &args.store,
        &args.listen,
        None,
        shutdown_signal(),
        |addr| {
            eprintln!(
                "giststream: serving {} on http://{addr}",
                args.store.display()
            )
        },
    ))
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn run_docs(args: DocsArgs) -> anyhow::Result<()> {
    let entries: Vec<Result<crate::store::DocMeta, String>> =
        match crate::api::Client::discover(&args.store) {
            Some(client) => {
                let list = client.docs()?;
                let ok = list.documents.into_iter().map(Ok);
                ok.chain(list.damaged.into_iter().map(Err)).collect()
            }
            None => crate::store::Store::open(&args.store)?.list(),
        };
    let mut out = std::io::stdout().lock();
    let mut damaged = 0;
    for entry in entries {
        match entry {
            Ok(m) if args.json => writeln!(out, "{}", serde_json::to_string(&m)?)?,
            Ok(m) => writeln!(
                out,
                "{:<24} v{:<4} {:>8} tokens {:>6} sentences  {:?}  {}",
                m.id,
                m.version,
                m.tokens,
                m.sentences,
                m.precision,
                human_bytes(m.state_bytes)
            )?,
            Err(e) => {
                damaged += 1;
                eprintln!("giststream: {e}");
            }
        }
    }
    if damaged > 0 {
        bail!("{damaged} document record(s) are damaged (listed above)");
    }
    Ok(())
}

fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let meta = match crate::api::Client::discover(&args.store) {
        Some(client) => client.doc(&args.id)?,
        None => crate::store::Store::open(&args.store)?.check(&args.id)?,
    };
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(())
}

fn run_eval(args: EvalArgs) -> anyhow::Result<()> {
    use crate::eval::{documents, evaluate, Scoring};
    if args.models.is_empty() && args.baselines.is_empty() {
        bail!("nothing to evaluate: give --model and/or --baseline");
    }
    let device = parse_device(&args.device)?;
    let texts = crate::train::read_texts(&args.data)?;
    if texts.is_empty() {
        bail!("no .txt documents in {}", args.data.display());
    }
    let runs = args
        .models
        .iter()
        .map(|m| (m, Scoring::Gist))
        .chain(args.baselines.iter().map(|m| (m, Scoring::Full)));
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<28} {:>7} {:>4} {:>8} {:>8} {:>10} {:>10} {:>7} {:>10}",
            "model", "scoring", "N_g", "tokens", "ppl", "2nd|1st", "2nd alone", "R_c", "KV B/tok"
        )?;
    }
    for (dir, scoring) in runs {
        let model = GistModel::load(dir, &device, DType::F32, &LoadOptions::default())
            .with_context(|| format!("loading {}", dir.display()))?;
        let docs = if args.windows > 0 {
            crate::eval::windows(&model, &texts, args.max_tokens, args.windows)?
        } else {
            documents(&model, &texts, args.max_tokens)?
        };
        let r = evaluate(
            &model,
            &dir.display().to_string(),
            &docs,
            scoring,
            args.batch,
        )?;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&r)?)?;
        } else {
            writeln!(
                out,
                "{:<28} {:>7} {:>4} {:>8} {:>8.2} {:>10.2} {:>10.2} {:>7.2} {:>10.0}",
                r.model,
                format!("{:?}", r.scoring).to_lowercase(),
                r.num_gists,
                r.tokens,
                r.perplexity,
                r.second_half_with_context,
                r.second_half_alone,
                r.compression_ratio,
                r.kv_bytes_per_token
            )?;
        }
    }
    Ok(())
}

fn run_train_tokenizer(args: TrainTokenizerArgs) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no .txt files in {}", args.data.display());
    }
    let mut special = vec!["<s>".to_string(), "</s>".to_string()];
    special.extend(crate::model::config::GistConfig::reference_names(
        args.gist_tokens,
    ));
    let started = std::time::Instant::now();
    let tok = crate::tokenize::train_bpe(&files, args.vocab_size, &special, &args.out)?;
    println!(
        "trained a {}-token BPE on {} files in {:.1}s: {}",
        tok.vocab_size(),
        files.len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

fn run_train(args: TrainArgs) -> anyhow::Result<()> {
    use crate::train::{self, TrainConfig};
    let device = parse_device(&args.device)?;
    let ckpt = args.out.join("checkpoint").join("trainer.json");
    let save_dtype = parse_dtype(&args.save_dtype)?;
    let (mut trainee, cfg) = if args.resume && ckpt.exists() {
        train::resume_trainee(&args.out, &device)?
    } else {
        let cfg = {
            let mut c = match args.recipe.as_str() {
                "paper" => TrainConfig::paper(args.tokens, args.lr, args.batch),
                _ => TrainConfig::scratch(args.tokens, args.lr, args.batch),
            };
            c.seq_tokens = args.seq_tokens;
            c.micro_batch = args.micro_batch;
            c.attention = args.attention;
            c.gist_loss = args.gist_loss;
            c.checkpoint_every = args.checkpoint_every;
            c.seed = args.seed;
            c.max_seconds = args.max_seconds;
            c
        };
        let trainee = match &args.from {
            Some(dir) => train::trainee_from_dir(dir, args.num_gists, &device)?,
            None => {
                let tok = args
                    .tokenizer
                    .as_ref()
                    .context("a model trained from scratch needs --tokenizer (or --from DIR)")?;
                let spec = crate::tiny::TinySpec {
                    hidden: args.hidden,
                    layers: args.layers,
                    heads: args.heads,
                    kv_heads: args.kv_heads,
                    intermediate: args.intermediate,
                    num_gists: args.num_gists,
                    llama3_rope_scaling: false,
                    tie_embeddings: false,
                    scale: 0.02,
                    embed_scale: 0.02,
                    norm_noise: 0.0,
                    seed: args.seed,
                    ..crate::tiny::TinySpec::default()
                };
                train::trainee_from_scratch(tok, &spec, &device)?
            }
        };
        (trainee, cfg)
    };
    trainee.save_dtype = save_dtype;
    let texts = train::read_texts(&args.data)?;
    let bos = trainee
        .model
        .bos_token_id()
        .context("the model has no BOS token (bos_token_id in config.json)")?;
    let data = train::sequences(
        &texts,
        &trainee.model.tokenizer,
        &trainee.model.gist,
        bos,
        cfg.seq_tokens,
    )?;
    let total_steps: usize = (0..cfg.stages.len()).map(|i| cfg.steps(i)).sum();
    eprintln!(
        "{} sequences of up to {} tokens from {} documents; {} steps in {} stage(s)",
        data.len(),
        cfg.seq_tokens,
        texts.len(),
        total_steps,
        cfg.stages.len()
    );
    let bar = indicatif::ProgressBar::new(total_steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps, {elapsed} (eta {eta}) {msg}",
        )
        .expect("a valid template"),
    );
    let plain = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = train::run(
        &mut trainee,
        &cfg,
        &data,
        &args.out,
        args.resume,
        |line, steps| {
            let msg = format!(
                "{} loss {:.4} lr {:.2e} {:.0} tok/s",
                line.stage, line.loss, line.lr, line.tokens_per_second
            );
            // A log file or pipe gets plain lines instead of the bar.
            if plain {
                if line.step % 10 == 0 || line.step <= 3 {
                    eprintln!("step {} (stage plan {steps}): {msg}", line.step);
                }
            } else {
                bar.set_position(line.step as u64);
                bar.set_message(msg);
            }
        },
    )?;
    bar.finish();
    println!(
        "trained {} steps, {} tokens, final loss {:.4}: {}",
        progress.step,
        progress.tokens_seen,
        progress.last_loss,
        args.out.display()
    );
    Ok(())
}

fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    use crate::bench::{measure, run_all, Path, Setup};
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1");
    }
    if let Some(path) = args.one {
        let tokens = *args.lengths.first().context("--lengths is empty")?;
        if let Some(dir) = &args.model_dir {
            crate::bench::ensure_model(args.shape, dir)?;
        }
        let setup = Setup {
            shape: args.shape,
            model_dir: args.model_dir.as_deref(),
            device: &parse_device(&args.device)?,
            dtype: parse_dtype(&args.dtype)?,
            incremental: args.incremental,
        };
        let m = measure(path, tokens, args.batch[0], &setup)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let paths = if args.paths.is_empty() {
        vec![
            Path::Incremental,
            Path::IncrementalBatched,
            Path::Parallel,
            Path::FullAttention,
        ]
    } else {
        args.paths.clone()
    };
    println!(
        "{:<20} {:>13} {:>8} {:>5} {:>10} {:>10} {:>12} {:>12}",
        "path", "engine", "tokens", "docs", "seconds", "tok/s", "peak RSS", "state"
    );
    let all = run_all(
        &paths,
        &args.lengths,
        &args.batch,
        args.shape,
        args.model_dir.as_deref(),
        args.incremental,
        &args.device,
        &args.dtype,
        |m| {
            let name = serde_json::to_value(m.path).unwrap_or_default();
            let engine = match m.path {
                Path::Incremental | Path::IncrementalBatched => {
                    serde_json::to_value(m.incremental).unwrap_or_default()
                }
                _ => serde_json::Value::String("-".into()),
            };
            println!(
                "{:<20} {:>13} {:>8} {:>5} {:>10.2} {:>10.0} {:>12} {:>12}",
                name.as_str().unwrap_or_default(),
                engine.as_str().unwrap_or_default(),
                m.tokens,
                m.documents,
                m.seconds,
                m.tokens_per_second,
                human_bytes(m.peak_rss),
                human_bytes(m.state_bytes)
            );
        },
    )?;
    if let Some(f) = &args.json {
        std::fs::write(f, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

/// A text file's contents, with a clear error for bytes that are not UTF-8.
fn read_text(f: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            f.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The document id of a file: its name without the extension.
fn file_id(file: &std::path::Path) -> anyhow::Result<String> {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name to use as an id", file.display()))
}

/// `compress --store --part-bytes N`: every file sent as parts, appended one at a time.
fn run_compress_parts(args: &CompressArgs, store_dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::update::{apply_parts, split_parts, Outcome, Part};
    let model = args.model.load()?;
    let store = crate::store::Store::open(store_dir)?;
    let mut parts = Vec::new();
    for f in &args.files {
        let text = read_text(f)?;
        let id = file_id(f)?;
        let pieces = split_parts(&text, args.part_bytes);
        let n = pieces.len();
        for (k, piece) in pieces.into_iter().enumerate() {
            parts.push(Part {
                id: id.clone(),
                version: args.doc_version,
                part: k as u32,
                last: k + 1 == n,
                text: piece.to_string(),
                source: None,
                attributes: Default::default(),
            });
        }
    }
    let outcomes = apply_parts(&model, &store, &parts, args.precision, args.batch)?;
    let mut out = std::io::stdout().lock();
    let mut rejected = 0;
    for (p, o) in parts.iter().zip(outcomes) {
        match o {
            Outcome::Stored { meta: m, .. } if m.complete => {
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&m)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<24} {} parts {:>8} tokens {:>6} sentences {:>6} gists {} chunks",
                        m.id, m.parts, m.tokens, m.sentences, m.gist_tokens, m.state_chunks
                    )?;
                }
            }
            Outcome::Stored { .. } => {}
            Outcome::Skipped(a) => eprintln!("{} part {}: skipped ({a:?})", p.id, p.part),
            Outcome::Rejected(why) => {
                rejected += 1;
                eprintln!("giststream: {} part {}: {why}", p.id, p.part);
            }
        }
    }
    if rejected > 0 {
        bail!("{rejected} part(s) were rejected (listed above)");
    }
    Ok(())
}

fn run_compress(args: CompressArgs) -> anyhow::Result<()> {
    if let (Some(dir), true) = (&args.store, args.part_bytes > 0) {
        return run_compress_parts(&args, dir);
    }
    let model = args.model.load()?;
    let mut docs = Vec::with_capacity(args.files.len());
    let mut texts = Vec::with_capacity(args.files.len());
    for f in &args.files {
        let text = read_text(f)?;
        let segments = model
            .segments(&text)
            .with_context(|| format!("segmenting {}", f.display()))?;
        docs.push(Document {
            name: f.display().to_string(),
            segments,
        });
        texts.push(text);
    }
    let results = compress(&model, docs, args.batch)?;
    if let Some(dir) = &args.store {
        let store = crate::store::Store::open(dir)?;
        for ((state, _), (file, text)) in results.iter().zip(args.files.iter().zip(&texts)) {
            let id = file_id(file)?;
            store.put(&id, args.doc_version, &model, state, text, args.precision)?;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for (_, r) in &results {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        print_table(&mut out, results.iter().map(|(_, r)| r))?;
    }
    Ok(())
}

fn print_table<'a>(
    out: &mut impl Write,
    reports: impl Iterator<Item = &'a Report> + Clone,
) -> anyhow::Result<()> {
    let w = reports
        .clone()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(0)
        .max(8);
    writeln!(
        out,
        "{:<w$} {:>9} {:>9} {:>9} {:>7} {:>12} {:>12} {:>8}",
        "document", "tokens", "sentences", "gists", "R_c", "KV full", "KV gist", "seconds"
    )?;
    for r in reports {
        writeln!(
            out,
            "{:<w$} {:>9} {:>9} {:>9} {:>7.2} {:>12} {:>12} {:>8.3}",
            r.name,
            r.tokens,
            r.sentences,
            r.gist_tokens,
            r.compression_ratio,
            human_bytes(r.kv_bytes_full),
            human_bytes(r.kv_bytes_gist),
            r.seconds
        )?;
    }
    Ok(())
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_with_clear_errors() {
        assert!(matches!(parse_device("cpu").unwrap(), Device::Cpu));
        let e = parse_device("tpu").unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{e}");
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert!(parse_dtype("f64")
            .unwrap_err()
            .to_string()
            .contains("expected f32"));
    }

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
