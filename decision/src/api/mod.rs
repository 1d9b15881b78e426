//! Thin adapters: they translate wire messages to the core's `Request` and decisions back to
//! wire answers; they do not decide.

pub mod accesslog;
pub mod ext_authz;
pub mod native;
pub mod ratelimit;
pub mod respond;
