//! Alerts end to end: failed authentications from one address cross the policy's thresholds; a
//! webhook receiver in the test gets the warn and then the critical alert, a dead webhook is
//! retried without slowing any decision, and the critical alert blocks the address.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::ext_authz::authorization_client::AuthorizationClient;
use tests::{HttpClient, Portcullis, TempDir, check_request, denied_status, reference_policy};

/// A webhook receiver: every POSTed body, parsed.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<serde_json::Value>>>) {
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let record = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let record = record.clone();
            async move {
                record.lock().expect("lock").push(serde_json::from_str(&body).unwrap_or_default());
                "ok"
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

#[tokio::test]
async fn failed_authentications_raise_warn_then_critical_and_block_the_address() {
    let (hook, got) = receiver().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port"); // closed again at once
    let dir = TempDir::new("alerts");
    let log = dir.0.join("audit.log");
    let p = reference_policy()
        .replacen(
            "failed_auth:   { warn: 10/minute,   critical: 50/minute }",
            "failed_auth:   { warn: 3/minute, critical: 6/minute, block: true }",
            1,
        )
        .replacen("webhooks: []", &format!("webhooks: [\"http://{hook}/hook\", \"http://{dead}/hook\"]"), 1)
        .replacen("    - stdout: {}", &format!("    - file: {{ path: \"{}\" }}", log.display()), 1)
        // checkpoints every second, anchored at the same receiver
        .replacen(
            "  checkpoint_every: 1h",
            &format!("  anchor_webhooks: [\"http://{hook}/hook\"]\n  checkpoint_every: 1s"),
            1,
        );
    assert!(p.contains("block: true") && p.contains("/hook"), "the reference policy's alert lines moved");
    let portcullis = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = AuthorizationClient::connect(format!("http://{}", portcullis.grpc)).await.expect("connect");
    let bad =
        || check_request("10.2.3.4", "GET", "/api/v1/items", &[("x-api-key", "pk_wrong_key_0000000000000000000")]);
    for i in 0..6 {
        let started = tokio::time::Instant::now();
        let r = c.check(bad()).await.expect("check").into_inner();
        assert_eq!(denied_status(&r), Some(401), "failure {i}");
        assert!(started.elapsed() < Duration::from_millis(500), "a failing webhook never slows a decision");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let alerts_in = |got: &Arc<Mutex<Vec<serde_json::Value>>>| {
        got.lock().expect("lock").iter().filter(|a| a["event"] == "alert").cloned().collect::<Vec<_>>()
    };
    while alerts_in(&got).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the webhook got {:?}; log: {}",
            got.lock().expect("lock"),
            portcullis.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alerts = alerts_in(&got);
    let levels: Vec<&str> = alerts.iter().filter_map(|a| a["level"].as_str()).collect();
    assert_eq!(levels, ["warn", "critical"], "{alerts:?}");
    assert!(alerts.iter().all(|a| a["alert"] == "failed_auth" && a["client_ip"] == "10.2.3.4"), "{alerts:?}");
    // the critical alert blocked the address (auto_block itself would wait for 10 failures)
    let good = [("x-api-key", "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo")];
    let r = c.check(check_request("10.2.3.4", "GET", "/api/v1/items", &good)).await.expect("check").into_inner();
    assert_eq!(denied_status(&r), Some(403), "{r:?}");
    // the dead webhook was tried three times for each alert, then counted as failed
    portcullis
        .wait_for_log("the retries", |l| l.contains("alert webhook failed") && l.contains("\"attempt\":3"))
        .await
        .expect("retried");
    let metrics = HttpClient::new()
        .request("GET", &format!("http://{}/metrics", portcullis.http), &[], "")
        .await
        .expect("metrics")
        .body;
    assert!(metrics.contains("portcullis_alerts_total{kind=\"failed_auth\",level=\"critical\"} 1"), "{metrics}");
    // the audit writer's counters are registered too, and count the events sealed so far
    let sealed = metrics.lines().find_map(|l| l.strip_prefix("portcullis_audit_events_total ")?.parse::<u64>().ok());
    assert!(sealed.is_some_and(|n| n > 0), "{metrics}");
    // the audit checkpoints reached the anchor, signed or not, naming this instance's chain
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !got.lock().expect("lock").iter().any(|a| a["event"] == "checkpoint" && a["covers"].as_u64() > Some(0)) {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint was anchored: {:?}", got.lock().expect("lock"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // and the alerts are in the audit trail
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("\"event\":\"alert\"").count() >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no alert events in the trail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
