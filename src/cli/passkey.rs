//! `giststream passkey`: find a number hidden in filler text (see `train::passkey`).

use crate::model::device::parse_device;
use crate::model::random::SplitMix;
use crate::model::{GistModel, LoadOptions};
use crate::train::passkey::{trial, Ask, Reading};
use anyhow::{bail, Context};
use candle_core::DType;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PasskeyArgs {
    /// Gist models (folders, adapter folders or shipped names), reading each document into
    /// the gist state and answering from it.
    #[arg(long = "model", value_name = "DIR")]
    pub models: Vec<PathBuf>,
    /// Models reading with full attention (every token kept); only up to
    /// --full-max-tokens, past which a full cache is what the gist state replaces.
    #[arg(long = "baseline", value_name = "DIR")]
    pub baselines: Vec<PathBuf>,
    /// Document lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "2048,8192,32768")]
    pub lengths: Vec<usize>,
    /// Longest document a --baseline reads.
    #[arg(long, default_value_t = 8192)]
    pub full_max_tokens: usize,
    /// Trials per model and length (each a new key at a new random depth).
    #[arg(long, default_value_t = 5)]
    pub trials: usize,
    /// Seeds the keys and depths: every model sees the same ones.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A GGUF model's matrices: `dequantized` or `quantized`.
    #[arg(long, value_enum, default_value_t = crate::model::gguf::Weights::default())]
    pub weights: crate::model::gguf::Weights,
    /// Ask through the model's chat template (after the document, as `query` does)
    /// instead of in a new paragraph. SmolLM2-135M with full attention finds no key this
    /// way, even in 200 tokens: it answers a chat turn from the turn alone.
    #[arg(long, conflicts_with = "in_turn")]
    pub chat: bool,
    /// Put the document inside the chat's user turn (the template's opening before it),
    /// and the question at the end of that turn.
    #[arg(long)]
    pub in_turn: bool,
    /// One JSON object per trial instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: PasskeyArgs) -> anyhow::Result<()> {
    if args.models.is_empty() && args.baselines.is_empty() {
        bail!("nothing to test: give --model or --baseline");
    }
    let device = parse_device(&args.device)?;
    let runs = args
        .models
        .iter()
        .map(|m| (m, Reading::Gist))
        .chain(args.baselines.iter().map(|m| (m, Reading::Full)));
    let mut out = std::io::stdout().lock();
    for (dir, reading) in runs {
        let opts = LoadOptions {
            weights: args.weights,
            ..LoadOptions::default()
        };
        let model = GistModel::load(dir, &device, DType::F32, &opts)
            .with_context(|| format!("loading {}", dir.display()))?;
        for &length in &args.lengths {
            if reading == Reading::Full && length > args.full_max_tokens {
                continue;
            }
            let mut rng = SplitMix(args.seed ^ length as u64);
            let mut found = 0;
            for _ in 0..args.trials {
                let ask = match (args.chat, args.in_turn) {
                    (_, true) => Ask::InTurn,
                    (true, _) => Ask::Chat,
                    _ => Ask::Paragraph,
                };
                let t = trial(&model, reading, length, ask, &mut rng)?;
                found += t.found as usize;
                if args.json {
                    let mut v = serde_json::to_value(&t)?;
                    v["model"] = dir.display().to_string().into();
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(
                        out,
                        "{:<28} {:>5} {:>6} depth {:.2} key {} {} answer {:?} ({:.0} s)",
                        dir.display(),
                        format!("{reading:?}").to_lowercase(),
                        t.tokens,
                        t.depth,
                        t.key,
                        if t.found { "found" } else { "missed" },
                        t.answer,
                        t.seconds
                    )?;
                }
                out.flush()?;
            }
            if !args.json {
                writeln!(
                    out,
                    "{:<28} {:>5} {:>6} accuracy {found}/{}",
                    dir.display(),
                    format!("{reading:?}").to_lowercase(),
                    length,
                    args.trials
                )?;
            }
        }
    }
    Ok(())
}
