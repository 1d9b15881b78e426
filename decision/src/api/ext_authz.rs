//! Envoy's external authorization API (`envoy.service.auth.v3.Authorization/Check`): the
//! CheckRequest's HTTP attributes become a core `Request`; the decision becomes an OK answer
//! (identity headers towards the upstream, rate-limit headers towards the client, dynamic
//! metadata for Envoy's ratelimit filter) or a denied answer (status, JSON body, headers).

use std::net::IpAddr;
use std::sync::Arc;

use decision_core::fields::{valid_name, valid_value};
use decision_core::policy::{HeaderDialect, Policy};
use decision_core::{Decision, Reason, Request};
use proto::ext_authz::attribute_context::HttpRequest;
use proto::ext_authz::authorization_server::Authorization;
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse};
use proto::types::{
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpStatus, ListValue, RpcStatus, Struct, Value, address, value,
};

use super::respond::{
    self, DEGRADED_HEADER, LEASE_HEADER, REQUEST_ID_HEADER, ROLES_HEADER, SUBJECT_HEADER, TIER_HEADER,
};
use crate::clock;
use crate::engine::{Engine, Facts, Malformed};
use crate::store::Store;

/// gRPC codes carried in CheckResponse.status (google.rpc.Code).
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_UNAVAILABLE: i32 = 14;

pub struct ExtAuthz<S> {
    engine: Arc<Engine<S>>,
}

impl<S: Store> ExtAuthz<S> {
    pub fn new(engine: Arc<Engine<S>>) -> Self {
        ExtAuthz { engine }
    }
}

/// A request header by its lower-case name, from `headers` or, when Envoy sends raw headers,
/// from `header_map`.
fn header<'a>(http: &'a HttpRequest, name: &str) -> Option<&'a str> {
    if let Some(v) = http.headers.get(name) {
        return Some(v.as_str());
    }
    let map = http.header_map.as_ref()?;
    let h = map.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name))?;
    if h.raw_value.is_empty() { Some(h.value.as_str()) } else { std::str::from_utf8(&h.raw_value).ok() }
}

fn header_bytes(http: &HttpRequest) -> u64 {
    let from_map: usize = http.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let from_raw: usize = http
        .header_map
        .as_ref()
        .map_or(0, |m| m.headers.iter().map(|h| h.key.len() + h.value.len() + h.raw_value.len()).sum());
    u64::try_from(from_map + from_raw).unwrap_or(u64::MAX)
}

/// Whether every header is well formed (RFC 9110 section 5: names are tokens, values hold no CR,
/// LF, NUL or other control character), in `headers` and in `header_map`.
fn headers_well_formed(http: &HttpRequest) -> bool {
    http.headers.iter().all(|(k, v)| valid_name(k) && valid_value(v.as_bytes()))
        && http.header_map.as_ref().is_none_or(|m| {
            m.headers.iter().all(|h| valid_name(&h.key) && valid_value(h.value.as_bytes()) && valid_value(&h.raw_value))
        })
}

fn peer_ip(req: &CheckRequest) -> Option<IpAddr> {
    let addr = req.attributes.as_ref()?.source.as_ref()?.address.as_ref()?.address.as_ref()?;
    match addr {
        address::Address::SocketAddress(sa) => sa.address.parse().ok(),
        _ => None,
    }
}

fn option(key: &str, value: String) -> HeaderValueOption {
    with_action(key, value, HeaderAppendAction::OverwriteIfExistsOrAdd)
}

fn with_action(key: &str, value: String, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_owned(), value, raw_value: Vec::new() }),
        append_action: action as i32,
        ..Default::default()
    }
}

