//! The admin API (`portcullis.v1.Admin` on `listen.admin`) against the real binary: who may
//! call it (no token, a wrong one, one without the scope: refused and audited; the public gRPC
//! port does not serve it), what it changes fleet-wide on one redis-server (a grant lets a 429'd
//! subject through on every instance, an unblock lifts an auto-block everywhere, an operator's
//! block holds everywhere, even where the over-limit cache remembered a refusal), bad input
//! refused with nothing changed, a store outage answered UNAVAILABLE within its timeout, bearer
//! tokens revoked fleet-wide (and a revocation check that cannot be made answered by
//! on_store_error), and the `portcullis admin` commands.
// Tokens are judged by portcullis's wall clock, so the test must make them with one too.
#![allow(clippy::disallowed_methods)]

use std::time::Duration;

use tokio::time::Instant;

use proto::portcullis_v1::admin_client::AdminClient;
use proto::portcullis_v1::check_request::Credential;
use proto::portcullis_v1::decision_client::DecisionClient;
use proto::portcullis_v1::{
    BlockRequest, CheckRequest, CheckResponse, GetStatusRequest, GetUsageRequest, GrantUsageRequest, ListBlocksRequest,
    ResetUsageRequest, RevokeTokenRequest, UnblockRequest,
};
use tests::{Portcullis, RedisServer, TempDir, portcullis_bin, reference_policy};
use tonic::transport::Channel;

const OPS: &str = "pat_admin_GMS_xmuIGjOy6CuKH9myR-2eVEk6gNvL";
const VIEWER: &str = "pat_viewer_9Qd2mZ7xLr4Tb8Wc1Hk6Ny3Pf5Sv0Je";
const BASIC: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";

/// The reference policy with the admin API on a free port, an operator token and a read-only one.
fn admin_policy(base: &str) -> String {
    base.replacen("listen:\n", "listen:\n  admin: 127.0.0.1:0\n", 1)
        + "\nadmin:\n  tokens:\n    - id: ops\n      sha256: eb4a81a266aa2358e1da82905a5b08bd910236e828c6a0f11e4175c480aa89f0\n      \
           scopes: [read, usage:write, blocks:write, keys:write]\n    - id: viewer\n      \
           sha256: 50e96fd8e1a16cdd1d8a3e7ac774145b08fa9d09e1b2c8183eba3505196956ca\n      scopes: [read]\n"
}

fn redis_policy(redis: &RedisServer) -> String {
    admin_policy(&reference_policy().replacen("  memory: {}", &format!("  redis:\n    url: {}", redis.url()), 1))
}

async fn start(policy: &str) -> Portcullis {
    Portcullis::start(policy).await.unwrap_or_else(|e| panic!("{e:#}"))
}

async fn admin(p: &Portcullis) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{}", p.admin.expect("admin listener on"))).await.expect("connect")
}

fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    r
}

async fn native(p: &Portcullis) -> DecisionClient<Channel> {
    DecisionClient::connect(format!("http://{}", p.grpc)).await.expect("connect")
}

async fn status_of(c: &mut DecisionClient<Channel>, peer: &str, key: &str, cost: i64) -> u32 {
    let r = c
        .check(CheckRequest {
            credential: Some(Credential::ApiKey(key.into())),
            operation: "GET".into(),
            resource: "/api/v1/items".into(),
            client_address: peer.into(),
            cost,
            ..Default::default()
        })
        .await
        .expect("check");
    r.into_inner().http_status
}

