//! The hash chain. Each event carries `chain` (the writing instance), `seq` (from 1), `prev_hash`
//! and `hash = SHA-256(prev_hash || canonical JSON of the event without "hash")`, hex-encoded.
//! Canonical JSON is serde_json's compact form of the object with its keys sorted (serde_json's
//! map is ordered by key), so any writer can recompute it. A fleet writes several chains into
//! one stream; each is verified on its own.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::event::Members;

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

    /// Seals an event: adds chain, seq, prev_hash and hash; returns its JSON line. The event is
    /// serialized once: its canonical JSON (sorted keys, compact) is what is hashed, and the
    /// line is that text with `"hash":"<hex>"` spliced in at its sorted place, byte for byte
    /// what serializing the sealed object gives (`hash_of` and `verify` recompute it so).
    pub fn seal(&mut self, event: Map<String, Value>) -> String {
        // each value serialized once, into one buffer; the map iterates in key order
        let mut values: Vec<u8> = Vec::with_capacity(1024);
        let mut spans = Vec::with_capacity(event.len());
        for (k, v) in &event {
            let start = values.len();
            // writing JSON into a Vec cannot fail (keys are strings, values are `Value`s)
            let _ = serde_json::to_writer(&mut values, v);
            spans.push((k.as_str(), start..values.len()));
        }
        self.seal_sorted(spans.iter().map(|(k, r)| (*k, &values[r.clone()])))
    }

    /// `seal` for an event already in canonical JSON ([`Members`]): the same line, byte for
    /// byte, as sealing the event as a `Map`, without a map.
    pub fn seal_members(&mut self, event: &mut Members) -> String {
        self.seal_sorted(event.sorted())
    }

    /// Seals an event given as its members in key order, each value's JSON text: the chain's
    /// members (chain, prev_hash, seq) merged in at their sorted places (a member of the same
    /// name gives way, a "hash" member is left out), the canonical text hashed, and
    /// `"hash":"<hex>"` spliced in at its own sorted place.
    fn seal_sorted<'k, 'v>(&mut self, members: impl Iterator<Item = (&'k str, &'v [u8])>) -> String {
        self.seq += 1;
        let (chain, prev_hash) = (serde_json::to_string(&self.name), serde_json::to_string(&self.head));
        let seq = self.seq.to_string();
        // the chain's members, sorted among themselves
        let ours: [(&str, &[u8]); 3] = [
            ("chain", chain.as_deref().unwrap_or("null").as_bytes()),
            ("prev_hash", prev_hash.as_deref().unwrap_or("null").as_bytes()),
            ("seq", seq.as_bytes()),
        ];
        let mut text: Vec<u8> = Vec::with_capacity(1024);
        text.push(b'{');
        // where "hash" goes: before the first key that sorts after it (with that key's comma)
        let mut at = None;
        let mut put = |text: &mut Vec<u8>, k: &str, v: &[u8]| {
            if at.is_none() && k > "hash" {
                at = Some(text.len());
            }
            if text.len() > 1 {
                text.push(b',');
            }
            let _ = serde_json::to_writer(&mut *text, k);
            text.push(b':');
            text.extend_from_slice(v);
        };
        let mut mine = ours.iter().peekable();
        for (k, v) in members {
            if k == "hash" || ours.iter().any(|(o, _)| *o == k) {
                continue;
            }
            while let Some((o, ov)) = mine.next_if(|(o, _)| *o < k) {
                put(&mut text, o, ov);
            }
            put(&mut text, k, v);
        }
        for (o, ov) in mine {
            put(&mut text, o, ov);
        }
        text.push(b'}');
        let mut h = Sha256::new();
        h.update(self.head.as_bytes());
        h.update(&text);
        let hash = decision_core::encode::hex(&h.finalize());
        // the chain's members are always there, so "hash" never comes first
        let at = at.unwrap_or(text.len() - 1);
        text.splice(at..at, format!(",\"hash\":\"{hash}\"").into_bytes());
        self.head = hash;
        // serde_json writes UTF-8 only
        String::from_utf8(text).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
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
    verify_with(text, None, None)
}

/// A checkpoint and its line in the checkpoints file.
type Numbered = (usize, Map<String, Value>);

