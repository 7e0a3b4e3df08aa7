//! A lean HTTP/1.1 client for pooled upstream connections, used for requests whose body
//! the proxy holds in full (empty, or buffered for retries).
//!
//! The request's own task does the whole exchange: it writes the head and body with one
//! `writev`, parses the response head with httparse, and hands the connection to the
//! response body, which reads and de-frames it (Content-Length, chunked with trailers, or
//! until close) and puts the connection back in the pool at the end. There is no
//! connection task and no channel between tasks, which is where a general-purpose
//! client spends much of its time per request. Streaming request bodies and upgrades,
//! which need both directions at once, go through hyper's client instead.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted from an upstream.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most response header fields accepted from an upstream.
const MAX_HEADERS: usize = 100;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("connection closed before a complete response head")]
    Closed,
    #[error("invalid response from upstream: {0}")]
    Invalid(&'static str),
    #[error("response body ended early (connection closed)")]
    Truncated,
}

/// An idle or in-use upstream connection.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    /// Bytes read but not yet consumed (always empty while the connection is idle).
    buf: BytesMut,
    /// Requests this connection has carried.
    pub uses: u32,
    /// DestinationRule `maxRequestsPerConnection`: retired once `uses` reaches it.
    pub max_uses: Option<u32>,
    /// The cluster's idle timeout: not reused once idle this long.
    pub idle_timeout: Duration,
    /// When it went idle.
    pub since: Instant,
}

impl Conn {
    pub fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            uses: 0,
            max_uses: None,
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
            since: Instant::now(),
        }
    }

    /// False when the peer has closed (or sent something unasked) while the connection was
    /// idle. Costs no system call unless the socket became readable since its last use.
    pub fn is_reusable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// A request ready to go on the wire: its head encoded, its body in hand.
#[derive(Debug, Clone)]
pub struct Encoded {
    head: Vec<u8>,
    body: Option<Bytes>,
    /// HEAD requests have no response body whatever the headers say.
    head_request: bool,
    /// Safe to send again when a reused connection turns out to be dead.
    pub idempotent: bool,
}

