//! The proxy's domain view of a snapshot: wire types ([`trellis_xds::snapshot`]) are
//! converted here, once, into indexed structures the data path reads without parsing
//! anything. A resource that does not convert is rejected with a reason; the snapshot as a
//! whole is refused so that a proxy never runs half of a configuration.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use trellis_api::common::Protocol;
use trellis_api::networking::HttpMatchRequest;
use trellis_policy::route::{Match, Route, RouteTable, Weighted};
use trellis_xds::snapshot::{self as wire, OutboundPolicy};

/// Default time to wait for a client's first bytes.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);
/// Default limit on a request head (Envoy's 60 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
/// Default time allowed to receive a request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout of pooled upstream connections: below the 5 s keep-alive of
/// Node.js and most app servers, so a pooled connection is dropped before the app drops it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How traffic on a port is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1 or HTTP/2 (which one is seen on the wire).
    Http,
    /// HTTP/2 only (grpc, http2, h2c): forwarded as HTTP/2 to the app.
    Http2,
    /// Opaque bytes (tcp, tls, https, mongo, mysql, redis…).
    Tcp,
    /// Not declared: detected from the client's first bytes.
    Detect,
}

impl PortProtocol {
    /// Istio's rules: appProtocol wins, then the explicit protocol, then the port name's
    /// prefix (`http-web`, `grpc`, `tcp-db`…); otherwise detect.
    pub fn declared(
        protocol: Option<Protocol>,
        app_protocol: Option<&str>,
        name: Option<&str>,
    ) -> PortProtocol {
        if let Some(app) = app_protocol {
            if let Some(p) = from_name(app) {
                return p;
            }
        }
        if let Some(p) = protocol {
            return from_protocol(p);
        }
        name.and_then(|n| from_name(n.split('-').next().unwrap_or(n)))
            .unwrap_or(PortProtocol::Detect)
    }
}

fn from_protocol(p: Protocol) -> PortProtocol {
    match p {
        Protocol::Http => PortProtocol::Http,
        Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => PortProtocol::Http2,
        Protocol::HttpProxy => PortProtocol::Http,
        _ => PortProtocol::Tcp,
    }
}

fn from_name(name: &str) -> Option<PortProtocol> {
    match name.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" => Some(PortProtocol::Http2),
        "kubernetes.io/ws" | "kubernetes.io/wss" => Some(PortProtocol::Http),
        n => n.parse::<Protocol>().ok().map(from_protocol),
    }
}

/// Counters of one endpoint; they survive snapshot swaps (looked up by cluster and address
/// when a snapshot is converted).
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub connect_failures: AtomicU64,
    pub active: AtomicU64,
    /// Outlier detection: failures in a row, ejected until (ms on [`now_ms`]'s clock),
    /// and how many times the endpoint was ejected (each ejection lasts longer).
    pub consecutive_failures: std::sync::atomic::AtomicU32,
    pub ejected_until_ms: AtomicU64,
    pub ejections: std::sync::atomic::AtomicU32,
}

impl EndpointStats {
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }
}

/// Milliseconds on a monotonic clock private to the process.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Connection-pool limits of a cluster (Envoy's circuit breakers).
#[derive(Debug)]
pub struct Limits {
    connections: Option<Arc<tokio::sync::Semaphore>>,
    max_pending: usize,
    pending: AtomicUsize,
    requests: Option<Arc<tokio::sync::Semaphore>>,
}

/// Permits held by a request in flight.
#[derive(Debug)]
pub struct Admitted {
    _connection: Option<tokio::sync::OwnedSemaphorePermit>,
    _request: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Outlier detection settings.
#[derive(Debug, Clone, Copy)]
pub struct Outlier {
    pub consecutive_errors: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proxied: bool,
    pub identity: Option<String>,
    pub healthy: bool,
    pub locality: Option<String>,
    pub labels: Vec<(String, String)>,
    pub stats: Arc<EndpointStats>,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub load_balancer: wire::LoadBalancer,
    pub limits: Option<Limits>,
    pub outlier: Option<Outlier>,
    /// Consistent hashing (sticky sessions), when configured.
    pub ring: Option<Ring>,
    next: AtomicUsize,
}

/// What a consistent-hash load balancer hashes.
#[derive(Debug, Clone)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
    Query(String),
}

/// A hash ring: points sorted by hash, each naming an endpoint index.
#[derive(Debug)]
pub struct Ring {
    pub key: HashKey,
    points: Vec<(u64, usize)>,
}

/// A stable hash (same result in every process: SipHash with fixed keys).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    h.write(bytes);
    h.finish()
}

impl Ring {
    fn build(key: HashKey, endpoints: &[Arc<Endpoint>], size: u64) -> Ring {
        let per = size.div_ceil(endpoints.len().max(1) as u64).max(1);
        let mut points = Vec::with_capacity((per as usize) * endpoints.len());
        for (i, e) in endpoints.iter().enumerate() {
            for v in 0..per {
                points.push((stable_hash(format!("{}-{v}", e.addr).as_bytes()), i));
            }
        }
        points.sort_unstable();
        Ring { key, points }
    }
}

