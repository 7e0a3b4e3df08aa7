//! `trellis control-plane` and `trellis proxy-status`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use trellis_control::server::{ControlPlane, Debounce};
use trellis_control::{ConfigStore, DirectorySource};

#[derive(Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Directory of configuration (YAML or JSON), watched for changes.
    #[arg(long, value_name = "DIR")]
    config_dir: PathBuf,
    /// Where proxies connect (Delta ADS and the CA over gRPC, on TLS).
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: SocketAddr,
    /// More names (DNS names or IP addresses) for the control plane's TLS certificate,
    /// which always has `trellis-control`, `localhost` and the --listen address (repeatable).
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Debug and monitoring HTTP (`/debug/proxy-status`, `/metrics`).
    #[arg(long, default_value = "127.0.0.1:15014")]
    debug_listen: SocketAddr,
    /// Push after the configuration has been quiet this long…
    #[arg(long, default_value = "100ms")]
    debounce: trellis_api::common::Duration,
    /// …or at the latest this long after the first change.
    #[arg(long, default_value = "1s")]
    debounce_max: trellis_api::common::Duration,
    /// At most this many proxies have a push in flight (sent, not yet acknowledged) at
    /// once; the others wait their turn.
    #[arg(long, default_value_t = trellis_control::server::DEFAULT_PUSH_CONCURRENCY)]
    push_concurrency: usize,
    /// Where the CA's root and the token key live (created on first start).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The SPIFFE trust domain (default: the mesh config's `trustDomain`, else
    /// cluster.local).
    #[arg(long)]
    trust_domain: Option<String>,
    /// Mesh-wide settings in the shape of Istio's meshConfig (rootNamespace, trustDomain,
    /// outboundTrafficPolicy, defaultConfig.gatewayTopology, defaultProviders,
    /// extensionProviders, accessLogFile…). Fields Trellis does not use are named and
    /// ignored.
    #[arg(long, value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// Trust what proxies announce without a bootstrap token, in cleartext and without a
    /// CA (local experiments only).
    #[arg(long)]
    no_auth: bool,
    /// With --no-auth, allow a non-loopback --listen (the transport is then cleartext).
    #[arg(long)]
    allow_cleartext: bool,
}

