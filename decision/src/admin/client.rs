//! The `portcullis admin` commands' client of the admin API: one call each, with the token in
//! `authorization: Bearer`, answered as a human-readable table or, with `--json`, as one JSON
//! object for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use proto::portcullis_v1::admin_client::AdminClient;
use proto::portcullis_v1::{
    BlockRequest, BlockedAddress, CreateKeyRequest, GetStatusRequest, GetUsageRequest, GrantUsageRequest, KeyInfo,
    ListBlocksRequest, ListKeysRequest, ResetUsageRequest, RevokeKeyRequest, RevokeTokenRequest, RotateKeyRequest,
    UnblockRequest, Usage,
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// How long a command waits for the admin API, connecting and answering.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One admin command.
#[derive(Debug, Clone)]
pub enum Ask {
    Status,
    Usage { subject: String, tier: String },
    Grant { subject: String, tier: String, limit: String, amount: u64, reason: String },
    Reset { subject: String, tier: String, limit: String, reason: String },
    Blocks,
    Block { address: String, seconds: u64, reason: String },
    Unblock { address: String, reason: String },
    RevokeToken { token: String, subject: String, jti: String, expires_at: i64, reason: String },
    CreateKey { id: String, roles: Vec<String>, tier: String, expires_at: i64, prefix: String, reason: String },
    RotateKey { id: String, old_expires_at: i64, reason: String },
    RevokeKey { id: String, reason: String },
    ListKeys,
}

/// Why a command failed: the admin API's answer (its code and message), or no answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the admin API at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{}", refused_text(.0))]
    Refused(tonic::Status),
    #[error("the admin token is not a valid header value")]
    BadToken,
}

/// `what`, followed by every cause in `source`'s chain (a transport error's "connection
/// refused" sits two levels down).
fn with_causes(what: &str, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut text = what.to_owned();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
}

/// A refusal as a user reads it: the code, the message, and what an empty UNIMPLEMENTED or a
/// transport failure means.
fn refused_text(s: &tonic::Status) -> String {
    use std::error::Error as _;
    match s.code() {
        tonic::Code::Unimplemented => {
            "the admin API is not served at this address (the gRPC port? use listen.admin's)".into()
        }
        tonic::Code::Unavailable if s.message().is_empty() || s.message().contains("transport") => {
            format!("Unavailable: {}", with_causes(s.message(), s.source()))
        }
        code => format!("{code:?}: {}", s.message()),
    }
}

