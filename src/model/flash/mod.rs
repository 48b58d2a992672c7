//! Attention in tiles, for inference and training: FlashAttention's online softmax on the CPU.
//!
//! Why our own: profiling the plain causal forward at 16k tokens (`perf record` of `bench
//! --one full-attention --lengths 16384`) put 42% of the time in candle's GEMM, 10% in the
//! softmax pass and about 17% in page faults: each block of 512 queries wrote a score
//! matrix over every earlier key (128 MiB at 16k, fresh zeroed pages from the kernel every
//! time), then read it twice more. Here a tile of [`QT`] queries walks the keys in tiles
//! of [`KT`]: one tile's scores live in L1, each row keeps a running max and sum (the online
//! softmax of Milakov & Gimelshein, as in FlashAttention), the output is rescaled when the
//! max moves, and both products run on `packed`'s AVX2 micro-kernel. Key tiles the mask
//! hides from every query of a tile (the causal upper triangle, other sentences) are never
//! computed.
//!
//! Determinism: a row's result depends only on its own scores and the call's key tiling
//! (fixed from the first key), never on which other rows share its tile, so a document's
//! state does not depend on its batch (re-index compares states byte for byte).

use super::packed::{tile, Line, NR};
use candle_core::{DType, Result, Storage, Tensor};

/// Query rows per head in one work item.
const QT: usize = 32;
/// Keys per tile (a multiple of [`NR`] and of 8 lanes).
const KT: usize = 64;

/// Softmax(q·kᵀ + mask)·v as [`super::attention::attend`] defines it: q (Hq, L, D) scaled;
/// k, v (Hkv, S, D), rows and heads may be strided; `inner` (L, M) additive over the last
/// M keys, the first S - M all visible. Returns None where the kernel does not apply (not
/// f32 on a CPU with AVX2 and FMA, or a layout it does not read), for the caller's own
/// path.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inner: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let Some(((hq, l, d), (hkv, s), m)) = applies(q, k, v, inner)? else {
        return Ok(None);
    };
    let q = q.contiguous()?;
    let (q_store, q_lay) = q.storage_and_layout();
    let (k_store, k_lay) = k.storage_and_layout();
    let (v_store, v_lay) = v.storage_and_layout();
    let (qa, qb) = q_lay
        .contiguous_offsets()
        .expect("made contiguous just above");
    let out = with_mask(inner, |mask| {
        Ok(compute(
            &slice(&q_store)?[qa..qb],
            (hq, l, d),
            (slice(&k_store)?, at(k_lay)),
            (slice(&v_store)?, at(v_lay)),
            (hkv, s),
            mask.map(|mk| (mk, m)),
        )
        .0)
    })?;
    drop((q_store, k_store, v_store));
    Ok(Some(Tensor::from_vec(out, (hq, l, d), q.device())?))
}

/// The attention as one trainable node, for training (`Ops::Differentiable`): the forward
/// is [`attend`]'s kernel, and nothing of size L × S is kept for the backward, which
/// recomputes the probabilities tile by tile ([`backward`]). The composed path it replaces
/// (scores, masked softmax, product) kept the scores and probabilities of every block of
/// every layer until the backward, and candle summed each of their gradients into freshly
/// zeroed buffers of the same size. None where [`attend`] does not apply.
pub fn attend_trainable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inner: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if applies(q, k, v, inner)?.is_none() {
        return Ok(None);
    }
    let op = Trainable {
        inner: inner.map(|m| m.detach().contiguous()).transpose()?,
        lse: std::sync::OnceLock::new(),
    };
    Ok(Some(q.contiguous()?.apply_op3(k, v, op)?))
}

