//! Distributed tracing: W3C Trace Context and B3 propagation, sampling, and one span per
//! hop and side, exported over OTLP (HTTP/protobuf, or gRPC) or as Zipkin v2 JSON.
//!
//! What a workload's Telemetry selects arrives in the snapshot (`Workload.telemetry`:
//! tracing per side, with its providers and sampling percentage). With none, the proxy
//! leaves trace headers alone. With some, each request:
//!
//! - takes its context from `traceparent` (and `tracestate`), else B3 (`b3`, or the
//!   `x-b3-*` headers); with none, a new trace starts;
//! - is sampled as the context says, and else at the side's percentage (Istio's default
//!   1 %), rolled from its `x-request-id` unless `useRequestIdForTraceSampling` is false:
//!   an upstream decision is always kept;
//! - gets a span of its own (a child of the incoming one), whose id the request carries on
//!   in `traceparent`, and in B3 as well when it came with B3 (`x-b3-*`, and `b3` if that
//!   is what came), so that W3C and B3 apps both follow;
//! - when sampled, reports its span when the response has been sent: name
//!   `host:port/*` (Istio's), kind CLIENT (outbound) or SERVER (inbound), and attributes
//!   `http.method`, `http.url`, `http.protocol`, `http.status_code`, `response_flags`,
//!   `upstream_cluster`, `peer.address`, `guid:x-request-id`, `user_agent`,
//!   `request_size`, `response_size`, `component`, `node_id`, `istio.namespace`,
//!   `istio.canonical_service`, `istio.canonical_revision`, `istio.mesh_id`, and the
//!   Telemetry's `customTags`.
//!
//! Spans go to an exporter thread per collector through a bounded queue, and leave in
//! batches (up to 512 spans, or every 200 ms): a slow or absent collector never holds a
//! request. A span that finds the queue full is dropped and counted
//! (`trellis_proxy_spans_dropped_total`), as is a batch the collector refuses.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use trellis_xds::snapshot as wire;

/// Spans dropped: the queue was full, or the collector could not be reached.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Spans sent to a collector.
pub static EXPORTED: AtomicU64 = AtomicU64::new(0);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
use crate::http::X_REQUEST_ID;

/// A trace context as it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Incoming {
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
    pub sampled: Option<bool>,
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    // B3 allows 64-bit trace ids: left-padded to 128 bits.
    if s.len() > 2 * N || !s.len().is_multiple_of(2) || s.is_empty() {
        return None;
    }
    let mut out = [0u8; N];
    let start = N - s.len() / 2;
    // Any byte that is not a hex digit sets the high bit of `bad`.
    let mut bad = 0u8;
    for (o, pair) in out[start..].iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0x80 == 0 && out != [0u8; N]).then_some(out)
}

/// A hex digit's value; `0x80` for any other byte.
static HEX: [u8; 256] = {
    let mut t = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Lowercase hex of `b` into `out` (twice as long).
fn hex_into(b: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, x) in b.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(x >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(x & 15)];
    }
}

fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// The context of a request: W3C first, then single-header B3, then B3's headers.
pub fn extract(h: &HeaderMap) -> Incoming {
    let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok());
    if let Some(tp) = text(&TRACEPARENT) {
        // The common shape, read in place: version 00, lowercase, 55 bytes.
        let b = tp.as_bytes();
        if b.len() == 55
            && b.starts_with(b"00-")
            && (b[35], b[52]) == (b'-', b'-')
            && !b.iter().any(u8::is_ascii_uppercase)
        {
            if let (Some(t), Some(s), Some([f])) = (
                hex_to::<16>(&tp[3..35]),
                hex_to::<8>(&tp[36..52]),
                hex_to::<1>(&tp[53..55]).or_else(|| (&tp[53..55] == "00").then_some([0])),
            ) {
                return Incoming {
                    trace_id: Some(t),
                    span_id: Some(s),
                    sampled: Some(f & 1 == 1),
                };
            }
        }
        let parts: Vec<&str> = tp.trim().split('-').collect();
        // Version 00 has exactly four fields; a later version at least four (W3C).
        let shape_ok = match parts.first() {
            Some(&"00") => parts.len() == 4,
            Some(v) => v.len() == 2 && *v != "ff" && hex_to::<1>(v).is_some() && parts.len() >= 4,
            None => false,
        };
        if let (true, [_, trace, span, flags, ..]) = (shape_ok, parts.as_slice()) {
            let lower = !tp.bytes().any(|b| b.is_ascii_uppercase());
            if trace.len() == 32 && span.len() == 16 && flags.len() == 2 && lower {
                if let (Some(t), Some(s), Some([f])) = (
                    hex_to::<16>(trace),
                    hex_to::<8>(span),
                    hex_to::<1>(flags).or_else(|| (*flags == "00").then_some([0])),
                ) {
                    return Incoming {
                        trace_id: Some(t),
                        span_id: Some(s),
                        sampled: Some(f & 1 == 1),
                    };
                }
            }
        }
    }
    if let Some(b3) = text(&B3) {
        let parts: Vec<&str> = b3.trim().split('-').collect();
        let sampled = |s: &str| match s {
            "1" | "d" => Some(true),
            "0" => Some(false),
            _ => None,
        };
        match parts.as_slice() {
            [only] => {
                return Incoming {
                    sampled: sampled(only),
                    ..Incoming::default()
                };
            }
            [trace, span, rest @ ..] if matches!(trace.len(), 16 | 32) && span.len() == 16 => {
                if let (Some(t), Some(s)) = (hex_to::<16>(trace), hex_to::<8>(span)) {
                    return Incoming {
                        trace_id: Some(t),
                        span_id: Some(s),
                        sampled: rest.first().and_then(|x| sampled(x)),
                    };
                }
            }
            _ => {}
        }
    }
    let sampled = if text(&B3_FLAGS) == Some("1") {
        Some(true)
    } else {
        match text(&B3_SAMPLED) {
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            _ => None,
        }
    };
    Incoming {
        trace_id: text(&B3_TRACE)
            .filter(|t| matches!(t.len(), 16 | 32))
            .and_then(hex_to::<16>),
        span_id: text(&B3_SPAN)
            .filter(|s| s.len() == 16)
            .and_then(hex_to::<8>),
        sampled,
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    loop {
        for chunk in out.chunks_mut(8) {
            let r = crate::http::random_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        if out != [0u8; N] {
            return out;
        }
    }
}

/// Where spans go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Protocol {
    Otlp,
    /// OTLP over gRPC (h2c, one connection kept open).
    OtlpGrpc,
    Zipkin,
}

/// The gRPC method OTLP spans are sent to.
const OTLP_GRPC_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// One collector, and the thread that sends it spans.
#[derive(Debug)]
struct Exporter {
    tx: SyncSender<Span>,
}

/// Spans a collector's queue holds before new ones are dropped…
const QUEUE: usize = 4096;
/// …and the bytes all queues may hold together (values copied into spans come from
/// requests: a count alone would not bound memory).
const QUEUE_BYTES: usize = 16 << 20;
static QUEUED_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Attribute values are cut to this many bytes (Istio's default `maxTagLength`).
const DEFAULT_MAX_TAG: usize = 256;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_millis(200);

fn exporter(
    protocol: Protocol,
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Arc<Exporter> {
    type Key = (Protocol, String, u16, String, Duration);
    static EXPORTERS: OnceLock<Mutex<HashMap<Key, Arc<Exporter>>>> = OnceLock::new();
    let key = (protocol, host.to_string(), port, path.to_string(), timeout);
    let mut map = EXPORTERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(e) = map.get(&key) {
        return Arc::clone(e);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
    let (h, p) = (host.to_string(), path.to_string());
    let spawned = std::thread::Builder::new()
        .name("span-export".into())
        .spawn(move || export_loop(rx, protocol, &h, port, &p, timeout));
    if let Err(e) = spawned {
        tracing::warn!("span exporter for {host}:{port}: {e}");
    }
    let e = Arc::new(Exporter { tx });
    map.insert(key, Arc::clone(&e));
    e
}

fn export_loop(
    rx: Receiver<Span>,
    protocol: Protocol,
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) {
    let mut batch: Vec<Span> = Vec::new();
    let mut grpc = match protocol {
        Protocol::OtlpGrpc => match GrpcClient::new() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("span exporter for {host}:{port}: {e}");
                return;
            }
        },
        _ => None,
    };
    loop {
        // A batch leaves when it is full, or FLUSH_EVERY after its first span came.
        match rx.recv() {
            Ok(span) => batch.push(span),
            Err(_) => return,
        }
        let due = std::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            let left = due.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        QUEUED_BYTES.fetch_sub(
            batch.iter().map(Span::weight).sum::<usize>(),
            Ordering::Relaxed,
        );
        let (body, content_type) = match protocol {
            Protocol::Otlp | Protocol::OtlpGrpc => (otlp::encode(&batch), "application/x-protobuf"),
            Protocol::Zipkin => (zipkin_json(&batch).into_bytes(), "application/json"),
        };
        let n = batch.len() as u64;
        batch.clear();
        let sent = match &mut grpc {
            Some(client) => client.export(host, port, &body, timeout),
            None => post(host, port, path, content_type, &body, timeout),
        };
        match sent {
            Ok(()) => {
                EXPORTED.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                DROPPED.fetch_add(n, Ordering::Relaxed);
                tracing::debug!("spans to {host}:{port}{path} dropped: {e}");
            }
        }
    }
}

/// One HTTP/1.1 POST on a fresh connection (batches are few: a connection per batch costs
/// nothing worth a pool).
fn post(
    host: &str,
    port: u16,
    path: &str,
    content_type: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut sock =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).map_err(|e| e.to_string())?;
    sock.write_all(body).map_err(|e| e.to_string())?;
    let mut status = [0u8; 12];
    sock.read_exact(&mut status).map_err(|e| e.to_string())?;
    match &status[9..10] {
        b"2" => Ok(()),
        _ => Err(format!(
            "the collector answered {}",
            String::from_utf8_lossy(&status[9..12])
        )),
    }
}

