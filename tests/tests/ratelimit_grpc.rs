//! Envoy's ratelimit API (RLS v3) driven by a tonic client against the real binary: exact
//! counts, all-or-nothing across descriptors, hits_addend, shadow mode, unlimited, the request's
//! limit override, input bounds, and the answers' headers and body.

use proto::ratelimit::rate_limit_descriptor::{Entry, RateLimitOverride};
use proto::ratelimit::rate_limit_response::Code;
use proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use proto::ratelimit::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};
use proto::types::UInt64Value;
use tests::{Portcullis, reference_policy};

const LIMITS: &str = r#"
domain: test
descriptors:
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 3, name: per-user }
  - key: tight
    rate_limit: { unit: minute, requests_per_unit: 1 }
  - key: wide
    rate_limit: { unit: minute, requests_per_unit: 100 }
  - key: beta
    shadow_mode: true
    rate_limit: { unit: minute, requests_per_unit: 2 }
  - key: health
    rate_limit: { unlimited: true }
  - key: fixed
    rate_limit: { unit: hour, requests_per_unit: 2, algorithm: fixed_window }
"#;

async fn start() -> (Portcullis, RateLimitServiceClient<tonic::transport::Channel>) {
    let policy = reference_policy().replacen(
        "files: [ratelimit/*.yaml]",
        "files: [ratelimit/*.yaml]\n  x_ratelimit_headers: true",
        1,
    );
    let p =
        Portcullis::start_with(&policy, &[("ratelimit/test.yaml", LIMITS)]).await.unwrap_or_else(|e| panic!("{e:#}"));
    let c = RateLimitServiceClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    (p, c)
}

fn desc(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        ..Default::default()
    }
}

async fn ask(
    c: &mut RateLimitServiceClient<tonic::transport::Channel>,
    descriptors: Vec<RateLimitDescriptor>,
    hits: u32,
) -> RateLimitResponse {
    ask_in(c, "test", descriptors, hits).await
}

async fn ask_in(
    c: &mut RateLimitServiceClient<tonic::transport::Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits: u32,
) -> RateLimitResponse {
    c.should_rate_limit(RateLimitRequest { domain: domain.into(), descriptors, hits_addend: hits })
        .await
        .expect("answer")
        .into_inner()
}

fn codes(r: &RateLimitResponse) -> Vec<i32> {
    r.statuses.iter().map(|s| s.code).collect()
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add.iter().find(|h| h.key == name).map(|h| h.value.as_str())
}

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn exact_counts_at_the_limit_and_the_answer_a_client_gets() {
    let (_p, mut c) = start().await;
    let mut overall = Vec::new();
    for _ in 0..5 {
        overall.push(ask(&mut c, vec![desc(&[("user", "alice")])], 0).await.overall_code);
    }
    assert_eq!(overall, [OK, OK, OK, OVER, OVER], "hits_addend 0 counts as 1");
    // another value of the same key is counted apart
    let r = ask(&mut c, vec![desc(&[("user", "bob")])], 0).await;
    assert_eq!(r.overall_code, OK);
    let s = &r.statuses[0];
    let limit = s.current_limit.as_ref().expect("current_limit");
    assert_eq!((limit.requests_per_unit, limit.unit, limit.name.as_str()), (3, 2, "per-user"));
    assert_eq!(s.limit_remaining, 2);
    assert!(s.duration_until_reset.is_some());
    assert_eq!(header(&r, "ratelimit-policy"), Some("\"per-user\";q=3;w=60"));
    assert_eq!(header(&r, "ratelimit").map(|v| v.starts_with("\"per-user\";r=2;t=")), Some(true));
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("3, 3;w=60"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("2"));

    // over the limit: the reference 429 body, JSON, and Retry-After
    let r = ask(&mut c, vec![desc(&[("user", "alice")])], 1).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&r.raw_body).expect("json body");
    assert_eq!(body["status"], 429);
    assert_eq!(body["error"], "Rate limit exceeded");
    assert_eq!(body["remaining_requests"], 0);
    let retry = body["retry_after"].as_u64().expect("retry_after");
    assert!((1..=120).contains(&retry), "{body}");
    assert_eq!(header(&r, "retry-after"), Some(retry.to_string().as_str()));
}

