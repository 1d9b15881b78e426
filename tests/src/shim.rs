//! The real `portcullis-shim` binary (rebuilt once per test run), certificates made by the real
//! `openssl` command, requests from the real `curl`, raw bytes over TLS for the probes no
//! well-behaved client sends, and a small HTTPS upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::TempDir;
use crate::process::{Process, build_bin};

/// The portcullis-shim binary, rebuilt once per test run.
pub fn shim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("portcullis-shim")).clone()
}

/// Runs `openssl` in `dir`; fails the test with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running openssl (install the openssl package): {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA and certificates it signs, made with the openssl command in `dir`.
pub struct Certs {
    pub dir: PathBuf,
    /// The CA certificate (PEM), to trust.
    pub ca: PathBuf,
    ca_key: PathBuf,
    serial: AtomicUsize,
}

impl Certs {
    /// A new P-256 CA named `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Certs {
        let ca = dir.join(format!("{name}-ca.pem"));
        let ca_key = dir.join(format!("{name}-ca.key"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &ca_key.to_string_lossy(),
                "-out",
                &ca.to_string_lossy(),
                "-days",
                "30",
                "-subj",
                &format!("/CN={name} test CA"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Certs { dir: dir.to_path_buf(), ca, ca_key, serial: AtomicUsize::new(1) }
    }

    /// A leaf for `localhost` and `127.0.0.1` (plus the name as CN), signed by this CA, valid
    /// from `start` to `end` (`YYYYMMDDHHMMSSZ`; `None`: now for 30 days). Returns (cert, key).
    pub fn leaf(&self, name: &str, validity: Option<(&str, &str)>) -> (PathBuf, PathBuf) {
        let d = &self.dir;
        let key = d.join(format!("{name}.key"));
        let csr = d.join(format!("{name}.csr"));
        let cert = d.join(format!("{name}.pem"));
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key.to_string_lossy(),
                "-out",
                &csr.to_string_lossy(),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let ext = d.join(format!("{name}.ext"));
        std::fs::write(
            &ext,
            "[x]\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
        )
        .expect("writing the extensions file");
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let db = d.join(format!("index-{name}-{n}.txt"));
        std::fs::write(&db, "").expect("ca database");
        let serial = d.join(format!("serial-{name}-{n}"));
        std::fs::write(&serial, format!("{:02X}{:02X}\n", n, std::process::id() % 256)).expect("serial");
        let cnf = d.join(format!("ca-{name}-{n}.cnf"));
        std::fs::write(
            &cnf,
            format!(
                "[ca]\ndefault_ca=d\n[d]\ndatabase={}\nnew_certs_dir={}\nserial={}\ndefault_md=sha256\npolicy=p\nunique_subject=no\ncopy_extensions=none\n[p]\ncommonName=supplied\n",
                db.display(),
                d.display(),
                serial.display()
            ),
        )
        .expect("ca config");
        let mut args: Vec<String> = [
            "ca",
            "-batch",
            "-notext",
            "-config",
            &cnf.to_string_lossy(),
            "-cert",
            &self.ca.to_string_lossy(),
            "-keyfile",
            &self.ca_key.to_string_lossy(),
            "-in",
            &csr.to_string_lossy(),
            "-out",
            &cert.to_string_lossy(),
            "-extfile",
            &ext.to_string_lossy(),
            "-extensions",
            "x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match validity {
            Some((start, end)) => args.extend(["-startdate".into(), start.into(), "-enddate".into(), end.into()]),
            None => args.extend(["-days".into(), "30".into()]),
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(d, &args);
        (cert, key)
    }
}

/// The base64 SPKI SHA-256 pin of a PEM certificate (`sha256//...`), computed by openssl.
pub fn spki_pin(cert: &Path) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | openssl base64 -A",
            cert.display()
        ))
        .output()
        .expect("openssl pipeline");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    format!("sha256//{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// A running portcullis-shim.
pub struct Shim {
    process: Process,
    pub https: SocketAddr,
    pub http: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub config: PathBuf,
}

/// A shim config: TLS with `cert`/`key`, portcullis at `grpc`, `upstream` (a URL), metrics and
/// a plain listener on free ports, loopback trusted as a proxy; `extra` YAML appended (its
/// top-level keys must not repeat these).
pub fn shim_config(cert: &Path, key: &Path, grpc: SocketAddr, upstream: &str, extra: &str) -> String {
    format!(
        "listen: {{ https: 127.0.0.1:0, http: 127.0.0.1:0, metrics: 127.0.0.1:0 }}\n\
         tls: {{ cert_file: {}, key_file: {}, reload_interval: 200ms }}\n\
         portcullis: {{ address: http://{grpc}, ratelimit: {{ domain: edge }} }}\n\
         network: {{ trusted_proxies: [127.0.0.0/8] }}\n\
         upstream: {{ url: {upstream} }}\n{extra}",
        cert.display(),
        key.display()
    )
}

impl Shim {
    /// Writes `yaml` to `dir/shim.yaml` and starts `portcullis-shim serve` on it (JSON logs).
    pub async fn start(dir: &Path, yaml: &str) -> anyhow::Result<Shim> {
        let config = dir.join("shim.yaml");
        std::fs::write(&config, yaml)?;
        let mut cmd = Command::new(shim_bin());
        cmd.args(["serve", "--config"])
            .arg(&config)
            .args(["--log-format", "json"])
            .env("PORTCULLIS_SHIM_LOG", "info,gateway_shim=debug");
        let (process, (https, http, metrics)) = Process::spawn("portcullis-shim", cmd, |v| {
            let addr = |k: &str| v[k].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
            match (v["message"].as_str(), addr("https")) {
                (Some("portcullis-shim listening"), Some(h)) => Some((h, addr("http"), addr("metrics"))),
                _ => None,
            }
        })
        .await?;
        Ok(Shim { process, https, http, metrics, config })
    }

    /// `https://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https.port())
    }

    /// The metrics page.
    pub async fn metrics(&self) -> String {
        let m = self.metrics.expect("the metrics listener");
        crate::HttpClient::new()
            .request("GET", &format!("http://{m}/metrics"), &[], "")
            .await
            .map(|r| r.body)
            .unwrap_or_default()
    }
}

/// The process: its log, signals, exit.
impl std::ops::Deref for Shim {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Shim {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// What curl got.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    /// 0 when curl failed before a response.
    pub status: u16,
    pub version: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub exit: i32,
    pub stderr: String,
}

impl CurlResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of a header, joined with ", ".
    pub fn header_all(&self, name: &str) -> String {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Runs curl with `-sS -i` and `args`; parses the last response head and the body.
pub async fn curl(args: &[&str]) -> CurlResponse {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20"])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running curl (install the curl package): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let exit = out.status.code().unwrap_or(-1);
    let mut rest = text.as_str();
    let mut status = 0;
    let mut version = String::new();
    let mut headers = Vec::new();
    // skip informational heads (100 Continue) to the final one
    while rest.starts_with("HTTP/") {
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split_whitespace();
        version = parts.next().unwrap_or_default().to_owned();
        status = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        rest = body;
        if status >= 200 {
            break;
        }
    }
    CurlResponse { status, version, headers, body: rest.to_owned(), exit, stderr }
}

/// Sends `bytes` over TLS (trusting `ca`) to `addr`, then reads until the server closes or
/// `wait` passes; returns what came back.
pub async fn raw_tls(addr: SocketAddr, ca: &Path, bytes: &[u8], wait: Duration) -> String {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("reading the CA");
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connecting to the shim");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake with the shim");
    tls.write_all(bytes).await.expect("writing");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

use rustls::pki_types::pem::PemObject;

/// An HTTPS upstream (HTTP/1.1) in the test process answering 200 `{"upstream":"tls"}` and
/// counting the requests that reached it.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    pub async fn start(cert: &Path, key: &Path) -> anyhow::Result<TlsUpstream> {
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<_, _>>()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)?;
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                                hyper::body::Bytes::from_static(b"{\"upstream\":\"tls\"}"),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(TlsUpstream { addr, hits, task })
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A scratch folder for a shim test, with a CA and a server certificate for localhost.
pub struct ShimDir {
    pub dir: TempDir,
    pub certs: Certs,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ShimDir {
    pub fn new(tag: &str) -> ShimDir {
        let dir = TempDir::new(tag);
        let certs = Certs::new(&dir.0, "edge");
        let (cert, key) = certs.leaf("server", None);
        ShimDir { dir, certs, cert, key }
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }
}
