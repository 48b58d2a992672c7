//! What a training run does: its stages, schedules and sizes, and the recipes that set
//! them.

use serde::{Deserialize, Serialize};

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
    /// Consecutive sequences of one document that train as one text (1: each alone):
    /// each after the first reads the gist rows of those before it as a carried memory
    /// (see [`super::memory`]).
    #[serde(default = "one")]
    pub memory_span: usize,
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
    /// Held-out text scored during the run (the validation curve); None: not scored.
    #[serde(default)]
    pub validation: Option<super::validation::ValidationConfig>,
    /// A question/answer run (`train --qa`, see [`super::qa`]): the weight of the
    /// documents' own tokens beside the answers' in the loss. None: language modelling.
    #[serde(default)]
    pub qa_text_weight: Option<f64>,
}

fn one() -> usize {
    1
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
            memory_span: 1,
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
            validation: None,
            qa_text_weight: None,
        }
    }

    /// Ends the plan where `progress` stands: the stage under way keeps the steps it has
    /// taken, and the stages after it are dropped. Nothing else changes, so a checkpoint's
    /// weights are shipped as they are (the schedule it was trained on is not replayed).
    pub fn cut_to(&mut self, progress: &super::TrainProgress) {
        let stage = progress.stage;
        if progress.stage_step == 0 {
            self.stages.truncate(stage);
        } else if let Some(s) = self.stages.get_mut(stage) {
            s.tokens = (progress.stage_step * s.batch * self.seq_tokens) as u64;
            self.stages.truncate(stage + 1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::TrainProgress;

    fn at(stage: usize, stage_step: usize) -> TrainProgress {
        TrainProgress {
            stage,
            stage_step,
            step: 0,
            sequences_seen: 0,
            tokens_seen: 0,
            optimizer_t: 0,
            last_loss: f32::NAN,
        }
    }

    /// A plan cut mid-stage ends at the steps taken; one cut at a stage boundary ends
    /// before the stage that has not started.
    #[test]
    fn a_cut_plan_ends_where_the_run_stands() {
        let full = TrainConfig::paper(1_000_000, 1e-4, 4);
        assert!(full.stages.len() >= 2 && full.steps(0) > 7);
        let mut cut = full.clone();
        cut.cut_to(&at(0, 7));
        assert_eq!(cut.stages.len(), 1);
        assert_eq!(cut.steps(0), 7);
        let mut cut = full.clone();
        cut.cut_to(&at(1, 0));
        assert_eq!(cut.stages.len(), 1);
        assert_eq!(cut.steps(0), full.steps(0));
    }
}
