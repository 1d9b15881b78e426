//! HTTP forward-auth against the real binary: through a real nginx (`auth_request`), a real
//! Caddy (`forward_auth`) and a real Traefik (`forwardAuth`), each configured as the README
//! shows, the request matrix gets the statuses the native Check gives; directly,
//! the standard mode answers with the real status, headers and JSON body, and a request that
//! cannot be checked (no URI; forwarded headers from an untrusted peer) gets a 400 that says
//! why, with nothing counted.

use proto::portcullis_v1::CheckRequest;
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_client::DecisionClient;
use tests::{HttpClient, MATRIX_STATUSES, Nginx, Portcullis, Proxy, Upstream, reference_policy, request_matrix};

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

/// The reference policy with the forward-auth listener on (a free port).
fn policy() -> String {
    reference_policy().replacen("listen:\n", "listen:\n  forward_auth: 127.0.0.1:0\n", 1)
}

async fn start(policy: &str) -> Portcullis {
    Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"))
}

async fn native_status(
    c: &mut DecisionClient<tonic::transport::Channel>,
    peer: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> u32 {
    let r = c
        .check(CheckRequest {
            credential: key.map(|k| Credential::ApiKey(k.to_owned())),
            operation: method.into(),
            resource: path.into(),
            client_address: peer.into(),
            ..Default::default()
        })
        .await
        .expect("native check")
        .into_inner();
    r.http_status
}

#[tokio::test]
async fn through_nginx_the_matrix_gets_the_statuses_of_the_native_check() {
    let (a, b) = (start(&policy()).await, start(&policy()).await);
    let upstream = Upstream::start().await.expect("upstream");
    let nginx =
        Nginx::start(a.forward_auth.expect("forward-auth on"), upstream.addr).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut native = DecisionClient::connect(format!("http://{}", b.grpc)).await.expect("connect");
    let http = HttpClient::new();
    let mut statuses = Vec::new();
    for (peer, method, path, key) in request_matrix() {
        let mut headers = vec![("x-forwarded-for", peer)];
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        let r = http.request(method, &format!("http://{}{path}", nginx.addr), &headers, "").await.expect("nginx");
        let expected = native_status(&mut native, peer, method, path, key).await;
        assert_eq!(u32::from(r.status), expected, "{method} {path} from {peer} with {key:?}: {r:?}");
        match r.status {
            401 => assert!(r.header("www-authenticate").is_some(), "nginx passes the challenge on: {r:?}"),
            429 => assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)), "{r:?}"),
            _ => {}
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, MATRIX_STATUSES);
    // nginx passes the client's own headers to the auth request: an X-Forwarded-Uri naming a
    // public path must not stand for the request nginx serves
    let forged = [("x-forwarded-uri", "/health"), ("x-forwarded-method", "GET"), ("x-forwarded-for", "10.0.0.1")];
    let r = http.request("DELETE", &format!("http://{}/admin/users", nginx.addr), &forged, "").await.expect("nginx");
    assert_eq!(r.status, 401, "the forged description was believed: {r:?}");
    // the allowed request reached the upstream with the identity nginx copied from the answer
    let seen = upstream.seen();
    let first = seen.iter().find(|s| s.path == "/api/v1/items").expect("reached the upstream");
    assert_eq!(first.headers.get("x-portcullis-subject").map(String::as_str), Some("demo-basic"));
    assert_eq!(first.headers.get("x-portcullis-tier").map(String::as_str), Some("basic"));
    assert!(seen.iter().all(|s| s.method == "GET"), "nothing denied reached the upstream: {seen:?}");

    // the store down: 503 through nginx too (restored from x-portcullis-status)
    let down = policy().replacen("  memory: {}", "  redis:\n    url: redis://127.0.0.1:1\n    timeout: 50ms", 1);
    let c = start(&down).await;
    let nginx = Nginx::start(c.forward_auth.expect("on"), upstream.addr).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = http
        .request("GET", &format!("http://{}/api/v1/items", nginx.addr), &[("x-api-key", BASIC)], "")
        .await
        .expect("nginx");
    assert_eq!(r.status, 503, "{r:?}");
}

