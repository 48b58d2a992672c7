//! The model being trained (its weights in a VarMap that autograd sees), made from a
//! directory, from scratch, or from a checkpoint; and checkpoints written whole.

use super::config::{TrainConfig, Trainable};
use super::optim::AdamW;
use super::TrainProgress;
use crate::model::adapter::{self, AdapterConfig};
use crate::model::config::{GistConfig, PositionScheme};
use crate::model::llama::Llama;
use crate::model::GistModel;
use crate::text::tokenize::GistTokenizer;
use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// What the checkpoint holds beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CheckpointMeta {
    pub(crate) config: TrainConfig,
    pub(crate) progress: TrainProgress,
    /// config.json of the model being trained.
    pub(crate) model_config: serde_json::Value,
    pub(crate) gist: GistConfig,
    /// Adapter training: the adapter's settings and the frozen base it trains on.
    #[serde(default)]
    pub(crate) adapter: Option<AdapterRun>,
}

/// An adapter being trained on a frozen base.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterRun {
    pub config: AdapterConfig,
    pub base: std::path::PathBuf,
}

/// A model being trained: its weights live in a VarMap so candle's autograd sees them.
pub struct Trainee {
    pub model: GistModel,
    pub varmap: VarMap,
    pub model_config: serde_json::Value,
    /// Precision of the weights written to the model directory (checkpoints stay f32).
    pub save_dtype: DType,
    /// Adapter training: the varmap holds only the adapter; the base is frozen.
    pub adapter: Option<AdapterRun>,
}

