//! `giststream train`: trains a gist Llama (or a full-attention baseline) with candle's
//! autograd, on the parallel path with differentiable ops.
//!
//! The run is a list of stages (the paper's recipe is three: embeddings and head only, then
//! everything, then a large-batch cool-down to lr 0). Each optimizer step takes `batch`
//! sequences of `seq_tokens` regular tokens (whole sentences, gists inserted), split into
//! micro-batches whose gradients are summed. The data order is a pure function of the seed
//! and the number of sequences seen, and the checkpoint holds weights, AdamW moments and
//! that counter, so a run killed and resumed follows the same loss curve.
//!
//! Output: an HF-format directory (config.json, model.safetensors, tokenizer.json,
//! gist.json) that every other command loads, plus `checkpoint/` and `train-log.jsonl`.

use crate::model::config::GistConfig;
use crate::model::llama::{CausalPlan, Llama, Logits, Ops, SentencePlan};
use crate::model::{DocumentEncoder, GistModel};
use crate::parallel::Layout;
use crate::tiny::SplitMix;
use crate::tokenize::{GistTokenizer, Segment};
use anyhow::{bail, ensure, Context};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Configuration (defaults in the recipes below)
// ---------------------------------------------------------------------------------------

/// Which parameters a stage updates; the rest stay bit-identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Token embeddings and the LM head (the paper's stage 1: teach the new gist tokens).
    Embeddings,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup, then cosine from `lr` to `lr_end`.
    Cosine,
    /// Linear warmup, then linear from `lr` to `lr_end`.
    Linear,
}

/// Attention the model trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Sentence attention with gist tokens.
    Gist,
    /// Plain causal attention, no gists: the baseline.
    Full,
    /// Sentence attention through a dense T x T mask (the reference code's way): the same
    /// result as `gist`, for measuring what the blockwise mask saves.
    GistDense,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    /// Regular tokens to train on in this stage.
    pub tokens: u64,
    /// Sequences per optimizer step.
    pub batch: usize,
    pub lr: f64,
    pub lr_end: f64,
    pub warmup_steps: usize,
    pub schedule: Schedule,
    pub trainable: Trainable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    // data
    /// Regular tokens per training sequence (whole sentences up to this many).
    pub seq_tokens: usize,
    /// Sequences per forward; a step's batch is split into these.
    pub micro_batch: usize,
    // method
    pub attention: Attention,
    /// Also score predictions of gist tokens (the reference code does; off by default).
    pub gist_loss: bool,
    // AdamW (the paper: weight decay 0.1, betas 0.9/0.95)
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip: f64,
    pub stages: Vec<Stage>,
    pub seed: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Wall-clock budget: after [`CALIBRATION_STEPS`] steps the token budgets of all stages
    /// are scaled so the run ends in time with its schedules complete (warmup and decay
    /// keep their shape). None: train exactly `tokens`.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    /// Whether the budgets were already scaled (a resumed run keeps them).
    #[serde(default)]
    pub calibrated: bool,
}

/// Steps timed before a `max_seconds` run fixes its token budgets.
pub const CALIBRATION_STEPS: usize = 10;

impl TrainConfig {
    /// One stage, everything trained: pretraining from scratch (the baseline, or a model
    /// to gist-tune later).
    pub fn scratch(tokens: u64, lr: f64, batch: usize) -> Self {
        Self::with_stages(vec![Stage {
            name: "pretrain".into(),
            tokens,
            batch,
            lr,
            lr_end: lr / 10.0,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            trainable: Trainable::All,
        }])
    }

    /// The paper's three stages with its token proportions (0.1B : 2B : 2B) and batch
    /// proportions (64 : 128 : 512, here batch, 2·batch, 8·batch), scaled to `tokens`.
    pub fn paper(tokens: u64, lr: f64, batch: usize) -> Self {
        let part = |n: u64| tokens * n / 41;
        Self::with_stages(vec![
            Stage {
                name: "embeddings".into(),
                tokens: part(1),
                batch,
                lr,
                lr_end: lr / 2.0,
                warmup_steps: 100,
                schedule: Schedule::Cosine,
                trainable: Trainable::Embeddings,
            },
            Stage {
                name: "full".into(),
                tokens: part(20),
                batch: 2 * batch,
                lr,
                lr_end: lr / 2.0,
                warmup_steps: 100,
                schedule: Schedule::Cosine,
                trainable: Trainable::All,
            },
            Stage {
                name: "cooldown".into(),
                tokens: part(20),
                batch: 8 * batch,
                lr: lr / 2.0,
                lr_end: 0.0,
                warmup_steps: 0,
                schedule: Schedule::Linear,
                trainable: Trainable::All,
            },
        ])
    }

