//! The compiled policy: what the config layer builds from a validated file, shaped for fast
//! lookups on the request path (CIDR tables, role bit masks, digest-indexed keys, parsed globs).

use std::sync::Arc;

use crate::apikey::ApiKeyTable;
use crate::glob::PathPattern;
use crate::net::CidrTable;
use crate::quota::Limit;
use crate::rls::RlsConfig;
use crate::roles::RoleTable;
use crate::units::{Micros, Rate};

/// What to answer when the store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// 503, so that the client retries (the safe default)
    #[default]
    Deny,
    /// let the request through, marked as not counted
    Allow,
}

#[derive(Debug, Clone)]
pub struct Tier {
    pub name: Arc<str>,
    pub per_minute: u64,
    pub burst: u64,
    pub per_day: u64,
    /// the token bucket (refill per_minute a minute, capacity burst)
    pub bucket: Limit,
    /// the 24-hour sliding window
    pub daily: Limit,
}

/// Named trust zones; bit i of a zone mask is `names[i]`.
#[derive(Debug, Clone, Default)]
pub struct Zones {
    pub names: Vec<String>,
    pub table: CidrTable,
}

/// The pseudo-zone of an address in no named zone.
pub const UNTRUSTED: &str = "untrusted";
/// The bit a route's zone mask uses for `untrusted`.
pub const UNTRUSTED_BIT: u64 = 1 << 63;

impl Zones {
    /// The zone mask of an address: the bits of its named zones, or [`UNTRUSTED_BIT`].
    pub fn of(&self, ip: std::net::IpAddr) -> u64 {
        match self.table.lookup(ip) {
            0 => UNTRUSTED_BIT,
            m => m,
        }
    }

    /// The name of the first zone in a mask (for logs and headers).
    pub fn name(&self, mask: u64) -> &str {
        if mask & UNTRUSTED_BIT != 0 || mask == 0 {
            return UNTRUSTED;
        }
        self.names.get(mask.trailing_zeros() as usize).map_or(UNTRUSTED, String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Network {
    pub trusted_proxies: CidrTable,
    pub deny: CidrTable,
    pub zones: Zones,
    /// per client IP: a sliding window for addresses in a named zone, and for the rest
    pub zone_limit_trusted: Option<Limit>,
    pub zone_limit_untrusted: Option<Limit>,
    pub auto_block: Option<AutoBlock>,
}

/// Failed authentications from one address, `failed_auth` of them within `within`, block that
/// address for `block_for` (fleet-wide: the counters are in the store).
#[derive(Debug, Clone, Copy)]
pub struct AutoBlock {
    /// the failure counter: a sliding window that refuses the `failed_auth`-th failure
    pub failures: Limit,
    pub block: Limit,
    /// zones whose addresses are never blocked (bits, as route zones)
    pub exempt_zones: u64,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// the rule's position in `routes` (0-based), for logs and metrics
    pub index: usize,
    pub pattern: PathPattern,
    /// upper-case methods; empty means any method
    pub methods: Vec<String>,
    pub public: bool,
    /// roles allowed (bits; a holder's granted mask must intersect it); 0 with `public`
    pub allow_roles: u64,
    /// zones the route may be called from (bits, with [`UNTRUSTED_BIT`]); None: anywhere
    pub zones: Option<u64>,
    /// needs an authentication no older than this (API keys never satisfy it)
    pub max_auth_age: Option<Micros>,
    /// the upstream whose slots and breaker the route's requests use (`upstream`, else the
    /// route's path pattern)
    pub upstream: std::sync::Arc<str>,
    /// the upstream's store key: 16 hex characters of its name's SHA-256 (names may hold any
    /// character; keys must not)
    pub upstream_key: std::sync::Arc<str>,
}

impl Route {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && self.pattern.matches(path)
    }
}

/// Which version of the IETF "RateLimit header fields for HTTP" draft (httpapi working group,
/// draft-ietf-httpapi-ratelimit-headers) the `RateLimit*` response headers follow
/// (`ratelimit_headers` in the policy). Only drafts whose text was read are here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderDialect {
    /// -06: `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (Integer Items, the
    /// closest limit) and `RateLimit-Policy: 100;w=60, ...`
    Draft06,
    /// -07: `RateLimit: limit=100, remaining=50, reset=5` (a Dictionary, the closest limit) and
    /// `RateLimit-Policy: 100;w=60, ...`
    Draft07,
    /// -08 to -11 (one syntax): `RateLimit-Policy: "burst";q=100;w=60, ...` and
    /// `RateLimit: "burst";r=50;t=30, ...`, one member per limit, named
    #[default]
    Draft10,
    /// no `RateLimit*` headers at all
    None,
}

impl HeaderDialect {
    /// The policy's names: `draft-06` .. `draft-11`, `none`.
    pub fn parse(s: &str) -> Option<HeaderDialect> {
        Some(match s {
            "draft-06" => HeaderDialect::Draft06,
            "draft-07" => HeaderDialect::Draft07,
            "draft-08" | "draft-09" | "draft-10" | "draft-11" => HeaderDialect::Draft10,
            "none" => HeaderDialect::None,
            _ => return None,
        })
    }
}

/// Which credential is believed when a request carries an API key and an `authorization`
/// header (`authentication.precedence`); the other one is removed before the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precedence {
    ApiKey,
    Bearer,
}

