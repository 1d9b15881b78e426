//! Traffic-spike control end to end: the real Envoy with the example config (ext_authz, and the
//! gRPC access log streaming completions back), the real portcullis, and an upstream that
//! counts how many requests it has in flight at once.

use std::time::Duration;

use tokio::time::Instant;

use tests::{Envoy, HttpClient, Portcullis, RedisServer, Response, Stack, Upstream};

const ENTERPRISE: &str = "pk_demo_enterprise_DR0FrukJrixiiVxml8E7DJmI";

/// The reference policy with a small `traffic` section.
fn policy(limit: u64, queue: u64, breaker: &str) -> String {
    tests::reference_policy_with_traffic(&format!(
        "traffic:\n  concurrency_limit: {limit}\n  queue_size: {queue}\n  queue_timeout: 10s\n  lease_ttl: 3s\n{breaker}\n"
    ))
}

const BREAKER: &str =
    "  circuit_breaker:\n    error_threshold: 50%\n    min_requests: 4\n    window: 10s\n    reset_timeout: 2s";

async fn get(client: &HttpClient, envoy: &Envoy) -> Response {
    let url = format!("http://{}/api/v1/work", envoy.listener);
    client.request("GET", &url, &[("x-api-key", ENTERPRISE)], "").await.unwrap_or_else(|e| panic!("{e:#}"))
}

/// `n` clients at once; their answers.
async fn burst(envoy: &Envoy, n: usize) -> Vec<Response> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, envoy_addr) = (HttpClient::new(), envoy.listener);
        tasks.push(tokio::spawn(async move {
            let url = format!("http://{envoy_addr}/api/v1/work");
            client.request("GET", &url, &[("x-api-key", ENTERPRISE)], "").await.unwrap_or_else(|e| panic!("{e:#}"))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("client task"));
    }
    out
}

#[tokio::test]
async fn concurrency_slots_queue_the_excess_and_never_exceed_the_limit() {
    let s = Stack::start(&policy(2, 20, "")).await.unwrap_or_else(|e| panic!("{e:#}"));
    s.upstream.set_delay(Duration::from_millis(300));
    let answers = burst(&s.envoy, 10).await;
    assert!(answers.iter().all(|r| r.status == 200), "{:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(s.upstream.max_in_flight(), 2, "never more than concurrency_limit at the upstream");
    // the lease reached the upstream; those that waited were told how long
    let seen = s.upstream.seen();
    assert!(seen.iter().all(|r| r.headers.get("x-portcullis-lease").is_some_and(|l| l.len() == 50)), "leases");
    let waited: Vec<u64> =
        answers.iter().filter_map(|r| r.header("x-portcullis-queue-wait-ms")).filter_map(|v| v.parse().ok()).collect();
    assert!(waited.len() >= 7, "at least 8 of 10 waited: {waited:?}");
    assert!(waited.iter().any(|w| *w >= 250), "the last ones waited for slots to turn over: {waited:?}");
    // every slot came back through the access log (which arrives a moment after the answers)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.admin_get("/metrics").await.body;
        if m.contains("portcullis_traffic_completions_total{result=\"released\"} 10") {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_full_queue_is_a_503_with_retry_after() {
    let s = Stack::start(&policy(2, 3, "")).await.unwrap_or_else(|e| panic!("{e:#}"));
    // long enough that all ten clients arrive while the first two still hold their slots
    s.upstream.set_delay(Duration::from_millis(1500));
    let answers = burst(&s.envoy, 10).await;
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Response> = answers.iter().filter(|r| r.status == 503).collect();
    assert_eq!((ok, refused.len()), (5, 5), "2 running + 3 queued; the rest refused");
    for r in &refused {
        assert!(r.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1)), "{r:?}");
        let body = r.json();
        assert_eq!(body["status"], 503, "{body}");
        assert!(body["retry_after"].as_u64().is_some_and(|s| s >= 1), "{body}");
    }
    assert_eq!(s.upstream.max_in_flight(), 2);
    s.portcullis.wait_for_decision("queue_full").await;
}

#[tokio::test]
async fn failing_upstreams_trip_the_breaker_and_a_healthy_one_closes_it() {
    let s = Stack::start(&policy(10, 10, BREAKER)).await.unwrap_or_else(|e| panic!("{e:#}"));
    s.upstream.set_status(500);
    for _ in 0..4 {
        assert_eq!(get(&s.client, &s.envoy).await.status, 500);
    }
    // the fourth 500 completed the window: the breaker is open (completions arrive by the
    // access log, asynchronously, so give them a moment)
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = get(&s.client, &s.envoy).await;
        if r.status == 503 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status, 503, "{r:?}");
    let reached = s.upstream.seen().len();
    for _ in 0..3 {
        let r = get(&s.client, &s.envoy).await;
        assert_eq!(r.status, 503);
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(s.upstream.seen().len(), reached, "an open breaker keeps requests off the upstream");
    s.portcullis.wait_for_decision("circuit_open").await;
    // after reset_timeout the upstream is healthy again: the probe goes through and closes it
    s.upstream.set_status(0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(&s.client, &s.envoy).await.status, 200, "the half-open probe");
    // its completion (through the access log, a moment later) closes the breaker
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&s.client, &s.envoy).await.status != 200 {
        assert!(Instant::now() < deadline, "the breaker did not close after a good probe");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        assert_eq!(get(&s.client, &s.envoy).await.status, 200);
    }
}

#[tokio::test]
async fn a_client_killed_mid_request_leaks_no_slot() {
    let s = Stack::start(&policy(1, 0, "")).await.unwrap_or_else(|e| panic!("{e:#}"));
    s.upstream.set_delay(Duration::from_secs(2));
    let envoy = s.envoy.listener;
    let killed = tokio::spawn(async move {
        let client = HttpClient::new();
        let url = format!("http://{envoy}/api/v1/work");
        let _ = client.request("GET", &url, &[("x-api-key", ENTERPRISE)], "").await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    killed.abort(); // the client goes away with its request in flight
    let _ = killed.await;
    s.upstream.set_delay(Duration::ZERO);
    // within the lease TTL (3 s) at the latest, the slot is free again
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&s.client, &s.envoy).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_instances_on_one_redis_share_one_limit() {
    let redis = RedisServer::start();
    let p = policy(2, 20, "").replacen(
        "  memory: {}                    # the embedded default; a fleet uses, instead:",
        &format!("  redis: {{ url: \"{}\", timeout: 200ms, pool_size: 2 }}", redis.url()),
        1,
    );
    let a = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let b = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    upstream.set_delay(Duration::from_millis(300));
    let envoy = Envoy::start_fleet(&[a.grpc, b.grpc], upstream.addr).await.unwrap_or_else(|e| panic!("{e:#}"));
    let answers = burst(&envoy, 10).await;
    assert!(answers.iter().all(|r| r.status == 200), "{:?}", answers.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(upstream.max_in_flight(), 2, "one limit for the fleet");
    let decided = |p: &Portcullis| p.logs().iter().filter(|l| l.contains("\"message\":\"decision\"")).count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(decided(&a) > 0 && decided(&b) > 0, "both instances decided: {} and {}", decided(&a), decided(&b));
}
