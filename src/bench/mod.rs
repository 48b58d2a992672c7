//! `giststream bench`: throughput and peak memory of the forward paths on a random model of
//! a chosen shape (the paper-comparison shape, or Llama-3.2-1B's for the GPU), at several
//! document lengths.
//!
//! The parent writes the random model once; each measurement runs in a child process
//! (this binary, `bench --one ...`) that loads it, so its peak resident memory (VmHWM) is
//! its own. Documents are token ids, not text: sentences of
//! 20, 23, 27, 31, 34 regular tokens in turn (mean 27), each followed by N_g gists, the
//! same workload `scripts/bench_reference.py` gives the reference code. Throughput counts
//! document tokens (regular tokens, not gists) per second of wall time.
//!
//! The `train-*` paths time one optimizer step (forward, backward, AdamW) on one document,
//! with the blockwise sentence mask or a dense T x T one.

pub mod crosscheck;
pub mod demo;
pub mod ingest;
pub mod reindex;

use crate::engine::compress::{compress, Document};
use crate::engine::whole::{forward_rows, Layout, Mode};
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::random::{write_random_model, Init, RandomSpec, SplitMix};
use crate::model::{GistModel, LoadOptions};
use crate::text::segment::SegmentConfig;
use crate::text::tokenize::Segment;
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Sentence lengths (regular tokens) cycled through by benchmark documents.
pub const SENTENCE_LENGTHS: [usize; 5] = [20, 23, 27, 31, 34];

/// What is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardPath {
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

/// The random model a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Hidden 256, 4 layers, 4/2 heads, vocab 4096, N_g 4: the CPU comparison with the
    /// reference code (f32 weights).
    Paper,
    /// Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, intermediate 8192, vocab 128256,
    /// tied embeddings, llama3 RoPE scaling, N_g 4, bf16 weights (2.5 GB): for GPUs.
    #[value(name = "llama-3.2-1b")]
    #[serde(rename = "llama-3.2-1b")]
    Llama32_1b,
}

