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

/// Publishes the records of the part just stored for `id` (its last chunk and text part,
/// then its metadata) and waits for their delivery.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    store: &Store,
    id: &str,
    meta: &DocMeta,
) -> anyhow::Result<()> {
    let mut records = Vec::new();
    if meta.state_chunks > 0 {
        let n = meta.state_chunks - 1;
        let r = store
            .raw("states", id, n)?
            .with_context(|| format!("{id}: chunk {n} missing"))?;
        records.push((key(b'S', id, Some(n)), r));
    }
    let n = meta.parts - 1;
    let r = store
        .raw("texts", id, n)?
        .with_context(|| format!("{id}: text part {n} missing"))?;
    records.push((key(b'T', id, Some(n)), r));
    let m = store
        .raw("meta", id, 0)?
        .with_context(|| format!("{id}: metadata missing"))?;
    records.push((key(b'M', id, None), m));
    for (k, v) in &records {
        send_pieces(producer, topic, k, v).await?;
    }
    Ok(())
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
        let mut k = key.to_vec();
        k.push(0xFE);
        k.extend_from_slice(&(i as u16).to_be_bytes());
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