#[tokio::test]
async fn the_standard_mode_answers_as_ext_authz_and_refuses_what_it_cannot_check() {
    let p = start(&policy()).await;
    let url = format!("http://{}/v1/forward-auth", p.forward_auth.expect("forward-auth on"));
    let http = HttpClient::new();
    let ask = |peer: &'static str, key: &'static str| {
        vec![
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", "/api/v1/items?page=2"),
            ("x-forwarded-host", "api.example.com"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", peer),
            ("x-api-key", key),
        ]
    };
    let r = http.request("GET", &url, &ask("10.0.0.9", BASIC), "").await.expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-portcullis-subject"), Some("demo-basic"));
    assert_eq!(r.header("x-portcullis-roles"), Some("user"));
    assert!(r.header("ratelimit-policy").is_some() && r.header("x-ratelimit-remaining").is_some(), "{r:?}");
    assert!(r.body.is_empty());
    // no concurrency slot: nothing would ever come back to free it
    assert_eq!(r.header("x-portcullis-lease"), None, "{r:?}");

    let r = http.request("GET", &url, &ask("10.0.0.9", "pk_nope"), "").await.expect("answer");
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some_and(|c| c.contains("ApiKey")), "{r:?}");
    assert_eq!(r.json()["error"], "Authentication required");

    // an untrusted address: 10 a minute, then 429 with Retry-After and the reference's body
    for _ in 0..10 {
        assert_eq!(http.request("GET", &url, &ask("8.8.4.4", BASIC), "").await.expect("answer").status, 200);
    }
    let r = http.request("POST", &url, &ask("8.8.4.4", BASIC), "").await.expect("answer");
    assert_eq!(r.status, 429, "{r:?}");
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["remaining_requests"], 0);

    // no URI: nothing to check
    let r = http.request("GET", &url, &[("x-api-key", BASIC)], "").await.expect("answer");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains("X-Forwarded-Uri")), "{r:?}");
    // two descriptions of one request: ambiguous
    let mut twice = ask("10.0.0.9", BASIC);
    twice.push(("x-forwarded-uri", "/admin/users"));
    let r = http.request("GET", &url, &twice, "").await.expect("answer");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains("repeated")), "{r:?}");
}

#[tokio::test]
async fn forwarded_headers_from_an_untrusted_peer_are_refused_and_count_nothing() {
    let untrusting =
        policy().replacen("trusted_proxies: [127.0.0.1/32, \"::1/128\"]", "trusted_proxies: [192.0.2.1/32]", 1);
    let p = start(&untrusting).await;
    let mut native = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let daily =
        |r: proto::portcullis_v1::CheckResponse| r.quotas.iter().find(|q| q.name == "daily").map(|q| q.remaining);
    let dry = || CheckRequest {
        credential: Some(Credential::ApiKey(BASIC.into())),
        resource: "/api/v1/items".into(),
        client_address: "10.0.0.9".into(),
        dry_run: true,
        ..Default::default()
    };
    let before = daily(native.check(dry()).await.expect("dry run").into_inner());
    let url = format!("http://{}/v1/forward-auth/nginx", p.forward_auth.expect("on"));
    let headers = [("x-original-uri", "/api/v1/items"), ("x-forwarded-for", "10.0.0.9"), ("x-api-key", BASIC)];
    let r = HttpClient::new().request("GET", &url, &headers, "").await.expect("answer");
    // the nginx mode: 400 travels as 403 plus the real status
    assert_eq!((r.status, r.header("x-portcullis-status")), (403, Some("400")), "{r:?}");
    assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains("trusted_proxies")), "{r:?}");
    assert_eq!(daily(native.check(dry()).await.expect("dry run").into_inner()), before, "nothing counted");
    p.wait_for_decision("bad_request").await;
    // POST /v1/check from the same untrusted peer: its own address only
    let check = format!("http://{}/v1/check", p.forward_auth.expect("on"));
    let json = [("content-type", "application/json")];
    let other = format!(r#"{{"api_key": "{BASIC}", "resource": "/api/v1/items", "client_address": "10.0.0.9"}}"#);
    let r = HttpClient::new().request("POST", &check, &json, &other).await.expect("answer");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains("trusted_proxies")), "{r:?}");
    assert_eq!(daily(native.check(dry()).await.expect("dry run").into_inner()), before, "nothing counted");
    let own = format!(r#"{{"api_key": "{BASIC}", "resource": "/api/v1/items"}}"#);
    let r = HttpClient::new().request("POST", &check, &json, &own).await.expect("answer");
    assert_eq!((r.status, r.json()["verdict"].as_str()), (200, Some("allow")), "{r:?}");
    assert_eq!(r.json()["lease"], "", "no slot over HTTP: {r:?}");
}

