//! API keys kept in the store (the admin API's `CreateKey`, `RotateKey`, `RevokeKey`): their
//! records, as JSON in the store, and each instance's compiled copy (`CompiledKeys`, the core's
//! `KeyDirectory`), which the core consults after the policy file's own keys. A record names
//! roles and a tier; it is compiled against the policy in force (a reload recompiles it), and a
//! key whose role or tier the policy no longer has is left out, with a warning.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use decision_core::apikey::{ApiKey, ApiKeyTable, KeyDirectory, Lookup, parse_digest};
use decision_core::policy::Policy;
use decision_core::units::Micros;
use serde::{Deserialize, Serialize};

/// One store-held key, as JSON in the store (one per id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub roles: Vec<String>,
    pub tier: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// when it was created (microseconds since the epoch)
    pub created: Micros,
    #[serde(default)]
    pub revoked: bool,
    /// its values: one, or after a rotation the new one and the old ones until they expire
    pub values: Vec<KeyValue>,
}

/// One value of a key: only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValue {
    /// lower-case hex
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Micros>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Micros>,
}

impl KeyRecord {
    /// Values that work now or will (not expired at `now`).
    pub fn live_values(&self, now: Micros) -> usize {
        self.values.iter().filter(|v| v.expires_at.is_none_or(|e| e > now)).count()
    }

    /// The record as stored.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A record from the store's text; None (and a warning) when it cannot be read.
pub fn parse_record(id: &str, text: &str) -> Option<KeyRecord> {
    match serde_json::from_str(text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key_id = id, error = %e, "a store-held API key record cannot be read; it is left out");
            None
        }
    }
}

/// The store-held keys compiled against one policy: what that policy's `store_keys` consults.
/// Swapped whole when a key changes.
#[derive(Debug, Default)]
pub struct CompiledKeys {
    table: ArcSwap<ApiKeyTable>,
}

impl CompiledKeys {
    /// `records` compiled against `policy` (its roles, with inheritance, and its tiers).
    pub fn compile(records: &HashMap<String, KeyRecord>, policy: &Policy) -> ApiKeyTable {
        let mut table = ApiKeyTable::new(&policy.api_keys.header);
        for (id, r) in records {
            let Some(tier) = policy.tier(&r.tier) else {
                tracing::warn!(key_id = %id, tier = %r.tier, "a store-held API key names a tier the policy does not have; it is left out");
                continue;
            };
            let mut roles = 0;
            let mut known = true;
            for name in &r.roles {
                match policy.roles.granted(name) {
                    Some(bits) => roles |= bits,
                    None => known = false,
                }
            }
            if !known {
                tracing::warn!(key_id = %id, "a store-held API key names a role the policy does not have; it is left out");
                continue;
            }
            let id: Arc<str> = Arc::from(id.as_str());
            for v in &r.values {
                let Ok(digest) = parse_digest(&v.sha256) else { continue };
                table.push(ApiKey {
                    id: id.clone(),
                    digest,
                    roles,
                    tier,
                    revoked: r.revoked,
                    not_before: v.not_before,
                    expires_at: v.expires_at,
                });
            }
        }
        table
    }

    /// Swaps in a newly compiled table.
    pub fn install(&self, table: ApiKeyTable) {
        self.table.store(Arc::new(table));
    }
}

impl KeyDirectory for CompiledKeys {
    fn lookup(&self, presented: &[u8]) -> Option<ApiKey> {
        match self.table.load().lookup(presented) {
            Lookup::Found(k) => Some(k.clone()),
            Lookup::Unknown => None,
        }
    }

    fn len(&self) -> usize {
        self.table.load().len()
    }
}
