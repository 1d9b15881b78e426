//! portcullis-shim's TLS from real clients (curl, `openssl s_client`): versions, suites, ALPN,
//! HSTS; certificates checked at load; a certificate swapped on disk (a Kubernetes Secret's
//! symlink swap) served without restart, a bad one refused with the old kept; mTLS.

use std::path::Path;
use std::time::Duration;

use tests::{Certs, Portcullis, Shim, ShimDir, Upstream, curl, reference_policy, shim_bin, shim_config};

async fn stack(d: &ShimDir, extra: &str) -> (Portcullis, Upstream, Shim) {
    let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), extra);
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    (portcullis, upstream, shim)
}

/// `openssl s_client` against the shim with `args`; its whole output.
async fn s_client(port: u16, args: &[&str]) -> String {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", "localhost"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("running openssl s_client");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn negotiated(out: &str) -> Option<String> {
    let line = out.lines().find(|l| l.contains(", Cipher is "))?;
    let cipher = line.split(", Cipher is ").nth(1)?.trim().to_owned();
    (cipher != "(NONE)").then_some(cipher)
}

#[tokio::test]
async fn only_tls_1_2_with_ecdhe_aead_and_tls_1_3_are_spoken() {
    let d = ShimDir::new("shim-tls");
    let (_p, _u, shim) = stack(&d, "").await;
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let port = shim.https.port();

    // TLS 1.3 over HTTP/2 and TLS 1.2 over HTTP/1.1 work, both with HSTS
    let r = curl(&["--cacert", &ca, "--tlsv1.3", &shim.url("/health")]).await;
    assert_eq!((r.status, r.version.as_str()), (200, "HTTP/2"), "{r:?}");
    assert_eq!(r.header("strict-transport-security"), Some("max-age=31536000"), "{r:?}");
    let r = curl(&["--cacert", &ca, "--http1.1", "--tlsv1.2", "--tls-max", "1.2", &shim.url("/health")]).await;
    assert_eq!((r.status, r.version.as_str()), (200, "HTTP/1.1"), "{r:?}");
    assert!(r.header("strict-transport-security").is_some(), "{r:?}");

    // TLS 1.0 and 1.1: the server refuses the handshake (the client offers them: SECLEVEL 0)
    for v in ["-tls1", "-tls1_1"] {
        let out = s_client(port, &[v, "-cipher", "DEFAULT:@SECLEVEL=0"]).await;
        assert_eq!(negotiated(&out), None, "{v}: {out}");
        assert!(out.contains("alert"), "{v}: the server should answer with an alert: {out}");
    }
    let r = curl(&["--cacert", &ca, "--tlsv1.0", "--tls-max", "1.1", &shim.url("/health")]).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_ne!(r.exit, 0, "{r:?}");

    // TLS 1.2: whatever the client prefers, only ECDHE with an AEAD is negotiated
    let out = s_client(port, &["-tls1_2", "-CAfile", &ca]).await;
    let cipher = negotiated(&out).unwrap_or_else(|| panic!("TLS 1.2 did not negotiate: {out}"));
    assert!(cipher.starts_with("ECDHE-") && (cipher.contains("GCM") || cipher.contains("CHACHA20")), "{cipher}");
    for weak in ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "AES128-GCM-SHA256", "AES256-SHA"] {
        let out = s_client(port, &["-tls1_2", "-cipher", weak]).await;
        assert_eq!(negotiated(&out), None, "{weak} was accepted: {out}");
    }
    for strong in ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"] {
        let out = s_client(port, &["-tls1_2", "-cipher", strong]).await;
        assert_eq!(negotiated(&out).as_deref(), Some(strong), "{out}");
    }
    let out = s_client(port, &["-tls1_3"]).await;
    assert!(negotiated(&out).is_some_and(|c| c.starts_with("TLS_")), "{out}");

    // ALPN: h2 and http/1.1, nothing else
    let out = s_client(port, &["-alpn", "h2"]).await;
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let out = s_client(port, &["-alpn", "http/1.1"]).await;
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
}

