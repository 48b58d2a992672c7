//! The compressed state of a document, and the incremental path that builds it.
//!
//! A [`GistState`] holds, per layer, the keys and values a later token may still attend to:
//! the gist tokens of every finished sentence (and BOS when the model keeps it visible),
//! followed by the tokens of the unfinished last sentence (the *tail*). Keys are stored
//! after RoPE. In the `original` position scheme they sit at their absolute positions and
//! are never re-rotated; in the `compressed` one a row is a position, so a closing
//! sentence's gists are re-rotated as they move down over its dropped tokens. When a
//! sentence closes, its regular tokens are dropped and only its gists stay: the KV size
//! is N_g × sentences + tail instead of the token count.
//!
//! [`advance`] feeds one chunk of each of several documents through the model at once: the
//! flat batch holds all their tokens (no padding), and attention runs per document against
//! its own cache. This is what `compress`, ingestion and queries use.

use crate::model::attention::{attend, causal_mask_tensor, AttentionPlan};
use crate::model::config::{DistanceDecay, PositionScheme};
use crate::model::llama::Logits;
use crate::model::ops::{rope, rope_shift_angles, Ops};
use crate::model::GistModel;
use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of one layer for one document, in a buffer with spare rows so an append
/// is a copy of the new rows only. It grows by a quarter (not by doubling) so the spare
/// memory stays a small fraction of the state. k and v are (Hkv, capacity, D); rows
/// `..len` hold data.
#[derive(Debug, Clone)]
pub struct KvBuffer {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvBuffer {
    fn new(
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (kv_heads, capacity.max(1), head_dim);
        Ok(Self {
            k: Tensor::zeros(shape, dtype, device)?,
            v: Tensor::zeros(shape, dtype, device)?,
            len: 0,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn capacity(&self) -> usize {
        self.k.dim(1).unwrap_or(0)
    }

    /// Rows `..len` of keys and values, (Hkv, len, D) views into the buffer.
    pub fn view(&self) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(1, 0, self.len)?,
            self.v.narrow(1, 0, self.len)?,
        ))
    }

    /// Appends k, v (Hkv, L, D).
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<()> {
        let l = k.dim(1)?;
        if self.len + l > self.capacity() {
            let cap = (self.len + l).max(self.capacity() + self.capacity() / 4 + 64);
            let (hkv, _, d) = self.k.dims3()?;
            let (old_k, old_v) = self.view()?;
            self.k = Tensor::zeros((hkv, cap, d), self.k.dtype(), self.k.device())?;
            self.v = Tensor::zeros((hkv, cap, d), self.v.dtype(), self.v.device())?;
            if self.len > 0 {
                self.k.slice_set(&old_k.contiguous()?, 1, 0)?;
                self.v.slice_set(&old_v.contiguous()?, 1, 0)?;
            }
        }
        // New rows come from the forward's own tensors, never from this buffer, so
        // slice_set can read them in place (it only refuses a source sharing storage with
        // the destination).
        self.k.slice_set(&k.contiguous()?, 1, self.len)?;
        self.v.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len += l;
        Ok(())
    }

    /// Keeps rows `..start` and then only `rows` (absolute indices ≥ start, ascending)
    /// of the rest: how a closed sentence's regular tokens are dropped. `shift`: cos and
    /// sin (rows, D/2) that re-rotate each kept key to its new row (the compressed
    /// position scheme, where a row is a position).
    fn compact(
        &mut self,
        start: usize,
        rows: &[u32],
        shift: Option<&(Tensor, Tensor)>,
    ) -> Result<()> {
        if rows.is_empty() {
            self.len = start;
            return Ok(());
        }
        let idx = Tensor::new(rows, self.k.device())?;
        let mut k = self.k.index_select(&idx, 1)?; // a copy, safe to write back
        if let Some((cos, sin)) = shift {
            k = rope(&k, cos, sin, Ops::Fused)?;
        }
        let v = self.v.index_select(&idx, 1)?;
        self.k.slice_set(&k, 1, start)?;
        self.v.slice_set(&v, 1, start)?;
        self.len = start + rows.len();
        Ok(())
    }

    /// Rotates row 0's key by cos and sin (1, D/2) in place, returning the key it held
    /// (Hkv, 1, D) for the caller to put back.
    fn rotate_key_row0(&mut self, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let stored = self.k.narrow(1, 0, 1)?.contiguous()?; // a copy
        self.k
            .slice_set(&rope(&stored, cos, sin, Ops::Fused)?, 1, 0)?;
        Ok(stored)
    }

