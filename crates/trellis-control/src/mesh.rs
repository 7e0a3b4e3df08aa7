//! Per-proxy translation: the snapshot one sidecar needs, from the configuration and the
//! registry. Pure: configuration and instances in, a snapshot out.
//!
//! What a sidecar sees: the services exported to its namespace (`exportTo`) that its
//! `Sidecar` resource's egress hosts allow (a proxy receives only the services it may reach);
//! for each, the VirtualService bound to the mesh for that host (one in the proxy's own
//! namespace first, then the service's, then any other) and the DestinationRule by Istio's
//! precedence (the proxy's namespace, then the service's, then the root namespace);
//! ServiceEntries likewise; and its own inbound ports.

use std::collections::BTreeSet;

use trellis_api::networking::{
    DestinationRule, OutboundTrafficPolicyMode, Sidecar, VirtualService,
};
use trellis_api::{Resource, Spec, host};
use trellis_xds::snapshot as wire;

use crate::clusters::clusters_for_port;
use crate::registry::{Instance, Registry, exported};
use crate::translate::{self, MESH, TranslateError, cluster_name};

/// Istio's root namespace: mesh-wide Sidecars and DestinationRules live here.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The configuration a translation reads.
#[derive(Debug, Clone, Copy)]
pub struct MeshConfig<'a> {
    pub resources: &'a [&'a Resource],
    pub root_namespace: &'a str,
    /// The mesh config file (telemetry providers and defaults), when there is one.
    pub mesh_config: Option<&'a trellis_api::mesh::MeshConfigFile>,
}

/// A snapshot, and what could not be translated (each left out alone).
#[derive(Debug, Clone)]
pub struct Built {
    pub snapshot: wire::Snapshot,
    pub problems: Vec<TranslateError>,
}

