//! Carried gist memory: training on text longer than one sequence, read the way a stored
//! document is read (truncated backpropagation through the gist state).
//!
//! Why: a sequence of T regular tokens holds about T / R_c gist rows, so a model trained
//! on 4,096-token sequences never reads more than about 800 of them, while a stored
//! 64k-token book holds over 6,000. With a memory span S, a training document is S
//! consecutive sequences of one book. Each sequence after the first reads the kept rows
//! (gists, and BOS where kept) of those before it, as the keys and values computed when
//! they were trained: detached, so no gradient flows back into them (as in Transformer-XL),
//! and at the positions the compressed scheme stores them at. Reading far then costs
//! attention over the memory, not a longer backward.
//!
//! With `previous_sentence_visible` the memory also holds the last sentence of the text
//! before (its keys at the positions the next sentence reads them), which only the next
//! sequence's first sentence reads, as the incremental path holds it until then.
//!
//! With the weights unchanged, a sequence read after its memory computes what the whole
//! text computes in one forward (tests/equivalence.rs): the memory is exactly the stored
//! state.

use super::optim::scored_loss;
use crate::engine::whole::Layout;
use crate::model::attention::{AttentionPlan, Carried, SentencePlan};
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use anyhow::ensure;
use candle_core::{Result, Tensor};

/// One document's carried rows.
#[derive(Clone, Default)]
pub struct Memory {
    /// Per layer: keys (Hkv, R, D) rotated at their stored positions, values (Hkv, R, D).
    layers: Vec<(Tensor, Tensor)>,
    /// R: the kept tokens of the text before.
    rows: usize,
    /// With `previous_sentence_visible`: per layer, the keys (at window positions) and
    /// values of the text's last segment, held whole for the next sequence's first
    /// segment, as the incremental path holds it.
    held: Vec<(Tensor, Tensor)>,
    /// Its rows, and how many of them (its gists) are also among the R kept rows.
    held_rows: usize,
    held_kept: usize,
}

impl Memory {
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// What a sequence continuing this memory continues (for [`Layout::continued`]).
    pub fn carried(&self) -> Carried {
        Carried {
            kept: self.rows as u32,
            held: self.held_rows as u32,
            held_kept: self.held_kept as u32,
        }
    }

    /// This memory followed by `more` (per layer keys and values of new kept rows), its
    /// held segment replaced by `held` when the sequence held one.
    fn extended(&self, more: Vec<(Tensor, Tensor)>, rows: usize, held: Held) -> Result<Memory> {
        let mut next = self.clone();
        if let Some((layers, held_rows, held_kept)) = held {
            (next.held, next.held_rows, next.held_kept) = (layers, held_rows, held_kept);
        }
        if rows == 0 {
            return Ok(next);
        }
        next.layers = if self.rows == 0 {
            more
        } else {
            self.layers
                .iter()
                .zip(more)
                .map(|((k, v), (k2, v2))| {
                    Ok((Tensor::cat(&[k, &k2], 1)?, Tensor::cat(&[v, &v2], 1)?))
                })
                .collect::<Result<Vec<_>>>()?
        };
        next.rows += rows;
        Ok(next)
    }
}

/// A sequence's last segment as the next one reads it: per layer (keys, values), its rows,
/// and how many of them are kept.
type Held = Option<(Vec<(Tensor, Tensor)>, usize, usize)>;

/// Sentence attention (compressed scheme) over this forward's rows plus each document's
/// memory, which it appends to the keys and values of every layer; it also keeps a
/// detached copy of each document's new kept rows, layer by layer.
struct MemoryPlan<'a> {
    inner: SentencePlan,
    memory: &'a [Memory],
    /// Each document's kept tokens in this forward (None: it keeps none): their rows of
    /// the keys at stored positions (N + row) and of the values (row).
    kept: Vec<Option<(Tensor, Tensor)>>,
    /// Per document, per layer: the new kept rows' (keys, values).
    captured: Vec<Vec<(Tensor, Tensor)>>,
    /// With the window, each document's last segment: its rows of the keys at window
    /// positions (2N + row) and of the values (row).
    held: Vec<Option<(Tensor, Tensor)>>,
    /// Per document, per layer: that segment's (keys, values).
    captured_held: Vec<Vec<(Tensor, Tensor)>>,
}

impl MemoryPlan<'_> {
    /// Keeps this layer's new rows, and returns k, v with the memories appended.
    fn read(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kd, vd) = (k.detach(), v.detach());
        for (doc, kept) in self.kept.iter().enumerate() {
            if let Some((keys, values)) = kept {
                self.captured[doc].push((kd.index_select(keys, 1)?, vd.index_select(values, 1)?));
            }
        }
        for (doc, held) in self.held.iter().enumerate() {
            if let Some((keys, values)) = held {
                self.captured_held[doc]
                    .push((kd.index_select(keys, 1)?, vd.index_select(values, 1)?));
            }
        }
        let mut ks = vec![k.clone()];
        let mut vs = vec![v.clone()];
        for m in self.memory {
            if m.rows > 0 {
                let (mk, mv) = &m.layers[layer];
                ks.push(mk.clone());
                vs.push(mv.clone());
            }
            if m.held_rows > 0 {
                let (hk, hv) = &m.held[layer];
                ks.push(hk.clone());
                vs.push(hv.clone());
            }
        }
        if ks.len() == 1 {
            return Ok((k.clone(), v.clone()));
        }
        Ok((Tensor::cat(&ks, 1)?, Tensor::cat(&vs, 1)?))
    }
}