#[tokio::test]
async fn post_v1_check_mirrors_the_native_check_in_json() {
    let p = start(&policy()).await;
    let url = format!("http://{}/v1/check", p.forward_auth.expect("forward-auth on"));
    let http = HttpClient::new();
    let json = [("content-type", "application/json")];
    let body = serde_json::json!({
        "api_key": BASIC, "operation": "GET", "resource": "/api/v1/items", "client_address": "10.0.0.7",
        "cost": 5, "request_id": "json-1",
    });
    let r = http.request("POST", &url, &json, &body.to_string()).await.expect("answer");
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(
        (v["verdict"].as_str(), v["http_status"].as_u64(), v["reason"].as_str()),
        (Some("allow"), Some(200), Some("allowed")),
        "{v}"
    );
    assert_eq!(v["identity"]["subject"], "demo-basic");
    let daily = v["quotas"].as_array().and_then(|q| q.iter().find(|q| q["name"] == "daily")).expect("daily");
    assert_eq!(daily["remaining"], 4_995, "the cost of 5 counted: {v}");
    assert_eq!(v["decision_id"].as_str().map(str::len), Some(32));
    // the same decision through gRPC, for the same request (a dry run: nothing more counted)
    let mut native = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let g = native
        .check(CheckRequest {
            credential: Some(Credential::ApiKey(BASIC.into())),
            operation: "GET".into(),
            resource: "/api/v1/items".into(),
            client_address: "10.0.0.7".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("native")
        .into_inner();
    assert_eq!(g.quotas.iter().find(|q| q.name == "daily").map(|q| q.remaining), Some(4_994));

    // refused: not JSON, an unknown field, no resource, two credentials, a body over 64 KiB
    for (bad, why) in [
        ("{", "not a CheckRequest in JSON"),
        (r#"{"resource": "/x", "colour": "red"}"#, "unknown field"),
        (r#"{"api_key": "k", "operation": "GET"}"#, "resource is required"),
        (r#"{"api_key": "k", "bearer_token": "t", "resource": "/x"}"#, "not both"),
    ] {
        let r = http.request("POST", &url, &json, bad).await.expect("answer");
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains(why)), "{bad}: {r:?}");
    }
    let huge = format!(r#"{{"resource": "/x", "request_id": "{}"}}"#, "a".repeat(70 * 1024));
    let r = http.request("POST", &url, &json, &huge).await.expect("answer");
    assert_eq!((r.status, r.header("content-type")), (413, Some("application/json")), "{r:?}");
    assert_eq!(r.json()["status"], 413);

    // a reservation in JSON, settled by POST /v1/complete: 40 reserved, 15 used
    let body = serde_json::json!({
        "api_key": BASIC, "resource": "/api/v1/items", "client_address": "10.0.0.7", "cost": 40, "reserve": true,
    });
    let r = http.request("POST", &url, &json, &body.to_string()).await.expect("answer");
    let reservation = r.json()["reservation"].as_str().expect("a reservation").to_owned();
    assert!(reservation.len() > 33 && r.json()["reservation_ttl_ms"] == 60_000, "{r:?}");
    let complete = url.replace("/v1/check", "/v1/complete");
    let settle = serde_json::json!({ "reservation": reservation, "actual_cost": 15 }).to_string();
    let r = http.request("POST", &complete, &json, &settle).await.expect("answer");
    assert_eq!((r.status, r.json()), (200, serde_json::json!({ "settled": true, "reserved_cost": 40 })), "{r:?}");
    let r = http.request("POST", &complete, &json, &settle).await.expect("answer");
    assert_eq!((r.status, r.json()["settled"].as_bool()), (200, Some(false)), "settled once: {r:?}");
    for (bad, why) in [
        (r#"{"actual_cost": 1}"#, "reservation is required"),
        (r#"{"reservation": "x.y"}"#, "not one a Check answered"),
        (r#"{"reservation": "x", "lease": "l"}"#, "unknown field"),
    ] {
        let r = http.request("POST", &complete, &json, bad).await.expect("answer");
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert!(r.json()["detail"].as_str().is_some_and(|d| d.contains(why)), "{bad}: {r:?}");
    }
    let g = native
        .check(CheckRequest {
            credential: Some(Credential::ApiKey(BASIC.into())),
            resource: "/api/v1/items".into(),
            client_address: "10.0.0.7".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("native")
        .into_inner();
    assert_eq!(g.quotas.iter().find(|q| q.name == "daily").map(|q| q.remaining), Some(4_994 - 15), "{g:?}");
}

/// The request matrix through `proxy` (its X-Forwarded-For trusted for the client's address),
/// each answer compared with the native Check's for the same request on another instance
/// (`native`); then what reached `upstream`.
async fn matrix_through(proxy: std::net::SocketAddr, native: &Portcullis, upstream: &Upstream, name: &str) {
    let mut native = DecisionClient::connect(format!("http://{}", native.grpc)).await.expect("connect");
    let http = HttpClient::new();
    let mut statuses = Vec::new();
    for (peer, method, path, key) in request_matrix() {
        let mut headers = vec![("x-forwarded-for", peer)];
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        let r = http.request(method, &format!("http://{proxy}{path}"), &headers, "").await.expect(name);
        let expected = native_status(&mut native, peer, method, path, key).await;
        assert_eq!(u32::from(r.status), expected, "{name}: {method} {path} from {peer} with {key:?}: {r:?}");
        match r.status {
            401 => assert!(r.header("www-authenticate").is_some(), "{name} passes the challenge on: {r:?}"),
            429 => {
                assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| s >= 1)), "{r:?}");
                assert!(r.body.contains("\"retry_after\""), "{name} passes portcullis's JSON body on: {r:?}");
            }
            _ => {}
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, MATRIX_STATUSES, "{name}");
    let seen = upstream.seen();
    let first = seen.iter().find(|s| s.path == "/api/v1/items").expect("reached the upstream");
    assert_eq!(first.headers.get("x-portcullis-subject").map(String::as_str), Some("demo-basic"), "{name}");
    assert_eq!(first.headers.get("x-portcullis-tier").map(String::as_str), Some("basic"), "{name}");
    assert!(seen.iter().all(|s| s.method == "GET"), "{name}: something denied reached the upstream: {seen:?}");
}

#[tokio::test]
async fn through_caddy_and_traefik_the_matrix_gets_the_statuses_of_the_native_check() {
    let http = HttpClient::new();
    let forged = [("x-forwarded-uri", "/health"), ("x-forwarded-method", "GET"), ("x-forwarded-for", "10.0.0.1")];
    for name in ["caddy", "traefik"] {
        // fresh counters for each proxy: the matrix ends with one address over its limit
        let (a, b) = (start(&policy()).await, start(&policy()).await);
        let upstream = Upstream::start().await.expect("upstream");
        let auth = a.forward_auth.expect("forward-auth on");
        let proxy = match name {
            "caddy" => Proxy::caddy(auth, upstream.addr).await,
            _ => Proxy::traefik(auth, upstream.addr, true).await,
        }
        .unwrap_or_else(|e| panic!("{e:#}"));
        matrix_through(proxy.addr, &b, &upstream, name).await;
        // Caddy describes the request it serves whoever sent it: a client's X-Forwarded-Uri
        // naming a public path does not stand for it. Traefik behind a load balancer
        // (trustForwardHeader: true) passes on what that load balancer sends, forged or not:
        // the README says it must strip X-Forwarded-Method and -Uri, and this is why
        let r = http.request("DELETE", &format!("http://{}/admin/users", proxy.addr), &forged, "").await.expect(name);
        let believed = if name == "caddy" { 401 } else { 200 };
        assert_eq!(r.status, believed, "{name}: {r:?}");
    }
    // Traefik at the edge (the README's default, trustForwardHeader: false): a client's own
    // forwarded headers are not passed on, so its address is the one Traefik saw
    let p = start(&policy()).await;
    let upstream = Upstream::start().await.expect("upstream");
    let edge =
        Proxy::traefik(p.forward_auth.expect("on"), upstream.addr, false).await.unwrap_or_else(|e| panic!("{e:#}"));
    let headers = [("x-forwarded-for", "203.0.113.5"), ("x-api-key", tests::DEMO_SERVICE_KEY)];
    let r = http.request("GET", &format!("http://{}/internal/x", edge.addr), &headers, "").await.expect("traefik");
    assert_eq!(r.status, 200, "the client claimed an address outside the internal zone, and was not believed: {r:?}");
    let r = http.request("DELETE", &format!("http://{}/admin/users", edge.addr), &forged, "").await.expect("traefik");
    assert_eq!(r.status, 401, "{r:?}");
}
