//! Checkpoint formats: sharded safetensors with an index, bf16 weights, f16 compute.

mod common;

use candle_core::{DType, Device, Tensor};
use giststream::engine::whole::{self, Layout, Mode};
use giststream::model::ops::Ops;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::model::{GistModel, LoadOptions};
use std::collections::HashMap;
use std::path::Path;

fn logits(dir: &Path, dtype: DType) -> Tensor {
    let model = GistModel::load(dir, &Device::Cpu, dtype, &LoadOptions::default()).unwrap();
    let segs = model.segments(&synthetic_text(5, 8, 3)).unwrap();
    let layout = Layout::new(&model, &[segs], true);
    whole::forward(&model, &layout, Mode::Sentence, Ops::Fused)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn copy_model(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "tokenizer.json", "gist.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn a_sharded_checkpoint_loads_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single");
    write_random_model(&single, &RandomSpec::default()).unwrap();
    let sharded = dir.path().join("sharded");
    copy_model(&single, &sharded);
    let weights =
        candle_core::safetensors::load(single.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in weights.into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.clone(), serde_json::json!(file));
        shards[i % 2].insert(name, t);
    }
    for (i, s) in shards.iter().enumerate() {
        candle_core::safetensors::save(
            s,
            sharded.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(
        common::max_abs_diff(&logits(&single, DType::F32), &logits(&sharded, DType::F32)),
        0.0
    );
}

#[test]
fn bf16_weights_load_and_f16_compute_runs() {
    let dir = tempfile::tempdir().unwrap();
    let f32_dir = dir.path().join("f32");
    write_random_model(&f32_dir, &RandomSpec::default()).unwrap();
    let bf16_dir = dir.path().join("bf16");
    copy_model(&f32_dir, &bf16_dir);
    let weights =
        candle_core::safetensors::load(f32_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let bf16: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&bf16, bf16_dir.join("model.safetensors")).unwrap();

    let reference = logits(&f32_dir, DType::F32);
    let scale = common::max_abs(&reference);
    // bf16 keeps 8 bits of mantissa: the rounded weights move logits by about 1%.
    let d = common::max_abs_diff(&reference, &logits(&bf16_dir, DType::F32));
    assert!(
        d > 0.0 && d < 0.05 * scale,
        "bf16 weights: {d} (logit scale {scale})"
    );
    // f16 compute on the CPU.
    let d = common::max_abs_diff(&reference, &logits(&f32_dir, DType::F16));
    assert!(d < 0.05 * scale, "f16 compute: {d} (logit scale {scale})");
}

/// A checkpoint the reference code saved: its own config keys set N_g, the gist ids and BOS
/// visibility; a gist.json that contradicts them is refused; a missing tokenizer is named.
#[test]
fn reference_checkpoints_configure_themselves() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ref_sentence_ng4");
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("m");
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(src.join(f), to.join(f)).unwrap();
    }
    let load = |opts: &LoadOptions| GistModel::load(&to, &Device::Cpu, DType::F32, opts);
    // No gist.json, and a --num-gists that disagrees: config.json wins.
    let m = load(&LoadOptions {
        num_gists: 1,
        ..LoadOptions::default()
    })
    .unwrap();
    assert_eq!(m.gist.gist_token_ids, vec![258, 259, 260, 261]);
    assert!(!m.gist.bos_always_visible);
    assert_eq!(
        m.gist.segmentation.mode,
        giststream::text::segment::SegmentMode::Reference
    );
    // The same as the fixture's own gist.json says.
    let shipped: giststream::model::config::GistConfig =
        serde_json::from_slice(&std::fs::read(src.join("gist.json")).unwrap()).unwrap();
    assert_eq!(m.gist.gist_tokens, shipped.gist_tokens);
    // ft_with_bos_token true: BOS stays visible.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    cfg["ft_with_bos_token"] = true.into();
    std::fs::write(to.join("config.json"), cfg.to_string()).unwrap();
    assert!(
        load(&LoadOptions::default())
            .unwrap()
            .gist
            .bos_always_visible
    );
    // A gist.json that contradicts config.json is refused, naming both.
    std::fs::copy(src.join("gist.json"), to.join("gist.json")).unwrap();
    let err = format!("{:#}", load(&LoadOptions::default()).err().unwrap());
    assert!(
        err.contains("bos_always_visible") && err.contains("ft_with_bos_token"),
        "{err}"
    );
    // No tokenizer files (save_pretrained of the model alone).
    std::fs::remove_file(to.join("gist.json")).unwrap();
    std::fs::remove_file(to.join("tokenizer.json")).unwrap();
    let err = format!("{:#}", load(&LoadOptions::default()).err().unwrap());
    assert!(
        err.contains("tokenizer.json") && err.contains("save_pretrained"),
        "{err}"
    );
}
