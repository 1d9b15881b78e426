//! The connections to Redis: `pool_size` multiplexed connections used in turn (each pipelines
//! the calls made on it concurrently), to one node or to a cluster, made lazily so portcullis
//! starts while Redis is unreachable and reconnects on its own. To one node, each per-core
//! runtime (`crate::connections`), or a process's only current-thread runtime, also gets one
//! connection of its own, made and connected on it as it starts (`Pool::warm_up`), so its I/O
//! runs on the thread that makes the call (a call on another runtime's connection woke that
//! thread twice) and its first call does not wait for a connection. One, not a share of
//! `pool_size`: every call that runtime makes is pipelined on it, and Redis reads and answers
//! them in one batch, where more connections from one thread only split the batches (measured
//! on one core: 4 connections did up to 18% fewer Redis decisions a second than 1, and took
//! 7-14% more of portcullis's CPU per decision).
//! The `pool_size` shared ones serve calls made elsewhere (the multi-thread runtime; with
//! per-core runtimes, forward-auth, the admin API, probes). A cluster's connections are all
//! shared.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::settings::{RedisSettings, redacted, tcp_settings};
use crate::store::StoreError;

/// Multiplexed connections, used in turn.
enum Conns {
    Single(Vec<ConnectionManager>),
    /// each one knows the whole cluster: it routes a call by its first key's hash slot, follows MOVED
    /// and ASK, and learns the new layout after a failover
    Cluster(Vec<ClusterConnection>),
}

/// The connections of one store, and the clients its freed-slot subscription uses.
pub(super) struct Pool {
    conns: Conns,
    next: AtomicUsize,
    /// to one node: how to make more connections, for each runtime's own
    single: Option<(redis::Client, ConnectionManagerConfig)>,
    /// each runtime's own connection (per core, or the only one), made on it; `None` inside when
    /// it could not be made (the shared ones serve that runtime then)
    per_runtime: OnceLock<Vec<OnceLock<Option<ConnectionManager>>>>,
    /// where to subscribe to the freed-slot notifications: the node, or each cluster node in turn
    /// (a cluster delivers a PUBLISH to subscribers on every node)
    pub notify: Vec<redis::Client>,
    /// how long a probe may take (the store timeout, at least 250 ms)
    probe_timeout: Duration,
}

