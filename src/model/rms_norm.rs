//! RMSNorm that autograd can follow in one node, for training: y = x · r · w with
//! r = (mean(x²) + ε)^(-1/2) per row. candle's composed form is six nodes (square, mean,
//! add, sqrt, divide, multiply), and every node's gradient costs two fresh buffers in
//! candle's backward; this one's backward is one pass per row:
//! dx = r·(g⊙w) − x·r³·Σ(g⊙w⊙x)/n, and dw = Σ over rows of g⊙x·r.

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

/// RMSNorm over the last dimension of x (…, n) with weight w (n,). Contiguous f32 CPU
/// tensors use the single node; anything else candle's composed ops.
pub fn rms_norm_trainable(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm(eps))
    } else {
        candle_nn::ops::rms_norm_slow(x, w, eps)
    }
}

struct RmsNorm(f32);

/// The rows of x and the weight, checked.
fn operands<'a>(
    x: &'a CpuStorage,
    xl: &Layout,
    w: &'a CpuStorage,
    wl: &Layout,
) -> Result<(&'a [f32], &'a [f32])> {
    let x = super::simd::f32s(x, xl, "rms-norm")?;
    let w = super::simd::f32s(w, wl, "rms-norm")?;
    if w.is_empty() || x.len() % w.len() != 0 {
        candle_core::bail!(
            "rms-norm: rows of {} against a weight of {}",
            x.len(),
            w.len()
        );
    }
    Ok((x, w))
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-trainable"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (x, w) = operands(x, xl, w, wl)?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(o, row)| {
                let r = inv_rms(row, self.0);
                for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                    *o = v * r * w;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n;
        // One output: the rows of dx, then dw as one more row.
        let both = x.apply_op3_no_bwd(w, &grad_res.contiguous()?, &RmsNormGrad(self.0))?;
        let dx = both.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = both.narrow(0, rows, 1)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw)))
    }
}

/// (x, w, g) → (rows + 1, n): dx's rows, then dw.
struct RmsNormGrad(f32);

impl candle_core::CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-trainable-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = operands(x, xl, w, wl)?;
        let g = super::simd::f32s(g, gl, self.name())?;
        if g.len() != x.len() {
            candle_core::bail!(
                "rms-norm grad: {} gradients for {} values",
                g.len(),
                x.len()
            );
        }
        use rayon::prelude::*;
        let n = w.len();
        let rows = x.len() / n;
        let mut out = vec![0f32; (rows + 1) * n];
        let (dx, dw) = out.split_at_mut(rows * n);
        // Blocks of rows on both cores, each with its own share of dw, summed in block
        // order: the same bits whatever the thread count.
        const ROWS: usize = 64;
        let shares: Vec<Vec<f32>> = dx
            .par_chunks_mut(ROWS * n)
            .zip(x.par_chunks(ROWS * n).zip(g.par_chunks(ROWS * n)))
            .map(|(dx, (x, g))| {
                let mut dw = vec![0f32; n];
                for ((d, row), g) in dx
                    .chunks_exact_mut(n)
                    .zip(x.chunks_exact(n))
                    .zip(g.chunks_exact(n))
                {
                    let r = inv_rms(row, self.0);
                    let dot: f32 = row.iter().zip(g).zip(w).map(|((x, g), w)| g * w * x).sum();
                    let k = r * r * r * dot / n as f32;
                    for (((d, &x), &g), (&w, dw)) in d
                        .iter_mut()
                        .zip(row)
                        .zip(g)
                        .zip(w.iter().zip(dw.iter_mut()))
                    {
                        *d = r * g * w - x * k;
                        *dw += g * x * r;
                    }
                }
                dw
            })
            .collect();
        for share in shares {
            dw.iter_mut().zip(share).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_single_node_rms_norm_and_its_gradients_match_candles_composed_one() {
        let dev = Device::Cpu;
        let (r, n) = (5, 24);
        let x = Var::from_tensor(
            &Tensor::from_vec(
                (0..r * n)
                    .map(|i| ((i * 7919) % 89) as f32 / 20.0 - 2.0)
                    .collect::<Vec<f32>>(),
                (1, r, n),
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let w = Var::from_tensor(
            &Tensor::from_vec(
                (0..n)
                    .map(|i| 1.0 + (i % 5) as f32 / 10.0)
                    .collect::<Vec<f32>>(),
                n,
                &dev,
            )
            .unwrap(),
        )
        .unwrap();
        let probe = Tensor::from_vec(
            (0..r * n)
                .map(|i| ((i * 31) % 11) as f32 - 5.0)
                .collect::<Vec<f32>>(),
            (1, r, n),
            &dev,
        )
        .unwrap();
        let ours = rms_norm_trainable(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let theirs = candle_nn::ops::rms_norm_slow(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert!(crate::model::simd::max_abs_diff(&ours, &theirs) < 1e-5);
        let go = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gt = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let d = crate::model::simd::max_abs_diff(
                go.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradients differ by {d}");
        }
    }
}
