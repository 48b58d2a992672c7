//! Gist adapters on a frozen base: training changes only the adapter (the base stays
//! bit-identical) and its loss falls in the compressed position scheme; the saved folder
//! loads onto its base and computes what training computed, in parallel and incrementally;
//! a base that is not the one the adapter names is refused.

mod common;

use candle_core::{DType, Device, IndexOp};
use giststream::engine::whole::{self, Layout, Mode};
use giststream::model::adapter::{AdapterConfig, BaseRef};
use giststream::model::config::PositionScheme;
use giststream::model::ops::Ops;
use giststream::model::random::{write_random_model, RandomSpec};
use giststream::model::GistModel;
use giststream::text::tokenize::Segment;
use giststream::train::{self, TrainConfig, Trainee};
use std::path::{Path, PathBuf};

fn texts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/texts")
}

fn spec(tie: bool) -> RandomSpec {
    RandomSpec {
        gist_checkpoint: false,
        tie_embeddings: tie,
        ..common::small_spec()
    }
}

fn adapter_config(base: &Path) -> AdapterConfig {
    AdapterConfig {
        rank: 4,
        alpha: 8.0,
        targets: giststream::model::adapter::TARGETS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        base: BaseRef {
            file: base.file_name().unwrap().to_string_lossy().into_owned(),
            sha256: giststream::model::adapter::base_digest(base).unwrap(),
        },
    }
}

/// A new adapter (N_g 2, compressed positions, seed 7) on the frozen model at `base`.
fn fresh_adapter(base: &Path) -> Trainee {
    Trainee::adapter(
        base,
        Err((2, PositionScheme::Compressed)),
        adapter_config(base),
        7,
        &Device::Cpu,
    )
    .unwrap()
}

/// What every run here shares: 64-token sequences, micro-batches of 4, no checkpoints.
fn small(mut cfg: TrainConfig) -> TrainConfig {
    cfg.seq_tokens = 64;
    cfg.micro_batch = 4;
    cfg.checkpoint_every = 1000;
    cfg
}

/// The bundled texts, each cut to `chars` characters, as 64-token sequences for `t`.
fn sequences(t: &Trainee, chars: usize, bos: Option<u32>) -> Vec<Vec<Segment>> {
    let texts: Vec<String> = train::read_texts(&texts_dir())
        .unwrap()
        .into_iter()
        .map(|t| t.chars().take(chars).collect())
        .collect();
    train::sequences(&texts, &t.model.tokenizer, &t.model.gist, bos, 64).unwrap()
}

/// Largest difference on regular tokens between the incremental path of `model` and its
/// parallel logits `par` over `layout`.
fn incremental_diff(
    model: &GistModel,
    docs: &[Vec<Segment>],
    layout: &Layout,
    par: &candle_core::Tensor,
) -> f32 {
    let inc = common::incremental_logits(model, docs, 1, true);
    let regular = &layout.regular;
    common::max_diff_regular(&par.i(0..regular.len()).unwrap(), &inc[0], regular)
}

/// Every tensor of `a` equals the same-named one of `b` (within 1e-6), but `skip`.
fn assert_same_weights(a: &Trainee, b: &Trainee, skip: Option<&str>) {
    let (a, b) = (a.weights(), b.weights());
    assert_eq!(a.len(), b.len());
    for (name, t) in a.iter().filter(|(k, _)| Some(k.as_str()) != skip) {
        let d = common::max_abs_diff(t, &b[name]);
        assert!(d < 1e-6, "{name}: {d}");
    }
}

fn train_adapter(root: &Path, tie: bool, steps: u64) -> (Trainee, Vec<f32>) {
    let base = root.join("base");
    write_random_model(&base, &spec(tie)).unwrap();
    let mut t = fresh_adapter(&base);
    let mut cfg = small(TrainConfig::scratch(64 * 8 * steps, 1e-2, 8));
    cfg.stages[0].warmup_steps = 3;
    let seqs = sequences(&t, 40_000, t.model.bos_token_id());
    let mut losses = Vec::new();
    train::run(
        &mut t,
        &cfg,
        &seqs,
        &[],
        &root.join("adapter"),
        train::Resume::No,
        |e| {
            if let train::Event::Step(l, _) = e {
                losses.push(l.loss)
            }
        },
    )
    .unwrap();
    (t, losses)
}

