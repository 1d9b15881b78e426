//! The native Decision API (`portcullis.v1.Decision/Check`) against the real binary: the same
//! answers as ext_authz for the same requests, costs and dry runs counted exactly (or not at
//! all), bad input refused with a precise error and nothing counted, and a client that is not
//! ours (Python grpcio, stubs generated from the committed .proto).

use std::collections::BTreeMap;

use proto::ext_authz::authorization_client::AuthorizationClient;
use proto::ext_authz::check_response::HttpResponse;
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_client::DecisionClient;
use proto::portcullis_v1::{CheckRequest, CheckResponse, Verdict};
use tests::{
    MATRIX_STATUSES, Portcullis, TempDir, check_request, grpc_python, reference_policy, request_matrix, workspace_root,
};
use tonic::transport::Channel;

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

async fn start(policy: &str) -> Portcullis {
    Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"))
}

async fn native(p: &Portcullis) -> DecisionClient<Channel> {
    DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect")
}

fn ask(peer: &str, method: &str, path: &str, key: Option<&str>) -> CheckRequest {
    CheckRequest {
        credential: key.map(|k| Credential::ApiKey(k.to_owned())),
        operation: method.to_owned(),
        resource: path.to_owned(),
        client_address: peer.to_owned(),
        request_id: "req-native".into(),
        ..Default::default()
    }
}

/// What a client of either API sees: status, the headers towards the upstream and the client
/// (lease ids, which are random, as "<lease>"), and the denial body's status and error.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u32,
    upstream: BTreeMap<String, String>,
    client: BTreeMap<String, String>,
    body: Option<(u64, String)>,
}

fn normal(name: &str, value: &str) -> (String, String) {
    let value = if name == "x-portcullis-lease" { "<lease>".to_owned() } else { value.to_owned() };
    (name.to_owned(), value)
}

/// The seconds a client is told to wait or until a reset (`t=` of RateLimit, X-RateLimit-Reset,
/// Retry-After), taken out of `seen` (replaced by "~") and returned in order.
fn seconds_of(seen: &mut Seen) -> Vec<u64> {
    let mut out = Vec::new();
    for (name, value) in seen.client.iter_mut() {
        match name.as_str() {
            "ratelimit" => {
                let mut rest = value.as_str();
                let mut kept = String::new();
                while let Some(i) = rest.find("t=") {
                    kept.push_str(&rest[..i + 2]);
                    let digits: String = rest[i + 2..].chars().take_while(char::is_ascii_digit).collect();
                    out.push(digits.parse().unwrap_or(u64::MAX));
                    kept.push('~');
                    rest = &rest[i + 2 + digits.len()..];
                }
                kept.push_str(rest);
                *value = kept;
            }
            "x-ratelimit-reset" | "retry-after" => {
                out.push(value.parse().unwrap_or(u64::MAX));
                *value = "~".into();
            }
            _ => {}
        }
    }
    out
}

fn body_of(body: &str) -> Option<(u64, String)> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((v["status"].as_u64()?, v["error"].as_str()?.to_owned()))
}

fn seen_ext_authz(r: &proto::ext_authz::CheckResponse) -> Seen {
    let pairs = |hs: &[proto::types::HeaderValueOption]| {
        hs.iter().filter_map(|h| h.header.as_ref()).map(|h| normal(&h.key, &h.value)).collect()
    };
    match &r.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            Seen { status: 200, upstream: pairs(&ok.headers), client: pairs(&ok.response_headers_to_add), body: None }
        }
        Some(HttpResponse::DeniedResponse(d)) => Seen {
            status: d.status.as_ref().map_or(0, |s| s.code as u32),
            upstream: BTreeMap::new(),
            client: pairs(&d.headers),
            body: body_of(&d.body),
        },
        _ => panic!("no OK or denied response: {r:?}"),
    }
}

fn seen_native(r: &CheckResponse) -> Seen {
    let pairs = |hs: &[proto::portcullis_v1::Header]| hs.iter().map(|h| normal(&h.name, &h.value)).collect();
    Seen {
        status: r.http_status,
        upstream: pairs(&r.upstream_headers),
        client: pairs(&r.response_headers),
        body: if r.body.is_empty() { None } else { body_of(&r.body) },
    }
}

