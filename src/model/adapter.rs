//! A gist adapter: what turns a plain pretrained base (a GGUF file, or an HF directory)
//! into a gist model without touching its weights. It holds the gist tokens' embedding
//! rows and a low-rank adapter (LoRA) per projection; the base stays frozen in training and
//! quantized at inference (the QLoRA arrangement).
//!
//! On disk, a folder:
//! - `adapter.json` ([`AdapterConfig`]): rank, alpha, the adapted projections, and which
//!   base it was trained on (file name and sha256);
//! - `gist.json`: the gist settings (N_g, token names, segmentation, position scheme);
//! - `adapter.safetensors`: `gist_embeddings` (N_g, H) and, per layer i and projection p,
//!   `layers.i.p.lora_a` (r, in) and `layers.i.p.lora_b` (out, r).
//!
//! A projection computes x · Wᵀ + (alpha / r) · (x · Aᵀ) · Bᵀ. B starts at zero, so a
//! fresh adapter changes nothing until it is trained.

use super::llama::Llama;
use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The projections an adapter may target, in HF's names.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `adapter.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Rank r of every adapter.
    pub rank: usize,
    /// Scale numerator: a projection adds (alpha / r) · x · Aᵀ · Bᵀ.
    pub alpha: f64,
    /// Adapted projections (a subset of [`TARGETS`]).
    pub targets: Vec<String>,
    /// The base the adapter was trained on.
    pub base: BaseRef,
}

/// Which base an adapter belongs to: its file (or HF folder) name, looked up inside and
/// beside the adapter folder, at `$GISTSTREAM_BASE`, and in the cache
/// `scripts/get-smollm2.sh` fills; and its digest ([`base_digest`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    pub file: String,
    pub sha256: String,
}

impl AdapterConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=256).contains(&self.rank),
            "adapter.json: rank must be 1 to 256 (it is {})",
            self.rank
        );
        ensure!(
            self.alpha.is_finite() && self.alpha > 0.0,
            "adapter.json: alpha must be a positive number"
        );
        for t in &self.targets {
            ensure!(
                TARGETS.contains(&t.as_str()),
                "adapter.json: unknown target {t:?} (known: {TARGETS:?})"
            );
        }
        Ok(())
    }
}

/// Tensor names of one projection's adapter.
pub fn names(layer: usize, target: &str) -> (String, String) {
    (
        format!("layers.{layer}.{target}.lora_a"),
        format!("layers.{layer}.{target}.lora_b"),
    )
}

pub const GIST_EMBEDDINGS: &str = "gist_embeddings";

