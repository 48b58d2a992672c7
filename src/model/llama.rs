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
use super::ops::{rms_norm, rope_angles, rope_heads, Ops};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::Module;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;
// ---------------------------------------------------------------------------------------
// Blocks and the model
// ---------------------------------------------------------------------------------------

/// A projection's weight W (out, in): dense, or llama.cpp's quantized blocks (a GGUF file
/// read without dequantizing), multiplied by candle's quantized matmul.
pub enum Linear {
    Dense(Tensor),
    Quantized(QMatMul),
    /// Q4_1 blocks through our AVX2 kernel (candle's Q4_1 matmul is scalar).
    Q41(super::q4_1::Q41Matrix),
    /// f32 packed once for our AVX2 kernel (inference only: no autograd through it).
    Packed(super::packed::PackedMatrix),
    /// A frozen f32 weight that autograd passes through to the input only (a base under
    /// adapter training).
    Frozen(Arc<super::packed::Frozen>),
    /// A base projection plus a low-rank adapter (see [`super::adapter`]).
    Adapted(Box<Adapted>),
}

/// x · Wᵀ + scale · (x · Aᵀ) · Bᵀ: LoRA on any base projection (dense, frozen, packed or
/// quantized: the QLoRA arrangement when the base is quantized).
pub struct Adapted {
    pub base: Linear,
    pub a: Tensor, // (r, in)
    pub b: Tensor, // (out, r)
    pub scale: f64,
}

impl Linear {
    /// x (N, in) · Wᵀ: (N, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            // A trainable (or not yet packed) weight: the packed kernel with its own
            // backward where it runs, whatever the row count, so that a row's bits never
            // depend on how many rows share the call.
            Linear::Dense(w) if super::packed::linear_fits(x, w) => super::packed::linear(x, w),
            Linear::Dense(w) => x.matmul(&w.t()?),
            Linear::Quantized(q) => q.forward(x),
            Linear::Q41(q) => q.forward(x),
            Linear::Packed(p) => p.forward(x),
            Linear::Frozen(f) => f.forward(x),
            // Training (a frozen f32 base): the whole adapted projection as one node.
            Linear::Adapted(ad) if matches!(ad.base, Linear::Frozen(_)) && x.rank() == 2 => {
                let Linear::Frozen(f) = &ad.base else {
                    unreachable!("matched just above")
                };
                f.forward_adapted(x, &ad.a, &ad.b, ad.scale)
            }
            Linear::Adapted(ad) => {
                let low = x.matmul(&ad.a.t()?)?.matmul(&ad.b.t()?)?; // (N, out)
                ad.base.forward(x)? + (low * ad.scale)?
            }
        }
    }

    /// Packs a dense f32 CPU weight in place for [`Linear::Packed`]; anything else is
    /// left as it is.
    fn pack(&mut self) -> Result<()> {
        if let Linear::Adapted(ad) = self {
            return ad.base.pack();
        }
        if let Linear::Dense(w) = self {
            if w.device().is_cpu()
                && w.dtype() == DType::F32
                && super::packed::PackedMatrix::supported()
            {
                *self = Linear::Packed(super::packed::PackedMatrix::new(w)?);
            }
        }
        Ok(())
    }

    fn elem_count(&self) -> usize {
        match self {
            Linear::Dense(w) => w.elem_count(),
            Linear::Quantized(QMatMul::QTensor(q)) => q.shape().elem_count(),
            Linear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.elem_count(),
            Linear::Q41(q) => q.shape().0 * q.shape().1,
            Linear::Packed(p) => p.shape().0 * p.shape().1,
            Linear::Frozen(f) => f.shape().0 * f.shape().1,
            Linear::Adapted(ad) => ad.base.elem_count() + ad.a.elem_count() + ad.b.elem_count(),
        }
    }

    /// A dense f32 CPU weight becomes [`Linear::Frozen`] (autograd reaches the input, never
    /// the weight); anything else is left as it is.
    pub fn freeze(&mut self) -> Result<()> {
        if let Linear::Dense(w) = self {
            if w.device().is_cpu()
                && w.dtype() == DType::F32
                && super::packed::PackedMatrix::supported()
            {
                *self = Linear::Frozen(Arc::new(super::packed::Frozen::new(&w.detach())?));
            }
        }
        Ok(())
    }

    /// Puts a low-rank adapter on this projection.
    pub fn adapt(&mut self, a: Tensor, b: Tensor, scale: f64) {
        let base = std::mem::replace(
            self,
            Linear::Dense(Tensor::zeros(0, DType::F32, &Device::Cpu).expect("an empty tensor")),
        );
        *self = Linear::Adapted(Box::new(Adapted { base, a, b, scale }));
    }
}