/// `RateLimit` and `RateLimit-Policy` are Structured Field lists: ours are appended, so that
/// the ratelimit filter's own (from the RLS answer) survive beside them. Every other header is
/// overwritten.
fn client_header(key: &str, value: String, dialect: HeaderDialect) -> HeaderValueOption {
    // draft-07's `RateLimit` is a Dictionary describing one limit: two of them cannot be joined
    let list = key == "ratelimit-policy" || (key == "ratelimit" && dialect == HeaderDialect::Draft10);
    let action =
        if list { HeaderAppendAction::AppendIfExistsOrAdd } else { HeaderAppendAction::OverwriteIfExistsOrAdd };
    with_action(key, value, action)
}

fn string_value(s: &str) -> Value {
    Value { kind: Some(value::Kind::StringValue(s.to_owned())) }
}

/// Builds the wire answer for a decision: the headers `respond` renders for every adapter, as
/// Envoy takes them (identity also as dynamic metadata for the ratelimit filter; the client's
/// own copies of our headers removed).
pub fn answer(d: &Decision, policy: &Policy, request_id: &str) -> CheckResponse {
    if d.allowed() {
        let mut to_upstream = Vec::with_capacity(4);
        let mut metadata = Struct::default();
        respond::upstream_headers(d, policy, |k, v| {
            match k {
                SUBJECT_HEADER => {
                    metadata.fields.insert("subject".into(), string_value(&v));
                }
                TIER_HEADER => {
                    metadata.fields.insert("tier".into(), string_value(&v));
                }
                ROLES_HEADER => {
                    let values = v.split(',').filter(|r| !r.is_empty()).map(string_value).collect();
                    metadata
                        .fields
                        .insert("roles".into(), Value { kind: Some(value::Kind::ListValue(ListValue { values })) });
                }
                _ => {}
            }
            to_upstream.push(option(k, v));
        });
        let mut remove: Vec<String> = Vec::new();
        match &d.ctx.identity {
            // with a stated precedence a request may carry two credentials: the one that did not
            // prove the identity was never verified, and never reaches the upstream
            Some(id) if policy.credential_precedence.is_some() => remove.push(match id.credential {
                decision_core::identity::CredentialKind::ApiKey => "authorization".into(),
                _ => policy.api_keys.header.clone(),
            }),
            Some(_) => {}
            None => remove.extend([SUBJECT_HEADER, TIER_HEADER, ROLES_HEADER].map(String::from)),
        }
        // the lease travels to the upstream and back to us in the access log; a client's own
        // header of that name never gets through (only a policy with `traffic` reads it back)
        if d.lease.is_none() && policy.traffic.is_some() {
            remove.push(LEASE_HEADER.into());
        }
        if d.reason != Reason::AllowedStoreUnavailable {
            remove.push(DEGRADED_HEADER.into());
        }
        let mut to_client = Vec::with_capacity(8);
        respond::client_headers(d, policy, |k, v| to_client.push(client_header(k, v, policy.ratelimit_headers)));
        CheckResponse {
            status: Some(RpcStatus { code: GRPC_OK, ..Default::default() }),
            dynamic_metadata: if metadata.fields.is_empty() { None } else { Some(metadata) },
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: to_upstream,
                headers_to_remove: remove,
                response_headers_to_add: to_client,
                ..Default::default()
            })),
        }
    } else {
        let mut headers = Vec::with_capacity(6);
        respond::client_headers(d, policy, |k, v| headers.push(option(k, v)));
        let code = if d.reason == Reason::StoreUnavailable { GRPC_UNAVAILABLE } else { GRPC_PERMISSION_DENIED };
        CheckResponse {
            status: Some(RpcStatus { code, message: d.reason.as_str().to_owned(), details: Vec::new() }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: i32::from(d.status()) }),
                headers,
                body: respond::deny_body(d, request_id, clock::now_micros()),
            })),
        }
    }
}

