//! Opaque TCP: bytes copied both ways, with half-close passed through (when one side
//! finishes sending, the other side's write half is shut down, and the rest still flows).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::Duration;

use trellis_identity::tls::ALPN_MESH_TCP;

use tokio::net::TcpStream;

use crate::config::{Config, Endpoint};
use crate::http::Route;
use crate::proxy::Shared;
use crate::sockets;
use crate::stats::Stats;

/// Forwards a connection to where its route says.
pub async fn forward_route(
    stream: TcpStream,
    peer: SocketAddr,
    route: &Route,
    shared: &Arc<Shared>,
    cfg: &Config,
) {
    let target = match route {
        Route::Outbound(dst) => cfg.outbound_target(*dst),
        Route::Named(host, port) => cfg.target_by_name(host, *port),
        Route::Inbound(port, peer_id, dst_ip) => {
            let arrival = crate::http::Arrival {
                peer,
                peer_id: peer_id.as_deref(),
                dst_ip: *dst_ip,
                port: *port,
                sni: None,
                remote_ip: None,
            };
            forward_inbound(stream, arrival, shared, cfg).await;
            return;
        }
        Route::Gateway { port, .. } => {
            tracing::info!("{peer}: gateway port {port} serves HTTP only; closing");
            return;
        }
    };
    let Some(target) = target else {
        tracing::warn!("{peer}: route {route:?} has no target any more; closing");
        return;
    };
    let dst = match route {
        Route::Outbound(d) => Some(*d),
        _ => None,
    };
    let mut cluster = &target.cluster;
    if !target.tls_routes.is_empty() || !target.tcp_routes.is_empty() {
        let sni = if target.tls_routes.is_empty() {
            None
        } else {
            crate::sniff::peek_sni(&stream, cfg.detection_timeout).await
        };
        let req = crate::config::L4Request {
            dst,
            port: target.port,
            sni: sni.as_deref(),
            source_labels: &cfg.own_labels,
            source_namespace: &cfg.own_namespace,
        };
        let chosen = if sni.is_some() {
            crate::config::pick_l4(&target.tls_routes, &req)
        } else {
            crate::config::pick_l4(&target.tcp_routes, &req)
        };
        match chosen {
            Some((r, dest)) => match &dest.cluster {
                Some(c) => cluster = c,
                None => {
                    tracing::warn!(flags = "NR", route = %r.name, "{peer}: route {:?} sends to cluster {:?}, which is not defined; closing", r.name, dest.name);
                    return;
                }
            },
            None if !target.tls_routes.is_empty() && target.tcp_routes.is_empty() => {
                tracing::info!(
                    flags = "NR",
                    "{peer}: no TLS route for SNI {:?} on {}:{}; closing",
                    sni,
                    target.hostname,
                    target.port
                );
                return;
            }
            None => {}
        }
    }
    if cluster.discovery == trellis_xds::snapshot::Discovery::OriginalDst {
        // Resolution NONE: where the app sent the connection.
        match dst {
            Some(d) => forward(stream, d, cluster.dial(), shared, None).await,
            None => tracing::warn!(
                flags = "NR",
                "{peer}: {}:{} has no endpoints of its own (resolution NONE) and this connection was not intercepted; closing",
                target.hostname,
                target.port
            ),
        }
        return;
    }
    let Some(ep) = cluster.pick() else {
        tracing::warn!(
            flags = "UH",
            "{peer}: no endpoint for {}:{}",
            target.hostname,
            target.port
        );
        return;
    };
    to_endpoint(stream, peer, cluster, ep, target.port, shared, cfg).await;
}