/// The token embedding (V, H), its rows also the tied head's: dense, or quantized (looked
/// up row by row without dequantizing the table). Gist tokens added to a plain checkpoint
/// are `extra` rows after the stored ones.
pub enum Embedding {
    Dense(Tensor),
    Quantized {
        table: Arc<QTensor>,
        extra: Option<Tensor>,
    },
    /// Adapter training: the stored rows frozen (and, tied, packed both ways as the head),
    /// the gist rows `extra` trained.
    Split {
        table: Tensor,
        head: Arc<super::packed::Frozen>,
        extra: Tensor,
    },
}

impl Embedding {
    /// Rows of `ids` (N,): (N, H).
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let (stored, extra) = match self {
            Embedding::Dense(w) => return w.index_select(ids, 0),
            Embedding::Quantized { table, extra: None } => return table.embedding(ids),
            Embedding::Quantized {
                table,
                extra: Some(e),
            } => (table.shape().dims()[0], e),
            Embedding::Split { table, extra, .. } => (table.dim(0)?, extra),
        };
        // Stored rows through the table, gist rows from `extra`.
        let stored = stored as u32;
        let host = ids.to_vec1::<u32>()?;
        let base: Vec<u32> = host.iter().map(|&i| i.min(stored - 1)).collect();
        let added: Vec<u32> = host.iter().map(|&i| i.saturating_sub(stored)).collect();
        let is_added: Vec<u8> = host.iter().map(|&i| u8::from(i >= stored)).collect();
        let dev = ids.device();
        let base = Tensor::new(base, dev)?;
        let x = match self {
            Embedding::Quantized { table, .. } => table.embedding(&base)?,
            Embedding::Split { table, .. } => table.index_select(&base, 0)?,
            Embedding::Dense(_) => unreachable!("returned above"),
        };
        let y = extra.index_select(&Tensor::new(added, dev)?, 0)?;
        let n = host.len();
        Tensor::new(is_added, dev)?
            .reshape((n, 1))?
            .broadcast_as(x.shape())?
            .where_cond(&y, &x)
    }

    fn elem_count(&self) -> usize {
        match self {
            Embedding::Dense(w) => w.elem_count(),
            Embedding::Quantized { table, extra } => {
                table.shape().elem_count() + extra.as_ref().map_or(0, |e| e.elem_count())
            }
            Embedding::Split { table, extra, .. } => table.elem_count() + extra.elem_count(),
        }
    }
}

/// The weights of one decoder layer.
pub struct BlockWeights {
    pub input_layernorm: Tensor,          // (H)
    pub q_proj: Linear,                   // (Hq·D, H)
    pub k_proj: Linear,                   // (Hkv·D, H)
    pub v_proj: Linear,                   // (Hkv·D, H)
    pub o_proj: Linear,                   // (H, Hq·D)
    pub post_attention_layernorm: Tensor, // (H)
    pub gate_proj: Linear,                // (I, H)
    pub up_proj: Linear,                  // (I, H)
    pub down_proj: Linear,                // (H, I)
}

/// One decoder layer.
struct Block(BlockWeights);

impl std::ops::Deref for Block {
    type Target = BlockWeights;
    fn deref(&self) -> &BlockWeights {
        &self.0
    }
}

fn linear(x: &Tensor, w: &Linear) -> Result<Tensor> {
    w.forward(x)
}

