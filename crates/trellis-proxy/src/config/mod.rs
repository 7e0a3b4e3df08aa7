//! The proxy's domain view of a snapshot: wire types ([`trellis_xds::snapshot`]) are
//! converted here, once, into indexed structures the data path reads without parsing
//! anything. A resource that does not convert is rejected with a reason; the snapshot as a
//! whole is refused so that a proxy never runs half of a configuration.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::fasthash::FastMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use trellis_api::common::Protocol;
use trellis_api::networking::HttpMatchRequest;
use trellis_policy::route::{Match, Route, RouteTable, Weighted};
use trellis_xds::snapshot::{self as wire, OutboundPolicy};

mod cluster;
mod gateway;
mod routes;

pub use cluster::*;
pub use gateway::*;
pub use routes::*;

/// Default time to wait for a client's first bytes.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);
/// Default limit on a request head (Envoy's 60 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
/// Default time allowed to receive a request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between two resolutions of a STRICT_DNS cluster's names (Envoy's).
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Default upstream connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default idle timeout of pooled upstream connections: below the 5 s keep-alive of
/// Node.js and most app servers, so a pooled connection is dropped before the app drops it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How traffic on a port is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1 or HTTP/2 (which one is seen on the wire).
    Http,
    /// HTTP/2 only (grpc, http2, h2c): forwarded as HTTP/2 to the app.
    Http2,
    /// Opaque bytes (tcp, tls, https, mongo, mysql, redis…).
    Tcp,
    /// Not declared: detected from the client's first bytes.
    Detect,
}

impl PortProtocol {
    /// Istio's rules: appProtocol wins, then the explicit protocol, then the port name's
    /// prefix (`http-web`, `grpc`, `tcp-db`…); otherwise detect.
    pub fn declared(
        protocol: Option<Protocol>,
        app_protocol: Option<&str>,
        name: Option<&str>,
    ) -> PortProtocol {
        if let Some(app) = app_protocol {
            if let Some(p) = from_name(app) {
                return p;
            }
        }
        if let Some(p) = protocol {
            return from_protocol(p);
        }
        name.and_then(|n| from_name(n.split('-').next().unwrap_or(n)))
            .unwrap_or(PortProtocol::Detect)
    }
}

fn from_protocol(p: Protocol) -> PortProtocol {
    match p {
        Protocol::Http => PortProtocol::Http,
        Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb => PortProtocol::Http2,
        Protocol::HttpProxy => PortProtocol::Http,
        _ => PortProtocol::Tcp,
    }
}

fn from_name(name: &str) -> Option<PortProtocol> {
    match name.to_ascii_lowercase().as_str() {
        "kubernetes.io/h2c" => Some(PortProtocol::Http2),
        "kubernetes.io/ws" | "kubernetes.io/wss" => Some(PortProtocol::Http),
        n => n.parse::<Protocol>().ok().map(from_protocol),
    }
}

/// A service port as the outbound path sees it.
#[derive(Debug)]
pub struct Target {
    pub hostname: String,
    pub port: u16,
    pub protocol: PortProtocol,
    /// Where traffic goes when there are no HTTP routes, and TCP traffic always.
    pub cluster: Arc<Cluster>,
    /// HTTP routing rules (a VirtualService's `http[]`), when the port has any.
    pub routes: Option<RouteTable<RouteDest>>,
    /// Per rule (by index): timeout and faults.
    pub route_policies: Vec<RoutePolicy>,
    /// Opaque TCP routing; none matching: `cluster`.
    pub tcp_routes: Vec<L4Route>,
    /// TLS passthrough routing by SNI; none matching: the connection is refused.
    pub tls_routes: Vec<L4Route>,
    /// The gateway whose virtual host this is ("namespace/name"); `None` for the mesh.
    /// Route matches that name `gateways` compare against it.
    pub gateway: Option<Arc<str>>,
    /// The service, for Istio's metric labels (`destination_service*`).
    pub service_meta: Arc<crate::metrics::ServiceMeta>,
}

#[derive(Debug, Clone)]
pub struct InboundPort {
    pub port: u16,
    pub target_port: u16,
    pub protocol: PortProtocol,
    pub rate_limit: Option<Arc<crate::ratelimit::TokenBucket>>,
}

impl InboundPort {
    /// Where the app behind this port is first tried.
    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), self.target_port)
    }
}

