//! The audit trail: events built with credentials already masked (`event`), chained by SHA-256
//! so that any change, removal, insertion or reordering shows (`chain`), checkpointed and
//! optionally signed (`checkpoint`), written by one writer thread to every sink without blocking
//! a decision and without losing events to a slow sink (`writer`), and verified offline by
//! `portcullis audit verify`.

pub mod chain;
pub mod checkpoint;
pub mod event;
pub mod export;
pub mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use writer::Audit;

/// How often an interval-fsynced file is synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    Always,
    Interval,
    Never,
}

#[derive(Debug, Clone)]
pub enum SinkSettings {
    /// JSON lines on standard output
    Stdout,
    File {
        path: PathBuf,
        fsync: Fsync,
        max_size: Option<u64>,
    },
    /// `XADD key MAXLEN ~ max_len * event <line>`: one stream for the fleet
    RedisStream {
        url: String,
        ca_file: Option<PathBuf>,
        key: String,
        max_len: u64,
    },
}

impl SinkSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkSettings::Stdout => "stdout",
            SinkSettings::File { .. } => "file",
            SinkSettings::RedisStream { .. } => "redis_stream",
        }
    }
}

/// The policy's `audit` section, compiled.
#[derive(Clone)]
pub struct AuditSettings {
    pub sinks: Vec<SinkSettings>,
    /// lower case; the credential headers are masked whatever this says
    pub mask_headers: Vec<String>,
    pub checkpoint_every: Duration,
    pub instance: String,
    pub spill_dir: PathBuf,
    pub signing_key: Option<ed25519_dalek::SigningKey>,
    pub checkpoint_file: Option<PathBuf>,
    pub anchor_webhooks: Vec<crate::https::Url>,
    /// events one sink may have waiting in memory before it spills to disk
    pub sink_queue: usize,
}

impl std::fmt::Debug for AuditSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSettings")
            .field("sinks", &self.sinks)
            .field("instance", &self.instance)
            .field("checkpoint_every", &self.checkpoint_every)
            .field("signing_key", &self.signing_key.as_ref().map(|_| "[REDACTED]"))
            .finish_non_exhaustive()
    }
}

/// This machine's name (`/proc/sys/kernel/hostname`), the default instance name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".to_owned())
}
