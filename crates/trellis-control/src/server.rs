//! The control plane's push loop, independent of the transport: proxies connect with the
//! instance they run beside, the loop recomputes their snapshots when the configuration or
//! the set of instances changes (debounced), sends each proxy its snapshot only when it
//! changed, and records every ACK and NACK for `proxy-status`.
//!
//! Proxies in the same process (tests, `trellis up`'s first version) follow their session
//! directly; the gRPC Delta ADS transport will carry the same sessions over the network.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};
use trellis_api::Resource;
use trellis_xds::snapshot as wire;

use crate::mesh::{MeshConfig, ROOT_NAMESPACE, sidecar_snapshot};
use crate::registry::{Instance, Registry};
use crate::store::ConfigStore;

/// When to push after a change: once the configuration has been quiet for `quiet`, and at
/// the latest `max` after the first change of a burst.
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    pub quiet: Duration,
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// What the control plane knows of one connected proxy.
#[derive(Debug, Clone)]
pub struct ProxyStatus {
    pub id: u64,
    pub instance: String,
    pub namespace: String,
    /// Its SPIFFE identity (what its certificate is issued for).
    pub identity: String,
    /// The version last sent, and when.
    pub sent: Option<(String, SystemTime)>,
    /// The version the proxy last accepted.
    pub acked: Option<String>,
    /// The version the proxy last refused, with its reason.
    pub nacked: Option<(String, String)>,
    /// When the last certificate issued to this instance expires.
    pub certificate_expiry: Option<SystemTime>,
}

/// What an instance registering under a WorkloadGroup takes from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTemplate {
    pub labels: std::collections::BTreeMap<String, String>,
    pub service_account: String,
    pub ports: Vec<(String, u16)>,
    pub locality: Option<String>,
}

/// What one proxy is sent: the translation of its scope, shared by every proxy of that
/// scope (and its encoding, made once), and its own workload. The control plane holds one
/// copy of a scope's snapshot however many proxies it serves.
#[derive(Debug)]
pub struct Pushed {
    pub version: String,
    /// The scope's snapshot, without version or workload.
    pub scope: Arc<wire::Snapshot>,
    /// `scope`'s services and clusters as Delta ADS resources (made once per scope).
    pub parts: Arc<Vec<trellis_xds::delta::Part>>,
    /// The rest of `scope` (settings, gateway ports…).
    own: Arc<wire::Snapshot>,
    pub workload: Option<wire::Workload>,
    /// The mesh's trust bundle (the same `Arc` for every proxy).
    pub trust_roots: Arc<Vec<String>>,
    /// When the configuration change this push carries was first seen (for
    /// `trellis_control_config_convergence_seconds`); `None` for pushes not caused by one.
    pub changed_at: Option<Instant>,
}

impl Pushed {
    /// The whole snapshot (a copy: for inspection and in-process proxies).
    pub fn snapshot(&self) -> wire::Snapshot {
        let mut s = (*self.scope).clone();
        s.version = self.version.clone();
        s.workload = self.workload.clone();
        s.trust_roots = (*self.trust_roots).clone();
        s
    }

    /// The `proxy` resource: everything but the services and clusters.
    pub fn proxy_part(&self) -> trellis_xds::delta::Part {
        trellis_xds::delta::proxy_part(&wire::Snapshot {
            workload: self.workload.clone(),
            trust_roots: (*self.trust_roots).clone(),
            ..(*self.own).clone()
        })
    }
}

/// One scope's translation, and what it travels as.
#[derive(Clone)]
struct Scope {
    snapshot: Arc<wire::Snapshot>,
    parts: Arc<Vec<trellis_xds::delta::Part>>,
    /// `snapshot` without its services and clusters.
    own: Arc<wire::Snapshot>,
}

impl Scope {
    fn new(snapshot: wire::Snapshot) -> Scope {
        let parts = Arc::new(trellis_xds::delta::shared_parts(&snapshot));
        let own = Arc::new(wire::Snapshot {
            services: Vec::new(),
            clusters: Vec::new(),
            peers: Vec::new(),
            ..snapshot.clone()
        });
        Scope {
            snapshot: Arc::new(snapshot),
            parts,
            own,
        }
    }
}

struct Conn {
    instance: Instance,
    tx: watch::Sender<Option<Arc<Pushed>>>,
    last: Option<Arc<Pushed>>,
    status: ProxyStatus,
}