/// Asks until the answer is `want`, for at most `within`: the last status.
async fn until_status(c: &mut DecisionClient<Channel>, peer: &str, cost: i64, want: u32, within: Duration) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        let got = status_of(c, peer, BASIC, cost).await;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn only_known_tokens_with_the_scope_get_in_and_every_call_is_audited() {
    let dir = TempDir::new("admin-audit");
    let audit = dir.0.join("audit.log");
    let policy = admin_policy(&reference_policy().replacen(
        "    - stdout: {}",
        &format!("    - file: {{ path: \"{}\", fsync: always }}", audit.display()),
        1,
    ));
    let p = start(&policy).await;
    let mut c = admin(&p).await;

    let e = c.get_status(GetStatusRequest {}).await.expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = c.get_status(authed("pat_admin_wrong", GetStatusRequest {})).await.expect_err("wrong token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = c
        .block(authed(VIEWER, BlockRequest { address: "192.0.2.1".into(), duration_seconds: 60, reason: "x".into() }))
        .await
        .expect_err("no scope");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("blocks:write"), "{e:?}");

    let s = c.get_status(authed(VIEWER, GetStatusRequest {})).await.expect("status").into_inner();
    assert!(s.policy_version.starts_with("sha256:") && s.store == "memory" && s.store_ready, "{s:?}");
    assert!(s.last_reload_error.is_empty(), "{s:?}");
    let version_logged = p.logs().iter().any(|l| l.contains(&format!("\"policy_version\":\"{}\"", s.policy_version)));
    assert!(version_logged, "the listening line names the same version");

    // the public gRPC port does not serve Admin
    let mut public = AdminClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let e = public.get_status(authed(OPS, GetStatusRequest {})).await.expect_err("not served there");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    // health answers on the admin port
    let channel = Channel::from_shared(format!("http://{}", p.admin.expect("on")))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "portcullis.v1.Admin".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // every call above is in the trail: who, what, how it ended; never a token
    let deadline = Instant::now() + Duration::from_secs(10);
    let events = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let events: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "admin")
            .collect();
        if events.len() >= 4 || Instant::now() > deadline {
            assert!(
                !text.contains(OPS) && !text.contains(VIEWER) && !text.contains("pat_admin_wrong"),
                "a token in the trail"
            );
            break events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seen: Vec<(String, String, String)> = events
        .iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (s("actor"), s("method"), s("outcome"))
        })
        .collect();
    let expected = [
        ("unauthenticated", "GetStatus", "unauthenticated"),
        ("unauthenticated", "GetStatus", "unauthenticated"),
        ("viewer", "Block", "permission_denied"),
        ("viewer", "GetStatus", "ok"),
    ];
    assert_eq!(seen.len(), expected.len(), "{events:#?}");
    for (got, want) in seen.iter().zip(expected) {
        assert_eq!((got.0.as_str(), got.1.as_str(), got.2.as_str()), want, "{events:#?}");
    }

    // the viewer token removed from the policy and SIGHUP: refused at once; the version moves
    let file = p.dir.0.join("policy.yaml");
    let text = std::fs::read_to_string(&file).expect("policy");
    let viewer = "    - id: viewer\n      sha256: 50e96fd8e1a16cdd1d8a3e7ac774145b08fa9d09e1b2c8183eba3505196956ca\n      scopes: [read]\n";
    assert!(text.contains(viewer));
    std::fs::write(&file, text.replace(viewer, "")).expect("write");
    p.signal("HUP").await.expect("SIGHUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let e = c.get_status(authed(VIEWER, GetStatusRequest {})).await;
        if e.as_ref().err().map(tonic::Status::code) == Some(tonic::Code::Unauthenticated) {
            break;
        }
        assert!(Instant::now() < deadline, "the removed token still works: {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = c.get_status(authed(OPS, GetStatusRequest {})).await.expect("status").into_inner();
    assert_ne!(after.policy_version, s.policy_version, "{after:?}");
}

#[tokio::test]
async fn grants_unblocks_and_blocks_hold_on_every_instance_of_the_fleet() {
    let redis = RedisServer::start();
    let policy = redis_policy(&redis);
    let fleet = [start(&policy).await, start(&policy).await, start(&policy).await];
    let mut clients = Vec::new();
    for p in &fleet {
        clients.push(native(p).await);
    }
    let [a, b, c] = &mut clients[..] else { unreachable!() };
    let mut admin_c = admin(&fleet[2]).await;

    // the whole burst (100) spent through A: a request of 50 is refused on A and B for about 50
    // seconds (the bucket refills one a second), which B's over-limit cache remembers
    assert_eq!(status_of(a, "10.0.0.9", BASIC, 100).await, 200);
    assert_eq!(status_of(a, "10.0.0.9", BASIC, 50).await, 429);
    assert_eq!(status_of(b, "10.0.0.9", BASIC, 50).await, 429);
    assert_eq!(status_of(b, "10.0.0.9", BASIC, 50).await, 429);
    let usage = admin_c
        .get_usage(authed(OPS, GetUsageRequest { subject: "demo-basic".into(), tier: String::new() }))
        .await
        .expect("usage")
        .into_inner();
    let burst = usage.limits.iter().find(|l| l.name == "burst").expect("burst");
    assert!(burst.remaining <= 1 && burst.limit == 100, "{usage:?}");
    // a grant on C: A and B let the subject through within a second
    let granted = admin_c
        .grant_usage(authed(
            OPS,
            GrantUsageRequest {
                subject: "demo-basic".into(),
                tier: String::new(),
                limit: "burst".into(),
                amount: 60,
                reason: "support ticket 4711".into(),
            },
        ))
        .await
        .expect("grant")
        .into_inner();
    assert!(granted.limits.iter().any(|l| l.name == "burst" && l.remaining >= 60), "{granted:?}");
    let second = Duration::from_secs(1);
    assert_eq!(until_status(b, "10.0.0.9", 50, 200, second).await, 200, "B still refuses");
    assert_eq!(status_of(a, "10.0.0.9", BASIC, 50).await, 429, "the grant was 60, and B took 50");

    // ten failed authentications from one address through A: blocked on B and C too
    for _ in 0..9 {
        assert_eq!(status_of(a, "192.0.2.66", "pk_wrong", 1).await, 401);
    }
    assert_eq!(status_of(a, "192.0.2.66", "pk_wrong", 1).await, 403, "the tenth blocks the address");
    assert_eq!(status_of(b, "192.0.2.66", BASIC, 1).await, 403);
    assert_eq!(status_of(c, "192.0.2.66", BASIC, 1).await, 403);
    let blocks = admin_c.list_blocks(authed(OPS, ListBlocksRequest {})).await.expect("list").into_inner();
    let listed = blocks.blocks.iter().find(|b| b.address == "192.0.2.66").expect("listed");
    assert!(listed.remaining_seconds > 800 && listed.remaining_seconds <= 900, "{blocks:?}");
    // unblocked through B's admin API: A and C let it through within a second
    let mut admin_b = admin(&fleet[1]).await;
    let u = admin_b
        .unblock(authed(OPS, UnblockRequest { address: "192.0.2.66".into(), reason: "false alarm".into() }))
        .await
        .expect("unblock")
        .into_inner();
    assert!(u.was_blocked);
    assert_eq!(until_status(a, "192.0.2.66", 1, 200, second).await, 200, "A still blocks");
    assert_eq!(until_status(c, "192.0.2.66", 1, 200, second).await, 200, "C still blocks");
    let blocks = admin_c.list_blocks(authed(VIEWER, ListBlocksRequest {})).await.expect("list").into_inner();
    assert!(blocks.blocks.iter().all(|b| b.address != "192.0.2.66"), "{blocks:?}");

    // an operator's block through A holds on C at once
    let mut admin_a = admin(&fleet[0]).await;
    let blocked = admin_a
        .block(authed(
            OPS,
            BlockRequest { address: "2001:db8::7".into(), duration_seconds: 120, reason: "abuse".into() },
        ))
        .await
        .expect("block")
        .into_inner();
    assert_eq!((blocked.address.as_str(), blocked.remaining_seconds), ("2001:db8::7", 120));
    assert_eq!(status_of(c, "2001:db8::7", BASIC, 1).await, 403);

    // a reset forgets the day's count: the usage reads whole again
    let reset = admin_a
        .reset_usage(authed(
            OPS,
            ResetUsageRequest {
                subject: "demo-basic".into(),
                tier: String::new(),
                limit: String::new(),
                reason: String::new(),
            },
        ))
        .await
        .expect("reset")
        .into_inner();
    assert!(reset.limits.iter().all(|l| l.used == 0 && l.remaining == l.limit), "{reset:?}");
}

#[tokio::test]
async fn bad_input_is_refused_precisely_and_changes_nothing_and_an_outage_is_unavailable() {
    let p = start(&admin_policy(&reference_policy())).await;
    let mut c = admin(&p).await;
    let usage = || GetUsageRequest { subject: "demo-basic".into(), tier: String::new() };
    // what the counters hold: `reset_seconds` is read off the clock (a day window's reset
    // counts down every second), not state a refused call could change
    let counted = |mut u: proto::portcullis_v1::Usage| {
        u.limits.iter_mut().for_each(|l| l.reset_seconds = 0);
        u
    };
    let before = counted(c.get_usage(authed(OPS, usage())).await.expect("usage").into_inner());
    let grant = |limit: &str, amount: u64, subject: &str, tier: &str| GrantUsageRequest {
        subject: subject.into(),
        tier: tier.into(),
        limit: limit.into(),
        amount,
        reason: String::new(),
    };
    let cases: Vec<(tonic::Status, &str)> = vec![
        (
            c.grant_usage(authed(OPS, grant("weekly", 5, "demo-basic", ""))).await.expect_err("limit"),
            "not one of a tier's limits",
        ),
        (c.grant_usage(authed(OPS, grant("burst", 0, "demo-basic", ""))).await.expect_err("amount"), "amount"),
        (c.grant_usage(authed(OPS, grant("burst", 5, "alice", ""))).await.expect_err("tier"), "tier: required"),
        (c.grant_usage(authed(OPS, grant("burst", 5, "alice", "gold"))).await.expect_err("tier"), "no tier \"gold\""),
        (c.grant_usage(authed(OPS, grant("burst", 5, "", ""))).await.expect_err("subject"), "subject is required"),
        (
            c.block(authed(
                OPS,
                BlockRequest { address: "10.0.0.300".into(), duration_seconds: 60, reason: String::new() },
            ))
            .await
            .expect_err("address"),
            "not an IPv4 or IPv6 address",
        ),
        (
            c.block(authed(
                OPS,
                BlockRequest { address: "10.0.0.3".into(), duration_seconds: 0, reason: String::new() },
            ))
            .await
            .expect_err("duration"),
            "duration_seconds",
        ),
        (
            c.block(authed(
                OPS,
                BlockRequest { address: "10.0.0.3".into(), duration_seconds: 60, reason: "a\nb".into() },
            ))
            .await
            .expect_err("reason"),
            "reason",
        ),
        (
            c.unblock(authed(OPS, UnblockRequest { address: "::g".into(), reason: String::new() }))
                .await
                .expect_err("addr"),
            "address",
        ),
    ];
    for (e, why) in cases {
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}: {e:?}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }
    assert_eq!(
        counted(c.get_usage(authed(OPS, usage())).await.expect("usage").into_inner()),
        before,
        "nothing changed"
    );
    let blocks = c.list_blocks(authed(OPS, ListBlocksRequest {})).await.expect("list").into_inner();
    assert!(blocks.blocks.is_empty(), "{blocks:?}");

    // the store down: UNAVAILABLE within its timeout, for reads and writes alike
    let down = admin_policy(&reference_policy().replacen(
        "  memory: {}",
        "  redis:\n    url: redis://127.0.0.1:1\n    timeout: 100ms",
        1,
    ));
    let p = start(&down).await;
    let mut c = admin(&p).await;
    let t = Instant::now();
    let e = c.get_usage(authed(OPS, usage())).await.expect_err("store down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    let e = c
        .unblock(authed(OPS, UnblockRequest { address: "10.0.0.3".into(), reason: String::new() }))
        .await
        .expect_err("store down");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "answered in {:?}", t.elapsed());
}

