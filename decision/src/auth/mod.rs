//! Credentials that need more than a table lookup: JWT bearer tokens (`jwt`). API keys are
//! checked in the core (`decision_core::apikey`).

pub mod jwt;
