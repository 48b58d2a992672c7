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
    /// Anything but loopback makes the store's metadata and questions reachable from
    /// other machines (a warning says so).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Allow writes (`POST /v1/reindex`), each with the bearer token this process writes
    /// to DIR/api.token (mode 0600). Off by default: the API only reads.
    #[arg(long)]
    pub allow_writes: bool,
    /// Queries that use the model at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_running_queries: u16,
    /// Queries that may wait for a turn; more are answered 429.
    #[arg(long, default_value_t = 16)]
    pub max_waiting_queries: u16,
}

pub fn run(args: ApiArgs) -> anyhow::Result<()> {
    let model = args.model.load()?;
    let store = crate::store::Store::open(&args.store)?;
    let svc = crate::service::Service::new(store, model);
    let settings = crate::serve::api::Settings {
        allow_writes: args.allow_writes,
        max_running: args.max_running_queries.into(),
        max_waiting: args.max_waiting_queries.into(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let served = rt.block_on(crate::serve::api::serve(
        svc,
        settings,
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
    ));
    // A query still on a blocking thread stops at its next step; the process does not
    // wait longer than that for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}
