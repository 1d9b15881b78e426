//! Traces over OTLP: portcullis configured by the standard OTEL_* variables exports one span per
//! Check to a real OTLP/gRPC receiver in the test, as the child of the request's `traceparent`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;
use proto::ext_authz::authorization_client::AuthorizationClient;
use tests::{Portcullis, check_request, reference_policy};

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().expect("lock");
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn a_check_is_a_span_under_the_request_traceparent() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming).await;
    });
    let endpoint = format!("http://{addr}");
    let p = Portcullis::start_with_env(
        &reference_policy(),
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "pc-test"),
        ],
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let traceparent = format!("00-{trace}-{parent}-01");
    let req = check_request(
        "10.0.0.1",
        "GET",
        "/api/v1/items",
        &[("x-api-key", "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo"), ("traceparent", &traceparent)],
    );
    c.check(req).await.expect("check");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let span = loop {
        if let Some(s) = receiver.0.lock().expect("lock").iter().find(|s| s.name == "ext_authz.check").cloned() {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no span reached the receiver; log:\n{}", p.logs().join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(hex(&span.trace_id), trace, "the request's trace");
    assert_eq!(hex(&span.parent_span_id), parent, "the request's span is the parent");
    let attr = |k: &str| {
        span.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.as_ref()).map(|v| format!("{:?}", v.value))
    };
    assert!(attr("decision.outcome").is_some_and(|v| v.contains("allow")), "{:?}", span.attributes);
    assert!(attr("rpc.method").is_some_and(|v| v.contains("Check")), "{:?}", span.attributes);
}
