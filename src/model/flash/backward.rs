//! The tiled attention's backward (FlashAttention-2's, on the CPU): the gradients of
//! [`super::compute`] from the forward's log-sum-exp, tile by tile, skipping the tiles the
//! mask hides, as the forward does. Nothing of size L × S is built.

use super::{dim_panels, key_panels, Line, Shared, Source, KT, NR, QT};
use crate::model::packed::{tile, tile_t};

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
pub(super) fn backward(
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
        .map(|h| (key_panels((k, head_at), h, s, d), Vec::new())) // values: below
        .collect();
    let swapped: Vec<(Vec<Line>, Vec<Line>)> = (0..hkv)
        .map(|h| {
            let values = key_panels((v, head_at), h, s, d);
            (values, dim_panels((k, head_at), h, s, d))
        })
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

impl Source<'_> {
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
        let e = crate::model::softmax::exp256(_mm256_sub_ps(x, lv));
        _mm256_storeu_ps(p.as_mut_ptr().add(i), e);
        let d = _mm256_sub_ps(_mm256_loadu_ps(ds.as_ptr().add(i)), dv);
        _mm256_storeu_ps(ds.as_mut_ptr().add(i), _mm256_mul_ps(e, d));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn probabilities_and_ds(_p: &mut [f32], _ds: &mut [f32], _lse: f32, _delta: f32) {
    unreachable!("attend_trainable returns None without AVX2")
}
