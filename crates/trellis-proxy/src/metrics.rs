//! Istio's standard request metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`)
//! with Istio's labels, so that the dashboards and alerts written for Istio work.
//!
//! Both ends report: the client's proxy with `reporter="source"`, the server's with
//! `reporter="destination"`. Who the peer is comes from the snapshot (the endpoint the
//! request went to; the caller's address and mTLS identity), never from headers an app
//! could forge; what the snapshot does not say is `unknown`, as in Istio.
//!
//! Recording costs one lock and one hash lookup: a series is keyed by pointers to
//! interned label sets (one per workload and per service, made when a snapshot is
//! converted), never by strings built per request. Label values are bounded: workloads,
//! services, status codes and response flags; no paths or user-supplied values.

use crate::fasthash::FastMap;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// What a workload contributes to the labels (`source_*` or `destination_*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadMeta {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

/// The service a request was for (`destination_service*`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceMeta {
    pub service: String,
    pub name: String,
    pub namespace: String,
}

pub use crate::tags::{Tags, Values};

/// The series a side keeps at most, once tag overrides add values of requests to the
/// labels: past it, new values are counted as `overflow`.
const MAX_TAGGED_SERIES: usize = 20_000;

/// The key as it is counted: a new series with tag values past the bound counts under
/// `overflow` values (a header used as a label cannot grow memory without end).
fn bounded<S>(m: &FastMap<Key, S>, mut key: Key) -> Key {
    let over = key.tags.as_ref().is_some_and(|(_, v)| !v.is_empty())
        && m.len() >= MAX_TAGGED_SERIES
        && !m.contains_key(&key);
    if let Some((t, values)) = key.tags.as_mut().filter(|_| over) {
        *values = t.0.overflow();
    }
    key
}

/// Istio's cluster label: the cluster ID it uses when none is configured.
const CLUSTER: &str = "Kubernetes";
const UNKNOWN: &str = "unknown";

/// Label sets, one `Arc` per distinct content (series are keyed by the pointer). A set
/// nobody holds any more (its workload left the snapshot, and no series or connection
/// has it) is dropped when the table has doubled since it was last pruned: with pods
/// that come and go, the table stays proportional to what is in use.
struct Interner<T> {
    map: HashMap<T, Arc<T>>,
    prune_at: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            map: HashMap::new(),
            prune_at: 64,
        }
    }
}

fn interned<T: Eq + std::hash::Hash + Clone>(
    set: &'static OnceLock<Mutex<Interner<T>>>,
    v: T,
) -> Arc<T> {
    let mut i = set
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(a) = i.map.get(&v) {
        return Arc::clone(a);
    }
    if i.map.len() >= i.prune_at {
        i.map.retain(|_, a| Arc::strong_count(a) > 1);
        i.prune_at = (2 * i.map.len()).max(64);
    }
    let a = Arc::new(v.clone());
    i.map.insert(v, Arc::clone(&a));
    a
}

static WORKLOADS: OnceLock<Mutex<Interner<WorkloadMeta>>> = OnceLock::new();
static SERVICES: OnceLock<Mutex<Interner<ServiceMeta>>> = OnceLock::new();

impl WorkloadMeta {
    /// The labels of a workload as the snapshot describes it (empty parts are
    /// `unknown`); the same content always gives the same `Arc`.
    pub fn of<'a>(
        workload: &str,
        namespace: &str,
        identity: Option<&str>,
        labels: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> Arc<WorkloadMeta> {
        let label = |k: &str| labels.clone().find(|(n, _)| *n == k).map(|(_, v)| v);
        let or_unknown = |s: &str| {
            if s.is_empty() {
                UNKNOWN.to_string()
            } else {
                s.to_string()
            }
        };
        // The namespace from the SPIFFE identity when the snapshot has no other.
        let ns_from_id = identity
            .and_then(|i| i.split("/ns/").nth(1))
            .and_then(|rest| rest.split('/').next());
        let namespace = if namespace.is_empty() {
            ns_from_id.unwrap_or("")
        } else {
            namespace
        };
        let app = label("app").or_else(|| label("app.kubernetes.io/name"));
        let version = label("version").or_else(|| label("app.kubernetes.io/version"));
        let canonical_service = label("service.istio.io/canonical-name")
            .or(app)
            .unwrap_or(workload);
        let canonical_revision = label("service.istio.io/canonical-revision")
            .or(version)
            .unwrap_or("latest");
        interned(
            &WORKLOADS,
            WorkloadMeta {
                workload: or_unknown(workload),
                namespace: or_unknown(namespace),
                principal: or_unknown(identity.unwrap_or("")),
                app: or_unknown(app.unwrap_or("")),
                version: or_unknown(version.unwrap_or("")),
                canonical_service: or_unknown(canonical_service),
                canonical_revision: or_unknown(canonical_revision),
            },
        )
    }

