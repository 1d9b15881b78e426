//! The pure core of portcullis: request normalization, the compiled policy, quota math, the
//! plan of counter operations and the decision. No I/O, no clock, no async: time is an argument.

pub mod apikey;
pub mod decide;
pub mod encode;
pub mod fields;
pub mod glob;
pub mod identity;
pub mod net;
pub mod path;
pub mod plan;
pub mod policy;
pub mod quota;
pub mod reason;
pub mod rls;
pub mod roles;
pub mod throttle;
pub mod traffic;
pub mod units;

pub use decide::{Decision, Plan, Request, conclude, plan, store_failed};
pub use identity::{BearerVerifier, VerifiedToken};
pub use reason::Reason;