/// The request matrix, asked of one instance through ext_authz and of another (same policy,
/// fresh counters) through the native Check, one request at a time: every answer alike.
async fn same_answers(policy: &str, matrix: &[(&str, &str, &str, Option<&str>)]) -> Vec<u32> {
    let (a, b) = (start(policy).await, start(policy).await);
    let mut envoy_like = AuthorizationClient::connect(format!("http://{}", a.grpc)).await.expect("connect");
    let mut ours = native(&b).await;
    let mut statuses = Vec::new();
    for &(peer, method, path, key) in matrix {
        let headers: Vec<(&str, &str)> = key.map(|k| vec![("x-api-key", k)]).unwrap_or_default();
        let mut ext = check_request(peer, method, path, &headers);
        if let Some(http) = ext.attributes.as_mut().and_then(|a| a.request.as_mut()).and_then(|r| r.http.as_mut()) {
            http.headers.insert("x-request-id".into(), "req-native".into());
        }
        let via_ext_authz = seen_ext_authz(&envoy_like.check(ext).await.expect("ext_authz").into_inner());
        let answer = ours.check(ask(peer, method, path, key)).await.expect("native").into_inner();
        let mut via_native = seen_native(&answer);
        let mut via_ext_authz = via_ext_authz;
        // the two calls may straddle a second: times left to a reset may differ by one
        let (t_ext, t_native) = (seconds_of(&mut via_ext_authz), seconds_of(&mut via_native));
        assert_eq!(t_ext.len(), t_native.len(), "{method} {path}");
        assert!(t_ext.iter().zip(&t_native).all(|(a, b)| a.abs_diff(*b) <= 1), "{t_ext:?} vs {t_native:?}");
        assert_eq!(via_ext_authz, via_native, "{method} {path} from {peer} with {key:?}");
        assert_eq!(answer.verdict == Verdict::Allow as i32, answer.http_status == 200);
        statuses.push(via_native.status);
    }
    statuses
}

#[tokio::test]
async fn the_native_check_answers_as_ext_authz_does() {
    let statuses = same_answers(&reference_policy(), &request_matrix()).await;
    assert_eq!(statuses, MATRIX_STATUSES.map(u32::from));

    // the store down (a Redis nobody listens on), on_store_error: deny -> 503 alike
    let down =
        reference_policy().replacen("  memory: {}", "  redis:\n    url: redis://127.0.0.1:1\n    timeout: 50ms", 1);
    let statuses = same_answers(&down, &[("10.0.0.1", "GET", "/api/v1/items", Some(BASIC))]).await;
    assert_eq!(statuses, [503]);
}

/// The tier quotas' remaining units, by name, in an answer.
fn remaining(r: &CheckResponse) -> BTreeMap<String, u64> {
    r.quotas.iter().map(|q| (q.name.clone(), q.remaining)).collect()
}

