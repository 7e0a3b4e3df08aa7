//! `trellis up DIR`, `trellis down`, `trellis ps`, `trellis logs`: a whole mesh on this
//! machine. The control plane runs in the mesh's node namespace; every Workload replica
//! is a pod (a network namespace with interception rules) with a sidecar (`trellis
//! proxy`) and its app, started only once the sidecar is ready.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use trellis_api::{LoadOptions, Spec};
use trellis_runtime::{MeshNet, Proc};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The mesh's configuration: Kubernetes Services, Trellis Workloads (what to run) and
    /// Istio resources, watched for changes while the mesh runs.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// The mesh's name (default: the directory's): its namespaces are `trl-NAME-*`.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct MeshRef {
    /// The mesh: its name, or its configuration directory (whose name it has by default).
    #[arg(value_name = "NAME|DIR")]
    pub mesh: String,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub mesh: MeshRef,
    /// The pod (`reviews-v1-0`), or `control-plane`.
    pub pod: String,
    /// The sidecar's log instead of the app's.
    #[arg(long)]
    pub proxy: bool,
    /// Keep printing what is appended.
    #[arg(short, long)]
    pub follow: bool,
}

/// The node's address, where the pods reach the control plane.
fn cp_addr(net: &MeshNet) -> String {
    format!("{}:15012", net.node_ip)
}

fn name_of(raw: &str) -> String {
    let p = Path::new(raw);
    let base = if p.is_dir() {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| raw.to_string())
    } else {
        raw.to_string()
    };
    trellis_runtime::mesh_name(&base)
}

fn state_dir(mesh: &str) -> PathBuf {
    PathBuf::from("/run/trellis").join(mesh)
}

/// One pod to run.
#[derive(Debug, Clone, PartialEq)]
struct PodPlan {
    name: String,
    workload: String,
    namespace: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    /// Name, port, and the host port forwarded to it.
    ports: Vec<(Option<String>, u16, Option<u16>)>,
    /// Runs the gateway proxy, not an app and a sidecar.
    gateway: bool,
    /// Has a sidecar (and interception rules): all but the pods of a Workload labelled or
    /// annotated `sidecar.istio.io/inject: "false"`, as in Istio.
    sidecar: bool,
    /// The sidecar's worker threads: `concurrency` of the `proxy.istio.io/config`
    /// annotation, as in Istio (default 2).
    concurrency: Option<u32>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
}

/// A service's virtual IP, name and namespace.
type ServiceName = (String, String, String);

/// The configuration's files with their modification times and sizes: when this changes,
/// the pods are planned again.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
    trellis_api::load::config_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let modified = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map_or(0, |m| m.len());
            (f, modified, len)
        })
        .collect()
}

/// The pods of a configuration, and its services. An object declared in several files is
/// taken from the newest (as the control plane takes the one loaded last).
fn plan(dir: &Path) -> anyhow::Result<(Vec<PodPlan>, Vec<ServiceName>)> {
    let mut files = fingerprint(dir);
    files.sort_by_key(|(_, modified, _)| *modified);
    let mut newest: BTreeMap<String, trellis_api::Resource> = BTreeMap::new();
    for (file, _, _) in &files {
        for p in trellis_api::load_paths(&[file], &LoadOptions::default()) {
            // A bad document is left out (the control plane does the same) and said so.
            for d in p
                .diagnostics
                .iter()
                .filter(|d| d.level == trellis_api::Level::Error)
            {
                eprintln!("{d} (left out)");
            }
            if let Some(r) = p.resource() {
                newest.insert(r.object_ref().to_string(), r.clone());
            }
        }
    }
    let resources: Vec<&trellis_api::Resource> = newest.values().collect();
    if resources.is_empty() {
        bail!("{}: no resources found", dir.display());
    }
    let mut pods = Vec::new();
    for r in &resources {
        let Spec::Workload(w) = &r.spec else {
            continue;
        };
        if w.command.is_empty() && !w.gateway {
            bail!(
                "Workload {}/{}: spec.command is empty (what should the pod run?)",
                r.namespace(),
                r.name()
            );
        }
        for i in 0..w.replicas() {
            pods.push(PodPlan {
                name: format!("{}-{i}", r.name()),
                workload: r.name().to_string(),
                namespace: namespace(r),
                service_account: w.service_account().to_string(),
                labels: r
                    .meta
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ports: w
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let host = p.host_port.and_then(|h| u16::try_from(h).ok());
                        Some((p.name.clone(), u16::try_from(p.port).ok()?, host))
                    })
                    .collect(),
                gateway: w.gateway,
                sidecar: w.gateway
                    || ![&r.meta.labels, &r.meta.annotations].iter().any(|m| {
                        m.get("sidecar.istio.io/inject")
                            .is_some_and(|v| v.as_str() == "false")
                    }),
                concurrency: concurrency(r),
                argv: w.command.iter().chain(&w.args).cloned().collect(),
                env: w
                    .env
                    .iter()
                    .map(|e| (e.name.clone(), e.value.clone()))
                    .collect(),
                cwd: w.working_dir.clone(),
            });
        }
    }
    // Service names → virtual IPs, as the control plane allocates them.
    let registry = trellis_control::registry::Registry::build(&resources, Vec::new());
    let services = registry
        .services
        .iter()
        .map(|s| (s.vip.to_string(), s.name.clone(), s.namespace.clone()))
        .collect();
    Ok((pods, services))
}

