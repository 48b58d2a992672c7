//! A gist model: an HF-format Llama directory (config.json, model.safetensors or a sharded
//! index, tokenizer.json) plus `gist.json`. A plain Llama checkpoint without gist tokens
//! loads too: the reference names `<end_of_sentence_i>` are added to the tokenizer and the
//! embedding (and head) grow rows initialised to the mean row.

pub mod attention;
pub mod config;
pub mod device;
pub mod embedded;
pub mod llama;
pub mod ops;
pub mod random;

use crate::text::encoder::DocumentEncoder;
use crate::text::segment::SegmentConfig;
use crate::text::tokenize::{GistTokenizer, Segment};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use config::{GistConfig, Incremental, LlamaFileConfig};
use llama::Llama;
use std::path::{Path, PathBuf};

/// How to load a checkpoint that has no `gist.json`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// N_g for a plain checkpoint.
    pub num_gists: usize,
    /// Segmentation for a plain checkpoint.
    pub segmentation: SegmentConfig,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            num_gists: 4,
            segmentation: SegmentConfig::default(),
        }
    }
}

/// A loaded gist model: weights, tokenizer, gist settings and the fingerprint that ties
/// stored states to it.
pub struct GistModel {
    pub llama: Llama,
    /// How whole documents run through the incremental path (see [`Incremental`]).
    pub incremental: Incremental,
    pub tokenizer: GistTokenizer,
    pub gist: GistConfig,
    /// Hash of config, gist settings, tokenizer and weights (see [`fingerprint`]).
    pub fingerprint: u64,
    pub dir: PathBuf,
    /// How questions are wrapped, when the checkpoint has a chat template.
    pub chat_template: Option<crate::text::chat::ChatTemplate>,
}

impl GistModel {
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
        opts: &LoadOptions,
    ) -> anyhow::Result<Self> {
        if device.is_cpu() && dtype == DType::BF16 {
            bail!(
                "bf16 compute is not supported on the CPU (candle's CPU matmul has no bf16 \
                 kernel): use --dtype f32 or f16 there; bf16 weights load fine as f32"
            );
        }
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let config_bytes = read("config.json")?;
        let file_cfg: LlamaFileConfig = serde_json::from_slice(&config_bytes)
            .with_context(|| format!("parsing {}", dir.join("config.json").display()))?;
        let file_vocab = file_cfg.vocab_size;
        let mut cfg = file_cfg.into_config()?;
        let mut tokenizer = GistTokenizer::from_file(&dir.join("tokenizer.json"))?;

        let gist_path = dir.join("gist.json");
        let gist = if gist_path.exists() {
            let gist: GistConfig = serde_json::from_slice(&read("gist.json")?)
                .with_context(|| format!("parsing {}", gist_path.display()))?;
            gist.validate()?;
            let ids = tokenizer.ensure_special_tokens(&gist.gist_tokens)?;
            ensure!(
                ids == gist.gist_token_ids,
                "gist.json says the gist tokens {:?} have ids {:?}, but tokenizer.json gives {:?}",
                gist.gist_tokens,
                gist.gist_token_ids,
                ids
            );
            gist
        } else {
            let names = GistConfig::reference_names(opts.num_gists);
            let ids = tokenizer.ensure_special_tokens(&names)?;
            let gist = GistConfig {
                num_gist_tokens: opts.num_gists,
                gist_tokens: names,
                gist_token_ids: ids,
                segmentation: opts.segmentation.clone(),
                bos_always_visible: false,
                add_bos: true,
            };
            gist.validate()?;
            gist
        };
        let max_id = *gist
            .gist_token_ids
            .iter()
            .max()
            .expect("validated: N_g >= 1");
        cfg.vocab = file_vocab.max(max_id as usize + 1);

        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; like every mmap-based loader this
        // assumes nobody truncates them while the model is loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        let llama = Llama::load(vb, cfg, file_vocab)
            .with_context(|| format!("loading weights from {}", dir.display()))?;
        let gist_json = serde_json::to_vec(&gist)?;
        let fingerprint = fingerprint(
            &[&config_bytes, &gist_json, &read("tokenizer.json")?],
            &files,
        )?;
        Ok(Self {
            incremental: Incremental::default_for(device),
            llama,
            tokenizer,
            gist,
            fingerprint,
            dir: dir.to_path_buf(),
            chat_template: crate::text::chat::ChatTemplate::from_dir(dir)?,
        })
    }

    /// A model from parts already in memory (training builds its weights itself).
    pub fn from_parts(
        llama: Llama,
        tokenizer: GistTokenizer,
        gist: GistConfig,
        fingerprint: u64,
    ) -> Self {
        Self {
            incremental: Incremental::default_for(llama.device()),
            llama,
            tokenizer,
            gist,
            fingerprint,
            dir: PathBuf::new(),
            chat_template: None,
        }
    }

    /// BOS to prepend to a document, if the model uses one.
    pub fn bos_token_id(&self) -> Option<u32> {
        if self.gist.add_bos {
            self.llama.cfg.bos_token_id
        } else {
            None
        }
    }

    /// End-of-sequence token (config.json `eos_token_id`, the first if several).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.llama.cfg.eos_token_id
    }

    /// The BOS id that stays visible to every later token (kept in the state like a gist),
    /// when the model was trained that way (`bos_always_visible`).
    pub fn kept_bos(&self) -> Option<u32> {
        if self.gist.bos_always_visible {
            self.bos_token_id()
        } else {
            None
        }
    }

    /// Bytes of keys and values one token costs in a full cache at `bytes_per_value`.
    pub fn kv_bytes_per_token(&self, bytes_per_value: usize) -> u64 {
        let c = &self.llama.cfg;
        (c.layers * 2 * c.kv_heads * c.head_dim * bytes_per_value) as u64
    }

    /// A streaming encoder for one document under this model's segmentation.
    pub fn encoder(&self) -> DocumentEncoder<'_> {
        DocumentEncoder::new(
            &self.tokenizer,
            &self.gist.segmentation,
            self.bos_token_id(),
        )
    }

    /// Segments and tokenizes a whole document.
    pub fn segments(&self, text: &str) -> anyhow::Result<Vec<Segment>> {
        let mut enc = self.encoder();
        let mut out = enc.push(text)?;
        out.extend(enc.finish()?);
        Ok(out)
    }
}

/// The weight files of a checkpoint: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
        .with_context(|| format!("parsing {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|v| v.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// FNV-1a over 8-byte words: stable across builds and platforms (std's hasher is not), and
/// fast enough to read a few GB of weights once at load.
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.0 =
                (self.0 ^ u64::from_le_bytes(c.try_into().expect("8 bytes"))).wrapping_mul(PRIME);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(PRIME);
        }
        self.0 = (self.0 ^ bytes.len() as u64).wrapping_mul(PRIME);
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The model fingerprint: config, gist settings, tokenizer, and every weight file's bytes.
pub fn fingerprint(metadata: &[&[u8]], weight_files: &[PathBuf]) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut h = Fnv64::default();
    for m in metadata {
        h.write(m);
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in weight_files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        // Whole 1-MiB blocks (the hash mixes in each block's length, so blocks must not
        // depend on how `read` happens to split the file).
        loop {
            let mut n = 0;
            while n < buf.len() {
                let got = file.read(&mut buf[n..])?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
        }
    }
    Ok(h.finish())
}
