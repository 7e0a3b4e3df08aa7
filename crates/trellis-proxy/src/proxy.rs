//! The proxy: shared state, listeners, snapshot updates, drain.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::listener::{self, ListenerKind};
use crate::pool::Pools;
use crate::sockets::{OriginalDst, SoOriginalDst};
use crate::stats::Stats;

/// State every connection shares.
pub struct Shared {
    /// The snapshot in use; each request takes the current one when it starts and keeps
    /// it to the end.
    pub config: ArcSwap<Config>,
    pub pools: Arc<Pools>,
    pub stats: Stats,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Addresses the proxy listens on: an intercepted connection to one of them would loop.
    pub own_addrs: Mutex<Vec<SocketAddr>>,
    /// Inbound port → where the app was found listening (localhost or a pod address).
    app_addrs: Mutex<HashMap<u16, SocketAddr>>,
    pub inbound_conns: Arc<Tracker>,
    pub outbound_conns: Arc<Tracker>,
    /// Retries for routes that do not set their own (Istio's default).
    pub default_retry: crate::config::RetryPolicy,
    /// Mirrored requests in flight.
    pub mirrors_in_flight: std::sync::atomic::AtomicUsize,
    /// The workload certificate, once the CA has issued one (see `identity`).
    pub credentials: Arc<trellis_identity::tls::Credentials>,
    /// JWKS fetched from RequestAuthentication `jwksUri`s.
    pub jwks: crate::authn::JwksCache,
    /// Istio's standard request metrics.
    pub istio: crate::metrics::IstioMetrics,
    /// How often a TCP connection's bytes so far are added to its metrics (Istio's
    /// `tcp_reporting_duration`, 15 s): a long connection shows its traffic while open.
    pub tcp_report_every: std::time::Duration,
    /// A snapshot is in place (false from the start until the control plane's first
    /// one, with `--xds`): connections wait for it, and the proxy is not ready before.
    configured: std::sync::atomic::AtomicBool,
    configured_now: tokio::sync::Notify,
    /// Until when connections wait for the first snapshot: one window from the start,
    /// not one per connection (with the control plane down, every connection would
    /// otherwise wait the whole time again).
    config_deadline: tokio::time::Instant,
    /// The window passed without a snapshot (said once).
    gave_up_waiting: std::sync::atomic::AtomicBool,
    /// The mesh mTLS server configuration, and the trust bundle it was made for.
    mesh_server: Mutex<Option<(Arc<rustls::RootCertStore>, Arc<rustls::ServerConfig>)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("version", &self.config.load().version)
            .finish_non_exhaustive()
    }
}

/// What mutual TLS to a peer needs: this proxy's credentials and the mesh's roots.
pub type MeshMaterial<'a> = (
    &'a Arc<trellis_identity::tls::Credentials>,
    &'a Arc<rustls::RootCertStore>,
);

impl Shared {
    /// Mutual TLS material for requests on `cfg`, once this proxy has a certificate and
    /// the snapshot a trust bundle; before that, peers are reached in plaintext (and take
    /// it while PERMISSIVE).
    pub fn mesh_tls<'a>(&'a self, cfg: &'a Config) -> Option<MeshMaterial<'a>> {
        let roots = cfg.trust_roots.as_ref()?;
        self.credentials
            .is_set()
            .then_some((&self.credentials, roots))
    }

    /// The server side of mesh mutual TLS for `cfg`'s trust bundle (made once per bundle),
    /// or why there is none.
    pub fn mesh_server_config(&self, cfg: &Config) -> Result<Arc<rustls::ServerConfig>, String> {
        let roots = cfg
            .trust_roots
            .as_ref()
            .ok_or("the snapshot has no trust bundle")?;
        if !self.credentials.is_set() {
            return Err("this proxy has no workload certificate yet".into());
        }
        let mut cache = self
            .mesh_server
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((r, c)) = &*cache {
            if Arc::ptr_eq(r, roots) {
                return Ok(Arc::clone(c));
            }
        }
        let c = Arc::new(
            trellis_identity::tls::mesh_server_config(
                Arc::clone(&self.credentials),
                Arc::clone(roots),
            )
            .map_err(|e| e.to_string())?,
        );
        *cache = Some((Arc::clone(roots), Arc::clone(&c)));
        Ok(c)
    }

