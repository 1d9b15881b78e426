//! portcullis's own API (`portcullis.v1.Decision`, proto/portcullis/v1/decision.proto), served
//! on the gRPC port for any client: `Check`, a transport-neutral request with a typed answer,
//! decided by the same engine and rendered by the same `respond` table as ext_authz;
//! `RenewLease`, for requests that outlive `lease_ttl`; and `Complete`, the completion call for
//! proxies that do not speak Envoy's access log, which also settles a reservation (a Check
//! with `reserve` counts its cost as an estimate; Complete's actual cost corrects it).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use decision_core::fields::{valid_name, valid_value};
use decision_core::identity::CredentialKind;
use decision_core::policy::Policy;
use decision_core::{Reason, Request};
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_server::Decision;
use proto::portcullis_v1::{
    CheckRequest, CheckResponse, CompleteRequest, CompleteResponse, Header, Identity, Quota, RenewLeaseRequest,
    RenewLeaseResponse, Verdict,
};

use super::respond;
use crate::clock;
use crate::engine::{Completion, Engine, Facts, Malformed, Outcome};
use crate::store::Store;

/// Longest lease or request id accepted.
pub const MAX_ID_BYTES: usize = 256;
/// Largest `cost` one request may carry (a billion units: far past any tier's limit, so a
/// larger value is a mistake, not a request).
pub const MAX_COST: i64 = 1_000_000_000;
/// Longest `resource` accepted (Envoy's own limit on a request line is 60 KiB; a resource
/// past this is not a request anybody routes).
pub const MAX_RESOURCE_BYTES: usize = 8 * 1024;
/// Longest reservation token accepted: 32 hex, a dot, and a subject in base64url (a subject is
/// at most a few hundred bytes: a JWT `sub` or an API key id).
pub const MAX_RESERVATION_BYTES: usize = 2048;
/// Longest credential accepted (a JWT is refused past 8 KiB anyway).
pub const MAX_CREDENTIAL_BYTES: usize = 16 * 1024;

/// The `portcullis.v1.Decision` service.
pub struct DecisionApi<S> {
    engine: Arc<Engine<S>>,
}

impl<S> DecisionApi<S> {
    pub fn new(engine: Arc<Engine<S>>) -> Self {
        DecisionApi { engine }
    }
}

/// A native Check as the engine takes it: the core `Request` (or why there is none) and the
/// facts recorded beside the decision. `authorization` holds the `Bearer <token>` value a
/// bearer credential becomes, so the core reads it as it reads Envoy's header.
fn request_of<'a>(
    msg: &'a CheckRequest,
    remote: Option<SocketAddr>,
    deadline: Option<std::time::Instant>,
    headers: &'a (dyn Fn() -> Vec<(&'a str, &'a str)> + Sync),
    authorization: &'a Option<String>,
    reserve: Option<&'a str>,
) -> (Result<Request<'a>, Malformed>, Facts<'a>) {
    let valid_id = valid_value(msg.request_id.as_bytes()) && msg.request_id.len() <= MAX_ID_BYTES;
    let method = if msg.operation.is_empty() { "GET" } else { msg.operation.as_str() };
    let facts = Facts {
        request_id: if valid_id { &msg.request_id } else { "" },
        method,
        target: &msg.resource,
        headers,
        dry_run: msg.dry_run,
        deadline,
        concurrency_slot: true,
    };
    let refuse = |why: &'static str| (Err(Malformed(why)), Facts { method: "", target: "", ..facts });
    if !valid_id {
        return refuse("request_id: at most 256 bytes, with no control character");
    }
    if msg.resource.is_empty() {
        return refuse("resource is required (an HTTP request target or a '/'-separated resource name)");
    }
    if msg.resource.len() > MAX_RESOURCE_BYTES || !valid_value(msg.resource.as_bytes()) {
        return refuse("resource: at most 8 KiB, with no control character");
    }
    if !(method.len() <= 32 && method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')) {
        return refuse("operation: at most 32 letters, '-' or '_' (e.g. GET, PUBLISH)");
    }
    if msg.cost < 0 {
        return refuse("cost must not be negative");
    }
    if msg.cost > MAX_COST {
        return refuse("cost is at most 1000000000");
    }
    if msg.reserve && msg.dry_run {
        return refuse("reserve: a dry run counts nothing, so it cannot reserve (ask for one or the other)");
    }
    if !msg.headers.iter().all(|(k, v)| valid_name(k) && valid_value(v.as_bytes())) {
        return refuse("headers: a header name or value that RFC 9110 forbids");
    }
    let (api_key, bearer) = match &msg.credential {
        None => (None, None),
        Some(Credential::ApiKey(k)) => (Some(k.as_str()), None),
        Some(Credential::BearerToken(t)) => (None, Some(t.as_str())),
    };
    let credential = api_key.or(bearer);
    if credential.is_some_and(str::is_empty) {
        return refuse("credential: an empty api_key or bearer_token (leave it unset for an anonymous request)");
    }
    if credential.is_some_and(|c| c.len() > MAX_CREDENTIAL_BYTES || !valid_value(c.as_bytes())) {
        return refuse("credential: at most 16 KiB, with no control character");
    }
    let peer = if msg.client_address.is_empty() {
        match remote {
            Some(a) => a.ip(),
            None => return refuse("client_address is required (this call came from no IP address)"),
        }
    } else {
        match msg.client_address.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return refuse("client_address: not an IPv4 or IPv6 address"),
        }
    };
    let header_bytes: usize = msg.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let request = Request {
        method,
        path: &msg.resource,
        peer,
        // the caller names the client; no forwarding header is believed
        forwarded_for: None,
        content_length: (msg.content_length > 0).then_some(msg.content_length),
        header_bytes: u64::try_from(header_bytes).unwrap_or(u64::MAX),
        api_key,
        authorization: authorization.as_deref(),
        cost: if msg.cost == 0 { 1 } else { msg.cost.unsigned_abs() },
        reserve,
    };
    (Ok(request), facts)
}

