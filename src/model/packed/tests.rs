//! Tests of the packed kernel and its trainable nodes against candle's matmul.

use super::*;
use candle_core::Device;

#[test]
fn matches_candles_matmul_on_every_edge() {
    if !PackedMatrix::supported() {
        return;
    }
    let dev = Device::Cpu;
    // Output widths around the panel size, reductions around KC, rows around MR/MC.
    for (out, inp) in [(16, 8), (37, 300), (70, 513), (5, 1)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let packed = PackedMatrix::new(&w).unwrap();
        for m in [1, 5, 6, 7, 97, 200] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
            let ours = packed.forward(&x).unwrap();
            let theirs = x.matmul(&w.t().unwrap()).unwrap();
            let diff = super::super::simd::max_abs_diff(&ours, &theirs);
            let tol = 1e-5 * (inp as f32).sqrt() * 4.0;
            assert!(diff < tol, "out={out} in={inp} m={m}: {diff}");
        }
    }
}

#[test]
fn a_row_is_the_same_bits_whatever_else_is_in_the_batch() {
    if !PackedMatrix::supported() {
        return;
    }
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (40, 600), &dev).unwrap();
    let packed = PackedMatrix::new(&w).unwrap();
    let x = Tensor::randn(0f32, 1.0, (250, 600), &dev).unwrap();
    let all: Vec<Vec<f32>> = packed.forward(&x).unwrap().to_vec2().unwrap();
    for (start, len) in [(0, 1), (7, 2), (13, 3), (100, 5), (245, 5)] {
        let part: Vec<Vec<f32>> = packed
            .forward(&x.narrow(0, start, len).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(
            part,
            all[start..start + len].to_vec(),
            "rows {start}..+{len}"
        );
    }
}

/// `ours` against `theirs`: the values within `tol`, and the gradients of Σ up ∘ y with
/// respect to every var within `grad_tol`.
fn assert_same_node(
    (ours, theirs): (Tensor, Tensor),
    up: &Tensor,
    vars: &[(&str, &candle_core::Var)],
    (tol, grad_tol): (f32, f32),
    label: &str,
) {
    let diff = super::super::simd::max_abs_diff(&ours, &theirs);
    assert!(diff < tol, "value {label}: {diff}");
    let g1 = (ours * up).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (theirs * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, v) in vars {
        let (a, b) = (
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        let diff = super::super::simd::max_abs_diff(a, b);
        assert!(diff < grad_tol, "d{name} {label}: {diff}");
    }
}

#[test]
fn the_trainable_linear_matches_candles_values_and_gradients() {
    if !PackedMatrix::supported() {
        return;
    }
    let dev = Device::Cpu;
    // Widths around the panel, reductions (in, and M for dW) around KC, rows around
    // MR and MC.
    for (m, out, inp) in [(1, 5, 3), (7, 16, 17), (97, 37, 300), (300, 70, 257)] {
        let x = candle_core::Var::randn(0f32, 1.0, (m, inp), &dev).unwrap();
        let w = candle_core::Var::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (m, out), &dev).unwrap();
        let ours = linear(&x, &w).unwrap();
        let theirs = x.matmul(&w.t().unwrap()).unwrap();
        let tol = 1e-5 * ((inp.max(m).max(out)) as f32).sqrt() * 4.0;
        let label = format!("m={m} out={out} in={inp}");
        assert_same_node(
            (ours, theirs),
            &up,
            &[("x", &x), ("w", &w)],
            (tol, tol),
            &label,
        );
    }
}

#[test]
fn the_adapted_node_matches_the_composed_adapter_values_and_gradients() {
    if !PackedMatrix::supported() {
        return;
    }
    let dev = Device::Cpu;
    for (m, out, inp, r) in [(1, 5, 3, 2), (37, 70, 257, 16), (300, 16, 40, 4)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let frozen = std::sync::Arc::new(Frozen::new(&w).unwrap());
        let x = candle_core::Var::randn(0f32, 1.0, (m, inp), &dev).unwrap();
        let a = candle_core::Var::randn(0f32, 0.3, (r, inp), &dev).unwrap();
        let b = candle_core::Var::randn(0f32, 0.3, (out, r), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (m, out), &dev).unwrap();
        let ours = frozen.forward_adapted(&x, &a, &b, 2.0).unwrap();
        let low = x
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap();
        let theirs = (frozen.forward(&x).unwrap() + (low * 2.0).unwrap()).unwrap();
        let tol = 1e-5 * (inp.max(m) as f32).sqrt() * 8.0;
        let label = format!("m={m} out={out} in={inp}");
        let vars = [("x", &x), ("a", &a), ("b", &b)];
        assert_same_node((ours, theirs), &up, &vars, (tol, tol * 4.0), &label);
    }
}

#[test]
fn strided_input_is_made_contiguous() {
    if !PackedMatrix::supported() {
        return;
    }
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (20, 12), &dev).unwrap();
    let x = Tensor::randn(0f32, 1.0, (12, 9), &dev)
        .unwrap()
        .t()
        .unwrap();
    let ours = PackedMatrix::new(&w).unwrap().forward(&x).unwrap();
    let theirs = x.matmul(&w.t().unwrap()).unwrap();
    let diff = super::super::simd::max_abs_diff(&ours, &theirs);
    assert!(diff < 1e-4, "{diff}");
}
