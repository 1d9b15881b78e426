//! The verifier against tokens signed with the test keys in tests/fixtures/jwt, at a time of
//! the test's choosing.

use std::path::PathBuf;

use decision_core::encode::b64url as b64;
use decision_core::units::MICROS_PER_SEC;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;

use super::*;

const NOW_S: u64 = 1_800_000_000;
const NOW: Micros = NOW_S * MICROS_PER_SEC;
const ISS: &str = "https://auth.test/";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/jwt")
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).expect("fixture key")
}

fn verifier() -> JwtVerifier {
    verifier_counting(&AuthMetrics::default())
}

/// The test verifier, counting into `metrics`.
fn verifier_counting(metrics: &AuthMetrics) -> JwtVerifier {
    let jwks = std::fs::read_to_string(fixtures().join("jwks.json")).expect("jwks");
    JwtVerifier::new(vec![issuer_with(&jwks, metrics).expect("issuer")], metrics)
}

fn claims() -> serde_json::Value {
    json!({ "iss": ISS, "aud": "portcullis-test", "sub": "alice", "exp": NOW_S + 600, "iat": NOW_S - 10, "roles": ["developer"], "tier": "business" })
}

fn sign(alg: Algorithm, key: &str, kid: &str, claims: &serde_json::Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    let k = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem(key)),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem(key)),
        _ => EncodingKey::from_rsa_pem(&pem(key)),
    }
    .expect("encoding key");
    jsonwebtoken::encode(&h, claims, &k).expect("sign")
}

/// A token from raw header and payload text (for shapes a library would not produce), signed
/// with the RSA test key.
fn raw_rs256(header: &str, payload: &str) -> String {
    let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(
        msg.as_bytes(),
        &EncodingKey::from_rsa_pem(&pem("rsa.pem")).expect("key"),
        Algorithm::RS256,
    )
    .expect("sign");
    format!("{msg}.{sig}")
}

/// The standard claims with one of them replaced, signed RS256.
fn with(k: &str, val: serde_json::Value) -> String {
    let mut c = claims();
    c[k] = val;
    sign(Algorithm::RS256, "rsa.pem", "test-rs", &c)
}

/// A token whose claim `k` is the raw JSON text `val` (numbers serde_json would rewrite).
fn raw_claim(k: &str, val: &str) -> String {
    let mut c = claims();
    c.as_object_mut().expect("object").remove(k);
    let body = c.to_string();
    let payload = format!("{},\"{k}\":{val}}}", &body[..body.len() - 1]);
    raw_rs256(r#"{"alg":"RS256","kid":"test-rs"}"#, &payload)
}

fn check(v: &JwtVerifier, token: &str, want: Result<(), Reason>) {
    assert_eq!(v.verify(token, NOW).map(|_| ()), want, "token {}", &token[..token.len().min(40)]);
}

#[test]
fn valid_tokens_of_every_allowed_algorithm_prove_their_identity() {
    let v = verifier();
    for (alg, key, kid) in [
        (Algorithm::RS256, "rsa.pem", "test-rs"),
        (Algorithm::ES256, "ec.pem", "test-es"),
        (Algorithm::EdDSA, "ed25519.pem", "test-ed"),
    ] {
        let t = v.verify(&sign(alg, key, kid, &claims()), NOW).unwrap_or_else(|r| panic!("{alg:?}: {r:?}"));
        assert_eq!(&*t.subject, "jwt:alice");
        assert_eq!((t.roles, t.tier), (3, 1));
        assert_eq!(t.auth_time, Some((NOW_S - 10) * MICROS_PER_SEC));
    }
}

#[test]
fn algorithm_tricks_are_refused_before_any_signature_work() {
    let v = verifier();
    // alg none, without and with a signature
    let none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims().to_string().as_bytes()));
    check(&v, &none, Err(Reason::JwtAlgNotAllowed));
    check(&v, &format!("{none}c2lnbmF0dXJl"), Err(Reason::JwtAlgNotAllowed));
    // HS256 "signed" with the RSA public key as the HMAC secret (the RS/HS confusion attack)
    let jwks = std::fs::read(fixtures().join("jwks.json")).expect("jwks");
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("test-rs".into());
    let hs = jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&jwks)).expect("sign");
    check(&v, &hs, Err(Reason::JwtAlgNotAllowed));
    // an allowed algorithm with a key of another type
    let header = r#"{"alg":"RS256","kid":"test-es"}"#;
    check(&v, &raw_rs256(header, &claims().to_string()), Err(Reason::JwtKeyMismatch));
    // an algorithm this issuer does not list
    let ps = sign(Algorithm::PS256, "rsa.pem", "test-rs", &claims());
    check(&v, &ps, Err(Reason::JwtAlgNotAllowed));
}

