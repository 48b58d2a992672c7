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
        Ops::Differentiable => candle_nn::rotary_emb::rope_slow(&x, cos, sin)?,
    };
    y.squeeze(0)
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
