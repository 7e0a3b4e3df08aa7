//! Parsing real-world Istio YAML, written for these tests in the style of Istio's samples,
//! and asserting the parsed values.

use std::time::Duration;

use trellis_api::common::Protocol;
use trellis_api::networking::{ClientTlsMode, OutboundTrafficPolicyMode, SimpleLb};
use trellis_api::security::{AuthorizationAction, MtlsMode};
use trellis_api::{Document, Kind, Level, LoadOptions, Parsed, Resource, Spec, parse_text};

fn load(text: &str) -> Vec<Parsed> {
    parse_text(text, "test.yaml", &LoadOptions::default())
}

/// Loads a text that must be entirely valid and returns its resources.
fn resources(text: &str) -> Vec<Resource> {
    let parsed = load(text);
    for p in &parsed {
        let errors: Vec<String> = p
            .diagnostics
            .iter()
            .filter(|d| d.level == Level::Error)
            .map(ToString::to_string)
            .collect();
        assert!(errors.is_empty(), "unexpected errors: {errors:#?}");
    }
    parsed
        .into_iter()
        .filter_map(|p| match p.document {
            Some(Document::Config(r)) => Some(r),
            _ => None,
        })
        .collect()
}

const BOOKINFO_ROUTING: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - name: jason
    match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 10
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 7
      interval: 5m
      baseEjectionTime: 15m
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
"#;

#[test]
fn bookinfo_routing_rules() {
    let rs = resources(BOOKINFO_ROUTING);
    assert_eq!(rs.len(), 2);
    let vs = &rs[0];
    assert_eq!(vs.kind, Kind::VirtualService);
    assert_eq!(vs.namespace(), "default");
    let Spec::VirtualService(vs) = &vs.spec else {
        panic!("not a VS")
    };
    assert_eq!(vs.hosts, ["reviews"]);
    assert_eq!(vs.http.len(), 2);
    assert_eq!(vs.http[0].name.as_deref(), Some("jason"));
    let hm = &vs.http[0].matches[0].headers["end-user"];
    assert_eq!(hm.exact.as_deref(), Some("jason"));
    assert_eq!(
        vs.http[0].route[0].destination.subset.as_deref(),
        Some("v2")
    );
    let weights: Vec<_> = vs.http[1].route.iter().map(|r| r.weight).collect();
    assert_eq!(weights, [Some(50), Some(50)]);

    let dr = &rs[1];
    assert_eq!(dr.namespace(), "bookinfo");
    let Spec::DestinationRule(dr) = &dr.spec else {
        panic!("not a DR")
    };
    assert_eq!(dr.host, "reviews");
    let tp = dr.traffic_policy.as_ref().expect("traffic policy");
    assert_eq!(
        tp.load_balancer.as_ref().and_then(|l| l.simple),
        Some(SimpleLb::Random)
    );
    let pool = tp.connection_pool.as_ref().expect("pool");
    let tcp = pool.tcp.as_ref().expect("tcp");
    assert_eq!(tcp.max_connections, Some(100));
    assert_eq!(
        tcp.connect_timeout.map(|d| d.0),
        Some(Duration::from_millis(30))
    );
    assert_eq!(
        pool.http
            .as_ref()
            .and_then(|h| h.max_requests_per_connection),
        Some(1)
    );
    let od = tp.outlier_detection.as_ref().expect("outlier");
    assert_eq!(od.consecutive_5xx_errors, Some(7));
    assert_eq!(od.interval.map(|d| d.0), Some(Duration::from_secs(300)));
    assert_eq!(
        od.base_ejection_time.map(|d| d.0),
        Some(Duration::from_secs(900))
    );
    assert_eq!(
        tp.tls.as_ref().and_then(|t| t.mode),
        Some(ClientTlsMode::IstioMutual)
    );
    let names: Vec<_> = dr.subsets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "v3"]);
    assert_eq!(dr.subsets[1].labels["version"], "v2");
    let v2lb = dr.subsets[1]
        .traffic_policy
        .as_ref()
        .and_then(|t| t.load_balancer.as_ref());
    assert_eq!(v2lb.and_then(|l| l.simple), Some(SimpleLb::RoundRobin));
}

