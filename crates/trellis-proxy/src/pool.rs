//! Upstream connections: keep-alive HTTP/1.1 pools to apps, one multiplexed HTTP/2
//! connection per peer proxy.
//!
//! An idle HTTP/1.1 connection is dropped after the cluster's idle timeout (default 3 s,
//! below common app keep-alive timeouts), and a request that was never written to a reused
//! connection (the server closed it meanwhile) is sent again on a fresh connection: the
//! "503 UC" that Envoy sidecars show in that race does not happen here.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::body::ReqBody;
use crate::fasthash::FastMap;
use crate::h1;
use crate::sockets::{self, Dial};

/// Any error, boxed (hyper's, the lean client's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (response flag UF).
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    /// The connection failed during the exchange (response flag UC).
    #[error("upstream {addr}: {source}")]
    Request { addr: SocketAddr, source: BoxError },
    /// No response headers within the per-try timeout (response flag UT).
    #[error("upstream {addr}: no response within the per-try timeout")]
    Timeout { addr: SocketAddr },
}

impl UpstreamError {
    /// Envoy-style response flag.
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "UF",
            UpstreamError::Request { .. } => "UC",
            UpstreamError::Timeout { .. } => "UT",
        }
    }
}

struct Idle {
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
    /// Requests this connection has carried.
    uses: u32,
}

/// An idle HTTP/2 connection is pinged this often; a peer that does not answer within
/// `H2_KEEPALIVE_TIMEOUT` is taken for dead and the connection closed.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The HTTP/2 connections to one upstream (one, unless `maxConcurrentStreams` asks for
/// more): the link's client, which counts its own open streams.
type H2Slot = Arc<tokio::sync::Mutex<Vec<trellis_link::Client>>>;

/// Sends on the first connection with room, without waiting: `None` when none has.
fn send_on(
    conns: &[trellis_link::Client],
    head: trellis_link::Head<'_>,
    end: bool,
    max_streams: Option<u32>,
) -> Option<(trellis_link::ResponseFuture, trellis_link::SendStream)> {
    let max = max_streams.map(|m| m as usize);
    conns.iter().find_map(|c| c.send_head(head, end, max).ok())
}

/// Mutual TLS over `stream` to the peer proxy at `addr`, agreeing on `alpn` (what follows).
pub async fn mesh_connect(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    dial: Dial,
    tls: MeshTls<'_>,
    alpn: &[u8],
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = trellis_identity::tls::mesh_client_config(
        Arc::clone(tls.creds),
        Arc::clone(tls.roots),
        tls.expected.map(str::to_string).into_iter().collect(),
        alpn,
    )
    .map_err(|e| io::Error::other(format!("mTLS: {e}")))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, stream);
    let stream = tokio::time::timeout(dial.timeout, connect)
        .await
        .map_err(|_| io::Error::other(format!("mTLS: no handshake within {:?}", dial.timeout)))?
        .map_err(|e| io::Error::other(format!("mTLS: {e}")))?;
    if stream.get_ref().1.alpn_protocol() != Some(alpn) {
        return Err(io::Error::other(format!(
            "mTLS: the peer did not agree on {}",
            String::from_utf8_lossy(alpn)
        )));
    }
    Ok(stream)
}

/// TLS to an upstream: mesh mutual TLS to a peer proxy, or origination to a service
/// outside the mesh (DestinationRule SIMPLE or MUTUAL).
#[derive(Debug, Clone, Copy)]
pub enum UpTls<'a> {
    Mesh(MeshTls<'a>),
    Origin(&'a crate::config::Origination),
}

impl UpTls<'_> {
    /// Connections of different kinds never share a pool.
    fn kind(tls: Option<&UpTls<'_>>) -> u8 {
        match tls {
            None => 0,
            Some(UpTls::Mesh(_)) => 1,
            Some(UpTls::Origin(_)) => 2,
        }
    }
}

/// TLS over `stream` to `addr`: mesh mTLS agreeing on `mesh_alpn`, or origination.
pub async fn tls_connect(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
    dial: Dial,
    tls: UpTls<'_>,
    mesh_alpn: &[u8],
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    match tls {
        UpTls::Mesh(m) => mesh_connect(stream, addr, dial, m, mesh_alpn).await,
        UpTls::Origin(o) => {
            let connect = tokio_rustls::TlsConnector::from(Arc::clone(&o.config))
                .connect(o.sni.clone(), stream);
            tokio::time::timeout(dial.timeout, connect)
                .await
                .map_err(|_| {
                    io::Error::other(format!("TLS: no handshake within {:?}", dial.timeout))
                })?
                .map_err(|e| io::Error::other(format!("TLS to {:?}: {e}", o.sni)))
        }
    }
}