/// A converted snapshot.
#[derive(Debug)]
pub struct Config {
    pub version: String,
    pub outbound_policy: OutboundPolicy,
    /// Service virtual IP and port → target.
    by_vip: FastMap<SocketAddr, Arc<Target>>,
    /// Endpoint address → target (an app that dialled a pod address directly).
    by_endpoint: FastMap<SocketAddr, Arc<Target>>,
    /// Name → port → target, for explicit listeners. Every name a service answers to is
    /// here: the FQDN and its leading parts (`reviews`, `reviews.default`,
    /// `reviews.default.svc`); a short name two services share is left out.
    by_name: FastMap<String, FastMap<u16, Arc<Target>>>,
    pub clusters: Vec<Arc<Cluster>>,
    pub inbound: HashMap<u16, InboundPort>,
    pub workload: Option<wire::Workload>,
    /// The pod's addresses, where an app that does not listen on 127.0.0.1 is looked for.
    pub pod_ips: Vec<IpAddr>,
    /// This workload's labels and namespace: the source of its outbound requests, for
    /// routes that match on sourceLabels and sourceNamespace.
    pub own_labels: std::collections::BTreeMap<String, String>,
    pub own_namespace: String,
    /// This workload, for Istio's metric labels (`source_*` outbound, `destination_*`
    /// inbound).
    pub own_meta: Arc<crate::metrics::WorkloadMeta>,
    /// Workloads by address, from the endpoints in the snapshot (an address two
    /// workloads share is left out): who an inbound caller is.
    pub peers: FastMap<IpAddr, Arc<crate::metrics::WorkloadMeta>>,
    /// The access logging the workload's Telemetry selects, if any.
    pub access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// The tracing the workload's Telemetry selects, if any.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The Istio metrics each side reports (Telemetry metric overrides).
    pub metrics_on: crate::metrics::Switches,
    /// Workload port → a service of this workload that sends to it (metric labels).
    inbound_services: HashMap<u16, Arc<crate::metrics::ServiceMeta>>,
    /// Default upstream connect timeout (settings.connectTimeout).
    pub connect_timeout: Duration,
    /// Gateways: proxies in front that append to `X-Forwarded-For` (0: none trusted).
    pub num_trusted_proxies: u32,
    pub detection_timeout: Duration,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    /// Gateway mode: the ports served, by port number.
    pub gateway_ports: HashMap<u16, Arc<GatewayPort>>,
    /// Every service port and gateway virtual host once (for metrics).
    pub targets: Vec<Arc<Target>>,
    /// STRICT_DNS names (`host:port`) and the addresses they resolved to.
    pub dns: HashMap<String, Vec<SocketAddr>>,
    /// The shortest refresh interval of the STRICT_DNS clusters, when there are any.
    pub dns_refresh: Option<Duration>,
    /// The AuthorizationPolicies that apply to this workload, compiled.
    pub authz: trellis_policy::authz::Policies,
    /// Its RequestAuthentication jwtRules, compiled.
    pub jwt: crate::authn::JwtRules,
    /// Inbound mutual TLS (the workload's resolved PeerAuthentication), and the workload
    /// ports where it differs.
    pub inbound_mtls: wire::PeerMtls,
    pub port_mtls: HashMap<u16, wire::PeerMtls>,
    /// The mesh's trust bundle (`trustRoots`), when the snapshot has one: what peers'
    /// certificates must chain to.
    pub trust_roots: Option<Arc<rustls::RootCertStore>>,
    /// The bundle `trust_roots` was made from (PEM).
    trust_pems: Vec<String>,
    /// The wire form, encoded (for `/config_dump` and DNS refreshes, see [`Config::raw`]):
    /// decoded, it would weigh as much again as the configuration itself.
    raw: Vec<u8>,
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct ConfigError {
    /// Which resource, e.g. `clusters[2] "outbound|9080||reviews"`.
    pub resource: String,
    pub reason: String,
}

/// The system's CA bundle (Debian's path), for TLS origination without `caCertificates`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A cluster's DestinationRule `tls`: files read and the client configuration built here,
/// so that a missing or bad file refuses the snapshot with the path.
fn upstream_tls(
    res: &str,
    cluster: &str,
    t: &wire::ClientTls,
    env: &LoadEnv,
) -> Result<UpstreamTls, ConfigError> {
    let mode = wire::ClientTlsMode::try_from(t.mode)
        .map_err(|_| bad(res, format!("unknown mode {}", t.mode)))?;
    let mutual = match mode {
        wire::ClientTlsMode::TlsDisable => return Ok(UpstreamTls::Disable),
        wire::ClientTlsMode::TlsIstioMutual => return Ok(UpstreamTls::IstioMutual),
        wire::ClientTlsMode::TlsSimple => false,
        wire::ClientTlsMode::TlsMutual => true,
    };
    let read = |path: &std::path::Path| {
        std::fs::read_to_string(path).map_err(|e| bad(res, format!("{}: {e}", path.display())))
    };
    let cred = t
        .credential_name
        .as_ref()
        .map(|n| env.credentials_dir.join(n));
    let roots = match (&t.ca_certificates, &cred) {
        (Some(p), _) => read(std::path::Path::new(p))?,
        (None, Some(dir)) if dir.join("ca.crt").exists() => read(&dir.join("ca.crt"))?,
        _ if t.insecure_skip_verify => String::new(),
        _ => read(std::path::Path::new(SYSTEM_ROOTS))?,
    };
    let client = if mutual {
        let (chain, key) = match (&t.client_certificate, &t.private_key, &cred) {
            (Some(c), Some(k), _) => (
                read(std::path::Path::new(c))?,
                read(std::path::Path::new(k))?,
            ),
            (_, _, Some(dir)) => (read(&dir.join("tls.crt"))?, read(&dir.join("tls.key"))?),
            _ => {
                return Err(bad(
                    res,
                    "MUTUAL needs clientCertificate and privateKey, or credentialName",
                ));
            }
        };
        Some((chain, key))
    } else {
        None
    };
    // SNI: as given, else the cluster's host (`outbound|443||api.example.com`).
    let host = t
        .sni
        .clone()
        .or_else(|| cluster.split('|').nth(3).map(str::to_string))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad(res, "no sni, and the cluster name names no host"))?;
    let sni = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|_| bad(res, format!("sni {host:?} is not a DNS name or IP address")))?;
    let config = trellis_identity::tls::origination_config(
        &roots,
        client.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        &t.subject_alt_names,
        t.insecure_skip_verify,
        &[],
    )
    .map_err(|e| bad(res, e.to_string()))?;
    Ok(UpstreamTls::Origin(Arc::new(Origination {
        config: Arc::new(config),
        sni,
    })))
}