#[test]
fn httpbin_fault_injection_retries_and_timeouts() {
    let rs = resources(
        r#"
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts: ["httpbin.default.svc.cluster.local"]
  http:
  - match:
    - uri:
        prefix: /delay
      ignoreUriCase: true
    fault:
      delay:
        percentage:
          value: 12.5
        fixedDelay: 1.5s
      abort:
        percentage:
          value: 100
        httpStatus: 418
    route:
    - destination:
        host: httpbin
        port:
          number: 8000
  - match:
    - uri:
        regex: "^/status/[0-9]+$"
      method:
        exact: GET
    retries:
      attempts: 3
      perTryTimeout: 100ms
      retryOn: gateway-error,connect-failure,refused-stream,503
    timeout: 1h
    route:
    - destination:
        host: httpbin
    mirror:
      host: httpbin-shadow
    mirrorPercentage:
      value: 5.0
"#,
    );
    let Spec::VirtualService(vs) = &rs[0].spec else {
        panic!("not a VS")
    };
    assert_eq!(rs[0].api_version, "networking.istio.io/v1beta1");
    let f = vs.http[0].fault.as_ref().expect("fault");
    let delay = f.delay.as_ref().expect("delay");
    assert_eq!(
        delay.fixed_delay.map(|d| d.0),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(delay.percentage.map(|p| p.value), Some(12.5));
    let abort = f.abort.as_ref().expect("abort");
    assert_eq!(abort.http_status, Some(418));
    assert_eq!(abort.percentage.map(|p| p.value), Some(100.0));
    assert_eq!(vs.http[0].matches[0].ignore_uri_case, Some(true));
    assert_eq!(
        vs.http[0].route[0].destination.port.and_then(|p| p.number),
        Some(8000)
    );
    let m = &vs.http[1].matches[0];
    assert_eq!(
        m.uri.as_ref().and_then(|u| u.regex.as_deref()),
        Some("^/status/[0-9]+$")
    );
    assert_eq!(
        m.method.as_ref().and_then(|u| u.exact.as_deref()),
        Some("GET")
    );
    let r = vs.http[1].retries.as_ref().expect("retries");
    assert_eq!(r.attempts, Some(3));
    assert_eq!(
        r.per_try_timeout.map(|d| d.0),
        Some(Duration::from_millis(100))
    );
    assert_eq!(
        r.retry_on.as_deref(),
        Some("gateway-error,connect-failure,refused-stream,503")
    );
    assert_eq!(
        vs.http[1].timeout.map(|d| d.0),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        vs.http[1].mirror.as_ref().map(|m| m.host.as_str()),
        Some("httpbin-shadow")
    );
    assert_eq!(vs.http[1].mirror_percentage.map(|p| p.value), Some(5.0));
}

#[test]
fn jwt_request_authentication() {
    let rs = resources(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json"
    audiences: ["app", "bookinfo.com"]
    forwardOriginalToken: true
    fromHeaders:
    - name: x-jwt-assertion
      prefix: "Bearer "
    fromParams: ["access_token"]
    outputClaimToHeaders:
    - header: x-jwt-sub
      claim: sub
    timeout: 5s
"#,
    );
    let Spec::RequestAuthentication(ra) = &rs[0].spec else {
        panic!("not RA")
    };
    assert_eq!(rs[0].namespace(), "foo");
    let sel = ra.selector.as_ref().expect("selector");
    assert_eq!(sel.match_labels["app"], "httpbin");
    let rule = &ra.jwt_rules[0];
    assert_eq!(rule.issuer.as_deref(), Some("testing@secure.istio.io"));
    assert!(rule.jwks_uri().is_some_and(|u| u.ends_with("jwks.json")));
    assert_eq!(rule.audiences, ["app", "bookinfo.com"]);
    assert_eq!(rule.forward_original_token, Some(true));
    assert_eq!(rule.from_headers[0].name, "x-jwt-assertion");
    assert_eq!(rule.from_headers[0].prefix.as_deref(), Some("Bearer "));
    assert_eq!(rule.from_params, ["access_token"]);
    assert_eq!(rule.output_claim_to_headers[0].claim, "sub");
    assert_eq!(rule.timeout.map(|d| d.0), Some(Duration::from_secs(5)));
}

#[test]
fn authorization_policy_from_to_when() {
    let rs = resources(
        r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
        notIpBlocks: ["10.0.0.0/8"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
        ports: ["8000"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
    - key: request.headers[x-tenant]
      notValues: ["blocked"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"#,
    );
    assert_eq!(rs.len(), 4);
    let Spec::AuthorizationPolicy(ap) = &rs[0].spec else {
        panic!("not AP")
    };
    assert_eq!(ap.action, AuthorizationAction::Allow);
    let rule = &ap.rules[0];
    let src0 = rule.from[0].source.as_ref().expect("source");
    assert_eq!(src0.principals, ["cluster.local/ns/default/sa/sleep"]);
    let src1 = rule.from[1].source.as_ref().expect("source");
    assert_eq!(src1.namespaces, ["test"]);
    assert_eq!(src1.not_ip_blocks, ["10.0.0.0/8"]);
    let op1 = rule.to[1].operation.as_ref().expect("op");
    assert_eq!(op1.methods, ["POST"]);
    assert_eq!(op1.ports, ["8000"]);
    assert_eq!(rule.when[0].key, "request.auth.claims[iss]");
    assert_eq!(rule.when[1].not_values, ["blocked"]);

    let Spec::AuthorizationPolicy(deny_all) = &rs[1].spec else {
        panic!("not AP")
    };
    assert!(deny_all.rules.is_empty());
    assert_eq!(deny_all.action, AuthorizationAction::Allow);

    let Spec::PeerAuthentication(pa) = &rs[2].spec else {
        panic!("not PA")
    };
    assert_eq!(pa.mtls.map(|m| m.mode), Some(MtlsMode::Strict));
    let Spec::PeerAuthentication(pa) = &rs[3].spec else {
        panic!("not PA")
    };
    assert_eq!(pa.port_level_mtls[&8080].mode, MtlsMode::Disable);
}

#[test]
fn sidecar_with_egress_hosts_gateway_and_service_entry() {
    let rs = resources(
        r#"
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata:
  name: default
  namespace: prod-us1
spec:
  egress:
  - hosts:
    - "prod-us1/*"
    - "prod-apis/*"
    - "istio-system/*"
  outboundTrafficPolicy:
    mode: REGISTRY_ONLY
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata:
  name: bookinfo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 8080
      name: http
      protocol: http
    hosts:
    - "*"
  - port:
      number: 443
      name: https
      protocol: HTTPS
    hosts: ["bookinfo.example.com"]
    tls:
      mode: SIMPLE
      credentialName: bookinfo-cert
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-https
spec:
  hosts:
  - api.dropboxapi.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: TLS
  resolution: DNS
"#,
    );
    let Spec::Sidecar(sc) = &rs[0].spec else {
        panic!("not a Sidecar")
    };
    assert_eq!(
        sc.egress[0].hosts,
        ["prod-us1/*", "prod-apis/*", "istio-system/*"]
    );
    assert_eq!(
        sc.outbound_traffic_policy.as_ref().and_then(|o| o.mode),
        Some(OutboundTrafficPolicyMode::RegistryOnly)
    );
    let Spec::Gateway(gw) = &rs[1].spec else {
        panic!("not a Gateway")
    };
    assert_eq!(gw.selector["istio"], "ingressgateway");
    assert_eq!(
        gw.servers[0].port.protocol,
        Protocol::Http,
        "protocol names are case-insensitive"
    );
    assert_eq!(gw.servers[1].port.protocol, Protocol::Https);
    assert_eq!(
        gw.servers[1]
            .tls
            .as_ref()
            .and_then(|t| t.credential_name.as_deref()),
        Some("bookinfo-cert")
    );
    let Spec::ServiceEntry(se) = &rs[2].spec else {
        panic!("not a ServiceEntry")
    };
    assert_eq!(se.hosts, ["api.dropboxapi.com"]);
    assert_eq!(se.ports[0].protocol, Some(Protocol::Tls));
}

#[test]
fn kubernetes_service_namespace_workload_and_telemetry() {
    let rs = resources(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels:
    istio-injection: enabled
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  labels: {app: reviews, service: reviews}
spec:
  ports:
  - port: 9080
    name: http
    targetPort: 9080
  selector:
    app: reviews
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v1
  namespace: bookinfo
  labels: {app: reviews, version: v1}
spec:
  serviceAccount: bookinfo-reviews
  replicas: 2
  command: ["python3", "-m", "http.server", "9080"]
  env: [{name: GREETING, value: hello}]
  ports: [{name: http, port: 9080, protocol: HTTP}]
  readinessProbe: {httpGet: {path: /, port: 9080}, periodSeconds: 1}
---
apiVersion: telemetry.istio.io/v1alpha1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
  tracing:
  - randomSamplingPercentage: 10.0
  accessLogging:
  - providers:
    - name: envoy
"#,
    );
    assert_eq!(rs[0].kind, Kind::Namespace);
    assert_eq!(rs[0].namespace(), "", "Namespace is cluster-scoped");
    assert_eq!(rs[0].meta.labels["istio-injection"], "enabled");
    let Spec::Service(svc) = &rs[1].spec else {
        panic!("not a Service")
    };
    assert_eq!(svc.ports[0].port, 9080);
    assert_eq!(svc.selector["app"], "reviews");
    let Spec::Workload(w) = &rs[2].spec else {
        panic!("not a Workload")
    };
    assert_eq!(w.replicas(), 2);
    assert_eq!(w.service_account(), "bookinfo-reviews");
    assert_eq!(w.command, ["python3", "-m", "http.server", "9080"]);
    assert_eq!(w.env[0].value, "hello");
    assert_eq!(w.ports[0].protocol, Some(Protocol::Http));
    let probe = w.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref());
    assert_eq!(probe.map(|h| h.port), Some(9080));
    let Spec::Telemetry(t) = &rs[3].spec else {
        panic!("not Telemetry")
    };
    assert_eq!(t.tracing[0].random_sampling_percentage, Some(10.0));
    assert_eq!(t.access_logging[0].providers[0].name, "envoy");
}

#[test]
fn every_served_api_version_is_accepted() {
    for kind in Kind::ALL {
        for version in kind.versions() {
            let api = if kind.group().is_empty() {
                version.to_string()
            } else {
                format!("{}/{version}", kind.group())
            };
            // A minimal spec that types (validation may still complain, typing must not).
            let text = format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\n");
            let parsed = load(&text);
            let typing_errors: Vec<_> = parsed[0]
                .diagnostics
                .iter()
                .filter(|d| d.path == "apiVersion" || d.message.contains("unknown field"))
                .collect();
            assert!(typing_errors.is_empty(), "{api} {kind}: {typing_errors:?}");
            assert_eq!(
                parsed[0].object.as_ref().map(|o| o.kind.as_str()),
                Some(kind.as_str())
            );
        }
    }
}

#[test]
fn json_documents_and_lists() {
    let parsed = parse_text(
        r#"{
	"apiVersion": "v1",
	"kind": "List",
	"items": [
		{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
		 "metadata": {"name": "ratings", "namespace": "prod"},
		 "spec": {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}},
		{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}}
	]
}"#,
        "list.json",
        &LoadOptions::default(),
    );
    assert_eq!(parsed.len(), 2);
    let dr = parsed[0].resource().expect("DR accepted");
    assert_eq!(dr.namespace(), "prod");
    assert_eq!(dr.origin.mark("spec.subsets[0].name").line, 7);
    assert!(matches!(parsed[1].document, Some(Document::Other(_))));
    assert_eq!(parsed[1].diagnostics[0].level, Level::Info);
    assert!(
        parsed[1].diagnostics[0].message.contains("ConfigMap"),
        "{:?}",
        parsed[1].diagnostics
    );
}

#[test]
fn default_namespace_is_configurable() {
    let opts = LoadOptions {
        default_namespace: "shop".to_string(),
    };
    let parsed = parse_text(BOOKINFO_ROUTING, "x.yaml", &opts);
    assert_eq!(parsed[0].resource().map(Resource::namespace), Some("shop"));
    assert_eq!(
        parsed[1].resource().map(Resource::namespace),
        Some("bookinfo")
    );
}

#[test]
fn exported_objects_with_server_fields_load() {
    let rs = resources(
        r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
  namespace: default
  uid: 7b0c0c2e-0000-4000-8000-000000000000
  resourceVersion: "12345"
  generation: 3
  creationTimestamp: "2026-01-01T00:00:00Z"
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  host: ratings.default.svc.cluster.local
status:
  observedGeneration: "3"
"#,
    );
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].meta.annotations.len(), 1);
}

