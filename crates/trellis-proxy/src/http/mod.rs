//! HTTP forwarding: one function per request, for both directions.
//!
//! Outbound, a request goes to an endpoint of the target service's cluster: over the
//! shared HTTP/2 connection when a Trellis proxy fronts the endpoint (whatever version the
//! app spoke; a header tells the peer which version to give its app), else in the
//! client's own version. Inbound, it goes to the app on localhost in the version the
//! client app used (or HTTP/2 when the port declares it). Upgrades (WebSocket…) and
//! CONNECT are tunnelled over HTTP/1.1 end to end.

use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{ProxyBody, ReqBody};
use crate::config::{
    Config, DEFAULT_IDLE_TIMEOUT, Endpoint, PortProtocol, RetryOn, RetryPolicy, RouteDest,
};
use crate::pool::{Pools, UpstreamError};
use crate::proxy::Shared;
use crate::stats::Stats;

mod actions;
mod deadline;

use deadline::Deadline;

use actions::*;

/// Tells the peer proxy which HTTP version the client app spoke ("1.1" or "2").
pub const DOWNSTREAM_VERSION: HeaderName = HeaderName::from_static("x-trellis-downstream-version");
/// Envoy-style response flags on responses the proxy made itself (UF, UH, NR…).
pub const RESPONSE_FLAGS: HeaderName = HeaderName::from_static("x-trellis-response-flags");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// Envoy's and Istio's header naming the mTLS peer of an inbound request.
const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// How a connection's requests find where they go; resolved again for every request so
/// that a snapshot swap applies to long-lived connections too.
#[derive(Debug, Clone)]
pub enum Route {
    /// Intercepted outbound connection to this address (service VIP or endpoint).
    Outbound(SocketAddr),
    /// Explicit outbound listener for a service name and port.
    Named(Arc<str>, u16),
    /// Inbound traffic for the workload's port; with the peer proxy's SPIFFE id when it
    /// came over mesh mutual TLS, and the address it was sent to (when known).
    Inbound(u16, Option<Arc<str>>, Option<IpAddr>),
    /// A gateway port; `tls`: the server a TLS connection was accepted for (HTTPS).
    Gateway {
        port: u16,
        tls: Option<Arc<GatewayTls>>,
    },
}

/// A TLS connection a gateway terminated: the server it was accepted for, and the name
/// the client asked for (SNI).
#[derive(Debug)]
pub struct GatewayTls {
    pub server: crate::config::ServerKey,
    pub sni: Option<String>,
}

/// Who an inbound request (or connection) comes from and where it was going: what
/// RequestAuthentication and AuthorizationPolicy judge it by.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    pub peer: SocketAddr,
    /// The peer proxy's SPIFFE id, over mesh mTLS.
    pub peer_id: Option<&'a str>,
    /// The address it was sent to (the pod's), when known.
    pub dst_ip: Option<IpAddr>,
    /// The workload (or gateway) port.
    pub port: u16,
    /// The server name the client asked for in its TLS handshake (`connection.sni`): set
    /// where a gateway terminates or passes TLS through.
    pub sni: Option<&'a str>,
    /// The original client's address (`remote.ip`), when trusted proxies in front of a
    /// gateway say it in `X-Forwarded-For`; the connection's source otherwise.
    pub remote_ip: Option<IpAddr>,
}

