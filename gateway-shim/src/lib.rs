//! portcullis-shim: a TLS-terminating reverse proxy for teams without Envoy. It asks portcullis
//! exactly what Envoy asks (ext_authz v3 Check, optionally ratelimit v3, and the completion as
//! `portcullis.v1.Decision/Complete` instead of Envoy's access log), applies the answers as
//! Envoy applies them, and proxies what is allowed to one upstream. It depends on `proto` (and on
//! `decision-core` for its log throttle only), never on the decision service.

pub mod authz;
pub mod clock;
pub mod config;
pub mod h1scan;
pub mod metrics;
pub mod path;
pub mod plain;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;
