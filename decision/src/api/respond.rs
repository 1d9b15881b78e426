//! How a decision reads to the client, shared by every adapter: the rate-limit headers
//! (IETF httpapi-ratelimit-headers, plus the older `X-RateLimit-*` for compatibility), the
//! `WWW-Authenticate` challenge, `Retry-After`, and the JSON body of a denial (for a 429, the
//! reference guide's shape: status, error, reset_time, remaining_requests, retry_after).

use decision_core::decide::QuotaReport;
use decision_core::policy::{HeaderDialect, Policy};
use decision_core::rls::{RlsDecision, Status};
use decision_core::units::{MICROS_PER_SEC, Micros};
use decision_core::{Decision, Reason};

use crate::clock;

/// Identity headers set towards the upstream on an allowed request; a client's own copies are
/// removed or overwritten, so they cannot be forged.
pub const SUBJECT_HEADER: &str = "x-portcullis-subject";
pub const TIER_HEADER: &str = "x-portcullis-tier";
pub const ROLES_HEADER: &str = "x-portcullis-roles";
/// Marks a request let through uncounted because the store failed (`on_store_error: allow`).
pub const DEGRADED_HEADER: &str = "x-portcullis-degraded";
/// Carries a lease to the upstream, and back to portcullis in the access log:
/// `<upstream key>.<lease id>` (`engine::parse_lease`).
pub const LEASE_HEADER: &str = "x-portcullis-lease";
/// Tells a client how long it waited in the queue for a slot (milliseconds).
pub const WAIT_HEADER: &str = "x-portcullis-queue-wait-ms";
/// The request id a proxy sends (Envoy's `x-request-id`).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Past `quota_warning` of the daily quota (the reference guide's warning).
pub const QUOTA_WARNING_HEADER: &str = "x-quota-warning";

/// How the legacy `X-RateLimit-*` headers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XRateLimit {
    /// the reference guide's: `X-RateLimit-Limit: 100` (ext_authz answers)
    Reference,
    /// envoyproxy/ratelimit's `LIMIT_RESPONSE_HEADERS_ENABLED` (draft-03 of the IETF headers):
    /// `X-RateLimit-Limit: 100, 100;w=60` (RLS answers with `x_ratelimit_headers`)
    Draft03,
}

/// The `X-RateLimit-Limit`, `-Remaining` and `-Reset` headers of the limit a client is closest
/// to, in `style`, handed to `emit`.
pub fn x_ratelimit_headers(style: XRateLimit, closest: LimitState<'_>, mut emit: impl FnMut(&'static str, String)) {
    let q = closest.quota;
    emit(
        "x-ratelimit-limit",
        match style {
            XRateLimit::Reference => q.to_string(),
            XRateLimit::Draft03 => format!("{q}, {q};w={}", closest.window),
        },
    );
    emit("x-ratelimit-remaining", closest.remaining.to_string());
    emit("x-ratelimit-reset", closest.reset.to_string());
}

/// Microseconds as whole seconds, rounded up (a wait of 0.2 s is 1 s).
pub fn secs_ceil(us: Micros) -> u64 {
    us.div_ceil(MICROS_PER_SEC)
}

/// The index of the limit a client is closest to: the first that refused, else the one with the
/// least left (the first on a tie).
fn tightest(quotas: &[QuotaReport]) -> Option<usize> {
    let refused = quotas.iter().position(|q| !q.verdict.allowed);
    refused.or_else(|| (0..quotas.len()).min_by_key(|&i| quotas[i].verdict.remaining))
}

/// One limit as the `RateLimit*` headers describe it.
#[derive(Debug, Clone, Copy)]
pub struct LimitState<'a> {
    /// the limit's name (a structured-field string once rendered)
    pub name: &'a str,
    /// requests per window
    pub quota: u64,
    /// the window, whole seconds
    pub window: u64,
    pub remaining: u64,
    /// seconds until more quota is available
    pub reset: u64,
}

/// Appends a structured-field string (RFC 9651 section 3.3.3) to `out`: `"` and `\` escaped,
/// anything outside printable ASCII replaced, so a configured name can never break the header.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

