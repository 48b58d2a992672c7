//! `giststream api`: a query node serving a store over the local HTTP API.

use super::flags::ModelArgs;
use crate::serve::run::shutdown_signal;
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sled store to serve.
    #[arg(long, value_name = "DIR")]
    pub store: PathBuf,
    /// Address to listen on (port 0: any free port; the address goes to DIR/api.json).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
}

pub fn run(args: ApiArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let store = crate::store::Store::open(&args.store)?;
    let svc = crate::service::Service::new(store, model);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::serve::api::serve(
        svc,
        &args.store,
        &args.listen,
        None,
        shutdown_signal(),
        |addr| {
            eprintln!(
                "giststream: serving {} on http://{addr}",
                args.store.display()
            )
        },
    ))
}
