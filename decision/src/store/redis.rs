//! The fleet store: every counter in Redis, so any number of portcullis instances agree as if
//! they were one process. A plan is one script call (`lua/apply.lua`, run by EVALSHA and
//! reloaded on NOSCRIPT after a failover or a SCRIPT FLUSH) on one of `pool_size` multiplexed
//! connections, which pipeline concurrent calls; time comes from the Redis server.
//!
//! On Redis Cluster the keys of one plan may live in several slots (an address's keys and an
//! identity's keys carry different hash tags). Such a plan is split by slot and kept
//! all-or-nothing by checking every part (the script with commit 0) before counting any; only
//! a race between the check and the count (another instance taking the last unit meanwhile) can
//! count a part of a refused plan, which errs towards refusing, never towards allowing.
//!
//! The script decides `allowed` and stores the new states; it returns the state each operation
//! saw, and the verdict (remaining, reset, retry-after) is recomputed here with the same pure
//! function the memory store uses, so both stores answer alike by construction. A disagreement
//! on `allowed` between the script and the Rust math is reported as an error, never hidden.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use decision_core::plan::{Op, refuses};
use decision_core::quota::{self, Limit, State, Verdict};
use decision_core::traffic::{Admit, Mode, Occupancy, TrafficConfig};
use decision_core::units::Micros;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;

use super::over_limit::OverLimitCache;
use super::{Admission, Planned, Release, Store, StoreError, UpstreamState};

/// How a `RedisStore` connects.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`; the password is never logged (with `cluster`: its
    /// first node)
    pub url: String,
    /// Redis Cluster: the nodes to discover the cluster from (empty: `url` is a single node)
    pub cluster: Vec<String>,
    /// the longest one store call may take before `on_store_error` applies
    pub timeout: Duration,
    /// multiplexed connections, used in turn
    pub pool_size: usize,
    /// `rediss://`: CA certificates (PEM) to trust instead of the system's
    pub ca_file: Option<std::path::PathBuf>,
    /// `local_share.expected_instances`: while Redis fails, each limit divided by this, in memory
    pub local_share: Option<u64>,
    /// refused plans remembered at most (0: no over-limit cache)
    pub over_limit_cache: usize,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redacted(&self.url))
            .field("cluster", &self.cluster.iter().map(|u| redacted(u)).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("ca_file", &self.ca_file)
            .field("local_share", &self.local_share)
            .field("over_limit_cache", &self.over_limit_cache)
            .finish()
    }
}

/// The URL with any password replaced by `****`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.split_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:****@{host}")
        }
        None => url.to_owned(),
    }
}

/// Multiplexed connections, used in turn.
enum Conns {
    Single(Vec<ConnectionManager>),
    /// each one knows the whole cluster: it routes a call by its first key's slot, follows MOVED
    /// and ASK, and learns the new layout after a failover
    Cluster(Vec<ClusterConnection>),
}

pub struct RedisStore {
    /// where to subscribe to the freed-slot notifications: the node, or each cluster node in turn
    /// (a cluster delivers a PUBLISH to subscribers on every node)
    notify: Vec<redis::Client>,
    conns: Conns,
    next: AtomicUsize,
    script: Script,
    traffic: Script,
    /// a plan and a new arrival's admission in one call (single node)
    plan_admit: Script,
    timeout: Duration,
    local_share: Option<u64>,
    /// refused plans, answered without a call while they stay refused
    over_limit: Option<OverLimitCache>,
    ready: AtomicBool,
    /// tests only: use the time passed to `apply` instead of the server's clock
    test_clock: bool,
}

