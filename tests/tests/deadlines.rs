//! Callers that have already given up (gRPC `grpc-timeout`): a request whose deadline has passed
//! is answered DEADLINE_EXCEEDED (or CANCELLED, when tonic's own timer wins the race) and counts
//! nothing; a deadline shorter than the store timeout shortens the store call. Against the real
//! binary, on the memory store and on a real redis-server.

use std::time::Duration;

use proto::ext_authz::authorization_client::AuthorizationClient;
use proto::portcullis_v1::CheckRequest;
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_client::DecisionClient;
use proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::{RateLimitDescriptor, RateLimitRequest, rate_limit_descriptor::Entry};
use tests::{Portcullis, RedisServer, check_request, denied_status, reference_policy};

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

fn with_timeout<T>(msg: T, timeout: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("grpc-timeout", timeout.parse().expect("metadata value"));
    r
}

/// The basic key's daily quota left, read by a dry run (which counts nothing).
async fn daily_left(c: &mut DecisionClient<tonic::transport::Channel>) -> u64 {
    let r = c
        .check(CheckRequest {
            credential: Some(Credential::ApiKey(BASIC.into())),
            resource: "/api/v1/items".into(),
            client_address: "10.0.0.3".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry run")
        .into_inner();
    r.quotas.iter().find(|q| q.name == "daily").map(|q| q.remaining).expect("a daily quota")
}

fn redis_policy(redis: &RedisServer, timeout: &str) -> String {
    reference_policy().replacen(
        "  memory: {}",
        &format!("  redis:\n    url: {}\n    timeout: {timeout}", redis.url()),
        1,
    )
}

async fn expired_calls_count_nothing(policy: &str) {
    let p = Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut ext = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let mut native = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let mut rls = RateLimitServiceClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let before = daily_left(&mut native).await;
    let ask = || check_request("10.0.0.3", "GET", "/api/v1/items", &[("x-api-key", BASIC)]);
    for _ in 0..20 {
        let e = ext.check(with_timeout(ask(), "1n")).await.expect_err("a 1 ns deadline has passed");
        assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");
        let native_ask = CheckRequest {
            credential: Some(Credential::ApiKey(BASIC.into())),
            resource: "/api/v1/items".into(),
            client_address: "10.0.0.3".into(),
            ..Default::default()
        };
        let e = native.check(with_timeout(native_ask, "1n")).await.expect_err("passed");
        assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");
        let descriptor = RateLimitDescriptor {
            entries: vec![Entry { key: "remote_address".into(), value: "10.0.0.3".into() }],
            ..Default::default()
        };
        let rl = RateLimitRequest { domain: "edge".into(), descriptors: vec![descriptor], hits_addend: 1 };
        let e = rls.should_rate_limit(with_timeout(rl, "1n")).await.expect_err("passed");
        assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");
    }
    assert_eq!(daily_left(&mut native).await, before, "a call whose deadline had passed was counted");
    // a deadline with time left decides as usual, and counts
    let r = ext.check(with_timeout(ask(), "5S")).await.expect("answer").into_inner();
    assert_eq!(denied_status(&r), None, "{r:?}");
    assert_eq!(daily_left(&mut native).await, before - 1);
    p.wait_for_decision("deadline_exceeded").await;
}

#[tokio::test]
async fn an_expired_call_counts_nothing_on_the_memory_store() {
    expired_calls_count_nothing(&reference_policy()).await;
}

#[tokio::test]
async fn an_expired_call_counts_nothing_on_redis() {
    let redis = RedisServer::start();
    expired_calls_count_nothing(&redis_policy(&redis, "2s")).await;
    // nothing in Redis for the ratelimit descriptor either
    let keys = redis.command("KEYS *");
    assert!(!keys.contains("edge"), "{keys}");
}

#[tokio::test]
async fn a_deadline_shorter_than_the_store_timeout_shortens_the_store_call() {
    let redis = RedisServer::start();
    let p = Portcullis::start(&redis_policy(&redis, "3s")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut ext = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let ask = || check_request("10.0.0.4", "GET", "/api/v1/items", &[("x-api-key", BASIC)]);
    assert_eq!(denied_status(&ext.check(ask()).await.expect("answer").into_inner()), None, "Redis up");
    redis.signal("STOP");
    let started = tokio::time::Instant::now();
    let e = ext.check(with_timeout(ask(), "300m")).await.expect_err("Redis does not answer in time");
    let took = started.elapsed();
    redis.signal("CONT");
    assert!(matches!(e.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled), "{e:?}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}: the 3 s store timeout was not shortened");
    // the store did not fail: no store error was counted for it
    p.wait_for_decision("deadline_exceeded").await;
    assert!(!p.logs().iter().any(|l| l.contains("store call failed")), "{:?}", p.logs());
}