/// `--data-dir`, else `~/.local/share/trellis`.
fn data_dir(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(d) => Ok(d.clone()),
        None => {
            let home = std::env::var_os("HOME").context("no HOME: give --data-dir")?;
            Ok(PathBuf::from(home).join(".local/share/trellis"))
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CertArgs {
    /// The workload's namespace.
    #[arg(short, long)]
    namespace: String,
    /// The workload's service account.
    #[arg(long)]
    service_account: String,
    /// Where to write cert-chain.pem, key.pem (mode 0600) and root-cert.pem.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// How long the certificate is valid (at most 7 days).
    #[arg(long, default_value = "24h")]
    ttl: trellis_api::common::Duration,
    /// The control plane's data directory (its CA).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

/// `trellis cert`: a workload certificate from the mesh CA, to files.
pub fn run_cert(args: &CertArgs) -> anyhow::Result<ExitCode> {
    let dir = data_dir(args.data_dir.as_ref())?;
    let ca = trellis_identity::Ca::load_or_create(&dir, &args.trust_domain)?;
    let tokens = trellis_identity::Tokens::load_or_create(&dir)?;
    let id = trellis_identity::Identity {
        trust_domain: args.trust_domain.clone(),
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
    };
    let (key, csr) = trellis_identity::workload_key_and_csr(&id)?;
    let token = tokens.issue(
        &args.namespace,
        &args.service_account,
        Duration::from_secs(60),
    );
    let chain = ca.create_certificate(&tokens, &token, &csr, args.ttl.0)?;
    trellis_identity::write_workload_files(&args.out, &chain, &key, &ca.trust_roots()?)?;
    eprintln!(
        "{} for {}, in {} (cert-chain.pem, key.pem, root-cert.pem)",
        if args.ttl.0 > trellis_identity::MAX_TTL {
            "a certificate (capped at 7 days)"
        } else {
            "a certificate"
        },
        id.spiffe(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The namespace the token proves.
    #[arg(short, long)]
    namespace: String,
    /// The service account the token proves.
    #[arg(long)]
    service_account: String,
    /// How long it is valid.
    #[arg(long, default_value = "1h")]
    ttl: trellis_api::common::Duration,
    /// The control plane's data directory (its token key).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

pub fn run_token(args: &TokenArgs) -> anyhow::Result<ExitCode> {
    let dir = data_dir(args.data_dir.as_ref())?;
    let tokens = trellis_identity::Tokens::load_or_create(&dir)?;
    println!(
        "{}",
        tokens.issue(&args.namespace, &args.service_account, args.ttl.0)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_control_plane(args: &ControlPlaneArgs) -> anyhow::Result<ExitCode> {
    if args.no_auth && !args.listen.ip().is_loopback() && !args.allow_cleartext {
        anyhow::bail!(
            "--listen {} is not a loopback address, and with --no-auth the transport has no TLS: configuration would cross the network in clear (--allow-cleartext to do it anyway)",
            args.listen
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let mesh = match &args.mesh_config {
        None => trellis_api::mesh::MeshConfigFile::default(),
        Some(path) => {
            let (mesh, warnings) =
                trellis_api::mesh::load_mesh_config(path).map_err(anyhow::Error::msg)?;
            for w in warnings {
                eprintln!("warning: {}: {w}", path.display());
            }
            mesh
        }
    };
    let trust_domain = args
        .trust_domain
        .clone()
        .or_else(|| mesh.trust_domain.clone())
        .unwrap_or_else(|| "cluster.local".to_string());
    rt.block_on(async {
        let store = Arc::new(ConfigStore::new());
        let source = Arc::new(DirectorySource::new(&args.config_dir, Arc::clone(&store)));
        let watch = Arc::clone(&source)
            .watch()
            .with_context(|| format!("watching {}", args.config_dir.display()))?;
        for d in watch.diagnostics() {
            eprintln!("{d}");
        }
        let cp = ControlPlane::with_options(
            Arc::clone(&store),
            Debounce {
                quiet: args.debounce.0,
                max: args.debounce_max.0,
            },
            trellis_control::server::DEFAULT_GRACE,
            &trust_domain,
        );
        cp.set_push_concurrency(args.push_concurrency);
        cp.set_mesh_config(mesh);
        tokio::spawn(Arc::clone(&cp).run());
        let auth = if args.no_auth {
            eprintln!("warning: --no-auth: proxies' announcements are not checked against tokens");
            None
        } else {
            let dir = data_dir(args.data_dir.as_ref())?;
            let ca = trellis_identity::Ca::load_or_create(&dir, &trust_domain)?;
            let tokens = trellis_identity::Tokens::load_or_create(&dir)?;
            eprintln!(
                "CA and token key in {} (trust domain {}); proxies need a token: trellis token -n NS --service-account SA",
                dir.display(),
                trust_domain
            );
            eprintln!(
                "proxies verify the control plane with the root in {} (trellis-proxy --xds-root)",
                ca.root_file().display()
            );
            Some(Arc::new(trellis_control::ads::Auth { ca, tokens }))
        };
        let tls = match &auth {
            None => None,
            Some(auth) => {
                let (dns, ips) = serving_names(args.listen, &args.tls_sans);
                let (creds, renew) =
                    trellis_control::ads::serving_credentials(Arc::clone(auth), dns, ips)?;
                tokio::spawn(renew);
                tokio::spawn(trellis_control::ads::publish_trust_roots(
                    Arc::clone(auth),
                    Arc::clone(&cp),
                    Duration::from_secs(5),
                ));
                Some(Arc::new(trellis_identity::tls::server_config(
                    creds,
                    &[b"h2"],
                )?))
            }
        };
        let xds = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let debug = tokio::net::TcpListener::bind(args.debug_listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.debug_listen))?;
        eprintln!(
            "control plane: {} objects from {}; proxies connect to {}, status on http://{}/debug/proxy-status",
            store.len(),
            args.config_dir.display(),
            args.listen,
            args.debug_listen
        );
        tokio::spawn(trellis_control::debug::serve(debug, Arc::clone(&cp)));
        tokio::select! {
            _ = trellis_control::ads::serve_with(xds, cp, auth, tls) => {}
            _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
        }
        drop(watch);
        Ok(ExitCode::SUCCESS)
    })
}

/// The names in the control plane's certificate: `trellis-control`, `localhost`, the
/// listen address (loopback addresses when it listens on all of them), and the user's.
fn serving_names(listen: SocketAddr, extra: &[String]) -> (Vec<String>, Vec<std::net::IpAddr>) {
    let mut dns = vec!["trellis-control".to_string(), "localhost".to_string()];
    let mut ips = Vec::new();
    if listen.ip().is_unspecified() {
        ips.push(std::net::IpAddr::from([127, 0, 0, 1]));
        ips.push(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
    } else {
        ips.push(listen.ip());
    }
    for name in extra {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns.contains(name) => dns.push(name.clone()),
            Err(_) => {}
        }
    }
    (dns, ips)
}

#[derive(Debug, clap::Args)]
pub struct ProxyStatusArgs {
    /// The control plane's debug address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    control_plane: SocketAddr,
    /// Print the JSON the control plane answers.
    #[arg(short = 'o', long, value_enum, default_value_t = StatusFormat::Table)]
    output: StatusFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StatusFormat {
    Table,
    Json,
}

/// A plain HTTP/1.0 GET (the CLI needs nothing more).
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the control plane at {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed answer from the control plane")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!(
            "control plane answered {}: {}",
            head.lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("HTTP/1.1 "),
            body.trim()
        );
    }
    Ok(body.to_string())
}

/// `90061` → `1d1h`, `3599` → `59m59s`: the two largest units.
fn human_duration(secs: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = String::new();
    let mut left = secs;
    let mut shown = 0;
    for (size, name) in units {
        if left >= size || (shown == 0 && size == 1) {
            out.push_str(&format!("{}{name}", left / size));
            left %= size;
            shown += 1;
        } else if shown > 0 {
            shown += 1;
        }
        if shown == 2 {
            break;
        }
    }
    out
}

pub fn run_proxy_status(args: &ProxyStatusArgs) -> anyhow::Result<ExitCode> {
    let body = get(args.control_plane, "/debug/proxy-status")?;
    let list: serde_json::Value = serde_json::from_str(&body).context("parsing the status")?;
    let mut out = std::io::stdout().lock();
    if matches!(args.output, StatusFormat::Json) {
        writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let s = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
    writeln!(
        out,
        "{:<32} {:<16} {:<16} {:<8} {:<12} NACK",
        "PROXY", "SENT", "ACKED", "SYNCED", "CERT EXPIRY"
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for p in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let synced = if p["sentVersion"] == p["ackedVersion"] {
            "SYNCED"
        } else if !p["nackedVersion"].is_null() && p["nackedVersion"] == p["sentVersion"] {
            "NACKED"
        } else {
            "STALE"
        };
        let nack = match (p["nackedVersion"].as_str(), p["nackError"].as_str()) {
            (Some(v), Some(e)) => format!("{v}: {e}"),
            _ => String::new(),
        };
        let cert = match p["certificateExpiryUnix"].as_u64() {
            None => "-".to_string(),
            Some(t) if t <= now => "EXPIRED".to_string(),
            Some(t) => format!("in {}", human_duration(t - now)),
        };
        writeln!(
            out,
            "{:<32} {:<16} {:<16} {:<8} {:<12} {nack}",
            format!("{}.{}", s(p, "instance"), s(p, "namespace")),
            s(p, "sentVersion"),
            s(p, "ackedVersion"),
            synced,
            cert
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Args)]
pub struct ProxyConfigArgs {
    /// The proxy, as INSTANCE.NAMESPACE (as `trellis proxy-status` lists it).
    proxy: String,
    /// What to show.
    #[arg(value_enum, default_value_t = Section::All)]
    section: Section,
    /// The control plane's debug address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    control_plane: SocketAddr,
    #[arg(short = 'o', long, value_enum, default_value_t = ConfigFormat::Table)]
    output: ConfigFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ConfigFormat {
    Table,
    Json,
    Yaml,
}

/// A JSON value as YAML (the same document; numbers that are not integers as floats).
fn to_yaml(v: &serde_json::Value) -> yaml_rust2::Yaml {
    use yaml_rust2::Yaml;
    match v {
        serde_json::Value::Null => Yaml::Null,
        serde_json::Value::Bool(b) => Yaml::Boolean(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        serde_json::Value::String(s) => Yaml::String(s.clone()),
        serde_json::Value::Array(a) => Yaml::Array(a.iter().map(to_yaml).collect()),
        serde_json::Value::Object(o) => {
            let mut h = yaml_rust2::yaml::Hash::new();
            for (k, v) in o {
                h.insert(Yaml::String(k.clone()), to_yaml(v));
            }
            Yaml::Hash(h)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Routes,
    Clusters,
    Endpoints,
    Listeners,
    /// The proxy's identity, its certificate's expiry and the trust bundle.
    Secrets,
    All,
}

/// `trellis proxy-config`: a proxy's current snapshot, as the control plane last sent it.
pub fn run_proxy_config(args: &ProxyConfigArgs) -> anyhow::Result<ExitCode> {
    let body = get(
        args.control_plane,
        &format!("/debug/config_dump?proxy={}", args.proxy),
    )?;
    let snap: serde_json::Value = serde_json::from_str(&body).context("parsing the snapshot")?;
    let mut out = std::io::stdout().lock();
    let empty = Vec::new();
    let list = |k: &str| snap[k].as_array().unwrap_or(&empty).clone();
    let secrets = || -> anyhow::Result<serde_json::Value> {
        let status: serde_json::Value =
            serde_json::from_str(&get(args.control_plane, "/debug/proxy-status")?)
                .context("parsing the status")?;
        let me = status
            .as_array()
            .and_then(|l| {
                l.iter().find(|p| {
                    format!(
                        "{}.{}",
                        p["instance"].as_str().unwrap_or(""),
                        p["namespace"].as_str().unwrap_or("")
                    ) == args.proxy
                })
            })
            .cloned()
            .unwrap_or_default();
        let roots: Vec<serde_json::Value> = snap["trustRoots"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.as_str())
            .map(|pem| match trellis_identity::describe(pem) {
                Some((subject, not_after)) => serde_json::json!({
                    "subject": subject,
                    "notAfterUnix": not_after
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                }),
                None => serde_json::json!({"subject": "(not a certificate)"}),
            })
            .collect();
        Ok(serde_json::json!({
            "identity": me["identity"],
            "certificateExpiryUnix": me["certificateExpiryUnix"],
            "trustRoots": roots,
        }))
    };
    if args.output != ConfigFormat::Table {
        let v = match args.section {
            Section::All => snap.clone(),
            Section::Secrets => secrets()?,
            Section::Clusters | Section::Endpoints => serde_json::Value::Array(list("clusters")),
            Section::Routes | Section::Listeners => serde_json::Value::Array(list("services")),
        };
        if args.output == ConfigFormat::Json {
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            let mut text = String::new();
            yaml_rust2::YamlEmitter::new(&mut text)
                .dump(&to_yaml(&v))
                .map_err(|e| anyhow::anyhow!("writing YAML: {e}"))?;
            writeln!(out, "{text}")?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let all = args.section == Section::All;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    if all || args.section == Section::Listeners {
        writeln!(
            out,
            "{:<48} {:<18} {:<6} PROTOCOL",
            "SERVICE", "ADDRESS", "PORT"
        )?;
        for svc in list("services") {
            for p in svc["ports"].as_array().unwrap_or(&empty) {
                writeln!(
                    out,
                    "{:<48} {:<18} {:<6} {}",
                    s(&svc["hostname"]),
                    svc["addresses"][0].as_str().unwrap_or("-"),
                    p["port"],
                    p["protocol"].as_str().or(p["name"].as_str()).unwrap_or("-")
                )?;
            }
        }
        writeln!(out)?;
    }
    if all || args.section == Section::Routes {
        writeln!(
            out,
            "{:<48} {:<6} {:<20} DESTINATIONS",
            "SERVICE", "PORT", "ROUTE"
        )?;
        for svc in list("services") {
            for p in svc["ports"].as_array().unwrap_or(&empty) {
                for r in p["httpRoutes"].as_array().unwrap_or(&empty) {
                    let dests: Vec<String> = r["clusters"]
                        .as_array()
                        .unwrap_or(&empty)
                        .iter()
                        .map(|c| match c["weight"].as_u64() {
                            Some(w) if w > 0 => format!("{} ({w})", s(&c["cluster"])),
                            _ => s(&c["cluster"]),
                        })
                        .collect();
                    writeln!(
                        out,
                        "{:<48} {:<6} {:<20} {}",
                        s(&svc["hostname"]),
                        p["port"],
                        s(&r["name"]),
                        dests.join(", ")
                    )?;
                }
            }
        }
        writeln!(out)?;
    }
    if all || args.section == Section::Clusters {
        writeln!(out, "{:<64} {:<14} ENDPOINTS", "CLUSTER", "LB")?;
        for c in list("clusters") {
            writeln!(
                out,
                "{:<64} {:<14} {}",
                s(&c["name"]),
                c["loadBalancer"].as_str().unwrap_or("ROUND_ROBIN"),
                c["endpoints"].as_array().map_or(0, Vec::len)
            )?;
        }
        writeln!(out)?;
    }
    if all || args.section == Section::Secrets {
        let v = secrets()?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let expiry = |t: Option<u64>| match t {
            None => "-".to_string(),
            Some(t) if t <= now => "EXPIRED".to_string(),
            Some(t) => format!("in {}", human_duration(t - now)),
        };
        writeln!(out, "{:<56} CERT EXPIRY", "IDENTITY")?;
        writeln!(
            out,
            "{:<56} {}",
            v["identity"].as_str().unwrap_or("-"),
            expiry(v["certificateExpiryUnix"].as_u64())
        )?;
        writeln!(out)?;
        writeln!(out, "{:<56} EXPIRY", "TRUST ROOT")?;
        for r in v["trustRoots"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            writeln!(
                out,
                "{:<56} {}",
                r["subject"].as_str().unwrap_or("-"),
                expiry(r["notAfterUnix"].as_u64())
            )?;
        }
        writeln!(out)?;
    }
    if all || args.section == Section::Endpoints {
        writeln!(
            out,
            "{:<24} {:<8} {:<12} CLUSTER",
            "ENDPOINT", "PROXIED", "LOCALITY"
        )?;
        for c in list("clusters") {
            for e in c["endpoints"].as_array().unwrap_or(&empty) {
                writeln!(
                    out,
                    "{:<24} {:<8} {:<12} {}",
                    s(&e["address"]),
                    e["proxied"].as_bool().unwrap_or(false),
                    e["locality"].as_str().unwrap_or("-"),
                    s(&c["name"])
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_in_their_two_largest_units() {
        let h = super::human_duration;
        assert_eq!(h(0), "0s");
        assert_eq!(h(59), "59s");
        assert_eq!(h(3_599), "59m59s");
        assert_eq!(h(3_600), "1h");
        assert_eq!(h(86_399), "23h59m");
        assert_eq!(h(90_061), "1d1h");
        assert_eq!(h(86_400 + 59), "1d");
    }
}
