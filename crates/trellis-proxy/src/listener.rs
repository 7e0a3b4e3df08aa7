//! Accepting connections and deciding what each one is: which way it goes, which protocol
//! it carries, and where it should end up.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::PortProtocol;
use crate::http::{self, Route};
use crate::proxy::Shared;
use crate::sniff::{self, Detected};
use crate::stats::Stats;
use crate::tcp;
use trellis_xds::snapshot::{OutboundPolicy, PeerMtls};

/// What a listener receives.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// Intercepted outbound connections; the original destination says where to.
    OutboundCapture,
    /// An explicit outbound listener for one service port.
    OutboundNamed(Arc<str>, u16),
    /// Intercepted inbound connections; the original destination port is the app port.
    InboundCapture,
    /// An explicit inbound listener for one workload port.
    InboundPort(u16),
    /// A gateway port (gateway mode): the snapshot's servers on that port.
    Gateway(u16),
}

impl ListenerKind {
    pub fn is_inbound(&self) -> bool {
        matches!(
            self,
            ListenerKind::InboundCapture | ListenerKind::InboundPort(_) | ListenerKind::Gateway(_)
        )
    }
}

/// Accepts until `stop` turns true.
pub async fn accept_loop(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // An IPv4 client of a dual-stack (`[::]`) listener is known by its
                    // IPv4 address (`::ffff:10.0.0.7` is 10.0.0.7): for policies' ipBlocks,
                    // the caller's workload in metrics, and logs.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    let shared = Arc::clone(&shared);
                    let kind = kind.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move { connection(stream, peer, kind, shared, stop).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => {
                tracing::info!("listener {:?} closed", listener.local_addr().ok());
                return;
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let _guard = if kind.is_inbound() {
        shared.inbound_conns.enter()
    } else {
        shared.outbound_conns.enter()
    };
    Stats::inc(&shared.stats.downstream_cx_total);
    shared
        .stats
        .downstream_cx_active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _ = stream.set_nodelay(true);
    dispatch(stream, peer, kind, &shared, stop).await;
    shared
        .stats
        .downstream_cx_active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

async fn dispatch(
    stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    shared.wait_configured().await;
    let cfg = shared.config.load_full();
    let (route, declared) = match &kind {
        ListenerKind::OutboundCapture => {
            let dst = match shared.original_dst.original_dst(&stream) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("outbound connection from {peer}: no original destination: {e}");
                    return;
                }
            };
            if shared.is_own_addr(dst) {
                tracing::warn!(
                    "connection from {peer} addressed to the proxy itself ({dst}); closing to avoid a loop"
                );
                return;
            }
            match cfg.outbound_target(dst) {
                Some(t) => (Route::Outbound(dst), t.protocol),
                None => {
                    match cfg.outbound_policy {
                        OutboundPolicy::AllowAny => {
                            Stats::inc(&shared.stats.passthrough_total);
                            tracing::debug!("{peer} -> {dst}: PassthroughCluster");
                            tcp::forward(
                                stream,
                                dst,
                                crate::config::DEFAULT_CONNECT_TIMEOUT,
                                shared,
                                None,
                            )
                            .await;
                        }
                        OutboundPolicy::RegistryOnly => {
                            Stats::inc(&shared.stats.blackhole_total);
                            tracing::info!(
                                cluster = "BlackHoleCluster",
                                "{peer} -> {dst}: destination is not in the registry and outbound policy is REGISTRY_ONLY; connection refused"
                            );
                        }
                    }
                    return;
                }
            }
        }
        ListenerKind::OutboundNamed(host, port) => match cfg.target_by_name(host, *port) {
            Some(t) => (Route::Named(Arc::clone(host), *port), t.protocol),
            None => {
                tracing::warn!(
                    "{peer}: no service {host}:{port} in the current configuration; closing"
                );
                return;
            }
        },
        ListenerKind::InboundCapture => {
            let dst = match shared.original_dst.original_dst(&stream) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("inbound connection from {peer}: no original destination: {e}");
                    return;
                }
            };
            if shared.is_own_addr(dst) {
                tracing::warn!(
                    "inbound connection from {peer} addressed to the proxy itself ({dst}); closing"
                );
                return;
            }
            let p = dst.port();
            (
                Route::Inbound(p, None, Some(dst.ip())),
                cfg.inbound_port(p).protocol,
            )
        }
        ListenerKind::InboundPort(p) => {
            let dst = stream.local_addr().ok().map(|a| a.ip());
            (Route::Inbound(*p, None, dst), cfg.inbound_port(*p).protocol)
        }
        ListenerKind::Gateway(port) => {
            let Some(gp) = cfg.gateway_ports.get(port).cloned() else {
                tracing::warn!(
                    "{peer}: no gateway server on port {port} in the current configuration; closing"
                );
                return;
            };
            if gp.is_tcp() {
                tcp::gateway_tcp(stream, peer, &gp, shared, &cfg).await;
                return;
            }
            if gp.is_tls() {
                let passthrough = gp
                    .servers
                    .iter()
                    .any(|s| matches!(s.kind, crate::config::ServerKind::TlsPassthrough));
                if passthrough {
                    // Clients speak first on TLS: wait for the ClientHello as long as for
                    // a request head.
                    let sni = sniff::peek_sni(&stream, cfg.header_timeout).await;
                    match gp.tls_server(sni.as_deref()) {
                        Some(s) if matches!(s.kind, crate::config::ServerKind::TlsPassthrough) => {
                            tcp::gateway(stream, peer, s, sni.as_deref(), shared, &cfg, *port)
                                .await;
                            return;
                        }
                        Some(_) => {}
                        None => {
                            tracing::info!(
                                flags = "NR",
                                "{peer}: no server on gateway port {port} for SNI {sni:?}; closing"
                            );
                            return;
                        }
                    }
                }
                serve_tls(stream, peer, &gp, shared, &cfg, stop).await;
                return;
            }
            (
                Route::Gateway {
                    port: *port,
                    tls: None,
                },
                PortProtocol::Http,
            )
        }
    };
    let inbound_mtls = match &route {
        Route::Inbound(port, _, dst) => Some((*port, cfg.inbound_mtls(*port), *dst)),
        _ => None,
    };
    if let Some((port, PeerMtls::Strict, dst)) = inbound_mtls {
        // PeerAuthentication STRICT: mesh mutual TLS only, whatever the port carries.
        let hello = sniff::peek_client_hello(&stream, cfg.header_timeout).await;
        if hello.as_ref().is_some_and(is_mesh_hello) {
            serve_mesh_tls(stream, peer, (port, dst), shared, &cfg, stop).await;
        } else {
            Stats::inc(&shared.stats.inbound_plaintext_refused_total);
            tracing::warn!(
                "connection from {peer} to port {port} refused: PeerAuthentication is STRICT and it is not mesh mTLS"
            );
        }
        return;
    }
    if declared == PortProtocol::Tcp {
        if let Some((port, PeerMtls::Permissive, dst)) = inbound_mtls {
            // Mesh mTLS from a peer proxy, or the app's own bytes: the first bytes tell,
            // within the detection timeout (a server-first protocol's silent client then
            // goes on as plain TCP).
            let tls = sniff::detect(&stream, cfg.detection_timeout)
                .await
                .is_ok_and(|d| d.protocol == Detected::Tls);
            if tls
                && sniff::peek_client_hello(&stream, cfg.header_timeout)
                    .await
                    .as_ref()
                    .is_some_and(is_mesh_hello)
            {
                serve_mesh_tls(stream, peer, (port, dst), shared, &cfg, stop).await;
                return;
            }
        }
        tcp::forward_route(stream, peer, &route, shared, &cfg).await;
        return;
    }
    // Detected ports decide between HTTP and TCP here; declared HTTP ports peek too, to
    // pick the HTTP version's server directly.
    let detection = match sniff::detect(&stream, cfg.detection_timeout).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!("{peer}: {e}");
            return;
        }
    };
    if let (Detected::Tls, Some((port, PeerMtls::Permissive, dst))) =
        (detection.protocol, inbound_mtls)
    {
        // Mesh mutual TLS from a peer proxy, told from an app's own TLS by its ALPN (with
        // DISABLE, TLS of any kind goes to the app as it is).
        let hello = sniff::peek_client_hello(&stream, cfg.header_timeout).await;
        if hello.as_ref().is_some_and(is_mesh_hello) {
            serve_mesh_tls(stream, peer, (port, dst), shared, &cfg, stop).await;
            return;
        }
    }
    let is_http = matches!(detection.protocol, Detected::Http1 | Detected::Http2);
    if declared == PortProtocol::Detect && !is_http {
        if detection.timed_out {
            Stats::inc(&shared.stats.detection_timeouts_total);
        }
        tcp::forward_route(stream, peer, &route, shared, &cfg).await;
        return;
    }
    let version = is_http.then_some(detection.protocol);
    serve_http(stream, peer, version, route, shared, &cfg, stop).await;
}

