//! When a store is damaged: [`verify`] names every damaged document and the record that is
//! wrong; [`salvage`] copies every intact document into a new store.
//!
//! Two kinds of damage, two ways to read what is left:
//! - **A record is wrong but sled opens the store** (a value damaged before it was written,
//!   a missing part): every record of every document is checked (metadata seal, each state
//!   chunk's format and CRC32, each text part's seal, lz4 and UTF-8, and the checksums the
//!   metadata lists), and the documents that pass are copied record for record.
//! - **sled cannot open the store** (a flipped byte in its log, a truncated snapshot):
//!   sled's files are scanned as raw bytes. Metadata records are found by their shape
//!   (version, CRC32, then `{"id":`) and checked; each one lists the CRC32 and length of
//!   its state chunks and text parts, which are then found by that checksum and checked in
//!   turn. Of the versions of a document's metadata found (sled keeps superseded copies
//!   until it reuses the space), the newest whose records are all intact is copied.
//!
//! The damaged store is never written: sled only ever opens a copy of it. (When its
//! recovery fails, sled zeroes its log after the damaged message in the files it was
//! given, which destroys what was written after it: a store opened by any other command
//! after the damage has lost that part, which only `restore` from the state topic brings
//! back.)

use super::codec;
use super::records::{parse_meta, unseal, DocMeta, RecordRef, RECORD_VERSION};
use super::Store;
use anyhow::Context;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// One damaged document and what is wrong with it.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    pub id: String,
    pub problem: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub documents: usize,
    pub intact: usize,
    pub damaged: Vec<Damage>,
}

/// A document's raw records, as stored.
pub struct DocRecords {
    pub meta: Vec<u8>,
    pub states: Vec<Vec<u8>>,
    pub texts: Vec<Vec<u8>>,
}

/// Checks every record of one document; the metadata when all are intact.
pub fn check_records(id: &str, r: &DocRecords) -> anyhow::Result<DocMeta> {
    let meta = parse_meta(&r.meta, id)?;
    anyhow::ensure!(
        meta.id == id,
        "the metadata stored under {id:?} is document {:?}'s",
        meta.id
    );
    anyhow::ensure!(
        r.states.len() == meta.state_chunks as usize,
        "{} of {} state chunks are there",
        r.states.len(),
        meta.state_chunks
    );
    anyhow::ensure!(
        r.texts.len() == meta.parts as usize,
        "{} of {} text parts are there",
        r.texts.len(),
        meta.parts
    );
    for (n, c) in r.states.iter().enumerate() {
        codec::check(c).with_context(|| format!("state chunk {n}"))?;
        if let Some(want) = meta.state_records.get(n) {
            anyhow::ensure!(
                RecordRef::of_state(c) == *want,
                "state chunk {n} is not the one its metadata lists"
            );
        }
    }
    for (n, t) in r.texts.iter().enumerate() {
        let payload = unseal(t, &format!("text part {n}"), id)?;
        let raw = lz4_flex::decompress_size_prepended(payload)
            .with_context(|| format!("decompressing text part {n}"))?;
        std::str::from_utf8(&raw).with_context(|| format!("text part {n} is not UTF-8"))?;
        if let Some(want) = meta.text_records.get(n) {
            anyhow::ensure!(
                RecordRef::of_sealed(t) == *want,
                "text part {n} is not the one its metadata lists"
            );
        }
    }
    Ok(meta)
}

/// Checks every document of the store in `dir`. An error means sled itself cannot open it.
/// The store is not written: sled opens a copy (when recovery fails, sled writes to the
/// files it was given).
pub fn verify(dir: &Path) -> anyhow::Result<VerifyReport> {
    anyhow::ensure!(dir.is_dir(), "no store at {}", dir.display());
    let scratch = tempfile::tempdir().context("a scratch folder for the copy")?;
    let copy = scratch.path().join("store");
    copy_dir(dir, &copy)?;
    let store = Store::open(&copy).map_err(|e| {
        let cause = e.root_cause().to_string();
        anyhow::anyhow!(
            "the store {} is damaged: sled cannot open it ({cause}); `giststream store \
             salvage {} NEW` copies every intact document into a new store",
            dir.display(),
            dir.display()
        )
    })?;
    let mut report = VerifyReport {
        documents: 0,
        intact: 0,
        damaged: Vec::new(),
    };
    for id in store.ids() {
        report.documents += 1;
        let id = match id {
            Ok(id) => id,
            Err(e) => {
                report.damaged.push(Damage {
                    id: String::new(),
                    problem: format!("{e:#}"),
                });
                continue;
            }
        };
        match store.records(&id).and_then(|r| check_records(&id, &r)) {
            Ok(_) => report.intact += 1,
            Err(e) => report.damaged.push(Damage {
                id,
                problem: format!("{e:#}"),
            }),
        }
    }
    Ok(report)
}