/// The IETF `RateLimit*` headers for `limits`, in the policy's dialect (draft-ietf-httpapi-
/// ratelimit-headers), each handed to `emit` as (lower-case name, value); `closest` is the index
/// of the limit a client is nearest to, which the single-limit forms of -06 and -07 describe.
/// `limits` is walked twice and never collected: this runs for every answer that counted.
pub fn ietf_headers<'a, I>(
    dialect: HeaderDialect,
    limits: I,
    closest: usize,
    mut emit: impl FnMut(&'static str, String),
) where
    I: IntoIterator<Item = LimitState<'a>>,
    I::IntoIter: Clone,
{
    use std::fmt::Write as _;
    let limits = limits.into_iter();
    let Some(first) = limits.clone().next() else { return };
    if dialect == HeaderDialect::None {
        return;
    }
    let list = |state: bool| {
        let mut out = String::with_capacity(48);
        for (i, l) in limits.clone().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            match (dialect, state) {
                (HeaderDialect::Draft10, false) => {
                    push_sf_string(&mut out, l.name);
                    let _ = write!(out, ";q={};w={}", l.quota, l.window);
                }
                (HeaderDialect::Draft10, true) => {
                    push_sf_string(&mut out, l.name);
                    let _ = write!(out, ";r={};t={}", l.remaining, l.reset);
                }
                // -06 and -07: a List of Integer Items (the quota) with the window as `w`
                _ => {
                    let _ = write!(out, "{};w={}", l.quota, l.window);
                }
            }
        }
        out
    };
    let c = limits.clone().nth(closest).unwrap_or(first);
    match dialect {
        HeaderDialect::Draft10 => {
            emit("ratelimit-policy", list(false));
            emit("ratelimit", list(true));
        }
        HeaderDialect::Draft07 => {
            emit("ratelimit-policy", list(false));
            emit("ratelimit", format!("limit={}, remaining={}, reset={}", c.quota, c.remaining, c.reset));
        }
        HeaderDialect::Draft06 => {
            emit("ratelimit-limit", c.quota.to_string());
            emit("ratelimit-remaining", c.remaining.to_string());
            emit("ratelimit-reset", c.reset.to_string());
            emit("ratelimit-policy", list(false));
        }
        HeaderDialect::None => {}
    }
}

