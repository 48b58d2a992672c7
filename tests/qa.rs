//! Question/answer training over compressed text (`train --qa`): the parallel loss scores
//! exactly what a query reads (the answer after the stored document and the question, on
//! the incremental path), a run's loss falls, and bad files are refused by line.

mod common;

use candle_core::Device;
use giststream::model::config::{DistanceDecay, PositionScheme};
use giststream::model::ops::Ops;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::model::GistModel;
use giststream::train::qa::{self, QaRecord};
use giststream::train::{self, TrainConfig};
use std::path::PathBuf;

/// Documents of synthetic sentences with a made-up fact written in, and a question on it.
fn records(n: usize) -> Vec<QaRecord> {
    let places = ["Velmora", "Dunmere", "Tosburg", "Kelfeld"];
    (0..n)
        .map(|i| {
            let place = places[i % places.len()];
            let text = synthetic_text(3 + i % 5, 6, i as u64);
            let (a, b) = text.split_at(text.len() / 2);
            let cut = a.rfind(". ").map_or(0, |p| p + 2);
            QaRecord {
                document: format!(
                    "{}Anna Kovel was born in {place}. {}{b}",
                    &a[..cut],
                    &a[cut..]
                ),
                question: "Where was Anna Kovel born?".into(),
                answer: format!("Anna Kovel was born in {place}."),
                key: Some(place.into()),
            }
        })
        .collect()
}

fn spec(positions: PositionScheme, num_gists: usize) -> RandomSpec {
    RandomSpec {
        num_gists,
        positions,
        ..RandomSpec::default()
    }
}

/// The answer's mean cross-entropy on the parallel path (answers only, both ops paths)
/// against its negative log-likelihood on the incremental path, per sequence.
fn assert_paths_agree(model: &GistModel, what: &str) {
    for (i, rec) in records(5).iter().enumerate() {
        let seq = qa::encode(model, rec, usize::MAX).unwrap().unwrap();
        let (nll, n) = qa::answer_nll(model, &seq).unwrap();
        let answer = model.tokenizer.encode_text(&rec.answer).unwrap().0.len();
        assert_eq!(
            n,
            answer + usize::from(model.eos_token_id().is_some()),
            "{what}: answer tokens"
        );
        for ops in [Ops::Fused, Ops::Differentiable] {
            let (loss, scored) = qa::loss(model, std::slice::from_ref(&seq), 0.0, ops).unwrap();
            let loss = loss.to_scalar::<f32>().unwrap() as f64;
            let want = nll / n as f64;
            assert!(
                (loss - want).abs() < 1e-4,
                "{what}, record {i}, {ops:?}: parallel {loss} vs incremental {want}"
            );
            assert!(scored > n, "{what}: the documents' tokens are counted too");
        }
    }
}

#[test]
fn the_parallel_answer_loss_is_what_a_query_reads() {
    let cases = [
        ("original", spec(PositionScheme::Original, 2)),
        ("compressed", spec(PositionScheme::Compressed, 2)),
        (
            "compressed, window, BOS sink, fade",
            RandomSpec {
                previous_sentence_visible: true,
                bos_always_visible: true,
                sink_distance: Some(5),
                distance_decay: Some(DistanceDecay {
                    strength: 1.0,
                    from: 12,
                }),
                ..spec(PositionScheme::Compressed, 4)
            },
        ),
    ];
    for (what, spec) in cases {
        let (_dir, model) = common::tiny_model(&spec);
        assert_paths_agree(&model, what);
    }
}

/// The comparison has teeth: the answer read after another document scores differently,
/// so the loss depends on the stored document, not only on the question.
#[test]
fn the_answer_loss_depends_on_the_document() {
    let (_dir, model) = common::tiny_model(&spec(PositionScheme::Compressed, 2));
    let recs = records(2);
    let mut other = recs[0].clone();
    other.document = recs[1].document.clone();
    let score = |r: &QaRecord| {
        let seq = qa::encode(&model, r, usize::MAX).unwrap().unwrap();
        qa::loss(&model, &[seq], 0.0, Ops::Fused)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap()
    };
    let (a, b) = (score(&recs[0]), score(&other));
    assert!((a - b).abs() > 1e-5, "{a} vs {b}");
}