    /// A buffer holding exactly these rows (Hkv, len, D).
    pub fn from_tensors(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(1)?;
        Ok(Self { k, v, len })
    }
}

/// Everything a later query needs from a document instead of its text.
#[derive(Debug, Clone)]
pub struct GistState {
    /// The model that made it ([`GistModel::fingerprint`]): states of different models
    /// must never mix.
    pub fingerprint: u64,
    /// Per layer: kept entries (BOS if kept, gists), then the tail.
    pub layers: Vec<KvBuffer>,
    /// One flag per row of the tail (the unfinished sentence, at the end of every layer's
    /// buffer): whether the row stays once the sentence closes (BOS, when kept visible).
    pub tail_kept: Vec<bool>,
    /// Position of the next token: its index in the gist-augmented document (`original`),
    /// or the state's row count (`compressed`).
    pub next_position: u32,
    /// Closed sentences (each followed by N_g gists).
    pub sentences: u64,
    /// Regular (non-gist) tokens seen, BOS included.
    pub regular_tokens: u64,
    /// Gist tokens written.
    pub gist_tokens: u64,
    /// With `previous_sentence_visible`: the regular rows of the last closed sentence,
    /// still held (just before its gists) for the next sentence to read; 0 otherwise.
    pub window: usize,
}

impl GistState {
    /// The empty state of a new document.
    pub fn new(model: &GistModel) -> Result<Self> {
        let cfg = &model.llama.cfg;
        let layers = (0..cfg.layers)
            .map(|_| {
                KvBuffer::new(
                    cfg.kv_heads,
                    cfg.head_dim,
                    64,
                    model.llama.dtype(),
                    model.llama.device(),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            fingerprint: model.fingerprint,
            layers,
            tail_kept: Vec::new(),
            next_position: 0,
            sentences: 0,
            regular_tokens: 0,
            gist_tokens: 0,
            window: 0,
        })
    }

    /// Entries held per layer (kept + tail).
    pub fn kv_len(&self) -> usize {
        self.layers.first().map_or(0, KvBuffer::len)
    }

    /// Bytes allocated for keys and values, spare rows included.
    pub fn allocated_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|b| 2 * b.k.elem_count() as u64 * b.k.dtype().size_in_bytes() as u64)
            .sum()
    }

    /// Bytes of keys and values held, at `bytes_per_value` per number.
    pub fn kv_bytes(&self, kv_heads: usize, head_dim: usize, bytes_per_value: usize) -> u64 {
        (self.layers.len() * 2 * kv_heads * head_dim * bytes_per_value * self.kv_len()) as u64
    }
}

/// One document's input for one [`advance`] step: regular tokens, and whether the sentence
/// they end closes here (then the model's N_g gist tokens are appended after them).
#[derive(Debug, Clone)]
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub close: bool,
}

/// One step's flat batch: each chunk's tokens, then its gists when it closes.
pub(crate) struct StepRows {
    pub ids: Vec<u32>,
    /// Each row's position in its document (gists count).
    pub positions: Vec<u32>,
    /// Per chunk: its rows, and which of them stay once its sentence closes (gists, and
    /// BOS when the model keeps it visible).
    pub groups: Vec<(std::ops::Range<usize>, Vec<bool>)>,
}

/// Lays out one step of `items` (each document's state and its next chunk), refusing a
/// state made by another model.
pub(crate) fn step_rows<'a, 'c: 'a>(
    model: &GistModel,
    items: impl Iterator<Item = (&'a GistState, &'a Chunk<'c>)>,
) -> Result<StepRows> {
    let gist_ids = &model.gist.gist_token_ids;
    let bos = model.kept_bos();
    let mut out = StepRows {
        ids: Vec::new(),
        positions: Vec::new(),
        groups: Vec::new(),
    };
    for (state, chunk) in items {
        if state.fingerprint != model.fingerprint {
            candle_core::bail!(
                "state was made by another model (fingerprint {:016x}, this model {:016x})",
                state.fingerprint,
                model.fingerprint
            );
        }
        let start = out.ids.len();
        let mut kept = Vec::new();
        for (i, &t) in chunk.tokens.iter().enumerate() {
            let pos = state.next_position + i as u32;
            kept.push(bos == Some(t) && pos == 0);
            out.ids.push(t);
            out.positions.push(pos);
        }
        if chunk.close {
            for (i, &g) in gist_ids.iter().enumerate() {
                out.ids.push(g);
                out.positions
                    .push(state.next_position + (chunk.tokens.len() + i) as u32);
                kept.push(true);
            }
        }
        out.groups.push((start..out.ids.len(), kept));
    }
    Ok(out)
}

