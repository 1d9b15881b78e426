//! Logs (`tracing`, pretty or JSON lines) and Prometheus metrics.

pub mod metrics;

use tracing_subscriber::EnvFilter;

/// Field and span names, following OpenTelemetry's RPC conventions where they exist.
pub mod fields {
    pub const RPC_SYSTEM: &str = "rpc.system";
    pub const RPC_METHOD: &str = "rpc.method";
    pub const OUTCOME: &str = "decision.outcome";
    pub const REASON: &str = "decision.reason";
    pub const RULE: &str = "policy.rule";
    pub const STORE_BACKEND: &str = "store.backend";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Installs the global subscriber; logs go to stderr so stdout stays free for command output.
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(true);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.with_ansi(false).try_init(),
    };
}
