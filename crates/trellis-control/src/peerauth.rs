//! PeerAuthentication: which policy applies to a workload, and what its inbound mutual TLS
//! mode is, with Istio's precedence: a policy in the workload's namespace whose selector
//! matches it, else its namespace's policy without a selector, else the mesh-wide policy
//! (the root namespace's, without a selector). A mode left UNSET inherits from the next
//! level; with none set, PERMISSIVE. `portLevelMtls` counts only on a policy with a
//! selector, as in Istio; a port left UNSET takes the workload's mode.

use std::collections::BTreeMap;

use trellis_api::security::{MtlsMode, PeerAuthentication};
use trellis_api::{Resource, Spec};
use trellis_xds::snapshot::PeerMtls;

/// The PeerAuthentications of a configuration, for resolving workloads against.
#[derive(Debug, Clone, Default)]
pub struct PeerAuthPolicies {
    /// (namespace, name, policy), sorted by namespace and name: when two policies of the
    /// same level apply, the first by name wins (Istio takes the oldest; names are what
    /// files give).
    list: Vec<(String, String, PeerAuthentication)>,
    root_namespace: String,
}

/// A workload's resolved mode, and where its ports differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub mode: PeerMtls,
    pub ports: BTreeMap<u32, PeerMtls>,
}

impl Resolved {
    /// The mode on workload port `port`.
    pub fn at(&self, port: u32) -> PeerMtls {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }
}

fn mode(m: MtlsMode) -> Option<PeerMtls> {
    match m {
        MtlsMode::Unset => None,
        MtlsMode::Disable => Some(PeerMtls::Disable),
        MtlsMode::Permissive => Some(PeerMtls::Permissive),
        MtlsMode::Strict => Some(PeerMtls::Strict),
    }
}

impl PeerAuthPolicies {
    pub fn from_resources(resources: &[&Resource], root_namespace: &str) -> PeerAuthPolicies {
        let mut list: Vec<(String, String, PeerAuthentication)> = resources
            .iter()
            .filter_map(|r| match &r.spec {
                Spec::PeerAuthentication(p) => {
                    Some((r.namespace().to_string(), r.name().to_string(), p.clone()))
                }
                _ => None,
            })
            .collect();
        list.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        PeerAuthPolicies {
            list,
            root_namespace: root_namespace.to_string(),
        }
    }

    /// The mode of a workload of `namespace` with `labels`.
    pub fn resolve(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Resolved {
        fn in_ns<'a>(
            list: &'a [(String, String, PeerAuthentication)],
            ns: &'a str,
        ) -> impl Iterator<Item = &'a (String, String, PeerAuthentication)> {
            list.iter().filter(move |(n, _, _)| n == ns)
        }
        let workload = in_ns(&self.list, namespace).find(|(_, _, p)| {
            p.selector
                .as_ref()
                .is_some_and(|s| s.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
        });
        let namespace_wide = in_ns(&self.list, namespace).find(|(_, _, p)| p.selector.is_none());
        let mesh_wide =
            in_ns(&self.list, &self.root_namespace).find(|(_, _, p)| p.selector.is_none());
        let level = |p: Option<&(String, String, PeerAuthentication)>| {
            p.and_then(|(_, _, p)| p.mtls.and_then(|m| mode(m.mode)))
        };
        let resolved = level(workload)
            .or_else(|| level(namespace_wide))
            .or_else(|| level(mesh_wide))
            .unwrap_or(PeerMtls::Permissive);
        let ports = workload
            .map(|(_, _, p)| {
                p.port_level_mtls
                    .iter()
                    .filter_map(|(port, m)| mode(m.mode).map(|m| (*port, m)))
                    .filter(|(_, m)| *m != resolved)
                    .collect()
            })
            .unwrap_or_default();
        Resolved {
            mode: resolved,
            ports,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::{LoadOptions, parse_text};

    fn policies(docs: &[String]) -> PeerAuthPolicies {
        let parsed: Vec<Resource> = docs
            .iter()
            .flat_map(|d| parse_text(d, "pa.yaml", &LoadOptions::default()))
            .map(|p| {
                p.resource()
                    .cloned()
                    .unwrap_or_else(|| panic!("{:?}", p.diagnostics))
            })
            .collect();
        let refs: Vec<&Resource> = parsed.iter().collect();
        PeerAuthPolicies::from_resources(&refs, "istio-system")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pa(ns: &str, name: &str, body: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}"
        )
    }

    #[test]
    fn nothing_set_is_permissive() {
        let p = policies(&[]);
        let r = p.resolve("shop", &labels(&[("app", "reviews")]));
        assert_eq!(r.mode, PeerMtls::Permissive);
        assert_eq!(r.at(9080), PeerMtls::Permissive);
    }

    #[test]
    fn workload_beats_namespace_beats_mesh_and_unset_inherits() {
        let yaml = [
            pa("istio-system", "default", "  mtls: {mode: STRICT}\n"),
            pa("shop", "ns", "  mtls: {mode: PERMISSIVE}\n"),
            pa(
                "shop",
                "reviews",
                "  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: DISABLE}\n",
            ),
            pa(
                "shop",
                "ratings",
                "  selector: {matchLabels: {app: ratings}}\n  mtls: {mode: UNSET}\n",
            ),
            // A mesh-wide policy has no selector: this one is a workload policy for the
            // root namespace's own workloads only.
            pa(
                "istio-system",
                "odd",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: DISABLE}\n",
            ),
        ];
        let p = policies(&yaml);
        let at = |ns: &str, app: &str| p.resolve(ns, &labels(&[("app", app)])).mode;
        assert_eq!(at("shop", "reviews"), PeerMtls::Disable, "workload level");
        assert_eq!(
            at("shop", "details"),
            PeerMtls::Permissive,
            "namespace level"
        );
        assert_eq!(
            at("shop", "ratings"),
            PeerMtls::Permissive,
            "UNSET inherits the namespace's"
        );
        assert_eq!(at("web", "web"), PeerMtls::Strict, "mesh-wide");
        assert_eq!(at("istio-system", "web"), PeerMtls::Disable);
        assert_eq!(at("istio-system", "other"), PeerMtls::Strict);
    }

    #[test]
    fn port_level_modes_need_a_selector_and_unset_ports_inherit() {
        let yaml = [pa(
            "shop",
            "reviews",
            "  selector: {matchLabels: {app: reviews}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    9090: {mode: UNSET}\n    9091: {mode: STRICT}\n",
        )];
        let p = policies(&yaml);
        let r = p.resolve("shop", &labels(&[("app", "reviews")]));
        assert_eq!(r.mode, PeerMtls::Strict);
        assert_eq!(r.at(8080), PeerMtls::Disable);
        assert_eq!(r.at(9090), PeerMtls::Strict);
        assert_eq!(r.ports.len(), 1, "only the port that differs: {r:?}");
        // (Without a selector, portLevelMtls is refused when the file is loaded.)
    }

    #[test]
    fn two_policies_of_one_level_the_first_by_name_wins() {
        let yaml = [
            pa("shop", "b", "  mtls: {mode: DISABLE}\n"),
            pa("shop", "a", "  mtls: {mode: STRICT}\n"),
        ];
        assert_eq!(
            policies(&yaml).resolve("shop", &BTreeMap::new()).mode,
            PeerMtls::Strict
        );
    }
}
