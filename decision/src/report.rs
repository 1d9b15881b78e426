//! `portcullis report`: the reference's daily, weekly and monthly reviews, read from audit logs.
//! Authentication failures by reason and address, unusual access (subjects seen from several
//! addresses, access at night), rate-limit breaches by subject, payload rejections, policy
//! violations, top talkers, the upstream error rate and latency percentiles, and alerts.

use std::collections::{BTreeMap, HashMap, HashSet};

use decision_core::units::{Micros, parse_rfc3339};
use serde::Serialize;
use serde_json::Value;

/// Night, for "off-hours" access: from 22:00 to 06:00 UTC.
const NIGHT_FROM_HOUR: u64 = 22;
const NIGHT_TO_HOUR: u64 = 6;
/// Lists are cut to this many entries.
const TOP: usize = 10;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub decisions: u64,
    pub allowed: u64,
    pub denied: u64,
    pub auth_failures_by_reason: BTreeMap<String, u64>,
    pub auth_failures_by_ip: Vec<(String, u64)>,
    pub rate_limited_by_subject: Vec<(String, u64)>,
    pub payload_rejections: u64,
    pub policy_violations_by_reason: BTreeMap<String, u64>,
    /// subjects seen from more than one address, with how many
    pub subjects_from_several_ips: Vec<(String, u64)>,
    /// allowed requests at night, by subject
    pub off_hours_by_subject: Vec<(String, u64)>,
    pub top_ips: Vec<(String, u64)>,
    pub top_subjects: Vec<(String, u64)>,
    pub completions: u64,
    pub upstream_errors: u64,
    /// upstream errors among completions, percent
    pub error_rate: f64,
    /// completions' total time in ms (decisions' processing time when no completion was logged)
    pub latency_ms: Percentiles,
    pub alerts: BTreeMap<String, u64>,
}