#[tokio::test]
async fn the_admin_commands_print_tables_and_json_with_the_token_from_the_environment() {
    let p = start(&admin_policy(&reference_policy())).await;
    let addr = p.admin.expect("on").to_string();
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = std::process::Command::new(portcullis_bin());
        cmd.arg("admin").args(args).env("PORTCULLIS_ADMIN_ADDR", &addr).env_remove("PORTCULLIS_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("PORTCULLIS_ADMIN_TOKEN", t);
        }
        cmd.output().expect("portcullis admin")
    };
    let out = run(&["blocks", "block", "203.0.113.77", "--for", "10m", "--reason", "test"], Some(OPS));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["blocks", "list"], Some(VIEWER));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ADDRESS") && text.contains("203.0.113.77"), "{text}");
    let out = run(&["usage", "get", "demo-basic", "--json"], Some(VIEWER));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["subject"].as_str(), v["tier"].as_str()), (Some("demo-basic"), Some("basic")), "{v}");
    assert_eq!(v["limits"][0]["name"], "burst");
    // a token revoked with the token on stdin, never on the command line
    let mut child = std::process::Command::new(portcullis_bin())
        .args(["admin", "tokens", "revoke", "--token-stdin", "--json"])
        .env("PORTCULLIS_ADMIN_ADDR", &addr)
        .env("PORTCULLIS_ADMIN_TOKEN", OPS)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), jwt("dora", Some("cli-1")).as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("revoke");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((v["subject"].as_str(), v["token_id"].as_str()), (Some("jwt:dora"), Some("cli-1")), "{v}");
    // the token from a file
    let dir = TempDir::new("admin-token");
    let file = dir.0.join("token");
    std::fs::write(&file, format!("{VIEWER}\n")).expect("write");
    let out = run(&["status", "--token-file", file.to_str().expect("path")], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("policy_version: sha256:"), "{out:?}");
    // no token, or a token without the scope: exit 1 and why
    let out = run(&["status"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORTCULLIS_ADMIN_TOKEN"), "{out:?}");
    let out = run(&["blocks", "unblock", "203.0.113.77"], Some(VIEWER));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"), "{out:?}");
}

fn jwks() -> String {
    std::fs::read_to_string(tests::workspace_root().join("tests/fixtures/jwt/jwks.json")).expect("jwks fixture")
}

/// An RS256 token of the reference policy's issuer for `sub`, with `jti` when given.
fn jwt(sub: &str, jti: Option<&str>) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut claims = serde_json::json!({
        "iss": "https://auth.example.com/", "aud": "portcullis-demo", "sub": sub,
        "exp": now + 600, "iat": now, "roles": ["user"], "tier": "business",
    });
    if let Some(j) = jti {
        claims["jti"] = j.into();
    }
    let key = std::fs::read(tests::workspace_root().join("tests/fixtures/jwt/rsa.pem")).expect("key");
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("test-rs".into());
    jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_rsa_pem(&key).expect("pem")).expect("sign")
}

