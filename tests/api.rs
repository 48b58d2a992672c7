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

impl Server {
    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }
}

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
    let mut server = server;
    server.terminate();
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

/// A store of one document compressed with a random model, and the model.
fn one_document(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    write_random_model(&model, &RandomSpec::default()).unwrap();
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, synthetic_text(20, 6, 7)).unwrap();
    let store = dir.join("store");
    ok(&run(giststream()
        .args(["compress", "--model"])
        .arg(&model)
        .arg("--store")
        .arg(&store)
        .arg(&doc)));
    (model, store)
}

/// `giststream api` on `store`, with `extra` flags; returns it with its address once it
/// answers.
fn start_api(model: &Path, store: &Path, extra: &[&str]) -> (Server, String) {
    let child = giststream()
        .arg("api")
        .arg("--model")
        .arg(model)
        .arg("--store")
        .arg(store)
        .args(extra)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let started = std::time::Instant::now();
    loop {
        if let Some(c) = Client::discover(store) {
            return (server, c.address().to_string());
        }
        assert!(started.elapsed().as_secs() < 60, "the API did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on a fresh connection, whole answer read: status and body.
fn http(address: &str, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Starts a long generation on a connection of its own and returns that connection once
/// the first answer text arrived (the model is then busy generating).
fn long_generation(address: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let body = br#"{"id":"doc","question":"and then what happened next?","max_tokens":4096}"#;
    let mut s = std::net::TcpStream::connect(address).unwrap();
    write!(
        s,
        "POST /v1/query HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("{\"text\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

/// A metric's value in Prometheus text (0 when absent).
fn metric(address: &str, name: &str) -> f64 {
    let (_, text) = http(address, "GET", "/metrics", &[], b"");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn writes_need_the_flag_and_the_token_and_never_say_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (model, store) = one_document(dir.path());
    let plan = serde_json::to_vec(&serde_json::json!({"dry_run": true, "batch": 1})).unwrap();

    // Off by default: 403, whatever the caller sends.
    let (server, address) = start_api(&model, &store, &[]);
    assert!(!store.join("api.token").exists());
    let (status, body) = http(&address, "POST", "/v1/reindex", &[], &plan);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--allow-writes"), "{body}");
    drop(server);

    let (_server, address) = start_api(&model, &store, &["--allow-writes"]);
    let token = std::fs::read_to_string(store.join("api.token")).unwrap();
    #[cfg(unix)]
    {
        assert_eq!(mode(&store.join("api.token")), 0o600);
        assert_eq!(mode(&store.join("api.json")), 0o600);
    }
    for headers in [vec![], vec!["Authorization: Bearer nope".to_string()]] {
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, body) = http(&address, "POST", "/v1/reindex", &h, &plan);
        assert_eq!(status, 401, "{body}");
    }
    let auth = format!("Authorization: Bearer {}", token.trim());
    let (status, body) = http(&address, "POST", "/v1/reindex", &[&auth], &plan);
    assert_eq!(status, 200, "{body}");
    // A model path that exists and one that does not get the same answer.
    let answers: Vec<(u16, String)> = [dir.path().join("doc.txt"), dir.path().join("absent")]
        .iter()
        .map(|m| {
            let req = serde_json::json!({"dry_run": true, "batch": 1, "model": m});
            http(
                &address,
                "POST",
                "/v1/reindex",
                &[&auth],
                &serde_json::to_vec(&req).unwrap(),
            )
        })
        .collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].0, 400);
    assert!(
        !answers[0].1.contains("absent") && !answers[0].1.contains("doc.txt"),
        "{:?}",
        answers[0]
    );
}

#[test]
fn a_stale_endpoint_on_another_programs_port_is_not_trusted() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    // Another program on the port, answering health like giststream would.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let body = r#"{"status":"ok","service":"giststream","pid":1,"model_fingerprint":"0000000000000000","num_gists":1,"uptime_seconds":1,"instance":"guess"}"#;
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    std::fs::write(
        store.join("api.json"),
        format!(r#"{{"address":"{address}","pid":1,"instance":"the-real-run"}}"#),
    )
    .unwrap();
    assert!(Client::discover(&store).is_none());
}

#[test]
fn queries_are_bounded_cancelled_when_the_client_goes_and_by_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (model, store) = one_document(dir.path());
    let (server, address) = start_api(
        &model,
        &store,
        &["--max-running-queries", "1", "--max-waiting-queries", "0"],
    );

    // Over the cap: 400 before any work.
    let (status, body) = http(
        &address,
        "POST",
        "/v1/query",
        &[],
        br#"{"id":"doc","question":"x","max_tokens":100000}"#,
    );
    assert_eq!(status, 400, "{body}");

    // One query holds the only turn; with no room to wait, the next is refused with 429.
    let busy = long_generation(&address);
    let (status, body) = http(
        &address,
        "POST",
        "/v1/query",
        &[],
        br#"{"id":"doc","question":"who?"}"#,
    );
    assert_eq!(status, 429, "{body}");
    // The client goes away: its generation stops within a second.
    drop(busy);
    let gone = std::time::Instant::now();
    while metric(&address, "giststream_queries_running") > 0.0 {
        assert!(
            gone.elapsed().as_millis() < 1000,
            "still generating after the client left"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(metric(&address, "giststream_queries_cancelled_total"), 1.0);
    let (status, body) = http(
        &address,
        "POST",
        "/v1/query",
        &[],
        br#"{"id":"doc","question":"who?","max_tokens":4}"#,
    );
    assert_eq!(status, 200, "{body}");

    // Long texts to score go in sentence by sentence: memory stays flat in their length.
    for kib in [16, 64, 1024] {
        let text = synthetic_text(kib * 1024 / 20, 6, kib as u64);
        let req = serde_json::json!({"id": "doc", "score": &text[..kib * 1024]});
        let (status, body) = http(
            &address,
            "POST",
            "/v1/query",
            &[],
            &serde_json::to_vec(&req).unwrap(),
        );
        if kib * 1024 > giststream::query::MAX_INPUT_TOKENS {
            // One token a byte with this model: over the cap on input tokens (time, not
            // memory, is what it bounds: each sentence reads every gist before it).
            assert_eq!(status, 400, "{kib} KiB: {body}");
            assert!(body.contains("over the cap"), "{body}");
        } else {
            assert_eq!(status, 200, "{kib} KiB: {body}");
            let score: Value = serde_json::from_str(&body).unwrap();
            assert!(
                score["tokens"].as_u64().unwrap() > (kib * 1024 / 2) as u64,
                "{score}"
            );
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.0.id()));
        if let Ok(status) = status {
            let peak_kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            eprintln!("after scoring {kib} KiB: peak RSS {} MiB", peak_kib / 1024);
            assert!(peak_kib < 300 * 1024, "{kib} KiB: peak RSS {peak_kib} KiB");
        }
    }

    // SIGTERM during a generation: the process exits within 2 s, and cleanly.
    let _busy = long_generation(&address);
    let mut server = server;
    server.terminate();
    let signalled = std::time::Instant::now();
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            signalled.elapsed().as_millis() < 2000,
            "still running 2 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(!store.join("api.json").exists());
}
