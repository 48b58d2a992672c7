//! The dead-letter topic: a refused message's key and value with the reason and source in
//! headers (schemas/dead-letter.schema.json), cut to fit when too large, so that no
//! message can stop its partition.

use super::message::Reject;
use super::pipeline::KafkaConfig;
use anyhow::Context;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// Headers of a dead-letter record (schemas/dead-letter.schema.json).
pub const HEADER_ERROR: &str = "giststream.error";
pub const HEADER_KIND: &str = "giststream.error.kind";
pub const HEADER_TOPIC: &str = "giststream.source.topic";
pub const HEADER_PARTITION: &str = "giststream.source.partition";
pub const HEADER_OFFSET: &str = "giststream.source.offset";
/// Set ("true") when the dead letter's value (or key) was cut to fit; the original
/// sizes follow in bytes.
pub const HEADER_TRUNCATED: &str = "giststream.truncated";
pub const HEADER_VALUE_BYTES: &str = "giststream.value.bytes";
pub const HEADER_KEY_BYTES: &str = "giststream.key.bytes";

/// Longest key forwarded whole to the dead-letter topic (a document id is at most
/// [`super::message::MAX_ID_BYTES`]; anything longer is refused anyway).
const DEAD_LETTER_KEY_BYTES: usize = 4096;
/// What a dead letter's value is cut to when the broker refuses even the configured size.
const DEAD_LETTER_FALLBACK_BYTES: usize = 16 * 1024;

/// The original key and value, with the reason and source in headers; delivery is
/// awaited, since the offset commit that follows acknowledges the message. A value
/// over `kafka.dead_letter_max_bytes` (or a key over 4 KiB) is cut, with the original
/// sizes in headers; if the broker still refuses the size, it is cut to 16 KiB. A
/// message too large for the dead-letter topic must never stop its partition.
pub async fn send(
    producer: &FutureProducer,
    k: &KafkaConfig,
    m: &OwnedMessage,
    why: &Reject,
) -> anyhow::Result<()> {
    let limit = k.dead_letter_max_bytes;
    let sent = match send_once(producer, &k.dead_letter_topic, m, why, limit).await {
        Err(rdkafka::error::KafkaError::MessageProduction(
            rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
        )) if limit > DEAD_LETTER_FALLBACK_BYTES => {
            send_once(
                producer,
                &k.dead_letter_topic,
                m,
                why,
                DEAD_LETTER_FALLBACK_BYTES,
            )
            .await
        }
        other => other,
    };
    sent.with_context(|| format!("sending to {}", k.dead_letter_topic))?;
    eprintln!(
        "giststream: {}[{}]@{} to the dead-letter topic: {why}",
        m.topic(),
        m.partition(),
        m.offset()
    );
    Ok(())
}

async fn send_once(
    producer: &FutureProducer,
    topic: &str,
    m: &OwnedMessage,
    why: &Reject,
    value_limit: usize,
) -> Result<(), rdkafka::error::KafkaError> {
    let reason = why.to_string();
    let partition = m.partition().to_string();
    let offset = m.offset().to_string();
    let (key, value) = (m.key(), m.payload());
    let key_cut = key.map(|k| &k[..k.len().min(DEAD_LETTER_KEY_BYTES)]);
    let value_cut = value.map(|v| &v[..v.len().min(value_limit)]);
    let mut headers = vec![
        (HEADER_ERROR, reason),
        (HEADER_KIND, why.kind().to_string()),
        (HEADER_TOPIC, m.topic().to_string()),
        (HEADER_PARTITION, partition),
        (HEADER_OFFSET, offset),
    ];
    let key_truncated = key.map(<[u8]>::len) != key_cut.map(<[u8]>::len);
    let value_truncated = value.map(<[u8]>::len) != value_cut.map(<[u8]>::len);
    if key_truncated || value_truncated {
        headers.push((HEADER_TRUNCATED, "true".into()));
        headers.push((HEADER_KEY_BYTES, key.map_or(0, <[u8]>::len).to_string()));
        headers.push((HEADER_VALUE_BYTES, value.map_or(0, <[u8]>::len).to_string()));
    }
    let headers = headers.iter().fold(OwnedHeaders::new(), |h, (key, v)| {
        h.insert(Header {
            key,
            value: Some(v.as_str()),
        })
    });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(k) = key_cut {
        record = record.key(k);
    }
    if let Some(v) = value_cut {
        record = record.payload(v);
    }
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}
