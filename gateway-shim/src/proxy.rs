//! One request through the shim: limits and hygiene first (431, 413, h2c, hop-by-hop headers,
//! client copies of `x-portcullis-*`), then the ext_authz Check (and the ratelimit call), then
//! the upstream with streamed bodies, then the completion. Every response the shim makes itself
//! has a JSON body; every HTTPS response carries HSTS.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Version};
use proto::ext_authz::authorization_client::AuthorizationClient;
use proto::ext_authz::check_response::HttpResponse;
use proto::portcullis_v1::decision_client::DecisionClient;
use proto::portcullis_v1::{CompleteRequest, RenewLeaseRequest};
use proto::ratelimit::rate_limit_response::Code as RlCode;
use proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::authz::{self, ConnInfo, LEASE_HEADER};
use crate::clock;
use crate::config::Config;
use crate::metrics::{Code, Metrics, Outcome};
use crate::upstream::UpClient;
use decision_core::throttle::{self, Throttle};

// Warnings that could repeat once per request (portcullis or the upstream unreachable, leases
// lost or stalled in numbers): each written the first time and then at most once every 10 s,
// with `suppressed`, how many were left out; the metrics count every one.
static CHECK_FAILED: Throttle = Throttle::new(throttle::EVERY);
static RATELIMIT_FAILED: Throttle = Throttle::new(throttle::EVERY);
static UPSTREAM_FAILED: Throttle = Throttle::new(throttle::EVERY);
static COMPLETE_FAILED: Throttle = Throttle::new(throttle::EVERY);
static RENEW_FAILED: Throttle = Throttle::new(throttle::EVERY);
static LEASE_GONE: Throttle = Throttle::new(throttle::EVERY);
static STALLED: Throttle = Throttle::new(throttle::EVERY);

/// A reply the shim makes itself after an allowed Check (a refusal by the ratelimit call, an
/// upstream failure), with the decision's headers as Envoy's local replies carry them
/// ([`add_decided_headers`]).
fn decided(
    mut resp: Response<ShimBody>,
    rl: &HeaderMap,
    authz_headers: &[proto::types::HeaderValueOption],
) -> Response<ShimBody> {
    add_decided_headers(resp.headers_mut(), rl, authz_headers);
    resp
}

/// Adds an allowed decision's response headers to a response to the client (the upstream's, or
/// one the shim makes), as Envoy's encoder filters do, last filter first: the ratelimit call's
/// (`rl`), then ext_authz's `response_headers_to_add` with their append actions.
fn add_decided_headers(headers: &mut HeaderMap, rl: &HeaderMap, authz_headers: &[proto::types::HeaderValueOption]) {
    for (k, v) in rl {
        headers.append(k, v.clone());
    }
    authz::apply_options(headers, authz_headers);
}

/// Errors inside a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the shim sends.
pub type ShimBody = BoxBody<Bytes, BoxError>;

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the legacy ones proxies drop): never
/// forwarded in either direction.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Request headers a client may not send on: they would tell the upstream another client, host,
/// port, prefix or path than the one decided (`X-Forwarded-For`, `-Proto` and `-Host` are rebuilt
/// by the shim).
const STRIPPED: [&str; 7] = [
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
];

/// Marks a response as the connection's last.
fn closing(mut r: Response<ShimBody>) -> Response<ShimBody> {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// What a `Connection` header may not remove: the credentials and what the shim itself sets or
/// relies on (a client naming `x-api-key` in `Connection` must not strip its own credential
/// between the decision and the upstream, nor hide one from the decision).
fn protected(name: &str, credential_headers: &[String]) -> bool {
    matches!(
        name,
        "authorization"
            | "host"
            | "content-length"
            | "content-type"
            | "cookie"
            | "x-request-id"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "upgrade"
    ) || name.starts_with("x-portcullis-")
        || credential_headers.iter().any(|c| c == name)
}

/// Tracks what must finish before the process exits: completions not yet sent.
#[derive(Default)]
pub struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    fn enter(self: &Arc<Self>) -> PendingGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        PendingGuard(self.clone())
    }

    /// Waits until nothing is pending, or `timeout`; returns how many were still pending.
    pub async fn wait(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            let n = self.count.load(Ordering::SeqCst);
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.count.load(Ordering::SeqCst);
            }
        }
    }
}

