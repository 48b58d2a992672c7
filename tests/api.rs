//! The local HTTP API: while a process holds the store, `query`, `docs` and `inspect` go
//! through it and print what they print with the store opened directly.

use giststream::model::random::{synthetic_text, write_random_model, RandomSpec};
use giststream::serve::client::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

fn giststream() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_giststream"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn run(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn query(store: &Path, model: Option<&Path>, args: &[&str]) -> Output {
    let mut c = giststream();
    c.arg("query").arg("--store").arg(store);
    if let Some(m) = model {
        c.arg("--model").arg(m);
    }
    run(c.args(args))
}

/// Validator for one definition of schemas/api.schema.json.
fn schema(def: &str) -> jsonschema::Validator {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas/api.schema.json");
    let mut json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["$ref"] = Value::String(format!("#/$defs/{def}"));
    jsonschema::validator_for(&json).unwrap()
}

fn assert_valid(def: &str, instance: &Value) {
    let v = schema(def);
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{def}: {instance}: {errors:?}");
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_cli_goes_through_a_running_process_and_prints_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let files: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("doc{i}.txt"));
            std::fs::write(&p, synthetic_text(5 + i, 6, i as u64)).unwrap();
            p
        })
        .collect();
    let store = dir.path().join("store");
    ok(&run(giststream()
        .args(["compress", "--json", "--model"])
        .arg(&model)
        .arg("--store")
        .arg(&store)
        .args(&files)));

    // What the commands print with the store opened directly.
    let ask = ["--doc", "doc1", "what then?", "--max-tokens", "12"];
    let direct_answer = ok(&query(&store, Some(&model), &ask));
    let mut ask_json = ask.to_vec();
    ask_json.push("--json");
    let direct_json: Value =
        serde_json::from_str(&ok(&query(&store, Some(&model), &ask_json))).unwrap();
    let scored = [
        "--doc",
        "doc2",
        "--score",
        "the river and the stone",
        "--json",
    ];
    let direct_score = ok(&query(&store, Some(&model), &scored));
    let docs = |s: &Path| {
        ok(&run(giststream()
            .args(["docs", "--json", "--store"])
            .arg(s)))
    };
    let direct_docs = docs(&store);
    for line in direct_docs.lines() {
        assert_valid("doc_meta", &serde_json::from_str(line).unwrap());
    }

    let child = giststream()
        .arg("api")
        .arg("--model")
        .arg(&model)
        .arg("--store")
        .arg(&store)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let server = Server(child);
    let started = std::time::Instant::now();
    let client = loop {
        if let Some(c) = Client::discover(&store) {
            break c;
        }
        assert!(started.elapsed().as_secs() < 60, "the API did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let endpoint: Value =
        serde_json::from_slice(&std::fs::read(store.join("api.json")).unwrap()).unwrap();
    assert_valid("endpoint", &endpoint);

    // No --model: the serving process's model answers, and prints the same.
    assert_eq!(ok(&query(&store, None, &ask)), direct_answer);
    let via_json: Value = serde_json::from_str(&ok(&query(&store, None, &ask_json))).unwrap();
    assert_eq!(via_json["answer"], direct_json["answer"]);
    assert_eq!(via_json["tokens"], direct_json["tokens"]);
    assert_eq!(ok(&query(&store, None, &scored)), direct_score);
    assert_eq!(docs(&store), direct_docs);
    let shown = ok(&run(giststream()
        .args(["inspect", "--store"])
        .arg(&store)
        .arg("doc0")));
    assert_eq!(
        serde_json::from_str::<Value>(&shown).unwrap(),
        serde_json::from_str::<Value>(direct_docs.lines().next().unwrap()).unwrap()
    );

    // Refusals keep their message and exit non-zero.
    let out = query(&store, None, &["--doc", "nope", "why?"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no document \"nope\"") && err.contains("404"),
        "{err}"
    );
    let out = query(&store, None, &["--doc", "doc0", "  "]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("question is empty"));
    let out = run(giststream()
        .args(["inspect", "--store"])
        .arg(&store)
        .arg("nope"));
    assert!(!out.status.success());

    // Responses match the schema.
    assert_valid(
        "health",
        &serde_json::to_value(client.health().unwrap()).unwrap(),
    );
    assert_valid(
        "doc_list",
        &serde_json::to_value(client.docs().unwrap()).unwrap(),
    );
    let req = serde_json::json!({"doc": "doc0", "question": "who?", "max_tokens": 5});
    assert_valid("query_request", &req);
    let (status, body) = client
        .raw("POST", "/v1/query", Some(serde_json::to_vec(&req).unwrap()))
        .unwrap();
    assert_eq!(status, 200);
    let events: Vec<Value> = String::from_utf8(body)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.last().unwrap().get("answer").is_some(), "{events:?}");
    for e in &events {
        assert_valid("query_event", e);
    }
    let (status, body) = client
        .raw(
            "POST",
            "/v1/query",
            Some(br#"{"doc":"nope","question":"x"}"#.to_vec()),
        )
        .unwrap();
    assert_eq!(status, 404);
    assert_valid("error", &serde_json::from_slice(&body).unwrap());
    // `id` is the field's name; `doc` (above) is its old name, still accepted. Both at once
    // are refused by the schema.
    let by_id = serde_json::json!({"id": "doc0", "question": "who?", "max_tokens": 2});
    assert_valid("query_request", &by_id);
    let (status, _) = client
        .raw(
            "POST",
            "/v1/query",
            Some(serde_json::to_vec(&by_id).unwrap()),
        )
        .unwrap();
    assert_eq!(status, 200);
    assert!(!schema("query_request")
        .is_valid(&serde_json::json!({"id": "a", "doc": "a", "score": "x"})));
    // A job nobody started is a 404, in the error schema.
    let (status, body) = client.raw("GET", "/v1/jobs/reindex-none", None).unwrap();
    assert_eq!(status, 404);
    assert_valid("error", &serde_json::from_slice(&body).unwrap());
    let metrics = client.metrics().unwrap();
    assert!(
        metrics.contains("giststream_queries_total") && metrics.contains("giststream_documents 3"),
        "{metrics}"
    );

    // SIGTERM: a clean exit that removes api.json; then the store opens directly again.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut server = server;
    let status = server.0.wait().unwrap();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(!store.join("api.json").exists());
    assert_eq!(ok(&query(&store, Some(&model), &ask)), direct_answer);
}

#[test]
fn a_stale_endpoint_file_falls_back_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    // A port nothing listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        store.join("api.json"),
        format!(r#"{{"address":"127.0.0.1:{port}","pid":1}}"#),
    )
    .unwrap();
    assert!(Client::discover(&store).is_none());
    let out = run(giststream().args(["docs", "--store"]).arg(&store));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
