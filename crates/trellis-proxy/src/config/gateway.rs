//! Gateway mode: the ports a gateway serves, their servers (hosts, TLS) and the virtual
//! hosts of the VirtualServices bound to them.
//!
//! Certificates are read when the snapshot converts, so a missing or malformed file
//! refuses the snapshot with the file's name (and a running gateway keeps its last good
//! one); a handshake never meets a half-loaded certificate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use trellis_xds::snapshot::{self as wire, ServerTlsMode};

use super::{ConfigError, Target, bad, port_u16};

/// Where `credentialName` certificates live unless `--credentials-dir` says otherwise:
/// `<dir>/<credentialName>/tls.crt`, `tls.key` and, for MUTUAL, `ca.crt`.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/etc/trellis/credentials";

/// Resolves a `host:port` name to addresses (STRICT_DNS clusters).
pub type Resolver = Arc<dyn Fn(&str) -> std::io::Result<Vec<std::net::SocketAddr>> + Send + Sync>;

/// The system's resolver (getaddrinfo: /etc/hosts, then DNS).
pub fn system_resolver() -> Resolver {
    Arc::new(|name: &str| {
        std::net::ToSocketAddrs::to_socket_addrs(name).map(|addrs| addrs.collect())
    })
}

/// What converting a snapshot needs from the proxy's environment.
#[derive(Clone)]
pub struct LoadEnv {
    pub credentials_dir: PathBuf,
    pub resolver: Resolver,
    /// `--num-trusted-proxies`: overrides the snapshot's `settings.numTrustedProxies`.
    pub num_trusted_proxies: Option<u32>,
}

impl std::fmt::Debug for LoadEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadEnv")
            .field("credentials_dir", &self.credentials_dir)
            .finish_non_exhaustive()
    }
}

impl Default for LoadEnv {
    fn default() -> Self {
        LoadEnv {
            credentials_dir: PathBuf::from(DEFAULT_CREDENTIALS_DIR),
            resolver: system_resolver(),
            num_trusted_proxies: None,
        }
    }
}

/// A host name pattern of a Gateway server or a VirtualService: `*`, `*.example.com` or
/// an exact name (compared case-insensitively, without a port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
    Exact(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> HostPattern {
        // Gateway hosts may carry a namespace (`ns/host`, `./host`, `*/host`).
        let host = s
            .rsplit_once('/')
            .map_or(s, |(_, h)| h)
            .to_ascii_lowercase();
        if host == "*" {
            HostPattern::Any
        } else if let Some(rest) = host.strip_prefix('*') {
            HostPattern::Suffix(rest.to_string())
        } else {
            HostPattern::Exact(host)
        }
    }

    /// How well this pattern matches `host` (lower-case, no port): `None` when it does
    /// not; more specific patterns rank higher.
    pub fn rank(&self, host: &str) -> Option<usize> {
        match self {
            HostPattern::Any => Some(0),
            HostPattern::Suffix(s) => {
                (host.len() > s.len() && host.ends_with(s.as_str())).then_some(1 + s.len())
            }
            HostPattern::Exact(e) => (e == host).then_some(usize::MAX),
        }
    }
}

fn best_rank(patterns: &[HostPattern], host: &str) -> Option<usize> {
    patterns.iter().filter_map(|p| p.rank(host)).max()
}

/// The item whose patterns match `host` most specifically; the first one among equals.
fn most_specific<'a, T>(
    items: impl Iterator<Item = &'a T>,
    host: &str,
    patterns: impl Fn(&T) -> &[HostPattern],
) -> Option<&'a T> {
    let mut best: Option<(usize, &T)> = None;
    for item in items {
        if let Some(r) = best_rank(patterns(item), host) {
            if best.is_none_or(|(b, _)| r > b) {
                best = Some((r, item));
            }
        }
    }
    best.map(|(_, item)| item)
}

