//! Reload and rollout as Kubernetes does them, against the real binary: the policy mounted the
//! way the kubelet mounts a ConfigMap (files as symlinks through `..data`, swapped whole to a
//! new timestamped directory) is seen in force within a second; a broken swap keeps the old
//! policy and counts an error; after SIGTERM with `listen.shutdown_delay`, /readyz is 503 at
//! once while Check calls are still answered, then the process drains and exits 0.

use std::path::Path;
use std::time::Duration;

use proto::portcullis_v1::CheckRequest;
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_client::DecisionClient;
use tests::{HttpClient, Portcullis, reference_policy};
use tokio::time::Instant;

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

/// What the basic tier's daily limit is now, as a dry run sees it.
async fn daily_limit(c: &mut DecisionClient<tonic::transport::Channel>) -> u64 {
    let r = c
        .check(CheckRequest {
            credential: Some(Credential::ApiKey(BASIC.into())),
            resource: "/api/v1/items".into(),
            client_address: "10.0.0.21".into(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("dry run")
        .into_inner();
    r.quotas.iter().find(|q| q.name == "daily").map(|q| q.limit).expect("a daily quota")
}

/// Writes `files` into a new `..<stamp>` directory of `dir` and points `..data` at it in one
/// rename, as the kubelet updates a mounted ConfigMap.
fn kubelet_swap(dir: &Path, stamp: &str, files: &[(&str, String)]) {
    let data = dir.join(format!("..{stamp}"));
    std::fs::create_dir_all(data.join("ratelimit")).expect("mkdir");
    for (name, text) in files {
        std::fs::write(data.join(name), text).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename");
}

async fn metrics(p: &Portcullis) -> String {
    HttpClient::new().request("GET", &format!("http://{}/metrics", p.http), &[], "").await.expect("metrics").body
}

#[tokio::test]
async fn a_configmap_swap_is_in_force_within_a_second_and_a_broken_one_changes_nothing() {
    let p = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let dir = &p.dir.0;
    let file = |name: &str| std::fs::read_to_string(dir.join(name)).expect("a file of the policy");
    let v1 = vec![
        ("policy.yaml", file("policy.yaml")),
        ("jwks.json", file("jwks.json")),
        ("ratelimit/edge.yaml", file("ratelimit/edge.yaml")),
    ];
    // the mount: every file a symlink through ..data
    kubelet_swap(dir, "2026_11_30_01", &v1);
    for name in ["policy.yaml", "jwks.json"] {
        std::fs::remove_file(dir.join(name)).expect("rm");
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).expect("symlink");
    }
    std::fs::remove_dir_all(dir.join("ratelimit")).expect("rm");
    std::os::unix::fs::symlink("..data/ratelimit", dir.join("ratelimit")).expect("symlink");
    let mut c = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    assert_eq!(daily_limit(&mut c).await, 5_000);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let version_of = |m: &str| {
        m.lines().find(|l| l.starts_with("portcullis_policy_info{")).map(str::to_owned).expect("portcullis_policy_info")
    };
    let before = version_of(&metrics(&p).await);

    // a new policy swapped in: in force within a second, its version on /metrics
    let mut v2 = v1.clone();
    v2[0].1 = v1[0].1.replacen("per_day: 5000", "per_day: 7000", 1);
    kubelet_swap(dir, "2026_11_30_02", &v2);
    let t = Instant::now();
    while daily_limit(&mut c).await != 7_000 {
        assert!(t.elapsed() < Duration::from_secs(1), "the swapped policy is not in force after {:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = metrics(&p).await;
    assert_ne!(version_of(&m), before, "the version moved");
    assert!(m.contains("portcullis_policy_reloads_total{result=\"ok\"}"), "{m}");

    // a broken swap (a ratelimit file that is not one): the old policy keeps serving, an error
    // is counted
    let mut v3 = v2.clone();
    v3[2].1 = "domain: edge\ndescriptors:\n  - key: [not, a, key]\n".into();
    kubelet_swap(dir, "2026_11_30_03", &v3);
    let t = Instant::now();
    while !metrics(&p).await.contains("portcullis_policy_reloads_total{result=\"error\"} 1") {
        assert!(t.elapsed() < Duration::from_secs(2), "no reload error counted: {}", metrics(&p).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(daily_limit(&mut c).await, 7_000, "the last good policy stays in force");
    let refused = p.logs().into_iter().find(|l| l.contains("policy reload refused")).expect("logged");
    assert!(refused.contains("edge.yaml"), "the file is named: {refused}");
    // and tried once, not at every tick
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(metrics(&p).await.contains("portcullis_policy_reloads_total{result=\"error\"} 1"));
}

#[tokio::test]
async fn after_sigterm_readyz_is_503_at_once_while_checks_are_still_answered() {
    let policy = reference_policy().replacen("listen:\n", "listen:\n  shutdown_delay: 2s\n", 1);
    let mut p = Portcullis::start(&policy).await.unwrap_or_else(|e| panic!("{e:#}"));
    let http = HttpClient::new();
    let readyz = format!("http://{}/readyz", p.http);
    assert_eq!(http.request("GET", &readyz, &[], "").await.expect("readyz").status, 200);
    let mut c = DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    // before the signal: the process gets it later than this, so `t.elapsed()` at its exit is
    // never less than how long it took (after the signal the stop could already be 2 s old by a
    // few microseconds when `t` is read, with a drain that fast)
    let t = Instant::now();
    p.signal("TERM").await.expect("SIGTERM");
    while http.request("GET", &readyz, &[], "").await.map(|r| r.status).unwrap_or(0) != 503 {
        assert!(t.elapsed() < Duration::from_millis(500), "/readyz still ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // gRPC health too, for the whole server ("", what a Kubernetes gRPC probe asks)
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", p.grpc))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let overall = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(overall.status, tonic_health::pb::health_check_response::ServingStatus::NotServing as i32);
    // still answering, for the delay
    for _ in 0..5 {
        assert_eq!(daily_limit(&mut c).await, 5_000);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(t.elapsed() < Duration::from_millis(1_900), "the checks took too long to prove anything");
    let status = p.wait_exit(Duration::from_secs(30)).await.expect("exit");
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() >= Duration::from_secs(2), "stopped before the delay: {:?}", t.elapsed());
}