impl Block {
    /// Dense weights named as in HF safetensors files.
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (h, d, i) = (cfg.hidden, cfg.head_dim, cfg.intermediate);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        let dense = |vb: &VarBuilder, shape: (usize, usize), name: &str| -> Result<Linear> {
            Ok(Linear::Dense(vb.get(shape, name)?))
        };
        Ok(Self(BlockWeights {
            input_layernorm: vb.get(h, "input_layernorm.weight")?,
            q_proj: dense(&attn, (cfg.heads * d, h), "q_proj.weight")?,
            k_proj: dense(&attn, (cfg.kv_heads * d, h), "k_proj.weight")?,
            v_proj: dense(&attn, (cfg.kv_heads * d, h), "v_proj.weight")?,
            o_proj: dense(&attn, (h, cfg.heads * d), "o_proj.weight")?,
            post_attention_layernorm: vb.get(h, "post_attention_layernorm.weight")?,
            gate_proj: dense(&mlp, (i, h), "gate_proj.weight")?,
            up_proj: dense(&mlp, (i, h), "up_proj.weight")?,
            down_proj: dense(&mlp, (h, i), "down_proj.weight")?,
        }))
    }

    /// Rotated keys and values of h (N, H): k (Hkv, N, D), or (Hkv, (1 + E)N, D) with E
    /// `more` angle sets (the compressed position scheme's further copies of every key,
    /// rotated where the token is stored, and where the next segment reads it; see
    /// [`Angles`]); v (Hkv, N, D).
    fn kv(&self, h: &Tensor, rot: &Angles, cfg: &Config, ops: Ops) -> Result<(Tensor, Tensor)> {
        let n = h.dim(0)?;
        let k = linear(h, &self.k_proj)?; // (N, Hkv·D)
        let v = linear(h, &self.v_proj)?
            .reshape((n, cfg.kv_heads, cfg.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let written = rope_heads(&k, cfg.kv_heads, &rot.cos, &rot.sin, 1.0, ops)?; // (Hkv, N, D)
        let k = if rot.more.is_empty() {
            written
        } else {
            let mut copies = vec![written];
            for (cos, sin) in &rot.more {
                copies.push(rope_heads(&k, cfg.kv_heads, cos, sin, 1.0, ops)?);
            }
            Tensor::cat(&copies, 1)?
        };
        Ok((k, v))
    }

    fn forward(
        &self,
        x: &Tensor, // (N, H)
        rot: &Angles,
        (layer, attn): (usize, &mut dyn AttentionPlan),
        cfg: &Config,
        ops: Ops,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.input_layernorm, cfg.rms_eps, ops)?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let q = rope_heads(
            &linear(&h, &self.q_proj)?,
            cfg.heads,
            &rot.cos,
            &rot.sin,
            scale,
            ops,
        )?; // (Hq, N, D)
        let (k, v) = self.kv(&h, rot, cfg, ops)?;
        let y = attn.attend_rows(layer, &q, &k, &v)?; // (N, Hq·D)
        let x = (x + linear(&y, &self.o_proj)?)?;
        let h = rms_norm(&x, &self.post_attention_layernorm, cfg.rms_eps, ops)?;
        let gate = linear(&h, &self.gate_proj)?; // (N, I)
        let up = linear(&h, &self.up_proj)?;
        let act = match ops {
            Ops::Fused => super::swiglu::silu_mul(gate, &up)?,
            Ops::Differentiable => super::swiglu::silu_mul_trainable(&gate, &up)?,
        };
        x + linear(&act, &self.down_proj)?
    }
}

/// RoPE angles of a forward's tokens, each (N, D/2): where each token is written (its
/// queries and the keys its own sentence reads), and, in the compressed position scheme's
/// parallel path, `more`: where it is stored (the keys later sentences read: a gist
/// written after its sentence is stored right after the earlier gists), then, with
/// `previous_sentence_visible`, where the next sentence reads it.
struct Angles {
    cos: Tensor,
    sin: Tensor,
    more: Vec<(Tensor, Tensor)>,
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
    embed_tokens: Embedding, // (V, H)
    layers: Vec<Block>,
    norm: Tensor, // (H)
    /// (V, H); None: tied to the embedding.
    lm_head: Option<Linear>,
    inv_freq: Tensor, // (D/2) f32
    device: Device,
    dtype: DType,
}

impl Llama {
    /// Parameters, counting a tied embedding/head once.
    pub fn parameter_count(&self) -> usize {
        let block: usize = self
            .layers
            .iter()
            .map(|b| {
                b.input_layernorm.elem_count()
                    + b.post_attention_layernorm.elem_count()
                    + [
                        &b.q_proj,
                        &b.k_proj,
                        &b.v_proj,
                        &b.o_proj,
                        &b.gate_proj,
                        &b.up_proj,
                        &b.down_proj,
                    ]
                    .iter()
                    .map(|w| w.elem_count())
                    .sum::<usize>()
            })
            .sum();
        let head = self.lm_head.as_ref().map_or(0, Linear::elem_count);
        self.embed_tokens.elem_count() + block + self.norm.elem_count() + head
    }