struct PendingGuard(Arc<Pending>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything a request needs, shared by every connection.
pub struct Shim {
    pub cfg: Config,
    pub authz: AuthorizationClient<Channel>,
    pub ratelimit: Option<RateLimitServiceClient<Channel>>,
    pub decision: DecisionClient<Channel>,
    pub upstream: UpClient,
    pub metrics: Arc<Metrics>,
    pub pending: Arc<Pending>,
    /// The credential headers a `Connection` header may not name (`authorization`, `x-api-key`).
    pub credential_headers: Vec<String>,
}

/// A JSON error body the shim writes itself: `{"status","error","message","request_id"}`.
pub fn json_response(status: StatusCode, message: &str, request_id: &str) -> Response<ShimBody> {
    let body = serde_json::json!({
        "status": status.as_u16(),
        "error": status.canonical_reason().unwrap_or("Error"),
        "message": message,
        "request_id": request_id,
    })
    .to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn full(b: impl Into<Bytes>) -> ShimBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A random request id in UUID v4 form (Envoy sets `x-request-id` the same way at the edge).
pub fn request_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::getrandom(&mut b).is_err() {
        // no kernel randomness: a time-based id still tells requests apart in logs
        b[..8].copy_from_slice(&clock::unix_millis().to_be_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        id.push(char::from(HEX[usize::from(x >> 4)]));
        id.push(char::from(HEX[usize::from(x & 0x0f)]));
    }
    id
}

/// The request body as it goes upstream: at most `max` bytes, and no more than `idle` between
/// two pieces; `flag` says which limit ended it (1: too large, 2: idle).
struct Guarded {
    inner: Incoming,
    seen: u64,
    max: u64,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    flag: Arc<AtomicU8>,
}

const TOO_LARGE: u8 = 1;
const IDLE: u8 = 2;

impl Body for Guarded {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.seen += d.len() as u64;
                    if this.seen > this.max {
                        this.flag.store(TOO_LARGE, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "request body over limits.max_body_bytes",
                        ))));
                    }
                }
                this.timer.as_mut().reset(tokio::time::Instant::now() + this.idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.flag.store(IDLE, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(std::io::Error::other(
                        "request body idle past limits.idle_body_timeout",
                    ))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a finished request reports to `Decision/Complete`.
struct Completion {
    shim: Arc<Shim>,
    lease: String,
    request_id: String,
    status: u16,
    started: Instant,
    upstream_error: bool,
    /// The task renewing the lease while the request runs.
    renewal: tokio::task::AbortHandle,
    _pending: PendingGuard,
}

/// Renews `lease` after `first`, then at a third of each renewal's life, until aborted (the
/// request completed), portcullis says the lease is gone, or the response has not moved
/// (`progress`: milliseconds after `started`) for `limits.stream_idle_timeout`, so that a stalled
/// stream gives its slot back.
fn renew(
    shim: Arc<Shim>,
    lease: String,
    first: Duration,
    started: Instant,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let mut wait = first;
        let idle = shim.cfg.limits.stream_idle_timeout;
        loop {
            tokio::time::sleep(wait).await;
            let moved = Duration::from_millis(progress.load(Ordering::Relaxed));
            if started.elapsed().saturating_sub(moved) > idle {
                shim.metrics.renewals.get_or_create(&Outcome { outcome: "stalled" }).inc();
                if let Some(suppressed) = STALLED.allow(clock::instant()) {
                    tracing::warn!(
                        suppressed,
                        "a response stalled past limits.stream_idle_timeout: its lease is no longer renewed"
                    );
                }
                return;
            }
            let mut call = tonic::Request::new(RenewLeaseRequest { lease: lease.clone() });
            call.set_timeout(Duration::from_secs(2));
            match shim.decision.clone().renew_lease(call).await {
                Ok(r) if r.get_ref().renewed => {
                    shim.metrics.renewals.get_or_create(&Outcome { outcome: "renewed" }).inc();
                    wait = Duration::from_millis(r.get_ref().ttl_ms / 3).clamp(Duration::from_millis(100), first);
                }
                Ok(_) => {
                    shim.metrics.renewals.get_or_create(&Outcome { outcome: "gone" }).inc();
                    if let Some(suppressed) = LEASE_GONE.allow(clock::instant()) {
                        tracing::warn!(
                            suppressed,
                            "a running request's lease had already expired: its slot may be held twice"
                        );
                    }
                    return;
                }
                Err(e) => {
                    shim.metrics.renewals.get_or_create(&Outcome { outcome: "error" }).inc();
                    if let Some(suppressed) = RENEW_FAILED.allow(clock::instant()) {
                        tracing::warn!(error = %e, suppressed, "Decision/RenewLease failed; trying again");
                    }
                }
            }
        }
    })
    .abort_handle()
}

