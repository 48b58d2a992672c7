//! `giststream reread`: the reference answer. The model reads a text file whole with full
//! attention and answers the question, so that `query`'s answer from the stored gist state
//! can be put beside what the same model says with every word in view.

use super::flags::{ModelArgs, SamplingArgs};
use anyhow::Context;
use clap::Args;
use std::io::{Read, Write};
use std::path::PathBuf;

/// Text files past this many bytes are refused before tokenizing: full attention reads at
/// most the model's trained positions (8,192 for SmolLM2, about 32 KB of English).
const MAX_TEXT_BYTES: u64 = 1 << 20;

#[derive(Debug, Args)]
pub struct RereadArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to read (UTF-8; at most 1 MiB, and at most the model's trained positions
    /// once tokenized).
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// The question.
    pub question: String,
    /// Put the text inside the chat's user turn, the question after it in the same turn
    /// (the default puts the text first and asks through the chat template, as `query`
    /// asks a stored document).
    #[arg(long)]
    pub in_turn: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Send the question as plain text even when the model has a chat template.
    #[arg(long, conflicts_with = "in_turn")]
    pub no_chat_template: bool,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: RereadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.question.trim().is_empty(), "the question is empty");
    let sampling = args.sampling.sampling(!args.no_chat_template);
    sampling.check()?;
    let text = read_text(&args.text)?;
    let model = args.model.load()?;
    let placement = if args.in_turn {
        crate::query::Placement::InTurn
    } else {
        crate::query::Placement::Before
    };
    let mut out = std::io::stdout().lock();
    let json = args.json;
    let mut write_err = None;
    let answer = crate::query::reread(
        &model,
        &text,
        &args.question,
        placement,
        &sampling,
        |piece| {
            if !json && write_err.is_none() {
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                    write_err = Some(e);
                }
            }
        },
    )
    .with_context(|| format!("answering from {}", args.text.display()))?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    if json {
        // The API's answer object (schemas/api.schema.json, `answer`).
        writeln!(out, "{}", serde_json::to_string(&answer)?)?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}

/// The file's text, refused past [`MAX_TEXT_BYTES`] or when it is not UTF-8.
fn read_text(path: &PathBuf) -> anyhow::Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_TEXT_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= MAX_TEXT_BYTES,
        "{} is over {MAX_TEXT_BYTES} bytes: too long to read whole",
        path.display()
    );
    String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))
}