impl Cluster {
    /// An endpoint by the cluster's load-balancing policy, among healthy endpoints that
    /// are not ejected (all endpoints when none is, as Envoy's panic threshold does).
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let ok = |e: &&Arc<Endpoint>| e.healthy && !e.stats.ejected(now);
        match self.load_balancer {
            wire::LoadBalancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| &self.endpoints[(start + i) % n])
                    .find(ok)
                    .or_else(|| self.endpoints.get(start % n))
            }
            wire::LoadBalancer::Random | wire::LoadBalancer::LeastRequest => {
                // Random draws over all endpoints, keeping available ones (no allocation
                // in the common case); a scan only when the draws keep missing.
                let mut r = crate::http::random_u64();
                let pick_one = |r: &mut u64| -> Option<usize> {
                    for _ in 0..4 {
                        let i = (*r % n as u64) as usize;
                        *r = r.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
                        if ok(&&self.endpoints[i]) {
                            return Some(i);
                        }
                    }
                    None
                };
                let ia = match pick_one(&mut r) {
                    Some(i) => i,
                    None => {
                        let available: Vec<usize> =
                            (0..n).filter(|i| ok(&&self.endpoints[*i])).collect();
                        if available.is_empty() {
                            (r % n as u64) as usize
                        } else {
                            available[(r % available.len() as u64) as usize]
                        }
                    }
                };
                let a = &self.endpoints[ia];
                if self.load_balancer == wire::LoadBalancer::Random || n == 1 {
                    return Some(a);
                }
                // Power of two choices: the less busy of two different endpoints.
                let ib = match pick_one(&mut r) {
                    Some(i) if i != ia => i,
                    _ => (ia + 1 + (r % (n as u64 - 1)) as usize) % n,
                };
                let b = &self.endpoints[ib];
                if !ok(&b) {
                    return Some(a);
                }
                let busy = |e: &Arc<Endpoint>| e.stats.active.load(Ordering::Relaxed);
                Some(if busy(b) < busy(a) { b } else { a })
            }
        }
    }

    /// The endpoint a hash lands on: the first available one clockwise on the ring.
    pub fn pick_hashed(&self, hash: u64) -> Option<&Arc<Endpoint>> {
        let ring = self.ring.as_ref()?;
        if ring.points.is_empty() {
            return None;
        }
        let now = now_ms();
        let start = ring.points.partition_point(|(h, _)| *h < hash);
        let n = ring.points.len();
        (0..n)
            .map(|k| ring.points[(start + k) % n].1)
            .map(|i| &self.endpoints[i])
            .find(|e| e.healthy && !e.stats.ejected(now))
            .or_else(|| self.endpoints.get(ring.points[start % n].1))
    }

    /// Admits a request under the cluster's limits, waiting only for a pending slot;
    /// `None` means overflow (503 UO).
    pub async fn admit(&self) -> Option<Admitted> {
        let Some(l) = &self.limits else {
            return Some(Admitted {
                _connection: None,
                _request: None,
            });
        };
        let request = match &l.requests {
            None => None,
            Some(s) => Some(Arc::clone(s).try_acquire_owned().ok()?),
        };
        let connection = match &l.connections {
            None => None,
            Some(s) => match Arc::clone(s).try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    if l.pending.fetch_add(1, Ordering::AcqRel) >= l.max_pending {
                        l.pending.fetch_sub(1, Ordering::AcqRel);
                        return None;
                    }
                    let p = Arc::clone(s).acquire_owned().await.ok();
                    l.pending.fetch_sub(1, Ordering::AcqRel);
                    Some(p?)
                }
            },
        };
        Some(Admitted {
            _connection: connection,
            _request: request,
        })
    }

    /// Feeds outlier detection with the outcome of a try.
    pub fn report(&self, ep: &Endpoint, failed: bool) {
        let Some(o) = self.outlier else { return };
        if !failed {
            ep.stats.consecutive_failures.store(0, Ordering::Relaxed);
            return;
        }
        let n = ep
            .stats
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        if o.consecutive_errors == 0 || n < o.consecutive_errors {
            return;
        }
        let now = now_ms();
        let total = self.endpoints.len();
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.stats.ejected(now))
            .count();
        let allowed = (total * o.max_ejection_percent as usize / 100).max(1);
        let available_after = total.saturating_sub(ejected + 1);
        if ejected >= allowed || available_after * 100 < o.min_health_percent as usize * total {
            return;
        }
        let times = ep.stats.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let ms = (o.base_ejection.as_millis() as u64)
            .saturating_mul(u64::from(times))
            .min(300_000);
        ep.stats.ejected_until_ms.store(now + ms, Ordering::Relaxed);
        ep.stats.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(cluster = %self.name, "endpoint {} ejected for {ms} ms after {n} consecutive failures", ep.addr);
    }
}

/// A service port as the outbound path sees it.
#[derive(Debug)]
pub struct Target {
    pub hostname: String,
    pub port: u16,
    pub protocol: PortProtocol,
    /// Where traffic goes when there are no HTTP routes, and TCP traffic always.
    pub cluster: Arc<Cluster>,
    /// HTTP routing rules (a VirtualService's `http[]`), when the port has any.
    pub routes: Option<RouteTable<RouteDest>>,
    /// Per rule (by index): timeout and faults.
    pub route_policies: Vec<RoutePolicy>,
    /// Opaque TCP routing; none matching: `cluster`.
    pub tcp_routes: Vec<L4Route>,
    /// TLS passthrough routing by SNI; none matching: the connection is refused.
    pub tls_routes: Vec<L4Route>,
}

/// A compiled TCP or TLS route.
#[derive(Debug)]
pub struct L4Route {
    pub name: String,
    pub matches: Vec<L4Match>,
    pub destinations: Vec<Weighted<RouteDest>>,
    total_weight: u32,
}

/// Conditions on a connection (all must hold).
#[derive(Debug)]
pub struct L4Match {
    pub subnets: Vec<(IpAddr, u8)>,
    pub port: Option<u16>,
    pub source_labels: Vec<(String, String)>,
    pub source_namespace: Option<String>,
    /// Lowercase; `*.example.com` matches one or more labels in front.
    pub sni_hosts: Vec<String>,
}

/// What a connection looks like to TCP and TLS routes.
#[derive(Debug)]
pub struct L4Request<'a> {
    pub dst: Option<SocketAddr>,
    pub port: u16,
    pub sni: Option<&'a str>,
    pub source_labels: &'a std::collections::BTreeMap<String, String>,
    pub source_namespace: &'a str,
}

fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn sni_matches(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => sni.ends_with(suffix) && sni.len() > suffix.len(),
        None => pattern == sni,
    }
}

impl L4Match {
    pub fn matches(&self, req: &L4Request<'_>) -> bool {
        if !self.subnets.is_empty()
            && !req
                .dst
                .is_some_and(|d| self.subnets.iter().any(|(n, p)| in_subnet(d.ip(), *n, *p)))
        {
            return false;
        }
        if self.port.is_some_and(|p| p != req.port) {
            return false;
        }
        if !self
            .source_labels
            .iter()
            .all(|(k, v)| req.source_labels.get(k) == Some(v))
        {
            return false;
        }
        if self
            .source_namespace
            .as_deref()
            .is_some_and(|n| n != req.source_namespace)
        {
            return false;
        }
        if !self.sni_hosts.is_empty()
            && !req
                .sni
                .is_some_and(|sni| self.sni_hosts.iter().any(|h| sni_matches(h, sni)))
        {
            return false;
        }
        true
    }
}

/// The first route whose match entries (alternatives) hold, and its weighted pick.
pub fn pick_l4<'a>(
    routes: &'a [L4Route],
    req: &L4Request<'_>,
) -> Option<(&'a L4Route, &'a RouteDest)> {
    let route = routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))?;
    let mut point = (crate::http::random_u64() % u64::from(route.total_weight.max(1))) as u32;
    for d in &route.destinations {
        if point < d.weight {
            return Some((route, &d.destination));
        }
        point -= d.weight;
    }
    route.destinations.last().map(|d| (route, &d.destination))
}

