//! A bounded fuzz pass over what strangers control: Kafka message values (parsed, then
//! stored through the model like real ones), pipeline files, and HTTP API bodies. Inputs
//! are random bytes and mutations of valid ones. What must hold: no panic, no hang (every
//! case within a time bound), and no unbounded memory (the server's peak RSS bounded after
//! every body). The seed is fixed, so CI runs the same cases every time; set
//! `PROPTEST_CASES` to run more.

mod common;

use giststream::ingest::message::parse;
use giststream::ingest::pipeline::Pipeline;
use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::serve::client::Client;
use giststream::store::codec::Precision;
use giststream::store::parts::apply_parts;
use giststream::store::Store;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use std::path::Path;
use std::time::{Duration, Instant};

fn runner(cases: u32) -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(0x6769_7374),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Random bytes, or a valid input with bytes flipped, cut, duplicated or spliced in.
fn mutated(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (
            0..n,
            proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 1..8)
        )
            .prop_map(move |(i, edits)| {
                let mut b = valid[i].clone();
                for (at, byte, how) in edits {
                    let at = if b.is_empty() { 0 } else { at % b.len() };
                    match how {
                        0 if !b.is_empty() => b[at] ^= byte | 1,
                        1 => b.truncate(at),
                        2 => {
                            let tail = b[at..].to_vec();
                            b.extend_from_slice(&tail);
                        }
                        _ => b.insert(at, byte),
                    }
                }
                b
            }),
    ]
}

/// Well-formed messages with arbitrary field values: any Unicode text and id, any
/// version, a few parts, either end.
fn structured_messages() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just("d".to_string()), "\\PC{0,12}", any::<String>()],
        prop_oneof![any::<String>(), "[A-Za-z .!?\\n]{0,300}", "\\PC{0,200}"],
        any::<u64>(),
        0u32..3,
        any::<bool>(),
    )
        .prop_map(|(id, text, version, part, last)| {
            serde_json::to_vec(&serde_json::json!({
                "id": id, "text": text, "version": version, "part": part, "last": last
            }))
            .unwrap()
        })
}

/// Well-formed queries with arbitrary values.
fn structured_queries() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just("doc".to_string()), any::<String>()],
        prop::option::of(any::<String>()),
        prop::option::of("[a-z .]{0,200}"),
        0usize..6000,
        prop_oneof![Just(0.0), -1.0..3.0f64],
        prop::option::of(-0.5..1.5f64),
    )
        .prop_map(|(id, question, score, max_tokens, temperature, top_p)| {
            serde_json::to_vec(&serde_json::json!({
                "id": id, "question": question, "score": score, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p
            }))
            .unwrap()
        })
}

/// Valid document messages, and some that only look unusual.
fn messages() -> Vec<Vec<u8>> {
    [
        r#"{"id":"a","text":"One sentence. Two sentences! Three?"}"#,
        r#"{"id":"b","version":2,"part":0,"last":false,"text":"The start of a long one, with no end yet"}"#,
        r#"{"id":"b","version":2,"part":1,"last":true,"text":" and its end."}"#,
        r#"{"id":"c","text":"Ünïcödé — 数据 🙂. Zero\u0000width\u200b joiners.","attributes":{"k":[1,{"d":null}]}}"#,
        r#"{"id":"d","version":18446744073709551615,"part":4294967295,"last":true,"text":"x"}"#,
        r#"{"id":"e","text":"Dr. Smith went to Washington. He arrived at 3 p.m. on Jan. 5th..."}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn message_values_never_panic_and_stored_ones_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    write_random_model(&model_dir, &RandomSpec::default()).unwrap();
    let model = common::load_model(&model_dir);
    let store = Store::open(&dir.path().join("store")).unwrap();
    let stored = std::cell::Cell::new(0usize);
    runner(256)
        .run(
            &prop_oneof![mutated(messages()), structured_messages()],
            |value| {
                let started = Instant::now();
                if let Ok(msg) = parse(None, Some(&value), 64 << 10) {
                    let part = msg.into_part(None);
                    let id = part.id.clone();
                    // Refusals (a gap, a part after the last) are answers, not failures; the
                    // document must stay readable whatever happened.
                    if apply_parts(&model, &store, &[part], Precision::F32, 1).is_ok() {
                        stored.set(stored.get() + 1);
                    }
                    if let Ok(Some(_)) = store.meta(&id) {
                        store.load(&id, &model).unwrap();
                    }
                }
                prop_assert!(started.elapsed() < Duration::from_secs(10));
                Ok(())
            },
        )
        .unwrap();
    assert!(
        stored.get() > 0,
        "no mutated message was valid: the fuzz pass fuzzed nothing"
    );
}

#[test]
fn pipeline_files_never_panic() {
    let valid = vec![
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/local.toml")).unwrap(),
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/pipelines/redpanda-sasl.toml"
        ))
        .unwrap(),
    ];
    let parsed = std::cell::Cell::new(0usize);
    runner(512)
        .run(&mutated(valid), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(p) = Pipeline::parse(&text) {
                parsed.set(parsed.get() + 1);
                let _ = p.kafka.group_instance_id(Path::new("store"));
            }
            Ok(())
        })
        .unwrap();
    assert!(
        parsed.get() > 0,
        "no mutated pipeline parsed: the fuzz pass fuzzed little"
    );
}

