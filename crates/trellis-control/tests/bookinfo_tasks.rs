//! Istio's Bookinfo traffic-management tasks, as Istio's own YAML in
//! examples/bookinfo-tasks: each task file, with the DestinationRules, is translated into
//! one snapshot (a service per Bookinfo service, a fixture server per version) and driven
//! through a real proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use trellis_api::networking::{DestinationRule, VirtualService};
use trellis_api::{LoadOptions, Spec, load_paths};
use trellis_control::clusters::{EndpointRef, clusters_for_port};
use trellis_control::translate::{self, cluster_name};
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot as wire;

const SERVICES: [&str; 4] = ["productpage", "reviews", "ratings", "details"];

fn tasks() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bookinfo-tasks")
}

/// The fixtures: one server per service version.
struct Bookinfo {
    servers: BTreeMap<(String, String), HttpServer>,
}

impl Bookinfo {
    async fn start() -> Bookinfo {
        let mut servers = BTreeMap::new();
        for (svc, versions) in [
            ("productpage", &["v1"][..]),
            ("reviews", &["v1", "v2", "v3"][..]),
            ("ratings", &["v1"][..]),
            ("details", &["v1"][..]),
        ] {
            for v in versions {
                servers.insert(
                    (svc.to_string(), v.to_string()),
                    HttpServer::start().await.expect("fixture"),
                );
            }
        }
        Bookinfo { servers }
    }

    fn requests(&self, svc: &str, version: &str) -> u64 {
        self.servers
            .get(&(svc.to_string(), version.to_string()))
            .map_or(0, |s| s.stats().requests())
    }

