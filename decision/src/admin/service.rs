//! `portcullis.v1.Admin` (proto/portcullis/v1/admin.proto), served on the admin listener only.
//! Each call is authenticated (`AdminSettings::authenticate`), checked against the scope its
//! method needs, run, and recorded as an `admin` audit event whatever came of it: the token's
//! id (never the token), the method, the object (an address, a subject), the outcome and the
//! operator's reason. Without an audit trail the same fields go to the log at info.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use decision_core::plan::OpKind;
use decision_core::policy::{Policy, Tier};
use decision_core::units::Micros;
use proto::portcullis_v1::admin_server::Admin;
use proto::portcullis_v1::{
    BlockRequest, BlockedAddress, CheckRequest, CheckResponse, CreateKeyRequest, CreatedKey, GetStatusRequest,
    GetStatusResponse, GetUsageRequest, GrantUsageRequest, KeyInfo, Limit, ListBlocksRequest, ListBlocksResponse,
    ListKeysRequest, ListKeysResponse, ResetUsageRequest, RevokeKeyRequest, RevokeTokenRequest, RevokeTokenResponse,
    RotateKeyRequest, UnblockRequest, UnblockResponse, Usage,
};
use tonic::{Code, Request, Response, Status};

use super::{AdminSettings, Caller, Refusal, Scope};
use crate::api::{native, respond};
use crate::clock;
use crate::engine::Engine;
use crate::store::Store;

/// Longest subject, tier, limit name or reason accepted.
pub const MAX_FIELD_BYTES: usize = 256;
/// Most units one grant gives back.
pub const MAX_GRANT: u64 = 1_000_000_000;
/// Longest operator block: 30 days.
pub const MAX_BLOCK_SECONDS: u64 = 30 * 24 * 3600;
/// Longest revocation: 366 days (a token living longer is revoked that long).
pub const MAX_REVOCATION_SECONDS: i64 = 366 * 24 * 3600;
/// Longest token accepted for a revocation (a JWT is refused past 8 KiB anyway).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

fn key_status(e: crate::engine::admin::KeyError) -> Status {
    use crate::engine::admin::KeyError;
    match e {
        KeyError::Invalid(why) => Status::invalid_argument(why),
        KeyError::NotFound(_) => Status::not_found(e.to_string()),
        KeyError::Exists(_) => Status::already_exists(e.to_string()),
        KeyError::InPolicy(_) => Status::failed_precondition(e.to_string()),
        KeyError::Conflict(_) => Status::aborted(e.to_string()),
        KeyError::Store(e) => unavailable(e),
    }
}

/// Seconds since the epoch (0: none) as microseconds.
fn micros_of(secs: i64) -> Option<Micros> {
    (secs > 0).then(|| u64::try_from(secs).unwrap_or(0).saturating_mul(1_000_000))
}

/// What a store-held key's record shows (never a value or a digest).
fn store_key_info(id: &str, r: &crate::admin::keys::KeyRecord) -> KeyInfo {
    let now = clock::now_micros();
    let live: Vec<_> = r.values.iter().filter(|v| v.expires_at.is_none_or(|e| e > now)).collect();
    let not_before = live.iter().map(|v| v.not_before).min().flatten();
    let expires_at =
        if live.iter().any(|v| v.expires_at.is_none()) { None } else { live.iter().filter_map(|v| v.expires_at).max() };
    KeyInfo {
        id: id.to_owned(),
        roles: r.roles.clone(),
        tier: r.tier.clone(),
        labels: r.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        source: "store".into(),
        created_at: clock::rfc3339(r.created),
        live_values: u32::try_from(live.len()).unwrap_or(u32::MAX),
        not_before: not_before.map_or_else(String::new, clock::rfc3339),
        expires_at: expires_at.map_or_else(String::new, clock::rfc3339),
        revoked: r.revoked,
    }
}

