//! JWT bearer tokens, verified against keys from the policy's `jwks_file` (read with the
//! policy) or `jwks_url` (fetched over HTTPS: at once, in the background before it goes stale,
//! and again when a token names a `kid` we do not hold; those refetches are rate-limited by a
//! cooldown and a negative cache of unknown kids, so a flood of random kids cannot turn
//! portcullis into a load generator against the issuer; a failed fetch keeps the last good set).
//!
//! `jsonwebtoken` is used for the signature only; everything else is checked here, with the
//! policy's leeway and portcullis's clock, because the crate's defaults are not ours (a 60 s
//! leeway, a missing `iss` or a future `nbf` accepted unless asked). In order, before any
//! signature work: size (8 KiB), shape, duplicated JSON members in the header or the claims,
//! `crit`, the algorithm against the issuer's allow-list (so `none` and anything unlisted never
//! reach a verifier), the issuer, the key by `kid`, and the key type against the algorithm (an
//! RSA public key is never used as an HMAC secret). Then the signature, `exp` (required), `nbf`,
//! `iat`, `aud`, `sub`, roles and tier. A verified token is cached by its SHA-256 until it
//! expires, so a steady client costs one hash and one lookup.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use decision_core::Reason;
use decision_core::identity::{BearerVerifier, CredentialKind, Fetch, VerifiedToken};
use decision_core::units::Micros;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use sha2::{Digest, Sha256};

use super::AuthMetrics;

/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Verified tokens remembered at most.
pub const CACHE_ENTRIES: usize = 100_000;

/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Unknown kids remembered between two fetches at most.
const NEGATIVE_KIDS: usize = 4096;

struct Key {
    kid: Option<String>,
    /// the algorithm the JWK pins, if any
    alg: Option<Algorithm>,
    params: AlgorithmParameters,
    decoding: DecodingKey,
}

/// The keys an issuer signs with, swapped whole when a fetch brings a new set.
#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    /// false until a `jwks_url` issuer's first fetch succeeds
    loaded: bool,
}

/// Where an issuer's keys come from.
pub enum KeySource<'a> {
    /// a JWKS document read with the policy (`jwks_file`)
    Document(&'a str),
    /// `jwks_url`: fetched now and then
    Url {
        url: crate::https::Url,
        client: crate::https::HttpsClient,
        /// refresh this often in the background (sooner when the answer's max-age says so)
        refresh: Duration,
        /// at most one fetch per cooldown, whatever the tokens say
        cooldown: Duration,
    },
}

/// A `jwks_url` issuer's fetching state.
struct Remote {
    iss: String,
    url: crate::https::Url,
    client: crate::https::HttpsClient,
    refresh: Duration,
    cooldown: Duration,
    keys: Arc<ArcSwap<KeySet>>,
    /// held while a fetch runs, so concurrent callers wait for it rather than fetch again
    gate: tokio::sync::Mutex<()>,
    /// when the last fetch started
    last: Mutex<Option<Instant>>,
    /// bumped by every successful fetch
    generation: AtomicU64,
    metrics: AuthMetrics,
    /// the negative cache: kids still unknown after a fetch, and when; no refetch on their
    /// account for a cooldown
    unknown: Mutex<HashMap<String, Instant>>,
    /// the unusable keys already warned about and counted, so a refresh does not repeat them
    skipped: Mutex<std::collections::HashSet<String>>,
}