/// OTLP/gRPC: unary `Export` calls on one HTTP/2 connection (h2c), driven by a runtime of
/// the exporter thread's own (the connection's task runs while a call is under way).
struct GrpcClient {
    rt: tokio::runtime::Runtime,
    conn: Option<hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>>,
}

impl GrpcClient {
    fn new() -> std::io::Result<GrpcClient> {
        Ok(GrpcClient {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            conn: None,
        })
    }

    /// One batch (an encoded `ExportTraceServiceRequest`). A connection that has gone idle
    /// and died is replaced once, so that a batch is not lost to it.
    fn export(
        &mut self,
        host: &str,
        port: u16,
        message: &[u8],
        timeout: Duration,
    ) -> Result<(), String> {
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(
            &u32::try_from(message.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        framed.extend_from_slice(message);
        let framed = bytes::Bytes::from(framed);
        let reused = self.conn.is_some();
        let first = self.call(host, port, framed.clone(), timeout);
        match first {
            Err(Retry::Connection(_)) if reused => {
                self.conn = None;
                self.call(host, port, framed, timeout)
                    .map_err(Retry::into_message)
            }
            other => other.map_err(Retry::into_message),
        }
    }

    fn call(
        &mut self,
        host: &str,
        port: u16,
        framed: bytes::Bytes,
        timeout: Duration,
    ) -> Result<(), Retry> {
        use http_body_util::BodyExt as _;
        let conn = &mut self.conn;
        let outcome = self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                if conn.as_ref().is_none_or(|c| c.is_closed()) {
                    let stream = tokio::net::TcpStream::connect((host, port))
                        .await
                        .map_err(|e| Retry::Connection(e.to_string()))?;
                    let _ = stream.set_nodelay(true);
                    let (send, driver) = hyper::client::conn::http2::handshake(
                        hyper_util::rt::TokioExecutor::new(),
                        hyper_util::rt::TokioIo::new(stream),
                    )
                    .await
                    .map_err(|e| Retry::Connection(e.to_string()))?;
                    tokio::spawn(driver);
                    *conn = Some(send);
                }
                let Some(send) = conn.as_mut() else {
                    return Err(Retry::Connection("no connection".into()));
                };
                send.ready()
                    .await
                    .map_err(|e| Retry::Connection(e.to_string()))?;
                let req = http::Request::post(format!("http://{host}:{port}{OTLP_GRPC_PATH}"))
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .header(http::header::TE, "trailers")
                    .body(http_body_util::Full::new(framed))
                    .map_err(|e| Retry::Call(e.to_string()))?;
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| Retry::Connection(e.to_string()))?;
                let http_status = resp.status();
                let head = resp.headers().clone();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| Retry::Call(e.to_string()))?;
                // grpc-status in the trailers, or in the head of a trailers-only answer.
                let trailers = body.trailers().cloned().unwrap_or_default();
                let field = |name: &str| {
                    trailers
                        .get(name)
                        .or_else(|| head.get(name))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                match field("grpc-status").as_deref() {
                    Some("0") => Ok(()),
                    Some(code) => Err(Retry::Call(format!(
                        "the collector answered grpc-status {code} {}",
                        field("grpc-message").unwrap_or_default()
                    ))),
                    None => Err(Retry::Call(format!(
                        "the collector answered HTTP {http_status} without grpc-status"
                    ))),
                }
            })
            .await
            .unwrap_or_else(|_| Err(Retry::Call("timed out".into())))
        });
        if outcome.is_err() {
            self.conn = None;
        }
        outcome
    }
}