/// Encodes a request head (already in origin form with a Host header) for HTTP/1.1.
pub fn encode(req: &http::request::Parts, body: Option<Bytes>) -> Encoded {
    let method = &req.method;
    let path = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    let headers = &req.headers;
    let mut size = method.as_str().len() + path.len() + 64;
    for (n, v) in headers {
        size += n.as_str().len() + v.len() + 4;
    }
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path);
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in headers {
        // The body's framing is ours to say.
        if n == header::CONTENT_LENGTH || n == header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(n.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let len = body.as_ref().map_or(0, Bytes::len);
    if len > 0
        || headers.contains_key(header::CONTENT_LENGTH)
        || matches!(*method, Method::POST | Method::PUT | Method::PATCH)
    {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa(len as u64).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    Encoded {
        head,
        body: body.filter(|b| !b.is_empty()),
        head_request: *method == Method::HEAD,
        idempotent: matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        ),
    }
}

fn itoa(mut n: u64) -> String {
    if n == 0 {
        return "0".to_string();
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    while n > 0 {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    String::from_utf8_lossy(&digits[i..]).into_owned()
}

/// Where a connection goes when its response body has been read to the end.
pub trait Recycle: Send + Sync + 'static {
    fn recycle(&self, addr: SocketAddr, conn: Conn);
}

/// Sends `req` on `conn` and reads the response head. An error comes with whether the
/// request may go again on another connection: when the write failed, or when nothing
/// at all came back and the method is idempotent.
pub async fn exchange(
    mut conn: Conn,
    req: &Encoded,
    addr: SocketAddr,
    pool: Arc<dyn Recycle>,
) -> Result<Response<H1Body>, (H1Error, bool)> {
    conn.uses += 1;
    write_request(&mut conn.io, req)
        .await
        .map_err(|e| (H1Error::Io(e), true))?;
    let (parts, framing, keep_alive) = read_head(&mut conn, req.head_request)
        .await
        .map_err(|(e, got_any)| (e, !got_any && req.idempotent))?;
    let body = H1Body::new(conn, framing, keep_alive, addr, pool);
    Ok(Response::from_parts(parts, body))
}

async fn write_request(io: &mut TcpStream, req: &Encoded) -> io::Result<()> {
    write_all(io, &[&req.head, req.body.as_deref().unwrap_or_default()]).await
}

/// Writes every slice, with as few `writev`s as the socket allows (both HTTP/1.1 sides).
pub(crate) async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    parts: &[&[u8]],
) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        if parts[idx].len() == off {
            idx += 1;
            off = 0;
            continue;
        }
        let mut slices = [IoSlice::new(&[]); 4];
        let mut count = 0;
        for (i, p) in parts[idx..].iter().enumerate().take(4) {
            slices[i] = IoSlice::new(if i == 0 { &p[off..] } else { p });
            count = i + 1;
        }
        let mut n = io.write_vectored(&slices[..count]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 && idx < parts.len() {
            let left = parts[idx].len() - off;
            if n >= left {
                n -= left;
                idx += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Reads what the socket has into `buf`, growing it a chunk at a time (both HTTP/1.1
/// sides).
pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

async fn fill(conn: &mut Conn) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_fill(&mut conn.io, &mut conn.buf, cx)).await
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
}

async fn read_head(
    conn: &mut Conn,
    head_request: bool,
) -> Result<(http::response::Parts, Framing, bool), (H1Error, bool)> {
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            got_any = true;
            match parse_head(conn, head_request) {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                Err(e) => return Err((e, true)),
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err((H1Error::Invalid("response head too large"), true));
            }
        }
        match fill(conn).await {
            Ok(0) => return Err((H1Error::Closed, got_any)),
            Ok(_) => {}
            Err(e) => return Err((H1Error::Io(e), got_any)),
        }
    }
}

/// Parses a complete response head off the buffer, skipping interim (1xx) responses.
fn parse_head(
    conn: &mut Conn,
    head_request: bool,
) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
    loop {
        // Header positions within the head, so that the values can be slices of one
        // frozen buffer (no copy per value) once the parser's borrow has ended.
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let (n, code, http10, count) = {
            let mut slots =
                [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let n = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut parsed,
                &conn.buf,
                &mut slots,
            ) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(H1Error::Invalid("too many response headers"));
                }
                Err(_) => return Err(H1Error::Invalid("malformed response head")),
            };
            let base = conn.buf.as_ptr() as usize;
            // Offsets fit: the head is at most MAX_HEAD_BYTES plus one read.
            let off = |p: *const u8| (p as usize - base) as u32;
            for (slot, h) in at.iter_mut().zip(parsed.headers.iter()) {
                let name = off(h.name.as_ptr());
                let value = off(h.value.as_ptr());
                *slot = (
                    name,
                    name + h.name.len() as u32,
                    value,
                    value + h.value.len() as u32,
                );
            }
            (
                n,
                parsed.code.unwrap_or(0),
                parsed.version == Some(0),
                parsed.headers.len(),
            )
        };
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Invalid(
                    "101 Switching Protocols without an upgrade",
                ));
            }
            // 100 Continue and friends: the downstream side answers its own client.
            let _ = conn.buf.split_to(n);
            continue;
        }
        let head = conn.buf.split_to(n).freeze();
        let mut headers = HeaderMap::with_capacity(count);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut transfer_encoding = false;
        let mut close = http10;
        for &(ns, ne, vs, ve) in &at[..count] {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let name = HeaderName::from_bytes(&head[ns..ne])
                .map_err(|_| H1Error::Invalid("invalid header name"))?;
            let raw = &head[vs..ve];
            if name == header::CONTENT_LENGTH {
                let v = std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(H1Error::Invalid("invalid content-length"))?;
                if length.is_some_and(|l| l != v) {
                    return Err(H1Error::Invalid("conflicting content-length values"));
                }
                length = Some(v);
            } else if name == header::TRANSFER_ENCODING {
                transfer_encoding = true;
                // Only the final coding decides (RFC 9112 §6.3).
                chunked = raw
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if name == header::CONNECTION {
                for t in raw.split(|&b| b == b',') {
                    let t = t.trim_ascii();
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if http10 && t.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| H1Error::Invalid("invalid header value"))?;
            headers.append(name, value);
        }
        let no_body = head_request || code == 204 || code == 304;
        let framing = if no_body {
            Framing::Done
        } else if transfer_encoding {
            // With both, Transfer-Encoding wins and the connection cannot be trusted after.
            if length.is_some() {
                close = true;
            }
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::UntilClose
            }
        } else {
            match length {
                Some(0) => Framing::Done,
                Some(l) => Framing::Length(l),
                None => Framing::UntilClose,
            }
        };
        if framing == Framing::UntilClose {
            close = true;
        }
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = if http10 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        *resp.headers_mut() = headers;
        let (parts, ()) = resp.into_parts();
        return Ok(Some((parts, framing, !close)));
    }
}

