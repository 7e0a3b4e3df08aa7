//! Per-proxy translation: configuration and running instances in, one sidecar's snapshot
//! out; then that snapshot in a real proxy, reached as an app reaches a service (its
//! virtual IP, intercepted).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_api::Resource;
use trellis_control::mesh::{MeshConfig, ROOT_NAMESPACE, sidecar_snapshot};
use trellis_control::registry::{Instance, InstancePort, Registry};
use trellis_proxy::sockets::FixedOriginalDst;
use trellis_proxy::{Config, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot as wire;

mod common;
use common::parse;

const CONFIG: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata:
  name: internal
  namespace: shop
  annotations: {networking.istio.io/exportTo: "."}
spec:
  selector: {app: internal}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: secret}
spec:
  selector: {app: vault}
  ports: [{name: http, port: 8200}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 5}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-from-web, namespace: web}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: rest
    route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: web}
spec:
  egress:
  - hosts: ["./*", "shop/*"]
"#;

fn resources() -> Vec<Resource> {
    parse(CONFIG)
}

/// The snapshot of a `web` sidecar in `shop` (10.0.1.1) under the configuration `yaml`.
fn web_client_snapshot(yaml: &str) -> trellis_control::mesh::Built {
    let res = parse(yaml);
    let refs: Vec<&Resource> = res.iter().collect();
    let cfg = MeshConfig {
        resources: &refs,
        root_namespace: ROOT_NAMESPACE,
        mesh_config: None,
    };
    let client = instance("web", "shop", &[("app", "web")], [10, 0, 1, 1], 8080);
    let reg = Registry::build(&refs, vec![client.clone()]);
    sidecar_snapshot(&cfg, &reg, &client, "v1")
}

fn instance(name: &str, ns: &str, labels: &[(&str, &str)], ip: [u8; 4], port: u16) -> Instance {
    Instance {
        name: format!("{name}-0"),
        workload: name.to_string(),
        namespace: ns.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        service_account: name.to_string(),
        addresses: vec![IpAddr::from(ip)],
        ports: vec![InstancePort {
            name: Some("http".into()),
            port,
            protocol: None,
        }],
        locality: None,
        entry: false,
    }
}

fn cluster<'a>(s: &'a wire::Snapshot, name: &str) -> &'a wire::Cluster {
    s.clusters
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

#[test]
fn what_a_sidecar_sees_and_which_rules_apply() {
    let res = resources();
    let refs: Vec<&Resource> = res.iter().collect();
    let cfg = MeshConfig {
        resources: &refs,
        root_namespace: ROOT_NAMESPACE,
        mesh_config: None,
    };
    let reg = Registry::build(
        &refs,
        vec![
            instance(
                "reviews-v1",
                "shop",
                &[("app", "reviews"), ("version", "v1")],
                [10, 0, 0, 1],
                9081,
            ),
            instance(
                "reviews-v2",
                "shop",
                &[("app", "reviews"), ("version", "v2")],
                [10, 0, 0, 2],
                9082,
            ),
            instance("web", "web", &[("app", "web")], [10, 0, 1, 1], 8080),
        ],
    );
    let web = reg.instances[2].clone();
    let built = sidecar_snapshot(&cfg, &reg, &web, "v1");
    assert!(built.problems.is_empty(), "{:?}", built.problems);
    let s = &built.snapshot;
    let hosts: Vec<&str> = s.services.iter().map(|s| s.hostname.as_str()).collect();
    // The Sidecar in `web` hides namespace `secret`; `internal` is exported to `shop` only.
    assert_eq!(
        hosts,
        [
            "ratings.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local"
        ]
    );
    let reviews = &s.services[1];
    assert!(
        reviews.addresses[0].starts_with("240.240."),
        "{:?}",
        reviews.addresses
    );
    let names: Vec<&str> = reviews.ports[0]
        .http_routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["jason", "rest"]);
    // Endpoints: the named target port of each selected instance, behind a proxy, with its
    // identity.
    let v2 = cluster(s, "outbound|9080|v2|reviews.shop.svc.cluster.local");
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(v2.endpoints[0].address, "10.0.0.2:9082");
    assert!(v2.endpoints[0].proxied);
    assert_eq!(
        v2.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/reviews-v2")
    );
    // The DestinationRule in the client's namespace wins over the service's.
    assert_eq!(v2.load_balancer, wire::LoadBalancer::Random as i32);
    assert!(v2.outlier_detection.is_none());
    assert_eq!(s.workload.as_ref().map(|w| w.inbound_ports.len()), Some(1));

    // From `shop` (no Sidecar there): every namespace, `internal` too, and the service
    // namespace's DestinationRule.
    let shop = reg.instances[0].clone();
    let s = sidecar_snapshot(&cfg, &reg, &shop, "v1").snapshot;
    let hosts: Vec<&str> = s.services.iter().map(|s| s.hostname.as_str()).collect();
    assert_eq!(
        hosts,
        [
            "internal.shop.svc.cluster.local",
            "ratings.shop.svc.cluster.local",
            "reviews.shop.svc.cluster.local",
            "vault.secret.svc.cluster.local"
        ]
    );
    let v1 = cluster(&s, "outbound|9080|v1|reviews.shop.svc.cluster.local");
    assert_eq!(v1.load_balancer, wire::LoadBalancer::RoundRobin as i32);
    assert_eq!(
        v1.outlier_detection
            .as_ref()
            .and_then(|o| o.consecutive_5xx_errors),
        Some(5)
    );
}

