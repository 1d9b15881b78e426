//! The over-limit cache of a shared store: a plan the store refused is remembered here with the
//! states its operations saw and the store's time, so a client hammering past its quota is
//! answered from memory instead of costing a store call (envoyproxy/ratelimit's local cache,
//! made exact).
//!
//! Exact because counters only grow between resets: other instances can only consume more, never
//! give back. So if the remembered states, advanced to now, still refuse the plan, the store would
//! refuse it too; the moment they would let it through, the plan goes to the store again, which
//! decides. "Now" is the store's time at the refusal plus the time elapsed here since the call
//! was sent: never earlier than the store's clock, so the cache lets a plan go to the store
//! early rather than refuse it late. A client that is not over its limits never meets the cache.
//!
//! Bounded: at most `capacity` plans; when full, entries that would no longer refuse are dropped,
//! and if none can be, a new refusal is simply not remembered.
//!
//! Counters also go back when a reservation is settled for less than its estimate (the native
//! API's reserve and Complete): the instance that settles empties its cache; another instance's
//! remembered refusal of the same plan stands until it would lapse anyway (its retry-after), so
//! a refund elsewhere is seen late, never a request let through early.
//!
//! Counters do go back when Redis loses them: a restart without persistence (the store calls
//! fail meanwhile, and every failed call empties this cache) or a FLUSHALL while connected
//! (not seen: refusals then stand until their retry-after, as with envoyproxy/ratelimit's cache).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::Mutex;
use std::time::Instant;

use decision_core::plan::{Op, OpKind, refuses};
use decision_core::quota::{self, Limit, State, Verdict};
use decision_core::units::Micros;
use prometheus_client::metrics::counter::Counter;

/// Remembered refusals, by a keyed hash of the plan (its keys, limits, costs and shadow flags).
pub struct OverLimitCache {
    entries: Mutex<HashMap<u64, Refusal>>,
    hasher: RandomState,
    capacity: usize,
    epoch: Instant,
    hits: Counter,
}

struct Refusal {
    /// the store's time when it refused
    at: Micros,
    /// this cache's clock when the call was sent
    sent: Micros,
    /// the state each operation saw
    states: Vec<Option<State>>,
    /// this cache's clock when the states will refuse nothing any more (the refusing operations'
    /// longest retry-after from `sent`): past it, the entry may be dropped to make room
    stale: Micros,
}

impl OverLimitCache {
    pub fn new(capacity: usize) -> Self {
        OverLimitCache {
            entries: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            capacity,
            epoch: crate::clock::instant(),
            hits: Counter::default(),
        }
    }

    /// Plans answered here (for `portcullis_store_over_limit_cache_hits_total`).
    pub fn hits(&self) -> Counter {
        self.hits.clone()
    }

    /// This cache's clock (monotonic microseconds), read before a store call is sent.
    pub fn clock(&self) -> Micros {
        Micros::try_from(self.epoch.elapsed().as_micros()).unwrap_or(Micros::MAX)
    }

    /// The key a plan is remembered by; None for a plan that cannot be (one naming a key twice,
    /// whose second operation saw the first's effect).
    pub fn fingerprint(&self, ops: &[Op]) -> Option<u64> {
        if ops.iter().enumerate().any(|(i, a)| ops[i + 1..].iter().any(|b| a.key == b.key)) {
            return None;
        }
        let mut h = self.hasher.build_hasher();
        for op in ops {
            // a reservation's key is new each time (its id): the plan is the same without it
            if op.kind == OpKind::Reservation {
                "reservation".hash(&mut h);
            } else {
                op.key.hash(&mut h);
            }
            let (kind, a, b) = match op.limit {
                Limit::TokenBucket { burst, interval } => (0u8, burst, interval),
                Limit::SlidingWindow { limit, window } => (1, limit, window),
                Limit::FixedWindow { limit, window } => (2, limit, window),
                Limit::Flag { duration } => (3, 0, duration),
            };
            (kind, a, b, op.cost, op.shadow).hash(&mut h);
        }
        Some(h.finish())
    }

    /// The verdicts for `ops` if their remembered refusal still holds at `now` (the store's time
    /// when the caller keeps one, as a test clock does; else None, and it is estimated).
    pub fn refused(&self, plan: u64, ops: &[Op], now: Option<Micros>) -> Option<Vec<Verdict>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.is_empty() {
            return None;
        }
        let r = entries.get(&plan)?;
        let now = now.unwrap_or_else(|| r.at.saturating_add(self.clock().saturating_sub(r.sent)));
        match verdicts_at(ops, &r.states, now) {
            Some(v) if refuses(ops, &v) => {
                self.hits.inc();
                Some(v)
            }
            _ => {
                entries.remove(&plan);
                None
            }
        }
    }

    /// Remembers the store's refusal of `ops`: its `verdicts`, its time `at`, the call sent at
    /// `sent` (this cache's clock), the state each operation saw.
    pub fn remember(
        &self,
        plan: u64,
        ops: &[Op],
        verdicts: &[Verdict],
        at: Micros,
        sent: Micros,
        states: Vec<Option<State>>,
    ) {
        if states.len() != ops.len() {
            return;
        }
        let longest =
            ops.iter().zip(verdicts).filter(|(op, v)| !v.allowed && !op.shadow).map(|(_, v)| v.retry_after).max();
        let stale = sent.saturating_add(longest.unwrap_or(0));
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&plan) {
            let now = self.clock();
            entries.retain(|_, r| now < r.stale);
            if entries.len() >= self.capacity {
                return;
            }
        }
        entries.insert(plan, Refusal { at, sent, states, stale });
    }
}

impl OverLimitCache {
    /// Forgets every refusal: the store failed, and a Redis that comes back may have lost its
    /// counters (a restart without persistence), which only it can tell.
    pub fn forget_all(&self) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !entries.is_empty() {
            entries.clear();
        }
    }
}

fn verdicts_at(ops: &[Op], states: &[Option<State>], now: Micros) -> Option<Vec<Verdict>> {
    (ops.len() == states.len())
        .then(|| ops.iter().zip(states).map(|(op, s)| quota::check(op.limit, *s, op.cost, now).verdict).collect())
}
