//! Access logs through two proxies (outbound → inbound → app), as the workloads' Telemetry
//! selects them: Istio's JSON lines on the client side, Envoy's text format on the server
//! side with a filter. A request served, one aborted by a fault (FI) and one denied by an
//! AuthorizationPolicy (which the line names).

mod common;
use common::{outbound_on, start_with_stats};

use std::path::Path;
use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::ProxyOptions;
use trellis_testkit::{HttpServer, http_client};

const LIMIT: Duration = Duration::from_secs(20);

/// The lines of `path` once it has `n` of them (bounded wait: lines are written by a
/// thread of their own).
async fn lines(path: &Path, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{} has fewer than {n} lines: {:?}",
        path.display(),
        std::fs::read_to_string(path)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_side_logs_its_requests_in_its_format_with_the_deciding_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client_log = dir.path().join("client.log");
    let server_log = dir.path().join("server.log");
    let app = HttpServer::start().await.expect("app");
    // The server side logs 4xx and 5xx only, in Envoy's text format with Trellis's policy
    // operator at the end.
    let inbound_yaml = format!(
        r#"version: in
workload:
  name: reviews-v1
  namespace: shop
  serviceAccount: reviews
  labels: {{app: reviews, version: v1}}
  inboundPorts: [{{port: {app_port}, name: http}}]
  authorization:
  - name: shop/no-admin
    action: DENY
    rules:
    - to: [{{paths: ["/admin/*"]}}]
  telemetry:
    accessLogging:
    - mode: SERVER
      providers: [text]
      filter: "response.code >= 400"
    providers:
    - name: text
      kind: envoyFileAccessLog
      path: {server_log}
      logFormat: "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %TRELLIS_AUTHORIZATION_POLICY%\n"
"#,
        app_port = app.addr.port(),
        server_log = server_log.display(),
    );
    let (inbound, _) = start_with_stats(
        &inbound_yaml,
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await;
    let peer = inbound.inbound_addrs[0];
    // The client side logs everything as Istio's JSON.
    let outbound_yaml = format!(
        r#"version: out
workload:
  name: web
  namespace: shop
  serviceAccount: web
  labels: {{app: web, version: v2}}
  telemetry:
    accessLogging:
    - mode: CLIENT
      providers: [envoy]
    providers:
    - name: envoy
      kind: envoyJson
      path: {client_log}
services:
- hostname: reviews.shop.svc.cluster.local
  ports:
  - port: 9080
    name: http
    cluster: "outbound|9080||reviews.shop.svc.cluster.local"
    httpRoutes:
    - name: teapot
      match: [{{uri: {{prefix: /teapot}}}}]
      clusters: [{{cluster: "outbound|9080||reviews.shop.svc.cluster.local"}}]
      fault: {{abort: {{httpStatus: 418, percentage: 100}}}}
    - name: default
      clusters: [{{cluster: "outbound|9080||reviews.shop.svc.cluster.local"}}]
clusters:
- name: "outbound|9080||reviews.shop.svc.cluster.local"
  endpoints: [{{address: "{peer}", proxied: true, workload: reviews-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/reviews", labels: {{app: reviews, version: v1}}}}]
"#,
        client_log = client_log.display(),
    );
    let (outbound, _) = start_with_stats(
        &outbound_yaml,
        outbound_on("reviews.shop.svc.cluster.local", 9080),
    )
    .await;
    let front = outbound.outbound_addrs[0];
    let get = |path: &'static str| async move {
        timeout(
            LIMIT,
            http_client::get(front, "reviews.shop.svc.cluster.local:9080", path),
        )
        .await
        .expect("in time")
        .expect("response")
    };
    assert_eq!(get("/bytes/100").await.status, 200);
    assert_eq!(get("/teapot").await.status, 418);
    assert_eq!(get("/admin/users").await.status, 403);

    let client = lines(&client_log, 3).await;
    let json: Vec<serde_json::Value> = client
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let ok = &json[0];
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/bytes/100");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["response_code"], 200);
    assert_eq!(ok["response_flags"], "-");
    assert_eq!(ok["bytes_sent"], 100, "counted to the last byte");
    assert_eq!(ok["upstream_host"], peer.to_string());
    assert_eq!(
        ok["upstream_cluster"],
        "outbound|9080||reviews.shop.svc.cluster.local"
    );
    assert_eq!(ok["route_name"], "default");
    assert_eq!(ok["authority"], "reviews.shop.svc.cluster.local:9080");
    assert_eq!(ok["source_workload"], "web");
    assert_eq!(
        ok["source_principal"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(ok["destination_workload"], "reviews-v1");
    assert_eq!(
        ok["destination_principal"],
        "spiffe://cluster.local/ns/shop/sa/reviews"
    );
    assert!(
        ok["request_id"].as_str().is_some_and(|id| !id.is_empty()),
        "{ok}"
    );
    assert!(
        ok["start_time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{ok}"
    );
    let fault = &json[1];
    assert_eq!(fault["response_code"], 418);
    assert_eq!(fault["response_flags"], "FI");
    assert_eq!(fault["route_name"], "teapot");
    assert_eq!(fault["upstream_host"], serde_json::Value::Null);
    let denied = &json[2];
    assert_eq!(denied["response_code"], 403);
    assert_eq!(denied["path"], "/admin/users");
    assert_eq!(denied["destination_workload"], "reviews-v1");

    // A client that gives up before the answer (an HTTP/2 stream reset while the app is
    // slow) is logged at once, as Envoy does: code 0, flag DC.
    let sock = tokio::net::TcpStream::connect(front)
        .await
        .expect("connect");
    let (h2, conn) = h2::client::handshake(sock).await.expect("h2c");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.expect("ready");
    let req = http::Request::builder()
        .uri("http://reviews.shop.svc.cluster.local:9080/slow/3000")
        .body(())
        .expect("request");
    let (resp, _) = h2.send_request(req, true).expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(resp);
    drop(h2);
    let client = lines(&client_log, 4).await;
    let gone: serde_json::Value = serde_json::from_str(&client[3]).expect("a JSON line");
    assert_eq!(gone["path"], "/slow/3000");
    assert_eq!(gone["response_code"], 0);
    assert_eq!(gone["response_flags"], "DC");
    assert_eq!(gone["protocol"], "HTTP/2");

    // The server side: only the denied request passes its filter; the line names the
    // policy that decided.
    let server = lines(&server_log, 1).await;
    // (Envoy has no response flag for RBAC denials: `-`, as in Istio's metrics.)
    assert_eq!(server, ["GET /admin/users 403 - shop/no-admin"]);
    // Nothing more arrives later (the 200 was filtered out, not late; the abandoned
    // request's inbound side ended as the client's did).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = lines(&server_log, 1).await;
    assert!(
        server[1..]
            .iter()
            .all(|l| l.starts_with("GET /slow/3000 0 DC")),
        "{server:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_is_one_line_with_its_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("tcp.log");
    let echo = trellis_testkit::TcpEchoServer::start().await.expect("echo");
    let yaml = format!(
        r#"version: out
workload:
  name: web
  namespace: shop
  telemetry:
    accessLogging: [{{providers: [json]}}]
    providers: [{{name: json, kind: envoyJson, path: {log}}}]
services:
- hostname: db.shop.svc.cluster.local
  ports: [{{port: 5432, name: tcp, cluster: db}}]
clusters:
- name: db
  endpoints: [{{address: "{echo}", workload: db-v1, namespace: shop}}]
"#,
        log = log.display(),
        echo = echo.addr,
    );
    let (outbound, _) =
        start_with_stats(&yaml, outbound_on("db.shop.svc.cluster.local", 5432)).await;
    let got = timeout(
        LIMIT,
        trellis_testkit::tcp_echo_half_close(outbound.outbound_addrs[0], b"hello tcp"),
    )
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(got, b"hello tcp");
    let line: serde_json::Value =
        serde_json::from_str(&lines(&log, 1).await[0]).expect("a JSON line");
    assert_eq!(line["bytes_received"], 9);
    assert_eq!(line["bytes_sent"], 9);
    assert_eq!(line["response_code"], 0);
    assert_eq!(line["protocol"], serde_json::Value::Null);
    assert_eq!(line["method"], serde_json::Value::Null);
    assert_eq!(line["upstream_host"], echo.addr.to_string());
    assert_eq!(line["upstream_cluster"], "db");
    assert_eq!(line["destination_workload"], "db-v1");
}

/// A gateway's TCP port: the connection is logged as one line and counted in the
/// source-side TCP metrics, as a sidecar's outbound connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_through_a_gateway_is_logged_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("gw.log");
    let echo = trellis_testkit::TcpEchoServer::start().await.expect("echo");
    let yaml = format!(
        r#"version: gw
workload:
  name: ingress
  namespace: edge
  telemetry:
    accessLogging: [{{providers: [json]}}]
    providers: [{{name: json, kind: envoyJson, path: {log}}}]
clusters:
- name: "outbound|9000||echo.shop.svc.cluster.local"
  endpoints: [{{address: "{echo}", workload: echo-v1, namespace: shop}}]
gatewayPorts:
- port: 9000
  servers:
  - gateway: edge/gw
    protocol: TCP
    hosts: ["*"]
    virtualHosts:
    - name: edge/tcp
      domains: ["*"]
      tcpRoutes: [{{name: echo, clusters: [{{cluster: "outbound|9000||echo.shop.svc.cluster.local"}}]}}]
"#,
        log = log.display(),
        echo = echo.addr,
    );
    let (gw, stats) = start_with_stats(
        &yaml,
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 9000)],
            ..ProxyOptions::default()
        },
    )
    .await;
    let got = timeout(
        LIMIT,
        trellis_testkit::tcp_echo_half_close(gw.inbound_addrs[0], b"through the gate"),
    )
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(got, b"through the gate");
    let line: serde_json::Value =
        serde_json::from_str(&lines(&log, 1).await[0]).expect("a JSON line");
    assert_eq!(line["bytes_received"], 16);
    assert_eq!(line["bytes_sent"], 16);
    assert_eq!(line["upstream_host"], echo.addr.to_string());
    assert_eq!(
        line["upstream_cluster"],
        "outbound|9000||echo.shop.svc.cluster.local"
    );
    assert_eq!(line["destination_workload"], "echo-v1");
    let mut closed = None;
    for _ in 0..100 {
        let text = trellis_testkit::http_client::get(stats, "localhost", "/stats/prometheus")
            .await
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default();
        let series = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l.contains("source_workload=\"ingress\""))
                .map(str::to_string)
        };
        closed = series("istio_tcp_connections_closed_total{");
        if let Some(c) = &closed {
            assert!(c.ends_with("} 1"), "{c}");
            assert!(c.contains("reporter=\"source\""), "{c}");
            assert!(c.contains("destination_workload=\"echo-v1\""), "{c}");
            let received = series("istio_tcp_received_bytes_total{").expect("received");
            assert!(received.ends_with("} 16"), "{received}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed.is_some(), "no TCP series from the gateway");
}

/// A certificate for spiffe://cluster.local/ns/`ns`/sa/`sa` from `ca`, as a proxy holds it.
fn certified(
    ca: &trellis_identity::Ca,
    tokens: &trellis_identity::Tokens,
    ns: &str,
    sa: &str,
) -> trellis_identity::tls::Certified {
    let (chain, key) = common::workload_certificate(ca, tokens, ns, sa);
    trellis_identity::tls::Certified::from_pem(&chain, key).expect("certified")
}

/// A gateway's TCP route to an endpoint that has a sidecar: the connection goes over mesh
/// mutual TLS with the gateway's identity. The sidecar is STRICT, so a plaintext
/// connection would be refused; its metrics name the gateway as the mTLS source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_tcp_route_reaches_a_sidecar_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = trellis_identity::Ca::load_or_create(dir.path(), "cluster.local").expect("ca");
    let tokens = trellis_identity::Tokens::load_or_create(dir.path()).expect("tokens");
    let roots = serde_json::to_string(ca.root_pem()).expect("json");
    let echo = trellis_testkit::TcpEchoServer::start().await.expect("echo");

    let sidecar_yaml = format!(
        r#"version: db
workload:
  name: db-v1
  namespace: shop
  serviceAccount: db
  inboundPorts: [{{port: {port}, name: tcp-db}}]
  mtls: STRICT
trustRoots: [{roots}]
"#,
        port = echo.addr.port(),
    );
    let (sidecar, sidecar_stats) = start_with_stats(
        &sidecar_yaml,
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), echo.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await;
    sidecar
        .shared
        .credentials
        .set(certified(&ca, &tokens, "shop", "db"));
    let gateway_yaml = format!(
        r#"version: gw
workload:
  name: ingress
  namespace: edge
  serviceAccount: ingress
trustRoots: [{roots}]
clusters:
- name: "outbound|5432||db.shop.svc.cluster.local"
  endpoints: [{{address: "{sidecar}", proxied: true, workload: db-v1, namespace: shop, identity: "spiffe://cluster.local/ns/shop/sa/db"}}]
gatewayPorts:
- port: 5432
  servers:
  - gateway: edge/gw
    protocol: TCP
    hosts: ["*"]
    virtualHosts:
    - name: edge/db
      domains: ["*"]
      tcpRoutes: [{{name: db, clusters: [{{cluster: "outbound|5432||db.shop.svc.cluster.local"}}]}}]
"#,
        sidecar = sidecar.inbound_addrs[0],
    );
    let (gw, _) = start_with_stats(
        &gateway_yaml,
        ProxyOptions {
            gateway_listen: vec![("127.0.0.1:0".parse().expect("addr"), 5432)],
            ..ProxyOptions::default()
        },
    )
    .await;
    gw.shared
        .credentials
        .set(certified(&ca, &tokens, "edge", "ingress"));

    let got = timeout(
        LIMIT,
        trellis_testkit::tcp_echo_half_close(gw.inbound_addrs[0], b"to the database"),
    )
    .await
    .expect("in time")
    .expect("echo through the gateway and the sidecar");
    assert_eq!(got, b"to the database");
    // The sidecar saw the gateway's identity over mutual TLS.
    let mut opened = None;
    for _ in 0..100 {
        let text = http_client::get(sidecar_stats, "localhost", "/stats/prometheus")
            .await
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default();
        opened = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .map(str::to_string);
        if opened.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = opened.expect("the sidecar counts the connection");
    assert!(opened.contains("reporter=\"destination\""), "{opened}");
    assert!(
        opened.contains("connection_security_policy=\"mutual_tls\""),
        "{opened}"
    );
    assert!(
        opened.contains("source_principal=\"spiffe://cluster.local/ns/edge/sa/ingress\""),
        "{opened}"
    );
    // A client without a certificate is refused by the STRICT sidecar.
    let plain = timeout(
        LIMIT,
        trellis_testkit::tcp_echo_half_close(sidecar.inbound_addrs[0], b"plaintext"),
    )
    .await
    .expect("in time");
    assert!(
        plain.as_ref().map_or(true, |b| b.is_empty()),
        "a plaintext client got {plain:?}"
    );
}
