//! What the store keeps per document, and how each record is sealed: [`DocMeta`], the
//! plan for an arriving part ([`PartAction`]), an [`Update`], and the version + CRC32
//! envelope of metadata and text records.

use super::codec::Precision;
use crate::engine::state::GistState;
use crate::text::encoder::Carry;
use crate::text::segment::SegmentConfig;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Format version of metadata and text records (2: chunked states, parts, carry).
pub const RECORD_VERSION: u16 = 2;

/// Where a document part came from (a Kafka message), for tracing and replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// What is known about a stored document without decoding its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocMeta {
    pub id: String,
    /// Caller's version of the document (a later version replaces an earlier one).
    pub version: u64,
    /// Parts of this version stored so far (parts are numbered from 0).
    pub parts: u32,
    /// Whether the last part arrived: the document is whole and takes no more parts.
    pub complete: bool,
    /// Regular tokens, BOS included.
    pub tokens: u64,
    pub sentences: u64,
    pub gist_tokens: u64,
    /// Model fingerprint, hex (states only resume under the same model).
    pub fingerprint: String,
    pub num_gists: usize,
    pub segmentation: SegmentConfig,
    pub precision: Precision,
    /// Rows per layer of the stored state, and the chunks holding them.
    pub state_rows: u64,
    /// Rows at the end of the stored state that the next part rewrites: the last
    /// sentence's window and gists, for a model that keeps the previous sentence visible
    /// (0 otherwise). The next part's chunk starts before them.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub state_open_rows: u64,
    pub state_chunks: u32,
    pub state_bytes: u64,
    pub text_bytes: u64,
    /// Text after the last complete sentence, held until the next part (empty once
    /// complete).
    pub carry: Carry,
    /// The message of the last part stored, when it came from Kafka.
    pub source: Option<SourceOffset>,
    /// The producer's metadata of the document, as given.
    #[serde(default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Checksum and length of each state chunk, in order: how `store salvage` finds them
    /// in sled's files when sled itself cannot open the store (empty in stores written
    /// before it was kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_records: Vec<RecordRef>,
    /// The same for each text part.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub text_records: Vec<RecordRef>,
}

/// A record's CRC32 (the one it carries) and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordRef {
    pub crc32: u32,
    pub bytes: u64,
}

impl RecordRef {
    /// The reference of a state chunk (its CRC32 is its last four bytes).
    pub fn of_state(chunk: &[u8]) -> Self {
        let crc = chunk.len().checked_sub(4).map_or(0, |at| {
            u32::from_le_bytes(chunk[at..].try_into().expect("4 bytes"))
        });
        Self {
            crc32: crc,
            bytes: chunk.len() as u64,
        }
    }

    /// The reference of a sealed record (its CRC32 follows the version).
    pub fn of_sealed(record: &[u8]) -> Self {
        let crc = record
            .get(2..6)
            .map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        Self {
            crc32: crc,
            bytes: record.len() as u64,
        }
    }
}

/// What to do with part `part` of version `version` of a document, given what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartAction {
    /// Store it (a new document, a newer version, or the next part).
    Apply,
    /// Already stored (a redelivery): nothing to do.
    Duplicate,
    /// An older version than the stored one: nothing to do.
    Stale { stored: u64 },
    /// A gap: an earlier part is missing.
    OutOfOrder { expected: u32 },
    /// The stored version is complete and takes no more parts.
    AfterLast { parts: u32 },
}

impl PartAction {
    /// The action for a part, given the stored metadata.
    pub fn plan(stored: Option<&DocMeta>, version: u64, part: u32) -> Self {
        let Some(m) = stored else {
            return if part == 0 {
                PartAction::Apply
            } else {
                PartAction::OutOfOrder { expected: 0 }
            };
        };
        if version < m.version {
            return PartAction::Stale { stored: m.version };
        }
        if version > m.version {
            return if part == 0 {
                PartAction::Apply
            } else {
                PartAction::OutOfOrder { expected: 0 }
            };
        }
        if part < m.parts {
            PartAction::Duplicate
        } else if m.complete {
            PartAction::AfterLast { parts: m.parts }
        } else if part == m.parts {
            PartAction::Apply
        } else {
            PartAction::OutOfOrder { expected: m.parts }
        }
    }
}