async fn bearer_check(c: &mut DecisionClient<Channel>, token: &str) -> CheckResponse {
    c.check(CheckRequest {
        credential: Some(Credential::BearerToken(token.into())),
        operation: "GET".into(),
        resource: "/api/v1/items".into(),
        client_address: "10.0.0.12".into(),
        ..Default::default()
    })
    .await
    .expect("check")
    .into_inner()
}

#[tokio::test]
async fn a_revoked_token_is_refused_by_every_instance_and_others_are_not() {
    let redis = RedisServer::start();
    let policy = redis_policy(&redis);
    let files = [("jwks.json", jwks())];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let a = Portcullis::start_with(&policy, &files).await.unwrap_or_else(|e| panic!("{e:#}"));
    let b = Portcullis::start_with(&policy, &files).await.unwrap_or_else(|e| panic!("{e:#}"));
    let (mut na, mut nb) = (native(&a).await, native(&b).await);
    let mut admin_a = admin(&a).await;

    let with_jti = jwt("alice", Some("tok-1"));
    let other = jwt("alice", Some("tok-2"));
    let no_jti = jwt("alice", None);
    for t in [&with_jti, &other, &no_jti] {
        assert_eq!(bearer_check(&mut nb, t).await.http_status, 200);
    }
    // revoked by giving the token (its sub, jti and exp are read from it) on A: refused on B
    let r = admin_a
        .revoke_token(authed(
            OPS,
            RevokeTokenRequest { token: with_jti.clone(), reason: "leaked".into(), ..Default::default() },
        ))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!((r.subject.as_str(), r.token_id.as_str()), ("jwt:alice", "tok-1"), "{r:?}");
    let denied = bearer_check(&mut nb, &with_jti).await;
    assert_eq!((denied.http_status, denied.reason.as_str()), (401, "token_revoked"), "{denied:?}");
    let challenge = denied.response_headers.iter().find(|h| h.name == "www-authenticate").expect("a challenge");
    assert!(challenge.value.contains("error=\"invalid_token\""), "{challenge:?}");
    assert_eq!(bearer_check(&mut na, &with_jti).await.http_status, 401);
    // the subject's other tokens still work
    assert_eq!(bearer_check(&mut nb, &other).await.http_status, 200);
    assert_eq!(bearer_check(&mut na, &no_jti).await.http_status, 200);
    // a token without jti is revoked by its digest; one by subject and jti without the token
    let r = admin_a
        .revoke_token(authed(OPS, RevokeTokenRequest { token: no_jti.clone(), ..Default::default() }))
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.token_id.len(), 32, "{r:?}");
    assert_eq!(bearer_check(&mut nb, &no_jti).await.reason, "token_revoked");
    let exp = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now").as_secs())
        .expect("secs")
        + 600;
    admin_a
        .revoke_token(authed(
            OPS,
            RevokeTokenRequest {
                subject: "jwt:alice".into(),
                jti: "tok-2".into(),
                expires_at: exp,
                ..Default::default()
            },
        ))
        .await
        .expect("revoke");
    assert_eq!(bearer_check(&mut na, &other).await.reason, "token_revoked");
    assert_eq!(bearer_check(&mut nb, &jwt("bob", Some("tok-1"))).await.http_status, 200, "another subject's tok-1");

    // refused: no scope (viewer), nothing to name, an expired token, a bad jti
    let e = admin_a
        .revoke_token(authed(VIEWER, RevokeTokenRequest { token: other.clone(), ..Default::default() }))
        .await
        .expect_err("scope");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    for (req, why) in [
        (RevokeTokenRequest::default(), "give the token"),
        (
            RevokeTokenRequest { subject: "jwt:x".into(), jti: "j".into(), expires_at: 1_000, ..Default::default() },
            "already expired",
        ),
        (
            RevokeTokenRequest { subject: "jwt:x".into(), jti: "a b".into(), expires_at: exp, ..Default::default() },
            "jti",
        ),
        (RevokeTokenRequest { token: "opaque-token".into(), ..Default::default() }, "subject: required"),
    ] {
        let e = admin_a.revoke_token(authed(OPS, req)).await.expect_err(why);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{why}: {e:?}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }

    // the store down: a bearer token's revocation cannot be checked, so on_store_error (deny)
    // answers, within the store's timeout
    let down = admin_policy(&reference_policy().replacen(
        "  memory: {}",
        "  redis:\n    url: redis://127.0.0.1:1\n    timeout: 100ms",
        1,
    ));
    let p = Portcullis::start_with(&down, &files).await.unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = native(&p).await;
    let t = Instant::now();
    let r = bearer_check(&mut c, &jwt("carol", Some("tok-9"))).await;
    assert_eq!((r.http_status, r.reason.as_str()), (503, "store_unavailable"), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// The SHA-256 of a key, as `portcullis keys hash` prints it.
fn digest_of(key: &str) -> String {
    let mut child = std::process::Command::new(portcullis_bin())
        .args(["keys", "hash"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("keys hash");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), key.as_bytes()).expect("write");
    String::from_utf8(child.wait_with_output().expect("digest").stdout).expect("utf-8").trim().to_owned()
}

async fn key_check(c: &mut DecisionClient<Channel>, key: &str) -> CheckResponse {
    c.check(CheckRequest {
        credential: Some(Credential::ApiKey(key.into())),
        operation: "GET".into(),
        resource: "/api/v1/items".into(),
        client_address: "10.0.0.13".into(),
        ..Default::default()
    })
    .await
    .expect("check")
    .into_inner()
}

/// Asks with `key` until the answer's reason is `want`, for at most a second: the last reason.
async fn until_reason(c: &mut DecisionClient<Channel>, key: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let got = key_check(c, key).await.reason;
        if got == want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keys_created_rotated_and_revoked_through_one_instance_hold_on_all_within_a_second() {
    use proto::portcullis_v1::{CreateKeyRequest, ListKeysRequest, RevokeKeyRequest, RotateKeyRequest};
    let redis = RedisServer::start();
    let policy = redis_policy(&redis);
    let fleet = [start(&policy).await, start(&policy).await, start(&policy).await];
    let mut clients = Vec::new();
    for p in &fleet {
        clients.push(native(p).await);
    }
    let (mut admin_a, mut admin_b) = (admin(&fleet[0]).await, admin(&fleet[1]).await);

    // created on A: accepted by B and C within a second, with its tier and roles
    let create = CreateKeyRequest {
        id: "partner-7".into(),
        roles: vec!["developer".into()],
        tier: "business".into(),
        labels: [("team".to_owned(), "payments".to_owned())].into(),
        prefix: "pk_live".into(),
        reason: "onboarding".into(),
        ..Default::default()
    };
    let created = admin_a.create_key(authed(OPS, create.clone())).await.expect("create").into_inner();
    let key = created.key.clone();
    assert!(key.starts_with("pk_live_") && key.len() == "pk_live_".len() + 32, "{key}");
    let info = created.info.expect("info");
    assert_eq!((info.source.as_str(), info.tier.as_str(), info.live_values), ("store", "business", 1), "{info:?}");
    for c in &mut clients[1..] {
        assert_eq!(until_reason(c, &key, "allowed").await, "allowed");
    }
    let r = key_check(&mut clients[2], &key).await;
    let identity = r.identity.expect("identity");
    assert_eq!((identity.subject.as_str(), identity.tier.as_str()), ("partner-7", "business"));
    // only the digest is in Redis; the key never is
    let stored = redis.command("HGET pc:{keys} partner-7");
    assert!(stored.contains(&digest_of(&key)) && !stored.contains(&key), "{stored}");

    // refused: an id the store or the policy file already has, an unknown role, an expiry
    // before the start, an unknown id to rotate or revoke
    let cases: Vec<(tonic::Status, tonic::Code, &str)> = vec![
        (
            admin_a.create_key(authed(OPS, create.clone())).await.expect_err("dup"),
            tonic::Code::AlreadyExists,
            "already exists",
        ),
        (
            admin_a
                .create_key(authed(OPS, CreateKeyRequest { id: "demo-basic".into(), ..create.clone() }))
                .await
                .expect_err("policy"),
            tonic::Code::FailedPrecondition,
            "policy file",
        ),
        (
            admin_a
                .create_key(authed(
                    OPS,
                    CreateKeyRequest { id: "k2".into(), roles: vec!["root".into()], ..create.clone() },
                ))
                .await
                .expect_err("role"),
            tonic::Code::InvalidArgument,
            "no role \"root\"",
        ),
        (
            admin_a
                .create_key(authed(
                    OPS,
                    CreateKeyRequest {
                        id: "k3".into(),
                        not_before: 4_000_000_000,
                        expires_at: 3_000_000_000,
                        ..create.clone()
                    },
                ))
                .await
                .expect_err("expiry"),
            tonic::Code::InvalidArgument,
            "after not_before",
        ),
        (
            admin_a
                .revoke_key(authed(OPS, RevokeKeyRequest { id: "ghost".into(), reason: String::new() }))
                .await
                .expect_err("ghost"),
            tonic::Code::NotFound,
            "no API key \"ghost\"",
        ),
        (
            admin_a
                .create_key(authed(VIEWER, CreateKeyRequest { id: "k4".into(), ..create.clone() }))
                .await
                .expect_err("scope"),
            tonic::Code::PermissionDenied,
            "keys:write",
        ),
    ];
    for (e, code, why) in cases {
        assert_eq!(e.code(), code, "{why}: {e:?}");
        assert!(e.message().contains(why), "{why}: {}", e.message());
    }
    // its usage, by id alone: the store knows its tier; another tier is refused
    let usage = admin_b
        .get_usage(authed(VIEWER, GetUsageRequest { subject: "partner-7".into(), tier: String::new() }))
        .await
        .expect("usage of a store-held key")
        .into_inner();
    assert_eq!(usage.tier, "business", "{usage:?}");
    let e = admin_b
        .get_usage(authed(VIEWER, GetUsageRequest { subject: "partner-7".into(), tier: "basic".into() }))
        .await
        .expect_err("a contradicting tier");
    assert!(e.message().contains("another tier"), "{e:?}");
    let listed = admin_b.list_keys(authed(VIEWER, ListKeysRequest {})).await.expect("list").into_inner();
    let ids: Vec<(&str, &str)> = listed.keys.iter().map(|k| (k.id.as_str(), k.source.as_str())).collect();
    assert!(ids.contains(&("partner-7", "store")) && ids.contains(&("demo-basic", "policy")), "{ids:?}");
    assert!(!ids.iter().any(|(id, _)| id.starts_with('k')), "nothing refused was created: {ids:?}");

    // rotated on B with two seconds of overlap: both values work everywhere, then only the new
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("now").as_secs())
        .expect("secs");
    let rotated = admin_b
        .rotate_key(authed(
            OPS,
            RotateKeyRequest { id: "partner-7".into(), old_expires_at: now + 3, ..Default::default() },
        ))
        .await
        .expect("rotate")
        .into_inner();
    let new_key = rotated.key.clone();
    assert_ne!(new_key, key);
    assert!(new_key.starts_with("pk_live_"), "a rotation keeps the key's prefix: {new_key}");
    assert_eq!(rotated.info.expect("info").live_values, 2);
    for c in [0, 2] {
        assert_eq!(until_reason(&mut clients[c], &new_key, "allowed").await, "allowed");
        assert_eq!(key_check(&mut clients[c], &key).await.reason, "allowed", "the old value, during the overlap");
    }
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert_eq!(key_check(&mut clients[0], &key).await.reason, "api_key_expired");
    assert_eq!(key_check(&mut clients[2], &new_key).await.reason, "allowed");

    // revoked on B: A and C refuse it within a second
    let revoked = admin_b
        .revoke_key(authed(OPS, RevokeKeyRequest { id: "partner-7".into(), reason: "contract ended".into() }))
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.revoked);
    for c in [0, 2] {
        assert_eq!(until_reason(&mut clients[c], &new_key, "api_key_revoked").await, "api_key_revoked");
    }
}

