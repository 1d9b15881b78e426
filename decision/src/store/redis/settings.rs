//! How a `RedisStore` connects: the settings the policy's `store` section gives, and the URL
//! as it may be logged.

use std::time::Duration;

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
    /// shared multiplexed connections, used in turn by calls made off the gRPC runtimes (the
    /// multi-thread runtime; with per-core runtimes, forward-auth, the admin API, probes); each
    /// current-thread runtime has one connection of its own whatever this says
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

/// A client for `url` as portcullis connects to Redis (the store, and the audit trail's Redis
/// stream sink): `rediss://` trusting `ca_pem` (PEM CA certificates) instead of the system's
/// roots when given, and [`tcp_settings`]. Errors: an invalid URL or certificate.
pub fn client(url: &str, ca_pem: Option<&[u8]>) -> redis::RedisResult<redis::Client> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?.set_tcp_settings(tcp_settings());
    match ca_pem {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
        ),
        None => redis::Client::open(info),
    }
}

/// The TCP options of every connection portcullis makes to Redis: `TCP_NODELAY`. redis-rs leaves Nagle's algorithm on by default,
/// which holds a connection's next pipelined write back until Redis has acknowledged the
/// previous one: up to a round trip, or a delayed ACK, on a real network.
pub fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}
