//! The decision, as a pure function in two halves around the one store call:
//! `plan(policy, request)` answers everything that needs no counter (IP gate, sizes, path,
//! route, credential, roles, zones) and lists the counter operations; the store applies them
//! all-or-nothing; `conclude(policy, plan, verdicts)` turns the verdicts into the decision.

use std::net::IpAddr;
use std::sync::Arc;

use crate::apikey::Lookup;
use crate::net;
use crate::path;
use crate::policy::{OnStoreError, Policy, Precedence};
use crate::quota::{Limit, Verdict};
use crate::units::Micros;

/// One request as any adapter sees it, borrowed from the adapter's message.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// the request target as sent (`:path`, with the query)
    pub path: &'a str,
    /// the address the request came from (for Envoy: the downstream address it saw)
    pub peer: IpAddr,
    pub forwarded_for: Option<&'a str>,
    /// the declared body size, when known
    pub content_length: Option<u64>,
    /// the size of the request's header block (names and values)
    pub header_bytes: u64,
    /// the value of the API key header, if any
    pub api_key: Option<&'a str>,
    /// the `authorization` header, if any
    pub authorization: Option<&'a str>,
}

/// Why a request was allowed or denied: one table gives each its HTTP status, the error text
/// clients see, and the gRPC code a failed call maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Allowed,
    /// allowed without counting: the store failed and the policy says `on_store_error: allow`
    AllowedStoreUnavailable,
    /// the proxy's message lacked what a decision needs (no HTTP attributes, no peer address)
    BadRequest,
    IpDenied,
    /// blocked after too many failed authentications (`network.auto_block`)
    IpBlocked,
    BadForwardedFor,
    BadMethod,
    BadPath,
    HeadersTooLarge,
    BodyTooLarge,
    NoRoute,
    ZoneForbidden,
    CredentialMissing,
    /// more than one credential (an API key and an `authorization` header) and no
    /// `authentication.precedence` to choose: neither is believed
    AmbiguousCredentials,
    ApiKeyUnknown,
    ApiKeyRevoked,
    ApiKeyExpired,
    ApiKeyNotYetValid,
    BearerNotEnabled,
    JwtMalformed,
    JwtTooLarge,
    JwtAlgNotAllowed,
    JwtCritUnsupported,
    JwtDuplicateMember,
    JwtUnknownIssuer,
    JwtUnknownKid,
    JwtKeyMismatch,
    JwtBadSignature,
    JwtMissingExp,
    JwtExpired,
    JwtNotYetValid,
    JwtIssuedInFuture,
    JwtWrongAudience,
    JwtMissingSubject,
    JwtUnknownTier,
    /// the issuer's key set (`jwks_url`) has never been fetched: the issuer is unreachable
    JwksUnavailable,
    /// OAuth 2.0 introspection said the token is not active
    TokenInactive,
    /// OAuth 2.0 introspection could not be asked (outage, timeout): 503, so clients retry
    /// instead of discarding a good token
    IntrospectionUnavailable,
    FreshAuthRequired,
    RoleForbidden,
    TierRateExceeded,
    DailyQuotaExceeded,
    ZoneRateExceeded,
    /// the route's upstream's circuit breaker is open (or half-open with its probe out)
    CircuitOpen,
    /// every concurrency slot of the upstream is taken and its queue is full
    QueueFull,
    /// waited `queue_timeout` in the queue without getting a slot
    QueueTimeout,
    StoreUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 47] = [
        Reason::Allowed,
        Reason::AllowedStoreUnavailable,
        Reason::BadRequest,
        Reason::IpDenied,
        Reason::IpBlocked,
        Reason::BadForwardedFor,
        Reason::BadMethod,
        Reason::BadPath,
        Reason::HeadersTooLarge,
        Reason::BodyTooLarge,
        Reason::NoRoute,
        Reason::ZoneForbidden,
        Reason::CredentialMissing,
        Reason::AmbiguousCredentials,
        Reason::ApiKeyUnknown,
        Reason::ApiKeyRevoked,
        Reason::ApiKeyExpired,
        Reason::ApiKeyNotYetValid,
        Reason::BearerNotEnabled,
        Reason::JwtMalformed,
        Reason::JwtTooLarge,
        Reason::JwtAlgNotAllowed,
        Reason::JwtCritUnsupported,
        Reason::JwtDuplicateMember,
        Reason::JwtUnknownIssuer,
        Reason::JwtUnknownKid,
        Reason::JwtKeyMismatch,
        Reason::JwtBadSignature,
        Reason::JwtMissingExp,
        Reason::JwtExpired,
        Reason::JwtNotYetValid,
        Reason::JwtIssuedInFuture,
        Reason::JwtWrongAudience,
        Reason::JwtMissingSubject,
        Reason::JwtUnknownTier,
        Reason::JwksUnavailable,
        Reason::TokenInactive,
        Reason::IntrospectionUnavailable,
        Reason::FreshAuthRequired,
        Reason::RoleForbidden,
        Reason::TierRateExceeded,
        Reason::DailyQuotaExceeded,
        Reason::ZoneRateExceeded,
        Reason::CircuitOpen,
        Reason::QueueFull,
        Reason::QueueTimeout,
        Reason::StoreUnavailable,
    ];

    /// The stable name used in logs, metrics and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::AllowedStoreUnavailable => "allowed_store_unavailable",
            Reason::BadRequest => "bad_request",
            Reason::IpDenied => "ip_denied",
            Reason::IpBlocked => "ip_blocked",
            Reason::BadForwardedFor => "bad_forwarded_for",
            Reason::BadMethod => "bad_method",
            Reason::BadPath => "bad_path",
            Reason::HeadersTooLarge => "headers_too_large",
            Reason::BodyTooLarge => "body_too_large",
            Reason::NoRoute => "no_route",
            Reason::ZoneForbidden => "zone_forbidden",
            Reason::CredentialMissing => "credential_missing",
            Reason::AmbiguousCredentials => "ambiguous_credentials",
            Reason::ApiKeyUnknown => "api_key_unknown",
            Reason::ApiKeyRevoked => "api_key_revoked",
            Reason::ApiKeyExpired => "api_key_expired",
            Reason::ApiKeyNotYetValid => "api_key_not_yet_valid",
            Reason::BearerNotEnabled => "bearer_not_enabled",
            Reason::JwtMalformed => "jwt_malformed",
            Reason::JwtTooLarge => "jwt_too_large",
            Reason::JwtAlgNotAllowed => "jwt_alg_not_allowed",
            Reason::JwtCritUnsupported => "jwt_crit_unsupported",
            Reason::JwtDuplicateMember => "jwt_duplicate_member",
            Reason::JwtUnknownIssuer => "jwt_unknown_issuer",
            Reason::JwtUnknownKid => "jwt_unknown_kid",
            Reason::JwtKeyMismatch => "jwt_key_mismatch",
            Reason::JwtBadSignature => "jwt_bad_signature",
            Reason::JwtMissingExp => "jwt_missing_exp",
            Reason::JwtExpired => "jwt_expired",
            Reason::JwtNotYetValid => "jwt_not_yet_valid",
            Reason::JwtIssuedInFuture => "jwt_issued_in_future",
            Reason::JwtWrongAudience => "jwt_wrong_audience",
            Reason::JwtMissingSubject => "jwt_missing_subject",
            Reason::JwtUnknownTier => "jwt_unknown_tier",
            Reason::JwksUnavailable => "jwks_unavailable",
            Reason::TokenInactive => "token_inactive",
            Reason::IntrospectionUnavailable => "introspection_unavailable",
            Reason::FreshAuthRequired => "fresh_auth_required",
            Reason::RoleForbidden => "role_forbidden",
            Reason::TierRateExceeded => "tier_rate_exceeded",
            Reason::DailyQuotaExceeded => "daily_quota_exceeded",
            Reason::ZoneRateExceeded => "zone_rate_exceeded",
            Reason::CircuitOpen => "circuit_open",
            Reason::QueueFull => "queue_full",
            Reason::QueueTimeout => "queue_timeout",
            Reason::StoreUnavailable => "store_unavailable",
        }
    }

    /// The HTTP status the client gets.
    pub fn status(self) -> u16 {
        match self {
            Reason::Allowed | Reason::AllowedStoreUnavailable => 200,
            Reason::BadRequest | Reason::BadForwardedFor | Reason::BadMethod | Reason::BadPath => 400,
            Reason::CredentialMissing
            | Reason::AmbiguousCredentials
            | Reason::ApiKeyUnknown
            | Reason::ApiKeyRevoked
            | Reason::ApiKeyExpired
            | Reason::ApiKeyNotYetValid
            | Reason::BearerNotEnabled
            | Reason::JwtMalformed
            | Reason::JwtTooLarge
            | Reason::JwtAlgNotAllowed
            | Reason::JwtCritUnsupported
            | Reason::JwtDuplicateMember
            | Reason::JwtUnknownIssuer
            | Reason::JwtUnknownKid
            | Reason::JwtKeyMismatch
            | Reason::JwtBadSignature
            | Reason::JwtMissingExp
            | Reason::JwtExpired
            | Reason::JwtNotYetValid
            | Reason::JwtIssuedInFuture
            | Reason::JwtWrongAudience
            | Reason::JwtMissingSubject
            | Reason::JwtUnknownTier
            | Reason::TokenInactive
            | Reason::FreshAuthRequired => 401,
            Reason::IpDenied | Reason::IpBlocked | Reason::NoRoute | Reason::ZoneForbidden | Reason::RoleForbidden => {
                403
            }
            Reason::BodyTooLarge => 413,
            Reason::TierRateExceeded | Reason::DailyQuotaExceeded | Reason::ZoneRateExceeded => 429,
            Reason::HeadersTooLarge => 431,
            Reason::StoreUnavailable
            | Reason::JwksUnavailable
            | Reason::IntrospectionUnavailable
            | Reason::CircuitOpen
            | Reason::QueueFull
            | Reason::QueueTimeout => 503,
        }
    }

    /// The generic text a client sees; the precise reason stays in our logs.
    pub fn client_error(self) -> &'static str {
        match self.status() {
            400 => "Bad request",
            401 => "Authentication required",
            403 => "Forbidden",
            413 => "Payload too large",
            429 => "Rate limit exceeded",
            431 => "Request header fields too large",
            503 => "Service unavailable",
            _ => "OK",
        }
    }

    pub fn is_allowed(self) -> bool {
        matches!(self, Reason::Allowed | Reason::AllowedStoreUnavailable)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    ApiKey,
    Jwt,
    /// an opaque OAuth 2.0 token, vouched for by the issuer's introspection endpoint
    Introspected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: Arc<str>,
    /// granted role bits
    pub roles: u64,
    pub tier: usize,
    pub credential: CredentialKind,
    /// when the subject last authenticated (a token's `auth_time`, else its `iat`); API keys
    /// carry none, so they never satisfy a route that needs a fresh authentication
    pub auth_time: Option<Micros>,
}

