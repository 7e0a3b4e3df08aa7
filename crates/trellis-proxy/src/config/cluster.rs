//! Clusters: endpoints, load balancing, connection-pool limits, outlier detection,
//! consistent hashing.

use super::*;

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
    pub consecutive_gateway: std::sync::atomic::AtomicU32,
    pub consecutive_local: std::sync::atomic::AtomicU32,
    pub ejected_until_ms: AtomicU64,
    pub ejections: std::sync::atomic::AtomicU32,
    /// When the endpoint joined a cluster that already existed (ms on [`now_ms`]'s
    /// clock, plus one), for slow start; 0: it was there from the start.
    pub joined_ms: AtomicU64,
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
    /// Concurrent retries allowed, and those in flight.
    max_retries: Option<usize>,
    retries: Arc<AtomicUsize>,
}

/// A retry in flight, counted against `maxRetries` until dropped.
#[derive(Debug)]
pub struct RetrySlot(Option<Arc<AtomicUsize>>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Permits held by a request in flight.
#[derive(Debug)]
pub struct Admitted {
    _connection: Option<tokio::sync::OwnedSemaphorePermit>,
    _request: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How one try ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: connect failure, reset or timeout (Envoy's "local origin").
    LocalOrigin,
}

/// Outlier detection settings (0: that rule is off).
#[derive(Debug, Clone, Copy)]
pub struct Outlier {
    pub consecutive_errors: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    /// Local-origin failures are counted on their own instead of as 5xx.
    pub split_local: bool,
    pub interval_ms: u64,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub proxied: bool,
    /// Its proxy takes plaintext only here (PeerAuthentication DISABLE): no mTLS to it.
    pub plaintext: bool,
    pub identity: Option<String>,
    pub healthy: bool,
    pub locality: Option<String>,
    pub labels: Vec<(String, String)>,
    pub stats: Arc<EndpointStats>,
    /// Who it is, for Istio's metric labels (`destination_*` when a request goes to it).
    pub meta: Arc<crate::metrics::WorkloadMeta>,
}

impl Endpoint {
    /// Healthy and not ejected by outlier detection at `now` (on [`now_ms`]'s clock).
    pub fn available(&self, now: u64) -> bool {
        self.healthy && !self.stats.ejected(now)
    }
}

#[derive(Debug)]
pub struct Cluster {
    pub name: Arc<str>,
    /// The service it is a cluster of (`outbound|port|subset|host`: the host), for Istio's
    /// metric labels.
    pub service_meta: Arc<crate::metrics::ServiceMeta>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub load_balancer: wire::LoadBalancer,
    pub limits: Option<Limits>,
    pub outlier: Option<Outlier>,
    /// Consistent hashing (sticky sessions), when configured.
    pub ring: Option<Ring>,
    /// STATIC, STRICT_DNS (endpoints from resolved names) or ORIGINAL_DST (no endpoints:
    /// where the client sent the connection).
    pub discovery: wire::Discovery,
    /// STRICT_DNS: how often the names are resolved again.
    pub dns_refresh: Duration,
    /// Locality-aware load balancing, worked out for this workload's locality.
    pub locality: Option<LocalityPlan>,
    /// Slow start for endpoints that join later.
    pub warmup: Option<Warmup>,
    /// SO_KEEPALIVE on upstream connections.
    pub keepalive: Option<crate::sockets::Keepalive>,
    /// Requests per upstream HTTP/1.1 connection before it is closed.
    pub max_requests_per_connection: Option<u32>,
    /// Streams per upstream HTTP/2 connection; more open another connection.
    pub max_concurrent_streams: Option<u32>,
    /// To peer proxies, HTTP in the client's own protocol instead of HTTP/2.
    pub keep_client_protocol: bool,
    /// DestinationRule `trafficPolicy.tls` (Auto without one).
    pub upstream_tls: UpstreamTls,
    next: AtomicUsize,
}

/// How locality shapes the picks of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum LocalityPlan {
    /// Endpoint indices by priority (same zone, same region, failover regions, the rest);
    /// each level takes traffic in proportion to its available endpoints, times 1.4
    /// (Envoy's overprovisioning factor), the rest spilling to the next.
    Failover(Vec<Vec<usize>>),
    /// A weight per endpoint (Istio's `distribute`).
    Weighted(Vec<u32>),
}

/// Slow start settings.
#[derive(Debug, Clone, Copy)]
pub struct Warmup {
    pub window_ms: u64,
    pub min_fraction: f64,
    pub aggression: f64,
}

/// Whether locality `l` ("region/zone/subzone") falls under `pattern` (parts may be `*`;
/// a shorter pattern covers everything below it).
pub fn locality_matches(pattern: &str, l: &str) -> bool {
    let mut parts = l.split('/');
    pattern.split('/').all(|p| {
        let part = parts.next();
        p == "*" || part == Some(p)
    })
}

/// The locality plan of endpoints for a workload in `own`.
fn locality_plan(
    lb: &wire::LocalityLb,
    own: &str,
    endpoints: &[Arc<Endpoint>],
) -> Option<LocalityPlan> {
    if let Some(d) = lb
        .distribute
        .iter()
        .find(|d| locality_matches(&d.from, own))
    {
        // Each target's share, split evenly among its endpoints.
        let target = |e: &Endpoint| {
            let l = e.locality.as_deref()?;
            d.to.iter()
                .filter(|(pat, _)| locality_matches(pat, l))
                .max_by_key(|(pat, _)| pat.len())
                .map(|(pat, pct)| (pat.as_str(), *pct))
        };
        let mut count: HashMap<&str, u32> = HashMap::new();
        for e in endpoints {
            if let Some((pat, _)) = target(e) {
                *count.entry(pat).or_default() += 1;
            }
        }
        let weights = endpoints
            .iter()
            .map(|e| match target(e) {
                Some((pat, pct)) => pct * 1000 / count.get(pat).copied().unwrap_or(1).max(1),
                None => 0,
            })
            .collect();
        return Some(LocalityPlan::Weighted(weights));
    }
    let mut own_parts = own.split('/');
    let (region, zone, subzone) = (own_parts.next()?, own_parts.next(), own_parts.next());
    let failover: Vec<&str> = lb
        .failover
        .iter()
        .filter(|f| f.from == region)
        .map(|f| f.to.as_str())
        .collect();
    let rank = |e: &Endpoint| -> usize {
        let Some(l) = e.locality.as_deref() else {
            return 3 + failover.len();
        };
        let mut p = l.split('/');
        let (r, z, sz) = (p.next(), p.next(), p.next());
        if r != Some(region) {
            return match failover.iter().position(|f| Some(*f) == r) {
                Some(i) => 3 + i,
                None => 3 + failover.len(),
            };
        }
        match (z == zone, sz == subzone) {
            (true, true) => 0,
            (true, false) => 1,
            _ => 2,
        }
    };
    let mut levels: Vec<Vec<usize>> = vec![Vec::new(); 4 + failover.len()];
    for (i, e) in endpoints.iter().enumerate() {
        levels[rank(e)].push(i);
    }
    levels.retain(|l| !l.is_empty());
    (levels.len() > 1).then_some(LocalityPlan::Failover(levels))
}

/// What a consistent-hash load balancer hashes.
#[derive(Debug, Clone)]
pub enum HashKey {
    Header(http::HeaderName),
    /// A cookie; with `set`, the proxy makes one up for a request without it and sets it
    /// on the response.
    Cookie {
        name: String,
        set: Option<CookieSet>,
    },
    SourceIp,
    Query(String),
}

/// The cookie the proxy sets: `Max-Age` (none for a zero ttl: a session cookie) and
/// `Path`.
#[derive(Debug, Clone)]
pub struct CookieSet {
    pub ttl: Duration,
    pub path: Option<String>,
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
    pub(super) fn build(key: HashKey, endpoints: &[Arc<Endpoint>], size: u64) -> Ring {
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
        let Some(w) = &self.warmup else {
            return self.pick_once();
        };
        // Slow start: a warming endpoint is kept with its ramp's probability; after a few
        // draws the last pick stands.
        let now = now_ms();
        let mut last = None;
        for _ in 0..4 {
            let e = self.pick_once()?;
            let joined = e.stats.joined_ms.load(Ordering::Relaxed);
            let age = now.saturating_sub(joined.saturating_sub(1));
            if joined == 0 || age >= w.window_ms {
                return Some(e);
            }
            let ramp = (age as f64 / w.window_ms as f64)
                .powf(1.0 / w.aggression)
                .max(w.min_fraction);
            if (crate::http::random_u64() % 10_000) as f64 / 10_000.0 < ramp {
                return Some(e);
            }
            last = Some(e);
        }
        last
    }

    fn pick_once(&self) -> Option<&Arc<Endpoint>> {
        match &self.locality {
            None => self.pick_any(),
            Some(LocalityPlan::Weighted(w)) => self.pick_weighted(w),
            Some(LocalityPlan::Failover(levels)) => self.pick_failover(levels),
        }
    }

    fn pick_weighted(&self, weights: &[u32]) -> Option<&Arc<Endpoint>> {
        let now = now_ms();
        let total: u64 = self
            .endpoints
            .iter()
            .zip(weights)
            .filter(|(e, _)| e.available(now))
            .map(|(_, w)| u64::from(*w))
            .sum();
        if total == 0 {
            return self.pick_any();
        }
        let mut roll = crate::http::random_u64() % total;
        for (e, w) in self.endpoints.iter().zip(weights) {
            if !e.available(now) {
                continue;
            }
            let w = u64::from(*w);
            if roll < w {
                return Some(e);
            }
            roll -= w;
        }
        self.pick_any()
    }

    fn pick_failover(&self, levels: &[Vec<usize>]) -> Option<&Arc<Endpoint>> {
        let now = now_ms();
        let roll = (crate::http::random_u64() % 10_000) as f64 / 100.0;
        let (mut remaining, mut acc) = (100.0_f64, 0.0_f64);
        let mut first_available = None;
        for level in levels {
            let available = level
                .iter()
                .filter(|i| self.endpoints[**i].available(now))
                .count();
            if available > 0 && first_available.is_none() {
                first_available = Some(level);
            }
            let share = (available as f64 / level.len() as f64 * 140.0).min(remaining);
            remaining -= share;
            acc += share;
            if roll < acc {
                return self.pick_among(level, now);
            }
        }
        // Every level degraded: the nearest one with an available endpoint.
        self.pick_among(first_available.or(levels.first())?, now)
    }

    /// An endpoint among `idx` by the cluster's load balancer.
    fn pick_among(&self, idx: &[usize], now: u64) -> Option<&Arc<Endpoint>> {
        let n = idx.len();
        if n == 0 {
            return None;
        }
        let ok = |i: &usize| self.endpoints[*i].available(now);
        let chosen = match self.load_balancer {
            wire::LoadBalancer::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| idx[(start + k) % n])
                    .find(ok)
                    .unwrap_or(idx[start % n])
            }
            wire::LoadBalancer::Random | wire::LoadBalancer::LeastRequest => {
                let available: Vec<usize> = idx.iter().copied().filter(ok).collect();
                let pool = if available.is_empty() {
                    idx
                } else {
                    &available
                };
                let r = crate::http::random_u64();
                let a = pool[(r % pool.len() as u64) as usize];
                if self.load_balancer == wire::LoadBalancer::LeastRequest && pool.len() > 1 {
                    let b = pool[((r >> 32) % pool.len() as u64) as usize];
                    let busy = |i: usize| self.endpoints[i].stats.active.load(Ordering::Relaxed);
                    if busy(b) < busy(a) { b } else { a }
                } else {
                    a
                }
            }
        };
        self.endpoints.get(chosen)
    }

    fn pick_any(&self) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = now_ms();
        let ok = |e: &&Arc<Endpoint>| e.available(now);
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
            .find(|e| e.available(now))
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
                    let p = Box::pin(Arc::clone(s).acquire_owned()).await.ok();
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

    /// How to open connections to this cluster's endpoints.
    pub fn dial(&self) -> crate::sockets::Dial {
        crate::sockets::Dial {
            timeout: self.connect_timeout,
            keepalive: self.keepalive,
        }
    }

    /// A slot for one more retry under `maxRetries`; `None`: the budget is spent and the
    /// failed try's answer stands.
    pub fn try_retry(&self) -> Option<RetrySlot> {
        let Some(l) = &self.limits else {
            return Some(RetrySlot(None));
        };
        let Some(max) = l.max_retries else {
            return Some(RetrySlot(None));
        };
        if l.retries.fetch_add(1, Ordering::AcqRel) >= max {
            l.retries.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(RetrySlot(Some(Arc::clone(&l.retries))))
    }

    /// Feeds outlier detection with the outcome of a try.
    pub fn report(&self, ep: &Endpoint, outcome: Outcome) {
        let Some(o) = self.outlier else { return };
        let s = &ep.stats;
        let bump = |c: &std::sync::atomic::AtomicU32| c.fetch_add(1, Ordering::Relaxed) + 1;
        let reset = |c: &std::sync::atomic::AtomicU32| c.store(0, Ordering::Relaxed);
        // Which rule, if any, this failure trips: (count, threshold, what).
        let tripped = match outcome {
            Outcome::Status(code) if code < 500 => {
                reset(&s.consecutive_failures);
                reset(&s.consecutive_gateway);
                reset(&s.consecutive_local);
                return;
            }
            Outcome::LocalOrigin if o.split_local => {
                let n = bump(&s.consecutive_local);
                (n, o.consecutive_local, "local-origin failures")
            }
            Outcome::Status(code) => {
                let n5 = bump(&s.consecutive_failures);
                let ng = if (502..=504).contains(&code) {
                    bump(&s.consecutive_gateway)
                } else {
                    reset(&s.consecutive_gateway);
                    0
                };
                if o.consecutive_gateway > 0 && ng >= o.consecutive_gateway {
                    (ng, o.consecutive_gateway, "gateway errors")
                } else {
                    (n5, o.consecutive_errors, "5xx errors")
                }
            }
            // Not split: a local-origin failure counts as a 503.
            Outcome::LocalOrigin => {
                let n5 = bump(&s.consecutive_failures);
                let ng = bump(&s.consecutive_gateway);
                if o.consecutive_gateway > 0 && ng >= o.consecutive_gateway {
                    (ng, o.consecutive_gateway, "gateway errors")
                } else {
                    (n5, o.consecutive_errors, "5xx errors")
                }
            }
        };
        let (n, threshold, what) = tripped;
        if threshold == 0 || n < threshold {
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
        let mut ms = (o.base_ejection.as_millis() as u64)
            .saturating_mul(u64::from(times))
            .min(300_000);
        // Envoy brings ejected hosts back on its interval timer: at the first tick after.
        if o.interval_ms > 0 {
            ms = ms.div_ceil(o.interval_ms) * o.interval_ms;
        }
        ep.stats.ejected_until_ms.store(now + ms, Ordering::Relaxed);
        reset(&s.consecutive_failures);
        reset(&s.consecutive_gateway);
        reset(&s.consecutive_local);
        tracing::warn!(cluster = %self.name, "endpoint {} ejected for {ms} ms after {n} consecutive {what}", ep.addr);
    }
}

/// How a cluster's endpoints are spoken to over TLS.
#[derive(Debug, Clone, Default)]
pub enum UpstreamTls {
    /// Mesh mTLS to peer proxies that take it, plaintext to the rest.
    #[default]
    Auto,
    /// DestinationRule DISABLE: never TLS.
    Disable,
    /// DestinationRule ISTIO_MUTUAL: mesh mTLS to every endpoint.
    IstioMutual,
    /// DestinationRule SIMPLE or MUTUAL: TLS origination.
    Origin(Arc<Origination>),
}

/// TLS origination to a service outside the mesh.
pub struct Origination {
    pub config: Arc<rustls::ClientConfig>,
    /// Sent as SNI (and checked in the certificate unless subjectAltNames say otherwise).
    pub sni: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for Origination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origination")
            .field("sni", &self.sni)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Converts one wire cluster; `old_stats` lends counters to endpoints still there.
    pub(super) fn from_wire(
        i: usize,
        c: &wire::Cluster,
        default_connect: Duration,
        old_stats: &HashMap<(&str, SocketAddr), &Arc<EndpointStats>>,
        resolved: &HashMap<String, Vec<SocketAddr>>,
        own_locality: Option<&str>,
    ) -> Result<Cluster, ConfigError> {
        let res = format!("clusters[{i}] {:?}", c.name);
        if c.name.is_empty() {
            return Err(bad(res, "cluster name must not be empty"));
        }
        let discovery = wire::Discovery::try_from(c.discovery)
            .map_err(|_| bad(&res, format!("unknown discovery {}", c.discovery)))?;
        if discovery == wire::Discovery::OriginalDst && !c.endpoints.is_empty() {
            return Err(bad(
                &res,
                "an ORIGINAL_DST cluster has no endpoints (connections go where the client sent them)",
            ));
        }
        // Endpoints that join a cluster that already existed start slowly (warmup);
        // those of a new cluster do not.
        let existed = old_stats.keys().any(|(name, _)| *name == c.name);
        let mut endpoints = Vec::with_capacity(c.endpoints.len());
        for (j, e) in c.endpoints.iter().enumerate() {
            let eres = format!("{res} endpoints[{j}]");
            let addrs: Vec<SocketAddr> = if discovery == wire::Discovery::StrictDns {
                dns_name(&e.address).map_err(|why| bad(&eres, why))?;
                resolved.get(&e.address).cloned().unwrap_or_default()
            } else {
                vec![e.address.parse().map_err(|_| {
                    bad(
                        &eres,
                        format!(
                            "address {:?} is not ip:port (a host name needs discovery STRICT_DNS)",
                            e.address
                        ),
                    )
                })?]
            };
            for addr in addrs {
                if endpoints.iter().any(|x: &Arc<Endpoint>| x.addr == addr) {
                    continue;
                }
                let stats = old_stats
                    .get(&(c.name.as_str(), addr))
                    .map(|s| Arc::clone(s))
                    .unwrap_or_else(|| {
                        let s = EndpointStats::default();
                        if existed {
                            s.joined_ms.store(now_ms() + 1, Ordering::Relaxed);
                        }
                        Arc::new(s)
                    });
                endpoints.push(Arc::new(Endpoint {
                    addr,
                    proxied: e.proxied,
                    plaintext: e.plaintext,
                    identity: e.identity.clone(),
                    healthy: e.healthy.unwrap_or(true),
                    locality: e.locality.clone(),
                    labels: e
                        .labels
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    stats,
                    meta: crate::metrics::WorkloadMeta::of(
                        &e.workload,
                        &e.namespace,
                        e.identity.as_deref(),
                        e.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                    ),
                }));
            }
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
            max_retries: cb.max_retries.map(|n| n as usize),
            retries: Arc::new(AtomicUsize::new(0)),
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
                    consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
                    consecutive_local: o.consecutive_local_origin_failures.unwrap_or(5),
                    split_local: o.split_external_local_origin_errors.unwrap_or(false),
                    interval_ms: duration(&res, o.interval.as_ref(), Duration::ZERO)?.as_millis()
                        as u64,
                    base_ejection: duration(
                        &res,
                        o.base_ejection_time.as_ref(),
                        Duration::from_secs(30),
                    )?,
                    max_ejection_percent: pct(o.max_ejection_percent, 10, "maxEjectionPercent")?,
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
                    (None, Some(c), None | Some(false), None) => HashKey::Cookie {
                        name: c.clone(),
                        set: match &ch.http_cookie_ttl {
                            None => None,
                            Some(t) => Some(CookieSet {
                                ttl: duration(&res, Some(t), Duration::ZERO)?,
                                path: ch.http_cookie_path.clone(),
                            }),
                        },
                    },
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
        let locality = match (&c.locality_lb, own_locality) {
            (Some(lb), Some(own)) => locality_plan(lb, own, &endpoints),
            _ => None,
        };
        Ok(Cluster {
            ring,
            service_meta: crate::metrics::ServiceMeta::of(
                c.name.rsplit('|').next().unwrap_or(&c.name),
            ),
            name: c.name.as_str().into(),
            endpoints,
            connect_timeout: duration(&res, c.connect_timeout.as_ref(), default_connect)?,
            idle_timeout: duration(&res, c.idle_timeout.as_ref(), DEFAULT_IDLE_TIMEOUT)?,
            load_balancer,
            limits,
            outlier,
            locality,
            warmup: match &c.warmup {
                None => None,
                Some(w) => {
                    let window = duration(&res, w.duration.as_ref(), Duration::ZERO)?;
                    let aggression = w.aggression.unwrap_or(1.0);
                    if !(aggression.is_finite() && aggression > 0.0) {
                        return Err(bad(&res, "warmup.aggression must be above 0"));
                    }
                    let min = w.minimum_percent.unwrap_or(10.0);
                    if !(0.0..=100.0).contains(&min) {
                        return Err(bad(&res, "warmup.minimumPercent must be 0..100"));
                    }
                    (!window.is_zero()).then(|| Warmup {
                        window_ms: window.as_millis() as u64,
                        min_fraction: min / 100.0,
                        aggression,
                    })
                }
            },
            keepalive: c
                .tcp_keepalive
                .as_ref()
                .map(|k| -> Result<_, ConfigError> {
                    Ok(crate::sockets::Keepalive {
                        time: k
                            .time
                            .as_ref()
                            .map(|t| duration(&res, Some(t), Duration::ZERO))
                            .transpose()?,
                        interval: k
                            .interval
                            .as_ref()
                            .map(|t| duration(&res, Some(t), Duration::ZERO))
                            .transpose()?,
                        probes: k.probes,
                    })
                })
                .transpose()?,
            max_requests_per_connection: c
                .circuit_breakers
                .as_ref()
                .and_then(|cb| cb.max_requests_per_connection)
                .filter(|n| *n > 0),
            keep_client_protocol: c.keep_client_protocol,
            upstream_tls: UpstreamTls::Auto,
            max_concurrent_streams: c
                .circuit_breakers
                .as_ref()
                .and_then(|cb| cb.max_concurrent_streams)
                .filter(|n| *n > 0),
            discovery,
            dns_refresh: duration(&res, c.dns_refresh_rate.as_ref(), DEFAULT_DNS_REFRESH)?,
            next: AtomicUsize::new(0),
        })
    }
}

/// Checks a STRICT_DNS endpoint address (`host:port`).
pub(super) fn dns_name(address: &str) -> Result<(), String> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!("address {address:?} is not host:port")),
    }
}
