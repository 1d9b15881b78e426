//! What the admin API asks of the engine: addresses blocked, listed and unblocked; a subject's
//! usage read, granted and reset. Each is one store call (two for an unblock: the address's
//! keys, then the blocks index, which sit in different hash slots), bounded by the store's
//! timeout, and never on a decision's path.

use std::net::IpAddr;
use std::sync::Arc;

use decision_core::decide::{auth_failure_key, block_key, revocation_key, tier_ops};
use decision_core::plan::{Op, OpKind};
use decision_core::policy::{Policy, Tier};
use decision_core::quota::{Limit, Verdict};
use decision_core::units::Micros;

use super::Engine;
use crate::admin::keys::{CompiledKeys, KeyRecord, KeyValue, parse_record};
use crate::clock;
use crate::store::{Store, StoreError};

/// One of a subject's limits as it stands (`GetUsage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitUsage {
    pub kind: OpKind,
    pub limit: Limit,
    /// what a request of cost 0 sees: remaining now, and the time until the limit is whole
    pub verdict: Verdict,
}

impl<S: Store> Engine<S> {
    /// Raises an address's block (`raise`: a block flag operation with its duration) and notes
    /// it in the blocks index. Returns when the block ends (this instance's clock). A failure to
    /// note it is logged: the block itself stands.
    pub(super) async fn raise_block(&self, raise: &Op, ip: IpAddr, now: Micros) -> Result<Micros, StoreError> {
        let planned = self.apply(std::slice::from_ref(raise), now, None, None).await?;
        let until = now.saturating_add(planned.verdicts.first().map_or(0, |v| v.reset));
        if let Err(e) = self.bounded(self.store.note_block(&ip.to_string(), until, now), None).await {
            tracing::warn!(client_ip = %ip, error = %e, "a block was raised but not listed in the blocks index");
        }
        Ok(until)
    }

    /// Blocks `ip` fleet-wide for `duration` (or until an existing longer block ends): when it
    /// ends. Errors: the store failed.
    pub async fn block_address(&self, ip: IpAddr, duration: Micros) -> Result<Micros, StoreError> {
        let raise =
            Op { key: block_key(ip), limit: Limit::Flag { duration }, cost: 1, kind: OpKind::Block, shadow: false };
        let now = clock::now_micros();
        // the store itself, never local shares: an operator is told whether the fleet has it
        let verdicts = self.bounded(self.store.apply(std::slice::from_ref(&raise), now), None).await?;
        let until = now.saturating_add(verdicts.first().map_or(0, |v| v.reset));
        self.bounded(self.store.note_block(&ip.to_string(), until, now), None).await?;
        Ok(until)
    }

    /// Lifts `ip`'s block and forgets its failed authentications, fleet-wide: whether it was
    /// blocked (as the blocks index knew it).
    pub async fn unblock_address(&self, ip: IpAddr) -> Result<bool, StoreError> {
        self.bounded(self.store.forget(&[block_key(ip), auth_failure_key(ip)]), None).await?;
        self.bounded(self.store.unnote_block(&ip.to_string(), clock::now_micros()), None).await
    }

    /// Every address blocked now, with when its block ends, soonest first.
    pub async fn blocked_addresses(&self) -> Result<Vec<(String, Micros)>, StoreError> {
        self.bounded(self.store.blocks(clock::now_micros()), None).await
    }

    /// `subject`'s tier limits as they stand, counting nothing.
    pub async fn usage(&self, subject: &str, tier: &Tier) -> Result<Vec<LimitUsage>, StoreError> {
        let ops = tier_ops(subject, tier, 0);
        // the store itself, never local shares: what the fleet has counted
        let verdicts = self.bounded(self.store.dry_run(&ops, clock::now_micros()), None).await?;
        Ok(ops
            .iter()
            .zip(verdicts)
            .map(|(op, verdict)| LimitUsage { kind: op.kind, limit: op.limit, verdict })
            .collect())
    }

    /// Gives `amount` units of `subject`'s `which` limit back for now (never past the whole
    /// quota), fleet-wide.
    pub async fn grant_usage(&self, subject: &str, tier: &Tier, which: OpKind, amount: u64) -> Result<(), StoreError> {
        let counters: Vec<(String, Limit)> =
            tier_ops(subject, tier, 0).into_iter().filter(|op| op.kind == which).map(|op| (op.key, op.limit)).collect();
        let delta = i64::try_from(amount).map_or(i64::MIN, |a| -a);
        self.bounded(self.store.adjust(&counters, delta, clock::now_micros()), None).await
    }

