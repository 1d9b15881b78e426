//! `portcullis explain`: one request decided against a policy on a private memory store,
//! reported as JSON (decision, reason, rule, identity, and the answer Envoy would get).

use std::net::IpAddr;

use decision_core::Request;
use decision_core::policy::Policy;

use crate::api::ext_authz;
use crate::engine::Engine;
use crate::store::Store;

pub fn explain<S: Store>(
    policy: &std::sync::Arc<Policy>,
    store: S,
    method: &str,
    path: &str,
    peer: IpAddr,
    headers: &[(String, String)],
) -> anyhow::Result<String> {
    let get = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let engine = Engine::new(policy.clone(), store);
    let req = Request {
        method,
        path,
        peer,
        forwarded_for: get("x-forwarded-for"),
        content_length: get("content-length").and_then(|v| v.parse().ok()),
        header_bytes: headers.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
        api_key: get(&policy.api_keys.header),
        authorization: get("authorization"),
        cost: 1,
        reserve: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let d = rt.block_on(engine.decide(policy, &req));
    let answer = ext_authz::answer(&d, policy, "explain");
    let headers_of = |opts: &[proto::types::HeaderValueOption]| -> Vec<String> {
        opts.iter().filter_map(|o| o.header.as_ref()).map(|h| format!("{}: {}", h.key, h.value)).collect()
    };
    let (to_upstream, to_client, body) = match answer.http_response {
        Some(proto::ext_authz::check_response::HttpResponse::OkResponse(ok)) => {
            (headers_of(&ok.headers), headers_of(&ok.response_headers_to_add), String::new())
        }
        Some(proto::ext_authz::check_response::HttpResponse::DeniedResponse(denied)) => {
            (Vec::new(), headers_of(&denied.headers), denied.body)
        }
        _ => (Vec::new(), Vec::new(), String::new()),
    };
    let identity = d.ctx.identity.as_ref();
    let out = serde_json::json!({
        "decision": if d.allowed() { "allow" } else { "deny" },
        "status": d.status(),
        "reason": d.reason.as_str(),
        "client_ip": d.ctx.client_ip.map(|ip| ip.to_string()),
        "zone": policy.network.zones.name(d.ctx.zone),
        "normalized_path": d.ctx.path,
        "rule": d.ctx.route,
        "subject": identity.map(|i| i.subject.to_string()),
        "tier": identity.and_then(|i| policy.tiers.get(i.tier)).map(|t| t.name.to_string()),
        "headers_to_upstream": to_upstream,
        "headers_to_client": to_client,
        "body": body,
    });
    Ok(serde_json::to_string_pretty(&out)?)
}
