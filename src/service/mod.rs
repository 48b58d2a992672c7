//! The service a long-running process shares between Kafka ingestion and the HTTP API.

pub mod metrics;

use crate::model::GistModel;
use crate::store::Store;
use metrics::Metrics;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything ingestion and the API handlers share.
pub struct Service {
    pub store: Store,
    pub model: GistModel,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// Jobs running in this process (one run per job id at a time).
    pub running_jobs: Mutex<HashSet<String>>,
}

impl Service {
    /// A service over `store` and `model`, with fresh metrics, started now.
    pub fn new(store: Store, model: GistModel) -> Arc<Self> {
        Arc::new(Self {
            store,
            model,
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
            running_jobs: Mutex::default(),
        })
    }
}