fn compile_l4(
    resource: &str,
    what: &str,
    routes: &[wire::L4Route],
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<Vec<L4Route>, ConfigError> {
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let path = format!("{what}[{i}]");
        if r.clusters.is_empty() {
            return Err(bad(
                resource,
                format!("{path}: a route needs at least one cluster"),
            ));
        }
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let mut subnets = Vec::with_capacity(m.destination_subnets.len());
            for c in &m.destination_subnets {
                let (addr, prefix) = c.split_once('/').unwrap_or((c, ""));
                let ip: IpAddr = addr.parse().map_err(|_| {
                    bad(resource, format!("{path}.match[{j}]: {c:?} is not a CIDR"))
                })?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let prefix = if prefix.is_empty() {
                    max
                } else {
                    prefix
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or_else(|| {
                            bad(resource, format!("{path}.match[{j}]: {c:?} is not a CIDR"))
                        })?
                };
                subnets.push((ip, prefix));
            }
            let port = m
                .port
                .map(|p| port_u16(&format!("{resource} {path}.match[{j}]"), p))
                .transpose()?;
            matches.push(L4Match {
                subnets,
                port,
                source_labels: m
                    .source_labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                source_namespace: m.source_namespace.clone(),
                sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            });
        }
        let lone = r.clusters.len() == 1;
        let destinations: Vec<Weighted<RouteDest>> = r
            .clusters
            .iter()
            .map(|w| Weighted {
                weight: if lone && w.weight == 0 { 1 } else { w.weight },
                destination: RouteDest {
                    name: w.cluster.clone(),
                    cluster: clusters.get(w.cluster.as_str()).cloned(),
                },
            })
            .collect();
        let total_weight = destinations.iter().map(|d| d.weight).sum();
        out.push(L4Route {
            name: if r.name.is_empty() {
                format!("#{i}")
            } else {
                r.name.clone()
            },
            matches,
            destinations,
            total_weight,
        });
    }
    Ok(out)
}

/// What a route does besides choosing a cluster.
#[derive(Debug, Clone, Default)]
pub struct RoutePolicy {
    /// Bounds the whole request, injected delay included.
    pub timeout: Option<Duration>,
    /// Delay and the share of requests (0..100) it applies to.
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<Abort>,
    /// Answer without an upstream.
    pub action: Option<LocalAction>,
    pub rewrite: Option<Rewrite>,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    /// `None`: Istio's default policy.
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<Mirror>,
    pub rate_limit: Option<Arc<crate::ratelimit::TokenBucket>>,
    pub cors: Option<Cors>,
}

/// A compiled CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: Vec<trellis_policy::route::StrMatch>,
    pub allow_methods: Option<http::HeaderValue>,
    pub allow_headers: Option<http::HeaderValue>,
    pub expose_headers: Option<http::HeaderValue>,
    pub max_age: Option<http::HeaderValue>,
    pub allow_credentials: bool,
}

impl Cors {
    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }
}

fn cors(resource: &str, path: &str, c: &wire::CorsPolicy) -> Result<Cors, ConfigError> {
    let list = |field: &str, v: &[String]| -> Result<Option<http::HeaderValue>, ConfigError> {
        if v.is_empty() {
            return Ok(None);
        }
        http::HeaderValue::from_str(&v.join(","))
            .map(Some)
            .map_err(|_| {
                bad(
                    resource,
                    format!("{path}.cors.{field}: invalid header value"),
                )
            })
    };
    let mut origins = Vec::with_capacity(c.allow_origins.len());
    for (i, o) in c.allow_origins.iter().enumerate() {
        let api = trellis_api::common::StringMatch {
            exact: o.exact.clone(),
            prefix: o.prefix.clone(),
            regex: o.regex.clone(),
        };
        origins.push(
            trellis_policy::route::StrMatch::compile(
                &api,
                false,
                &format!("{path}.cors.allowOrigins[{i}]"),
            )
            .map_err(|e| bad(resource, e.to_string()))?,
        );
    }
    let max_age = c
        .max_age
        .as_ref()
        .map(|d| duration(resource, Some(d), Duration::ZERO))
        .transpose()?
        .map(|d| http::HeaderValue::from(d.as_secs()));
    Ok(Cors {
        origins,
        allow_methods: list("allowMethods", &c.allow_methods)?,
        allow_headers: list("allowHeaders", &c.allow_headers)?,
        expose_headers: list("exposeHeaders", &c.expose_headers)?,
        max_age,
        allow_credentials: c.allow_credentials.unwrap_or(false),
    })
}

/// A token bucket from the snapshot, checked once per snapshot.
fn rate_limit(
    resource: &str,
    path: &str,
    rl: Option<&wire::RateLimit>,
) -> Result<Option<Arc<crate::ratelimit::TokenBucket>>, ConfigError> {
    let Some(rl) = rl else { return Ok(None) };
    if rl.max_tokens == 0 || rl.tokens_per_fill == 0 {
        return Err(bad(
            resource,
            format!("{path}.rateLimit: maxTokens and tokensPerFill must be at least 1"),
        ));
    }
    let interval = duration(resource, rl.fill_interval.as_ref(), Duration::ZERO)?;
    if interval < Duration::from_millis(1) {
        return Err(bad(
            resource,
            format!("{path}.rateLimit.fillInterval must be at least 1ms"),
        ));
    }
    Ok(Some(Arc::new(crate::ratelimit::TokenBucket::new(
        rl.max_tokens,
        rl.tokens_per_fill,
        interval,
    ))))
}

/// Where copies of requests go.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// `None` when the snapshot does not define the cluster (nothing is sent).
    pub cluster: Option<Arc<Cluster>>,
    /// Share of requests (0..100).
    pub percentage: f64,
}

/// Largest request body buffered so that a retry can send it again; larger (or
/// unknown-length, streaming) bodies go out once.
pub const MAX_RETRY_BODY: u64 = 64 * 1024;

/// When and how often a request is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first try (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub backoff: Duration,
    pub on: RetryOn,
}

/// Istio's `retryOn` conditions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub status_codes: Vec<u16>,
    /// gRPC status codes (cancelled 1, deadline-exceeded 4, resource-exhausted 8,
    /// internal 13, unavailable 14).
    pub grpc: Vec<u8>,
}

