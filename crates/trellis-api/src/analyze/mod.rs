//! Cross-resource analyzers behind `trellis analyze`.
//!
//! Each analyzer looks at the whole loaded configuration (not one resource at a time, which
//! is validation's job) and reports problems with the message codes of `istioctl analyze`,
//! so that users recognise them and can look them up in Istio's documentation:
//!
//! | Code | Level | Name |
//! |---|---|---|
//! | IST0101 | Error | ReferencedResourceNotFound |
//! | IST0106 | Error | SchemaValidationError (every loading/validation error) |
//! | IST0109 | Error | ConflictingMeshGatewayVirtualServiceHosts |
//! | IST0130 | Warning | VirtualServiceUnreachableRule |
//! | IST0131 | Info | VirtualServiceIneffectiveMatch |
//! | IST0132 | Warning | VirtualServiceHostNotFoundInGateway |
//! | IST0133 | Warning | SchemaWarning (every loading/validation warning) |
//! | IST0145 | Error | ConflictingGateways |
//! | IST0173 | Error | DestinationRuleSubsetNotSelectPods |
//! | IST0174 | Warning | UnknownDestinationRuleHost |
//! | TRL0001 | Info | SkippedKind (Trellis's own: a document of a kind Trellis does not read) |
//!
//! References resolve against a registry built from the input: Kubernetes `Service`s
//! (host `name.ns.svc.cluster.local`), `ServiceEntry` hosts (with their `exportTo`) and
//! Trellis `Workload`s (host `name.ns.svc.cluster.local`). Pods are Trellis `Workload`s plus
//! the pod templates of Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
//! CronJobs. Host names resolve as Kubernetes DNS does (see [`crate::host`]).

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::load::Parsed;
use crate::resource::{Level, Location, ObjectRef, Resource};

mod destinationrule;
mod gateway;
pub mod output;
mod registry;
mod schema;
mod virtualservice;
mod vs_rules;

/// Options for [`analyze`].
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Namespace of objects that name none (the loader normally fills it in already).
    pub default_namespace: String,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            default_namespace: "default".to_string(),
        }
    }
}

/// A kind of message: its code, name and level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageType {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
}

/// The message types the analyzers report.
pub mod codes {
    use super::MessageType;
    use crate::resource::Level;

    const fn t(code: &'static str, name: &'static str, level: Level) -> MessageType {
        MessageType { code, name, level }
    }

    /// `Referenced <reftype> not found: "<value>"`.
    pub const REFERENCED_RESOURCE_NOT_FOUND: MessageType =
        t("IST0101", "ReferencedResourceNotFound", Level::Error);
    /// `Schema validation error: <path>: <message>`.
    pub const SCHEMA_VALIDATION_ERROR: MessageType =
        t("IST0106", "SchemaValidationError", Level::Error);
    pub const CONFLICTING_MESH_GATEWAY_VIRTUAL_SERVICE_HOSTS: MessageType = t(
        "IST0109",
        "ConflictingMeshGatewayVirtualServiceHosts",
        Level::Error,
    );
    pub const VIRTUAL_SERVICE_UNREACHABLE_RULE: MessageType =
        t("IST0130", "VirtualServiceUnreachableRule", Level::Warning);
    pub const VIRTUAL_SERVICE_INEFFECTIVE_MATCH: MessageType =
        t("IST0131", "VirtualServiceIneffectiveMatch", Level::Info);
    pub const VIRTUAL_SERVICE_HOST_NOT_FOUND_IN_GATEWAY: MessageType = t(
        "IST0132",
        "VirtualServiceHostNotFoundInGateway",
        Level::Warning,
    );
    /// `Schema validation warning: <path>: <message>`.
    pub const SCHEMA_WARNING: MessageType = t("IST0133", "SchemaWarning", Level::Warning);
    pub const CONFLICTING_GATEWAYS: MessageType = t("IST0145", "ConflictingGateways", Level::Error);
    pub const DESTINATION_RULE_SUBSET_NOT_SELECT_PODS: MessageType = t(
        "IST0173",
        "DestinationRuleSubsetNotSelectPods",
        Level::Error,
    );
    pub const UNKNOWN_DESTINATION_RULE_HOST: MessageType =
        t("IST0174", "UnknownDestinationRuleHost", Level::Warning);
    /// Trellis's own code (not Istio's): a document of a kind Trellis does not read
    /// (e.g. a ConfigMap) was skipped. Informational only.
    pub const SKIPPED_KIND: MessageType = t("TRL0001", "SkippedKind", Level::Info);
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub code: &'static str,
    pub name: &'static str,
    pub level: Level,
    /// The object the message is about.
    pub object: Option<ObjectRef>,
    /// Where: the specific field when there is one, else the object's name.
    pub location: Option<Location>,
    /// The rendered message.
    pub text: String,
}

