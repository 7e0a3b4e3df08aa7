//! The proxy snapshot model, as it travels: protobuf on the wire
//! (`proto/trellis/snapshot/v1/snapshot.proto`, prost derives below) and YAML or JSON
//! in files (serde derives below, with located errors). One set of types serves both, so
//! the two forms cannot drift; `tests/proto_fresh.rs` checks them against the `.proto`.
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
//!
//! Conversion to the proxy's domain types (and the checks that go with it) happens in the
//! proxy, at the edge; these types only describe the shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_api::de::DeError;
use trellis_api::yaml;

/// A whole proxy configuration.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Snapshot {
    /// Opaque version, reported in logs, `/config_dump` and metrics.
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(message, optional, tag = "2")]
    pub workload: Option<Workload>,
    /// What happens to outbound traffic for destinations not in `services`.
    #[prost(enumeration = "OutboundPolicy", tag = "3")]
    #[serde(with = "outbound_policy")]
    pub outbound_traffic_policy: i32,
    #[prost(message, repeated, tag = "4")]
    pub services: Vec<Service>,
    #[prost(message, repeated, tag = "5")]
    pub clusters: Vec<Cluster>,
    #[prost(message, optional, tag = "6")]
    pub settings: Option<Settings>,
    /// Gateway mode: the ports this proxy serves as an ingress or egress gateway.
    #[prost(message, repeated, tag = "7")]
    #[serde(default)]
    pub gateway_ports: Vec<GatewayPort>,
    /// The mesh's trust bundle: the root certificates (PEM) peers' certificates must chain
    /// to. More than one while a root is being rotated.
    #[prost(string, repeated, tag = "8")]
    #[serde(default)]
    pub trust_roots: Vec<String>,
    /// The mesh's instances, by address: who a caller is, for telemetry labels, when it is
    /// no endpoint of a service in view (a client only, say).
    #[prost(message, repeated, tag = "9")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<Peer>,
}

/// One port of a gateway: the Istio Gateway servers that share it.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayPort {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    /// Address to listen on (a server's `bind`); all addresses when unset.
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub bind: Option<String>,
    #[prost(message, repeated, tag = "3")]
    #[serde(default)]
    pub servers: Vec<GatewayServer>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayServer {
    /// The Gateway, as "namespace/name" (what VirtualService `gateways:` names).
    #[prost(string, tag = "1")]
    pub gateway: String,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub name: Option<String>,
    /// HTTP, HTTPS (TLS terminated here), TLS (passthrough, routed by SNI) or TCP.
    #[prost(enumeration = "Protocol", tag = "3")]
    #[serde(with = "protocol_req")]
    pub protocol: i32,
    /// Host names the server answers ("*", "*.example.com", "shop.example.com").
    #[prost(string, repeated, tag = "4")]
    pub hosts: Vec<String>,
    #[prost(message, optional, tag = "5")]
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Routes of the VirtualServices bound to this server, per host.
    #[prost(message, repeated, tag = "6")]
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    #[prost(enumeration = "ServerTlsMode", tag = "1")]
    #[serde(default, with = "server_tls_mode")]
    pub mode: i32,
    /// On an HTTP server: answer every request with a 301 to https.
    #[prost(bool, tag = "2")]
    #[serde(default)]
    pub https_redirect: bool,
    /// Certificate files in `<credentials dir>/<name>/` (tls.crt, tls.key, ca.crt).
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub credential_name: Option<String>,
    /// Or the PEM files themselves.
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[prost(string, optional, tag = "5")]
    #[serde(default)]
    pub private_key: Option<String>,
    #[prost(string, optional, tag = "6")]
    #[serde(default)]
    pub ca_certificates: Option<String>,
}

/// Istio's server TLS modes (`Gateway.spec.servers[].tls.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServerTlsMode {
    Passthrough = 0,
    Simple = 1,
    Mutual = 2,
    AutoPassthrough = 3,
    IstioMutual = 4,
    OptionalMutual = 5,
}

impl ServerTlsMode {
    pub const ALL: [ServerTlsMode; 6] = [
        ServerTlsMode::Passthrough,
        ServerTlsMode::Simple,
        ServerTlsMode::Mutual,
        ServerTlsMode::AutoPassthrough,
        ServerTlsMode::IstioMutual,
        ServerTlsMode::OptionalMutual,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServerTlsMode::Passthrough => "PASSTHROUGH",
            ServerTlsMode::Simple => "SIMPLE",
            ServerTlsMode::Mutual => "MUTUAL",
            ServerTlsMode::AutoPassthrough => "AUTO_PASSTHROUGH",
            ServerTlsMode::IstioMutual => "ISTIO_MUTUAL",
            ServerTlsMode::OptionalMutual => "OPTIONAL_MUTUAL",
        }
    }
}

/// Host names and their routes (one VirtualService bound to a gateway server).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualHost {
    /// The VirtualService, as "namespace/name" (for logs).
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub domains: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    #[serde(default)]
    pub http_routes: Vec<HttpRoute>,
    /// On TCP servers.
    #[prost(message, repeated, tag = "4")]
    #[serde(default)]
    pub tcp_routes: Vec<L4Route>,
    /// On TLS passthrough servers, by SNI.
    #[prost(message, repeated, tag = "5")]
    #[serde(default)]
    pub tls_routes: Vec<L4Route>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum OutboundPolicy {
    /// Unknown destinations pass through to where the app meant to go.
    AllowAny = 0,
    /// Unknown destinations are refused (BlackHoleCluster).
    RegistryOnly = 1,
}

impl OutboundPolicy {
    pub fn name(self) -> &'static str {
        match self {
            OutboundPolicy::AllowAny => "ALLOW_ANY",
            OutboundPolicy::RegistryOnly => "REGISTRY_ONLY",
        }
    }
}

/// Application protocols on the wire (Istio's names; see `trellis_api::common::Protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Protocol {
    Unspecified = 0,
    Http = 1,
    Https = 2,
    Http2 = 3,
    Grpc = 4,
    GrpcWeb = 5,
    HttpProxy = 6,
    Tcp = 7,
    Tls = 8,
    Udp = 9,
    Mongo = 10,
    Redis = 11,
    Mysql = 12,
    Hbone = 13,
}

