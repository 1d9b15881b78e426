//! Redis for the tests: a redis-server of the test's own, or a Redis Cluster made by
//! `redis-cli --cluster create`, on free loopback ports; killed when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use crate::workspace_root;

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

pub(crate) fn free_port() -> u16 {
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