/// A proxy's end of the connection: snapshots arrive on `snapshots`; report back with
/// [`ControlPlane::ack`] / [`ControlPlane::nack`]. Dropping it does not disconnect; call
/// [`ControlPlane::disconnect`].
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub snapshots: watch::Receiver<Option<Arc<Pushed>>>,
}

/// A Prometheus histogram with fixed buckets, in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or under each bound (not cumulative; summed when rendered).
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The histogram in Prometheus' text format.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Buckets for push and convergence times (seconds).
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0];

/// How long a disconnected proxy's instance stays in the registry by default (a proxy that
/// reconnects meanwhile, after a control-plane restart say, causes no endpoint churn).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// The control plane: configuration store, connected proxies, push loop.
pub struct ControlPlane {
    store: Arc<ConfigStore>,
    conns: Mutex<BTreeMap<u64, Conn>>,
    /// Instances whose proxy disconnected, kept until the instant given.
    departed: Mutex<Vec<(Instance, Instant)>>,
    grace: Duration,
    /// Held for the whole of a push.
    pushing: Mutex<()>,
    /// Each scope's translation at the last push, and its encoding.
    scopes: Mutex<std::collections::HashMap<String, Scope>>,
    next_id: AtomicU64,
    /// Bumped by connects and disconnects (the registry changes with them).
    membership: Notify,
    pushes: AtomicU64,
    /// How long each push took (translation and handing the snapshots to the sessions).
    pub push_seconds: Histogram,
    /// From sending a proxy a version to its ACK of that version.
    pub convergence_seconds: Histogram,
    /// From a configuration change to each affected proxy's ACK of it.
    pub config_convergence_seconds: Histogram,
    /// Translation time per push (every scope and workload).
    pub translation_seconds: Histogram,
    debounce: Debounce,
    root_namespace: String,
    trust_domain: String,
    /// The mesh config file (`--mesh-config`): telemetry providers and mesh-wide defaults.
    mesh_config: Mutex<Arc<trellis_api::mesh::MeshConfigFile>>,
    /// (namespace, instance) → when the last certificate issued to it expires.
    certificates: Mutex<std::collections::HashMap<(String, String), SystemTime>>,
    certificates_issued: AtomicU64,
    /// The trust bundle sent to every proxy.
    trust_roots: Mutex<Arc<Vec<String>>>,
    /// Responses sent and not yet answered, across all proxies: at most this many.
    push_slots: Mutex<(usize, Arc<tokio::sync::Semaphore>)>,
    /// Resources sent: proxy parts, services, clusters.
    resources_sent: [AtomicU64; 3],
}

/// How many proxies may have a push in flight (sent, not yet answered) at once, by
/// default (Istio's `PILOT_PUSH_THROTTLE` is 100 too).
pub const DEFAULT_PUSH_CONCURRENCY: usize = 100;
/// How long a push holds its slot waiting for the proxy's answer.
pub const PUSH_SLOT_HOLD: Duration = Duration::from_secs(5);

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

impl ControlPlane {
    pub fn new(store: Arc<ConfigStore>, debounce: Debounce) -> Arc<ControlPlane> {
        ControlPlane::with_grace(store, debounce, DEFAULT_GRACE)
    }

    /// As [`ControlPlane::new`], keeping a disconnected proxy's instance for `grace`.
    pub fn with_grace(
        store: Arc<ConfigStore>,
        debounce: Debounce,
        grace: Duration,
    ) -> Arc<ControlPlane> {
        ControlPlane::with_options(store, debounce, grace, "cluster.local")
    }

