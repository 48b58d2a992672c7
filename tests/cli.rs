//! The `giststream` binary as a user runs it.

mod common;

use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use std::process::Command;

fn giststream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_giststream"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

#[test]
fn compress_reports_every_document_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    std::fs::write(&a, synthetic_text(12, 10, 1)).unwrap();
    std::fs::write(&b, "One short document. It has three sentences. The end.").unwrap();
    let out = common::succeed(
        giststream()
            .args(["compress", "--model"])
            .arg(&model)
            .arg(&a)
            .arg(&b)
            .args(["--json", "--batch", "2"]),
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["sentences"], 12);
    assert_eq!(lines[1]["sentences"], 3);
    for l in &lines {
        let tokens = l["tokens"].as_f64().unwrap();
        let gists = l["gist_tokens"].as_f64().unwrap();
        assert_eq!(gists, 4.0 * l["sentences"].as_f64().unwrap());
        assert!((l["compression_ratio"].as_f64().unwrap() - tokens / gists).abs() < 1e-9);
        assert!(l["kv_bytes_gist"].as_u64().unwrap() < l["kv_bytes_full"].as_u64().unwrap());
    }
    // The table form names the documents.
    let out = giststream()
        .args(["compress", "--model"])
        .arg(&model)
        .arg(&b)
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("R_c") && table.contains("b.txt"), "{table}");
}

#[test]
fn bad_input_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();

    // A file that is not UTF-8 is named, with the offset of the bad byte.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, b"fine so far \xff not").unwrap();
    let out = giststream()
        .args(["compress", "--model"])
        .arg(&model)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.txt") && err.contains("not UTF-8") && err.contains("12"),
        "{err}"
    );

    // A missing model directory says which file it could not read.
    let out = giststream()
        .args(["compress", "--model", "/nonexistent/model", "x.txt"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");

    // A gist.json whose ids disagree with the tokenizer is refused.
    let gist = model.join("gist.json");
    let text = std::fs::read_to_string(&gist)
        .unwrap()
        .replace("258", "300");
    std::fs::write(&gist, text).unwrap();
    let ok = dir.path().join("ok.txt");
    std::fs::write(&ok, "Hello there.").unwrap();
    let out = giststream()
        .args(["compress", "--model"])
        .arg(&model)
        .arg(&ok)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gist.json") && err.contains("tokenizer.json"),
        "{err}"
    );

    // bf16 compute on the CPU is refused with the reason, not a kernel error mid-run.
    let spec_dir = dir.path().join("model2");
    write_random_model(&spec_dir, &RandomSpec::default()).unwrap();
    let out = giststream()
        .args(["compress", "--dtype", "bf16", "--model"])
        .arg(&spec_dir)
        .arg(&ok)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bf16") && err.contains("CPU"), "{err}");
}

/// Inputs no command could honour are refused before any work, naming what was wrong; a
/// store folder that does not exist is not created by reading it.
#[test]
fn input_gaps_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("nowhere");
    let fails = |args: &[&str], expect: &str| {
        let out = giststream().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
    };
    let s = store.to_str().unwrap();
    // A question on a store that need not exist: refused before the store is opened.
    let query = |flag: &str, expect: &str| {
        fails(&["query", "--store", s, "--id", "a", "Why?", flag], expect)
    };
    query(
        "--max-tokens=5000",
        "max_tokens 5000 is over the cap of 4096",
    );
    query("--temperature=-1", "temperature -1");
    query("--top-p=1.5", "top_p 1.5");
    fails(&["docs", "--store", s], "no store at");
    fails(&["inspect", "--store", s, "a"], "no store at");
    assert!(!store.exists(), "reading created the store folder");
    let text = dir.path().join("a.txt");
    std::fs::write(&text, "One sentence. Two.").unwrap();
    let t = text.to_str().unwrap();
    fails(
        &["compress", "--num-gists", "5000", t],
        "5000 is not 1 to 64",
    );
    fails(&["compress", "--precision", "int8", t], "--store");
}

/// An id with control characters is listed escaped, not written raw to the terminal.
#[test]
fn control_characters_in_ids_are_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let file = dir.path().join("a\u{1b}[2Jb.txt");
    std::fs::write(&file, "One sentence. Two.").unwrap();
    common::succeed(
        giststream()
            .arg("compress")
            .arg(&file)
            .arg("--store")
            .arg(&store),
    );
    let out = common::succeed(giststream().arg("docs").arg("--store").arg(&store));
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(!listed.contains('\u{1b}'), "{listed:?}");
    assert!(listed.contains("a\\u{1b}[2Jb"), "{listed:?}");
}

/// `reread` answers from the whole text as the library does, prints the API's answer
/// object with --json, and refuses a text too long to read whole, or sampling no answer
/// could honour, before loading anything.
#[test]
fn reread_answers_from_the_whole_text_and_refuses_an_oversized_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let text = synthetic_text(6, 8, 2);
    let file = dir.path().join("book.txt");
    std::fs::write(&file, &text).unwrap();
    let q = "Who went to the mill?";
    let out = common::succeed(
        giststream()
            .args(["reread", "--max-tokens", "5", "--json", "--model"])
            .arg(&model)
            .arg("--text")
            .arg(&file)
            .arg(q),
    );
    let printed: giststream::query::Answer = serde_json::from_slice(&out.stdout).unwrap();
    let loaded = common::load_model(&model);
    let sampling = giststream::query::Sampling {
        max_tokens: 5,
        temperature: 0.0,
        top_p: None,
        seed: 299_792_458,
        chat_template: true,
    };
    let direct = giststream::query::reread(
        &loaded,
        &text,
        q,
        giststream::query::Placement::Before,
        &sampling,
        |_| {},
    )
    .unwrap();
    assert_eq!(printed.text, direct.text);
    assert_eq!(printed.tokens, direct.tokens);

    // A refusal before anything loads: the model named does not exist.
    let refused = |flags: &[&str], text: &std::path::Path| {
        let out = giststream()
            .args(["reread", "--model", "/nonexistent/model"])
            .args(flags)
            .arg("--text")
            .arg(text)
            .arg(q)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let big = dir.path().join("big.txt");
    std::fs::write(&big, "A sentence. ".repeat(100_000)).unwrap();
    let err = refused(&[], &big);
    assert!(err.contains("big.txt") && err.contains("bytes"), "{err}");
    // Sampling no answer could honour is refused too, as `query` does.
    let err = refused(&["--top-p", "0"], &file);
    assert!(err.contains("top_p 0 is not in (0, 1]"), "{err}");
}
