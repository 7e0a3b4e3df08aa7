//! `trellis gateway-snapshot`: Istio Gateways and bound VirtualServices → a static snapshot
//! for a gateway proxy.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use trellis_api::{LoadOptions, Spec};
use trellis_control::translate::{self, GatewayRef, VirtualServiceRef};
use trellis_xds::snapshot as wire;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Files or directories with Gateways and VirtualServices (YAML or JSON); `-` reads
    /// stdin.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Labels of the gateway proxy (KEY=VALUE, repeatable): only Gateways whose selector
    /// they satisfy are served. Without any, every Gateway is.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Namespace of resources that do not name one.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The gateway workload's namespace: with --label, the RequestAuthentications and
    /// AuthorizationPolicies that select it (there, or mesh-wide) come with the snapshot.
    #[arg(long, default_value = "istio-system")]
    gateway_namespace: String,
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let mut labels = std::collections::BTreeMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let parsed = trellis_api::load_paths(
        &args.paths,
        &LoadOptions {
            default_namespace: args.namespace.clone(),
        },
    );
    let mut bad = false;
    for p in &parsed {
        for d in &p.diagnostics {
            eprintln!("{d}");
            bad |= d.level == trellis_api::Level::Error;
        }
    }
    if bad {
        return Ok(ExitCode::from(2));
    }
    let resources: Vec<_> = parsed.iter().filter_map(|p| p.resource()).collect();
    let gateways: Vec<GatewayRef<'_>> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g)
                if labels.is_empty()
                    || g.selector.iter().all(|(k, v)| labels.get(k) == Some(v)) =>
            {
                Some(GatewayRef {
                    namespace: r.namespace(),
                    name: r.name(),
                    gateway: g,
                })
            }
            _ => None,
        })
        .collect();
    if gateways.is_empty() {
        anyhow::bail!("no Gateway selects a proxy with these labels");
    }
    let services: Vec<VirtualServiceRef<'_>> = resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::VirtualService(vs) => Some(VirtualServiceRef {
                namespace: r.namespace(),
                name: r.name(),
                vs,
            }),
            _ => None,
        })
        .collect();
    let (mut ports, problems) = translate::gateway_ports(&gateways, &services);
    for p in &problems {
        eprintln!("warning: {p}");
    }
    // Clusters of ServiceEntry hosts come with their endpoints (an egress gateway's
    // destinations): resolved by the proxy for DNS, listed for STATIC, the original
    // destination for NONE.
    let mut known: std::collections::BTreeMap<String, wire::Cluster> = Default::default();
    let mut hosts: Vec<wire::Service> = Vec::new();
    for r in &resources {
        if let Spec::ServiceEntry(se) = &r.spec {
            match translate::service_entry(se, r.namespace(), r.name()) {
                Ok((svcs, clusters)) => {
                    known.extend(clusters.into_iter().map(|c| (c.name.clone(), c)));
                    hosts.extend(svcs);
                }
                Err(e) => eprintln!("warning: {e}"),
            }
        }
    }
    // A destination without a port means a single-port service's port (Istio).
    let registry = trellis_control::registry::Registry::build(&resources, Vec::new());
    hosts.extend(registry.services.iter().map(|s| {
        wire::Service {
            hostname: s.fqdn.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| wire::ServicePort {
                    port: u32::from(p.port),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }));
    let names: BTreeSet<String> = known.keys().cloned().collect();
    trellis_control::mesh::single_port_destinations(&mut ports, &hosts, &names);
    let mut clusters = BTreeSet::new();
    for p in &ports {
        for s in &p.servers {
            for v in &s.virtual_hosts {
                for r in &v.http_routes {
                    clusters.extend(r.clusters.iter().map(|c| c.cluster.clone()));
                    clusters.extend(r.mirrors.iter().map(|m| m.cluster.clone()));
                }
            }
        }
    }
    let clusters: Vec<wire::Cluster> = clusters
        .into_iter()
        .map(|name| {
            known.remove(&name).unwrap_or(wire::Cluster {
                name,
                ..Default::default()
            })
        })
        .collect();
    let empty: Vec<&str> = clusters
        .iter()
        .filter(|c| c.endpoints.is_empty() && c.discovery == wire::Discovery::Static as i32)
        .map(|c| c.name.as_str())
        .collect();
    if !empty.is_empty() {
        eprintln!(
            "note: {} clusters have no endpoints yet; add each one's `endpoints: [{{address: \"IP:PORT\"}}]`: {}",
            empty.len(),
            empty.join(", ")
        );
    }
    // The gateway's own policies, selected by its labels as the control plane would.
    let workload = (!labels.is_empty())
        .then(|| {
            let me = trellis_control::registry::Instance {
                name: "gateway".into(),
                workload: "gateway".into(),
                namespace: args.gateway_namespace.clone(),
                labels: labels.clone(),
                service_account: "default".into(),
                addresses: Vec::new(),
                ports: Vec::new(),
                locality: None,
                entry: false,
            };
            let cfg = trellis_control::mesh::MeshConfig {
                resources: &resources,
                root_namespace: trellis_control::mesh::ROOT_NAMESPACE,
                mesh_config: None,
            };
            wire::Workload {
                name: "gateway".into(),
                namespace: args.gateway_namespace.clone(),
                labels: labels.clone(),
                authorization: trellis_control::mesh::authorization_for(&cfg, &me),
                jwt_rules: trellis_control::mesh::jwt_rules_for(&cfg, &me),
                ..Default::default()
            }
        })
        .filter(|w| !w.authorization.is_empty() || !w.jwt_rules.is_empty());
    let snapshot = wire::Snapshot {
        version: "static".into(),
        clusters,
        gateway_ports: ports,
        workload,
        ..Default::default()
    };
    let mut out = std::io::stdout().lock();
    let mut json = snapshot.to_json();
    prune(&mut json);
    writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    Ok(ExitCode::SUCCESS)
}

/// Drops unset fields (nulls, empty maps) so the file shows what is configured.
pub fn prune(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|_, x| !x.is_null() && !x.as_object().is_some_and(|o| o.is_empty()));
            m.values_mut().for_each(prune);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(prune),
        _ => {}
    }
}
