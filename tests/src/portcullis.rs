//! The real portcullis binary (rebuilt once per test run), run on ports the OS chooses, and
//! Check requests as Envoy sends them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;

use proto::ext_authz::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{AttributeContext, CheckRequest, CheckResponse};
use proto::types::{Address, SocketAddress, address};
use tokio::process::Command;

use crate::process::{Process, build_bin};
use crate::{TempDir, examples_dir};

/// The portcullis binary, rebuilt once per test run so a test never runs a stale build.
pub fn portcullis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("portcullis")).clone()
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
    process: Process,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// the forward-auth listener, when the policy turns it on (`listen.forward_auth`)
    pub forward_auth: Option<SocketAddr>,
    /// the admin API's listener, when the policy turns it on (`listen.admin`)
    pub admin: Option<SocketAddr>,
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
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--config"])
            .arg(dir.0.join("policy.yaml"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--log-format", "json"])
            // the per-decision lines are at debug (none at the default level); tests read them
            .env("PORTCULLIS_LOG", "info,portcullis::decision=debug,portcullis::ratelimit=debug")
            .envs(env.iter().copied());
        let (process, (grpc, http, forward_auth, admin)) = Process::spawn("portcullis", cmd, |v| {
            let addr = |k: &str| v[k].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
            match (v["message"].as_str(), addr("grpc_addr"), addr("http_addr")) {
                (Some("listening"), Some(g), Some(h)) => Some((g, h, addr("forward_auth_addr"), addr("admin_addr"))),
                _ => None,
            }
        })
        .await?;
        Ok(Portcullis { process, grpc, http, forward_auth, admin, dir })
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
}

/// The process: its log, signals, exit.
impl std::ops::Deref for Portcullis {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Portcullis {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}
