//! Prometheus metrics. Label values come from closed sets (outcome, reason, backend, result),
//! never from a subject or an address, so cardinality stays bounded.

use std::sync::Arc;
use std::time::Duration;

use decision_core::Reason;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
/// domain and rule come from the policy's files (bounded), never from a request's values; they
/// are shared (`Arc<str>`), so counting a descriptor allocates nothing
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RlsLabels {
    domain: Arc<str>,
    rule: Arc<str>,
    outcome: &'static str,
}

/// an upstream is named by the policy (bounded)
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct UpstreamLabel {
    upstream: Arc<str>,
}

/// The engine's own metrics, and the registry every other subsystem registers its own into
/// (`registry()`), so this module depends on no subsystem and no metric is a global static.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    /// one counter per reason, resolved once so the hot path does no map lookup
    decisions: Vec<Counter>,
    decision_seconds: Histogram,
    store_errors: Family<Labels1, Counter>,
    reloads: Family<Labels1, Counter>,
    policy_routes: Gauge,
    /// 1 for the version of the policy in force (`portcullis_policy_info{version}`)
    policy_info: Family<Vec<(&'static str, String)>, Gauge>,
    ratelimit: Family<RlsLabels, Counter>,
    ratelimit_seconds: Histogram,
    slots_in_use: Family<UpstreamLabel, Gauge>,
    queue_length: Family<UpstreamLabel, Gauge>,
    breaker_state: Family<UpstreamLabel, Gauge>,
    effective_limit: Family<UpstreamLabel, Gauge>,
    queue_wait_seconds: Family<UpstreamLabel, Histogram>,
    completions: Family<[(&'static str, &'static str); 1], Counter>,
    local_share_calls: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let family = Family::<Labels2, Counter>::default();
        registry.register("decisions", "Decisions by outcome and reason", family.clone());
        let decisions = Reason::ALL
            .iter()
            .map(|r| {
                family
                    .get_or_create(&[
                        ("outcome", if r.is_allowed() { "allow" } else { "deny" }),
                        ("reason", r.as_str()),
                    ])
                    .clone()
            })
            .collect();
        // 10 us .. ~0.33 s
        let decision_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register(
            "decision_duration_seconds",
            "Time to decide one request, from receipt to answer",
            decision_seconds.clone(),
        );
        let store_errors = Family::<Labels1, Counter>::default();
        registry.register("store_errors", "Store calls that failed or timed out, by backend", store_errors.clone());
        let reloads = Family::<Labels1, Counter>::default();
        registry.register("policy_reloads", "Policy reloads by result (ok, error)", reloads.clone());
        let policy_info = Family::<Vec<(&'static str, String)>, Gauge>::default();
        registry.register(
            "policy_info",
            "The policy in force: its version (sha256 over its files) as a label, value 1",
            policy_info.clone(),
        );
        let policy_routes = Gauge::default();
        registry.register("policy_routes", "Routes in the policy being served", policy_routes.clone());
        let ratelimit = Family::<RlsLabels, Counter>::default();
        registry.register(
            "ratelimit_descriptors",
            "RLS descriptors by domain, rule and outcome (ok, near_limit, over_limit, shadow_over_limit, unlimited)",
            ratelimit.clone(),
        );
        let ratelimit_seconds = Histogram::new(exponential_buckets(0.000_01, 2.0, 16));
        registry.register(
            "ratelimit_duration_seconds",
            "Time to answer one ShouldRateLimit call",
            ratelimit_seconds.clone(),
        );
        let slots_in_use = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "traffic_slots_in_use",
            "Concurrency slots held per upstream (fleet-wide, as last seen by this instance)",
            slots_in_use.clone(),
        );
        let queue_length = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "traffic_queue_length",
            "Requests waiting for a slot per upstream (fleet-wide, as last seen)",
            queue_length.clone(),
        );
        let breaker_state = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "traffic_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open (as last seen)",
            breaker_state.clone(),
        );
        let effective_limit = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "traffic_concurrency_limit",
            "The concurrency limit in force per upstream (the adaptive one, when traffic.adaptive is on)",
            effective_limit.clone(),
        );
        let queue_wait_seconds = Family::<UpstreamLabel, Histogram>::new_with_constructor(|| {
            // 1 ms .. ~65 s
            Histogram::new(exponential_buckets(0.001, 2.0, 17))
        });
        registry.register(
            "traffic_queue_wait_seconds",
            "How long requests that got a slot waited for it",
            queue_wait_seconds.clone(),
        );
        let completions = Family::<[(&'static str, &'static str); 1], Counter>::default();
        registry.register(
            "traffic_completions",
            "Completions received (access log), by result: released, unknown (no live lease), error",
            completions.clone(),
        );
        let local_share_calls = Counter::default();
        registry.register(
            "store_local_share_calls",
            "Store calls answered from this instance's share of each limit while the store failed",
            local_share_calls.clone(),
        );
        Metrics {
            registry: std::sync::Mutex::new(registry),
            decisions,
            decision_seconds,
            store_errors,
            reloads,
            policy_routes,
            policy_info,
            ratelimit,
            ratelimit_seconds,
            slots_in_use,
            queue_length,
            breaker_state,
            effective_limit,
            queue_wait_seconds,
            completions,
            local_share_calls,
        }
    }

    /// An upstream's slots, queue and breaker as a traffic call saw them.
    pub fn traffic_seen(&self, upstream: &Arc<str>, in_use: u64, queued: u64, breaker: u64, limit: u64) {
        let l = UpstreamLabel { upstream: upstream.clone() };
        self.effective_limit.get_or_create(&l).set(i64::try_from(limit).unwrap_or(i64::MAX));
        self.slots_in_use.get_or_create(&l).set(i64::try_from(in_use).unwrap_or(i64::MAX));
        self.queue_length.get_or_create(&l).set(i64::try_from(queued).unwrap_or(i64::MAX));
        self.breaker_state.get_or_create(&l).set(i64::try_from(breaker).unwrap_or(0));
    }

    /// A store call answered from local shares (`local_share`, the store failing).
    pub fn local_share(&self) {
        self.local_share_calls.inc();
    }

    /// A request got its slot after waiting `waited`.
    pub fn queue_wait(&self, upstream: &Arc<str>, waited: Duration) {
        self.queue_wait_seconds
            .get_or_create(&UpstreamLabel { upstream: upstream.clone() })
            .observe(waited.as_secs_f64());
    }

    /// A completion: `released`, `unknown` (no live lease: late, repeated or forged) or `error`
    /// (the store failed; the lease expires by its TTL).
    pub fn completion(&self, result: &'static str) {
        self.completions.get_or_create(&[("result", result)]).inc();
    }

    pub fn decision(&self, reason: Reason, took: Duration) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.decisions[i].inc();
        }
        self.decision_seconds.observe(took.as_secs_f64());
    }

    pub fn ratelimit_descriptor(&self, domain: &Arc<str>, rule: &Arc<str>, outcome: &'static str) {
        self.ratelimit.get_or_create(&RlsLabels { domain: domain.clone(), rule: rule.clone(), outcome }).inc();
    }

    pub fn ratelimit_call(&self, took: Duration) {
        self.ratelimit_seconds.observe(took.as_secs_f64());
    }

    pub fn store_error(&self, backend: &'static str) {
        self.store_errors.get_or_create(&[("backend", backend)]).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&[("result", if ok { "ok" } else { "error" })]).inc();
    }

    pub fn policy_loaded(&self, routes: usize, version: &str) {
        self.policy_routes.set(i64::try_from(routes).unwrap_or(i64::MAX));
        if !version.is_empty() {
            self.policy_info.clear();
            self.policy_info.get_or_create(&vec![("version", version.to_owned())]).set(1);
        }
    }

    /// The registry (prefix `portcullis_`) a subsystem registers its metrics into when it is
    /// built: the store, the bearer verifiers, the audit writer, the alert monitor.
    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_outcome_and_reason() {
        let m = Metrics::new();
        m.decision(Reason::Allowed, Duration::from_micros(50));
        m.decision(Reason::ApiKeyUnknown, Duration::from_micros(50));
        m.decision(Reason::ApiKeyUnknown, Duration::from_micros(50));
        let text = m.encode();
        assert!(text.contains("portcullis_decisions_total{outcome=\"allow\",reason=\"allowed\"} 1"), "{text}");
        assert!(text.contains("portcullis_decisions_total{outcome=\"deny\",reason=\"api_key_unknown\"} 2"), "{text}");
        assert!(text.contains("portcullis_decision_duration_seconds_count 3"), "{text}");
    }
}