/// A ClientHello offering one of the mesh's ALPN protocols: a peer proxy's.
fn is_mesh_hello(h: &sniff::ClientHello) -> bool {
    h.alpn
        .iter()
        .any(|p| trellis_identity::tls::MESH_ALPNS.contains(&p.as_slice()))
}

/// Terminates mesh mutual TLS on an inbound port: the peer must present a certificate
/// from the mesh's roots, and its SPIFFE id goes with each request. The ALPN it agreed on
/// says what follows.
async fn serve_mesh_tls(
    stream: TcpStream,
    peer: SocketAddr,
    (port, dst): (u16, Option<std::net::IpAddr>),
    shared: &Arc<Shared>,
    cfg: &crate::config::Config,
    stop: watch::Receiver<bool>,
) {
    use trellis_identity::tls::{ALPN_MESH_H2, ALPN_MESH_HTTP1, ALPN_MESH_TCP};
    let config = match shared.mesh_server_config(cfg) {
        Ok(c) => c,
        Err(e) => {
            Stats::inc(&shared.stats.tls_handshake_errors_total);
            tracing::warn!("mTLS from {peer} on port {port} refused: {e}");
            return;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(stream);
    let tls = match tokio::time::timeout(cfg.header_timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            Stats::inc(&shared.stats.tls_handshake_errors_total);
            tracing::warn!("mTLS handshake from {peer} on port {port} failed: {e}");
            return;
        }
        Err(_) => {
            Stats::inc(&shared.stats.tls_handshake_errors_total);
            tracing::warn!("mTLS handshake from {peer} on port {port} timed out");
            return;
        }
    };
    let conn = tls.get_ref().1;
    let peer_id: Option<Arc<str>> = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(trellis_identity::tls::spiffe_id)
        .map(Arc::from);
    Stats::inc(&shared.stats.inbound_mtls_connections_total);
    tracing::debug!("mTLS from {peer} ({peer_id:?}) on port {port}");
    let version = match conn.alpn_protocol() {
        Some(p) if p == ALPN_MESH_H2 => Detected::Http2,
        Some(p) if p == ALPN_MESH_HTTP1 => Detected::Http1,
        Some(p) if p == ALPN_MESH_TCP => {
            let arrival = http::Arrival {
                peer,
                peer_id: peer_id.as_deref(),
                dst_ip: dst,
                port,
                sni: None,
                remote_ip: None,
            };
            tcp::forward_inbound(tls, arrival, shared, cfg).await;
            return;
        }
        other => {
            // (The server offers only the mesh's protocols: not reached.)
            tracing::warn!(
                "mTLS from {peer} on port {port}: no protocol agreed ({:?}); closing",
                other.map(String::from_utf8_lossy)
            );
            return;
        }
    };
    let route = Route::Inbound(port, peer_id, dst);
    serve_http(tls, peer, Some(version), route, shared, cfg, stop).await;
}

/// Terminates TLS for an HTTPS gateway port: the certificate is chosen by SNI among the
/// port's servers, ALPN picks HTTP/2 or HTTP/1.1, and the requests are then served as on
/// any gateway port. A client that does not finish its handshake within the header
/// timeout is dropped.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    gp: &crate::config::GatewayPort,
    shared: &Arc<Shared>,
    cfg: &crate::config::Config,
    stop: watch::Receiver<bool>,
) {
    let port = gp.port;
    let handshake = async {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
                .await?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let Some((config, server)) = gp.https_server(sni.as_deref()).and_then(|s| match &s.kind {
            crate::config::ServerKind::Https(c) => Some((Arc::clone(c), s.key())),
            _ => None,
        }) else {
            return Err(std::io::Error::other("no TLS server on this port"));
        };
        start
            .into_stream(config)
            .await
            .map(|s| (s, http::GatewayTls { server, sni }))
    };
    let (tls, key) = match tokio::time::timeout(cfg.header_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            Stats::inc(&shared.stats.tls_handshake_errors_total);
            tracing::info!("TLS handshake from {peer} on gateway port {port} failed: {e}");
            return;
        }
        Err(_) => {
            Stats::inc(&shared.stats.tls_handshake_errors_total);
            tracing::info!("TLS handshake from {peer} on gateway port {port} timed out");
            return;
        }
    };
    let version = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        Detected::Http2
    } else {
        Detected::Http1
    };
    let route = Route::Gateway {
        port,
        tls: Some(Arc::new(key)),
    };
    serve_http(tls, peer, Some(version), route, shared, cfg, stop).await;
}

