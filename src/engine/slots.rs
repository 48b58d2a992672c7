//! The incremental path with the batch's caches in one tensor per layer, a slot per
//! document, so a layer's attention is one batched matmul for every document in flight.
//!
//! [`crate::engine::state::advance`] keeps each document's cache in its own buffer and attends per
//! document: about ten small kernels per document per layer. On a GPU those launches, not
//! the arithmetic, bound a step at large batch. Here a step writes every document's new
//! rows with one scatter, attends with one padded matmul under a mask built on the device
//! (each slot sees its own rows up to its length, its new rows causally), and compacts
//! closed sentences with one gather and one scatter: a fixed number of kernels per layer,
//! whatever the batch.
//!
//! The results equal [`crate::engine::state::advance`]'s up to summation order (tests below); the
//! states that come out are ordinary [`GistState`]s. Layout per layer: k and v are
//! (Hkv, slots · cap, D), slot s owning rows s·cap .. s·cap + cap; rows past a slot's
//! length hold stale values that the mask hides.

use crate::engine::state::{
    closing, fade_row, moved_angles, open_sentence_sink, step_rows, Chunk, GistState, KvBuffer,
    StepRows,
};
use crate::model::attention::{padded_mask, AttentionPlan};
use crate::model::config::PositionScheme;
use crate::model::llama::Logits;
use crate::model::ops::{rope, Ops};
use crate::model::GistModel;
use candle_core::{DType, Device, Result, Tensor};

/// Every document in flight, in one cache.
pub struct SlotCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    slots: usize,
    cap: usize,
    /// Rows held per slot (kept rows, then the open sentence's tail).
    len: Vec<usize>,
    /// The state of the document in each slot, its `layers` emptied while it is here.
    states: Vec<Option<GistState>>,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl SlotCache {
    pub fn new(model: &GistModel, slots: usize) -> Result<Self> {
        let cfg = &model.llama.cfg;
        let mut c = Self {
            k: Vec::new(),
            v: Vec::new(),
            slots: slots.max(1),
            cap: 0,
            len: vec![0; slots.max(1)],
            states: (0..slots.max(1)).map(|_| None).collect(),
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            dtype: model.llama.dtype(),
            device: model.llama.device().clone(),
        };
        c.k = vec![Tensor::zeros((1, 1, 1), c.dtype, &c.device)?; cfg.layers];
        c.v = c.k.clone();
        c.grow(256)?;
        Ok(c)
    }

    /// Makes room for `rows` per slot, keeping what is held.
    fn grow(&mut self, rows: usize) -> Result<()> {
        if rows <= self.cap {
            return Ok(());
        }
        let cap = rows.max(self.cap + self.cap / 4 + 64);
        let (h, d, s) = (self.kv_heads, self.head_dim, self.slots);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let new = Tensor::zeros((h, s, cap, d), self.dtype, &self.device)?;
            if self.cap > 0 {
                // (Hkv, S, cap, D) views: copy each slot's rows at once.
                let old = t.reshape((h, s, self.cap, d))?;
                new.slice_set(&old, 2, 0)?;
            }
            *t = new.reshape((h, s * cap, d))?;
        }
        self.cap = cap;
        Ok(())
    }

    /// Puts a document's state into a free slot; returns the slot.
    pub fn enter(&mut self, mut state: GistState) -> Result<usize> {
        let slot = self
            .states
            .iter()
            .position(Option::is_none)
            .ok_or_else(|| candle_core::Error::Msg("no free slot".into()))?;
        let n = state.kv_len();
        self.grow(n + 64)?;
        if n > 0 {
            for (i, layer) in state.layers.iter().enumerate() {
                let (k, v) = layer.view()?;
                self.k[i].slice_set(&k.contiguous()?, 1, slot * self.cap)?;
                self.v[i].slice_set(&v.contiguous()?, 1, slot * self.cap)?;
            }
        }
        state.layers.clear();
        self.len[slot] = n;
        self.states[slot] = Some(state);
        Ok(slot)
    }

    /// Takes the document out of `slot`, as an ordinary state.
    pub fn leave(&mut self, slot: usize) -> Result<GistState> {
        let mut state = self.states[slot]
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("slot {slot} is empty")))?;
        let n = self.len[slot];
        for (k, v) in self.k.iter().zip(&self.v) {
            let k = k.narrow(1, slot * self.cap, n)?.contiguous()?;
            let v = v.narrow(1, slot * self.cap, n)?.contiguous()?;
            state.layers.push(KvBuffer::from_tensors(k, v)?);
        }
        self.len[slot] = 0;
        Ok(state)
    }

    pub fn state(&self, slot: usize) -> Option<&GistState> {
        self.states[slot].as_ref()
    }
}