impl Message {
    pub fn new(
        t: MessageType,
        object: Option<ObjectRef>,
        location: Option<Location>,
        text: String,
    ) -> Self {
        Message {
            code: t.code,
            name: t.name,
            level: t.level,
            object,
            location,
            text,
        }
    }

    /// A message about a resource, located at the field `path` (e.g. `spec.gateways[0]`).
    pub(crate) fn at(t: MessageType, r: &Resource, path: &str, text: String) -> Self {
        Message::new(t, Some(r.object_ref()), Some(r.origin.location(path)), text)
    }

    /// Istio's documentation page for the code (none for Trellis's own codes).
    pub fn documentation_url(&self) -> Option<String> {
        self.code.starts_with("IST").then(|| {
            format!(
                "https://istio.io/latest/docs/reference/config/analysis/{}/",
                self.code.to_ascii_lowercase()
            )
        })
    }

    /// `file:line` of the location.
    pub fn reference(&self) -> Option<String> {
        self.location
            .as_ref()
            .map(|l| format!("{}:{}", l.file, l.mark.line))
    }

    /// Schema messages (and messages about no object) point at a column too.
    fn shows_column(&self) -> bool {
        self.object.is_none()
            || self.code == codes::SCHEMA_VALIDATION_ERROR.code
            || self.code == codes::SCHEMA_WARNING.code
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]", self.level, self.code)?;
        let loc = self.location.as_ref().map(|l| {
            if self.shows_column() {
                l.to_string()
            } else {
                format!("{}:{}", l.file, l.mark.line)
            }
        });
        match (&self.object, loc) {
            (Some(o), Some(l)) => write!(f, " ({o} {l})")?,
            (Some(o), None) => write!(f, " ({o})")?,
            (None, Some(l)) => write!(f, " ({l})")?,
            (None, None) => {}
        }
        write!(f, " {}", self.text)
    }
}

/// What the analyzers share: the accepted resources and the registry built from them.
pub(crate) struct Context<'a> {
    pub resources: Vec<&'a Resource>,
    pub registry: registry::Registry,
}

impl<'a> Context<'a> {
    fn new(parsed: &'a [Parsed], opts: &AnalyzeOptions) -> Self {
        // An object given twice (the same file passed twice, or a later edit of it) counts
        // once: the last version wins, as it would in a config store.
        let mut resources: Vec<&Resource> = Vec::new();
        let mut index: HashMap<ObjectRef, usize> = HashMap::new();
        for r in parsed.iter().filter_map(Parsed::resource) {
            match index.get(&r.object_ref()) {
                Some(&i) => resources[i] = r,
                None => {
                    index.insert(r.object_ref(), resources.len());
                    resources.push(r);
                }
            }
        }
        let registry = registry::Registry::build(parsed, &opts.default_namespace);
        Context {
            resources,
            registry,
        }
    }
}

/// The namespace of a resource, or `default` when it has none.
pub(crate) fn ns_of<'r>(r: &'r Resource, default: &'r str) -> &'r str {
    match r.namespace() {
        "" => default,
        ns => ns,
    }
}

/// Runs every analyzer over the loaded documents. Messages are sorted by level (Error,
/// Warning, Info), then file and line, then code; identical messages appear once.
pub fn analyze(parsed: &[Parsed], opts: &AnalyzeOptions) -> Vec<Message> {
    let ctx = Context::new(parsed, opts);
    let mut out = Vec::new();
    schema::analyze(parsed, &mut out);
    virtualservice::analyze(&ctx, opts, &mut out);
    vs_rules::analyze(&ctx, &mut out);
    gateway::analyze(&ctx, opts, &mut out);
    destinationrule::analyze(&ctx, opts, &mut out);

    let mut seen = HashSet::new();
    out.retain(|m| seen.insert(m.to_string()));
    out.sort_by(|a, b| {
        let key = |m: &Message| {
            (
                m.level,
                m.location.as_ref().map(|l| (l.file.clone(), l.mark.line)),
                m.code,
                m.location.as_ref().map(|l| l.mark.col),
                m.to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}
