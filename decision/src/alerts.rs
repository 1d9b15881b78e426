//! Live monitoring against the policy's `alerts` thresholds, as the reference asks: failed
//! authentications per client address, the upstream error rate and response time (from Envoy's
//! access-log completions, over the last minute), and payload sizes. Crossing `warn` or
//! `critical` is an alert: an audit event, a metric, and a JSON POST to every webhook (on a task
//! of its own, retried with backoff, never slowing a decision). A critical failed-auth alert can
//! block the address (`alerts.failed_auth.block: true`).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{Map, Value};

use crate::clock;

/// The monitor's counters, registered by `Monitor::new`.
#[derive(Debug, Clone, Default)]
struct AlertMetrics {
    /// alerts raised, by kind and level (`portcullis_alerts_total`)
    alerts: Family<[(&'static str, &'static str); 2], Counter>,
    /// webhook deliveries that failed after every retry, or found the queue full
    /// (`portcullis_alert_webhook_failures_total`)
    webhook_failures: Counter,
}

/// Completions and addresses are judged over this window.
const WINDOW: Duration = Duration::from_secs(60);
/// No verdict on the error rate or response time with fewer completions in the window.
const MIN_COMPLETIONS: u64 = 20;
/// Addresses whose failures are remembered at most.
const MAX_ADDRESSES: usize = 10_000;
/// Alerts waiting for their webhooks at most.
const WEBHOOK_QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Levels<T> {
    pub warn: T,
    pub critical: T,
}

/// The policy's `alerts` section, compiled.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// basis points of completions that were upstream errors
    pub error_rate: Option<Levels<u64>>,
    /// p99 response time, microseconds
    pub response_time: Option<Levels<u64>>,
    /// failed authentications of one address within `failed_auth_window`
    pub failed_auth: Option<Levels<u64>>,
    pub failed_auth_window: Duration,
    /// block an address at its critical failed-auth alert (with `network.auto_block`'s duration)
    pub block_on_critical: bool,
    /// bytes
    pub payload_size: Option<Levels<u64>>,
    pub webhooks: Vec<crate::https::Url>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Level {
    #[default]
    Ok = 0,
    Warn = 1,
    Critical = 2,
}

impl Level {
    fn of(value: u64, l: &Levels<u64>) -> Level {
        if value >= l.critical {
            Level::Critical
        } else if value >= l.warn {
            Level::Warn
        } else {
            Level::Ok
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Critical => "critical",
        }
    }
}

/// One second of completions.
#[derive(Debug, Clone, Copy, Default)]
struct Second {
    at: u64,
    total: u64,
    errors: u64,
    over_warn: u64,
    over_critical: u64,
}