impl Remote {
    /// One fetch; on success the new set replaces the old one. Returns the answer's max-age.
    async fn fetch(&self) -> Result<Option<u64>, String> {
        if let Ok(mut last) = self.last.lock() {
            *last = Some(crate::clock::instant());
        }
        let result = match self.client.get(&self.url).await {
            Ok(r) if r.status == reqwest::StatusCode::OK => std::str::from_utf8(&r.body)
                .map_err(|e| e.to_string())
                .and_then(parse_jwks)
                .map(|keys| (keys, r.max_age)),
            Ok(r) => Err(format!("HTTP status {}", r.status.as_u16())),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(((keys, skipped), max_age)) => {
                let n = keys.len();
                if let Ok(mut seen) = self.skipped.lock() {
                    for why in skipped {
                        if seen.len() < NEGATIVE_KIDS && seen.insert(why.clone()) {
                            skipped_key(&self.metrics, &self.iss, &why);
                        }
                    }
                }
                self.keys.store(Arc::new(KeySet { keys, loaded: true }));
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut u) = self.unknown.lock() {
                    u.clear();
                }
                self.metrics.jwks_fetches.inc();
                tracing::info!(issuer = %self.iss, url = %self.url, keys = n, "JWKS fetched");
                Ok(max_age)
            }
            Err(e) => {
                self.metrics.jwks_fetch_errors.inc();
                tracing::warn!(issuer = %self.iss, url = %self.url, error = %e, "JWKS fetch failed; keeping the last good key set");
                Err(e)
            }
        }
    }

    fn cooling(&self) -> bool {
        self.last.lock().ok().and_then(|l| *l).is_some_and(|t| t.elapsed() < self.cooldown)
    }

    fn forget(&self, kid: Option<&str>) {
        if let (Some(kid), Ok(mut u)) = (kid, self.unknown.lock()) {
            if u.len() >= NEGATIVE_KIDS {
                let cooldown = self.cooldown;
                u.retain(|_, t| t.elapsed() < cooldown);
                if u.len() >= NEGATIVE_KIDS {
                    u.clear();
                }
            }
            u.insert(kid.to_owned(), crate::clock::instant());
        }
    }

    /// Whether a kid is in the negative cache.
    fn known_unknown(&self, kid: &str) -> bool {
        self.unknown.lock().is_ok_and(|u| u.get(kid).is_some_and(|t| t.elapsed() < self.cooldown))
    }

    /// On demand, for a token whose kid we lack: wait for a fetch already running, else fetch
    /// unless the cooldown forbids it.
    async fn refetch(self: Arc<Self>, kid: Option<String>) {
        let seen = self.generation.load(Ordering::Acquire);
        let _gate = self.gate.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return; // a fetch finished while we waited
        }
        if self.cooling() {
            self.forget(kid.as_deref());
            return;
        }
        let _ = self.fetch().await;
        if !self.keys.load().keys.iter().any(|k| k.kid == kid) {
            self.forget(kid.as_deref());
        }
    }

    /// In the background: fetch, then again before the set goes stale; after a failure, again
    /// after the cooldown. Ends once the issuer is dropped (a reload replaced it).
    async fn run(weak: Weak<Remote>) {
        loop {
            let Some(remote) = weak.upgrade() else { return };
            let wait = {
                let _gate = remote.gate.lock().await;
                match remote.fetch().await {
                    Ok(max_age) => max_age
                        .map_or(remote.refresh, |a| Duration::from_secs(a).clamp(remote.cooldown, remote.refresh)),
                    Err(_) => remote.cooldown,
                }
            };
            drop(remote);
            tokio::time::sleep(wait).await;
        }
    }
}

/// The keys of a JWKS document (RFC 7517) that can verify signatures, and a description of
/// each key skipped: identity providers publish encryption keys (`use: enc`, `alg: RSA-OAEP`)
/// and keys of types we do not verify beside their signing keys, and one of those must not make
/// the whole set unusable. Only a document that is not a JWKS, or holds no usable key, is an
/// error.
fn parse_jwks(text: &str) -> Result<(Vec<Key>, Vec<String>), String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_str(text).map_err(|e| format!("invalid JWKS: {e}"))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        let name = match &kid {
            Some(k) => format!("key {i} (kid {k:?})"),
            None => format!("key {i}"),
        };
        match usable(raw) {
            Ok(k) => keys.push(k),
            Err(why) => skipped.push(format!("{name}: {why}")),
        }
    }
    if keys.is_empty() {
        return Err(if skipped.is_empty() {
            "the JWKS holds no key".into()
        } else {
            format!("the JWKS holds no usable key ({})", skipped.join("; "))
        });
    }
    Ok((keys, skipped))
}

/// Counts and warns about a JWKS key the verifier cannot use (`why` names it and says why).
fn skipped_key(metrics: &AuthMetrics, issuer: &str, why: &str) {
    metrics.jwks_keys_skipped.inc();
    tracing::warn!(issuer, key = why, "JWKS key skipped: it cannot verify signatures");
}

