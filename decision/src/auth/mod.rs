//! Credentials that need more than a table lookup: JWT bearer tokens (`jwt`) and opaque OAuth
//! 2.0 tokens (`introspection`, which also holds `Bearer`, the one verifier the core calls). API
//! keys are checked in the core (`decision_core::apikey`).

pub mod introspection;
pub mod jwt;
