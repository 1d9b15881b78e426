//! How the gRPC listener's connections are accepted and served: every connection is a
//! [`Coalesced`] stream (TCP_NODELAY, keepalive, no vectored writes), served either on the
//! calling runtime ([`incoming`]) or on per-core runtimes ([`serve_per_core`]): one accept loop
//! hands each new connection to one of N threads, each running a current-thread tokio runtime
//! that serves the connections it was given (the one with the fewest live connections gets the
//! next).
//!
//! Why: on a current-thread runtime a connection's task runs after several of its streams have
//! finished, so h2 writes their answers with one `writev`; the multi-thread scheduler runs it
//! after every answer (its LIFO slot), one `writev` per answer (issue 16's profile: 36% of the
//! time in h2 flushing). One current-thread runtime per core keeps that batching on every core
//! count. The price: one connection's streams stay on one core, so a single client connection
//! cannot use more than one (Envoy opens a connection per worker thread, so a fleet of proxies
//! spreads over all of them; `--runtime multi-thread` is there for one busy connection).
//!
//! A connection moves between runtimes as a `std::net::TcpStream`: it leaves the accepting
//! runtime's reactor (`into_std`) and registers with the serving runtime's (`from_std`), so its
//! readiness events wake the thread that serves it.

use std::time::Duration;

use futures_util::StreamExt;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::server::{Router, TcpIncoming};

use crate::server::{KEEPALIVE_INTERVAL, ServeError};

/// A gRPC connection whose writes h2 coalesces: it reports no vectored writes, so h2 copies
/// every frame payload under 1 KiB into its write buffer (with vectored writes it chains any
/// payload of 256 bytes or more, and flushes before the next frame: an OVER_LIMIT or a denied
/// answer, over 256 bytes with its headers and body, cost two `writev` calls and broke the
/// batching of the answers after it, so a refusal was a third slower than an allowance). It
/// counts in its runtime's open connections (`portcullis_grpc_connections`) until it is dropped.
pub struct Coalesced {
    stream: tokio::net::TcpStream,
    _live: Live,
}

