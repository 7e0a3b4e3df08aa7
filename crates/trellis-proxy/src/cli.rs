//! The command line of the sidecar and gateway proxy: the `trellis-proxy` binary, and
//! `trellis proxy` (the same, so that `trellis up` needs one program).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use crate::admin::{self, AdminContext};
use crate::config;
use crate::{ProxyOptions, Shared};
use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use tokio::sync::Notify;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

#[derive(Debug, Parser)]
#[command(
    name = "trellis-proxy",
    version,
    about = "Trellis sidecar and gateway proxy"
)]
struct Args {
    /// sidecar: beside a workload (capture or explicit listeners); gateway: a standalone
    /// ingress or egress gateway serving the snapshot's gateway ports.
    #[arg(long, value_enum, default_value_t = Mode::Sidecar)]
    mode: Mode,
    /// Gateway listener: ADDR=PORT (the snapshot's gateway port it serves). Without any,
    /// gateway mode listens on every gateway port of the snapshot, on its `bind` address
    /// or all addresses.
    #[arg(long, value_name = "ADDR=PORT")]
    gateway_listen: Vec<String>,
    /// Where gateway certificates named by `credentialName` live: DIR/NAME/tls.crt,
    /// tls.key and (MUTUAL) ca.crt.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_CREDENTIALS_DIR)]
    credentials_dir: PathBuf,
    /// Gateways: how many proxies (load balancers) in front append to X-Forwarded-For;
    /// the client's address, for policies' remoteIpBlocks, is that many entries from its
    /// right (Istio's gatewayTopology.numTrustedProxies; overrides the snapshot's).
    #[arg(long, value_name = "N")]
    num_trusted_proxies: Option<u32>,
    /// Snapshot file (YAML or JSON) to serve in static mode; reloaded when it changes (a
    /// bad new version is refused and the last good one stays).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "xds",
        conflicts_with = "xds"
    )]
    config: Option<PathBuf>,
    /// Follow the control plane at ADDR (Delta ADS) instead of a snapshot file; the
    /// proxy announces the instance it runs beside with --name, --namespace, --label,
    /// --service-account, --address and --port.
    #[arg(long, value_name = "ADDR")]
    xds: Option<SocketAddr>,
    /// A file holding the bootstrap token to show the control plane (with --xds). With a
    /// token, the proxy also gets its workload certificate from the control plane's CA and
    /// renews it at half-life.
    #[arg(long, value_name = "FILE", requires = "xds")]
    xds_token_file: Option<PathBuf>,
    /// The mesh's root certificate(s), PEM (with --xds): the control plane is reached over
    /// TLS and its certificate must chain to one of them. Without it, cleartext (loopback
    /// only when a token is given).
    #[arg(long, value_name = "FILE", requires = "xds")]
    xds_root: Option<PathBuf>,
    /// The name the control plane's certificate must have (with --xds-root).
    #[arg(long, value_name = "NAME", default_value = "trellis-control")]
    xds_server_name: String,
    /// Take the workload certificate from files in DIR (`cert-chain.pem`, `key.pem`, as
    /// `trellis cert` writes them) instead of the CA; reloaded when they change.
    #[arg(long, value_name = "DIR", conflicts_with = "xds_token_file")]
    workload_cert: Option<PathBuf>,
    /// The mesh's trust domain, for this instance's SPIFFE identity
    /// (spiffe://DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The lifetime to ask for the workload certificate (the CA may cap it).
    #[arg(long, default_value = "24h")]
    cert_ttl: trellis_api::common::Duration,
    /// This instance's name (with --xds).
    #[arg(long, requires = "xds")]
    name: Option<String>,
    /// This instance's namespace (with --xds).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// This instance's service account (with --xds).
    #[arg(long, default_value = "default")]
    service_account: String,
    /// Register under this WorkloadGroup of --namespace (a VM, say): the control plane
    /// takes the instance's labels, ports and service account from the group's template,
    /// and removes the instance when this proxy goes away.
    #[arg(long, value_name = "NAME", requires = "xds")]
    workload_group: Option<String>,
    /// This instance's labels, KEY=VALUE (with --xds; repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// This instance's addresses (with --xds; repeatable).
    #[arg(long = "address", value_name = "IP")]
    addresses: Vec<std::net::IpAddr>,
    /// Ports the app listens on, [NAME:]PORT (with --xds; repeatable).
    #[arg(long = "port", value_name = "[NAME:]PORT")]
    ports: Vec<String>,
    /// Capture intercepted traffic on Istio's ports: outbound [::]:15001, inbound
    /// [::]:15006 (both IPv4 and IPv6; 0.0.0.0 where the host has no IPv6).
    #[arg(long)]
    sidecar: bool,
    /// Listen for intercepted outbound connections (original destination via SO_ORIGINAL_DST).
    #[arg(long, value_name = "ADDR")]
    outbound_capture: Option<SocketAddr>,
    /// Listen for intercepted inbound connections.
    #[arg(long, value_name = "ADDR")]
    inbound_capture: Option<SocketAddr>,
    /// Explicit outbound listener: ADDR=SERVICE:PORT (no interception needed).
    #[arg(long, value_name = "ADDR=SERVICE:PORT")]
    outbound_listen: Vec<String>,
    /// Explicit inbound listener: ADDR=PORT (the workload port it stands for).
    #[arg(long, value_name = "ADDR=PORT")]
    inbound_listen: Vec<String>,
    /// Admin server address, or "off".
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: String,
    /// Readiness endpoint (/healthz/ready, and /stats/prometheus) address, or "off".
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness: String,
    /// Prometheus endpoint (/stats/prometheus, and /healthz/ready) address, or "off";
    /// repeatable. Default: with --sidecar, Istio's 0.0.0.0:15020 and Envoy's
    /// 0.0.0.0:15090 (where Istio's scrape annotations and ServiceMonitors look); else off.
    #[arg(long, value_name = "ADDR")]
    stats: Vec<String>,
    /// Worker threads of the data path.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// How often an open TCP connection adds its bytes so far to
    /// istio_tcp_sent_bytes_total and istio_tcp_received_bytes_total (Istio's
    /// tcp_reporting_duration).
    #[arg(long, default_value = "15s")]
    tcp_report_interval: trellis_api::common::Duration,
    /// How long to let requests in flight finish on SIGTERM.
    #[arg(long, default_value = "5s")]
    drain_timeout: trellis_api::common::Duration,
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, e.g. "info" or "info,crate::http=debug" (also RUST_LOG).
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Sidecar,
    Gateway,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_addr_opt(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    if s == "off" {
        return Ok(None);
    }
    Ok(Some(s.parse().with_context(|| {
        format!("{s:?} is not ADDR:PORT or \"off\"")
    })?))
}

