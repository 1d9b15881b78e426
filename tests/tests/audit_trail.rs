//! The audit trail end to end: the real portcullis writing its chain to real sinks (a file, a
//! FIFO nobody reads for a while, a Redis stream shared by three instances), and the real
//! `portcullis audit verify` judging what they wrote.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::ext_authz::authorization_client::AuthorizationClient;
use tests::{Portcullis, RedisServer, Stack, TempDir, check_request, portcullis_bin, reference_policy, workspace_root};
use tonic::transport::Channel;

const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

/// The reference policy with `sinks` (YAML list items) and `extra` lines in its audit section.
fn policy(sinks: &str, extra: &str) -> String {
    let p = reference_policy().replacen("    - stdout: {}\n", &format!("{sinks}\n"), 1).replacen(
        "  checkpoint_every: 1h",
        &format!("{extra}  checkpoint_every: 1h"),
        1,
    );
    assert!(!p.contains("    - stdout: {}"), "the reference policy's audit lines moved");
    p
}

fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures/audit").join(name)
}

/// `portcullis audit verify ARGS`: exit code and what it printed.
fn verify(args: &[&Path], checkpoints: Option<&Path>) -> (i32, String) {
    let mut cmd = std::process::Command::new(portcullis_bin());
    cmd.args(["audit", "verify"]).args(args);
    if let Some(c) = checkpoints {
        cmd.arg("--checkpoints").arg(c).arg("--public-key").arg(fixture("signing.pub.pem"));
    }
    let out = cmd.output().expect("running portcullis audit verify");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn events(text: &str, kind: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == kind)
        .collect()
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn client(p: &Portcullis) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect")
}

#[tokio::test]
async fn no_credential_reaches_the_trail_and_the_signed_chain_verifies() {
    let dir = TempDir::new("audit");
    let log = dir.0.join("audit.log");
    let cps = dir.0.join("checkpoints.log");
    let p = policy(
        &format!("    - file: {{ path: \"{}\", fsync: always }}", log.display()),
        &format!("  signing_key: \"{}\"\n  checkpoint_file: \"{}\"\n", fixture("signing.pem").display(), cps.display()),
    );
    let mut s = Stack::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let (bearer, cookie, query) = ("sekrit-bearer-token-123", "session=cookie-secret-456", "query-secret-789");
    let r = s
        .send("GET", &format!("/api/v1/items?api_key={query}&page=2"), &[("x-api-key", BASIC), ("cookie", cookie)])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = s.send("GET", "/api/v1/items", &[("authorization", &format!("Bearer {bearer}"))]).await;
    assert_eq!(r.status, 401);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until("two decisions and their completions", || {
        events(&read(), "decision").len() >= 2 && events(&read(), "completion").len() >= 2
    })
    .await;
    let metrics = s.admin_get("/metrics").await.body;
    s.portcullis.signal("TERM").await.expect("SIGTERM");
    s.portcullis.wait_exit(Duration::from_secs(20)).await.expect("exit");

    let text = read();
    let decisions = events(&text, "decision");
    assert_eq!(decisions[0]["headers"]["x-api-key"], "[MASKED]");
    assert_eq!(decisions[0]["headers"]["cookie"], "[MASKED]");
    assert_eq!(decisions[0]["query"], "api_key=[MASKED]&page=2");
    assert_eq!(decisions[0]["subject"], "demo-basic");
    assert_eq!(decisions[1]["response_code"], 401);
    assert_eq!(decisions[1]["reason"], "jwt_malformed");
    assert_eq!(decisions[1]["headers"]["authorization"], "[MASKED]");
    let completions = events(&text, "completion");
    assert!(completions.iter().any(|c| c["response_code"] == 200), "{completions:?}");
    // every byte the test captured: the trail, the checkpoints, the service's log, its metrics
    let everything = format!(
        "{text}\n{}\n{}\n{metrics}",
        std::fs::read_to_string(&cps).unwrap_or_default(),
        s.portcullis.logs().join("\n")
    );
    for secret in [bearer, cookie, query, BASIC] {
        let at = everything.find(secret).map(|i| &everything[i.saturating_sub(300)..(i + 100).min(everything.len())]);
        assert!(at.is_none(), "{secret} leaked: {at:?}");
    }
    // the review of the day, from the same file
    let out = std::process::Command::new(portcullis_bin())
        .args(["report", "--since", "24h", "--json"])
        .arg(&log)
        .output()
        .expect("report");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("report JSON");
    assert_eq!((report["decisions"].as_u64(), report["allowed"].as_u64()), (Some(2), Some(1)), "{report}");
    assert_eq!(report["auth_failures_by_reason"]["jwt_malformed"], 1, "{report}");
    assert!(report["completions"].as_u64().is_some_and(|n| n >= 2), "{report}");
    // intact and signed; then cut short after the last checkpoint
    let (code, out) = verify(&[&log], Some(&cps));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");
    let lines: Vec<&str> = text.lines().collect();
    let cut = dir.0.join("cut.log");
    std::fs::write(&cut, lines[..lines.len() - 2].join("\n")).expect("write");
    let (code, out) = verify(&[&cut], Some(&cps));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("truncated"), "{out}");
    // one byte changed
    let edited = dir.0.join("edited.log");
    std::fs::write(&edited, text.replacen("\"response_code\":401", "\"response_code\":200", 1)).expect("write");
    let (code, out) = verify(&[&edited], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("changed"), "{out}");
}

