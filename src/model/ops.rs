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
