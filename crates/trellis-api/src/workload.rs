//! `Workload` (apiVersion `trellis.dev/v1alpha1`): a process that the local runtime
//! (`trellis up`) runs in its own network namespace beside a sidecar.
//!
//! ```yaml
//! apiVersion: trellis.dev/v1alpha1
//! kind: Workload
//! metadata:
//!   name: reviews-v1
//!   labels: {app: reviews, version: v1}
//! spec:
//!   serviceAccount: bookinfo-reviews
//!   replicas: 2
//!   command: ["python3", "-m", "http.server", "9080"]
//!   env: [{name: GREETING, value: hello}]
//!   ports: [{name: http, port: 9080}]
//!   readinessProbe: {httpGet: {path: /, port: 9080}}
//! ```
//!
//! A gateway is a Workload that runs Trellis's gateway proxy instead of an app and a
//! sidecar (`gateway: true`, no command); a port's `hostPort` is forwarded from the
//! machine's loopback:
//!
//! ```yaml
//! kind: Workload
//! metadata: {name: ingressgateway, labels: {istio: ingressgateway}}
//! spec:
//!   gateway: true
//!   ports: [{name: http, port: 8080, hostPort: 8080}]
//! ```

use serde::Deserialize;

use crate::common::Protocol;
use crate::networking::ReadinessProbe;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Identity of the workload (`spiffe://<td>/ns/<ns>/sa/<serviceAccount>`); defaults to
    /// `default` as in Kubernetes.
    pub service_account: Option<String>,
    /// How many instances (pods) to run; default 1.
    pub replicas: Option<u32>,
    /// Program and arguments, as a Kubernetes container's `command` (none for a gateway).
    #[serde(default)]
    pub command: Vec<String>,
    /// Run Trellis's gateway proxy (serving the Gateways that select this Workload's
    /// labels on its `ports`) instead of an app and a sidecar.
    #[serde(default)]
    pub gateway: bool,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    pub working_dir: Option<String>,
    /// Ports the application listens on; inbound traffic to them is intercepted.
    #[serde(default)]
    pub ports: Vec<WorkloadPort>,
    pub readiness_probe: Option<ReadinessProbe>,
}

impl WorkloadSpec {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or("default")
    }

    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(1)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadPort {
    pub name: Option<String>,
    pub port: u32,
    /// Forwarded from this port on the machine's loopback (`trellis up`), as a Kubernetes
    /// container's `hostPort`.
    pub host_port: Option<u32>,
    /// Application protocol; when absent it is taken from the port name prefix
    /// (`http-…`, `grpc-…`) as in Istio, else detected.
    pub protocol: Option<Protocol>,
}