/// What this proxy announces to the control plane.
fn announce(args: &Args) -> anyhow::Result<trellis_xds::ads::Announce> {
    let name = args
        .name
        .clone()
        .context("--xds needs --name (this instance's name)")?;
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let mut ports = Vec::new();
    for p in &args.ports {
        let (n, port) = match p.rsplit_once(':') {
            Some((n, port)) => (Some(n.to_string()), port),
            None => (None, p.as_str()),
        };
        ports.push((
            n,
            port.parse()
                .with_context(|| format!("--port {p:?}: expected [NAME:]PORT"))?,
        ));
    }
    Ok(trellis_xds::ads::Announce {
        name,
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        labels,
        addresses: args.addresses.iter().map(ToString::to_string).collect(),
        ports,
        locality: None,
        workload_group: args.workload_group.clone(),
    })
}

fn options(args: &Args, cfg: &config::Config) -> anyhow::Result<ProxyOptions> {
    let mut o = ProxyOptions {
        tcp_report_every: args.tcp_report_interval.0.max(Duration::from_millis(100)),
        wait_for_config: args.xds.is_some(),
        ..ProxyOptions::default()
    };
    if args.sidecar {
        let any = std::net::Ipv6Addr::UNSPECIFIED;
        o.outbound_capture = Some(SocketAddr::from((any, 15001)));
        o.inbound_capture = Some(SocketAddr::from((any, 15006)));
    }
    o.outbound_capture = args.outbound_capture.or(o.outbound_capture);
    o.inbound_capture = args.inbound_capture.or(o.inbound_capture);
    for l in &args.outbound_listen {
        let (addr, target) = l
            .split_once('=')
            .with_context(|| format!("--outbound-listen {l:?}: expected ADDR=SERVICE:PORT"))?;
        let (svc, port) = target
            .rsplit_once(':')
            .with_context(|| format!("--outbound-listen {l:?}: expected ADDR=SERVICE:PORT"))?;
        o.outbound_listen.push((
            addr.parse()
                .with_context(|| format!("--outbound-listen {l:?}: bad address"))?,
            svc.to_string(),
            port.parse()
                .with_context(|| format!("--outbound-listen {l:?}: bad port"))?,
        ));
    }
    for l in &args.inbound_listen {
        let (addr, port) = l
            .split_once('=')
            .with_context(|| format!("--inbound-listen {l:?}: expected ADDR=PORT"))?;
        o.inbound_listen.push((
            addr.parse()
                .with_context(|| format!("--inbound-listen {l:?}: bad address"))?,
            port.parse()
                .with_context(|| format!("--inbound-listen {l:?}: bad port"))?,
        ));
    }
    for l in &args.gateway_listen {
        let (addr, port) = l
            .split_once('=')
            .with_context(|| format!("--gateway-listen {l:?}: expected ADDR=PORT"))?;
        o.gateway_listen.push((
            addr.parse()
                .with_context(|| format!("--gateway-listen {l:?}: bad address"))?,
            port.parse()
                .with_context(|| format!("--gateway-listen {l:?}: bad port"))?,
        ));
    }
    if args.mode == Mode::Gateway && o.gateway_listen.is_empty() {
        let mut ports: Vec<_> = cfg.gateway_ports.values().collect();
        ports.sort_by_key(|p| p.port);
        for p in ports {
            let ip = p
                .bind
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            o.gateway_listen.push((SocketAddr::new(ip, p.port), p.port));
        }
        if o.gateway_listen.is_empty() {
            bail!(
                "gateway mode, but the snapshot has no gatewayPorts (translate a Gateway, or give --gateway-listen)"
            );
        }
    }
    if args.mode == Mode::Sidecar && !o.gateway_listen.is_empty() {
        bail!("--gateway-listen needs --mode gateway");
    }
    if o.outbound_capture.is_none()
        && o.inbound_capture.is_none()
        && o.outbound_listen.is_empty()
        && o.inbound_listen.is_empty()
        && o.gateway_listen.is_empty()
    {
        bail!(
            "nothing to listen on: give --sidecar, --outbound-capture, --inbound-capture, --outbound-listen, --inbound-listen or --mode gateway"
        );
    }
    Ok(o)
}