impl Protocol {
    /// The configuration API's protocol, `None` for `Unspecified`.
    pub fn to_api(self) -> Option<trellis_api::common::Protocol> {
        use trellis_api::common::Protocol as P;
        Some(match self {
            Protocol::Unspecified => return None,
            Protocol::Http => P::Http,
            Protocol::Https => P::Https,
            Protocol::Http2 => P::Http2,
            Protocol::Grpc => P::Grpc,
            Protocol::GrpcWeb => P::GrpcWeb,
            Protocol::HttpProxy => P::HttpProxy,
            Protocol::Tcp => P::Tcp,
            Protocol::Tls => P::Tls,
            Protocol::Udp => P::Udp,
            Protocol::Mongo => P::Mongo,
            Protocol::Redis => P::Redis,
            Protocol::Mysql => P::Mysql,
            Protocol::Hbone => P::Hbone,
        })
    }

    pub fn from_api(p: trellis_api::common::Protocol) -> Protocol {
        use trellis_api::common::Protocol as P;
        match p {
            P::Http => Protocol::Http,
            P::Https => Protocol::Https,
            P::Http2 => Protocol::Http2,
            P::Grpc => Protocol::Grpc,
            P::GrpcWeb => Protocol::GrpcWeb,
            P::HttpProxy => Protocol::HttpProxy,
            P::Tcp => Protocol::Tcp,
            P::Tls => Protocol::Tls,
            P::Udp => Protocol::Udp,
            P::Mongo => Protocol::Mongo,
            P::Redis => Protocol::Redis,
            P::Mysql => Protocol::Mysql,
            P::Hbone => Protocol::Hbone,
        }
    }
}

/// The workload this proxy sits beside.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Empty means `default`.
    #[prost(string, tag = "2")]
    #[serde(default)]
    pub namespace: String,
    #[prost(btree_map = "string, string", tag = "3")]
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Empty means `default`.
    #[prost(string, tag = "4")]
    #[serde(default)]
    pub service_account: String,
    /// The pod's own addresses (apps that bind them rather than 127.0.0.1).
    #[prost(string, repeated, tag = "5")]
    #[serde(default)]
    pub addresses: Vec<String>,
    #[prost(message, repeated, tag = "6")]
    #[serde(default)]
    pub inbound_ports: Vec<InboundPort>,
    /// "region/zone/subzone": where this workload runs (locality-aware load balancing).
    #[prost(string, optional, tag = "7")]
    #[serde(default)]
    pub locality: Option<String>,
    /// PeerAuthentication, resolved by the control plane: what inbound connections must be.
    #[prost(enumeration = "PeerMtls", tag = "8")]
    #[serde(default, with = "peer_mtls")]
    pub mtls: i32,
    /// Per workload port, where a PeerAuthentication's portLevelMtls says otherwise.
    #[prost(btree_map = "uint32, enumeration(PeerMtls)", tag = "9")]
    #[serde(default, with = "peer_mtls_map")]
    pub port_mtls: BTreeMap<u32, i32>,
    /// The AuthorizationPolicies that apply to this workload (mesh-wide, namespace,
    /// selected).
    #[prost(message, repeated, tag = "10")]
    #[serde(default)]
    pub authorization: Vec<AuthzPolicy>,
    /// The RequestAuthentication jwtRules that apply to this workload.
    #[prost(message, repeated, tag = "11")]
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
    /// The Telemetry that applies to this workload (mesh-wide, namespace and selected
    /// resources merged by the control plane).
    #[prost(message, optional, tag = "12")]
    #[serde(default)]
    pub telemetry: Option<Telemetry>,
    /// The workload this instance is a replica of (its Deployment, WorkloadGroup…), for
    /// telemetry labels; `name` is the instance. Empty: `name`.
    #[prost(string, tag = "13")]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
}

/// An instance of the mesh at an address (see [`Snapshot::peers`]).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[prost(string, tag = "1")]
    pub address: String,
    /// The workload it is an instance of.
    #[prost(string, tag = "2")]
    pub workload: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    /// Its SPIFFE identity (absent: no Trellis proxy).
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub identity: Option<String>,
    #[prost(btree_map = "string, string", tag = "5")]
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The instance (`reviews-v1-0`): with the namespace, what names its resource.
    #[prost(string, tag = "6")]
    #[serde(default)]
    pub instance: String,
}

/// Telemetry (Istio's Telemetry API) as it applies to one workload. Modes are
/// `CLIENT_AND_SERVER`, `CLIENT` (outbound) or `SERVER` (inbound).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Telemetry {
    /// "namespace/name" of the Telemetry resources merged, mesh-wide first.
    #[prost(string, repeated, tag = "1")]
    #[serde(default)]
    pub sources: Vec<String>,
    /// One per mode the resources distinguish (at most CLIENT and SERVER).
    #[prost(message, repeated, tag = "2")]
    #[serde(default)]
    pub tracing: Vec<TracingConfig>,
    #[prost(message, optional, tag = "3")]
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// One per mode the resources distinguish (at most CLIENT and SERVER).
    #[prost(message, repeated, tag = "4")]
    #[serde(default)]
    pub access_logging: Vec<AccessLogConfig>,
    /// The providers the entries name, from the mesh config's extensionProviders.
    #[prost(message, repeated, tag = "5")]
    #[serde(default)]
    pub providers: Vec<TelemetryProvider>,
}