/// The client's address as the `n` trusted proxies in front say it: the `n`th entry of
/// `X-Forwarded-For` from its right (every proxy appends the address it was connected
/// from, so entries further left are whatever the client wrote). `None` with no trusted
/// proxies, too few entries, or one that is not an address.
pub fn forwarded_client(headers: &http::HeaderMap, n: u32) -> Option<IpAddr> {
    if n == 0 {
        return None;
    }
    // Split as bytes: an entry the client wrote that is not text must not hide the ones
    // the trusted proxies appended after it.
    let mut entries: Vec<&[u8]> = Vec::new();
    for v in headers.get_all(X_FORWARDED_FOR) {
        entries.extend(v.as_bytes().split(|b| *b == b','));
    }
    let i = entries.len().checked_sub(usize::try_from(n).ok()?)?;
    let e = std::str::from_utf8(entries[i]).ok()?.trim();
    e.parse::<IpAddr>()
        .ok()
        .or_else(|| e.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// Appends the address a gateway was connected from to `X-Forwarded-For`.
fn append_forwarded_for(headers: &mut http::HeaderMap, from: IpAddr) {
    let joined = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ");
    let value = if joined.is_empty() {
        from.to_string()
    } else {
        format!("{joined}, {from}")
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// The downstream connection a request came on: passed along with the request rather
/// than in its extensions (which would cost a map allocation per request).
#[derive(Debug, Clone, Copy)]
struct Downstream {
    /// The client's address (consistent hashing on the source IP).
    peer: SocketAddr,
    /// Where an intercepted connection was going (for ORIGINAL_DST clusters).
    original_dst: Option<SocketAddr>,
}

/// Where one request goes.
struct Upstream<'a> {
    addr: SocketAddr,
    h2: bool,
    /// Set when the upstream is a peer proxy: the app's version, for the peer.
    peer_version: Option<&'static str>,
    dial: crate::sockets::Dial,
    idle_timeout: Duration,
    /// DestinationRule `maxRequestsPerConnection` (HTTP/1.1 pools).
    max_uses: Option<u32>,
    /// DestinationRule `maxConcurrentStreams` (HTTP/2 connections).
    max_streams: Option<u32>,
    endpoint: Option<&'a Endpoint>,
    /// TLS: mutual TLS to a peer proxy, or origination (DestinationRule tls).
    tls: Option<crate::pool::UpTls<'a>>,
    /// Other addresses to try when the first refuses (the pod address for apps that do
    /// not listen on localhost).
    fallbacks: &'a [IpAddr],
}

impl<'a> Upstream<'a> {
    /// An endpoint of `cluster`: over HTTP/2 when a peer proxy fronts it, when the app
    /// spoke HTTP/2 or when the port declares it.
    fn endpoint(
        ep: &'a Endpoint,
        cluster: &'a crate::config::Cluster,
        downstream_h2: bool,
        port_h2: bool,
        mesh: Option<crate::proxy::MeshMaterial<'a>>,
    ) -> Self {
        // To a peer proxy: one multiplexed HTTP/2 connection, unless the cluster keeps the
        // client's protocol (then the peer sees what the client sent, and needs no marker).
        // Anything to a peer proxy goes over mutual TLS once this proxy has its certificate
        // and the mesh's roots (unless the peer takes plaintext only).
        let to_peer_h2 = ep.proxied && !cluster.keep_client_protocol;
        let tls = upstream_tls(cluster, ep, mesh);
        // TLS origination speaks HTTP/1.1 to the service.
        let origin = matches!(tls, Some(crate::pool::UpTls::Origin(_)));
        Upstream {
            addr: ep.addr,
            h2: !origin && (to_peer_h2 || downstream_h2 || port_h2),
            peer_version: to_peer_h2.then_some(if downstream_h2 { "2" } else { "1.1" }),
            dial: cluster.dial(),
            idle_timeout: cluster.idle_timeout,
            max_uses: cluster.max_requests_per_connection,
            max_streams: cluster.max_concurrent_streams,
            endpoint: Some(ep),
            tls,
            fallbacks: &[],
        }
    }
}

/// The TLS an endpoint of `cluster` gets: the DestinationRule's `tls` when it has one
/// (DISABLE: none; ISTIO_MUTUAL: mesh mTLS; SIMPLE/MUTUAL: origination), else auto mTLS to
/// a peer proxy that takes it.
pub fn upstream_tls<'a>(
    cluster: &'a crate::config::Cluster,
    ep: &'a Endpoint,
    mesh: Option<crate::proxy::MeshMaterial<'a>>,
) -> Option<crate::pool::UpTls<'a>> {
    use crate::config::UpstreamTls;
    let mesh_tls = |(creds, roots)| crate::pool::MeshTls {
        creds,
        roots,
        expected: ep.identity.as_deref(),
    };
    match &cluster.upstream_tls {
        UpstreamTls::Auto => mesh
            .filter(|_| ep.proxied && !ep.plaintext)
            .map(|m| crate::pool::UpTls::Mesh(mesh_tls(m))),
        UpstreamTls::Disable => None,
        UpstreamTls::IstioMutual => mesh.map(|m| crate::pool::UpTls::Mesh(mesh_tls(m))),
        UpstreamTls::Origin(o) => Some(crate::pool::UpTls::Origin(o)),
    }
}

/// A copy of a request head (without its extensions).
fn clone_parts(p: &Parts) -> Parts {
    let (mut c, ()) = Request::new(()).into_parts();
    c.method = p.method.clone();
    c.uri = p.uri.clone();
    c.version = p.version;
    c.headers = p.headers.clone();
    c
}

/// Serves one request from hyper's server (not an `async fn`: the request's future is
/// `handle_request`'s own, not one more layer around it).
pub fn handle(
    shared: Arc<Shared>,
    route: Route,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> {
    let req = req.map(|b| ReqBody::Streaming(crate::body::Streaming::Hyper(b)));
    handle_request(shared, route, peer, req)
}

/// Serves one request whose body is already in the proxy's form.
pub async fn handle_request(
    shared: Arc<Shared>,
    route: Route,
    peer: SocketAddr,
    mut req: Request<ReqBody>,
) -> Result<Response<ProxyBody>, Infallible> {
    // Every request has an id from here on (as Envoy gives one at its start): the access
    // log, the app and the next hop see the same one.
    // At a gateway the id is always the proxy's own (Envoy's default at the edge): an
    // outside client cannot choose the id that logs and traces carry.
    if matches!(route, Route::Gateway { .. }) || !req.headers().contains_key(&X_REQUEST_ID) {
        req.headers_mut().insert(X_REQUEST_ID, request_id());
    }
    let ds = Downstream {
        peer,
        original_dst: match &route {
            Route::Outbound(dst) => Some(*dst),
            _ => None,
        },
    };
    Stats::inc(&shared.stats.requests_total);
    let started = std::time::Instant::now();
    let cfg = shared.config.load_full();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let request_bytes = body_len(req.headers(), http_body::Body::size_hint(req.body()));
    let is_inbound = matches!(route, Route::Inbound(..));
    // This hop's span: before the access log takes the headers, so that both show the
    // same trace.
    let span = cfg
        .tracer
        .as_ref()
        .and_then(|t| t.start(is_inbound, &mut req));
    let logged = cfg
        .access_log
        .as_ref()
        .filter(|l| l.logs(is_inbound))
        .map(|l| (Arc::clone(l), LogRequest::of(l, &req)));
    // The values of upserted metric tags that the request gives.
    let tags = if is_inbound {
        &cfg.metrics_on.server_tags
    } else {
        &cfg.metrics_on.client_tags
    };
    let tags = tags.as_ref().map(|t| {
        let conn = crate::tags::Conn {
            peer,
            port: match &route {
                Route::Inbound(port, ..) | Route::Named(_, port) => *port,
                Route::Gateway { port, .. } => *port,
                Route::Outbound(dst) => dst.port(),
            },
            mtls: matches!(&route, Route::Inbound(_, Some(_), _)),
        };
        (Arc::clone(t), t.request(&req, conn))
    });
    // Inbound, the service the request names, when this workload backs it (a client
    // cannot pass its request off as another service's); else the one whose port this is.
    // (Outbound, `record` takes it from the cluster that answered.)
    let service = match &route {
        Route::Inbound(port, ..) => authority_of(&req)
            .and_then(|h| cfg.service_by_host(h))
            .filter(|s| cfg.backs(s))
            .or_else(|| cfg.inbound_service(*port)),
        _ => None,
    };
    // From here the request is recorded once, whatever happens: answered (`record`), or
    // dropped before an answer because the client went away (`Inflight`'s drop).
    let mut inflight = Inflight {
        shared: Arc::clone(&shared),
        cfg: Arc::clone(&cfg),
        route: route.clone(),
        ds,
        service,
        grpc,
        head: req.method() == Method::HEAD,
        request_bytes,
        started,
        logged,
        span,
        tags,
        done: false,
    };
    let resp = match &route {
        Route::Inbound(port, peer_id, dst_ip) => {
            let arrival = Arrival {
                peer: ds.peer,
                peer_id: peer_id.as_deref(),
                dst_ip: *dst_ip,
                port: *port,
                sni: None,
                remote_ip: None,
            };
            inbound(&shared, &cfg, arrival, req).await
        }
        // Boxed: a sidecar's requests do not carry a gateway's (larger) future.
        Route::Gateway { port, tls } => {
            Box::pin(gateway(&shared, &cfg, ds, *port, tls.as_deref(), req)).await
        }
        Route::Outbound(dst) => match cfg.outbound_target(*dst) {
            Some(t) => outbound(&shared, &cfg, ds, t, req).await,
            None => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                format!("no route to {dst}"),
            ),
        },
        Route::Named(host, port) => match cfg.target_by_name(host, *port) {
            Some(t) => outbound(&shared, &cfg, ds, t, req).await,
            None => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                format!("no service {host}:{port} in the current configuration"),
            ),
        },
    };
    if resp.status().is_server_error() {
        Stats::inc(&shared.stats.responses_5xx_total);
    }
    Ok(record(&mut inflight, resp))
}