/// All upstream connections of a proxy. Lives across snapshot swaps.
#[derive(Default)]
pub struct Pools {
    /// Connections of the lean client (requests whose body the proxy holds in full).
    fast: Mutex<FastMap<SocketAddr, Vec<h1::Conn>>>,
    /// hyper's HTTP/1.1 connections (streaming request bodies; anything to a peer proxy
    /// over mutual TLS), by address and whether over mTLS.
    h1: Mutex<FastMap<(SocketAddr, u8), Vec<Idle>>>,
    /// By address, and whether over mutual TLS (a peer's connections made before this
    /// proxy had its certificate are not mixed with those made after).
    h2: Mutex<FastMap<(SocketAddr, u8), H2Slot>>,
}

/// Mutual TLS to a peer proxy, borrowed from the request's snapshot and the proxy's
/// credentials: nothing is cloned unless a connection is opened.
#[derive(Debug, Clone, Copy)]
pub struct MeshTls<'a> {
    pub creds: &'a Arc<trellis_identity::tls::Credentials>,
    pub roots: &'a Arc<rustls::RootCertStore>,
    /// The peer's SPIFFE id, when the snapshot says it (any id the roots vouch for, else).
    pub expected: Option<&'a str>,
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h1 = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let fast = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        let idle: usize =
            h1.values().map(Vec::len).sum::<usize>() + fast.values().map(Vec::len).sum::<usize>();
        write!(f, "Pools {{ idle_http1: {idle} }}")
    }
}

impl Pools {
    pub fn new() -> Arc<Pools> {
        Arc::new(Pools::default())
    }

    fn take_idle(
        &self,
        key: (SocketAddr, u8),
        idle_timeout: Duration,
    ) -> Option<(http1::SendRequest<ReqBody>, u32)> {
        let mut map = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.get_mut(&key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < idle_timeout && !idle.sender.is_closed() {
                return Some((idle.sender, idle.uses));
            }
        }
        None
    }

