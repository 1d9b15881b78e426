//! Audit events in the reference guide's record shape (`request_id`, `timestamp`, `client_ip`,
//! `method`, `endpoint`, `headers`, `response_code`, `processing_time`) plus the decision's
//! `decision`, `reason`, `subject`, `tier`, `rule` and `instance`. Credentials are masked while
//! the event is built, so no sink, log line or panic message can ever hold one: headers named in
//! `audit.mask_headers` (and always those that carry credentials), and query parameters named
//! like credentials.

use serde_json::{Map, Value};

/// Shown instead of a masked value.
pub const MASKED: &str = "[MASKED]";
/// Headers masked whatever the policy lists.
pub const ALWAYS_MASKED: [&str; 6] =
    ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "x-auth-token"];
/// A query parameter whose name contains one of these is masked.
pub const SECRET_PARAM_WORDS: [&str; 13] = [
    "token",
    "key",
    "secret",
    "password",
    "passwd",
    "pwd",
    "auth",
    "signature",
    "session",
    "code",
    "credential",
    "jwt",
    "assertion",
];

/// What an event is built from.
#[derive(Debug, Clone, Default)]
pub struct EventInput<'a> {
    pub request_id: &'a str,
    /// RFC 3339
    pub timestamp: String,
    pub client_ip: Option<String>,
    pub method: &'a str,
    /// the path, without the query
    pub endpoint: &'a str,
    /// the raw query string (masked here)
    pub query: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub response_code: u16,
    pub processing_time_ms: f64,
    pub decision: &'a str,
    pub reason: &'a str,
    pub subject: Option<&'a str>,
    pub tier: Option<&'a str>,
    pub rule: Option<usize>,
    pub instance: &'a str,
    /// the header the policy reads API keys from (`authentication.api_keys.header`): masked like
    /// every credential header, whether or not `mask_headers` repeats it
    pub credential_header: Option<&'a str>,
}

/// Headers that carry a URL or a request target, whose query is masked like the request's own
/// (Envoy sends the `:path` pseudo-header, query and all).
pub const URL_HEADERS: [&str; 6] =
    [":path", "referer", "x-envoy-original-path", "x-original-uri", "x-original-url", "x-forwarded-uri"];

/// A URL or request target with its query's credential-like parameters masked.
pub fn mask_url(value: &str) -> String {
    match value.split_once('?') {
        Some((base, query)) => format!("{base}?{}", mask_query(query)),
        None => value.to_owned(),
    }
}

fn masked_header(name: &str, mask: &[String], credential: Option<&str>) -> bool {
    ALWAYS_MASKED.iter().any(|m| m.eq_ignore_ascii_case(name))
        || credential.is_some_and(|c| c.eq_ignore_ascii_case(name))
        || mask.iter().any(|m| m.eq_ignore_ascii_case(name))
}

