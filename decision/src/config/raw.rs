//! The policy file as written: serde structs that mirror the YAML, with
//! `deny_unknown_fields` everywhere so a typo can never silently switch a rule off.
//! Nothing here is used past `validate`.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// A YAML mapping read in file order (tiers, roles and zones keep the order they are written
/// in); a key written twice is an error.
#[derive(Debug, Clone)]
pub struct Ordered<V>(pub Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.iter().any(|(e, _)| *e == k) {
                        return Err(de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    let v = map.next_value()?;
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(V2(PhantomData))
    }
}

/// `{}`: a section whose presence is the setting.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub listen: Option<RawListen>,
    pub store: Option<RawStore>,
    pub on_store_error: Option<RawOnStoreError>,
    pub network: Option<RawNetwork>,
    pub authentication: Option<RawAuthentication>,
    pub roles: Option<Ordered<RawRole>>,
    pub tiers: Option<Ordered<RawTier>>,
    pub quota_warning: Option<String>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    pub ratelimit: Option<RawRatelimit>,
    /// the IETF RateLimit header draft followed (`draft-10`, the default, ...)
    pub ratelimit_headers: Option<String>,
    pub traffic: Option<RawTraffic>,
    pub limits: Option<RawLimits>,
    pub audit: Option<RawAudit>,
    pub alerts: Option<RawAlerts>,
    pub admin: Option<RawAdmin>,
    pub reload: Option<RawReload>,
}

/// `reload`: whether (and how often) the policy file and the files it names are watched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub watch: Option<bool>,
    pub interval: Option<String>,
}

/// `admin`: who may call the admin API (`listen.admin`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default)]
    pub tokens: Vec<RawAdminToken>,
    pub tls: Option<RawAdminTls>,
}

