//! The Llama forward, read top to bottom: ops → RoPE → the gist mask → attention → block →
//! [`Llama`].
//!
//! Why our own and not candle-transformers': gist compression needs a custom mask, a cache
//! that drops sentence tokens, per-token positions and logits for every row. Its layout:
//! the tokens of a forward are *flat*, `(N, hidden)` for all documents of a batch together,
//! so the projections and the MLP (most of the FLOPs) run as one matmul with no padding.
//! AttentionPlan is the one place documents differ, so it is delegated to an [`AttentionPlan`] plan
//! that splits the N rows into groups (a document's new sentence, or a block of sentences)
//! and gives each group the keys it may see. Three plans exist: plain causal and parallel
//! sentence attention ([`CausalPlan`], [`SentencePlan`], both here) and the incremental
//! gist cache (`crate::engine::state`).
//!
//! Two kinds of ops ([`Ops`]): candle's fused kernels (rms_norm, softmax, rope) are fast but
//! have no backward pass, so training uses composed ops that autograd can follow.
//!
//! Notation: N tokens in the forward, H hidden, Hq query heads, Hkv key/value heads,
//! G = Hq / Hkv, D head dim, V vocabulary, I intermediate, L a group's queries, S its keys.

use super::attention::AttentionPlan;
use super::config::Config;
use super::ops::{rms_norm, rope, rope_angles, Ops};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
// ---------------------------------------------------------------------------------------
// Blocks and the model
// ---------------------------------------------------------------------------------------

/// One decoder layer's weights, named as in the safetensors files.
struct Block {
    input_layernorm: Tensor,          // (H)
    q_proj: Tensor,                   // (Hq·D, H)
    k_proj: Tensor,                   // (Hkv·D, H)
    v_proj: Tensor,                   // (Hkv·D, H)
    o_proj: Tensor,                   // (H, Hq·D)
    post_attention_layernorm: Tensor, // (H)
    gate_proj: Tensor,                // (I, H)
    up_proj: Tensor,                  // (I, H)
    down_proj: Tensor,                // (H, I)
}

