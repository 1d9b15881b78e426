//! The fleet store: every counter in Redis, so any number of portcullis instances agree as if
//! they were one process. A plan is one script call (`lua/apply.lua`, run by EVALSHA and
//! reloaded on NOSCRIPT after a failover or a SCRIPT FLUSH) on a multiplexed connection (a
//! per-core runtime's own, else one of `pool_size` shared ones), which pipelines concurrent
//! calls; time comes from the Redis server.
//!
//! On Redis Cluster the keys of one plan may live in several slots (an address's keys and an
//! identity's keys carry different hash tags). Such a plan is split by hash slot and kept
//! all-or-nothing by checking every part (the script with commit 0) before counting any; only
//! a race between the check and the count (another instance taking the last unit meanwhile) can
//! count a part of a refused plan, which errs towards refusing, never towards allowing.
//!
//! The script decides `allowed` and stores the new states; it returns the state each operation
//! saw, and the verdict (remaining, reset, retry-after) is recomputed here with the same pure
//! function the memory store uses, so both stores answer alike by construction. A disagreement
//! on `allowed` between the script and the Rust math is reported as an error, never hidden.
//!
//! One file per job: `settings` (what the policy gives), `connection` (the pool, the probe),
//! `scripts` (the Lua), `plan` (the plan codec), `traffic` (slots, queue and breaker).

mod connection;
mod plan;
mod scripts;
mod settings;
mod traffic;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use decision_core::plan::{Op, refuses};
use decision_core::quota::{Limit, Verdict};
use decision_core::traffic::Admit;
use decision_core::units::Micros;

use self::connection::Pool;
use self::plan::{Replies, decode};
use self::scripts::Scripts;
pub use self::settings::{RedisSettings, client, redacted};
pub use self::traffic::FREED_CHANNEL;

/// The blocks index (a sorted set: address -> until), for the admin API's list.
pub const BLOCKS_INDEX: &str = "pc:blocks";
/// The API key records the admin API issues (a hash: id -> JSON), and their version (bumped
/// at every write), in one hash slot.
pub const KEY_RECORDS: &str = "pc:{keys}";
pub const KEYS_VERSION: &str = "pc:{keys}:version";
/// What admin changes are announced on (admin.lua's CHANGED_CHANNEL): counters went back, so
/// every instance's over-limit cache forgets what it remembers.
pub const CHANGED_CHANNEL: &str = "pc:changed";
use super::over_limit::OverLimitCache;
use super::{Admission, Planned, Release, Store, StoreError, UpstreamState};

pub struct RedisStore {
    pool: Pool,
    scripts: Scripts,
    timeout: Duration,
    local_share: Option<u64>,
    /// refused plans, answered without a call while they stay refused
    over_limit: Option<std::sync::Arc<OverLimitCache>>,
    ready: AtomicBool,
    /// tests only: use the time passed to `apply` instead of the server's clock
    test_clock: bool,
}