impl RetryPolicy {
    /// Istio's default for HTTP routes: 2 retries on connect-failure, refused-stream,
    /// unavailable, cancelled and retriable-status-codes 503.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            backoff: Duration::from_millis(25),
            on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                status_codes: vec![503],
                grpc: vec![14, 1],
                ..RetryOn::default()
            },
        }
    }

    /// Parses Istio's `retryOn` list.
    pub fn parse_retry_on(s: &str) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for cond in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" | "reset-before-request" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => {}
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                other => match other.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => on.status_codes.push(code),
                    _ => return Err(format!("{other:?} is not a retryOn condition")),
                },
            }
        }
        Ok(on)
    }
}
#[derive(Debug, Clone)]
pub enum LocalAction {
    Direct {
        status: u16,
        body: bytes::Bytes,
    },
    Redirect {
        code: u16,
        uri: Option<String>,
        authority: Option<String>,
        scheme: Option<String>,
        port: Option<u16>,
    },
}

/// Changes to the request before it goes upstream.
#[derive(Debug, Clone)]
pub struct Rewrite {
    pub uri: Option<String>,
    pub authority: Option<http::HeaderValue>,
    pub uri_regex: Option<(regex::Regex, String)>,
}

/// Header changes, validated once per snapshot.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderOps {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

fn header_ops(resource: &str, path: &str, ops: &wire::HeaderOps) -> Result<HeaderOps, ConfigError> {
    let name = |n: &str| {
        http::HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| bad(resource, format!("{path}: invalid header name {n:?}")))
    };
    let value = |v: &str| {
        http::HeaderValue::from_str(v)
            .map_err(|_| bad(resource, format!("{path}: invalid header value {v:?}")))
    };
    Ok(HeaderOps {
        set: ops
            .set
            .iter()
            .map(|(n, v)| Ok((name(n)?, value(v)?)))
            .collect::<Result<_, ConfigError>>()?,
        add: ops
            .add
            .iter()
            .map(|(n, v)| Ok((name(n)?, value(v)?)))
            .collect::<Result<_, ConfigError>>()?,
        remove: ops
            .remove
            .iter()
            .map(|n| name(n))
            .collect::<Result<_, _>>()?,
    })
}

/// An injected failure.
#[derive(Debug, Clone, Copy)]
pub struct Abort {
    pub kind: AbortKind,
    /// Share of requests (0..100).
    pub percentage: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortKind {
    Http(u16),
    /// A gRPC status code: answered as a trailers-only gRPC response.
    Grpc(u8),
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn route_policy(
    resource: &str,
    path: &str,
    r: &wire::HttpRoute,
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<RoutePolicy, ConfigError> {
    let pct = |field: &str, p: Option<f64>| match p {
        None => Ok(100.0),
        Some(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Some(p) => Err(bad(
            resource,
            format!("{path}.{field}: percentage {p} must be in 0..100"),
        )),
    };
    let timeout = r
        .timeout
        .as_ref()
        .map(|d| duration(resource, Some(d), Duration::ZERO))
        .transpose()?;
    let mut policy = RoutePolicy {
        timeout,
        ..RoutePolicy::default()
    };
    if let Some(d) = &r.direct_response {
        let status = u16::try_from(d.status)
            .ok()
            .filter(|s| (200..=599).contains(s))
            .ok_or_else(|| {
                bad(
                    resource,
                    format!(
                        "{path}.directResponse.status: {} must be in 200..599",
                        d.status
                    ),
                )
            })?;
        policy.action = Some(LocalAction::Direct {
            status,
            body: bytes::Bytes::from(d.body.clone().unwrap_or_default()),
        });
    }
    if let Some(rd) = &r.redirect {
        if policy.action.is_some() {
            return Err(bad(
                resource,
                format!("{path}: only one of directResponse or redirect"),
            ));
        }
        let code = rd.redirect_code.unwrap_or(301);
        if !(300..=399).contains(&code) {
            return Err(bad(
                resource,
                format!("{path}.redirect.redirectCode: {code} is not a redirect code"),
            ));
        }
        let port = rd
            .port
            .map(|p| {
                u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                    bad(
                        resource,
                        format!("{path}.redirect.port: {p} must be in 1..65535"),
                    )
                })
            })
            .transpose()?;
        policy.action = Some(LocalAction::Redirect {
            code: code as u16,
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
            port,
        });
    }
    if let Some(rw) = &r.rewrite {
        let authority = rw
            .authority
            .as_deref()
            .map(|a| {
                http::HeaderValue::from_str(a)
                    .map_err(|_| bad(resource, format!("{path}.rewrite.authority: invalid {a:?}")))
            })
            .transpose()?;
        let uri_regex = match (&rw.uri_regex, &rw.uri_regex_replacement) {
            (None, None) => None,
            (Some(re), Some(rep)) => Some((
                regex::RegexBuilder::new(re)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| bad(resource, format!("{path}.rewrite.uriRegex: {e}")))?,
                rep.clone(),
            )),
            _ => {
                return Err(bad(
                    resource,
                    format!("{path}.rewrite: uriRegex and uriRegexReplacement go together"),
                ));
            }
        };
        if rw.uri.is_some() && uri_regex.is_some() {
            return Err(bad(
                resource,
                format!("{path}.rewrite: only one of uri or uriRegex"),
            ));
        }
        policy.rewrite = Some(Rewrite {
            uri: rw.uri.clone(),
            authority,
            uri_regex,
        });
    }
    policy.rate_limit = rate_limit(resource, path, r.rate_limit.as_ref())?;
    policy.cors = r
        .cors
        .as_ref()
        .map(|c| cors(resource, path, c))
        .transpose()?;
    for (i, m) in r.mirrors.iter().enumerate() {
        policy.mirrors.push(Mirror {
            cluster: clusters.get(m.cluster.as_str()).cloned(),
            percentage: pct(&format!("mirrors[{i}].percentage"), m.percentage)?,
        });
    }
    if let Some(rp) = &r.retries {
        let on = match rp.retry_on.as_deref() {
            None => RetryPolicy::istio_default().on,
            Some(s) => RetryPolicy::parse_retry_on(s)
                .map_err(|e| bad(resource, format!("{path}.retries.retryOn: {e}")))?,
        };
        policy.retry = Some(RetryPolicy {
            attempts: rp.attempts,
            per_try_timeout: rp
                .per_try_timeout
                .as_ref()
                .map(|d| duration(resource, Some(d), Duration::ZERO))
                .transpose()?,
            backoff: duration(resource, rp.backoff.as_ref(), Duration::from_millis(25))?,
            on,
        });
    }
    if let Some(h) = &r.request_headers {
        policy.request_headers = Some(header_ops(resource, &format!("{path}.requestHeaders"), h)?);
    }
    if let Some(h) = &r.response_headers {
        policy.response_headers =
            Some(header_ops(resource, &format!("{path}.responseHeaders"), h)?);
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let Some(fixed) = &d.fixed_delay else {
                return Err(bad(
                    resource,
                    format!("{path}.fault.delay: fixedDelay is required"),
                ));
            };
            let fixed = duration(resource, Some(fixed), Duration::ZERO)?;
            policy.delay = Some((fixed, pct("fault.delay.percentage", d.percentage)?));
        }
        if let Some(a) = &f.abort {
            let kind = match (a.http_status, &a.grpc_status) {
                (Some(s), None) if (200..=599).contains(&s) => AbortKind::Http(s as u16),
                (Some(s), None) => {
                    return Err(bad(
                        resource,
                        format!("{path}.fault.abort.httpStatus: {s} must be in 200..599"),
                    ));
                }
                (None, Some(g)) => {
                    let code = GRPC_CODES
                        .iter()
                        .position(|c| c.eq_ignore_ascii_case(g))
                        .or_else(|| g.parse::<usize>().ok().filter(|n| *n < GRPC_CODES.len()));
                    match code {
                        Some(c) => AbortKind::Grpc(c as u8),
                        None => {
                            return Err(bad(
                                resource,
                                format!(
                                    "{path}.fault.abort.grpcStatus: {g:?} is not a gRPC status"
                                ),
                            ));
                        }
                    }
                }
                _ => {
                    return Err(bad(
                        resource,
                        format!("{path}.fault.abort: exactly one of httpStatus or grpcStatus"),
                    ));
                }
            };
            policy.abort = Some(Abort {
                kind,
                percentage: pct("fault.abort.percentage", a.percentage)?,
            });
        }
    }
    Ok(policy)
}

