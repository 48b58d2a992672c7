//! The local HTTP API of a process that holds a store open.
//!
//! sled lets one process open a store. The long-running process (`serve`, or `api` on a
//! query node) serves this API on a loopback port and writes its address to
//! `<store>/api.json`; `query`, `docs` and `inspect` read that file and go through the API
//! when it answers, and open the store themselves otherwise. `schemas/api.schema.json`
//! documents every request and response.
//!
//! - `GET /v1/health`: liveness, the model's fingerprint, the process id.
//! - `GET /v1/docs`: every document's metadata (damaged records listed apart).
//! - `GET /v1/docs/{id}`: one document's metadata, its state checked.
//! - `POST /v1/query`: a question (answer streamed as JSON lines) or `score`.
//! - `POST /v1/reindex`: a re-index job in this process: 202 with the job's id and URL (a
//!   dry run answers its plan at once).
//! - `GET /v1/jobs`: every job's progress; `GET /v1/jobs/{id}`: one job's.
//! - `GET /metrics`: Prometheus text.

use crate::model::GistModel;
use crate::query::{self, Answer, Outcome};
use crate::service::Service;
use crate::store::{DocMeta, StoreError};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Name of the file, in the store directory, that tells clients where the API listens.
pub const ENDPOINT_FILE: &str = "api.json";

/// What `api.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// `host:port` on loopback.
    pub address: String,
    pub pid: u32,
    /// Bootstrap address of the embedded Kafka broker, when the process runs one (so
    /// `produce` can find it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_bootstrap: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub service: String,
    pub pid: u32,
    pub model_fingerprint: String,
    pub num_gists: usize,
    pub uptime_seconds: f64,
    /// What is failing, by component; empty when `status` is ok.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub problems: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocList {
    pub documents: Vec<DocMeta>,
    /// "id: reason" for each record that could not be read.
    pub damaged: Vec<String>,
}

pub use crate::query::Request as QueryRequest;

/// One line of a streamed answer: text as it settles, then the whole answer, or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryEvent {
    Text(String),
    Answer(Answer),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An error response: a status and a message naming what was wrong.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        let status = match e.downcast_ref::<StoreError>() {
            Some(StoreError::NotFound(_)) => StatusCode::NOT_FOUND,
            Some(StoreError::OtherModel { .. }) => StatusCode::CONFLICT,
            None if e.is::<crate::query::BadRequest>() => StatusCode::BAD_REQUEST,
            // Damaged records and the like: the request was fine, the data is not.
            None => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, format!("{e:#}"))
    }
}

pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/docs", get(docs))
        .route("/v1/docs/{id}", get(doc))
        .route("/v1/query", post(query))
        .route("/v1/reindex", post(reindex))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/metrics", get(metrics))
        .with_state(svc)
}

/// 200 with status ok, or 503 with status degraded and what is failing (a load balancer or
/// orchestrator reads the code; a person reads `problems`).
async fn health(State(svc): State<Arc<Service>>) -> (StatusCode, Json<Health>) {
    let problems = svc.problems();
    let (code, status) = if problems.is_empty() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    (
        code,
        Json(Health {
            status: status.into(),
            problems,
            service: "giststream".into(),
            pid: std::process::id(),
            model_fingerprint: format!("{:016x}", svc.model.fingerprint),
            num_gists: svc.model.gist.num_gist_tokens,
            uptime_seconds: svc.started.elapsed().as_secs_f64(),
        }),
    )
}

async fn docs(State(svc): State<Arc<Service>>) -> Json<DocList> {
    let (mut documents, mut damaged) = (Vec::new(), Vec::new());
    for entry in svc.store.list() {
        match entry {
            Ok(m) => documents.push(m),
            Err(e) => damaged.push(e),
        }
    }
    Json(DocList { documents, damaged })
}

async fn doc(
    State(svc): State<Arc<Service>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<DocMeta>, ApiError> {
    Ok(Json(svc.store.check(&id)?))
}

async fn metrics(State(svc): State<Arc<Service>>) -> impl IntoResponse {
    svc.metrics.gauge(
        "giststream_documents",
        "Documents in the store.",
        svc.store.len() as f64,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        svc.metrics.render(),
    )
}

async fn query(
    State(svc): State<Arc<Service>>,
    Json(req): Json<QueryRequest>,
) -> Result<Response, ApiError> {
    svc.metrics
        .add("giststream_queries_total", "Queries received.", 1.0);
    let result = run_query(svc.clone(), req).await;
    if result.is_err() {
        svc.metrics.add(
            "giststream_query_errors_total",
            "Queries refused or failed.",
            1.0,
        );
    }
    result
}

/// A re-index job to run in the serving process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReindexRequest {
    /// Model directory of the new states (on the serving machine); None: the embedded model.
    #[serde(default)]
    pub model: Option<String>,
    /// A GGUF model's matrices (default: dequantized).
    #[serde(default)]
    pub weights: crate::model::gguf::Weights,
    #[serde(flatten)]
    pub spec: crate::jobs::reindex::JobSpec,
}

