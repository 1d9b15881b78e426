//! `authentication.jwt` and `authentication.oauth2_introspection`: the bearer token
//! verifiers, built by `auth` from the settings validated here.

use std::sync::Arc;
use std::time::Duration;

use decision_core::policy::Tier;
use decision_core::roles::RoleTable;
use decision_core::units;

use super::{Validator, env_secret, raw};

/// Algorithms a JWT issuer may list; `none` and the HMAC family (shared secrets do not belong
/// in a JWKS) are refused.
pub const JWT_ALGORITHMS: [&str; 10] =
    ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"];
/// Clock skew allowed on a token's exp, nbf and iat when the policy does not say.
pub const DEFAULT_JWT_LEEWAY: &str = "30s";
/// The most clock skew an issuer may be allowed (RFC 7519 asks for "a few minutes" at most);
/// a revocation lasts this long past a token's `exp`, so it never lapses while the token works.
pub const MAX_JWT_LEEWAY: decision_core::units::Micros = 5 * 60 * 1_000_000;
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

impl Validator<'_> {
    pub(super) fn jwt(
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
                    Ok(text) => {
                        super::read_source(&self.base.join(f), text.as_bytes());
                        Some(Jwks::Document(text))
                    }
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
            if leeway > MAX_JWT_LEEWAY {
                self.err(format!("{path}.leeway"), "at most 5m (clock skew, not a grace period)");
            }
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
                    self.auth_metrics,
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
        Some(crate::auth::jwt::JwtVerifier::new(built, self.auth_metrics))
    }

    /// The HTTPS client of an outbound call: the CA file (relative to the policy) and timeout.
    pub(super) fn https_client(
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

    pub(super) fn introspection(
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
            metrics: self.auth_metrics.clone(),
        }))
    }
}
