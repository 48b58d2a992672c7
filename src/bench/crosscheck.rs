//! `giststream crosscheck`: the same documents through a model twice, on the CPU in f32
//! (the reference) and on another device or precision (a GPU, bf16), compared logit by
//! logit on every path a user or trainer runs.
//!
//! Paths compared, each over every row (regular tokens and gists):
//! - `incremental`: sentence by sentence with the documents batched, attention per
//!   document (queries, evaluation; compress on the CPU); its gist states are compared too;
//! - `incremental-slots`: the gist states of the slots engine (compress, serve and
//!   re-index on a GPU), which computes no logits;
//! - `parallel-fused`: whole documents with the sentence mask (evaluation);
//! - `parallel-differentiable`: the same with the training ops.
//!
//! Differences are measured against the spread of the reference logits (their standard
//! deviation), so one tolerance serves models whose logits have different scales.

use crate::engine::state::{advance, Chunk, GistState};
use crate::engine::whole::{forward, Layout, Mode};
use crate::model::config::Incremental;
use crate::model::ops::Ops;
use crate::model::GistModel;
use crate::text::tokenize::Segment;
use anyhow::Context;
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

/// What a device and precision must meet against the CPU in f32.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tolerance {
    /// Largest |logit difference| / standard deviation of the reference logits.
    pub max_relative_logit_diff: f64,
    /// Least share of rows whose top token (argmax) agrees.
    pub min_top1_agreement: f64,
    /// Largest mean |difference| of the regular tokens' log-likelihoods, nats.
    pub max_mean_abs_nll_diff: f64,
    /// Largest |K/V difference| / standard deviation of the reference gist states.
    pub max_relative_state_diff: f64,
}

impl Tolerance {
    /// The stated tolerance per precision.
    ///
    /// f32 on another device differs only in summation order: 1e-3 of the logits' spread.
    /// bf16 keeps 8 significant bits (a relative step of 2^-8 = 0.4% per rounding), and
    /// roundings compound over layers: 0.25 of the spread at worst, but 95% of top tokens
    /// agreeing and 0.05 nats mean log-likelihood difference. f16 (11 bits) sits between.
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self {
                max_relative_logit_diff: 0.25,
                min_top1_agreement: 0.95,
                max_mean_abs_nll_diff: 0.05,
                max_relative_state_diff: 0.25,
            },
            DType::F16 => Self {
                max_relative_logit_diff: 0.05,
                min_top1_agreement: 0.98,
                max_mean_abs_nll_diff: 0.01,
                max_relative_state_diff: 0.05,
            },
            _ => Self {
                max_relative_logit_diff: 1e-3,
                min_top1_agreement: 0.999,
                max_mean_abs_nll_diff: 1e-4,
                max_relative_state_diff: 1e-3,
            },
        }
    }
}

/// How far one output of the checked model is from the reference's.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    /// Rows compared (logits) or values (states).
    pub rows: usize,
    pub max_abs_diff: f64,
    /// Standard deviation of the reference values.
    pub reference_std: f64,
    /// `max_abs_diff / reference_std`.
    pub max_relative_diff: f64,
    /// Share of rows with the same argmax (logits only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
}

/// Compares logits (N, V) or any tensors of one shape, on the CPU in f32.
pub fn diff(reference: &Tensor, other: &Tensor, logits: bool) -> anyhow::Result<Diff> {
    let a = reference.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = other.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    anyhow::ensure!(
        a.dims() == b.dims(),
        "shapes differ: {:?} vs {:?}",
        a.dims(),
        b.dims()
    );
    let max_abs_diff = f64::from(
        (&a - &b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?,
    );
    let flat = a.flatten_all()?;
    let mean = flat.mean_all()?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean_all()?;
    let reference_std = f64::from(var.to_scalar::<f32>()?).sqrt();
    let top1_agreement = if logits {
        let same = a.argmax(D::Minus1)?.eq(&b.argmax(D::Minus1)?)?;
        Some(f64::from(
            same.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?,
        ))
    } else {
        None
    };
    Ok(Diff {
        rows: if logits { a.dim(0)? } else { a.elem_count() },
        max_abs_diff,
        reference_std,
        max_relative_diff: max_abs_diff / reference_std.max(f64::MIN_POSITIVE),
        top1_agreement,
    })
}

/// One compared path.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathReport {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Diff>,
    /// Mean |difference| of the regular tokens' negative log-likelihoods (incremental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_abs_nll_diff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_reference: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity_checked: Option<f64>,
    /// Gist states at the end (incremental).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub states: Option<Diff>,
    /// Which limits were exceeded (empty: within tolerance).
    pub exceeded: Vec<String>,
}