/// One change to a document: part `part` of version `version`, with the state after it.
pub struct Update<'a> {
    pub id: &'a str,
    pub version: u64,
    pub part: u32,
    /// This part is the last one.
    pub last: bool,
    /// The part's text.
    pub text: &'a str,
    /// The document's state after this part (built on the stored state for part > 0).
    pub state: &'a GistState,
    /// The encoder's carry after this part.
    pub carry: Carry,
    /// Storage precision (a later part keeps the document's first one).
    pub precision: Precision,
    pub source: Option<SourceOffset>,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// Refusals a caller may want to tell apart (the HTTP API maps them to statuses); they
/// travel inside `anyhow::Error` and are found with `downcast_ref`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no document {0:?} in the store")]
    NotFound(String),
    #[error("document {id:?} was compressed by another model (fingerprint {stored}); this model is {model}: re-index it")]
    OtherModel {
        id: String,
        stored: String,
        model: String,
    },
}

/// The key of chunk or part `n` of document `id`.
/// The prefix every chunk key of `id` starts with.
pub(crate) fn doc_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.extend_from_slice(id.as_bytes());
    k.push(0xFF);
    k
}

pub(crate) fn chunk_key(id: &str, n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 5);
    k.extend_from_slice(id.as_bytes());
    k.push(0xFF);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// A sealed record: version, CRC32 of the payload, payload.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 6);
    out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub(crate) fn unseal<'a>(bytes: &'a [u8], what: &str, id: &str) -> anyhow::Result<&'a [u8]> {
    if bytes.len() < 6 {
        bail!("the {what} record of document {id:?} is truncated");
    }
    let version = u16::from_le_bytes([bytes[0], bytes[1]]);
    if version != RECORD_VERSION {
        bail!("the {what} record of document {id:?} has format {version}; this build reads {RECORD_VERSION}");
    }
    let crc = u32::from_le_bytes(bytes[2..6].try_into().expect("4 bytes"));
    let payload = &bytes[6..];
    if crc32fast::hash(payload) != crc {
        bail!("the {what} record of document {id:?} is corrupted (checksum mismatch)");
    }
    Ok(payload)
}

/// Reads a sealed metadata record.
pub fn parse_meta(bytes: &[u8], id: &str) -> anyhow::Result<DocMeta> {
    let payload = unseal(bytes, "metadata", id)?;
    serde_json::from_slice(payload).with_context(|| format!("reading the metadata of {id:?}"))
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(version: u64, parts: u32, complete: bool) -> DocMeta {
        DocMeta {
            id: "d".into(),
            version,
            parts,
            complete,
            tokens: 0,
            sentences: 0,
            gist_tokens: 0,
            fingerprint: String::new(),
            num_gists: 1,
            segmentation: SegmentConfig::default(),
            precision: Precision::F32,
            state_rows: 0,
            state_open_rows: 0,
            state_chunks: 0,
            state_bytes: 0,
            text_bytes: 0,
            carry: Carry::default(),
            source: None,
            attributes: Default::default(),
            created_unix_ms: 0,
            updated_unix_ms: 0,
            state_records: Vec::new(),
            text_records: Vec::new(),
        }
    }

    #[test]
    fn parts_are_planned_in_order_and_redeliveries_skipped() {
        use PartAction::*;
        assert_eq!(PartAction::plan(None, 1, 0), Apply);
        assert_eq!(PartAction::plan(None, 1, 2), OutOfOrder { expected: 0 });
        let open = meta(3, 2, false);
        assert_eq!(PartAction::plan(Some(&open), 3, 2), Apply);
        assert_eq!(PartAction::plan(Some(&open), 3, 1), Duplicate);
        assert_eq!(
            PartAction::plan(Some(&open), 3, 4),
            OutOfOrder { expected: 2 }
        );
        assert_eq!(PartAction::plan(Some(&open), 2, 0), Stale { stored: 3 });
        assert_eq!(PartAction::plan(Some(&open), 4, 0), Apply);
        assert_eq!(
            PartAction::plan(Some(&open), 4, 1),
            OutOfOrder { expected: 0 }
        );
        let done = meta(3, 2, true);
        assert_eq!(PartAction::plan(Some(&done), 3, 1), Duplicate);
        assert_eq!(PartAction::plan(Some(&done), 3, 2), AfterLast { parts: 2 });
    }
}
