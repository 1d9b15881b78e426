//! The one way the engine calls its store, for plans and for traffic alike: bounded by the
//! store's timeout and by the caller's deadline when it is sooner (a call is not started once
//! the deadline has passed), every failure counted and logged under a [`Throttle`] (the first at
//! once, then at most one line every 10 s, and what was left out when calls succeed again),
//! and, under `local_share`, a failed call answered from this instance's share of each limit in
//! memory (`Limit::share`, the concurrency limit and queue divided by the instance count).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use decision_core::plan::Op;
use decision_core::traffic::{Admit, TrafficConfig};
use decision_core::units::Micros;

use super::Engine;
use crate::store::{Admission, Planned, Release, Store, StoreError, UpstreamState};
use decision_core::throttle::{self, Throttle};

/// Every store call's failure, whichever path made it: logged the first time, then at most once
/// an interval with how many were left out (and those left out, once calls succeed again).
static FAILED: Throttle = Throttle::new(throttle::EVERY);

impl<S: Store> Engine<S> {
    /// Runs one store call under the store's timeout (`Timeout` past it) and the caller's
    /// `deadline` when that is sooner (`DeadlineExceeded` past it; a call whose deadline has
    /// already passed is not started, so it counts nothing). A store failure is counted in
    /// `portcullis_store_errors_total` and logged under [`FAILED`]'s throttle; a success after
    /// failures left out of the log says how many.
    ///
    /// The call is boxed here, at once, before any future holds it. An async fn's future keeps
    /// its arguments beside what it moves them into, so an unboxed store call was copied into
    /// each enclosing future and moved with it, level after level (rust-lang/rust#62958): a
    /// ShouldRateLimit future on Redis was 19 KB, and copying it was a tenth of the CPU.
    pub(super) fn bounded<'a, T: Send + 'a>(
        &'a self,
        call: impl Future<Output = Result<T, StoreError>> + Send + 'a,
        deadline: Option<Instant>,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + 'a {
        let call = Box::pin(call);
        async move {
            let left = deadline.map(|d| d.saturating_duration_since(crate::clock::instant()));
            if left == Some(Duration::ZERO) {
                return Err(StoreError::DeadlineExceeded);
            }
            let answer = match (self.store.timeout(), left) {
                (Some(t), Some(l)) if l < t => {
                    tokio::time::timeout(l, call).await.unwrap_or(Err(StoreError::DeadlineExceeded))
                }
                (None, Some(l)) => tokio::time::timeout(l, call).await.unwrap_or(Err(StoreError::DeadlineExceeded)),
                (Some(t), _) => tokio::time::timeout(t, call).await.unwrap_or(Err(StoreError::Timeout(t))),
                (None, None) => call.await,
            };
            match &answer {
                // the caller gave up: the store did nothing wrong
                Err(StoreError::DeadlineExceeded) => {}
                Ok(_) => {
                    // loads first: a read of a line no core writes costs nothing in steady state
                    if self.degraded.load(Ordering::Relaxed) && self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!(backend = self.store.backend(), "store reachable again: shared limits are back");
                    }
                    // failures left out of the log since its last line are reported as calls
                    // succeed again (at most once an interval, should successes and failures
                    // interleave), not only with the next outage's first line
                    if let Some(suppressed) = FAILED.recovered(crate::clock::instant) {
                        tracing::info!(backend = self.store.backend(), suppressed, "store calls succeed again");
                    }
                }
                Err(e) => {
                    if let Some(suppressed) = FAILED.allow(crate::clock::instant()) {
                        tracing::warn!(backend = self.store.backend(), error = %e, suppressed, "store call failed");
                    }
                    self.metrics.store_error(self.store.backend());
                }
            }
            answer
        }
    }

    /// After a failed call: the number of instances sharing each limit, when the store says
    /// `local_share` (the degraded mode is logged as it starts and counted per answer); None
    /// when the failure is to be answered by `on_store_error`.
    fn local_share(&self) -> Option<u64> {
        let n = self.store.local_share_instances()?;
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                expected_instances = n,
                "store unreachable: enforcing each limit's local share (1/{n}) from memory"
            );
        }
        self.metrics.local_share();
        Some(n)
    }

    /// One store call for a plan's operations and, with `admission`, the slot asked for in the
    /// same call when the plan commits. Under `local_share` a failed call is answered from the
    /// local shares, with no slot (the caller asks for one as usual).
    pub(super) async fn apply(
        &self,
        ops: &[Op],
        now: Micros,
        admission: Option<&Admission<'_>>,
        deadline: Option<Instant>,
    ) -> Result<Planned, StoreError> {
        let call = async {
            match admission {
                None => self.store.apply(ops, now).await.map(|verdicts| Planned { verdicts, admitted: None }),
                Some(a) => self.store.apply_admit(ops, a, now).await,
            }
        };
        self.plan_call(call, ops, now, deadline, true).await
    }

    /// A dry run of a plan's operations (nothing counted), as `apply` makes its call.
    pub(super) async fn dry_run(
        &self,
        ops: &[Op],
        now: Micros,
        deadline: Option<Instant>,
    ) -> Result<Planned, StoreError> {
        let call = async { self.store.dry_run(ops, now).await.map(|verdicts| Planned { verdicts, admitted: None }) };
        self.plan_call(call, ops, now, deadline, false).await
    }

    /// A plan's store call, bounded; a store answering a different number of verdicts than
    /// operations has failed. Under `local_share` a failure (not the caller's deadline) is
    /// answered from this instance's shares, counted there only when `commit`. Not an async fn,
    /// so that `call` goes straight into `bounded`'s box (see there).
    fn plan_call<'a>(
        &'a self,
        call: impl Future<Output = Result<Planned, StoreError>> + Send + 'a,
        ops: &'a [Op],
        now: Micros,
        deadline: Option<Instant>,
        commit: bool,
    ) -> impl Future<Output = Result<Planned, StoreError>> + Send + 'a {
        let checked = self.bounded(
            async move {
                let planned = call.await?;
                if planned.verdicts.len() != ops.len() {
                    return Err(StoreError::Unavailable(format!(
                        "{} verdicts for {} operations",
                        planned.verdicts.len(),
                        ops.len()
                    )));
                }
                Ok(planned)
            },
            deadline,
        );
        async move {
            let failed = match checked.await {
                Ok(planned) => return Ok(planned),
                Err(StoreError::DeadlineExceeded) => return Err(StoreError::DeadlineExceeded),
                Err(e) => e,
            };
            let Some(n) = self.local_share() else { return Err(failed) };
            let shared: Vec<Op> = ops.iter().map(|op| Op { limit: op.limit.share(n), ..op.clone() }).collect();
            let verdicts =
                if commit { self.local.apply_now(&shared, now) } else { self.local.dry_run_now(&shared, now) };
            Ok(Planned { verdicts, admitted: None })
        }
    }

    /// An admission by the store or, while it fails under `local_share`, by this instance's
    /// share of the concurrency limit and the queue.
    pub(super) async fn admit(
        &self,
        a: &Admission<'_>,
        returning: bool,
        deadline: Option<Instant>,
    ) -> Result<(Admit, UpstreamState), StoreError> {
        let now = crate::clock::now_micros();
        let failed = match self.bounded(self.store.admit(a, returning, now), deadline).await {
            Ok(admitted) => return Ok(admitted),
            Err(StoreError::DeadlineExceeded) => return Err(StoreError::DeadlineExceeded),
            Err(e) => e,
        };
        let Some(n) = self.local_share() else { return Err(failed) };
        let shared = TrafficConfig {
            concurrency_limit: (a.cfg.concurrency_limit / n).max(1),
            queue_size: a.cfg.queue_size / n,
            ..a.cfg.clone()
        };
        Ok(self.local.admit_now(&Admission { cfg: &shared, ..*a }, returning, now))
    }

    /// A waiter that gives up leaves the queue (a failure is only logged: its place expires),
    /// and under `local_share` the local one, where it may have waited while the store failed.
    pub(super) async fn leave(&self, upstream: &str, lease: &str) {
        let _ = self.bounded(self.store.leave(upstream, lease), None).await;
        if self.store.local_share_instances().is_some() {
            self.local.leave_now(upstream, lease);
        }
    }

    /// A lease's renewal, bounded as every call; under `local_share` a lease the local shares
    /// granted while the store failed is renewed there.
    pub(super) async fn renew(&self, upstream: &str, lease: &str, lease_ttl: Micros) -> Result<bool, StoreError> {
        let now = crate::clock::now_micros();
        let failed = match self.bounded(self.store.renew(upstream, lease, lease_ttl, now), None).await {
            Ok(held) => return Ok(held),
            Err(e) => e,
        };
        match self.store.local_share_instances() {
            Some(_) => Ok(self.local.renew_now(upstream, lease, lease_ttl, now)),
            None => Err(failed),
        }
    }

    /// A reservation settled in the store (`Store::settle`) or, while it fails under
    /// `local_share`, in the local shares (which hold the reservations made meanwhile).
    pub(super) async fn settle(&self, keys: &[String], actual: u64) -> Result<Option<u64>, StoreError> {
        let now = crate::clock::now_micros();
        let failed = match self.bounded(self.store.settle(keys, actual, now), None).await {
            Ok(estimate) => return Ok(estimate),
            Err(e) => e,
        };
        match self.store.local_share_instances() {
            Some(_) => Ok(self.local.settle_now(keys, actual, now)),
            None => Err(failed),
        }
    }

    /// A completion for the store or, while it fails under `local_share`, for the local shares
    /// (a lease granted by the store before it failed expires there by its TTL).
    pub(super) async fn complete_lease(
        &self,
        upstream: &str,
        lease: &str,
        error: bool,
        latency: Micros,
        cfg: &TrafficConfig,
    ) -> Result<(bool, UpstreamState), StoreError> {
        let now = crate::clock::now_micros();
        let r = Release { upstream, lease, error, latency, cfg };
        let failed = match self.bounded(self.store.complete(&r, now), None).await {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        match self.store.local_share_instances() {
            Some(_) => Ok(self.local.complete_now(&r, now)),
            None => Err(failed),
        }
    }
}