/// A bearer token that passed every check, as a verifier reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: Arc<str>,
    pub roles: u64,
    pub tier: usize,
    pub auth_time: Option<Micros>,
    pub expires_at: Micros,
    pub credential: CredentialKind,
}

/// Verifies bearer tokens (JWT in the decision crate). The core calls it only for a route that
/// needs a credential, and stays free of cryptography and I/O.
pub trait BearerVerifier: Send + Sync + std::fmt::Debug {
    /// The identity a token proves at `now`, or the precise reason it proves none.
    fn verify(&self, token: &str, now: Micros) -> Result<VerifiedToken, Reason>;

    /// Asked after `verify` refused `token` with `reason`: a fetch that could change the
    /// answer (a newer key set for an unknown `kid`, an introspection answer not yet cached),
    /// for the host to await before it decides again. None when nothing can help, or when the
    /// verifier's own rate limits say not now.
    fn fetch_for(&self, _token: &str, _reason: Reason) -> Option<Fetch> {
        None
    }

    /// Work to run in the background for as long as this verifier lives (refreshing remote
    /// key sets before they go stale); it ends by itself once the verifier is dropped.
    fn background(&self) -> Option<Fetch> {
        None
    }
}

/// A fetch a verifier asks its host to run; the host bounds it with a timeout.
pub type Fetch = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// Which limit an operation enforces (its name in the RateLimit headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// the tier's token bucket, keyed by identity
    TierBurst,
    /// the tier's 24-hour window, keyed by identity
    TierDaily,
    /// the zone's per-IP window
    Zone,
    /// a ratelimit (RLS) descriptor's limit
    Descriptor,
    /// the client address's auto-block flag (checked, cost 0)
    Block,
    /// the client address's failed-authentication counter
    AuthFailure,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::TierBurst => "burst",
            OpKind::TierDaily => "daily",
            OpKind::Zone => "ip",
            OpKind::Descriptor => "descriptor",
            OpKind::Block => "block",
            OpKind::AuthFailure => "auth_failures",
        }
    }
}

