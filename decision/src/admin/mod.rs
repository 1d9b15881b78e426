//! The admin API (`portcullis.v1.Admin`, `proto/portcullis/v1/admin.proto`): its own listener
//! (`listen.admin`, off unless configured, never the public gRPC port), bearer tokens held as
//! SHA-256 digests with scopes, every call audited. `service` serves it; `client` is what the
//! `portcullis admin` commands use.

pub mod client;
pub mod keys;
pub mod service;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use subtle::ConstantTimeEq;

/// Longest object, reason or detail an `admin` audit event holds (characters).
pub const MAX_EVENT_FIELD: usize = 256;

/// `s` as an audit event or a log line may hold it: at most `MAX_EVENT_FIELD` characters,
/// control characters replaced by '?'.
pub fn clean(s: &str) -> String {
    s.chars().take(MAX_EVENT_FIELD).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// One `admin` audit event: an API call (allowed or refused) or a refused TLS handshake.
pub struct AdminEvent<'a> {
    /// the token's id; None: unauthenticated
    pub actor: Option<&'a str>,
    pub method: &'a str,
    pub object: &'a str,
    /// `ok`, or the gRPC code's name in lower case
    pub outcome: &'a str,
    pub detail: &'a str,
    pub reason: &'a str,
    pub peer: Option<IpAddr>,
}

/// Records `e` in the audit trail, or without one logs it at info (target `portcullis::admin`).
/// Object, reason and detail are `clean`ed here, whatever the caller sent.
pub fn record<S: crate::store::Store>(engine: &crate::engine::Engine<S>, e: &AdminEvent<'_>) {
    let (object, reason, detail) = (clean(e.object), clean(e.reason), clean(e.detail));
    let actor = e.actor.unwrap_or("unauthenticated");
    match engine.audit() {
        Some(audit) => {
            let mut ev = serde_json::Map::new();
            ev.insert("event".into(), "admin".into());
            ev.insert("timestamp".into(), crate::clock::rfc3339(crate::clock::now_micros()).into());
            ev.insert("actor".into(), actor.into());
            ev.insert("method".into(), e.method.into());
            ev.insert("object".into(), object.into());
            ev.insert("outcome".into(), e.outcome.into());
            if !detail.is_empty() {
                ev.insert("detail".into(), detail.into());
            }
            if !reason.is_empty() {
                ev.insert("reason".into(), reason.into());
            }
            ev.insert("client_ip".into(), e.peer.map_or(serde_json::Value::Null, |p| p.to_string().into()));
            ev.insert("instance".into(), audit.instance.clone().into());
            audit.record(ev);
        }
        None => tracing::info!(
            target: "portcullis::admin",
            actor,
            method = e.method,
            object = ?object,
            outcome = e.outcome,
            detail = ?detail,
            reason = ?reason,
            client_ip = e.peer.map(tracing::field::display),
            "admin call"
        ),
    }
}

/// What an admin token may do. A write scope does not imply `read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// status, usage, blocks and keys listed, requests explained
    Read,
    /// API keys created, rotated and revoked; tokens revoked
    KeysWrite,
    /// usage granted and reset
    UsageWrite,
    /// addresses blocked and unblocked
    BlocksWrite,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::KeysWrite, Scope::UsageWrite, Scope::BlocksWrite];

    /// The name in the policy (`admin.tokens[].scopes`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::KeysWrite => "keys:write",
            Scope::UsageWrite => "usage:write",
            Scope::BlocksWrite => "blocks:write",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// One admin token: its id (named in audit events, never the token) and SHA-256 digest.
#[derive(Debug, Clone)]
pub struct AdminToken {
    pub id: Arc<str>,
    pub digest: [u8; 32],
    pub scopes: Vec<Scope>,
}

/// `listen.admin` and `admin`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub addr: SocketAddr,
    pub tokens: Vec<AdminToken>,
    /// TLS on the admin listener (`admin.tls`); None: plain gRPC (keep it private)
    pub tls: Option<AdminTls>,
}