/// Feeds one chunk of each listed slot's document through the model (the slots' states
/// advance as [`crate::engine::state::advance`] would advance them).
pub fn advance_slots(
    model: &GistModel,
    cache: &mut SlotCache,
    items: &[(usize, Chunk<'_>)],
) -> Result<()> {
    let gist_ids = &model.gist.gist_token_ids;
    let (slots, dev) = (cache.slots, cache.device.clone());
    let mut held_states = Vec::with_capacity(items.len());
    for (slot, chunk) in items {
        let state = cache.states[*slot]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("slot {slot} is empty")))?;
        held_states.push((state, chunk));
    }
    let StepRows {
        ids,
        positions,
        groups,
    } = step_rows(model, held_states.into_iter())?;
    if ids.is_empty() {
        return Ok(());
    }
    let n = ids.len();
    let lmax = groups.iter().map(|(r, _)| r.len()).max().unwrap_or(1);
    let need = items
        .iter()
        .zip(&groups)
        .map(|((s, _), (r, _))| cache.len[*s] + r.len())
        .max()
        .unwrap_or(0);
    cache.grow(need)?;
    let cap = cache.cap;
    // Keys the padded attention reads per slot: the longest slot's rows after this step.
    let t = need.max(1);

    // Where each new row goes in the cache; where each padded query comes from; which
    // padded rows are real; how many keys each padded query sees.
    let mut write = vec![0u32; n];
    let mut gather_q = vec![0u32; slots * lmax];
    let mut unpad = vec![0u32; n];
    // Padding rows (and slots without a chunk this step) see key 0 only: no row is all
    // masked, so softmax never divides by zero.
    let mut limit = vec![1u32; slots * lmax];
    // Compaction of closing sentences: source rows (the tail and new rows kept) and where
    // they go.
    let (mut from, mut to) = (Vec::new(), Vec::new());
    for ((slot, chunk), (rows, kept)) in items.iter().zip(&groups) {
        let base = slot * cap;
        let held = cache.len[*slot];
        for (i, r) in rows.clone().enumerate() {
            write[r] = (base + held + i) as u32;
            gather_q[slot * lmax + i] = r as u32;
            unpad[r] = (slot * lmax + i) as u32;
            limit[slot * lmax + i] = (held + i + 1) as u32;
        }
        if chunk.close {
            let state = cache.states[*slot].as_ref().expect("checked above");
            let c = closing(model, state, held, kept);
            for (i, &row) in c.keep.iter().enumerate() {
                from.push((base + row as usize) as u32);
                to.push((base + c.start + i) as u32);
            }
        }
    }
    // scatter_set wants an index per value: the row indices, spread over (Hkv, rows, D)
    // once per step and shared by k, v and every layer.
    let (hkv, d) = (cache.kv_heads, cache.head_dim);
    let spread = |rows: Vec<u32>| -> Result<Tensor> {
        let m = rows.len();
        Tensor::new(rows, &dev)?
            .reshape((1, m, 1))?
            .broadcast_as((hkv, m, d))?
            .contiguous()
    };
    let write = spread(write)?;
    let limit = Tensor::from_vec(limit, (slots, 1, lmax, 1), &dev)?;
    let mask = padded_mask(&limit, t, cache.dtype)?; // (S, 1, Lmax, T)
                                                     // The compressed position scheme re-rotates each moved key by how far it moves.
    let shift = match (from.is_empty(), model.gist.positions) {
        (false, PositionScheme::Compressed) => Some(moved_angles(
            model,
            from.iter().copied().zip(to.iter().copied()),
        )?),
        _ => None,
    };
    let compact = if from.is_empty() {
        None
    } else {
        Some((Tensor::new(from, &dev)?, spread(to)?))
    };
    // Where each slot's open sentence reads BOS (gist.json `sink_distance`): one rotation
    // per slot, by 0 for slots that read it where stored or have no chunk this step.
    let mut sinks = vec![0u32; slots];
    for (slot, _) in items {
        let state = cache.states[*slot].as_ref().expect("checked above");
        sinks[*slot] = open_sentence_sink(model, state, cache.len[*slot]).unwrap_or(0);
    }
    let sink = if sinks.iter().any(|&p| p > 0) {
        let (cos, sin) = moved_angles(model, sinks.iter().map(|&p| (0, p)))?;
        let rows: Vec<u32> = (0..slots).map(|s| (s * cap) as u32).collect();
        Some(SlotSinks {
            rows: Tensor::new(rows.as_slice(), &dev)?,
            spread: spread(rows)?,
            cos,
            sin,
        })
    } else {
        None
    };
    // gist.json `distance_decay`: each real query's visible keys faded by how far it reads
    // them (row = position; BOS at its sink), as `state::decay_mask` does.
    let mask = match &model.gist.distance_decay {
        Some(decay) => {
            let mut fade = vec![0f32; slots * lmax * t];
            for ((slot, _), (rows, _)) in items.iter().zip(&groups) {
                for (i, r) in rows.clone().enumerate() {
                    let at = (slot * lmax + i) * t;
                    let visible = cache.len[*slot] + i + 1;
                    fade_row(
                        decay,
                        positions[r],
                        sinks[*slot],
                        &mut fade[at..at + visible],
                    );
                }
            }
            let fade = Tensor::from_vec(fade, (slots, 1, lmax, t), &dev)?;
            (mask + fade.to_dtype(cache.dtype)?)?
        }
        None => mask,
    };
    let mut plan = SlotPlan {
        cache,
        sink,
        write,
        gather_q: Tensor::new(gather_q, &dev)?,
        unpad: Tensor::new(unpad, &dev)?,
        mask,
        compact,
        shift,
        lmax,
        t,
    };
    let ids_t = Tensor::new(ids.as_slice(), &dev)?;
    model
        .llama
        .forward(&ids_t, &positions, &mut plan, Ops::Fused, &Logits::Skip)?;

    // The same bookkeeping as `advance`.
    for ((slot, chunk), (rows, kept)) in items.iter().zip(&groups) {
        let held = cache.len[*slot];
        let state = cache.states[*slot].as_mut().expect("checked above");
        state.next_position += rows.len() as u32;
        state.regular_tokens += chunk.tokens.len() as u64;
        if chunk.close {
            let c = closing(model, state, held, kept);
            cache.len[*slot] = c.start + c.keep.len();
            if model.gist.positions == PositionScheme::Compressed {
                state.next_position = cache.len[*slot] as u32;
            }
            state.tail_kept.clear();
            state.window = c.window;
            state.sentences += 1;
            state.gist_tokens += gist_ids.len() as u64;
        } else {
            state.tail_kept.extend(kept);
            cache.len[*slot] = held + rows.len();
        }
    }
    Ok(())
}