/// Where a route sends traffic: a cluster, or a name the snapshot does not define (the
/// request then gets 503 NR and a log line naming the route, as a route to a missing
/// subset does in Istio).
#[derive(Debug)]
pub struct RouteDest {
    pub name: String,
    pub cluster: Option<Arc<Cluster>>,
}

#[derive(Debug, Clone)]
pub struct InboundPort {
    pub port: u16,
    pub target_port: u16,
    pub protocol: PortProtocol,
    pub rate_limit: Option<Arc<crate::ratelimit::TokenBucket>>,
}

/// A converted snapshot.
#[derive(Debug)]
pub struct Config {
    pub version: String,
    pub outbound_policy: OutboundPolicy,
    /// Service virtual IP and port → target.
    by_vip: HashMap<SocketAddr, Arc<Target>>,
    /// Endpoint address → target (an app that dialled a pod address directly).
    by_endpoint: HashMap<SocketAddr, Arc<Target>>,
    /// Name → port → target, for explicit listeners. Every name a service answers to is
    /// here: the FQDN and its leading parts (`reviews`, `reviews.default`,
    /// `reviews.default.svc`); a short name two services share is left out.
    by_name: HashMap<String, HashMap<u16, Arc<Target>>>,
    pub clusters: Vec<Arc<Cluster>>,
    pub inbound: HashMap<u16, InboundPort>,
    pub workload: Option<wire::Workload>,
    /// The pod's addresses, where an app that does not listen on 127.0.0.1 is looked for.
    pub pod_ips: Vec<IpAddr>,
    /// This workload's labels and namespace: the source of its outbound requests, for
    /// routes that match on sourceLabels and sourceNamespace.
    pub own_labels: std::collections::BTreeMap<String, String>,
    pub own_namespace: String,
    /// Default upstream connect timeout (settings.connectTimeout).
    pub connect_timeout: Duration,
    pub detection_timeout: Duration,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// The wire form, for `/config_dump`.
    pub raw: wire::Snapshot,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct ConfigError {
    /// Which resource, e.g. `clusters[2] "outbound|9080||reviews"`.
    pub resource: String,
    pub reason: String,
}

fn bad(resource: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        resource: resource.into(),
        reason: reason.into(),
    }
}

/// Compiles a port's HTTP routes; a bad match (say, an invalid regex) refuses the
/// snapshot, a route to an undefined cluster does not (it answers 503 NR).
fn compile_routes(
    resource: &str,
    port: u16,
    routes: &[wire::HttpRoute],
    clusters: &HashMap<&str, Arc<Cluster>>,
) -> Result<RouteTable<RouteDest>, ConfigError> {
    let sm = |m: &wire::StringMatch| trellis_api::common::StringMatch {
        exact: m.exact.clone(),
        prefix: m.prefix.clone(),
        regex: m.regex.clone(),
    };
    let map = |m: &std::collections::BTreeMap<String, wire::StringMatch>| {
        m.iter().map(|(k, v)| (k.clone(), sm(v))).collect()
    };
    let mut compiled = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let path = format!("port {port} httpRoutes[{i}]");
        let mut matches = Vec::with_capacity(r.matches.len());
        for (j, m) in r.matches.iter().enumerate() {
            let api = HttpMatchRequest {
                name: m.name.clone(),
                uri: m.uri.as_ref().map(sm),
                scheme: m.scheme.as_ref().map(sm),
                method: m.method.as_ref().map(sm),
                authority: m.authority.as_ref().map(sm),
                headers: map(&m.headers),
                without_headers: map(&m.without_headers),
                query_params: map(&m.query_params),
                port: m.port,
                source_labels: m.source_labels.clone(),
                source_namespace: m.source_namespace.clone(),
                ignore_uri_case: Some(m.ignore_uri_case),
                ..HttpMatchRequest::default()
            };
            matches.push(
                Match::compile(&api, &format!("{path}.match[{j}]"))
                    .map_err(|e| bad(resource, e.to_string()))?,
            );
        }
        if r.clusters.is_empty() && r.direct_response.is_none() && r.redirect.is_none() {
            return Err(bad(
                resource,
                format!("{path}: a route needs clusters, a directResponse or a redirect"),
            ));
        }
        let lone = r.clusters.len() == 1;
        let destinations = r
            .clusters
            .iter()
            .map(|w| Weighted {
                weight: if lone && w.weight == 0 { 1 } else { w.weight },
                destination: RouteDest {
                    name: w.cluster.clone(),
                    cluster: clusters.get(w.cluster.as_str()).cloned(),
                },
            })
            .collect();
        let name = if r.name.is_empty() {
            format!("#{i}")
        } else {
            r.name.clone()
        };
        compiled.push(Route::new(name, i, matches, destinations));
    }
    Ok(RouteTable::new(compiled))
}

