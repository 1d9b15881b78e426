//! The fleet store: every counter in Redis, so any number of portcullis instances agree as if
//! they were one process. A plan is one script call (`lua/apply.lua`, run by EVALSHA and
//! reloaded on NOSCRIPT after a failover or a SCRIPT FLUSH) on one of `pool_size` multiplexed
//! connections, which pipeline concurrent calls; time comes from the Redis server.
//!
//! The script decides `allowed` and stores the new states; it returns the state each operation
//! saw, and the verdict (remaining, reset, retry-after) is recomputed here with the same pure
//! function the memory store uses, so both stores answer alike by construction. A disagreement
//! on `allowed` between the script and the Rust math is reported as an error, never hidden.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use decision_core::decide::Op;
use decision_core::quota::{self, Limit, State, Verdict};
use decision_core::traffic::{Admit, Mode, Occupancy, TrafficConfig};
use decision_core::units::Micros;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{Occupied, Store, StoreError};

/// How a `RedisStore` connects.
#[derive(Clone)]
pub struct RedisSettings {
    /// `redis://[user:password@]host:port[/db]`; the password is never logged
    pub url: String,
    /// the longest one store call may take before `on_store_error` applies
    pub timeout: Duration,
    /// multiplexed connections, used in turn
    pub pool_size: usize,
    /// `rediss://`: CA certificates (PEM) to trust instead of the system's
    pub ca_file: Option<std::path::PathBuf>,
    /// `local_share.expected_instances`: while Redis fails, each limit divided by this, in memory
    pub local_share: Option<u64>,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redacted(&self.url))
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("ca_file", &self.ca_file)
            .field("local_share", &self.local_share)
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

pub struct RedisStore {
    client: redis::Client,
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    script: Script,
    traffic: Script,
    timeout: Duration,
    local_share: Option<u64>,
    ready: AtomicBool,
    /// tests only: use the time passed to `apply` instead of the server's clock
    test_clock: bool,
}

