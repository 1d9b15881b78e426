//! Configuration: the YAML policy file (validated into the core's `Policy`) and the deployment
//! knobs, which come from flags or these environment variables (read by clap):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `PORTCULLIS_CONFIG` | the policy file | (required) |
//! | `PORTCULLIS_GRPC_ADDR` | gRPC listen address, overrides `listen.grpc` | `127.0.0.1:8081` |
//! | `PORTCULLIS_HTTP_ADDR` | admin HTTP listen address, overrides `listen.http` | `127.0.0.1:9102` |
//! | `PORTCULLIS_FORWARD_AUTH_ADDR` | HTTP forward-auth listen address, overrides (and turns on) `listen.forward_auth` | off |
//! | `PORTCULLIS_REDIS_URL` | overrides `store.redis.url` (a Secret: it may hold a password) | the policy's |
//! | `PORTCULLIS_KEY_PEPPER` | the store-held API keys' pepper (at least 16 bytes; environment only) | none |
//! | `PORTCULLIS_LOG_FORMAT` | `json` or `pretty` | `pretty` |
//! | `PORTCULLIS_LOG` | log filter (tracing's `EnvFilter` syntax) | `info` |
//! | `PORTCULLIS_ADMIN_ADDR` | `portcullis admin`: the admin API's address | `127.0.0.1:8083` |
//! | `PORTCULLIS_ADMIN_TOKEN` | `portcullis admin`: the admin token (or `--token-file`) | none |
//!
//! Raw serde structs (`raw`) stop here: `validate` turns them into domain types and reports
//! every problem it finds, each with its field path and line.

mod access;
mod admin;
mod alerts;
mod audit;
mod bearer;
mod lines;
mod network;
pub mod ratelimit;
pub mod raw;
mod store;
mod traffic;

pub use access::{DEFAULT_API_KEY_HEADER, DEFAULT_ROLES, DEFAULT_TIERS};
pub use audit::{DEFAULT_CHECKPOINT_EVERY, DEFAULT_SINK_QUEUE};
pub use bearer::{
    DEFAULT_INTROSPECTION_CACHE_TTL, DEFAULT_INTROSPECTION_TIMEOUT, DEFAULT_JWKS_COOLDOWN, DEFAULT_JWKS_REFRESH,
    DEFAULT_JWKS_TIMEOUT, DEFAULT_JWT_LEEWAY, DEFAULT_JWT_TIER, JWT_ALGORITHMS, MAX_JWT_LEEWAY,
};
pub use network::{DEFAULT_ZONE_LIMIT_TRUSTED, DEFAULT_ZONE_LIMIT_UNTRUSTED};
pub use store::{
    DEFAULT_OVER_LIMIT_CACHE, DEFAULT_REDIS_POOL_SIZE, DEFAULT_REDIS_TIMEOUT, MAX_OVER_LIMIT_CACHE,
    MAX_REDIS_POOL_SIZE, StoreSettings,
};
pub use traffic::{
    DEFAULT_BREAKER_WINDOW, DEFAULT_CONCURRENCY_LIMIT, DEFAULT_ERROR_THRESHOLD, DEFAULT_LEASE_TTL,
    DEFAULT_MIN_REQUESTS, DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT, DEFAULT_RESET_TIMEOUT,
};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use decision_core::policy::{HeaderDialect, OnStoreError, Policy, Precedence};
use decision_core::units;
use sha2::{Digest, Sha256};

use crate::auth::AuthMetrics;
use lines::LineIndex;
use raw::RawPolicy;

pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8081";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9102";
/// Where `listen.forward_auth` would listen if its address did not parse (it is then refused).
pub const DEFAULT_FORWARD_AUTH_ADDR: &str = "127.0.0.1:8082";
/// How often the policy's files are checked for a change (`reload.interval`).
pub const DEFAULT_RELOAD_INTERVAL: &str = "500ms";
pub const DEFAULT_MAX_BODY: &str = "5MB";
pub const DEFAULT_MAX_HEADER_BYTES: &str = "16KB";
pub const DEFAULT_QUOTA_WARNING: &str = "80%";
/// Largest policy file read (a policy is configuration, not data).
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

