//! `giststream compress`: files to gist states, a report per document, optionally stored.

use super::flags::ModelArgs;
use crate::engine::compress::{compress, human_bytes, CompressReport, Document};
use crate::text::files::{documents, read_text};
use anyhow::{bail, Context};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct CompressArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// UTF-8 text files, one document each.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Documents compressed together, one sentence of each per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// One JSON object per document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also store each document (state, text, metadata) in this sled store; the id is the
    /// file name without its extension.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Storage precision of the stored states (default f32).
    #[arg(long, value_enum, requires = "store")]
    pub precision: Option<crate::store::codec::Precision>,
    /// Version recorded for the stored documents.
    #[arg(long, default_value_t = 1)]
    pub doc_version: u64,
    /// With --store: send each file as parts of at most this many bytes, each appended to
    /// the stored state as it would arrive from Kafka (0: whole files).
    #[arg(long, value_name = "BYTES", default_value_t = 0, requires = "store")]
    pub part_bytes: usize,
}

/// `compress --store --part-bytes N`: every file sent as parts, appended one at a time.
fn run_compress_parts(args: &CompressArgs, store_dir: &std::path::Path) -> anyhow::Result<()> {
    use crate::store::parts::{apply_parts, parts_of, Outcome};
    let model = args.model.load()?;
    let store = crate::store::Store::open(store_dir)?;
    let mut parts = Vec::new();
    for (f, id) in documents(&args.files)? {
        let text = read_text(&f)?;
        parts.extend(parts_of(&id, args.doc_version, &text, args.part_bytes));
    }
    let outcomes = apply_parts(&model, &store, &parts, precision(args), args.batch)?;
    let mut out = std::io::stdout().lock();
    let mut rejected = 0;
    for (p, o) in parts.iter().zip(outcomes) {
        match o {
            Outcome::Stored { meta: m, .. } if m.complete => {
                if args.json {
                    writeln!(out, "{}", serde_json::to_string(&m)?)?;
                } else {
                    writeln!(
                        out,
                        "{:<24} {} parts {:>8} tokens {:>6} sentences {:>6} gists {} chunks",
                        m.id, m.parts, m.tokens, m.sentences, m.gist_tokens, m.state_chunks
                    )?;
                }
            }
            Outcome::Stored { .. } => {}
            Outcome::Skipped(a) => eprintln!("{} part {}: skipped ({a:?})", p.id, p.part),
            Outcome::Rejected(why) => {
                rejected += 1;
                eprintln!("giststream: {} part {}: {why}", p.id, p.part);
            }
        }
    }
    if rejected > 0 {
        bail!("{rejected} part(s) were rejected (listed above)");
    }
    Ok(())
}

pub fn run(args: CompressArgs) -> anyhow::Result<()> {
    if let (Some(dir), true) = (&args.store, args.part_bytes > 0) {
        return run_compress_parts(&args, dir);
    }
    let model = args.model.load()?;
    let mut docs = Vec::with_capacity(args.files.len());
    let mut texts = Vec::with_capacity(args.files.len());
    for (f, id) in documents(&args.files)? {
        let text = read_text(&f)?;
        let segments = model
            .segments(&text)
            .with_context(|| format!("segmenting {}", f.display()))?;
        docs.push(Document { id, segments });
        texts.push(text);
    }
    let results = compress(&model, docs, args.batch)?;
    if let Some(dir) = &args.store {
        let store = crate::store::Store::open(dir)?;
        for ((state, r), text) in results.iter().zip(&texts) {
            store.put(
                &r.id,
                args.doc_version,
                &model,
                state,
                text,
                precision(&args),
            )?;
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for (_, r) in &results {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        print_table(&mut out, &args.files, results.iter().map(|(_, r)| r))?;
    }
    Ok(())
}

fn precision(args: &CompressArgs) -> crate::store::codec::Precision {
    args.precision
        .unwrap_or(crate::store::codec::Precision::F32)
}

/// The reports as a table, each document named by its file.
fn print_table<'a>(
    out: &mut impl Write,
    files: &[PathBuf],
    reports: impl Iterator<Item = &'a CompressReport>,
) -> anyhow::Result<()> {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let w = names.iter().map(String::len).max().unwrap_or(0).max(8);
    writeln!(
        out,
        "{:<w$} {:>9} {:>9} {:>9} {:>7} {:>12} {:>12} {:>8}",
        "document", "tokens", "sentences", "gists", "R_c", "KV full", "KV gist", "seconds"
    )?;
    for (name, r) in names.iter().zip(reports) {
        writeln!(
            out,
            "{:<w$} {:>9} {:>9} {:>9} {:>7.2} {:>12} {:>12} {:>8.3}",
            name,
            r.tokens,
            r.sentences,
            r.gist_tokens,
            r.compression_ratio,
            human_bytes(r.kv_bytes_full),
            human_bytes(r.kv_bytes_gist),
            r.seconds
        )?;
    }
    Ok(())
}
