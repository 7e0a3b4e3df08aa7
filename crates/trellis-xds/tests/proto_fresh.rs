//! The hand-written prost types match `proto/trellis/snapshot/v1/snapshot.proto`: the file
//! is compiled here (protox, no system protoc), a snapshot with every field set is encoded
//! from Rust, decoded with the compiled descriptors, and must carry no unknown field, leave
//! no declared field unset, and come back to Rust unchanged.

use std::collections::BTreeMap;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, ReflectMessage, Value};
use trellis_xds::snapshot::*;

fn pool() -> DescriptorPool {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let fds = protox::compile(["trellis/snapshot/v1/snapshot.proto"], [dir])
        .expect("the .proto compiles");
    DescriptorPool::from_file_descriptor_set(fds).expect("descriptor pool")
}

fn d(ms: u64) -> Option<prost_types::Duration> {
    Some(from_std(std::time::Duration::from_millis(ms)))
}

/// A string match with every field set (valid or not does not matter for the wire).
fn sm() -> StringMatch {
    StringMatch {
        exact: Some("e".into()),
        prefix: Some("p".into()),
        regex: Some("r".into()),
    }
}

fn l4() -> L4Route {
    L4Route {
        name: "t".into(),
        matches: vec![L4Match {
            destination_subnets: vec!["10.0.0.0/8".into()],
            port: Some(5432),
            source_labels: BTreeMap::from([("app".to_string(), "x".to_string())]),
            source_namespace: Some("ns".into()),
            sni_hosts: vec!["db.example.com".into()],
        }],
        clusters: vec![WeightedCluster {
            cluster: "c".into(),
            weight: 1,
            request_headers: Some(ops()),
            response_headers: Some(ops()),
        }],
    }
}

fn rl() -> RateLimit {
    RateLimit {
        max_tokens: 10,
        tokens_per_fill: 5,
        fill_interval: d(1000),
    }
}

fn ops() -> HeaderOps {
    HeaderOps {
        set: BTreeMap::from([("s".to_string(), "1".to_string())]),
        add: BTreeMap::from([("a".to_string(), "2".to_string())]),
        remove: vec!["r".into()],
    }
}

