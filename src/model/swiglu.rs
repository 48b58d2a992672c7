//! The MLP's gate for inference: `silu(gate) · up`, in place in `gate`, eight lanes at a
//! time.
//!
//! Why our own: candle's `silu` calls the scalar libm `exp` per element and writes a new
//! tensor, then the product writes another. With eight documents in a batch the gate is
//! (208, 1536) per layer, and profiling the batched incremental path put a few percent in
//! `expf` alone. Here one pass reads gate and up and overwrites gate.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// silu(gate) · up. `gate` is consumed (its buffer reused when it is a contiguous f32 CPU
/// tensor that nothing else holds); anything else goes through candle's ops.
pub fn silu_mul(gate: Tensor, up: &Tensor) -> Result<Tensor> {
    if fits(&gate, up) && gate.is_contiguous() && up.is_contiguous() {
        gate.inplace_op2(up, &SiluMul)?;
        Ok(gate)
    } else {
        gate.silu()? * up
    }
}

/// Whether our kernels take these: f32 CPU tensors of one shape.
fn fits(gate: &Tensor, up: &Tensor) -> bool {
    gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
}

struct SiluMul;

impl candle_core::InplaceOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        use rayon::prelude::*;
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (s1, s2) else {
            candle_core::bail!("silu-mul: f32 only");
        };
        let (Some((a1, b1)), Some((a2, b2))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous tensors only");
        };
        let (gate, up) = (&mut gate[a1..b1], &up[a2..b2]);
        const CHUNK: usize = 16 * 1024;
        if gate.len() > CHUNK {
            gate.par_chunks_mut(CHUNK)
                .zip(up.par_chunks(CHUNK))
                .for_each(|(g, u)| silu_mul_slice(g, u));
        } else {
            silu_mul_slice(gate, up);
        }
        Ok(())
    }
}

/// silu(gate) · up as one trainable node (training): the composed ops are two nodes whose
/// outputs (silu(gate), then the product) and their gradients are each a buffer as large as
/// the MLP's hidden layer, per layer. Keeps only its inputs. Contiguous f32 CPU tensors of
/// one shape; anything else goes through candle's ops.
pub fn silu_mul_trainable(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fits(gate, up) {
        gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMulNode)
    } else {
        gate.silu()? * up
    }
}

struct SiluMulNode;

impl candle_core::CustomOp2 for SiluMulNode {
    fn name(&self) -> &'static str {
        "silu-mul-trainable"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let gate = super::simd::f32s(s1, l1, self.name())?;
        let up = super::simd::f32s(s2, l2, self.name())?;
        let mut out = gate.to_vec();
        const CHUNK: usize = 16 * 1024;
        out.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(g, u)| silu_mul_slice(g, u));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With σ = sigmoid(gate): d up = grad · gate · σ, d gate = grad · up · σ · (1 + gate ·
    /// (1 - σ)).
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        use rayon::prelude::*;
        let n = gate.elem_count();
        let mut d_gate = vec![0f32; n];
        let mut d_up = vec![0f32; n];
        super::simd::with_f32s([gate, up, grad], self.name(), |[g, u, dy]| {
            const CHUNK: usize = 16 * 1024;
            d_gate
                .par_chunks_mut(CHUNK)
                .zip(d_up.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(c, (dg, du))| {
                    let at = c * CHUNK..c * CHUNK + dg.len();
                    silu_mul_grad(&g[at.clone()], &u[at.clone()], &dy[at], dg, du);
                });
            Ok(())
        })?;
        let shape = gate.shape();
        Ok((
            Some(Tensor::from_vec(d_gate, shape, gate.device())?),
            Some(Tensor::from_vec(d_up, shape, gate.device())?),
        ))
    }
}

/// d up = dy · silu(g), d gate = dy · u · σ(g) · (1 + g · (1 - σ(g))), element by element.
fn silu_mul_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the features were just detected.
            done = unsafe { silu_mul_grad_avx2(g, u, dy, dg, du) };
        }
    }
    for i in done..dg.len() {
        let (x, y, d) = (g[i], u[i], dy[i]);
        let sig = 1.0 / (1.0 + (-x).exp());
        du[i] = d * x * sig;
        dg[i] = d * y * sig * (1.0 + x * (1.0 - sig));
    }
}

