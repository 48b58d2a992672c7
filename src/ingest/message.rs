//! The document message (schemas/document.schema.json) and why a message can be refused.
//!
//! A message's key is the document id, so every part of a document lands on one partition
//! and stays in order. Its value is JSON:
//!
//! ```json
//! {"id": "doc-17", "version": 3, "part": 0, "last": false, "text": "...", "attributes": {}}
//! ```
//!
//! `version` defaults to 1, `part` to 0, `last` to true (a whole document in one message).
//! `final` and `metadata`, the fields' old names, are still accepted.

use crate::store::parts::Part;
use serde::{Deserialize, Serialize};

/// Longest document id accepted (bytes).
pub const MAX_ID_BYTES: usize = 512;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentMessage {
    pub id: String,
    #[serde(default = "first_version")]
    pub version: u64,
    #[serde(default)]
    pub part: u32,
    #[serde(alias = "final", default = "yes")]
    pub last: bool,
    pub text: String,
    #[serde(alias = "metadata", default)]
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

fn first_version() -> u64 {
    1
}

fn yes() -> bool {
    true
}

/// Why a message went to the dead-letter topic. `kind` is a stable name for the
/// `giststream.error.kind` header; the message says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("the message has no value")]
    NoValue,
    #[error("the message value is {bytes} bytes, over the limit of {limit}")]
    Oversize { bytes: usize, limit: usize },
    #[error("the message value is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("the message value is not JSON: {0}")]
    InvalidJson(String),
    #[error("the message does not match the document schema: {0}")]
    Schema(String),
    #[error("the document text is empty")]
    EmptyText,
    #[error("the message key {key:?} is not the document id {id:?} (key = id keeps a document's parts on one partition)")]
    KeyMismatch { key: String, id: String },
    #[error("a tombstone's key must be a document id (UTF-8, 1 to {MAX_ID_BYTES} bytes)")]
    BadKey,
    /// Refused by the store: a gap in the parts, a part after the last, a damaged document.
    #[error("{0}")]
    Order(String),
}

impl Reject {
    pub fn kind(&self) -> &'static str {
        match self {
            Reject::NoValue => "no_value",
            Reject::Oversize { .. } => "oversize",
            Reject::NotUtf8 { .. } => "not_utf8",
            Reject::InvalidJson(_) => "invalid_json",
            Reject::Schema(_) => "schema",
            Reject::EmptyText => "empty_text",
            Reject::KeyMismatch { .. } => "key_mismatch",
            Reject::BadKey => "bad_key",
            Reject::Order(_) => "rejected",
        }
    }
}

/// Parses and checks one message.
pub fn parse(
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    max_bytes: usize,
) -> Result<DocumentMessage, Reject> {
    let value = value.ok_or(Reject::NoValue)?;
    if value.len() > max_bytes {
        return Err(Reject::Oversize {
            bytes: value.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(value).map_err(|e| Reject::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let msg: DocumentMessage = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Reject::Schema(e.to_string()),
        _ => Reject::InvalidJson(e.to_string()),
    })?;
    if msg.id.is_empty() || msg.id.len() > MAX_ID_BYTES {
        return Err(Reject::Schema(format!(
            "the id must be 1 to {MAX_ID_BYTES} bytes (it is {})",
            msg.id.len()
        )));
    }
    // An empty closing part is fine (it ends a document sent in parts); an empty document
    // is not.
    if msg.text.is_empty() && !(msg.part > 0 && msg.last) {
        return Err(Reject::EmptyText);
    }
    if let Some(key) = key {
        if key != msg.id.as_bytes() {
            return Err(Reject::KeyMismatch {
                key: String::from_utf8_lossy(key).into_owned(),
                id: msg.id,
            });
        }
    }
    Ok(msg)
}

impl From<Part> for DocumentMessage {
    fn from(p: Part) -> Self {
        DocumentMessage {
            id: p.id,
            version: p.version,
            part: p.part,
            last: p.last,
            text: p.text,
            attributes: p.attributes,
        }
    }
}

impl DocumentMessage {
    pub fn into_part(self, source: Option<crate::store::SourceOffset>) -> Part {
        Part {
            id: self.id,
            version: self.version,
            part: self.part,
            last: self.last,
            text: self.text,
            source,
            attributes: self.attributes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_bad_message_is_named() {
        let p = |k: Option<&str>, v: &[u8]| parse(k.map(str::as_bytes), Some(v), 1000);
        let ok = p(Some("a"), br#"{"id":"a","text":"Hi."}"#).unwrap();
        assert_eq!((ok.version, ok.part, ok.last), (1, 0, true));
        assert_eq!(parse(None, None, 10).unwrap_err().kind(), "no_value");
        assert_eq!(p(None, &[b'x'; 1001]).unwrap_err().kind(), "oversize");
        assert_eq!(
            p(None, b"{\"id\":\"a\xff\"}").unwrap_err().kind(),
            "not_utf8"
        );
        assert_eq!(p(None, b"{\"id\":").unwrap_err().kind(), "invalid_json");
        assert_eq!(p(None, br#"{"id":"a"}"#).unwrap_err().kind(), "schema");
        assert_eq!(
            p(None, br#"{"id":"a","text":"x","extra":1}"#)
                .unwrap_err()
                .kind(),
            "schema"
        );
        assert_eq!(
            p(None, br#"{"id":"a","text":"x","part":-1}"#)
                .unwrap_err()
                .kind(),
            "schema"
        );
        assert_eq!(
            p(None, br#"{"id":"","text":"x"}"#).unwrap_err().kind(),
            "schema"
        );
        assert_eq!(
            p(None, br#"{"id":"a","text":""}"#).unwrap_err().kind(),
            "empty_text"
        );
        assert!(p(None, br#"{"id":"a","text":"","part":2,"final":true}"#).is_ok());
        assert_eq!(
            p(Some("b"), br#"{"id":"a","text":"x"}"#)
                .unwrap_err()
                .kind(),
            "key_mismatch"
        );
    }
}
