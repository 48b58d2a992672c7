//! The parallel path: whole gist-augmented documents in one forward (training, evaluation,
//! and the reference for the incremental path), with sentence attention computed
//! blockwise, or plain causal attention for baselines.

use crate::model::attention::{Carried, CausalPlan, SentenceDoc, SentencePlan};
use crate::model::config::PositionScheme;
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use candle_core::{Result, Tensor};

/// Documents laid out as flat rows, gists inserted after each closed segment.
#[derive(Debug, Clone)]
pub struct Layout {
    pub ids: Vec<u32>,
    /// Position of each token within its document, as written (see
    /// [`crate::model::config::PositionScheme`]).
    pub positions: Vec<u32>,
    /// In the compressed scheme with gists: where each token is stored (a kept token's
    /// index among its document's kept tokens; other tokens are never stored and keep
    /// their written position). None: stored where written.
    pub stored: Option<Vec<u32>>,
    /// In the compressed scheme with `previous_sentence_visible`: where the next segment
    /// reads each token (its segment held whole right after the stored gists before it).
    pub window: Option<Vec<u32>>,
    /// Whether each row is a regular token (not a gist).
    pub regular: Vec<bool>,
    pub docs: Vec<SentenceDoc>,
}

impl Layout {
    /// Lays out documents given as model segments. With `gists` false the gist tokens are
    /// left out (plain text, for a full-attention baseline).
    pub fn new(model: &GistModel, docs: &[Vec<Segment>], gists: bool) -> Self {
        Self::continued(model, docs, gists, &[])
    }

    /// [`Self::new`] for documents that continue earlier text whose kept tokens (gists,
    /// BOS) are not in the layout but read from a carried memory: `before[d]` describes
    /// what precedes document `d` (missing entries: nothing). In the compressed scheme a
    /// kept token's stored position is its index among all kept tokens of the document, so
    /// this layout's positions start after them (and after the held last segment, with the
    /// window); the original scheme numbers every token, which a memory of kept tokens
    /// alone cannot continue, so there it must be empty.
    pub fn continued(
        model: &GistModel,
        docs: &[Vec<Segment>],
        gists: bool,
        before: &[Carried],
    ) -> Self {
        let gist_ids = &model.gist.gist_token_ids;
        let bos = model.kept_bos();
        let compressed = gists && model.gist.positions == PositionScheme::Compressed;
        let window = gists && model.gist.previous_sentence_visible;
        let mut l = Layout {
            ids: Vec::new(),
            positions: Vec::new(),
            stored: compressed.then(Vec::new),
            window: (compressed && window).then(Vec::new),
            regular: Vec::new(),
            docs: Vec::new(),
        };
        for (d, segs) in docs.iter().enumerate() {
            let b = before.get(d).copied().unwrap_or_default();
            debug_assert!(
                b == Carried::default() || l.stored.is_some(),
                "a carried memory needs the compressed position scheme"
            );
            let start = l.ids.len();
            let mut segment = Vec::new();
            let mut kept = Vec::new();
            for (si, seg) in segs.iter().enumerate() {
                for &t in &seg.tokens {
                    kept.push(bos == Some(t) && l.ids.len() == start);
                    l.ids.push(t);
                    l.regular.push(true);
                    segment.push(si as u32);
                }
                if gists && seg.close {
                    for &g in gist_ids {
                        l.ids.push(g);
                        l.regular.push(false);
                        segment.push(si as u32);
                        kept.push(true);
                    }
                }
            }
            let end = l.ids.len();
            match &mut l.stored {
                None => l.positions.extend(0..(end - start) as u32),
                Some(stored) => {
                    // A segment starts right after the kept tokens before it (`base`); a
                    // kept token is stored at its index among them. With the window, the
                    // segment before is still held whole after the kept tokens before *it*
                    // (`held_from`, where the next segment reads it), and the new segment
                    // starts after that.
                    // A held last segment of the text before sits after the kept rows
                    // before it, and the first segment here starts after it.
                    let first = if b.held > 0 {
                        b.kept - b.held_kept + b.held
                    } else {
                        b.kept
                    };
                    let (mut kept_seen, mut base, mut offset) = (b.kept, first, 0u32);
                    let mut held_from = b.kept;
                    for i in 0..end - start {
                        if i > 0 && segment[i] != segment[i - 1] {
                            if window {
                                base = held_from + offset;
                                held_from = kept_seen;
                            } else {
                                base = kept_seen;
                            }
                            offset = 0;
                        }
                        let written = base + offset;
                        l.positions.push(written);
                        stored.push(if kept[i] { kept_seen } else { written });
                        if let Some(w) = &mut l.window {
                            w.push(held_from + offset);
                        }
                        kept_seen += u32::from(kept[i]);
                        offset += 1;
                    }
                }
            }
            // With `sink_distance`, where each segment reads BOS: D positions before its
            // first token (which the memory holds when this text continues one).
            let has_bos = b.kept > 0 || kept.first() == Some(&true);
            let bos_sink = match (&l.stored, model.gist.sink_distance) {
                (Some(_), Some(_)) if bos.is_some() && has_bos => {
                    let mut sinks = vec![0; segs.len()];
                    for (i, &s) in segment.iter().enumerate() {
                        if i == 0 || segment[i - 1] != s {
                            let w = l.positions[start + i];
                            sinks[s as usize] = model.gist.bos_sink(w).unwrap_or(0);
                        }
                    }
                    sinks
                }
                _ => Vec::new(),
            };
            l.docs.push(SentenceDoc {
                rows: start..end,
                segment,
                kept,
                window,
                bos_sink,
            });
        }
        l
    }
}