async fn outbound(
    shared: &Arc<Shared>,
    cfg: &Config,
    ds: Downstream,
    target: &crate::config::Target,
    req: Request<ReqBody>,
) -> Response<ProxyBody> {
    let mut req = req;
    let origin = req.headers().get(header::ORIGIN).cloned();
    let mut dest_response_headers = None;
    let (cluster, policy, route_name) = match &target.routes {
        None => (&target.cluster, None, None),
        Some(table) => {
            let matched = {
                let view = trellis_policy::route::HttpRequestView {
                    req: &req,
                    port: Some(target.port),
                    source_labels: &cfg.own_labels,
                    source_namespace: &cfg.own_namespace,
                    gateway: target.gateway.as_deref().unwrap_or("mesh"),
                };
                table.first_match(&view)
            };
            let Some(m) = matched else {
                return local_reply(
                    StatusCode::NOT_FOUND,
                    "NR",
                    format!(
                        "no route for {}:{}{}",
                        target.hostname,
                        target.port,
                        req.uri().path()
                    ),
                );
            };
            let policy = target.route_policies.get(m.route.index);
            tracing::debug!(route = %m.route.name, "{} {}:{}{} matched route {:?}", req.method(), target.hostname, target.port, req.uri().path(), m.route.name);
            if let Some(p) = policy {
                p.requests.fetch_add(1, Ordering::Relaxed);
                if let Some(bucket) = &p.rate_limit {
                    if let Err(retry_in) = bucket.try_take() {
                        Stats::inc(&shared.stats.rate_limited_total);
                        return bucket.limited(retry_in);
                    }
                }
                if let Some(cors) = &p.cors {
                    if let Some(resp) = cors_preflight(cors, &req) {
                        return resp;
                    }
                }
                if let Some(action) = &p.action {
                    return local_action(action, &req);
                }
                if let Some(rw) = &p.rewrite {
                    apply_rewrite(&mut req, rw, m.entry.and_then(|e| e.uri_prefix()));
                }
                if let Some(h) = &p.request_headers {
                    h.apply(req.headers_mut());
                }
            }
            match m.route.pick(random_u64() as u32) {
                Some(
                    d @ RouteDest {
                        cluster: Some(c), ..
                    },
                ) => {
                    if let Some(h) = &d.request_headers {
                        h.apply(req.headers_mut());
                    }
                    dest_response_headers = d.response_headers.as_ref();
                    (c, policy, Some(&m.route.name))
                }
                Some(RouteDest {
                    name,
                    cluster: None,
                    ..
                }) => {
                    tracing::warn!(flags = "NR", route = %m.route.name, "route {:?} of {}:{} sends to cluster {name:?}, which is not defined", m.route.name, target.hostname, target.port);
                    return local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NR",
                        format!("route {:?} has no cluster {name:?}", m.route.name),
                    );
                }
                None => {
                    return local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NR",
                        format!("route {:?} has no destination", m.route.name),
                    );
                }
            }
        }
    };
    let set_cookie = sticky_cookie(cluster, ds, &mut req);
    let mut resp = match policy {
        None => {
            let retry = &shared.default_retry;
            to_cluster(shared, cfg, ds, target, cluster, retry, &[], req).await
        }
        Some(p) => {
            match Deadline::new(
                p.timeout,
                with_faults(shared, cfg, ds, target, cluster, p, req),
            )
            .await
            {
                Some(r) => r,
                None => local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout".to_string(),
                ),
            }
        }
    };
    if let Some(h) = policy.and_then(|p| p.response_headers.as_ref()) {
        h.apply(resp.headers_mut());
    }
    if let Some(h) = dest_response_headers {
        h.apply(resp.headers_mut());
    }
    if let Some(c) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    if let (Some(name), Some(_)) = (route_name, &cfg.access_log) {
        resp.extensions_mut().insert(RouteName(name.clone()));
    }
    if let (Some(cors), Some(origin)) = (policy.and_then(|p| p.cors.as_ref()), origin) {
        if cors.allows(origin.to_str().unwrap_or_default()) {
            let h = resp.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            if let Some(v) = &cors.expose_headers {
                h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
            }
            if cors.allow_credentials {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
    }
    resp
}

/// Sticky sessions by a cookie the proxy sets (`consistentHash.httpCookie` with a ttl):
/// a request without the cookie gets a fresh value, added to the request so that it hashes
/// the way the client's next requests will, and the `Set-Cookie` to return.
fn sticky_cookie(
    cluster: &crate::config::Cluster,
    ds: Downstream,
    req: &mut Request<ReqBody>,
) -> Option<HeaderValue> {
    let ring = cluster.ring.as_ref()?;
    let crate::config::HashKey::Cookie {
        name,
        set: Some(spec),
    } = &ring.key
    else {
        return None;
    };
    if request_hash(&ring.key, ds, req).is_some() {
        return None;
    }
    let value = format!("{:016x}", random_u64());
    let pair = HeaderValue::from_str(&format!("{name}={value}")).ok()?;
    req.headers_mut().append(header::COOKIE, pair);
    let mut c = format!("{name}={value}");
    if let Some(p) = &spec.path {
        c.push_str("; Path=");
        c.push_str(p);
    }
    if !spec.ttl.is_zero() {
        c.push_str(&format!("; Max-Age={}", spec.ttl.as_secs().max(1)));
    }
    c.push_str("; HttpOnly");
    HeaderValue::from_str(&c).ok()
}

/// Who answered a request (the endpoint of its last try, and the service of its cluster),
/// for the source side's metric labels: carried from `to_cluster` to `handle_request` in
/// the response's extensions.
#[derive(Clone)]
struct Answered {
    workload: Arc<crate::metrics::WorkloadMeta>,
    service: Arc<crate::metrics::ServiceMeta>,
    addr: SocketAddr,
    cluster: Arc<str>,
}

fn tag_upstream(resp: &mut Response<ProxyBody>, ep: &Endpoint, cluster: &crate::config::Cluster) {
    resp.extensions_mut().insert(Answered {
        workload: Arc::clone(&ep.meta),
        service: Arc::clone(&cluster.service_meta),
        addr: ep.addr,
        cluster: Arc::clone(&cluster.name),
    });
}

/// The size of a message's body when its head says it (exactly), else 0.
fn body_len(headers: &HeaderMap, hint: http_body::SizeHint) -> u64 {
    hint.exact().unwrap_or_else(|| {
        headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0)
    })
}

/// The authority a request names: its URI's, else its Host header.
pub(crate) fn authority_of<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// A gRPC status in response headers or trailers.
fn grpc_status(h: &HeaderMap) -> Option<u16> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// What the access log needs of a request, taken before the request is sent on.
#[derive(Debug)]
pub struct LogRequest {
    start: std::time::SystemTime,
    method: Method,
    path: String,
    version: Version,
    authority: String,
    headers: crate::accesslog::Headers,
}

impl LogRequest {
    fn of(log: &crate::accesslog::AccessLog, req: &Request<ReqBody>) -> LogRequest {
        LogRequest {
            start: std::time::SystemTime::now(),
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string()),
            version: req.version(),
            authority: authority_of(req).unwrap_or("").to_string(),
            headers: log.request_headers(req.headers()),
        }
    }
}

/// The route that matched (a response extension, set when access logs want it).
#[derive(Debug, Clone)]
struct RouteName(String);

/// The AuthorizationPolicy that denied a request (a response extension).
#[derive(Debug, Clone)]
struct DeniedBy(String);

/// A request's record, waiting for the last byte of its response: Istio's metrics and,
/// when the workload logs, its access log line.
#[derive(Debug)]
pub struct Completion {
    shared: Arc<Shared>,
    metrics: crate::metrics::HttpRequest,
    started: std::time::Instant,
    /// The server side (an inbound request).
    inbound: bool,
    /// The downstream peer.
    peer: SocketAddr,
    /// The endpoint that answered, and its cluster.
    upstream: Option<(SocketAddr, Arc<str>)>,
    log: Option<Box<LogLine>>,
    span: Option<Box<crate::trace::Started>>,
}

/// What the access log line needs besides the request's record.
#[derive(Debug)]
struct LogLine {
    log: Arc<crate::accesslog::AccessLog>,
    req: LogRequest,
    resp_headers: crate::accesslog::Headers,
    route_name: Option<String>,
    policy: Option<String>,
    local: Option<SocketAddr>,
    /// The caller's mTLS identity (inbound).
    peer_id: Option<Arc<str>>,
}

impl Completion {
    /// The response's trailers went by: a gRPC status in them counts.
    pub fn trailers(&mut self, t: &HeaderMap) {
        if self.metrics.grpc && self.metrics.grpc_status.is_none() {
            self.metrics.grpc_status = grpc_status(t);
        }
    }

    /// The response has ended, whole or not (the client went away: DC; the upstream
    /// failed mid-body: UC): records it.
    pub fn finish(mut self, sent: u64, how: crate::body::Ended) {
        self.metrics.duration = self.started.elapsed();
        self.metrics.response_bytes = sent;
        if self.metrics.flags == "-" {
            match how {
                crate::body::Ended::Complete => {}
                crate::body::Ended::Downstream => self.metrics.flags = "DC",
                crate::body::Ended::Upstream => self.metrics.flags = "UC",
            }
        }
        self.shared.istio.record_http(&self.metrics);
        if let Some(l) = &self.log {
            l.write(&self);
        }
        if let Some(s) = self.span {
            let m = &self.metrics;
            let own = if self.inbound {
                &m.destination
            } else {
                &m.source
            };
            // The other end: the caller (inbound), or the endpoint that answered.
            let peer = if self.inbound {
                Some(self.peer)
            } else {
                self.upstream.as_ref().map(|u| u.0)
            };
            s.finish(&crate::trace::Outcome {
                inbound: self.inbound,
                code: m.code,
                flags: m.flags,
                upstream_cluster: self.upstream.as_ref().map_or("", |u| &u.1),
                peer,
                request_size: m.request_bytes,
                response_size: m.response_bytes,
                own,
            });
        }
    }
}

