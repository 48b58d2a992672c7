//! Re-index jobs: new states equal fresh compression with the new settings, a job killed
//! at any moment resumes to the same result, failures are skipped and reported, and
//! queries keep working while a job runs inside a serving process.

mod common;

use giststream::engine::compress::{compress, Document};
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec, SplitMix};
use giststream::model::GistModel;
use giststream::serve::client::Client;
use giststream::store::codec::{encode, Precision};
use giststream::store::Store;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn giststream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_giststream"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Setup {
    dir: tempfile::TempDir,
    old: PathBuf,
    new: PathBuf,
    store: PathBuf,
    texts: Vec<(String, String)>,
}

/// A store of `n` documents compressed by model "old" (N_g = 4); model "new" has N_g = 2
/// and other weights.
fn setup(n: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    let new = dir.path().join("new");
    write_random_model(&old, &RandomSpec::default()).unwrap();
    write_random_model(
        &new,
        &RandomSpec {
            num_gists: 2,
            seed: 77,
            ..RandomSpec::default()
        },
    )
    .unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let texts: Vec<(String, String)> = (0..n)
        .map(|i| {
            let t = synthetic_text(3 + i % 9, 7, 500 + i as u64);
            let id = format!("doc{i:02}");
            std::fs::write(files.join(format!("{id}.txt")), &t).unwrap();
            (id, t)
        })
        .collect();
    let store = dir.path().join("store");
    let mut c = giststream();
    c.args(["compress", "--batch", "4", "--model"])
        .arg(&old)
        .arg("--store")
        .arg(&store);
    for (id, _) in &texts {
        c.arg(files.join(format!("{id}.txt")));
    }
    ok(c.output().unwrap());
    Setup {
        dir,
        old,
        new,
        store,
        texts,
    }
}

fn reindex(s: &Setup, model: &Path, extra: &[&str]) -> Command {
    let mut c = giststream();
    c.args(["reindex", "--batch", "1", "--pipeline"])
        .arg(s.dir.path().join("none.toml"))
        .arg("--store")
        .arg(&s.store)
        .arg("--model")
        .arg(model)
        .args(extra);
    c
}

/// The f32 record of compressing `text` fresh with `model`, at `precision`.
fn fresh(model: &GistModel, text: &str, precision: Precision) -> Vec<u8> {
    let doc = Document {
        id: "d".into(),
        segments: model.segments(text).unwrap(),
    };
    let (state, _) = compress(model, vec![doc], 1).unwrap().remove(0);
    encode(&state, precision).unwrap()
}

/// The stored state of `id` is byte-identical to compressing `text` fresh with `model`.
fn assert_fresh(store: &Store, id: &str, model: &GistModel, text: &str, precision: Precision) {
    assert_eq!(
        store.raw("states", id, 0).unwrap().unwrap(),
        fresh(model, text, precision),
        "{id}"
    );
}

#[test]
fn new_states_equal_fresh_compression_with_the_new_model_and_precision() {
    let s = setup(10);
    let (old, new) = (common::load_model(&s.old), common::load_model(&s.new));
    // A dry run changes nothing and plans every document.
    let plan: serde_json::Value =
        serde_json::from_str(&ok(reindex(&s, &s.new, &["--dry-run"]).output().unwrap())).unwrap();
    assert_eq!(plan["total_documents"], 10);
    assert_eq!(plan["state"], "planned");
    assert!(plan["eta_seconds"].as_f64().unwrap() > 0.0);
    {
        let store = Store::open(&s.store).unwrap();
        for (id, t) in &s.texts {
            let m = store.meta(id).unwrap().unwrap();
            assert_eq!(m.fingerprint, format!("{:016x}", old.fingerprint));
            assert_fresh(&store, id, &old, t, Precision::F32);
        }
    }
    // A filter: only version 1 documents with ids doc0*.
    ok(reindex(&s, &s.new, &["--where", "id=doc0*,version=1"])
        .output()
        .unwrap());
    {
        let store = Store::open(&s.store).unwrap();
        for (id, t) in &s.texts {
            let (model, n_g) = if id.starts_with("doc0") {
                (&new, 2)
            } else {
                (&old, 4)
            };
            let m = store.meta(id).unwrap().unwrap();
            assert_eq!(m.num_gists, n_g, "{id}");
            assert_fresh(&store, id, model, t, Precision::F32);
            assert_eq!(store.text(id).unwrap(), *t);
        }
        assert_eq!(
            store.old_generation_len(),
            0,
            "the old generation is dropped at the end"
        );
    }
    // The rest, to int8, keeping the old generation.
    ok(reindex(&s, &s.new, &["--precision", "int8", "--keep-old"])
        .output()
        .unwrap());
    let store = Store::open(&s.store).unwrap();
    for (id, t) in &s.texts {
        let m = store.meta(id).unwrap().unwrap();
        assert_eq!((m.num_gists, m.precision), (2, Precision::Int8), "{id}");
        assert_fresh(&store, id, &new, t, Precision::Int8);
    }
    assert_eq!(store.old_generation_len(), 10);
}

