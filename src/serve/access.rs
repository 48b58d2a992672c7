//! Who may do what through the API, and how much at once: writes only with the bearer
//! token (when allowed at all), a bounded number of queries using the model, a bounded
//! line waiting for a turn, and the stop that cancels them.

use super::api::{ApiError, ENDPOINT_FILE, TOKEN_FILE};
use crate::service::Service;
use axum::http::{header, HeaderMap, StatusCode};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// How the API behaves: writes, and the bounds on concurrent queries.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Allow `POST /v1/reindex` (with the bearer token).
    pub allow_writes: bool,
    /// Queries using the model at once.
    pub max_running: usize,
    /// Queries waiting for a turn; more are refused with 429.
    pub max_waiting: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            allow_writes: false,
            max_running: 2,
            max_waiting: 16,
        }
    }
}

/// The handlers' shared state: the service, the settings, this run's secrets, and the
/// admission of queries.
pub struct Api {
    pub(super) svc: Arc<Service>,
    pub(super) settings: Settings,
    /// The bearer token writes need (None: writes are off).
    pub(super) token: Option<String>,
    pub(super) instance: String,
    pub(super) turns: Arc<tokio::sync::Semaphore>,
    pub(super) waiting: AtomicUsize,
    /// Set when the process starts stopping: queries end at their next step.
    pub(super) stopping: AtomicBool,
}

impl Api {
    /// The API over `svc`; with writes allowed, a fresh random token.
    pub fn new(svc: Arc<Service>, settings: Settings) -> anyhow::Result<Arc<Self>> {
        let token = settings.allow_writes.then(random_hex).transpose()?;
        Ok(Arc::new(Self {
            svc,
            turns: Arc::new(tokio::sync::Semaphore::new(settings.max_running.max(1))),
            settings,
            token,
            instance: random_hex()?,
            waiting: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        }))
    }

    /// Why a running query should stop now, if it should.
    pub(super) fn stop_reason(&self) -> Option<&'static str> {
        self.stopping
            .load(Ordering::Relaxed)
            .then_some("the server is stopping")
    }

    /// A turn with the model: at once, after waiting in line, or refused (429 when the line
    /// is full, 503 while stopping).
    pub(super) async fn turn(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let busy = |why: String| ApiError(StatusCode::TOO_MANY_REQUESTS, why);
        if let Some(why) = self.stop_reason() {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why.into()));
        }
        if let Ok(p) = self.turns.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.settings.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.svc.metrics.add(
                "giststream_queries_refused_total",
                "Queries refused because every turn was taken and the line was full.",
                1.0,
            );
            return Err(busy(format!(
                "busy: {} queries running and {} waiting; try again later",
                self.settings.max_running, self.settings.max_waiting
            )));
        }
        // Dropped with the request if the client goes away while waiting.
        struct Leave<'a>(&'a AtomicUsize);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _leave = Leave(&self.waiting);
        self.turns.clone().acquire_owned().await.map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping".into(),
            )
        })
    }

    /// Refuses a write without the token (401), or when writes are off (403).
    pub(super) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "writes are off: this process was started without --allow-writes (pipeline: \
                 api.allow_writes = true)"
                    .into(),
            ));
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in constant time: the answer's timing says nothing about the token.
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                format!(
                    "a write needs Authorization: Bearer <the token in {TOKEN_FILE} beside \
                     the store's {ENDPOINT_FILE}>"
                ),
            ))
        }
    }
}

/// 32 random bytes as hex, from the operating system's generator.
fn random_hex() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("the system's random generator: {e}"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