/// A telemetry provider: where spans or access logs go.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetryProvider {
    #[prost(string, tag = "1")]
    pub name: String,
    /// `zipkin`, `opentelemetry`, `envoyFileAccessLog`, `prometheus` (or `envoy`: the
    /// built-in access log).
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(string, tag = "3")]
    #[serde(default)]
    pub service: String,
    #[prost(uint32, tag = "4")]
    #[serde(default)]
    pub port: u32,
    /// An OTLP/HTTP path, or a log file's path.
    #[prost(string, optional, tag = "5")]
    #[serde(default)]
    pub path: Option<String>,
    #[prost(message, optional, tag = "6")]
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<prost_types::Duration>,
    /// A log's text format (Envoy's command operators).
    #[prost(string, optional, tag = "7")]
    #[serde(default)]
    pub log_format: Option<String>,
    /// A JSON log's fields (name → command operator).
    #[prost(btree_map = "string, string", tag = "8")]
    #[serde(default)]
    pub log_labels: BTreeMap<String, String>,
    #[prost(uint32, optional, tag = "9")]
    #[serde(default)]
    pub max_tag_length: Option<u32>,
    /// OTLP over gRPC (`opentelemetry.proto.collector.trace.v1.TraceService/Export`, h2c)
    /// rather than OTLP/HTTP: Istio's default for an `opentelemetry` provider without
    /// `http`.
    #[prost(bool, tag = "10")]
    #[serde(default)]
    pub grpc: bool,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingConfig {
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub mode: String,
    #[prost(string, repeated, tag = "2")]
    #[serde(default)]
    pub providers: Vec<String>,
    #[prost(double, optional, tag = "3")]
    #[serde(default)]
    pub random_sampling_percentage: Option<f64>,
    #[prost(bool, optional, tag = "4")]
    #[serde(default)]
    pub disable_span_reporting: Option<bool>,
    #[prost(btree_map = "string, message", tag = "5")]
    #[serde(default)]
    pub custom_tags: BTreeMap<String, TracingTag>,
    #[prost(bool, optional, tag = "6")]
    #[serde(default)]
    pub use_request_id_for_trace_sampling: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    #[serde(default)]
    pub enable_istio_tags: Option<bool>,
    #[prost(bool, optional, tag = "8")]
    #[serde(default)]
    pub disable_context_propagation: Option<bool>,
}

/// A span tag: a literal, an environment variable or a request header (with a default).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingTag {
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub literal: Option<String>,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub environment: Option<String>,
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub header: Option<String>,
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub default_value: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricsConfig {
    #[prost(string, repeated, tag = "1")]
    #[serde(default)]
    pub providers: Vec<String>,
    /// In the order they apply (mesh-wide first; a later one wins).
    #[prost(message, repeated, tag = "2")]
    #[serde(default)]
    pub overrides: Vec<MetricOverride>,
    #[prost(message, optional, tag = "3")]
    #[serde(default, with = "duration_opt")]
    pub reporting_interval: Option<prost_types::Duration>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetricOverride {
    /// `ALL_METRICS`, `REQUEST_COUNT`… or a custom metric's name.
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub metric: String,
    #[prost(string, tag = "2")]
    #[serde(default)]
    pub mode: String,
    #[prost(bool, optional, tag = "3")]
    #[serde(default)]
    pub disabled: Option<bool>,
    #[prost(btree_map = "string, message", tag = "4")]
    #[serde(default)]
    pub tag_overrides: BTreeMap<String, TagOverride>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TagOverride {
    #[prost(bool, tag = "1")]
    #[serde(default)]
    pub remove: bool,
    /// The value (an expression of request attributes) for UPSERT.
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogConfig {
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub mode: String,
    #[prost(string, repeated, tag = "2")]
    #[serde(default)]
    pub providers: Vec<String>,
    #[prost(bool, optional, tag = "3")]
    #[serde(default)]
    pub disabled: Option<bool>,
    /// A CEL filter expression (`response.code >= 400`).
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub filter: Option<String>,
}
/// A RequestAuthentication jwtRule that applies to this workload (selected like
/// AuthorizationPolicies).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// "namespace/name" of the RequestAuthentication.
    #[prost(string, tag = "1")]
    pub policy: String,
    #[prost(string, tag = "2")]
    pub issuer: String,
    #[prost(string, repeated, tag = "3")]
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The JWKS document itself, or where to fetch it.
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub jwks: Option<String>,
    #[prost(string, optional, tag = "5")]
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[prost(message, repeated, tag = "6")]
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[prost(string, repeated, tag = "7")]
    #[serde(default)]
    pub from_params: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[prost(bool, tag = "9")]
    #[serde(default)]
    pub forward_original_token: bool,
    #[prost(string, optional, tag = "10")]
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[prost(message, repeated, tag = "11")]
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long a request waits for the JWKS to be fetched (default 5s).
    #[prost(message, optional, tag = "12")]
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<prost_types::Duration>,
    /// Claims whose string value is a space-delimited list, matched item by item
    /// (`scope` and `permission` always are), as `a.b` for nested claims.
    #[prost(string, repeated, tag = "13")]
    #[serde(default)]
    pub space_delimited_claims: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub prefix: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    #[prost(string, tag = "1")]
    pub header: String,
    #[prost(string, tag = "2")]
    pub claim: String,
}

/// An AuthorizationPolicy that applies to this workload (selected by the control plane), in
/// Istio's shape.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzPolicy {
    /// "namespace/name", for logs and metrics.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "AuthzAction", tag = "2")]
    #[serde(default, with = "authz_action")]
    pub action: i32,
    #[prost(message, repeated, tag = "3")]
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
    /// CUSTOM: the extension provider named.
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub provider: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AuthzAction {
    Allow = 0,
    Deny = 1,
    Audit = 2,
    Custom = 3,
}

impl AuthzAction {
    pub const ALL: [AuthzAction; 4] = [
        AuthzAction::Allow,
        AuthzAction::Deny,
        AuthzAction::Audit,
        AuthzAction::Custom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AuthzAction::Allow => "ALLOW",
            AuthzAction::Deny => "DENY",
            AuthzAction::Audit => "AUDIT",
            AuthzAction::Custom => "CUSTOM",
        }
    }
}

/// A rule: it matches when a `from`, a `to` and every `when` do (an empty list matches).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRule {
    #[prost(message, repeated, tag = "1")]
    #[serde(default)]
    pub from: Vec<AuthzSource>,
    #[prost(message, repeated, tag = "2")]
    #[serde(default)]
    pub to: Vec<AuthzOperation>,
    #[prost(message, repeated, tag = "3")]
    #[serde(default)]
    pub when: Vec<AuthzCondition>,
}

/// Who sends: every field given must match (one of its values), no `not` value may.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSource {
    #[prost(string, repeated, tag = "1")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    #[prost(string, repeated, tag = "9")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "10")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "11")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "12")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
    #[prost(string, repeated, tag = "13")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    #[prost(string, repeated, tag = "14")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<String>,
}

