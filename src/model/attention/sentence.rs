//! The parallel path's sentence-attention plans: which keys each block of a document's
//! rows reads under the gist mask ([`super::sentence_mask`]), in both position schemes,
//! with a carried memory and with the previous sentence kept visible; and the dense plan
//! the reference code's way, for comparison.

use super::{as_rows, attend, mask_tensor, sentence_mask, AttentionPlan, BLOCK};
use crate::model::config::DistanceDecay;
use crate::model::flash::Group;
use crate::model::ops::{rope, Ops};
use candle_core::{DType, Device, Result, Tensor};
use std::ops::Range;

/// What a document of the parallel path continues (`Layout::continued`): the text before
/// it, read from a carried memory (`train::memory`), not from the layout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Kept tokens (gists, BOS) of the text before.
    pub kept: u32,
    /// With `previous_sentence_visible`: the rows of that text's last segment, held whole
    /// for this document's first segment to read ...
    pub held: u32,
    /// ... of which this many are also among `kept` (its gists).
    pub held_kept: u32,
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
    /// Whether each segment also sees the whole segment before it (gist.json
    /// `previous_sentence_visible`).
    pub window: bool,
    /// With gist.json `sink_distance` (compressed scheme): per segment, the position it
    /// reads BOS at (0: where BOS is stored). Empty: every segment reads it at 0.
    pub bos_sink: Vec<u32>,
}

impl SentenceDoc {
    /// Local rows of the segment before the one starting at local row `a` (empty for the
    /// first).
    fn previous_segment(&self, a: usize) -> Range<usize> {
        let mut p = a;
        if a > 0 {
            let prev = self.segment[a - 1];
            while p > 0 && self.segment[p - 1] == prev {
                p -= 1;
            }
        }
        p..a
    }
}

/// Parallel sentence attention, blockwise: each block (whole segments, about [`BLOCK`]
/// queries) attends to the kept tokens before it plus itself, under [`sentence_mask`].
/// Memory per block is L × (kept before + L), so it grows linearly with the document.
pub struct SentencePlan {
    groups: std::sync::Arc<[Group]>,
    /// The groups as index and mask tensors, for attention group by group; built on first
    /// use (training runs the groups in one node and never needs them).
    composed: Option<Vec<SentenceGroup>>,
    /// BOS's key copies at the positions segments read it (gist.json `sink_distance`),
    /// appended after the forward's keys.
    sinks: Option<Sinks>,
    /// Positions of the key rows past the forward's copies: each carried memory row (kept,
    /// then held), then each BOS sink copy. What [`Self::with_distance_decay`] reads.
    extra_positions: Vec<u32>,
    dtype: DType,
    device: Device,
    ops: Ops,
}

/// Key rows appended to a forward's keys: `src` (R,) u32, rows of keys at position 0 (BOS,
/// where it is stored), each re-rotated by cos and sin (R, D/2) to where it is read.
struct Sinks {
    src: Tensor,
    cos: Tensor,
    sin: Tensor,
}

struct SentenceGroup {
    rows: Range<usize>,
    /// Flat rows of the keys: kept tokens before the block, then the block. In the
    /// compressed scheme, rows of the doubled keys (N.. for stored copies).
    keys: Tensor, // (S,) u32
    /// Flat rows of the values (the same rows, never doubled).
    values: Tensor, // (S,) u32
    /// The mask of the last M keys (L, M); the kept prefix before them is all visible.
    inner: Tensor,
}