/// `concurrency` from a Workload's `proxy.istio.io/config` annotation (Istio's ProxyConfig
/// as YAML); 0 means one worker per core.
fn concurrency(r: &trellis_api::Resource) -> Option<u32> {
    let text = r.meta.annotations.get("proxy.istio.io/config")?;
    let docs = yaml_rust2::YamlLoader::load_from_str(text).ok()?;
    let n = docs.first()?["concurrency"].as_i64()?;
    let n = u32::try_from(n).ok()?;
    Some(if n == 0 {
        std::thread::available_parallelism().map_or(2, |c| u32::try_from(c.get()).unwrap_or(2))
    } else {
        n
    })
}

fn namespace(r: &trellis_api::Resource) -> String {
    match r.namespace() {
        "" => "default".to_string(),
        ns => ns.to_string(),
    }
}

/// A pod's /etc/hosts: the pod by its name and the machine's (pods share its host
/// name: programs that look their own name up, as `python3 -m http.server` does, find it
/// here instead of waiting on a resolver the pod cannot reach), and every service by
/// `name.namespace` and FQDN, and by its short name in the pod's own namespace (as
/// Kubernetes DNS answers).
fn hosts_file(pod: &str, ip: std::net::Ipv4Addr, own_ns: &str, services: &[ServiceName]) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut out = format!(
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n{ip} {pod} {}\n",
        host.trim()
    );
    for (vip, name, ns) in services {
        let _ = write!(
            out,
            "{vip} {name}.{ns} {name}.{ns}.svc {name}.{ns}.svc.cluster.local"
        );
        if ns == own_ns {
            let _ = write!(out, " {name}");
        }
        out.push('\n');
    }
    out
}

struct Pod {
    plan: PodPlan,
    net: trellis_runtime::PodNet,
    /// The sidecar, or a gateway's proxy; none for a pod without a sidecar.
    sidecar: Option<Proc>,
    /// None for a gateway.
    app: Option<Proc>,
}

pub fn run_up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    run_mesh(&args.dir, args.name.as_deref(), None)
}

/// Called once the pods exist, with the mesh's network and each pod's name and address;
/// what it returns is kept until the mesh stops (a guard: dropping it ends what it
/// started).
pub type StartHook<'a> =
    &'a mut dyn FnMut(&MeshNet, &[(String, std::net::Ipv4Addr)]) -> Box<dyn std::any::Any>;

