//! A lean HTTP/1.1 server for the common request: no body, or a small one with a
//! Content-Length. The connection's task reads and parses the head with httparse, runs
//! the request, and writes the response head and its first data with one `writev`; no
//! dispatcher between them. Anything else (upgrades and CONNECT, chunked or large request
//! bodies, `Expect: 100-continue`, HTTP/1.0) hands the connection, with the bytes already
//! read, to hyper's server for the rest of its life.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::body::{ProxyBody, ReqBody};
use crate::h1::{poll_fill, write_all};
use crate::http::Route;
use crate::proxy::Shared;

/// Request bodies up to this size (with a Content-Length) are read before the request
/// runs; larger ones stream through hyper's server.
pub const MAX_INLINE_BODY: usize = 64 * 1024;
/// Most request header fields.
const MAX_HEADERS: usize = 100;

/// How a connection ended on the lean server.
#[derive(Debug)]
pub enum Outcome {
    /// Closed (by either side, or on an error already answered).
    Done,
    /// The next request needs hyper's server: these bytes were read and not consumed.
    HandOff(Bytes),
}

/// Each header's name and value, as ranges of the head: a connection's, reused from one
/// request to the next (no allocation per request).
type Fields = Vec<(u32, u32, u32, u32)>;

/// What the request head said, when the lean server can serve it (its headers are in the
/// connection's `Fields`).
struct Head {
    method: Method,
    /// Head length in the buffer.
    len: usize,
    /// Request target, as a range of the head.
    target: (u32, u32),
    /// Content-Length (0 when absent).
    body_len: usize,
    /// The client asked to close after this request.
    close: bool,
    /// The client accepts trailers (`TE: trailers`).
    trailers: bool,
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

enum Parsed {
    Head(Head),
    Partial,
    HandOff,
    Bad(&'static str),
    TooLarge,
}

/// Serves requests on `io` until it closes, `stop` fires between requests, or a request
/// needs hyper.
pub async fn serve<S>(
    io: &mut S,
    peer: SocketAddr,
    route: &Route,
    shared: &Arc<Shared>,
    max_head: usize,
    header_timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Outcome
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut fields: Fields = Vec::with_capacity(32);
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    loop {
        // The head: the timer runs from its first byte (an idle keep-alive connection
        // waits as long as the client likes; `stop` closes it).
        let mut armed = false;
        if buf.is_empty() && *stop.borrow() {
            return Outcome::Done;
        }
        let head = loop {
            if !buf.is_empty() {
                if !armed {
                    timer
                        .as_mut()
                        .reset(tokio::time::Instant::now() + header_timeout);
                    armed = true;
                }
                match parse(&buf, max_head, &mut fields) {
                    Parsed::Head(h) => break h,
                    Parsed::Partial => {}
                    Parsed::HandOff => return Outcome::HandOff(buf.freeze()),
                    Parsed::Bad(why) => {
                        tracing::info!(
                            "malformed HTTP/1.1 request from {peer}: {why}; answering 400"
                        );
                        return refuse(io, "400 Bad Request").await;
                    }
                    Parsed::TooLarge => {
                        tracing::info!(
                            "request head from {peer} over {max_head} bytes; answering 431"
                        );
                        return refuse(io, "431 Request Header Fields Too Large").await;
                    }
                }
            }
            let idle = buf.is_empty();
            let read = std::future::poll_fn(|cx| poll_fill(io, &mut buf, cx));
            tokio::select! {
                r = read => match r {
                    Ok(0) | Err(_) => return Outcome::Done,
                    Ok(_) => {}
                },
                () = timer.as_mut(), if armed => {
                    tracing::info!("request head from {peer} not complete within {header_timeout:?}; closing");
                    return refuse(io, "408 Request Timeout").await;
                }
                _ = stop.changed(), if idle => return Outcome::Done,
            }
        };
        // The body, when there is one, is read whole before the request runs.
        while buf.len() < head.len + head.body_len {
            match std::future::poll_fn(|cx| poll_fill(io, &mut buf, cx)).await {
                Ok(0) | Err(_) => return Outcome::Done,
                Ok(_) => {}
            }
        }
        let bytes = buf.split_to(head.len).freeze();
        let parts = match build(&head, &fields, &bytes) {
            Ok(p) => p,
            Err(why) => {
                tracing::info!("malformed HTTP/1.1 request from {peer}: {why}; answering 400");
                return refuse(io, "400 Bad Request").await;
            }
        };
        let (body_len, close, trailers) = (head.body_len, head.close, head.trailers);
        let body = (body_len > 0).then(|| buf.split_to(body_len).freeze());
        let is_head = parts.method == Method::HEAD;
        let req = Request::from_parts(parts, ReqBody::Buffered(body));
        let resp =
            match crate::http::handle_request(Arc::clone(shared), route.clone(), peer, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
        let close = close || *stop.borrow();
        match write_response(io, &mut out, resp, is_head, close, trailers).await {
            Ok(true) if !close => {}
            _ => {
                let _ = io.shutdown().await;
                return Outcome::Done;
            }
        }
    }
}

/// Answers with an empty response of this status and ends the connection.
async fn refuse<S: AsyncWrite + Unpin>(io: &mut S, status: &str) -> Outcome {
    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = io.write_all(resp.as_bytes()).await;
    let _ = io.shutdown().await;
    Outcome::Done
}

/// Parses a request head at the start of `buf` without consuming it. Header names are
/// checked here as bytes; the `HeaderMap` is built by `build` from the frozen head.
fn parse(buf: &BytesMut, max_head: usize, fields: &mut Fields) -> Parsed {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let n = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > max_head {
                Parsed::TooLarge
            } else {
                Parsed::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        Err(_) => return Parsed::Bad("not an HTTP/1.1 request head"),
    };
    if n > max_head {
        return Parsed::TooLarge;
    }
    if req.version != Some(1) {
        return Parsed::HandOff; // HTTP/1.0: hyper knows its keep-alive rules
    }
    let Some(method) = req.method else {
        return Parsed::Bad("no method");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Bad("invalid method");
    };
    if method == Method::CONNECT {
        return Parsed::HandOff;
    }
    let base = buf.as_ptr() as usize;
    // Offsets fit: the head is at most `max_head` plus one read.
    let off = |p: *const u8| (p as usize - base) as u32;
    let path = req.path.unwrap_or("/");
    let target = (off(path.as_ptr()), off(path.as_ptr()) + path.len() as u32);
    fields.clear();
    let mut body_len: Option<usize> = None;
    let mut close = false;
    let mut trailers = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("transfer-encoding") || is("expect") || is("upgrade") {
            return Parsed::HandOff;
        }
        if is("content-length") {
            let Some(v) = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
            else {
                return Parsed::Bad("invalid content-length");
            };
            if body_len.is_some_and(|l| l != v) {
                return Parsed::Bad("conflicting content-length values");
            }
            if v > MAX_INLINE_BODY {
                return Parsed::HandOff;
            }
            body_len = Some(v);
        } else if is("connection") {
            for t in h.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::HandOff;
                }
            }
        } else if is("te") {
            trailers = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
        let (ns, vs) = (off(h.name.as_ptr()), off(h.value.as_ptr()));
        fields.push((ns, ns + name.len() as u32, vs, vs + h.value.len() as u32));
    }
    Parsed::Head(Head {
        method,
        len: n,
        target,
        body_len: body_len.unwrap_or(0),
        close,
        trailers,
    })
}

/// Header entries a request's map has room for beyond its own.
const HEADROOM: usize = 4;

/// The request head's parts, with header values as slices of the frozen head.
fn build(
    head: &Head,
    fields: &Fields,
    bytes: &Bytes,
) -> Result<http::request::Parts, &'static str> {
    let (ts, te) = (head.target.0 as usize, head.target.1 as usize);
    let uri = Uri::from_maybe_shared(bytes.slice(ts..te)).map_err(|_| "invalid request target")?;
    // Room for the headers the proxy adds on the way (x-request-id, x-forwarded-proto,
    // its version marker, route changes): a map that grows rehashes every entry.
    let mut headers = HeaderMap::with_capacity(fields.len() + HEADROOM);
    for &(ns, ne, vs, ve) in fields {
        let name = HeaderName::from_bytes(&bytes[ns as usize..ne as usize])
            .map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(vs as usize..ve as usize))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = head.method.clone();
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    parts.headers = headers;
    Ok(parts)
}