impl LogLine {
    fn write(&self, c: &Completion) {
        let m = &c.metrics;
        let r = crate::accesslog::Record {
            start: self.req.start,
            method: Some(&self.req.method),
            path: &self.req.path,
            version: Some(self.req.version),
            authority: &self.req.authority,
            request_headers: &self.req.headers,
            response_headers: Some(&self.resp_headers),
            code: m.code,
            flags: m.flags,
            bytes_received: m.request_bytes,
            bytes_sent: m.response_bytes,
            duration: m.duration,
            upstream_host: c.upstream.as_ref().map(|u| u.0),
            upstream_cluster: c.upstream.as_ref().map_or("", |u| &u.1),
            downstream_local: self.local,
            downstream_remote: c.peer,
            sni: None,
            route_name: self.route_name.as_deref().unwrap_or(""),
            parties: crate::accesslog::Parties::of(
                &m.source,
                &m.destination,
                c.inbound,
                self.peer_id.as_deref(),
            ),
            authorization_policy: self.policy.as_deref().unwrap_or(""),
        };
        self.log.log(c.inbound, &r);
    }
}

/// A request being served, and what recording it needs.
struct Inflight {
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    route: Route,
    ds: Downstream,
    /// Inbound: the service the request was for.
    service: Option<Arc<crate::metrics::ServiceMeta>>,
    grpc: bool,
    head: bool,
    request_bytes: u64,
    started: std::time::Instant,
    logged: Option<(Arc<crate::accesslog::AccessLog>, LogRequest)>,
    span: Option<Box<crate::trace::Started>>,
    /// The side's metric tag overrides, with the values the request gave.
    tags: Option<(Arc<crate::tags::Tags>, crate::tags::Pending)>,
    /// Recorded already.
    done: bool,
}

impl Drop for Inflight {
    /// Dropped unanswered (the client went away, or reset its stream, before the
    /// response head): recorded as Envoy does, code 0 and flag DC.
    fn drop(&mut self) {
        if !self.done {
            self.completion(0, "DC", None, None)
                .finish(0, crate::body::Ended::Complete);
        }
    }
}

impl Inflight {
    /// The record of the request, answered with `code` (`resp`, when there is one).
    fn completion(
        &mut self,
        code: u16,
        flags: &'static str,
        grpc_status: Option<u16>,
        mut resp: Option<&mut Response<ProxyBody>>,
    ) -> Completion {
        use crate::metrics::{HttpRequest, Reporter, ServiceMeta, WorkloadMeta};
        self.done = true;
        let cfg = &*self.cfg;
        let shared = Arc::clone(&self.shared);
        let peer = self.ds.peer;
        let inbound = matches!(self.route, Route::Inbound(..));
        let answered = resp
            .as_mut()
            .and_then(|r| r.extensions_mut().remove::<Answered>());
        let upstream = answered.as_ref().map(|a| (a.addr, Arc::clone(&a.cluster)));
        let (reporter, source, destination, service, mtls) = match &self.route {
            Route::Inbound(_, peer_id, _) => {
                let source = shared
                    .istio
                    .caller(&cfg.peers, peer.ip(), peer_id.as_deref());
                (
                    Reporter::Destination,
                    source,
                    Arc::clone(&cfg.own_meta),
                    self.service.take().unwrap_or_else(ServiceMeta::unknown),
                    peer_id.is_some(),
                )
            }
            route => {
                // No cluster answered (no route, a fault, a local limit…): the target's
                // service.
                let (destination, service) = match answered {
                    Some(a) => (a.workload, a.service),
                    None => (
                        WorkloadMeta::unknown(),
                        match route {
                            Route::Outbound(dst) => cfg.outbound_target(*dst),
                            Route::Named(host, port) => cfg.target_by_name(host, *port),
                            _ => None,
                        }
                        .map_or_else(ServiceMeta::unknown, |t| Arc::clone(&t.service_meta)),
                    ),
                };
                (
                    Reporter::Source,
                    Arc::clone(&cfg.own_meta),
                    destination,
                    service,
                    false,
                )
            }
        };
        let tags = self.tags.take().map(|(t, pending)| {
            let values = t.finish(
                pending,
                code,
                resp.as_ref().map(|r| r.headers()),
                upstream.as_ref().map_or("", |u| &u.1),
            );
            (t, values)
        });
        let log = self.logged.take().map(|(log, req)| {
            let (resp_headers, route_name, policy) = match resp {
                Some(r) => (
                    log.response_headers(r.headers()),
                    r.extensions_mut().remove::<RouteName>().map(|n| n.0),
                    r.extensions_mut().remove::<DeniedBy>().map(|d| d.0),
                ),
                None => (Vec::new(), None, None),
            };
            Box::new(LogLine {
                resp_headers,
                log,
                req,
                route_name,
                policy,
                local: self.ds.original_dst,
                peer_id: match &self.route {
                    Route::Inbound(_, peer_id, _) => peer_id.clone(),
                    _ => None,
                },
            })
        });
        Completion {
            shared,
            metrics: HttpRequest {
                reporter,
                source,
                destination,
                service,
                grpc: self.grpc,
                code,
                grpc_status,
                flags,
                mtls,
                duration: Duration::ZERO,
                request_bytes: self.request_bytes,
                response_bytes: 0,
                enabled: if inbound {
                    cfg.metrics_on.server
                } else {
                    cfg.metrics_on.client
                },
                tags,
            },
            started: self.started,
            inbound,
            peer,
            upstream,
            log,
            span: self.span.take(),
        }
    }
}

/// Records a request in Istio's metrics, the access log and its span: at once when its
/// response has no body to send, else when the body has been sent (the response comes
/// back wrapped).
fn record(inflight: &mut Inflight, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let headers = resp.headers();
    let grpc_status = inflight.grpc.then(|| grpc_status(headers)).flatten();
    let flags = headers
        .get(RESPONSE_FLAGS)
        .map_or("-", |v| crate::metrics::flag(v.as_bytes()));
    let code = resp.status().as_u16();
    let completion = inflight.completion(code, flags, grpc_status, Some(&mut resp));
    // Nothing to watch: no body to send (HEAD, 1xx, 204, 304 send none, whatever the
    // response holds), or nothing that waits for its end.
    let status = resp.status();
    let bodiless = inflight.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let watched = completion.metrics.enabled != crate::metrics::Enabled::NONE
        || completion.log.is_some()
        || completion.span.is_some();
    if bodiless || !watched || http_body::Body::is_end_stream(resp.body()) {
        completion.finish(0, crate::body::Ended::Complete);
        return resp;
    }
    resp.map(|inner| {
        ProxyBody::Observed(Box::new(crate::body::Observed {
            inner,
            completion: Some(completion),
            sent: 0,
        }))
    })
}

/// How a try ended, for outlier detection: the proxy's own connect-failure, reset and
/// timeout answers are local-origin failures, anything else is the upstream's status.
fn outcome(resp: &Response<ProxyBody>) -> crate::config::Outcome {
    match resp
        .headers()
        .get(RESPONSE_FLAGS)
        .map(HeaderValue::as_bytes)
    {
        Some(b"UF" | b"UC" | b"UT") => crate::config::Outcome::LocalOrigin,
        _ => crate::config::Outcome::Status(resp.status().as_u16()),
    }
}