impl Precedence {
    /// The policy's names: `api_key`, `bearer`.
    pub fn parse(s: &str) -> Option<Precedence> {
        match s {
            "api_key" => Some(Precedence::ApiKey),
            "bearer" => Some(Precedence::Bearer),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub network: Network,
    pub api_keys: ApiKeyTable,
    /// API keys kept in the store (the admin API's), consulted after `api_keys`; the host sets
    /// it, compiled against this policy's roles and tiers
    pub store_keys: Option<std::sync::Arc<dyn crate::apikey::KeyDirectory>>,
    /// verifies bearer tokens when JWT issuers are configured
    pub bearer: Option<std::sync::Arc<dyn crate::identity::BearerVerifier>>,
    /// None: a request with two credentials is refused (`ambiguous_credentials`)
    pub credential_precedence: Option<Precedence>,
    pub roles: RoleTable,
    pub tiers: Vec<Tier>,
    /// basis points of `per_day` past which a warning is attached
    pub quota_warning: Option<u32>,
    pub routes: Vec<Route>,
    pub max_body: u64,
    pub max_header_bytes: u64,
    pub on_store_error: OnStoreError,
    /// Envoy ratelimit (RLS) domains, from `ratelimit.files`
    pub ratelimit: RlsConfig,
    /// the draft the `RateLimit*` response headers follow, on every door
    pub ratelimit_headers: HeaderDialect,
    /// concurrency slots, queue and circuit breaker per upstream (`traffic`)
    pub traffic: Option<crate::traffic::TrafficConfig>,
    /// the version the host gave this policy (a digest of its files; empty when none), carried
    /// into every decision's audit event
    pub version: std::sync::Arc<str>,
}

impl Policy {
    /// The upstream name of a store key (a lease's completion names its upstream by key).
    pub fn upstream_by_key(&self, key: &str) -> Option<&std::sync::Arc<str>> {
        self.routes.iter().find(|r| &*r.upstream_key == key).map(|r| &r.upstream)
    }

    pub fn tier(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| &*t.name == name)
    }

    pub fn zone_limit(&self, zone_mask: u64) -> Option<Limit> {
        if zone_mask & UNTRUSTED_BIT != 0 { self.network.zone_limit_untrusted } else { self.network.zone_limit_trusted }
    }
}

/// A zone limit from its policy rate, as a sliding window.
pub fn zone_limit(rate: Rate) -> Limit {
    Limit::SlidingWindow { limit: rate.count, window: rate.per }
}