impl RedisStore {
    /// Prepares the connections; they are made lazily, so portcullis starts (and reports the
    /// store down on /readyz) while Redis is unreachable, and reconnects on its own.
    pub fn connect(s: &RedisSettings) -> Result<RedisStore, StoreError> {
        let invalid = |url: &str, e: redis::RedisError| {
            StoreError::Unavailable(format!("invalid Redis URL {}: {e}", redacted(url)))
        };
        // rediss:// with a private CA; without one, rediss:// trusts the system's roots
        let certs = match &s.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", ca.display())))?;
                Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
            None => None,
        };
        let client = |url: &str| match &certs {
            Some(c) => redis::Client::build_with_tls(url, c.clone()).map_err(|e| invalid(url, e)),
            None => redis::Client::open(url).map_err(|e| invalid(url, e)),
        };
        let connect_timeout = s.timeout.max(Duration::from_millis(250));
        let pool = s.pool_size.max(1);
        let (notify, conns) = if s.cluster.is_empty() {
            let client = client(&s.url)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(s.timeout))
                .set_connection_timeout(Some(connect_timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let mut conns = Vec::with_capacity(pool);
            for _ in 0..pool {
                let c = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                conns.push(c);
            }
            (vec![client], Conns::Single(conns))
        } else {
            let mut builder = redis::cluster::ClusterClientBuilder::new(s.cluster.iter().map(String::as_str))
                .connection_timeout(connect_timeout)
                .response_timeout(s.timeout)
                .retries(2);
            if let Some(c) = &certs {
                builder = builder.certs(c.clone());
            }
            let cluster = builder.build().map_err(|e| invalid(&s.cluster[0], e))?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(s.timeout);
            let conns = (0..pool).map(|_| cluster.get_pending_async_connection_with_config(config.clone())).collect();
            let notify = s.cluster.iter().map(|u| client(u)).collect::<Result<_, _>>()?;
            (notify, Conns::Cluster(conns))
        };
        Ok(RedisStore {
            notify,
            conns,
            next: AtomicUsize::new(0),
            script: Script::new(concat!(include_str!("lua/common.lua"), include_str!("lua/apply.lua"))),
            traffic: Script::new(concat!(include_str!("lua/common.lua"), include_str!("lua/traffic.lua"))),
            plan_admit: Script::new(concat!(
                include_str!("lua/common.lua"),
                "local function apply_plan(KEYS, ARGV)\n",
                include_str!("lua/apply.lua"),
                "\nend\nlocal function traffic(KEYS, ARGV)\n",
                include_str!("lua/traffic.lua"),
                "\nend\n",
                include_str!("lua/plan_admit.lua"),
            )),
            timeout: s.timeout,
            local_share: s.local_share,
            over_limit: (s.over_limit_cache > 0).then(|| OverLimitCache::new(s.over_limit_cache)),
            ready: AtomicBool::new(false),
            test_clock: false,
        })
    }

    /// Tests only: time comes from `apply`'s argument, so scenarios can step through windows.
    pub fn with_test_clock(mut self) -> Self {
        self.test_clock = true;
        self
    }

    /// The index of the connection the next call uses: each in turn (round robin over `n`).
    fn next_connection(&self, n: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }

    /// Checks the server (PING; on a cluster, every node) and records whether it answered; for
    /// /readyz.
    pub async fn probe(&self) -> bool {
        let ping = redis::cmd("PING");
        let answered = async {
            match &self.conns {
                Conns::Single(c) => {
                    ping.query_async::<redis::Value>(&mut c[self.next_connection(c.len())].clone()).await
                }
                // every master must answer, each asked by its address: a PING the client routes
                // to one random node, or fans out to the masters it still holds connections to,
                // reports a cluster with a dead master as ready
                Conns::Cluster(c) => ping_every_master(&mut c[self.next_connection(c.len())].clone()).await,
            }
        };
        let ok =
            matches!(tokio::time::timeout(self.timeout.max(Duration::from_millis(250)), answered).await, Ok(Ok(_)));
        self.ready.store(ok, Ordering::Relaxed);
        ok
    }
}