/// Forwards a connection (outbound, or through a gateway) to `ep` of `cluster`, counted
/// in the source-side TCP metrics and logged; `port` is the port it came for.
async fn to_endpoint(
    stream: TcpStream,
    peer: SocketAddr,
    cluster: &crate::config::Cluster,
    ep: &Endpoint,
    port: u16,
    shared: &Arc<Shared>,
    cfg: &Config,
) {
    // To a peer proxy: over mutual TLS once this proxy has its certificate (unless the
    // peer takes plaintext only); or as the DestinationRule's tls says.
    let tls = crate::http::upstream_tls(cluster, ep, shared.mesh_tls(cfg));
    let conn = crate::metrics::TcpConn {
        reporter: crate::metrics::Reporter::Source,
        source: Arc::clone(&cfg.own_meta),
        destination: Arc::clone(&ep.meta),
        service: Arc::clone(&cluster.service_meta),
        mtls: false,
        enabled: cfg.metrics_on.client,
        tags: cfg.metrics_on.client_tags.as_ref().map(|t| {
            let conn = crate::tags::Conn {
                peer,
                port,
                mtls: false,
            };
            (Arc::clone(t), t.connection(conn, &cluster.name))
        }),
    };
    let log = cfg
        .access_log
        .as_deref()
        .filter(|l| l.logs(false))
        .map(|log| TcpLog {
            log,
            peer,
            cluster: &cluster.name,
            peer_id: None,
        });
    forward_tls(
        stream,
        ep.addr,
        cluster.dial(),
        shared,
        Some(ep),
        tls,
        Some(&conn),
        log,
    )
    .await;
}

/// An inbound connection (plaintext, or mesh mTLS already terminated: `peer_id`) to the
/// app behind workload port `port`, once the workload's AuthorizationPolicies allow it (a
/// denied connection is closed).
pub async fn forward_inbound<D>(
    stream: D,
    arrival: crate::http::Arrival<'_>,
    shared: &Shared,
    cfg: &Config,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let port = arrival.port;
    if !cfg.authz.is_empty() && !crate::http::authorized(shared, cfg, arrival, None, None) {
        return;
    }
    let mut app = cfg.app_addr(port);
    if !cfg.pod_ips.is_empty() {
        app = shared
            .app_addr(app, &cfg.pod_ips, Duration::from_secs(1))
            .await;
    }
    let source = shared
        .istio
        .caller(&cfg.peers, arrival.peer.ip(), arrival.peer_id);
    // The service whose port this is, when the snapshot has one the workload serves.
    let service = cfg
        .inbound_service(port)
        .unwrap_or_else(crate::metrics::ServiceMeta::unknown);
    let conn = crate::metrics::TcpConn {
        reporter: crate::metrics::Reporter::Destination,
        source,
        destination: Arc::clone(&cfg.own_meta),
        service,
        mtls: arrival.peer_id.is_some(),
        enabled: cfg.metrics_on.server,
        tags: cfg.metrics_on.server_tags.as_ref().map(|t| {
            let conn = crate::tags::Conn {
                peer: arrival.peer,
                port,
                mtls: arrival.peer_id.is_some(),
            };
            (Arc::clone(t), t.connection(conn, ""))
        }),
    };
    let log = cfg
        .access_log
        .as_deref()
        .filter(|l| l.logs(true))
        .map(|log| TcpLog {
            log,
            peer: arrival.peer,
            cluster: "",
            peer_id: arrival.peer_id,
        });
    forward_tls(
        stream,
        app,
        Duration::from_secs(1),
        shared,
        None,
        None,
        Some(&conn),
        log,
    )
    .await;
}

/// The gateway's AuthorizationPolicies for a TCP or TLS-passthrough connection (L7
/// fields cannot match: Istio's TCP rules); a denial closes it.
fn gateway_admits(
    peer: SocketAddr,
    port: u16,
    sni: Option<&str>,
    shared: &Arc<Shared>,
    cfg: &Config,
) -> bool {
    if cfg.authz.is_empty() {
        return true;
    }
    let arrival = crate::http::Arrival {
        peer,
        peer_id: None,
        dst_ip: None,
        port,
        sni,
        remote_ip: None,
    };
    crate::http::authorized(shared, cfg, arrival, None, None)
}

