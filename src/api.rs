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
//! - `POST /v1/reindex`: start a re-index job in this process (a dry run answers at once).
//! - `GET /v1/jobs`: every job's progress.
//! - `GET /metrics`: Prometheus text.

use crate::metrics::Metrics;
use crate::model::GistModel;
use crate::query::{answer, score, Answer, Sampling, Score};
use crate::store::{DocMeta, Store, StoreError};
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

/// Everything the handlers share.
pub struct Service {
    pub store: Store,
    pub model: GistModel,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
}

impl Service {
    /// A service over `store` and `model`, with fresh metrics, started now.
    pub fn new(store: Store, model: GistModel) -> Arc<Self> {
        Arc::new(Self {
            store,
            model,
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub service: String,
    pub pid: u32,
    pub model_fingerprint: String,
    pub num_gists: usize,
    pub uptime_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocList {
    pub documents: Vec<DocMeta>,
    /// "id: reason" for each record that could not be read.
    pub damaged: Vec<String>,
}

/// A question about a stored document, or a continuation to score.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryRequest {
    pub doc: String,
    #[serde(default)]
    pub question: Option<String>,
    /// Score this continuation instead of generating.
    #[serde(default)]
    pub score: Option<String>,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Wrap the question in the model's chat template, when it has one.
    #[serde(default = "default_chat_template")]
    pub chat_template: bool,
}

fn default_chat_template() -> bool {
    true
}

fn default_max_tokens() -> usize {
    64
}

fn default_seed() -> u64 {
    299_792_458
}

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
        .route("/metrics", get(metrics))
        .with_state(svc)
}

async fn health(State(svc): State<Arc<Service>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        service: "giststream".into(),
        pid: std::process::id(),
        model_fingerprint: format!("{:016x}", svc.model.fingerprint),
        num_gists: svc.model.gist.num_gist_tokens,
        uptime_seconds: svc.started.elapsed().as_secs_f64(),
    })
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
    #[serde(flatten)]
    pub spec: crate::reindex::JobSpec,
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
            &crate::model::LoadOptions::default(),
        )
        .map_err(|e| e.context(format!("loading model {}", dir.display())))?;
        Ok((m, req.spec))
    })
    .await
    .map_err(|ApiError(_, m)| ApiError(StatusCode::BAD_REQUEST, m))?;
    let (model, spec) = model;
    if spec.dry_run {
        let s = svc.clone();
        let plan = blocking(move || crate::reindex::run(&s.store, &model, &spec, |_| {})).await?;
        return Ok(Json(plan).into_response());
    }
    // The job runs on a blocking thread; its progress is in the store (GET /v1/jobs).
    let s = svc.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = crate::reindex::run(&s.store, &model, &spec, |_| {}) {
            eprintln!("giststream: re-index job failed: {e:#}");
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"started": true})),
    )
        .into_response())
}

async fn jobs(State(svc): State<Arc<Service>>) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    Ok(Json(svc.store.jobs()?))
}

