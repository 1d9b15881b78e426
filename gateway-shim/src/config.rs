//! The shim's YAML configuration: raw serde structs (`deny_unknown_fields`), validated into
//! `Config`; durations (`500ms`, `10s`, `5m`, `1h`, `30d`, `1y`) and sizes (`64KiB`, `10MB`) as
//! human strings. Errors name the file, the line and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Envoy's default `max_request_headers_kb` (60 KiB): header bytes above it get 431.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 60 << 10;
/// Envoy's default `max_request_headers_count`.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Request bodies above this get 413 (Envoy buffers nothing by default; 10 MiB is a sane cap).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 << 20;
/// Time a client has to send a whole request head (slowloris), as Envoy's `request_headers_timeout`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time between two pieces of a request body before 408.
pub const DEFAULT_IDLE_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Envoy's default `stream_idle_timeout` (5 minutes): a response or a WebSocket tunnel in which
/// nothing moved for this long is closed, and its lease no longer renewed.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's default cluster `connect_timeout` is 5 s; ours is shorter, an upstream is near.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Envoy's default route timeout (15 s), until the upstream's response headers.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Above portcullis's default `traffic.queue_timeout` (30 s), like the example Envoy config.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(31);
/// A third of portcullis's default `traffic.lease_ttl` (60 s): a request still running renews its
/// lease this often (`Decision/RenewLease`), then at a third of the life the renewal gives.
pub const DEFAULT_LEASE_RENEW_INTERVAL: Duration = Duration::from_secs(20);
/// The example Envoy config's ratelimit filter timeout.
pub const DEFAULT_RATELIMIT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long SIGTERM waits for in-flight requests before closing them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the certificate and key files are looked at.
pub const DEFAULT_CERT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// A certificate this close to expiry is warned about...
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);
/// ...and this close, logged at error.
pub const DEFAULT_EXPIRY_CRITICAL: Duration = Duration::from_secs(7 * 86_400);
/// HSTS `max-age` (RFC 6797): one year, the least the preload list accepts.
pub const MIN_HSTS_MAX_AGE: Duration = Duration::from_secs(31_536_000);