/// A connection to a gateway's TLS passthrough (`sni` set) or TCP server: the first of
/// its virtual hosts' routes that matches (with SNI, the virtual hosts whose domains match
/// it best first) picks the cluster.
pub async fn gateway(
    stream: TcpStream,
    peer: SocketAddr,
    server: &crate::config::GatewayServer,
    sni: Option<&str>,
    shared: &Arc<Shared>,
    cfg: &Config,
    port: u16,
) {
    if !gateway_admits(peer, port, sni, shared, cfg) {
        return;
    }
    let req = crate::config::L4Request {
        dst: None,
        port,
        sni,
        source_labels: &cfg.own_labels,
        source_namespace: &cfg.own_namespace,
    };
    let mut hosts: Vec<&crate::config::VirtualHost> = server.virtual_hosts.iter().collect();
    if let Some(name) = sni {
        let name = name.to_ascii_lowercase();
        let rank =
            |v: &crate::config::VirtualHost| v.domains.iter().filter_map(|d| d.rank(&name)).max();
        hosts.retain(|v| rank(v).is_some());
        // Stable: among equally specific ones, the first bound VirtualService first.
        hosts.sort_by_key(|v| std::cmp::Reverse(rank(v)));
    }
    let chosen = hosts.iter().find_map(|v| {
        let routes = if sni.is_some() {
            &v.target.tls_routes
        } else {
            &v.target.tcp_routes
        };
        crate::config::pick_l4(routes, &req)
    });
    let Some((route, dest)) = chosen else {
        tracing::info!(
            flags = "NR",
            gateway = %server.gateway,
            "{peer}: no route on gateway port {port} for SNI {sni:?}; closing"
        );
        return;
    };
    let Some(cluster) = &dest.cluster else {
        tracing::warn!(flags = "NR", route = %route.name, "{peer}: route {:?} sends to cluster {:?}, which is not defined; closing", route.name, dest.name);
        return;
    };
    let Some(ep) = cluster.pick() else {
        tracing::warn!(flags = "UH", cluster = %cluster.name, "{peer}: no endpoint on gateway port {port}");
        return;
    };
    to_endpoint(stream, peer, cluster, ep, port, shared, cfg).await;
}

/// A connection to a gateway's TCP port: the first route that matches among the virtual
/// hosts of every TCP server on the port (several Gateways may share it).
pub async fn gateway_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    gp: &crate::config::GatewayPort,
    shared: &Arc<Shared>,
    cfg: &Config,
) {
    // (Authorization: `gateway` judges the connection, once.)
    let req = crate::config::L4Request {
        dst: None,
        port: gp.port,
        sni: None,
        source_labels: &cfg.own_labels,
        source_namespace: &cfg.own_namespace,
    };
    let server = gp.servers.iter().find(|s| {
        s.virtual_hosts
            .iter()
            .any(|v| crate::config::pick_l4(&v.target.tcp_routes, &req).is_some())
    });
    match server {
        Some(s) => gateway(stream, peer, s, None, shared, cfg, gp.port).await,
        None => tracing::info!(
            flags = "NR",
            "{peer}: no TCP route on gateway port {}; closing",
            gp.port
        ),
    }
}

/// Connects to `to` and copies both ways until both sides are done.
pub async fn forward<D>(
    down: D,
    to: SocketAddr,
    dial: impl Into<sockets::Dial>,
    shared: &Shared,
    ep: Option<&Endpoint>,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    forward_tls(down, to, dial, shared, ep, None, None, None).await;
}

/// What a TCP connection's access log line needs besides the connection itself.
#[derive(Debug)]
pub struct TcpLog<'a> {
    log: &'a crate::accesslog::AccessLog,
    peer: SocketAddr,
    cluster: &'a str,
    /// The caller's mTLS identity (inbound).
    peer_id: Option<&'a str>,
}

impl TcpLog<'_> {
    /// One line for the whole connection, as Envoy's TCP proxy logs it: no method, path
    /// or status; the bytes each way and how long it lasted.
    fn write(
        &self,
        conn: &crate::metrics::TcpConn,
        to: SocketAddr,
        start: std::time::SystemTime,
        flags: &str,
        (received, sent): (u64, u64),
    ) {
        let inbound = conn.reporter == crate::metrics::Reporter::Destination;
        let parties =
            crate::accesslog::Parties::of(&conn.source, &conn.destination, inbound, self.peer_id);
        let r = crate::accesslog::Record::connection(
            start,
            flags,
            (received, sent),
            (to, self.cluster),
            self.peer,
            parties,
        );
        self.log.log(inbound, &r);
    }
}

