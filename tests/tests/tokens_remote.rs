//! Bearer tokens whose trust comes over the network: an issuer's key set from `jwks_url`, and
//! opaque tokens checked by OAuth 2.0 introspection, both against `TestIssuer` (real TLS, the
//! test CA of tests/fixtures/tls) and the real portcullis binary, asked over gRPC as Envoy asks.
// Tokens are judged by portcullis's wall clock, so the test must make them with one too.
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proto::ext_authz::CheckResponse;
use proto::ext_authz::authorization_client::AuthorizationClient;
use serde_json::json;
use tests::{HttpClient, Portcullis, TestIssuer, check_request, denied_status, reference_policy, workspace_root};
use tonic::transport::Channel;

const ISS: &str = "https://auth.example.com/";
const AUD: &str = "portcullis-demo";
const CLIENT_ID: &str = "portcullis";
const SECRET: &str = "s3cret with spaces & symbols";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(workspace_root().join("tests/fixtures/jwt").join(name)).expect("fixture")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An RS256 token for `sub`, signed with `pem` under `kid`.
fn token(pem: &str, kid: &str, sub: &str) -> String {
    let n = now();
    let claims = json!({ "iss": ISS, "aud": AUD, "sub": sub, "exp": n + 300, "iat": n, "roles": ["user"] });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(fixture(pem).as_bytes()).expect("key");
    jsonwebtoken::encode(&h, &claims, &key).expect("sign")
}

