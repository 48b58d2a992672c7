//! All of a forward's attention groups as one node: the parallel sentence path's blocks
//! ([`crate::model::attention::SentencePlan`]) in a single call of the tiled kernel per
//! group, the output written straight in the (N, Hq·D) rows the output projection reads.
//!
//! Why one node: per group, the composed path took a `narrow` of the queries and two
//! `index_select`s of the keys and values, then a `cat` of the outputs and a transpose
//! into rows. In training each of those is a node of candle's graph, whose backward builds
//! a zero-padded (Hq, N, D) copy (narrow), scatters into a zeroed buffer (index_select) or
//! cuts the gradient up again (cat), and every edge sums into yet another zeroed buffer.
//! Here the gathers are plain copies inside the node, and its backward scatters each
//! group's key and value gradients into one buffer, group after group (a fixed order, so
//! the same bits on any machine).

use super::backward::backward;
use super::compute;
use candle_core::{Result, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// One group: L query rows, the S key and value rows they read, and the mask over the
/// last M of those keys (the first S - M all visible).
pub struct Group {
    /// Query rows (and output rows) of the forward's N.
    pub rows: Range<usize>,
    /// Rows of k the group reads, in order (S).
    pub keys: Vec<u32>,
    /// Rows of v, in the same order (S).
    pub values: Vec<u32>,
    /// (L, M) additive.
    pub mask: Vec<f32>,
    /// M.
    pub masked: usize,
}

/// Softmax(q·kᵀ + mask)·v for every group: q (Hq, N, D) scaled, k (Hkv, Nk, D), v (Hkv,
/// Nv, D), all contiguous f32. Returns (N, Hq·D), trainable (gradients to q, k and v);
/// rows outside every group are zero. None where the tiled kernel does not apply.
pub fn attend_groups(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &Arc<[Group]>,
) -> Result<Option<Tensor>> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !super::super::simd::avx2_fma() || ![q, k, v].into_iter().all(f32_cpu) {
        return Ok(None);
    }
    let ((hq, n, d), (hkv, nk, dk), (hv, nv, dv)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    if dk != d || dv != d || hv != hkv || hkv == 0 || hq % hkv != 0 || d == 0 {
        return Ok(None);
    }
    for g in groups.iter() {
        let (l, s) = (g.rows.len(), g.keys.len());
        let bad_rows = g.rows.end > n;
        let bad_keys = g.values.len() != s || g.masked > s || g.mask.len() != l * g.masked;
        let outside =
            g.keys.iter().any(|&r| r as usize >= nk) || g.values.iter().any(|&r| r as usize >= nv);
        if bad_rows || bad_keys || outside {
            candle_core::bail!(
                "grouped attention: a group of rows {:?} with {s} keys does not fit q ({hq}, \
                 {n}, {d}), k ({hkv}, {nk}, {d}), v ({hv}, {nv}, {d})",
                g.rows
            );
        }
    }
    let op = Grouped {
        groups: groups.clone(),
        lse: std::sync::OnceLock::new(),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

struct Grouped {
    groups: Arc<[Group]>,
    /// Each group's log-sum-exp (Hq, L), from the forward.
    lse: std::sync::OnceLock<Vec<Vec<f32>>>,
}

/// Rows `rows` of every head of x (H, N, D), as (H, L, D).
fn head_rows(x: &[f32], (h, n, d): (usize, usize, usize), rows: &Range<usize>) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * rows.len() * d);
    for head in 0..h {
        out.extend_from_slice(&x[(head * n + rows.start) * d..(head * n + rows.end) * d]);
    }
    out
}

/// The listed rows of every head of x (H, N, D), as (H, S, D).
fn gather(x: &[f32], (h, n, d): (usize, usize, usize), idx: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(h * idx.len() * d);
    for head in 0..h {
        for &r in idx {
            out.extend_from_slice(&x[(head * n + r as usize) * d..][..d]);
        }
    }
    out
}

/// Adds y (H, S, D) into the listed rows of x (H, N, D), in order.
fn scatter_add(x: &mut [f32], (h, n, d): (usize, usize, usize), idx: &[u32], y: &[f32]) {
    let s = idx.len();
    for head in 0..h {
        for (j, &r) in idx.iter().enumerate() {
            let dst = &mut x[(head * n + r as usize) * d..][..d];
            let src = &y[(head * s + j) * d..][..d];
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
    }
}

/// Rows `rows` of x (N, H·D) as (H, L, D).
fn from_rows(x: &[f32], (h, d): (usize, usize), rows: &Range<usize>) -> Vec<f32> {
    let l = rows.len();
    let mut out = vec![0f32; h * l * d];
    for (r, row) in rows.clone().enumerate() {
        for head in 0..h {
            out[(head * l + r) * d..][..d].copy_from_slice(&x[row * h * d + head * d..][..d]);
        }
    }
    out
}

/// y (H, L, D) into rows `rows` of out (N, H·D).
fn to_rows(y: &[f32], (h, d): (usize, usize), rows: &Range<usize>, out: &mut [f32]) {
    let l = rows.len();
    for (r, row) in rows.clone().enumerate() {
        for head in 0..h {
            out[row * h * d + head * d..][..d].copy_from_slice(&y[(head * l + r) * d..][..d]);
        }
    }
}

impl candle_core::CustomOp3 for Grouped {
    fn name(&self) -> &'static str {
        "grouped-attention"
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
        use super::super::simd::f32s;
        let (q, k, v) = (
            f32s(qs, ql, self.name())?,
            f32s(ks, kl, self.name())?,
            f32s(vs, vl, self.name())?,
        );
        let (hq, n, d) = ql.shape().dims3()?;
        let (hkv, nk, _) = kl.shape().dims3()?;
        let nv = vl.shape().dims3()?.1;
        let mut out = vec![0f32; n * hq * d];
        let mut lses = Vec::with_capacity(self.groups.len());
        for g in self.groups.iter() {
            let (l, s) = (g.rows.len(), g.keys.len());
            let qg = head_rows(q, (hq, n, d), &g.rows);
            let kg = gather(k, (hkv, nk, d), &g.keys);
            let vg = gather(v, (hkv, nv, d), &g.values);
            let at = (0, s * d, d);
            let mask = (g.masked > 0).then_some((g.mask.as_slice(), g.masked));
            let (og, lse) = compute(&qg, (hq, l, d), (&kg, at), (&vg, at), (hkv, s), mask);
            to_rows(&og, (hq, d), &g.rows, &mut out);
            lses.push(lse);
        }
        // A node's forward runs once; a second run would compute the same values.
        let _ = self.lse.set(lses);
        Ok((candle_core::CpuStorage::F32(out), (n, hq * d).into()))
    }

    /// Group by group: [`backward`] on the gathered rows, dq written to the group's rows,
    /// dk and dv added into the rows the group read.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lses) = self.lse.get() else {
            candle_core::bail!("grouped attention: the backward ran before the forward");
        };
        let (hq, n, d) = q.dims3()?;
        let (hkv, nk, _) = k.dims3()?;
        let nv = v.dims3()?.1;
        let (dq, dk, dv) = super::super::simd::with_f32s([q, k, v, o, grad], self.name(), |x| {
            let [q, k, v, o, go] = x;
            let mut dq = vec![0f32; hq * n * d];
            let mut dk = vec![0f32; hkv * nk * d];
            let mut dv = vec![0f32; hkv * nv * d];
            for (g, lse) in self.groups.iter().zip(lses) {
                let (l, s) = (g.rows.len(), g.keys.len());
                let qg = head_rows(q, (hq, n, d), &g.rows);
                let kg = gather(k, (hkv, nk, d), &g.keys);
                let vg = gather(v, (hkv, nv, d), &g.values);
                let og = from_rows(o, (hq, d), &g.rows);
                let gog = from_rows(go, (hq, d), &g.rows);
                let mask = (g.masked > 0).then_some((g.mask.as_slice(), g.masked));
                let (dqg, dkg, dvg) =
                    backward(&qg, (hq, l, d), &kg, &vg, (hkv, s), mask, &og, &gog, lse);
                for head in 0..hq {
                    dq[(head * n + g.rows.start) * d..(head * n + g.rows.end) * d]
                        .copy_from_slice(&dqg[head * l * d..(head + 1) * l * d]);
                }
                scatter_add(&mut dk, (hkv, nk, d), &g.keys, &dkg);
                scatter_add(&mut dv, (hkv, nv, d), &g.values, &dvg);
            }
            Ok((dq, dk, dv))
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (hq, n, d), dev)?),
            Some(Tensor::from_vec(dk, (hkv, nk, d), dev)?),
            Some(Tensor::from_vec(dv, (hkv, nv, d), dev)?),
        ))
    }
}