#[test]
fn time_claims_are_judged_with_the_policys_leeway() {
    let v = verifier();
    check(&v, &with("exp", json!(NOW_S - 20)), Ok(())); // expired, within 30 s of leeway
    check(&v, &with("exp", json!(NOW_S - 31)), Err(Reason::JwtExpired));
    check(&v, &with("nbf", json!(NOW_S + 20)), Ok(()));
    check(&v, &with("nbf", json!(NOW_S + 120)), Err(Reason::JwtNotYetValid));
    check(&v, &with("iat", json!(NOW_S + 120)), Err(Reason::JwtIssuedInFuture));
    check(&v, &with("exp", json!("soon")), Err(Reason::JwtMalformed));
    // RFC 7519 NumericDate: any JSON number, fractions and exponents included
    check(&v, &with("exp", json!(NOW_S as f64 + 600.5)), Ok(()));
    check(&v, &with("exp", json!(NOW_S as f64 - 31.5)), Err(Reason::JwtExpired));
    check(&v, &with("nbf", json!(NOW_S as f64 + 120.25)), Err(Reason::JwtNotYetValid));
    check(&v, &with("iat", json!(NOW_S as f64 - 10.999)), Ok(()));
    check(&v, &with("auth_time", json!(NOW_S as f64 - 5.5)), Ok(()));
    check(&v, &raw_claim("exp", &format!("{}e0", NOW_S + 600)), Ok(()));
    check(&v, &raw_claim("exp", "1.8000006e9"), Ok(()));
    check(&v, &raw_claim("exp", "-1"), Err(Reason::JwtMalformed));
    check(&v, &raw_claim("exp", "-0.5"), Err(Reason::JwtMalformed));
    check(&v, &raw_claim("exp", "1e400"), Err(Reason::JwtMalformed));
    let mut c = claims();
    c.as_object_mut().expect("object").remove("exp");
    check(&v, &sign(Algorithm::RS256, "rsa.pem", "test-rs", &c), Err(Reason::JwtMissingExp));
}

#[test]
fn issuer_audience_subject_roles_and_tier_are_checked() {
    let metrics = AuthMetrics::default();
    let v = verifier_counting(&metrics);
    check(&v, &with("iss", json!("https://auth.test")), Err(Reason::JwtUnknownIssuer)); // exact match only
    check(&v, &with("aud", json!("someone-else")), Err(Reason::JwtWrongAudience));
    check(&v, &with("aud", json!(["someone-else", "portcullis-test"])), Ok(()));
    check(&v, &with("sub", json!("")), Err(Reason::JwtMissingSubject));
    check(&v, &with("tier", json!("platinum")), Err(Reason::JwtUnknownTier));
    let mut c = claims();
    c.as_object_mut().expect("object").remove("tier");
    let t = v.verify(&sign(Algorithm::RS256, "rsa.pem", "test-rs", &c), NOW).expect("no tier claim");
    assert_eq!(t.tier, 0, "missing tier -> basic");
    assert_eq!(metrics.unknown_roles.get(), 0);
    let t = v.verify(&with("roles", json!(["user", "wizard"])), NOW).expect("unknown roles are ignored");
    assert_eq!(t.roles, 1);
    assert_eq!(metrics.unknown_roles.get(), 1, "and counted");
    let mut c = claims();
    c["auth_time"] = json!(NOW_S - 3600);
    let t = v.verify(&sign(Algorithm::RS256, "rsa.pem", "test-rs", &c), NOW).expect("auth_time");
    assert_eq!(t.auth_time, Some((NOW_S - 3600) * MICROS_PER_SEC), "auth_time wins over iat");
}

