//! The drivers. Closed loop: C connections x S streams each, every stream sending its next
//! request when the last one answers (as h2load does). Open loop: requests due at a fixed rate,
//! sent whether or not earlier ones have answered, latency counted from when each was due.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use proto::ext_authz::authorization_client::AuthorizationClient;
use proto::portcullis_v1::decision_client::DecisionClient;
use proto::ratelimit::rate_limit_service_client::RateLimitServiceClient;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use crate::hist;
use crate::schedule;
use crate::target::{
    Counts, Kind, Outcome, Spec, classify_check, classify_http, classify_native, classify_rls, key_index,
};

#[derive(Debug, Clone)]
pub struct Config {
    pub addr: String,
    /// the HTTP targets over HTTPS, trusting this CA
    pub ca_file: Option<std::path::PathBuf>,
    pub connections: usize,
    pub streams: usize,
    pub duration: Duration,
    /// stop after this many requests (closed loop), whatever the duration
    pub requests: Option<u64>,
    /// open loop at this many requests a second
    pub rate: Option<u64>,
    pub sequential_keys: bool,
    /// open loop: requests in flight at most; a request due beyond it counts as an error
    pub max_in_flight: usize,
    pub spec: Spec,
    /// requests answered so far (for a progress display)
    pub progress: Arc<AtomicU64>,
}

pub struct RunResult {
    pub hist: Histogram<u64>,
    pub counts: Counts,
    pub elapsed: Duration,
}

type HttpPool = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<hyper::body::Bytes>,
>;

#[derive(Clone)]
enum Client {
    ExtAuthz(AuthorizationClient<Channel>),
    Rls(RateLimitServiceClient<Channel>),
    Native(DecisionClient<Channel>),
    /// a keep-alive pool: as many HTTP/1.1 connections as requests in flight; the authority,
    /// and whether it is HTTPS
    Http(HttpPool, Arc<str>, bool),
}

impl Client {
    async fn send(&mut self, spec: &Spec, i: u64, key: u64) -> Outcome {
        match self {
            Client::ExtAuthz(c) => match c.check(spec.check_request(i, key)).await {
                Ok(r) => classify_check(r.get_ref()),
                Err(_) => Outcome::Error,
            },
            Client::Native(c) => match c.check(spec.native_request(i, key)).await {
                Ok(r) => classify_native(r.get_ref()),
                Err(_) => Outcome::Error,
            },
            Client::Rls(c) => match c.should_rate_limit(spec.rls_request(key)).await {
                Ok(r) => classify_rls(r.get_ref()),
                Err(_) => Outcome::Error,
            },
            Client::Http(pool, authority, tls) => {
                match pool.request(spec.http_request(if *tls { "https" } else { "http" }, authority, i, key)).await {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        // read the body to its end, so the connection can be reused
                        use http_body_util::BodyExt;
                        match res.into_body().collect().await {
                            Ok(_) => classify_http(status),
                            Err(_) => Outcome::Error,
                        }
                    }
                    Err(_) => Outcome::Error,
                }
            }
        }
    }
}

async fn connect(cfg: &Config) -> anyhow::Result<Vec<Client>> {
    if matches!(cfg.spec.kind, Kind::Http | Kind::ForwardAuth) {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &cfg.ca_file {
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
                roots.add(c?)?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let pool = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(cfg.connections.max(1) * cfg.streams.max(1))
            .build(https);
        let client = Client::Http(pool, Arc::from(cfg.addr.as_str()), cfg.ca_file.is_some());
        return Ok(vec![client; cfg.connections.max(1)]);
    }
    let mut clients = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections.max(1) {
        // one Endpoint per connection: each connect() opens its own HTTP/2 connection
        let channel = Endpoint::from_shared(format!("http://{}", cfg.addr))?
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        clients.push(match cfg.spec.kind {
            Kind::ExtAuthz => Client::ExtAuthz(AuthorizationClient::new(channel)),
            Kind::Native => Client::Native(DecisionClient::new(channel)),
            Kind::Rls | Kind::Http | Kind::ForwardAuth => Client::Rls(RateLimitServiceClient::new(channel)),
        });
    }
    Ok(clients)
}

pub async fn closed_loop(cfg: &Config) -> anyhow::Result<RunResult> {
    let clients = connect(cfg).await?;
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    for client in &clients {
        for _ in 0..cfg.streams.max(1) {
            let mut client = client.clone();
            let next = next.clone();
            let progress = cfg.progress.clone();
            let spec = cfg.spec.clone();
            let (requests, sequential) = (cfg.requests, cfg.sequential_keys);
            tasks.push(tokio::spawn(async move {
                let mut h = hist::new();
                let mut counts = Counts::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if requests.is_some_and(|n| i >= n) || (requests.is_none() && Instant::now() >= deadline) {
                        break;
                    }
                    let sent = Instant::now();
                    let outcome = client.send(&spec, i, key_index(i, spec.keys, sequential)).await;
                    progress.fetch_add(1, Ordering::Relaxed);
                    hist::record(&mut h, u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
                    counts.add(outcome);
                }
                (h, counts)
            }));
        }
    }
    let mut hists = Vec::new();
    let mut counts = Counts::default();
    for t in tasks {
        let (h, c) = t.await?;
        hists.push(h);
        counts.merge(&c);
    }
    Ok(RunResult { hist: hist::merge(&hists), counts, elapsed: start.elapsed() })
}

pub async fn open_loop(cfg: &Config, rate: u64) -> anyhow::Result<RunResult> {
    let clients = connect(cfg).await?;
    let total = schedule::count(cfg.duration, rate);
    let shared = Arc::new(Mutex::new((hist::new(), Counts::default())));
    let permits = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(usize::try_from(total.min(1 << 20)).unwrap_or(0));
    for i in 0..total {
        let due = start + schedule::due(i, rate);
        tokio::time::sleep_until(due).await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // the client cannot keep up with the schedule: counted, never silently skipped
            if let Ok(mut g) = shared.lock() {
                g.1.add(Outcome::Error);
            }
            continue;
        };
        let mut client = clients[usize::try_from(i).unwrap_or(0) % clients.len()].clone();
        let spec = cfg.spec.clone();
        let shared = shared.clone();
        let progress = cfg.progress.clone();
        let key = key_index(i, spec.keys, cfg.sequential_keys);
        tasks.push(tokio::spawn(async move {
            let outcome = client.send(&spec, i, key).await;
            progress.fetch_add(1, Ordering::Relaxed);
            let latency = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Ok(mut g) = shared.lock() {
                hist::record(&mut g.0, latency);
                g.1.add(outcome);
            }
            drop(permit);
        }));
        if tasks.len() >= 4096 {
            tasks.retain(|t| !t.is_finished());
        }
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed();
    let (h, counts) = match Arc::try_unwrap(shared) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(arc) => arc.lock().map(|g| (g.0.clone(), g.1)).unwrap_or_else(|e| (e.get_ref().0.clone(), e.get_ref().1)),
    };
    Ok(RunResult { hist: h, counts, elapsed })
}