/// One counter operation for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// the store key; keys of one identity or one address share a `{hash tag}`
    pub key: String,
    pub limit: Limit,
    pub cost: u64,
    pub kind: OpKind,
    /// counted and reported but never enforced: its refusal does not refuse the plan
    pub shadow: bool,
}

/// Whether a plan's verdicts refuse it: any enforced operation refused (a shadow one never
/// refuses). The all-or-nothing rule every store commits by: a refused plan counts nothing.
pub fn refuses(ops: &[Op], verdicts: &[Verdict]) -> bool {
    ops.iter().zip(verdicts).any(|(op, v)| !v.allowed && !op.shadow)
}

/// What `plan` learned about the request, carried into the decision.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub client_ip: Option<IpAddr>,
    pub zone: u64,
    /// the normalized path (no query)
    pub path: Option<String>,
    pub route: Option<usize>,
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub ctx: Context,
}

/// A limit's state as reported to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaReport {
    pub kind: OpKind,
    pub limit: Limit,
    pub verdict: Verdict,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub reason: Reason,
    pub ctx: Context,
    /// every limit checked, in plan order
    pub quotas: Vec<QuotaReport>,
    /// for a 429: the longest wait among the limits that refused
    pub retry_after: Option<Micros>,
    /// the share of the daily quota used (basis points), when past `quota_warning`
    pub quota_warning: Option<u32>,
    /// the concurrency slot an allowed request holds (policies with `traffic`)
    pub lease: Option<Lease>,
}

