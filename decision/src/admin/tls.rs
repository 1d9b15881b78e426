//! The admin listener over TLS (`admin.tls`): connections accepted, their handshakes run on
//! tasks of their own (bounded by `HANDSHAKE_TIMEOUT`, so a slow client holds nothing), and
//! handed to the gRPC server. With a client CA, a connection without a certificate from it
//! never reaches the server; its refusal is an `admin` audit event (`method: "TLS"`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use super::AdminTls;
use crate::engine::Engine;
use crate::store::Store;

/// The longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of an admin connection: its address, and the SHA-256 (hex) of the
/// client certificate it presented (mTLS).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub client_cert: Option<String>,
}

/// One accepted TLS connection.
pub struct Conn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (tcp, session) = self.0.get_ref();
        let client_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| decision_core::encode::hex(&decision_core::apikey::digest(c.as_ref())));
        PeerInfo { remote: tcp.peer_addr().ok(), client_cert }
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The connections of `listener` that completed a TLS handshake, as a stream for the gRPC
/// server; refused handshakes are audited (or logged) through `engine`.
pub fn incoming<S: Store>(
    listener: TcpListener,
    tls: AdminTls,
    engine: Arc<Engine<S>>,
) -> impl futures_util::Stream<Item = Result<Conn, std::io::Error>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, to_server, engine) = (acceptor.clone(), tx.clone(), engine.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = to_server.send(Conn(stream)).await;
                    }
                    Ok(Err(e)) => refused(&engine, peer, &e.to_string()),
                    Err(_) => refused(&engine, peer, "the TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) })
}

/// A refused handshake, as an `admin` audit event (or a log line without a trail).
fn refused<S: Store>(engine: &Engine<S>, peer: SocketAddr, why: &str) {
    let event = super::AdminEvent {
        actor: None,
        method: "TLS",
        object: "",
        outcome: "unauthenticated",
        detail: why,
        reason: "",
        peer: Some(peer.ip()),
    };
    super::record(engine, &event);
}
