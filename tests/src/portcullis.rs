//! The real portcullis binary (rebuilt once per test run), run on ports the OS chooses, and
//! Check requests as Envoy sends them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use proto::ext_authz::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{AttributeContext, CheckRequest, CheckResponse};
use proto::types::{Address, SocketAddress, address};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{READY_DEADLINE, TempDir, examples_dir, lock, workspace_root};

/// The portcullis binary, rebuilt once per test run so a test never runs a stale build.
pub fn portcullis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "--quiet", "-p", "decision", "--bin", "portcullis"]).current_dir(workspace_root());
        // without the variables cargo sets for this test crate: a build script that reads one
        // (ring's reads CARGO_MANIFEST_DIR) would otherwise see it change between this build and
        // every other, and rebuild itself and all that depends on it (about 20 s a test binary)
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                build.env_remove(name.as_ref());
            }
        }
        let status = build.status().unwrap_or_else(|e| panic!("running cargo build for the portcullis binary: {e}"));
        assert!(status.success(), "cargo build -p decision --bin portcullis failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
        let bin = target.join("debug/portcullis");
        assert!(bin.is_file(), "no portcullis binary at {}", bin.display());
        bin
    })
    .clone()
}

/// A Check request as Envoy would send it, from `peer`.
pub fn check_request(peer: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers,
                    size: -1,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The HTTP status of a denied answer (None: allowed).
pub fn denied_status(r: &CheckResponse) -> Option<i32> {
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map(|s| s.code),
        _ => None,
    }
}

/// A running portcullis process.
pub struct Portcullis {
    child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// the forward-auth listener, when the policy turns it on (`listen.forward_auth`)
    pub forward_auth: Option<SocketAddr>,
    /// the admin API's listener, when the policy turns it on (`listen.admin`)
    pub admin: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    pub dir: TempDir,
}

impl Portcullis {
    /// Starts `portcullis serve` on `policy` (written beside copies of the example jwks.json and
    /// ratelimit files, so relative paths resolve), on free ports, logging JSON.
    pub async fn start(policy: &str) -> anyhow::Result<Portcullis> {
        Portcullis::start_with(policy, &[]).await
    }

    /// As `start`, with `files` (path relative to the policy, content) written beside it,
    /// replacing the example files of the same name.
    pub async fn start_with(policy: &str, files: &[(&str, &str)]) -> anyhow::Result<Portcullis> {
        Portcullis::start_with_env(policy, files, &[]).await
    }

    /// As `start_with`, with environment variables set for the process (secrets the policy
    /// names by variable).
    pub async fn start_with_env(
        policy: &str,
        files: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Portcullis> {
        let bin = portcullis_bin();
        let dir = TempDir::new("portcullis");
        std::fs::write(dir.0.join("policy.yaml"), policy)?;
        std::fs::copy(examples_dir().join("jwks.json"), dir.0.join("jwks.json"))?;
        std::fs::create_dir_all(dir.0.join("ratelimit"))?;
        std::fs::copy(examples_dir().join("ratelimit/edge.yaml"), dir.0.join("ratelimit/edge.yaml"))?;
        for (name, content) in files {
            let path = dir.0.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(dir.0.join("policy.yaml"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-format", "json"])
            // the per-decision lines are at debug (none at the default level); tests read them
            .env("PORTCULLIS_LOG", "info,portcullis::decision=debug,portcullis::ratelimit=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning portcullis")?;
        let stderr = child.stderr.take().context("portcullis stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut tx = Some(tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v["message"] == "listening"
                        && let (Some(g), Some(h), Some(tx)) =
                            (v["grpc_addr"].as_str(), v["http_addr"].as_str(), tx.take())
                    {
                        let f = v["forward_auth_addr"].as_str().and_then(|a| a.parse().ok());
                        let a = v["admin_addr"].as_str().and_then(|a| a.parse().ok());
                        let _ = tx.send((g.to_owned(), h.to_owned(), f, a));
                    }
                    lock(&logs).push(line);
                }
            });
        }
        let (grpc, http, forward_auth, admin) = match tokio::time::timeout(READY_DEADLINE, rx).await {
            Ok(Ok(addrs)) => addrs,
            _ => bail!("portcullis did not report its addresses; its log:\n{}", lock(&logs).join("\n")),
        };
        Ok(Portcullis { child, grpc: grpc.parse()?, http: http.parse()?, forward_auth, admin, logs, dir })
    }

    pub fn logs(&self) -> Vec<String> {
        lock(&self.logs).clone()
    }

    /// Polls the log until a line satisfies `pred`.
    pub async fn wait_for_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| pred(l)) {
                return Ok(l);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no log line for {what}; the log:\n{}", self.logs().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for a decision log line with this reason (log lines are written by a background
    /// thread, so a test waits for them rather than reading once).
    pub async fn wait_for_decision(&self, reason: &str) -> serde_json::Value {
        let tag = format!("\"reason\":\"{reason}\"");
        let line = self
            .wait_for_log(&format!("a {reason} decision"), |l| {
                l.contains("\"message\":\"decision\"") && l.contains(&tag)
            })
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        serde_json::from_str(&line).unwrap_or(serde_json::Value::Null)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a Unix signal by name (HUP, TERM) with kill(1).
    pub async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().context("portcullis has exited")?;
        let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().await?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(within, self.child.wait()).await.context("portcullis did not exit in time")??)
    }
}
