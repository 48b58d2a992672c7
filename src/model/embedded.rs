//! The project's own model, compiled into the binary: the default wherever a model
//! directory is optional (`serve`, `demo`, `query`, ...), so a fresh machine needs no
//! download. Its files are written to a private per-user cache folder named by their
//! hash, checked against the binary before every use, and loaded from there like any
//! model directory.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Where the embedded model comes from in the repository.
pub const SOURCE: &str = "models/gist-small";

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../models/gist-small/config.json"),
    ),
    (
        "gist.json",
        include_bytes!("../../models/gist-small/gist.json"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../models/gist-small/tokenizer.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../models/gist-small/model.safetensors"),
    ),
];

/// The directory holding the embedded model's files, written on first use.
///
/// The cache is private and checked, because a model directory is code-like input: a
/// folder planted where we look (a shared temporary directory) would otherwise be loaded
/// by whoever runs giststream next. So the files live in a per-user cache folder
/// (`$XDG_CACHE_HOME/giststream`, `~/.cache/giststream`, or `giststream-<uid>` under the
/// temporary directory) that must be owned by this user and closed to others, in a
/// subfolder named by the content's hash, and every file is compared byte for byte with
/// the copy in the binary before each use (stronger than a hash, and as cheap as the read
/// the load does anyway). A mismatch is rewritten, never used.
pub fn dir() -> anyhow::Result<PathBuf> {
    dir_in(&cache_root()?)
}

/// [`dir`] under the cache folder `root` (already checked).
fn dir_in(root: &Path) -> anyhow::Result<PathBuf> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let dir = root.join(format!("model-{h:016x}"));
    if intact(&dir)? {
        return Ok(dir);
    }
    // Written beside, then renamed into place: a concurrent process sees all or nothing.
    let tmp = root.join(format!("model-{h:016x}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    private_dir(&tmp)?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    if std::fs::symlink_metadata(&dir).is_ok() {
        // A damaged or foreign copy: replaced, not trusted.
        std::fs::remove_dir_all(&dir)
            .or_else(|_| std::fs::remove_file(&dir))
            .with_context(|| format!("removing the damaged cache {}", dir.display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; its copy is checked like any other.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    anyhow::ensure!(
        intact(&dir)?,
        "the embedded model's cache {} does not match the binary after writing it",
        dir.display()
    );
    Ok(dir)
}

/// Whether `dir` holds exactly the embedded files, as regular files of this user.
fn intact(dir: &Path) -> anyhow::Result<bool> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(false);
    };
    if !meta.is_dir() || owned_privately(&meta, dir).is_err() {
        return Ok(false);
    }
    for (name, bytes) in FILES {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == bytes.len() as u64 => {}
            _ => return Ok(false),
        }
        let on_disk =
            std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if on_disk != *bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

/// This user's cache folder for giststream, created private (0700) if missing; refused if
/// another user owns it or others may write to it.
fn cache_root() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        });
    let root = match base {
        Some(b) => b.join("giststream"),
        None => std::env::temp_dir().join(format!("giststream-{}", user_id())),
    };
    checked_root(root)
}

/// `root`, created private if missing, after the ownership and permission checks.
fn checked_root(root: PathBuf) -> anyhow::Result<PathBuf> {
    if std::fs::symlink_metadata(&root).is_err() {
        if let Some(parent) = root.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        private_dir(&root)?;
    }
    let meta =
        std::fs::symlink_metadata(&root).with_context(|| format!("reading {}", root.display()))?;
    anyhow::ensure!(
        meta.is_dir(),
        "the model cache {} is not a directory (a link or a file is refused)",
        root.display()
    );
    owned_privately(&meta, &root)?;
    Ok(root)
}

/// Creates `path` with permissions 0700 (an existing folder is left as it is).
fn private_dir(path: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    match b.create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(unix)]
fn user_id() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(not(unix))]
fn user_id() -> u32 {
    0
}

/// Refuses a folder that another user owns or that group or others may write to.
#[cfg(unix)]
fn owned_privately(meta: &std::fs::Metadata, path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    anyhow::ensure!(
        meta.uid() == user_id(),
        "the model cache {} belongs to user {}, not to this user ({}): refusing to load a \
         model from it (remove it, or set XDG_CACHE_HOME)",
        path.display(),
        meta.uid(),
        user_id()
    );
    anyhow::ensure!(
        meta.mode() & 0o022 == 0,
        "the model cache {} may be written by other users (mode {:o}): refusing to load a \
         model from it (chmod 700 it, or remove it)",
        path.display(),
        meta.mode() & 0o777
    );
    Ok(())
}

#[cfg(not(unix))]
fn owned_privately(_: &std::fs::Metadata, _: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_is_private_checked_and_rewritten_when_tampered_with() {
        let home = tempfile::tempdir().unwrap();
        let root = checked_root(home.path().join("giststream")).unwrap();
        let dir = dir_in(&root).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&root).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "cache root mode {mode:o}");
        }
        // A planted or damaged file is noticed and replaced before use.
        let weights = dir.join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[1000] ^= 0xFF;
        std::fs::write(&weights, &bytes).unwrap();
        assert_eq!(dir_in(&root).unwrap(), dir);
        let (_, embedded) = FILES
            .iter()
            .find(|(n, _)| *n == "model.safetensors")
            .unwrap();
        assert_eq!(std::fs::read(&weights).unwrap(), *embedded);
        // A cache root others may write to is refused, naming it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
            let e = format!("{:#}", checked_root(root.clone()).unwrap_err());
            assert!(e.contains("may be written by other users"), "{e}");
        }
    }
}
