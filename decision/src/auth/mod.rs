//! Credentials that need more than a table lookup: JWT bearer tokens (`jwt`) and opaque OAuth
//! 2.0 tokens (`introspection`); `BearerRouter` is the one verifier the core calls, routing each token. API
//! keys are checked in the core (`decision_core::apikey`). `numeric_date` reads the time claims
//! of both kinds of token.

pub mod introspection;
pub mod jwt;

use decision_core::Reason;
use decision_core::identity::{BearerVerifier, Fetch, VerifiedToken};
use decision_core::units::{MICROS_PER_SEC, Micros};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// The bearer verifiers' counters, shared by every verifier a policy builds and handed on to
/// the next policy at a reload (`config::load_with`), so the series survive a reload.
#[derive(Debug, Clone, Default)]
pub struct AuthMetrics {
    /// roles named in verified tokens that the policy does not know (ignored)
    pub unknown_roles: Counter,
    /// JWKS fetches (`jwks_url`) that brought a usable key set
    pub jwks_fetches: Counter,
    /// JWKS fetches that failed; the last good set stays in force
    pub jwks_fetch_errors: Counter,
    /// JWKS keys that cannot verify signatures (encryption keys, unsupported types), skipped;
    /// each distinct key counted once per issuer
    pub jwks_keys_skipped: Counter,
    /// OAuth 2.0 introspection calls the endpoint answered
    pub introspection_calls: Counter,
    /// introspection calls that failed (the request was answered 503)
    pub introspection_errors: Counter,
}

impl AuthMetrics {
    /// Registers the counters as `portcullis_jwt_unknown_roles_total`,
    /// `portcullis_jwks_fetches_total`, `portcullis_jwks_fetch_errors_total`,
    /// `portcullis_jwks_keys_skipped_total`, `portcullis_introspection_calls_total` and
    /// `portcullis_introspection_errors_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "jwt_unknown_roles",
            "Roles named in verified tokens that the policy does not know (ignored)",
            self.unknown_roles.clone(),
        );
        registry.register(
            "jwks_fetches",
            "JWKS fetches (jwks_url) that brought a usable key set",
            self.jwks_fetches.clone(),
        );
        registry.register(
            "jwks_fetch_errors",
            "JWKS fetches that failed; the last good key set stays in force",
            self.jwks_fetch_errors.clone(),
        );
        registry.register(
            "jwks_keys_skipped",
            "JWKS keys that cannot verify signatures (encryption keys, unsupported types), skipped",
            self.jwks_keys_skipped.clone(),
        );
        registry.register(
            "introspection_calls",
            "OAuth 2.0 introspection calls answered by the endpoint",
            self.introspection_calls.clone(),
        );
        registry.register(
            "introspection_errors",
            "OAuth 2.0 introspection calls that failed (the request was answered 503)",
            self.introspection_errors.clone(),
        );
    }
}

/// An RFC 7519 NumericDate (section 2: a JSON number of seconds since the epoch, which "can
/// represent non-integer values") as microseconds: integers, fractions (`1700000000.5`) and
/// exponent forms (`1.7e9`) alike, truncated to the microsecond and saturating at the far
/// future. A negative, non-finite or non-number value is `None`.
pub fn numeric_date(v: &serde_json::Value) -> Option<Micros> {
    if let Some(s) = v.as_u64() {
        return Some(s.saturating_mul(MICROS_PER_SEC));
    }
    let f = v.as_f64()?;
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    // `as` saturates at u64::MAX for values past it, which is what a date that far out means
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((f * MICROS_PER_SEC as f64) as Micros)
}

/// Every bearer-token mechanism a policy enables, behind the one verifier the core calls: a
/// token shaped like a JWT goes to the JWT issuers when there are any; everything else (and
/// every token when there are none) to introspection when it is configured.
#[derive(Debug)]
pub struct BearerRouter {
    pub jwt: Option<crate::auth::jwt::JwtVerifier>,
    pub introspection: Option<std::sync::Arc<introspection::Introspector>>,
}

impl BearerRouter {
    fn is_jwt(&self, token: &str) -> bool {
        self.jwt.is_some() && (self.introspection.is_none() || token.bytes().filter(|b| *b == b'.').count() == 2)
    }
}

impl BearerVerifier for BearerRouter {
    fn verify(&self, token: &str, now: Micros) -> Result<VerifiedToken, Reason> {
        match (&self.jwt, &self.introspection) {
            (Some(jwt), _) if self.is_jwt(token) => jwt.verify(token, now),
            (_, Some(i)) => i.verify(token, now),
            _ => Err(Reason::BearerNotEnabled),
        }
    }

    fn fetch_for(&self, token: &str, reason: Reason) -> Option<Fetch> {
        match (&self.jwt, &self.introspection) {
            (Some(jwt), _) if self.is_jwt(token) => jwt.fetch_for(token, reason),
            (_, Some(i)) => i.fetch_for(token, reason),
            _ => None,
        }
    }

    fn background(&self) -> Option<Fetch> {
        self.jwt.as_ref().and_then(|j| j.background())
    }
}