#[tokio::test]
async fn a_stalled_sink_loses_nothing_and_a_stop_drains_it() {
    let dir = TempDir::new("audit-fifo");
    let fifo = dir.0.join("audit.fifo");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    assert!(ok, "mkfifo");
    // the FIFO has no reader yet: the sink blocks opening it, its queue of 8 fills, and the
    // rest spills to disk
    let p = policy(
        &format!("    - file: {{ path: \"{}\", fsync: never }}", fifo.display()),
        &format!("  sink_queue: 8\n  spill_dir: \"{}\"\n", dir.0.join("spill").display()),
    );
    let mut portcullis = Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = client(&portcullis).await;
    for i in 0..200 {
        let req = check_request("10.0.0.1", "GET", &format!("/api/v1/items?n={i}"), &[("x-api-key", BASIC)]);
        c.check(req).await.expect("check");
    }
    // the writer hands events on asynchronously: wait until most are on disk (the blocked sink
    // holds one hand-over of at most 8 lines, its queue at most 8 more: at least 184 spill)
    let spilled = || async {
        let metrics = tests::HttpClient::new()
            .request("GET", &format!("http://{}/metrics", portcullis.http), &[], "")
            .await
            .expect("metrics")
            .body;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("portcullis_audit_spilled_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = spilled().await;
        if n >= 184 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "most events wait on disk: {n} spilled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // now a reader comes, and the service stops: everything arrives, in order
    let reader = std::thread::spawn(move || {
        let f = std::fs::File::open(&fifo).expect("open fifo");
        std::io::BufReader::new(f).lines().map_while(Result::ok).collect::<Vec<String>>()
    });
    portcullis.signal("TERM").await.expect("SIGTERM");
    portcullis.wait_exit(Duration::from_secs(30)).await.expect("exit");
    let lines = reader.join().expect("reader");
    let text = lines.join("\n");
    let decisions = events(&text, "decision");
    assert_eq!(decisions.len(), 200, "every decision arrived");
    for (i, d) in decisions.iter().enumerate() {
        assert_eq!(d["query"], format!("n={i}"), "in order");
    }
    assert_eq!(events(&text, "checkpoint").len(), 1, "the stop's checkpoint");
    let file = dir.0.join("received.log");
    std::fs::write(&file, &text).expect("write");
    let (code, out) = verify(&[&file], None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("201 events in 1 chain"), "{out}");
}

#[tokio::test]
async fn three_instances_write_one_stream_and_each_chain_verifies() {
    let redis = RedisServer::start();
    let p = policy("    - redis_stream: { key: \"pc:audit\", max_len: 100000 }", "").replacen(
        "  memory: {}                    # the embedded default; a fleet uses, instead:",
        &format!("  redis: {{ url: \"{}\", timeout: 500ms }}", redis.url()),
        1,
    );
    let mut fleet = Vec::new();
    for i in 0..3 {
        let p = p.replacen("  checkpoint_every: 1h", &format!("  instance: pc-{i}\n  checkpoint_every: 1h"), 1);
        fleet.push(Portcullis::start(&p).await.unwrap_or_else(|e| panic!("{e:#}")));
    }
    for (i, p) in fleet.iter().enumerate() {
        let mut c = client(p).await;
        for n in 0..(5 + i) {
            let req = check_request("10.0.0.1", "GET", &format!("/api/v1/items?n={n}"), &[("x-api-key", BASIC)]);
            c.check(req).await.expect("check");
        }
    }
    for p in &mut fleet {
        p.signal("TERM").await.expect("SIGTERM");
        p.wait_exit(Duration::from_secs(20)).await.expect("exit");
    }
    let out = std::process::Command::new(portcullis_bin())
        .args(["audit", "export", "--url", &redis.url(), "--key", "pc:audit"])
        .output()
        .expect("export");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = TempDir::new("audit-stream");
    let file = dir.0.join("stream.log");
    std::fs::write(&file, &out.stdout).expect("write");
    let (code, text) = verify(&[&file], None);
    assert_eq!(code, 0, "{text}");
    // 5, 6 and 7 decisions, each chain closed by its stop's checkpoint
    assert!(text.contains("21 events in 3 chain(s)"), "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("chain pc-{i}/")), "{text}");
    }
}