fn matches_labels(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl<'a> MeshConfig<'a> {
    /// The workload policies (of the kind `pick` takes) that apply to `me`, as Istio
    /// selects AuthorizationPolicies and RequestAuthentications: the root namespace's
    /// (mesh-wide; a selector there picks workloads in every namespace), and those of its
    /// own namespace (all its workloads, or those the selector picks). A policy attached
    /// with `targetRef(s)` (`scope` says so) is for gateways and waypoints, not sidecars.
    /// In namespace and name order (decisions do not depend on it; logs and dumps read
    /// better).
    fn selecting<T>(
        &self,
        me: &Instance,
        pick: impl Fn(&'a Spec) -> Option<&'a T>,
        scope: impl Fn(&T) -> (Option<&trellis_api::common::MatchLabelsSelector>, bool),
    ) -> Vec<(&'a Resource, &'a T)> {
        let mut picked: Vec<(&Resource, &T)> = self
            .each(pick)
            .into_iter()
            .filter(|(r, p)| {
                let (selector, targeted) = scope(p);
                (r.namespace() == self.root_namespace || r.namespace() == me.namespace)
                    && !targeted
                    && selector.is_none_or(|s| matches_labels(&s.match_labels, &me.labels))
            })
            .collect();
        picked.sort_by(|a, b| (a.0.namespace(), a.0.name()).cmp(&(b.0.namespace(), b.0.name())));
        picked
    }

    fn each<T>(&self, pick: impl Fn(&'a Spec) -> Option<&'a T>) -> Vec<(&'a Resource, &'a T)> {
        self.resources
            .iter()
            .filter_map(|r| pick(&r.spec).map(|t| (*r, t)))
            .collect()
    }

    /// The Sidecar that applies to `me`: one in its namespace whose selector matches, else
    /// its namespace's selector-less one, else the root namespace's.
    pub fn sidecar_for(&self, me: &Instance) -> Option<(&'a Resource, &'a Sidecar)> {
        let all = self.each(|s| match s {
            Spec::Sidecar(x) => Some(x),
            _ => None,
        });
        let pick = |ns: &str, selected: bool| {
            all.iter()
                .find(|(r, s)| {
                    r.namespace() == ns
                        && match &s.workload_selector {
                            Some(w) => selected && matches_labels(&w.labels, &me.labels),
                            None => !selected,
                        }
                })
                .copied()
        };
        pick(&me.namespace, true)
            .or_else(|| pick(&me.namespace, false))
            .or_else(|| pick(self.root_namespace, false))
    }

    /// The DestinationRule for `fqdn` (a service in `svc_ns`) as seen from `me`.
    fn destination_rule(
        &self,
        fqdn: &str,
        svc_ns: &str,
        me: &Instance,
    ) -> Option<(&'a Resource, &'a DestinationRule)> {
        let candidates: Vec<(&Resource, &DestinationRule)> = self
            .each(|s| match s {
                Spec::DestinationRule(d) => Some(d),
                _ => None,
            })
            .into_iter()
            .filter(|(r, d)| {
                exported(&d.export_to, r.namespace(), &me.namespace)
                    && host::matches(&host::fqdn(&d.host, r.namespace()), fqdn)
                    && d.workload_selector.as_ref().is_none_or(|w| {
                        r.namespace() == me.namespace && matches_labels(&w.match_labels, &me.labels)
                    })
            })
            .collect();
        // The proxy's namespace, then the service's, then the root namespace; an exact host
        // before a wildcard within each.
        for ns in [me.namespace.as_str(), svc_ns, self.root_namespace] {
            let mut here: Vec<_> = candidates
                .iter()
                .filter(|(r, _)| r.namespace() == ns)
                .copied()
                .collect();
            here.sort_by_key(|(r, d)| (host::is_wildcard(&d.host), r.name().to_string()));
            if let Some(first) = here.first() {
                return Some(*first);
            }
        }
        None
    }

    /// The mesh VirtualService for `fqdn` as seen from `me`.
    fn virtual_service(
        &self,
        fqdn: &str,
        svc_ns: &str,
        me: &Instance,
    ) -> Option<(&'a Resource, &'a VirtualService)> {
        let mut candidates: Vec<(&Resource, &VirtualService)> = self
            .each(|s| match s {
                Spec::VirtualService(v) => Some(v),
                _ => None,
            })
            .into_iter()
            .filter(|(r, v)| {
                translate::applies_to(v, r.namespace(), MESH)
                    && exported(&v.export_to, r.namespace(), &me.namespace)
                    && v.hosts
                        .iter()
                        .any(|h| host::matches(&host::fqdn(h, r.namespace()), fqdn))
            })
            .collect();
        candidates.sort_by_key(|(r, _)| {
            let tier = if r.namespace() == me.namespace {
                0
            } else if r.namespace() == svc_ns {
                1
            } else {
                2
            };
            (tier, r.namespace().to_string(), r.name().to_string())
        });
        candidates.first().copied()
    }
}

/// Every instance of the mesh by address (the same for every proxy: shared resources).
pub fn peers_of(reg: &Registry) -> Vec<wire::Peer> {
    let mut out: Vec<wire::Peer> = reg
        .instances
        .iter()
        .flat_map(|i| {
            let identity = i.proxied().then(|| reg.identity(i));
            i.addresses.iter().map(move |a| wire::Peer {
                address: a.to_string(),
                workload: i.workload.clone(),
                namespace: i.namespace.clone(),
                identity: identity.clone(),
                labels: i.labels.clone(),
                instance: i.name.clone(),
            })
        })
        .collect();
    // In the order a proxy puts its `peer/` resources back (by name).
    out.sort_by_cached_key(|p| format!("{}/{}/{}", p.namespace, p.instance, p.address));
    // An instance that reconnects is briefly there twice (the old stream not yet gone):
    // the same peer, once.
    out.dedup_by(|a, b| {
        (&a.namespace, &a.instance, &a.address) == (&b.namespace, &b.instance, &b.address)
    });
    out
}

/// The snapshot's own-workload section for an instance.
pub fn workload_of(cfg: &MeshConfig<'_>, reg: &Registry, me: &Instance) -> wire::Workload {
    let mtls = reg.peer_auth.resolve(&me.namespace, &me.labels);
    let (levels, problems) = crate::telemetry::applicable(cfg.resources, cfg.root_namespace, me);
    for p in problems {
        tracing::debug!("{p}");
    }
    wire::Workload {
        telemetry: match cfg.mesh_config {
            Some(m) => crate::telemetry::merge_with(&levels, m),
            None => crate::telemetry::merge(&levels),
        },
        authorization: authorization_for(cfg, me),
        jwt_rules: jwt_rules_for(cfg, me),
        mtls: mtls.mode as i32,
        port_mtls: mtls.ports.into_iter().map(|(p, m)| (p, m as i32)).collect(),
        name: me.name.clone(),
        workload: me.workload.clone(),
        namespace: me.namespace.clone(),
        labels: me.labels.clone(),
        service_account: me.service_account.clone(),
        addresses: me.addresses.iter().map(ToString::to_string).collect(),
        inbound_ports: me
            .ports
            .iter()
            .map(|p| wire::InboundPort {
                port: u32::from(p.port),
                name: p.name.clone(),
                protocol: p.protocol.map(|pr| wire::Protocol::from_api(pr) as i32),
                ..Default::default()
            })
            .collect(),
        locality: me.locality.clone(),
    }
}

/// The AuthorizationPolicies that apply to `me` (see `MeshConfig::selecting`).
pub fn authorization_for(cfg: &MeshConfig<'_>, me: &Instance) -> Vec<wire::AuthzPolicy> {
    use trellis_api::security::AuthorizationAction as A;
    cfg.selecting(
        me,
        |s| match s {
            Spec::AuthorizationPolicy(p) => Some(p),
            _ => None,
        },
        |p| {
            let targeted = p.target_ref.is_some() || !p.target_refs.is_empty();
            (p.selector.as_ref(), targeted)
        },
    )
    .into_iter()
    .map(|(r, p)| wire::AuthzPolicy {
        name: format!("{}/{}", r.namespace(), r.name()),
        action: match p.action {
            A::Allow => wire::AuthzAction::Allow,
            A::Deny => wire::AuthzAction::Deny,
            A::Audit => wire::AuthzAction::Audit,
            A::Custom => wire::AuthzAction::Custom,
        } as i32,
        provider: p.provider.as_ref().and_then(|x| x.name.clone()),
        rules: p
            .rules
            .iter()
            .map(|rule| wire::AuthzRule {
                from: rule
                    .from
                    .iter()
                    .filter_map(|f| f.source.as_ref())
                    .map(|x| wire::AuthzSource {
                        principals: x.principals.clone(),
                        not_principals: x.not_principals.clone(),
                        request_principals: x.request_principals.clone(),
                        not_request_principals: x.not_request_principals.clone(),
                        namespaces: x.namespaces.clone(),
                        not_namespaces: x.not_namespaces.clone(),
                        service_accounts: x.service_accounts.clone(),
                        not_service_accounts: x.not_service_accounts.clone(),
                        ip_blocks: x.ip_blocks.clone(),
                        not_ip_blocks: x.not_ip_blocks.clone(),
                        remote_ip_blocks: x.remote_ip_blocks.clone(),
                        not_remote_ip_blocks: x.not_remote_ip_blocks.clone(),
                        trust_domains: x.trust_domains.clone(),
                        not_trust_domains: x.not_trust_domains.clone(),
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .filter_map(|t| t.operation.as_ref())
                    .map(|o| wire::AuthzOperation {
                        hosts: o.hosts.clone(),
                        not_hosts: o.not_hosts.clone(),
                        ports: o.ports.clone(),
                        not_ports: o.not_ports.clone(),
                        methods: o.methods.clone(),
                        not_methods: o.not_methods.clone(),
                        paths: o.paths.clone(),
                        not_paths: o.not_paths.clone(),
                    })
                    .collect(),
                when: rule
                    .when
                    .iter()
                    .map(|c| wire::AuthzCondition {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
            })
            .collect(),
    })
    .collect()
}

/// The RequestAuthentication jwtRules that apply to `me`, selected as AuthorizationPolicies
/// are (see `MeshConfig::selecting`).
pub fn jwt_rules_for(cfg: &MeshConfig<'_>, me: &Instance) -> Vec<wire::JwtRule> {
    cfg.selecting(
        me,
        |s| match s {
            Spec::RequestAuthentication(p) => Some(p),
            _ => None,
        },
        |p| {
            let targeted = p.target_ref.is_some() || !p.target_refs.is_empty();
            (p.selector.as_ref(), targeted)
        },
    )
    .into_iter()
    .flat_map(|(r, p)| {
        let policy = format!("{}/{}", r.namespace(), r.name());
        p.jwt_rules.iter().map(move |j| wire::JwtRule {
            policy: policy.clone(),
            issuer: j.issuer.clone().unwrap_or_default(),
            audiences: j.audiences.clone(),
            jwks: j.jwks.clone(),
            jwks_uri: j.jwks_uri().map(str::to_string),
            from_headers: j
                .from_headers
                .iter()
                .map(|h| wire::JwtHeader {
                    name: h.name.clone(),
                    prefix: h.prefix.clone(),
                })
                .collect(),
            from_params: j.from_params.clone(),
            from_cookies: j.from_cookies.clone(),
            forward_original_token: j.forward_original_token.unwrap_or(false),
            output_payload_to_header: j.output_payload_to_header.clone(),
            output_claim_to_headers: j
                .output_claim_to_headers
                .iter()
                .map(|c| wire::ClaimToHeader {
                    header: c.header.clone(),
                    claim: c.claim.clone(),
                })
                .collect(),
            timeout: j.timeout.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.0.subsec_nanos()).unwrap_or(0),
            }),
            space_delimited_claims: j.space_delimited_claims.clone(),
        })
    })
    .collect()
}

/// What decides everything in a sidecar's snapshot but its own workload section: its
/// namespace, the Sidecar that applies, and its labels when a DestinationRule in its
/// namespace selects workloads (two proxies with the same key get the same services,
/// routes and clusters).
pub fn scope_key(cfg: &MeshConfig<'_>, me: &Instance) -> String {
    let sidecar = cfg
        .sidecar_for(me)
        .map(|(r, _)| format!("{}/{}", r.namespace(), r.name()))
        .unwrap_or_default();
    let selective = cfg.resources.iter().any(|r| {
        matches!(&r.spec, Spec::DestinationRule(d) if d.workload_selector.is_some())
            && r.namespace() == me.namespace
    });
    let labels = if selective {
        format!("{:?}", me.labels)
    } else {
        String::new()
    };
    let gateways: Vec<String> = selecting_gateways(cfg, me)
        .iter()
        .map(|g| format!("{}/{}", g.namespace, g.name))
        .collect();
    format!("{}|{sidecar}|{labels}|{}", me.namespace, gateways.join(","))
}

/// The Gateways whose selector matches the instance's labels (in any namespace, as Istio
/// does by default): their servers make this proxy a gateway.
fn selecting_gateways<'a>(cfg: &MeshConfig<'a>, me: &Instance) -> Vec<translate::GatewayRef<'a>> {
    cfg.resources
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::Gateway(g)
                if !g.selector.is_empty()
                    && g.selector.iter().all(|(k, v)| me.labels.get(k) == Some(v)) =>
            {
                Some(translate::GatewayRef {
                    namespace: r.namespace(),
                    name: r.name(),
                    gateway: g,
                })
            }
            _ => None,
        })
        .collect()
}