/// What is asked for, as `AuthzSource`.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzOperation {
    #[prost(string, repeated, tag = "1")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[prost(string, repeated, tag = "6")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    #[prost(string, repeated, tag = "7")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[prost(string, repeated, tag = "8")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzCondition {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, repeated, tag = "2")]
    #[serde(default)]
    pub values: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// DestinationRule `trafficPolicy.tls`, for a cluster.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    #[prost(enumeration = "ClientTlsMode", tag = "1")]
    #[serde(default, with = "client_tls_mode")]
    pub mode: i32,
    /// PEM files: the roots to verify the server with (SIMPLE, MUTUAL; unset: the
    /// system's), and the client's certificate chain and key (MUTUAL).
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub private_key: Option<String>,
    /// Or a credential in <credentials dir>/<name>/ (tls.crt, tls.key, ca.crt).
    #[prost(string, optional, tag = "5")]
    #[serde(default)]
    pub credential_name: Option<String>,
    /// The name sent as SNI and checked in the server's certificate (unset: the host).
    #[prost(string, optional, tag = "6")]
    #[serde(default)]
    pub sni: Option<String>,
    /// Names the server's certificate may have instead (any of them).
    #[prost(string, repeated, tag = "7")]
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[prost(bool, tag = "8")]
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ClientTlsMode {
    TlsDisable = 0,
    TlsSimple = 1,
    TlsMutual = 2,
    TlsIstioMutual = 3,
}

impl ClientTlsMode {
    pub const ALL: [ClientTlsMode; 4] = [
        ClientTlsMode::TlsDisable,
        ClientTlsMode::TlsSimple,
        ClientTlsMode::TlsMutual,
        ClientTlsMode::TlsIstioMutual,
    ];

    /// The name in YAML (Istio's: DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL).
    pub fn name(self) -> &'static str {
        match self {
            ClientTlsMode::TlsDisable => "DISABLE",
            ClientTlsMode::TlsSimple => "SIMPLE",
            ClientTlsMode::TlsMutual => "MUTUAL",
            ClientTlsMode::TlsIstioMutual => "ISTIO_MUTUAL",
        }
    }
}

/// Inbound mutual TLS (PeerAuthentication's modes; UNSET is resolved before it gets here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PeerMtls {
    Permissive = 0,
    Strict = 1,
    Disable = 2,
}

impl PeerMtls {
    pub const ALL: [PeerMtls; 3] = [PeerMtls::Permissive, PeerMtls::Strict, PeerMtls::Disable];

    pub fn name(self) -> &'static str {
        match self {
            PeerMtls::Permissive => "PERMISSIVE",
            PeerMtls::Strict => "STRICT",
            PeerMtls::Disable => "DISABLE",
        }
    }
}

mod peer_mtls_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<u32, i32>, s: S) -> Result<S::Ok, S::Error> {
        let named: BTreeMap<u32, &str> = m
            .iter()
            .map(|(k, v)| {
                let mode = super::PeerMtls::try_from(*v).unwrap_or(super::PeerMtls::Permissive);
                (*k, mode.name())
            })
            .collect();
        named.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, i32>, D::Error> {
        let named = BTreeMap::<u32, String>::deserialize(d)?;
        named
            .into_iter()
            .map(|(k, v)| {
                super::PeerMtls::ALL
                    .iter()
                    .find(|m| m.name() == v)
                    .map(|m| (k, *m as i32))
                    .ok_or_else(|| {
                        serde::de::Error::custom(format!(
                            "unknown mTLS mode {v:?} (PERMISSIVE, STRICT or DISABLE)"
                        ))
                    })
            })
            .collect()
    }
}

/// A port the app listens on; inbound traffic to it is intercepted.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundPort {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    /// Port the app really listens on, when it differs (default: `port`).
    #[prost(uint32, optional, tag = "2")]
    #[serde(default)]
    pub target_port: Option<u32>,
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub name: Option<String>,
    #[prost(enumeration = "Protocol", optional, tag = "4")]
    #[serde(default, with = "protocol_opt")]
    pub protocol: Option<i32>,
    #[prost(string, optional, tag = "5")]
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// Local rate limit for HTTP requests to this port (429, flag RL).
    #[prost(message, optional, tag = "6")]
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// A token bucket: `maxTokens` requests at once, refilled with `tokensPerFill` every
/// `fillInterval`.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    #[prost(uint32, tag = "1")]
    pub max_tokens: u32,
    #[prost(uint32, tag = "2")]
    pub tokens_per_fill: u32,
    #[prost(message, optional, tag = "3")]
    #[serde(with = "duration_opt")]
    pub fill_interval: Option<prost_types::Duration>,
}

/// A service the proxy may send to.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Fully qualified name, e.g. `reviews.default.svc.cluster.local`.
    #[prost(string, tag = "1")]
    pub hostname: String,
    /// Virtual IPs the app's connections are addressed to.
    #[prost(string, repeated, tag = "2")]
    #[serde(default)]
    pub addresses: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[prost(uint32, tag = "1")]
    pub port: u32,
    /// Port name: its prefix declares the protocol as in Istio (`http-…`, `grpc-…`).
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub name: Option<String>,
    #[prost(enumeration = "Protocol", optional, tag = "3")]
    #[serde(default, with = "protocol_opt")]
    pub protocol: Option<i32>,
    /// Kubernetes appProtocol; wins over the name.
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// Where traffic goes when the port has no HTTP routes (and TCP traffic always).
    #[prost(string, tag = "5")]
    pub cluster: String,
    /// HTTP routing rules, tried in order (a VirtualService's `http[]` after translation).
    #[prost(message, repeated, tag = "6")]
    #[serde(default)]
    pub http_routes: Vec<HttpRoute>,
    /// Opaque TCP routing (a VirtualService's `tcp[]`); none matching: the default cluster.
    #[prost(message, repeated, tag = "7")]
    #[serde(default)]
    pub tcp_routes: Vec<L4Route>,
    /// TLS passthrough routing by SNI (a VirtualService's `tls[]`); none matching: refused.
    #[prost(message, repeated, tag = "8")]
    #[serde(default)]
    pub tls_routes: Vec<L4Route>,
}

/// A TCP or TLS route.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Route {
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[prost(message, repeated, tag = "3")]
    pub clusters: Vec<WeightedCluster>,
}

