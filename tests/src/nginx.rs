//! A real nginx (Debian's package) in front of an upstream, asking portcullis's forward-auth
//! listener with `auth_request`, configured as the README's "Forward-auth" section shows.
//! Killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::redis::free_port;
use crate::{READY_DEADLINE, TempDir};

/// The nginx binary: `$PORTCULLIS_NGINX`, else /usr/sbin/nginx or PATH. Missing, the test
/// fails with what to do; it never skips.
pub fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_NGINX") {
        return PathBuf::from(p);
    }
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.is_file() {
        return debian;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("nginx");
        if p.is_file() {
            return p;
        }
    }
    panic!("no nginx binary found: run scripts/test.sh (it installs Debian's nginx-light), or set PORTCULLIS_NGINX");
}

/// The nginx server block of the README, with `{auth}` and `{upstream}` to fill in.
pub const NGINX_SITE: &str = r#"
    location / {
        auth_request /_portcullis;
        # what portcullis answered, for the upstream and for the mapping of denials below
        auth_request_set $pc_status $upstream_http_x_portcullis_status;
        auth_request_set $pc_subject $upstream_http_x_portcullis_subject;
        auth_request_set $pc_tier $upstream_http_x_portcullis_tier;
        auth_request_set $pc_roles $upstream_http_x_portcullis_roles;
        auth_request_set $pc_ratelimit $upstream_http_ratelimit;
        auth_request_set $pc_retry_after $upstream_http_retry_after;
        proxy_set_header X-Portcullis-Subject $pc_subject;
        proxy_set_header X-Portcullis-Tier $pc_tier;
        proxy_set_header X-Portcullis-Roles $pc_roles;
        add_header RateLimit $pc_ratelimit always;
        error_page 403 = @portcullis_denied;
        proxy_pass http://{upstream};
    }

    location = /_portcullis {
        internal;
        proxy_pass http://{auth}/v1/forward-auth/nginx;
        proxy_pass_request_body off;
        proxy_set_header Content-Length "";
        proxy_set_header X-Original-URI $request_uri;
        proxy_set_header X-Original-Method $request_method;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }

    # nginx turns any auth status but 401 and 403 into 500: portcullis answers those as 403
    # with the real status in x-portcullis-status, restored here
    location @portcullis_denied {
        add_header Retry-After $pc_retry_after always;
        if ($pc_status = 429) { return 429 '{"status":429,"error":"Rate limit exceeded"}'; }
        if ($pc_status = 503) { return 503 '{"status":503,"error":"Service unavailable"}'; }
        if ($pc_status = 400) { return 400 '{"status":400,"error":"Bad request"}'; }
        if ($pc_status = 413) { return 413 '{"status":413,"error":"Payload too large"}'; }
        if ($pc_status = 431) { return 431 '{"status":431,"error":"Request header fields too large"}'; }
        return 403 '{"status":403,"error":"Forbidden"}';
    }
"#;

/// A running nginx.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Nginx {
    /// nginx on a free loopback port, checking every request with portcullis's forward-auth
    /// listener at `auth` and proxying allowed ones to `upstream`.
    pub async fn start(auth: SocketAddr, upstream: SocketAddr) -> anyhow::Result<Nginx> {
        let dir = TempDir::new("nginx");
        let port = free_port();
        let site = NGINX_SITE.replace("{auth}", &auth.to_string()).replace("{upstream}", &upstream.to_string());
        let conf = format!(
            "worker_processes 1;\npid {dir}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 256; }}\n\
             http {{\n    access_log off;\n    client_body_temp_path {dir}/body;\n    proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n    uwsgi_temp_path {dir}/uwsgi;\n    scgi_temp_path {dir}/scgi;\n\
             default_type application/json;\n    server {{\n    listen 127.0.0.1:{port};\n{site}\n    }}\n}}\n",
            dir = dir.0.display()
        );
        std::fs::write(dir.0.join("nginx.conf"), conf)?;
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(&dir.0)
            .arg("-c")
            .arg(dir.0.join("nginx.conf"))
            .args(["-g", "daemon off; master_process off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning nginx")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("nginx did not listen on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Nginx { child, addr, _dir: dir })
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}
