//! The service registry: Kubernetes-style `Service`s and their endpoints (the running
//! instances of `Workload`s whose labels a Service selects), with stable virtual IPs.
//!
//! Pure: built from configuration and the instances the runtime reports; the per-proxy
//! translation ([`crate::mesh`]) reads it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use trellis_api::common::{IntOrString, Protocol};
use trellis_api::kube::ServiceSpec;
use trellis_api::{Resource, Spec, host};

use crate::clusters::EndpointRef;

/// A running instance of a workload (a pod): what its proxy announces.
#[derive(Debug, Clone, Default)]
pub struct Instance {
    /// The instance (`reviews-v1-0`).
    pub name: String,
    /// The Workload it runs (`reviews-v1`).
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub addresses: Vec<IpAddr>,
    /// Ports the app listens on: name, number, declared protocol.
    pub ports: Vec<InstancePort>,
    /// "region/zone/subzone".
    pub locality: Option<String>,
    /// Declared by a WorkloadEntry (a VM or other host outside the runtime) rather than
    /// announced by a connected proxy: its `ports` map service port names to the ports it
    /// listens on, and it has a Trellis proxy only when labelled
    /// `security.istio.io/tlsMode: istio`.
    pub entry: bool,
}

/// Istio's label that says an endpoint has a mesh proxy in front of it.
const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

impl Instance {
    /// The WorkloadEntries of the configuration, as instances (an address that is not an
    /// IP is skipped with a warning: a Service's endpoints are addresses).
    pub fn from_entries(resources: &[&Resource]) -> Vec<Instance> {
        resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::WorkloadEntry(we) => Some((*r, we)),
                _ => None,
            })
            .filter_map(|(r, we)| {
                let address = we.address.as_deref().unwrap_or_default();
                let Ok(ip) = address.parse::<IpAddr>() else {
                    tracing::warn!(
                        "WorkloadEntry {}/{}: address {address:?} is not an IP address; it is left out of Services' endpoints",
                        r.namespace(),
                        r.name()
                    );
                    return None;
                };
                Some(Instance {
                    name: r.name().to_string(),
                    workload: r.name().to_string(),
                    namespace: r.namespace().to_string(),
                    labels: we.labels.clone(),
                    service_account: we
                        .service_account
                        .clone()
                        .unwrap_or_else(|| "default".to_string()),
                    addresses: vec![ip],
                    ports: we
                        .ports
                        .iter()
                        .filter_map(|(name, port)| {
                            Some(InstancePort {
                                name: Some(name.clone()),
                                port: u16::try_from(*port).ok()?,
                                protocol: None,
                            })
                        })
                        .collect(),
                    locality: we.locality.clone(),
                    entry: true,
                })
            })
            .collect()
    }

    /// Whether a Trellis proxy fronts this instance.
    pub fn proxied(&self) -> bool {
        !self.entry || self.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
    }
}

#[derive(Debug, Clone, Default)]
pub struct InstancePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Option<Protocol>,
}

/// A service port.
#[derive(Debug, Clone)]
pub struct ServicePort {
    pub port: u16,
    pub name: Option<String>,
    pub app_protocol: Option<String>,
    /// Where endpoints listen: a number, or the name of an instance port.
    pub target: Option<IntOrString>,
}

/// A Kubernetes Service as the mesh knows it.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub fqdn: String,
    pub vip: IpAddr,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// Namespaces it is visible from (`networking.istio.io/exportTo` annotation; empty:
    /// everywhere).
    pub export_to: Vec<String>,
}

/// All services and instances.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// By FQDN, sorted.
    pub services: Vec<Service>,
    pub instances: Vec<Instance>,
    /// The SPIFFE trust domain of endpoint identities (`cluster.local` by default).
    pub trust_domain: String,
    /// PeerAuthentications: an endpoint whose proxy takes plaintext only is marked so.
    pub peer_auth: crate::peerauth::PeerAuthPolicies,
}

/// The first address of Istio's auto-allocation range, 240.240.0.0/16.
const VIP_BASE: [u8; 2] = [240, 240];

