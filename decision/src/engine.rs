//! The engine glues the pure core to a store: plan, one store call, conclude. It holds the
//! policy behind an `ArcSwap`, so a reload swaps it atomically under live traffic.

use std::sync::Arc;

use arc_swap::ArcSwap;
use decision_core::decide::{AfterFailure, conclude_failure, failure_plan};
use decision_core::policy::Policy;
use decision_core::quota::Verdict;
use decision_core::rls::{self, DescriptorReq, RlsDecision};
use decision_core::{Decision, Request, conclude, plan, store_failed};

use crate::clock;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

/// The longest a request waits for a fetch its bearer token needs (the fetches carry their own,
/// shorter, timeouts; this bounds waiting behind another request's fetch).
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts what a policy's verifiers do in the background (fetching remote key sets); it ends by
/// itself when the policy is replaced and dropped. Outside a Tokio runtime (a unit test, the
/// CLI) nothing is started: the verifiers then fetch on first use.
fn start_background(policy: &Policy) {
    if let (Ok(rt), Some(work)) =
        (tokio::runtime::Handle::try_current(), policy.bearer.as_ref().and_then(|b| b.background()))
    {
        rt.spawn(work);
    }
}

pub struct Engine<S> {
    policy: ArcSwap<Policy>,
    store: S,
    pub metrics: Metrics,
    /// requests of this instance waiting for a slot
    pub(crate) waiters: crate::traffic::Waiters,
    /// the audit trail, when the policy has an `audit` section (set once by the server)
    audit: std::sync::OnceLock<Arc<crate::audit::Audit>>,
    /// live monitoring, when the policy has an `alerts` section (set once by the server)
    alerts: std::sync::OnceLock<Arc<crate::alerts::Monitor>>,
    /// the counters of the `local_share` degraded mode (used only while the store fails)
    local: crate::store::MemoryStore,
    /// whether the last store call failed and was answered from local shares
    degraded: std::sync::atomic::AtomicBool,
}

