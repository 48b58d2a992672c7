//! Questions against a stored document: resume from its gist state instead of its text.
//!
//! The state is loaded (refused if another model made it), the question goes in as an open
//! segment after the document (positions continue where the document stopped), and the
//! answer is generated token by token. When the model writes its first gist token it has
//! ended a sentence: the sentence is closed (all N_g gists written, its tokens dropped from
//! the cache) and generation goes on, so long answers stay compressed too.

use crate::engine::state::{advance, Chunk, GistState};
use crate::model::GistModel;
use crate::store::Store;
use anyhow::{ensure, Context};
use candle_core::{DType, Tensor, D};
use candle_transformers::generation::LogitsProcessor;
use serde::{Deserialize, Serialize};

/// A question about a stored document, or a continuation to score.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// The document id (`doc`, its old name, is accepted too).
    #[serde(alias = "doc")]
    pub id: String,
    #[serde(default)]
    pub question: Option<String>,
    /// Score this continuation instead of generating.
    #[serde(default)]
    pub score: Option<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Wrap the question in the model's chat template, when it has one.
    #[serde(default = "default_chat_template")]
    pub chat_template: bool,
}

fn default_chat_template() -> bool {
    true
}

fn default_max_tokens() -> usize {
    64
}

fn default_seed() -> u64 {
    299_792_458
}

impl Request {
    /// How this request picks tokens.
    pub fn sampling(&self) -> Sampling {
        Sampling {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            chat_template: self.chat_template,
        }
    }
}

/// A request checked and its document's state loaded, ready to run: the one entry point of
/// the HTTP API and of the CLI's direct path. The two steps are apart so that the API can
/// answer a refusal (no such document, another model's state) with its status before it
/// starts streaming.
pub struct Query {
    state: GistState,
    request: Request,
}

/// A request refused before any work (the HTTP API answers 400).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("the question is empty: give a question, or score")]
    EmptyQuestion,
    #[error("max_tokens {0} is over the cap of {MAX_TOKENS}")]
    MaxTokens(usize),
    #[error("temperature {0} is not a number of at least 0")]
    Temperature(f64),
    #[error("top_p {0} is not in (0, 1]")]
    TopP(f64),
}

/// The most tokens one answer may generate.
pub const MAX_TOKENS: usize = 4096;

impl Request {
    /// Refuses what no answer could honour, before any work.
    pub fn check(&self) -> Result<(), BadRequest> {
        if self.score.is_none() && self.question.as_deref().is_none_or(|q| q.trim().is_empty()) {
            return Err(BadRequest::EmptyQuestion);
        }
        if self.max_tokens > MAX_TOKENS {
            return Err(BadRequest::MaxTokens(self.max_tokens));
        }
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return Err(BadRequest::Temperature(self.temperature));
        }
        if let Some(p) = self.top_p {
            if p.is_nan() || p <= 0.0 || p > 1.0 {
                return Err(BadRequest::TopP(p));
            }
        }
        Ok(())
    }
}

/// What a query produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(Answer),
    Score(Score),
}

/// Checks `request` and loads its document's state from `store`.
pub fn open(store: &Store, model: &GistModel, request: Request) -> anyhow::Result<Query> {
    request.check()?;
    let (_, state) = store.load(&request.id, model)?;
    Ok(Query { state, request })
}

impl Query {
    /// Whether this query scores a continuation (else it generates an answer).
    pub fn is_score(&self) -> bool {
        self.request.score.is_some()
    }

    /// Runs it: `on_text` sees the answer's text as it settles (nothing for a score).
    pub fn run(self, model: &GistModel, on_text: impl FnMut(&str)) -> anyhow::Result<Outcome> {
        let r = &self.request;
        match &r.score {
            Some(text) => Ok(Outcome::Score(score(
                model,
                self.state,
                r.question.as_deref(),
                r.chat_template,
                text,
            )?)),
            None => {
                let question = r.question.as_deref().unwrap_or_default();
                Ok(Outcome::Answer(answer(
                    model,
                    self.state,
                    question,
                    &r.sampling(),
                    on_text,
                )?))
            }
        }
    }
}

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Wrap the question in the model's chat template, when it has one.
    pub chat_template: bool,
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    pub tokens: usize,
    /// From the start of the query to the first answer token (none if the model ended at
    /// once).
    pub time_to_first_token_ms: Option<f64>,
    pub seconds: f64,
}

/// Feeds `tokens` as an open (unfinished) segment; returns the last row's logits (V,).
fn feed(model: &GistModel, state: &mut GistState, tokens: &[u32]) -> anyhow::Result<Tensor> {
    let logits = advance(
        model,
        &mut [(
            state,
            Chunk {
                tokens,
                close: false,
            },
        )],
        true,
    )?
    .context("logits requested")?;
    Ok(logits.get(logits.dim(0)? - 1)?)
}

/// Closes the open sentence (writes the gists); returns the last gist row's logits.
fn close(model: &GistModel, state: &mut GistState) -> anyhow::Result<Tensor> {
    let logits = advance(
        model,
        &mut [(
            state,
            Chunk {
                tokens: &[],
                close: true,
            },
        )],
        true,
    )?
    .context("logits requested")?;
    Ok(logits.get(logits.dim(0)? - 1)?)
}