/// A secret from the environment (the policy names the variable, never the secret).
#[allow(clippy::disallowed_methods)]
fn env_secret(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// One thing wrong with a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// the file, when not the policy file itself (a ratelimit file)
    pub file: Option<PathBuf>,
    /// field path in serde_yaml notation, e.g. `routes[3].allow_roles[0]` (empty: the file)
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

/// A policy file that was refused, with every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(f, "{}: {} problem{} found", self.file.display(), n, if n == 1 { "" } else { "s" })?;
        for p in &self.problems {
            write!(f, "  {}", p.file.as_deref().unwrap_or(&self.file).display())?;
            if let Some(l) = p.line {
                write!(f, ":{l}")?;
            }
            if p.path.is_empty() {
                writeln!(f, ": {}", p.message)?;
            } else {
                writeln!(f, ": {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

/// Deployment settings that live in the policy file but are not policy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// the HTTP forward-auth listener (`listen.forward_auth`); None: off
    pub forward_auth_addr: Option<SocketAddr>,
    /// gRPC server reflection (v1 and v1alpha) for `portcullis.v1` on the gRPC port
    /// (`listen.grpc_reflection`, off by default: it tells any caller what the port serves)
    pub grpc_reflection: bool,
    /// the admin API (`listen.admin` and `admin`); None: off
    pub admin: Option<crate::admin::AdminSettings>,
    /// how often the policy file and the files it names are checked for a change (`reload`);
    /// None: only SIGHUP reloads
    pub watch: Option<Duration>,
    /// the store-held API keys' pepper (`PORTCULLIS_KEY_PEPPER`, set by the command, never in
    /// the policy file)
    pub key_pepper: Option<crate::admin::keys::Pepper>,
    /// after SIGTERM, how long the service keeps answering with /readyz (and gRPC health) not
    /// ready before it drains (`listen.shutdown_delay`, default 0): longer than the time the
    /// endpoints take to drop it (Kubernetes: a few seconds; terminationGracePeriodSeconds must
    /// cover this and the drain)
    pub shutdown_delay: Duration,
    pub store: StoreSettings,
    /// None: no `audit` section, no audit trail
    pub audit: Option<crate::audit::AuditSettings>,
    /// None: no `alerts` section
    pub alerts: Option<crate::alerts::AlertSettings>,
}

/// A loaded, validated policy file.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    /// `sha256:<hex>` over the policy text and every file its loading read (ratelimit files,
    /// JWKS files, CA files), in the order read: two instances with the same version enforce
    /// the same policy
    pub version: String,
    /// every file the load read besides the policy file (ratelimit, JWKS, CA files), in order:
    /// what a reload watches
    pub sources: Vec<PathBuf>,
    pub policy: Arc<Policy>,
    pub settings: Settings,
    /// the counters the policy's bearer verifiers count into (register them once; pass them to
    /// `load_with` at a reload)
    pub auth_metrics: AuthMetrics,
}

/// Reads and validates a policy file; its bearer verifiers count into new counters.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    load_with(file, &AuthMetrics::default())
}

/// Reads and validates a policy file whose bearer verifiers count into `auth_metrics` (a
/// reload passes the running policy's, so the series go on). Errors: the file cannot be read,
/// is larger than `MAX_POLICY_BYTES`, or has problems (each with its line).
pub fn load_with(file: &Path, auth_metrics: &AuthMetrics) -> Result<Config, ConfigError> {
    let fail = |message: String| ConfigError {
        file: file.to_owned(),
        problems: vec![Problem { file: None, path: String::new(), line: None, message }],
    };
    let meta = std::fs::metadata(file).map_err(|e| fail(format!("cannot read the policy file: {e}")))?;
    if meta.len() > MAX_POLICY_BYTES {
        return Err(fail(format!("the policy file is {} bytes, more than the {MAX_POLICY_BYTES} allowed", meta.len())));
    }
    let text = std::fs::read_to_string(file).map_err(|e| fail(format!("cannot read the policy file: {e}")))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut cfg =
        parse_with(&text, base, auth_metrics).map_err(|problems| ConfigError { file: file.to_owned(), problems })?;
    cfg.file = file.to_owned();
    Ok(cfg)
}

/// Parses and validates policy text; `base` is the folder relative paths start from.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    parse_with(text, base, &AuthMetrics::default())
}