    /// All the settings: debounce, grace period, and the SPIFFE trust domain of endpoint
    /// identities.
    pub fn with_options(
        store: Arc<ConfigStore>,
        debounce: Debounce,
        grace: Duration,
        trust_domain: &str,
    ) -> Arc<ControlPlane> {
        Arc::new(ControlPlane {
            store,
            conns: Mutex::new(BTreeMap::new()),
            departed: Mutex::new(Vec::new()),
            grace,
            pushing: Mutex::new(()),
            scopes: Mutex::new(std::collections::HashMap::new()),
            next_id: AtomicU64::new(1),
            membership: Notify::new(),
            pushes: AtomicU64::new(0),
            push_seconds: Histogram::new(LATENCY_BUCKETS),
            convergence_seconds: Histogram::new(LATENCY_BUCKETS),
            config_convergence_seconds: Histogram::new(LATENCY_BUCKETS),
            translation_seconds: Histogram::new(LATENCY_BUCKETS),
            debounce,
            root_namespace: ROOT_NAMESPACE.to_string(),
            mesh_config: Mutex::default(),
            trust_domain: trust_domain.to_string(),
            certificates: Mutex::new(std::collections::HashMap::new()),
            certificates_issued: AtomicU64::new(0),
            trust_roots: Mutex::new(Arc::new(Vec::new())),
            push_slots: Mutex::new((
                DEFAULT_PUSH_CONCURRENCY,
                Arc::new(tokio::sync::Semaphore::new(DEFAULT_PUSH_CONCURRENCY)),
            )),
            resources_sent: Default::default(),
        })
    }

    /// Mesh-wide settings from the mesh config file; applies from the next push. Its
    /// `rootNamespace` replaces the default (`istio-system`) where mesh-wide policies live.
    pub fn set_mesh_config(&self, m: trellis_api::mesh::MeshConfigFile) {
        *self
            .mesh_config
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(m);
    }

    /// At most `n` (at least 1) proxies have a push in flight at once; the others wait
    /// for a slot. Set it before proxies connect: pushes in flight keep their slots of
    /// the previous limit (and `pushes_in_flight` counts only the new one's).
    pub fn set_push_concurrency(&self, n: usize) {
        let n = n.max(1);
        *self
            .push_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            (n, Arc::new(tokio::sync::Semaphore::new(n)));
    }

