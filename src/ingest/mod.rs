//! `serve`: documents in from Kafka, gist states out to the store.
//!
//! Two tasks share a bounded queue. The reader receives messages from the consumer group
//! and pauses its partitions while the queue is full (the model fell behind). The worker
//! takes a batch of messages, runs every valid one through the incremental path together
//! ([`crate::store::parts::apply_parts_unflushed`]: sentences of several documents share
//! forwards) into the store, sends refused messages to the dead-letter topic (and state
//! updates to the changelog topic) and waits for those deliveries. A third task, the
//! committer, then flushes the store and only then commits the batch's offsets, while the
//! worker goes on with the next batch. A crash anywhere before the commit redelivers the batch, and
//! redelivery is idempotent (the store skips parts it has), so no acknowledged message is
//! lost and none is applied twice.

pub mod changelog;
pub mod dead_letter;
pub mod message;
pub mod pipeline;
pub mod produce;
pub mod topics;

use crate::ingest::pipeline::Pipeline;
use crate::service::Service;
use crate::store::parts::{apply_parts_unflushed, Outcome, Part};
use crate::store::{PartAction, SourceOffset};
use anyhow::Context;
use message::{parse, Reject};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub use dead_letter::{
    HEADER_ERROR, HEADER_KEY_BYTES, HEADER_KIND, HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC,
    HEADER_TRUNCATED, HEADER_VALUE_BYTES,
};

/// The brokers a pipeline talks to: its own, or the embedded mock cluster, which lives
/// as long as this value.
pub struct Broker {
    pub bootstrap: String,
    pub embedded: bool,
    _mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

impl Broker {
    /// Connects to the pipeline's brokers, or starts the embedded one (creating the
    /// pipeline's topics) when none are configured.
    pub fn start(p: &Pipeline) -> anyhow::Result<Self> {
        if !p.kafka.brokers.is_empty() {
            return Ok(Self {
                bootstrap: p.kafka.brokers.clone(),
                embedded: false,
                _mock: None,
            });
        }
        let mock = MockCluster::new(1).context("starting the embedded Kafka broker")?;
        for t in [
            &p.kafka.topic,
            &p.kafka.dead_letter_topic,
            &p.kafka.state_topic,
        ] {
            if !t.is_empty() {
                mock.create_topic(t, p.kafka.partitions, 1)
                    .with_context(|| format!("creating topic {t} on the embedded broker"))?;
            }
        }
        Ok(Self {
            bootstrap: mock.bootstrap_servers(),
            embedded: true,
            _mock: Some(mock),
        })
    }
}

/// Client settings shared by consumer and producers: bootstrap servers, then the
/// pipeline's librdkafka properties (which may override anything).
pub fn client_config(p: &Pipeline, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in &p.kafka.properties {
        c.set(k, v);
    }
    c
}

/// A producer that never duplicates or reorders on retries, and reports delivery only
/// once every in-sync replica has the record.
pub fn producer(p: &Pipeline, bootstrap: &str) -> anyhow::Result<FutureProducer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5");
    for (k, v) in &p.kafka.properties {
        c.set(k, v);
    }
    c.create().context("creating a Kafka producer")
}