#[test]
fn an_adapter_trains_on_a_frozen_base_and_loads_back_onto_it() {
    for tie in [true, false] {
        let root = tempfile::tempdir().unwrap();
        let (t, losses) = train_adapter(root.path(), tie, 30);
        assert_eq!(losses.len(), 30);
        let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
        let last: f32 = losses[26..].iter().sum::<f32>() / 4.0;
        assert!(last < first - 0.3, "tie {tie}: loss {first} -> {last}");
        // Only the adapter was a variable: gist rows and two matrices per projection.
        let names: Vec<String> = t.weights().keys().cloned().collect();
        assert_eq!(names.len(), 1 + 2 * 7 * 2, "{names:?}");
        // The adapter folder holds the adapter only: config and tokenizer are its base's.
        let base = root.path().join("base");
        let folder = root.path().join("adapter");
        for f in ["adapter.json", "gist.json", "adapter.safetensors"] {
            assert!(folder.join(f).is_file(), "{f}");
        }
        assert!(!folder.join("config.json").exists());

        // Loaded onto its base (found beside the folder; packed for inference), the adapter
        // computes what the trainee computes (frozen base, autograd ops' forward), on the
        // parallel path and on the incremental path.
        let loaded =
            GistModel::load(&folder, &Device::Cpu, DType::F32, &Default::default()).unwrap();
        assert_eq!(loaded.gist.positions, PositionScheme::Compressed);
        let docs: Vec<_> = ["One short line. Then another one follows here! And a third?"]
            .iter()
            .map(|s| loaded.segments(s).unwrap())
            .collect();
        let layout = Layout::new(&loaded, &docs, true);
        let trained = whole::forward(&t.model, &layout, Mode::Sentence, Ops::Fused).unwrap();
        let par = whole::forward(&loaded, &layout, Mode::Sentence, Ops::Fused).unwrap();
        assert!(
            common::max_abs_diff(&trained, &par) < 1e-4,
            "{}",
            common::max_abs_diff(&trained, &par)
        );
        let d = incremental_diff(&loaded, &docs, &layout, &par);
        assert!(d < 1e-4, "incremental vs parallel: {d}");
        // And the adapter matters: without it the base computes something else.
        let plain = fresh_adapter(&base);
        let untrained = whole::forward(&plain.model, &layout, Mode::Sentence, Ops::Fused).unwrap();
        assert!(common::max_abs_diff(&untrained, &par) > 1e-2);
    }
}

#[test]
fn an_adapter_refuses_a_base_that_is_not_its_own() {
    let root = tempfile::tempdir().unwrap();
    let (_t, _) = train_adapter(root.path(), true, 2);
    // Another model under the base's name.
    let base = root.path().join("base");
    write_random_model(
        &base,
        &RandomSpec {
            seed: 99,
            ..spec(true)
        },
    )
    .unwrap();
    let load = || {
        GistModel::load(
            &root.path().join("adapter"),
            &Device::Cpu,
            DType::F32,
            &Default::default(),
        )
        .err()
        .map(|e| format!("{e:#}"))
    };
    let msg = load().expect("a foreign base is refused");
    assert!(
        msg.contains("is not the base this adapter was trained on"),
        "{msg}"
    );
    // No base at all: the error says how to get one.
    std::fs::remove_dir_all(&base).unwrap();
    let msg = load().expect("a missing base is refused");
    assert!(msg.contains("needs its base"), "{msg}");
}

#[test]
fn a_trained_adapter_starts_a_new_run_with_a_kept_bos() {
    let root = tempfile::tempdir().unwrap();
    let (first, _) = train_adapter(root.path(), true, 6);
    let base = root.path().join("base");
    let folder = root.path().join("adapter");
    let (config, gist, tensors) = giststream::model::adapter::read(&folder).unwrap();
    let mut gist: giststream::model::config::GistConfig = serde_json::from_slice(&gist).unwrap();
    assert!(!gist.bos_always_visible);
    // `train --init-adapter DIR --keep-bos`: the adapter's weights, BOS kept visible.
    gist.add_bos = true;
    gist.bos_always_visible = true;
    let mut next = Trainee::adapter(&base, Ok(&gist), config.clone(), 99, &Device::Cpu).unwrap();
    next.init_adapter(&tensors).unwrap();
    assert_same_weights(&first, &next, None);
    let bos = next.model.kept_bos().expect("BOS kept");
    let docs = vec![next.model.segments("One line. Another line here.").unwrap()];
    assert_eq!(docs[0][0].tokens[0], bos);
    // The kept BOS is stored like a gist: the incremental path still equals the
    // parallel one.
    let layout = Layout::new(&next.model, &docs, true);
    let par = whole::forward(&next.model, &layout, Mode::Sentence, Ops::Fused).unwrap();
    let d = incremental_diff(&next.model, &docs, &layout, &par);
    assert!(d < 1e-4, "incremental vs parallel with a kept BOS: {d}");
    // An adapter of another rank does not fit.
    let other = Trainee::adapter(
        &base,
        Ok(&gist),
        AdapterConfig { rank: 2, ..config },
        1,
        &Device::Cpu,
    );
    let msg = format!("{:#}", other.unwrap().init_adapter(&tensors).unwrap_err());
    assert!(msg.contains("is [") || msg.contains("tensors"), "{msg}");
}