    /// Nothing known (made once).
    pub fn unknown() -> Arc<WorkloadMeta> {
        static UNKNOWN_WORKLOAD: OnceLock<Arc<WorkloadMeta>> = OnceLock::new();
        Arc::clone(
            UNKNOWN_WORKLOAD.get_or_init(|| WorkloadMeta::of("", "", None, std::iter::empty())),
        )
    }
}

impl ServiceMeta {
    /// A service by host name: `name.namespace.svc.<domain>` gives its name and
    /// namespace; any other host is its own name, in an unknown namespace.
    pub fn of(hostname: &str) -> Arc<ServiceMeta> {
        let mut parts = hostname.splitn(4, '.');
        let (name, ns, svc) = (parts.next(), parts.next(), parts.next());
        let (name, namespace) = match (name, ns, svc) {
            (Some(n), Some(ns), Some("svc")) => (n, ns),
            _ => (hostname, UNKNOWN),
        };
        interned(
            &SERVICES,
            ServiceMeta {
                service: hostname.to_string(),
                name: name.to_string(),
                namespace: namespace.to_string(),
            },
        )
    }

    /// Nothing known (made once).
    pub fn unknown() -> Arc<ServiceMeta> {
        static UNKNOWN_SERVICE: OnceLock<Arc<ServiceMeta>> = OnceLock::new();
        Arc::clone(UNKNOWN_SERVICE.get_or_init(|| {
            interned(
                &SERVICES,
                ServiceMeta {
                    service: UNKNOWN.into(),
                    name: UNKNOWN.into(),
                    namespace: UNKNOWN.into(),
                },
            )
        }))
    }
}

/// Which end reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// An `Arc` compared and hashed by address (interned values: equal content, equal
/// address).
#[derive(Debug, Clone)]
struct ByPtr<T>(Arc<T>);

impl<T> PartialEq for ByPtr<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl<T> Eq for ByPtr<T> {}
impl<T> std::hash::Hash for ByPtr<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state);
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    reporter: Reporter,
    source: ByPtr<WorkloadMeta>,
    destination: ByPtr<WorkloadMeta>,
    service: ByPtr<ServiceMeta>,
    grpc: bool,
    code: u16,
    grpc_status: Option<u16>,
    flags: &'static str,
    mtls: bool,
    /// The side's tag overrides, and this series' values of its upserted tags.
    tags: Option<(ByPtr<Tags>, Values)>,
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Pointers and small values, folded into one word: a series lookup per request
        // hashes eight bytes, not the key's sixty.
        let p = |a: *const ()| a as usize as u64;
        let mut h = p(Arc::as_ptr(&self.source.0).cast());
        h = h.rotate_left(21) ^ p(Arc::as_ptr(&self.destination.0).cast());
        h = h.rotate_left(21) ^ p(Arc::as_ptr(&self.service.0).cast());
        h = h.rotate_left(21)
            ^ u64::from(self.code)
            ^ (u64::from(self.grpc_status.unwrap_or(u16::MAX)) << 16)
            ^ (self
                .flags
                .bytes()
                .fold(0u64, |a, b| a.rotate_left(8) ^ u64::from(b))
                << 32)
            ^ (u64::from(self.grpc) << 62)
            ^ (u64::from(self.mtls) << 61)
            ^ (u64::from(self.reporter == Reporter::Source) << 60);
        if let Some((t, values)) = &self.tags {
            h = h.rotate_left(21) ^ p(Arc::as_ptr(&t.0).cast());
            for v in values.iter() {
                h = v
                    .bytes()
                    .fold(h.rotate_left(7), |a, b| a.rotate_left(8) ^ u64::from(b));
            }
        }
        state.write_u64(h);
    }
}

type SeriesMap = FastMap<Key, Series>;

/// Which of Istio's metrics a side reports, as the Telemetry's metric overrides say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled(u16);