impl Pool {
    /// Prepares the connections of `s` (none is made yet). Errors: an invalid URL, or a `ca_file`
    /// that cannot be read.
    pub fn open(s: &RedisSettings) -> Result<Pool, StoreError> {
        let invalid = |url: &str, e: redis::RedisError| {
            StoreError::Unavailable(format!("invalid Redis URL {}: {e}", redacted(url)))
        };
        // rediss:// with a private CA; without one, rediss:// trusts the system's roots
        let pem = match &s.ca_file {
            Some(ca) => Some(
                std::fs::read(ca).map_err(|e| StoreError::Unavailable(format!("cannot read {}: {e}", ca.display())))?,
            ),
            None => None,
        };
        let client = |url: &str| super::settings::client(url, pem.as_deref()).map_err(|e| invalid(url, e));
        let connect_timeout = s.timeout.max(Duration::from_millis(250));
        let pool = s.pool_size.max(1);
        let mut single = None;
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
            single = Some((client.clone(), config));
            (vec![client], Conns::Single(conns))
        } else {
            let mut builder = redis::cluster::ClusterClientBuilder::new(s.cluster.iter().map(String::as_str))
                .connection_timeout(connect_timeout)
                .response_timeout(s.timeout)
                .tcp_settings(tcp_settings())
                .retries(2);
            if let Some(pem) = &pem {
                builder = builder.certs(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) });
            }
            let cluster = builder.build().map_err(|e| invalid(&s.cluster[0], e))?;
            let config = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(s.timeout);
            let conns = (0..pool).map(|_| cluster.get_pending_async_connection_with_config(config.clone())).collect();
            let notify = s.cluster.iter().map(|u| client(u)).collect::<Result<_, _>>()?;
            (notify, Conns::Cluster(conns))
        };
        Ok(Pool {
            conns,
            next: AtomicUsize::new(0),
            single,
            per_runtime: OnceLock::new(),
            notify,
            probe_timeout: connect_timeout,
        })
    }

    /// Whether the connections are to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conns, Conns::Cluster(_))
    }

    /// The index of the connection the next call uses: each in turn (round robin over `n`).
    fn next_connection(&self, n: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }

    /// On a per-core runtime's thread (or the only runtime's), to one node: that runtime's own
    /// connection, made now the first time (`ConnectionManager` runs its I/O on the runtime it is
    /// made on).
    fn own_connection(&self) -> Option<&ConnectionManager> {
        let (index, runtimes) = crate::connections::runtime_index()?;
        let (client, config) = self.single.as_ref()?;
        let own = self.per_runtime.get_or_init(|| (0..runtimes).map(|_| OnceLock::new()).collect());
        own.get(index)?
            .get_or_init(|| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()).ok())
            .as_ref()
    }

    /// The connection to one node a call on this thread uses: its runtime's own (per core, or the
    /// only one), else the next of the shared ones (the multi-thread runtime; with per-core
    /// runtimes, forward-auth, the admin API, probes).
    fn single_conn<'a>(&'a self, shared: &'a [ConnectionManager]) -> &'a ConnectionManager {
        match self.own_connection() {
            Some(own) => own,
            None => &shared[self.next_connection(shared.len())],
        }
    }

    /// One script call on this thread's runtime's own connection (to one node), else on the next
    /// shared one; the reply is a flat list of integers.
    pub async fn invoke<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> redis::RedisResult<T> {
        match &self.conns {
            Conns::Single(c) => inv.invoke_async::<T>(&mut self.single_conn(c).clone()).await,
            Conns::Cluster(c) => inv.invoke_async::<T>(&mut c[self.next_connection(c.len())].clone()).await,
        }
    }

    /// On a runtime's thread (per core, or the only one), to one node: makes its own connection
    /// and connects it now (a PING, within the probe timeout), not on the runtime's first call.
    /// Either outcome is logged at debug with the runtime's index; after a failure the
    /// connection is made again as it is used.
    pub async fn warm_up(&self) {
        let Some(own) = self.own_connection() else { return }; // a cluster's are all shared
        let runtime = crate::connections::runtime_index().map_or(0, |(i, _)| i);
        let ping = async { redis::cmd("PING").query_async::<redis::Value>(&mut own.clone()).await };
        match self.within_probe_timeout(ping).await {
            Ok(()) => tracing::debug!(runtime, "a runtime's own Redis connection is up"),
            Err(e) => tracing::debug!(runtime, error = %e, "a runtime's own Redis connection did not connect at start"),
        }
    }

    /// The server's answer to a PING (on a cluster: every master's), within the probe timeout;
    /// an error says why not (refused, timed out, authentication, TLS, ...).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let ping = redis::cmd("PING");
        let answered = async {
            match &self.conns {
                Conns::Single(c) => ping.query_async::<redis::Value>(&mut self.single_conn(c).clone()).await,
                // every master must answer, each asked by its address: a PING the client routes
                // to one random node, or fans out to the masters it still holds connections to,
                // reports a cluster with a dead master as ready
                Conns::Cluster(c) => ping_every_master(&mut c[self.next_connection(c.len())].clone()).await,
            }
        };
        self.within_probe_timeout(answered).await
    }

    /// A PING's answer within the probe timeout: Ok, or why not (`Unavailable("PING: ...")`, or
    /// `Timeout`).
    async fn within_probe_timeout(
        &self,
        answered: impl Future<Output = redis::RedisResult<redis::Value>>,
    ) -> Result<(), StoreError> {
        match tokio::time::timeout(self.probe_timeout, answered).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("PING: {e}"))),
            Err(_) => Err(StoreError::Timeout(self.probe_timeout)),
        }
    }

    /// How long a probe may take.
    pub fn probe_timeout(&self) -> Duration {
        self.probe_timeout
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
