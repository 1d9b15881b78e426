//! HTTP forward-auth, the convention of proxies that are not Envoy (nginx `auth_request`,
//! Traefik `ForwardAuth`, Caddy `forward_auth`, Gateway API's `ExternalAuth` in HTTP mode): the
//! proxy sends a request whose headers describe the one to check, and copies our answer. Served
//! on its own listener (`listen.forward_auth`, off by default):
//!
//! - `GET|POST|... /v1/forward-auth`: the request to check is read from
//!   `X-Forwarded-Method`, `X-Forwarded-Uri` and `X-Forwarded-For` (Traefik, Caddy), believed
//!   only from a peer in `network.trusted_proxies`; its credentials from its own headers (the
//!   API key header,
//!   `Authorization`). Allowed: 200 with the identity headers (to copy upstream) and the
//!   RateLimit headers (for the client). Denied: the status, headers and JSON body ext_authz
//!   gives.
//! - `/v1/forward-auth/nginx`: the same from nginx's `X-Original-Method` and `X-Original-URI`
//!   (never `X-Forwarded-Uri`, which nginx passes on from the client), except that a denial
//!   other than 401 or 403 (which nginx would turn into a 500) is answered 403 with
//!   `x-portcullis-status` carrying the real status, for nginx's `error_page` to restore
//!   (README: "Forward-auth"). A repeated method, URI or credential header is refused.
//!
//! A request that cannot be checked (forwarded headers from an untrusted peer, no URI, a header
//! that is not text) is recorded as a 400 decision and answered 400 with the reason in the
//! body's `detail`; nothing is counted.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use decision_core::fields::valid_value;
use decision_core::{Reason, Request};

use super::respond;
use crate::clock;
use crate::engine::{Engine, Facts, Malformed};
use crate::store::Store;

/// Where the real status of a denial travels in the nginx mode.
pub const STATUS_HEADER: &str = "x-portcullis-status";

/// The forwarded headers that describe the request to check; from an untrusted peer, any of
/// them makes the request unanswerable.
const FORWARDED: [&str; 7] = [
    "x-forwarded-method",
    "x-forwarded-uri",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-original-method",
    "x-original-uri",
];

/// How a denial's status is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// the real status (Traefik, Caddy, Gateway API)
    Standard,
    /// 401 and 403 as they are, any other denial as 403 plus `x-portcullis-status`
    Nginx,
}

/// The forward-auth routes, and `POST /v1/check` and `POST /v1/complete` (`http_check`), for a
/// listener of their own.
pub fn router<S: Store>(engine: Arc<Engine<S>>) -> axum::Router {
    use axum::routing::any;
    axum::Router::new()
        .route("/v1/forward-auth", any(|state, peer, headers| check::<S>(state, peer, headers, Mode::Standard)))
        .route("/v1/forward-auth/nginx", any(|state, peer, headers| check::<S>(state, peer, headers, Mode::Nginx)))
        .route("/v1/check", axum::routing::post(super::http_check::check::<S>))
        .route("/v1/complete", axum::routing::post(super::http_check::complete::<S>))
        .with_state(engine)
}

/// The headers that name the request to check, in `mode`: Traefik and Caddy set
/// `X-Forwarded-*` themselves; nginx's configuration sets `X-Original-*` (and passes the
/// client's own headers on, so an `X-Forwarded-Uri` the client sent must not be read there).
fn described_by(mode: Mode) -> (&'static str, &'static str) {
    match mode {
        Mode::Standard => ("x-forwarded-method", "x-forwarded-uri"),
        Mode::Nginx => ("x-original-method", "x-original-uri"),
    }
}