/// Runs a connection until it ends, or until `stop` fires and it has finished the
/// request in flight (graceful shutdown: HTTP/1 closes after the response, HTTP/2 sends
/// GOAWAY).
macro_rules! drive {
    ($conn:expr, $stop:expr, $peer:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = $stop.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            // Malformed requests get their 400/431 from hyper before this.
            tracing::info!("HTTP connection from {} ended with an error: {e}", $peer);
        }
    }};
}

/// Serves HTTP on a connection. When the first bytes already told the version, the
/// server for that version runs directly: its header-size limit (431) is enforced exactly,
/// which hyper-util's auto-detecting server cannot be told to do; otherwise the auto
/// server decides.
async fn serve_http<S>(
    stream: S,
    peer: SocketAddr,
    version: Option<Detected>,
    route: Route,
    shared: &Arc<Shared>,
    cfg: &crate::config::Config,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_shared = Arc::clone(shared);
    let route_h2 = route.clone();
    // Boxed once here: the request's future is several KiB, and hyper moves it (into its
    // dispatcher, into a spawned task per HTTP/2 stream); a box moves as a pointer.
    let service = service_fn(move |req| {
        Box::pin(http::handle(
            Arc::clone(&svc_shared),
            route.clone(),
            peer,
            req,
        ))
    });
    let io = TokioIo::new(stream);
    let max_header_list = u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX);
    match version {
        Some(Detected::Http1) => {
            // The lean server takes the common requests; the first one it cannot serve
            // hands the connection (and the bytes read) to hyper's.
            let mut stream = io.into_inner();
            let prefix = match crate::h1_server::serve(
                &mut stream,
                peer,
                &route_h2,
                shared,
                cfg.max_header_bytes,
                cfg.header_timeout,
                &mut stop,
            )
            .await
            {
                crate::h1_server::Outcome::Done => return,
                crate::h1_server::Outcome::HandOff(prefix) => prefix,
            };
            let io = TokioIo::new(crate::h1_server::Rewind::new(prefix, stream));
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(cfg.header_timeout)
                .max_buf_size(cfg.max_header_bytes.max(8192))
                .max_header_size(cfg.max_header_bytes)
                .keep_alive(true);
            drive!(b.serve_connection(io, service).with_upgrades(), stop, peer);
        }
        Some(Detected::Http2) => {
            drop(service);
            serve_h2(
                io.into_inner(),
                peer,
                route_h2,
                shared,
                max_header_list,
                stop,
            )
            .await;
        }
        _ => {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(cfg.header_timeout)
                .max_buf_size(cfg.max_header_bytes.max(8192))
                .keep_alive(true);
            builder
                .http2()
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .max_header_list_size(max_header_list);
            drive!(
                builder.serve_connection_with_upgrades(io, service),
                stop,
                peer
            );
        }
    }
}