/// Runs the proxy with these command-line arguments (the first is the program's name).
pub fn main_from<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let (filter_layer, reload) = match EnvFilter::try_new(&filter) {
        Ok(f) => tracing_subscriber::reload::Layer::new(f),
        Err(e) => {
            eprintln!("error: --log-level {filter:?}: {e}");
            return ExitCode::from(2);
        }
    };
    let registry = tracing_subscriber::registry().with(filter_layer);
    match args.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    let set_level: admin::SetLogLevel = Box::new(move |l: &str| {
        let f = EnvFilter::try_new(l).map_err(|e| format!("bad filter {l:?}: {e}"))?;
        reload.reload(f).map_err(|e| e.to_string())
    });
    match run(&args, set_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args, set_level: admin::SetLogLevel) -> anyhow::Result<()> {
    let env = config::LoadEnv {
        credentials_dir: args.credentials_dir.clone(),
        num_trusted_proxies: args.num_trusted_proxies,
        ..config::LoadEnv::default()
    };
    // A bad snapshot stops the proxy before it listens, with the file position.
    let cfg = match &args.config {
        Some(path) => config::load_file_with(path, None, &env).map_err(anyhow::Error::msg)?,
        None => config::Config::empty(),
    };
    let xds = match args.xds {
        None => None,
        Some(addr) => Some(xds_boot(args, addr)?),
    };
    let workload_cert = match &args.workload_cert {
        None => None,
        Some(dir) => Some((
            dir.clone(),
            crate::identity::load_files(dir).map_err(anyhow::Error::msg)?,
        )),
    };
    let opts = options(args, &cfg)?;
    let admin_addr = parse_addr_opt(&args.admin)?;
    let ready_addr = parse_addr_opt(&args.readiness)?;
    let stats_addrs: Vec<Option<SocketAddr>> = match args.stats.as_slice() {
        [] if args.sidecar => vec![
            Some(SocketAddr::from(([0, 0, 0, 0], 15020))),
            Some(SocketAddr::from(([0, 0, 0, 0], 15090))),
        ],
        list => list
            .iter()
            .map(|a| parse_addr_opt(a))
            .collect::<anyhow::Result<_>>()?,
    };
    // One worker: a current-thread runtime, without the work-stealing scheduler's
    // bookkeeping (the proxy's own thread is the worker).
    let runtime = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .thread_name("trellis-worker")
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(async {
        let handle = crate::start(cfg, opts).await?;
        if let Some((dir, cert)) = workload_cert {
            tracing::info!(identity = ?cert.spiffe, "workload certificate from {}", dir.display());
            handle.shared.credentials.set(cert);
            tokio::spawn(crate::identity::watch_files(
                dir,
                Arc::clone(&handle.shared),
            ));
        }
        let quit = Arc::new(Notify::new());
        let ready = Arc::new(AtomicBool::new(true));
        let ctx = Arc::new(AdminContext {
            shared: Arc::clone(&handle.shared),
            set_log_level: Some(set_level),
            quit: Arc::clone(&quit),
            ready: Arc::clone(&ready),
        });
        let mut public = vec![(ready_addr, "readiness")];
        public.extend(stats_addrs.iter().map(|a| (*a, "stats")));
        spawn_control_thread(ctx, admin_addr, &public, args.config.clone(), xds, env)?;

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
            _ = quit.notified() => tracing::info!("/quitquitquit"),
        }
        ready.store(false, std::sync::atomic::Ordering::Relaxed);
        handle.drain(args.drain_timeout.0).await;
        Ok::<(), anyhow::Error>(())
    })?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    // The last access-log lines reach their files before the process ends.
    crate::accesslog::drain(Duration::from_secs(1));
    Ok(())
}