impl RedisStore {
    /// Prepares the connections; they are made lazily, so portcullis starts (and reports the
    /// store down on /readyz) while Redis is unreachable, and reconnects on its own.
    pub fn connect(s: &RedisSettings) -> Result<RedisStore, StoreError> {
        let invalid =
            |e: redis::RedisError| StoreError::Unavailable(format!("invalid Redis URL {}: {e}", redacted(&s.url)));
        let client = match &s.ca_file {
            // rediss:// with a private CA; without one, rediss:// trusts the system's roots
            Some(ca) => {
                let pem = std::fs::read(ca)
                    .map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", ca.display())))?;
                let certs = redis::TlsCertificates { client_tls: None, root_cert: Some(pem) };
                redis::Client::build_with_tls(s.url.as_str(), certs).map_err(invalid)?
            }
            None => redis::Client::open(s.url.as_str()).map_err(invalid)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(s.timeout))
            .set_connection_timeout(Some(s.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut conns = Vec::with_capacity(s.pool_size.max(1));
        for _ in 0..s.pool_size.max(1) {
            let c = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            conns.push(c);
        }
        Ok(RedisStore {
            client,
            conns,
            next: AtomicUsize::new(0),
            script: Script::new(concat!(include_str!("lua/common.lua"), include_str!("lua/apply.lua"))),
            traffic: Script::new(concat!(include_str!("lua/common.lua"), include_str!("lua/traffic.lua"))),
            timeout: s.timeout,
            local_share: s.local_share,
            ready: AtomicBool::new(false),
            test_clock: false,
        })
    }

    /// Tests only: time comes from `apply`'s argument, so scenarios can step through windows.
    pub fn with_test_clock(mut self) -> Self {
        self.test_clock = true;
        self
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// Checks the server (PING) and records whether it answered; for /readyz.
    pub async fn probe(&self) -> bool {
        let mut c = self.conn();
        let ok = matches!(
            tokio::time::timeout(
                self.timeout.max(Duration::from_millis(250)),
                redis::cmd("PING").query_async::<String>(&mut c)
            )
            .await,
            Ok(Ok(_))
        );
        self.ready.store(ok, Ordering::Relaxed);
        ok
    }
}

fn decode(reply: &[i64], ops: &[Op]) -> Result<Vec<Verdict>, StoreError> {
    if reply.len() != 2 + 4 * ops.len() {
        return Err(StoreError::Script(format!("reply of {} values for {} operations", reply.len(), ops.len())));
    }
    let now = u64::try_from(reply[0]).map_err(|_| StoreError::Script("negative server time".into()))?;
    let mut verdicts = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let r = &reply[2 + 4 * i..6 + 4 * i];
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        let state = (r[1] >= 0).then(|| match op.limit {
            Limit::TokenBucket { .. } | Limit::Flag { .. } => State::Bucket { tat: u(r[1]) },
            _ => State::Window { start: u(r[1]), prev: u(r[2]), cur: u(r[3]) },
        });
        let checked = quota::check(op.limit, state, op.cost, now as Micros);
        if checked.verdict.allowed != (r[0] == 1) {
            return Err(StoreError::Script(format!(
                "the script and the quota math disagree on operation {i} ({:?}, state {state:?}, now {now})",
                op.limit
            )));
        }
        verdicts.push(checked.verdict);
    }
    Ok(verdicts)
}

impl RedisStore {
    fn clock_arg(&self, now: Micros) -> i64 {
        if self.test_clock { i64::try_from(now).unwrap_or(i64::MAX) } else { -1 }
    }

    /// One traffic.lua call for `upstream` (a short hex key; its three keys share a hash tag).
    async fn traffic_call(&self, upstream: &str, args: &[String]) -> Result<Vec<i64>, StoreError> {
        let mut inv = self.traffic.prepare_invoke();
        for part in ["slots", "queue", "breaker"] {
            inv.key(format!("pc:{{up:{upstream}}}:{part}"));
        }
        for a in args {
            inv.arg(a.as_str());
        }
        self.invoke(&inv).await
    }

    /// One script call on the next connection; records whether the server answered.
    async fn invoke(&self, inv: &redis::ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn();
        let answered = inv.invoke_async::<Vec<i64>>(&mut conn).await;
        self.ready.store(answered.is_ok(), Ordering::Relaxed);
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

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Store for RedisStore {
    async fn admit(
        &self,
        upstream: &str,
        lease: &str,
        waiter: &str,
        returning: bool,
        cfg: &TrafficConfig,
        now: Micros,
    ) -> Result<(Admit, Occupied), StoreError> {
        let mut args = vec![
            "admit".to_owned(),
            self.clock_arg(now).to_string(),
            lease.to_owned(),
            waiter.to_owned(),
            u8::from(returning).to_string(),
            cfg.concurrency_limit.to_string(),
            cfg.queue_size.to_string(),
            cfg.queue_timeout.to_string(),
            cfg.lease_ttl.to_string(),
        ];
        args.extend(breaker_args(cfg));
        args.extend(adaptive_args(cfg));
        let r = self.traffic_call(upstream, &args).await?;
        let [code, a, b, c, in_use, queued, mode, limit] = r[..] else {
            return Err(StoreError::Script(format!("traffic.lua admit answered {r:?}")));
        };
        let occupied = Occupied {
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

    async fn leave(&self, upstream: &str, waiter: &str) -> Result<(), StoreError> {
        self.traffic_call(upstream, &["leave".to_owned(), "-1".to_owned(), waiter.to_owned()]).await.map(|_| ())
    }

    async fn complete(
        &self,
        upstream: &str,
        lease: &str,
        error: bool,
        latency: Micros,
        cfg: &TrafficConfig,
        now: Micros,
    ) -> Result<(bool, Occupied), StoreError> {
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
        let r = self.traffic_call(upstream, &args).await?;
        let [released, in_use, queued, mode, limit] = r[..] else {
            return Err(StoreError::Script(format!("traffic.lua complete answered {r:?}")));
        };
        let occupied = Occupied {
            in_use: count(in_use),
            queued: count(queued),
            mode: Mode::from_code(count(mode)),
            limit: count(limit),
        };
        Ok((released == 1, occupied))
    }

    async fn apply(&self, ops: &[Op], now: Micros) -> Result<Vec<Verdict>, StoreError> {
        let mut inv = self.script.prepare_invoke();
        for op in ops {
            inv.key(op.key.as_str());
        }
        inv.arg(if self.test_clock { i64::try_from(now).unwrap_or(i64::MAX) } else { -1 });
        for op in ops {
            let (kind, a, b) = match op.limit {
                Limit::TokenBucket { burst, interval } => ("b", burst, interval),
                Limit::SlidingWindow { limit, window } => ("s", limit, window),
                Limit::FixedWindow { limit, window } => ("f", limit, window),
                Limit::Flag { duration } => ("k", 0, duration),
            };
            inv.arg(kind).arg(a).arg(b).arg(op.cost).arg(u8::from(op.shadow));
        }
        decode(&self.invoke(&inv).await?, ops)
    }

    fn watch_freed(&self, wake: std::sync::Arc<dyn Fn(&str) + Send + Sync>) {
        let client = self.client.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            loop {
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

    fn local_share(&self) -> Option<u64> {
        self.local_share
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