#[test]
fn a_gateway_workload_runs_no_command_and_serves_ports() {
    let rs = resources(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: ingressgateway, namespace: shop, labels: {istio: ingressgateway}}
spec:
  gateway: true
  ports: [{name: http, port: 8080, hostPort: 8080}]
"#,
    );
    let Spec::Workload(w) = &rs[0].spec else {
        panic!("not a Workload")
    };
    assert!(w.gateway && w.command.is_empty());
    assert_eq!(w.ports[0].host_port, Some(8080));
    // A gateway with a command, a gateway without ports, an app without a command, a
    // host port out of range: each refused with the field named.
    for (spec, field) in [
        (
            "gateway: true\n  command: [nginx]\n  ports: [{port: 80}]",
            "spec.command",
        ),
        ("gateway: true", "spec.ports"),
        ("ports: [{port: 80}]", "spec.command"),
        (
            "command: [x]\n  ports: [{port: 80, hostPort: 70000}]",
            "spec.ports[0].hostPort",
        ),
    ] {
        let parsed = load(&format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec:\n  {spec}\n"
        ));
        let errors: Vec<String> = parsed
            .iter()
            .flat_map(|p| &p.diagnostics)
            .filter(|d| d.level == Level::Error)
            .map(|d| d.to_string())
            .collect();
        assert!(
            errors.iter().any(|e| e.contains(field)),
            "{spec}: {errors:?}"
        );
    }
}
