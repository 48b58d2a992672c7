//! The attention softmax for inference: in place, rows in parallel, exp eight lanes at a
//! time.
//!
//! Why our own: profiling the plain causal forward at 4k tokens put 29% of the time in
//! candle's `softmax_last_dim`, which calls the scalar libm `expf` for every score and
//! writes a second buffer as large as the scores. Here the scores are overwritten by their
//! probabilities (the caller owns them and needs nothing else), and exp is the Cephes
//! polynomial (relative error about 1e-7, as in the avx_mathfun and SLEEF-style kernels
//! torch and llama.cpp use), with masked scores (-inf, or the -1e30 of padded rows) giving
//! exactly 0.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Softmax over the last dimension of a contiguous f32 CPU tensor, in place. Other tensors
/// (GPU, other dtypes, strided) go through candle's kernel and come back as a new tensor.
pub fn softmax_last_dim_in_place(x: Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        x.inplace_op1(&SoftmaxInPlace)?;
        Ok(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x)
    }
}

struct SoftmaxInPlace;

impl candle_core::InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "softmax-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("softmax-in-place: f32 only");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-in-place: contiguous tensors only");
        };
        let cols = layout.dims().last().copied().unwrap_or(1);
        if cols == 0 {
            return Ok(());
        }
        let data = &mut data[a..b];
        // Rows in chunks worth a thread handoff (about 64k scores each).
        let per = (65_536 / cols).max(1);
        if data.len() > 65_536 {
            data.par_chunks_mut(per * cols)
                .for_each(|c| c.chunks_exact_mut(cols).for_each(softmax_row));
        } else {
            data.chunks_exact_mut(cols).for_each(softmax_row);
        }
        Ok(())
    }
}

/// log Σ exp(row), stable (the max taken out first); -∞ for an empty or fully masked row.
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the features were just detected.
            return unsafe { log_sum_exp_avx2(row) };
        }
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn log_sum_exp_avx2(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (n, p) = (row.len(), row.as_ptr());
    let body = n / 8 * 8;
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..body).step_by(8) {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let max = row[body..]
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return max;
    }
    let m = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    for i in (0..body).step_by(8) {
        vsum = _mm256_add_ps(vsum, exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m)));
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
    let sum: f32 =
        lanes.iter().sum::<f32>() + row[body..].iter().map(|&v| (v - max).exp()).sum::<f32>();
    max + sum.ln()
}