/// Writes a response; false when the connection cannot carry another request (the body
/// failed or ended short of its length, or a write failed).
async fn write_response<S>(
    io: &mut S,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    is_head: bool,
    close: bool,
    trailers_wanted: bool,
) -> io::Result<bool>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let no_body = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length: Option<u64> = None;
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING || name == KEEP_ALIVE {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            length = std::str::from_utf8(value.as_bytes())
                .ok()
                .and_then(|s| s.trim().parse().ok());
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        date::now(out);
        out.extend_from_slice(b"\r\n");
    }
    let chunked = if no_body || length.is_some() {
        false
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        length = Some(n);
        false
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        true
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(true);
    }
    // The first frame goes out with the head when it is already there; otherwise the
    // head goes first (a client may be waiting for it, as for a stream of events).
    let mut head_sent = false;
    let mut sent: u64 = 0;
    loop {
        let frame = if head_sent {
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        } else {
            match std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(f) => Poll::Ready(Some(f)),
            })
            .await
            {
                Some(f) => f,
                None => {
                    io.write_all(out).await?;
                    io.flush().await?;
                    head_sent = true;
                    continue;
                }
            }
        };
        let head: &[u8] = if head_sent { &[] } else { out };
        match frame {
            None => {
                let end: &[u8] = if chunked { b"0\r\n\r\n" } else { b"" };
                write_all(io, &[head, end]).await?;
                io.flush().await?;
                return Ok(length.is_none_or(|l| l == sent));
            }
            Some(Err(e)) => {
                // The client sees the connection close short of the body's end (or, when
                // nothing went out yet, before any response).
                tracing::debug!("response body failed: {e}");
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    if chunked {
                        let size = format!("{:x}\r\n", data.len());
                        write_all(io, &[head, size.as_bytes(), &data, b"\r\n"]).await?;
                    } else {
                        write_all(io, &[head, &data]).await?;
                    }
                    if !head_sent {
                        head_sent = true;
                    }
                    io.flush().await?;
                }
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else {
                        continue;
                    };
                    if chunked {
                        let mut end = b"0\r\n".to_vec();
                        if trailers_wanted {
                            for (n, v) in &trailers {
                                end.extend_from_slice(n.as_str().as_bytes());
                                end.extend_from_slice(b": ");
                                end.extend_from_slice(v.as_bytes());
                                end.extend_from_slice(b"\r\n");
                            }
                        }
                        end.extend_from_slice(b"\r\n");
                        write_all(io, &[head, &end]).await?;
                        io.flush().await?;
                        return Ok(true);
                    }
                    // A Content-Length response cannot carry trailers: they are dropped.
                    write_all(io, &[head]).await?;
                    io.flush().await?;
                    head_sent = true;
                }
            },
        }
    }
}