/// One request on a fresh connection: the status, within `limit`.
fn post(address: &str, path: &str, body: &[u8], limit: Duration) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("no whole answer within {limit:?}: {e}"));
    let head = String::from_utf8_lossy(&out[..out.len().min(12)]).into_owned();
    head.get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"))
}

#[test]
fn api_bodies_never_crash_hang_or_grow_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let doc = dir.path().join("doc.txt");
    std::fs::write(&doc, synthetic_text(12, 6, 3)).unwrap();
    let store = dir.path().join("store");
    common::succeed(
        std::process::Command::new(env!("CARGO_BIN_EXE_giststream"))
            .args(["compress", "--model"])
            .arg(&model)
            .arg("--store")
            .arg(&store)
            .arg(&doc),
    );
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_giststream"))
        .env("RAYON_NUM_THREADS", "1")
        .args(["api", "--allow-writes", "--model"])
        .arg(&model)
        .arg("--store")
        .arg(&store)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let address = loop {
        if let Some(c) = Client::discover(&store) {
            break c.address().to_string();
        }
        assert!(started.elapsed().as_secs() < 60, "the API did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let valid: Vec<Vec<u8>> = [
        r#"{"id":"doc","question":"who went to the river?","max_tokens":8}"#,
        r#"{"doc":"doc","score":"the river and the stone. The old garden.","seed":3}"#,
        r#"{"id":"doc","question":"why?","score":"because.","temperature":0.7,"top_p":0.9}"#,
        r#"{"id":"doc","question":"and?","chat_template":false,"max_tokens":4096}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Re-index bodies go without the token: refused before parsing, whatever they hold.
    // 422 is for damaged records: none here.
    let allowed = [200u16, 400, 404, 413, 415];
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<u16, usize>::new());
    runner(400)
        .run(
            &(
                prop_oneof![mutated(valid), structured_queries()],
                any::<bool>(),
            ),
            |(body, reindex)| {
                let path = if reindex { "/v1/reindex" } else { "/v1/query" };
                let status = post(&address, path, &body, Duration::from_secs(60));
                *seen.borrow_mut().entry(status).or_default() += 1;
                if reindex {
                    prop_assert_eq!(status, 401);
                } else {
                    prop_assert!(
                        allowed.contains(&status),
                        "{}: {:?}",
                        status,
                        String::from_utf8_lossy(&body)
                    );
                }
                Ok(())
            },
        )
        .unwrap();
    let seen = seen.into_inner();
    eprintln!("statuses: {seen:?}");
    assert!(
        seen.get(&200).is_some_and(|&n| n > 5),
        "few bodies got through: {seen:?}"
    );
    // Still up, and its memory bounded.
    assert_eq!(
        post(
            &address,
            "/v1/query",
            br#"{"id":"doc","question":"still there?","max_tokens":2}"#,
            Duration::from_secs(60)
        ),
        200
    );
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", server.id())) {
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        eprintln!(
            "server peak RSS after the fuzz pass: {} MiB",
            peak_kib / 1024
        );
        assert!(peak_kib < 300 * 1024, "peak RSS {peak_kib} KiB");
    }
    let _ = server.kill();
    let _ = server.wait();
}
