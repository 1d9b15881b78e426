//! End-to-end harness: real processes on loopback ports chosen by the OS. `Portcullis` runs the
//! real binary (rebuilt first if stale), `Envoy` the real Envoy binary with the shipped
//! `deploy/examples/envoy.yaml` (ports rewritten), `Upstream` a small HTTP server in the test
//! process that records what reached it. Everything is killed when dropped.

// A test harness reads PATH, HOME and CARGO to find its tools.
#![allow(clippy::disallowed_methods)]

mod envoy;
mod http;
mod issuer;
mod nginx;
mod portcullis;
mod process;
mod proxies;
mod redis;
mod shim;
mod upstream;

pub use envoy::{Envoy, Stack, envoy_bin};
pub use http::{HttpClient, Response, raw_status};
pub use issuer::{Introspection, TestIssuer, b64};
pub use nginx::{NGINX_SITE, Nginx, nginx_bin};
pub use portcullis::{Portcullis, check_request, denied_status, portcullis_bin};
pub use process::{Process, build_bin};
pub use proxies::{CADDY_SITE, Proxy, TRAEFIK_MIDDLEWARE};
pub use redis::{RedisCluster, RedisServer};
pub use shim::{
    Certs, CurlResponse, Shim, ShimDir, TlsUpstream, curl, openssl, raw_tls, shim_bin, shim_config, spki_pin,
};
pub use upstream::{Seen, Upstream};

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

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

/// The reference policy with its `traffic:` section (up to `limits:`) replaced by `section`,
/// which starts with `traffic:` and ends with a newline.
pub fn reference_policy_with_traffic(section: &str) -> String {
    let mut policy = reference_policy();
    let start = policy.find("traffic:").expect("the reference policy's traffic section");
    let end = policy.find("\nlimits:").expect("the reference policy's limits section");
    policy.replace_range(start..end, section);
    policy
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

/// The Python with grpcio and grpcio-tools that `scripts/test.sh` installs (a gRPC client that
/// is not ours): `$PORTCULLIS_PYTHON`, else the test virtualenv's. Missing, the test fails with
/// what to do; it never skips.
pub fn grpc_python() -> PathBuf {
    let python = match std::env::var_os("PORTCULLIS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/portcullis/venv/bin/python"),
    };
    let ok = std::process::Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import grpc and grpc_tools: run scripts/test.sh (it installs grpcio and grpcio-tools into ~/.cache/portcullis/venv), or set PORTCULLIS_PYTHON",
        python.display()
    );
    python
}

/// The Python with sslyze (PyPI) that `scripts/test.sh` installs into the test virtualenv, for
/// the TLS scan against Mozilla's profiles. Missing, the test fails with what to do.
pub fn sslyze_python() -> PathBuf {
    let python = match std::env::var_os("PORTCULLIS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/portcullis/venv/bin/python"),
    };
    let ok =
        std::process::Command::new(&python).args(["-c", "import sslyze"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{} cannot import sslyze: run scripts/test.sh (it installs sslyze into ~/.cache/portcullis/venv), or set PORTCULLIS_PYTHON",
        python.display()
    );
    python
}

/// The reference policy's demo keys the request matrix uses (their comments in policy.yaml).
pub const DEMO_BASIC_KEY: &str = "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo";
pub const DEMO_SERVICE_KEY: &str = "pk_demo_service_k1-mDUeWOB7yj39g_aZ3tBG8";
pub const DEMO_ADMIN_KEY: &str = "pk_demo_admin_dgBU1nZu-FWNNXcyKorzEKKe";

/// One request of the matrix: client address, method, path, API key.
pub type MatrixRequest = (&'static str, &'static str, &'static str, Option<&'static str>);

/// The request matrix every front door is compared on, asked in order of one fresh instance on
/// the reference policy: allowed, 401 (unknown key, none), 403 (role, zone, deny list), 401
/// (an API key on a sensitive route), a public route, then 11 from an untrusted address (10 a
/// minute: ten 200s, then 429). `MATRIX_STATUSES` is what each gets.
pub fn request_matrix() -> Vec<MatrixRequest> {
    let mut m = vec![
        ("10.0.0.1", "GET", "/api/v1/items", Some(DEMO_BASIC_KEY)),
        ("10.0.0.1", "GET", "/api/v1/items", Some("pk_unknown")),
        ("10.0.0.1", "GET", "/api/v1/items", None),
        ("10.0.0.1", "POST", "/api/v1/items", Some(DEMO_BASIC_KEY)),
        ("203.0.113.5", "GET", "/internal/x", Some(DEMO_SERVICE_KEY)),
        ("198.51.100.7", "GET", "/api/v1/items", Some(DEMO_BASIC_KEY)),
        ("10.0.0.1", "GET", "/admin/users", Some(DEMO_ADMIN_KEY)),
        ("10.0.0.1", "GET", "/health", None),
    ];
    m.extend(std::iter::repeat_n(("8.8.8.8", "GET", "/api/v1/items", Some(DEMO_BASIC_KEY)), 11));
    m
}

/// The statuses of `request_matrix`, in order.
pub const MATRIX_STATUSES: [u16; 19] =
    [200, 401, 401, 403, 403, 403, 401, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 429];
