//! DestinationRules into clusters: the default cluster of a service port and one per
//! subset, each with the traffic policy Istio would give it.
//!
//! Istio's merge rules: a subset's policy overrides the rule's field by field (load
//! balancer, connection pool, outlier detection, TLS), and at each level a
//! `portLevelSettings` entry for the port overrides that level's fields. So a field comes
//! from the subset's port-level settings, else the subset's policy, else the rule's
//! port-level settings, else the rule's policy.

use std::collections::BTreeMap;
use std::net::IpAddr;

use trellis_api::networking::{
    ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, OutlierDetection, SimpleLb,
    TrafficPolicy,
};
use trellis_xds::snapshot as wire;

use crate::translate::{TranslateError, cluster_name};

/// One endpoint of a service port as the registry knows it.
#[derive(Debug, Clone)]
pub struct EndpointRef {
    pub ip: IpAddr,
    /// The port the endpoint listens on for this service port.
    pub port: u16,
    pub labels: BTreeMap<String, String>,
    /// A Trellis proxy fronts it (HTTP travels as HTTP/2 between the proxies).
    pub proxied: bool,
    /// That proxy takes plaintext only on this port (PeerAuthentication DISABLE).
    pub plaintext: bool,
    pub identity: Option<String>,
    pub locality: Option<String>,
    /// The workload it is an instance of, and its namespace.
    pub workload: String,
    pub namespace: String,
}

/// The policy fields a cluster takes from a DestinationRule, after merging.
#[derive(Debug, Clone, Default)]
struct Effective<'a> {
    load_balancer: Option<&'a LoadBalancerSettings>,
    connection_pool: Option<&'a ConnectionPoolSettings>,
    outlier_detection: Option<&'a OutlierDetection>,
    tls: Option<&'a trellis_api::networking::ClientTlsSettings>,
}

impl<'a> Effective<'a> {
    /// `p`'s fields, then its port-level settings for `port`, over `self`.
    fn overlay(mut self, p: Option<&'a TrafficPolicy>, port: u16) -> Self {
        let Some(p) = p else { return self };
        self.load_balancer = p.load_balancer.as_ref().or(self.load_balancer);
        self.connection_pool = p.connection_pool.as_ref().or(self.connection_pool);
        self.outlier_detection = p.outlier_detection.as_ref().or(self.outlier_detection);
        self.tls = p.tls.as_ref().or(self.tls);
        if let Some(pl) = p
            .port_level_settings
            .iter()
            .find(|pl| pl.port.and_then(|s| s.number) == Some(u32::from(port)))
        {
            self.load_balancer = pl.load_balancer.as_ref().or(self.load_balancer);
            self.connection_pool = pl.connection_pool.as_ref().or(self.connection_pool);
            self.outlier_detection = pl.outlier_detection.as_ref().or(self.outlier_detection);
            self.tls = pl.tls.as_ref().or(self.tls);
        }
        self
    }
}

fn duration(d: Option<&trellis_api::common::Duration>) -> Option<prost_types::Duration> {
    d.map(|d| wire::from_std(d.0))
}