/// Runs the mesh of `dir` until SIGINT or SIGTERM.
pub fn run_mesh(
    dir: &Path,
    name: Option<&str>,
    hook: Option<StartHook<'_>>,
) -> anyhow::Result<ExitCode> {
    trellis_runtime::preflight()?;
    let dir = std::fs::canonicalize(dir)
        .with_context(|| format!("{}: no such directory", dir.display()))?;
    let mesh = match name {
        Some(n) => trellis_runtime::mesh_name(n),
        None => name_of(&dir.to_string_lossy()),
    };
    let net = MeshNet::new(&mesh);
    let state = state_dir(&mesh);
    if let Some(pid) = running_up(&state) {
        bail!("mesh {mesh} is already up (trellis up, pid {pid}): `trellis down {mesh}` first");
    }
    if !net.existing().is_empty() {
        println!("Cleaning up what a previous run of mesh {mesh} left behind…");
        net.teardown(Duration::from_secs(3))?;
    }
    remove_applied(&state);
    let (plans, services) = plan(&dir)?;
    let started = Instant::now();
    let logs = state.join("logs");
    let ca_dir = state.join("ca");
    // Each run's logs start empty.
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).with_context(|| format!("{}", logs.display()))?;
    std::fs::create_dir_all(&ca_dir)?;
    std::fs::write(state.join("up.pid"), std::process::id().to_string())?;
    std::fs::write(state.join("config-dir"), dir.to_string_lossy().as_bytes())?;
    let exe = std::env::current_exe().context("where is this program?")?;
    let exe = exe.to_string_lossy().into_owned();

    // The CA and the token key, made here so that tokens can be issued before the
    // control plane has started.
    trellis_identity::Ca::load_or_create(&ca_dir, "cluster.local")?;
    let tokens = trellis_identity::Tokens::load_or_create(&ca_dir)?;

    let launcher = Launcher {
        net: &net,
        state: &state,
        logs: &logs,
        ca_dir: &ca_dir,
        exe: &exe,
        dir: &dir,
        tokens: &tokens,
    };
    let result = (|| -> anyhow::Result<(Proc, Vec<Pod>)> {
        net.create_node()?;
        let mut cp = Proc::new(
            "control-plane".into(),
            net.node_ns(),
            vec![
                exe.clone(),
                "control-plane".into(),
                "--config-dir".into(),
                dir.to_string_lossy().into_owned(),
                "--listen".into(),
                cp_addr(&net),
                "--debug-listen".into(),
                format!("{}:15014", net.node_ip),
                "--data-dir".into(),
                ca_dir.to_string_lossy().into_owned(),
            ],
            logs.join("control-plane.log"),
        );
        cp.start()?;
        let mut pods = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            let index = u32::try_from(i).context("too many pods")?;
            pods.push(launcher.pod(index, plan, &services)?);
        }
        Ok((cp, pods))
    })();
    let (mut cp, mut pods) = match result {
        Ok(x) => x,
        Err(e) => {
            let _ = net.teardown(Duration::from_secs(2));
            let _ = std::fs::remove_file(state.join("up.pid"));
            return Err(e);
        }
    };
    println!(
        "Mesh {mesh}: {} pod(s) from {} (state and logs in {}).",
        pods.len(),
        dir.display(),
        state.display()
    );
    for p in &pods {
        println!("  {}", p.describe());
    }
    // Host ports: the machine's loopback to the pods.
    let mut forwards: Vec<(String, trellis_runtime::Forward)> = Vec::new();
    for p in &pods {
        forwards.extend(host_ports(&net, p));
    }
    println!(
        "Stop with Ctrl-C or `trellis down {mesh}`; `trellis ps {mesh}`, `trellis logs {mesh} POD`."
    );

    let stop = stop_signal()?;
    let guard = hook.map(|h| {
        let list: Vec<(String, std::net::Ipv4Addr)> = pods
            .iter()
            .map(|p| (p.plan.name.clone(), p.net.ip))
            .collect();
        h(&net, &list)
    });
    let mut announced = false;
    let mut seen = fingerprint(&dir);
    let mut services = services;
    let mut checked = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for event in std::iter::once(cp.tick())
            .chain(pods.iter_mut().flat_map(|p| {
                [
                    p.sidecar.as_mut().and_then(Proc::tick),
                    p.app.as_mut().and_then(Proc::tick),
                ]
            }))
            .flatten()
        {
            println!("{event}");
        }
        // Written beside, then renamed: `trellis ps` never reads a file being rewritten
        // (it read an empty one now and then).
        let (ps, tmp) = (state.join("ps"), state.join(".ps.tmp"));
        if std::fs::write(&tmp, ps_table(&cp, &pods)).is_ok() {
            let _ = std::fs::rename(&tmp, &ps);
        }
        if !announced && pods.iter().all(Pod::started) {
            announced = true;
            println!(
                "All apps running beside ready sidecars, {:.1}s after start.",
                started.elapsed().as_secs_f64()
            );
        }
        // Workloads added, removed or changed in the directory (or by `trellis apply`).
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = Instant::now();
            let now = fingerprint(&dir);
            if now != seen {
                seen = now;
                match plan(&dir) {
                    Ok((plans, new_services)) => {
                        let changed = Changes {
                            launcher: &launcher,
                            pods: &mut pods,
                            forwards: &mut forwards,
                        }
                        .apply(
                            plans,
                            &new_services,
                            new_services != services,
                        );
                        services = new_services;
                        if changed {
                            announced = false;
                        }
                    }
                    Err(e) => println!("{e:#}; the pods stay as they are"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(guard);
    println!("Stopping mesh {mesh}: apps, then sidecars, then the control plane…");
    drop(forwards);
    for p in pods.iter_mut().filter_map(|p| p.app.as_mut()) {
        p.stop(Duration::from_secs(5));
    }
    for p in pods.iter_mut().filter_map(|p| p.sidecar.as_mut()) {
        p.stop(Duration::from_secs(7));
    }
    cp.stop(Duration::from_secs(3));
    let torn = net.teardown(Duration::from_secs(2));
    clear_state(&state);
    torn?;
    println!("Mesh {mesh} is down.");
    Ok(ExitCode::SUCCESS)
}

/// What starting a pod needs.
struct Launcher<'a> {
    net: &'a MeshNet,
    state: &'a Path,
    logs: &'a Path,
    ca_dir: &'a Path,
    exe: &'a str,
    dir: &'a Path,
    tokens: &'a trellis_identity::Tokens,
}

impl Launcher<'_> {
    /// Creates pod number `index` of `plan` (its network, its token) and its processes,
    /// which start at their first tick: the sidecar, and the app once the sidecar is
    /// ready.
    fn pod(&self, index: u32, plan: PodPlan, services: &[ServiceName]) -> anyhow::Result<Pod> {
        let exe = self.exe.to_string();
        // A gateway's ports are its own listeners: nothing to intercept inbound. A pod
        // without a sidecar has no rules at all.
        let ports: Vec<u16> = if plan.gateway {
            Vec::new()
        } else {
            plan.ports.iter().map(|p| p.1).collect()
        };
        let hosts = hosts_file(
            &plan.name,
            self.net.pod_ip(index),
            &plan.namespace,
            services,
        );
        let pod_net = self.net.create_pod(
            &plan.name,
            index,
            plan.sidecar.then_some(&ports[..]),
            &hosts,
        )?;
        let log = |suffix: &str| self.logs.join(format!("{}{suffix}", plan.name));
        let sidecar = match plan.sidecar {
            true => Some(Proc::new(
                format!(
                    "{}/{}",
                    plan.name,
                    if plan.gateway { "gateway" } else { "sidecar" }
                ),
                pod_net.netns.clone(),
                self.proxy_argv(&plan, &pod_net)?,
                log(".proxy.log"),
            )),
            false => None,
        };
        // The app starts once its sidecar is ready (`trellis pod-exec` waits, then
        // becomes the app).
        let mut app_argv = Vec::new();
        if plan.sidecar {
            app_argv.extend([
                exe.clone(),
                "pod-exec".into(),
                "--wait-ready".into(),
                "127.0.0.1:15021".into(),
                "--".into(),
            ]);
        }
        // `trellis …` in a Workload's command is this very program (pods need nothing
        // installed: `trellis demo-app` plays Bookinfo).
        app_argv.extend(plan.argv.iter().enumerate().map(|(i, a)| {
            if i == 0 && a == "trellis" {
                exe.clone()
            } else {
                a.clone()
            }
        }));
        let app = (!plan.gateway).then(|| {
            let mut app = Proc::new(
                format!("{}/app", plan.name),
                pod_net.netns.clone(),
                app_argv,
                log(".log"),
            );
            app.env = plan.env.clone();
            app.cwd = plan.cwd.as_ref().map(|c| self.dir.join(c));
            app
        });
        Ok(Pod {
            plan,
            net: pod_net,
            sidecar,
            app,
        })
    }

    /// The sidecar's (or gateway's) command line, with a bootstrap token for the pod's
    /// service account written beside it.
    fn proxy_argv(
        &self,
        plan: &PodPlan,
        pod_net: &trellis_runtime::PodNet,
    ) -> anyhow::Result<Vec<String>> {
        let token = self.state.join(format!("{}.token", plan.name));
        // A token proves an identity: readable by root only.
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&token);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&token)
                .with_context(|| format!("{}", token.display()))?
                .write_all(
                    self.tokens
                        .issue(
                            &plan.namespace,
                            &plan.service_account,
                            Duration::from_secs(365 * 86_400),
                        )
                        .as_bytes(),
                )?;
        }
        let mut argv = vec![
            self.exe.to_string(),
            "proxy".into(),
            "--xds".into(),
            cp_addr(self.net),
            "--xds-root".into(),
            self.ca_dir
                .join("ca-cert.pem")
                .to_string_lossy()
                .into_owned(),
            "--xds-token-file".into(),
            token.to_string_lossy().into_owned(),
            "--name".into(),
            plan.name.clone(),
            "--namespace".into(),
            plan.namespace.clone(),
            "--service-account".into(),
            plan.service_account.clone(),
            "--address".into(),
            pod_net.ip.to_string(),
        ];
        if let Some(n) = plan.concurrency {
            argv.extend(["--workers".into(), n.to_string()]);
        }
        if plan.gateway {
            argv.extend(["--mode".into(), "gateway".into()]);
            for (_, port, _) in &plan.ports {
                argv.push("--gateway-listen".into());
                argv.push(format!("0.0.0.0:{port}={port}"));
            }
        } else {
            argv.push("--sidecar".into());
        }
        for (k, v) in &plan.labels {
            argv.push("--label".into());
            argv.push(format!("{k}={v}"));
        }
        for (name, port, _) in plan.ports.iter().filter(|_| !plan.gateway) {
            argv.push("--port".into());
            argv.push(match name {
                Some(n) => format!("{n}:{port}"),
                None => port.to_string(),
            });
        }
        Ok(argv)
    }
}

