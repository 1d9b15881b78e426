//! What the load generator sends and how it reads the answers: ext_authz Check requests and
//! RLS ShouldRateLimit requests with a chosen key cardinality, and the outcome of each answer.

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
    /// plain HTTP/1.1 GET `path` (through Envoy or any proxy); `--addr` is the proxy's listener
    Http,
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
    pub fn check_request(&self, key: u64) -> CheckRequest {
        let mut headers = HashMap::with_capacity(4);
        headers.insert(":method".to_owned(), self.method.clone());
        headers.insert(":path".to_owned(), self.path.clone());
        if !self.api_key.is_empty() {
            headers.insert("x-api-key".to_owned(), self.api_key.clone());
        }
        if let Some(t) = &self.bearer {
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
                        method: self.method.clone(),
                        path: self.path.clone(),
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

    /// Request `key` as plain HTTP: the path, the API key or bearer token, and the client address
    /// in X-Forwarded-For (the bench's Envoy trusts nothing it is sent, so only the key varies
    /// what portcullis counts).
    pub fn http_request(&self, authority: &str, key: u64) -> hyper::Request<http_body_util::Empty<hyper::body::Bytes>> {
        let mut b = hyper::Request::builder()
            .method(self.method.as_str())
            .uri(self.path.as_str())
            .header("host", authority)
            .header("x-forwarded-for", peer_of(key));
        if !self.api_key.is_empty() {
            b = b.header("x-api-key", self.api_key.as_str());
        }
        if let Some(t) = &self.bearer {
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

    #[test]
    fn requests_carry_the_chosen_key() {
        let spec = Spec {
            kind: Kind::Rls,
            keys: 10,
            descriptors: 3,
            api_key: "k".into(),
            method: "GET".into(),
            path: "/api/v1/x".into(),
            domain: "bench".into(),
            descriptor_key: None,
            bearer: None,
        };
        let r = spec.rls_request(7);
        assert_eq!(r.descriptors.len(), 3);
        assert_eq!(r.descriptors[2].entries[0].key, "k2");
        assert_eq!(r.descriptors[2].entries[0].value, "v7");
        let c = spec.check_request(7);
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
}
