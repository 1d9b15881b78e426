//! OAuth 2.0 token introspection (RFC 7662) for opaque bearer tokens.
//!
//! `verify` answers from a cache keyed by the token's SHA-256: a hit is the answer; a miss asks
//! the host (through `fetch_for`) to POST the token to the endpoint with the client's
//! credentials and decide again. Active and inactive answers are cached for `cache_ttl`, never
//! past the token's `exp`. An endpoint that cannot be asked (refused, slow, 5xx, nonsense)
//! leaves no cache entry, and the request is answered 503 `introspection_unavailable`, so
//! clients retry instead of discarding a good token; for a second after such an outage misses
//! are answered 503 at once rather than piling onto the endpoint.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decision_core::Reason;
use decision_core::identity::{CredentialKind, Fetch, VerifiedToken};
use decision_core::units::Micros;
use sha2::{Digest, Sha256};

use super::AuthMetrics;
use crate::https::{HttpsClient, Url, form_encode};

/// Longest opaque token sent to the endpoint.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest introspection answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Answers remembered at most.
const CACHE_ENTRIES: usize = 100_000;
/// After a failed call, misses are answered 503 at once for this long.
const OUTAGE_HOLD: Duration = Duration::from_secs(1);

pub struct Settings {
    pub endpoint: Url,
    pub client: HttpsClient,
    pub client_id: String,
    pub client_secret: String,
    pub cache_ttl: Micros,
    /// the answer member holding role names (a space-separated string or an array)
    pub roles_claim: String,
    pub tier_claim: String,
    pub roles: HashMap<String, u64>,
    pub tiers: HashMap<String, usize>,
    pub default_tier: Option<usize>,
    pub metrics: AuthMetrics,
}

struct Entry {
    answer: Result<VerifiedToken, Reason>,
    until: Micros,
}

pub struct Introspector {
    settings: Settings,
    /// `Basic base64(id:secret)`, built once
    authorization: String,
    cache: Mutex<HashMap<[u8; 32], Entry>>,
    outage_until: Mutex<Option<Instant>>,
}

impl fmt::Debug for Introspector {
    // the credentials stay out of every debug print
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspector")
            .field("endpoint", &self.settings.endpoint.to_string())
            .field("client_id", &self.settings.client_id)
            .finish_non_exhaustive()
    }
}

