//! Compressing whole documents: segment, tokenize, and run the incremental path with up to
//! `batch` documents in flight, one sentence of each per forward.

use crate::engine::slots::{advance_slots, SlotCache};
use crate::engine::state::{advance, Chunk, GistState};
use crate::model::config::Incremental;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::Instant;

/// What compressing one document produced, as `giststream compress` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct CompressReport {
    pub id: String,
    /// Regular tokens (BOS included).
    pub tokens: u64,
    pub sentences: u64,
    pub gist_tokens: u64,
    /// R_c = regular tokens / gist tokens (the paper's compression ratio).
    pub compression_ratio: f64,
    /// Bytes of a full KV cache of the document at the model's dtype.
    pub kv_bytes_full: u64,
    /// Bytes of its gist state (kept gists plus any open tail).
    pub kv_bytes_gist: u64,
    /// Wall time from the document's first forward to its last (shared with the documents
    /// batched beside it).
    pub seconds: f64,
}

/// A document to compress.
pub struct Document {
    pub id: String,
    pub segments: Vec<Segment>,
}

/// Compresses documents with up to `batch` in flight. Returns states and reports in input
/// order.
pub fn compress(
    model: &GistModel,
    docs: Vec<Document>,
    batch: usize,
) -> anyhow::Result<Vec<(GistState, CompressReport)>> {
    let starts = docs
        .iter()
        .map(|_| GistState::new(model))
        .collect::<candle_core::Result<Vec<_>>>()?;
    compress_from(model, docs.into_iter().zip(starts).collect(), batch)
}

/// Like [`compress`], each document going on from a state (a document arriving in parts:
/// its stored state, and the segments of its next part). Runs on the model's
/// [`Incremental`] engine.
pub fn compress_from(
    model: &GistModel,
    docs: Vec<(Document, GistState)>,
    batch: usize,
) -> anyhow::Result<Vec<(GistState, CompressReport)>> {
    compress_with(model, docs, batch, model.incremental)
}

/// [`compress_from`] on a chosen engine.
pub fn compress_with(
    model: &GistModel,
    docs: Vec<(Document, GistState)>,
    batch: usize,
    engine: Incremental,
) -> anyhow::Result<Vec<(GistState, CompressReport)>> {
    struct Active {
        index: usize,
        /// The state (per-document engine), or None while it sits in `slot`.
        state: Option<GistState>,
        slot: usize,
        next: usize,
        started: Instant,
    }
    let batch = batch.max(1);
    let mut slots = match engine {
        Incremental::Slots => Some(SlotCache::new(model, batch.min(docs.len().max(1)))?),
        Incremental::PerDocument => None,
    };
    let (docs, mut starts): (Vec<Document>, Vec<Option<GistState>>) =
        docs.into_iter().map(|(d, s)| (d, Some(s))).unzip();
    let mut pending: VecDeque<usize> = (0..docs.len()).collect();
    let mut active: Vec<Active> = Vec::new();
    let mut done: Vec<Option<(GistState, CompressReport)>> =
        (0..docs.len()).map(|_| None).collect();
    let bytes_per_value = model.llama.dtype().size_in_bytes();
    loop {
        while active.len() < batch {
            let Some(i) = pending.pop_front() else { break };
            let state = starts[i].take().expect("each document starts once");
            let (state, slot) = match &mut slots {
                Some(cache) => (None, cache.enter(state)?),
                None => (Some(state), 0),
            };
            active.push(Active {
                index: i,
                state,
                slot,
                next: 0,
                started: Instant::now(),
            });
        }
        // Finish documents with nothing left (empty ones never enter a forward).
        let mut k = 0;
        while k < active.len() {
            if active[k].next >= docs[active[k].index].segments.len() {
                let mut a = active.swap_remove(k);
                let s = match (&mut slots, a.state.take()) {
                    (_, Some(s)) => s,
                    (Some(cache), None) => cache.leave(a.slot)?,
                    (None, None) => unreachable!("a per-document state is held"),
                };
                let report = CompressReport {
                    id: docs[a.index].id.clone(),
                    tokens: s.regular_tokens,
                    sentences: s.sentences,
                    gist_tokens: s.gist_tokens,
                    compression_ratio: if s.gist_tokens == 0 {
                        0.0
                    } else {
                        s.regular_tokens as f64 / s.gist_tokens as f64
                    },
                    kv_bytes_full: s.regular_tokens * model.kv_bytes_per_token(bytes_per_value),
                    kv_bytes_gist: s.kv_len() as u64 * model.kv_bytes_per_token(bytes_per_value),
                    seconds: a.started.elapsed().as_secs_f64(),
                };
                warn_past_context(model, &report.id, s.next_position);
                done[a.index] = Some((s, report));
            } else {
                k += 1;
            }
        }
        if active.is_empty() {
            if pending.is_empty() {
                break;
            }
            continue;
        }
        let chunk = |a: &mut Active| {
            let seg = &docs[a.index].segments[a.next];
            a.next += 1;
            Chunk {
                tokens: &seg.tokens,
                close: seg.close,
            }
        };
        match &mut slots {
            Some(cache) => {
                let items: Vec<(usize, Chunk<'_>)> =
                    active.iter_mut().map(|a| (a.slot, chunk(a))).collect();
                advance_slots(model, cache, &items)?;
            }
            None => {
                let mut items: Vec<(&mut GistState, Chunk<'_>)> = active
                    .iter_mut()
                    .map(|a| {
                        let c = chunk(a);
                        (a.state.as_mut().expect("per-document states are held"), c)
                    })
                    .collect();
                advance(model, &mut items, false)?;
            }
        }
    }
    Ok(done
        .into_iter()
        .map(|d| d.expect("every document finishes"))
        .collect())
}

/// A document whose positions run past what the model was trained for still compresses,
/// but the model never saw such positions: say so, with both numbers.
pub fn warn_past_context(model: &GistModel, id: &str, positions: u32) {
    if let Some(max) = model.llama.cfg.max_positions {
        if positions as usize > max {
            eprintln!(
                "giststream: warning: document {id:?} spans {positions} positions, past the \
                 {max} the model was trained for (max_position_embeddings); what it stores \
                 past that is untested"
            );
        }
    }
}

/// Bytes for people: `512 B`, `3.2 MiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