/// A pod's host ports, forwarded from the machine's loopback (by pod name).
fn host_ports(net: &MeshNet, p: &Pod) -> Vec<(String, trellis_runtime::Forward)> {
    let mut out = Vec::new();
    for (_, port, host) in &p.plan.ports {
        let Some(host) = host else { continue };
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], *host));
        let to = std::net::SocketAddr::from((p.net.ip, *port));
        match trellis_runtime::forward(listen, &net.node_ns(), to) {
            Ok(f) => {
                println!("  http://{listen} → {}:{port}", p.plan.name);
                out.push((p.plan.name.clone(), f));
            }
            Err(e) => eprintln!("warning: hostPort {host} of {}: {e:#}", p.plan.name),
        }
    }
    out
}

/// The running pods brought to a new plan.
struct Changes<'a, 'b> {
    launcher: &'a Launcher<'b>,
    pods: &'a mut Vec<Pod>,
    forwards: &'a mut Vec<(String, trellis_runtime::Forward)>,
}

impl Changes<'_, '_> {
    /// Stops and removes the pods the plan no longer has (or has changed: they start
    /// again as planned), starts the new ones, and rewrites every pod's hosts file when
    /// the services changed. Whether any pod was added or removed.
    fn apply(self, plans: Vec<PodPlan>, services: &[ServiceName], services_changed: bool) -> bool {
        let net = self.launcher.net;
        let mut changed = false;
        let mut kept = Vec::new();
        for mut pod in self.pods.drain(..) {
            if plans.contains(&pod.plan) {
                kept.push(pod);
                continue;
            }
            changed = true;
            let name = pod.plan.name.clone();
            let again = plans.iter().any(|p| p.name == name);
            println!(
                "{name}: {}",
                if again {
                    "its Workload changed; starting it again"
                } else {
                    "its Workload is gone; stopping it"
                }
            );
            self.forwards.retain(|(pod, _)| *pod != name);
            pod.stop();
            if let Err(e) = net.delete_pod(&name, Duration::from_secs(2)) {
                println!("{name}: {e:#}");
            }
            let _ = std::fs::remove_file(self.launcher.state.join(format!("{name}.token")));
        }
        *self.pods = kept;
        for plan in plans {
            if self.pods.iter().any(|p| p.plan.name == plan.name) {
                continue;
            }
            changed = true;
            // The lowest free number: its address and veth.
            let index = (0u32..)
                .find(|i| !self.pods.iter().any(|p| p.net.ip == net.pod_ip(*i)))
                .unwrap_or(0);
            match self.launcher.pod(index, plan, services) {
                Ok(pod) => {
                    println!("{}: new; {}", pod.plan.name, pod.describe());
                    self.forwards.extend(host_ports(net, &pod));
                    self.pods.push(pod);
                }
                Err(e) => println!("{e:#}"),
            }
        }
        if services_changed {
            for p in self.pods.iter() {
                let hosts = hosts_file(&p.plan.name, p.net.ip, &p.plan.namespace, services);
                if let Err(e) = p.net.write_hosts(&hosts) {
                    println!("{}: {e:#}", p.plan.name);
                }
            }
        }
        changed
    }
}