#[tokio::test]
async fn costs_count_exactly_dry_runs_count_nothing_and_bad_input_is_refused() {
    let dir = TempDir::new("native-audit");
    let audit = dir.0.join("audit.log");
    let policy = reference_policy().replacen(
        "    - stdout: {}",
        &format!("    - file: {{ path: \"{}\", fsync: always }}", audit.display()),
        1,
    );
    let p = start(&policy).await;
    let mut c = native(&p).await;
    let with = |cost: i64, dry_run: bool| CheckRequest {
        cost,
        dry_run,
        ..ask("10.0.0.2", "GET", "/api/v1/items", Some(BASIC))
    };

    // basic: a bucket of 100 (60 a minute) and 5,000 a day; dry runs leave both whole
    for _ in 0..3 {
        let r = c.check(with(1, true)).await.expect("dry run").into_inner();
        assert!(r.dry_run && r.verdict == Verdict::Allow as i32, "{r:?}");
        assert_eq!(remaining(&r)["daily"], 4_999);
        assert!(r.lease.is_empty(), "a dry run takes no slot");
    }
    let r = c.check(with(60, false)).await.expect("check").into_inner();
    assert_eq!((r.http_status, remaining(&r)["daily"]), (200, 4_940), "{r:?}");
    assert!(remaining(&r)["burst"] <= 40);
    let identity = r.identity.as_ref().expect("identity");
    assert_eq!(
        (identity.subject.as_str(), identity.tier.as_str(), identity.credential.as_str()),
        ("demo-basic", "basic", "api_key")
    );
    assert_eq!(identity.roles, ["user"]);
    assert_eq!(r.decision_id.len(), 32);
    assert!(r.decision_id.bytes().all(|b| b.is_ascii_hexdigit()));
    let upstream: BTreeMap<_, _> = r.upstream_headers.iter().map(|h| (h.name.as_str(), h.value.as_str())).collect();
    assert_eq!(upstream.get("x-portcullis-subject"), Some(&"demo-basic"));
    assert_eq!(upstream.get("x-portcullis-lease").copied(), Some(r.lease.as_str()));
    // the audit event carries the decision id
    let id = r.decision_id.clone();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&audit).unwrap_or_default().contains(&format!("\"decision_id\":\"{id}\"")) {
        assert!(tokio::time::Instant::now() < deadline, "no audit event carries decision {id}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // and the version of the policy that decided it
    let trail = std::fs::read_to_string(&audit).unwrap_or_default();
    let line = trail.lines().find(|l| l.contains(&format!("\"decision_id\":\"{id}\""))).expect("the event");
    assert!(line.contains("\"policy_version\":\"sha256:"), "{line}");

    // more than the bucket holds: 429, nothing counted, told when to come back
    let r = c.check(with(90, false)).await.expect("check").into_inner();
    assert_eq!((r.http_status, r.reason.as_str()), (429, "tier_rate_exceeded"), "{r:?}");
    assert!(r.retry_after_seconds >= 1 && r.body.contains("\"retry_after\""), "{r:?}");
    assert!(r.quotas.iter().any(|q| q.name == "burst" && q.exceeded));
    assert_ne!(r.decision_id, id);

    // bad input: a precise error, and nothing counted
    let bad: Vec<(CheckRequest, &str)> = vec![
        (CheckRequest { resource: String::new(), ..with(1, false) }, "resource is required"),
        (with(-1, false), "cost must not be negative"),
        (with(2_000_000_000, false), "cost is at most"),
        (CheckRequest { client_address: "not-an-ip".into(), ..with(1, false) }, "client_address"),
        (CheckRequest { operation: "G E T".into(), ..with(1, false) }, "operation"),
        (CheckRequest { headers: [("bad name".to_owned(), "v".to_owned())].into(), ..with(1, false) }, "RFC 9110"),
        (CheckRequest { credential: Some(Credential::ApiKey(String::new())), ..with(1, false) }, "empty api_key"),
        (CheckRequest { request_id: "a\nb".into(), ..with(1, false) }, "request_id"),
    ];
    for (req, why) in bad {
        let e = c.check(req).await.expect_err(why);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }
    // an oversized header map is denied as ext_authz denies it (431), before any counter
    let big = CheckRequest { headers: [("x-big".to_owned(), "v".repeat(20 * 1024))].into(), ..with(1, false) };
    let r = c.check(big).await.expect("answer").into_inner();
    assert_eq!((r.http_status, r.reason.as_str()), (431, "headers_too_large"));
    let r = c.check(with(1, true)).await.expect("dry run").into_inner();
    assert_eq!(remaining(&r)["daily"], 4_939, "only the 60 were counted: {r:?}");

    // a bearer token the verifiers refuse: 401 with a challenge, as through Envoy
    let bearer = CheckRequest { credential: Some(Credential::BearerToken("not.a.jwt".into())), ..with(1, false) };
    let r = c.check(bearer).await.expect("answer").into_inner();
    assert_eq!(r.http_status, 401, "{r:?}");
    assert!(r.response_headers.iter().any(|h| h.name == "www-authenticate" && h.value.starts_with("Bearer")));
}

#[tokio::test]
async fn a_python_grpcio_client_checks_and_completes() {
    let p = start(&reference_policy()).await;
    let out = tokio::process::Command::new(grpc_python())
        .arg(workspace_root().join("tests/clients/native_client.py"))
        .arg(p.grpc.to_string())
        .arg(BASIC)
        .output()
        .await
        .expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["verdict"], "VERDICT_ALLOW", "{v}");
    assert_eq!((v["http_status"].as_u64(), v["reason"].as_str()), (Some(200), Some("allowed")));
    assert_eq!((v["subject"].as_str(), v["tier"].as_str()), (Some("demo-basic"), Some("basic")));
    assert_eq!(v["quotas"], serde_json::json!(["burst", "daily", "ip"]));
    assert!(v["lease"].as_str().is_some_and(|l| !l.is_empty()), "{v}");
    assert_eq!(v["upstream_headers"]["x-portcullis-lease"], v["lease"]);
    assert_eq!(v["bad"]["code"], "INVALID_ARGUMENT", "{v}");
    assert!(v["bad"]["details"].as_str().is_some_and(|d| d.contains("resource is required")));
    assert_eq!(v["released"], serde_json::json!([true, false]), "a lease is released once");
    assert_eq!(v["reservation_ttl_ms"], 60_000, "{v}");
    assert_eq!(v["settled"], serde_json::json!([true, 50]), "{v}");
    // 1 (the first Check) + 20 (the settled one), and the dry run's own 1 shown as spent
    assert_eq!(v["daily_left"], serde_json::json!([5_000 - 21 - 1]), "{v}");
}