/// What a revocation names: the subject (as portcullis names it), the token's id, and when it
/// expires (seconds since the epoch).
fn revocation_of(r: &RevokeTokenRequest) -> Result<(String, String, i64), Status> {
    text("subject", &r.subject)?;
    text("jti", &r.jti)?;
    if r.token.is_empty() {
        if r.subject.is_empty() || r.jti.is_empty() || r.expires_at == 0 {
            return Err(Status::invalid_argument("give the token, or its subject, jti and expires_at"));
        }
        let id = decision_core::identity::token_id(Some(&r.jti), "");
        if *id != *r.jti {
            return Err(Status::invalid_argument(
                "jti: 1 to 128 letters, digits, '.', '_' or '-' (another jti is revoked by giving the token)",
            ));
        }
        return Ok((r.subject.clone(), r.jti.clone(), r.expires_at));
    }
    if r.token.len() > MAX_TOKEN_BYTES || !r.token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument("token: at most 16 KiB of visible ASCII (without \"Bearer \")"));
    }
    // a JWT: its claims, read without checking the signature (a revocation only takes away)
    let claims = r.token.split('.').nth(1).filter(|_| r.token.split('.').count() == 3).and_then(|p| {
        let bytes = decision_core::encode::b64url_decode(p)?;
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&bytes).ok()
    });
    let (subject, jti, exp) = match &claims {
        Some(c) => (
            c.get("sub").and_then(|s| s.as_str()).map(|s| format!("jwt:{s}")),
            c.get("jti").and_then(|j| j.as_str()),
            c.get("exp").and_then(serde_json::Value::as_i64),
        ),
        None => (None, None, None),
    };
    let subject = match (subject, r.subject.is_empty()) {
        (_, false) => r.subject.clone(),
        (Some(s), true) => s,
        (None, true) => {
            return Err(Status::invalid_argument("subject: required for a token that is not a JWT with a sub"));
        }
    };
    let expires_at = match (exp, r.expires_at) {
        (_, e) if e != 0 => e,
        (Some(e), _) => e,
        (None, _) => return Err(Status::invalid_argument("expires_at: required for a token without exp")),
    };
    // an opaque token is known by its digest only (introspection's answer is not ours to see)
    let jti = match (&claims, r.jti.is_empty()) {
        (None, _) => None,
        (Some(_), true) => jti,
        (Some(_), false) => Some(r.jti.as_str()),
    };
    Ok((subject, decision_core::identity::token_id(jti, &r.token).to_string(), expires_at))
}

/// The policy in force and how it came to be, for `GetStatus` (the server updates it at every
/// load and reload).
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    pub version: String,
    pub file: String,
    pub loaded_at: Micros,
    /// the last refused reload: its problems and when
    pub last_error: Option<(String, Micros)>,
}

/// The `portcullis.v1.Admin` service.
pub struct AdminApi<S> {
    engine: Arc<Engine<S>>,
    /// the tokens in force: a policy reload swaps them (the listener's address stays)
    settings: Arc<arc_swap::ArcSwap<AdminSettings>>,
    status: Arc<Mutex<PolicyStatus>>,
}

impl<S> AdminApi<S> {
    pub fn new(
        engine: Arc<Engine<S>>,
        settings: Arc<arc_swap::ArcSwap<AdminSettings>>,
        status: Arc<Mutex<PolicyStatus>>,
    ) -> Self {
        AdminApi { engine, settings, status }
    }
}

/// What one admin call did, for its audit event.
struct Call<'a> {
    method: &'static str,
    caller: Option<&'a str>,
    object: String,
    reason: &'a str,
    peer: Option<IpAddr>,
}

/// The caller's address: over plain TCP as tonic records it, over TLS as the admin listener's
/// accept loop does (`tls::PeerInfo`).
fn peer_of<T>(req: &Request<T>) -> Option<IpAddr> {
    req.remote_addr().or_else(|| req.extensions().get::<super::tls::PeerInfo>().and_then(|p| p.remote)).map(|a| a.ip())
}

/// `s`, if it is short and printable (an operator's text in an audit event or a store key).
fn text<'a>(field: &str, s: &'a str) -> Result<&'a str, Status> {
    if s.len() > MAX_FIELD_BYTES || !decision_core::fields::valid_value(s.as_bytes()) {
        return Err(Status::invalid_argument(format!(
            "{field}: at most {MAX_FIELD_BYTES} bytes, with no control character"
        )));
    }
    Ok(s)
}

fn address(s: &str) -> Result<IpAddr, Status> {
    s.parse::<IpAddr>().map_err(|_| Status::invalid_argument(format!("address: {s:?} is not an IPv4 or IPv6 address")))
}

fn unavailable(e: crate::store::StoreError) -> Status {
    tracing::warn!(error = %e, "admin call: the store failed");
    Status::unavailable(
        "the store is unavailable or did not answer in time: the change may not have been made (read before trying again)",
    )
}

