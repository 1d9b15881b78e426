//! portcullis-shim at the edge: request smuggling probes and header hygiene, request limits
//! (431, 413, 408) with JSON bodies, upstream failures (502, 504, untrusted or unpinned
//! certificates), the plain-HTTP listener, and SIGTERM draining with leases completed.

use std::time::Duration;

use tests::{
    DEMO_BASIC_KEY, Portcullis, Shim, ShimDir, TlsUpstream, Upstream, curl, raw_tls, reference_policy, shim_config,
    spki_pin,
};

const BUSINESS: &str = "pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m";

struct Edge {
    d: ShimDir,
    portcullis: Portcullis,
    upstream: Upstream,
    shim: Shim,
}

async fn edge(extra: &str) -> Edge {
    let d = ShimDir::new("shim-edge");
    let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), extra);
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    Edge { d, portcullis, upstream, shim }
}

impl Edge {
    async fn raw(&self, bytes: &str) -> String {
        raw_tls(self.shim.https, &self.d.certs.ca, bytes.as_bytes(), Duration::from_secs(5)).await
    }

    fn ca(&self) -> String {
        self.d.certs.ca.to_string_lossy().into_owned()
    }
}

fn statuses(raw: &str) -> Vec<u16> {
    raw.split("HTTP/1.1 ").skip(1).filter_map(|s| s.get(..3)?.parse().ok()).collect()
}