    pub fn new(
        config: Config,
        original_dst: Arc<dyn OriginalDst>,
        tcp_report_every: std::time::Duration,
        wait_for_config: bool,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            config: ArcSwap::from_pointee(config),
            pools: Pools::new(),
            stats: Stats::default(),
            original_dst,
            own_addrs: Mutex::new(Vec::new()),
            app_addrs: Mutex::new(HashMap::new()),
            inbound_conns: Arc::default(),
            outbound_conns: Arc::default(),
            default_retry: crate::config::RetryPolicy::istio_default(),
            mirrors_in_flight: std::sync::atomic::AtomicUsize::new(0),
            credentials: Arc::default(),
            mesh_server: Mutex::new(None),
            jwks: crate::authn::JwksCache::default(),
            istio: crate::metrics::IstioMetrics::default(),
            tcp_report_every,
            configured: std::sync::atomic::AtomicBool::new(!wait_for_config),
            configured_now: tokio::sync::Notify::new(),
            config_deadline: tokio::time::Instant::now() + FIRST_CONFIG_WAIT,
            gave_up_waiting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether a snapshot is in place (see [`Shared::wait_configured`]).
    pub fn is_configured(&self) -> bool {
        self.configured.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits (until [`FIRST_CONFIG_WAIT`] after the start) for the first snapshot: a connection
    /// intercepted while the proxy has none yet would otherwise go where an empty
    /// configuration says (passthrough to a virtual IP nothing answers).
    pub async fn wait_configured(&self) {
        if self.is_configured() {
            return;
        }
        let notified = self.configured_now.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_configured() {
            return;
        }
        if tokio::time::timeout_at(self.config_deadline, notified)
            .await
            .is_err()
            && !self
                .gave_up_waiting
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                "no configuration from the control plane after {}s; serving with none",
                FIRST_CONFIG_WAIT.as_secs()
            );
        }
    }

    /// Installs a new snapshot. Requests in flight finish on the one they started with.
    pub fn update(&self, config: Config) {
        tracing::info!(version = %config.version, "snapshot applied");
        self.config.store(Arc::new(config));
        Stats::inc(&self.stats.config_updates_total);
        if !self
            .configured
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.configured_now.notify_waiters();
        }
    }

    /// Where the app behind inbound `addr` listens: `addr` (localhost) unless it refuses
    /// and one of the pod addresses accepts. Remembered per port.
    pub async fn app_addr(
        &self,
        addr: SocketAddr,
        pod_ips: &[IpAddr],
        timeout: Duration,
    ) -> SocketAddr {
        if let Some(a) = self
            .app_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr.port())
        {
            return *a;
        }
        let mut found = addr;
        if crate::sockets::connect(addr, timeout).await.is_err() {
            for ip in pod_ips {
                let candidate = SocketAddr::new(*ip, addr.port());
                if crate::sockets::connect(candidate, timeout).await.is_ok() {
                    found = candidate;
                    break;
                }
            }
        }
        self.app_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.port(), found);
        found
    }

    pub fn forget_app_addr(&self, port: u16) {
        self.app_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&port);
    }

    pub fn is_own_addr(&self, a: SocketAddr) -> bool {
        self.own_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|o| o.port() == a.port() && (o.ip() == a.ip() || o.ip().is_unspecified()))
    }
}

