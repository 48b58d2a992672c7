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
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
