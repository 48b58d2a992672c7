//! Re-index jobs: when the model, N_g, segmentation or storage precision changes, every
//! stored state is stale. A job recompresses the selected documents from their stored text
//! with the new model, in batches, and switches each document atomically
//! ([`Store::switch`]): a query sees the old state or the new one, never a mix. The
//! replaced states form the old generation, dropped when the job completes (or kept with
//! `keep_old`).
//!
//! A job needs no bookkeeping to resume: a document is done when its stored state was made
//! by the job's model at the job's precision, so a restarted job selects only what is left.
//! Its progress is data (a record in the store's `jobs` tree, and a callback), as
//! `GET /v1/jobs` shows while `serve` runs it.

use crate::engine::compress::{compress, Document};
use crate::model::GistModel;
use crate::store::codec::Precision;
use crate::store::{DocMeta, Store};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Which documents a job takes: conditions joined by AND, `key op value` with key one of
/// id, version, fingerprint, precision, num_gists, tokens; op one of = != < <= > >=; an id
/// value may end in `*` (a prefix).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter(Vec<Cond>);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Cond {
    key: String,
    op: String,
    value: String,
}

impl Filter {
    /// Parses "version>=2,id=news-*" (commas or " and " between conditions).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut conds = Vec::new();
        for raw in text.split(',').flat_map(|c| c.split(" and ")) {
            let c = raw.trim();
            if c.is_empty() {
                continue;
            }
            let op = ["!=", "<=", ">=", "=", "<", ">"]
                .into_iter()
                .find(|op| c.contains(op))
                .with_context(|| format!("condition {c:?} has no operator (= != < <= > >=)"))?;
            let (key, value) = c.split_once(op).expect("found above");
            let key = key.trim().to_string();
            if ![
                "id",
                "version",
                "fingerprint",
                "precision",
                "num_gists",
                "tokens",
            ]
            .contains(&key.as_str())
            {
                bail!("unknown key {key:?} in {c:?} (id, version, fingerprint, precision, num_gists, tokens)");
            }
            let numeric = ["version", "num_gists", "tokens"].contains(&key.as_str());
            let value = value.trim().to_string();
            if numeric && value.parse::<u64>().is_err() {
                bail!("{key} takes a number, not {value:?}");
            }
            if !numeric && !["=", "!="].contains(&op) {
                bail!("{key} compares with = or != only");
            }
            conds.push(Cond {
                key,
                op: op.to_string(),
                value,
            });
        }
        Ok(Filter(conds))
    }

    pub fn matches(&self, m: &DocMeta) -> bool {
        self.0.iter().all(|c| {
            let text = |v: &str| match c.value.strip_suffix('*') {
                Some(prefix) if c.key == "id" => v.starts_with(prefix),
                _ => v == c.value,
            };
            let num = |v: u64| {
                let x: u64 = c.value.parse().unwrap_or(0);
                match c.op.as_str() {
                    "=" => v == x,
                    "!=" => v != x,
                    "<" => v < x,
                    "<=" => v <= x,
                    ">" => v > x,
                    _ => v >= x,
                }
            };
            let precision = serde_json::to_value(m.precision)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let eq = match c.key.as_str() {
                "id" => text(&m.id),
                "fingerprint" => text(&m.fingerprint),
                "precision" => text(&precision),
                "version" => return num(m.version),
                "num_gists" => return num(m.num_gists as u64),
                _ => return num(m.tokens),
            };
            if c.op == "!=" {
                !eq
            } else {
                eq
            }
        })
    }
}

/// What a job is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    /// Target precision (None: each document keeps its own).
    pub precision: Option<Precision>,
    #[serde(default)]
    pub filter: Filter,
    #[serde(default)]
    pub keep_old: bool,
    #[serde(default)]
    pub dry_run: bool,
    /// Documents compressed together.
    pub batch: usize,
}