    fn with_stages(stages: Vec<Stage>) -> Self {
        Self {
            seq_tokens: 256,
            micro_batch: 8,
            attention: Attention::Gist,
            gist_loss: false,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            stages,
            seed: 1,
            checkpoint_every: 50,
            max_seconds: None,
            calibrated: false,
        }
    }

    /// Optimizer steps of a stage.
    pub fn steps(&self, stage: usize) -> usize {
        let s = &self.stages[stage];
        (s.tokens as usize)
            .div_ceil(s.batch * self.seq_tokens)
            .max(1)
    }
}

/// Learning rate at `step` (0-based) of `steps` in `stage`.
pub fn learning_rate(stage: &Stage, step: usize, steps: usize) -> f64 {
    if step < stage.warmup_steps {
        return stage.lr * (step + 1) as f64 / stage.warmup_steps as f64;
    }
    let span = steps.saturating_sub(stage.warmup_steps).max(1) as f64;
    let t = ((step - stage.warmup_steps) as f64 / span).min(1.0);
    match stage.schedule {
        Schedule::Cosine => {
            stage.lr_end
                + 0.5 * (stage.lr - stage.lr_end) * (1.0 + (std::f64::consts::PI * t).cos())
        }
        Schedule::Linear => stage.lr + (stage.lr_end - stage.lr) * t,
    }
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

/// Training sequences: runs of whole segments of a document, up to `seq_tokens` regular
/// tokens each, every one starting with BOS.
pub fn sequences(
    texts: &[String],
    tokenizer: &GistTokenizer,
    gist: &GistConfig,
    bos: u32,
    seq_tokens: usize,
) -> anyhow::Result<Vec<Vec<Segment>>> {
    let mut out = Vec::new();
    for text in texts {
        let mut enc = DocumentEncoder::new(tokenizer, gist, Some(bos));
        let mut segs = enc.push(text)?;
        segs.extend(enc.finish()?);
        let mut cur: Vec<Segment> = Vec::new();
        let mut n = 0;
        for mut seg in segs {
            if n + seg.tokens.len() > seq_tokens && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                n = 0;
            }
            if cur.is_empty() && seg.tokens.first() != Some(&bos) {
                seg.tokens.insert(0, bos);
            }
            seg.tokens.truncate(seq_tokens);
            n += seg.tokens.len();
            cur.push(seg);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    Ok(out)
}

/// The `k`-th sequence of the endless shuffled stream: epoch `k / n` is a permutation of
/// all sequences seeded by (seed, epoch).
fn stream_index(k: u64, n: usize, seed: u64, perm: &mut (u64, Vec<usize>)) -> usize {
    let epoch = k / n as u64;
    if perm.1.len() != n || perm.0 != epoch {
        let mut p: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix(seed ^ epoch.wrapping_mul(0x9e37_79b9));
        for i in (1..n).rev() {
            p.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        *perm = (epoch, p);
    }
    perm.1[(k % n as u64) as usize]
}

// ---------------------------------------------------------------------------------------
// Loss and optimizer
// ---------------------------------------------------------------------------------------

/// Rows that predict a scored token, and the tokens: row i predicts row i + 1 of the same
/// document when that is a regular token (or any token with `gist_loss`).
pub fn loss_rows(layout: &Layout, gist_loss: bool) -> (Vec<u32>, Vec<u32>) {
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for doc in &layout.docs {
        for i in doc.rows.start..doc.rows.end.saturating_sub(1) {
            if gist_loss || layout.regular[i + 1] {
                rows.push(i as u32);
                targets.push(layout.ids[i + 1]);
            }
        }
    }
    (rows, targets)
}

/// Mean cross-entropy (natural log) of `model` on `seqs`, as a graph node for backward.
pub fn loss(
    model: &GistModel,
    seqs: &[Vec<Segment>],
    attention: Attention,
    gist_loss: bool,
    ops: Ops,
) -> anyhow::Result<(Tensor, usize)> {
    let layout = Layout::new(model, seqs, attention != Attention::Full);
    let dev = model.llama.device();
    let ids = Tensor::new(layout.ids.as_slice(), dev)?;
    let (rows, targets) = loss_rows(&layout, gist_loss);
    ensure!(!rows.is_empty(), "a training batch has no token to predict");
    let logits_rows = Logits::Rows(Tensor::new(rows.as_slice(), dev)?);
    let dtype = model.llama.dtype();
    let logits = match attention {
        Attention::Gist => {
            let mut plan = SentencePlan::new(&layout.docs, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, &logits_rows)?
        }
        Attention::Full => {
            let docs: Vec<_> = layout.docs.iter().map(|d| d.rows.clone()).collect();
            let mut plan = CausalPlan::new(&docs, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, &logits_rows)?
        }
        Attention::GistDense => {
            let mut plan = crate::model::llama::DensePlan::new(&layout.docs, dtype, dev, ops)?;
            model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, &logits_rows)?
        }
    }
    .expect("rows requested");
    let targets = Tensor::new(targets.as_slice(), dev)?;
    let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
    Ok((loss, rows.len()))
}

/// AdamW with decoupled weight decay on matrices (not norms), its moments exposed so a
/// checkpoint can hold them (candle-nn's AdamW keeps them private, which rules out an
/// exact resume).
pub struct AdamW {
    /// (name, parameter, first moment, second moment)
    params: Vec<(String, Var, Tensor, Tensor)>,
    pub t: u64,
}

impl AdamW {
    /// AdamW over every parameter a stage of `trainable` trains.
    pub fn for_trainee(t: &Trainee, trainable: Trainable) -> anyhow::Result<Self> {
        Self::new(t.vars(trainable))
    }

    pub fn new(params: Vec<(String, Var)>) -> anyhow::Result<Self> {
        let params = params
            .into_iter()
            .map(|(n, v)| {
                let z = v.as_tensor().zeros_like()?;
                Ok((n, v, z.clone(), z))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { params, t: 0 })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.0.as_str())
    }

    /// The parameters it updates, by name.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.0.as_str(), &p.1))
    }

    /// One update with `grads` (sums over the step's micro-batches, already scaled).
    pub fn step(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        cfg: &TrainConfig,
    ) -> anyhow::Result<()> {
        self.t += 1;
        let (b1, b2) = (cfg.beta1, cfg.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (name, var, m, v) in &mut self.params {
            let g = grads
                .get(name)
                .with_context(|| format!("no gradient for {name}"))?;
            *m = ((&*m * b1)? + (g * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + cfg.eps)?)?;
            let mut theta = var.as_tensor().clone();
            if theta.rank() >= 2 {
                theta = (theta * (1.0 - lr * cfg.weight_decay))?;
            }
            var.set(&(theta - (update * lr)?)?)?;
        }
        Ok(())
    }

    fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, _, m, v) in &self.params {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>, t: u64) -> anyhow::Result<()> {
        for (name, _, m, v) in &mut self.params {
            *m = state
                .get(&format!("m.{name}"))
                .with_context(|| format!("optimizer state lacks {name}"))?
                .clone();
            *v = state
                .get(&format!("v.{name}"))
                .with_context(|| format!("optimizer state lacks {name}"))?
                .clone();
        }
        self.t = t;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// Where a run is; saved in `checkpoint/trainer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub stage: usize,
    pub stage_step: usize,
    pub step: usize,
    /// Sequences consumed from the data stream.
    pub sequences_seen: u64,
    pub tokens_seen: u64,
    pub optimizer_t: u64,
    pub last_loss: f32,
}

/// What the checkpoint holds beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    config: TrainConfig,
    progress: Progress,
    /// config.json of the model being trained.
    model_config: serde_json::Value,
    gist: GistConfig,
}

/// One logged step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub step: usize,
    pub stage: String,
    pub lr: f64,
    pub loss: f32,
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
}

