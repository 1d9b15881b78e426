//! The shim's Prometheus metrics (`portcullis_shim_*`), served on `listen.metrics` at
//! `/metrics` beside `/healthz` and `/readyz`. Labels are bounded: outcomes and statuses,
//! never an address or a path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `outcome` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// `code` label: the status the client got.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Code {
    pub code: u16,
}

/// Every metric the shim exports.
pub struct Metrics {
    registry: Registry,
    /// Responses by status (`portcullis_shim_responses_total{code}`).
    pub responses: Family<Code, Counter>,
    /// Requests on the plain listener (`portcullis_shim_insecure_requests_total{outcome}`:
    /// rejected or redirected).
    pub insecure: Family<Outcome, Counter>,
    /// Check calls by outcome (allowed, denied, error).
    pub checks: Family<Outcome, Counter>,
    /// How long Check took, seconds.
    pub check_duration: Histogram,
    /// Completions by outcome (released, not_released, error).
    pub completions: Family<Outcome, Counter>,
    /// Lease renewals of long requests by outcome (renewed, gone, error).
    pub renewals: Family<Outcome, Counter>,
    /// The served certificate's notAfter, Unix seconds (alert on `- time() < 30*86400`).
    pub cert_expiry: Gauge,
    /// Certificate reloads by outcome (ok, refused).
    pub cert_reloads: Family<Outcome, Counter>,
    /// Upstream failures by kind: `connect` (refused, unreachable, or its TLS or pin refused),
    /// `timeout`, `reset`, and `client_body` (the client's body broke a limit mid-request).
    pub upstream_errors: Family<Outcome, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("portcullis_shim");
        let responses = Family::<Code, Counter>::default();
        registry.register("responses", "Responses sent to clients, by status", responses.clone());
        let insecure = Family::<Outcome, Counter>::default();
        registry.register(
            "insecure_requests",
            "Requests on the plain HTTP listener, by what was done",
            insecure.clone(),
        );
        let checks = Family::<Outcome, Counter>::default();
        registry.register("checks", "ext_authz Check calls to portcullis, by outcome", checks.clone());
        let check_duration = Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]);
        registry.register_with_unit(
            "check_duration",
            "Time of the ext_authz Check call",
            prometheus_client::registry::Unit::Seconds,
            check_duration.clone(),
        );
        let completions = Family::<Outcome, Counter>::default();
        registry.register("completions", "Decision/Complete calls, by outcome", completions.clone());
        let renewals = Family::<Outcome, Counter>::default();
        registry.register(
            "lease_renewals",
            "Decision/RenewLease calls for running requests, by outcome",
            renewals.clone(),
        );
        let cert_expiry = Gauge::default();
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "The served server certificate's notAfter, as a Unix time",
            prometheus_client::registry::Unit::Seconds,
            cert_expiry.clone(),
        );
        let cert_reloads = Family::<Outcome, Counter>::default();
        registry.register("certificate_reloads", "Server certificate reloads, by outcome", cert_reloads.clone());
        let upstream_errors = Family::<Outcome, Counter>::default();
        registry.register("upstream_errors", "Upstream failures, by kind", upstream_errors.clone());
        Metrics {
            registry,
            responses,
            insecure,
            checks,
            check_duration,
            completions,
            renewals,
            cert_expiry,
            cert_reloads,
            upstream_errors,
        }
    }

    /// The text exposition (OpenMetrics text format).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
