//! The engine glues the pure core to a store: plan, one store call, conclude. It holds the
//! policy behind an `ArcSwap`, so a reload swaps it atomically under live traffic, and it records
//! every decision once (metrics, the decision log, the audit event), whichever adapter asked.
//!
//! - `mod.rs`: the engine, the policy swap, `check` (a request from any adapter, decided and
//!   recorded), `decide` and `rate_limit`;
//! - `store_call`: the one way to call the store (timeout, failures counted and logged under a
//!   throttle, the `local_share` fallback);
//! - `failed_auth`: the bearer fetch before a second try, auto-block after a failed authentication;
//! - `slots`: traffic control's slots, queue and completions;
//! - `observe`: what live monitoring learns from a decision, and what its alerts do;
//! - `record`: the decision log line and the audit event of a decision.

pub mod admin;
mod failed_auth;
mod observe;
mod record;
pub mod slots;
mod store_call;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use decision_core::policy::Policy;
use decision_core::rls::{self, DescriptorReq, RlsDecision};
use decision_core::{Decision, Reason, Request, conclude, plan, store_failed};

pub use self::record::Facts;
pub use self::slots::{Completion, Waiters, new_reservation_id, parse_lease};
use crate::clock;
use crate::store::{Admission, Store, StoreError};
use crate::telemetry::metrics::Metrics;
use decision_core::throttle::{self, Throttle};

/// Starts what a policy's verifiers do in the background (fetching remote key sets); it ends by
/// itself when the policy is replaced and dropped. Outside a Tokio runtime (a unit test, the
/// CLI) nothing is started: the verifiers then fetch on first use.
fn start_background(policy: &Policy) {
    if let (Ok(rt), Some(work)) =
        (tokio::runtime::Handle::try_current(), policy.bearer.as_ref().and_then(|b| b.background()))
    {
        rt.spawn(work);
    }
}

/// A decision's id: 32 hex characters, a random half drawn once per process and a counter, so
/// ids are unique across the fleet without coordination. The audit event carries it, and the
/// native answer gives it to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DecisionId {
    process: u64,
    seq: u64,
}

impl std::fmt::Display for DecisionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.process, self.seq)
    }
}

/// How a request is decided: the parts of its `Facts` the decision depends on.
#[derive(Debug, Clone, Copy)]
struct How {
    /// count nothing
    dry_run: bool,
    /// take a concurrency slot under `traffic` (not where no completion can come back)
    slot: bool,
    /// past it, start nothing more
    deadline: Option<Instant>,
}

impl How {
    fn of(facts: &Facts<'_>) -> How {
        How { dry_run: facts.dry_run, slot: facts.concurrency_slot, deadline: facts.deadline }
    }
}

/// What `Engine::check` gives every adapter to render: the decision (reason, identity, every
/// quota that applied, retry-after, the lease) and its id.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    pub id: DecisionId,
}

/// Why an adapter could not build a core `Request` from its message; the request is denied 400
/// (`bad_request`) and the text goes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

pub struct Engine<S> {
    policy: ArcSwap<Policy>,
    store: S,
    pub metrics: Metrics,
    /// requests of this instance waiting for a slot
    pub(crate) waiters: Waiters,
    /// the audit trail, when the policy has an `audit` section (set once by the server)
    audit: std::sync::OnceLock<Arc<crate::audit::Audit>>,
    /// live monitoring, when the policy has an `alerts` section (set once by the server)
    alerts: std::sync::OnceLock<Arc<crate::alerts::Monitor>>,
    /// where work that outlives a request runs (a lease left after the answer, a key set
    /// fetched): the server's main runtime, which outlives the per-core runtimes that end as
    /// they drain; unset, the caller's runtime
    background: std::sync::OnceLock<tokio::runtime::Handle>,
    /// the counters of the `local_share` degraded mode (used only while the store fails)
    local: crate::store::MemoryStore,
    /// whether the last store call failed and was answered from local shares
    degraded: std::sync::atomic::AtomicBool,
    /// metric labels for RLS calls the policy does not know (never a caller's own string)
    unknown_domain: Arc<str>,
    no_rule: Arc<str>,
    /// the engine itself, when it is shared (`Engine::shared`): what a request dropped by its
    /// caller while it asks for a slot uses to give the slot back (`slots::Abandoned`)
    this: std::sync::Weak<Engine<S>>,
    /// this process's half of every decision id, and the counter of the other half
    process_id: u64,
    decisions: std::sync::atomic::AtomicU64,
    /// the store-held API keys (the admin API's), as last read from the store
    keys: std::sync::Mutex<admin::KeyState>,
    /// one read, reload or write of key records at a time
    key_io: tokio::sync::Mutex<()>,
    /// the store-held keys' pepper, when the server was given one
    pepper: std::sync::OnceLock<crate::admin::keys::Pepper>,
    /// the compiled copy the policy in force consults
    keys_in_force: ArcSwap<crate::admin::keys::CompiledKeys>,
}

