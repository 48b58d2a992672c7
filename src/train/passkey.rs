//! `giststream passkey`: can a model find one number hidden in a long, dull document?
//!
//! The classic retrieval probe (Mohtashami and Jaggi's landmark-attention test): a five-digit
//! pass key sits at a random depth in filler sentences; after the document the model is
//! asked for it through its chat template and answers greedily. A gist model reads the
//! document into its compressed state first, exactly as ingestion stores it, and answers
//! from that state (as `query` does); a full-attention model keeps every token.
//!
//! Gist compression is known to be weak at exact recall (a sentence's words are gone once
//! its gists are written), so this is a report, not a target.

use crate::engine::state::{advance, Chunk, GistState};
use crate::model::random::SplitMix;
use crate::model::GistModel;
use crate::query::Sampling;
use anyhow::Context;
use serde::Serialize;

/// The filler: sentences that say nothing, repeated.
const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. \
                      Here we go. There and back again. ";

/// How the model reads the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reading {
    /// Sentence by sentence into the gist state (what a stored document is).
    Gist,
    /// Every token kept: plain causal attention (the base model's ceiling).
    Full,
}

/// One trial's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub reading: Reading,
    /// Regular tokens of the document.
    pub tokens: usize,
    /// Where the key sat, as a fraction of the document.
    pub depth: f64,
    pub key: String,
    pub answer: String,
    pub found: bool,
    pub seconds: f64,
}

/// A document of about `tokens` tokens with `key` at `depth` (0..1), and the question.
pub fn document(model: &GistModel, tokens: usize, depth: f64, key: &str) -> anyhow::Result<String> {
    let build = |repeats: usize| -> String {
        let at = ((repeats as f64) * depth.clamp(0.0, 1.0)).round() as usize;
        let mut text = String::with_capacity(repeats * FILLER.len() + 300);
        text.push_str(INTRO);
        for i in 0..=repeats {
            if i == at {
                text.push_str(&format!(
                    "The pass key is {key}. Remember it. {key} is the pass key. "
                ));
            }
            if i < repeats {
                text.push_str(FILLER);
            }
        }
        text
    };
    // Sized by measuring: one trial document of 64 repeats gives the tokens per repeat.
    let probe = 64;
    // Counted as the model reads it: sentence by sentence.
    let count = |text: &str| -> anyhow::Result<usize> {
        Ok(model.segments(text)?.iter().map(|s| s.tokens.len()).sum())
    };
    let n = count(&build(probe))?;
    let fixed = count(&build(0))?;
    let per = (n.saturating_sub(fixed) as f64 / probe as f64).max(1.0);
    let repeats = ((tokens.saturating_sub(fixed)) as f64 / per)
        .round()
        .max(1.0) as usize;
    Ok(build(repeats))
}

const INTRO: &str = "There is an important piece of information hidden inside a lot of \
                     irrelevant text. Find it and remember it. I will ask you about it. ";

pub const QUESTION: &str = "What is the pass key?";

/// The start of the answer, given: a 135M model asked open-endedly talks about pass keys
/// in general; the probe is whether it can fill in this one (as in LongLoRA's version).
pub const ANSWER_START: &str = "The pass key is";

/// Where the question goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// In a new paragraph after the document.
    Paragraph,
    /// Through the chat template, as one user turn after the document (what `query` does).
    Chat,
    /// The document inside the chat's user turn: the template's opening before it, the
    /// question and the turn's end after it.
    InTurn,
}

/// Runs one trial: `model` reads the document (`reading`) and answers [`QUESTION`],
/// asked as `ask` says, followed by [`ANSWER_START`].
pub fn trial(
    model: &GistModel,
    reading: Reading,
    tokens: usize,
    ask: Ask,
    rng: &mut SplitMix,
) -> anyhow::Result<Trial> {
    let key = format!("{:05}", 10_000 + rng.next_u64() % 90_000);
    let depth = rng.uniform() as f64;
    let text = document(model, tokens, depth, &key)?;
    let (segments, mut prompt) = match ask {
        Ask::Paragraph | Ask::Chat => (
            model.segments(&text)?,
            crate::query::question_text(model, QUESTION, ask == Ask::Chat)?,
        ),
        Ask::InTurn => {
            let (segments, after) =
                crate::query::document_in_turn(model, &text).context("--in-turn")?;
            (segments, format!("\n\n{QUESTION}{after}"))
        }
    };
    let started = std::time::Instant::now();
    let sampling = Sampling {
        max_tokens: 12,
        temperature: 0.0,
        top_p: None,
        seed: 0,
        chat_template: true,
    };
    let doc_tokens = segments.iter().map(|s| s.tokens.len()).sum();
    let mut state = GistState::new(model)?;
    for s in &segments {
        // Full reading never closes a sentence: every token stays in the state.
        let close = s.close && reading == Reading::Gist;
        advance(
            model,
            &mut [(
                &mut state,
                Chunk {
                    tokens: &s.tokens,
                    close,
                },
            )],
            false,
        )
        .with_context(|| format!("reading a {tokens}-token passkey document"))?;
    }
    if !prompt.ends_with(char::is_whitespace) {
        prompt.push(' ');
    }
    prompt.push_str(ANSWER_START);
    let answer = match reading {
        Reading::Gist => crate::query::continuation(model, state, &prompt, &sampling, |_| {})?,
        Reading::Full => crate::query::continuation_open(model, state, &prompt, &sampling)?,
    };
    Ok(Trial {
        reading,
        tokens: doc_tokens,
        depth,
        found: answer.text.contains(&key),
        key,
        answer: answer.text,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded() -> GistModel {
        let dir = crate::model::embedded::dir().unwrap();
        GistModel::load(
            &dir,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
            &Default::default(),
        )
        .unwrap()
    }

    #[test]
    fn the_key_sits_once_at_its_depth_and_the_length_is_near_the_ask() {
        let model = embedded();
        for (depth, tokens) in [(0.0, 300), (0.5, 1000), (1.0, 600)] {
            let text = document(&model, tokens, depth, "12345").unwrap();
            assert_eq!(text.matches("The pass key is 12345.").count(), 1);
            // Depth is measured in the filler, after the fixed introduction.
            let body = text.len() - INTRO.len();
            let at = (text.find("The pass key").unwrap() - INTRO.len()) as f64 / body as f64;
            assert!((at - depth).abs() < 0.1, "depth {depth}: at {at}");
            let n: usize = model
                .segments(&text)
                .unwrap()
                .iter()
                .map(|s| s.tokens.len())
                .sum();
            assert!(n.abs_diff(tokens) < tokens / 10 + 30, "{tokens}: {n}");
        }
    }

    #[test]
    fn a_trial_reads_answers_and_checks_the_key() {
        let model = embedded();
        let mut rng = SplitMix(7);
        for reading in [Reading::Gist, Reading::Full] {
            let t = trial(&model, reading, 200, Ask::Paragraph, &mut rng).unwrap();
            assert_eq!(t.key.len(), 5);
            assert!(t.tokens > 150, "{}", t.tokens);
            assert_eq!(t.found, t.answer.contains(&t.key));
        }
    }
}
