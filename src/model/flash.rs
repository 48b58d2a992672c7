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

use super::packed::{tile, tile_t, Line, NR};
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
                Ok(backward(
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
        .map(|h| pack_head(k, k_at, v, v_at, h, s, d))
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

/// Work items of the backward per key head: fixed (not the thread count), so the sums of
/// the items' key and value gradients, taken in item order, are the same bits on any
/// machine.
const BACKWARD_CHUNKS: usize = 4;

/// The gradients of [`compute`] (FlashAttention-2's backward, on the CPU): the
/// probabilities are recomputed tile by tile from the forward's log-sum-exp, and tiles
/// the mask hides are skipped as in the forward, so nothing of size L × S is built.
/// q, o, go (Hq, L, D) contiguous; k, v (Hkv, S, D) contiguous; lse (Hq, L).
/// Returns (dq (Hq, L, D), dk (Hkv, S, D), dv (Hkv, S, D)).
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    (hq, l, d): (usize, usize, usize),
    k: &[f32],
    v: &[f32],
    (hkv, s): (usize, usize),
    mask: Option<(&[f32], usize)>,
    o: &[f32],
    go: &[f32],
    lse: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let head_at = (0, s * d, d);
    // Keys in key panels (scores) and dim panels (dq); values in key panels (dP).
    let packs: Vec<(Vec<Line>, Vec<Line>)> = (0..hkv)
        .map(|h| pack_head(k, head_at, v, head_at, h, s, d))
        .collect();
    let swapped: Vec<(Vec<Line>, Vec<Line>)> = (0..hkv)
        .map(|h| pack_head(v, head_at, k, head_at, h, s, d))
        .collect();
    let src = Source::new(q, packs, (hq, l, d), (hkv, s), mask);
    // δ = rowsum(dO ∘ O): the softmax's backward in one number per row.
    let delta: Vec<f32> = go
        .chunks_exact(d)
        .zip(o.chunks_exact(d))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
        .collect();
    let mut dq = vec![0f32; hq * l * d];
    let dq_ptr = Shared(dq.as_mut_ptr());
    let tiles = l.div_ceil(QT);
    let per = tiles.div_ceil(BACKWARD_CHUNKS);
    let grads = Grads {
        go,
        lse,
        delta: &delta,
        swapped: &swapped,
    };
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..hkv * BACKWARD_CHUNKS)
        .into_par_iter()
        .map(|item| {
            let (h, c) = (item / BACKWARD_CHUNKS, item % BACKWARD_CHUNKS);
            let mut dk = vec![0f32; s * d];
            let mut dv = vec![0f32; s * d];
            for t in c * per..((c + 1) * per).min(tiles) {
                let rows = t * QT..((t + 1) * QT).min(l);
                // SAFETY: item (h, c) writes dq only in the rows of its own query tiles
                // of heads h·G..(h+1)·G, and its own dk, dv.
                unsafe { src.tile_grads(h, rows, &grads, &dq_ptr, &mut dk, &mut dv) };
            }
            (dk, dv)
        })
        .collect();
    let mut dk = vec![0f32; hkv * s * d];
    let mut dv = vec![0f32; hkv * s * d];
    for (item, (pk, pv)) in parts.iter().enumerate() {
        let h = item / BACKWARD_CHUNKS;
        let (ok, ov) = (&mut dk[h * s * d..][..s * d], &mut dv[h * s * d..][..s * d]);
        ok.iter_mut().zip(pk).for_each(|(a, b)| *a += b);
        ov.iter_mut().zip(pv).for_each(|(a, b)| *a += b);
    }
    (dq, dk, dv)
}

