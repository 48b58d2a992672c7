//! Training on bundled text (data/texts): loss falls, gradients reach every trainable
//! weight, frozen weights stay bit-identical, and a run killed with SIGKILL resumes onto
//! the same loss curve.

mod common;

use candle_core::{DType, Device};
use giststream::model::ops::Ops;
use giststream::model::random::write_random_model;
use giststream::text::tokenize::Segment;
use giststream::train::{self, Attention, TrainConfig, Trainable, Trainee};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn texts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/texts")
}

fn trainee(dir: &Path) -> Trainee {
    write_random_model(dir, &common::small_spec()).unwrap();
    train::trainee_from_dir(dir, 2, &Device::Cpu).unwrap()
}

/// The bundled texts, each cut by `part`, as training sequences for `t`.
fn sequences_of(t: &Trainee, seq_tokens: usize, part: fn(String) -> String) -> Vec<Vec<Segment>> {
    let texts: Vec<String> = train::read_texts(&texts_dir())
        .unwrap()
        .into_iter()
        .map(part)
        .collect();
    let bos = t.model.bos_token_id();
    train::sequences(&texts, &t.model.tokenizer, &t.model.gist, bos, seq_tokens).unwrap()
}

/// The first 60,000 characters of each bundled text: what the tests train on.
fn data(t: &Trainee, seq_tokens: usize) -> Vec<Vec<Segment>> {
    sequences_of(t, seq_tokens, |s| s.chars().take(60_000).collect())
}

fn config(tokens: u64, trainable: Trainable) -> TrainConfig {
    let mut c = TrainConfig::scratch(tokens, 3e-3, 8);
    c.stages[0].trainable = trainable;
    c.stages[0].warmup_steps = 5;
    c.seq_tokens = 64;
    c.micro_batch = 4;
    c.checkpoint_every = 1000;
    c
}

#[test]
fn loss_falls_on_bundled_text() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainee(&dir.path().join("init"));
    let cfg = config(64 * 8 * 60, Trainable::All);
    assert_loss_falls(&mut t, &cfg, 60, &dir.path().join("out"));
    // The output directory is a loadable gist model.
    let m = giststream::model::GistModel::load(
        &dir.path().join("out"),
        &Device::Cpu,
        DType::F32,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(m.gist.num_gist_tokens, 2);
}

fn grads_reaching(t: &Trainee, seqs: &[Vec<Segment>], ops: Ops) -> (usize, usize) {
    let (loss, _) = train::optim::loss(&t.model, seqs, Attention::Gist, false, ops).unwrap();
    let store = loss.backward().unwrap();
    let data = t.varmap.data().lock().unwrap();
    let with = data
        .values()
        .filter(|v| {
            store.get(v.as_tensor()).is_some_and(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            })
        })
        .count();
    (with, data.len())
}

#[test]
fn every_weight_gets_a_gradient_with_differentiable_ops_and_not_with_fused_ones() {
    let dir = tempfile::tempdir().unwrap();
    let t = trainee(dir.path());
    let seqs: Vec<_> = data(&t, 64).into_iter().take(4).collect();
    let (with, all) = grads_reaching(&t, &seqs, Ops::Differentiable);
    assert_eq!(with, all, "every parameter has a non-zero gradient");
    // The guard has teeth: fused kernels have no backward, so gradients stop at them.
    let (with, all) = grads_reaching(&t, &seqs, Ops::Fused);
    assert!(
        with < all,
        "fused ops should leave weights without gradient ({with}/{all})"
    );
}

