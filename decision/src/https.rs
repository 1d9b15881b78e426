//! The outbound HTTP client for the few calls portcullis makes itself (an issuer's JWKS, OAuth
//! 2.0 introspection, alert and anchor webhooks): `reqwest` over a rustls configuration of our
//! own (the Mozilla roots, plus the policy's `ca_file` when given; ring), `https://` only except
//! for webhooks, no redirects followed, a hard deadline over connect, handshake and body, and a
//! cap on the response size. URLs are parsed by the `url` crate (WHATWG URL Standard).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Where an outbound call goes: an absolute `https://` URL (or `http://`, for webhooks), with a
/// host and no credentials in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url(url::Url);

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
        let url = url::Url::parse(s).map_err(|e| format!("invalid URL {s:?}: {e}"))?;
        match url.scheme() {
            "https" => {}
            "http" if http_too => {}
            _ if http_too => return Err(format!("invalid URL {s:?}: must be http:// or https://")),
            _ => return Err(format!("invalid URL {s:?}: must be https://")),
        }
        if url.host().is_none() {
            return Err(format!("invalid URL {s:?}: no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("invalid URL {s:?}: credentials do not belong in the URL"));
        }
        Ok(Url(url))
    }

    /// The host as the connection uses it (an IPv6 address without its brackets).
    pub fn host(&self) -> String {
        match self.0.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => String::new(),
        }
    }

    /// The port, or the scheme's default.
    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(443)
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// What a call came back with.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Vec<u8>,
    /// `Cache-Control: max-age`, in seconds
    pub max_age: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// the TCP connection or the TLS handshake failed
    #[error("connect: {0}")]
    Connect(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

impl FetchError {
    fn of(e: reqwest::Error, timeout: Duration) -> FetchError {
        // the whole chain: reqwest's own message names only the outermost layer
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        if e.is_timeout() {
            FetchError::Timeout(timeout)
        } else if e.is_connect() {
            FetchError::Connect(text)
        } else {
            FetchError::Http(text)
        }
    }
}

/// A client for one kind of call (cheap to clone: the connection pool is shared).
#[derive(Clone)]
pub struct HttpsClient {
    client: reqwest::Client,
    timeout: Duration,
    max_body: usize,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsClient").field("timeout", &self.timeout).field("max_body", &self.max_body).finish()
    }
}

impl HttpsClient {
    /// A client trusting the Mozilla roots and, if given, the CA certificates in `ca_file`
    /// (PEM); every call ends within `timeout` and reads at most `max_body` bytes of answer.
    /// Errors: an unreadable file, one without a certificate, or a certificate rustls refuses.
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
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(HttpsClient { client, timeout, max_body })
    }

    pub async fn get(&self, url: &Url) -> Result<Reply, FetchError> {
        self.send(self.client.get(url.0.clone())).await
    }

    /// POSTs a JSON body.
    pub async fn post_json(&self, url: &Url, json: String) -> Result<Reply, FetchError> {
        self.send(self.client.post(url.0.clone()).header("content-type", "application/json").body(json)).await
    }

    /// POSTs an `application/x-www-form-urlencoded` body.
    pub async fn post_form(&self, url: &Url, authorization: &str, form: String) -> Result<Reply, FetchError> {
        let request = self
            .client
            .post(url.0.clone())
            .header("authorization", authorization)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form);
        self.send(request).await
    }

    /// One call under the deadline: the answer's status, `max-age` and body (at most
    /// `max_body` bytes, refused as soon as it is known to be larger).
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Reply, FetchError> {
        let call = async {
            let mut res = request
                .header("accept", "application/json")
                .send()
                .await
                .map_err(|e| FetchError::of(e, self.timeout))?;
            let status = res.status();
            let max_age = res.headers().get("cache-control").and_then(|v| v.to_str().ok()).and_then(max_age);
            if res.content_length().is_some_and(|n| n > self.max_body as u64) {
                return Err(FetchError::TooLarge(self.max_body));
            }
            let mut body = Vec::new();
            while let Some(chunk) = res.chunk().await.map_err(|e| FetchError::of(e, self.timeout))? {
                if body.len() + chunk.len() > self.max_body {
                    return Err(FetchError::TooLarge(self.max_body));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Reply { status, body, max_age })
        };
        tokio::time::timeout(self.timeout, call).await.unwrap_or(Err(FetchError::Timeout(self.timeout)))
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
        assert_eq!((u.host().as_str(), u.port()), ("auth.example.com", 443));
        assert_eq!(u.to_string(), "https://auth.example.com/.well-known/jwks.json");
        let u = Url::parse("https://[::1]:8443").expect("ok");
        assert_eq!((u.host().as_str(), u.port(), u.to_string().as_str()), ("::1", 8443, "https://[::1]:8443/"));
        assert!(Url::parse("http://auth.example.com/jwks").is_err());
        let w = Url::parse_web("http://hooks.internal:8080/alert").expect("ok");
        assert_eq!((w.port(), w.to_string().as_str()), (8080, "http://hooks.internal:8080/alert"));
        assert!(Url::parse_web("ftp://x/").is_err());
        assert!(Url::parse("https://user:pw@auth.example.com/").is_err());
        assert!(Url::parse("https://user@auth.example.com/").is_err());
        assert!(Url::parse("/jwks.json").is_err());
    }

    #[test]
    fn form_values_and_cache_control() {
        assert_eq!(form_encode("a b+c/d=é"), "a+b%2Bc%2Fd%3D%C3%A9");
        assert_eq!(max_age("public, max-age=300, must-revalidate"), Some(300));
        assert_eq!(max_age("no-store"), None);
    }
}
