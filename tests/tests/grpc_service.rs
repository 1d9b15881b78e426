//! The gRPC service without Envoy: malformed Check requests, grpc.health.v1, policy reload on
//! SIGHUP, graceful shutdown, and a bad policy that must not start a server.

use std::time::Duration;

use proto::ext_authz::CheckRequest;
use proto::ext_authz::authorization_client::AuthorizationClient;
use tests::{Portcullis, check_request, denied_status, portcullis_bin, reference_policy};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

async fn client(p: &Portcullis) -> AuthorizationClient<tonic::transport::Channel> {
    AuthorizationClient::connect(format!("http://{}", p.grpc)).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Sends `n` checks with the basic key, one after the other; how many were allowed.
async fn allowed_of(c: &mut AuthorizationClient<tonic::transport::Channel>, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        let r = c.check(check_request("10.0.0.9", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await;
        if denied_status(&r.expect("an answer").into_inner()).is_none() {
            ok += 1;
        }
    }
    ok
}

async fn start(policy: &str) -> Portcullis {
    Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"))
}

#[tokio::test]
async fn malformed_check_requests_are_denied_with_400_and_a_logged_reason() {
    let p = start(&reference_policy()).await;
    let mut c = client(&p).await;

    let empty = c.check(CheckRequest::default()).await.expect("an answer, not an error").into_inner();
    assert_eq!(denied_status(&empty), Some(400));

    let mut no_peer = check_request("127.0.0.1", "GET", "/health", &[]);
    if let Some(a) = no_peer.attributes.as_mut() {
        a.source = None;
    }
    assert_eq!(denied_status(&c.check(no_peer).await.expect("answer").into_inner()), Some(400));

    for (path, why) in [
        ("/api/v1/%00", "NUL"),
        ("/api%2fv1/x", "encoded slash"),
        ("/api/%zz", "bad escape"),
        ("api/v1", "relative"),
        ("/../x", "escapes root"),
    ] {
        let r = c
            .check(check_request("127.0.0.1", "GET", path, &[("x-api-key", BASIC)]))
            .await
            .expect("answer")
            .into_inner();
        assert_eq!(denied_status(&r), Some(400), "{why}: {path}");
    }
    let r = c.check(check_request("127.0.0.1", "G E T", "/health", &[])).await.expect("answer").into_inner();
    assert_eq!(denied_status(&r), Some(400), "a method that is not a token");

    // RFC 9110 section 5.5: CR, LF and NUL never appear in a field value; names are tokens
    for (name, value, why) in [
        ("user-agent", "ok\r\nx-injected: 1", "CR LF in a value"),
        ("user-agent", "ok\nx-injected: 1", "a bare LF in a value"),
        ("user-agent", "ok\0", "NUL in a value"),
        ("x-bad name", "v", "a name that is not a token"),
        ("x-api-key", "pk_demo\r\nx-role: admin", "CR LF in the credential"),
    ] {
        let r = c
            .check(check_request("127.0.0.1", "GET", "/api/v1/x", &[("x-api-key", BASIC), (name, value)]))
            .await
            .expect("answer")
            .into_inner();
        assert_eq!(denied_status(&r), Some(400), "{why}");
    }
    // two credentials, one of them an unverified token claiming admin: neither is believed
    let forged = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJyb2xlcyI6WyJhZG1pbiJdfQ.Z2FyYmFnZQ";
    let r = c
        .check(check_request("127.0.0.1", "GET", "/api/v1/x", &[("x-api-key", BASIC), ("authorization", forged)]))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(denied_status(&r), Some(401), "ambiguous credentials");
    p.wait_for_decision("ambiguous_credentials").await;

    // an absurd header block is refused by size, not read
    let huge = "x".repeat(1 << 20);
    let r = c
        .check(check_request("127.0.0.1", "GET", "/api/v1/x", &[("x-api-key", BASIC), ("x-huge", &huge)]))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(denied_status(&r), Some(431));
    // beyond the gRPC message limit the call itself is refused, and the server lives on
    let giant = "x".repeat(5 << 20);
    let err = c
        .check(check_request("127.0.0.1", "GET", "/api/v1/x", &[("x-giant", &giant)]))
        .await
        .expect_err("over the message limit");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    let ok = c
        .check(check_request("127.0.0.1", "GET", "/api/v1/x", &[("x-api-key", BASIC)]))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(ok.status.map(|s| s.code), Some(0));

    p.wait_for_log("the malformed request warning", |l| l.contains("malformed check request"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    for want in ["bad_request", "bad_path", "bad_method", "headers_too_large"] {
        p.wait_for_decision(want).await;
    }
}

#[tokio::test]
async fn grpc_health_reports_serving() {
    let p = start(&reference_policy()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut h = HealthClient::new(channel);
    for service in ["", "envoy.service.auth.v3.Authorization"] {
        let r = h.check(HealthCheckRequest { service: service.into() }).await.expect("health").into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "service {service:?}");
    }
    let r = h.check(HealthCheckRequest { service: "portcullis.v1.Decision".into() }).await.expect("health");
    assert_eq!(r.into_inner().status(), ServingStatus::Serving);
}

/// What gRPC reflection (v1) lists on `p`'s port, or the call's error.
async fn reflected_services(p: &Portcullis) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", p.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut c = ServerReflectionClient::new(channel);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c.server_reflection_info(futures_util::stream::iter([ask])).await?.into_inner();
    let mut names = Vec::new();
    while let Some(a) = answers.message().await? {
        if let Some(MessageResponse::ListServicesResponse(l)) = a.message_response {
            names.extend(l.service.into_iter().map(|s| s.name));
        }
    }
    Ok(names)
}

#[tokio::test]
async fn grpc_reflection_is_off_by_default_and_describes_portcullis_v1_when_on() {
    let off = start(&reference_policy()).await;
    let e = reflected_services(&off).await.expect_err("off by default");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    let on = start(&reference_policy().replacen("listen:\n", "listen:\n  grpc_reflection: true\n", 1)).await;
    let names = reflected_services(&on).await.expect("reflection");
    assert!(names.iter().any(|n| n == "portcullis.v1.Decision"), "{names:?}");
}

#[tokio::test]
async fn sighup_reloads_a_valid_policy_and_keeps_the_old_one_when_invalid() {
    let p = start(&reference_policy()).await;
    let mut c = client(&p).await;
    let nowhere = || check_request("127.0.0.1", "GET", "/status", &[]);
    assert_eq!(denied_status(&c.check(nowhere()).await.expect("answer").into_inner()), Some(403));

    // an invalid file is refused; the old policy keeps serving
    let file = p.dir.0.join("policy.yaml");
    std::fs::write(&file, reference_policy().replacen("allow_roles: [admin]", "allow_roles: [admn]", 1))
        .expect("write");
    p.signal("HUP").await.expect("SIGHUP");
    let line = p
        .wait_for_log("the refused reload", |l| l.contains("policy reload refused"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(line.contains("unknown role") && line.contains("routes[4].allow_roles[0]"), "{line}");
    assert_eq!(denied_status(&c.check(nowhere()).await.expect("answer").into_inner()), Some(403));

    // a valid one with a new public route takes effect
    let with_status =
        reference_policy().replacen("routes:", "routes:\n  - match: { path: /status }\n    public: true", 1);
    std::fs::write(&file, with_status).expect("write");
    p.signal("HUP").await.expect("SIGHUP");
    p.wait_for_log("the reload", |l| l.contains("policy reloaded")).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = c.check(nowhere()).await.expect("answer").into_inner();
    assert_eq!(r.status.as_ref().map(|s| s.code), Some(0), "{r:?}");
}

#[tokio::test]
async fn sigterm_stops_the_service_cleanly() {
    let mut p = start(&reference_policy()).await;
    p.signal("TERM").await.expect("SIGTERM");
    let status = p.wait_exit(Duration::from_secs(30)).await.expect("exit");
    assert!(status.success(), "{status:?}");
    assert!(p.logs().iter().any(|l| l.contains("\"stopped\"")), "{:?}", p.logs());
}

#[tokio::test]
async fn an_invalid_policy_never_starts_a_server() {
    let dir = tests::TempDir::new("bad-policy");
    let file = dir.0.join("policy.yaml");
    std::fs::write(&file, reference_policy().replacen("deny: [198.51.100.0/24]", "deny: [198.51.100.0/40]", 1))
        .expect("write");
    let out = std::process::Command::new(portcullis_bin())
        .args(["serve", "--config"])
        .arg(&file)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .output()
        .expect("run portcullis");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line =
        reference_policy().lines().position(|l| l.contains("deny: [198.51.100.0/24]")).map(|i| i + 1).expect("line");
    assert!(stderr.contains(&format!("policy.yaml:{line}: network.deny[0]: invalid CIDR")), "{stderr}");

    let out = std::process::Command::new(portcullis_bin())
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let out = std::process::Command::new(portcullis_bin())
        .args(["check-config", "--config"])
        .arg(tests::examples_dir().join("policy.yaml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn keys_hash_reads_stdin_and_generate_makes_a_usable_key() {
    use std::io::Write;
    let hash = |key: &str| {
        let mut child = std::process::Command::new(portcullis_bin())
            .args(["keys", "hash"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run");
        child.stdin.take().expect("stdin").write_all(key.as_bytes()).expect("write");
        let out = child.wait_with_output().expect("output");
        assert!(out.status.success());
        String::from_utf8(out.stdout).expect("utf-8").trim().to_owned()
    };
    assert_eq!(
        hash("pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo\n"),
        "43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba"
    );
    let out = std::process::Command::new(portcullis_bin())
        .args(["keys", "generate", "--prefix", "pk_test"])
        .output()
        .expect("run");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).expect(name).to_owned();
    let key = field("key:");
    assert!(key.starts_with("pk_test_"), "{text}");
    assert_eq!(hash(&key), field("sha256:"), "the printed digest is the key's");
}

#[test]
fn audit_verify_reports_ok_or_the_first_tampered_line_with_exit_codes() {
    let good = tests::workspace_root().join("tests/fixtures/audit/good.jsonl");
    let run = |file: &std::path::Path| {
        let out =
            std::process::Command::new(portcullis_bin()).args(["audit", "verify"]).arg(file).output().expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = run(&good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("OK, 8 events in 2 chain(s)"), "{out}");

    let text = std::fs::read_to_string(&good).expect("fixture");
    let lines: Vec<&str> = text.lines().collect();
    let dir = tests::TempDir::new("audit");
    let cases: Vec<(String, &str)> = vec![
        // one byte changed on line 3
        (text.replacen("\"req_2\"", "\"req_X\"", 1), "line 3 (chain \"pc-a\", seq 2): the event was changed"),
        // line 5 deleted
        ([&lines[..4], &lines[5..]].concat().join("\n"), "line 5 (chain \"pc-a\", seq 4): seq 3 expected"),
        // lines 2 and 3 (one chain) swapped
        (
            [lines[0], lines[2], lines[1]].iter().chain(&lines[3..]).copied().collect::<Vec<_>>().join("\n"),
            "line 2 (chain \"pc-a\", seq 2)",
        ),
        // a line inserted
        ([&lines[..6], &[lines[1]], &lines[6..]].concat().join("\n"), "line 7"),
    ];
    for (i, (content, want)) in cases.iter().enumerate() {
        let f = dir.0.join(format!("t{i}.jsonl"));
        std::fs::write(&f, content).expect("write");
        let (code, out) = run(&f);
        assert_eq!(code, Some(1), "case {i}: {out}");
        assert!(out.contains(want), "case {i}: {want:?} not in {out}");
    }
    let (code, _) = run(&dir.0.join("missing.jsonl"));
    assert_eq!(code, Some(2));
}

#[test]
fn explain_decides_one_request_and_shows_the_answer_envoy_would_get() {
    let policy = tests::examples_dir().join("policy.yaml");
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(portcullis_bin())
            .args(["explain", "--config"])
            .arg(&policy)
            .args(args)
            .output()
            .expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let v = explain(&["--path", "/api/v1/users?x=1", "-H", &format!("x-api-key: {BASIC}")]);
    assert_eq!((v["decision"].as_str(), v["status"].as_u64(), v["rule"].as_u64()), (Some("allow"), Some(200), Some(1)));
    assert_eq!(v["subject"], "demo-basic");
    assert_eq!(v["zone"], "internal");
    assert!(v["headers_to_upstream"].to_string().contains("x-portcullis-subject: demo-basic"), "{v}");
    let v = explain(&[
        "--method",
        "POST",
        "--path",
        "/api/v1/../../admin",
        "--peer",
        "203.0.113.7",
        "-H",
        &format!("x-api-key: {BASIC}"),
    ]);
    assert_eq!((v["reason"].as_str(), v["status"].as_u64()), (Some("zone_forbidden"), Some(403)), "{v}");
    assert_eq!(v["normalized_path"], "/admin");
    assert!(v["body"].as_str().is_some_and(|b| b.contains("Forbidden")), "{v}");
}

/// The lease an allowed answer sends to the upstream.
fn lease_of(r: &proto::ext_authz::CheckResponse) -> Option<String> {
    match &r.http_response {
        Some(proto::ext_authz::check_response::HttpResponse::OkResponse(ok)) => ok
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == "x-portcullis-lease")
            .map(|h| h.value.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn the_native_complete_call_releases_a_lease_once() {
    use proto::portcullis_v1::CompleteRequest;
    use proto::portcullis_v1::decision_client::DecisionClient;
    let policy =
        tests::reference_policy_with_traffic("traffic:\n  concurrency_limit: 1\n  queue_size: 0\n  lease_ttl: 60s\n");
    let p = start(&policy).await;
    let mut c = client(&p).await;
    let ask = || check_request("10.0.0.1", "GET", "/api/v1/items", &[("x-api-key", BASIC)]);
    let first = c.check(ask()).await.expect("check").into_inner();
    let lease = lease_of(&first).expect("a lease");
    // the one slot is taken and nobody may wait
    assert_eq!(denied_status(&c.check(ask()).await.expect("check").into_inner()), Some(503));
    let mut native = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let done = |lease: &str| CompleteRequest {
        lease: lease.to_owned(),
        status_code: 200,
        upstream_error: false,
        latency_us: 1500,
        request_id: "req-1".into(),
        ..Default::default()
    };
    assert!(native.complete(done(&lease)).await.expect("complete").into_inner().released);
    assert!(!native.complete(done(&lease)).await.expect("complete").into_inner().released, "once only");
    assert!(!native.complete(done("forged")).await.expect("complete").into_inner().released);
    let too_long = native.complete(done(&"x".repeat(300))).await.expect_err("refused");
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);
    // the slot is free again
    let again = c.check(ask()).await.expect("check").into_inner();
    assert!(lease_of(&again).is_some(), "{again:?}");
}

#[tokio::test]
async fn the_current_thread_runtime_decides_the_matrix_and_holds_concurrent_load() {
    // what `--runtime auto` picks on one core (a pod with a one-CPU limit, or taskset -c 0)
    // the basic tier's refill slowed to 1 a minute, so that the burst counts exactly however slow
    // this machine is
    let policy = reference_policy().replacen("basic:      { per_minute: 60,", "basic:      { per_minute: 1,", 1);
    assert_ne!(policy, reference_policy(), "the reference tier line moved");
    let p = Portcullis::start_with_env(&policy, &[], &[("PORTCULLIS_RUNTIME", "current-thread")])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    p.wait_for_log("the runtime line", |l| l.contains("\"runtime\":\"current_thread\""))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&p).await;
    let mut statuses = Vec::new();
    for (peer, method, path, key) in tests::request_matrix() {
        let headers: Vec<(&str, &str)> = key.map(|k| vec![("x-api-key", k)]).unwrap_or_default();
        let r = c.check(check_request(peer, method, path, &headers)).await.expect("check").into_inner();
        statuses.push(denied_status(&r).map_or(200, |s| u16::try_from(s).unwrap_or(0)));
    }
    assert_eq!(statuses, tests::MATRIX_STATUSES);
    // 8 connections x 25 requests at once: every one answered, exactly the burst allowed
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = client(&p).await;
        tasks.push(tokio::spawn(async move { allowed_of(&mut c, 25).await }));
    }
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("task");
    }
    // the basic tier's burst is 100, and the matrix's basic requests took 11 of it
    assert_eq!(allowed, 100 - 11, "the burst, exactly");
}

#[tokio::test]
async fn the_per_core_runtimes_spread_connections_count_exactly_and_drain_on_sigterm() {
    // what `--runtime auto` picks on more than one core: each gRPC connection is served by one
    // of N current-thread runtimes (one per core), the one with the fewest connections when it
    // was accepted. The basic tier: no refill, and a burst of 50 a core (first the matrix's
    // burst, so the count below is exact on any core count)
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let burst = 50 * cores;
    let policy = reference_policy().replacen(
        "basic:      { per_minute: 60,   burst: 100,",
        &format!("basic:      {{ per_minute: 1,   burst: {burst},"),
        1,
    );
    assert_ne!(policy, reference_policy(), "the reference tier line moved");
    let mut p = Portcullis::start_with_env(&policy, &[], &[("PORTCULLIS_RUNTIME", "per-core")])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let line = p
        .wait_for_log("the runtime line", |l| l.contains("\"runtime\":\"per_core\""))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let logged = serde_json::from_str::<serde_json::Value>(&line).expect("json")["cores"].as_u64();
    assert_eq!(logged, u64::try_from(cores).ok(), "the runtimes are one per core: {line}");
    // two connections per runtime, each asked once so that it is accepted and handed over
    let mut clients = Vec::new();
    for _ in 0..2 * cores {
        let mut c = client(&p).await;
        let r = c.check(check_request("10.0.0.9", "GET", "/api/v1/items", &[("x-api-key", BASIC)])).await;
        assert!(denied_status(&r.expect("an answer").into_inner()).is_none());
        clients.push(c);
    }
    let metrics = tests::HttpClient::new()
        .request("GET", &format!("http://{}/metrics", p.http), &[], "")
        .await
        .expect("metrics")
        .body;
    for i in 0..cores {
        let want = format!("portcullis_grpc_connections{{runtime=\"{i}\"}} 2");
        assert!(metrics.lines().any(|l| l == want), "{want} in:\n{metrics}");
    }
    // all of them at once, 25 requests each (50 x cores in all): the runtimes share one store,
    // so exactly the burst is allowed (of which the first requests above took 2 x cores)
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move { (allowed_of(&mut c, 25).await, c) }));
    }
    let mut allowed = 0;
    let mut clients = Vec::new();
    for t in tasks {
        let (ok, c) = t.await.expect("task");
        allowed += ok;
        clients.push(c);
    }
    assert_eq!(allowed, burst - 2 * cores, "the burst, exactly");
    // SIGTERM: every runtime drains its connections (GOAWAY) and the process exits 0
    p.signal("TERM").await.expect("signal");
    let status = p.wait_exit(Duration::from_secs(20)).await.expect("exit");
    assert!(status.success(), "{status:?}");
    p.wait_for_log("the stop line", |l| l.contains("\"message\":\"stopped\"")).await.expect("stopped");
    drop(clients);
}
