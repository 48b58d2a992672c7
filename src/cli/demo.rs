//! `giststream demo`: the whole path on the embedded defaults.

use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the store here instead of a temporary folder.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Model directory (default: the embedded model).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    crate::bench::demo::run(args.store, args.model)
}
