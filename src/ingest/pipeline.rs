//! Pipeline definitions: what `serve` consumes, with which model, into which store.
//!
//! A pipeline is a TOML file users edit (`pipelines/local.toml` is the default). Every
//! field has a default, so an empty file is a valid pipeline: the embedded broker, the
//! project's model, a store in `./giststream-store`. Relative paths are taken from the
//! current directory. Unknown keys are errors, so a typo never silently falls back to a
//! default.

use crate::store::codec::Precision;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pipeline {
    pub kafka: KafkaConfig,
    pub model: ModelConfig,
    pub store: StoreConfig,
    pub batch: BatchConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers ("host:port,..."). Empty: start librdkafka's in-process mock
    /// cluster (the embedded default; it prints its address for `produce`).
    pub brokers: String,
    /// Topic of document messages (schemas/document.schema.json).
    pub topic: String,
    /// Where invalid messages go, with the reason in headers.
    pub dead_letter_topic: String,
    /// Optional compacted topic receiving every state update (empty: off); `restore`
    /// rebuilds a store from it.
    pub state_topic: String,
    /// Consumer group: several `serve` processes in one group split the partitions.
    pub group: String,
    /// Partitions of the topics giststream creates (on the embedded broker, or where
    /// `create_topics` finds one missing).
    pub partitions: i32,
    /// Replication factor of the topics giststream creates (-1: the broker's default).
    pub replication: i32,
    /// At start, check that the brokers answer and the topics exist (the state topic
    /// compacted). Off: for brokers or ACLs that allow no admin requests.
    pub check_topics: bool,
    /// With `check_topics`, create missing topics (the state topic compacted). Off: a
    /// missing topic stops `serve` with its name.
    pub create_topics: bool,
    /// What a keyed message with no value (a Kafka tombstone) does: `delete` the document
    /// (from the store, and from the state topic by tombstones of its records), or
    /// `refuse` it to the dead-letter topic.
    pub tombstones: Tombstones,
    /// Static group membership: the consumer's `group.instance.id`, so a restarted node
    /// takes its partitions back at once instead of after the old member's session
    /// timeout. Empty: derived from the host name and the store path (stable across
    /// restarts, different for two stores on one host); "off": dynamic membership. A
    /// `group.instance.id` in `properties` wins.
    pub instance_id: String,
    /// Largest value forwarded whole to the dead-letter topic (bytes); a larger one goes
    /// there cut to this size, with its original size in the `giststream.value.bytes`
    /// header. Keep it under the dead-letter topic's `max.message.bytes`.
    pub dead_letter_max_bytes: usize,
    /// Any librdkafka property, for consumer and producers alike (security.protocol,
    /// sasl.mechanism, sasl.username, ssl.ca.location, session.timeout.ms, ...).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topic: "documents".into(),
            dead_letter_topic: "documents.dlq".into(),
            state_topic: String::new(),
            group: "giststream".into(),
            partitions: 4,
            replication: -1,
            check_topics: true,
            create_topics: true,
            tombstones: Tombstones::Delete,
            instance_id: String::new(),
            dead_letter_max_bytes: 512 * 1024,
            properties: BTreeMap::new(),
        }
    }
}

/// What a tombstone (a keyed message with no value) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tombstones {
    Delete,
    Refuse,
}

