//! HTTP routes in the snapshot, through the proxy with real sockets: header-based routing
//! and a weighted split (Bookinfo's reviews rules), no-match, and a route to a cluster the
//! snapshot lacks.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot::Snapshot;

fn config(yaml: &str) -> Result<Config, String> {
    let raw = Snapshot::from_text(yaml, "routes.yaml").map_err(|e| e.to_string())?;
    Config::from_wire(raw, None).map_err(|e| e.to_string())
}

async fn proxy(v1: SocketAddr, v2: SocketAddr, v3: SocketAddr) -> ProxyHandle {
    let yaml = format!(
        r#"version: routes-1
services:
- hostname: reviews.default.svc.cluster.local
  ports:
  - port: 9080
    name: http
    cluster: v1
    httpRoutes:
    - name: jason
      match: [{{headers: {{end-user: {{exact: jason}}}}}}]
      clusters: [{{cluster: v2}}]
    - name: api-only
      match: [{{uri: {{prefix: /reviews}}}}, {{uri: {{exact: /health}}}}]
      clusters: [{{cluster: v1, weight: 50}}, {{cluster: v3, weight: 50}}]
    - name: to-nowhere
      match: [{{uri: {{prefix: /gone}}}}]
      clusters: [{{cluster: v4}}]
clusters:
- {{name: v1, endpoints: [{{address: "{v1}"}}]}}
- {{name: v2, endpoints: [{{address: "{v2}"}}]}}
- {{name: v3, endpoints: [{{address: "{v3}"}}]}}
"#
    );
    trellis_proxy::start(
        config(&yaml).expect("snapshot"),
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "reviews".to_string(),
                9080,
            )],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