    /// A proxy for the task file `task` with the DestinationRules, listening for each
    /// Bookinfo service (in that order).
    async fn proxy(&self, task: &str) -> ProxyHandle {
        let parsed = load_paths(
            &[
                tasks().join("destination-rule-all.yaml"),
                tasks().join(task),
            ],
            &LoadOptions::default(),
        );
        let mut rules: BTreeMap<String, DestinationRule> = BTreeMap::new();
        let mut vss: BTreeMap<String, VirtualService> = BTreeMap::new();
        for p in &parsed {
            let r = p
                .resource()
                .unwrap_or_else(|| panic!("{:?}", p.diagnostics));
            match &r.spec {
                Spec::DestinationRule(d) => {
                    rules.insert(d.host.clone(), d.clone());
                }
                Spec::VirtualService(v) => {
                    vss.insert(v.hosts[0].clone(), v.clone());
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut services = Vec::new();
        let mut clusters = Vec::new();
        for svc in SERVICES {
            let fqdn = format!("{svc}.bookinfo.svc.cluster.local");
            let endpoints: Vec<EndpointRef> = self
                .servers
                .iter()
                .filter(|((s, _), _)| s == svc)
                .map(|((_, v), server)| EndpointRef {
                    ip: server.addr.ip(),
                    port: server.addr.port(),
                    labels: BTreeMap::from([
                        ("app".to_string(), svc.to_string()),
                        ("version".to_string(), v.clone()),
                    ]),
                    proxied: false,
                    plaintext: false,
                    identity: None,
                    locality: None,
                    workload: format!("{svc}-{v}"),
                    namespace: "bookinfo".into(),
                })
                .collect();
            clusters.extend(
                clusters_for_port(
                    &fqdn,
                    9080,
                    &endpoints,
                    rules.get(svc).map(|d| (d, "bookinfo")),
                )
                .expect("DestinationRule translates"),
            );
            let http_routes = match vss.get(svc) {
                Some(vs) => {
                    translate::virtual_service(vs, "bookinfo", 9080)
                        .expect("VirtualService translates")
                        .http
                }
                None => Vec::new(),
            };
            services.push(wire::Service {
                hostname: fqdn.clone(),
                addresses: vec![],
                ports: vec![wire::ServicePort {
                    port: 9080,
                    name: Some("http".into()),
                    cluster: cluster_name(9080, None, &fqdn),
                    http_routes,
                    ..Default::default()
                }],
            });
        }
        let snapshot = wire::Snapshot {
            version: task.into(),
            services,
            clusters,
            ..Default::default()
        };
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        trellis_proxy::start(
            Config::from_wire(snapshot, None).expect("snapshot converts"),
            ProxyOptions {
                outbound_listen: SERVICES
                    .iter()
                    .map(|s| (any, s.to_string(), 9080))
                    .collect(),
                ..ProxyOptions::default()
            },
        )
        .await
        .expect("proxy")
    }
}

async fn get(addr: SocketAddr, user: Option<&str>) -> Result<u16, String> {
    let mut c = http_client::HttpClient::http1(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = c.request(http::Method::GET, "bookinfo", "/bytes/2");
    if let Some(u) = user {
        req = req.header("end-user", u);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    Ok(c.send(req)
        .await
        .map_err(|e| e.to_string())?
        .status
        .as_u16())
}

#[tokio::test]
async fn all_v1_then_jason_to_v2_then_half_to_v3() {
    let b = Bookinfo::start().await;

    // Every service to v1.
    let p = b.proxy("virtual-service-all-v1.yaml").await;
    for (i, svc) in SERVICES.iter().enumerate() {
        for _ in 0..30 {
            assert_eq!(get(p.outbound_addrs[i], None).await, Ok(200), "{svc}");
        }
    }
    assert_eq!(b.requests("reviews", "v1"), 30);
    assert_eq!(b.requests("reviews", "v2") + b.requests("reviews", "v3"), 0);
    assert_eq!(b.requests("productpage", "v1"), 30);

    // jason to v2, the others still v1.
    let p = b.proxy("virtual-service-reviews-test-v2.yaml").await;
    let reviews = p.outbound_addrs[1];
    for _ in 0..20 {
        assert_eq!(get(reviews, Some("jason")).await, Ok(200));
        assert_eq!(get(reviews, Some("alice")).await, Ok(200));
    }
    assert_eq!(b.requests("reviews", "v2"), 20);
    assert_eq!(b.requests("reviews", "v1"), 50);

    // Half to v3, over 1,000 requests within 45–55 %.
    let p = b.proxy("virtual-service-reviews-50-v3.yaml").await;
    let before = (b.requests("reviews", "v1"), b.requests("reviews", "v3"));
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[1])
        .await
        .expect("connect");
    for _ in 0..1000 {
        assert_eq!(
            c.get("reviews", "/bytes/2").await.expect("response").status,
            200
        );
    }
    let v1 = b.requests("reviews", "v1") - before.0;
    let v3 = b.requests("reviews", "v3") - before.1;
    assert_eq!(v1 + v3, 1000);
    assert!((450..=550).contains(&v3), "v1 {v1}, v3 {v3}");
}

#[tokio::test]
async fn ratings_faults_for_jason() {
    let b = Bookinfo::start().await;

    // Abort: jason gets 500 without reaching ratings; others are served.
    let p = b.proxy("virtual-service-ratings-test-abort.yaml").await;
    let ratings = p.outbound_addrs[2];
    for _ in 0..10 {
        assert_eq!(get(ratings, Some("jason")).await, Ok(500));
    }
    assert_eq!(b.requests("ratings", "v1"), 0);
    assert_eq!(get(ratings, Some("alice")).await, Ok(200));
    assert_eq!(b.requests("ratings", "v1"), 1);

    // Delay: jason's request waits 7 s (seen here as no answer within 1.5 s); the
    // others are answered at once.
    let p = b.proxy("virtual-service-ratings-test-delay.yaml").await;
    let ratings = p.outbound_addrs[2];
    let start = Instant::now();
    assert_eq!(get(ratings, Some("alice")).await, Ok(200));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let delayed =
        tokio::time::timeout(Duration::from_millis(1500), get(ratings, Some("jason"))).await;
    assert!(
        delayed.is_err(),
        "jason's request is held by the 7 s delay: {delayed:?}"
    );
    assert_eq!(
        b.requests("ratings", "v1"),
        2,
        "the delayed request has not reached ratings"
    );
}