fn snapshot(t: &Trainee) -> HashMap<String, Vec<f32>> {
    t.weights()
        .into_iter()
        .map(|(n, w)| (n, w.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn stage_one_leaves_frozen_weights_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainee(&dir.path().join("init"));
    let cfg = config(64 * 8 * 5, Trainable::Embeddings);
    let seqs = data(&t, cfg.seq_tokens);
    let before = snapshot(&t);
    train::run(
        &mut t,
        &cfg,
        &seqs,
        &[],
        &dir.path().join("out"),
        train::Resume::No,
        |_| {},
    )
    .unwrap();
    let after = snapshot(&t);
    for (name, w) in &before {
        let trained = name == "model.embed_tokens.weight" || name == "lm_head.weight";
        if trained {
            assert_ne!(w, &after[name], "{name} should have trained");
        } else {
            assert!(w == &after[name], "{name} changed while frozen");
        }
    }
}

fn train_cmd(init: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_giststream"));
    c.env("RAYON_NUM_THREADS", "1")
        .args(["train", "--from"])
        .arg(init)
        .arg("--data")
        .arg(texts_dir())
        .arg("--out")
        .arg(out)
        .args([
            "--num-gists",
            "2",
            "--tokens",
            "61440",
            "--batch",
            "8",
            "--micro-batch",
            "4",
        ])
        .args(["--seq-tokens", "96"]);
    c
}

/// `train_cmd` with `extra` flags, and the defaults (checkpoints every 3 steps, lr 3e-3)
/// for those `extra` does not set.
fn train_cmd_with(init: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = train_cmd(init, out);
    for (flag, default) in [("--checkpoint-every", "3"), ("--lr", "3e-3")] {
        if !extra.contains(&flag) {
            c.args([flag, default]);
        }
    }
    c.args(extra);
    c
}

/// `(step, value)` per step of a JSON-lines log in `out`, the last line of each step
/// winning (steps after the last checkpoint of a killed run are logged again when redone).
fn per_step<L: serde::de::DeserializeOwned, T>(
    out: &Path,
    file: &str,
    point: impl Fn(L) -> (usize, T),
) -> Vec<(usize, T)> {
    let mut by_step = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(out.join(file)).unwrap().lines() {
        let (step, v) = point(serde_json::from_str(line).unwrap());
        by_step.insert(step, v);
    }
    by_step.into_iter().collect()
}

/// Training loss per step.
fn losses(out: &Path) -> Vec<(usize, f32)> {
    per_step(out, "train-log.jsonl", |l: train::LogLine| (l.step, l.loss))
}

/// Validation loss per step.
fn valid_losses(out: &Path) -> Vec<(usize, f64)> {
    per_step(out, "valid-log.jsonl", |l: train::ValidLine| {
        (l.step, l.loss)
    })
}

#[test]
fn a_killed_run_resumes_onto_the_same_loss_curve() {
    kill_and_resume(&[]);
}

/// A run with a carried memory (`--memory-span`), killed between documents or inside one,
/// resumes onto the same losses: its data order is a pure function of the steps, and a
/// memory lost with the process is recomputed. At learning rate 0 the recomputed memory
/// is the lost one exactly, so the losses must match to the bit; checkpoints every 2
/// steps of 3-sequence documents fall both inside documents and at their starts.
#[test]
fn a_killed_memory_span_run_resumes_onto_the_same_loss_curve() {
    let spans = [
        "--memory-span",
        "3",
        "--positions",
        "compressed",
        "--lr",
        "0",
        "--checkpoint-every",
        "2",
    ];
    kill_and_resume(&spans);
}

/// Trains with `train_cmd(...)` plus `extra` straight through, and again killed with
/// SIGKILL mid-run and resumed; the two loss curves, validation curves and final weights
/// must be the same.
fn kill_and_resume(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    write_random_model(&init, &common::small_spec()).unwrap();
    // Scored every 4 steps; any text will do for a check of determinism.
    let held = dir.path().join("held-out");
    std::fs::create_dir(&held).unwrap();
    let text = std::fs::read_to_string(texts_dir().join("twain-alonzo-fitz.txt")).unwrap();
    let tail: String = text.chars().skip(text.chars().count() - 8_000).collect();
    std::fs::write(held.join("tail.txt"), tail).unwrap();
    let held = held.to_str().unwrap().to_string();
    let valid = [
        "--valid",
        &held,
        "--valid-every",
        "4",
        "--valid-tokens",
        "400",
    ];
    let train_cmd = |init: &Path, out: &Path| {
        let mut c = train_cmd_with(init, out, extra);
        c.args(valid);
        c
    };

    let straight = dir.path().join("straight");
    let st = train_cmd(&init, &straight).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    let killed = dir.path().join("killed");
    let mut child = train_cmd(&init, &killed).spawn().unwrap();
    // Kill it (SIGKILL) once it is well into the run, between checkpoints or not.
    let log = killed.join("train-log.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let n = std::fs::read_to_string(&log)
            .map(|s| s.lines().count())
            .unwrap_or(0);
        if n >= 10 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let steps_before_kill = losses(&killed).len();
    let total = losses(&straight).len();
    assert!(
        steps_before_kill < total,
        "the run finished before it could be killed"
    );
    // Without --resume, the checkpoint is not overwritten.
    let refused = train_cmd(&init, &killed).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--resume"));
    // Without the --valid flags: the checkpoint keeps the validation settings.
    let resumed = train_cmd_with(&init, &killed, extra)
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );

    let (a, b) = (losses(&straight), losses(&killed));
    assert_eq!(a.len(), b.len());
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-6,
            "step {sa}: {la} uninterrupted vs {lb} resumed"
        );
    }
    let (a, b) = (valid_losses(&straight), valid_losses(&killed));
    assert_eq!(
        a.iter().map(|p| p.0).collect::<Vec<_>>(),
        b.iter().map(|p| p.0).collect::<Vec<_>>(),
        "the resumed run scored the held-out text at other steps"
    );
    assert!(a.len() >= 3, "{a:?}");
    for ((step, la), (_, lb)) in a.iter().zip(&b) {
        assert!(
            (la - lb).abs() <= 1e-6,
            "validation at step {step}: {la} uninterrupted vs {lb} resumed"
        );
    }
    let wa = std::fs::read(straight.join("model.safetensors")).unwrap();
    let wb = std::fs::read(killed.join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ after resume");
}

/// A new model in `dir` (compressed positions) and a run of `steps` steps with a memory
/// span of 3 sequences.
fn span_run(dir: &Path, steps: u64) -> (Trainee, TrainConfig) {
    let mut t = trainee(&dir.join("init"));
    t.model.gist.positions = giststream::model::config::PositionScheme::Compressed;
    let mut cfg = config(64 * 8 * steps, Trainable::All);
    cfg.memory_span = 3;
    (t, cfg)
}

/// The bundled texts past their first 60,000 characters: held out from `data`.
fn held_out(t: &Trainee, seq_tokens: usize) -> Vec<Vec<Segment>> {
    sequences_of(t, seq_tokens, |s| s.chars().skip(60_000).collect())
}

/// With held-out documents, a run scores them before its first step, every `every` steps
/// and after its last, and logs each point to valid-log.jsonl. Each point is what scoring
/// the weights of that moment gives, and on held-out text the curve falls as the model
/// learns. A memory-span run reads each validation document as it trains: 3 consecutive
/// sequences of a book, the later ones after the gists of the earlier.
#[test]
fn a_run_logs_a_falling_validation_curve_on_held_out_text() {
    use giststream::train::validation;
    let dir = tempfile::tempdir().unwrap();
    let (mut t, mut cfg) = span_run(dir.path(), 25);
    let valid = validation::documents(
        &held_out(&t, cfg.seq_tokens),
        3,
        t.model.bos_token_id(),
        10_000,
    );
    assert_eq!(valid.len(), 2, "one document per held-out book");
    assert!(valid.iter().all(|d| d.len() == 3));
    cfg.validation = Some(train::ValidationConfig {
        data: dir.path().join("held-out"),
        every: 10,
        tokens: 10_000,
    });
    let (start, tokens) = validation::score(&t.model, &valid, &cfg).unwrap();
    let out = dir.path().join("out");
    let mut reported = Vec::new();
    let seqs = data(&t, cfg.seq_tokens);
    train::run(&mut t, &cfg, &seqs, &valid, &out, train::Resume::No, |e| {
        if let train::Event::Validated(v) = e {
            reported.push(v.clone())
        }
    })
    .unwrap();
    let logged: Vec<train::ValidLine> = std::fs::read_to_string(out.join("valid-log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<usize> = logged.iter().map(|v| v.step).collect();
    assert_eq!(
        steps,
        [0, 10, 20, 25],
        "before, every 10 steps, after the last"
    );
    assert_eq!(reported.len(), logged.len());
    let (first, last) = (&logged[0], &logged[3]);
    assert!(
        (first.loss - start).abs() < 1e-6,
        "{} vs {start}",
        first.loss
    );
    assert_eq!(first.tokens, tokens);
    let (end, _) = validation::score(&t.model, &valid, &cfg).unwrap();
    assert!((last.loss - end).abs() < 1e-6, "{} vs {end}", last.loss);
    assert!((last.perplexity - last.loss.exp()).abs() < 1e-9);
    assert!(
        last.loss < first.loss - 1.0,
        "held-out loss {:.3} -> {:.3}",
        first.loss,
        last.loss
    );
}

/// A 12-step run (checkpoints every 4 steps) stopped when step `stop` starts, as a kill
/// would: its output folder, and its training sequences for the resume.
fn stopped_run(dir: &Path, stop: usize) -> (std::path::PathBuf, Vec<Vec<Segment>>) {
    let mut t = trainee(&dir.join("init"));
    let mut cfg = config(64 * 8 * 12, Trainable::All);
    cfg.checkpoint_every = 4;
    let seqs = data(&t, cfg.seq_tokens);
    let out = dir.join("out");
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        train::run(&mut t, &cfg, &seqs, &[], &out, train::Resume::No, |e| {
            if let train::Event::Step(l, _) = e {
                assert!(l.step < stop, "stopped here");
            }
        })
    }));
    assert!(stopped.is_err());
    (out, seqs)
}

