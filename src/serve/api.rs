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
//!   dry run answers its plan at once). Writes are off unless the process was started to
//!   allow them, and then need `Authorization: Bearer <token>`, the token being in
//!   `<store>/api.token` (mode 0600, readable by the store's owner only).
//! - `GET /v1/jobs`: every job's progress; `GET /v1/jobs/{id}`: one job's.
//! - `GET /metrics`: Prometheus text.
//!
//! Bounds: at most `max_running` queries use the model at once and `max_waiting` wait for
//! a turn; more are answered 429 (503 while the process stops). A query stops between two
//! steps once its client is gone or the process is stopping, so a hung-up client or a
//! SIGTERM frees the model within a step.

pub use super::access::{Api, Settings};
use crate::model::GistModel;
use crate::query::{self, Answer, Outcome};
use crate::service::Service;
use crate::store::{DocMeta, StoreError};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Name of the file, in the store directory, that tells clients where the API listens.
pub const ENDPOINT_FILE: &str = "api.json";
/// Name of the file, beside it, holding the bearer token for writes (when allowed).
pub const TOKEN_FILE: &str = "api.token";

/// What `api.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// `host:port` on loopback.
    pub address: String,
    pub pid: u32,
    /// A random id of this run, which `/v1/health` repeats: a client talks only to the
    /// process that wrote the file (not to whatever listens on a stale file's port). The
    /// file is readable by the store's owner only.
    #[serde(default)]
    pub instance: String,
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
    /// This run's id, as `api.json` gives it.
    #[serde(default)]
    pub instance: String,
    /// Whether `POST /v1/reindex` is allowed (with the token).
    #[serde(default)]
    pub writes: bool,
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
    /// Something the asker should know before the answer (e.g. the document is empty).
    Warning(String),
    Text(String),
    Answer(Answer),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// An error response: a status and a message naming what was wrong.
pub struct ApiError(pub(super) StatusCode, pub(super) String);

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
            None if e.is::<crate::query::Cancelled>() => StatusCode::SERVICE_UNAVAILABLE,
            // Damaged records and the like: the request was fine, the data is not.
            None => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, format!("{e:#}"))
    }
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/docs", get(docs))
        .route("/v1/docs/{id}", get(doc))
        .route("/v1/query", post(query))
        .route("/v1/reindex", post(reindex))
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/metrics", get(metrics))
        // Every body is JSON of a question or a job: a megabyte is plenty, and the bound
        // holds before any parsing.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// The largest request body accepted (413 above).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// 200 with status ok, or 503 with status degraded and what is failing (a load balancer or
/// orchestrator reads the code; a person reads `problems`).
async fn health(State(api): State<Arc<Api>>) -> (StatusCode, Json<Health>) {
    let svc = &api.svc;
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
            instance: api.instance.clone(),
            writes: api.token.is_some(),
        }),
    )
}

async fn docs(State(api): State<Arc<Api>>) -> Json<DocList> {
    let (mut documents, mut damaged) = (Vec::new(), Vec::new());
    for entry in api.svc.store.list() {
        match entry {
            Ok(m) => documents.push(m),
            Err(e) => damaged.push(e),
        }
    }
    Json(DocList { documents, damaged })
}

