//! VirtualService analyzers:
//!
//! - IST0101 ReferencedResourceNotFound: gateway refs, destination hosts (http, tcp and tls
//!   routes, `mirror` and `mirrors`), and host+subset pairs missing from DestinationRules;
//! - IST0132 VirtualServiceHostNotFoundInGateway;
//! - IST0109 ConflictingMeshGatewayVirtualServiceHosts.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use super::{AnalyzeOptions, Context, Message, codes, ns_of};
use crate::host;
use crate::networking::{Destination, Gateway, VirtualService};
use crate::resource::{Resource, Spec};

/// The gateway-side name of the mesh (sidecars).
const MESH: &str = "mesh";

pub(super) fn analyze(ctx: &Context<'_>, opts: &AnalyzeOptions, out: &mut Vec<Message>) {
    let dns = &opts.default_namespace;
    let gateways: BTreeMap<(&str, &str), &Gateway> = ctx
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g) => Some(((ns_of(r, dns), r.name()), g)),
            _ => None,
        })
        .collect();
    let subsets: HashSet<(String, String)> = ctx
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::DestinationRule(dr) => Some((r, dr)),
            _ => None,
        })
        .flat_map(|(r, dr)| {
            let key = ctx.registry.subset_key(&dr.host, ns_of(r, dns));
            dr.subsets
                .iter()
                .map(move |s| (key.clone(), s.name.clone()))
        })
        .collect();

    let vss: Vec<(&Resource, &VirtualService)> = ctx
        .resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::VirtualService(vs) => Some((*r, vs)),
            _ => None,
        })
        .collect();
    for (r, vs) in &vss {
        let ns = ns_of(r, dns);
        gateway_refs(r, vs, ns, &gateways, out);
        for (path, dest, mirror) in destinations(vs) {
            if dest.host.is_empty() {
                continue;
            }
            let host_path = format!("{path}.host");
            if ctx.registry.lookup(&dest.host, ns).is_none() {
                let reftype = if mirror { "mirror host" } else { "host" };
                out.push(not_found(r, &host_path, reftype, &dest.host));
            }
            if let Some(subset) = dest.subset.as_deref().filter(|s| !s.is_empty()) {
                let key = ctx.registry.subset_key(&dest.host, ns);
                if !subsets.contains(&(key, subset.to_string())) {
                    let reftype = if mirror {
                        "mirror+subset in destinationrule"
                    } else {
                        "host+subset in destinationrule"
                    };
                    let value = format!("{}+{subset}", dest.host);
                    out.push(not_found(r, &host_path, reftype, &value));
                }
            }
        }
    }
    mesh_host_conflicts(ctx, &vss, dns, out);
}

fn not_found(r: &Resource, path: &str, reftype: &str, value: &str) -> Message {
    Message::at(
        codes::REFERENCED_RESOURCE_NOT_FOUND,
        r,
        path,
        format!("Referenced {reftype} not found: {value:?}"),
    )
}

/// Every destination of a VirtualService with its field path and whether it is a mirror.
fn destinations(vs: &VirtualService) -> Vec<(String, &Destination, bool)> {
    let mut out = Vec::new();
    for (i, h) in vs.http.iter().enumerate() {
        for (j, d) in h.route.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].route[{j}].destination"),
                &d.destination,
                false,
            ));
        }
        if let Some(m) = &h.mirror {
            out.push((format!("spec.http[{i}].mirror"), m, true));
        }
        for (j, m) in h.mirrors.iter().enumerate() {
            out.push((
                format!("spec.http[{i}].mirrors[{j}].destination"),
                &m.destination,
                true,
            ));
        }
    }
    for (i, t) in vs.tcp.iter().enumerate() {
        for (j, d) in t.route.iter().enumerate() {
            out.push((
                format!("spec.tcp[{i}].route[{j}].destination"),
                &d.destination,
                false,
            ));
        }
    }
    for (i, t) in vs.tls.iter().enumerate() {
        for (j, d) in t.route.iter().enumerate() {
            out.push((
                format!("spec.tls[{i}].route[{j}].destination"),
                &d.destination,
                false,
            ));
        }
    }
    out
}

