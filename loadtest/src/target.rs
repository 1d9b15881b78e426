//! What the load generator sends and how it reads the answers: ext_authz Check requests, native
//! `portcullis.v1.Decision/Check` requests and RLS ShouldRateLimit requests with a chosen key
//! cardinality, and the outcome of each answer.

use std::collections::HashMap;

use proto::ext_authz::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{AttributeContext, CheckRequest, CheckResponse};
use proto::ratelimit::rate_limit_descriptor::Entry;
use proto::ratelimit::rate_limit_response::Code;
use proto::ratelimit::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use proto::types::{Address, SocketAddress, address};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// envoy.service.auth.v3.Authorization/Check
    ExtAuthz,
    /// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit
    Rls,
    /// portcullis.v1.Decision/Check (the same request as ext_authz's, as typed fields)
    Native,
    /// plain HTTP/1.1 GET `path` (through Envoy or any proxy); `--addr` is the proxy's listener
    Http,
    /// HTTP/1.1 GET /v1/forward-auth as Traefik or Caddy ask it: the request to check in
    /// `X-Forwarded-Method`, `-Uri`, `-Host` and `-For` (`--addr`: portcullis's forward-auth
    /// listener, which must trust the load generator's address as a proxy)
    ForwardAuth,
}

/// How request `i` is built.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    /// distinct keys: client addresses for ext_authz, descriptor values for RLS
    pub keys: u64,
    /// descriptors per RLS request
    pub descriptors: usize,
    pub api_key: String,
    pub method: String,
    pub path: String,
    pub domain: String,
    /// the descriptor key of every RLS descriptor; None: k0, k1, ... one per descriptor
    pub descriptor_key: Option<String>,
    /// an `authorization: Bearer ...` token to send with every ext_authz request
    pub bearer: Option<String>,
    /// a request mix (`--scenario`): request `i` takes one of these by weight instead of the
    /// fields above (ext_authz and HTTP targets)
    pub mix: Vec<Variant>,
}

/// One kind of request in a scenario's mix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub api_key: String,
    /// send the run's bearer token (`--jwt-key`)
    #[serde(default)]
    pub jwt: bool,
    #[serde(skip)]
    pub bearer: Option<String>,
}

fn one() -> u32 {
    1
}

fn get() -> String {
    "GET".into()
}

/// A scenario file: a YAML list of variants, e.g.
/// `- { weight: 9, path: /api/v1/items, api_key: pk_bench_open }`.
pub fn parse_scenario(text: &str) -> Result<Vec<Variant>, String> {
    let mix: Vec<Variant> = serde_yaml_ng::from_str(text).map_err(|e| format!("scenario: {e}"))?;
    if mix.is_empty() || mix.iter().all(|v| v.weight == 0) {
        return Err("scenario: list at least one request with a weight above 0".into());
    }
    Ok(mix)
}

/// What request `i` sends: method, path, API key, bearer token.
struct Shape<'a> {
    method: &'a str,
    path: &'a str,
    api_key: &'a str,
    bearer: Option<&'a str>,
}

/// The key index of request `i`: sequential (each key in turn) or scattered by a fixed hash.
pub fn key_index(i: u64, keys: u64, sequential: bool) -> u64 {
    let keys = keys.max(1);
    if sequential {
        i % keys
    } else {
        // splitmix64: a cheap, well-spread, reproducible scatter
        let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % keys
    }
}

/// A distinct client address per key: 10.a.b.c from the key index.
pub fn peer_of(key: u64) -> String {
    format!("10.{}.{}.{}", (key >> 16) & 255, (key >> 8) & 255, key & 255)
}

