//! The embedded in-memory store: a sharded hash map of quota states with expiry. A plan locks
//! the shards its keys fall in (in shard order, so plans never deadlock), checks every operation,
//! and commits only if all are allowed.
//!
//! Keys are held as a 128-bit keyed hash (two independently seeded SipHash-1-3), not as strings:
//! a key is only ever looked up, and 16 bytes in place save a heap string per key (the store
//! holds millions). With random seeds per process, a collision can neither be found from outside
//! nor, at 2^-128 a pair, expected from inside.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Mutex, MutexGuard};

use decision_core::plan::{self, Op, OpKind};
use decision_core::quota::{self, State, Verdict};
use decision_core::traffic::{self, AdaptiveState, Admit, Breaker, Gate, Occupancy, TrafficConfig};
use decision_core::units::Micros;

use super::{Admission, Release, Store, StoreError, UpstreamState};

/// Shards: enough that two cores rarely contend, few enough to sweep quickly.
const SHARDS: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Entry {
    state: State,
    expires_at: Micros,
}

type Shard = HashMap<u128, Entry>;

pub struct MemoryStore {
    hasher: RandomState,
    hasher2: RandomState,
    shards: Vec<Mutex<Shard>>,
    /// traffic state per upstream (a handful of upstreams: one lock is enough)
    traffic: Mutex<HashMap<String, Upstream>>,
    /// reservations waiting for their settle, by their record key's id (taken after the
    /// shards' locks while a plan commits, and alone while a settle reads it: never the other
    /// way round)
    reservations: Mutex<HashMap<u128, Held>>,
    /// the blocks index: address -> until
    blocks: Mutex<HashMap<String, Micros>>,
    /// API key records (the admin API's): id -> JSON, and how many writes they have seen
    keys: Mutex<(HashMap<String, String>, u64)>,
}

/// A reservation's record: what apply.lua keeps in a Redis hash.
struct Held {
    at: Micros,
    until: Micros,
    estimate: u64,
    /// the covered counters: key id and limit
    covered: Vec<(u128, quota::Limit)>,
}

/// One upstream's slots, queue and breaker.
#[derive(Default)]
struct Upstream {
    slots: Slots,
    /// waiters in arrival order, with their deadlines
    queue: std::collections::VecDeque<(String, Micros)>,
    breaker: Breaker,
    /// the recent mean time a lease was held
    hold: Micros,
    adaptive: AdaptiveState,
}

/// The granted slots of one upstream, by lease id and by expiry: what traffic.lua keeps in a
/// sorted set. Lease ids are held as the store's 128-bit keyed hash of the id (as quota keys
/// are, see the module's comment), in B-trees: expiring a lapsed slot, granting, renewing and
/// freeing one cost O(log n) and no allocation, and nothing ever rehashes the whole set (a hash
/// map of 250,000 string ids under grant-and-expire churn rehashed itself every few seconds,
/// stalling every decision for tens of milliseconds; sweeping it on every admission was most of
/// the CPU).
#[derive(Default)]
struct Slots {
    /// hashed lease id (with its kind prefix) -> (expiry, sequence number)
    by_id: BTreeMap<u128, (Micros, u64)>,
    /// (expiry, sequence number) -> hashed lease id, in the order they lapse
    by_expiry: BTreeMap<(Micros, u64), u128>,
    /// the next sequence number: makes equal expiries distinct keys
    seq: u64,
}

impl Slots {
    fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Holds `id` until `expiry` (a new slot; an id already held is moved to `expiry`).
    fn insert(&mut self, id: u128, expiry: Micros) {
        self.remove(id);
        self.seq += 1;
        self.by_id.insert(id, (expiry, self.seq));
        self.by_expiry.insert((expiry, self.seq), id);
    }

    /// Frees `id`; its expiry if it was held.
    fn remove(&mut self, id: u128) -> Option<Micros> {
        let at = self.by_id.remove(&id)?;
        self.by_expiry.remove(&at);
        Some(at.0)
    }

    /// Moves a held, unexpired `id` to `expiry`; false when it is not held at `now`.
    fn renew(&mut self, id: u128, expiry: Micros, now: Micros) -> bool {
        let Some(at) = self.by_id.get_mut(&id) else { return false };
        if at.0 <= now {
            return false;
        }
        self.by_expiry.remove(at);
        self.seq += 1;
        *at = (expiry, self.seq);
        self.by_expiry.insert(*at, id);
        true
    }

