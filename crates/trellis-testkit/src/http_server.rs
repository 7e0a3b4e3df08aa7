//! An HTTP upstream: HTTP/1.1 and h2c (prior knowledge) on one port, or HTTP/1.1 only.
//!
//! Routes:
//!
//! | path | response |
//! | --- | --- |
//! | `/echo` | 200, the request body; `x-echo-method`, `x-echo-path` (path and query), `x-echo-version` (`HTTP/1.1`, `HTTP/2.0`), `x-echo-authority` (URI authority, else `Host`), and each request header as `x-echo-h-<name>` |
//! | `/status/<code>` | that status with a short body |
//! | `/bytes/<n>` | `n` bytes of `a` (served from a static buffer up to 64 KiB) |
//! | `/slow/<ms>` | 200 after waiting `ms` milliseconds |
//! | `/trailers` | 200, body `ok`, trailer `x-trailer: yes` (sent on h2; HTTP/1.1 drops it unless the client sent `TE: trailers`) |
//! | anything else | 404 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use crate::server::{ServerTask, loopback_any, spawn_server};

/// The response body type of the HTTP fixture.
type RespBody = BoxBody<Bytes, Infallible>;

/// Largest `/bytes/<n>` served from the static buffer without copying.
const STATIC_BYTES: usize = 64 * 1024;
static A_BYTES: [u8; STATIC_BYTES] = [b'a'; STATIC_BYTES];

/// The longest `/slow/<ms>` wait honoured, so a typo cannot park a test for hours.
const MAX_SLOW_MS: u64 = 60_000;

/// Counters of an [`HttpServer`]; read them through the handle.
#[derive(Debug, Default)]
pub struct HttpStats {
    connections: AtomicU64,
    requests: AtomicU64,
    http1: AtomicU64,
    http2: AtomicU64,
}

impl HttpStats {
    /// TCP connections accepted.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Requests served, any version.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Requests that arrived as HTTP/1.x.
    pub fn http1_requests(&self) -> u64 {
        self.http1.load(Ordering::Relaxed)
    }
    /// Requests that arrived as HTTP/2.
    pub fn http2_requests(&self) -> u64 {
        self.http2.load(Ordering::Relaxed)
    }
}

/// A running HTTP fixture. Dropping it stops the server.
#[derive(Debug)]
pub struct HttpServer {
    /// Where the server listens.
    pub addr: SocketAddr,
    stats: Arc<HttpStats>,
    task: ServerTask,
}

impl HttpServer {
    /// Serves HTTP/1.1 and h2c on `127.0.0.1:0`.
    pub async fn start() -> crate::Result<Self> {
        Self::start_on(loopback_any(), false).await
    }

    /// Serves HTTP/1.1 only on `127.0.0.1:0` (an app that cannot speak HTTP/2).
    pub async fn start_http1_only() -> crate::Result<Self> {
        Self::start_on(loopback_any(), true).await
    }

    /// Serves on `addr`; with `http1_only` an h2c preface is rejected as a bad HTTP/1 request.
    pub async fn start_on(addr: SocketAddr, http1_only: bool) -> crate::Result<Self> {
        let stats = Arc::new(HttpStats::default());
        let mut builder = auto::Builder::new(TokioExecutor::new());
        if http1_only {
            builder = builder.http1_only();
        }
        let builder = Arc::new(builder);
        let conn_stats = stats.clone();
        let (addr, task) = spawn_server(addr, move |stream, _peer| {
            conn_stats.connections.fetch_add(1, Ordering::Relaxed);
            let stats = conn_stats.clone();
            let builder = builder.clone();
            async move {
                let service = service_fn(move |req| {
                    let stats = stats.clone();
                    async move { Ok::<_, Infallible>(route(req, &stats).await) }
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
    pub fn stats(&self) -> &HttpStats {
        &self.stats
    }

    /// Stops the server and waits until it and its connections are gone.
    pub async fn shutdown(self) {
        self.task.shutdown().await;
    }
}

fn full(body: impl Into<Bytes>) -> RespBody {
    Full::new(body.into()).boxed()
}

fn simple(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

async fn route(req: Request<Incoming>, stats: &HttpStats) -> Response<RespBody> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    if req.version() == Version::HTTP_2 {
        stats.http2.fetch_add(1, Ordering::Relaxed);
    } else {
        stats.http1.fetch_add(1, Ordering::Relaxed);
    }
    let path = req.uri().path();
    if path == "/echo" {
        return echo(req).await;
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        return match n.parse::<usize>() {
            Ok(n) if n <= STATIC_BYTES => Response::new(full(Bytes::from_static(&A_BYTES[..n]))),
            Ok(n) => Response::new(full(vec![b'a'; n])),
            Err(_) => simple(StatusCode::BAD_REQUEST, "bad byte count\n"),
        };
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => simple(status, format!("status {}\n", status.as_u16())),
            None => simple(StatusCode::BAD_REQUEST, "bad status code\n"),
        };
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        return match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLOW_MS))).await;
                simple(StatusCode::OK, format!("slept {ms}ms\n"))
            }
            Err(_) => simple(StatusCode::BAD_REQUEST, "bad milliseconds\n"),
        };
    }
    if path == "/trailers" {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("yes"));
        let body = Full::new(Bytes::from_static(b"ok"))
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .boxed();
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert(http::header::TRAILER, HeaderValue::from_static("x-trailer"));
        return resp;
    }
    simple(StatusCode::NOT_FOUND, "not found\n")
}

/// The version string `x-echo-version` carries.
fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

async fn echo(req: Request<Incoming>) -> Response<RespBody> {
    let (parts, body) = req.into_parts();
    // Collecting polls the body, which is what makes hyper answer `Expect: 100-continue`.
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return simple(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
    };
    let mut resp = Response::new(full(body));
    let headers = resp.headers_mut();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    for (name, value) in [
        ("x-echo-method", Some(parts.method.as_str().to_owned())),
        ("x-echo-path", Some(path_and_query)),
        (
            "x-echo-version",
            Some(version_str(parts.version).to_owned()),
        ),
        ("x-echo-authority", authority),
    ] {
        if let Some(v) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, v);
        }
    }
    for (name, value) in &parts.headers {
        if let Ok(echo_name) = HeaderName::from_bytes(format!("x-echo-h-{name}").as_bytes()) {
            headers.append(echo_name, value.clone());
        }
    }
    resp
}
