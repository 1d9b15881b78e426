//! Arbitrary input against everything a caller or an operator feeds portcullis: ext_authz
//! Checks, native Checks and ShouldRateLimit calls through the real adapters and engine (the
//! reference policy, the memory store), request paths, X-Forwarded-For, bearer tokens, and
//! policy files mutated byte by byte. The property is the same everywhere: an answer (a
//! decision, a refusal, a precise error), never a panic. `scripts/test.sh` runs 256 cases a
//! property; a longer run: `PROPTEST_CASES=100000 cargo test --release -p decision --lib fuzz`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use decision_core::policy::Policy;
use proptest::prelude::*;
use proto::ext_authz::authorization_server::Authorization;
use proto::portcullis_v1::decision_server::Decision;
use proto::ratelimit::rate_limit_service_server::RateLimitService;

use crate::api::ext_authz::ExtAuthz;
use crate::api::native::DecisionApi;
use crate::api::ratelimit::Rls;
use crate::engine::Engine;
use crate::store::MemoryStore;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

static POLICY: LazyLock<Arc<Policy>> =
    LazyLock::new(|| crate::config::load(&examples().join("policy.yaml")).unwrap_or_else(|e| panic!("{e}")).policy);

static ENGINE: LazyLock<Arc<Engine<MemoryStore>>> =
    LazyLock::new(|| Arc::new(Engine::new(POLICY.clone(), MemoryStore::new())));

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("runtime: {e}"))
});

/// Text a caller might send: printable ASCII, the bytes paths and lists are made of, control
/// characters and any Unicode scalar.
fn text(max: usize) -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        4 => "[ -~]{0,8}",
        3 => "[/%.;,:\\\\a-fA-F0-9]{0,8}",
        1 => "[\\x00-\\x1f\\x7f]{1,2}",
        1 => any::<char>().prop_map(String::from),
        1 => Just("%2e%2E%252e%2f%5c%00".to_owned()),
        1 => Just("Bearer ".to_owned()),
        1 => Just("pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo".to_owned()),
    ];
    prop::collection::vec(pieces, 0..max).prop_map(|v| v.concat())
}

fn headers() -> impl Strategy<Value = HashMap<String, String>> {
    let name = prop_oneof![
        Just("x-api-key".to_owned()),
        Just("authorization".to_owned()),
        Just("x-forwarded-for".to_owned()),
        Just("content-length".to_owned()),
        Just("x-request-id".to_owned()),
        Just(":path".to_owned()),
        text(3),
    ];
    prop::collection::hash_map(name, text(6), 0..6)
}

proptest! {
    #[test]
    fn ext_authz_checks_of_arbitrary_input_are_answered(
        method in text(2), path in text(8), peer in text(3), headers in headers(), size in any::<i64>(),
    ) {
        let mut msg = ::tests::check_request("10.0.0.1", "GET", "/", &[]);
        if let Some(a) = msg.attributes.as_mut() {
            if let Some(addr) = a.source.as_mut().and_then(|s| s.address.as_mut()).and_then(|a| a.address.as_mut())
                && let proto::types::address::Address::SocketAddress(sa) = addr
            {
                sa.address = peer;
            }
            if let Some(http) = a.request.as_mut().and_then(|r| r.http.as_mut()) {
                http.method = method;
                http.path = path;
                http.headers = headers;
                http.size = size;
            }
        }
        let answer = RUNTIME.block_on(ExtAuthz::new(ENGINE.clone()).check(tonic::Request::new(msg)));
        let answer = answer.map_err(|e| TestCaseError::fail(format!("an error instead of a decision: {e}")))?;
        prop_assert!(answer.get_ref().status.is_some());
    }

    #[test]
    fn native_checks_of_arbitrary_input_are_answered(
        operation in text(2), resource in text(8), client in text(3), headers in headers(),
        key in proptest::option::of(text(4)), cost in any::<i64>(), dry_run in any::<bool>(),
    ) {
        let msg = proto::portcullis_v1::CheckRequest {
            credential: key.map(proto::portcullis_v1::check_request::Credential::ApiKey),
            operation, resource, client_address: client, headers, cost, dry_run,
            ..Default::default()
        };
        match RUNTIME.block_on(DecisionApi::new(ENGINE.clone()).check(tonic::Request::new(msg))) {
            Ok(r) => prop_assert!([200, 400, 401, 403, 413, 429, 431, 503].contains(&r.get_ref().http_status)),
            Err(e) => prop_assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message()),
        }
    }

    #[test]
    fn ratelimit_calls_of_arbitrary_input_are_answered(
        domain in prop_oneof![Just("edge".to_owned()), text(3)],
        entries in prop::collection::vec(prop::collection::vec((text(2), text(3)), 0..4), 0..4),
        hits in any::<u32>(), addend in proptest::option::of(any::<u64>()), limit in proptest::option::of((any::<u32>(), any::<i32>())),
    ) {
        use proto::ratelimit::rate_limit_descriptor::{Entry, RateLimitOverride};
        let descriptors = entries.into_iter().map(|e| proto::ratelimit::RateLimitDescriptor {
            entries: e.into_iter().map(|(key, value)| Entry { key, value }).collect(),
            limit: limit.map(|(requests_per_unit, unit)| RateLimitOverride { requests_per_unit, unit }),
            hits_addend: addend.map(|value| proto::types::UInt64Value { value }),
            ..Default::default()
        }).collect();
        let msg = proto::ratelimit::RateLimitRequest { domain, descriptors, hits_addend: hits };
        match RUNTIME.block_on(Rls::new(ENGINE.clone()).should_rate_limit(tonic::Request::new(msg))) {
            Ok(_) => {}
            Err(e) => prop_assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message()),
        }
    }

    #[test]
    fn paths_forwarded_for_and_bearer_tokens_are_judged(
        path in text(10), xff in text(6), token in prop_oneof![text(8), "[A-Za-z0-9_=-]{0,40}\\.[A-Za-z0-9_=-]{0,60}\\.[A-Za-z0-9_-]{0,40}"],
    ) {
        if let Ok(n) = decision_core::path::normalize(&path) {
            prop_assert!(n.path.starts_with('/'), "{:?} -> {:?}", path, n.path);
        }
        let peer = "127.0.0.1".parse().map_err(|_| TestCaseError::fail("ip"))?;
        let _ = decision_core::net::client_ip(peer, Some(&xff), &POLICY.network.trusted_proxies);
        if let Some(v) = &POLICY.bearer {
            prop_assert!(v.verify(&token, crate::clock::now_micros()).is_err(), "an unsigned token was accepted");
        }
    }

    #[test]
    fn policy_files_mutated_byte_by_byte_are_refused_or_loaded(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 1..6),
    ) {
        let mut bytes = std::fs::read(examples().join("policy.yaml")).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (at, kind, b) in edits {
            let i = at.index(bytes.len().max(1)).min(bytes.len());
            match kind {
                0 => bytes.insert(i, b),
                1 if i < bytes.len() => { bytes.remove(i); }
                _ if i < bytes.len() => bytes[i] = b,
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Err(problems) = crate::config::parse(&text, &examples()) {
            prop_assert!(problems.iter().all(|p| !p.message.is_empty()), "a problem without a reason: {:?}", problems);
        }
    }
}