/// The dimensions ((Hq, L, D), (Hkv, S), M) where the kernel applies, else None.
#[allow(clippy::type_complexity)]
fn applies(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    inner: Option<&Tensor>,
) -> Result<Option<((usize, usize, usize), (usize, usize), usize)>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !super::simd::avx2_fma()
        || ![q, k, v].into_iter().all(f32_cpu)
        || inner.is_some_and(|m| !f32_cpu(m))
    {
        return Ok(None);
    }
    let (hq, l, d) = q.dims3()?;
    let (hkv, s, dk) = k.dims3()?;
    if dk != d || v.dims3()? != (hkv, s, d) || hkv == 0 || hq % hkv != 0 || d == 0 {
        return Ok(None);
    }
    if k.stride()[2] != 1 || v.stride()[2] != 1 {
        return Ok(None);
    }
    let m = match inner {
        Some(mask) => {
            let (ml, mm) = mask.dims2()?;
            if ml != l || mm > s {
                candle_core::bail!(
                    "tiled attention: a ({ml}, {mm}) mask for {l} queries over {s} keys"
                );
            }
            mm
        }
        None => 0,
    };
    Ok(Some(((hq, l, d), (hkv, s), m)))
}

struct Trainable {
    /// (L, M), detached.
    inner: Option<Tensor>,
    /// The forward's log-sum-exp per row (Hq, L): all the backward keeps of the softmax.
    lse: std::sync::OnceLock<Vec<f32>>,
}

impl candle_core::CustomOp3 for Trainable {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let q = super::simd::f32s(qs, ql, self.name())?;
        let (hq, l, d) = ql.shape().dims3()?;
        let (hkv, s, _) = kl.shape().dims3()?;
        let (out, lse) = with_mask(self.inner.as_ref(), |mask| {
            let m = self.inner.as_ref().map_or(Ok(0), |t| t.dim(1))?;
            Ok(compute(
                q,
                (hq, l, d),
                (ks.as_slice::<f32>()?, at(kl)),
                (vs.as_slice::<f32>()?, at(vl)),
                (hkv, s),
                mask.map(|mk| (mk, m)),
            ))
        })?;
        // A node's forward runs once; a second run would compute the same values.
        let _ = self.lse.set(lse);
        Ok((candle_core::CpuStorage::F32(out), (hq, l, d).into()))
    }

    /// In tiles, from the forward's log-sum-exp: see [`backward`].
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("tiled attention: the backward ran before the forward");
        };
        let (hq, l, d) = q.dims3()?;
        let (hkv, s, _) = k.dims3()?;
        let (dq, dk, dv) = super::simd::with_f32s([q, k, v, o, grad], self.name(), |x| {
            with_mask(self.inner.as_ref(), |mask| {
                let m = self.inner.as_ref().map_or(Ok(0), |t| t.dim(1))?;
                Ok(backward::backward(
                    x[0],
                    (hq, l, d),
                    x[1],
                    x[2],
                    (hkv, s),
                    mask.map(|mk| (mk, m)),
                    x[3],
                    x[4],
                    lse,
                ))
            })
        })?;
        let dev = q.device();
        let (dq, dk, dv) = (
            Tensor::from_vec(dq, (hq, l, d), dev)?,
            Tensor::from_vec(dk, (hkv, s, d), dev)?,
            Tensor::from_vec(dv, (hkv, s, d), dev)?,
        );
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// (start offset, head stride, row stride) of a (H, S, D) layout whose rows are contiguous.
fn at(l: &candle_core::Layout) -> (usize, usize, usize) {
    (l.start_offset(), l.stride()[0], l.stride()[1])
}

/// Runs `f` on the contiguous f32 values of a mask (or None).
fn with_mask<T>(mask: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> Result<T>) -> Result<T> {
    let Some(mask) = mask else {
        return f(None);
    };
    let mask = mask.contiguous()?;
    let (st, lay) = mask.storage_and_layout();
    let Some((a, b)) = lay.contiguous_offsets() else {
        candle_core::bail!("tiled attention: the mask is not contiguous");
    };
    f(Some(&slice(&st)?[a..b]))
}

