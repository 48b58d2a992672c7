//! `produce`: documents to Kafka as document messages (schemas/document.schema.json),
//! keyed by id so a document's parts stay on one partition, in order.

use crate::cli::ProduceArgs;
use crate::ingest::message::{parse, DocumentMessage};
use crate::pipeline::Pipeline;
use anyhow::{bail, Context};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The messages of one text: parts of at most `part_bytes` bytes.
pub fn messages(id: &str, version: u64, text: &str, part_bytes: usize) -> Vec<DocumentMessage> {
    let parts = crate::update::split_parts(text, part_bytes);
    let n = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(k, t)| DocumentMessage {
            id: id.to_string(),
            version,
            part: k as u32,
            last: k + 1 == n,
            text: t.to_string(),
            metadata: Default::default(),
        })
        .collect()
}

/// Bootstrap servers: the flag, the pipeline's, or the embedded broker announced by the
/// `serve` running on the pipeline's store.
pub fn resolve_brokers(flag: Option<&str>, p: &Pipeline) -> anyhow::Result<String> {
    if let Some(b) = flag {
        return Ok(b.to_string());
    }
    if !p.kafka.brokers.is_empty() {
        return Ok(p.kafka.brokers.clone());
    }
    match crate::api::read_endpoint(&p.store.path).and_then(|e| e.kafka_bootstrap) {
        Some(b) => Ok(b),
        None => bail!(
            "no brokers: the pipeline names none and no `giststream serve` with an embedded broker runs on {} (give --brokers)",
            p.store.path.display()
        ),
    }
}

fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "txt"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// Sends messages, awaiting every delivery; returns how many were delivered.
pub async fn send_all(
    producer: &FutureProducer,
    topic: &str,
    msgs: impl IntoIterator<Item = DocumentMessage>,
    mut on_sent: impl FnMut(usize),
) -> anyhow::Result<usize> {
    let mut pending = Vec::new();
    let mut sent = 0;
    for m in msgs {
        let value = serde_json::to_vec(&m)?;
        let mut record = FutureRecord::to(topic).key(m.id.as_bytes()).payload(&value);
        // Enqueue (the future owns nothing borrowed); a full local queue waits a little.
        let fut = loop {
            match producer.send_result(record) {
                Ok(f) => break f,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e).context("sending a message"),
            }
        };
        pending.push(fut);
        // Bounded: await a window of deliveries at a time.
        if pending.len() >= 256 {
            await_deliveries(&mut pending, &mut sent, &mut on_sent).await?;
        }
    }
    await_deliveries(&mut pending, &mut sent, &mut on_sent).await?;
    Ok(sent)
}

/// Awaits every pending delivery, counting them.
async fn await_deliveries(
    pending: &mut Vec<rdkafka::producer::DeliveryFuture>,
    sent: &mut usize,
    on_sent: &mut impl FnMut(usize),
) -> anyhow::Result<()> {
    for f in pending.drain(..) {
        f.await
            .context("the producer went away")?
            .map_err(|(e, _)| e)
            .context("delivering a message")?;
        *sent += 1;
        on_sent(*sent);
    }
    Ok(())
}

pub fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let p = if args.pipeline.exists() {
        Pipeline::from_file(&args.pipeline)?
    } else {
        Pipeline::default()
    };
    let brokers = resolve_brokers(args.brokers.as_deref(), &p)?;
    let topic = args.topic.clone().unwrap_or(p.kafka.topic.clone());
    let mut msgs = Vec::new();
    let stdin = args.paths.is_empty() || args.paths.iter().any(|p| p == Path::new("-"));
    if stdin {
        for (n, line) in std::io::stdin().lock().lines().enumerate() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let m = parse(None, Some(line.as_bytes()), usize::MAX)
                .with_context(|| format!("stdin line {}", n + 1))?;
            msgs.push(m);
        }
    }
    let files: Vec<PathBuf> = args
        .paths
        .iter()
        .filter(|p| p.as_path() != Path::new("-"))
        .cloned()
        .collect();
    for f in collect_files(&files)? {
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("reading {} (UTF-8 text expected)", f.display()))?;
        let id = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .with_context(|| format!("{} has no file name to use as an id", f.display()))?;
        if text.is_empty() {
            bail!("{} is empty", f.display());
        }
        msgs.extend(messages(&id, args.doc_version, &text, args.part_bytes));
    }
    let total = msgs.len();
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} messages {per_sec}")
            .expect("static template"),
    );
    let producer = crate::ingest::producer(&p, &brokers)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sent = rt.block_on(send_all(&producer, &topic, msgs, |n| {
        bar.set_position(n as u64)
    }))?;
    bar.finish_and_clear();
    eprintln!("giststream: {sent} message(s) delivered to {topic} at {brokers}");
    Ok(())
}