#[derive(Default)]
struct State {
    /// failures per address, newest last, with the level last alerted
    failures: HashMap<IpAddr, (VecDeque<Instant>, Level)>,
    seconds: Vec<Second>,
    error_level: Level,
    latency_level: Level,
    /// (kind, level) -> when its webhook last went out (payload alerts come per request)
    last_sent: HashMap<(&'static str, Level), Instant>,
}

/// An alert to raise: its JSON, and whether it asks to block an address.
pub struct Raised {
    pub event: Map<String, Value>,
    pub block: Option<IpAddr>,
}

pub struct Monitor {
    settings: AlertSettings,
    state: Mutex<State>,
    hooks: Option<tokio::sync::mpsc::Sender<String>>,
    instance: String,
    metrics: AlertMetrics,
}

impl Monitor {
    /// A monitor whose counters are registered into `registry` (`portcullis_alerts_total`,
    /// `portcullis_alert_webhook_failures_total`); webhooks are posted from a task on `runtime`.
    pub fn new(
        settings: AlertSettings,
        instance: String,
        runtime: Option<&tokio::runtime::Handle>,
        registry: &mut Registry,
    ) -> Monitor {
        let metrics = AlertMetrics::default();
        registry.register("alerts", "Alerts raised, by kind and level", metrics.alerts.clone());
        registry.register(
            "alert_webhook_failures",
            "Alert webhook deliveries that failed after every retry (or found the queue full)",
            metrics.webhook_failures.clone(),
        );
        let hooks = match runtime {
            Some(rt) if !settings.webhooks.is_empty() => {
                let (tx, rx) = tokio::sync::mpsc::channel(WEBHOOK_QUEUE);
                rt.spawn(deliver(settings.webhooks.clone(), rx, metrics.webhook_failures.clone()));
                Some(tx)
            }
            _ => None,
        };
        Monitor { settings, state: Mutex::new(State::default()), hooks, instance, metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, kind: &'static str, level: Level, value: f64, threshold: f64, ip: Option<IpAddr>) -> Raised {
        self.metrics.alerts.get_or_create(&[("kind", kind), ("level", level.as_str())]).inc();
        let mut ev = Map::new();
        ev.insert("event".into(), "alert".into());
        ev.insert("timestamp".into(), clock::rfc3339(clock::now_micros()).into());
        ev.insert("alert".into(), kind.into());
        ev.insert("level".into(), level.as_str().into());
        ev.insert("value".into(), value.into());
        ev.insert("threshold".into(), threshold.into());
        ev.insert("client_ip".into(), ip.map_or(Value::Null, |ip| ip.to_string().into()));
        ev.insert("instance".into(), self.instance.clone().into());
        tracing::warn!(alert = kind, level = level.as_str(), value, threshold, client_ip = ?ip, "alert");
        let dedupe = kind == "payload_size";
        let send = {
            let mut st = self.lock();
            let now = clock::instant();
            let recent = st.last_sent.get(&(kind, level)).is_some_and(|t| now.duration_since(*t) < WINDOW);
            if dedupe && recent {
                false
            } else {
                st.last_sent.insert((kind, level), now);
                true
            }
        };
        if send
            && let Some(tx) = &self.hooks
            && tx.try_send(Value::Object(ev.clone()).to_string()).is_err()
        {
            self.metrics.webhook_failures.inc();
        }
        let block = (kind == "failed_auth" && level == Level::Critical && self.settings.block_on_critical)
            .then_some(ip)
            .flatten();
        Raised { event: ev, block }
    }

    /// A failed authentication from `ip`: an alert when the address crosses a level.
    pub fn failed_auth(&self, ip: IpAddr) -> Option<Raised> {
        let levels = self.settings.failed_auth?;
        let window = self.settings.failed_auth_window;
        let now = clock::instant();
        let (count, level, crossed) = {
            let mut st = self.lock();
            if st.failures.len() >= MAX_ADDRESSES && !st.failures.contains_key(&ip) {
                st.failures.retain(|_, (q, _)| q.back().is_some_and(|t| now.duration_since(*t) < window));
                if st.failures.len() >= MAX_ADDRESSES {
                    st.failures.clear();
                }
            }
            let (q, last) = st.failures.entry(ip).or_default();
            q.push_back(now);
            while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
                q.pop_front();
            }
            while q.len() as u64 > levels.critical + 1 {
                q.pop_front();
            }
            let count = q.len() as u64;
            let level = Level::of(count, &levels);
            let crossed = level > *last;
            *last = level;
            (count, level, crossed)
        };
        let threshold = if level == Level::Critical { levels.critical } else { levels.warn };
        crossed.then(|| self.raise("failed_auth", level, count as f64, threshold as f64, Some(ip)))
    }

    /// A request declared `size` bytes: an alert (its webhook at most once a minute a level).
    pub fn payload(&self, size: u64) -> Option<Raised> {
        let levels = self.settings.payload_size?;
        let level = Level::of(size, &levels);
        let threshold = if level == Level::Critical { levels.critical } else { levels.warn };
        (level > Level::Ok).then(|| self.raise("payload_size", level, size as f64, threshold as f64, None))
    }

    /// A completion from the access log.
    pub fn completion(&self, error: bool, latency: Duration) {
        let mut st = self.lock();
        let sec = clock::now_micros() / 1_000_000;
        if st.seconds.len() != 60 {
            st.seconds = vec![Second::default(); 60];
        }
        let slot = &mut st.seconds[(sec % 60) as usize];
        if slot.at != sec {
            *slot = Second { at: sec, ..Second::default() };
        }
        slot.total += 1;
        slot.errors += u64::from(error);
        if let Some(l) = &self.settings.response_time {
            let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
            slot.over_warn += u64::from(us > l.warn);
            slot.over_critical += u64::from(us > l.critical);
        }
    }