/// The kernel on raw values: q (Hq, L, D) contiguous; k, v (Hkv, S, D) at their strides;
/// the (L, M) mask with M. Returns (Hq, L, D) and each row's log-sum-exp (Hq, L).
fn compute(
    q: &[f32],
    (hq, l, d): (usize, usize, usize),
    (k, k_at): (&[f32], (usize, usize, usize)),
    (v, v_at): (&[f32], (usize, usize, usize)),
    (hkv, s): (usize, usize),
    mask: Option<(&[f32], usize)>,
) -> (Vec<f32>, Vec<f32>) {
    let packs: Vec<(Vec<Line>, Vec<Line>)> = (0..hkv)
        .map(|h| pack_head((k, k_at), (v, v_at), h, s, d))
        .collect();
    let src = Source::new(q, packs, (hq, l, d), (hkv, s), mask);
    let mut out = vec![0f32; hq * l * d];
    let mut lse = vec![0f32; hq * l];
    let (out_ptr, lse_ptr) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let tiles = l.div_ceil(QT);
    let work = |item: usize| {
        let (h, t) = (item / tiles, item % tiles);
        let rows = t * QT..((t + 1) * QT).min(l);
        // SAFETY: item (h, t) writes only the rows `rows` of heads h·G..(h+1)·G.
        unsafe { src.tile_rows(h, rows, &out_ptr, &lse_ptr) };
    };
    let items = hkv * tiles;
    if items > 1 && hq * l * s * d > 1 << 18 {
        use rayon::prelude::*;
        (0..items).into_par_iter().for_each(work);
    } else {
        (0..items).for_each(work);
    }
    (out, lse)
}

/// Each query row's visible columns of the inner mask, as one range [lo, hi) (empty: none).
/// Holes inside the range (other sentences' tokens between kept gists) are masked per
/// score; the range only decides which key tiles a query tile can skip.
fn visible_ranges(mask: &[f32], l: usize, m: usize) -> Vec<(u32, u32)> {
    (0..l)
        .map(|i| {
            let row = &mask[i * m..(i + 1) * m];
            let lo = row.iter().position(|&x| x > f32::NEG_INFINITY);
            let hi = row.iter().rposition(|&x| x > f32::NEG_INFINITY);
            match (lo, hi) {
                (Some(lo), Some(hi)) => (lo as u32, hi as u32 + 1),
                _ => (0, 0),
            }
        })
        .collect()
}

/// One key head's keys and values laid out for the micro-kernel, once per call (every
/// query tile reads them): keys in key panels, values in dim panels.
fn pack_head(
    k: (&[f32], (usize, usize, usize)),
    v: (&[f32], (usize, usize, usize)),
    h: usize,
    s: usize,
    d: usize,
) -> (Vec<Line>, Vec<Line>) {
    (key_panels(k, h, s, d), dim_panels(v, h, s, d))
}

/// Rows of head h of x (H, S, D) at its (offset, head stride, row stride), in panels of
/// [`NR`] rows: panel p holds D lines, line c = dim c of rows 16p..16p+16, zero past S
/// (the right factor of q·kᵀ and dO·vᵀ).
pub(super) fn key_panels(
    (x, (o, s0, s1)): (&[f32], (usize, usize, usize)),
    h: usize,
    s: usize,
    d: usize,
) -> Vec<Line> {
    let mut out = vec![Line([0.0; NR]); s.div_ceil(NR) * d];
    for j in 0..s {
        let row = &x[o + h * s0 + j * s1..][..d];
        let panel = &mut out[(j / NR) * d..][..d];
        for (line, &v) in panel.iter_mut().zip(row) {
            line.0[j % NR] = v;
        }
    }
    out
}

/// The same rows in panels of [`NR`] dims: panel p holds S lines, line j = dims
/// 16p..16p+16 of row j, zero past D (the right factor of P·v and dS·k).
pub(super) fn dim_panels(
    (x, (o, s0, s1)): (&[f32], (usize, usize, usize)),
    h: usize,
    s: usize,
    d: usize,
) -> Vec<Line> {
    let mut out = vec![Line([0.0; NR]); d.div_ceil(NR) * s];
    for j in 0..s {
        let row = &x[o + h * s0 + j * s1..][..d];
        for (p, chunk) in row.chunks(NR).enumerate() {
            out[p * s + j].0[..chunk.len()].copy_from_slice(chunk);
        }
    }
    out
}

