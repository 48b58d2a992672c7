//! The JSON Schemas in schemas/ describe what we actually write and read.

use giststream::model::random::{write_random_model, RandomSpec};
use serde_json::Value;
use std::path::PathBuf;

fn schema(name: &str) -> jsonschema::Validator {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(name);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&json).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{instance}: {errors:?}");
}

#[test]
fn gist_json_matches_its_schema_both_ways() {
    let v = schema("gist.schema.json");
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &RandomSpec::default()).unwrap();
    let written: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("gist.json")).unwrap()).unwrap();
    assert_valid(&v, &written);
    // Every optional setting written, and the shipped adapter's file.
    let dir2 = tempfile::tempdir().unwrap();
    let all = RandomSpec {
        positions: giststream::model::config::PositionScheme::Compressed,
        previous_sentence_visible: true,
        bos_always_visible: true,
        sink_distance: Some(512),
        ..RandomSpec::default()
    };
    write_random_model(dir2.path(), &all).unwrap();
    let full: Value =
        serde_json::from_slice(&std::fs::read(dir2.path().join("gist.json")).unwrap()).unwrap();
    for key in ["positions", "previous_sentence_visible", "sink_distance"] {
        assert!(full.get(key).is_some(), "{key} written");
    }
    assert_valid(&v, &full);
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-gist/gist.json");
    assert_valid(
        &v,
        &serde_json::from_slice(&std::fs::read(shipped).unwrap()).unwrap(),
    );
    let mut zero = full;
    zero["sink_distance"] = 0.into();
    assert!(!v.is_valid(&zero));
    // A typo is caught by the schema and by our reader alike.
    let mut typo = written.clone();
    typo["num_gist_token"] = typo["num_gist_tokens"].clone();
    assert!(!v.is_valid(&typo));
    assert!(serde_json::from_value::<giststream::model::config::GistConfig>(typo).is_err());
    let mut bad_mode = written;
    bad_mode["segmentation"]["mode"] = "uax".into();
    assert!(!v.is_valid(&bad_mode));
    assert!(serde_json::from_value::<giststream::model::config::GistConfig>(bad_mode).is_err());
}

#[test]
fn compress_reports_and_bench_measurements_match_their_schemas() {
    let report = giststream::engine::compress::CompressReport {
        id: "a.txt".into(),
        tokens: 100,
        sentences: 4,
        gist_tokens: 16,
        compression_ratio: 6.25,
        kv_bytes_full: 1000,
        kv_bytes_gist: 160,
        seconds: 0.5,
    };
    assert_valid(
        &schema("compress-report.schema.json"),
        &serde_json::to_value(&report).unwrap(),
    );
    let setup = giststream::bench::Setup {
        shape: giststream::bench::Shape::Paper,
        model_dir: None,
        device: &candle_core::Device::Cpu,
        dtype: candle_core::DType::F32,
        incremental: None,
        real: None,
        train_steps: 1,
    };
    let m = giststream::bench::measure(giststream::bench::ForwardPath::Parallel, 64, 1, &setup)
        .unwrap();
    assert_valid(
        &schema("bench-measurement.schema.json"),
        &serde_json::to_value(&m).unwrap(),
    );
    // Training steps timed back to back: each one's seconds, the median as the result.
    let setup = giststream::bench::Setup {
        train_steps: 3,
        ..setup
    };
    let m = giststream::bench::measure(
        giststream::bench::ForwardPath::TrainBlockwise,
        64,
        1,
        &setup,
    )
    .unwrap();
    assert_eq!(m.step_seconds.len(), 3);
    let mut sorted = m.step_seconds.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(m.seconds, sorted[1]);
    assert_valid(
        &schema("bench-measurement.schema.json"),
        &serde_json::to_value(&m).unwrap(),
    );
}

