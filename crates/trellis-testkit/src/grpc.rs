//! A gRPC upstream and client written by hand on hyper's HTTP/2 (h2c, prior knowledge).
//!
//! Wire format: each message is a 5-byte prefix (1 byte compressed flag, always 0 here, then a
//! 4-byte big-endian length) followed by the payload. Responses carry
//! `content-type: application/grpc` and end with trailers `grpc-status` / `grpc-message`.
//!
//! Methods of [`GrpcServer`]:
//!
//! | path | behaviour |
//! | --- | --- |
//! | `/test.Echo/Unary` | exactly one request message, echoed; `grpc-status: 0` |
//! | `/test.Echo/Stream` | bidirectional: each message is echoed as soon as it arrives; `grpc-status: 0` when the client ends its stream |
//! | `/test.Echo/Fail` | trailers-only response: `grpc-status: 14` (UNAVAILABLE), `grpc-message: fixture failure` |
//! | anything else | trailers-only `grpc-status: 12` (UNIMPLEMENTED) |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::body::{ChannelBody, channel_body};
use crate::server::{ServerTask, loopback_any, spawn_server};
use crate::{Error, Result};

/// gRPC status OK.
pub const STATUS_OK: &str = "0";
/// gRPC status UNIMPLEMENTED.
pub const STATUS_UNIMPLEMENTED: &str = "12";
/// gRPC status INTERNAL.
pub const STATUS_INTERNAL: &str = "13";
/// gRPC status UNAVAILABLE.
pub const STATUS_UNAVAILABLE: &str = "14";
/// The `grpc-message` of `/test.Echo/Fail`.
pub const FAIL_MESSAGE: &str = "fixture failure";

/// How long [`grpc_call_pingpong`] waits for each echo before calling it lost.
pub const DEFAULT_ECHO_WAIT: Duration = Duration::from_secs(10);

type RespBody = BoxBody<Bytes, Infallible>;

/// Frames one message: flag 0 (uncompressed), 4-byte big-endian length, payload.
pub fn encode_message(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(0);
    // A fixture message never nears 4 GiB; saturate rather than wrap if one ever did.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
    out.freeze()
}

/// Reassembles length-prefixed messages from data frames of any size.
#[derive(Debug, Default)]
pub struct MessageDecoder {
    buf: BytesMut,
}

impl MessageDecoder {
    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, if one has fully arrived. Compressed messages are an error:
    /// the fixtures never negotiate compression.
    pub fn next_message(&mut self) -> Result<Option<Bytes>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(Error::Protocol(format!(
                "compressed flag {} on a gRPC message; fixtures use no compression",
                self.buf[0]
            )));
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes received that do not yet form a whole message.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Counters of a [`GrpcServer`]; read them through the handle.
#[derive(Debug, Default)]
pub struct GrpcStats {
    connections: AtomicU64,
    calls: AtomicU64,
    messages: AtomicU64,
}

impl GrpcStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Calls (HTTP/2 streams) received.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
    /// Messages echoed back.
    pub fn messages_echoed(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
}

/// A running gRPC fixture. Dropping it stops the server.
#[derive(Debug)]
pub struct GrpcServer {
    /// Where the server listens (h2c, prior knowledge).
    pub addr: SocketAddr,
    stats: Arc<GrpcStats>,
    task: ServerTask,
}

impl GrpcServer {
    /// Serves on `127.0.0.1:0`.
    pub async fn start() -> Result<Self> {
        Self::start_on(loopback_any()).await
    }

