//! The ratelimit file corpus: each file in `corpus/` says on its first line what loading it
//! must give (`# expect: ok`, or `# expect: LINE PATH: MESSAGE`, LINE `-` for none).

use std::path::{Path, PathBuf};

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
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{name}: no expect line"));
        let (cfg, problems) = load_files(&[&name]);
        if expect == "ok" {
            assert!(problems.is_empty(), "{name}: {problems:#?}");
            assert_eq!(cfg.domains.len(), 1, "{name}");
            continue;
        }
        let (line, rest) = expect.split_once(' ').expect("LINE PATH: MESSAGE");
        let (path, message) = rest.split_once(": ").expect("PATH: MESSAGE");
        assert_eq!(problems.len(), 1, "{name}: {problems:#?}");
        let p = &problems[0];
        assert_eq!(p.path, path, "{name}: {p:?}");
        assert!(p.message.contains(message), "{name}: {:?} does not contain {message:?}", p.message);
        assert_eq!(p.line, line.parse().ok(), "{name}: {p:?}");
        assert_eq!(p.file.as_deref(), Some(corpus().join(&name).as_path()), "{name}");
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