/// How to follow the control plane.
struct XdsBoot {
    endpoint: crate::xds::Endpoint,
    announce: trellis_xds::ads::Announce,
    token: crate::xds::Token,
    /// The workload certificate to keep (with a token).
    certificate: Option<crate::identity::CertRequest>,
}

fn xds_boot(args: &Args, addr: SocketAddr) -> anyhow::Result<XdsBoot> {
    use crate::xds::{Endpoint, Token};
    let token = match &args.xds_token_file {
        Some(p) => {
            // Read at every (re)connection; checked once here for a clear error.
            std::fs::read_to_string(p)
                .with_context(|| format!("reading the token {}", p.display()))?;
            Token::File(p.clone())
        }
        None => Token::None,
    };
    let endpoint = match &args.xds_root {
        Some(root) => {
            let pem = std::fs::read_to_string(root)
                .with_context(|| format!("reading --xds-root {}", root.display()))?;
            Endpoint::tls(addr, &pem, &args.xds_server_name)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--xds-root {}", root.display()))?
        }
        None if matches!(token, Token::File(_)) && !addr.ip().is_loopback() => anyhow::bail!(
            "--xds {addr} is not a loopback address: give --xds-root (the mesh's root certificate) so that the token and the certificate travel over TLS"
        ),
        None => Endpoint::from(addr),
    };
    let announce = announce(args)?;
    let certificate = matches!(token, Token::File(_)).then(|| crate::identity::CertRequest {
        identity: trellis_identity::Identity {
            trust_domain: args.trust_domain.clone(),
            namespace: announce.namespace.clone(),
            service_account: announce.service_account.clone(),
        },
        instance: announce.name.clone(),
        ttl: args.cert_ttl.0,
    });
    Ok(XdsBoot {
        endpoint,
        announce,
        token,
        certificate,
    })
}