impl Pod {
    /// Its name, address and what it runs, for people.
    fn describe(&self) -> String {
        let what = if self.plan.gateway {
            "(gateway proxy)".to_string()
        } else if self.sidecar.is_none() {
            format!("{} (no sidecar)", self.plan.argv.join(" "))
        } else {
            self.plan.argv.join(" ")
        };
        format!("{:<24} {:<12} {what}", self.plan.name, self.net.ip)
    }

    /// Its app runs (beside a ready sidecar), or its gateway proxy does.
    fn started(&self) -> bool {
        match (&self.app, &self.sidecar) {
            (Some(app), Some(_)) => app_started(app),
            (Some(app), None) => app.running(),
            (None, Some(proxy)) => proxy.running(),
            (None, None) => true,
        }
    }

    /// The app (SIGTERM, 5 s), then the sidecar.
    fn stop(&mut self) {
        if let Some(app) = &mut self.app {
            app.stop(Duration::from_secs(5));
        }
        if let Some(sidecar) = &mut self.sidecar {
            sidecar.stop(Duration::from_secs(7));
        }
    }
}

/// The app runs (its `trellis pod-exec` has become the app: the sidecar was ready).
fn app_started(app: &Proc) -> bool {
    app.pid().is_some_and(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| !c.split(|b| *b == 0).any(|a| a == b"pod-exec"))
    })
}

