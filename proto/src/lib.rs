//! Wire types: Envoy v3 APIs re-exported from `envoy-types`.
