//! The Llama forward, read top to bottom: ops → RoPE → the gist mask → attention → block →
//! [`Llama`].
//!
//! Why our own and not candle-transformers': gist compression needs a custom mask, a cache
//! that drops sentence tokens, per-token positions and logits for every row. Its layout:
//! the tokens of a forward are *flat*, `(N, hidden)` for all documents of a batch together,
//! so the projections and the MLP (most of the FLOPs) run as one matmul with no padding.
//! Attention is the one place documents differ, so it is delegated to an [`Attention`] plan
//! that splits the N rows into groups (a document's new sentence, or a block of sentences)
//! and gives each group the keys it may see. Three plans exist: plain causal and parallel
//! sentence attention ([`CausalPlan`], [`SentencePlan`], both here) and the incremental
//! gist cache (`crate::state`).
//!
//! Two kinds of ops ([`Ops`]): candle's fused kernels (rms_norm, softmax, rope) are fast but
//! have no backward pass, so training uses composed ops that autograd can follow.
//!
//! Notation: N tokens in the forward, H hidden, Hq query heads, Hkv key/value heads,
//! G = Hq / Hkv, D head dim, V vocabulary, I intermediate, L a group's queries, S its keys.

use super::config::Config;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use std::ops::Range;

/// Fused kernels (inference) or composed, differentiable ops (training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    Fused,
    Differentiable,
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fused => candle_nn::ops::rms_norm(x, w, eps as f32),
        Ops::Differentiable => candle_nn::ops::rms_norm_slow(x, w, eps as f32),
    }
}

fn softmax(x: &Tensor, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x),
        Ops::Differentiable => candle_nn::ops::softmax(x, D::Minus1),
    }
}

/// Rotates (heads, N, D) by per-token angles: cos/sin are (N, D/2). Non-interleaved halves,
/// as in transformers' `rotate_half`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, ops: Ops) -> Result<Tensor> {
    let x = x.unsqueeze(0)?; // (1, heads, N, D)
    let y = match ops {
        Ops::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
        Ops::Differentiable => candle_nn::rotary_emb::rope_slow(&x, cos, sin)?,
    };
    y.squeeze(0)
}

/// cos and sin of position × inverse frequency, each (N, D/2), in `dtype`. Computed in f32
/// like transformers, straight from the positions: no table, so no length limit.
pub fn rope_angles(positions: &[u32], inv_freq: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let n = positions.len();
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (n, 1), inv_freq.device())?; // (N, 1)
    let angles = pos.broadcast_mul(&inv_freq.unsqueeze(0)?)?; // (N, D/2)
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

// ---------------------------------------------------------------------------------------
// The gist mask
// ---------------------------------------------------------------------------------------

/// The sentence-attention rule, for one document's gist-augmented sequence. Token `i` may
/// see token `j` iff
///
/// ```text
///     j <= i  and  (segment[j] == segment[i]  or  kept[j])
/// ```
///
/// where a segment is one sentence followed by its gist group, and `kept[j]` marks gist
/// tokens (and BOS when the model keeps it visible). So a regular token sees its own
/// sentence so far and every earlier gist; a gist token sees its whole sentence, the gists
/// of its group before it, and every earlier gist. With one segment it is the causal mask.
///
/// `queries` and `keys` are token indices into the document; the result is the additive
/// mask, row-major (queries × keys): 0 where visible, -inf elsewhere. Callers build it per
/// block (queries of a few sentences against the earlier gists plus the block itself), so
/// memory grows with the block, never with the document squared.
pub fn sentence_mask(
    queries: &[usize],
    keys: &[usize],
    segment: &[u32],
    kept: &[bool],
) -> Vec<f32> {
    let mut mask = Vec::with_capacity(queries.len() * keys.len());
    for &i in queries {
        for &j in keys {
            let visible = j <= i && (segment[j] == segment[i] || kept[j]);
            mask.push(if visible { 0.0 } else { f32::NEG_INFINITY });
        }
    }
    mask
}

/// The (L, P + L) mask of L new tokens of one segment after P entries that are all visible
/// (kept gists, or earlier tokens of the same segment): causal within the new tokens. This
/// is [`sentence_mask`] for that case (tested below), without the index lists.
pub fn causal_mask(l: usize, prefix: usize) -> Vec<f32> {
    let s = prefix + l;
    let mut mask = vec![0.0f32; l * s];
    for i in 0..l {
        for j in prefix + i + 1..s {
            mask[i * s + j] = f32::NEG_INFINITY;
        }
    }
    mask
}

fn mask_tensor(
    mask: Vec<f32>,
    l: usize,
    s: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Tensor::from_vec(mask, (l, s), device)?.to_dtype(dtype)
}

/// The (L, P + L) mask of a block whose P prefix keys are all visible, from the block's own
/// (L, L) part: only the small part is kept between layers.
fn with_visible_prefix(inner: &Tensor, prefix: usize) -> Result<Tensor> {
    if prefix == 0 {
        return Ok(inner.clone());
    }
    let l = inner.dim(0)?;
    let zeros = Tensor::zeros((l, prefix), inner.dtype(), inner.device())?;
    Tensor::cat(&[&zeros, inner], 1)
}