/// The query with the values of credential-like parameters replaced.
pub fn mask_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let lower = name.to_ascii_lowercase();
            if !value.is_empty() && SECRET_PARAM_WORDS.iter().any(|w| lower.contains(w)) {
                format!("{name}={MASKED}")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// An event already in canonical JSON: each member's value as serde_json writes it, in one
/// buffer, the members sorted by key when the event is sealed. Sealing it gives, byte for byte,
/// the line sealing the same event as a `Map` gives (`Chain::seal_members`), without building a
/// map on the request path (issue 16: the map cost a tenth of a decision with the audit on).
#[derive(Debug, Clone, Default)]
pub struct Members {
    text: Vec<u8>,
    /// key, and where its value is in `text`
    members: Vec<(&'static str, std::ops::Range<usize>)>,
}

impl Members {
    /// Adds a member whose value is `value` serialized by serde_json (a string, number, bool,
    /// null or a `Value`). Each key once; the order of the calls does not matter.
    pub fn push<T: serde::Serialize + ?Sized>(&mut self, key: &'static str, value: &T) {
        let start = self.text.len();
        // serde_json writes UTF-8 only, and cannot fail on these values (no map with
        // non-string keys); a value it refused would leave nothing, and is written as null
        if serde_json::to_writer(&mut self.text, value).is_err() {
            self.text.truncate(start);
            self.text.extend_from_slice(b"null");
        }
        self.members.push((key, start..self.text.len()));
    }

    /// Adds a member whose value is already JSON text (an object this module wrote).
    fn push_json(&mut self, key: &'static str, json: &[u8]) {
        let start = self.text.len();
        self.text.extend_from_slice(json);
        self.members.push((key, start..self.text.len()));
    }

    /// The members, sorted by key (byte order, as serde_json's map), each with its JSON text.
    pub fn sorted(&mut self) -> impl Iterator<Item = (&'static str, &[u8])> {
        self.members.sort_unstable_by_key(|(k, _)| *k);
        self.members.iter().map(|(k, r)| (*k, &self.text[r.clone()]))
    }

    /// The same event as a `Map`.
    pub fn to_map(&mut self) -> Map<String, Value> {
        self.sorted().map(|(k, v)| (k.to_owned(), serde_json::from_slice(v).unwrap_or(Value::Null))).collect()
    }
}

/// Builds an event, serialized as it is built; `mask` is the policy's `audit.mask_headers`.
pub fn build(mut e: EventInput<'_>, mask: &[String]) -> Members {
    let mut ev = Members { text: Vec::with_capacity(512), members: Vec::with_capacity(24) };
    // the headers object: sorted by name, the last value of a repeated name (as a map keeps it)
    let headers = &mut e.headers;
    headers.sort_by(|a, b| a.0.cmp(b.0));
    let mut obj: Vec<u8> = Vec::with_capacity(256);
    obj.push(b'{');
    let mut first = true;
    for (i, (name, value)) in headers.iter().enumerate() {
        if headers.get(i + 1).is_some_and(|next| next.0 == *name) {
            continue;
        }
        if !first {
            obj.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut obj, name);
        obj.push(b':');
        let _ = if masked_header(name, mask, e.credential_header) {
            serde_json::to_writer(&mut obj, MASKED)
        } else if URL_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            serde_json::to_writer(&mut obj, &mask_url(value))
        } else {
            serde_json::to_writer(&mut obj, value)
        };
    }
    obj.push(b'}');
    ev.push_json("headers", &obj);
    ev.push("request_id", e.request_id);
    ev.push("timestamp", &e.timestamp);
    ev.push("client_ip", &e.client_ip);
    ev.push("method", e.method);
    ev.push("endpoint", e.endpoint);
    if !e.query.is_empty() {
        ev.push("query", &mask_query(e.query));
    }
    ev.push("response_code", &e.response_code);
    // as `Value::from(f64)` writes it: a number, or null if it is not finite
    ev.push("processing_time", &Value::from(e.processing_time_ms));
    ev.push("decision", e.decision);
    ev.push("reason", e.reason);
    ev.push("subject", &e.subject);
    ev.push("tier", &e.tier);
    ev.push("rule", &e.rule);
    ev.push("instance", e.instance);
    ev
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_credential_survives_into_an_event() {
        let secrets = [
            "eyJhbGciOiJSUzI1NiJ9.secret-token",
            "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo",
            "session=abc123secret",
            "s3cr3t-query-key",
            "hunter2",
        ];
        let input = EventInput {
            request_id: "req_abc123",
            timestamp: "2025-03-23T14:30:00Z".into(),
            client_ip: Some("192.168.1.100".into()),
            method: "POST",
            endpoint: "/api/v1/users",
            query: "page=2&api_key=s3cr3t-query-key&password=hunter2&sort=name",
            headers: vec![
                ("authorization", "Bearer eyJhbGciOiJSUzI1NiJ9.secret-token"),
                ("X-Api-Key", "pk_demo_basic_bQF_Mjs3_9sg1wzvxXNOqTIo"),
                ("cookie", "session=abc123secret"),
                ("user-agent", "Mozilla/5.0"),
                ("x-custom-secret", "hunter2"),
                (":path", "/api/v1/users?page=2&api_key=s3cr3t-query-key"),
                ("referer", "https://app.example/cb?code=1&access_token=eyJhbGciOiJSUzI1NiJ9.secret-token"),
            ],
            response_code: 200,
            processing_time_ms: 235.0,
            decision: "allow",
            reason: "allowed",
            subject: Some("demo-basic"),
            tier: Some("basic"),
            rule: Some(1),
            instance: "pc-a",
            credential_header: Some("x-api-key"),
        };
        let ev = build(input, &["x-custom-secret".to_owned()]).to_map();
        let text = Value::Object(ev.clone()).to_string();
        for s in secrets {
            assert!(!text.contains(s), "{s} leaked into {text}");
        }
        assert_eq!(ev["headers"]["authorization"], MASKED);
        assert_eq!(ev["headers"]["user-agent"], "Mozilla/5.0");
        assert_eq!(ev["query"], "page=2&api_key=[MASKED]&password=[MASKED]&sort=name");
        assert_eq!(ev["headers"][":path"], "/api/v1/users?page=2&api_key=[MASKED]");
        assert_eq!(ev["headers"]["referer"], "https://app.example/cb?code=[MASKED]&access_token=[MASKED]");
        for field in [
            "request_id",
            "timestamp",
            "client_ip",
            "method",
            "endpoint",
            "headers",
            "response_code",
            "processing_time",
        ] {
            assert!(ev.contains_key(field), "the reference record's {field}");
        }
    }

    #[test]
    fn a_renamed_api_key_header_is_masked_without_being_listed() {
        let input = EventInput {
            headers: vec![("X-Partner-Key", "pk_partner_secret_value"), ("x-other", "visible")],
            credential_header: Some("x-partner-key"),
            ..EventInput::default()
        };
        let ev = build(input, &["authorization".to_owned()]).to_map();
        assert_eq!(ev["headers"]["X-Partner-Key"], MASKED);
        assert_eq!(ev["headers"]["x-other"], "visible");
        assert!(!Value::Object(ev).to_string().contains("pk_partner_secret_value"));
    }

    #[test]
    fn members_seal_to_the_line_the_same_map_seals_to() {
        use crate::audit::chain::{Chain, verify};
        let input = EventInput {
            request_id: "req \"quoted\" \u{7f} é",
            timestamp: "2026-12-01T07:00:00Z".into(),
            client_ip: None,
            method: "GET",
            endpoint: "/api/v1/x",
            query: "a=1&token=t0ps3cret",
            // a repeated name keeps its last value, as a map would; names differing in case stay apart
            headers: vec![
                ("x-b", "first"),
                ("X-B", "upper"),
                ("x-a", "1"),
                ("x-b", "last"),
                (":path", "/x?code=c0de"),
                ("", "empty name"),
            ],
            response_code: 429,
            processing_time_ms: 0.123,
            decision: "deny",
            reason: "rate_limited",
            subject: Some("demo"),
            tier: None,
            rule: Some(3),
            instance: "pc-a",
            credential_header: Some("x-api-key"),
        };
        let mut members = build(input, &[]);
        members.push("event", "decision");
        // members named like the chain's own give way to them
        members.push("seq", &99);
        members.push("hash", "forged");
        let map = members.to_map();
        assert_eq!(map["headers"]["x-b"], "last");
        assert_eq!(map["headers"]["X-B"], "upper");
        assert_eq!(map["headers"][":path"], "/x?code=[MASKED]");
        assert_eq!(map["query"], "a=1&token=[MASKED]");
        assert_eq!(map["client_ip"], Value::Null);
        assert_eq!(map["processing_time"], 0.123);
        let (mut a, mut b) = (Chain::new("pc-a/1"), Chain::new("pc-a/1"));
        let mut lines = Vec::new();
        for _ in 0..3 {
            let from_members = a.seal_members(&mut members.clone());
            let from_map = b.seal(map.clone());
            assert_eq!(from_members, from_map);
            lines.push(from_members);
        }
        // an empty event too
        assert_eq!(a.seal_members(&mut Members::default()), b.seal(Map::new()));
        let report = verify(&lines.join("\n")).unwrap_or_else(|t| panic!("{t}"));
        assert_eq!(report.events, 3);
    }
}