/// PINGs every master of the cluster's slot layout (`CLUSTER SLOTS`, asked of any node), each by
/// its address: a master the client holds no live connection to fails the probe instead of being
/// left out of the fan-out. Errors: the first failed PING, or a layout with no master.
async fn ping_every_master(conn: &mut ClusterConnection) -> redis::RedisResult<redis::Value> {
    use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
    let slots: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let mut masters: Vec<(String, u16)> = Vec::new();
    if let redis::Value::Array(ranges) = slots {
        for range in ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let redis::Value::Array(fields) = range else { continue };
            let Some(redis::Value::Array(master)) = fields.get(2) else { continue };
            let host = match master.first() {
                Some(redis::Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(redis::Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(redis::Value::Int(port)) = master.get(1) else { continue };
            let Ok(port) = u16::try_from(*port) else { continue };
            if !masters.iter().any(|(h, p)| *h == host && *p == port) {
                masters.push((host, port));
            }
        }
    }
    if masters.is_empty() {
        return Err((redis::ErrorKind::ClusterConnectionNotFound, "CLUSTER SLOTS named no master").into());
    }
    let pings = masters.into_iter().map(|(host, port)| {
        let mut conn = conn.clone();
        async move {
            let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            conn.route_command(redis::cmd("PING"), to).await
        }
    });
    futures_util::future::try_join_all(pings).await.map(|_| redis::Value::Okay)
}

/// The verdicts of one apply.lua call on `ops`, appended to `verdicts`.
fn decode<'a>(
    reply: &[i64],
    ops: impl ExactSizeIterator<Item = &'a Op>,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), StoreError> {
    if reply.len() != 2 + 4 * ops.len() {
        return Err(StoreError::Script(format!("reply of {} values for {} operations", reply.len(), ops.len())));
    }
    let now = u64::try_from(reply[0]).map_err(|_| StoreError::Script("negative server time".into()))?;
    for (i, op) in ops.enumerate() {
        let r = &reply[2 + 4 * i..6 + 4 * i];
        let state = state_seen(op, r);
        let checked = quota::check(op.limit, state, op.cost, now as Micros);
        if checked.verdict.allowed != (r[0] == 1) {
            return Err(StoreError::Script(format!(
                "the script and the quota math disagree on operation {i} ({:?}, state {state:?}, now {now})",
                op.limit
            )));
        }
        verdicts.push(checked.verdict);
    }
    Ok(())
}

/// The state an operation saw, from its four values in a reply (allowed, s1, s2, s3).
fn state_seen(op: &Op, r: &[i64]) -> Option<State> {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    (r[1] >= 0).then(|| match op.limit {
        Limit::TokenBucket { .. } | Limit::Flag { .. } => State::Bucket { tat: u(r[1]) },
        _ => State::Window { start: u(r[1]), prev: u(r[2]), cur: u(r[3]) },
    })
}

/// The replies behind a plan's verdicts (already checked by `decode`).
enum Replies {
    One(Vec<i64>),
    /// a plan split by slot: each part's operations (indices into the plan) and its reply
    Parts(Vec<(Vec<usize>, Vec<i64>)>),
}

impl Replies {
    /// The store's time and the state each of `ops` saw (for the over-limit cache). A split
    /// plan's parts have each their node's clock: the latest is taken, which can only make the
    /// cache send a plan to the store earlier.
    fn seen(&self, ops: &[Op]) -> (Micros, Vec<Option<State>>) {
        let time = |r: &[i64]| Micros::try_from(r[0]).unwrap_or(0);
        match self {
            Replies::One(r) => {
                (time(r), ops.iter().enumerate().map(|(i, op)| state_seen(op, &r[2 + 4 * i..])).collect())
            }
            Replies::Parts(parts) => {
                let mut states = vec![None; ops.len()];
                let mut at = 0;
                for (idx, r) in parts {
                    at = at.max(time(r));
                    for (j, &i) in idx.iter().enumerate() {
                        states[i] = state_seen(&ops[i], &r[2 + 4 * j..]);
                    }
                }
                (at, states)
            }
        }
    }
}

impl RedisStore {
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

    /// One plan in Redis: one script call, or on a cluster, one per slot its keys fall in.
    async fn apply_in_store(&self, ops: &[Op], now: Micros) -> Result<(Vec<Verdict>, Replies), StoreError> {
        let split = matches!(self.conns, Conns::Cluster(_))
            && ops.iter().skip(1).any(|op| Slot::for_key(&op.key) != Slot::for_key(&ops[0].key));
        if !split {
            let reply = self.invoke(&self.plan_call(ops.iter(), true, now)).await?;
            let mut verdicts = Vec::with_capacity(ops.len());
            decode(&reply, ops.iter(), &mut verdicts)?;
            return Ok((verdicts, Replies::One(reply)));
        }
        // a plan over several slots: the operations of each slot (in plan order), checked
        // everywhere before anything is counted anywhere
        let mut parts: Vec<(Slot, Vec<usize>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let slot = Slot::for_key(&op.key);
            match parts.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, idx)) => idx.push(i),
                None => parts.push((slot, vec![i])),
            }
        }
        let parts = &parts;
        let round = |commit: bool| async move {
            let calls = parts.iter().map(|(_, idx)| async move {
                let reply = self.invoke(&self.plan_call(idx.iter().map(|&i| &ops[i]), commit, now)).await?;
                let mut part = Vec::with_capacity(idx.len());
                decode(&reply, idx.iter().map(|&i| &ops[i]), &mut part)?;
                Ok::<_, StoreError>((part, reply))
            });
            let answers = futures_util::future::try_join_all(calls).await?;
            let mut placed = vec![None; ops.len()];
            let mut replies = Vec::with_capacity(parts.len());
            for ((_, idx), (part, reply)) in parts.iter().zip(answers) {
                for (&i, v) in idx.iter().zip(part) {
                    placed[i] = Some(v);
                }
                replies.push((idx.clone(), reply));
            }
            let verdicts: Vec<Verdict> = placed.into_iter().flatten().collect();
            Ok::<_, StoreError>((verdicts, Replies::Parts(replies)))
        };
        let checked = round(false).await?;
        if refuses(ops, &checked.0) {
            return Ok(checked);
        }
        round(true).await
    }

    /// The apply.lua call for `ops` (all in one slot); `commit` false only checks them.
    fn plan_call<'a>(
        &'a self,
        ops: impl Iterator<Item = &'a Op> + Clone,
        commit: bool,
        now: Micros,
    ) -> redis::ScriptInvocation<'a> {
        let mut inv = self.script.prepare_invoke();
        self.plan_args(&mut inv, ops, commit, now);
        inv
    }

    /// apply.lua's keys and arguments for `ops`, added to `inv`.
    fn plan_args<'a>(
        &self,
        inv: &mut redis::ScriptInvocation<'a>,
        ops: impl Iterator<Item = &'a Op> + Clone,
        commit: bool,
        now: Micros,
    ) {
        for op in ops.clone() {
            inv.key(op.key.as_str());
        }
        inv.arg(self.clock_arg(now)).arg(u8::from(commit));
        for op in ops {
            let (kind, a, b) = match op.limit {
                Limit::TokenBucket { burst, interval } => ("b", burst, interval),
                Limit::SlidingWindow { limit, window } => ("s", limit, window),
                Limit::FixedWindow { limit, window } => ("f", limit, window),
                Limit::Flag { duration } => ("k", 0, duration),
            };
            inv.arg(kind).arg(a).arg(b).arg(op.cost).arg(u8::from(op.shadow));
        }
    }

    /// traffic.lua's keys for `upstream`, added to `inv`.
    fn upstream_keys(inv: &mut redis::ScriptInvocation<'_>, upstream: &str) {
        for part in ["slots", "queue", "breaker"] {
            inv.key(format!("pc:{{up:{upstream}}}:{part}"));
        }
    }

    /// traffic.lua's arguments for an admission.
    fn admit_args(&self, lease: &str, returning: bool, cfg: &TrafficConfig, now: Micros) -> Vec<String> {
        let mut args = vec![
            "admit".to_owned(),
            self.clock_arg(now).to_string(),
            lease.to_owned(),
            // a request waits in the queue under its lease id
            lease.to_owned(),
            u8::from(returning).to_string(),
            cfg.concurrency_limit.to_string(),
            cfg.queue_size.to_string(),
            cfg.queue_timeout.to_string(),
            cfg.lease_ttl.to_string(),
        ];
        args.extend(breaker_args(cfg));
        args.extend(adaptive_args(cfg));
        args
    }

    /// One traffic.lua call for `upstream` (a short hex key; its three keys share a hash tag).
    async fn traffic_call(&self, upstream: &str, args: &[String]) -> Result<Vec<i64>, StoreError> {
        let mut inv = self.traffic.prepare_invoke();
        Self::upstream_keys(&mut inv, upstream);
        for a in args {
            inv.arg(a.as_str());
        }
        self.invoke(&inv).await
    }

    /// One script call on the next connection; records whether the server answered.
    async fn invoke(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        let answered = match &self.conns {
            Conns::Single(c) => inv.invoke_async::<Vec<i64>>(&mut c[self.next_connection(c.len())].clone()).await,
            Conns::Cluster(c) => inv.invoke_async::<Vec<i64>>(&mut c[self.next_connection(c.len())].clone()).await,
        };
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

/// Where traffic.lua announces freed slots.
pub const FREED_CHANNEL: &str = "pc:traffic:freed";

/// The breaker's settings as traffic.lua takes them (zeros without a breaker).
fn breaker_args(cfg: &TrafficConfig) -> [String; 5] {
    match &cfg.breaker {
        Some(b) => [
            "1".into(),
            b.error_threshold.to_string(),
            b.min_requests.to_string(),
            b.window.to_string(),
            b.reset_timeout.to_string(),
        ],
        None => ["0".into(), "0".into(), "0".into(), "0".into(), "0".into()],
    }
}

/// The adaptive limit's settings as traffic.lua takes them (zeros when off).
fn adaptive_args(cfg: &TrafficConfig) -> [String; 7] {
    match &cfg.adaptive {
        Some(a) => [
            "1".into(),
            a.min_limit.to_string(),
            a.decrease.to_string(),
            a.increase.to_string(),
            a.interval.to_string(),
            a.error_rate.to_string(),
            a.latency.to_string(),
        ],
        None => ["0".into(), "0".into(), "0".into(), "0".into(), "0".into(), "0".into(), "0".into()],
    }
}

/// traffic.lua's answer to an admission.
fn admitted(r: &[i64]) -> Result<(Admit, UpstreamState), StoreError> {
    let [code, a, b, c, in_use, queued, mode, limit] = r[..] else {
        return Err(StoreError::Script(format!("traffic.lua admit answered {r:?}")));
    };
    let occupied = UpstreamState {
        in_use: count(in_use),
        queued: count(queued),
        mode: Mode::from_code(count(mode)),
        limit: count(limit),
    };
    let occupancy = Occupancy { in_use: count(a), queued: count(b), hold: count(c) };
    let admit = match code {
        0 => Admit::Granted { probe: a == 1 },
        1 => Admit::Wait(occupancy),
        2 => Admit::QueueFull(occupancy),
        3 => Admit::BreakerOpen { retry_after: count(a) },
        _ => return Err(StoreError::Script(format!("traffic.lua admit answered {r:?}"))),
    };
    Ok((admit, occupied))
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store for RedisStore {
    async fn admit(
        &self,
        a: &Admission<'_>,
        returning: bool,
        now: Micros,
    ) -> Result<(Admit, UpstreamState), StoreError> {
        let r = self.traffic_call(a.upstream, &self.admit_args(a.lease, returning, a.cfg, now)).await?;
        admitted(&r)
    }

    async fn apply_admit(&self, ops: &[Op], a: &Admission<'_>, now: Micros) -> Result<Planned, StoreError> {
        // on a cluster the upstream's keys sit in a slot of their own: two calls
        if matches!(self.conns, Conns::Cluster(_)) || ops.is_empty() {
            return super::apply_then_admit(self, ops, a, now).await;
        }
        let (upstream, lease, cfg) = (a.upstream, a.lease, a.cfg);
        self.through_cache(ops, now, async {
            let mut inv = self.plan_admit.prepare_invoke();
            inv.arg(ops.len()).arg(2 + 5 * ops.len());
            self.plan_args(&mut inv, ops.iter(), true, now);
            Self::upstream_keys(&mut inv, upstream);
            for a in self.admit_args(lease, false, cfg, now) {
                inv.arg(a);
            }
            let reply = self.invoke(&inv).await?;
            let planned = 2 + 4 * ops.len();
            let mut verdicts = Vec::with_capacity(ops.len());
            decode(reply.get(..planned).unwrap_or(&reply), ops.iter(), &mut verdicts)?;
            let admission = match (refuses(ops, &verdicts), reply.get(planned..)) {
                (true, Some([])) => None,
                (false, Some(r)) if !r.is_empty() => Some(admitted(r)?),
                _ => return Err(StoreError::Script(format!("plan_admit.lua answered {reply:?}"))),
            };
            Ok((verdicts, Replies::One(reply), admission))
        })
        .await
        .map(|(verdicts, admitted)| Planned { verdicts, admitted })
    }

    async fn leave(&self, upstream: &str, lease: &str) -> Result<(), StoreError> {
        self.traffic_call(upstream, &["leave".to_owned(), "-1".to_owned(), lease.to_owned()]).await.map(|_| ())
    }

    async fn complete(&self, r: &Release<'_>, now: Micros) -> Result<(bool, UpstreamState), StoreError> {
        let Release { upstream, lease, error, latency, cfg } = *r;
        let mut args = vec![
            "complete".to_owned(),
            self.clock_arg(now).to_string(),
            lease.to_owned(),
            u8::from(error).to_string(),
            cfg.lease_ttl.to_string(),
        ];
        args.extend(breaker_args(cfg));
        args.push(latency.to_string());
        args.extend(adaptive_args(cfg));
        args.push(cfg.concurrency_limit.to_string());
        let reply = self.traffic_call(upstream, &args).await?;
        let [released, in_use, queued, mode, limit] = reply[..] else {
            return Err(StoreError::Script(format!("traffic.lua complete answered {r:?}")));
        };
        let occupied = UpstreamState {
            in_use: count(in_use),
            queued: count(queued),
            mode: Mode::from_code(count(mode)),
            limit: count(limit),
        };
        Ok((released == 1, occupied))
    }

    async fn apply(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        let (verdicts, ()) = self
            .through_cache(ops, now, async {
                let (verdicts, replies) = self.apply_in_store(ops, now).await?;
                Ok((verdicts, replies, ()))
            })
            .await?;
        Ok(verdicts)
    }

    fn watch_freed(&self, wake: std::sync::Arc<dyn Fn(&str) + Send + Sync>) {
        let clients = self.notify.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            for client in clients.iter().cycle() {
                match client.get_async_pubsub().await {
                    Ok(mut pubsub) => match pubsub.subscribe(FREED_CHANNEL).await {
                        Ok(()) => {
                            let mut messages = pubsub.on_message();
                            while let Some(msg) = messages.next().await {
                                if let Ok(up) = msg.get_payload::<String>() {
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
        // on a cluster the upstream's keys sit in a slot of their own
        matches!(self.conns, Conns::Single(_))
    }

    fn over_limit_hits(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        self.over_limit.as_ref().map(OverLimitCache::hits)
    }

    fn timeout(&self) -> Option<Duration> {
        Some(self.timeout)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
