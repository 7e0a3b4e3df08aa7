//! Per-resource incremental pushes over Delta ADS.
//!
//! A proxy's snapshot travels as named resources, each an `Any`:
//!
//! - `proxy`: a [`Snapshot`] holding everything but the services and clusters (the
//!   proxy's own workload, its settings, gateway ports and the trust bundle);
//! - `service/<hostname>`: one [`Service`] with its ports and routes;
//! - `cluster/<name>`: one [`Cluster`] with its traffic policy and endpoints;
//! - `peer/<namespace>/<instance>/<address>`: one [`Peer`], an instance of the mesh (who
//!   a caller is).
//!
//! A resource's version is a hash of its encoding, so the control plane sends a proxy only
//! the resources whose content differs from what the proxy holds, and names the ones it
//! must drop in `removed_resources`: an endpoint that comes or goes resends that one
//! cluster, never the routes. One response carries every change of one push, and the
//! proxy applies it whole or not at all ([`Held::apply`]), so it never runs a half-applied
//! push (a route naming a cluster that has not arrived yet).
//!
//! A proxy that reconnects says what it holds (`initial_resource_versions`), and is sent
//! only what changed meanwhile.

use std::collections::BTreeMap;

use prost::Message;

use crate::ads::{DeltaDiscoveryResponse, Resource};
use crate::snapshot::{Cluster, Peer, Service, Snapshot};

/// The type URL of a whole snapshot sent as one resource (by control planes before
/// per-resource pushes): it replaces everything a proxy holds.
pub const SNAPSHOT_TYPE_URL: &str = crate::ads::SNAPSHOT_TYPE_URL;
/// The type URL of the `proxy` resource (a `Snapshot` message without services and
/// clusters). A type of its own, so that a proxy that predates per-resource pushes
/// refuses it rather than applying a snapshot without services.
pub const PROXY_TYPE_URL: &str = "type.googleapis.com/trellis.snapshot.v1.ProxyPart";
pub const SERVICE_TYPE_URL: &str = "type.googleapis.com/trellis.snapshot.v1.Service";
pub const CLUSTER_TYPE_URL: &str = "type.googleapis.com/trellis.snapshot.v1.Cluster";
pub const PEER_TYPE_URL: &str = "type.googleapis.com/trellis.snapshot.v1.Peer";
/// The name of the resource holding the proxy's own part of the snapshot.
pub const PROXY_RESOURCE: &str = "proxy";

/// One named resource, encoded, with its version (a hash of the encoding).
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub version: String,
    pub any: prost_types::Any,
}

impl Part {
    fn new(name: String, type_url: &str, value: Vec<u8>) -> Part {
        Part {
            name,
            version: version_of(&value),
            any: prost_types::Any {
                type_url: type_url.to_string(),
                value,
            },
        }
    }

    pub fn resource(&self) -> Resource {
        Resource {
            version: self.version.clone(),
            name: self.name.clone(),
            resource: Some(self.any.clone()),
        }
    }
}