impl Enabled {
    pub const REQUEST_COUNT: u16 = 1;
    pub const REQUEST_DURATION: u16 = 2;
    pub const REQUEST_SIZE: u16 = 4;
    pub const RESPONSE_SIZE: u16 = 8;
    pub const TCP_OPENED: u16 = 16;
    pub const TCP_CLOSED: u16 = 32;
    pub const TCP_SENT: u16 = 64;
    pub const TCP_RECEIVED: u16 = 128;
    const HTTP: u16 = 15;
    const TCP: u16 = 240;
    pub const ALL: Enabled = Enabled(255);
    pub const NONE: Enabled = Enabled(0);

    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    /// The bits of a metric override's `metric` (`ALL_METRICS`: all of them).
    pub(crate) fn bits_of(metric: &str) -> Option<u16> {
        Some(match metric {
            "ALL_METRICS" => 255,
            "REQUEST_COUNT" => Self::REQUEST_COUNT,
            "REQUEST_DURATION" => Self::REQUEST_DURATION,
            "REQUEST_SIZE" => Self::REQUEST_SIZE,
            "RESPONSE_SIZE" => Self::RESPONSE_SIZE,
            "TCP_OPENED_CONNECTIONS" => Self::TCP_OPENED,
            "TCP_CLOSED_CONNECTIONS" => Self::TCP_CLOSED,
            "TCP_SENT_BYTES" => Self::TCP_SENT,
            "TCP_RECEIVED_BYTES" => Self::TCP_RECEIVED,
            _ => return None,
        })
    }
}

/// The metrics each side reports (outbound: `reporter="source"`, inbound: destination),
/// and their tag overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Switches {
    pub client: Enabled,
    pub server: Enabled,
    pub client_tags: Option<Arc<Tags>>,
    pub server_tags: Option<Arc<Tags>>,
}

impl Default for Switches {
    fn default() -> Self {
        Switches {
            client: Enabled::ALL,
            server: Enabled::ALL,
            client_tags: None,
            server_tags: None,
        }
    }
}

impl Switches {
    /// From the snapshot's telemetry: metric overrides in order (a later one wins); a
    /// selection whose providers include no Prometheus provider reports nothing here.
    pub fn compile(t: Option<&trellis_xds::snapshot::Telemetry>) -> Switches {
        let mut out = Switches::default();
        let Some((m, t)) = t.and_then(|t| Some((t.metrics.as_ref()?, t))) else {
            return out;
        };
        let prometheus = |name: &String| {
            name == "prometheus"
                || t.providers
                    .iter()
                    .any(|p| &p.name == name && p.kind == "prometheus")
        };
        if !m.providers.is_empty() && !m.providers.iter().any(prometheus) {
            return Switches {
                client: Enabled(0),
                server: Enabled(0),
                ..Switches::default()
            };
        }
        let mut errors = Vec::new();
        out.client_tags = Tags::compile(&m.overrides, true, &mut errors);
        out.server_tags = Tags::compile(&m.overrides, false, &mut errors);
        // Each problem once per proxy, not again at every snapshot that repeats it.
        static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
        let mut warned = WARNED.lock().unwrap_or_else(PoisonError::into_inner);
        for e in errors {
            if warned.len() < 1000 && warned.insert(e.clone()) {
                tracing::warn!("telemetry metrics: {e}; that tag is left as it is");
            }
        }
        for o in &m.overrides {
            let (Some(disabled), Some(bit)) = (o.disabled, Enabled::bits_of(&o.metric)) else {
                continue;
            };
            let (client, server) = match o.mode.as_str() {
                "CLIENT" => (true, false),
                "SERVER" => (false, true),
                _ => (true, true),
            };
            for (applies, side) in [(client, &mut out.client), (server, &mut out.server)] {
                if applies {
                    side.0 = if disabled {
                        side.0 & !bit
                    } else {
                        side.0 | bit
                    };
                }
            }
        }
        out
    }
}

/// One TCP connection, as a metric sees it.
#[derive(Debug, Clone)]
pub struct TcpConn {
    pub reporter: Reporter,
    pub source: Arc<WorkloadMeta>,
    pub destination: Arc<WorkloadMeta>,
    pub service: Arc<ServiceMeta>,
    pub mtls: bool,
    pub enabled: Enabled,
    /// The side's tag overrides and this connection's values of them.
    pub tags: Option<(Arc<Tags>, Values)>,
}