fn non_negative(v: Option<i32>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

/// Fills a cluster's policy fields from the merged policy.
fn apply(c: &mut wire::Cluster, e: &Effective<'_>) {
    if let Some(t) = e.tls {
        use trellis_api::networking::ClientTlsMode as M;
        c.tls = Some(wire::ClientTls {
            mode: match t.mode.unwrap_or(M::Disable) {
                M::Disable => wire::ClientTlsMode::TlsDisable,
                M::Simple => wire::ClientTlsMode::TlsSimple,
                M::Mutual => wire::ClientTlsMode::TlsMutual,
                M::IstioMutual => wire::ClientTlsMode::TlsIstioMutual,
            } as i32,
            ca_certificates: t.ca_certificates.clone(),
            client_certificate: t.client_certificate.clone(),
            private_key: t.private_key.clone(),
            credential_name: t.credential_name.clone(),
            sni: t.sni.clone(),
            subject_alt_names: t.subject_alt_names.clone(),
            insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        });
    }
    if let Some(lb) = e.load_balancer {
        match lb.simple {
            Some(SimpleLb::LeastRequest | SimpleLb::LeastConn) => {
                c.load_balancer = wire::LoadBalancer::LeastRequest as i32;
            }
            Some(SimpleLb::Random) => c.load_balancer = wire::LoadBalancer::Random as i32,
            Some(SimpleLb::Passthrough) => {
                // Straight to the address the app connected to.
                c.discovery = wire::Discovery::OriginalDst as i32;
                c.endpoints.clear();
            }
            Some(SimpleLb::RoundRobin | SimpleLb::Unspecified) | None => {}
        }
        if let Some(ch) = &lb.consistent_hash {
            c.consistent_hash = Some(wire::ConsistentHash {
                http_header_name: ch.http_header_name.clone(),
                http_cookie: ch.http_cookie.as_ref().map(|k| k.name.clone()),
                // With a ttl, the proxy sets the cookie when a request has none.
                http_cookie_ttl: ch
                    .http_cookie
                    .as_ref()
                    .and_then(|k| duration(k.ttl.as_ref())),
                http_cookie_path: ch.http_cookie.as_ref().and_then(|k| k.path.clone()),
                use_source_ip: ch.use_source_ip,
                http_query_parameter_name: ch.http_query_parameter_name.clone(),
                minimum_ring_size: ch
                    .ring_hash
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(ch.minimum_ring_size)
                    .or(ch.maglev.as_ref().and_then(|m| m.table_size)),
            });
        }
    }
    // Locality-aware load balancing is on by default in Istio's mesh config: failover
    // takes effect with outlier detection, `distribute` on its own.
    let setting = e
        .load_balancer
        .and_then(|lb| lb.locality_lb_setting.as_ref());
    let enabled = setting.and_then(|s| s.enabled) != Some(false);
    let distribute = setting.is_some_and(|s| !s.distribute.is_empty());
    if enabled && (distribute || e.outlier_detection.is_some()) {
        c.locality_lb = Some(wire::LocalityLb {
            distribute: setting
                .map(|s| {
                    s.distribute
                        .iter()
                        .map(|d| wire::LocalityDistribute {
                            from: d.from.clone().unwrap_or_else(|| "*".into()),
                            to: d.to.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            failover: setting
                .map(|s| {
                    s.failover
                        .iter()
                        .filter_map(|f| {
                            Some(wire::LocalityFailover {
                                from: f.from.clone()?,
                                to: f.to.clone()?,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    if let Some(lb) = e.load_balancer {
        let warmup = match (&lb.warmup, &lb.warmup_duration_secs) {
            (Some(w), _) => Some(wire::Warmup {
                duration: duration(Some(&w.duration)),
                minimum_percent: w.minimum_percent,
                aggression: w.aggression,
            }),
            (None, Some(d)) => Some(wire::Warmup {
                duration: duration(Some(d)),
                ..Default::default()
            }),
            (None, None) => None,
        };
        c.warmup = warmup;
    }
    if let Some(cp) = e.connection_pool {
        let tcp = cp.tcp.as_ref();
        let http = cp.http.as_ref();
        if let Some(t) = tcp.and_then(|t| t.connect_timeout.as_ref()) {
            c.connect_timeout = duration(Some(t));
        }
        if let Some(t) = http
            .and_then(|h| h.idle_timeout.as_ref())
            .or(tcp.and_then(|t| t.idle_timeout.as_ref()))
        {
            c.idle_timeout = duration(Some(t));
        }
        let breakers = wire::CircuitBreakers {
            max_connections: non_negative(tcp.and_then(|t| t.max_connections)),
            max_pending_requests: non_negative(http.and_then(|h| h.http1_max_pending_requests)),
            max_requests: non_negative(http.and_then(|h| h.http2_max_requests)),
            max_retries: non_negative(http.and_then(|h| h.max_retries)),
            max_requests_per_connection: non_negative(
                http.and_then(|h| h.max_requests_per_connection),
            )
            .filter(|n| *n > 0),
            max_concurrent_streams: non_negative(http.and_then(|h| h.max_concurrent_streams))
                .filter(|n| *n > 0),
        };
        if breakers != wire::CircuitBreakers::default() {
            c.circuit_breakers = Some(breakers);
        }
        // Trellis upgrades HTTP between proxies to HTTP/2 unless told not to (Istio's mesh
        // default is the other way round; see docs/compatibility.md).
        c.keep_client_protocol = http.is_some_and(|h| {
            h.h2_upgrade_policy == Some(trellis_api::networking::H2UpgradePolicy::DoNotUpgrade)
                || h.use_client_protocol == Some(true)
        });
        if let Some(k) = tcp.and_then(|t| t.tcp_keepalive.as_ref()) {
            c.tcp_keepalive = Some(wire::TcpKeepalive {
                probes: k.probes,
                time: duration(k.time.as_ref()),
                interval: duration(k.interval.as_ref()),
            });
        }
    }
    if let Some(od) = e.outlier_detection {
        c.outlier_detection = Some(wire::OutlierDetection {
            consecutive_5xx_errors: od
                .consecutive_5xx_errors
                .or(non_negative(od.consecutive_errors)),
            base_ejection_time: duration(od.base_ejection_time.as_ref()),
            max_ejection_percent: non_negative(od.max_ejection_percent),
            min_health_percent: non_negative(od.min_health_percent),
            consecutive_gateway_errors: od.consecutive_gateway_errors,
            consecutive_local_origin_failures: od.consecutive_local_origin_failures,
            split_external_local_origin_errors: od.split_external_local_origin_errors,
            interval: duration(od.interval.as_ref()),
        });
    }
}

fn endpoint(e: &EndpointRef) -> wire::Endpoint {
    let address = match e.ip {
        IpAddr::V4(v4) => format!("{v4}:{}", e.port),
        IpAddr::V6(v6) => format!("[{v6}]:{}", e.port),
    };
    wire::Endpoint {
        address,
        proxied: e.proxied,
        plaintext: e.plaintext,
        labels: e.labels.clone(),
        identity: e.identity.clone(),
        locality: e.locality.clone(),
        workload: e.workload.clone(),
        namespace: e.namespace.clone(),
        ..Default::default()
    }
}

/// The clusters of one service port: `outbound|<port>||<fqdn>` with every endpoint, and
/// `outbound|<port>|<subset>|<fqdn>` per subset of `dr` with the endpoints whose labels
/// include the subset's, each with its merged traffic policy. `dr` is the DestinationRule
/// that applies to the host (choosing it is the registry's job), with its namespace.
pub fn clusters_for_port(
    fqdn: &str,
    port: u16,
    endpoints: &[EndpointRef],
    dr: Option<(&DestinationRule, &str)>,
) -> Result<Vec<wire::Cluster>, TranslateError> {
    let top = Effective::default().overlay(dr.and_then(|(d, _)| d.traffic_policy.as_ref()), port);
    let mut default = wire::Cluster {
        name: cluster_name(port, None, fqdn),
        endpoints: endpoints.iter().map(endpoint).collect(),
        ..Default::default()
    };
    apply(&mut default, &top);
    let mut out = vec![default];
    if let Some((d, ns)) = dr {
        for (i, s) in d.subsets.iter().enumerate() {
            if s.name.is_empty() {
                return Err(TranslateError {
                    path: format!("DestinationRule {ns}: spec.subsets[{i}].name"),
                    reason: "a subset needs a name".into(),
                });
            }
            let mut c = wire::Cluster {
                name: cluster_name(port, Some(&s.name), fqdn),
                endpoints: endpoints
                    .iter()
                    .filter(|e| s.labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)))
                    .map(endpoint)
                    .collect(),
                ..Default::default()
            };
            apply(
                &mut c,
                &top.clone().overlay(s.traffic_policy.as_ref(), port),
            );
            out.push(c);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_api::{LoadOptions, Spec, parse_text};

    fn dr(yaml: &str) -> DestinationRule {
        let parsed = parse_text(yaml, "dr.yaml", &LoadOptions::default());
        match parsed[0].resource().map(|r| &r.spec) {
            Some(Spec::DestinationRule(d)) => d.clone(),
            _ => panic!("{:?}", parsed[0].diagnostics),
        }
    }

    fn ep(last: u8, version: &str) -> EndpointRef {
        EndpointRef {
            ip: IpAddr::from([10, 0, 0, last]),
            port: 9080,
            labels: BTreeMap::from([
                ("app".to_string(), "reviews".to_string()),
                ("version".to_string(), version.to_string()),
            ]),
            proxied: true,
            plaintext: false,
            identity: None,
            locality: None,
            workload: format!("reviews-{version}"),
            namespace: "shop".into(),
        }
    }

    #[test]
    fn subsets_select_by_labels_and_policies_merge_as_in_istio() {
        let d = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s, tcpKeepalive: {time: 600s, interval: 30s, probes: 4}}
      http: {http1MaxPendingRequests: 10, maxRetries: 3, maxRequestsPerConnection: 50, maxConcurrentStreams: 8}
    outlierDetection: {consecutive5xxErrors: 7, baseEjectionTime: 1m, consecutiveGatewayErrors: 2, interval: 5s}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: RANDOM}
    - port: {number: 9999}
      outlierDetection: {consecutive5xxErrors: 1}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: user, ttl: 0s}}
      connectionPool:
        tcp: {maxConnections: 1}
      portLevelSettings:
      - port: {number: 9080}
        outlierDetection: {consecutive5xxErrors: 2}
"#);
        let eps = [ep(1, "v1"), ep(2, "v2"), ep(3, "v1")];
        let cs = clusters_for_port(
            "reviews.shop.svc.cluster.local",
            9080,
            &eps,
            Some((&d, "shop/reviews")),
        )
        .expect("translates");
        let names: Vec<&str> = cs.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "outbound|9080||reviews.shop.svc.cluster.local",
                "outbound|9080|v1|reviews.shop.svc.cluster.local",
                "outbound|9080|v2|reviews.shop.svc.cluster.local",
            ]
        );
        let (all, v1, v2) = (&cs[0], &cs[1], &cs[2]);
        assert_eq!(all.endpoints.len(), 3);
        let v1_addrs: Vec<&str> = v1.endpoints.iter().map(|e| e.address.as_str()).collect();
        assert_eq!(v1_addrs, ["10.0.0.1:9080", "10.0.0.3:9080"]);
        assert_eq!(v2.endpoints.len(), 1);
        // The rule's port-level RANDOM beats its LEAST_REQUEST for port 9080.
        assert_eq!(all.load_balancer, wire::LoadBalancer::Random as i32);
        assert_eq!(v1.load_balancer, wire::LoadBalancer::Random as i32);
        // The rule's other fields everywhere a subset does not override them.
        let cb = v1.circuit_breakers.as_ref().expect("breakers");
        assert_eq!(
            (cb.max_connections, cb.max_pending_requests),
            (Some(100), Some(10))
        );
        assert_eq!(
            v1.connect_timeout,
            Some(wire::from_std(std::time::Duration::from_secs(2)))
        );
        assert_eq!(
            v1.outlier_detection
                .as_ref()
                .and_then(|o| o.consecutive_5xx_errors),
            Some(7)
        );
        let cb = v1.circuit_breakers.as_ref().expect("breakers");
        assert_eq!(
            (cb.max_retries, cb.max_requests_per_connection),
            (Some(3), Some(50))
        );
        assert_eq!(cb.max_concurrent_streams, Some(8));
        let ka = v1.tcp_keepalive.as_ref().expect("keepalive");
        assert_eq!(ka.probes, Some(4));
        assert_eq!(
            ka.time,
            Some(wire::from_std(std::time::Duration::from_secs(600)))
        );
        let od = v1.outlier_detection.as_ref().expect("outlier detection");
        assert_eq!(od.consecutive_gateway_errors, Some(2));
        assert_eq!(
            od.interval,
            Some(wire::from_std(std::time::Duration::from_secs(5)))
        );
        // v2: its own load balancer (sticky cookie) and pool replace the rule's whole
        // fields; its port-level outlier detection wins over everything.
        assert_eq!(
            v2.consistent_hash
                .as_ref()
                .and_then(|h| h.http_cookie.as_deref()),
            Some("user")
        );
        let cb = v2.circuit_breakers.as_ref().expect("breakers");
        assert_eq!(
            (cb.max_connections, cb.max_pending_requests),
            (Some(1), None)
        );
        assert_eq!(
            v2.connect_timeout, None,
            "the subset's pool has no connectTimeout"
        );
        assert_eq!(
            v2.outlier_detection
                .as_ref()
                .and_then(|o| o.consecutive_5xx_errors),
            Some(2)
        );
        // Another port: the 9999 port-level settings apply there only.
        let other = clusters_for_port(
            "reviews.shop.svc.cluster.local",
            9999,
            &eps,
            Some((&d, "shop/reviews")),
        )
        .expect("translates");
        assert_eq!(
            other[0].load_balancer,
            wire::LoadBalancer::LeastRequest as i32
        );
        assert_eq!(
            other[0]
                .outlier_detection
                .as_ref()
                .and_then(|o| o.consecutive_5xx_errors),
            Some(1)
        );
    }

    #[test]
    fn locality_warmup_and_cookie_settings_carry_over() {
        let d = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    loadBalancer:
      simple: ROUND_ROBIN
      warmup: {duration: 60s, minimumPercent: 5}
      localityLbSetting:
        failover: [{from: eu, to: us}]
  subsets:
  - name: sticky
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpCookie: {name: s, ttl: 1h, path: /app}}
        localityLbSetting:
          distribute: [{from: "eu/*", to: {"eu/*": 70, "us/*": 30}}]
"#);
        let eps = [ep(1, "v1")];
        let cs = clusters_for_port(
            "reviews.shop.svc.cluster.local",
            9080,
            &eps,
            Some((&d, "shop/reviews")),
        )
        .expect("translates");
        let lb = cs[0]
            .locality_lb
            .as_ref()
            .expect("failover with outlier detection");
        assert_eq!(
            (lb.failover[0].from.as_str(), lb.failover[0].to.as_str()),
            ("eu", "us")
        );
        let w = cs[0].warmup.as_ref().expect("warmup");
        assert_eq!(
            w.duration,
            Some(wire::from_std(std::time::Duration::from_secs(60)))
        );
        assert_eq!(w.minimum_percent, Some(5.0));
        let sticky = &cs[1];
        let ch = sticky.consistent_hash.as_ref().expect("hash");
        assert_eq!(ch.http_cookie.as_deref(), Some("s"));
        assert_eq!(
            ch.http_cookie_ttl,
            Some(wire::from_std(std::time::Duration::from_secs(3600)))
        );
        assert_eq!(ch.http_cookie_path.as_deref(), Some("/app"));
        let lb = sticky.locality_lb.as_ref().expect("distribute");
        assert_eq!(lb.distribute[0].to.get("us/*"), Some(&30));
        assert!(
            sticky.warmup.is_none(),
            "the subset's loadBalancer replaces the rule's"
        );
        // Explicitly off: no locality plan.
        let off = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec:
  host: r
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    loadBalancer: {localityLbSetting: {enabled: false}}
"#);
        let cs = clusters_for_port(
            "r.default.svc.cluster.local",
            80,
            &eps,
            Some((&off, "default/r")),
        )
        .expect("translates");
        assert!(cs[0].locality_lb.is_none());
    }

    #[test]
    fn passthrough_and_no_rule() {
        let d = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ext}
spec:
  host: ext.example.com
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
"#);
        let eps = [ep(1, "v1")];
        let cs = clusters_for_port("ext.example.com", 443, &eps, Some((&d, "default/ext")))
            .expect("translates");
        assert_eq!(cs[0].discovery, wire::Discovery::OriginalDst as i32);
        assert!(cs[0].endpoints.is_empty());
        let cs = clusters_for_port("ext.example.com", 443, &eps, None).expect("translates");
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].endpoints[0].address, "10.0.0.1:9080");
        assert!(cs[0].circuit_breakers.is_none() && cs[0].outlier_detection.is_none());
    }

    #[test]
    fn h2_upgrade_policy_and_use_client_protocol_keep_the_clients_protocol() {
        let eps = [ep(1, "v1")];
        for (http, keep) in [
            ("{h2UpgradePolicy: DO_NOT_UPGRADE}", true),
            ("{useClientProtocol: true}", true),
            ("{h2UpgradePolicy: UPGRADE}", false),
            ("{h2UpgradePolicy: DEFAULT}", false),
            ("{maxRetries: 3}", false),
        ] {
            let d = dr(&format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: shop}}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      http: {http}\n"
            ));
            let cs = clusters_for_port(
                "reviews.shop.svc.cluster.local",
                9080,
                &eps,
                Some((&d, "shop/reviews")),
            )
            .expect("translates");
            assert_eq!(cs[0].keep_client_protocol, keep, "{http}");
        }
        let cs = clusters_for_port("reviews.shop.svc.cluster.local", 9080, &eps, None)
            .expect("translates");
        assert!(
            !cs[0].keep_client_protocol,
            "HTTP/2 between proxies by default"
        );
    }

    #[test]
    fn tls_settings_follow_port_level_and_subset_precedence() {
        // Istio's egress TLS origination task: TLS on port 443 only.
        let d = dr(r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: edition-cnn-com}
spec:
  host: edition.cnn.com
  trafficPolicy:
    portLevelSettings:
    - port: {number: 443}
      tls: {mode: SIMPLE, sni: edition.cnn.com}
  subsets:
  - name: mutual
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, subjectAltNames: [a.example]}
"#);
        let eps = [ep(1, "v1")];
        let on = |port| {
            clusters_for_port(
                "edition.cnn.com",
                port,
                &eps,
                Some((&d, "default/edition-cnn-com")),
            )
            .expect("translates")
        };
        let tls443 = on(443)[0].tls.clone().expect("port 443 has tls");
        assert_eq!(tls443.mode, wire::ClientTlsMode::TlsSimple as i32);
        assert_eq!(tls443.sni.as_deref(), Some("edition.cnn.com"));
        assert!(on(80)[0].tls.is_none(), "port 80 stays plaintext");
        // The subset's own policy wins over the port-level one.
        let subset = on(443)
            .into_iter()
            .find(|c| c.name.contains("|mutual|"))
            .expect("subset cluster");
        let t = subset.tls.expect("subset tls");
        assert_eq!(t.mode, wire::ClientTlsMode::TlsMutual as i32);
        assert_eq!(t.client_certificate.as_deref(), Some("/c.pem"));
        assert_eq!(t.subject_alt_names, ["a.example"]);
    }
}