    /// Pools a connection that finished a request, unless it is closed or has carried
    /// `max_uses` requests (DestinationRule `maxRequestsPerConnection`).
    fn give_back(
        &self,
        key: (SocketAddr, u8),
        sender: http1::SendRequest<ReqBody>,
        uses: u32,
        max_uses: Option<u32>,
    ) {
        if sender.is_closed() || max_uses.is_some_and(|m| uses >= m) {
            return;
        }
        let mut map = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                sender,
                since: Instant::now(),
                uses,
            });
        }
    }

    /// An idle connection of the lean client, still open and not past the idle timeout.
    fn take_fast(&self, addr: SocketAddr) -> Option<h1::Conn> {
        let mut map = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.get_mut(&addr)?;
        while let Some(conn) = list.pop() {
            if conn.since.elapsed() < conn.idle_timeout && conn.is_reusable() {
                return Some(conn);
            }
        }
        None
    }

    /// Sends a request whose body is in hand over a pooled connection to `addr`, with the
    /// lean client. A request that a dead pooled connection could not have served (the
    /// write failed, or nothing came back and the method is idempotent) goes again: on
    /// another pooled connection once, then on a fresh one.
    pub async fn send_fast(
        self: &Arc<Self>,
        addr: SocketAddr,
        dial: Dial,
        idle_timeout: Duration,
        max_uses: Option<u32>,
        req: h1::Encoded,
    ) -> Result<Response<h1::H1Body>, UpstreamError> {
        let mut pooled_tries = 0;
        loop {
            let idle = if pooled_tries < 2 {
                pooled_tries += 1;
                self.take_fast(addr)
            } else {
                None
            };
            let reused = idle.is_some();
            let mut conn = match idle {
                Some(c) => c,
                None => h1::Conn::new(
                    Box::pin(sockets::connect_with(addr, dial))
                        .await
                        .map_err(|source| UpstreamError::Connect { addr, source })?,
                ),
            };
            conn.max_uses = max_uses;
            conn.idle_timeout = idle_timeout;
            let recycle: Arc<dyn h1::Recycle> = Arc::clone(self) as Arc<dyn h1::Recycle>;
            match h1::exchange(conn, &req, addr, recycle).await {
                Ok(resp) => return Ok(resp),
                Err((e, again)) if reused && again => {
                    tracing::debug!("pooled connection to {addr} was closed ({e}); sending again");
                }
                Err((e, _)) => {
                    return Err(UpstreamError::Request {
                        addr,
                        source: e.into(),
                    });
                }
            }
        }
    }

    /// Opens a new HTTP/1.1 connection (with upgrades enabled), over mutual TLS to a peer
    /// proxy when `tls` says so.
    pub async fn connect_h1(
        addr: SocketAddr,
        dial: Dial,
        tls: Option<UpTls<'_>>,
    ) -> Result<http1::SendRequest<ReqBody>, UpstreamError> {
        let stream = sockets::connect_with(addr, dial)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        match tls {
            None => Self::handshake_h1(addr, stream).await,
            Some(t) => {
                let alpn = trellis_identity::tls::ALPN_MESH_HTTP1;
                let stream = tls_connect(stream, addr, dial, t, alpn)
                    .await
                    .map_err(|source| UpstreamError::Connect { addr, source })?;
                Self::handshake_h1(addr, stream).await
            }
        }
    }

    async fn handshake_h1<T>(
        addr: SocketAddr,
        io: T,
    ) -> Result<http1::SendRequest<ReqBody>, UpstreamError>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Request {
                addr,
                source: source.into(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection {addr}: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends an HTTP/1.1 request over a pooled connection to `addr`.
    ///
    /// Connecting is boxed: it is the rare path, and a request's future is copied each
    /// time it moves (into hyper's dispatcher, into a spawned HTTP/2 stream task), so
    /// keeping the connect state out of it keeps every request cheaper.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_h1(
        self: &Arc<Self>,
        addr: SocketAddr,
        dial: Dial,
        idle_timeout: Duration,
        max_uses: Option<u32>,
        tls: Option<UpTls<'_>>,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let key = (addr, UpTls::kind(tls.as_ref()));
        // A request that was never written goes again: on another pooled connection once,
        // then on a fresh one, which ends the loop whatever happens.
        let mut pooled_tries = 0;
        loop {
            let idle = if pooled_tries < 2 {
                pooled_tries += 1;
                self.take_idle(key, idle_timeout)
            } else {
                None
            };
            let (mut sender, reused, uses) = match idle {
                Some((s, uses)) => (s, true, uses),
                None => (Box::pin(Self::connect_h1(addr, dial, tls)).await?, false, 0),
            };
            if let Err(source) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(UpstreamError::Request {
                    addr,
                    source: source.into(),
                });
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let ret = Return {
                        pools: Arc::clone(self),
                        key,
                        sender,
                        uses: uses + 1,
                        max_uses,
                    };
                    let body = PooledBody::new(body, ret);
                    return Ok(Response::from_parts(parts, body));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        tracing::debug!(
                            "pooled connection to {addr} was closed; resending on a new one"
                        );
                        req = unsent;
                    }
                    _ => {
                        return Err(UpstreamError::Request {
                            addr,
                            source: e.into_error().into(),
                        });
                    }
                },
            }
        }
    }

    /// Opens an HTTP/2 connection (the link's client: the request's own task sends on it
    /// and awaits the response, with no channel or task per request in between), over
    /// mutual TLS when `tls` says so. The connection is driven by a task of its own, which
    /// also pings it while idle.
    async fn connect_h2(
        addr: SocketAddr,
        dial: Dial,
        tls: Option<UpTls<'_>>,
    ) -> Result<trellis_link::Client, UpstreamError> {
        let stream = sockets::connect_with(addr, dial)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        let config = trellis_link::Config {
            keepalive_interval: H2_KEEPALIVE_INTERVAL,
            keepalive_timeout: H2_KEEPALIVE_TIMEOUT,
            ..trellis_link::Config::default()
        };
        let Some(tls) = tls else {
            return Ok(trellis_link::handshake(stream, config));
        };
        let stream = tls_connect(stream, addr, dial, tls, trellis_identity::tls::ALPN_MESH_H2)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        Ok(trellis_link::handshake(stream, config))
    }

    /// Sends a request's head on an HTTP/2 connection to `addr` with room for one more
    /// stream (all streams share one connection unless `max_streams`, a DestinationRule's
    /// `maxConcurrentStreams`, or the peer's own limit says otherwise), opened when there
    /// is none. The common case (a live connection with room, nobody opening one) takes
    /// no await. A connection that is gone is pruned here, and so is one opened for a
    /// burst once it is idle again.
    async fn open_stream(
        &self,
        addr: SocketAddr,
        dial: Dial,
        max_streams: Option<u32>,
        tls: Option<UpTls<'_>>,
        head: trellis_link::Head<'_>,
        end: bool,
    ) -> Result<(trellis_link::ResponseFuture, trellis_link::SendStream), UpstreamError> {
        let slot = {
            let mut map = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry((addr, UpTls::kind(tls.as_ref()))).or_default())
        };
        if let Ok(conns) = slot.try_lock() {
            if let Some(sent) = send_on(&conns, head, end, max_streams) {
                return Ok(sent);
            }
        }
        Box::pin(async move {
            let mut conns = slot.lock().await;
            conns.retain(|c| !c.is_closed());
            let mut first = true;
            conns.retain(|c| {
                let keep = first || c.streams() > 0;
                first = false;
                keep
            });
            if let Some(sent) = send_on(&conns, head, end, max_streams) {
                return Ok(sent);
            }
            let client = Self::connect_h2(addr, dial, tls).await?;
            let sent = client
                .send_head(head, end, max_streams.map(|m| m as usize))
                .map_err(|source| UpstreamError::Request {
                    addr,
                    source: source.into(),
                })?;
            conns.push(client);
            Ok(sent)
        })
        .await
    }

    /// Sends a request over a multiplexed HTTP/2 connection to `addr`.
    pub async fn send_h2(
        &self,
        addr: SocketAddr,
        dial: Dial,
        max_streams: Option<u32>,
        tls: Option<UpTls<'_>>,
        head: &http::request::Parts,
        body: ReqBody,
    ) -> Result<Response<trellis_link::RecvStream>, UpstreamError> {
        let end = match &body {
            ReqBody::Buffered(b) => b.as_ref().is_none_or(Bytes::is_empty),
            ReqBody::Streaming(b) => b.is_end_stream(),
        };
        let (response, mut tx) = self
            .open_stream(addr, dial, max_streams, tls, head.into(), end)
            .await?;
        if !end {
            match body {
                ReqBody::Buffered(Some(bytes)) => {
                    // Sent as flow control allows; a failure shows on the response.
                    let _ = tx.send_data(bytes, true);
                }
                body => {
                    tokio::spawn(pipe_link(body, tx));
                }
            }
        }
        let resp = response.await.map_err(|source| UpstreamError::Request {
            addr,
            source: source.into(),
        })?;
        Ok(resp)
    }

    /// Idle HTTP/1.1 connections and HTTP/2 peers, per endpoint (for `/clusters`).
    pub fn snapshot(&self) -> (HashMap<SocketAddr, usize>, Vec<SocketAddr>) {
        let h1 = self.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let mut idle: HashMap<SocketAddr, usize> = HashMap::new();
        for ((a, _), v) in h1.iter() {
            *idle.entry(*a).or_default() += v.len();
        }
        let fast = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        for (a, v) in fast.iter() {
            *idle.entry(*a).or_default() += v.len();
        }
        let h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let mut peers: Vec<SocketAddr> = h2.keys().map(|(a, _)| *a).collect();
        peers.sort();
        peers.dedup();
        (idle, peers)
    }
}