/// The workload's AuthorizationPolicies, compiled; a bad one refuses the snapshot, naming it.
fn authz_policies(
    list: &[wire::AuthzPolicy],
) -> Result<trellis_policy::authz::Policies, ConfigError> {
    use trellis_policy::authz::{Action, OperationSpec, Policy, PolicySpec, RuleSpec, SourceSpec};
    let mut out = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let res = format!("workload.authorization[{i}] {:?}", p.name);
        let action = match wire::AuthzAction::try_from(p.action) {
            Ok(wire::AuthzAction::Allow) => Action::Allow,
            Ok(wire::AuthzAction::Deny) => Action::Deny,
            Ok(wire::AuthzAction::Audit) => Action::Audit,
            Ok(wire::AuthzAction::Custom) => Action::Custom,
            Err(_) => return Err(bad(res, format!("unknown action {}", p.action))),
        };
        let spec = PolicySpec {
            name: &p.name,
            rules: p
                .rules
                .iter()
                .map(|r| RuleSpec {
                    from: r
                        .from
                        .iter()
                        .map(|s| SourceSpec {
                            principals: (&s.principals, &s.not_principals),
                            request_principals: (&s.request_principals, &s.not_request_principals),
                            namespaces: (&s.namespaces, &s.not_namespaces),
                            service_accounts: (&s.service_accounts, &s.not_service_accounts),
                            ip_blocks: (&s.ip_blocks, &s.not_ip_blocks),
                            remote_ip_blocks: (&s.remote_ip_blocks, &s.not_remote_ip_blocks),
                            trust_domains: (&s.trust_domains, &s.not_trust_domains),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| OperationSpec {
                            hosts: (&o.hosts, &o.not_hosts),
                            ports: (&o.ports, &o.not_ports),
                            methods: (&o.methods, &o.not_methods),
                            paths: (&o.paths, &o.not_paths),
                        })
                        .collect(),
                    when: r
                        .when
                        .iter()
                        .map(|c| (c.key.as_str(), &c.values[..], &c.not_values[..]))
                        .collect(),
                })
                .collect(),
        };
        let policy = Policy::compile(&spec, action).map_err(|e| bad(res, e))?;
        for key in policy.unsupported() {
            tracing::warn!(
                policy = %p.name,
                "condition {key:?} is Envoy-specific and not evaluated by Trellis: an ALLOW rule with it never matches, a DENY rule counts it as met"
            );
        }
        out.push(policy);
    }
    Ok(trellis_policy::authz::Policies::new(out))
}

fn bad(resource: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        resource: resource.into(),
        reason: reason.into(),
    }
}

/// A wire duration, or the default when absent; negative or malformed ones are refused.
fn duration(
    resource: &str,
    d: Option<&prost_types::Duration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match d {
        None => Ok(default),
        Some(d) => wire::to_std(d).ok_or_else(|| {
            bad(
                resource,
                format!("invalid duration {}s {}ns", d.seconds, d.nanos),
            )
        }),
    }
}

/// A wire protocol enum value (`None` when unset or unspecified).
fn protocol(resource: &str, p: Option<i32>) -> Result<Option<Protocol>, ConfigError> {
    match p {
        None => Ok(None),
        Some(v) => wire::Protocol::try_from(v)
            .map(wire::Protocol::to_api)
            .map_err(|_| bad(resource, format!("unknown protocol value {v}"))),
    }
}

fn port_u16(resource: &str, p: u32) -> Result<u16, ConfigError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(resource, format!("port {p} must be in 1..65535")))
}

impl Config {
    /// Converts a wire snapshot. `previous` lends its endpoint counters to endpoints that
    /// are still there.
    pub fn from_wire(
        raw: wire::Snapshot,
        previous: Option<&Config>,
    ) -> Result<Config, ConfigError> {
        Config::from_wire_with(raw, previous, &LoadEnv::default())
    }

    /// The snapshot this configuration was made from.
    pub fn raw(&self) -> wire::Snapshot {
        prost::Message::decode(self.raw.as_slice()).unwrap_or_default()
    }

    /// As [`Config::from_wire`], with certificate files found through `env`.
    pub fn from_wire_with(
        raw: wire::Snapshot,
        previous: Option<&Config>,
        env: &LoadEnv,
    ) -> Result<Config, ConfigError> {
        // Names the previous snapshot resolved are reused (the refresh loop keeps them
        // current); new ones are resolved now.
        let mut dns = HashMap::new();
        let mut fresh = Vec::new();
        for name in dns_names(&raw) {
            match previous.and_then(|p| p.dns.get(&name)) {
                Some(addrs) => {
                    dns.insert(name, addrs.clone());
                }
                None => fresh.push(name),
            }
        }
        dns.extend(resolve_names(&env.resolver, &fresh));
        Config::from_wire_resolved(raw, previous, env, dns)
    }

    /// Resolves the snapshot's STRICT_DNS names again; when an answer changed, the same
    /// snapshot with the new endpoints (counters kept). Blocking: run it off the data path.
    pub fn refresh_dns(&self, env: &LoadEnv) -> Option<Result<Config, ConfigError>> {
        if self.dns.is_empty() {
            return None;
        }
        let names: Vec<String> = self.dns.keys().cloned().collect();
        let fresh = resolve_names(&env.resolver, &names);
        if fresh == self.dns {
            return None;
        }
        Some(Config::from_wire_resolved(
            self.raw(),
            Some(self),
            env,
            fresh,
        ))
    }