#[tokio::test]
async fn smuggling_probes_get_400_and_reach_the_upstream_at_most_once() {
    let e = edge("").await;
    let probes = [
        // CL.TE and TE.CL, each with a request smuggled behind it
        "POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n",
        "POST /health HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n",
        // two different Content-Lengths
        "POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        // obs-fold (RFC 9112 section 5.2)
        "GET /health HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
        // a Transfer-Encoding that does not end in chunked
        "POST /health HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        // both framings with bare LF line ends (which httparse accepts)
        "POST /health HTTP/1.1\nHost: a\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        // a Content-Length that is not a number
        "POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    ];
    for probe in probes {
        let before = e.upstream.seen().len();
        let out = e.raw(probe).await;
        let got = statuses(&out);
        assert!(!got.is_empty() && got[0] == 400, "{probe:?} -> {out}");
        assert!(!got[1..].contains(&200), "a smuggled request was answered: {probe:?} -> {out}");
        assert_eq!(e.upstream.seen().len(), before, "{probe:?} reached the upstream");
    }
    assert!(e.raw(probes[0]).await.contains("both Transfer-Encoding and Content-Length"));

    // the pipelined desync probe: a clean request, then a CL.TE one in the same write: the first
    // is answered, the second refused, the upstream sees one request
    let before = e.upstream.seen().len();
    let out = e
        .raw("GET /health HTTP/1.1\r\nHost: a\r\n\r\nPOST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX")
        .await;
    assert_eq!(statuses(&out), [200, 400], "{out}");
    assert_eq!(e.upstream.seen().len(), before + 1);

    // pipelined clean requests (a body that looks like a request is a body) all go through
    let out = e
        .raw("POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nGET /x HTTP/1.1\r\n\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(statuses(&out), [200, 200], "{out}");
}

#[tokio::test]
async fn hop_by_hop_headers_upgrades_and_slow_heads() {
    let e = edge("limits: { header_read_timeout: 1s }\nroutes: { websocket: [/ws/] }\n").await;
    let ca = e.ca();

    // Connection naming the credential cannot strip it: the decision sees it, the upstream too
    for named in ["x-api-key", "authorization, x-api-key, x-forwarded-for"] {
        let r = curl(&[
            "--cacert",
            &ca,
            "--http1.1",
            "-H",
            &format!("x-api-key: {DEMO_BASIC_KEY}"),
            "-H",
            &format!("Connection: {named}"),
            &e.shim.url("/api/v1/items"),
        ])
        .await;
        assert_eq!(r.status, 200, "{r:?}");
        let seen = e.upstream.seen();
        let last = seen.last().expect("the upstream saw it");
        assert_eq!(last.headers.get("x-api-key").map(String::as_str), Some(DEMO_BASIC_KEY));
        assert_eq!(last.headers.get("x-portcullis-subject").map(String::as_str), Some("demo-basic"));
    }
    // other hop-by-hop headers, and those Connection names, do not reach the upstream; a
    // forged identity header never does; X-Forwarded-* are the shim's
    let r = curl(&[
        "--cacert",
        &ca,
        "--http1.1",
        "-H",
        "Connection: x-drop-me",
        "-H",
        "x-drop-me: 1",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "x-portcullis-subject: demo-admin",
        "-H",
        "x-forwarded-proto: http",
        &e.shim.url("/health"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = e.upstream.seen();
    let h = &seen.last().expect("seen").headers;
    for gone in ["x-drop-me", "keep-alive", "x-portcullis-subject"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h.get("x-forwarded-proto").map(String::as_str), Some("https"));
    assert_eq!(h.get("x-forwarded-for").map(String::as_str), Some("127.0.0.1"));
    assert!(h.get("x-request-id").is_some_and(|v| v.len() == 36), "{h:?}");

    // forwarding headers a client could use to tell the upstream another client, host or path,
    // and Envoy's internal ones, never reach it; the Host is the one decided
    let r = curl(&[
        "--cacert",
        &ca,
        "-H",
        "Forwarded: for=10.0.0.1;host=internal",
        "-H",
        "X-Real-IP: 10.0.0.1",
        "-H",
        "X-Original-URL: /admin/users",
        "-H",
        "x-envoy-retry-on: 5xx",
        &e.shim.url("/health"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = e.upstream.seen();
    let h = &seen.last().expect("seen").headers;
    for gone in ["forwarded", "x-real-ip", "x-original-url", "x-envoy-retry-on"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    let out = e
        .raw("GET https://public.example/health HTTP/1.1\r\nHost: internal.example\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(statuses(&out), [200], "{out}");
    let seen = e.upstream.seen();
    let h = &seen.last().expect("seen").headers;
    assert_eq!(h.get("host").map(String::as_str), Some("public.example"), "{h:?}");
    assert_eq!(h.get("x-forwarded-host").map(String::as_str), Some("public.example"), "{h:?}");

    // the path decided is the path forwarded; an escaped slash is refused; CONNECT is not served
    let out = e.raw("GET //health/./ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(statuses(&out), [200], "{out}");
    assert_eq!(e.upstream.seen().last().expect("seen").path, "/health/");
    let before = e.upstream.seen().len();
    let out = e.raw("GET /api%2Fv1/items HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    assert_eq!(statuses(&out), [400], "{out}");
    let out = e.raw("CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n").await;
    assert_eq!(statuses(&out), [405], "{out}");
    // a refused upgrade closes its connection: what follows is never read as a request
    let out = e
        .raw("GET /health HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    assert_eq!(statuses(&out), [400], "{out}");
    assert_eq!(e.upstream.seen().len(), before);

    // X-Forwarded-For: a trusted peer's list is kept and the peer appended
    let r = curl(&["--cacert", &ca, "-H", "x-forwarded-for: 9.9.9.9", &e.shim.url("/health")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = e.upstream.seen();
    assert_eq!(
        seen.last().expect("seen").headers.get("x-forwarded-for").map(String::as_str),
        Some("9.9.9.9, 127.0.0.1")
    );

    // h2c is refused; WebSocket only where a route allows it
    let before = e.upstream.seen().len();
    let out = e
        .raw("GET /health HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        .await;
    assert_eq!(statuses(&out), [400], "{out}");
    assert!(out.contains("h2c"), "{out}");
    let out = e
        .raw("GET /health HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await;
    assert_eq!(statuses(&out), [403], "{out}");
    assert_eq!(e.upstream.seen().len(), before);

    // a head sent too slowly is closed at limits.header_read_timeout (1s here)
    let started = tokio::time::Instant::now();
    let out =
        raw_tls(e.shim.https, &e.d.certs.ca, b"GET /health HTTP/1.1\r\nHost: a\r\n", Duration::from_secs(8)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "the slow head was not closed ({took:?}): {out}");
    assert!(!out.contains("200"), "{out}");
    assert_eq!(e.upstream.seen().len(), before);
}

#[tokio::test]
async fn request_limits_answer_with_json_bodies() {
    let e = edge("limits: { max_body_bytes: 1KiB, idle_body_timeout: 1s, max_headers: 50 }\n").await;
    let ca = e.ca();

    // too many headers, too many header bytes: 431 with a JSON body
    let mut args = vec!["--cacert".to_string(), ca.clone()];
    for i in 0..60 {
        args.extend(["-H".into(), format!("x-h{i}: {i}")]);
    }
    args.push(e.shim.url("/health"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = curl(&args).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert_eq!(r.json()["status"], 431, "{r:?}");
    // over limits.max_header_bytes (60KiB by default, Envoy's): HTTP/2 and HTTP/1.1; far over it,
    // HTTP/1.1 still gets 431 (HTTP/2 streams that large are refused by the h2 layer)
    for (proto, n) in [("--http2", 62_000), ("--http1.1", 62_000), ("--http1.1", 70 << 10)] {
        let big = format!("x-big: {}", "a".repeat(n));
        let r = curl(&["--cacert", &ca, proto, "-H", &big, &e.shim.url("/health")]).await;
        assert_eq!(r.status, 431, "{proto} {n}: {r:?}");
        assert_eq!(r.json()["error"], "Request Header Fields Too Large", "{r:?}");
        assert_eq!(r.json()["message"], "request headers too large", "the shim's own answer: {r:?}");
    }

    // a declared body over the limit: 413 before anything is sent
    let before = e.upstream.seen().len();
    let out = e.raw("POST /api/v1/items HTTP/1.1\r\nHost: a\r\nx-api-key: pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m\r\nContent-Length: 5000\r\n\r\n").await;
    assert_eq!(statuses(&out), [413], "{out}");
    assert!(out.contains("\"status\":413"), "{out}");
    // a streamed (chunked) body that grows over the limit: 413, and the upstream never gets it whole
    let body = "a".repeat(3000);
    let r = curl(&[
        "--cacert",
        &ca,
        "--http1.1",
        "-H",
        &format!("x-api-key: {BUSINESS}"),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &body,
        &e.shim.url("/api/v1/items"),
    ])
    .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(e.upstream.seen()[before..].iter().all(|s| s.body_len.is_none_or(|n| n < 3000)));
    // a body that stops arriving: 408 after limits.idle_body_timeout
    let out = e.raw("POST /api/v1/items HTTP/1.1\r\nHost: a\r\nx-api-key: pk_demo_business_99y1eL2sdNt83RjrZU5zRn3m\r\nContent-Length: 100\r\n\r\nabc").await;
    assert_eq!(statuses(&out), [408], "{out}");
    assert!(out.contains("\"status\":408"), "{out}");
    // within the limits, a body goes through whole
    let r = curl(&[
        "--cacert",
        &ca,
        "-H",
        &format!("x-api-key: {BUSINESS}"),
        "--data-binary",
        "hello",
        &e.shim.url("/api/v1/items"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(e.upstream.seen().last().expect("seen").body_len, Some(5));
}

#[tokio::test]
async fn upstream_failures_are_502_and_504_and_certificates_are_always_verified() {
    let d = ShimDir::new("shim-upstream");
    let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let get = |shim: &Shim| {
        let (ca, url) = (ca.clone(), shim.url("/health"));
        async move { curl(&["--cacert", &ca, &url]).await }
    };

    // refused: 502
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let shim = Shim::start(d.path(), &shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{closed}"), ""))
        .await
        .unwrap();
    for _ in 0..4 {
        let r = get(&shim).await;
        assert_eq!((r.status, r.json()["status"].as_u64()), (502, Some(502)), "{r:?}");
    }
    // counted every time, logged once (then at most once every 10 s)
    assert!(shim.metrics().await.contains("portcullis_shim_upstream_errors_total{outcome=\"connect\"} 4"));
    shim.wait_for_log("the upstream's warning", |l| l.contains("upstream request failed")).await.unwrap();
    let lines = shim.logs().iter().filter(|l| l.contains("upstream request failed")).count();
    assert_eq!(lines, 1, "one line for four failures:\n{:#?}", shim.logs());
    // allowed, then the upstream fails: the 502 carries the decision's response headers (the
    // quota's RateLimit headers), as Envoy's local reply passes back through its filters
    let r = curl(&["--cacert", &ca, "-H", &format!("x-api-key: {BUSINESS}"), &shim.url("/api/v1/items")]).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.header("x-ratelimit-limit").is_some() && r.header("ratelimit-policy").is_some(), "{r:?}");
    drop(shim);

    // slow: 504 at upstream.response_timeout
    let slow = Upstream::start().await.expect("upstream");
    slow.set_delay(Duration::from_secs(5));
    let extra = format!("upstream: {{ url: http://{}, response_timeout: 1s }}\n", slow.addr);
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, "x", "").replace("upstream: { url: x }\n", &extra);
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = get(&shim).await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.json()["error"], "Gateway Timeout");
    drop(shim);

    // an HTTPS upstream whose certificate no trusted CA signed: 502, nothing sent
    let other = tests::Certs::new(d.path(), "upstream");
    let (up_cert, up_key) = other.leaf("upstream-server", None);
    let tls_up = TlsUpstream::start(&up_cert, &up_key).await.expect("tls upstream");
    let url = format!("https://localhost:{}", tls_up.addr.port());
    let shim = Shim::start(d.path(), &shim_config(&d.cert, &d.key, portcullis.grpc, &url, "")).await.unwrap();
    let r = get(&shim).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(tls_up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(shim);

    // trusted through ca_file, but pinned to another key: 502, nothing sent
    let wrong_pin = spki_pin(&d.cert);
    let good_pin = spki_pin(&up_cert);
    let with = |pins: &str| {
        shim_config(&d.cert, &d.key, portcullis.grpc, "x", "").replace(
            "upstream: { url: x }\n",
            &format!("upstream: {{ url: {url}, ca_file: {}, pins: [{pins}] }}\n", other.ca.display()),
        )
    };
    let shim = Shim::start(d.path(), &with(&wrong_pin)).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = get(&shim).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(tls_up.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop(shim);

    // the right pin among others (a rotation): through
    let shim =
        Shim::start(d.path(), &with(&format!("{wrong_pin}, {good_pin}"))).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = get(&shim).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "{\"upstream\":\"tls\"}");
    assert_eq!(tls_up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    // a host name the certificate does not carry: 502
    drop(shim);
    let wrong_host = with(&good_pin).replace("https://localhost:", "https://127.0.0.2:");
    let shim = Shim::start(d.path(), &wrong_host).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = get(&shim).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(tls_up.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let m = shim.metrics().await;
    assert!(m.contains("portcullis_shim_upstream_errors_total{outcome=\"connect\"} 1"), "{m}");
}

#[tokio::test]
async fn plain_http_is_rejected_or_redirected_and_recorded() {
    let e = edge("audit: { path: events.jsonl }\n").await;
    let plain = e.shim.http.expect("plain listener");
    let r =
        curl(&["-H", &format!("x-api-key: {DEMO_BASIC_KEY}"), &format!("http://{plain}/api/v1/items?token=abc")]).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["status"], 403);
    assert!(r.header("strict-transport-security").is_none(), "HSTS is for HTTPS responses only");
    assert!(e.upstream.seen().is_empty());
    let r = curl(&[&format!("http://{plain}/health")]).await;
    assert_eq!(r.status, 403, "{r:?}");
    // a thread of the shim writes the file: wait for both lines
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let text = std::fs::read_to_string(e.d.path().join("events.jsonl")).unwrap_or_default();
        if text.lines().count() >= 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<serde_json::Value> = events.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines.len(), 2, "{events}");
    assert_eq!(lines[0]["event"], "insecure_request");
    assert_eq!(lines[0]["client_ip"], "127.0.0.1");
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["path"], "/api/v1/items");
    assert_eq!(lines[0]["credential_present"], true);
    assert_eq!(lines[1]["credential_present"], false);
    assert!(!events.contains(DEMO_BASIC_KEY) && !events.contains("token=abc"), "{events}");
    assert!(e.shim.metrics().await.contains("portcullis_shim_insecure_requests_total{outcome=\"rejected\"} 2"));
    drop(e);

    // redirect: to the configured host, never the Host header unless listed
    let e =
        edge("plain_http: { mode: redirect, redirect_host: api.example.test, allowed_hosts: [other.example.test] }\n")
            .await;
    let plain = e.shim.http.expect("plain listener");
    let r = curl(&["-H", "Host: evil.example", &format!("http://{plain}/a/b?c=d")]).await;
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.header("location"), Some("https://api.example.test/a/b?c=d"));
    let r = curl(&["-H", "Host: OTHER.example.test", &format!("http://{plain}/x")]).await;
    assert_eq!(r.header("location"), Some("https://other.example.test/x"), "{r:?}");
    assert!(e.upstream.seen().is_empty());
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_completes_their_leases() {
    let mut e = edge("limits: { drain_timeout: 10s }\n").await;
    e.upstream.set_delay(Duration::from_millis(1500));
    let ca = e.ca();
    let url = e.shim.url("/api/v1/items");
    let mut inflight = Vec::new();
    for _ in 0..3 {
        let (ca, url) = (ca.clone(), url.clone());
        inflight.push(tokio::spawn(async move {
            curl(&["--cacert", &ca, "-H", &format!("x-api-key: {DEMO_BASIC_KEY}"), &url]).await
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while e.upstream.max_in_flight() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the requests did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.shim.signal("TERM").await.expect("kill -TERM");
    // no new connections once draining (the listener is closed before this line is logged)
    e.shim.wait_for_log("the drain", |l| l.contains("shutting down")).await.unwrap_or_else(|err| panic!("{err:#}"));
    let r = curl(&["--cacert", &ca, "--max-time", "2", &e.shim.url("/health")]).await;
    assert_eq!(r.status, 0, "accepted a new request while draining: {r:?}");
    for t in inflight {
        let r = t.await.expect("client");
        assert_eq!(r.status, 200, "an in-flight request was cut: {r:?}");
    }
    let status = e.shim.wait_exit(Duration::from_secs(15)).await.expect("exit");
    assert!(status.success(), "{status:?}");
    // every lease was completed before the shim exited
    let m = tests::HttpClient::new()
        .request("GET", &format!("http://{}/metrics", e.portcullis.http), &[], "")
        .await
        .expect("metrics")
        .body;
    assert!(m.contains("portcullis_traffic_completions_total{result=\"released\"} 3"), "{m}");
}

#[tokio::test]
async fn a_request_longer_than_its_lease_keeps_its_slot() {
    // one slot, leases of 2 s, an upstream taking 4 s: without renewals the first request's lease
    // expires half way and a second request gets the slot while the first still runs
    let policy = tests::reference_policy_with_traffic(
        "traffic:\n  concurrency_limit: 1\n  queue_size: 5\n  queue_timeout: 10s\n  lease_ttl: 2s\n",
    );
    let d = ShimDir::new("shim-renew");
    let portcullis = Portcullis::start(&policy).await.unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    upstream.set_delay(Duration::from_secs(4));
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), "")
        .replace("ratelimit: { domain: edge } }", "ratelimit: { domain: edge }, lease_renew_interval: 500ms }");
    assert!(cfg.contains("lease_renew_interval"), "the portcullis line moved");
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let send = || {
        let (ca, url) = (ca.clone(), shim.url("/api/v1/items"));
        tokio::spawn(async move { curl(&["--cacert", &ca, "-H", &format!("x-api-key: {DEMO_BASIC_KEY}"), &url]).await })
    };
    let first = send();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream.max_in_flight() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the first request did not reach the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = send();
    let (a, b) = (first.await.expect("client"), second.await.expect("client"));
    assert_eq!((a.status, b.status), (200, 200), "{a:?} {b:?}");
    assert_eq!(upstream.max_in_flight(), 1, "the second request got the slot while the first still held it");
    let m = shim.metrics().await;
    assert!(m.contains("portcullis_shim_lease_renewals_total{outcome=\"renewed\"}"), "{m}");
}

#[tokio::test]
async fn portcullis_unreachable_is_503_unless_failure_mode_allow() {
    let d = ShimDir::new("shim-unreachable");
    let upstream = Upstream::start().await.expect("upstream");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let ca = d.certs.ca.to_string_lossy().into_owned();
    // the default: refuse, as Envoy's failure_mode_allow: false
    let cfg = shim_config(&d.cert, &d.key, closed, &format!("http://{}", upstream.addr), "");
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    for _ in 0..5 {
        let r =
            curl(&["--cacert", &ca, "-H", &format!("x-api-key: {DEMO_BASIC_KEY}"), &shim.url("/api/v1/items")]).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(r.json()["status"], 503, "{r:?}");
    }
    assert!(upstream.seen().is_empty());
    // every failed Check counted, one warning written (then at most one every 10 s, with the
    // count left out): an outage does not write a line per request
    assert!(shim.metrics().await.contains("portcullis_shim_checks_total{outcome=\"error\"} 5"));
    shim.wait_for_log("the outage's warning", |l| l.contains("ext_authz Check failed")).await.unwrap();
    let lines = shim.logs().iter().filter(|l| l.contains("ext_authz Check failed")).count();
    assert_eq!(lines, 1, "one line for five failed checks:\n{:#?}", shim.logs());
    drop(shim);
    // failure_mode_allow: true lets the request through without a decision (and without the
    // ratelimit call, whose own failure_mode_deny is turned off here)
    let cfg = cfg.replace(
        "ratelimit: { domain: edge } }",
        "failure_mode_allow: true, ratelimit: { domain: edge, failure_mode_deny: false } }",
    );
    assert!(cfg.contains("failure_mode_allow: true"), "the portcullis line moved");
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let r = curl(&["--cacert", &ca, &shim.url("/api/v1/items")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_ratelimit_refusal_after_an_allowed_check_carries_both_answers_headers() {
    // the edge domain at one request a minute per client address, so the second is refused
    let edge = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/ratelimit/edge.yaml"))
        .expect("the example edge domain");
    let tight = edge.replace("requests_per_unit: 600", "requests_per_unit: 1");
    assert_ne!(tight, edge, "the edge domain's limit moved");
    let d = ShimDir::new("shim-rl-headers");
    let portcullis = Portcullis::start_with(&reference_policy(), &[("ratelimit/edge.yaml", &tight)])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), "");
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let (key, url) = (format!("x-api-key: {BUSINESS}"), shim.url("/api/v1/items"));
    let args = ["--cacert", ca.as_str(), "-H", key.as_str(), url.as_str()];
    let get = || curl(&args);
    assert_eq!(get().await.status, 200);
    // the ratelimit call refuses after ext_authz allowed: its headers and ext_authz's, as the
    // real Envoy sends them (both RateLimit-Policy lists, X-RateLimit-*, x-envoy-ratelimited)
    let r = get().await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(r.header("x-envoy-ratelimited"), Some("true"), "{r:?}");
    let policy = r.header_all("ratelimit-policy");
    assert!(policy.contains("\"edge.remote_address\"") && policy.contains("\"burst\""), "{r:?}");
    assert!(r.header("x-ratelimit-limit").is_some(), "{r:?}");
    assert_eq!(upstream.seen().len(), 1, "the refused request never reached the upstream");
}