/// Why a gRPC export failed: the connection (worth one more try on a new one), or the call.
enum Retry {
    Connection(String),
    Call(String),
}

impl Retry {
    fn into_message(self) -> String {
        match self {
            Retry::Connection(m) | Retry::Call(m) => m,
        }
    }
}

/// A side's tracing, compiled.
#[derive(Debug, Clone)]
struct SideConfig {
    /// Percent of new traces sampled.
    sampling: f64,
    max_tag: usize,
    exporters: Vec<Arc<Exporter>>,
    propagate: bool,
    /// A new trace's decision is a function of its `x-request-id` (Envoy's and Istio's
    /// default), so that every proxy that sees the id decides alike.
    by_request_id: bool,
    /// `customTags`: name and value (an environment variable is read when compiled).
    custom: Arc<[(Arc<str>, CustomTag)]>,
}

/// A custom tag's value.
#[derive(Debug)]
enum CustomTag {
    Literal(String),
    /// A request header, or the default when the request has none.
    Header(HeaderName, String),
}

impl CustomTag {
    fn of(t: &wire::TracingTag) -> Option<CustomTag> {
        let default = t.default_value.clone().unwrap_or_default();
        if let Some(v) = &t.literal {
            return Some(CustomTag::Literal(v.clone()));
        }
        if let Some(var) = &t.environment {
            return Some(CustomTag::Literal(std::env::var(var).unwrap_or(default)));
        }
        let name = t.header.as_deref()?;
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(CustomTag::Header(h, default)),
            Err(_) => {
                tracing::warn!("custom tag header {name:?} is not a header name");
                None
            }
        }
    }
}

/// A workload's tracing, compiled from its Telemetry.
#[derive(Debug)]
pub struct Tracer {
    client: Option<SideConfig>,
    server: Option<SideConfig>,
}