impl TcpConn {
    fn key(&self) -> Key {
        Key {
            reporter: self.reporter,
            source: ByPtr(Arc::clone(&self.source)),
            destination: ByPtr(Arc::clone(&self.destination)),
            service: ByPtr(Arc::clone(&self.service)),
            grpc: false,
            code: 0,
            grpc_status: None,
            flags: "-",
            mtls: self.mtls,
            tags: self
                .tags
                .as_ref()
                .map(|(t, v)| (ByPtr(Arc::clone(t)), Arc::clone(v))),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct TcpSeries {
    /// The metrics ever recorded in this series (`Enabled` bits): only those are shown.
    observed: u16,
    opened: u64,
    closed: u64,
    sent: u64,
    received: u64,
}

/// One request, as a metric sees it.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub reporter: Reporter,
    pub source: Arc<WorkloadMeta>,
    pub destination: Arc<WorkloadMeta>,
    pub service: Arc<ServiceMeta>,
    /// gRPC (`request_protocol="grpc"`) rather than HTTP.
    pub grpc: bool,
    pub code: u16,
    pub grpc_status: Option<u16>,
    /// Envoy's response flags (`-` for none).
    pub flags: &'static str,
    /// Mutual TLS between the proxies (`connection_security_policy`, destination side).
    pub mtls: bool,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub enabled: Enabled,
    /// The side's tag overrides and this request's values of them.
    pub tags: Option<(Arc<Tags>, Values)>,
}

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for the size histograms (bytes).
const SIZE_BYTES: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

#[derive(Debug, Clone)]
struct Hist<const N: usize> {
    /// Observations at or under each bound (not cumulative).
    buckets: [u64; N],
    over: u64,
    sum: f64,
}

impl<const N: usize> Default for Hist<N> {
    fn default() -> Self {
        Hist {
            buckets: [0; N],
            over: 0,
            sum: 0.0,
        }
    }
}

impl<const N: usize> Hist<N> {
    fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.over
    }

    /// Another series' observations added to these.
    fn add(&mut self, other: &Self) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.over += other.over;
        self.sum += other.sum;
    }

    fn observe(&mut self, bounds: &[f64; N], v: f64) {
        match bounds.iter().position(|b| v <= *b) {
            Some(i) => self.buckets[i] += 1,
            None => self.over += 1,
        }
        self.sum += v;
    }
}

#[derive(Debug, Clone)]
struct Series {
    /// The metrics ever recorded in this series (`Enabled` bits): only those are shown.
    observed: u16,
    requests: u64,
    duration: Hist<19>,
    request_bytes: Hist<8>,
    response_bytes: Hist<8>,
}

/// The proxy's Istio request metrics.
#[derive(Debug, Default)]
pub struct IstioMetrics {
    http: Mutex<SeriesMap>,
    tcp: Mutex<FastMap<Key, TcpSeries>>,
    /// Callers known only by their mTLS identity, made once per identity.
    by_identity: Mutex<FastMap<Arc<str>, Arc<WorkloadMeta>>>,
}

/// The response flags Trellis sets, as static strings (anything else: `-`).
pub fn flag(value: &[u8]) -> &'static str {
    const KNOWN: [&str; 14] = [
        "UF", "UH", "NR", "UT", "URX", "UC", "RL", "FI", "DI", "DPE", "UO", "UAEX", "LR", "DC",
    ];
    KNOWN
        .iter()
        .find(|f| f.as_bytes() == value)
        .copied()
        .unwrap_or("-")
}

impl IstioMetrics {
    /// Who an inbound caller is: the workload at its address (`peers`, from the
    /// snapshot) when its mTLS identity, if any, agrees; else what the identity says
    /// (namespace and principal); else unknown.
    pub fn caller(
        &self,
        peers: &FastMap<std::net::IpAddr, Arc<WorkloadMeta>>,
        ip: std::net::IpAddr,
        identity: Option<&str>,
    ) -> Arc<WorkloadMeta> {
        match (identity, peers.get(&ip)) {
            (Some(id), Some(m)) if m.principal == id => Arc::clone(m),
            (Some(id), _) => self.by_identity(id),
            (None, Some(m)) => Arc::clone(m),
            (None, None) => WorkloadMeta::unknown(),
        }
    }

    /// A caller the snapshot does not know by address: what its SPIFFE identity says
    /// (namespace and principal).
    fn by_identity(&self, id: &str) -> Arc<WorkloadMeta> {
        let mut m = self
            .by_identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = m.get(id) {
            return Arc::clone(w);
        }
        let w = WorkloadMeta::of("", "", Some(id), std::iter::empty());
        // Identities are few (service accounts); a runaway count is not remembered.
        if m.len() < 10_000 {
            m.insert(Arc::from(id), Arc::clone(&w));
        }
        w
    }

