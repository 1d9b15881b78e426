//! portcullis-shim passing protocols through: gRPC (HTTP/2 with trailers) from the Python grpcio
//! client over TLS to an HTTP/2 upstream, and a WebSocket upgrade on a route that allows it,
//! only after the decision.

use std::time::Duration;

use tests::{DEMO_BASIC_KEY, Portcullis, Shim, ShimDir, grpc_python, raw_tls, reference_policy, shim_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn grpc_passes_through_to_an_http2_upstream() {
    let d = ShimDir::new("shim-grpc");
    // the upstream is a second portcullis's gRPC port (HTTP/2 without TLS): its health service
    let policy = reference_policy().replacen(
        "routes:                         # first match wins; no match -> 403 (least privilege)\n",
        "routes:\n  - match: { methods: [POST], path: /grpc.health.v1.Health/Check }\n    public: true\n",
        1,
    );
    assert_ne!(policy, reference_policy(), "the routes line moved");
    let portcullis = Portcullis::start(&policy).await.unwrap_or_else(|e| panic!("{e:#}"));
    let backend = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, "x", "")
        .replace("upstream: { url: x }\n", &format!("upstream: {{ url: http://{}, http2: true }}\n", backend.grpc));
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let script = r#"
import json, sys, grpc
ca, port = sys.argv[1], sys.argv[2]
creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
ch = grpc.secure_channel("localhost:" + port, creds)
out = {}
# grpc.health.v1.Health/Check with an empty HealthCheckRequest; SERVING is field 1 = 1
check = ch.unary_unary("/grpc.health.v1.Health/Check")
resp, call = check.with_call(b"", timeout=10)
out["health"] = resp.hex()
out["trailers"] = {k: v for k, v in (call.trailing_metadata() or [])}
# a method no route allows: the shim's 403 reaches the client as PERMISSION_DENIED
try:
    ch.unary_unary("/portcullis.v1.Decision/Check")(b"", timeout=10)
    out["denied"] = "OK"
except grpc.RpcError as e:
    out["denied"] = e.code().name
print(json.dumps(out))
"#;
    let out = tokio::process::Command::new(grpc_python())
        .args(["-c", script])
        .arg(&d.certs.ca)
        .arg(shim.https.port().to_string())
        .output()
        .await
        .expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["health"], "0801", "SERVING, through the shim: {v}");
    assert_eq!(v["denied"], "PERMISSION_DENIED", "{v}");
    portcullis.wait_for_decision("allowed").await;
}

/// A WebSocket upstream of the least kind: answers any upgrade with 101 and echoes bytes.
async fn ws_upstream()
-> (std::net::SocketAddr, tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let upgrades = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = upgrades.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read_exact(&mut b).await.is_err() {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                assert!(text.contains("upgrade: websocket"), "{text}");
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task, upgrades)
}

#[tokio::test]
async fn websocket_upgrades_only_where_a_route_allows_and_after_the_decision() {
    let d = ShimDir::new("shim-ws");
    let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let (ws, _task, upgrades) = ws_upstream().await;
    let cfg = shim_config(
        &d.cert,
        &d.key,
        portcullis.grpc,
        &format!("http://{ws}"),
        "routes: { websocket: [/api/v1/stream] }\n",
    );
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let handshake = |key: Option<&str>, path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{}\r\n",
            key.map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default()
        )
    };
    // allowed: 101, then the bytes sent after the handshake come back
    let out = raw_tls(
        shim.https,
        &d.certs.ca,
        format!("{}ping-through-the-shim", handshake(Some(DEMO_BASIC_KEY), "/api/v1/stream")).as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 101"), "{out}");
    assert!(out.ends_with("ping-through-the-shim"), "{out}");
    assert_eq!(upgrades.load(std::sync::atomic::Ordering::SeqCst), 1);
    // no credential: 401 from the decision, and the upstream never sees the upgrade
    let out =
        raw_tls(shim.https, &d.certs.ca, handshake(None, "/api/v1/stream").as_bytes(), Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    // a route without WebSocket: 403 before anything is asked
    let out = raw_tls(
        shim.https,
        &d.certs.ca,
        handshake(Some(DEMO_BASIC_KEY), "/api/v1/items").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert_eq!(upgrades.load(std::sync::atomic::Ordering::SeqCst), 1);
    // the upgraded request's lease is completed when the tunnel closes (raw_tls closed it)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tests::HttpClient::new()
            .request("GET", &format!("http://{}/metrics", portcullis.http), &[], "")
            .await
            .expect("metrics")
            .body;
        if m.contains("portcullis_traffic_completions_total{result=\"released\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the tunnel's lease was not released: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
