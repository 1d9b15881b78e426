//! `POST /v1/check` on the forward-auth listener: the native `portcullis.v1.Decision/Check` for
//! clients that speak only HTTP and JSON. The body is a `CheckRequest` in JSON (its proto field
//! names: `api_key` or `bearer_token`, `operation`, `resource`, `client_address`, `headers`,
//! `cost`, `dry_run`, `request_id`, `content_length`, `reserve`); the answer is `200` with the
//! `CheckResponse` in JSON (`verdict` as `"allow"` or `"deny"`), decided and rendered exactly as
//! the gRPC call is. A body that is not such JSON, or a request the native Check refuses, is
//! answered `400` with `detail`; a body over 64 KiB `413`. `client_address` defaults to the
//! caller's address, and another address is believed only from `network.trusted_proxies`. No
//! concurrency slot is taken (no completion comes back over HTTP).
//!
//! `POST /v1/complete` settles a reservation (`"reserve": true` on the check): the body is
//! `{"reservation": "...", "actual_cost": 30, "request_id": "..."}`, the answer `200` with
//! `{"settled": true, "reserved_cost": 100}` (`settled` false: unknown, expired or settled
//! before), `400` with `detail` for a request that is not one, `503` when the store fails (then
//! nothing changed, and the call can be repeated).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::{CheckRequest, CheckResponse, CompleteRequest, Verdict};
use serde::Deserialize;
use serde_json::{Value, json};

use super::native;
use crate::clock;
use crate::engine::Engine;
use crate::store::Store;

/// Largest JSON body read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// `CheckRequest` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct JsonCheck {
    api_key: Option<String>,
    bearer_token: Option<String>,
    operation: String,
    resource: String,
    client_address: String,
    headers: HashMap<String, String>,
    cost: i64,
    dry_run: bool,
    request_id: String,
    content_length: u64,
    reserve: bool,
}

/// `body` as an `application/json` answer.
fn json_answer(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn refused(status: StatusCode, detail: &str) -> Response {
    json_answer(status, &json!({ "status": status.as_u16(), "error": "Bad request", "detail": detail }))
}

/// The `CheckResponse` of the gRPC call, as JSON.
fn to_json(r: &CheckResponse) -> Value {
    let headers = |hs: &[proto::portcullis_v1::Header]| -> Vec<Value> {
        hs.iter().map(|h| json!({ "name": h.name, "value": h.value })).collect()
    };
    json!({
        "verdict": if r.verdict == Verdict::Allow as i32 { "allow" } else { "deny" },
        "http_status": r.http_status,
        "reason": r.reason,
        "identity": r.identity.as_ref().map(|i| json!({
            "subject": i.subject, "tier": i.tier, "roles": i.roles, "credential": i.credential,
        })),
        "quotas": r.quotas.iter().map(|q| json!({
            "name": q.name, "limit": q.limit, "remaining": q.remaining,
            "window_seconds": q.window_seconds, "reset_seconds": q.reset_seconds, "exceeded": q.exceeded,
        })).collect::<Vec<_>>(),
        "retry_after_seconds": r.retry_after_seconds,
        "lease": r.lease,
        "upstream_headers": headers(&r.upstream_headers),
        "response_headers": headers(&r.response_headers),
        "body": r.body,
        "decision_id": r.decision_id,
        "degraded": r.degraded,
        "dry_run": r.dry_run,
        "reservation": r.reservation,
        "reservation_ttl_ms": r.reservation_ttl_ms,
    })
}

/// `POST /v1/check`.
pub async fn check<S: Store>(
    State(engine): State<Arc<Engine<S>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Body,
) -> Response {
    let started = clock::instant();
    // read here, not by an extractor, so that a body past the limit is refused in JSON too
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return json_answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({ "status": 413, "error": "Payload too large", "detail": "the body is larger than 64 KiB" }),
        );
    };
    let asked: JsonCheck = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return refused(StatusCode::BAD_REQUEST, &format!("the body is not a CheckRequest in JSON: {e}")),
    };
    let credential = match (asked.api_key, asked.bearer_token) {
        (Some(_), Some(_)) => return refused(StatusCode::BAD_REQUEST, "credential: api_key or bearer_token, not both"),
        (Some(k), None) => Some(Credential::ApiKey(k)),
        (None, Some(t)) => Some(Credential::BearerToken(t)),
        (None, None) => None,
    };
    let msg = CheckRequest {
        credential,
        operation: asked.operation,
        resource: asked.resource,
        client_address: asked.client_address,
        headers: asked.headers,
        cost: asked.cost,
        dry_run: asked.dry_run,
        request_id: asked.request_id,
        content_length: asked.content_length,
        reserve: asked.reserve,
    };
    let policy = engine.policy();
    // this listener may face clients: a client address other than the caller's own is believed
    // only from a trusted proxy (else anyone could spend, or get blocked, another address)
    let stated = msg.client_address.parse::<std::net::IpAddr>().ok();
    if !msg.client_address.is_empty()
        && stated != Some(peer.ip())
        && !policy.network.trusted_proxies.contains(peer.ip())
    {
        return refused(
            StatusCode::BAD_REQUEST,
            "client_address: another address than the caller's is believed only from network.trusted_proxies",
        );
    }
    // no completion or renewal comes over this listener: a slot would only be freed by expiry
    match native::decide(&engine, &msg, Some(peer), None, false, started).await {
        Ok(answer) => json_answer(StatusCode::OK, &to_json(&answer)),
        Err(native::Refused::Invalid(why)) => refused(StatusCode::BAD_REQUEST, why),
        // no deadline is read from an HTTP call
        Err(native::Refused::DeadlineExceeded) => json_answer(
            StatusCode::GATEWAY_TIMEOUT,
            &json!({ "status": 504, "error": "Gateway timeout", "detail": "the deadline passed" }),
        ),
    }
}

/// `CompleteRequest` in JSON, for a reservation (this listener takes no concurrency slot, so
/// there is no lease to release).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct JsonComplete {
    reservation: String,
    actual_cost: u64,
    request_id: String,
}

/// `POST /v1/complete`.
pub async fn complete<S: Store>(State(engine): State<Arc<Engine<S>>>, body: axum::body::Body) -> Response {
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return json_answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            &json!({ "status": 413, "error": "Payload too large", "detail": "the body is larger than 64 KiB" }),
        );
    };
    let asked: JsonComplete = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return refused(StatusCode::BAD_REQUEST, &format!("the body is not a CompleteRequest in JSON: {e}"));
        }
    };
    if asked.reservation.is_empty() {
        return refused(StatusCode::BAD_REQUEST, "reservation is required (what a check with reserve answered)");
    }
    let msg = CompleteRequest {
        reservation: asked.reservation,
        actual_cost: asked.actual_cost,
        request_id: asked.request_id,
        ..Default::default()
    };
    match native::complete(&engine, &msg).await {
        Ok(done) => {
            json_answer(StatusCode::OK, &json!({ "settled": done.settled, "reserved_cost": done.reserved_cost }))
        }
        Err(native::NotCompleted::Invalid(why)) => refused(StatusCode::BAD_REQUEST, why),
        Err(native::NotCompleted::StoreUnavailable) => json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "status": 503, "error": "Service unavailable", "detail": "the store is unavailable; nothing changed" }),
        ),
    }
}