    pub fn record_http(&self, r: &HttpRequest) {
        let on = r.enabled;
        if on.0 & Enabled::HTTP == 0 {
            return;
        }
        let key = Key {
            reporter: r.reporter,
            source: ByPtr(Arc::clone(&r.source)),
            destination: ByPtr(Arc::clone(&r.destination)),
            service: ByPtr(Arc::clone(&r.service)),
            grpc: r.grpc,
            code: r.code,
            grpc_status: r.grpc_status,
            flags: r.flags,
            mtls: r.mtls,
            tags: r
                .tags
                .as_ref()
                .map(|(t, v)| (ByPtr(Arc::clone(t)), Arc::clone(v))),
        };
        let mut m = self.http.lock().unwrap_or_else(PoisonError::into_inner);
        let key = bounded(&m, key);
        let s = m.entry(key).or_insert_with(|| Series {
            observed: 0,
            requests: 0,
            duration: Hist::default(),
            request_bytes: Hist::default(),
            response_bytes: Hist::default(),
        });
        s.observed |= on.0 & Enabled::HTTP;
        if on.has(Enabled::REQUEST_COUNT) {
            s.requests += 1;
        }
        if on.has(Enabled::REQUEST_DURATION) {
            s.duration
                .observe(&DURATION_MS, r.duration.as_secs_f64() * 1000.0);
        }
        if on.has(Enabled::REQUEST_SIZE) {
            s.request_bytes.observe(&SIZE_BYTES, r.request_bytes as f64);
        }
        if on.has(Enabled::RESPONSE_SIZE) {
            s.response_bytes
                .observe(&SIZE_BYTES, r.response_bytes as f64);
        }
    }

    /// A connection opened (to its upstream).
    pub fn tcp_opened(&self, c: &TcpConn) {
        if !c.enabled.has(Enabled::TCP_OPENED) {
            return;
        }
        let mut m = self.tcp.lock().unwrap_or_else(PoisonError::into_inner);
        let key = bounded(&m, c.key());
        let s = m.entry(key).or_default();
        s.observed |= Enabled::TCP_OPENED;
        s.opened += 1;
    }

    /// An open connection's bytes since its last report: `received` from the client and
    /// `sent` to it.
    pub fn tcp_progress(&self, c: &TcpConn, received: u64, sent: u64) {
        let on = c.enabled;
        if on.0 & (Enabled::TCP_SENT | Enabled::TCP_RECEIVED) == 0 || received + sent == 0 {
            return;
        }
        let mut m = self.tcp.lock().unwrap_or_else(PoisonError::into_inner);
        let key = bounded(&m, c.key());
        let s = m.entry(key).or_default();
        s.observed |= on.0 & (Enabled::TCP_SENT | Enabled::TCP_RECEIVED);
        if on.has(Enabled::TCP_RECEIVED) {
            s.received += received;
        }
        if on.has(Enabled::TCP_SENT) {
            s.sent += sent;
        }
    }