/// What [`salvage`] did.
#[derive(Debug, Clone, Serialize)]
pub struct SalvageReport {
    /// `store` (sled opened the damaged store) or `raw scan` (it could not).
    pub method: String,
    /// Why sled could not open it, for a raw scan.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sled_error: Option<String>,
    pub recovered: Vec<String>,
    /// Documents recovered that may be older than they were: the newest metadata found
    /// had records that were not intact, or a damaged metadata record of the document
    /// was found too (it may have been the newest). The state topic has the newest.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub doubtful: Vec<Damage>,
    pub lost: Vec<Damage>,
}

/// Copies every intact document of the store in `dir` into a new store at `out` (which
/// must not exist or be empty). `dir` is only read.
pub fn salvage(dir: &Path, out: &Path) -> anyhow::Result<SalvageReport> {
    anyhow::ensure!(dir.is_dir(), "no store at {}", dir.display());
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_none();
        anyhow::ensure!(
            empty,
            "{} exists and is not empty: salvage writes a new store",
            out.display()
        );
    }
    // sled may write while it opens (recovery): it opens a copy, never the damaged store.
    let scratch = tempfile::tempdir().context("a scratch folder for the copy")?;
    let copy = scratch.path().join("store");
    copy_dir(dir, &copy)?;
    let target = Store::open(out)?;
    let mut report = SalvageReport {
        method: "store".into(),
        sled_error: None,
        recovered: Vec::new(),
        doubtful: Vec::new(),
        lost: Vec::new(),
    };
    match super::sled_snapshot::open(&copy) {
        Ok(db) => {
            drop(db);
            let store = Store::open(&copy)?;
            for id in store.ids() {
                let id = match id {
                    Ok(id) => id,
                    Err(e) => {
                        report.lost.push(Damage {
                            id: String::new(),
                            problem: format!("{e:#}"),
                        });
                        continue;
                    }
                };
                let copied = store.records(&id).and_then(|r| {
                    check_records(&id, &r)?;
                    put(&target, &id, &r)
                });
                match copied {
                    Ok(()) => report.recovered.push(id),
                    Err(e) => report.lost.push(Damage {
                        id,
                        problem: format!("{e:#}"),
                    }),
                }
            }
        }
        Err(e) => {
            report.method = "raw scan".into();
            report.sled_error = Some(e.to_string());
            // sled's failed recovery wrote to the copy (it zeroes its log after the
            // damaged message): the scan reads the damaged store itself, untouched.
            let scanned = raw_scan(dir, &target)?;
            report.recovered = scanned.recovered;
            report.doubtful = scanned.doubtful;
            report.lost = scanned.lost;
        }
    }
    target.flush()?;
    Ok(report)
}

