//! Question/answer training over compressed text (`train --qa FILE`).
//!
//! Language modelling alone did not teach the gist model to answer from a stored state:
//! given a short text that says where someone was born, it answered with a made-up town
//! (README, "Questions"). Here a training sequence is what a query is: a document read
//! sentence by sentence (each closed sentence leaves only its gists), then the question in
//! the chat template and the answer, one open sentence that reads the document's gists and
//! nothing else of it. The loss is the answer's tokens (and the end of the turn), plus,
//! weighted by `TrainConfig::qa_text_weight`, the document's own tokens, so that the model
//! keeps modelling text while it learns to put facts into gists and read them back.
//!
//! [`answer_nll`] scores the same answer on the incremental path (the one `query` runs);
//! `tests/qa.rs` holds the two paths to each other.

use crate::engine::compress::{compress, Document};
use crate::engine::state::{advance, Chunk, GistState};
use crate::engine::whole::Layout;
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::query::{reread, Placement, Sampling};
use crate::text::encoder::DocumentEncoder;
use crate::text::tokenize::Segment;
use anyhow::{ensure, Context};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Read};
use std::path::Path;

/// One line of a question/answer file (`scripts/make-qa.py` writes them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QaRecord {
    pub document: String,
    pub question: String,
    pub answer: String,
    /// The words a correct answer must contain (for `qa-eval`'s accuracy; not trained on).
    #[serde(default)]
    pub key: Option<String>,
}

/// A line longer than this is refused (a document of a few pages fits many times).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Questions and answers longer than this many bytes are refused.
pub const MAX_QA_BYTES: usize = 4096;

/// Reads a JSON-lines question/answer file. A bad line is an error naming the line: a
/// training set with holes in it would train a different run than the one asked for.
pub fn read_records(path: &Path) -> anyhow::Result<Vec<QaRecord>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    let mut line = String::new();
    for n in 1.. {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
            .with_context(|| format!("{}: line {n}", path.display()))?;
        if read == 0 {
            break;
        }
        ensure!(
            line.len() <= MAX_LINE_BYTES,
            "{}: line {n} is longer than {MAX_LINE_BYTES} bytes",
            path.display()
        );
        if line.trim().is_empty() {
            continue;
        }
        // An object only: serde would also take the fields as an array.
        let rec: QaRecord = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .filter(serde_json::Value::is_object)
            .map_or_else(
                || Err(anyhow::anyhow!("not a JSON object")),
                |v| serde_json::from_value(v).map_err(anyhow::Error::from),
            )
            .with_context(|| {
                format!(
                    "{}: line {n} is not a {{\"document\", \"question\", \"answer\"}} object",
                    path.display()
                )
            })?;
        for (what, s) in [("question", &rec.question), ("answer", &rec.answer)] {
            ensure!(
                !s.trim().is_empty() && s.len() <= MAX_QA_BYTES,
                "{}: line {n}: the {what} must be 1 to {MAX_QA_BYTES} bytes",
                path.display()
            );
        }
        ensure!(
            !rec.document.trim().is_empty(),
            "{}: line {n}: the document is empty",
            path.display()
        );
        out.push(rec);
    }
    Ok(out)
}

/// A question/answer training sequence: the document's segments (closed sentences, BOS
/// first when the model keeps one), then one open segment of the question and the answer.
#[derive(Debug, Clone)]
pub struct QaSequence {
    pub segments: Vec<Segment>,
    /// Where the answer starts within the last segment (the question's tokens before it).
    pub answer_from: usize,
}

impl QaSequence {
    fn last(&self) -> &Segment {
        self.segments
            .last()
            .expect("a QA sequence ends with its question")
    }

    /// Regular tokens in all.
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(|s| s.tokens.len()).sum()
    }
}

