//! `giststream eval`: perplexity of a model on long documents, measured the way users get
//! it, plus what compression costs and saves.
//!
//! A gist model is scored on the incremental path: each document goes through sentence by
//! sentence and every regular token is predicted from the compressed state of everything
//! before it (gists of earlier sentences, the current sentence so far). A full-attention
//! baseline is scored with plain causal attention over the whole document. Perplexity is
//! over regular tokens only (predicting a gist token is not language modelling).
//!
//! The long-range check splits each document at its middle sentence and scores the second
//! half twice: after the (compressed) first half, and alone from BOS. The gap shows how
//! much the first half, as the model keeps it, still helps.

use crate::engine::state::{advance, Chunk, GistState};
use crate::engine::whole::{forward, Layout, Mode};
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use candle_core::{DType, Tensor, D};
use serde::Serialize;

/// How a model is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Incremental gist path (compressed state).
    Gist,
    /// Full causal attention, no gists.
    Full,
    /// Each sentence alone (after BOS), no gists and nothing before it: what a model
    /// without any memory of the document scores (the floor a gist state must beat).
    Sentence,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub scoring: Scoring,
    pub num_gists: usize,
    pub documents: usize,
    /// Regular tokens scored.
    pub tokens: u64,
    pub perplexity: f64,
    /// Second halves scored after their first half.
    pub second_half_with_context: f64,
    /// Second halves scored alone, from BOS.
    pub second_half_alone: f64,
    /// The same two, for each quarter of every second half (tokens pooled over documents):
    /// `[after its first half, alone]`. Where a loss sits says why: in the last quarters,
    /// where the state is longest, it points at reading many rows from far away; in the
    /// first, where the alone run has nothing, at gists that carry little.
    pub second_half_quarters: [[f64; 2]; 4],
    /// R_c = regular tokens / gist tokens (0 for full attention).
    pub compression_ratio: f64,
    /// Bytes of stored K/V per document token at f32: the gist state, or the full cache.
    pub kv_bytes_per_token: f64,
    /// The same for a full KV cache of this model.
    pub full_kv_bytes_per_token: f64,
}

/// Negative log-likelihoods (natural log) of the regular tokens of each document, in order,
/// scored on the incremental gist path, with up to `batch` documents advancing together.
/// Also returns the total gist tokens written, and the rows the documents' states hold at
/// their ends (gists, a kept BOS, and with `previous_sentence_visible` the last sentence).
pub fn nll_gist(
    model: &GistModel,
    docs: &[Vec<Segment>],
    batch: usize,
) -> anyhow::Result<(Vec<Vec<f32>>, u64, u64)> {
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); docs.len()];
    let (mut gists, mut held) = (0, 0);
    let ng = model.gist.num_gist_tokens;
    for group in (0..docs.len()).collect::<Vec<_>>().chunks(batch.max(1)) {
        let mut states: Vec<GistState> = group
            .iter()
            .map(|_| GistState::new(model))
            .collect::<candle_core::Result<_>>()?;
        // The log-probabilities the last row of each document's previous step gave the next token.
        let mut carry: Vec<Option<Tensor>> = vec![None; group.len()];
        let steps = group.iter().map(|&d| docs[d].len()).max().unwrap_or(0);
        for step in 0..steps {
            let live: Vec<usize> = (0..group.len())
                .filter(|&g| step < docs[group[g]].len())
                .collect();
            let mut items: Vec<(&mut GistState, Chunk<'_>)> = states
                .iter_mut()
                .enumerate()
                .filter(|(g, _)| step < docs[group[*g]].len())
                .map(|(g, state)| {
                    let seg = &docs[group[g]][step];
                    let chunk = Chunk {
                        tokens: &seg.tokens,
                        close: seg.close,
                    };
                    (state, chunk)
                })
                .collect();
            let logits = advance(model, &mut items, true)?.expect("logits requested");
            let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
            let mut row = 0;
            for &g in &live {
                let seg = &docs[group[g]][step];
                let n = seg.tokens.len() + if seg.close { ng } else { 0 };
                let lp = logp.narrow(0, row, n)?;
                let d = group[g];
                // First token of this chunk, from the previous chunk's last row.
                if let Some(prev) = carry[g].take() {
                    let v: f32 = prev.get(seg.tokens[0] as usize)?.to_scalar()?;
                    out[d].push(-v);
                }
                // Tokens 1.. of the chunk from the rows before them.
                if seg.tokens.len() > 1 {
                    let idx = Tensor::new(&seg.tokens[1..], logits.device())?.unsqueeze(1)?;
                    let picked = lp
                        .narrow(0, 0, seg.tokens.len() - 1)?
                        .gather(&idx, 1)?
                        .squeeze(1)?;
                    out[d].extend(picked.to_vec1::<f32>()?.into_iter().map(|v| -v));
                }
                carry[g] = Some(lp.get(n - 1)?);
                if seg.close {
                    gists += ng as u64;
                }
                row += n;
            }
        }
        held += states.iter().map(|s| s.kv_len() as u64).sum::<u64>();
    }
    Ok((out, gists, held))
}