/// Set on retries: which try this is (Envoy's header, which apps and tests look at).
const ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");

/// Sends the request to an endpoint of `cluster`, trying again as the retry policy says:
/// on another endpoint when there is one, after an exponential backoff with jitter, with
/// the body buffered (up to 64 KiB) so that it can be sent again. Streaming bodies and
/// upgrades go out once.
#[allow(clippy::too_many_arguments)]
async fn to_cluster(
    shared: &Arc<Shared>,
    cfg: &Config,
    ds: Downstream,
    target: &crate::config::Target,
    cluster: &Arc<crate::config::Cluster>,
    retry: &RetryPolicy,
    mirrors: &[crate::config::Mirror],
    req: Request<ReqBody>,
) -> Response<ProxyBody> {
    let no_endpoint = || {
        tracing::warn!(cluster = %cluster.name, "no endpoint for {}:{} (UH)", target.hostname, target.port);
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!(
                "no healthy upstream for {}:{}",
                target.hostname, target.port
            ),
        )
    };
    let downstream_h2 = req.version() == Version::HTTP_2;
    let port_h2 = target.protocol == PortProtocol::Http2;
    if cluster.discovery == trellis_xds::snapshot::Discovery::OriginalDst {
        // Resolution NONE: the request goes where the app sent it.
        let Some(dst) = ds.original_dst else {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "NR",
                format!(
                    "{}:{} has no endpoints of its own (resolution NONE) and this connection was not intercepted",
                    target.hostname, target.port
                ),
            );
        };
        let up = Upstream {
            addr: dst,
            h2: downstream_h2 || port_h2,
            peer_version: None,
            dial: cluster.dial(),
            idle_timeout: cluster.idle_timeout,
            max_uses: cluster.max_requests_per_connection,
            max_streams: cluster.max_concurrent_streams,
            endpoint: None,
            tls: None,
            fallbacks: &[],
        };
        let Some(_admitted) = cluster.admit().await else {
            return overflow(cluster);
        };
        return forward(shared, req, &up).await;
    }
    let hashed = cluster
        .ring
        .as_ref()
        .and_then(|r| request_hash(&r.key, ds, &req))
        .and_then(|h| cluster.pick_hashed(h));
    let buffer = retry.attempts > 0 || !mirrors.is_empty();
    if !buffer || is_upgrade(&req) {
        let Some(ep) = hashed.or_else(|| cluster.pick()) else {
            return no_endpoint();
        };
        let up = Upstream::endpoint(ep, cluster, downstream_h2, port_h2, shared.mesh_tls(cfg));
        let Some(_admitted) = cluster.admit().await else {
            return overflow(cluster);
        };
        let mut resp = forward(shared, req, &up).await;
        cluster.report(ep, outcome(&resp));
        tag_upstream(&mut resp, ep, cluster);
        return resp;
    }

    let (mut parts, body) = req.into_parts();
    let downstream_version = parts.version;
    // A body that can be sent again: empty, or small with a known length.
    let (buffered, mut streaming) = match body {
        ReqBody::Buffered(b) => (Some(b), None),
        ReqBody::Streaming(b) if http_body::Body::is_end_stream(&b) => (Some(None), None),
        ReqBody::Streaming(b) => match http_body::Body::size_hint(&b).exact() {
            Some(n) if n <= crate::config::MAX_RETRY_BODY => {
                match Box::pin(http_body_util::BodyExt::collect(b)).await {
                    Ok(c) => (Some(Some(c.to_bytes())), None),
                    Err(e) => {
                        return local_reply(
                            StatusCode::BAD_REQUEST,
                            "DPE",
                            format!("reading the request body: {e}"),
                        );
                    }
                }
            }
            _ => (None, Some(ReqBody::Streaming(b))),
        },
    };
    if let Some(body) = &buffered {
        for m in mirrors {
            if roll(m.percentage) {
                mirror(shared, m, &parts, body.clone());
            }
        }
    } else if !mirrors.is_empty() {
        Stats::inc(&shared.stats.mirror_skipped_total);
    }
    let tries = if buffered.is_some() {
        1 + retry.attempts
    } else {
        1
    };
    let mut tried: Vec<std::net::SocketAddr> = Vec::new();
    // Held across the next try (dropped when it is replaced or the function returns).
    let mut _retry_slot = None;
    for attempt in 1..=tries {
        // The hashed endpoint first; then one not tried yet, when there is one.
        let ep = match hashed.filter(|_| attempt == 1) {
            Some(e) => Some(e),
            None => {
                let mut ep = None;
                for _ in 0..cluster.endpoints.len().max(1) {
                    match cluster.pick() {
                        Some(e) if !tried.contains(&e.addr) => {
                            ep = Some(e);
                            break;
                        }
                        Some(e) => ep = ep.or(Some(e)),
                        None => break,
                    }
                }
                ep
            }
        };
        let Some(ep) = ep else { return no_endpoint() };
        tried.push(ep.addr);
        let body = match &buffered {
            Some(b) => ReqBody::Buffered(b.clone()),
            None => streaming.take().unwrap_or(ReqBody::Buffered(None)),
        };
        if attempt > 1 {
            parts
                .headers
                .insert(ATTEMPT_COUNT, HeaderValue::from(attempt));
        }
        let up = Upstream::endpoint(ep, cluster, downstream_h2, port_h2, shared.mesh_tls(cfg));
        let Some(_admitted) = cluster.admit().await else {
            return overflow(cluster);
        };
        let result = Deadline::new(
            retry.per_try_timeout,
            forward_once(shared, &mut parts, downstream_version, body, &up),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout { addr: ep.addr }));
        if let Err(e) = &result {
            count_failure(shared, Some(ep), e);
        }
        cluster.report(
            ep,
            match &result {
                Ok(r) => outcome(r),
                Err(_) => crate::config::Outcome::LocalOrigin,
            },
        );
        let last = attempt == tries;
        let again = match &result {
            Ok(resp) => !last && retriable_response(&retry.on, resp),
            Err(e) => !last && retriable_error(&retry.on, e, &parts.method),
        };
        // The cluster's retry budget (maxRetries): a retry holds a slot until it is done.
        let slot = if again { cluster.try_retry() } else { None };
        if slot.is_none() {
            if again {
                Stats::inc(&shared.stats.retry_overflow_total);
                tracing::info!(cluster = %cluster.name, "retry budget of the cluster spent; not retrying");
            }
            let mut resp = match result {
                Ok(resp) => resp,
                Err(e) => upstream_error_reply(e),
            };
            tag_upstream(&mut resp, ep, cluster);
            return resp;
        }
        _retry_slot = slot;
        match &result {
            Ok(resp) => tracing::debug!(
                "retrying {} {} after status {} (attempt {attempt})",
                parts.method,
                parts.uri,
                resp.status()
            ),
            Err(e) => tracing::debug!(
                "retrying {} {} after {e} (attempt {attempt})",
                parts.method,
                parts.uri
            ),
        }
        drop(result);
        // Exponential backoff with full jitter, capped at ten times the base.
        let base = retry.backoff.as_micros() as u64;
        let cap = base.saturating_mul(10).max(1);
        let ceiling = base
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(cap)
            .max(1);
        Box::pin(tokio::time::sleep(Duration::from_micros(
            random_u64() % ceiling,
        )))
        .await;
    }
    no_endpoint()
}

