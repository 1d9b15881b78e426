//! A reader beside hyper on HTTP/1.1 connections that sees what hyper cannot report: a request
//! head with both `Transfer-Encoding` and `Content-Length` (RFC 9112 section 6.3: "ought to be
//! handled as an error"; hyper drops the Content-Length and goes on with the chunked body, which
//! is safe but hides the attempt). The reader follows the message framing (heads parsed with
//! httparse, fixed and chunked bodies skipped) and queues one verdict per request head, in
//! order; the service takes one per request and answers a flagged one 400.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One verdict per request head, oldest first: `true` when the head carried both framings.
pub type Verdicts = Arc<Mutex<VecDeque<bool>>>;

/// Takes the verdict for the request being served (`false` when the scan has stopped).
pub fn take(v: &Verdicts) -> bool {
    v.lock().unwrap_or_else(|e| e.into_inner()).pop_front().unwrap_or(false)
}

/// The most header bytes the scan holds (hyper refuses longer heads itself).
const MAX_HEAD: usize = 1 << 20;
const MAX_HEADERS: usize = 2048;
/// Header fields parsed on the stack.
const FEW_HEADERS: usize = 64;

#[derive(Debug)]
enum State {
    Head,
    Fixed(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd(u8),
    Trailers,
    /// Not following any more (an upgrade, or something hyper refuses anyway).
    Off,
}

/// An IO that scans the bytes read through it.
pub struct Scan<IO> {
    io: IO,
    state: State,
    buf: Vec<u8>,
    verdicts: Verdicts,
}

impl<IO> Scan<IO> {
    pub fn new(io: IO) -> (Scan<IO>, Verdicts) {
        let verdicts: Verdicts = Arc::default();
        (Scan { io, state: State::Head, buf: Vec::new(), verdicts: verdicts.clone() }, verdicts)
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Off => return,
                State::Head => {
                    // skip the empty lines a client may send between requests (RFC 9112 2.2)
                    if self.buf.is_empty() {
                        let skip = data.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                    }
                    let start = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(data);
                    let Some(end) = head_end(&self.buf, start) else {
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    let rest_from = end - (self.buf.len() - data.len());
                    let head = std::mem::take(&mut self.buf);
                    self.head(&head[..end]);
                    data = &data[rest_from.min(data.len())..];
                }
                State::Fixed(n) => {
                    let k = (*n).min(data.len() as u64);
                    *n -= k;
                    data = &data[k as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(nl) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_HEAD {
                            self.state = State::Off;
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..nl]);
                    data = &data[nl + 1..];
                    let line = std::mem::take(&mut self.buf);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if matches!(self.state, State::Trailers) {
                        if line.is_empty() {
                            self.state = State::Head;
                        }
                        continue;
                    }
                    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
                    let size = std::str::from_utf8(digits).ok().and_then(|s| u64::from_str_radix(s.trim(), 16).ok());
                    self.state = match size {
                        Some(0) => State::Trailers,
                        Some(n) => State::ChunkData(n),
                        None => State::Off,
                    };
                }
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64);
                    *n -= k;
                    data = &data[k as usize..];
                    if *n == 0 {
                        self.state = State::ChunkDataEnd(2);
                    }
                }
                State::ChunkDataEnd(left) => {
                    let k = usize::from(*left).min(data.len());
                    *left -= k as u8;
                    data = &data[k..];
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                }
            }
        }
    }

    fn head(&mut self, head: &[u8]) {
        // most heads fit the stack; only a longer one pays for the large table
        let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
        let mut many;
        let mut req = httparse::Request::new(&mut few);
        let parsed = match req.parse(head) {
            Err(httparse::Error::TooManyHeaders) => {
                many = vec![httparse::EMPTY_HEADER; MAX_HEADERS];
                req = httparse::Request::new(&mut many);
                req.parse(head)
            }
            other => other,
        };
        if !matches!(parsed, Ok(httparse::Status::Complete(_))) {
            self.state = State::Off;
            return;
        }
        let mut te: Option<&[u8]> = None;
        let mut cl: Option<u64> = None;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                cl = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok());
                if cl.is_none() {
                    self.state = State::Off;
                    return;
                }
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        let both = te.is_some() && req.headers.iter().any(|h| h.name.eq_ignore_ascii_case("content-length"));
        self.verdicts.lock().unwrap_or_else(|e| e.into_inner()).push_back(both);
        self.state = if upgrade || req.method == Some("CONNECT") {
            State::Off
        } else if let Some(te) = te {
            let chunked =
                te.rsplit(|b| *b == b',').next().is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            if chunked { State::ChunkSize } else { State::Off }
        } else {
            match cl {
                Some(0) | None => State::Head,
                Some(n) => State::Fixed(n),
            }
        };
    }
}

/// The end of a request head in `buf` (searching from `from`): the empty line after the
/// header fields, ended by CRLF or, as httparse (and so hyper) also accepts, by a bare LF.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(p) = buf[i..].iter().position(|b| *b == b'\n') {
        let nl = i + p;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

impl<IO: AsyncRead + Unpin> AsyncRead for Scan<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Scan<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(chunks: &[&[u8]]) -> Vec<bool> {
        let (mut s, v) = Scan::new(());
        for c in chunks {
            s.feed(c);
        }
        let q = v.lock().unwrap().clone();
        q.into_iter().collect()
    }

    #[test]
    fn both_framings_are_flagged_and_framing_is_followed() {
        let clean = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let fixed = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 30\r\n\r\nGET /smuggled HTTP/1.1\r\nX: 1\r\n\r\n";
        let chunked =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n";
        assert_eq!(verdicts(&[clean]), [false]);
        assert_eq!(verdicts(&[both]), [true]);
        // a body that looks like a request is a body
        let mut all = Vec::new();
        for m in [&fixed[..], &chunked[..], &clean[..], &both[..], &clean[..]] {
            all.extend_from_slice(m);
        }
        assert_eq!(verdicts(&[&all]), [false, false, false, true, false]);
        // byte by byte, the same
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        assert_eq!(verdicts(&bytes), [false, false, false, true, false]);
        // bare LF line ends, as httparse takes them
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\nContent-Length: 4\nTransfer-Encoding: chunked\n\n0\r\n\r\n", clean]),
            [true, false]
        );
        // the header order does not matter
        assert_eq!(
            verdicts(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"]),
            [true]
        );
    }
}