fn ps_table(cp: &Proc, pods: &[Pod]) -> String {
    let state = |p: &Proc| {
        if p.running() {
            "running".to_string()
        } else {
            match &p.last_exit {
                Some(e) => format!("restarting ({e})"),
                None => "starting".to_string(),
            }
        }
    };
    let mut out = format!(
        "{:<24} {:<14} {:<12} {:<10} {:<28} {}\n",
        "POD", "WORKLOAD", "ADDRESS", "SIDECAR", "APP", "RESTARTS"
    );
    let _ = writeln!(
        out,
        "{:<24} {:<14} {:<12} {:<10} {:<28} {}",
        "control-plane",
        "-",
        "-",
        "-",
        state(cp),
        cp.restarts
    );
    for p in pods {
        let _ = writeln!(
            out,
            "{:<24} {:<14} {:<12} {:<10} {:<28} {}",
            p.plan.name,
            p.plan.workload,
            p.net.ip,
            p.sidecar
                .as_ref()
                .map_or_else(|| "(none)".to_string(), state),
            match &p.app {
                None => "(gateway)".to_string(),
                Some(a) if a.running() && !app_started(a) => "waiting for the sidecar".to_string(),
                Some(a) => state(a),
            },
            p.sidecar.as_ref().map_or(0, |s| s.restarts) + p.app.as_ref().map_or(0, |a| a.restarts)
        );
    }
    out
}

/// Set on SIGINT or SIGTERM.
fn stop_signal() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let set = std::sync::Arc::clone(&flag);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                set.store(true, std::sync::atomic::Ordering::Relaxed);
            });
        })?;
    Ok(flag)
}