#[test]
fn a_trained_adapter_starts_a_run_with_another_number_of_gists() {
    let root = tempfile::tempdir().unwrap();
    let (first, _) = train_adapter(root.path(), true, 6);
    let base = root.path().join("base");
    let folder = root.path().join("adapter");
    let name = giststream::model::adapter::GIST_EMBEDDINGS;
    let trained = first.weights();
    let rows = &trained[name];
    assert_eq!(rows.dims()[0], 2);
    // `train --init-adapter DIR --num-gists N`: N_g 2 becomes 4 (each row twice) and 1 (the
    // last row); the LoRA and everything else in gist.json stay.
    for (n, pick) in [(4usize, vec![0usize, 0, 1, 1]), (1, vec![1])] {
        let next = Trainee::from_adapter(&base, &folder, Some(n), 5, &Device::Cpu).unwrap();
        assert_eq!(next.model.gist.num_gist_tokens, n);
        assert_eq!(next.model.gist.gist_token_ids.len(), n);
        assert_eq!(next.model.gist.positions, PositionScheme::Compressed);
        assert_eq!(next.model.gist.add_bos, first.model.gist.add_bos);
        assert_same_weights(&first, &next, Some(name));
        let w = next.weights();
        for (i, &p) in pick.iter().enumerate() {
            let d = common::max_abs_diff(&w[name].i(i).unwrap(), &rows.i(p).unwrap());
            assert!(d < 1e-6, "N_g {n}: row {i} is not row {p}: {d}");
        }
        // The new model writes N gists per sentence, and its two paths still agree.
        let docs = vec![next.model.segments("One line. Another line here.").unwrap()];
        let layout = Layout::new(&next.model, &docs, true);
        let ids = &next.model.gist.gist_token_ids;
        let gists = layout.ids.iter().filter(|t| ids.contains(t)).count();
        assert_eq!(gists % n, 0, "{gists} gist rows for N_g {n}");
        assert!(gists >= n);
        let par = whole::forward(&next.model, &layout, Mode::Sentence, Ops::Fused).unwrap();
        let d = incremental_diff(&next.model, &docs, &layout, &par);
        assert!(d < 1e-4, "N_g {n}: incremental vs parallel: {d}");
    }
    // The adapter's own N_g, given or not, is the adapter unchanged.
    for n in [None, Some(2)] {
        let same = Trainee::from_adapter(&base, &folder, n, 5, &Device::Cpu).unwrap();
        assert_same_weights(&first, &same, None);
    }
}

#[test]
fn the_paper_recipes_first_stage_trains_only_the_gist_rows_of_an_adapter() {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    write_random_model(&base, &spec(true)).unwrap();
    let mut t = fresh_adapter(&base);
    // LoRA B starts at zero; give it values so that a change would show.
    t.init_adapter(
        &t.weights()
            .into_iter()
            .map(|(n, w)| {
                let w = if n.ends_with("lora_b") {
                    (w.ones_like().unwrap() * 0.01).unwrap()
                } else {
                    w.copy().unwrap()
                };
                (n, w)
            })
            .collect(),
    )
    .unwrap();
    // Copies: weights() shares the variables' storage, which training updates in place.
    let before: std::collections::HashMap<_, _> = t
        .weights()
        .into_iter()
        .map(|(n, w)| (n, w.copy().unwrap()))
        .collect();
    // Stage 1 gets 1/41 of the tokens: three steps of 4 x 64.
    let mut cfg = small(TrainConfig::paper(41 * 64 * 4 * 3, 1e-2, 4));
    cfg.stages.truncate(1); // "embeddings": the gist rows only
    cfg.stages[0].warmup_steps = 1;
    let seqs = sequences(&t, 20_000, None);
    train::run(
        &mut t,
        &cfg,
        &seqs,
        &[],
        &root.path().join("a"),
        train::Resume::No,
        |_| {},
    )
    .unwrap();
    let after = t.weights();
    for (name, w) in &before {
        let d = common::max_abs_diff(w, &after[name]);
        if name == giststream::model::adapter::GIST_EMBEDDINGS {
            assert!(d > 1e-4, "the gist rows did not train: {d}");
        } else {
            assert_eq!(d, 0.0, "{name} changed in the embeddings stage");
        }
    }
}
