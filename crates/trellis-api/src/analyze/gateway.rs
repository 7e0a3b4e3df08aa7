//! Gateway analyzers:
//!
//! - IST0145 ConflictingGateways: two Gateways for the same workloads that declare the same
//!   host on the same port (and bind address).
//! - IST0101 ReferencedResourceNotFound `credentialName`: a server's TLS credential names no
//!   `kubernetes.io/tls` Secret.

use super::registry::{Registry, selects};
use super::{AnalyzeOptions, Context, Message, codes, ns_of};
use crate::common::Labels;
use crate::networking::Gateway;
use crate::resource::{Resource, Spec};

pub(super) fn analyze(ctx: &Context<'_>, opts: &AnalyzeOptions, out: &mut Vec<Message>) {
    let dns = &opts.default_namespace;
    let gateways: Vec<(&Resource, &Gateway)> = ctx
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g) => Some((*r, g)),
            _ => None,
        })
        .collect();
    conflicts(&ctx.registry, &gateways, dns, out);
    credentials(&ctx.registry, &gateways, dns, out);
}

/// A label selector as Kubernetes prints it: `k=v,k2=v2`, keys sorted.
fn selector_string(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether two Gateways configure the same gateway workloads: the same selector, or one
/// selector contained in the other while some pod in the input carries both.
fn same_workloads(reg: &Registry, a: &Labels, b: &Labels) -> bool {
    if a == b {
        return true;
    }
    if !(selects(a, b) || selects(b, a)) {
        return false;
    }
    let mut both = a.clone();
    both.extend(b.iter().map(|(k, v)| (k.clone(), v.clone())));
    reg.pods_selected(&both).next().is_some()
}

fn conflicts(
    reg: &Registry,
    gateways: &[(&Resource, &Gateway)],
    dns: &str,
    out: &mut Vec<Message>,
) {
    for (gi, (r, g)) in gateways.iter().enumerate() {
        for (si, s) in g.servers.iter().enumerate() {
            let mut others: Vec<String> = gateways
                .iter()
                .enumerate()
                .filter(|(oi, (_, o))| *oi != gi && same_workloads(reg, &g.selector, &o.selector))
                .filter(|(_, (_, o))| {
                    o.servers.iter().any(|t| {
                        t.port.number == s.port.number
                            && t.bind == s.bind
                            && t.hosts.iter().any(|h| s.hosts.contains(h))
                    })
                })
                .map(|(_, (o, _))| format!("{}/{}", ns_of(o, dns), o.name()))
                .collect();
            if others.is_empty() {
                continue;
            }
            others.sort();
            others.dedup();
            out.push(Message::at(
                codes::CONFLICTING_GATEWAYS,
                r,
                &format!("spec.servers[{si}]"),
                format!(
                    "Conflict with gateways {} (workload selector {}, port {}, hosts {}).",
                    others.join(","),
                    selector_string(&g.selector),
                    s.port.number,
                    s.hosts.join(",")
                ),
            ));
        }
    }
}

/// IST0101 `credentialName`.
///
/// Only checked when the input contains at least one `kubernetes.io/tls` Secret: most
/// users keep secrets out of their config repositories, and without any Secret in sight
/// every credential would be reported missing.
///
/// The Secret must live where the gateway runs: in the namespace of a pod the Gateway's
/// selector selects, or (when no pod in the input is selected, as with files-only
/// analysis) in the Gateway's own namespace; `ns/name` names the namespace explicitly.
/// `credentialName` and each entry of `credentialNames` are checked.
fn credentials(
    reg: &Registry,
    gateways: &[(&Resource, &Gateway)],
    dns: &str,
    out: &mut Vec<Message>,
) {
    if reg.tls_secrets.is_empty() {
        return;
    }
    for (r, g) in gateways {
        let mut namespaces: Vec<&str> = if g.selector.is_empty() {
            Vec::new()
        } else {
            reg.pods_selected(&g.selector)
                .map(|p| p.namespace.as_str())
                .collect()
        };
        if namespaces.is_empty() {
            namespaces.push(ns_of(r, dns));
        }
        for (si, s) in g.servers.iter().enumerate() {
            let Some(tls) = &s.tls else { continue };
            let names =
                tls.credential_name
                    .iter()
                    .map(|n| (format!("spec.servers[{si}].tls.credentialName"), n))
                    .chain(
                        tls.credential_names.iter().enumerate().map(|(k, n)| {
                            (format!("spec.servers[{si}].tls.credentialNames[{k}]"), n)
                        }),
                    );
            for (path, name) in names {
                if name.is_empty() {
                    continue;
                }
                let found = match name.split_once('/') {
                    Some((ns, n)) => reg.tls_secrets.contains(&(ns.to_string(), n.to_string())),
                    None => namespaces
                        .iter()
                        .any(|ns| reg.tls_secrets.contains(&(ns.to_string(), name.clone()))),
                };
                if !found {
                    out.push(Message::at(
                        codes::REFERENCED_RESOURCE_NOT_FOUND,
                        r,
                        &path,
                        format!("Referenced credentialName not found: {name:?}"),
                    ));
                }
            }
        }
    }
}