/// Serves HTTP/2 on a connection with the link's server: each stream runs in a task of
/// its own (so that a peer's one connection can use every worker), and its response goes
/// back as the client's flow control allows. A client that resets a stream cancels the
/// request upstream. `stop` starts a graceful shutdown (GOAWAY); the streams in flight
/// finish.
async fn serve_h2<S>(
    io: S,
    peer: SocketAddr,
    route: Route,
    shared: &Arc<Shared>,
    max_header_list: u32,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = trellis_link::Config {
        max_header_list: max_header_list as usize,
        ..trellis_link::Config::default()
    };
    let mut conn = trellis_link::serve(io, config);
    let mut stopping = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some((req, tx)) => {
                    let shared = Arc::clone(shared);
                    let route = route.clone();
                    tokio::spawn(serve_h2_stream(shared, route, peer, req, tx));
                }
                None => return,
            },
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
        }
    }
}

async fn serve_h2_stream(
    shared: Arc<Shared>,
    route: Route,
    peer: SocketAddr,
    req: ::http::Request<trellis_link::RecvStream>,
    mut tx: trellis_link::SendStream,
) {
    if req.method() == ::http::Method::CONNECT {
        // A tunnel needs the stream as a byte pipe; the proxy tunnels over HTTP/1.1 only.
        tracing::info!("CONNECT over HTTP/2 from {peer} refused (501); use HTTP/1.1");
        let mut resp = ::http::Response::new(());
        *resp.status_mut() = ::http::StatusCode::NOT_IMPLEMENTED;
        let _ = tx.send_response(resp, true);
        return;
    }
    let (parts, body) = req.into_parts();
    let req = ::http::Request::from_parts(
        parts,
        crate::body::ReqBody::Streaming(crate::body::Streaming::H2(body)),
    );
    // Boxed: this stream's own future stays small, so spawning it moves little.
    let handled = Box::pin(crate::http::handle_request(shared, route, peer, req));
    let resp = {
        let reset = std::future::poll_fn(|cx| tx.poll_reset(cx));
        tokio::select! {
            r = handled => match r {
                Ok(r) => r,
                Err(never) => match never {},
            },
            _ = reset => return, // the client gave up: dropping the request cancels it upstream
        }
    };
    let (parts, body) = resp.into_parts();
    let end = http_body::Body::is_end_stream(&body);
    match tx.send_response(::http::Response::from_parts(parts, ()), end) {
        Ok(()) if !end => crate::pool::pipe_link(body, tx).await,
        Ok(()) => {}
        Err(e) => tracing::debug!("response to {peer} on HTTP/2: {e}"),
    }
}