/// A response body read straight off the upstream connection.
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    addr: SocketAddr,
    pool: Arc<dyn Recycle>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    fn new(
        conn: Conn,
        framing: Framing,
        keep_alive: bool,
        addr: SocketAddr,
        pool: Arc<dyn Recycle>,
    ) -> H1Body {
        let mut body = H1Body {
            conn: Some(conn),
            framing,
            keep_alive,
            addr,
            pool,
        };
        if framing == Framing::Done {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection goes back to the pool when it is
    /// clean (no stray bytes after the message, and nothing said to close it).
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                conn.since = Instant::now();
                // Give the buffer's memory back while idle.
                conn.buf = BytesMut::new();
                self.pool.recycle(self.addr, conn);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(rem) => {
                    if !conn.buf.is_empty() {
                        let take = (rem.min(conn.buf.len() as u64)) as usize;
                        let data = conn.buf.split_to(take).freeze();
                        let left = rem - take as u64;
                        self.framing = Framing::Length(left);
                        if left == 0 {
                            self.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::UntilClose => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => match chunk_step(&mut conn.buf, state) {
                    Ok(Step::Data(data, next)) => {
                        self.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::Next(next)) => {
                        self.framing = Framing::Chunked(next);
                        continue;
                    }
                    Ok(Step::End(trailers)) => {
                        self.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::NeedMore) => {
                        if conn.buf.len() > MAX_HEAD_BYTES {
                            self.conn = None;
                            return Poll::Ready(Some(Err(H1Error::Invalid(
                                "chunk header or trailers too large",
                            ))));
                        }
                    }
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
            }
            // Need more bytes.
            match ready!(poll_fill(&mut conn.io, &mut conn.buf, cx)) {
                Ok(0) => {
                    if self.framing == Framing::UntilClose {
                        self.framing = Framing::Done;
                        self.conn = None;
                        return Poll::Ready(None);
                    }
                    self.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Truncated)));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Io(e))));
                }
            }
        }
    }
}

enum Step {
    Data(Bytes, Chunk),
    Next(Chunk),
    End(Option<HeaderMap>),
    NeedMore,
}

/// One step of chunked decoding over the buffered bytes.
fn chunk_step(buf: &mut BytesMut, state: Chunk) -> Result<Step, H1Error> {
    match state {
        Chunk::Size => match httparse::parse_chunk_size(buf) {
            Ok(httparse::Status::Complete((n, size))) => {
                let _ = buf.split_to(n);
                Ok(Step::Next(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                }))
            }
            Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
            Err(_) => Err(H1Error::Invalid("invalid chunk size")),
        },
        Chunk::Data(rem) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = rem.min(buf.len() as u64) as usize;
            let data = buf.split_to(take).freeze();
            let left = rem - take as u64;
            Ok(Step::Data(
                data,
                if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                },
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err(H1Error::Invalid("chunk data not followed by CRLF"));
            }
            let _ = buf.split_to(2);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((n, fields))) => {
                    let mut trailers = HeaderMap::new();
                    for f in fields {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(f.name.as_bytes()),
                            HeaderValue::from_bytes(f.value),
                        ) {
                            trailers.append(name, value);
                        }
                    }
                    let _ = buf.split_to(n);
                    Ok(Step::End((!trailers.is_empty()).then_some(trailers)))
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(_) => Err(H1Error::Invalid("malformed trailers")),
            }
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn request_heads_are_framed_by_the_proxy() {
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = "/submit?x=1".parse().expect("uri");
        let h = req.headers_mut();
        h.insert(header::HOST, HeaderValue::from_static("app"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        let e = encode(&req.into_parts().0, Some(Bytes::from_static(b"hello")));
        assert_eq!(
            std::str::from_utf8(&e.head).expect("ascii"),
            "POST /submit?x=1 HTTP/1.1\r\nhost: app\r\ncontent-length: 5\r\n\r\n"
        );
        assert!(!e.idempotent);
        let mut get = Request::new(());
        get.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("app"));
        let e = encode(&get.into_parts().0, None);
        assert_eq!(
            std::str::from_utf8(&e.head).expect("ascii"),
            "GET / HTTP/1.1\r\nhost: app\r\n\r\n"
        );
        assert!(e.idempotent && e.body.is_none());
        assert_eq!(itoa(0), "0");
        assert_eq!(itoa(18_446_744_073_709_551_615), "18446744073709551615");
    }

    #[test]
    fn chunked_bodies_decode_with_trailers() {
        let mut buf = BytesMut::from(&b"5;ext=1\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n"[..]);
        let mut state = Chunk::Size;
        let mut data = Vec::new();
        let trailers = loop {
            match chunk_step(&mut buf, state).expect("valid") {
                Step::Data(d, next) => {
                    data.extend_from_slice(&d);
                    state = next;
                }
                Step::Next(next) => state = next,
                Step::End(t) => break t,
                Step::NeedMore => panic!("complete input"),
            }
        };
        assert_eq!(data, b"hello");
        let t = trailers.expect("trailers");
        assert_eq!(t["grpc-status"], "0");
        assert!(buf.is_empty());
        let mut bad = BytesMut::from(&b"zz\r\n"[..]);
        assert!(chunk_step(&mut bad, Chunk::Size).is_err());
        let mut short = BytesMut::from(&b"5\r\nhel"[..]);
        assert!(matches!(
            chunk_step(&mut short, Chunk::Size),
            Ok(Step::Next(Chunk::Data(5)))
        ));
    }
}