impl Completion {
    async fn send(self) {
        self.renewal.abort();
        let req = CompleteRequest {
            lease: self.lease.clone(),
            status_code: u32::from(self.status),
            upstream_error: self.upstream_error,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            request_id: self.request_id.clone(),
            ..Default::default()
        };
        let mut client = self.shim.decision.clone();
        let mut call = tonic::Request::new(req);
        call.set_timeout(Duration::from_secs(2));
        let outcome = match client.complete(call).await {
            Ok(r) if r.get_ref().released => "released",
            Ok(_) => "not_released",
            Err(e) => {
                if let Some(suppressed) = COMPLETE_FAILED.allow(clock::instant()) {
                    tracing::warn!(error = %e, request_id = %self.request_id, suppressed, "Decision/Complete failed; the lease expires on its own");
                }
                "error"
            }
        };
        self.shim.metrics.completions.get_or_create(&Outcome { outcome }).inc();
    }
}

/// Sends the completion when dropped (the response body ended, failed, or the client left).
struct CompleteOnDrop(Option<Completion>);

impl CompleteOnDrop {
    fn set(&mut self, status: u16, upstream_error: bool) {
        if let Some(c) = self.0.as_mut() {
            c.status = status;
            c.upstream_error = upstream_error;
        }
    }
}

impl Drop for CompleteOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(c.send());
        }
    }
}

/// The upstream's response body, streamed; the completion goes out when it ends.
struct Completing {
    inner: Incoming,
    done: CompleteOnDrop,
    /// No frame from the upstream for `limits.stream_idle_timeout`: the response is cut.
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    started: Instant,
    progress: Arc<std::sync::atomic::AtomicU64>,
}

