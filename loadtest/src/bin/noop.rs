//! `portcullis-noop`: the benchmark's baseline. It serves ext_authz Check, RLS ShouldRateLimit
//! and the native `portcullis.v1.Decision/Check` with the same gRPC stack and limits as
//! portcullis and answers OK (allowed) without any work, so a ratio against it isolates what a
//! decision costs.
//!
//! With `--http-addr` it is also the benchmark's HTTP upstream: every request gets `200 ok` at
//! once (what Envoy forwards to in the HTTP cases).
//!
//! ```sh
//! portcullis-noop --addr 127.0.0.1:0 [--http-addr 127.0.0.1:0]   # prints `listening <addr>`
//! ```                                                            # (and `http <addr>`)
#![allow(clippy::print_stdout)]

/// The allocator portcullis runs on (decision/src/main.rs), so that the baseline differs from
/// it by the decision's work only.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;

use proto::ext_authz::authorization_server::{Authorization, AuthorizationServer};
use proto::ext_authz::check_response::HttpResponse;
use proto::ext_authz::{CheckRequest, CheckResponse, OkHttpResponse};
use proto::portcullis_v1::decision_server::{Decision, DecisionServer};
use proto::portcullis_v1::{
    self as native, CompleteRequest, CompleteResponse, RenewLeaseRequest, RenewLeaseResponse, Verdict,
};
use proto::ratelimit::rate_limit_response::{Code, DescriptorStatus};
use proto::ratelimit::rate_limit_service_server::{RateLimitService, RateLimitServiceServer};
use proto::ratelimit::{RateLimitRequest, RateLimitResponse};
use proto::types::RpcStatus;

struct Noop;

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(&self, _r: tonic::Request<CheckRequest>) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(RpcStatus { code: 0, ..Default::default() }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        }))
    }
}

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_rate_limit(
        &self,
        r: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let statuses = r
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus { code: Code::Ok as i32, ..Default::default() })
            .collect();
        Ok(tonic::Response::new(RateLimitResponse { overall_code: Code::Ok as i32, statuses, ..Default::default() }))
    }
}

#[tonic::async_trait]
impl Decision for Noop {
    async fn check(
        &self,
        _r: tonic::Request<native::CheckRequest>,
    ) -> Result<tonic::Response<native::CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(native::CheckResponse {
            verdict: Verdict::Allow as i32,
            http_status: 200,
            ..Default::default()
        }))
    }

    async fn renew_lease(
        &self,
        _r: tonic::Request<RenewLeaseRequest>,
    ) -> Result<tonic::Response<RenewLeaseResponse>, tonic::Status> {
        Ok(tonic::Response::new(RenewLeaseResponse { renewed: false, ttl_ms: 0 }))
    }

    async fn complete(
        &self,
        _r: tonic::Request<CompleteRequest>,
    ) -> Result<tonic::Response<CompleteResponse>, tonic::Status> {
        Ok(tonic::Response::new(CompleteResponse::default()))
    }
}

/// `200 ok` to every HTTP/1.1 request, keep-alive.
async fn serve_http(listener: tokio::net::TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    hyper::body::Bytes::from_static(b"ok"),
                )))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The runtime portcullis's `--runtime auto` picks: everything on one current-thread runtime on
/// one core; on more, the gRPC connections on one current-thread runtime per core
/// (`decision::connections::serve_per_core`), the HTTP upstream on a multi-thread runtime. The
/// baseline runs the same gRPC stack in the same shape.
fn main() -> std::process::ExitCode {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let rt = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    match rt {
        Ok(rt) => rt.block_on(serve(cores)),
        Err(e) => {
            eprintln!("portcullis-noop: starting the runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(cores: usize) -> std::process::ExitCode {
    let addr: SocketAddr = std::env::args()
        .skip_while(|a| a != "--addr")
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("portcullis-noop: cannot listen on {addr}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let local = listener.local_addr().map_or(addr, |a| a);
    if let Some(http) =
        std::env::args().skip_while(|a| a != "--http-addr").nth(1).and_then(|a| a.parse::<SocketAddr>().ok())
    {
        match tokio::net::TcpListener::bind(http).await {
            Ok(l) => {
                println!("http {}", l.local_addr().map_or(http, |a| a));
                tokio::spawn(serve_http(l));
            }
            Err(e) => {
                eprintln!("portcullis-noop: cannot listen on {http}: {e}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    println!("listening {local}");
    // the same explicit settings as portcullis's server
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(decision::server::MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(decision::server::MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(decision::server::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(decision::server::KEEPALIVE_TIMEOUT))
        .add_service(AuthorizationServer::new(Noop))
        .add_service(RateLimitServiceServer::new(Noop))
        .add_service(DecisionServer::new(Noop));
    let served = if cores == 1 {
        router
            .serve_with_incoming(decision::connections::incoming(listener, Default::default()))
            .await
            .map_err(|e| e.to_string())
    } else {
        // never stopped: the benchmark kills it
        let (_stop, never) = tokio::sync::watch::channel(false);
        decision::connections::serve_per_core(listener, cores, router, never, &Default::default(), || async {})
            .await
            .map_err(|e| e.to_string())
    };
    match served {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portcullis-noop: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