/// Reads `topic` from its earliest offsets to where each partition ends now, without a
/// consumer group's commits, handing every message to `each` (restore and replays use it).
/// Returns the messages read. Fails if the topic has no partitions or the end is not
/// reached in 10 minutes.
pub fn read_to_end(
    consumer_config: ClientConfig,
    group: &str,
    topic: &str,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    use rdkafka::consumer::BaseConsumer;
    let mut cc = consumer_config;
    cc.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cc.create().context("creating a Kafka consumer")?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(
        !partitions.is_empty(),
        "the topic {topic} has no partitions (does it exist?)"
    );
    // Where each partition ends now: reading stops there.
    let mut end = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {topic}[{p}]"))?;
        if high > low {
            end.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    let mut read = 0;
    if end.is_empty() {
        return Ok(read);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !end.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{topic} did not reach its end in 10 minutes"
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m.with_context(|| format!("reading {topic}"))?;
        read += 1;
        each(&m)?;
        if end
            .get(&m.partition())
            .is_some_and(|&e| m.offset() + 1 >= e)
        {
            end.remove(&m.partition());
        }
    }
    Ok(read)
}

/// Runs the pipeline until `stop` turns true, then finishes the batch in hand (stored and
/// committed) and returns. An error (store, model, broker) returns at once, leaving the
/// uncommitted batch to be redelivered.
pub async fn run(
    p: &Pipeline,
    bootstrap: &str,
    svc: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut cc = client_config(p, bootstrap);
    cc.set("group.id", &p.kafka.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // An idle consumer answers new messages within 50 ms, not the default 500.
        .set("fetch.wait.max.ms", "50")
        // A member that died is noticed after 10 s, not librdkafka's 45 (a restart after
        // kill -9 waited 27-105 s for its partitions on Tansu; 3 s with these).
        // Properties below may set other values.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    for (k, v) in &p.kafka.properties {
        cc.set(k, v);
    }
    if let Some(id) = p.kafka.group_instance_id(&p.store.path) {
        cc.set("group.instance.id", id);
    }
    let consumer: Arc<StreamConsumer> =
        Arc::new(cc.create().context("creating the Kafka consumer")?);
    consumer
        .subscribe(&[&p.kafka.topic])
        .with_context(|| format!("subscribing to {}", p.kafka.topic))?;
    let producer = producer(p, bootstrap)?;
    let (tx, mut rx) = mpsc::channel::<OwnedMessage>(p.batch.max_in_flight);

    let reader = {
        let consumer = consumer.clone();
        let metrics = svc.metrics.clone();
        let svc = svc.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // Each distinct error is logged at most every 30 s (a broker that is down
            // answers every poll, alternating a few errors); /v1/health reports it
            // meanwhile. It is healthy again once a message arrives or, with nothing to
            // read, once the brokers answer a metadata request.
            let mut logged: BTreeMap<String, Instant> = BTreeMap::new();
            let mut failing = false;
            loop {
                let received = tokio::select! {
                    _ = stop.changed() => break,
                    r = tokio::time::timeout(Duration::from_secs(2), consumer.recv()) => r,
                };
                let m = match received {
                    Ok(Ok(m)) => {
                        if std::mem::take(&mut failing) {
                            svc.set_problem("kafka", None);
                            logged.clear();
                            eprintln!("giststream: receiving from Kafka again");
                        }
                        m.detach()
                    }
                    Err(_idle) => {
                        if failing {
                            let c = consumer.clone();
                            let answered = tokio::task::spawn_blocking(move || {
                                c.fetch_metadata(None, Duration::from_secs(2)).is_ok()
                            })
                            .await
                            .unwrap_or(false);
                            if answered {
                                failing = false;
                                svc.set_problem("kafka", None);
                                logged.clear();
                                eprintln!("giststream: the Kafka brokers answer again");
                            }
                        }
                        continue;
                    }
                    Ok(Err(e)) => {
                        let why = e.to_string();
                        let repeat = logged
                            .get(&why)
                            .is_some_and(|t| t.elapsed() < Duration::from_secs(30));
                        if !repeat {
                            eprintln!("giststream: receiving from Kafka: {why}");
                            logged.insert(why.clone(), Instant::now());
                        }
                        failing = true;
                        svc.set_problem("kafka", Some(format!("receiving: {why}")));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                metrics.add("giststream_messages_total", "Messages received.", 1.0);
                match tx.try_send(m) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        // The model is behind: stop fetching until the queue has room.
                        let paused = consumer.assignment().ok();
                        if let Some(a) = &paused {
                            let _ = consumer.pause(a);
                        }
                        metrics.add(
                            "giststream_pauses_total",
                            "Times the partitions were paused because the queue was full.",
                            1.0,
                        );
                        metrics.gauge(
                            "giststream_paused",
                            "1 while the partitions are paused.",
                            1.0,
                        );
                        let sent = tokio::select! {
                            _ = stop.changed() => false,
                            r = tx.send(m) => r.is_ok(),
                        };
                        if let Some(a) = &paused {
                            let _ = consumer.resume(a);
                        }
                        metrics.gauge(
                            "giststream_paused",
                            "1 while the partitions are paused.",
                            0.0,
                        );
                        if !sent {
                            break;
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
        })
    };

    // The committer makes each batch durable (one store flush) and then commits its
    // offsets, in order, while the worker already computes the next batch: the flush's
    // I/O overlaps the model instead of following it. At most one batch waits.
    let (commit_tx, mut commit_rx) = mpsc::channel::<TopicPartitionList>(1);
    let committer = {
        let (svc, consumer) = (svc.clone(), consumer.clone());
        tokio::spawn(async move {
            while let Some(tpl) = commit_rx.recv().await {
                let store_svc = svc.clone();
                tokio::task::spawn_blocking(move || store_svc.store.flush())
                    .await
                    .context("the flush task panicked")??;
                let c = consumer.clone();
                tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
                    .await?
                    .context("committing offsets")?;
                svc.metrics.add(
                    "giststream_commits_total",
                    "Offset commits (one per batch).",
                    1.0,
                );
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let worker = Worker {
        p: p.clone(),
        svc,
        consumer: consumer.clone(),
        producer,
        commits: commit_tx,
        last_lag: None,
    };
    let result = worker.run(&mut rx, &mut stop).await;
    reader.abort();
    let _ = reader.await;
    // The worker is gone (its sender with it): the committer finishes what it holds.
    let committed = committer.await.context("the committer task panicked")?;
    // The committer's own error explains a worker that found it gone.
    committed.and(result)
}

struct Worker {
    p: Pipeline,
    svc: Arc<Service>,
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    /// Offsets of processed batches, to the committer.
    commits: mpsc::Sender<TopicPartitionList>,
    last_lag: Option<Instant>,
}

impl Worker {
    async fn run(
        mut self,
        rx: &mut mpsc::Receiver<OwnedMessage>,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let first = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            };
            let mut batch = vec![first];
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.p.batch.max_wait_ms);
            while batch.len() < self.p.batch.max_documents {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            // Not cancelled by `stop`: a batch in hand is stored and committed first.
            // Tombstones split it: what came before one is stored first, so a delete
            // never overtakes an earlier part of its document, nor a later part it.
            let mut run = Vec::new();
            for m in batch {
                if self.is_tombstone(&m) {
                    if !run.is_empty() {
                        self.process(std::mem::take(&mut run)).await?;
                    }
                    self.delete(m).await?;
                } else {
                    run.push(m);
                }
            }
            if !run.is_empty() {
                self.process(run).await?;
            }
            self.update_lag().await;
        }
    }

    /// A keyed message with no value, when tombstones delete (else it is refused as
    /// `no_value` like any message without a value).
    fn is_tombstone(&self, m: &OwnedMessage) -> bool {
        m.payload().is_none()
            && m.key().is_some()
            && self.p.kafka.tombstones == pipeline::Tombstones::Delete
    }

    /// Deletes the document a tombstone names: from the store (durably), then from the
    /// state topic, and only then acknowledges the message. Deleting a document that is
    /// not stored is not an error (a redelivered tombstone finds nothing).
    async fn delete(&mut self, m: OwnedMessage) -> anyhow::Result<()> {
        let id = m
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .filter(|id| !id.is_empty() && id.len() <= message::MAX_ID_BYTES)
            .map(str::to_string);
        let Some(id) = id else {
            self.dead_letter(&m, &Reject::BadKey).await?;
            return self.commit(std::slice::from_ref(&m)).await;
        };
        let svc = self.svc.clone();
        let doc = id.clone();
        let deleted = tokio::task::spawn_blocking(move || svc.store.delete(&doc))
            .await
            .context("the store task panicked")?
            .with_context(|| format!("deleting document {id:?}"))?;
        let metrics = &self.svc.metrics;
        metrics.add("giststream_tombstones_total", "Tombstones received.", 1.0);
        if let Some(deleted) = deleted {
            if !self.p.kafka.state_topic.is_empty() {
                changelog::tombstones(&self.producer, &self.p.kafka.state_topic, &id, &deleted)
                    .await?;
            }
            metrics.add(
                "giststream_documents_deleted_total",
                "Documents deleted by tombstones.",
                1.0,
            );
            eprintln!("giststream: deleted document {id:?} (tombstone)");
        }
        self.commit(std::slice::from_ref(&m)).await
    }

    async fn process(&mut self, batch: Vec<OwnedMessage>) -> anyhow::Result<()> {
        let started = Instant::now();
        let metrics = self.svc.metrics.clone();
        let mut parts: Vec<(usize, Part)> = Vec::new();
        let mut refused: Vec<(usize, Reject)> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match parse(m.key(), m.payload(), self.p.batch.max_message_bytes) {
                Ok(d) => parts.push((
                    i,
                    d.into_part(Some(SourceOffset {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                    })),
                )),
                Err(r) => refused.push((i, r)),
            }
        }
        let svc = self.svc.clone();
        let list: Vec<Part> = parts.iter().map(|(_, p)| p.clone()).collect();
        let precision = self.p.store.precision;
        let batch_size = self.p.batch.max_documents;
        let outcomes = tokio::task::spawn_blocking(move || {
            apply_parts_unflushed(&svc.model, &svc.store, &list, precision, batch_size)
        })
        .await
        .context("the model task panicked")?
        .context("storing a batch")?;
        let mut tokens = 0u64;
        let mut stored = Vec::new();
        let mut republish = Vec::new();
        for ((i, part), outcome) in parts.iter().zip(outcomes) {
            match outcome {
                Outcome::Stored { meta, tokens: t } => {
                    tokens += t;
                    stored.push((part.id.clone(), meta, changelog::Records::Last));
                }
                Outcome::Skipped(action) => {
                    metrics.add(
                        "giststream_parts_skipped_total",
                        "Redelivered or stale parts skipped.",
                        1.0,
                    );
                    // A redelivery after a crash between the store and the state topic:
                    // publish the stored records again (the topic is compacted).
                    // Once per document per batch: `All` covers every part.
                    if action == PartAction::Duplicate
                        && !republish.iter().any(|(id, _, _)| *id == part.id)
                    {
                        if let Some(meta) = self.svc.store.meta(&part.id)? {
                            republish.push((
                                part.id.clone(),
                                Box::new(meta),
                                changelog::Records::All,
                            ));
                        }
                    }
                }
                Outcome::Rejected(why) => refused.push((*i, Reject::Order(why))),
            }
        }
        for (i, why) in &refused {
            self.dead_letter(&batch[*i], why).await?;
        }
        if !self.p.kafka.state_topic.is_empty() {
            for (id, meta, which) in stored.iter().chain(&republish) {
                changelog::publish(
                    &self.producer,
                    &self.p.kafka.state_topic,
                    &self.svc.store,
                    id,
                    meta,
                    *which,
                )
                .await?;
            }
        }
        self.commit(&batch).await?;

        let secs = started.elapsed().as_secs_f64().max(1e-9);
        metrics.add(
            "giststream_parts_stored_total",
            "Document parts stored.",
            stored.len() as f64,
        );
        metrics.add(
            "giststream_tokens_total",
            "Regular tokens compressed.",
            tokens as f64,
        );
        metrics.gauge(
            "giststream_tokens_per_second",
            "Tokens/s of the last batch (receive to commit).",
            tokens as f64 / secs,
        );
        metrics.gauge(
            "giststream_batch_size",
            "Messages in the last batch.",
            batch.len() as f64,
        );
        if let Some(total) = metrics.get("giststream_tokens_total") {
            let gists: u64 = stored.iter().map(|(_, m, _)| m.gist_tokens).sum();
            let toks: u64 = stored.iter().map(|(_, m, _)| m.tokens).sum();
            if gists > 0 && total > 0.0 {
                metrics.gauge(
                    "giststream_compression_ratio",
                    "R_c (regular tokens / gist tokens) of the documents stored by the last batch.",
                    toks as f64 / gists as f64,
                );
            }
        }
        Ok(())
    }

    async fn dead_letter(&self, m: &OwnedMessage, why: &Reject) -> anyhow::Result<()> {
        dead_letter::send(&self.producer, &self.p.kafka, m, why).await?;
        self.svc.metrics.add(
            "giststream_dead_letters_total",
            "Messages sent to the dead-letter topic.",
            1.0,
        );
        Ok(())
    }

    /// Hands the batch's offsets (per partition, the one after its last message) to the
    /// committer, which commits them once the store is flushed.
    async fn commit(&self, batch: &[OwnedMessage]) -> anyhow::Result<()> {
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in batch {
            let e = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in &next {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        self.commits
            .send(tpl)
            .await
            .map_err(|_| anyhow::anyhow!("the committer stopped (see its error)"))
    }

    /// Consumer lag (high watermark minus position, summed over the assignment), at most
    /// every 5 s.
    async fn update_lag(&mut self) {
        if self
            .last_lag
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last_lag = Some(Instant::now());
        let consumer = self.consumer.clone();
        let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
            let position = consumer.position().ok()?;
            let mut lag = 0;
            for e in position.elements() {
                let (_, high) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                    .ok()?;
                if let Offset::Offset(o) = e.offset() {
                    lag += (high - o).max(0);
                }
            }
            Some(lag)
        })
        .await
        .ok()
        .flatten();
        if let Some(lag) = lag {
            self.svc.metrics.gauge(
                "giststream_consumer_lag",
                "Messages behind the high watermarks of the assigned partitions.",
                lag as f64,
            );
        }
    }
}
