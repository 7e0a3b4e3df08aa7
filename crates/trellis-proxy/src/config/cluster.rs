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

impl Endpoint {
    /// Healthy and not ejected by outlier detection at `now` (on [`now_ms`]'s clock).
    pub fn available(&self, now: u64) -> bool {
        self.healthy && !self.stats.ejected(now)
    }
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
    /// STATIC, STRICT_DNS (endpoints from resolved names) or ORIGINAL_DST (no endpoints:
    /// where the client sent the connection).
    pub discovery: wire::Discovery,
    /// STRICT_DNS: how often the names are resolved again.
    pub dns_refresh: Duration,
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

impl Cluster {
    /// Converts one wire cluster; `old_stats` lends counters to endpoints still there.
    pub(super) fn from_wire(
        i: usize,
        c: &wire::Cluster,
        default_connect: Duration,
        old_stats: &HashMap<(&str, SocketAddr), &Arc<EndpointStats>>,
        resolved: &HashMap<String, Vec<SocketAddr>>,
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
        Ok(Cluster {
            ring,
            name: c.name.clone(),
            endpoints,
            connect_timeout: duration(&res, c.connect_timeout.as_ref(), default_connect)?,
            idle_timeout: duration(&res, c.idle_timeout.as_ref(), DEFAULT_IDLE_TIMEOUT)?,
            load_balancer,
            limits,
            outlier,
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
