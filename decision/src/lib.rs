//! The portcullis service: configuration, stores, the engine, the gRPC and HTTP adapters,
//! telemetry and server wiring. Decisions themselves live in `decision-core`.

pub mod admin;
pub mod alerts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod connections;
pub mod engine;
pub mod explain;
#[cfg(test)]
mod fuzz;
pub mod https;
pub mod keys;
pub mod report;
pub mod server;
pub mod store;
pub mod telemetry;
