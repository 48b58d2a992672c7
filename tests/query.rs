//! Queries resume from stored states exactly as from the in-process state, and bad input
//! fails clearly without touching the store.

mod common;

use giststream::engine::compress::{compress, Document};
use giststream::engine::whole::{forward, Layout, Mode};
use giststream::model::ops::Ops;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::query::{
    answer, question_segments, question_tokens, reread, score, Placement, Sampling,
    OPEN_QUESTION_TOKENS,
};
use giststream::store::codec::Precision;
use giststream::store::Store;
use giststream::text::tokenize::Segment;
use std::process::Command;

fn greedy(max_tokens: usize) -> Sampling {
    Sampling {
        max_tokens,
        temperature: 0.0,
        top_p: None,
        seed: 1,
        chat_template: true,
    }
}

#[test]
fn a_resumed_query_equals_the_in_process_one() {
    let (_d, model) = common::tiny_model(&RandomSpec::default());
    let text = synthetic_text(9, 7, 11);
    let doc = Document {
        id: "d".into(),
        segments: model.segments(&text).unwrap(),
    };
    let (state, _) = compress(&model, vec![doc], 1).unwrap().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .put("d", 1, &model, &state, &text, Precision::F32)
        .unwrap();
    let (_, loaded) = store.load("d", &model).unwrap();

    let q = "Where did the river go?";
    let a = answer(&model, state.clone(), q, &greedy(24), |_| {}).unwrap();
    let b = answer(&model, loaded.clone(), q, &greedy(24), |_| {}).unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.tokens, b.tokens);
    let mut streamed = String::new();
    let c = answer(&model, loaded.clone(), q, &greedy(24), |p| {
        streamed.push_str(p)
    })
    .unwrap();
    assert_eq!(streamed, c.text, "the streamed pieces add up to the answer");

    let s1 = score(&model, state.clone(), Some(q), true, "The old garden.").unwrap();
    let s2 = score(&model, loaded.clone(), Some(q), true, "The old garden.").unwrap();
    assert_eq!(s1.logprob, s2.logprob);
    let s3 = score(&model, loaded, None, true, "The old garden.").unwrap();
    assert_eq!(
        s3.tokens,
        s1.tokens - 1,
        "without a question the first token is not scored"
    );
    assert!(s1.perplexity.is_finite() && s1.perplexity > 1.0);
}

#[test]
fn a_question_stays_whole_for_the_answer_unless_it_is_long() {
    let (_d, model) = common::tiny_model(&RandomSpec::default());
    // Three sentences: as a document they would close twice, and the answer would read
    // only their gists.
    let q = "Where did the river go? It was here. Now it is gone.";
    let segments = question_segments(&model, q, true).unwrap();
    assert!(segments.len() >= 2, "the question is several sentences");
    assert!(
        segments.iter().all(|s| !s.close),
        "every sentence stays open"
    );
    let tokens: usize = segments.iter().map(|s| s.tokens.len()).sum();
    assert_eq!(tokens, question_tokens(&model, q, true).unwrap().len());

    let long = "The river went on and on past the old mill. ".repeat(80);
    let segments = question_segments(&model, &long, true).unwrap();
    let tokens: usize = segments.iter().map(|s| s.tokens.len()).sum();
    assert!(tokens > OPEN_QUESTION_TOKENS);
    assert!(
        segments.iter().filter(|s| s.close).count() > 1,
        "a long question goes in sentence by sentence"
    );
}