/// `admin.tls`: the admin listener over TLS, and with `client_ca_file` mTLS.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminTls {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminToken {
    pub id: String,
    /// the SHA-256 of the token, hex
    pub sha256: String,
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub grpc: Option<String>,
    pub http: Option<String>,
    /// HTTP forward-auth (nginx auth_request, Traefik ForwardAuth, Caddy forward_auth); off when
    /// absent
    pub forward_auth: Option<String>,
    /// gRPC server reflection for portcullis.v1 on the gRPC port (grpcurl, Postman); off when
    /// absent
    pub grpc_reflection: Option<bool>,
    /// the admin API (`portcullis.v1.Admin`); off when absent
    pub admin: Option<String>,
    /// after SIGTERM, how long to keep answering while /readyz says not ready
    pub shutdown_delay: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub memory: Option<Empty>,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    /// `rediss://`: PEM CA certificates to trust instead of the system's
    pub ca_file: Option<String>,
    pub cluster: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub pool_size: Option<u32>,
    /// ours: while Redis is unreachable, enforce each limit divided among this many instances
    /// from memory, instead of on_store_error
    pub local_share: Option<RawLocalShare>,
    /// refused plans remembered locally, answered without a Redis call while they stay refused
    /// (0: off)
    pub over_limit_cache: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLocalShare {
    pub expected_instances: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawOnStoreError {
    Deny,
    Allow,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub zones: Ordered<Vec<String>>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub zone_limits: Option<RawZoneLimits>,
    pub auto_block: Option<RawAutoBlock>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZoneLimits {
    pub trusted: Option<String>,
    pub untrusted: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoBlock {
    pub failed_auth: u64,
    pub within: String,
    pub block_for: String,
    /// our addition: zones whose addresses are never blocked (e.g. [internal])
    #[serde(default)]
    pub exempt_zones: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthentication {
    /// ours: `api_key` or `bearer`, the credential believed when a request carries both
    pub precedence: Option<String>,
    pub api_keys: Option<RawApiKeys>,
    #[serde(default)]
    pub jwt: Vec<RawJwt>,
    pub oauth2_introspection: Option<RawIntrospection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKeys {
    pub header: Option<String>,
    #[serde(default)]
    pub keys: Vec<RawApiKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub id: String,
    pub sha256: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub tier: String,
    #[serde(default)]
    pub revoked: bool,
    /// RFC 3339; the key is refused before (a rotation's new key, listed ahead of time)
    pub not_before: Option<String>,
    /// RFC 3339; the key is refused from then on (a rotation's old key)
    pub expires_at: Option<String>,
}

impl fmt::Debug for RawApiKey {
    // the digest is not the key, but it is what an attacker would grind against: keep it out
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawApiKey")
            .field("id", &self.id)
            .field("sha256", &"[REDACTED]")
            .field("tier", &self.tier)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_file: Option<String>,
    pub jwks_url: Option<String>,
    /// `jwks_url`: refresh the key set this often (sooner when the answer's max-age says so)
    pub jwks_refresh: Option<String>,
    /// `jwks_url`: at most one fetch per cooldown, whatever kids the tokens name
    pub jwks_cooldown: Option<String>,
    /// `jwks_url`: PEM CA certificates trusted besides the Mozilla roots
    pub ca_file: Option<String>,
    /// `jwks_url`: a fetch gives up after this long
    pub timeout: Option<String>,
    #[serde(default)]
    pub algorithms: Vec<String>,
    pub leeway: Option<String>,
    pub roles_claim: Option<String>,
    pub tier_claim: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIntrospection {
    pub endpoint: String,
    pub client_id: String,
    pub client_secret_env: String,
    pub cache_ttl: Option<String>,
    /// a call gives up after this long (the request is then answered 503)
    pub timeout: Option<String>,
    /// PEM CA certificates trusted besides the Mozilla roots
    pub ca_file: Option<String>,
    /// the answer member with role names (space-separated string or array); default `scope`
    pub roles_claim: Option<String>,
    pub tier_claim: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    #[serde(default)]
    pub inherits: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    pub per_minute: u64,
    pub burst: u64,
    pub per_day: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    #[serde(rename = "match")]
    pub matcher: RawMatch,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub allow_roles: Vec<String>,
    pub zones: Option<Vec<String>>,
    pub sensitive: Option<RawSensitive>,
    /// the upstream whose concurrency slots and circuit breaker this route uses (routes naming
    /// the same upstream share them); default: the route's own path pattern
    pub upstream: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub path: String,
    pub methods: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSensitive {
    pub max_auth_age: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRatelimit {
    #[serde(default)]
    pub files: Vec<String>,
    /// add the draft-03 `X-RateLimit-*` headers to RLS answers
    #[serde(default)]
    pub x_ratelimit_headers: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraffic {
    pub concurrency_limit: Option<u64>,
    pub queue_size: Option<u64>,
    pub queue_timeout: Option<String>,
    /// a slot whose completion never comes is freed after this long (default 60s)
    pub lease_ttl: Option<String>,
    pub circuit_breaker: Option<RawBreaker>,
    /// adaptive concurrency per upstream (present: on)
    pub adaptive: Option<RawAdaptive>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdaptive {
    /// the effective limit never goes below this (default: a tenth of concurrency_limit)
    pub min_limit: Option<u64>,
    /// the share of the limit kept on each decrease (default 50%)
    pub decrease: Option<String>,
    /// slots given back per healthy interval (default 1)
    pub increase: Option<u64>,
    /// how often the limit is adjusted (default 5s)
    pub interval: Option<String>,
    /// unhealthy above this error share (default: alerts.error_rate.warn, else 5%)
    pub error_rate: Option<String>,
    /// unhealthy when p99 latency is above this (default: alerts.response_time.warn, else 500ms)
    pub latency: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub error_threshold: Option<String>,
    pub min_requests: Option<u64>,
    pub window: Option<String>,
    pub reset_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body: Option<String>,
    pub max_header_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    #[serde(default)]
    pub sinks: Vec<RawSink>,
    #[serde(default)]
    pub mask_headers: Vec<String>,
    pub checkpoint_every: Option<String>,
    /// this instance's name in events and chain names (default: the host name)
    pub instance: Option<String>,
    /// where a slow sink's events wait on disk (default: the system temp dir)
    pub spill_dir: Option<String>,
    /// PEM (PKCS#8) Ed25519 private key that signs checkpoints
    pub signing_key: Option<String>,
    /// checkpoints are also appended here (keep it apart from the log)
    pub checkpoint_file: Option<String>,
    /// every checkpoint is POSTed (JSON) to each of these (an external notary)
    #[serde(default)]
    pub anchor_webhooks: Vec<String>,
    /// events a sink may have waiting in memory before it spills to disk (default 8192)
    pub sink_queue: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    pub stdout: Option<Empty>,
    pub file: Option<RawFileSink>,
    pub redis_stream: Option<RawRedisStream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSink {
    pub path: String,
    /// always (every event) | interval (once a second, the default) | never (the OS decides)
    pub fsync: Option<String>,
    /// rotate when the file reaches this size (e.g. 100MB)
    pub max_size: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisStream {
    pub key: String,
    pub max_len: Option<u64>,
    /// default: the store's Redis
    pub url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub error_rate: Option<RawThreshold>,
    pub response_time: Option<RawThreshold>,
    pub failed_auth: Option<RawThreshold>,
    pub payload_size: Option<RawThreshold>,
    #[serde(default)]
    pub webhooks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThreshold {
    pub warn: String,
    pub critical: String,
    /// failed_auth only: block the address at its critical alert
    pub block: Option<bool>,
}
