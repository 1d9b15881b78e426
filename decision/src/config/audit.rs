//! `audit`: sinks, masking and checkpoints.

use decision_core::units;

use super::{StoreSettings, Validator, raw};

/// Audit events one sink may have waiting in memory before it spills to disk.
pub const DEFAULT_SINK_QUEUE: usize = 8192;
/// How often the audit chain is checkpointed (the reference: hourly).
pub const DEFAULT_CHECKPOINT_EVERY: &str = "1h";

impl Validator<'_> {
    /// `audit`: sinks, masking, checkpoints.
    pub(super) fn audit(&mut self, a: &raw::RawAudit, store: &StoreSettings) -> crate::audit::AuditSettings {
        use crate::audit::{AuditSettings, Fsync, SinkSettings};
        let mut sinks = Vec::new();
        for (i, s) in a.sinks.iter().enumerate() {
            let path = format!("audit.sinks[{i}]");
            let n =
                usize::from(s.stdout.is_some()) + usize::from(s.file.is_some()) + usize::from(s.redis_stream.is_some());
            if n != 1 {
                self.err(&path, "each sink is exactly one of stdout, file, redis_stream");
                continue;
            }
            if s.stdout.is_some() {
                sinks.push(SinkSettings::Stdout);
            } else if let Some(f) = &s.file {
                let fsync = match f.fsync.as_deref().unwrap_or("interval") {
                    "always" => Fsync::Always,
                    "interval" => Fsync::Interval,
                    "never" => Fsync::Never,
                    other => {
                        self.err(
                            format!("{path}.file.fsync"),
                            format!("{other:?}: expected always, interval or never"),
                        );
                        Fsync::Interval
                    }
                };
                let max_size = f
                    .max_size
                    .as_deref()
                    .and_then(|m| self.parse(&format!("{path}.file.max_size"), units::parse_size(m)));
                sinks.push(SinkSettings::File { path: self.base.join(&f.path), fsync, max_size });
            } else if let Some(r) = &s.redis_stream {
                let url = match (&r.url, store) {
                    (Some(u), _) => u.clone(),
                    (None, StoreSettings::Redis(rs)) if rs.cluster.is_empty() => rs.url.clone(),
                    (None, StoreSettings::Redis(_)) => {
                        self.err(
                            format!("{path}.redis_stream"),
                            "give url: the stream is written to one Redis node, and the store is a Redis Cluster",
                        );
                        String::new()
                    }
                    (None, StoreSettings::Memory) => {
                        self.err(format!("{path}.redis_stream"), "give url: the store is not Redis");
                        String::new()
                    }
                };
                if !url.is_empty() && redis::Client::open(url.as_str()).is_err() {
                    self.err(
                        format!("{path}.redis_stream.url"),
                        format!("invalid Redis URL {:?}", crate::store::redis::redacted(&url)),
                    );
                }
                let ca_file = match store {
                    StoreSettings::Redis(rs) if r.url.is_none() => rs.ca_file.clone(),
                    _ => None,
                };
                if r.key.is_empty() {
                    self.err(format!("{path}.redis_stream.key"), "must not be empty");
                }
                sinks.push(SinkSettings::RedisStream {
                    url,
                    ca_file,
                    key: r.key.clone(),
                    max_len: r.max_len.unwrap_or(1_000_000),
                });
            }
        }
        let every = self.duration("audit.checkpoint_every", a.checkpoint_every.as_deref(), DEFAULT_CHECKPOINT_EVERY);
        if every.is_zero() {
            self.err("audit.checkpoint_every", "must be more than zero");
        }
        let signing_key = a.signing_key.as_ref().and_then(|k| {
            let path = self.base.join(k);
            match crate::audit::checkpoint::load_signing_key(&path) {
                Ok(key) => Some(key),
                Err(e) => {
                    self.err("audit.signing_key", e);
                    None
                }
            }
        });
        let mut anchors = Vec::new();
        for (i, u) in a.anchor_webhooks.iter().enumerate() {
            if let Some(url) = self.parse(&format!("audit.anchor_webhooks[{i}]"), crate::https::Url::parse_web(u)) {
                anchors.push(url);
            }
        }
        AuditSettings {
            sinks,
            mask_headers: a.mask_headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            checkpoint_every: every,
            instance: a.instance.clone().unwrap_or_else(crate::audit::host_name),
            spill_dir: a
                .spill_dir
                .as_ref()
                .map_or_else(|| std::env::temp_dir().join("portcullis-audit"), |d| self.base.join(d)),
            signing_key,
            checkpoint_file: a.checkpoint_file.as_ref().map(|f| self.base.join(f)),
            anchor_webhooks: anchors,
            sink_queue: a.sink_queue.unwrap_or(DEFAULT_SINK_QUEUE).max(1),
        }
    }
}
