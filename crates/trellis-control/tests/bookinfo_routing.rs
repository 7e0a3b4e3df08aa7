//! Istio's Bookinfo routing rules, as Istio YAML in examples/bookinfo, translated into a
//! proxy snapshot and exercised through a real proxy: user jason sees reviews v2, everyone
//! else a 50/50 split of v1 and v3. The clusters come from the example's DestinationRule
//! (subsets by the endpoints' version labels).

use std::net::SocketAddr;
use std::path::Path;

use trellis_api::{LoadOptions, Spec, load_paths};
use trellis_control::clusters::{EndpointRef, clusters_for_port};
use trellis_control::translate::{self, cluster_name};
use trellis_proxy::{Config, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot as wire;

fn endpoint(addr: SocketAddr, version: &str) -> EndpointRef {
    EndpointRef {
        ip: addr.ip(),
        port: addr.port(),
        labels: [("app", "reviews"), ("version", version)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        proxied: false,
        plaintext: false,
        identity: None,
        locality: None,
        workload: format!("reviews-{version}"),
        namespace: "bookinfo".into(),
    }
}

#[tokio::test]
async fn bookinfo_reviews_rules_through_the_proxy() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo");
    let parsed = load_paths(&[examples], &LoadOptions::default());
    let dr = parsed
        .iter()
        .filter_map(|p| p.resource())
        .find_map(|r| match &r.spec {
            Spec::DestinationRule(d) if r.name() == "reviews" => Some(d.clone()),
            _ => None,
        })
        .expect("the reviews DestinationRule");
    let vs = parsed
        .iter()
        .filter_map(|p| p.resource())
        .find_map(|r| match &r.spec {
            Spec::VirtualService(vs) if r.name() == "reviews" => {
                Some((vs.clone(), r.namespace().to_string()))
            }
            _ => None,
        })
        .expect("the reviews VirtualService");
    let routes = translate::virtual_service(&vs.0, &vs.1, 9080).expect("translates");
    assert_eq!(routes.http.len(), 2);
    assert_eq!(routes.http[0].name, "jason");
    assert_eq!(
        routes.http[0].clusters[0].cluster,
        "outbound|9080|v2|reviews.bookinfo.svc.cluster.local"
    );

    let (v1, v2, v3) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
        HttpServer::start().await.expect("v3"),
    );
    let host = "reviews.bookinfo.svc.cluster.local";
    let snapshot = wire::Snapshot {
        version: "bookinfo".into(),
        services: vec![wire::Service {
            hostname: host.into(),
            addresses: vec![],
            ports: vec![wire::ServicePort {
                port: 9080,
                name: Some("http".into()),
                cluster: cluster_name(9080, None, host),
                http_routes: routes.http,
                ..Default::default()
            }],
        }],
        clusters: clusters_for_port(
            host,
            9080,
            &[
                endpoint(v1.addr, "v1"),
                endpoint(v2.addr, "v2"),
                endpoint(v3.addr, "v3"),
            ],
            Some((&dr, "bookinfo/reviews")),
        )
        .expect("DestinationRule translates"),
        ..Default::default()
    };
    let p = trellis_proxy::start(
        Config::from_wire(snapshot, None).expect("snapshot converts"),
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "reviews".into(), 9080)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    for _ in 0..10 {
        let req = c
            .request(http::Method::GET, "reviews:9080", "/bytes/3")
            .header("end-user", "jason")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        assert_eq!(c.send(req).await.expect("response").status, 200);
    }
    assert_eq!(v2.stats().requests(), 10, "jason sees v2");
    for _ in 0..2000 {
        assert_eq!(
            c.get("reviews:9080", "/bytes/3")
                .await
                .expect("response")
                .status,
            200
        );
    }
    let (n1, n3) = (v1.stats().requests(), v3.stats().requests());
    assert_eq!(n1 + n3, 2000);
    assert!((900..=1100).contains(&n1), "v1 {n1}, v3 {n3}");
    assert_eq!(v2.stats().requests(), 10, "nobody else sees v2");
}
