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

/// One row, in place.
fn softmax_row(row: &mut [f32]) {
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
    fn a_fully_masked_row_is_zero_not_nan() {
        let dev = Device::Cpu;
        let x = Tensor::full(f32::NEG_INFINITY, (2, 16), &dev).unwrap();
        let p = softmax_last_dim_in_place(x).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|&p| p == 0.0));
    }
}