/// A concurrency slot held for one request until its completion (or the lease's expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub upstream: Arc<str>,
    pub id: String,
    /// how long the request waited in the queue for it
    pub waited: Micros,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.reason.is_allowed()
    }

    pub fn status(&self) -> u16 {
        self.reason.status()
    }

    /// A denial decided before any counter (or without a request to count).
    pub fn deny(reason: Reason, ctx: Context) -> Decision {
        Decision { reason, ctx, quotas: Vec::new(), retry_after: None, quota_warning: None, lease: None }
    }
}

/// An `authorization` value with the Bearer scheme (RFC 6750), compared as bytes: slicing the
/// str at 7 could split a multi-byte character.
fn is_bearer(auth: &str) -> bool {
    auth.len() > 7 && auth.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ")
}

fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.len() <= 32 && m.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
}

/// Everything that needs no counter; `Err` is a final decision, `Ok` the counters to apply.
/// `now` is the time credentials are judged at (key validity, token expiry, freshness).
pub fn plan(policy: &Policy, req: &Request<'_>, now: Micros) -> Result<Plan, Box<Decision>> {
    let mut ctx = Context::default();
    let deny = |reason, ctx| Err(Box::new(Decision::deny(reason, ctx)));

    let Ok(ip) = net::client_ip(req.peer, req.forwarded_for, &policy.network.trusted_proxies) else {
        return deny(Reason::BadForwardedFor, ctx);
    };
    ctx.client_ip = Some(ip);
    if policy.network.deny.contains(ip) {
        return deny(Reason::IpDenied, ctx);
    }
    ctx.zone = policy.network.zones.of(ip);

    if !valid_method(req.method) {
        return deny(Reason::BadMethod, ctx);
    }
    if req.header_bytes > policy.max_header_bytes {
        return deny(Reason::HeadersTooLarge, ctx);
    }
    if req.content_length.is_some_and(|n| n > policy.max_body) {
        return deny(Reason::BodyTooLarge, ctx);
    }
    let (raw_path, _query) = path::split_query(req.path);
    let normalized = match path::normalize(raw_path) {
        Ok(p) => p,
        Err(_) => return deny(Reason::BadPath, ctx),
    };
    let route = policy.routes.iter().find(|r| r.matches(req.method, &normalized.path));
    // What a later hop that decodes again (or applies NFKC) would serve must meet the same rule:
    // `/%2561dmin` is `/%2561dmin` here but `/admin` to a second decoder.
    let moved = normalized.further.as_deref().is_some_and(|further| {
        policy.routes.iter().find(|r| r.matches(req.method, further)).map(|r| r.index) != route.map(|r| r.index)
    });
    ctx.path = Some(normalized.path);
    if moved {
        return deny(Reason::BadPath, ctx);
    }
    let Some(route) = route else {
        return deny(Reason::NoRoute, ctx);
    };
    ctx.route = Some(route.index);
    if route.zones.is_some_and(|z| z & ctx.zone == 0) {
        return deny(Reason::ZoneForbidden, ctx);
    }

    if !route.public {
        // Two credentials: believing one while the other travels on would let an unverified
        // token reach the upstream; without a stated precedence, neither is believed.
        // (An empty `authorization` is no credential; a policy that reads API keys from
        // `authorization` itself sees one header twice, not two credentials.)
        let second = req
            .authorization
            .filter(|a| !a.trim().is_empty() && !policy.api_keys.header.eq_ignore_ascii_case("authorization"));
        let (api_key, authorization) = match (req.api_key, second, policy.credential_precedence) {
            (Some(_), Some(_), None) => return deny(Reason::AmbiguousCredentials, ctx),
            (Some(k), Some(_), Some(Precedence::ApiKey)) => (Some(k), None),
            (Some(k), Some(a), Some(Precedence::Bearer)) if !is_bearer(a) => (Some(k), None),
            (Some(_), Some(a), Some(Precedence::Bearer)) => (None, Some(a)),
            _ => (req.api_key, req.authorization),
        };
        let identity = match (api_key, authorization) {
            (Some(key), _) => match policy.api_keys.lookup(key.as_bytes()) {
                Lookup::Unknown => return deny(Reason::ApiKeyUnknown, ctx),
                Lookup::Found(k) if k.revoked => return deny(Reason::ApiKeyRevoked, ctx),
                Lookup::Found(k) if k.not_before.is_some_and(|t| now < t) => {
                    return deny(Reason::ApiKeyNotYetValid, ctx);
                }
                Lookup::Found(k) if k.expires_at.is_some_and(|t| now >= t) => return deny(Reason::ApiKeyExpired, ctx),
                Lookup::Found(k) => Identity {
                    subject: k.id.clone(),
                    roles: k.roles,
                    tier: k.tier,
                    credential: CredentialKind::ApiKey,
                    auth_time: None,
                },
            },
            (None, Some(auth)) if is_bearer(auth) => {
                let Some(verifier) = &policy.bearer else {
                    return deny(Reason::BearerNotEnabled, ctx);
                };
                match verifier.verify(auth[7..].trim(), now) {
                    Ok(t) => Identity {
                        subject: t.subject,
                        roles: t.roles,
                        tier: t.tier,
                        credential: t.credential,
                        auth_time: t.auth_time,
                    },
                    Err(reason) => return deny(reason, ctx),
                }
            }
            (None, _) => return deny(Reason::CredentialMissing, ctx),
        };
        // Freshness: a token's authentication must be recent enough; an API key carries no
        // authentication time, so it never satisfies a sensitive route.
        let fresh_needed =
            route.max_auth_age.is_some_and(|max| identity.auth_time.is_none_or(|at| at.saturating_add(max) < now));
        let role_ok = identity.roles & route.allow_roles != 0;
        ctx.identity = Some(identity);
        if fresh_needed {
            return deny(Reason::FreshAuthRequired, ctx);
        }
        if !role_ok {
            return deny(Reason::RoleForbidden, ctx);
        }
    }

    let mut ops = Vec::with_capacity(4);
    if let Some(op) = block_check(policy, ip, ctx.zone) {
        ops.push(op);
    }
    if let Some(id) = &ctx.identity
        && let Some(tier) = policy.tiers.get(id.tier)
    {
        ops.push(Op {
            key: format!("pc:{{s:{}}}:burst", id.subject),
            limit: tier.bucket,
            cost: 1,
            kind: OpKind::TierBurst,
            shadow: false,
        });
        ops.push(Op {
            key: format!("pc:{{s:{}}}:daily", id.subject),
            limit: tier.daily,
            cost: 1,
            kind: OpKind::TierDaily,
            shadow: false,
        });
    }
    if let Some(limit) = policy.zone_limit(ctx.zone) {
        ops.push(Op { key: format!("pc:{{ip:{ip}}}:zone"), limit, cost: 1, kind: OpKind::Zone, shadow: false });
    }
    Ok(Plan { ops, ctx })
}

