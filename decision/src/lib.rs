//! The portcullis service: configuration, stores, the engine, the gRPC and HTTP adapters,
//! telemetry and server wiring. Decisions themselves live in `decision-core`.

pub mod config;
pub mod clock;
pub mod store;
pub mod api;
pub mod engine;
pub mod explain;
pub mod telemetry;
pub mod server;