/// A token shaped like an RS256 one under `kid`, with a signature that is not one.
fn unsigned(kid: &str) -> String {
    let b64 = |v: serde_json::Value| {
        tests::b64(v.to_string().as_bytes()).trim_end_matches('=').replace('+', "-").replace('/', "_")
    };
    let n = now();
    let header = b64(json!({ "alg": "RS256", "typ": "JWT", "kid": kid }));
    let claims = b64(json!({ "iss": ISS, "aud": AUD, "sub": "mallory", "exp": n + 300, "iat": n }));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

/// The reference policy with its issuer's keys at `issuer`'s jwks_url (a short refetch
/// cooldown) and, when `introspection`, opaque tokens checked at its endpoint.
fn policy(issuer: &TestIssuer, cooldown: &str, introspection: bool) -> String {
    let ca = TestIssuer::ca_file();
    let ca = ca.display();
    let mut p = reference_policy().replace(
        "      jwks_file: jwks.json      # or jwks_url (fetched, cached, refreshed on unknown kid)\n",
        &format!("      jwks_url: {}\n      ca_file: {ca}\n      jwks_cooldown: {cooldown}\n", issuer.jwks_url()),
    );
    assert!(p.contains("jwks_url"), "the reference policy's jwks_file line moved");
    if introspection {
        p = p.replace(
            "  # oauth2_introspection:",
            &format!(
                "  oauth2_introspection:\n    endpoint: {}\n    client_id: {CLIENT_ID}\n    client_secret_env: TEST_INTROSPECTION_SECRET\n    ca_file: {ca}\n    cache_ttl: 30s\n    timeout: 1s\n  # was:",
                issuer.introspection_url()
            ),
        );
    }
    p
}

async fn start(policy: &str) -> (Portcullis, AuthorizationClient<Channel>) {
    let p = Portcullis::start_with_env(policy, &[], &[("TEST_INTROSPECTION_SECRET", SECRET)])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let c = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    (p, c)
}

/// Asks for GET /api/v1/x with the token, each time from another address, so that auto-block
/// (after a few failures from one address) never answers in these tests' place.
async fn check(c: &mut AuthorizationClient<Channel>, token: &str) -> CheckResponse {
    static PEER: AtomicU32 = AtomicU32::new(0);
    let n = PEER.fetch_add(1, Ordering::Relaxed);
    let peer = format!("10.9.{}.{}", n / 256 % 256, n % 256);
    let auth = format!("Bearer {token}");
    c.check(check_request(&peer, "GET", "/api/v1/x", &[("authorization", &auth)])).await.expect("check").into_inner()
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn jwks_url_keys_are_fetched_and_a_rotation_needs_no_restart() {
    let issuer = TestIssuer::start(&fixture("jwks.json"), CLIENT_ID, SECRET).await.expect("issuer");
    let (p, mut c) = start(&policy(&issuer, "1s", false)).await;
    // fetched in the background at start
    wait_for("the first JWKS fetch", || issuer.jwks_fetches() >= 1).await;
    assert_eq!(denied_status(&check(&mut c, &token("rsa.pem", "test-rs", "alice")).await), None);

    // a kid the set lacks: a refetch (seen by the issuer), then 401 as it is still unknown
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the cooldown of the first fetch
    let before = issuer.jwks_fetches();
    let next = token("rsa-other.pem", "test-rs-next", "bob");
    assert_eq!(denied_status(&check(&mut c, &next).await), Some(401));
    assert_eq!(issuer.jwks_fetches(), before + 1, "an unknown kid refetches the key set");
    p.wait_for_decision("jwt_unknown_kid").await;

    // the issuer rotates: the new kid is fetched on demand and accepted, with no restart
    issuer.set_jwks(&fixture("jwks-rotated.json"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = check(&mut c, &next).await;
    assert_eq!(denied_status(&r), None, "{r:?}");
    assert_eq!(issuer.jwks_fetches(), before + 2);
    // a key dropped from the set is refused once the new set is in force
    assert_eq!(denied_status(&check(&mut c, &token("rsa.pem", "test-rs", "alice")).await), None);

    // the issuer goes down: the last good set stays in force
    issuer.set_down(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(denied_status(&check(&mut c, &token("rsa.pem", "unknown-kid", "eve")).await), Some(401));
    assert_eq!(denied_status(&check(&mut c, &next).await), None, "a failed fetch keeps the last good set");
    p.wait_for_log("the fetch failure", |l| l.contains("JWKS fetch failed")).await.expect("logged");
    // the verifier's counters reach /metrics: three good fetches (start, unknown kid, rotation)
    // and at least the one that failed
    assert!(metric(&p, "portcullis_jwks_fetches_total").await >= 3);
    assert!(metric(&p, "portcullis_jwks_fetch_errors_total").await >= 1);
}

/// One counter's value on the admin port's /metrics (0 when it is not there).
async fn metric(p: &Portcullis, name: &str) -> u64 {
    let body =
        HttpClient::new().request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not on /metrics:\n{body}"))
}

#[tokio::test]
async fn random_kids_cannot_make_portcullis_hammer_the_issuer() {
    let issuer = TestIssuer::start(&fixture("jwks.json"), CLIENT_ID, SECRET).await.expect("issuer");
    let (_p, c) = start(&policy(&issuer, "3s", false)).await;
    wait_for("the first JWKS fetch", || issuer.jwks_fetches() >= 1).await;
    tokio::time::sleep(Duration::from_millis(3100)).await; // the cooldown of the first fetch is over
    let before = issuer.jwks_fetches();
    // 1,000 tokens with random unknown kids, 20 at a time
    let mut tasks = Vec::new();
    for w in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                // the kid is refused before any signature work, so these need no real signature
                // (and signing 1,000 RSA tokens in a debug build takes a minute)
                let t = unsigned(&format!("random-{w}-{i}-{}", now()));
                // each from its own address, so that auto-block does not answer first
                let auth = format!("Bearer {t}");
                let req = check_request(&format!("10.1.{w}.{i}"), "GET", "/api/v1/x", &[("authorization", &auth)]);
                let r = c.check(req).await.expect("check").into_inner();
                assert_eq!(denied_status(&r), Some(401), "{r:?}");
            }
        }));
    }
    let started = std::time::Instant::now();
    for t in tasks {
        t.await.expect("task");
    }
    let fetched = issuer.jwks_fetches() - before;
    let allowed = 1 + usize::try_from(started.elapsed().as_secs() / 3).unwrap_or(0);
    assert!(
        fetched >= 1 && fetched <= allowed,
        "{fetched} refetches in {:?} (at most one per 3 s cooldown)",
        started.elapsed()
    );
}

