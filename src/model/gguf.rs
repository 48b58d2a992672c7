//! GGUF files (llama.cpp's format) as a model source: one file carries the config, the
//! tokenizer, the chat template and the weights.
//!
//! - Config from the `llama.*` metadata; other architectures are refused by name.
//! - Tokenizer: the byte-level BPE of `tokenizer.ggml.*` (tokens, merges, token types,
//!   the pre-tokenizer named by `tokenizer.ggml.pre`) rebuilt as a `tokenizers` JSON.
//! - Weights: GGUF names mapped to HF's; llama.cpp's converter permutes the rows of Q and
//!   K for its RoPE layout, and that permutation is undone here (in the quantized bytes
//!   too: a row of a quantized matrix is whole blocks), so keys are in HF's order in both
//!   weight modes.
//! - [`Weights::Dequantized`] expands every matrix to the compute dtype (training, exact
//!   comparisons, prefill speed); [`Weights::Quantized`] keeps the stored blocks (Q4_1
//!   through our AVX2 kernel, others through candle's quantized matmul): a quarter of the
//!   memory, faster decode.

use super::config::LlamaFileConfig;
use super::llama::{BlockWeights, Embedding, Linear};
use anyhow::{bail, ensure, Context};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;

/// How a GGUF file's matrices are held in memory. The default is chosen by measurement
/// (README, "GGUF files"): dequantized computes exactly what the file's weights say and
/// runs prefill (many tokens per forward: ingestion, compress, re-index) up to 2.4x
/// faster; quantized takes a quarter of the memory and decodes 2x faster, but rounds every
/// row of activations to 8 bits.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Weights {
    /// Expanded to the compute dtype.
    #[default]
    Dequantized,
    /// The stored blocks, multiplied by candle's quantized matmul.
    Quantized,
}

/// Quantization types whose blocks candle multiplies on the CPU.
const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

/// An open GGUF file.
pub struct Gguf {
    content: Content,
    file: std::fs::File,
    path: std::path::PathBuf,
}

/// Whether `path` names a GGUF file (by its magic, whatever its extension).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