    /// A connection closed, having carried `received` bytes from the client and `sent`
    /// to it since its last report.
    pub fn tcp_closed(&self, c: &TcpConn, received: u64, sent: u64) {
        let on = c.enabled;
        if on.0 & (Enabled::TCP & !Enabled::TCP_OPENED) == 0 {
            return;
        }
        let mut m = self.tcp.lock().unwrap_or_else(PoisonError::into_inner);
        let key = bounded(&m, c.key());
        let s = m.entry(key).or_default();
        s.observed |= on.0 & (Enabled::TCP_CLOSED | Enabled::TCP_SENT | Enabled::TCP_RECEIVED);
        if on.has(Enabled::TCP_CLOSED) {
            s.closed += 1;
        }
        if on.has(Enabled::TCP_RECEIVED) {
            s.received += received;
        }
        if on.has(Enabled::TCP_SENT) {
            s.sent += sent;
        }
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self, out: &mut String) {
        self.render_tcp(out);
        // A copy taken under the lock; formatted outside it (requests record meanwhile).
        let copy: Vec<(Key, Series)> = self
            .http
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        // Per metric, by labels: series that tag overrides make alike (a label removed)
        // are summed.
        let mut count: BTreeMap<String, u64> = BTreeMap::new();
        let mut duration: BTreeMap<String, Hist<19>> = BTreeMap::new();
        let mut request_bytes: BTreeMap<String, Hist<8>> = BTreeMap::new();
        let mut response_bytes: BTreeMap<String, Hist<8>> = BTreeMap::new();
        for (k, s) in &copy {
            let on = |bit: u16| s.observed & bit != 0;
            if on(Enabled::REQUEST_COUNT) {
                *count
                    .entry(labels(k, false, Enabled::REQUEST_COUNT))
                    .or_default() += s.requests;
            }
            if on(Enabled::REQUEST_DURATION) {
                duration
                    .entry(labels(k, false, Enabled::REQUEST_DURATION))
                    .or_default()
                    .add(&s.duration);
            }
            if on(Enabled::REQUEST_SIZE) {
                request_bytes
                    .entry(labels(k, false, Enabled::REQUEST_SIZE))
                    .or_default()
                    .add(&s.request_bytes);
            }
            if on(Enabled::RESPONSE_SIZE) {
                response_bytes
                    .entry(labels(k, false, Enabled::RESPONSE_SIZE))
                    .or_default()
                    .add(&s.response_bytes);
            }
        }
        let _ = writeln!(
            out,
            "# HELP istio_requests_total Requests, by Istio's standard labels."
        );
        let _ = writeln!(out, "# TYPE istio_requests_total counter");
        for (l, n) in &count {
            let _ = writeln!(out, "istio_requests_total{{{l}}} {n}");
        }
        histogram(
            out,
            "istio_request_duration_milliseconds",
            "Request duration (milliseconds).",
            &DURATION_MS,
            &duration,
        );
        histogram(
            out,
            "istio_request_bytes",
            "Request body size (bytes).",
            &SIZE_BYTES,
            &request_bytes,
        );
        histogram(
            out,
            "istio_response_bytes",
            "Response body size (bytes).",
            &SIZE_BYTES,
            &response_bytes,
        );
    }
}

impl IstioMetrics {
    fn render_tcp(&self, out: &mut String) {
        let copy: Vec<(Key, TcpSeries)> = self
            .tcp
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (name, help, bit, value) in [
            (
                "istio_tcp_connections_opened_total",
                "TCP connections opened.",
                Enabled::TCP_OPENED,
                (|s: &TcpSeries| s.opened) as fn(&TcpSeries) -> u64,
            ),
            (
                "istio_tcp_connections_closed_total",
                "TCP connections closed.",
                Enabled::TCP_CLOSED,
                |s| s.closed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent to the client (the response direction), counted when the connection closes.",
                Enabled::TCP_SENT,
                |s| s.sent,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received from the client (the request direction), counted when the connection closes.",
                Enabled::TCP_RECEIVED,
                |s| s.received,
            ),
        ] {
            let mut series: BTreeMap<String, u64> = BTreeMap::new();
            for (k, s) in copy.iter().filter(|(_, s)| s.observed & bit != 0) {
                *series.entry(labels(k, true, bit)).or_default() += value(s);
            }
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (l, n) in &series {
                let _ = writeln!(out, "{name}{{{l}}} {n}");
            }
        }
    }
}

fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    bounds: &[f64; N],
    series: &BTreeMap<String, Hist<N>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (l, h) in series {
        let mut cumulative = 0;
        for (b, n) in bounds.iter().zip(&h.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{b}\"}} {cumulative}");
        }
        let count = h.count();
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{{l}}} {count}");
    }
}

