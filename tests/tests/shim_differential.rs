//! The differential test: one request matrix through the real Envoy (with the shipped
//! `deploy/examples/envoy.yaml`) and through portcullis-shim, each asking its own portcullis on
//! the same policy, in front of its own upstream. Statuses, bodies (less request ids and
//! timestamps), the headers a client acts on, what the upstream receives, the leases released
//! and the breaker's verdicts must be the same.

use std::collections::BTreeMap;
use std::time::Duration;

use tests::{
    HttpClient, MATRIX_STATUSES, Portcullis, Shim, ShimDir, Stack, Upstream, curl, reference_policy, request_matrix,
    shim_config,
};

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";
const BUSINESS: &str = "pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m";
const ENTERPRISE: &str = "pk_demo_enterprise_DR0FrukJrixiiVxml8E7DJmI";

/// The headers a client acts on, compared between the two doors.
const COMPARED: [&str; 7] = [
    "content-type",
    "www-authenticate",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-quota-warning",
    "x-envoy-ratelimited",
];

enum Door {
    Envoy(Stack),
    Shim { portcullis: Portcullis, upstream: Upstream, shim: Shim, ca: String, _d: ShimDir },
}

/// What a client saw, normalized for comparison.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    body: serde_json::Value,
    headers: BTreeMap<String, String>,
    retry_after: bool,
}

fn normalize(status: u16, body: &str, header_all: impl Fn(&str) -> String) -> Seen {
    let mut body: serde_json::Value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| serde_json::Value::String("<not json>".into()))
    };
    if let Some(o) = body.as_object_mut() {
        // per request or per instant; their presence is compared, not their value
        for k in ["request_id", "reset_time", "retry_after"] {
            if let Some(v) = o.get_mut(k) {
                *v = serde_json::Value::String("<varies>".into());
            }
        }
    }
    let headers = COMPARED.iter().map(|h| (h.to_string(), header_all(h))).filter(|(_, v)| !v.is_empty()).collect();
    let retry_after = !header_all("retry-after").is_empty();
    Seen { status, body, headers, retry_after }
}

impl Door {
    async fn envoy(policy: &str) -> Door {
        Door::Envoy(Stack::start(policy).await.unwrap_or_else(|e| panic!("{e:#}")))
    }