struct SlotPlan<'a> {
    cache: &'a mut SlotCache,
    /// Cache row of each new row, spread over (Hkv, N, D) for scatter_set.
    write: Tensor,
    /// Flat row of each padded query (S · Lmax,).
    gather_q: Tensor,
    /// Padded row of each flat row (N,).
    unpad: Tensor,
    /// (S, 1, Lmax, T) additive.
    mask: Tensor,
    /// Rows kept by closing sentences: the cache rows they come from (M,), and where they
    /// go, spread over (Hkv, M, D).
    compact: Option<(Tensor, Tensor)>,
    /// cos and sin (M, D/2) re-rotating the moved keys (compressed positions).
    shift: Option<(Tensor, Tensor)>,
    /// Each slot's BOS (row 0) re-rotated to where its open sentence reads it (gist.json
    /// `sink_distance`); None: every slot reads it where stored.
    sink: Option<SlotSinks>,
    lmax: usize,
    t: usize,
}

/// The cache rows of every slot's BOS (S,), spread over (Hkv, S, D) for scatter_set, and
/// the cos and sin (S, D/2) rotating each to its sink (by 0 where none).
struct SlotSinks {
    rows: Tensor,
    spread: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl SlotPlan<'_> {
    /// Writes this step's rows into the layer's cache.
    fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.cache.k[layer].scatter_set(&self.write, &k.contiguous()?, 1)?;
        self.cache.v[layer].scatter_set(&self.write, &v.contiguous()?, 1)?;
        Ok(())
    }

    /// Moves the kept rows of closing sentences down over their dropped tails.
    fn compact(&mut self, layer: usize) -> Result<()> {
        let Some((from, to)) = &self.compact else {
            return Ok(());
        };
        for (i, t) in [&self.cache.k[layer], &self.cache.v[layer]]
            .into_iter()
            .enumerate()
        {
            let mut rows = t.index_select(from, 1)?; // a copy: safe to write back
            if let (0, Some((cos, sin))) = (i, &self.shift) {
                rows = rope(&rows, cos, sin, Ops::Fused)?;
            }
            t.scatter_set(to, &rows, 1)?;
        }
        Ok(())
    }
}

