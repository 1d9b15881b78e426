//! What the harness does the same for each of its own binaries (portcullis, portcullis-shim):
//! build it once per test run, run it with JSON logs on stderr, keep every log line, wait for
//! the line that says where it listens, signal it and wait for its exit.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{READY_DEADLINE, lock, workspace_root};

/// Builds the workspace's binaries (debug) and returns the path of `bin`. The command is the one `scripts/test.sh` runs before the tests
/// (`cargo build --workspace --bins`), so here it finds everything fresh: a narrower
/// `-p package` build would resolve a different feature set for the shared dependencies and
/// compile a second copy of all of them (about 1.2 GB and two minutes on a clean CI machine).
/// Runs cargo without the variables it sets for this test crate: a build script that reads one
/// (ring's reads CARGO_MANIFEST_DIR) would otherwise see it change between this build and every
/// other, and rebuild itself and all that depends on it (about 20 s a test binary).
pub fn build_bin(bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "--workspace", "--bins"]).current_dir(workspace_root());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if ["CARGO_MANIFEST_", "CARGO_PKG_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_", "CARGO_TARGET_TMPDIR"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            build.env_remove(name.as_ref());
        }
    }
    let status = build.status().unwrap_or_else(|e| panic!("running cargo build for the {bin} binary: {e}"));
    assert!(status.success(), "cargo build --workspace --bins failed (wanted {bin})");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let path = target.join("debug").join(bin);
    assert!(path.is_file(), "no {bin} binary at {}", path.display());
    path
}

/// A running binary of ours and every line it logged.
pub struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    name: &'static str,
}

impl Process {
    /// Spawns `cmd` (stderr piped, killed on drop) and waits until `ready` finds what it needs in
    /// one of its JSON log lines.
    pub async fn spawn<T: Send + 'static>(
        name: &'static str,
        mut cmd: Command,
        ready: impl Fn(&serde_json::Value) -> Option<T> + Send + 'static,
    ) -> anyhow::Result<(Process, T)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        let stderr = child.stderr.take().with_context(|| format!("{name} stderr"))?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut tx = Some(tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.is_some()
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && let Some(found) = ready(&v)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(found);
                    }
                    lock(&logs).push(line);
                }
            });
        }
        match tokio::time::timeout(READY_DEADLINE, rx).await {
            Ok(Ok(found)) => Ok((Process { child, logs, name }, found)),
            _ => {
                // let the reader take the last lines of a process that exited
                let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!("{name} did not report its addresses; its log:\n{}", lock(&logs).join("\n"))
            }
        }
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
                bail!("no {} log line for {what}; the log:\n{}", self.name, self.logs().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a Unix signal by name (HUP, TERM) with kill(1).
    pub async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("{} has exited", self.name))?;
        let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().await?;
        anyhow::ensure!(status.success(), "kill -{sig} {pid} failed");
        Ok(())
    }

    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let name = self.name;
        Ok(tokio::time::timeout(within, self.child.wait())
            .await
            .with_context(|| format!("{name} did not exit in time"))??)
    }
}
