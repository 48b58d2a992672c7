//! Helpers shared by the integration tests.

// Each test binary uses its own subset of these.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use giststream::model::random::{write_random_model, RandomSpec};
use giststream::model::{GistModel, LoadOptions};

/// The model in `dir`, loaded f32 on the CPU.
pub fn load_model(dir: &std::path::Path) -> GistModel {
    GistModel::load(dir, &Device::Cpu, DType::F32, &LoadOptions::default()).unwrap()
}

/// Largest |x| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A random model of `spec` written to a temporary directory and loaded (f32, CPU).
pub fn tiny_model(spec: &RandomSpec) -> (tempfile::TempDir, GistModel) {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), spec).unwrap();
    let model = load_model(dir.path());
    (dir, model)
}

/// Largest |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs a command, failing the test with its stderr unless it succeeds.
pub fn succeed(c: &mut std::process::Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