impl Introspector {
    pub fn new(settings: Settings) -> Arc<Introspector> {
        let pair = format!("{}:{}", form_encode(&settings.client_id), form_encode(&settings.client_secret));
        let authorization = format!("Basic {}", decision_core::encode::b64(pair.as_bytes()));
        Arc::new(Introspector {
            settings,
            authorization,
            cache: Mutex::new(HashMap::new()),
            outage_until: Mutex::new(None),
        })
    }

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The cached answer for a token, if any.
    pub fn verify(&self, token: &str, now: Micros) -> Result<VerifiedToken, Reason> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reason::TokenInactive);
        }
        let digest = Self::digest(token);
        match self.cache.lock().ok().and_then(|c| c.get(&digest).filter(|e| now < e.until).map(|e| e.answer.clone())) {
            Some(answer) => answer,
            None => Err(Reason::IntrospectionUnavailable),
        }
    }

    /// On a miss: ask the endpoint, unless it failed a moment ago.
    pub fn fetch_for(self: &Arc<Self>, token: &str, reason: Reason) -> Option<Fetch> {
        if reason != Reason::IntrospectionUnavailable || token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        if self.outage_until.lock().ok().and_then(|o| *o).is_some_and(|t| crate::clock::instant() < t) {
            return None;
        }
        let me = self.clone();
        let token = token.to_owned();
        Some(Box::pin(async move { me.introspect(&token).await }))
    }

    async fn introspect(&self, token: &str) {
        let form = format!("token={}&token_type_hint=access_token", form_encode(token));
        let reply = self.settings.client.post_form(&self.settings.endpoint, &self.authorization, form).await;
        let now = crate::clock::now_micros();
        let parsed = match reply {
            Ok(r) if r.status == reqwest::StatusCode::OK => serde_json::from_slice::<serde_json::Value>(&r.body)
                .map_err(|e| format!("not JSON: {e}"))
                .and_then(|v| match v {
                    serde_json::Value::Object(m) => Ok(m),
                    _ => Err("not a JSON object".to_owned()),
                }),
            Ok(r) => Err(format!("HTTP status {}", r.status.as_u16())),
            Err(e) => Err(e.to_string()),
        };
        let answer = match parsed {
            Ok(m) => m,
            Err(e) => {
                self.settings.metrics.introspection_errors.inc();
                if let Ok(mut o) = self.outage_until.lock() {
                    *o = Some(crate::clock::instant() + OUTAGE_HOLD);
                }
                tracing::warn!(endpoint = %self.settings.endpoint, error = %e, "token introspection failed");
                return;
            }
        };
        self.settings.metrics.introspection_calls.inc();
        let (answer, until) = self.judge(token, &answer, now);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, e| now < e.until);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(Self::digest(token), Entry { answer, until });
        }
    }

    /// What an answer means, and until when it may be believed.
    fn judge(
        &self,
        token: &str,
        m: &serde_json::Map<String, serde_json::Value>,
        now: Micros,
    ) -> (Result<VerifiedToken, Reason>, Micros) {
        let s = &self.settings;
        let ttl_end = now.saturating_add(s.cache_ttl);
        if m.get("active") != Some(&serde_json::Value::Bool(true)) {
            return (Err(Reason::TokenInactive), ttl_end);
        }
        // RFC 7662 section 2.2 uses RFC 7519 NumericDate: fractions and exponents are valid
        let secs = |k: &str| m.get(k).and_then(super::numeric_date);
        let exp = secs("exp");
        if exp.is_some_and(|e| e <= now) {
            return (Err(Reason::TokenInactive), ttl_end);
        }
        if secs("nbf").is_some_and(|n| n > now) {
            return (Err(Reason::TokenInactive), ttl_end.min(secs("nbf").unwrap_or(ttl_end)));
        }
        let until = exp.map_or(ttl_end, |e| e.min(ttl_end));
        let subject = match (m.get("sub").and_then(|v| v.as_str()), m.get("client_id").and_then(|v| v.as_str())) {
            (Some(sub), _) if !sub.is_empty() => format!("oauth:{sub}"),
            (_, Some(client)) if !client.is_empty() => format!("oauth:client:{client}"),
            _ => format!("oauth:token:{}", &decision_core::encode::hex(&Self::digest(token))[..16]),
        };
        let mut roles = 0;
        let names: Vec<&str> = match m.get(&s.roles_claim) {
            Some(serde_json::Value::String(scope)) => scope.split(' ').filter(|r| !r.is_empty()).collect(),
            Some(serde_json::Value::Array(list)) => list.iter().filter_map(|v| v.as_str()).collect(),
            _ => Vec::new(),
        };
        for name in names {
            match s.roles.get(name) {
                Some(bits) => roles |= bits,
                None => {
                    s.metrics.unknown_roles.inc();
                }
            }
        }
        let tier = match m.get(&s.tier_claim) {
            None => s.default_tier,
            Some(t) => t.as_str().and_then(|t| s.tiers.get(t)).copied(),
        };
        let Some(tier) = tier else { return (Err(Reason::TokenInactive), ttl_end) };
        let auth_time = secs("auth_time").or(secs("iat"));
        let token = VerifiedToken {
            subject: Arc::from(subject.as_str()),
            roles,
            tier,
            auth_time,
            expires_at: until,
            credential: CredentialKind::Introspected,
            // an opaque token is revoked by its digest: the admin API has the token, not what
            // the issuer's introspection would say of it
            token_id: decision_core::identity::token_id(None, token),
        };
        (Ok(token), until)
    }
}
