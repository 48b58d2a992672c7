//! A gist model: an HF-format Llama directory (config.json, model.safetensors or a sharded
//! index, tokenizer.json) plus `gist.json`. A plain Llama checkpoint without gist tokens
//! loads too: the reference names `<end_of_sentence_i>` are added to the tokenizer and the
//! embedding (and head) grow rows initialised to the mean row.

pub mod adapter;
pub mod attention;
pub mod config;
pub mod device;
pub mod embedded;
pub mod flash;
pub mod gguf;
pub mod llama;
pub mod ops;
pub mod packed;
pub mod q4_1;
pub mod random;
pub mod rms_norm;
pub mod simd;
pub mod softmax;
pub mod swiglu;

use crate::text::encoder::DocumentEncoder;
use crate::text::segment::SegmentConfig;
use crate::text::tokenize::{GistTokenizer, Segment};
use anyhow::{bail, ensure, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use config::{GistConfig, Incremental, LlamaFileConfig};
use gguf::Weights;
use llama::Llama;
use std::path::{Path, PathBuf};

/// How to load a checkpoint that has no `gist.json`, and a GGUF file's weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// N_g for a plain checkpoint.
    pub num_gists: usize,
    /// Segmentation for a plain checkpoint.
    pub segmentation: SegmentConfig,
    /// GGUF files: quantized blocks or dequantized weights.
    pub weights: Weights,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            num_gists: 4,
            segmentation: SegmentConfig::default(),
            weights: Weights::default(),
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
    /// Loads an HF model directory, or a GGUF file.
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
        let named = shipped(dir);
        let dir = named.as_deref().unwrap_or(dir);
        if gguf::is_gguf(dir) {
            return Self::load_gguf(dir, device, dtype, opts, None, true);
        }
        if adapter::is_adapter(dir) {
            return Self::load_adapter(dir, device, dtype, opts);
        }
        if dir.is_file() {
            bail!(
                "{} is a file but not a GGUF file: give an HF model directory or a .gguf file",
                dir.display()
            );
        }
        Self::load_dir(dir, device, dtype, opts, None, true)
    }

    /// An HF model directory; `gist_json` instead of its own gist.json (an adapter's);
    /// `pack`: pack the projections for inference.
    fn load_dir(
        dir: &Path,
        device: &Device,
        dtype: DType,
        opts: &LoadOptions,
        gist_override: Option<&[u8]>,
        pack: bool,
    ) -> anyhow::Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let config_bytes = read("config.json")?;
        let file_cfg: LlamaFileConfig = serde_json::from_slice(&config_bytes)
            .with_context(|| format!("parsing {}", dir.join("config.json").display()))?;
        let file_vocab = file_cfg.vocab_size;
        let mut cfg = file_cfg.into_config()?;
        let tokenizer_path = dir.join("tokenizer.json");
        ensure!(
            tokenizer_path.exists(),
            "{} has no tokenizer.json: a checkpoint saved with save_pretrained alone has \
             none; save its tokenizer beside it (tokenizer.save_pretrained(DIR))",
            dir.display()
        );
        let mut tokenizer = GistTokenizer::from_file(&tokenizer_path)?;

        let gist_path = dir.join("gist.json");
        let gist_bytes = if let Some(g) = gist_override {
            Some(g.to_vec())
        } else if gist_path.exists() {
            Some(read("gist.json")?)
        } else {
            None
        };
        let reference = ReferenceKeys::read(&config_bytes)?;
        let gist = match (&gist_bytes, &reference) {
            (None, Some(r)) => r.gist_config(&tokenizer, dir)?,
            _ => resolve_gist(
                &mut tokenizer,
                gist_bytes.as_deref(),
                &gist_path,
                opts,
                true,
            )?,
        };
        if let Some(r) = &reference {
            r.check(&gist, dir)?;
        }
        cfg.vocab = vocab_with_gists(file_vocab, &gist);

        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; like every mmap-based loader this
        // assumes nobody truncates them while the model is loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        let mut llama = Llama::load(vb, cfg, file_vocab)
            .with_context(|| format!("loading weights from {}", dir.display()))?;
        if pack {
            llama.pack_for_inference()?;
        }
        let gist_json = serde_json::to_vec(&gist)?;
        let fingerprint = fingerprint(
            &[&config_bytes, &gist_json, &read("tokenizer.json")?],
            &files,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            chat_template: crate::text::chat::ChatTemplate::from_dir(dir)?,
            ..Self::from_parts(llama, tokenizer, gist, fingerprint)
        })
    }

    /// Loads a GGUF file: config, tokenizer and chat template from its metadata; its
    /// matrices quantized or dequantized as `opts.weights` says.
    /// A GGUF base with a gist adapter on it (see [`adapter`]): the base as `opts.weights`
    /// says (quantized: the QLoRA arrangement), the adapter's gist settings, its LoRA
    /// and gist rows. The fingerprint covers the base and the adapter's files.
    fn load_adapter(
        dir: &Path,
        device: &Device,
        dtype: DType,
        opts: &LoadOptions,
    ) -> anyhow::Result<Self> {
        let (cfg, gist_json, tensors) = adapter::read(dir)?;
        let base = adapter::find_base(dir, &cfg.base)?;
        let mut model = if gguf::is_gguf(&base) {
            Self::load_gguf(&base, device, dtype, opts, Some(&gist_json), true)
        } else {
            Self::load_dir(&base, device, dtype, opts, Some(&gist_json), true)
        }
        .with_context(|| format!("loading the adapter's base {}", base.display()))?;
        adapter::attach(&mut model.llama, &cfg, &tensors)
            .with_context(|| format!("applying the adapter in {}", dir.display()))?;
        let files = [dir.join("adapter.json"), dir.join("adapter.safetensors")];
        let own = fingerprint(&[&gist_json], &files)?;
        model.fingerprint ^= own.rotate_left(17);
        model.dir = dir.to_path_buf();
        Ok(model)
    }

    /// A GGUF file (dequantized to f32) or an HF directory (as f32) as the frozen base of
    /// adapter training:
    /// its projections stay dense (not packed for inference) so they can be frozen for
    /// autograd. `gist_json`: the gist settings to add (None: `opts.num_gists` tokens
    /// with the reference names, as for any plain checkpoint).
    pub fn load_base_for_training(
        path: &Path,
        device: &Device,
        opts: &LoadOptions,
        gist_json: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let opts = LoadOptions {
            weights: Weights::Dequantized,
            ..opts.clone()
        };
        if gguf::is_gguf(path) {
            Self::load_gguf(path, device, DType::F32, &opts, gist_json, false)
        } else {
            Self::load_dir(path, device, DType::F32, &opts, gist_json, false)
        }
    }

    fn load_gguf(
        path: &Path,
        device: &Device,
        dtype: DType,
        opts: &LoadOptions,
        gist_json: Option<&[u8]>,
        pack: bool,
    ) -> anyhow::Result<Self> {
        let mut g = gguf::Gguf::open(path)?;
        let (config_bytes, file_cfg) = gguf::file_config(&g)?;
        let file_vocab = file_cfg.vocab_size;
        let mut cfg = file_cfg
            .into_config()
            .with_context(|| format!("the GGUF metadata of {}", path.display()))?;
        let tokenizer_json = serde_json::to_vec(&g.tokenizer_json()?)?;
        let inner = tokenizers::Tokenizer::from_bytes(&tokenizer_json)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("building the tokenizer of {}", path.display()))?;
        let mut tokenizer = GistTokenizer::from_tokenizer(inner);
        let gist = resolve_gist(&mut tokenizer, gist_json, path, opts, g.add_bos())?;
        cfg.vocab = vocab_with_gists(file_vocab, &gist);
        let extra = cfg.vocab - file_vocab;
        let (embed, layers, norm, head) = g.weights(&cfg, extra, opts.weights, device, dtype)?;
        let mut llama = Llama::from_weights(cfg, embed, layers, norm, head)?;
        if pack {
            llama.pack_for_inference()?;
        }
        let chat_template = match g.chat_template()? {
            Some((source, bos, eos)) => Some(
                crate::text::chat::ChatTemplate::new(source, bos, eos)
                    .with_context(|| format!("the chat template of {}", path.display()))?,
            ),
            None => None,
        };
        let gist_json = serde_json::to_vec(&gist)?;
        // The two weight modes make different states (quantized matmul rounds), so they
        // are different models to the store.
        let mode = serde_json::to_vec(&opts.weights)?;
        let fingerprint = fingerprint(
            &[&config_bytes, &gist_json, &tokenizer_json, &mode],
            &[path.to_path_buf()],
        )?;
        Ok(Self {
            dir: path.to_path_buf(),
            chat_template,
            ..Self::from_parts(llama, tokenizer, gist, fingerprint)
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

/// A model shipped with the project, by its bare name (`smollm2-gist`): the folder of
/// that name under `models/` in the working directory or in the source tree this binary
/// was built from. None when `name` is a path that exists, or no such folder is found.
pub fn shipped(name: &Path) -> Option<PathBuf> {
    if name.exists() || name.components().count() != 1 {
        return None;
    }
    let roots = [
        PathBuf::from("models"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    ];
    roots
        .iter()
        .map(|r| r.join(name))
        .find(|p| p.join("adapter.json").is_file() || p.join("config.json").is_file())
}

/// The gist settings of a checkpoint: its `gist.json` (checked against the tokenizer), or
/// for a plain checkpoint `opts.num_gists` tokens with the reference names, added to the
/// tokenizer after its vocabulary.
fn resolve_gist(
    tokenizer: &mut GistTokenizer,
    gist_json: Option<&[u8]>,
    source: &Path,
    opts: &LoadOptions,
    add_bos: bool,
) -> anyhow::Result<GistConfig> {
    if let Some(bytes) = gist_json {
        let gist: GistConfig = serde_json::from_slice(bytes)
            .with_context(|| format!("parsing {}", source.display()))?;
        gist.validate()?;
        let ids = tokenizer.ensure_special_tokens(&gist.gist_tokens)?;
        ensure!(
            ids == gist.gist_token_ids,
            "gist.json says the gist tokens {:?} have ids {:?}, but tokenizer.json gives {:?}",
            gist.gist_tokens,
            gist.gist_token_ids,
            ids
        );
        return Ok(gist);
    }
    let names = GistConfig::reference_names(opts.num_gists);
    let ids = tokenizer.ensure_special_tokens(&names)?;
    let gist = GistConfig {
        num_gist_tokens: opts.num_gists,
        gist_tokens: names,
        gist_token_ids: ids,
        segmentation: opts.segmentation.clone(),
        bos_always_visible: false,
        add_bos,
        positions: Default::default(),
        previous_sentence_visible: false,
        sink_distance: None,
        distance_decay: None,
    };
    gist.validate()?;
    Ok(gist)
}

/// The keys the paper's reference code writes into `config.json`: its gist token ids and
/// whether BOS stays visible. A checkpoint it saved configures itself from them.
struct ReferenceKeys {
    gist_ids: Vec<u32>,
    bos_visible: bool,
}

impl ReferenceKeys {
    fn read(config_json: &[u8]) -> anyhow::Result<Option<Self>> {
        let v: serde_json::Value = serde_json::from_slice(config_json)?;
        let Some(ids) = v.get("end_of_sentence_token_ids") else {
            return Ok(None);
        };
        let gist_ids: Vec<u32> = serde_json::from_value(ids.clone())
            .context("config.json: end_of_sentence_token_ids is not a list of token ids")?;
        ensure!(
            !gist_ids.is_empty(),
            "config.json: end_of_sentence_token_ids is empty"
        );
        let bos_visible = v
            .get("ft_with_bos_token")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        Ok(Some(Self {
            gist_ids,
            bos_visible,
        }))
    }

    /// The gist settings a reference checkpoint was trained with: its tokens, BOS as it
    /// says, the reference code's sentence rule.
    fn gist_config(&self, tokenizer: &GistTokenizer, dir: &Path) -> anyhow::Result<GistConfig> {
        let names = self
            .gist_ids
            .iter()
            .map(|&id| {
                tokenizer.id_to_token(id).with_context(|| {
                    format!(
                        "{}: config.json names gist token id {id}, which tokenizer.json lacks",
                        dir.display()
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let gist = GistConfig {
            num_gist_tokens: self.gist_ids.len(),
            gist_tokens: names,
            gist_token_ids: self.gist_ids.clone(),
            segmentation: SegmentConfig::reference(),
            bos_always_visible: self.bos_visible,
            add_bos: true,
            positions: Default::default(),
            previous_sentence_visible: false,
            sink_distance: None,
            distance_decay: None,
        };
        gist.validate()?;
        Ok(gist)
    }

    /// A `gist.json` that contradicts the reference keys is refused, naming both.
    fn check(&self, gist: &GistConfig, dir: &Path) -> anyhow::Result<()> {
        ensure!(
            gist.gist_token_ids == self.gist_ids,
            "{}: gist.json has gist token ids {:?} but config.json's end_of_sentence_token_ids \
             are {:?}",
            dir.display(),
            gist.gist_token_ids,
            self.gist_ids
        );
        ensure!(
            gist.bos_always_visible == self.bos_visible,
            "{}: gist.json has bos_always_visible {} but config.json's ft_with_bos_token is {}",
            dir.display(),
            gist.bos_always_visible,
            self.bos_visible
        );
        Ok(())
    }
}

/// Embedding rows: the checkpoint's, and room for gist tokens appended after them.
fn vocab_with_gists(file_vocab: usize, gist: &GistConfig) -> usize {
    let max_id = *gist
        .gist_token_ids
        .iter()
        .max()
        .expect("validated: N_g >= 1");
    file_vocab.max(max_id as usize + 1)
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