fn check_config(dir: &Path, cert: &Path, key: &Path) -> (bool, String) {
    let cfg = shim_config(cert, key, "127.0.0.1:1".parse().expect("addr"), "http://127.0.0.1:1", "");
    let path = dir.join("check.yaml");
    std::fs::write(&path, cfg).expect("writing the config");
    let out = std::process::Command::new(shim_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("running check-config");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn bad_certificates_are_refused_at_load_with_the_reason() {
    let d = ShimDir::new("shim-certs");
    let (ok, out) = check_config(d.path(), &d.cert, &d.key);
    assert!(ok, "{out}");

    let (expired, expired_key) = d.certs.leaf("expired", Some(("20200101000000Z", "20200201000000Z")));
    let (ok, out) = check_config(d.path(), &expired, &expired_key);
    assert!(!ok && out.contains("expired on") && out.contains("expired.pem"), "{out}");

    let (future, future_key) = d.certs.leaf("future", Some(("20991201000000Z", "20991231000000Z")));
    let (ok, out) = check_config(d.path(), &future, &future_key);
    assert!(!ok && out.contains("not valid before"), "{out}");

    let (_, other_key) = d.certs.leaf("other", None);
    let (ok, out) = check_config(d.path(), &d.cert, &other_key);
    assert!(!ok && out.contains("does not match the leaf"), "{out}");

    // a chain with the CA before the leaf, and a leaf then an unrelated CA
    let leaf = std::fs::read_to_string(&d.cert).expect("leaf");
    let ca = std::fs::read_to_string(&d.certs.ca).expect("ca");
    let wrong_order = d.path().join("wrong-order.pem");
    std::fs::write(&wrong_order, format!("{ca}{leaf}")).expect("write");
    let (ok, out) = check_config(d.path(), &wrong_order, &d.key);
    assert!(!ok, "{out}");
    assert!(out.contains("out of order") || out.contains("does not match"), "{out}");
    let stranger = Certs::new(d.path(), "stranger");
    let unrelated = d.path().join("unrelated.pem");
    std::fs::write(&unrelated, format!("{leaf}{}", std::fs::read_to_string(&stranger.ca).expect("ca"))).expect("w");
    let (ok, out) = check_config(d.path(), &unrelated, &d.key);
    assert!(!ok && out.contains("out of order"), "{out}");
    // the right order passes
    let chain = d.path().join("chain.pem");
    std::fs::write(&chain, format!("{leaf}{ca}")).expect("write");
    let (ok, out) = check_config(d.path(), &chain, &d.key);
    assert!(ok, "{out}");

    let garbage = d.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let (ok, out) = check_config(d.path(), &garbage, &d.key);
    assert!(!ok && out.contains("no CERTIFICATE"), "{out}");

    // serve refuses to start on an expired certificate, and says why
    let cfg = shim_config(&expired, &expired_key, "127.0.0.1:1".parse().expect("addr"), "http://127.0.0.1:1", "");
    std::fs::write(d.path().join("serve.yaml"), cfg).expect("write");
    let out = tokio::process::Command::new(shim_bin())
        .args(["serve", "--config"])
        .arg(d.path().join("serve.yaml"))
        .output()
        .await
        .expect("running serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expired on"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The subject CN the shim serves, as openssl sees it.
async fn served_cn(port: u16) -> String {
    let out = s_client(port, &["-showcerts"]).await;
    out.lines()
        .find(|l| l.trim_start().starts_with("0 s:"))
        .map(|l| l.replace(' ', ""))
        .unwrap_or_else(|| panic!("no certificate in: {out}"))
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_is_served_without_restart() {
    let d = ShimDir::new("shim-swap");
    // Kubernetes mounts a Secret as tls.crt -> ..data/tls.crt, ..data -> ..<timestamp>/
    let mount = d.path().join("secret");
    let first = mount.join("..v1");
    std::fs::create_dir_all(&first).expect("mkdir");
    std::fs::copy(&d.cert, first.join("tls.crt")).expect("copy");
    std::fs::copy(&d.key, first.join("tls.key")).expect("copy");
    std::os::unix::fs::symlink("..v1", mount.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/tls.crt", mount.join("tls.crt")).expect("symlink");
    std::os::unix::fs::symlink("..data/tls.key", mount.join("tls.key")).expect("symlink");

    let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let upstream = Upstream::start().await.expect("upstream");
    let cfg = shim_config(
        &mount.join("tls.crt"),
        &mount.join("tls.key"),
        portcullis.grpc,
        &format!("http://{}", upstream.addr),
        "",
    );
    let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
    let port = shim.https.port();
    assert!(served_cn(port).await.contains("CN=server"), "the first certificate");
    // a 30-day certificate is within the default warning horizon (30d), not the critical one (7d)
    let line = shim
        .wait_for_log("the expiry warning", |l| l.contains("expires within the warning horizon"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(line.contains("\"level\":\"WARN\"") && line.contains("\"days_left\":"), "{line}");

    // the swap: a new folder, then ..data re-pointed in one rename, as the kubelet does
    let swap = |name: &str, cert: &Path, key: &Path| {
        let dir = mount.join(format!("..{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(cert, dir.join("tls.crt")).expect("copy");
        std::fs::copy(key, dir.join("tls.key")).expect("copy");
        let tmp = mount.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{name}"), &tmp).expect("symlink");
        std::fs::rename(&tmp, mount.join("..data")).expect("rename");
    };
    let (next, next_key) = d.certs.leaf("renewed", None);
    swap("v2", &next, &next_key);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !served_cn(port).await.contains("CN=renewed") {
        assert!(tokio::time::Instant::now() < deadline, "the renewed certificate was not served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let r = curl(&["--cacert", &ca, &shim.url("/health")]).await;
    assert_eq!(r.status, 200, "{r:?}");

    // a bad pair (the key of another certificate) is refused; the renewed one is still served
    let (_, wrong_key) = d.certs.leaf("wrong", None);
    let (third, _) = d.certs.leaf("third", None);
    swap("v3", &third, &wrong_key);
    shim.wait_for_log("the refused reload", |l| {
        l.contains("new server certificate refused") && l.contains("does not match")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(served_cn(port).await.contains("CN=renewed"));
    let m = shim.metrics().await;
    assert!(m.contains("portcullis_shim_certificate_reloads_total{outcome=\"refused\"} 1"), "{m}");
    assert!(m.contains("portcullis_shim_certificate_reloads_total{outcome=\"ok\"} 1"), "{m}");
    assert!(m.contains("portcullis_shim_certificate_expiry_timestamp_seconds "), "{m}");
}

#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let d = ShimDir::new("shim-mtls");
    let (client_cert, client_key) = d.certs.leaf("client-a", None);
    let (_p, upstream, shim) = {
        let portcullis = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
        let upstream = Upstream::start().await.expect("upstream");
        let cfg = shim_config(&d.cert, &d.key, portcullis.grpc, &format!("http://{}", upstream.addr), "").replace(
            "reload_interval: 200ms }",
            &format!(
                "reload_interval: 200ms, client_ca_file: {}, require_client_certificate: true }}",
                d.certs.ca.display()
            ),
        );
        let shim = Shim::start(d.path(), &cfg).await.unwrap_or_else(|e| panic!("{e:#}"));
        (portcullis, upstream, shim)
    };
    let ca = d.certs.ca.to_string_lossy().into_owned();
    let r = curl(&["--cacert", &ca, &shim.url("/health")]).await;
    assert_eq!(r.status, 0, "no client certificate: {r:?}");
    let r = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &client_cert.to_string_lossy(),
        "--key",
        &client_key.to_string_lossy(),
        &shim.url("/health"),
    ])
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(upstream.seen().len(), 1);
    // a certificate from another CA is refused
    let stranger = Certs::new(d.path(), "stranger");
    let (s_cert, s_key) = stranger.leaf("client-b", None);
    let r = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &s_cert.to_string_lossy(),
        "--key",
        &s_key.to_string_lossy(),
        &shim.url("/health"),
    ])
    .await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_scan_against_mozillas_intermediate_profile_passes() {
    let d = ShimDir::new("shim-sslyze");
    let (_p, _u, shim) = stack(&d, "").await;
    let out = tokio::process::Command::new(tests::sslyze_python())
        .args(["-m", "sslyze", "--mozilla_config=intermediate"])
        .arg(format!("--certinfo_ca_file={}", d.certs.ca.display()))
        .arg(format!("localhost:{}", shim.https.port()))
        .output()
        .await
        .expect("running sslyze");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(": OK - Compliant."),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // and what the scan saw: no TLS 1.0/1.1, no CBC or RSA key exchange under TLS 1.2
    assert!(!text.contains("TLS_RSA_WITH"), "{text}");
}