/// The question's tokens: rendered by the model's chat template when it has one and
/// `chat_template` asks for it; otherwise a paragraph break, then the question (the
/// document's last sentence is closed; the question starts a new paragraph as in the
/// training text).
pub fn question_tokens(
    model: &GistModel,
    question: &str,
    chat_template: bool,
) -> anyhow::Result<Vec<u32>> {
    ensure!(!question.trim().is_empty(), "the question is empty");
    let text = match &model.chat_template {
        Some(t) if chat_template => t.render_question(question)?,
        _ => format!("\n\n{question}"),
    };
    let (ids, _) = model.tokenizer.encode(&text)?;
    Ok(ids)
}

/// Answers `question` from `state` (consumed: the stored state is not changed).
pub fn answer(
    model: &GistModel,
    state: GistState,
    question: &str,
    sampling: &Sampling,
    on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    let started = std::time::Instant::now();
    let q = question_tokens(model, question, sampling.chat_template)?;
    generate(model, state, &q, sampling, started, on_text)
}

/// Continues the document: `text` is fed as its next words (no question framing) and the
/// model writes on from there.
pub fn continuation(
    model: &GistModel,
    state: GistState,
    text: &str,
    sampling: &Sampling,
    on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    let started = std::time::Instant::now();
    let (ids, _) = model.tokenizer.encode(text)?;
    ensure!(!ids.is_empty(), "the text to continue is empty");
    generate(model, state, &ids, sampling, started, on_text)
}

fn generate(
    model: &GistModel,
    mut state: GistState,
    prompt: &[u32],
    sampling: &Sampling,
    started: std::time::Instant,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    let mut logits = feed(model, &mut state, prompt)?;
    let temperature = (sampling.temperature > 0.0).then_some(sampling.temperature);
    let mut processor = LogitsProcessor::new(sampling.seed, temperature, sampling.top_p);
    let eos = model.eos_token_id();
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut ttft = None;
    while ids.len() < sampling.max_tokens {
        let next = processor.sample(&logits)?;
        if Some(next) == eos {
            break;
        }
        ttft.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
        if model.gist.gist_token_ids.contains(&next) {
            // The model ended a sentence: write all its gists and go on from the last.
            logits = close(model, &mut state)?;
            continue;
        }
        ids.push(next);
        // A byte-level token can end inside a character, which decodes as U+FFFD until
        // the next token completes it: print only what is settled.
        let text = model.tokenizer.decode(&ids)?;
        let settled = text.trim_end_matches('\u{FFFD}');
        if settled.len() > printed.len() && settled.starts_with(&printed) {
            on_text(&settled[printed.len()..]);
            printed = settled.to_string();
        }
        logits = feed(model, &mut state, &[next])?;
    }
    let text = model.tokenizer.decode(&ids)?;
    if text.len() > printed.len() && text.starts_with(&printed) {
        on_text(&text[printed.len()..]);
    }
    Ok(Answer {
        text,
        tokens: ids.len(),
        time_to_first_token_ms: ttft,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The log-likelihood of a continuation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Score {
    pub tokens: usize,
    /// Sum of natural-log probabilities.
    pub logprob: f64,
    pub perplexity: f64,
}

/// Scores `text` as the continuation of the document (after `question`, if any). With a
/// question, every token of `text` is scored; without one, the first token has no stored
/// prediction (the logits of the document's last gist are not kept), so scoring starts at
/// the second.
pub fn score(
    model: &GistModel,
    mut state: GistState,
    question: Option<&str>,
    chat_template: bool,
    text: &str,
) -> anyhow::Result<Score> {
    let (ids, _) = model.tokenizer.encode(text)?;
    ensure!(!ids.is_empty(), "the text to score is empty");
    let first = match question {
        Some(q) => Some(feed(
            model,
            &mut state,
            &question_tokens(model, q, chat_template)?,
        )?),
        None => None,
    };
    let rows = advance(
        model,
        &mut [(
            &mut state,
            Chunk {
                tokens: &ids,
                close: false,
            },
        )],
        true,
    )?
    .context("logits requested")?;
    // Row j predicts ids[j + 1]; `first` (after the question) predicts ids[0].
    let (predictors, targets) = match first {
        Some(f) => (
            Tensor::cat(&[&f.unsqueeze(0)?, &rows.narrow(0, 0, ids.len() - 1)?], 0)?,
            &ids[..],
        ),
        None => {
            ensure!(
                ids.len() > 1,
                "without a question, the text must have at least two tokens"
            );
            (rows.narrow(0, 0, ids.len() - 1)?, &ids[1..])
        }
    };
    let logp = candle_nn::ops::log_softmax(&predictors.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::new(targets, logp.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let logprob: f64 = picked.iter().map(|&x| x as f64).sum();
    Ok(Score {
        tokens: targets.len(),
        logprob,
        perplexity: (-logprob / targets.len() as f64).exp(),
    })
}
