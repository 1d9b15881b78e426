//! A fleet on one real Redis: several portcullis processes hold a key to exactly its quota, and
//! a Redis that is paused, slow, killed or flushed of its scripts is answered within the store
//! timeout by the policy's `on_store_error`, with service resuming on its own.

use std::time::Duration;

use proto::ext_authz::authorization_client::AuthorizationClient;
use proto::ext_authz::check_response::HttpResponse;
use proto::ratelimit::rate_limit_descriptor::Entry;
use proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::{RateLimitDescriptor, RateLimitRequest};
use tests::{
    Envoy, HttpClient, Portcullis, RedisCluster, RedisServer, Upstream, check_request, denied_status, reference_policy,
};
use tonic::transport::Channel;

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";
/// The store timeout these tests configure, and the slack allowed on top of it for a loaded CI
/// machine: an answer must come well before a client would give up, never hang.
const TIMEOUT_MS: u64 = 100;
const MARGIN: Duration = Duration::from_millis(900);

/// The reference policy on Redis; the basic tier refills 1 a minute instead of 60, so a burst
/// counts exactly `burst` however long the test takes.
fn policy(url: &str, on_store_error: &str) -> String {
    let p = reference_policy()
        .replacen(
            "  memory: {}                    # the embedded default; a fleet uses, instead:",
            &format!("  redis: {{ url: \"{url}\", timeout: {TIMEOUT_MS}ms, pool_size: 2 }}"),
            1,
        )
        .replacen("basic:      { per_minute: 60,", "basic:      { per_minute: 1,", 1)
        .replacen("on_store_error: deny", &format!("on_store_error: {on_store_error}"), 1);
    assert!(p.contains("redis: {") && p.contains("per_minute: 1,"), "the reference policy's lines moved");
    p
}

async fn client(p: &Portcullis) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{}", p.grpc)).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

/// 20 concurrent clients spread over `clients` send 1,000 requests for one basic key; how many
/// were allowed. Each repetition comes from another address: the tests empty Redis between
/// repetitions (FLUSHALL), which the instances' over-limit caches do not see, so the previous
/// repetition's refused plan would still be refused from memory.
async fn burst_over(clients: &[AuthorizationClient<Channel>], repetition: usize) -> usize {
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = clients[i % clients.len()].clone();
        let peer = format!("10.1.2.{repetition}");
        tasks.push(tokio::spawn(async move {
            let mut allowed = 0;
            for _ in 0..50 {
                let r = c
                    .check(check_request(&peer, "GET", "/api/v1/items", &[("x-api-key", BASIC)]))
                    .await
                    .expect("answer");
                match denied_status(r.get_ref()) {
                    None => allowed += 1,
                    Some(429) => {}
                    Some(other) => panic!("unexpected status {other}"),
                }
            }
            allowed
        }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("client");
    }
    allowed
}

#[tokio::test]
async fn instances_with_skewed_clocks_still_agree() {
    let redis = RedisServer::start();
    let policy = policy(&redis.url(), "deny");
    // one instance an hour behind, one an hour ahead: the quotas run on Redis's clock
    let mut fleet = Vec::new();
    for offset in ["-3600", "3600"] {
        let p = Portcullis::start_with_env(&policy, &[], &[("PORTCULLIS_CLOCK_OFFSET_SECS", offset)])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        p.wait_for_log("the clock shift", |l| l.contains("clock is shifted")).await.expect("shifted");
        fleet.push(p);
    }
    let clients = [client(&fleet[0]).await, client(&fleet[1]).await];
    for repetition in 0..3 {
        assert_eq!(redis.command("FLUSHALL"), "+OK\r\n");
        assert_eq!(
            burst_over(&clients, repetition).await,
            100,
            "repetition {repetition}: exactly the burst, two hours apart"
        );
    }
}

/// Three instances on `policy`, and a client of each.
async fn fleet_of_three(policy: &str) -> (Vec<Portcullis>, Vec<AuthorizationClient<Channel>>) {
    let mut fleet = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let p = Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"));
        clients.push(client(&p).await);
        fleet.push(p);
    }
    (fleet, clients)
}

