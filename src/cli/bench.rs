//! `giststream bench`, `bench-ingest` and `bench-reindex`: measurements, printed as tables.

use crate::engine::compress::human_bytes;
use crate::model::device::{parse_device, parse_dtype};
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Document lengths in regular tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [2048, 16384, 65536])]
    pub lengths: Vec<usize>,
    /// Paths to measure (default: the four inference paths; the train-* paths time
    /// training steps and are chosen explicitly, e.g. with --lengths 1024,4096).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub paths: Vec<crate::bench::ForwardPath>,
    /// Documents in the batched incremental measurement; several sizes (8,32) measure it
    /// once each.
    #[arg(long, value_delimiter = ',', default_values_t = [8])]
    pub batch: Vec<usize>,
    /// The train-* paths: full-length steps timed back to back after a short warm-up; the
    /// result is their median (1: the first full-length step alone).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub train_steps: usize,
    /// Shape of the random model: `paper` (small, f32 weights), `smollm2-135m`
    /// (SmolLM2-135M's shape, f32: the gist fine-tuning's budget), or `llama-3.2-1b`
    /// (1.24B weights in bf16; meant for a GPU with `--dtype bf16`).
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
    pub one: Option<crate::bench::ForwardPath>,
    /// Incremental engine: `per-document` (attention per document) or `slots` (all
    /// documents' caches in one tensor, attention batched). Default: per-document on the
    /// CPU, slots on a GPU.
    #[arg(long, value_enum)]
    pub incremental: Option<crate::model::config::Incremental>,
    /// Measure this model (HF directory or GGUF file) instead of a random one, on --text.
    #[arg(long, value_name = "DIR|FILE", requires = "text")]
    pub model: Option<PathBuf>,
    /// With --model: the text whose first sentences make each document.
    #[arg(long, value_name = "FILE", requires = "model")]
    pub text: Option<PathBuf>,
    /// With --model, a GGUF file's matrices: dequantized or quantized.
    #[arg(long, value_enum, default_value = "dequantized")]
    pub weights: crate::model::gguf::Weights,
    /// Keep the random model in DIR: written there on first use, reused after (the 1B
    /// shape takes a while to write). Default: a temporary folder per run.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
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
pub struct BenchReindexArgs {
    #[arg(long, default_value_t = 32)]
    pub docs: usize,
    /// Tokens per document (about: byte-level text).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
}

fn real(args: &BenchArgs) -> Option<crate::bench::Real<'_>> {
    Some(crate::bench::Real {
        model: args.model.as_deref()?,
        text: args.text.as_deref()?,
        weights: args.weights,
    })
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    use crate::bench::{measure, run_all, ForwardPath, Setup};
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs sizes of at least 1");
    }
    if args.train_steps == 0 {
        bail!("--train-steps needs at least 1");
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
            real: real(&args),
            train_steps: args.train_steps,
        };
        let m = measure(path, tokens, args.batch[0], &setup)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let paths = if args.paths.is_empty() {
        vec![
            ForwardPath::Incremental,
            ForwardPath::IncrementalBatched,
            ForwardPath::Parallel,
            ForwardPath::FullAttention,
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
        real(&args),
        args.train_steps,
        |m| {
            let name = serde_json::to_value(m.path).unwrap_or_default();
            let engine = match m.path {
                ForwardPath::Incremental | ForwardPath::IncrementalBatched => {
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

pub fn run_ingest(args: BenchIngestArgs) -> anyhow::Result<()> {
    println!(
        "{:>5} {:>5} {:>8} {:>12} {:>12} {:>15} {:>9}",
        "batch", "docs", "tokens", "bare tok/s", "segment s", "pipeline tok/s", "overhead"
    );
    let all = crate::bench::ingest::run(
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

pub fn run_reindex(args: BenchReindexArgs) -> anyhow::Result<()> {
    let m = crate::bench::reindex::run(args.docs, args.tokens, args.batch)?;
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}
