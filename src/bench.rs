//! `giststream bench`: throughput and peak memory of the forward paths on a random model of
//! the paper-comparison shape, at several document lengths.
//!
//! Each measurement runs in a child process (this binary, `bench --one ...`), so its peak
//! resident memory (VmHWM) is its own. Documents are token ids, not text: sentences of
//! 20, 23, 27, 31, 34 regular tokens in turn (mean 27), each followed by N_g gists, the
//! same workload `scripts/bench_reference.py` gives the reference code. Throughput counts
//! document tokens (regular tokens, not gists) per second of wall time.
//!
//! The `train-*` paths time one optimizer step (forward, backward, AdamW) on one document,
//! with the blockwise sentence mask or a dense T x T one.

use crate::compress::{compress, Document};
use crate::model::llama::{Logits, Ops};
use crate::model::{GistModel, LoadOptions};
use crate::parallel::{forward_rows, Layout, Mode};
use crate::segment::SegmentConfig;
use crate::tiny::{write_random_model, SplitMix, TinySpec};
use crate::tokenize::Segment;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Sentence lengths (regular tokens) cycled through by benchmark documents.
pub const SENTENCE_LENGTHS: [usize; 5] = [20, 23, 27, 31, 34];

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Path {
    /// Incremental gist path, one document.
    Incremental,
    /// Incremental gist path, `batch` documents together.
    IncrementalBatched,
    /// Parallel sentence attention, blockwise mask.
    Parallel,
    /// Plain causal attention, no gists (full KV).
    FullAttention,
    /// One training step (forward, backward, AdamW) with the blockwise sentence mask.
    TrainBlockwise,
    /// The same step with a dense T x T sentence mask (the reference code's way).
    TrainDense,
    /// Time to the first answer token of a question on a stored document: read its state
    /// record, decode it, feed the question, pick a token.
    TtftGist,
    /// The same without a stored state: the document and the question through full
    /// attention (a prefill), then the first token.
    TtftFull,
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub path: Path,
    /// Regular tokens per document.
    pub tokens: usize,
    pub documents: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// Peak resident memory of the process, bytes.
    pub peak_rss: u64,
    /// Resident memory after loading the model, before the measured work.
    pub base_rss: u64,
    /// Bytes of the gist states at the end (incremental paths).
    pub state_bytes: u64,
    /// Bytes allocated for them (spare rows of the growing buffers included).
    pub state_allocated: u64,
    pub threads: usize,
}

/// The model shape compared with the reference code (GIST.md, issue 2).
pub fn paper_shape() -> TinySpec {
    TinySpec {
        hidden: 256,
        layers: 4,
        heads: 4,
        kv_heads: 2,
        intermediate: 688,
        vocab: 4096,
        num_gists: 4,
        gist_checkpoint: true,
        llama3_rope_scaling: false,
        tie_embeddings: false,
        segmentation: SegmentConfig::default(),
        bos_always_visible: false,
        scale: 0.02,
        embed_scale: 0.02,
        norm_noise: 0.0,
        seed: 1,
    }
}

