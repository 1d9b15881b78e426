//! Envoy's rate limit service (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`):
//! descriptors in, one status per descriptor out (in request order), with the RateLimit headers
//! and, over the limit, the reference 429 body. A store failure is gRPC UNAVAILABLE, so Envoy's
//! `failure_mode_deny` decides (Envoy reads UNKNOWN as OK). Descriptors with `is_negative_hits`
//! (Envoy 1.38) give their hits back to the limits they match instead (`Engine::return_hits`).

use std::sync::Arc;

use decision_core::policy::HeaderDialect;
use decision_core::rls::{DescriptorReq, Outcome, RlsDecision, Unit, validate};
use proto::ratelimit::rate_limit_response::rate_limit::Unit as WireUnit;
use proto::ratelimit::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use proto::ratelimit::rate_limit_service_server::RateLimitService;
use proto::ratelimit::{RateLimitRequest, RateLimitResponse};
use proto::types::{Duration, HeaderValue};

use super::respond;
use crate::clock;
use crate::engine::Engine;
use crate::store::{Store, StoreError};

pub struct Rls<S> {
    engine: Arc<Engine<S>>,
}

impl<S: Store> Rls<S> {
    pub fn new(engine: Arc<Engine<S>>) -> Self {
        Rls { engine }
    }
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue { key: key.to_owned(), value, raw_value: Vec::new() }
}

/// A window unit on the wire (`RateLimitResponse.RateLimit.Unit`; a descriptor override's
/// `envoy.type.v3.RateLimitUnit` numbers its values the same way).
fn unit_to_wire(u: Unit) -> WireUnit {
    match u {
        Unit::Second => WireUnit::Second,
        Unit::Minute => WireUnit::Minute,
        Unit::Hour => WireUnit::Hour,
        Unit::Day => WireUnit::Day,
        Unit::Week => WireUnit::Week,
        Unit::Month => WireUnit::Month,
        Unit::Year => WireUnit::Year,
    }
}

/// The unit of a wire value; None for `UNKNOWN` and values no version of the API defines.
fn unit_from_wire(v: i32) -> Option<Unit> {
    Unit::ALL.into_iter().find(|u| unit_to_wire(*u) as i32 == v)
}