/// Runs `ask` against the admin API at `addr` (`host:port`, or a URL) with `token`; the answer
/// as text, or as JSON with `json`.
pub async fn run(addr: &str, token: &str, ask: Ask, json: bool) -> Result<String, AdminError> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let connect = |reason: String| AdminError::Connect { addr: addr.to_owned(), reason };
    let channel = Channel::from_shared(url.clone())
        .map_err(|e| connect(e.to_string()))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| {
            use std::error::Error as _;
            connect(with_causes(&e.to_string(), e.source()))
        })?;
    let mut c = AdminClient::new(channel);
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {token}").parse().map_err(|_| AdminError::BadToken)?;
    let v = match ask {
        Ask::Status => {
            let s = c.get_status(authed(&bearer, GetStatusRequest {})).await.map_err(AdminError::Refused)?.into_inner();
            json!({
                "policy_version": s.policy_version, "policy_file": s.policy_file, "loaded_at": s.loaded_at,
                "last_reload_error": s.last_reload_error, "last_reload_error_at": s.last_reload_error_at,
                "store": s.store, "store_ready": s.store_ready, "version": s.version,
            })
        }
        Ask::Usage { subject, tier } => usage_json(
            c.get_usage(authed(&bearer, GetUsageRequest { subject, tier }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner(),
        ),
        Ask::Grant { subject, tier, limit, amount, reason } => usage_json(
            c.grant_usage(authed(&bearer, GrantUsageRequest { subject, tier, limit, amount, reason }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner(),
        ),
        Ask::Reset { subject, tier, limit, reason } => usage_json(
            c.reset_usage(authed(&bearer, ResetUsageRequest { subject, tier, limit, reason }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner(),
        ),
        Ask::Blocks => {
            let l =
                c.list_blocks(authed(&bearer, ListBlocksRequest {})).await.map_err(AdminError::Refused)?.into_inner();
            json!({ "blocks": l.blocks.into_iter().map(blocked_json).collect::<Vec<_>>() })
        }
        Ask::Block { address, seconds, reason } => blocked_json(
            c.block(authed(&bearer, BlockRequest { address, duration_seconds: seconds, reason }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner(),
        ),
        Ask::Unblock { address, reason } => {
            let u = c
                .unblock(authed(&bearer, UnblockRequest { address, reason }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner();
            json!({ "was_blocked": u.was_blocked })
        }
        Ask::RevokeToken { token, subject, jti, expires_at, reason } => {
            let r = c
                .revoke_token(authed(&bearer, RevokeTokenRequest { token, subject, jti, expires_at, reason }))
                .await
                .map_err(AdminError::Refused)?
                .into_inner();
            json!({ "subject": r.subject, "token_id": r.token_id, "until": r.until })
        }
        Ask::CreateKey { id, roles, tier, expires_at, prefix, reason } => {
            let req = CreateKeyRequest { id, roles, tier, expires_at, prefix, reason, ..Default::default() };
            let k = c.create_key(authed(&bearer, req)).await.map_err(AdminError::Refused)?.into_inner();
            json!({ "key": k.key, "keys": k.info.into_iter().map(key_json).collect::<Vec<_>>() })
        }
        Ask::RotateKey { id, old_expires_at, reason } => {
            let req = RotateKeyRequest { id, old_expires_at, reason, ..Default::default() };
            let k = c.rotate_key(authed(&bearer, req)).await.map_err(AdminError::Refused)?.into_inner();
            json!({ "key": k.key, "keys": k.info.into_iter().map(key_json).collect::<Vec<_>>() })
        }
        Ask::RevokeKey { id, reason } => {
            let k =
                c.revoke_key(authed(&bearer, RevokeKeyRequest { id, reason })).await.map_err(AdminError::Refused)?;
            json!({ "keys": [key_json(k.into_inner())] })
        }
        Ask::ListKeys => {
            let l = c.list_keys(authed(&bearer, ListKeysRequest {})).await.map_err(AdminError::Refused)?.into_inner();
            json!({ "keys": l.keys.into_iter().map(key_json).collect::<Vec<_>>() })
        }
    };
    Ok(if json { format!("{v}\n") } else { table(&v) })
}

/// `msg` with the admin token.
fn authed<T>(bearer: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", bearer.clone());
    r
}

fn usage_json(u: Usage) -> Value {
    json!({
        "subject": u.subject,
        "tier": u.tier,
        "limits": u.limits.into_iter().map(|l| json!({
            "name": l.name, "limit": l.limit, "used": l.used, "remaining": l.remaining,
            "window_seconds": l.window_seconds, "reset_seconds": l.reset_seconds,
        })).collect::<Vec<_>>(),
    })
}

fn key_json(k: KeyInfo) -> Value {
    json!({
        "id": k.id, "roles": k.roles.join(","), "tier": k.tier, "source": k.source,
        "created_at": k.created_at, "live_values": k.live_values, "not_before": k.not_before,
        "expires_at": k.expires_at, "revoked": k.revoked,
        "labels": k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect::<Vec<_>>().join(","),
    })
}

fn blocked_json(b: BlockedAddress) -> Value {
    json!({ "address": b.address, "until": b.until, "remaining_seconds": b.remaining_seconds })
}

/// A JSON answer as text: scalars as `name: value` lines, a list of objects as an aligned
/// table (its keys as the header).
fn table(v: &Value) -> String {
    let mut out = String::new();
    let Some(obj) = v.as_object() else { return format!("{v}\n") };
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    // scalars first, then tables
    let mut entries: Vec<(&String, &Value)> = obj.iter().collect();
    entries.sort_by_key(|(_, v)| v.is_array());
    for (k, v) in entries {
        match v {
            Value::Array(rows) => {
                let Some(first) = rows.first().and_then(Value::as_object) else {
                    let _ = writeln!(out, "{k}: none");
                    continue;
                };
                // what a row is about (its name or address) first
                let mut cols: Vec<&String> = first.keys().collect();
                cols.sort_by_key(|c| !matches!(c.as_str(), "name" | "address" | "id"));
                let grid: Vec<Vec<String>> = rows
                    .iter()
                    .map(|r| cols.iter().map(|c| r.get(c.as_str()).map(cell).unwrap_or_default()).collect())
                    .collect();
                let widths: Vec<usize> = cols
                    .iter()
                    .enumerate()
                    .map(|(i, c)| grid.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len()))
                    .collect();
                let line = |cells: Vec<&str>| {
                    cells
                        .iter()
                        .zip(&widths)
                        .map(|(c, w)| format!("{c:<w$}"))
                        .collect::<Vec<_>>()
                        .join("  ")
                        .trim_end()
                        .to_owned()
                };
                let _ = writeln!(
                    out,
                    "{}",
                    line(
                        cols.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>().iter().map(String::as_str).collect()
                    )
                );
                for r in &grid {
                    let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
                }
            }
            other => {
                let _ = writeln!(out, "{k}: {}", cell(other));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_as_aligned_tables() {
        let v = json!({"subject": "alice", "limits": [
            {"name": "burst", "remaining": 5}, {"name": "daily", "remaining": 12345}
        ]});
        assert_eq!(table(&v), "subject: alice\nNAME   REMAINING\nburst  5\ndaily  12345\n");
        assert_eq!(table(&json!({"blocks": []})), "blocks: none\n");
    }
}