#[test]
fn bad_queries_fail_clearly_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let other = dir.path().join("other");
    write_random_model(
        &other,
        &RandomSpec {
            seed: 3,
            ..RandomSpec::default()
        },
    )
    .unwrap();
    let file = dir.path().join("doc.txt");
    std::fs::write(&file, synthetic_text(5, 6, 2)).unwrap();
    let store = dir.path().join("store");
    let run = |args: &[&str], m: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_giststream"))
            .env("RAYON_NUM_THREADS", "1")
            .args(args)
            .arg("--model")
            .arg(m)
            .arg("--store")
            .arg(&store)
            .output()
            .unwrap()
    };
    let ok = Command::new(env!("CARGO_BIN_EXE_giststream"))
        .args(["compress", "--model"])
        .arg(&model)
        .arg("--store")
        .arg(&store)
        .arg(&file)
        .output()
        .unwrap();
    assert!(ok.status.success());
    let snapshot = || {
        let s = Store::open(&store).unwrap();
        ["meta", "states", "texts"].map(|t| s.raw(t, "doc", 0).unwrap())
    };
    let before = snapshot();
    for (args, m, expect) in [
        (
            vec!["query", "--doc", "missing", "Why?"],
            &model,
            "no document \"missing\"",
        ),
        (
            vec!["query", "--doc", "doc", "   "],
            &model,
            "question is empty",
        ),
        (
            vec!["query", "--doc", "doc", "Why?"],
            &other,
            "another model",
        ),
    ] {
        let out = run(&args, m);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    assert_eq!(
        before,
        snapshot(),
        "failed queries leave the store as it was"
    );
    let good = run(
        &[
            "query",
            "--doc",
            "doc",
            "Why?",
            "--max-tokens",
            "5",
            "--json",
        ],
        &model,
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert!(v["tokens"].as_u64().unwrap() <= 5);
}

#[test]
fn a_chat_template_in_the_model_directory_wraps_the_question() {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &RandomSpec::default()).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %} [assistant]{% endif %}"}"#,
    )
    .unwrap();
    let model = common::load_model(dir.path());
    let encode = |t: &str| model.tokenizer.encode(t).unwrap().0;
    assert_eq!(
        question_tokens(&model, " Who? ", true).unwrap(),
        encode("[user] Who? [assistant]"),
        "rendered, with the template's BOS dropped (the document has one)"
    );
    assert_eq!(
        question_tokens(&model, " Who? ", false).unwrap(),
        encode("\n\n Who? ")
    );
}

#[test]
fn a_question_about_a_document_with_nothing_encoded_yet_warns() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_random_model(&model_dir, &RandomSpec::default()).unwrap();
    let model = common::load_model(&model_dir);
    let store_dir = dir.path().join("store");
    {
        let store = Store::open(&store_dir).unwrap();
        // Part 0 of a document sent in parts, with no sentence end yet: its text waits in
        // the carry and nothing is encoded.
        let part = giststream::store::parts::Part {
            id: "open".into(),
            version: 1,
            part: 0,
            last: false,
            text: "a first sentence still without its end".into(),
            source: None,
            attributes: Default::default(),
        };
        giststream::store::parts::apply_parts(&model, &store, &[part], Precision::F32, 1).unwrap();
        assert_eq!(store.meta("open").unwrap().unwrap().tokens, 0);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_giststream"))
        .args([
            "query",
            "--max-tokens",
            "2",
            "--id",
            "open",
            "what is it?",
            "--model",
        ])
        .arg(&model_dir)
        .arg("--store")
        .arg(&store_dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("none of its text is encoded"),
        "{err}"
    );
}

#[test]
fn a_reread_answer_is_greedy_decoding_with_every_token_in_view() {
    let (_d, mut model) = common::tiny_model(&RandomSpec::default());
    let text = synthetic_text(5, 9, 3);
    let q = "Where did the river go?";
    let a = reread(&model, &text, q, Placement::Before, &greedy(6), |_| {}).unwrap();

    // The reference: one causal forward over the text and the question, the best
    // non-gist token appended, again, as a model without gists would decode.
    let mut ids: Vec<u32> = all_tokens(model.segments(&text).unwrap());
    ids.extend(all_tokens(question_segments(&model, q, true).unwrap()));
    let (read, mut expected) = (ids.len(), Vec::new());
    while expected.len() < 6 {
        let doc = vec![Segment {
            tokens: ids.clone(),
            bytes: 0..0,
            close: false,
        }];
        let layout = Layout::new(&model, std::slice::from_ref(&doc), false);
        let logits = forward(&model, &layout, Mode::Causal, Ops::Fused).unwrap();
        let last: Vec<f32> = logits.get(ids.len() - 1).unwrap().to_vec1().unwrap();
        let next = (0..last.len() as u32)
            .filter(|t| !model.gist.gist_token_ids.contains(t))
            .max_by(|&x, &y| last[x as usize].total_cmp(&last[y as usize]))
            .unwrap();
        if Some(next) == model.eos_token_id() {
            break;
        }
        expected.push(next);
        ids.push(next);
    }
    assert!(read > 40, "the text is long enough to span many sentences");
    assert!(!expected.is_empty(), "something to compare");
    assert_eq!(a.text, model.tokenizer.decode(&expected).unwrap());
    assert_eq!(a.tokens, expected.len());

    // Past the trained positions full attention is undefined: refused, naming both counts.
    model.llama.cfg.max_positions = Some(read);
    let err = reread(&model, &text, q, Placement::Before, &greedy(6), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("{read} tokens")) && err.contains(&format!("{read} positions")),
        "{err}"
    );
    let err = reread(&model, &text, q, Placement::InTurn, &greedy(6), |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

/// All tokens of a run of segments, in order.
fn all_tokens(segments: Vec<Segment>) -> Vec<u32> {
    segments.into_iter().flat_map(|s| s.tokens).collect()
}