    fn from_wire_resolved(
        raw: wire::Snapshot,
        previous: Option<&Config>,
        env: &LoadEnv,
        dns: HashMap<String, Vec<SocketAddr>>,
    ) -> Result<Config, ConfigError> {
        let old_stats: HashMap<(&str, SocketAddr), &Arc<EndpointStats>> = previous
            .map(|p| {
                p.clusters
                    .iter()
                    .flat_map(|c| {
                        c.endpoints
                            .iter()
                            .map(move |e| ((&*c.name, e.addr), &e.stats))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let settings = raw.settings.clone().unwrap_or_default();
        let default_connect = duration(
            "settings.connectTimeout",
            settings.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let outbound_policy =
            OutboundPolicy::try_from(raw.outbound_traffic_policy).map_err(|_| {
                bad(
                    "outboundTrafficPolicy",
                    format!("unknown value {}", raw.outbound_traffic_policy),
                )
            })?;

        let mut clusters: HashMap<&str, Arc<Cluster>> = HashMap::new();
        for (i, c) in raw.clusters.iter().enumerate() {
            let mut cluster = Cluster::from_wire(
                i,
                c,
                default_connect,
                &old_stats,
                &dns,
                raw.workload.as_ref().and_then(|w| w.locality.as_deref()),
            )?;
            if let Some(t) = &c.tls {
                let res = format!("clusters[{i}] {:?} tls", c.name);
                cluster.upstream_tls = upstream_tls(&res, &c.name, t, env)?;
            }
            let cluster = Arc::new(cluster);
            let res = format!("clusters[{i}] {:?}", c.name);
            if clusters.insert(c.name.as_str(), cluster).is_some() {
                return Err(bad(res, "duplicate cluster name"));
            }
        }

        let old_route_counters: HashMap<(&str, u16, &str), &Arc<AtomicU64>> = previous
            .map(|p| {
                p.targets
                    .iter()
                    .flat_map(|t| {
                        let names = t
                            .routes
                            .iter()
                            .flat_map(|r| r.routes().iter().map(|r| r.name.as_str()));
                        names
                            .zip(&t.route_policies)
                            .map(move |(n, p)| ((t.hostname.as_str(), t.port, n), &p.requests))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut targets: Vec<Arc<Target>> = Vec::new();
        let mut by_vip = FastMap::default();
        let mut by_endpoint = FastMap::default();
        let mut by_name: FastMap<String, FastMap<u16, Arc<Target>>> = FastMap::default();
        let mut ambiguous: std::collections::HashSet<(String, u16)> =
            std::collections::HashSet::new();
        for (i, s) in raw.services.iter().enumerate() {
            let res = format!("services[{i}] {:?}", s.hostname);
            if s.hostname.is_empty() {
                return Err(bad(res, "hostname must not be empty"));
            }
            let vips: Vec<IpAddr> = s
                .addresses
                .iter()
                .map(|a| {
                    a.parse()
                        .map_err(|_| bad(&res, format!("address {a:?} is not an IP address")))
                })
                .collect::<Result<_, _>>()?;
            for p in &s.ports {
                let port = port_u16(&res, p.port)?;
                let cluster = clusters.get(p.cluster.as_str()).ok_or_else(|| {
                    bad(
                        &res,
                        format!("port {port}: cluster {:?} is not defined", p.cluster),
                    )
                })?;
                let routes = if p.http_routes.is_empty() {
                    None
                } else {
                    Some(compile_routes(&res, port, &p.http_routes, &clusters)?)
                };
                let route_policies = route_policies(
                    &res,
                    port,
                    &p.http_routes,
                    &clusters,
                    &s.hostname,
                    &old_route_counters,
                )?;
                let tcp_routes = compile_l4(
                    &res,
                    &format!("port {port} tcpRoutes"),
                    &p.tcp_routes,
                    &clusters,
                )?;
                let tls_routes = compile_l4(
                    &res,
                    &format!("port {port} tlsRoutes"),
                    &p.tls_routes,
                    &clusters,
                )?;
                let target = Arc::new(Target {
                    routes,
                    route_policies,
                    tcp_routes,
                    tls_routes,
                    hostname: s.hostname.clone(),
                    port,
                    protocol: PortProtocol::declared(
                        protocol(&res, p.protocol)?,
                        p.app_protocol.as_deref(),
                        p.name.as_deref(),
                    ),
                    cluster: Arc::clone(cluster),
                    gateway: None,
                    service_meta: crate::metrics::ServiceMeta::of(&s.hostname),
                });
                targets.push(Arc::clone(&target));
                for ip in &vips {
                    by_vip.insert(SocketAddr::new(*ip, port), Arc::clone(&target));
                }
                for e in &cluster.endpoints {
                    by_endpoint
                        .entry(e.addr)
                        .or_insert_with(|| Arc::clone(&target));
                }
                by_name
                    .entry(s.hostname.clone())
                    .or_default()
                    .insert(port, Arc::clone(&target));
                // Shorter names: every proper prefix made of whole labels.
                let mut end = s.hostname.len();
                while let Some(dot) = s.hostname[..end].rfind('.') {
                    end = dot;
                    let alias = &s.hostname[..end];
                    let ports = by_name.entry(alias.to_string()).or_default();
                    match ports.get(&port) {
                        Some(existing) if existing.hostname != target.hostname => {
                            ambiguous.insert((alias.to_string(), port));
                        }
                        _ => {
                            ports.insert(port, Arc::clone(&target));
                        }
                    }
                }
            }
        }

        let mut inbound = HashMap::new();
        let mut pod_ips = Vec::new();
        if let Some(w) = &raw.workload {
            for a in &w.addresses {
                pod_ips.push(a.parse().map_err(|_| {
                    bad("workload.addresses", format!("{a:?} is not an IP address"))
                })?);
            }
            for (i, p) in w.inbound_ports.iter().enumerate() {
                let res = format!("workload.inboundPorts[{i}]");
                let port = port_u16(&res, p.port)?;
                let target_port = port_u16(&res, p.target_port.unwrap_or(p.port))?;
                inbound.insert(
                    port,
                    InboundPort {
                        port,
                        target_port,
                        protocol: PortProtocol::declared(
                            protocol(&res, p.protocol)?,
                            p.app_protocol.as_deref(),
                            p.name.as_deref(),
                        ),
                        rate_limit: rate_limit(&res, "", p.rate_limit.as_ref())?,
                    },
                );
            }
        }
        // Ambiguous short names resolve to nothing rather than to a random service (an
        // FQDN is never ambiguous: it is its own service).
        for (alias, port) in ambiguous {
            if let Some(ports) = by_name.get_mut(&alias) {
                if ports.get(&port).is_some_and(|t| t.hostname != alias) {
                    ports.remove(&port);
                }
            }
        }
        let max_header_bytes = settings
            .max_request_header_bytes
            .map_or(DEFAULT_MAX_HEADER_BYTES, |b| b as usize);
        if max_header_bytes < 8192 {
            return Err(bad(
                "settings.maxRequestHeaderBytes",
                "must be at least 8192",
            ));
        }
        // A gateway's virtual host always has a route table (no route: 404 NR); its
        // default cluster is never used and has no endpoints.
        let no_cluster = Arc::new(Cluster::from_wire(
            usize::MAX,
            &wire::Cluster {
                name: "BlackHoleCluster".into(),
                ..Default::default()
            },
            default_connect,
            &HashMap::new(),
            &HashMap::new(),
            None,
        )?);
        let gateway_ports = gateway_ports(&raw.gateway_ports, env, |res, port, v, gateway| {
            let res = format!("{res} virtualHosts {:?}", v.name);
            let hostname = v.domains.first().cloned().unwrap_or_else(|| v.name.clone());
            let route_policies = route_policies(
                &res,
                port,
                &v.http_routes,
                &clusters,
                &hostname,
                &old_route_counters,
            )?;
            Ok(Target {
                routes: Some(compile_routes(&res, port, &v.http_routes, &clusters)?),
                route_policies,
                tcp_routes: compile_l4(
                    &res,
                    &format!("port {port} tcpRoutes"),
                    &v.tcp_routes,
                    &clusters,
                )?,
                tls_routes: compile_l4(
                    &res,
                    &format!("port {port} tlsRoutes"),
                    &v.tls_routes,
                    &clusters,
                )?,
                hostname,
                port,
                protocol: PortProtocol::Http,
                cluster: Arc::clone(&no_cluster),
                gateway: Some(gateway),
                service_meta: crate::metrics::ServiceMeta::unknown(),
            })
        })?;
        targets.extend(
            gateway_ports
                .values()
                .flat_map(|p| p.servers.iter())
                .flat_map(|s| s.virtual_hosts.iter())
                .map(|v| Arc::clone(&v.target)),
        );
        let dns_refresh = clusters
            .values()
            .filter(|c| c.discovery == wire::Discovery::StrictDns)
            .map(|c| c.dns_refresh)
            .min();
        let mut cluster_list: Vec<Arc<Cluster>> = clusters.into_values().collect();
        cluster_list.sort_by(|a, b| a.name.cmp(&b.name));
        let (own_meta, peers) = (own_meta(&raw, &cluster_list), peers(&raw, &cluster_list));
        // The same bundle as before keeps the same store (so the mesh mTLS server
        // configuration made for it is not made again at every push).
        let trust_roots = match previous {
            Some(p) if p.trust_pems == raw.trust_roots => p.trust_roots.clone(),
            _ => {
                let mut trust = rustls::RootCertStore::empty();
                for (i, pem) in raw.trust_roots.iter().enumerate() {
                    let roots = trellis_identity::tls::roots(pem)
                        .map_err(|e| bad(format!("trustRoots[{i}]"), e.to_string()))?;
                    trust.roots.extend(roots.roots);
                }
                (!trust.is_empty()).then(|| Arc::new(trust))
            }
        };
        let mtls_mode = |res: String, v: i32| {
            wire::PeerMtls::try_from(v).map_err(|_| bad(res, format!("unknown mTLS mode {v}")))
        };
        let authz = match &raw.workload {
            None => trellis_policy::authz::Policies::default(),
            Some(w) => authz_policies(&w.authorization)?,
        };
        let jwt = match &raw.workload {
            None => crate::authn::JwtRules::default(),
            Some(w) => crate::authn::JwtRules::compile(&w.jwt_rules)
                .map_err(|e| bad("workload.jwtRules", e))?,
        };
        let (inbound_mtls, port_mtls) = match &raw.workload {
            None => (wire::PeerMtls::Permissive, HashMap::new()),
            Some(w) => {
                let mut ports = HashMap::new();
                for (p, m) in &w.port_mtls {
                    let res = format!("workload.portMtls[{p}]");
                    let port = u16::try_from(*p).map_err(|_| bad(res.clone(), "not a port"))?;
                    ports.insert(port, mtls_mode(res, *m)?);
                }
                (mtls_mode("workload.mtls".into(), w.mtls)?, ports)
            }
        };
        Ok(Config {
            version: raw.version.clone(),
            outbound_policy,
            by_vip,
            by_endpoint,
            by_name,
            clusters: cluster_list,
            inbound,
            workload: raw.workload.clone(),
            pod_ips,
            own_labels: raw
                .workload
                .as_ref()
                .map(|w| w.labels.clone())
                .unwrap_or_default(),
            own_namespace: raw
                .workload
                .as_ref()
                .map(|w| w.namespace.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            inbound_services: inbound_services(&own_meta, &targets),
            own_meta,
            access_log: raw
                .workload
                .as_ref()
                .and_then(|w| w.telemetry.as_ref())
                .and_then(crate::accesslog::AccessLog::compile)
                .map(Arc::new),
            tracer: raw
                .workload
                .as_ref()
                .and_then(|w| w.telemetry.as_ref())
                .and_then(crate::trace::Tracer::compile)
                .map(Arc::new),
            metrics_on: crate::metrics::Switches::compile(
                raw.workload.as_ref().and_then(|w| w.telemetry.as_ref()),
            ),
            peers,
            connect_timeout: default_connect,
            num_trusted_proxies: env
                .num_trusted_proxies
                .or(settings.num_trusted_proxies)
                .unwrap_or(0),
            detection_timeout: duration(
                "settings.protocolDetectionTimeout",
                settings.protocol_detection_timeout.as_ref(),
                DEFAULT_DETECTION_TIMEOUT,
            )?,
            max_header_bytes,
            header_timeout: duration(
                "settings.requestHeaderTimeout",
                settings.request_header_timeout.as_ref(),
                DEFAULT_HEADER_TIMEOUT,
            )?,
            gateway_ports,
            targets,
            dns,
            dns_refresh,
            authz,
            jwt,
            inbound_mtls,
            port_mtls,
            trust_roots,
            trust_pems: raw.trust_roots.clone(),
            raw: prost::Message::encode_to_vec(&raw),
        })
    }

    /// The target of an intercepted outbound connection: by service virtual IP, else by
    /// endpoint address.
    pub fn outbound_target(&self, dst: SocketAddr) -> Option<&Arc<Target>> {
        self.by_vip.get(&dst).or_else(|| self.by_endpoint.get(&dst))
    }

    /// The target named by an explicit listener: `reviews`, `reviews.default`, or the FQDN.
    pub fn target_by_name(&self, name: &str, port: u16) -> Option<&Arc<Target>> {
        self.by_name.get(name)?.get(&port)
    }

    /// A service of this workload with a port whose target is workload port `port`, for
    /// metric labels of inbound TCP connections.
    pub fn inbound_service(&self, port: u16) -> Option<Arc<crate::metrics::ServiceMeta>> {
        self.inbound_services.get(&port).cloned()
    }

    /// Whether `s` is a service this workload backs (an endpoint of it is this workload).
    pub fn backs(&self, s: &Arc<crate::metrics::ServiceMeta>) -> bool {
        self.inbound_services.values().any(|b| Arc::ptr_eq(b, s))
    }

    /// The service a request's host (`name[:port]`) names, for metric labels.
    pub fn service_by_host(&self, host: &str) -> Option<Arc<crate::metrics::ServiceMeta>> {
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) if !n.contains(']') || n.ends_with(']') => (n, p.parse::<u16>().ok()),
            _ => (host, None),
        };
        let ports = self.by_name.get(name)?;
        let t = match port {
            Some(p) => ports.get(&p).or_else(|| ports.values().next()),
            None => ports.values().next(),
        }?;
        Some(Arc::clone(&t.service_meta))
    }

    /// The workload port `port` as declared, or undeclared (detected protocol, same
    /// port on the app).
    pub fn inbound_port(&self, port: u16) -> InboundPort {
        self.inbound.get(&port).cloned().unwrap_or(InboundPort {
            port,
            target_port: port,
            protocol: PortProtocol::Detect,
            rate_limit: None,
        })
    }

    /// What inbound connections to workload port `port` must be (PeerAuthentication).
    pub fn inbound_mtls(&self, port: u16) -> wire::PeerMtls {
        self.port_mtls
            .get(&port)
            .copied()
            .unwrap_or(self.inbound_mtls)
    }

    /// Where the app behind inbound `port` is first tried.
    pub fn app_addr(&self, port: u16) -> SocketAddr {
        self.inbound_port(port).app_addr()
    }
}

impl Config {
    /// An empty configuration (no services; unknown destinations pass through).
    pub fn empty() -> Config {
        Config {
            version: String::new(),
            outbound_policy: OutboundPolicy::AllowAny,
            by_vip: FastMap::default(),
            by_endpoint: FastMap::default(),
            by_name: FastMap::default(),
            clusters: Vec::new(),
            inbound: HashMap::new(),
            workload: None,
            pod_ips: Vec::new(),
            own_labels: std::collections::BTreeMap::new(),
            own_namespace: "default".to_string(),
            own_meta: crate::metrics::WorkloadMeta::unknown(),
            peers: FastMap::default(),
            access_log: None,
            tracer: None,
            metrics_on: crate::metrics::Switches::default(),
            inbound_services: HashMap::new(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            num_trusted_proxies: 0,
            detection_timeout: DEFAULT_DETECTION_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            gateway_ports: HashMap::new(),
            targets: Vec::new(),
            dns: HashMap::new(),
            dns_refresh: None,
            authz: trellis_policy::authz::Policies::default(),
            jwt: crate::authn::JwtRules::default(),
            inbound_mtls: wire::PeerMtls::Permissive,
            port_mtls: HashMap::new(),
            trust_roots: None,
            trust_pems: Vec::new(),
            raw: Vec::new(),
        }
    }
}

/// This workload's metric labels: its name, namespace and labels, and its SPIFFE id (in
/// the trust domain its peers' identities use).
fn own_meta(raw: &wire::Snapshot, clusters: &[Arc<Cluster>]) -> Arc<crate::metrics::WorkloadMeta> {
    let Some(w) = &raw.workload else {
        return crate::metrics::WorkloadMeta::unknown();
    };
    let trust_domain = clusters
        .iter()
        .flat_map(|c| &c.endpoints)
        .find_map(|e| {
            e.identity
                .as_deref()?
                .strip_prefix("spiffe://")?
                .split('/')
                .next()
        })
        .unwrap_or("cluster.local");
    let sa = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let identity = format!("spiffe://{trust_domain}/ns/{}/sa/{sa}", w.namespace);
    crate::metrics::WorkloadMeta::of(
        if w.workload.is_empty() {
            &w.name
        } else {
            &w.workload
        },
        &w.namespace,
        Some(&identity),
        w.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
}

/// Workload port → the first service (by host name) whose endpoints are this workload on
/// that port.
fn inbound_services(
    own: &Arc<crate::metrics::WorkloadMeta>,
    targets: &[Arc<Target>],
) -> HashMap<u16, Arc<crate::metrics::ServiceMeta>> {
    let mut out: HashMap<u16, Arc<crate::metrics::ServiceMeta>> = HashMap::new();
    let mut sorted: Vec<&Arc<Target>> = targets.iter().filter(|t| t.gateway.is_none()).collect();
    sorted.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    for t in sorted {
        for e in &t.cluster.endpoints {
            if e.meta.workload == own.workload && e.meta.namespace == own.namespace {
                out.entry(e.addr.port())
                    .or_insert_with(|| Arc::clone(&t.service_meta));
            }
        }
    }
    out
}

/// Workloads by address (see [`Config::peers`]): the endpoints of the clusters, and the
/// mesh's other instances the snapshot lists (callers that are no endpoint of a service
/// in view). An address two different workloads share names neither.
fn peers(
    raw: &wire::Snapshot,
    clusters: &[Arc<Cluster>],
) -> FastMap<IpAddr, Arc<crate::metrics::WorkloadMeta>> {
    let mut out: FastMap<IpAddr, Arc<crate::metrics::WorkloadMeta>> = FastMap::default();
    let mut shared = std::collections::HashSet::new();
    let listed = raw.peers.iter().filter_map(|p| {
        let ip: IpAddr = p.address.parse().ok()?;
        let meta = crate::metrics::WorkloadMeta::of(
            &p.workload,
            &p.namespace,
            p.identity.as_deref(),
            p.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        Some((ip, meta))
    });
    let endpoints = clusters
        .iter()
        .flat_map(|c| &c.endpoints)
        .map(|e| (e.addr.ip(), Arc::clone(&e.meta)));
    for (ip, meta) in endpoints.chain(listed) {
        match out.get(&ip) {
            Some(m) if !Arc::ptr_eq(m, &meta) => {
                shared.insert(ip);
            }
            Some(_) => {}
            None => {
                out.insert(ip, meta);
            }
        }
    }
    for ip in shared {
        out.remove(&ip);
    }
    out
}

/// The policies of a port's (or virtual host's) HTTP rules, each with the request counter
/// its namesake had in the previous snapshot.
fn route_policies(
    res: &str,
    port: u16,
    routes: &[wire::HttpRoute],
    clusters: &HashMap<&str, Arc<Cluster>>,
    hostname: &str,
    old: &HashMap<(&str, u16, &str), &Arc<AtomicU64>>,
) -> Result<Vec<RoutePolicy>, ConfigError> {
    let mut policies = routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_policy(res, &format!("port {port} httpRoutes[{i}]"), r, clusters))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (p, r)) in policies.iter_mut().zip(routes).enumerate() {
        let name = if r.name.is_empty() {
            format!("#{i}")
        } else {
            r.name.clone()
        };
        if let Some(c) = old.get(&(hostname, port, name.as_str())) {
            p.requests = Arc::clone(c);
        }
    }
    Ok(policies)
}

/// The `host:port` names of the snapshot's STRICT_DNS endpoints.
pub fn dns_names(raw: &wire::Snapshot) -> Vec<String> {
    let mut names: Vec<String> = raw
        .clusters
        .iter()
        .filter(|c| c.discovery == wire::Discovery::StrictDns as i32)
        .flat_map(|c| c.endpoints.iter().map(|e| e.address.clone()))
        .filter(|a| cluster::dns_name(a).is_ok())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Resolves names with `resolver`; a name that does not resolve maps to no addresses
/// (its cluster answers 503 UH until it does) and is logged.
pub fn resolve_names(resolver: &Resolver, names: &[String]) -> HashMap<String, Vec<SocketAddr>> {
    names
        .iter()
        .map(|n| {
            let addrs = match resolver(n) {
                Ok(mut a) => {
                    a.sort();
                    a.dedup();
                    if a.is_empty() {
                        tracing::warn!("DNS: {n} resolved to no address");
                    }
                    a
                }
                Err(e) => {
                    tracing::warn!("DNS: cannot resolve {n}: {e}");
                    Vec::new()
                }
            };
            (n.clone(), addrs)
        })
        .collect()
}

/// Loads and converts a snapshot file; the error says which line or resource is wrong.
pub fn load_file(path: &std::path::Path, previous: Option<&Config>) -> Result<Config, String> {
    load_file_with(path, previous, &LoadEnv::default())
}

/// As [`load_file`], with certificate files found through `env`.
pub fn load_file_with(
    path: &std::path::Path,
    previous: Option<&Config>,
    env: &LoadEnv,
) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let raw =
        wire::Snapshot::from_text(&text, &path.display().to_string()).map_err(|e| e.to_string())?;
    Config::from_wire_with(raw, previous, env).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Result<Config, String> {
        let raw = wire::Snapshot::from_text(text, "s.yaml").map_err(|e| e.to_string())?;
        Config::from_wire(raw, None).map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
version: "1"
services:
- hostname: reviews.default.svc.cluster.local
  addresses: [240.240.0.1]
  ports: [{port: 9080, name: http-web, cluster: reviews}]
- hostname: db.default.svc.cluster.local
  ports: [{port: 5432, name: tcp-pg, cluster: db}]
clusters:
- name: reviews
  endpoints: [{address: "10.0.0.1:9080", proxied: true}, {address: "10.0.0.2:9080", healthy: false}]
- name: db
  endpoints: [{address: "10.0.0.3:5432"}]
"#;

    #[test]
    fn indexes_by_vip_endpoint_and_name() {
        let c = snap(GOOD).expect("good");
        let vip: SocketAddr = "240.240.0.1:9080".parse().expect("addr");
        assert_eq!(
            c.outbound_target(vip).map(|t| t.hostname.as_str()),
            Some("reviews.default.svc.cluster.local")
        );
        let ep: SocketAddr = "10.0.0.3:5432".parse().expect("addr");
        assert_eq!(
            c.outbound_target(ep).map(|t| t.protocol),
            Some(PortProtocol::Tcp)
        );
        assert!(c.target_by_name("reviews", 9080).is_some());
        assert!(c.target_by_name("reviews.default", 9080).is_some());
        assert!(c.target_by_name("reviews", 9081).is_none());
        let t = c.target_by_name("reviews", 9080).expect("target");
        assert_eq!(t.protocol, PortProtocol::Http);
        // Round robin skips the unhealthy endpoint.
        for _ in 0..4 {
            assert_eq!(t.cluster.pick().map(|e| e.addr.port()), Some(9080));
            assert!(t.cluster.pick().is_some_and(|e| e.healthy));
        }
    }

    #[test]
    fn short_names_two_services_share_resolve_to_neither() {
        let c = snap(
            "services:
- {hostname: reviews.default.svc.cluster.local, ports: [{port: 80, cluster: a}]}
- {hostname: reviews.prod.svc.cluster.local, ports: [{port: 80, cluster: a}]}
- {hostname: reviews, ports: [{port: 81, cluster: a}]}
clusters: [{name: a}]
",
        )
        .expect("good");
        assert!(c.target_by_name("reviews", 80).is_none(), "ambiguous");
        assert!(c.target_by_name("reviews.default", 80).is_some());
        assert!(c.target_by_name("reviews.prod.svc", 80).is_some());
        assert_eq!(
            c.target_by_name("reviews", 81).map(|t| t.hostname.as_str()),
            Some("reviews"),
            "a service whose name is the short name itself"
        );
    }

    #[test]
    fn trust_roots_must_be_certificates() {
        assert!(snap(GOOD).expect("good").trust_roots.is_none());
        let e = snap(
            "trustRoots: [\"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"]\n",
        )
        .expect_err("not a certificate");
        assert!(e.starts_with("trustRoots[0]: "), "{e}");
        let e = snap("trustRoots: [\"hello\"]\n").expect_err("no certificate");
        assert!(e.to_string().contains("no certificate"), "{e}");
    }

    #[test]
    fn an_unchanged_trust_bundle_keeps_its_store() {
        let ca = |n: &str| trellis_testkit::tls::TestCa::new(n).expect("ca").cert_pem;
        let (a, b) = (ca("root a"), ca("root b"));
        let with = |pems: &[&String]| wire::Snapshot {
            trust_roots: pems.iter().map(|p| (*p).clone()).collect(),
            ..Default::default()
        };
        let first = Config::from_wire(with(&[&a]), None).expect("converts");
        let same = Config::from_wire(with(&[&a]), Some(&first)).expect("converts");
        let store = |c: &Config| c.trust_roots.clone().expect("roots");
        assert!(Arc::ptr_eq(&store(&first), &store(&same)));
        let rotated = Config::from_wire(with(&[&a, &b]), Some(&same)).expect("converts");
        assert!(!Arc::ptr_eq(&store(&same), &store(&rotated)));
        assert_eq!(store(&rotated).roots.len(), 2);
    }

    #[test]
    fn bad_resources_are_named() {
        let e = snap("services:\n- hostname: a\n  ports: [{port: 80, cluster: nope}]\n")
            .expect_err("bad");
        assert_eq!(
            e,
            "services[0] \"a\": port 80: cluster \"nope\" is not defined"
        );
        let e = snap("clusters:\n- name: c\n  endpoints: [{address: \"10.0.0.1\"}]\n")
            .expect_err("bad");
        assert_eq!(
            e,
            "clusters[0] \"c\" endpoints[0]: address \"10.0.0.1\" is not ip:port (a host name needs discovery STRICT_DNS)"
        );
        let e = snap(
            "clusters:\n- name: c\n  discovery: STRICT_DNS\n  endpoints: [{address: \"api.example.com\"}]\n",
        )
        .expect_err("bad");
        assert_eq!(
            e,
            "clusters[0] \"c\" endpoints[0]: address \"api.example.com\" is not host:port"
        );
        let e = snap(
            "clusters:\n- name: c\n  discovery: ORIGINAL_DST\n  endpoints: [{address: \"10.0.0.1:80\"}]\n",
        )
        .expect_err("bad");
        assert!(
            e.contains("an ORIGINAL_DST cluster has no endpoints"),
            "{e}"
        );
        let e = snap("clusters:\n- name: c\n  discovery: DNS\n").expect_err("bad");
        assert!(
            e.contains("expected one of STATIC, STRICT_DNS, ORIGINAL_DST"),
            "{e}"
        );
        let e = snap("clusterz: []\n").expect_err("bad");
        assert!(
            e.starts_with(
                "s.yaml:1:1: clusterz: unknown field `clusterz` (did you mean `clusters`?)"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_wire_values_are_refused_with_the_resource() {
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.services[0].ports[0].protocol = Some(99);
        let e = Config::from_wire(raw, None).expect_err("bad protocol");
        assert_eq!(
            e.to_string(),
            "services[0] \"reviews.default.svc.cluster.local\": unknown protocol value 99"
        );
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.clusters[1].idle_timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        let e = Config::from_wire(raw, None).expect_err("negative duration");
        assert_eq!(
            e.to_string(),
            "clusters[1] \"db\": invalid duration -1s 0ns"
        );
        let mut raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        raw.outbound_traffic_policy = 7;
        let e = Config::from_wire(raw, None).expect_err("bad policy");
        assert_eq!(e.to_string(), "outboundTrafficPolicy: unknown value 7");
    }

    #[test]
    fn protocol_declaration_follows_istio() {
        use PortProtocol::*;
        assert_eq!(PortProtocol::declared(None, None, Some("http-web")), Http);
        assert_eq!(PortProtocol::declared(None, None, Some("grpc")), Http2);
        assert_eq!(PortProtocol::declared(None, None, Some("tcp-db")), Tcp);
        assert_eq!(PortProtocol::declared(None, None, Some("mongo")), Tcp);
        assert_eq!(PortProtocol::declared(None, None, Some("web")), Detect);
        assert_eq!(
            PortProtocol::declared(None, Some("kubernetes.io/h2c"), Some("tcp")),
            Http2
        );
        assert_eq!(
            PortProtocol::declared(Some(Protocol::Tls), None, Some("http")),
            Tcp
        );
        assert_eq!(PortProtocol::declared(None, None, None), Detect);
    }

    #[test]
    fn counters_survive_a_swap() {
        let a = snap(GOOD).expect("good");
        let t = a.target_by_name("db", 5432).expect("db");
        let ep = t.cluster.pick().expect("ep");
        ep.stats.requests.fetch_add(5, Ordering::Relaxed);
        let raw = wire::Snapshot::from_text(GOOD, "s.yaml").expect("parse");
        let b = Config::from_wire(raw, Some(&a)).expect("convert");
        let ep2 = b
            .target_by_name("db", 5432)
            .and_then(|t| t.cluster.pick())
            .expect("ep");
        assert_eq!(ep2.stats.requests.load(Ordering::Relaxed), 5);
    }
}
