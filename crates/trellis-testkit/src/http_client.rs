//! Small HTTP clients on hyper: HTTP/1.1, and HTTP/2 with prior knowledge (h2c).
//!
//! The free functions open one connection per call; [`HttpClient`] keeps one connection for
//! several requests (keep-alive on HTTP/1.1, multiplexing on h2).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version, header, request};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::Result;

/// The request body type the clients send: any body of `Bytes` that cannot fail, boxed.
pub type ClientBody = UnsyncBoxBody<Bytes, Infallible>;

/// A response, read to its end.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: StatusCode,
    /// The HTTP version the response came back with.
    pub version: Version,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if the response had any.
    pub trailers: Option<HeaderMap>,
}

impl HttpResponse {
    /// The first value of header `name` as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug)]
enum Sender {
    Http1(http1::SendRequest<ClientBody>),
    H2c(http2::SendRequest<ClientBody>),
}

/// One client connection, HTTP/1.1 or h2c.
#[derive(Debug)]
pub struct HttpClient {
    sender: Sender,
}

async fn connect(addr: SocketAddr) -> Result<TokioIo<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

impl HttpClient {
    /// Opens an HTTP/1.1 connection to `addr`.
    pub async fn http1(addr: SocketAddr) -> Result<Self> {
        let (sender, conn) = http1::handshake(connect(addr).await?).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::Http1(sender),
        })
    }

    /// Opens an HTTP/2 connection to `addr` with prior knowledge (no upgrade, no TLS).
    pub async fn h2c(addr: SocketAddr) -> Result<Self> {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), connect(addr).await?).await?;
        tokio::spawn(conn);
        Ok(Self {
            sender: Sender::H2c(sender),
        })
    }

    /// A request builder for `method` to `host` + `path` shaped for this connection: on
    /// HTTP/1.1 an origin-form URI and a `Host` header, on h2 an absolute URI (`:authority`).
    pub fn request(&self, method: Method, host: &str, path: &str) -> request::Builder {
        match self.sender {
            Sender::Http1(_) => Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, host),
            Sender::H2c(_) => Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(format!("http://{host}{path}")),
        }
    }

    /// Sends `req` and reads the whole response, trailers included.
    pub async fn send<B>(&mut self, req: Request<B>) -> Result<HttpResponse>
    where
        B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + 'static,
    {
        let req = req.map(|b| b.boxed_unsync());
        let resp = match &mut self.sender {
            Sender::Http1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2c(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(HttpResponse {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// `GET path` with `host` as Host / `:authority`.
    pub async fn get(&mut self, host: &str, path: &str) -> Result<HttpResponse> {
        let req = self
            .request(Method::GET, host, path)
            .body(Empty::<Bytes>::new())?;
        self.send(req).await
    }

    /// `POST path` with `body` (sent with a content-length).
    pub async fn post(
        &mut self,
        host: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<HttpResponse> {
        let req = self
            .request(Method::POST, host, path)
            .body(Full::new(body.into()))?;
        self.send(req).await
    }
}

/// `GET` over a fresh HTTP/1.1 connection to `addr`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<HttpResponse> {
    HttpClient::http1(addr).await?.get(host, path).await
}

/// `POST` over a fresh HTTP/1.1 connection to `addr`.
pub async fn post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Result<HttpResponse> {
    HttpClient::http1(addr).await?.post(host, path, body).await
}

/// `GET` over a fresh h2c (prior knowledge) connection to `addr`.
pub async fn h2c_get(addr: SocketAddr, host: &str, path: &str) -> Result<HttpResponse> {
    HttpClient::h2c(addr).await?.get(host, path).await
}

/// `POST` over a fresh h2c (prior knowledge) connection to `addr`.
pub async fn h2c_post(
    addr: SocketAddr,
    host: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> Result<HttpResponse> {
    HttpClient::h2c(addr).await?.post(host, path, body).await
}