/// A request to a gateway: the server for its host on this port, then the virtual host
/// (the VirtualService bound to the server), then that virtual host's routes.
async fn gateway(
    shared: &Arc<Shared>,
    cfg: &Config,
    ds: Downstream,
    port: u16,
    handshake: Option<&GatewayTls>,
    mut req: Request<ReqBody>,
) -> Response<ProxyBody> {
    let tls = handshake.is_some();
    let Some(gp) = cfg.gateway_ports.get(&port) else {
        return local_reply(
            StatusCode::NOT_FOUND,
            "NR",
            format!("no gateway server on port {port} in the current configuration"),
        );
    };
    // The gateway's own RequestAuthentications and AuthorizationPolicies (those that
    // select its workload), before any routing.
    let arrival = Arrival {
        peer: ds.peer,
        peer_id: None,
        dst_ip: None,
        port,
        sni: handshake.and_then(|h| h.sni.as_deref()),
        remote_ip: forwarded_client(req.headers(), cfg.num_trusted_proxies),
    };
    if let Some(refused) = admission(shared, cfg, arrival, &mut req).await {
        return refused;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let host = crate::config::request_host(&authority);
    let Some(server) = gp.server(&host, tls) else {
        tracing::info!(
            flags = "NR",
            "gateway port {port}: no server for host {host:?}"
        );
        return local_reply(
            StatusCode::NOT_FOUND,
            "NR",
            format!("no gateway server for host {host:?} on port {port}"),
        );
    };
    // On TLS, the host must be one of the server the handshake was for: its certificate
    // and its client-certificate policy are the ones that were checked (RFC 9110 §7.4).
    if let Some(k) = handshake {
        if server.key() != k.server {
            tracing::info!(
                flags = "NR",
                "gateway port {port}: host {host:?} is not served by the TLS server the connection was accepted for"
            );
            return local_reply(
                StatusCode::MISDIRECTED_REQUEST,
                "NR",
                format!("host {host:?} is not served on this TLS connection"),
            );
        }
    }
    if matches!(
        server.kind,
        crate::config::ServerKind::Http {
            https_redirect: true
        }
    ) {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut resp = local_reply(StatusCode::MOVED_PERMANENTLY, "-", String::new());
        *resp.body_mut() = ProxyBody::empty();
        resp.headers_mut().remove(RESPONSE_FLAGS);
        resp.headers_mut().remove(header::CONTENT_TYPE);
        match HeaderValue::try_from(format!(
            "https://{}{path}",
            authority_without_port(&authority)
        )) {
            Ok(v) => {
                resp.headers_mut().insert(header::LOCATION, v);
                return resp;
            }
            Err(_) => {
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    "request host cannot be redirected".to_string(),
                );
            }
        }
    }
    let Some(vh) = server.virtual_host(&host) else {
        tracing::info!(flags = "NR", gateway = %server.gateway, "gateway port {port}: no VirtualService for host {host:?}");
        return local_reply(
            StatusCode::NOT_FOUND,
            "NR",
            format!("no route for host {host:?} on gateway port {port}"),
        );
    };
    // The gateway is the edge: the scheme the client used is what it says it is, and
    // the address it came from is appended to X-Forwarded-For.
    req.headers_mut().insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    append_forwarded_for(req.headers_mut(), ds.peer.ip());
    outbound(shared, cfg, ds, &vh.target, req).await
}

/// `host:port` → `host` (IPv6 literals keep their brackets).
fn authority_without_port(a: &str) -> &str {
    match a.rfind(':') {
        Some(i) if !a[i..].contains(']') && (a.starts_with('[') || a.matches(':').count() == 1) => {
            &a[..i]
        }
        _ => a,
    }
}

/// RequestAuthentication, then AuthorizationPolicy, for a request arriving on `port`
/// (inbound to the workload, or at a gateway): `Some(response)` when it is refused (401
/// for a JWT that does not verify, 403 for an authorization denial).
async fn admission(
    shared: &Shared,
    cfg: &Config,
    arrival: Arrival<'_>,
    req: &mut Request<ReqBody>,
) -> Option<Response<ProxyBody>> {
    let (ds_peer, port) = (arrival.peer, arrival.port);
    let mut claims = None;
    if !cfg.jwt.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let query = req.uri().query().map(str::to_string);
        // Boxed: only requests to a workload with JWT rules carry this (large) future.
        let authenticated =
            Box::pin(
                cfg.jwt
                    .authenticate(req.headers_mut(), query.as_deref(), now, &shared.jwks),
            )
            .await;
        match authenticated {
            Ok(c) => claims = c,
            Err((e, policy)) => {
                Stats::inc(&shared.stats.jwt_rejections_total);
                tracing::info!(
                    policy = policy.unwrap_or(""),
                    source = %ds_peer,
                    port,
                    "request refused (401): {e}"
                );
                let mut resp = local_reply(StatusCode::UNAUTHORIZED, "UAEX", e.to_string());
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"trellis\", error=\"invalid_token\""),
                );
                return Some(resp);
            }
        }
    }
    if !cfg.authz.is_empty() {
        let request_principal = claims.as_ref().map(trellis_policy::jwt::Claims::principal);
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let http = trellis_policy::authz::Http {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: Some(req.headers()),
            request_principal: request_principal.as_deref(),
        };
        if let Err(policy) = decide(shared, cfg, arrival, Some(http), claims.as_ref()) {
            let mut resp = local_reply(
                StatusCode::FORBIDDEN,
                "RBAC",
                "RBAC: access denied".to_string(),
            );
            resp.extensions_mut().insert(DeniedBy(policy));
            return Some(resp);
        }
    }
    None
}

async fn inbound(
    shared: &Shared,
    cfg: &Config,
    arrival: Arrival<'_>,
    mut req: Request<ReqBody>,
) -> Response<ProxyBody> {
    if let Some(refused) = admission(shared, cfg, arrival, &mut req).await {
        return refused;
    }
    let (port, peer_id) = (arrival.port, arrival.peer_id);
    let declared = cfg.inbound_port(port);
    if let Some(bucket) = &declared.rate_limit {
        if let Err(retry_in) = bucket.try_take() {
            Stats::inc(&shared.stats.rate_limited_total);
            return bucket.limited(retry_in);
        }
    }
    // The caller's identity, for the app, as Istio's sidecars give it: set from the mTLS
    // handshake, and never taken from the request (which the caller could forge).
    let headers = req.headers_mut();
    headers.remove(&XFCC);
    if let Some(id) = peer_id {
        let own = shared.credentials.current();
        let by = own.as_ref().and_then(|c| c.spiffe.as_deref()).unwrap_or("");
        // Written out by hand: `format!` costs about 1,300 instructions per request here.
        let mut v = Vec::with_capacity(8 + by.len() + id.len());
        v.extend_from_slice(b"By=");
        v.extend_from_slice(by.as_bytes());
        v.extend_from_slice(b";URI=");
        v.extend_from_slice(id.as_bytes());
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(v)) {
            headers.insert(XFCC, v);
        }
    }
    let marker = req.headers_mut().remove(DOWNSTREAM_VERSION);
    let h2 = match marker.as_ref().map(HeaderValue::as_bytes) {
        _ if declared.protocol == PortProtocol::Http2 => true,
        Some(b"2") => true,
        Some(_) => false,
        None => req.version() == Version::HTTP_2,
    };
    let up = Upstream {
        addr: declared.app_addr(),
        h2,
        peer_version: None,
        dial: Duration::from_secs(1).into(),
        idle_timeout: DEFAULT_IDLE_TIMEOUT,
        max_uses: None,
        max_streams: None,
        endpoint: None,
        tls: None,
        fallbacks: &cfg.pod_ips,
    };
    forward(shared, req, &up).await
}