/// The whole comparison, as `giststream crosscheck` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CrosscheckReport {
    pub device: String,
    pub dtype: String,
    pub documents: usize,
    /// Regular tokens of all documents.
    pub tokens: usize,
    pub tolerance: Tolerance,
    pub paths: Vec<PathReport>,
    pub pass: bool,
}

/// Logits (N, V) of every row of the incremental path, step by step with the documents
/// batched (rows in step order, each document's chunk then its gists), and the final
/// states.
fn incremental(
    model: &GistModel,
    docs: &[Vec<Segment>],
) -> anyhow::Result<(Tensor, Vec<GistState>)> {
    let mut states: Vec<GistState> = docs
        .iter()
        .map(|_| GistState::new(model))
        .collect::<candle_core::Result<_>>()?;
    let steps = docs.iter().map(Vec::len).max().unwrap_or(0);
    let mut rows = Vec::with_capacity(steps);
    for step in 0..steps {
        let mut items: Vec<(&mut GistState, Chunk<'_>)> = states
            .iter_mut()
            .zip(docs)
            .filter(|(_, d)| step < d.len())
            .map(|(s, d)| {
                let chunk = Chunk {
                    tokens: &d[step].tokens,
                    close: d[step].close,
                };
                (s, chunk)
            })
            .collect();
        if let Some(l) = advance(model, &mut items, true)? {
            rows.push(l.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
        }
    }
    Ok((Tensor::cat(&rows, 0)?, states))
}

/// Every layer's gist keys and values of every document, flattened into one vector.
fn state_values(states: &[GistState]) -> anyhow::Result<Tensor> {
    let mut parts = Vec::new();
    for s in states {
        for layer in &s.layers {
            let (k, v) = layer.view()?;
            for t in [k, v] {
                parts.push(
                    t.flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?,
                );
            }
        }
    }
    Ok(Tensor::cat(&parts, 0)?)
}

fn perplexity(nll: &[Vec<f32>]) -> f64 {
    let all: Vec<f64> = nll.iter().flatten().map(|&x| f64::from(x)).collect();
    (all.iter().sum::<f64>() / all.len().max(1) as f64).exp()
}

/// Runs `docs` through `reference` (CPU, f32) and `checked`, and compares.
pub fn run(
    reference: &GistModel,
    checked: &GistModel,
    docs: &[Vec<Segment>],
) -> anyhow::Result<CrosscheckReport> {
    let dtype = checked.llama.dtype();
    let tol = Tolerance::for_dtype(dtype);
    let mut paths = Vec::new();

    let (ref_logits, ref_states) = incremental(reference, docs).context("reference run")?;
    let ref_state_values = state_values(&ref_states)?;
    let (logits, states) = incremental(checked, docs).context("checked run")?;
    let (ref_nll, _, _) = crate::train::eval::nll_gist(reference, docs, docs.len())?;
    let (nll, _, _) = crate::train::eval::nll_gist(checked, docs, docs.len())?;
    let (mut sum, mut n) = (0.0, 0usize);
    for (a, b) in ref_nll.iter().flatten().zip(nll.iter().flatten()) {
        sum += f64::from((a - b).abs());
        n += 1;
    }
    paths.push(PathReport {
        path: "incremental".into(),
        logits: Some(diff(&ref_logits, &logits, true)?),
        mean_abs_nll_diff: Some(sum / n.max(1) as f64),
        perplexity_reference: Some(perplexity(&ref_nll)),
        perplexity_checked: Some(perplexity(&nll)),
        states: Some(diff(&ref_state_values, &state_values(&states)?, false)?),
        exceeded: Vec::new(),
    });

    let input = docs
        .iter()
        .enumerate()
        .map(|(i, segments)| {
            let d = crate::engine::compress::Document {
                id: i.to_string(),
                segments: segments.clone(),
            };
            Ok((d, GistState::new(checked)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let slotted: Vec<GistState> =
        crate::engine::compress::compress_with(checked, input, docs.len(), Incremental::Slots)?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
    paths.push(PathReport {
        path: "incremental-slots".into(),
        states: Some(diff(&ref_state_values, &state_values(&slotted)?, false)?),
        ..PathReport::default()
    });

    for (name, ops) in [
        ("parallel-fused", Ops::Fused),
        ("parallel-differentiable", Ops::Differentiable),
    ] {
        let run = |m: &GistModel| forward(m, &Layout::new(m, docs, true), Mode::Sentence, ops);
        paths.push(PathReport {
            path: name.into(),
            logits: Some(diff(&run(reference)?, &run(checked)?, true)?),
            ..PathReport::default()
        });
    }

    for p in &mut paths {
        p.exceeded = exceeded(p, &tol);
    }
    Ok(CrosscheckReport {
        device: match checked.llama.device().location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        },
        dtype: dtype.as_str().into(),
        documents: docs.len(),
        tokens: docs.iter().flatten().map(|s| s.tokens.len()).sum(),
        tolerance: tol,
        pass: paths.iter().all(|p| p.exceeded.is_empty()),
        paths,
    })
}

/// `a <= b`, false when either is NaN (a NaN never passes).
fn at_most(a: f64, b: f64) -> bool {
    a.partial_cmp(&b).is_some_and(|o| o.is_le())
}

/// The limits `p` exceeds, each named with its value.
pub fn exceeded(p: &PathReport, tol: &Tolerance) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(l) = &p.logits {
        if !at_most(l.max_relative_diff, tol.max_relative_logit_diff) {
            out.push(format!(
                "relative logit difference {:.3e} > {:.3e}",
                l.max_relative_diff, tol.max_relative_logit_diff
            ));
        }
        if let Some(t) = l.top1_agreement {
            if !at_most(tol.min_top1_agreement, t) {
                out.push(format!(
                    "top-1 agreement {t:.4} < {}",
                    tol.min_top1_agreement
                ));
            }
        }
    }
    if let Some(d) = p.mean_abs_nll_diff {
        if !at_most(d, tol.max_mean_abs_nll_diff) {
            out.push(format!(
                "mean |NLL difference| {d:.3e} > {:.3e}",
                tol.max_mean_abs_nll_diff
            ));
        }
    }
    if let Some(s) = &p.states {
        if !at_most(s.max_relative_diff, tol.max_relative_state_diff) {
            out.push(format!(
                "relative state difference {:.3e} > {:.3e}",
                s.max_relative_diff, tol.max_relative_state_diff
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_measures_against_the_reference_spread() {
        let a = Tensor::new(&[[1f32, 3.0, 2.0], [0.0, -1.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1f32, 2.5, 2.9], [0.0, -1.0, 4.0]], &Device::Cpu).unwrap();
        let d = diff(&a, &b, true).unwrap();
        assert!((d.max_abs_diff - 0.9).abs() < 1e-6);
        // The first row's argmax moved from 3.0 to 2.9.
        assert_eq!(d.top1_agreement, Some(0.5));
        let mean = 9.0 / 6.0;
        let var = [1f64, 3.0, 2.0, 0.0, -1.0, 4.0]
            .iter()
            .map(|x| (x - mean) * (x - mean))
            .sum::<f64>()
            / 6.0;
        assert!((d.reference_std - var.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn a_path_beyond_tolerance_names_each_limit() {
        let tol = Tolerance::for_dtype(DType::BF16);
        let mut p = PathReport {
            path: "incremental".into(),
            logits: Some(Diff {
                rows: 10,
                max_abs_diff: 1.0,
                reference_std: 2.0,
                max_relative_diff: 0.5,
                top1_agreement: Some(0.9),
            }),
            mean_abs_nll_diff: Some(0.01),
            perplexity_reference: None,
            perplexity_checked: None,
            states: None,
            exceeded: Vec::new(),
        };
        let e = exceeded(&p, &tol);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("relative logit") && e[1].contains("top-1"));
        let l = p.logits.as_mut().unwrap();
        l.max_relative_diff = 0.1;
        l.top1_agreement = Some(0.99);
        assert!(exceeded(&p, &tol).is_empty());
        // NaN never passes.
        p.mean_abs_nll_diff = Some(f64::NAN);
        assert_eq!(exceeded(&p, &tol).len(), 1);
    }
}
