//! Persistence of gist states: a sled database holding, per document, its metadata, its
//! gist state ([`codec`] chunks) and its raw text (compressed; re-index jobs need it).
//!
//! Trees and keys:
//! - `meta`: id → sealed JSON [`DocMeta`];
//! - `states`: id ∘ 0xFF ∘ chunk (u32 BE) → codec chunk;
//! - `texts`: id ∘ 0xFF ∘ part (u32 BE) → sealed lz4 text of that part.
//!
//! (0xFF never occurs in UTF-8, so no id's keys run into another's.) A document that
//! arrives in parts gets a state chunk and a text record per part: appending never
//! rewrites what is stored. Every change of a document (a new version, or one more part)
//! is one sled transaction over the three trees, flushed before it returns: a crash leaves
//! the document at its old or its new state, never a mix. Metadata and text records carry
//! a format version and a CRC32 like state chunks do, so a damaged record is a clear error
//! for that document while the others stay readable.

pub mod codec;
pub mod parts;
pub mod records;
pub mod salvage;
mod sled_snapshot;

use records::{chunk_key, seal, unseal};
pub use records::{
    parse_meta, DocMeta, PartAction, RecordRef, SourceOffset, StoreError, Update, RECORD_VERSION,
};

use crate::engine::state::GistState;
use crate::model::GistModel;
use crate::text::encoder::Carry;
use anyhow::{bail, Context};
use codec::Precision;

use std::path::Path;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The sizes of a deleted document's records, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub meta: usize,
    pub states: Vec<usize>,
    pub texts: Vec<usize>,
}