/// The client headers describing every limit that applied, handed to `emit`: the `RateLimit*`
/// headers in `dialect`, the reference's `X-RateLimit-*` for the closest limit, and
/// `X-Quota-Warning` past `quota_warning` of the daily quota.
pub fn ratelimit_headers(d: &Decision, dialect: HeaderDialect, mut emit: impl FnMut(&'static str, String)) {
    let Some(closest) = tightest(&d.quotas) else { return };
    let limits = d.quotas.iter().map(|q| LimitState {
        name: q.kind.as_str(),
        quota: q.limit.quota(),
        window: secs_ceil(q.limit.window()),
        remaining: q.verdict.remaining,
        reset: secs_ceil(q.verdict.reset),
    });
    ietf_headers(dialect, limits.clone(), closest, &mut emit);
    if let Some(c) = limits.clone().nth(closest) {
        x_ratelimit_headers(XRateLimit::Reference, c, &mut emit);
    }
    if let Some(bp) = d.quota_warning {
        emit(QUOTA_WARNING_HEADER, format!("{}% of the daily quota used", bp / 100));
    }
}

/// The client headers of an RLS answer, handed to `emit`: the `RateLimit*` headers in `dialect`
/// for the enforced limits that counted (shadow limits are not the client's business), the
/// draft-03 `X-RateLimit-*` with `x_ratelimit`, and over the limit `Retry-After` and the
/// content type of the 429 body, which comes back (the reference guide's shape).
pub fn rls_headers(
    d: &RlsDecision,
    x_ratelimit: bool,
    dialect: HeaderDialect,
    now: Micros,
    mut emit: impl FnMut(&'static str, String),
) -> Option<String> {
    let enforced = |s: &&Status| s.verdict.is_some() && s.rule.as_ref().is_some_and(|r| !r.shadow);
    fn state(s: &Status) -> LimitState<'_> {
        LimitState {
            name: s.rule.as_ref().map_or("", |r| r.label()),
            quota: s.rule.as_ref().map_or(0, |r| u64::from(r.requests_per_unit)),
            window: s.rule.as_ref().and_then(|r| r.unit).map_or(0, |u| u.micros() / MICROS_PER_SEC),
            remaining: s.remaining,
            reset: secs_ceil(s.reset),
        }
    }
    let limits = d.statuses.iter().filter(enforced).map(state);
    // the closest limit: the first with the least left
    if let Some((closest, c)) = limits.clone().enumerate().min_by_key(|(_, l)| l.remaining) {
        ietf_headers(dialect, limits, closest, &mut emit);
        if x_ratelimit {
            x_ratelimit_headers(XRateLimit::Draft03, c, &mut emit);
        }
    }
    if !d.over_limit {
        return None;
    }
    let retry = secs_ceil(d.retry_after.unwrap_or(0)).max(1);
    emit("content-type", "application/json".into());
    emit("retry-after", retry.to_string());
    Some(too_many_requests_body(retry, 0, now))
}

/// The identity headers of an allowed request (subject, tier, roles: comma-separated role
/// names), the lease it holds, and the degraded mark of one let through uncounted, handed to
/// `emit` as the upstream should receive them. Nothing for a denial.
pub fn upstream_headers(d: &Decision, policy: &Policy, mut emit: impl FnMut(&'static str, String)) {
    if !d.allowed() {
        return;
    }
    if let Some(id) = &d.ctx.identity {
        emit(SUBJECT_HEADER, id.subject.to_string());
        emit(TIER_HEADER, policy.tiers.get(id.tier).map_or("", |t| &*t.name).to_owned());
        let mut roles = String::new();
        for (i, r) in policy.roles.names_of(id.roles).enumerate() {
            if i > 0 {
                roles.push(',');
            }
            roles.push_str(r);
        }
        emit(ROLES_HEADER, roles);
    }
    if let Some(lease) = &d.lease {
        emit(LEASE_HEADER, lease.id.clone());
    }
    if d.reason == Reason::AllowedStoreUnavailable {
        emit(DEGRADED_HEADER, "store-unavailable".into());
    }
}

/// The headers the client gets, handed to `emit`: allowed, the rate-limit headers and the
/// queue wait; denied, the JSON content type, the `WWW-Authenticate` challenge of a 401,
/// `Retry-After` and the rate-limit headers.
pub fn client_headers(d: &Decision, policy: &Policy, mut emit: impl FnMut(&'static str, String)) {
    if d.allowed() {
        ratelimit_headers(d, policy.ratelimit_headers, &mut emit);
        if let Some(lease) = d.lease.as_ref().filter(|l| l.waited > 0) {
            emit(WAIT_HEADER, (lease.waited / 1000).to_string());
        }
        return;
    }
    emit("content-type", "application/json".into());
    if let Some(c) = www_authenticate(d.reason, policy) {
        emit("www-authenticate", c);
    }
    if let Some(s) = retry_after_secs(d) {
        emit("retry-after", s.to_string());
    }
    ratelimit_headers(d, policy.ratelimit_headers, &mut emit);
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 9110 section 11.6.1, RFC 6750 for Bearer).
pub fn www_authenticate(reason: Reason, policy: &Policy) -> Option<String> {
    match reason {
        Reason::FreshAuthRequired => {
            Some("Bearer error=\"invalid_token\", error_description=\"re-authentication required\"".into())
        }
        Reason::TokenRevoked => {
            Some("Bearer error=\"invalid_token\", error_description=\"the token was revoked\"".into())
        }
        r if r.status() == 401 => {
            let api_key = format!("ApiKey realm=\"portcullis\", header=\"{}\"", policy.api_keys.header);
            Some(if policy.bearer.is_some() { format!("Bearer realm=\"portcullis\", {api_key}") } else { api_key })
        }
        _ => None,
    }
}

/// Retry-After in whole seconds (at least 1), for a 429.
pub fn retry_after_secs(d: &Decision) -> Option<u64> {
    d.retry_after.map(|us| secs_ceil(us).max(1))
}

/// The JSON body of a denial.
pub fn deny_body(d: &Decision, request_id: &str, now: Micros) -> String {
    let status = d.status();
    let error = d.reason.client_error();
    if status == 429 {
        let remaining = tightest(&d.quotas).map_or(0, |i| d.quotas[i].verdict.remaining);
        return too_many_requests_body(retry_after_secs(d).unwrap_or(1), remaining, now);
    }
    let mut body = serde_json::json!({ "status": status, "error": error });
    if !request_id.is_empty() {
        body["request_id"] = request_id.into();
    }
    if status == 503
        && let Some(s) = retry_after_secs(d)
    {
        // the expected wait, as the reference asks: a client told when to come back
        body["retry_after"] = s.into();
    }
    body.to_string()
}

/// The reference guide's 429 body. It depends only on the wait, the remaining count and the
/// second the wait ends in, so every refusal in one second with the same wait has the same body:
/// each thread keeps the last one it wrote and copies it, instead of formatting the date and the
/// JSON per refusal (which made a refusal dearer than an allowance).
fn too_many_requests_body(retry_after_secs: u64, remaining: u64, now: Micros) -> String {
    /// (reset second, retry-after, remaining): what a 429 body depends on
    type Key = (u64, u64, u64);
    thread_local! {
        /// the last key and the body written for it
        static LAST: std::cell::RefCell<Option<(Key, String)>> = const { std::cell::RefCell::new(None) };
    }
    let reset = now.saturating_add(retry_after_secs.saturating_mul(MICROS_PER_SEC));
    let key = (reset / MICROS_PER_SEC, retry_after_secs, remaining);
    LAST.with_borrow_mut(|last| match last {
        Some((k, body)) if *k == key => body.clone(),
        _ => last.insert((key, format_429_body(retry_after_secs, remaining, reset))).1.clone(),
    })
}

/// The 429 body itself, `reset` the instant the wait ends.
fn format_429_body(retry_after_secs: u64, remaining: u64, reset: Micros) -> String {
    // written directly (the keys in serde_json's order, as before): the refused path builds
    // no JSON value; nothing here needs escaping
    let reset_time = clock::rfc3339(reset);
    let error = Reason::TierRateExceeded.client_error();
    format!(
        "{{\"error\":\"{error}\",\"remaining_requests\":{remaining},\"reset_time\":\"{reset_time}\",\"retry_after\":{retry_after_secs},\"status\":429}}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_429_body_is_what_serde_json_would_write() {
        let now = 1_800_000_000 * MICROS_PER_SEC;
        let expected = serde_json::json!({
            "status": 429,
            "error": "Rate limit exceeded",
            "reset_time": clock::rfc3339(now + 7 * MICROS_PER_SEC),
            "remaining_requests": 3,
            "retry_after": 7,
        })
        .to_string();
        assert_eq!(too_many_requests_body(7, 3, now), expected);
        // the body kept for the same second and wait, and written anew for any other
        assert_eq!(too_many_requests_body(7, 3, now + 999_999), expected);
        for (retry, remaining, at) in [(8, 3, now), (7, 2, now), (7, 3, now + MICROS_PER_SEC)] {
            let expected = serde_json::json!({
                "status": 429,
                "error": "Rate limit exceeded",
                "reset_time": clock::rfc3339(at + retry * MICROS_PER_SEC),
                "remaining_requests": remaining,
                "retry_after": retry,
            })
            .to_string();
            assert_eq!(too_many_requests_body(retry, remaining, at), expected);
        }
    }

    fn limits() -> [LimitState<'static>; 2] {
        [
            LimitState { name: "burst", quota: 100, window: 60, remaining: 40, reset: 30 },
            LimitState { name: "da\"ily", quota: 1000, window: 86400, remaining: 7, reset: 3600 },
        ]
    }

    fn render(dialect: HeaderDialect) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        ietf_headers(dialect, limits(), 1, |k, v| out.push((k, v)));
        out
    }

    #[test]
    fn each_dialect_renders_its_drafts_syntax() {
        let s = |v: &[(&'static str, &str)]| v.iter().map(|(k, v)| (*k, v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            render(HeaderDialect::Draft10),
            s(&[
                ("ratelimit-policy", r#""burst";q=100;w=60, "da\"ily";q=1000;w=86400"#),
                ("ratelimit", r#""burst";r=40;t=30, "da\"ily";r=7;t=3600"#),
            ])
        );
        assert_eq!(
            render(HeaderDialect::Draft07),
            s(&[("ratelimit-policy", "100;w=60, 1000;w=86400"), ("ratelimit", "limit=1000, remaining=7, reset=3600")])
        );
        assert_eq!(
            render(HeaderDialect::Draft06),
            s(&[
                ("ratelimit-limit", "1000"),
                ("ratelimit-remaining", "7"),
                ("ratelimit-reset", "3600"),
                ("ratelimit-policy", "100;w=60, 1000;w=86400"),
            ])
        );
        assert!(render(HeaderDialect::None).is_empty());
    }
}