impl<S: Store> Engine<S> {
    pub fn new(policy: Arc<Policy>, store: S) -> Self {
        let metrics = Metrics::new();
        metrics.policy_loaded(policy.routes.len(), &policy.version);
        start_background(&policy);
        let (policy, compiled) = admin::with_store_keys(&policy, &Default::default(), None);
        Engine {
            keys: Default::default(),
            key_io: Default::default(),
            pepper: Default::default(),
            keys_in_force: ArcSwap::new(compiled),
            policy: ArcSwap::new(policy),
            store,
            metrics,
            waiters: Default::default(),
            audit: Default::default(),
            alerts: Default::default(),
            background: Default::default(),
            local: crate::store::MemoryStore::new(),
            degraded: std::sync::atomic::AtomicBool::new(false),
            unknown_domain: Arc::from("unknown"),
            no_rule: Arc::from("none"),
            process_id: {
                let mut b = [0u8; 8];
                // the kernel's generator does not fail once the system is up; if it ever did, the
                // start time still tells processes apart
                if getrandom::getrandom(&mut b).is_err() {
                    b = clock::now_micros().to_be_bytes();
                }
                u64::from_be_bytes(b)
            },
            decisions: std::sync::atomic::AtomicU64::new(0),
            this: std::sync::Weak::new(),
        }
    }

    /// `new`, shared: what the server runs. A request its caller drops while it holds or waits
    /// for a concurrency slot then gives the slot (or its place in the queue) back at once,
    /// instead of holding the queue's head until `queue_timeout`.
    pub fn shared(policy: Arc<Policy>, store: S) -> Arc<Self> {
        Arc::new_cyclic(|this| Engine { this: this.clone(), ..Engine::new(policy, store) })
    }

    /// Wakes this instance's waiters when the store says a slot was freed anywhere in the fleet
    /// (the server calls it once, inside its runtime).
    pub fn watch_freed(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let weak_changed = weak.clone();
        self.store.watch_freed(
            Arc::new(move |key: &str| {
                if let Some(engine) = weak.upgrade() {
                    engine.waiters.freed(key);
                }
            }),
            Arc::new(move |what: &str| {
                // another instance changed an API key record: reload it (all of them after a
                // reconnection), off the subscriber's task
                if let (Some(engine), Some(id)) = (weak_changed.upgrade(), what.strip_prefix("keys:")) {
                    let id = id.to_owned();
                    tokio::spawn(async move {
                        let reloaded = if id == "*" {
                            engine.load_keys(true).await.map(|_| ())
                        } else {
                            engine.reload_key(&id).await
                        };
                        if let Err(e) = reloaded {
                            tracing::warn!(error = %e, "store-held API keys not reloaded; the periodic resync will");
                        }
                    });
                }
            }),
        );
    }

    /// The policy in force (one atomic load; hold it for the whole request).
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.metrics.policy_loaded(policy.routes.len(), &policy.version);
        start_background(&policy);
        // the store-held keys, compiled against the new policy before it is in force
        let keys = admin::lock_keys(&self.keys);
        let (policy, compiled) = admin::with_store_keys(&policy, &keys.records, self.pepper.get().cloned());
        self.keys_in_force.store(compiled);
        self.policy.store(policy);
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Turns the audit trail on (once; later calls change nothing).
    pub fn set_audit(&self, audit: Arc<crate::audit::Audit>) {
        let _ = self.audit.set(audit);
    }