/// A signature-verification key from one JWK, or why it is not one.
fn usable(raw: serde_json::Value) -> Result<Key, String> {
    // RFC 7517 section 4.2 and 4.3: a key meant for encryption, or whose operations exclude
    // `verify`, must not verify signatures
    if let Some(u) = raw.get("use")
        && u.as_str() != Some("sig")
    {
        return Err(format!("not a signature key (use {u})"));
    }
    if let Some(ops) = raw.get("key_ops") {
        let verifies = ops.as_array().is_some_and(|a| a.iter().any(|o| o.as_str() == Some("verify")));
        if !verifies {
            return Err(format!("key_ops {ops} does not include \"verify\""));
        }
    }
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("unsupported key: {e}"))?;
    key(&jwk)
}

/// One trusted issuer.
pub struct Issuer {
    pub iss: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Micros,
    pub roles_claim: String,
    pub tier_claim: String,
    /// role name -> granted bits (with inheritance)
    pub roles: HashMap<String, u64>,
    /// tier name -> index
    pub tiers: HashMap<String, usize>,
    /// the tier of a token without a tier claim
    pub default_tier: Option<usize>,
    keys: Arc<ArcSwap<KeySet>>,
    remote: Option<Arc<Remote>>,
}

impl Issuer {
    /// Builds an issuer; keys of unsupported types in a JWKS document are refused. A
    /// `jwks_url` issuer starts with no key and fetches on first use or in the background.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        iss: String,
        audiences: Vec<String>,
        algorithms: Vec<Algorithm>,
        leeway: Micros,
        roles_claim: String,
        tier_claim: String,
        roles: HashMap<String, u64>,
        tiers: HashMap<String, usize>,
        default_tier: Option<usize>,
        source: KeySource<'_>,
        metrics: &AuthMetrics,
    ) -> Result<Issuer, String> {
        let (keys, remote) = match source {
            KeySource::Document(text) => {
                let (keys, skipped) = parse_jwks(text)?;
                for why in &skipped {
                    skipped_key(metrics, &iss, why);
                }
                (Arc::new(ArcSwap::from_pointee(KeySet { keys, loaded: true })), None)
            }
            KeySource::Url { url, client, refresh, cooldown } => {
                let keys = Arc::new(ArcSwap::from_pointee(KeySet::default()));
                let remote = Remote {
                    iss: iss.clone(),
                    url,
                    client,
                    refresh,
                    cooldown,
                    keys: keys.clone(),
                    gate: tokio::sync::Mutex::new(()),
                    last: Mutex::new(None),
                    generation: AtomicU64::new(0),
                    unknown: Mutex::new(HashMap::new()),
                    skipped: Mutex::new(std::collections::HashSet::new()),
                    metrics: metrics.clone(),
                };
                (keys, Some(Arc::new(remote)))
            }
        };
        Ok(Issuer {
            iss,
            audiences,
            algorithms,
            leeway,
            roles_claim,
            tier_claim,
            roles,
            tiers,
            default_tier,
            keys,
            remote,
        })
    }
}

fn key(jwk: &Jwk) -> Result<Key, String> {
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return Err("symmetric (oct) keys are not accepted in a JWKS".into());
    }
    let decoding = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let alg = match &jwk.common.key_algorithm {
        Some(a) => Some(a.to_string().parse::<Algorithm>().map_err(|_| format!("unsupported alg {a:?}"))?),
        None => None,
    };
    Ok(Key { kid: jwk.common.key_id.clone(), alg, params: jwk.algorithm.clone(), decoding })
}

/// Whether a key of this type may verify this algorithm (RS/HS confusion and friends refused).
fn key_fits(params: &AlgorithmParameters, alg: Algorithm) -> bool {
    use Algorithm::*;
    match params {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(ec) => {
            matches!((&ec.curve, alg), (EllipticCurve::P256, ES256) | (EllipticCurve::P384, ES384))
        }
        AlgorithmParameters::OctetKeyPair(okp) => matches!((&okp.curve, alg), (EllipticCurve::Ed25519, EdDSA)),
        _ => false,
    }
}

