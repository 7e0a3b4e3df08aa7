//! ServiceEntries as Istio users write them, translated and reached through a real sidecar
//! proxy: resolution DNS (the proxy resolves the host, and follows a changed answer),
//! STATIC (the entry's endpoints) and NONE (the connection goes where the app sent it).
//! Name resolution is a fake in these tests: no query leaves the machine.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_api::{LoadOptions, Spec, parse_text};
use trellis_control::translate;
use trellis_proxy::sockets::FixedOriginalDst;
use trellis_proxy::{Config, LoadEnv, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot as wire;

fn entry(yaml: &str) -> (Vec<wire::Service>, Vec<wire::Cluster>) {
    let parsed = parse_text(yaml, "se.yaml", &LoadOptions::default());
    let r = parsed[0]
        .resource()
        .unwrap_or_else(|| panic!("{:?}", parsed[0].diagnostics));
    let Spec::ServiceEntry(se) = &r.spec else {
        panic!("not a ServiceEntry")
    };
    translate::service_entry(se, r.namespace(), r.name()).expect("translates")
}

/// A resolver answering from a table the test can change.
fn fake_resolver(
    table: Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>,
) -> trellis_proxy::config::Resolver {
    Arc::new(move |name: &str| {
        table
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .get(name)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such host")))
    })
}

async fn get(addr: SocketAddr, host: &str) -> (u16, String) {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http_client::get(addr, host, "/bytes/3"),
    )
    .await
    .expect("in time")
    .expect("response");
    let flags = r
        .headers
        .get("x-trellis-response-flags")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (r.status.as_u16(), flags)
}

#[tokio::test]
async fn dns_resolution_follows_the_answer() {
    let (first, second) = (
        HttpServer::start().await.expect("first"),
        HttpServer::start().await.expect("second"),
    );
    let (services, mut clusters) = entry(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [api.payments.example]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
"#,
    );
    assert_eq!(clusters.len(), 1);
    assert_eq!(clusters[0].name, "outbound|80||api.payments.example");
    assert_eq!(clusters[0].discovery, wire::Discovery::StrictDns as i32);
    assert_eq!(
        clusters[0].endpoints[0].address,
        "api.payments.example:8080"
    );
    clusters[0].dns_refresh_rate = Some(wire::from_std(Duration::from_millis(50)));

    let table = Arc::new(Mutex::new(HashMap::from([(
        "api.payments.example:8080".to_string(),
        vec![first.addr],
    )])));
    let env = LoadEnv {
        resolver: fake_resolver(Arc::clone(&table)),
        ..LoadEnv::default()
    };
    let snapshot = wire::Snapshot {
        version: "se".into(),
        services,
        clusters,
        ..Default::default()
    };
    let proxy = trellis_proxy::start(
        Config::from_wire_with(snapshot, None, &env).expect("converts"),
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "api.payments.example".into(),
                80,
            )],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let refresh = tokio::spawn(trellis_proxy::proxy::refresh_dns(
        Arc::clone(&proxy.shared),
        env.clone(),
    ));
    let addr = proxy.outbound_addrs[0];
    assert_eq!(get(addr, "api.payments.example").await.0, 200);
    assert_eq!(first.stats().requests(), 1);

    // The name now answers with another address: within a few refreshes, traffic moves.
    table
        .lock()
        .expect("lock")
        .insert("api.payments.example:8080".into(), vec![second.addr]);
    let mut moved = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if proxy.config().dns.get("api.payments.example:8080") == Some(&vec![second.addr]) {
            moved = true;
            break;
        }
    }
    assert!(moved, "the refresh picked up the new answer");
    assert_eq!(get(addr, "api.payments.example").await.0, 200);
    assert_eq!(second.stats().requests(), 1);

    // The name stops resolving: no endpoints, 503 UH, and the proxy keeps serving.
    table.lock().expect("lock").clear();
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if proxy
            .config()
            .dns
            .get("api.payments.example:8080")
            .is_some_and(|a| a.is_empty())
        {
            gone = true;
            break;
        }
    }
    assert!(gone, "the failed answer was applied");
    assert_eq!(get(addr, "api.payments.example").await, (503, "UH".into()));
    refresh.abort();
}

#[tokio::test]
async fn static_endpoints_and_resolution_none() {
    let app = HttpServer::start().await.expect("app");
    // STATIC: the entry's endpoints, each port named like the entry's port.
    let (services, clusters) = entry(&format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: shop}}
spec:
  hosts: [legacy.internal]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {}}}
"#,
        app.addr.port()
    ));
    assert_eq!(clusters[0].endpoints[0].address, app.addr.to_string());
    let proxy = trellis_proxy::start(
        Config::from_wire(
            wire::Snapshot {
                services,
                clusters,
                ..Default::default()
            },
            None,
        )
        .expect("converts"),
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "legacy.internal".into(),
                80,
            )],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    assert_eq!(get(proxy.outbound_addrs[0], "legacy.internal").await.0, 200);
    assert_eq!(app.stats().requests(), 1);

    // NONE: the service's address is where the app connects; the proxy sends the request
    // on to that same address (here the fixture's), with the service's routing applied.
    let (services, clusters) = entry(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-range, namespace: shop}