fn block_key(ip: IpAddr) -> String {
    format!("pc:{{ip:{ip}}}:block")
}

/// The cost-0 check of an address's auto-block flag, unless auto-block is off or the address's
/// zone is exempt.
fn block_check(policy: &Policy, ip: IpAddr, zone: u64) -> Option<Op> {
    let ab = policy.network.auto_block.as_ref().filter(|ab| ab.exempt_zones & zone == 0)?;
    Some(Op { key: block_key(ip), limit: ab.block, cost: 0, kind: OpKind::Block, shadow: false })
}

/// The operation that blocks `ip` for `network.auto_block`'s duration (a critical failed-auth
/// alert asking for it); None without auto-block or for an exempt zone.
pub fn block_raise(policy: &Policy, ip: IpAddr, zone: u64) -> Option<Op> {
    let ab = policy.network.auto_block.as_ref().filter(|ab| ab.exempt_zones & zone == 0)?;
    Some(Op { key: block_key(ip), limit: ab.block, cost: 1, kind: OpKind::Block, shadow: false })
}

/// Whether a denial is a failed authentication that counts towards auto-block.
pub fn is_auth_failure(reason: Reason) -> bool {
    reason.status() == 401
        && !matches!(reason, Reason::CredentialMissing | Reason::AmbiguousCredentials | Reason::FreshAuthRequired)
}