/// Builds the wire answer: the `RateLimit*` headers in `dialect`; `x_ratelimit` adds the
/// draft-03 `X-RateLimit-*` headers as envoyproxy/ratelimit's `LIMIT_RESPONSE_HEADERS_ENABLED`.
pub fn answer(d: &RlsDecision, x_ratelimit: bool, dialect: HeaderDialect) -> RateLimitResponse {
    let statuses = d
        .statuses
        .iter()
        .map(|s| {
            let code = if s.outcome == Outcome::OverLimit { Code::OverLimit } else { Code::Ok };
            let counted = s.verdict.is_some();
            DescriptorStatus {
                code: code as i32,
                current_limit: s.rule.as_ref().filter(|_| counted).map(|r| RateLimit {
                    name: r.name.as_deref().unwrap_or("").to_owned(),
                    requests_per_unit: r.requests_per_unit,
                    unit: r.unit.map_or(WireUnit::Unknown, unit_to_wire) as i32,
                }),
                limit_remaining: u32::try_from(s.remaining).unwrap_or(u32::MAX),
                duration_until_reset: counted.then(|| Duration {
                    seconds: i64::try_from(s.reset / 1_000_000).unwrap_or(i64::MAX),
                    nanos: i32::try_from((s.reset % 1_000_000) * 1_000).unwrap_or(0),
                }),
                quota: None,
            }
        })
        .collect();

    let mut headers = Vec::new();
    let raw_body =
        respond::rls_headers(d, x_ratelimit, dialect, clock::now_micros(), |k, v| headers.push(header(k, v)))
            .map(String::into_bytes)
            .unwrap_or_default();
    RateLimitResponse {
        overall_code: if d.over_limit { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add: headers,
        raw_body,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimitService for Rls<S> {
    #[tracing::instrument(name = "ratelimit.should_rate_limit", level = "debug", skip_all, fields(rpc.system = "grpc", rpc.method = "ShouldRateLimit", ratelimit.domain))]
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        let deadline = super::grpc_deadline(request.metadata(), clock::instant());
        let msg = request.into_inner();
        tracing::Span::current().record("ratelimit.domain", msg.domain.as_str());
        if msg.domain.is_empty() {
            return Err(tonic::Status::invalid_argument("rate limit domain must not be empty"));
        }
        // `is_negative_hits` (Envoy 1.38): the hits are given back to the budget, not counted;
        // a request is all one or all the other
        let negative = msg.descriptors.iter().filter(|d| d.is_negative_hits).count();
        if negative > 0 && negative < msg.descriptors.len() {
            return Err(tonic::Status::invalid_argument(
                "is_negative_hits: every descriptor of a request, or none (hits are counted or given back, not both)",
            ));
        }
        // hits_addend 0 means 1 at the request level; a descriptor's own hits_addend wins.
        let request_hits = u64::from(msg.hits_addend.max(1));
        let descriptors: Vec<DescriptorReq<'_>> = msg
            .descriptors
            .iter()
            .map(|d| DescriptorReq {
                entries: d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str())).collect(),
                limit_override: d.limit.as_ref().and_then(|l| unit_from_wire(l.unit).map(|u| (l.requests_per_unit, u))),
                hits: d.hits_addend.as_ref().map_or(request_hits, |h| h.value),
            })
            .collect();
        validate(&descriptors).map_err(|e| tonic::Status::invalid_argument(e.0))?;
        let policy = self.engine.policy();
        if negative > 0 {
            self.engine.return_hits(&policy, &msg.domain, &descriptors, deadline).await.map_err(|e| match e {
                StoreError::DeadlineExceeded => {
                    tonic::Status::deadline_exceeded("the call's deadline passed before the hits were given back")
                }
                e => tonic::Status::unavailable(format!("the store failed; hits may not have been given back: {e}")),
            })?;
            let ok = DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
            return Ok(tonic::Response::new(RateLimitResponse {
                overall_code: Code::Ok as i32,
                statuses: vec![ok; descriptors.len()],
                ..Default::default()
            }));
        }
        let decision =
            self.engine.rate_limit(&policy, &msg.domain, &descriptors, deadline).await.map_err(|e| match e {
                StoreError::DeadlineExceeded => {
                    tonic::Status::deadline_exceeded("the call's deadline passed before the limits were counted")
                }
                _ => tonic::Status::unavailable("rate limit store unavailable"),
            })?;
        let response = answer(&decision, policy.ratelimit.x_ratelimit_headers, policy.ratelimit_headers);
        Ok(tonic::Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use decision_core::rls::{self, DescriptorReq, Domain, ROOT, RlsConfig, Rule, Unit};
    use decision_core::units::MICROS_PER_MINUTE;

    use crate::store::MemoryStore;

    fn config(fixed_window: bool) -> RlsConfig {
        let mut d = Domain::new("edge");
        let rule = Rule { fixed_window, ..Rule::new(10, Unit::Minute, "edge.client") };
        d.add(ROOT, "client", None, Some(rule)).expect("add");
        RlsConfig { domains: [("edge".to_string(), d)].into(), x_ratelimit_headers: false }
    }

    /// Requests at the given instants (an injected clock), one descriptor each; how many pass.
    fn allowed_at(cfg: &RlsConfig, times: &[u64]) -> usize {
        let store = MemoryStore::new();
        let desc = [DescriptorReq { entries: vec![("client", "c1")], limit_override: None, hits: 1 }];
        times
            .iter()
            .filter(|&&t| {
                let plan = rls::plan(cfg, "edge", &desc);
                let verdicts = store.apply_now(&plan.ops, t);
                !rls::conclude(plan, &verdicts).over_limit
            })
            .count()
    }

    #[test]
    fn units_map_to_the_wire_and_back() {
        for u in Unit::ALL {
            assert_eq!(super::unit_from_wire(super::unit_to_wire(u) as i32), Some(u));
        }
        assert_eq!(super::unit_to_wire(Unit::Week) as i32, 7, "WEEK came last to the enum");
        assert_eq!(super::unit_from_wire(0), None);
        assert_eq!(super::unit_from_wire(8), None);
    }

    #[test]
    fn a_sliding_window_gives_no_double_burst_across_the_window_edge() {
        let edge = 29_000_000 * MICROS_PER_MINUTE;
        let mut times = vec![edge - 1_000; 10];
        times.extend(vec![edge + 1_000; 10]);
        assert_eq!(allowed_at(&config(false), &times), 10, "sliding window: the limit holds across the edge");
        assert_eq!(allowed_at(&config(true), &times), 20, "fixed window (envoyproxy/ratelimit's): twice the limit");
        // a full window later the sliding window has room for the whole limit again
        times.extend(vec![edge + 2 * MICROS_PER_MINUTE; 12]);
        assert_eq!(allowed_at(&config(false), &times), 20);
    }

    /// A log sink the test reads back.
    #[derive(Clone, Default)]
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_caller_cannot_split_a_text_log_line() {
        use proto::ratelimit::rate_limit_service_server::RateLimitService;
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
        let policy = crate::config::load(&dir.join("policy.yaml")).unwrap_or_else(|e| panic!("{e}")).policy;
        let rls = super::Rls::new(std::sync::Arc::new(crate::engine::Engine::new(policy, MemoryStore::new())));
        let domain = "x\nINJECTED-LOG-LINE outcome=\"allow\"\r\nINJECTED-TOO";
        let desc = proto::ratelimit::RateLimitDescriptor {
            entries: vec![proto::ratelimit::rate_limit_descriptor::Entry { key: "k".into(), value: "v".into() }],
            ..Default::default()
        };
        rls.should_rate_limit(tonic::Request::new(proto::ratelimit::RateLimitRequest {
            domain: domain.into(),
            descriptors: vec![desc],
            hits_addend: 1,
        }))
        .await
        .expect("answer");
        let text = String::from_utf8(sink.0.lock().expect("log").clone()).expect("utf-8");
        assert!(text.contains("INJECTED-LOG-LINE"), "the domain is logged: {text}");
        assert!(!text.lines().any(|l| l.starts_with("INJECTED")), "a forged line: {text}");
    }
}
