//! Listeners and their lifetime: the TLS listener (HTTP/1.1 and HTTP/2 by ALPN), the plain
//! listener, the metrics listener; SIGTERM stops accepting, drains in-flight requests within
//! `limits.drain_timeout`, sends their completions, and returns.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use x509_cert::der::Decode;

use crate::authz::{ConnInfo, TlsInfo};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::plain::Events;
use crate::proxy::{Pending, Shim, ShimBody, full, json_response};
use crate::tls::Resolver;

/// The addresses the listeners are bound to (port 0 in the config picks one).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// Percent-encodes all but RFC 3986's unreserved characters (Envoy's URL-encoded PEM).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn builder(cfg: &Config) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own limits sit above ours, so that the shim answers 431 with a JSON body; past
    // them hyper answers 431 itself (HTTP/1) or resets the stream (HTTP/2)
    let hard = usize::try_from(cfg.limits.max_header_bytes).unwrap_or(usize::MAX).saturating_mul(2).max(16 << 10);
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.limits.header_read_timeout)
        .max_buf_size(hard.max(8192))
        .max_headers(cfg.limits.max_headers.saturating_mul(2).max(100));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hard).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serves until SIGTERM or SIGINT, then drains. `on_bound` learns the bound addresses.
pub async fn run(cfg: Config, on_bound: impl FnOnce(Bound)) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let now = crate::clock::unix_secs();
    let first = crate::tls::load(&cfg.tls.cert_file, &cfg.tls.key_file, now).context("tls")?;
    crate::tls::report_expiry(&first, &cfg.tls, &metrics, now);
    tracing::info!(subject = %first.subject, not_after = first.not_after, "server certificate loaded");
    let resolver = Resolver::new(first);
    let tls_config = crate::tls::server_config(&cfg.tls, resolver.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(tls_config));

    let endpoint = |addr: &str, timeout: Duration| -> anyhow::Result<tonic::transport::Channel> {
        Ok(tonic::transport::Endpoint::from_shared(addr.to_owned())
            .with_context(|| format!("portcullis.address {addr}"))?
            .connect_timeout(Duration::from_secs(1).min(timeout))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect_lazy())
    };
    let channel = endpoint(&cfg.portcullis.address, cfg.portcullis.timeout)?;
    let shim = Arc::new(Shim {
        authz: proto::ext_authz::authorization_client::AuthorizationClient::new(channel.clone()),
        ratelimit: cfg
            .portcullis
            .ratelimit
            .as_ref()
            .map(|_| proto::ratelimit::rate_limit_service_client::RateLimitServiceClient::new(channel.clone())),
        decision: proto::portcullis_v1::decision_client::DecisionClient::new(channel),
        upstream: crate::upstream::client(&cfg.upstream)?,
        metrics: metrics.clone(),
        pending: Arc::new(Pending::default()),
        credential_headers: cfg.credential_headers.clone(),
        cfg: cfg.clone(),
    });
    let events = Arc::new(Events::open(cfg.audit_path.as_deref())?);

    let https = TcpListener::bind(cfg.https).await.with_context(|| format!("listen.https {}", cfg.https))?;
    let http = match cfg.http {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("listen.http {a}"))?),
        None => None,
    };
    let metrics_listener = match cfg.metrics {
        Some(a) => Some(TcpListener::bind(a).await.with_context(|| format!("listen.metrics {a}"))?),
        None => None,
    };
    let bound = Bound {
        https: https.local_addr()?,
        http: http.as_ref().map(TcpListener::local_addr).transpose()?,
        metrics: metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?,
    };
    let or_none = |a: Option<SocketAddr>| a.map_or_else(String::new, |a| a.to_string());
    tracing::info!(
        https = %bound.https,
        http = %or_none(bound.http),
        metrics = %or_none(bound.metrics),
        upstream = %cfg.upstream.url,
        portcullis = %cfg.portcullis.address,
        "portcullis-shim listening"
    );
    on_bound(bound);

    tokio::spawn(crate::tls::watch(cfg.tls.clone(), resolver.clone(), metrics.clone()));
    let draining = Arc::new(AtomicBool::new(false));
    if let Some(l) = metrics_listener {
        tokio::spawn(serve_metrics(l, metrics.clone(), draining.clone()));
    }

    let graceful = GracefulShutdown::new();
    let builder = builder(&cfg);
    let mut plain_builder = auto::Builder::new(TokioExecutor::new());
    plain_builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.limits.header_read_timeout)
        .max_buf_size(16 << 10);
    let plain_builder = plain_builder.http1_only();
    let handshake_timeout = cfg.limits.header_read_timeout;
    let mut shutdown = std::pin::pin!(signal());
    loop {
        tokio::select! {
            accepted = https.accept() => {
                let Ok((tcp, peer)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                let local = tcp.local_addr().unwrap_or(bound.https);
                let acceptor = acceptor.clone();
                let shim = shim.clone();
                let builder = builder.clone();
                let resolver = resolver.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let (_, session) = stream.get_ref();
                    let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
                    let info = ConnInfo {
                        peer,
                        local,
                        tls: Some(TlsInfo {
                            sni: session.server_name().map(str::to_owned),
                            peer_principal: peer_cert
                                .as_deref()
                                .and_then(|d| x509_cert::Certificate::from_der(d).ok())
                                .map(|c| crate::tls::principal(&c)),
                            peer_certificate: peer_cert.as_deref().map(|d| url_encode(&pem(d))),
                            local_principal: resolver.current().principal.clone(),
                        }),
                        h1_verdicts: None,
                    };
                    let h2 = session.alpn_protocol() == Some(b"h2");
                    let mut info = info;
                    if h2 {
                        serve(stream, builder.http2_only(), Arc::new(info), shim, watcher, peer).await;
                    } else {
                        let (scan, verdicts) = crate::h1scan::Scan::new(stream);
                        info.h1_verdicts = Some(verdicts);
                        serve(scan, builder.http1_only(), Arc::new(info), shim, watcher, peer).await;
                    }
                });
            }
            accepted = accept_opt(http.as_ref()) => {
                let Ok((tcp, peer)) = accepted else { continue };
                let local = tcp.local_addr().unwrap_or(bound.https);
                let info = Arc::new(ConnInfo { peer, local, tls: None, h1_verdicts: None });
                let plain = cfg.plain.clone();
                let creds = shim.credential_headers.clone();
                let events = events.clone();
                let metrics = metrics.clone();
                let builder = plain_builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let r = crate::plain::handle(&req, &info, &plain, &creds, &events, &metrics);
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let conn = builder.serve_connection(TokioIo::new(tcp), svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                });
            }
            _ = &mut shutdown => break,
        }
    }

    draining.store(true, Ordering::SeqCst);
    drop(https);
    drop(http);
    let drain = cfg.limits.drain_timeout;
    tracing::info!(
        drain_timeout_ms = drain.as_millis() as u64,
        "shutting down: no new connections; draining in-flight requests"
    );
    let started = crate::clock::instant();
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!("drain timeout: connections still open are closed");
    }
    let left = drain.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
    let unsent = shim.pending.wait(left).await;
    if unsent > 0 {
        tracing::warn!(unsent, "completions not sent before exit; their leases expire on their own");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Serves one TLS connection with `builder` (HTTP/1.1 or HTTP/2 only, by ALPN).
async fn serve<IO>(
    io: IO,
    builder: auto::Builder<TokioExecutor>,
    info: Arc<ConnInfo>,
    shim: Arc<Shim>,
    watcher: hyper_util::server::graceful::Watcher,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let shim = shim.clone();
        let info = info.clone();
        async move { Ok::<_, Infallible>(shim.handle(req, info).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn accept_opt(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn serve_metrics(l: TcpListener, metrics: Arc<Metrics>, draining: Arc<AtomicBool>) {
    loop {
        let Ok((tcp, _)) = l.accept().await else { continue };
        let metrics = metrics.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r: Response<ShimBody> = match req.uri().path() {
                    "/metrics" => {
                        let mut r = Response::new(full(metrics.encode()));
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        r
                    }
                    "/healthz" => Response::new(full("ok\n")),
                    "/readyz" if draining.load(Ordering::SeqCst) => {
                        json_response(StatusCode::SERVICE_UNAVAILABLE, "draining", "")
                    }
                    "/readyz" => Response::new(full("ok\n")),
                    _ => json_response(StatusCode::NOT_FOUND, "not found", ""),
                };
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_certificates_are_url_encoded_pem() {
        let p = pem(&[1, 2, 3]);
        assert!(p.starts_with("-----BEGIN CERTIFICATE-----\nAQID\n"));
        assert_eq!(url_encode("a b/+=\n-"), "a%20b%2F%2B%3D%0A-");
    }
}
