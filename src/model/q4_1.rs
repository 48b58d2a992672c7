//! Q4_1 matrices multiplied on the CPU with AVX2, on their stored blocks.
//!
//! Why our own: candle 0.11 multiplies Q4_1 with its scalar fallback (it has AVX2 paths for
//! Q4_0 and Q8_0 only), which made SmolLM2's Q4_1 weights about 6x slower than the same
//! weights dequantized. The arithmetic is llama.cpp's: each row of activations is rounded
//! to 8 bits per block of 32 (Q8_1: a scale and the block's sum), and a block's dot product
//! is `d_w·d_x·Σ q_w·q_x + m_w·s_x`, with the integer products done 32 at a time.
//!
//! A Q4_1 block is 20 bytes: `d` and `m` (f16), then 16 bytes whose low nibbles are
//! elements 0..16 and high nibbles elements 16..32; element i is `d·q_i + m`.

use candle_core::{Result, Tensor};
use half::f16;

const QK: usize = 32;
const BLOCK_BYTES: usize = 20;

/// A (rows, cols) matrix of Q4_1 blocks, row-major: each block's two f16 scales as one
/// u32 (converted in pairs by F16C in the hot loop), and its 16 bytes of nibbles. As
/// stored in the file: 20 bytes per 32 weights.
pub struct Q41Matrix {
    rows: usize,
    cols: usize,
    /// (d, m) per block, f16 bits, d in the low half.
    scales: Vec<u32>,
    /// The 16 bytes of nibbles per block.
    quants: Vec<[u8; 16]>,
}

/// One block of activations: scale, scale·Σq, and the 32 rounded values.
#[derive(Clone, Copy)]
struct Q81 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

/// Activation rows handled together: each weight block is unpacked once for all of them.
const TOKENS: usize = 4;

impl Q41Matrix {
    /// From the stored bytes of a (rows, cols) Q4_1 tensor.
    pub fn new(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        if !cols.is_multiple_of(QK) || data.len() != rows * cols / QK * BLOCK_BYTES {
            candle_core::bail!(
                "a Q4_1 matrix of {rows} x {cols} cannot hold {} bytes",
                data.len()
            );
        }
        let (scales, quants) = data
            .chunks_exact(BLOCK_BYTES)
            .map(|b| {
                let mut q = [0u8; 16];
                q.copy_from_slice(&b[4..]);
                (u32::from_le_bytes([b[0], b[1], b[2], b[3]]), q)
            })
            .unzip();
        Ok(Self {
            rows,
            cols,
            scales,
            quants,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// x (N, cols) f32 · Wᵀ: (N, rows).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let (n, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!("Q4_1 matmul: x has {k} columns, the matrix {}", self.cols);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let blocks = k / QK;
        let qx: Vec<Q81> = xs.chunks_exact(QK).map(quantize_block).collect();
        // (rows, N) by bands of weight rows across the pool, then transposed.
        let band = 16;
        let mut out_t = vec![0f32; self.rows * n];
        out_t
            .par_chunks_mut(band * n)
            .enumerate()
            .for_each(|(bi, chunk)| {
                for (j, row_out) in chunk.chunks_exact_mut(n).enumerate() {
                    let r = bi * band + j;
                    let w = r * blocks..(r + 1) * blocks;
                    let (scales, quants) = (&self.scales[w.clone()], &self.quants[w]);
                    for (t0, outs) in row_out.chunks_mut(TOKENS).enumerate() {
                        let first = t0 * TOKENS;
                        let xr: Vec<&[Q81]> = (first..first + outs.len())
                            .map(|i| &qx[i * blocks..(i + 1) * blocks])
                            .collect();
                        dots(scales, quants, &xr, outs);
                    }
                }
            });
        let mut out = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for i in 0..n {
                out[i * self.rows + r] = out_t[r * n + i];
            }
        }
        Tensor::from_vec(out, (n, self.rows), x.device())
    }
}

fn quantize_block(x: &[f32]) -> Q81 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    // llama.cpp stores a Q8_1 block's d and s as f16; rounding them the same way keeps
    // our products equal to its (the quantization itself uses the f32 d, as there).
    Q81 {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(d * sum as f32).to_f32(),
        qs,
    }
}

