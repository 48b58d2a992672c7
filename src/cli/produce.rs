//! `giststream produce`: files, folders or JSON lines to Kafka as document messages.

use crate::ingest::message::parse;
use crate::ingest::pipeline::Pipeline;
use crate::text::files::{documents, read_text};
use anyhow::{bail, Context};
use clap::Args;
use std::io::BufRead;
use std::path::{Path, PathBuf};

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

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let p = if args.pipeline.exists() {
        Pipeline::from_file(&args.pipeline)?
    } else {
        Pipeline::default()
    };
    let brokers = resolve_brokers(args.brokers.as_deref(), &p)?;
    let topic = args.topic.clone().unwrap_or(p.kafka.topic.clone());
    let mut msgs = Vec::new();
    let stdin = args.paths.is_empty() || args.paths.iter().any(|p| p == Path::new("-"));
    if stdin {
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let m = parse(None, Some(line.as_bytes()), usize::MAX)
                .with_context(|| format!("stdin line {}", n + 1))?;
            msgs.push(m);
        }
    }
    let files: Vec<PathBuf> = args
        .paths
        .iter()
        .filter(|p| p.as_path() != Path::new("-"))
        .cloned()
        .collect();
    for (f, id) in documents(&files)? {
        let text = read_text(&f)?;
        if text.is_empty() {
            bail!("{} is empty", f.display());
        }
        msgs.extend(crate::ingest::produce::messages(
            &id,
            args.doc_version,
            &text,
            args.part_bytes,
        ));
    }
    let total = msgs.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} messages {per_sec}")
            .expect("static template"),
    );
    let producer = crate::ingest::producer(&p, &brokers)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sent = rt.block_on(crate::ingest::produce::send_all(
        &producer,
        &topic,
        msgs,
        |n| bar.set_position(n as u64),
    ))?;
    bar.finish_and_clear();
    eprintln!("giststream: {sent} message(s) delivered to {topic} at {brokers}");
    Ok(())
}

/// Bootstrap servers: the flag, the pipeline's, or the embedded broker announced by the
/// `serve` running on the pipeline's store.
fn resolve_brokers(flag: Option<&str>, p: &Pipeline) -> anyhow::Result<String> {
    if let Some(b) = flag {
        return Ok(b.to_string());
    }
    if !p.kafka.brokers.is_empty() {
        return Ok(p.kafka.brokers.clone());
    }
    match crate::serve::client::read_endpoint(&p.store.path).and_then(|e| e.kafka_bootstrap) {
        Some(b) => Ok(b),
        None => bail!(
            "no brokers: the pipeline names none and no `giststream serve` with an embedded broker runs on {} (give --brokers)",
            p.store.path.display()
        ),
    }
}
