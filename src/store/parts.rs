//! Documents that arrive in parts. Each part is segmented from where the previous one
//! stopped (the stored [`Carry`]), run through the incremental path from the stored state,
//! and stored as one more state chunk: nothing stored is rewritten. `serve` feeds Kafka
//! messages through [`apply_parts`]; `compress --part-bytes` does the same from files.
//!
//! At a part boundary only sentences whose end is certain have been fed, so the state has
//! no open tail and the next part's rows simply follow. A document compressed in parts
//! ends in the same state as compressing its whole text (bit for bit at f32 storage and
//! batch 1; other batches give the same values up to float summation order).

use crate::engine::compress::{compress_from, Document};
use crate::engine::state::GistState;
use crate::model::GistModel;
use crate::store::codec::Precision;
use crate::store::{DocMeta, PartAction, SourceOffset, Store, Update};
use crate::text::encoder::{Carry, DocumentEncoder};
use std::collections::HashSet;

/// One part of one version of a document.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub id: String,
    pub version: u64,
    /// 0, 1, 2, ... in order.
    pub part: u32,
    /// The document ends with this part.
    pub last: bool,
    pub text: String,
    pub source: Option<SourceOffset>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// What became of a part.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Stored: the document's metadata after it, and the regular tokens this part added.
    Stored { meta: Box<DocMeta>, tokens: u64 },
    /// Already stored, or an older version than the stored one: nothing to do (a
    /// redelivery after a crash lands here).
    Skipped(PartAction),
    /// Cannot be stored, ever (a gap in the parts, a part after the last, a damaged stored
    /// document): the caller dead-letters it. The reason names what was wrong.
    Rejected(String),
}

/// Applies parts in order, running the documents of up to `batch` parts through the model
/// together. Parts of the same document are applied one after another. Everything stored
/// is durable when it returns (one flush for the call). Returns an outcome per part, in
/// input order; an `Err` is a failure of the store or the model, after which
/// parts may be partly applied (each part is atomic) and the caller must not acknowledge
/// the parts.
pub fn apply_parts(
    model: &GistModel,
    store: &Store,
    parts: &[Part],
    precision: Precision,
    batch: usize,
) -> anyhow::Result<Vec<Outcome>> {
    let outcomes = apply_parts_unflushed(model, store, parts, precision, batch)?;
    // One flush makes the whole call durable before anything is acknowledged.
    store.flush()?;
    Ok(outcomes)
}

/// [`apply_parts`] without the final flush: each part is atomic, and all are durable only
/// after the caller's next [`Store::flush`], which must come before they are acknowledged.
/// `serve` flushes a batch while the next one computes.
pub fn apply_parts_unflushed(
    model: &GistModel,
    store: &Store,
    parts: &[Part],
    precision: Precision,
    batch: usize,
) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes: Vec<Option<Outcome>> = vec![None; parts.len()];
    let mut remaining: Vec<usize> = (0..parts.len()).collect();
    let mut before = vec![0u64; parts.len()];
    while !remaining.is_empty() {
        // A wave holds at most one part per document: the next one waits for it.
        let mut ids = HashSet::new();
        let (wave, rest): (Vec<usize>, Vec<usize>) = remaining
            .into_iter()
            .partition(|&i| ids.insert(parts[i].id.as_str()));
        remaining = rest;
        let mut jobs = Vec::new();
        for &i in &wave {
            match prepare(model, store, &parts[i]) {
                Ok(Prepared::Run(doc, state, carry)) => {
                    before[i] = state.regular_tokens;
                    jobs.push((i, doc, state, carry))
                }
                Ok(Prepared::Done(o)) => outcomes[i] = Some(o),
                Err(e) => outcomes[i] = Some(Outcome::Rejected(format!("{e:#}"))),
            }
        }
        let carries: Vec<(usize, Carry)> =
            jobs.iter().map(|(i, _, _, c)| (*i, c.clone())).collect();
        let states = compress_from(
            model,
            jobs.into_iter().map(|(_, d, s, _)| (d, s)).collect(),
            batch,
        )?;
        for ((i, carry), (state, _)) in carries.into_iter().zip(states) {
            let p = &parts[i];
            let meta = store.apply_deferred(
                model,
                &Update {
                    id: &p.id,
                    version: p.version,
                    part: p.part,
                    last: p.last,
                    text: &p.text,
                    state: &state,
                    carry,
                    precision,
                    source: p.source.clone(),
                    attributes: p.attributes.clone(),
                },
            )?;
            outcomes[i] = Some(Outcome::Stored {
                tokens: meta.tokens - before[i],
                meta: Box::new(meta),
            });
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every part has an outcome"))
        .collect())
}

