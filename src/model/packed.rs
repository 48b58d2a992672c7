//! Dense f32 projections with their weights packed once, multiplied by our AVX2 kernel.
//!
//! Why our own: candle's CPU matmul (the `gemm` crate) repacks the weight matrix on every
//! call. Our forwards multiply the same weights thousands of times by a few rows each (a
//! sentence of ~25 tokens per document in the incremental path), and profiling SmolLM2's
//! incremental path showed about half its time in that packing and its thread handoffs.
//! A model loaded for inference never changes its weights, so they are laid out once in
//! the order the kernel reads them, and each call only streams them.
//!
//! Layout: W (out, in) is cut into panels of [`NR`] = 16 output rows; a panel is stored
//! k-major, `panel[k·16 + j] = W[p·16 + j][k]`, zero-padded past `out`. The kernel keeps a
//! 6 × 16 tile of the output in twelve AVX registers and, for each k, broadcasts six
//! activations against two loads of the panel (the classic BLIS micro-kernel shape).
//! Blocking: [`MC`] activation rows × [`KC`] columns stay in L2 while every panel of the
//! thread passes over them; a panel's `KC × 16` slice (16 KB) stays in L1 across tiles.
//! Threads split the panels (output columns), so they never write the same bytes.

use candle_core::{Result, Tensor};

/// Output columns per panel (two AVX registers).
pub(super) const NR: usize = 16;
/// Activation rows per tile (six broadcasts against the two panel registers: 12 accumulators).
const MR: usize = 6;
/// Reduction slice kept in cache.
const KC: usize = 256;
/// Activation rows per L2 block.
const MC: usize = 240;

/// W (out, in), packed for x · Wᵀ.
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    /// ceil(rows / 16) panels of cols × 16, each 16 a cache line (unaligned loads that
    /// straddle two lines run at half speed).
    panels: Vec<Line>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Line(pub(super) [f32; NR]);

impl PackedMatrix {
    /// Whether this CPU runs the kernel (else callers keep candle's matmul).
    pub fn supported() -> bool {
        super::simd::avx2_fma()
    }

    /// Packs a (out, in) f32 weight matrix.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data: Vec<f32> = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let n_panels = rows.div_ceil(NR);
        let mut panels = vec![Line([0.0; NR]); n_panels * cols];
        for (r, row) in data.chunks_exact(cols).enumerate() {
            let (p, j) = (r / NR, r % NR);
            let panel = &mut panels[p * cols..(p + 1) * cols];
            for (line, &v) in panel.iter_mut().zip(row) {
                line.0[j] = v;
            }
        }
        Ok(Self { rows, cols, panels })
    }

    /// (out, in).
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// x (M, in) f32 · Wᵀ: (M, out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.cols {
            candle_core::bail!("packed matmul: x has {k} columns, the matrix {}", self.cols);
        }
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("packed matmul runs on the CPU only");
        };
        let all = cpu.as_slice::<f32>()?;
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed matmul: x is not contiguous");
        };
        let mut out = vec![0f32; m * self.rows];
        self.matmul(&all[a..b], m, &mut out);
        drop(storage);
        Tensor::from_vec(out, (m, self.rows), x.device())
    }

    /// out (m, rows) = x (m, cols) · Wᵀ, written whole.
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let n_panels = self.rows.div_ceil(NR);
        let threads = rayon::current_num_threads().clamp(1, n_panels);
        let per = n_panels.div_ceil(threads);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let work = |t: usize| {
            let panels = t * per..((t + 1) * per).min(n_panels);
            // SAFETY: each thread writes only the columns of its own panels.
            unsafe { self.panels_range(x, m, panels, &out_ptr) };
        };
        if threads == 1 || m * self.cols * self.rows < 1 << 16 {
            (0..threads).for_each(work);
        } else {
            (0..threads).into_par_iter().for_each(work);
        }
    }

    /// The output columns of `panels`, for all m rows.
    ///
    /// # Safety
    /// `out` points at m × rows floats that no other thread writes in these columns.
    unsafe fn panels_range(
        &self,
        x: &[f32],
        m: usize,
        panels: std::ops::Range<usize>,
        out: &SharedOut,
    ) {
        let (k_all, ldc) = (self.cols, self.rows);
        for m0 in (0..m).step_by(MC) {
            let mc = MC.min(m - m0);
            for k0 in (0..k_all).step_by(KC) {
                let kc = KC.min(k_all - k0);
                for p in panels.clone() {
                    let b = &self.panels[p * k_all + k0..][..kc];
                    let width = NR.min(self.rows - p * NR);
                    for i0 in (m0..m0 + mc).step_by(MR) {
                        let r = MR.min(m0 + mc - i0);
                        let a = &x[i0 * k_all + k0..];
                        let c = out.0.add(i0 * ldc + p * NR);
                        tile(r, a, k_all, b, kc, c, ldc, width, k0 > 0);
                    }
                }
            }
        }
    }
}

