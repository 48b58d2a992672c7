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
        Ok(Self::from_rows(&data, rows, cols))
    }

    /// Packs W (rows, cols), row-major in `data`.
    fn from_rows(data: &[f32], rows: usize, cols: usize) -> Self {
        let n_panels = rows.div_ceil(NR);
        let mut panels = vec![Line([0.0; NR]); n_panels * cols];
        let fill = |p: usize, panel: &mut [Line]| {
            for (j, row) in data[p * NR * cols..]
                .chunks_exact(cols)
                .take(NR)
                .enumerate()
            {
                for (line, &v) in panel.iter_mut().zip(row) {
                    line.0[j] = v;
                }
            }
        };
        for_each_panel(&mut panels, cols, rows * cols, fill);
        Self { rows, cols, panels }
    }

    /// Packs Mᵀ for M (r, c) row-major in `data`: a matrix of c rows and r columns. The
    /// cheap direction: a panel's line k is 16 consecutive floats of M's row k, so the
    /// backward's Wᵀ and xᵀ are packed by copying, never by a gather.
    fn from_columns(data: &[f32], r: usize, c: usize) -> Self {
        let n_panels = c.div_ceil(NR);
        let mut panels = vec![Line([0.0; NR]); n_panels * r];
        let fill = |p: usize, panel: &mut [Line]| {
            let width = NR.min(c - p * NR);
            for (k, line) in panel.iter_mut().enumerate() {
                line.0[..width].copy_from_slice(&data[k * c + p * NR..][..width]);
            }
        };
        for_each_panel(&mut panels, r, r * c, fill);
        Self {
            rows: c,
            cols: r,
            panels,
        }
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

    /// A custom op's forward: x (M, cols), contiguous f32 storage, times Wᵀ.
    fn node_forward(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
        op: &str,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::simd::f32s(s, l, op)?;
        let (m, k) = l.shape().dims2()?;
        if k != self.cols {
            candle_core::bail!("{op}: x has {k} columns, the matrix {}", self.cols);
        }
        let mut out = vec![0f32; m * self.rows];
        self.matmul(x, m, &mut out);
        Ok((candle_core::CpuStorage::F32(out), (m, self.rows).into()))
    }

    /// out (m, rows) = x (m, cols) · Wᵀ, written whole.
    fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let lhs = Lhs {
            data: x,
            ld: self.cols,
            transposed: false,
        };
        self.matmul_lhs(&lhs, m, out)
    }

    /// out (m, rows) = A (m, cols) · Wᵀ, A as `lhs` describes it, written whole.
    fn matmul_lhs(&self, lhs: &Lhs, m: usize, out: &mut [f32]) {
        use rayon::prelude::*;
        let n_panels = self.rows.div_ceil(NR);
        let threads = rayon::current_num_threads().clamp(1, n_panels);
        let per = n_panels.div_ceil(threads);
        let out_ptr = SharedOut(out.as_mut_ptr());
        let work = |t: usize| {
            let panels = t * per..((t + 1) * per).min(n_panels);
            // SAFETY: each thread writes only the columns of its own panels.
            unsafe { self.panels_range(lhs, m, panels, &out_ptr) };
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
        lhs: &Lhs,
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
                        let c = out.0.add(i0 * ldc + p * NR);
                        if lhs.transposed {
                            let a = &lhs.data[k0 * lhs.ld + i0..];
                            tile_t(r, a, lhs.ld, b, kc, c, ldc, width, k0 > 0);
                        } else {
                            let a = &lhs.data[i0 * lhs.ld + k0..];
                            tile(r, a, lhs.ld, b, kc, c, ldc, width, k0 > 0);
                        }
                    }
                }
            }
        }
    }
}