/// FNV-1a, 64 bits, in hex: stable across processes and releases, so that a proxy
/// reconnecting to a restarted control plane is not sent what it already has.
fn version_of(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Names `base`, or `base#2`, `base#3`… when an earlier resource took it.
fn unique(base: String, taken: &mut BTreeMap<String, usize>) -> String {
    let n = taken.entry(base.clone()).or_insert(0);
    *n += 1;
    if *n == 1 { base } else { format!("{base}#{n}") }
}

/// The services, clusters and peers of `s` as resources, sorted by name (services by
/// hostname, in the order a proxy puts them back: see [`Held::apply`]). The rest of `s`
/// is left for [`proxy_part`].
pub fn shared_parts(s: &Snapshot) -> Vec<Part> {
    let mut services: Vec<&Service> = s.services.iter().collect();
    services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let mut clusters: Vec<&Cluster> = s.clusters.iter().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    let mut taken = BTreeMap::new();
    let mut parts = Vec::with_capacity(services.len() + clusters.len());
    for svc in services {
        let name = unique(format!("service/{}", svc.hostname), &mut taken);
        parts.push(Part::new(name, SERVICE_TYPE_URL, svc.encode_to_vec()));
    }
    for c in clusters {
        let name = unique(format!("cluster/{}", c.name), &mut taken);
        parts.push(Part::new(name, CLUSTER_TYPE_URL, c.encode_to_vec()));
    }
    for p in &s.peers {
        // By instance, not address: an instance that leaves renames no other.
        let name = unique(
            format!("peer/{}/{}/{}", p.namespace, p.instance, p.address),
            &mut taken,
        );
        parts.push(Part::new(name, PEER_TYPE_URL, p.encode_to_vec()));
    }
    parts.sort_by(|a, b| a.name.cmp(&b.name));
    parts
}

/// The `proxy` resource: `s` without its services, clusters, peers and version.
pub fn proxy_part(s: &Snapshot) -> Part {
    let own = Snapshot {
        version: String::new(),
        services: Vec::new(),
        clusters: Vec::new(),
        peers: Vec::new(),
        ..s.clone()
    };
    Part::new(
        PROXY_RESOURCE.to_string(),
        PROXY_TYPE_URL,
        own.encode_to_vec(),
    )
}

/// What to send a proxy that holds `held` (name → version) so that it ends up with
/// exactly `want` (sorted by name, as [`shared_parts`] makes them, plus `extra`
/// anywhere): the resources that are new or differ, and the names to drop.
pub fn diff(
    held: &BTreeMap<String, String>,
    want: &[Part],
    extra: &[&Part],
) -> (Vec<Resource>, Vec<String>) {
    let mut send = Vec::new();
    let mut wanted = std::collections::HashSet::with_capacity(want.len() + extra.len());
    for p in want.iter().chain(extra.iter().copied()) {
        wanted.insert(p.name.as_str());
        if held.get(&p.name) != Some(&p.version) {
            send.push(p.resource());
        }
    }
    let removed = held
        .keys()
        .filter(|k| !wanted.contains(k.as_str()))
        .cloned()
        .collect();
    (send, removed)
}

/// What the control plane knows a proxy holds.
#[derive(Debug, Clone)]
pub enum Holding {
    /// Name → version, as a reconnecting proxy lists them (`initial_resource_versions`).
    Listed(BTreeMap<String, String>),
    /// Exactly the shared parts of one scope and its own part of this version: what
    /// every response ACKed leaves a proxy with. Proxies of one scope share the parts.
    Parts {
        shared: std::sync::Arc<Vec<Part>>,
        own: String,
    },
}

impl Holding {
    /// What to send a proxy holding `self` so that it holds `shared` and `own`: the
    /// resources that are new or differ, and the names to drop. From [`Holding::Parts`]
    /// this is a merge of two sorted lists, and nothing at all when the scope's parts
    /// are the very same.
    pub fn diff(
        &self,
        shared: &std::sync::Arc<Vec<Part>>,
        own: &Part,
    ) -> (Vec<Resource>, Vec<String>) {
        let (old, old_own) = match self {
            Holding::Listed(held) => return diff(held, shared, &[own]),
            Holding::Parts {
                shared: old,
                own: old_own,
            } => (old, old_own),
        };
        let mut send = Vec::new();
        let mut removed = Vec::new();
        if !std::sync::Arc::ptr_eq(old, shared) {
            let (mut a, mut b) = (old.iter().peekable(), shared.iter().peekable());
            loop {
                match (a.peek(), b.peek()) {
                    (None, None) => break,
                    (Some(x), None) => {
                        removed.push(x.name.clone());
                        a.next();
                    }
                    (None, Some(y)) => {
                        send.push(y.resource());
                        b.next();
                    }
                    (Some(x), Some(y)) => match x.name.cmp(&y.name) {
                        std::cmp::Ordering::Less => {
                            removed.push(x.name.clone());
                            a.next();
                        }
                        std::cmp::Ordering::Greater => {
                            send.push(y.resource());
                            b.next();
                        }
                        std::cmp::Ordering::Equal => {
                            if x.version != y.version {
                                send.push(y.resource());
                            }
                            a.next();
                            b.next();
                        }
                    },
                }
            }
        }
        if *old_own != own.version {
            send.push(own.resource());
        }
        (send, removed)
    }
}

/// Applies a response's changes to `held` (what the control plane knows the proxy has,
/// once the proxy ACKs).
pub fn record(held: &mut BTreeMap<String, String>, sent: &[Resource], removed: &[String]) {
    for r in sent {
        held.insert(r.name.clone(), r.version.clone());
    }
    for name in removed {
        held.remove(name);
    }
}

/// The resources a proxy holds, from which its snapshot is put together. They are kept
/// as they came (encoded, shared between the snapshot in use and the next one): only the
/// snapshot being converted is ever decoded, so a proxy with a thousand services in scope
/// does not hold them twice more.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Held {
    pieces: BTreeMap<String, (String, std::sync::Arc<prost_types::Any>)>,
}