/// The typed answer of an outcome: the same status, reason, headers and body ext_authz gives.
pub fn answer(o: &Outcome, policy: &Policy, request_id: &str, dry_run: bool) -> CheckResponse {
    let d = &o.decision;
    let identity = d.ctx.identity.as_ref().map(|id| Identity {
        subject: id.subject.to_string(),
        tier: policy.tiers.get(id.tier).map_or_else(String::new, |t| t.name.to_string()),
        roles: policy.roles.names_of(id.roles).map(str::to_owned).collect(),
        credential: match id.credential {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::Jwt => "jwt",
            CredentialKind::Introspected => "introspection",
        }
        .to_owned(),
    });
    let quotas = d
        .quotas
        .iter()
        .map(|q| Quota {
            name: q.kind.as_str().to_owned(),
            limit: q.limit.quota(),
            remaining: q.verdict.remaining,
            window_seconds: respond::secs_ceil(q.limit.window()),
            reset_seconds: respond::secs_ceil(q.verdict.reset),
            exceeded: !q.verdict.allowed,
        })
        .collect();
    let header = |name: &str, value: String| Header { name: name.to_owned(), value };
    let mut upstream_headers = Vec::new();
    respond::upstream_headers(d, policy, |k, v| upstream_headers.push(header(k, v)));
    let mut response_headers = Vec::new();
    respond::client_headers(d, policy, |k, v| response_headers.push(header(k, v)));
    CheckResponse {
        verdict: if d.allowed() { Verdict::Allow } else { Verdict::Deny } as i32,
        http_status: u32::from(d.status()),
        reason: d.reason.as_str().to_owned(),
        identity,
        quotas,
        retry_after_seconds: respond::retry_after_secs(d).unwrap_or(0),
        lease: d.lease.as_ref().map_or_else(String::new, |l| l.id.clone()),
        upstream_headers,
        response_headers,
        body: if d.allowed() { String::new() } else { respond::deny_body(d, request_id, clock::now_micros()) },
        decision_id: o.id.to_string(),
        degraded: d.reason == Reason::AllowedStoreUnavailable,
        dry_run,
        reservation: match (&d.reservation, &d.ctx.identity) {
            (Some(r), Some(id)) if d.allowed() => reservation_token(&r.id, &id.subject),
            _ => String::new(),
        },
        reservation_ttl_ms: d.reservation.as_ref().filter(|_| d.allowed()).map_or(0, |r| r.ttl / 1_000),
    }
}

/// The reservation a client is given: `<id>.<subject>`, the id (32 hex, random: the secret
/// part) and the subject in base64url, which names the store keys (their hash tag) so that a
/// settle is one call on the right node.
fn reservation_token(id: &str, subject: &str) -> String {
    format!("{id}.{}", decision_core::encode::b64url(subject.as_bytes()))
}

/// The id and subject of a reservation token; None when it is not one `answer` could give.
fn parse_reservation(token: &str) -> Option<(&str, String)> {
    let (id, subject) = token.split_once('.')?;
    if id.len() != 32 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let subject = String::from_utf8(decision_core::encode::b64url_decode(subject)?).ok()?;
    (!subject.is_empty()).then_some((id, subject))
}

/// Why a native Check got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// the request cannot be decided (gRPC INVALID_ARGUMENT, HTTP 400); the field and reason
    Invalid(&'static str),
    /// the caller's deadline passed first (gRPC DEADLINE_EXCEEDED)
    DeadlineExceeded,
}