/// Judges an inbound request (or, with `http` None, a TCP connection) by the workload's
/// AuthorizationPolicies: a denial is logged with the policy and rule, and counted; AUDIT
/// matches are logged.
pub fn authorized(
    shared: &Shared,
    cfg: &Config,
    arrival: Arrival<'_>,
    http: Option<trellis_policy::authz::Http<'_>>,
    jwt: Option<&trellis_policy::jwt::Claims>,
) -> bool {
    decide(shared, cfg, arrival, http, jwt).is_ok()
}

/// Judges a request or connection by the workload's AuthorizationPolicies; a denial
/// names the policy that decided it.
fn decide(
    shared: &Shared,
    cfg: &Config,
    arrival: Arrival<'_>,
    http: Option<trellis_policy::authz::Http<'_>>,
    jwt: Option<&trellis_policy::jwt::Claims>,
) -> Result<(), String> {
    use trellis_policy::authz::{Decision, Request as AuthzRequest};
    let Arrival {
        peer,
        peer_id,
        dst_ip,
        port,
        sni,
        remote_ip,
    } = arrival;
    let principal = peer_id.map(|id| id.strip_prefix("spiffe://").unwrap_or(id));
    let r = AuthzRequest {
        principal,
        source_ip: Some(peer.ip()),
        remote_ip: Some(remote_ip.unwrap_or(peer.ip())),
        destination_ip: dst_ip,
        destination_port: Some(port),
        sni,
        http,
        jwt,
    };
    let (decision, audited) = cfg.authz.evaluate(&r);
    let who = principal.unwrap_or("");
    for policy in audited {
        tracing::info!(policy, source = %peer, principal = who, port, "AUDIT: the request matches an AUDIT policy");
    }
    match decision {
        Decision::Allow => Ok(()),
        Decision::Deny {
            policy,
            rule,
            action,
        } => {
            shared.stats.denied_by(&policy);
            let (method, path) = r.http.as_ref().map_or(("", ""), |h| (h.method, h.path));
            match rule {
                Some(rule) => tracing::info!(
                    policy = %policy,
                    rule,
                    action = action.as_str(),
                    source = %peer,
                    principal = who,
                    port,
                    method,
                    path,
                    "RBAC: access denied by {} policy {policy}, rule {rule}",
                    action.as_str()
                ),
                None => tracing::info!(
                    policy = %policy,
                    action = "ALLOW",
                    source = %peer,
                    principal = who,
                    port,
                    method,
                    path,
                    "RBAC: access denied: no rule of the ALLOW policies {policy} matches"
                ),
            }
            Err(policy.to_string())
        }
    }
}

fn is_upgrade(req: &Request<ReqBody>) -> bool {
    req.method() == Method::CONNECT
        || (req.headers().contains_key(header::UPGRADE)
            && header_has_token(req.headers(), &header::CONNECTION, "upgrade"))
}

fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), including those the Connection header
/// names, and the proxies' own version marker. `TE: trailers` stays (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names (standard names compare
    // as enum values) instead of a hashed lookup per name.
    let found = h.keys().any(|n| {
        n == header::CONNECTION
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::TE
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
            || n == DOWNSTREAM_VERSION
    });
    if !found {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if n != header::TE {
            h.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        // Between two proxies only: set again by `forward_once` for a peer.
        DOWNSTREAM_VERSION,
    ] {
        h.remove(n);
    }
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// A fast per-thread random number (xorshift128+, seeded from the OS-keyed hasher): for
/// weighted picks and request ids, not for secrets.
pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<(u64, u64)> = std::cell::Cell::new({
            let a = std::collections::hash_map::RandomState::new().build_hasher().finish();
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(a);
            (a | 1, h.finish() | 1)
        });
    }
    STATE.with(|s| {
        let (mut x, y) = s.get();
        x ^= x << 23;
        let next = (y, x ^ y ^ (x >> 17) ^ (y >> 26));
        s.set(next);
        next.1.wrapping_add(y)
    })
}

/// A random request id in UUID v4 form (8-4-4-4-12 hex digits): every request gets one,
/// so it is made byte by byte from two random words with no branch per digit.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&random_u64().to_le_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // variant 10xx
    let mut out = [b'-'; 36];
    // Where each byte's two digits go (the dashes sit at 8, 13, 18 and 23).
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    for (b, at) in bytes.iter().zip(AT) {
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0x0f)];
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

/// (`up` by reference, as in what follows: each level of a request's future that held its
/// own copy of the 208-byte `Upstream` made the whole future, copied at every await and
/// spawn, larger.)
async fn forward(shared: &Shared, req: Request<ReqBody>, up: &Upstream<'_>) -> Response<ProxyBody> {
    if is_upgrade(&req) {
        return Box::pin(forward_upgrade(req, up)).await;
    }
    let downstream_version = req.version();
    let (mut parts, body) = req.into_parts();
    match forward_once(shared, &mut parts, downstream_version, body, up).await {
        Ok(resp) => resp,
        Err(e) => {
            count_failure(shared, up.endpoint, &e);
            upstream_error_reply(e)
        }
    }
}

/// One try: prepares the request head for the upstream (in place: every edit can be made
/// again for the next try, to another endpoint), sends it, and tidies the response, which
/// goes back in the client's HTTP version.
async fn forward_once(
    shared: &Shared,
    parts: &mut Parts,
    downstream_version: Version,
    body: ReqBody,
    up: &Upstream<'_>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    match headers.get_mut(&X_REQUEST_ID) {
        // A value unique to each request: HPACK indexing it would only churn the dynamic
        // table (evicting the headers that repeat), so it is sent as never-indexed.
        Some(v) => v.set_sensitive(true),
        None => {
            let mut v = request_id();
            v.set_sensitive(true);
            headers.insert(X_REQUEST_ID, v);
        }
    }
    // (strip_hop_by_hop took away any marker: from a client, or from a try to a peer.)
    if let Some(v) = up.peer_version {
        headers.insert(DOWNSTREAM_VERSION, HeaderValue::from_static(v));
    }
    if let Err(why) = set_upstream_target(parts, up.h2) {
        return Ok(local_reply(StatusCode::BAD_REQUEST, "DPE", why.to_string()));
    }
    if let Some(ep) = up.endpoint {
        ep.stats.requests.fetch_add(1, Ordering::Relaxed);
        ep.stats.active.fetch_add(1, Ordering::Relaxed);
    }
    let result = send(shared, parts, body, up).await;
    if let Some(ep) = up.endpoint {
        ep.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
    let mut resp = result?;
    strip_hop_by_hop(resp.headers_mut());
    // Response flags are this proxy's own: an upstream's (an app's, or a peer proxy's
    // answer for its own hop) must not pass for them (outlier detection and the
    // `response_flags` metric label read them).
    resp.headers_mut().remove(RESPONSE_FLAGS);
    *resp.version_mut() = downstream_version;
    Ok(resp)
}