#[test]
fn forged_and_malformed_tokens_are_refused() {
    let v = verifier();
    let good = sign(Algorithm::RS256, "rsa.pem", "test-rs", &claims());
    // tampered payload: same signature, elevated roles
    let mut parts: Vec<&str> = good.split('.').collect();
    let mut c = claims();
    c["roles"] = json!(["admin"]);
    let forged = b64(c.to_string().as_bytes());
    parts[1] = &forged;
    check(&v, &parts.join("."), Err(Reason::JwtBadSignature));
    // a key the JWKS does not hold
    check(&v, &sign(Algorithm::RS256, "rsa-other.pem", "test-other", &claims()), Err(Reason::JwtUnknownKid));
    check(&v, &sign(Algorithm::RS256, "rsa-other.pem", "test-rs", &claims()), Err(Reason::JwtBadSignature));
    // duplicated members in the claims or the header
    let dup = claims().to_string().replacen('{', r#"{"roles":["admin"],"#, 1);
    check(&v, &raw_rs256(r#"{"alg":"RS256","kid":"test-rs"}"#, &dup), Err(Reason::JwtDuplicateMember));
    check(
        &v,
        &raw_rs256(r#"{"alg":"RS256","kid":"test-rs","alg":"RS256"}"#, &claims().to_string()),
        Err(Reason::JwtDuplicateMember),
    );
    // a critical extension we do not implement
    check(
        &v,
        &raw_rs256(r#"{"alg":"RS256","kid":"test-rs","crit":["exp"],"exp":1}"#, &claims().to_string()),
        Err(Reason::JwtCritUnsupported),
    );
    // size and shape
    let mut big = claims();
    big["pad"] = json!("x".repeat(MAX_TOKEN_BYTES));
    check(&v, &sign(Algorithm::RS256, "rsa.pem", "test-rs", &big), Err(Reason::JwtTooLarge));
    for bad in ["", "abc", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.e30"] {
        assert!(v.verify(bad, NOW).is_err(), "{bad}");
    }
}

#[test]
fn verified_tokens_are_cached_until_they_expire() {
    let v = verifier();
    let mut c = claims();
    c["exp"] = json!(NOW_S + 60);
    let token = sign(Algorithm::RS256, "rsa.pem", "test-rs", &c);
    assert!(v.verify(&token, NOW).is_ok());
    assert_eq!(v.cached(), 1);
    assert!(v.verify(&token, NOW + MICROS_PER_SEC).is_ok());
    assert_eq!(v.cached(), 1, "the second request is a cache hit");
    // past exp + leeway, the cached entry no longer proves anything
    assert_eq!(v.verify(&token, NOW + 91 * MICROS_PER_SEC), Err(Reason::JwtExpired));
}

/// The test issuer over `jwks` (a document).
fn issuer_with(jwks: &str, metrics: &AuthMetrics) -> Result<Issuer, String> {
    let roles = [("user", 1u64), ("developer", 3), ("admin", 7)].map(|(n, b)| (n.to_owned(), b)).into();
    let tiers = [("basic", 0usize), ("business", 1)].map(|(n, i)| (n.to_owned(), i)).into();
    Issuer::new(
        ISS.into(),
        vec!["portcullis-test".into()],
        vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        30 * MICROS_PER_SEC,
        "roles".into(),
        "tier".into(),
        roles,
        tiers,
        Some(0),
        KeySource::Document(jwks),
        metrics,
    )
}

#[test]
fn keys_that_cannot_verify_are_skipped_and_the_rest_serve() {
    let mut set: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("jwks.json")).expect("jwks")).expect("json");
    let rsa = set["keys"][0].clone();
    // what Keycloak publishes beside its signing key: the same kind of RSA key for encryption
    let mut enc = rsa.clone();
    enc["kid"] = json!("enc-1");
    enc["use"] = json!("enc");
    enc["alg"] = json!("RSA-OAEP");
    let mut ops_only_encrypt = rsa.clone();
    ops_only_encrypt["kid"] = json!("wrap-1");
    ops_only_encrypt.as_object_mut().expect("object").remove("use");
    ops_only_encrypt["key_ops"] = json!(["wrapKey"]);
    let symmetric = json!({ "kty": "oct", "kid": "hs", "k": "c2VjcmV0" });
    let unknown_type = json!({ "kty": "AKP", "kid": "pq", "alg": "ML-DSA-44", "pub": "AAAA" });
    let unknown_curve = json!({ "kty": "EC", "kid": "k1", "crv": "secp256k1", "x": "AA", "y": "AA" });
    let keys = set["keys"].as_array_mut().expect("keys");
    keys.splice(0..0, [enc.clone(), ops_only_encrypt, symmetric.clone(), unknown_type, unknown_curve]);
    let metrics = AuthMetrics::default();
    let issuer = issuer_with(&set.to_string(), &metrics).expect("the usable keys make a usable set");
    assert_eq!(metrics.jwks_keys_skipped.get(), 5, "each unusable key is counted");
    let v = JwtVerifier::new(vec![issuer], &metrics);
    check(&v, &sign(Algorithm::RS256, "rsa.pem", "test-rs", &claims()), Ok(()));
    check(&v, &sign(Algorithm::ES256, "ec.pem", "test-es", &claims()), Ok(()));
    // a token naming the encryption key's kid does not verify with it
    let mut c = claims();
    c["sub"] = json!("mallory");
    assert!(v.verify(&sign(Algorithm::RS256, "rsa.pem", "enc-1", &c), NOW).is_err());

    // only a set with no usable key is an error, and it says why
    let none = json!({ "keys": [enc, symmetric] }).to_string();
    let err = issuer_with(&none, &AuthMetrics::default()).err().expect("no usable key");
    assert!(err.contains("no usable key") && err.contains("enc-1") && err.contains("hs"), "{err}");
    assert!(issuer_with(r#"{"keys": []}"#, &AuthMetrics::default()).is_err());
    assert!(issuer_with(r#"{"keys": "x"}"#, &AuthMetrics::default()).is_err());
}