/// A job's progress, saved in the store after every batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobProgress {
    pub job: String,
    /// queued, planned (dry run), running, done, failed.
    pub state: String,
    pub fingerprint: String,
    pub total_documents: usize,
    pub done_documents: usize,
    /// Documents already at the target when the job (re)started.
    pub up_to_date: usize,
    pub total_tokens: u64,
    pub done_tokens: u64,
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
    /// "id: reason" for documents that were not re-indexed.
    pub skipped: Vec<String>,
    pub error: Option<String>,
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether `m` is already what the job would make of it.
fn at_target(m: &DocMeta, model: &GistModel, precision: Option<Precision>) -> bool {
    m.fingerprint == format!("{:016x}", model.fingerprint)
        && precision.is_none_or(|p| p == m.precision)
}

/// A job's id: the same target (model and precision) is the same job, so a rerun resumes
/// it and its progress record.
pub fn job_id(model: &GistModel, spec: &JobSpec) -> String {
    let precision = spec.precision.map_or("same".to_string(), |p| {
        serde_json::to_value(p)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    });
    format!("reindex-{:016x}-{precision}", model.fingerprint)
}

/// The progress record of a job accepted but not yet started.
pub fn queued(model: &GistModel, spec: &JobSpec) -> JobProgress {
    JobProgress {
        job: job_id(model, spec),
        state: "queued".into(),
        fingerprint: format!("{:016x}", model.fingerprint),
        started_unix_ms: now_ms(),
        updated_unix_ms: now_ms(),
        ..JobProgress::default()
    }
}

/// Runs (or resumes) a job on `store` with `model`; `report` sees the progress after each
/// batch. Returns the final progress.
pub fn run(
    store: &Store,
    model: &GistModel,
    spec: &JobSpec,
    report: impl FnMut(&JobProgress),
) -> anyhow::Result<JobProgress> {
    run_from(store, None, model, spec, report)
}

/// [`run`], taking the new states from `replayed` (a scratch store the document topic was
/// replayed into with the new model, see [`replay`]) instead of recompressing the stored
/// text.
pub fn run_from(
    store: &Store,
    replayed: Option<&Store>,
    model: &GistModel,
    spec: &JobSpec,
    mut report: impl FnMut(&JobProgress),
) -> anyhow::Result<JobProgress> {
    let job = job_id(model, spec);
    let mut p = JobProgress {
        job: job.clone(),
        state: if spec.dry_run { "planned" } else { "running" }.into(),
        fingerprint: format!("{:016x}", model.fingerprint),
        started_unix_ms: now_ms(),
        ..JobProgress::default()
    };
    let mut todo: Vec<DocMeta> = Vec::new();
    for entry in store.list() {
        match entry {
            Err(e) => p.skipped.push(e),
            Ok(m) if !spec.filter.matches(&m) => {}
            Ok(m) if at_target(&m, model, spec.precision) => p.up_to_date += 1,
            Ok(m) if !m.complete => p.skipped.push(format!(
                "{}: still receiving parts (its next parts come with the pipeline's model)",
                m.id
            )),
            Ok(m) => todo.push(m),
        }
    }
    p.total_documents = todo.len();
    p.total_tokens = todo.iter().map(|m| m.tokens).sum();
    if spec.dry_run {
        // Pace: one batch's worth of the first documents, compressed and thrown away.
        let sample: Vec<&DocMeta> = todo.iter().take(spec.batch.max(1)).collect();
        let docs = sample
            .iter()
            .filter_map(|m| {
                let text = store.text(&m.id).ok()?;
                let short: String = text.chars().take(4000).collect();
                Some(Document {
                    id: m.id.clone(),
                    segments: model.segments(&short).ok()?,
                })
            })
            .collect::<Vec<_>>();
        if !docs.is_empty() {
            let started = Instant::now();
            let states = compress(model, docs, spec.batch)?;
            let tokens: u64 = states.iter().map(|(s, _)| s.regular_tokens).sum();
            p.tokens_per_second = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            p.eta_seconds = p.total_tokens as f64 / p.tokens_per_second.max(1e-9);
        }
        p.updated_unix_ms = now_ms();
        report(&p);
        return Ok(p);
    }
    store.put_job(&job, &serde_json::to_value(&p)?)?;
    report(&p);
    let result = work(store, replayed, model, spec, &todo, &mut p, &mut report);
    if let Err(e) = &result {
        // JobProgress is data: a failure is recorded where the progress was.
        p.state = "failed".into();
        p.error = Some(format!("{e:#}"));
        p.updated_unix_ms = now_ms();
        let _ = store.put_job(&job, &serde_json::to_value(&p)?);
        report(&p);
    }
    result.map(|()| p)
}