/// A JSON object whose top-level members must be unique (a duplicated `roles` claim is a
/// classic way to make two parsers disagree).
struct Unique(serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Unique;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(k) = map.next_key::<String>()? {
                    let v: serde_json::Value = map.next_value()?;
                    if out.insert(k.clone(), v).is_some() {
                        return Err(de::Error::custom(format!("duplicate member {k:?}")));
                    }
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn object(part: &str) -> Result<serde_json::Map<String, serde_json::Value>, Reason> {
    let bytes = decision_core::encode::b64url_decode(part).ok_or(Reason::JwtMalformed)?;
    match serde_json::from_slice::<Unique>(&bytes) {
        Ok(u) => Ok(u.0),
        Err(e) if e.to_string().contains("duplicate member") => Err(Reason::JwtDuplicateMember),
        Err(_) => Err(Reason::JwtMalformed),
    }
}

fn secs(v: Option<&serde_json::Value>) -> Result<Option<Micros>, Reason> {
    match v {
        None => Ok(None),
        Some(v) => super::numeric_date(v).map(Some).ok_or(Reason::JwtMalformed),
    }
}

struct Cached {
    token: VerifiedToken,
    not_before: Option<Micros>,
}

pub struct JwtVerifier {
    issuers: Vec<Issuer>,
    metrics: AuthMetrics,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.iter().map(|i| i.iss.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

impl JwtVerifier {
    pub fn new(issuers: Vec<Issuer>, metrics: &AuthMetrics) -> JwtVerifier {
        JwtVerifier { issuers, metrics: metrics.clone(), cache: Mutex::new(HashMap::new()) }
    }

    /// Verified tokens held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    fn verify_uncached(&self, token: &str, now: Micros) -> Result<(VerifiedToken, Option<Micros>), Reason> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(Reason::JwtMalformed);
        };
        let header = object(h)?;
        if header.contains_key("crit") {
            // we implement no JWS extension, so any critical one must be refused (RFC 7515 4.1.11)
            return Err(Reason::JwtCritUnsupported);
        }
        let alg_name = header.get("alg").and_then(|a| a.as_str()).ok_or(Reason::JwtMalformed)?;
        let claims = object(p)?;
        let iss = claims.get("iss").and_then(|v| v.as_str()).ok_or(Reason::JwtUnknownIssuer)?;
        let issuer = self.issuers.iter().find(|i| i.iss == iss).ok_or(Reason::JwtUnknownIssuer)?;
        let alg: Algorithm = alg_name.parse().map_err(|_| Reason::JwtAlgNotAllowed)?;
        if !issuer.algorithms.contains(&alg) {
            return Err(Reason::JwtAlgNotAllowed);
        }
        let kid = header.get("kid").and_then(|k| k.as_str());
        let set = issuer.keys.load();
        if !set.loaded {
            return Err(Reason::JwksUnavailable);
        }
        let candidates: Vec<&Key> = match kid {
            Some(kid) => set.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)).collect(),
            None => set.keys.iter().filter(|k| key_fits(&k.params, alg)).collect(),
        };
        let key = match candidates.as_slice() {
            [k] => *k,
            [] => return Err(Reason::JwtUnknownKid),
            _ => return Err(Reason::JwtUnknownKid), // several keys and no kid: ambiguous
        };
        if !key_fits(&key.params, alg) || key.alg.is_some_and(|a| a != alg) {
            return Err(Reason::JwtKeyMismatch);
        }
        let message_len = h.len() + 1 + p.len();
        let ok = jsonwebtoken::crypto::verify(sig, &token.as_bytes()[..message_len], &key.decoding, alg)
            .map_err(|_| Reason::JwtBadSignature)?;
        if !ok {
            return Err(Reason::JwtBadSignature);
        }

        let leeway = issuer.leeway;
        let exp = secs(claims.get("exp"))?.ok_or(Reason::JwtMissingExp)?;
        if exp.saturating_add(leeway) <= now {
            return Err(Reason::JwtExpired);
        }
        let nbf = secs(claims.get("nbf"))?;
        if nbf.is_some_and(|n| n > now.saturating_add(leeway)) {
            return Err(Reason::JwtNotYetValid);
        }
        let iat = secs(claims.get("iat"))?;
        if iat.is_some_and(|i| i > now.saturating_add(leeway)) {
            return Err(Reason::JwtIssuedInFuture);
        }
        let aud_ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => issuer.audiences.iter().any(|x| x == a),
            Some(serde_json::Value::Array(list)) => {
                list.iter().filter_map(|v| v.as_str()).any(|a| issuer.audiences.iter().any(|x| x == a))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(Reason::JwtWrongAudience);
        }
        let subject =
            claims.get("sub").and_then(|s| s.as_str()).filter(|s| !s.is_empty()).ok_or(Reason::JwtMissingSubject)?;
        let mut roles = 0;
        if let Some(list) = claims.get(&issuer.roles_claim) {
            let list = list.as_array().ok_or(Reason::JwtMalformed)?;
            for r in list {
                match r.as_str().and_then(|r| issuer.roles.get(r)) {
                    Some(bits) => roles |= bits,
                    None => {
                        self.metrics.unknown_roles.inc();
                    }
                }
            }
        }
        let tier = match claims.get(&issuer.tier_claim) {
            None => issuer.default_tier.ok_or(Reason::JwtUnknownTier)?,
            Some(t) => t.as_str().and_then(|t| issuer.tiers.get(t)).copied().ok_or(Reason::JwtUnknownTier)?,
        };
        let auth_time = secs(claims.get("auth_time"))?.or(iat);
        Ok((
            VerifiedToken {
                subject: Arc::from(format!("jwt:{subject}").as_str()),
                roles,
                tier,
                auth_time,
                expires_at: exp.saturating_add(leeway),
                credential: CredentialKind::Jwt,
                token_id: decision_core::identity::token_id(claims.get("jti").and_then(|j| j.as_str()), token),
            },
            nbf.map(|n| n.saturating_sub(leeway)),
        ))
    }
}