/// Resolves the snapshot's STRICT_DNS names again every refresh interval (off the data
/// path, on a blocking thread) and swaps in the new endpoints when an answer changed,
/// unless a newer snapshot arrived meanwhile. Runs until the runtime stops.
pub async fn refresh_dns(shared: Arc<Shared>, env: crate::config::LoadEnv) {
    loop {
        let every = shared
            .config
            .load()
            .dns_refresh
            .unwrap_or(crate::config::DEFAULT_DNS_REFRESH);
        tokio::time::sleep(every).await;
        let current = shared.config.load_full();
        if current.dns.is_empty() {
            continue;
        }
        let (cfg, env2) = (Arc::clone(&current), env.clone());
        let result = match tokio::task::spawn_blocking(move || cfg.refresh_dns(&env2)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("DNS refresh failed: {e}");
                continue;
            }
        };
        match result {
            None => {}
            Some(Ok(cfg)) => {
                let prev = shared.config.compare_and_swap(&current, Arc::new(cfg));
                if Arc::ptr_eq(&prev, &current) {
                    tracing::info!(version = %current.version, "DNS answers changed; endpoints updated");
                    Stats::inc(&shared.stats.dns_updates_total);
                }
            }
            Some(Err(e)) => tracing::warn!("DNS refresh: snapshot no longer converts: {e}"),
        }
    }
}

/// Counts open connections and wakes a waiter when the count reaches zero.
#[derive(Debug, Default)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

impl Tracker {
    pub fn enter(self: &Arc<Self>) -> TrackGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        TrackGuard(Arc::clone(self))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Waits until no connection is open (or `timeout`); returns whether it got there.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active() == 0;
            }
        }
    }
}

/// Held by a connection task; leaving decrements the count.
#[derive(Debug)]
pub struct TrackGuard(Arc<Tracker>);

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What the proxy listens on.
#[derive(Clone)]
pub struct ProxyOptions {
    /// Intercepted outbound traffic (Istio: 15001).
    pub outbound_capture: Option<SocketAddr>,
    /// Intercepted inbound traffic (Istio: 15006).
    pub inbound_capture: Option<SocketAddr>,
    /// Explicit outbound listeners: address → service name and port.
    pub outbound_listen: Vec<(SocketAddr, String, u16)>,
    /// Explicit inbound listeners: address → workload port.
    pub inbound_listen: Vec<(SocketAddr, u16)>,
    /// Gateway listeners: address → the snapshot's gateway port it serves.
    pub gateway_listen: Vec<(SocketAddr, u16)>,
    pub original_dst: Arc<dyn OriginalDst>,
    /// How often open TCP connections report their bytes (default 15 s, as Istio).
    pub tcp_report_every: std::time::Duration,
    /// The configuration comes later (from the control plane): connections wait for it
    /// (up to [`FIRST_CONFIG_WAIT`]) and readiness says no until it is there.
    pub wait_for_config: bool,
}

/// How long an intercepted connection waits for the first snapshot.
pub const FIRST_CONFIG_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for ProxyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyOptions")
            .field("outbound_capture", &self.outbound_capture)
            .field("inbound_capture", &self.inbound_capture)
            .field("outbound_listen", &self.outbound_listen)
            .field("inbound_listen", &self.inbound_listen)
            .field("gateway_listen", &self.gateway_listen)
            .finish_non_exhaustive()
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            outbound_capture: None,
            inbound_capture: None,
            outbound_listen: Vec::new(),
            inbound_listen: Vec::new(),
            gateway_listen: Vec::new(),
            original_dst: Arc::new(SoOriginalDst),
            tcp_report_every: std::time::Duration::from_secs(15),
            wait_for_config: false,
        }
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    pub shared: Arc<Shared>,
    /// Bound addresses, in the order of the options (capture first, then explicit).
    pub outbound_addrs: Vec<SocketAddr>,
    pub inbound_addrs: Vec<SocketAddr>,
    stop_inbound: watch::Sender<bool>,
    stop_outbound: watch::Sender<bool>,
}

