//! Attention in tiles for inference: FlashAttention's online softmax on the CPU.
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
        ))
    })?;
    drop((q_store, k_store, v_store));
    Ok(Some(Tensor::from_vec(out, (hq, l, d), q.device())?))
}

/// The attention as one trainable node, for training (`Ops::Differentiable`): the forward
/// is [`attend`]'s kernel, and nothing of size L × S is kept for the backward, which
/// recomputes the probabilities one call's block at a time. The composed path it replaces
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
        let out = with_mask(self.inner.as_ref(), |mask| {
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
        Ok((candle_core::CpuStorage::F32(out), (hq, l, d).into()))
    }

    /// With P = softmax(q·kᵀ + mask) recomputed (GQA rows stacked per key head):
    /// dV = Pᵀ·dO, dP = dO·vᵀ, dS = P ∘ (dP - rowsum(dO ∘ O)), dq = dS·k, dk = dSᵀ·q.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (hq, l, d) = q.dims3()?;
        let hkv = k.dim(0)?;
        let g = hq / hkv;
        let rows = |t: &Tensor| t.detach().contiguous()?.reshape((hkv, g * l, d));
        let (q, o, go) = (rows(q)?, rows(o)?, rows(grad)?);
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let p = super::attention::probabilities(&q.reshape((hq, l, d))?, &k, self.inner.as_ref())?;
        let dv = p.t()?.matmul(&go)?; // (Hkv, S, D)
        let dp = go.matmul(&v.t()?)?; // (Hkv, G·L, S)
        let delta = (&go * &o)?.sum_keepdim(2)?; // (Hkv, G·L, 1)
        let ds = (p * dp.broadcast_sub(&delta)?)?;
        let dq = ds.matmul(&k)?.reshape((hq, l, d))?;
        let dk = ds.t()?.matmul(&q)?; // (Hkv, S, D)
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
/// the (L, M) mask with M. Returns (Hq, L, D).
fn compute(
    q: &[f32],
    (hq, l, d): (usize, usize, usize),
    (k, k_at): (&[f32], (usize, usize, usize)),
    (v, v_at): (&[f32], (usize, usize, usize)),
    (hkv, s): (usize, usize),
    mask: Option<(&[f32], usize)>,
) -> Vec<f32> {
    let m = mask.map_or(0, |(_, m)| m);
    let packs: Vec<(Vec<Line>, Vec<Line>)> = (0..hkv)
        .map(|h| pack_head(k, k_at, v, v_at, h, s, d))
        .collect();
    let src = Source {
        q,
        packs,
        visible: mask.map(|(mk, m)| visible_ranges(mk, l, m)),
        mask: mask.map(|(mk, _)| mk),
        prefix: s - m,
        g: hq / hkv,
        l,
        s,
        d,
    };
    let mut out = vec![0f32; hq * l * d];
    let out_ptr = Shared(out.as_mut_ptr());
    let tiles = l.div_ceil(QT);
    let work = |item: usize| {
        let (h, t) = (item / tiles, item % tiles);
        let rows = t * QT..((t + 1) * QT).min(l);
        // SAFETY: item (h, t) writes only the rows `rows` of heads h·G..(h+1)·G.
        unsafe { src.tile_rows(h, rows, &out_ptr) };
    };
    let items = hkv * tiles;
    if items > 1 && hq * l * s * d > 1 << 18 {
        use rayon::prelude::*;
        (0..items).into_par_iter().for_each(work);
    } else {
        (0..items).for_each(work);
    }
    out
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
/// query tile reads them): keys in panels of [`NR`] keys (panel p holds D lines, line c =
/// dim c of keys 16p..16p+16, zero past S), values in panels of [`NR`] dims (panel p holds S
/// lines, line j = dims 16p..16p+16 of key j, zero past D).
fn pack_head(
    k: &[f32],
    (ko, ks0, ks1): (usize, usize, usize),
    v: &[f32],
    (vo, vs0, vs1): (usize, usize, usize),
    h: usize,
    s: usize,
    d: usize,
) -> (Vec<Line>, Vec<Line>) {
    let mut kp = vec![Line([0.0; NR]); s.div_ceil(NR) * d];
    let mut vp = vec![Line([0.0; NR]); d.div_ceil(NR) * s];
    for j in 0..s {
        let krow = &k[ko + h * ks0 + j * ks1..][..d];
        let panel = &mut kp[(j / NR) * d..][..d];
        for (line, &x) in panel.iter_mut().zip(krow) {
            line.0[j % NR] = x;
        }
        let vrow = &v[vo + h * vs0 + j * vs1..][..d];
        for (p, chunk) in vrow.chunks(NR).enumerate() {
            vp[p * s + j].0[..chunk.len()].copy_from_slice(chunk);
        }
    }
    (kp, vp)
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

impl Source<'_> {
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

    /// The output rows `rows` of the G query heads that share key head `h`.
    ///
    /// # Safety
    /// `out` points at (Hq, L, D) floats of which no other thread writes these rows.
    unsafe fn tile_rows(&self, h: usize, rows: std::ops::Range<usize>, out: &Shared) {
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
                    if let (Some(mask), true) = (self.mask, j0 + kt > self.prefix) {
                        let i = rows.start + r;
                        let m = self.s - self.prefix;
                        let from = self.prefix.max(j0);
                        let mrow = &mask[i * m + from - self.prefix..][..j0 + kt - from];
                        for (x, &y) in row[from - j0..kt].iter_mut().zip(mrow) {
                            *x += y;
                        }
                    }
                    row[kt..].fill(f32::NEG_INFINITY);
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The composed reference: scores, mask, candle's softmax, product.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, inner: Option<&Tensor>) -> Tensor {
        let (hq, l, d) = q.dims3().unwrap();
        let (hkv, s, _) = k.dims3().unwrap();
        let g = hq / hkv;
        let k = k
            .repeat((1, g, 1))
            .unwrap()
            .reshape((hkv, g, s, d))
            .unwrap();
        let k = k.reshape((hq, s, d)).unwrap();
        let v = v.repeat((1, g, 1)).unwrap().reshape((hq, s, d)).unwrap();
        let mut scores = q.matmul(&k.t().unwrap()).unwrap();
        if let Some(m) = inner {
            let cols = m.dim(1).unwrap();
            let full = Tensor::cat(
                &[
                    &Tensor::zeros((l, s - cols), DType::F32, q.device()).unwrap(),
                    m,
                ],
                1,
            )
            .unwrap();
            scores = scores.broadcast_add(&full).unwrap();
        }
        // The composed softmax (differentiable; candle's fused one has no backward).
        let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
        let seen = p.eq(&p).unwrap(); // NaN is not equal to itself
        if seen.min_all().unwrap().to_scalar::<u8>().unwrap() == 0 {
            // Rows that see nothing: zeros, as the kernel and our softmax give.
            let p = seen.where_cond(&p, &p.zeros_like().unwrap()).unwrap();
            return p.matmul(&v).unwrap();
        }
        p.matmul(&v).unwrap()
    }

    fn causal(l: usize) -> Tensor {
        super::super::attention::causal_mask_tensor(l, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn matches_the_composed_attention_on_every_edge() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        // (Hq, Hkv, L, S, D, mask columns): tiles around QT and KT, GQA 1-3, odd head dims.
        for (hq, hkv, l, s, d, m) in [
            (4, 2, 1, 1, 64, 0),
            (4, 2, 27, 27, 64, 27),
            (9, 3, 33, 200, 64, 33),
            (2, 1, 70, 70, 24, 70),
            (3, 3, 64, 130, 40, 0),
            (6, 2, 100, 612, 64, 100),
        ] {
            let q = (Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap() * 0.3).unwrap();
            let k = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
            let mask = (m > 0).then(|| {
                let c = causal(l);
                c.narrow(1, l - m, m).unwrap()
            });
            let ours = attend(&q, &k, &v, mask.as_ref()).unwrap().unwrap();
            let theirs = reference(&q, &k, &v, mask.as_ref());
            let diff = super::super::simd::max_abs_diff(&ours, &theirs);
            assert!(diff < 2e-5, "hq={hq} hkv={hkv} l={l} s={s} d={d}: {diff}");
        }
    }

    #[test]
    fn strided_keys_and_a_sentence_mask_with_holes() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        let (hq, hkv, l, d) = (4, 2, 90, 32);
        // Keys are a view into a larger cache: rows 10..10+S of a (Hkv, 400, D) buffer.
        let cache = Tensor::randn(0f32, 1.0, (hkv, 400, d), &dev).unwrap();
        let s = 300;
        let k = cache.narrow(1, 10, s).unwrap();
        let v = cache.narrow(1, 50, s).unwrap();
        let q = (Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap() * 0.3).unwrap();
        // Segments of 9 rows, the last 2 of each kept: a query sees kept rows of earlier
        // segments and its own segment causally; row 0..8 of the first segment see only
        // themselves; one row sees nothing of the mask (it still sees the prefix).
        let seg = |i: usize| i / 9;
        let mut mask = vec![f32::NEG_INFINITY; l * l];
        for i in 0..l {
            for j in 0..l {
                let kept = j % 9 >= 7;
                if (seg(j) < seg(i) && kept) || (seg(j) == seg(i) && j <= i) {
                    mask[i * l + j] = 0.0;
                }
            }
        }
        mask[45 * l..46 * l].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(mask, (l, l), &dev).unwrap();
        let ours = attend(&q, &k, &v, Some(&mask)).unwrap().unwrap();
        let theirs = reference(
            &q,
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            Some(&mask),
        );
        let diff = super::super::simd::max_abs_diff(&ours, &theirs);
        assert!(diff < 2e-5, "{diff}");
    }

    #[test]
    fn the_trainable_node_has_the_composed_gradients() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        for (hq, hkv, l, s, d, m) in [
            (4, 2, 40, 100, 32, 40),
            (9, 3, 70, 70, 64, 70),
            (2, 2, 5, 9, 8, 0),
        ] {
            let var = |shape: (usize, usize, usize), scale: f64| {
                candle_core::Var::from_tensor(
                    &(Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap(),
                )
                .unwrap()
            };
            let (q, k, v) = (
                var((hq, l, d), 0.3),
                var((hkv, s + 3, d), 1.0),
                var((hkv, s, d), 1.0),
            );
            // Keys as a strided view, as the plans pass them.
            let kv = k.narrow(1, 3, s).unwrap();
            let w = Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap();
            let mask = (m > 0).then(|| causal(l).narrow(1, l - m, m).unwrap());
            let grads = |y: Tensor| {
                let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                [q.as_tensor(), k.as_tensor(), v.as_tensor()]
                    .map(|t| g.get(t).expect("a gradient").clone())
            };
            let ours = grads(
                attend_trainable(&q, &kv, &v, mask.as_ref())
                    .unwrap()
                    .unwrap(),
            );
            let theirs = grads(reference(&q, &kv, &v, mask.as_ref()));
            for (name, (a, b)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&theirs)) {
                let diff = super::super::simd::max_abs_diff(a, b);
                assert!(diff < 1e-4, "d{name} hq={hq} l={l} s={s}: {diff}");
            }
        }
    }

    #[test]
    fn a_row_is_the_same_bits_whatever_rows_share_its_call() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        let dev = Device::Cpu;
        let (hq, hkv, l, s, d) = (4, 2, 100, 300, 64);
        let q = Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
        let mask = causal(l);
        let all: Vec<Vec<Vec<f32>>> = attend(&q, &k, &v, Some(&mask))
            .unwrap()
            .unwrap()
            .to_vec3()
            .unwrap();
        // The last 7 queries alone, with the keys they see (the same tiling from key 0).
        let (a, n) = (93, 7);
        let part: Vec<Vec<Vec<f32>>> = attend(
            &q.narrow(1, a, n).unwrap(),
            &k.narrow(1, 0, s).unwrap(),
            &v,
            Some(&mask.narrow(0, a, n).unwrap()),
        )
        .unwrap()
        .unwrap()
        .to_vec3()
        .unwrap();
        for h in 0..hq {
            assert_eq!(part[h], all[h][a..a + n].to_vec(), "head {h}");
        }
    }
}