/// Counts an upstream failure (every try counts, retried or not).
fn count_failure(shared: &Shared, ep: Option<&Endpoint>, e: &UpstreamError) {
    let connect = matches!(e, UpstreamError::Connect { .. });
    if let Some(ep) = ep {
        ep.stats.errors.fetch_add(1, Ordering::Relaxed);
        if connect {
            ep.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    if connect {
        Stats::inc(&shared.stats.upstream_connect_failures_total);
    }
}

/// Logs and answers the failure that ended a request.
fn upstream_error_reply(e: UpstreamError) -> Response<ProxyBody> {
    tracing::warn!(flags = e.flag(), "{e}");
    let (status, what) = match e {
        UpstreamError::Connect { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error: connection failure",
        ),
        UpstreamError::Request { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers",
        ),
        UpstreamError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
    };
    local_reply(status, e.flag(), what.to_string())
}

/// Rewrites the request line for the upstream's version without re-parsing anything:
/// HTTP/2 wants an absolute URI (the authority travels as `:authority`), HTTP/1.1 an
/// origin-form path and a Host header.
fn set_upstream_target(req: &mut Parts, h2: bool) -> Result<(), &'static str> {
    let uri = std::mem::take(&mut req.uri);
    let mut parts = uri.into_parts();
    if h2 {
        let host = req.headers.remove(header::HOST);
        if parts.authority.is_none() {
            match host
                .as_ref()
                .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            {
                Some(a) => parts.authority = Some(a),
                None => return Err("request has no valid Host or :authority"),
            }
        }
        parts.scheme = Some(http::uri::Scheme::HTTP);
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        req.version = Version::HTTP_2;
    } else {
        if let Some(a) = parts.authority.take() {
            if !req.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    req.headers.insert(header::HOST, v);
                }
            }
        }
        parts.scheme = None;
        req.version = Version::HTTP_11;
    }
    match Uri::from_parts(parts) {
        Ok(u) => {
            req.uri = u;
            Ok(())
        }
        Err(_) => Err("invalid request target"),
    }
}

/// Sends a prepared request head and its body. The lean HTTP/1.1 client encodes straight
/// from the borrowed head; the others take a copy of it.
async fn send(
    shared: &Shared,
    parts: &Parts,
    body: ReqBody,
    up: &Upstream<'_>,
) -> Result<Response<ProxyBody>, UpstreamError> {
    let pools = &shared.pools;
    if up.h2 {
        // (The head is encoded from `parts` as it is: no copy for the HTTP/2 client.)
        return pools
            .send_h2(up.addr, up.dial, up.max_streams, up.tls, parts, body)
            .await
            .map(|r| r.map(ProxyBody::H2));
    }
    let addr = if up.fallbacks.is_empty() {
        up.addr
    } else {
        // Inbound with pod addresses: the app may listen on one of them instead of localhost.
        Box::pin(shared.app_addr(up.addr, up.fallbacks, up.dial.timeout)).await
    };
    // A body the proxy holds in full goes with the lean client; a streaming one needs
    // both directions at once and goes with hyper's.
    // (The lean client speaks plain TCP only: to a peer over mTLS, hyper's.)
    let in_hand = up.tls.is_none()
        && match &body {
            ReqBody::Buffered(_) => true,
            ReqBody::Streaming(b) => http_body::Body::is_end_stream(b),
        };
    let r = if in_hand {
        let body = match body {
            ReqBody::Buffered(b) => b,
            ReqBody::Streaming(_) => None,
        };
        let encoded = crate::h1::encode(parts, body);
        pools
            .send_fast(addr, up.dial, up.idle_timeout, up.max_uses, encoded)
            .await
            .map(|r| r.map(ProxyBody::Fast))
    } else {
        // Boxed: hyper's client is the less usual path, and its future the largest here.
        let req = Request::from_parts(clone_parts(parts), body);
        Box::pin(pools.send_h1(addr, up.dial, up.idle_timeout, up.max_uses, up.tls, req))
            .await
            .map(|r| r.map(ProxyBody::Pooled))
    };
    if up.fallbacks.is_empty() {
        return r;
    }
    if matches!(r, Err(UpstreamError::Connect { .. })) {
        shared.forget_app_addr(up.addr.port());
    }
    r
}

/// Upgrades and CONNECT: the request goes over a fresh HTTP/1.1 connection; once the
/// upstream switches protocols, bytes are copied both ways.
async fn forward_upgrade(mut req: Request<ReqBody>, up: &Upstream<'_>) -> Response<ProxyBody> {
    let downstream = hyper::upgrade::on(&mut req);
    // Keep Connection: upgrade and Upgrade; drop the rest of the hop-by-hop headers.
    let upgrade = req.headers().get(header::UPGRADE).cloned();
    strip_hop_by_hop(req.headers_mut());
    if let Some(u) = upgrade {
        req.headers_mut().insert(header::UPGRADE, u);
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    *req.version_mut() = Version::HTTP_11;
    let is_connect = req.method() == Method::CONNECT;
    let mut sender = match Pools::connect_h1(up.addr, up.dial, up.tls).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(flags = e.flag(), "{e}");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                e.flag(),
                "upstream connect error: connection failure".to_string(),
            );
        }
    };
    let addr = up.addr;
    let sent = async {
        sender.ready().await?;
        sender.send_request(req).await
    };
    let mut resp = match sent.await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(flags = "UC", "upgrade to {addr}: {e}");
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "UC",
                "upstream reset before headers".to_string(),
            );
        }
    };
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS
        || (is_connect && resp.status().is_success());
    if switched {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((d, u)) => {
                    let mut d = TokioIo::new(d);
                    let mut u = TokioIo::new(u);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                        tracing::debug!("upgraded connection to {addr}: {e}");
                    }
                }
                Err(e) => tracing::debug!("upgrade to {addr} failed: {e}"),
            }
        });
    }
    // Flags are the proxy's own word: an upstream cannot set them.
    resp.headers_mut().remove(RESPONSE_FLAGS);
    resp.map(ProxyBody::Upstream)
}

/// A response made by the proxy itself, with its response flag.
pub fn local_reply(status: StatusCode, flag: &'static str, message: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::text(format!("{message}\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(RESPONSE_FLAGS, HeaderValue::from_static(flag));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_as_many_entries_from_the_right_as_there_are_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 203.0.113.9"),
        );
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        let ip = |s: &str| s.parse::<IpAddr>().ok();
        assert_eq!(forwarded_client(&h, 0), None, "nothing trusted");
        assert_eq!(forwarded_client(&h, 1), ip("10.0.0.2"));
        assert_eq!(forwarded_client(&h, 2), ip("203.0.113.9"));
        assert_eq!(forwarded_client(&h, 3), ip("1.1.1.1"));
        assert_eq!(forwarded_client(&h, 4), None, "fewer entries than proxies");
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("[2001:db8::1]:443, unknown"),
        );
        assert_eq!(forwarded_client(&h, 1), None, "not an address");
        assert_eq!(forwarded_client(&h, 2), ip("2001:db8::1"));
        // A client's non-text entry does not hide what the trusted proxy appended.
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"\xff, 203.0.113.9").expect("header"),
        );
        assert_eq!(forwarded_client(&h, 1), ip("203.0.113.9"));
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_static("[2001:db8::1]:443, unknown"),
        );
        append_forwarded_for(&mut h, [192, 0, 2, 7].into());
        assert_eq!(
            h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()),
            Some("[2001:db8::1]:443, unknown, 192.0.2.7")
        );
        let mut empty = HeaderMap::new();
        append_forwarded_for(&mut empty, [192, 0, 2, 7].into());
        assert_eq!(
            empty.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()),
            Some("192.0.2.7")
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-kept"]);
        // The marker alone is enough to be taken away (a client cannot forge it onward).
        let mut m = HeaderMap::new();
        m.insert(DOWNSTREAM_VERSION, HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut m);
        assert!(m.is_empty());
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn request_ids_are_uuid_shaped_and_differ() {
        let a = request_id();
        let b = request_id();
        assert_ne!(a, b);
        let s = a.to_str().expect("ascii");
        assert_eq!(s.len(), 36, "{s}");
        assert_eq!(&s[14..15], "4");
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8, 13, 18, 23]);
        let many: std::collections::HashSet<_> = (0..1000).map(|_| request_id()).collect();
        assert_eq!(many.len(), 1000);
    }
}