enum Prepared {
    Run(Document, GistState, Carry),
    Done(Outcome),
}

/// Plans a part against the store and, when it applies, segments it from the stored carry
/// and loads the state it continues.
fn prepare(model: &GistModel, store: &Store, p: &Part) -> anyhow::Result<Prepared> {
    if p.id.is_empty() {
        anyhow::bail!("the document id is empty");
    }
    let stored = store
        .meta(&p.id)
        .map_err(|e| e.context("the stored document is damaged"))?;
    let action = PartAction::plan(stored.as_ref(), p.version, p.part);
    let reject = |why: String| Ok(Prepared::Done(Outcome::Rejected(why)));
    match action {
        PartAction::Apply => {}
        PartAction::Duplicate | PartAction::Stale { .. } => {
            return Ok(Prepared::Done(Outcome::Skipped(action)))
        }
        PartAction::OutOfOrder { expected } => {
            return reject(format!(
                "part {} of version {} arrived out of order: part {expected} is next",
                p.part, p.version
            ))
        }
        PartAction::AfterLast { parts } => {
            return reject(format!(
                "part {} of version {}: the document ended with part {}",
                p.part,
                p.version,
                parts - 1
            ))
        }
    }
    let (state, carry) = match stored.filter(|_| p.part > 0) {
        Some(meta) => {
            let (_, state) = store.load(&p.id, model)?;
            (state, meta.carry)
        }
        None => (GistState::new(model)?, Carry::default()),
    };
    let mut enc = DocumentEncoder::resume(
        &model.tokenizer,
        &model.gist.segmentation,
        model.bos_token_id(),
        &carry,
    );
    let mut segments = enc.push(&p.text)?;
    if p.last {
        segments.extend(enc.finish()?);
    }
    let doc = Document {
        id: p.id.clone(),
        segments,
    };
    Ok(Prepared::Run(doc, state, enc.carry()))
}

/// Numbers the pieces of one version of document `id` as its parts 0, 1, ..., the last
/// marked last.
pub fn number_parts<'a>(
    id: &str,
    version: u64,
    pieces: impl IntoIterator<Item = &'a str>,
) -> Vec<Part> {
    let pieces: Vec<&str> = pieces.into_iter().collect();
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(k, text)| Part {
            id: id.to_string(),
            version,
            part: k as u32,
            last: k + 1 == n,
            text: text.to_string(),
            source: None,
            attributes: Default::default(),
        })
        .collect()
}

/// The parts a producer sends for `text`: [`split_parts`], numbered.
pub fn parts_of(id: &str, version: u64, text: &str, max_bytes: usize) -> Vec<Part> {
    number_parts(id, version, split_parts(text, max_bytes))
}

/// Splits `text` into parts of at most `max_bytes` bytes (at character boundaries; 0: one
/// part), as a producer would send a large document.
pub fn split_parts(text: &str, max_bytes: usize) -> Vec<&str> {
    if max_bytes == 0 || text.len() <= max_bytes {
        return vec![text];
    }
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = max_bytes.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut == 0 {
            // A character longer than the limit goes whole.
            cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parts_join_to_the_text_within_the_limit(text in "\\PC{0,200}", max in 0usize..40) {
            let parts = split_parts(&text, max);
            prop_assert_eq!(parts.concat(), text.clone());
            if max >= 4 {
                prop_assert!(parts.iter().all(|p| p.len() <= max));
            }
            prop_assert!(parts.len() == 1 || parts.iter().all(|p| !p.is_empty()));
        }
    }
}