/// One row, in place.
pub(crate) fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the features were just detected.
            unsafe { softmax_row_avx2(row) };
            return;
        }
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        row.fill(0.0); // a fully masked row: no probability anywhere (no NaN)
        return;
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = row.len();
    let p = row.as_mut_ptr();
    let body = n / 8 * 8;
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i < body {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        i += 8;
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for &v in &row[body..] {
        max = max.max(v);
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let m = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    let mut i = 0;
    while i < body {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
        _mm256_storeu_ps(p.add(i), e);
        vsum = _mm256_add_ps(vsum, e);
        i += 8;
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), vsum);
    let mut sum: f32 = lanes.iter().sum();
    for v in &mut row[body..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = _mm256_set1_ps(1.0 / sum);
    let mut i = 0;
    while i < body {
        _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        i += 8;
    }
    for v in &mut row[body..] {
        *v *= 1.0 / sum;
    }
}

/// exp of eight lanes, each ≤ 88 (scores minus their row's max are ≤ 0): 2^n · p(r) with
/// r = x - n·ln 2 split in two constants for precision, p Cephes' degree-5 polynomial.
/// Lanes below -87.3 (where f32 exp underflows, masked scores included) give 0.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3), _CMP_LT_OQ);
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    ));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_softmax_with_masks_and_odd_widths() {
        let dev = Device::Cpu;
        for cols in [1, 7, 8, 9, 100, 1031] {
            let x = (Tensor::randn(0f32, 4.0, (3, 5, cols), &dev).unwrap() * 3.0).unwrap();
            // Mask a few columns as the plans do: -inf and -1e30.
            let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            for (i, s) in v.iter_mut().enumerate() {
                if cols > 1 && i % 3 == 1 {
                    *s = if i % 2 == 0 { f32::NEG_INFINITY } else { -1e30 };
                }
            }
            let x = Tensor::from_vec(v, (3, 5, cols), &dev).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let ours = softmax_last_dim_in_place(x.copy().unwrap()).unwrap();
            let diff = super::super::simd::max_abs_diff(&ours, &theirs);
            assert!(diff < 1e-6, "cols={cols}: {diff}");
            // Masked entries are exactly zero.
            let o: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
            for (i, p) in o.iter().enumerate() {
                if cols > 1 && i % 3 == 1 {
                    assert_eq!(*p, 0.0, "cols={cols} entry {i}");
                }
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        #[cfg(target_arch = "x86_64")]
        if super::super::simd::avx2_fma() {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let xs = [
                    x,
                    x * 0.5,
                    x * 0.25,
                    x * 0.1,
                    x * 0.01,
                    x * 0.001,
                    -0.0,
                    x * 0.9,
                ];
                let mut out = [0f32; 8];
                // SAFETY: features checked above.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp256(_mm256_loadu_ps(xs.as_ptr()))) };
                for (a, b) in xs.iter().zip(out) {
                    let exact = (*a as f64).exp();
                    worst = worst.max(((b as f64) - exact).abs() / exact);
                }
                x += 0.37;
            }
            assert!(worst < 5e-7, "relative error {worst}");
        }
    }

    #[test]
    fn log_sum_exp_matches_the_f64_sum_at_every_width() {
        for n in [1, 7, 8, 9, 53, 4096] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 211) as f32 / 7.0 - 15.0)
                .collect();
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let want = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            let got = log_sum_exp(&row) as f64;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "n={n}: {got} vs {want}"
            );
        }
        let mut masked = vec![f32::NEG_INFINITY; 19];
        assert_eq!(log_sum_exp(&masked), f32::NEG_INFINITY);
        masked[17] = 3.0;
        assert!((log_sum_exp(&masked) - 3.0).abs() < 1e-6);
    }

    #[test]
    fn a_fully_masked_row_is_zero_not_nan() {
        let dev = Device::Cpu;
        let x = Tensor::full(f32::NEG_INFINITY, (2, 16), &dev).unwrap();
        let p = softmax_last_dim_in_place(x).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&p| p == 0.0));
    }
}

/// Softmax over the last dimension that autograd can follow, for training: the forward is
/// the row kernel above into a new buffer, and the backward is one fused pass per row,
/// dx = p ⊙ (dy − Σ dy⊙p), instead of the five temporaries each way of candle's composed
/// softmax (max, sub, exp, sum, div and their gradients). Contiguous f32 CPU tensors only;
/// anything else goes through candle's composed ops.
pub fn softmax_last_dim_trainable(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(SoftmaxTrainable)
    } else {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    }
}

struct SoftmaxTrainable;

impl candle_core::CustomOp1 for SoftmaxTrainable {
    fn name(&self) -> &'static str {
        "softmax-trainable"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let mut out = super::simd::f32s(storage, layout, self.name())?.to_vec();
        let cols = layout.dims().last().copied().unwrap_or(1).max(1);
        let per = (65_536 / cols).max(1);
        out.par_chunks_mut(per * cols)
            .for_each(|c| c.chunks_exact_mut(cols).for_each(softmax_row));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&grad, &SoftmaxGrad)?))
    }
}

/// dx = p ⊙ (dy − Σ_j dy_j p_j), row by row, from p (the softmax's output) and dy.
struct SoftmaxGrad;

impl candle_core::CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        pl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (p, g) = (
            super::simd::f32s(p, pl, self.name())?,
            super::simd::f32s(g, gl, self.name())?,
        );
        let cols = pl.dims().last().copied().unwrap_or(1).max(1);
        let per = (65_536 / cols).max(1);
        let mut out = vec![0f32; p.len()];
        out.par_chunks_mut(per * cols)
            .zip(p.par_chunks(per * cols).zip(g.par_chunks(per * cols)))
            .for_each(|(o, (p, g))| {
                for ((o, p), g) in o
                    .chunks_exact_mut(cols)
                    .zip(p.chunks_exact(cols))
                    .zip(g.chunks_exact(cols))
                {
                    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                    for ((o, p), g) in o.iter_mut().zip(p).zip(g) {
                        *o = p * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), pl.shape().clone()))
    }
}

