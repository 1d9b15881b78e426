//! Config tests: the reference policy validates, and each kind of mistake is refused with its
//! field path and line.

use std::path::{Path, PathBuf};

use super::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn reference_text() -> String {
    std::fs::read_to_string(examples().join("policy.yaml")).expect("deploy/examples/policy.yaml")
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1).unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

/// Replaces `from` (once) in the reference and returns the problems found.
fn problems_after(from: &str, to: &str) -> (String, Vec<Problem>) {
    let text = reference_text();
    assert!(text.contains(from), "{from:?} not in the reference policy");
    let text = text.replacen(from, to, 1);
    let problems = parse(&text, &examples()).expect_err("the change should be refused");
    (text, problems)
}

fn assert_problem(problems: &[Problem], path: &str, line: usize, message: &str) {
    assert!(
        problems.iter().any(|p| p.path == path && p.line == Some(line) && p.message.contains(message)),
        "expected {path} (line {line}): {message:?}; got {problems:#?}"
    );
}

#[test]
fn the_reference_policy_validates() {
    let cfg = load(&examples().join("policy.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let p = &cfg.policy;
    assert_eq!(p.api_keys.len(), 6);
    assert_eq!(p.routes.len(), 5);
    assert_eq!(
        p.tiers.iter().map(|t| (&*t.name, t.per_minute, t.burst, t.per_day)).collect::<Vec<_>>(),
        [("basic", 60, 100, 5000), ("business", 300, 500, 25000), ("enterprise", 1000, 2000, 100000)]
    );
    assert_eq!(p.max_body, 5 << 20);
    assert_eq!(p.max_header_bytes, 16 << 10);
    assert_eq!(p.quota_warning, Some(8000));
    assert_eq!(cfg.settings.grpc_addr.to_string(), "127.0.0.1:8081");
    assert_eq!(cfg.settings.http_addr.to_string(), "127.0.0.1:9102");
    assert_eq!(p.network.zones.names, ["internal", "partners", "vpn"]);
    assert!(p.bearer.is_some(), "the reference JWT issuer and its jwks_file are loaded");
    let t = p.traffic.as_ref().expect("traffic");
    let s = 1_000_000;
    assert_eq!((t.concurrency_limit, t.queue_size, t.queue_timeout, t.lease_ttl), (1000, 5000, 30 * s, 60 * s));
    let b = t.breaker.expect("breaker");
    assert_eq!((b.error_threshold, b.min_requests, b.window, b.reset_timeout), (5000, 20, 60 * s, 300 * s));
    assert_eq!(t.adaptive, None, "adaptive limits are a switch the reference does not turn on");
    // every route is its own upstream unless it names one
    assert_eq!(&*p.routes[0].upstream, "/health");
    assert_eq!(p.routes[0].upstream_key.len(), 16);
}

#[test]
fn adaptive_limits_take_the_alert_thresholds_by_default() {
    let text = std::fs::read_to_string(examples().join("policy.yaml")).expect("policy");
    let text = text.replace("    reset_timeout: 300s", "    reset_timeout: 300s\n  adaptive: { increase: 5 }");
    let cfg = parse(&text, &examples()).unwrap_or_else(|e| panic!("{e:?}"));
    let a = cfg.policy.traffic.as_ref().and_then(|t| t.adaptive).expect("adaptive");
    assert_eq!((a.min_limit, a.decrease, a.increase, a.interval), (100, 5000, 5, 5_000_000));
    assert_eq!((a.error_rate, a.latency), (500, 500_000), "alerts: error_rate.warn 5%, response_time.warn 500ms");
    let (text, problems) =
        problems_after("    reset_timeout: 300s", "    reset_timeout: 300s\n  adaptive: { decrease: 100% }");
    assert_problem(&problems, "traffic.adaptive.decrease", line_of(&text, "decrease: 100%"), "less than 100%");
    let (text, problems) = problems_after("  concurrency_limit: 1000 ", "  concurrency_limit: 0 ");
    assert_problem(&problems, "traffic.concurrency_limit", line_of(&text, "concurrency_limit: 0"), "at least 1");
}

#[test]
fn unknown_fields_are_refused_with_path_and_line() {
    let (text, problems) =
        problems_after("    allow_roles: [service]\n", "    allow_roles: [service]\n    alow_zones: [internal]\n");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let p = &problems[0];
    assert_eq!(p.path, "routes[3]");
    assert_eq!(p.line, Some(line_of(&text, "alow_zones")));
    assert!(p.message.contains("unknown field `alow_zones`"), "{}", p.message);
}

#[test]
fn unknown_roles_are_refused() {
    let (text, problems) = problems_after("allow_roles: [admin]", "allow_roles: [admn]");
    assert_problem(&problems, "routes[4].allow_roles[0]", line_of(&text, "[admn]"), "unknown role \"admn\"");
    let (text, problems) = problems_after("developer: { inherits: [user] }", "developer: { inherits: [usr] }");
    assert_problem(&problems, "roles.developer.inherits[0]", line_of(&text, "[usr]"), "unknown role \"usr\"");
    let (text, problems) =
        problems_after("roles: [developer]\n        tier: business", "roles: [dev]\n        tier: business");
    assert_problem(
        &problems,
        "authentication.api_keys.keys[1].roles[0]",
        line_of(&text, "roles: [dev]"),
        "unknown role \"dev\"",
    );
}

#[test]
fn inheritance_cycles_are_refused() {
    let (text, problems) = problems_after("user: {}", "user: { inherits: [admin] }");
    assert_problem(
        &problems,
        "roles.admin.inherits",
        line_of(&text, "admin: { inherits"),
        "inheritance cycle: admin -> developer -> user -> admin",
    );
}

#[test]
fn bad_cidrs_are_refused() {
    let (text, problems) = problems_after("partners: [203.0.113.0/24]", "partners: [203.0.113.0/33]");
    assert_problem(&problems, "network.zones.partners[0]", line_of(&text, "203.0.113.0/33"), "invalid CIDR");
    let (text, problems) = problems_after("deny: [198.51.100.0/24]", "deny: [198.51.100.7/24]");
    assert_problem(&problems, "network.deny[0]", line_of(&text, "198.51.100.7/24"), "host bits are set");
}

#[test]
fn bad_durations_sizes_and_rates_are_refused() {
    let (text, problems) = problems_after("max_auth_age: 15m", "max_auth_age: 15 minutes");
    assert_problem(
        &problems,
        "routes[4].sensitive.max_auth_age",
        line_of(&text, "15 minutes"),
        "invalid duration \"15 minutes\"",
    );
    let (text, problems) = problems_after("max_body: 5MB", "max_body: 5 megs");
    assert_problem(&problems, "limits.max_body", line_of(&text, "5 megs"), "invalid size");
    let (text, problems) = problems_after("untrusted: 10/minute", "untrusted: 10/fortnight");
    assert_problem(&problems, "network.zone_limits.untrusted", line_of(&text, "10/fortnight"), "invalid rate");
    let (text, problems) = problems_after("quota_warning: 80%", "quota_warning: 180%");
    assert_problem(&problems, "quota_warning", line_of(&text, "180%"), "invalid percentage");
}

#[test]
fn the_ratelimit_header_dialect_is_a_policy_setting() {
    let text = reference_text();
    assert_eq!(
        parse(&text, &examples()).expect("reference").policy.ratelimit_headers,
        HeaderDialect::Draft10,
        "today's output is the default"
    );
    for (name, want) in [
        ("draft-06", HeaderDialect::Draft06),
        ("draft-07", HeaderDialect::Draft07),
        ("draft-11", HeaderDialect::Draft10),
        ("none", HeaderDialect::None),
    ] {
        let with = text.replacen("quota_warning: 80%", &format!("quota_warning: 80%\nratelimit_headers: {name}"), 1);
        assert_eq!(parse(&with, &examples()).expect(name).policy.ratelimit_headers, want, "{name}");
    }
    let (text, problems) = problems_after("quota_warning: 80%", "quota_warning: 80%\nratelimit_headers: draft-99");
    assert_problem(&problems, "ratelimit_headers", line_of(&text, "draft-99"), "unknown dialect \"draft-99\"");
}

#[test]
fn bad_digests_and_duplicate_ids_and_unknown_tiers_are_refused() {
    let (text, problems) =
        problems_after("sha256: 43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba", "sha256: 43089ad2");
    assert_problem(
        &problems,
        "authentication.api_keys.keys[0].sha256",
        line_of(&text, "sha256: 43089ad2"),
        "invalid SHA-256 digest",
    );
    let (text, problems) = problems_after("id: demo-business", "id: demo-basic");
    let dup_line = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("id: demo-basic"))
        .nth(1)
        .map(|(i, _)| i + 1)
        .expect("second id");
    assert_problem(&problems, "authentication.api_keys.keys[1].id", dup_line, "duplicate key id \"demo-basic\"");
    let (text, problems) = problems_after("tier: business", "tier: gold");
    assert_problem(
        &problems,
        "authentication.api_keys.keys[1].tier",
        line_of(&text, "tier: gold"),
        "unknown tier \"gold\"",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = reference_text()
        .replacen("allow_roles: [admin]", "allow_roles: [admn]", 1)
        .replacen("deny: [198.51.100.0/24]", "deny: [nonsense]", 1)
        .replacen("tier: business", "tier: gold", 1)
        .replacen("within: 1m", "within: soon", 1);
    let problems = parse(&text, &examples()).expect_err("refused");
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "routes[4].allow_roles[0]",
        "network.deny[0]",
        "authentication.api_keys.keys[1].tier",
        "network.auto_block.within",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    assert!(problems.iter().all(|p| p.line.is_some()), "{problems:#?}");
}

#[test]
fn the_error_display_names_file_line_path_and_reason() {
    let err = ConfigError {
        file: PathBuf::from("policy.yaml"),
        problems: vec![Problem {
            file: None,
            path: "routes[3].allow_roles[0]".into(),
            line: Some(97),
            message: "unknown role \"admn\"".into(),
        }],
    };
    assert_eq!(
        err.to_string(),
        "policy.yaml: 1 problem found\n  policy.yaml:97: routes[3].allow_roles[0]: unknown role \"admn\"\n"
    );
}

#[test]
fn algorithms_outside_the_allow_list_are_refused() {
    let (text, problems) = problems_after("algorithms: [RS256, ES256]", "algorithms: [RS256, none]");
    assert_problem(
        &problems,
        "authentication.jwt[0].algorithms[1]",
        line_of(&text, "[RS256, none]"),
        "algorithm \"none\" is not allowed",
    );
}

#[test]
fn malformed_yaml_names_its_line() {
    let problems = parse("routes:\n  - match: { path: /x\n", Path::new(".")).expect_err("refused");
    assert_eq!(problems.len(), 1);
    assert!(problems[0].line.is_some(), "{problems:?}");
}

#[test]
fn an_empty_file_is_a_policy_with_defaults_and_no_routes() {
    let cfg = parse("", Path::new(".")).expect("empty policy");
    assert!(cfg.policy.routes.is_empty());
    assert_eq!(cfg.policy.tiers.len(), 3);
}

fn with_store(store: &str) -> Result<Config, Vec<Problem>> {
    let text = reference_text().replacen(
        "  memory: {}                    # the embedded default; a fleet uses, instead:",
        store,
        1,
    );
    parse(&text, &examples())
}

#[test]
fn the_redis_store_is_read_with_its_defaults() {
    let cfg = with_store("  redis: { url: \"redis://:pw@127.0.0.1:6379/2\" }").expect("redis store");
    let StoreSettings::Redis(r) = cfg.settings.store else { panic!("redis expected") };
    assert_eq!(r.url, "redis://:pw@127.0.0.1:6379/2");
    assert_eq!(r.timeout, std::time::Duration::from_millis(25));
    assert_eq!(r.pool_size, 4);
    assert!(matches!(parse("", Path::new(".")).expect("empty").settings.store, StoreSettings::Memory));
    assert_eq!(r.over_limit_cache, 100_000);
    assert!(r.cluster.is_empty());
}

#[test]
fn a_redis_cluster_store_is_read_from_its_nodes() {
    let cfg = with_store(
        "  redis: { cluster: [\"redis://:pw@10.0.0.1:7000\", \"redis://:pw@10.0.0.2:7000\"], over_limit_cache: 0 }",
    )
    .expect("cluster store");
    let StoreSettings::Redis(r) = cfg.settings.store else { panic!("redis expected") };
    assert_eq!(r.cluster, ["redis://:pw@10.0.0.1:7000", "redis://:pw@10.0.0.2:7000"]);
    assert_eq!(r.over_limit_cache, 0);
    // an audit stream has no node to default to on a cluster
    let text = reference_text()
        .replacen(
            "  memory: {}                    # the embedded default; a fleet uses, instead:",
            "  redis: { cluster: [\"redis://10.0.0.1:7000\"] }",
            1,
        )
        .replacen("    - stdout: {}\n", "    - redis_stream: { key: pc:audit }\n", 1);
    assert!(text.contains("redis_stream: { key: pc:audit }"), "the reference policy's lines moved");
    let problems = parse(&text, &examples()).expect_err("no url for the stream");
    assert!(
        problems.iter().any(|p| p.path == "audit.sinks[0].redis_stream" && p.message.contains("Redis Cluster")),
        "{problems:#?}"
    );
}

#[test]
fn unsupported_or_malformed_redis_settings_are_refused() {
    let cases = [
        ("  redis: { url: \"redis://h:6379\", ca_file: ca.pem }", "store.redis.ca_file", "use a rediss:// URL"),
        ("  redis: { url: \"rediss://h:6379\", ca_file: missing.pem }", "store.redis.ca_file", "cannot read"),
        ("  redis: { url: \"http://h:6379\" }", "store.redis.url", "invalid Redis URL"),
        ("  redis: { cluster: [\"redis://a:7000\"], url: \"redis://a:7000\" }", "store.redis", "choose one of url"),
        ("  redis: { timeout: 10ms }", "store.redis", "is required"),
        ("  redis: { cluster: [] }", "store.redis.cluster", "at least one node"),
        ("  redis: { cluster: [\"redis://a:7000\", \"tcp://b:7000\"] }", "store.redis.cluster[1]", "invalid Redis URL"),
        (
            "  redis: { cluster: [\"redis://a:7000\", \"rediss://b:7000\"] }",
            "store.redis.cluster",
            "use one scheme for all",
        ),
        ("  redis: { url: \"redis://h:6379\", pool_size: 0 }", "store.redis.pool_size", "must be 1 to 256"),
        (
            "  redis: { url: \"redis://h:6379\", over_limit_cache: 20000000 }",
            "store.redis.over_limit_cache",
            "must be 0 (off)",
        ),
        (
            "  redis: { url: \"redis://h:6379\", local_share: { expected_instances: 0 } }",
            "store.redis.local_share.expected_instances",
            "at least 1",
        ),
        ("  redis: { url: \"redis://h:6379\", timeout: soon }", "store.redis.timeout", "invalid duration"),
        ("  memory: {}\n  redis: { url: \"redis://h:6379\" }", "store", "choose one store"),
    ];
    for (store, path, message) in cases {
        let problems = with_store(store).expect_err(store);
        assert!(
            problems.iter().any(|p| p.path == path && p.message.contains(message) && p.line.is_some()),
            "{store}: {problems:#?}"
        );
    }
    // the password never appears in a problem
    let problems = with_store("  redis: { url: \"redis://:hunter2@h:99999999\" }").expect_err("bad port");
    assert!(problems.iter().all(|p| !p.message.contains("hunter2")), "{problems:#?}");
}

#[test]
fn unknown_zone_names_are_refused_wherever_zones_are_named() {
    let (text, problems) = problems_after("zones: [internal, vpn]", "zones: [internal, vnp]");
    assert_problem(
        &problems,
        "routes[4].zones[1]",
        line_of(&text, "[internal, vnp]"),
        "unknown zone \"vnp\" (known: internal, partners, vpn, untrusted)",
    );
    let (text, problems) = problems_after("    block_for: 15m", "    block_for: 15m\n    exempt_zones: [intranet]");
    assert_problem(
        &problems,
        "network.auto_block.exempt_zones[0]",
        line_of(&text, "[intranet]"),
        "unknown zone \"intranet\" (known: internal, partners, vpn, untrusted)",
    );
}

#[test]
fn remote_token_settings_are_checked() {
    let jwks_line = "jwks_file: jwks.json      # or jwks_url (fetched, cached, refreshed on unknown kid)";
    let (text, problems) = problems_after(jwks_line, "jwks_url: http://auth.example.com/jwks.json");
    assert_problem(&problems, "authentication.jwt[0].jwks_url", line_of(&text, "jwks_url: http:"), "must be https://");
    let (text, problems) =
        problems_after(jwks_line, "jwks_url: https://auth.example.com/jwks.json\n      ca_file: missing-ca.pem");
    assert_problem(&problems, "authentication.jwt[0].ca_file", line_of(&text, "missing-ca.pem"), "cannot read");
    let (text, problems) =
        problems_after(jwks_line, "jwks_url: https://auth.example.com/jwks.json\n      jwks_cooldown: soon");
    assert_problem(&problems, "authentication.jwt[0].jwks_cooldown", line_of(&text, "soon"), "");
    // a secret is named by its environment variable; an unset one is refused at load
    let (text, problems) = problems_after(
        "  # oauth2_introspection:",
        "  oauth2_introspection:\n    endpoint: https://auth.example.com/introspect\n    client_id: portcullis\n    client_secret_env: PORTCULLIS_TEST_SURELY_UNSET\n  # was:",
    );
    assert_problem(
        &problems,
        "authentication.oauth2_introspection.client_secret_env",
        line_of(&text, "PORTCULLIS_TEST_SURELY_UNSET"),
        "environment variable \"PORTCULLIS_TEST_SURELY_UNSET\" is not set",
    );
}

#[test]
fn alert_thresholds_are_compiled_and_checked() {
    let cfg = load(&examples().join("policy.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let a = cfg.settings.alerts.expect("alerts");
    assert_eq!(a.failed_auth.map(|l| (l.warn, l.critical)), Some((10, 50)));
    assert_eq!(a.failed_auth_window, std::time::Duration::from_secs(60));
    assert_eq!(a.error_rate.map(|l| (l.warn, l.critical)), Some((500, 1000)));
    assert_eq!(a.response_time.map(|l| (l.warn, l.critical)), Some((500_000, 2_000_000)));
    assert_eq!(a.payload_size.map(|l| (l.warn, l.critical)), Some((1 << 20, 5 << 20)));
    assert!(!a.block_on_critical);
    let (text, problems) = problems_after("response_time: { warn: 500ms,", "response_time: { warn: 5000ms,");
    assert_problem(
        &problems,
        "alerts.response_time",
        line_of(&text, "warn: 5000ms"),
        "warn must not be above critical",
    );
    let (text, problems) = problems_after(
        "payload_size:  { warn: 1MB,         critical: 5MB }",
        "payload_size:  { warn: 1MB, critical: 5MB, block: true }",
    );
    assert_problem(&problems, "alerts.payload_size.block", line_of(&text, "block: true"), "only failed_auth");
    let (text, problems) = problems_after("webhooks: []", "webhooks: [\"ftp://x/\"]");
    assert_problem(&problems, "alerts.webhooks[0]", line_of(&text, "ftp://x/"), "http:// or https://");
}

const ADMIN: &str = "\nadmin:\n  tokens:\n    - id: ops\n      sha256: eb4a81a266aa2358e1da82905a5b08bd910236e828c6a0f11e4175c480aa89f0\n      scopes: [read, blocks:write]\n";

#[test]
fn the_admin_api_needs_its_own_listener_and_well_formed_tokens() {
    let with_admin = |listen: &str, admin: &str| {
        let text = reference_text().replacen("listen:\n", &format!("listen:\n  admin: {listen}\n"), 1) + admin;
        (parse(&text, &examples()), text)
    };
    let (ok, _) = with_admin("127.0.0.1:0", ADMIN);
    let cfg = ok.unwrap_or_else(|p| panic!("{p:#?}"));
    let admin = cfg.settings.admin.expect("on");
    assert_eq!((admin.tokens.len(), &*admin.tokens[0].id), (1, "ops"));
    assert_eq!(admin.tokens[0].scopes, [crate::admin::Scope::Read, crate::admin::Scope::BlocksWrite]);
    assert!(cfg.version.starts_with("sha256:") && cfg.version.len() == 7 + 64, "{}", cfg.version);
    // without listen.admin the section is kept for later but nothing listens
    assert!(parse(&(reference_text() + ADMIN), &examples()).expect("valid").settings.admin.is_none());

    let (no_tokens, _) = with_admin("127.0.0.1:0", "");
    let problems = no_tokens.expect_err("no token");
    assert!(
        problems.iter().any(|p| p.path == "admin.tokens" && p.message.contains("at least one token")),
        "{problems:#?}"
    );
    let (same_port, text2) = with_admin("127.0.0.1:8081", ADMIN);
    assert_problem(
        &same_port.expect_err("shared port"),
        "listen.admin",
        line_of(&text2, "admin: 127.0.0.1:8081"),
        "of its own",
    );
    let sha = "sha256: eb4a81a266aa2358e1da82905a5b08bd910236e828c6a0f11e4175c480aa89f0";
    let scopes = "scopes: [read, blocks:write]";
    for (from, to, path, message) in [
        (scopes, "scopes: [read, root]", "admin.tokens[0].scopes[1]", "unknown scope \"root\""),
        (sha, "sha256: not-a-digest", "admin.tokens[0].sha256", "64 hexadecimal"),
        ("id: ops", "id: \"ops team\"", "admin.tokens[0].id", "letters, digits"),
        (scopes, "scopes: []", "admin.tokens[0].scopes", "at least one"),
    ] {
        let (refused, text) = with_admin("127.0.0.1:0", &ADMIN.replacen(from, to, 1));
        assert_problem(&refused.expect_err(path), path, line_of(&text, to), message);
    }
    // two tokens with one id, or one token twice
    let twice = format!(
        "{ADMIN}    - id: ops\n      sha256: 43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba\n      scopes: [read]\n"
    );
    let (refused, _) = with_admin("127.0.0.1:0", &twice);
    assert!(
        refused.expect_err("dup").iter().any(|p| p.path == "admin.tokens[1].id" && p.message.contains("duplicate"))
    );
}

#[test]
fn the_policy_version_covers_the_files_it_names() {
    let dir = std::env::temp_dir().join(format!("pc-version-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("ratelimit")).expect("dir");
    for f in ["jwks.json", "ratelimit/edge.yaml"] {
        let _ = std::fs::copy(examples().join(f), dir.join(f));
    }
    let text = reference_text();
    let v1 = parse(&text, &dir).map(|c| c.version);
    std::fs::write(dir.join("ratelimit/edge.yaml"), "domain: edge\ndescriptors: []\n").expect("write");
    let v2 = parse(&text, &dir).map(|c| c.version);
    let _ = std::fs::remove_dir_all(&dir);
    let (v1, v2) = (v1.expect("valid"), v2.expect("still valid"));
    assert_ne!(v1, v2, "a changed ratelimit file is a changed policy");
    assert_eq!(parse(&text, &examples()).expect("valid").version, parse(&text, &examples()).expect("valid").version);
}

#[test]
fn files_are_watched_by_default_and_the_interval_is_bounded() {
    let cfg = parse(&reference_text(), &examples()).expect("valid");
    assert_eq!(cfg.settings.watch, Some(Duration::from_millis(500)));
    assert_eq!(cfg.settings.shutdown_delay, Duration::ZERO);
    let off = parse(&(reference_text() + "\nreload: { watch: false }\n"), &examples()).expect("valid");
    assert_eq!(off.settings.watch, None);
    let text = reference_text() + "\nreload: { interval: 10ms }\n";
    assert_problem(
        &parse(&text, &examples()).expect_err("too often"),
        "reload.interval",
        line_of(&text, "interval: 10ms"),
        "100ms to 1h",
    );
    let delayed = reference_text().replacen("listen:\n", "listen:\n  shutdown_delay: 5s\n", 1);
    assert_eq!(parse(&delayed, &examples()).expect("valid").settings.shutdown_delay, Duration::from_secs(5));
}

#[test]
fn admin_tls_files_are_checked_while_the_policy_loads() {
    let text = reference_text().replacen("listen:\n", "listen:\n  admin: 127.0.0.1:0\n", 1)
        + ADMIN
        + "  tls:\n    cert_file: missing.pem\n    key_file: missing.key\n";
    let problems = parse(&text, &examples()).expect_err("no such files");
    assert!(problems.iter().any(|p| p.path == "admin.tls" && p.message.contains("missing.pem")), "{problems:#?}");
}
