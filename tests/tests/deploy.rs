//! The deployment files, checked the way chart maintainers check them in CI (no cluster runs
//! here): `helm lint` and `helm template` of deploy/helm/portcullis with the default values and
//! each example's, every rendered object validated against the Kubernetes schemas
//! (`kubernetes-validate --strict`), `values.schema.json` refusing a typo, the policy inside
//! the rendered ConfigMap accepted by `portcullis check-config`, deploy/kubernetes/portcullis.yaml
//! equal to what the chart renders, and the gateway examples naming the chart's Service.
// A test harness reads PATH and HOME to find its tools.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::Command;

use tests::{TempDir, portcullis_bin, workspace_root};

/// A tool from `var`, else the test virtualenv's bin (scripts/test.sh installs it there). Never
/// skipped: missing, the test fails and says what to do.
fn tool(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("PORTCULLIS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/portcullis/venv")))
        .expect("HOME");
    let p = venv.join("bin").join(name);
    assert!(p.is_file(), "no {name}: run scripts/test.sh (it installs it), or set {var}");
    p
}

fn chart() -> PathBuf {
    workspace_root().join("deploy/helm/portcullis")
}

/// `helm template portcullis <chart> --namespace portcullis` with `values` files.
fn render(values: &[&str], extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(tool("PORTCULLIS_HELM", "helm"));
    cmd.args(["template", "portcullis"]).arg(chart()).args(["--namespace", "portcullis"]);
    for v in values {
        cmd.arg("-f").arg(chart().join("examples").join(v));
    }
    cmd.args(extra).output().expect("helm")
}

fn rendered(values: &[&str]) -> String {
    let out = render(values, &[]);
    assert!(out.status.success(), "helm template {values:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

const EXAMPLES: [&[&str]; 4] = [&[], &["full.yaml"], &["existing-configmap.yaml"], &["plain.yaml"]];

#[test]
fn the_chart_lints_and_renders_objects_the_kubernetes_schemas_accept() {
    let dir = TempDir::new("helm");
    for values in EXAMPLES {
        let mut lint = Command::new(tool("PORTCULLIS_HELM", "helm"));
        lint.arg("lint").arg(chart()).arg("--strict");
        for v in values {
            lint.arg("-f").arg(chart().join("examples").join(v));
        }
        let out = lint.output().expect("helm lint");
        assert!(out.status.success(), "helm lint {values:?}: {}", String::from_utf8_lossy(&out.stdout));
        let file = dir.0.join(format!("{}.yaml", values.first().map_or("default", |v| v.trim_end_matches(".yaml"))));
        std::fs::write(&file, rendered(values)).expect("write");
        let out = Command::new(tool("PORTCULLIS_KUBERNETES_VALIDATE", "kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .arg(&file)
            .output()
            .expect("kubernetes-validate");
        let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !report.contains("ERROR"), "{values:?}:\n{report}");
        // every object passed, but the Prometheus Operator's ServiceMonitor, whose schema is not
        // one Kubernetes ships
        assert!(report.contains("passed for resource deployment/portcullis"), "{report}");
    }
}

#[test]
fn the_values_schema_refuses_a_typo_and_a_bad_value() {
    for (set, why) in
        [("replicaCont=3", "replicaCont"), ("redis.url=http://x", "redis"), ("logFormat=xml", "logFormat")]
    {
        let out = render(&[], &["--set", set]);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{set}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_policy_the_chart_mounts_passes_check_config() {
    for values in [&[][..], &["full.yaml"]] {
        let docs = rendered(values);
        let dir = TempDir::new("chart-policy");
        let configmap = serde_yaml_ng::Deserializer::from_str(&docs)
            .filter_map(|d| serde_yaml_ng::Value::deserialize(d).ok())
            .find(|v| v["kind"] == "ConfigMap")
            .expect("a ConfigMap");
        let data = configmap["data"].as_mapping().expect("data");
        for (k, v) in data {
            // the keys carry '/' as '__'; the Deployment's items put them back
            let path = dir.0.join(k.as_str().expect("key").replace("__", "/"));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(&path, v.as_str().expect("text")).expect("write");
        }
        let out = Command::new(portcullis_bin())
            .args(["check-config", "--config"])
            .arg(dir.0.join("policy.yaml"))
            .output()
            .expect("check-config");
        assert!(out.status.success(), "{values:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn the_plain_manifests_are_what_the_chart_renders() {
    let committed =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes/portcullis.yaml")).expect("manifests");
    let body: String = committed.lines().skip_while(|l| l.starts_with('#')).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        body,
        rendered(&["plain.yaml"]),
        "deploy/kubernetes/portcullis.yaml is stale: render it again (its header says how)"
    );
}

#[test]
fn the_gateway_examples_name_the_charts_service_and_port() {
    let docs = rendered(&["plain.yaml"]);
    assert!(docs.contains("kind: Service\nmetadata:\n  name: portcullis\n"), "the Service is named portcullis");
    for f in ["envoy-gateway.yaml", "istio.yaml"] {
        let text = std::fs::read_to_string(workspace_root().join("deploy/gateways").join(f)).expect("example");
        let objects: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde_yaml_ng::Value::deserialize(d).expect(f))
            .collect();
        assert!(objects.iter().all(|o| o["apiVersion"].is_string() && o["kind"].is_string()), "{f}");
        assert!(
            text.contains("portcullis.portcullis.svc.cluster.local")
                || text.contains("name: portcullis\n          namespace: portcullis"),
            "{f}"
        );
        assert!(text.contains("8081"), "{f}");
    }
}

use serde::Deserialize as _;