/// A configuration that was refused: the file, the line when known, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}:{line}: {reason}")]
    Invalid { file: String, line: usize, reason: String },
    #[error("{file}: {reason}")]
    Field { file: String, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: RawListen,
    tls: RawTls,
    #[serde(default)]
    hsts: RawHsts,
    #[serde(default)]
    plain_http: RawPlain,
    portcullis: RawPortcullis,
    upstream: RawUpstream,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    routes: RawRoutes,
    #[serde(default)]
    audit: RawAudit,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    https: String,
    http: Option<String>,
    metrics: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    require_client_certificate: bool,
    reload_interval: Option<String>,
    expiry_warning: Option<String>,
    expiry_critical: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsts {
    max_age: Option<String>,
    include_subdomains: Option<bool>,
    #[serde(default)]
    preload: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlain {
    mode: Option<String>,
    redirect_host: Option<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortcullis {
    address: String,
    timeout: Option<String>,
    #[serde(default)]
    failure_mode_allow: bool,
    ratelimit: Option<RawRatelimit>,
    lease_renew_interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRatelimit {
    domain: String,
    timeout: Option<String>,
    #[serde(default = "yes")]
    failure_mode_deny: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: String,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    pins: Vec<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    #[serde(default)]
    http2: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    trusted_proxies: Vec<String>,
    credential_headers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<String>,
    max_headers: Option<usize>,
    max_body_bytes: Option<String>,
    header_read_timeout: Option<String>,
    idle_body_timeout: Option<String>,
    stream_idle_timeout: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoutes {
    #[serde(default)]
    websocket: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
}

/// What the plain-HTTP listener does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainMode {
    /// 403 with a JSON body: a credential sent in clear is already exposed, so nothing is
    /// forwarded and no redirect teaches the client that plain HTTP works.
    Reject,
    /// 308 to `https://<redirect_host><path and query>`.
    Redirect,
}

/// The plain-HTTP listener's settings (`plain_http`).
#[derive(Debug, Clone)]
pub struct Plain {
    pub mode: PlainMode,
    /// The host redirects go to (`plain_http.redirect_host`), unless the request's Host is one
    /// of `allowed_hosts`.
    pub redirect_host: Option<String>,
    pub allowed_hosts: Vec<String>,
}

/// The server certificate (`tls`).
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    pub require_client_certificate: bool,
    pub reload_interval: Duration,
    pub expiry_warning: Duration,
    pub expiry_critical: Duration,
}

/// The upstream every allowed request goes to (`upstream`).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http://host:port` or `https://host:port` (a path prefix is not supported).
    pub url: hyper::Uri,
    pub https: bool,
    pub ca_file: Option<PathBuf>,
    /// SHA-256 digests of the SubjectPublicKeyInfo the upstream's leaf certificate may have
    /// (any one of them), from `sha256//<base64>` strings (curl's `--pinnedpubkey` form).
    pub pins: Vec<[u8; 32]>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// HTTP/2 to the upstream: prior knowledge over `http://`, ALPN `h2` only over `https://`.
    pub http2: bool,
}

/// The ratelimit call made after an allowed Check (`portcullis.ratelimit`), with descriptors
/// built like the example Envoy route's.
#[derive(Debug, Clone)]
pub struct Ratelimit {
    pub domain: String,
    pub timeout: Duration,
    pub failure_mode_deny: bool,
}

/// Where and how portcullis is asked (`portcullis`).
#[derive(Debug, Clone)]
pub struct Portcullis {
    /// The gRPC endpoint, `http://host:port` (HTTP/2 without TLS).
    pub address: String,
    pub timeout: Duration,
    pub failure_mode_allow: bool,
    pub ratelimit: Option<Ratelimit>,
    /// How long a request may hold its lease before the first `RenewLease`.
    pub lease_renew_interval: Duration,
}

/// Request limits (`limits`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: u64,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub idle_body_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub drain_timeout: Duration,
}

/// HSTS (RFC 6797) on every HTTPS response.
#[derive(Debug, Clone)]
pub struct Hsts {
    /// The whole `Strict-Transport-Security` value.
    pub value: hyper::header::HeaderValue,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub tls: Tls,
    pub hsts: Hsts,
    pub plain: Plain,
    pub portcullis: Portcullis,
    pub upstream: Upstream,
    pub trusted_proxies: Vec<IpNet>,
    /// Headers that carry credentials (lower-case): a `Connection` header never removes them,
    /// and the plain listener records whether one was present (default `authorization`,
    /// `x-api-key`: set the policy's `api_keys.header` here if it differs).
    pub credential_headers: Vec<String>,
    pub limits: Limits,
    /// Path prefixes on which a WebSocket upgrade may go through (after the decision).
    pub websocket: Vec<String>,
    /// A JSON-lines file for the shim's own events (`insecure_request`); unset: the log.
    pub audit_path: Option<PathBuf>,
}

/// Parses `500ms`, `10s`, `5m`, `2h`, `30d`, `1y` (365 days).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 5m, 30d)"))?;
    let ms = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "y" => 31_536_000_000,
        _ => return Err(format!("{s:?} is not a duration (units: ms, s, m, h, d, y)")),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(|| format!("{s:?} is too long"))
}

/// Parses `512`, `16KB`, `64KiB`, `10MB`, `1MiB` into bytes (KB = 1000, KiB = 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 64KiB, 10MB)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        _ => return Err(format!("{s:?} is not a size (units: B, KB, KiB, MB, MiB, GB, GiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Parses one `sha256//<base64 of the SPKI's SHA-256>` pin.
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let b64 = s.strip_prefix("sha256//").ok_or_else(|| format!("pin {s:?}: expected sha256//<base64>"))?;
    let raw =
        base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| format!("pin {s:?}: not base64 ({e})"))?;
    raw.try_into().map_err(|_| format!("pin {s:?}: a SHA-256 digest is 32 bytes"))
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Config::parse(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths in it are relative to `path`'s
    /// folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let raw: Raw = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.clone(),
            line: e.location().map_or(0, |l| l.line()),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        validate(raw, path, base).map_err(|reason| ConfigError::Field { file, reason })
    }
}

fn duration(field: &str, v: Option<&String>, default: Duration) -> Result<Duration, String> {
    v.map_or(Ok(default), |s| parse_duration(s).map_err(|e| format!("{field}: {e}")))
}

fn addr(field: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("{field}: {s:?} is not an address like 0.0.0.0:8443"))
}

