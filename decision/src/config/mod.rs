//! Configuration: the YAML policy file (validated into the core's `Policy`) and the deployment
//! knobs, which come from flags or these environment variables (read by clap):
//!
//! | variable | meaning | default |
//! | --- | --- | --- |
//! | `PORTCULLIS_CONFIG` | the policy file | (required) |
//! | `PORTCULLIS_GRPC_ADDR` | gRPC listen address, overrides `listen.grpc` | `127.0.0.1:8081` |
//! | `PORTCULLIS_HTTP_ADDR` | admin HTTP listen address, overrides `listen.http` | `127.0.0.1:9102` |
//! | `PORTCULLIS_LOG_FORMAT` | `json` or `pretty` | `pretty` |
//! | `PORTCULLIS_LOG` | log filter (tracing's `EnvFilter` syntax) | `info` |
//!
//! Raw serde structs (`raw`) stop here: `validate` turns them into domain types and reports
//! every problem it finds, each with its field path and line.

mod lines;
pub mod ratelimit;
pub mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use decision_core::apikey::{self, ApiKey, ApiKeyTable};
use decision_core::glob::PathPattern;
use decision_core::net::{self, CidrTable};
use decision_core::policy::{
    self, HeaderDialect, Network, OnStoreError, Policy, Precedence, Route, Tier, UNTRUSTED, UNTRUSTED_BIT, Zones,
};
use decision_core::quota::Limit;
use decision_core::roles::{RoleError, RoleTable};
use decision_core::units::{self, MICROS_PER_DAY, MICROS_PER_MINUTE};

use lines::LineIndex;
use raw::{Ordered, RawPolicy, RawRole, RawTier};

pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8081";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9102";
pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
pub const DEFAULT_MAX_BODY: &str = "5MB";
pub const DEFAULT_MAX_HEADER_BYTES: &str = "16KB";
pub const DEFAULT_QUOTA_WARNING: &str = "80%";
/// The reference guide's zone limits.
pub const DEFAULT_ZONE_LIMIT_TRUSTED: &str = "1000/minute";
pub const DEFAULT_ZONE_LIMIT_UNTRUSTED: &str = "10/minute";
/// The reference guide's tiers: (name, per minute, burst, per day).
pub const DEFAULT_TIERS: [(&str, u64, u64, u64); 3] =
    [("basic", 60, 100, 5_000), ("business", 300, 500, 25_000), ("enterprise", 1_000, 2_000, 100_000)];
/// The reference guide's roles: (name, inherits).
pub const DEFAULT_ROLES: [(&str, &[&str]); 4] =
    [("admin", &["developer"]), ("developer", &["user"]), ("user", &[]), ("service", &[])];
/// Algorithms a JWT issuer may list; `none` and the HMAC family (shared secrets do not belong
/// in a JWKS) are refused.
pub const JWT_ALGORITHMS: [&str; 10] =
    ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"];
/// Clock skew allowed on a token's exp, nbf and iat when the policy does not say.
pub const DEFAULT_JWT_LEEWAY: &str = "30s";
/// The tier of a token without a tier claim (the reference: "missing -> basic").
pub const DEFAULT_JWT_TIER: &str = "basic";
/// `jwks_url` issuers: background refresh period, refetch cooldown and fetch timeout.
pub const DEFAULT_JWKS_REFRESH: &str = "5m";
pub const DEFAULT_JWKS_COOLDOWN: &str = "30s";
pub const DEFAULT_JWKS_TIMEOUT: &str = "5s";
/// OAuth 2.0 introspection: how long an answer is believed, and the call's timeout (keep it
/// well under Envoy's ext_authz timeout).
pub const DEFAULT_INTROSPECTION_CACHE_TTL: &str = "60s";
pub const DEFAULT_INTROSPECTION_TIMEOUT: &str = "2s";
/// The reference's traffic-spike settings, used where `traffic` leaves one out.
pub const DEFAULT_CONCURRENCY_LIMIT: u64 = 1000;
pub const DEFAULT_QUEUE_SIZE: u64 = 5000;
pub const DEFAULT_QUEUE_TIMEOUT: &str = "30s";
pub const DEFAULT_ERROR_THRESHOLD: &str = "50%";
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
pub const DEFAULT_BREAKER_WINDOW: &str = "60s";
pub const DEFAULT_RESET_TIMEOUT: &str = "300s";
/// Audit events one sink may have waiting in memory before it spills to disk.
pub const DEFAULT_SINK_QUEUE: usize = 8192;
/// How often the audit chain is checkpointed (the reference: hourly).
pub const DEFAULT_CHECKPOINT_EVERY: &str = "1h";
/// Our addition: a slot whose completion never comes is freed after this long.
pub const DEFAULT_LEASE_TTL: &str = "60s";
/// Largest policy file read (a policy is configuration, not data).
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

