//! Every attention mask and plan, in one place: the sentence-attention (gist) mask, the
//! plain causal mask, the padded mask of the batched cache, and the plans that split a
//! forward's rows into groups and give each the keys it may see (the sentence-attention
//! plans of the parallel path in [`sentence`]).
//!
//! Notation as in [`super::llama`]: Hq query heads, Hkv key/value heads, D head dim, L a
//! group's queries, S its keys.

use super::ops::{softmax, Ops};
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

mod sentence;
pub use sentence::{Carried, DensePlan, SentenceDoc, SentencePlan};

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
/// With `window` (gist.json `previous_sentence_visible`) a token also sees the whole
/// segment before its own: `segment[j] + 1 == segment[i]`.
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
    window: bool,
) -> Vec<f32> {
    let mut mask = Vec::with_capacity(queries.len() * keys.len());
    for &i in queries {
        for &j in keys {
            let visible = j <= i
                && (segment[j] == segment[i]
                    || kept[j]
                    || (window && segment[j] + 1 == segment[i]));
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

/// The causal (L, L) mask of L new rows whose cached prefix is all visible (the prefix
/// needs no mask), as a tensor: what the incremental engines use.
pub fn causal_mask_tensor(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    mask_tensor(causal_mask(l, 0), l, l, dtype, device)
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

/// The mask of the batched cache (`crate::engine::slots`): for each slot's query rows, keys
/// `0..limit` are visible. `limit` is `(S, 1, L, 1)` u32, keys `T`; the mask is
/// `(S, 1, L, T)`: 0 where visible, -1e30 elsewhere (exp gives exactly 0, as -inf would,
/// and 0 · 1e30 stays 0 where -inf would give NaN).
pub fn padded_mask(limit: &Tensor, keys: usize, dtype: DType) -> Result<Tensor> {
    let k = Tensor::arange(0u32, keys as u32, limit.device())?.reshape((1, 1, 1, keys))?;
    ((k.broadcast_lt(limit)?.to_dtype(DType::F32)? - 1.0)? * 1e30)?.to_dtype(dtype)
}

// ---------------------------------------------------------------------------------------
// AttentionPlan
// ---------------------------------------------------------------------------------------

/// AttentionPlan of one group: L queries over the S keys the group may see, of which the
/// last M are masked by `inner` (L, M) additive and the first S - M (kept gists, earlier
/// tokens) are all visible (None: all visible). M is L, the group's own rows, except in
/// the compressed position scheme's parallel path (see [`SentencePlan::compressed`]).
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
    let tiled = match ops {
        Ops::Fused => super::flash::attend(q, k, v, inner)?,
        Ops::Differentiable => super::flash::attend_trainable(q, k, v, inner)?,
    };
    if let Some(y) = tiled {
        return Ok(y);
    }
    let (hq, l, d) = q.dims3()?;
    if ops == Ops::Fused {
        return probabilities(q, k, inner)?.matmul(v)?.reshape((hq, l, d)); // (Hkv, G·L, D) -> (Hq, L, D)
    }
    let (hkv, s, _) = k.dims3()?;
    let g = hq / hkv;
    let q = q.contiguous()?.reshape((hkv, g * l, d))?;
    let scores = q.matmul(&k.t()?)?; // (Hkv, G·L, S)
    let probs = match inner {
        // Added inside the softmax's own node (training): no (Hkv, G·L, S) sum and
        // gradient buffers in the graph.
        Some(m) => super::softmax::masked_softmax_trainable(
            &scores.reshape((hkv * g, l, s))?,
            &with_visible_prefix(m, s - m.dim(1)?)?,
        )?
        .reshape((hkv, g * l, s))?,
        None => softmax(&scores, ops)?,
    };
    probs.matmul(v)?.reshape((hq, l, d)) // (Hkv, G·L, D) -> (Hq, L, D)
}

/// softmax(q·kᵀ + mask) without autograd, the GQA heads sharing a key head stacked as rows:
/// q (Hq, L, D) scaled, k (Hkv, S, D), `inner` as in [`attend`]. Returns (Hkv, G·L, S). The
/// inference fallback where tiled attention does not apply, and what the trainable tiled
/// node's backward recomputes.
pub fn probabilities(q: &Tensor, k: &Tensor, inner: Option<&Tensor>) -> Result<Tensor> {
    let (hq, l, d) = q.dims3()?;
    let (hkv, s, _) = k.dims3()?;
    let g = hq / hkv;
    let q = q.contiguous()?.reshape((hkv, g * l, d))?;
    let scores = q.matmul(&k.t()?)?; // (Hkv, G·L, S)
    if let Some(m) = inner {
        // Mask only the last M columns, in place: the prefix needs no mask, and this keeps
        // the work O(L·M) instead of O(L·S). No autograd through slice_set.
        let cols = m.dim(1)?;
        let own = scores
            .narrow(2, s - cols, cols)?
            .reshape((hkv, g, l, cols))?
            .broadcast_add(m)?
            .reshape((hkv, g * l, cols))?;
        scores.slice_set(&own, 2, s - cols)?;
    }
    super::softmax::softmax_last_dim_in_place(scores)
}

/// How one forward's attention is grouped, and where each group's keys come from.
pub trait AttentionPlan {
    /// AttentionPlan for `layer`. q (Hq, N, D) scaled; k, v (Hkv, N, D): this forward's tokens,
    /// rotated. Returns (Hq, N, D).
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// [`Self::attend`] as rows: (N, Hq·D), what the output projection reads. Plans that
    /// can write their output in that layout directly override it.
    fn attend_rows(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        as_rows(&self.attend(layer, q, k, v)?)
    }

    /// The last layer when no logits are wanted: only its keys and values matter (they are
    /// what a cache keeps). Plans without a cache have nothing to do.
    fn store(&mut self, _layer: usize, _k: &Tensor, _v: &Tensor) -> Result<()> {
        Ok(())
    }
}

/// y (H, N, D) as rows (N, H·D).
fn as_rows(y: &Tensor) -> Result<Tensor> {
    let (h, n, d) = y.dims3()?;
    y.transpose(0, 1)?.reshape((n, h * d))
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
                    e.insert(causal_mask_tensor(l, dtype, device)?);
                }
                blocks.push((doc.start, a..b));
                a = b;
            }
        }
        Ok(Self { blocks, inner, ops })
    }
}

