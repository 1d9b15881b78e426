//! TLS at the edge (rustls, ring): the server certificate and key checked at load (key matches
//! the leaf, chain in order, every certificate valid now), served through a resolver that a
//! reload task swaps when the files change (a Kubernetes Secret's symlink swap included: the
//! files are read by path each time); TLS 1.2 with ECDHE and AEAD only, and TLS 1.3; ALPN `h2`
//! and `http/1.1`; optional client certificates (mTLS) against `client_ca_file`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, ServerConfig};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use crate::clock;
use crate::config;
use crate::metrics::Metrics;

/// Why a certificate and key pair was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("{file}: certificate {index} ({subject}): {reason}")]
    Certificate { file: String, index: usize, subject: String, reason: String },
    #[error("{0}")]
    Pair(String),
}

/// A loaded, checked server certificate: what rustls serves, and what the shim reports.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    /// The leaf's subject (RFC 4514).
    pub subject: String,
    /// The leaf's identity as Envoy reports a peer's (URI SAN, else DNS SAN, else subject).
    pub principal: String,
    /// SHA-256 over the two files, to see a change.
    digest: [u8; 32],
}

/// The crypto provider: ring, cut to TLS 1.3's suites and TLS 1.2's ECDHE suites with an AEAD
/// (AES-GCM, ChaCha20-Poly1305): forward secrecy and authenticated encryption by construction.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        )
    });
    Arc::new(p)
}

fn file_err(file: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File { file: file.display().to_string(), reason: reason.into() }
}

/// A certificate's identity as Envoy puts it in `AttributeContext.Peer.principal`: the first
/// URI SAN, else the first DNS SAN, else the subject.
pub fn principal(cert: &Certificate) -> String {
    if let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() {
        let uri = san.0.iter().find_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => Some(u.to_string()),
            _ => None,
        });
        let dns = san.0.iter().find_map(|n| match n {
            GeneralName::DnsName(d) => Some(d.to_string()),
            _ => None,
        });
        if let Some(p) = uri.or(dns) {
            return p;
        }
    }
    cert.tbs_certificate.subject.to_string()
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (DER), the digest pins compare (RFC 7469).
pub fn spki_sha256(der: &[u8]) -> Option<[u8; 32]> {
    let cert = Certificate::from_der(der).ok()?;
    let spki = cert.tbs_certificate.subject_public_key_info.to_der().ok()?;
    Some(Sha256::digest(spki).into())
}