/// softmax(scores + mask) over the last dimension, trainable, in one node: scores
/// (B, L, S), mask (L, S) added to each of the B blocks (a constant: no gradient). Saves
/// the training graph the (B, L, S) sum and its gradient's two buffers per layer (candle
/// accumulates each gradient into a zeroed buffer). Contiguous f32 CPU tensors; anything
/// else goes through composed ops.
pub fn masked_softmax_trainable(scores: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 && mask.dtype() == DType::F32 {
        scores
            .contiguous()?
            .apply_op2(&mask.contiguous()?.detach(), MaskedSoftmax)
    } else {
        candle_nn::ops::softmax(&scores.broadcast_add(mask)?, candle_core::D::Minus1)
    }
}

struct MaskedSoftmax;

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, m) = (
            super::simd::f32s(x, xl, self.name())?,
            super::simd::f32s(m, ml, self.name())?,
        );
        let dims = xl.dims();
        let (l, s) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if m.len() != l * s {
            candle_core::bail!("masked-softmax: a ({l}, {s}) mask is needed");
        }
        let mut out = x.to_vec();
        // One block (L rows) per task: its rows meet the mask's rows in order.
        out.par_chunks_mut(l * s).for_each(|block| {
            for (row, mrow) in block.chunks_exact_mut(s).zip(m.chunks_exact(s)) {
                for (v, mv) in row.iter_mut().zip(mrow) {
                    *v += mv;
                }
                softmax_row(row);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _m: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        Ok((Some(res.apply_op2_no_bwd(&grad, &SoftmaxGrad)?), None))
    }
}

#[cfg(test)]
mod trainable_tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn the_trainable_softmax_and_its_gradient_match_candles_composed_ones() {
        let dev = Device::Cpu;
        // Rows of different scale, and a masked (-1e30) column, as attention has.
        let mut v: Vec<f32> = (0..6 * 37)
            .map(|i| ((i * 7919) % 101) as f32 / 9.0 - 5.0)
            .collect();
        v[3] = -1e30;
        let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, 37), &dev).unwrap()).unwrap();
        let w = Tensor::from_vec(
            (0..6 * 37)
                .map(|i| ((i * 31) % 17) as f32 - 8.0)
                .collect::<Vec<f32>>(),
            (2, 3, 37),
            &dev,
        )
        .unwrap();
        let ours = softmax_last_dim_trainable(x.as_tensor()).unwrap();
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(crate::model::simd::max_abs_diff(&ours, &theirs) < 1e-6);
        let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_ours.get(x.as_tensor()).unwrap(),
            g_theirs.get(x.as_tensor()).unwrap(),
        );
        let diff = crate::model::simd::max_abs_diff(a, b);
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }

    #[test]
    fn the_masked_softmax_matches_adding_the_mask_then_candles_softmax() {
        let dev = Device::Cpu;
        let (b, l, s) = (3, 5, 9);
        let x = Var::from_tensor(
            &Tensor::from_vec(
                (0..b * l * s)
                    .map(|i| ((i * 7919) % 97) as f32 / 11.0 - 4.0)
                    .collect::<Vec<f32>>(),
                (b, l, s),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        // A causal-style mask with a visible prefix: -1e30 where hidden.
        let mask: Vec<f32> = (0..l * s)
            .map(|i| if i % s > s - l + i / s { -1e30 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (l, s), &dev).unwrap();
        let w = Tensor::from_vec(
            (0..b * l * s)
                .map(|i| ((i * 31) % 13) as f32 - 6.0)
                .collect::<Vec<f32>>(),
            (b, l, s),
            &dev,
        )
        .unwrap();
        let ours = masked_softmax_trainable(x.as_tensor(), &mask).unwrap();
        let theirs =
            candle_nn::ops::softmax(&x.as_tensor().broadcast_add(&mask).unwrap(), D::Minus1)
                .unwrap();
        assert!(crate::model::simd::max_abs_diff(&ours, &theirs) < 1e-6);
        let g_ours = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g_theirs = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = crate::model::simd::max_abs_diff(
            g_ours.get(x.as_tensor()).unwrap(),
            g_theirs.get(x.as_tensor()).unwrap(),
        );
        assert!(diff < 1e-5, "gradients differ by {diff}");
    }
}