/// Whether a Sidecar's egress hosts (`ns/host`) let the proxy see `fqdn` in `ns`.
fn egress_allows(sidecar: Option<&Sidecar>, me_ns: &str, ns: &str, fqdn: &str) -> bool {
    let Some(s) = sidecar else { return true };
    if s.egress.is_empty() {
        return true;
    }
    s.egress.iter().flat_map(|e| e.hosts.iter()).any(|h| {
        let (hns, hhost) = h.split_once('/').unwrap_or(("*", h.as_str()));
        let ns_ok = match hns {
            "*" => true,
            "." => ns == me_ns,
            "~" => false,
            other => other == ns,
        };
        ns_ok && (hhost == "*" || host::matches(hhost, fqdn))
    })
}

/// The snapshot for the sidecar of `me`.
pub fn sidecar_snapshot(
    cfg: &MeshConfig<'_>,
    reg: &Registry,
    me: &Instance,
    version: &str,
) -> Built {
    let mut problems = Vec::new();
    let sidecar = cfg.sidecar_for(me).map(|(_, s)| s);
    let vs_lookup = |name: &str, ns: &str| {
        cfg.resources.iter().find_map(|r| match &r.spec {
            Spec::VirtualService(v) if r.name() == name && r.namespace() == ns => Some(v),
            _ => None,
        })
    };
    let mut services = Vec::new();
    let mut clusters: Vec<wire::Cluster> = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for s in &reg.services {
        if !reg.visible(s, &me.namespace)
            || !egress_allows(sidecar, &me.namespace, &s.namespace, &s.fqdn)
        {
            continue;
        }
        let vs = cfg.virtual_service(&s.fqdn, &s.namespace, me);
        let dr = cfg.destination_rule(&s.fqdn, &s.namespace, me);
        let mut ports = Vec::new();
        for p in &s.ports {
            let routes = match vs {
                None => translate::PortRoutes::default(),
                Some((r, v)) => {
                    match translate::virtual_service_delegating(
                        v,
                        r.namespace(),
                        p.port,
                        &vs_lookup,
                    ) {
                        Ok(routes) => routes,
                        Err(e) => {
                            problems.push(TranslateError {
                                path: format!(
                                    "VirtualService {}/{}: {}",
                                    r.namespace(),
                                    r.name(),
                                    e.path
                                ),
                                reason: e.reason,
                            });
                            translate::PortRoutes::default()
                        }
                    }
                }
            };
            ports.push(wire::ServicePort {
                port: u32::from(p.port),
                name: p.name.clone(),
                app_protocol: p.app_protocol.clone(),
                cluster: cluster_name(p.port, None, &s.fqdn),
                http_routes: routes.http,
                tcp_routes: routes.tcp,
                tls_routes: routes.tls,
                ..Default::default()
            });
            let endpoints = reg.endpoints(s, p);
            match clusters_for_port(
                &s.fqdn,
                p.port,
                &endpoints,
                dr.map(|(r, d)| (d, r.namespace())),
            ) {
                Ok(cs) => {
                    for c in cs {
                        if names.insert(c.name.clone()) {
                            clusters.push(c);
                        }
                    }
                }
                Err(e) => problems.push(e),
            }
        }
        services.push(wire::Service {
            hostname: s.fqdn.clone(),
            addresses: vec![s.vip.to_string()],
            ports,
        });
    }
    // ServiceEntries exported to this namespace and allowed by the Sidecar.
    for r in cfg.resources {
        let Spec::ServiceEntry(se) = &r.spec else {
            continue;
        };
        if !exported(&se.export_to, r.namespace(), &me.namespace)
            || !se
                .hosts
                .iter()
                .any(|h| egress_allows(sidecar, &me.namespace, r.namespace(), h))
        {
            continue;
        }
        match translate::service_entry(se, r.namespace(), r.name()) {
            Ok((svcs, mut cs)) => {
                if let Some(sel) = &se.workload_selector {
                    select_endpoints(&mut cs, se, r.namespace(), &sel.labels, reg);
                }
                for c in cs {
                    if names.insert(c.name.clone()) {
                        clusters.push(c);
                    }
                }
                // A Kubernetes service of the same name this proxy sees wins.
                let seen: BTreeSet<String> = services.iter().map(|s| s.hostname.clone()).collect();
                services.extend(svcs.into_iter().filter(|s| !seen.contains(&s.hostname)));
            }
            Err(e) => problems.push(e),
        }
    }
    // A proxy that Gateways select serves their servers too (in gateway mode); the routes'
    // clusters are the mesh's, with a placeholder (no endpoints: 503 UH) for a host this
    // proxy does not see.
    let gateways = selecting_gateways(cfg, me);
    let mut gateway_ports = Vec::new();
    if !gateways.is_empty() {
        let vss: Vec<translate::VirtualServiceRef<'_>> = cfg
            .resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::VirtualService(vs) => Some(translate::VirtualServiceRef {
                    namespace: r.namespace(),
                    name: r.name(),
                    vs,
                }),
                _ => None,
            })
            .collect();
        let (mut ports, probs) = translate::gateway_ports(&gateways, &vss);
        problems.extend(probs);
        single_port_destinations(&mut ports, &services, &names);
        for p in &ports {
            for server in &p.servers {
                for vh in &server.virtual_hosts {
                    let http = vh.http_routes.iter().flat_map(|r| {
                        r.clusters
                            .iter()
                            .map(|c| &c.cluster)
                            .chain(r.mirrors.iter().map(|m| &m.cluster))
                    });
                    let l4 = vh
                        .tcp_routes
                        .iter()
                        .chain(&vh.tls_routes)
                        .flat_map(|r| r.clusters.iter().map(|c| &c.cluster));
                    for name in http.chain(l4) {
                        if names.insert(name.clone()) {
                            clusters.push(wire::Cluster {
                                name: name.clone(),
                                ..Default::default()
                            });
                        }
                    }
                }
            }
        }
        gateway_ports = ports;
    }
    let workload = workload_of(cfg, reg, me);
    // By host name: the order a proxy puts per-resource pushes back together in (a pod
    // address that several services list is reached as the first of them).
    services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    // The Sidecar's outbound traffic policy, else the mesh config's.
    let registry_only = match sidecar
        .and_then(|s| s.outbound_traffic_policy.as_ref())
        .and_then(|o| o.mode)
    {
        Some(m) => m == OutboundTrafficPolicyMode::RegistryOnly,
        None => {
            cfg.mesh_config
                .and_then(|m| m.outbound_traffic_policy.as_ref())
                .and_then(|o| o.mode.as_deref())
                == Some("REGISTRY_ONLY")
        }
    };
    let num_trusted_proxies = cfg
        .mesh_config
        .and_then(|m| m.default_config.as_ref())
        .and_then(|d| d.gateway_topology.as_ref())
        .and_then(|g| g.num_trusted_proxies);
    Built {
        snapshot: wire::Snapshot {
            version: version.to_string(),
            workload: Some(workload),
            outbound_traffic_policy: if registry_only {
                wire::OutboundPolicy::RegistryOnly as i32
            } else {
                wire::OutboundPolicy::AllowAny as i32
            },
            services,
            clusters,
            gateway_ports,
            peers: peers_of(reg),
            settings: num_trusted_proxies.map(|n| wire::Settings {
                num_trusted_proxies: Some(n),
                ..Default::default()
            }),
            ..Default::default()
        },
        problems,
    }
}