/// `parse`, with the counters the bearer verifiers count into.
pub fn parse_with(text: &str, base: &Path, auth_metrics: &AuthMetrics) -> Result<Config, Vec<Problem>> {
    let raw: RawPolicy = match serde_yaml_ng::from_str::<Option<RawPolicy>>(text) {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => return Err(vec![structural(&e)]),
    };
    let index = LineIndex::build(text);
    let mut v = Validator { problems: Vec::new(), index: &index, base, auth_metrics };
    SOURCES.with(|s| *s.borrow_mut() = Some((Sha256::new_with_prefix(text.as_bytes()), Vec::new())));
    let out = v.policy(raw);
    let (digest, sources) =
        SOURCES.with(|s| s.borrow_mut().take()).map(|(h, files)| (h.finalize(), files)).unwrap_or_default();
    let mut cfg = if v.problems.is_empty() { out.ok_or_else(Vec::new)? } else { return Err(v.problems) };
    cfg.version = format!("sha256:{}", decision_core::encode::hex(&digest));
    cfg.sources = sources;
    if let Some(p) = Arc::get_mut(&mut cfg.policy) {
        p.version = Arc::from(cfg.version.as_str());
    }
    Ok(cfg)
}

thread_local! {
    /// The digest of what the policy being loaded on this thread has read so far (`parse_with`
    /// starts it with the policy text; `read_source` adds every other file).
    static SOURCES: std::cell::RefCell<Option<(Sha256, Vec<PathBuf>)>> = const { std::cell::RefCell::new(None) };
}

/// Adds a file the policy being loaded made us read (its path, then its bytes) to its version.
pub(crate) fn read_source(path: &Path, bytes: &[u8]) {
    SOURCES.with(|s| {
        if let Some((h, files)) = s.borrow_mut().as_mut() {
            files.push(path.to_owned());
            h.update(path.as_os_str().as_encoded_bytes());
            h.update([0]);
            h.update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes());
            h.update(bytes);
        }
    });
}

/// A deserialization error: serde_yaml's message reads `path: message at line L column C`.
pub(crate) fn structural(e: &serde_yaml_ng::Error) -> Problem {
    let line = e.location().map(|l| l.line());
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    let (path, message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), msg),
    };
    Problem { file: None, path, line, message }
}

/// Turns the raw sections into domain types, one method per section (in the section's file),
/// collecting every problem with its field path and line.
struct Validator<'a> {
    problems: Vec<Problem>,
    index: &'a LineIndex,
    base: &'a Path,
    /// what the bearer verifiers it builds count into
    auth_metrics: &'a AuthMetrics,
}