impl<S: Store> Engine<S> {
    pub fn new(policy: Arc<Policy>, store: S) -> Self {
        let metrics = Metrics::with_store_cache(store.over_limit_hits());
        metrics.policy_loaded(policy.routes.len());
        start_background(&policy);
        Engine {
            policy: ArcSwap::new(policy),
            store,
            metrics,
            waiters: Default::default(),
            audit: Default::default(),
            alerts: Default::default(),
            local: crate::store::MemoryStore::new(),
            degraded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Wakes this instance's waiters when the store says a slot was freed anywhere in the fleet
    /// (the server calls it once, inside its runtime).
    pub fn watch_freed(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.store.watch_freed(Arc::new(move |key: &str| {
            if let Some(engine) = weak.upgrade() {
                engine.waiters.freed(key);
            }
        }));
    }

    /// The policy in force (one atomic load; hold it for the whole request).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.metrics.policy_loaded(policy.routes.len());
        start_background(&policy);
        self.policy.store(policy);
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// The counters of the `local_share` degraded mode.
    pub(crate) fn local_store(&self) -> &crate::store::MemoryStore {
        &self.local
    }

    /// Turns the audit trail on (once; later calls change nothing).
    pub fn set_audit(&self, audit: Arc<crate::audit::Audit>) {
        let _ = self.audit.set(audit);
    }

    pub fn audit(&self) -> Option<&Arc<crate::audit::Audit>> {
        self.audit.get()
    }

    /// Turns live monitoring on (once).
    pub fn set_alerts(&self, monitor: Arc<crate::alerts::Monitor>) {
        let _ = self.alerts.set(monitor);
    }

    pub fn alerts(&self) -> Option<&Arc<crate::alerts::Monitor>> {
        self.alerts.get()
    }

    /// An alert goes to the audit trail; a critical failed-auth alert that asks for it blocks
    /// the address (one store call, off the decision's own path).
    pub async fn raised(&self, policy: &Policy, raised: crate::alerts::Raised, zone: u64) {
        if let Some(ip) = raised.block
            && let Some(op) = decision_core::decide::block_raise(policy, ip, zone)
            && self.apply(std::slice::from_ref(&op), clock::now_micros()).await.is_ok()
        {
            tracing::warn!(client_ip = %ip, "address blocked by a critical failed-authentication alert");
        }
        if let Some(audit) = self.audit() {
            audit.record(raised.event);
        }
    }

    /// What live monitoring learns from a decision: failed authentications, payload sizes.
    async fn observe(&self, policy: &Policy, req: &Request<'_>, d: &Decision) {
        let Some(m) = self.alerts() else { return };
        if let Some(size) = req.content_length
            && let Some(r) = m.payload(size)
        {
            self.raised(policy, r, d.ctx.zone).await;
        }
        if decision_core::decide::is_auth_failure(d.reason)
            && let Some(ip) = d.ctx.client_ip
            && let Some(r) = m.failed_auth(ip)
        {
            self.raised(policy, r, d.ctx.zone).await;
        }
    }

    /// One store call for a plan's operations, bounded by the store's timeout.
    async fn apply(&self, ops: &[decision_core::plan::Op], now: u64) -> Result<Vec<Verdict>, StoreError> {
        self.apply_admitting(ops, now, None).await.map(|(v, _)| v)
    }

    /// `apply`, and with `admission` (an upstream's key, a new lease id, the traffic settings), a
    /// slot asked for in the same store call when the plan commits. When the store fails under
    /// `local_share`, the plan is answered from the local shares and no slot comes back (the
    /// caller asks for one as usual).
    pub(crate) async fn apply_admitting(
        &self,
        ops: &[decision_core::plan::Op],
        now: u64,
        admission: Option<(&str, &str, &decision_core::traffic::TrafficConfig)>,
    ) -> Result<crate::store::Planned, StoreError> {
        let call = async {
            match admission {
                None => self.store.apply(ops, now).await.map(|v| (v, None)),
                Some((upstream, lease, cfg)) => self.store.apply_admit(ops, upstream, lease, cfg, now).await,
            }
        };
        let answer = match self.store.timeout() {
            None => call.await,
            Some(t) => match tokio::time::timeout(t, call).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(t)),
            },
        };
        let failed = match answer {
            Ok((v, admitted)) if v.len() == ops.len() => {
                if self.degraded.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!(backend = self.store.backend(), "store reachable again: shared limits are back");
                }
                return Ok((v, admitted));
            }
            Ok((v, _)) => StoreError::Unavailable(format!("{} verdicts for {} operations", v.len(), ops.len())),
            Err(e) => e,
        };
        tracing::warn!(backend = self.store.backend(), error = %failed, "store call failed");
        self.metrics.store_error(self.store.backend());
        match self.store.local_share() {
            // `local_share`: each instance enforces its share of every limit from memory
            Some(n) => {
                if !self.degraded.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        expected_instances = n,
                        "store unreachable: enforcing each limit's local share (1/{n}) from memory"
                    );
                }
                self.metrics.local_share();
                let shared: Vec<decision_core::plan::Op> =
                    ops.iter().map(|op| decision_core::plan::Op { limit: op.limit.share(n), ..op.clone() }).collect();
                Ok((self.local.apply_now(&shared, now), None))
            }
            None => Err(failed),
        }
    }

    /// Decides an Envoy ratelimit (RLS) request: every descriptor in one store call. A store
    /// failure is an error, so the RLS adapter answers UNAVAILABLE and Envoy's own
    /// `failure_mode_deny` applies.
    pub async fn rate_limit(
        &self,
        policy: &Policy,
        domain: &str,
        descriptors: &[DescriptorReq<'_>],
    ) -> Result<RlsDecision, StoreError> {
        let plan = rls::plan(&policy.ratelimit, domain, descriptors);
        let verdicts =
            if plan.ops.is_empty() { Vec::new() } else { self.apply(&plan.ops, clock::now_micros()).await? };
        Ok(rls::conclude(plan, &verdicts))
    }

    /// Auto-block: a failed authentication is counted against its address (one store call,
    /// only on this path); an address already blocked, or whose failures just crossed the
    /// threshold, is answered 403 `ip_blocked`. A store failure here keeps the 401.
    async fn after_failed_auth(&self, policy: &Policy, d: Decision, now: u64) -> Decision {
        let Some(ops) = failure_plan(policy, &d) else { return d };
        let Ok(v) = self.apply(&ops, now).await else { return d };
        match conclude_failure(policy, d.clone(), &v) {
            AfterFailure::Answer(answer) => answer,
            AfterFailure::Block { raise, blocked } => match self.apply(std::slice::from_ref(&raise), now).await {
                Ok(_) => {
                    tracing::warn!(client_ip = ?blocked.ctx.client_ip, "address blocked after repeated failed authentications");
                    blocked
                }
                Err(_) => d,
            },
        }
    }

    /// Runs the fetch the bearer verifier asks for after refusing a token, if any: on a task of
    /// its own, so a client that gives up does not cancel it halfway, and awaited at most
    /// `FETCH_WAIT`. True when there was one to wait for.
    async fn fetch_for(&self, policy: &Policy, req: &Request<'_>, reason: decision_core::Reason) -> bool {
        let (Some(verifier), Some(auth)) = (&policy.bearer, req.authorization) else { return false };
        let Some(token) = decision_core::identity::bearer_token(auth) else { return false };
        let Some(fetch) = verifier.fetch_for(token, reason) else { return false };
        let _ = tokio::time::timeout(FETCH_WAIT, tokio::spawn(fetch)).await;
        true
    }

    /// Decides one request under `policy`: at most one store call (a bearer token that needs
    /// a fetch first, an unknown `kid` or an introspection miss, waits for it and is decided
    /// again).
    pub async fn decide(&self, policy: &Policy, req: &Request<'_>) -> Decision {
        let d = self.decide_inner(policy, req).await;
        if self.alerts.get().is_some() {
            Box::pin(self.observe(policy, req, &d)).await;
        }
        d
    }

    async fn decide_inner(&self, policy: &Policy, req: &Request<'_>) -> Decision {
        let mut now = clock::now_micros();
        let plan = match plan(policy, req, now) {
            Ok(p) => p,
            Err(d) => match Box::pin(self.fetch_for(policy, req, d.reason)).await {
                false => return Box::pin(self.after_failed_auth(policy, *d, now)).await,
                true => {
                    now = clock::now_micros();
                    match plan(policy, req, now) {
                        Ok(p) => p,
                        Err(d) => return Box::pin(self.after_failed_auth(policy, *d, now)).await,
                    }
                }
            },
        };
        // under `traffic`, the plan and the slot are asked for in one store call where the store
        // can make it one (else the slot has its own call, and its own timeout, in take_slot)
        let slot = policy.traffic.as_ref().zip(plan.ctx.route.and_then(|i| policy.routes.get(i)));
        let lease = slot.map(|_| crate::traffic::random_hex());
        let admission = slot
            .zip(lease.as_deref())
            .filter(|_| self.store.admits_with_plan())
            .map(|((cfg, route), l)| (&*route.upstream_key, l, cfg));
        let (d, first) = if plan.ops.is_empty() {
            (conclude(policy, plan, &[]), None)
        } else {
            match self.apply_admitting(&plan.ops, now, admission).await {
                Ok((verdicts, first)) => (conclude(policy, plan, &verdicts), first),
                Err(_) => (store_failed(policy, plan), None),
            }
        };
        // A slot comes back only with a committed plan, and an ext_authz plan has no shadow
        // operation, so a committed plan is an allowed request: none is granted to a denial.
        match (slot, lease, d.reason) {
            // an allowed request takes a concurrency slot of its route's upstream; boxed: the
            // waiting loop's future is large, and every decision would carry it
            (Some((cfg, route)), Some(lease), decision_core::Reason::Allowed) => {
                Box::pin(self.take_slot(policy, cfg, route, d, lease, first)).await
            }
            _ => d,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::Path;

    use decision_core::Reason;

    use super::*;
    use crate::store::MemoryStore;

    const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";
    const BUSINESS: &str = "pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m";
    const SERVICE: &str = "pk_demo_service_k1-mDUeWOB7yj39g_aZ3tBG8";
    const ADMIN: &str = "pk_demo_admin_dgBU1nZu-FWNNXcyKorzEKKe";
    const REVOKED: &str = "pk_demo_revoked_qRGEEUIheBQGutgkAFQOPeSq";

    /// GET /api/v1/x with the demo basic key, from loopback.
    fn basic_get() -> Request<'static> {
        Request {
            method: "GET",
            path: "/api/v1/x",
            peer: "127.0.0.1".parse().expect("ip"),
            forwarded_for: None,
            content_length: None,
            header_bytes: 10,
            api_key: Some(BASIC),
            authorization: None,
        }
    }

    fn reference() -> Arc<Policy> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        crate::config::load(&dir.join("policy.yaml")).unwrap_or_else(|e| panic!("{e}")).policy
    }

    struct Case {
        method: &'static str,
        path: &'static str,
        peer: &'static str,
        xff: Option<&'static str>,
        key: Option<&'static str>,
        bearer: bool,
        /// a raw authorization header (overrides `bearer`)
        auth: Option<&'static str>,
        content_length: Option<u64>,
        want: Reason,
    }

    const fn case(method: &'static str, path: &'static str, key: Option<&'static str>, want: Reason) -> Case {
        Case { method, path, peer: "127.0.0.1", xff: None, key, bearer: false, auth: None, content_length: None, want }
    }

    #[tokio::test]
    async fn the_reference_policy_decides_as_its_comments_say() {
        let policy = reference();
        let table = [
            case("GET", "/health", None, Reason::Allowed),
            case("GET", "/health?verbose=1", None, Reason::Allowed),
            case("GET", "/api/v1/users", None, Reason::CredentialMissing),
            case("GET", "/api/v1/users", Some(BASIC), Reason::Allowed),
            case("get", "/api/v1/users", Some(BASIC), Reason::Allowed),
            case("HEAD", "/api/v1/users", Some(BASIC), Reason::Allowed),
            case("POST", "/api/v1/users", Some(BASIC), Reason::RoleForbidden),
            case("POST", "/api/v1/users", Some(BUSINESS), Reason::Allowed),
            case("DELETE", "/api/v1/users/1", Some(ADMIN), Reason::Allowed),
            case("GET", "/api/v1/users", Some(SERVICE), Reason::RoleForbidden),
            case("GET", "/api/v1/users", Some("pk_guess"), Reason::ApiKeyUnknown),
            case("GET", "/api/v1/users", Some(""), Reason::ApiKeyUnknown),
            case("GET", "/api/v1/users", Some(REVOKED), Reason::ApiKeyRevoked),
            case("GET", "/internal/jobs", Some(SERVICE), Reason::Allowed),
            case("GET", "/internal/jobs", Some(ADMIN), Reason::RoleForbidden),
            case("GET", "/admin/users", Some(ADMIN), Reason::FreshAuthRequired),
            case("GET", "/ADMIN/users", Some(BASIC), Reason::FreshAuthRequired),
            case("GET", "/api/v1/../../admin/users", Some(BASIC), Reason::FreshAuthRequired),
            case("GET", "/api/v1/%2e%2e/%2e%2e/admin", Some(BASIC), Reason::FreshAuthRequired),
            case("GET", "/api/v1/%2e%2e/admin", Some(BASIC), Reason::NoRoute),
            case("GET", "/api/v1/../../../etc/passwd", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1%2f..%2fadmin", Some(BASIC), Reason::BadPath),
            case("GET", "/nowhere", Some(ADMIN), Reason::NoRoute),
            // segments an upstream reads as `..` once it drops `;` parameters, decodes again or
            // applies NFKC; and an encoding whose further decoding would meet another rule
            case("GET", "/api/v1/..;/admin/users", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1/%2e%2e;/admin/users", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1/%2E%2E%3Bx=1/admin/users", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1/%252e%252e/%252e%252e/admin/x", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1/\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/admin/x", Some(BASIC), Reason::BadPath),
            case("GET", "/%2561dmin/users", Some(BASIC), Reason::BadPath),
            case("GET", "/\u{ff41}dmin/users", Some(BASIC), Reason::BadPath),
            case("GET", "/api/v1/%2561dmin", Some(BASIC), Reason::Allowed),
            case("GET", "/api/v1/a;v=1", Some(BASIC), Reason::Allowed),
            case("GET", "/api/v1/x/y/;/;/../../../../admin/users", Some(BASIC), Reason::BadPath),
            case(
                "GET",
                "/api/v1/%25252525252e%25252525252e/%25252525252e%25252525252e/admin/x",
                Some(BASIC),
                Reason::BadPath,
            ),
            case("GET", "/api/v1/\u{ff05}2e\u{ff05}2e/\u{ff05}2e\u{ff05}2e/admin/x", Some(BASIC), Reason::BadPath),
            case("PATCH", "/health", None, Reason::Allowed),
            // the reference issuer is live: a token naming no issuer proves nothing
            Case { bearer: true, ..case("GET", "/api/v1/users", None, Reason::JwtUnknownIssuer) },
            Case { auth: Some("Bearer\u{e9}tok"), ..case("GET", "/api/v1/users", None, Reason::CredentialMissing) },
            Case { auth: Some("Beareré"), ..case("GET", "/api/v1/users", None, Reason::CredentialMissing) },
            Case {
                auth: Some("Bearer \u{e9}\u{e9}\u{e9}"),
                ..case("GET", "/api/v1/users", None, Reason::JwtMalformed)
            },
            // an API key and a bearer token (here one that would not verify): neither is believed
            Case { bearer: true, ..case("GET", "/api/v1/users", Some(BASIC), Reason::AmbiguousCredentials) },
            Case {
                auth: Some("Basic dTpw"),
                ..case("GET", "/api/v1/users", Some(BASIC), Reason::AmbiguousCredentials)
            },
            Case { bearer: true, ..case("GET", "/health", Some(BASIC), Reason::Allowed) },
            Case { auth: Some(" "), ..case("GET", "/api/v1/users", Some(BASIC), Reason::Allowed) },
            Case { content_length: Some(5 << 20), ..case("POST", "/api/v1/u", Some(BUSINESS), Reason::Allowed) },
            Case {
                content_length: Some((5 << 20) + 1),
                ..case("POST", "/api/v1/u", Some(BUSINESS), Reason::BodyTooLarge)
            },
            Case { xff: Some("198.51.100.9"), ..case("GET", "/health", None, Reason::IpDenied) },
            Case { peer: "198.51.100.9", ..case("GET", "/health", None, Reason::IpDenied) },
            // an untrusted peer's forwarded-for is not believed: 10.x does not make it internal
            Case {
                peer: "8.8.8.8",
                xff: Some("10.1.2.3"),
                ..case("GET", "/internal/x", Some(SERVICE), Reason::ZoneForbidden)
            },
            Case { xff: Some("10.1.2.3"), ..case("GET", "/internal/x", Some(SERVICE), Reason::Allowed) },
            Case { xff: Some("192.168.1.7"), ..case("GET", "/admin/x", Some(ADMIN), Reason::FreshAuthRequired) },
            Case { xff: Some("203.0.113.7"), ..case("GET", "/admin/x", Some(ADMIN), Reason::ZoneForbidden) },
            Case { xff: Some("not-an-ip"), ..case("GET", "/health", None, Reason::BadForwardedFor) },
            // empty list elements are ignored (RFC 9110 section 5.6.1): the client is the deny-listed one
            Case { xff: Some("198.51.100.7,"), ..case("GET", "/health", None, Reason::IpDenied) },
            Case { xff: Some(",198.51.100.7, ,"), ..case("GET", "/health", None, Reason::IpDenied) },
        ];
        for (i, c) in table.iter().enumerate() {
            // a fresh store each time, so no case spends another's quota
            let engine = Engine::new(policy.clone(), MemoryStore::new());
            let bearer = "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig";
            let req = Request {
                method: c.method,
                path: c.path,
                peer: c.peer.parse::<IpAddr>().expect("peer"),
                forwarded_for: c.xff,
                content_length: c.content_length,
                header_bytes: 100,
                api_key: c.key,
                authorization: c.auth.or(c.bearer.then_some(bearer)),
            };
            let d = engine.decide(&policy, &req).await;
            assert_eq!(
                d.reason,
                c.want,
                "case {i}: {} {} (key {:?}, xff {:?})",
                c.method,
                c.path,
                c.key.map(|_| "…"),
                c.xff
            );
        }
    }

    #[tokio::test]
    async fn a_stated_precedence_believes_one_credential_and_strips_the_other() {
        use proto::ext_authz::check_response::HttpResponse;
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy.yaml"))
                .expect("policy");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        for (precedence, header, want) in
            [("api_key", "authorization", Reason::Allowed), ("bearer", "x-api-key", Reason::JwtUnknownIssuer)]
        {
            let with = text.replacen("authentication:", &format!("authentication:\n  precedence: {precedence}"), 1);
            let policy = crate::config::parse(&with, &dir).unwrap_or_else(|e| panic!("{e:?}")).policy;
            let engine = Engine::new(policy.clone(), MemoryStore::new());
            let req = Request { authorization: Some("Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig"), ..basic_get() };
            let d = engine.decide(&policy, &req).await;
            assert_eq!(d.reason, want, "{precedence}");
            if d.allowed() {
                let answer = crate::api::ext_authz::answer(&d, &policy, "r1");
                let Some(HttpResponse::OkResponse(ok)) = answer.http_response else { panic!("an OK answer") };
                assert!(ok.headers_to_remove.iter().any(|h| h == header), "{precedence}: {:?}", ok.headers_to_remove);
            }
        }
        let bad = text.replacen("authentication:", "authentication:\n  precedence: both", 1);
        assert!(crate::config::parse(&bad, &dir).is_err());
    }

    #[tokio::test]
    async fn a_denied_request_consumes_no_quota() {
        // an untrusted client with a basic key: the zone limit (10/minute) refuses long before
        // the tier does, and the refused requests must not be charged to the tier
        let policy = reference();
        let engine = Engine::new(policy.clone(), MemoryStore::new());
        let req = |ip: &'static str| Request { forwarded_for: Some(ip), ..basic_get() };
        let mut reasons = Vec::new();
        for _ in 0..30 {
            reasons.push(engine.decide(&policy, &req("8.8.8.8")).await.reason);
        }
        assert_eq!(reasons.iter().filter(|r| **r == Reason::Allowed).count(), 10);
        assert_eq!(reasons.iter().filter(|r| **r == Reason::ZoneRateExceeded).count(), 20);
        let d = engine.decide(&policy, &req("10.0.0.1")).await;
        let burst = d.quotas.iter().find(|q| q.kind == decision_core::plan::OpKind::TierBurst).expect("burst quota");
        assert_eq!(burst.verdict.remaining, 100 - 11, "only the 10 allowed requests and this one were charged");
    }

    #[tokio::test]
    async fn the_daily_quota_warns_past_quota_warning() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy.yaml"))
                .expect("policy");
        let text = text.replacen(
            "basic:      { per_minute: 60,   burst: 100,  per_day: 5000 }",
            "basic: { per_minute: 60, burst: 100, per_day: 10 }",
            1,
        );
        let policy = crate::config::parse(&text, &Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples"))
            .expect("policy")
            .policy;
        let engine = Engine::new(policy.clone(), MemoryStore::new());
        let req = basic_get();
        let mut warnings = Vec::new();
        for _ in 0..11 {
            let d = engine.decide(&policy, &req).await;
            warnings.push((d.reason, d.quota_warning));
        }
        assert_eq!(warnings[6], (Reason::Allowed, None), "7 of 10 is under 80%");
        assert_eq!(warnings[7], (Reason::Allowed, Some(8000)), "8 of 10 reaches 80%");
        assert_eq!(warnings[9], (Reason::Allowed, Some(10000)));
        assert_eq!(warnings[10].0, Reason::DailyQuotaExceeded);
    }

    /// A store that fails every call, or never answers: what Redis down or paused looks like to
    /// the engine (the Redis store itself is its own issue; its fault tests use a real server).
    struct BrokenStore {
        hang: bool,
        /// `local_share`'s expected instances
        share: Option<u64>,
    }

    impl Store for BrokenStore {
        async fn apply(
            &self,
            _ops: &[decision_core::plan::Op],
            _now: u64,
        ) -> Result<Vec<decision_core::quota::Verdict>, StoreError> {
            if self.hang {
                std::future::pending::<()>().await;
            }
            Err(StoreError::Unavailable("connection refused".into()))
        }

        async fn admit(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: bool,
            _: &decision_core::traffic::TrafficConfig,
            _: u64,
        ) -> Result<(decision_core::traffic::Admit, crate::store::Occupied), StoreError> {
            if self.hang {
                std::future::pending::<()>().await;
            }
            Err(StoreError::Unavailable("connection refused".into()))
        }

        async fn leave(&self, _: &str, _: &str) -> Result<(), StoreError> {
            Err(StoreError::Unavailable("connection refused".into()))
        }

        async fn complete(
            &self,
            _: &str,
            _: &str,
            _: bool,
            _: u64,
            _: &decision_core::traffic::TrafficConfig,
            _: u64,
        ) -> Result<(bool, crate::store::Occupied), StoreError> {
            Err(StoreError::Unavailable("connection refused".into()))
        }

        fn backend(&self) -> &'static str {
            "broken"
        }

        fn local_share(&self) -> Option<u64> {
            self.share
        }

        fn timeout(&self) -> Option<std::time::Duration> {
            Some(std::time::Duration::from_millis(25))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn local_share_enforces_a_fraction_of_each_limit_while_the_store_fails() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let text = std::fs::read_to_string(dir.join("policy.yaml")).expect("policy");
        let policy = crate::config::parse(&text, &dir).expect("policy").policy;
        let engine = Engine::new(policy.clone(), BrokenStore { hang: false, share: Some(3) });
        let req = basic_get();
        let mut allowed = 0;
        for _ in 0..50 {
            let d = engine.decide(&policy, &req).await;
            match d.reason {
                Reason::Allowed => allowed += 1,
                Reason::TierRateExceeded => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(allowed, 33, "the basic burst (100) shared by 3 instances, instead of on_store_error");
        // 50 quota calls, and a concurrency slot for each of the 33 allowed
        let m = engine.metrics.encode();
        assert!(m.contains("portcullis_store_local_share_calls_total 83"), "{m}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_or_hanging_store_is_answered_by_on_store_error() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let text = std::fs::read_to_string(dir.join("policy.yaml")).expect("policy");
        let deny = crate::config::parse(&text, &dir).expect("policy").policy;
        let allow = crate::config::parse(&text.replacen("on_store_error: deny", "on_store_error: allow", 1), &dir)
            .expect("policy")
            .policy;
        let req = basic_get();
        for hang in [false, true] {
            let engine = Engine::new(deny.clone(), BrokenStore { hang, share: None });
            let d = engine.decide(&deny, &req).await;
            assert_eq!((d.reason, d.status()), (Reason::StoreUnavailable, 503), "hang: {hang}");
            let engine = Engine::new(allow.clone(), BrokenStore { hang, share: None });
            let d = engine.decide(&allow, &req).await;
            assert_eq!((d.reason, d.status()), (Reason::AllowedStoreUnavailable, 200), "hang: {hang}");
            assert!(engine.metrics.encode().contains("portcullis_store_errors_total{backend=\"broken\"} 1"));
            let answer = crate::api::ext_authz::answer(&d, &allow, "r1");
            let Some(proto::ext_authz::check_response::HttpResponse::OkResponse(ok)) = answer.http_response else {
                panic!("allowed answer expected");
            };
            assert!(
                ok.headers.iter().any(|h| h.header.as_ref().is_some_and(|h| h.key == "x-portcullis-degraded")),
                "marked"
            );
        }
        // checks that need no counter still answer precisely
        let engine = Engine::new(deny.clone(), BrokenStore { hang: true, share: None });
        let d = engine.decide(&deny, &Request { api_key: Some(REVOKED), ..req }).await;
        assert_eq!(d.reason, Reason::ApiKeyRevoked);
    }

    #[tokio::test(start_paused = true)]
    async fn ratelimit_calls_fail_when_the_store_fails_so_envoy_decides() {
        let policy = reference();
        let descriptors = [decision_core::rls::DescriptorReq {
            entries: vec![("remote_address", "10.0.0.1")],
            limit_override: None,
            hits: 1,
        }];
        for hang in [false, true] {
            let engine = Engine::new(policy.clone(), BrokenStore { hang, share: None });
            let r = engine.rate_limit(&policy, "edge", &descriptors).await;
            assert!(r.is_err(), "hang: {hang}");
        }
        // nothing to count: no store call, so no failure
        let engine = Engine::new(policy.clone(), BrokenStore { hang: true, share: None });
        let unlimited =
            [decision_core::rls::DescriptorReq { entries: vec![("path", "/health")], limit_override: None, hits: 1 }];
        assert!(engine.rate_limit(&policy, "edge", &unlimited).await.is_ok());
    }

    #[tokio::test]
    async fn api_keys_rotate_by_their_validity_window() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let text = std::fs::read_to_string(dir.join("policy.yaml")).expect("policy");
        // the basic key expired long ago; the business key becomes valid far in the future;
        // the enterprise key is inside its window
        let text = text
            .replacen(
                "        tier: basic
",
                "        tier: basic
        expires_at: 2001-01-01T00:00:00Z
",
                1,
            )
            .replacen(
                "        tier: business
",
                "        tier: business
        not_before: 2999-01-01T00:00:00Z
",
                1,
            )
            .replacen(
                "        tier: enterprise
",
                "        tier: enterprise
        not_before: 2001-01-01T00:00:00Z
        expires_at: 2999-01-01T00:00:00+02:00
",
                1,
            );
        let policy = crate::config::parse(&text, &dir).unwrap_or_else(|e| panic!("{e:?}")).policy;
        let engine = Engine::new(policy.clone(), MemoryStore::new());
        for (key, want) in [
            (BASIC, Reason::ApiKeyExpired),
            ("pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m", Reason::ApiKeyNotYetValid),
            ("pk_demo_enterprise_DR0FrukJrixiiVxml8E7DJmI", Reason::Allowed),
        ] {
            let d = engine.decide(&policy, &Request { api_key: Some(key), ..basic_get() }).await;
            assert_eq!(d.reason, want);
        }
        let bad = crate::config::parse(
            &text.replacen("expires_at: 2001-01-01T00:00:00Z", "expires_at: last tuesday", 1),
            &dir,
        )
        .expect_err("bad timestamp");
        assert!(
            bad.iter()
                .any(|p| p.path == "authentication.api_keys.keys[0].expires_at" && p.message.contains("RFC 3339")),
            "{bad:?}"
        );
    }

    #[tokio::test]
    async fn repeated_failed_authentications_block_the_address_fleet_wide() {
        // reference: 10 failures within 1m block the address for 15m
        let policy = reference();
        let engine = Engine::new(policy.clone(), MemoryStore::new());
        let from = |ip: &'static str, key: &'static str| Request {
            forwarded_for: Some(ip),
            api_key: Some(key),
            ..basic_get()
        };
        let mut reasons = Vec::new();
        for _ in 0..11 {
            reasons.push(engine.decide(&policy, &from("8.8.8.8", "pk_guess")).await.reason);
        }
        assert_eq!(reasons[..9], [Reason::ApiKeyUnknown; 9]);
        assert_eq!(reasons[9..], [Reason::IpBlocked; 2], "the 10th failure blocks");
        let d = engine.decide(&policy, &from("8.8.8.8", BASIC)).await;
        assert_eq!((d.reason, d.status()), (Reason::IpBlocked, 403), "a valid key does not unblock the address");
        assert!(d.retry_after.is_some_and(|r| r > 14 * 60 * 1_000_000));
        assert!(d.quotas.iter().all(|q| q.kind != decision_core::plan::OpKind::Block), "no block in RateLimit headers");
        assert_eq!(
            engine.decide(&policy, &from("8.8.4.4", BASIC)).await.reason,
            Reason::Allowed,
            "other addresses are unaffected"
        );
        // a missing credential is not a failed authentication
        for _ in 0..12 {
            let d =
                engine.decide(&policy, &Request { forwarded_for: Some("9.9.9.9"), api_key: None, ..basic_get() }).await;
            assert_eq!(d.reason, Reason::CredentialMissing);
        }
    }

    #[tokio::test]
    async fn exempt_zones_are_never_blocked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let text = std::fs::read_to_string(dir.join("policy.yaml")).expect("policy");
        let text = text.replacen("    block_for: 15m", "    block_for: 15m\n    exempt_zones: [internal]", 1);
        let policy = crate::config::parse(&text, &dir).unwrap_or_else(|e| panic!("{e:?}")).policy;
        let engine = Engine::new(policy.clone(), MemoryStore::new());
        for _ in 0..15 {
            let d = engine
                .decide(&policy, &Request { forwarded_for: Some("10.1.1.1"), api_key: Some("pk_guess"), ..basic_get() })
                .await;
            assert_eq!(d.reason, Reason::ApiKeyUnknown);
        }
    }
}