/// The request a forward-auth call describes, as the core takes it, with its facts.
/// `forwarded_for`: every `X-Forwarded-For` line, joined (a proxy may append its own line after
/// the client's).
#[allow(clippy::too_many_arguments)]
fn request_of<'a>(
    pairs: &'a [(&'a str, &'a str)],
    peer: SocketAddr,
    trusted: bool,
    mode: Mode,
    api_key_header: &str,
    forwarded_for: Option<&'a str>,
    headers: &'a (dyn Fn() -> Vec<(&'a str, &'a str)> + Sync),
) -> (Result<Request<'a>, Malformed>, Facts<'a>) {
    let get = |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    let request_id = get(respond::REQUEST_ID_HEADER).filter(|v| valid_value(v.as_bytes())).unwrap_or("");
    let (method_header, uri_header) = described_by(mode);
    let method = get(method_header).unwrap_or("GET");
    let uri = get(uri_header);
    let facts = Facts {
        request_id,
        method: if trusted { method } else { "" },
        target: if trusted { uri.unwrap_or("") } else { "" },
        headers,
        dry_run: false,
        deadline: None,
        // the proxy sends no completion: a slot taken here would only be freed by its lease's
        // expiry, so forward-auth takes none
        concurrency_slot: false,
    };
    if !trusted {
        let why = if FORWARDED.iter().any(|h| get(h).is_some()) {
            "forwarded headers from a peer that is not in network.trusted_proxies"
        } else {
            "nothing to check: a proxy in network.trusted_proxies sends X-Forwarded-Uri (or X-Original-URI)"
        };
        return (Err(Malformed(why)), facts);
    }
    // one request, one description of it: a repeated method, URI or credential is ambiguous
    let repeated = [method_header, uri_header, "authorization", api_key_header]
        .iter()
        .any(|name| pairs.iter().filter(|(k, _)| k == name).count() > 1);
    if repeated {
        return (Err(Malformed("a repeated method, URI or credential header")), facts);
    }
    let Some(uri) = uri else {
        let why = match mode {
            Mode::Standard => "X-Forwarded-Uri is required (nginx sends X-Original-URI to /v1/forward-auth/nginx)",
            Mode::Nginx => "X-Original-URI is required",
        };
        return (Err(Malformed(why)), facts);
    };
    let header_bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    let request = Request {
        method,
        path: uri,
        peer: peer.ip(),
        forwarded_for,
        // an auth subrequest has no body of its own; a proxy may say what the real one declares
        content_length: get("x-forwarded-content-length").and_then(|v| v.trim().parse().ok()),
        header_bytes: u64::try_from(header_bytes).unwrap_or(u64::MAX),
        api_key: get(api_key_header),
        authorization: get("authorization"),
        cost: 1,
        reserve: None,
    };
    (Ok(request), facts)
}

async fn check<S: Store>(
    State(engine): State<Arc<Engine<S>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    mode: Mode,
) -> Response {
    let started = clock::instant();
    let policy = engine.policy();
    // every header as text (RFC 9110 field values are visible ASCII; anything else is refused)
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(headers.len());
    let mut opaque = false;
    for (k, v) in &headers {
        match v.to_str() {
            Ok(v) => pairs.push((k.as_str(), v)),
            Err(_) => opaque = true,
        }
    }
    let all = || pairs.clone();
    let trusted = policy.network.trusted_proxies.contains(peer.ip());
    let forwarded_for: Vec<&str> = pairs.iter().filter(|(k, _)| *k == "x-forwarded-for").map(|(_, v)| *v).collect();
    let forwarded_for = (!forwarded_for.is_empty()).then(|| forwarded_for.join(", "));
    let (mut request, facts) =
        request_of(&pairs, peer, trusted, mode, &policy.api_keys.header, forwarded_for.as_deref(), &all);
    if opaque && request.is_ok() {
        request = Err(Malformed("a header value that is not visible ASCII text"));
    }
    let malformed = request.as_ref().err().copied();
    let outcome = engine.check(&policy, request, &facts, started).await;
    let d = &outcome.decision;
    let mut out = HeaderMap::new();
    let mut put = |k: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            out.append(HeaderName::from_static(k), v);
        }
    };
    let body = if d.allowed() {
        respond::upstream_headers(d, &policy, &mut put);
        respond::client_headers(d, &policy, &mut put);
        String::new()
    } else {
        respond::client_headers(d, &policy, &mut put);
        match malformed {
            Some(Malformed(why)) => serde_json::json!({
                "status": 400,
                "error": Reason::BadRequest.client_error(),
                "detail": why,
            })
            .to_string(),
            None => respond::deny_body(d, facts.request_id, clock::now_micros()),
        }
    };
    let mut status = d.status();
    if mode == Mode::Nginx && !d.allowed() && !matches!(status, 401 | 403) {
        out.insert(HeaderName::from_static(STATUS_HEADER), HeaderValue::from(status));
        status = 403;
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    *response.headers_mut() = out;
    response
}