#[tokio::test]
async fn the_snapshot_routes_an_intercepted_request() {
    let (v1, v2) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
    );
    let res = resources();
    let refs: Vec<&Resource> = res.iter().collect();
    let cfg = MeshConfig {
        resources: &refs,
        root_namespace: ROOT_NAMESPACE,
        mesh_config: None,
    };
    let reg = Registry::build(
        &refs,
        vec![
            instance(
                "reviews-v1",
                "shop",
                &[("app", "reviews"), ("version", "v1")],
                [127, 0, 0, 1],
                v1.addr.port(),
            ),
            instance(
                "reviews-v2",
                "shop",
                &[("app", "reviews"), ("version", "v2")],
                [127, 0, 0, 1],
                v2.addr.port(),
            ),
            instance("web", "web", &[("app", "web")], [127, 0, 0, 1], 1),
        ],
    );
    let web = reg.instances[2].clone();
    let snapshot = sidecar_snapshot(&cfg, &reg, &web, "v1").snapshot;
    let vip: IpAddr = reg.service("reviews.shop", "web").expect("reviews").vip;
    // The app connected to reviews' virtual IP on 9080; interception brought it here.
    let proxy = trellis_proxy::start(
        Config::from_wire(snapshot, None).expect("converts"),
        ProxyOptions {
            outbound_capture: Some("127.0.0.1:0".parse().expect("addr")),
            original_dst: Arc::new(FixedOriginalDst(SocketAddr::new(vip, 9080))),
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let addr = proxy.outbound_addrs[0];
    let mut c = http_client::HttpClient::http1(addr).await.expect("connect");
    for _ in 0..5 {
        let req = c
            .request(http::Method::GET, "reviews.shop:9080", "/bytes/1")
            .header("end-user", "jason")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        assert_eq!(c.send(req).await.expect("response").status, 200);
        assert_eq!(
            c.get("reviews.shop:9080", "/bytes/1")
                .await
                .expect("response")
                .status,
            200
        );
    }
    assert_eq!(v2.stats().requests(), 5, "jason's requests");
    assert_eq!(v1.stats().requests(), 5, "everyone else's");
}

#[test]
fn workload_entries_are_endpoints_of_the_services_that_select_them() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec:
  selector: {app: legacy}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: shop}
spec:
  address: 10.1.2.3
  labels: {app: legacy}
  ports: {http: 9090}
  serviceAccount: vm
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-2, namespace: shop}
spec:
  address: 10.1.2.4
  labels: {app: legacy, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-3, namespace: shop}
spec:
  address: vm-3.example.internal
  labels: {app: legacy}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: elsewhere, namespace: other}
spec:
  address: 10.9.9.9
  labels: {app: legacy}
