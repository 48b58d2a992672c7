//! Persistence of gist states: a sled database holding, per document, its metadata, its
//! gist state record ([`codec`]) and its raw text (compressed; re-index jobs need it).
//!
//! The three live in three trees under the document id and change together in one sled
//! transaction, flushed before `put` returns: a crash leaves a document at its old or its
//! new version, never a mix. Metadata and text records carry a format version and a CRC32
//! like state records do, so a damaged record is a clear error for that document while the
//! others stay readable.

pub mod codec;

use crate::model::GistModel;
use crate::segment::SegmentConfig;
use crate::state::GistState;
use anyhow::{bail, Context};
use codec::Precision;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Format version of metadata and text records.
pub const RECORD_VERSION: u16 = 1;

/// What is known about a stored document without decoding its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocMeta {
    pub id: String,
    /// Caller's version of the document (a later version replaces an earlier one).
    pub version: u64,
    /// Regular tokens, BOS included.
    pub tokens: u64,
    pub sentences: u64,
    pub gist_tokens: u64,
    /// Model fingerprint, hex (states only resume under the same model).
    pub fingerprint: String,
    pub num_gists: usize,
    pub segmentation: SegmentConfig,
    pub precision: Precision,
    pub state_bytes: u64,
    pub text_bytes: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
}

/// A sealed record: version, CRC32 of the payload, payload.
fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 6);
    out.extend_from_slice(&RECORD_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn unseal<'a>(bytes: &'a [u8], what: &str, id: &str) -> anyhow::Result<&'a [u8]> {
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The document store.
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    states: sled::Tree,
    texts: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`. sled allows one process at a time.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = sled::open(dir).with_context(|| {
            format!(
                "opening the store {} (is another giststream process using it?)",
                dir.display()
            )
        })?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            states: db.open_tree("states")?,
            texts: db.open_tree("texts")?,
            db,
        })
    }

    /// Stores (or replaces) a document: metadata, state and text in one transaction,
    /// durable when this returns.
    pub fn put(
        &self,
        id: &str,
        version: u64,
        model: &GistModel,
        state: &GistState,
        text: &str,
        precision: Precision,
    ) -> anyhow::Result<DocMeta> {
        use sled::transaction::{ConflictableTransactionError, Transactional};
        if id.is_empty() {
            bail!("a document id cannot be empty");
        }
        let record = codec::encode(state, precision)?;
        let text_record = seal(&lz4_flex::compress_prepend_size(text.as_bytes()));
        let created = self
            .meta(id)
            .ok()
            .flatten()
            .map_or_else(now_ms, |m| m.created_unix_ms);
        let meta = DocMeta {
            id: id.to_string(),
            version,
            tokens: state.regular_tokens,
            sentences: state.sentences,
            gist_tokens: state.gist_tokens,
            fingerprint: format!("{:016x}", state.fingerprint),
            num_gists: model.gist.num_gist_tokens,
            segmentation: model.gist.segmentation.clone(),
            precision,
            state_bytes: record.len() as u64,
            text_bytes: text.len() as u64,
            created_unix_ms: created,
            updated_unix_ms: now_ms(),
        };
        let meta_record = seal(&serde_json::to_vec(&meta)?);
        (&self.meta, &self.states, &self.texts)
            .transaction(|(m, s, t)| {
                m.insert(id.as_bytes(), meta_record.as_slice())?;
                s.insert(id.as_bytes(), record.as_slice())?;
                t.insert(id.as_bytes(), text_record.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("storing document {id:?}: {e:?}"))?;
        self.db.flush().context("flushing the store")?;
        Ok(meta)
    }

    /// Metadata of a document, if stored.
    pub fn meta(&self, id: &str) -> anyhow::Result<Option<DocMeta>> {
        let Some(bytes) = self.meta.get(id.as_bytes())? else {
            return Ok(None);
        };
        let payload = unseal(&bytes, "metadata", id)?;
        Ok(Some(serde_json::from_slice(payload).with_context(
            || format!("reading the metadata of {id:?}"),
        )?))
    }

    /// The state of a document, checked against `model` (fingerprint) and its record
    /// (format, checksum).
    pub fn load(&self, id: &str, model: &GistModel) -> anyhow::Result<(DocMeta, GistState)> {
        let meta = self
            .meta(id)?
            .with_context(|| format!("no document {id:?} in the store"))?;
        let bytes = self
            .states
            .get(id.as_bytes())?
            .with_context(|| format!("document {id:?} has metadata but no state"))?;
        let state = codec::decode(&bytes, model.llama.device(), model.llama.dtype())
            .with_context(|| format!("reading the state of {id:?}"))?;
        if state.fingerprint != model.fingerprint {
            bail!(
                "document {id:?} was compressed by another model (fingerprint {:016x}); this model is {:016x}: re-index it",
                state.fingerprint,
                model.fingerprint
            );
        }
        Ok((meta, state))
    }

    /// The raw text of a document.
    pub fn text(&self, id: &str) -> anyhow::Result<String> {
        let bytes = self
            .texts
            .get(id.as_bytes())?
            .with_context(|| format!("no text stored for {id:?}"))?;
        let payload = unseal(&bytes, "text", id)?;
        let raw = lz4_flex::decompress_size_prepended(payload)
            .with_context(|| format!("decompressing the text of {id:?}"))?;
        String::from_utf8(raw).with_context(|| format!("the text of {id:?} is not UTF-8"))
    }

    /// Every document's metadata, in id order. A damaged record is reported as an error
    /// entry, not a failure of the whole listing.
    pub fn list(&self) -> Vec<Result<DocMeta, String>> {
        self.meta
            .iter()
            .map(|kv| {
                let (k, _) = kv.map_err(|e| e.to_string())?;
                let id = String::from_utf8_lossy(&k).into_owned();
                match self.meta(&id) {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err(format!("{id}: vanished")),
                    Err(e) => Err(format!("{id}: {e:#}")),
                }
            })
            .collect()
    }

    /// Raw access for tests and repair tools: (tree name, id) -> bytes.
    pub fn raw(&self, tree: &str, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.tree(tree)?.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    fn tree(&self, name: &str) -> anyhow::Result<&sled::Tree> {
        Ok(match name {
            "meta" => &self.meta,
            "states" => &self.states,
            "texts" => &self.texts,
            _ => bail!("no tree {name:?} (meta, states, texts)"),
        })
    }

    /// Overwrites a raw record (tests use it to damage one).
    pub fn put_raw(&self, tree: &str, id: &str, bytes: &[u8]) -> anyhow::Result<()> {
        self.tree(tree)?.insert(id.as_bytes(), bytes)?;
        self.db.flush()?;
        Ok(())
    }
}
