//! `produce`: documents to Kafka as document messages (schemas/document.schema.json),
//! keyed by id so a document's parts stay on one partition, in order.

use crate::ingest::message::DocumentMessage;
use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

/// The messages of one text: parts of at most `part_bytes` bytes.
pub fn messages(id: &str, version: u64, text: &str, part_bytes: usize) -> Vec<DocumentMessage> {
    crate::store::parts::parts_of(id, version, text, part_bytes)
        .into_iter()
        .map(DocumentMessage::from)
        .collect()
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