/// A stream that first yields bytes already read from it (handing a connection to hyper's
/// server mid-way).
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The `Date` header value (RFC 9110 IMF-fixdate), formatted once per second per thread.
pub(crate) mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub fn now(out: &mut Vec<u8>) {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, format(secs));
            }
            out.extend_from_slice(&c.1);
        });
    }

    /// The civil date (year, month 1–12, day 1–31) of a day counted from 1970-01-01
    /// (Howard Hinnant's algorithm).
    pub fn civil(days: i64) -> (i64, i64, i64) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = doy - (153 * mp + 2) / 5 + 1;
        let mo = if mp < 10 { mp + 3 } else { mp - 9 };
        (yoe + era * 400 + i64::from(mo <= 2), mo, d)
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT` for seconds since the Unix epoch.
    pub fn format(secs: u64) -> [u8; 29] {
        const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
        const MONTHS: [&[u8; 3]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
        let (y, mo, d) = civil(days as i64);
        let mut out = [b' '; 29];
        out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
        out[3] = b',';
        let two = |v: u64| [b'0' + (v / 10) as u8, b'0' + (v % 10) as u8];
        out[5..7].copy_from_slice(&two(d as u64));
        out[8..11].copy_from_slice(MONTHS[(mo - 1) as usize]);
        let y = y.clamp(0, 9999) as u64;
        out[12..16].copy_from_slice(&[
            b'0' + (y / 1000) as u8,
            b'0' + (y / 100 % 10) as u8,
            b'0' + (y / 10 % 10) as u8,
            b'0' + (y % 10) as u8,
        ]);
        out[17..19].copy_from_slice(&two(h));
        out[19] = b':';
        out[20..22].copy_from_slice(&two(m));
        out[22] = b':';
        out[23..25].copy_from_slice(&two(s));
        out[26..29].copy_from_slice(b"GMT");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(&date::format(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&date::format(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&date::format(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &date::format(1_795_564_800),
            b"Wed, 25 Nov 2026 00:00:00 GMT"
        );
    }

    #[test]
    fn heads_that_need_hyper_are_handed_off() {
        let cases: [&[u8]; 6] = [
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n",
        ];
        for c in cases {
            assert!(
                matches!(
                    parse(&BytesMut::from(c), 60 * 1024, &mut Vec::new()),
                    Parsed::HandOff
                ),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn bad_and_oversized_heads_are_refused() {
        let bad: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        ];
        for c in bad {
            assert!(matches!(
                parse(&BytesMut::from(c), 60 * 1024, &mut Vec::new()),
                Parsed::Bad(_)
            ));
        }
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(2000));
        assert!(matches!(
            parse(&BytesMut::from(big.as_bytes()), 1024, &mut Vec::new()),
            Parsed::TooLarge
        ));
        let raw = BytesMut::from(&b"POST /p?q HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\nTE: trailers\r\n\r\nabc"[..]);
        let mut fields = Vec::new();
        let Parsed::Head(h) = parse(&raw, 1024, &mut fields) else {
            panic!("a plain head");
        };
        assert_eq!((h.body_len, h.close, h.trailers), (3, true, true));
        assert_eq!(h.len, raw.len() - 3);
        let parts = build(&h, &fields, &raw.freeze()).expect("builds");
        assert_eq!(parts.uri, "/p?q");
        assert_eq!(parts.method, Method::POST);
        assert_eq!(parts.headers["host"], "a");
        assert_eq!(parts.headers.len(), 4);
    }
}