impl h1::Recycle for Pools {
    fn recycle(&self, addr: SocketAddr, conn: h1::Conn) {
        if conn.max_uses.is_some_and(|m| conn.uses >= m) {
            return;
        }
        let mut map = self.fast.lock().unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(addr).or_default();
        // Connections are taken newest first: under steady traffic the oldest would never
        // be looked at again, so each return drops it once it has idled out.
        if list
            .first()
            .is_some_and(|c| c.since.elapsed() >= c.idle_timeout)
        {
            list.remove(0);
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(conn);
        }
    }
}

struct Return {
    pools: Arc<Pools>,
    key: (SocketAddr, u8),
    sender: http1::SendRequest<ReqBody>,
    /// Requests the connection has carried, this one included.
    uses: u32,
    max_uses: Option<u32>,
}

impl Return {
    fn give_back(self) {
        self.pools
            .give_back(self.key, self.sender, self.uses, self.max_uses);
    }
}

/// A response body from a pooled HTTP/1.1 connection: when it has been read to the end,
/// the connection goes back to the pool; a body dropped half-read takes its connection
/// with it.
pub struct PooledBody {
    inner: Incoming,
    ret: Option<Return>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").finish_non_exhaustive()
    }
}

impl PooledBody {
    fn new(inner: Incoming, ret: Return) -> PooledBody {
        if inner.is_end_stream() {
            ret.give_back();
            PooledBody { inner, ret: None }
        } else {
            PooledBody {
                inner,
                ret: Some(ret),
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(ret) = this.ret.take() {
                    ret.give_back();
                }
            }
            Poll::Ready(Some(Err(_))) => this.ret = None,
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                if let Some(ret) = this.ret.take() {
                    ret.give_back();
                }
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streaming body (a request to an upstream, a response to a client), sent on an
/// HTTP/2 stream as the peer's flow control allows. Stops when the peer resets the
/// stream; resets it when the body fails.
pub async fn pipe_link<B>(mut body: B, mut tx: trellis_link::SendStream)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        let frame = std::future::poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            match tx.poll_ready(cx) {
                Poll::Ready(Ok(())) => Pin::new(&mut body).poll_frame(cx).map(Some),
                Poll::Ready(Err(_)) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let frame = match frame {
            None => return, // reset, or the connection failed: nobody wants the rest
            Some(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(e))) => {
                tracing::debug!("body sent on HTTP/2 failed: {e}");
                tx.send_reset(trellis_link::Reason::CANCEL);
                return;
            }
            Some(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                let last = body.is_end_stream();
                if tx.send_data(data, last).is_err() || last {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}