/// A wire duration, or the default when absent; negative or malformed ones are refused.
fn duration(
    resource: &str,
    d: Option<&prost_types::Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match d {
        None => Ok(default),
        Some(d) => wire::to_std(d).ok_or_else(|| {
            bad(
                resource,
                format!("invalid duration {}s {}ns", d.seconds, d.nanos),
            )
        }),
    }
}

/// A wire protocol enum value (`None` when unset or unspecified).
fn protocol(resource: &str, p: Option<i32>) -> Result<Option<Protocol>, ConfigError> {
    match p {
        None => Ok(None),
        Some(v) => wire::Protocol::try_from(v)
            .map(wire::Protocol::to_api)
            .map_err(|_| bad(resource, format!("unknown protocol value {v}"))),
    }
}

fn port_u16(resource: &str, p: u32) -> Result<u16, ConfigError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(resource, format!("port {p} must be in 1..65535")))
}

impl Config {
    /// Converts a wire snapshot. `previous` lends its endpoint counters to endpoints that
    /// are still there.
    pub fn from_wire(
        raw: wire::Snapshot,
        previous: Option<&Config>,
    ) -> Result<Config, ConfigError> {
        let old_stats: HashMap<(&str, SocketAddr), &Arc<EndpointStats>> = previous
            .map(|p| {
                p.clusters
                    .iter()
                    .flat_map(|c| {
                        c.endpoints
                            .iter()
                            .map(move |e| ((c.name.as_str(), e.addr), &e.stats))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let settings = raw.settings.clone().unwrap_or_default();
        let default_connect = duration(
            "settings.connectTimeout",
            settings.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let outbound_policy =
            OutboundPolicy::try_from(raw.outbound_traffic_policy).map_err(|_| {
                bad(
                    "outboundTrafficPolicy",
                    format!("unknown value {}", raw.outbound_traffic_policy),
                )
            })?;

        let mut clusters: HashMap<&str, Arc<Cluster>> = HashMap::new();
        for (i, c) in raw.clusters.iter().enumerate() {
            let res = format!("clusters[{i}] {:?}", c.name);
            if c.name.is_empty() {
                return Err(bad(res, "cluster name must not be empty"));
            }
            let mut endpoints = Vec::with_capacity(c.endpoints.len());
            for (j, e) in c.endpoints.iter().enumerate() {
                let eres = format!("{res} endpoints[{j}]");
                let addr: SocketAddr = e
                    .address
                    .parse()
                    .map_err(|_| bad(&eres, format!("address {:?} is not ip:port", e.address)))?;
                let stats = old_stats
                    .get(&(c.name.as_str(), addr))
                    .map(|s| Arc::clone(s))
                    .unwrap_or_default();
                endpoints.push(Arc::new(Endpoint {
                    addr,
                    proxied: e.proxied,
                    identity: e.identity.clone(),
                    healthy: e.healthy.unwrap_or(true),
                    locality: e.locality.clone(),
                    labels: e
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    stats,
                }));
            }
            let load_balancer = wire::LoadBalancer::try_from(c.load_balancer)
                .map_err(|_| bad(&res, format!("unknown load balancer {}", c.load_balancer)))?;
            let limits = c.circuit_breakers.as_ref().map(|cb| Limits {
                connections: cb
                    .max_connections
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
                max_pending: cb.max_pending_requests.map_or(usize::MAX, |n| n as usize),
                pending: AtomicUsize::new(0),
                requests: cb
                    .max_requests
                    .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
            });
            let outlier = match &c.outlier_detection {
                None => None,
                Some(o) => {
                    let pct = |v: Option<u32>, d: u32, f: &str| match v.unwrap_or(d) {
                        p if p <= 100 => Ok(p),
                        p => Err(bad(
                            &res,
                            format!("outlierDetection.{f}: {p} must be 0..100"),
                        )),
                    };
                    Some(Outlier {
                        consecutive_errors: o.consecutive_5xx_errors.unwrap_or(5),
                        base_ejection: duration(
                            &res,
                            o.base_ejection_time.as_ref(),
                            Duration::from_secs(30),
                        )?,
                        max_ejection_percent: pct(
                            o.max_ejection_percent,
                            10,
                            "maxEjectionPercent",
                        )?,
                        min_health_percent: pct(o.min_health_percent, 0, "minHealthPercent")?,
                    })
                }
            };
            let ring = match &c.consistent_hash {
                None => None,
                Some(ch) => {
                    let key = match (
                        &ch.http_header_name,
                        &ch.http_cookie,
                        ch.use_source_ip,
                        &ch.http_query_parameter_name,
                    ) {
                        (Some(h), None, None | Some(false), None) => HashKey::Header(
                            http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                                bad(
                                    &res,
                                    format!("consistentHash.httpHeaderName: invalid header {h:?}"),
                                )
                            })?,
                        ),
                        (None, Some(c), None | Some(false), None) => HashKey::Cookie(c.clone()),
                        (None, None, Some(true), None) => HashKey::SourceIp,
                        (None, None, None | Some(false), Some(q)) => HashKey::Query(q.clone()),
                        _ => {
                            return Err(bad(
                                &res,
                                "consistentHash: exactly one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
                            ));
                        }
                    };
                    let size = ch.minimum_ring_size.unwrap_or(1024).clamp(1, 1 << 20);
                    Some(Ring::build(key, &endpoints, size))
                }
            };
            let cluster = Arc::new(Cluster {
                ring,
                name: c.name.clone(),
                endpoints,
                connect_timeout: duration(&res, c.connect_timeout.as_ref(), default_connect)?,
                idle_timeout: duration(&res, c.idle_timeout.as_ref(), DEFAULT_IDLE_TIMEOUT)?,
                load_balancer,
                limits,
                outlier,
                next: AtomicUsize::new(0),
            });
            if clusters.insert(c.name.as_str(), cluster).is_some() {
                return Err(bad(res, "duplicate cluster name"));
            }
        }

        let mut by_vip = HashMap::new();
        let mut by_endpoint = HashMap::new();
        let mut by_name: HashMap<String, HashMap<u16, Arc<Target>>> = HashMap::new();
        let mut ambiguous: std::collections::HashSet<(String, u16)> =
            std::collections::HashSet::new();
        for (i, s) in raw.services.iter().enumerate() {
            let res = format!("services[{i}] {:?}", s.hostname);
            if s.hostname.is_empty() {
                return Err(bad(res, "hostname must not be empty"));
            }
            let vips: Vec<IpAddr> = s
                .addresses
                .iter()
                .map(|a| {
                    a.parse()
                        .map_err(|_| bad(&res, format!("address {a:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?;
            for p in &s.ports {
                let port = port_u16(&res, p.port)?;
                let cluster = clusters.get(p.cluster.as_str()).ok_or_else(|| {
                    bad(
                        &res,
                        format!("port {port}: cluster {:?} is not defined", p.cluster),
                    )
                })?;
                let routes = if p.http_routes.is_empty() {
                    None
                } else {
                    Some(compile_routes(&res, port, &p.http_routes, &clusters)?)
                };
                let route_policies = p
                    .http_routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        route_policy(&res, &format!("port {port} httpRoutes[{i}]"), r, &clusters)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let tcp_routes = compile_l4(
                    &res,
                    &format!("port {port} tcpRoutes"),
                    &p.tcp_routes,
                    &clusters,
                )?;
                let tls_routes = compile_l4(
                    &res,
                    &format!("port {port} tlsRoutes"),
                    &p.tls_routes,
                    &clusters,
                )?;
                let target = Arc::new(Target {
                    routes,
                    route_policies,
                    tcp_routes,
                    tls_routes,
                    hostname: s.hostname.clone(),
                    port,
                    protocol: PortProtocol::declared(
                        protocol(&res, p.protocol)?,
                        p.app_protocol.as_deref(),
                        p.name.as_deref(),
                    ),
                    cluster: Arc::clone(cluster),
                });
                for ip in &vips {
                    by_vip.insert(SocketAddr::new(*ip, port), Arc::clone(&target));
                }
                for e in &cluster.endpoints {
                    by_endpoint
                        .entry(e.addr)
                        .or_insert_with(|| Arc::clone(&target));
                }
                by_name
                    .entry(s.hostname.clone())
                    .or_default()
                    .insert(port, Arc::clone(&target));
                // Shorter names: every proper prefix made of whole labels.
                let mut end = s.hostname.len();
                while let Some(dot) = s.hostname[..end].rfind('.') {
                    end = dot;
                    let alias = &s.hostname[..end];
                    let ports = by_name.entry(alias.to_string()).or_default();
                    match ports.get(&port) {
                        Some(existing) if existing.hostname != target.hostname => {
                            ambiguous.insert((alias.to_string(), port));
                        }
                        _ => {
                            ports.insert(port, Arc::clone(&target));
                        }
                    }
                }
            }
        }

        let mut inbound = HashMap::new();
        let mut pod_ips = Vec::new();
        if let Some(w) = &raw.workload {
            for a in &w.addresses {
                pod_ips.push(a.parse().map_err(|_| {
                    bad("workload.addresses", format!("{a:?} is not an IP address"))
                })?);
            }
            for (i, p) in w.inbound_ports.iter().enumerate() {
                let res = format!("workload.inboundPorts[{i}]");
                let port = port_u16(&res, p.port)?;
                let target_port = port_u16(&res, p.target_port.unwrap_or(p.port))?;
                inbound.insert(
                    port,
                    InboundPort {
                        port,
                        target_port,
                        protocol: PortProtocol::declared(
                            protocol(&res, p.protocol)?,
                            p.app_protocol.as_deref(),
                            p.name.as_deref(),
                        ),
                        rate_limit: rate_limit(&res, "", p.rate_limit.as_ref())?,
                    },
                );
            }
        }
        // Ambiguous short names resolve to nothing rather than to a random service (an
        // FQDN is never ambiguous: it is its own service).
        for (alias, port) in ambiguous {
            if let Some(ports) = by_name.get_mut(&alias) {
                if ports.get(&port).is_some_and(|t| t.hostname != alias) {
                    ports.remove(&port);
                }
            }
        }
        let max_header_bytes = settings
            .max_request_header_bytes
            .map_or(DEFAULT_MAX_HEADER_BYTES, |b| b as usize);
        if max_header_bytes < 8192 {
            return Err(bad(
                "settings.maxRequestHeaderBytes",
                "must be at least 8192",
            ));
        }
        let mut cluster_list: Vec<Arc<Cluster>> = clusters.into_values().collect();
        cluster_list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Config {
            version: raw.version.clone(),
            outbound_policy,
            by_vip,
            by_endpoint,
            by_name,
            clusters: cluster_list,
            inbound,
            workload: raw.workload.clone(),
            pod_ips,
            own_labels: raw
                .workload
                .as_ref()
                .map(|w| w.labels.clone())
                .unwrap_or_default(),
            own_namespace: raw
                .workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            connect_timeout: default_connect,
            detection_timeout: duration(
                "settings.protocolDetectionTimeout",
                settings.protocol_detection_timeout.as_ref(),
                DEFAULT_DETECTION_TIMEOUT,
            )?,
            max_header_bytes,
            header_timeout: duration(
                "settings.requestHeaderTimeout",
                settings.request_header_timeout.as_ref(),
                DEFAULT_HEADER_TIMEOUT,
            )?,
            raw,
        })
    }

    /// The target of an intercepted outbound connection: by service virtual IP, else by
    /// endpoint address.
    pub fn outbound_target(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.by_vip.get(&dst).or_else(|| self.by_endpoint.get(&dst))
    }

    /// The target named by an explicit listener: `reviews`, `reviews.default`, or the FQDN.
    pub fn target_by_name(&self, name: &str, port: u16) -> Option<&Arc<Target>> {
        self.by_name.get(name)?.get(&port)
    }

    /// The workload port `port` as declared, or undeclared (detected protocol, same
    /// port on the app).
    pub fn inbound_port(&self, port: u16) -> InboundPort {
        self.inbound.get(&port).cloned().unwrap_or(InboundPort {
            port,
            target_port: port,
            protocol: PortProtocol::Detect,
            rate_limit: None,
        })
    }

    /// Where the app behind inbound `port` is first tried.
    pub fn app_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            self.inbound_port(port).target_port,
        )
    }
}

impl Config {
    /// An empty configuration (no services; unknown destinations pass through).
    pub fn empty() -> Config {
        Config {
            version: String::new(),
            outbound_policy: OutboundPolicy::AllowAny,
            by_vip: HashMap::new(),
            by_endpoint: HashMap::new(),
            by_name: HashMap::new(),
            clusters: Vec::new(),
            inbound: HashMap::new(),
            workload: None,
            pod_ips: Vec::new(),
            own_labels: std::collections::BTreeMap::new(),
            own_namespace: "default".to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            detection_timeout: DEFAULT_DETECTION_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            raw: wire::Snapshot::default(),
        }
    }
}

/// Loads and converts a snapshot file; the error says which line or resource is wrong.
pub fn load_file(path: &std::path::Path, previous: Option<&Config>) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let raw =
        wire::Snapshot::from_text(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    Config::from_wire(raw, previous).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Result<Config, String> {
        let raw = wire::Snapshot::from_text(text, "s.yaml").map_err(|e| e.to_string())?;
        Config::from_wire(raw, None).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
version: "1"
services:
- hostname: reviews.default.svc.cluster.local
  addresses: [240.240.0.1]
  ports: [{port: 9080, name: http-web, cluster: reviews}]
- hostname: db.default.svc.cluster.local
  ports: [{port: 5432, name: tcp-pg, cluster: db}]
clusters:
- name: reviews
  endpoints: [{address: "10.0.0.1:9080", proxied: true}, {address: "10.0.0.2:9080", healthy: false}]
- name: db
  endpoints: [{address: "10.0.0.3:5432"}]
"#;

    #[test]
    fn indexes_by_vip_endpoint_and_name() {
        let c = snap(GOOD).expect("good");
        let vip: SocketAddr = "240.240.0.1:9080".parse().expect("addr");
        assert_eq!(
            c.outbound_target(vip).map(|t| t.hostname.as_str()),
            Some("reviews.default.svc.cluster.local")
        );
        let ep: SocketAddr = "10.0.0.3:5432".parse().expect("addr");
        assert_eq!(
            c.outbound_target(ep).map(|t| t.protocol),
            Some(PortProtocol::Tcp)
        );
        assert!(c.target_by_name("reviews", 9080).is_some());
        assert!(c.target_by_name("reviews.default", 9080).is_some());
        assert!(c.target_by_name("reviews", 9081).is_none());
        let t = c.target_by_name("reviews", 9080).expect("target");
        assert_eq!(t.protocol, PortProtocol::Http);
        // Round robin skips the unhealthy endpoint.
        for _ in 0..4 {
            assert_eq!(t.cluster.pick().map(|e| e.addr.port()), Some(9080));
            assert!(t.cluster.pick().is_some_and(|e| e.healthy));
        }
    }

    #[test]
    fn short_names_two_services_share_resolve_to_neither() {
        let c = snap(
            "services:
- {hostname: reviews.default.svc.cluster.local, ports: [{port: 80, cluster: a}]}
- {hostname: reviews.prod.svc.cluster.local, ports: [{port: 80, cluster: a}]}
- {hostname: reviews, ports: [{port: 81, cluster: a}]}
clusters: [{name: a}]
",
        )
        .expect("good");
        assert!(c.target_by_name("reviews", 80).is_none(), "ambiguous");
        assert!(c.target_by_name("reviews.default", 80).is_some());
        assert!(c.target_by_name("reviews.prod.svc", 80).is_some());
        assert_eq!(
            c.target_by_name("reviews", 81).map(|t| t.hostname.as_str()),
            Some("reviews"),
            "a service whose name is the short name itself"
        );
    }

    #[test]
    fn bad_resources_are_named() {
        let e = snap("services:\n- hostname: a\n  ports: [{port: 80, cluster: nope}]\n")
            .expect_err("bad");
        assert_eq!(
            e,
            "services[0] \"a\": port 80: cluster \"nope\" is not defined"
        );
        let e = snap("clusters:\n- name: c\n  endpoints: [{address: \"10.0.0.1\"}]\n")
            .expect_err("bad");
        assert_eq!(
            e,
            "clusters[0] \"c\" endpoints[0]: address \"10.0.0.1\" is not ip:port"
        );
        let e = snap("clusterz: []\n").expect_err("bad");
        assert!(
            e.starts_with(
                "s.yaml:1:1: clusterz: unknown field `clusterz` (did you mean `clusters`?)"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_wire_values_are_refused_with_the_resource() {
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.services[0].ports[0].protocol = Some(99);
        let e = Config::from_wire(raw, None).expect_err("bad protocol");
        assert_eq!(
            e.to_string(),
            "services[0] \"reviews.default.svc.cluster.local\": unknown protocol value 99"
        );
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.clusters[1].idle_timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        let e = Config::from_wire(raw, None).expect_err("negative duration");
        assert_eq!(
            e.to_string(),
            "clusters[1] \"db\": invalid duration -1s 0ns"
        );
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.outbound_traffic_policy = 7;
        let e = Config::from_wire(raw, None).expect_err("bad policy");
        assert_eq!(e.to_string(), "outboundTrafficPolicy: unknown value 7");
    }

    #[test]
    fn protocol_declaration_follows_istio() {
        use PortProtocol::*;
        assert_eq!(PortProtocol::declared(None, None, Some("http-web")), Http);
        assert_eq!(PortProtocol::declared(None, None, Some("grpc")), Http2);
        assert_eq!(PortProtocol::declared(None, None, Some("tcp-db")), Tcp);
        assert_eq!(PortProtocol::declared(None, None, Some("mongo")), Tcp);
        assert_eq!(PortProtocol::declared(None, None, Some("web")), Detect);
        assert_eq!(
            PortProtocol::declared(None, Some("kubernetes.io/h2c"), Some("tcp")),
            Http2
        );
        assert_eq!(
            PortProtocol::declared(Some(Protocol::Tls), None, Some("http")),
            Tcp
        );
        assert_eq!(PortProtocol::declared(None, None, None), Detect);
    }

    #[test]
    fn counters_survive_a_swap() {
        let a = snap(GOOD).expect("good");
        let t = a.target_by_name("db", 5432).expect("db");
        let ep = t.cluster.pick().expect("ep");
        ep.stats.requests.fetch_add(5, Ordering::Relaxed);
        let raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        let b = Config::from_wire(raw, Some(&a)).expect("convert");
        let ep2 = b
            .target_by_name("db", 5432)
            .and_then(|t| t.cluster.pick())
            .expect("ep");
        assert_eq!(ep2.stats.requests.load(Ordering::Relaxed), 5);
    }
}
