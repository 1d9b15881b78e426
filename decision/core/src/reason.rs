//! The one table of reasons: why a request was allowed or denied, with the HTTP status each
//! answers with (RFC 9110, RFC 6585 for 429), the error text clients see and the gRPC code a
//! failed call maps to. Every adapter renders a decision from this table.

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
    /// the token was revoked through the admin API (`RevokeToken`) before its expiry
    TokenRevoked,
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
    /// the caller's deadline (gRPC `grpc-timeout`) passed before the request could be decided;
    /// nothing was counted unless a store call was already under way
    DeadlineExceeded,
}

impl Reason {
    pub const ALL: [Reason; 49] = [
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
        Reason::TokenRevoked,
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
        Reason::DeadlineExceeded,
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
            Reason::TokenRevoked => "token_revoked",
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
            Reason::DeadlineExceeded => "deadline_exceeded",
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
            | Reason::TokenRevoked
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
            Reason::DeadlineExceeded => 504,
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
            504 => "Gateway timeout",
            _ => "OK",
        }
    }

    pub fn is_allowed(self) -> bool {
        matches!(self, Reason::Allowed | Reason::AllowedStoreUnavailable)
    }
}
