//! `trellis sidecar-snapshot`: the snapshot the control plane would send one workload's
//! sidecar, for `trellis-proxy --config` (static mode).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use trellis_api::{LoadOptions, Resource, Spec};
use trellis_control::mesh::{MeshConfig, ROOT_NAMESPACE, sidecar_snapshot};
use trellis_control::registry::{Instance, InstancePort, Registry};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories with the configuration (Services, Workloads, Istio
    /// resources); `-` reads stdin.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// The Workload whose sidecar the snapshot is for.
    #[arg(long)]
    workload: String,
    /// Namespace of resources that do not name one (and of `--workload`).
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Where instances run: WORKLOAD=IP (repeatable; this workload's too). Services whose
    /// workloads have no address here get no endpoints.
    #[arg(long = "instance", value_name = "WORKLOAD=IP")]
    instances: Vec<String>,
}

fn instance_of(
    r: &Resource,
    spec: &trellis_api::workload::WorkloadSpec,
    ip: Option<IpAddr>,
) -> Instance {
    Instance {
        name: r.name().to_string(),
        workload: r.name().to_string(),
        namespace: r.namespace().to_string(),
        labels: r.meta.labels.clone(),
        service_account: spec.service_account().to_string(),
        addresses: ip.into_iter().collect(),
        ports: spec
            .ports
            .iter()
            .filter_map(|p| {
                Some(InstancePort {
                    name: p.name.clone(),
                    port: u16::try_from(p.port).ok()?,
                    protocol: p.protocol,
                })
            })
            .collect(),
        locality: None,
        entry: false,
    }
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut ips: BTreeMap<String, IpAddr> = BTreeMap::new();
    for i in &args.instances {
        let (w, ip) = i
            .split_once('=')
            .with_context(|| format!("--instance {i:?}: expected WORKLOAD=IP"))?;
        ips.insert(
            w.to_string(),
            ip.parse()
                .with_context(|| format!("--instance {i:?}: {ip:?} is not an IP address"))?,
        );
    }
    let parsed = trellis_api::load_paths(
        &args.paths,
        &LoadOptions {
            default_namespace: args.namespace.clone(),
        },
    );
    let mut bad = false;
    for p in &parsed {
        for d in p
            .diagnostics
            .iter()
            .filter(|d| d.level == trellis_api::Level::Error)
        {
            eprintln!("{d}");
            bad = true;
        }
    }
    if bad {
        return Ok(ExitCode::from(2));
    }
    let resources: Vec<&Resource> = parsed.iter().filter_map(|p| p.resource()).collect();
    let mut instances = Vec::new();
    let mut me = None;
    for r in &resources {
        if let Spec::Workload(w) = &r.spec {
            let inst = instance_of(r, w, ips.get(r.name()).copied());
            if r.name() == args.workload && r.namespace() == args.namespace {
                me = Some(inst.clone());
            }
            if inst.addresses.is_empty() && r.name() != args.workload {
                eprintln!(
                    "note: workload {}/{} has no --instance address: its services get no endpoints from it",
                    r.namespace(),
                    r.name()
                );
            }
            instances.push(inst);
        }
    }
    let Some(me) = me else {
        bail!(
            "no Workload {}/{} in the configuration",
            args.namespace,
            args.workload
        );
    };
    let registry = Registry::build(&resources, instances);
    let cfg = MeshConfig {
        resources: &resources,
        root_namespace: ROOT_NAMESPACE,
        mesh_config: None,
    };
    let built = sidecar_snapshot(&cfg, &registry, &me, "static");
    for p in &built.problems {
        eprintln!("warning: {p}");
    }
    let mut json = built.snapshot.to_json();
    crate::gateway::prune(&mut json);
    writeln!(
        std::io::stdout().lock(),
        "{}",
        serde_json::to_string_pretty(&json)?
    )?;
    Ok(ExitCode::SUCCESS)
}
