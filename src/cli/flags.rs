//! Flags several commands share: which model, on which device, at which precision.

use crate::model::device::{parse_device, parse_dtype};
use crate::model::{GistModel, LoadOptions};
use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;
use std::path::PathBuf;

/// Which model to load, where, and at what precision.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// HF-format model directory (config.json, model.safetensors or a sharded index,
    /// tokenizer.json, and gist.json for a gist checkpoint), a GGUF file, a gist adapter
    /// folder (adapter.json; its base GGUF is found by name and checked by hash), or a
    /// model shipped under `models/` by name (`smollm2-gist`: SmolLM2-135M-Instruct with
    /// the project's gist adapter, after scripts/get-smollm2.sh). Default: the project's
    /// own small model, embedded in the binary.
    #[arg(long, value_name = "DIR|FILE")]
    pub model: Option<PathBuf>,
    /// A GGUF model's matrices: `dequantized` (expanded to --dtype: exact, faster prefill)
    /// or `quantized` (its stored blocks: a quarter of the memory, faster decode,
    /// activations rounded to 8 bits).
    #[arg(long, value_enum, default_value = "dequantized")]
    pub weights: crate::model::gguf::Weights,
    /// Device: `cpu`, or `cuda`/`cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision: f32, bf16 or f16 (weights are converted on load).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Gist tokens per sentence (N_g) when the checkpoint has no gist.json.
    #[arg(long, default_value_t = 4, value_parser = crate::model::config::parse_num_gists)]
    pub num_gists: usize,
}

impl ModelArgs {
    pub fn device(&self) -> anyhow::Result<Device> {
        parse_device(&self.device)
    }

    pub fn dtype(&self) -> anyhow::Result<DType> {
        parse_dtype(&self.dtype)
    }

    pub fn load(&self) -> anyhow::Result<GistModel> {
        let opts = LoadOptions {
            num_gists: self.num_gists,
            weights: self.weights,
            ..LoadOptions::default()
        };
        let dir = match &self.model {
            Some(d) => d.clone(),
            None => crate::model::embedded::dir()?,
        };
        GistModel::load(&dir, &self.device()?, self.dtype()?, &opts)
            .with_context(|| format!("loading model {}", dir.display()))
    }
}

/// How an answer's tokens are picked (`query`, `reread`).
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

impl SamplingArgs {
    /// These settings, with the question wrapped in the chat template or not.
    pub fn sampling(&self, chat_template: bool) -> crate::query::Sampling {
        crate::query::Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            chat_template,
        }
    }
}
