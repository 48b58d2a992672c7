//! `giststream store verify DIR` and `giststream store salvage DIR NEW`: what to do with a
//! damaged store.

use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    pub command: StoreCommand,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Check every record of every document (metadata, each state chunk, each text part,
    /// the checksums the metadata lists). Prints a JSON report; exits non-zero naming each
    /// damaged document, or when sled cannot open the store at all.
    Verify {
        /// The sled store (not in use by another process).
        #[arg(value_name = "DIR")]
        store: PathBuf,
    },
    /// Copy every intact document of a damaged store into a new store. The damaged store
    /// is only read. When sled cannot open it, its files are scanned for intact records.
    /// Prints a JSON report (recovered ids, lost ids with the reason); exits non-zero if
    /// any document was lost.
    Salvage {
        /// The damaged store.
        #[arg(value_name = "DIR")]
        store: PathBuf,
        /// Where to write the new store (must not exist, or be empty).
        #[arg(value_name = "NEW")]
        out: PathBuf,
    },
}

pub fn run(args: StoreArgs) -> anyhow::Result<()> {
    match args.command {
        StoreCommand::Verify { store } => {
            let report = crate::store::salvage::verify(&store)?;
            println!("{}", serde_json::to_string(&report)?);
            for d in &report.damaged {
                eprintln!(
                    "giststream: damaged: {}: {}",
                    d.id.escape_debug(),
                    d.problem
                );
            }
            anyhow::ensure!(
                report.damaged.is_empty(),
                "{} of {} documents in {} are damaged (listed above); `giststream store \
                 salvage {} NEW` copies the others into a new store",
                report.damaged.len(),
                report.documents,
                store.display(),
                store.display()
            );
            Ok(())
        }
        StoreCommand::Salvage { store, out } => {
            let report = crate::store::salvage::salvage(&store, &out)?;
            println!("{}", serde_json::to_string(&report)?);
            if let Some(e) = &report.sled_error {
                eprintln!(
                    "giststream: sled cannot open {} ({e}): scanned its files",
                    store.display()
                );
            }
            for d in &report.lost {
                eprintln!("giststream: lost: {}: {}", d.id.escape_debug(), d.problem);
            }
            eprintln!(
                "giststream: {} document(s) copied into {}",
                report.recovered.len(),
                out.display()
            );
            anyhow::ensure!(
                report.lost.is_empty(),
                "{} document(s) could not be salvaged (listed above); `giststream restore` \
                 can rebuild them from a state topic",
                report.lost.len()
            );
            Ok(())
        }
    }
}