spec:
  hosts: [db.internal]
  addresses: [127.0.0.1]
  location: MESH_EXTERNAL
  resolution: NONE
  ports: [{number: 1, name: http, protocol: HTTP}]
"#,
    );
    assert!(clusters[0].endpoints.is_empty());
    // The fixture's port is the service port, so the intercepted destination matches it.
    let mut services = services;
    services[0].ports[0].port = u32::from(app.addr.port());
    let mut clusters = clusters;
    clusters[0].name = translate::cluster_name(app.addr.port(), None, "db.internal");
    services[0].ports[0].cluster = clusters[0].name.clone();
    let proxy = trellis_proxy::start(
        Config::from_wire(
            wire::Snapshot {
                services,
                clusters,
                ..Default::default()
            },
            None,
        )
        .expect("converts"),
        ProxyOptions {
            outbound_capture: Some("127.0.0.1:0".parse().expect("addr")),
            original_dst: Arc::new(FixedOriginalDst(app.addr)),
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    assert_eq!(get(proxy.outbound_addrs[0], "db.internal").await.0, 200);
    assert_eq!(app.stats().requests(), 2);
}

#[test]
fn bad_entries_stop_before_the_proxy() {
    // A wildcard host with DNS resolution is refused by validation, with its position.
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: w}\nspec:\n  hosts: ['*.example.com']\n  resolution: DNS\n  ports: [{number: 443, name: https, protocol: TLS}]\n";
    let parsed = parse_text(yaml, "se.yaml", &LoadOptions::default());
    assert!(parsed[0].resource().is_none());
    let msg = format!("{:?}", parsed[0].diagnostics);
    assert!(msg.contains("no wildcard"), "{msg}");
    // DYNAMIC_DNS is not translated, and says so.
    let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: d, namespace: shop}\nspec:\n  hosts: [d.example.com]\n  resolution: DYNAMIC_DNS\n  ports: [{number: 443, name: https, protocol: TLS}]\n";
    let parsed = parse_text(yaml, "se.yaml", &LoadOptions::default());
    let r = parsed[0]
        .resource()
        .unwrap_or_else(|| panic!("{:?}", parsed[0].diagnostics));
    let Spec::ServiceEntry(se) = &r.spec else {
        panic!("not a ServiceEntry")
    };
    let e = translate::service_entry(se, r.namespace(), r.name()).expect_err("dynamic dns");
    assert_eq!(
        e.to_string(),
        "ServiceEntry shop/d: spec.resolution: DYNAMIC_DNS is not supported by Trellis yet"
    );
}

#[tokio::test]
async fn an_egress_gateway_reaches_a_dns_service_entry() {
    let external = HttpServer::start().await.expect("external");
    let parsed = parse_text(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin-ext, namespace: shop}
spec:
  hosts: [httpbin.example.org]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: egress, namespace: shop}
spec:
  selector: {istio: egressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [httpbin.example.org]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: via-egress, namespace: shop}
spec:
  hosts: [httpbin.example.org]
  gateways: [egress]
  http:
  - route: [{destination: {host: httpbin.example.org, port: {number: 80}}}]
"#,
        "egress.yaml",
        &LoadOptions::default(),
    );
    let resources: Vec<_> = parsed
        .iter()
        .map(|p| {
            p.resource()
                .unwrap_or_else(|| panic!("{:?}", p.diagnostics))
        })
        .collect();
    let mut clusters = Vec::new();
    let mut gateways = Vec::new();
    let mut vss = Vec::new();
    for r in &resources {
        match &r.spec {
            Spec::ServiceEntry(se) => clusters.extend(
                translate::service_entry(se, r.namespace(), r.name())
                    .expect("translates")
                    .1,
            ),
            Spec::Gateway(g) => gateways.push(translate::GatewayRef {
                namespace: r.namespace(),
                name: r.name(),
                gateway: g,
            }),
            Spec::VirtualService(vs) => vss.push(translate::VirtualServiceRef {
                namespace: r.namespace(),
                name: r.name(),
                vs,
            }),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (ports, problems) = translate::gateway_ports(&gateways, &vss);
    assert!(problems.is_empty(), "{problems:?}");
    // The external name resolves (in this test's fake resolver) to the fixture.
    let table = Arc::new(Mutex::new(HashMap::from([(
        "httpbin.example.org:80".to_string(),
        vec![external.addr],
    )])));
    let env = LoadEnv {
        resolver: fake_resolver(table),
        ..LoadEnv::default()
    };
    let snapshot = wire::Snapshot {
        version: "egress".into(),
        clusters,
        gateway_ports: ports,
        ..Default::default()
    };
    let gw = trellis_proxy::start(
        Config::from_wire_with(snapshot, None, &env).expect("converts"),
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("egress gateway");
    assert_eq!(get(gw.inbound_addrs[0], "httpbin.example.org").await.0, 200);
    assert_eq!(external.stats().requests(), 1);
    // A host the egress Gateway does not serve: 404 NR.
    assert_eq!(
        get(gw.inbound_addrs[0], "elsewhere.example.org").await,
        (404, "NR".into())
    );
}