impl Validator<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let line = self.index.line(&path);
        self.problems.push(Problem { file: None, path, line, message: message.into() });
    }

    fn parse<T, E: fmt::Display>(&mut self, path: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(path, e.to_string());
                None
            }
        }
    }

    fn addr(&mut self, path: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let s = value.unwrap_or(default);
        match s.parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    path,
                    format!("invalid listen address {s:?}: expected HOST:PORT with an IP, e.g. \"127.0.0.1:8081\""),
                );
                default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            }
        }
    }

    fn policy(&mut self, raw: RawPolicy) -> Option<Config> {
        let listen = raw.listen.unwrap_or_default();
        let store = self.store(raw.store.as_ref());
        let audit = raw.audit.as_ref().map(|a| self.audit(a, &store));
        let alerts = raw.alerts.as_ref().map(|a| self.alerts(a));
        let settings = Settings {
            grpc_addr: self.addr("listen.grpc", listen.grpc.as_deref(), DEFAULT_GRPC_ADDR),
            http_addr: self.addr("listen.http", listen.http.as_deref(), DEFAULT_HTTP_ADDR),
            forward_auth_addr: listen
                .forward_auth
                .as_deref()
                .map(|a| self.addr("listen.forward_auth", Some(a), DEFAULT_FORWARD_AUTH_ADDR)),
            grpc_reflection: listen.grpc_reflection.unwrap_or(false),
            admin: None,
            watch: self.reload_watch(raw.reload.as_ref()),
            key_pepper: None,
            shutdown_delay: self.duration("listen.shutdown_delay", listen.shutdown_delay.as_deref(), "0s"),
            store,
            audit,
            alerts,
        };
        let mut taken = vec![("listen.grpc", settings.grpc_addr), ("listen.http", settings.http_addr)];
        taken.extend(settings.forward_auth_addr.map(|a| ("listen.forward_auth", a)));
        let admin = self.admin(listen.admin.as_deref(), raw.admin.as_ref(), &taken);
        let settings = Settings { admin, ..settings };
        let on_store_error = match raw.on_store_error {
            Some(raw::RawOnStoreError::Allow) => OnStoreError::Allow,
            _ => OnStoreError::Deny,
        };

        let network = self.network(raw.network.unwrap_or_default());
        let roles = self.roles(raw.roles);
        let tiers = self.tiers(raw.tiers);
        let auth = raw.authentication.unwrap_or_default();
        let api_keys = self.api_keys(auth.api_keys.unwrap_or_default(), roles.as_ref(), &tiers);
        let jwt = self.jwt(&auth.jwt, roles.as_ref(), &tiers);
        let introspection =
            auth.oauth2_introspection.as_ref().and_then(|i| self.introspection(i, roles.as_ref(), &tiers));
        let bearer: Option<Arc<dyn decision_core::BearerVerifier>> = match (jwt, introspection) {
            (None, None) => None,
            (jwt, introspection) => Some(Arc::new(crate::auth::BearerRouter { jwt, introspection })),
        };
        let credential_precedence = auth.precedence.as_deref().and_then(|name| {
            self.parse(
                "authentication.precedence",
                Precedence::parse(name).ok_or_else(|| format!("unknown credential {name:?} (api_key or bearer)")),
            )
        });
        let routes = self.routes(&raw.routes, roles.as_ref(), &network.zones);
        let quota_warning = raw.quota_warning.as_deref().unwrap_or(DEFAULT_QUOTA_WARNING);
        let quota_warning = self.parse("quota_warning", units::parse_percent(quota_warning));
        let limits = raw.limits.unwrap_or_default();
        let max_body =
            self.parse("limits.max_body", units::parse_size(limits.max_body.as_deref().unwrap_or(DEFAULT_MAX_BODY)));
        let max_header_bytes = self.parse(
            "limits.max_header_bytes",
            units::parse_size(limits.max_header_bytes.as_deref().unwrap_or(DEFAULT_MAX_HEADER_BYTES)),
        );
        let rls = ratelimit::load(raw.ratelimit.as_ref(), self.base, "ratelimit", &mut self.problems, self.index);
        let traffic = raw.traffic.as_ref().and_then(|t| self.traffic(t, raw.alerts.as_ref()));
        let ratelimit_headers = match raw.ratelimit_headers.as_deref() {
            None => HeaderDialect::default(),
            Some(name) => self
                .parse(
                    "ratelimit_headers",
                    HeaderDialect::parse(name).ok_or_else(|| {
                        format!("unknown dialect {name:?} (draft-06, draft-07, draft-08 .. draft-11, none)")
                    }),
                )
                .unwrap_or_default(),
        };

        let policy = Policy {
            network,
            api_keys,
            store_keys: None,
            bearer,
            credential_precedence,
            roles: roles?,
            tiers,
            quota_warning,
            routes,
            max_body: max_body?,
            max_header_bytes: max_header_bytes?,
            on_store_error,
            ratelimit: rls,
            ratelimit_headers,
            traffic,
            version: Arc::from(""),
        };
        Some(Config {
            file: PathBuf::new(),
            version: String::new(),
            sources: Vec::new(),
            policy: Arc::new(policy),
            settings,
            auth_metrics: self.auth_metrics.clone(),
        })
    }

    /// `reload`: watch the files (default: every 500 ms), or not.
    fn reload_watch(&mut self, r: Option<&raw::RawReload>) -> Option<Duration> {
        let every = self.duration("reload.interval", r.and_then(|r| r.interval.as_deref()), DEFAULT_RELOAD_INTERVAL);
        if every < Duration::from_millis(100) || every > Duration::from_secs(3600) {
            self.err("reload.interval", "100ms to 1h");
        }
        r.and_then(|r| r.watch).unwrap_or(true).then_some(every)
    }

    /// A duration setting, or its default.
    fn duration(&mut self, path: &str, value: Option<&str>, default: &str) -> Duration {
        let micros = self.parse(path, units::parse_duration(value.unwrap_or(default))).unwrap_or(0);
        Duration::from_micros(micros)
    }
}

#[cfg(test)]
mod tests;
