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
    match ops {
        Ops::Fused => {
            let x = x.unsqueeze(0)?.contiguous()?; // (1, heads, N, D)
            candle_nn::rotary_emb::rope(&x, cos, sin)?.squeeze(0)
        }
        Ops::Differentiable => {
            let (h, n, d) = x.dims3()?;
            let flat = x.transpose(0, 1)?.reshape((n, h * d))?;
            rope_heads(&flat, h, cos, sin, 1.0, ops)
        }
    }
}

/// A projection's output x (N, heads·D) split into heads, rotated and scaled: (heads, N,
/// D) = scale · rope(x as (heads, N, D)). What the attention reads as queries (scale
/// 1/√D) and keys (scale 1).
///
/// Training takes it as one node straight from the projection: the split into heads (a
/// reshape, a transpose and a copy), the rotation and the scaling were five nodes of
/// candle's graph, each a buffer, a zeroed gradient buffer and a serial pass, one of them
/// a strided add.
pub fn rope_heads(
    x: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
    scale: f64,
    ops: Ops,
) -> Result<Tensor> {
    let (n, hd) = x.dims2()?;
    let d = hd / heads.max(1);
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let split = |x: &Tensor| x.reshape((n, heads, d))?.transpose(0, 1);
    match ops {
        Ops::Differentiable if cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin) => {
            x.contiguous()?.apply_op1(RopeNode {
                heads,
                scale: scale as f32,
                cos: cos.detach().contiguous()?,
                sin: sin.detach().contiguous()?,
            })
        }
        Ops::Differentiable => {
            let y = candle_nn::rotary_emb::rope_slow(&split(x)?.unsqueeze(0)?, cos, sin)?;
            y.squeeze(0)? * scale
        }
        Ops::Fused => {
            let y = rope(&split(x)?, cos, sin, ops)?;
            if scale == 1.0 {
                Ok(y)
            } else {
                y * scale
            }
        }
    }
}

/// [`rope_heads`]' node: candle's fused rope has no backward, and its composed one
/// (`rope_slow`) is eight nodes. The backward is the inverse rotation, scaled, written
/// back in the projection's (N, heads·D) layout.
struct RopeNode {
    heads: usize,
    scale: f32,
    cos: Tensor,
    sin: Tensor,
}

impl RopeNode {
    /// The angles as slices, checked against N rows of D/2 pairs.
    fn angles<R>(
        &self,
        n: usize,
        d: usize,
        f: impl FnOnce(&[f32], &[f32]) -> Result<R>,
    ) -> Result<R> {
        super::simd::with_f32s([&self.cos, &self.sin], "rope", |[cos, sin]| {
            if !d.is_multiple_of(2) || cos.len() != n * (d / 2) || sin.len() != n * (d / 2) {
                candle_core::bail!("rope: angles for {n} rows of {} pairs are needed", d / 2);
            }
            f(cos, sin)
        })
    }
}

impl candle_core::CustomOp1 for RopeNode {
    fn name(&self) -> &'static str {
        "rope-heads-trainable"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = super::simd::f32s(s, l, self.name())?;
        let (n, hd) = l.shape().dims2()?;
        let (h, k) = (self.heads, self.scale);
        let d = hd / h;
        let mut out = vec![0f32; x.len()];
        self.angles(n, d, |cos, sin| {
            let half = d / 2;
            // One head per work item: its (N, D) block of the output is contiguous.
            out.par_chunks_mut(n * d)
                .enumerate()
                .for_each(|(head, dst)| {
                    for (t, y) in dst.chunks_exact_mut(d).enumerate() {
                        let src = &x[t * hd + head * d..][..d];
                        let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                        let (x1, x2) = src.split_at(half);
                        let (y1, y2) = y.split_at_mut(half);
                        for i in 0..half {
                            y1[i] = (x1[i] * c[i] - x2[i] * s[i]) * k;
                            y2[i] = (x2[i] * c[i] + x1[i] * s[i]) * k;
                        }
                    }
                });
            Ok(())
        })?;
        Ok((candle_core::CpuStorage::F32(out), (h, n, d).into()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use rayon::prelude::*;
        let (n, hd) = x.dims2()?;
        let (h, k) = (self.heads, self.scale);
        let d = hd / h;
        let half = d / 2;
        let mut dx = vec![0f32; n * hd];
        super::simd::with_f32s([grad], self.name(), |[g]| {
            self.angles(n, d, |cos, sin| {
                // Rows of x per work item: each writes its own rows, all heads.
                const ROWS: usize = 64;
                dx.par_chunks_mut(ROWS * hd)
                    .enumerate()
                    .for_each(|(b, rows)| {
                        for (i, row) in rows.chunks_exact_mut(hd).enumerate() {
                            let t = b * ROWS + i;
                            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                            for (head, dxh) in row.chunks_exact_mut(d).enumerate() {
                                let gh = &g[(head * n + t) * d..][..d];
                                let (g1, g2) = gh.split_at(half);
                                let (d1, d2) = dxh.split_at_mut(half);
                                for i in 0..half {
                                    d1[i] = (g1[i] * c[i] + g2[i] * s[i]) * k;
                                    d2[i] = (g2[i] * c[i] - g1[i] * s[i]) * k;
                                }
                            }
                        }
                    });
                Ok(())
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, hd), x.device())?))
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
    fn heads_split_rotated_and_scaled_in_one_node_match_the_composed_ops() {
        let dev = Device::Cpu;
        let inv: Vec<f32> = (0..6)
            .map(|i| 1.0 / 10_000f32.powf(i as f32 / 6.0))
            .collect();
        let inv = Tensor::new(inv.as_slice(), &dev).unwrap();
        let (n, h, d) = (150, 3, 12); // more rows than one backward work item
        let positions: Vec<u32> = (0..n as u32).map(|i| i * 7 % 101).collect();
        let (c, s) = rope_angles(&positions, &inv, DType::F32).unwrap();
        let x = candle_core::Var::randn(0f32, 1.0, (n, h * d), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (h, n, d), &dev).unwrap();
        let run = |y: Tensor| {
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(x.as_tensor()).unwrap().clone())
        };
        let split = x.reshape((n, h, d)).unwrap().transpose(0, 1).unwrap();
        let slow = candle_nn::rotary_emb::rope_slow(&split.unsqueeze(0).unwrap(), &c, &s).unwrap();
        let (theirs, d_theirs) = run((slow.squeeze(0).unwrap() * 0.25).unwrap());
        let (ours, d_ours) = run(rope_heads(&x, h, &c, &s, 0.25, Ops::Differentiable).unwrap());
        let fused = rope_heads(&x, h, &c, &s, 0.25, Ops::Fused).unwrap();
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