/// A checkpoints file, parsed: each line a checkpoint as the writer appends them.
fn parse_checkpoints(text: &str) -> Result<Vec<Numbered>, Tampering> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(cp)) if cp.get("event").and_then(Value::as_str) == Some("checkpoint") => {
                out.push((i + 1, cp))
            }
            _ => {
                return Err(Tampering {
                    line: i + 1,
                    chain: String::new(),
                    seq: None,
                    what: "checkpoints file: not a checkpoint".into(),
                });
            }
        }
    }
    Ok(out)
}

/// As `verify`, and also: every checkpoint sealed in the log must name the event before it; with
/// `checkpoints` (the writer's checkpoint file), every chain must reach each checkpoint's event
/// with that very hash (a log cut short after a checkpoint is found); with `key`, every
/// checkpoint must carry a valid Ed25519 signature.
pub fn verify_with(
    text: &str,
    checkpoints: Option<&str>,
    key: Option<&ed25519_dalek::VerifyingKey>,
) -> Result<Verified, Tampering> {
    let external = match checkpoints {
        Some(t) => parse_checkpoints(t)?,
        None => Vec::new(),
    };
    let cp_problem = |line: usize, chain: &str, seq: Option<u64>, what: String| Tampering {
        line,
        chain: chain.to_owned(),
        seq,
        what: format!("checkpoints file line {line}: {what}"),
    };
    if let Some(key) = key {
        for (line, cp) in &external {
            let chain = cp.get("chain").and_then(Value::as_str).unwrap_or_default();
            super::checkpoint::check_signature(cp, key)
                .map_err(|e| cp_problem(*line, chain, cp.get("covers").and_then(Value::as_u64), e))?;
        }
    }
    // the hashes the external checkpoints name, found during the replay
    let mut wanted: HashMap<(String, u64), Option<String>> = external
        .iter()
        .filter_map(|(_, cp)| Some(((cp.get("chain")?.as_str()?.to_owned(), cp.get("covers")?.as_u64()?), None)))
        .collect();
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
        if ev.get("event").and_then(Value::as_str) == Some("checkpoint") {
            let covers = ev.get("covers").and_then(Value::as_u64);
            let head = ev.get("head").and_then(Value::as_str);
            if covers != Some(seq_v - 1) || head != Some(prev) {
                return Err(bad(&chain, seq, "a checkpoint that does not name the event before it".into()));
            }
            if let Some(key) = key {
                super::checkpoint::check_signature(&ev, key)
                    .map_err(|e| bad(&chain, seq, format!("checkpoint: {e}")))?;
            }
        }
        if let Some(slot) = wanted.get_mut(&(chain.clone(), seq_v)) {
            *slot = Some(hash.to_owned());
        }
        if !heads.contains_key(&chain) {
            order.push(chain.clone());
        }
        heads.insert(chain, (seq_v, hash.to_owned()));
        events += 1;
    }
    for (line, cp) in &external {
        let chain = cp.get("chain").and_then(Value::as_str).unwrap_or_default();
        let covers = cp.get("covers").and_then(Value::as_u64).unwrap_or(0);
        let head = cp.get("head").and_then(Value::as_str).unwrap_or_default();
        if covers == 0 {
            continue; // a checkpoint of an empty chain
        }
        match wanted.get(&(chain.to_owned(), covers)) {
            Some(Some(h)) if h == head => {}
            Some(Some(_)) => {
                return Err(cp_problem(
                    *line,
                    chain,
                    Some(covers),
                    "the log's event at this seq is not the one checkpointed".into(),
                ));
            }
            _ => {
                let last = heads.get(chain).map_or(0, |(s, _)| *s);
                return Err(cp_problem(
                    *line,
                    chain,
                    Some(covers),
                    format!(
                        "the log was truncated: chain {chain:?} ends at seq {last}, but a checkpoint covers seq {covers}"
                    ),
                ));
            }
        }
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

    #[test]
    fn a_sealed_line_is_the_sealed_object_serialized_whatever_its_keys() {
        let mut c = Chain::new("pc-a/1");
        let mut prev = GENESIS.to_owned();
        let shapes: Vec<Vec<(&str, Value)>> = vec![
            vec![],
            vec![("a", Value::from(1))],
            vec![("zz", Value::from("é \" \\ \u{1} ✓")), ("aa", serde_json::json!({"n": [1, 2.5, null]}))],
            vec![("hash", Value::from("forged")), ("h", Value::from(true)), ("hasi", Value::from(false))],
            vec![("\u{7f}", Value::from(0)), ("", Value::from(-1))],
        ];
        for shape in shapes {
            let ev: Map<String, Value> = shape.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let line = c.seal(ev);
            let parsed: Map<String, Value> = serde_json::from_str(&line).expect("a JSON object");
            assert_eq!(line, Value::Object(parsed.clone()).to_string(), "canonical");
            assert_eq!(parsed["prev_hash"], Value::from(prev.as_str()));
            let hash = hash_of(&prev, &parsed);
            assert_eq!(parsed["hash"], Value::from(hash.as_str()), "{line}");
            prev = hash;
        }
    }

    fn tampered(lines: &[String]) -> Tampering {
        verify(&lines.join("\n")).expect_err("tampering must be found")
    }

    /// A log of one chain with a signed checkpoint after event 5 (as the writer seals it), and
    /// the checkpoints file the writer would append.
    fn checkpointed(key: &ed25519_dalek::SigningKey) -> (Vec<String>, String) {
        let mut c = Chain::new("pc-a/1");
        let mut lines = Vec::new();
        let mut file = String::new();
        for i in 0..8 {
            if i == 5 {
                let (head, seq) = c.head();
                let cp =
                    super::super::checkpoint::build("pc-a/1", seq, head, "2026-11-27T10:00:00Z", "pc-a", Some(key));
                file.push_str(&Value::Object(cp.clone()).to_string());
                file.push('\n');
                lines.push(c.seal(cp));
            }
            let mut ev = Map::new();
            ev.insert("request_id".into(), Value::from(format!("req_{i}")));
            lines.push(c.seal(ev));
        }
        (lines, file)
    }

    #[test]
    fn checkpoints_find_truncation_and_bad_signatures() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
        let public = key.verifying_key();
        let (lines, cps) = checkpointed(&key);
        let v = verify_with(&lines.join("\n"), Some(&cps), Some(&public)).expect("intact");
        assert_eq!(v.events, 9);
        // cut after the checkpoint: the chain alone cannot tell, the checkpoints file can
        let cut = lines[..4].join("\n");
        assert!(verify(&cut).is_ok(), "a plain prefix of a chain verifies on its own");
        let t = verify_with(&cut, Some(&cps), None).expect_err("truncation");
        assert!(t.what.contains("truncated") && t.what.contains("ends at seq 4"), "{t}");
        // a checkpoint signed by another key
        let other = ed25519_dalek::SigningKey::from_bytes(&[4u8; 32]);
        let t = verify_with(&lines.join("\n"), Some(&cps), Some(&other.verifying_key())).expect_err("wrong key");
        assert!(t.what.contains("signature"), "{t}");
        // a forged checkpoints file naming another head
        let forged = cps.replacen("\"head\":\"", "\"head\":\"0", 1);
        let t = verify_with(&lines.join("\n"), Some(&forged), None).expect_err("forged");
        assert!(t.what.contains("not the one checkpointed"), "{t}");
        // a sealed checkpoint whose signature was tampered with (and the chain re-hashed by a
        // forger who has no key): the signature check finds it
        let mut resigned = Chain::new("pc-a/1");
        let mut forged_log = Vec::new();
        for l in &lines {
            let Ok(Value::Object(mut ev)) = serde_json::from_str::<Value>(l) else { panic!("json") };
            for k in ["chain", "seq", "prev_hash", "hash"] {
                ev.remove(k);
            }
            if ev.get("event").and_then(Value::as_str) == Some("checkpoint") {
                ev.insert("time".into(), Value::from("2030-01-01T00:00:00Z"));
            }
            forged_log.push(resigned.seal(ev));
        }
        assert!(verify(&forged_log.join("\n")).is_ok(), "without a key, a re-hashed log is consistent");
        let t = verify_with(&forged_log.join("\n"), None, Some(&public)).expect_err("signature");
        assert!(t.what.contains("signature"), "{t}");
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
