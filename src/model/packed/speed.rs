//! Speed checks, run by hand (`cargo test --release -- --ignored --nocapture`).

use super::*;
use candle_core::Device;

/// Each of the trainable linear's three products alone, at the benchmark shape:
/// `cargo test --release -- --ignored --nocapture product_gflops`.
#[test]
#[ignore]
fn product_gflops() {
    let m = 1200;
    for (n, k) in [(256, 256), (688, 256), (256, 688), (4096, 256)] {
        let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32 * 0.1).collect();
        let reps = (3_000_000_000 / (2 * m * n * k)).max(3);
        let gf =
            |t: std::time::Instant| (2 * m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let mut out = vec![0f32; m * n];
            PackedMatrix::from_rows(&w, n, k).matmul(&x, m, &mut out);
        }
        let fwd = gf(t);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let mut dx = vec![0f32; m * k];
            PackedMatrix::from_columns(&w, n, k).matmul(&g, m, &mut dx);
        }
        let dx = gf(t);
        let t = std::time::Instant::now();
        for _ in 0..reps {
            let mut dw = vec![0f32; n * k];
            let gt = Lhs {
                data: &g,
                ld: n,
                transposed: true,
            };
            PackedMatrix::from_columns(&x, m, k).matmul_lhs(&gt, n, &mut dw);
        }
        let dw = gf(t);
        println!("{n}x{k} m={m}: fwd {fwd:.1} dx {dx:.1} dW {dw:.1} GFLOP/s");
    }
}

/// The benchmark shape's training products (forward and both gradients) at 1,200
/// rows: `cargo test --release -- --ignored --nocapture linear_gflops`.
#[test]
#[ignore]
fn linear_gflops() {
    let dev = Device::Cpu;
    for (out, inp) in [(256, 256), (128, 256), (688, 256), (256, 688), (4096, 256)] {
        let m = 1200;
        let x = candle_core::Var::randn(0f32, 1.0, (m, inp), &dev).unwrap();
        let w = candle_core::Var::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let reps = (6_000_000_000 / (6 * m * out * inp)).max(3);
        let flop = (6 * m * out * inp * reps) as f64;
        let time = |f: &dyn Fn() -> Tensor| {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f().sum_all().unwrap().backward().unwrap();
            }
            flop / t.elapsed().as_secs_f64() / 1e9
        };
        let ours = time(&|| linear(&x, &w).unwrap());
        let theirs = time(&|| x.matmul(&w.t().unwrap()).unwrap());
        println!("{out}x{inp} m={m} fwd+bwd: packed {ours:.1} GFLOP/s, candle {theirs:.1}");
    }
}

#[test]
#[ignore]
fn gflops() {
    let dev = Device::Cpu;
    for (out, inp) in [(1536, 576), (576, 1536), (576, 576)] {
        let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
        let packed = PackedMatrix::new(&w).unwrap();
        let wt = w.t().unwrap();
        for m in [1, 26, 208, 2048] {
            let x = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap();
            let reps = (2_000_000_000 / (2 * m * out * inp)).max(3);
            let flop = (2 * m * out * inp * reps) as f64;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                packed.forward(&x).unwrap();
            }
            let ours = flop / t.elapsed().as_secs_f64() / 1e9;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                x.matmul(&wt).unwrap();
            }
            let theirs = flop / t.elapsed().as_secs_f64() / 1e9;
            println!("{out}x{inp} m={m}: packed {ours:.1} GFLOP/s, candle {theirs:.1}");
        }
    }
}
