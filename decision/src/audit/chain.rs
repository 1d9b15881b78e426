//! The hash chain. Each event carries `chain` (the writing instance), `seq` (from 1), `prev_hash`
//! and `hash = SHA-256(prev_hash || canonical JSON of the event without "hash")`, hex-encoded.
//! Canonical JSON is serde_json's compact form of the object with its keys sorted (serde_json's
//! map is ordered by key), so any writer can recompute it. A fleet writes several chains into
//! one stream; each is verified on its own.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The `prev_hash` of a chain's first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an event (its "hash" member, if any, is left out).
pub fn hash_of(prev_hash: &str, event: &Map<String, Value>) -> String {
    let mut body = event.clone();
    body.remove("hash");
    let canonical = Value::Object(body).to_string();
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical.as_bytes());
    decision_core::encode::hex(&h.finalize())
}

/// Appends events to one chain.
#[derive(Debug, Clone)]
pub struct Chain {
    name: String,
    seq: u64,
    head: String,
}

impl Chain {
    pub fn new(name: &str) -> Chain {
        Chain { name: name.to_owned(), seq: 0, head: GENESIS.to_owned() }
    }

    /// Seals an event: adds chain, seq, prev_hash and hash; returns its JSON line.
    pub fn seal(&mut self, mut event: Map<String, Value>) -> String {
        self.seq += 1;
        event.insert("chain".into(), Value::from(self.name.clone()));
        event.insert("seq".into(), Value::from(self.seq));
        event.insert("prev_hash".into(), Value::from(self.head.clone()));
        let hash = hash_of(&self.head, &event);
        event.insert("hash".into(), Value::from(hash.clone()));
        self.head = hash;
        Value::Object(event).to_string()
    }

    pub fn head(&self) -> (&str, u64) {
        (&self.head, self.seq)
    }
}

/// What `verify` found wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tampering {
    /// 1-based line in the file
    pub line: usize,
    pub chain: String,
    pub seq: Option<u64>,
    pub what: String,
}

impl fmt::Display for Tampering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if !self.chain.is_empty() {
            write!(f, " (chain {:?}", self.chain)?;
            if let Some(s) = self.seq {
                write!(f, ", seq {s}")?;
            }
            write!(f, ")")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// A verified file: events per chain, and each chain's head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    pub events: u64,
    pub chains: Vec<(String, u64, String)>,
}

/// Replays every chain of a JSON-lines audit file; the first problem found stops it.
pub fn verify(text: &str) -> Result<Verified, Tampering> {
    let mut heads: HashMap<String, (u64, String)> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut events = 0;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |chain: &str, seq, what: String| Tampering { line: n, chain: chain.to_owned(), seq, what };
        let Ok(Value::Object(ev)) = serde_json::from_str::<Value>(line) else {
            return Err(bad("", None, "not a JSON object: the line was altered or inserted".into()));
        };
        let chain = ev.get("chain").and_then(Value::as_str).unwrap_or_default().to_owned();
        let seq = ev.get("seq").and_then(Value::as_u64);
        let (Some(seq_v), Some(prev), Some(hash)) =
            (seq, ev.get("prev_hash").and_then(Value::as_str), ev.get("hash").and_then(Value::as_str))
        else {
            return Err(bad(&chain, seq, "chain fields (chain, seq, prev_hash, hash) missing".into()));
        };
        if hash_of(prev, &ev) != hash {
            return Err(bad(&chain, seq, "the event was changed (its hash does not match its content)".into()));
        }
        let (last_seq, last_hash) = heads.get(&chain).cloned().unwrap_or((0, GENESIS.to_owned()));
        if seq_v != last_seq + 1 || prev != last_hash {
            let what = if seq_v > last_seq + 1 && prev != last_hash {
                format!("seq {} expected: {} event(s) before this one were removed", last_seq + 1, seq_v - last_seq - 1)
            } else if seq_v <= last_seq {
                format!("seq {} expected: events were reordered or this one was inserted", last_seq + 1)
            } else {
                "it does not follow the previous event (prev_hash): an event was inserted or replaced".to_owned()
            };
            return Err(bad(&chain, seq, what));
        }
        if !heads.contains_key(&chain) {
            order.push(chain.clone());
        }
        heads.insert(chain, (seq_v, hash.to_owned()));
        events += 1;
    }
    let chains = order
        .into_iter()
        .map(|c| {
            let (seq, head) = heads.remove(&c).unwrap_or((0, String::new()));
            (c, seq, head)
        })
        .collect();
    Ok(Verified { events, chains })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64) -> Vec<String> {
        let mut a = Chain::new("pc-a");
        let mut b = Chain::new("pc-b");
        (0..n)
            .map(|i| {
                let mut ev = Map::new();
                ev.insert("request_id".into(), Value::from(format!("req_{i}")));
                ev.insert("response_code".into(), Value::from(200));
                if i % 3 == 0 { b.seal(ev) } else { a.seal(ev) }
            })
            .collect()
    }

    fn tampered(lines: &[String]) -> Tampering {
        verify(&lines.join("\n")).expect_err("tampering must be found")
    }

    #[test]
    fn an_untouched_log_verifies_with_its_counts() {
        let lines = log(10);
        let v = verify(&lines.join("\n")).expect("verifies");
        assert_eq!(v.events, 10);
        assert_eq!(v.chains.iter().map(|(c, s, _)| (c.as_str(), *s)).collect::<Vec<_>>(), [("pc-b", 4), ("pc-a", 6)]);
    }

    #[test]
    fn every_kind_of_tampering_is_found_and_located() {
        let lines = log(10);
        // one byte changed
        let mut edited = lines.clone();
        edited[4] = edited[4].replacen("\"response_code\":200", "\"response_code\":500", 1);
        let t = tampered(&edited);
        assert_eq!((t.line, t.what.contains("changed")), (5, true), "{t}");
        // a line deleted (chain pc-a's seq 2): found at that chain's next event, now line 4
        let mut deleted = lines.clone();
        deleted.remove(2);
        let t = tampered(&deleted);
        assert_eq!((t.line, t.seq), (4, Some(3)), "{t}");
        assert!(t.what.contains("removed"), "{t}");
        // two lines of one chain swapped
        let mut swapped = lines.clone();
        swapped.swap(1, 2);
        let t = tampered(&swapped);
        assert_eq!(t.line, 2, "{t}");
        // a forged line inserted, well formed and correctly hashed on its own
        let mut forged = lines.clone();
        let mut fake = Chain::new("pc-a");
        let mut ev = Map::new();
        ev.insert("request_id".into(), Value::from("req_forged"));
        forged.insert(5, fake.seal(ev));
        let t = tampered(&forged);
        assert_eq!(t.line, 6, "{t}");
        // garbage
        let mut garbage = lines.clone();
        garbage.insert(3, "{not json".into());
        assert_eq!(tampered(&garbage).line, 4);
        // the display names line, chain and seq
        assert!(tampered(&edited).to_string().starts_with("line 5 (chain \"pc-a\", seq"), "{}", tampered(&edited));
    }
}
