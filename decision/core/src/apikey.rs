//! API keys: only SHA-256 digests are held. A presented key is hashed, candidates are found by
//! the digest's first 8 bytes, and the full digest is compared in constant time (`subtle`), so
//! neither the table's layout nor the comparison tells an attacker how close a guess was.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Arc<str>,
    pub digest: [u8; 32],
    /// granted role bits (with inheritance)
    pub roles: u64,
    pub tier: usize,
    pub revoked: bool,
    /// valid from (for a rotation: the new key may be listed before it is handed out)
    pub not_before: Option<crate::units::Micros>,
    /// valid until (for a rotation: the old key keeps working until then)
    pub expires_at: Option<crate::units::Micros>,
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeyTable {
    /// lower-case header name the key is read from
    pub header: String,
    keys: Vec<ApiKey>,
    by_prefix: HashMap<u64, Vec<usize>>,
}

pub enum Lookup<'a> {
    Found(&'a ApiKey),
    Unknown,
}

/// API keys kept outside the policy file (the store's, issued through the admin API), as the
/// host compiled them against the policy in force; the core consults it after the policy's own
/// table. Implementations compare digests in constant time, as `ApiKeyTable::lookup` does.
pub trait KeyDirectory: Send + Sync + std::fmt::Debug {
    /// The key `presented` is, if the directory holds it (revoked ones included, so that they
    /// are refused as such).
    fn lookup(&self, presented: &[u8]) -> Option<ApiKey>;

    /// How many key values it holds.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses a 64-hex-digit SHA-256 digest.
pub fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("invalid SHA-256 digest {hex:?}: expected 64 hexadecimal digits");
    let b = hex.as_bytes();
    if b.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn prefix(d: &[u8; 32]) -> u64 {
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

impl ApiKeyTable {
    pub fn new(header: &str) -> Self {
        ApiKeyTable { header: header.to_ascii_lowercase(), ..Default::default() }
    }

    pub fn push(&mut self, key: ApiKey) {
        self.by_prefix.entry(prefix(&key.digest)).or_default().push(self.keys.len());
        self.keys.push(key);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Every key, in the order pushed (the admin API's list; never on a decision's path).
    pub fn keys(&self) -> impl Iterator<Item = &ApiKey> {
        self.keys.iter()
    }

    /// The tier index of the key with this id, if the table has one (the admin API's usage
    /// calls, by id; never on a decision's path).
    pub fn tier_of(&self, id: &str) -> Option<usize> {
        self.keys.iter().find(|k| &*k.id == id).map(|k| k.tier)
    }

    pub fn lookup(&self, presented: &[u8]) -> Lookup<'_> {
        self.lookup_digest(&digest(presented))
    }

    /// The key whose digest is `d` (a digest the host computed otherwise: the store-held keys'
    /// peppered HMAC), compared in constant time as `lookup` does.
    pub fn lookup_digest(&self, d: &[u8; 32]) -> Lookup<'_> {
        let d = *d;
        let mut found = None;
        if let Some(candidates) = self.by_prefix.get(&prefix(&d)) {
            for &i in candidates {
                if bool::from(self.keys[i].digest.ct_eq(&d)) {
                    found = Some(&self.keys[i]);
                }
            }
        }
        found.map_or(Lookup::Unknown, Lookup::Found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_only_as_64_hex_digits() {
        let d =
            parse_digest("43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba").expect("reference digest");
        assert_eq!(d, digest(b"pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo"));
        for bad in [
            "",
            "43089ad2",
            "zz089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba",
            "43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba00",
        ] {
            assert!(parse_digest(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lookup_finds_the_key_by_its_digest_and_nothing_else() {
        let mut t = ApiKeyTable::new("X-Api-Key");
        assert_eq!(t.header, "x-api-key");
        t.push(ApiKey {
            id: "a".into(),
            digest: digest(b"secret-a"),
            roles: 1,
            tier: 0,
            revoked: false,
            not_before: None,
            expires_at: None,
        });
        t.push(ApiKey {
            id: "b".into(),
            digest: digest(b"secret-b"),
            roles: 2,
            tier: 1,
            revoked: true,
            not_before: None,
            expires_at: None,
        });
        assert!(matches!(t.lookup(b"secret-a"), Lookup::Found(k) if &*k.id == "a"));
        assert!(matches!(t.lookup(b"secret-b"), Lookup::Found(k) if k.revoked));
        assert!(matches!(t.lookup(b"secret-c"), Lookup::Unknown));
        assert!(matches!(t.lookup(b""), Lookup::Unknown));
    }
}
