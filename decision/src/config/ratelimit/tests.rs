//! The ratelimit file corpus: each file in `corpus/` says on its first line what loading it
//! must give (`# expect: ok`, or `# expect: LINE PATH: MESSAGE`, LINE `-` for none).

use std::path::{Path, PathBuf};

use decision_core::rls::{DescriptorReq, Outcome};

use super::*;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/ratelimit/corpus")
}

fn load_files(patterns: &[&str]) -> (RlsConfig, Vec<Problem>) {
    let raw = RawRatelimit { files: patterns.iter().map(|s| s.to_string()).collect(), x_ratelimit_headers: false };
    let mut problems = Vec::new();
    let cfg = load(Some(&raw), &corpus(), "ratelimit", &mut problems, &LineIndex::default());
    (cfg, problems)
}

#[test]
fn every_corpus_file_gives_its_expected_result() {
    let mut names: Vec<String> = std::fs::read_dir(corpus())
        .expect("corpus folder")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{names:?}");
    for name in names {
        let text = std::fs::read_to_string(corpus().join(&name)).expect("read");
        // one `# expect:` line per problem, in the order they are reported
        let expects: Vec<&str> = text.lines().map_while(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{name}: no expect line");
        let (cfg, problems) = load_files(&[&name]);
        if expects == ["ok"] {
            assert!(problems.is_empty(), "{name}: {problems:#?}");
            assert_eq!(cfg.domains.len(), 1, "{name}");
            continue;
        }
        assert_eq!(problems.len(), expects.len(), "{name}: {problems:#?}");
        for (expect, p) in expects.iter().zip(&problems) {
            let (line, rest) = expect.split_once(' ').expect("LINE PATH: MESSAGE");
            let (path, message) = rest.split_once(": ").expect("PATH: MESSAGE");
            assert_eq!(p.path, path, "{name}: {p:?}");
            assert!(p.message.contains(message), "{name}: {:?} does not contain {message:?}", p.message);
            assert_eq!(p.line, line.parse().ok(), "{name}: {p:?}");
            assert_eq!(p.file.as_deref(), Some(corpus().join(&name).as_path()), "{name}");
        }
    }
}

#[test]
fn the_accepted_file_behaves_as_written() {
    let (cfg, problems) = load_files(&["ok_everything.yaml"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let d = &cfg.domains["everything"];
    let id = |entries: &[(&str, &str)]| d.lookup(entries).map(|r| r.id.to_string());
    assert_eq!(id(&[("api_key", "premium")]).as_deref(), Some("everything.api_key_premium"));
    assert_eq!(id(&[("api_key", "other")]).as_deref(), Some("everything.api_key"));
    assert_eq!(id(&[("org", "o"), ("team", "core"), ("user", "u")]).as_deref(), Some("everything.org.team_core.user"));
    assert_eq!(id(&[("org", "o"), ("team", "web")]).as_deref(), Some("everything.org.team"));
    assert!(d.lookup(&[("path", "/static/app.js")]).is_some_and(|r| r.unlimited()));
    let beta = d.lookup(&[("path", "/beta")]).expect("beta");
    assert!(beta.shadow && beta.detailed_metric);
    assert!(d.lookup(&[("yearly", "x")]).is_some_and(|r| r.fixed_window));
    assert_eq!(d.rules().count(), 9);
}

#[test]
fn one_domain_per_file_and_missing_files_are_refused() {
    let dir = std::env::temp_dir().join(format!("portcullis-rls-dup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for n in ["a.yaml", "b.yaml"] {
        std::fs::write(
            dir.join(n),
            "domain: same\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
        )
        .expect("write");
    }
    let raw = RawRatelimit { files: vec!["*.yaml".into()], x_ratelimit_headers: false };
    let mut problems = Vec::new();
    load(Some(&raw), &dir, "ratelimit", &mut problems, &LineIndex::default());
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].message.starts_with("duplicate domain 'same' in config file"), "{:?}", problems[0]);
    assert_eq!(problems[0].file.as_deref(), Some(dir.join("b.yaml").as_path()));
    let _ = std::fs::remove_dir_all(&dir);

    let (_, problems) = load_files(&["nothing-*.yaml"]);
    assert!(problems[0].message.contains("no file matches"), "{problems:?}");
    let (_, problems) = load_files(&["missing.yaml"]);
    assert!(problems[0].message.contains("no such file"), "{problems:?}");
}

#[test]
fn file_name_patterns_match_as_shells_do() {
    for (p, n, want) in [
        ("*.yaml", "edge.yaml", true),
        ("*.yaml", "edge.yml", false),
        ("e?ge.yaml", "edge.yaml", true),
        ("edge*", "edge.yaml", true),
    ] {
        assert_eq!(name_matches(p.as_bytes(), n.as_bytes()), want, "{p} {n}");
    }
}

/// Runs calls (each a list of descriptors) against a memory store at one instant; for each, whether
/// it was over the limit and each descriptor's outcome.
fn run(cfg: &RlsConfig, domain: &str, calls: &[&[&[(&str, &str)]]]) -> Vec<(bool, Vec<Outcome>)> {
    let store = crate::store::MemoryStore::new();
    calls
        .iter()
        .map(|call| {
            let descs: Vec<DescriptorReq<'_>> =
                call.iter().map(|e| DescriptorReq { entries: e.to_vec(), limit_override: None, hits: 1 }).collect();
            let plan = decision_core::rls::plan(cfg, domain, &descs);
            let verdicts = store.apply_now(&plan.ops, 1_800_000_000_000_000);
            let d = decision_core::rls::conclude(plan, &verdicts);
            (d.over_limit, d.statuses.into_iter().map(|s| s.outcome).collect())
        })
        .collect()
}

fn overs(results: &[(bool, Vec<Outcome>)]) -> Vec<bool> {
    results.iter().map(|r| r.0).collect()
}

#[test]
fn share_threshold_values_share_one_counter() {
    let (cfg, problems) = load_files(&["ok_share_threshold.yaml"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let r = run(
        &cfg,
        "shared",
        &[&[&[("files", "files/a.pdf")]], &[&[("files", "files/b.csv")]], &[&[("files", "files/c")]]],
    );
    assert_eq!(overs(&r), [false, false, true]);
    let r = run(
        &cfg,
        "shared",
        &[&[&[("files", "own/a")]], &[&[("files", "own/b")]], &[&[("files", "own/a")]], &[&[("files", "own/a")]]],
    );
    assert_eq!(overs(&r), [false, false, false, true], "without share_threshold each value counts alone");
    let get = |route| -> &[(&str, &str)] {
        if route { &[("route", "/api/x/v1"), ("method", "GET")] } else { &[("route", "/apiZv1"), ("method", "GET")] }
    };
    let r = run(&cfg, "shared", &[&[get(true)], &[get(false)], &[get(true)], &[get(false)]]);
    assert_eq!(overs(&r), [false, false, false, true]);
}

/// Loads one file with this text (written to a folder of its own); it must load cleanly.
fn load_text(tag: &str, text: &str) -> RlsConfig {
    let dir = std::env::temp_dir().join(format!("portcullis-rls-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("f.yaml"), text).expect("write");
    let raw = RawRatelimit { files: vec!["f.yaml".into()], x_ratelimit_headers: false };
    let mut problems = Vec::new();
    let cfg = load(Some(&raw), &dir, "ratelimit", &mut problems, &LineIndex::default());
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{problems:#?}");
    cfg
}

#[test]
fn a_wildcard_in_the_middle_of_a_value_matches() {
    let cfg = load_text(
        "mid",
        "domain: mid\ndescriptors:\n  - key: path\n    value: /api/*/users\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n",
    );
    let r = run(
        &cfg,
        "mid",
        &[&[&[("path", "/api/v7/users")]], &[&[("path", "/api/v7/users")]], &[&[("path", "/api/v7/orders")]]],
    );
    assert_eq!(r[0], (false, vec![Outcome::NearLimit]), "the one allowed request uses all of it");
    assert_eq!(r[1], (true, vec![Outcome::OverLimit]));
    assert_eq!(r[2], (false, vec![Outcome::Unlimited]), "no match: no limit");
}

#[test]
fn an_unlimited_rules_replaces_apply_whenever_it_matches() {
    let cfg = load_text(
        "repl",
        "domain: r\ndescriptors:\n  - key: user\n    rate_limit: { unit: minute, requests_per_unit: 1, name: per_user }\n  - key: plan\n    value: partner\n    rate_limit: { unlimited: true, replaces: [{ name: per_user }] }\n",
    );
    let call: &[&[(&str, &str)]] = &[&[("user", "u-b")], &[("plan", "partner")]];
    assert_eq!(overs(&run(&cfg, "r", &[call, call, call])), [false, false, false]);
    let alone: &[&[(&str, &str)]] = &[&[("user", "u-b")]];
    assert_eq!(overs(&run(&cfg, "r", &[alone, alone])), [false, true]);
}

#[test]
fn merge_keys_merge_as_yaml_v2_does() {
    let (cfg, problems) = load_files(&["ok_merge_keys.yaml"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let d = &cfg.domains["merged"];
    let rule = |k: &str| d.lookup(&[(k, "x")]).cloned().unwrap_or_else(|| panic!("{k}"));
    assert_eq!((rule("alias").requests_per_unit, rule("alias").unit), (5, Some(Unit::Minute)));
    assert_eq!((rule("inline").requests_per_unit, rule("inline").unit), (7, Some(Unit::Hour)));
    let listed = rule("list");
    assert_eq!((listed.requests_per_unit, listed.unit), (10, Some(Unit::Minute)), "the earlier map wins");
    assert_eq!(listed.name.as_deref(), Some("listed"), "keys only the later map has are merged");
    assert!(rule("tagged").shadow && rule("copied").shadow, "a whole descriptor merged, its key overridden");
    assert_eq!(rule("copied").requests_per_unit, 10);
}

#[test]
fn quota_mode_and_the_metrics_keys_load_with_their_effect() {
    let (cfg, problems) = load_files(&["ok_modes_and_metrics.yaml"]);
    assert!(problems.is_empty(), "{problems:#?}");
    let d = &cfg.domains["modes"];
    assert!(d.lookup(&[("tenant", "t")]).is_some_and(|r| r.quota_mode));
    assert!(d.lookup(&[("kx", "v")]).is_some(), "a `*` in the key");
    let call = |t, p| -> Vec<&'static [(&'static str, &'static str)]> {
        vec![
            if t { &[("tenant", "t1")] } else { &[("tenant", "t2")] },
            if p { &[("project", "p1")] } else { &[("project", "p2")] },
        ]
    };
    let (a, b, c) = (call(true, true), call(true, false), call(true, true));
    let r = run(&cfg, "modes", &[&a, &b, &c]);
    assert_eq!(r[0], (false, vec![Outcome::NearLimit, Outcome::NearLimit]));
    assert_eq!(r[1], (false, vec![Outcome::OverLimit, Outcome::NearLimit]), "one quota limit over: allowed");
    assert!(r[2].0, "every quota limit over: refused");
}