/// Conditions on a connection (all must hold); `sniHosts` only for TLS routes.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Match {
    #[prost(string, repeated, tag = "1")]
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    #[prost(uint32, optional, tag = "2")]
    #[serde(default)]
    pub port: Option<u32>,
    #[prost(btree_map = "string, string", tag = "3")]
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[prost(string, repeated, tag = "5")]
    #[serde(default)]
    pub sni_hosts: Vec<String>,
}

/// One HTTP routing rule.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Reported in logs; Istio's `name`, else `#<index>`.
    #[prost(string, tag = "1")]
    #[serde(default)]
    pub name: String,
    /// Alternatives: the rule applies when any entry matches (or when there is none).
    #[prost(message, repeated, tag = "2")]
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[prost(message, repeated, tag = "3")]
    #[serde(default)]
    pub clusters: Vec<WeightedCluster>,
    /// Bounds the whole request, injected delay included; on expiry: 504 (UT).
    #[prost(message, optional, tag = "4")]
    #[serde(default, with = "duration_opt")]
    pub timeout: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "5")]
    #[serde(default)]
    pub fault: Option<Fault>,
    /// Instead of clusters: answer directly.
    #[prost(message, optional, tag = "6")]
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Instead of clusters: redirect.
    #[prost(message, optional, tag = "7")]
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[prost(message, optional, tag = "8")]
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[prost(message, optional, tag = "9")]
    #[serde(default)]
    pub request_headers: Option<HeaderOps>,
    #[prost(message, optional, tag = "10")]
    #[serde(default)]
    pub response_headers: Option<HeaderOps>,
    /// Absent: Istio's default (2 retries on connect-failure, refused-stream,
    /// unavailable, cancelled and 503). `attempts: 0` disables retries.
    #[prost(message, optional, tag = "11")]
    #[serde(default)]
    pub retries: Option<RetryPolicy>,
    /// Copies of requests, sent without waiting (Host gets a `-shadow` suffix).
    #[prost(message, repeated, tag = "12")]
    #[serde(default)]
    pub mirrors: Vec<Mirror>,
    /// Local rate limit for requests this route matches (429, flag RL).
    #[prost(message, optional, tag = "13")]
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[prost(message, optional, tag = "14")]
    #[serde(default)]
    pub cors: Option<CorsPolicy>,
}

