//! `trellis explain`: which VirtualService rule a request meets and where it goes, matched
//! by the same engine the proxy uses (`trellis-policy`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use trellis_api::networking::VirtualService;
use trellis_api::{LoadOptions, Spec, host};
use trellis_control::translate::{self, MESH};
use trellis_policy::route::{RouteTable, SimpleRequest};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories with the configuration (YAML or JSON); `-` reads stdin.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// The host the request is for, as the client names it (`reviews`, `reviews.bookinfo`,
    /// an FQDN, `shop.example.com`).
    #[arg(long)]
    host: String,
    /// Path and query.
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request header (NAME: VALUE, repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Destination port (default: the Kubernetes Service's first port, else 80).
    #[arg(long)]
    port: Option<u16>,
    /// The client's namespace (short host names resolve in it).
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The client's labels (KEY=VALUE, repeatable), for sourceLabels matches.
    #[arg(long = "source-label", value_name = "KEY=VALUE")]
    source_labels: Vec<String>,
    /// `mesh` (a sidecar's request) or a Gateway as NAMESPACE/NAME.
    #[arg(long, default_value = MESH)]
    gateway: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let parsed = trellis_api::load_paths(
        &args.paths,
        &LoadOptions {
            default_namespace: args.namespace.clone(),
        },
    );
    for p in &parsed {
        for d in p
            .diagnostics
            .iter()
            .filter(|d| d.level == trellis_api::Level::Error)
        {
            eprintln!("{d}");
        }
    }
    let resources: Vec<_> = parsed.iter().filter_map(|p| p.resource()).collect();
    let vss: Vec<(&str, &str, &VirtualService)> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::VirtualService(v) => Some((r.namespace(), r.name(), v)),
            _ => None,
        })
        .collect();
    // The names the client's host may stand for (Kubernetes search path).
    let candidates = host::kube_candidates(&args.host, &args.namespace);
    let service_port = resources.iter().find_map(|r| match &r.spec {
        Spec::Service(s)
            if candidates
                .iter()
                .any(|c| *c == host::fqdn(r.name(), r.namespace())) =>
        {
            s.ports.first().and_then(|p| u16::try_from(p.port).ok())
        }
        _ => None,
    });
    let port = args.port.or(service_port).unwrap_or(80);
    let bound: Vec<&(&str, &str, &VirtualService)> = vss
        .iter()
        .filter(|(ns, _, vs)| {
            translate::applies_to(vs, ns, &args.gateway)
                && vs.hosts.iter().any(|h| {
                    let h = host::fqdn(h, ns);
                    candidates.iter().any(|c| host::matches(&h, c))
                })
        })
        .collect();
    let Some((ns, name, vs)) = bound.first() else {
        println!(
            "No VirtualService for {} ({}) at {}: the request goes to the service's own cluster, {}.",
            args.host,
            candidates.join(", "),
            args.gateway,
            translate::cluster_name(port, None, &candidates[0])
        );
        return Ok(ExitCode::SUCCESS);
    };
    if bound.len() > 1 {
        eprintln!(
            "warning: {} VirtualServices claim this host (IST0109); the first one is used: {ns}/{name}",
            bound.len()
        );
    }
    let lookup = |n: &str, namespace: &str| {
        vss.iter()
            .find(|(vns, vname, _)| *vname == n && *vns == namespace)
            .map(|(_, _, v)| *v)
    };
    let rules = translate::effective_http_rules(vs, ns, &args.gateway, &lookup)
        .map_err(|e| anyhow::anyhow!("VirtualService {ns}/{name}: {e}"))?;
    let api: Vec<_> = rules.iter().map(|r| r.rule.clone()).collect();
    let table: RouteTable<String> = RouteTable::compile(&api, |d, _| {
        Ok(d.host.clone()) // placeholder, replaced below with the cluster name
    })
    .map_err(|e| anyhow::anyhow!("VirtualService {ns}/{name}: {e}"))?;

    let mut req = SimpleRequest::get(&args.host, &args.path);
    req.method = args.method.to_ascii_uppercase();
    req.port = Some(port);
    req.source_namespace = args.namespace.clone();
    req.gateway = args.gateway.clone();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("-H {h:?}: expected NAME: VALUE"))?;
        req = req.header(k.trim(), v.trim());
    }
    for l in &args.source_labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--source-label {l:?}: expected KEY=VALUE"))?;
        req.source_labels.insert(k.to_string(), v.to_string());
    }
    let Some(m) = table.first_match(&req) else {
        println!(
            "VirtualService {ns}/{name}: no rule matches {} http://{}{}; the proxy answers 404 (NR).",
            req.method, args.host, args.path
        );
        return Ok(ExitCode::from(1));
    };
    let e = &rules[m.route.index];
    let from = match &e.delegate {
        Some(d) => format!(" (delegated to {d})"),
        None => String::new(),
    };
    println!(
        "VirtualService {ns}/{name}{from}: rule {:?} (http[{}]) matches {} http://{}{}",
        m.route.name, e.index, req.method, args.host, args.path
    );
    let r = &e.rule;
    if let Some(d) = &r.direct_response {
        println!("  answered by the proxy: status {}", d.status);
    }
    if let Some(rd) = &r.redirect {
        println!(
            "  redirected ({}) to {}{}",
            rd.redirect_code.unwrap_or(301),
            rd.authority.as_deref().unwrap_or("(same host)"),
            rd.uri.as_deref().unwrap_or("(same path)")
        );
    }
    let total: i64 = r
        .route
        .iter()
        .map(|d| i64::from(d.weight.unwrap_or(0)))
        .sum();
    for d in &r.route {
        let p = d
            .destination
            .port
            .and_then(|p| p.number)
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or(port);
        let fqdn = host::fqdn(&d.destination.host, &e.namespace);
        let share = match (r.route.len(), d.weight) {
            (1, _) => 100.0,
            (_, Some(w)) if total > 0 => f64::from(w) * 100.0 / total as f64,
            _ => 0.0,
        };
        println!(
            "  → {share:.0} %  {fqdn}{} port {p}  (cluster {})",
            d.destination
                .subset
                .as_deref()
                .map(|s| format!(" subset {s}"))
                .unwrap_or_default(),
            translate::cluster_name(p, d.destination.subset.as_deref(), &fqdn)
        );
    }
    if let Some(t) = &r.timeout {
        println!("  timeout {t}");
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            let pct = d.percentage.as_ref().map_or(100.0, |p| p.value);
            let delay = d
                .fixed_delay
                .as_ref()
                .map(|t| t.to_string())
                .unwrap_or_default();
            println!("  fault: delay {delay} for {pct} % of requests");
        }
        if let Some(a) = &f.abort {
            let pct = a.percentage.as_ref().map_or(100.0, |p| p.value);
            match (&a.http_status, &a.grpc_status) {
                (Some(s), _) => println!("  fault: abort with HTTP {s} for {pct} % of requests"),
                (None, Some(g)) => println!("  fault: abort with gRPC {g} for {pct} % of requests"),
                _ => {}
            }
        }
    }
    match &r.retries {
        Some(rt) => println!(
            "  retries: {} attempts{}",
            rt.attempts.unwrap_or(0),
            rt.retry_on
                .as_deref()
                .map(|o| format!(" on {o}"))
                .unwrap_or_default()
        ),
        None => println!(
            "  retries: Istio's default (2 attempts on connect-failure, refused-stream, unavailable, cancelled, 503)"
        ),
    }
    Ok(ExitCode::SUCCESS)
}