impl Held {
    /// Name → version of every resource held (a reconnecting proxy's
    /// `initial_resource_versions`).
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.pieces
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// What holding `resp`'s changes too would be, and the snapshot they make (version
    /// `resp.system_version_info`); `self` is untouched, so a response the proxy refuses
    /// leaves it as it was. A resource of an unknown type, or one that does not decode,
    /// refuses the whole response.
    pub fn apply(&self, resp: &DeltaDiscoveryResponse) -> Result<(Held, Snapshot), String> {
        let mut next = self.clone();
        for name in &resp.removed_resources {
            next.pieces.remove(name);
        }
        for r in &resp.resources {
            let any = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("resource {:?} has no body", r.name))?;
            if ![
                SNAPSHOT_TYPE_URL,
                PROXY_TYPE_URL,
                SERVICE_TYPE_URL,
                CLUSTER_TYPE_URL,
                PEER_TYPE_URL,
            ]
            .contains(&any.type_url.as_str())
            {
                return Err(format!(
                    "resource {:?} has an unexpected type {:?}",
                    r.name, any.type_url
                ));
            }
            // A whole snapshot (from a control plane that sends one) is all there is.
            if any.type_url == SNAPSHOT_TYPE_URL {
                next.pieces.clear();
            }
            next.pieces.insert(
                r.name.clone(),
                (r.version.clone(), std::sync::Arc::new(any.clone())),
            );
        }
        let snapshot = next.snapshot(&resp.system_version_info)?;
        Ok((next, snapshot))
    }

    /// The snapshot the held resources make: the `proxy` resource, then the services and
    /// clusters in name order (services by host name, the order the control plane's
    /// translation gives them too).
    fn snapshot(&self, version: &str) -> Result<Snapshot, String> {
        let mut own: Option<Snapshot> = None;
        let mut services = Vec::new();
        let mut clusters = Vec::new();
        let mut peers = Vec::new();
        for (name, (_, any)) in &self.pieces {
            let bad = |e: prost::DecodeError| format!("resource {name:?}: {e}");
            let bytes = any.value.as_slice();
            match any.type_url.as_str() {
                SERVICE_TYPE_URL => services.push(Service::decode(bytes).map_err(bad)?),
                CLUSTER_TYPE_URL => clusters.push(Cluster::decode(bytes).map_err(bad)?),
                PEER_TYPE_URL => peers.push(Peer::decode(bytes).map_err(bad)?),
                _ if own.is_some() => return Err("more than one proxy resource".into()),
                _ => own = Some(Snapshot::decode(bytes).map_err(bad)?),
            }
        }
        let mut s = own.ok_or("no proxy resource (the snapshot's own part)")?;
        s.version = version.to_string();
        s.services.extend(services);
        s.clusters.extend(clusters);
        s.peers.extend(peers);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Endpoint, Workload};

    fn snap(endpoint: &str, route_hosts: usize) -> Snapshot {
        let mut s = Snapshot {
            version: "v".into(),
            workload: Some(Workload {
                name: "web-0".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            trust_roots: vec!["root".into()],
            ..Default::default()
        };
        for h in ["b.default.svc.cluster.local", "a.default.svc.cluster.local"] {
            s.services.push(Service {
                hostname: h.into(),
                addresses: vec!["240.240.0.1".into(); route_hosts],
                ..Default::default()
            });
        }
        s.clusters.push(Cluster {
            name: "outbound|80||a.default.svc.cluster.local".into(),
            endpoints: vec![Endpoint {
                address: endpoint.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        s
    }

    fn respond(
        held: &BTreeMap<String, String>,
        s: &Snapshot,
        version: &str,
    ) -> DeltaDiscoveryResponse {
        let shared = shared_parts(s);
        let own = proxy_part(s);
        let (resources, removed_resources) = diff(held, &shared, &[&own]);
        DeltaDiscoveryResponse {
            system_version_info: version.into(),
            resources,
            removed_resources,
            ..Default::default()
        }
    }

    #[test]
    fn a_first_push_sends_everything_and_the_proxy_rebuilds_the_snapshot() {
        let s = snap("10.0.0.1:80", 1);
        let resp = respond(&BTreeMap::new(), &s, "r1");
        let names: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cluster/outbound|80||a.default.svc.cluster.local",
                "service/a.default.svc.cluster.local",
                "service/b.default.svc.cluster.local",
                "proxy"
            ]
        );
        let (held, rebuilt) = Held::default().apply(&resp).expect("applies");
        let mut expected = s.clone();
        expected.version = "r1".into();
        expected
            .services
            .sort_by(|a, b| a.hostname.cmp(&b.hostname));
        assert_eq!(rebuilt, expected);
        assert_eq!(held.versions().len(), 4);
    }

    #[test]
    fn endpoint_churn_resends_only_its_cluster_and_nothing_unchanged_is_resent() {
        let s1 = snap("10.0.0.1:80", 1);
        let (held, _) = Held::default()
            .apply(&respond(&BTreeMap::new(), &s1, "r1"))
            .expect("applies");
        let s2 = snap("10.0.0.2:80", 1);
        let resp = respond(&held.versions(), &s2, "r2");
        let names: Vec<&str> = resp.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["cluster/outbound|80||a.default.svc.cluster.local"]);
        assert!(resp.removed_resources.is_empty());
        let (held, rebuilt) = held.apply(&resp).expect("applies");
        assert_eq!(rebuilt.clusters[0].endpoints[0].address, "10.0.0.2:80");
        assert_eq!(rebuilt.services.len(), 2);
        assert_eq!(rebuilt.version, "r2");
        // The same content again: nothing at all.
        let resp = respond(&held.versions(), &s2, "r3");
        assert!(resp.resources.is_empty() && resp.removed_resources.is_empty());
    }

    #[test]
    fn held_parts_diff_as_a_list_of_names_would() {
        let mut s1 = snap("10.0.0.1:80", 1);
        let mut s2 = snap("10.0.0.2:80", 1);
        s1.services.push(Service {
            hostname: "c.default.svc.cluster.local".into(),
            ..Default::default()
        });
        s2.services.push(Service {
            hostname: "0.default.svc.cluster.local".into(),
            ..Default::default()
        });
        s2.trust_roots.push("another root".into());
        let (p1, p2) = (
            std::sync::Arc::new(shared_parts(&s1)),
            std::sync::Arc::new(shared_parts(&s2)),
        );
        let (o1, o2) = (proxy_part(&s1), proxy_part(&s2));
        let mut listed = BTreeMap::new();
        let (r, _) = diff(&listed, &p1, &[&o1]);
        record(&mut listed, &r, &[]);
        let parts = Holding::Parts {
            shared: std::sync::Arc::clone(&p1),
            own: o1.version.clone(),
        };
        let by_list = Holding::Listed(listed).diff(&p2, &o2);
        let by_parts = parts.diff(&p2, &o2);
        assert_eq!(by_list, by_parts);
        let names: Vec<&str> = by_parts.0.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cluster/outbound|80||a.default.svc.cluster.local",
                "service/0.default.svc.cluster.local",
                "proxy"
            ]
        );
        assert_eq!(by_parts.1, ["service/c.default.svc.cluster.local"]);
        // The very same parts and own part: nothing.
        let same = Holding::Parts {
            shared: std::sync::Arc::clone(&p2),
            own: o2.version.clone(),
        };
        assert_eq!(same.diff(&p2, &o2), (vec![], vec![]));
    }

    #[test]
    fn a_service_that_goes_is_removed_by_name() {
        let s1 = snap("10.0.0.1:80", 1);
        let (held, _) = Held::default()
            .apply(&respond(&BTreeMap::new(), &s1, "r1"))
            .expect("applies");
        let mut s2 = s1.clone();
        s2.services.retain(|s| s.hostname.starts_with('a'));
        let resp = respond(&held.versions(), &s2, "r2");
        assert!(resp.resources.is_empty());
        assert_eq!(
            resp.removed_resources,
            ["service/b.default.svc.cluster.local"]
        );
        let (_, rebuilt) = held.apply(&resp).expect("applies");
        assert_eq!(rebuilt.services.len(), 1);
    }

    #[test]
    fn a_refused_response_leaves_what_is_held_and_duplicates_get_their_own_names() {
        let s = snap("10.0.0.1:80", 1);
        let (held, _) = Held::default()
            .apply(&respond(&BTreeMap::new(), &s, "r1"))
            .expect("applies");
        let mut bad = respond(&BTreeMap::new(), &s, "r2");
        bad.resources[0].resource = Some(prost_types::Any {
            type_url: "type.googleapis.com/other".into(),
            value: Vec::new(),
        });
        let e = held.apply(&bad).expect_err("refused");
        assert!(e.contains("unexpected type"), "{e}");
        let mut undecodable = respond(&BTreeMap::new(), &s, "r2");
        if let Some(a) = undecodable.resources[0].resource.as_mut() {
            a.value = vec![0xff, 0xff];
        }
        assert!(held.apply(&undecodable).is_err());
        // Without the proxy resource there is no snapshot.
        let mut headless = respond(&BTreeMap::new(), &s, "r2");
        headless.resources.retain(|r| r.name != PROXY_RESOURCE);
        assert!(Held::default().apply(&headless).is_err());

        let mut twice = s.clone();
        twice.services.push(twice.services[0].clone());
        let names: Vec<String> = shared_parts(&twice).into_iter().map(|p| p.name).collect();
        assert!(names.contains(&"service/b.default.svc.cluster.local#2".to_string()));
    }

    #[test]
    fn a_whole_snapshot_as_one_resource_still_applies() {
        let s = snap("10.0.0.1:80", 1);
        let resp = DeltaDiscoveryResponse {
            system_version_info: "r1".into(),
            resources: vec![Resource {
                version: "r1".into(),
                name: "web-0.default".into(),
                resource: Some(prost_types::Any {
                    type_url: SNAPSHOT_TYPE_URL.into(),
                    value: s.encode_to_vec(),
                }),
            }],
            ..Default::default()
        };
        let (_, rebuilt) = Held::default().apply(&resp).expect("applies");
        assert_eq!(rebuilt.services, s.services);
        // After per-resource pushes (a control plane rolled back, say), a whole snapshot
        // replaces everything held rather than adding a second proxy part.
        let (held, _) = Held::default()
            .apply(&respond(&BTreeMap::new(), &snap("10.0.0.9:80", 1), "r0"))
            .expect("applies");
        let (held, rebuilt) = held.apply(&resp).expect("replaces");
        assert_eq!(rebuilt.clusters, s.clusters);
        assert_eq!(held.versions().len(), 1);
    }
}
