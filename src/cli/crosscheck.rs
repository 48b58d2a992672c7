//! `giststream crosscheck`: a device and precision against the CPU in f32.

use super::flags::ModelArgs;
use anyhow::{bail, Context};
use clap::Args;
use std::path::PathBuf;

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

pub fn run(args: CrosscheckArgs) -> anyhow::Result<()> {
    let checked = args.model.load()?;
    let reference = ModelArgs {
        device: "cpu".into(),
        dtype: "f32".into(),
        ..args.model.clone()
    }
    .load()?;
    let mut docs = Vec::new();
    for (name, text) in crate::bench::demo::TEXTS {
        let mut end = args.bytes.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let segments = reference
            .segments(&text[..end])
            .with_context(|| format!("segmenting {name}"))?;
        docs.push(segments);
    }
    let report = crate::bench::crosscheck::run(&reference, &checked, &docs)?;
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