impl AttentionPlan for MemoryPlan<'_> {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (k, v) = self.read(layer, k, v)?;
        self.inner.attend(layer, q, &k, &v)
    }

    fn attend_rows(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (k, v) = self.read(layer, k, v)?;
        self.inner.attend_rows(layer, q, &k, &v)
    }
}

/// The mean regular-token loss of `seqs` (as [`super::optim::loss`]), sequence `i`
/// continuing `memory[i]`, and each memory extended by what its sequence keeps. A
/// sequence that continues a memory must not start with BOS: the memory holds it.
pub fn loss_continued(
    model: &GistModel,
    seqs: &[Vec<Segment>],
    memory: &[Memory],
    gist_loss: bool,
    ops: Ops,
) -> anyhow::Result<(Tensor, usize, Vec<Memory>)> {
    let layout = Layout::continued(model, seqs, true, &carried(memory));
    let mut extended = Vec::new();
    let (loss, n) = scored_loss(model, &layout, gist_loss, |rows| {
        let (logits, more) = forward_continued(model, &layout, memory, ops, rows)?;
        extended = more;
        Ok(logits)
    })?;
    Ok((loss, n, extended))
}

/// Each memory extended by what its sequence of `seqs` keeps, with no loss: the forward
/// computes logits for one row only (a resumed run rebuilding the memories it lost).
pub fn extend(
    model: &GistModel,
    seqs: &[Vec<Segment>],
    memory: &[Memory],
    ops: Ops,
) -> anyhow::Result<Vec<Memory>> {
    let layout = Layout::continued(model, seqs, true, &carried(memory));
    let one_row = Logits::Rows(Tensor::new(&[0u32], model.llama.device())?);
    Ok(forward_continued(model, &layout, memory, ops, &one_row)?.1)
}

fn carried(memory: &[Memory]) -> Vec<Carried> {
    memory.iter().map(Memory::carried).collect()
}

/// The sentence-attention forward of `layout` (made by [`Layout::continued`] with each
/// memory's row count), document `d` reading `memory[d]`. Returns the logits asked for and
/// the memories extended by each document's kept rows.
pub fn forward_continued(
    model: &GistModel,
    layout: &Layout,
    memory: &[Memory],
    ops: Ops,
    logits: &Logits,
) -> anyhow::Result<(Option<Tensor>, Vec<Memory>)> {
    ensure!(
        memory.len() == layout.docs.len(),
        "{} memories for {} sequences",
        memory.len(),
        layout.docs.len()
    );
    ensure!(
        !matches!(logits, Logits::Skip),
        "a carried memory is read from every layer's attention: the forward must run them all"
    );
    ensure!(
        layout.stored.is_some(),
        "a carried memory needs the compressed position scheme (gist.json `positions`)"
    );
    let dev = model.llama.device();
    let n = layout.ids.len();
    let mut inner = SentencePlan::compressed_with_memory(
        &layout.docs,
        n,
        &carried(memory),
        model.llama.inv_freq(),
        model.llama.dtype(),
        dev,
        ops,
    )?;
    let stored = layout.stored.as_deref().unwrap_or_default();
    if let Some(decay) = &model.gist.distance_decay {
        let copies: Vec<&[u32]> = std::iter::once(layout.positions.as_slice())
            .chain(layout.more_positions(stored))
            .collect();
        inner = inner.with_distance_decay(decay, &layout.positions, &copies);
    }
    let mut kept = Vec::with_capacity(layout.docs.len());
    let mut new_rows = Vec::with_capacity(layout.docs.len());
    let mut held = Vec::with_capacity(layout.docs.len());
    let mut held_sizes = Vec::with_capacity(layout.docs.len());
    for d in &layout.docs {
        // With the window, the last segment is what the next sequence's first one reads.
        let last = match (d.window, d.segment.last()) {
            (true, Some(&seg)) => {
                let from = d.segment.iter().position(|&s| s == seg).unwrap_or(0);
                Some(from..d.segment.len())
            }
            _ => None,
        };
        held_sizes.push(
            last.as_ref()
                .map(|r| (r.len(), d.kept[r.clone()].iter().filter(|&&k| k).count())),
        );
        held.push(match last {
            Some(r) => {
                let values: Vec<u32> = r.map(|i| (d.rows.start + i) as u32).collect();
                let keys: Vec<u32> = values.iter().map(|v| v + 2 * n as u32).collect();
                Some((
                    Tensor::new(keys.as_slice(), dev)?,
                    Tensor::new(values.as_slice(), dev)?,
                ))
            }
            None => None,
        });
        let rows: Vec<u32> = d
            .rows
            .clone()
            .zip(&d.kept)
            .filter(|(_, &k)| k)
            .map(|(r, _)| r as u32)
            .collect();
        new_rows.push(rows.len());
        kept.push(if rows.is_empty() {
            None
        } else {
            let stored: Vec<u32> = rows.iter().map(|r| r + n as u32).collect();
            Some((
                Tensor::new(stored.as_slice(), dev)?,
                Tensor::new(rows.as_slice(), dev)?,
            ))
        });
    }
    let mut plan = MemoryPlan {
        inner,
        memory,
        kept,
        captured: vec![Vec::new(); layout.docs.len()],
        held,
        captured_held: vec![Vec::new(); layout.docs.len()],
    };
    let ids = Tensor::new(layout.ids.as_slice(), dev)?;
    let out = model.llama.forward_stored(
        &ids,
        &layout.positions,
        &layout.more_positions(stored),
        &mut plan,
        ops,
        logits,
    )?;
    let extended = memory
        .iter()
        .zip(plan.captured)
        .zip(new_rows)
        .zip(plan.captured_held.into_iter().zip(held_sizes))
        .map(|(((m, c), r), (h, size))| m.extended(c, r, size.map(|(rows, k)| (h, rows, k))))
        .collect::<Result<Vec<_>>>()?;
    Ok((out, extended))
}