/// Feeds one chunk of each document through the model, updating the states. Returns, when
/// `want_logits`, the logits (N, V) of every token of the step in flat order (each chunk's
/// tokens, then its gists if it closes).
pub fn advance(
    model: &GistModel,
    items: &mut [(&mut GistState, Chunk<'_>)],
    want_logits: bool,
) -> Result<Option<Tensor>> {
    let gist_ids = &model.gist.gist_token_ids;
    let StepRows {
        ids,
        positions,
        groups,
    } = step_rows(model, items.iter().map(|(s, c)| (&**s, c)))?;
    if ids.is_empty() {
        return Ok(None);
    }
    let device = model.llama.device();
    let ids_t = Tensor::new(ids.as_slice(), device)?;
    let sink_at: Vec<Option<u32>> = items
        .iter()
        .map(|(s, _)| open_sentence_sink(model, s, s.kv_len()))
        .collect();
    let sinks = sink_at
        .iter()
        .map(|at| match at {
            Some(p) => moved_angles(model, std::iter::once((0, *p))).map(Some),
            None => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut plan = IncrementalPlan {
        sinks,
        sink_at,
        decay: model.gist.distance_decay,
        positions: &positions,
        states: items.iter_mut().map(|(s, _)| &mut **s).collect(),
        groups: groups.iter().map(|(r, _)| r.clone()).collect(),
        masks: Vec::new(),
        dtype: model.llama.dtype(),
        device: device.clone(),
    };
    let logits = if want_logits {
        Logits::All
    } else {
        Logits::Skip
    };
    let out = model
        .llama
        .forward(&ids_t, &positions, &mut plan, Ops::Fused, &logits)?;
    drop(plan);

    // Close sentences: keep their gists (and BOS), drop the rows no later token may read.
    for ((state, chunk), (rows, kept)) in items.iter_mut().zip(&groups) {
        let n = rows.len();
        state.next_position += n as u32;
        state.regular_tokens += chunk.tokens.len() as u64;
        let held = state.kv_len() - n;
        if chunk.close {
            let c = closing(model, state, held, kept);
            let shift = match model.gist.positions {
                PositionScheme::Original => None,
                PositionScheme::Compressed => {
                    // Row = position: the kept rows move down, and so do their keys.
                    state.next_position = (c.start + c.keep.len()) as u32;
                    let to = c.start as u32..;
                    Some(moved_angles(model, c.keep.iter().copied().zip(to))?)
                }
            };
            for layer in state.layers.iter_mut() {
                layer.compact(c.start, &c.keep, shift.as_ref())?;
            }
            state.tail_kept.clear();
            state.window = c.window;
            state.sentences += 1;
            state.gist_tokens += gist_ids.len() as u64;
        } else {
            state.tail_kept.extend(kept);
        }
    }
    Ok(out)
}

/// What a closing sentence keeps: rows `..start` stay as they are, then `keep` (absolute
/// rows, ascending) move down to `start..`; `window` is the state's new window.
pub(crate) struct Closing {
    pub start: usize,
    pub keep: Vec<u32>,
    pub window: usize,
}

/// The rows kept when the open sentence of `state` closes, `held` rows being in the cache
/// before this step's rows (whose flags are `kept`). In the paper's scheme a sentence keeps
/// its gists (and BOS). With `previous_sentence_visible` it keeps all its rows for the next
/// sentence to read, and drops instead the window of the sentence before it (its regular
/// rows, held just before its gists). Both incremental engines close through this.
pub(crate) fn closing(model: &GistModel, state: &GistState, held: usize, kept: &[bool]) -> Closing {
    let tail_start = held - state.tail_kept.len();
    let flags: Vec<bool> = state.tail_kept.iter().chain(kept).copied().collect();
    if !model.gist.previous_sentence_visible {
        let keep = flags
            .iter()
            .enumerate()
            .filter(|(_, &k)| k)
            .map(|(i, _)| (tail_start + i) as u32)
            .collect();
        return Closing {
            start: tail_start,
            keep,
            window: 0,
        };
    }
    // The window sits right before the previous sentence's gists, which end at the tail.
    let ng = model.gist.num_gist_tokens;
    let start = if state.window > 0 {
        tail_start - ng - state.window
    } else {
        tail_start
    };
    Closing {
        start,
        keep: (start + state.window..tail_start + flags.len())
            .map(|r| r as u32)
            .collect(),
        window: flags.iter().filter(|&&k| !k).count(),
    }
}

/// The re-rotation of keys moved between rows, `(from, to)` each (the compressed position
/// scheme, where a row is a position): cos and sin (moves, D/2). Both incremental engines
/// compact through this.
pub(crate) fn moved_angles(
    model: &GistModel,
    moves: impl Iterator<Item = (u32, u32)>,
) -> Result<(Tensor, Tensor)> {
    let deltas: Vec<i64> = moves.map(|(f, t)| t as i64 - f as i64).collect();
    rope_shift_angles(&deltas, model.llama.inv_freq(), model.llama.dtype())
}

/// Where the open sentence of `state` (its cache `rows` long, tail included) reads BOS,
/// when gist.json's `sink_distance` moves it from its stored position 0: the sentence's
/// first token is written at its row (compressed positions), and BOS is read D positions
/// before it. Both incremental engines read through this.
pub(crate) fn open_sentence_sink(model: &GistModel, state: &GistState, rows: usize) -> Option<u32> {
    let w = rows - state.tail_kept.len();
    model.gist.bos_sink(w as u32)
}

/// The (L, S) additive mask of one document's L new rows (at `queries`, the last L of its
/// S cached rows) with gist.json's `distance_decay`: each cached row faded by how far it
/// is read from (row = position in the compressed scheme; BOS, row 0, at `sink`), the new
/// rows causal among themselves and faded too.
pub(crate) fn decay_mask(
    decay: &DistanceDecay,
    queries: &[u32],
    keys: usize,
    sink: u32,
    device: &Device,
) -> Result<Tensor> {
    let l = queries.len();
    let held = keys - l;
    let mut mask = vec![f32::NEG_INFINITY; l * keys];
    for (i, (&q, row)) in queries.iter().zip(mask.chunks_mut(keys)).enumerate() {
        fade_row(decay, q, sink, &mut row[..held + i + 1]);
    }
    Tensor::from_vec(mask, (l, keys), device)
}

/// Writes into `row` the fade of cache rows `0..row.len()` as a query at position `query`
/// reads them: row j at position j (the compressed scheme), BOS (row 0) at `sink`. Both
/// incremental engines fade through this.
pub(crate) fn fade_row(decay: &DistanceDecay, query: u32, sink: u32, row: &mut [f32]) {
    for (j, f) in row.iter_mut().enumerate() {
        *f = decay.bias(query, if j == 0 { sink } else { j as u32 });
    }
}

/// Incremental attention: each document's new rows attend to its cache (all visible: kept
/// gists and the tail of the same sentence) and causally to each other.
struct IncrementalPlan<'a> {
    /// Per document: cos and sin (1, D/2) re-rotating BOS (row 0) to where its open
    /// sentence reads it (gist.json `sink_distance`); None: where it is stored.
    sinks: Vec<Option<(Tensor, Tensor)>>,
    /// Per document: the position its open sentence reads BOS at (None: 0).
    sink_at: Vec<Option<u32>>,
    /// gist.json `distance_decay`: then each document's mask covers all of its keys.
    decay: Option<DistanceDecay>,
    /// Position of each new row (compressed scheme: its row in its document's cache).
    positions: &'a [u32],
    states: Vec<&'a mut GistState>,
    groups: Vec<std::ops::Range<usize>>,
    /// Each document's causal (L, L) mask over its new rows, built at the first layer and
    /// shared by all (the cached prefix is all visible and needs none).
    masks: Vec<Option<Tensor>>,
    dtype: DType,
    device: Device,
}

impl AttentionPlan for IncrementalPlan<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.groups.len());
        let first = self.masks.is_empty();
        for (i, (state, rows)) in self.states.iter_mut().zip(&self.groups).enumerate() {
            let l = rows.len();
            let buf = &mut state.layers[layer];
            buf.append(&k.narrow(1, rows.start, l)?, &v.narrow(1, rows.start, l)?)?;
            // BOS read at its sink: row 0's key rotated there in place for this attention
            // and put back after it (one row copied, not the whole cache).
            let stored_bos = match &self.sinks[i] {
                Some((cos, sin)) => Some(buf.rotate_key_row0(cos, sin)?),
                None => None,
            };
            let (kb, vb) = buf.view()?; // (Hkv, P + L, D): the cache, then the new rows
            if first {
                let mask = match &self.decay {
                    Some(decay) => {
                        let sink = self.sink_at[i].unwrap_or(0);
                        let queries = &self.positions[rows.clone()];
                        let mask = decay_mask(decay, queries, kb.dim(1)?, sink, &self.device)?;
                        Some(mask.to_dtype(self.dtype)?)
                    }
                    // One query row sees everything: no mask.
                    None if l > 1 => Some(causal_mask_tensor(l, self.dtype, &self.device)?),
                    None => None,
                };
                self.masks.push(mask);
            }
            let qb = q.narrow(1, rows.start, l)?;
            outs.push(attend(&qb, &kb, &vb, self.masks[i].as_ref(), Ops::Fused)?);
            if let Some(bos) = stored_bos {
                buf.k.slice_set(&bos, 1, 0)?;
            }
        }
        Tensor::cat(&outs, 1)
    }

    fn store(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        for (state, rows) in self.states.iter_mut().zip(&self.groups) {
            let l = rows.len();
            state.layers[layer]
                .append(&k.narrow(1, rows.start, l)?, &v.narrow(1, rows.start, l)?)?;
        }
        Ok(())
    }
}