/// The host of a Host header or `:authority`: lower-case, without port or trailing dot.
pub fn request_host(authority: &str) -> String {
    let host = if authority.starts_with('[') {
        // [v6]:port
        authority
            .split_once(']')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// One VirtualService bound to a gateway server.
#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<HostPattern>,
    pub target: Arc<Target>,
}

/// What a gateway server does with a connection.
#[derive(Debug, Clone)]
pub enum ServerKind {
    /// Plain HTTP; `https_redirect` answers every request with a 301 to https.
    Http { https_redirect: bool },
    /// TLS terminated here with this configuration, then HTTP.
    Https(Arc<ServerConfig>),
    /// TLS passed through untouched, routed by the ClientHello's SNI.
    TlsPassthrough,
    /// Opaque TCP.
    Tcp,
}

impl ServerKind {
    /// Whether connections start with a TLS ClientHello.
    pub fn is_tls(&self) -> bool {
        matches!(self, ServerKind::Https(_) | ServerKind::TlsPassthrough)
    }
}

/// Which server a TLS connection was accepted for: a request on it may only go to a host of
/// that same server (else a client could hand-shake for a server without client
/// certificates and then name a host of one that requires them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKey {
    pub gateway: Arc<str>,
    pub hosts: Vec<HostPattern>,
}

#[derive(Debug)]
pub struct GatewayServer {
    /// "namespace/name" of the Gateway.
    pub gateway: Arc<str>,
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub kind: ServerKind,
    pub virtual_hosts: Vec<VirtualHost>,
}

impl GatewayServer {
    pub fn key(&self) -> ServerKey {
        ServerKey {
            gateway: Arc::clone(&self.gateway),
            hosts: self.hosts.clone(),
        }
    }

    /// The virtual host for a request's host, the most specific domain winning.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        most_specific(self.virtual_hosts.iter(), host, |v| &v.domains)
    }
}

#[derive(Debug)]
pub struct GatewayPort {
    pub port: u16,
    pub bind: Option<IpAddr>,
    pub servers: Vec<GatewayServer>,
}

impl GatewayPort {
    /// Whether connections to this port start with a TLS handshake.
    pub fn is_tls(&self) -> bool {
        self.servers.iter().any(|s| s.kind.is_tls())
    }

    /// Whether the port carries opaque TCP.
    pub fn is_tcp(&self) -> bool {
        self.servers
            .iter()
            .any(|s| matches!(s.kind, ServerKind::Tcp))
    }

    fn best<'a>(
        &'a self,
        host: &str,
        keep: impl Fn(&ServerKind) -> bool,
    ) -> Option<&'a GatewayServer> {
        most_specific(self.servers.iter().filter(|s| keep(&s.kind)), host, |s| {
            &s.hosts
        })
    }

    /// The server for an HTTP request to `host` on a plaintext (`tls == false`) or
    /// terminated TLS connection: the one whose hosts match most specifically.
    pub fn server(&self, host: &str, tls: bool) -> Option<&GatewayServer> {
        self.best(host, |k| match k {
            ServerKind::Http { .. } => !tls,
            ServerKind::Https(_) => tls,
            _ => false,
        })
    }

    /// The TLS server for a ClientHello's SNI; without SNI (or with one no server names),
    /// the port's first server that terminates TLS.
    pub fn tls_server(&self, sni: Option<&str>) -> Option<&GatewayServer> {
        let by_sni = sni.and_then(|name| self.best(&name.to_ascii_lowercase(), ServerKind::is_tls));
        by_sni.or_else(|| {
            self.servers
                .iter()
                .find(|s| matches!(s.kind, ServerKind::Https(_)))
        })
    }

    /// The TLS-terminating server for a handshake, by SNI (the first one without SNI).
    pub fn https_server(&self, sni: Option<&str>) -> Option<&GatewayServer> {
        let by_sni = sni.and_then(|name| {
            self.best(&name.to_ascii_lowercase(), |k| {
                matches!(k, ServerKind::Https(_))
            })
        });
        by_sni.or_else(|| {
            self.servers
                .iter()
                .find(|s| matches!(s.kind, ServerKind::Https(_)))
        })
    }

    /// The TLS configuration to terminate a handshake with, by SNI.
    pub fn tls_for(&self, sni: Option<&str>) -> Option<Arc<ServerConfig>> {
        let by_sni = sni.and_then(|name| {
            self.best(&name.to_ascii_lowercase(), |k| {
                matches!(k, ServerKind::Https(_))
            })
        });
        let s = by_sni.or_else(|| {
            self.servers
                .iter()
                .find(|s| matches!(s.kind, ServerKind::Https(_)))
        })?;
        match &s.kind {
            ServerKind::Https(c) => Some(Arc::clone(c)),
            _ => None,
        }
    }
}