fn top(counts: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(TOP);
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // nearest rank
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Summarizes the events of `text` (JSON lines) stamped in `[since, until]`.
pub fn build(text: &str, since: Micros, until: Micros) -> Report {
    let mut r =
        Report { since: crate::clock::rfc3339(since), until: crate::clock::rfc3339(until), ..Report::default() };
    let (mut by_ip, mut fail_ip, mut limited, mut night, mut subjects) =
        (HashMap::new(), HashMap::new(), HashMap::new(), HashMap::new(), HashMap::new());
    let mut ips_of: HashMap<String, HashSet<String>> = HashMap::new();
    let (mut completion_ms, mut decision_ms) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(Value::Object(ev)) = serde_json::from_str::<Value>(line) else { continue };
        let Some(at) = ev.get("timestamp").and_then(Value::as_str).and_then(|t| parse_rfc3339(t).ok()) else {
            continue;
        };
        if at < since || at > until {
            continue;
        }
        let s = |k: &str| ev.get(k).and_then(Value::as_str).map(str::to_owned);
        let code = ev.get("response_code").and_then(Value::as_u64).unwrap_or(0);
        let ms = ev.get("processing_time").and_then(Value::as_f64).unwrap_or(0.0);
        match ev.get("event").and_then(Value::as_str).unwrap_or("decision") {
            "decision" => {
                r.decisions += 1;
                let allowed = s("decision").as_deref() == Some("allow");
                if allowed {
                    r.allowed += 1;
                } else {
                    r.denied += 1;
                }
                decision_ms.push(ms);
                let reason = s("reason").unwrap_or_default();
                let ip = s("client_ip").unwrap_or_else(|| "-".into());
                let who = s("subject").unwrap_or_else(|| format!("ip:{ip}"));
                *by_ip.entry(ip.clone()).or_insert(0u64) += 1;
                if let Some(subject) = s("subject") {
                    *subjects.entry(subject.clone()).or_insert(0u64) += 1;
                    ips_of.entry(subject.clone()).or_default().insert(ip.clone());
                    let hour = at / 3_600_000_000 % 24;
                    if allowed && !(NIGHT_TO_HOUR..NIGHT_FROM_HOUR).contains(&hour) {
                        *night.entry(subject).or_insert(0u64) += 1;
                    }
                }
                match code {
                    401 => {
                        *r.auth_failures_by_reason.entry(reason).or_insert(0) += 1;
                        *fail_ip.entry(ip).or_insert(0u64) += 1;
                    }
                    403 => *r.policy_violations_by_reason.entry(reason).or_insert(0) += 1,
                    413 => r.payload_rejections += 1,
                    429 => *limited.entry(who).or_insert(0u64) += 1,
                    _ => {}
                }
            }
            "completion" => {
                r.completions += 1;
                if code >= 500 || ev.get("upstream_error").and_then(Value::as_bool) == Some(true) {
                    r.upstream_errors += 1;
                }
                completion_ms.push(ms);
            }
            "alert" => {
                let key = format!("{}:{}", s("alert").unwrap_or_default(), s("level").unwrap_or_default());
                *r.alerts.entry(key).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    r.auth_failures_by_ip = top(fail_ip);
    r.rate_limited_by_subject = top(limited);
    r.off_hours_by_subject = top(night);
    r.top_ips = top(by_ip);
    r.top_subjects = top(subjects);
    r.subjects_from_several_ips =
        top(ips_of.into_iter().filter(|(_, ips)| ips.len() > 1).map(|(s, ips)| (s, ips.len() as u64)).collect());
    if r.completions > 0 {
        r.error_rate = (r.upstream_errors as f64 * 10_000.0 / r.completions as f64).round() / 100.0;
    }
    let mut times = if completion_ms.is_empty() { decision_ms } else { completion_ms };
    times.sort_by(f64::total_cmp);
    r.latency_ms =
        Percentiles { p50: percentile(&times, 50.0), p95: percentile(&times, 95.0), p99: percentile(&times, 99.0) };
    r
}

/// The report as a person reads it.
pub fn text(r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let list = |o: &mut String, title: &str, v: &[(String, u64)]| {
        let _ = writeln!(o, "{title}:");
        if v.is_empty() {
            let _ = writeln!(o, "  (none)");
        }
        for (k, n) in v {
            let _ = writeln!(o, "  {n:>8}  {k}");
        }
    };
    let map = |o: &mut String, title: &str, m: &BTreeMap<String, u64>| {
        let v: Vec<(String, u64)> = m.iter().map(|(k, n)| (k.clone(), *n)).collect();
        list(o, title, &v);
    };
    let _ = writeln!(o, "portcullis report: {} .. {}", r.since, r.until);
    let _ = writeln!(o, "decisions: {} ({} allowed, {} denied)", r.decisions, r.allowed, r.denied);
    map(&mut o, "authentication failures by reason", &r.auth_failures_by_reason);
    list(&mut o, "authentication failures by address", &r.auth_failures_by_ip);
    list(&mut o, "rate-limit breaches by subject", &r.rate_limited_by_subject);
    let _ = writeln!(o, "payload rejections (413): {}", r.payload_rejections);
    map(&mut o, "policy violations (403) by reason", &r.policy_violations_by_reason);
    list(&mut o, "subjects seen from several addresses", &r.subjects_from_several_ips);
    list(&mut o, "allowed at night (22:00-06:00 UTC) by subject", &r.off_hours_by_subject);
    list(&mut o, "top addresses", &r.top_ips);
    list(&mut o, "top subjects", &r.top_subjects);
    let _ = writeln!(
        o,
        "upstream: {} completions, {} errors ({}%); latency ms p50 {} p95 {} p99 {}",
        r.completions, r.upstream_errors, r.error_rate, r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99
    );
    map(&mut o, "alerts", &r.alerts);
    o
}

/// `24h`, `7d`, `30d` (any duration the policy syntax takes).
pub fn parse_since(s: &str) -> Result<Micros, String> {
    decision_core::units::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: &str = "2026-11-27T12:00:00Z";

    fn decision(at: &str, ip: &str, subject: Option<&str>, code: u16, reason: &str, ms: f64) -> String {
        serde_json::json!({
            "event": "decision", "timestamp": at, "client_ip": ip, "subject": subject,
            "decision": if code == 200 { "allow" } else { "deny" }, "reason": reason,
            "response_code": code, "processing_time": ms,
        })
        .to_string()
    }

    fn log() -> String {
        let mut l = Vec::new();
        for i in 0..6 {
            l.push(decision("2026-11-27T10:00:00Z", "10.0.0.1", Some("alice"), 200, "allowed", f64::from(i)));
        }
        l.push(decision("2026-11-27T10:00:00Z", "10.0.0.2", Some("alice"), 200, "allowed", 1.0)); // a second address
        l.push(decision("2026-11-27T23:30:00Z", "10.0.0.3", Some("bob"), 200, "allowed", 1.0)); // outside the window
        l.push(decision("2026-11-27T02:30:00Z", "10.0.0.3", Some("bob"), 200, "allowed", 1.0)); // at night
        for _ in 0..3 {
            l.push(decision("2026-11-27T11:00:00Z", "203.0.113.9", None, 401, "api_key_unknown", 0.5));
        }
        l.push(decision("2026-11-27T11:00:00Z", "203.0.113.9", None, 401, "jwt_expired", 0.5));
        l.push(decision("2026-11-27T11:00:00Z", "10.0.0.1", Some("alice"), 429, "tier_rate_exceeded", 0.5));
        l.push(decision("2026-11-27T11:00:00Z", "10.0.0.4", Some("carol"), 403, "role_forbidden", 0.5));
        l.push(decision("2026-11-27T11:00:00Z", "10.0.0.4", Some("carol"), 413, "body_too_large", 0.5));
        l.push(decision("2026-11-21T11:00:00Z", "10.0.0.9", Some("old"), 200, "allowed", 0.5)); // six days ago
        for i in 0..10 {
            let code = if i < 2 { 502 } else { 200 };
            l.push(serde_json::json!({"event": "completion", "timestamp": "2026-11-27T11:00:01Z", "response_code": code, "processing_time": f64::from(i + 1) * 10.0}).to_string());
        }
        l.push(serde_json::json!({"event": "alert", "timestamp": "2026-11-27T11:00:02Z", "alert": "failed_auth", "level": "warn"}).to_string());
        l.push("not json".into());
        l.join("\n")
    }

    #[test]
    fn a_known_log_gives_known_figures() {
        let until = parse_rfc3339(NOON).expect("time");
        let r = build(&log(), until - parse_since("24h").expect("since"), until);
        assert_eq!((r.decisions, r.allowed, r.denied), (15, 8, 7));
        assert_eq!(
            r.auth_failures_by_reason,
            BTreeMap::from([("api_key_unknown".into(), 3), ("jwt_expired".into(), 1)])
        );
        assert_eq!(r.auth_failures_by_ip, [("203.0.113.9".to_owned(), 4)]);
        assert_eq!(r.rate_limited_by_subject, [("alice".to_owned(), 1)]);
        assert_eq!(r.payload_rejections, 1);
        assert_eq!(r.policy_violations_by_reason, BTreeMap::from([("role_forbidden".into(), 1)]));
        assert_eq!(r.subjects_from_several_ips, [("alice".to_owned(), 2)]);
        assert_eq!(r.off_hours_by_subject, [("bob".to_owned(), 1)]);
        assert_eq!(r.top_ips[0], ("10.0.0.1".to_owned(), 7));
        assert_eq!(r.top_subjects[0], ("alice".to_owned(), 8));
        assert_eq!((r.completions, r.upstream_errors, r.error_rate), (10, 2, 20.0));
        assert_eq!(r.latency_ms, Percentiles { p50: 50.0, p95: 100.0, p99: 100.0 });
        assert_eq!(r.alerts, BTreeMap::from([("failed_auth:warn".into(), 1)]));
        // a week back takes in the old decision too
        let week = build(&log(), until - parse_since("7d").expect("since"), until);
        assert_eq!(week.decisions, 16);
        let t = text(&r);
        assert!(t.contains("decisions: 15 (8 allowed, 7 denied)") && t.contains("api_key_unknown"), "{t}");
    }
}