/// Validation added when a run is resumed (the run was started without it): the
/// checkpoint's settings are kept, the held-out set is scored from then on, and the curve
/// starts at the step the run resumed from.
#[test]
fn validation_can_be_added_when_a_run_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    // Stopped after step 9 (the checkpoint holds step 8), as a kill would.
    let (out, seqs) = stopped_run(dir.path(), 9);
    assert!(!out.join("valid-log.jsonl").exists());

    let (mut t, mut cfg) = train::resume_trainee(&out, &Device::Cpu).unwrap();
    cfg.validation = Some(train::ValidationConfig {
        data: dir.path().join("held-out"),
        every: 3,
        tokens: 500,
    });
    let valid = giststream::train::validation::documents(
        &held_out(&t, cfg.seq_tokens),
        1,
        t.model.bos_token_id(),
        500,
    );
    train::run(
        &mut t,
        &cfg,
        &seqs,
        &valid,
        &out,
        train::Resume::Continue,
        |_| {},
    )
    .unwrap();
    let steps: Vec<usize> = valid_losses(&out).iter().map(|p| p.0).collect();
    assert_eq!(
        steps,
        [8, 9, 12],
        "from the resumed step, every 3, and the last"
    );
    assert_eq!(losses(&out).last().unwrap().0, 12);
    let sets = per_step(&out, "valid-log.jsonl", |l: train::ValidLine| {
        (l.step, l.data)
    });
    assert_eq!(
        sets.last().unwrap().1,
        dir.path().join("held-out"),
        "each point names its set"
    );
}