impl RedisStore {
    /// Prepares the connections; they are made lazily, so portcullis starts (and reports the
    /// store down on /readyz) while Redis is unreachable, and reconnects on its own. Errors: an
    /// invalid URL, or a `ca_file` that cannot be read.
    pub fn connect(s: &RedisSettings) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            pool: Pool::open(s)?,
            scripts: Scripts::new(),
            timeout: s.timeout,
            local_share: s.local_share,
            over_limit: (s.over_limit_cache > 0).then(|| std::sync::Arc::new(OverLimitCache::new(s.over_limit_cache))),
            ready: AtomicBool::new(false),
            test_clock: false,
        })
    }

    /// Tests only: time comes from `apply`'s argument, so scenarios can step through windows.
    pub fn with_test_clock(mut self) -> Self {
        self.test_clock = true;
        self
    }

    /// Whether the store can decide, for /readyz: every master answers a PING, and the decision
    /// path's own call works as the configured user (the plan script, EVALSHA, with no
    /// operation: it counts nothing). Records the answer; an error gives the real cause (a user
    /// without the right to run scripts, a refused password, an untrusted certificate, a
    /// timeout, Redis out of memory).
    pub async fn probe(&self) -> Result<(), StoreError> {
        let checked = async {
            self.pool.ping().await?;
            let reply = self.invoke(&self.plan_call(std::iter::empty(), false, 0)).await?;
            decode(&reply, std::iter::empty(), &mut Vec::new())
        };
        let answer = tokio::time::timeout(self.pool.probe_timeout(), checked)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.pool.probe_timeout())));
        self.ready.store(answer.is_ok(), Ordering::Relaxed);
        answer
    }

    /// Registers `portcullis_store_over_limit_cache_hits_total` when the store has an
    /// over-limit cache.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        if let Some(cache) = &self.over_limit {
            registry.register(
                "store_over_limit_cache_hits",
                "Refused plans answered from the over-limit cache, without a store call",
                cache.hits(),
            );
        }
    }

    /// Forgets every refusal the over-limit cache remembers (counters went back here).
    fn forget_refusals(&self) {
        if let Some(cache) = &self.over_limit {
            cache.forget_all();
        }
    }

    /// The time the scripts use: the server's (-1), or under `with_test_clock` the caller's.
    fn clock_arg(&self, now: Micros) -> i64 {
        if self.test_clock { i64::try_from(now).unwrap_or(i64::MAX) } else { -1 }
    }

    /// A plan through the over-limit cache: answered from it while a refusal remembered there
    /// still holds (with `T`'s default: no slot), else by `call`, whose refusal is remembered.
    async fn through_cache<T: Default>(
        &self,
        ops: &[Op],
        now: Micros,
        call: impl Future<Output = Result<(Vec<Verdict>, Replies, T), StoreError>>,
    ) -> Result<(Vec<Verdict>, T), StoreError> {
        let cached = self.over_limit.as_ref().and_then(|c| Some((c, c.fingerprint(ops)?)));
        if let Some((cache, plan)) = cached
            && let Some(verdicts) = cache.refused(plan, ops, self.test_clock.then_some(now))
        {
            return Ok((verdicts, T::default()));
        }
        let sent = cached.map_or(0, |(c, _)| c.clock());
        let (verdicts, replies, extra) = call.await?;
        if let Some((cache, plan)) = cached
            && refuses(ops, &verdicts)
        {
            let (at, states) = replies.seen(ops);
            cache.remember(plan, ops, &verdicts, at, sent, states);
        }
        Ok((verdicts, extra))
    }

    /// One plan in Redis: one script call, or on a cluster, one per hash slot its keys fall in;
    /// `commit` false only checks it (a dry run).
    async fn apply_in_store(
        &self,
        ops: &[Op],
        now: Micros,
        commit: bool,
    ) -> Result<(Vec<Verdict>, Replies), StoreError> {
        if !(self.pool.is_cluster() && plan::spans_slots(ops)) {
            let reply = self.invoke(&self.plan_call(ops.iter(), commit, now)).await?;
            let mut verdicts = Vec::with_capacity(ops.len());
            decode(&reply, ops.iter(), &mut verdicts)?;
            return Ok((verdicts, Replies::One(reply)));
        }
        // a plan over several slots: the operations of each slot (in plan order), checked
        // everywhere before anything is counted anywhere
        let parts = &plan::by_hash_slot(ops);
        let round = |commit: bool| async move {
            let calls = parts.iter().map(|idx| async move {
                let reply = self.invoke(&self.plan_call(idx.iter().map(|&i| &ops[i]), commit, now)).await?;
                let mut part = Vec::with_capacity(idx.len());
                decode(&reply, idx.iter().map(|&i| &ops[i]), &mut part)?;
                Ok::<_, StoreError>((part, reply))
            });
            let answers = futures_util::future::try_join_all(calls).await?;
            let mut placed = vec![None; ops.len()];
            let mut replies = Vec::with_capacity(parts.len());
            for (idx, (part, reply)) in parts.iter().zip(answers) {
                for (&i, v) in idx.iter().zip(part) {
                    placed[i] = Some(v);
                }
                replies.push((idx.clone(), reply));
            }
            let verdicts: Vec<Verdict> = placed.into_iter().flatten().collect();
            Ok::<_, StoreError>((verdicts, Replies::Parts(replies)))
        };
        let checked = round(false).await?;
        if !commit || refuses(ops, &checked.0) {
            return Ok(checked);
        }
        round(true).await
    }

    /// The apply.lua call for `ops` (all in one hash slot); `commit` false only checks them.
    fn plan_call<'a>(
        &'a self,
        ops: impl Iterator<Item = &'a Op> + Clone,
        commit: bool,
        now: Micros,
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = self.scripts.apply.prepare_invoke();
        plan::plan_args(&mut inv, ops, self.clock_arg(now), commit);
        inv
    }

    /// One traffic.lua call for `upstream` (a short hex key; its three keys share a hash tag).
    async fn traffic_call(&self, upstream: &str, args: &[String]) -> Result<Vec<i64>, StoreError> {
        let mut inv = self.scripts.traffic.prepare_invoke();
        traffic::upstream_keys(&mut inv, upstream);
        for a in args {
            inv.arg(a.as_str());
        }
        self.invoke(&inv).await
    }

    /// One script call on the next connection; records whether the server answered (a failed
    /// call also empties the over-limit cache).
    async fn invoke(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        self.invoke_as::<Vec<i64>>(inv).await
    }

    /// `invoke`, for a script whose answer is not a list of integers.
    async fn invoke_as<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let answered = self.pool.invoke::<T>(inv).await;
        self.ready.store(answered.is_ok(), Ordering::Relaxed);
        if answered.is_err()
            && let Some(cache) = &self.over_limit
        {
            cache.forget_all();
        }
        answered.map_err(|e| {
            if e.is_timeout() { StoreError::Timeout(self.timeout) } else { StoreError::Unavailable(e.to_string()) }
        })
    }
}

