//! Tests of the tiled attention: values and gradients against the composed attention.

use super::*;
use candle_core::Device;

/// The composed reference: scores, mask, candle's softmax, product.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, inner: Option<&Tensor>) -> Tensor {
    let (hq, l, d) = q.dims3().unwrap();
    let (hkv, s, _) = k.dims3().unwrap();
    let g = hq / hkv;
    let k = k
        .repeat((1, g, 1))
        .unwrap()
        .reshape((hkv, g, s, d))
        .unwrap();
    let k = k.reshape((hq, s, d)).unwrap();
    let v = v.repeat((1, g, 1)).unwrap().reshape((hq, s, d)).unwrap();
    let mut scores = q.matmul(&k.t().unwrap()).unwrap();
    if let Some(m) = inner {
        let cols = m.dim(1).unwrap();
        let full = Tensor::cat(
            &[
                &Tensor::zeros((l, s - cols), DType::F32, q.device()).unwrap(),
                m,
            ],
            1,
        )
        .unwrap();
        scores = scores.broadcast_add(&full).unwrap();
    }
    // The composed softmax (differentiable; candle's fused one has no backward).
    let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
    let seen = p.eq(&p).unwrap(); // NaN is not equal to itself
    if seen.min_all().unwrap().to_scalar::<u8>().unwrap() == 0 {
        // Rows that see nothing: zeros, as the kernel and our softmax give.
        let p = seen.where_cond(&p, &p.zeros_like().unwrap()).unwrap();
        return p.matmul(&v).unwrap();
    }
    p.matmul(&v).unwrap()
}

fn causal(l: usize) -> Tensor {
    super::super::attention::causal_mask_tensor(l, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn matches_the_composed_attention_on_every_edge() {
    if !super::super::simd::avx2_fma() {
        return;
    }
    let dev = Device::Cpu;
    // (Hq, Hkv, L, S, D, mask columns): tiles around QT and KT, GQA 1-3, odd head dims.
    for (hq, hkv, l, s, d, m) in [
        (4, 2, 1, 1, 64, 0),
        (4, 2, 27, 27, 64, 27),
        (9, 3, 33, 200, 64, 33),
        (2, 1, 70, 70, 24, 70),
        (3, 3, 64, 130, 40, 0),
        (6, 2, 100, 612, 64, 100),
    ] {
        let q = (Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap() * 0.3).unwrap();
        let k = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
        let mask = (m > 0).then(|| {
            let c = causal(l);
            c.narrow(1, l - m, m).unwrap()
        });
        let ours = attend(&q, &k, &v, mask.as_ref()).unwrap().unwrap();
        let theirs = reference(&q, &k, &v, mask.as_ref());
        let diff = super::super::simd::max_abs_diff(&ours, &theirs);
        assert!(diff < 2e-5, "hq={hq} hkv={hkv} l={l} s={s} d={d}: {diff}");
    }
}

#[test]
fn strided_keys_and_a_sentence_mask_with_holes() {
    if !super::super::simd::avx2_fma() {
        return;
    }
    let dev = Device::Cpu;
    let (hq, hkv, l, d) = (4, 2, 90, 32);
    // Keys are a view into a larger cache: rows 10..10+S of a (Hkv, 400, D) buffer.
    let cache = Tensor::randn(0f32, 1.0, (hkv, 400, d), &dev).unwrap();
    let s = 300;
    let k = cache.narrow(1, 10, s).unwrap();
    let v = cache.narrow(1, 50, s).unwrap();
    let q = (Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap() * 0.3).unwrap();
    // Segments of 9 rows, the last 2 of each kept: a query sees kept rows of earlier
    // segments and its own segment causally; row 0..8 of the first segment see only
    // themselves; one row sees nothing of the mask (it still sees the prefix).
    let mut mask = sentence_mask_with_holes(l, 9, 7);
    mask[45 * l..46 * l].fill(f32::NEG_INFINITY);
    let mask = Tensor::from_vec(mask, (l, l), &dev).unwrap();
    let ours = attend(&q, &k, &v, Some(&mask)).unwrap().unwrap();
    let theirs = reference(
        &q,
        &k.contiguous().unwrap(),
        &v.contiguous().unwrap(),
        Some(&mask),
    );
    let diff = super::super::simd::max_abs_diff(&ours, &theirs);
    assert!(diff < 2e-5, "{diff}");
}

/// Segments of `seg` rows whose last `seg - kept_from` rows are kept as gists: a query
/// sees the kept rows of earlier segments and its own segment causally (the training
/// plan's mask, with holes).
fn sentence_mask_with_holes(l: usize, seg: usize, kept_from: usize) -> Vec<f32> {
    let mut mask = vec![f32::NEG_INFINITY; l * l];
    for i in 0..l {
        for j in 0..l {
            let kept = j % seg >= kept_from;
            if (j / seg < i / seg && kept) || (j / seg == i / seg && j <= i) {
                mask[i * l + j] = 0.0;
            }
        }
    }
    mask
}

/// The trainable node's gradients against the composed attention's, keys a strided
/// view (as the plans pass them), every gradient finite.
fn assert_gradients_match(
    (hq, hkv, l, s, d): (usize, usize, usize, usize, usize),
    mask: Option<&Tensor>,
) {
    let dev = Device::Cpu;
    let var = crate::model::simd::random_var;
    let (q, k, v) = (
        var((hq, l, d), 0.3),
        var((hkv, s + 3, d), 1.0),
        var((hkv, s, d), 1.0),
    );
    let kv = k.narrow(1, 3, s).unwrap();
    let w = Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap();
    let grads = |y: Tensor| {
        let g = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        [q.as_tensor(), k.as_tensor(), v.as_tensor()].map(|t| g.get(t).expect("a gradient").clone())
    };
    let ours = grads(attend_trainable(&q, &kv, &v, mask).unwrap().unwrap());
    let theirs = grads(reference(&q, &kv, &v, mask));
    for (name, (a, b)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&theirs)) {
        let diff = super::super::simd::max_abs_diff(a, b);
        assert!(diff < 1e-4, "d{name} hq={hq} l={l} s={s}: {diff}");
        let values = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|x| x.is_finite()), "d{name} is finite");
    }
}