impl tokio::io::AsyncRead for Coalesced {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Coalesced {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for Coalesced {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

/// The connections of `listener` as gRPC streams for tonic's `serve_with_incoming`: TCP_NODELAY
/// (answers are small and latency-bound), TCP keepalive every [`KEEPALIVE_INTERVAL`], and h2's
/// coalesced writes ([`Coalesced`]), each counted in `open` while it lives. A failed `accept` is
/// an `Err` item, which tonic skips.
pub fn incoming(listener: TcpListener, open: Gauge) -> impl futures_util::Stream<Item = std::io::Result<Coalesced>> {
    accepted(listener).map(move |conn| {
        conn.map(|stream| {
            open.inc();
            Coalesced { stream, _live: Live(open.clone()) }
        })
    })
}

/// The listener's accepted connections with TCP_NODELAY and keepalive set.
fn accepted(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(KEEPALIVE_INTERVAL))
}

/// Open gRPC connections by the runtime serving them (label `runtime`: `0` to N-1), the gauge
/// family behind `portcullis_grpc_connections`.
pub type OpenConnections = Family<Vec<(&'static str, String)>, Gauge>;

thread_local! {
    /// On a per-core runtime's thread, or the only runtime's: its index and how many there are.
    static RUNTIME: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

/// On a thread of [`serve_per_core`]: `(index, count)` of its runtime, so a client (the Redis
/// store's connections) can keep state of its own per runtime and never wake another thread;
/// `(0, 1)` on the thread of a process's only runtime ([`single_runtime_thread`]); `None`
/// elsewhere.
pub fn runtime_index() -> Option<(usize, usize)> {
    RUNTIME.with(std::cell::Cell::get)
}

/// Marks the calling thread as the one that runs a process's only runtime (a current-thread
/// runtime serving everything: `--runtime current-thread`, or `auto` on one core), so
/// [`runtime_index`] is `(0, 1)` there and the clients that keep state per runtime (the Redis
/// store's own connection) do so on it too. Call it on the thread that will `block_on`.
pub fn single_runtime_thread() {
    RUNTIME.with(|r| r.set(Some((0, 1))));
}

/// How long the accept loop waits after a failed `accept` (out of file descriptors, say)
/// before it tries again, so it does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// One open connection in its runtime's gauge, taken off it when the connection is dropped.
#[derive(Debug)]
struct Live(Gauge);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.dec();
    }
}

struct Worker {
    /// accepted connections, each already counted in `live`
    conns: mpsc::UnboundedSender<(std::net::TcpStream, Live)>,
    live: Gauge,
    done: oneshot::Receiver<Result<(), ServeError>>,
}

/// Serves `router` on `listener` with `threads` (at least 1) current-thread runtimes, each on a
/// thread of its own named `grpc-<i>`, until `stop` turns true; then it stops accepting (the
/// listening socket is closed at once), lets every runtime drain its connections gracefully
/// (HTTP/2 GOAWAY, in-flight calls finish) and returns when all have. Each runtime's open
/// connections are `open`'s gauge labelled `runtime="<i>"`. A runtime whose server ends early
/// gets no more connections. Errors: a runtime or thread that cannot be started
/// (`ServeError::Http`, before anything is served), or the first runtime's server error or
/// unexpected end (`ServeError::Grpc`, `ServeError::Http`). Each runtime runs `warm_up()` as a
/// task of its own as it starts (the store's `Store::warm_up`: its own Redis connection).
pub async fn serve_per_core<W, F>(
    listener: TcpListener,
    threads: usize,
    router: Router,
    stop: watch::Receiver<bool>,
    open: &OpenConnections,
    warm_up: W,
) -> Result<(), ServeError>
where
    W: FnOnce() -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let count = threads.max(1);
    let mut workers = Vec::with_capacity(count);
    for i in 0..count {
        let (conns, mut rx) = mpsc::unbounded_channel::<(std::net::TcpStream, Live)>();
        let live = open.get_or_create(&vec![("runtime", i.to_string())]).clone();
        let (done_tx, done) = oneshot::channel();
        let (started_tx, started) = oneshot::channel::<std::io::Result<()>>();
        let (router, mut stop, warm_up) = (router.clone(), stop.clone(), warm_up.clone());
        std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                // built here, so that a thread that cannot start drops nothing of tokio's on the
                // caller's runtime
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                RUNTIME.with(|r| r.set(Some((i, count))));
                let served = rt.block_on(async move {
                    tokio::spawn(warm_up());
                    // registered with this runtime's reactor here, as it is polled
                    let incoming = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|(s, live)| {
                        tokio::net::TcpStream::from_std(s).map(|stream| Coalesced { stream, _live: live })
                    });
                    router
                        .serve_with_incoming_shutdown(incoming, async move {
                            let _ = stop.wait_for(|s| *s).await;
                        })
                        .await
                });
                let _ = done_tx.send(served.map_err(ServeError::Grpc));
            })
            .map_err(ServeError::Http)?;
        started
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("a gRPC runtime thread ended as it started")))
            .map_err(ServeError::Http)?;
        workers.push(Worker { conns, live, done });
    }
    accept(listener, &workers, stop).await;
    let mut first_error = Ok(());
    for w in workers {
        drop(w.conns);
        let served = w.done.await.unwrap_or_else(|_| {
            Err(ServeError::Http(std::io::Error::other("a gRPC runtime thread ended unexpectedly")))
        });
        if first_error.is_ok() {
            first_error = served;
        }
    }
    first_error
}

/// The accept loop: each connection to the running worker with the fewest live ones (the first
/// of them on a tie), until `stop` or until no worker runs; the listening socket is dropped
/// when it returns.
async fn accept(listener: TcpListener, workers: &[Worker], mut stop: watch::Receiver<bool>) {
    let mut incoming = std::pin::pin!(accepted(listener));
    loop {
        let conn = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            conn = incoming.next() => conn,
        };
        let stream = match conn {
            None => return,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "accepting a gRPC connection failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(stream) = stream.into_std() else { continue };
        let Some(w) = workers.iter().filter(|w| !w.conns.is_closed()).min_by_key(|w| w.live.get()) else {
            tracing::error!("every gRPC runtime has ended: no more connections are accepted");
            return;
        };
        // counted from here; a connection the runtime never takes (it stopped) is dropped with
        // its count
        w.live.inc();
        let _ = w.conns.send((stream, Live(w.live.clone())));
    }
}
