//! `roles`, `tiers`, `authentication.api_keys` and `routes`: who may do what, with the
//! reference guide's roles and tiers where the policy gives none.

use std::sync::Arc;

use decision_core::apikey::{self, ApiKey, ApiKeyTable};
use decision_core::glob::PathPattern;
use decision_core::policy::{Route, Tier, Zones};
use decision_core::quota::Limit;
use decision_core::roles::{RoleError, RoleTable};
use decision_core::units::{self, MICROS_PER_DAY, MICROS_PER_MINUTE};

use super::Validator;
use super::raw::{self, Ordered, RawRole, RawTier};

pub const DEFAULT_API_KEY_HEADER: &str = "x-api-key";
/// The reference guide's tiers: (name, per minute, burst, per day).
pub const DEFAULT_TIERS: [(&str, u64, u64, u64); 3] =
    [("basic", 60, 100, 5_000), ("business", 300, 500, 25_000), ("enterprise", 1_000, 2_000, 100_000)];
/// The reference guide's roles: (name, inherits).
pub const DEFAULT_ROLES: [(&str, &[&str]); 4] =
    [("admin", &["developer"]), ("developer", &["user"]), ("user", &[]), ("service", &[])];
/// An upstream's store key: 16 hex characters of its name's SHA-256.
fn upstream_key(name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    decision_core::encode::hex(&digest[..8])
}

impl Validator<'_> {
    pub(super) fn roles(&mut self, raw: Option<Ordered<RawRole>>) -> Option<RoleTable> {
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

    pub(super) fn tiers(&mut self, raw: Option<Ordered<RawTier>>) -> Vec<Tier> {
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

    pub(super) fn api_keys(&mut self, raw: raw::RawApiKeys, roles: Option<&RoleTable>, tiers: &[Tier]) -> ApiKeyTable {
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

    pub(super) fn routes(&mut self, raw: &[raw::RawRoute], roles: Option<&RoleTable>, zones: &Zones) -> Vec<Route> {
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
}