/// A run stopped early is finished where its checkpoint stands (`train --finish`): no
/// step is trained, the model written holds the checkpoint's weights, and the checkpoint
/// records the plan as ended, so a later resume trains nothing either. It used to loop for
/// ever on a stage with no steps left (hence the guard). A folder with no checkpoint has
/// no run to finish. Finishing reads no training data (the CLI's `--data` is optional
/// with `--finish`).
#[test]
fn a_run_stopped_early_is_finished_where_its_checkpoint_stands() {
    let dir = tempfile::tempdir().unwrap();
    let (out, seqs) = stopped_run(dir.path(), 5);
    let ckpt_weights =
        candle_core::safetensors::load(out.join("checkpoint/model.safetensors"), &Device::Cpu)
            .unwrap();
    let finish = |resume| {
        let (tx, rx) = std::sync::mpsc::channel();
        let out = out.clone();
        let seqs = match resume {
            train::Resume::Finish => Vec::new(),
            _ => seqs.clone(),
        };
        std::thread::spawn(move || {
            let (mut t, cfg) = train::resume_trainee(&out, &Device::Cpu).unwrap();
            let done = train::run(&mut t, &cfg, &seqs, &[], &out, resume, |_| {});
            tx.send(done.map(|p| (p.step, p.stage)).map_err(|e| e.to_string()))
                .unwrap();
        });
        rx.recv_timeout(std::time::Duration::from_secs(120))
            .expect("the run ends")
            .unwrap()
    };
    let log = || std::fs::read_to_string(out.join("train-log.jsonl")).unwrap();
    let logged = log();
    assert_eq!(finish(train::Resume::Finish), (4, 1));
    assert_eq!(log(), logged, "no step trained");
    let model =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut compared = 0;
    for (name, w) in &ckpt_weights {
        if let Some(m) = model.get(name) {
            let f32 = |t: &candle_core::Tensor| t.to_dtype(DType::F32).unwrap();
            assert_eq!(common::max_abs_diff(&f32(m), &f32(w)), 0.0, "{name}");
            compared += 1;
        }
    }
    assert!(compared > 0, "the model holds the checkpoint's tensors");
    assert_eq!(
        finish(train::Resume::Continue),
        (4, 1),
        "the plan stays ended"
    );

    let (mut t, cfg) = (
        trainee(&dir.path().join("init2")),
        config(64 * 8, Trainable::All),
    );
    let err = train::run(
        &mut t,
        &cfg,
        &seqs,
        &[],
        &dir.path().join("empty"),
        train::Resume::Finish,
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("no run to finish"), "{err}");

    // The CLI: `--finish` without `--data` writes the model again from the ended plan, and
    // on a folder with no checkpoint names that, not a missing flag.
    std::fs::remove_file(out.join("model.safetensors")).unwrap();
    let cli = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_giststream"))
            .env("RAYON_NUM_THREADS", "1")
            .args(["train", "--finish", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let done = cli(&out);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(log(), logged, "no step trained");
    assert!(
        out.join("model.safetensors").exists(),
        "the model is written"
    );
    let refused = cli(&dir.path().join("empty2"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("holds no checkpoint"), "{stderr}");
}

/// Held-out text must be held out: `--valid` naming the training folder is refused.
#[test]
fn validation_on_the_training_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    write_random_model(&init, &common::small_spec()).unwrap();
    let out = train_cmd(&init, &dir.path().join("out"))
        .arg("--valid")
        .arg(texts_dir().join("."))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the training folder"), "{err}");
}

/// With a memory span, sequences after a document's first read the gists of the earlier
/// ones (`train::memory`), and the model still learns.
#[test]
fn loss_falls_with_a_memory_span() {
    let dir = tempfile::tempdir().unwrap();
    let (mut t, cfg) = span_run(dir.path(), 45);
    assert!(train::memory::span_starts(&data(&t, cfg.seq_tokens), 3).len() > 100);
    assert_loss_falls(&mut t, &cfg, 45, &dir.path().join("out"));
}

/// Trains `t` on the bundled text for `steps` steps into `out`; the mean loss of the last
/// five steps must be well below that of the first five.
fn assert_loss_falls(t: &mut Trainee, cfg: &TrainConfig, steps: usize, out: &Path) {
    let seqs = data(t, cfg.seq_tokens);
    let mut losses = Vec::new();
    train::run(t, cfg, &seqs, &[], out, train::Resume::No, |e| {
        if let train::Event::Step(l, _) = e {
            losses.push(l.loss)
        }
    })
    .unwrap();
    assert_eq!(losses.len(), steps);
    let first: f32 = losses[..5].iter().sum::<f32>() / 5.0;
    let last: f32 = losses[steps - 5..].iter().sum::<f32>() / 5.0;
    // From about ln(262) = 5.6 for a random model to well below.
    assert!(last < first - 1.0, "loss {first} -> {last}");
}

/// A model that keeps the previous sentence visible trains (compressed positions, three
/// key copies in the differentiable forward), with a memory span too (the memory then
/// carries each sequence's last sentence to the next).
#[test]
fn loss_falls_with_the_previous_sentence_visible() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainee(&dir.path().join("init"));
    t.model.gist.positions = giststream::model::config::PositionScheme::Compressed;
    t.model.gist.previous_sentence_visible = true;
    let cfg = config(64 * 8 * 45, Trainable::All);
    assert_loss_falls(&mut t, &cfg, 45, &dir.path().join("out"));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/gist.json")).unwrap()).unwrap();
    assert_eq!(saved["previous_sentence_visible"], true);

    let (mut t, cfg) = span_run(&dir.path().join("span"), 45);
    t.model.gist.previous_sentence_visible = true;
    assert_loss_falls(&mut t, &cfg, 45, &dir.path().join("span-out"));
}

/// A model reading BOS at a bounded distance trains (sink key copies in the
/// differentiable forward, their gradient flowing back into BOS's key), alone and with a
/// memory span (the memory's BOS read at each segment's sink).
#[test]
fn loss_falls_with_a_bos_sink() {
    let sink = |t: &mut Trainee| {
        let g = &mut t.model.gist;
        g.positions = giststream::model::config::PositionScheme::Compressed;
        (g.add_bos, g.bos_always_visible) = (true, true);
        g.sink_distance = Some(8);
        g.validate().unwrap();
    };
    let saved = loss_falls_alone_and_at_span(sink);
    assert_eq!(saved["sink_distance"], 8);
}

/// Trains a model set up by `set` alone, then at memory span 3 ([`span_run`]), checking
/// each time that the loss falls. Returns the first run's gist.json.
fn loss_falls_alone_and_at_span(set: impl Fn(&mut Trainee)) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainee(&dir.path().join("init"));
    set(&mut t);
    let cfg = config(64 * 8 * 45, Trainable::All);
    assert_loss_falls(&mut t, &cfg, 45, &dir.path().join("out"));
    let saved =
        serde_json::from_slice(&std::fs::read(dir.path().join("out/gist.json")).unwrap()).unwrap();

    let (mut t, cfg) = span_run(&dir.path().join("span"), 45);
    set(&mut t);
    assert_loss_falls(&mut t, &cfg, 45, &dir.path().join("span-out"));
    saved
}

/// A model fading far keys trains (every group's mask over all its keys in the
/// differentiable forward), alone and with a memory span (the memory's rows faded by the
/// positions they are read from).
#[test]
fn loss_falls_with_far_keys_faded() {
    let fade = |t: &mut Trainee| {
        let g = &mut t.model.gist;
        g.positions = giststream::model::config::PositionScheme::Compressed;
        g.distance_decay = Some(giststream::model::config::DistanceDecay {
            strength: 1.0,
            from: 4,
        });
        g.validate().unwrap();
    };
    let saved = loss_falls_alone_and_at_span(fade);
    assert_eq!(saved["distance_decay"]["from"], 4);
}