fn relative(base: &Path, p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { base.join(p) }
}

fn validate(raw: Raw, path: &Path, base: &Path) -> Result<Config, String> {
    let https = addr("listen.https", &raw.listen.https)?;
    let http = raw.listen.http.as_deref().map(|s| addr("listen.http", s)).transpose()?;
    let metrics = raw.listen.metrics.as_deref().map(|s| addr("listen.metrics", s)).transpose()?;
    let mut ports = vec![https];
    for a in http.iter().chain(metrics.iter()) {
        if a.port() != 0
            && ports.iter().any(|p| {
                p.port() == a.port() && (p.ip() == a.ip() || p.ip().is_unspecified() || a.ip().is_unspecified())
            })
        {
            return Err(format!("listen: {a} is used twice"));
        }
        ports.push(*a);
    }

    let t = raw.tls;
    let tls = Tls {
        cert_file: relative(base, t.cert_file),
        key_file: relative(base, t.key_file),
        client_ca_file: t.client_ca_file.map(|p| relative(base, p)),
        require_client_certificate: t.require_client_certificate,
        reload_interval: duration("tls.reload_interval", t.reload_interval.as_ref(), DEFAULT_CERT_RELOAD_INTERVAL)?,
        expiry_warning: duration("tls.expiry_warning", t.expiry_warning.as_ref(), DEFAULT_EXPIRY_WARNING)?,
        expiry_critical: duration("tls.expiry_critical", t.expiry_critical.as_ref(), DEFAULT_EXPIRY_CRITICAL)?,
    };
    if tls.require_client_certificate && tls.client_ca_file.is_none() {
        return Err("tls.require_client_certificate: needs tls.client_ca_file".into());
    }
    if tls.reload_interval < Duration::from_millis(100) {
        return Err("tls.reload_interval: at least 100ms".into());
    }
    if tls.expiry_critical > tls.expiry_warning {
        return Err("tls.expiry_critical: must not exceed tls.expiry_warning".into());
    }

    let max_age = duration("hsts.max_age", raw.hsts.max_age.as_ref(), MIN_HSTS_MAX_AGE)?;
    if max_age < MIN_HSTS_MAX_AGE {
        return Err(
            "hsts.max_age: at least 1y (31536000 seconds), as RFC 6797 deployments and the preload list expect".into(),
        );
    }
    let include_subdomains = raw.hsts.include_subdomains.unwrap_or(false);
    if raw.hsts.preload && !include_subdomains {
        return Err("hsts.preload: needs hsts.include_subdomains: true (the preload list requires it)".into());
    }
    let mut hsts = format!("max-age={}", max_age.as_secs());
    if include_subdomains {
        hsts.push_str("; includeSubDomains");
    }
    if raw.hsts.preload {
        hsts.push_str("; preload");
    }

    let mode = match raw.plain_http.mode.as_deref() {
        None | Some("reject") => PlainMode::Reject,
        Some("redirect") => PlainMode::Redirect,
        Some(other) => return Err(format!("plain_http.mode: {other:?} is not reject or redirect")),
    };
    for h in raw.plain_http.redirect_host.iter().chain(&raw.plain_http.allowed_hosts) {
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)) {
            return Err(format!("plain_http: {h:?} is not a host name (letters, digits, '-', '.', a port)"));
        }
    }
    if mode == PlainMode::Redirect && raw.plain_http.redirect_host.is_none() {
        return Err("plain_http.redirect_host: required with mode redirect (the Host header is never reflected)".into());
    }
    if raw.listen.http.is_some() && raw.plain_http.mode.is_none() {
        tracing::info!("plain_http.mode unset: the plain listener rejects every request (403)");
    }
    let plain = Plain {
        mode,
        redirect_host: raw.plain_http.redirect_host,
        allowed_hosts: raw.plain_http.allowed_hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect(),
    };

    let p = raw.portcullis;
    if p.lease_renew_interval
        .as_deref()
        .and_then(|d| parse_duration(d).ok())
        .is_some_and(|d| d < Duration::from_millis(100))
    {
        return Err("portcullis.lease_renew_interval: at least 100ms".into());
    }
    if !p.address.starts_with("http://") {
        return Err(format!(
            "portcullis.address: {:?} must be http://host:port (the shim speaks plain HTTP/2 to portcullis: run them side by side, in one pod or on a private network)",
            p.address
        ));
    }
    if p.timeout.as_deref().and_then(|d| parse_duration(d).ok()).is_some_and(|d| d < Duration::from_millis(10)) {
        return Err("portcullis.timeout: at least 10ms".into());
    }
    let portcullis = Portcullis {
        address: p.address,
        timeout: duration("portcullis.timeout", p.timeout.as_ref(), DEFAULT_CHECK_TIMEOUT)?,
        failure_mode_allow: p.failure_mode_allow,
        lease_renew_interval: duration(
            "portcullis.lease_renew_interval",
            p.lease_renew_interval.as_ref(),
            DEFAULT_LEASE_RENEW_INTERVAL,
        )?,
        ratelimit: p
            .ratelimit
            .map(|r| -> Result<Ratelimit, String> {
                if r.domain.is_empty() {
                    return Err("portcullis.ratelimit.domain: required".into());
                }
                Ok(Ratelimit {
                    domain: r.domain,
                    timeout: duration("portcullis.ratelimit.timeout", r.timeout.as_ref(), DEFAULT_RATELIMIT_TIMEOUT)?,
                    failure_mode_deny: r.failure_mode_deny,
                })
            })
            .transpose()?,
    };

    let u = raw.upstream;
    let url: hyper::Uri = u.url.parse().map_err(|e| format!("upstream.url: {:?}: {e}", u.url))?;
    let https_up = match url.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("upstream.url: {:?} must start with http:// or https://", u.url)),
    };
    if url.host().is_none() {
        return Err(format!("upstream.url: {:?} has no host", u.url));
    }
    if url.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err(format!("upstream.url: {:?}: a path is not supported (requests keep theirs)", u.url));
    }
    if !https_up && (u.ca_file.is_some() || !u.pins.is_empty()) {
        return Err("upstream: ca_file and pins need an https:// url".into());
    }
    let pins = u
        .pins
        .iter()
        .map(|p| parse_pin(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("upstream.pins: {e}"))?;
    for (field, d) in
        [("upstream.connect_timeout", &u.connect_timeout), ("upstream.response_timeout", &u.response_timeout)]
    {
        if d.as_deref().and_then(|d| parse_duration(d).ok()).is_some_and(|d| d < Duration::from_millis(10)) {
            return Err(format!("{field}: at least 10ms"));
        }
    }
    let upstream = Upstream {
        url,
        https: https_up,
        ca_file: u.ca_file.map(|p| relative(base, p)),
        pins,
        connect_timeout: duration("upstream.connect_timeout", u.connect_timeout.as_ref(), DEFAULT_CONNECT_TIMEOUT)?,
        response_timeout: duration("upstream.response_timeout", u.response_timeout.as_ref(), DEFAULT_RESPONSE_TIMEOUT)?,
        http2: u.http2,
    };

    let trusted_proxies = raw
        .network
        .trusted_proxies
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| format!("network.trusted_proxies: {s:?} is not an address or CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let credential_headers: Vec<String> = raw
        .network
        .credential_headers
        .unwrap_or_else(|| vec!["authorization".into(), "x-api-key".into()])
        .into_iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if let Some(bad) = credential_headers
        .iter()
        .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return Err(format!("network.credential_headers: {bad:?} is not a header name"));
    }
    let l = raw.limits;
    let size = |field: &str, v: Option<&String>, default: u64| -> Result<u64, String> {
        v.map_or(Ok(default), |s| parse_size(s).map_err(|e| format!("{field}: {e}")))
    };
    let limits = Limits {
        max_header_bytes: size("limits.max_header_bytes", l.max_header_bytes.as_ref(), DEFAULT_MAX_HEADER_BYTES)?,
        max_headers: l.max_headers.unwrap_or(DEFAULT_MAX_HEADERS),
        max_body_bytes: size("limits.max_body_bytes", l.max_body_bytes.as_ref(), DEFAULT_MAX_BODY_BYTES)?,
        header_read_timeout: duration(
            "limits.header_read_timeout",
            l.header_read_timeout.as_ref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        )?,
        idle_body_timeout: duration(
            "limits.idle_body_timeout",
            l.idle_body_timeout.as_ref(),
            DEFAULT_IDLE_BODY_TIMEOUT,
        )?,
        stream_idle_timeout: duration(
            "limits.stream_idle_timeout",
            l.stream_idle_timeout.as_ref(),
            DEFAULT_STREAM_IDLE_TIMEOUT,
        )?,
        drain_timeout: duration("limits.drain_timeout", l.drain_timeout.as_ref(), DEFAULT_DRAIN_TIMEOUT)?,
    };
    for (field, d) in [
        ("limits.header_read_timeout", limits.header_read_timeout),
        ("limits.idle_body_timeout", limits.idle_body_timeout),
        ("limits.stream_idle_timeout", limits.stream_idle_timeout),
    ] {
        if d < Duration::from_millis(100) {
            return Err(format!("{field}: at least 100ms"));
        }
    }
    if !(1024..=(1 << 20)).contains(&limits.max_header_bytes) {
        return Err("limits.max_header_bytes: between 1KiB and 1MiB".into());
    }
    if !(1..=1000).contains(&limits.max_headers) {
        return Err("limits.max_headers: between 1 and 1000".into());
    }
    for r in &raw.routes.websocket {
        if !r.starts_with('/') {
            return Err(format!("routes.websocket: {r:?} is not a path prefix starting with /"));
        }
    }

    Ok(Config {
        file: path.to_path_buf(),
        https,
        http,
        metrics,
        tls,
        hsts: Hsts {
            value: hyper::header::HeaderValue::from_str(&hsts).map_err(|_| "hsts: not a header value".to_owned())?,
        },
        plain,
        portcullis,
        upstream,
        trusted_proxies,
        credential_headers,
        limits,
        websocket: raw.routes.websocket,
        audit_path: raw.audit.path.map(|p| relative(base, p)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: { https: 127.0.0.1:8443 }\ntls: { cert_file: c.pem, key_file: k.pem }\nportcullis: { address: http://127.0.0.1:8081 }\nupstream: { url: http://127.0.0.1:8080 }\n";

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/shim/shim.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_minimal_file_gets_the_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.tls.cert_file, Path::new("/etc/shim/c.pem"));
        assert_eq!(c.plain.mode, PlainMode::Reject);
        assert_eq!(c.hsts.value, "max-age=31536000");
        assert!(!c.portcullis.failure_mode_allow);
        assert_eq!(c.limits.max_header_bytes, 60 << 10);
        assert_eq!(c.portcullis.timeout, Duration::from_secs(31));
    }

    #[test]
    fn the_shipped_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/shim.yaml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.plain.mode, PlainMode::Redirect);
        assert_eq!(c.portcullis.ratelimit.map(|r| r.domain).as_deref(), Some("edge"));
        assert_eq!(c.https.port(), 8443);
    }

    #[test]
    fn durations_sizes_and_pins() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("16KB"), Ok(16_000));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_pin("sha256//AAAA").unwrap_err().contains("32 bytes"));
        assert!(parse_pin("md5//AAAA").is_err());
        assert_eq!(parse_pin("sha256//47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap()[0], 0xe3);
    }

    #[test]
    fn mistakes_are_refused_with_the_line_or_the_field() {
        let e = parse(&format!("{MINIMAL}upstream_typo: 1\n")).unwrap_err();
        assert!(e.starts_with("/etc/shim/shim.yaml:5:"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
        let e = parse(&MINIMAL.replace("http://127.0.0.1:8080", "ftp://x")).unwrap_err();
        assert!(e.contains("upstream.url"), "{e}");
        let e = parse(&format!("{MINIMAL}plain_http: {{ mode: redirect }}\n")).unwrap_err();
        assert!(e.contains("redirect_host"), "{e}");
        let e = parse(&format!("{MINIMAL}hsts: {{ max_age: 1d }}\n")).unwrap_err();
        assert!(e.contains("hsts.max_age"), "{e}");
        let e = parse(&format!("{MINIMAL}hsts: {{ preload: true }}\n")).unwrap_err();
        assert!(e.contains("include_subdomains"), "{e}");
        let e = parse(&MINIMAL.replace("http://127.0.0.1:8080 }", "http://127.0.0.1:8080, pins: [sha256//x] }"))
            .unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = parse(&format!("{MINIMAL}network: {{ trusted_proxies: [nope] }}\n")).unwrap_err();
        assert!(e.contains("trusted_proxies"), "{e}");
    }
}