#[tokio::test]
async fn descriptors_of_one_request_are_all_or_nothing() {
    let (_p, mut c) = start().await;
    let both = || vec![desc(&[("wide", "w")]), desc(&[("tight", "t")])];
    let r = ask(&mut c, both(), 1).await;
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![OK, OK]));
    for _ in 0..10 {
        let r = ask(&mut c, both(), 1).await;
        assert_eq!((r.overall_code, codes(&r)), (OVER, vec![OK, OVER]), "statuses in request order");
    }
    // the refused requests did not burn the wide limit
    let r = ask(&mut c, vec![desc(&[("wide", "w")])], 1).await;
    assert_eq!(r.statuses[0].limit_remaining, 98);
}

#[tokio::test]
async fn hits_addend_shadow_unlimited_and_unknown_descriptors() {
    let (p, mut c) = start().await;
    // hits_addend: 3 at once fits a limit of 3, and then nothing more
    assert_eq!(ask(&mut c, vec![desc(&[("user", "carol")])], 3).await.overall_code, OK);
    assert_eq!(ask(&mut c, vec![desc(&[("user", "carol")])], 1).await.overall_code, OVER);
    // a descriptor's own hits_addend wins over the request's
    let mut d = desc(&[("user", "dave")]);
    d.hits_addend = Some(UInt64Value { value: 4 });
    assert_eq!(ask(&mut c, vec![d], 1).await.overall_code, OVER, "4 hits never fit a limit of 3");
    assert_eq!(
        ask(&mut c, vec![desc(&[("user", "dave")])], 1).await.statuses[0].limit_remaining,
        2,
        "the refused 4 were not counted"
    );

    // shadow mode: counted and reported over, never enforced, and no header for it
    let mut last = None;
    for _ in 0..4 {
        last = Some(ask(&mut c, vec![desc(&[("beta", "x")])], 1).await);
    }
    let r = last.expect("answer");
    assert_eq!((r.overall_code, codes(&r)), (OK, vec![OK]));
    assert!(header(&r, "ratelimit-policy").is_none());
    let m = metrics_text(&p).await;
    assert!(
        m.contains(
            "portcullis_ratelimit_descriptors_total{domain=\"test\",rule=\"test.beta\",outcome=\"shadow_over_limit\"} 2"
        ),
        "{m}"
    );

    // unlimited and unmatched descriptors: OK with no current limit
    let r = ask(&mut c, vec![desc(&[("health", "x")]), desc(&[("nothing", "x")])], 1).await;
    assert_eq!(codes(&r), [OK, OK]);
    assert!(r.statuses.iter().all(|s| s.current_limit.is_none()));
    assert_eq!(r.statuses[0].limit_remaining, u32::MAX);
    assert_eq!(r.statuses[1].limit_remaining, 0);
    // an unknown domain limits nothing
    let r = c
        .should_rate_limit(RateLimitRequest {
            domain: "nobody".into(),
            descriptors: vec![desc(&[("user", "x")])],
            hits_addend: 1,
        })
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn the_request_limit_override_and_fixed_windows() {
    let (p, mut c) = start().await;
    let mut d = desc(&[("user", "erin")]);
    d.limit = Some(RateLimitOverride { requests_per_unit: 1, unit: 1 });
    let r = ask(&mut c, vec![d.clone()], 1).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].current_limit.as_ref().map(|l| (l.requests_per_unit, l.unit)), Some((1, 1)));
    assert_eq!(ask(&mut c, vec![d], 1).await.overall_code, OVER);

    let results: Vec<i32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(ask(&mut c, vec![desc(&[("fixed", "f")])], 1).await.overall_code);
        }
        v
    };
    assert_eq!(results, [OK, OK, OVER]);

    let m = metrics_text(&p).await;
    for want in [
        "portcullis_ratelimit_descriptors_total{domain=\"test\",rule=\"test.fixed\",outcome=\"over_limit\"} 1",
        "portcullis_ratelimit_descriptors_total{domain=\"test\",rule=\"test.fixed\",outcome=\"ok\"} 1",
        "portcullis_ratelimit_descriptors_total{domain=\"test\",rule=\"test.fixed\",outcome=\"near_limit\"} 1",
        "portcullis_ratelimit_descriptors_total{domain=\"test\",rule=\"override\",outcome=\"over_limit\"} 1",
    ] {
        assert!(m.contains(want), "{want} missing from:\n{m}");
    }
    assert!(!m.contains("erin"), "a descriptor value leaked into a metric label");
}

