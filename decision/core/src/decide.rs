//! The decision, as a pure function in two halves around the one store call:
//! `plan(policy, request)` answers everything that needs no counter (IP gate, sizes, path,
//! route, credential, roles, zones) and lists the counter operations; the store applies them
//! all-or-nothing; `conclude(policy, plan, verdicts)` turns the verdicts into the decision.

use std::net::IpAddr;
use std::sync::Arc;

use crate::apikey::Lookup;
use crate::identity::{CredentialKind, Identity, bearer_token};
use crate::net;
use crate::path;
use crate::plan::{Op, OpKind};
use crate::policy::{OnStoreError, Policy, Precedence};
use crate::quota::{Limit, Verdict};
use crate::reason::Reason;
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
    /// what the request counts against its identity's tier quotas (burst and daily): 1 for an
    /// HTTP request through a proxy, the caller's units (tokens, bytes, rows) through the native
    /// API; the zone's per-address limit counts requests, whatever their cost
    pub cost: u64,
    /// the native API's `reserve`: `cost` is an estimate, kept under this new reservation id
    /// (32 lowercase hex, random) until settled with the actual cost or expired
    pub reserve: Option<&'a str>,
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
    /// the reservation an allowed request's estimate is kept under (the request asked for one
    /// and has tier quotas to count it against)
    pub reservation: Option<Reservation>,
}

/// An estimate counted against an identity's tier quotas, to be settled with the actual cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// the id the request asked for (32 lowercase hex)
    pub id: String,
    /// the estimate counted
    pub estimate: u64,
    /// how long it may wait for its settle (the traffic lease's time to live)
    pub ttl: Micros,
}

/// How long a reservation waits for its settle when the policy has no `traffic.lease_ttl`
/// (the same default).
pub const DEFAULT_RESERVATION_TTL: Micros = 60 * 1_000_000;

/// The store keys of a reservation: its record, then the counters it may correct (the tier's
/// burst and daily quotas of `subject`), all in the subject's hash tag. The record's own list
/// of covered keys must be among these.
pub fn reservation_keys(subject: &str, id: &str) -> [String; 3] {
    [format!("pc:{{s:{subject}}}:res:{id}"), format!("pc:{{s:{subject}}}:burst"), format!("pc:{{s:{subject}}}:daily")]
}

/// The time to live of a reservation under `policy`: the traffic lease's, else the default.
pub fn reservation_ttl(policy: &Policy) -> Micros {
    policy.traffic.as_ref().map_or(DEFAULT_RESERVATION_TTL, |t| t.lease_ttl)
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
        Decision {
            reason,
            ctx,
            quotas: Vec::new(),
            retry_after: None,
            quota_warning: None,
            lease: None,
            reservation: None,
        }
    }
}

