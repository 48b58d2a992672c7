//! Documents read from files: UTF-8 text with a clear error, and ids from file names.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// A text file's contents, with a clear error for bytes that are not UTF-8.
pub fn read_text(f: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            f.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The document id of a file: its name without the extension.
pub fn file_id(file: &Path) -> anyhow::Result<String> {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .with_context(|| format!("{} has no file name to use as an id", file.display()))
}

/// Files named, with folders standing for their `.txt` files (sorted by name).
pub fn text_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "txt"))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

/// The documents of `paths` (files, and folders standing for their `.txt` files) with
/// their ids. Two files with one id (the same name in two folders) are an error naming
/// both: one would silently replace the other's document.
pub fn documents(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut seen: std::collections::HashMap<String, PathBuf> = Default::default();
    let mut out = Vec::new();
    for f in text_files(paths)? {
        let id = file_id(&f)?;
        if let Some(first) = seen.insert(id.clone(), f.clone()) {
            anyhow::bail!(
                "{} and {} would both be document {id:?} (ids are file names without \
                 their extension): rename one, or send them separately",
                first.display(),
                f.display()
            );
        }
        out.push((f, id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_files_with_one_name_are_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["a", "b"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
            std::fs::write(dir.path().join(sub).join("book.txt"), "Hi.").unwrap();
        }
        std::fs::write(dir.path().join("a").join("other.txt"), "Yo.").unwrap();
        let ok = documents(&[dir.path().join("a")]).unwrap();
        assert_eq!(ok.len(), 2);
        let e = documents(&[dir.path().join("a"), dir.path().join("b")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("a/book.txt") && e.contains("b/book.txt"), "{e}");
        assert!(e.contains("\"book\""), "{e}");
    }
}