// ---------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------

/// Attention of one group: L queries over the S keys the group may see, of which the
/// first S - L (kept gists, earlier tokens) are all visible and the last L are the group's
/// own, under `inner` (L, L) additive (None: all visible).
/// q (Hq, L, D), already scaled by 1/sqrt(D); k, v (Hkv, S, D), rows may be strided (a view
/// into a cache). Returns (Hq, L, D).
/// GQA without copying K/V per query head: the G query heads that share a key head are
/// stacked as rows, (Hkv, G·L, D) against (Hkv, S, D).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inner: Option<&Tensor>,
    ops: Ops,
) -> Result<Tensor> {
    let (hq, l, d) = q.dims3()?;
    let (hkv, s, _) = k.dims3()?;
    let g = hq / hkv;
    let q = q.contiguous()?.reshape((hkv, g * l, d))?;
    let mut scores = q.matmul(&k.t()?)?; // (Hkv, G·L, S)
    if let Some(m) = inner {
        let prefix = s - l;
        scores = match ops {
            // Mask only the last L columns, in place: the prefix needs no mask, and this
            // keeps the work O(L²) instead of O(L·S). No autograd through slice_set.
            Ops::Fused => {
                let own = scores
                    .narrow(2, prefix, l)?
                    .reshape((hkv, g, l, l))?
                    .broadcast_add(m)?
                    .reshape((hkv, g * l, l))?;
                scores.slice_set(&own, 2, prefix)?;
                scores
            }
            Ops::Differentiable => scores
                .reshape((hkv, g, l, s))?
                .broadcast_add(&with_visible_prefix(m, prefix)?)?
                .reshape((hkv, g * l, s))?,
        };
    }
    let probs = softmax(&scores, ops)?;
    probs.matmul(v)?.reshape((hq, l, d)) // (Hkv, G·L, D) -> (Hq, L, D)
}

/// How one forward's attention is grouped, and where each group's keys come from.
pub trait Attention {
    /// Attention for `layer`. q (Hq, N, D) scaled; k, v (Hkv, N, D): this forward's tokens,
    /// rotated. Returns (Hq, N, D).
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// The last layer when no logits are wanted: only its keys and values matter (they are
    /// what a cache keeps). Plans without a cache have nothing to do.
    fn store(&mut self, _layer: usize, _k: &Tensor, _v: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// Queries per block in the parallel plans: bounds the score matrix of a group.
pub const BLOCK: usize = 512;

/// Plain causal attention over documents laid out one after another in the flat batch:
/// query blocks of [`BLOCK`] tokens against every earlier token of their document.
pub struct CausalPlan {
    /// (document start row, block rows)
    blocks: Vec<(usize, Range<usize>)>,
    /// Causal (L, L) masks by block length (all blocks but a document's last share one).
    inner: std::collections::HashMap<usize, Tensor>,
    ops: Ops,
}

impl CausalPlan {
    /// `docs`: each document's row range in the flat batch.
    pub fn new(docs: &[Range<usize>], dtype: DType, device: &Device, ops: Ops) -> Result<Self> {
        let mut blocks = Vec::new();
        let mut inner = std::collections::HashMap::new();
        for doc in docs {
            let mut a = doc.start;
            while a < doc.end {
                let b = (a + BLOCK).min(doc.end);
                let l = b - a;
                if let std::collections::hash_map::Entry::Vacant(e) = inner.entry(l) {
                    e.insert(mask_tensor(causal_mask(l, 0), l, l, dtype, device)?);
                }
                blocks.push((doc.start, a..b));
                a = b;
            }
        }
        Ok(Self { blocks, inner, ops })
    }
}

impl Attention for CausalPlan {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.blocks.len());
        for (start, r) in &self.blocks {
            let qb = q.narrow(1, r.start, r.len())?;
            let kb = k.narrow(1, *start, r.end - start)?; // (Hkv, S, D), a view
            let vb = v.narrow(1, *start, r.end - start)?;
            outs.push(attend(
                &qb,
                &kb,
                &vb,
                Some(&self.inner[&r.len()]),
                self.ops,
            )?);
        }
        Tensor::cat(&outs, 1)
    }
}

/// One document of the parallel sentence-attention path, as flat rows.
#[derive(Debug, Clone)]
pub struct SentenceDoc {
    /// Rows of this document in the flat batch.
    pub rows: Range<usize>,
    /// Segment index of each token (sentence + its gist group).
    pub segment: Vec<u32>,
    /// Whether each token stays visible to all later segments (gists, BOS if configured).
    pub kept: Vec<bool>,
}

/// Parallel sentence attention, blockwise: each block (whole segments, about [`BLOCK`]
/// queries) attends to the kept tokens before it plus itself, under [`sentence_mask`].
/// Memory per block is L × (kept before + L), so it grows linearly with the document.
pub struct SentencePlan {
    groups: Vec<SentenceGroup>,
    ops: Ops,
}