/// One weight row against up to [`TOKENS`] rows of activation blocks.
fn dots(scales: &[u32], quants: &[[u8; 16]], xs: &[&[Q81]], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma_f16c() {
            // SAFETY: the features were just detected.
            unsafe { dots_avx2(scales, quants, xs, out) };
            return;
        }
    }
    for (o, x) in out.iter_mut().zip(xs) {
        *o = dot_scalar(scales, quants, x);
    }
}

fn block_scales(bits: u32) -> (f32, f32) {
    (
        f16::from_bits(bits as u16).to_f32(),
        f16::from_bits((bits >> 16) as u16).to_f32(),
    )
}

fn dot_scalar(scales: &[u32], quants: &[[u8; 16]], x: &[Q81]) -> f32 {
    let mut total = 0f32;
    for ((&bits, q), xb) in scales.iter().zip(quants).zip(x) {
        let (d, m) = block_scales(bits);
        let mut isum = 0i32;
        for (j, &byte) in q.iter().enumerate() {
            isum += (byte & 0x0F) as i32 * xb.qs[j] as i32;
            isum += (byte >> 4) as i32 * xb.qs[j + 16] as i32;
        }
        total += d * xb.d * isum as f32 + m * xb.s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2(scales: &[u32], quants: &[[u8; 16]], xs: &[&[Q81]], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); TOKENS];
    let mut summs = [0f32; TOKENS];
    for (b, (&bits, q)) in scales.iter().zip(quants).enumerate() {
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)); // d, m, 0, 0
        let (d, m) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
        let bytes = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        let lo = _mm_and_si128(bytes, low);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        let wq = _mm256_set_m128i(hi, lo); // elements 0..16, then 16..32
        for (t, x) in xs.iter().enumerate() {
            let xb = &x[b];
            let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            // u8 x i8 pairs summed to i16 (at most 2·15·127), then pairs to i32.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), ones);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc[t]);
            summs[t] += m * xb.s;
        }
    }
    for (t, o) in out.iter_mut().enumerate() {
        let a = acc[t];
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        *o = _mm_cvtss_f32(s) + summs[t];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module};

    #[test]
    fn matches_candles_q4_1_matmul() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 96), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let ours = Q41Matrix::new(70, 96, q.data().unwrap().into_owned()).unwrap();
        let theirs = QMatMul::from_qtensor(q).unwrap();
        let dense = theirs
            .dequantize_f16()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        for n in [1, 3, 17] {
            let x = Tensor::randn(0f32, 1.0, (n, 96), &dev).unwrap();
            let a = ours.forward(&x).unwrap();
            let b = theirs.forward(&x).unwrap();
            let exact = x.matmul(&dense.t().unwrap()).unwrap();
            let diff = super::super::simd::max_abs_diff;
            let scale = super::super::simd::max_abs(&exact);
            // Both round activations to 8 bits with f16 scales (in different orders):
            // each is within 8-bit rounding of the exact product, and of the other.
            assert!(
                diff(&a, &exact) < 0.02 * scale,
                "n={n}: ours vs exact {}",
                diff(&a, &exact)
            );
            assert!(
                diff(&a, &b) < 0.02 * scale,
                "n={n}: ours vs candle {}",
                diff(&a, &b)
            );
            // The scalar and AVX2 kernels agree to float rounding.
            let qx: Vec<Q81> = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .chunks_exact(QK)
                .map(quantize_block)
                .collect();
            let (sc, qs) = (&ours.scales[..3], &ours.quants[..3]);
            let s = dot_scalar(sc, qs, &qx[..3]);
            let mut v = [0f32];
            dots(sc, qs, &[&qx[..3]], &mut v);
            assert!(
                (s - v[0]).abs() < 1e-4 * s.abs().max(1.0),
                "{s} vs {}",
                v[0]
            );
        }
    }
}
