//! The counter operations a decision asks the store for (`Op`), the limit each enforces
//! (`OpKind`), and the all-or-nothing rule every store commits by (`refuses`).

use crate::quota::{Limit, Verdict};

/// Which limit an operation enforces (its name in the RateLimit headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// the tier's token bucket, keyed by identity
    TierBurst,
    /// the tier's 24-hour window, keyed by identity
    TierDaily,
    /// the zone's per-IP window
    Zone,
    /// a ratelimit (RLS) descriptor's limit
    Descriptor,
    /// the client address's auto-block flag (checked, cost 0)
    Block,
    /// the client address's failed-authentication counter
    AuthFailure,
    /// a bearer token's revocation flag (checked, cost 0; raised by the admin API's
    /// `RevokeToken` until the token expires)
    Revocation,
    /// a reservation record (the native API's `reserve`): always allowed; when the plan commits,
    /// the store keeps, under this operation's key until its limit's `Flag` duration, the time,
    /// the estimate (its cost) and the operations it covers (`covered`), which a later settle
    /// corrects by the actual cost
    Reservation,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::TierBurst => "burst",
            OpKind::TierDaily => "daily",
            OpKind::Zone => "ip",
            OpKind::Descriptor => "descriptor",
            OpKind::Block => "block",
            OpKind::AuthFailure => "auth_failures",
            OpKind::Reservation => "reservation",
            OpKind::Revocation => "revocation",
        }
    }

    /// Whether an estimate counted by this operation can be settled: the tier's quotas, which
    /// count a request's cost.
    pub fn reservable(self) -> bool {
        matches!(self, OpKind::TierBurst | OpKind::TierDaily)
    }
}

/// The operations a reservation at `ops[i]` covers: the run right before it that is
/// `reservable` and counts its cost (indices `i - n .. i`; `n`, returned, may be 0). The stores
/// and apply.lua's arguments read a reservation's coverage with this one rule.
pub fn covered(ops: &[Op], i: usize) -> usize {
    let cost = ops[i].cost;
    ops[..i].iter().rev().take_while(|op| op.kind.reservable() && op.cost == cost).count()
}

/// One counter operation for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// the store key; keys of one identity or one address share a `{hash tag}`
    pub key: String,
    pub limit: Limit,
    pub cost: u64,
    pub kind: OpKind,
    /// counted and reported but never enforced: its refusal does not refuse the plan
    pub shadow: bool,
}

/// Whether a plan's verdicts refuse it: any enforced operation refused (a shadow one never
/// refuses). The all-or-nothing rule every store commits by: a refused plan counts nothing.
pub fn refuses(ops: &[Op], verdicts: &[Verdict]) -> bool {
    ops.iter().zip(verdicts).any(|(op, v)| !v.allowed && !op.shadow)
}
