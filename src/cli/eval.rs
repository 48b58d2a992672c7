//! `giststream eval`: perplexity of gist models and full-attention baselines.

use crate::model::device::parse_device;
use crate::model::{GistModel, LoadOptions};
use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Gist model directories, scored on the incremental path.
    #[arg(long = "model", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// Full-attention baseline directories, scored with plain causal attention (the
    /// ceiling a gist model approaches).
    #[arg(long = "baseline", value_name = "DIR")]
    pub baselines: Vec<PathBuf>,
    /// Models scored on each sentence alone, with nothing before it (the floor: a model
    /// with no memory of the document).
    #[arg(long = "floor", value_name = "DIR")]
    pub floors: Vec<PathBuf>,
    /// A GGUF model's matrices (gist adapters included): `dequantized` or `quantized`.
    #[arg(long, value_enum, default_value_t = crate::model::gguf::Weights::default())]
    pub weights: crate::model::gguf::Weights,
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

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    use crate::train::eval::{documents, evaluate, Scoring};
    if args.models.is_empty() && args.baselines.is_empty() && args.floors.is_empty() {
        bail!("nothing to evaluate: give --model, --baseline or --floor");
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
        .chain(args.baselines.iter().map(|m| (m, Scoring::Full)))
        .chain(args.floors.iter().map(|m| (m, Scoring::Sentence)));
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<28} {:>7} {:>4} {:>8} {:>8} {:>10} {:>10} {:>7} {:>10}",
            "model", "scoring", "N_g", "tokens", "ppl", "2nd|1st", "2nd alone", "R_c", "KV B/tok"
        )?;
    }
    for (dir, scoring) in runs {
        let opts = LoadOptions {
            weights: args.weights,
            ..LoadOptions::default()
        };
        let model = GistModel::load(dir, &device, DType::F32, &opts)
            .with_context(|| format!("loading {}", dir.display()))?;
        let docs = if args.windows > 0 {
            crate::train::eval::windows(&model, &texts, args.max_tokens, args.windows)?
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
            let quarters: Vec<String> = r
                .second_half_quarters
                .iter()
                .map(|[after, alone]| {
                    format!(
                        "{after:.2}|{alone:.2} ({:+.1}%)",
                        (after / alone - 1.0) * 100.0
                    )
                })
                .collect();
            writeln!(
                out,
                "  2nd half by quarter, after 1st|alone: {}",
                quarters.join("  ")
            )?;
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct EvalQaArgs {
    #[command(flatten)]
    pub model: super::flags::ModelArgs,
    /// JSON lines of {"document", "question", "answer", "key"} (`scripts/make-qa.py` on
    /// held-out books).
    #[arg(long, value_name = "FILE")]
    pub qa: PathBuf,
    /// Questions to ask, from the start of the file (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Most answer tokens (greedy).
    #[arg(long, default_value_t = 24)]
    pub max_tokens: usize,
    /// Read each document whole with full attention instead of from its stored gist state
    /// (`reread`: the same model without compression): `before` the question, as a stored
    /// document sits, or `in-turn`, inside the chat's user turn.
    #[arg(long, value_name = "PLACE", value_parser = ["before", "in-turn"])]
    pub reread: Option<String>,
}

/// `giststream eval-qa`: one JSON line per question, then the accuracy.
pub fn run_qa(args: EvalQaArgs) -> anyhow::Result<()> {
    use crate::train::qa::{evaluate, read_records, Reading};
    let mut records = read_records(&args.qa)?;
    if args.limit > 0 {
        records.truncate(args.limit);
    }
    if records.is_empty() {
        bail!("{}: no questions", args.qa.display());
    }
    let model = args.model.load()?;
    let reading = match args.reread.as_deref() {
        None => Reading::Stored,
        Some("in-turn") => Reading::Whole(crate::query::Placement::InTurn),
        Some(_) => Reading::Whole(crate::query::Placement::Before),
    };
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    let results = evaluate(&model, &records, reading, args.max_tokens, |r| {
        if write_err.is_none() {
            if let Err(e) = serde_json::to_string(r)
                .map_err(std::io::Error::from)
                .and_then(|line| writeln!(out, "{line}"))
            {
                write_err = Some(e);
            }
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let keyed: Vec<bool> = results.iter().filter_map(|r| r.correct).collect();
    let right = keyed.iter().filter(|&&c| c).count();
    let nll: Vec<f64> = results.iter().filter_map(|r| r.answer_nll).collect();
    let summary = serde_json::json!({
        "questions": results.len(),
        "correct": right,
        "accuracy": if keyed.is_empty() { None } else { Some(right as f64 / keyed.len() as f64) },
        "answer_nll_per_token": if nll.is_empty() { None } else { Some(nll.iter().sum::<f64>() / nll.len() as f64) },
        "reading": args.reread.as_deref().unwrap_or("stored"),
    });
    writeln!(out, "{summary}")?;
    Ok(())
}