impl KafkaConfig {
    /// The consumer's `group.instance.id`, if static membership is on.
    pub fn group_instance_id(&self, store: &Path) -> Option<String> {
        if let Some(id) = self.properties.get("group.instance.id") {
            return Some(id.clone());
        }
        match self.instance_id.as_str() {
            "off" => None,
            "" => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
                    .or_else(|| std::env::var("HOSTNAME").ok())
                    .unwrap_or_else(|| "localhost".into());
                let store = std::path::absolute(store).unwrap_or_else(|_| store.to_path_buf());
                let hash = crc32fast::hash(store.to_string_lossy().as_bytes());
                Some(format!("giststream-{host}-{hash:08x}"))
            }
            id => Some(id.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// HF model directory or GGUF file; empty: the project's own model, embedded in the
    /// binary.
    pub dir: String,
    pub device: String,
    pub dtype: String,
    /// A GGUF model's matrices: `dequantized` (default) or `quantized`.
    #[serde(default)]
    pub weights: crate::model::gguf::Weights,
    /// Incremental engine: `per-document` or `slots` (see `giststream bench --help`);
    /// absent: per-document on the CPU, slots on a GPU.
    pub incremental: Option<crate::model::config::Incremental>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: String::new(),
            device: "cpu".into(),
            dtype: "f32".into(),
            weights: Default::default(),
            incremental: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub precision: Precision,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "giststream-store".into(),
            precision: Precision::F32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Messages (document parts) per batch: their sentences share forwards, and one
    /// offset commit covers them.
    pub max_documents: usize,
    /// How long a batch waits for more messages after its first.
    pub max_wait_ms: u64,
    /// Messages received but not yet processed; beyond it the partitions pause.
    pub max_in_flight: usize,
    /// Largest message value accepted (bytes); larger ones go to the dead-letter topic.
    pub max_message_bytes: usize,
    /// After SIGTERM or SIGINT, how long serve may take to finish the batch in hand. A
    /// batch that cannot finish (its state-topic records wait on brokers that do not
    /// answer, for up to librdkafka's message.timeout.ms) is left unacknowledged instead:
    /// it is read again after the restart, so nothing is lost.
    pub stop_grace_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_documents: 8,
            max_wait_ms: 50,
            max_in_flight: 64,
            max_message_bytes: 4 << 20,
            stop_grace_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address of the local HTTP API (port 0: any free port; written to
    /// `<store>/api.json`).
    pub listen: String,
    /// Allow writes (`POST /v1/reindex`), each with the bearer token written to
    /// `<store>/api.token` (mode 0600). Off: the API only reads.
    pub allow_writes: bool,
    /// Queries that use the model at once.
    pub max_running_queries: usize,
    /// Queries that may wait for a turn; more are answered 429.
    pub max_waiting_queries: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            allow_writes: false,
            max_running_queries: 2,
            max_waiting_queries: 16,
        }
    }
}

impl Pipeline {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading pipeline {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in pipeline {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let p: Pipeline = toml::from_str(text)?;
        p.validate()?;
        Ok(p)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.kafka.topic.is_empty(), "kafka.topic is empty");
        anyhow::ensure!(
            !self.kafka.dead_letter_topic.is_empty()
                && self.kafka.dead_letter_topic != self.kafka.topic,
            "kafka.dead_letter_topic must be set and differ from kafka.topic"
        );
        anyhow::ensure!(!self.kafka.group.is_empty(), "kafka.group is empty");
        anyhow::ensure!(
            self.kafka.dead_letter_max_bytes >= 1024,
            "kafka.dead_letter_max_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.batch.max_documents > 0,
            "batch.max_documents must be at least 1"
        );
        anyhow::ensure!(
            self.batch.max_in_flight >= self.batch.max_documents,
            "batch.max_in_flight must be at least batch.max_documents"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_embedded_default_and_typos_are_errors() {
        let p = Pipeline::parse("").unwrap();
        assert_eq!(p, Pipeline::default());
        assert!(p.kafka.brokers.is_empty());
        let p = Pipeline::parse(
            "[kafka]\nbrokers = \"k:9092\"\n[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n[store]\nprecision = \"int8\"\n",
        )
        .unwrap();
        assert_eq!(p.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(p.store.precision, Precision::Int8);
        let e = format!(
            "{:#}",
            Pipeline::parse("[kafka]\nbroker = \"x\"\n").unwrap_err()
        );
        assert!(e.contains("unknown field `broker`"), "{e}");
        assert!(Pipeline::parse("[batch]\nmax_documents = 0\n").is_err());
    }

    #[test]
    fn the_incremental_engine_is_chosen_by_name() {
        let p = Pipeline::parse("[model]\nincremental = \"slots\"\n").unwrap();
        assert_eq!(
            p.model.incremental,
            Some(crate::model::config::Incremental::Slots)
        );
        let e = format!(
            "{:#}",
            Pipeline::parse("[model]\nincremental = \"fast\"\n").unwrap_err()
        );
        assert!(e.contains("per-document") && e.contains("slots"), "{e}");
    }

    #[test]
    fn the_shipped_pipelines_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                Pipeline::from_file(&path).unwrap();
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