    async fn shim(policy: &str) -> Door {
        let d = ShimDir::new("shim-diff");
        let portcullis = Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"));
        let upstream = Upstream::start().await.expect("upstream");
        let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), "");
        let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
        let ca = d.certs.ca.to_string_lossy().into_owned();
        Door::Shim { portcullis, upstream, shim, ca, _d: d }
    }

    fn upstream(&self) -> &Upstream {
        match self {
            Door::Envoy(s) => &s.upstream,
            Door::Shim { upstream, .. } => upstream,
        }
    }

    fn portcullis(&self) -> &Portcullis {
        match self {
            Door::Envoy(s) => &s.portcullis,
            Door::Shim { portcullis, .. } => portcullis,
        }
    }

    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Seen {
        match self {
            Door::Envoy(s) => {
                let url = format!("http://{}{path}", s.envoy.listener);
                let r = s.client.request(method, &url, headers, body).await.unwrap_or_else(|e| panic!("{e:#}"));
                normalize(r.status, &r.body, |h| r.header_all(h))
            }
            Door::Shim { shim, ca, .. } => {
                let mut args: Vec<String> = vec!["--cacert".into(), ca.clone(), "-X".into(), method.into()];
                for (k, v) in headers {
                    args.extend(["-H".into(), format!("{k}: {v}")]);
                }
                if !body.is_empty() {
                    args.extend(["--data-binary".into(), body.into()]);
                }
                args.push(shim.url(path));
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let r = curl(&args).await;
                assert_ne!(r.status, 0, "curl failed: {r:?}");
                normalize(r.status, &r.body, |h| r.header_all(h))
            }
        }
    }

    /// Completions portcullis counted as released, once they stop changing.
    async fn released(&self) -> u64 {
        let url = format!("http://{}/metrics", self.portcullis().http);
        let read = || async {
            let m = HttpClient::new().request("GET", &url, &[], "").await.expect("metrics").body;
            m.lines()
                .find(|l| l.starts_with("portcullis_traffic_completions_total{result=\"released\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let want = self.upstream().seen().len() as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n = read().await;
            if n >= want || tokio::time::Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The matrix, run on one door: what the client saw of each request, and what the upstream
/// received of the identity ones.
async fn run_matrix(door: &Door) -> (Vec<Seen>, Vec<BTreeMap<String, String>>) {
    let mut seen = Vec::new();
    // allowed, 401, 403 by role, zone and deny list, a sensitive route, a public one, then an
    // untrusted address held to 10 a minute: 429 with its body and Retry-After
    for (peer, method, path, key) in request_matrix() {
        let mut headers = vec![("x-forwarded-for", peer)];
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        seen.push(door.send(method, path, &headers, "").await);
    }
    // 431 (over the policy's 16KB of headers), 413 (over its max_body, 1KB here)
    let mut upstream_saw = Vec::new();
    let big = "a".repeat(17_000);
    seen.push(door.send("GET", "/health", &[("x-big", &big)], "").await);
    seen.push(door.send("POST", "/api/v1/items", &[("x-api-key", BUSINESS)], &"b".repeat(2000)).await);
    seen.push(door.send("POST", "/api/v1/items", &[("x-api-key", BUSINESS)], "small").await);
    // paths as Envoy normalizes them (normalize_path, merge_slashes): decided and forwarded alike
    for path in ["/api/v1/./items", "//api//v1/items", "/admin/../api/v1/items", "/api/v1/items/%2e%2e/x"] {
        let before = door.upstream().seen().len();
        seen.push(door.send("GET", path, &[("x-api-key", BASIC)], "").await);
        let after = door.upstream().seen();
        let forwarded = if after.len() > before { after[after.len() - 1].path.clone() } else { String::new() };
        upstream_saw.push(BTreeMap::from([("path".to_owned(), forwarded)]));
    }
    // identity headers forwarded, forged ones not
    let forged =
        [("x-portcullis-subject", "demo-admin"), ("x-portcullis-tier", "enterprise"), ("x-portcullis-roles", "admin")];
    for key in [Some(BASIC), Some(ENTERPRISE), None] {
        let mut headers = forged.to_vec();
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        let path = if key.is_some() { "/api/v1/me" } else { "/health" };
        seen.push(door.send("GET", path, &headers, "").await);
        let last = door.upstream().seen().last().cloned().expect("the upstream saw it");
        let identity: BTreeMap<String, String> = last
            .headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-portcullis-") && k.as_str() != "x-portcullis-lease")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        upstream_saw.push(identity);
    }
    (seen, upstream_saw)
}

#[tokio::test]
async fn envoy_and_the_shim_give_the_same_answers() {
    let policy = reference_policy().replacen("max_body: 5MB ", "max_body: 1KB ", 1);
    assert_ne!(policy, reference_policy(), "the max_body line moved");
    let envoy = Door::envoy(&policy).await;
    let shim = Door::shim(&policy).await;
    let (a, a_up) = run_matrix(&envoy).await;
    let (b, b_up) = run_matrix(&shim).await;
    let statuses: Vec<u16> = a.iter().map(|s| s.status).collect();
    assert_eq!(&statuses[..MATRIX_STATUSES.len()], MATRIX_STATUSES, "the matrix through Envoy");
    assert_eq!(&statuses[MATRIX_STATUSES.len()..], [431, 413, 200, 200, 200, 200, 200, 200, 200, 200]);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x, y, "request {i}: Envoy (left) and the shim (right) differ");
    }
    assert_eq!(a.len(), b.len());
    // 429 and 401 carry what a client needs
    let refused = &a[MATRIX_STATUSES.len() - 1];
    assert!(refused.retry_after && refused.body["error"] == "Rate limit exceeded", "{refused:?}");
    assert_eq!(a_up, b_up, "the upstream's identity headers");
    let paths: Vec<&str> = a_up[..4].iter().map(|m| m["path"].as_str()).collect();
    assert_eq!(paths, ["/api/v1/items", "/api/v1/items", "/api/v1/items", "/api/v1/x"]);
    assert_eq!(a_up[4].get("x-portcullis-subject").map(String::as_str), Some("demo-basic"));
    assert!(a_up[6].is_empty(), "no identity (and no forged one) on a public route: {:?}", a_up[6]);
    // every allowed request's lease was released, through the access log and through Complete
    let (ra, rb) = (envoy.released().await, shim.released().await);
    assert_eq!(ra, envoy.upstream().seen().len() as u64);
    assert_eq!(ra, rb, "leases released: Envoy {ra}, the shim {rb}");
}

/// The reference policy with a breaker that opens after 4 completions, half of them failed.
fn breaker_policy() -> String {
    tests::reference_policy_with_traffic(
        "traffic:\n  concurrency_limit: 10\n  queue_size: 10\n  queue_timeout: 10s\n  lease_ttl: 3s\n  circuit_breaker:\n    error_threshold: 50%\n    min_requests: 4\n    window: 10s\n    reset_timeout: 30s\n",
    )
}

/// Four requests to a failing upstream, then requests until the breaker answers (completions
/// arrive asynchronously on both doors); what the client saw after it opened.
async fn trip(door: &Door) -> Vec<Seen> {
    door.upstream().set_status(500);
    let key = [("x-api-key", ENTERPRISE)];
    let mut out = Vec::new();
    for _ in 0..4 {
        out.push(door.send("GET", "/api/v1/work", &key, "").await);
    }
    // the four completions in the breaker before the next request: otherwise how many requests
    // it takes to see the 503 (each counted by the rate limits, whose remaining count the 503
    // carries) depends on when the completions arrive, which differs between the doors
    completions_released(door.portcullis(), 4).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = door.send("GET", "/api/v1/work", &key, "").await;
        if r.status == 503 {
            out.push(r);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the breaker did not open: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reached = door.upstream().seen().len();
    for _ in 0..3 {
        out.push(door.send("GET", "/api/v1/work", &key, "").await);
    }
    assert_eq!(door.upstream().seen().len(), reached, "an open breaker keeps requests off the upstream");
    out
}

/// Waits (up to 5 s) until `p` has released `n` leases on completions.
async fn completions_released(p: &Portcullis, n: u64) {
    let url = format!("http://{}/metrics", p.http);
    let want = format!("portcullis_traffic_completions_total{{result=\"released\"}} {n}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = tests::HttpClient::new().request("GET", &url, &[], "").await.expect("metrics").body;
        if m.lines().any(|l| l == want) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {want} in {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_breaker_opens_on_upstream_500s_through_either_door() {
    let envoy = Door::envoy(&breaker_policy()).await;
    let shim = Door::shim(&breaker_policy()).await;
    let a = trip(&envoy).await;
    let b = trip(&shim).await;
    assert_eq!(a.iter().map(|s| s.status).collect::<Vec<_>>(), [500, 500, 500, 500, 503, 503, 503, 503]);
    // the upstream's own 500 bodies are its own; the breaker's 503s are portcullis's and equal
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(x.status, y.status, "request {i}");
        if x.status == 503 {
            assert_eq!(x, y, "request {i}: Envoy (left) and the shim (right) differ");
            assert!(x.retry_after, "{x:?}");
        }
    }
    envoy.portcullis().wait_for_decision("circuit_open").await;
    shim.portcullis().wait_for_decision("circuit_open").await;
}
