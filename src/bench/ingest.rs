//! What the pipeline costs: end-to-end tokens/s through Kafka (produce, consume, segment,
//! tokenize, the model, sled, commit) against the bare incremental forward
//! ([`crate::engine::compress::compress`]) on the same documents and batch size, in one run.

use crate::engine::compress::{compress, Document};
use crate::ingest::pipeline::Pipeline;
use crate::ingest::Broker;
use crate::model::{GistModel, LoadOptions};
use crate::service::Service;
use anyhow::Context;
use candle_core::{DType, Device};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct IngestMeasurement {
    /// Messages per batch (`batch.max_documents`), and documents per forward in the bare
    /// run.
    pub batch: usize,
    pub documents: usize,
    pub tokens: u64,
    pub bare_seconds: f64,
    pub bare_tokens_per_second: f64,
    /// Segmenting and tokenizing the documents (the pipeline does it, the bare run not).
    pub segment_seconds: f64,
    pub pipeline_seconds: f64,
    pub pipeline_tokens_per_second: f64,
    /// 1 - pipeline tok/s / bare tok/s.
    pub overhead: f64,
}

/// Texts of about `tokens` tokens under a byte-level tokenizer, sentences of ~27 bytes.
fn texts(docs: usize, tokens: usize) -> Vec<String> {
    (0..docs)
        .map(|i| {
            let mut t = crate::model::random::synthetic_text(tokens / 27 + 1, 5, 7000 + i as u64);
            let mut cut = tokens.min(t.len());
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
            t
        })
        .collect()
}

pub fn run(
    model_dir: Option<&std::path::Path>,
    docs: usize,
    tokens: usize,
    batches: &[usize],
    brokers: Option<&str>,
    mut report: impl FnMut(&IngestMeasurement),
) -> anyhow::Result<Vec<IngestMeasurement>> {
    let tmp = tempfile::tempdir()?;
    let dir = match model_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let d = tmp.path().join("model");
            crate::model::random::write_random_model(&d, &crate::bench::paper_shape())?;
            d
        }
    };
    let texts = texts(docs, tokens);
    let mut out = Vec::new();
    for &batch in batches {
        let model = GistModel::load(&dir, &Device::Cpu, DType::F32, &LoadOptions::default())?;
        // Bare: the incremental forward alone, documents already segmented.
        let seg_started = Instant::now();
        let input: Vec<Document> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(Document {
                    id: format!("d{i}"),
                    segments: model.segments(t)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let segment_seconds = seg_started.elapsed().as_secs_f64();
        let started = Instant::now();
        let states = compress(&model, input, batch)?;
        let bare_seconds = started.elapsed().as_secs_f64();
        let total: u64 = states.iter().map(|(s, _)| s.regular_tokens).sum();
        drop(states);

        // Pipeline: a fresh topic, group and store; warmed up by one document first
        // (group join, first forward), then timed from the first produce to the last
        // document stored.
        let mut p = Pipeline::default();
        let tag = format!(
            "bench-{}-{}-{batch}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        );
        p.kafka.brokers = brokers.unwrap_or_default().to_string();
        p.kafka.topic = tag.clone();
        p.kafka.dead_letter_topic = format!("{tag}.dlq");
        p.kafka.group = tag.clone();
        p.batch.max_documents = batch;
        p.batch.max_in_flight = batch.max(64);
        p.store.path = tmp.path().join(&tag);
        let broker = Broker::start(&p)?;
        let store = crate::store::Store::open(&p.store.path)?;
        let svc = Service::new(store, model);
        let rt = tokio::runtime::Runtime::new()?;
        let pipeline_seconds = rt.block_on(async {
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let ingest = tokio::spawn({
                let (p, b, svc) = (p.clone(), broker.bootstrap.clone(), svc.clone());
                async move { crate::ingest::run(&p, &b, svc, stop_rx).await }
            });
            let producer = crate::ingest::producer(&p, &broker.bootstrap)?;
            let wait_until = |n: usize| {
                let svc = svc.clone();
                async move {
                    let deadline = Instant::now() + Duration::from_secs(3600);
                    while svc.store.len() < n {
                        anyhow::ensure!(Instant::now() < deadline, "the pipeline stalled");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok::<(), anyhow::Error>(())
                }
            };
            let warm = crate::ingest::produce::messages("warmup", 1, &texts[0], usize::MAX);
            crate::ingest::produce::send_all(&producer, &p.kafka.topic, warm, |_| {}).await?;
            wait_until(1).await?;
            let started = Instant::now();
            let msgs = texts.iter().enumerate().flat_map(|(i, t)| {
                crate::ingest::produce::messages(&format!("d{i}"), 1, t, usize::MAX)
            });
            crate::ingest::produce::send_all(&producer, &p.kafka.topic, msgs, |_| {}).await?;
            wait_until(texts.len() + 1).await?;
            let secs = started.elapsed().as_secs_f64();
            let _ = stop_tx.send(true);
            ingest.await.context("the ingest task panicked")??;
            Ok::<f64, anyhow::Error>(secs)
        })?;
        let m = IngestMeasurement {
            batch,
            documents: texts.len(),
            tokens: total,
            bare_seconds,
            bare_tokens_per_second: total as f64 / bare_seconds,
            segment_seconds,
            pipeline_seconds,
            pipeline_tokens_per_second: total as f64 / pipeline_seconds,
            overhead: 1.0 - bare_seconds / pipeline_seconds,
        };
        report(&m);
        out.push(m);
    }
    Ok(out)
}