/// What a bearer token's role and tier names mean: role name -> granted bits, tier name ->
/// index, and the tier of a token that names none.
#[allow(clippy::type_complexity)]
fn bearer_tables(
    roles: Option<&RoleTable>,
    tiers: &[Tier],
) -> (std::collections::HashMap<String, u64>, std::collections::HashMap<String, usize>, Option<usize>) {
    let role_bits =
        roles.map(|t| t.names().filter_map(|n| t.granted(n).map(|b| (n.to_owned(), b))).collect()).unwrap_or_default();
    let tier_index: std::collections::HashMap<String, usize> =
        tiers.iter().enumerate().map(|(i, t)| (t.name.to_string(), i)).collect();
    let default_tier = tier_index.get(DEFAULT_JWT_TIER).copied();
    (role_bits, tier_index, default_tier)
}

/// An upstream's store key: 16 hex characters of its name's SHA-256.
fn upstream_key(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    decision_core::encode::hex(&digest[..8])
}

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
    pub store: StoreSettings,
    /// None: no `audit` section, no audit trail
    pub audit: Option<crate::audit::AuditSettings>,
    /// None: no `alerts` section
    pub alerts: Option<crate::alerts::AlertSettings>,
}

/// Where counters live.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// the embedded default: this process only
    Memory,
    /// shared by the fleet
    Redis(crate::store::RedisSettings),
}

/// The reference policy's per-call Redis timeout.
pub const DEFAULT_REDIS_TIMEOUT: &str = "25ms";
pub const DEFAULT_REDIS_POOL_SIZE: u32 = 4;
pub const MAX_REDIS_POOL_SIZE: u32 = 256;
/// Refused plans the Redis store remembers (about 100 bytes each, plus the keys' states).
pub const DEFAULT_OVER_LIMIT_CACHE: u64 = 100_000;
pub const MAX_OVER_LIMIT_CACHE: u64 = 10_000_000;

/// A loaded, validated policy file.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub policy: Arc<Policy>,
    pub settings: Settings,
}

/// Reads and validates a policy file.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
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
    let mut cfg = parse(&text, base).map_err(|problems| ConfigError { file: file.to_owned(), problems })?;
    cfg.file = file.to_owned();
    Ok(cfg)
}