impl Body for Completing {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                // the whole response went out: complete now rather than when hyper drops the body
                drop(CompleteOnDrop(this.done.0.take()));
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(c) = this.done.0.as_mut() {
                    c.upstream_error = true;
                }
                drop(CompleteOnDrop(this.done.0.take()));
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let at = u64::try_from(this.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                this.progress.store(at, Ordering::Relaxed);
                this.timer.as_mut().reset(tokio::time::Instant::now() + this.idle);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    if let Some(c) = this.done.0.as_mut() {
                        c.upstream_error = true;
                    }
                    drop(CompleteOnDrop(this.done.0.take()));
                    return Poll::Ready(Some(Err(
                        "the upstream's response stalled past limits.stream_idle_timeout".into()
                    )));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Whether `ip` is one of `network.trusted_proxies`.
fn trusted(cfg: &Config, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    cfg.trusted_proxies.iter().any(|n| n.contains(&ip))
}

impl Shim {
    /// Answers one request on the TLS listener.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, conn: Arc<ConnInfo>) -> Response<ShimBody> {
        let id = request_id();
        // one verdict per request, taken first whatever the answer
        let both_framings = conn.h1_verdicts.as_ref().is_some_and(crate::h1scan::take);
        let mut resp = if both_framings {
            let mut r = json_response(StatusCode::BAD_REQUEST, "both Transfer-Encoding and Content-Length", &id);
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        } else {
            self.clone().route(req, &conn, &id).await
        };
        resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, self.cfg.hsts.value.clone());
        self.metrics.responses.get_or_create(&Code { code: resp.status().as_u16() }).inc();
        resp
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>, conn: &ConnInfo, id: &str) -> Response<ShimBody> {
        let started = clock::instant();
        let cfg = &self.cfg;
        let (mut parts, body) = req.into_parts();

        // limits on the request head (hyper's own, set above these, answer without a JSON body)
        let count = parts.headers.len();
        let bytes: usize = parts.headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
        if count > cfg.limits.max_headers || bytes as u64 > cfg.limits.max_header_bytes {
            return json_response(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "request headers too large", id);
        }
        let declared: Option<u64> = match parts.headers.get_all(header::CONTENT_LENGTH).iter().count() {
            0 => None,
            _ => match header_str(&parts.headers, &header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok()) {
                Some(n) => Some(n),
                None => return json_response(StatusCode::BAD_REQUEST, "invalid Content-Length", id),
            },
        };
        if declared.is_some_and(|n| n > cfg.limits.max_body_bytes) {
            return json_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large", id);
        }

        // CONNECT tunnels nothing here (Envoy refuses it unless configured)
        if parts.method == hyper::Method::CONNECT {
            return closing(json_response(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported", id));
        }
        // the path that is decided is the path that is forwarded (Envoy's normalize_path,
        // merge_slashes, and escaped slashes refused)
        let path_and_query = match crate::path::normalize(parts.uri.path_and_query().map_or("/", |p| p.as_str())) {
            Ok(p) => p,
            Err(e) => return json_response(StatusCode::BAD_REQUEST, &format!("invalid path: {e:?}"), id),
        };

        // upgrades (every Upgrade line): h2c never (it would bypass TLS's ALPN); WebSocket only
        // where a route allows it. A refused upgrade closes its connection, so that nothing the
        // client sends after it is read as another request.
        let upgrade: Vec<String> = parts
            .headers
            .get_all(header::UPGRADE)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
            .flat_map(|v| v.split(',').map(|p| p.trim().to_owned()).collect::<Vec<_>>())
            .filter(|p| !p.is_empty())
            .collect();
        let websocket = match upgrade.as_slice() {
            [] if !parts.headers.contains_key("http2-settings") => false,
            u if u.iter().any(|p| p == "h2c") || parts.headers.contains_key("http2-settings") => {
                return closing(json_response(StatusCode::BAD_REQUEST, "Upgrade: h2c is not allowed", id));
            }
            [only] if only == "websocket" && parts.version == Version::HTTP_11 => {
                if !cfg.websocket.iter().any(|p| path_and_query.starts_with(p.as_str())) {
                    return closing(json_response(
                        StatusCode::FORBIDDEN,
                        "WebSocket upgrade is not allowed on this route",
                        id,
                    ));
                }
                true
            }
            _ => return closing(json_response(StatusCode::BAD_REQUEST, "unsupported Upgrade", id)),
        };

        // hop-by-hop headers and those the client's Connection header names (never a protected one)
        let named: Vec<String> = parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .filter(|n| !n.is_empty() && !protected(n, &self.credential_headers))
            .collect();
        let te_trailers =
            header_str(&parts.headers, &header::TE).is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        for n in &named {
            parts.headers.remove(n.as_str());
        }
        if !websocket {
            parts.headers.remove(header::UPGRADE);
        }
        // the client's copies of our headers (only portcullis sets them), of the forwarding headers
        // the shim sets or that would tell the upstream another client, host or path, and of
        // Envoy's internal headers (Envoy strips those from external requests too)
        let ours: Vec<HeaderName> = parts
            .headers
            .keys()
            .filter(|k| {
                let k = k.as_str();
                k.starts_with("x-portcullis-") || k.starts_with("x-envoy-") || STRIPPED.contains(&k)
            })
            .cloned()
            .collect();
        for k in ours {
            parts.headers.remove(k);
        }

        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header_str(&parts.headers, &header::HOST).map(str::to_owned))
            .unwrap_or_default();
        let method = parts.method.as_str().to_owned();
        // one Host, the one decided (an absolute-form target or :authority wins, as in Envoy)
        match HeaderValue::from_str(&host) {
            Ok(v) if !host.is_empty() => {
                parts.headers.insert(header::HOST, v);
            }
            _ => return json_response(StatusCode::BAD_REQUEST, "missing or invalid Host", id),
        }
        // HTTP/2 splits cookies into several fields; they are one field again (RFC 9113 8.2.3)
        if parts.headers.get_all(header::COOKIE).iter().count() > 1 {
            let joined: Vec<u8> =
                parts.headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()).collect::<Vec<_>>().join(&b"; "[..]);
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                parts.headers.insert(header::COOKIE, v);
            }
        }
        let protocol = match parts.version {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };

        // X-Forwarded-For by the trusted-hop rule: a trusted peer's list is kept, anyone else's
        // dropped; the decision sees that list, the upstream that list plus the peer
        let peer_trusted = trusted(cfg, conn.peer.ip());
        let client_xff: Option<String> = if peer_trusted {
            let all: Vec<&str> =
                parts.headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
            if all.is_empty() { None } else { Some(all.join(", ")) }
        } else {
            None
        };
        parts.headers.remove("x-forwarded-for");
        if let Some(x) = client_xff.as_deref().and_then(|x| HeaderValue::from_str(x).ok()) {
            parts.headers.insert("x-forwarded-for", x);
        }
        parts.headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
        if let Ok(v) = HeaderValue::from_str(id) {
            parts.headers.insert(HeaderName::from_static("x-request-id"), v);
        }

        // the decision
        let line = authz::RequestLine {
            method: &method,
            path_and_query: &path_and_query,
            host: &host,
            protocol,
            request_id: id,
        };
        let check = authz::check_request(conn, &line, &parts.headers, clock::unix_millis());
        let mut client = self.authz.clone();
        let mut call = tonic::Request::new(check);
        call.set_timeout(cfg.portcullis.timeout);
        let t = clock::instant();
        let answer = client.check(call).await;
        self.metrics.check_duration.observe(t.elapsed().as_secs_f64());
        // towards the client, applied to the upstream's response as Envoy's encoder filters run
        // (last filter first): the ratelimit answer's headers, then ext_authz's with their actions
        let mut rl_headers = HeaderMap::new();
        let mut authz_headers: Vec<proto::types::HeaderValueOption> = Vec::new();
        let mut metadata = None;
        match answer {
            Err(e) => {
                self.metrics.checks.get_or_create(&Outcome { outcome: "error" }).inc();
                if let Some(suppressed) = CHECK_FAILED.allow(clock::instant()) {
                    tracing::warn!(error = %e, request_id = %id, suppressed, "ext_authz Check failed");
                }
                if !cfg.portcullis.failure_mode_allow {
                    return json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the authorization service is unavailable",
                        id,
                    );
                }
            }
            Ok(r) => {
                // the failures left out of the log, reported once Check answers again
                if let Some(suppressed) = CHECK_FAILED.recovered(clock::instant) {
                    tracing::info!(suppressed, "ext_authz Check answers again");
                }
                let r = r.into_inner();
                match r.http_response {
                    Some(HttpResponse::DeniedResponse(d)) => {
                        self.metrics.checks.get_or_create(&Outcome { outcome: "denied" }).inc();
                        let status = d
                            .status
                            .and_then(|s| u16::try_from(s.code).ok())
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .filter(|s| s.as_u16() >= 200)
                            .unwrap_or(StatusCode::FORBIDDEN);
                        let mut resp = Response::new(full(d.body));
                        *resp.status_mut() = status;
                        authz::apply_options(resp.headers_mut(), &d.headers);
                        return resp;
                    }
                    Some(HttpResponse::OkResponse(ok)) if r.status.as_ref().is_none_or(|s| s.code == 0) => {
                        self.metrics.checks.get_or_create(&Outcome { outcome: "allowed" }).inc();
                        for name in &ok.headers_to_remove {
                            // Envoy never lets a check remove pseudo-headers or Host
                            if !name.starts_with(':') && !name.eq_ignore_ascii_case("host") {
                                parts.headers.remove(name.as_str());
                            }
                        }
                        authz::apply_options(&mut parts.headers, &ok.headers);
                        authz_headers = ok.response_headers_to_add;
                        metadata = r.dynamic_metadata;
                    }
                    None if r.status.as_ref().is_none_or(|s| s.code == 0) => {
                        self.metrics.checks.get_or_create(&Outcome { outcome: "allowed" }).inc();
                        metadata = r.dynamic_metadata;
                    }
                    _ => {
                        // a non-OK status without a denied response: Envoy answers 403
                        self.metrics.checks.get_or_create(&Outcome { outcome: "denied" }).inc();
                        let mut resp = Response::new(full(Bytes::new()));
                        *resp.status_mut() = StatusCode::FORBIDDEN;
                        return resp;
                    }
                }
            }
        }

        let lease = header_str(&parts.headers, &HeaderName::from_static(LEASE_HEADER)).map(str::to_owned);
        // sent when dropped, whichever way this request ends from here on
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut completion = CompleteOnDrop(lease.filter(|l| !l.is_empty()).map(|lease| Completion {
            shim: self.clone(),
            renewal: renew(self.clone(), lease.clone(), cfg.portcullis.lease_renew_interval, started, progress.clone()),
            lease,
            request_id: id.to_owned(),
            status: 0,
            started,
            upstream_error: false,
            _pending: self.pending.enter(),
        }));

        // the ratelimit filter, after ext_authz as in the example Envoy config
        if let (Some(rl), Some(client)) = (&cfg.portcullis.ratelimit, &self.ratelimit) {
            let request = authz::ratelimit_request(&rl.domain, conn.peer, metadata.as_ref(), &path_and_query);
            let mut call = tonic::Request::new(request);
            call.set_timeout(rl.timeout);
            match client.clone().should_rate_limit(call).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let mut extra = HeaderMap::new();
                    for h in &r.response_headers_to_add {
                        if let (Ok(n), Ok(v)) =
                            (HeaderName::from_bytes(h.key.as_bytes()), HeaderValue::from_str(&h.value))
                        {
                            extra.append(n, v);
                        }
                    }
                    if r.overall_code == RlCode::OverLimit as i32 {
                        let mut resp = Response::new(full(r.raw_body));
                        *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        resp.headers_mut().insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
                        completion.set(429, false);
                        return decided(resp, &extra, &authz_headers);
                    }
                    for h in &r.request_headers_to_add {
                        if let (Ok(n), Ok(v)) =
                            (HeaderName::from_bytes(h.key.as_bytes()), HeaderValue::from_str(&h.value))
                        {
                            parts.headers.insert(n, v);
                        }
                    }
                    rl_headers = extra;
                }
                Err(e) if rl.failure_mode_deny => {
                    if let Some(suppressed) = RATELIMIT_FAILED.allow(clock::instant()) {
                        tracing::warn!(error = %e, request_id = %id, suppressed, "ratelimit call failed");
                    }
                    // Envoy's ratelimit filter answers 500 with failure_mode_deny
                    completion.set(500, false);
                    let resp =
                        json_response(StatusCode::INTERNAL_SERVER_ERROR, "the rate limit service is unavailable", id);
                    return decided(resp, &HeaderMap::new(), &authz_headers);
                }
                Err(e) => {
                    if let Some(suppressed) = RATELIMIT_FAILED.allow(clock::instant()) {
                        tracing::warn!(error = %e, request_id = %id, suppressed, "ratelimit call failed; allowed (failure_mode_deny: false)");
                    }
                }
            }
        }

        // towards the upstream
        let mut xff = client_xff.unwrap_or_default();
        if !xff.is_empty() {
            xff.push_str(", ");
        }
        xff.push_str(&conn.peer.ip().to_string());
        if let Ok(v) = HeaderValue::from_str(&xff) {
            parts.headers.insert("x-forwarded-for", v);
        }
        if let Ok(v) = HeaderValue::from_str(&host) {
            parts.headers.insert(HeaderName::from_static("x-forwarded-host"), v.clone());
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, v);
            }
        }
        if te_trailers {
            parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if websocket {
            parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let up = &cfg.upstream;
        let uri = format!(
            "{}://{}{}",
            up.url.scheme_str().unwrap_or("http"),
            up.url.authority().map_or("", |a| a.as_str()),
            path_and_query
        );
        let Ok(uri) = uri.parse::<hyper::Uri>() else {
            completion.set(400, false);
            return decided(
                json_response(StatusCode::BAD_REQUEST, "invalid request target", id),
                &rl_headers,
                &authz_headers,
            );
        };
        let flag = Arc::new(AtomicU8::new(0));
        let mut client_upgrade = None;
        let body: crate::upstream::UpBody = if websocket {
            // the client's side of the upgrade is taken once the upstream agreed
            let mut r = Request::from_parts(parts, body);
            client_upgrade = Some(hyper::upgrade::on(&mut r));
            parts = r.into_parts().0;
            full_io(Bytes::new())
        } else {
            Guarded {
                inner: body,
                seen: 0,
                max: cfg.limits.max_body_bytes,
                idle: cfg.limits.idle_body_timeout,
                timer: Box::pin(tokio::time::sleep(cfg.limits.idle_body_timeout)),
                flag: flag.clone(),
            }
            .boxed()
        };
        parts.uri = uri;
        parts.version = if up.http2 { Version::HTTP_2 } else { Version::HTTP_11 };
        if up.http2 {
            parts.headers.remove(header::HOST);
        }
        let upstream_req = Request::from_parts(parts, body);
        let sent = tokio::time::timeout(up.response_timeout, self.upstream.request(upstream_req)).await;
        let mut up_resp = match sent {
            Err(_) => {
                self.metrics.upstream_errors.get_or_create(&Outcome { outcome: "timeout" }).inc();
                completion.set(504, true);
                let resp = json_response(StatusCode::GATEWAY_TIMEOUT, "the upstream did not answer in time", id);
                return decided(resp, &rl_headers, &authz_headers);
            }
            Ok(Err(e)) => {
                let (status, message, kind, upstream_error) = match flag.load(Ordering::SeqCst) {
                    TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large", "client_body", false),
                    IDLE => (StatusCode::REQUEST_TIMEOUT, "the request body stalled", "client_body", false),
                    _ if e.is_connect() => {
                        (StatusCode::BAD_GATEWAY, "the upstream could not be reached", "connect", true)
                    }
                    _ => (StatusCode::BAD_GATEWAY, "the upstream failed", "reset", true),
                };
                self.metrics.upstream_errors.get_or_create(&Outcome { outcome: kind }).inc();
                if let Some(suppressed) = UPSTREAM_FAILED.allow(clock::instant()) {
                    tracing::warn!(error = ?e, request_id = %id, suppressed, "upstream request failed");
                }
                completion.set(status.as_u16(), upstream_error);
                return decided(json_response(status, message, id), &rl_headers, &authz_headers);
            }
            Ok(Ok(r)) => r,
        };

        let status = up_resp.status();
        if websocket && status == StatusCode::SWITCHING_PROTOCOLS {
            let server_upgrade = hyper::upgrade::on(&mut up_resp);
            if let Some(client_upgrade) = client_upgrade {
                completion.set(101, false);
                let idle = cfg.limits.stream_idle_timeout;
                tokio::spawn(async move {
                    let _guard = completion;
                    if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                        tunnel(
                            hyper_util::rt::TokioIo::new(c),
                            hyper_util::rt::TokioIo::new(s),
                            idle,
                            started,
                            progress,
                        )
                        .await;
                    }
                });
            }
            let (mut rparts, _) = up_resp.into_parts();
            add_decided_headers(&mut rparts.headers, &rl_headers, &authz_headers);
            return Response::from_parts(rparts, full(Bytes::new()));
        }

        let (mut rparts, rbody) = up_resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        add_decided_headers(&mut rparts.headers, &rl_headers, &authz_headers);
        rparts.version = Version::HTTP_11;
        completion.set(status.as_u16(), status.is_server_error());
        let idle = cfg.limits.stream_idle_timeout;
        let body = Completing {
            inner: rbody,
            done: completion,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            started,
            progress,
        };
        Response::from_parts(rparts, body.boxed())
    }
}