/// IST0101 `gateway` and IST0132. As `istioctl analyze`, a ref is `name` (in the
/// VirtualService's namespace) or `ns/name`; the legacy `name.ns` form is read as a name.
fn gateway_refs(
    r: &Resource,
    vs: &VirtualService,
    ns: &str,
    gateways: &BTreeMap<(&str, &str), &Gateway>,
    out: &mut Vec<Message>,
) {
    for (i, gw_ref) in vs.gateways.iter().enumerate() {
        if gw_ref == MESH {
            continue;
        }
        let (gw_ns, gw_name) = gw_ref.split_once('/').unwrap_or((ns, gw_ref));
        let path = format!("spec.gateways[{i}]");
        let gw = gateways.get(&(gw_ns, gw_name));
        if gw.is_none() {
            out.push(not_found(r, &path, "gateway", gw_ref));
        }
        if vs.hosts.is_empty() {
            continue; // a delegate VirtualService has no hosts of its own
        }
        let gw_hosts: Vec<&str> = gw
            .map(|g| {
                g.servers
                    .iter()
                    .flat_map(|s| &s.hosts)
                    .filter_map(|h| gateway_host_for(h, gw_ns, ns))
                    .collect()
            })
            .unwrap_or_default();
        let found = vs
            .hosts
            .iter()
            .any(|h| gw_hosts.iter().any(|g| host::overlaps(h, g)));
        if !found {
            out.push(Message::at(
                codes::VIRTUAL_SERVICE_HOST_NOT_FOUND_IN_GATEWAY,
                r,
                &path,
                format!(
                    "one or more host [{}] defined in VirtualService {ns}/{} not found in Gateway {gw_ns}/{gw_name}.",
                    vs.hosts.join(" "),
                    r.name()
                ),
            ));
        }
    }
}

/// A Gateway server host (`h`, `ns/h`, `./h`, `*/h`) as seen by a VirtualService in
/// `vs_ns`: the DNS name when the VirtualService may bind to it.
fn gateway_host_for<'h>(h: &'h str, gw_ns: &str, vs_ns: &str) -> Option<&'h str> {
    match h.split_once('/') {
        None => Some(h),
        Some(("*", name)) => Some(name),
        Some((".", name)) => (gw_ns == vs_ns).then_some(name),
        Some((ns, name)) => (ns == vs_ns).then_some(name),
    }
}

/// IST0109: VirtualServices bound to the mesh that define the same host in the same
/// export scope. Hosts are compared by their canonical FQDN (short names expanded in the
/// VirtualService's namespace; `reviews.ns` resolves like Kubernetes DNS when the Service
/// is known).
fn mesh_host_conflicts(
    ctx: &Context<'_>,
    vss: &[(&Resource, &VirtualService)],
    dns: &str,
    out: &mut Vec<Message>,
) {
    // (scope, fqdn) → indexes of the VirtualServices that define it.
    let mut groups: BTreeMap<(String, String), BTreeSet<usize>> = BTreeMap::new();
    for (idx, (r, vs)) in vss.iter().enumerate() {
        let bound_to_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == MESH);
        if !bound_to_mesh {
            continue;
        }
        let ns = ns_of(r, dns);
        let scopes: Vec<String> =
            if vs.export_to.is_empty() || vs.export_to.iter().any(|e| e == "*") {
                vec!["*".to_string()]
            } else {
                vs.export_to
                    .iter()
                    .map(|e| if e == "." { ns.to_string() } else { e.clone() })
                    .collect()
            };
        for h in &vs.hosts {
            let fqdn = ctx.registry.canonical(h, ns);
            for scope in &scopes {
                groups
                    .entry((scope.clone(), fqdn.clone()))
                    .or_default()
                    .insert(idx);
            }
        }
    }
    // A namespace-scoped host also conflicts with public VirtualServices whose host overlaps.
    let public: Vec<(String, BTreeSet<usize>)> = groups
        .iter()
        .filter(|((scope, _), _)| scope == "*")
        .map(|((_, h), set)| (h.clone(), set.clone()))
        .collect();
    for ((scope, fqdn), set) in groups.iter_mut() {
        if scope != "*" {
            for (h, others) in &public {
                if host::overlaps(h, fqdn) {
                    set.extend(others);
                }
            }
        }
    }
    let mut reported = HashSet::new();
    for ((scope, fqdn), set) in &groups {
        if set.len() < 2 {
            continue;
        }
        let mut names: Vec<String> = set
            .iter()
            .map(|&i| format!("{}/{}", ns_of(vss[i].0, dns), vss[i].0.name()))
            .collect();
        names.sort();
        let names = names.join(",");
        for &i in set {
            if !reported.insert(i) {
                continue;
            }
            out.push(Message::at(
                codes::CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS,
                vss[i].0,
                "metadata.name",
                format!(
                    "The VirtualServices {names} associated with mesh gateway define the same host {scope}/{fqdn} which can lead to undefined behavior. This can be fixed by merging the conflicting VirtualServices into a single resource."
                ),
            ));
        }
    }
}
