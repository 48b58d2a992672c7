//! What a benchmark runs: the random model's shape (the paper-comparison shape, or
//! Llama-3.2-1B's), its token documents, and the FLOPs a path spends on them.

use super::ForwardPath;
use crate::model::random::{write_random_model, Init, RandomSpec, SplitMix};
use crate::text::segment::SegmentConfig;
use crate::text::tokenize::Segment;
use anyhow::{bail, Context};
use candle_core::DType;
use serde::{Deserialize, Serialize};

/// Sentence lengths (regular tokens) cycled through by benchmark documents.
pub const SENTENCE_LENGTHS: [usize; 5] = [20, 23, 27, 31, 34];

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
    /// SmolLM2-135M-Instruct: hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab
    /// 49152, tied embeddings, RoPE theta 100000, N_g 4, f32 weights: the budget of the
    /// gist fine-tuning on a CPU.
    #[value(name = "smollm2-135m")]
    #[serde(rename = "smollm2-135m")]
    Smollm2_135m,
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
            Shape::Smollm2_135m => RandomSpec {
                hidden: 576,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                intermediate: 1536,
                vocab: 49_152,
                rope_theta: 100_000.0,
                tie_embeddings: true,
                ..paper_shape()
            },
        }
    }
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