/// What the backward's work items read besides [`Source`].
struct Grads<'a> {
    /// dO (Hq, L, D).
    go: &'a [f32],
    /// (Hq, L), from the forward.
    lse: &'a [f32],
    /// rowsum(dO ∘ O), (Hq, L).
    delta: &'a [f32],
    /// Per key head: (values in key panels, keys in dim panels).
    swapped: &'a [(Vec<Line>, Vec<Line>)],
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

    /// The backward of query rows `rows` of the G heads sharing key head `h`: their dq,
    /// and their share of dk and dv (S, D) for head h.
    ///
    /// Per visible key tile j, with the G heads' rows stacked (G·n of them):
    /// P = exp(q·kⱼᵀ + mask - lse), dP = dO·vⱼᵀ, dS = P ∘ (dP - δ);
    /// dq += dS·kⱼ, dkⱼ += dSᵀ·q, dvⱼ += Pᵀ·dO.
    ///
    /// # Safety
    /// `dq` points at (Hq, L, D) floats of which no other thread writes these rows.
    unsafe fn tile_grads(
        &self,
        h: usize,
        rows: std::ops::Range<usize>,
        gr: &Grads,
        dq: &Shared,
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let (d, l, n, g) = (self.d, self.l, rows.len(), self.g);
        let gn = g * n;
        let d_panels = d.div_ceil(NR);
        let (kp, _) = &self.packs[h];
        let (vkp, kdp) = &gr.swapped[h];
        // q and dO rows of the G heads stacked, in dim panels (line r = row r's dims):
        // the right factors of dk and dv, read by every key tile.
        let stack = |x: &[f32]| {
            let mut out = vec![Line([0.0; NR]); d_panels * gn];
            for gi in 0..g {
                let base = ((h * g + gi) * l + rows.start) * d;
                for r in 0..n {
                    let row = &x[base + r * d..][..d];
                    for (p, part) in row.chunks(NR).enumerate() {
                        out[p * gn + gi * n + r].0[..part.len()].copy_from_slice(part);
                    }
                }
            }
            out
        };
        let (q_dims, go_dims) = (stack(self.q), stack(gr.go));
        let mut p = vec![0f32; gn * KT];
        let mut ds = vec![0f32; gn * KT];
        for j0 in (0..self.s).step_by(KT) {
            let kt = KT.min(self.s - j0);
            if !self.tile_visible(&rows, j0, j0 + kt) {
                continue;
            }
            for gi in 0..g {
                let head = h * g + gi;
                let q0 = (head * l + rows.start) * d;
                let (pr, dsr) = (
                    p.as_mut_ptr().add(gi * n * KT),
                    ds.as_mut_ptr().add(gi * n * KT),
                );
                for pn in 0..kt.div_ceil(NR) {
                    let keys = &kp[(j0 / NR + pn) * d..][..d];
                    let values = &vkp[(j0 / NR + pn) * d..][..d];
                    for r0 in (0..n).step_by(6) {
                        let (r, at) = (6.min(n - r0), r0 * KT + pn * NR);
                        tile(
                            r,
                            &self.q[q0 + r0 * d..],
                            d,
                            keys,
                            d,
                            pr.add(at),
                            KT,
                            NR,
                            false,
                        );
                        tile(
                            r,
                            &gr.go[q0 + r0 * d..],
                            d,
                            values,
                            d,
                            dsr.add(at),
                            KT,
                            NR,
                            false,
                        );
                    }
                }
                for r in 0..n {
                    let prow = &mut p[(gi * n + r) * KT..][..KT];
                    self.mask_scores(prow, rows.start + r, j0, kt);
                    let (m, dl) = (
                        gr.lse[head * l + rows.start + r],
                        gr.delta[head * l + rows.start + r],
                    );
                    let dsrow = &mut ds[(gi * n + r) * KT..][..KT];
                    probabilities_and_ds(prow, dsrow, m, dl);
                }
                // dq rows += dS (n, kt) · kⱼ (kt, D).
                for pn in 0..d_panels {
                    let keys = &kdp[pn * self.s + j0..][..kt];
                    for r0 in (0..n).step_by(6) {
                        tile(
                            6.min(n - r0),
                            &ds[(gi * n + r0) * KT..],
                            KT,
                            keys,
                            kt,
                            dq.0.add(q0 + r0 * d + pn * NR),
                            d,
                            NR.min(d - pn * NR),
                            true,
                        );
                    }
                }
            }
            // dkⱼ (kt, D) += dSᵀ · q and dvⱼ += Pᵀ · dO, over the G·n stacked rows.
            for pn in 0..d_panels {
                let width = NR.min(d - pn * NR);
                for i0 in (0..kt).step_by(6) {
                    let r = 6.min(kt - i0);
                    let at = (j0 + i0) * d + pn * NR;
                    let (qd, gd) = (&q_dims[pn * gn..][..gn], &go_dims[pn * gn..][..gn]);
                    tile_t(
                        r,
                        &ds[i0..],
                        KT,
                        qd,
                        gn,
                        dk.as_mut_ptr().add(at),
                        d,
                        width,
                        true,
                    );
                    tile_t(
                        r,
                        &p[i0..],
                        KT,
                        gd,
                        gn,
                        dv.as_mut_ptr().add(at),
                        d,
                        width,
                        true,
                    );
                }
            }
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

/// A row of one key tile in the backward: scores → P = exp(score - lse) in place, and
/// dP → dS = P ∘ (dP - δ) in place (KT lanes, a multiple of 8).
///
/// # Safety
/// AVX2 and FMA are present (the backward runs only where [`applies`] found them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn probabilities_and_ds(p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32) {
    use std::arch::x86_64::*;
    assert!(p.len() == KT && ds.len() == KT);
    let (lv, dv) = (_mm256_set1_ps(lse), _mm256_set1_ps(delta));
    for i in (0..KT).step_by(8) {
        let x = _mm256_loadu_ps(p.as_ptr().add(i));
        let e = super::softmax::exp256(_mm256_sub_ps(x, lv));
        _mm256_storeu_ps(p.as_mut_ptr().add(i), e);
        let d = _mm256_sub_ps(_mm256_loadu_ps(ds.as_ptr().add(i)), dv);
        _mm256_storeu_ps(ds.as_mut_ptr().add(i), _mm256_mul_ps(e, d));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn probabilities_and_ds(_p: &mut [f32], _ds: &mut [f32], _lse: f32, _delta: f32) {
    unreachable!("attend_trainable returns None without AVX2")
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
        let mut mask = sentence_mask_with_holes(l, 9, 7);
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

    /// Segments of `seg` rows whose last `seg - kept_from` rows are kept as gists: a query
    /// sees the kept rows of earlier segments and its own segment causally (the training
    /// plan's mask, with holes).
    fn sentence_mask_with_holes(l: usize, seg: usize, kept_from: usize) -> Vec<f32> {
        let mut mask = vec![f32::NEG_INFINITY; l * l];
        for i in 0..l {
            for j in 0..l {
                let kept = j % seg >= kept_from;
                if (j / seg < i / seg && kept) || (j / seg == i / seg && j <= i) {
                    mask[i * l + j] = 0.0;
                }
            }
        }
        mask
    }

    /// The trainable node's gradients against the composed attention's, keys a strided
    /// view (as the plans pass them), every gradient finite.
    fn assert_gradients_match(
        (hq, hkv, l, s, d): (usize, usize, usize, usize, usize),
        mask: Option<&Tensor>,
    ) {
        let dev = Device::Cpu;
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
        let kv = k.narrow(1, 3, s).unwrap();
        let w = Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap();
        let grads = |y: Tensor| {
            let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            [q.as_tensor(), k.as_tensor(), v.as_tensor()]
                .map(|t| g.get(t).expect("a gradient").clone())
        };
        let ours = grads(attend_trainable(&q, &kv, &v, mask).unwrap().unwrap());
        let theirs = grads(reference(&q, &kv, &v, mask));
        for (name, (a, b)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&theirs)) {
            let diff = super::super::simd::max_abs_diff(a, b);
            assert!(diff < 1e-4, "d{name} hq={hq} l={l} s={s}: {diff}");
            let values = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|x| x.is_finite()), "d{name} is finite");
        }
    }

    #[test]
    fn the_trainable_node_has_the_composed_gradients() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        // Several query tiles per backward chunk and key tiles past KT, GQA 1-3, head
        // dims not a multiple of the panel.
        for (hq, hkv, l, s, d, m) in [
            (4, 2, 40, 100, 32, 40),
            (9, 3, 70, 70, 64, 70),
            (2, 2, 5, 9, 8, 0),
            (4, 2, 300, 330, 24, 300),
            (3, 1, 140, 140, 40, 0),
        ] {
            let mask = (m > 0).then(|| causal(l).narrow(1, l - m, m).unwrap());
            assert_gradients_match((hq, hkv, l, s, d), mask.as_ref());
        }
    }

    /// A sentence mask with holes and one row that sees nothing at all (no prefix).
    #[test]
    fn the_trainable_node_has_the_composed_gradients_under_a_sentence_mask() {
        if !super::super::simd::avx2_fma() {
            return;
        }
        let l = 170;
        let mut mask = sentence_mask_with_holes(l, 13, 10);
        mask[77 * l..78 * l].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(mask, (l, l), &Device::Cpu).unwrap();
        assert_gradients_match((4, 2, l, l, 32), Some(&mask));
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