#[test]
fn the_document_schema_and_the_parser_agree() {
    use giststream::ingest::message::parse;
    let v = schema("document.schema.json");
    let cases = [
        r#"{"id": "a", "text": "Hello."}"#,
        r#"{"id": "a", "version": 2, "part": 1, "final": false, "text": "x", "metadata": {"k": 1}}"#,
        r#"{"id": "a", "part": 3, "final": true, "text": ""}"#,
        r#"{"id": "a", "text": ""}"#,
        r#"{"id": "a", "part": 2, "final": false, "text": ""}"#,
        r#"{"id": "", "text": "x"}"#,
        r#"{"text": "x"}"#,
        r#"{"id": "a"}"#,
        r#"{"id": "a", "text": "x", "extra": true}"#,
        r#"{"id": "a", "text": "x", "part": -1}"#,
        r#"{"id": "a", "text": "x", "version": 1.5}"#,
        r#"{"id": "a", "text": 7}"#,
        r#"{"id": "a", "text": "x", "metadata": []}"#,
        r#"["id", "a"]"#,
        // The current names; the old ones (`final`, `metadata`) above stay accepted.
        r#"{"id": "a", "version": 2, "part": 1, "last": false, "text": "x", "attributes": {"k": 1}}"#,
        r#"{"id": "a", "part": 3, "last": true, "text": ""}"#,
        r#"{"id": "a", "part": 2, "last": false, "text": ""}"#,
        r#"{"id": "a", "text": "x", "attributes": []}"#,
        r#"{"id": "a", "text": "x", "last": true, "final": true}"#,
        r#"{"id": "a", "text": "x", "attributes": {}, "metadata": {}}"#,
    ];
    for c in cases {
        let json: Value = serde_json::from_str(c).unwrap();
        let parsed = parse(None, Some(c.as_bytes()), usize::MAX);
        assert_eq!(v.is_valid(&json), parsed.is_ok(), "{c}: {parsed:?}");
    }
    let long_id = format!(r#"{{"id": "{}", "text": "x"}}"#, "a".repeat(513));
    assert!(!v.is_valid(&serde_json::from_str(&long_id).unwrap()));
    assert!(parse(None, Some(long_id.as_bytes()), usize::MAX).is_err());
}

/// A real (tiny) run's train-log.jsonl and valid-log.jsonl lines match their schemas, and a
/// line with a misspelt field does not.
#[test]
fn training_logs_match_their_schemas() {
    use giststream::train::{self, TrainConfig};
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &RandomSpec::default()).unwrap();
    let mut t = train::trainee_from_dir(dir.path(), 2, &candle_core::Device::Cpu).unwrap();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/texts/twain-alonzo-fitz.txt"),
    )
    .unwrap();
    // Trained on the opening, scored on the end.
    let head: String = text.chars().take(20_000).collect();
    let tail: String = text.chars().skip(text.chars().count() - 5_000).collect();
    let cut = |s: String| {
        let m = &t.model;
        train::sequences(&[s], &m.tokenizer, &m.gist, m.bos_token_id(), 64).unwrap()
    };
    let (data, held) = (cut(head), cut(tail));
    let valid = train::validation::documents(&held, 1, t.model.bos_token_id(), 200);
    let mut cfg = TrainConfig::scratch(64 * 4 * 3, 1e-3, 4);
    cfg.seq_tokens = 64;
    cfg.micro_batch = 4;
    cfg.validation = Some(train::ValidationConfig {
        data: dir.path().join("held-out"),
        every: 2,
        tokens: 200,
    });
    let out = dir.path().join("out");
    train::run(&mut t, &cfg, &data, &valid, &out, train::Resume::No, |_| {}).unwrap();
    for (file, schema_name, misspelt) in [
        ("train-log.jsonl", "train-log.schema.json", "tokens_per_sec"),
        ("valid-log.jsonl", "valid-log.schema.json", "perplexty"),
    ] {
        let v = schema(schema_name);
        let lines: Vec<Value> = std::fs::read_to_string(out.join(file))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() >= 3, "{file}: {}", lines.len());
        for line in &lines {
            assert_valid(&v, line);
        }
        let mut typo = lines[0].clone();
        typo[misspelt] = 1.into();
        assert!(!v.is_valid(&typo), "{file}: {typo}");
    }
}

/// The question/answer file's schema and its reader agree, line by line.
#[test]
fn the_question_schema_and_the_reader_agree() {
    let v = schema("qa.schema.json");
    let cases = [
        r#"{"document": "A text.", "question": "Why?", "answer": "So."}"#,
        r#"{"document": "A text.", "question": "Why?", "answer": "So.", "key": "so"}"#,
        r#"{"document": "A text.", "question": "Why?", "answer": "So.", "key": null}"#,
        r#"{"document": "A text.", "question": "Why?"}"#,
        r#"{"document": " ", "question": "Why?", "answer": "So."}"#,
        r#"{"document": "A text.", "question": "", "answer": "So."}"#,
        r#"{"document": "A text.", "question": "Why?", "answer": "\n"}"#,
        r#"{"document": "A text.", "question": "Why?", "answer": "So.", "extra": 1}"#,
        r#"{"document": "A text.", "question": "Why?", "answer": 7}"#,
        r#"["A text.", "Why?", "So."]"#,
    ];
    let dir = tempfile::tempdir().unwrap();
    for c in cases {
        let json: Value = serde_json::from_str(c).unwrap();
        let f = dir.path().join("qa.jsonl");
        std::fs::write(&f, c).unwrap();
        let read = giststream::train::qa::read_records(&f);
        assert_eq!(v.is_valid(&json), read.is_ok(), "{c}: {read:?}");
    }
}
