//! The validation curve: held-out text scored during training, every few steps, with the
//! weights as they are then.
//!
//! Why: a training loss is measured on the batch just trained on, one or two books a step,
//! and swings more between books than a run moves it. A fixed held-out set scored at fixed
//! steps shows whether the run is still improving, and where it stopped, without a separate
//! evaluation of every checkpoint.
//!
//! A validation document is read the way training reads: one sequence with the training
//! attention, or, in a memory-span run, `span` consecutive sequences of one book, each
//! after the carried memory of those before it. The set is the opening of each held-out
//! book (one document per book, books in file order) up to a token budget, so it is the
//! same at every step and in a resumed run.

use super::config::{Attention, TrainConfig};
use super::memory::{self, Memory};
use super::optim::loss;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the held-out text is and how often it is scored; kept in the checkpoint so a
/// resumed run goes on with the same curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidationConfig {
    /// Folder of held-out .txt documents (never trained on).
    pub data: PathBuf,
    /// Steps between scorings (also before the first step and after the last).
    pub every: usize,
    /// Regular tokens scored at most (whole documents; at least one).
    pub tokens: usize,
}

/// One point of the curve, a line of `valid-log.jsonl`. A step redone after a resume is
/// scored again: the last line of a step wins (as in `train-log.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ValidLine {
    /// Steps trained before this scoring (0: the starting weights).
    pub step: usize,
    pub tokens_seen: u64,
    /// Mean negative log-likelihood (natural log) of the held-out regular tokens.
    pub loss: f64,
    pub perplexity: f64,
    /// Regular tokens scored.
    pub tokens: usize,
    pub documents: usize,
    /// Time the scoring took.
    pub seconds: f64,
    /// The held-out folder scored: a run resumed with another `--valid` starts another
    /// curve in the same log, told apart by this (empty in logs written before it was).
    #[serde(default)]
    pub data: PathBuf,
}

/// A validation document: one or more consecutive sequences of one book, the second and
/// later without BOS (the memory holds it).
pub type ValidDoc = Vec<Vec<Segment>>;

/// The validation set from held-out `data` (sequences as [`super::sequences`] cuts them,
/// in book order): the first `span` consecutive sequences of each book, books in order
/// until `tokens` regular tokens are reached.
pub fn documents(
    data: &[Vec<Segment>],
    span: usize,
    bos: Option<u32>,
    tokens: usize,
) -> Vec<ValidDoc> {
    let span = span.max(1);
    let starts = memory::span_starts(data, span);
    let mut out = Vec::new();
    let mut total = 0;
    let mut taken_in_book = false;
    for i in 0..data.len() {
        if i > 0 && !memory::continues(&data[i - 1], &data[i]) {
            taken_in_book = false;
        }
        // A book's first run of `span` sequences (span_starts is ascending).
        if taken_in_book || starts.binary_search(&i).is_err() {
            continue;
        }
        taken_in_book = true;
        let doc: ValidDoc = (0..span)
            .map(|p| match p {
                0 => data[i].clone(),
                _ => memory::without_bos(&data[i + p], bos),
            })
            .collect();
        total += doc.iter().flatten().map(|s| s.tokens.len()).sum::<usize>();
        out.push(doc);
        if total >= tokens {
            break;
        }
    }
    out
}

/// Mean regular-token loss of `docs` and the tokens scored, computed as training computes
/// its loss (the same layout and attention; a memory carried across a document's
/// sequences) but with no backward.
pub fn score(
    model: &GistModel,
    docs: &[ValidDoc],
    cfg: &TrainConfig,
) -> anyhow::Result<(f64, usize)> {
    let (mut sum, mut total) = (0f64, 0usize);
    for doc in docs {
        let mut mem = Memory::default();
        for (part, seq) in doc.iter().enumerate() {
            let seqs = std::slice::from_ref(seq);
            let (l, n) = if part == 0 && doc.len() == 1 {
                loss(model, seqs, cfg.attention, false, Ops::Differentiable)?
            } else {
                anyhow::ensure!(
                    cfg.attention == Attention::Gist,
                    "a multi-sequence validation document needs sentence attention"
                );
                let (l, n, more) = memory::loss_continued(
                    model,
                    seqs,
                    std::slice::from_ref(&mem),
                    false,
                    Ops::Differentiable,
                )?;
                mem = more.into_iter().next().unwrap_or_default();
                (l, n)
            };
            sum += l.to_scalar::<f32>()? as f64 * n as f64;
            total += n;
        }
    }
    anyhow::ensure!(total > 0, "the validation set scores no token");
    Ok((sum / total as f64, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tokenize::Segment;

    /// A book cut into `n` sequences: each continues the one before (its bytes follow).
    fn book(n: usize, bos: u32) -> Vec<Vec<Segment>> {
        (0..n)
            .map(|i| {
                let mut tokens = vec![10 + i as u32, 20];
                if i == 0 {
                    tokens.insert(0, bos);
                }
                vec![Segment {
                    tokens,
                    close: true,
                    bytes: i * 10..i * 10 + 10,
                }]
            })
            .collect()
    }

    #[test]
    fn one_document_per_book_from_its_opening_until_the_budget() {
        let bos = 1;
        let mut data = book(2, bos); // too short for span 3
        data.extend(book(4, bos));
        data.extend(book(3, bos));
        data.extend(book(3, bos));
        let docs = documents(&data, 3, Some(bos), 10);
        // The first book has no run of 3; the next two give one document each (7 + 6
        // tokens reach the budget of 10 at the second).
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].len(), 3);
        assert_eq!(
            docs[0][0][0].tokens,
            vec![bos, 10, 20],
            "its opening, with BOS"
        );
        assert_eq!(docs[0][1][0].tokens, vec![11, 20]);
        assert_eq!(
            docs[1][0][0].tokens,
            vec![bos, 10, 20],
            "the next book's opening"
        );
        // Without a span: each book's first sequence, every book.
        let docs = documents(&data, 1, Some(bos), usize::MAX);
        assert_eq!(docs.len(), 4);
        assert!(docs
            .iter()
            .all(|d| d.len() == 1 && d[0][0].tokens[0] == bos));
        // A budget below one document still scores one.
        assert_eq!(documents(&data, 1, Some(bos), 0).len(), 1);
    }
}
