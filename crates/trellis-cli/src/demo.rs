//! `trellis demo`: the tour. Today it loads the bundled Bookinfo example (the same files as
//! `examples/bookinfo`), shows what Trellis understood and analyzes it. When the local
//! runtime lands, the demo starts the mesh itself.

use std::process::ExitCode;

use trellis_api::analyze::{self, AnalyzeOptions};
use trellis_api::{Level, LoadOptions, Spec};

const FILES: [(&str, &str); 4] = [
    (
        "examples/bookinfo/services.yaml",
        include_str!("../../../examples/bookinfo/services.yaml"),
    ),
    (
        "examples/bookinfo/workloads.yaml",
        include_str!("../../../examples/bookinfo/workloads.yaml"),
    ),
    (
        "examples/bookinfo/routing.yaml",
        include_str!("../../../examples/bookinfo/routing.yaml"),
    ),
    (
        "examples/bookinfo/security.yaml",
        include_str!("../../../examples/bookinfo/security.yaml"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<trellis_api::common::Duration>,
    /// Only the tour of the configuration (no pods).
    #[arg(long)]
    pub static_only: bool,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if !args.static_only {
        match trellis_runtime::preflight() {
            Ok(()) => return crate::demo_live::run(&FILES, args.run_for.map(|d| d.0)),
            Err(e) => println!(
                "The running demo starts Bookinfo as pods on this machine, and {e:#}.\nMeanwhile, the tour of its configuration:\n"
            ),
        }
    }
    println!("Trellis demo: Istio's Bookinfo, configured with unchanged Istio YAML.\n");
    let opts = LoadOptions::default();
    let mut parsed = Vec::new();
    for (name, text) in FILES {
        parsed.extend(trellis_api::parse_text(text, name, &opts));
    }
    println!(
        "Loaded {} resources:",
        parsed.iter().filter(|p| p.resource().is_some()).count()
    );
    for r in parsed.iter().filter_map(|p| p.resource()) {
        let detail = match &r.spec {
            Spec::Service(s) => format!(
                "ports {:?}, selects {:?}",
                s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                s.selector
            ),
            Spec::Workload(w) => format!(
                "{} replica(s), runs {:?}",
                w.replicas(),
                w.command.join(" ")
            ),
            Spec::VirtualService(v) => {
                format!("hosts {:?}, {} HTTP rule(s)", v.hosts, v.http.len())
            }
            Spec::DestinationRule(d) => format!(
                "host {}, subsets {:?}",
                d.host,
                d.subsets
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
            ),
            Spec::Gateway(g) => format!("{} server(s), selector {:?}", g.servers.len(), g.selector),
            Spec::PeerAuthentication(p) => {
                format!("mTLS {:?}", p.mtls.map(|m| m.mode).unwrap_or_default())
            }
            Spec::AuthorizationPolicy(a) => {
                format!("{} with {} rule(s)", a.action.as_str(), a.rules.len())
            }
            _ => String::new(),
        };
        let id = r.object_ref().to_string();
        let id = id.split_once(' ').map_or(id.as_str(), |(_, rest)| rest);
        println!("  {:<22} {id:<32} {detail}", r.kind.as_str());
    }
    let messages = analyze::analyze(&parsed, &AnalyzeOptions::default());
    println!("\nAnalysis (`trellis analyze examples/bookinfo`):");
    if messages.iter().all(|m| m.level == Level::Info) {
        println!("  ✔ no validation issues");
    }
    for m in &messages {
        println!("  {m}");
    }
    println!(
        "\nTry a mistake: change a subset to v4 in examples/bookinfo/routing.yaml and run\n  \
         target/release/trellis analyze examples/bookinfo\n\n\
         Where would jason's request to reviews go?\n  \
         target/release/trellis explain examples/bookinfo --host reviews -n bookinfo -H 'end-user: jason'\n\n\
         Built so far: the sidecar and gateway proxy (`trellis-proxy`, docs/proxy.md,\n\
         docs/gateways.md), the control plane that feeds it (`trellis control-plane`,\n\
         docs/control-plane.md), and mutual TLS, PeerAuthentication, AuthorizationPolicy\n\
         and JWTs between proxies (docs/security.md), and Istio's request and TCP\n\
         metrics, access logs and traces (W3C, B3; OTLP and Zipkin) from every proxy\n\
         (docs/observability.md), and `trellis up DIR` (as root): every Workload as a pod\n\
         in a network namespace with a transparent sidecar (docs/runtime.md). Not yet:\n\
         this demo starting Bookinfo itself. See README.md, Status."
    );
    Ok(if messages.iter().any(|m| m.level == Level::Error) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}
