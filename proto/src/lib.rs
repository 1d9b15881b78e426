//! Wire types, and the only home of protobuf types in the workspace: Envoy's v3 APIs
//! (ext_authz, ratelimit, access log) and the Google well-known types they use, re-exported
//! from the `envoy-types` crate so nothing vendors Envoy's .proto files; and portcullis's own
//! `portcullis.v1`, generated from `proto/portcullis/v1/`.

pub use envoy_types::pb;

/// Envoy's external authorization API (`envoy.service.auth.v3`).
pub mod ext_authz {
    pub use envoy_types::pb::envoy::service::auth::v3::*;
}

/// Envoy's rate limit service API (`envoy.service.ratelimit.v3`).
pub mod ratelimit {
    pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    pub use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor;
    pub use envoy_types::pb::envoy::service::ratelimit::v3::*;
}

/// Envoy's access log service (`envoy.service.accesslog.v3`) and its entries
/// (`envoy.data.accesslog.v3`).
pub mod accesslog {
    pub use envoy_types::pb::envoy::data::accesslog::v3::*;
    pub use envoy_types::pb::envoy::service::accesslog::v3::*;
}

/// portcullis's own API (`proto/portcullis/v1/decision.proto`), as tonic's code generator makes
/// it (`proto/src/generated/`, checked by `tests/generated.rs`).
#[allow(clippy::all)]
pub mod portcullis_v1 {
    include!("generated/portcullis.v1.rs");

    /// The service's full name, as gRPC health and reflection name it.
    pub const SERVICE_NAME: &str = "portcullis.v1.Decision";

    /// The encoded `FileDescriptorSet` of `proto/portcullis/v1/`, for gRPC server reflection
    /// (made with the generated code, and checked with it by `tests/generated.rs`).
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/portcullis_v1.bin");
}

/// The Envoy and Google types an ext_authz answer is built from.
pub mod types {
    pub use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    pub use envoy_types::pb::envoy::config::core::v3::{
        Address, HeaderMap, HeaderValue, HeaderValueOption, SocketAddress, address,
    };
    pub use envoy_types::pb::envoy::r#type::v3::HttpStatus;
    pub use envoy_types::pb::google::protobuf::{Duration, ListValue, Struct, UInt64Value, Value, value};
    pub use envoy_types::pb::google::rpc::Status as RpcStatus;
}
