//! The service a long-running process shares between Kafka ingestion and the HTTP API.

pub mod metrics;

use crate::model::GistModel;
use crate::store::Store;
use metrics::Metrics;
use std::collections::{BTreeMap, HashSet};
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
    /// What is failing now, by component (`/v1/health` reports it).
    problems: Mutex<BTreeMap<String, String>>,
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
            problems: Mutex::default(),
        })
    }

    /// Records that `component` fails (Some) or works again (None).
    pub fn set_problem(&self, component: &str, problem: Option<String>) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        match problem {
            Some(why) => p.insert(component.to_string(), why),
            None => p.remove(component),
        };
    }

    pub fn problems(&self) -> BTreeMap<String, String> {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