/// x (N, in) · Wᵀ where W is (out, in) as stored: (N, out).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.matmul(&w.t()?)
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, d, i) = (cfg.hidden, cfg.head_dim, cfg.intermediate);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: vb.get(h, "input_layernorm.weight")?,
            q_proj: attn.get((cfg.heads * d, h), "q_proj.weight")?,
            k_proj: attn.get((cfg.kv_heads * d, h), "k_proj.weight")?,
            v_proj: attn.get((cfg.kv_heads * d, h), "v_proj.weight")?,
            o_proj: attn.get((h, cfg.heads * d), "o_proj.weight")?,
            post_attention_layernorm: vb.get(h, "post_attention_layernorm.weight")?,
            gate_proj: mlp.get((i, h), "gate_proj.weight")?,
            up_proj: mlp.get((i, h), "up_proj.weight")?,
            down_proj: mlp.get((h, i), "down_proj.weight")?,
        })
    }

    /// Rotated keys and values of h (N, H): each (Hkv, N, D).
    fn kv(
        &self,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cfg: &Config,
        ops: Ops,
    ) -> Result<(Tensor, Tensor)> {
        let n = h.dim(0)?;
        let k = linear(h, &self.k_proj)?
            .reshape((n, cfg.kv_heads, cfg.head_dim))?
            .transpose(0, 1)?; // (Hkv, N, D)
        let v = linear(h, &self.v_proj)?
            .reshape((n, cfg.kv_heads, cfg.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        Ok((rope(&k, cos, sin, ops)?, v))
    }

    fn forward(
        &self,
        x: &Tensor, // (N, H)
        (cos, sin): (&Tensor, &Tensor),
        (layer, attn): (usize, &mut dyn AttentionPlan),
        cfg: &Config,
        ops: Ops,
    ) -> Result<Tensor> {
        let n = x.dim(0)?;
        let h = rms_norm(x, &self.input_layernorm, cfg.rms_eps, ops)?;
        let q = linear(&h, &self.q_proj)?
            .reshape((n, cfg.heads, cfg.head_dim))?
            .transpose(0, 1)?; // (Hq, N, D)
        let q = (rope(&q, cos, sin, ops)? * (1.0 / (cfg.head_dim as f64).sqrt()))?;
        let (k, v) = self.kv(&h, cos, sin, cfg, ops)?;
        let y = attn.attend(layer, &q, &k, &v)?; // (Hq, N, D)
        let y = y.transpose(0, 1)?.reshape((n, cfg.heads * cfg.head_dim))?;
        let x = (x + linear(&y, &self.o_proj)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, cfg.rms_eps, ops)?;
        let gate = linear(&h, &self.gate_proj)?.silu()?; // (N, I)
        let up = linear(&h, &self.up_proj)?;
        x + linear(&(gate * up)?, &self.down_proj)?
    }
}

/// Which rows of the final hidden state become logits.
#[derive(Debug, Clone)]
pub enum Logits {
    /// None: the last layer only computes keys and values (all a gist cache needs).
    Skip,
    All,
    /// These flat rows, (R,) u32.
    Rows(Tensor),
}

/// A Llama decoder.
pub struct Llama {
    pub cfg: Config,
    embed_tokens: Tensor, // (V, H)
    layers: Vec<Block>,
    norm: Tensor,     // (H)
    lm_head: Tensor,  // (V, H)
    inv_freq: Tensor, // (D/2) f32
}

impl Llama {
    /// Parameters, counting a tied embedding/head once.
    pub fn parameter_count(&self) -> usize {
        let block: usize = self
            .layers
            .iter()
            .map(|b| {
                [
                    &b.input_layernorm,
                    &b.q_proj,
                    &b.k_proj,
                    &b.v_proj,
                    &b.o_proj,
                    &b.post_attention_layernorm,
                    &b.gate_proj,
                    &b.up_proj,
                    &b.down_proj,
                ]
                .iter()
                .map(|t| t.elem_count())
                .sum::<usize>()
            })
            .sum();
        let head = if self.cfg.tie_embeddings {
            0
        } else {
            self.lm_head.elem_count()
        };
        self.embed_tokens.elem_count() + block + self.norm.elem_count() + head
    }

    /// Loads the weights. `file_vocab` is the number of embedding rows in the checkpoint;
    /// when `cfg.vocab` is larger (gist tokens added to a plain checkpoint), the new rows
    /// of the embedding and of the head start at the mean of the existing rows.
    pub fn load(vb: VarBuilder, cfg: Config, file_vocab: usize) -> Result<Self> {
        let h = cfg.hidden;
        let embed = vb.get((file_vocab, h), "model.embed_tokens.weight")?;
        let head = if cfg.tie_embeddings || !vb.contains_tensor("lm_head.weight") {
            embed.clone()
        } else {
            vb.get((file_vocab, h), "lm_head.weight")?
        };
        let layers = (0..cfg.layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = vb.get(h, "model.norm.weight")?;
        let extra = cfg.vocab.saturating_sub(file_vocab);
        let embed_tokens = extend_rows_with_mean(&embed, extra)?;
        let lm_head = extend_rows_with_mean(&head, extra)?;
        let inv_freq = Tensor::new(cfg.inv_freq.as_slice(), vb.device())?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// The forward over N flat tokens. `ids` (N,) u32; `positions` one per token (absolute
    /// index in the gist-augmented document). Returns logits (R, V) unless `logits` is Skip.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &[u32],
        attn: &mut dyn AttentionPlan,
        ops: Ops,
        logits: &Logits,
    ) -> Result<Option<Tensor>> {
        let (cos, sin) = rope_angles(positions, &self.inv_freq, self.dtype())?; // (N, D/2)
        let mut x = self.embed_tokens.index_select(ids, 0)?; // (N, H)
        let last = self.layers.len().saturating_sub(1);
        for (i, block) in self.layers.iter().enumerate() {
            if i == last && matches!(logits, Logits::Skip) {
                let h = rms_norm(&x, &block.input_layernorm, self.cfg.rms_eps, ops)?;
                let (k, v) = block.kv(&h, &cos, &sin, &self.cfg, ops)?;
                attn.store(i, &k, &v)?;
                return Ok(None);
            }
            x = block.forward(&x, (&cos, &sin), (i, &mut *attn), &self.cfg, ops)?;
        }
        let x = match logits {
            Logits::Skip => return Ok(None), // no layers at all
            Logits::All => x,
            Logits::Rows(rows) => x.index_select(rows, 0)?,
        };
        let x = rms_norm(&x, &self.norm, self.cfg.rms_eps, ops)?;
        Ok(Some(linear(&x, &self.lm_head)?)) // (R, V)
    }
}

/// Appends `extra` rows, each the mean of the existing rows (how the reference code
/// initialises gist embeddings).
fn extend_rows_with_mean(w: &Tensor, extra: usize) -> Result<Tensor> {
    if extra == 0 {
        return Ok(w.clone());
    }
    let mean = w
        .to_dtype(DType::F32)?
        .mean_keepdim(0)?
        .to_dtype(w.dtype())?; // (1, H)
    let rows = mean.broadcast_as((extra, w.dim(1)?))?;
    Tensor::cat(&[w, &rows.contiguous()?], 0)
}