/// The whole multiples of 8 of [`silu_mul_grad`]; returns how many were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_grad_avx2(
    g: &[f32],
    u: &[f32],
    dy: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) -> usize {
    use std::arch::x86_64::*;
    let n = dg
        .len()
        .min(du.len())
        .min(g.len())
        .min(u.len())
        .min(dy.len())
        / 8
        * 8;
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let y = _mm256_loadu_ps(u.as_ptr().add(i));
        let d = _mm256_loadu_ps(dy.as_ptr().add(i));
        let e = super::softmax::exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let dsig = _mm256_mul_ps(d, sig);
        _mm256_storeu_ps(du.as_mut_ptr().add(i), _mm256_mul_ps(dsig, x));
        // 1 + x · (1 - σ)
        let k = _mm256_fmadd_ps(x, _mm256_sub_ps(one, sig), one);
        _mm256_storeu_ps(
            dg.as_mut_ptr().add(i),
            _mm256_mul_ps(_mm256_mul_ps(dsig, y), k),
        );
        i += 8;
    }
    n
}

fn silu_mul_slice(gate: &mut [f32], up: &[f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::avx2_fma() {
            // SAFETY: the features were just detected.
            done = unsafe { silu_mul_avx2(gate, up) };
        }
    }
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// The whole multiples of 8; returns how many were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = gate.len().min(up.len()) / 8 * 8;
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let x = _mm256_loadu_ps(g.add(i));
        // silu(x) = x / (1 + e^-x); e^-x underflows to 0 for large x (silu = x) and
        // saturates at e^88 for very negative x (silu = x / 1.6e38, about 0).
        let e = super::softmax::exp256(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(g.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.add(i))));
        i += 8;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_trainable_node_has_the_composed_values_and_gradients() {
        let dev = Device::Cpu;
        for n in [5, 21, 40_000] {
            let g = candle_core::Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (n,), &dev).unwrap() * 4.0).unwrap(),
            )
            .unwrap();
            let u = candle_core::Var::randn(0f32, 1.0, (n,), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n,), &dev).unwrap();
            let run = |y: Tensor| {
                let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let get = |v: &candle_core::Var| grads.get(v.as_tensor()).unwrap().clone();
                (y, get(&g), get(&u))
            };
            let ours = run(silu_mul_trainable(&g, &u).unwrap());
            let theirs = run((g.silu().unwrap() * u.as_tensor()).unwrap());
            for (a, b) in [
                (&ours.0, &theirs.0),
                (&ours.1, &theirs.1),
                (&ours.2, &theirs.2),
            ] {
                let diff = super::super::simd::max_abs_diff(a, b);
                assert!(diff < 1e-4, "n={n}: {diff}");
            }
        }
    }

    #[test]
    fn matches_candles_silu_times_up() {
        let dev = Device::Cpu;
        for n in [1, 8, 13, 40_000] {
            let gate = (Tensor::randn(0f32, 1.0, (n,), &dev).unwrap() * 12.0).unwrap();
            let up = Tensor::randn(0f32, 1.0, (n,), &dev).unwrap();
            let want = (gate.silu().unwrap() * &up).unwrap();
            let got = silu_mul(gate.copy().unwrap(), &up).unwrap();
            let diff = super::super::simd::max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "n={n}: {diff}");
        }
        // The extremes: large positive is x·up, large negative is 0.
        let gate =
            Tensor::new(&[100f32, -100.0, 0.0, 88.5, -88.5, 1e-3, -1e-3, 5.0], &dev).unwrap();
        let up = Tensor::ones(8, DType::F32, &dev).unwrap();
        let want: Vec<f32> = (gate.silu().unwrap()).to_vec1().unwrap();
        let got: Vec<f32> = silu_mul(gate.copy().unwrap(), &up)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{got:?} vs {want:?}"
            );
        }
    }
}