    /// Frees every slot whose expiry is at or before `now`.
    fn expire(&mut self, now: Micros) {
        while let Some(first) = self.by_expiry.first_entry() {
            if first.key().0 > now {
                break;
            }
            let id = first.remove();
            self.by_id.remove(&id);
        }
    }
}

impl Upstream {
    fn expire(&mut self, now: Micros) {
        self.slots.expire(now);
        if !self.queue.is_empty() {
            self.queue.retain(|(_, deadline)| *deadline > now);
        }
    }

    fn limit(&self, cfg: &TrafficConfig) -> u64 {
        match cfg.adaptive {
            Some(_) => self.adaptive.effective(cfg.concurrency_limit),
            None => cfg.concurrency_limit,
        }
    }

    fn occupied(&self, cfg: &TrafficConfig) -> UpstreamState {
        UpstreamState {
            in_use: self.slots.len() as u64,
            queued: self.queue.len() as u64,
            mode: self.breaker.mode,
            limit: self.limit(cfg),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard cannot leave an entry half-written (entries are Copy and
    // written whole), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            hasher: RandomState::new(),
            hasher2: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            traffic: Mutex::new(HashMap::new()),
            reservations: Mutex::new(HashMap::new()),
            blocks: Mutex::new(HashMap::new()),
            keys: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// `Store::admit`, synchronously.
    pub fn admit_now(&self, a: &Admission<'_>, returning: bool, now: Micros) -> (Admit, UpstreamState) {
        let (upstream, lease, cfg) = (a.upstream, a.lease, a.cfg);
        // a request waits in the queue under its lease id
        let waiter = lease;
        let mut all = lock(&self.traffic);
        if !all.contains_key(upstream) {
            all.insert(upstream.to_owned(), Upstream::default());
        }
        let Some(up) = all.get_mut(upstream) else { unreachable!("inserted above") };
        up.expire(now);
        let (gate, next) = match &cfg.breaker {
            Some(b) => up.breaker.gate(b, cfg.lease_ttl, now),
            None => (Gate::Pass, up.breaker),
        };
        if let Gate::Refuse { retry_after } = gate {
            if returning {
                up.queue.retain(|(w, _)| w != waiter);
            }
            return (Admit::BreakerOpen { retry_after }, up.occupied(cfg));
        }
        let free = (up.slots.len() as u64) < up.limit(cfg);
        let my_turn = match up.queue.front() {
            None => true,
            Some((head, _)) => returning && head == waiter,
        };
        if free && my_turn {
            let probe = gate == Gate::Probe;
            let id = self.slot_id(if probe { traffic::PROBE_PREFIX } else { 'l' }, lease);
            up.slots.insert(id, now + cfg.lease_ttl);
            if returning {
                up.queue.pop_front();
            }
            up.breaker = next;
            return (Admit::Granted { probe }, up.occupied(cfg));
        }
        let occupancy =
            |up: &Upstream| Occupancy { in_use: up.slots.len() as u64, queued: up.queue.len() as u64, hold: up.hold };
        if returning {
            return (Admit::Wait(occupancy(up)), up.occupied(cfg));
        }
        // a waiter id already queued (ids are random: only in tests) moves to the back, as
        // Redis's ZADD moves it by its new deadline
        let known = up.queue.iter().any(|(w, _)| w == waiter);
        if known || (up.queue.len() as u64) < cfg.queue_size {
            up.queue.retain(|(w, _)| w != waiter);
            up.queue.push_back((waiter.to_owned(), now + cfg.queue_timeout));
            return (Admit::Wait(occupancy(up)), up.occupied(cfg));
        }
        (Admit::QueueFull(occupancy(up)), up.occupied(cfg))
    }

    /// `Store::leave`, synchronously.
    pub fn leave_now(&self, upstream: &str, lease: &str) {
        if let Some(up) = lock(&self.traffic).get_mut(upstream) {
            up.queue.retain(|(w, _)| w != lease);
            // a slot granted under this id (a cancelled request's) is freed, uncounted
            for prefix in ['l', traffic::PROBE_PREFIX] {
                up.slots.remove(self.slot_id(prefix, lease));
            }
        }
    }

    /// `Store::renew`, synchronously.
    pub fn renew_now(&self, upstream: &str, lease: &str, lease_ttl: Micros, now: Micros) -> bool {
        // a half-open probe is one request, judged when it completes: never renewed
        if lease.starts_with(traffic::PROBE_PREFIX) {
            return false;
        }
        let id = self.id(lease);
        let mut all = lock(&self.traffic);
        let Some(up) = all.get_mut(upstream) else { return false };
        up.slots.renew(id, now + lease_ttl, now)
    }

    /// `Store::complete`, synchronously.
    pub fn complete_now(&self, r: &Release<'_>, now: Micros) -> (bool, UpstreamState) {
        let Release { upstream, lease, error, latency, cfg } = *r;
        let mut all = lock(&self.traffic);
        let Some(up) = all.get_mut(upstream) else {
            return (false, UpstreamState { limit: cfg.concurrency_limit, ..UpstreamState::default() });
        };
        up.expire(now);
        let Some(expiry) = up.slots.remove(self.id(lease)) else { return (false, up.occupied(cfg)) };
        let held = now.saturating_sub(expiry.saturating_sub(cfg.lease_ttl));
        up.hold = traffic::mean_hold(up.hold, held);
        if let Some(b) = &cfg.breaker {
            up.breaker = up.breaker.record(b, error, traffic::is_probe(lease), now);
        }
        if let Some(a) = &cfg.adaptive {
            up.adaptive = up.adaptive.record(a, cfg.concurrency_limit, error, latency, now);
        }
        (true, up.occupied(cfg))
    }

    fn id(&self, key: &str) -> u128 {
        (u128::from(self.hasher.hash_one(key)) << 64) | u128::from(self.hasher2.hash_one(key))
    }

    /// `id` of the slot id `prefix` + `lease` (what `complete` and `renew` are later given),
    /// without building that string.
    fn slot_id(&self, prefix: char, lease: &str) -> u128 {
        let mut buf = [0u8; 4];
        let prefix = prefix.encode_utf8(&mut buf).as_bytes();
        let one = |h: &RandomState| {
            let mut h = h.build_hasher();
            // what `str`'s Hash writes: its bytes, then 0xff
            h.write(prefix);
            h.write(lease.as_bytes());
            h.write_u8(0xff);
            h.finish()
        };
        (u128::from(one(&self.hasher)) << 64) | u128::from(one(&self.hasher2))
    }

    fn shard_of(id: u128) -> usize {
        (id % SHARDS as u128) as usize
    }

    /// Applies a plan synchronously (the `Store` impl wraps this).
    pub fn apply_now(&self, ops: &[Op], now: Micros) -> Vec<Verdict> {
        self.evaluate(ops, now, true)
    }

    /// The verdicts `apply_now` would give `ops` at `now`, storing nothing.
    pub fn dry_run_now(&self, ops: &[Op], now: Micros) -> Vec<Verdict> {
        self.evaluate(ops, now, false)
    }

    /// The verdicts of `ops` at `now`; stored only when `commit` and the plan is allowed.
    fn evaluate(&self, ops: &[Op], now: Micros, commit: bool) -> Vec<Verdict> {
        let ids: Vec<u128> = ops.iter().map(|op| self.id(&op.key)).collect();
        let shard_ids: Vec<usize> = ids.iter().map(|&id| Self::shard_of(id)).collect();
        let mut order: Vec<usize> = shard_ids.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<MutexGuard<'_, Shard>> = order.iter().map(|&i| lock(&self.shards[i])).collect();
        let guard_of = |shard: usize| order.iter().position(|&i| i == shard).unwrap_or(0);

        let mut checked: Vec<quota::Checked> = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            // An earlier operation of this plan on the same key counts as already applied.
            let earlier = ids[..i].iter().rposition(|&o| o == ids[i]).map(|j| checked[j].next);
            let state = earlier.or_else(|| {
                guards[guard_of(shard_ids[i])].get(&ids[i]).filter(|e| e.expires_at > now).map(|e| e.state)
            });
            // a reservation's record is not a quota state: always allowed
            let state = state.filter(|_| op.kind != OpKind::Reservation);
            checked.push(quota::check(op.limit, state, op.cost, now));
        }
        // All-or-nothing over the enforced operations; a shadow operation that is over its
        // limit neither refuses the plan nor is counted (as if it were enforced).
        if commit && ops.iter().zip(&checked).all(|(op, c)| op.shadow || c.verdict.allowed) {
            for (i, c) in checked.iter().enumerate() {
                if !c.verdict.allowed {
                    continue;
                }
                if ops[i].kind == OpKind::Reservation {
                    let n = plan::covered(ops, i);
                    let held = Held {
                        at: now,
                        until: now.saturating_add(ops[i].limit.window()),
                        estimate: ops[i].cost,
                        covered: (i - n..i).map(|j| (ids[j], ops[j].limit)).collect(),
                    };
                    lock(&self.reservations).insert(ids[i], held);
                    continue;
                }
                // a flag checked (cost 0) changes nothing
                if matches!(ops[i].limit, quota::Limit::Flag { .. }) && ops[i].cost == 0 {
                    continue;
                }
                let map = &mut guards[guard_of(shard_ids[i])];
                map.insert(ids[i], Entry { state: c.next, expires_at: c.expires_at });
            }
        }
        checked.into_iter().map(|c| c.verdict).collect()
    }

    /// `Store::settle`, synchronously: `keys[0]` is the record's key (the counters it covers
    /// are in the record itself).
    pub fn settle_now(&self, keys: &[String], actual: u64, now: Micros) -> Option<u64> {
        let held = lock(&self.reservations).remove(&self.id(keys.first()?))?;
        if held.until <= now {
            return None;
        }
        let delta =
            i64::try_from(actual).unwrap_or(i64::MAX).saturating_sub(i64::try_from(held.estimate).unwrap_or(i64::MAX));
        let mut order: Vec<usize> = held.covered.iter().map(|&(id, _)| Self::shard_of(id)).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<MutexGuard<'_, Shard>> = order.iter().map(|&i| lock(&self.shards[i])).collect();
        for &(id, limit) in &held.covered {
            let map = &mut guards[order.iter().position(|&i| i == Self::shard_of(id)).unwrap_or(0)];
            let state = map.get(&id).filter(|e| e.expires_at > now).map(|e| e.state);
            if let Some((state, expires_at)) = quota::settle(limit, state, held.at, delta, now) {
                map.insert(id, Entry { state, expires_at });
            }
        }
        Some(held.estimate)
    }

    /// `Store::adjust`, synchronously.
    pub fn adjust_now(&self, counters: &[(String, quota::Limit)], delta: i64, now: Micros) {
        for (key, limit) in counters {
            let id = self.id(key);
            let mut map = lock(&self.shards[Self::shard_of(id)]);
            let state = map.get(&id).filter(|e| e.expires_at > now).map(|e| e.state);
            let next = if delta < 0 {
                quota::grant(*limit, state, delta.unsigned_abs(), now)
            } else {
                quota::settle(*limit, state, now, delta, now)
            };
            if let Some((state, expires_at)) = next {
                map.insert(id, Entry { state, expires_at });
            }
        }
    }

    /// `Store::forget`, synchronously.
    pub fn forget_now(&self, keys: &[String]) -> u64 {
        let mut n = 0;
        for key in keys {
            let id = self.id(key);
            n += u64::from(lock(&self.shards[Self::shard_of(id)]).remove(&id).is_some());
        }
        n
    }

    /// `Store::note_block`, `unnote_block` and `blocks`, synchronously.
    pub fn note_block_now(&self, address: &str, until: Micros, now: Micros) {
        let mut blocks = lock(&self.blocks);
        blocks.retain(|_, u| *u > now);
        let entry = blocks.entry(address.to_owned()).or_insert(until);
        *entry = (*entry).max(until);
    }

    pub fn unnote_block_now(&self, address: &str, now: Micros) -> bool {
        lock(&self.blocks).remove(address).is_some_and(|u| u > now)
    }

    pub fn blocks_now(&self, now: Micros) -> Vec<(String, Micros)> {
        let mut blocks = lock(&self.blocks);
        blocks.retain(|_, u| *u > now);
        let mut all: Vec<(String, Micros)> = blocks.iter().map(|(a, u)| (a.clone(), *u)).collect();
        all.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        all
    }

    /// Drops every entry expired at `now`; returns how many remain.
    pub fn sweep(&self, now: Micros) -> usize {
        lock(&self.reservations).retain(|_, r| r.until > now);
        self.shards
            .iter()
            .map(|s| {
                let mut m = lock(s);
                m.retain(|_, e| e.expires_at > now);
                m.len()
            })
            .sum()
    }

    /// Live keys (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemoryStore {
    async fn apply(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        Ok(self.apply_now(ops, now))
    }

    async fn dry_run(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        Ok(self.dry_run_now(ops, now))
    }

    async fn admit(
        &self,
        a: &Admission<'_>,
        returning: bool,
        now: Micros,
    ) -> Result<(Admit, UpstreamState), StoreError> {
        Ok(self.admit_now(a, returning, now))
    }

    async fn leave(&self, upstream: &str, lease: &str) -> Result<(), StoreError> {
        self.leave_now(upstream, lease);
        Ok(())
    }

    async fn complete(&self, r: &Release<'_>, now: Micros) -> Result<(bool, UpstreamState), StoreError> {
        Ok(self.complete_now(r, now))
    }

    async fn renew(&self, upstream: &str, lease: &str, lease_ttl: Micros, now: Micros) -> Result<bool, StoreError> {
        Ok(self.renew_now(upstream, lease, lease_ttl, now))
    }

    async fn settle(&self, keys: &[String], actual: u64, now: Micros) -> Result<Option<u64>, StoreError> {
        Ok(self.settle_now(keys, actual, now))
    }

    async fn adjust(&self, counters: &[(String, quota::Limit)], delta: i64, now: Micros) -> Result<(), StoreError> {
        self.adjust_now(counters, delta, now);
        Ok(())
    }

    async fn forget(&self, keys: &[String]) -> Result<u64, StoreError> {
        Ok(self.forget_now(keys))
    }

    async fn note_block(&self, address: &str, until: Micros, now: Micros) -> Result<(), StoreError> {
        self.note_block_now(address, until, now);
        Ok(())
    }

    async fn unnote_block(&self, address: &str, now: Micros) -> Result<bool, StoreError> {
        Ok(self.unnote_block_now(address, now))
    }

    async fn blocks(&self, now: Micros) -> Result<Vec<(String, Micros)>, StoreError> {
        Ok(self.blocks_now(now))
    }

    async fn key_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(lock(&self.keys).0.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn keys_version(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.keys).1)
    }

    async fn key_record(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(lock(&self.keys).0.get(id).cloned())
    }

    async fn put_key_record(&self, id: &str, record: &str, expected: Option<&str>) -> Result<bool, StoreError> {
        let mut keys = lock(&self.keys);
        if keys.0.get(id).map(String::as_str) != expected {
            return Ok(false);
        }
        keys.0.insert(id.to_owned(), record.to_owned());
        keys.1 += 1;
        Ok(true)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_passes_the_conformance_suite() {
        super::super::conformance::run_all(|| async { MemoryStore::new() }).await;
    }

    #[test]
    fn a_slot_id_hashes_as_the_lease_string_complete_is_given() {
        let s = MemoryStore::new();
        for (prefix, lease) in [('l', "0123456789abcdef0123456789abcdef"), ('p', "x"), ('l', ""), ('p', "é✓")] {
            assert_eq!(s.slot_id(prefix, lease), s.id(&format!("{prefix}{lease}")), "{prefix}{lease}");
        }
        assert_ne!(s.slot_id('l', "a"), s.slot_id('p', "a"));
    }

    #[test]
    fn slots_lapse_in_expiry_order_and_a_renewed_or_freed_one_moves_or_goes() {
        let mut slots = Slots::default();
        for (id, expiry) in [(1, 30), (2, 10), (3, 20), (4, 10)] {
            slots.insert(id, expiry);
        }
        assert!(slots.renew(2, 40, 5), "held and unexpired");
        assert_eq!(slots.remove(3), Some(20));
        assert_eq!(slots.remove(3), None);
        slots.expire(10);
        assert_eq!((slots.len(), slots.by_id.contains_key(&4)), (2, false), "4 lapsed at 10, 2 was renewed");
        assert!(!slots.renew(1, 100, 30), "lapsed at 30: not renewed");
        slots.expire(30);
        assert_eq!(slots.by_id.keys().copied().collect::<Vec<_>>(), [2]);
        slots.insert(2, 5);
        assert_eq!((slots.len(), slots.by_expiry.len()), (1, 1), "re-granting an id moves it");
        slots.expire(5);
        assert_eq!((slots.len(), slots.by_expiry.len()), (0, 0));
    }

    #[test]
    fn sweep_drops_expired_keys_only() {
        let s = MemoryStore::new();
        let ops = super::super::conformance::window_op("k", 10, 60_000_000);
        s.apply_now(std::slice::from_ref(&ops), 1_000_000_000);
        let other = super::super::conformance::window_op("k2", 10, 1_000_000);
        s.apply_now(std::slice::from_ref(&other), 1_000_000_000);
        assert_eq!(s.sweep(1_000_000_000 + 5_000_000), 1);
        assert_eq!(s.sweep(1_000_000_000 + 500_000_000), 0);
    }
}