/// Reads, parses and checks a certificate chain and its key at `now` (Unix seconds).
pub fn load(cert_file: &Path, key_file: &Path, now: u64) -> Result<Loaded, TlsError> {
    let cert_pem = std::fs::read(cert_file).map_err(|e| file_err(cert_file, e.to_string()))?;
    let key_pem = std::fs::read(key_file).map_err(|e| file_err(key_file, e.to_string()))?;
    let mut h = Sha256::new();
    h.update(&cert_pem);
    h.update(&key_pem);
    let digest: [u8; 32] = h.finalize().into();

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_file, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(file_err(cert_file, "no CERTIFICATE block (the leaf first, then its intermediates)"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_err(key_file, format!("no private key in PEM (PKCS#8, PKCS#1 or SEC1): {e}")))?;
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(key_file, format!("unsupported private key: {e}")))?;

    let file = cert_file.display().to_string();
    let mut parsed = Vec::with_capacity(chain.len());
    for (index, der) in chain.iter().enumerate() {
        let c = Certificate::from_der(der).map_err(|e| TlsError::Certificate {
            file: file.clone(),
            index,
            subject: "?".into(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
        let subject = c.tbs_certificate.subject.to_string();
        let v = &c.tbs_certificate.validity;
        let not_before = v.not_before.to_unix_duration().as_secs();
        let not_after = v.not_after.to_unix_duration().as_secs();
        let fail =
            |reason: String| TlsError::Certificate { file: file.clone(), index, subject: subject.clone(), reason };
        if now < not_before {
            return Err(fail(format!("not valid before {}", v.not_before)));
        }
        if now > not_after {
            return Err(fail(format!("expired on {}", v.not_after)));
        }
        if let Some(prev) = parsed.last().map(|p: &Certificate| &p.tbs_certificate.issuer)
            && *prev != c.tbs_certificate.subject
        {
            return Err(fail(format!(
                "out of order: the certificate before it was issued by {prev}, not by this one (the leaf first, then each issuer)"
            )));
        }
        parsed.push(c);
    }
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| {
        TlsError::Pair(format!(
            "{} and {}: the private key does not match the leaf certificate ({e})",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    let leaf = &parsed[0];
    Ok(Loaded {
        key: Arc::new(certified),
        not_after: leaf.tbs_certificate.validity.not_after.to_unix_duration().as_secs(),
        subject: leaf.tbs_certificate.subject.to_string(),
        principal: principal(leaf),
        digest,
    })
}

/// The certificate being served, swapped whole by a reload.
pub struct Resolver {
    current: ArcSwap<Loaded>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").field("subject", &self.current.load().subject).finish()
    }
}

impl Resolver {
    pub fn new(first: Loaded) -> Arc<Resolver> {
        Arc::new(Resolver { current: ArcSwap::from_pointee(first) })
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

/// The server's rustls config: TLS 1.3 and 1.2 (ECDHE + AEAD), ALPN `h2` then `http/1.1`,
/// client certificates per `tls.client_ca_file` / `tls.require_client_certificate`.
pub fn server_config(tls: &config::Tls, resolver: Arc<Resolver>) -> anyhow::Result<ServerConfig> {
    use anyhow::Context;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
                roots
                    .add(c.with_context(|| format!("{}: not PEM", ca.display()))?)
                    .with_context(|| format!("{}: not a CA certificate rustls accepts", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.require_client_certificate { verifier } else { verifier.allow_unauthenticated() };
            builder.with_client_cert_verifier(verifier.build().context("tls.client_ca_file")?)
        }
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Logs how near the served certificate's expiry is, and sets the metric.
pub fn report_expiry(loaded: &Loaded, tls: &config::Tls, metrics: &Metrics, now: u64) {
    let left = loaded.not_after.saturating_sub(now);
    metrics.cert_expiry.set(i64::try_from(loaded.not_after).unwrap_or(i64::MAX));
    let days = left / 86_400;
    if left <= tls.expiry_critical.as_secs() {
        tracing::error!(subject = %loaded.subject, days_left = days, "the server certificate expires soon: replace it");
    } else if left <= tls.expiry_warning.as_secs() {
        tracing::warn!(subject = %loaded.subject, days_left = days, "the server certificate expires within the warning horizon");
    }
}

/// Looks at the certificate and key files every `tls.reload_interval`; a changed, valid pair is
/// served from the next handshake on, a bad one is refused (logged, counted) and the old one
/// kept. Also repeats the expiry report hourly.
pub async fn watch(tls: config::Tls, resolver: Arc<Resolver>, metrics: Arc<Metrics>) {
    let mut last_report = clock::instant();
    let mut refused: Option<[u8; 32]> = None;
    loop {
        tokio::time::sleep(tls.reload_interval).await;
        let now = clock::unix_secs();
        let current = resolver.current();
        // read by path each time: a symlink swapped under the path is followed
        let (cert, key) = match (std::fs::read(&tls.cert_file), std::fs::read(&tls.key_file)) {
            (Ok(c), Ok(k)) => (c, k),
            _ => continue, // a swap in progress, or the files are gone: keep serving
        };
        let mut h = Sha256::new();
        h.update(&cert);
        h.update(&key);
        let digest: [u8; 32] = h.finalize().into();
        if digest != current.digest && refused != Some(digest) {
            match load(&tls.cert_file, &tls.key_file, now) {
                Ok(new) if new.digest == digest => {
                    tracing::info!(subject = %new.subject, not_after = new.not_after, "server certificate reloaded");
                    metrics.cert_reloads.get_or_create(&crate::metrics::Outcome { outcome: "ok" }).inc();
                    report_expiry(&new, &tls, &metrics, now);
                    resolver.current.store(Arc::new(new));
                    refused = None;
                    last_report = clock::instant();
                    continue;
                }
                Ok(_) => continue, // the files changed between the two reads: next round
                Err(e) => {
                    tracing::error!(error = %e, "new server certificate refused; the old one is still served");
                    metrics.cert_reloads.get_or_create(&crate::metrics::Outcome { outcome: "refused" }).inc();
                    refused = Some(digest);
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(3600) {
            report_expiry(&current, &tls, &metrics, now);
            last_report = clock::instant();
        }
    }
}