/// Negative log-likelihoods of the regular tokens of each document with full causal
/// attention over the whole document (no gists).
pub fn nll_full(model: &GistModel, docs: &[Vec<Segment>]) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut out = Vec::new();
    for doc in docs {
        let layout = Layout::new(model, std::slice::from_ref(doc), false);
        let logits = forward(model, &layout, Mode::Causal, Ops::Fused)?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
        let n = layout.ids.len();
        let idx = Tensor::new(&layout.ids[1..], logits.device())?.unsqueeze(1)?;
        let picked = logp.narrow(0, 0, n - 1)?.gather(&idx, 1)?.squeeze(1)?;
        out.push(picked.to_vec1::<f32>()?.into_iter().map(|v| -v).collect());
    }
    Ok(out)
}

/// Negative log-likelihoods of the regular tokens of each document with each sentence
/// read alone: BOS (the config's, even where documents get none), then the sentence.
pub fn nll_sentences(model: &GistModel, docs: &[Vec<Segment>]) -> anyhow::Result<Vec<Vec<f32>>> {
    let bos = model.bos_token_id().or(model.llama.cfg.bos_token_id);
    let mut out = Vec::new();
    for doc in docs {
        let alone: Vec<Vec<Segment>> = doc
            .iter()
            .map(|seg| {
                let mut seg = seg.clone();
                match bos {
                    Some(b) if seg.tokens.first() != Some(&b) => seg.tokens.insert(0, b),
                    _ => {}
                }
                seg.close = false;
                vec![seg]
            })
            .collect();
        let mut nll: Vec<f32> = nll_full(model, &alone)?.concat();
        if model.bos_token_id().is_none() && bos.is_some() && !nll.is_empty() {
            // Documents start without BOS, so their first token is never scored: nor here.
            nll.remove(0);
        }
        out.push(nll);
    }
    Ok(out)
}

fn ppl(nll: &[f32]) -> f64 {
    if nll.is_empty() {
        return f64::NAN;
    }
    (nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64).exp()
}

/// Splits a document at its middle segment: (first half, second half with BOS prepended).
fn halves(doc: &[Segment], bos: Option<u32>) -> (Vec<Segment>, Vec<Segment>) {
    let mid = doc.len() / 2;
    let first = doc[..mid].to_vec();
    let mut second = doc[mid..].to_vec();
    if let (Some(b), Some(s)) = (bos, second.first_mut()) {
        s.tokens.insert(0, b);
    }
    (first, second)
}

/// Perplexity of each quarter of every second half, after its first half and alone: the
/// two runs of a document score the same tokens, so quarter `q` of each is the same text.
fn quarters(after: &[&[f32]], alone: &[Vec<f32>]) -> [[f64; 2]; 4] {
    let mut pooled: [[Vec<f32>; 2]; 4] = Default::default();
    for (a, b) in after.iter().zip(alone) {
        let n = a.len().min(b.len());
        for (q, pool) in pooled.iter_mut().enumerate() {
            let range = q * n / 4..(q + 1) * n / 4;
            pool[0].extend_from_slice(&a[range.clone()]);
            pool[1].extend_from_slice(&b[range]);
        }
    }
    pooled.map(|[a, b]| [ppl(&a), ppl(&b)])
}