#[tokio::test]
async fn with_a_pepper_the_store_holds_digests_useless_without_it() {
    use proto::portcullis_v1::CreateKeyRequest;
    let redis = RedisServer::start();
    let policy = redis_policy(&redis);
    let pepper = [("PORTCULLIS_KEY_PEPPER", "a-pepper-of-32-bytes-for-the-test")];
    let a = Portcullis::start_with_env(&policy, &[], &pepper).await.unwrap_or_else(|e| panic!("{e:#}"));
    let b = Portcullis::start_with_env(&policy, &[], &pepper).await.unwrap_or_else(|e| panic!("{e:#}"));
    let plain = start(&policy).await;
    let create = CreateKeyRequest {
        id: "peppered-1".into(),
        roles: vec!["user".into()],
        tier: "basic".into(),
        ..Default::default()
    };
    let key = admin(&a).await.create_key(authed(OPS, create)).await.expect("create").into_inner().key;
    let stored = redis.command("HGET pc:{keys} peppered-1");
    assert!(stored.contains("\"peppered\":true") && !stored.contains(&digest_of(&key)), "{stored}");
    assert_eq!(until_reason(&mut native(&b).await, &key, "allowed").await, "allowed");
    // an instance without the pepper cannot match it
    assert_eq!(key_check(&mut native(&plain).await, &key).await.reason, "api_key_unknown");
    // too short a pepper: the service does not start
    let short = Portcullis::start_with_env(&policy, &[], &[("PORTCULLIS_KEY_PEPPER", "short")]).await;
    assert!(short.is_err(), "a 5-byte pepper was accepted");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate from it, and a client
/// certificate from another CA, made with openssl in `dir`.
fn certificates(dir: &std::path::Path) {
    let script = r#"
set -e
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
for ca in ca other-ca; do
  ec $ca.key
  openssl req -x509 -new -key $ca.key -out $ca.pem -days 2 -subj "/CN=$ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
done
issue() { # name ca extensions subject
  ec $1.key
  openssl req -new -key $1.key -out $1.csr -subj "/CN=$4" 2>/dev/null
  printf '%s\n' "$3" > $1.ext
  openssl x509 -req -in $1.csr -CA $2.pem -CAkey $2.key -CAcreateserial -out $1.pem -days 2 -extfile $1.ext 2>/dev/null
}
issue server ca "subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth" 127.0.0.1
issue client ca "extendedKeyUsage=clientAuth" ops-laptop
issue stranger other-ca "extendedKeyUsage=clientAuth" stranger
"#;
    let out = std::process::Command::new("bash").arg("-c").arg(script).current_dir(dir).output().expect("openssl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn over_mtls_only_a_client_certificate_from_the_ca_gets_in_and_a_stranger_is_audited() {
    let files = TempDir::new("admin-mtls");
    certificates(&files.0);
    let audit = files.0.join("audit.log");
    let path = |f: &str| files.0.join(f).display().to_string();
    let policy = admin_policy(&reference_policy().replacen(
        "    - stdout: {}",
        &format!("    - file: {{ path: \"{}\", fsync: always }}", audit.display()),
        1,
    )) + &format!(
        "  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem")
    );
    let p = start(&policy).await;
    let addr = p.admin.expect("on").to_string();
    let client = |args: &[String]| {
        let mut cmd = std::process::Command::new(tests::grpc_python());
        cmd.arg(tests::workspace_root().join("tests/clients/admin_tls_client.py")).arg(&addr).arg(path("ca.pem"));
        let out = cmd.args(args).output().expect("python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let with_cert = |token: &str, name: &str| {
        client(&[token.to_owned(), path(&format!("{name}.pem")), path(&format!("{name}.key"))])
    };
    let ok = with_cert(OPS, "client");
    assert_eq!(ok["code"], "OK", "{ok}");
    assert!(ok["policy_version"].as_str().is_some_and(|v| v.starts_with("sha256:")), "{ok}");
    // the certificate does not stand for a token
    assert_eq!(with_cert("pat_wrong", "client")["code"], "UNAUTHENTICATED");
    // no certificate, or one from another CA: the handshake fails, nothing is served
    assert_eq!(client(&[OPS.to_owned()])["code"], "UNAVAILABLE");
    assert_eq!(with_cert(OPS, "stranger")["code"], "UNAVAILABLE");
    // plain gRPC to the TLS port: nothing served either
    let plain = AdminClient::connect(format!("http://{addr}")).await;
    if let Ok(mut plain) = plain {
        assert!(plain.get_status(authed(OPS, GetStatusRequest {})).await.is_err(), "plain gRPC served");
    }
    // the refused handshakes are in the trail
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let tls_refusals = text
            .lines()
            .filter(|l| l.contains("\"method\":\"TLS\"") && l.contains("\"outcome\":\"unauthenticated\""))
            .count();
        if tls_refusals >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "refused handshakes not audited: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The data path a user runs: Envoy in front of one instance, the admin API of another, one
/// redis-server. A key created through the admin API is let through Envoy within a second; a
/// revoked one is refused there within a second; an operator's block holds there at once.
#[tokio::test]
async fn through_the_real_envoy_keys_and_blocks_made_on_another_instance_hold_within_a_second() {
    use proto::portcullis_v1::{CreateKeyRequest, RevokeKeyRequest};
    let redis = RedisServer::start();
    let policy = redis_policy(&redis);
    let stack = tests::Stack::start_with(&policy, &[]).await.unwrap_or_else(|e| panic!("{e:#}"));
    let other = start(&policy).await;
    let mut a = admin(&other).await;
    let create = CreateKeyRequest {
        id: "edge-1".into(),
        roles: vec!["user".into()],
        tier: "basic".into(),
        ..Default::default()
    };
    let key = a.create_key(authed(OPS, create)).await.expect("create").into_inner().key;
    let status = |key: String| {
        let stack = &stack;
        async move {
            stack
                .send("GET", "/api/v1/items", &[("x-api-key", key.as_str()), ("x-forwarded-for", "10.0.0.31")])
                .await
                .status
        }
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    while status(key.clone()).await != 200 {
        assert!(Instant::now() < deadline, "the new key is not accepted through Envoy within a second");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.revoke_key(authed(OPS, RevokeKeyRequest { id: "edge-1".into(), reason: String::new() })).await.expect("revoke");
    let deadline = Instant::now() + Duration::from_secs(1);
    while status(key.clone()).await != 401 {
        assert!(Instant::now() < deadline, "the revoked key is still accepted through Envoy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stack.send("GET", "/health", &[("x-forwarded-for", "10.0.0.32")]).await.status, 200);
    a.block(authed(OPS, BlockRequest { address: "10.0.0.32".into(), duration_seconds: 60, reason: "test".into() }))
        .await
        .expect("block");
    let r = stack.send("GET", "/health", &[("x-forwarded-for", "10.0.0.32")]).await;
    assert_eq!(r.status, 403, "the operator's block holds through Envoy: {r:?}");
}
