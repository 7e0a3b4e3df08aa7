//! The mesh-wide settings file of the control plane, in the shape of Istio's `meshConfig`
//! (what `istioctl install --set meshConfig…` or the `istio` ConfigMap's `mesh` key
//! hold): the root namespace, the trust domain, the outbound traffic policy, gateways'
//! trusted proxies, and the telemetry providers that Telemetry resources name.
//!
//! Istio's meshConfig has many more fields. Those Trellis does not use are not errors:
//! [`load_mesh_config`] names them in its warnings, so that a file written for Istio loads.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::common::Duration;
use crate::yaml::{Node, Value};

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigFile {
    /// Where mesh-wide policies live (default `istio-system`).
    pub root_namespace: Option<String>,
    /// The SPIFFE trust domain (default `cluster.local`).
    pub trust_domain: Option<String>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    pub default_config: Option<ProxyDefaults>,
    /// Tracing on or off mesh-wide (Istio's default: on).
    pub enable_tracing: Option<bool>,
    pub default_providers: Option<DefaultProviders>,
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    /// Istio's simple access log switch: a path (`/dev/stdout`) turns logs on for every
    /// proxy, without a Telemetry resource.
    pub access_log_file: Option<String>,
    /// `JSON` or `TEXT` (default `TEXT`).
    pub access_log_encoding: Option<String>,
    pub access_log_format: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// `ALLOW_ANY` (default) or `REGISTRY_ONLY`.
    pub mode: Option<String>,
}