/// Five bursts over the fleet, the store emptied by `flush` before each: exactly 100 allowed each
/// time (20 concurrent clients spread over the instances, 1,000 requests in all).
async fn exactly_the_burst_five_times(clients: &[AuthorizationClient<Channel>], flush: impl Fn()) {
    for repetition in 0..5 {
        flush();
        let allowed = burst_over(clients, repetition).await;
        assert_eq!(allowed, 100, "repetition {repetition}: the basic burst, exactly, across the fleet");
    }
}

#[tokio::test]
async fn three_instances_hold_one_key_to_exactly_its_burst() {
    let redis = RedisServer::start();
    let (fleet, clients) = fleet_of_three(&policy(&redis.url(), "deny")).await;
    exactly_the_burst_five_times(&clients, || assert_eq!(redis.command("FLUSHALL"), "+OK\r\n")).await;
    // most of the 4,500 refusals were answered by each instance's over-limit cache, no Redis call
    let mut hits = 0;
    for p in &fleet {
        hits += over_limit_cache_hits(p).await;
    }
    let calls = redis.cli(&["INFO", "commandstats"]);
    assert!(hits > 1_000, "over-limit cache hits: {hits}; Redis: {calls}");
}

/// Under `traffic` (the reference policy has it), an allowed request's quotas and its
/// concurrency slot are one script call: one round trip, and the slot is in Redis.
#[tokio::test]
async fn an_allowed_request_takes_its_quotas_and_its_slot_in_one_round_trip() {
    let redis = RedisServer::start();
    let p = Portcullis::start(&policy(&redis.url(), "deny")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&p).await;
    let check = check_request("10.1.2.3", "GET", "/api/v1/items", &[("x-api-key", BASIC)]);
    // the first call loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA again)
    assert_eq!(denied_status(c.check(check.clone()).await.expect("answer").get_ref()), None);
    let before = redis.evalsha_calls();
    for _ in 0..5 {
        let r = c.check(check.clone()).await.expect("answer");
        let lease = match &r.get_ref().http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                ok.headers.iter().filter_map(|h| h.header.as_ref()).any(|h| h.key == "x-portcullis-lease")
            }
            _ => false,
        };
        assert!(lease, "an allowed answer carries its lease: {:?}", r.get_ref());
    }
    assert_eq!(redis.evalsha_calls() - before, 5, "one script call per decision");
    let slots = redis.cli(&["--scan", "--pattern", "pc:{up:*}:slots"]);
    let key = slots.lines().next().unwrap_or_else(|| panic!("no slots key in Redis"));
    assert_eq!(redis.cli(&["ZCARD", key]).trim(), "6", "six leases held (never completed here)");
}

async fn over_limit_cache_hits(p: &Portcullis) -> u64 {
    let m =
        HttpClient::new().request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body;
    m.lines()
        .find_map(|l| l.strip_prefix("portcullis_store_over_limit_cache_hits_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no over-limit cache counter in {m}"))
}

/// The same on a 3-master Redis Cluster: each request's keys sit in two slots (the address's
/// and the key's), so every plan is split, checked in both, then counted.
#[tokio::test]
async fn three_instances_on_a_redis_cluster_hold_one_key_to_exactly_its_burst() {
    let cluster = RedisCluster::start(3, 0);
    let nodes: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    // a split plan makes two rounds of calls (check, count) and then the slot's: on a loaded CI
    // machine the 100 ms of the fault tests is too short for that, and this test is about counts
    let policy = policy("-", "deny").replacen("url: \"-\"", &format!("cluster: [{}]", nodes.join(", ")), 1).replacen(
        &format!("timeout: {TIMEOUT_MS}ms"),
        "timeout: 500ms",
        1,
    );
    assert!(policy.contains("timeout: 500ms"), "the store line moved");
    let (fleet, clients) = fleet_of_three(&policy).await;
    // every instance reports the cluster ready (a PING answered by every node)
    for p in &fleet {
        let http = HttpClient::new();
        let url = format!("http://{}/readyz", p.http);
        wait_until("readiness on the cluster", async || {
            http.request("GET", &url, &[], "").await.is_ok_and(|r| r.status == 200)
        })
        .await;
    }
    exactly_the_burst_five_times(&clients, || cluster.flush_all()).await;
}

