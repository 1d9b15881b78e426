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
    init(format, filter, None).0
}

/// Spans sent over OTLP use this target (and only they: logs stay logs).
pub const TRACE_TARGET: &str = "portcullis::trace";

static TRACING_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn tracing_on() -> bool {
    TRACING_ON.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where traces go, from the standard OpenTelemetry variables (read by clap).
#[derive(Debug, Clone)]
pub struct Otlp {
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (gRPC)
    pub endpoint: String,
    /// `OTEL_SERVICE_NAME`
    pub service_name: String,
}

/// As `init_logging`, and with `otlp`, request spans exported over OTLP/gRPC (batched; their
/// parent taken from the request's `traceparent`). Call it inside the Tokio runtime when `otlp`
/// is given (the exporter's channel lives there); keep the provider to flush it at exit.
pub fn init(
    format: LogFormat,
    filter: &str,
    otlp: Option<&Otlp>,
) -> (tracing_appender::non_blocking::WorkerGuard, Option<opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("portcullis-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_target(true);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).with_span_list(false).boxed(),
        LogFormat::Pretty => fmt.with_ansi(false).boxed(),
    };
    let provider = otlp.and_then(|o| match tracer_provider(o) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("portcullis: OpenTelemetry export is off: {e}");
            None
        }
    });
    TRACING_ON.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    // One global filter, so that what it rejects (the debug and trace events of every library)
    // is rejected once per call site, not per event. The OpenTelemetry layer, only when it
    // exports, takes just `portcullis::trace` spans. A second call (tests) keeps the first.
    let base = tracing_subscriber::registry().with(filter).with(fmt);
    let _ = match &provider {
        Some(p) => {
            use opentelemetry::trace::TracerProvider;
            let otel = tracing_opentelemetry::layer().with_tracer(p.tracer("portcullis")).with_filter(
                tracing_subscriber::filter::Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO),
            );
            base.with(otel).try_init()
        }
        None => base.try_init(),
    };
    (guard, provider)
}

fn tracer_provider(o: &Otlp) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(o.endpoint.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(o.service_name.clone()).build();
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The trace context a request carries (`traceparent`, `tracestate`), as a span's parent.
pub fn parent_context(headers: &std::collections::HashMap<String, String>) -> opentelemetry::Context {
    struct Carrier<'a>(&'a std::collections::HashMap<String, String>);
    impl opentelemetry::propagation::Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&Carrier(headers)))
}