/// A native Check, from either door (gRPC, or `POST /v1/check` in JSON), decided and recorded
/// by the engine and rendered: the answer, or why there is none (recorded all the same, as a
/// 400 or a 504 decision). `remote`: the caller's address; `slot`: whether an allowed request
/// may take a concurrency slot (not where nothing can come back to free it).
pub async fn decide<S: Store>(
    engine: &Engine<S>,
    msg: &CheckRequest,
    remote: Option<SocketAddr>,
    deadline: Option<std::time::Instant>,
    slot: bool,
    started: std::time::Instant,
) -> Result<CheckResponse, Refused> {
    let policy = engine.policy();
    let headers = || msg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let authorization = match &msg.credential {
        Some(Credential::BearerToken(t)) => Some(format!("Bearer {t}")),
        _ => None,
    };
    let reserve = msg.reserve.then(crate::engine::new_reservation_id);
    let (request, mut facts) = request_of(msg, remote, deadline, &headers, &authorization, reserve.as_deref());
    facts.concurrency_slot = slot;
    let malformed = request.as_ref().err().copied();
    let outcome = engine.check(&policy, request, &facts, started).await;
    if let Some(Malformed(why)) = malformed {
        return Err(Refused::Invalid(why));
    }
    if outcome.decision.reason == Reason::DeadlineExceeded {
        return Err(Refused::DeadlineExceeded);
    }
    Ok(answer(&outcome, &policy, facts.request_id, msg.dry_run))
}

/// Why a Complete was not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCompleted {
    /// the request is not one to complete (gRPC INVALID_ARGUMENT, HTTP 400); why
    Invalid(&'static str),
    /// the store could not settle the reservation (gRPC UNAVAILABLE, HTTP 503): nothing was
    /// released either, so the call can be repeated
    StoreUnavailable,
}

/// A Complete, from either door (gRPC, or `POST /v1/complete` in JSON): the reservation
/// settled first (so that a store failure leaves the call safe to repeat), then the lease
/// released and the completion recorded.
pub async fn complete<S: Store>(engine: &Engine<S>, r: &CompleteRequest) -> Result<CompleteResponse, NotCompleted> {
    use NotCompleted::Invalid;
    if r.lease.len() > MAX_ID_BYTES || r.request_id.len() > MAX_ID_BYTES {
        return Err(Invalid("lease and request_id are at most 256 bytes"));
    }
    if r.lease.is_empty() && r.reservation.is_empty() {
        return Err(Invalid("lease or reservation is required (what a Check answered)"));
    }
    let reservation = match r.reservation.as_str() {
        "" => None,
        t if t.len() > MAX_RESERVATION_BYTES => {
            return Err(Invalid("reservation: not one a Check answered (too long)"));
        }
        t => Some(parse_reservation(t).ok_or(Invalid("reservation: not one a Check answered"))?),
    };
    if r.actual_cost > MAX_COST.unsigned_abs() {
        return Err(Invalid("actual_cost is at most 1000000000"));
    }
    let settled = match &reservation {
        Some((id, subject)) => {
            engine.settle_reservation(subject, id, r.actual_cost).await.map_err(|_| NotCompleted::StoreUnavailable)?
        }
        None => None,
    };
    let c = Completion {
        lease: Some(r.lease.as_str()).filter(|l| !l.is_empty()),
        request_id: &r.request_id,
        status: r.status_code,
        upstream_error: r.upstream_error || r.status_code >= 500,
        latency: Duration::from_micros(r.latency_us),
        total_ms: r.latency_us as f64 / 1e3,
    };
    let released = engine.record_completion(&c).await;
    Ok(CompleteResponse { released, settled: settled.is_some(), reserved_cost: settled.unwrap_or(0) })
}

#[tonic::async_trait]
impl<S: Store> Decision for DecisionApi<S> {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let started = clock::instant();
        let remote = request.remote_addr();
        let deadline = super::grpc_deadline(request.metadata(), started);
        let msg = request.into_inner();
        match decide(&self.engine, &msg, remote, deadline, true, started).await {
            Ok(answer) => Ok(tonic::Response::new(answer)),
            Err(Refused::Invalid(why)) => Err(tonic::Status::invalid_argument(why)),
            Err(Refused::DeadlineExceeded) => {
                Err(tonic::Status::deadline_exceeded("the call's deadline passed before the request was decided"))
            }
        }
    }

    async fn renew_lease(
        &self,
        request: tonic::Request<RenewLeaseRequest>,
    ) -> Result<tonic::Response<RenewLeaseResponse>, tonic::Status> {
        let r = request.into_inner();
        if r.lease.is_empty() || r.lease.len() > MAX_ID_BYTES {
            return Err(tonic::Status::invalid_argument("lease: the lease a Check answered (at most 256 bytes)"));
        }
        let renewed = self
            .engine
            .renew_lease(&r.lease)
            .await
            .map_err(|_| tonic::Status::unavailable("the store that holds the lease is unavailable"))?;
        let ttl_ms = renewed.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Ok(tonic::Response::new(RenewLeaseResponse { renewed: renewed.is_some(), ttl_ms }))
    }

    async fn complete(
        &self,
        request: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
        match complete(&self.engine, &request.into_inner()).await {
            Ok(answer) => Ok(tonic::Response::new(answer)),
            Err(NotCompleted::Invalid(why)) => Err(tonic::Status::invalid_argument(why)),
            Err(NotCompleted::StoreUnavailable) => {
                Err(tonic::Status::unavailable("the store that holds the reservation is unavailable"))
            }
        }
    }
}