    /// Forgets what `subject` used of `which` limit (None: both), fleet-wide.
    pub async fn reset_usage(&self, subject: &str, tier: &Tier, which: Option<OpKind>) -> Result<u64, StoreError> {
        let keys: Vec<String> = tier_ops(subject, tier, 0)
            .into_iter()
            .filter(|op| which.is_none_or(|w| op.kind == w))
            .map(|op| op.key)
            .collect();
        self.bounded(self.store.forget(&keys), None).await
    }

    /// Revokes the bearer token `token_id` of `subject` until `until` (this instance's clock):
    /// every instance refuses it, 401 `token_revoked`, in the request's own store call.
    pub async fn revoke_token(&self, subject: &str, token_id: &str, until: Micros) -> Result<(), StoreError> {
        let now = clock::now_micros();
        let raise = Op {
            key: revocation_key(subject, token_id),
            limit: Limit::Flag { duration: until.saturating_sub(now).max(1) },
            cost: 1,
            kind: OpKind::Revocation,
            shadow: false,
        };
        self.bounded(self.store.apply(std::slice::from_ref(&raise), now), None).await.map(|_| ())
    }
}

/// The store-held API keys as this instance last read them.
#[derive(Debug, Default)]
pub struct KeyState {
    pub records: std::collections::HashMap<String, KeyRecord>,
    /// the store's version of the records when they were last read whole
    pub version: Option<u64>,
}

pub(super) fn lock_keys(m: &std::sync::Mutex<KeyState>) -> std::sync::MutexGuard<'_, KeyState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `policy` with the store-held keys `records` compiled against it, and that compiled copy.
pub(super) fn with_store_keys(
    policy: &Arc<Policy>,
    records: &std::collections::HashMap<String, KeyRecord>,
    pepper: Option<crate::admin::keys::Pepper>,
) -> (Arc<Policy>, Arc<CompiledKeys>) {
    let compiled = Arc::new(CompiledKeys::with_pepper(pepper));
    compiled.install(CompiledKeys::compile(records, policy));
    let mut p = Policy::clone(policy);
    p.store_keys = Some(compiled.clone());
    (Arc::new(p), compiled)
}

/// Why an API key could not be created, rotated or revoked.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no API key {0:?} in the store")]
    NotFound(String),
    #[error("an API key {0:?} already exists")]
    Exists(String),
    #[error("the API key {0:?} is in the policy file, which is read-only here")]
    InPolicy(String),
    #[error("the API key {0:?} changed meanwhile; try again")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a new key is made of: its id, roles and tier (names of the policy), validity, labels.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub id: String,
    pub roles: Vec<String>,
    pub tier: String,
    pub not_before: Option<Micros>,
    pub expires_at: Option<Micros>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub prefix: String,
}

/// The prefix of a new key: letters, digits and '_', at most 32 (default "pk").
fn key_prefix(prefix: &str) -> Result<&str, KeyError> {
    let p = if prefix.is_empty() { "pk" } else { prefix };
    if p.len() > 32 || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(KeyError::Invalid("prefix: at most 32 letters, digits or '_'".into()));
    }
    Ok(p)
}

/// A new random key with `prefix` and the record value of its digest (peppered when `keys`
/// has a pepper).
fn new_value(
    keys: &CompiledKeys,
    prefix: &str,
    not_before: Option<Micros>,
    expires_at: Option<Micros>,
) -> Result<(String, KeyValue), KeyError> {
    let key = crate::keys::generate(prefix).map_err(|e| KeyError::Invalid(format!("no random key: {e}")))?;
    let (sha256, peppered) = keys.digest_of(&key);
    Ok((key, KeyValue { sha256, peppered, not_before, expires_at }))
}

/// Longest key id (as the policy file's ids); at most 16 labels of 64 bytes.
pub const MAX_KEY_ID: usize = 64;
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_BYTES: usize = 64;
/// The longest overlap a rotation grants the old values.
pub const MAX_ROTATION_OVERLAP: Micros = 30 * 24 * 3600 * 1_000_000;

impl<S: Store> Engine<S> {
    /// Digests store-held keys with `pepper` from now on (the server sets it once, before
    /// serving, from `PORTCULLIS_KEY_PEPPER`).
    pub fn set_key_pepper(&self, pepper: crate::admin::keys::Pepper) {
        let _ = self.pepper.set(pepper);
        let keys = lock_keys(&self.keys);
        let (policy, compiled) = with_store_keys(&self.policy(), &keys.records, self.pepper.get().cloned());
        self.keys_in_force.store(compiled);
        self.policy.store(policy);
    }