/// After a failed authentication: the operations that check the address's block and count the
/// failure (one store call). None when auto-block does not apply.
pub fn failure_plan(policy: &Policy, d: &Decision) -> Option<Vec<Op>> {
    if !is_auth_failure(d.reason) {
        return None;
    }
    let ip = d.ctx.client_ip?;
    let check = block_check(policy, ip, d.ctx.zone)?;
    let ab = policy.network.auto_block.as_ref()?;
    let count = Op {
        key: format!("pc:{{ip:{ip}}}:authfail"),
        limit: ab.failures,
        cost: 1,
        kind: OpKind::AuthFailure,
        shadow: false,
    };
    Some(vec![check, count])
}

/// What a counted failed authentication comes to.
#[derive(Debug, Clone)]
pub enum AfterFailure {
    /// the answer: the 401 as it was, or 403 `ip_blocked` when the address already is
    Answer(Decision),
    /// the failures just crossed the threshold: apply `raise`, then answer `blocked` (if the
    /// store fails, the 401 stands)
    Block { raise: Op, blocked: Decision },
}

/// Concludes `failure_plan`'s verdicts (the block check, then the failure count).
pub fn conclude_failure(policy: &Policy, d: Decision, verdicts: &[Verdict]) -> AfterFailure {
    let blocked =
        |d: &Decision, retry_after| Decision { reason: Reason::IpBlocked, retry_after: Some(retry_after), ..d.clone() };
    match verdicts {
        [check, _] if !check.allowed => AfterFailure::Answer(blocked(&d, check.retry_after)),
        [_, count] if !count.allowed => match (d.ctx.client_ip, policy.network.auto_block.as_ref()) {
            (Some(ip), Some(ab)) => {
                let raise = Op { key: block_key(ip), limit: ab.block, cost: 1, kind: OpKind::Block, shadow: false };
                AfterFailure::Block { blocked: blocked(&d, ab.block.window()), raise }
            }
            _ => AfterFailure::Answer(d),
        },
        _ => AfterFailure::Answer(d),
    }
}

