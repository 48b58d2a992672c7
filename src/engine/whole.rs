//! The parallel path: whole gist-augmented documents in one forward (training, evaluation,
//! and the reference for the incremental path), with sentence attention computed
//! blockwise, or plain causal attention for baselines.

use crate::model::attention::{CausalPlan, SentenceDoc, SentencePlan};
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use candle_core::{Result, Tensor};

/// Documents laid out as flat rows, gists inserted after each closed segment.
#[derive(Debug, Clone)]
pub struct Layout {
    pub ids: Vec<u32>,
    /// Absolute position of each token within its document.
    pub positions: Vec<u32>,
    /// Whether each row is a regular token (not a gist).
    pub regular: Vec<bool>,
    pub docs: Vec<SentenceDoc>,
}

impl Layout {
    /// Lays out documents given as model segments. With `gists` false the gist tokens are
    /// left out (plain text, for a full-attention baseline).
    pub fn new(model: &GistModel, docs: &[Vec<Segment>], gists: bool) -> Self {
        let gist_ids = &model.gist.gist_token_ids;
        let bos = model.kept_bos();
        let mut l = Layout {
            ids: Vec::new(),
            positions: Vec::new(),
            regular: Vec::new(),
            docs: Vec::new(),
        };
        for segs in docs {
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
            l.positions.extend(0..(end - start) as u32);
            l.docs.push(SentenceDoc {
                rows: start..end,
                segment,
                kept,
            });
        }
        l
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
        Mode::Sentence => {
            let mut plan = SentencePlan::new(&layout.docs, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, logits)
        }
        Mode::Causal => {
            let rows: Vec<_> = layout.docs.iter().map(|d| d.rows.clone()).collect();
            let mut plan = CausalPlan::new(&rows, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, logits)
        }
    }
}