async fn reindex(
    State(svc): State<Arc<Service>>,
    Json(req): Json<ReindexRequest>,
) -> Result<Response, ApiError> {
    let serving = svc.clone();
    let model = blocking(move || {
        let svc_device = serving.model.llama.device();
        let svc_dtype = serving.model.llama.dtype();
        let dir = match &req.model {
            Some(d) => std::path::PathBuf::from(d),
            None => crate::model::embedded::dir()?,
        };
        // On the serving model's device and precision.
        let m = GistModel::load(
            &dir,
            svc_device,
            svc_dtype,
            &crate::model::LoadOptions {
                weights: req.weights,
                ..crate::model::LoadOptions::default()
            },
        )
        .map_err(|e| e.context(format!("loading model {}", dir.display())))?;
        Ok((m, req.spec))
    })
    .await
    .map_err(|ApiError(_, m)| ApiError(StatusCode::BAD_REQUEST, m))?;
    let (model, spec) = model;
    if spec.dry_run {
        let s = svc.clone();
        let plan =
            blocking(move || crate::jobs::reindex::run(&s.store, &model, &spec, |_| {})).await?;
        return Ok(Json(plan).into_response());
    }
    // Accepted as a job: its record exists before the answer, so `GET /v1/jobs/{id}`
    // finds it at once; it runs on a blocking thread and records its progress there.
    let queued = crate::jobs::reindex::queued(&model, &spec);
    let id = queued.job.clone();
    if !svc
        .running_jobs
        .lock()
        .expect("jobs lock")
        .insert(id.clone())
    {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("job {id} is already running"),
        ));
    }
    svc.store.put_job(
        &id,
        &serde_json::to_value(&queued).map_err(anyhow::Error::from)?,
    )?;
    let s = svc.clone();
    let job = id.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = crate::jobs::reindex::run(&s.store, &model, &spec, |_| {}) {
            eprintln!("giststream: re-index job {job} failed: {e:#}");
        }
        s.running_jobs.lock().expect("jobs lock").remove(&job);
    });
    let url = format!("/v1/jobs/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, url.clone())],
        Json(JobAccepted { job: id, url }),
    )
        .into_response())
}

/// The answer to an accepted job: its id, and where its progress is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobAccepted {
    pub job: String,
    pub url: String,
}

async fn job(
    State(svc): State<Arc<Service>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match svc.store.job(&id)? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id:?}"))),
    }
}

async fn jobs(State(svc): State<Arc<Service>>) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    Ok(Json(svc.store.jobs()?))
}

async fn run_query(svc: Arc<Service>, req: QueryRequest) -> Result<Response, ApiError> {
    let loader = svc.clone();
    let q = blocking(move || query::open(&loader.store, &loader.model, req)).await?;
    if q.is_score() {
        let s = svc.clone();
        return match blocking(move || q.run(&s.model, |_| {})).await? {
            Outcome::Score(r) => Ok(Json(r).into_response()),
            Outcome::Answer(_) => unreachable!("a score query scores"),
        };
    }
    // The answer streams as JSON lines while the model generates it on a blocking thread.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    tokio::task::spawn_blocking(move || {
        let send = |e: &QueryEvent| {
            let mut line = serde_json::to_vec(e).expect("events serialize");
            line.push(b'\n');
            // A client that hung up stops nothing but its own stream.
            let _ = tx.blocking_send(Ok(Bytes::from(line)));
        };
        let started = Instant::now();
        let result = q.run(&svc.model, |piece| {
            send(&QueryEvent::Text(piece.to_string()))
        });
        match result {
            Ok(Outcome::Answer(a)) => {
                svc.metrics.add(
                    "giststream_answer_tokens_total",
                    "Tokens generated in answers.",
                    a.tokens as f64,
                );
                send(&QueryEvent::Answer(a));
            }
            Ok(Outcome::Score(_)) => unreachable!("an answer query answers"),
            Err(e) => send(&QueryEvent::Error(format!("{e:#}"))),
        }
        svc.metrics.add(
            "giststream_query_seconds_total",
            "Time spent answering queries.",
            started.elapsed().as_secs_f64(),
        );
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("static response parts"))
}

/// Runs CPU-bound work (decoding a state, the model) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

/// Serves `svc` on `listen` until `shutdown` resolves, with `<store_dir>/api.json` naming
/// the address while it runs.
pub async fn serve(
    svc: Arc<Service>,
    store_dir: &Path,
    listen: &str,
    kafka_bootstrap: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&str),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        eprintln!(
            "giststream: warning: the HTTP API listens on {local}, reachable from other \
             machines; it has no authentication (keep it on 127.0.0.1 unless a proxy guards it)"
        );
    }
    let address = local.to_string();
    let endpoint_file = store_dir.join(ENDPOINT_FILE);
    write_endpoint(
        &endpoint_file,
        &Endpoint {
            address: address.clone(),
            pid: std::process::id(),
            kafka_bootstrap,
        },
    )?;
    on_ready(&address);
    let served = axum::serve(listener, router(svc))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&endpoint_file);
    served.context("serving the HTTP API")
}

/// Written whole or not at all (temporary file, then rename): a client never reads half.
fn write_endpoint(path: &Path, e: &Endpoint) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(e)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
