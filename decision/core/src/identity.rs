//! Who a request is: the `Identity` a credential proves, and the `BearerVerifier` seam through
//! which the host's token verifiers (JWT, RFC 7662 introspection) answer without the core doing
//! cryptography or I/O.

use std::sync::Arc;

use crate::reason::Reason;
use crate::units::Micros;

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
    /// a bearer token's id, by which it can be revoked (`VerifiedToken::token_id`); None for an
    /// API key
    pub token_id: Option<Arc<str>>,
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
    /// what the token is revoked by: its `jti` when it has a usable one (1 to 128 letters,
    /// digits, '.', '_' or '-': nothing that could end a store key's hash tag or field), else
    /// the first 32 hex digits of its SHA-256 (`token_id`)
    pub token_id: Arc<str>,
}

/// Longest `jti` used as a token's id; a longer one, or one with other characters than
/// letters, digits, '.', '_' and '-', is replaced by the token's digest.
pub const MAX_JTI_BYTES: usize = 128;

/// A bearer token's revocation id: `jti` when usable, else the first 32 hex digits (128 bits)
/// of the token's SHA-256 (RFC 7519 section 4.1.7 for `jti`).
pub fn token_id(jti: Option<&str>, token: &str) -> Arc<str> {
    match jti {
        Some(j)
            if !j.is_empty()
                && j.len() <= MAX_JTI_BYTES
                && j.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) =>
        {
            j.into()
        }
        _ => {
            let digest = crate::apikey::digest(token.as_bytes());
            crate::encode::hex(&digest[..16]).into()
        }
    }
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

/// The token of an `authorization` value with the Bearer scheme (RFC 6750 section 2.1; the
/// scheme compared case-insensitively as bytes, so no multi-byte character is split), without
/// surrounding whitespace. None for any other scheme, or a scheme with nothing after it.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let b = authorization.as_bytes();
    (b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ")).then(|| authorization[7..].trim())
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_read_case_insensitively() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bEARER  abc "), Some("abc"));
        for none in ["Bearer ", "Bearer", "Basic abc", "", "Bearé abc", "Bearerabc"] {
            assert_eq!(bearer_token(none), None, "{none:?}");
        }
    }
}