/// `defaultConfig`: Istio's ProxyConfig defaults (the fields Trellis uses).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyDefaults {
    pub gateway_topology: Option<GatewayTopology>,
    pub tracing: Option<ProxyTracing>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayTopology {
    pub num_trusted_proxies: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxyTracing {
    /// Percentage of requests traced when nothing else says (Istio's default: 1).
    pub sampling: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DefaultProviders {
    #[serde(default)]
    pub tracing: Vec<String>,
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub access_logging: Vec<String>,
}

/// One `extensionProviders` entry: a name and one kind.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionProvider {
    pub name: String,
    pub zipkin: Option<TracingService>,
    pub opentelemetry: Option<TracingService>,
    pub envoy_file_access_log: Option<FileAccessLog>,
    pub prometheus: Option<BTreeMap<String, serde_json::Value>>,
    pub envoy_ext_authz_http: Option<ExtAuthz>,
    pub envoy_ext_authz_grpc: Option<ExtAuthz>,
    /// Kinds Trellis does not run (skywalking, datadog, stackdriver, lightstep, the
    /// Envoy ALS kinds…): named so that they can be reported.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// A tracing collector: Zipkin (v2 JSON) or OpenTelemetry (OTLP).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TracingService {
    pub service: String,
    pub port: u32,
    pub max_tag_length: Option<u32>,
    /// OpenTelemetry over HTTP (`/v1/traces`) rather than gRPC.
    pub http: Option<OtelHttp>,
    /// OpenTelemetry over gRPC (the default without `http`): its timeout.
    pub grpc: Option<OtelGrpc>,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OtelGrpc {
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub initial_metadata: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OtelHttp {
    pub path: Option<String>,
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub headers: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileAccessLog {
    pub path: Option<String>,
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LogFormat {
    pub text: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExtAuthz {
    pub service: String,
    pub port: u32,
    pub timeout: Option<Duration>,
    pub path_prefix: Option<String>,
    pub fail_open: Option<bool>,
}

impl ExtensionProvider {
    /// The kind this entry defines (`zipkin`, `opentelemetry`…), or why it defines none
    /// Trellis can use.
    pub fn kind(&self) -> Result<&'static str, String> {
        let mut kinds = Vec::new();
        if self.zipkin.is_some() {
            kinds.push("zipkin");
        }
        if self.opentelemetry.is_some() {
            kinds.push("opentelemetry");
        }
        if self.envoy_file_access_log.is_some() {
            kinds.push("envoyFileAccessLog");
        }
        if self.prometheus.is_some() {
            kinds.push("prometheus");
        }
        if self.envoy_ext_authz_http.is_some() {
            kinds.push("envoyExtAuthzHttp");
        }
        if self.envoy_ext_authz_grpc.is_some() {
            kinds.push("envoyExtAuthzGrpc");
        }
        match (kinds.as_slice(), self.other.keys().next()) {
            ([one], None) => Ok(one),
            ([], Some(other)) => Err(format!(
                "extension provider {:?}: {other} is not supported by Trellis",
                self.name
            )),
            ([], None) => Err(format!(
                "extension provider {:?} defines no provider",
                self.name
            )),
            _ => Err(format!(
                "extension provider {:?} defines more than one provider",
                self.name
            )),
        }
    }
}

/// Keys of `node` (a mapping) not in `known`.
fn unknown_keys(node: &Node, known: &[&str], at: &str, out: &mut Vec<String>) {
    if let Value::Map(entries) = &node.value {
        for (k, _) in entries {
            if !known.contains(&k.text.as_str()) {
                out.push(format!("{at}{}: not used by Trellis (ignored)", k.text));
            }
        }
    }
}

/// Reads a mesh config file's text: the settings and warnings (fields Trellis ignores,
/// providers it cannot run). A syntax error, a field of the wrong type, two providers of
/// one name or a default provider that is not defined is an error, with its place.
pub fn parse_mesh_config(text: &str, file: &str) -> Result<(MeshConfigFile, Vec<String>), String> {
    let docs = crate::yaml::parse_documents(text);
    let node = match docs.as_slice() {
        [] => return Ok((MeshConfigFile::default(), Vec::new())),
        [d] => d.result.as_ref().map_err(|e| format!("{file}: {e}"))?,
        _ => return Err(format!("{file}: one YAML document expected")),
    };
    let mesh: MeshConfigFile = crate::de::from_node(node).map_err(|e| {
        let at = e
            .mark
            .map(|m| format!(":{}:{}", m.line, m.col))
            .unwrap_or_default();
        format!("{file}{at}: {e}")
    })?;
    let mut warnings = Vec::new();
    unknown_keys(
        node,
        &[
            "rootNamespace",
            "trustDomain",
            "outboundTrafficPolicy",
            "defaultConfig",
            "enableTracing",
            "defaultProviders",
            "extensionProviders",
            "accessLogFile",
            "accessLogEncoding",
            "accessLogFormat",
        ],
        "",
        &mut warnings,
    );
    if let Some(d) = node.get("defaultConfig") {
        unknown_keys(
            d,
            &["gatewayTopology", "tracing"],
            "defaultConfig.",
            &mut warnings,
        );
    }
    let mut names = std::collections::BTreeSet::new();
    for p in &mesh.extension_providers {
        if !names.insert(p.name.as_str()) {
            return Err(format!(
                "{file}: extensionProviders: {:?} is defined twice",
                p.name
            ));
        }
        if let Err(e) = p.kind() {
            warnings.push(e);
        }
    }
    if let Some(d) = &mesh.default_providers {
        for n in d.tracing.iter().chain(&d.metrics).chain(&d.access_logging) {
            // Istio's built-in providers need no definition.
            if !names.contains(n.as_str()) && !matches!(n.as_str(), "prometheus" | "envoy") {
                return Err(format!(
                    "{file}: defaultProviders names {n:?}, which extensionProviders does not define"
                ));
            }
        }
    }
    if let Some(m) = mesh
        .outbound_traffic_policy
        .as_ref()
        .and_then(|o| o.mode.as_deref())
    {
        if !matches!(m, "ALLOW_ANY" | "REGISTRY_ONLY") {
            return Err(format!(
                "{file}: outboundTrafficPolicy.mode {m:?}: ALLOW_ANY or REGISTRY_ONLY"
            ));
        }
    }
    if let Some(e) = mesh.access_log_encoding.as_deref() {
        if !matches!(e, "JSON" | "TEXT") {
            return Err(format!("{file}: accessLogEncoding {e:?}: JSON or TEXT"));
        }
    }
    Ok((mesh, warnings))
}

/// Reads a mesh config file (see [`parse_mesh_config`]).
pub fn load_mesh_config(path: &std::path::Path) -> Result<(MeshConfigFile, Vec<String>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_mesh_config(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_STYLE: &str = r#"
rootNamespace: mesh-root
trustDomain: example.org
outboundTrafficPolicy: {mode: REGISTRY_ONLY}
enableTracing: true
defaultConfig:
  gatewayTopology: {numTrustedProxies: 2}
  tracing: {sampling: 10}
  holdApplicationUntilProxyStarts: true
defaultProviders:
  tracing: [otel]
  accessLogging: [envoy]
extensionProviders:
- name: otel
  opentelemetry:
    service: otel-collector.observability.svc.cluster.local
    port: 4318
    http: {path: /v1/traces, timeout: 5s}
- name: zipkin
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
- name: json-log
  envoyFileAccessLog:
    path: /dev/stdout
    logFormat: {labels: {code: "%RESPONSE_CODE%"}}
- name: authz
  envoyExtAuthzHttp: {service: authz.shop.svc.cluster.local, port: 8000, timeout: 1s}
- name: sky
  skywalking: {service: sky, port: 11800}
accessLogFile: /dev/stdout
accessLogEncoding: JSON
enablePrometheusMerge: true
"#;

    #[test]
    fn an_istio_mesh_config_loads_and_names_what_trellis_ignores() {
        let (m, warnings) = parse_mesh_config(ISTIO_STYLE, "mesh.yaml").expect("loads");
        assert_eq!(m.root_namespace.as_deref(), Some("mesh-root"));
        assert_eq!(m.trust_domain.as_deref(), Some("example.org"));
        assert_eq!(
            m.default_config
                .as_ref()
                .and_then(|d| d.gateway_topology.as_ref())
                .and_then(|g| g.num_trusted_proxies),
            Some(2)
        );
        let kinds: Vec<Result<&str, String>> = m
            .extension_providers
            .iter()
            .map(ExtensionProvider::kind)
            .collect();
        assert_eq!(kinds[0], Ok("opentelemetry"));
        assert_eq!(kinds[1], Ok("zipkin"));
        assert_eq!(kinds[2], Ok("envoyFileAccessLog"));
        assert_eq!(kinds[3], Ok("envoyExtAuthzHttp"));
        assert!(kinds[4].as_ref().is_err_and(|e| e.contains("skywalking")));
        assert_eq!(
            m.extension_providers[0]
                .opentelemetry
                .as_ref()
                .and_then(|o| o.http.as_ref())
                .and_then(|h| h.path.as_deref()),
            Some("/v1/traces")
        );
        assert_eq!(
            warnings,
            [
                "enablePrometheusMerge: not used by Trellis (ignored)",
                "defaultConfig.holdApplicationUntilProxyStarts: not used by Trellis (ignored)",
                "extension provider \"sky\": skywalking is not supported by Trellis",
            ]
        );
    }

    #[test]
    fn bad_mesh_configs_are_refused_with_the_reason() {
        let e = parse_mesh_config("trustDomain: [a]\n", "m.yaml").expect_err("type");
        assert!(e.starts_with("m.yaml:1:"), "{e}");
        let e = parse_mesh_config("defaultProviders: {tracing: [nope]}\n", "m.yaml")
            .expect_err("undefined provider");
        assert!(e.contains("\"nope\""), "{e}");
        let e = parse_mesh_config(
            "extensionProviders:\n- {name: a, prometheus: {}}\n- {name: a, prometheus: {}}\n",
            "m.yaml",
        )
        .expect_err("twice");
        assert!(e.contains("defined twice"), "{e}");
        let e = parse_mesh_config("outboundTrafficPolicy: {mode: SOMETIMES}\n", "m.yaml")
            .expect_err("mode");
        assert!(e.contains("SOMETIMES"), "{e}");
        // Empty: all defaults.
        assert_eq!(
            parse_mesh_config("", "m.yaml").expect("empty").0,
            MeshConfigFile::default()
        );
    }
}