/// Parses and validates policy text; `base` is the folder relative paths start from.
pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<Problem>> {
    let raw: RawPolicy = match serde_yaml_ng::from_str::<Option<RawPolicy>>(text) {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => return Err(vec![structural(&e)]),
    };
    let index = LineIndex::build(text);
    let mut v = Validator { problems: Vec::new(), index: &index, base };
    let out = v.policy(raw);
    if v.problems.is_empty() { out.ok_or_else(Vec::new) } else { Err(v.problems) }
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

struct Validator<'a> {
    problems: Vec<Problem>,
    index: &'a LineIndex,
    base: &'a Path,
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

    fn cidrs(&mut self, path: &str, list: &[String], bits: u64, table: &mut CidrTable) {
        for (i, s) in list.iter().enumerate() {
            if let Some(n) = self.parse(&format!("{path}[{i}]"), net::parse_cidr(s)) {
                table.insert(n, bits);
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
            store,
            audit,
            alerts,
        };
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
        };
        Some(Config { file: PathBuf::new(), policy: Arc::new(policy), settings })
    }

    fn store(&mut self, raw: Option<&raw::RawStore>) -> StoreSettings {
        let Some(store) = raw else { return StoreSettings::Memory };
        if store.memory.is_some() && store.redis.is_some() {
            self.err("store", "choose one store: memory or redis");
        }
        let Some(r) = &store.redis else { return StoreSettings::Memory };
        let cluster = r.cluster.clone().unwrap_or_default();
        let (url, nodes) = match (&r.url, r.cluster.is_some()) {
            (Some(_), true) => {
                self.err("store.redis", "choose one of url (a single node) and cluster (Redis Cluster nodes)");
                (String::new(), Vec::new())
            }
            (None, false) => {
                self.err("store.redis", "url (a single node) or cluster (Redis Cluster nodes) is required");
                (String::new(), Vec::new())
            }
            (Some(url), false) => {
                self.redis_url("store.redis.url", url);
                (url.clone(), Vec::new())
            }
            (None, true) => {
                if cluster.is_empty() {
                    self.err("store.redis.cluster", "list at least one node of the cluster");
                }
                for (i, u) in cluster.iter().enumerate() {
                    self.redis_url(&format!("store.redis.cluster[{i}]"), u);
                }
                if cluster.iter().any(|u| u.starts_with("rediss://"))
                    && !cluster.iter().all(|u| u.starts_with("rediss://"))
                {
                    self.err("store.redis.cluster", "mixes redis:// and rediss:// nodes: use one scheme for all");
                }
                (cluster.first().cloned().unwrap_or_default(), cluster)
            }
        };
        let tls = url.starts_with("rediss://");
        let timeout = self
            .parse("store.redis.timeout", units::parse_duration(r.timeout.as_deref().unwrap_or(DEFAULT_REDIS_TIMEOUT)))
            .unwrap_or(25_000);
        if timeout == 0 {
            self.err("store.redis.timeout", "must be more than 0");
        }
        let pool_size = r.pool_size.unwrap_or(DEFAULT_REDIS_POOL_SIZE);
        if !(1..=MAX_REDIS_POOL_SIZE).contains(&pool_size) {
            self.err("store.redis.pool_size", format!("must be 1 to {MAX_REDIS_POOL_SIZE}"));
        }
        let ca_file = r.ca_file.as_ref().map(|f| self.base.join(f));
        if let Some(f) = &ca_file {
            if !tls {
                self.err("store.redis.ca_file", "a CA file is for TLS: use a rediss:// URL");
            } else if let Err(e) = std::fs::read(f) {
                self.err("store.redis.ca_file", format!("cannot read {}: {e}", f.display()));
            }
        }
        let over_limit_cache = r.over_limit_cache.unwrap_or(DEFAULT_OVER_LIMIT_CACHE);
        if over_limit_cache > MAX_OVER_LIMIT_CACHE {
            self.err("store.redis.over_limit_cache", format!("must be 0 (off) to {MAX_OVER_LIMIT_CACHE}"));
        }
        let local_share = r.local_share.as_ref().map(|l| l.expected_instances);
        if local_share == Some(0) {
            self.err("store.redis.local_share.expected_instances", "must be at least 1");
        }
        StoreSettings::Redis(crate::store::RedisSettings {
            url,
            cluster: nodes,
            timeout: std::time::Duration::from_micros(timeout),
            pool_size: pool_size as usize,
            ca_file,
            local_share,
            over_limit_cache: usize::try_from(over_limit_cache).unwrap_or(usize::MAX),
        })
    }

    fn redis_url(&mut self, path: &str, url: &str) {
        let shown = crate::store::redis::redacted(url);
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            self.err(
                path,
                format!("invalid Redis URL {shown:?}: expected redis://[user:password@]host:port[/db] or rediss://... for TLS"),
            );
        } else if redis::Client::open(url).is_err() {
            self.err(path, format!("invalid Redis URL {shown:?}"));
        }
    }

    /// Zone names (or `untrusted`) as a mask of zone bits; an unknown name is a problem.
    fn zone_mask(&mut self, path: &str, names: &[String], zones: &Zones) -> u64 {
        let mut mask = 0;
        for (j, z) in names.iter().enumerate() {
            if z == UNTRUSTED {
                mask |= UNTRUSTED_BIT;
            } else if let Some(k) = zones.names.iter().position(|n| n == z) {
                mask |= 1 << k;
            } else {
                self.err(
                    format!("{path}[{j}]"),
                    format!("unknown zone {z:?} (known: {}, untrusted)", zones.names.join(", ")),
                );
            }
        }
        mask
    }

    fn network(&mut self, n: raw::RawNetwork) -> Network {
        let mut trusted_proxies = CidrTable::default();
        self.cidrs("network.trusted_proxies", &n.trusted_proxies, 1, &mut trusted_proxies);
        let mut deny = CidrTable::default();
        self.cidrs("network.deny", &n.deny, 1, &mut deny);
        let mut zones = Zones::default();
        for (i, (name, nets)) in n.zones.0.iter().enumerate() {
            let path = format!("network.zones.{name}");
            if name == UNTRUSTED {
                self.err(
                    &path,
                    "\"untrusted\" is the name of every address outside the named zones; choose another name",
                );
                continue;
            }
            if i >= 63 {
                self.err(&path, "at most 63 zones");
                continue;
            }
            self.cidrs(&path, nets, 1 << zones.names.len(), &mut zones.table);
            zones.names.push(name.clone());
        }
        let zl = n.zone_limits.unwrap_or_default();
        let trusted = zl.trusted.as_deref().unwrap_or(DEFAULT_ZONE_LIMIT_TRUSTED);
        let untrusted = zl.untrusted.as_deref().unwrap_or(DEFAULT_ZONE_LIMIT_UNTRUSTED);
        let zone_limit_trusted =
            self.parse("network.zone_limits.trusted", units::parse_rate(trusted)).map(policy::zone_limit);
        let zone_limit_untrusted =
            self.parse("network.zone_limits.untrusted", units::parse_rate(untrusted)).map(policy::zone_limit);
        let auto_block = n.auto_block.as_ref().and_then(|ab| {
            if ab.failed_auth == 0 {
                self.err("network.auto_block.failed_auth", "must be at least 1");
            }
            let within = self.parse("network.auto_block.within", units::parse_duration(&ab.within));
            let block_for = self.parse("network.auto_block.block_for", units::parse_duration(&ab.block_for));
            let exempt_zones = self.zone_mask("network.auto_block.exempt_zones", &ab.exempt_zones, &zones);
            Some(policy::AutoBlock {
                failures: Limit::SlidingWindow { limit: ab.failed_auth.saturating_sub(1), window: within?.max(1) },
                block: Limit::Flag { duration: block_for?.max(1) },
                exempt_zones,
            })
        });
        Network { trusted_proxies, deny, zones, zone_limit_trusted, zone_limit_untrusted, auto_block }
    }

    fn roles(&mut self, raw: Option<Ordered<RawRole>>) -> Option<RoleTable> {
        let list: Vec<(String, Vec<String>)> = match raw {
            Some(r) => r.0.into_iter().map(|(n, r)| (n, r.inherits)).collect(),
            None => {
                DEFAULT_ROLES.iter().map(|(n, i)| (n.to_string(), i.iter().map(|s| s.to_string()).collect())).collect()
            }
        };
        match RoleTable::build(&list) {
            Ok(t) => Some(t),
            Err(errors) => {
                for e in errors {
                    match e {
                        RoleError::TooMany(n) => self.err(
                            "roles",
                            format!("{n} roles defined; at most {} are supported", decision_core::roles::MAX_ROLES),
                        ),
                        RoleError::UnknownInherited { role, inherits } => {
                            let i = list
                                .iter()
                                .find(|(n, _)| *n == role)
                                .and_then(|(_, inh)| inh.iter().position(|x| *x == inherits))
                                .unwrap_or(0);
                            self.err(format!("roles.{role}.inherits[{i}]"), format!("unknown role {inherits:?}"));
                        }
                        RoleError::Cycle(cycle) => {
                            let first = cycle.first().cloned().unwrap_or_default();
                            self.err(
                                format!("roles.{first}.inherits"),
                                format!("inheritance cycle: {}", cycle.join(" -> ")),
                            );
                        }
                    }
                }
                None
            }
        }
    }

    fn tiers(&mut self, raw: Option<Ordered<RawTier>>) -> Vec<Tier> {
        let list: Vec<(String, RawTier)> = match raw {
            Some(t) => t.0,
            None => DEFAULT_TIERS
                .iter()
                .map(|(n, m, b, d)| (n.to_string(), RawTier { per_minute: *m, burst: *b, per_day: *d }))
                .collect(),
        };
        let mut out = Vec::new();
        for (name, t) in list {
            for (field, value) in [("per_minute", t.per_minute), ("burst", t.burst), ("per_day", t.per_day)] {
                if value == 0 {
                    self.err(format!("tiers.{name}.{field}"), "must be at least 1");
                }
            }
            out.push(Tier {
                name: Arc::from(name.as_str()),
                per_minute: t.per_minute,
                burst: t.burst,
                per_day: t.per_day,
                bucket: Limit::token_bucket(t.per_minute, MICROS_PER_MINUTE, t.burst),
                daily: Limit::SlidingWindow { limit: t.per_day, window: MICROS_PER_DAY },
            });
        }
        out
    }

    fn api_keys(&mut self, raw: raw::RawApiKeys, roles: Option<&RoleTable>, tiers: &[Tier]) -> ApiKeyTable {
        let header = raw.header.as_deref().unwrap_or(DEFAULT_API_KEY_HEADER);
        if header.is_empty() || !header.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            self.err("authentication.api_keys.header", format!("invalid header name {header:?}"));
        }
        let mut table = ApiKeyTable::new(header);
        let mut seen_ids: Vec<&str> = Vec::new();
        let mut seen_digests: Vec<[u8; 32]> = Vec::new();
        for (i, k) in raw.keys.iter().enumerate() {
            let path = format!("authentication.api_keys.keys[{i}]");
            if k.id.is_empty()
                || k.id.len() > 128
                || !k.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
            {
                self.err(
                    format!("{path}.id"),
                    format!("invalid key id {:?}: use 1 to 128 letters, digits or - _ . : @", k.id),
                );
            }
            if seen_ids.contains(&k.id.as_str()) {
                self.err(format!("{path}.id"), format!("duplicate key id {:?}", k.id));
            }
            seen_ids.push(&k.id);
            let digest = self.parse(&format!("{path}.sha256"), apikey::parse_digest(&k.sha256));
            if let Some(d) = digest {
                if seen_digests.contains(&d) {
                    self.err(format!("{path}.sha256"), "the same digest is listed twice (two ids for one key)");
                }
                seen_digests.push(d);
            }
            let tier = tiers.iter().position(|t| *t.name == *k.tier);
            if tier.is_none() {
                let known: Vec<&str> = tiers.iter().map(|t| &*t.name).collect();
                self.err(format!("{path}.tier"), format!("unknown tier {:?} (known: {})", k.tier, known.join(", ")));
            }
            let mut granted = 0;
            for (j, r) in k.roles.iter().enumerate() {
                match roles.map(|t| t.granted(r)) {
                    Some(Some(bits)) => granted |= bits,
                    Some(None) => self.err(format!("{path}.roles[{j}]"), format!("unknown role {r:?}")),
                    None => {}
                }
            }
            if let (Some(digest), Some(tier)) = (digest, tier) {
                let not_before = k
                    .not_before
                    .as_deref()
                    .and_then(|t| self.parse(&format!("{path}.not_before"), units::parse_rfc3339(t)));
                let expires_at = k
                    .expires_at
                    .as_deref()
                    .and_then(|t| self.parse(&format!("{path}.expires_at"), units::parse_rfc3339(t)));
                if let (Some(a), Some(b)) = (not_before, expires_at)
                    && a >= b
                {
                    self.err(format!("{path}.expires_at"), "must be after not_before");
                }
                table.push(ApiKey {
                    id: Arc::from(k.id.as_str()),
                    digest,
                    roles: granted,
                    tier,
                    revoked: k.revoked,
                    not_before,
                    expires_at,
                });
            }
        }
        table
    }

    fn jwt(
        &mut self,
        issuers: &[raw::RawJwt],
        roles: Option<&RoleTable>,
        tiers: &[Tier],
    ) -> Option<crate::auth::jwt::JwtVerifier> {
        enum Jwks {
            Document(String),
            Url { url: crate::https::Url, client: crate::https::HttpsClient, refresh: Duration, cooldown: Duration },
        }
        let mut built = Vec::new();
        for (i, j) in issuers.iter().enumerate() {
            let path = format!("authentication.jwt[{i}]");
            let jwks = match (&j.jwks_file, &j.jwks_url) {
                (Some(_), Some(_)) => {
                    self.err(&path, "give jwks_file or jwks_url, not both");
                    None
                }
                (None, None) => {
                    self.err(&path, "jwks_file or jwks_url is required");
                    None
                }
                (Some(f), None) => match std::fs::read_to_string(self.base.join(f)) {
                    Ok(text) => Some(Jwks::Document(text)),
                    Err(e) => {
                        self.err(
                            format!("{path}.jwks_file"),
                            format!("cannot read {f:?} (relative to the policy file): {e}"),
                        );
                        None
                    }
                },
                (None, Some(u)) => {
                    let url = self.parse(&format!("{path}.jwks_url"), crate::https::Url::parse(u));
                    let client = self.https_client(
                        &path,
                        j.ca_file.as_deref(),
                        j.timeout.as_deref(),
                        DEFAULT_JWKS_TIMEOUT,
                        crate::auth::jwt::MAX_JWKS_BYTES,
                    );
                    let refresh =
                        self.duration(&format!("{path}.jwks_refresh"), j.jwks_refresh.as_deref(), DEFAULT_JWKS_REFRESH);
                    let cooldown = self.duration(
                        &format!("{path}.jwks_cooldown"),
                        j.jwks_cooldown.as_deref(),
                        DEFAULT_JWKS_COOLDOWN,
                    );
                    match (url, client) {
                        (Some(url), Some(client)) => Some(Jwks::Url { url, client, refresh, cooldown }),
                        _ => None,
                    }
                }
            };
            if j.algorithms.is_empty() {
                self.err(format!("{path}.algorithms"), "list the algorithms the issuer signs with, e.g. [RS256]");
            }
            let mut algorithms = Vec::new();
            for (k, a) in j.algorithms.iter().enumerate() {
                match crate::auth::jwt::algorithm(a) {
                    Some(alg) => algorithms.push(alg),
                    None => self.err(
                        format!("{path}.algorithms[{k}]"),
                        format!("algorithm {a:?} is not allowed (allowed: {})", JWT_ALGORITHMS.join(", ")),
                    ),
                }
            }
            if j.audiences.is_empty() {
                self.err(format!("{path}.audiences"), "at least one audience is required");
            }
            let leeway = self
                .parse(
                    &format!("{path}.leeway"),
                    units::parse_duration(j.leeway.as_deref().unwrap_or(DEFAULT_JWT_LEEWAY)),
                )
                .unwrap_or(0);
            let (role_bits, tier_index, default_tier) = bearer_tables(roles, tiers);
            if let Some(jwks) = jwks {
                match crate::auth::jwt::Issuer::new(
                    j.issuer.clone(),
                    j.audiences.clone(),
                    algorithms,
                    leeway,
                    j.roles_claim.clone().unwrap_or_else(|| "roles".into()),
                    j.tier_claim.clone().unwrap_or_else(|| "tier".into()),
                    role_bits,
                    tier_index,
                    default_tier,
                    match jwks {
                        Jwks::Document(ref text) => crate::auth::jwt::KeySource::Document(text),
                        Jwks::Url { url, client, refresh, cooldown } => {
                            crate::auth::jwt::KeySource::Url { url, client, refresh, cooldown }
                        }
                    },
                ) {
                    Ok(issuer) => built.push(issuer),
                    Err(e) => {
                        self.err(format!("{path}.{}", if j.jwks_url.is_some() { "jwks_url" } else { "jwks_file" }), e)
                    }
                }
            }
        }
        if built.is_empty() {
            return None;
        }
        Some(crate::auth::jwt::JwtVerifier::new(built))
    }

    /// A duration setting, or its default.
    fn duration(&mut self, path: &str, value: Option<&str>, default: &str) -> Duration {
        let micros = self.parse(path, units::parse_duration(value.unwrap_or(default))).unwrap_or(0);
        Duration::from_micros(micros)
    }

    /// The HTTPS client of an outbound call: the CA file (relative to the policy) and timeout.
    fn https_client(
        &mut self,
        path: &str,
        ca_file: Option<&str>,
        timeout: Option<&str>,
        default_timeout: &str,
        max_body: usize,
    ) -> Option<crate::https::HttpsClient> {
        let timeout = self.duration(&format!("{path}.timeout"), timeout, default_timeout);
        if timeout.is_zero() {
            self.err(format!("{path}.timeout"), "must be more than zero");
        }
        let ca = ca_file.map(|f| self.base.join(f));
        match crate::https::HttpsClient::new(ca.as_deref(), timeout, max_body) {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(format!("{path}.ca_file"), e);
                None
            }
        }
    }

    fn introspection(
        &mut self,
        i: &raw::RawIntrospection,
        roles: Option<&RoleTable>,
        tiers: &[Tier],
    ) -> Option<Arc<crate::auth::introspection::Introspector>> {
        let path = "authentication.oauth2_introspection";
        let endpoint = self.parse(&format!("{path}.endpoint"), crate::https::Url::parse(&i.endpoint));
        let client = self.https_client(
            path,
            i.ca_file.as_deref(),
            i.timeout.as_deref(),
            DEFAULT_INTROSPECTION_TIMEOUT,
            crate::auth::introspection::MAX_ANSWER_BYTES,
        );
        let cache_ttl =
            self.duration(&format!("{path}.cache_ttl"), i.cache_ttl.as_deref(), DEFAULT_INTROSPECTION_CACHE_TTL);
        if i.client_id.is_empty() {
            self.err(format!("{path}.client_id"), "must not be empty");
        }
        let secret = match env_secret(&i.client_secret_env) {
            Some(s) if !s.is_empty() => Some(s),
            _ => {
                self.err(
                    format!("{path}.client_secret_env"),
                    format!("environment variable {:?} is not set (it holds the client secret)", i.client_secret_env),
                );
                None
            }
        };
        let (roles, tiers, default_tier) = bearer_tables(roles, tiers);
        Some(crate::auth::introspection::Introspector::new(crate::auth::introspection::Settings {
            endpoint: endpoint?,
            client: client?,
            client_id: i.client_id.clone(),
            client_secret: secret?,
            cache_ttl: u64::try_from(cache_ttl.as_micros()).unwrap_or(u64::MAX),
            roles_claim: i.roles_claim.clone().unwrap_or_else(|| "scope".into()),
            tier_claim: i.tier_claim.clone().unwrap_or_else(|| "tier".into()),
            roles,
            tiers,
            default_tier,
        }))
    }

    fn routes(&mut self, raw: &[raw::RawRoute], roles: Option<&RoleTable>, zones: &Zones) -> Vec<Route> {
        let mut out = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let path = format!("routes[{i}]");
            let pattern = self.parse(&format!("{path}.match.path"), PathPattern::parse(&r.matcher.path));
            let mut methods = Vec::new();
            for (j, m) in r.matcher.methods.iter().flatten().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    self.err(format!("{path}.match.methods[{j}]"), format!("invalid method {m:?}"));
                }
                methods.push(m.to_ascii_uppercase());
            }
            if r.public && !r.allow_roles.is_empty() {
                self.err(format!("{path}.allow_roles"), "a public route needs no roles; remove allow_roles or public");
            }
            if !r.public && r.allow_roles.is_empty() {
                self.err(&path, "a route needs allow_roles, or public: true");
            }
            let mut allow_roles = 0;
            for (j, name) in r.allow_roles.iter().enumerate() {
                match roles.map(|t| t.bit(name)) {
                    Some(Some(bit)) => allow_roles |= bit,
                    Some(None) => self.err(format!("{path}.allow_roles[{j}]"), format!("unknown role {name:?}")),
                    None => {}
                }
            }
            let zone_mask = r.zones.as_ref().map(|list| self.zone_mask(&format!("{path}.zones"), list, zones));
            let max_auth_age = r.sensitive.as_ref().and_then(|s| {
                self.parse(&format!("{path}.sensitive.max_auth_age"), units::parse_duration(&s.max_auth_age))
            });
            if r.public && r.sensitive.is_some() {
                self.err(format!("{path}.sensitive"), "a public route cannot be sensitive");
            }
            let upstream = r.upstream.as_deref().unwrap_or(&r.matcher.path);
            if upstream.is_empty() || upstream.len() > 256 {
                self.err(format!("{path}.upstream"), "an upstream name is 1 to 256 characters");
            }
            if let Some(pattern) = pattern {
                out.push(Route {
                    index: i,
                    pattern,
                    methods,
                    public: r.public,
                    allow_roles,
                    zones: zone_mask,
                    max_auth_age,
                    upstream: Arc::from(upstream),
                    upstream_key: Arc::from(upstream_key(upstream).as_str()),
                });
            }
        }
        out
    }

    /// `audit`: sinks, masking, checkpoints.
    fn audit(&mut self, a: &raw::RawAudit, store: &StoreSettings) -> crate::audit::AuditSettings {
        use crate::audit::{AuditSettings, Fsync, SinkSettings};
        let mut sinks = Vec::new();
        for (i, s) in a.sinks.iter().enumerate() {
            let path = format!("audit.sinks[{i}]");
            let n =
                usize::from(s.stdout.is_some()) + usize::from(s.file.is_some()) + usize::from(s.redis_stream.is_some());
            if n != 1 {
                self.err(&path, "each sink is exactly one of stdout, file, redis_stream");
                continue;
            }
            if s.stdout.is_some() {
                sinks.push(SinkSettings::Stdout);
            } else if let Some(f) = &s.file {
                let fsync = match f.fsync.as_deref().unwrap_or("interval") {
                    "always" => Fsync::Always,
                    "interval" => Fsync::Interval,
                    "never" => Fsync::Never,
                    other => {
                        self.err(
                            format!("{path}.file.fsync"),
                            format!("{other:?}: expected always, interval or never"),
                        );
                        Fsync::Interval
                    }
                };
                let max_size = f
                    .max_size
                    .as_deref()
                    .and_then(|m| self.parse(&format!("{path}.file.max_size"), units::parse_size(m)));
                sinks.push(SinkSettings::File { path: self.base.join(&f.path), fsync, max_size });
            } else if let Some(r) = &s.redis_stream {
                let url = match (&r.url, store) {
                    (Some(u), _) => u.clone(),
                    (None, StoreSettings::Redis(rs)) if rs.cluster.is_empty() => rs.url.clone(),
                    (None, StoreSettings::Redis(_)) => {
                        self.err(
                            format!("{path}.redis_stream"),
                            "give url: the stream is written to one Redis node, and the store is a Redis Cluster",
                        );
                        String::new()
                    }
                    (None, StoreSettings::Memory) => {
                        self.err(format!("{path}.redis_stream"), "give url: the store is not Redis");
                        String::new()
                    }
                };
                if !url.is_empty() && redis::Client::open(url.as_str()).is_err() {
                    self.err(
                        format!("{path}.redis_stream.url"),
                        format!("invalid Redis URL {:?}", crate::store::redis::redacted(&url)),
                    );
                }
                let ca_file = match store {
                    StoreSettings::Redis(rs) if r.url.is_none() => rs.ca_file.clone(),
                    _ => None,
                };
                if r.key.is_empty() {
                    self.err(format!("{path}.redis_stream.key"), "must not be empty");
                }
                sinks.push(SinkSettings::RedisStream {
                    url,
                    ca_file,
                    key: r.key.clone(),
                    max_len: r.max_len.unwrap_or(1_000_000),
                });
            }
        }
        let every = self.duration("audit.checkpoint_every", a.checkpoint_every.as_deref(), DEFAULT_CHECKPOINT_EVERY);
        if every.is_zero() {
            self.err("audit.checkpoint_every", "must be more than zero");
        }
        let signing_key = a.signing_key.as_ref().and_then(|k| {
            let path = self.base.join(k);
            match crate::audit::checkpoint::load_signing_key(&path) {
                Ok(key) => Some(key),
                Err(e) => {
                    self.err("audit.signing_key", e);
                    None
                }
            }
        });
        let mut anchors = Vec::new();
        for (i, u) in a.anchor_webhooks.iter().enumerate() {
            if let Some(url) = self.parse(&format!("audit.anchor_webhooks[{i}]"), crate::https::Url::parse_web(u)) {
                anchors.push(url);
            }
        }
        AuditSettings {
            sinks,
            mask_headers: a.mask_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            checkpoint_every: every,
            instance: a.instance.clone().unwrap_or_else(crate::audit::host_name),
            spill_dir: a
                .spill_dir
                .as_ref()
                .map_or_else(|| std::env::temp_dir().join("portcullis-audit"), |d| self.base.join(d)),
            signing_key,
            checkpoint_file: a.checkpoint_file.as_ref().map(|f| self.base.join(f)),
            anchor_webhooks: anchors,
            sink_queue: a.sink_queue.unwrap_or(DEFAULT_SINK_QUEUE).max(1),
        }
    }

    /// `traffic`: the reference's numbers where the policy says nothing.
    fn traffic(
        &mut self,
        t: &raw::RawTraffic,
        alerts: Option<&raw::RawAlerts>,
    ) -> Option<decision_core::traffic::TrafficConfig> {
        use decision_core::traffic::{AdaptiveConfig, BreakerConfig, TrafficConfig};
        let concurrency_limit = t.concurrency_limit.unwrap_or(DEFAULT_CONCURRENCY_LIMIT);
        if concurrency_limit == 0 {
            self.err("traffic.concurrency_limit", "must be at least 1");
        }
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let queue_timeout =
            micros(self.duration("traffic.queue_timeout", t.queue_timeout.as_deref(), DEFAULT_QUEUE_TIMEOUT));
        let lease_ttl = micros(self.duration("traffic.lease_ttl", t.lease_ttl.as_deref(), DEFAULT_LEASE_TTL));
        if lease_ttl == 0 {
            self.err("traffic.lease_ttl", "must be more than zero");
        }
        let breaker = t.circuit_breaker.as_ref().map(|cb| {
            let threshold = cb.error_threshold.as_deref().unwrap_or(DEFAULT_ERROR_THRESHOLD);
            let error_threshold =
                self.parse("traffic.circuit_breaker.error_threshold", units::parse_percent(threshold)).unwrap_or(0);
            if error_threshold == 0 {
                self.err("traffic.circuit_breaker.error_threshold", "must be more than 0%");
            }
            let window =
                micros(self.duration("traffic.circuit_breaker.window", cb.window.as_deref(), DEFAULT_BREAKER_WINDOW));
            let reset_timeout = micros(self.duration(
                "traffic.circuit_breaker.reset_timeout",
                cb.reset_timeout.as_deref(),
                DEFAULT_RESET_TIMEOUT,
            ));
            for (name, v) in [("window", window), ("reset_timeout", reset_timeout)] {
                if v == 0 {
                    self.err(format!("traffic.circuit_breaker.{name}"), "must be more than zero");
                }
            }
            BreakerConfig {
                error_threshold: u64::from(error_threshold),
                min_requests: cb.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS).max(1),
                window,
                reset_timeout,
            }
        });
        let adaptive = t.adaptive.as_ref().map(|a| {
            let p = "traffic.adaptive";
            let min_limit = a.min_limit.unwrap_or((concurrency_limit / 10).max(1));
            if min_limit == 0 || min_limit > concurrency_limit {
                self.err(format!("{p}.min_limit"), "must be between 1 and concurrency_limit");
            }
            let decrease =
                self.parse(&format!("{p}.decrease"), units::parse_percent(a.decrease.as_deref().unwrap_or("50%")));
            if decrease.is_some_and(|d| d == 0 || d >= 10_000) {
                self.err(format!("{p}.decrease"), "the share kept on a decrease is more than 0% and less than 100%");
            }
            let alert_warn = |t: Option<&raw::RawThreshold>| t.map(|t| t.warn.clone());
            let error_rate = a.error_rate.clone().or_else(|| alert_warn(alerts.and_then(|x| x.error_rate.as_ref())));
            let error_rate = self
                .parse(&format!("{p}.error_rate"), units::parse_percent(error_rate.as_deref().unwrap_or("5%")))
                .unwrap_or(500);
            let latency = a.latency.clone().or_else(|| alert_warn(alerts.and_then(|x| x.response_time.as_ref())));
            let latency = micros(self.duration(&format!("{p}.latency"), latency.as_deref(), "500ms"));
            let interval = micros(self.duration(&format!("{p}.interval"), a.interval.as_deref(), "5s"));
            if interval == 0 {
                self.err(format!("{p}.interval"), "must be more than zero");
            }
            AdaptiveConfig {
                min_limit: min_limit.max(1),
                decrease: u64::from(decrease.unwrap_or(5_000)),
                increase: a.increase.unwrap_or(1).max(1),
                interval,
                error_rate: u64::from(error_rate),
                latency,
            }
        });
        Some(TrafficConfig {
            concurrency_limit,
            queue_size: t.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            queue_timeout,
            lease_ttl,
            breaker,
            adaptive,
        })
    }

    /// `alerts`: the reference's thresholds, compiled.
    fn alerts(&mut self, a: &raw::RawAlerts) -> crate::alerts::AlertSettings {
        use crate::alerts::{AlertSettings, Levels};
        let percent = |s: &str| units::parse_percent(s).map(u64::from).map_err(|e| e.to_string());
        let duration = |s: &str| units::parse_duration(s).map_err(|e| e.to_string());
        let size = |s: &str| units::parse_size(s).map_err(|e| e.to_string());
        let error_rate = a.error_rate.as_ref().and_then(|t| self.levels("error_rate", t, &percent));
        let response_time = a.response_time.as_ref().and_then(|t| self.levels("response_time", t, &duration));
        let payload_size = a.payload_size.as_ref().and_then(|t| self.levels("payload_size", t, &size));
        let mut window = Duration::from_secs(60);
        let failed_auth = a.failed_auth.as_ref().and_then(|t| {
            let w = self.parse("alerts.failed_auth.warn", units::parse_rate(&t.warn));
            let c = self.parse("alerts.failed_auth.critical", units::parse_rate(&t.critical));
            let (w, c) = (w?, c?);
            if w.per != c.per {
                self.err(
                    "alerts.failed_auth",
                    "warn and critical must use the same period, e.g. 10/minute and 50/minute",
                );
            }
            if w.count > c.count {
                self.err("alerts.failed_auth", "warn must not be above critical");
            }
            window = Duration::from_micros(w.per);
            Some(Levels { warn: w.count, critical: c.count })
        });
        let block_on_critical = a.failed_auth.as_ref().and_then(|t| t.block).unwrap_or(false);
        let mut webhooks = Vec::new();
        for (i, w) in a.webhooks.iter().enumerate() {
            if let Some(u) = self.parse(&format!("alerts.webhooks[{i}]"), crate::https::Url::parse_web(w)) {
                webhooks.push(u);
            }
        }
        AlertSettings {
            error_rate,
            response_time,
            failed_auth,
            failed_auth_window: window,
            block_on_critical,
            payload_size,
            webhooks,
        }
    }

    /// One alert's warn and critical levels.
    fn levels(
        &mut self,
        name: &str,
        t: &raw::RawThreshold,
        parse: &dyn Fn(&str) -> Result<u64, String>,
    ) -> Option<crate::alerts::Levels<u64>> {
        let warn = self.parse(&format!("alerts.{name}.warn"), parse(&t.warn));
        let critical = self.parse(&format!("alerts.{name}.critical"), parse(&t.critical));
        if t.block.is_some() {
            self.err(format!("alerts.{name}.block"), "only failed_auth alerts can block an address");
        }
        let (warn, critical) = (warn?, critical?);
        if warn > critical {
            self.err(format!("alerts.{name}"), "warn must not be above critical");
        }
        Some(crate::alerts::Levels { warn, critical })
    }
}

#[cfg(test)]
mod tests;