#[tokio::test]
async fn a_renewed_lease_keeps_its_slot_past_lease_ttl() {
    use proto::portcullis_v1::RenewLeaseRequest;
    let policy =
        tests::reference_policy_with_traffic("traffic:\n  concurrency_limit: 1\n  queue_size: 0\n  lease_ttl: 2s\n");
    let p = start(&policy).await;
    let mut c = native(&p).await;
    let one = || ask("10.0.0.5", "GET", "/api/v1/items", Some(BASIC));
    let first = c.check(one()).await.expect("check").into_inner();
    assert!(!first.lease.is_empty(), "{first:?}");
    let renew = |lease: &str| RenewLeaseRequest { lease: lease.to_owned() };
    // renewed every second, it outlives its 2 s
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let r = c.renew_lease(renew(&first.lease)).await.expect("renew").into_inner();
        assert!(r.renewed && r.ttl_ms == 2_000, "{r:?}");
    }
    let second = c.check(one()).await.expect("check").into_inner();
    assert_eq!((second.http_status, second.reason.as_str()), (503, "queue_full"), "the slot is still held: {second:?}");
    // no longer renewed, it expires, and nothing brings it back
    tokio::time::sleep(std::time::Duration::from_millis(2_200)).await;
    assert!(!c.renew_lease(renew(&first.lease)).await.expect("renew").into_inner().renewed);
    let third = c.check(one()).await.expect("check").into_inner();
    assert_eq!(third.http_status, 200, "{third:?}");
    assert!(!c.renew_lease(renew("0123456789abcdef.l0123")).await.expect("renew").into_inner().renewed);
    let e = c.renew_lease(renew("")).await.expect_err("no lease");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn a_cancelled_waiter_gives_its_place_in_the_queue_back() {
    use proto::portcullis_v1::CompleteRequest;
    let policy = tests::reference_policy_with_traffic(
        "traffic:\n  concurrency_limit: 1\n  queue_size: 5\n  queue_timeout: 30s\n  lease_ttl: 60s\n",
    );
    let p = start(&policy).await;
    let mut c = native(&p).await;
    let one = || ask("10.0.0.6", "GET", "/api/v1/items", Some(BASIC));
    let first = c.check(one()).await.expect("check").into_inner();
    assert!(!first.lease.is_empty(), "{first:?}");
    // a second request waits in the queue, and its caller gives up (the call is cancelled)
    let waited = tokio::time::timeout(std::time::Duration::from_millis(500), c.check(one())).await;
    assert!(waited.is_err(), "it should still be waiting: {waited:?}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // the first completes: the slot must go to the next live request, not to the cancelled one
    let done =
        CompleteRequest { lease: first.lease.clone(), status_code: 200, latency_us: 1_000, ..Default::default() };
    assert!(c.complete(done).await.expect("complete").into_inner().released);
    let started = tokio::time::Instant::now();
    let third = tokio::time::timeout(std::time::Duration::from_secs(5), c.check(one()))
        .await
        .expect("the queue's head was the cancelled request: nobody got the free slot")
        .expect("check")
        .into_inner();
    assert_eq!(third.http_status, 200, "{third:?}");
    assert!(!third.lease.is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "waited {:?}", started.elapsed());
}

const ENTERPRISE: &str = "pk_demo_enterprise_DR0FrukJrixiiVxml8E7DJmI";

/// Twenty concurrent Checks reserving 100 each (through `instances` in turn), then their
/// settles, half at 30 and half at 300, through the next instance: the enterprise tier's day
/// holds exactly 3,300 afterwards. Returns what the last dry run saw left of the day.
async fn reserve_and_settle(instances: &[&Portcullis]) -> u64 {
    use proto::portcullis_v1::CompleteRequest;
    let mut clients = Vec::new();
    for p in instances {
        clients.push(native(p).await);
    }
    let reserve =
        CheckRequest { cost: 100, reserve: true, ..ask("10.0.0.5", "GET", "/api/v1/items", Some(ENTERPRISE)) };
    let checks = (0..20).map(|i| {
        let mut c = clients[i % clients.len()].clone();
        let req = reserve.clone();
        tokio::spawn(async move { c.check(req).await.expect("check").into_inner() })
    });
    let mut answers = Vec::new();
    for h in checks {
        answers.push(h.await.expect("task"));
    }
    for r in &answers {
        assert_eq!(r.http_status, 200, "{r:?}");
        assert!(r.reservation.len() > 33 && r.reservation_ttl_ms == 60_000, "{r:?}");
    }
    let settles = answers.iter().enumerate().map(|(i, r)| {
        let mut c = clients[(i + 1) % clients.len()].clone();
        let req = CompleteRequest {
            lease: r.lease.clone(),
            reservation: r.reservation.clone(),
            actual_cost: if i % 2 == 0 { 30 } else { 300 },
            status_code: 200,
            ..Default::default()
        };
        tokio::spawn(async move { c.complete(req).await.expect("complete").into_inner() })
    });
    for h in settles {
        let done = h.await.expect("task");
        assert!(done.settled && done.released && done.reserved_cost == 100, "{done:?}");
    }
    // a second settle changes nothing
    let mut c = clients[0].clone();
    let again = CompleteRequest { reservation: answers[0].reservation.clone(), actual_cost: 0, ..Default::default() };
    let done = c.complete(again).await.expect("complete").into_inner();
    assert!(!done.settled && done.reserved_cost == 0, "{done:?}");
    let r = c.check(CheckRequest { cost: 1, dry_run: true, reserve: false, ..reserve }).await.expect("dry run");
    remaining(&r.into_inner())["daily"] + 1
}

#[tokio::test]
async fn reservations_settle_exactly_in_memory_and_across_a_redis_fleet() {
    let p = start(&reference_policy()).await;
    assert_eq!(reserve_and_settle(&[&p]).await, 100_000 - 3_300, "memory");

    let redis = tests::RedisServer::start();
    let policy = reference_policy().replacen("  memory: {}", &format!("  redis:\n    url: {}", redis.url()), 1);
    let (a, b) = (start(&policy).await, start(&policy).await);
    assert_eq!(reserve_and_settle(&[&a, &b]).await, 100_000 - 3_300, "redis");
    // the counter itself, in Redis: the day's window holds what was really used
    let daily = redis.command("GET pc:{s:demo-enterprise}:daily");
    assert!(daily.trim_end().ends_with(" 0 3300"), "{daily:?}");
    let records = redis.command("KEYS pc:{s:demo-enterprise}:res:*");
    assert!(records.starts_with("*0"), "settled reservations must be gone: {records:?}");
}

#[tokio::test]
async fn bad_reservations_and_settles_are_refused_and_change_nothing() {
    use proto::portcullis_v1::CompleteRequest;
    let p = start(&reference_policy()).await;
    let mut c = native(&p).await;
    let base = ask("10.0.0.6", "GET", "/api/v1/items", Some(BASIC));
    let e = c.check(CheckRequest { reserve: true, dry_run: true, ..base.clone() }).await.expect_err("reserve + dry");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("reserve"), "{}", e.message());
    let r = c.check(CheckRequest { cost: 10, reserve: true, ..base.clone() }).await.expect("check").into_inner();
    assert_eq!(r.http_status, 200);
    let token = r.reservation.clone();
    let (id, subject) = token.split_once('.').expect("id.subject");
    let forged_subject = format!("{id}.{}", "ZGVtby1zZXJ2aWNl"); // base64url("demo-service")
    let bad: Vec<(CompleteRequest, &str)> = vec![
        (CompleteRequest::default(), "lease or reservation is required"),
        (CompleteRequest { reservation: "nope".into(), ..Default::default() }, "not one a Check answered"),
        (CompleteRequest { reservation: format!("{}.{subject}", &id[..31]), ..Default::default() }, "not one"),
        (CompleteRequest { reservation: format!("{id}.!!!"), ..Default::default() }, "not one"),
        (CompleteRequest { reservation: "a".repeat(5000), ..Default::default() }, "too long"),
        (
            CompleteRequest { reservation: token.clone(), actual_cost: 2_000_000_000, ..Default::default() },
            "actual_cost",
        ),
    ];
    for (req, why) in bad {
        let e = c.complete(req).await.expect_err(why);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }
    // another subject's name on the same id: no such reservation, nothing settled
    let done = c
        .complete(CompleteRequest { reservation: forged_subject, actual_cost: 0, ..Default::default() })
        .await
        .expect("complete")
        .into_inner();
    assert!(!done.settled, "{done:?}");
    // the real one still settles, once: 10 reserved, 4 used
    let done = c
        .complete(CompleteRequest { reservation: token, actual_cost: 4, ..Default::default() })
        .await
        .expect("complete")
        .into_inner();
    assert!(done.settled && done.reserved_cost == 10, "{done:?}");
    let r = c.check(CheckRequest { dry_run: true, ..base }).await.expect("dry run").into_inner();
    assert_eq!(remaining(&r)["daily"], 5_000 - 4 - 1, "{r:?}");
    // an anonymous request reserves nothing: it has no tier quota to count against
    let anonymous = CheckRequest { reserve: true, ..ask("10.0.0.6", "GET", "/health", None) };
    let r = c.check(anonymous).await.expect("check").into_inner();
    assert!(r.http_status == 200 && r.reservation.is_empty() && r.reservation_ttl_ms == 0, "{r:?}");
}