struct SentenceGroup {
    rows: Range<usize>,
    /// Flat rows of the keys: kept tokens before the block, then the block.
    keys: Tensor, // (S,) u32
    /// The block's own part of the mask (L, L); the kept prefix is all visible.
    inner: Tensor,
}

impl SentencePlan {
    pub fn new(docs: &[SentenceDoc], dtype: DType, device: &Device, ops: Ops) -> Result<Self> {
        let mut groups = Vec::new();
        for doc in docs {
            let n = doc.rows.len();
            let mut kept_before: Vec<u32> = Vec::new();
            let mut a = 0;
            while a < n {
                // Extend the block by whole segments up to BLOCK rows (at least one segment).
                let mut b = a;
                loop {
                    let seg = doc.segment[b];
                    let mut e = b;
                    while e < n && doc.segment[e] == seg {
                        e += 1;
                    }
                    if b > a && e - a > BLOCK {
                        break;
                    }
                    b = e;
                    if b >= n || b - a >= BLOCK {
                        break;
                    }
                }
                let block: Vec<usize> = (a..b).collect();
                let inner = sentence_mask(&block, &block, &doc.segment, &doc.kept);
                let mut keys = kept_before.clone();
                keys.extend((a..b).map(|i| (doc.rows.start + i) as u32));
                groups.push(SentenceGroup {
                    rows: doc.rows.start + a..doc.rows.start + b,
                    keys: Tensor::new(keys, device)?,
                    inner: mask_tensor(inner, b - a, b - a, dtype, device)?,
                });
                kept_before.extend(
                    (a..b)
                        .filter(|&i| doc.kept[i])
                        .map(|i| (doc.rows.start + i) as u32),
                );
                a = b;
            }
        }
        Ok(Self { groups, ops })
    }
}

impl Attention for SentencePlan {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let l = g.rows.len();
            let qb = q.narrow(1, g.rows.start, l)?;
            let kb = k.index_select(&g.keys, 1)?; // (Hkv, P + L, D)
            let vb = v.index_select(&g.keys, 1)?;
            outs.push(attend(&qb, &kb, &vb, Some(&g.inner), self.ops)?);
        }
        Tensor::cat(&outs, 1)
    }
}

/// Sentence attention the reference code's way, for comparison only: each document is one
/// group whose mask is the dense T x T [`sentence_mask`]. Memory grows with T².
pub struct DensePlan {
    groups: Vec<(Range<usize>, Tensor)>,
    ops: Ops,
}

impl DensePlan {
    pub fn new(docs: &[SentenceDoc], dtype: DType, device: &Device, ops: Ops) -> Result<Self> {
        let groups = docs
            .iter()
            .map(|doc| {
                let n = doc.rows.len();
                let idx: Vec<usize> = (0..n).collect();
                let mask = sentence_mask(&idx, &idx, &doc.segment, &doc.kept);
                Ok((doc.rows.clone(), mask_tensor(mask, n, n, dtype, device)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups, ops })
    }
}

impl Attention for DensePlan {
    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.groups.len());
        for (rows, mask) in &self.groups {
            let (qb, kb, vb) = (
                q.narrow(1, rows.start, rows.len())?,
                k.narrow(1, rows.start, rows.len())?,
                v.narrow(1, rows.start, rows.len())?,
            );
            outs.push(attend(&qb, &kb, &vb, Some(mask), self.ops)?);
        }
        Tensor::cat(&outs, 1)
    }
}

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
        (layer, attn): (usize, &mut dyn Attention),
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
        attn: &mut dyn Attention,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentence_mask_on_a_tiny_sequence() {
        // BOS a b | g g || c d | g g || e   (segments 0, 1, 2; N_g = 2)
        let segment = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2];
        let kept = [
            false, false, false, true, true, false, false, true, true, false,
        ];
        let idx: Vec<usize> = (0..10).collect();
        let m = sentence_mask(&idx, &idx, &segment, &kept);
        let vis: Vec<String> = m
            .chunks(10)
            .map(|r| {
                r.iter()
                    .map(|&x| if x == 0.0 { '#' } else { '.' })
                    .collect()
            })
            .collect();
        assert_eq!(
            vis,
            vec![
                "#.........", // BOS
                "##........", // a
                "###.......", // b
                "####......", // gist 0 of sentence 0 sees its sentence
                "#####.....", // gist 1
                "...###....", // c: earlier gists + itself
                "...####...", // d
                "...#####..", // gist 0 of sentence 1
                "...######.", // gist 1
                "...##..###", // e: all earlier gists, not c and d
            ]
        );
    }

    #[test]
    fn causal_mask_is_sentence_mask_for_one_segment_after_kept_entries() {
        // Prefix: 3 kept entries; then 4 new tokens of one segment.
        let segment = [0, 0, 0, 1, 1, 1, 1];
        let kept = [true, true, true, false, false, false, false];
        let keys: Vec<usize> = (0..7).collect();
        let queries: Vec<usize> = (3..7).collect();
        assert_eq!(
            sentence_mask(&queries, &keys, &segment, &kept),
            causal_mask(4, 3)
        );
    }
}