/// Stable virtual IPs: each FQDN hashes to a slot of 240.240.0.0/16 and takes the next free
/// one on a collision (FQDNs in sorted order), so adding a service moves no other's address
/// unless the two collide. A Service with a `clusterIP` keeps it.
fn allocate_vips(fqdns: &[String], taken: &[IpAddr]) -> HashMap<String, IpAddr> {
    let mut used: std::collections::HashSet<u16> = taken
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) if v4.octets()[..2] == VIP_BASE => {
                Some(u16::from_be_bytes([v4.octets()[2], v4.octets()[3]]))
            }
            _ => None,
        })
        .collect();
    // .0.0 and .255.255 are not handed out.
    used.insert(0);
    used.insert(u16::MAX);
    let mut out = HashMap::new();
    for f in fqdns {
        let mut slot = (fnv1a(f.as_bytes()) % 65_534 + 1) as u16;
        while used.contains(&slot) {
            slot = if slot >= 65_534 { 1 } else { slot + 1 };
        }
        used.insert(slot);
        let [a, b] = slot.to_be_bytes();
        out.insert(
            f.clone(),
            IpAddr::V4(Ipv4Addr::new(VIP_BASE[0], VIP_BASE[1], a, b)),
        );
    }
    out
}

/// FNV-1a: a hash that is the same in every process and version (VIPs must not move when
/// the control plane restarts).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Registry {
    /// Services from the configuration's Kubernetes `Service` objects, and `instances`
    /// together with the configuration's WorkloadEntries.
    pub fn build(resources: &[&Resource], mut instances: Vec<Instance>) -> Registry {
        instances.extend(Instance::from_entries(resources));
        let specs: Vec<(&Resource, &ServiceSpec)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::Service(s) => Some((*r, s)),
                _ => None,
            })
            .collect();
        let fixed: Vec<IpAddr> = specs
            .iter()
            .filter_map(|(_, s)| s.cluster_ip.as_deref()?.parse().ok())
            .collect();
        let mut auto: Vec<String> = specs
            .iter()
            .filter(|(_, s)| {
                s.cluster_ip
                    .as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .is_none()
            })
            .map(|(r, _)| host::fqdn(r.name(), r.namespace()))
            .collect();
        auto.sort();
        let vips = allocate_vips(&auto, &fixed);
        let mut services: Vec<Service> = specs
            .iter()
            .map(|(r, s)| {
                let fqdn = host::fqdn(r.name(), r.namespace());
                let vip = s
                    .cluster_ip
                    .as_deref()
                    .and_then(|ip| ip.parse().ok())
                    .or_else(|| vips.get(&fqdn).copied())
                    .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                Service {
                    name: r.name().to_string(),
                    namespace: r.namespace().to_string(),
                    vip,
                    ports: s
                        .ports
                        .iter()
                        .filter_map(|p| {
                            Some(ServicePort {
                                port: u16::try_from(p.port).ok()?,
                                name: p.name.clone(),
                                app_protocol: p.app_protocol.clone(),
                                target: p.target_port.clone(),
                            })
                        })
                        .collect(),
                    selector: s.selector.clone(),
                    export_to: r
                        .meta
                        .annotations
                        .get("networking.istio.io/exportTo")
                        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
                        .unwrap_or_default(),
                    fqdn,
                }
            })
            .collect();
        services.sort_by(|a, b| a.fqdn.cmp(&b.fqdn));
        Registry {
            services,
            instances,
            trust_domain: "cluster.local".to_string(),
            peer_auth: crate::peerauth::PeerAuthPolicies::from_resources(
                resources,
                crate::mesh::ROOT_NAMESPACE,
            ),
        }
    }

    /// The service a host names from `namespace` (Kubernetes search path).
    pub fn service(&self, name: &str, namespace: &str) -> Option<&Service> {
        host::kube_candidates(name, namespace)
            .iter()
            .find_map(|c| self.services.iter().find(|s| &s.fqdn == c))
    }

    /// The instances a service selects (a Service without a selector has none here).
    pub fn selected<'a>(&'a self, s: &'a Service) -> impl Iterator<Item = &'a Instance> + 'a {
        self.instances.iter().filter(move |i| {
            i.namespace == s.namespace
                && !s.selector.is_empty()
                && s.selector.iter().all(|(k, v)| i.labels.get(k) == Some(v))
        })
    }

    /// The endpoints of one service port: every address of every selected instance, on the
    /// target port (a number, an instance port's name, or the service port itself).
    pub fn endpoints(&self, s: &Service, port: &ServicePort) -> Vec<EndpointRef> {
        let mut out = Vec::new();
        for i in self.selected(s) {
            // A WorkloadEntry's port map names service ports (Istio), before targetPort.
            let mapped = i
                .entry
                .then(|| {
                    i.ports
                        .iter()
                        .find(|p| p.name.is_some() && p.name == port.name)
                        .map(|p| p.port)
                })
                .flatten();
            let target = match &port.target {
                _ if mapped.is_some() => mapped,
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(name)) => i
                    .ports
                    .iter()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .map(|p| p.port),
                None => Some(port.port),
            };
            let Some(target) = target else { continue };
            for ip in &i.addresses {
                out.push(EndpointRef {
                    ip: *ip,
                    port: target,
                    labels: i.labels.clone(),
                    // Every instance the runtime reports runs beside a Trellis proxy; a
                    // WorkloadEntry says so with its tlsMode label.
                    proxied: i.proxied(),
                    plaintext: self.takes_plaintext_only(i, target),
                    identity: Some(self.identity(i)),
                    locality: i.locality.clone(),
                    workload: i.workload.clone(),
                    namespace: i.namespace.clone(),
                });
            }
        }
        out
    }

    /// Whether `i`'s proxy takes only plaintext on `port` (PeerAuthentication DISABLE), so
    /// that clients must not originate mutual TLS to it.
    pub fn takes_plaintext_only(&self, i: &Instance, port: u16) -> bool {
        i.proxied()
            && self
                .peer_auth
                .resolve(&i.namespace, &i.labels)
                .at(u32::from(port))
                == trellis_xds::snapshot::PeerMtls::Disable
    }

    /// An instance's SPIFFE identity in this registry's trust domain.
    pub fn identity(&self, i: &Instance) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, i.namespace, i.service_account
        )
    }

    /// Whether `s` may be seen from `namespace` (exportTo: `*`, `.`, or namespaces).
    pub fn visible(&self, s: &Service, namespace: &str) -> bool {
        exported(&s.export_to, &s.namespace, namespace)
    }
}