impl BearerVerifier for JwtVerifier {
    fn verify(&self, token: &str, now: Micros) -> Result<VerifiedToken, Reason> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Reason::JwtTooLarge);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(&digest)
            && now < c.token.expires_at
            && c.not_before.is_none_or(|n| now >= n)
        {
            return Ok(c.token.clone());
        }
        let (token, not_before) = self.verify_uncached(token, now)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                // bounded: drop what has expired, and if that is not enough, half of the rest
                cache.retain(|_, c| now < c.token.expires_at);
                if cache.len() >= CACHE_ENTRIES {
                    let mut n = 0;
                    cache.retain(|_, _| {
                        n += 1;
                        n % 2 == 0
                    });
                }
            }
            cache.insert(digest, Cached { token: token.clone(), not_before });
        }
        Ok(token)
    }

    fn fetch_for(&self, token: &str, reason: Reason) -> Option<Fetch> {
        if !matches!(reason, Reason::JwtUnknownKid | Reason::JwksUnavailable) {
            return None;
        }
        let mut parts = token.split('.');
        let (header, claims) = (object(parts.next()?).ok()?, object(parts.next()?).ok()?);
        let iss = claims.get("iss").and_then(|v| v.as_str())?;
        let remote = self.issuers.iter().find(|i| i.iss == iss)?.remote.clone()?;
        let kid = header.get("kid").and_then(|k| k.as_str()).map(str::to_owned);
        if kid.as_deref().is_some_and(|k| remote.known_unknown(k)) {
            return None; // still unknown after a recent fetch: no new fetch on its account
        }
        if remote.cooling() && remote.gate.try_lock().is_ok() {
            // no fetch running and none allowed yet: answer now, without queueing behind the gate
            remote.forget(kid.as_deref());
            return None;
        }
        Some(Box::pin(remote.refetch(kid)))
    }

    fn background(&self) -> Option<Fetch> {
        let remotes: Vec<Weak<Remote>> =
            self.issuers.iter().filter_map(|i| i.remote.as_ref().map(Arc::downgrade)).collect();
        if remotes.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            for r in remotes {
                tokio::spawn(Remote::run(r));
            }
        }))
    }
}

/// The algorithms portcullis accepts, by the names a policy uses.
pub fn algorithm(name: &str) -> Option<Algorithm> {
    let alg: Algorithm = name.parse().ok()?;
    let allowed: HashSet<Algorithm> = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ]
    .into();
    allowed.contains(&alg).then_some(alg)
}

#[cfg(test)]
mod tests;