fn is_bearer(auth: &str) -> bool {
    bearer_token(auth).is_some()
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
            (Some(key), _) => {
                // the policy file's keys, then the store's (the admin API's)
                let stored;
                let found = match policy.api_keys.lookup(key.as_bytes()) {
                    Lookup::Found(k) => Some(k),
                    Lookup::Unknown => {
                        stored = policy.store_keys.as_ref().and_then(|d| d.lookup(key.as_bytes()));
                        stored.as_ref()
                    }
                };
                match found {
                    None => return deny(Reason::ApiKeyUnknown, ctx),
                    Some(k) if k.revoked => return deny(Reason::ApiKeyRevoked, ctx),
                    Some(k) if k.not_before.is_some_and(|t| now < t) => {
                        return deny(Reason::ApiKeyNotYetValid, ctx);
                    }
                    Some(k) if k.expires_at.is_some_and(|t| now >= t) => return deny(Reason::ApiKeyExpired, ctx),
                    Some(k) => Identity {
                        subject: k.id.clone(),
                        roles: k.roles,
                        tier: k.tier,
                        credential: CredentialKind::ApiKey,
                        auth_time: None,
                        token_id: None,
                    },
                }
            }
            (None, Some(auth)) if is_bearer(auth) => {
                let Some(verifier) = &policy.bearer else {
                    return deny(Reason::BearerNotEnabled, ctx);
                };
                match verifier.verify(bearer_token(auth).unwrap_or_default(), now) {
                    Ok(t) => Identity {
                        subject: t.subject,
                        roles: t.roles,
                        tier: t.tier,
                        credential: t.credential,
                        auth_time: t.auth_time,
                        token_id: Some(t.token_id),
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
    // a bearer token's revocation, checked in the same call (before the quotas: a revoked
    // token is refused as such, whatever its quotas say)
    if let Some(Identity { subject, token_id: Some(token), .. }) = &ctx.identity {
        ops.push(Op {
            key: revocation_key(subject, token),
            limit: Limit::Flag { duration: 0 },
            cost: 0,
            kind: OpKind::Revocation,
            shadow: false,
        });
    }
    if let Some(id) = &ctx.identity
        && let Some(tier) = policy.tiers.get(id.tier)
    {
        ops.extend(tier_ops(&id.subject, tier, req.cost));
        if let Some(res) = req.reserve {
            // right after the operations it covers (`plan::covered`), in their hash tag
            ops.push(Op {
                key: format!("pc:{{s:{}}}:res:{res}", id.subject),
                limit: Limit::Flag { duration: reservation_ttl(policy) },
                cost: req.cost,
                kind: OpKind::Reservation,
                shadow: false,
            });
        }
    }
    if let Some(limit) = policy.zone_limit(ctx.zone) {
        ops.push(Op { key: format!("pc:{{ip:{ip}}}:zone"), limit, cost: 1, kind: OpKind::Zone, shadow: false });
    }
    Ok(Plan { ops, ctx })
}

/// The store key of a bearer token's revocation flag: the subject's hash tag (so that it rides
/// in the request's one call, on a cluster too) and the token's id.
pub fn revocation_key(subject: &str, token_id: &str) -> String {
    format!("pc:{{s:{subject}}}:rev:{token_id}")
}

/// The store key of an address's auto-block flag.
pub fn block_key(ip: IpAddr) -> String {
    format!("pc:{{ip:{ip}}}:block")
}

/// The store key of an address's failed-authentication counter (same hash tag as its block).
pub fn auth_failure_key(ip: IpAddr) -> String {
    format!("pc:{{ip:{ip}}}:authfail")
}

/// The operations of a subject's tier quotas, counting `cost`: the burst bucket, then the daily
/// window (keyed `pc:{s:<subject>}:burst` and `:daily`, one hash tag).
pub fn tier_ops(subject: &str, tier: &crate::policy::Tier, cost: u64) -> [Op; 2] {
    [
        Op {
            key: format!("pc:{{s:{subject}}}:burst"),
            limit: tier.bucket,
            cost,
            kind: OpKind::TierBurst,
            shadow: false,
        },
        Op {
            key: format!("pc:{{s:{subject}}}:daily"),
            limit: tier.daily,
            cost,
            kind: OpKind::TierDaily,
            shadow: false,
        },
    ]
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
    let count = Op { key: auth_failure_key(ip), limit: ab.failures, cost: 1, kind: OpKind::AuthFailure, shadow: false };
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
                OpKind::Revocation => Reason::TokenRevoked,
                // always allowed
                OpKind::Reservation => Reason::Allowed,
            };
        }
        retry_after = Some(retry_after.unwrap_or(0).max(v.retry_after));
    }
    let reservation = match reason {
        Reason::Allowed => plan.ops.iter().find(|op| op.kind == OpKind::Reservation).and_then(|op| {
            let id = op.key.rsplit_once(":res:")?.1;
            Some(Reservation { id: id.to_owned(), estimate: op.cost, ttl: op.limit.window() })
        }),
        _ => None,
    };
    // what a client is told about: its limits, not the block or revocation checks nor a
    // reservation
    let quotas: Vec<QuotaReport> = plan
        .ops
        .iter()
        .zip(verdicts)
        .filter(|(op, _)| !matches!(op.kind, OpKind::Block | OpKind::Reservation | OpKind::Revocation))
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
    Decision { reason, ctx: plan.ctx, quotas, retry_after, quota_warning, lease: None, reservation }
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
            assert!([200, 400, 401, 403, 413, 429, 431, 503, 504].contains(&r.status()));
            assert_eq!(r.is_allowed(), r.status() == 200);
        }
    }
}