/// A frozen projection that autograd passes through: x · Wᵀ forward, and only the input's
/// gradient g · W backward (the weight gets none: candle's own matmul would compute it
/// whether wanted or not, a third of a frozen model's training FLOPs). Both products run
/// on packed copies, W for the forward and Wᵀ for the backward. What adapter training
/// (LoRA on a frozen base) multiplies by.
pub struct Frozen {
    fwd: PackedMatrix,
    bwd: PackedMatrix,
}

impl Frozen {
    /// Packs W (out, in) both ways.
    pub fn new(w: &Tensor) -> Result<Self> {
        Ok(Self {
            fwd: PackedMatrix::new(w)?,
            bwd: PackedMatrix::new(&w.t()?.contiguous()?)?,
        })
    }

    /// (out, in).
    pub fn shape(&self) -> (usize, usize) {
        self.fwd.shape()
    }

    /// x (M, in) · Wᵀ, with a backward to x.
    pub fn forward(self: &std::sync::Arc<Self>, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(FrozenOp(self.clone()))
    }
}

/// The op node (the packed weights are shared, never copied per call).
struct FrozenOp(std::sync::Arc<Frozen>);

impl candle_core::CustomOp1 for FrozenOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let f = &self.0;
        let (m, k) = l.shape().dims2()?;
        if k != f.fwd.cols {
            candle_core::bail!(
                "frozen matmul: x has {k} columns, the matrix {}",
                f.fwd.cols
            );
        }
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen matmul: x is not contiguous");
        };
        let x = &s.as_slice::<f32>()?[a..b];
        let mut out = vec![0f32; m * f.fwd.rows];
        f.fwd.matmul(x, m, &mut out);
        Ok((candle_core::CpuStorage::F32(out), (m, f.fwd.rows).into()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.bwd.forward(&grad.contiguous()?)?))
    }
}

struct SharedOut(*mut f32);
// SAFETY: threads write disjoint columns (see `matmul`).
unsafe impl Sync for SharedOut {}
unsafe impl Send for SharedOut {}

