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
        cost: 1,
        reserve: None,
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
        Case { auth: Some("Bearer \u{e9}\u{e9}\u{e9}"), ..case("GET", "/api/v1/users", None, Reason::JwtMalformed) },
        // an API key and a bearer token (here one that would not verify): neither is believed
        Case { bearer: true, ..case("GET", "/api/v1/users", Some(BASIC), Reason::AmbiguousCredentials) },
        Case { auth: Some("Basic dTpw"), ..case("GET", "/api/v1/users", Some(BASIC), Reason::AmbiguousCredentials) },
        Case { bearer: true, ..case("GET", "/health", Some(BASIC), Reason::Allowed) },
        Case { auth: Some(" "), ..case("GET", "/api/v1/users", Some(BASIC), Reason::Allowed) },
        Case { content_length: Some(5 << 20), ..case("POST", "/api/v1/u", Some(BUSINESS), Reason::Allowed) },
        Case { content_length: Some((5 << 20) + 1), ..case("POST", "/api/v1/u", Some(BUSINESS), Reason::BodyTooLarge) },
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
            cost: 1,
            reserve: None,
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
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy.yaml"))
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
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/policy.yaml"))
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

    async fn dry_run(
        &self,
        ops: &[decision_core::plan::Op],
        now: u64,
    ) -> Result<Vec<decision_core::quota::Verdict>, StoreError> {
        self.apply(ops, now).await
    }

    async fn admit(
        &self,
        _: &crate::store::Admission<'_>,
        _: bool,
        _: u64,
    ) -> Result<(decision_core::traffic::Admit, crate::store::UpstreamState), StoreError> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn leave(&self, _: &str, _: &str) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn renew(&self, _: &str, _: &str, _: u64, _: u64) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn settle(&self, _: &[String], _: u64, _: u64) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn adjust(&self, _: &[(String, decision_core::quota::Limit)], _: i64, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn forget(&self, _: &[String]) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn note_block(&self, _: &str, _: u64, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn unnote_block(&self, _: &str, _: u64) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn blocks(&self, _: u64) -> Result<Vec<(String, u64)>, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn key_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn keys_version(&self) -> Result<u64, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn key_record(&self, _: &str) -> Result<Option<String>, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn put_key_record(&self, _: &str, _: &str, _: Option<&str>) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn complete(
        &self,
        _: &crate::store::Release<'_>,
        _: u64,
    ) -> Result<(bool, crate::store::UpstreamState), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    fn backend(&self) -> &'static str {
        "broken"
    }

    fn local_share_instances(&self) -> Option<u64> {
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
        let r = engine.rate_limit(&policy, "edge", &descriptors, None).await;
        assert!(r.is_err(), "hang: {hang}");
    }
    // nothing to count: no store call, so no failure
    let engine = Engine::new(policy.clone(), BrokenStore { hang: true, share: None });
    let unlimited =
        [decision_core::rls::DescriptorReq { entries: vec![("path", "/health")], limit_override: None, hits: 1 }];
    assert!(engine.rate_limit(&policy, "edge", &unlimited, None).await.is_ok());
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
    let bad =
        crate::config::parse(&text.replacen("expires_at: 2001-01-01T00:00:00Z", "expires_at: last tuesday", 1), &dir)
            .expect_err("bad timestamp");
    assert!(
        bad.iter().any(|p| p.path == "authentication.api_keys.keys[0].expires_at" && p.message.contains("RFC 3339")),
        "{bad:?}"
    );
}

#[tokio::test]
async fn repeated_failed_authentications_block_the_address_fleet_wide() {
    // reference: 10 failures within 1m block the address for 15m
    let policy = reference();
    let engine = Engine::new(policy.clone(), MemoryStore::new());
    let from =
        |ip: &'static str, key: &'static str| Request { forwarded_for: Some(ip), api_key: Some(key), ..basic_get() };
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
        let d = engine.decide(&policy, &Request { forwarded_for: Some("9.9.9.9"), api_key: None, ..basic_get() }).await;
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

#[tokio::test(start_paused = true)]
async fn a_caller_deadline_cuts_a_hanging_store_call_short_and_is_no_store_failure() {
    let policy = reference();
    let engine = Engine::new(policy.clone(), BrokenStore { hang: true, share: None });
    let headers = Vec::new;
    let facts = |deadline| Facts {
        request_id: "r",
        method: "GET",
        target: "/api/v1/x",
        headers: &headers,
        dry_run: false,
        deadline,
        concurrency_slot: true,
    };
    // past already: nothing planned, no store call
    let past = clock::instant();
    let o = engine.check(&policy, Ok(basic_get()), &facts(Some(past)), clock::instant()).await;
    assert_eq!(o.decision.reason, Reason::DeadlineExceeded);
    // 10 ms left, a store that never answers (its own timeout is 25 ms): cut at 10 ms
    let soon = clock::instant() + std::time::Duration::from_millis(10);
    let o = engine.check(&policy, Ok(basic_get()), &facts(Some(soon)), clock::instant()).await;
    assert_eq!((o.decision.reason, o.decision.status()), (Reason::DeadlineExceeded, 504));
    let text = engine.metrics.encode();
    assert!(text.contains("reason=\"deadline_exceeded\"} 2"), "{text}");
    assert!(!text.contains("portcullis_store_errors_total{"), "the caller gave up; the store did not fail: {text}");
    // a failed authentication alike: its counter is not waited for past the deadline, and the
    // caller, gone, is told nothing about its credential
    let soon = clock::instant() + std::time::Duration::from_millis(10);
    let unknown = Request { api_key: Some("pk_nobody_knows_this_key"), ..basic_get() };
    let o = engine.check(&policy, Ok(unknown), &facts(Some(soon)), clock::instant()).await;
    assert_eq!(o.decision.reason, Reason::DeadlineExceeded);
    assert!(!engine.metrics.encode().contains("portcullis_store_errors_total{"));
    // the ratelimit path alike
    let descriptors = [decision_core::rls::DescriptorReq {
        entries: vec![("remote_address", "10.0.0.1")],
        limit_override: None,
        hits: 1,
    }];
    let soon = clock::instant() + std::time::Duration::from_millis(10);
    let r = engine.rate_limit(&policy, "edge", &descriptors, Some(soon)).await;
    assert!(matches!(r, Err(StoreError::DeadlineExceeded)), "{r:?}");
}