impl Spec {
    /// The mix entry of request `i` (by weight, scattered reproducibly), or the spec's own fields.
    fn shape(&self, i: u64) -> Shape<'_> {
        let total: u64 = self.mix.iter().map(|v| u64::from(v.weight)).sum();
        if total > 0 {
            let mut at = key_index(i, total, false);
            for v in &self.mix {
                if at < u64::from(v.weight) {
                    return Shape {
                        method: &v.method,
                        path: &v.path,
                        api_key: &v.api_key,
                        bearer: v.bearer.as_deref(),
                    };
                }
                at -= u64::from(v.weight);
            }
        }
        Shape { method: &self.method, path: &self.path, api_key: &self.api_key, bearer: self.bearer.as_deref() }
    }

    /// Request `i` (from client `key`) as an ext_authz Check.
    pub fn check_request(&self, i: u64, key: u64) -> CheckRequest {
        let shape = self.shape(i);
        let mut headers = HashMap::with_capacity(4);
        headers.insert(":method".to_owned(), shape.method.to_owned());
        headers.insert(":path".to_owned(), shape.path.to_owned());
        if !shape.api_key.is_empty() {
            headers.insert("x-api-key".to_owned(), shape.api_key.to_owned());
        }
        if let Some(t) = shape.bearer {
            headers.insert("authorization".to_owned(), format!("Bearer {t}"));
        }
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: peer_of(key),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                }),
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        method: shape.method.to_owned(),
                        path: shape.path.to_owned(),
                        headers,
                        size: -1,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// Request `i` (from client `key`) as a native Check.
    pub fn native_request(&self, i: u64, key: u64) -> proto::portcullis_v1::CheckRequest {
        use proto::portcullis_v1::check_request::Credential;
        let shape = self.shape(i);
        let credential = match (shape.bearer, shape.api_key.is_empty()) {
            (Some(t), _) => Some(Credential::BearerToken(t.to_owned())),
            (None, false) => Some(Credential::ApiKey(shape.api_key.to_owned())),
            (None, true) => None,
        };
        proto::portcullis_v1::CheckRequest {
            credential,
            operation: shape.method.to_owned(),
            resource: shape.path.to_owned(),
            client_address: peer_of(key),
            ..Default::default()
        }
    }

    /// Request `key` as plain HTTP: the path, the API key or bearer token, and the client address
    /// in X-Forwarded-For (the bench's Envoy trusts nothing it is sent, so only the key varies
    /// what portcullis counts).
    pub fn http_request(
        &self,
        scheme: &str,
        authority: &str,
        i: u64,
        key: u64,
    ) -> hyper::Request<http_body_util::Empty<hyper::body::Bytes>> {
        let shape = self.shape(i);
        let mut b = if self.kind == Kind::ForwardAuth {
            hyper::Request::builder()
                .method("GET")
                .uri(format!("{scheme}://{authority}/v1/forward-auth"))
                .header("x-forwarded-method", shape.method)
                .header("x-forwarded-uri", shape.path)
                .header("x-forwarded-host", "api.bench.test")
                .header("x-forwarded-proto", "https")
        } else {
            hyper::Request::builder().method(shape.method).uri(format!("{scheme}://{authority}{}", shape.path))
        };
        b = b.header("host", authority).header("x-forwarded-for", peer_of(key));
        if !shape.api_key.is_empty() {
            b = b.header("x-api-key", shape.api_key);
        }
        if let Some(t) = shape.bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(http_body_util::Empty::new()).unwrap_or_default()
    }

    pub fn rls_request(&self, key: u64) -> RateLimitRequest {
        let descriptors = (0..self.descriptors)
            .map(|d| RateLimitDescriptor {
                entries: vec![Entry {
                    key: self.descriptor_key.clone().unwrap_or_else(|| format!("k{d}")),
                    value: format!("v{key}"),
                }],
                ..Default::default()
            })
            .collect();
        RateLimitRequest { domain: self.domain.clone(), descriptors, hits_addend: 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// refused for a reason other than a limit (401, 403, ...)
    Denied,
    /// refused by a limit (ext_authz 429, RLS OVER_LIMIT)
    OverLimit,
    /// the call failed (gRPC error, timeout, client overload)
    Error,
}

pub fn classify_check(r: &CheckResponse) -> Outcome {
    match (&r.status, &r.http_response) {
        (Some(s), _) if s.code == 0 => Outcome::Allowed,
        (_, Some(HttpResponse::DeniedResponse(d))) if d.status.as_ref().is_some_and(|s| s.code == 429) => {
            Outcome::OverLimit
        }
        _ => Outcome::Denied,
    }
}

/// A native answer as an outcome, by its HTTP-equivalent status.
pub fn classify_native(r: &proto::portcullis_v1::CheckResponse) -> Outcome {
    match r.http_status {
        200 => Outcome::Allowed,
        429 => Outcome::OverLimit,
        _ => Outcome::Denied,
    }
}

/// An HTTP status as an outcome: 2xx allowed, 429 over a limit, other 4xx denied, else an error.
pub fn classify_http(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Allowed,
        429 => Outcome::OverLimit,
        400..=499 => Outcome::Denied,
        _ => Outcome::Error,
    }
}

pub fn classify_rls(r: &RateLimitResponse) -> Outcome {
    if r.overall_code == Code::OverLimit as i32 { Outcome::OverLimit } else { Outcome::Allowed }
}

/// Outcome counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub allowed: u64,
    pub denied: u64,
    pub over_limit: u64,
    pub errors: u64,
}

impl Counts {
    pub fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Allowed => self.allowed += 1,
            Outcome::Denied => self.denied += 1,
            Outcome::OverLimit => self.over_limit += 1,
            Outcome::Error => self.errors += 1,
        }
    }

    pub fn merge(&mut self, o: &Counts) {
        self.allowed += o.allowed;
        self.denied += o.denied;
        self.over_limit += o.over_limit;
        self.errors += o.errors;
    }

    pub fn total(&self) -> u64 {
        self.allowed + self.denied + self.over_limit + self.errors
    }
}

