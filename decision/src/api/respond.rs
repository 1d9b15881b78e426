//! How a decision reads to the client, shared by every adapter: the rate-limit headers
//! (IETF httpapi-ratelimit-headers, plus the older `X-RateLimit-*` for compatibility), the
//! `WWW-Authenticate` challenge, `Retry-After`, and the JSON body of a denial (for a 429, the
//! reference guide's shape: status, error, reset_time, remaining_requests, retry_after).

use decision_core::decide::QuotaReport;
use decision_core::policy::Policy;
use decision_core::units::{MICROS_PER_SEC, Micros};
use decision_core::{Decision, Reason};

use crate::clock;

fn secs_ceil(us: Micros) -> u64 {
    us.div_ceil(MICROS_PER_SEC)
}

/// The limit a client is closest to: the one with the least left (the first on a tie).
fn tightest(quotas: &[QuotaReport]) -> Option<&QuotaReport> {
    let refused = quotas.iter().find(|q| !q.verdict.allowed);
    refused.or_else(|| quotas.iter().min_by_key(|q| q.verdict.remaining))
}

/// Headers for the client's response describing every limit that applied.
pub fn ratelimit_headers(d: &Decision) -> Vec<(&'static str, String)> {
    use std::fmt::Write as _;
    let mut out = Vec::with_capacity(6);
    if d.quotas.is_empty() {
        return out;
    }
    // Each list is built in one buffer: this runs for every allowed request.
    let mut policy = String::with_capacity(24 * d.quotas.len());
    let mut state = String::with_capacity(24 * d.quotas.len());
    for (i, q) in d.quotas.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        // kind names are fixed tokens ("burst", "daily", "ip"): no escaping needed
        let _ = write!(policy, "{sep}\"{}\";q={};w={}", q.kind.as_str(), q.limit.quota(), secs_ceil(q.limit.window()));
        let _ =
            write!(state, "{sep}\"{}\";r={};t={}", q.kind.as_str(), q.verdict.remaining, secs_ceil(q.verdict.reset));
    }
    out.push(("ratelimit-policy", policy));
    out.push(("ratelimit", state));
    if let Some(q) = tightest(&d.quotas) {
        out.push(("x-ratelimit-limit", q.limit.quota().to_string()));
        out.push(("x-ratelimit-remaining", q.verdict.remaining.to_string()));
        out.push(("x-ratelimit-reset", secs_ceil(q.verdict.reset).to_string()));
    }
    if let Some(bp) = d.quota_warning {
        out.push(("x-quota-warning", format!("{}% of the daily quota used", bp / 100)));
    }
    out
}

/// The `WWW-Authenticate` challenge of a 401 (RFC 9110 section 11.6.1, RFC 6750 for Bearer).
pub fn www_authenticate(reason: Reason, policy: &Policy) -> Option<String> {
    match reason {
        Reason::FreshAuthRequired => {
            Some("Bearer error=\"invalid_token\", error_description=\"re-authentication required\"".into())
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
        let remaining = tightest(&d.quotas).map_or(0, |q| q.verdict.remaining);
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

/// A structured-field string (RFC 8941 section 3.3.3): `"` and `\` escaped, anything outside
/// printable ASCII replaced, so a configured name can never break the header.
pub fn sf_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
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
    out
}

/// The reference guide's 429 body.
pub fn too_many_requests_body(retry_after_secs: u64, remaining: u64, now: Micros) -> String {
    serde_json::json!({
        "status": 429,
        "error": Reason::TierRateExceeded.client_error(),
        "reset_time": clock::rfc3339(now + retry_after_secs * MICROS_PER_SEC),
        "remaining_requests": remaining,
        "retry_after": retry_after_secs,
    })
    .to_string()
}

/// Whole seconds, rounded up (the unit of every header and body field we send).
pub fn whole_secs(us: Micros) -> u64 {
    secs_ceil(us)
}