fn limit_kind(name: &str) -> Result<OpKind, Status> {
    match name {
        "burst" => Ok(OpKind::TierBurst),
        "daily" => Ok(OpKind::TierDaily),
        _ => Err(Status::invalid_argument(format!("limit: {name:?} is not one of a tier's limits (burst, daily)"))),
    }
}

/// The subject's tier: an API key's (of the policy file, or `stored_tier`, of the store), or
/// `tier` as given for a token's subject; a given tier that contradicts a key's is refused.
fn subject_tier<'p>(
    policy: &'p Policy,
    subject: &str,
    tier: &str,
    stored_tier: Option<&str>,
) -> Result<&'p Tier, Status> {
    if subject.is_empty() {
        return Err(Status::invalid_argument("subject is required (an API key's id, a token's sub)"));
    }
    text("subject", subject)?;
    text("tier", tier)?;
    // the tier an API key (of the policy file or of the store) has
    let known = policy.api_keys.tier_of(subject).or_else(|| stored_tier.and_then(|t| policy.tier(t)));
    let index = match (known, tier.is_empty()) {
        (Some(k), true) => k,
        (None, true) => {
            return Err(Status::invalid_argument(format!(
                "tier: required for {subject:?}, which is no API key's id (a token's subject: give its tier)"
            )));
        }
        (known, false) => {
            let given = policy
                .tier(tier)
                .ok_or_else(|| Status::invalid_argument(format!("tier: no tier {tier:?} in the policy")))?;
            if known.is_some_and(|k| k != given) {
                return Err(Status::invalid_argument(format!(
                    "tier: {subject:?} is an API key of another tier; leave tier out"
                )));
            }
            given
        }
    };
    policy.tiers.get(index).ok_or_else(|| Status::internal("a tier index out of range"))
}

impl<S: Store> AdminApi<S> {
    /// Authenticates the call and checks its scope; a refusal is audited here.
    fn gate<T>(&self, req: &Request<T>, method: &'static str, scope: Scope) -> Result<Caller, Status> {
        let authorization = req.metadata().get("authorization").map(|v| v.as_bytes());
        let refused = match self.settings.load().authenticate(authorization) {
            Ok(caller) => match caller.may(scope) {
                Ok(()) => return Ok(caller),
                Err(r) => (r, Some(caller.token)),
            },
            Err(r) => (r, None),
        };
        let peer = peer_of(req);
        let call = Call { method, caller: refused.1.as_deref(), object: String::new(), reason: "", peer };
        let status = match refused.0 {
            Refusal::Unauthenticated => {
                Status::unauthenticated("an admin token is required: authorization: Bearer <token> (admin.tokens)")
            }
            Refusal::UnknownToken => Status::unauthenticated("unknown admin token (none of admin.tokens)"),
            Refusal::MissingScope(s) => {
                Status::permission_denied(format!("this token lacks the {} scope {method} needs", s.as_str()))
            }
        };
        self.audit::<()>(&call, &Err(status.clone()));
        Err(status)
    }

    /// The `admin` audit event (or log line) of a call, allowed or refused (`super::record`
    /// cleans and cuts what the caller sent).
    fn audit<T>(&self, c: &Call<'_>, outcome: &Result<T, Status>) {
        let (outcome, detail) = match outcome {
            Ok(_) => ("ok", ""),
            Err(s) => (code_name(s.code()), s.message()),
        };
        let event = super::AdminEvent {
            actor: c.caller,
            method: c.method,
            object: &c.object,
            outcome,
            detail,
            reason: c.reason,
            peer: c.peer,
        };
        super::record(&self.engine, &event);
    }

    /// Runs an authenticated call and audits it.
    fn finish<T>(&self, c: Call<'_>, outcome: Result<T, Status>) -> Result<Response<T>, Status> {
        self.audit(&c, &outcome);
        outcome.map(Response::new)
    }

    fn usage_of(&self, subject: &str, tier: &Tier, limits: Vec<crate::engine::admin::LimitUsage>) -> Usage {
        Usage {
            subject: subject.to_owned(),
            tier: tier.name.to_string(),
            limits: limits
                .into_iter()
                .map(|l| {
                    let quota = l.limit.quota();
                    Limit {
                        name: l.kind.as_str().to_owned(),
                        limit: quota,
                        used: quota.saturating_sub(l.verdict.remaining),
                        remaining: l.verdict.remaining,
                        window_seconds: respond::secs_ceil(l.limit.window()),
                        reset_seconds: respond::secs_ceil(l.verdict.reset),
                    }
                })
                .collect(),
        }
    }
}

