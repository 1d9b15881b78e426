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

/// Builds an event; `mask` is the policy's `audit.mask_headers`.
pub fn build(e: &EventInput<'_>, mask: &[String]) -> Map<String, Value> {
    let mut headers = Map::new();
    for (name, value) in &e.headers {
        let v = if masked_header(name, mask, e.credential_header) {
            MASKED.to_owned()
        } else if URL_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            mask_url(value)
        } else {
            (*value).to_owned()
        };
        headers.insert((*name).to_owned(), Value::from(v));
    }
    let mut ev = Map::new();
    ev.insert("request_id".into(), Value::from(e.request_id));
    ev.insert("timestamp".into(), Value::from(e.timestamp.clone()));
    ev.insert("client_ip".into(), e.client_ip.clone().map_or(Value::Null, Value::from));
    ev.insert("method".into(), Value::from(e.method));
    ev.insert("endpoint".into(), Value::from(e.endpoint));
    if !e.query.is_empty() {
        ev.insert("query".into(), Value::from(mask_query(e.query)));
    }
    ev.insert("headers".into(), Value::Object(headers));
    ev.insert("response_code".into(), Value::from(e.response_code));
    ev.insert("processing_time".into(), Value::from(e.processing_time_ms));
    ev.insert("decision".into(), Value::from(e.decision));
    ev.insert("reason".into(), Value::from(e.reason));
    ev.insert("subject".into(), e.subject.map_or(Value::Null, Value::from));
    ev.insert("tier".into(), e.tier.map_or(Value::Null, Value::from));
    ev.insert("rule".into(), e.rule.map_or(Value::Null, Value::from));
    ev.insert("instance".into(), Value::from(e.instance));
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
        let ev = build(&input, &["x-custom-secret".to_owned()]);
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
        let ev = build(&input, &["authorization".to_owned()]);
        assert_eq!(ev["headers"]["X-Partner-Key"], MASKED);
        assert_eq!(ev["headers"]["x-other"], "visible");
        assert!(!Value::Object(ev).to_string().contains("pk_partner_secret_value"));
    }
}