    pub fn audit(&self) -> Option<&Arc<crate::audit::Audit>> {
        self.audit.get()
    }

    /// Runs work that outlives a request on `rt` from now on (once; the server's main runtime).
    pub fn set_background(&self, rt: tokio::runtime::Handle) {
        let _ = self.background.set(rt);
    }

    /// Where work that outlives a request runs: the runtime `set_background` gave, else the
    /// caller's; None outside any runtime.
    pub(crate) fn background(&self) -> Option<tokio::runtime::Handle> {
        self.background.get().cloned().or_else(|| tokio::runtime::Handle::try_current().ok())
    }

    /// Turns live monitoring on (once).
    pub fn set_alerts(&self, monitor: Arc<crate::alerts::Monitor>) {
        let _ = self.alerts.set(monitor);
    }

    pub fn alerts(&self) -> Option<&Arc<crate::alerts::Monitor>> {
        self.alerts.get()
    }

    /// A request from any adapter, decided under `policy` and recorded once: the decisions
    /// metric, the decision log line (at debug), and the audit event (with the decision id) when
    /// the trail is on. `request` is what the adapter could make of its message; a `Malformed`
    /// one is denied 400 without a store call. `facts.dry_run` decides without counting.
    /// `started`: when the adapter received it (for the latency figures).
    pub async fn check(
        &self,
        policy: &Policy,
        request: Result<Request<'_>, Malformed>,
        facts: &Facts<'_>,
        started: Instant,
    ) -> Outcome {
        let id = DecisionId {
            process: self.process_id,
            seq: self.decisions.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let past = |d: &Instant| clock::instant() >= *d;
        let d = match request {
            // the caller has already given up: nothing is planned, nothing counted
            Ok(_) if facts.deadline.as_ref().is_some_and(past) => {
                Decision::deny(Reason::DeadlineExceeded, Default::default())
            }
            Ok(req) => self.decide_as(policy, &req, How::of(facts)).await,
            Err(Malformed(why)) => {
                // a client may send these as fast as it likes: throttled (each is counted as
                // a bad_request decision)
                static MALFORMED: Throttle = Throttle::new(throttle::EVERY);
                if let Some(suppressed) = MALFORMED.allow(crate::clock::instant()) {
                    tracing::warn!(reason = why, suppressed, "malformed check request");
                }
                Decision::deny(Reason::BadRequest, Default::default())
            }
        };
        let took = started.elapsed();
        self.metrics.decision(d.reason, took);
        record::log_decision(&d, policy, facts, took);
        if let Some(audit) = self.audit() {
            audit.record(record::audit_event(audit, &d, policy, facts, took, id));
        }
        Outcome { decision: d, id }
    }

    /// Settles the reservation `id` (32 hex) of `subject` (the native API's `Complete`): the
    /// actual cost replaces its estimate in the subject's tier quotas, in one store call. The
    /// estimate when it was held; None when it is unknown, expired or settled before. Errors:
    /// the store failed (and no `local_share` holds it).
    pub async fn settle_reservation(&self, subject: &str, id: &str, actual: u64) -> Result<Option<u64>, StoreError> {
        self.settle(&decision_core::decide::reservation_keys(subject, id), actual).await
    }

    /// Decides one request under `policy`: at most one store call (a bearer token that needs
    /// a fetch first, an unknown `kid` or an introspection miss, waits for it and is decided
    /// again); with `alerts`, what the decision teaches is observed. Records nothing: `check`
    /// does.
    pub async fn decide(&self, policy: &Policy, req: &Request<'_>) -> Decision {
        self.decide_as(policy, req, How { dry_run: false, slot: true, deadline: None }).await
    }

    /// `decide`, as `how` says: with `dry_run` the same decision with nothing counted (no
    /// quota, no failed authentication, no slot, nothing observed); without `slot`, no
    /// concurrency slot; past `deadline` no store call is started, a store call is cut short,
    /// and the request is denied `deadline_exceeded`.
    async fn decide_as(&self, policy: &Policy, req: &Request<'_>, how: How) -> Decision {
        let d = self.plan_apply_conclude(policy, req, how).await;
        if !how.dry_run && self.alerts.get().is_some() {
            Box::pin(self.observe(policy, req, &d)).await;
        }
        d
    }

    /// plan (with a bearer fetch and a second plan if that can help), one store call for the
    /// plan (and, under `traffic`, the first admission where the store makes it one call),
    /// conclude; then a slot for an allowed request under `traffic`.
    async fn plan_apply_conclude(&self, policy: &Policy, req: &Request<'_>, how: How) -> Decision {
        let How { dry_run, slot, deadline } = how;
        let mut now = clock::now_micros();
        let plan = match plan(policy, req, now) {
            Ok(p) => p,
            // a bearer fetch (keys not loaded, an unknown kid, an introspection miss) may turn the
            // refusal around: then plan again
            Err(d) => {
                let again = if Box::pin(self.fetch_for(policy, req, d.reason, deadline)).await {
                    now = clock::now_micros();
                    plan(policy, req, now)
                } else {
                    Err(d)
                };
                match again {
                    Ok(p) => p,
                    // a dry run counts no failed authentication
                    Err(d) if dry_run => return *d,
                    Err(d) => return Box::pin(self.after_failed_auth(policy, *d, now, deadline)).await,
                }
            }
        };
        // under `traffic`, the plan and the slot are asked for in one store call where the store
        // can make it one (else the slot has its own call, and its own timeout, in take_slot)
        let traffic =
            policy.traffic.as_ref().zip(plan.ctx.route.and_then(|i| policy.routes.get(i))).filter(|_| slot && !dry_run);
        let lease = traffic.map(|_| slots::new_lease_id());
        // from here until the decision is made, a caller that drops the request gets its slot or
        // its place in the queue given back (the store may grant it in the call below)
        let mut abandoned = traffic
            .zip(lease.as_deref())
            .map(|((_, route), lease)| slots::Abandoned::new(&self.this, &route.upstream_key, lease));
        let admission = traffic
            .zip(lease.as_deref())
            .filter(|_| self.store.apply_admit_is_one_call())
            .map(|((cfg, route), lease)| Admission { upstream: &route.upstream_key, lease, cfg });
        let (d, first) = if plan.ops.is_empty() {
            (conclude(policy, plan, &[]), None)
        } else {
            let planned = match dry_run {
                true => self.dry_run(&plan.ops, now, deadline).await,
                false => self.apply(&plan.ops, now, admission.as_ref(), deadline).await,
            };
            // a call cut short (a timeout, the caller's deadline) may have been granted the slot
            // it asked for: give it back, off the request's path (its answer is not delayed)
            if let (Err(StoreError::Timeout(_) | StoreError::DeadlineExceeded), Some(a)) = (&planned, &admission) {
                self.leave_later(a.upstream, a.lease);
            }
            match planned {
                Ok(planned) => (conclude(policy, plan, &planned.verdicts), planned.admitted),
                Err(StoreError::DeadlineExceeded) => (Decision::deny(Reason::DeadlineExceeded, plan.ctx), None),
                Err(_) => (store_failed(policy, plan), None),
            }
        };
        // A slot comes back only with a committed plan, and an ext_authz plan has no shadow
        // operation, so a committed plan is an allowed request: none is granted to a denial.
        let d = match (traffic, lease.as_deref(), d.reason) {
            // an allowed request takes a concurrency slot of its route's upstream; boxed: the
            // waiting loop's future is large, and every decision would carry it
            (Some((cfg, route)), Some(lease), Reason::Allowed) => {
                let mut d = Box::pin(self.take_slot(policy, cfg, route, d, lease, first, deadline)).await;
                // refused a slot: a reservation made with the plan is given back whole
                if !d.allowed()
                    && let (Some(r), Some(id)) = (d.reservation.take(), d.ctx.identity.as_ref())
                    && let Err(e) = self.settle_reservation(&id.subject, &r.id, 0).await
                {
                    static NOT_GIVEN_BACK: Throttle = Throttle::new(throttle::EVERY);
                    if let Some(suppressed) = NOT_GIVEN_BACK.allow(crate::clock::instant()) {
                        tracing::warn!(
                            error = %e,
                            suppressed,
                            "a refused request's reservation was not given back; it expires with its lease"
                        );
                    }
                }
                d
            }
            _ => d,
        };
        if let Some(a) = abandoned.as_mut() {
            a.disarm();
        }
        d
    }

    /// Decides an Envoy ratelimit (RLS) request, every descriptor in one store call, and records
    /// it (per-descriptor and per-call metrics, a log line at debug). A store failure is an
    /// error, so the RLS adapter answers UNAVAILABLE and Envoy's own `failure_mode_deny` applies;
    /// past the caller's `deadline` the call is not made (or is cut short), `DeadlineExceeded`.
    pub async fn rate_limit(
        &self,
        policy: &Policy,
        domain: &str,
        descriptors: &[DescriptorReq<'_>],
        deadline: Option<Instant>,
    ) -> Result<RlsDecision, StoreError> {
        let started = clock::instant();
        let plan = rls::plan(&policy.ratelimit, domain, descriptors);
        let verdicts = if plan.ops.is_empty() {
            Vec::new()
        } else {
            match self.apply(&plan.ops, clock::now_micros(), None, deadline).await {
                Ok(planned) => planned.verdicts,
                // the caller gave up: not a store failure (the adapter answers DEADLINE_EXCEEDED)
                Err(StoreError::DeadlineExceeded) => {
                    tracing::debug!(domain, "ratelimit call past its deadline: nothing counted");
                    return Err(StoreError::DeadlineExceeded);
                }
                Err(e) => {
                    // request-derived values are recorded as strings, which every log format
                    // escapes; once per call through an outage: throttled
                    static UNAVAILABLE: Throttle = Throttle::new(throttle::EVERY);
                    if let Some(suppressed) = UNAVAILABLE.allow(crate::clock::instant()) {
                        tracing::warn!(domain, error = %e, suppressed, "ratelimit answered UNAVAILABLE: store failed");
                    }
                    return Err(e);
                }
            }
        };
        let decision = rls::conclude(plan, &verdicts);
        self.record_rate_limit(policy, domain, descriptors.len(), &decision, started.elapsed());
        Ok(decision)
    }

    /// Envoy's `is_negative_hits` (Envoy 1.38): each descriptor's hits given back to the limits
    /// it matches, now (as the admin API's grant: from the current window first, never below
    /// zero), one store call per limit, on the store itself. Every instance's over-limit cache
    /// forgets its refusals. Errors: the store failed or the deadline passed.
    pub async fn return_hits(
        &self,
        policy: &Policy,
        domain: &str,
        descriptors: &[DescriptorReq<'_>],
        deadline: Option<Instant>,
    ) -> Result<(), StoreError> {
        let plan = rls::plan(&policy.ratelimit, domain, descriptors);
        let now = clock::now_micros();
        for op in &plan.ops {
            let delta = i64::try_from(op.cost).map_or(i64::MIN, |c| -c);
            self.bounded(self.store.adjust(&[(op.key.clone(), op.limit)], delta, now), deadline).await?;
        }
        Ok(())
    }

    /// The metrics and the debug log line of one RLS call: labels come from the policy only (an
    /// unknown domain is `unknown`, an unmatched descriptor `none`).
    fn record_rate_limit(&self, policy: &Policy, domain: &str, descriptors: usize, d: &RlsDecision, took: Duration) {
        let label = if policy.ratelimit.domains.contains_key(domain) { &d.domain } else { &self.unknown_domain };
        for s in &d.statuses {
            let rule = s.rule.as_ref().map_or(&self.no_rule, |r| &r.id);
            self.metrics.ratelimit_descriptor(label, rule, s.outcome.as_str());
        }
        self.metrics.ratelimit_call(took);
        // at debug: the default level writes no line per decision
        tracing::debug!(
            target: "portcullis::ratelimit",
            domain,
            descriptors,
            outcome = if d.over_limit { "over_limit" } else { "ok" },
            latency_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            "ratelimit"
        );
    }
}

#[cfg(test)]
mod tests;