impl Layout {
    /// The key copies past the written one, for `forward_stored`: stored, then window.
    pub fn more_positions<'a>(&'a self, stored: &'a [u32]) -> Vec<&'a [u32]> {
        std::iter::once(stored)
            .chain(self.window.as_deref())
            .collect()
    }

    /// The sentence-attention forward of this layout (`ids` its tokens as a tensor), with
    /// the plan its position scheme needs.
    pub fn sentence_forward(
        &self,
        model: &GistModel,
        ids: &Tensor,
        ops: Ops,
        logits: &Logits,
    ) -> Result<Option<Tensor>> {
        let dev = model.llama.device();
        let dtype = model.llama.dtype();
        match &self.stored {
            None => {
                let mut plan = SentencePlan::new(&self.docs, dtype, dev, ops)?;
                model
                    .llama
                    .forward(ids, &self.positions, &mut plan, ops, logits)
            }
            Some(stored) => {
                let n = self.ids.len();
                let inv_freq = model.llama.inv_freq();
                let mut plan = SentencePlan::compressed(&self.docs, n, inv_freq, dtype, dev, ops)?;
                if let Some(decay) = &model.gist.distance_decay {
                    let copies: Vec<&[u32]> = std::iter::once(self.positions.as_slice())
                        .chain(self.more_positions(stored))
                        .collect();
                    plan = plan.with_distance_decay(decay, &self.positions, &copies);
                }
                model.llama.forward_stored(
                    ids,
                    &self.positions,
                    &self.more_positions(stored),
                    &mut plan,
                    ops,
                    logits,
                )
            }
        }
    }
}

/// Which attention the parallel forward uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sentence attention (the gist model's own).
    Sentence,
    /// Plain causal attention over the same rows.
    Causal,
}

/// Logits (N, V) for every row of the layout.
pub fn forward(model: &GistModel, layout: &Layout, mode: Mode, ops: Ops) -> Result<Tensor> {
    let out = forward_rows(model, layout, mode, ops, &Logits::All)?;
    Ok(out.expect("Logits::All returns logits"))
}

/// The forward with a choice of logit rows (`Logits::Rows` of the last token is what a
/// prefill needs).
pub fn forward_rows(
    model: &GistModel,
    layout: &Layout,
    mode: Mode,
    ops: Ops,
    logits: &Logits,
) -> Result<Option<Tensor>> {
    let dev = model.llama.device();
    let dtype = model.llama.dtype();
    let ids = Tensor::new(layout.ids.as_slice(), dev)?;
    match mode {
        Mode::Sentence => layout.sentence_forward(model, &ids, ops, logits),
        Mode::Causal => {
            let rows: Vec<_> = layout.docs.iter().map(|d| d.rows.clone()).collect();
            let mut plan = CausalPlan::new(&rows, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, logits)
        }
    }
}