fn full() -> Snapshot {
    let labels = BTreeMap::from([("app".to_string(), "x".to_string())]);
    let mut s = Snapshot {
        version: "v1".into(),
        trust_roots: vec!["-----BEGIN CERTIFICATE-----\n...".into()],
        peers: vec![Peer {
            address: "10.0.0.9".into(),
            workload: "web".into(),
            namespace: "shop".into(),
            identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            labels: labels.clone(),
            instance: "web-0".into(),
        }],
        workload: Some(Workload {
            workload: "reviews-v1".into(),
            telemetry: Some(Telemetry {
                sources: vec!["istio-system/mesh-default".into()],
                tracing: vec![TracingConfig {
                    mode: "CLIENT".into(),
                    providers: vec!["zipkin".into()],
                    random_sampling_percentage: Some(10.0),
                    disable_span_reporting: Some(false),
                    custom_tags: BTreeMap::from([(
                        "team".to_string(),
                        TracingTag {
                            literal: Some("shop".into()),
                            environment: Some("TEAM".into()),
                            header: Some("x-team".into()),
                            default_value: Some("none".into()),
                        },
                    )]),
                    use_request_id_for_trace_sampling: Some(true),
                    enable_istio_tags: Some(true),
                    disable_context_propagation: Some(false),
                }],
                metrics: Some(MetricsConfig {
                    providers: vec!["prometheus".into()],
                    overrides: vec![MetricOverride {
                        metric: "REQUEST_COUNT".into(),
                        mode: "SERVER".into(),
                        disabled: Some(true),
                        tag_overrides: BTreeMap::from([(
                            "request_host".to_string(),
                            TagOverride {
                                remove: true,
                                value: Some("request.host".into()),
                            },
                        )]),
                    }],
                    reporting_interval: d(15_000),
                }),
                access_logging: vec![AccessLogConfig {
                    mode: "CLIENT_AND_SERVER".into(),
                    providers: vec!["envoy".into()],
                    disabled: Some(false),
                    filter: Some("response.code >= 400".into()),
                }],
                providers: vec![TelemetryProvider {
                    name: "otel".into(),
                    kind: "opentelemetry".into(),
                    service: "collector".into(),
                    port: 4318,
                    path: Some("/v1/traces".into()),
                    timeout: d(5000),
                    log_format: Some("%RESPONSE_CODE%".into()),
                    log_labels: BTreeMap::from([(
                        "code".to_string(),
                        "%RESPONSE_CODE%".to_string(),
                    )]),
                    max_tag_length: Some(256),
                    grpc: true,
                }],
            }),
            mtls: PeerMtls::Strict as i32,
            port_mtls: BTreeMap::from([(8080, PeerMtls::Disable as i32)]),
            jwt_rules: vec![JwtRule {
                policy: "shop/jwt".into(),
                issuer: "https://issuer".into(),
                audiences: vec!["a".into()],
                jwks: Some("{}".into()),
                jwks_uri: Some("https://issuer/jwks".into()),
                from_headers: vec![JwtHeader {
                    name: "x-jwt".into(),
                    prefix: Some("Bearer ".into()),
                }],
                from_params: vec!["token".into()],
                from_cookies: vec!["session".into()],
                forward_original_token: true,
                output_payload_to_header: Some("x-payload".into()),
                output_claim_to_headers: vec![ClaimToHeader {
                    header: "x-sub".into(),
                    claim: "sub".into(),
                }],
                timeout: d(2000),
                space_delimited_claims: vec!["roles".into()],
            }],
            authorization: vec![AuthzPolicy {
                name: "shop/policy".into(),
                action: AuthzAction::Deny as i32,
                provider: Some("ext".into()),
                rules: vec![AuthzRule {
                    from: vec![AuthzSource {
                        principals: vec!["principals".into()],
                        not_principals: vec!["not_principals".into()],
                        request_principals: vec!["request_principals".into()],
                        not_request_principals: vec!["not_request_principals".into()],
                        namespaces: vec!["namespaces".into()],
                        not_namespaces: vec!["not_namespaces".into()],
                        service_accounts: vec!["service_accounts".into()],
                        not_service_accounts: vec!["not_service_accounts".into()],
                        ip_blocks: vec!["ip_blocks".into()],
                        not_ip_blocks: vec!["not_ip_blocks".into()],
                        remote_ip_blocks: vec!["remote_ip_blocks".into()],
                        not_remote_ip_blocks: vec!["not_remote_ip_blocks".into()],
                        trust_domains: vec!["trust_domains".into()],
                        not_trust_domains: vec!["not_trust_domains".into()],
                    }],
                    to: vec![AuthzOperation {
                        hosts: vec!["hosts".into()],
                        not_hosts: vec!["not_hosts".into()],
                        ports: vec!["ports".into()],
                        not_ports: vec!["not_ports".into()],
                        methods: vec!["methods".into()],
                        not_methods: vec!["not_methods".into()],
                        paths: vec!["paths".into()],
                        not_paths: vec!["not_paths".into()],
                    }],
                    when: vec![AuthzCondition {
                        key: "request.headers[x]".into(),
                        values: vec!["a".into()],
                        not_values: vec!["b".into()],
                    }],
                }],
            }],
            name: "w".into(),
            namespace: "ns".into(),
            labels: labels.clone(),
            service_account: "sa".into(),
            addresses: vec!["10.0.0.1".into()],
            inbound_ports: vec![InboundPort {
                port: 80,
                target_port: Some(8080),
                name: Some("http".into()),
                protocol: Some(Protocol::Http as i32),
                app_protocol: Some("http".into()),
                rate_limit: Some(rl()),
            }],
            locality: Some("eu/west-1a/rack1".into()),
        }),
        outbound_traffic_policy: OutboundPolicy::RegistryOnly as i32,
        services: vec![Service {
            hostname: "a.ns.svc.cluster.local".into(),
            addresses: vec!["240.240.0.1".into()],
            ports: vec![ServicePort {
                port: 80,
                name: Some("grpc".into()),
                protocol: Some(Protocol::Grpc as i32),
                app_protocol: Some("grpc".into()),
                cluster: "c".into(),
                http_routes: vec![HttpRoute {
                    name: "r".into(),
                    matches: vec![HttpMatch {
                        name: Some("m".into()),
                        uri: Some(sm()),
                        scheme: Some(sm()),
                        method: Some(sm()),
                        authority: Some(sm()),
                        headers: BTreeMap::from([("h".to_string(), sm())]),
                        without_headers: BTreeMap::from([("w".to_string(), sm())]),
                        query_params: BTreeMap::from([("q".to_string(), sm())]),
                        port: Some(80),
                        source_labels: BTreeMap::from([("app".to_string(), "x".to_string())]),
                        source_namespace: Some("ns".into()),
                        ignore_uri_case: true,
                    }],
                    clusters: vec![WeightedCluster {
                        cluster: "c".into(),
                        weight: 100,
                        request_headers: Some(ops()),
                        response_headers: Some(ops()),
                    }],
                    timeout: d(1000),
                    fault: Some(Fault {
                        delay: Some(FaultDelay {
                            fixed_delay: d(5),
                            percentage: Some(50.0),
                        }),
                        abort: Some(FaultAbort {
                            http_status: Some(503),
                            grpc_status: Some("UNAVAILABLE".into()),
                            percentage: Some(10.0),
                        }),
                    }),
                    direct_response: Some(DirectResponse {
                        status: 200,
                        body: Some("b".into()),
                    }),
                    redirect: Some(Redirect {
                        uri: Some("/u".into()),
                        authority: Some("a".into()),
                        scheme: Some("https".into()),
                        port: Some(443),
                        redirect_code: Some(302),
                    }),
                    rewrite: Some(Rewrite {
                        uri: Some("/v".into()),
                        authority: Some("b".into()),
                        uri_regex: Some("^/x".into()),
                        uri_regex_replacement: Some("/y".into()),
                    }),
                    request_headers: Some(ops()),
                    response_headers: Some(ops()),
                    retries: Some(RetryPolicy {
                        attempts: 3,
                        per_try_timeout: d(100),
                        retry_on: Some("5xx".into()),
                        backoff: d(25),
                    }),
                    mirrors: vec![Mirror {
                        cluster: "c".into(),
                        percentage: Some(10.0),
                    }],
                    rate_limit: Some(rl()),
                    cors: Some(CorsPolicy {
                        allow_origins: vec![sm()],
                        allow_methods: vec!["GET".into()],
                        allow_headers: vec!["x-a".into()],
                        expose_headers: vec!["x-b".into()],
                        max_age: d(60_000),
                        allow_credentials: Some(true),
                    }),
                }],
                tcp_routes: vec![l4()],
                tls_routes: vec![l4()],
            }],
        }],
        clusters: vec![Cluster {
            name: "c".into(),
            tls: Some(ClientTls {
                mode: ClientTlsMode::TlsMutual as i32,
                ca_certificates: Some("/ca.pem".into()),
                client_certificate: Some("/c.pem".into()),
                private_key: Some("/k.pem".into()),
                credential_name: Some("cred".into()),
                sni: Some("api.example.com".into()),
                subject_alt_names: vec!["api.example.com".into()],
                insecure_skip_verify: true,
            }),
            endpoints: vec![Endpoint {
                plaintext: true,
                address: "10.0.0.2:80".into(),
                proxied: true,
                labels,
                identity: Some("spiffe://cluster.local/ns/ns/sa/sa".into()),
                healthy: Some(false),
                locality: Some("r/z".into()),
                weight: Some(3),
                workload: "reviews-v1".into(),
                namespace: "shop".into(),
            }],
            connect_timeout: d(1500),
            idle_timeout: d(3000),
            load_balancer: LoadBalancer::LeastRequest as i32,
            circuit_breakers: Some(CircuitBreakers {
                max_connections: Some(1),
                max_pending_requests: Some(2),
                max_requests: Some(3),
                max_retries: Some(4),
                max_requests_per_connection: Some(100),
                max_concurrent_streams: Some(50),
            }),
            consistent_hash: Some(ConsistentHash {
                http_header_name: Some("x-user".into()),
                http_cookie: Some("session".into()),
                use_source_ip: Some(true),
                http_query_parameter_name: Some("u".into()),
                minimum_ring_size: Some(1024),
                http_cookie_ttl: d(60_000),
                http_cookie_path: Some("/".into()),
            }),
            locality_lb: Some(LocalityLb {
                distribute: vec![LocalityDistribute {
                    from: "eu/*".into(),
                    to: BTreeMap::from([("eu/*".to_string(), 80), ("us/*".to_string(), 20)]),
                }],
                failover: vec![LocalityFailover {
                    from: "eu".into(),
                    to: "us".into(),
                }],
            }),
            warmup: Some(Warmup {
                duration: d(60_000),
                minimum_percent: Some(10.0),
                aggression: Some(1.0),
            }),
            keep_client_protocol: true,
            tcp_keepalive: Some(TcpKeepalive {
                probes: Some(3),
                time: d(7_200_000),
                interval: d(75_000),
            }),
            discovery: Discovery::StrictDns as i32,
            dns_refresh_rate: d(5000),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx_errors: Some(5),
                base_ejection_time: d(30_000),
                max_ejection_percent: Some(10),
                min_health_percent: Some(0),
                consecutive_gateway_errors: Some(3),
                consecutive_local_origin_failures: Some(4),
                split_external_local_origin_errors: Some(true),
                interval: d(10_000),
            }),
        }],
        settings: Some(Settings {
            protocol_detection_timeout: d(100),
            max_request_header_bytes: Some(61440),
            request_header_timeout: d(10_000),
            connect_timeout: d(5000),
            num_trusted_proxies: Some(1),
        }),
        gateway_ports: vec![GatewayPort {
            port: 443,
            bind: Some("0.0.0.0".into()),
            servers: vec![GatewayServer {
                gateway: "shop/gw".into(),
                name: Some("https".into()),
                protocol: Protocol::Https as i32,
                hosts: vec!["shop.example.com".into()],
                tls: Some(ServerTls {
                    mode: ServerTlsMode::Mutual as i32,
                    https_redirect: true,
                    credential_name: Some("shop-cert".into()),
                    server_certificate: Some("/c.pem".into()),
                    private_key: Some("/k.pem".into()),
                    ca_certificates: Some("/ca.pem".into()),
                }),
                virtual_hosts: vec![VirtualHost {
                    name: "shop/shop".into(),
                    domains: vec!["shop.example.com".into()],
                    // Filled below with the service port's fully set routes.
                    http_routes: Vec::new(),
                    tcp_routes: Vec::new(),
                    tls_routes: Vec::new(),
                }],
            }],
        }],
    };
    let routes = s.services[0].ports[0].http_routes.clone();
    s.gateway_ports[0].servers[0].virtual_hosts[0].http_routes = routes;
    s.gateway_ports[0].servers[0].virtual_hosts[0].tcp_routes = vec![l4()];
    s.gateway_ports[0].servers[0].virtual_hosts[0].tls_routes = vec![l4()];
    s
}