/// An RS256 token for `sub` from `issuer` to `audience`, valid for an hour from `now_s`, signed
/// with the PEM private key at `key` (the bench uses the test key of tests/fixtures/jwt).
pub fn mint_token(
    key: &std::path::Path,
    issuer: &str,
    audience: &str,
    sub: &str,
    now_s: u64,
) -> Result<String, String> {
    let pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let k = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| e.to_string())?;
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("test-rs".into());
    let claims = serde_json::json!({ "iss": issuer, "aud": audience, "sub": sub, "iat": now_s, "exp": now_s + 3600, "roles": ["user"], "tier": "open" });
    jsonwebtoken::encode(&h, &claims, &k).map_err(|e| e.to_string())
}

/// What the policy predicts, checked after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// every request allowed, no errors
    AllAllowed,
    /// exactly this many allowed, the rest over the limit, no errors
    Allowed(u64),
}

/// Whether `counts` match the prediction; the error says how they differ.
pub fn check_expectation(expect: Expect, counts: &Counts) -> Result<(), String> {
    let ok = match expect {
        Expect::AllAllowed => counts.allowed == counts.total() && counts.total() > 0,
        Expect::Allowed(n) => counts.allowed == n && counts.over_limit == counts.total() - n && counts.errors == 0,
    };
    if ok { Ok(()) } else { Err(format!("outcomes {counts:?} differ from the prediction {expect:?}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_indices_cover_the_key_space() {
        let seq: Vec<u64> = (0..6).map(|i| key_index(i, 4, true)).collect();
        assert_eq!(seq, [0, 1, 2, 3, 0, 1]);
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            let k = key_index(i, 100, false);
            assert!(k < 100);
            seen.insert(k);
        }
        assert_eq!(seen.len(), 100, "a scattered order still reaches every key");
        assert_eq!(peer_of(0x01_02_03), "10.1.2.3");
    }

    fn spec_for_tests() -> Spec {
        Spec {
            kind: Kind::Rls,
            keys: 10,
            descriptors: 3,
            api_key: "k".into(),
            method: "GET".into(),
            path: "/api/v1/x".into(),
            domain: "bench".into(),
            descriptor_key: None,
            bearer: None,
            mix: Vec::new(),
        }
    }

    #[test]
    fn requests_carry_the_chosen_key() {
        let spec = spec_for_tests();
        let r = spec.rls_request(7);
        assert_eq!(r.descriptors.len(), 3);
        assert_eq!(r.descriptors[2].entries[0].key, "k2");
        assert_eq!(r.descriptors[2].entries[0].value, "v7");
        let c = spec.check_request(0, 7);
        let http = c.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()).expect("http");
        assert_eq!(http.headers.get("x-api-key").map(String::as_str), Some("k"));
    }

    #[test]
    fn outcomes_are_checked_against_the_prediction() {
        let mut c = Counts::default();
        for _ in 0..100 {
            c.add(Outcome::Allowed);
        }
        assert!(check_expectation(Expect::AllAllowed, &c).is_ok());
        assert!(check_expectation(Expect::Allowed(100), &c).is_ok());
        c.add(Outcome::OverLimit);
        assert!(check_expectation(Expect::AllAllowed, &c).is_err());
        assert!(check_expectation(Expect::Allowed(100), &c).is_ok());
        c.add(Outcome::Error);
        assert!(check_expectation(Expect::Allowed(100), &c).is_err());
        let mut other = Counts::default();
        other.add(Outcome::Denied);
        c.merge(&other);
        assert_eq!(c.total(), 103);
    }

    #[test]
    fn a_scenario_mixes_requests_by_weight() {
        let mix = parse_scenario(
            "- { weight: 3, path: /api/v1/items, api_key: pk_a }\n- { weight: 1, method: POST, path: /api/v1/orders, jwt: true }\n",
        )
        .expect("scenario");
        assert_eq!(mix.len(), 2);
        assert_eq!((mix[1].method.as_str(), mix[1].jwt, mix[0].weight), ("POST", true, 3));
        let mut spec = Spec { mix, ..spec_for_tests() };
        spec.mix[1].bearer = Some("tok".into());
        let posts = (0..4000)
            .filter(|i| {
                spec.check_request(*i, 0)
                    .attributes
                    .and_then(|a| a.request)
                    .and_then(|r| r.http)
                    .is_some_and(|h| h.method == "POST")
            })
            .count();
        assert!((900..1100).contains(&posts), "about a quarter: {posts}");
        let r = spec.check_request(1, 0);
        let h = r.attributes.and_then(|a| a.request).and_then(|r| r.http).expect("http");
        assert!(
            h.headers.contains_key("x-api-key") != h.headers.contains_key("authorization"),
            "one credential or the other"
        );
        assert!(parse_scenario("[]").is_err());
        assert!(parse_scenario("- { path: /x, colour: red }").is_err(), "unknown fields are refused");
    }
}
