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
use crate::text::encoder::DocumentEncoder;
use crate::text::tokenize::Segment;
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
    /// The question as segments (empty for a score without one).
    question: Vec<Segment>,
    /// The text to score as segments (empty for a question).
    scored: Vec<Segment>,
}

/// A request refused before any work (the HTTP API answers 400).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error("the question is empty: give a question, or score")]
    EmptyQuestion,
    #[error("max_tokens {0} is over the cap of {MAX_TOKENS}")]
    MaxTokens(usize),
    #[error("the text to score has {0} token(s): it needs at least one after a question, two without one")]
    ShortScore(usize),
    #[error(
        "the question and the text to score are {0} tokens, over the cap of {MAX_INPUT_TOKENS}"
    )]
    TooLong(usize),
    #[error("temperature {0} is not a number of at least 0")]
    Temperature(f64),
    #[error("top_p {0} is not in (0, 1]")]
    TopP(f64),
}

/// The most tokens one answer may generate.
pub const MAX_TOKENS: usize = 4096;

/// The most tokens a query may feed (question and scored text together). Memory is linear
/// in them, but time is not: every sentence reads all the gists before it.
pub const MAX_INPUT_TOKENS: usize = 131_072;

impl Request {
    /// Refuses what no answer could honour, before any work.
    pub fn check(&self) -> Result<(), BadRequest> {
        if self.score.is_none() && self.question.as_deref().is_none_or(|q| q.trim().is_empty()) {
            return Err(BadRequest::EmptyQuestion);
        }
        self.sampling().check()
    }
}

impl Sampling {
    /// Refuses settings no answer could honour.
    pub fn check(&self) -> Result<(), BadRequest> {
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

/// Asked between steps of a query: `Some(why)` stops it (the client went away, the server
/// is stopping).
pub type Cancel = dyn Fn() -> Option<&'static str> + Sync;

/// Never cancels (the CLI's own queries: Ctrl-C ends the process).
pub fn never() -> Option<&'static str> {
    None
}

/// A query stopped by its [`Cancel`].
#[derive(Debug, thiserror::Error)]
#[error("the query was cancelled: {0}")]
pub struct Cancelled(pub &'static str);

fn check_cancel(cancelled: &Cancel) -> anyhow::Result<()> {
    match cancelled() {
        Some(why) => Err(Cancelled(why).into()),
        None => Ok(()),
    }
}

/// The warning for a question about a document of which nothing is encoded yet.
pub const NOTHING_ENCODED: &str = "the document is incomplete and none of its text is \
    encoded yet (it is held until a sentence ends): the answer knows nothing of it";

/// What a query produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(Answer),
    Score(Score),
}

/// Checks `request` and loads its document's state from `store`.
pub fn open(store: &Store, model: &GistModel, request: Request) -> anyhow::Result<Query> {
    request.check()?;
    let question = match &request.question {
        Some(q) if !q.trim().is_empty() => question_segments(model, q, request.chat_template)?,
        _ => Vec::new(),
    };
    let scored = match &request.score {
        Some(t) => text_segments(model, t)?,
        None => Vec::new(),
    };
    let tokens: usize = question.iter().chain(&scored).map(|s| s.tokens.len()).sum();
    if tokens > MAX_INPUT_TOKENS {
        return Err(BadRequest::TooLong(tokens).into());
    }
    if request.score.is_some() {
        let scored_tokens: usize = scored.iter().map(|s| s.tokens.len()).sum();
        if scored_tokens < if question.is_empty() { 2 } else { 1 } {
            return Err(BadRequest::ShortScore(scored_tokens).into());
        }
    }
    let (_, state) = store.load(&request.id, model)?;
    Ok(Query {
        state,
        request,
        question,
        scored,
    })
}

impl Query {
    /// Whether this query scores a continuation (else it generates an answer).
    pub fn is_score(&self) -> bool {
        self.request.score.is_some()
    }

    /// Whether the stored document is incomplete and nothing of it was encoded yet (its
    /// text so far is held back, unfinished): an answer then knows nothing of it.
    pub fn knows_nothing(&self) -> bool {
        self.state.regular_tokens == 0
    }

