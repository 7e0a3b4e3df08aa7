//! The services, pods and TLS secrets that references resolve against.

use std::collections::HashSet;

use crate::common::Labels;
use crate::host;
use crate::load::Parsed;
use crate::resource::{Document, Spec};

/// Annotation with which a Kubernetes Service limits where Istio exports it.
const SERVICE_EXPORT_TO: &str = "networking.istio.io/exportTo";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Kube,
    ServiceEntry,
    Workload,
}

/// Which namespaces see a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Export {
    All,
    /// These namespaces only (empty: nobody, `exportTo: ["~"]`).
    Namespaces(Vec<String>),
}

impl Export {
    /// Reads an `exportTo` list: empty or containing `*` means everyone; `.` is `own`.
    fn parse<'s>(entries: impl IntoIterator<Item = &'s str>, own: &str) -> Export {
        let mut out = Vec::new();
        let mut any = false;
        for e in entries {
            let e = e.trim();
            match e {
                "" => {}
                "*" => return Export::All,
                "~" => any = true,
                "." => {
                    any = true;
                    out.push(own.to_string());
                }
                ns => {
                    any = true;
                    out.push(ns.to_string());
                }
            }
        }
        if any {
            Export::Namespaces(out)
        } else {
            Export::All
        }
    }

    fn visible_from(&self, ns: &str) -> bool {
        match self {
            Export::All => true,
            Export::Namespaces(list) => list.iter().any(|n| n == ns),
        }
    }
}

/// A host that traffic can be sent to.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    /// FQDN (`reviews.default.svc.cluster.local`) or a ServiceEntry host (maybe a wildcard).
    pub host: String,
    pub source: Source,
    pub export: Export,
    /// ServiceEntry workloadSelector labels (empty for other sources).
    pub selector: Labels,
}

/// A pod (or Trellis Workload instance): where it runs and its labels.
#[derive(Debug, Clone)]
pub(crate) struct Pod {
    pub namespace: String,
    pub labels: Labels,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub services: Vec<Service>,
    pub pods: Vec<Pod>,
    /// `kubernetes.io/tls` Secrets, as (namespace, name).
    pub tls_secrets: HashSet<(String, String)>,
}

/// Whether every label of `selector` is on `labels` (an empty selector selects everything).
pub(crate) fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Registry {
    pub fn build(parsed: &[Parsed], default_ns: &str) -> Self {
        let mut reg = Registry::default();
        let or_default = |ns: &str| {
            if ns.is_empty() {
                default_ns.to_string()
            } else {
                ns.to_string()
            }
        };
        for doc in parsed.iter().filter_map(|p| p.document.as_ref()) {
            match doc {
                Document::Config(r) => {
                    let ns = or_default(r.namespace());
                    match &r.spec {
                        Spec::Service(_) => {
                            let export = match r.meta.annotations.get(SERVICE_EXPORT_TO) {
                                Some(v) => Export::parse(v.split(','), &ns),
                                None => Export::All,
                            };
                            reg.services.push(Service {
                                host: format!("{}.{ns}{}", r.name(), host::SERVICE_SUFFIX),
                                source: Source::Kube,
                                export,
                                selector: Labels::new(),
                            });
                        }
                        Spec::ServiceEntry(se) => {
                            let export =
                                Export::parse(se.export_to.iter().map(String::as_str), &ns);
                            let selector = se
                                .workload_selector
                                .as_ref()
                                .map(|s| s.labels.clone())
                                .unwrap_or_default();
                            for h in &se.hosts {
                                reg.services.push(Service {
                                    host: h.clone(),
                                    source: Source::ServiceEntry,
                                    export: export.clone(),
                                    selector: selector.clone(),
                                });
                            }
                        }
                        Spec::Workload(_) => {
                            reg.services.push(Service {
                                host: format!("{}.{ns}{}", r.name(), host::SERVICE_SUFFIX),
                                source: Source::Workload,
                                export: Export::All,
                                selector: Labels::new(),
                            });
                            reg.pods.push(Pod {
                                namespace: ns,
                                labels: r.meta.labels.clone(),
                            });
                        }
                        _ => {}
                    }
                }
                Document::Pods(owner) => reg.pods.push(Pod {
                    namespace: or_default(&owner.namespace),
                    labels: owner.template.labels.clone(),
                }),
                Document::TlsSecret { namespace, name } => {
                    reg.tls_secrets
                        .insert((or_default(namespace), name.clone()));
                }
                Document::Other(_) => {}
            }
        }
        reg
    }

    /// Finds the service `host` names when written in namespace `ns` and used from there.
    pub fn lookup(&self, host: &str, ns: &str) -> Option<&Service> {
        self.lookup_from(host, ns, &[ns])
    }

    /// Finds the service `host` (written in namespace `ns`) names, as seen from any of the
    /// `viewers` namespaces: exact names first (short names and `name.ns[.svc]` expanded as
    /// Kubernetes DNS does, see [`host::kube_candidates`]), then wildcard ServiceEntry hosts.
    pub fn lookup_from(&self, host: &str, ns: &str, viewers: &[&str]) -> Option<&Service> {
        let candidates = host::kube_candidates(host, ns);
        let visible = |s: &&Service| viewers.iter().any(|v| s.export.visible_from(v));
        self.services
            .iter()
            .filter(visible)
            .find(|s| candidates.iter().any(|c| c.eq_ignore_ascii_case(&s.host)))
            .or_else(|| {
                self.services
                    .iter()
                    .filter(visible)
                    .filter(|s| s.source == Source::ServiceEntry && host::is_wildcard(&s.host))
                    .find(|s| candidates.iter().any(|c| host::matches(&s.host, c)))
            })
    }

    /// The canonical name of `host` written in `ns`: the service's FQDN when it resolves to a
    /// Kubernetes Service or Workload, else Istio's expansion ([`host::fqdn`]).
    pub fn canonical(&self, host: &str, ns: &str) -> String {
        match self.lookup(host, ns) {
            Some(s) if s.source != Source::ServiceEntry => s.host.clone(),
            _ => host::fqdn(host, ns),
        }
    }

    /// The key DestinationRule subsets are filed under: a cluster-local FQDN, or
    /// `ns/host` for other hosts (as Istio, which keys those by the writer's namespace).
    pub fn subset_key(&self, host: &str, ns: &str) -> String {
        let c = self.canonical(host, ns);
        if host::split_service_fqdn(&c).is_some() {
            c
        } else {
            format!("{ns}/{host}")
        }
    }

    pub fn pods_selected<'s>(&'s self, selector: &'s Labels) -> impl Iterator<Item = &'s Pod> {
        self.pods
            .iter()
            .filter(move |p| selects(selector, &p.labels))
    }
}