impl Trainee {
    /// From config.json, weights and the tokenizer. Gist rows must already be in the
    /// weights (see [`extend_vocab`]).
    pub fn new(
        model_config: serde_json::Value,
        weights: HashMap<String, Tensor>,
        tokenizer: GistTokenizer,
        gist: GistConfig,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let file_cfg: crate::model::config::LlamaFileConfig =
            serde_json::from_value(model_config.clone())?;
        let vocab = file_cfg.vocab_size;
        let cfg = file_cfg.into_config()?;
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in weights {
                data.insert(
                    name,
                    Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?,
                );
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let llama = Llama::load(vb, cfg, vocab)?;
        let model = GistModel::from_parts(llama, tokenizer, gist, 0);
        Ok(Self {
            model,
            varmap,
            model_config,
            save_dtype: DType::F32,
            adapter: None,
        })
    }

    /// A gist adapter on a frozen GGUF base (see [`crate::model::adapter`]): the base
    /// dequantized to f32 and frozen, the adapter (gist rows and LoRA) the only variables.
    /// `gist`: the adapter's gist settings, or (a new run) N_g and the position scheme.
    pub fn adapter(
        base: &Path,
        gist: Result<&GistConfig, (usize, PositionScheme)>,
        config: AdapterConfig,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let (json, opts, positions) = match gist {
            Ok(g) => (
                Some(serde_json::to_vec(g)?),
                Default::default(),
                g.positions,
            ),
            Err((n, p)) => (
                None,
                crate::model::LoadOptions {
                    num_gists: n,
                    ..Default::default()
                },
                p,
            ),
        };
        let mut model = GistModel::load_base_for_training(base, device, &opts, json.as_deref())?;
        model.gist.positions = positions;
        let n = model.gist.num_gist_tokens;
        model.llama.freeze_base(n)?;
        let fresh = adapter::fresh(&model.llama, &config, n, seed)?;
        let varmap = VarMap::new();
        let mut tensors = HashMap::new();
        {
            let mut data = varmap.data().lock().expect("varmap lock");
            for (name, t) in fresh {
                let var = Var::from_tensor(&t.to_device(device)?)?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                data.insert(name, var);
            }
        }
        adapter::attach(&mut model.llama, &config, &tensors)?;
        model.fingerprint = 0;
        Ok(Self {
            model,
            varmap,
            model_config: serde_json::Value::Null,
            save_dtype: DType::F32,
            adapter: Some(AdapterRun {
                config,
                base: base.to_path_buf(),
            }),
        })
    }

    /// A new run from the trained adapter folder `dir` on `base` (`train --init-adapter`):
    /// its rank, targets, gist settings and weights. `num_gists`, where it differs from
    /// the adapter's, starts a run with another N_g from the same LoRA, the gist rows
    /// resized ([`adapter::resize_gist_rows`]); segmentation, BOS and positions stay.
    pub fn from_adapter(
        base: &Path,
        dir: &Path,
        num_gists: Option<usize>,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let (config, gist, mut tensors) = adapter::read(dir)?;
        adapter::check_base(base, &config.base)?;
        let gist: GistConfig = serde_json::from_slice(&gist)
            .with_context(|| format!("parsing {}", dir.join("gist.json").display()))?;
        let mut t = match num_gists {
            Some(n) if n != gist.num_gist_tokens => {
                let name = adapter::GIST_EMBEDDINGS;
                let rows = tensors
                    .get(name)
                    .with_context(|| format!("the adapter has no tensor {name}"))?;
                let rows = adapter::resize_gist_rows(rows, n)?;
                tensors.insert(name.to_string(), rows);
                let mut t = Self::adapter(base, Err((n, gist.positions)), config, seed, device)?;
                // The new gist tokens as the tokenizer now has them; every other setting
                // (segmentation, BOS, positions, any added later) the adapter's.
                let fresh = &t.model.gist;
                t.model.gist = GistConfig {
                    num_gist_tokens: n,
                    gist_tokens: fresh.gist_tokens.clone(),
                    gist_token_ids: fresh.gist_token_ids.clone(),
                    ..gist
                };
                t
            }
            _ => Self::adapter(base, Ok(&gist), config, seed, device)?,
        };
        t.init_adapter(&tensors)?;
        Ok(t)
    }

    /// Starts from a trained adapter's tensors (`train --init-adapter`): every variable
    /// takes the stored value of the same name and shape; a missing or extra tensor is
    /// an error, since it means the two adapters differ in rank or targets.
    pub fn init_adapter(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
        let data = self.varmap.data().lock().expect("varmap lock");
        anyhow::ensure!(
            tensors.len() == data.len(),
            "the initial adapter has {} tensors, but this run trains {}",
            tensors.len(),
            data.len()
        );
        for (name, var) in data.iter() {
            let t = tensors
                .get(name)
                .with_context(|| format!("the initial adapter has no tensor {name}"))?;
            anyhow::ensure!(
                t.dims() == var.dims(),
                "the initial adapter's {name} is {:?}, but this run's is {:?}",
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    pub(crate) fn vars(&self, trainable: Trainable) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| {
                trainable == Trainable::All
                    || name.as_str() == "model.embed_tokens.weight"
                    || name.as_str() == "lm_head.weight"
                    || name.as_str() == adapter::GIST_EMBEDDINGS
            })
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Weights as named tensors.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Writes config.json, gist.json and tokenizer.json (everything but the weights).
    pub fn save_model_files(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        if self.adapter.is_some() {
            // An adapter folder has no config.json or tokenizer: both come from its base.
            return Ok(());
        }
        let mut config = self.model_config.clone();
        config["torch_dtype"] = serde_json::json!(match self.save_dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        std::fs::write(
            dir.join("gist.json"),
            serde_json::to_string_pretty(&self.model.gist)?,
        )?;
        self.model
            .tokenizer
            .inner()
            .save(dir.join("tokenizer.json"), true)
            .map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;
        Ok(())
    }

    /// Writes an HF-format model directory.
    pub fn save_model(&self, dir: &Path) -> anyhow::Result<()> {
        if let Some(run) = &self.adapter {
            return adapter::write(
                dir,
                &run.config,
                &self.model.gist,
                &self.weights(),
                self.save_dtype,
            );
        }
        self.save_model_files(dir)?;
        let weights: HashMap<String, Tensor> = self
            .weights()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(self.save_dtype)?.to_device(&Device::Cpu)?)))
            .collect::<anyhow::Result<_>>()?;
        candle_core::safetensors::save(&weights, dir.join("model.safetensors"))?;
        Ok(())
    }
}

/// Adds rows for token ids the embedding does not have yet (gist tokens added to a plain
/// checkpoint), each the mean of the existing rows, to the embedding and the untied head;
/// updates `vocab_size` in the config.
pub fn extend_vocab(
    weights: &mut HashMap<String, Tensor>,
    model_config: &mut serde_json::Value,
    vocab: usize,
) -> anyhow::Result<()> {
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let Some(w) = weights.get(name) else { continue };
        let rows = w.dim(0)?;
        if rows < vocab {
            let mean = w
                .to_dtype(DType::F32)?
                .mean_keepdim(0)?
                .to_dtype(w.dtype())?;
            let extra = mean.broadcast_as((vocab - rows, w.dim(1)?))?.contiguous()?;
            let grown = Tensor::cat(&[w, &extra], 0)?;
            weights.insert(name.to_string(), grown);
        }
    }
    model_config["vocab_size"] = serde_json::json!(vocab);
    Ok(())
}

