//! Mean cross-entropy of logit rows against target ids, as one node of the training graph.
//!
//! Why our own: candle's `cross_entropy` is a log-softmax and a gather composed of about
//! eight ops, each keeping a (rows, vocabulary) buffer for backward, and candle accumulates
//! each of their gradients into a freshly zeroed buffer of that size. With SmolLM2's
//! 49,152-token vocabulary a 1k-token sequence's logits are 232 MB, so the loss alone held
//! gigabytes and spent its time in page faults. Here the forward reads the logits once per
//! row (log-sum-exp) and the backward writes one buffer, softmax minus the one-hot target,
//! scaled by the incoming gradient over the row count.

use crate::model::softmax::{log_sum_exp, softmax_row};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

/// Mean over rows of −log softmax(logits)[target]: logits (R, V), targets (R,) u32.
/// Contiguous f32 CPU logits use the fused node; anything else candle's composed ops.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == DType::F32 && targets.dtype() == DType::U32 {
        logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?.detach(), CrossEntropy)
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

struct CrossEntropy;

/// The rows of contiguous f32 logits and their u32 targets.
fn rows<'a>(
    logits: &'a CpuStorage,
    ll: &Layout,
    targets: &'a CpuStorage,
    tl: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize)> {
    let (CpuStorage::F32(x), CpuStorage::U32(t)) = (logits, targets) else {
        candle_core::bail!("cross-entropy: f32 logits and u32 targets only");
    };
    let (Some((xa, xb)), Some((ta, tb))) = (ll.contiguous_offsets(), tl.contiguous_offsets())
    else {
        candle_core::bail!("cross-entropy: contiguous tensors only");
    };
    let (x, t) = (&x[xa..xb], &t[ta..tb]);
    let v = ll.dims().last().copied().unwrap_or(0);
    if v == 0 || x.len() != t.len() * v {
        candle_core::bail!(
            "cross-entropy: logits ({}, V) against {} targets",
            x.len() / v.max(1),
            t.len()
        );
    }
    if let Some(&bad) = t.iter().find(|&&id| id as usize >= v) {
        candle_core::bail!("cross-entropy: target {bad} is outside the vocabulary of {v}");
    }
    Ok((x, t, v))
}

impl candle_core::CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        targets: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, t, v) = rows(logits, ll, targets, tl)?;
        let total: f64 = x
            .par_chunks(v)
            .zip(t.par_iter())
            .map(|(row, &id)| (log_sum_exp(row) - row[id as usize]) as f64)
            .sum();
        let mean = if t.is_empty() {
            0.0
        } else {
            total / t.len() as f64
        };
        Ok((CpuStorage::F32(vec![mean as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let grad = logits.apply_op2_no_bwd(targets, &CrossEntropyGrad(scale))?;
        Ok((Some(grad), None))
    }
}

/// (softmax(row) − one-hot(target)) · scale / rows.
struct CrossEntropyGrad(f32);

impl candle_core::CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        ll: &Layout,
        targets: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, t, v) = rows(logits, ll, targets, tl)?;
        let k = self.0 / t.len().max(1) as f32;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(v)
            .zip(x.par_chunks(v).zip(t.par_iter()))
            .for_each(|(o, (row, &id))| {
                o.copy_from_slice(row);
                softmax_row(o);
                o.iter_mut().for_each(|x| *x *= k);
                o[id as usize] -= k;
            });
        Ok((CpuStorage::F32(out), ll.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_loss_and_its_gradient_match_candles_cross_entropy() {
        let dev = Device::Cpu;
        let (r, v) = (7, 53);
        let logits = Var::from_tensor(
            &Tensor::from_vec(
                (0..r * v)
                    .map(|i| ((i * 7919) % 211) as f32 / 13.0 - 8.0)
                    .collect::<Vec<f32>>(),
                (r, v),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let targets = Tensor::new(&[0u32, 52, 3, 17, 17, 40, 9], &dev).unwrap();
        let ours = cross_entropy(logits.as_tensor(), &targets).unwrap();
        let theirs = candle_nn::loss::cross_entropy(logits.as_tensor(), &targets).unwrap();
        let (a, b) = (
            ours.to_scalar::<f32>().unwrap(),
            theirs.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        // Scaled as train_step scales it (loss times the token count).
        let g_ours = (ours * 3.0).unwrap().backward().unwrap();
        let g_theirs = (theirs * 3.0).unwrap().backward().unwrap();
        let diff = crate::model::simd::max_abs_diff(
            g_ours.get(logits.as_tensor()).unwrap(),
            g_theirs.get(logits.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-6, "gradients differ by {diff}");
        // A target outside the vocabulary is an error, not a read out of bounds.
        let bad = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 53], &dev).unwrap();
        assert!(cross_entropy(logits.as_tensor(), &bad).is_err());
    }
}
