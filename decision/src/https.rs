//! The outbound HTTPS client for the few calls portcullis makes itself (an issuer's JWKS, OAuth
//! 2.0 introspection). rustls with the Mozilla roots, plus the policy's `ca_file` when given;
//! `https://` only; one connection per call (these calls are rare: refreshes, and cache
//! misses); a hard deadline over connect, handshake and body; a cap on the response size.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where an `https://` URL points.
#[derive(Debug, Clone)]
pub struct Url {
    /// false only for `http://` URLs taken by `parse_web` (webhooks)
    tls: bool,
    host: String,
    port: u16,
    /// `host[:port]` as written, for the Host header
    authority: String,
    path_and_query: String,
}

impl Url {
    /// Parses an absolute `https://` URL; anything else is refused with the reason.
    pub fn parse(s: &str) -> Result<Url, String> {
        Self::parse_scheme(s, false)
    }

    /// Parses an `https://` or `http://` URL (webhooks to automation services inside a
    /// cluster often speak plain HTTP).
    pub fn parse_web(s: &str) -> Result<Url, String> {
        Self::parse_scheme(s, true)
    }

    fn parse_scheme(s: &str, http_too: bool) -> Result<Url, String> {
        let uri: Uri = s.parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if http_too => false,
            _ if http_too => return Err(format!("invalid URL {s:?}: must be http:// or https://")),
            _ => return Err(format!("invalid URL {s:?}: must be https://")),
        };
        let authority = uri.authority().ok_or_else(|| format!("invalid URL {s:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("invalid URL {s:?}: credentials do not belong in the URL"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(Url {
            tls,
            host,
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", if self.tls { "https" } else { "http" }, self.authority, self.path_and_query)
    }
}

/// What a call came back with.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    /// `Cache-Control: max-age`, in seconds
    pub max_age: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

#[derive(Clone)]
pub struct HttpsClient {
    tls: TlsConnector,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient").field("timeout", &self.timeout).finish()
    }
}

impl HttpsClient {
    /// A client trusting the Mozilla roots and, if given, the CA certificates in `ca_file`
    /// (PEM). An unreadable or empty file is an error.
    pub fn new(ca_file: Option<&Path>, timeout: Duration, max_body: usize) -> Result<HttpsClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            let mut n = 0;
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {path:?}: {e}"))? {
                let cert = cert.map_err(|e| format!("{path:?}: {e}"))?;
                roots.add(cert).map_err(|e| format!("{path:?}: {e}"))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("{path:?} holds no PEM certificate"));
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(HttpsClient { tls: TlsConnector::from(Arc::new(config)), timeout, max_body })
    }

    pub async fn get(&self, url: &Url) -> Result<Reply, FetchError> {
        self.send(url, Method::GET, &[], Bytes::new()).await
    }

    /// POSTs a JSON body.
    pub async fn post_json(&self, url: &Url, json: String) -> Result<Reply, FetchError> {
        self.send(url, Method::POST, &[("content-type", "application/json")], Bytes::from(json)).await
    }

    /// POSTs an `application/x-www-form-urlencoded` body.
    pub async fn post_form(&self, url: &Url, authorization: &str, form: String) -> Result<Reply, FetchError> {
        let headers = [("authorization", authorization), ("content-type", "application/x-www-form-urlencoded")];
        self.send(url, Method::POST, &headers, Bytes::from(form)).await
    }

    async fn send(
        &self,
        url: &Url,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, FetchError> {
        match tokio::time::timeout(self.timeout, self.send_inner(url, method, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(self.timeout)),
        }
    }

    async fn send_inner(
        &self,
        url: &Url,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, FetchError> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        if !url.tls {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| FetchError::Http(e.to_string()))?;
            return self.exchange(url, method, headers, body, sender, tokio::spawn(conn)).await;
        }
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| FetchError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
        let tls = self.tls.connect(name, tcp).await.map_err(FetchError::Tls)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        self.exchange(url, method, headers, body, sender, tokio::spawn(conn)).await
    }

    async fn exchange<E>(
        &self,
        url: &Url,
        method: Method,
        headers: &[(&str, &str)],
        body: Bytes,
        mut sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        conn: tokio::task::JoinHandle<E>,
    ) -> Result<Reply, FetchError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url.path_and_query.as_str())
            .header("host", url.authority.as_str())
            .header("accept", "application/json")
            .header("user-agent", concat!("portcullis/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| FetchError::Http(e.to_string()))?;
        let res = sender.send_request(req).await.map_err(|e| FetchError::Http(e.to_string()))?;
        let status = res.status();
        let max_age = res.headers().get("cache-control").and_then(|v| v.to_str().ok()).and_then(max_age);
        let body = Limited::new(res.into_body(), self.max_body).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::TooLarge(self.max_body)
            } else {
                FetchError::Http(e.to_string())
            }
        })?;
        conn.abort();
        Ok(Reply { status, body: body.to_bytes(), max_age })
    }
}

fn max_age(cache_control: &str) -> Option<u64> {
    cache_control.split(',').find_map(|d| d.trim().strip_prefix("max-age=")).and_then(|v| v.trim().parse().ok())
}

/// `application/x-www-form-urlencoded` for one value (RFC 6749 appendix B).
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_with_a_host() {
        let u = Url::parse("https://auth.example.com/.well-known/jwks.json").expect("ok");
        assert_eq!(
            (u.host.as_str(), u.port, u.path_and_query.as_str()),
            ("auth.example.com", 443, "/.well-known/jwks.json")
        );
        let u = Url::parse("https://[::1]:8443").expect("ok");
        assert_eq!((u.host.as_str(), u.port, u.path_and_query.as_str()), ("::1", 8443, "/"));
        assert!(Url::parse("http://auth.example.com/jwks").is_err());
        let w = Url::parse_web("http://hooks.internal:8080/alert").expect("ok");
        assert_eq!((w.tls, w.port, w.to_string().as_str()), (false, 8080, "http://hooks.internal:8080/alert"));
        assert!(Url::parse_web("ftp://x/").is_err());
        assert!(Url::parse("https://user:pw@auth.example.com/").is_err());
        assert!(Url::parse("/jwks.json").is_err());
    }

    #[test]
    fn form_values_and_cache_control() {
        assert_eq!(form_encode("a b+c/d=é"), "a+b%2Bc%2Fd%3D%C3%A9");
        assert_eq!(max_age("public, max-age=300, must-revalidate"), Some(300));
        assert_eq!(max_age("no-store"), None);
    }
}