fn put(target: &Store, id: &str, r: &DocRecords) -> anyhow::Result<()> {
    let states: Vec<&[u8]> = r.states.iter().map(Vec::as_slice).collect();
    let texts: Vec<&[u8]> = r.texts.iter().map(Vec::as_slice).collect();
    target.put_records(id, &r.meta, &states, &texts)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Every regular file under `dir` (sled's log, blobs, snapshots).
fn files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            out.extend(files(&entry.path())?);
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// A metadata record found in raw bytes: the sealed record and what it says.
struct Found {
    sealed: Vec<u8>,
    meta: DocMeta,
}

/// The metadata records in `bytes`: a version, a CRC32, then JSON that starts `{"id":`
/// and whose checksum matches. The ids of records of that shape that fail the checks go
/// to `damaged`.
fn find_metas(bytes: &[u8], out: &mut Vec<Found>, damaged: &mut HashSet<String>) {
    const START: &[u8] = b"{\"id\":";
    let mut at = 0;
    while let Some(k) = find(&bytes[at..], START) {
        let j = at + k;
        at = j + 1;
        if j < 6 || bytes[j - 6..j - 4] != RECORD_VERSION.to_le_bytes() {
            continue;
        }
        let crc = u32::from_le_bytes(bytes[j - 4..j].try_into().expect("4 bytes"));
        let mut damaged_id = || {
            let mut id = serde_json::Deserializer::from_slice(&bytes[j + START.len()..])
                .into_iter::<String>();
            if let Some(Ok(id)) = id.next() {
                damaged.insert(id);
            }
        };
        let mut values =
            serde_json::Deserializer::from_slice(&bytes[j..]).into_iter::<serde::de::IgnoredAny>();
        if !matches!(values.next(), Some(Ok(_))) {
            damaged_id();
            continue;
        }
        let end = j + values.byte_offset();
        if crc32fast::hash(&bytes[j..end]) != crc {
            damaged_id();
            continue;
        }
        let sealed = bytes[j - 6..end].to_vec();
        if let Ok(meta) = serde_json::from_slice::<DocMeta>(&bytes[j..end]) {
            out.push(Found { sealed, meta });
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Kinds of record a metadata record lists.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    State,
    Text,
}

/// What a raw scan recovered (see [`SalvageReport`]).
struct Scanned {
    recovered: Vec<String>,
    doubtful: Vec<Damage>,
    lost: Vec<Damage>,
}

/// Salvage by scanning sled's files: documents written to `target`; lost ones with why.
fn raw_scan(dir: &Path, target: &Store) -> anyhow::Result<Scanned> {
    let paths = files(dir)?;
    let (mut found, mut damaged_ids) = (Vec::new(), HashSet::new());
    for p in &paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        find_metas(&bytes, &mut found, &mut damaged_ids);
    }
    // Newest first, per document.
    let mut by_id: BTreeMap<String, Vec<Found>> = BTreeMap::new();
    for f in found {
        by_id.entry(f.meta.id.clone()).or_default().push(f);
    }
    for versions in by_id.values_mut() {
        versions.sort_by_key(|f| {
            std::cmp::Reverse((f.meta.updated_unix_ms, f.meta.version, f.meta.parts))
        });
        versions.dedup_by(|a, b| a.sealed == b.sealed);
    }
    // Every record any version lists, found by its checksum.
    let mut wanted: HashMap<u32, Vec<(Kind, u64)>> = HashMap::new();
    for f in by_id.values().flatten() {
        for r in &f.meta.state_records {
            wanted
                .entry(r.crc32)
                .or_default()
                .push((Kind::State, r.bytes));
        }
        for r in &f.meta.text_records {
            wanted
                .entry(r.crc32)
                .or_default()
                .push((Kind::Text, r.bytes));
        }
    }
    let mut records: HashMap<(Kind, RecordRef), Vec<u8>> = HashMap::new();
    for p in &paths {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        for i in 0..bytes.len().saturating_sub(3) {
            let crc = u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
            let Some(kinds) = wanted.get(&crc) else {
                continue;
            };
            for &(kind, len) in kinds {
                let len = len as usize;
                // A state chunk ends with its CRC32; a sealed record has it after the
                // version.
                let start = match kind {
                    Kind::State => (i + 4).checked_sub(len),
                    Kind::Text => i.checked_sub(2),
                };
                let Some(start) = start else { continue };
                let Some(slice) = bytes.get(start..start + len) else {
                    continue;
                };
                let ok = match kind {
                    Kind::State => codec::check(slice).is_ok(),
                    Kind::Text => unseal(slice, "text", "").is_ok(),
                };
                if ok {
                    let r = RecordRef {
                        crc32: crc,
                        bytes: len as u64,
                    };
                    records.entry((kind, r)).or_insert_with(|| slice.to_vec());
                }
            }
        }
    }
    let mut out = Scanned {
        recovered: Vec::new(),
        doubtful: Vec::new(),
        lost: Vec::new(),
    };
    for (id, versions) in by_id {
        let mut why = String::new();
        let mut done = false;
        for (k, f) in versions.iter().enumerate() {
            let m = &f.meta;
            if m.state_records.len() != m.state_chunks as usize
                || m.text_records.len() != m.parts as usize
            {
                why = "its metadata lists no checksums of its records (a store written \
                       before they were kept): restore it from the state topic"
                    .into();
                continue;
            }
            let get = |kind, r: &RecordRef| records.get(&(kind, *r)).cloned();
            let states: Option<Vec<Vec<u8>>> = m
                .state_records
                .iter()
                .map(|r| get(Kind::State, r))
                .collect();
            let texts: Option<Vec<Vec<u8>>> =
                m.text_records.iter().map(|r| get(Kind::Text, r)).collect();
            let (Some(states), Some(texts)) = (states, texts) else {
                why = format!(
                    "version {} with {} part(s): a state chunk or text part is not intact \
                     anywhere in the files",
                    m.version, m.parts
                );
                continue;
            };
            let r = DocRecords {
                meta: f.sealed.clone(),
                states,
                texts,
            };
            match check_records(&id, &r).and_then(|_| put(target, &id, &r)) {
                Ok(()) => {
                    if k > 0 {
                        out.doubtful.push(Damage {
                            id: id.clone(),
                            problem: format!(
                                "recovered as version {} with {} part(s), updated at {} ms; the \
                                 newest found is not intact: {why}",
                                m.version, m.parts, m.updated_unix_ms
                            ),
                        });
                    }
                    if k == 0 && damaged_ids.contains(&id) {
                        out.doubtful.push(Damage {
                            id: id.clone(),
                            problem: format!(
                                "recovered as version {} with {} part(s), updated at {} ms; a \
                                 damaged metadata record of it was found too, which may have \
                                 been newer",
                                m.version, m.parts, m.updated_unix_ms
                            ),
                        });
                    }
                    done = true;
                    break;
                }
                Err(e) => why = format!("{e:#}"),
            }
        }
        if done {
            out.recovered.push(id);
        } else {
            out.lost.push(Damage { id, problem: why });
        }
    }
    Ok(out)
}