/// A ServiceEntry with a `workloadSelector` (resolution STATIC): its endpoints are the
/// instances of its namespace whose labels match, WorkloadEntries and proxies alike, on
/// the port their port map names for the entry's port, else the entry's target port.
fn select_endpoints(
    clusters: &mut [wire::Cluster],
    se: &trellis_api::networking::ServiceEntry,
    namespace: &str,
    labels: &std::collections::BTreeMap<String, String>,
    reg: &Registry,
) {
    let selected: Vec<&Instance> = reg
        .instances
        .iter()
        .filter(|i| {
            i.namespace == namespace && labels.iter().all(|(k, v)| i.labels.get(k) == Some(v))
        })
        .collect();
    for host in &se.hosts {
        for p in &se.ports {
            let Ok(number) = u16::try_from(p.number) else {
                continue;
            };
            let name = cluster_name(number, None, host);
            let Some(c) = clusters.iter_mut().find(|c| c.name == name) else {
                continue;
            };
            if c.discovery != wire::Discovery::Static as i32 {
                continue;
            }
            let target = u16::try_from(p.target_port.unwrap_or(p.number)).unwrap_or(number);
            for i in &selected {
                let port = i
                    .ports
                    .iter()
                    .find(|ip| ip.name.as_deref() == Some(p.name.as_str()))
                    .map_or(target, |ip| ip.port);
                for ip in &i.addresses {
                    c.endpoints.push(wire::Endpoint {
                        address: std::net::SocketAddr::new(*ip, port).to_string(),
                        proxied: i.proxied(),
                        plaintext: reg.takes_plaintext_only(i, port),
                        identity: Some(reg.identity(i)),
                        labels: i.labels.clone(),
                        locality: i.locality.clone(),
                        workload: i.workload.clone(),
                        namespace: i.namespace.clone(),
                        ..Default::default()
                    });
                }
            }
        }
    }
}