/// Splits a document's local rows `a..` into a block of whole segments, up to [`BLOCK`]
/// rows (at least one segment). Returns the block's end.
fn block_end(segment: &[u32], a: usize) -> usize {
    let n = segment.len();
    let mut b = a;
    loop {
        let seg = segment[b];
        let mut e = b;
        while e < n && segment[e] == seg {
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
    b
}

impl SentencePlan {
    fn from_groups(groups: Vec<Group>, dtype: DType, device: &Device, ops: Ops) -> Result<Self> {
        Ok(Self {
            groups: groups.into(),
            composed: None,
            sinks: None,
            extra_positions: Vec::new(),
            dtype,
            device: device.clone(),
            ops,
        })
    }

    /// The groups as tensors (see `composed`).
    fn composed(&mut self) -> Result<&[SentenceGroup]> {
        if self.composed.is_none() {
            let (dtype, device) = (self.dtype, &self.device);
            let built = self
                .groups
                .iter()
                .map(|g| {
                    Ok(SentenceGroup {
                        rows: g.rows.clone(),
                        keys: Tensor::new(g.keys.as_slice(), device)?,
                        values: Tensor::new(g.values.as_slice(), device)?,
                        inner: mask_tensor(g.mask.clone(), g.rows.len(), g.masked, dtype, device)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            self.composed = Some(built);
        }
        Ok(self.composed.as_deref().unwrap_or_default())
    }

    pub fn new(docs: &[SentenceDoc], dtype: DType, device: &Device, ops: Ops) -> Result<Self> {
        let mut groups = Vec::new();
        for doc in docs {
            let n = doc.rows.len();
            let mut kept_before: Vec<u32> = Vec::new();
            let mut a = 0;
            while a < n {
                let b = block_end(&doc.segment, a);
                let block: Vec<usize> = (a..b).collect();
                // Masked columns: with the window, the regular rows of the segment before
                // the block (its kept rows are among `kept_before`), then the block.
                let mut cols: Vec<usize> = if doc.window {
                    doc.previous_segment(a).filter(|&j| !doc.kept[j]).collect()
                } else {
                    Vec::new()
                };
                cols.extend(a..b);
                let inner = sentence_mask(&block, &cols, &doc.segment, &doc.kept, doc.window);
                let mut keys = kept_before.clone();
                keys.extend(cols.iter().map(|&i| (doc.rows.start + i) as u32));
                groups.push(Group {
                    rows: doc.rows.start + a..doc.rows.start + b,
                    values: keys.clone(),
                    keys,
                    mask: inner,
                    masked: cols.len(),
                });
                kept_before.extend(
                    (a..b)
                        .filter(|&i| doc.kept[i])
                        .map(|i| (doc.rows.start + i) as u32),
                );
                a = b;
            }
        }
        Self::from_groups(groups, dtype, device, ops)
    }

    /// The plan for the compressed position scheme, whose forward doubles the keys
    /// (`Llama::forward_stored`): rows `..n` rotated where each token was written, rows
    /// `n..2n` where it is stored (`n` the forward's row count). A query reads its own
    /// sentence at written positions, as the incremental path does before the sentence
    /// closes, and every earlier gist at its stored position, as the incremental path does
    /// after re-rotating it. So a block's keys are: the stored copies of the kept tokens
    /// before it, the stored copies of its own kept tokens (visible to later segments of the
    /// block), then its rows as written (visible within their segment, causally).
    ///
    /// With the window (`previous_sentence_visible`) the forward triples the keys: rows
    /// `2n..3n` at each token's *window* position, where the segment after it reads it
    /// (the incremental path holds a closed segment whole, right after the stored gists
    /// before it, until the next one closes). A query then reads the segment before its own
    /// at window positions, and the stored copies only of the gists before that.
    ///
    /// With `sink_distance` ([`SentenceDoc::bos_sink`]), a segment reading BOS away from 0
    /// reads instead a copy of BOS's key rotated there (keys appended after all others,
    /// made with `inv_freq`), and BOS's own rows are masked from it.
    pub fn compressed(
        docs: &[SentenceDoc],
        n: usize,
        inv_freq: &Tensor,
        dtype: DType,
        device: &Device,
        ops: Ops,
    ) -> Result<Self> {
        Self::compressed_with_memory(docs, n, &[], inv_freq, dtype, device, ops)
    }

    /// [`Self::compressed`] where document `d` also reads the rows `memory[d]` carries:
    /// the kept tokens of earlier text (keys already at their stored positions), visible to
    /// all of its queries, then, with the window, that text's last segment held whole (at
    /// its window positions), which only the first segment reads, as it reads that
    /// segment's gists there and not among the kept rows. The plan expects the rows
    /// appended after this forward's key copies, document after document, kept then held:
    /// keys at rows `2n..` (`3n..` with the window), values at rows `n..` (see
    /// `train::memory::MemoryPlan`). Missing entries: no memory.
    pub fn compressed_with_memory(
        docs: &[SentenceDoc],
        n: usize,
        memory: &[Carried],
        inv_freq: &Tensor,
        dtype: DType,
        device: &Device,
        ops: Ops,
    ) -> Result<Self> {
        let mut groups = Vec::new();
        let mut memory_start = 0;
        // Key copies in the forward: written and stored, and window positions with the
        // window; the memory's keys follow them, then BOS's sink copies.
        let copies = if docs.iter().any(|d| d.window) { 3 } else { 2 };
        let sink_base = copies * n
            + memory
                .iter()
                .take(docs.len())
                .map(|c| (c.kept + c.held) as usize)
                .sum::<usize>();
        let mut sink_rows: Vec<(u32, u32)> = Vec::new(); // (key row at position 0, position)
                                                         // Where the memory's rows sit: a kept row at its index, the held segment right
                                                         // after the kept rows before it (`Layout::continued` starts the text after them).
        let mut memory_positions = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            let carried = memory.get(d).copied().unwrap_or_default();
            let (kept_m, held_m) = (carried.kept as usize, carried.held as usize);
            memory_positions.extend(0..carried.kept);
            let held_at = carried.kept - carried.held_kept;
            memory_positions.extend(held_at..held_at + carried.held);
            let kept_rows = memory_start..memory_start + kept_m;
            let held_rows = kept_rows.end..kept_rows.end + held_m;
            memory_start += kept_m + held_m;
            // The held segment's gists, among the kept rows: hidden from the first segment.
            let hidden = if held_m > 0 {
                kept_rows.end - carried.held_kept as usize..kept_rows.end
            } else {
                kept_rows.end..kept_rows.end
            };
            let len = doc.rows.len();
            let flat = |i: usize| (doc.rows.start + i) as u32;
            // With a sink: BOS is the memory's first row, or this document's first.
            let sinking = !doc.bos_sink.is_empty();
            let bos_kv = if kept_m > 0 {
                (
                    (copies * n + kept_rows.start) as u32,
                    (n + kept_rows.start) as u32,
                )
            } else {
                (n as u32 + flat(0), flat(0))
            };
            // BOS among the memory's rows: the first kept row, and the held segment's first
            // row when that segment is the document's first (all kept rows are its).
            let bos_in_memory = |m: usize| {
                sinking
                    && kept_m > 0
                    && (m == kept_rows.start
                        || (held_m > 0
                            && carried.kept == carried.held_kept
                            && m == held_rows.start))
            };
            let bos_here = |j: usize| sinking && kept_m == 0 && j == 0;
            let sink_of = |s: u32| doc.bos_sink.get(s as usize).copied().unwrap_or(0);
            let mut kept_before: Vec<usize> = Vec::new(); // local rows
            let mut a = 0;
            while a < len {
                let b = block_end(&doc.segment, a);
                // With the window, the stored gists of the segment before the block are
                // masked (its first segment reads that segment at window positions), and
                // that segment and the block itself have window copies.
                let (open_before, windowed): (Vec<usize>, Vec<usize>) = if doc.window {
                    let prev = doc.previous_segment(a);
                    let split = kept_before.partition_point(|&j| j < prev.start);
                    let open = kept_before.split_off(split);
                    (open, prev.chain(a..b).collect())
                } else {
                    (Vec::new(), Vec::new())
                };
                let kept_here: Vec<usize> = (a..b).filter(|&i| doc.kept[i]).collect();
                let stored_masked: Vec<usize> =
                    open_before.iter().chain(&kept_here).copied().collect();
                // Memory rows only some of the block reads: in the first block, the held
                // segment (for segment 0) and its gists among the kept rows (for the rest).
                let (mut memory_visible, memory_masked): (Vec<usize>, Vec<usize>) = if a == 0 {
                    (
                        (kept_rows.start..hidden.start).collect(),
                        hidden.clone().chain(held_rows.clone()).collect(),
                    )
                } else {
                    (kept_rows.clone().collect(), Vec::new())
                };
                // With a sink, BOS leaves the all-visible prefix: a masked column, read there
                // only by segments whose sink is at 0; the others read their own copy.
                let mut bos_col = None;
                if sinking {
                    if let Some(at) = memory_visible.iter().position(|&m| bos_in_memory(m)) {
                        memory_visible.remove(at);
                        bos_col = Some(bos_kv);
                    } else if kept_before.first().is_some_and(|&i| bos_here(i)) {
                        bos_col = Some(bos_kv);
                    }
                }
                // Segments of the block reading BOS at a sink, one key copy each (none
                // without a sink: `sink_of` is then 0).
                let mut sinks_here: Vec<u32> = doc.segment[a..b]
                    .iter()
                    .copied()
                    .filter(|&s| sink_of(s) > 0)
                    .collect();
                sinks_here.dedup();
                let cols = usize::from(bos_col.is_some())
                    + memory_masked.len()
                    + stored_masked.len()
                    + windowed.len()
                    + sinks_here.len()
                    + (b - a);
                let mut inner = Vec::with_capacity((b - a) * cols);
                let mask = |visible: bool| if visible { 0.0 } else { f32::NEG_INFINITY };
                for i in a..b {
                    let s = doc.segment[i];
                    let sunk = sink_of(s) > 0;
                    if bos_col.is_some() {
                        inner.push(mask(!sunk));
                    }
                    for &m in &memory_masked {
                        let visible = if held_rows.contains(&m) {
                            s == 0
                        } else {
                            s > 0
                        };
                        inner.push(mask(visible && !(sunk && bos_in_memory(m))));
                    }
                    let reads_stored = |j: usize| {
                        if doc.window {
                            doc.segment[j] + 1 < s
                        } else {
                            doc.segment[j] < s
                        }
                    };
                    for &j in &stored_masked {
                        inner.push(mask(reads_stored(j) && !(sunk && bos_here(j))));
                    }
                    for &j in &windowed {
                        let visible = doc.segment[j] + 1 == s;
                        inner.push(mask(visible && !(sunk && bos_here(j))));
                    }
                    for &t in &sinks_here {
                        inner.push(mask(t == s));
                    }
                    for j in a..b {
                        let visible = j <= i && doc.segment[j] == s;
                        inner.push(mask(visible));
                    }
                }
                let prefix: Vec<usize> = kept_before
                    .iter()
                    .copied()
                    .filter(|&i| !bos_here(i))
                    .collect();
                let mut keys: Vec<u32> = memory_visible
                    .iter()
                    .map(|&m| (copies * n + m) as u32)
                    .collect();
                let mut values: Vec<u32> = memory_visible.iter().map(|&m| (n + m) as u32).collect();
                keys.extend(prefix.iter().map(|&i| n as u32 + flat(i)));
                values.extend(prefix.iter().map(|&i| flat(i)));
                if let Some((k, v)) = bos_col {
                    keys.push(k);
                    values.push(v);
                }
                keys.extend(memory_masked.iter().map(|&m| (copies * n + m) as u32));
                values.extend(memory_masked.iter().map(|&m| (n + m) as u32));
                keys.extend(stored_masked.iter().map(|&i| n as u32 + flat(i)));
                values.extend(stored_masked.iter().map(|&i| flat(i)));
                keys.extend(windowed.iter().map(|&i| 2 * n as u32 + flat(i)));
                values.extend(windowed.iter().map(|&i| flat(i)));
                for &t in &sinks_here {
                    keys.push((sink_base + sink_rows.len()) as u32);
                    values.push(bos_kv.1);
                    sink_rows.push((bos_kv.0, sink_of(t)));
                }
                keys.extend((a..b).map(flat));
                values.extend((a..b).map(flat));
                groups.push(Group {
                    rows: doc.rows.start + a..doc.rows.start + b,
                    keys,
                    values,
                    mask: inner,
                    masked: cols,
                });
                kept_before.extend(open_before);
                kept_before.extend(kept_here);
                a = b;
            }
        }
        let mut plan = Self::from_groups(groups, dtype, device, ops)?;
        plan.extra_positions = memory_positions;
        if !sink_rows.is_empty() {
            let (src, at): (Vec<u32>, Vec<u32>) = sink_rows.into_iter().unzip();
            plan.extra_positions.extend(&at);
            let (cos, sin) = crate::model::ops::rope_angles(&at, inv_freq, dtype)?;
            plan.sinks = Some(Sinks {
                src: Tensor::new(src, device)?,
                cos,
                sin,
            });
        }
        Ok(plan)
    }

    /// This plan with gist.json's `distance_decay`: every key a query reads is faded by how
    /// far it is read from, as the incremental engines fade it (`engine::state::decay_mask`).
    /// `queries` are the forward's N written positions; `copies` the positions of its key
    /// copies (written, stored, and window with the window), N each, in the order
    /// [`Self::compressed_with_memory`] lays them out. Each group's mask then covers all of
    /// its keys, not only the last M.
    pub fn with_distance_decay(
        mut self,
        decay: &DistanceDecay,
        queries: &[u32],
        copies: &[&[u32]],
    ) -> Self {
        let at: Vec<u32> = copies
            .iter()
            .flat_map(|c| c.iter().copied())
            .chain(self.extra_positions.iter().copied())
            .collect();
        let groups: Vec<Group> = self
            .groups
            .iter()
            .map(|g| {
                let (s, m) = (g.keys.len(), g.masked);
                let mut mask = Vec::with_capacity(g.rows.len() * s);
                for (i, r) in g.rows.clone().enumerate() {
                    let q = queries[r];
                    let inner = &g.mask[i * m..(i + 1) * m];
                    let shown = std::iter::repeat_n(&0.0, s - m).chain(inner);
                    mask.extend(g.keys.iter().zip(shown).map(|(&k, &v)| {
                        if v == f32::NEG_INFINITY {
                            v
                        } else {
                            v + decay.bias(q, at[k as usize])
                        }
                    }));
                }
                Group {
                    rows: g.rows.clone(),
                    keys: g.keys.clone(),
                    values: g.values.clone(),
                    mask,
                    masked: s,
                }
            })
            .collect();
        self.groups = groups.into();
        self.composed = None;
        self
    }

    /// The forward's keys (Hkv, S, D), followed by BOS's sink copies when there are any.
    fn with_sinks(&self, k: &Tensor) -> Result<Tensor> {
        match &self.sinks {
            Some(s) => {
                let bos = rope(&k.index_select(&s.src, 1)?, &s.cos, &s.sin, self.ops)?;
                Tensor::cat(&[k, &bos], 1)
            }
            None => Ok(k.clone()),
        }
    }

    /// The groups one by one; `k` already holds the sink copies.
    fn attend_each(&mut self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let ops = self.ops;
        let groups = self.composed()?;
        let mut outs = Vec::with_capacity(groups.len());
        for g in groups {
            let l = g.rows.len();
            let qb = q.narrow(1, g.rows.start, l)?;
            let kb = k.index_select(&g.keys, 1)?; // (Hkv, P + M, D)
            let vb = v.index_select(&g.values, 1)?;
            outs.push(attend(&qb, &kb, &vb, Some(&g.inner), ops)?);
        }
        Tensor::cat(&outs, 1)
    }
}

impl AttentionPlan for SentencePlan {
    /// In training, every group in one node of the graph (see [`super::flash::grouped`]);
    /// at inference, and where the tiled kernel does not apply, group by group.
    fn attend_rows(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let k = &self.with_sinks(k)?;
        if self.ops == Ops::Differentiable {
            if let Some(y) = crate::model::flash::attend_groups(q, k, v, &self.groups)? {
                return Ok(y);
            }
        }
        as_rows(&self.attend_each(q, k, v)?)
    }

    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let k = self.with_sinks(k)?;
        self.attend_each(q, &k, v)
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
                let mask = sentence_mask(&idx, &idx, &doc.segment, &doc.kept, doc.window);
                Ok((doc.rows.clone(), mask_tensor(mask, n, n, dtype, device)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self { groups, ops })
    }
}

impl AttentionPlan for DensePlan {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two documents of sentences of 5-40 tokens with N_g = 2 gists each, long enough to
    /// make several blocks.
    fn sentence_docs() -> (Vec<SentenceDoc>, usize) {
        let mut docs = Vec::new();
        let mut start = 0;
        for (d, len) in [(0usize, 1100usize), (1, 300)] {
            let (mut segment, mut kept) = (Vec::new(), Vec::new());
            let mut seg = 0u32;
            while segment.len() < len {
                let n = 5 + (seg as usize * 7 + d * 3) % 36;
                segment.extend(std::iter::repeat_n(seg, n + 2));
                kept.extend(std::iter::repeat_n(false, n));
                kept.extend([true, true]);
                seg += 1;
            }
            let n = segment.len();
            docs.push(SentenceDoc {
                rows: start..start + n,
                segment,
                kept,
                window: false,
                bos_sink: Vec::new(),
            });
            start += n;
        }
        (docs, start)
    }

    /// The grouped node against the groups one by one (narrow, index_select, the tiled
    /// node per group, cat): values and the gradients of q, k and v, in both position
    /// schemes' plans (the compressed one reads keys and values from different rows).
    #[test]
    fn the_grouped_node_computes_what_the_groups_one_by_one_compute() {
        if !crate::model::simd::avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        let (mut docs, n) = sentence_docs();
        let (hq, hkv, d) = (4, 2, 32);
        // The last case reads BOS (row 0, kept) at sinks: key copies after the others.
        let cases = [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, false),
            (true, true, true),
        ];
        for (compressed, window, sink) in cases {
            for doc in docs.iter_mut() {
                doc.window = window;
                doc.kept[0] |= sink;
                let segments = *doc.segment.last().unwrap() as usize + 1;
                doc.bos_sink = match sink {
                    true => (0..segments as u32)
                        .map(|s| s.saturating_sub(2) * 3)
                        .collect(),
                    false => Vec::new(),
                };
            }
            let nk = match (compressed, window) {
                (false, _) => n,
                (true, false) => 2 * n,
                (true, true) => 3 * n,
            };
            let mut plan = if compressed {
                let inv_freq = Tensor::ones(d / 2, DType::F32, &dev).unwrap();
                SentencePlan::compressed(&docs, n, &inv_freq, DType::F32, &dev, Ops::Differentiable)
            } else {
                SentencePlan::new(&docs, DType::F32, &dev, Ops::Differentiable)
            }
            .unwrap();
            assert!(plan.groups.len() > 3, "{} groups", plan.groups.len());
            let var = crate::model::simd::random_var;
            let (q, k, v) = (
                var((hq, n, d), 0.2),
                var((hkv, nk, d), 1.0),
                var((hkv, n, d), 1.0),
            );
            let w = Tensor::randn(0f32, 1.0, (n, hq * d), &dev).unwrap();
            let grouped = plan.attend_rows(0, &q, &k, &v).unwrap();
            // The grouped kernel ran (not the per-group fallback).
            assert_eq!(plan.sinks.is_some(), sink);
            let with_sinks = plan.with_sinks(&k).unwrap();
            let direct =
                crate::model::flash::attend_groups(&q, &with_sinks, &v, &plan.groups).unwrap();
            assert!(direct.is_some_and(|y| crate::model::simd::max_abs_diff(&y, &grouped) == 0.0));
            let one_by_one = plan
                .attend(0, &q, &k, &v)
                .unwrap()
                .transpose(0, 1)
                .unwrap()
                .reshape((n, hq * d))
                .unwrap();
            let diff = crate::model::simd::max_abs_diff(&grouped, &one_by_one);
            assert!(
                diff < 1e-6,
                "compressed {compressed} window {window}: values differ by {diff}"
            );
            let grads = |y: &Tensor| (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (ga, gb) = (grads(&grouped), grads(&one_by_one));
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let (a, b) = (ga.get(x).unwrap(), gb.get(x).unwrap());
                let diff = crate::model::simd::max_abs_diff(a, b);
                let scale = crate::model::simd::max_abs(b);
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "compressed {compressed} window {window}: d{name} differs by {diff} (largest {scale})"
                );
            }
        }
    }
}
