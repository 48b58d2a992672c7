//! `serve` (ingest from Kafka plus the local HTTP API, in one process sharing one store
//! and one model) and `restore` (a store rebuilt from the state topic).

use crate::ingest::changelog::RestoreReport;
use crate::ingest::pipeline::Pipeline;
use crate::ingest::{client_config, Broker};
use crate::model::device::{parse_device, parse_dtype};
use crate::model::{GistModel, LoadOptions};
use crate::service::Service;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The pipeline's model: its directory, or the embedded one.
pub fn load_model(p: &Pipeline) -> anyhow::Result<GistModel> {
    let dir = if p.model.dir.is_empty() {
        crate::model::embedded::dir()?
    } else {
        p.model.dir.clone().into()
    };
    let mut model = GistModel::load(
        &dir,
        &parse_device(&p.model.device)?,
        parse_dtype(&p.model.dtype)?,
        &LoadOptions {
            weights: p.model.weights,
            ..LoadOptions::default()
        },
    )
    .with_context(|| format!("loading model {}", dir.display()))?;
    if let Some(e) = p.model.incremental {
        model.incremental = e;
    }
    Ok(model)
}

/// `serve`: the pipeline's consumer and the HTTP API until SIGINT or SIGTERM.
pub fn serve(pipeline: &Path) -> anyhow::Result<()> {
    let p = Pipeline::from_file(pipeline)?;
    let broker = Broker::start(&p)?;
    if broker.embedded {
        eprintln!(
            "giststream: embedded Kafka broker at {} (topic {}): `giststream produce --brokers {} FILE...`",
            broker.bootstrap, p.kafka.topic, broker.bootstrap
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    // Fail fast, before the model loads: brokers that do not answer, missing topics, a
    // state topic that is not compacted.
    if !broker.embedded && p.kafka.check_topics {
        let prepared = rt.block_on(crate::ingest::topics::prepare(&p, &broker.bootstrap))?;
        for t in prepared.created {
            eprintln!("giststream: created Kafka topic {t}");
        }
    }
    let model = load_model(&p)?;
    let store = crate::store::Store::open(&p.store.path)?;
    let svc = Service::new(store, model);
    let result = rt.block_on(async {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let api = {
            let svc = svc.clone();
            let store = p.store.path.clone();
            let listen = p.api.listen.clone();
            let settings = crate::serve::api::Settings {
                allow_writes: p.api.allow_writes,
                max_running: p.api.max_running_queries.max(1),
                max_waiting: p.api.max_waiting_queries,
            };
            let bootstrap = broker.embedded.then(|| broker.bootstrap.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                crate::serve::api::serve(
                    svc,
                    settings,
                    &store,
                    &listen,
                    bootstrap,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                    |addr| eprintln!("giststream: HTTP API on http://{addr}"),
                )
                .await
            })
        };
        eprintln!(
            "giststream: consuming {} as group {} into {}",
            p.kafka.topic,
            p.kafka.group,
            p.store.path.display()
        );
        let ingest = crate::ingest::run(&p, &broker.bootstrap, svc, stop_rx);
        tokio::pin!(ingest);
        let mut api = api;
        let result = tokio::select! {
            r = &mut ingest => r,
            // The API ends first only on an error (a listen address it cannot bind):
            // stop at once rather than run without it.
            served = &mut api => {
                let _ = stop_tx.send(true);
                let served = served.context("the API task panicked")?;
                let ingested = ingest.await;
                return served.context("the HTTP API").and(ingested);
            }
            _ = shutdown_signal() => {
                let grace = Duration::from_millis(p.batch.stop_grace_ms);
                eprintln!(
                    "giststream: stopping: finishing the batch in hand (at most {:.0} s; a \
                     second signal stops at once)",
                    grace.as_secs_f64()
                );
                let _ = stop_tx.send(true);
                let why = tokio::select! {
                    r = &mut ingest => return finish(r, api).await,
                    _ = shutdown_signal() => "a second signal came".to_string(),
                    _ = tokio::time::sleep(grace) => format!(
                        "it did not finish within {:.0} s (batch.stop_grace_ms)",
                        grace.as_secs_f64()
                    ),
                };
                // Its offsets are not committed, so Kafka hands the batch out again; what
                // is stored stays as durable as a crash would leave it (the store is
                // crash-safe). Waiting on would only hold up a restart.
                eprintln!(
                    "giststream: stopped without acknowledging the batch in hand ({why}): \
                     it is read again after the restart"
                );
                std::process::exit(1);
            }
        };
        let _ = stop_tx.send(true);
        finish(result, api).await
    });
    // A query still on a blocking thread stops at its next step; the process does not
    // wait longer than that for it.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// `restore`: the store (default: the pipeline's) rebuilt from the pipeline's state topic.
pub fn restore(
    pipeline: &Path,
    store: Option<PathBuf>,
    brokers: Option<String>,
) -> anyhow::Result<RestoreReport> {
    let p = Pipeline::from_file(pipeline)?;
    anyhow::ensure!(
        !p.kafka.state_topic.is_empty(),
        "the pipeline {} has no kafka.state_topic to restore from",
        pipeline.display()
    );
    let brokers = brokers.unwrap_or(p.kafka.brokers.clone());
    anyhow::ensure!(
        !brokers.is_empty(),
        "no brokers: give --brokers (the embedded broker forgets everything when its process ends)"
    );
    let store_dir = store.unwrap_or(p.store.path.clone());
    let store = crate::store::Store::open(&store_dir)?;
    crate::ingest::changelog::restore(client_config(&p, &brokers), &p.kafka.state_topic, &store)
}

/// Waits for the API (told to stop) to end: ingest's result, then the API's.
async fn finish(
    ingested: anyhow::Result<()>,
    api: tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let served = api.await.context("the API task panicked")?;
    ingested.and(served)
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
