//! Envoy's gRPC access log (`envoy.service.accesslog.v3.AccessLogService`), served on the gRPC
//! port: every finished HTTP request Envoy logs is a completion. The entry's
//! `x-portcullis-lease` request header (the Envoy config logs it) names the lease to release;
//! its response code and flags say whether the upstream failed (5xx, timeout, reset,
//! unreachable), which feeds the breaker. Entries without a lease (denied requests, policies
//! without `traffic`) are skipped.

use std::sync::Arc;

use proto::accesslog::access_log_service_server::AccessLogService;
use proto::accesslog::stream_access_logs_message::LogEntries;
use proto::accesslog::{HttpAccessLogEntry, StreamAccessLogsMessage, StreamAccessLogsResponse};

use super::respond::LEASE_HEADER;
use crate::engine::Completion;
use crate::engine::Engine;
use crate::store::Store;

pub struct AccessLog<S> {
    engine: Arc<Engine<S>>,
    /// true once the server stops: open streams end, so the drain does not wait on Envoy
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl<S> AccessLog<S> {
    pub fn new(engine: Arc<Engine<S>>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        AccessLog { engine, stopping }
    }
}

/// Whether an entry is an upstream failure for the breaker.
pub fn is_error(entry: &HttpAccessLogEntry) -> bool {
    let status = entry.response.as_ref().and_then(|r| r.response_code).map_or(0, |c| c.value);
    let flags = entry.common_properties.as_ref().and_then(|c| c.response_flags.as_ref());
    status >= 500
        || flags.is_some_and(|f| {
            f.upstream_request_timeout
                || f.upstream_connection_failure
                || f.upstream_remote_reset
                || f.upstream_connection_termination
                || f.no_healthy_upstream
                || f.upstream_overflow
        })
}

/// How long the upstream took: to its last byte if Envoy measured it, else to the last byte
/// sent to the client.
pub fn latency(entry: &HttpAccessLogEntry) -> std::time::Duration {
    let c = entry.common_properties.as_ref();
    let d = c.and_then(|c| c.time_to_last_upstream_rx_byte.or(c.time_to_last_downstream_tx_byte));
    d.map_or(std::time::Duration::ZERO, |d| {
        std::time::Duration::new(u64::try_from(d.seconds).unwrap_or(0), u32::try_from(d.nanos).unwrap_or(0))
    })
}

#[tonic::async_trait]
impl<S: Store> AccessLogService for AccessLog<S> {
    async fn stream_access_logs(
        &self,
        request: tonic::Request<tonic::Streaming<StreamAccessLogsMessage>>,
    ) -> Result<tonic::Response<StreamAccessLogsResponse>, tonic::Status> {
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = stopping.wait_for(|s| *s) => None,
            };
            let Some(msg) = msg else { break };
            let Some(LogEntries::HttpLogs(logs)) = msg.log_entries else { continue };
            for entry in &logs.log_entry {
                let request = entry.request.as_ref();
                let total = entry
                    .common_properties
                    .as_ref()
                    .and_then(|c| c.time_to_last_downstream_tx_byte)
                    .map_or(0.0, |d| ((d.seconds as f64 * 1e9 + f64::from(d.nanos)) / 1e3).round() / 1e3);
                let c = Completion {
                    lease: request.and_then(|r| r.request_headers.get(LEASE_HEADER)).map(String::as_str),
                    request_id: request.map_or("", |r| r.request_id.as_str()),
                    status: entry.response.as_ref().and_then(|r| r.response_code).map_or(0, |c| c.value),
                    upstream_error: is_error(entry),
                    latency: latency(entry),
                    total_ms: total,
                };
                self.engine.record_completion(&c).await;
            }
        }
        Ok(tonic::Response::new(StreamAccessLogsResponse {}))
    }
}