#[tokio::test]
async fn three_instances_behind_one_envoy_hold_one_key_to_exactly_its_burst() {
    let redis = RedisServer::start();
    // edge.yaml's per-subject limit (60 a minute for basic) would stop the burst first
    let edge = std::fs::read_to_string(tests::examples_dir().join("ratelimit/edge.yaml")).expect("edge.yaml");
    let edge = edge.replacen("requests_per_unit: 60\n", "requests_per_unit: 1000\n", 1);
    let policy = policy(&redis.url(), "deny");
    let mut fleet = Vec::new();
    for _ in 0..3 {
        fleet.push(
            Portcullis::start_with(&policy, &[("ratelimit/edge.yaml", &edge)])
                .await
                .unwrap_or_else(|e| panic!("{e:#}")),
        );
    }
    let upstream = Upstream::start().await.expect("upstream");
    let addrs: Vec<_> = fleet.iter().map(|p| p.grpc).collect();
    let envoy = Envoy::start_fleet(&addrs, upstream.addr).await.unwrap_or_else(|e| panic!("{e:#}"));
    let client = HttpClient::new();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        let url = format!("http://{}/api/v1/items", envoy.listener);
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..10 {
                codes.push(
                    client.request("GET", &url, &[("x-api-key", BASIC)], "").await.map(|r| r.status).unwrap_or(0),
                );
            }
            codes
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.extend(t.await.expect("client"));
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 100, "exactly the burst: {codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 100, "{codes:?}");
    // every instance took part in deciding
    for p in &fleet {
        p.wait_for_decision("allowed").await;
    }
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One Check for a public route (its zone limit needs the store): the status and how long it took.
async fn health(c: &mut AuthorizationClient<Channel>) -> (Option<i32>, Duration) {
    let started = tokio::time::Instant::now();
    let r = c.check(check_request("10.9.9.9", "GET", "/health", &[])).await.expect("an answer, never a gRPC error");
    (denied_status(r.get_ref()), started.elapsed())
}

#[tokio::test]
async fn redis_faults_are_answered_by_on_store_error_within_the_timeout() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let p = Portcullis::start(&policy(&redis.url(), "deny")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&p).await;
    let http = HttpClient::new();
    let readyz = |http: HttpClient, addr| async move {
        http.request("GET", &format!("http://{addr}/readyz"), &[], "").await.map_or(0, |r| r.status)
    };
    wait_until("readiness", async || readyz(http.clone(), p.http).await == 200).await;
    assert_eq!(health(&mut c).await.0, None);

    // paused (SIGSTOP): 503 within the timeout, then back by itself after SIGCONT
    redis.signal("STOP");
    let (status, took) = health(&mut c).await;
    assert_eq!(status, Some(503), "paused Redis, on_store_error: deny");
    assert!(took < Duration::from_millis(TIMEOUT_MS) + MARGIN, "answered in {took:?}");
    wait_until("/readyz to report the store down", async || readyz(http.clone(), p.http).await == 503).await;
    redis.signal("CONT");
    wait_until("service after SIGCONT", async || health(&mut c).await.0.is_none()).await;
    wait_until("/readyz to report the store up", async || readyz(http.clone(), p.http).await == 200).await;

    // slow (DEBUG SLEEP): 503 within the timeout while it sleeps
    let url = redis.url();
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-u", &url, "DEBUG", "SLEEP", "1"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, took) = health(&mut c).await;
    assert_eq!(status, Some(503), "slow Redis");
    assert!(took < Duration::from_millis(TIMEOUT_MS) + MARGIN, "answered in {took:?}");
    let slept = sleeper.join().expect("redis-cli thread").expect("redis-cli (Debian: apt-get install redis-tools)");
    assert_eq!(slept.trim(), "OK", "DEBUG SLEEP ran");
    wait_until("service after DEBUG SLEEP", async || health(&mut c).await.0.is_none()).await;

    // scripts flushed (as after a failover): the next request is answered, not failed
    assert_eq!(redis.command("SCRIPT FLUSH"), "+OK\r\n");
    assert_eq!(health(&mut c).await.0, None, "answered after SCRIPT FLUSH");

    // killed, then restarted on the same port: 503s within the timeout, then service again
    redis.kill();
    let (status, took) = health(&mut c).await;
    assert_eq!(status, Some(503), "Redis down");
    assert!(took < Duration::from_millis(TIMEOUT_MS) + MARGIN, "answered in {took:?}");
    // the ratelimit API answers UNAVAILABLE instead, so Envoy's failure_mode_deny applies
    let mut rls = RateLimitServiceClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let req = RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: "remote_address".into(), value: "1.2.3.4".into() }],
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let err = rls.should_rate_limit(req).await.expect_err("store down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    let _redis = RedisServer::start_on(port);
    wait_until("service after a Redis restart", async || health(&mut c).await.0.is_none()).await;

    let m = http.request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body;
    assert!(m.contains("portcullis_store_errors_total{backend=\"redis\"}"), "{m}");
    assert!(m.contains("portcullis_decisions_total{outcome=\"deny\",reason=\"store_unavailable\"}"), "{m}");
}

