//! `giststream reindex`: stale states rebuilt with a new model or precision, inside the
//! serving process when one holds the store.

use super::flags::ModelArgs;
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

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
    /// A GGUF model's matrices: quantized or dequantized.
    #[arg(long, value_enum, default_value = "dequantized")]
    pub weights: crate::model::gguf::Weights,
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

pub fn run(args: ReindexArgs) -> anyhow::Result<()> {
    use crate::jobs::reindex::{Filter, JobProgress, JobSpec};
    let p = if args.pipeline.exists() {
        crate::ingest::pipeline::Pipeline::from_file(&args.pipeline)?
    } else {
        crate::ingest::pipeline::Pipeline::default()
    };
    let store_dir = args.store.clone().unwrap_or(p.store.path.clone());
    let spec = JobSpec {
        precision: args.precision,
        filter: Filter::parse(&args.filter)?,
        keep_old: args.keep_old,
        dry_run: args.dry_run,
        batch: args.batch,
    };
    let show = |pr: &JobProgress| {
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
    let finish = |pr: &JobProgress| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(pr)?);
        for s in &pr.skipped {
            eprintln!("giststream: skipped {s}");
        }
        Ok(())
    };
    let served = crate::serve::client::Client::discover(&store_dir);
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
        let answer = client.reindex(&crate::serve::api::ReindexRequest {
            model,
            weights: args.weights,
            spec,
        })?;
        if args.dry_run {
            let pr: JobProgress = serde_json::from_value(answer)?;
            return finish(&pr);
        }
        let accepted: crate::serve::api::JobAccepted = serde_json::from_value(answer)?;
        // Follow the job's progress until it is done.
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let pr = client.job(&accepted.job)?;
            show(&pr);
            match pr.state.as_str() {
                "done" => return finish(&pr),
                "failed" => bail!(
                    "the re-index job failed in the serving process: {}",
                    pr.error.as_deref().unwrap_or("no reason given")
                ),
                _ => {}
            }
        }
    }
    let model = ModelArgs {
        model: args.model.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        num_gists: 4,
        weights: args.weights,
    }
    .load()?;
    let store = crate::store::Store::open(&store_dir)?;
    if !args.from_kafka {
        let pr = crate::jobs::reindex::run(&store, &model, &spec, show)?;
        return finish(&pr);
    }
    let pr = crate::jobs::reindex::run_from_kafka(&p, &store, &store_dir, &model, &spec, show)?;
    finish(&pr)
}