async fn doc(
    State(api): State<Arc<Api>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<DocMeta>, ApiError> {
    Ok(Json(api.svc.store.check(&id)?))
}

async fn metrics(State(api): State<Arc<Api>>) -> impl IntoResponse {
    let svc = &api.svc;
    svc.metrics.gauge(
        "giststream_documents",
        "Documents in the store.",
        svc.store.len() as f64,
    );
    svc.metrics.gauge(
        "giststream_queries_running",
        "Queries using the model now.",
        (api.settings.max_running.max(1) - api.turns.available_permits()) as f64,
    );
    svc.metrics.gauge(
        "giststream_queries_waiting",
        "Queries waiting for a turn with the model.",
        api.waiting.load(Ordering::SeqCst) as f64,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        svc.metrics.render(),
    )
}

async fn query(State(api): State<Arc<Api>>, body: Bytes) -> Result<Response, ApiError> {
    let req: QueryRequest = parse_body(&body)?;
    api.svc
        .metrics
        .add("giststream_queries_total", "Queries received.", 1.0);
    let result = run_query(api.clone(), req).await;
    if result.is_err() {
        api.svc.metrics.add(
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
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Authorized before the body is even parsed.
    api.authorize(&headers)?;
    let req: ReindexRequest = parse_body(&body)?;
    let svc = api.svc.clone();
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
        .map_err(|e| {
            // The reason (which may say whether a path exists, and what is in it) goes to
            // the serving process's log, not to the caller.
            eprintln!(
                "giststream: re-index request: loading model {}: {e:#}",
                dir.display()
            );
            anyhow::anyhow!(
                "the model given could not be loaded (the serving process's log says why)"
            )
        })?;
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
    State(api): State<Arc<Api>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    match api.svc.store.job(&id)? {
        Some(p) => Ok(Json(p)),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no job {id:?}"))),
    }
}

async fn jobs(State(api): State<Arc<Api>>) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    Ok(Json(api.svc.store.jobs()?))
}

/// Set when the request's handler or its response stream is dropped (the client went away).
struct Gone(Arc<AtomicBool>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_query(api: Arc<Api>, req: QueryRequest) -> Result<Response, ApiError> {
    let turn = api.turn().await?;
    let svc = api.svc.clone();
    let q = {
        let svc = svc.clone();
        blocking(move || query::open(&svc.store, &svc.model, req)).await?
    };
    let gone = Arc::new(AtomicBool::new(false));
    let guard = Gone(gone.clone());
    let cancel = {
        let api = api.clone();
        move || {
            if gone.load(Ordering::Relaxed) {
                Some("the client went away")
            } else {
                api.stop_reason()
            }
        }
    };
    let note_cancel = |svc: &Service, e: &anyhow::Error| {
        if e.is::<query::Cancelled>() {
            svc.metrics.add(
                "giststream_queries_cancelled_total",
                "Queries stopped early: the client went away or the server stopped.",
                1.0,
            );
        }
    };
    if q.is_score() {
        let s = svc.clone();
        // `guard` lives in this future: if the client goes away, axum drops it, and the
        // scoring stops at its next sentence.
        let result = blocking(move || {
            let _turn = turn;
            let r = q.run(&s.model, &cancel, |_| {});
            if let Err(e) = &r {
                note_cancel(&s, e);
            }
            r
        })
        .await;
        drop(guard);
        return match result? {
            Outcome::Score(r) => Ok(Json(r).into_response()),
            Outcome::Answer(_) => unreachable!("a score query scores"),
        };
    }
    // The answer streams as JSON lines while the model generates it on a blocking thread.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let warn = q.knows_nothing();
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let send = |e: &QueryEvent| {
            let mut line = serde_json::to_vec(e).expect("events serialize");
            line.push(b'\n');
            // A client that hung up drops the stream (and `guard` with it): the next
            // cancellation check stops the generation.
            let _ = tx.blocking_send(Ok(Bytes::from(line)));
        };
        if warn {
            send(&QueryEvent::Warning(query::NOTHING_ENCODED.into()));
        }
        let started = Instant::now();
        let result = q.run(&svc.model, &cancel, |piece| {
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
            Err(e) => {
                note_cancel(&svc, &e);
                send(&QueryEvent::Error(format!("{e:#}")))
            }
        }
        svc.metrics.add(
            "giststream_query_seconds_total",
            "Time spent answering queries.",
            started.elapsed().as_secs_f64(),
        );
    });
    // The stream owns `guard`: when hyper drops the body (the connection closed), the
    // generation learns of it.
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        move |item| {
            let _ = &guard;
            item
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("static response parts"))
}

/// A JSON body, or 400 in the error schema naming what is wrong with it (axum's own
/// rejection would answer 422, which this API keeps for damaged records).
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("the request body is not a valid request: {e}"),
        )
    })
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

/// How long, once stopping, the API waits for its connections before it lets them drop
/// (a query stops at its next step, well within this).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Serves `svc` on `listen` until `shutdown` resolves, with `<store_dir>/api.json` naming
/// the address while it runs (and `api.token` beside it when writes are allowed).
pub async fn serve(
    svc: Arc<Service>,
    settings: Settings,
    store_dir: &Path,
    listen: &str,
    kafka_bootstrap: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&str),
) -> anyhow::Result<()> {
    use anyhow::Context;
    let api = Api::new(svc, settings)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        eprintln!(
            "giststream: warning: the HTTP API listens on {local}, reachable from other \
             machines: anyone who reaches it can read every document's metadata and ask \
             questions ({}); keep it on 127.0.0.1 unless a proxy guards it",
            if api.token.is_some() {
                "writes need the token"
            } else {
                "writes are off"
            }
        );
    }
    let address = local.to_string();
    let endpoint_file = store_dir.join(ENDPOINT_FILE);
    let token_file = store_dir.join(TOKEN_FILE);
    // A token of an earlier run must not outlive it.
    let _ = std::fs::remove_file(&token_file);
    if let Some(token) = &api.token {
        write_private(&token_file, token.as_bytes())?;
    }
    write_private(
        &endpoint_file,
        &serde_json::to_vec(&Endpoint {
            address: address.clone(),
            pid: std::process::id(),
            instance: api.instance.clone(),
            kafka_bootstrap,
        })?,
    )?;
    on_ready(&address);
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let stopping = {
        let api = api.clone();
        async move {
            shutdown.await;
            api.stopping.store(true, Ordering::Relaxed);
            let _ = stopped_tx.send(true);
        }
    };
    let served = std::future::IntoFuture::into_future(
        axum::serve(listener, router(api)).with_graceful_shutdown(stopping),
    );
    let served = async move {
        let mut stopped = stopped_rx;
        tokio::pin!(served);
        tokio::select! {
            r = &mut served => r,
            _ = async {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(STOP_GRACE).await;
            } => Ok(()),
        }
    }
    .await;
    let _ = std::fs::remove_file(&endpoint_file);
    let _ = std::fs::remove_file(&token_file);
    served.context("serving the HTTP API")
}

/// Written whole or not at all (temporary file, then rename), readable by this user only:
/// a client never reads half, and no other user reads the address's secrets.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