/// A model being trained: its weights live in a VarMap so candle's autograd sees them.
pub struct Trainee {
    pub model: GistModel,
    pub varmap: VarMap,
    pub model_config: serde_json::Value,
    /// Precision of the weights written to the model directory (checkpoints stay f32).
    pub save_dtype: DType,
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
        })
    }

    fn vars(&self, trainable: Trainable) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut vars: Vec<(String, Var)> = data
            .iter()
            .filter(|(name, _)| {
                trainable == Trainable::All
                    || name.as_str() == "model.embed_tokens.weight"
                    || name.as_str() == "lm_head.weight"
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

/// Runs (or resumes) training, writing the model to `out`. `report` sees every step.
pub fn run(
    trainee: &mut Trainee,
    cfg_in: &TrainConfig,
    data: &[Vec<Segment>],
    out: &Path,
    resume: bool,
    mut report: impl FnMut(&LogLine, usize),
) -> anyhow::Result<Progress> {
    ensure!(
        !data.is_empty(),
        "no training sequences: is the data folder empty?"
    );
    let mut cfg = cfg_in.clone();
    let run_started = std::time::Instant::now();
    let mut sequences_at_start = 0;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ckpt = out.join("checkpoint");
    let mut progress = Progress {
        stage: 0,
        stage_step: 0,
        step: 0,
        sequences_seen: 0,
        tokens_seen: 0,
        optimizer_t: 0,
        last_loss: f32::NAN,
    };
    let mut opt_state: Option<HashMap<String, Tensor>> = None;
    if ckpt.join("trainer.json").exists() {
        if !resume {
            bail!(
                "{} holds a checkpoint: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        let meta: CheckpointMeta =
            serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json"))?)
                .context("reading checkpoint/trainer.json")?;
        progress = meta.progress;
        cfg = meta.config;
        sequences_at_start = progress.sequences_seen;
        let dev = trainee.model.llama.device().clone();
        let weights = candle_core::safetensors::load(ckpt.join("model.safetensors"), &dev)?;
        let data = trainee.varmap.data().lock().expect("varmap lock");
        for (name, var) in data.iter() {
            let w = weights
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?;
            var.set(w)?;
        }
        drop(data);
        opt_state = Some(candle_core::safetensors::load(
            ckpt.join("optimizer.safetensors"),
            &dev,
        )?);
    }
    trainee.save_model_files(out)?;
    let log_path = out.join("train-log.jsonl");
    let mut perm = (u64::MAX, Vec::new());
    while progress.stage < cfg.stages.len() {
        let stage = cfg.stages[progress.stage].clone();
        let steps = cfg.steps(progress.stage);
        let mut opt = AdamW::new(trainee.vars(stage.trainable))?;
        if let Some(state) = opt_state.take() {
            // A checkpoint taken at a stage boundary holds no moments (t = 0).
            if progress.optimizer_t > 0 {
                opt.load_state(&state, progress.optimizer_t)?;
            }
        }
        let mut steps = steps;
        while progress.stage_step < steps {
            if !cfg.calibrated && progress.step == CALIBRATION_STEPS {
                if let Some(budget) = cfg.max_seconds {
                    calibrate(
                        &mut cfg,
                        &progress,
                        run_started.elapsed().as_secs_f64(),
                        budget,
                        progress.sequences_seen - sequences_at_start,
                    );
                    steps = cfg.steps(progress.stage).max(progress.stage_step + 1);
                }
            }
            let started = std::time::Instant::now();
            let lr = learning_rate(&stage, progress.stage_step, steps);
            let batch: Vec<Vec<Segment>> = (0..stage.batch as u64)
                .map(|i| {
                    let k = progress.sequences_seen + i;
                    data[stream_index(k, data.len(), cfg.seed, &mut perm)].clone()
                })
                .collect();
            let (loss, tokens) = train_step(trainee, &mut opt, &batch, lr, &cfg)?;
            progress.sequences_seen += stage.batch as u64;
            progress.tokens_seen += tokens as u64;
            progress.stage_step += 1;
            progress.step += 1;
            progress.optimizer_t = opt.t;
            progress.last_loss = loss;
            let line = LogLine {
                step: progress.step,
                stage: stage.name.clone(),
                lr,
                loss,
                tokens_seen: progress.tokens_seen,
                tokens_per_second: tokens as f64 / started.elapsed().as_secs_f64(),
            };
            append_line(&log_path, &serde_json::to_string(&line)?)?;
            report(&line, steps);
            if progress.stage_step == steps {
                // The next stage starts with fresh optimizer moments.
                progress.stage += 1;
                progress.stage_step = 0;
                progress.optimizer_t = 0;
                save_checkpoint(trainee, &AdamW::new(Vec::new())?, &cfg, &progress, &ckpt)?;
                break;
            }
            if progress.step.is_multiple_of(cfg.checkpoint_every.max(1)) {
                save_checkpoint(trainee, &opt, &cfg, &progress, &ckpt)?;
            }
        }
    }
    trainee.save_model(out)?;
    Ok(progress)
}

/// Scales every stage's token budget so the sequences still to come fit the time left at
/// the pace measured so far.
fn calibrate(
    cfg: &mut TrainConfig,
    progress: &Progress,
    elapsed: f64,
    budget: f64,
    sequences: u64,
) {
    cfg.calibrated = true;
    if sequences == 0 || elapsed <= 0.0 {
        return;
    }
    let per_sequence = elapsed / sequences as f64;
    let affordable = ((budget - elapsed).max(0.0) / per_sequence) as u64;
    let planned: u64 = (0..cfg.stages.len())
        .map(|i| (cfg.steps(i) * cfg.stages[i].batch) as u64)
        .sum::<u64>()
        .saturating_sub(progress.sequences_seen);
    if planned == 0 {
        return;
    }
    let f =
        (affordable + progress.sequences_seen) as f64 / (planned + progress.sequences_seen) as f64;
    for s in &mut cfg.stages {
        s.tokens = ((s.tokens as f64 * f) as u64).max(1);
    }
}

/// One optimizer step on `batch`: forward and backward over its micro-batches, gradient
/// clipping, AdamW. Returns the batch's mean loss and its scored tokens.
pub fn train_step(
    trainee: &Trainee,
    opt: &mut AdamW,
    batch: &[Vec<Segment>],
    lr: f64,
    cfg: &TrainConfig,
) -> anyhow::Result<(f32, usize)> {
    let model = &trainee.model;
    // Gradients of the batch's summed NLL, divided by its token count once at the end:
    // the mean over all scored tokens, however the micro-batches split them.
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut loss_sum, mut total) = (0f64, 0usize);
    for micro in batch.chunks(cfg.micro_batch.max(1)) {
        let (loss, n) = loss(
            model,
            micro,
            cfg.attention,
            cfg.gist_loss,
            Ops::Differentiable,
        )?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        total += n;
        let store: GradStore = (loss * n as f64)?.backward()?;
        for (name, var) in opt.params() {
            let Some(g) = store.get(var.as_tensor()) else {
                continue;
            };
            let acc = match grads.remove(name) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            grads.insert(name.to_string(), acc);
        }
    }
    for g in grads.values_mut() {
        *g = (&*g / total as f64)?;
    }
    let names: Vec<String> = opt.names().map(str::to_string).collect();
    for name in &names {
        ensure!(
            grads.contains_key(name),
            "{name} received no gradient: a non-differentiable op is on its path"
        );
    }
    if cfg.grad_clip > 0.0 {
        let mut sq = 0f64;
        for g in grads.values() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let norm = sq.sqrt();
        if norm > cfg.grad_clip {
            let k = cfg.grad_clip / norm;
            for g in grads.values_mut() {
                *g = (&*g * k)?;
            }
        }
    }
    opt.step(&grads, lr, cfg)?;
    Ok(((loss_sum / total as f64) as f32, total))
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Writes the checkpoint beside the old one, then swaps it in with renames, so a kill at
/// any moment leaves a whole checkpoint.
fn save_checkpoint(
    trainee: &Trainee,
    opt: &AdamW,
    cfg: &TrainConfig,
    progress: &Progress,
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

/// Reads every `.txt` file under `dir` (sorted, so runs are reproducible).
pub fn read_texts(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .with_context(|| format!("reading {} (UTF-8 text expected)", f.display()))
        })
        .collect()
}

/// The model and settings of the checkpoint in `out`, to continue it.
pub fn resume_trainee(out: &Path, device: &Device) -> anyhow::Result<(Trainee, TrainConfig)> {
    let ckpt = out.join("checkpoint");
    let meta: CheckpointMeta = serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json"))?)
        .context("reading checkpoint/trainer.json")?;
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
    spec: &crate::tiny::TinySpec,
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
    };
    let model_config = crate::tiny::config_json(spec, vocab, bos, eos);
    let weights = crate::tiny::random_weights(spec, vocab)?;
    Trainee::new(model_config, weights, tok, gist, device)
}
