//! Kubernetes kinds: `v1 Service` and `v1 Namespace` (strict, as Trellis reads them to build
//! the registry), and the kinds `trellis analyze` reads loosely from users' manifests: the
//! ones that carry pods (namespace, pod-template labels, service account) and TLS Secrets.

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::common::{IntOrString, Labels, ObjectMeta};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// Pods (or Trellis Workloads) whose labels include all of these back the service.
    /// A service without a selector has no endpoints of its own.
    #[serde(default)]
    pub selector: Labels,
    #[serde(default)]
    pub ports: Vec<ServicePortSpec>,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    pub cluster_ips: Vec<String>,
    #[serde(rename = "type")]
    pub service_type: Option<String>,
    pub external_name: Option<String>,
    #[serde(rename = "externalIPs", default)]
    pub external_ips: Vec<String>,
    pub session_affinity: Option<String>,
    pub session_affinity_config: Option<IgnoredAny>,
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    pub load_balancer_class: Option<String>,
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub health_check_node_port: Option<u32>,
    pub publish_not_ready_addresses: Option<bool>,
    #[serde(default)]
    pub ip_families: Vec<String>,
    pub ip_family_policy: Option<String>,
    pub allocate_load_balancer_node_ports: Option<bool>,
    pub traffic_distribution: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: u32,
    pub target_port: Option<IntOrString>,
    /// Transport protocol: TCP (default), UDP or SCTP.
    pub protocol: Option<String>,
    /// Application protocol (`http`, `grpc`, `kubernetes.io/h2c`…); takes precedence over
    /// the port name for protocol selection, as in Istio.
    pub app_protocol: Option<String>,
    pub node_port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub finalizers: Option<IgnoredAny>,
}

/// The parts of a pod-carrying object (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet,
/// Job, CronJob) that the analyzers need. Read loosely: every other field is ignored.
#[derive(Debug, Clone, Default)]
pub struct PodTemplate {
    pub labels: Labels,
    pub service_account: String,
    pub container_ports: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoosePodSpec {
    service_account_name: Option<String>,
    service_account: Option<String>,
    #[serde(default)]
    containers: Vec<LooseContainer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LooseContainer {
    #[serde(default)]
    ports: Vec<LooseContainerPort>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LooseContainerPort {
    container_port: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct LooseTemplateMeta {
    #[serde(default)]
    labels: Labels,
}

#[derive(Debug, Default, Deserialize)]
struct LooseTemplate {
    #[serde(default)]
    metadata: LooseTemplateMeta,
    #[serde(default)]
    spec: LoosePodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LooseWorkloadSpec {
    template: Option<LooseTemplate>,
    job_template: Option<LooseJobTemplate>,
}

#[derive(Debug, Default, Deserialize)]
struct LooseJobTemplate {
    #[serde(default)]
    spec: LooseJobSpec,
}

#[derive(Debug, Default, Deserialize)]
struct LooseJobSpec {
    template: Option<LooseTemplate>,
}

impl PodTemplate {
    fn from_parts(labels: Labels, spec: LoosePodSpec) -> Self {
        PodTemplate {
            labels,
            service_account: spec
                .service_account_name
                .or(spec.service_account)
                .unwrap_or_else(|| "default".to_string()),
            container_ports: spec
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().filter_map(|p| p.container_port))
                .collect(),
        }
    }
}

/// Kinds whose objects run pods.
pub const POD_KINDS: [&str; 7] = [
    "Pod",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
];

/// Reads the pod template of a pod-carrying object. `meta` is the object's metadata (a
/// Pod's own labels are its pod labels).
pub fn pod_template(
    kind: &str,
    meta: &ObjectMeta,
    spec: &crate::yaml::Node,
) -> Result<PodTemplate, crate::de::DeError> {
    let path = crate::de::Path::Key("spec", &crate::de::Path::Root);
    if kind == "Pod" {
        let spec: LoosePodSpec = crate::de::from_node_at(spec, &path)?;
        return Ok(PodTemplate::from_parts(meta.labels.clone(), spec));
    }
    let spec: LooseWorkloadSpec = crate::de::from_node_at(spec, &path)?;
    let template = spec
        .template
        .or(spec.job_template.and_then(|j| j.spec.template))
        .unwrap_or_default();
    Ok(PodTemplate::from_parts(
        template.metadata.labels,
        template.spec,
    ))
}

/// A Secret, read loosely: analyzers only need to know that a TLS credential exists.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretInfo {
    #[serde(rename = "type", default)]
    pub secret_type: String,
}