impl Tracer {
    /// From the snapshot's telemetry: `None` when nothing traces.
    pub fn compile(t: &wire::Telemetry) -> Option<Tracer> {
        let mut tracer = Tracer {
            client: None,
            server: None,
        };
        for entry in &t.tracing {
            let mut exporters = Vec::new();
            let report = entry.disable_span_reporting != Some(true);
            for name in entry.providers.iter().filter(|_| report) {
                let Some(p) = t.providers.iter().find(|p| &p.name == name) else {
                    tracing::warn!("tracing provider {name:?} is not defined");
                    continue;
                };
                let (protocol, default_path) = match p.kind.as_str() {
                    "zipkin" => (Protocol::Zipkin, "/api/v2/spans"),
                    "opentelemetry" if p.grpc => (Protocol::OtlpGrpc, OTLP_GRPC_PATH),
                    "opentelemetry" => (Protocol::Otlp, "/v1/traces"),
                    _ => continue,
                };
                let timeout = p
                    .timeout
                    .as_ref()
                    .and_then(|d| Duration::try_from(*d).ok())
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(5));
                exporters.push(exporter(
                    protocol,
                    &p.service,
                    u16::try_from(p.port).unwrap_or(0),
                    p.path.as_deref().unwrap_or(default_path),
                    timeout,
                ));
            }
            let max_tag = entry
                .providers
                .iter()
                .filter_map(|n| t.providers.iter().find(|p| &p.name == n)?.max_tag_length)
                .next()
                .map_or(DEFAULT_MAX_TAG, |m| m as usize);
            let side = SideConfig {
                max_tag,
                sampling: entry
                    .random_sampling_percentage
                    .unwrap_or(1.0)
                    .clamp(0.0, 100.0),
                exporters,
                propagate: entry.disable_context_propagation != Some(true),
                by_request_id: entry.use_request_id_for_trace_sampling != Some(false),
                custom: entry
                    .custom_tags
                    .iter()
                    .filter_map(|(name, t)| Some((Arc::from(name.as_str()), CustomTag::of(t)?)))
                    .collect(),
            };
            let (client, server) = match entry.mode.as_str() {
                "CLIENT" => (true, false),
                "SERVER" => (false, true),
                _ => (true, true),
            };
            if client {
                tracer.client = Some(side.clone());
            }
            if server {
                tracer.server = Some(side);
            }
        }
        (tracer.client.is_some() || tracer.server.is_some()).then_some(tracer)
    }

    /// Starts this hop's span for a request (inbound: the server side), rewriting its
    /// trace headers for the next hop. `None` when this side does not trace, or the span
    /// is not sampled (its context still goes on to the next hop).
    pub fn start<B>(&self, inbound: bool, req: &mut http::Request<B>) -> Option<Box<Started>> {
        let side = if inbound { &self.server } else { &self.client }.as_ref()?;
        let headers = req.headers_mut();
        let incoming = extract(headers);
        let sampled = incoming.sampled.unwrap_or_else(|| {
            if side.sampling >= 100.0 {
                return true;
            }
            let roll = match headers.get(&X_REQUEST_ID).filter(|_| side.by_request_id) {
                Some(id) => fnv1a(id.as_bytes()),
                None => crate::http::random_u64(),
            };
            (roll % 1_000_000) as f64 / 10_000.0 < side.sampling
        });
        let trace_id = incoming.trace_id.unwrap_or_else(random_bytes::<16>);
        let span_id = random_bytes::<8>();
        if side.propagate {
            inject(headers, trace_id, span_id, incoming.span_id, sampled);
        }
        // An unreported span (most of them, at 1 %) ends here: nothing waits for its end.
        if !sampled || side.exporters.is_empty() {
            return None;
        }
        let text = |n: &HeaderName| {
            req.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let request = {
            let authority = crate::http::authority_of(req).unwrap_or("").to_string();
            SpanRequest {
                method: req.method().as_str().to_string(),
                url: format!(
                    "http://{authority}{}",
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                ),
                protocol: format!("{:?}", req.version()),
                request_id: text(&X_REQUEST_ID),
                user_agent: text(&http::header::USER_AGENT),
                authority,
                custom: side
                    .custom
                    .iter()
                    .map(|(name, tag)| {
                        let value = match tag {
                            CustomTag::Literal(v) => v.clone(),
                            CustomTag::Header(h, default) => req
                                .headers()
                                .get(h)
                                .and_then(|v| v.to_str().ok())
                                .map_or_else(|| default.clone(), str::to_string),
                        };
                        (Arc::clone(name), value)
                    })
                    .collect(),
            }
        };
        Some(Box::new(Started {
            trace_id,
            span_id,
            parent: incoming.span_id,
            start: SystemTime::now(),
            exporters: side.exporters.clone(),
            request,
            max_tag: side.max_tag,
        }))
    }
}

/// Writes the context for the next hop: W3C always; B3 when the request came with B3
/// (its headers, and the single `b3` header if that is what came).
fn inject(
    h: &mut HeaderMap,
    trace: [u8; 16],
    span: [u8; 8],
    parent: Option<[u8; 8]>,
    sampled: bool,
) {
    // `00-<trace>-<span>-0<flag>`, written in place (every traced request has one).
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    hex_into(&trace, &mut tp[3..35]);
    tp[35] = b'-';
    hex_into(&span, &mut tp[36..52]);
    tp[52..55].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    if let Ok(v) = HeaderValue::from_bytes(&tp) {
        h.insert(TRACEPARENT, v);
    }
    // B3 only when it came in (the single header, or the multi ones).
    let single = h.contains_key(&B3);
    if !single && !h.contains_key(&B3_TRACE) && !h.contains_key(&B3_SAMPLED) {
        return;
    }
    let (t, s) = (to_hex(&trace), to_hex(&span));
    let flag = if sampled { "1" } else { "0" };
    let value = |v: String| HeaderValue::from_str(&v).ok();
    if single {
        let mut b3 = format!("{t}-{s}-{flag}");
        if let Some(p) = parent {
            b3.push('-');
            b3.push_str(&to_hex(&p));
        }
        if let Some(v) = value(b3) {
            h.insert(B3, v);
        }
    }
    for (name, v) in [(B3_TRACE, t), (B3_SPAN, s)] {
        if let Some(v) = value(v) {
            h.insert(name, v);
        }
    }
    match parent.and_then(|p| value(to_hex(&p))) {
        Some(v) => {
            h.insert(B3_PARENT, v);
        }
        None => {
            h.remove(B3_PARENT);
        }
    }
    h.insert(
        B3_SAMPLED,
        HeaderValue::from_static(if sampled { "1" } else { "0" }),
    );
}