/// A benchmark document of `tokens` regular tokens as closed segments (BOS first).
pub fn document(tokens: usize, bos: u32, seed: u64) -> Vec<Segment> {
    let mut rng = SplitMix(seed);
    let mut out = Vec::new();
    let mut left = tokens;
    let mut i = 0;
    while left > 0 {
        let n = SENTENCE_LENGTHS[i % SENTENCE_LENGTHS.len()].min(left);
        let mut t: Vec<u32> = (0..n).map(|_| (rng.next_u64() % 256) as u32).collect();
        if i == 0 {
            t[0] = bos;
        }
        out.push(Segment {
            tokens: t,
            bytes: 0..0,
            close: true,
        });
        left -= n;
        i += 1;
    }
    out
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs one measurement in this process.
pub fn measure(
    path: Path,
    tokens: usize,
    batch: usize,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<Measurement> {
    let dir = tempfile::tempdir()?;
    write_random_model(dir.path(), &paper_shape())?;
    let model = GistModel::load(dir.path(), device, dtype, &LoadOptions::default())?;
    let bos = model.bos_token_id().context("the bench model has BOS")?;
    let documents = if path == Path::IncrementalBatched {
        batch
    } else {
        1
    };
    let docs: Vec<Vec<Segment>> = (0..documents)
        .map(|d| document(tokens, bos, d as u64 + 1))
        .collect();
    // Warm up allocators and kernels on a short document.
    let warm = vec![Document {
        name: "warmup".into(),
        segments: document(256, bos, 99),
    }];
    compress(&model, warm, 1)?;
    let base_rss = status_kb("VmRSS:") * 1024;
    let mut start = Instant::now();
    let (mut state_bytes, mut state_allocated) = (0, 0);
    match path {
        Path::Incremental | Path::IncrementalBatched => {
            let input = docs
                .into_iter()
                .enumerate()
                .map(|(i, segments)| Document {
                    name: i.to_string(),
                    segments,
                })
                .collect();
            let results = compress(&model, input, batch)?;
            state_bytes = results.iter().map(|(_, r)| r.kv_bytes_gist).sum();
            state_allocated = results.iter().map(|(s, _)| s.allocated_bytes()).sum();
        }
        Path::TrainBlockwise | Path::TrainDense => {
            use crate::train::{self, AdamW, Attention, TrainConfig, Trainable};
            let trainee = train::trainee_from_dir(dir.path(), 4, device)?;
            let mut cfg = TrainConfig::scratch(1, 1e-4, 1);
            cfg.attention = match path {
                Path::TrainDense => Attention::GistDense,
                _ => Attention::Gist,
            };
            let mut opt = AdamW::for_trainee(&trainee, Trainable::All)?;
            // Warm-up step on a short document; the timer covers only the measured step.
            train::train_step(&trainee, &mut opt, &[document(256, bos, 99)], 1e-4, &cfg)?;
            start = Instant::now();
            train::train_step(&trainee, &mut opt, &docs, 1e-4, &cfg)?;
        }
        Path::TtftGist | Path::TtftFull => {
            let question = "Where did it happen, and who was there?";
            let q = crate::query::question_tokens(&model, question, true)?;
            if path == Path::TtftGist {
                // The stored record, as the store would hand it over.
                let input = vec![Document {
                    name: "d".into(),
                    segments: docs[0].clone(),
                }];
                let (state, _) = compress(&model, input, 1)?.remove(0);
                let record =
                    crate::store::codec::encode(&state, crate::store::codec::Precision::F32)?;
                state_bytes = record.len() as u64;
                start = Instant::now();
                let state = crate::store::codec::decode(&record, device, dtype)?;
                let sampling = crate::query::Sampling {
                    max_tokens: 1,
                    temperature: 0.0,
                    top_p: None,
                    seed: 1,
                    chat_template: true,
                };
                crate::query::answer(&model, state, question, &sampling, |_| {})?;
            } else {
                start = Instant::now();
                let mut tokens: Vec<u32> = docs[0]
                    .iter()
                    .flat_map(|s| s.tokens.iter().copied())
                    .collect();
                tokens.extend(&q);
                let seg = Segment {
                    tokens,
                    bytes: 0..0,
                    close: false,
                };
                let layout = Layout::new(&model, &[vec![seg]], false);
                let last = Tensor::new(&[(layout.ids.len() - 1) as u32], device)?;
                let logits = forward_rows(
                    &model,
                    &layout,
                    Mode::Causal,
                    Ops::Fused,
                    &Logits::Rows(last),
                )?
                .context("logits requested")?;
                logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            }
        }
        Path::Parallel | Path::FullAttention => {
            let (gists, mode) = match path {
                Path::Parallel => (true, Mode::Sentence),
                _ => (false, Mode::Causal),
            };
            let layout = Layout::new(&model, &docs, gists);
            let last = Tensor::new(&[(layout.ids.len() - 1) as u32], device)?;
            forward_rows(&model, &layout, mode, Ops::Fused, &Logits::Rows(last))?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Measurement {
        path,
        tokens,
        documents,
        seconds,
        tokens_per_second: (tokens * documents) as f64 / seconds,
        peak_rss: status_kb("VmHWM:") * 1024,
        base_rss,
        state_bytes,
        state_allocated,
        threads: candle_core::utils::get_num_threads(),
    })
}

/// Runs every (path, length) in a child process and returns the measurements.
pub fn run_all(
    paths: &[Path],
    lengths: &[usize],
    batch: usize,
    device: &str,
    dtype: &str,
    mut progress: impl FnMut(&Measurement),
) -> anyhow::Result<Vec<Measurement>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    for &tokens in lengths {
        for &path in paths {
            let name = serde_json::to_value(path)?;
            let child = std::process::Command::new(&exe)
                .args(["bench", "--one", name.as_str().unwrap_or_default()])
                .args([
                    "--lengths",
                    &tokens.to_string(),
                    "--batch",
                    &batch.to_string(),
                ])
                .args(["--device", device, "--dtype", dtype])
                .output()
                .context("starting a benchmark child")?;
            if !child.status.success() {
                bail!(
                    "benchmark {name} at {tokens} tokens failed: {}",
                    String::from_utf8_lossy(&child.stderr)
                );
            }
            let m: Measurement = serde_json::from_slice(&child.stdout)
                .with_context(|| format!("reading the result of {name} at {tokens} tokens"))?;
            progress(&m);
            out.push(m);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn benchmark_documents_have_the_asked_length_and_mean_sentence() {
        let d = document(2048, 256, 1);
        assert_eq!(d.iter().map(|s| s.tokens.len()).sum::<usize>(), 2048);
        assert_eq!(d[0].tokens[0], 256);
        let mean = 2048.0 / d.len() as f64;
        assert!((26.0..28.0).contains(&mean), "{mean}");
    }

    #[test]
    fn training_steps_are_measured_with_both_masks() {
        for path in [Path::TrainBlockwise, Path::TrainDense] {
            let m = measure(path, 128, 1, &Device::Cpu, DType::F32).unwrap();
            assert!(m.tokens_per_second > 0.0 && m.seconds > 0.0, "{path:?}");
        }
    }

    #[test]
    fn a_small_measurement_runs() {
        let m = measure(Path::IncrementalBatched, 300, 2, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(m.documents, 2);
        assert!(m.tokens_per_second > 0.0 && m.peak_rss >= m.base_rss);
        // 300 tokens in sentences of 20, 23, 27, 31, 34... : 12 sentences, 4 gists each.
        assert_eq!(m.state_bytes, 2 * 12 * 4 * 4 * 2 * 2 * 64 * 4);
    }
}
