//! A small upstream in the test process that records what reached it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::lock;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    /// The body's length (the upstream reads every body before answering); `None` when
    /// reading it failed (the sender aborted it).
    pub body_len: Option<usize>,
}

/// How the upstream answers, and how busy it has been.
#[derive(Default)]
struct Behaviour {
    delay: Duration,
    /// 0: 200
    status: u16,
    in_flight: usize,
    max_in_flight: usize,
}

/// A small upstream that answers (by default at once, 200, with a JSON echo) and records every
/// request; a test can slow it down or make it fail, and read the most requests it ever had in
/// flight at once.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> anyhow::Result<Upstream> {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let record = seen.clone();
        let behaviour: Arc<Mutex<Behaviour>> = Arc::default();
        let shared = behaviour.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let record = record.clone();
            let behaviour = shared.clone();
            async move {
                let (delay, status) = {
                    let mut b = lock(&behaviour);
                    b.in_flight += 1;
                    b.max_in_flight = b.max_in_flight.max(b.in_flight);
                    (b.delay, b.status)
                };
                // counted out even if the request is cancelled (Envoy reset it) mid-delay
                struct Out(Arc<Mutex<Behaviour>>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        lock(&self.0).in_flight -= 1;
                    }
                }
                let _out = Out(behaviour.clone());
                tokio::time::sleep(delay).await;
                let status = axum::http::StatusCode::from_u16(if status == 0 { 200 } else { status })
                    .unwrap_or(axum::http::StatusCode::OK);
                let headers: HashMap<String, String> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect();
                let path =
                    req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
                let method = req.method().to_string();
                let body_len = axum::body::to_bytes(req.into_body(), 64 << 20).await.ok().map(|b| b.len());
                let body = serde_json::json!({ "path": path, "method": method }).to_string();
                lock(&record).push(Seen { method, path, headers, body_len });
                (status, [("content-type", "application/json")], body)
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { addr, seen, behaviour, task })
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Every answer from now on takes `delay`.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.behaviour).delay = delay;
    }

    /// Every answer from now on has this status.
    pub fn set_status(&self, status: u16) {
        lock(&self.behaviour).status = status;
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.behaviour).max_in_flight
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