    /// A slot for one push, held until the proxy answers or [`PUSH_SLOT_HOLD`] passes.
    pub async fn push_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = Arc::clone(
            &self
                .push_slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .1,
        );
        slots.acquire_owned().await.ok()
    }

    /// Pushes sent and not yet answered (or given up on).
    pub fn pushes_in_flight(&self) -> usize {
        let slots = self
            .push_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        slots.0.saturating_sub(slots.1.available_permits())
    }

    /// `sent` went to a proxy.
    pub fn resources_sent(&self, sent: &[trellis_xds::ads::Resource]) {
        use trellis_xds::delta::{CLUSTER_TYPE_URL, SERVICE_TYPE_URL};
        for r in sent {
            let i = match r.resource.as_ref().map(|a| a.type_url.as_str()) {
                Some(SERVICE_TYPE_URL) => 1,
                Some(CLUSTER_TYPE_URL) => 2,
                _ => 0,
            };
            self.resources_sent[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Resources sent to proxies since the start.
    pub fn resources_sent_total(&self) -> u64 {
        self.resources_sent
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Resources sent by type: (`proxy`, `service`, `cluster`).
    pub fn resources_sent_by_type(&self) -> [(&'static str, u64); 3] {
        let n = |i: usize| self.resources_sent[i].load(Ordering::Relaxed);
        [("proxy", n(0)), ("service", n(1)), ("cluster", n(2))]
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A proxy connects for `instance`: it becomes an endpoint of the services that select
    /// it, and gets its first snapshot from the push loop.
    pub fn connect(&self, instance: Instance) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let status = ProxyStatus {
            id,
            instance: instance.name.clone(),
            namespace: instance.namespace.clone(),
            identity: format!(
                "spiffe://{}/ns/{}/sa/{}",
                self.trust_domain, instance.namespace, instance.service_account
            ),
            sent: None,
            acked: None,
            nacked: None,
            certificate_expiry: None,
        };
        {
            // Lock order: connections, then departed instances (as in push_all), so a
            // returning instance is never missing from a push.
            let mut conns = self.conns();
            self.departed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|(i, _)| !(i.name == instance.name && i.namespace == instance.namespace));
            conns.insert(
                id,
                Conn {
                    instance,
                    tx,
                    last: None,
                    status,
                },
            );
        }
        // The push loop sends the first snapshot (off the async threads, debounced with
        // the other arrivals: a thousand reconnecting proxies cost one round).
        self.membership.notify_one();
        Session { id, snapshots: rx }
    }

    /// The proxy is gone: its instance leaves the registry once the grace period has
    /// passed without it reconnecting.
    pub fn disconnect(&self, id: u64) {
        {
            let mut conns = self.conns();
            let Some(c) = conns.remove(&id) else {
                return;
            };
            if !self.grace.is_zero() {
                self.departed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((c.instance, Instant::now() + self.grace));
            }
        }
        self.membership.notify_one();
    }

    /// Departed instances still within their grace period (expired ones dropped), and
    /// when the next one expires.
    fn lingering(&self) -> (Vec<Instance>, Option<Instant>) {
        let now = Instant::now();
        let mut d = self.departed.lock().unwrap_or_else(PoisonError::into_inner);
        d.retain(|(_, until)| *until > now);
        (
            d.iter().map(|(i, _)| i.clone()).collect(),
            d.iter().map(|(_, until)| *until).min(),
        )
    }

    pub fn ack(&self, id: u64, version: &str) {
        if let Some(c) = self.conns().get_mut(&id) {
            if let Some((sent, at)) = &c.status.sent {
                if sent == version && c.status.acked.as_deref() != Some(version) {
                    if let Ok(took) = at.elapsed() {
                        self.convergence_seconds.observe(took);
                    }
                    if let Some(changed) = c
                        .last
                        .as_ref()
                        .filter(|p| p.version == version)
                        .and_then(|p| p.changed_at)
                    {
                        self.config_convergence_seconds.observe(changed.elapsed());
                    }
                }
            }
            c.status.acked = Some(version.to_string());
        }
    }

    /// The proxy refused `version`: recorded with its reason (and logged).
    pub fn nack(&self, id: u64, version: &str, error: &str) {
        if let Some(c) = self.conns().get_mut(&id) {
            tracing::warn!(proxy = %c.status.instance, version, "snapshot refused by the proxy: {error}");
            c.status.nacked = Some((version.to_string(), error.to_string()));
        }
    }

    /// The declared `Workload` an instance belongs to (`name` is the workload's, or a
    /// replica's `<workload>-<n>`): its labels, service account and name.
    pub fn declared_workload(
        &self,
        namespace: &str,
        instance: &str,
    ) -> Option<(std::collections::BTreeMap<String, String>, String, String)> {
        self.store
            .list(trellis_api::Kind::Workload)
            .iter()
            .find_map(|r| match &r.spec {
                trellis_api::Spec::Workload(w)
                    if r.namespace() == namespace
                        && (instance == r.name()
                            || instance
                                .strip_prefix(r.name())
                                .is_some_and(|rest| rest.starts_with('-'))) =>
                {
                    Some((
                        r.meta.labels.clone(),
                        w.service_account().to_string(),
                        r.name().to_string(),
                    ))
                }
                _ => None,
            })
    }

    /// The template of WorkloadGroup `name` in `namespace`, for an instance that
    /// registers under it: the group's labels (`metadata.labels`, then the template's),
    /// service account (`default` when unset), ports and locality.
    pub fn workload_group(&self, namespace: &str, name: &str) -> Option<GroupTemplate> {
        self.store
            .list(trellis_api::Kind::WorkloadGroup)
            .iter()
            .find_map(|r| match &r.spec {
                trellis_api::Spec::WorkloadGroup(g)
                    if r.namespace() == namespace && r.name() == name =>
                {
                    let mut labels = g
                        .metadata
                        .as_ref()
                        .map(|m| m.labels.clone())
                        .unwrap_or_default();
                    labels.extend(g.template.labels.clone());
                    Some(GroupTemplate {
                        labels,
                        service_account: g
                            .template
                            .service_account
                            .clone()
                            .unwrap_or_else(|| "default".to_string()),
                        ports: g
                            .template
                            .ports
                            .iter()
                            .filter_map(|(n, p)| Some((n.clone(), u16::try_from(*p).ok()?)))
                            .collect(),
                        locality: g.template.locality.clone(),
                    })
                }
                _ => None,
            })
    }

    /// The snapshot last sent to the proxy of `instance` in `namespace`.
    pub fn last_snapshot(&self, instance: &str, namespace: &str) -> Option<wire::Snapshot> {
        self.conns()
            .values()
            .find(|c| c.status.instance == instance && c.status.namespace == namespace)
            .and_then(|c| c.last.as_ref().map(|p| p.snapshot()))
    }

    pub fn status(&self) -> Vec<ProxyStatus> {
        let certs = self
            .certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.conns()
            .values()
            .map(|c| {
                let mut s = c.status.clone();
                let key = (s.namespace.clone(), s.instance.clone());
                s.certificate_expiry = certs.get(&key).copied();
                s
            })
            .collect()
    }

    /// The CA issued a certificate, valid until `not_after`, to `instance` (a name the
    /// proxy gave in its request) of `namespace` (what its token proved).
    pub fn certificate_issued(
        &self,
        namespace: &str,
        instance: Option<&str>,
        not_after: SystemTime,
    ) {
        self.certificates_issued.fetch_add(1, Ordering::Relaxed);
        if let Some(name) = instance {
            let mut certs = self
                .certificates
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // Bounded by the instances that ever asked; forget the long expired.
            let now = SystemTime::now();
            certs.retain(|_, t| *t > now);
            certs.insert((namespace.to_string(), name.to_string()), not_after);
        }
    }

    /// Sets the trust bundle every proxy is sent (root certificates, PEM); a change is
    /// pushed to every proxy. Whether it changed.
    pub fn set_trust_roots(&self, roots: Vec<String>) -> bool {
        {
            let mut held = self
                .trust_roots
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if **held == roots {
                return false;
            }
            *held = Arc::new(roots);
        }
        self.membership.notify_one();
        true
    }

    /// Certificates issued so far.
    pub fn certificates_issued(&self) -> u64 {
        self.certificates_issued.load(Ordering::Relaxed)
    }

    /// Snapshots sent so far (all proxies).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Recomputes every proxy's snapshot from the store as it is now and sends the ones
    /// that changed.
    pub fn push_all(&self) {
        self.push_since(None);
    }

    /// As [`ControlPlane::push_all`], for a configuration change first seen at `changed_at`.
    pub fn push_since(&self, changed_at: Option<Instant>) {
        // One push at a time, each from the store as it is when it starts: a proxy never
        // receives an older configuration after a newer one.
        let _one = self.pushing.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let snap = self.store.snapshot();
        let resources: Vec<&Resource> = snap.objects.iter().map(|r| r.as_ref()).collect();
        let mut conns = self.conns();
        let (mut instances, _) = self.lingering();
        instances.extend(conns.values().map(|c| c.instance.clone()));
        let mut registry = Registry::build(&resources, instances);
        registry.trust_domain = self.trust_domain.clone();
        let mesh_config = Arc::clone(
            &self
                .mesh_config
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        if let Some(root) = mesh_config.root_namespace.as_deref() {
            registry.peer_auth =
                crate::peerauth::PeerAuthPolicies::from_resources(&resources, root);
        }
        let cfg = MeshConfig {
            resources: &resources,
            root_namespace: mesh_config
                .root_namespace
                .as_deref()
                .unwrap_or(&self.root_namespace),
            mesh_config: Some(&mesh_config),
        };
        // Proxies of the same scope (namespace, Sidecar, and labels where a selector could
        // tell them apart) see the same services, routes and clusters: translated once.
        let version = format!("r{}", snap.revision);
        // A scope whose translation did not change keeps its previous copy, so that the
        // proxies of that scope see the very same `Arc` and are skipped cheaply.
        let mut previous =
            std::mem::take(&mut *self.scopes.lock().unwrap_or_else(PoisonError::into_inner));
        let trust_roots = Arc::clone(
            &self
                .trust_roots
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut by_scope: std::collections::HashMap<String, Scope> =
            std::collections::HashMap::new();
        let mut translating = Duration::ZERO;
        for c in conns.values_mut() {
            let key = crate::mesh::scope_key(&cfg, &c.instance);
            let Scope {
                snapshot: scope,
                parts,
                own,
            } = by_scope
                .entry(key)
                .or_insert_with_key(|key| {
                    let t = Instant::now();
                    let built = sidecar_snapshot(&cfg, &registry, &c.instance, &version);
                    translating += t.elapsed();
                    for p in &built.problems {
                        tracing::warn!(proxy = %c.status.instance, "{p}");
                    }
                    let mut scope = built.snapshot;
                    scope.version.clear();
                    scope.workload = None;
                    match previous.remove(key) {
                        Some(prev) if *prev.snapshot == scope => prev,
                        _ => Scope::new(scope),
                    }
                })
                .clone();
            let t = Instant::now();
            let workload = Some(crate::mesh::workload_of(&cfg, &registry, &c.instance));
            translating += t.elapsed();
            // Same content as last time: nothing to send (the version alone moved).
            if let Some(last) = &c.last {
                if Arc::ptr_eq(&last.scope, &scope)
                    && last.workload == workload
                    && Arc::ptr_eq(&last.trust_roots, &trust_roots)
                {
                    continue;
                }
            }
            let fresh = Arc::new(Pushed {
                version: format!("{version}-{}", self.pushes.load(Ordering::Relaxed) + 1),
                scope,
                parts,
                own,
                workload,
                trust_roots: Arc::clone(&trust_roots),
                changed_at,
            });
            c.last = Some(Arc::clone(&fresh));
            c.status.sent = Some((fresh.version.clone(), SystemTime::now()));
            self.pushes.fetch_add(1, Ordering::Relaxed);
            let _ = c.tx.send(Some(fresh));
        }
        *self.scopes.lock().unwrap_or_else(PoisonError::into_inner) = by_scope;
        self.translation_seconds.observe(translating);
        self.push_seconds.observe(started.elapsed());
    }

    /// Pushes after every configuration change or change of membership, debounced, until
    /// the runtime stops.
    pub async fn run(self: Arc<Self>) {
        let mut revisions = self.store.subscribe();
        loop {
            // A departed instance's grace ending is a change too.
            let expiry = self.lingering().1;
            let grace_over = async {
                match expiry {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = revisions.changed() => if r.is_err() { return },
                _ = self.membership.notified() => {}
                _ = grace_over => {}
            }
            // Debounce: wait for `quiet` without a change, at most `max` in all.
            let start = Instant::now();
            loop {
                let left = self.debounce.max.saturating_sub(start.elapsed());
                if left.is_zero() {
                    break;
                }
                let wait = self.debounce.quiet.min(left);
                tokio::select! {
                    r = revisions.changed() => if r.is_err() { return },
                    _ = self.membership.notified() => {}
                    _ = tokio::time::sleep(wait) => break,
                }
            }
            let cp = Arc::clone(&self);
            // Translation is CPU work: off the async threads.
            if tokio::task::spawn_blocking(move || cp.push_since(Some(start)))
                .await
                .is_err()
            {
                tracing::error!("push failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::InstancePort;

    fn instance(name: &str, ns: &str, app: &str) -> Instance {
        Instance {
            name: name.into(),
            workload: name.into(),
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into_iter().collect(),
            service_account: name.into(),
            addresses: vec!["10.0.0.1".parse().expect("ip")],
            ports: vec![InstancePort {
                name: Some("http".into()),
                port: 9080,
                protocol: None,
            }],
            locality: None,
            entry: false,
        }
    }

    fn endpoints(s: &Session) -> usize {
        s.snapshots
            .borrow()
            .as_ref()
            .and_then(|snap| {
                snap.scope
                    .clusters
                    .iter()
                    .find(|c| c.name == "outbound|9080||reviews.shop.svc.cluster.local")
                    .map(|c| c.endpoints.len())
            })
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_departed_instance_stays_for_the_grace_period() {
        let store = Arc::new(ConfigStore::new());
        for p in trellis_api::parse_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n",
            "svc.yaml",
            &trellis_api::LoadOptions::default(),
        ) {
            if let Some(r) = p.resource() {
                store.apply(r.clone());
            }
        }
        let quick = Debounce {
            quiet: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let cp = ControlPlane::with_grace(store, quick, Duration::from_millis(300));
        tokio::spawn(Arc::clone(&cp).run());
        let client = cp.connect(instance("web-0", "web", "web"));
        let r = cp.connect(instance("reviews-v1", "shop", "reviews"));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(endpoints(&client), 1);
        cp.disconnect(r.id);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(endpoints(&client), 1, "still there within the grace period");
        // Reconnecting within the grace period: no churn at all.
        let r = cp.connect(instance("reviews-v1", "shop", "reviews"));
        cp.disconnect(r.id);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(endpoints(&client), 0, "gone after the grace period");
    }

    #[tokio::test]
    async fn the_mesh_config_moves_the_root_namespace_and_sets_mesh_wide_defaults() {
        let store = Arc::new(ConfigStore::new());
        // STRICT in the mesh config's root namespace applies mesh-wide; in istio-system,
        // now an ordinary namespace, it would not.
        for p in trellis_api::parse_text(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: mesh-root}\nspec:\n  mtls: {mode: STRICT}\n",
            "pa.yaml",
            &trellis_api::LoadOptions::default(),
        ) {
            if let Some(r) = p.resource() {
                store.apply(r.clone());
            }
        }
        let (mesh, _) = trellis_api::mesh::parse_mesh_config(
            "rootNamespace: mesh-root\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}\ndefaultConfig: {gatewayTopology: {numTrustedProxies: 2}}\naccessLogFile: /dev/stdout\n",
            "mesh.yaml",
        )
        .expect("mesh config");
        let cp = ControlPlane::new(
            store,
            Debounce {
                quiet: Duration::from_millis(10),
                max: Duration::from_millis(50),
            },
        );
        cp.set_mesh_config(mesh);
        tokio::spawn(Arc::clone(&cp).run());
        let mut a = cp.connect(instance("web-0", "web", "web"));
        let mut got = None;
        for _ in 0..100 {
            if let Some(p) = a.snapshots.borrow_and_update().clone() {
                got = Some(p);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let snap = got.expect("a snapshot").snapshot();
        assert_eq!(
            snap.outbound_traffic_policy,
            wire::OutboundPolicy::RegistryOnly as i32
        );
        assert_eq!(
            snap.settings.as_ref().and_then(|s| s.num_trusted_proxies),
            Some(2)
        );
        let w = snap.workload.expect("workload");
        assert_eq!(w.mtls, wire::PeerMtls::Strict as i32);
        let t = w.telemetry.expect("telemetry");
        assert_eq!(t.access_logging[0].providers, ["envoy"]);
        assert_eq!(t.providers[0].path.as_deref(), Some("/dev/stdout"));
    }

    #[tokio::test]
    async fn proxies_of_one_scope_share_the_translation_but_not_their_workload() {
        let store = Arc::new(ConfigStore::new());
        for p in trellis_api::parse_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {app: reviews}\n  ports: [{name: http, port: 9080}]\n",
            "svc.yaml",
            &trellis_api::LoadOptions::default(),
        ) {
            if let Some(r) = p.resource() {
                store.apply(r.clone());
            }
        }
        let quick = Debounce {
            quiet: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        let cp = ControlPlane::new(store, quick);
        tokio::spawn(Arc::clone(&cp).run());
        let mut a = cp.connect(instance("web-0", "web", "web"));
        let mut b = cp.connect(instance("web-1", "web", "web"));
        let _r = cp.connect(instance("reviews-v1", "shop", "reviews"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pa = a.snapshots.borrow_and_update().clone().expect("a");
        let pb = b.snapshots.borrow_and_update().clone().expect("b");
        // One copy of the scope's translation for both.
        assert!(Arc::ptr_eq(&pa.scope, &pb.scope));
        let (sa, sb) = (pa.snapshot(), pb.snapshot());
        assert_eq!(sa.services, sb.services);
        assert_eq!(sa.clusters, sb.clusters);
        // The shared parts and the proxy's own part rebuild the whole snapshot.
        assert!(Arc::ptr_eq(&pa.parts, &pb.parts));
        let own = pa.proxy_part();
        let (resources, removed_resources) =
            trellis_xds::delta::diff(&Default::default(), &pa.parts, &[&own]);
        let resp = trellis_xds::ads::DeltaDiscoveryResponse {
            system_version_info: pa.version.clone(),
            resources,
            removed_resources,
            ..Default::default()
        };
        let (_, rebuilt) = trellis_xds::delta::Held::default()
            .apply(&resp)
            .expect("applies");
        assert_eq!(rebuilt, sa);
        // Pushes are timed, and an ACK of the version sent counts toward convergence
        // (once: a repeated ACK does not).
        assert!(cp.push_seconds.count() >= 1);
        cp.ack(a.id, &pa.version);
        cp.ack(a.id, &pa.version);
        cp.ack(b.id, "not-the-version-sent");
        assert_eq!(cp.convergence_seconds.count(), 1);
        let mut text = String::new();
        cp.convergence_seconds
            .render("trellis_control_proxy_convergence_seconds", "h", &mut text);
        assert!(
            text.contains("trellis_control_proxy_convergence_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("trellis_control_proxy_convergence_seconds_count 1\n"),
            "{text}"
        );
        assert_eq!(sa.workload.as_ref().map(|w| w.name.as_str()), Some("web-0"));
        assert_eq!(sb.workload.as_ref().map(|w| w.name.as_str()), Some("web-1"));
        assert_eq!(endpoints(&a), 1);
    }
}