    /// Serves on `addr`.
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let stats = Arc::new(GrpcStats::default());
        let builder = Arc::new(hyper::server::conn::http2::Builder::new(
            TokioExecutor::new(),
        ));
        let conn_stats = stats.clone();
        let (addr, task) = spawn_server(addr, move |stream, _peer| {
            conn_stats.connections.fetch_add(1, Ordering::Relaxed);
            let stats = conn_stats.clone();
            let builder = builder.clone();
            async move {
                let service = service_fn(move |req| {
                    let stats = stats.clone();
                    async move { Ok::<_, Infallible>(route(req, stats).await) }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await?;
        Ok(Self { addr, stats, task })
    }

    /// The server's counters.
    pub fn stats(&self) -> &GrpcStats {
        &self.stats
    }

    /// Stops the server and waits until it and its connections are gone.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

fn grpc_response(body: RespBody) -> Response<RespBody> {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

fn status_trailers(status: &'static str, message: Option<&str>) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(v) = message.and_then(|m| HeaderValue::from_str(m).ok()) {
        trailers.insert("grpc-message", v);
    }
    trailers
}

/// A trailers-only response: one HEADERS frame with END_STREAM carrying the status.
fn trailers_only(status: &'static str, message: Option<&str>) -> Response<RespBody> {
    let mut resp = grpc_response(Empty::new().boxed());
    resp.headers_mut().extend(status_trailers(status, message));
    resp
}

async fn route(req: Request<Incoming>, stats: Arc<GrpcStats>) -> Response<RespBody> {
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if req.method() != Method::POST || !is_grpc {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"not grpc\n")).boxed());
        *resp.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return resp;
    }
    match req.uri().path() {
        "/test.Echo/Unary" => unary(req.into_body(), &stats).await,
        "/test.Echo/Stream" => stream(req.into_body(), stats),
        "/test.Echo/Fail" => trailers_only(STATUS_UNAVAILABLE, Some(FAIL_MESSAGE)),
        _ => trailers_only(STATUS_UNIMPLEMENTED, Some("unknown method")),
    }
}

async fn unary(body: Incoming, stats: &GrpcStats) -> Response<RespBody> {
    let data = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return trailers_only(STATUS_INTERNAL, Some(&format!("reading request: {e}"))),
    };
    let mut decoder = MessageDecoder::default();
    decoder.push(&data);
    let mut messages = Vec::new();
    loop {
        match decoder.next_message() {
            Ok(Some(m)) => messages.push(m),
            Ok(None) => break,
            Err(e) => return trailers_only(STATUS_INTERNAL, Some(&e.to_string())),
        }
    }
    if messages.len() != 1 || decoder.pending() != 0 {
        let msg = format!(
            "unary call needs exactly one message, got {} (+{} stray bytes)",
            messages.len(),
            decoder.pending()
        );
        return trailers_only(STATUS_INTERNAL, Some(&msg));
    }
    stats.messages.fetch_add(1, Ordering::Relaxed);
    let trailers = status_trailers(STATUS_OK, None);
    grpc_response(
        Full::new(encode_message(&messages[0]))
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed(),
    )
}

fn stream(mut body: Incoming, stats: Arc<GrpcStats>) -> Response<RespBody> {
    let (tx, resp_body) = channel_body(16);
    tokio::spawn(async move {
        let mut decoder = MessageDecoder::default();
        let end = loop {
            match body.frame().await {
                None => break status_trailers(STATUS_OK, None),
                Some(Err(e)) => {
                    break status_trailers(STATUS_INTERNAL, Some(&format!("request: {e}")));
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // request trailers: nothing to echo
                    };
                    decoder.push(&data);
                }
            }
            loop {
                match decoder.next_message() {
                    Ok(Some(m)) => {
                        stats.messages.fetch_add(1, Ordering::Relaxed);
                        if tx.send(Frame::data(encode_message(&m))).await.is_err() {
                            return; // the client went away
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx
                            .send(Frame::trailers(status_trailers(
                                STATUS_INTERNAL,
                                Some(&e.to_string()),
                            )))
                            .await;
                        return;
                    }
                }
            }
        };
        let _ = tx.send(Frame::trailers(end)).await;
    });
    grpc_response(resp_body.boxed())
}

/// What a gRPC call returned.
#[derive(Debug, Clone)]
pub struct GrpcResponse {
    /// The HTTP status (200 for every gRPC answer, whatever its grpc-status).
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Response messages, unframed.
    pub messages: Vec<Bytes>,
    /// Response trailers, if the response had a body; `None` for a trailers-only response.
    pub trailers: Option<HeaderMap>,
    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub grpc_status: Option<String>,
    /// `grpc-message`, found the same way.
    pub grpc_message: Option<String>,
}

impl GrpcResponse {
    fn new(
        parts: http::response::Parts,
        messages: Vec<Bytes>,
        trailers: Option<HeaderMap>,
    ) -> Self {
        let pick = |name: &str| {
            trailers
                .as_ref()
                .and_then(|t| t.get(name))
                .or_else(|| parts.headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            grpc_status: pick("grpc-status"),
            grpc_message: pick("grpc-message"),
            status: parts.status,
            headers: parts.headers,
            messages,
            trailers,
        }
    }
}

async fn h2c_connect<B>(addr: SocketAddr) -> Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn grpc_request<B>(authority: &str, path: &str, body: B) -> Result<Request<B>> {
    Ok(Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{path}"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(body)?)
}

/// Sends `messages` as one request (all at once) to `path` over a fresh h2c connection to
/// `addr`, with `addr` as the `:authority`, and reads the whole response.
pub async fn grpc_call(addr: SocketAddr, path: &str, messages: Vec<Bytes>) -> Result<GrpcResponse> {
    grpc_call_with_authority(addr, &addr.to_string(), path, messages).await
}

/// [`grpc_call`] with a chosen `:authority` (the service host a proxy routes on).
pub async fn grpc_call_with_authority(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    messages: Vec<Bytes>,
) -> Result<GrpcResponse> {
    let mut framed = BytesMut::new();
    for m in &messages {
        framed.extend_from_slice(&encode_message(m));
    }
    let mut sender = h2c_connect(addr).await?;
    let resp = sender
        .send_request(grpc_request(authority, path, Full::new(framed.freeze()))?)
        .await?;
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    let mut decoder = MessageDecoder::default();
    decoder.push(&collected.to_bytes());
    let mut out = Vec::new();
    while let Some(m) = decoder.next_message()? {
        out.push(m);
    }
    if decoder.pending() != 0 {
        return Err(Error::Protocol(format!(
            "{} bytes of a truncated gRPC message at the end of the response",
            decoder.pending()
        )));
    }
    Ok(GrpcResponse::new(parts, out, trailers))
}

/// Bidirectional streaming in lock-step: sends one message, waits (at most 10 s) for its echo,
/// then sends the next, and finally ends the request stream and reads the trailers.
///
/// A proxy that buffers a whole request or response before forwarding makes this fail with
/// [`Error::Timeout`] (after [`DEFAULT_ECHO_WAIT`]), which is the point. If the server ends the response early (an error
/// status), sending stops and the response so far is returned.
pub async fn grpc_call_pingpong(
    addr: SocketAddr,
    path: &str,
    messages: Vec<Bytes>,
) -> Result<GrpcResponse> {
    grpc_call_pingpong_with(addr, &addr.to_string(), path, messages, DEFAULT_ECHO_WAIT).await
}

/// [`grpc_call_pingpong`] with a chosen `:authority` and a chosen wait for each echo (and for
/// the response headers).
pub async fn grpc_call_pingpong_with(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    messages: Vec<Bytes>,
    echo_wait: Duration,
) -> Result<GrpcResponse> {
    let mut sender = h2c_connect::<ChannelBody>(addr).await?;
    let (tx, body) = channel_body(4);
    let mut pending = messages.into_iter();
    // Queue the first message before waiting for response headers: a proxy may wait for request
    // data before it opens the upstream stream.
    let mut first = pending.next();
    if let Some(m) = &first {
        let _ = tx.send(Frame::data(encode_message(m))).await;
    }
    let resp = tokio::time::timeout(
        echo_wait,
        sender.send_request(grpc_request(authority, path, body)?),
    )
    .await
    .map_err(|_| Error::Timeout(echo_wait, "gRPC response headers"))??;
    let (parts, mut body) = resp.into_parts();
    let mut decoder = MessageDecoder::default();
    let mut echoed = Vec::new();
    let mut trailers = None;
    let mut ended = false;
    while !ended {
        if first.take().is_none() {
            let Some(m) = pending.next() else { break };
            if tx.send(Frame::data(encode_message(&m))).await.is_err() {
                break;
            }
        }
        match next_message(&mut body, &mut decoder, &mut trailers, echo_wait).await? {
            Some(m) => echoed.push(m),
            None => ended = true,
        }
    }
    drop(tx);
    while !ended {
        match next_message(&mut body, &mut decoder, &mut trailers, echo_wait).await? {
            Some(m) => echoed.push(m),
            None => ended = true,
        }
    }
    Ok(GrpcResponse::new(parts, echoed, trailers))
}

/// The next whole message of `body`, or `None` when the body ends (storing trailers).
async fn next_message(
    body: &mut Incoming,
    decoder: &mut MessageDecoder,
    trailers: &mut Option<HeaderMap>,
    wait: Duration,
) -> Result<Option<Bytes>> {
    loop {
        if let Some(m) = decoder.next_message()? {
            return Ok(Some(m));
        }
        let frame = tokio::time::timeout(wait, body.frame())
            .await
            .map_err(|_| Error::Timeout(wait, "a streamed gRPC echo"))?;
        match frame {
            None => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => decoder.push(&data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        *trailers = Some(t);
                    }
                    return Ok(None);
                }
            },
        }
    }
}