/// Runs `fill(p, panel)` for every panel of `len` lines, on both cores when the matrix
/// (`size` floats) is large enough to pay for the hand-off: the training step packs its
/// weights on every call, and a serial pack leaves the other core idle.
fn for_each_panel(
    panels: &mut [Line],
    len: usize,
    size: usize,
    fill: impl Fn(usize, &mut [Line]) + Sync,
) {
    use rayon::prelude::*;
    if len == 0 {
        return;
    }
    if size < 1 << 16 {
        panels
            .chunks_mut(len)
            .enumerate()
            .for_each(|(p, x)| fill(p, x));
    } else {
        panels
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(p, x)| fill(p, x));
    }
}

/// The left factor A (m, k) of a product: row-major with row stride `ld`, or `transposed`
/// (stored as Aᵀ, (k, m) with row stride `ld`: the backward's gᵀ, read in place).
struct Lhs<'a> {
    data: &'a [f32],
    ld: usize,
    transposed: bool,
}

/// x (M, in) · Wᵀ for a trainable W (out, in), with both gradients, on the packed kernel.
///
/// Why not candle's matmul: the `gemm` crate packs both factors on every call and hands
/// work between threads per call; a training step at the benchmark shape spent about a
/// fifth of its time in those hand-offs and spinning. Here W is packed once per call (a
/// copy of out × in floats, small beside the M × out × in product), and the backward's
/// factors are read in place or packed by copying rows:
/// dx = g · W (Wᵀ packed from W's rows), dW = gᵀ · x (gᵀ read in place, xᵀ packed from
/// x's rows). Only for contiguous f32 on a CPU with the kernel ([`linear_fits`]).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, LinearNode)
}

/// Whether [`linear`] takes these tensors.
pub fn linear_fits(x: &Tensor, w: &Tensor) -> bool {
    PackedMatrix::supported()
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
}

struct LinearNode;

impl candle_core::CustomOp2 for LinearNode {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let w = super::simd::f32s(s2, l2, self.name())?;
        let (n, k) = l2.shape().dims2()?;
        PackedMatrix::from_rows(w, n, k).node_forward(s1, l1, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((m, k), (n, _)) = (x.dims2()?, w.dims2()?);
        let (dx, dw) = super::simd::with_f32s([grad, x, w], self.name(), |[g, xv, wv]| {
            // dx (M, in) = g (M, out) · W: the right factor is Wᵀ's transpose, packed
            // from W.
            let mut dx = vec![0f32; m * k];
            PackedMatrix::from_columns(wv, n, k).matmul(g, m, &mut dx);
            // dW (out, in) = gᵀ (out, M) · x (M, in): gᵀ read in place, xᵀ packed from x.
            let mut dw = vec![0f32; n * k];
            let gt = Lhs {
                data: g,
                ld: n,
                transposed: true,
            };
            PackedMatrix::from_columns(xv, m, k).matmul_lhs(&gt, n, &mut dw);
            Ok((dx, dw))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, (m, k), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), x.device())?),
        ))
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

impl Frozen {
    /// x · Wᵀ + scale · (x · Aᵀ) · Bᵀ (a low-rank adapter on this frozen base) as one
    /// trainable node: gradients to x, A (r, in) and B (out, r).
    ///
    /// Why one node: composed, each adapted projection kept four (N, out) buffers for the
    /// backward (the base's output, x·Aᵀ·Bᵀ, its scaled copy, the sum) and candle summed
    /// the gradient of each into a zeroed buffer of that size. Over SmolLM2's 30 layers
    /// of seven projections that was most of a training step's memory, and what kept
    /// 4,096-token sequences out of 24 GiB. The node keeps nothing but its inputs.
    pub fn forward_adapted(
        self: &std::sync::Arc<Self>,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        x.contiguous()?.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            AdaptedOp(self.clone(), scale),
        )
    }
}

/// The adapted node (see [`Frozen::forward_adapted`]).
struct AdaptedOp(std::sync::Arc<Frozen>, f64);