impl Gguf {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = Content::read(&mut file)
            .with_context(|| format!("reading the GGUF header of {}", path.display()))?;
        let g = Self {
            content,
            file,
            path: path.to_path_buf(),
        };
        let arch = g.string("general.architecture")?;
        ensure!(
            arch == "llama",
            "{}: architecture {arch:?} is not supported (only llama)",
            path.display()
        );
        for (name, info) in &g.content.tensor_infos {
            ensure!(
                SUPPORTED.contains(&info.ggml_dtype),
                "{}: tensor {name} has quantization type {:?}, which is not supported",
                path.display(),
                info.ggml_dtype
            );
        }
        Ok(g)
    }

    fn value(&self, key: &str) -> anyhow::Result<&Value> {
        self.content
            .metadata
            .get(key)
            .with_context(|| format!("{}: no {key} in the GGUF metadata", self.path.display()))
    }

    fn string(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.value(key)?.to_string()?.clone())
    }

    fn u32(&self, key: &str) -> anyhow::Result<u32> {
        let v = self.value(key)?;
        Ok(match v {
            Value::U64(x) => *x as u32,
            Value::I64(x) => *x as u32,
            Value::I32(x) => *x as u32,
            _ => v.to_u32()?,
        })
    }

    fn f32(&self, key: &str) -> anyhow::Result<f32> {
        let v = self.value(key)?;
        Ok(match v {
            Value::F64(x) => *x as f32,
            _ => v.to_f32()?,
        })
    }

    fn opt_u32(&self, key: &str) -> anyhow::Result<Option<u32>> {
        if self.content.metadata.contains_key(key) {
            Ok(Some(self.u32(key)?))
        } else {
            Ok(None)
        }
    }

    fn strings(&self, key: &str) -> anyhow::Result<Vec<String>> {
        self.value(key)?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect()
    }

    /// The model's `config.json`, as an HF checkpoint would write it.
    pub fn config_json(&self) -> anyhow::Result<serde_json::Value> {
        let heads = self.u32("llama.attention.head_count")?;
        let hidden = self.u32("llama.embedding_length")?;
        let vocab = match self.opt_u32("llama.vocab_size")? {
            Some(v) => v as usize,
            None => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = self
            .opt_u32("llama.rope.dimension_count")?
            .unwrap_or(hidden / heads.max(1));
        ensure!(
            !self
                .content
                .metadata
                .contains_key("llama.rope.scaling.type"),
            "{}: RoPE scaling in GGUF metadata is not supported yet",
            self.path.display()
        );
        Ok(serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": hidden,
            "intermediate_size": self.u32("llama.feed_forward_length")?,
            "vocab_size": vocab,
            "num_hidden_layers": self.u32("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.opt_u32("llama.attention.head_count_kv")?.unwrap_or(heads),
            "head_dim": head_dim,
            "rms_norm_eps": self.f32("llama.attention.layer_norm_rms_epsilon")?,
            "rope_theta": self.opt_f32("llama.rope.freq_base")?.unwrap_or(10_000.0),
            "max_position_embeddings": self.opt_u32("llama.context_length")?,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "bos_token_id": self.opt_u32("tokenizer.ggml.bos_token_id")?,
            "eos_token_id": self.opt_u32("tokenizer.ggml.eos_token_id")?,
            "hidden_act": "silu",
        }))
    }

    fn opt_f32(&self, key: &str) -> anyhow::Result<Option<f32>> {
        if self.content.metadata.contains_key(key) {
            Ok(Some(self.f32(key)?))
        } else {
            Ok(None)
        }
    }

    /// The context length the model was trained for, when the file says.
    pub fn context_length(&self) -> anyhow::Result<Option<u32>> {
        self.opt_u32("llama.context_length")
    }

    /// The tokenizer as a `tokenizer.json` document.
    pub fn tokenizer_json(&self) -> anyhow::Result<serde_json::Value> {
        let model = self.string("tokenizer.ggml.model")?;
        ensure!(
            model == "gpt2",
            "{}: tokenizer.ggml.model {model:?} is not supported (only gpt2, byte-level BPE)",
            self.path.display()
        );
        let pre = self
            .string("tokenizer.ggml.pre")
            .unwrap_or_else(|_| "default".into());
        // What llama.cpp's pre-tokenizer of that name does, in `tokenizers` terms.
        let byte_level = |use_regex: bool| {
            serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": true, "use_regex": use_regex})
        };
        let pre_tokenizer = match pre.as_str() {
            "default" | "gpt-2" | "gpt2" => byte_level(true),
            // SmolLM: every digit its own piece, then GPT-2's split.
            "smollm" => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "llama3" | "llama-v3" | "llama-bpe" => serde_json::json!({"type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT},
                     "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
            other => bail!(
                "{}: tokenizer.ggml.pre {other:?} is not supported (smollm, gpt-2, llama-bpe)",
                self.path.display()
            ),
        };
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self.strings("tokenizer.ggml.merges")?;
        let types: Vec<i64> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| Ok(t.to_i32()? as i64))
                .collect::<anyhow::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        ensure!(
            types.len() == tokens.len(),
            "{}: {} token types for {} tokens",
            self.path.display(),
            types.len(),
            tokens.len()
        );
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), serde_json::json!(i)))
            .collect();
        // Type 3 (control) tokens are special: matched whole, never split by BPE.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| ty == 3)
            .map(|(i, (t, _))| {
                serde_json::json!({"id": i, "content": t, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        Ok(serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges},
        }))
    }

    /// Whether the file asks for BOS at the start of a text (`tokenizer.ggml.add_bos_token`;
    /// absent: yes, llama.cpp's default).
    pub fn add_bos(&self) -> bool {
        match self.content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().unwrap_or(true),
            None => true,
        }
    }

    /// The chat template and the BOS/EOS strings it refers to.
    pub fn chat_template(&self) -> anyhow::Result<Option<(String, String, String)>> {
        let Ok(source) = self.string("tokenizer.chat_template") else {
            return Ok(None);
        };
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let name = |key: &str| -> anyhow::Result<String> {
            Ok(self
                .opt_u32(key)?
                .and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default())
        };
        Ok(Some((
            source,
            name("tokenizer.ggml.bos_token_id")?,
            name("tokenizer.ggml.eos_token_id")?,
        )))
    }

    fn qtensor(&mut self, name: &str) -> anyhow::Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .with_context(|| format!("{}: reading tensor {name}", self.path.display()))
    }

    /// Weights for [`super::llama::Llama::from_weights`]: the embedding (with `extra` rows
    /// at the mean of the stored ones, for gist tokens), the layers, the final norm and an
    /// untied head if the file has one.
    pub fn weights(
        &mut self,
        cfg: &super::config::Config,
        extra: usize,
        mode: Weights,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<(Embedding, Vec<BlockWeights>, Tensor, Option<Linear>)> {
        ensure!(
            device.is_cpu() || mode == Weights::Dequantized,
            "quantized GGUF weights run on the CPU only: use --weights dequantized on a GPU"
        );
        let dense = |q: &QTensor| -> anyhow::Result<Tensor> {
            Ok(q.dequantize(&Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?)
        };
        let embed = self.qtensor("token_embd.weight")?;
        let embedding = match mode {
            Weights::Dequantized => {
                Embedding::Dense(super::llama::extend_rows_with_mean(&dense(&embed)?, extra)?)
            }
            Weights::Quantized => {
                let extra_rows = if extra == 0 {
                    None
                } else {
                    let mean = mean_row(&embed)?.to_dtype(dtype)?.to_device(device)?;
                    Some(mean.broadcast_as((extra, mean.dim(1)?))?.contiguous()?)
                };
                Embedding::Quantized {
                    table: Arc::new(embed),
                    extra: extra_rows,
                }
            }
        };
        let linear = |q: QTensor| -> anyhow::Result<Linear> {
            Ok(match mode {
                Weights::Dequantized => Linear::Dense(dense(&q)?),
                Weights::Quantized if q.dtype() == GgmlDType::Q4_1 => {
                    let (rows, cols) = q.shape().dims2()?;
                    Linear::Q41(super::q4_1::Q41Matrix::new(
                        rows,
                        cols,
                        q.data()?.into_owned(),
                    )?)
                }
                Weights::Quantized => Linear::Quantized(QMatMul::from_qtensor(q)?),
            })
        };
        let (d, heads, kv_heads) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut t = |n: &str| self.qtensor(&format!("blk.{i}.{n}.weight"));
            let q = unpermute_rows(t("attn_q")?, heads, d)?;
            let k = unpermute_rows(t("attn_k")?, kv_heads, d)?;
            layers.push(BlockWeights {
                input_layernorm: dense(&t("attn_norm")?)?,
                q_proj: linear(q)?,
                k_proj: linear(k)?,
                v_proj: linear(t("attn_v")?)?,
                o_proj: linear(t("attn_output")?)?,
                post_attention_layernorm: dense(&t("ffn_norm")?)?,
                gate_proj: linear(t("ffn_gate")?)?,
                up_proj: linear(t("ffn_up")?)?,
                down_proj: linear(t("ffn_down")?)?,
            });
        }
        let norm = dense(&self.qtensor("output_norm.weight")?)?;
        let head = if self.content.tensor_infos.contains_key("output.weight") {
            let w = self.qtensor("output.weight")?;
            Some(match (mode, extra) {
                (Weights::Quantized, 0) => linear(w)?,
                // Gist rows appended: the head is expanded to hold them.
                _ => Linear::Dense(super::llama::extend_rows_with_mean(&dense(&w)?, extra)?),
            })
        } else {
            None
        };
        Ok((embedding, layers, norm, head))
    }
}

