//! Credentials that need more than a table lookup: JWT bearer tokens (`jwt`) and opaque OAuth
//! 2.0 tokens (`introspection`, which also holds `Bearer`, the one verifier the core calls). API
//! keys are checked in the core (`decision_core::apikey`). `numeric_date` reads the time claims
//! of both kinds of token.

pub mod introspection;
pub mod jwt;

use decision_core::units::{MICROS_PER_SEC, Micros};

/// An RFC 7519 NumericDate (section 2: a JSON number of seconds since the epoch, which "can
/// represent non-integer values") as microseconds: integers, fractions (`1700000000.5`) and
/// exponent forms (`1.7e9`) alike, truncated to the microsecond and saturating at the far
/// future. A negative, non-finite or non-number value is `None`.
pub fn numeric_date(v: &serde_json::Value) -> Option<Micros> {
    if let Some(s) = v.as_u64() {
        return Some(s.saturating_mul(MICROS_PER_SEC));
    }
    let f = v.as_f64()?;
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    // `as` saturates at u64::MAX for values past it, which is what a date that far out means
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((f * MICROS_PER_SEC as f64) as Micros)
}