/// `rec` as the model reads it in a query: the document like `compress` reads it, the
/// question as `query` renders it (the chat template when the model has one), the answer
/// and the end of the turn (EOS, where the answer stops). None when it holds more than
/// `max_tokens` regular tokens: a document cut short could lose the fact asked for.
pub fn encode(
    model: &GistModel,
    rec: &QaRecord,
    max_tokens: usize,
) -> anyhow::Result<Option<QaSequence>> {
    let bos = model.bos_token_id();
    let mut enc = DocumentEncoder::new(&model.tokenizer, &model.gist.segmentation, bos);
    let mut segments = enc.push(&rec.document)?;
    segments.extend(enc.finish()?);
    if let Some(s) = segments.last_mut() {
        // A document in the store ends with its last sentence closed.
        s.close = true;
    }
    let mut last = crate::query::question_tokens(model, &rec.question, true)?;
    let answer_from = last.len();
    last.extend(model.tokenizer.encode_text(&rec.answer)?.0);
    last.extend(model.eos_token_id());
    segments.push(Segment {
        tokens: last,
        bytes: 0..0,
        close: false,
    });
    let seq = QaSequence {
        segments,
        answer_from,
    };
    Ok((seq.tokens() <= max_tokens).then_some(seq))
}

/// Rows of `layout` that predict a scored token, and those tokens: (document rows, document
/// targets, answer rows, answer targets). The question's own tokens are not scored.
fn scored_rows(layout: &Layout, seqs: &[QaSequence]) -> [Vec<u32>; 4] {
    let [mut tr, mut tt, mut ar, mut at] = [vec![], vec![], vec![], vec![]];
    for (doc, seq) in layout.docs.iter().zip(seqs) {
        // The open last segment is the layout's last rows (it writes no gists).
        let question = doc.rows.end - seq.last().tokens.len();
        for i in doc.rows.start..question - 1 {
            if layout.regular[i + 1] {
                tr.push(i as u32);
                tt.push(layout.ids[i + 1]);
            }
        }
        for i in question + seq.answer_from - 1..doc.rows.end - 1 {
            ar.push(i as u32);
            at.push(layout.ids[i + 1]);
        }
    }
    [tr, tt, ar, at]
}

/// The training loss of `seqs` on the parallel path: the answers' mean cross-entropy plus
/// `text_weight` times the documents'. Returns the loss and the tokens it scored.
pub fn loss(
    model: &GistModel,
    seqs: &[QaSequence],
    text_weight: f64,
    ops: Ops,
) -> anyhow::Result<(Tensor, usize)> {
    let docs: Vec<Vec<Segment>> = seqs.iter().map(|s| s.segments.clone()).collect();
    let layout = Layout::new(model, &docs, true);
    let dev = model.llama.device();
    let [tr, tt, ar, at] = scored_rows(&layout, seqs);
    ensure!(
        !at.is_empty(),
        "a question/answer batch has no answer token"
    );
    let rows: Vec<u32> = tr.iter().chain(&ar).copied().collect();
    let ids = Tensor::new(layout.ids.as_slice(), dev)?;
    let logits = layout
        .sentence_forward(
            model,
            &ids,
            ops,
            &Logits::Rows(Tensor::new(rows.as_slice(), dev)?),
        )?
        .context("the forward returned no logits for the scored rows")?
        .to_dtype(DType::F32)?;
    let ce = |from: usize, targets: &[u32]| -> anyhow::Result<Tensor> {
        Ok(super::cross_entropy::cross_entropy(
            &logits.narrow(0, from, targets.len())?,
            &Tensor::new(targets, dev)?,
        )?)
    };
    let mut total = ce(tr.len(), &at)?;
    if text_weight > 0.0 && !tt.is_empty() {
        total = (total + (ce(0, &tt)? * text_weight)?)?;
    }
    Ok((total, tt.len() + at.len()))
}

