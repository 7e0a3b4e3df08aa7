//! Resources: the envelope (`apiVersion`, `kind`, `metadata`, `spec`), the kinds Trellis
//! understands and the apiVersions it serves for each, and diagnostics that say where a
//! problem is (`reviews.yaml:14:9: VirtualService default/reviews: spec.http[0]…: …`).

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::common::ObjectMeta;
use crate::kube::{NamespaceSpec, PodTemplate, ServiceSpec};
use crate::networking::{
    DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService, WorkloadEntry, WorkloadGroup,
};
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use crate::telemetry::Telemetry;
use crate::workload::WorkloadSpec;
use crate::yaml::{Mark, Node};

/// The configuration kinds Trellis understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    VirtualService,
    DestinationRule,
    Gateway,
    ServiceEntry,
    Sidecar,
    WorkloadEntry,
    WorkloadGroup,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Telemetry,
    Service,
    Namespace,
    Workload,
}

impl Kind {
    pub const ALL: [Kind; 14] = [
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::ServiceEntry,
        Kind::Sidecar,
        Kind::WorkloadEntry,
        Kind::WorkloadGroup,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::RequestAuthentication,
        Kind::Telemetry,
        Kind::Service,
        Kind::Namespace,
        Kind::Workload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::Sidecar => "Sidecar",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Telemetry => "Telemetry",
            Kind::Service => "Service",
            Kind::Namespace => "Namespace",
            Kind::Workload => "Workload",
        }
    }

    /// The API group (empty for Kubernetes core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::VirtualService
            | Kind::DestinationRule
            | Kind::Gateway
            | Kind::ServiceEntry
            | Kind::Sidecar
            | Kind::WorkloadEntry
            | Kind::WorkloadGroup => "networking.istio.io",
            Kind::PeerAuthentication | Kind::AuthorizationPolicy | Kind::RequestAuthentication => {
                "security.istio.io"
            }
            Kind::Telemetry => "telemetry.istio.io",
            Kind::Service | Kind::Namespace => "",
            Kind::Workload => "trellis.dev",
        }
    }

    /// Versions served, as Istio serves them.
    pub fn versions(self) -> &'static [&'static str] {
        match self.group() {
            "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
            "security.istio.io" => &["v1", "v1beta1"],
            "telemetry.istio.io" => &["v1", "v1alpha1"],
            "trellis.dev" => &["v1alpha1"],
            _ => &["v1"],
        }
    }

    /// Cluster-scoped kinds have no namespace.
    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The typed spec of a resource. (Variants differ in size; specs are built once per
/// document and shared behind `Arc`s, so boxing them would buy nothing.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Spec {
    VirtualService(VirtualService),
    DestinationRule(DestinationRule),
    Gateway(Gateway),
    ServiceEntry(ServiceEntry),
    Sidecar(Sidecar),
    WorkloadEntry(WorkloadEntry),
    WorkloadGroup(WorkloadGroup),
    PeerAuthentication(PeerAuthentication),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    Telemetry(Telemetry),
    Service(ServiceSpec),
    Namespace(NamespaceSpec),
    Workload(WorkloadSpec),
}

/// Identifies an object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Where a document came from: the file name as given by the user and the parsed tree
/// (kept so that later checks can point at the line of any field).
#[derive(Debug, Clone)]
pub struct Origin {
    pub file: Arc<str>,
    pub node: Arc<Node>,
}

impl Origin {
    /// The position of the field at `path` (or its nearest existing parent).
    pub fn mark(&self, path: &str) -> Mark {
        self.node.locate_mark(path)
    }

    pub fn location(&self, path: &str) -> Location {
        Location {
            file: self.file.clone(),
            mark: self.mark(path),
        }
    }
}

/// A file and a position in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    pub file: Arc<str>,
    pub mark: Mark,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.mark.line, self.mark.col)
    }
}

/// A configuration resource of a kind Trellis understands.
#[derive(Debug, Clone)]
pub struct Resource {
    pub kind: Kind,
    pub api_version: String,
    /// Metadata, with `namespace` filled in (the default namespace when the document has
    /// none; empty for cluster-scoped kinds).
    pub meta: ObjectMeta,
    pub spec: Spec,
    pub origin: Origin,
}

impl Resource {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn namespace(&self) -> &str {
        self.meta.namespace.as_deref().unwrap_or_default()
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef {
            kind: self.kind.as_str().to_string(),
            namespace: self.namespace().to_string(),
            name: self.meta.name.clone(),
        }
    }
}

/// An object that runs pods (Pod, Deployment…), read loosely for the analyzers.
#[derive(Debug, Clone)]
pub struct PodOwner {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub template: PodTemplate,
    pub origin: Origin,
}

/// A document, by what Trellis does with it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Document {
    /// A kind Trellis understands.
    Config(Resource),
    /// A Kubernetes object that runs pods: counts as workloads for the analyzers.
    Pods(PodOwner),
    /// A `kubernetes.io/tls` Secret: counts as a gateway credential for the analyzers.
    TlsSecret { namespace: String, name: String },
    /// Any other kind: skipped (an Info diagnostic says so).
    Other(ObjectRef),
}

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Error,
    Warning,
    Info,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem found while loading or validating configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub level: Level,
    pub location: Location,
    /// The object the problem is in, when it could be identified.
    pub object: Option<ObjectRef>,
    /// Field path within the document (`spec.http[0].route[1].weight`), or empty.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if self.level != Level::Error {
            write!(f, "{}: ", self.level.as_str().to_ascii_lowercase())?;
        }
        if let Some(obj) = &self.object {
            write!(f, "{obj}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// The typed envelope every kind shares (apiVersion and kind are checked before typing).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Envelope<S> {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
    pub status: Option<IgnoredAny>,
}