impl AttentionPlan for SlotPlan<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.write(layer, k, v)?;
        let (hq, _, d) = q.dims3()?;
        let (s, cap, hkv, lmax, t) = (
            self.cache.slots,
            self.cache.cap,
            self.cache.kv_heads,
            self.lmax,
            self.t,
        );
        let g = hq / hkv;
        // Queries padded per slot, the G heads sharing a key head stacked as rows:
        // (Hq, S·Lmax, D) -> (Hkv, G, S, Lmax, D) -> (Hkv, S, G·Lmax, D).
        let qp = q
            .index_select(&self.gather_q, 1)?
            .reshape((hkv, g, s, lmax, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((hkv, s, g * lmax, d))?;
        // Each slot's BOS read at its sink: rotated in place for this attention and put
        // back after it (S rows copied, not the whole cache).
        let stored_bos = match &self.sink {
            Some(sk) => {
                let bos = self.cache.k[layer].index_select(&sk.rows, 1)?; // (Hkv, S, D), a copy
                let moved = rope(&bos, &sk.cos, &sk.sin, Ops::Fused)?;
                self.cache.k[layer].scatter_set(&sk.spread, &moved, 1)?;
                Some(bos)
            }
            None => None,
        };
        // Every slot's first T rows: (Hkv, S, T, D), a view.
        let kc = self.cache.k[layer]
            .reshape((hkv, s, cap, d))?
            .narrow(2, 0, t)?;
        let vc = self.cache.v[layer]
            .reshape((hkv, s, cap, d))?
            .narrow(2, 0, t)?;
        let scores = qp
            .matmul(&kc.t()?)? // (Hkv, S, G·Lmax, T)
            .reshape((hkv, s, g, lmax, t))?
            .broadcast_add(&self.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((hkv, s, g * lmax, t))?;
        let out = probs
            .matmul(&vc)? // (Hkv, S, G·Lmax, D)
            .reshape((hkv, s, g, lmax, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((hq, s * lmax, d))?
            .index_select(&self.unpad, 1)?; // (Hq, N, D)
        if let (Some(sk), Some(bos)) = (&self.sink, stored_bos) {
            self.cache.k[layer].scatter_set(&sk.spread, &bos, 1)?;
        }
        self.compact(layer)?;
        Ok(out)
    }

    fn store(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        self.write(layer, k, v)?;
        self.compact(layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::compress::{compress_from, Document};
    use crate::model::config::Incremental;
    use crate::model::random::{synthetic_text, write_random_model, RandomSpec};
    use crate::model::LoadOptions;
    use crate::text::tokenize::Segment;

    /// Documents of different lengths; with `split`, every other sentence arrives as an
    /// open chunk and then its closing rest (a tail spanning steps).
    fn documents(model: &GistModel, split: bool) -> Vec<Vec<Segment>> {
        [(3, 4, 1), (9, 12, 2), (6, 2, 3), (14, 7, 4), (1, 3, 5)]
            .iter()
            .map(|&(sentences, words, seed)| {
                let segs = model
                    .segments(&synthetic_text(sentences, words, seed))
                    .unwrap();
                let mut out = Vec::new();
                for (i, s) in segs.into_iter().enumerate() {
                    if split && i % 2 == 1 && s.tokens.len() > 3 {
                        let cut = s.tokens.len() / 2;
                        out.push(Segment {
                            tokens: s.tokens[..cut].to_vec(),
                            bytes: 0..0,
                            close: false,
                        });
                        out.push(Segment {
                            tokens: s.tokens[cut..].to_vec(),
                            bytes: 0..0,
                            close: s.close,
                        });
                    } else {
                        out.push(s);
                    }
                }
                out
            })
            .collect()
    }

    fn run(
        model: &mut GistModel,
        engine: Incremental,
        docs: &[Vec<Segment>],
        starts: Vec<GistState>,
        batch: usize,
    ) -> Vec<GistState> {
        model.incremental = engine;
        let input = docs
            .iter()
            .zip(starts)
            .enumerate()
            .map(|(i, (segments, s))| {
                let d = Document {
                    id: i.to_string(),
                    segments: segments.clone(),
                };
                (d, s)
            })
            .collect();
        compress_from(model, input, batch)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn assert_same(a: &[GistState], b: &[GistState]) {
        for (x, y) in a.iter().zip(b) {
            assert_eq!(
                (
                    x.next_position,
                    x.sentences,
                    x.regular_tokens,
                    x.gist_tokens
                ),
                (
                    y.next_position,
                    y.sentences,
                    y.regular_tokens,
                    y.gist_tokens
                )
            );
            assert_eq!(x.tail_kept, y.tail_kept);
            assert_eq!(x.kv_len(), y.kv_len());
            for (lx, ly) in x.layers.iter().zip(&y.layers) {
                let ((kx, vx), (ky, vy)) = (lx.view().unwrap(), ly.view().unwrap());
                for (p, q) in [(kx, ky), (vx, vy)] {
                    let d = crate::model::simd::max_abs_diff(&p, &q);
                    assert!(d < 1e-5, "max |difference| {d}");
                }
            }
        }
    }

    fn check(spec: RandomSpec, split: bool) {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &spec).unwrap();
        let dev = Device::Cpu;
        let mut model =
            GistModel::load(dir.path(), &dev, DType::F32, &LoadOptions::default()).unwrap();
        let docs = documents(&model, split);
        let fresh = |model: &GistModel| {
            docs.iter()
                .map(|_| GistState::new(model).unwrap())
                .collect::<Vec<_>>()
        };
        for batch in [1, 3, 8] {
            let (a_starts, b_starts) = (fresh(&model), fresh(&model));
            let a = run(&mut model, Incremental::PerDocument, &docs, a_starts, batch);
            let b = run(&mut model, Incremental::Slots, &docs, b_starts, batch);
            assert_same(&a, &b);
            // Going on from those states (the next part of each document) agrees too:
            // states enter the slots non-empty.
            let more: Vec<Vec<Segment>> = docs.iter().rev().cloned().collect();
            let a2 = run(&mut model, Incremental::PerDocument, &more, a, batch);
            let b2 = run(&mut model, Incremental::Slots, &more, b, batch);
            assert_same(&a2, &b2);
        }
    }

    #[test]
    fn slots_compute_what_per_document_attention_computes() {
        check(RandomSpec::default(), false);
    }

    #[test]
    fn slots_agree_with_open_tails_kept_bos_and_two_gists() {
        let spec = RandomSpec {
            num_gists: 2,
            bos_always_visible: true,
            tie_embeddings: true,
            ..RandomSpec::default()
        };
        check(spec, true);
        check(RandomSpec::default(), true);
    }

    #[test]
    fn the_slot_cache_grows_and_hands_states_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        write_random_model(dir.path(), &RandomSpec::default()).unwrap();
        let mut model = GistModel::load(
            dir.path(),
            &Device::Cpu,
            DType::F32,
            &LoadOptions::default(),
        )
        .unwrap();
        // Hundreds of sentences of 4 gists: over 600 kept rows, past the first capacity of 256.
        let doc = vec![model.segments(&synthetic_text(400, 3, 9)).unwrap()];
        let starts = vec![GistState::new(&model).unwrap()];
        let a = run(&mut model, Incremental::PerDocument, &doc, starts, 1);
        let starts = vec![GistState::new(&model).unwrap()];
        let b = run(&mut model, Incremental::Slots, &doc, starts, 1);
        assert!(b[0].kv_len() > 600, "{} rows", b[0].kv_len());
        assert_same(&a, &b);
    }
}
