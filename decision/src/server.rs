//! Server wiring: the gRPC port (ext_authz v3, ratelimit v3, access log v3, portcullis.v1.Decision, grpc.health.v1) with explicit limits, the
//! HTTP port (/healthz, /readyz, /metrics), the forward-auth listener, the admin API's listener
//! (portcullis.v1.Admin, its own grpc.health.v1 and reflection), policy reload on SIGHUP, and
//! graceful shutdown on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use proto::accesslog::access_log_service_server::AccessLogServiceServer;
use proto::ext_authz::authorization_server::AuthorizationServer;
use proto::portcullis_v1::admin_server::AdminServer;
use proto::portcullis_v1::decision_server::DecisionServer;
use proto::ratelimit::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::admin::service::{AdminApi, PolicyStatus};
use crate::api::accesslog::AccessLog;
use crate::api::ext_authz::ExtAuthz;
use crate::api::native::DecisionApi;
use crate::api::ratelimit::Rls;
use crate::clock;
use crate::config::{self, Config, StoreSettings};
use crate::engine::Engine;
use crate::store::{MemoryStore, RedisStore, Store, StoreError};

/// Largest gRPC message accepted: Envoy's own header limit is 60 KiB by default, so a Check
/// request is far below this; anything near it is not a real request.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 << 20;
/// HTTP/2 streams one connection may have open; Envoy multiplexes Check calls on few connections.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest HTTP/2 header list of a gRPC call (gRPC metadata, not the checked request's headers).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections are closed (with a GOAWAY and a grace period) after this long, so that Envoy's
/// long-lived connections spread over new instances when the fleet scales out.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
pub const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);
/// How often expired quota keys are swept from the memory store.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("admin HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

struct Admin<S> {
    engine: Arc<Engine<S>>,
    serving: Arc<AtomicBool>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz<S: Store>(State(a): State<Arc<Admin<S>>>) -> impl IntoResponse {
    let store_ok = a.engine.store().ready();
    let serving = a.serving.load(Ordering::Relaxed);
    let body = format!(
        "serving: {serving}\nstore ({}): {}\n",
        a.engine.store().backend(),
        if store_ok { "up" } else { "down" }
    );
    (if serving && store_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, body)
}

async fn metrics<S: Store>(State(a): State<Arc<Admin<S>>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], a.engine.metrics.encode())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { what, addr, source })
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C). The SIGTERM handler is
/// installed when this is called, not when the future is first polled: a signal that arrives
/// right after "listening" then stops the service cleanly instead of killing the process.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        if let Ok(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}

/// What a policy reload needs, and what it updates: the engine's policy, the admin tokens,
/// the status `GetStatus` reports, and the files a watch looks at.
struct Reloader<S> {
    engine: Arc<Engine<S>>,
    file: PathBuf,
    auth_metrics: crate::auth::AuthMetrics,
    status: Arc<Mutex<PolicyStatus>>,
    admin: Option<Arc<arc_swap::ArcSwap<crate::admin::AdminSettings>>>,
    /// the files the policy in force was read from, besides the policy file
    sources: Mutex<Vec<PathBuf>>,
}

/// What a file looks like to a watch: where its path leads (a Kubernetes ConfigMap's files are
/// symlinks through `..data`, swapped whole), and that target's size, modification time and
/// inode; None when it cannot be read.
type FileMark = (PathBuf, Option<(PathBuf, u64, Option<std::time::SystemTime>, u64)>);

fn mark(path: &std::path::Path) -> FileMark {
    let seen = std::fs::canonicalize(path).ok().and_then(|target| {
        let m = std::fs::metadata(&target).ok()?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        Some((target, m.len(), m.modified().ok(), ino))
    });
    (path.to_owned(), seen)
}

impl<S: Store> Reloader<S> {
    /// The marks of the policy file and the files it named.
    fn marks(&self) -> Vec<FileMark> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner()).clone();
        std::iter::once(self.file.clone()).chain(sources).map(|p| mark(&p)).collect()
    }

    /// Loads the policy again: a valid one is swapped in whole (with the admin tokens), an
    /// invalid one is refused with its problems, counted (`result="error"`) and recorded for
    /// `GetStatus`, and the old one keeps serving.
    fn reload(&self, why: &str) {
        match config::load_with(&self.file, &self.auth_metrics) {
            Ok(cfg) => {
                self.engine.replace_policy(cfg.policy);
                // the admin tokens follow the policy (a token removed there is refused at
                // once); the listener's address changes only at a restart
                if let Some(admin) = &self.admin {
                    let next = cfg.settings.admin.clone().unwrap_or_else(|| crate::admin::AdminSettings {
                        addr: admin.load().addr,
                        tokens: Vec::new(),
                        tls: admin.load().tls.clone(),
                    });
                    if next.addr != admin.load().addr {
                        tracing::warn!("listen.admin changed: the admin API keeps its address until a restart");
                    }
                    admin.store(Arc::new(next));
                }
                self.engine.metrics.reload(true);
                tracing::info!(file = %self.file.display(), version = %cfg.version, why, "policy reloaded");
                *self.sources.lock().unwrap_or_else(|e| e.into_inner()) = cfg.sources;
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                st.version = cfg.version;
                st.loaded_at = clock::now_micros();
                st.last_error = None;
            }
            Err(e) => {
                self.engine.metrics.reload(false);
                tracing::error!(file = %self.file.display(), problems = %e, why, "policy reload refused; the previous policy stays in force");
                self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error =
                    Some((e.to_string(), clock::now_micros()));
            }
        }
    }
}