impl AttentionPlan for CausalPlan {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A mask's rows as strings: `#` visible, `.` hidden.
    fn pictured(mask: &[f32], width: usize) -> Vec<String> {
        mask.chunks(width)
            .map(|r| {
                r.iter()
                    .map(|&x| if x == 0.0 { '#' } else { '.' })
                    .collect()
            })
            .collect()
    }

    /// The mask of `BOS a b | g g || c d | g g || e` (segments 0, 1, 2; N_g = 2), pictured.
    fn tiny_sequence_mask(window: bool) -> Vec<String> {
        let segment = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2];
        let kept = [
            false, false, false, true, true, false, false, true, true, false,
        ];
        let idx: Vec<usize> = (0..10).collect();
        pictured(&sentence_mask(&idx, &idx, &segment, &kept, window), 10)
    }

    #[test]
    fn sentence_mask_on_a_tiny_sequence() {
        let vis = tiny_sequence_mask(false);
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
    fn the_window_adds_the_whole_segment_before() {
        let vis = tiny_sequence_mask(true);
        assert_eq!(
            vis,
            vec![
                "#.........", // BOS
                "##........", // a
                "###.......", // b
                "####......", // gist 0 of sentence 0
                "#####.....", // gist 1
                "######....", // c: the whole sentence before, and itself
                "#######...", // d
                "########..", // gist 0 of sentence 1
                "#########.", // gist 1
                "...#######", // e: sentence 1 whole, sentence 0's gists, not BOS a b
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
            sentence_mask(&queries, &keys, &segment, &kept, false),
            causal_mask(4, 3)
        );
    }
}