    /// Runs it: `on_text` sees the answer's text as it settles (nothing for a score);
    /// `cancelled` is asked between steps and stops the work with [`Cancelled`].
    pub fn run(
        self,
        model: &GistModel,
        cancelled: &Cancel,
        on_text: impl FnMut(&str),
    ) -> anyhow::Result<Outcome> {
        let r = &self.request;
        if r.score.is_some() {
            let question = (!self.question.is_empty()).then_some(&self.question[..]);
            return Ok(Outcome::Score(score_segments(
                model,
                self.state,
                question,
                &self.scored,
                cancelled,
            )?));
        }
        let started = std::time::Instant::now();
        Ok(Outcome::Answer(generate(
            model,
            self.state,
            &self.question,
            &r.sampling(),
            started,
            cancelled,
            on_text,
        )?))
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

/// `text` as model segments continuing a document: split into sentences like a document
/// (no BOS), so that memory grows with the text's length, not its square; the last segment
/// is left open (what follows continues its sentence). Special-token names in it are read
/// as those tokens: it is the querying user's own text or a rendered chat template, and it
/// is never stored.
fn text_segments(model: &GistModel, text: &str) -> anyhow::Result<Vec<Segment>> {
    let mut enc = DocumentEncoder::new(&model.tokenizer, &model.gist.segmentation, None)
        .reading_special_tokens();
    let mut segments = enc.push(text)?;
    segments.extend(enc.finish()?);
    if let Some(last) = segments.last_mut() {
        last.close = false;
    }
    Ok(segments)
}

/// Questions up to this many tokens stay whole in the state while the answer is written.
pub const OPEN_QUESTION_TOKENS: usize = 512;

/// The question as segments: left open (no sentence closes, so the answer reads every
/// token of it, not four gists per sentence of it) when it holds at most
/// [`OPEN_QUESTION_TOKENS`]; a longer one goes in sentence by sentence like a document, so
/// that memory stays linear in it.
pub fn question_segments(
    model: &GistModel,
    question: &str,
    chat_template: bool,
) -> anyhow::Result<Vec<Segment>> {
    let mut segments = text_segments(model, &question_text(model, question, chat_template)?)?;
    let tokens: usize = segments.iter().map(|s| s.tokens.len()).sum();
    if tokens <= OPEN_QUESTION_TOKENS {
        segments.iter_mut().for_each(|s| s.close = false);
    }
    Ok(segments)
}

/// Feeds one segment; returns its rows' logits (its tokens, then its gists if it closes).
fn step(
    model: &GistModel,
    state: &mut GistState,
    tokens: &[u32],
    close: bool,
) -> anyhow::Result<Tensor> {
    advance(model, &mut [(state, Chunk { tokens, close })], true)?.context("logits requested")
}

/// The last row of `logits` (V,).
fn last_row(logits: &Tensor) -> anyhow::Result<Tensor> {
    Ok(logits.get(logits.dim(0)? - 1)?)
}

/// Feeds `segments` one after another; returns the last row's logits (V,).
fn feed(
    model: &GistModel,
    state: &mut GistState,
    segments: &[Segment],
    cancelled: &Cancel,
) -> anyhow::Result<Tensor> {
    let mut last = None;
    for s in segments {
        check_cancel(cancelled)?;
        last = Some(last_row(&step(model, state, &s.tokens, s.close)?)?);
    }
    last.context("nothing to feed")
}

/// The question as the model reads it: rendered by the model's chat template when it has
/// one and `chat_template` asks for it; otherwise a paragraph break, then the question
/// (the document's last sentence is closed; the question starts a new paragraph as in the
/// training text).
pub fn question_text(
    model: &GistModel,
    question: &str,
    chat_template: bool,
) -> anyhow::Result<String> {
    ensure!(!question.trim().is_empty(), "the question is empty");
    Ok(match &model.chat_template {
        Some(t) if chat_template => t.render_question(question)?,
        _ => format!("\n\n{question}"),
    })
}

/// The question's tokens, whole (see [`question_text`]; [`question_segments`] says how a
/// query feeds them).
pub fn question_tokens(
    model: &GistModel,
    question: &str,
    chat_template: bool,
) -> anyhow::Result<Vec<u32>> {
    let (ids, _) = model
        .tokenizer
        .encode(&question_text(model, question, chat_template)?)?;
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
    let q = question_segments(model, question, sampling.chat_template)?;
    generate(model, state, &q, sampling, started, &never, on_text)
}

/// Continues from a state that keeps every token (`passkey`'s full-attention reading):
/// `text` goes in without closing a sentence and the answer never writes gists, so
/// attention stays plain causal over everything.
pub fn continuation_open(
    model: &GistModel,
    state: GistState,
    text: &str,
    sampling: &Sampling,
) -> anyhow::Result<Answer> {
    let started = std::time::Instant::now();
    let mut segments = text_segments(model, text)?;
    for s in &mut segments {
        s.close = false;
    }
    generate_with(
        model,
        state,
        &segments,
        sampling,
        started,
        &never,
        true,
        |_| {},
    )
}

/// The chat's user turn around a document: the template's opening (without its first
/// marker when that marker is the BOS a document already starts with, SmolLM2's
/// `<|im_start|>`) and what follows the content (the turn's end, the assistant's opening).
/// A chat model looks for a document inside the turn: SmolLM2 finds a pass key there and
/// not before the turns (README, "Passkey").
pub fn user_turn(model: &GistModel) -> anyhow::Result<(String, String)> {
    let t = model
        .chat_template
        .as_ref()
        .context("the model has no chat template to put the text in a user turn")?;
    let (before, after) = t.render_turn()?;
    let before = match (
        model.bos_token_id().is_some() && model.gist.add_bos,
        before.strip_prefix(t.bos_token()),
    ) {
        (true, Some(rest)) if !t.bos_token().is_empty() => rest.to_string(),
        _ => before,
    };
    Ok((before, after))
}

/// `text` as a document inside the chat's user turn: its segments with the turn's opening
/// (its special tokens read as such) before the first sentence, after the BOS; and what
/// closes the turn, for after the question. The document's own text stays plain
/// ([`GistTokenizer::encode_text`](crate::text::tokenize::GistTokenizer::encode_text)).
pub fn document_in_turn(model: &GistModel, text: &str) -> anyhow::Result<(Vec<Segment>, String)> {
    let (before, after) = user_turn(model)?;
    let (opening, _) = model.tokenizer.encode(&before)?;
    let mut segments = model.segments(text)?;
    let first = segments.first_mut().context("the document is empty")?;
    let at = usize::from(model.gist.add_bos && model.bos_token_id().is_some());
    first.tokens.splice(at..at, opening);
    Ok((segments, after))
}

/// Where [`reread`] puts the text it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Before the question, as a stored document sits before `query`'s question.
    Before,
    /// Inside the chat's user turn, the question after it in the same turn
    /// ([`user_turn`]).
    InTurn,
}

/// Answers `question` after reading `text` whole with every token kept: full causal
/// attention, no gist written. It is what the model answers without compression, the
/// reference a stored state's answer (`query`) is measured against. It reads at most the
/// positions the model was trained for (refused beyond, naming both numbers), and time and
/// memory grow with the square of the text: this is a measuring tool, not a serving path.
pub fn reread(
    model: &GistModel,
    text: &str,
    question: &str,
    placement: Placement,
    sampling: &Sampling,
    on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    let started = std::time::Instant::now();
    ensure!(!text.trim().is_empty(), "the text to read is empty");
    ensure!(!question.trim().is_empty(), "the question is empty");
    sampling.check()?;
    let (mut segments, prompt) = match placement {
        Placement::Before => (
            model.segments(text)?,
            question_text(model, question, sampling.chat_template)?,
        ),
        Placement::InTurn => {
            let (segments, after) = document_in_turn(model, text)?;
            (segments, format!("\n\n{question}{after}"))
        }
    };
    segments.extend(text_segments(model, &prompt)?);
    let tokens: usize = segments.iter().map(|s| s.tokens.len()).sum();
    if let Some(max) = model.llama.cfg.max_positions {
        ensure!(
            tokens + sampling.max_tokens <= max,
            "the text and question are {tokens} tokens and the answer may add {}: past the \
             {max} positions the model was trained for (max_position_embeddings), where full \
             attention is not defined; store the text and `query` it instead",
            sampling.max_tokens
        );
    }
    for s in &mut segments {
        s.close = false;
    }
    let state = GistState::new(model)?;
    generate_with(
        model, state, &segments, sampling, started, &never, true, on_text,
    )
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
    ensure!(!text.trim().is_empty(), "the text to continue is empty");
    let segments = text_segments(model, text)?;
    generate(model, state, &segments, sampling, started, &never, on_text)
}

fn generate(
    model: &GistModel,
    state: GistState,
    prompt: &[Segment],
    sampling: &Sampling,
    started: std::time::Instant,
    cancelled: &Cancel,
    on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    generate_with(
        model, state, prompt, sampling, started, cancelled, false, on_text,
    )
}

/// `open`: never write gists (they are masked out of the choice), so nothing is dropped.
#[allow(clippy::too_many_arguments)]
fn generate_with(
    model: &GistModel,
    mut state: GistState,
    prompt: &[Segment],
    sampling: &Sampling,
    started: std::time::Instant,
    cancelled: &Cancel,
    open: bool,
    mut on_text: impl FnMut(&str),
) -> anyhow::Result<Answer> {
    ensure!(!prompt.is_empty(), "the prompt is empty");
    let no_gists = if open {
        let mut m = vec![0f32; model.llama.cfg.vocab];
        for &g in &model.gist.gist_token_ids {
            m[g as usize] = f32::NEG_INFINITY;
        }
        Some(Tensor::new(m.as_slice(), model.llama.device())?)
    } else {
        None
    };
    let mut logits = feed(model, &mut state, prompt, cancelled)?;
    let temperature = (sampling.temperature > 0.0).then_some(sampling.temperature);
    let mut processor = LogitsProcessor::new(sampling.seed, temperature, sampling.top_p);
    let eos = model.eos_token_id();
    let mut ids: Vec<u32> = Vec::new();
    let mut printed = String::new();
    let mut ttft = None;
    while ids.len() < sampling.max_tokens {
        check_cancel(cancelled)?;
        if let Some(m) = &no_gists {
            logits = logits.to_dtype(candle_core::DType::F32)?.broadcast_add(m)?;
        }
        let next = processor.sample(&logits)?;
        if Some(next) == eos {
            break;
        }
        ttft.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1e3);
        if model.gist.gist_token_ids.contains(&next) {
            // The model ended a sentence: write all its gists and go on from the last.
            logits = last_row(&step(model, &mut state, &[], true)?)?;
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
        logits = last_row(&step(model, &mut state, &[next], false)?)?;
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

/// Scores `text` as the continuation of the document (after `question`, if any). The text
/// goes in sentence by sentence like a document (each closed sentence writes its gists,
/// and the first token of the next is predicted from the last gist); every regular token
/// is scored once. With a question, the first token is predicted from the question's end;
/// without one it has no stored prediction (the logits of the document's last gist are
/// not kept), so scoring starts at the second.
pub fn score(
    model: &GistModel,
    state: GistState,
    question: Option<&str>,
    chat_template: bool,
    text: &str,
) -> anyhow::Result<Score> {
    let question = question
        .map(|q| question_segments(model, q, chat_template))
        .transpose()?;
    let segments = text_segments(model, text)?;
    score_segments(model, state, question.as_deref(), &segments, &never)
}

fn score_segments(
    model: &GistModel,
    mut state: GistState,
    question: Option<&[Segment]>,
    segments: &[Segment],
    cancelled: &Cancel,
) -> anyhow::Result<Score> {
    let total: usize = segments.iter().map(|s| s.tokens.len()).sum();
    ensure!(total > 0, "the text to score is empty");
    // The row predicting the next regular token.
    let mut prev = match question {
        Some(q) => Some(feed(model, &mut state, q, cancelled)?),
        None => {
            ensure!(
                total > 1,
                "without a question, the text must have at least two tokens"
            );
            None
        }
    };
    let (mut logprob, mut scored) = (0f64, 0usize);
    for s in segments {
        check_cancel(cancelled)?;
        let n = s.tokens.len();
        if n == 0 {
            continue;
        }
        let rows = step(model, &mut state, &s.tokens, s.close)?;
        // Row j predicts tokens[j + 1]; `prev` predicts tokens[0].
        let (predictors, targets) = match &prev {
            Some(p) => (
                Tensor::cat(&[&p.unsqueeze(0)?, &rows.narrow(0, 0, n - 1)?], 0)?,
                &s.tokens[..],
            ),
            None => (rows.narrow(0, 0, n - 1)?, &s.tokens[1..]),
        };
        if !targets.is_empty() {
            let logp = candle_nn::ops::log_softmax(&predictors.to_dtype(DType::F32)?, D::Minus1)?;
            let idx = Tensor::new(targets, logp.device())?.unsqueeze(1)?;
            let picked = logp.gather(&idx, 1)?.squeeze(1)?.to_vec1::<f32>()?;
            logprob += picked.iter().map(|&x| x as f64).sum::<f64>();
            scored += targets.len();
        }
        prev = Some(last_row(&rows)?);
    }
    Ok(Score {
        tokens: scored,
        logprob,
        perplexity: (-logprob / scored as f64).exp(),
    })
}
