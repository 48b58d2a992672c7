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
//! gist.json) that every other command loads, plus `checkpoint/`, `train-log.jsonl` and,
//! with held-out text, `valid-log.jsonl` (the validation curve, see [`validation`]).

pub mod config;
pub mod cross_entropy;
pub mod data;
pub mod eval;
pub mod memory;
pub mod optim;
pub mod passkey;
pub mod qa;
pub mod trainee;
pub mod validation;

pub use config::{Attention, Schedule, Stage, TrainConfig, Trainable};
pub use data::{read_texts, sequences};
pub use optim::AdamW;
pub use trainee::{resume_trainee, trainee_from_dir, trainee_from_scratch, Trainee};
pub use validation::{ValidDoc, ValidLine, ValidationConfig};

use crate::model::ops::Ops;
use crate::text::tokenize::Segment;
use anyhow::{bail, ensure, Context};
use candle_core::{backprop::GradStore, Tensor};
use config::{learning_rate, CALIBRATION_STEPS};
use data::stream_index;
use memory::Memory;
use optim::loss;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use trainee::{save_checkpoint, CheckpointMeta};

/// Where a run is; saved in `checkpoint/trainer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainProgress {
    pub stage: usize,
    pub stage_step: usize,
    pub step: usize,
    /// Sequences consumed from the data stream.
    pub sequences_seen: u64,
    pub tokens_seen: u64,
    pub optimizer_t: u64,
    pub last_loss: f32,
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

/// What a run reports as it goes.
pub enum Event<'a> {
    /// A step was trained; the second field is the steps its stage now plans.
    Step(&'a LogLine, usize),
    /// The held-out set was scored.
    Validated(&'a ValidLine),
}

/// What `run` does with a checkpoint already in `out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Refuse it: a new run never overwrites one.
    No,
    /// Continue its plan.
    Continue,
    /// End the run where the checkpoint stands: the plan is cut to the steps taken
    /// (`TrainConfig::cut_to`) and the model is written, to ship a run stopped early.
    Finish,
}

/// What a run trains on.
#[derive(Clone, Copy)]
enum Data<'a> {
    /// Text sequences, every regular token scored.
    Text(&'a [Vec<Segment>]),
    /// Questions over documents (see [`qa`]).
    Qa(&'a [qa::QaSequence]),
}

impl Data<'_> {
    fn len(&self) -> usize {
        match self {
            Data::Text(d) => d.len(),
            Data::Qa(d) => d.len(),
        }
    }
}