    /// Reads every store-held key and recompiles them against the policy in force, when they
    /// changed since the last read (their version), or always with `force` (at start, after a
    /// reconnection); every `KEY_RESYNC_EVERY` for a change whose announcement was missed.
    /// Reads, reloads and writes of key records run one at a time, so an older read is never
    /// installed over a newer one. Returns how many records there are.
    pub async fn load_keys(&self, force: bool) -> Result<usize, StoreError> {
        let _io = self.key_io.lock().await;
        let version = self.bounded(self.store.keys_version(), None).await?;
        if !force && lock_keys(&self.keys).version == Some(version) {
            return Ok(lock_keys(&self.keys).records.len());
        }
        let all = tokio::time::timeout(KEY_LOAD_TIMEOUT, self.store.key_records())
            .await
            .map_err(|_| StoreError::Timeout(KEY_LOAD_TIMEOUT))??;
        let records: std::collections::HashMap<String, KeyRecord> =
            all.into_iter().filter_map(|(id, text)| parse_record(&id, &text).map(|r| (id, r))).collect();
        let n = records.len();
        let mut keys = lock_keys(&self.keys);
        keys.version = Some(version);
        if keys.records != records {
            keys.records = records;
            self.keys_in_force.load().install(CompiledKeys::compile(&keys.records, &self.policy()));
        }
        Ok(n)
    }

    /// Reads one store-held key again (another instance announced a change).
    pub async fn reload_key(&self, id: &str) -> Result<(), StoreError> {
        let _io = self.key_io.lock().await;
        let text = self.bounded(self.store.key_record(id), None).await?;
        let mut keys = lock_keys(&self.keys);
        let record = text.as_deref().and_then(|t| parse_record(id, t));
        if keys.records.get(id) == record.as_ref() {
            return Ok(());
        }
        match record {
            Some(r) => keys.records.insert(id.to_owned(), r),
            None => keys.records.remove(id),
        };
        self.keys_in_force.load().install(CompiledKeys::compile(&keys.records, &self.policy()));
        Ok(())
    }

    /// Writes `record` for `id` if the store still holds `expected`, then takes it in here at
    /// once (other instances on the store's announcement).
    async fn put_key(&self, id: &str, record: &KeyRecord, expected: Option<&str>) -> Result<(), KeyError> {
        let _io = self.key_io.lock().await;
        let text = record.to_json();
        let written = self.bounded(self.store.put_key_record(id, &text, expected), None).await?;
        if !written {
            return Err(if expected.is_none() { KeyError::Exists(id.into()) } else { KeyError::Conflict(id.into()) });
        }
        let mut keys = lock_keys(&self.keys);
        keys.records.insert(id.to_owned(), record.clone());
        self.keys_in_force.load().install(CompiledKeys::compile(&keys.records, &self.policy()));
        Ok(())
    }

    /// Issues a key kept in the store: the key (shown once) and its record.
    pub async fn create_key(&self, new: NewKey) -> Result<(String, KeyRecord), KeyError> {
        let policy = self.policy();
        let id_ok = !new.id.is_empty()
            && new.id.len() <= MAX_KEY_ID
            && new.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !id_ok {
            return Err(KeyError::Invalid("id: 1 to 64 letters, digits, '-', '_' or '.'".into()));
        }
        if policy.api_keys.tier_of(&new.id).is_some() {
            return Err(KeyError::InPolicy(new.id));
        }
        if policy.tier(&new.tier).is_none() {
            return Err(KeyError::Invalid(format!("tier: no tier {:?} in the policy", new.tier)));
        }
        if new.roles.is_empty() {
            return Err(KeyError::Invalid("roles: at least one role of the policy".into()));
        }
        if let Some(r) = new.roles.iter().find(|r| policy.roles.granted(r).is_none()) {
            return Err(KeyError::Invalid(format!("roles: no role {r:?} in the policy")));
        }
        if let (Some(nb), Some(exp)) = (new.not_before, new.expires_at)
            && exp <= nb
        {
            return Err(KeyError::Invalid("expires_at: must be after not_before".into()));
        }
        let now = clock::now_micros();
        if new.expires_at.is_some_and(|e| e <= now) {
            return Err(KeyError::Invalid("expires_at: already past".into()));
        }
        if new.labels.len() > MAX_LABELS
            || new.labels.iter().any(|(k, v)| {
                k.is_empty()
                    || k.len() > MAX_LABEL_BYTES
                    || v.len() > MAX_LABEL_BYTES
                    || !decision_core::fields::valid_value(k.as_bytes())
                    || !decision_core::fields::valid_value(v.as_bytes())
            })
        {
            return Err(KeyError::Invalid("labels: at most 16, names and values of 1 to 64 printable bytes".into()));
        }
        let (key, value) =
            new_value(&self.keys_in_force.load(), key_prefix(&new.prefix)?, new.not_before, new.expires_at)?;
        let record = KeyRecord {
            roles: new.roles,
            tier: new.tier,
            labels: new.labels,
            created: now,
            revoked: false,
            prefix: Some(key_prefix(&new.prefix)?.to_owned()),
            values: vec![value],
        };
        self.put_key(&new.id, &record, None).await?;
        Ok((key, record))
    }