#[test]
fn a_question_run_lowers_the_answer_loss() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    write_random_model(&init, &common::small_spec()).unwrap();
    let mut t = train::trainee_from_dir(&init, 2, &Device::Cpu).unwrap();
    t.model.gist.positions = PositionScheme::Compressed;
    let seqs: Vec<_> = records(16)
        .iter()
        .filter_map(|r| qa::encode(&t.model, r, 1024).unwrap())
        .collect();
    assert_eq!(seqs.len(), 16);
    let answer_loss = |t: &train::Trainee| {
        let (l, _) = qa::loss(&t.model, &seqs, 0.0, Ops::Fused).unwrap();
        l.to_scalar::<f32>().unwrap()
    };
    let before = answer_loss(&t);
    let mut cfg = TrainConfig::scratch(1024 * 4 * 30, 3e-3, 4);
    cfg.seq_tokens = 1024;
    cfg.micro_batch = 2;
    cfg.stages[0].warmup_steps = 3;
    cfg.checkpoint_every = 1000;
    cfg.qa_text_weight = Some(0.5);
    // A question run needs question data; text data is refused, and the other way round.
    let out = dir.path().join("out");
    let err = train::run(&mut t, &cfg, &[], &[], &out, train::Resume::No, |_| {});
    assert!(format!("{:#}", err.unwrap_err()).contains("--qa"));
    let p = train::run_qa(&mut t, &cfg, &seqs, &[], &out, train::Resume::No, |_| {}).unwrap();
    assert_eq!(p.step, 30);
    let after = answer_loss(&t);
    assert!(
        after < before * 0.7,
        "the answers' loss should fall: {before} -> {after}"
    );
    // The written model loads and answers from a stored state.
    let m = common::load_model(&out);
    let results = qa::evaluate(&m, &records(1), qa::Reading::Stored, 4, |_| {}).unwrap();
    assert_eq!(results.len(), 1);
    assert!(results[0].answer_nll.is_some_and(f64::is_finite));
}

#[test]
fn a_bad_line_is_refused_by_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let good = serde_json::to_string(&records(1)[0]).unwrap();
    let cases = [
        ("{\"document\": \"x\"}", "line 2"),
        ("not json", "line 2"),
        (
            "{\"document\": \"A text.\", \"question\": \"Why?\", \"answer\": \"\"}",
            "answer must be",
        ),
        (
            "{\"document\": \" \", \"question\": \"Why?\", \"answer\": \"So.\"}",
            "document is empty",
        ),
    ];
    for (bad, want) in cases {
        let f = dir.path().join("qa.jsonl");
        std::fs::write(&f, format!("{good}\n{bad}\n{good}\n")).unwrap();
        let err = format!("{:#}", qa::read_records(&f).unwrap_err());
        assert!(err.contains(want) && err.contains("line 2"), "{bad}: {err}");
    }
    let f = dir.path().join("long.jsonl");
    std::fs::write(&f, "x".repeat(qa::MAX_LINE_BYTES + 10)).unwrap();
    let err = format!("{:#}", qa::read_records(&f).unwrap_err());
    assert!(err.contains("line 1") && err.contains("longer"), "{err}");
    let f = dir.path().join("ok.jsonl");
    std::fs::write(&f, format!("{good}\n\n{good}\n")).unwrap();
    assert_eq!(qa::read_records(&f).unwrap().len(), 2);
}

/// `train --qa` and `eval-qa` from the command line: a run on a question file, resumed
/// refusing text data, then the questions answered from stored states with the accuracy.
#[test]
fn train_qa_and_eval_qa_run_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init");
    write_random_model(&init, &common::small_spec()).unwrap();
    let file = dir.path().join("qa.jsonl");
    let lines: Vec<String> = records(6)
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let bin = env!("CARGO_BIN_EXE_giststream");
    let train = |extra: &[&str]| {
        let mut c = std::process::Command::new(bin);
        c.args(["train", "--from"])
            .arg(&init)
            .arg("--out")
            .arg(&out);
        c.args([
            "--positions",
            "compressed",
            "--seq-tokens",
            "1024",
            "--batch",
            "2",
        ]);
        c.args([
            "--micro-batch",
            "2",
            "--tokens",
            "4096",
            "--checkpoint-every",
            "1",
        ]);
        c.args(extra);
        c
    };
    let q = file.to_str().unwrap();
    let refused = train(&["--qa", q, "--qa-text-weight=-1"]).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("--qa-text-weight -1"),
        "{err}"
    );
    let done = common::succeed(&mut train(&["--qa", q, "--qa-text-weight", "0.5"]));
    assert!(String::from_utf8_lossy(&done.stdout).contains("trained 2 steps"));
    let texts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/texts");
    let refused = train(&["--resume", "--data", texts.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("--qa"), "{err}");
    let eval = common::succeed(
        std::process::Command::new(bin)
            .args(["eval-qa", "--model"])
            .arg(&out)
            .args(["--qa", q, "--limit", "3", "--max-tokens", "4"]),
    );
    let stdout = String::from_utf8_lossy(&eval.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[3]["questions"], 3);
    assert!(lines[..3].iter().all(|l| l["correct"].is_boolean()));
}
