//! The proxy snapshot model (wire form).
//!
//! ```yaml
//! version: "7"
//! workload:
//!   name: reviews-v1
//!   namespace: default
//!   labels: {app: reviews, version: v1}
//!   serviceAccount: reviews
//!   addresses: [10.44.0.5]
//!   inboundPorts:
//!   - {port: 9080, protocol: HTTP}
//! outboundTrafficPolicy: ALLOW_ANY
//! services:
//! - hostname: ratings.default.svc.cluster.local
//!   addresses: [240.240.0.3]
//!   ports:
//!   - {port: 9080, name: http, cluster: "outbound|9080||ratings.default.svc.cluster.local"}
//! clusters:
//! - name: "outbound|9080||ratings.default.svc.cluster.local"
//!   endpoints:
//!   - {address: "10.44.0.7:9080", proxied: true, identity: "spiffe://cluster.local/ns/default/sa/ratings"}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_api::common::{Duration, Protocol};
use trellis_api::de::DeError;
use trellis_api::yaml;

/// A whole proxy configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// Opaque version, reported in logs, `/config_dump` and metrics.
    #[serde(default)]
    pub version: String,
    pub workload: Option<Workload>,
    /// What happens to outbound traffic for destinations not in `services`.
    #[serde(default)]
    pub outbound_traffic_policy: OutboundPolicy,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    #[serde(default)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Unknown destinations pass through to where the app meant to go.
    #[default]
    AllowAny,
    /// Unknown destinations are refused (BlackHoleCluster).
    RegistryOnly,
}

/// The workload this proxy sits beside.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    /// The pod's own addresses (apps that bind them rather than 127.0.0.1).
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub inbound_ports: Vec<InboundPort>,
}

fn default_namespace() -> String {
    "default".to_string()
}

fn default_sa() -> String {
    "default".to_string()
}

/// A port the app listens on; inbound traffic to it is intercepted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    pub port: u32,
    /// Port the app really listens on, when it differs (default: `port`).
    pub target_port: Option<u32>,
    pub name: Option<String>,
    pub protocol: Option<Protocol>,
    pub app_protocol: Option<String>,
}

/// A service the proxy may send to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Fully qualified name, e.g. `reviews.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs the app's connections are addressed to.
    #[serde(default)]
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u32,
    /// Port name: its prefix declares the protocol as in Istio (`http-…`, `grpc-…`).
    pub name: Option<String>,
    pub protocol: Option<Protocol>,
    /// Kubernetes appProtocol; wins over the name.
    pub app_protocol: Option<String>,
    /// The cluster traffic to this port goes to (routing rules arrive with the traffic
    /// management work).
    pub cluster: String,
}

/// A set of endpoints traffic can be balanced over: service + subset + port.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    pub connect_timeout: Option<Duration>,
    /// How long an idle upstream connection is kept (default 3 s, shorter than common app
    /// keep-alive timeouts so a reused connection never meets a server-side close).
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`.
    pub address: String,
    /// Whether a Trellis proxy fronts this endpoint (HTTP then travels as HTTP/2 between
    /// the proxies).
    #[serde(default)]
    pub proxied: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// SPIFFE identity of the endpoint's workload.
    pub identity: Option<String>,
    #[serde(default = "yes")]
    pub healthy: bool,
    pub locality: Option<String>,
    pub weight: Option<u32>,
}

fn yes() -> bool {
    true
}

/// Proxy-wide settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// How long to wait for a client's first bytes to tell its protocol (default 100ms).
    pub protocol_detection_timeout: Option<Duration>,
    /// Largest request head accepted (default 60 KiB); larger gets 431.
    pub max_request_header_bytes: Option<u32>,
    /// Time allowed to receive a request head (default 10s); slower clients are closed.
    pub request_header_timeout: Option<Duration>,
    /// Default upstream connect timeout (default 5s).
    pub connect_timeout: Option<Duration>,
}

/// Why a snapshot file did not load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl std::error::Error for LoadError {}

impl Snapshot {
    /// Parses a snapshot from YAML or JSON text; errors name the line, column and field.
    pub fn from_text(text: &str, file: &str) -> Result<Snapshot, LoadError> {
        let mut docs = yaml::parse_documents(text);
        let fail = |line, col, message: String| LoadError {
            file: file.to_string(),
            line,
            col,
            message,
        };
        if docs.len() != 1 {
            return Err(fail(
                1,
                1,
                format!("expected one snapshot document, found {}", docs.len()),
            ));
        }
        let node = docs.remove(0).result.map_err(|e| {
            fail(
                e.mark.line,
                e.mark.col,
                format!("YAML syntax error: {}", e.message),
            )
        })?;
        trellis_api::de::from_node::<Snapshot>(&node).map_err(|e: DeError| {
            let mark = e.mark.unwrap_or(node.mark);
            fail(mark.line, mark.col, e.to_string())
        })
    }
}

impl Snapshot {
    /// The snapshot as JSON for `/config_dump`. Nothing in the model is secret yet; when
    /// keys or tokens join it, they are redacted here.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}
