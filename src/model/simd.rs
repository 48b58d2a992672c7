//! Which vector instructions this CPU has, asked once per kernel call (std caches the
//! answer): our AVX2 kernels (`packed`, `softmax`, `swiglu`, `q4_1`) run where they are
//! present, and scalar or candle code elsewhere, so one binary stays portable.

/// AVX2 with FMA (every x86-64 CPU since about 2013-2015).
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`avx2_fma`] plus F16C (f16 scales converted in the quantized kernel).
pub fn avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_fma() && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The largest absolute difference of two tensors (the kernels' tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// The largest absolute value of a tensor (the tests' scale for a tolerance).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A trainable CPU tensor of standard-normal values times `scale` (the attention kernels'
/// gradient tests).
#[cfg(test)]
pub(crate) fn random_var(shape: (usize, usize, usize), scale: f64) -> candle_core::Var {
    let dev = candle_core::Device::Cpu;
    candle_core::Var::from_tensor(
        &(candle_core::Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap(),
    )
    .unwrap()
}

/// The values a CPU custom op reads: contiguous f32 storage, or an error naming the op.
/// (Every kernel of ours takes contiguous f32 and falls back to candle otherwise.)
pub fn f32s<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: contiguous f32 tensors only"),
    }
}

/// [`f32s`] for the tensor an in-place op writes.
pub fn f32s_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: contiguous f32 tensors only"),
    }
}

/// Runs `f` on the values of CPU f32 tensors, made contiguous: how a custom op's backward
/// reads its operands without copying them into vectors first.
pub fn with_f32s<const N: usize, R>(
    ts: [&candle_core::Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let ts = ts.map(|t| t.contiguous());
    let mut owned = Vec::with_capacity(N);
    for t in ts {
        owned.push(t?);
    }
    let stores: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for (st, lay) in &stores {
        let candle_core::Storage::Cpu(cpu) = &**st else {
            candle_core::bail!("{op}: CPU tensors only");
        };
        slices.push(f32s(cpu, lay, op)?);
    }
    let slices: [&[f32]; N] = slices
        .try_into()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: {N} operands")))?;
    f(slices)
}