/// Reloads the policy on SIGHUP. Like `stop_signal`, the handler is installed when this is
/// called.
fn reload_on_hangup<S: Store>(r: Arc<Reloader<S>>) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = hup else {
                tracing::warn!("cannot listen for SIGHUP; policy reload is off");
                return;
            };
            while hup.recv().await.is_some() {
                r.reload("SIGHUP");
            }
        }
        #[cfg(not(unix))]
        let _ = r;
    }
}

/// Reloads the policy when its file, or a file it names, changes (checked every `every`): a
/// write in place, a replacement, or Kubernetes' swap of a mounted ConfigMap's or Secret's
/// `..data` symlink, which a watch of the file itself would miss. A change that does not load
/// is tried again only once the files change again.
async fn reload_on_change<S: Store>(r: Arc<Reloader<S>>, every: Duration) {
    let mut seen = r.marks();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = r.marks();
        if now != seen {
            r.reload("the policy's files changed");
            // after a load, its own list of files; marks taken now, so a change made while it
            // loaded is seen at the next tick
            seen = r.marks();
        }
    }
}

/// How often a Redis store that is down is probed, so /readyz reports it back up on its own.
pub const STORE_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Where the gRPC listener's connections are served (`portcullis serve --runtime`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connections {
    /// On the runtime that runs [`serve`], with everything else.
    Here,
    /// On this many current-thread runtimes of their own, one per core ([`crate::connections`]).
    PerCore(usize),
}

/// Runs the service on the store the policy names until a stop signal, serving gRPC
/// connections as `connections` says.
pub async fn serve(cfg: Config, connections: Connections) -> Result<(), ServeError> {
    match cfg.settings.store.clone() {
        StoreSettings::Memory => serve_memory(cfg, connections).await,
        StoreSettings::Redis(r) => {
            let store = RedisStore::connect(&r)?;
            let engine = Engine::shared(cfg.policy.clone(), store);
            engine.store().register_metrics(&mut engine.metrics.registry());
            if r.cluster.is_empty() {
                tracing::info!(url = %crate::store::redis::redacted(&r.url), timeout_ms = r.timeout.as_millis(), pool_size = r.pool_size, "using the Redis store");
            } else {
                let nodes: Vec<String> = r.cluster.iter().map(|u| crate::store::redis::redacted(u)).collect();
                tracing::info!(cluster = ?nodes, timeout_ms = r.timeout.as_millis(), pool_size = r.pool_size, "using the Redis Cluster store");
            }
            {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(STORE_PROBE_EVERY);
                    let mut was: Option<Result<(), String>> = None;
                    loop {
                        tick.tick().await;
                        let now = engine.store().probe().await.map_err(|e| e.to_string());
                        // logged when it changes: up, or down for another reason
                        if was.as_ref() != Some(&now) {
                            match &now {
                                Ok(()) => tracing::info!("redis store is up: it answers and runs the scripts"),
                                Err(e) => tracing::warn!(
                                    error = %e,
                                    "redis store cannot decide (not ready); answering by on_store_error"
                                ),
                            }
                            was = Some(now);
                        }
                    }
                });
            }
            run(cfg, engine, connections).await
        }
    }
}

async fn serve_memory(cfg: Config, connections: Connections) -> Result<(), ServeError> {
    let store = MemoryStore::new();
    let engine = Engine::shared(cfg.policy.clone(), store);
    {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let left = engine.store().sweep(clock::now_micros());
                tracing::debug!(keys = left, "memory store swept");
            }
        });
    }
    run(cfg, engine, connections).await
}

