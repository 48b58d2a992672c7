//! The loss over regular tokens, and AdamW.

use super::config::{Attention, TrainConfig, Trainable};
use super::trainee::Trainee;
use crate::engine::whole::Layout;
use crate::model::attention::CausalPlan;
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
    let dtype = model.llama.dtype();
    scored_loss(model, &layout, gist_loss, |logits_rows| match attention {
        Attention::Gist => Ok(layout.sentence_forward(model, &ids, ops, logits_rows)?),
        Attention::Full => {
            let docs: Vec<_> = layout.docs.iter().map(|d| d.rows.clone()).collect();
            let mut plan = CausalPlan::new(&docs, dtype, dev, ops)?;
            Ok(model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, logits_rows)?)
        }
        Attention::GistDense => {
            ensure!(
                layout.stored.is_none(),
                "the dense-mask path has one key per token, so it cannot train the compressed \
                 position scheme: use the blockwise sentence attention"
            );
            let mut plan = crate::model::attention::DensePlan::new(&layout.docs, dtype, dev, ops)?;
            Ok(model
                .llama
                .forward(&ids, &layout.positions, &mut plan, ops, logits_rows)?)
        }
    })
}

/// The mean cross-entropy of the tokens `layout` scores ([`loss_rows`]), `forward`
/// computing the logits of the rows it is given; and how many tokens that is.
pub(crate) fn scored_loss(
    model: &GistModel,
    layout: &Layout,
    gist_loss: bool,
    forward: impl FnOnce(&Logits) -> anyhow::Result<Option<Tensor>>,
) -> anyhow::Result<(Tensor, usize)> {
    let dev = model.llama.device();
    let (rows, targets) = loss_rows(layout, gist_loss);
    ensure!(!rows.is_empty(), "a training batch has no token to predict");
    let logits = forward(&Logits::Rows(Tensor::new(rows.as_slice(), dev)?))?
        .context("the forward returned no logits for the scored rows")?;
    let targets = Tensor::new(targets.as_slice(), dev)?;
    let loss = super::cross_entropy::cross_entropy(&logits.to_dtype(DType::F32)?, &targets)?;
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
                // Two buffers: the step updates each moment in place.
                let (m, s) = (v.as_tensor().zeros_like()?, v.as_tensor().zeros_like()?);
                Ok((n, v, m, s))
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
            let theta = var.as_tensor();
            let fused = [theta, &*m, &*v, g]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous());
            if fused {
                // In place: the moments and the weights are updated where they are, with no
                // parameter-sized temporaries (the composed form below allocates about
                // fourteen per matrix, each faulted in zeroed: most of a SmolLM2 step's
                // system time).
                let g = g.contiguous()?;
                m.inplace_op2(
                    &g,
                    &Moment {
                        beta: b1,
                        square: false,
                    },
                )?;
                v.inplace_op2(
                    &g,
                    &Moment {
                        beta: b2,
                        square: true,
                    },
                )?;
                let decay = if theta.rank() >= 2 {
                    lr * cfg.weight_decay
                } else {
                    0.0
                };
                theta.inplace_op3(
                    &*m,
                    &*v,
                    &AdamApply {
                        c1,
                        c2,
                        eps: cfg.eps,
                        lr,
                        decay,
                    },
                )?;
                continue;
            }
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

    /// The moments and weights are updated in place: a checkpoint takes copies.
    pub(crate) fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, _, m, v) in &self.params {
            out.insert(format!("m.{name}"), m.copy().unwrap_or_else(|_| m.clone()));
            out.insert(format!("v.{name}"), v.copy().unwrap_or_else(|_| v.clone()));
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
                .copy()?;
            *v = state
                .get(&format!("v.{name}"))
                .with_context(|| format!("optimizer state lacks {name}"))?
                .copy()?;
        }
        self.t = t;
        Ok(())
    }
}

/// m ← β·m + (1 − β)·g, or with `square` v ← β·v + (1 − β)·g², in place.
struct Moment {
    beta: f64,
    square: bool,
}

impl candle_core::InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use crate::model::simd::{f32s, f32s_mut};
        let (m, g) = (f32s_mut(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        use rayon::prelude::*;
        let (b, k) = (self.beta as f32, (1.0 - self.beta) as f32);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let x = if self.square { g * g } else { g };
                    *m = b * *m + k * x;
                }
            });
        Ok(())
    }
}

/// Elements per work item of the element-wise updates (both cores share the optimizer's
/// passes over every parameter; element-wise, so the split changes no bit).
const CHUNK: usize = 32 * 1024;

/// θ ← θ·(1 − decay) − lr · (m / c1) / (√(v / c2) + ε), in place.
struct AdamApply {
    c1: f64,
    c2: f64,
    eps: f64,
    lr: f64,
    decay: f64,
}

impl candle_core::InplaceOp3 for AdamApply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use crate::model::simd::{f32s, f32s_mut};
        let theta = f32s_mut(s1, l1, self.name())?;
        let (m, v) = (f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let keep = (1.0 - self.decay) as f32;
        let (lr, eps) = (self.lr as f32, self.eps as f32);
        let (ic1, ic2) = ((1.0 / self.c1) as f32, (1.0 / self.c2) as f32);
        use rayon::prelude::*;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(theta, (m, v))| {
                for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
                    *t = *t * keep - lr * (m * ic1) / ((v * ic2).sqrt() + eps);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_in_place_step_matches_the_composed_one() {
        let dev = Device::Cpu;
        let init = |seed: usize| {
            Tensor::from_vec(
                (0..6 * 5)
                    .map(|i| (((i + seed) * 7919) % 97) as f32 / 50.0 - 1.0)
                    .collect::<Vec<f32>>(),
                (6, 5),
                &dev,
            )
            .unwrap()
        };
        let cfg = TrainConfig::scratch(1, 1e-3, 1);
        let (a, b) = (
            Var::from_tensor(&init(0)).unwrap(),
            Var::from_tensor(&init(0)).unwrap(),
        );
        let mut fused = AdamW::new(vec![("w".into(), a.clone())]).unwrap();
        let mut composed = AdamW::new(vec![("w".into(), b.clone())]).unwrap();
        for step in 1..4 {
            let g = HashMap::from([("w".to_string(), init(step))]);
            fused.step(&g, 1e-2, &cfg).unwrap();
            // The composed form, as the fallback runs it: a strided gradient.
            let g_strided = init(step).t().unwrap().contiguous().unwrap().t().unwrap();
            let g = HashMap::from([("w".to_string(), g_strided)]);
            composed.step(&g, 1e-2, &cfg).unwrap();
        }
        let diff = crate::model::simd::max_abs_diff(a.as_tensor(), b.as_tensor());
        assert!(
            diff < 1e-6,
            "weights differ by {diff}: {} vs {}",
            a.as_tensor(),
            b.as_tensor()
        );
    }
}
