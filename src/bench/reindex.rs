//! `giststream bench-reindex`: a re-index job's throughput against the bare incremental
//! forward on the same documents.

use crate::engine::compress::{compress, Document};
use crate::jobs::reindex::{self, Filter, JobSpec};
use crate::model::GistModel;
use crate::store::codec::Precision;
use crate::store::Store;
use serde::Serialize;
use std::time::Instant;

/// What a re-index costs against the bare incremental forward.
#[derive(Debug, Clone, Serialize)]
pub struct ReindexMeasurement {
    pub documents: usize,
    pub tokens: u64,
    pub bare_tokens_per_second: f64,
    pub reindex_tokens_per_second: f64,
    /// reindex tok/s / bare tok/s.
    pub ratio: f64,
}

/// Stores `docs` documents of about `tokens` tokens with one random model of the benchmark
/// shape, then times, on the same documents and batch size, the bare incremental forward
/// of a second model ([`compress`], text already segmented) and a re-index job to it (read
/// text, segment, compress, switch, flush).
pub fn run(docs: usize, tokens: usize, batch: usize) -> anyhow::Result<ReindexMeasurement> {
    use candle_core::{DType, Device};
    let tmp = tempfile::tempdir()?;
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let spec = crate::bench::paper_shape();
    crate::model::random::write_random_model(&a, &spec)?;
    crate::model::random::write_random_model(
        &b,
        &crate::model::random::RandomSpec {
            seed: spec.seed + 1,
            ..spec
        },
    )?;
    let load = |d: &std::path::Path| {
        GistModel::load(
            d,
            &Device::Cpu,
            DType::F32,
            &crate::model::LoadOptions::default(),
        )
    };
    let (ma, mb) = (load(&a)?, load(&b)?);
    let store = Store::open(&tmp.path().join("store"))?;
    let texts: Vec<String> = (0..docs)
        .map(|i| {
            let mut t = crate::model::random::synthetic_text(tokens / 27 + 1, 5, 9000 + i as u64);
            t.truncate(tokens.min(t.len()));
            t
        })
        .collect();
    let segmented = |m: &GistModel| -> anyhow::Result<Vec<Document>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(Document {
                    id: format!("d{i}"),
                    segments: m.segments(t)?,
                })
            })
            .collect()
    };
    for ((s, _), (i, t)) in compress(&ma, segmented(&ma)?, batch)?
        .iter()
        .zip(texts.iter().enumerate())
    {
        store.put(&format!("d{i}"), 1, &ma, s, t, Precision::F32)?;
    }
    let input = segmented(&mb)?;
    let started = Instant::now();
    let states = compress(&mb, input, batch)?;
    let bare = started.elapsed().as_secs_f64();
    let total: u64 = states.iter().map(|(s, _)| s.regular_tokens).sum();
    let job = JobSpec {
        precision: None,
        filter: Filter::default(),
        keep_old: false,
        dry_run: false,
        batch,
    };
    let started = Instant::now();
    let p = reindex::run(&store, &mb, &job, |_| {})?;
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        p.done_documents == docs,
        "the job re-indexed {} of {docs}",
        p.done_documents
    );
    Ok(ReindexMeasurement {
        documents: docs,
        tokens: total,
        bare_tokens_per_second: total as f64 / bare,
        reindex_tokens_per_second: total as f64 / secs,
        ratio: bare / secs,
    })
}
