//! How a decision is recorded, once, on the engine's side for every adapter: one structured log
//! line at debug (target `portcullis::decision`) and, with an audit trail, the reference guide's
//! audit record with credentials masked as it is built; and the audit event of a completion.

use std::time::Duration;

use decision_core::Decision;
use decision_core::policy::Policy;

use crate::clock;

/// What an adapter knows about a request beyond the core `Request`, for the log and the audit
/// event; borrowed from the adapter's message.
pub struct Facts<'a> {
    /// the request id (`x-request-id`, else the proxy's own id); may be empty
    pub request_id: &'a str,
    /// the method as received (empty when the message had no HTTP request)
    pub method: &'a str,
    /// the request target as received (path and query); the audit event masks credential-like
    /// query parameters, the log never carries the query
    pub target: &'a str,
    /// the request's headers, read only when an audit event is built
    pub headers: &'a (dyn Fn() -> Vec<(&'a str, &'a str)> + Sync),
    /// decide without counting anything (the native Check's `dry_run`); the audit event says so
    pub dry_run: bool,
    /// when the caller stops waiting (gRPC `grpc-timeout`): past it, nothing more is started
    /// and the request is answered `deadline_exceeded`
    pub deadline: Option<std::time::Instant>,
    /// whether an allowed request takes a concurrency slot under `traffic`: false where no
    /// completion can ever free it (forward-auth: the proxy reports nothing afterwards)
    pub concurrency_slot: bool,
}

impl<'a> Facts<'a> {
    /// A request with nothing known about it (a message without an HTTP request).
    pub fn none() -> Facts<'a> {
        Facts {
            request_id: "",
            method: "",
            target: "",
            headers: &Vec::new,
            dry_run: false,
            deadline: None,
            concurrency_slot: true,
        }
    }
}

/// The audit event of a decision: the reference's record, credentials masked as it is built,
/// in canonical JSON already (no map on the request path).
pub(super) fn audit_event(
    audit: &crate::audit::Audit,
    d: &Decision,
    policy: &Policy,
    facts: &Facts<'_>,
    took: Duration,
    id: super::DecisionId,
) -> crate::audit::event::Members {
    let (path, query) = facts.target.split_once('?').unwrap_or((facts.target, ""));
    let input = crate::audit::event::EventInput {
        request_id: facts.request_id,
        timestamp: clock::rfc3339(clock::now_micros()),
        client_ip: d.ctx.client_ip.map(|ip| ip.to_string()),
        method: facts.method,
        endpoint: d.ctx.path.as_deref().unwrap_or(path),
        query,
        headers: (facts.headers)(),
        response_code: d.status(),
        processing_time_ms: (took.as_secs_f64() * 1e6).round() / 1e3,
        decision: if d.allowed() { "allow" } else { "deny" },
        reason: d.reason.as_str(),
        subject: d.ctx.identity.as_ref().map(|i| &*i.subject),
        tier: d.ctx.identity.as_ref().and_then(|i| policy.tiers.get(i.tier)).map(|t| &*t.name),
        rule: d.ctx.route,
        instance: &audit.instance,
        credential_header: Some(&policy.api_keys.header),
    };
    let mut ev = crate::audit::event::build(input, &audit.mask);
    ev.push("event", "decision");
    ev.push("decision_id", &id.to_string());
    if !policy.version.is_empty() {
        ev.push("policy_version", &*policy.version);
    }
    if facts.dry_run {
        ev.push("dry_run", &true);
    }
    ev
}

/// The audit event of a finished request (Envoy's access log or the native `Complete`).
pub(super) fn completion_event(
    audit: &crate::audit::Audit,
    c: &super::Completion<'_>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut ev = serde_json::Map::new();
    ev.insert("event".into(), "completion".into());
    ev.insert("request_id".into(), c.request_id.into());
    ev.insert("timestamp".into(), clock::rfc3339(clock::now_micros()).into());
    ev.insert("response_code".into(), c.status.into());
    ev.insert("processing_time".into(), c.total_ms.into());
    ev.insert("upstream_error".into(), c.upstream_error.into());
    ev.insert("instance".into(), audit.instance.clone().into());
    ev
}

/// One structured line per decision, at `debug` (target `portcullis::decision`): the audit
/// trail is the per-request record, so the default level writes none (`--log
/// info,portcullis::decision=debug` turns them on). The path is the normalized one, without the
/// query (a query can carry secrets); no header value is logged.
pub(super) fn log_decision(d: &Decision, policy: &Policy, facts: &Facts<'_>, took: Duration) {
    let subject = d.ctx.identity.as_ref().map(|i| &*i.subject);
    let tier = d.ctx.identity.as_ref().and_then(|i| policy.tiers.get(i.tier)).map(|t| &*t.name);
    tracing::debug!(
        target: "portcullis::decision",
        request_id = facts.request_id,
        client_ip = d.ctx.client_ip.map(tracing::field::display),
        method = facts.method,
        path = d.ctx.path.as_deref(),
        subject,
        tier,
        outcome = if d.allowed() { "allow" } else { "deny" },
        reason = d.reason.as_str(),
        status = d.status(),
        rule = d.ctx.route,
        upstream = d.lease.as_ref().map(|l| &*l.upstream),
        queue_wait_us = d.lease.as_ref().map(|l| l.waited).filter(|w| *w > 0),
        latency_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        "decision"
    );
}