/// gRPC's name of a status code, in lower case (`permission_denied`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::Unauthenticated => "unauthenticated",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::FailedPrecondition => "failed_precondition",
        _ => "error",
    }
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminApi<S> {
    async fn get_status(&self, req: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let caller = self.gate(&req, "GetStatus", Scope::Read)?;
        let peer = peer_of(&req);
        let status = self.status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let store = self.engine.store();
        let answer = GetStatusResponse {
            policy_version: status.version,
            policy_file: status.file,
            loaded_at: clock::rfc3339(status.loaded_at),
            last_reload_error: status.last_error.as_ref().map_or_else(String::new, |(e, _)| e.clone()),
            last_reload_error_at: status.last_error.as_ref().map_or_else(String::new, |(_, at)| clock::rfc3339(*at)),
            store: store.backend().to_owned(),
            store_ready: store.ready(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let call = Call { method: "GetStatus", caller: Some(&caller.token), object: String::new(), reason: "", peer };
        self.finish(call, Ok(answer))
    }

    async fn explain(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let caller = self.gate(&req, "Explain", Scope::Read)?;
        let started = clock::instant();
        let remote =
            req.remote_addr().or_else(|| req.extensions().get::<super::tls::PeerInfo>().and_then(|p| p.remote));
        let mut msg = req.into_inner();
        msg.dry_run = true;
        msg.reserve = false;
        let outcome = native::decide(&self.engine, &msg, remote, None, false, started).await.map_err(|r| match r {
            native::Refused::Invalid(why) => Status::invalid_argument(why),
            native::Refused::DeadlineExceeded => Status::deadline_exceeded("the deadline passed"),
        });
        let call = Call {
            method: "Explain",
            caller: Some(&caller.token),
            // the path only: a query can carry a credential
            object: format!("{} {}", msg.operation, msg.resource.split('?').next().unwrap_or_default()),
            reason: "",
            peer: remote.map(|a| a.ip()),
        };
        self.finish(call, outcome)
    }

    async fn get_usage(&self, req: Request<GetUsageRequest>) -> Result<Response<Usage>, Status> {
        let caller = self.gate(&req, "GetUsage", Scope::Read)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let policy = self.engine.policy();
        let outcome = async {
            let tier = subject_tier(&policy, &r.subject, &r.tier, self.engine.store_key_tier(&r.subject).as_deref())?;
            let limits = self.engine.usage(&r.subject, tier).await.map_err(unavailable)?;
            Ok(self.usage_of(&r.subject, tier, limits))
        }
        .await;
        let call =
            Call { method: "GetUsage", caller: Some(&caller.token), object: r.subject.clone(), reason: "", peer };
        self.finish(call, outcome)
    }

    async fn grant_usage(&self, req: Request<GrantUsageRequest>) -> Result<Response<Usage>, Status> {
        let caller = self.gate(&req, "GrantUsage", Scope::UsageWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let policy = self.engine.policy();
        let outcome = async {
            let tier = subject_tier(&policy, &r.subject, &r.tier, self.engine.store_key_tier(&r.subject).as_deref())?;
            let which = limit_kind(&r.limit)?;
            text("reason", &r.reason)?;
            if r.amount == 0 || r.amount > MAX_GRANT {
                return Err(Status::invalid_argument("amount: 1 to 1000000000 units"));
            }
            self.engine.grant_usage(&r.subject, tier, which, r.amount).await.map_err(unavailable)?;
            let limits = self.engine.usage(&r.subject, tier).await.map_err(unavailable)?;
            Ok(self.usage_of(&r.subject, tier, limits))
        }
        .await;
        let object = format!("{} {} +{}", r.subject, r.limit, r.amount);
        let reason = r.reason.as_str();
        self.finish(Call { method: "GrantUsage", caller: Some(&caller.token), object, reason, peer }, outcome)
    }

    async fn reset_usage(&self, req: Request<ResetUsageRequest>) -> Result<Response<Usage>, Status> {
        let caller = self.gate(&req, "ResetUsage", Scope::UsageWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let policy = self.engine.policy();
        let outcome = async {
            let tier = subject_tier(&policy, &r.subject, &r.tier, self.engine.store_key_tier(&r.subject).as_deref())?;
            let which = if r.limit.is_empty() { None } else { Some(limit_kind(&r.limit)?) };
            text("reason", &r.reason)?;
            self.engine.reset_usage(&r.subject, tier, which).await.map_err(unavailable)?;
            let limits = self.engine.usage(&r.subject, tier).await.map_err(unavailable)?;
            Ok(self.usage_of(&r.subject, tier, limits))
        }
        .await;
        let object = format!("{} {}", r.subject, if r.limit.is_empty() { "all" } else { &r.limit });
        let reason = r.reason.as_str();
        self.finish(Call { method: "ResetUsage", caller: Some(&caller.token), object, reason, peer }, outcome)
    }

    async fn list_blocks(&self, req: Request<ListBlocksRequest>) -> Result<Response<ListBlocksResponse>, Status> {
        let caller = self.gate(&req, "ListBlocks", Scope::Read)?;
        let peer = peer_of(&req);
        let now = clock::now_micros();
        let outcome = self.engine.blocked_addresses().await.map_err(unavailable).map(|blocks| ListBlocksResponse {
            blocks: blocks
                .into_iter()
                .map(|(address, until)| BlockedAddress {
                    address,
                    until: clock::rfc3339(until),
                    remaining_seconds: respond::secs_ceil(until.saturating_sub(now)),
                })
                .collect(),
        });
        self.finish(
            Call { method: "ListBlocks", caller: Some(&caller.token), object: String::new(), reason: "", peer },
            outcome,
        )
    }

    async fn block(&self, req: Request<BlockRequest>) -> Result<Response<BlockedAddress>, Status> {
        let caller = self.gate(&req, "Block", Scope::BlocksWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let outcome = async {
            let ip = address(&r.address)?;
            text("reason", &r.reason)?;
            if r.duration_seconds == 0 || r.duration_seconds > MAX_BLOCK_SECONDS {
                return Err(Status::invalid_argument("duration_seconds: 1 to 2592000 (30 days)"));
            }
            let until = self.engine.block_address(ip, r.duration_seconds * 1_000_000).await.map_err(unavailable)?;
            Ok(BlockedAddress {
                address: ip.to_string(),
                until: clock::rfc3339(until),
                remaining_seconds: respond::secs_ceil(until.saturating_sub(clock::now_micros())),
            })
        }
        .await;
        let object = r.address.clone();
        let reason = r.reason.as_str();
        self.finish(Call { method: "Block", caller: Some(&caller.token), object, reason, peer }, outcome)
    }

    async fn unblock(&self, req: Request<UnblockRequest>) -> Result<Response<UnblockResponse>, Status> {
        let caller = self.gate(&req, "Unblock", Scope::BlocksWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let outcome = async {
            let ip = address(&r.address)?;
            text("reason", &r.reason)?;
            let was_blocked = self.engine.unblock_address(ip).await.map_err(unavailable)?;
            Ok(UnblockResponse { was_blocked })
        }
        .await;
        let object = r.address.clone();
        let reason = r.reason.as_str();
        self.finish(Call { method: "Unblock", caller: Some(&caller.token), object, reason, peer }, outcome)
    }

    async fn revoke_token(&self, req: Request<RevokeTokenRequest>) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.gate(&req, "RevokeToken", Scope::KeysWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let named = revocation_of(&r);
        let outcome = async {
            let (subject, token_id, expires_at) = named.clone()?;
            text("reason", &r.reason)?;
            let now_s = i64::try_from(clock::now_micros() / 1_000_000).unwrap_or(i64::MAX);
            // a JWT is accepted up to its issuer's leeway past exp: revoked that long too
            let leeway_s = i64::try_from(crate::config::MAX_JWT_LEEWAY / 1_000_000).unwrap_or(0);
            let expires_at = expires_at.saturating_add(leeway_s);
            if expires_at <= now_s {
                return Err(Status::invalid_argument("expires_at: the token has already expired; nothing to revoke"));
            }
            let until_s = expires_at.min(now_s.saturating_add(MAX_REVOCATION_SECONDS));
            let until = u64::try_from(until_s).unwrap_or(0).saturating_mul(1_000_000);
            self.engine.revoke_token(&subject, &token_id, until).await.map_err(unavailable)?;
            Ok(RevokeTokenResponse { subject, token_id, until: clock::rfc3339(until) })
        }
        .await;
        // the object names the token by its id, never by the token
        let object = match &named {
            Ok((subject, id, _)) => format!("{subject} {id}"),
            Err(_) => String::new(),
        };
        let reason = r.reason.as_str();
        self.finish(Call { method: "RevokeToken", caller: Some(&caller.token), object, reason, peer }, outcome)
    }

    async fn create_key(&self, req: Request<CreateKeyRequest>) -> Result<Response<CreatedKey>, Status> {
        let caller = self.gate(&req, "CreateKey", Scope::KeysWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let outcome = async {
            text("reason", &r.reason)?;
            let new = crate::engine::admin::NewKey {
                id: r.id.clone(),
                roles: r.roles.clone(),
                tier: r.tier.clone(),
                not_before: micros_of(r.not_before),
                expires_at: micros_of(r.expires_at),
                labels: r.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                prefix: r.prefix.clone(),
            };
            let (key, record) = self.engine.create_key(new).await.map_err(key_status)?;
            Ok(CreatedKey { key, info: Some(store_key_info(&r.id, &record)) })
        }
        .await;
        let reason = r.reason.as_str();
        self.finish(
            Call { method: "CreateKey", caller: Some(&caller.token), object: r.id.clone(), reason, peer },
            outcome,
        )
    }

    async fn rotate_key(&self, req: Request<RotateKeyRequest>) -> Result<Response<CreatedKey>, Status> {
        let caller = self.gate(&req, "RotateKey", Scope::KeysWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let outcome = async {
            text("reason", &r.reason)?;
            let until = micros_of(r.old_expires_at).unwrap_or_else(|| clock::now_micros() + 3_600_000_000);
            let (key, record) = self.engine.rotate_key(&r.id, until, &r.prefix).await.map_err(key_status)?;
            Ok(CreatedKey { key, info: Some(store_key_info(&r.id, &record)) })
        }
        .await;
        let reason = r.reason.as_str();
        self.finish(
            Call { method: "RotateKey", caller: Some(&caller.token), object: r.id.clone(), reason, peer },
            outcome,
        )
    }

    async fn revoke_key(&self, req: Request<RevokeKeyRequest>) -> Result<Response<KeyInfo>, Status> {
        let caller = self.gate(&req, "RevokeKey", Scope::KeysWrite)?;
        let peer = peer_of(&req);
        let r = req.into_inner();
        let outcome = async {
            text("reason", &r.reason)?;
            let record = self.engine.revoke_key(&r.id).await.map_err(key_status)?;
            Ok(store_key_info(&r.id, &record))
        }
        .await;
        let reason = r.reason.as_str();
        self.finish(
            Call { method: "RevokeKey", caller: Some(&caller.token), object: r.id.clone(), reason, peer },
            outcome,
        )
    }

    async fn list_keys(&self, req: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        let caller = self.gate(&req, "ListKeys", Scope::Read)?;
        let peer = peer_of(&req);
        let policy = self.engine.policy();
        let outcome = async {
            let mut keys: Vec<KeyInfo> = Vec::new();
            // the policy file's keys: one entry per id (a rotation lists an id twice there)
            for k in policy.api_keys.keys() {
                if let Some(info) = keys.iter_mut().find(|i| i.id == *k.id) {
                    info.live_values += 1;
                    continue;
                }
                keys.push(KeyInfo {
                    id: k.id.to_string(),
                    roles: policy.roles.names_of(k.roles).map(str::to_owned).collect(),
                    tier: policy.tiers.get(k.tier).map_or_else(String::new, |t| t.name.to_string()),
                    labels: Default::default(),
                    source: "policy".into(),
                    created_at: String::new(),
                    live_values: 1,
                    not_before: k.not_before.map_or_else(String::new, clock::rfc3339),
                    expires_at: k.expires_at.map_or_else(String::new, clock::rfc3339),
                    revoked: k.revoked,
                });
            }
            for (id, r) in self.engine.store_keys().await.map_err(unavailable)? {
                keys.push(store_key_info(&id, &r));
            }
            Ok(ListKeysResponse { keys })
        }
        .await;
        self.finish(
            Call { method: "ListKeys", caller: Some(&caller.token), object: String::new(), reason: "", peer },
            outcome,
        )
    }
}
