//! The plain-HTTP listener: nothing is forwarded. `reject` (the default) answers 403 with a JSON
//! body; `redirect` answers 308 to `https://<redirect_host><path and query>` (the request's Host
//! only when it is one of `allowed_hosts`, never reflected otherwise). Every attempt is counted
//! and written as an `insecure_request` event: address, method, the path without its query, and
//! whether a credential header was present, never its value.

use decision_core::throttle::{self, Throttle};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::authz::ConnInfo;
use crate::config::{Plain, PlainMode};
use crate::metrics::{Metrics, Outcome};
use crate::proxy::{ShimBody, json_response, request_id};

/// How many events may wait for the writer thread; past that they are counted and dropped, so a
/// flood on the plain port never stalls the runtime that serves HTTPS.
const EVENT_QUEUE: usize = 4096;

/// Where `insecure_request` events go: a JSON-lines file (`audit.path`, written by a thread of
/// its own), or the log.
pub struct Events {
    file: Option<std::sync::mpsc::SyncSender<String>>,
}

impl Events {
    /// Opens (appends to) `path`, or logs events when `None`.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Events> {
        use anyhow::Context;
        let Some(p) = path else { return Ok(Events { file: None }) };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("audit.path {}", p.display()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(EVENT_QUEUE);
        std::thread::Builder::new()
            .name("shim-events".into())
            .spawn(move || {
                for line in rx {
                    if let Err(e) = file.write_all(line.as_bytes()) {
                        // once per plain-HTTP request while the disk is full: throttled
                        static FAILED: Throttle = Throttle::new(throttle::EVERY);
                        if let Some(suppressed) = FAILED.allow(crate::clock::instant()) {
                            tracing::error!(error = %e, suppressed, "writing an insecure_request event failed");
                        }
                    }
                }
            })
            .context("starting the event writer")?;
        Ok(Events { file: Some(tx) })
    }

    /// Writes one event (a JSON object) as a line; false when it was dropped (queue full).
    pub fn write(&self, event: &serde_json::Value) -> bool {
        match &self.file {
            Some(tx) => {
                let mut line = event.to_string();
                line.push('\n');
                tx.try_send(line).is_ok()
            }
            None => {
                tracing::warn!(target: "portcullis_shim::audit", event = %event, "insecure_request");
                true
            }
        }
    }
}

/// A path for an event: no query, no control characters, at most 256 bytes.
fn clean_path(path: &str) -> String {
    let mut out: String = path.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if out.len() > 256 {
        let mut cut = 256;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Answers one request on the plain listener.
pub fn handle(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    plain: &Plain,
    credential_headers: &[String],
    events: &Arc<Events>,
    metrics: &Metrics,
) -> Response<ShimBody> {
    let id = request_id();
    let credential = credential_headers.iter().any(|h| req.headers().contains_key(h.as_str()));
    let outcome = match plain.mode {
        PlainMode::Reject => "rejected",
        PlainMode::Redirect => "redirected",
    };
    metrics.insecure.get_or_create(&Outcome { outcome }).inc();
    let written = events.write(&serde_json::json!({
        "time_unix_ms": crate::clock::unix_millis(),
        "event": "insecure_request",
        "client_ip": conn.peer.ip().to_string(),
        "method": clean_path(req.method().as_str()),
        "path": clean_path(req.uri().path()),
        "credential_present": credential,
        "outcome": outcome,
        "request_id": id,
    }));
    if !written {
        metrics.insecure.get_or_create(&Outcome { outcome: "event_dropped" }).inc();
    }
    match plain.mode {
        PlainMode::Reject => json_response(
            StatusCode::FORBIDDEN,
            "HTTPS is required; this request was not forwarded (a credential sent over plain HTTP should be replaced)",
            &id,
        ),
        PlainMode::Redirect => {
            let asked = req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(header::HOST).and_then(|v| v.to_str().ok()))
                .map(str::to_ascii_lowercase);
            let host = match asked {
                Some(h) if plain.allowed_hosts.contains(&h) => h,
                _ => plain.redirect_host.clone().unwrap_or_default(),
            };
            let target = format!("https://{host}{}", req.uri().path_and_query().map_or("/", |p| p.as_str()));
            let mut r = json_response(StatusCode::PERMANENT_REDIRECT, "HTTPS is required", &id);
            match HeaderValue::from_str(&target) {
                Ok(v) => {
                    r.headers_mut().insert(header::LOCATION, v);
                    r
                }
                Err(_) => json_response(StatusCode::BAD_REQUEST, "invalid request target", &id),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::clean_path;

    #[test]
    fn event_paths_are_cleaned_and_cut() {
        assert_eq!(clean_path("/a\u{7}b"), "/a?b");
        assert_eq!(clean_path(&"é".repeat(200)).len(), 256);
    }
}
