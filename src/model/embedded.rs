//! The project's own model, compiled into the binary: the default wherever a model
//! directory is optional (`serve`, `demo`, `query`, ...), so a fresh machine needs no
//! download. Its files are written once to a folder under the system's temporary
//! directory named by their hash, and loaded from there like any model directory.

use anyhow::Context;
use std::path::PathBuf;

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
pub fn dir() -> anyhow::Result<PathBuf> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let dir = std::env::temp_dir().join(format!("giststream-model-{h:016x}"));
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    // Written beside, then renamed into place: a concurrent process sees all or nothing.
    let tmp = std::env::temp_dir().join(format!(
        "giststream-model-{h:016x}.{}.tmp",
        std::process::id()
    ));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(dir)
}