/// Writes the checkpoint beside the old one, then swaps it in with renames, so a kill at
/// any moment leaves a whole checkpoint.
pub(crate) fn save_checkpoint(
    trainee: &Trainee,
    opt: &AdamW,
    cfg: &TrainConfig,
    progress: &TrainProgress,
    dir: &Path,
) -> anyhow::Result<()> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let cpu = |m: HashMap<String, Tensor>| -> anyhow::Result<HashMap<String, Tensor>> {
        m.into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
            .collect()
    };
    candle_core::safetensors::save(&cpu(trainee.weights())?, tmp.join("model.safetensors"))?;
    candle_core::safetensors::save(&cpu(opt.state())?, tmp.join("optimizer.safetensors"))?;
    let meta = CheckpointMeta {
        config: cfg.clone(),
        progress: progress.clone(),
        model_config: trainee.model_config.clone(),
        gist: trainee.model.gist.clone(),
        adapter: trainee.adapter.clone(),
    };
    std::fs::write(
        tmp.join("trainer.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(&tmp, dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The model and settings of the checkpoint in `out`, to continue it.
pub fn resume_trainee(out: &Path, device: &Device) -> anyhow::Result<(Trainee, TrainConfig)> {
    let ckpt = out.join("checkpoint");
    let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json"))?)
        .context("reading checkpoint/trainer.json")?;
    if let Some(run) = meta.adapter {
        // The variables are set from the checkpoint by `train::run`.
        let trainee = Trainee::adapter(&run.base, Ok(&meta.gist), run.config, 0, device)?;
        return Ok((trainee, meta.config));
    }
    let weights = candle_core::safetensors::load(ckpt.join("model.safetensors"), &Device::Cpu)?;
    let tokenizer = GistTokenizer::from_file(&out.join("tokenizer.json"))?;
    let trainee = Trainee::new(meta.model_config, weights, tokenizer, meta.gist, device)?;
    Ok((trainee, meta.config))
}

/// Starts from an HF model directory; a plain checkpoint gets `num_gists` gist tokens with
/// rows at the mean embedding (the paper starts from Llama-3.2 this way).
pub fn trainee_from_dir(dir: &Path, num_gists: usize, device: &Device) -> anyhow::Result<Trainee> {
    let mut model_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)
            .with_context(|| format!("parsing {}", dir.join("config.json").display()))?;
    let mut tokenizer = GistTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let gist = match std::fs::read(dir.join("gist.json")) {
        Ok(bytes) => serde_json::from_slice::<GistConfig>(&bytes).context("parsing gist.json")?,
        Err(_) => {
            let names = GistConfig::reference_names(num_gists);
            let ids = tokenizer.ensure_special_tokens(&names)?;
            GistConfig {
                num_gist_tokens: num_gists,
                gist_tokens: names,
                gist_token_ids: ids,
                segmentation: Default::default(),
                bos_always_visible: false,
                add_bos: true,
                positions: Default::default(),
                previous_sentence_visible: false,
                sink_distance: None,
                distance_decay: None,
            }
        }
    };
    gist.validate()?;
    let mut weights = HashMap::new();
    for f in crate::model::safetensors_files(dir)? {
        weights.extend(candle_core::safetensors::load(&f, &Device::Cpu)?);
    }
    let vocab = (model_config["vocab_size"].as_u64().unwrap_or(0) as usize)
        .max(*gist.gist_token_ids.iter().max().expect("validated") as usize + 1);
    extend_vocab(&mut weights, &mut model_config, vocab)?;
    Trainee::new(model_config, weights, tokenizer, gist, device)
}

/// A new random model of `spec`'s shape with the tokenizer at `tokenizer` (which must have
/// `<s>` and `</s>`; gist tokens are added if missing).
pub fn trainee_from_scratch(
    tokenizer: &Path,
    spec: &crate::model::random::RandomSpec,
    device: &Device,
) -> anyhow::Result<Trainee> {
    let mut tok = GistTokenizer::from_file(tokenizer)?;
    let names = GistConfig::reference_names(spec.num_gists);
    let ids = tok.ensure_special_tokens(&names)?;
    let bos = tok
        .token_to_id("<s>")
        .context("the tokenizer has no <s> token")?;
    let eos = tok
        .token_to_id("</s>")
        .context("the tokenizer has no </s> token")?;
    let vocab = tok.vocab_size();
    let gist = GistConfig {
        num_gist_tokens: spec.num_gists,
        gist_tokens: names,
        gist_token_ids: ids,
        segmentation: spec.segmentation.clone(),
        bos_always_visible: false,
        add_bos: true,
        positions: Default::default(),
        previous_sentence_visible: false,
        sink_distance: None,
        distance_decay: None,
    };
    let model_config = crate::model::random::config_json(spec, vocab, bos, eos);
    let weights = crate::model::random::random_weights(spec, vocab)?;
    Trainee::new(model_config, weights, tok, gist, device)
}