/// A gateway route's destination without a port names the gateway's port (the port the
/// request arrived on); as in Istio, a destination service with a single port means that
/// port. Renames such clusters when the proxy knows no cluster by the first name.
pub fn single_port_destinations(
    ports: &mut [wire::GatewayPort],
    services: &[wire::Service],
    known: &BTreeSet<String>,
) {
    let fix = |name: &mut String| {
        if known.contains(name.as_str()) {
            return;
        }
        let mut parts = name.splitn(4, '|');
        let (Some("outbound"), Some(_), Some(subset), Some(fqdn)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if let Some(svc) = services.iter().find(|s| s.hostname == fqdn) {
            if let [only] = svc.ports.as_slice() {
                if let Ok(port) = u16::try_from(only.port) {
                    let subset = (!subset.is_empty()).then_some(subset);
                    *name = cluster_name(port, subset, fqdn);
                }
            }
        }
    };
    for p in ports {
        for server in &mut p.servers {
            for vh in &mut server.virtual_hosts {
                for r in &mut vh.http_routes {
                    for c in &mut r.clusters {
                        fix(&mut c.cluster);
                    }
                    for m in &mut r.mirrors {
                        fix(&mut m.cluster);
                    }
                }
                for r in vh.tcp_routes.iter_mut().chain(vh.tls_routes.iter_mut()) {
                    for c in &mut r.clusters {
                        fix(&mut c.cluster);
                    }
                }
            }
        }
    }
}