/// Starts a proxy on `config` with one outbound listener for the `app` service, port 80.
async fn serve_app(config: Config) -> ProxyHandle {
    trellis_proxy::start(
        config,
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "app".to_string(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

#[tokio::test]
async fn jason_goes_to_v2_and_the_rest_split_50_50() {
    let (v1, v2, v3) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
        HttpServer::start().await.expect("v3"),
    );
    let p = proxy(v1.addr, v2.addr, v3.addr).await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    for _ in 0..20 {
        let req = c
            .request(http::Method::GET, "reviews", "/reviews/1")
            .header("end-user", "jason")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let r = timeout(Duration::from_secs(10), c.send(req))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(
            r.status, 404,
            "fixture says 404 for /reviews/1: the request arrived"
        );
    }
    assert_eq!(v2.stats().requests(), 20);
    // Bounded: 2,000 requests on one keep-alive connection.
    for i in 0..2000 {
        let r = timeout(Duration::from_secs(10), c.get("reviews", "/reviews/2"))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(r.status, 404, "request {i}");
    }
    let (n1, n3) = (v1.stats().requests(), v3.stats().requests());
    assert_eq!(n1 + n3, 2000);
    assert!(
        (900..=1100).contains(&n1),
        "v1 got {n1}, v3 got {n3}: not within 45-55 %"
    );
    assert_eq!(v2.stats().requests(), 20, "only jason reached v2");

    // Each rule's requests, by its name, in the proxy's metrics; a snapshot swap that
    // keeps the rule keeps its count.
    let metric = |p: &ProxyHandle, route: &str| {
        let text = p.shared.stats.render(&p.config(), None);
        let key = format!(
            "trellis_proxy_route_requests_total{{host=\"reviews.default.svc.cluster.local\",port=\"9080\",route=\"{route}\"}} "
        );
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.parse::<u64>().ok())
    };
    assert_eq!(metric(&p, "jason"), Some(20));
    assert_eq!(metric(&p, "api-only"), Some(2000));
    p.update(Config::from_wire(p.config().raw(), Some(&p.config())).expect("converts"));
    assert_eq!(metric(&p, "jason"), Some(20), "kept across the swap");
}

#[tokio::test]
async fn no_matching_route_is_404_nr_and_a_missing_cluster_is_503_nr() {
    let (v1, v2, v3) = (
        HttpServer::start().await.expect("v1"),
        HttpServer::start().await.expect("v2"),
        HttpServer::start().await.expect("v3"),
    );
    let p = proxy(v1.addr, v2.addr, v3.addr).await;
    let r = http_client::get(p.outbound_addrs[0], "reviews", "/other")
        .await
        .expect("response");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-trellis-response-flags"), Some("NR"));
    let r = http_client::get(p.outbound_addrs[0], "reviews", "/gone/1")
        .await
        .expect("response");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-response-flags"), Some("NR"));
    assert!(
        String::from_utf8_lossy(&r.body).contains("route \"to-nowhere\" has no cluster \"v4\"")
    );
    let r = http_client::get(p.outbound_addrs[0], "reviews", "/health")
        .await
        .expect("response");
    assert_eq!(
        r.status, 404,
        "the fixture answered: matched the second entry of api-only"
    );
    assert_eq!(v1.stats().requests() + v3.stats().requests(), 1);
}

#[test]
fn a_bad_route_regex_refuses_the_snapshot() {
    let e = config(
        "services:\n- hostname: a.default.svc.cluster.local\n  ports:\n  - port: 80\n    cluster: c\n    httpRoutes: [{name: r, match: [{uri: {regex: \"(\"}}], clusters: [{cluster: c}]}]\nclusters: [{name: c}]\n",
    )
    .expect_err("bad regex");
    assert!(
        e.starts_with("services[0] \"a.default.svc.cluster.local\": port 80 httpRoutes[0].match[0].uri.regex: invalid regex \"(\""),
        "{e}"
    );
}

/// A proxy for `app:80` whose one route has the given extra YAML (timeout, fault).
async fn faulty(app: SocketAddr, extra: &str) -> ProxyHandle {
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes:
    - name: faulty
      clusters: [{{cluster: app}}]
{extra}
clusters:
- {{name: app, endpoints: [{{address: \"{app}\"}}]}}
"
    );
    serve_app(config(&yaml).expect("snapshot")).await
}

#[tokio::test]
async fn a_2s_delay_under_a_1s_timeout_is_a_504_after_about_1s() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(
        app.addr,
        "      timeout: 1s\n      fault: {delay: {fixedDelay: 2s, percentage: 100}}",
    )
    .await;
    let start = std::time::Instant::now();
    let r = timeout(
        Duration::from_secs(10),
        http_client::get(p.outbound_addrs[0], "app", "/echo"),
    )
    .await
    .expect("in time")
    .expect("response");
    let took = start.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-trellis-response-flags"), Some("UT"));
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(1800),
        "{took:?}"
    );
    assert_eq!(app.stats().requests(), 0);
}

#[tokio::test]
async fn a_short_delay_slows_the_request_and_it_still_succeeds() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(app.addr, "      fault: {delay: {fixedDelay: 200ms}}").await;
    let start = std::time::Instant::now();
    let r = http_client::get(p.outbound_addrs[0], "app", "/echo")
        .await
        .expect("response");
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn aborts_at_a_percentage() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(
        app.addr,
        "      fault: {abort: {httpStatus: 418, percentage: 50}}",
    )
    .await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let mut aborted = 0;
    // Bounded: 1,000 requests.
    for _ in 0..1000 {
        let r = c.get("app", "/echo").await.expect("response");
        if r.status == 418 {
            assert_eq!(r.header("x-trellis-response-flags"), Some("FI"));
            aborted += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    assert!((400..=600).contains(&aborted), "{aborted} of 1000 aborted");
    assert_eq!(app.stats().requests(), 1000 - aborted);
}

#[tokio::test]
async fn grpc_aborts_answer_with_a_grpc_status() {
    let app = trellis_testkit::GrpcServer::start()
        .await
        .expect("grpc app");
    let p = faulty(app.addr, "      fault: {abort: {grpcStatus: UNAVAILABLE}}").await;
    let r = trellis_testkit::grpc_call_with_authority(
        p.outbound_addrs[0],
        "app",
        "/test.Echo/Unary",
        vec![bytes::Bytes::from_static(b"x")],
    )
    .await
    .expect("call");
    assert_eq!(r.grpc_status.as_deref(), Some("14"));
    assert_eq!(r.grpc_message.as_deref(), Some("fault filter abort"));
}

#[test]
fn bad_faults_refuse_the_snapshot() {
    let base = "services:\n- hostname: a.default.svc.cluster.local\n  ports:\n  - port: 80\n    cluster: c\n    httpRoutes: [{name: r, clusters: [{cluster: c}], fault: FAULT}]\nclusters: [{name: c}]\n";
    for (fault, want) in [
        (
            "{abort: {httpStatus: 99}}",
            "fault.abort.httpStatus: 99 must be in 200..599",
        ),
        (
            "{abort: {grpcStatus: NOPE}}",
            "fault.abort.grpcStatus: \"NOPE\" is not a gRPC status",
        ),
        (
            "{abort: {percentage: 5}}",
            "fault.abort: exactly one of httpStatus or grpcStatus",
        ),
        (
            "{delay: {percentage: 5}}",
            "fault.delay: fixedDelay is required",
        ),
        (
            "{delay: {fixedDelay: 1s, percentage: 150}}",
            "fault.delay.percentage: percentage 150 must be in 0..100",
        ),
    ] {
        let e = config(&base.replace("FAULT", fault)).expect_err(fault);
        assert!(e.ends_with(want), "{fault}: {e}");
    }
}

/// A proxy for `app:80` with the given routes YAML (indented for `httpRoutes:`).
async fn routed(app: SocketAddr, routes: &str) -> ProxyHandle {
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes:
{routes}
clusters:
- {{name: app, endpoints: [{{address: \"{app}\"}}]}}
"
    );
    serve_app(config(&yaml).expect("snapshot")).await
}

#[tokio::test]
async fn direct_responses_redirects_rewrites_and_headers() {
    let app = HttpServer::start().await.expect("app");
    let p = routed(
        app.addr,
        r#"    - name: maintenance
      match: [{uri: {exact: /maintenance}}]
      directResponse: {status: 503, body: "back soon"}
    - name: moved
      match: [{uri: {prefix: /old}}]
      redirect: {uri: /new, authority: new.example.com, scheme: https, redirectCode: 308}
    - name: versioned
      match: [{uri: {prefix: /v1/echo}}]
      rewrite: {uri: /echo, authority: internal.app}
      requestHeaders: {set: {x-route: versioned}, remove: [x-secret]}
      responseHeaders: {add: {x-served-by: trellis}, remove: [x-echo-method]}
      clusters: [{cluster: app}]"#,
    )
    .await;
    let addr = p.outbound_addrs[0];

    let r = http_client::get(addr, "app", "/maintenance")
        .await
        .expect("response");
    assert_eq!((r.status.as_u16(), &r.body[..]), (503, &b"back soon"[..]));
    assert_eq!(
        r.header("x-trellis-response-flags"),
        None,
        "a configured answer, not an error"
    );

    let r = http_client::get(addr, "app", "/old/page")
        .await
        .expect("response");
    assert_eq!(r.status, 308);
    assert_eq!(r.header("location"), Some("https://new.example.com/new"));

    let mut c = http_client::HttpClient::http1(addr).await.expect("connect");
    let req = c
        .request(http::Method::GET, "app", "/v1/echo?id=7")
        .header("x-secret", "s3cret")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let r = c.send(req).await.expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.header("x-echo-path"),
        Some("/echo?id=7"),
        "the matched prefix is replaced"
    );
    assert_eq!(r.header("x-echo-h-host"), Some("internal.app"));
    assert_eq!(r.header("x-echo-h-x-route"), Some("versioned"));
    assert_eq!(r.header("x-echo-h-x-secret"), None);
    assert_eq!(r.header("x-served-by"), Some("trellis"));
    assert_eq!(r.header("x-echo-method"), None, "removed from the response");
    assert_eq!(app.stats().requests(), 1);
}

#[tokio::test]
async fn regex_rewrites_use_capture_groups() {
    let app = HttpServer::start().await.expect("app");
    let p = routed(
        app.addr,
        r#"    - match: [{uri: {prefix: /items/}}]
      rewrite: {uriRegex: "^/items/([0-9]+)$", uriRegexReplacement: "/bytes/$1"}
      clusters: [{cluster: app}]"#,
    )
    .await;
    let r = http_client::get(p.outbound_addrs[0], "app", "/items/42?x=1")
        .await
        .expect("response");
    assert_eq!(r.status, 200, "rewritten to the fixture's /bytes/42");
    assert_eq!(r.body.len(), 42);
}

/// An HTTP/1.1 app that answers 503 to the first `fail` requests and then echoes the
/// request body with the attempt-count header; counts requests.
async fn flaky(fail: usize) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let c = std::sync::Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let c = std::sync::Arc::clone(&c);
            tokio::spawn(async move {
                // Requests on this connection, at most 100.
                for _ in 0..100 {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[head_end..head_end + len].to_vec();
                    let attempt = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-envoy-attempt-count:"))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_else(|| "1".into());
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    let resp = if n < fail {
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                            .to_string()
                            .into_bytes()
                    } else {
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\nx-attempt: {attempt}\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    };
                    if s.write_all(&resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn istio_default_retries_a_503_and_resends_the_body() {
    let (app, count) = flaky(1).await;
    let p = faulty(app, "").await; // a route without its own retry policy
    let r = http_client::post(
        p.outbound_addrs[0],
        "app",
        "/orders",
        bytes::Bytes::from_static(b"order #1"),
    )
    .await
    .expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "order #1", "the buffered body went out again");
    assert_eq!(r.header("x-attempt"), Some("2"));
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_endpoint() {
    let app = HttpServer::start().await.expect("app");
    let refused = trellis_testkit::RefusedPort::new().expect("a refusing port");
    let dead = refused.addr;
    let yaml = |retries: &str| {
        format!(
            "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes: [{{name: r, clusters: [{{cluster: app}}]{retries}}}]
clusters:
- {{name: app, endpoints: [{{address: \"{dead}\"}}, {{address: \"{}\"}}]}}
",
            app.addr
        )
    };
    let start = |y: String| async move {
        trellis_proxy::start(
            config(&y).expect("snapshot"),
            ProxyOptions {
                outbound_listen: vec![(
                    "127.0.0.1:0".parse().expect("addr"),
                    "app".to_string(),
                    80,
                )],
                ..ProxyOptions::default()
            },
        )
        .await
        .expect("proxy")
    };
    let p = start(yaml("")).await;
    for _ in 0..20 {
        let r = http_client::get(p.outbound_addrs[0], "app", "/echo")
            .await
            .expect("response");
        assert_eq!(r.status, 200, "the dead endpoint is skipped by a retry");
    }
    let p = start(yaml(", retries: {attempts: 0}")).await;
    let mut failed = 0;
    for _ in 0..20 {
        let r = http_client::get(p.outbound_addrs[0], "app", "/echo")
            .await
            .expect("response");
        if r.status == 503 {
            assert_eq!(r.header("x-trellis-response-flags"), Some("UF"));
            failed += 1;
        }
    }
    assert_eq!(
        failed, 10,
        "round robin, no retries: every other request fails"
    );
}

#[tokio::test]
async fn per_try_timeouts_and_conditions_outside_the_policy() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(
        app.addr,
        "      retries: {attempts: 2, perTryTimeout: 100ms, retryOn: \"5xx\", backoff: 1ms}",
    )
    .await;
    let start = std::time::Instant::now();
    let r = http_client::get(p.outbound_addrs[0], "app", "/slow/400")
        .await
        .expect("response");
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-trellis-response-flags"), Some("UT"));
    assert!(
        start.elapsed() < Duration::from_millis(1200),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(app.stats().requests(), 3, "three tries of 100 ms");

    // A 500 is not in Istio's default policy: one try only.
    let app = HttpServer::start().await.expect("app");
    let p = faulty(app.addr, "").await;
    let r = http_client::get(p.outbound_addrs[0], "app", "/status/500")
        .await
        .expect("response");
    assert_eq!(r.status, 500);
    assert_eq!(app.stats().requests(), 1);
}

#[test]
fn unknown_retry_conditions_refuse_the_snapshot() {
    let e = config(
        "services:\n- hostname: a.default.svc.cluster.local\n  ports:\n  - port: 80\n    cluster: c\n    httpRoutes: [{name: r, clusters: [{cluster: c}], retries: {attempts: 1, retryOn: \"5xx,sometimes\"}}]\nclusters: [{name: c}]\n",
    )
    .expect_err("bad retryOn");
    assert!(
        e.ends_with("retries.retryOn: \"sometimes\" is not a retryOn condition"),
        "{e}"
    );
}

/// A slow app that records the Host header of every request and answers after `delay`.
async fn slow_recorder(
    delay: Duration,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = std::sync::Arc::clone(&s2);
            tokio::spawn(async move {
                for _ in 0..1000 {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(h) = head.lines().find_map(|l| l.strip_prefix("host:")) {
                        if let Ok(mut v) = seen.lock() {
                            v.push(h.trim().to_string());
                        }
                    }
                    tokio::time::sleep(delay).await;
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn mirrored(app: SocketAddr, mirror: SocketAddr, percentage: &str) -> ProxyHandle {
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes: [{{name: r, clusters: [{{cluster: app}}], mirrors: [{{cluster: mirror{percentage}}}]}}]
clusters:
- {{name: app, endpoints: [{{address: \"{app}\"}}]}}
- {{name: mirror, endpoints: [{{address: \"{mirror}\"}}]}}
"
    );
    serve_app(config(&yaml).expect("snapshot")).await
}

#[tokio::test]
async fn mirrors_get_a_shadow_copy_without_slowing_the_request() {
    let app = HttpServer::start().await.expect("app");
    let (mirror, seen) = slow_recorder(Duration::from_millis(800)).await;
    let p = mirrored(app.addr, mirror, "").await;
    let start = std::time::Instant::now();
    let r = http_client::get(p.outbound_addrs[0], "app:80", "/echo")
        .await
        .expect("response");
    assert_eq!(r.status, 200);
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "the primary waited for the mirror: {:?}",
        start.elapsed()
    );
    // The copy arrives (bounded wait: 50 × 50 ms).
    for _ in 0..50 {
        if seen.lock().map(|v| !v.is_empty()).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.lock().expect("lock").clone(),
        vec!["app-shadow:80".to_string()]
    );
}

#[tokio::test]
async fn mirroring_honours_the_percentage() {
    let app = HttpServer::start().await.expect("app");
    let (mirror, seen) = slow_recorder(Duration::ZERO).await;
    let p = mirrored(app.addr, mirror, ", percentage: 50").await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    for _ in 0..400 {
        assert_eq!(c.get("app", "/echo").await.expect("response").status, 200);
    }
    // Let the last copies land (bounded: 40 × 25 ms).
    let mut last = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let n = seen.lock().map(|v| v.len()).unwrap_or(0);
        if n == last && n > 0 {
            break;
        }
        last = n;
    }
    let n = seen.lock().map(|v| v.len()).unwrap_or(0);
    assert!((150..=250).contains(&n), "{n} of 400 mirrored");
    assert_eq!(app.stats().requests(), 400);
}

#[tokio::test]
async fn a_route_rate_limit_applies_to_that_route() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(
        app.addr,
        "      rateLimit: {maxTokens: 2, tokensPerFill: 1, fillInterval: 10s}",
    )
    .await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                c.get("app", "/echo")
                    .await
                    .expect("response")
                    .status
                    .as_u16(),
            );
        }
        v
    };
    assert_eq!(codes, [200, 200, 429, 429]);
    assert_eq!(app.stats().requests(), 2);
}

#[tokio::test]
async fn cors_preflights_and_responses() {
    let app = HttpServer::start().await.expect("app");
    let p = faulty(
        app.addr,
        "      cors: {allowOrigins: [{exact: \"https://shop.example\"}, {regex: \"https://.*\\\\.trusted\\\\.example\"}], allowMethods: [GET, POST], allowHeaders: [x-token], exposeHeaders: [x-echo-method], maxAge: 24h, allowCredentials: true}",
    )
    .await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let preflight = |origin: &'static str| {
        http::Request::builder()
            .method(http::Method::OPTIONS)
            .uri("/echo")
            .header("host", "app")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request")
    };
    let req = preflight("https://shop.example");
    let r = c.send(req).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(r.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(r.header("access-control-allow-headers"), Some("x-token"));
    assert_eq!(r.header("access-control-max-age"), Some("86400"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(app.stats().requests(), 0, "answered by the proxy");

    // A preflight from an origin that is not allowed goes to the app untouched.
    let req = preflight("https://evil.example");
    let r = c.send(req).await.expect("response");
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert_eq!(app.stats().requests(), 1);

    let req = c
        .request(http::Method::GET, "app", "/echo")
        .header("origin", "https://a.trusted.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let r = c.send(req).await.expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://a.trusted.example")
    );
    assert_eq!(
        r.header("access-control-expose-headers"),
        Some("x-echo-method")
    );
}

#[tokio::test]
async fn each_destination_applies_its_own_headers() {
    let (a, b) = (
        HttpServer::start().await.expect("a"),
        HttpServer::start().await.expect("b"),
    );
    let yaml = format!(
        r#"services:
- hostname: reviews.default.svc.cluster.local
  ports:
  - port: 9080
    name: http
    cluster: a
    httpRoutes:
    - name: split
      requestHeaders: {{set: {{x-route: split}}}}
      clusters:
      - {{cluster: a, weight: 50, requestHeaders: {{set: {{x-dest: a}}}}, responseHeaders: {{set: {{x-served: a}}}}}}
      - {{cluster: b, weight: 50, requestHeaders: {{set: {{x-dest: b}}}}, responseHeaders: {{set: {{x-served: b}}}}}}
clusters:
- {{name: a, endpoints: [{{address: "{}"}}]}}
- {{name: b, endpoints: [{{address: "{}"}}]}}
"#,
        a.addr, b.addr
    );
    let p = trellis_proxy::start(
        config(&yaml).expect("snapshot"),
        ProxyOptions {
            outbound_listen: vec![(
                "127.0.0.1:0".parse().expect("addr"),
                "reviews".to_string(),
                9080,
            )],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..100 {
        let r = c.get("reviews:9080", "/echo").await.expect("response");
        let served = r
            .header("x-served")
            .expect("destination response header")
            .to_string();
        assert_eq!(
            r.header("x-echo-h-x-dest"),
            Some(served.as_str()),
            "the request carried its own destination's headers"
        );
        assert_eq!(
            r.header("x-echo-h-x-route"),
            Some("split"),
            "and the route's"
        );
        *seen.entry(served).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen.get("a").copied().unwrap_or(0),
        a.stats().requests() as i32
    );
}
