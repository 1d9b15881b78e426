//! A small OAuth 2.0 issuer over real TLS: a JWKS the test can swap, RFC 7662 introspection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::{lock, workspace_root};

/// What the test issuer answers to an introspection call for one token.
pub type Introspection = serde_json::Value;

#[derive(Default)]
struct IssuerState {
    jwks: String,
    jwks_fetches: usize,
    introspections: usize,
    /// token -> answer; unknown tokens are `{"active": false}`
    answers: HashMap<String, Introspection>,
    /// the expected `Authorization` of introspection calls
    basic: String,
    /// answer every call 503
    down: bool,
}

/// A small OAuth 2.0 issuer over real TLS (the certificate in tests/fixtures/tls, for
/// 127.0.0.1): `GET /jwks.json` serves a key set the test can swap, `POST /introspect` answers
/// RFC 7662 calls from a table the test fills, after checking the client's Basic credentials.
/// Both count their calls.
pub struct TestIssuer {
    pub addr: SocketAddr,
    state: Arc<Mutex<IssuerState>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestIssuer {
    /// Starts serving `jwks`; introspection accepts the client `id` with `secret`.
    pub async fn start(jwks: &str, id: &str, secret: &str) -> anyhow::Result<TestIssuer> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls_dir = workspace_root().join("tests/fixtures/tls");
        let certs = CertificateDer::pem_file_iter(tls_dir.join("server.pem"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(tls_dir.join("server.key"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // RFC 6749 2.3.1: each part form-urlencoded, then base64
        let basic = format!("Basic {}", b64(format!("{}:{}", form_encode(id), form_encode(secret)).as_bytes()));
        let state = Arc::new(Mutex::new(IssuerState { jwks: jwks.to_owned(), basic, ..Default::default() }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, state) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(issuer_answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(TestIssuer { addr, state, task })
    }

    /// `https://127.0.0.1:PORT/jwks.json`
    pub fn jwks_url(&self) -> String {
        format!("https://{}/jwks.json", self.addr)
    }

    /// `https://127.0.0.1:PORT/introspect`
    pub fn introspection_url(&self) -> String {
        format!("https://{}/introspect", self.addr)
    }

    /// The CA file portcullis must trust to reach this issuer.
    pub fn ca_file() -> PathBuf {
        workspace_root().join("tests/fixtures/tls/ca.pem")
    }

    pub fn set_jwks(&self, jwks: &str) {
        lock(&self.state).jwks = jwks.to_owned();
    }

    pub fn jwks_fetches(&self) -> usize {
        lock(&self.state).jwks_fetches
    }

    pub fn introspections(&self) -> usize {
        lock(&self.state).introspections
    }

    pub fn set_answer(&self, token: &str, answer: Introspection) {
        lock(&self.state).answers.insert(token.to_owned(), answer);
    }

    /// While down, every call is answered 503.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issuer_answer(
    state: &Mutex<IssuerState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut s = lock(state);
    if s.down {
        return reply(503, r#"{"error":"temporarily_unavailable"}"#.into());
    }
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/jwks.json") => {
            s.jwks_fetches += 1;
            reply(200, s.jwks.clone())
        }
        ("POST", "/introspect") => {
            s.introspections += 1;
            let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            if auth != s.basic {
                return reply(401, r#"{"error":"invalid_client"}"#.into());
            }
            let form = String::from_utf8_lossy(&body);
            let token = form.split('&').find_map(|kv| kv.strip_prefix("token=")).map(form_decode).unwrap_or_default();
            let answer = s.answers.get(&token).cloned().unwrap_or_else(|| serde_json::json!({ "active": false }));
            reply(200, answer.to_string())
        }
        _ => reply(404, "{}".into()),
    }
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => char::from(b).to_string(),
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding (HTTP Basic credentials).
pub fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