/// The batches of a job, then the old generation dropped.
fn work(
    store: &Store,
    replayed: Option<&Store>,
    model: &GistModel,
    spec: &JobSpec,
    todo: &[DocMeta],
    p: &mut JobProgress,
    report: &mut impl FnMut(&JobProgress),
) -> anyhow::Result<()> {
    let job = p.job.clone();
    let started = Instant::now();
    for batch in todo.chunks(spec.batch.max(1)) {
        let mut docs = Vec::new();
        let mut expected: Vec<(&DocMeta, Vec<u8>)> = Vec::new();
        for m in batch {
            let prepared = (|| -> anyhow::Result<(Vec<u8>, Document)> {
                let bytes = store.meta_bytes(&m.id)?.context("removed during the job")?;
                if replayed.is_some() {
                    let id = m.id.clone();
                    return Ok((
                        bytes,
                        Document {
                            id,
                            segments: Vec::new(),
                        },
                    ));
                }
                let text = store.text(&m.id).context("its text cannot be read")?;
                let segments = model.segments(&text)?;
                Ok((
                    bytes,
                    Document {
                        id: m.id.clone(),
                        segments,
                    },
                ))
            })();
            match prepared {
                Ok((bytes, doc)) => {
                    expected.push((m, bytes));
                    docs.push(doc);
                }
                Err(e) => p.skipped.push(format!("{}: {e:#}", m.id)),
            }
        }
        let states: Vec<crate::engine::state::GistState> = match replayed {
            None => compress(model, docs, spec.batch)?
                .into_iter()
                .map(|(s, _)| s)
                .collect(),
            Some(r) => {
                // Each document's replayed state, if the topic still holds its version.
                let mut kept = Vec::new();
                let mut states = Vec::new();
                for (m, bytes) in expected {
                    let got = r.meta(&m.id).ok().flatten();
                    match got {
                        Some(rm) if rm.complete && rm.version == m.version => {
                            states.push(r.load(&m.id, model)?.1);
                            kept.push((m, bytes));
                        }
                        Some(rm) => p.skipped.push(format!(
                            "{}: the topic holds version {} part {} of it, the store version {}",
                            m.id, rm.version, rm.parts, m.version
                        )),
                        None => p
                            .skipped
                            .push(format!("{}: not in the topic (past its retention?)", m.id)),
                    }
                }
                expected = kept;
                states
            }
        };
        for ((m, bytes), state) in expected.into_iter().zip(states) {
            let precision = spec.precision.unwrap_or(m.precision);
            match store.switch(&m.id, &bytes, model, &state, precision)? {
                Some(_) => {
                    p.done_documents += 1;
                    p.done_tokens += state.regular_tokens;
                }
                None => p.skipped.push(format!(
                    "{}: changed during the job (run it again to re-index the new version)",
                    m.id
                )),
            }
        }
        store.flush()?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        p.tokens_per_second = p.done_tokens as f64 / secs;
        p.eta_seconds =
            p.total_tokens.saturating_sub(p.done_tokens) as f64 / p.tokens_per_second.max(1e-9);
        p.updated_unix_ms = now_ms();
        store.put_job(&job, &serde_json::to_value(&*p)?)?;
        report(p);
    }
    if !spec.keep_old {
        store.drop_old_generation()?;
    }
    p.state = "done".into();
    p.eta_seconds = 0.0;
    p.updated_unix_ms = now_ms();
    store.put_job(&job, &serde_json::to_value(&*p)?)?;
    report(p);
    Ok(())
}