/// Istio's exportTo rule: empty or `*`: everywhere; `.`: the owner's namespace; `~`:
/// nowhere; else the namespaces listed.
pub fn exported(export_to: &[String], owner: &str, from: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => owner == from,
            "~" => false,
            ns => ns == from,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vips_are_stable_and_in_range() {
        let a = vec![
            "a.ns.svc.cluster.local".to_string(),
            "b.ns.svc.cluster.local".to_string(),
        ];
        let first = allocate_vips(&a, &[]);
        let mut more = a.clone();
        more.insert(1, "ab.ns.svc.cluster.local".to_string());
        more.push("zz.other.svc.cluster.local".to_string());
        let second = allocate_vips(&more, &[]);
        for f in &a {
            assert_eq!(first[f], second[f], "{f} kept its address");
            let IpAddr::V4(v4) = first[f] else {
                panic!("v4")
            };
            assert_eq!(v4.octets()[..2], [240, 240]);
        }
        let distinct: std::collections::HashSet<_> = second.values().collect();
        assert_eq!(distinct.len(), second.len());
        // A taken address is skipped.
        let taken = [first["a.ns.svc.cluster.local"]];
        let third = allocate_vips(&a[..1], &taken);
        assert_ne!(third["a.ns.svc.cluster.local"], taken[0]);
    }

    #[test]
    fn export_to_rules() {
        assert!(exported(&[], "a", "b"));
        assert!(exported(&[".".into()], "a", "a"));
        assert!(!exported(&[".".into()], "a", "b"));
        assert!(exported(&["b".into()], "a", "b"));
        assert!(!exported(&["~".into()], "a", "a"));
    }
}