impl Store for RedisStore {
    async fn admit(
        &self,
        a: &Admission<'_>,
        returning: bool,
        now: Micros,
    ) -> Result<(Admit, UpstreamState), StoreError> {
        let r =
            self.traffic_call(a.upstream, &traffic::admit_args(self.clock_arg(now), a.lease, returning, a.cfg)).await?;
        traffic::admitted(&r)
    }

    async fn apply_admit(&self, ops: &[Op], a: &Admission<'_>, now: Micros) -> Result<Planned, StoreError> {
        // on a cluster the upstream's keys sit in a hash slot of their own: two calls
        if self.pool.is_cluster() || ops.is_empty() {
            return super::apply_then_admit(self, ops, a, now).await;
        }
        let (upstream, lease, cfg) = (a.upstream, a.lease, a.cfg);
        self.through_cache(ops, now, async {
            let mut inv = self.scripts.plan_admit.prepare_invoke();
            inv.arg(ops.len()).arg(2 + 5 * ops.len());
            plan::plan_args(&mut inv, ops.iter(), self.clock_arg(now), true);
            traffic::upstream_keys(&mut inv, upstream);
            for a in traffic::admit_args(self.clock_arg(now), lease, false, cfg) {
                inv.arg(a);
            }
            let reply = self.invoke(&inv).await?;
            let planned = 2 + 4 * ops.len();
            let mut verdicts = Vec::with_capacity(ops.len());
            decode(reply.get(..planned).unwrap_or(&reply), ops.iter(), &mut verdicts)?;
            let admission = match (refuses(ops, &verdicts), reply.get(planned..)) {
                (true, Some([])) => None,
                (false, Some(r)) if !r.is_empty() => Some(traffic::admitted(r)?),
                _ => return Err(StoreError::Script(format!("plan_admit.lua answered {reply:?}"))),
            };
            Ok((verdicts, Replies::One(reply), admission))
        })
        .await
        .map(|(verdicts, admitted)| Planned { verdicts, admitted })
    }