/// [`run_from`] with the new states replayed from the pipeline's document topic (see
/// [`replay`]) into a scratch store beside `store_dir` (`<store>.replay`), removed when the
/// job is done. Offline only: the embedded broker keeps nothing between runs.
pub fn run_from_kafka(
    p: &crate::ingest::pipeline::Pipeline,
    store: &Store,
    store_dir: &std::path::Path,
    model: &GistModel,
    spec: &JobSpec,
    report: impl FnMut(&JobProgress),
) -> anyhow::Result<JobProgress> {
    use anyhow::Context;
    anyhow::ensure!(
        !p.kafka.brokers.is_empty(),
        "--from-kafka needs the pipeline's brokers (the embedded broker keeps nothing between runs)"
    );
    let mut scratch_dir = store_dir.to_path_buf().into_os_string();
    scratch_dir.push(".replay");
    let scratch_dir = std::path::PathBuf::from(scratch_dir);
    let pr = {
        let scratch = Store::open(&scratch_dir)?;
        let n = replay(
            crate::ingest::client_config(p, &p.kafka.brokers),
            &p.kafka.topic,
            &scratch,
            model,
            spec.batch,
            p.batch.max_message_bytes,
        )?;
        eprintln!(
            "giststream: replayed {n} messages of {} into {}",
            p.kafka.topic,
            scratch_dir.display()
        );
        run_from(store, Some(&scratch), model, spec, report)?
    };
    if !spec.dry_run {
        std::fs::remove_dir_all(&scratch_dir)
            .with_context(|| format!("removing {}", scratch_dir.display()))?;
    }
    Ok(pr)
}

/// Replays a document topic from its earliest offsets to its current end into `scratch`
/// with `model` (no consumer group, nothing committed): the states the pipeline would have
/// made with this model. Parts already in `scratch` are skipped, so a killed replay resumes.
/// Returns the messages read.
pub fn replay(
    consumer_config: rdkafka::ClientConfig,
    topic: &str,
    scratch: &Store,
    model: &GistModel,
    batch: usize,
    max_message_bytes: usize,
) -> anyhow::Result<u64> {
    use rdkafka::message::Message;
    let mut parts = Vec::new();
    let flush = |parts: &mut Vec<crate::store::parts::Part>| -> anyhow::Result<()> {
        crate::store::parts::apply_parts(model, scratch, parts, Precision::F32, batch)?;
        parts.clear();
        Ok(())
    };
    let read =
        crate::ingest::read_to_end(consumer_config, "giststream-reindex-replay", topic, |m| {
            // Refused messages went to the dead-letter topic the first time; skip them.
            if let Ok(d) = crate::ingest::message::parse(m.key(), m.payload(), max_message_bytes) {
                parts.push(d.into_part(None));
            }
            if parts.len() >= 64 {
                flush(&mut parts)?;
            }
            Ok(())
        })?;
    flush(&mut parts)?;
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_match() {
        let f = Filter::parse("version>=2, id=news-* and precision!=int8").unwrap();
        let mut m: DocMeta = serde_json::from_value(serde_json::json!({
            "id": "news-1", "version": 3, "parts": 1, "complete": true, "tokens": 10,
            "sentences": 1, "gist_tokens": 4, "fingerprint": "00000000000000aa", "num_gists": 4,
            "segmentation": {}, "precision": "f32", "state_rows": 4, "state_chunks": 1,
            "state_bytes": 1, "text_bytes": 1, "carry": {"text": "", "offset": 0, "started": true},
            "source": null, "attributes": {}, "created_unix_ms": 0, "updated_unix_ms": 0
        }))
        .unwrap();
        assert!(f.matches(&m));
        m.version = 1;
        assert!(!f.matches(&m));
        m.version = 2;
        m.id = "blog-1".into();
        assert!(!f.matches(&m));
        assert!(Filter::parse("").unwrap().matches(&m));
        assert!(Filter::parse("colour=red").is_err());
        assert!(Filter::parse("version>=x").is_err());
        assert!(Filter::parse("id>3").is_err());
        assert!(Filter::parse("version").is_err());
    }
}