/// Copies both ways until either side closes or nothing moves for `idle`.
async fn tunnel<A, B>(a: A, b: B, idle: Duration, started: Instant, progress: Arc<std::sync::atomic::AtomicU64>)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut up, mut down) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    loop {
        let moved = tokio::select! {
            r = ar.read(&mut up) => match r {
                Ok(n) if n > 0 => bw.write_all(&up[..n]).await.is_ok(),
                _ => false,
            },
            r = br.read(&mut down) => match r {
                Ok(n) if n > 0 => aw.write_all(&down[..n]).await.is_ok(),
                _ => false,
            },
            _ = tokio::time::sleep(idle) => false,
        };
        if !moved {
            let _ = aw.shutdown().await;
            let _ = bw.shutdown().await;
            return;
        }
        progress.store(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

fn full_io(b: Bytes) -> crate::upstream::UpBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Drops hop-by-hop headers and those a `Connection` header names from a response.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
    for n in named {
        h.remove(n.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4() {
        let a = request_id();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, request_id());
    }

    #[test]
    fn a_connection_header_cannot_name_what_is_protected() {
        let creds = vec!["x-api-key".to_string()];
        assert!(protected("x-api-key", &creds));
        assert!(protected("authorization", &creds));
        assert!(protected("x-portcullis-lease", &creds));
        assert!(!protected("x-custom", &creds));
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-custom"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }
}
