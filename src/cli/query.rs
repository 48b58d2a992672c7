//! `giststream query`: a question or a score against a stored document, through the
//! serving process's API when one holds the store.

use super::flags::{ModelArgs, SamplingArgs};
use anyhow::{bail, Context};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sled store (when a process serves it, the query goes through its API and its
    /// model answers; --model is then not needed).
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Document id.
    #[arg(long, visible_alias = "doc", value_name = "ID")]
    pub id: String,
    /// The question (optional with --score).
    pub question: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Score this text as the continuation (after the question, if given) instead of
    /// generating.
    #[arg(long, value_name = "TEXT")]
    pub score: Option<String>,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Send the question as plain text even when the model has a chat template.
    #[arg(long)]
    pub no_chat_template: bool,
}

pub fn run(args: QueryArgs) -> anyhow::Result<()> {
    use crate::query::Outcome;
    if args.score.is_none() && args.question.as_deref().is_none_or(|q| q.trim().is_empty()) {
        bail!("the question is empty: give a question, or --score TEXT");
    }
    let mut out = std::io::stdout().lock();
    let json = args.json;
    let req = crate::query::Request {
        id: args.id.clone(),
        question: args.question.clone(),
        score: args.score.clone(),
        max_tokens: args.sampling.max_tokens,
        temperature: args.sampling.temperature,
        top_p: args.sampling.top_p,
        seed: args.sampling.seed,
        chat_template: !args.no_chat_template,
    };
    // Refused here too, so a serving process is not asked in vain.
    req.check()?;
    // The answer is printed as it settles; a closed stdout stops the printing, not the query.
    let mut write_err = None;
    let mut print = |piece: &str| {
        if !json && write_err.is_none() {
            write_err = write!(out, "{piece}").and_then(|_| out.flush()).err();
        }
    };
    let outcome = match crate::serve::client::Client::discover(&args.store) {
        Some(client) => {
            let via = || {
                format!(
                    "asking the process serving {} ({})",
                    args.store.display(),
                    client.address()
                )
            };
            if req.score.is_some() {
                Outcome::Score(client.score(&req).with_context(via)?)
            } else {
                Outcome::Answer(client.ask(&req, &mut print).with_context(via)?)
            }
        }
        None => {
            let model = args.model.load()?;
            let q = {
                let store = crate::store::Store::open_existing(&args.store)?;
                crate::query::open(&store, &model, req)?
            };
            if q.knows_nothing() && !q.is_score() {
                eprintln!("giststream: warning: {}", crate::query::NOTHING_ENCODED);
            }
            q.run(&model, &crate::query::never, &mut print)?
        }
    };
    if let Some(e) = write_err {
        return Err(e.into());
    }
    match outcome {
        Outcome::Score(s) => print_score(&mut out, &s, json),
        Outcome::Answer(a) => print_answer_end(&mut out, &args.id, &a, json),
    }
}

fn print_score(out: &mut impl Write, s: &crate::query::Score, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string(s)?)?;
    } else {
        writeln!(
            out,
            "{} tokens, log-likelihood {:.3}, perplexity {:.3}",
            s.tokens, s.logprob, s.perplexity
        )?;
    }
    Ok(())
}

/// After a streamed answer: a newline, or with --json the whole answer as one object.
fn print_answer_end(
    out: &mut impl Write,
    id: &str,
    a: &crate::query::Answer,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        let v = serde_json::json!({"id": id, "answer": a.text, "tokens": a.tokens,
            "time_to_first_token_ms": a.time_to_first_token_ms, "seconds": a.seconds});
        writeln!(out, "{v}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
