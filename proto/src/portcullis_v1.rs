//! `portcullis.v1` (proto/portcullis/v1/decision.proto): the messages and the `Decision`
//! service's server and client, written by hand in the shape tonic's code generator gives, so
//! the workspace needs no protoc. Keep them in step with the .proto file.

/// See `CompleteRequest` in decision.proto.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct CompleteRequest {
    #[prost(string, tag = "1")]
    pub lease: String,
    #[prost(uint32, tag = "2")]
    pub status_code: u32,
    #[prost(bool, tag = "3")]
    pub upstream_error: bool,
    #[prost(uint64, tag = "4")]
    pub latency_us: u64,
    #[prost(string, tag = "5")]
    pub request_id: String,
}

/// See `CompleteResponse` in decision.proto.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct CompleteResponse {
    #[prost(bool, tag = "1")]
    pub released: bool,
}

pub const SERVICE_NAME: &str = "portcullis.v1.Decision";
const COMPLETE_PATH: &str = "/portcullis.v1.Decision/Complete";

pub mod decision_server {
    use tonic::codegen::*;

    use super::{COMPLETE_PATH, CompleteRequest, CompleteResponse};

    #[tonic::async_trait]
    pub trait Decision: std::marker::Send + std::marker::Sync + 'static {
        async fn complete(
            &self,
            request: tonic::Request<CompleteRequest>,
        ) -> std::result::Result<tonic::Response<CompleteResponse>, tonic::Status>;
    }

    #[derive(Debug)]
    pub struct DecisionServer<T> {
        inner: Arc<T>,
        max_decoding_message_size: Option<usize>,
    }

    impl<T> DecisionServer<T> {
        pub fn new(inner: T) -> Self {
            DecisionServer { inner: Arc::new(inner), max_decoding_message_size: None }
        }

        #[must_use]
        pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
            self.max_decoding_message_size = Some(limit);
            self
        }
    }

    impl<T> Clone for DecisionServer<T> {
        fn clone(&self) -> Self {
            DecisionServer { inner: self.inner.clone(), max_decoding_message_size: self.max_decoding_message_size }
        }
    }

    impl<T> tonic::server::NamedService for DecisionServer<T> {
        const NAME: &'static str = super::SERVICE_NAME;
    }

    struct CompleteSvc<T>(Arc<T>);

    impl<T: Decision> tonic::server::UnaryService<CompleteRequest> for CompleteSvc<T> {
        type Response = CompleteResponse;
        type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

        fn call(&mut self, request: tonic::Request<CompleteRequest>) -> Self::Future {
            let inner = Arc::clone(&self.0);
            Box::pin(async move { <T as Decision>::complete(&inner, request).await })
        }
    }

    impl<T, B> tonic::codegen::Service<http::Request<B>> for DecisionServer<T>
    where
        T: Decision,
        B: Body + std::marker::Send + 'static,
        B::Error: Into<StdError> + std::marker::Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            if req.uri().path() == COMPLETE_PATH {
                let inner = self.inner.clone();
                let max = self.max_decoding_message_size;
                return Box::pin(async move {
                    let codec = tonic_prost::ProstCodec::default();
                    let mut grpc = tonic::server::Grpc::new(codec).apply_max_message_size_config(max, None);
                    Ok(grpc.unary(CompleteSvc(inner), req).await)
                });
            }
            Box::pin(async move {
                let mut response = http::Response::new(tonic::body::Body::default());
                let headers = response.headers_mut();
                headers.insert(tonic::Status::GRPC_STATUS, (tonic::Code::Unimplemented as i32).into());
                headers.insert(http::header::CONTENT_TYPE, tonic::metadata::GRPC_CONTENT_TYPE);
                Ok(response)
            })
        }
    }
}

pub mod decision_client {
    use tonic::codegen::*;

    use super::{COMPLETE_PATH, CompleteRequest, CompleteResponse};

    #[derive(Debug, Clone)]
    pub struct DecisionClient<T> {
        inner: tonic::client::Grpc<T>,
    }

    impl DecisionClient<tonic::transport::Channel> {
        pub async fn connect<D>(dst: D) -> Result<Self, tonic::transport::Error>
        where
            D: TryInto<tonic::transport::Endpoint>,
            D::Error: Into<StdError>,
        {
            let conn = tonic::transport::Endpoint::new(dst)?.connect().await?;
            Ok(DecisionClient { inner: tonic::client::Grpc::new(conn) })
        }
    }

    impl<T> DecisionClient<T>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<StdError>,
        T::ResponseBody: Body<Data = Bytes> + std::marker::Send + 'static,
        <T::ResponseBody as Body>::Error: Into<StdError> + std::marker::Send,
    {
        pub async fn complete(
            &mut self,
            request: impl tonic::IntoRequest<CompleteRequest>,
        ) -> std::result::Result<tonic::Response<CompleteResponse>, tonic::Status> {
            self.inner
                .ready()
                .await
                .map_err(|e| tonic::Status::unknown(format!("Service was not ready: {}", e.into())))?;
            let codec = tonic_prost::ProstCodec::default();
            let path = http::uri::PathAndQuery::from_static(COMPLETE_PATH);
            let mut req = request.into_request();
            req.extensions_mut().insert(GrpcMethod::new(super::SERVICE_NAME, "Complete"));
            self.inner.unary(req, path, codec).await
        }
    }
}
