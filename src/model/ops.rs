//! The two kinds of ops the forward is made of: candle's fused kernels (fast, no backward
//! pass) for inference, and composed ops that autograd can follow for training; and RoPE.

use candle_core::{DType, Result, Tensor};

/// Fused kernels (inference) or composed, differentiable ops (training).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ops {
    Fused,
    Differentiable,
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fused => candle_nn::ops::rms_norm(x, w, eps as f32),
        Ops::Differentiable => super::rms_norm::rms_norm_trainable(x, w, eps as f32),
    }
}

pub fn softmax(x: &Tensor, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fused => candle_nn::ops::softmax_last_dim(x),
        Ops::Differentiable => super::softmax::softmax_last_dim_trainable(x),
    }
}

/// Rotates (heads, N, D) by per-token angles: cos/sin are (N, D/2). Non-interleaved halves,
/// as in transformers' `rotate_half`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, ops: Ops) -> Result<Tensor> {
    let x = x.unsqueeze(0)?; // (1, heads, N, D)
    let y = match ops {
        Ops::Fused => candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?,
        Ops::Differentiable => return rope_trainable(&x.squeeze(0)?, cos, sin),
    };
    y.squeeze(0)
}

/// [`rope`] as one trainable node: candle's fused rope has no backward, and its composed
/// one (`rope_slow`) is eight nodes, each a buffer and a gradient buffer per layer. The
/// backward is the inverse rotation (sin negated). Contiguous f32 CPU tensors; anything
/// else goes through the composed op.
fn rope_trainable(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin)) {
        let y = candle_nn::rotary_emb::rope_slow(&x.unsqueeze(0)?, cos, sin)?;
        return y.squeeze(0);
    }
    x.contiguous()?.apply_op1(RopeNode {
        cos: cos.detach().contiguous()?,
        sin: sin.detach().contiguous()?,
    })
}

struct RopeNode {
    cos: Tensor,
    sin: Tensor,
}

impl candle_core::CustomOp1 for RopeNode {
    fn name(&self) -> &'static str {
        "rope-trainable"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::simd::f32s(s, l, self.name())?;
        let (_, n, d) = l.shape().dims3()?;
        let half = d / 2;
        let (cos, sin) = (
            self.cos.flatten_all()?.to_vec1::<f32>()?,
            self.sin.flatten_all()?.to_vec1::<f32>()?,
        );
        if d % 2 != 0 || cos.len() != n * half || sin.len() != n * half {
            candle_core::bail!("rope: angles for {n} rows of {half} pairs are needed");
        }
        let mut out = vec![0f32; x.len()];
        use rayon::prelude::*;
        // Blocks of rows on both cores (element-wise: the split changes no bit).
        const ROWS: usize = 256;
        out.par_chunks_mut(ROWS * d)
            .zip(x.par_chunks(ROWS * d))
            .enumerate()
            .for_each(|(b, (dst, src))| {
                let rows = src.chunks_exact(d).zip(dst.chunks_exact_mut(d));
                for (i, (src, dst)) in rows.enumerate() {
                    let t = (b * ROWS + i) % n;
                    let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                    let (x1, x2) = src.split_at(half);
                    let (y1, y2) = dst.split_at_mut(half);
                    for i in 0..half {
                        y1[i] = x1[i] * c[i] - x2[i] * s[i];
                        y2[i] = x2[i] * c[i] + x1[i] * s[i];
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?.unsqueeze(0)?;
        let back = candle_nn::rotary_emb::rope(&g, &self.cos, &self.sin.neg()?)?;
        Ok(Some(back.squeeze(0)?))
    }
}

/// cos and sin of position × inverse frequency, each (N, D/2), in `dtype`. Computed in f32
/// like transformers, straight from the positions: no table, so no length limit.
pub fn rope_angles(positions: &[u32], inv_freq: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let n = positions.len();
    let pos: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let pos = Tensor::from_vec(pos, (n, 1), inv_freq.device())?; // (N, 1)
    let angles = pos.broadcast_mul(&inv_freq.unsqueeze(0)?)?; // (N, D/2)
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

/// cos and sin of signed position shifts, each (M, D/2): the rotation that moves a key
/// written at position p to p + delta (RoPE composes: rotating by p and then by delta is
/// rotating by p + delta). How the compressed position scheme re-numbers a closed
/// sentence's gists.
pub fn rope_shift_angles(
    deltas: &[i64],
    inv_freq: &Tensor,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let m = deltas.len();
    let d: Vec<f32> = deltas.iter().map(|&x| x as f32).collect();
    let d = Tensor::from_vec(d, (m, 1), inv_freq.device())?; // (M, 1)
    let angles = d.broadcast_mul(&inv_freq.unsqueeze(0)?)?; // (M, D/2)
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_trainable_rope_has_the_composed_values_and_gradients() {
        let dev = Device::Cpu;
        let inv: Vec<f32> = (0..8)
            .map(|i| 1.0 / 10_000f32.powf(i as f32 / 8.0))
            .collect();
        let inv = Tensor::new(inv.as_slice(), &dev).unwrap();
        let (c, s) = rope_angles(&[5, 0, 77, 3, 1000], &inv, DType::F32).unwrap();
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f32, 1.0, (5, 3, 16), &dev).unwrap(), // (N, heads, D)
        )
        .unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        // Heads as a strided view, as the forward passes them.
        let xt = x.transpose(0, 1).unwrap();
        let (ours, d_ours) = run(rope(&xt, &c, &s, Ops::Differentiable).unwrap());
        let slow = candle_nn::rotary_emb::rope_slow(&xt.unsqueeze(0).unwrap(), &c, &s).unwrap();
        let (theirs, d_theirs) = run(slow.squeeze(0).unwrap());
        let fused = rope(&xt, &c, &s, Ops::Fused).unwrap();
        for (a, b) in [(&ours, &theirs), (&ours, &fused), (&d_ours, &d_theirs)] {
            let diff = super::super::simd::max_abs_diff(a, b);
            assert!(diff < 1e-5, "{diff}");
        }
    }

    #[test]
    fn a_shift_moves_a_rotated_key_to_its_new_position() {
        let dev = Device::Cpu;
        let inv: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10_000f32.powf(i as f32 / 4.0))
            .collect();
        let inv = Tensor::new(inv.as_slice(), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev).unwrap(); // (heads, M, D)
        let (written, stored) = ([40u32, 17, 9], [3u32, 17, 0]);
        let (c, s) = rope_angles(&written, &inv, DType::F32).unwrap();
        let at_written = rope(&x, &c, &s, Ops::Fused).unwrap();
        let deltas: Vec<i64> = stored
            .iter()
            .zip(&written)
            .map(|(&a, &b)| a as i64 - b as i64)
            .collect();
        let (c, s) = rope_shift_angles(&deltas, &inv, DType::F32).unwrap();
        let moved = rope(&at_written, &c, &s, Ops::Fused).unwrap();
        let (c, s) = rope_angles(&stored, &inv, DType::F32).unwrap();
        let direct = rope(&x, &c, &s, Ops::Fused).unwrap();
        let diff = super::super::simd::max_abs_diff(&moved, &direct);
        assert!(diff < 1e-5, "{diff}");
    }
}