/// What a reported span says of its request, taken as the request arrives.
#[derive(Debug)]
struct SpanRequest {
    method: String,
    url: String,
    protocol: String,
    authority: String,
    request_id: String,
    user_agent: String,
    custom: Vec<(Arc<str>, String)>,
}

/// A span begun, waiting for the response to end.
#[derive(Debug)]
pub struct Started {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    start: SystemTime,
    exporters: Vec<Arc<Exporter>>,
    request: SpanRequest,
    max_tag: usize,
}

/// What the end of a request adds to its span.
#[derive(Debug)]
pub struct Outcome<'a> {
    pub inbound: bool,
    pub code: u16,
    pub flags: &'a str,
    pub upstream_cluster: &'a str,
    /// The other end: the caller (server side), or the endpoint that answered.
    pub peer: Option<std::net::SocketAddr>,
    pub request_size: u64,
    pub response_size: u64,
    pub own: &'a crate::metrics::WorkloadMeta,
}

/// A span attribute's name: one of the proxy's own, or a `customTags` name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrKey {
    Fixed(&'static str),
    Custom(Arc<str>),
}

impl std::ops::Deref for AttrKey {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            AttrKey::Fixed(s) => s,
            AttrKey::Custom(s) => s,
        }
    }
}

/// FNV-1a, 64 bits: a request id's sampling roll.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A span, finished.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    /// CLIENT (outbound) or SERVER (inbound).
    pub server: bool,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(AttrKey, String)>,
    pub error: bool,
    /// The reporting workload's `service.name` (`canonical-service.namespace`).
    pub service: String,
}