#[test]
fn a_job_killed_at_any_moment_resumes_to_the_same_result() {
    let s = setup(40);
    let (old, new) = (common::load_model(&s.old), common::load_model(&s.new));
    let started = std::time::Instant::now();
    ok(reindex(&s, &s.new, &[]).output().unwrap());
    let span = started.elapsed().as_millis() as u64;
    let mut rng = SplitMix(0x5eed ^ span);
    // Kills at random moments of a job's span; a kill that lands before the first write
    // or after the last proves little, so rounds go on (up to 30) until three landed
    // mid-job. The span is measured once, and a loaded machine stretches later jobs.
    let (mut mid, mut rounds) = (0, 0);
    for round in 0..30 {
        if mid >= 3 {
            break;
        }
        rounds += 1;
        // Alternate the target, so every round has work to interrupt.
        let target = if round % 2 == 0 { &s.old } else { &s.new };
        let mut child = reindex(&s, target, &[])
            .stderr(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            rng.next_u64() % span.max(1),
        ));
        child.kill().ok(); // SIGKILL
        child.wait().unwrap();
        let store = Store::open(&s.store).unwrap();
        let mut at_old = 0;
        for (id, t) in &s.texts {
            let record = store.raw("states", id, 0).unwrap().unwrap();
            let m = store.meta(id).unwrap().unwrap();
            if m.num_gists == 4 {
                at_old += 1;
                assert_eq!(record, fresh(&old, t, Precision::F32), "{id}");
            } else {
                assert_eq!(record, fresh(&new, t, Precision::F32), "{id}");
            }
        }
        mid += usize::from(at_old > 0 && at_old < s.texts.len());
    }
    assert!(mid >= 3, "only {mid} of {rounds} kills landed mid-job");
    // Restarted to the end: every document at the new model, the old generation dropped.
    ok(reindex(&s, &s.new, &[]).output().unwrap());
    let store = Store::open(&s.store).unwrap();
    for (id, t) in &s.texts {
        assert_fresh(&store, id, &new, t, Precision::F32);
    }
    assert_eq!(store.old_generation_len(), 0);
}

#[test]
fn a_document_that_fails_is_reported_and_the_rest_complete() {
    let s = setup(6);
    let (old, new) = (common::load_model(&s.old), common::load_model(&s.new));
    {
        let store = Store::open(&s.store).unwrap();
        store.put_raw("texts", "doc03", 0, b"garbage").unwrap();
    }
    let out = reindex(&s, &s.new, &[]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("doc03") && err.contains("text"), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["done_documents"], 5);
    let store = Store::open(&s.store).unwrap();
    for (id, t) in &s.texts {
        let model = if id == "doc03" { &old } else { &new };
        assert_fresh(&store, id, model, t, Precision::F32);
    }
}

#[test]
fn queries_keep_working_while_a_job_runs_in_the_serving_process() {
    let s = setup(40);
    let new = common::load_model(&s.new);
    let mut server = giststream()
        .args(["api", "--allow-writes"])
        .arg("--model")
        .arg(&s.old)
        .arg("--store")
        .arg(&s.store)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let client = loop {
        if let Some(c) = Client::discover(&s.store) {
            break c;
        }
        assert!(started.elapsed().as_secs() < 60);
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // Queries in a loop while the job runs: each must be answered, from the old state (the
    // serving model) or refused as another model's once switched, never a broken state.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let querier = {
        let stop = stop.clone();
        let store = s.store.clone();
        std::thread::spawn(move || {
            let (mut answered, mut switched) = (0, 0);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("doc{:02}", i % 40);
                i += 1;
                let out = Command::new(env!("CARGO_BIN_EXE_giststream"))
                    .args([
                        "query",
                        "--max-tokens",
                        "2",
                        "--doc",
                        &id,
                        "who?",
                        "--store",
                    ])
                    .arg(&store)
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                if out.status.success() {
                    answered += 1;
                } else {
                    assert!(
                        err.contains("another model") && err.contains("409"),
                        "{err}"
                    );
                    switched += 1;
                }
            }
            (answered, switched)
        })
    };
    let out = reindex(&s, &s.new, &[]).output().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answered, switched) = querier.join().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&ok(out).into_bytes()).unwrap();
    assert_eq!(report["state"], "done");
    assert_eq!(report["done_documents"], 40);
    assert!(answered + switched > 0);
    assert!(!client.jobs().unwrap().is_empty());
    // The job is found by its id, as POST /v1/reindex answered it.
    let job = client.job(report["job"].as_str().unwrap()).unwrap();
    assert_eq!((job.state.as_str(), job.done_documents), ("done", 40));
    let pid = server.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(server.wait().unwrap().success());
    let store = Store::open(&s.store).unwrap();
    for (id, t) in &s.texts {
        assert_fresh(&store, id, &new, t, Precision::F32);
    }
}