/// A fresh adapter for `llama`: A drawn uniformly in ±1/sqrt(in) (LoRA's init), B zero,
/// and the gist rows as the base has them now (the mean embedding).
pub fn fresh(
    llama: &Llama,
    cfg: &AdapterConfig,
    num_gists: usize,
    seed: u64,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    out.insert(
        GIST_EMBEDDINGS.to_string(),
        llama
            .gist_rows(num_gists)?
            .to_dtype(DType::F32)?
            .contiguous()?,
    );
    let dims = shapes(llama);
    let mut rng = crate::model::random::SplitMix(seed);
    for (layer, target, (rows, cols)) in dims {
        if !cfg.targets.iter().any(|t| t == target) {
            continue;
        }
        let bound = 1.0 / (cols as f64).sqrt();
        let a: Vec<f32> = (0..cfg.rank * cols)
            .map(|_| ((rng.uniform() as f64 * 2.0 - 1.0) * bound) as f32)
            .collect();
        let (na, nb) = names(layer, target);
        out.insert(na, Tensor::from_vec(a, (cfg.rank, cols), &Device::Cpu)?);
        out.insert(
            nb,
            Tensor::zeros((rows, cfg.rank), DType::F32, &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// A trained adapter's gist rows (N_g, H) made into `n` rows, to start a run with a
/// different N_g from it (`train --init-adapter DIR --num-gists N`). Growing repeats each
/// row in order (4 to 8: 0 0 1 1 2 2 3 3), so every new gist starts as one the adapter
/// already writes. Shrinking keeps the last rows (4 to 2: rows 2 and 3): the last gist of
/// a sentence is written after all the others and has read them, so it starts closest to
/// what a shorter run of gists must carry alone.
pub fn resize_gist_rows(rows: &Tensor, n: usize) -> anyhow::Result<Tensor> {
    let old = rows.dim(0)?;
    anyhow::ensure!(old > 0 && n > 0, "gist rows: {old} to {n}");
    let pick: Vec<u32> = if n >= old {
        (0..n).map(|i| (i * old / n) as u32).collect()
    } else {
        (old - n..old).map(|i| i as u32).collect()
    };
    let idx = Tensor::new(pick.as_slice(), rows.device())?;
    Ok(rows.index_select(&idx, 0)?.contiguous()?)
}

/// (layer, target, (out, in)) of every projection.
fn shapes(llama: &Llama) -> Vec<(usize, &'static str, (usize, usize))> {
    let c = &llama.cfg;
    let (h, i, d) = (c.hidden, c.intermediate, c.head_dim);
    let mut out = Vec::new();
    for layer in 0..c.layers {
        out.extend([
            (layer, "q_proj", (c.heads * d, h)),
            (layer, "k_proj", (c.kv_heads * d, h)),
            (layer, "v_proj", (c.kv_heads * d, h)),
            (layer, "o_proj", (h, c.heads * d)),
            (layer, "gate_proj", (i, h)),
            (layer, "up_proj", (i, h)),
            (layer, "down_proj", (h, i)),
        ]);
    }
    out
}

/// Puts the adapter's tensors on `llama`: LoRA on each target projection, and the gist
/// rows into the embedding. Shapes are checked against the model.
pub fn attach(
    llama: &mut Llama,
    cfg: &AdapterConfig,
    tensors: &HashMap<String, Tensor>,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let (device, dtype) = (llama.device().clone(), llama.dtype());
    let get = |name: &str, shape: (usize, usize)| -> anyhow::Result<Tensor> {
        let t = tensors
            .get(name)
            .with_context(|| format!("the adapter has no tensor {name}"))?;
        ensure!(
            t.dims2()? == shape,
            "the adapter's {name} is {:?}, the model needs {shape:?}",
            t.dims()
        );
        Ok(t.to_dtype(dtype)?.to_device(&device)?)
    };
    let hidden = llama.cfg.hidden;
    let gist = tensors
        .get(GIST_EMBEDDINGS)
        .with_context(|| format!("the adapter has no tensor {GIST_EMBEDDINGS}"))?;
    let gist = get(GIST_EMBEDDINGS, (gist.dim(0)?, hidden))?;
    let dims = shapes(llama);
    let scale = cfg.scale();
    let mut found = Vec::new();
    for (layer, target, (rows, cols)) in dims {
        if !cfg.targets.iter().any(|t| t == target) {
            continue;
        }
        let (na, nb) = names(layer, target);
        found.push((
            layer,
            target,
            get(&na, (cfg.rank, cols))?,
            get(&nb, (rows, cfg.rank))?,
        ));
    }
    let mut found = found.into_iter();
    for (layer, target, linear) in llama.projections_mut() {
        if !cfg.targets.iter().any(|t| t == target) {
            continue;
        }
        let (l2, t2, a, b) = found.next().expect("one per target projection");
        debug_assert_eq!((l2, t2), (layer, target));
        linear.adapt(a, b, scale);
    }
    llama.set_gist_rows(gist)?;
    Ok(())
}

/// The adapter's `adapter.json` alone (no tensors).
pub fn read_config(dir: &Path) -> anyhow::Result<AdapterConfig> {
    let p = dir.join("adapter.json");
    let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    let cfg: AdapterConfig =
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", p.display()))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Reads an adapter folder: its config, gist.json's bytes and its tensors (on the CPU).
pub fn read(dir: &Path) -> anyhow::Result<(AdapterConfig, Vec<u8>, HashMap<String, Tensor>)> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let cfg = read_config(dir)?;
    let gist = read("gist.json")?;
    let tensors = candle_core::safetensors::load(dir.join("adapter.safetensors"), &Device::Cpu)
        .with_context(|| format!("reading {}", dir.join("adapter.safetensors").display()))?;
    Ok((cfg, gist, tensors))
}

/// Writes an adapter folder (atomically per file), its tensors in `dtype` (bf16 halves
/// the file; loading converts back).
pub fn write(
    dir: &Path,
    cfg: &AdapterConfig,
    gist: &super::config::GistConfig,
    tensors: &HashMap<String, Tensor>,
    dtype: DType,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    };
    put(
        "adapter.json",
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    put("gist.json", serde_json::to_string_pretty(gist)?.as_bytes())?;
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<anyhow::Result<_>>()?;
    let tmp = dir.join(".adapter.safetensors.tmp");
    candle_core::safetensors::save(&cpu, &tmp)?;
    std::fs::rename(&tmp, dir.join("adapter.safetensors"))?;
    Ok(())
}

/// Whether `dir` is an adapter folder.
pub fn is_adapter(dir: &Path) -> bool {
    dir.is_dir() && dir.join("adapter.json").is_file()
}

/// Refuses `path` unless its digest is the one the adapter was trained on.
pub fn check_base(path: &Path, base: &BaseRef) -> anyhow::Result<()> {
    let got = base_digest(path)?;
    ensure!(
        got == base.sha256,
        "{} is not the base this adapter was trained on: sha256 {got}, adapter.json says {}",
        path.display(),
        base.sha256
    );
    Ok(())
}

/// Where the adapter's base is: beside the adapter, `$GISTSTREAM_BASE` (a file or a
/// folder holding it), or the folder `scripts/get-smollm2.sh` fills. Checked by sha256.
pub fn find_base(dir: &Path, base: &BaseRef) -> anyhow::Result<PathBuf> {
    let mut candidates = vec![dir.join(&base.file)];
    if let Some(parent) = dir.parent() {
        candidates.push(parent.join(&base.file));
    }
    if let Some(b) = std::env::var_os("GISTSTREAM_BASE") {
        let b = PathBuf::from(b);
        candidates.push(if b.is_dir() { b.join(&base.file) } else { b });
    }
    if let Some(g) = std::env::var_os("GISTSTREAM_SMOLLM2_GGUF") {
        candidates.push(PathBuf::from(g));
    }
    let cache = std::env::var_os("GISTSTREAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("giststream")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/giststream")));
    if let Some(c) = cache {
        if let Ok(entries) = std::fs::read_dir(&c) {
            for e in entries.flatten() {
                candidates.push(e.path().join(&base.file));
            }
        }
    }
    for c in &candidates {
        if c.exists() && c.file_name().is_some_and(|n| n == base.file.as_str()) {
            check_base(c, base)?;
            return Ok(c.clone());
        }
    }
    anyhow::bail!(
        "the adapter in {} needs its base {} (sha256 {}): fetch it with scripts/get-smollm2.sh, \
         or point GISTSTREAM_BASE at it",
        dir.display(),
        base.file,
        base.sha256
    )
}

/// What identifies a base: the sha256 of a GGUF file, or of an HF directory's
/// config.json, tokenizer.json and weight files in order (hex).
pub fn base_digest(path: &Path) -> anyhow::Result<String> {
    if path.is_file() {
        return sha256_file(path);
    }
    let mut files = vec![path.join("config.json"), path.join("tokenizer.json")];
    files.extend(super::safetensors_files(path)?);
    let mut all = String::new();
    for f in &files {
        all.push_str(&sha256_file(f)?);
    }
    use sha2::Digest;
    Ok(sha2::Sha256::digest(all.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gist_rows_grow_by_repeating_and_shrink_to_the_last() {
        // Row i holds the value i in every column.
        let rows = Tensor::from_vec(
            (0..4u32).flat_map(|i| [i as f32; 3]).collect::<Vec<_>>(),
            (4, 3),
            &Device::Cpu,
        )
        .unwrap();
        let first = |t: Tensor| -> Vec<f32> {
            t.narrow(1, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let grown = resize_gist_rows(&rows, 8).unwrap();
        assert_eq!(grown.dims(), &[8, 3]);
        assert_eq!(first(grown), [0., 0., 1., 1., 2., 2., 3., 3.]);
        assert_eq!(first(resize_gist_rows(&rows, 2).unwrap()), [2., 3.]);
        assert_eq!(first(resize_gist_rows(&rows, 1).unwrap()), [3.]);
        assert_eq!(first(resize_gist_rows(&rows, 4).unwrap()), [0., 1., 2., 3.]);
        assert!(resize_gist_rows(&rows, 0).is_err());
    }
}
