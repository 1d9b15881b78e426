//! One case's figures, as JSON for machines and a markdown row for people.

use crate::hist;
use crate::run::RunResult;

#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub mode: String,
    pub connections: usize,
    pub streams: usize,
    pub result_rps: f64,
    pub percentiles_us: [u64; 5],
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub over_limit: u64,
    pub errors: u64,
    pub client_cpu_pct: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub server_rss_delta_bytes: Option<i64>,
}

impl Case {
    pub fn from_run(name: &str, mode: &str, connections: usize, streams: usize, r: &RunResult) -> Case {
        let requests = r.counts.total();
        Case {
            name: name.to_owned(),
            mode: mode.to_owned(),
            connections,
            streams,
            result_rps: requests as f64 / r.elapsed.as_secs_f64().max(1e-9),
            percentiles_us: hist::percentiles(&r.hist),
            requests,
            allowed: r.counts.allowed,
            denied: r.counts.denied,
            over_limit: r.counts.over_limit,
            errors: r.counts.errors,
            client_cpu_pct: None,
            server_cpu_pct: None,
            server_rss_delta_bytes: None,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let [p50, p90, p99, p999, max] = self.percentiles_us;
        serde_json::json!({
            "name": self.name,
            "mode": self.mode,
            "connections": self.connections,
            "streams": self.streams,
            "requests": self.requests,
            "rps": (self.result_rps * 10.0).round() / 10.0,
            "latency_us": { "p50": p50, "p90": p90, "p99": p99, "p99.9": p999, "max": max },
            "outcomes": { "allowed": self.allowed, "denied": self.denied, "over_limit": self.over_limit, "errors": self.errors },
            "client_cpu_pct": self.client_cpu_pct,
            "server_cpu_pct": self.server_cpu_pct,
            "server_rss_delta_bytes": self.server_rss_delta_bytes,
        })
    }

    pub const MARKDOWN_HEADER: &'static str = "| case | mode | conns x streams | req/s | p50 us | p90 us | p99 us | p99.9 us | max us | allowed | over | denied | errors | client CPU | server CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    pub fn markdown_row(&self) -> String {
        let [p50, p90, p99, p999, max] = self.percentiles_us;
        let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}%"));
        format!(
            "| {} | {} | {}x{} | {:.0} | {p50} | {p90} | {p99} | {p999} | {max} | {} | {} | {} | {} | {} | {} |",
            self.name,
            self.mode,
            self.connections,
            self.streams,
            self.result_rps,
            self.allowed,
            self.over_limit,
            self.denied,
            self.errors,
            pct(self.client_cpu_pct),
            pct(self.server_cpu_pct)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{Counts, Outcome};

    #[test]
    fn a_case_reports_throughput_percentiles_and_outcomes() {
        let mut h = hist::new();
        let mut counts = Counts::default();
        for v in 1..=100 {
            hist::record(&mut h, v);
            counts.add(if v <= 90 { Outcome::Allowed } else { Outcome::OverLimit });
        }
        let r = RunResult { hist: h, counts, elapsed: std::time::Duration::from_secs(2) };
        let c = Case::from_run("rls-1", "closed", 4, 8, &r);
        assert_eq!(c.result_rps, 50.0);
        let j = c.json();
        assert_eq!(j["outcomes"]["allowed"], 90);
        assert_eq!(j["outcomes"]["over_limit"], 10);
        assert_eq!(j["latency_us"]["max"], 100);
        let row = c.markdown_row();
        assert!(row.starts_with("| rls-1 | closed | 4x8 | 50 |"), "{row}");
        assert_eq!(
            row.matches('|').count(),
            Case::MARKDOWN_HEADER.lines().next().map_or(0, |l| l.matches('|').count())
        );
    }
}
