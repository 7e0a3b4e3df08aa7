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
    /// The version last sent, and when.
    pub sent: Option<(String, SystemTime)>,
    /// The version the proxy last accepted.
    pub acked: Option<String>,
    /// The version the proxy last refused, with its reason.
    pub nacked: Option<(String, String)>,
}

struct Conn {
    instance: Instance,
    tx: watch::Sender<Option<Arc<wire::Snapshot>>>,
    last: Option<Arc<wire::Snapshot>>,
    status: ProxyStatus,
}

/// A proxy's end of the connection: snapshots arrive on `snapshots`; report back with
/// [`ControlPlane::ack`] / [`ControlPlane::nack`]. Dropping it does not disconnect; call
/// [`ControlPlane::disconnect`].
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub snapshots: watch::Receiver<Option<Arc<wire::Snapshot>>>,
}

/// The control plane: configuration store, connected proxies, push loop.
pub struct ControlPlane {
    store: Arc<ConfigStore>,
    conns: Mutex<BTreeMap<u64, Conn>>,
    next_id: AtomicU64,
    /// Bumped by connects and disconnects (the registry changes with them).
    membership: Notify,
    pushes: AtomicU64,
    debounce: Debounce,
    root_namespace: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

impl ControlPlane {
    pub fn new(store: Arc<ConfigStore>, debounce: Debounce) -> Arc<ControlPlane> {
        Arc::new(ControlPlane {
            store,
            conns: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            membership: Notify::new(),
            pushes: AtomicU64::new(0),
            debounce,
            root_namespace: ROOT_NAMESPACE.to_string(),
        })
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A proxy connects for `instance`: it becomes an endpoint of the services that select
    /// it, and gets its first snapshot at once.
    pub fn connect(&self, instance: Instance) -> Session {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let status = ProxyStatus {
            id,
            instance: instance.name.clone(),
            namespace: instance.namespace.clone(),
            sent: None,
            acked: None,
            nacked: None,
        };
        self.conns().insert(
            id,
            Conn {
                instance,
                tx,
                last: None,
                status,
            },
        );
        self.push_all();
        self.membership.notify_one();
        Session { id, snapshots: rx }
    }

    /// The proxy is gone: its instance leaves the registry.
    pub fn disconnect(&self, id: u64) {
        self.conns().remove(&id);
        self.membership.notify_one();
    }

    pub fn ack(&self, id: u64, version: &str) {
        if let Some(c) = self.conns().get_mut(&id) {
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

    pub fn status(&self) -> Vec<ProxyStatus> {
        self.conns().values().map(|c| c.status.clone()).collect()
    }

    /// Snapshots sent so far (all proxies).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Recomputes every proxy's snapshot from the store as it is now and sends the ones
    /// that changed.
    pub fn push_all(&self) {
        let snap = self.store.snapshot();
        let resources: Vec<&Resource> = snap.objects.iter().map(|r| r.as_ref()).collect();
        let mut conns = self.conns();
        let instances: Vec<Instance> = conns.values().map(|c| c.instance.clone()).collect();
        let registry = Registry::build(&resources, instances);
        let cfg = MeshConfig {
            resources: &resources,
            root_namespace: &self.root_namespace,
        };
        for c in conns.values_mut() {
            let version = format!("r{}", snap.revision);
            let built = sidecar_snapshot(&cfg, &registry, &c.instance, &version);
            for p in &built.problems {
                tracing::warn!(proxy = %c.status.instance, "{p}");
            }
            let mut fresh = built.snapshot;
            // Same content as last time: nothing to send (the version alone moved).
            if let Some(last) = &c.last {
                let mut cmp = fresh.clone();
                cmp.version = last.version.clone();
                if cmp == **last {
                    continue;
                }
            }
            fresh.version = format!("{version}-{}", self.pushes.load(Ordering::Relaxed) + 1);
            let fresh = Arc::new(fresh);
            c.last = Some(Arc::clone(&fresh));
            c.status.sent = Some((fresh.version.clone(), SystemTime::now()));
            self.pushes.fetch_add(1, Ordering::Relaxed);
            let _ = c.tx.send(Some(fresh));
        }
    }

    /// Pushes after every configuration change or change of membership, debounced, until
    /// the runtime stops.
    pub async fn run(self: Arc<Self>) {
        let mut revisions = self.store.subscribe();
        loop {
            tokio::select! {
                r = revisions.changed() => if r.is_err() { return },
                _ = self.membership.notified() => {}
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
            if tokio::task::spawn_blocking(move || cp.push_all())
                .await
                .is_err()
            {
                tracing::error!("push failed");
            }
        }
    }
}