/// Whether sequence `b` continues sequence `a` of the same document: its text starts where
/// `a`'s ended or later (sequences are cut from documents in order, and a new document
/// starts again near byte 0).
pub fn continues(a: &[Segment], b: &[Segment]) -> bool {
    match (a.last(), b.first()) {
        (Some(x), Some(y)) => x.close && y.bytes.start >= x.bytes.end,
        _ => false,
    }
}

/// Starts of the runs of `span` sequences of `data` that each continue the one before.
pub fn span_starts(data: &[Vec<Segment>], span: usize) -> Vec<usize> {
    let span = span.max(1);
    // run[i]: how many sequences from i on continue one another (1 at least).
    let mut run = vec![1usize; data.len()];
    for i in (0..data.len().saturating_sub(1)).rev() {
        if continues(&data[i], &data[i + 1]) {
            run[i] = run[i + 1] + 1;
        }
    }
    (0..data.len()).filter(|&i| run[i] >= span).collect()
}

/// `seq` as the continuation of a document: without its leading BOS (the memory holds the
/// document's BOS).
pub fn without_bos(seq: &[Segment], bos: Option<u32>) -> Vec<Segment> {
    let mut seq = seq.to_vec();
    if let (Some(b), Some(first)) = (bos, seq.first_mut()) {
        if first.tokens.first() == Some(&b) {
            first.tokens.remove(0);
        }
    }
    seq
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(bytes: &[(usize, usize)], last_closed: bool) -> Vec<Segment> {
        let n = bytes.len();
        bytes
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| Segment {
                tokens: vec![1, 2],
                bytes: a..b,
                close: i + 1 < n || last_closed,
            })
            .collect()
    }

    #[test]
    fn spans_run_through_one_document_and_stop_at_the_next() {
        let data = vec![
            seq(&[(0, 10), (10, 20)], true), // doc A
            seq(&[(21, 30)], true),          // A
            seq(&[(30, 40)], true),          // A
            seq(&[(0, 5)], false),           // doc B, its last segment open
            seq(&[(5, 9)], true),            // B, but cut inside a sentence
            seq(&[(9, 12)], true),           // B
            seq(&[(2, 7), (8, 11)], true),   // doc C (starts again near 0)
        ];
        assert!(continues(&data[0], &data[1]));
        assert!(!continues(&data[2], &data[3]), "a new document");
        assert!(
            !continues(&data[3], &data[4]),
            "an open segment is not kept"
        );
        assert_eq!(span_starts(&data, 1), (0..7).collect::<Vec<_>>());
        assert_eq!(span_starts(&data, 2), vec![0, 1, 4]);
        assert_eq!(span_starts(&data, 3), vec![0]);
        assert!(span_starts(&data, 4).is_empty());
    }

    #[test]
    fn a_continuation_drops_only_a_leading_bos() {
        let mut s = seq(&[(0, 3), (3, 6)], true);
        s[0].tokens = vec![9, 1, 2];
        s[1].tokens = vec![9, 4];
        let t = without_bos(&s, Some(9));
        assert_eq!(
            (t[0].tokens.clone(), t[1].tokens.clone()),
            (vec![1, 2], vec![9, 4])
        );
        assert_eq!(without_bos(&s, None)[0].tokens, vec![9, 1, 2]);
    }
}
