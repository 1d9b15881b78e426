//! portcullis's own API (`portcullis.v1.Decision`, proto/portcullis/v1/decision.proto), served
//! on the gRPC port: `Complete`, the completion call for proxies that do not speak Envoy's
//! access log (our gateway shim, or any proxy that can make one gRPC call per finished request).

use std::sync::Arc;
use std::time::Duration;

use proto::portcullis_v1::decision_server::Decision;
use proto::portcullis_v1::{CompleteRequest, CompleteResponse};

use crate::engine::Completion;
use crate::engine::Engine;
use crate::store::Store;

/// Longest lease or request id accepted.
const MAX_ID_BYTES: usize = 256;

pub struct Native<S> {
    engine: Arc<Engine<S>>,
}

impl<S> Native<S> {
    pub fn new(engine: Arc<Engine<S>>) -> Self {
        Native { engine }
    }
}

#[tonic::async_trait]
impl<S: Store> Decision for Native<S> {
    async fn complete(
        &self,
        request: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
        let r = request.into_inner();
        if r.lease.len() > MAX_ID_BYTES || r.request_id.len() > MAX_ID_BYTES {
            return Err(tonic::Status::invalid_argument("lease and request_id are at most 256 bytes"));
        }
        let c = Completion {
            lease: Some(r.lease.as_str()).filter(|l| !l.is_empty()),
            request_id: &r.request_id,
            status: r.status_code,
            upstream_error: r.upstream_error || r.status_code >= 500,
            latency: Duration::from_micros(r.latency_us),
            total_ms: r.latency_us as f64 / 1e3,
        };
        let released = self.engine.record_completion(&c).await;
        Ok(tonic::Response::new(CompleteResponse { released }))
    }
}
