//! The store seam: one atomic call applies all of a request's counter operations and returns a
//! verdict for each. All-or-nothing: if any operation is refused, nothing is counted, so a denied
//! request consumes no quota. The memory store is the embedded default; every store passes the
//! same conformance suite (`conformance`).

pub mod memory;
pub mod over_limit;
pub mod redis;

#[cfg(test)]
pub mod conformance;

use std::future::Future;
use std::time::Duration;

use decision_core::plan::Op;
use decision_core::quota::{Limit, Verdict};
use decision_core::traffic::{Admit, Mode, TrafficConfig};
use decision_core::units::Micros;

pub use memory::MemoryStore;
pub use redis::{RedisSettings, RedisStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store call timed out after {0:?}")]
    Timeout(Duration),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// the store answered something the code does not expect (a script bug, not an outage)
    #[error("store script error: {0}")]
    Script(String),
    /// the caller's deadline passed before the call could start, or before the store answered:
    /// the caller's doing, not a store failure (never counted or logged as one)
    #[error("the caller's deadline passed")]
    DeadlineExceeded,
}

impl StoreError {
    /// Worth retrying later: outages and timeouts are, a script bug is not.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Timeout(_) | StoreError::Unavailable(_))
    }
}

/// A plan's verdicts, and the admission asked for with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// one per operation, in plan order
    pub verdicts: Vec<Verdict>,
    /// the slot asked for with the plan: None when none was asked for or the plan was refused
    pub admitted: Option<(Admit, UpstreamState)>,
}

/// A finished request's lease, as the store releases it: `lease` is the full id (`l`/`p` and 32
/// hex); `error` (a 5xx, or the upstream timed out, reset or could not be reached) and `latency`
/// feed the breaker and the adaptive limit.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    /// the upstream's store key (16 hex)
    pub upstream: &'a str,
    pub lease: &'a str,
    pub error: bool,
    /// how long the upstream took
    pub latency: Micros,
    pub cfg: &'a TrafficConfig,
}

/// A request's ask for a concurrency slot of one upstream (traffic control).
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    /// the upstream's store key (16 hex, `Route::upstream_key`)
    pub upstream: &'a str,
    /// the lease id asked for (32 hex, without the `l`/`p` prefix); it is also the request's
    /// place in the queue while it waits
    pub lease: &'a str,
    pub cfg: &'a TrafficConfig,
}

/// An upstream's slots, queue and breaker just after a traffic call, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamState {
    pub in_use: u64,
    pub queued: u64,
    pub mode: Mode,
    /// the concurrency limit in force (the adaptive one, when adaptive)
    pub limit: u64,
}