/// Istio's `corsPolicy`: preflights from allowed origins are answered by the proxy;
/// actual requests from them get the `Access-Control-Allow-*` response headers.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    #[prost(message, repeated, tag = "1")]
    #[serde(default)]
    pub allow_origins: Vec<StringMatch>,
    #[prost(string, repeated, tag = "2")]
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[prost(string, repeated, tag = "3")]
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    #[serde(default)]
    pub expose_headers: Vec<String>,
    #[prost(message, optional, tag = "5")]
    #[serde(default, with = "duration_opt")]
    pub max_age: Option<prost_types::Duration>,
    #[prost(bool, optional, tag = "6")]
    #[serde(default)]
    pub allow_credentials: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    #[prost(string, tag = "1")]
    pub cluster: String,
    /// Share of requests mirrored, 0..100; absent means all of them.
    #[prost(double, optional, tag = "2")]
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryPolicy {
    #[prost(uint32, tag = "1")]
    #[serde(default)]
    pub attempts: u32,
    #[prost(message, optional, tag = "2")]
    #[serde(default, with = "duration_opt")]
    pub per_try_timeout: Option<prost_types::Duration>,
    /// Istio's `retryOn`: comma-separated conditions and status codes.
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub retry_on: Option<String>,
    /// Base of the exponential backoff with jitter (default 25ms).
    #[prost(message, optional, tag = "4")]
    #[serde(default, with = "duration_opt")]
    pub backoff: Option<prost_types::Duration>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectResponse {
    #[prost(uint32, tag = "1")]
    pub status: u32,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    /// Replaces the path (and query).
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub uri: Option<String>,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub authority: Option<String>,
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub scheme: Option<String>,
    #[prost(uint32, optional, tag = "4")]
    #[serde(default)]
    pub port: Option<u32>,
    /// Default 301.
    #[prost(uint32, optional, tag = "5")]
    #[serde(default)]
    pub redirect_code: Option<u32>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    /// Replaces the matched uri prefix (or the whole path for exact and regex matches).
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub uri: Option<String>,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub authority: Option<String>,
    /// Regex replacement on the path (RE2 pattern; `\\1` groups in the replacement).
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub uri_regex: Option<String>,
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub uri_regex_replacement: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOps {
    #[prost(btree_map = "string, string", tag = "1")]
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[prost(btree_map = "string, string", tag = "2")]
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[prost(string, repeated, tag = "3")]
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Faults injected on purpose (Istio's `HTTPFaultInjection`).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[prost(message, optional, tag = "1")]
    #[serde(default)]
    pub delay: Option<FaultDelay>,
    #[prost(message, optional, tag = "2")]
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    #[prost(message, optional, tag = "1")]
    #[serde(default, with = "duration_opt")]
    pub fixed_delay: Option<prost_types::Duration>,
    /// Share of requests delayed, 0..100; absent means all of them.
    #[prost(double, optional, tag = "2")]
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    /// One of httpStatus or grpcStatus.
    #[prost(uint32, optional, tag = "1")]
    #[serde(default)]
    pub http_status: Option<u32>,
    /// A gRPC status name (`UNAVAILABLE`) or number.
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub grpc_status: Option<String>,
    /// Share of requests aborted, 0..100; absent means all of them.
    #[prost(double, optional, tag = "3")]
    #[serde(default)]
    pub percentage: Option<f64>,
}

/// Conditions that must all hold (Istio's `HTTPMatchRequest`).
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[prost(message, optional, tag = "3")]
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    #[prost(message, optional, tag = "4")]
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[prost(message, optional, tag = "5")]
    #[serde(default)]
    pub authority: Option<StringMatch>,
    #[prost(btree_map = "string, message", tag = "6")]
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[prost(btree_map = "string, message", tag = "7")]
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[prost(btree_map = "string, message", tag = "8")]
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[prost(uint32, optional, tag = "9")]
    #[serde(default)]
    pub port: Option<u32>,
    #[prost(btree_map = "string, string", tag = "10")]
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[prost(string, optional, tag = "11")]
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[prost(bool, tag = "12")]
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// Exactly one of exact, prefix or regex; none means "present" (headers).
#[derive(Clone, PartialEq, Eq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub exact: Option<String>,
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub prefix: Option<String>,
    #[prost(string, optional, tag = "3")]
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedCluster {
    #[prost(string, tag = "1")]
    pub cluster: String,
    /// Relative weight; a single cluster may leave it 0.
    #[prost(uint32, tag = "2")]
    #[serde(default)]
    pub weight: u32,
    /// Header operations for requests sent to this destination (after the route's).
    #[prost(message, optional, tag = "3")]
    #[serde(default)]
    pub request_headers: Option<HeaderOps>,
    #[prost(message, optional, tag = "4")]
    #[serde(default)]
    pub response_headers: Option<HeaderOps>,
}

/// A set of endpoints traffic can be balanced over: service + subset + port.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cluster {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    #[prost(message, optional, tag = "3")]
    #[serde(default, with = "duration_opt")]
    pub connect_timeout: Option<prost_types::Duration>,
    /// How long an idle upstream connection is kept (default 3 s, shorter than common app
    /// keep-alive timeouts so a reused connection never meets a server-side close).
    #[prost(message, optional, tag = "4")]
    #[serde(default, with = "duration_opt")]
    pub idle_timeout: Option<prost_types::Duration>,
    /// ROUND_ROBIN (default), LEAST_REQUEST or RANDOM.
    #[prost(enumeration = "LoadBalancer", tag = "5")]
    #[serde(default, with = "load_balancer")]
    pub load_balancer: i32,
    #[prost(message, optional, tag = "6")]
    #[serde(default)]
    pub circuit_breakers: Option<CircuitBreakers>,
    #[prost(message, optional, tag = "7")]
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    /// Sticky sessions on a ring hash (wins over loadBalancer); one key field is set.
    #[prost(message, optional, tag = "8")]
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// How the endpoints are found (a ServiceEntry's resolution): STATIC (default),
    /// STRICT_DNS or ORIGINAL_DST.
    #[prost(enumeration = "Discovery", tag = "9")]
    #[serde(default, with = "discovery")]
    pub discovery: i32,
    /// STRICT_DNS: how often the proxy resolves the names again (default 5 s).
    #[prost(message, optional, tag = "10")]
    #[serde(default, with = "duration_opt")]
    pub dns_refresh_rate: Option<prost_types::Duration>,
    /// Locality-aware load balancing (set: enabled), from this workload's locality.
    #[prost(message, optional, tag = "11")]
    #[serde(default)]
    pub locality_lb: Option<LocalityLb>,
    /// Slow start: a new endpoint's share grows over this window.
    #[prost(message, optional, tag = "12")]
    #[serde(default)]
    pub warmup: Option<Warmup>,
    /// SO_KEEPALIVE on upstream connections (set: enabled; unset fields: the OS's).
    #[prost(message, optional, tag = "13")]
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// To endpoints fronted by a Trellis proxy, HTTP goes in the client's own protocol
    /// instead of one multiplexed HTTP/2 connection per peer (DestinationRule
    /// `h2UpgradePolicy: DO_NOT_UPGRADE`, or `useClientProtocol`).
    #[prost(bool, tag = "14")]
    #[serde(default)]
    pub keep_client_protocol: bool,
    /// DestinationRule trafficPolicy.tls: how to speak TLS to the endpoints (unset: auto
    /// mTLS to peer proxies, plaintext to the rest).
    #[prost(message, optional, tag = "15")]
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    #[prost(uint32, optional, tag = "1")]
    #[serde(default)]
    pub probes: Option<u32>,
    #[prost(message, optional, tag = "2")]
    #[serde(default, with = "duration_opt")]
    pub time: Option<prost_types::Duration>,
    #[prost(message, optional, tag = "3")]
    #[serde(default, with = "duration_opt")]
    pub interval: Option<prost_types::Duration>,
}

/// Istio's localityLbSetting. Without `distribute`, failover: endpoints in this
/// workload's zone first, then its region, then the `failover` regions, then the rest,
/// each level taking traffic in proportion to its available endpoints.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLb {
    #[prost(message, repeated, tag = "1")]
    #[serde(default)]
    pub distribute: Vec<LocalityDistribute>,
    #[prost(message, repeated, tag = "2")]
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityDistribute {
    /// "region/zone/subzone", any part `*`.
    #[prost(string, tag = "1")]
    pub from: String,
    /// Locality pattern → share of traffic (percent).
    #[prost(btree_map = "string, uint32", tag = "2")]
    pub to: BTreeMap<String, u32>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    #[prost(string, tag = "1")]
    pub from: String,
    #[prost(string, tag = "2")]
    pub to: String,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Warmup {
    #[prost(message, optional, tag = "1")]
    #[serde(default, with = "duration_opt")]
    pub duration: Option<prost_types::Duration>,
    /// The share a brand-new endpoint starts with (percent, default 10).
    #[prost(double, optional, tag = "2")]
    #[serde(default)]
    pub minimum_percent: Option<f64>,
    /// Curve of the ramp (1: linear, the default).
    #[prost(double, optional, tag = "3")]
    #[serde(default)]
    pub aggression: Option<f64>,
}

/// How a cluster's endpoints are found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Discovery {
    /// Endpoint addresses are IP:PORT.
    Static = 0,
    /// Endpoint addresses are HOST:PORT, resolved by the proxy; every address is an
    /// endpoint.
    StrictDns = 1,
    /// No endpoints: connections go where the client sent them (resolution NONE).
    OriginalDst = 2,
}

impl Discovery {
    pub const ALL: [Discovery; 3] = [
        Discovery::Static,
        Discovery::StrictDns,
        Discovery::OriginalDst,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Discovery::Static => "STATIC",
            Discovery::StrictDns => "STRICT_DNS",
            Discovery::OriginalDst => "ORIGINAL_DST",
        }
    }
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    #[prost(string, optional, tag = "1")]
    #[serde(default)]
    pub http_header_name: Option<String>,
    /// Cookie name. An absent cookie gives a normal pick, unless `httpCookieTtl` is set:
    /// then the proxy makes one up, hashes it and sets it on the response.
    #[prost(string, optional, tag = "2")]
    #[serde(default)]
    pub http_cookie: Option<String>,
    #[prost(bool, optional, tag = "3")]
    #[serde(default)]
    pub use_source_ip: Option<bool>,
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    /// Points on the ring (default 1024).
    #[prost(uint64, optional, tag = "5")]
    #[serde(default)]
    pub minimum_ring_size: Option<u64>,
    /// With `httpCookie`: the proxy sets the cookie when the request has none (0s: a
    /// session cookie).
    #[prost(message, optional, tag = "6")]
    #[serde(default, with = "duration_opt")]
    pub http_cookie_ttl: Option<prost_types::Duration>,
    #[prost(string, optional, tag = "7")]
    #[serde(default)]
    pub http_cookie_path: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LoadBalancer {
    RoundRobin = 0,
    /// Power of two choices by requests in flight.
    LeastRequest = 1,
    Random = 2,
}

impl LoadBalancer {
    pub const ALL: [LoadBalancer; 3] = [
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
        LoadBalancer::Random,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoadBalancer::RoundRobin => "ROUND_ROBIN",
            LoadBalancer::LeastRequest => "LEAST_REQUEST",
            LoadBalancer::Random => "RANDOM",
        }
    }
}

/// DestinationRule connectionPool limits; over a limit the request gets 503 (UO) at once.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakers {
    /// Concurrent HTTP/1.1 connections (requests) to the cluster.
    #[prost(uint32, optional, tag = "1")]
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests allowed to wait for a connection when maxConnections is reached.
    #[prost(uint32, optional, tag = "2")]
    #[serde(default)]
    pub max_pending_requests: Option<u32>,
    /// Concurrent requests to the cluster, whatever the protocol.
    #[prost(uint32, optional, tag = "3")]
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Concurrent retries to the cluster; beyond it a failed try is answered, not retried.
    #[prost(uint32, optional, tag = "4")]
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Requests per upstream HTTP/1.1 connection before it is closed (unset: no limit).
    #[prost(uint32, optional, tag = "5")]
    #[serde(default)]
    pub max_requests_per_connection: Option<u32>,
    /// Streams per upstream HTTP/2 connection; more open another connection (unset: one
    /// connection per peer).
    #[prost(uint32, optional, tag = "6")]
    #[serde(default)]
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (or connect failures) that eject an endpoint.
    #[prost(uint32, optional, tag = "1")]
    #[serde(default, rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    /// Base ejection time; the n-th ejection lasts n times this (default 30s).
    #[prost(message, optional, tag = "2")]
    #[serde(default, with = "duration_opt")]
    pub base_ejection_time: Option<prost_types::Duration>,
    /// Most endpoints ejected at once, in percent (default 10; at least one).
    #[prost(uint32, optional, tag = "3")]
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
    /// Below this share of available endpoints, nothing is ejected (default 0).
    #[prost(uint32, optional, tag = "4")]
    #[serde(default)]
    pub min_health_percent: Option<u32>,
    /// Consecutive 502, 503 and 504 responses that eject an endpoint (0 or unset: off).
    #[prost(uint32, optional, tag = "5")]
    #[serde(default)]
    pub consecutive_gateway_errors: Option<u32>,
    /// With `splitExternalLocalOriginErrors`: consecutive connect failures, resets and
    /// timeouts that eject an endpoint (default 5); they then no longer count as 5xx.
    #[prost(uint32, optional, tag = "6")]
    #[serde(default)]
    pub consecutive_local_origin_failures: Option<u32>,
    #[prost(bool, optional, tag = "7")]
    #[serde(default)]
    pub split_external_local_origin_errors: Option<bool>,
    /// Ejections end at the first tick of this interval after their time (unset: exactly
    /// at their time).
    #[prost(message, optional, tag = "8")]
    #[serde(default, with = "duration_opt")]
    pub interval: Option<prost_types::Duration>,
}

