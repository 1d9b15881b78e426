//! Checkpoints: every `checkpoint_every`, and at shutdown, the writer records a chain's head
//! (`chain`, `seq`, `head`, `time`, `instance`), signed with Ed25519 when the policy names a key.
//! A checkpoint is sealed into the chain itself (an event with `"event": "checkpoint"`), and
//! appended to `checkpoint_file` and POSTed to `anchor_webhooks` when configured, so a copy lives
//! outside the log: a log truncated after a checkpoint is then provably short.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use decision_core::encode::{b64url, b64url_decode, hex};

/// Reads a PKCS#8 PEM Ed25519 private key (`openssl genpkey -algorithm ED25519`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| format!("{}: not a PKCS#8 PEM Ed25519 private key: {e}", path.display()))
}

/// Reads a SPKI PEM Ed25519 public key (`openssl pkey -pubout`).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|e| format!("{}: not a PEM Ed25519 public key: {e}", path.display()))
}

/// A key's short id: 16 hex characters of the SHA-256 of its 32 public bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

/// What is signed: the checkpoint's canonical JSON without `signature` (nor the chain fields a
/// sealed copy carries).
fn signed_bytes(cp: &Map<String, Value>) -> Vec<u8> {
    let mut body = Map::new();
    for k in ["event", "chain", "covers", "head", "time", "instance", "key_id"] {
        if let Some(v) = cp.get(k) {
            body.insert(k.to_owned(), v.clone());
        }
    }
    Value::Object(body).to_string().into_bytes()
}

/// A checkpoint of `chain` whose last event is `covers` with hash `head`; signed if `key`.
pub fn build(
    chain: &str,
    covers: u64,
    head: &str,
    time: &str,
    instance: &str,
    key: Option<&SigningKey>,
) -> Map<String, Value> {
    let mut cp = Map::new();
    cp.insert("event".into(), Value::from("checkpoint"));
    cp.insert("chain".into(), Value::from(chain));
    cp.insert("covers".into(), Value::from(covers));
    cp.insert("head".into(), Value::from(head));
    cp.insert("time".into(), Value::from(time));
    cp.insert("instance".into(), Value::from(instance));
    if let Some(key) = key {
        cp.insert("key_id".into(), Value::from(key_id(&key.verifying_key())));
        let sig = key.sign(&signed_bytes(&cp));
        cp.insert("signature".into(), Value::from(b64url(&sig.to_bytes())));
    }
    cp
}

/// Checks a checkpoint's signature with `key`: Ok, or why not.
pub fn check_signature(cp: &Map<String, Value>, key: &VerifyingKey) -> Result<(), String> {
    let sig = cp.get("signature").and_then(Value::as_str).ok_or("the checkpoint is not signed")?;
    let bytes = b64url_decode(sig).ok_or("the signature is not base64url")?;
    let sig = Signature::from_slice(&bytes).map_err(|_| "the signature is not an Ed25519 signature")?;
    key.verify(&signed_bytes(cp), &sig).map_err(|_| "the signature does not verify with this public key".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_breaks_it() {
        let k = key();
        let cp = build("pc-a/1", 41, "ab12", "2026-11-27T10:00:00Z", "pc-a", Some(&k));
        assert_eq!(check_signature(&cp, &k.verifying_key()), Ok(()));
        let mut changed = cp.clone();
        changed.insert("covers".into(), Value::from(40));
        assert!(check_signature(&changed, &k.verifying_key()).is_err());
        let other = SigningKey::from_bytes(&[8u8; 32]);
        assert!(check_signature(&cp, &other.verifying_key()).is_err(), "another key");
        let unsigned = build("pc-a/1", 41, "ab12", "2026-11-27T10:00:00Z", "pc-a", None);
        assert!(check_signature(&unsigned, &k.verifying_key()).is_err());
        // a sealed copy (with chain fields) verifies the same
        let mut sealed = cp.clone();
        sealed.insert("seq".into(), Value::from(42));
        sealed.insert("prev_hash".into(), Value::from("00"));
        sealed.insert("hash".into(), Value::from("ff"));
        assert_eq!(check_signature(&sealed, &k.verifying_key()), Ok(()));
    }
}
