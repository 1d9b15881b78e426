//! `store`: the embedded memory store, or Redis (one node or a cluster), with the reference
//! policy's timeout and our pool and over-limit cache defaults.

use decision_core::units;

use super::{Validator, raw};

/// Where counters live.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// the embedded default: this process only
    Memory,
    /// shared by the fleet
    Redis(crate::store::RedisSettings),
}
/// The reference policy's per-call Redis timeout.
pub const DEFAULT_REDIS_TIMEOUT: &str = "25ms";
pub const DEFAULT_REDIS_POOL_SIZE: u32 = 4;
pub const MAX_REDIS_POOL_SIZE: u32 = 256;
/// Refused plans the Redis store remembers (about 100 bytes each, plus the keys' states).
pub const DEFAULT_OVER_LIMIT_CACHE: u64 = 100_000;
pub const MAX_OVER_LIMIT_CACHE: u64 = 10_000_000;

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: Option<&raw::RawStore>) -> StoreSettings {
        let Some(store) = raw else { return StoreSettings::Memory };
        if store.memory.is_some() && store.redis.is_some() {
            self.err("store", "choose one store: memory or redis");
        }
        let Some(r) = &store.redis else { return StoreSettings::Memory };
        let cluster = r.cluster.clone().unwrap_or_default();
        let (url, nodes) = match (&r.url, r.cluster.is_some()) {
            (Some(_), true) => {
                self.err("store.redis", "choose one of url (a single node) and cluster (Redis Cluster nodes)");
                (String::new(), Vec::new())
            }
            (None, false) => {
                self.err("store.redis", "url (a single node) or cluster (Redis Cluster nodes) is required");
                (String::new(), Vec::new())
            }
            (Some(url), false) => {
                self.redis_url("store.redis.url", url);
                (url.clone(), Vec::new())
            }
            (None, true) => {
                if cluster.is_empty() {
                    self.err("store.redis.cluster", "list at least one node of the cluster");
                }
                for (i, u) in cluster.iter().enumerate() {
                    self.redis_url(&format!("store.redis.cluster[{i}]"), u);
                }
                if cluster.iter().any(|u| u.starts_with("rediss://"))
                    && !cluster.iter().all(|u| u.starts_with("rediss://"))
                {
                    self.err("store.redis.cluster", "mixes redis:// and rediss:// nodes: use one scheme for all");
                }
                (cluster.first().cloned().unwrap_or_default(), cluster)
            }
        };
        let tls = url.starts_with("rediss://");
        let timeout = self
            .parse("store.redis.timeout", units::parse_duration(r.timeout.as_deref().unwrap_or(DEFAULT_REDIS_TIMEOUT)))
            .unwrap_or(25_000);
        if timeout == 0 {
            self.err("store.redis.timeout", "must be more than 0");
        }
        let pool_size = r.pool_size.unwrap_or(DEFAULT_REDIS_POOL_SIZE);
        if !(1..=MAX_REDIS_POOL_SIZE).contains(&pool_size) {
            self.err("store.redis.pool_size", format!("must be 1 to {MAX_REDIS_POOL_SIZE}"));
        }
        let ca_file = r.ca_file.as_ref().map(|f| self.base.join(f));
        if let Some(f) = &ca_file {
            if !tls {
                self.err("store.redis.ca_file", "a CA file is for TLS: use a rediss:// URL");
            } else {
                match std::fs::read(f) {
                    Ok(bytes) => super::read_source(f, &bytes),
                    Err(e) => self.err("store.redis.ca_file", format!("cannot read {}: {e}", f.display())),
                }
            }
        }
        let over_limit_cache = r.over_limit_cache.unwrap_or(DEFAULT_OVER_LIMIT_CACHE);
        if over_limit_cache > MAX_OVER_LIMIT_CACHE {
            self.err("store.redis.over_limit_cache", format!("must be 0 (off) to {MAX_OVER_LIMIT_CACHE}"));
        }
        let local_share = r.local_share.as_ref().map(|l| l.expected_instances);
        if local_share == Some(0) {
            self.err("store.redis.local_share.expected_instances", "must be at least 1");
        }
        StoreSettings::Redis(crate::store::RedisSettings {
            url,
            cluster: nodes,
            timeout: std::time::Duration::from_micros(timeout),
            pool_size: pool_size as usize,
            ca_file,
            local_share,
            over_limit_cache: usize::try_from(over_limit_cache).unwrap_or(usize::MAX),
        })
    }

    pub(super) fn redis_url(&mut self, path: &str, url: &str) {
        let shown = crate::store::redis::redacted(url);
        if !url.starts_with("redis://") && !url.starts_with("rediss://") {
            self.err(
                path,
                format!("invalid Redis URL {shown:?}: expected redis://[user:password@]host:port[/db] or rediss://... for TLS"),
            );
        } else if redis::Client::open(url).is_err() {
            self.err(path, format!("invalid Redis URL {shown:?}"));
        }
    }
}