/// The decision from the store's verdicts (one per operation, in order).
pub fn conclude(policy: &Policy, plan: Plan, verdicts: &[Verdict]) -> Decision {
    let mut reason = Reason::Allowed;
    let mut retry_after = None;
    for (op, v) in plan.ops.iter().zip(verdicts) {
        if v.allowed {
            continue;
        }
        if reason == Reason::Allowed {
            reason = match op.kind {
                OpKind::TierBurst => Reason::TierRateExceeded,
                OpKind::TierDaily => Reason::DailyQuotaExceeded,
                OpKind::Zone | OpKind::Descriptor | OpKind::AuthFailure => Reason::ZoneRateExceeded,
                OpKind::Block => Reason::IpBlocked,
            };
        }
        retry_after = Some(retry_after.unwrap_or(0).max(v.retry_after));
    }
    // what a client is told about: its limits, not the block check
    let quotas: Vec<QuotaReport> = plan
        .ops
        .iter()
        .zip(verdicts)
        .filter(|(op, _)| op.kind != OpKind::Block)
        .map(|(op, v)| QuotaReport { kind: op.kind, limit: op.limit, verdict: *v })
        .collect();
    let quota_warning = match (reason, policy.quota_warning) {
        (Reason::Allowed, Some(threshold)) => quotas.iter().find(|q| q.kind == OpKind::TierDaily).and_then(|q| {
            let total = q.limit.quota().max(1);
            let used = total.saturating_sub(q.verdict.remaining);
            let bp = u32::try_from(used.saturating_mul(10_000) / total).unwrap_or(10_000);
            (bp >= threshold).then_some(bp)
        }),
        _ => None,
    };
    Decision { reason, ctx: plan.ctx, quotas, retry_after, quota_warning, lease: None }
}

/// The decision when the store failed or timed out, by the policy's `on_store_error`.
pub fn store_failed(policy: &Policy, plan: Plan) -> Decision {
    let reason = match policy.on_store_error {
        OnStoreError::Deny => Reason::StoreUnavailable,
        OnStoreError::Allow => Reason::AllowedStoreUnavailable,
    };
    Decision::deny(reason, plan.ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_one_status_and_a_distinct_name() {
        let mut names = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(names.insert(r.as_str()), "duplicate name {}", r.as_str());
            assert!([200, 400, 401, 403, 413, 429, 431, 503].contains(&r.status()));
            assert_eq!(r.is_allowed(), r.status() == 200);
        }
    }
}
