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
    /// the store's (a redis-server's), when its pid was given
    pub store_cpu_pct: Option<f64>,
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
            store_cpu_pct: None,
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
            "store_cpu_pct": self.store_cpu_pct,
            "server_rss_delta_bytes": self.server_rss_delta_bytes,
        })
    }

    pub const MARKDOWN_HEADER: &'static str = "| case | mode | conns x streams | req/s | p50 us | p90 us | p99 us | p99.9 us | max us | allowed | over | denied | errors | client CPU | server CPU | store CPU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

    pub fn markdown_row(&self) -> String {
        let [p50, p90, p99, p999, max] = self.percentiles_us;
        let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}%"));
        format!(
            "| {} | {} | {}x{} | {:.0} | {p50} | {p90} | {p99} | {p999} | {max} | {} | {} | {} | {} | {} | {} | {} |",
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
            pct(self.server_cpu_pct),
            pct(self.store_cpu_pct)
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

/// One open-loop run of a sweep: the offered rate and the latency percentiles it got (µs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPoint {
    pub offered: u64,
    pub achieved: f64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
}

/// An SVG chart of latency percentiles (log scale) against offered load.
pub fn svg(title: &str, points: &[SweepPoint]) -> String {
    use std::fmt::Write;
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let max_rate = points.iter().map(|p| p.offered).max().unwrap_or(1).max(1) as f64;
    let lat = |p: &SweepPoint| [p.p50, p.p99, p.p999];
    let lo = points.iter().flat_map(lat).filter(|v| *v > 0).min().unwrap_or(1).max(1) as f64;
    let hi = points.iter().flat_map(lat).max().unwrap_or(10).max(10) as f64;
    let (log_lo, log_hi) = (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0));
    let x = |rate: f64| left + (w - left - right) * rate / max_rate;
    let y = |us: f64| {
        let v = us.max(1.0).log10().clamp(log_lo, log_hi);
        top + (h - top - bottom) * (1.0 - (v - log_lo) / (log_hi - log_lo))
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" font-size="15">{}</text>"#, left, escape(title));
    // axes, decades on the latency axis, five steps on the load axis
    let _ =
        writeln!(s, r#"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - bottom, w - right, h - bottom);
    let _ = writeln!(s, r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"#, h - bottom);
    let mut d = log_lo;
    while d <= log_hi {
        let us = 10f64.powf(d);
        let label = if us >= 1000.0 { format!("{} ms", us / 1000.0) } else { format!("{us} µs") };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{label}</text>"##,
            y(us),
            w - right,
            left - 6.0,
            y(us) + 4.0
        );
        d += 1.0;
    }
    for i in 0..=5 {
        let rate = max_rate * f64::from(i) / 5.0;
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{:.0}</text>"#, x(rate), h - bottom + 18.0, rate);
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (requests/s)</text>"#,
        (left + w - right) / 2.0,
        h - 10.0
    );
    for (k, (name, color)) in [("p50", "#1f77b4"), ("p99", "#ff7f0e"), ("p99.9", "#d62728")].iter().enumerate() {
        let pts: Vec<String> =
            points.iter().map(|p| format!("{:.1},{:.1}", x(p.offered as f64), y(lat(p)[k] as f64))).collect();
        let _ = writeln!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        for p in &pts {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
        }
        let ly = top + 16.0 * k as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            w - 110.0,
            w - 90.0,
            w - 84.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod svg_tests {
    use super::*;

    #[test]
    fn the_chart_has_a_line_per_percentile_and_a_point_per_rate() {
        let pts: Vec<SweepPoint> = [(100, 200, 900, 1500), (200, 210, 1200, 4000), (400, 300, 9000, 30000)]
            .map(|(r, a, b, c)| SweepPoint { offered: r, achieved: r as f64, p50: a, p99: b, p999: c })
            .to_vec();
        let s = svg("ext_authz <api key>", &pts);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert_eq!(s.matches("<circle").count(), 9);
        assert!(s.contains("ext_authz &lt;api key&gt;"));
        assert!(s.contains("10 ms") && s.contains("100 µs"), "decade labels");
    }
}