async fn run_query(svc: Arc<Service>, req: QueryRequest) -> Result<Response, ApiError> {
    if req.score.is_none() && req.question.as_deref().is_none_or(|q| q.trim().is_empty()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the question is empty: give a question, or score".into(),
        ));
    }
    let loader = svc.clone();
    let doc = req.doc.clone();
    let (_, state) = blocking(move || loader.store.load(&doc, &loader.model)).await?;
    if let Some(text) = req.score.clone() {
        let s = svc.clone();
        let r: Score = blocking(move || {
            score(
                &s.model,
                state,
                req.question.as_deref(),
                req.chat_template,
                &text,
            )
        })
        .await?;
        return Ok(Json(r).into_response());
    }
    // The answer streams as JSON lines while the model generates it on a blocking thread.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(64);
    let sampling = Sampling {
        max_tokens: req.max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        chat_template: req.chat_template,
    };
    let question = req.question.unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        let send = |e: &QueryEvent| {
            let mut line = serde_json::to_vec(e).expect("events serialize");
            line.push(b'\n');
            // A client that hung up stops nothing but its own stream.
            let _ = tx.blocking_send(Ok(Bytes::from(line)));
        };
        let started = Instant::now();
        let result = answer(&svc.model, state, &question, &sampling, |piece| {
            send(&QueryEvent::Text(piece.to_string()))
        });
        match result {
            Ok(a) => {
                svc.metrics.add(
                    "giststream_answer_tokens_total",
                    "Tokens generated in answers.",
                    a.tokens as f64,
                );
                send(&QueryEvent::Answer(a));
            }
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
    let address = listener.local_addr()?.to_string();
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

/// A client of a running process's API.
pub struct Client {
    address: String,
    rt: tokio::runtime::Runtime,
}

/// A response: status and body bytes.
type Reply = (StatusCode, Vec<u8>);

impl Client {
    /// The API of the process holding `store_dir`, if one is running and answers.
    pub fn discover(store_dir: &Path) -> Option<Client> {
        let endpoint = read_endpoint(store_dir)?;
        let client = Client {
            address: endpoint.address,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?,
        };
        // A stale file (the process died) or another program on the port: not ours.
        let health: Health = client.get_json("/v1/health").ok()?;
        (health.service == "giststream").then_some(client)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn health(&self) -> anyhow::Result<Health> {
        self.get_json("/v1/health")
    }

    pub fn docs(&self) -> anyhow::Result<DocList> {
        self.get_json("/v1/docs")
    }

    pub fn doc(&self, id: &str) -> anyhow::Result<DocMeta> {
        self.get_json(&format!("/v1/docs/{}", percent_encode(id)))
    }

    /// Starts a re-index job in the serving process (a dry run returns its plan).
    pub fn reindex(&self, req: &ReindexRequest) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.request(
            "POST",
            "/v1/reindex",
            Some(serde_json::to_vec(req)?),
            |_| Ok(()),
        )?;
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    pub fn jobs(&self) -> anyhow::Result<Vec<crate::reindex::Progress>> {
        self.get_json("/v1/jobs")
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.request("GET", "/metrics", None, |_| Ok(()))?;
        check(status, &body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn score(&self, req: &QueryRequest) -> anyhow::Result<Score> {
        let (status, body) =
            self.request("POST", "/v1/query", Some(serde_json::to_vec(req)?), |_| {
                Ok(())
            })?;
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Asks a question; `on_text` gets the answer's text as it streams in.
    pub fn ask(&self, req: &QueryRequest, mut on_text: impl FnMut(&str)) -> anyhow::Result<Answer> {
        let mut pending = Vec::new();
        let mut done = None;
        let mut failure = None;
        let (status, body) = self.request(
            "POST",
            "/v1/query",
            Some(serde_json::to_vec(req)?),
            |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(n) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=n).collect();
                    match serde_json::from_slice::<QueryEvent>(&line)? {
                        QueryEvent::Text(t) => on_text(&t),
                        QueryEvent::Answer(a) => done = Some(a),
                        QueryEvent::Error(e) => failure = Some(e),
                    }
                }
                Ok(())
            },
        )?;
        check(status, &body)?;
        if let Some(e) = failure {
            anyhow::bail!("{e}");
        }
        done.ok_or_else(|| anyhow::anyhow!("the answer stream ended early"))
    }

    /// A raw request: status and whole body (for tests and debugging).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let (status, body) = self.request(method, path, body, |_| Ok(()))?;
        Ok((status.as_u16(), body))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.request("GET", path, None, |_| Ok(()))?;
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// One HTTP/1.1 request. A successful body goes to `on_chunk` as it arrives; an error
    /// body is returned whole.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        mut on_chunk: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<Reply> {
        use http_body_util::BodyExt;
        use hyper_util::rt::TokioIo;
        let address = self.address.clone();
        self.rt.block_on(async move {
            let stream = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::TcpStream::connect(&address),
            )
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {address}: timed out"))??;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &address)
                .header(header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(Bytes::from(
                    body.unwrap_or_default(),
                )))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut whole = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if status.is_success() {
                        on_chunk(&data)?;
                    }
                    whole.extend_from_slice(&data);
                }
            }
            Ok((status, whole))
        })
    }
}

/// An error status becomes an error carrying the server's message.
fn check(status: StatusCode, body: &[u8]) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    anyhow::bail!("{msg} (HTTP {status})")
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters pass).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The endpoint a running process announced in `store_dir`, if any (not checked).
pub fn read_endpoint(store_dir: &Path) -> Option<Endpoint> {
    let bytes = std::fs::read(store_dir.join(ENDPOINT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(percent_encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(percent_encode("doc-1.txt_~"), "doc-1.txt_~");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