impl candle_core::CustomOp3 for AdaptedOp {
    fn name(&self) -> &'static str {
        "frozen-linear-with-adapter"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (base, shape) = self.0.fwd.node_forward(s1, l1, self.name())?;
        let candle_core::CpuStorage::F32(mut y) = base else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let x = super::simd::f32s(s1, l1, self.name())?;
        let (a, b) = (
            super::simd::f32s(s2, l2, self.name())?,
            super::simd::f32s(s3, l3, self.name())?,
        );
        let ((r, k), (n, r2)) = (l2.shape().dims2()?, l3.shape().dims2()?);
        let m = x.len() / k.max(1);
        if k != self.0.fwd.cols || n != self.0.fwd.rows || r != r2 {
            candle_core::bail!(
                "{}: A ({r}, {k}) and B ({n}, {r2}) do not fit a ({}, {}) base",
                self.name(),
                self.0.fwd.rows,
                self.0.fwd.cols
            );
        }
        let mut u = vec![0f32; m * r]; // x · Aᵀ (M, r)
        PackedMatrix::from_rows(a, r, k).matmul(x, m, &mut u);
        let mut low = vec![0f32; m * n]; // u · Bᵀ (M, out)
        PackedMatrix::from_rows(b, n, r).matmul(&u, m, &mut low);
        let s = self.1 as f32;
        y.iter_mut().zip(&low).for_each(|(y, l)| *y += s * l);
        Ok((candle_core::CpuStorage::F32(y), shape))
    }

    /// With u = x·Aᵀ and g the output's gradient: du = s·g·B, dB = s·gᵀ·u, dA = duᵀ·x,
    /// dx = g·W + du·A (the base's part on its packed Wᵀ).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), g.detach().contiguous()?);
        let u = x.matmul(&a.t()?)?; // (M, r)
        let du = (g.matmul(&b)? * self.1)?; // (M, r)
        let db = (g.t()?.matmul(&u)? * self.1)?; // (out, r)
        let da = du.t()?.matmul(&x)?; // (r, in)
        let dx = (self.0.bwd.forward(&g)? + du.matmul(&a)?)?; // (M, in)
        Ok((Some(dx), Some(da), Some(db)))
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
        self.0.fwd.node_forward(s, l, self.name())
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
    tile_any::<false>(r, a, lda, b, kc, c, ldc, width, accumulate)
}

/// [`tile`] with A stored transposed: `a` holds kc rows of stride lda, and the tile's
/// row i is its column i.
///
/// # Safety
/// `a` holds kc rows of stride lda with r columns; `c` as in [`tile`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_t(
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
    tile_any::<true>(r, a, lda, b, kc, c, ldc, width, accumulate)
}

#[allow(clippy::too_many_arguments)]
unsafe fn tile_any<const T: bool>(
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
            6 => tile_avx2::<6, T>,
            5 => tile_avx2::<5, T>,
            4 => tile_avx2::<4, T>,
            3 => tile_avx2::<3, T>,
            2 => tile_avx2::<2, T>,
            _ => tile_avx2::<1, T>,
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
unsafe fn tile_avx2<const R: usize, const T: bool>(
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
    debug_assert!(b.len() >= kc);
    debug_assert!(if T {
        a.len() >= (kc - 1) * lda + R
    } else {
        a.len() >= (R - 1) * lda + kc
    });
    let (a, b) = (a.as_ptr(), b.as_ptr() as *const f32);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    // Every element is summed in the same order (k ascending within each KC slice)
    // whatever the tile's row count: a document's state does not depend on which other
    // documents shared its batch (re-index checks states byte for byte).
    for k in 0..kc {
        let b0 = _mm256_load_ps(b.add(k * NR));
        let b1 = _mm256_load_ps(b.add(k * NR + 8));
        for (i, acc) in acc.iter_mut().enumerate() {
            let at = if T { k * lda + i } else { i * lda + k };
            let av = _mm256_broadcast_ss(&*a.add(at));
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
mod speed;
#[cfg(test)]
mod tests;
