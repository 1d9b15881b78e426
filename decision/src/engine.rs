//! The engine glues the pure core to a store: plan, one store call, conclude. It holds the
//! policy behind an `ArcSwap`, so a reload swaps it atomically under live traffic.

use std::sync::Arc;

use arc_swap::ArcSwap;
use decision_core::policy::Policy;
use decision_core::{Decision, Request, conclude, plan, store_failed};

use crate::clock;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

pub struct Engine<S> {
    policy: ArcSwap<Policy>,
    store: S,
    pub metrics: Metrics,
}

impl<S: Store> Engine<S> {
    pub fn new(policy: Arc<Policy>, store: S) -> Self {
        let metrics = Metrics::new();
        metrics.policy_loaded(policy.routes.len());
        Engine { policy: ArcSwap::new(policy), store, metrics }
    }

    /// The policy in force (one atomic load; hold it for the whole request).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.metrics.policy_loaded(policy.routes.len());
        self.policy.store(policy);
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Decides one request under `policy`: at most one store call.
    pub async fn decide(&self, policy: &Policy, req: &Request<'_>) -> Decision {
        let plan = match plan(policy, req) {
            Ok(p) => p,
            Err(d) => return *d,
        };
        if plan.ops.is_empty() {
            return conclude(policy, plan, &[]);
        }
        let now = clock::now_micros();
        let result = match self.store.timeout() {
            None => self.store.apply(&plan.ops, now).await,
            Some(t) => match tokio::time::timeout(t, self.store.apply(&plan.ops, now)).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(t)),
            },
        };
        match result {
            Ok(verdicts) if verdicts.len() == plan.ops.len() => conclude(policy, plan, &verdicts),
            Ok(verdicts) => {
                tracing::error!(backend = self.store.backend(), expected = plan.ops.len(), got = verdicts.len(), "store answered with the wrong number of verdicts");
                self.metrics.store_error(self.store.backend());
                store_failed(policy, plan)
            }
            Err(e) => {
                tracing::warn!(backend = self.store.backend(), error = %e, "store call failed; answering by on_store_error");
                self.metrics.store_error(self.store.backend());
                store_failed(policy, plan)
            }
        }
    }
}
