//! Through the real Envoy: the ratelimit filter after ext_authz, with descriptors from the
//! ext_authz answer's dynamic metadata, counted by the shipped `ratelimit/edge.yaml`.

use tests::{Stack, reference_policy};

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";
const ENTERPRISE: &str = "pk_demo_enterprise_DR0FrukJrixiiVxml8E7DJmI";

#[tokio::test]
async fn a_basic_subject_is_held_to_edge_yaml_per_subject_limit() {
    let s = Stack::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    // edge.yaml: tier=basic / subject -> 60 a minute; the ext_authz bucket would allow 100
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(s.send("GET", "/api/v1/x", &[("x-api-key", BASIC)]).await.status);
    }
    assert!(statuses.iter().all(|c| *c == 200), "{statuses:?}");
    let r = s.send("GET", "/api/v1/x", &[("x-api-key", BASIC)]).await;
    assert_eq!(r.status, 429, "{r:?}");
    // the answer is the ratelimit service's: our body and headers, naming edge.yaml's rule
    assert_eq!(r.header("content-type"), Some("application/json"), "{r:?}");
    let body = r.json();
    assert_eq!(body["status"], 429, "{r:?}");
    assert_eq!(body["error"], "Rate limit exceeded");
    assert_eq!(body["remaining_requests"], 0);
    assert!(r.header("retry-after").is_some(), "{r:?}");
    assert!(r.header("x-envoy-ratelimited").is_some(), "refused by the ratelimit filter: {r:?}");
    let policies = r.header_all("ratelimit-policy");
    assert!(policies.contains("\"edge.tier_basic.subject\";q=60;w=60"), "the RLS policy: {r:?}");
    assert!(policies.contains("\"burst\";q=100"), "and ext_authz's beside it: {r:?}");
    assert_eq!(s.upstream.seen().len(), 60, "the refused request never reached the upstream");

    // an enterprise subject has its own, larger limit
    assert_eq!(s.send("GET", "/api/v1/x", &[("x-api-key", ENTERPRISE)]).await.status, 200);
    // the shadow-mode path is reported, never enforced
    for _ in 0..8 {
        assert_eq!(s.send("GET", "/api/v1/search", &[("x-api-key", ENTERPRISE)]).await.status, 200);
    }
    let m = s.admin_get("/metrics").await.body;
    assert!(m.contains("rule=\"edge.path_/api/v1/search\",outcome=\"shadow_over_limit\""), "{m}");
    assert!(m.contains("rule=\"edge.tier_basic.subject\",outcome=\"over_limit\"} 1"), "{m}");
}
