//! The upstream client: hyper-util's pooled client over TCP or rustls. An `https://` upstream's
//! certificate is always verified (the system's roots plus `ca_file`, the host name checked;
//! there is no switch to skip it), and with `pins` its leaf's SubjectPublicKeyInfo must also
//! hash (SHA-256) to one of them (RFC 7469's pin, several so one can rotate).

use std::sync::Arc;

use anyhow::Context;
use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config;

/// The body type sent upstream.
pub type UpBody = BoxBody<Bytes, std::io::Error>;
/// The pooled upstream client.
pub type UpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>;

/// WebPKI verification, then the pins (when any).
#[derive(Debug)]
struct Pinned {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if self.pins.is_empty() {
            return Ok(ok);
        }
        match crate::tls::spki_sha256(end_entity) {
            Some(d) if self.pins.iter().any(|p| p == &d) => Ok(ok),
            _ => Err(rustls::Error::General("the upstream's public key matches none of upstream.pins".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Builds the upstream client from `upstream`: roots, pins, timeouts, protocols.
pub fn client(u: &config::Upstream) -> anyhow::Result<UpClient> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(u.connect_timeout));
    http.set_nodelay(true);
    let provider = crate::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    if u.https {
        // the system's roots; a missing or unreadable store is not fatal when ca_file is set
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if let Some(ca) = &u.ca_file {
            let mut n = 0;
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("upstream.ca_file {}", ca.display()))? {
                roots
                    .add(c.with_context(|| format!("upstream.ca_file {}: not PEM", ca.display()))?)
                    .with_context(|| format!("upstream.ca_file {}: not a CA certificate", ca.display()))?;
                n += 1;
            }
            anyhow::ensure!(n > 0, "upstream.ca_file {}: no CERTIFICATE block", ca.display());
        }
        anyhow::ensure!(!roots.is_empty(), "upstream: no trusted roots (the system has none; set upstream.ca_file)");
    }
    // ALPN is set by the connector builder: h2 with `http2`, else http/1.1
    let versions = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let tls = if u.https {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("upstream certificate verifier")?;
        // not a bypass: the verifier runs WebPKI first, then adds the pins
        versions.dangerous().with_custom_certificate_verifier(Arc::new(Pinned { inner, pins: u.pins.clone() }))
    } else {
        // an http:// upstream never starts TLS; should anything try, no root is trusted
        versions.with_root_certificates(roots)
    }
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let connector =
        if u.http2 { builder.enable_http2().wrap_connector(http) } else { builder.enable_http1().wrap_connector(http) };
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_idle_timeout(std::time::Duration::from_secs(60)).pool_timer(hyper_util::rt::TokioTimer::new());
    if u.http2 {
        b.http2_only(true);
    }
    Ok(b.build(connector))
}