/// `admin.tls`: the listener's certificate chain and key (PEM), and the CA whose client
/// certificates the listener requires (mTLS) when given. Read and checked while the policy
/// loads; a bearer token is still required on every call.
#[derive(Clone)]
pub struct AdminTls {
    pub config: Arc<rustls::ServerConfig>,
    /// whether a client certificate from `client_ca_file` is required
    pub mutual: bool,
}

impl std::fmt::Debug for AdminTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl AdminTls {
    /// The server configuration: TLS 1.2 and 1.3 (rustls's defaults), ALPN `h2` (gRPC), the
    /// chain and key from PEM files, and with `client_ca` a verifier that requires a client
    /// certificate chaining to it. Errors name the file and what is wrong with it.
    pub fn load(
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
        client_ca: Option<&std::path::Path>,
    ) -> Result<AdminTls, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: not a PEM certificate chain: {e}", cert_file.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate in it", cert_file.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("{}: not a PEM private key: {e}", key_file.display()))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
                    let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
                    roots.add(cert).map_err(|e| format!("{}: not a CA certificate: {e}", ca.display()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{} and {}: {e}", cert_file.display(), key_file.display()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(AdminTls { config: Arc::new(config), mutual: client_ca.is_some() })
    }
}

/// Who called, when the call was authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: Arc<str>,
    pub scopes: Vec<Scope>,
}

/// Why an admin call was refused before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// no `authorization: Bearer` metadata (gRPC UNAUTHENTICATED)
    Unauthenticated,
    /// a token that is none of the policy's (gRPC UNAUTHENTICATED)
    UnknownToken,
    /// a known token without the scope the method needs (gRPC PERMISSION_DENIED)
    MissingScope(Scope),
}

impl AdminSettings {
    /// The token `authorization` (the whole metadata value, `Bearer <token>`) presents. Every
    /// token's digest is compared, in constant time, whatever matched before, so the time taken
    /// tells nothing about which token came close (RFC 6750 for the scheme).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Caller, Refusal> {
        let presented = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(decision_core::identity::bearer_token)
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::Unauthenticated)?;
        let digest = decision_core::apikey::digest(presented.as_bytes());
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t);
            }
        }
        let t = found.ok_or(Refusal::UnknownToken)?;
        Ok(Caller { token: t.id.clone(), scopes: t.scopes.clone() })
    }
}

impl Caller {
    /// Ok when the caller holds `scope`.
    pub fn may(&self, scope: Scope) -> Result<(), Refusal> {
        if self.scopes.contains(&scope) { Ok(()) } else { Err(Refusal::MissingScope(scope)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AdminSettings {
        AdminSettings {
            addr: "127.0.0.1:0".parse().expect("addr"),
            tls: None,
            tokens: vec![
                AdminToken {
                    id: "ops".into(),
                    digest: decision_core::apikey::digest(b"pat_ops"),
                    scopes: vec![Scope::Read, Scope::BlocksWrite],
                },
                AdminToken {
                    id: "ro".into(),
                    digest: decision_core::apikey::digest(b"pat_ro"),
                    scopes: vec![Scope::Read],
                },
            ],
        }
    }

    #[test]
    fn a_token_is_known_by_its_digest_and_holds_its_scopes_only() {
        let s = settings();
        let ops = s.authenticate(Some(b"Bearer pat_ops")).expect("ops");
        assert_eq!(&*ops.token, "ops");
        assert_eq!(ops.may(Scope::BlocksWrite), Ok(()));
        assert_eq!(ops.may(Scope::UsageWrite), Err(Refusal::MissingScope(Scope::UsageWrite)));
        let ro = s.authenticate(Some(b"bearer pat_ro")).expect("the scheme is case-insensitive");
        assert_eq!(ro.may(Scope::BlocksWrite), Err(Refusal::MissingScope(Scope::BlocksWrite)));
        for bad in [None, Some(&b"pat_ops"[..]), Some(b"Basic cGF0X29wcw=="), Some(b"Bearer ")] {
            assert_eq!(s.authenticate(bad).err(), Some(Refusal::Unauthenticated), "{bad:?}");
        }
        assert_eq!(s.authenticate(Some(b"Bearer pat_op")).err(), Some(Refusal::UnknownToken));
        for scope in Scope::ALL {
            assert_eq!(Scope::parse(scope.as_str()), Some(scope));
        }
    }
}