impl Shape {
    pub fn spec(self) -> RandomSpec {
        match self {
            Shape::Paper => paper_shape(),
            Shape::Llama32_1b => RandomSpec {
                hidden: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                intermediate: 8192,
                vocab: 128_256,
                llama3_rope_scaling: true,
                rope_factor: 32.0,
                rope_original_max: 8192,
                rope_theta: 500_000.0,
                tie_embeddings: true,
                init: Init::Uniform,
                weights_dtype: DType::BF16,
                ..paper_shape()
            },
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    pub path: ForwardPath,
    pub shape: Shape,
    /// The incremental engine the model ran (it matters to the incremental paths only).
    pub incremental: crate::model::config::Incremental,
    pub device: String,
    pub dtype: String,
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
    /// Matrix-multiply FLOPs of the measured work (projections, MLP and attention scores
    /// over the keys each row may see; a training step counts 3x), to set against the
    /// chip's peak.
    pub flops: f64,
}

/// The model shape compared with the reference code (GIST.md, issue 2).
pub fn paper_shape() -> RandomSpec {
    RandomSpec {
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
        ..RandomSpec::default()
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

/// What one measurement runs on.
pub struct Setup<'a> {
    pub shape: Shape,
    /// The shape's random model, written earlier ([`write_model`]); written to a
    /// temporary folder when `None`.
    pub model_dir: Option<&'a std::path::Path>,
    pub device: &'a Device,
    pub dtype: DType,
    /// The incremental engine; the device's default when `None`.
    pub incremental: Option<crate::model::config::Incremental>,
    /// A real model and text instead of the shape's random model and token documents.
    pub real: Option<Real<'a>>,
}

/// A real model (HF directory or GGUF file) measured on real text: each document is the
/// text's first sentences, cut to the measured length, segmented by the model (N_g 1 for
/// a plain checkpoint).
#[derive(Debug, Clone, Copy)]
pub struct Real<'a> {
    pub model: &'a std::path::Path,
    pub text: &'a std::path::Path,
    pub weights: crate::model::gguf::Weights,
}

/// The text's first whole segments holding at least `tokens` tokens.
fn text_document(model: &GistModel, text: &str, tokens: usize) -> anyhow::Result<Vec<Segment>> {
    let mut out = Vec::new();
    let mut n = 0;
    for seg in model.segments(text)? {
        if n >= tokens {
            break;
        }
        n += seg.tokens.len();
        out.push(seg);
    }
    anyhow::ensure!(
        n >= tokens,
        "the text has {n} tokens, fewer than the {tokens} asked for"
    );
    Ok(out)
}

/// Writes `shape`'s random model into `dir`.
pub fn write_model(shape: Shape, dir: &std::path::Path) -> anyhow::Result<()> {
    write_random_model(dir, &shape.spec())
        .with_context(|| format!("writing the random {shape:?} model to {}", dir.display()))
}

/// Writes `shape`'s random model into `dir` unless a model of that shape is already there.
pub fn ensure_model(shape: Shape, dir: &std::path::Path) -> anyhow::Result<()> {
    let config = dir.join("config.json");
    if config.exists() {
        let spec = shape.spec();
        let text = std::fs::read_to_string(&config)?;
        let c: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("reading {}", config.display()))?;
        let same = c["hidden_size"] == spec.hidden
            && c["num_hidden_layers"] == spec.layers
            && c["intermediate_size"] == spec.intermediate
            && c["num_attention_heads"] == spec.heads;
        if !same || !dir.join("model.safetensors").exists() {
            bail!(
                "{} holds a model that is not the {shape:?} benchmark shape: give another --model-dir",
                dir.display()
            );
        }
        return Ok(());
    }
    // Written aside and renamed, so a run killed mid-write leaves no half model behind.
    let aside = dir.with_extension("partial");
    if aside.exists() {
        std::fs::remove_dir_all(&aside).with_context(|| format!("removing {}", aside.display()))?;
    }
    write_model(shape, &aside)?;
    std::fs::rename(&aside, dir).with_context(|| format!("moving the model to {}", dir.display()))
}

/// Runs one measurement in this process.
pub fn measure(
    path: ForwardPath,
    tokens: usize,
    batch: usize,
    setup: &Setup<'_>,
) -> anyhow::Result<Measurement> {
    let (device, dtype) = (setup.device, setup.dtype);
    let scratch = tempfile::tempdir()?;
    let dir = match setup.model_dir {
        Some(d) => d,
        None => {
            write_model(setup.shape, scratch.path())?;
            scratch.path()
        }
    };
    let (mut model, text) = match setup.real {
        Some(r) => {
            let opts = LoadOptions {
                num_gists: 1,
                weights: r.weights,
                ..LoadOptions::default()
            };
            let text = crate::text::files::read_text(r.text)?;
            (GistModel::load(r.model, device, dtype, &opts)?, Some(text))
        }
        None => (
            GistModel::load(dir, device, dtype, &LoadOptions::default())?,
            None,
        ),
    };
    if let Some(e) = setup.incremental {
        model.incremental = e;
    }
    let documents = if path == ForwardPath::IncrementalBatched {
        batch
    } else {
        1
    };
    let (docs, warm, spec) = match &text {
        Some(text) => {
            let doc = text_document(&model, text, tokens)?;
            let c = &model.llama.cfg;
            let spec = RandomSpec {
                hidden: c.hidden,
                layers: c.layers,
                heads: c.heads,
                kv_heads: c.kv_heads,
                intermediate: c.intermediate,
                num_gists: model.gist.num_gist_tokens,
                ..RandomSpec::default()
            };
            let warm = text_document(&model, text, 256)?;
            (vec![doc; documents], warm, spec)
        }
        None => {
            let bos = model.bos_token_id().context("the bench model has BOS")?;
            let docs = (0..documents)
                .map(|d| document(tokens, bos, d as u64 + 1))
                .collect();
            (docs, document(256, bos, 99), setup.shape.spec())
        }
    };
    let tokens = docs[0].iter().map(|s| s.tokens.len()).sum::<usize>();
    let flops = work_flops(&spec, path, &docs);
    // Warm up allocators and kernels on a short document.
    let warm_doc = vec![Document {
        id: "warmup".into(),
        segments: warm.clone(),
    }];
    compress(&model, warm_doc, 1)?;
    let base_rss = status_kb("VmRSS:") * 1024;
    let mut start = Instant::now();
    let (mut state_bytes, mut state_allocated) = (0, 0);
    match path {
        ForwardPath::Incremental | ForwardPath::IncrementalBatched => {
            let input = docs
                .into_iter()
                .enumerate()
                .map(|(i, segments)| Document {
                    id: i.to_string(),
                    segments,
                })
                .collect();
            let results = compress(&model, input, batch)?;
            state_bytes = results.iter().map(|(_, r)| r.kv_bytes_gist).sum();
            state_allocated = results.iter().map(|(s, _)| s.allocated_bytes()).sum();
        }
        ForwardPath::TrainBlockwise | ForwardPath::TrainDense => {
            use crate::train::{self, AdamW, Attention, TrainConfig, Trainable};
            anyhow::ensure!(
                setup.real.is_none(),
                "the train-* paths measure the shape's random model (no --model yet)"
            );
            let trainee = train::trainee_from_dir(dir, 4, device)?;
            let mut cfg = TrainConfig::scratch(1, 1e-4, 1);
            cfg.attention = match path {
                ForwardPath::TrainDense => Attention::GistDense,
                _ => Attention::Gist,
            };
            let mut opt = AdamW::for_trainee(&trainee, Trainable::All)?;
            // Warm-up step on a short document; the timer covers only the measured step.
            train::train_step(&trainee, &mut opt, std::slice::from_ref(&warm), 1e-4, &cfg)?;
            start = Instant::now();
            train::train_step(&trainee, &mut opt, &docs, 1e-4, &cfg)?;
        }
        ForwardPath::TtftGist | ForwardPath::TtftFull => {
            let question = "Where did it happen, and who was there?";
            let q = crate::query::question_tokens(&model, question, true)?;
            if path == ForwardPath::TtftGist {
                // The stored record, as the store would hand it over.
                let input = vec![Document {
                    id: "d".into(),
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
        ForwardPath::Parallel | ForwardPath::FullAttention => {
            let (gists, mode) = match path {
                ForwardPath::Parallel => (true, Mode::Sentence),
                _ => (false, Mode::Causal),
            };
            let layout = Layout::new(&model, &docs, gists);
            let last = Tensor::new(&[(layout.ids.len() - 1) as u32], device)?;
            forward_rows(&model, &layout, mode, Ops::Fused, &Logits::Rows(last))?;
        }
    }
    // Kernels on a GPU run asynchronously: wait for them before reading the clock.
    device.synchronize()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Measurement {
        path,
        shape: setup.shape,
        incremental: model.incremental,
        device: match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        },
        dtype: dtype.as_str().into(),
        flops,
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

/// Matrix-multiply FLOPs of running `docs` (all sentences closed) through `path`.
///
/// Per row and layer: 2 x the projection and MLP weights, plus 4 x heads x head_dim per
/// key the row attends to. The keys a row sees: on the gist paths, the gists (and BOS) kept
/// from earlier sentences and its own sentence up to itself; with full attention, every
/// earlier token. Logits are left out (the measured paths compute one row or none).
pub fn work_flops(spec: &RandomSpec, path: ForwardPath, docs: &[Vec<Segment>]) -> f64 {
    let (h, d) = (spec.hidden as f64, (spec.hidden / spec.heads) as f64);
    let (q, kv) = (spec.heads as f64 * d, spec.kv_heads as f64 * d);
    let per_row = 2.0 * (h * (q + 2.0 * kv) + q * h + 3.0 * h * spec.intermediate as f64);
    let per_key = 4.0 * spec.heads as f64 * d;
    let ng = spec.num_gists as f64;
    let mut total = 0.0;
    for doc in docs {
        let mut kept = 1.0; // BOS, kept at position 0
        let mut position = 0.0;
        for seg in doc {
            let n = seg.tokens.len() as f64;
            let keys = match path {
                ForwardPath::FullAttention | ForwardPath::TtftFull => {
                    // Rows p+1 .. p+n see p+1 .. p+n keys.
                    let k = n * position + n * (n + 1.0) / 2.0;
                    position += n;
                    total += n * per_row;
                    k
                }
                _ => {
                    let rows = n + ng;
                    let k = rows * kept + rows * (rows + 1.0) / 2.0;
                    kept += ng;
                    total += rows * per_row;
                    k
                }
            };
            total += keys * per_key;
        }
    }
    let total = total * spec.layers as f64;
    match path {
        ForwardPath::TrainBlockwise | ForwardPath::TrainDense => 3.0 * total,
        _ => total,
    }
}

/// Runs every (path, length, batch) in a child process on one random model of `shape`,
/// written once, and returns the measurements. The `incremental-batched` path runs once
/// per batch size; the others once.
#[allow(clippy::too_many_arguments)]
pub fn run_all(
    paths: &[ForwardPath],
    lengths: &[usize],
    batches: &[usize],
    shape: Shape,
    model_dir: Option<&std::path::Path>,
    incremental: Option<crate::model::config::Incremental>,
    device: &str,
    dtype: &str,
    real: Option<Real<'_>>,
    mut progress: impl FnMut(&Measurement),
) -> anyhow::Result<Vec<Measurement>> {
    let exe = std::env::current_exe()?;
    let scratch = tempfile::tempdir()?;
    let model = model_dir.unwrap_or(scratch.path());
    ensure_model(shape, model)?;
    let shape_name = serde_json::to_value(shape)?;
    let mut out = Vec::new();
    for &tokens in lengths {
        for &path in paths {
            let name = serde_json::to_value(path)?;
            let batches = match path {
                ForwardPath::IncrementalBatched => batches,
                _ => &batches[..1.min(batches.len())],
            };
            for &batch in batches {
                let child = std::process::Command::new(&exe)
                    .args(["bench", "--one", name.as_str().unwrap_or_default()])
                    .args([
                        "--lengths",
                        &tokens.to_string(),
                        "--batch",
                        &batch.to_string(),
                    ])
                    .args(["--shape", shape_name.as_str().unwrap_or_default()])
                    .arg("--model-dir")
                    .arg(model)
                    .args(["--device", device, "--dtype", dtype])
                    .args(incremental.map(|e| {
                        let name = serde_json::to_value(e).unwrap_or_default();
                        format!("--incremental={}", name.as_str().unwrap_or_default())
                    }))
                    .args(real.iter().flat_map(|r| {
                        let weights = serde_json::to_value(r.weights).unwrap_or_default();
                        [
                            "--model".into(),
                            r.model.as_os_str().to_owned(),
                            "--text".into(),
                            r.text.as_os_str().to_owned(),
                            format!("--weights={}", weights.as_str().unwrap_or_default()).into(),
                        ]
                    }))
                    .output()
                    .context("starting a benchmark child")?;
                if !child.status.success() {
                    bail!(
                        "benchmark {name} at {tokens} tokens, batch {batch}, failed: {}",
                        String::from_utf8_lossy(&child.stderr)
                    );
                }
                let m: Measurement = serde_json::from_slice(&child.stdout)
                    .with_context(|| format!("reading the result of {name} at {tokens} tokens"))?;
                progress(&m);
                out.push(m);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_paper() -> Setup<'static> {
        Setup {
            shape: Shape::Paper,
            model_dir: None,
            device: &Device::Cpu,
            dtype: DType::F32,
            incremental: None,
            real: None,
        }
    }

    #[test]
    fn benchmark_documents_have_the_asked_length_and_mean_sentence() {
        let d = document(2048, 256, 1);
        assert_eq!(d.iter().map(|s| s.tokens.len()).sum::<usize>(), 2048);
        assert_eq!(d[0].tokens[0], 256);
        let mean = 2048.0 / d.len() as f64;
        assert!((26.0..28.0).contains(&mean), "{mean}");
    }

    #[test]
    fn flops_count_the_keys_each_row_sees() {
        // Brute force: walk the rows, counting the keys each one may attend to.
        let spec = paper_shape();
        let (h, i, l) = (256.0, 688.0, 4.0);
        let per_row = 2.0 * (h * (256.0 + 2.0 * 128.0) + 256.0 * h + 3.0 * h * i);
        let per_key = 4.0 * 256.0;
        let doc = document(100, 256, 3); // sentences of 20, 23, 27, 30
        let (mut gist, mut full) = (0.0, 0.0);
        let (mut kept, mut seen) = (1usize, 0usize);
        for seg in &doc {
            let rows = seg.tokens.len() + 4;
            for r in 0..rows {
                gist += per_row + per_key * (kept + r + 1) as f64;
            }
            kept += 4;
            for _ in 0..seg.tokens.len() {
                seen += 1;
                full += per_row + per_key * seen as f64;
            }
        }
        let docs = [doc];
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(rel(work_flops(&spec, ForwardPath::Incremental, &docs), l * gist) < 1e-12);
        assert!(
            rel(
                work_flops(&spec, ForwardPath::FullAttention, &docs),
                l * full
            ) < 1e-12
        );
        assert!(
            rel(
                work_flops(&spec, ForwardPath::TrainDense, &docs),
                3.0 * l * gist
            ) < 1e-12
        );
        // The 1B shape: its projections and MLP are Llama-3.2-1B's 973M weights outside
        // the embeddings.
        let big = Shape::Llama32_1b.spec();
        let one = [vec![Segment {
            tokens: vec![1],
            bytes: 0..0,
            close: false,
        }]];
        let f = work_flops(&big, ForwardPath::FullAttention, &one);
        assert_eq!(f, 16.0 * (2.0 * 60_817_408.0 + 4.0 * 2048.0));
    }

    #[test]
    fn a_kept_model_is_written_once_and_checked_before_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("paper");
        ensure_model(Shape::Paper, &m).unwrap();
        let written = std::fs::metadata(m.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        ensure_model(Shape::Paper, &m).unwrap(); // reused, not rewritten
        let again = std::fs::metadata(m.join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(written, again);
        assert!(!dir.path().join("paper.partial").exists());
        // A folder holding another shape is refused, naming the folder.
        let err = ensure_model(Shape::Llama32_1b, &m).unwrap_err().to_string();
        assert!(err.contains("not the Llama32_1b benchmark shape"), "{err}");
    }

    #[test]
    fn training_steps_are_measured_with_both_masks() {
        for path in [ForwardPath::TrainBlockwise, ForwardPath::TrainDense] {
            let m = measure(path, 128, 1, &cpu_paper()).unwrap();
            assert!(m.tokens_per_second > 0.0 && m.seconds > 0.0, "{path:?}");
        }
    }

    #[test]
    fn a_small_measurement_runs() {
        let m = measure(ForwardPath::IncrementalBatched, 300, 2, &cpu_paper()).unwrap();
        assert_eq!(m.documents, 2);
        assert!(m.tokens_per_second > 0.0 && m.peak_rss >= m.base_rss);
        // 300 tokens in sentences of 20, 23, 27, 31, 34... : 12 sentences, 4 gists each.
        assert_eq!(m.state_bytes, 2 * 12 * 4 * 4 * 2 * 2 * 64 * 4);
    }
}