/// The document store.
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    states: sled::Tree,
    texts: sled::Tree,
    /// The previous generation of re-indexed documents (metadata and state chunks, same
    /// keys), kept until the job completes.
    old_meta: sled::Tree,
    old_states: sled::Tree,
    /// Re-index jobs: id → JSON progress.
    jobs: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`. sled allows one process at a time.
    /// Opens the store in `dir` for reading what is there: a folder that does not exist is
    /// an error (opening it would create it, and an empty store in it, from a typo).
    pub fn open_existing(dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(
            dir.is_dir(),
            "no store at {}: the folder does not exist (a store is created by compress \
             --store, serve or restore)",
            dir.display()
        );
        Self::open(dir)
    }

    /// Opens the store in `dir`, creating it if there is none.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let db = sled_snapshot::open(dir).map_err(|e| {
            let why = match &e {
                sled::Error::Corruption { .. } => format!(
                    "the store {} is damaged: `giststream store verify {0}` says more, \
                     `giststream store salvage {0} NEW` copies every intact document into a \
                     new store, and `giststream restore` rebuilds it from a state topic",
                    dir.display()
                ),
                sled::Error::Io(io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    format!(
                        "opening the store {} (is another giststream process using it?)",
                        dir.display()
                    )
                }
                _ => format!("opening the store {}", dir.display()),
            };
            anyhow::Error::new(e).context(why)
        })?;
        Ok(Self {
            meta: db.open_tree("meta")?,
            states: db.open_tree("states")?,
            texts: db.open_tree("texts")?,
            old_meta: db.open_tree("old_meta")?,
            old_states: db.open_tree("old_states")?,
            jobs: db.open_tree("jobs")?,
            db,
        })
    }

    /// Stores a whole document as version `version` (one part, complete), replacing
    /// whatever is stored under its id, whatever its version: an explicit overwrite, unlike
    /// [`Store::apply`], which keeps versions and parts in order.
    pub fn put(
        &self,
        id: &str,
        version: u64,
        model: &GistModel,
        state: &GistState,
        text: &str,
        precision: Precision,
    ) -> anyhow::Result<DocMeta> {
        let meta = self.write(
            model,
            true,
            &Update {
                id,
                version,
                part: 0,
                last: true,
                text,
                state,
                carry: Carry::default(),
                precision,
                source: None,
                attributes: Default::default(),
            },
        )?;
        self.flush()?;
        Ok(meta)
    }

    /// Stores one part of a document in one durable transaction: part 0 of a version
    /// replaces whatever was stored, a later part appends a state chunk and a text record.
    /// Refuses an update that [`PartAction::plan`] would not apply (checked inside the
    /// transaction, so two writers cannot interleave parts).
    pub fn apply(&self, model: &GistModel, u: &Update<'_>) -> anyhow::Result<DocMeta> {
        let meta = self.write(model, false, u)?;
        self.flush()?;
        Ok(meta)
    }

    /// [`Store::apply`] without the flush: atomic, but durable only after the next
    /// [`Store::flush`]. A batch of updates pays for one flush, and is acknowledged after it.
    pub fn apply_deferred(&self, model: &GistModel, u: &Update<'_>) -> anyhow::Result<DocMeta> {
        self.write(model, false, u)
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush().context("flushing the store")?;
        Ok(())
    }

    /// `apply` (not flushed), or with `overwrite` a replacement by a whole document.
    fn write(&self, model: &GistModel, overwrite: bool, u: &Update<'_>) -> anyhow::Result<DocMeta> {
        use sled::transaction::{abort, ConflictableTransactionError, Transactional};
        let id = u.id;
        if id.is_empty() {
            bail!("a document id cannot be empty");
        }
        let stored_bytes = self.meta.get(id.as_bytes())?;
        let stored = match &stored_bytes {
            Some(b) => Some(parse_meta(b, id)?),
            None => None,
        };
        match PartAction::plan(stored.as_ref(), u.version, u.part) {
            _ if overwrite && u.part == 0 => {}
            PartAction::Apply => {}
            other => bail!(
                "document {id:?} version {} part {}: not applicable ({other:?})",
                u.version,
                u.part
            ),
        }
        let base = stored.as_ref().filter(|_| u.part > 0);
        // A part's chunk starts at the first row it may have changed.
        let (first_row, chunk, precision) = match base {
            Some(m) => {
                let Some(stable) = m.state_rows.checked_sub(m.state_open_rows) else {
                    bail!(
                        "document {id:?}: its metadata says {} of its {} state rows are open",
                        m.state_open_rows,
                        m.state_rows
                    );
                };
                (stable as usize, m.state_chunks, m.precision)
            }
            None => (0, 0, u.precision),
        };
        let rows = u.state.kv_len();
        if rows < first_row {
            bail!("document {id:?}: the new state ({rows} rows) is shorter than the stored one ({first_row} rows)");
        }
        // A part that closed no sentence changes the carry only.
        let record = (chunk == 0 || base.is_some_and(|m| m.sentences != u.state.sentences))
            .then(|| codec::encode_rows(u.state, precision, first_row))
            .transpose()?;
        let text_record = seal(&lz4_flex::compress_prepend_size(u.text.as_bytes()));
        let now = now_ms();
        let meta = DocMeta {
            id: id.to_string(),
            version: u.version,
            parts: u.part + 1,
            complete: u.last,
            tokens: u.state.regular_tokens,
            sentences: u.state.sentences,
            gist_tokens: u.state.gist_tokens,
            fingerprint: format!("{:016x}", u.state.fingerprint),
            num_gists: model.gist.num_gist_tokens,
            segmentation: model.gist.segmentation.clone(),
            precision,
            state_rows: rows as u64,
            state_open_rows: open_rows(model, u.state),
            state_chunks: chunk + u32::from(record.is_some()),
            state_bytes: base.map_or(0, |m| m.state_bytes)
                + record.as_ref().map_or(0, |r| r.len() as u64),
            text_bytes: base.map_or(0, |m| m.text_bytes) + u.text.len() as u64,
            carry: if u.last {
                Carry::default()
            } else {
                u.carry.clone()
            },
            source: u.source.clone(),
            attributes: if u.part == 0 {
                u.attributes.clone()
            } else {
                base.map(|m| m.attributes.clone()).unwrap_or_default()
            },
            created_unix_ms: stored.as_ref().map_or(now, |m| m.created_unix_ms),
            updated_unix_ms: now,
            state_records: base
                .map(|m| m.state_records.clone())
                .unwrap_or_default()
                .into_iter()
                .chain(record.as_deref().map(RecordRef::of_state))
                .collect(),
            text_records: base
                .map(|m| m.text_records.clone())
                .unwrap_or_default()
                .into_iter()
                .chain([RecordRef::of_sealed(&text_record)])
                .collect(),
        };
        let meta_record = seal(&serde_json::to_vec(&meta)?);
        // A replacement drops every chunk and part of the old version.
        let (old_chunks, old_parts) = match (&stored, base) {
            (Some(m), None) => (m.state_chunks, m.parts),
            _ => (0, 0),
        };
        (&self.meta, &self.states, &self.texts)
            .transaction(|(m, s, t)| {
                if m.get(id.as_bytes())?.as_deref() != stored_bytes.as_deref() {
                    return abort("changed by another writer meanwhile");
                }
                for n in 0..old_chunks {
                    s.remove(chunk_key(id, n))?;
                }
                for n in 0..old_parts {
                    t.remove(chunk_key(id, n))?;
                }
                m.insert(id.as_bytes(), meta_record.as_slice())?;
                if let Some(r) = &record {
                    s.insert(chunk_key(id, chunk), r.as_slice())?;
                }
                t.insert(chunk_key(id, u.part), text_record.as_slice())?;
                Ok::<(), ConflictableTransactionError<&str>>(())
            })
            .map_err(|e| anyhow::anyhow!("storing document {id:?}: {e:?}"))?;
        Ok(meta)
    }

    /// Metadata of a document, if stored.
    pub fn meta(&self, id: &str) -> anyhow::Result<Option<DocMeta>> {
        let Some(bytes) = self.meta.get(id.as_bytes())? else {
            return Ok(None);
        };
        Ok(Some(parse_meta(&bytes, id)?))
    }

    /// The state of a document, checked against `model` (fingerprint) and its records
    /// (format, checksums, chunk order).
    pub fn load(&self, id: &str, model: &GistModel) -> anyhow::Result<(DocMeta, GistState)> {
        // A consistent snapshot: metadata and chunks read, then the metadata read again.
        // Every change of a document rewrites its metadata, so an unchanged record means
        // no writer (an append, a switch) came between; otherwise read again.
        let (meta, chunks) = loop {
            let before = self
                .meta
                .get(id.as_bytes())?
                .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
            let meta = parse_meta(&before, id)?;
            let chunks = (0..meta.state_chunks)
                .map(|n| {
                    self.states
                        .get(chunk_key(id, n))
                        .with_context(|| format!("reading state chunk {n} of {id:?}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if self.meta.get(id.as_bytes())?.as_deref() != Some(&*before) {
                continue;
            }
            let chunks = chunks
                .into_iter()
                .enumerate()
                .map(|(n, c)| c.with_context(|| format!("document {id:?} lacks state chunk {n}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            break (meta, chunks);
        };
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
        let state = codec::decode_chunks(&refs, model.llama.device(), model.llama.dtype())
            .with_context(|| format!("reading the state of {id:?}"))?;
        if state.fingerprint != model.fingerprint {
            return Err(StoreError::OtherModel {
                id: id.to_string(),
                stored: format!("{:016x}", state.fingerprint),
                model: format!("{:016x}", model.fingerprint),
            }
            .into());
        }
        Ok((meta, state))
    }

    /// Checks every state chunk of a document (format, checksum) without decoding it.
    pub fn check(&self, id: &str) -> anyhow::Result<DocMeta> {
        let meta = self
            .meta(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        for n in 0..meta.state_chunks {
            let bytes = self
                .states
                .get(chunk_key(id, n))?
                .with_context(|| format!("document {id:?} lacks state chunk {n}"))?;
            codec::check(&bytes)
                .with_context(|| format!("checking chunk {n} of the state of {id:?}"))?;
        }
        Ok(meta)
    }

    /// The raw text of a document (its parts, joined).
    pub fn text(&self, id: &str) -> anyhow::Result<String> {
        let meta = self
            .meta(id)?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let mut raw = Vec::with_capacity(meta.text_bytes as usize);
        for n in 0..meta.parts {
            let bytes = self
                .texts
                .get(chunk_key(id, n))?
                .with_context(|| format!("no text stored for part {n} of {id:?}"))?;
            let payload = unseal(&bytes, "text", id)?;
            raw.extend(
                lz4_flex::decompress_size_prepended(payload)
                    .with_context(|| format!("decompressing the text of {id:?}"))?,
            );
        }
        String::from_utf8(raw).with_context(|| format!("the text of {id:?} is not UTF-8"))
    }

    /// Every document id, in order (an id that is not UTF-8 is an error entry).
    pub fn ids(&self) -> impl Iterator<Item = anyhow::Result<String>> + '_ {
        self.meta.iter().map(|kv| {
            let (k, _) = kv.context("reading the store's metadata tree")?;
            String::from_utf8(k.to_vec()).map_err(|e| {
                anyhow::anyhow!(
                    "a document id is not UTF-8: {:?}",
                    e.as_bytes().escape_ascii().to_string()
                )
            })
        })
    }

    /// A document's raw records: metadata, then as many state chunks and text parts as
    /// are stored under its id, in order (unchecked: see [`salvage::check_records`]).
    pub fn records(&self, id: &str) -> anyhow::Result<salvage::DocRecords> {
        let meta = self
            .meta
            .get(id.as_bytes())
            .with_context(|| format!("reading the metadata of {id:?}"))?
            .ok_or_else(|| StoreError::NotFound(id.to_string()))?
            .to_vec();
        let run = |tree: &sled::Tree, what: &str| -> anyhow::Result<Vec<Vec<u8>>> {
            tree.scan_prefix(records::doc_prefix(id))
                .map(|kv| {
                    Ok(kv
                        .with_context(|| format!("reading the {what} of {id:?}"))?
                        .1
                        .to_vec())
                })
                .collect()
        };
        Ok(salvage::DocRecords {
            meta,
            states: run(&self.states, "state chunks")?,
            texts: run(&self.texts, "text parts")?,
        })
    }

    /// Documents stored.
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
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

    /// Writes a document from its raw records (a restore from the state topic): metadata,
    /// state chunks and text parts, each checked first, replacing whatever is stored
    /// under `id`, in one durable transaction.
    pub fn put_records(
        &self,
        id: &str,
        meta: &[u8],
        chunks: &[&[u8]],
        texts: &[&[u8]],
    ) -> anyhow::Result<()> {
        use sled::transaction::{ConflictableTransactionError, Transactional};
        let m = parse_meta(meta, id)?;
        if m.id != id || m.state_chunks as usize != chunks.len() || m.parts as usize != texts.len()
        {
            bail!("document {id:?}: the records do not match its metadata");
        }
        for (n, c) in chunks.iter().enumerate() {
            codec::check(c).with_context(|| format!("document {id:?}: state chunk {n}"))?;
        }
        for t in texts {
            unseal(t, "text", id)?;
        }
        let old = self.meta(id).ok().flatten();
        let (old_chunks, old_parts) = old.map_or((0, 0), |o| (o.state_chunks, o.parts));
        (&self.meta, &self.states, &self.texts)
            .transaction(|(mt, st, tt)| {
                for n in 0..old_chunks {
                    st.remove(chunk_key(id, n))?;
                }
                for n in 0..old_parts {
                    tt.remove(chunk_key(id, n))?;
                }
                mt.insert(id.as_bytes(), meta)?;
                for (n, c) in chunks.iter().enumerate() {
                    st.insert(chunk_key(id, n as u32), *c)?;
                }
                for (n, t) in texts.iter().enumerate() {
                    tt.insert(chunk_key(id, n as u32), *t)?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("storing document {id:?}: {e:?}"))?;
        self.db.flush().context("flushing the store")?;
        Ok(())
    }

    /// Deletes document `id` (metadata, state chunks, text parts, and any copy a re-index
    /// job keeps in the old generation) in one durable transaction. Returns the sizes of
    /// the records removed (for the state topic's tombstones), or None if there was no
    /// such document.
    pub fn delete(&self, id: &str) -> anyhow::Result<Option<Deleted>> {
        use sled::transaction::{ConflictableTransactionError, Transactional};
        let Some(meta) = self.meta.get(id.as_bytes())? else {
            return Ok(None);
        };
        // Counts from the metadata when it parses; a damaged one still goes, with every
        // chunk and part its prefix holds.
        let (chunks, parts) = match parse_meta(&meta, id) {
            Ok(m) => (m.state_chunks, m.parts),
            Err(_) => (
                self.states.scan_prefix(records::doc_prefix(id)).count() as u32,
                self.texts.scan_prefix(records::doc_prefix(id)).count() as u32,
            ),
        };
        let size = |t: &sled::Tree, n: u32| -> anyhow::Result<usize> {
            Ok(t.get(chunk_key(id, n))?.map_or(0, |v| v.len()))
        };
        let deleted = Deleted {
            meta: meta.len(),
            states: (0..chunks)
                .map(|n| size(&self.states, n))
                .collect::<anyhow::Result<_>>()?,
            texts: (0..parts)
                .map(|n| size(&self.texts, n))
                .collect::<anyhow::Result<_>>()?,
        };
        let old_chunks = self.old_states.scan_prefix(records::doc_prefix(id)).count() as u32;
        (
            &self.meta,
            &self.states,
            &self.texts,
            &self.old_meta,
            &self.old_states,
        )
            .transaction(|(mt, st, tt, omt, ost)| {
                mt.remove(id.as_bytes())?;
                omt.remove(id.as_bytes())?;
                for n in 0..chunks {
                    st.remove(chunk_key(id, n))?;
                }
                for n in 0..parts {
                    tt.remove(chunk_key(id, n))?;
                }
                for n in 0..old_chunks {
                    ost.remove(chunk_key(id, n))?;
                }
                Ok::<(), ConflictableTransactionError<()>>(())
            })
            .map_err(|e| anyhow::anyhow!("deleting document {id:?}: {e:?}"))?;
        self.flush()?;
        Ok(Some(deleted))
    }

    /// The metadata record of `id` as stored (for compare-and-swap).
    pub fn meta_bytes(&self, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.meta.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Replaces the state of a complete document by `state` (made by `model`, at
    /// `precision`), keeping its text, version and parts: the switch of a re-index job. Atomic, and only if the
    /// metadata is still `expected` (else Ok(None): the document changed meanwhile). The
    /// replaced metadata and chunks move to the old generation, unless it already holds
    /// this document (the oldest generation is the one kept). Not flushed.
    pub fn switch(
        &self,
        id: &str,
        expected: &[u8],
        model: &GistModel,
        state: &GistState,
        precision: Precision,
    ) -> anyhow::Result<Option<DocMeta>> {
        use sled::transaction::{ConflictableTransactionError, Transactional};
        let old = parse_meta(expected, id)?;
        let record = codec::encode(state, precision)?;
        let meta = DocMeta {
            tokens: state.regular_tokens,
            sentences: state.sentences,
            gist_tokens: state.gist_tokens,
            fingerprint: format!("{:016x}", state.fingerprint),
            num_gists: model.gist.num_gist_tokens,
            segmentation: model.gist.segmentation.clone(),
            precision,
            state_rows: state.kv_len() as u64,
            state_open_rows: open_rows(model, state),
            state_chunks: 1,
            state_bytes: record.len() as u64,
            updated_unix_ms: now_ms(),
            state_records: vec![RecordRef::of_state(&record)],
            ..old.clone()
        };
        let meta_record = seal(&serde_json::to_vec(&meta)?);
        let switched = (&self.meta, &self.states, &self.old_meta, &self.old_states)
            .transaction(|(m, s, om, os)| {
                if m.get(id.as_bytes())?.as_deref() != Some(expected) {
                    return Ok(false);
                }
                let archive = om.get(id.as_bytes())?.is_none();
                if archive {
                    om.insert(id.as_bytes(), expected)?;
                }
                for n in 0..old.state_chunks {
                    let k = chunk_key(id, n);
                    if let Some(v) = s.remove(k.clone())? {
                        if archive {
                            os.insert(k, v)?;
                        }
                    }
                }
                s.insert(chunk_key(id, 0), record.as_slice())?;
                m.insert(id.as_bytes(), meta_record.as_slice())?;
                Ok::<bool, ConflictableTransactionError<()>>(true)
            })
            .map_err(|e| anyhow::anyhow!("switching document {id:?}: {e:?}"))?;
        Ok(switched.then_some(meta))
    }

    /// Documents in the old generation.
    pub fn old_generation_len(&self) -> usize {
        self.old_meta.len()
    }

    /// Drops the old generation (a re-index job completed). Durable when it returns.
    pub fn drop_old_generation(&self) -> anyhow::Result<()> {
        self.old_meta.clear()?;
        self.old_states.clear()?;
        self.flush()
    }

    /// Saves a job's progress record (JSON), durably.
    pub fn put_job(&self, id: &str, progress: &serde_json::Value) -> anyhow::Result<()> {
        self.jobs
            .insert(id.as_bytes(), serde_json::to_vec(progress)?)?;
        self.flush()
    }

    /// One job's progress record.
    pub fn job(&self, id: &str) -> anyhow::Result<Option<serde_json::Value>> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Every job's progress record, in id order.
    pub fn jobs(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        self.jobs
            .iter()
            .map(|kv| Ok(serde_json::from_slice(&kv?.1)?))
            .collect()
    }

    /// Raw access for tests and repair tools: record `n` (chunk or part; ignored for
    /// `meta`) of document `id` in tree `tree`.
    pub fn raw(&self, tree: &str, id: &str, n: u32) -> anyhow::Result<Option<Vec<u8>>> {
        let (tree, key) = self.key(tree, id, n)?;
        Ok(tree.get(key)?.map(|v| v.to_vec()))
    }

    fn key(&self, name: &str, id: &str, n: u32) -> anyhow::Result<(&sled::Tree, Vec<u8>)> {
        Ok(match name {
            "meta" => (&self.meta, id.as_bytes().to_vec()),
            "states" => (&self.states, chunk_key(id, n)),
            "texts" => (&self.texts, chunk_key(id, n)),
            _ => bail!("no tree {name:?} (meta, states, texts)"),
        })
    }

    /// Overwrites a raw record (tests use it to damage one).
    pub fn put_raw(&self, tree: &str, id: &str, n: u32, bytes: &[u8]) -> anyhow::Result<()> {
        let (tree, key) = self.key(tree, id, n)?;
        tree.insert(key, bytes)?;
        self.db.flush()?;
        Ok(())
    }
}

/// Rows at the end of `state` that the next part may rewrite: the last sentence's window
/// and its gists (see [`DocMeta::state_open_rows`]).
fn open_rows(model: &GistModel, state: &GistState) -> u64 {
    if state.window > 0 {
        (state.window + model.gist.num_gist_tokens) as u64
    } else {
        0
    }
}