fn read_pem_certs(res: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(res, format!("certificate file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(
            res,
            format!(
                "certificate file {}: no PEM certificate in it",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Builds an HTTPS server's TLS configuration from its files.
fn server_tls(
    res: &str,
    tls: &wire::ServerTls,
    env: &LoadEnv,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let mode = ServerTlsMode::try_from(tls.mode)
        .map_err(|_| bad(res, format!("unknown TLS mode {}", tls.mode)))?;
    let (cert, key, ca) = match &tls.credential_name {
        Some(name) => {
            let dir = env.credentials_dir.join(name);
            let mut ca = dir.join("ca.crt");
            if !ca.exists() {
                // Istio also reads the CA from a separate `<name>-cacert` secret.
                ca = env
                    .credentials_dir
                    .join(format!("{name}-cacert"))
                    .join("ca.crt");
            }
            (dir.join("tls.crt"), dir.join("tls.key"), Some(ca))
        }
        None => match (&tls.server_certificate, &tls.private_key) {
            (Some(c), Some(k)) => (
                PathBuf::from(c),
                PathBuf::from(k),
                tls.ca_certificates.as_ref().map(PathBuf::from),
            ),
            _ => {
                return Err(bad(
                    res,
                    "TLS needs credentialName, or serverCertificate and privateKey",
                ));
            }
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(res, format!("TLS: {e}")))?;
    let builder = match mode {
        ServerTlsMode::Simple => builder.with_no_client_auth(),
        ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual => {
            let Some(ca) = ca else {
                return Err(bad(res, "MUTUAL TLS needs caCertificates"));
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in read_pem_certs(res, &ca)? {
                roots
                    .add(c)
                    .map_err(|e| bad(res, format!("CA file {}: {e}", ca.display())))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = if mode == ServerTlsMode::OptionalMutual {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| bad(res, format!("client verifier: {e}")))?,
            )
        }
        ServerTlsMode::Passthrough | ServerTlsMode::AutoPassthrough => {
            return Err(bad(
                res,
                format!(
                    "TLS mode {} is not supported by Trellis gateways yet (SIMPLE, MUTUAL and OPTIONAL_MUTUAL are)",
                    mode.name()
                ),
            ));
        }
        ServerTlsMode::IstioMutual => {
            return Err(bad(
                res,
                "TLS mode ISTIO_MUTUAL needs the mesh CA, which Trellis gateways do not have yet",
            ));
        }
    };
    let certs = read_pem_certs(res, &cert)?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| bad(res, format!("private key file {}: {e}", key.display())))?;
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(res, format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Converts the snapshot's gateway ports. `make_target` compiles a virtual host's routes
/// (the same way a service port's are compiled).
pub(super) fn gateway_ports(
    raw: &[wire::GatewayPort],
    env: &LoadEnv,
    mut make_target: impl FnMut(&str, u16, &wire::VirtualHost, Arc<str>) -> Result<Target, ConfigError>,
) -> Result<HashMap<u16, Arc<GatewayPort>>, ConfigError> {
    let mut out = HashMap::new();
    for (i, p) in raw.iter().enumerate() {
        let res = format!("gatewayPorts[{i}]");
        let port = port_u16(&res, p.port)?;
        let bind = match &p.bind {
            None => None,
            Some(b) => Some(
                b.parse()
                    .map_err(|_| bad(&res, format!("bind {b:?} is not an IP address")))?,
            ),
        };
        let mut servers = Vec::with_capacity(p.servers.len());
        for (j, s) in p.servers.iter().enumerate() {
            let res = format!("{res} port {port} servers[{j}] of gateway {:?}", s.gateway);
            let protocol = wire::Protocol::try_from(s.protocol)
                .map_err(|_| bad(&res, format!("unknown protocol {}", s.protocol)))?;
            let passthrough = s
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == ServerTlsMode::Passthrough as i32);
            let kind = match protocol {
                wire::Protocol::Http | wire::Protocol::Http2 | wire::Protocol::Grpc => {
                    ServerKind::Http {
                        https_redirect: s.tls.as_ref().is_some_and(|t| t.https_redirect),
                    }
                }
                wire::Protocol::Https | wire::Protocol::Tls if passthrough => {
                    ServerKind::TlsPassthrough
                }
                wire::Protocol::Https => {
                    let Some(t) = &s.tls else {
                        return Err(bad(&res, "an HTTPS server needs tls settings"));
                    };
                    ServerKind::Https(server_tls(&res, t, env)?)
                }
                wire::Protocol::Tls => {
                    return Err(bad(
                        &res,
                        "a TLS server is passed through: give tls.mode PASSTHROUGH (or use HTTPS to terminate)",
                    ));
                }
                wire::Protocol::Tcp
                | wire::Protocol::Mongo
                | wire::Protocol::Mysql
                | wire::Protocol::Redis => ServerKind::Tcp,
                other => {
                    return Err(bad(
                        &res,
                        format!(
                            "protocol {other:?} is not supported on gateways (HTTP, HTTPS, TLS and TCP are)"
                        ),
                    ));
                }
            };
            if s.hosts.is_empty() {
                return Err(bad(&res, "a server needs at least one host"));
            }
            let gateway: Arc<str> = Arc::from(s.gateway.as_str());
            let virtual_hosts = s
                .virtual_hosts
                .iter()
                .map(|v| {
                    Ok(VirtualHost {
                        name: v.name.clone(),
                        domains: v.domains.iter().map(|d| HostPattern::parse(d)).collect(),
                        target: Arc::new(make_target(&res, port, v, Arc::clone(&gateway))?),
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            servers.push(GatewayServer {
                gateway,
                name: s.name.clone().unwrap_or_else(|| format!("#{j}")),
                hosts: s.hosts.iter().map(|h| HostPattern::parse(h)).collect(),
                kind,
                virtual_hosts,
            });
        }
        // A port speaks one family: HTTP, TLS (terminated or passed through, by SNI), or
        // TCP.
        let family = |k: &ServerKind| match k {
            ServerKind::Http { .. } => "HTTP",
            ServerKind::Https(_) | ServerKind::TlsPassthrough => "TLS",
            ServerKind::Tcp => "TCP",
        };
        if let Some(first) = servers.first() {
            let f = family(&first.kind);
            if let Some(other) = servers.iter().find(|s| family(&s.kind) != f) {
                return Err(bad(
                    &res,
                    format!(
                        "port {port} mixes {f} and {} servers; a port speaks one of HTTP, TLS or TCP",
                        family(&other.kind)
                    ),
                ));
            }
        }
        if out
            .insert(
                port,
                Arc::new(GatewayPort {
                    port,
                    bind,
                    servers,
                }),
            )
            .is_some()
        {
            return Err(bad(res, format!("port {port} is listed twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_rank_exact_over_wildcards() {
        let exact = HostPattern::parse("bookinfo/Shop.example.com");
        let suffix = HostPattern::parse("*.example.com");
        let any = HostPattern::parse("*");
        assert_eq!(exact, HostPattern::Exact("shop.example.com".into()));
        let host = "shop.example.com";
        let (e, s, a) = (
            exact.rank(host).expect("exact"),
            suffix.rank(host).expect("suffix"),
            any.rank(host).expect("any"),
        );
        assert!(e > s && s > a);
        assert_eq!(suffix.rank("example.com"), None);
        assert_eq!(exact.rank("shop.example.org"), None);
    }

    #[test]
    fn request_hosts_lose_port_case_and_trailing_dot() {
        assert_eq!(request_host("Shop.Example.com:8443"), "shop.example.com");
        assert_eq!(request_host("shop.example.com."), "shop.example.com");
        assert_eq!(request_host("[::1]:80"), "::1");
    }
}