    async fn leave(&self, upstream: &str, lease: &str) -> Result<(), StoreError> {
        self.traffic_call(upstream, &traffic::leave_args(lease)).await.map(|_| ())
    }

    async fn renew(&self, upstream: &str, lease: &str, lease_ttl: Micros, now: Micros) -> Result<bool, StoreError> {
        let reply = self.traffic_call(upstream, &traffic::renew_args(self.clock_arg(now), lease, lease_ttl)).await?;
        match reply[..] {
            [held] => Ok(held == 1),
            _ => Err(StoreError::Script(format!("traffic.lua renew answered {reply:?}"))),
        }
    }

    async fn complete(&self, r: &Release<'_>, now: Micros) -> Result<(bool, UpstreamState), StoreError> {
        let reply = self.traffic_call(r.upstream, &traffic::complete_args(self.clock_arg(now), r)).await?;
        traffic::completed(&reply)
    }

    async fn settle(&self, keys: &[String], actual: u64, now: Micros) -> Result<Option<u64>, StoreError> {
        let mut inv = self.scripts.settle.prepare_invoke();
        for k in keys {
            inv.key(k.as_str());
        }
        inv.arg(self.clock_arg(now)).arg(actual);
        let reply = self.invoke(&inv).await?;
        let estimate = match reply[..] {
            [_, 1, estimate] => u64::try_from(estimate).ok(),
            [_, 0, 0] => return Ok(None),
            _ => None,
        };
        let estimate = estimate.ok_or_else(|| StoreError::Script(format!("settle.lua answered {reply:?}")))?;
        // a refund takes counters back, which the over-limit cache assumes never happens: what
        // it remembers may now refuse too much (other instances' refunds: see over_limit.rs)
        if actual < estimate
            && let Some(cache) = &self.over_limit
        {
            cache.forget_all();
        }
        Ok(Some(estimate))
    }