#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// `ip:port`.
    #[prost(string, tag = "1")]
    pub address: String,
    /// Whether a Trellis proxy fronts this endpoint (HTTP then travels as HTTP/2 between
    /// the proxies).
    #[prost(bool, tag = "2")]
    #[serde(default)]
    pub proxied: bool,
    #[prost(btree_map = "string, string", tag = "3")]
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// SPIFFE identity of the endpoint's workload.
    #[prost(string, optional, tag = "4")]
    #[serde(default)]
    pub identity: Option<String>,
    /// Absent means healthy.
    #[prost(bool, optional, tag = "5")]
    #[serde(default)]
    pub healthy: Option<bool>,
    #[prost(string, optional, tag = "6")]
    #[serde(default)]
    pub locality: Option<String>,
    #[prost(uint32, optional, tag = "7")]
    #[serde(default)]
    pub weight: Option<u32>,
    /// The peer proxy takes plaintext only on this port (its PeerAuthentication is
    /// DISABLE): auto mTLS sends plaintext.
    #[prost(bool, tag = "8")]
    #[serde(default, skip_serializing_if = "is_false")]
    pub plaintext: bool,
    /// The workload this endpoint is an instance of, and its namespace (the labels of
    /// Istio's metrics: `destination_workload`, `source_workload`…).
    #[prost(string, tag = "9")]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    #[prost(string, tag = "10")]
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// Proxy-wide settings.
#[derive(Clone, PartialEq, prost::Message, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Settings {
    /// How long to wait for a client's first bytes to tell its protocol (default 100ms).
    #[prost(message, optional, tag = "1")]
    #[serde(default, with = "duration_opt")]
    pub protocol_detection_timeout: Option<prost_types::Duration>,
    /// Largest request head accepted (default 60 KiB); larger gets 431.
    #[prost(uint32, optional, tag = "2")]
    #[serde(default)]
    pub max_request_header_bytes: Option<u32>,
    /// Time allowed to receive a request head (default 10s); slower clients are closed.
    #[prost(message, optional, tag = "3")]
    #[serde(default, with = "duration_opt")]
    pub request_header_timeout: Option<prost_types::Duration>,
    /// Default upstream connect timeout (default 5s).
    #[prost(message, optional, tag = "4")]
    #[serde(default, with = "duration_opt")]
    pub connect_timeout: Option<prost_types::Duration>,
    /// Gateways: how many proxies (load balancers) in front of this one append to
    /// `X-Forwarded-For`; the client's address is that many entries from its right
    /// (Istio's `gatewayTopology.numTrustedProxies`). Default 0: the connection's source.
    #[prost(uint32, optional, tag = "5")]
    #[serde(default)]
    pub num_trusted_proxies: Option<u32>,
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

    /// The snapshot as JSON for `/config_dump`. Nothing in the model is secret yet; when
    /// keys or tokens join it, they are redacted here.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// Converts a protobuf duration (seconds + nanos) to a std duration; negative durations