"#;
    let built = web_client_snapshot(yaml);
    let c = cluster(
        &built.snapshot,
        "outbound|80||legacy.shop.svc.cluster.local",
    );
    let mut eps: Vec<(String, bool, Option<String>)> = c
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.proxied, e.identity.clone()))
        .collect();
    eps.sort();
    assert_eq!(
        eps,
        [
            // The entry's port map names the service port; no tlsMode label: no proxy.
            (
                "10.1.2.3:9090".to_string(),
                false,
                Some("spiffe://cluster.local/ns/shop/sa/vm".to_string())
            ),
            // No port map: the Service's targetPort; labelled as having a proxy.
            (
                "10.1.2.4:8080".to_string(),
                true,
                Some("spiffe://cluster.local/ns/shop/sa/default".to_string())
            ),
        ]
    );
}

#[test]
fn a_service_entry_with_a_workload_selector_gets_the_selected_entries() {
    let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: shop}
spec:
  hosts: [db.vms.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  workloadSelector:
    labels: {app: db}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-1, namespace: shop}
spec:
  address: 10.5.0.1
  labels: {app: db}
  ports: {tcp-pg: 6543}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-2, namespace: shop}
spec:
  address: 10.5.0.2
  labels: {app: db, security.istio.io/tlsMode: istio}
  serviceAccount: db
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db-other, namespace: other}
spec:
  address: 10.5.0.3
  labels: {app: db}
"#;
    let built = web_client_snapshot(yaml);
    assert!(built.problems.is_empty(), "{:?}", built.problems);
    let c = cluster(&built.snapshot, "outbound|5432||db.vms.internal");
    let mut eps: Vec<(String, bool, Option<String>)> = c
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.proxied, e.identity.clone()))
        .collect();
    eps.sort();
    assert_eq!(
        eps,
        [
            (
                "10.5.0.1:6543".to_string(),
                false,
                Some("spiffe://cluster.local/ns/shop/sa/default".to_string())
            ),
            (
                "10.5.0.2:5432".to_string(),
                true,
                Some("spiffe://cluster.local/ns/shop/sa/db".to_string())
            ),
        ]
    );
}

#[test]
fn a_proxy_that_gateways_select_gets_their_servers_with_the_mesh_clusters() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [ingress]
  http:
  - route: [{destination: {host: web, port: {number: 80}}}]
  - route: [{destination: {host: nowhere.example.com, port: {number: 80}}}]
"#;
    let res = parse(yaml);
    let refs: Vec<&Resource> = res.iter().collect();
    let cfg = MeshConfig {
        resources: &refs,
        root_namespace: ROOT_NAMESPACE,
        mesh_config: None,
    };
    let web = instance("web", "shop", &[("app", "web")], [10, 0, 0, 9], 8080);
    let gw = instance(
        "ingressgateway",
        "gateways",
        &[("istio", "ingressgateway")],
        [10, 0, 2, 1],
        8080,
    );
    let reg = Registry::build(&refs, vec![web.clone(), gw.clone()]);
    let built = sidecar_snapshot(&cfg, &reg, &gw, "v1");
    assert!(built.problems.is_empty(), "{:?}", built.problems);
    let ports: Vec<u32> = built
        .snapshot
        .gateway_ports
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8080]);
    // A gateway-mode proxy takes it as it is.
    Config::from_wire(built.snapshot.clone(), None).expect("the proxy accepts the snapshot");
    // The route's cluster is the mesh's own, with the service's endpoint; a host nobody
    // declares gets an empty placeholder (503 UH), not a missing cluster.
    let c = cluster(&built.snapshot, "outbound|80||web.shop.svc.cluster.local");
    let addrs: Vec<&str> = c.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(addrs, ["10.0.0.9:8080"]);
    assert!(
        cluster(&built.snapshot, "outbound|80||nowhere.example.com")
            .endpoints
            .is_empty()
    );
    // A plain sidecar gets no gateway servers, and its scope differs from the gateway's.
    let plain = sidecar_snapshot(&cfg, &reg, &web, "v1");
    assert!(plain.snapshot.gateway_ports.is_empty());
    let gw_here = Instance {
        namespace: "shop".into(),
        ..gw.clone()
    };
    assert_ne!(
        trellis_control::mesh::scope_key(&cfg, &gw_here),
        trellis_control::mesh::scope_key(&cfg, &web)
    );
}