/// A stopped mesh's state: the files `trellis apply` put into its directory, and all of
/// `/run/trellis/<mesh>` but its logs (the CA, the pods' tokens, the pid) are removed.
fn clear_state(state: &Path) {
    remove_applied(state);
    for entry in std::fs::read_dir(state).into_iter().flatten().flatten() {
        if entry.file_name() == "logs" {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// Removes the files `trellis apply` put into the mesh's directory.
fn remove_applied(state: &Path) {
    let list = std::fs::read_to_string(state.join("applied")).unwrap_or_default();
    for f in list.lines().filter(|l| !l.is_empty()) {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_file(state.join("applied"));
}

/// The pid of the `trellis up` (or `trellis demo`) running this mesh, if one is.
fn running_up(state: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(state.join("up.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (trellis_runtime::net::alive(pid)
        && cmdline
            .split(|b| *b == 0)
            .any(|a| a == b"up" || a == b"demo"))
    .then_some(pid)
}

pub fn run_down(args: &MeshRef) -> anyhow::Result<ExitCode> {
    trellis_runtime::preflight()?;
    let mesh = name_of(&args.mesh);
    let net = MeshNet::new(&mesh);
    let state = state_dir(&mesh);
    if let Some(pid) = running_up(&state) {
        // The running `trellis up` stops its mesh in order.
        trellis_runtime::net::signal(&[pid], "TERM");
        let until = Instant::now() + Duration::from_secs(30);
        while trellis_runtime::net::alive(pid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let left = net.existing();
    if !left.is_empty() {
        net.teardown(Duration::from_secs(5))?;
    }
    clear_state(&state);
    println!("Mesh {mesh} is down.");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// Files of resources (Istio YAML, Services, Workloads).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// The mesh (default: the only one running).
    #[arg(long)]
    pub mesh: Option<String>,
}

/// Copies files into a running mesh's configuration directory, where the control plane
/// sees them within a second; an object a file declares replaces the one of the same kind,
/// namespace and name (the file loaded last wins, as `kubectl apply` replaces).
pub fn run_apply(args: &ApplyArgs) -> anyhow::Result<ExitCode> {
    let mesh = match &args.mesh {
        Some(m) => name_of(m),
        None => {
            let running: Vec<String> = std::fs::read_dir("/run/trellis")
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| running_up(&e.path()).is_some())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            match running.as_slice() {
                [one] => one.clone(),
                [] => bail!("no mesh is up (`trellis up DIR`)"),
                more => bail!(
                    "several meshes are up ({}): say which with --mesh",
                    more.join(", ")
                ),
            }
        }
    };
    let state = state_dir(&mesh);
    if running_up(&state).is_none() {
        bail!("mesh {mesh} is not up");
    }
    let dir = PathBuf::from(std::fs::read_to_string(state.join("config-dir"))?.trim());
    for f in &args.files {
        // Checked first: a file with errors is refused whole, and says why.
        let parsed = trellis_api::load_paths(&[f], &LoadOptions::default());
        let errors: Vec<String> = parsed
            .iter()
            .flat_map(|p| &p.diagnostics)
            .filter(|d| d.level == trellis_api::Level::Error)
            .map(ToString::to_string)
            .collect();
        if !errors.is_empty() {
            bail!("{} not applied:\n  {}", f.display(), errors.join("\n  "));
        }
        let name = f
            .file_name()
            .with_context(|| format!("{}: not a file", f.display()))?;
        let to = dir.join(format!("applied-{}", name.to_string_lossy()));
        // Written beside, then renamed: the watcher never reads half a file.
        let tmp = dir.join(format!(".applied-{}.tmp", name.to_string_lossy()));
        std::fs::copy(f, &tmp).with_context(|| format!("{}", f.display()))?;
        std::fs::rename(&tmp, &to)?;
        // Remembered, so that the mesh's end takes it away again (the directory is the
        // user's: a demo must not leave files in it).
        let mut list = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.join("applied"))?;
        std::io::Write::write_all(&mut list, format!("{}\n", to.display()).as_bytes())?;
        let objects: Vec<String> = parsed
            .iter()
            .filter_map(|p| p.resource())
            .map(|r| r.object_ref().to_string())
            .collect();
        println!("{} → mesh {mesh}: {}", f.display(), objects.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_ps(args: &MeshRef) -> anyhow::Result<ExitCode> {
    let mesh = name_of(&args.mesh);
    let state = state_dir(&mesh);
    if running_up(&state).is_none() {
        bail!("mesh {mesh} is not up");
    }
    print!("{}", std::fs::read_to_string(state.join("ps"))?);
    Ok(ExitCode::SUCCESS)
}

pub fn run_logs(args: &LogsArgs) -> anyhow::Result<ExitCode> {
    use std::io::{Read, Seek, Write};
    let mesh = name_of(&args.mesh.mesh);
    let file = match (args.pod.as_str(), args.proxy) {
        ("control-plane", _) => "control-plane.log".to_string(),
        (pod, true) => format!("{pod}.proxy.log"),
        (pod, false) => format!("{pod}.log"),
    };
    let path = state_dir(&mesh).join("logs").join(file);
    let mut f = std::fs::File::open(&path).with_context(|| {
        format!(
            "no log {} (is the pod's name right? `trellis ps {mesh}`)",
            path.display()
        )
    })?;
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        f.read_to_end(&mut buf)?;
        out.write_all(&buf)?;
        out.flush()?;
        if !args.follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(250));
        // Truncated (a new run): from the start again.
        if f.metadata()?.len() < f.stream_position()? {
            f.seek(std::io::SeekFrom::Start(0))?;
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PodExecArgs {
    /// Wait until the sidecar answers 200 on this address's /healthz/ready.
    #[arg(long, value_name = "ADDR")]
    pub wait_ready: std::net::SocketAddr,
    /// Give up after this long.
    #[arg(long, default_value = "60s")]
    pub timeout: trellis_api::common::Duration,
    /// The app and its arguments.
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    pub command: Vec<std::ffi::OsString>,
}

/// Inside a pod: waits for the sidecar, then becomes the app (so that the app never
/// starts before its traffic can flow).
pub fn run_pod_exec(args: &PodExecArgs) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let until = Instant::now() + args.timeout.0;
    loop {
        if ready(args.wait_ready) {
            break;
        }
        if Instant::now() >= until {
            bail!(
                "the sidecar was not ready on {} after {:?}; not starting the app",
                args.wait_ready,
                args.timeout.0
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = std::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .exec();
    bail!("cannot run {:?}: {err}", args.command[0])
}

fn ready(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_s_proxy_config_annotation_sets_its_sidecar_s_workers() {
        let parse = |annotations: &str| {
            let text = format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w, annotations: {annotations}}}\nspec: {{command: [sleep, '1']}}\n"
            );
            let parsed = trellis_api::parse_text(&text, "w.yaml", &LoadOptions::default());
            let r = parsed[0].resource().expect("a Workload").clone();
            concurrency(&r)
        };
        assert_eq!(parse("{proxy.istio.io/config: 'concurrency: 1'}"), Some(1));
        assert_eq!(
            parse(
                "{proxy.istio.io/config: '{concurrency: 4, holdApplicationUntilProxyStarts: true}'}"
            ),
            Some(4)
        );
        assert_eq!(parse("{other: x}"), None);
        assert_eq!(parse("{proxy.istio.io/config: 'not: [yaml'}"), None);
        assert!(parse("{proxy.istio.io/config: 'concurrency: 0'}").is_some_and(|n| n >= 1));
    }

    #[test]
    fn hosts_files_name_services_as_kubernetes_dns_does() {
        let services = vec![
            (
                "240.240.0.7".to_string(),
                "web".to_string(),
                "shop".to_string(),
            ),
            (
                "240.240.0.9".to_string(),
                "db".to_string(),
                "data".to_string(),
            ),
        ];
        let h = hosts_file("client-0", [10, 244, 0, 11].into(), "shop", &services);
        assert!(h.contains("240.240.0.7 web.shop web.shop.svc web.shop.svc.cluster.local web\n"));
        assert!(h.contains("240.240.0.9 db.data db.data.svc db.data.svc.cluster.local\n"));
        assert!(h.contains("\n10.244.0.11 client-0 "), "{h}");
    }
}