/// The mean row (1, H) of a quantized table, in f32, read a few thousand rows at a time
/// (the whole table in f32 would be several times the file).
fn mean_row(table: &QTensor) -> anyhow::Result<Tensor> {
    let (rows, _) = table.shape().dims2()?;
    let mut sum: Option<Tensor> = None;
    for start in (0..rows).step_by(4096) {
        let ids: Vec<u32> = (start as u32..(start + 4096).min(rows) as u32).collect();
        let part = table
            .embedding(&Tensor::new(ids, &Device::Cpu)?)?
            .to_dtype(DType::F32)?
            .sum_keepdim(0)?;
        sum = Some(match sum {
            Some(s) => (s + part)?,
            None => part,
        });
    }
    Ok((sum.context("an empty embedding table")? / rows as f64)?)
}

/// Llama-3's pre-tokenizer split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The row order llama.cpp's converter gives Q or K (`heads` heads of `head_dim` rows): HF
/// row `h·D + j·D/2 + i` is stored at `h·D + 2i + j`. Returns, for each HF row, its stored
/// row.
pub fn stored_row_of(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..heads * head_dim)
        .map(|r| {
            let (h, rest) = (r / head_dim, r % head_dim);
            let (j, i) = (rest / half, rest % half);
            h * head_dim + 2 * i + j
        })
        .collect()
}

/// `q` with its rows back in HF's order (whole rows of blocks moved, nothing requantized).
fn unpermute_rows(q: QTensor, heads: usize, head_dim: usize) -> anyhow::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    ensure!(
        rows == heads * head_dim,
        "a Q/K matrix has {rows} rows, expected {heads} heads x {head_dim}"
    );
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    ensure!(
        data.len() == rows * row_bytes,
        "a Q/K matrix of {rows} x {cols} {dtype:?} holds {} bytes",
        data.len()
    );
    let mut out = Vec::with_capacity(data.len());
    for src in stored_row_of(heads, head_dim) {
        out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// The parsed `config.json` equivalent of a GGUF file.
pub fn file_config(g: &Gguf) -> anyhow::Result<(Vec<u8>, LlamaFileConfig)> {
    let json = serde_json::to_vec(&g.config_json()?)?;
    let cfg = serde_json::from_slice(&json)?;
    Ok((json, cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_permutation_is_llama_cpps_inverse() {
        // llama.cpp: view (heads, 2, D/2) -> swap the last two axes -> flatten.
        let (heads, d) = (3, 8);
        let hf: Vec<usize> = (0..heads * d).collect();
        let mut stored = vec![0; heads * d];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    stored[h * d + i * 2 + j] = hf[h * d + j * d / 2 + i];
                }
            }
        }
        let back: Vec<usize> = stored_row_of(heads, d).iter().map(|&s| stored[s]).collect();
        assert_eq!(back, hf);
    }
}
