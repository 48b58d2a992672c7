//! The state topic: a compacted Kafka topic that receives every state update (the Kafka
//! Streams changelog pattern), so a new node, or one that lost its disk, rebuilds its
//! store from Kafka without re-running the model (`giststream restore`).
//!
//! After a part is stored, the store's own records for it go out verbatim (they carry
//! their format version and CRC): the new state chunk, the new text part, then the
//! metadata. Keys name the record, so compaction keeps the latest of each:
//!
//! ```text
//! 'M' id                       metadata
//! 'S' id 0xFF chunk(u32 BE)    state chunk
//! 'T' id 0xFF part(u32 BE)     text part
//! ```
//!
//! A record larger than [`PIECE_BYTES`] is sent in pieces (key + 0xFE + piece u16 BE);
//! each piece's value starts with the piece count and index (u16 BE each). Restore reads
//! the topic to its end, keeps the latest value per key, and rebuilds each document from
//! its metadata: the chunks and parts it names, each record's checksum verified. Records
//! beyond what the metadata names (left by an older version) are ignored.

use crate::store::{DocMeta, Store};
use anyhow::Context;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest piece of a record in one message: under the 1 MB default message size limit
/// of Kafka brokers, with room for key and headers.
pub const PIECE_BYTES: usize = 512 * 1024;

fn key(kind: u8, id: &str, n: Option<u32>) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(id.as_bytes());
    if let Some(n) = n {
        k.push(0xFF);
        k.extend_from_slice(&n.to_be_bytes());
    }
    k
}

/// Which of a document's records [`publish`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Records {
    /// The part just stored: its last chunk and text part, and the metadata.
    Last,
    /// Every chunk and text part, and the metadata: after a redelivery, when a crash
    /// between the store and the topic may have left any of them unsent.
    All,
}

/// Publishes `id`'s records (chunks and text parts, then its metadata, so a reader never
/// sees metadata naming a record not yet sent) and waits for their delivery.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    store: &Store,
    id: &str,
    meta: &DocMeta,
    which: Records,
) -> anyhow::Result<()> {
    let first = |count: u32| match which {
        Records::Last => count.saturating_sub(1),
        Records::All => 0,
    };
    let mut records = Vec::new();
    for n in first(meta.state_chunks)..meta.state_chunks {
        let r = store
            .raw("states", id, n)?
            .with_context(|| format!("{id}: chunk {n} missing"))?;
        records.push((key(b'S', id, Some(n)), r));
    }
    for n in first(meta.parts)..meta.parts {
        let r = store
            .raw("texts", id, n)?
            .with_context(|| format!("{id}: text part {n} missing"))?;
        records.push((key(b'T', id, Some(n)), r));
    }
    let m = store
        .raw("meta", id, 0)?
        .with_context(|| format!("{id}: metadata missing"))?;
    records.push((key(b'M', id, None), m));
    for (k, v) in &records {
        send_pieces(producer, topic, k, v).await?;
    }
    Ok(())
}

