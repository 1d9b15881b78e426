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
    /// the prefix its values are made with (a rotation keeps it)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// its values: one, or after a rotation the new one and the old ones until they expire
    pub values: Vec<KeyValue>,
}

/// One value of a key: only its SHA-256 is kept (or, with a pepper, its HMAC-SHA-256 keyed by
/// the pepper, useless to whoever steals the store without the pepper).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyValue {
    /// lower-case hex
    pub sha256: String,
    /// `sha256` is HMAC-SHA-256(pepper, key), not SHA-256(key)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peppered: bool,
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

/// The server-side pepper of store-held key digests (`PORTCULLIS_KEY_PEPPER`, at least 16
/// bytes): a key's digest is then HMAC-SHA-256(pepper, key) (RFC 2104).
#[derive(Clone)]
pub struct Pepper(Arc<[u8]>);

/// The shortest pepper accepted.
pub const MIN_PEPPER_BYTES: usize = 16;

impl Pepper {
    /// None (and a reason) when shorter than `MIN_PEPPER_BYTES`.
    pub fn new(secret: &[u8]) -> Result<Pepper, String> {
        if secret.len() < MIN_PEPPER_BYTES {
            return Err(format!("the key pepper must be at least {MIN_PEPPER_BYTES} bytes"));
        }
        Ok(Pepper(Arc::from(secret)))
    }

    /// HMAC-SHA-256(pepper, key).
    pub fn digest(&self, key: &[u8]) -> [u8; 32] {
        use hmac::{Mac, SimpleHmac};
        let mut mac = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(key);
        mac.finalize().into_bytes().into()
    }
}

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper([REDACTED])")
    }
}

/// The store-held keys compiled against one policy: what that policy's `store_keys` consults.
/// Swapped whole when a key changes. Values digested with the pepper sit in their own table,
/// looked up by the presented key's HMAC.
#[derive(Debug, Default)]
pub struct CompiledKeys {
    table: ArcSwap<ApiKeyTable>,
    peppered: ArcSwap<ApiKeyTable>,
    pepper: Option<Pepper>,
}

impl CompiledKeys {
    /// An empty directory that digests presented keys with `pepper` too.
    pub fn with_pepper(pepper: Option<Pepper>) -> CompiledKeys {
        CompiledKeys { pepper, ..Default::default() }
    }

    /// `records` compiled against `policy` (its roles, with inheritance, and its tiers): the
    /// plain SHA-256 values, then the peppered ones.
    pub fn compile(records: &HashMap<String, KeyRecord>, policy: &Policy) -> (ApiKeyTable, ApiKeyTable) {
        let mut table = ApiKeyTable::new(&policy.api_keys.header);
        let mut peppered = ApiKeyTable::new(&policy.api_keys.header);
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
                let into = if v.peppered { &mut peppered } else { &mut table };
                into.push(ApiKey {
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
        (table, peppered)
    }

    /// Swaps in newly compiled tables (warning once when peppered values cannot be matched).
    pub fn install(&self, (table, peppered): (ApiKeyTable, ApiKeyTable)) {
        if !peppered.is_empty() && self.pepper.is_none() {
            tracing::warn!(
                values = peppered.len(),
                "store-held API keys were digested with a pepper this instance does not have (PORTCULLIS_KEY_PEPPER): they are refused here"
            );
        }
        self.table.store(Arc::new(table));
        self.peppered.store(Arc::new(peppered));
    }

    /// The digest a new key's value is stored as, and whether it is peppered.
    pub fn digest_of(&self, key: &str) -> (String, bool) {
        match &self.pepper {
            Some(p) => (decision_core::encode::hex(&p.digest(key.as_bytes())), true),
            None => (crate::keys::hex_digest(key), false),
        }
    }
}

impl KeyDirectory for CompiledKeys {
    fn lookup(&self, presented: &[u8]) -> Option<ApiKey> {
        if let Lookup::Found(k) = self.table.load().lookup(presented) {
            return Some(k.clone());
        }
        let peppered = self.peppered.load();
        match (&self.pepper, peppered.is_empty()) {
            (Some(p), false) => match peppered.lookup_digest(&p.digest(presented)) {
                Lookup::Found(k) => Some(k.clone()),
                Lookup::Unknown => None,
            },
            _ => None,
        }
    }

    fn len(&self) -> usize {
        self.table.load().len() + self.peppered.load().len()
    }
}