#[tokio::test]
async fn a_store_outage_is_logged_once_per_interval_not_once_per_request() {
    // through an outage every decision's store call fails: each is answered by on_store_error
    // and counted in the metrics, but the log says so once (then at most once every 10 s, with
    // how many lines it left out), not once per request
    let mut redis = RedisServer::start();
    let port = redis.port;
    let p = Portcullis::start(&policy(&redis.url(), "allow")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let c = client(&p).await;
    redis.kill();
    let checks = (0..100).map(|i| {
        let mut c = c.clone();
        async move {
            let ip = format!("10.8.0.{i}");
            c.check(check_request(&ip, "GET", "/api/v1/x", &[("x-api-key", BASIC)])).await.expect("answer").into_inner()
        }
    });
    for r in futures_util::future::join_all(checks).await {
        assert!(matches!(r.http_response, Some(HttpResponse::OkResponse(_))), "allowed expected: {r:?}");
    }
    let http = HttpClient::new();
    let m = http.request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body;
    let counted: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_store_errors_total{backend=\"redis\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no store error count:\n{m}"));
    assert!(counted >= 100.0, "every failed call counted: {counted}");
    p.wait_for_log("the outage's warning", |l| l.contains("store call failed"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let lines = p.logs().iter().filter(|l| l.contains("store call failed")).count();
    assert_eq!(lines, 1, "one line for {counted} failed calls:\n{:#?}", p.logs());
    // Redis back: the calls left out of the log are reported as calls succeed again
    let _redis = RedisServer::start_on(port);
    let mut c = c.clone();
    wait_until("service after the restart", async || {
        let r = c.check(check_request("10.8.1.1", "GET", "/api/v1/x", &[("x-api-key", BASIC)])).await.expect("answer");
        let Some(HttpResponse::OkResponse(ok)) = r.into_inner().http_response else { return false };
        !ok.headers.iter().filter_map(|h| h.header.as_ref()).any(|h| h.key == "x-portcullis-degraded")
    })
    .await;
    let back = p
        .wait_for_log("the recovery line", |l| l.contains("store calls succeed again"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(back.contains("suppressed") && !back.contains("suppressed=0"), "{back}");
}

#[tokio::test]
async fn on_store_error_allow_lets_requests_through_marked() {
    let mut redis = RedisServer::start();
    let p = Portcullis::start(&policy(&redis.url(), "allow")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&p).await;
    redis.kill();
    let started = tokio::time::Instant::now();
    let r = c
        .check(check_request("10.9.9.9", "GET", "/api/v1/x", &[("x-api-key", BASIC)]))
        .await
        .expect("answer")
        .into_inner();
    assert!(started.elapsed() < Duration::from_millis(TIMEOUT_MS) + MARGIN);
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else { panic!("allowed expected: {r:?}") };
    let marked = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .any(|h| h.key == "x-portcullis-degraded" && h.value == "store-unavailable");
    assert!(marked, "{:?}", ok.headers);
    // credentials are still checked without the store
    let r = c.check(check_request("10.9.9.9", "GET", "/api/v1/x", &[("x-api-key", "pk_wrong")])).await.expect("answer");
    assert_eq!(denied_status(r.get_ref()), Some(401));
}

#[tokio::test]
async fn rediss_with_a_password_and_a_private_ca() {
    const PASSWORD: &str = "tls-test-s3cret";
    let redis = RedisServer::start_tls(PASSWORD);
    let port = redis.tls_port.expect("tls port");
    let ca = tests::TestIssuer::ca_file();
    let p = reference_policy().replacen(
        "  memory: {}                    # the embedded default; a fleet uses, instead:",
        &format!(
            "  redis: {{ url: \"rediss://:{PASSWORD}@127.0.0.1:{port}\", ca_file: \"{}\", timeout: 500ms }}",
            ca.display()
        ),
        1,
    );
    let portcullis = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&portcullis).await;
    let r = c.check(check_request("10.1.2.3", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await.expect("answer");
    assert_eq!(denied_status(r.get_ref()), None, "{r:?}");
    // the counters are in this Redis, reached over TLS (the plain port is the test's own)
    assert!(redis.command("DBSIZE").starts_with(":") && redis.command("DBSIZE") != ":0\r\n");
    portcullis.wait_for_decision("allowed").await;
    assert!(!portcullis.logs().iter().any(|l| l.contains(PASSWORD)), "the password is never logged");

    // the same server without the private CA: the system's roots do not trust it, so there is no
    // store, and on_store_error (deny) answers 503
    let wrong = reference_policy().replacen(
        "  memory: {}                    # the embedded default; a fleet uses, instead:",
        &format!("  redis: {{ url: \"rediss://:{PASSWORD}@localhost:{port}\", timeout: 200ms }}"),
        1,
    );
    let untrusted = Portcullis::start(&wrong).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&untrusted).await;
    let r = c.check(check_request("10.1.2.3", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await.expect("answer");
    assert_eq!(denied_status(r.get_ref()), Some(503), "a server the system roots do not trust is no store");
}

#[tokio::test]
async fn local_share_keeps_a_fraction_of_each_limit_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let p = policy(&redis.url(), "deny").replacen(
        &format!("timeout: {TIMEOUT_MS}ms, pool_size: 2 }}"),
        &format!("timeout: {TIMEOUT_MS}ms, pool_size: 2, local_share: {{ expected_instances: 4 }} }}"),
        1,
    );
    assert!(p.contains("local_share"), "the store line moved");
    let portcullis = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&portcullis).await;
    redis.kill();
    let mut allowed = 0;
    for _ in 0..30 {
        let r =
            c.check(check_request("10.1.2.3", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await.expect("answer");
        match denied_status(r.get_ref()) {
            None => allowed += 1,
            Some(429) => {}
            Some(other) => panic!("unexpected status {other}: local shares, not on_store_error"),
        }
    }
    assert_eq!(allowed, 25, "a quarter of the basic burst (100), from memory");
    portcullis
        .wait_for_log("the degraded mode", |l| l.contains("enforcing each limit's local share"))
        .await
        .expect("said so");
}

/// A Redis user that may PING but not run scripts: the instance cannot decide, so it is never
/// ready (before traffic, after a decision, a few probes later: no flapping), and the log says
/// why. The same user once allowed to run scripts: ready.
#[tokio::test]
async fn readiness_means_able_to_decide_with_the_configured_user() {
    let redis = RedisServer::start();
    let ok = redis.command("ACL SETUSER limited on >s3cret ~* &* +@all -eval -evalsha -script");
    assert!(ok.starts_with("+OK"), "{ok}");
    let port = redis.url().rsplit(':').next().expect("port").to_owned();
    let p = Portcullis::start(&policy(&format!("redis://limited:s3cret@127.0.0.1:{port}"), "deny"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let http = HttpClient::new();
    let readyz = async |http: &HttpClient| {
        http.request("GET", &format!("http://{}/readyz", p.http), &[], "").await.map_or(0, |r| r.status)
    };
    let line = p
        .wait_for_log("the probe's cause", |l| l.contains("cannot decide") && l.contains("no permissions"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(line.contains("evalsha"), "{line}");
    assert_eq!(readyz(&http).await, 503, "not ready before traffic");
    let mut c = client(&p).await;
    let r = c.check(check_request("10.0.0.1", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await.expect("answer");
    assert_eq!(denied_status(r.get_ref()), Some(503));
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(readyz(&http).await, 503, "a PING that works must not make it ready");
    }
    // allowed to run scripts: ready on the next probe, and deciding
    let ok = redis.command("ACL SETUSER limited +@all");
    assert!(ok.starts_with("+OK"), "{ok}");
    wait_until("readiness", async || readyz(&http).await == 200).await;
    let r = c.check(check_request("10.0.0.1", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await.expect("answer");
    assert_eq!(denied_status(r.get_ref()), None, "{r:?}");
    p.wait_for_log("the store back", |l| l.contains("redis store is up")).await.unwrap_or_else(|e| panic!("{e:#}"));
}

#[tokio::test]
async fn each_runtime_connects_its_own_redis_connection_as_it_starts() {
    // each per-core runtime, and the only runtime of a current-thread process, has one Redis
    // connection of its own (whatever pool_size says: 2 in `policy`), connected as the runtime
    // starts rather than inside its first request's store timeout: each runtime logs, by its
    // index, that its connection answered a PING, before any request is made
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    for shape in ["per-core", "current-thread"] {
        let redis = RedisServer::start();
        let env = [
            ("PORTCULLIS_RUNTIME", shape),
            ("PORTCULLIS_LOG_FORMAT", "json"),
            ("PORTCULLIS_LOG", "info,decision::store::redis::connection=debug"),
        ];
        let p = Portcullis::start_with_env(&policy(&redis.url(), "deny"), &[], &env)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let want = if shape == "per-core" { cores } else { 1 };
        // each runtime says so, by its index, once its own connection has answered a PING
        let up = || {
            p.logs()
                .iter()
                .filter(|l| l.contains("own Redis connection is up"))
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON log line")["runtime"].to_string())
                .collect::<Vec<_>>()
        };
        wait_until("each runtime's own connection", async || up().len() >= want).await;
        let mut runtimes = up();
        runtimes.sort();
        runtimes.dedup();
        assert_eq!(runtimes.len(), want, "{shape}: one warmed connection per runtime: {:?}", up());
        assert_eq!(up().len(), want, "{shape}: each runtime warms one connection: {:?}", up());
        if shape == "current-thread" {
            // everything, the startup probe too, runs on the one runtime and its one connection
            p.wait_for_log("the store up", |l| l.contains("redis store is up"))
                .await
                .unwrap_or_else(|e| panic!("{e:#}"));
            let clients = || redis.cli(&["CLIENT", "LIST"]);
            let used = clients()
                .lines()
                .filter(|l| !l.contains(" cmd=client|list ") && !l.contains(" cmd=subscribe "))
                .count();
            assert_eq!(used, 1, "{shape}: one connection:\n{}", clients());
        }
        drop(p);
    }
}
