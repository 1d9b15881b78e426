//! `portcullis keys`: digests for the policy and new random keys.

use std::io::Read;

/// The lower-case hex SHA-256 of a key, as a policy's `sha256` holds it.
pub fn hex_digest(key: &str) -> String {
    decision_core::encode::hex(&decision_core::apikey::digest(key.as_bytes()))
}

/// A new key: `prefix_` and 32 base64url characters (192 random bits from the kernel).
pub fn generate(prefix: &str) -> std::io::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("{prefix}_{}", decision_core::encode::b64url(&bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_reference_policy_and_keys_are_fresh() {
        assert_eq!(
            hex_digest("pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo"),
            "43089ad2666e61a9f0f9dcd5f904b119ff89a44d3c8decdff84a6e8653fe64ba"
        );
        let a = generate("pk_live").expect("key");
        let b = generate("pk_live").expect("key");
        assert_ne!(a, b);
        assert!(a.starts_with("pk_live_") && a.len() == "pk_live_".len() + 32, "{a}");
    }
}