impl Started {
    /// Hands the finished span to the exporters (when sampled).
    pub fn finish(self, o: &Outcome<'_>) {
        let r = self.request;
        let mut attributes: Vec<(AttrKey, String)> = [
            ("http.method", r.method),
            ("http.url", r.url),
            ("http.protocol", r.protocol),
            ("http.status_code", o.code.to_string()),
            ("response_flags", o.flags.to_string()),
            ("upstream_cluster", o.upstream_cluster.to_string()),
            (
                "peer.address",
                o.peer.map(|p| p.to_string()).unwrap_or_default(),
            ),
            ("request_size", o.request_size.to_string()),
            ("response_size", o.response_size.to_string()),
            ("component", "proxy".to_string()),
            ("istio.namespace", o.own.namespace.clone()),
            ("istio.canonical_service", o.own.canonical_service.clone()),
            ("istio.canonical_revision", o.own.canonical_revision.clone()),
            ("istio.mesh_id", "cluster.local".to_string()),
            (
                "node_id",
                format!("sidecar~{}.{}", o.own.workload, o.own.namespace),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (AttrKey::Fixed(k), v))
        .collect();
        if !r.request_id.is_empty() {
            attributes.push((AttrKey::Fixed("guid:x-request-id"), r.request_id));
        }
        if !r.user_agent.is_empty() {
            attributes.push((AttrKey::Fixed("user_agent"), r.user_agent));
        }
        for (name, value) in r.custom {
            attributes.push((AttrKey::Custom(name), value));
        }
        for (_, v) in &mut attributes {
            truncate(v, self.max_tag);
        }
        let mut name = format!("{}/*", r.authority);
        truncate(&mut name, self.max_tag);
        let span = Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            name,
            server: o.inbound,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            error: o.code >= 500 || o.code == 0,
            service: format!("{}.{}", o.own.canonical_service, o.own.namespace),
        };
        let weight = span.weight();
        for e in &self.exporters {
            if QUEUED_BYTES.fetch_add(weight, Ordering::Relaxed) + weight > QUEUE_BYTES {
                QUEUED_BYTES.fetch_sub(weight, Ordering::Relaxed);
                DROPPED.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if e.tx.try_send(span.clone()).is_err() {
                QUEUED_BYTES.fetch_sub(weight, Ordering::Relaxed);
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Cuts `s` to at most `max` bytes, on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut i = max;
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        s.truncate(i);
    }
}

impl Span {
    /// About what a span holds in memory.
    fn weight(&self) -> usize {
        128 + self.name.len()
            + self.service.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len() + 16)
                .sum::<usize>()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Zipkin's v2 JSON (`POST /api/v2/spans`).
fn zipkin_json(spans: &[Span]) -> String {
    let mut out = String::from("[");
    for (i, s) in spans.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"traceId\":\"{}\",\"id\":\"{}\",",
            to_hex(&s.trace_id),
            to_hex(&s.span_id)
        );
        if let Some(p) = s.parent {
            let _ = write!(out, "\"parentId\":\"{}\",", to_hex(&p));
        }
        out.push_str("\"name\":");
        json_str(&s.name, &mut out);
        let start = unix_nanos(s.start) / 1000;
        let duration = (unix_nanos(s.end) / 1000).saturating_sub(start).max(1);
        let _ = write!(
            out,
            ",\"kind\":\"{}\",\"timestamp\":{start},\"duration\":{duration},\"localEndpoint\":{{\"serviceName\":",
            if s.server { "SERVER" } else { "CLIENT" }
        );
        json_str(&s.service, &mut out);
        out.push_str("},\"tags\":{");
        for (j, (k, v)) in s.attributes.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            json_str(k, &mut out);
            out.push(':');
            json_str(v, &mut out);
        }
        if s.error {
            if !s.attributes.is_empty() {
                out.push(',');
            }
            out.push_str("\"error\":\"true\"");
        }
        out.push_str("}}");
    }
    out.push(']');
    out
}

/// OTLP's trace messages (opentelemetry/proto/collector/trace/v1 and trace/v1), the fields
/// Trellis sends, with the official field numbers.
pub mod otlp {
    use super::{Span, unix_nanos};

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExportTraceServiceRequest {
        #[prost(message, repeated, tag = "1")]
        pub resource_spans: Vec<ResourceSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResourceSpans {
        #[prost(message, optional, tag = "1")]
        pub resource: Option<Resource>,
        #[prost(message, repeated, tag = "2")]
        pub scope_spans: Vec<ScopeSpans>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(message, repeated, tag = "1")]
        pub attributes: Vec<KeyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ScopeSpans {
        #[prost(message, optional, tag = "1")]
        pub scope: Option<InstrumentationScope>,
        #[prost(message, repeated, tag = "2")]
        pub spans: Vec<OtlpSpan>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InstrumentationScope {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OtlpSpan {
        #[prost(bytes = "vec", tag = "1")]
        pub trace_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub span_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub parent_span_id: Vec<u8>,
        #[prost(string, tag = "5")]
        pub name: String,
        /// 2: SERVER, 3: CLIENT.
        #[prost(int32, tag = "6")]
        pub kind: i32,
        #[prost(fixed64, tag = "7")]
        pub start_time_unix_nano: u64,
        #[prost(fixed64, tag = "8")]
        pub end_time_unix_nano: u64,
        #[prost(message, repeated, tag = "9")]
        pub attributes: Vec<KeyValue>,
        #[prost(message, optional, tag = "15")]
        pub status: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(string, tag = "2")]
        pub message: String,
        /// 1: OK, 2: ERROR.
        #[prost(int32, tag = "3")]
        pub code: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyValue {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<AnyValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AnyValue {
        #[prost(string, optional, tag = "1")]
        pub string_value: Option<String>,
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                string_value: Some(value.to_string()),
            }),
        }
    }

    /// A batch as one request, one resource per reporting service.
    pub fn encode(spans: &[Span]) -> Vec<u8> {
        use prost::Message as _;
        let mut by_service: Vec<ResourceSpans> = Vec::new();
        for s in spans {
            let otlp = OtlpSpan {
                trace_id: s.trace_id.to_vec(),
                span_id: s.span_id.to_vec(),
                parent_span_id: s.parent.map(|p| p.to_vec()).unwrap_or_default(),
                name: s.name.clone(),
                kind: if s.server { 2 } else { 3 },
                start_time_unix_nano: unix_nanos(s.start),
                end_time_unix_nano: unix_nanos(s.end),
                attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
                status: s.error.then(|| Status {
                    message: String::new(),
                    code: 2,
                }),
            };
            let service = kv("service.name", &s.service);
            match by_service.iter_mut().find(|r| {
                r.resource
                    .as_ref()
                    .is_some_and(|res| res.attributes.first() == Some(&service))
            }) {
                Some(r) => r.scope_spans[0].spans.push(otlp),
                None => by_service.push(ResourceSpans {
                    resource: Some(Resource {
                        attributes: vec![service],
                    }),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "trellis-proxy".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                        }),
                        spans: vec![otlp],
                    }],
                }),
            }
        }
        ExportTraceServiceRequest {
            resource_spans: by_service,
        }
        .encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn contexts_come_from_w3c_then_b3() {
        let w3c = extract(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(
            w3c.trace_id.map(|t| to_hex(&t)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            w3c.span_id.map(|t| to_hex(&t)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(w3c.sampled, Some(true));
        let single = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0",
        )]));
        assert_eq!(single.sampled, Some(false));
        assert!(single.trace_id.is_some() && single.span_id.is_some());
        let deny = extract(&headers(&[("b3", "0")]));
        assert_eq!(
            deny,
            Incoming {
                sampled: Some(false),
                ..Incoming::default()
            }
        );
        // A 64-bit B3 trace id is padded to 128 bits.
        let multi = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            multi.trace_id.map(|t| to_hex(&t)).as_deref(),
            Some("0000000000000000463ac35c9f6413ad")
        );
        assert_eq!(multi.sampled, Some(true));
        // Malformed values are no context at all.
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz",
            "00-4bf9-00f0-01",
        ] {
            let h = headers(&[("traceparent", bad)]);
            assert_eq!(extract(&h), Incoming::default(), "{bad}");
        }
    }

    #[test]
    fn the_next_hop_gets_both_formats_with_this_span_as_parent() {
        let mut h = headers(&[("b3", "1")]);
        inject(&mut h, [1; 16], [2; 8], Some([3; 8]), true);
        assert_eq!(
            h["traceparent"],
            "00-01010101010101010101010101010101-0202020202020202-01"
        );
        assert_eq!(h["x-b3-traceid"], "01010101010101010101010101010101");
        assert_eq!(h["x-b3-spanid"], "0202020202020202");
        assert_eq!(h["x-b3-parentspanid"], "0303030303030303");
        assert_eq!(h["x-b3-sampled"], "1");
        assert_eq!(
            h["b3"],
            "01010101010101010101010101010101-0202020202020202-1-0303030303030303"
        );
        // And what is written reads back as the same context.
        let back = extract(&h);
        assert_eq!(
            (back.trace_id, back.span_id, back.sampled),
            (Some([1; 16]), Some([2; 8]), Some(true))
        );
    }

    #[test]
    fn otlp_uses_the_official_field_numbers() {
        use prost::Message as _;
        let span = OtlpSpanProbe::probe();
        // Span.name is field 5 (length-delimited: tag byte 0x2a), kind field 6 (0x30),
        // start field 7 (fixed64: 0x39), trace_id field 1 (0x0a).
        let bytes = span.encode_to_vec();
        assert_eq!(bytes[0], 0x0a);
        assert!(bytes.windows(2).any(|w| w == [0x2a, 0x01]), "name");
        assert!(bytes.windows(2).any(|w| w == [0x30, 0x03]), "kind CLIENT");
        assert!(bytes.contains(&0x39), "start time");
    }

    struct OtlpSpanProbe;
    impl OtlpSpanProbe {
        fn probe() -> otlp::OtlpSpan {
            otlp::OtlpSpan {
                trace_id: vec![1; 16],
                span_id: vec![2; 8],
                parent_span_id: Vec::new(),
                name: "n".into(),
                kind: 3,
                start_time_unix_nano: 1,
                end_time_unix_nano: 2,
                attributes: Vec::new(),
                status: None,
            }
        }
    }

    #[test]
    fn zipkin_json_is_json_with_parent_links() {
        let s = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            name: "reviews:9080/*".into(),
            server: true,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + Duration::from_secs(2),
            attributes: vec![(AttrKey::Fixed("http.status_code"), "200".into())],
            error: false,
            service: "reviews.shop".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&zipkin_json(&[s])).expect("JSON");
        assert_eq!(v[0]["parentId"], "0303030303030303");
        assert_eq!(v[0]["kind"], "SERVER");
        assert_eq!(v[0]["duration"], 1_000_000);
        assert_eq!(v[0]["tags"]["http.status_code"], "200");
        assert_eq!(v[0]["localEndpoint"]["serviceName"], "reviews.shop");
    }
}