/// are refused.
pub fn to_std(d: &prost_types::Duration) -> Option<std::time::Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    (nanos < 1_000_000_000).then(|| std::time::Duration::new(secs, nanos))
}

/// The other way.
pub fn from_std(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// Durations in files are written as in Istio ("1.5s", "100ms").
mod duration_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use trellis_api::common::Duration;

    pub fn serialize<S: Serializer>(
        d: &Option<prost_types::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d.as_ref().and_then(super::to_std) {
            Some(d) => s.collect_str(&Duration(d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<prost_types::Duration>, D::Error> {
        Ok(Option::<Duration>::deserialize(d)?.map(|d| super::from_std(d.0)))
    }
}

/// Protocols in files are names, matched case-insensitively ("HTTP", "grpc").
mod protocol_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Protocol;

    pub fn serialize<S: Serializer>(p: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
        match p
            .and_then(|v| Protocol::try_from(v).ok())
            .and_then(Protocol::to_api)
        {
            Some(p) => s.serialize_str(p.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        Ok(Option::<trellis_api::common::Protocol>::deserialize(d)?
            .map(|p| Protocol::from_api(p) as i32))
    }
}

/// A required protocol name in files.
mod protocol_req {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Protocol;

    pub fn serialize<S: Serializer>(p: &i32, s: S) -> Result<S::Ok, S::Error> {
        match Protocol::try_from(*p).ok().and_then(Protocol::to_api) {
            Some(p) => s.serialize_str(p.as_str()),
            None => s.serialize_i32(*p),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        Ok(Protocol::from_api(trellis_api::common::Protocol::deserialize(d)?) as i32)
    }
}

/// An enum written by its name in files (`SIMPLE`, `ROUND_ROBIN`…).
trait Named: Copy + Into<i32> + TryFrom<i32> + 'static {
    const NAMES: &'static [Self];
    fn name(self) -> &'static str;
}

fn serialize_named<E: Named, S: serde::Serializer>(p: &i32, s: S) -> Result<S::Ok, S::Error> {
    match E::try_from(*p) {
        Ok(e) => s.serialize_str(e.name()),
        Err(_) => s.serialize_i32(*p),
    }
}

fn deserialize_named<'de, E: Named, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    let name = String::deserialize(d)?;
    E::NAMES
        .iter()
        .find(|e| e.name() == name)
        .map(|e| (*e).into())
        .ok_or_else(|| {
            let all: Vec<&str> = E::NAMES.iter().map(|e| e.name()).collect();
            serde::de::Error::custom(format!(
                "unknown value {name:?}, expected one of {}",
                all.join(", ")
            ))
        })
}

/// A `#[serde(with = …)]` module for a [`Named`] enum stored as `i32`.
macro_rules! named_module {
    ($module:ident, $enum:ident, $all:expr) => {
        impl Named for $enum {
            const NAMES: &'static [Self] = &$all;
            fn name(self) -> &'static str {
                <$enum>::name(self)
            }
        }

        mod $module {
            use serde::{Deserializer, Serializer};

            pub fn serialize<S: Serializer>(p: &i32, s: S) -> Result<S::Ok, S::Error> {
                super::serialize_named::<super::$enum, S>(p, s)
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                super::deserialize_named::<super::$enum, D>(d)
            }
        }
    };
}

named_module!(server_tls_mode, ServerTlsMode, ServerTlsMode::ALL);
named_module!(discovery, Discovery, Discovery::ALL);
named_module!(peer_mtls, PeerMtls, PeerMtls::ALL);
named_module!(authz_action, AuthzAction, AuthzAction::ALL);
named_module!(client_tls_mode, ClientTlsMode, ClientTlsMode::ALL);
named_module!(load_balancer, LoadBalancer, LoadBalancer::ALL);
named_module!(
    outbound_policy,
    OutboundPolicy,
    [OutboundPolicy::AllowAny, OutboundPolicy::RegistryOnly]
);

fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn yaml_and_protobuf_describe_the_same_snapshot() {
        let s = Snapshot::from_text(
            "version: v9\noutboundTrafficPolicy: REGISTRY_ONLY\nworkload: {name: w, inboundPorts: [{port: 80, protocol: grpc}]}\nclusters:\n- name: c\n  connectTimeout: 1.5s\n  endpoints: [{address: \"10.0.0.1:80\", healthy: false}]\n",
            "s.yaml",
        )
        .expect("parses");
        assert_eq!(s.outbound_traffic_policy(), OutboundPolicy::RegistryOnly);
        let port = &s.workload.as_ref().expect("workload").inbound_ports[0];
        assert_eq!(port.protocol(), Protocol::Grpc);
        let c = &s.clusters[0];
        assert_eq!(
            c.connect_timeout.as_ref().and_then(to_std),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(c.endpoints[0].healthy, Some(false));
        let bytes = s.encode_to_vec();
        let back = Snapshot::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, s);
        let json = back.to_json();
        assert_eq!(json["outboundTrafficPolicy"], "REGISTRY_ONLY");
        assert_eq!(json["clusters"][0]["connectTimeout"], "1500ms");
        assert_eq!(json["workload"]["inboundPorts"][0]["protocol"], "GRPC");
    }

    #[test]
    fn file_errors_are_located() {
        let e =
            Snapshot::from_text("outboundTrafficPolicy: ALLOW_SOME\n", "s.yaml").expect_err("bad");
        assert_eq!(
            e.to_string(),
            "s.yaml:1:24: outboundTrafficPolicy: unknown value \"ALLOW_SOME\", expected one of ALLOW_ANY, REGISTRY_ONLY"
        );
        let e = Snapshot::from_text("clusters: [{name: c, idleTimeout: 3}]\n", "s.yaml")
            .expect_err("bad");
        assert!(e.to_string().contains("clusters[0].idleTimeout"), "{e}");
    }
}