/// Runs (or resumes) training, writing the model to `out`. `valid`: the held-out
/// documents scored every `cfg.validation.every` steps (empty: none). `report` sees every
/// step and every scoring. `data` may be empty with `Resume::Finish`, which trains nothing.
pub fn run(
    trainee: &mut Trainee,
    cfg_in: &TrainConfig,
    data: &[Vec<Segment>],
    valid: &[ValidDoc],
    out: &Path,
    resume: Resume,
    report: impl FnMut(Event<'_>),
) -> anyhow::Result<TrainProgress> {
    run_on(
        trainee,
        cfg_in,
        Data::Text(data),
        valid,
        out,
        resume,
        report,
    )
}

/// [`run`] on questions and answers over documents (see [`qa`]); `cfg_in.qa_text_weight`
/// must be set.
pub fn run_qa(
    trainee: &mut Trainee,
    cfg_in: &TrainConfig,
    data: &[qa::QaSequence],
    valid: &[ValidDoc],
    out: &Path,
    resume: Resume,
    report: impl FnMut(Event<'_>),
) -> anyhow::Result<TrainProgress> {
    run_on(trainee, cfg_in, Data::Qa(data), valid, out, resume, report)
}

fn run_on(
    trainee: &mut Trainee,
    cfg_in: &TrainConfig,
    data: Data<'_>,
    valid: &[ValidDoc],
    out: &Path,
    resume: Resume,
    mut report: impl FnMut(Event<'_>),
) -> anyhow::Result<TrainProgress> {
    match (&data, cfg_in.qa_text_weight) {
        (Data::Text(_), Some(_)) => {
            bail!("this run trains on questions and answers: give them (train --qa)")
        }
        (Data::Qa(_), None) => bail!("a question/answer run needs TrainConfig::qa_text_weight"),
        _ => {}
    }
    ensure!(
        data.len() > 0 || resume == Resume::Finish,
        "no training sequences: is the data folder empty?"
    );
    let mut cfg = cfg_in.clone();
    let run_started = std::time::Instant::now();
    let mut sequences_at_start = 0;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ckpt = out.join("checkpoint");
    let mut progress = TrainProgress {
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
        if resume == Resume::No {
            bail!(
                "{} holds a checkpoint: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        let meta: CheckpointMeta =
            serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json"))?)
                .context("reading checkpoint/trainer.json")?;
        progress = meta.progress;
        let questions = meta.config.qa_text_weight.is_some();
        ensure!(
            questions == matches!(data, Data::Qa(_)),
            "the checkpoint in {} is a {} run: resume it with its kind of data",
            out.display(),
            if questions {
                "question/answer (--qa FILE)"
            } else {
                "text (--data DIR)"
            },
        );
        // The checkpoint's settings, but validation as given (`cfg_in` holds the
        // checkpoint's unless the caller added or changed it: scoring changes no weight).
        cfg = TrainConfig {
            validation: cfg_in.validation.clone(),
            ..meta.config
        };
        if resume == Resume::Finish {
            cfg.cut_to(&progress);
        }
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
    } else if resume == Resume::Finish {
        bail!(
            "{} holds no checkpoint (checkpoint/trainer.json): there is no run to finish",
            out.display()
        );
    }
    trainee.save_model_files(out)?;
    let log_path = out.join("train-log.jsonl");
    let valid_every = match &cfg.validation {
        Some(v) if !valid.is_empty() => v.every.max(1),
        _ => 0,
    };
    // The curve starts at the weights the run starts from: before the first step, or
    // where a resumed run first adds validation.
    let valid_log = out.join("valid-log.jsonl");
    if valid_every > 0 && (progress.step == 0 || !valid_log.exists()) {
        report(Event::Validated(&validate(
            trainee, valid, &cfg, &progress, &valid_log,
        )?));
    }
    let mut perm = (u64::MAX, Vec::new());
    let span = cfg.memory_span.max(1);
    let text = match data {
        Data::Text(d) => d,
        Data::Qa(_) => {
            ensure!(
                span == 1,
                "questions and answers train without a memory span"
            );
            &[]
        }
    };
    let spans = if span > 1 && resume != Resume::Finish {
        ensure!(
            cfg.attention == Attention::Gist,
            "a memory span trains sentence attention (--attention gist)"
        );
        let starts = memory::span_starts(text, span);
        ensure!(
            !starts.is_empty(),
            "no document has {span} consecutive sequences: lower the memory span or the \
             sequence length"
        );
        starts
    } else {
        Vec::new()
    };
    // Each batch slot's memory: the kept rows of its document's sequences so far.
    let mut memories: Vec<Memory> = Vec::new();
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
            let mut pick = |i: u64| {
                let k = progress.sequences_seen + i;
                stream_index(k, data.len(), cfg.seed, &mut perm)
            };
            let (loss, tokens) = if let Data::Qa(qa) = data {
                let batch: Vec<qa::QaSequence> = (0..stage.batch as u64)
                    .map(|i| qa[pick(i)].clone())
                    .collect();
                let weight = cfg.qa_text_weight.unwrap_or(1.0);
                qa_step(trainee, &mut opt, &batch, weight, lr, &cfg)?
            } else if span == 1 {
                let batch: Vec<Vec<Segment>> = (0..stage.batch as u64)
                    .map(|i| text[pick(i)].clone())
                    .collect();
                train_step(trainee, &mut opt, &batch, lr, &cfg)?
            } else {
                let texts = SpanStep::at(&progress, stage.batch, span, &spans, cfg.seed, &mut perm);
                let bos = trainee.model.bos_token_id();
                if texts.part == 0 || memories.len() != stage.batch {
                    memories = texts.rebuild_memory(trainee, text, bos, &cfg)?;
                }
                let batch = texts.sequences(text, texts.part, bos);
                let (loss, tokens, carried) =
                    train_step_carried(trainee, &mut opt, &batch, Some(&memories), lr, &cfg)?;
                memories = carried;
                (loss, tokens)
            };
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
            report(Event::Step(&line, steps));
            let last = progress.stage_step == steps && progress.stage + 1 == cfg.stages.len();
            if valid_every > 0 && (last || progress.step.is_multiple_of(valid_every)) {
                report(Event::Validated(&validate(
                    trainee, valid, &cfg, &progress, &valid_log,
                )?));
            }
            if progress.stage_step < steps
                && progress.step.is_multiple_of(cfg.checkpoint_every.max(1))
            {
                save_checkpoint(trainee, &opt, &cfg, &progress, &ckpt)?;
            }
        }
        // The stage is done: its last step, or a checkpoint with no steps left (a plan cut
        // to end a run where it stands: `Resume::Finish`). The next stage starts with fresh
        // optimizer moments.
        progress.stage += 1;
        progress.stage_step = 0;
        progress.optimizer_t = 0;
        save_checkpoint(trainee, &AdamW::new(Vec::new())?, &cfg, &progress, &ckpt)?;
    }
    trainee.save_model(out)?;
    Ok(progress)
}

/// Scores the held-out set with the weights as they are and appends the point to `log`
/// (`valid-log.jsonl`).
fn validate(
    trainee: &Trainee,
    valid: &[ValidDoc],
    cfg: &TrainConfig,
    progress: &TrainProgress,
    log: &Path,
) -> anyhow::Result<ValidLine> {
    let started = std::time::Instant::now();
    let (loss, tokens) = validation::score(&trainee.model, valid, cfg)?;
    let line = ValidLine {
        step: progress.step,
        tokens_seen: progress.tokens_seen,
        loss,
        perplexity: loss.exp(),
        tokens,
        documents: valid.len(),
        seconds: started.elapsed().as_secs_f64(),
        data: cfg
            .validation
            .as_ref()
            .map(|v| v.data.clone())
            .unwrap_or_default(),
    };
    append_line(log, &serde_json::to_string(&line)?)?;
    Ok(line)
}

/// Shrinks every stage's token budget so the sequences still to come fit the time left at
/// the pace measured so far. It never grows one: the budget is a limit, and a run given
/// more time than its tokens need trains the tokens asked for (a run resumed with a
/// generous budget once had its plan grown from 49 steps to 123 and its schedule
/// stretched).
fn calibrate(
    cfg: &mut TrainConfig,
    progress: &TrainProgress,
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
    if f >= 1.0 {
        return;
    }
    for s in &mut cfg.stages {
        s.tokens = ((s.tokens as f64 * f) as u64).max(1);
    }
}

/// Where a step of a memory-span run is: `batch` documents of `span` consecutive
/// sequences each, read one sequence a step.
struct SpanStep {
    /// Each slot's document: the index of its first sequence.
    starts: Vec<usize>,
    /// Which of its sequences this step reads (0..span).
    part: usize,
}

impl SpanStep {
    /// The data order: document `d` is span start `stream_index(d)`, a pure function of
    /// the seed and the sequences seen, like a plain run's.
    fn at(
        progress: &TrainProgress,
        batch: usize,
        span: usize,
        spans: &[usize],
        seed: u64,
        perm: &mut (u64, Vec<usize>),
    ) -> Self {
        let step = progress.sequences_seen / batch as u64;
        let first_doc = step / span as u64 * batch as u64;
        let starts = (0..batch as u64)
            .map(|i| spans[stream_index(first_doc + i, spans.len(), seed, perm)])
            .collect();
        SpanStep {
            starts,
            part: (step % span as u64) as usize,
        }
    }

    /// Part `part` of every slot's document; parts after the first continue a memory
    /// that holds the document's BOS.
    fn sequences(&self, data: &[Vec<Segment>], part: usize, bos: Option<u32>) -> Vec<Vec<Segment>> {
        self.starts
            .iter()
            .map(|&s| match part {
                0 => data[s].clone(),
                _ => memory::without_bos(&data[s + part], bos),
            })
            .collect()
    }

    /// The memories before this step's part: empty at a document's start; after a resume
    /// mid-document, recomputed by forwards over the earlier parts with the current
    /// weights. A run never stopped computed them with the weights of their own steps, so
    /// a resumed run differs from it for the rest of that document (at learning rate 0,
    /// not at all).
    fn rebuild_memory(
        &self,
        trainee: &Trainee,
        data: &[Vec<Segment>],
        bos: Option<u32>,
        cfg: &TrainConfig,
    ) -> anyhow::Result<Vec<Memory>> {
        let mut memories = vec![Memory::default(); self.starts.len()];
        for part in 0..self.part {
            let seqs = self.sequences(data, part, bos);
            let mut next = Vec::with_capacity(seqs.len());
            let mb = cfg.micro_batch.max(1);
            for (seqs, mems) in seqs.chunks(mb).zip(memories.chunks(mb)) {
                next.extend(memory::extend(
                    &trainee.model,
                    seqs,
                    mems,
                    Ops::Differentiable,
                )?);
            }
            memories = next;
        }
        Ok(memories)
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
    let (loss, tokens, _) = train_step_carried(trainee, opt, batch, None, lr, cfg)?;
    Ok((loss, tokens))
}

/// [`train_step`] where sequence `i` of `batch` continues `memory[i]` (see [`memory`]);
/// also returns the memories extended by the batch's kept rows (empty without memory).
pub fn train_step_carried(
    trainee: &Trainee,
    opt: &mut AdamW,
    batch: &[Vec<Segment>],
    memory: Option<&[Memory]>,
    lr: f64,
    cfg: &TrainConfig,
) -> anyhow::Result<(f32, usize, Vec<Memory>)> {
    let model = &trainee.model;
    let mut carried = Vec::new();
    let mb = cfg.micro_batch.max(1);
    let micros: Vec<&[Vec<Segment>]> = batch.chunks(mb).collect();
    let (loss, total) = accumulate_step(opt, micros.len(), lr, cfg, |i| {
        let micro = micros[i];
        let (loss, n) = match memory {
            None => loss(
                model,
                micro,
                cfg.attention,
                cfg.gist_loss,
                Ops::Differentiable,
            )?,
            Some(memory) => {
                let mems = &memory[i * mb..i * mb + micro.len()];
                let (loss, n, more) =
                    memory::loss_continued(model, micro, mems, cfg.gist_loss, Ops::Differentiable)?;
                carried.extend(more);
                (loss, n)
            }
        };
        Ok((loss, n, n))
    })?;
    Ok((loss, total, carried))
}

/// One optimizer step on questions and answers (see [`qa::loss`]): every sequence weighs
/// the same in the step, however long its answer. Returns the mean loss and the tokens
/// scored.
pub fn qa_step(
    trainee: &Trainee,
    opt: &mut AdamW,
    batch: &[qa::QaSequence],
    text_weight: f64,
    lr: f64,
    cfg: &TrainConfig,
) -> anyhow::Result<(f32, usize)> {
    let micros: Vec<&[qa::QaSequence]> = batch.chunks(cfg.micro_batch.max(1)).collect();
    accumulate_step(opt, micros.len(), lr, cfg, |i| {
        let (loss, tokens) = qa::loss(&trainee.model, micros[i], text_weight, Ops::Differentiable)?;
        Ok((loss, micros[i].len(), tokens))
    })
}

/// Forward and backward over `micros` micro-batches (`micro(i)`: its mean loss, its
/// weight in the step, the tokens it scored), gradient clipping, AdamW. Returns the
/// step's weighted mean loss and the tokens scored.
fn accumulate_step(
    opt: &mut AdamW,
    micros: usize,
    lr: f64,
    cfg: &TrainConfig,
    mut micro: impl FnMut(usize) -> anyhow::Result<(Tensor, usize, usize)>,
) -> anyhow::Result<(f32, usize)> {
    // Gradients of the summed weighted loss, divided by the total weight once at the end:
    // the mean over all scored tokens (or sequences), however the micro-batches split them.
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let (mut loss_sum, mut total, mut tokens) = (0f64, 0usize, 0usize);
    for i in 0..micros {
        let (loss, n, scored) = micro(i)?;
        loss_sum += loss.to_scalar::<f32>()? as f64 * n as f64;
        total += n;
        tokens += scored;
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
    Ok(((loss_sum / total as f64) as f32, tokens))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at_step(step: usize, sequences: u64) -> TrainProgress {
        TrainProgress {
            stage: 0,
            stage_step: step,
            step,
            sequences_seen: sequences,
            tokens_seen: 0,
            optimizer_t: step as u64,
            last_loss: 0.0,
        }
    }

    #[test]
    fn a_time_budget_shrinks_a_plan_and_never_grows_it() {
        // 100 steps of 2 sequences of 256 tokens; 10 steps (20 sequences) took 100 s.
        let plan = TrainConfig::scratch(100 * 2 * 256, 1e-3, 2);
        let p = at_step(10, 20);

        let mut cfg = plan.clone();
        calibrate(&mut cfg, &p, 100.0, 1e6, 20);
        assert!(cfg.calibrated);
        assert_eq!(
            cfg.steps(0),
            100,
            "a generous budget leaves the plan as asked"
        );

        // 300 s: 200 s left at 5 s a sequence is 40 more, so 60 of the 200 planned.
        let mut cfg = plan.clone();
        calibrate(&mut cfg, &p, 100.0, 300.0, 20);
        assert_eq!(cfg.steps(0), 30);
    }
}