async fn run<S: Store>(cfg: Config, engine: Arc<Engine<S>>, connections: Connections) -> Result<(), ServeError> {
    engine.watch_freed();
    // the store-held API keys (the admin API's): read now, then again every so often for a
    // change announcement this instance missed
    if let Some(p) = cfg.settings.key_pepper.clone() {
        engine.set_key_pepper(p);
        tracing::info!("store-held API keys are digested with the key pepper");
    }
    if let Err(e) = engine.load_keys(true).await {
        tracing::warn!(error = %e, "store-held API keys cannot be read yet; retrying in the background");
    }
    {
        let engine = engine.clone();
        tokio::spawn(async move {
            let every = crate::engine::admin::KEY_RESYNC_EVERY;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            let mut failing = false;
            loop {
                tick.tick().await;
                match engine.load_keys(false).await {
                    Ok(n) => {
                        if failing || n > 0 {
                            tracing::debug!(keys = n, "store-held API keys read");
                        }
                        failing = false;
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "store-held API keys cannot be read; the last ones read stay in force");
                    }
                    Err(_) => {}
                }
            }
        });
    }
    // work that outlives a request runs here, not on a per-core runtime that ends as it drains
    engine.set_background(tokio::runtime::Handle::current());
    cfg.auth_metrics.register(&mut engine.metrics.registry());
    let audit = match &cfg.settings.audit {
        Some(a) => {
            let audit =
                crate::audit::Audit::start(a, Some(tokio::runtime::Handle::current()), &mut engine.metrics.registry())
                    .map_err(ServeError::Http)?;
            tracing::info!(instance = %a.instance, sinks = a.sinks.len(), "audit trail on");
            engine.set_audit(audit.clone());
            Some(audit)
        }
        None => None,
    };
    if let Some(a) = &cfg.settings.alerts {
        let instance = cfg.settings.audit.as_ref().map_or_else(crate::audit::host_name, |a| a.instance.clone());
        let monitor = Arc::new(crate::alerts::Monitor::new(
            a.clone(),
            instance,
            Some(&tokio::runtime::Handle::current()),
            &mut engine.metrics.registry(),
        ));
        engine.set_alerts(monitor.clone());
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let policy = engine.policy();
                for r in monitor.tick() {
                    engine.raised(&policy, r, 0).await;
                }
            }
        });
    }
    let grpc_listener = bind("grpc", cfg.settings.grpc_addr).await?;
    let http_listener = bind("http", cfg.settings.http_addr).await?;
    let grpc_addr = grpc_listener.local_addr().map_err(ServeError::Http)?;
    let http_addr = http_listener.local_addr().map_err(ServeError::Http)?;
    let forward_auth_listener = match cfg.settings.forward_auth_addr {
        Some(a) => Some(bind("forward_auth", a).await?),
        None => None,
    };
    let forward_auth_addr = match &forward_auth_listener {
        Some(l) => Some(l.local_addr().map_err(ServeError::Http)?),
        None => None,
    };
    let admin_listener = match &cfg.settings.admin {
        Some(a) => Some(bind("admin", a.addr).await?),
        None => None,
    };
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(ServeError::Http)?),
        None => None,
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AuthorizationServer<ExtAuthz<S>>>().await;
    health_reporter.set_serving::<RateLimitServiceServer<Rls<S>>>().await;
    health_reporter.set_serving::<DecisionServer<DecisionApi<S>>>().await;
    let serving = Arc::new(AtomicBool::new(true));

    let (stop_tx, stop_rx) = watch::channel(false);
    let status = Arc::new(Mutex::new(PolicyStatus {
        version: cfg.version.clone(),
        file: cfg.file.display().to_string(),
        loaded_at: clock::now_micros(),
        last_error: None,
    }));
    let admin_settings = cfg.settings.admin.clone().map(|a| Arc::new(arc_swap::ArcSwap::from_pointee(a)));
    let reloader = Arc::new(Reloader {
        engine: engine.clone(),
        file: cfg.file.clone(),
        auth_metrics: cfg.auth_metrics.clone(),
        status: status.clone(),
        admin: admin_settings.clone(),
        sources: Mutex::new(cfg.sources.clone()),
    });
    tokio::spawn(reload_on_hangup(reloader.clone()));
    if let Some(every) = cfg.settings.watch {
        tokio::spawn(reload_on_change(reloader, every));
    }
    {
        let serving = serving.clone();
        let health_reporter = health_reporter.clone();
        let stop = stop_signal();
        let delay = cfg.settings.shutdown_delay;
        tokio::spawn(async move {
            stop.await;
            serving.store(false, Ordering::Relaxed);
            health_reporter.set_not_serving::<AuthorizationServer<ExtAuthz<S>>>().await;
            health_reporter.set_not_serving::<RateLimitServiceServer<Rls<S>>>().await;
            health_reporter.set_not_serving::<DecisionServer<DecisionApi<S>>>().await;
            // and the server as a whole (""), which a Kubernetes gRPC probe asks about
            health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            // not ready at once, still answering for a while: the endpoints controller and the
            // proxies stop sending here before the listeners close
            if !delay.is_zero() {
                tracing::info!(delay_ms = delay.as_millis(), "stopping: not ready, still answering");
                tokio::time::sleep(delay).await;
            }
            tracing::info!("stopping: draining connections");
            let _ = stop_tx.send(true);
        });
    }
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let admin = Arc::new(Admin { engine: engine.clone(), serving });
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(admin);
    let http = axum::serve(http_listener, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let stop_rx_forward = stop_rx.clone();
    let stop_rx_admin = stop_rx.clone();

    let ext_authz = AuthorizationServer::new(ExtAuthz::new(engine.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let rls = RateLimitServiceServer::new(Rls::new(engine.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let access_log = AccessLogServiceServer::new(AccessLog::new(engine.clone(), stop_rx.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let native = DecisionServer::new(DecisionApi::new(engine.clone()))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    // reflection describes our own API only (Envoy's services are Envoy's to describe)
    let reflection = cfg.settings.grpc_reflection.then(|| {
        let v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::portcullis_v1::FILE_DESCRIPTOR_SET)
            .build_v1();
        let v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::portcullis_v1::FILE_DESCRIPTOR_SET)
            .build_v1alpha();
        (v1, v1alpha)
    });
    let (reflection_v1, reflection_v1alpha) = match reflection {
        Some((Ok(v1), Ok(v1alpha))) => (Some(v1), Some(v1alpha)),
        Some((Err(e), _)) | Some((_, Err(e))) => {
            tracing::error!(error = %e, "gRPC reflection is off: the descriptors do not load");
            (None, None)
        }
        None => (None, None),
    };
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .add_service(health_service)
        .add_service(ext_authz)
        .add_service(rls)
        .add_service(access_log)
        .add_service(native)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha);
    let open = crate::connections::OpenConnections::default();
    engine.metrics.registry().register(
        "grpc_connections",
        "Open connections on the gRPC port, by the runtime serving them (0 to N-1 with --runtime per-core)",
        open.clone(),
    );
    // the store's warm-up, once on each runtime that serves gRPC (a no-op on one that keeps no
    // connection of its own: the multi-thread runtime, the memory store)
    let warm_up = {
        let engine = engine.clone();
        move || async move { engine.store().warm_up().await }
    };
    let grpc = async {
        match connections {
            Connections::Here => {
                tokio::spawn(warm_up());
                let gauge = open.get_or_create(&vec![("runtime", "0".to_owned())]).clone();
                let incoming = crate::connections::incoming(grpc_listener, gauge);
                router.serve_with_incoming_shutdown(incoming, stopped(stop_rx)).await.map_err(ServeError::Grpc)
            }
            Connections::PerCore(n) => {
                crate::connections::serve_per_core(grpc_listener, n, router, stop_rx, &open, warm_up).await
            }
        }
    };

    // the admin API: its own listener, its own health service, reflection for grpcurl
    let admin_api = async {
        let (Some(listener), Some(settings)) = (admin_listener, admin_settings) else { return Ok(()) };
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_serving::<AdminServer<AdminApi<S>>>().await;
        let tls = settings.load().tls.clone();
        let api = AdminServer::new(AdminApi::new(engine.clone(), settings, status.clone()))
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::portcullis_v1::FILE_DESCRIPTOR_SET)
            .build_v1()
            .ok();
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .add_service(health)
            .add_service(api)
            .add_optional_service(reflection);
        match tls {
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, stopped(stop_rx_admin)).await.map_err(ServeError::Grpc)
            }
            Some(tls) => {
                let incoming = crate::admin::tls::incoming(listener, tls, engine.clone());
                router.serve_with_incoming_shutdown(incoming, stopped(stop_rx_admin)).await.map_err(ServeError::Grpc)
            }
        }
    };

    // forward-auth: its own listener, drained with the others
    let forward_auth = async {
        let Some(listener) = forward_auth_listener else { return Ok(()) };
        // as the gRPC listener: a response is not held back behind an unacknowledged one
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = crate::api::forward_auth::router(engine.clone()).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx_forward)).await.map_err(ServeError::Http)
    };
    tracing::info!(
        grpc_addr = %grpc_addr,
        http_addr = %http_addr,
        forward_auth_addr = forward_auth_addr.map(tracing::field::display),
        admin_addr = admin_addr.map(tracing::field::display),
        store = engine.store().backend(),
        policy_version = %cfg.version,
        policy = %cfg.file.display(),
        routes = engine.policy().routes.len(),
        "listening"
    );
    let (g, h, f, a) = tokio::join!(grpc, async { http.await.map_err(ServeError::Http) }, forward_auth, admin_api);
    if let Some(audit) = audit {
        // a last checkpoint, and every queued event delivered
        let _ = tokio::task::spawn_blocking(move || audit.stop()).await;
    }
    g?;
    h?;
    f?;
    a?;
    tracing::info!("stopped");
    Ok(())
}