#[tokio::test]
async fn a_request_refused_a_slot_keeps_no_reservation_and_its_estimate_comes_back() {
    let policy = reference_policy().replacen("concurrency_limit: 1000", "concurrency_limit: 1", 1).replacen(
        "queue_size: 5000",
        "queue_size: 0",
        1,
    );
    let p = start(&policy).await;
    let mut c = native(&p).await;
    let ask = CheckRequest { cost: 40, reserve: true, ..ask("10.0.0.7", "GET", "/api/v1/items", Some(BASIC)) };
    let first = c.check(ask.clone()).await.expect("check").into_inner();
    assert!(first.http_status == 200 && !first.reservation.is_empty() && !first.lease.is_empty(), "{first:?}");
    // the one slot is held: refused 503, with no reservation, and its 40 given back
    let second = c.check(ask.clone()).await.expect("check").into_inner();
    assert_eq!((second.http_status, second.reason.as_str()), (503, "queue_full"), "{second:?}");
    assert!(second.reservation.is_empty() && second.reservation_ttl_ms == 0, "{second:?}");
    let dry = CheckRequest { dry_run: true, reserve: false, cost: 1, ..ask };
    let r = c.check(dry).await.expect("dry run").into_inner();
    assert_eq!(remaining(&r)["daily"], 5_000 - 40 - 1, "only the first request's estimate stands: {r:?}");
}