pub trait Store: Send + Sync + 'static {
    /// Applies `ops` atomically at `now` (a store with its own clock, like Redis, uses that
    /// instead): one verdict per operation, in order; state changes only if all are allowed.
    fn apply(&self, ops: &[Op], now: Micros) -> impl Future<Output = Result<Vec<Verdict>, StoreError>> + Send;

    /// The verdicts `apply` would give `ops` at `now`, storing nothing (the native Check's
    /// `dry_run`): one store call, as `apply`.
    fn dry_run(&self, ops: &[Op], now: Micros) -> impl Future<Output = Result<Vec<Verdict>, StoreError>> + Send;

    /// Traffic: one atomic admission at `now` (the breaker's gate, expired leases and waiters
    /// dropped, a slot granted to a new arrival when nobody waits, or to the oldest waiter
    /// coming back (`returning`); else a place in the queue, or none). The lease, when granted,
    /// is `a.lease` prefixed by `l`, or by `p` for the half-open breaker's probe.
    fn admit(
        &self,
        a: &Admission<'_>,
        returning: bool,
        now: Micros,
    ) -> impl Future<Output = Result<(Admit, UpstreamState), StoreError>> + Send;

    /// `apply`, and when the plan commits (every enforced operation allowed), a new arrival's
    /// `admit`: a request under `traffic` in one store call where the store can make it one
    /// (`apply_admit_is_one_call`); else two calls.
    fn apply_admit(
        &self,
        ops: &[Op],
        a: &Admission<'_>,
        now: Micros,
    ) -> impl Future<Output = Result<Planned, StoreError>> + Send {
        apply_then_admit(self, ops, a, now)
    }

    /// Gets ready to serve calls made on the calling thread's runtime: run once on each per-core
    /// runtime as it starts (`crate::connections::serve_per_core`), and on a process's only
    /// current-thread runtime (`crate::connections::single_runtime_thread`), so its first request
    /// does not wait for a connection inside that request's store timeout. Failures are only logged
    /// (at debug; readiness reports the store): calls connect again as they are made. Nothing
    /// to do by default.
    fn warm_up(&self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Whether `apply_admit` makes one call of the plan and the admission (a single Redis node);
    /// if not, the engine asks for the slot with its own call, under its own timeout.
    fn apply_admit_is_one_call(&self) -> bool {
        false
    }

    /// A waiter that gives up leaves the queue of `upstream` (`lease`: its place there, the
    /// lease id without its prefix), and a slot granted under that id, if any, is freed without
    /// counting for the breaker (a request cancelled while it asked for one).
    fn leave(&self, upstream: &str, lease: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// A request completed: its lease is released (true) if it still holds one, and only then
    /// does its outcome (`error`: 5xx or timeout; its `latency`) count for the breaker and the
    /// adaptive limit. Idempotent.
    fn complete(
        &self,
        r: &Release<'_>,
        now: Micros,
    ) -> impl Future<Output = Result<(bool, UpstreamState), StoreError>> + Send;

    /// A lease still held at `now` (`lease`: the full id, `l`/`p` and 32 hex) expires `lease_ttl`
    /// from `now` instead (true); an expired, released or unknown one stays gone (false), and the
    /// half-open breaker's probe (`p`) is never renewed. A long request (a WebSocket tunnel, a
    /// stream) renews its lease before it runs out.
    fn renew(
        &self,
        upstream: &str,
        lease: &str,
        lease_ttl: Micros,
        now: Micros,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Settles a reservation (`OpKind::Reservation`, written when its plan committed):
    /// `keys` are its record's key, then the counters the record may name (`reservation_keys`);
    /// the counters it covers are corrected by `actual` minus its estimate (`quota::settle`)
    /// and the record is gone, in one atomic call. The estimate (`Some`) when the record was
    /// held; None when it is unknown, expired at `now`, or was settled before (nothing changes).
    fn settle(
        &self,
        keys: &[String],
        actual: u64,
        now: Micros,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Admin (usage granted): a negative `delta` gives units back to each of `counters` (a
    /// store key and its limit, all in one hash tag) as `quota::grant` does (from the current
    /// window first, then the previous one; never below zero, nor a bucket past full); a
    /// positive one counts them now (`quota::settle`). One call; every instance's over-limit
    /// cache forgets what it remembers.
    fn adjust(
        &self,
        counters: &[(String, Limit)],
        delta: i64,
        now: Micros,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Admin (usage reset, unblock): `keys` (in one hash tag) deleted; how many existed. One
    /// call; every instance's over-limit cache forgets what it remembers.
    fn forget(&self, keys: &[String]) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The blocks index, for the admin API's list: `address` is blocked until `until` (a later
    /// block of the same address extends it, never shortens it); expired entries are dropped.
    fn note_block(
        &self,
        address: &str,
        until: Micros,
        now: Micros,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The blocks index: `address` dropped (unblocked); whether it was there.
    fn unnote_block(&self, address: &str, now: Micros) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The blocks index: every address blocked at `now`, with when its block ends, soonest
    /// first.
    fn blocks(&self, now: Micros) -> impl Future<Output = Result<Vec<(String, Micros)>, StoreError>> + Send;

    /// Admin (API keys kept in the store): every key record, as (id, JSON text), read a page
    /// at a time (each page one short call, so that a large set never blocks the store).
    fn key_records(&self) -> impl Future<Output = Result<Vec<(String, String)>, StoreError>> + Send;

    /// Admin: a number that changes whenever a key record is written (a resync reads the
    /// records again only when it changed).
    fn keys_version(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Admin: one key record's JSON text, if there is one.
    fn key_record(&self, id: &str) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Admin: writes `id`'s record if the current one is `expected` (None: there is none yet),
    /// atomically; true when written. Every instance is told (`keys:<id>` on the change
    /// channel), so that it reloads that record.
    fn put_key_record(
        &self,
        id: &str,
        record: &str,
        expected: Option<&str>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Calls `wake` with an upstream's key whenever any instance of the fleet frees one of its
    /// slots (a shared store's notification), for as long as the store lives. A store private
    /// to this process has nothing to add: this instance's own completions wake its waiters.
    ///
    /// `changed` is called with what another instance announced it changed (`keys:<id>`: an
    /// API key record; `keys:*`: anything may have changed, after a reconnection).
    fn watch_freed(
        &self,
        _wake: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
        _changed: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
    ) {
    }

    /// With `local_share`: how many instances share each limit while this store fails (each then
    /// enforces its share, 1/n, from memory). None: failures are answered by `on_store_error`.
    fn local_share_instances(&self) -> Option<u64> {
        None
    }

    /// The name used in logs and metrics (`memory`, `redis`).
    fn backend(&self) -> &'static str;

    /// The longest a call may take before `on_store_error` applies; None for an in-process store.
    fn timeout(&self) -> Option<Duration> {
        None
    }

    /// Whether the store can take calls now (for `/readyz`).
    fn ready(&self) -> bool {
        true
    }
}

/// `Store::apply_admit` in two calls: the plan, then, if it committed, the admission (the
/// default, and a Redis Cluster's, where the upstream's keys sit in a hash slot of their own).
pub async fn apply_then_admit<S: Store + ?Sized>(
    store: &S,
    ops: &[Op],
    a: &Admission<'_>,
    now: Micros,
) -> Result<Planned, StoreError> {
    let verdicts = store.apply(ops, now).await?;
    if decision_core::plan::refuses(ops, &verdicts) {
        return Ok(Planned { verdicts, admitted: None });
    }
    let admitted = store.admit(a, false, now).await?;
    Ok(Planned { verdicts, admitted: Some(admitted) })
}