/// What every work item reads.
struct Source<'a> {
    q: &'a [f32],
    /// Per key head: (keys, values) as [`pack_head`] lays them out.
    packs: Vec<(Vec<Line>, Vec<Line>)>,
    mask: Option<&'a [f32]>,
    visible: Option<Vec<(u32, u32)>>,
    /// Keys before the mask's columns (all visible).
    prefix: usize,
    g: usize,
    l: usize,
    s: usize,
    d: usize,
}

impl<'a> Source<'a> {
    fn new(
        q: &'a [f32],
        packs: Vec<(Vec<Line>, Vec<Line>)>,
        (hq, l, d): (usize, usize, usize),
        (hkv, s): (usize, usize),
        mask: Option<(&'a [f32], usize)>,
    ) -> Self {
        Source {
            q,
            packs,
            visible: mask.map(|(mk, m)| visible_ranges(mk, l, m)),
            mask: mask.map(|(mk, _)| mk),
            prefix: s - mask.map_or(0, |(_, m)| m),
            g: hq / hkv,
            l,
            s,
            d,
        }
    }

    /// Whether any query in `rows` sees a key in j0..j1.
    fn tile_visible(&self, rows: &std::ops::Range<usize>, j0: usize, j1: usize) -> bool {
        let Some(vis) = &self.visible else {
            return true;
        };
        if j0 < self.prefix {
            return true;
        }
        let (a, b) = (j0 - self.prefix, j1 - self.prefix);
        vis[rows.clone()]
            .iter()
            .any(|&(lo, hi)| (lo as usize) < b && (hi as usize) > a && lo < hi)
    }

    /// Adds query row i's mask to its scores of key tile j0..j0+kt (KT lanes), and -∞ to
    /// the lanes past the tile's keys.
    fn mask_scores(&self, row: &mut [f32], i: usize, j0: usize, kt: usize) {
        if let (Some(mask), true) = (self.mask, j0 + kt > self.prefix) {
            let m = self.s - self.prefix;
            let from = self.prefix.max(j0);
            let mrow = &mask[i * m + from - self.prefix..][..j0 + kt - from];
            for (x, &y) in row[from - j0..kt].iter_mut().zip(mrow) {
                *x += y;
            }
        }
        row[kt..].fill(f32::NEG_INFINITY);
    }

    /// The output rows `rows` of the G query heads that share key head `h`, and their
    /// log-sum-exp.
    ///
    /// # Safety
    /// `out` points at (Hq, L, D) floats and `lse` at (Hq, L), of which no other thread
    /// writes these rows.
    unsafe fn tile_rows(&self, h: usize, rows: std::ops::Range<usize>, out: &Shared, lse: &Shared) {
        let (d, l, n) = (self.d, self.l, rows.len());
        let v_panels = d.div_ceil(NR);
        let (kp, vp) = &self.packs[h];
        let mut scores = vec![0f32; n * KT];
        let mut max = vec![f32::NEG_INFINITY; self.g * n];
        let mut sum = vec![0f32; self.g * n];
        for j0 in (0..self.s).step_by(KT) {
            let kt = KT.min(self.s - j0);
            if !self.tile_visible(&rows, j0, j0 + kt) {
                continue;
            }
            for gi in 0..self.g {
                let head = h * self.g + gi;
                let q0 = (head * l + rows.start) * d;
                let o0 = out.0.add(q0);
                for p in 0..kt.div_ceil(NR) {
                    for r0 in (0..n).step_by(6) {
                        tile(
                            6.min(n - r0),
                            &self.q[q0 + r0 * d..],
                            d,
                            &kp[(j0 / NR + p) * d..][..d],
                            d,
                            scores.as_mut_ptr().add(r0 * KT + p * NR),
                            KT,
                            NR,
                            false,
                        );
                    }
                }
                for r in 0..n {
                    let row = &mut scores[r * KT..(r + 1) * KT];
                    self.mask_scores(row, rows.start + r, j0, kt);
                    let at = gi * n + r;
                    let alpha = online_softmax(row, &mut max[at], &mut sum[at]);
                    if alpha != 1.0 {
                        let orow = std::slice::from_raw_parts_mut(o0.add(r * d), d);
                        orow.iter_mut().for_each(|x| *x *= alpha);
                    }
                }
                for p in 0..v_panels {
                    for r0 in (0..n).step_by(6) {
                        tile(
                            6.min(n - r0),
                            &scores[r0 * KT..],
                            KT,
                            &vp[p * self.s + j0..][..kt],
                            kt,
                            o0.add(r0 * d + p * NR),
                            d,
                            NR.min(d - p * NR),
                            true,
                        );
                    }
                }
            }
        }
        for gi in 0..self.g {
            let head = h * self.g + gi;
            for r in 0..n {
                let total = sum[gi * n + r];
                // log Σ exp(scores), the backward's softmax in one number per row; +∞ for
                // a row that sees nothing (its probabilities are then exp(-∞) = 0).
                *lse.0.add(head * l + rows.start + r) = if total > 0.0 {
                    max[gi * n + r] + total.ln()
                } else {
                    f32::INFINITY
                };
                if total > 0.0 {
                    let orow = std::slice::from_raw_parts_mut(
                        out.0.add((head * l + rows.start + r) * d),
                        d,
                    );
                    let inv = 1.0 / total;
                    orow.iter_mut().for_each(|x| *x *= inv);
                }
            }
        }
    }
}

/// One row's scores of one key tile (masked scores -inf, KT of them) become exp(score -
/// running max), in place; the running max and sum move on. Returns the factor the row's
/// output so far must be scaled by (exactly 1 when the max did not move). A row that sees
/// nothing in this tile gets zeros and changes nothing.
fn online_softmax(row: &mut [f32], max: &mut f32, sum: &mut f32) -> f32 {
    debug_assert_eq!(row.len(), KT);
    // SAFETY: `attend` runs only where AVX2 and FMA were detected.
    let tile_max = unsafe { row_max(row) };
    if tile_max == f32::NEG_INFINITY {
        row.fill(0.0);
        return 1.0;
    }
    let new_max = max.max(tile_max);
    let alpha = if *max == f32::NEG_INFINITY {
        0.0
    } else {
        (*max - new_max).exp()
    };
    // SAFETY: `attend` runs only where AVX2 and FMA were detected.
    let tile_sum = unsafe { exp_sub_sum(row, new_max) };
    *sum = *sum * alpha + tile_sum;
    *max = new_max;
    alpha
}

/// The largest of KT lanes (a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_max(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let p = row.as_ptr();
    let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
    for i in (0..row.len()).step_by(8) {
        acc = _mm256_max_ps(acc, _mm256_loadu_ps(p.add(i)));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_max(_row: &[f32]) -> f32 {
    unreachable!("attend returns None without AVX2")
}

/// row ← exp(row - m), returning the sum (KT lanes, a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum(row: &mut [f32], m: f32) -> f32 {
    use std::arch::x86_64::*;
    let p = row.as_mut_ptr();
    let mv = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    for i in (0..row.len()).step_by(8) {
        let e = super::softmax::exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn exp_sub_sum(_row: &mut [f32], _m: f32) -> f32 {
    unreachable!("attend returns None without AVX2")
}

fn slice(st: &Storage) -> Result<&[f32]> {
    match st {
        Storage::Cpu(c) => c.as_slice::<f32>(),
        _ => candle_core::bail!("tiled attention: CPU tensors only"),
    }
}

struct Shared(*mut f32);
// SAFETY: work items write disjoint rows (see `attend`).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

mod backward;
mod grouped;
#[cfg(test)]
mod tests;

pub use grouped::{attend_groups, Group};