/// Deletes a document from the state topic: a tombstone for every piece of every record
/// it had (metadata first, so a restore reading meanwhile no longer rebuilds it), each
/// delivery awaited. Compaction then drops the records for good.
pub async fn tombstones(
    producer: &FutureProducer,
    topic: &str,
    id: &str,
    deleted: &crate::store::Deleted,
) -> anyhow::Result<()> {
    let mut keys = vec![(key(b'M', id, None), deleted.meta)];
    for (n, &len) in deleted.states.iter().enumerate() {
        keys.push((key(b'S', id, Some(n as u32)), len));
    }
    for (n, &len) in deleted.texts.iter().enumerate() {
        keys.push((key(b'T', id, Some(n as u32)), len));
    }
    for (base, len) in keys {
        for i in 0..len.div_ceil(PIECE_BYTES).max(1) {
            let k = piece_key(&base, i as u16);
            producer
                .send(
                    FutureRecord::<[u8], [u8]>::to(topic).key(&k),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
                .with_context(|| format!("sending a tombstone to the state topic {topic}"))?;
        }
    }
    Ok(())
}

fn piece_key(base: &[u8], i: u16) -> Vec<u8> {
    let mut k = base.to_vec();
    k.push(0xFE);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

async fn send_pieces(
    producer: &FutureProducer,
    topic: &str,
    key: &[u8],
    value: &[u8],
) -> anyhow::Result<()> {
    let pieces: Vec<&[u8]> = if value.is_empty() {
        vec![value]
    } else {
        value.chunks(PIECE_BYTES).collect()
    };
    anyhow::ensure!(pieces.len() <= u16::MAX as usize, "record too large");
    let count = pieces.len() as u16;
    for (i, piece) in pieces.iter().enumerate() {
        let k = piece_key(key, i as u16);
        let mut v = Vec::with_capacity(piece.len() + 4);
        v.extend_from_slice(&count.to_be_bytes());
        v.extend_from_slice(&(i as u16).to_be_bytes());
        v.extend_from_slice(piece);
        producer
            .send(
                FutureRecord::to(topic).key(&k).payload(&v),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .with_context(|| format!("sending to the state topic {topic}"))?;
    }
    Ok(())
}

/// One piece of a record: (piece count, index, bytes).
type Piece = (u16, u16, Vec<u8>);

/// What a restore did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub messages: u64,
    pub documents: u64,
    /// "id: reason" for documents that could not be rebuilt.
    pub skipped: Vec<String>,
}

/// Reads `topic` from the beginning to its current end and writes every document it
/// holds into `store`.
pub fn restore(
    consumer_config: rdkafka::ClientConfig,
    topic: &str,
    store: &Store,
) -> anyhow::Result<RestoreReport> {
    let mut report = RestoreReport::default();
    let mut latest: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    report.messages =
        crate::ingest::read_to_end(consumer_config, "giststream-restore", topic, |m| {
            if let (Some(k), v) = (m.key(), m.payload()) {
                match v {
                    Some(v) => latest.insert(k.to_vec(), v.to_vec()),
                    None => latest.remove(k), // a tombstone
                };
            }
            Ok(())
        })?;
    // Reassemble pieces into records.
    let mut records: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut broken: Vec<Vec<u8>> = Vec::new();
    let mut grouped: BTreeMap<Vec<u8>, Vec<Piece>> = BTreeMap::new();
    for (k, v) in latest {
        if k.len() < 3 || k[k.len() - 3] != 0xFE || v.len() < 4 {
            continue;
        }
        let base = k[..k.len() - 3].to_vec();
        let count = u16::from_be_bytes([v[0], v[1]]);
        let index = u16::from_be_bytes([v[2], v[3]]);
        grouped
            .entry(base)
            .or_default()
            .push((count, index, v[4..].to_vec()));
    }
    for (base, mut pieces) in grouped {
        pieces.sort_by_key(|p| p.1);
        let count = pieces.last().map_or(0, |p| p.0);
        let complete = pieces
            .iter()
            .take(count as usize)
            .enumerate()
            .all(|(i, p)| p.1 as usize == i && p.0 == count);
        if !complete || pieces.len() < count as usize {
            broken.push(base);
            continue;
        }
        let whole: Vec<u8> = pieces
            .into_iter()
            .take(count as usize)
            .flat_map(|p| p.2)
            .collect();
        records.insert(base, whole);
    }
    for (k, meta_bytes) in records.iter().filter(|(k, _)| k.first() == Some(&b'M')) {
        let id = String::from_utf8_lossy(&k[1..]).into_owned();
        match rebuild(store, &id, meta_bytes, &records) {
            Ok(()) => report.documents += 1,
            Err(e) => report.skipped.push(format!("{id}: {e:#}")),
        }
    }
    for b in broken {
        report.skipped.push(format!(
            "{}: a record with missing pieces",
            String::from_utf8_lossy(&b[1..])
        ));
    }
    Ok(report)
}

fn rebuild(
    store: &Store,
    id: &str,
    meta_bytes: &[u8],
    records: &BTreeMap<Vec<u8>, Vec<u8>>,
) -> anyhow::Result<()> {
    let meta = crate::store::parse_meta(meta_bytes, id)?;
    let get = |kind: u8, n: u32, what: &str| {
        records
            .get(&key(kind, id, Some(n)))
            .with_context(|| format!("{what} {n} missing from the state topic"))
    };
    let chunks = (0..meta.state_chunks)
        .map(|n| {
            let c = get(b'S', n, "state chunk")?;
            crate::store::codec::check(c).with_context(|| format!("state chunk {n}"))?;
            Ok(c.as_slice())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let texts = (0..meta.parts)
        .map(|n| get(b'T', n, "text part").map(|t| t.as_slice()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    store.put_records(id, meta_bytes, &chunks, &texts)
}