#[tonic::async_trait]
impl<S: Store> Authorization for ExtAuthz<S> {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let started = clock::instant();
        let deadline = super::grpc_deadline(request.metadata(), started);
        let msg = request.into_inner();
        if crate::telemetry::tracing_on() {
            // a span of its own, child of the request's traceparent, exported over OTLP
            use tracing::Instrument;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let headers = msg
                .attributes
                .as_ref()
                .and_then(|a| a.request.as_ref())
                .and_then(|r| r.http.as_ref())
                .map(|h| &h.headers);
            let span = tracing::info_span!(
                target: crate::telemetry::TRACE_TARGET,
                "ext_authz.check",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "envoy.service.auth.v3.Authorization",
                rpc.method = "Check",
                decision.outcome = tracing::field::Empty,
                decision.reason = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            );
            if let Some(h) = headers {
                let _ = span.set_parent(crate::telemetry::parent_context(h));
            }
            let answer = self.decide_and_answer(msg, started, deadline).instrument(span.clone()).await;
            if let Ok(r) = &answer {
                let denied = matches!(r.get_ref().http_response, Some(HttpResponse::DeniedResponse(_)));
                span.record("decision.outcome", if denied { "deny" } else { "allow" });
                if let Some(st) = &r.get_ref().status {
                    span.record("decision.reason", st.message.as_str());
                }
            }
            return answer;
        }
        self.decide_and_answer(msg, started, deadline).await
    }
}

impl<S: Store> ExtAuthz<S> {
    /// The Check as the engine takes it, decided (and recorded there), and answered.
    async fn decide_and_answer(
        &self,
        msg: CheckRequest,
        started: std::time::Instant,
        deadline: Option<std::time::Instant>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let policy = self.engine.policy();
        let http = msg.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let headers =
            || http.map(|h| h.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()).unwrap_or_default();
        let (request, mut facts) = match http {
            Some(http) => request_of(http, peer_ip(&msg), &policy, &headers),
            None => (Err(Malformed("no attributes.request.http in the check request")), Facts::none()),
        };
        facts.deadline = deadline;
        let outcome = self.engine.check(&policy, request, &facts, started).await;
        if outcome.decision.reason == Reason::DeadlineExceeded {
            return Err(tonic::Status::deadline_exceeded("the call's deadline passed before the request was decided"));
        }
        Ok(tonic::Response::new(answer(&outcome.decision, &policy, facts.request_id)))
    }
}

/// The core `Request` of a Check's HTTP attributes (`Malformed` when a header breaks RFC 9110 or
/// the source address is missing), with the facts the engine records beside the decision.
fn request_of<'a>(
    http: &'a HttpRequest,
    peer: Option<IpAddr>,
    policy: &'a Policy,
    headers: &'a (dyn Fn() -> Vec<(&'a str, &'a str)> + Sync),
) -> (Result<Request<'a>, Malformed>, Facts<'a>) {
    let request_id = header(http, REQUEST_ID_HEADER).unwrap_or(&http.id);
    let mut facts = Facts {
        request_id,
        method: &http.method,
        target: &http.path,
        headers,
        dry_run: false,
        deadline: None,
        concurrency_slot: true,
    };
    if !headers_well_formed(http) {
        // the id only if it is itself well formed; the method is not believed
        facts.request_id = header(http, REQUEST_ID_HEADER).filter(|v| valid_value(v.as_bytes())).unwrap_or("");
        facts.method = "";
        return (Err(Malformed("a header name or value that RFC 9110 forbids")), facts);
    }
    let Some(peer) = peer else {
        return (Err(Malformed("no IP source address in the check request")), facts);
    };
    let request = Request {
        method: &http.method,
        path: &http.path,
        peer,
        forwarded_for: header(http, "x-forwarded-for"),
        // The declared length first: Envoy reports `size` 0 for a body it has not buffered.
        content_length: header(http, "content-length")
            .and_then(|v| v.trim().parse().ok())
            .or_else(|| u64::try_from(http.size).ok().filter(|n| *n > 0)),
        header_bytes: header_bytes(http),
        api_key: header(http, &policy.api_keys.header),
        authorization: header(http, "authorization"),
        cost: 1,
        reserve: None,
    };
    (Ok(request), facts)
}
