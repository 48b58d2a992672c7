//! Repairs what a kill leaves in sled's folder and sled 0.34 cannot open by itself.

use anyhow::Context;
use std::path::Path;

/// `sled::open`, and after a refusal as corrupt caused by an unfinished snapshot (below),
/// that file removed and a second open. If the repair itself fails, the first refusal
/// stands: it is the error that names what is wrong. Every open of a store goes through
/// here (`Store::open`, and salvage's open of its copy). The repair's lock is taken only
/// after a refusal, never on a normal open.
pub(super) fn open(dir: &Path) -> sled::Result<sled::Db> {
    match sled::open(dir) {
        Err(sled::Error::Corruption { .. }) if remove_unfinished(dir).unwrap_or(false) => {
            sled::open(dir)
        }
        opened => opened,
    }
}

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating`, syncs it, then renames it to
/// `snap.<lsn>`; but at open it takes every `snap.*` file for a snapshot, so a process killed
/// while writing one leaves a half file that sled then reads as the newest snapshot and
/// refuses the whole store as corrupt (sled issue #1527; seen here in the kill tests of
/// `tests/store.rs`, 2 of 6 reruns under load). Such a file was never committed: without it
/// sled recovers from the previous snapshot and the log, as if the kill had come before the
/// snapshot began. It is removed only while no other process holds the store (sled's own
/// lock on `db`, an exclusive flock, taken here and released before sled takes it). True
/// when one was removed.
fn remove_unfinished(dir: &Path) -> anyhow::Result<bool> {
    let Ok(db) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
    else {
        return Ok(false); // no store (or none readable: sled::open says why)
    };
    if db.try_lock().is_err() {
        return Ok(false); // in use by another process: not ours to repair
    }
    let mut removed = false;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating")) {
            std::fs::remove_file(&path).with_context(|| {
                format!("removing the unfinished sled snapshot {}", path.display())
            })?;
            removed = true;
        }
    }
    Ok(removed)
}
