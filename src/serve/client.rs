//! The CLI's client of a running process's API (blocking: the CLI has no runtime of its
//! own), found through the store's `api.json`.

use crate::query::{Answer, Score};
use crate::serve::api::{
    DocList, Endpoint, ErrorBody, Health, QueryEvent, QueryRequest, ReindexRequest, ENDPOINT_FILE,
    TOKEN_FILE,
};
use crate::store::DocMeta;
use anyhow::Context;
use axum::body::Bytes;
use axum::http::{header, StatusCode};
use std::path::Path;

/// A client of a running process's API.
pub struct Client {
    address: String,
    /// The store's folder (where the write token is, when the process allows writes).
    store_dir: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

/// A response: status and body bytes.
type Reply = (StatusCode, Vec<u8>);

impl Client {
    /// The API of the process holding `store_dir`, if one is running and answers.
    pub fn discover(store_dir: &Path) -> Option<Client> {
        let endpoint = read_endpoint(store_dir)?;
        let client = Client {
            address: endpoint.address,
            store_dir: store_dir.to_path_buf(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?,
        };
        // A stale file (the process died) or another program on the port: not ours. The
        // process that wrote the file (readable by its owner only) names its run; a
        // program that did not read it cannot repeat the name.
        // A degraded process (503, its problems listed) is still the one to talk to.
        let (_, body) = client.request("GET", "/v1/health", None, |_| Ok(())).ok()?;
        let health: Health = serde_json::from_slice(&body).ok()?;
        (health.service == "giststream"
            && !endpoint.instance.is_empty()
            && health.instance == endpoint.instance)
            .then_some(client)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn health(&self) -> anyhow::Result<Health> {
        self.get_json("/v1/health")
    }

    pub fn docs(&self) -> anyhow::Result<DocList> {
        self.get_json("/v1/docs")
    }

    pub fn doc(&self, id: &str) -> anyhow::Result<DocMeta> {
        self.get_json(&format!("/v1/docs/{}", percent_encode(id)))
    }

    /// Starts a re-index job in the serving process (a dry run returns its plan).
    /// Starts a re-index job: its id and URL (a dry run's answer is its plan instead).
    pub fn reindex(&self, req: &ReindexRequest) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.request(
            "POST",
            "/v1/reindex",
            Some(serde_json::to_vec(req)?),
            |_| Ok(()),
        )?;
        if status == StatusCode::FORBIDDEN {
            // Writes are off there: say how to turn them on, as well as what it said.
            check(status, &body).context(
                "the serving process does not take writes: restart it with --allow-writes \
                 (api.allow_writes in a pipeline), or stop it and re-index offline",
            )?;
        }
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    pub fn jobs(&self) -> anyhow::Result<Vec<crate::jobs::reindex::JobProgress>> {
        self.get_json("/v1/jobs")
    }

    pub fn job(&self, id: &str) -> anyhow::Result<crate::jobs::reindex::JobProgress> {
        self.get_json(&format!("/v1/jobs/{}", percent_encode(id)))
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.request("GET", "/metrics", None, |_| Ok(()))?;
        check(status, &body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    pub fn score(&self, req: &QueryRequest) -> anyhow::Result<Score> {
        let (status, body) =
            self.request("POST", "/v1/query", Some(serde_json::to_vec(req)?), |_| {
                Ok(())
            })?;
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Asks a question; `on_text` gets the answer's text as it streams in.
    pub fn ask(&self, req: &QueryRequest, mut on_text: impl FnMut(&str)) -> anyhow::Result<Answer> {
        let mut pending = Vec::new();
        let mut done = None;
        let mut failure = None;
        let (status, body) = self.request(
            "POST",
            "/v1/query",
            Some(serde_json::to_vec(req)?),
            |chunk| {
                pending.extend_from_slice(chunk);
                while let Some(n) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=n).collect();
                    match serde_json::from_slice::<QueryEvent>(&line)? {
                        QueryEvent::Warning(w) => eprintln!("giststream: warning: {w}"),
                        QueryEvent::Text(t) => on_text(&t),
                        QueryEvent::Answer(a) => done = Some(a),
                        QueryEvent::Error(e) => failure = Some(e),
                    }
                }
                Ok(())
            },
        )?;
        check(status, &body)?;
        if let Some(e) = failure {
            anyhow::bail!("{e}");
        }
        done.ok_or_else(|| anyhow::anyhow!("the answer stream ended early"))
    }

    /// A raw request: status and whole body (for tests and debugging).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let (status, body) = self.request(method, path, body, |_| Ok(()))?;
        Ok((status.as_u16(), body))
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.request("GET", path, None, |_| Ok(()))?;
        check(status, &body)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// One HTTP/1.1 request. A successful body goes to `on_chunk` as it arrives; an error
    /// body is returned whole.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        mut on_chunk: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<Reply> {
        use http_body_util::BodyExt;
        use hyper_util::rt::TokioIo;
        let address = self.address.clone();
        // Writes carry the token, when this user can read it (the store's owner).
        let token = (path == "/v1/reindex")
            .then(|| std::fs::read_to_string(self.store_dir.join(TOKEN_FILE)).ok())
            .flatten()
            .map(|t| t.trim().to_string());
        self.rt.block_on(async move {
            let stream = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::TcpStream::connect(&address),
            )
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {address}: timed out"))??;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, &address)
                .header(header::CONTENT_TYPE, "application/json");
            if let Some(token) = token {
                req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let req = req.body(http_body_util::Full::new(Bytes::from(
                body.unwrap_or_default(),
            )))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let mut body = resp.into_body();
            let mut whole = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    if status.is_success() {
                        on_chunk(&data)?;
                    }
                    whole.extend_from_slice(&data);
                }
            }
            Ok((status, whole))
        })
    }
}

/// An error status becomes an error carrying the server's message.
fn check(status: StatusCode, body: &[u8]) -> anyhow::Result<()> {
    if status.is_success() {
        return Ok(());
    }
    let msg = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    anyhow::bail!("{msg} (HTTP {status})")
}

/// Percent-encodes a path segment (RFC 3986 unreserved characters pass).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The endpoint a running process announced in `store_dir`, if any (not checked).
pub fn read_endpoint(store_dir: &Path) -> Option<Endpoint> {
    let bytes = std::fs::read(store_dir.join(ENDPOINT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(percent_encode("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(percent_encode("doc-1.txt_~"), "doc-1.txt_~");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }
}