/// `seq`'s document read the way `compress` reads one: its stored state.
fn stored_state(model: &GistModel, seq: &QaSequence) -> anyhow::Result<GistState> {
    let doc = Document {
        id: String::new(),
        segments: seq.segments[..seq.segments.len() - 1].to_vec(),
    };
    let (state, _) = compress(model, vec![doc], 1)?
        .pop()
        .context("compress returned no state")?;
    Ok(state)
}

/// The answer's summed negative log-likelihood and token count on the incremental path:
/// the document compressed, then the question and the answer as one open sentence, as
/// `query` feeds them.
pub fn answer_nll(model: &GistModel, seq: &QaSequence) -> anyhow::Result<(f64, usize)> {
    answer_nll_from(model, stored_state(model, seq)?, seq)
}

/// [`answer_nll`] from `seq`'s document already stored in `state`.
fn answer_nll_from(
    model: &GistModel,
    mut state: GistState,
    seq: &QaSequence,
) -> anyhow::Result<(f64, usize)> {
    let last = &seq.last().tokens;
    let chunk = Chunk {
        tokens: last,
        close: false,
    };
    let logits = advance(model, &mut [(&mut state, chunk)], true)?
        .context("logits requested")?
        .to_dtype(DType::F32)?;
    let from = seq.answer_from;
    ensure!(from > 0, "the question is empty");
    let n = last.len() - from;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, from - 1, n)?, D::Minus1)?;
    let idx = Tensor::new(&last[from..], logp.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    Ok((-picked.iter().map(|&x| x as f64).sum::<f64>(), n))
}

/// How `evaluate` lets the model read each document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Compressed to its gist state, then `query`.
    Stored,
    /// Whole, with full attention (`reread`): the same model without compression.
    Whole(Placement),
}

/// One evaluated question.
#[derive(Debug, Clone, Serialize)]
pub struct QaResult {
    pub question: String,
    pub key: Option<String>,
    pub answer: String,
    /// Whether the answer holds the key (case-insensitive); None without a key.
    pub correct: Option<bool>,
    /// The reference answer's mean negative log-likelihood per token (stored reading).
    pub answer_nll: Option<f64>,
    pub seconds: f64,
}

/// Answers every record's question greedily from its document, read as `reading` says.
pub fn evaluate(
    model: &GistModel,
    records: &[QaRecord],
    reading: Reading,
    max_tokens: usize,
    mut each: impl FnMut(&QaResult),
) -> anyhow::Result<Vec<QaResult>> {
    let sampling = Sampling {
        max_tokens,
        temperature: 0.0,
        top_p: None,
        seed: 1,
        chat_template: true,
    };
    let mut out = Vec::with_capacity(records.len());
    for (i, rec) in records.iter().enumerate() {
        let started = std::time::Instant::now();
        let asked = || format!("question {} ({:?})", i + 1, rec.question);
        let (answer, answer_nll) = match reading {
            Reading::Stored => {
                let seq = encode(model, rec, usize::MAX)
                    .with_context(asked)?
                    .context("no length limit")?;
                // The document is compressed once: the state is cloned for the score.
                let state = stored_state(model, &seq).with_context(asked)?;
                let (nll, n) = answer_nll_from(model, state.clone(), &seq).with_context(asked)?;
                let a = crate::query::answer(model, state, &rec.question, &sampling, |_| {})
                    .with_context(asked)?;
                (a.text, Some(nll / n as f64))
            }
            Reading::Whole(placement) => {
                let a = reread(
                    model,
                    &rec.document,
                    &rec.question,
                    placement,
                    &sampling,
                    |_| {},
                )?;
                (a.text, None)
            }
        };
        let correct = rec
            .key
            .as_ref()
            .map(|k| answer.to_lowercase().contains(&k.to_lowercase()));
        let r = QaResult {
            question: rec.question.clone(),
            key: rec.key.clone(),
            answer,
            correct,
            answer_nll,
            seconds: started.elapsed().as_secs_f64(),
        };
        each(&r);
        out.push(r);
    }
    Ok(out)
}
