//! `giststream docs` and `giststream inspect`: what a store holds.

use crate::engine::compress::human_bytes;
use anyhow::bail;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct DocsArgs {
    /// The sled store.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// One JSON object per document.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The sled store.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Document id.
    pub id: String,
}

pub fn run_docs(args: DocsArgs) -> anyhow::Result<()> {
    let entries: Vec<Result<crate::store::DocMeta, String>> =
        match crate::serve::client::Client::discover(&args.store) {
            Some(client) => {
                let list = client.docs()?;
                let ok = list.documents.into_iter().map(Ok);
                ok.chain(list.damaged.into_iter().map(Err)).collect()
            }
            None => crate::store::Store::open_existing(&args.store)?.list(),
        };
    let mut out = std::io::stdout().lock();
    let mut damaged = 0;
    for entry in entries {
        match entry {
            Ok(m) if args.json => writeln!(out, "{}", serde_json::to_string(&m)?)?,
            Ok(m) => writeln!(
                out,
                "{:<24} v{:<4} {:>8} tokens {:>6} sentences  {:?}  {}",
                // Ids are anyone's bytes: control characters are shown escaped.
                m.id.escape_debug().to_string(),
                m.version,
                m.tokens,
                m.sentences,
                m.precision,
                human_bytes(m.state_bytes)
            )?,
            Err(e) => {
                damaged += 1;
                eprintln!("giststream: {e}");
            }
        }
    }
    if damaged > 0 {
        bail!("{damaged} document record(s) are damaged (listed above)");
    }
    Ok(())
}

pub fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let meta = match crate::serve::client::Client::discover(&args.store) {
        Some(client) => client.doc(&args.id)?,
        None => crate::store::Store::open_existing(&args.store)?.check(&args.id)?,
    };
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(())
}
