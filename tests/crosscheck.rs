//! `giststream crosscheck`, the CPU-vs-device logits check a GPU lease runs first: here it
//! compares the CPU in f16 and f32 with the CPU in f32, and must also catch a model that
//! is not the same.

mod common;

use giststream::bench::crosscheck;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::model::{GistModel, LoadOptions};
use std::process::Command;

fn crosscheck_cli(dtype: &str) -> serde_json::Value {
    let out = common::succeed(
        Command::new(env!("CARGO_BIN_EXE_giststream"))
            .env("RAYON_NUM_THREADS", "1")
            .args(["crosscheck", "--bytes", "1500", "--dtype", dtype]),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn f32_on_the_cpu_is_the_reference_itself() {
    let r = crosscheck_cli("f32");
    assert_eq!(r["pass"], true);
    let paths = r["paths"].as_array().unwrap();
    let names: Vec<&str> = paths.iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "incremental",
            "incremental-slots",
            "parallel-fused",
            "parallel-differentiable"
        ]
    );
    for p in paths.iter().filter(|p| p.get("logits").is_some()) {
        assert_eq!(p["logits"]["max_abs_diff"], 0.0, "{p}");
        assert_eq!(p["logits"]["top1_agreement"], 1.0, "{p}");
        assert!(p["logits"]["rows"].as_u64().unwrap() > 300, "{p}");
    }
    assert_eq!(paths[0]["states"]["max_abs_diff"], 0.0);
    // The slots engine sums in another order: close, not equal.
    let slots = paths[1]["states"]["max_relative_diff"].as_f64().unwrap();
    assert!(slots < 1e-5, "{slots}");
}

#[test]
fn f16_on_the_cpu_differs_but_within_its_tolerance() {
    let r = crosscheck_cli("f16");
    assert_eq!(r["pass"], true, "{r}");
    assert_eq!(r["dtype"], "f16");
    for p in r["paths"].as_array().unwrap() {
        let Some(l) = p.get("logits") else { continue };
        let rel = l["max_relative_diff"].as_f64().unwrap();
        // A real difference (the check ran at f16), well inside the stated 0.05.
        assert!(rel > 1e-5 && rel < 0.05, "{p}");
    }
    let nll = r["paths"][0]["mean_abs_nll_diff"].as_f64().unwrap();
    assert!(nll > 0.0 && nll < 0.01, "{nll}");
}

#[test]
fn a_different_model_fails_the_check_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_random_model(&a, &RandomSpec::default()).unwrap();
    // The same shape with other weights: what a broken kernel would look like.
    let other = RandomSpec {
        seed: 8,
        ..RandomSpec::default()
    };
    write_random_model(&b, &other).unwrap();
    let dev = candle_core::Device::Cpu;
    let load = |d: &std::path::Path| {
        GistModel::load(d, &dev, candle_core::DType::F32, &LoadOptions::default()).unwrap()
    };
    let (ma, mb) = (load(&a), load(&b));
    let docs = vec![ma.segments(&synthetic_text(6, 8, 1)).unwrap()];
    let r = crosscheck::run(&ma, &mb, &docs).unwrap();
    assert!(!r.pass);
    for p in &r.paths {
        let what = if p.logits.is_some() {
            "relative logit difference"
        } else {
            "relative state difference"
        };
        assert!(p.exceeded.iter().any(|e| e.contains(what)), "{p:?}");
    }
    // And the same model against itself passes.
    assert!(crosscheck::run(&ma, &load(&a), &docs).unwrap().pass);
}
