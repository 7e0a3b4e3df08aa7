//! Delta ADS between the control plane and a real proxy over the network (loopback): the
//! proxy announces its instance and gets its snapshot; the control plane is killed under
//! steady traffic (no request fails: the proxy keeps its last snapshot); it comes back, the
//! proxy reconnects, and a new change arrives.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use trellis_api::Resource;
use trellis_control::ConfigStore;
use trellis_control::registry::{Instance, InstancePort, Registry};
use trellis_control::server::{ControlPlane, Debounce};
use trellis_proxy::sockets::FixedOriginalDst;
use trellis_proxy::{Config, LoadEnv, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::ads::Announce;

mod common;
use common::{ALL_TO_V2, SERVICES, eventually, parse};

fn reviews(version: &str, port: u16) -> Instance {
    Instance {
        name: format!("reviews-{version}"),
        workload: format!("reviews-{version}"),
        namespace: "shop".into(),
        labels: [("app", "reviews"), ("version", version)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        service_account: "reviews".into(),
        addresses: vec![IpAddr::from([127, 0, 0, 1])],
        ports: vec![InstancePort {
            name: Some("http".into()),
            port,
            protocol: None,
        }],
        locality: None,
        entry: false,
    }
}

/// A running control plane with `yaml` applied, reviews v1 and v2 connected (each an
/// app), and its Delta ADS server on loopback.
struct Mesh {
    store: Arc<ConfigStore>,
    cp: Arc<ControlPlane>,
    v1: HttpServer,
    v2: HttpServer,
    xds_addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

async fn mesh(yaml: &str) -> Mesh {
    let store = Arc::new(ConfigStore::new());
    for r in parse(yaml) {
        store.apply(r);
    }
    let cp = ControlPlane::new(
        Arc::clone(&store),
        Debounce {
            quiet: Duration::from_millis(30),
            max: Duration::from_millis(200),
        },
    );
    tokio::spawn(Arc::clone(&cp).run());
    let (v1, v2) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
    );
    // Held by the control plane until disconnected.
    let _ = cp.connect(reviews("v1", v1.addr.port()));
    let _ = cp.connect(reviews("v2", v2.addr.port()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let xds_addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(trellis_control::ads::serve(listener, Arc::clone(&cp)));
    Mesh {
        store,
        cp,
        v1,
        v2,
        xds_addr,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_follows_the_control_plane_and_survives_its_restart() {
    let Mesh {
        store,
        cp,
        v1,
        v2,
        xds_addr,
        server,
    } = mesh(SERVICES).await;

    // The virtual IP the app dials (stable: the registry hashes the name).
    let snap = store.snapshot();
    let refs: Vec<&Resource> = snap.objects.iter().map(|r| r.as_ref()).collect();
    let vip = Registry::build(&refs, vec![])
        .service("reviews.shop", "web")
        .expect("reviews")
        .vip;
    let proxy = trellis_proxy::start(
        Config::empty(),
        ProxyOptions {
            outbound_capture: Some("127.0.0.1:0".parse().expect("addr")),
            original_dst: Arc::new(FixedOriginalDst(SocketAddr::new(vip, 9080))),
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let announce = Announce {
        name: "web-0".into(),
        namespace: "web".into(),
        service_account: "web".into(),
        labels: [("app".to_string(), "web".to_string())]
            .into_iter()
            .collect(),
        addresses: vec!["127.0.0.1".into()],
        ports: vec![(Some("http".into()), 8080)],
        locality: None,
        workload_group: None,
    };
    tokio::spawn(trellis_proxy::xds::follow(
        xds_addr,
        announce,
        Arc::clone(&proxy.shared),
        LoadEnv::default(),
    ));
    assert!(
        eventually(Duration::from_secs(5), || !proxy
            .config()
            .clusters
            .is_empty())
        .await,
        "the first snapshot arrived over the network"
    );
    assert!(
        eventually(Duration::from_secs(2), || cp
            .status()
            .iter()
            .any(|s| s.instance == "web-0" && s.acked.is_some()))
        .await,
        "and was ACKed: {:#?}",
        cp.status()
    );
    let addr = proxy.outbound_addrs[0];
    let mut c = http_client::HttpClient::http1(addr).await.expect("connect");
    for _ in 0..10 {
        assert_eq!(
            c.get("reviews.shop:9080", "/bytes/1")
                .await
                .expect("response")
                .status,
            200
        );
    }
    assert!(v1.stats().requests() > 0 && v2.stats().requests() > 0);

    // The control plane goes away under steady traffic: no request fails.
    server.abort();
    let _ = server.await;
    let mut failed = 0;
    for _ in 0..40 {
        match c.get("reviews.shop:9080", "/bytes/1").await {
            Ok(r) if r.status == 200 => {}
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(failed, 0, "requests fail while the control plane is down");

    // It comes back on the same address; the proxy reconnects and takes a new change.
    let listener = TcpListener::bind(xds_addr).await.expect("rebind");
    let _server = tokio::spawn(trellis_control::ads::serve(listener, Arc::clone(&cp)));
    for r in parse(ALL_TO_V2) {
        store.apply(r);
    }
    let before = v1.stats().requests();
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .config()
            .targets
            .iter()
            .any(|t| t.routes.is_some()))
        .await,
        "the VirtualService arrived after the reconnect"
    );
    for _ in 0..10 {
        assert_eq!(
            c.get("reviews.shop:9080", "/bytes/1")
                .await
                .expect("response")
                .status,
            200
        );
    }
    assert_eq!(v1.stats().requests(), before, "all to v2 now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_follows_the_control_plane() {
    let gateway = r#"
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
metadata: {name: front, namespace: shop}
spec:
  hosts: ["*"]
  gateways: [ingress]
  http:
  - route: [{destination: {host: reviews, subset: v2}}]
"#;
    let Mesh {
        v1,
        v2,
        xds_addr,
        store,
        ..
    } = mesh(&format!("{SERVICES}\n---\n{gateway}")).await;

    // A gateway-mode proxy: its listener is given up front, its servers come over xDS.
    let proxy = trellis_proxy::start(
        Config::empty(),
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 8080)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("gateway");
    let announce = Announce {
        name: "ingressgateway-0".into(),
        namespace: "gateways".into(),
        service_account: "ingressgateway".into(),
        labels: [("istio".to_string(), "ingressgateway".to_string())]
            .into_iter()
            .collect(),
        addresses: vec!["127.0.0.1".into()],
        ports: vec![],
        locality: None,
        workload_group: None,
    };
    tokio::spawn(trellis_proxy::xds::follow(
        xds_addr,
        announce,
        Arc::clone(&proxy.shared),
        LoadEnv::default(),
    ));
    assert!(
        eventually(Duration::from_secs(5), || !proxy
            .config()
            .gateway_ports
            .is_empty())
        .await,
        "the gateway's servers arrived over the network"
    );
    let addr = proxy.inbound_addrs[0]; // gateway listeners count as inbound
    for _ in 0..5 {
        let r = http_client::get(addr, "shop.example.com", "/bytes/2")
            .await
            .expect("response");
        assert_eq!(r.status.as_u16(), 200, "{:?}", r.body);
    }
    assert_eq!(
        v2.stats().requests(),
        5,
        "the VirtualService sends everything to v2"
    );
    assert_eq!(v1.stats().requests(), 0);

    // Policies that select the gateway's workload apply at the gateway: a DENY on a path,
    // and a RequestAuthentication whose tokens must verify (a bad one: 401).
    for r in parse(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: gateways}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: gateways}\nspec:\n  selector: {matchLabels: {istio: ingressgateway}}\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{\"keys\": [{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": \"k\", \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}]}'\n",
    ) {
        store.apply(r);
    }
    assert!(
        eventually(Duration::from_secs(5), || !proxy.config().authz.is_empty()
            && !proxy.config().jwt.is_empty())
        .await
    );
    let get = |path: &'static str, auth: Option<&'static str>| async move {
        let mut c = trellis_testkit::http_client::HttpClient::http1(addr)
            .await
            .expect("connect");
        let mut req = c.request(http::Method::GET, "shop.example.com", path);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        c.send(req).await.expect("response").status.as_u16()
    };
    assert_eq!(get("/admin/users", None).await, 403);
    assert_eq!(get("/bytes/2", None).await, 200);
    assert_eq!(get("/bytes/2", Some("Bearer not.a.token")).await, 401);
    assert_eq!(
        v2.stats().requests(),
        6,
        "refused requests never reach the service"
    );
}

/// A bare Delta ADS client: sends what the test says, shows every response as it is.
struct RawAds {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    body: hyper::body::Incoming,
    deframer: trellis_xds::ads::Deframer,
    _conn: tokio::task::JoinHandle<()>,
}

struct ChannelBody(tokio::sync::mpsc::Receiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|d| d.map(|d| Ok(http_body::Frame::data(d))))
    }
}

impl RawAds {
    async fn connect(addr: SocketAddr, name: &str, held: &BTreeMap<String, String>) -> RawAds {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("h2");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let req = http::Request::post(format!("http://{addr}{}", trellis_xds::ads::DELTA_ADS_PATH))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(ChannelBody(rx))
            .expect("request");
        let announce = Announce {
            name: name.into(),
            namespace: "web".into(),
            service_account: "web".into(),
            labels: [("app".to_string(), "web".to_string())]
                .into_iter()
                .collect(),
            addresses: vec!["127.0.0.1".into()],
            ports: vec![],
            locality: None,
            workload_group: None,
        };
        let first = trellis_xds::ads::DeltaDiscoveryRequest {
            node: Some(announce.to_node()),
            type_url: trellis_xds::ads::SNAPSHOT_TYPE_URL.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: held.clone(),
            ..Default::default()
        };
        tx.send(trellis_xds::ads::frame(&first).into())
            .await
            .expect("send");
        let resp = sender.send_request(req).await.expect("response");
        RawAds {
            tx,
            body: resp.into_body(),
            deframer: trellis_xds::ads::Deframer::default(),
            _conn: conn,
        }
    }

    async fn next(&mut self) -> trellis_xds::ads::DeltaDiscoveryResponse {
        use http_body_util::BodyExt;
        let read = async {
            loop {
                if let Some(m) = self.deframer.next_message().expect("decodes") {
                    return m;
                }
                let f = self.body.frame().await.expect("open").expect("frame");
                if let Ok(d) = f.into_data() {
                    self.deframer.push(&d);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a response within 5 s")
    }

    /// No response for `d`.
    async fn quiet_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.next()).await.is_err()
    }

    async fn answer(&self, nonce: &str, error: Option<&str>) {
        let answer = trellis_xds::ads::DeltaDiscoveryRequest {
            type_url: trellis_xds::ads::SNAPSHOT_TYPE_URL.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| trellis_xds::ads::Status {
                code: 3,
                message: m.into(),
            }),
            ..Default::default()
        };
        self.tx
            .send(trellis_xds::ads::frame(&answer).into())
            .await
            .expect("send");
    }
}

fn names(r: &trellis_xds::ads::DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_carry_only_the_resources_that_changed() {
    use trellis_xds::delta::record;
    let Mesh {
        store,
        cp,
        xds_addr,
        ..
    } = mesh(SERVICES).await;
    let mut held = BTreeMap::new();
    let mut ads = RawAds::connect(xds_addr, "web-0", &held).await;

    // The first push: everything, as one resource per service and cluster.
    let first = ads.next().await;
    let n = names(&first);
    assert!(n.contains(&"proxy"), "{n:?}");
    assert!(
        n.contains(&"service/reviews.shop.svc.cluster.local"),
        "{n:?}"
    );
    assert!(
        n.iter().filter(|n| n.starts_with("cluster/")).count() >= 3,
        "{n:?}"
    );
    assert!(first.removed_resources.is_empty());
    record(&mut held, &first.resources, &first.removed_resources);
    ads.answer(&first.nonce, None).await;

    // An endpoint joins: only clusters and the instance's own `peer/` resource travel,
    // never the routes or the proxy's own part.
    let (v3, _v3_handle) = {
        let s = HttpServer::start().await.expect("v3");
        let port = s.addr.port();
        (cp.connect(reviews("v3", port)), s)
    };
    let churn = ads.next().await;
    let n = names(&churn);
    assert!(!n.is_empty(), "the new endpoint arrives");
    assert!(
        n.iter()
            .all(|n| n.starts_with("cluster/") || n.starts_with("peer/")),
        "{n:?}"
    );
    assert_eq!(
        n.iter().filter(|n| n.starts_with("peer/")).count(),
        1,
        "{n:?}"
    );
    assert!(churn.resources.len() < first.resources.len());
    record(&mut held, &churn.resources, &churn.removed_resources);
    ads.answer(&churn.nonce, None).await;

    // A route change: the service, and nothing else.
    for r in parse(ALL_TO_V2) {
        store.apply(r);
    }
    let routed = ads.next().await;
    assert_eq!(names(&routed), ["service/reviews.shop.svc.cluster.local"]);
    // Refused: the control plane does not count it as held, so it comes again with the
    // next change (here the endpoint leaving again).
    ads.answer(&routed.nonce, Some("not today")).await;
    assert!(
        eventually(Duration::from_secs(2), || cp
            .status()
            .iter()
            .any(|s| s.instance == "web-0" && s.nacked.is_some()))
        .await
    );
    assert!(
        ads.quiet_for(Duration::from_millis(300)).await,
        "not resent at once"
    );
    // Sent again after a backoff (about 1 s), in case the refusal was passing.
    let retried = ads.next().await;
    assert_eq!(names(&retried), ["service/reviews.shop.svc.cluster.local"]);
    record(&mut held, &retried.resources, &retried.removed_resources);
    ads.answer(&retried.nonce, None).await;
    // The endpoint leaves: clusters only again.
    cp.disconnect(v3.id);
    let again = ads.next().await;
    let n = names(&again);
    assert!(
        !n.is_empty() && n.iter().all(|n| n.starts_with("cluster/")),
        "{n:?}"
    );
    record(&mut held, &again.resources, &again.removed_resources);
    ads.answer(&again.nonce, None).await;
    drop(ads);

    // Reconnecting with what it holds: an empty response, which it ACKs.
    let mut ads = RawAds::connect(xds_addr, "web-0", &held).await;
    let resync = ads.next().await;
    assert!(resync.resources.is_empty(), "{:?}", names(&resync));
    assert!(resync.removed_resources.is_empty());
    ads.answer(&resync.nonce, None).await;
    drop(ads);

    // Holding something the mesh no longer has: told to drop it, by name.
    held.insert("service/gone.shop.svc.cluster.local".into(), "0".into());
    let mut ads = RawAds::connect(xds_addr, "web-0", &held).await;
    let resync = ads.next().await;
    assert_eq!(
        resync.removed_resources,
        ["service/gone.shop.svc.cluster.local"]
    );
    assert!(resync.resources.is_empty(), "{:?}", names(&resync));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_in_flight_are_bounded() {
    let Mesh { cp, xds_addr, .. } = mesh(SERVICES).await;
    cp.set_push_concurrency(1);
    let mut a = RawAds::connect(xds_addr, "web-0", &BTreeMap::new()).await;
    let first_a = a.next().await;
    assert_eq!(cp.pushes_in_flight(), 1);
    // web-1 connects while web-0's push is unanswered: it waits for the slot.
    let mut b = RawAds::connect(xds_addr, "web-1", &BTreeMap::new()).await;
    assert!(
        b.quiet_for(Duration::from_millis(400)).await,
        "web-1 waits its turn"
    );
    a.answer(&first_a.nonce, None).await;
    let first_b = b.next().await;
    assert!(names(&first_b).contains(&"proxy"));
    b.answer(&first_b.nonce, None).await;
    // web-1 is a new instance of the mesh: web-0 is sent its peer resource, and only that.
    let peer_a = a.next().await;
    assert!(
        names(&peer_a)
            .iter()
            .all(|n| n.starts_with("peer/web/web-1/")),
        "{:?}",
        names(&peer_a)
    );
    a.answer(&peer_a.nonce, None).await;
    assert!(eventually(Duration::from_secs(2), || cp.pushes_in_flight() == 0).await);
    assert!(
        cp.resources_sent_total() >= (first_a.resources.len() + first_b.resources.len()) as u64
    );
}
