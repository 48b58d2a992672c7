//! `giststream serve` (Kafka ingestion plus the HTTP API) and `giststream restore`.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Pipeline definition (TOML; see pipelines/local.toml).
    #[arg(long, value_name = "FILE", default_value = "pipelines/local.toml")]
    pub pipeline: PathBuf,
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

pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    crate::serve::run::serve(&args.pipeline)
}

pub fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    let report = crate::serve::run::restore(&args.pipeline, args.store, args.brokers)?;
    println!("{}", serde_json::to_string(&report)?);
    for s in &report.skipped {
        eprintln!("giststream: not restored: {s}");
    }
    // A restored node that silently lacks documents is worse than a failed restore.
    anyhow::ensure!(
        report.skipped.is_empty(),
        "{} document(s) could not be restored from the state topic (listed above); the \
         other {} are in the store",
        report.skipped.len(),
        report.documents
    );
    Ok(())
}