#[tokio::test]
async fn opaque_tokens_are_introspected_and_cached_and_an_outage_is_a_503() {
    let issuer = TestIssuer::start(&fixture("jwks.json"), CLIENT_ID, SECRET).await.expect("issuer");
    let (p, mut c) = start(&policy(&issuer, "30s", true)).await;
    let n = now();
    issuer.set_answer(
        "opaque-active",
        json!({ "active": true, "sub": "carol", "scope": "developer read", "exp": n + 300, "iat": n, "tier": "business" }),
    );
    issuer.set_answer("opaque-expired", json!({ "active": true, "sub": "dave", "exp": n - 10 }));

    let r = check(&mut c, "opaque-active").await;
    assert_eq!(denied_status(&r), None, "{r:?}");
    let headers: Vec<(String, String)> = match &r.http_response {
        Some(proto::ext_authz::check_response::HttpResponse::OkResponse(ok)) => {
            ok.headers.iter().filter_map(|h| h.header.as_ref().map(|h| (h.key.clone(), h.value.clone()))).collect()
        }
        _ => Vec::new(),
    };
    assert!(headers.contains(&("x-portcullis-subject".into(), "oauth:carol".into())), "{headers:?}");
    assert!(headers.contains(&("x-portcullis-tier".into(), "business".into())), "{headers:?}");
    assert_eq!(issuer.introspections(), 1);
    // cached: no second call
    assert_eq!(denied_status(&check(&mut c, "opaque-active").await), None);
    assert_eq!(issuer.introspections(), 1, "a cached answer costs no call");

    // inactive and expired tokens: 401, reason token_inactive; the negative answer is cached too
    assert_eq!(denied_status(&check(&mut c, "opaque-unknown").await), Some(401));
    assert_eq!(denied_status(&check(&mut c, "opaque-unknown").await), Some(401));
    assert_eq!(denied_status(&check(&mut c, "opaque-expired").await), Some(401));
    assert_eq!(issuer.introspections(), 3);
    p.wait_for_decision("token_inactive").await;

    // an outage: 503 (clients retry), not 401; the cached answer still serves
    issuer.set_down(true);
    assert_eq!(denied_status(&check(&mut c, "opaque-new").await), Some(503));
    p.wait_for_decision("introspection_unavailable").await;
    assert_eq!(denied_status(&check(&mut c, "opaque-active").await), None);
    // back up: answered again (after the short outage hold)
    issuer.set_down(false);
    issuer.set_answer("opaque-new", json!({ "active": true, "sub": "erin", "scope": "user", "exp": n + 300 }));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(denied_status(&check(&mut c, "opaque-new").await), None);
    // JWTs still go to the JWT issuer
    wait_for("the first JWKS fetch", || issuer.jwks_fetches() >= 1).await;
    let r = check(&mut c, &token("rsa.pem", "test-rs", "alice")).await;
    assert_eq!(denied_status(&r), None, "{r:?}");
}

#[tokio::test]
async fn wrong_introspection_credentials_are_an_outage_not_a_401() {
    let issuer = TestIssuer::start(&fixture("jwks.json"), CLIENT_ID, "another secret").await.expect("issuer");
    let (p, mut c) = start(&policy(&issuer, "30s", true)).await;
    issuer.set_answer("opaque-active", json!({ "active": true, "sub": "carol", "exp": now() + 300 }));
    assert_eq!(denied_status(&check(&mut c, "opaque-active").await), Some(503));
    p.wait_for_log("the failed call", |l| l.contains("token introspection failed") && l.contains("401"))
        .await
        .expect("logged");
    assert!(!p.logs().iter().any(|l| l.contains(SECRET)), "the client secret is never logged");
}

#[tokio::test]
async fn an_issuer_never_reached_is_a_503_until_it_answers() {
    let issuer = TestIssuer::start(&fixture("jwks.json"), CLIENT_ID, SECRET).await.expect("issuer");
    issuer.set_down(true);
    let (p, mut c) = start(&policy(&issuer, "1s", false)).await;
    let t = token("rsa.pem", "test-rs", "alice");
    // no key set yet: the client is told to retry, not that its token is bad
    assert_eq!(denied_status(&check(&mut c, &t).await), Some(503));
    p.wait_for_decision("jwks_unavailable").await;
    issuer.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = check(&mut c, &t).await;
    assert_eq!(denied_status(&r), None, "{r:?}");
}
