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

/// Log lines waiting for the writer thread at most; past it, logging waits (no line is dropped).
pub const LOG_BUFFER_LINES: usize = 128 * 1024;

/// Installs the global subscriber; logs go to stderr so stdout stays free for command output.
///
/// Lines are formatted on the calling thread and written by a dedicated thread through a
/// buffer flushed after each batch, so a decision never waits on a `write` to stderr (one
/// unbuffered write per decision halved the throughput in the benchmark). Keep the returned
/// guard alive until exit: dropping it flushes what is left.
pub fn init_logging(format: LogFormat, filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("portcullis-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_target(true);
    // A second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Pretty => builder.with_ansi(false).try_init(),
    };
    guard
}