    /// Loads the weights. `file_vocab` is the number of embedding rows in the checkpoint;
    /// when `cfg.vocab` is larger (gist tokens added to a plain checkpoint), the new rows
    /// of the embedding and of the head start at the mean of the existing rows.
    pub fn load(vb: VarBuilder, cfg: Config, file_vocab: usize) -> Result<Self> {
        let h = cfg.hidden;
        let embed = vb.get((file_vocab, h), "model.embed_tokens.weight")?;
        let head = if cfg.tie_embeddings || !vb.contains_tensor("lm_head.weight") {
            None
        } else {
            Some(vb.get((file_vocab, h), "lm_head.weight")?)
        };
        let layers = (0..cfg.layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = vb.get(h, "model.norm.weight")?;
        let extra = cfg.vocab.saturating_sub(file_vocab);
        let embed_tokens = Embedding::Dense(extend_rows_with_mean(&embed, extra)?);
        let lm_head = match head {
            Some(w) => Some(Linear::Dense(extend_rows_with_mean(&w, extra)?)),
            None => None,
        };
        Self::from_weights(
            cfg,
            embed_tokens,
            layers.into_iter().map(|b| b.0).collect(),
            norm,
            lm_head,
        )
    }

    /// A model from weights read elsewhere (a GGUF file). `lm_head` None: tied to the
    /// embedding.
    pub fn from_weights(
        cfg: Config,
        embed_tokens: Embedding,
        layers: Vec<BlockWeights>,
        norm: Tensor,
        lm_head: Option<Linear>,
    ) -> Result<Self> {
        let (device, dtype) = (norm.device().clone(), norm.dtype());
        let inv_freq = Tensor::new(cfg.inv_freq.as_slice(), &device)?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers: layers.into_iter().map(Block).collect(),
            norm,
            lm_head,
            inv_freq,
            device,
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Packs every dense f32 projection for the CPU kernel (see [`super::packed`]): done
    /// once when a model is loaded for inference. Never for a model being trained, whose
    /// weights change under autograd.
    pub fn pack_for_inference(&mut self) -> Result<()> {
        for b in &mut self.layers {
            let w = &mut b.0;
            for l in [
                &mut w.q_proj,
                &mut w.k_proj,
                &mut w.v_proj,
                &mut w.o_proj,
                &mut w.gate_proj,
                &mut w.up_proj,
                &mut w.down_proj,
            ] {
                l.pack()?;
            }
        }
        if let Some(h) = &mut self.lm_head {
            h.pack()?;
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every projection by layer and HF name (`q_proj`... `down_proj`).
    pub fn projections_mut(&mut self) -> Vec<(usize, &'static str, &mut Linear)> {
        let mut out = Vec::new();
        for (i, b) in self.layers.iter_mut().enumerate() {
            let w = &mut b.0;
            out.extend([
                (i, "q_proj", &mut w.q_proj),
                (i, "k_proj", &mut w.k_proj),
                (i, "v_proj", &mut w.v_proj),
                (i, "o_proj", &mut w.o_proj),
                (i, "gate_proj", &mut w.gate_proj),
                (i, "up_proj", &mut w.up_proj),
                (i, "down_proj", &mut w.down_proj),
            ]);
        }
        out
    }

    /// Freezes the base for adapter training: dense projections and an untied head become
    /// [`Linear::Frozen`], and a dense embedding splits into its frozen stored rows and its
    /// last `gist_rows` rows (see [`Self::set_gist_rows`]).
    pub fn freeze_base(&mut self, gist_rows: usize) -> Result<()> {
        for (_, _, l) in self.projections_mut() {
            l.freeze()?;
        }
        if let Some(h) = &mut self.lm_head {
            h.freeze()?;
        }
        if let Embedding::Dense(w) = &self.embed_tokens {
            if w.device().is_cpu() && w.dtype() == DType::F32 && self.lm_head.is_none() {
                let v = w.dim(0)?;
                let table = w.narrow(0, 0, v - gist_rows)?.detach().contiguous()?;
                let extra = w
                    .narrow(0, v - gist_rows, gist_rows)?
                    .detach()
                    .contiguous()?;
                let head = Arc::new(super::packed::Frozen::new(&table)?);
                self.embed_tokens = Embedding::Split { table, head, extra };
            }
        }
        Ok(())
    }

    /// The last `n` rows of the embedding (the gist tokens'), (n, H).
    pub fn gist_rows(&self, n: usize) -> Result<Tensor> {
        match &self.embed_tokens {
            Embedding::Dense(w) => w.narrow(0, w.dim(0)? - n, n),
            Embedding::Quantized { extra: Some(e), .. } | Embedding::Split { extra: e, .. } => {
                e.narrow(0, e.dim(0)? - n, n)
            }
            Embedding::Quantized { extra: None, .. } => {
                candle_core::bail!("the embedding has no gist rows")
            }
        }
    }

    /// Replaces the embedding's last rows (the gist tokens') by `rows` (n, H): a trained
    /// adapter's gist embeddings. A tied head reads the same rows.
    pub fn set_gist_rows(&mut self, rows: Tensor) -> Result<()> {
        let n = rows.dim(0)?;
        match &mut self.embed_tokens {
            Embedding::Dense(w) => {
                let v = w.dim(0)?;
                *w = Tensor::cat(&[&w.narrow(0, 0, v - n)?, &rows], 0)?;
            }
            Embedding::Quantized { extra, .. } => *extra = Some(rows),
            Embedding::Split { extra, .. } => *extra = rows,
        }
        Ok(())
    }

    /// Whether the projections run on quantized blocks.
    pub fn is_quantized(&self) -> bool {
        matches!(self.embed_tokens, Embedding::Quantized { .. })
    }

    /// RoPE inverse frequencies (D/2) f32: what re-rotates a stored key.
    pub fn inv_freq(&self) -> &Tensor {
        &self.inv_freq
    }

    /// The forward over N flat tokens. `ids` (N,) u32; `positions` one per token (where it
    /// sits for RoPE, see [`super::config::PositionScheme`]). Returns logits (R, V) unless
    /// `logits` is Skip.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &[u32],
        attn: &mut dyn AttentionPlan,
        ops: Ops,
        logits: &Logits,
    ) -> Result<Option<Tensor>> {
        self.forward_stored(ids, positions, &[], attn, ops, logits)
    }

    /// [`Self::forward`] where each token also sits at E more positions (stored, and
    /// window): the plan then gets keys (Hkv, (1 + E)N, D), rows eN.. rotated at `more[e - 1]`.
    pub fn forward_stored(
        &self,
        ids: &Tensor,
        positions: &[u32],
        more: &[&[u32]],
        attn: &mut dyn AttentionPlan,
        ops: Ops,
        logits: &Logits,
    ) -> Result<Option<Tensor>> {
        let (cos, sin) = rope_angles(positions, &self.inv_freq, self.dtype())?; // (N, D/2)
        let more = more
            .iter()
            .map(|p| rope_angles(p, &self.inv_freq, self.dtype()))
            .collect::<Result<Vec<_>>>()?;
        let rot = Angles { cos, sin, more };
        let mut x = self.embed_tokens.lookup(ids)?; // (N, H)
        let last = self.layers.len().saturating_sub(1);
        for (i, block) in self.layers.iter().enumerate() {
            if i == last && matches!(logits, Logits::Skip) {
                let h = rms_norm(&x, &block.input_layernorm, self.cfg.rms_eps, ops)?;
                let (k, v) = block.kv(&h, &rot, &self.cfg, ops)?;
                attn.store(i, &k, &v)?;
                return Ok(None);
            }
            x = block.forward(&x, &rot, (i, &mut *attn), &self.cfg, ops)?;
        }
        let x = match logits {
            Logits::Skip => return Ok(None), // no layers at all
            Logits::All => x,
            Logits::Rows(rows) => x.index_select(rows, 0)?,
        };
        let x = rms_norm(&x, &self.norm, self.cfg.rms_eps, ops)?;
        let logits = match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.forward(&x)?,
            (None, Embedding::Dense(w)) => x.matmul(&w.t()?)?,
            (None, Embedding::Split { head, extra, .. }) => {
                Tensor::cat(&[&head.forward(&x)?, &x.matmul(&extra.t()?)?], 1)?
            }
            (None, Embedding::Quantized { table, extra }) => {
                let stored = QMatMul::from_arc(table.clone())?.forward(&x)?;
                match extra {
                    Some(e) => Tensor::cat(&[&stored, &x.matmul(&e.t()?)?], 1)?,
                    None => stored,
                }
            }
        };
        Ok(Some(logits)) // (R, V)
    }
}

/// Appends `extra` rows, each the mean of the existing rows (how the reference code
/// initialises gist embeddings).
pub(crate) fn extend_rows_with_mean(w: &Tensor, extra: usize) -> Result<Tensor> {
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