/// The labels of a series in metric `bit`: Istio's set, in Istio's order, as the
/// side's tag overrides change it. (A TCP series has `request_protocol="tcp"` and no
/// status labels.)
fn labels(k: &Key, tcp: bool, bit: u16) -> String {
    let (s, d, svc) = (&k.source.0, &k.destination.0, &k.service.0);
    let mut pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::with_capacity(26);
    let mut put = |name: &'static str, v: &str| {
        pairs.push((Cow::Borrowed(name), Cow::Owned(v.to_string())));
    };
    put(
        "reporter",
        match k.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        },
    );
    put("source_workload", &s.workload);
    put("source_canonical_service", &s.canonical_service);
    put("source_canonical_revision", &s.canonical_revision);
    put("source_workload_namespace", &s.namespace);
    put("source_principal", &s.principal);
    put("source_app", &s.app);
    put("source_version", &s.version);
    put("source_cluster", CLUSTER);
    put("destination_workload", &d.workload);
    put("destination_workload_namespace", &d.namespace);
    put("destination_principal", &d.principal);
    put("destination_app", &d.app);
    put("destination_version", &d.version);
    put("destination_service", &svc.service);
    put("destination_canonical_service", &d.canonical_service);
    put("destination_canonical_revision", &d.canonical_revision);
    put("destination_service_name", &svc.name);
    put("destination_service_namespace", &svc.namespace);
    put("destination_cluster", CLUSTER);
    if tcp {
        put("request_protocol", "tcp");
    } else {
        put("request_protocol", if k.grpc { "grpc" } else { "http" });
        put("response_code", &k.code.to_string());
        put(
            "grpc_response_status",
            &k.grpc_status.map(|g| g.to_string()).unwrap_or_default(),
        );
    }
    put("response_flags", k.flags);
    put(
        "connection_security_policy",
        match (k.reporter, k.mtls) {
            (Reporter::Source, _) => "unknown",
            (Reporter::Destination, true) => "mutual_tls",
            (Reporter::Destination, false) => "none",
        },
    );
    if let Some((t, values)) = &k.tags {
        t.0.apply(bit.trailing_zeros() as usize, &mut pairs, values);
    }
    let mut out = String::with_capacity(900);
    for (name, v) in &pairs {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", crate::stats::escape(v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_nobody_holds_are_dropped_and_held_ones_kept() {
        static SET: OnceLock<Mutex<Interner<String>>> = OnceLock::new();
        let held: Vec<Arc<String>> = (0..10)
            .map(|i| interned(&SET, format!("held-{i}")))
            .collect();
        // 10,000 pods that came and went.
        for i in 0..10_000 {
            drop(interned(&SET, format!("gone-{i}")));
        }
        let len = SET
            .get()
            .map(|m| m.lock().map(|i| i.map.len()).unwrap_or(0))
            .unwrap_or(0);
        assert!(len <= 128, "{len} label sets kept");
        for (i, h) in held.iter().enumerate() {
            assert!(
                Arc::ptr_eq(h, &interned(&SET, format!("held-{i}"))),
                "held-{i}"
            );
        }
    }

    #[test]
    fn labels_come_from_interned_metadata_and_series_are_counted() {
        let web = WorkloadMeta::of(
            "web",
            "shop",
            Some("spiffe://cluster.local/ns/shop/sa/web"),
            [("app", "web"), ("version", "v1")].into_iter(),
        );
        let again = WorkloadMeta::of(
            "web",
            "shop",
            Some("spiffe://cluster.local/ns/shop/sa/web"),
            [("version", "v1"), ("app", "web")].into_iter(),
        );
        assert!(Arc::ptr_eq(&web, &again), "the same content, the same Arc");
        let reviews = WorkloadMeta::of(
            "reviews-v2",
            "",
            Some("spiffe://cluster.local/ns/shop/sa/reviews"),
            std::iter::empty(),
        );
        assert_eq!(reviews.namespace, "shop", "from the identity");
        assert_eq!(reviews.app, "unknown");
        assert_eq!(reviews.canonical_service, "reviews-v2");
        assert_eq!(reviews.canonical_revision, "latest");
        let svc = ServiceMeta::of("reviews.shop.svc.cluster.local");
        assert_eq!(
            (svc.name.as_str(), svc.namespace.as_str()),
            ("reviews", "shop")
        );
        assert_eq!(ServiceMeta::of("api.example.com").namespace, "unknown");

        let m = IstioMetrics::default();
        let r = HttpRequest {
            reporter: Reporter::Source,
            source: web,
            destination: reviews,
            service: svc,
            grpc: false,
            code: 200,
            grpc_status: None,
            flags: "-",
            mtls: true,
            duration: Duration::from_millis(3),
            request_bytes: 0,
            response_bytes: 1024,
            enabled: Enabled::ALL,
            tags: None,
        };
        m.record_http(&r);
        m.record_http(&r);
        m.record_http(&HttpRequest {
            code: 503,
            flags: flag(b"UF"),
            ..r.clone()
        });
        let mut text = String::new();
        m.render(&mut text);
        let ok = "reporter=\"source\",source_workload=\"web\",source_canonical_service=\"web\",source_canonical_revision=\"v1\",source_workload_namespace=\"shop\",source_principal=\"spiffe://cluster.local/ns/shop/sa/web\",source_app=\"web\",source_version=\"v1\",source_cluster=\"Kubernetes\",destination_workload=\"reviews-v2\",destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/reviews\",destination_app=\"unknown\",destination_version=\"unknown\",destination_service=\"reviews.shop.svc.cluster.local\",destination_canonical_service=\"reviews-v2\",destination_canonical_revision=\"latest\",destination_service_name=\"reviews\",destination_service_namespace=\"shop\",destination_cluster=\"Kubernetes\",request_protocol=\"http\",response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\",connection_security_policy=\"unknown\"";
        assert!(
            text.contains(&format!("istio_requests_total{{{ok}}} 2\n")),
            "{text}"
        );
        assert!(
            text.contains("response_code=\"503\",grpc_response_status=\"\",response_flags=\"UF\""),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "istio_request_duration_milliseconds_bucket{{{ok},le=\"5\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "istio_request_duration_milliseconds_bucket{{{ok},le=\"1\"}} 0\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "istio_response_bytes_bucket{{{ok},le=\"1000\"}} 0\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "istio_response_bytes_bucket{{{ok},le=\"10000\"}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("istio_response_bytes_sum{{{ok}}} 2048\n")),
            "{text}"
        );
        assert_eq!(flag(b"whatever"), "-");

        // A side whose Telemetry disables metrics records nothing of them; a disabled
        // metric is absent from the exposition, the others stay.
        let telemetry = |metrics| trellis_xds::snapshot::Telemetry {
            metrics: Some(metrics),
            ..Default::default()
        };
        let only_count =
            Switches::compile(Some(&telemetry(trellis_xds::snapshot::MetricsConfig {
                overrides: vec![
                    trellis_xds::snapshot::MetricOverride {
                        metric: "ALL_METRICS".into(),
                        mode: "CLIENT_AND_SERVER".into(),
                        disabled: Some(true),
                        ..Default::default()
                    },
                    trellis_xds::snapshot::MetricOverride {
                        metric: "REQUEST_COUNT".into(),
                        mode: "CLIENT".into(),
                        disabled: Some(false),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })));
        assert!(only_count.client.has(Enabled::REQUEST_COUNT));
        assert!(!only_count.client.has(Enabled::REQUEST_DURATION));
        assert_eq!(only_count.server, Enabled(0));
        let quiet = IstioMetrics::default();
        quiet.record_http(&HttpRequest {
            enabled: only_count.server,
            ..r.clone()
        });
        let mut text = String::new();
        quiet.render(&mut text);
        assert!(!text.contains("istio_requests_total{"), "{text}");
        quiet.record_http(&HttpRequest {
            enabled: only_count.client,
            ..r.clone()
        });
        let mut text = String::new();
        quiet.render(&mut text);
        assert!(
            text.contains(&format!("istio_requests_total{{{ok}}} 1\n")),
            "{text}"
        );
        assert!(
            !text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(!text.contains("istio_response_bytes_bucket{"), "{text}");
        // Providers that leave out prometheus: nothing at all.
        let elsewhere = Switches::compile(Some(&telemetry(trellis_xds::snapshot::MetricsConfig {
            providers: vec!["stackdriver".into()],
            ..Default::default()
        })));
        assert_eq!(elsewhere.client, Enabled(0));
        // A Prometheus provider by another name is Prometheus.
        let mut renamed = telemetry(trellis_xds::snapshot::MetricsConfig {
            providers: vec!["prom".into()],
            ..Default::default()
        });
        renamed
            .providers
            .push(trellis_xds::snapshot::TelemetryProvider {
                name: "prom".into(),
                kind: "prometheus".into(),
                ..Default::default()
            });
        assert_eq!(Switches::compile(Some(&renamed)), Switches::default());
    }

    #[test]
    fn a_caller_is_its_address_s_workload_when_its_identity_agrees() {
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let web = WorkloadMeta::of("web", "shop", Some(id), std::iter::empty());
        let ip: std::net::IpAddr = [10, 0, 0, 7].into();
        let peers: FastMap<_, _> = [(ip, Arc::clone(&web))].into_iter().collect();
        let m = IstioMetrics::default();
        assert!(Arc::ptr_eq(&m.caller(&peers, ip, Some(id)), &web));
        assert!(Arc::ptr_eq(&m.caller(&peers, ip, None), &web));
        // Another identity at that address: what the identity says, not the address.
        let other = "spiffe://cluster.local/ns/ops/sa/cron";
        let c = m.caller(&peers, ip, Some(other));
        assert_eq!(
            (
                c.workload.as_str(),
                c.namespace.as_str(),
                c.principal.as_str()
            ),
            ("unknown", "ops", other)
        );
        assert!(
            Arc::ptr_eq(&c, &m.caller(&peers, ip, Some(other))),
            "made once"
        );
        let nobody = m.caller(&peers, [10, 0, 0, 8].into(), None);
        assert_eq!(nobody.workload, "unknown");
    }
}