/// Binds every listener and starts serving.
pub async fn start(config: Config, opts: ProxyOptions) -> io::Result<ProxyHandle> {
    let shared = Shared::new(
        config,
        Arc::clone(&opts.original_dst),
        opts.tcp_report_every,
        opts.wait_for_config,
    );
    let (stop_inbound, inbound_rx) = watch::channel(false);
    let (stop_outbound, outbound_rx) = watch::channel(false);
    let mut outbound_addrs = Vec::new();
    let mut inbound_addrs = Vec::new();
    let mut bound: Vec<(TcpListener, ListenerKind)> = Vec::new();
    let bind = |a: SocketAddr| async move {
        match TcpListener::bind(a).await {
            Ok(l) => Ok(l),
            // `[::]` on a host without IPv6: the IPv4 wildcard instead.
            Err(e)
                if a.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                    && matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL)
                    ) =>
            {
                let v4 = SocketAddr::from(([0, 0, 0, 0], a.port()));
                tracing::info!("no IPv6 here ({e}); listening on {v4} instead of {a}");
                TcpListener::bind(v4)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {v4}: {e}")))
            }
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot listen on {a}: {e}"),
            )),
        }
    };
    if let Some(a) = opts.outbound_capture {
        bound.push((bind(a).await?, ListenerKind::OutboundCapture));
    }
    for (a, host, port) in &opts.outbound_listen {
        bound.push((
            bind(*a).await?,
            ListenerKind::OutboundNamed(Arc::from(host.as_str()), *port),
        ));
    }
    if let Some(a) = opts.inbound_capture {
        bound.push((bind(a).await?, ListenerKind::InboundCapture));
    }
    for (a, port) in &opts.inbound_listen {
        bound.push((bind(*a).await?, ListenerKind::InboundPort(*port)));
    }
    for (a, port) in &opts.gateway_listen {
        bound.push((bind(*a).await?, ListenerKind::Gateway(*port)));
    }
    for (l, kind) in bound {
        let addr = l.local_addr()?;
        shared
            .own_addrs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(addr);
        let stop = if kind.is_inbound() {
            inbound_addrs.push(addr);
            inbound_rx.clone()
        } else {
            outbound_addrs.push(addr);
            outbound_rx.clone()
        };
        tracing::info!("listening on {addr} ({kind:?})");
        tokio::spawn(listener::accept_loop(l, kind, Arc::clone(&shared), stop));
    }
    // RequestAuthentication keys from jwksUris: fetched before they are needed, refreshed.
    tokio::spawn(crate::authn::keep_jwks_fresh(Arc::clone(&shared)));
    Ok(ProxyHandle {
        shared,
        outbound_addrs,
        inbound_addrs,
        stop_inbound,
        stop_outbound,
    })
}

impl ProxyHandle {
    pub fn update(&self, config: Config) {
        self.shared.update(config);
    }

    /// Applies a snapshot from the control plane, converted against the current one
    /// (counters kept). One that does not convert is refused with the reason, counted, and
    /// the current one stays.
    pub fn apply(
        &self,
        raw: trellis_xds::snapshot::Snapshot,
        env: &crate::config::LoadEnv,
    ) -> Result<(), String> {
        let current = self.shared.config.load_full();
        match Config::from_wire_with(raw, Some(&current), env) {
            Ok(cfg) => {
                self.shared.update(cfg);
                Ok(())
            }
            Err(e) => {
                Stats::inc(&self.shared.stats.config_rejections_total);
                tracing::error!(
                    "snapshot refused, keeping version {:?}: {e}",
                    current.version
                );
                Err(e.to_string())
            }
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.shared.config.load_full()
    }

    /// Drains: stops accepting inbound connections, lets open ones finish their requests
    /// (HTTP connections close after the request in flight), keeps outbound working so the
    /// app can finish its own work, and returns when everything is closed or `timeout`
    /// has passed.
    pub async fn drain(&self, timeout: Duration) {
        tracing::info!("draining for up to {timeout:?}");
        let _ = self.stop_inbound.send(true);
        let deadline = tokio::time::Instant::now() + timeout;
        let inbound_done = self.shared.inbound_conns.wait_idle(timeout).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let outbound_done = self.shared.outbound_conns.wait_idle(left).await;
        let _ = self.stop_outbound.send(true);
        tracing::info!(
            inbound_open = self.shared.inbound_conns.active(),
            outbound_open = self.shared.outbound_conns.active(),
            "drained{}",
            if inbound_done && outbound_done {
                ""
            } else {
                " (timeout)"
            }
        );
    }
}
