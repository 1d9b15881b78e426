//! JWT bearer tokens through the real Envoy: the reference policy's issuer, with the test keys
//! of tests/fixtures/jwt as its jwks.json.
// Tokens are judged by portcullis's wall clock, so the test must make them with one too.
#![allow(clippy::disallowed_methods)]

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tests::{Stack, reference_policy, workspace_root};

const ISS: &str = "https://auth.example.com/";
const AUD: &str = "portcullis-demo";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(workspace_root().join("tests/fixtures/jwt").join(name)).expect("fixture")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(alg: Algorithm, claims: serde_json::Value) -> String {
    let (kid, key) = match alg {
        Algorithm::ES256 => ("test-es", EncodingKey::from_ec_pem(&fixture("ec.pem"))),
        _ => ("test-rs", EncodingKey::from_rsa_pem(&fixture("rsa.pem"))),
    };
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, &key.expect("key")).expect("sign")
}

fn claims(sub: &str, roles: &[&str]) -> serde_json::Value {
    let n = now();
    json!({ "iss": ISS, "aud": AUD, "sub": sub, "exp": n + 300, "iat": n, "roles": roles, "tier": "business" })
}

async fn stack() -> Stack {
    let jwks = String::from_utf8(fixture("jwks.json")).expect("utf-8");
    Stack::start_with(&reference_policy(), &[("jwks.json", &jwks)]).await.unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test]
async fn bearer_tokens_authenticate_and_sensitive_routes_need_a_fresh_one() {
    let s = stack().await;
    let bearer = |t: &str| format!("Bearer {t}");

    // valid RS256 and ES256 tokens
    let rs = token(Algorithm::RS256, claims("alice", &["user"]));
    let r = s.send("GET", "/api/v1/x", &[("authorization", &bearer(&rs))]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = s.upstream.seen();
    let last = seen.last().expect("upstream");
    assert_eq!(last.headers.get("x-portcullis-subject").map(String::as_str), Some("jwt:alice"));
    assert_eq!(last.headers.get("x-portcullis-tier").map(String::as_str), Some("business"));
    let es = token(Algorithm::ES256, claims("bob", &["developer"]));
    assert_eq!(s.send("POST", "/api/v1/x", &[("authorization", &bearer(&es))]).await.status, 200);

    // refused tokens: 401 with the RFC 6750 challenge, the reason only in our log
    let none = {
        let mut parts = rs.split('.');
        let _ = parts.next();
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts.next().expect("payload"))
    };
    let mut expired = claims("carol", &["user"]);
    expired["exp"] = json!(now() - 120);
    let mut within_leeway = claims("dave", &["user"]);
    within_leeway["exp"] = json!(now() - 5);
    let mut wrong_aud = claims("erin", &["user"]);
    wrong_aud["aud"] = json!("someone-else");
    for (t, want, reason) in [
        (none, 401, "jwt_alg_not_allowed"),
        (token(Algorithm::RS256, expired), 401, "jwt_expired"),
        (token(Algorithm::RS256, wrong_aud), 401, "jwt_wrong_audience"),
        (token(Algorithm::RS256, within_leeway), 200, "allowed"),
    ] {
        let r = s.send("GET", "/api/v1/x", &[("authorization", &bearer(&t))]).await;
        assert_eq!(r.status, want, "{reason}: {r:?}");
        if want == 401 {
            assert!(r.header("www-authenticate").is_some_and(|c| c.starts_with("Bearer")), "{r:?}");
            assert!(!r.body.contains(reason), "the client is not told why");
            s.portcullis.wait_for_decision(reason).await;
        }
    }

    // sensitive route (/admin: admin role, internal or vpn zone, max_auth_age 15m)
    let fresh = token(Algorithm::RS256, claims("root", &["admin"]));
    let r = s.send("GET", "/admin/users", &[("authorization", &bearer(&fresh))]).await;
    assert_eq!(r.status, 200, "a fresh admin token: {r:?}");
    let mut old = claims("root", &["admin"]);
    old["auth_time"] = json!(now() - 3600);
    let r = s.send("GET", "/admin/users", &[("authorization", &bearer(&token(Algorithm::RS256, old)))]).await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\", error_description=\"re-authentication required\"")
    );
    let r = s.send("GET", "/admin/users", &[("x-api-key", "pk_demo_admin_dgBU1nZu-FWNNXcyKorzEKKe")]).await;
    assert_eq!(r.status, 401, "an API key never satisfies a sensitive route");
    let r = s
        .send("GET", "/admin/users", &[("authorization", &bearer(&token(Algorithm::RS256, claims("u", &["user"]))))])
        .await;
    assert_eq!(r.status, 403, "a fresh token without the role");

    // a role the policy does not know is ignored, and counted
    let r = s
        .send(
            "GET",
            "/api/v1/x",
            &[("authorization", &bearer(&token(Algorithm::RS256, claims("zed", &["user", "wizard"]))))],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = s.admin_get("/metrics").await.body;
    assert!(m.contains("portcullis_jwt_unknown_roles_total 1"), "{m}");

    s.portcullis.wait_for_decision("fresh_auth_required").await;
    let logs = s.portcullis.logs().join("\n");
    assert!(!logs.contains(&rs) && !logs.contains(&fresh), "a token appeared in the log");
}