    /// Evaluates the last minute of completions (the server ticks it every second).
    pub fn tick(&self) -> Vec<Raised> {
        let now_sec = clock::now_micros() / 1_000_000;
        let (total, errors, over_warn, over_critical) = {
            let st = self.lock();
            st.seconds
                .iter()
                .filter(|s| s.at + 60 > now_sec)
                .fold((0, 0, 0, 0), |a, s| (a.0 + s.total, a.1 + s.errors, a.2 + s.over_warn, a.3 + s.over_critical))
        };
        let mut out = Vec::new();
        if total < MIN_COMPLETIONS {
            let mut st = self.lock();
            (st.error_level, st.latency_level) = (Level::Ok, Level::Ok);
            return out;
        }
        if let Some(l) = self.settings.error_rate {
            let rate = errors * 10_000 / total;
            let level = Level::of(rate, &l);
            let prev = std::mem::replace(&mut self.lock().error_level, level);
            if level > prev {
                let t = if level == Level::Critical { l.critical } else { l.warn };
                out.push(self.raise("error_rate", level, rate as f64 / 100.0, t as f64 / 100.0, None));
            }
        }
        if self.settings.response_time.is_some() {
            // p99 above a threshold <=> more than 1% of completions slower than it
            let level = if over_critical * 100 > total {
                Level::Critical
            } else if over_warn * 100 > total {
                Level::Warn
            } else {
                Level::Ok
            };
            let prev = std::mem::replace(&mut self.lock().latency_level, level);
            if level > prev {
                let l = self
                    .settings
                    .response_time
                    .map_or(0, |l| if level == Level::Critical { l.critical } else { l.warn });
                out.push(self.raise("response_time", level, over_warn as f64 / total as f64, l as f64 / 1000.0, None));
            }
        }
        out
    }
}

/// Posts every alert to every webhook: three tries with backoff each, on tasks of their own.
async fn deliver(hooks: Vec<crate::https::Url>, mut rx: tokio::sync::mpsc::Receiver<String>, failures: Counter) {
    let client = match crate::https::HttpsClient::new(None, Duration::from_secs(5), 64 * 1024) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot make the alert webhook client");
            return;
        }
    };
    while let Some(body) = rx.recv().await {
        for url in &hooks {
            let (client, url, body, failures) = (client.clone(), url.clone(), body.clone(), failures.clone());
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(200);
                for attempt in 1..=3 {
                    match client.post_json(&url, body.clone()).await {
                        Ok(r) if r.status.is_success() => return,
                        Ok(r) => tracing::warn!(%url, status = r.status.as_u16(), attempt, "alert webhook refused"),
                        Err(e) => tracing::warn!(%url, error = %e, attempt, "alert webhook failed"),
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                failures.inc();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AlertSettings {
        AlertSettings {
            error_rate: Some(Levels { warn: 500, critical: 1000 }),
            response_time: Some(Levels { warn: 500_000, critical: 2_000_000 }),
            failed_auth: Some(Levels { warn: 3, critical: 5 }),
            failed_auth_window: WINDOW,
            block_on_critical: true,
            payload_size: Some(Levels { warn: 1 << 20, critical: 5 << 20 }),
            webhooks: Vec::new(),
        }
    }

    #[test]
    fn failed_auth_alerts_once_per_level_per_address() {
        let m = Monitor::new(settings(), "pc".into(), None, &mut Registry::default());
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        let levels: Vec<Option<String>> = (0..7)
            .map(|_| m.failed_auth(ip).map(|r| r.event["level"].as_str().unwrap_or_default().to_owned()))
            .collect();
        assert_eq!(levels, [None, None, Some("warn".into()), None, Some("critical".into()), None, None]);
        assert!(m.failed_auth(other).is_none(), "addresses are judged apart");
        // the critical one asks for a block
        let m = Monitor::new(settings(), "pc".into(), None, &mut Registry::default());
        let blocks: Vec<Option<IpAddr>> = (0..5).filter_map(|_| m.failed_auth(ip)).map(|r| r.block).collect();
        assert_eq!(blocks, [None, Some(ip)]);
    }

    #[test]
    fn error_rate_and_response_time_over_the_last_minute() {
        let m = Monitor::new(settings(), "pc".into(), None, &mut Registry::default());
        for i in 0..19 {
            m.completion(i < 10, Duration::from_millis(3000));
        }
        assert!(m.tick().is_empty(), "no verdict on 19 completions");
        m.completion(false, Duration::from_millis(1));
        let kinds: Vec<(String, String)> = m
            .tick()
            .iter()
            .map(|r| {
                (
                    r.event["alert"].as_str().unwrap_or_default().into(),
                    r.event["level"].as_str().unwrap_or_default().into(),
                )
            })
            .collect();
        assert_eq!(kinds, [("error_rate".into(), "critical".into()), ("response_time".into(), "critical".into())]);
        assert!(m.tick().is_empty(), "raised once while it lasts");
        assert_eq!(m.payload(2 << 20).map(|r| r.event["level"].clone()), Some("warn".into()));
        assert!(m.payload(1000).is_none());
    }
}