async fn metrics_text(p: &Portcullis) -> String {
    tests::HttpClient::new().request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body
}

#[tokio::test]
async fn malformed_requests_are_refused_with_invalid_argument() {
    let (_p, mut c) = start().await;
    let err = c
        .should_rate_limit(RateLimitRequest {
            domain: String::new(),
            descriptors: vec![desc(&[("a", "b")])],
            hits_addend: 1,
        })
        .await
        .expect_err("empty domain");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let long = "v".repeat(2000);
    let err = c
        .should_rate_limit(RateLimitRequest {
            domain: "test".into(),
            descriptors: vec![desc(&[("user", &long)])],
            hits_addend: 1,
        })
        .await
        .expect_err("long value");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let many: Vec<_> = (0..100).map(|i| desc(&[("user", &i.to_string())])).collect();
    let err = c
        .should_rate_limit(RateLimitRequest { domain: "test".into(), descriptors: many, hits_addend: 1 })
        .await
        .expect_err("too many");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // a descriptor whose actions were all skipped by Envoy arrives empty: it matches nothing
    let r = ask(&mut c, vec![RateLimitDescriptor::default(), desc(&[("user", "zed")])], 1).await;
    assert_eq!(codes(&r), [OK, OK]);
    // negative hits mixed with positive ones in one request: refused, nothing counted
    let mut back = desc(&[("user", "zed")]);
    back.is_negative_hits = true;
    back.hits_addend = Some(UInt64Value { value: 5 });
    let err = c
        .should_rate_limit(RateLimitRequest {
            domain: "test".into(),
            descriptors: vec![back.clone(), desc(&[("user", "zed")])],
            hits_addend: 1,
        })
        .await
        .expect_err("mixed hits");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("is_negative_hits"), "{}", err.message());
    let r = ask(&mut c, vec![desc(&[("user", "zed")])], 1).await;
    assert_eq!(r.statuses[0].limit_remaining, 1, "zed has used 2 of 3: nothing was counted for the refused call");
    let r = ask(&mut c, vec![desc(&[("user", "zed")])], 1).await;
    assert_eq!(r.statuses[0].limit_remaining, 0, "zed has used 3 of 3");
    assert_eq!(codes(&ask(&mut c, vec![desc(&[("user", "zed")])], 1).await), [OVER]);
    // Envoy 1.38's is_negative_hits: 5 given back (never below zero), the budget is whole again
    let r = c
        .should_rate_limit(RateLimitRequest { domain: "test".into(), descriptors: vec![back], hits_addend: 1 })
        .await
        .expect("negative hits")
        .into_inner();
    assert_eq!(codes(&r), [OK]);
    let r = ask(&mut c, vec![desc(&[("user", "zed")])], 1).await;
    assert_eq!((codes(&r), r.statuses[0].limit_remaining), (vec![OK], 2), "all 3 given back, then 1 counted");
}

#[tokio::test]
async fn an_override_for_a_domain_no_file_defines_counts_nothing() {
    let (_p, mut c) = start().await;
    let mut d = desc(&[("remote_address", "203.0.113.5")]);
    d.limit = Some(RateLimitOverride { requests_per_unit: 1, unit: 2 });
    d.hits_addend = Some(UInt64Value { value: 551 });
    for _ in 0..3 {
        let r = ask_in(&mut c, "edge\0\0\0\0\0\0\0\u{e}remote_address", vec![d.clone()], 1).await;
        assert_eq!((r.overall_code, codes(&r)), (OK, vec![OK]));
    }
    // the reference edge domain's remote_address limit (600 a minute) is untouched
    let r = ask_in(&mut c, "edge", vec![desc(&[("remote_address", "203.0.113.5")])], 1).await;
    assert_eq!(r.statuses[0].limit_remaining, 599);
}