/// Admin, readiness and config reloads run on their own thread and runtime, off the data
/// path.
fn spawn_control_thread(
    ctx: Arc<AdminContext>,
    admin_addr: Option<SocketAddr>,
    public: &[(Option<SocketAddr>, &'static str)],
    config_path: Option<PathBuf>,
    xds: Option<XdsBoot>,
    env: config::LoadEnv,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the admin runtime")?;
    // Bind here so that a taken port is reported at startup.
    let std_listener = |a: SocketAddr| -> anyhow::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(a).with_context(|| format!("cannot listen on {a}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let admin_l = admin_addr.map(std_listener).transpose()?;
    let public_l: Vec<(std::net::TcpListener, &str)> = public
        .iter()
        .filter_map(|(a, what)| Some(((*a)?, *what)))
        .map(|(a, what)| std_listener(a).map(|l| (l, what)))
        .collect::<anyhow::Result<_>>()?;
    std::thread::Builder::new()
        .name("trellis-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(l) = admin_l {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tracing::info!("admin on {:?}", l.local_addr().ok());
                            tokio::spawn(admin::serve(l, Arc::clone(&ctx)));
                        }
                        Err(e) => tracing::error!("admin: {e}"),
                    }
                }
                for (l, what) in public_l {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tracing::info!("{what} on {:?}", l.local_addr().ok());
                            tokio::spawn(admin::serve_public(l, Arc::clone(&ctx)));
                        }
                        Err(e) => tracing::error!("{what}: {e}"),
                    }
                }
                tokio::spawn(crate::proxy::refresh_dns(
                    Arc::clone(&ctx.shared),
                    env.clone(),
                ));
                match (config_path, xds) {
                    (Some(path), _) => watch_config(&ctx.shared, &path, &env).await,
                    (None, Some(boot)) => {
                        if let Some(want) = boot.certificate {
                            tokio::spawn(crate::identity::maintain(
                                boot.endpoint.clone(),
                                boot.token.clone(),
                                want,
                                Arc::clone(&ctx.shared),
                            ));
                        }
                        crate::xds::follow_with(
                            boot.endpoint,
                            boot.announce,
                            boot.token,
                            Arc::clone(&ctx.shared),
                            env,
                        )
                        .await
                    }
                    (None, None) => std::future::pending().await,
                }
            });
        })
        .context("starting the admin thread")?;
    Ok(())
}

/// Reloads the snapshot file when it changes; a bad version is refused and logged, and
/// the last good snapshot stays.
async fn watch_config(shared: &Shared, path: &std::path::Path, env: &config::LoadEnv) {
    let stamp = |p: &std::path::Path| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut last = stamp(path);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let now = stamp(path);
        if now == last || now.is_none() {
            continue;
        }
        last = now;
        let current = shared.config.load_full();
        match config::load_file_with(path, Some(&current), env) {
            Ok(cfg) => {
                for port in cfg.gateway_ports.keys() {
                    if !current.gateway_ports.contains_key(port) {
                        tracing::warn!(
                            "snapshot adds gateway port {port}; listeners are opened at start, so restart the gateway to serve it"
                        );
                    }
                }
                shared.update(cfg)
            }
            Err(e) => {
                crate::stats::Stats::inc(&shared.stats.config_rejections_total);
                tracing::error!(
                    "snapshot refused, keeping version {:?}: {e}",
                    current.version
                );
            }
        }
    }
}