/// Evaluates `model` on documents (already segmented and cut to length).
pub fn evaluate(
    model: &GistModel,
    name: &str,
    docs: &[Vec<Segment>],
    scoring: Scoring,
    batch: usize,
) -> anyhow::Result<EvalReport> {
    let bos = model.bos_token_id();
    let score = |docs: &[Vec<Segment>]| -> anyhow::Result<(Vec<Vec<f32>>, u64, u64)> {
        match scoring {
            Scoring::Gist => nll_gist(model, docs, batch),
            Scoring::Full => Ok((nll_full(model, docs)?, 0, 0)),
            Scoring::Sentence => Ok((nll_sentences(model, docs)?, 0, 0)),
        }
    };
    let (all, gists, held) = score(docs)?;
    let tokens: u64 = all.iter().map(|d| d.len() as u64).sum();
    // Second halves: the tail of each full run, and each half scored alone.
    let mut with_ctx: Vec<&[f32]> = Vec::new();
    let mut seconds = Vec::new();
    for (doc, nll) in docs.iter().zip(&all) {
        let (first, second) = halves(doc, bos);
        let first_tokens: usize = first.iter().map(|s| s.tokens.len()).sum();
        // nll[i] scores token i + 1 of the document (BOS is never scored).
        with_ctx.push(&nll[first_tokens.saturating_sub(1).min(nll.len())..]);
        seconds.push(second);
    }
    // BOS, put in front of each second half, is never scored itself: `alone` covers the
    // same tokens as `with_ctx`.
    let (alone, _, _) = score(&seconds)?;
    let second_half_quarters = quarters(&with_ctx, &alone);
    let with_ctx: Vec<f32> = with_ctx.concat();
    let alone: Vec<f32> = alone.into_iter().flatten().collect();
    let per_token = model.kv_bytes_per_token(4) as f64;
    // What the states hold at the documents' ends: the gists (and a kept BOS, and the
    // last sentence where the model keeps it visible; documents are cut at closed
    // segments, so there is no open tail).
    let (rc, kv) = match scoring {
        Scoring::Gist if gists > 0 => (
            tokens as f64 / gists as f64,
            held as f64 * per_token / tokens as f64,
        ),
        _ => (0.0, per_token),
    };
    Ok(EvalReport {
        model: name.to_string(),
        scoring,
        num_gists: model.gist.num_gist_tokens,
        documents: docs.len(),
        tokens,
        perplexity: ppl(&all.concat()),
        second_half_with_context: ppl(&with_ctx),
        second_half_alone: ppl(&alone),
        second_half_quarters,
        compression_ratio: rc,
        kv_bytes_per_token: kv,
        full_kv_bytes_per_token: per_token,
    })
}

/// Segments `texts` for `model`, keeping at most `max_tokens` regular tokens of each
/// (whole segments).
pub fn documents(
    model: &GistModel,
    texts: &[String],
    max_tokens: usize,
) -> anyhow::Result<Vec<Vec<Segment>>> {
    texts
        .iter()
        .map(|t| {
            let segs = model.segments(t)?;
            let mut n = 0;
            Ok(segs
                .into_iter()
                .take_while(|s| {
                    n += s.tokens.len();
                    max_tokens == 0 || n <= max_tokens
                })
                .collect())
        })
        .collect()
}

/// Each document cut into consecutive windows of at most `tokens` regular tokens (whole
/// sentences, each window starting with BOS, as training sequences are cut), the first
/// `per_doc` of each: evaluation at the training length over many windows instead of one
/// prefix per document.
pub fn windows(
    model: &GistModel,
    texts: &[String],
    tokens: usize,
    per_doc: usize,
) -> anyhow::Result<Vec<Vec<Segment>>> {
    let bos = model.bos_token_id();
    let mut out = Vec::new();
    for t in texts {
        let seqs = crate::train::sequences(
            std::slice::from_ref(t),
            &model.tokenizer,
            &model.gist,
            bos,
            tokens,
        )?;
        out.extend(seqs.into_iter().take(per_doc));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarters_pool_the_same_stretch_of_every_second_half() {
        // Two documents of 8 and 4 tokens: quarter q holds tokens [q*n/4, (q+1)*n/4) of each.
        let after: Vec<Vec<f32>> = vec![vec![1., 1., 2., 2., 3., 3., 4., 4.], vec![1., 2., 3., 4.]];
        let alone: Vec<Vec<f32>> = vec![vec![0.5; 8], vec![0.; 4]];
        let refs: Vec<&[f32]> = after.iter().map(|v| v.as_slice()).collect();
        let q = quarters(&refs, &alone);
        for (i, [a, b]) in q.iter().enumerate() {
            let want = (i + 1) as f64;
            assert!((a - want.exp()).abs() < 1e-9, "quarter {i}: {a}");
            assert!((b - (1.0f64 / 3.0).exp()).abs() < 1e-9, "quarter {i}: {b}");
        }
    }
}