    /// A new value for a store-held key; its current values keep working until `old_until`
    /// (never later than they would have). The new key and the record.
    pub async fn rotate_key(&self, id: &str, old_until: Micros, prefix: &str) -> Result<(String, KeyRecord), KeyError> {
        let now = clock::now_micros();
        if old_until <= now || old_until > now.saturating_add(MAX_ROTATION_OVERLAP) {
            return Err(KeyError::Invalid("old_expires_at: after now, and at most 30 days from now".into()));
        }
        let (current, mut record) = self.key_of(id).await?;
        // the key's own prefix unless another is asked for
        let prefix = match (prefix.is_empty(), &record.prefix) {
            (true, Some(own)) => key_prefix(own)?.to_owned(),
            _ => key_prefix(prefix)?.to_owned(),
        };
        let prefix = prefix.as_str();
        if record.revoked {
            return Err(KeyError::Invalid(format!("the API key {id:?} is revoked: create a new one")));
        }
        // the key's own end: none if any live value never expires, else the latest
        let live = record.values.iter().filter(|v| v.expires_at.is_none_or(|e| e > now));
        let expires_at = live.map(|v| v.expires_at).try_fold(0, |m: Micros, e| e.map(|e| m.max(e)));
        for v in &mut record.values {
            v.expires_at = Some(v.expires_at.map_or(old_until, |e| e.min(old_until)));
        }
        // values already expired are dropped
        record.values.retain(|v| v.expires_at.is_none_or(|e| e > now));
        let (key, value) = new_value(&self.keys_in_force.load(), prefix, None, expires_at.filter(|e| *e > old_until))?;
        record.values.push(value);
        self.put_key(id, &record, Some(&current)).await?;
        Ok((key, record))
    }

    /// Revokes a store-held key: every value refused, `api_key_revoked`, from now on.
    pub async fn revoke_key(&self, id: &str) -> Result<KeyRecord, KeyError> {
        let (current, mut record) = self.key_of(id).await?;
        record.revoked = true;
        self.put_key(id, &record, Some(&current)).await?;
        Ok(record)
    }

    /// A store-held key's record as stored (its text, for the conditional write) and read.
    async fn key_of(&self, id: &str) -> Result<(String, KeyRecord), KeyError> {
        if self.policy().api_keys.tier_of(id).is_some() {
            return Err(KeyError::InPolicy(id.into()));
        }
        let text = self.bounded(self.store.key_record(id), None).await?.ok_or_else(|| KeyError::NotFound(id.into()))?;
        let record =
            parse_record(id, &text).ok_or_else(|| KeyError::Invalid(format!("the record of {id:?} cannot be read")))?;
        Ok((text, record))
    }

    /// The tier a store-held key names, as this instance holds it (None: no such key).
    pub fn store_key_tier(&self, id: &str) -> Option<String> {
        lock_keys(&self.keys).records.get(id).map(|r| r.tier.clone())
    }

    /// Every store-held key, as this instance holds them (read again from the store first).
    pub async fn store_keys(&self) -> Result<Vec<(String, KeyRecord)>, StoreError> {
        self.load_keys(false).await?;
        let keys = lock_keys(&self.keys);
        let mut all: Vec<(String, KeyRecord)> = keys.records.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

/// How often every instance checks whether the store-held keys changed (their version) and
/// reads them again if so, for a change announcement it missed (a dropped subscription is
/// also followed by a full read).
pub const KEY_RESYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// The longest a full read of the store-held keys may take (a page at a time, each page one
/// short store call).
pub const KEY_LOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