    async fn adjust(&self, counters: &[(String, Limit)], delta: i64, now: Micros) -> Result<(), StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        for (key, _) in counters {
            inv.key(key.as_str());
        }
        inv.arg(self.clock_arg(now)).arg("adjust").arg(delta);
        for (_, limit) in counters {
            let (kind, b) = match *limit {
                Limit::TokenBucket { interval, .. } => ("b", interval),
                Limit::SlidingWindow { window, .. } => ("s", window),
                Limit::FixedWindow { window, .. } => ("f", window),
                Limit::Flag { .. } => return Err(StoreError::Script("a flag cannot be adjusted".into())),
            };
            inv.arg(format!("{kind} {b}"));
        }
        self.invoke(&inv).await?;
        self.forget_refusals();
        Ok(())
    }

    async fn forget(&self, keys: &[String]) -> Result<u64, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        for key in keys {
            inv.key(key.as_str());
        }
        inv.arg(-1).arg("forget");
        let reply = self.invoke(&inv).await?;
        self.forget_refusals();
        reply
            .get(1)
            .and_then(|n| u64::try_from(*n).ok())
            .ok_or_else(|| StoreError::Script(format!("admin.lua forget answered {reply:?}")))
    }

    async fn note_block(&self, address: &str, until: Micros, now: Micros) -> Result<(), StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(BLOCKS_INDEX).arg(self.clock_arg(now)).arg("note").arg(address).arg(until);
        self.invoke(&inv).await.map(|_| ())
    }

    async fn unnote_block(&self, address: &str, now: Micros) -> Result<bool, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(BLOCKS_INDEX).arg(self.clock_arg(now)).arg("unnote").arg(address);
        let reply = self.invoke(&inv).await?;
        Ok(reply.get(1) == Some(&1))
    }

    async fn blocks(&self, now: Micros) -> Result<Vec<(String, Micros)>, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(BLOCKS_INDEX).arg(self.clock_arg(now)).arg("list");
        let reply: Vec<redis::Value> = self.invoke_as(&inv).await?;
        let text = |v: &redis::Value| -> Option<String> {
            match v {
                redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                redis::Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            }
        };
        let bad = || StoreError::Script(format!("admin.lua list answered {reply:?}"));
        let mut out = Vec::new();
        for pair in reply.get(2..).ok_or_else(bad)?.chunks(2) {
            let [address, until] = pair else { return Err(bad()) };
            let address = text(address).ok_or_else(bad)?;
            let until = text(until).and_then(|u| u.parse::<f64>().ok()).ok_or_else(bad)?;
            out.push((address, until as Micros));
        }
        Ok(out)
    }

    async fn key_records(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut all = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut inv = self.scripts.admin.prepare_invoke();
            inv.key(KEY_RECORDS).arg(-1).arg("keys").arg(cursor.as_str());
            let (next, flat): (String, Vec<String>) = self.invoke_as(&inv).await?;
            all.extend(flat.chunks(2).filter_map(|p| match p {
                [id, record] => Some((id.clone(), record.clone())),
                _ => None,
            }));
            if next == "0" {
                return Ok(all);
            }
            cursor = next;
        }
    }

    async fn keys_version(&self) -> Result<u64, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(KEY_RECORDS).key(KEYS_VERSION).arg(-1).arg("version");
        let reply = self.invoke(&inv).await?;
        reply
            .get(1)
            .and_then(|v| u64::try_from(*v).ok())
            .ok_or_else(|| StoreError::Script(format!("admin.lua version answered {reply:?}")))
    }

    async fn key_record(&self, id: &str) -> Result<Option<String>, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(KEY_RECORDS).arg(-1).arg("key").arg(id);
        self.invoke_as(&inv).await
    }

    async fn put_key_record(&self, id: &str, record: &str, expected: Option<&str>) -> Result<bool, StoreError> {
        let mut inv = self.scripts.admin.prepare_invoke();
        inv.key(KEY_RECORDS)
            .key(KEYS_VERSION)
            .arg(-1)
            .arg("putkey")
            .arg(id)
            .arg(record)
            .arg(if expected.is_some() { "1" } else { "0" })
            .arg(expected.unwrap_or(""));
        let written: i64 = self.invoke_as(&inv).await?;
        Ok(written == 1)
    }

    async fn apply(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        let (verdicts, ()) = self
            .through_cache(ops, now, async {
                let (verdicts, replies) = self.apply_in_store(ops, now, true).await?;
                Ok((verdicts, replies, ()))
            })
            .await?;
        Ok(verdicts)
    }

    async fn dry_run(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        self.apply_in_store(ops, now, false).await.map(|(verdicts, _)| verdicts)
    }

    fn watch_freed(
        &self,
        wake: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
        changed: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
    ) {
        let clients = self.pool.notify.clone();
        let cache = self.over_limit.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            for client in clients.iter().cycle() {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(&[FREED_CHANNEL, CHANGED_CHANNEL]).await {
                        Ok(()) => {
                            // (re)subscribed: changes announced meanwhile were missed
                            if let Some(cache) = &cache {
                                cache.forget_all();
                            }
                            changed("keys:*");
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                if msg.get_channel_name() == CHANGED_CHANNEL {
                                    if let Some(cache) = &cache {
                                        cache.forget_all();
                                    }
                                    if let Ok(what) = msg.get_payload::<String>() {
                                        changed(&what);
                                    }
                                } else if let Ok(up) = msg.get_payload::<String>() {
                                    wake(&up);
                                }
                            }
                            tracing::warn!("redis notification channel closed; resubscribing");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot subscribe to redis notifications"),
                    },
                    Err(e) => tracing::debug!(error = %e, "redis notifications: cannot connect"),
                }
                // waiters still look again every quarter second meanwhile
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn local_share_instances(&self) -> Option<u64> {
        self.local_share
    }

    fn apply_admit_is_one_call(&self) -> bool {
        // on a cluster the upstream's keys sit in a hash slot of their own
        !self.pool.is_cluster()
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn warm_up(&self) {
        self.pool.warm_up().await;
    }
}

#[cfg(test)]
mod tests;