/// C[r × width] (+)= A[r × kc] · B[kc × 16] for r ≤ 6 rows.
///
/// # Safety
/// `a` holds r rows of stride lda with kc columns; `c` points at r rows of stride ldc with
/// `width` writable columns.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    r: usize,
    a: &[f32],
    lda: usize,
    b: &[Line],
    kc: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = match r {
            6 => tile_avx2::<6>,
            5 => tile_avx2::<5>,
            4 => tile_avx2::<4>,
            3 => tile_avx2::<3>,
            2 => tile_avx2::<2>,
            _ => tile_avx2::<1>,
        };
        f(a, lda, b, kc, c, ldc, width, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (r, a, lda, b, kc, c, ldc, width, accumulate);
        unreachable!("PackedMatrix::supported() is false off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_avx2<const R: usize>(
    a: &[f32],
    lda: usize,
    b: &[Line],
    kc: usize,
    c: *mut f32,
    ldc: usize,
    width: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= (R - 1) * lda + kc && b.len() >= kc);
    let (a, b) = (a.as_ptr(), b.as_ptr() as *const f32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // Every element is summed in the same order (k ascending within each KC slice)
    // whatever the tile's row count: a document's state does not depend on which other
    // documents shared its batch (re-index checks states byte for byte).
    for k in 0..kc {
        let b0 = _mm256_load_ps(b.add(k * NR));
        let b1 = _mm256_load_ps(b.add(k * NR + 8));
        for (i, acc) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(i * lda + k));
            acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let row = c.add(i * ldc);
        if width == NR {
            let (mut lo, mut hi) = (acc[0], acc[1]);
            if accumulate {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(row));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(row.add(8)));
            }
            _mm256_storeu_ps(row, lo);
            _mm256_storeu_ps(row.add(8), hi);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
            for (j, v) in tmp.iter().take(width).enumerate() {
                let o = row.add(j);
                *o = if accumulate { *o + v } else { *v };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candles_matmul_on_every_edge() {
        if !PackedMatrix::supported() {
            return;
        }
        let dev = Device::Cpu;
        // Output widths around the panel size, reductions around KC, rows around MR/MC.
        for (out, inp) in [(16, 8), (37, 300), (70, 513), (5, 1)] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let packed = PackedMatrix::new(&w).unwrap();
            for m in [1, 5, 6, 7, 97, 200] {
                let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
                let ours = packed.forward(&x).unwrap();
                let theirs = x.matmul(&w.t().unwrap()).unwrap();
                let diff = super::super::simd::max_abs_diff(&ours, &theirs);
                let tol = 1e-5 * (inp as f32).sqrt() * 4.0;
                assert!(diff < tol, "out={out} in={inp} m={m}: {diff}");
            }
        }
    }

    #[test]
    fn a_row_is_the_same_bits_whatever_else_is_in_the_batch() {
        if !PackedMatrix::supported() {
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 600), &dev).unwrap();
        let packed = PackedMatrix::new(&w).unwrap();
        let x = Tensor::randn(0f32, 1.0, (250, 600), &dev).unwrap();
        let all: Vec<Vec<f32>> = packed.forward(&x).unwrap().to_vec2().unwrap();
        for (start, len) in [(0, 1), (7, 2), (13, 3), (100, 5), (245, 5)] {
            let part: Vec<Vec<f32>> = packed
                .forward(&x.narrow(0, start, len).unwrap())
                .unwrap()
                .to_vec2()
                .unwrap();
            assert_eq!(
                part,
                all[start..start + len].to_vec(),
                "rows {start}..+{len}"
            );
        }
    }

    #[test]
    fn strided_input_is_made_contiguous() {
        if !PackedMatrix::supported() {
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (20, 12), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (12, 9), &dev)
            .unwrap()
            .t()
            .unwrap();
        let ours = PackedMatrix::new(&w).unwrap().forward(&x).unwrap();
        let theirs = x.matmul(&w.t().unwrap()).unwrap();
        let diff = super::super::simd::max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "{diff}");
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use candle_core::Device;

    #[test]
    #[ignore]
    fn gflops() {
        let dev = Device::Cpu;
        for (out, inp) in [(1536, 576), (576, 1536), (576, 576)] {
            let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
            let packed = PackedMatrix::new(&w).unwrap();
            let wt = w.t().unwrap();
            for m in [1, 26, 208, 2048] {
                let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
                let reps = (2_000_000_000 / (2 * m * out * inp)).max(3);
                let flop = (2 * m * out * inp * reps) as f64;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    packed.forward(&x).unwrap();
                }
                let ours = flop / t.elapsed().as_secs_f64() / 1e9;
                let t = std::time::Instant::now();
                for _ in 0..reps {
                    x.matmul(&wt).unwrap();
                }
                let theirs = flop / t.elapsed().as_secs_f64() / 1e9;
                println!("{out}x{inp} m={m}: packed {ours:.1} GFLOP/s, candle {theirs:.1}");
            }
        }
    }
}