#[test]
fn the_trainable_node_has_the_composed_gradients() {
    if !super::super::simd::avx2_fma() {
        return;
    }
    // Several query tiles per backward chunk and key tiles past KT, GQA 1-3, head
    // dims not a multiple of the panel.
    for (hq, hkv, l, s, d, m) in [
        (4, 2, 40, 100, 32, 40),
        (9, 3, 70, 70, 64, 70),
        (2, 2, 5, 9, 8, 0),
        (4, 2, 300, 330, 24, 300),
        (3, 1, 140, 140, 40, 0),
    ] {
        let mask = (m > 0).then(|| causal(l).narrow(1, l - m, m).unwrap());
        assert_gradients_match((hq, hkv, l, s, d), mask.as_ref());
    }
}

/// A sentence mask with holes and one row that sees nothing at all (no prefix).
#[test]
fn the_trainable_node_has_the_composed_gradients_under_a_sentence_mask() {
    if !super::super::simd::avx2_fma() {
        return;
    }
    let l = 170;
    let mut mask = sentence_mask_with_holes(l, 13, 10);
    mask[77 * l..78 * l].fill(f32::NEG_INFINITY);
    let mask = Tensor::from_vec(mask, (l, l), &Device::Cpu).unwrap();
    assert_gradients_match((4, 2, l, l, 32), Some(&mask));
}

#[test]
fn a_row_is_the_same_bits_whatever_rows_share_its_call() {
    if !super::super::simd::avx2_fma() {
        return;
    }
    let dev = Device::Cpu;
    let (hq, hkv, l, s, d) = (4, 2, 100, 300, 64);
    let q = Tensor::randn(0f32, 1.0, (hq, l, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (hkv, s, d), &dev).unwrap();
    let mask = causal(l);
    let all: Vec<Vec<Vec<f32>>> = attend(&q, &k, &v, Some(&mask))
        .unwrap()
        .unwrap()
        .to_vec3()
        .unwrap();
    // The last 7 queries alone, with the keys they see (the same tiling from key 0).
    let (a, n) = (93, 7);
    let part: Vec<Vec<Vec<f32>>> = attend(
        &q.narrow(1, a, n).unwrap(),
        &k.narrow(1, 0, s).unwrap(),
        &v,
        Some(&mask.narrow(0, a, n).unwrap()),
    )
    .unwrap()
    .unwrap()
    .to_vec3()
    .unwrap();
    for h in 0..hq {
        assert_eq!(part[h], all[h][a..a + n].to_vec(), "head {h}");
    }
}