/// As [`forward`], over mesh mutual TLS (ALPN `trellis-tcp`) when `tls` is given. Each
/// side's end of stream is passed on (half-close; over TLS, as a close_notify).
#[allow(clippy::too_many_arguments)]
pub async fn forward_tls<D>(
    mut down: D,
    to: SocketAddr,
    dial: impl Into<sockets::Dial>,
    shared: &Shared,
    ep: Option<&Endpoint>,
    tls: Option<crate::pool::UpTls<'_>>,
    conn: Option<&crate::metrics::TcpConn>,
    log: Option<TcpLog<'_>>,
) where
    D: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let dial = dial.into();
    let start = std::time::SystemTime::now();
    let line = |flags: &str, bytes: (u64, u64)| {
        if let (Some(l), Some(c)) = (&log, conn) {
            l.write(c, to, start, flags, bytes);
        }
    };
    let failed = |e: &dyn std::fmt::Display| {
        line("UF", (0, 0));
        Stats::inc(&shared.stats.upstream_connect_failures_total);
        if let Some(ep) = ep {
            ep.stats
                .connect_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::warn!(flags = "UF", "TCP connect to {to} failed: {e}");
    };
    let mut up = match sockets::connect_with(to, dial).await {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    if let Some(ep) = ep {
        ep.stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // Opened once connected (TLS included): every opened connection is also closed.
    let opened = || {
        if let Some(c) = conn {
            shared.istio.tcp_opened(c);
        }
    };
    let copied = match tls {
        None => {
            opened();
            copy_reporting(&mut down, &mut up, to, shared, conn).await
        }
        Some(t) => {
            let mut up = match crate::pool::tls_connect(up, to, dial, t, ALPN_MESH_TCP).await {
                Ok(s) => s,
                Err(e) => return failed(&e),
            };
            opened();
            copy_reporting(&mut down, &mut up, to, shared, conn).await
        }
    };
    if let Some(c) = conn {
        let (received, sent) = copied.unreported;
        shared.istio.tcp_closed(c, received, sent);
    }
    line("-", copied.total);
}

/// Bytes a connection carried: (from the client, to the client).
struct Copied {
    total: (u64, u64),
    /// What the connection's periodic reports have not yet added to its metrics.
    unreported: (u64, u64),
}

/// Copies both ways until both sides are done (half-close passed on), adding the bytes
/// so far to the connection's metrics every `tcp_report_every` while it is open. Bytes
/// are counted as they are read, so a connection that ends in an error still has them.
async fn copy_reporting<A, B>(
    down: &mut A,
    up: &mut B,
    to: SocketAddr,
    shared: &Shared,
    conn: Option<&crate::metrics::TcpConn>,
) -> Copied
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (received, sent) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut down = Counted {
        inner: down,
        n: &received,
    };
    let mut up = Counted {
        inner: up,
        n: &sent,
    };
    let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
    tokio::pin!(copy);
    let mut reported = (0, 0);
    let result = match conn {
        None => copy.await,
        Some(c) => {
            let every = shared.tcp_report_every;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tokio::select! {
                    r = &mut copy => break r,
                    _ = tick.tick() => {
                        let now = (received.load(Relaxed), sent.load(Relaxed));
                        shared.istio.tcp_progress(c, now.0 - reported.0, now.1 - reported.1);
                        reported = now;
                    }
                }
            }
        }
    };
    let total = (received.load(Relaxed), sent.load(Relaxed));
    match result {
        Ok(_) => tracing::debug!("TCP {to}: sent {} received {}", total.0, total.1),
        Err(e) => tracing::debug!("TCP {to}: {e}"),
    }
    Copied {
        total,
        unreported: (total.0 - reported.0, total.1 - reported.1),
    }
}

/// A stream that counts the bytes read from it.
struct Counted<'a, S> {
    inner: S,
    n: &'a AtomicU64,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.n
                .fetch_add((buf.filled().len() - before) as u64, Relaxed);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
