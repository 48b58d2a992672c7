//! The loss over regular tokens, and AdamW.

use super::config::{Attention, TrainConfig, Trainable};
use super::trainee::Trainee;
use crate::engine::whole::Layout;
use crate::model::attention::{CausalPlan, SentencePlan};
use crate::model::llama::Logits;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use anyhow::{ensure, Context};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

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
            let mut plan = crate::model::attention::DensePlan::new(&layout.docs, dtype, dev, ops)?;
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

    pub(crate) fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, _, m, v) in &self.params {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    pub(crate) fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        t: u64,
    ) -> anyhow::Result<()> {
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