/// Every declared field is set and nothing undeclared came along, recursively.
fn check(msg: &DynamicMessage, path: &str, problems: &mut Vec<String>) {
    if msg.unknown_fields().count() > 0 {
        problems.push(format!("{path}: fields the .proto does not declare"));
    }
    let desc: MessageDescriptor = msg.descriptor();
    if desc.full_name().starts_with("google.protobuf.") {
        return;
    }
    for f in desc.fields() {
        let p = format!("{path}.{}", f.name());
        if !msg.has_field(&f) {
            problems.push(format!("{p}: declared but not set by the Rust types"));
            continue;
        }
        match &*msg.get_field(&f) {
            Value::Message(m) => check(m, &p, problems),
            Value::List(items) => {
                for (i, v) in items.iter().enumerate() {
                    if let Value::Message(m) = v {
                        check(m, &format!("{p}[{i}]"), problems);
                    }
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let Value::Message(m) = v {
                        check(m, &format!("{p}[{k:?}]"), problems);
                    }
                }
            }
            _ => {}
        }
    }
}

#[test]
fn rust_types_match_the_proto_file() {
    let pool = pool();
    let desc = pool
        .get_message_by_name("trellis.snapshot.v1.Snapshot")
        .expect("Snapshot message");
    let snapshot = full();
    let bytes = snapshot.encode_to_vec();
    let dynamic = DynamicMessage::decode(desc, bytes.as_slice()).expect("decodes with the .proto");
    let mut problems = Vec::new();
    check(&dynamic, "Snapshot", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
    let again = Snapshot::decode(dynamic.encode_to_vec().as_slice()).expect("decodes back");
    assert_eq!(again, snapshot);
}

#[test]
fn enums_match_the_proto_file() {
    let pool = pool();
    let proto = pool
        .get_enum_by_name("trellis.snapshot.v1.Protocol")
        .expect("Protocol");
    for v in proto.values() {
        let rust = Protocol::try_from(v.number())
            .unwrap_or_else(|_| panic!("{} missing in Rust", v.name()));
        let name = match rust.to_api() {
            None => "PROTOCOL_UNSPECIFIED".to_string(),
            Some(p) => p.as_str().replace('-', "_"),
        };
        assert_eq!(name, v.name());
    }
    assert!(
        Protocol::try_from(proto.values().count() as i32).is_err(),
        "Rust has values the .proto lacks"
    );
    let policy = pool
        .get_enum_by_name("trellis.snapshot.v1.OutboundPolicy")
        .expect("OutboundPolicy");
    for v in policy.values() {
        let rust = OutboundPolicy::try_from(v.number()).expect("value in Rust");
        assert_eq!(rust.name(), v.name());
    }
    for (name, names) in [
        (
            "Discovery",
            Discovery::ALL.map(|d| (d as i32, d.name())).to_vec(),
        ),
        (
            "AuthzAction",
            AuthzAction::ALL.map(|d| (d as i32, d.name())).to_vec(),
        ),
        (
            "PeerMtls",
            PeerMtls::ALL.map(|d| (d as i32, d.name())).to_vec(),
        ),
        (
            "ServerTlsMode",
            ServerTlsMode::ALL.map(|d| (d as i32, d.name())).to_vec(),
        ),
        (
            "LoadBalancer",
            LoadBalancer::ALL.map(|d| (d as i32, d.name())).to_vec(),
        ),
    ] {
        let e = pool
            .get_enum_by_name(&format!("trellis.snapshot.v1.{name}"))
            .unwrap_or_else(|| panic!("{name}"));
        let proto: Vec<(i32, String)> = e
            .values()
            .map(|v| (v.number(), v.name().to_string()))
            .collect();
        let rust: Vec<(i32, String)> = names.into_iter().map(|(n, s)| (n, s.to_string())).collect();
        assert_eq!(proto, rust, "{name}");
    }
}
