//! Istio's standard request metrics through two proxies (outbound → inbound → app),
//! scraped from each proxy's `/stats/prometheus`: the exact series, with every label,
//! for an HTTP 200 on both reporters, a 503 with response flag UF on the source side, and a
//! TCP connection's bytes on both.

mod common;
use common::{outbound_on, start_with_stats};

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::ProxyOptions;
use trellis_testkit::{HttpServer, RefusedPort, TcpEchoServer, http_client, tcp_echo_half_close};

const LIMIT: Duration = Duration::from_secs(20);

async fn scrape(admin: SocketAddr) -> String {
    let r = timeout(
        LIMIT,
        http_client::get(admin, "localhost", "/stats/prometheus"),
    )
    .await
    .expect("in time")
    .expect("stats");
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The value of the series `name{labels}`.
fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

const WEB: &str = r#"source_workload="web",source_canonical_service="web",source_canonical_revision="v2",source_workload_namespace="shop",source_principal="spiffe://cluster.local/ns/shop/sa/web",source_app="web",source_version="v2",source_cluster="Kubernetes""#;
const REVIEWS: &str = r#"destination_workload="reviews-v1",destination_workload_namespace="shop",destination_principal="spiffe://cluster.local/ns/shop/sa/reviews",destination_app="reviews",destination_version="v1",destination_service="reviews.shop.svc.cluster.local",destination_canonical_service="reviews",destination_canonical_revision="v1",destination_service_name="reviews",destination_service_namespace="shop",destination_cluster="Kubernetes""#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_proxies_report_istio_series_with_every_label() {
    let app = HttpServer::start().await.expect("app");
    let echo = TcpEchoServer::start().await.expect("echo");
    let refused = RefusedPort::new().expect("refused port");
    // The server side: reviews-v1. Its snapshot knows the service it serves (the Host
    // names it) and, through another service's endpoint, the caller's workload by address.
    let inbound_yaml = format!(
        r#"version: in
workload:
  name: reviews-v1
  namespace: shop
  serviceAccount: reviews
  labels: {{app: reviews, version: v1}}
  inboundPorts: [{{port: {app_port}, name: http}}, {{port: {echo_port}, name: tcp}}]
services:
- hostname: db.shop.svc.cluster.local
  ports: [{{port: 5432, name: tcp, cluster: "outbound|5432||db.shop.svc.cluster.local"}}]
- hostname: reviews.shop.svc.cluster.local
  ports: [{{port: 9080, name: http, cluster: "outbound|9080||reviews.shop.svc.cluster.local"}}]
- hostname: web.shop.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: "outbound|80||web.shop.svc.cluster.local"}}]
clusters:
- name: "outbound|5432||db.shop.svc.cluster.local"
  endpoints: [{{address: "127.0.0.2:{echo_port}", workload: reviews-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/reviews", labels: {{app: reviews, version: v1}}}}]
- name: "outbound|9080||reviews.shop.svc.cluster.local"
  endpoints: [{{address: "127.0.0.2:{app_port}", workload: reviews-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/reviews", labels: {{app: reviews, version: v1}}}}]
- name: "outbound|80||web.shop.svc.cluster.local"
  endpoints: [{{address: "127.0.0.1:1", workload: web, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/web", labels: {{app: web, version: v2}}}}]
"#,
        app_port = app.addr.port(),
        echo_port = echo.addr.port()
    );
    let (inbound, inbound_admin) = start_with_stats(
        &inbound_yaml,
        ProxyOptions {
            inbound_listen: vec![
                ("127.0.0.1:0".parse().expect("addr"), app.addr.port()),
                ("127.0.0.1:0".parse().expect("addr"), echo.addr.port()),
            ],
            ..ProxyOptions::default()
        },
    )
    .await;
    let (peer, peer_tcp) = (inbound.inbound_addrs[0], inbound.inbound_addrs[1]);
    let outbound_yaml = format!(
        r#"version: out
workload:
  name: web
  namespace: shop
  serviceAccount: web
  labels: {{app: web, version: v2}}
services:
- hostname: reviews.shop.svc.cluster.local
  ports: [{{port: 9080, name: http, cluster: "outbound|9080||reviews.shop.svc.cluster.local"}}]
- hostname: down.shop.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: "outbound|80||down.shop.svc.cluster.local"}}]
- hostname: db.shop.svc.cluster.local
  ports: [{{port: 5432, name: tcp, cluster: "outbound|5432||db.shop.svc.cluster.local"}}]
- hostname: teapot.shop.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: "outbound|80||down.shop.svc.cluster.local"
    httpRoutes:
    - name: teapot
      clusters: [{{cluster: "outbound|80||down.shop.svc.cluster.local"}}]
      fault: {{abort: {{httpStatus: 418, percentage: 100}}}}
clusters:
- name: "outbound|5432||db.shop.svc.cluster.local"
  endpoints: [{{address: "{peer_tcp}", proxied: true, workload: reviews-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/reviews", labels: {{app: reviews, version: v1}}}}]
- name: "outbound|9080||reviews.shop.svc.cluster.local"
  endpoints: [{{address: "{peer}", proxied: true, workload: reviews-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/reviews", labels: {{app: reviews, version: v1}}}}]
- name: "outbound|80||down.shop.svc.cluster.local"
  endpoints: [{{address: "{down}", workload: down-v1, namespace: shop}}]
"#,
        down = refused.addr,
    );
    let (outbound, outbound_admin) = start_with_stats(
        &outbound_yaml,
        ProxyOptions {
            outbound_listen: vec![
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "reviews.shop.svc.cluster.local".into(),
                    9080,
                ),
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "down.shop.svc.cluster.local".into(),
                    80,
                ),
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "db.shop.svc.cluster.local".into(),
                    5432,
                ),
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "teapot.shop.svc.cluster.local".into(),
                    80,
                ),
            ],
            ..ProxyOptions::default()
        },
    )
    .await;
    for _ in 0..3 {
        let r = timeout(
            LIMIT,
            http_client::get(
                outbound.outbound_addrs[0],
                "reviews.shop.svc.cluster.local:9080",
                "/bytes/1024",
            ),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(r.status, 200);
    }
    let r = timeout(
        LIMIT,
        http_client::get(
            outbound.outbound_addrs[1],
            "down.shop.svc.cluster.local",
            "/",
        ),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(r.status, 503);
    // A fault answers before any cluster: the route's service, no destination workload.
    let r = timeout(
        LIMIT,
        http_client::get(
            outbound.outbound_addrs[3],
            "teapot.shop.svc.cluster.local",
            "/",
        ),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(r.status, 418);

    // A TCP connection: 4 bytes each way.
    let echoed = timeout(
        LIMIT,
        tcp_echo_half_close(outbound.outbound_addrs[2], b"ping"),
    )
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(echoed, b"ping");
    let db = format!(
        r#"{WEB},destination_workload="reviews-v1",destination_workload_namespace="shop",destination_principal="spiffe://cluster.local/ns/shop/sa/reviews",destination_app="reviews",destination_version="v1",destination_service="db.shop.svc.cluster.local",destination_canonical_service="reviews",destination_canonical_revision="v1",destination_service_name="db",destination_service_namespace="shop",destination_cluster="Kubernetes",request_protocol="tcp",response_flags="-""#
    );
    let tcp_src = format!(r#"reporter="source",{db},connection_security_policy="unknown""#);
    let tcp_dst = format!(r#"reporter="destination",{db},connection_security_policy="none""#);
    // Counted when the connections close (both proxies notice shortly after the client).
    let mut closed = false;
    for _ in 0..100 {
        let (o, i) = (scrape(outbound_admin).await, scrape(inbound_admin).await);
        if value(&o, "istio_tcp_connections_closed_total", &tcp_src) == Some(1.0)
            && value(&i, "istio_tcp_connections_closed_total", &tcp_dst) == Some(1.0)
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "both ends counted the closed connection");
    let out = scrape(outbound_admin).await;
    let ok = format!(
        r#"reporter="source",{WEB},{REVIEWS},request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="unknown""#
    );
    assert_eq!(value(&out, "istio_requests_total", &ok), Some(3.0), "{out}");
    assert_eq!(
        value(&out, "istio_response_bytes_sum", &ok),
        Some(3.0 * 1024.0),
        "{out}"
    );
    assert_eq!(
        value(
            &out,
            "istio_request_duration_milliseconds_bucket",
            &format!("{ok},le=\"+Inf\"")
        ),
        Some(3.0)
    );
    let uf = format!(
        r#"reporter="source",{WEB},destination_workload="down-v1",destination_workload_namespace="shop",destination_principal="unknown",destination_app="unknown",destination_version="unknown",destination_service="down.shop.svc.cluster.local",destination_canonical_service="down-v1",destination_canonical_revision="latest",destination_service_name="down",destination_service_namespace="shop",destination_cluster="Kubernetes",request_protocol="http",response_code="503",grpc_response_status="",response_flags="UF",connection_security_policy="unknown""#
    );
    assert_eq!(value(&out, "istio_requests_total", &uf), Some(1.0), "{out}");
    let fi = format!(
        r#"reporter="source",{WEB},destination_workload="unknown",destination_workload_namespace="unknown",destination_principal="unknown",destination_app="unknown",destination_version="unknown",destination_service="teapot.shop.svc.cluster.local",destination_canonical_service="unknown",destination_canonical_revision="latest",destination_service_name="teapot",destination_service_namespace="shop",destination_cluster="Kubernetes",request_protocol="http",response_code="418",grpc_response_status="",response_flags="FI",connection_security_policy="unknown""#
    );
    assert_eq!(value(&out, "istio_requests_total", &fi), Some(1.0), "{out}");
    for (name, v) in [
        ("istio_tcp_connections_opened_total", 1.0),
        ("istio_tcp_sent_bytes_total", 4.0),
        ("istio_tcp_received_bytes_total", 4.0),
    ] {
        assert_eq!(value(&out, name, &tcp_src), Some(v), "{name}: {out}");
    }

    let inb = scrape(inbound_admin).await;
    let ok = format!(
        r#"reporter="destination",{WEB},{REVIEWS},request_protocol="http",response_code="200",grpc_response_status="",response_flags="-",connection_security_policy="none""#
    );
    assert_eq!(value(&inb, "istio_requests_total", &ok), Some(3.0), "{inb}");
    assert_eq!(
        value(&inb, "istio_tcp_received_bytes_total", &tcp_dst),
        Some(4.0),
        "{inb}"
    );
    // Bounded labels: nothing of the path.
    assert!(!inb.contains("/bytes/1024") && !out.contains("/bytes/1024"));
}

/// One outbound proxy for `app.shop.svc.cluster.local:80` → `app`; its stats address.
async fn outbound_to(app: SocketAddr) -> (trellis_proxy::ProxyHandle, SocketAddr) {
    start_with_stats(
        &format!(
            "version: t\nworkload: {{name: web, namespace: shop}}\nservices:\n- hostname: app.shop.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  endpoints: [{{address: \"{app}\", workload: app, namespace: shop}}]\n"
        ),
        outbound_on("app.shop.svc.cluster.local", 80),
    )
    .await
}

/// An app cannot forge the proxy's response flags: the header is dropped from upstream
/// answers, and the metric says `-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_flags_from_upstream_are_not_taken() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((mut s, _)) = app.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nx-trellis-response-flags: UF\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    });
    let (p, admin) = outbound_to(app_addr).await;
    // (Retries are on by default: a 503 is tried again; every try gets the same answer.)
    let r = timeout(
        LIMIT,
        http_client::get(p.outbound_addrs[0], "app.shop.svc.cluster.local", "/"),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-response-flags"), None);
    let text = scrape(admin).await;
    assert!(
        text.lines().any(|l| l.starts_with("istio_requests_total{")
            && l.contains("response_code=\"503\"")
            && l.contains("response_flags=\"-\"")),
        "{text}"
    );
    assert!(!text.contains("response_flags=\"UF\""), "{text}");
}

/// A Telemetry's tagOverrides, as the snapshot carries them: a label removed from every
/// metric (series it made distinct are summed), a label added from a request header on
/// the request count, a standard label's value replaced; a TCP connection's metrics take
/// the same plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_overrides_remove_add_and_replace_labels() {
    let app = HttpServer::start().await.expect("app");
    let echo = TcpEchoServer::start().await.expect("echo");
    let yaml = format!(
        r#"version: t
workload:
  name: web
  namespace: shop
  labels: {{app: web, version: v2}}
  telemetry:
    metrics:
      overrides:
      - metric: ALL_METRICS
        mode: CLIENT_AND_SERVER
        tagOverrides:
          response_code: {{remove: true}}
          request_protocol: {{remove: true}}
      - metric: REQUEST_COUNT
        mode: CLIENT
        tagOverrides:
          tier: {{value: "request.headers['x-tier']"}}
          destination_service_name: {{value: "'renamed'"}}
          request_protocol: {{value: "string(destination.port)"}}
      - metric: TCP_OPENED_CONNECTIONS
        tagOverrides:
          port: {{value: "destination.port"}}
services:
- hostname: app.shop.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
- hostname: db.shop.svc.cluster.local
  ports: [{{port: 5432, name: tcp, cluster: db}}]
clusters:
- name: app
  endpoints: [{{address: "{app}", workload: app, namespace: shop}}]
- name: db
  endpoints: [{{address: "{echo}", workload: db, namespace: shop}}]
"#,
        app = app.addr,
        echo = echo.addr,
    );
    let (p, admin) = start_with_stats(
        &yaml,
        ProxyOptions {
            outbound_listen: vec![
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "app.shop.svc.cluster.local".into(),
                    80,
                ),
                (
                    "127.0.0.1:0".parse().expect("addr"),
                    "db.shop.svc.cluster.local".into(),
                    5432,
                ),
            ],
            ..ProxyOptions::default()
        },
    )
    .await;
    let mut c = trellis_testkit::http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    for (tier, path, status) in [
        (Some("gold"), "/bytes/10", 200),
        (Some("gold"), "/status/404", 404),
        (Some("silver"), "/bytes/10", 200),
        (None, "/bytes/10", 200),
    ] {
        let mut req = c.request(http::Method::GET, "app.shop.svc.cluster.local", path);
        if let Some(t) = tier {
            req = req.header("x-tier", t);
        }
        let r = timeout(
            LIMIT,
            c.send(
                req.body(http_body_util::Empty::<bytes::Bytes>::new())
                    .expect("req"),
            ),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(r.status, status);
    }
    timeout(LIMIT, tcp_echo_half_close(p.outbound_addrs[1], b"ping"))
        .await
        .expect("in time")
        .expect("echo");
    let text = scrape(admin).await;
    let count: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    // No code, so the gold 200 and the gold 404 are one series; the protocol label is the
    // port (set after it was removed: the later override wins); the service name replaced.
    assert_eq!(count.len(), 3, "{text}");
    let gold = count
        .iter()
        .find(|l| l.contains("tier=\"gold\""))
        .expect("gold");
    assert!(gold.ends_with("} 2"), "{gold}");
    assert!(!gold.contains("response_code="), "{gold}");
    assert!(
        gold.contains("destination_service_name=\"renamed\""),
        "{gold}"
    );
    assert!(gold.contains("request_protocol=\"80\""), "{gold}");
    assert!(
        gold.ends_with(",tier=\"gold\"} 2"),
        "an added label comes last: {gold}"
    );
    assert!(
        count.iter().any(|l| l.contains("tier=\"silver\"} 1")),
        "{text}"
    );
    assert!(
        count.iter().any(|l| l.contains("tier=\"unknown\"} 1")),
        "{text}"
    );
    // The other metrics: no code, no protocol, no tier; all four requests in one series.
    let durations: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("istio_request_duration_milliseconds_count{"))
        .collect();
    assert_eq!(durations.len(), 1, "{text}");
    assert!(durations[0].ends_with("} 4"), "{}", durations[0]);
    assert!(!durations[0].contains("request_protocol=") && !durations[0].contains("tier="));
    assert!(durations[0].contains("destination_service_name=\"app\""));
    // TCP: the port added to the opened count only; the protocol removed from both.
    let opened = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .expect("opened");
    assert!(opened.ends_with(",port=\"5432\"} 1"), "{opened}");
    assert!(!opened.contains("request_protocol="), "{opened}");
    let closed = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total{"))
        .expect("closed");
    assert!(
        !closed.contains("port=") && !closed.contains("request_protocol="),
        "{closed}"
    );
}

/// A gRPC call through two proxies: both reporters count it as `request_protocol="grpc"`
/// with the call's `grpc_response_status`, from trailers (status 0) and from a
/// trailers-only answer (status 14, UNAVAILABLE), the HTTP status being 200 for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_counted_with_their_grpc_status_on_both_sides() {
    use trellis_testkit::grpc::{GrpcServer, grpc_call_with_authority};
    let app = GrpcServer::start().await.expect("grpc app");
    let (inbound, inbound_admin) = start_with_stats(
        &format!(
            "version: in\nworkload: {{name: echo-v1, namespace: shop, labels: {{app: echo, version: v1}}, inboundPorts: [{{port: {p}, name: grpc}}]}}\nservices:\n- hostname: echo.shop.svc.cluster.local\n  ports: [{{port: 50051, name: grpc, cluster: \"outbound|50051||echo.shop.svc.cluster.local\"}}]\nclusters:\n- name: \"outbound|50051||echo.shop.svc.cluster.local\"\n  endpoints: [{{address: \"127.0.0.2:{p}\", workload: echo-v1, namespace: shop, labels: {{app: echo, version: v1}}}}]\n",
            p = app.addr.port()
        ),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await;
    let (outbound, outbound_admin) = start_with_stats(
        &format!(
            "version: out\nworkload: {{name: web, namespace: shop, labels: {{app: web}}}}\nservices:\n- hostname: echo.shop.svc.cluster.local\n  ports: [{{port: 50051, name: grpc, cluster: \"outbound|50051||echo.shop.svc.cluster.local\"}}]\nclusters:\n- name: \"outbound|50051||echo.shop.svc.cluster.local\"\n  endpoints: [{{address: \"{peer}\", proxied: true, workload: echo-v1, namespace: shop, labels: {{app: echo, version: v1}}}}]\n",
            peer = inbound.inbound_addrs[0]
        ),
        outbound_on("echo.shop.svc.cluster.local", 50051),
    )
    .await;
    let front = outbound.outbound_addrs[0];
    for (path, status) in [("/test.Echo/Unary", "0"), ("/test.Echo/Fail", "14")] {
        let r = timeout(
            LIMIT,
            grpc_call_with_authority(
                front,
                "echo.shop.svc.cluster.local:50051",
                path,
                vec![bytes::Bytes::from_static(b"ping")],
            ),
        )
        .await
        .expect("in time")
        .expect("call");
        assert_eq!(r.status, 200, "{path}");
        let got = r
            .trailers
            .as_ref()
            .unwrap_or(&r.headers)
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        assert_eq!(got.as_deref(), Some(status), "{path}");
    }
    // UNAVAILABLE is retried by Istio's default policy (twice): the server side saw three
    // attempts of the one call the client made.
    for (admin, reporter, counts) in [
        (outbound_admin, "source", [("0", 1), ("14", 1)]),
        (inbound_admin, "destination", [("0", 1), ("14", 3)]),
    ] {
        let text = scrape(admin).await;
        for (status, n) in counts {
            assert!(
                text.lines().any(|l| l.starts_with("istio_requests_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains("destination_service=\"echo.shop.svc.cluster.local\"")
                    && l.contains(&format!(
                        "request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"{status}\""
                    ))
                    && l.ends_with(&format!(" {n}"))),
                "{reporter}, grpc-status {status}:\n{text}"
            );
        }
    }
}

/// A connection's TCP series: received bytes, sent bytes, closed connections.
type TcpSeen = (Option<f64>, Option<f64>, Option<f64>);

/// The value of a metric's only series (`None` when it has none).
fn only(text: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let v = lines.next()?.rsplit(' ').next()?.parse().ok();
    assert!(lines.next().is_none(), "one series of {name}: {text}");
    v
}

/// A long TCP connection shows its bytes while open (every `tcp_report_every`), and its
/// totals when it closes are exact: nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_tcp_connection_reports_its_bytes_while_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = TcpEchoServer::start().await.expect("echo");
    let yaml = format!(
        "version: t\nworkload: {{name: web, namespace: shop}}\nservices:\n- hostname: db.shop.svc.cluster.local\n  ports: [{{port: 5432, name: tcp, cluster: db}}]\nclusters:\n- name: db\n  endpoints: [{{address: \"{}\", workload: db, namespace: shop}}]\n",
        echo.addr
    );
    let (p, admin) = start_with_stats(
        &yaml,
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "db.shop.svc.cluster.local".into(),
                5432,
            )],
            tcp_report_every: Duration::from_millis(100),
            ..ProxyOptions::default()
        },
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(p.outbound_addrs[0])
        .await
        .expect("connect");
    let mut back = vec![0u8; 1000];
    timeout(LIMIT, async {
        conn.write_all(&[b'x'; 1000]).await?;
        conn.read_exact(&mut back).await
    })
    .await
    .expect("in time")
    .expect("echoed");
    // Open: the bytes show within a few reports; no close yet.
    // (received, sent, closed), once `done` says so or after 5 s.
    let tcp = |done: fn(&TcpSeen) -> bool| async move {
        let mut seen = (None, None, None);
        for _ in 0..100 {
            let text = scrape(admin).await;
            seen = (
                only(&text, "istio_tcp_received_bytes_total"),
                only(&text, "istio_tcp_sent_bytes_total"),
                only(&text, "istio_tcp_connections_closed_total"),
            );
            if done(&seen) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    let seen = tcp(|s| s.0 == Some(1000.0) && s.1 == Some(1000.0)).await;
    assert_eq!(seen, (Some(1000.0), Some(1000.0), None), "while open");
    // 24 more bytes each way, then close: the totals, exactly.
    let mut back = vec![0u8; 24];
    timeout(LIMIT, async {
        conn.write_all(&[b'y'; 24]).await?;
        conn.read_exact(&mut back).await?;
        conn.shutdown().await?;
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await
    })
    .await
    .expect("in time")
    .expect("closed");
    let seen = tcp(|s| s.2 == Some(1.0)).await;
    assert_eq!(seen, (Some(1024.0), Some(1024.0), Some(1.0)), "closed");
}

/// The same for an upgrade: the app's 101 cannot carry the proxy's response flags either
/// (the upgraded connection goes on; the metric says `-`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_response_cannot_set_response_flags() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app_addr = app.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut s, _)) = app.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nx-trellis-response-flags: UF\r\n\r\n")
            .await;
        // The upgraded stream: one echo.
        if let Ok(n) = s.read(&mut buf).await {
            let _ = s.write_all(&buf[..n]).await;
        }
    });
    let (p, admin) = outbound_to(app_addr).await;
    let mut c = tokio::net::TcpStream::connect(p.outbound_addrs[0])
        .await
        .expect("connect");
    let head = timeout(LIMIT, async {
        c.write_all(b"GET /ws HTTP/1.1\r\nhost: app.shop.svc.cluster.local\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n").await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            c.read_exact(&mut byte).await?;
            head.push(byte[0]);
        }
        c.write_all(b"ping").await?;
        let mut echoed = [0u8; 4];
        c.read_exact(&mut echoed).await?;
        assert_eq!(&echoed, b"ping");
        std::io::Result::Ok(String::from_utf8_lossy(&head).to_ascii_lowercase())
    })
    .await
    .expect("in time")
    .expect("upgraded");
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("x-trellis-response-flags"), "{head}");
    drop(c);
    let mut line = None;
    for _ in 0..100 {
        let text = scrape(admin).await;
        line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"101\""))
            .map(str::to_string);
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line = line.expect("the upgrade is counted");
    assert!(line.contains("response_flags=\"-\""), "{line}");
}
