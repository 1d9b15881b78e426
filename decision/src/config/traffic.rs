//! `traffic`: concurrency limits, queues, breakers and the adaptive limit, with the
//! reference guide's traffic-spike numbers where a setting is left out.

use std::time::Duration;

use decision_core::units;

use super::{Validator, raw};

/// The reference's traffic-spike settings, used where `traffic` leaves one out.
pub const DEFAULT_CONCURRENCY_LIMIT: u64 = 1000;
pub const DEFAULT_QUEUE_SIZE: u64 = 5000;
pub const DEFAULT_QUEUE_TIMEOUT: &str = "30s";
pub const DEFAULT_ERROR_THRESHOLD: &str = "50%";
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
pub const DEFAULT_BREAKER_WINDOW: &str = "60s";
pub const DEFAULT_RESET_TIMEOUT: &str = "300s";
/// Our addition: a slot whose completion never comes is freed after this long.
pub const DEFAULT_LEASE_TTL: &str = "60s";

impl Validator<'_> {
    /// `traffic`: the reference's numbers where the policy says nothing.
    pub(super) fn traffic(
        &mut self,
        t: &raw::RawTraffic,
        alerts: Option<&raw::RawAlerts>,
    ) -> Option<decision_core::traffic::TrafficConfig> {
        use decision_core::traffic::{AdaptiveConfig, BreakerConfig, TrafficConfig};
        let concurrency_limit = t.concurrency_limit.unwrap_or(DEFAULT_CONCURRENCY_LIMIT);
        if concurrency_limit == 0 {
            self.err("traffic.concurrency_limit", "must be at least 1");
        }
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let queue_timeout =
            micros(self.duration("traffic.queue_timeout", t.queue_timeout.as_deref(), DEFAULT_QUEUE_TIMEOUT));
        let lease_ttl = micros(self.duration("traffic.lease_ttl", t.lease_ttl.as_deref(), DEFAULT_LEASE_TTL));
        if lease_ttl == 0 {
            self.err("traffic.lease_ttl", "must be more than zero");
        }
        let breaker = t.circuit_breaker.as_ref().map(|cb| {
            let threshold = cb.error_threshold.as_deref().unwrap_or(DEFAULT_ERROR_THRESHOLD);
            let error_threshold =
                self.parse("traffic.circuit_breaker.error_threshold", units::parse_percent(threshold)).unwrap_or(0);
            if error_threshold == 0 {
                self.err("traffic.circuit_breaker.error_threshold", "must be more than 0%");
            }
            let window =
                micros(self.duration("traffic.circuit_breaker.window", cb.window.as_deref(), DEFAULT_BREAKER_WINDOW));
            let reset_timeout = micros(self.duration(
                "traffic.circuit_breaker.reset_timeout",
                cb.reset_timeout.as_deref(),
                DEFAULT_RESET_TIMEOUT,
            ));
            for (name, v) in [("window", window), ("reset_timeout", reset_timeout)] {
                if v == 0 {
                    self.err(format!("traffic.circuit_breaker.{name}"), "must be more than zero");
                }
            }
            BreakerConfig {
                error_threshold: u64::from(error_threshold),
                min_requests: cb.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS).max(1),
                window,
                reset_timeout,
            }
        });
        let adaptive = t.adaptive.as_ref().map(|a| {
            let p = "traffic.adaptive";
            let min_limit = a.min_limit.unwrap_or((concurrency_limit / 10).max(1));
            if min_limit == 0 || min_limit > concurrency_limit {
                self.err(format!("{p}.min_limit"), "must be between 1 and concurrency_limit");
            }
            let decrease =
                self.parse(&format!("{p}.decrease"), units::parse_percent(a.decrease.as_deref().unwrap_or("50%")));
            if decrease.is_some_and(|d| d == 0 || d >= 10_000) {
                self.err(format!("{p}.decrease"), "the share kept on a decrease is more than 0% and less than 100%");
            }
            let alert_warn = |t: Option<&raw::RawThreshold>| t.map(|t| t.warn.clone());
            let error_rate = a.error_rate.clone().or_else(|| alert_warn(alerts.and_then(|x| x.error_rate.as_ref())));
            let error_rate = self
                .parse(&format!("{p}.error_rate"), units::parse_percent(error_rate.as_deref().unwrap_or("5%")))
                .unwrap_or(500);
            let latency = a.latency.clone().or_else(|| alert_warn(alerts.and_then(|x| x.response_time.as_ref())));
            let latency = micros(self.duration(&format!("{p}.latency"), latency.as_deref(), "500ms"));
            let interval = micros(self.duration(&format!("{p}.interval"), a.interval.as_deref(), "5s"));
            if interval == 0 {
                self.err(format!("{p}.interval"), "must be more than zero");
            }
            AdaptiveConfig {
                min_limit: min_limit.max(1),
                decrease: u64::from(decrease.unwrap_or(5_000)),
                increase: a.increase.unwrap_or(1).max(1),
                interval,
                error_rate: u64::from(error_rate),
                latency,
            }
        });
        Some(TrafficConfig {
            concurrency_limit,
            queue_size: t.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
            queue_timeout,
            lease_ttl,
            breaker,
            adaptive,
        })
    }
}
