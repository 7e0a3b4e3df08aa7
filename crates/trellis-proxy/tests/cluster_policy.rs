//! DestinationRule-derived cluster policies through the proxy: connection-pool limits
//! (503 UO), outlier detection (ejection and return), load balancers.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot::Snapshot;

/// A proxy for `app:80` whose cluster has `endpoints` and the given policy YAML (the
/// route has no retries, so every try is visible).
async fn proxy(endpoints: &[SocketAddr], policy: &str) -> ProxyHandle {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{address: \"{e}\"}}"))
        .collect();
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes: [{{name: r, clusters: [{{cluster: app}}], retries: {{attempts: 0}}}}]
clusters:
- name: app
  endpoints: [{}]
{policy}
",
        eps.join(", ")
    );
    let raw = Snapshot::from_text(&yaml, "policy.yaml").expect("snapshot");
    serve_app(Config::from_wire(raw, None).expect("converts")).await
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
async fn the_third_concurrent_request_overflows_with_503_uo() {
    let app = HttpServer::start().await.expect("app");
    let p = proxy(
        &[app.addr],
        "  circuitBreakers: {maxConnections: 1, maxPendingRequests: 1}",
    )
    .await;
    let addr = p.outbound_addrs[0];
    let slow = || tokio::spawn(async move { http_client::get(addr, "app", "/slow/600").await });
    let first = slow();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = slow(); // waits for the connection
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = std::time::Instant::now();
    let third = http_client::get(addr, "app", "/slow/600")
        .await
        .expect("response");
    assert_eq!(third.status, 503);
    assert_eq!(third.header("x-trellis-response-flags"), Some("UO"));
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "overflow answers at once: {:?}",
        start.elapsed()
    );
    for t in [first, second] {
        let r = timeout(Duration::from_secs(10), t)
            .await
            .expect("in time")
            .expect("task")
            .expect("response");
        assert_eq!(r.status, 200, "queued requests are served");
    }
    assert_eq!(app.stats().requests(), 2);
}

/// An HTTP/1.1 app that answers every request with `status`.
async fn answering(status: u16) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for _ in 0..10_000 {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..i + 4);
                    }
                    let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn consecutive_5xx_eject_an_endpoint_and_it_comes_back() {
    let good = HttpServer::start().await.expect("good");
    let bad = answering(500).await;
    let p = proxy(
        &[good.addr, bad],
        "  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 500ms, maxEjectionPercent: 50}",
    )
    .await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            c.get("app", "/bytes/1")
                .await
                .expect("response")
                .status
                .as_u16(),
        );
    }
    // Round robin: 500s until the third, then only the good endpoint.
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        3,
        "{statuses:?}"
    );
    assert!(statuses[6..].iter().all(|s| *s == 200), "{statuses:?}");
    // After the ejection time the endpoint is tried again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut again = 0;
    for _ in 0..4 {
        if c.get("app", "/bytes/1").await.expect("response").status == 500 {
            again += 1;
        }
    }
    assert!(again >= 1, "the ejected endpoint came back");
}

#[tokio::test]
async fn least_request_prefers_the_idle_endpoint() {
    let a = HttpServer::start().await.expect("a");
    let b = HttpServer::start().await.expect("b");
    let p = proxy(&[a.addr, b.addr], "  loadBalancer: LEAST_REQUEST").await;
    let addr = p.outbound_addrs[0];
    // Keep one request busy on whichever endpoint it lands, then count where quick
    // requests go: mostly to the other one.
    let busy = tokio::spawn(async move { http_client::get(addr, "app", "/slow/800").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (before_a, before_b) = (a.stats().requests(), b.stats().requests());
    let busy_is_a = before_a == 1;
    for _ in 0..40 {
        assert_eq!(
            http_client::get(addr, "app", "/bytes/1")
                .await
                .expect("response")
                .status,
            200
        );
    }
    let to_busy = if busy_is_a {
        a.stats().requests() - before_a
    } else {
        b.stats().requests() - before_b
    };
    assert!(to_busy <= 2, "{to_busy} of 40 went to the busy endpoint");
    let _ = timeout(Duration::from_secs(10), busy).await;
}

#[tokio::test]
async fn inbound_rate_limit_answers_429_rl_and_refills() {
    let app = HttpServer::start().await.expect("app");
    let port = app.addr.port();
    let raw = Snapshot::from_text(
        &format!(
            "workload:\n  name: app\n  inboundPorts:\n  - {{port: {port}, name: http, rateLimit: {{maxTokens: 5, tokensPerFill: 5, fillInterval: 500ms}}}}\n"
        ),
        "rl.yaml",
    )
    .expect("snapshot");
    let p = trellis_proxy::start(
        Config::from_wire(raw, None).expect("converts"),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy");
    let mut c = http_client::HttpClient::http1(p.inbound_addrs[0])
        .await
        .expect("connect");
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = c.get("app", "/bytes/1").await.expect("response");
        if r.status == 429 {
            assert_eq!(r.header("x-trellis-response-flags"), Some("RL"));
            assert_eq!(r.header("x-ratelimit-limit"), Some("5"));
            assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
            assert_eq!(r.header("x-ratelimit-reset"), Some("1"));
        }
        codes.push(r.status.as_u16());
    }
    assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429]);
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(
        c.get("app", "/bytes/1").await.expect("response").status,
        200,
        "refilled"
    );
    assert_eq!(app.stats().requests(), 6);
}

#[tokio::test]
async fn consistent_hash_keeps_a_user_on_one_endpoint() {
    let mut apps = Vec::new();
    for _ in 0..5 {
        apps.push(HttpServer::start().await.expect("app"));
    }
    let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr).collect();
    let p = proxy(&addrs, "  consistentHash: {httpHeaderName: x-user}").await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let mut send = async |user: &str| {
        let req = c
            .request(http::Method::GET, "app", "/bytes/1")
            .header("x-user", user)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        c.send(req).await.expect("response").status
    };
    for _ in 0..30 {
        assert_eq!(send("alice").await, 200);
    }
    let counts: Vec<u64> = apps.iter().map(|a| a.stats().requests()).collect();
    assert_eq!(
        counts.iter().filter(|n| **n > 0).count(),
        1,
        "alice stuck to one endpoint: {counts:?}"
    );
    for i in 0..40 {
        assert_eq!(send(&format!("user-{i}")).await, 200);
    }
    let used = apps.iter().filter(|a| a.stats().requests() > 0).count();
    assert!(used >= 3, "40 users spread over {used} endpoints");

    // By source IP: every request from this test comes from 127.0.0.1.
    let p = proxy(&addrs, "  consistentHash: {useSourceIp: true}").await;
    let before: Vec<u64> = apps.iter().map(|a| a.stats().requests()).collect();
    for _ in 0..20 {
        let r = http_client::get(p.outbound_addrs[0], "app", "/bytes/1")
            .await
            .expect("response");
        assert_eq!(r.status, 200);
    }
    let grew = apps
        .iter()
        .zip(&before)
        .filter(|(a, b)| a.stats().requests() > **b)
        .count();
    assert_eq!(grew, 1, "one source IP, one endpoint");
}

/// A proxy in locality `own` for `app:80` whose endpoints carry localities.
async fn located(own: &str, endpoints: &[(SocketAddr, &str, bool)], policy: &str) -> ProxyHandle {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(a, l, healthy)| {
            format!("{{address: \"{a}\", locality: \"{l}\", healthy: {healthy}}}")
        })
        .collect();
    let yaml = format!(
        "workload: {{name: client, locality: \"{own}\"}}
services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
clusters:
- name: app
  endpoints: [{}]
{policy}
",
        eps.join(", ")
    );
    let raw = Snapshot::from_text(&yaml, "locality.yaml").expect("snapshot");
    serve_app(Config::from_wire(raw, None).expect("converts")).await
}

async fn send_n(addr: SocketAddr, n: usize) {
    let mut c = http_client::HttpClient::http1(addr).await.expect("connect");
    for _ in 0..n {
        assert_eq!(
            c.get("app", "/bytes/1").await.expect("response").status,
            200
        );
    }
}

#[tokio::test]
async fn locality_failover_keeps_traffic_near_and_spills_by_health() {
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(HttpServer::start().await.expect("app"));
    }
    let n = |i: usize| apps[i].stats().requests();
    // Two endpoints in the client's zone, one elsewhere in its region, one in another
    // region that `failover` names.
    let zone = [
        (apps[0].addr, "eu/a/1", true),
        (apps[1].addr, "eu/a/1", true),
    ];
    let rest = [
        (apps[2].addr, "eu/b/1", true),
        (apps[3].addr, "us/x/1", true),
    ];
    let policy = "  localityLb: {failover: [{from: eu, to: us}]}";
    let all: Vec<_> = zone.iter().chain(&rest).copied().collect();
    let p = located("eu/a/1", &all, policy).await;
    send_n(p.outbound_addrs[0], 200).await;
    assert_eq!(n(0) + n(1), 200, "the client's zone takes everything");

    // One of the two zone endpoints down: the zone is 50 % available, so it takes
    // 1.4 × 50 % = 70 % and the rest of the region the other 30 %.
    let mut half = all.clone();
    half[0].2 = false;
    let p = located("eu/a/1", &half, policy).await;
    let before = [n(1), n(2), n(3)];
    send_n(p.outbound_addrs[0], 1000).await;
    let (z, r, f) = (n(1) - before[0], n(2) - before[1], n(3) - before[2]);
    assert!(
        (620..=780).contains(&z),
        "zone {z}, region {r}, failover {f}"
    );
    assert_eq!(
        z + r,
        1000,
        "the other region stays out while this one has room"
    );

    // The whole region down: the failover region.
    let mut down = all.clone();
    for e in &mut down[..3] {
        e.2 = false;
    }
    let p = located("eu/a/1", &down, policy).await;
    let before = n(3);
    send_n(p.outbound_addrs[0], 50).await;
    assert_eq!(n(3) - before, 50);
}

#[tokio::test]
async fn locality_distribute_splits_by_weight() {
    let (a, b) = (
        HttpServer::start().await.expect("a"),
        HttpServer::start().await.expect("b"),
    );
    let p = located(
        "eu/a/1",
        &[(a.addr, "eu/a/1", true), (b.addr, "us/x/1", true)],
        "  localityLb: {distribute: [{from: \"eu/*\", to: {\"eu/*\": 80, \"us/*\": 20}}]}",
    )
    .await;
    send_n(p.outbound_addrs[0], 2000).await;
    let (na, nb) = (a.stats().requests(), b.stats().requests());
    assert_eq!(na + nb, 2000);
    assert!((1500..=1700).contains(&na), "80/20: {na} vs {nb}");
}

#[tokio::test]
async fn a_new_endpoint_warms_up() {
    let (a, b) = (
        HttpServer::start().await.expect("a"),
        HttpServer::start().await.expect("b"),
    );
    let yaml = |window: &str, eps: &str| {
        format!(
            "services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
clusters:
- name: app
  warmup: {{duration: {window}, minimumPercent: 10}}
  endpoints: [{eps}]
"
        )
    };
    let convert = |text: String, prev: Option<&Config>| {
        Config::from_wire(
            Snapshot::from_text(&text, "w.yaml").expect("snapshot"),
            prev,
        )
        .expect("converts")
    };
    let only_a = format!("{{address: \"{}\"}}", a.addr);
    let both = format!("{{address: \"{}\"}}, {{address: \"{}\"}}", a.addr, b.addr);
    // A long window: however slowly this machine sends the requests, b is still near
    // the start of its ramp (10 %, plus under 2 % per second).
    let p = serve_app(convert(yaml("60s", &only_a), None)).await;
    p.update(convert(yaml("60s", &both), Some(&p.config())));
    send_n(p.outbound_addrs[0], 400).await;
    let early = b.stats().requests();
    assert!(
        early < 130,
        "b is warming: {early} of 400 (50 % would be 200)"
    );
    // A short window, over: b takes its full share.
    let p2 = serve_app(convert(yaml("200ms", &only_a), None)).await;
    p2.update(convert(yaml("200ms", &both), Some(&p2.config())));
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_n(p2.outbound_addrs[0], 400).await;
    let late = b.stats().requests() - early;
    assert!((160..=240).contains(&late), "b warmed up: {late} of 400");
}

#[tokio::test]
async fn the_proxy_sets_the_sticky_cookie_when_there_is_none() {
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(HttpServer::start().await.expect("app"));
    }
    let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr).collect();
    let p = proxy(
        &addrs,
        "  consistentHash: {httpCookie: session, httpCookieTtl: 1h, httpCookiePath: /}",
    )
    .await;
    let mut c = http_client::HttpClient::http1(p.outbound_addrs[0])
        .await
        .expect("connect");
    let first = c.get("app", "/bytes/1").await.expect("response");
    let set = first
        .header("set-cookie")
        .expect("the proxy sets the cookie")
        .to_string();
    assert!(set.starts_with("session="), "{set}");
    assert!(
        set.contains("Max-Age=3600") && set.contains("Path=/") && set.contains("HttpOnly"),
        "{set}"
    );
    let pair = set.split(';').next().expect("name=value").to_string();
    let first_endpoint: Vec<u64> = apps.iter().map(|a| a.stats().requests()).collect();
    // With the cookie: the same endpoint every time, and no new cookie.
    for _ in 0..20 {
        let req = c
            .request(http::Method::GET, "app", "/bytes/1")
            .header("cookie", pair.as_str())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let r = c.send(req).await.expect("response");
        assert_eq!(r.status, 200);
        assert!(r.header("set-cookie").is_none());
    }
    let after: Vec<u64> = apps.iter().map(|a| a.stats().requests()).collect();
    let grew: Vec<usize> = (0..4).filter(|i| after[*i] > first_endpoint[*i]).collect();
    assert_eq!(grew.len(), 1, "one endpoint for the cookie: {after:?}");
    assert_eq!(after[grew[0]] - first_endpoint[grew[0]], 20);
    assert_eq!(
        first_endpoint[grew[0]], 1,
        "the first request, cookie-less, went there too"
    );
}

/// Round-robin statuses of `n` requests.
async fn statuses(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut c = http_client::HttpClient::http1(addr).await.expect("connect");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            c.get("app", "/bytes/1")
                .await
                .expect("response")
                .status
                .as_u16(),
        );
    }
    out
}

#[tokio::test]
async fn gateway_errors_and_local_origin_failures_have_their_own_thresholds() {
    let good = HttpServer::start().await.expect("good");
    // 502s trip consecutiveGatewayErrors 2 long before consecutive5xxErrors 100.
    let bad_gateway = answering(502).await;
    let p = proxy(
        &[good.addr, bad_gateway],
        "  outlierDetection: {consecutive5xxErrors: 100, consecutiveGatewayErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}",
    )
    .await;
    let s = statuses(p.outbound_addrs[0], 12).await;
    assert_eq!(s.iter().filter(|c| **c == 502).count(), 2, "{s:?}");
    // 500s are not gateway errors: the same rule leaves that endpoint in.
    let server_error = answering(500).await;
    let p = proxy(
        &[good.addr, server_error],
        "  outlierDetection: {consecutive5xxErrors: 100, consecutiveGatewayErrors: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}",
    )
    .await;
    let s = statuses(p.outbound_addrs[0], 12).await;
    assert_eq!(s.iter().filter(|c| **c == 500).count(), 6, "{s:?}");

    // Split local-origin errors: an endpoint that refuses connections is ejected after
    // consecutiveLocalOriginFailures 2, while consecutive5xxErrors 100 would never fire.
    let refused = trellis_testkit::RefusedPort::new().expect("a refusing port");
    let refusing = refused.addr;
    let p = proxy(
        &[good.addr, refusing],
        "  outlierDetection: {consecutive5xxErrors: 100, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}",
    )
    .await;
    let s = statuses(p.outbound_addrs[0], 12).await;
    assert_eq!(s.iter().filter(|c| **c == 503).count(), 2, "{s:?}");
    assert!(s[4..].iter().all(|c| *c == 200), "{s:?}");
}

#[tokio::test]
async fn max_requests_per_connection_and_the_retry_budget() {
    // maxRequestsPerConnection 1: every request opens its own upstream connection.
    let app = HttpServer::start().await.expect("app");
    let p = proxy(
        &[app.addr],
        "  circuitBreakers: {maxRequestsPerConnection: 1}",
    )
    .await;
    send_n(p.outbound_addrs[0], 5).await;
    assert_eq!(app.stats().connections(), 5);
    let reused = HttpServer::start().await.expect("app");
    let p = proxy(&[reused.addr], "").await;
    send_n(p.outbound_addrs[0], 5).await;
    assert_eq!(
        reused.stats().connections(),
        1,
        "without the limit, one pooled connection"
    );

    // maxRetries 0: a 503 with `retryOn: 5xx, attempts: 3` is answered, not retried.
    let failing = answering(503).await;
    let yaml = |budget: &str| {
        format!(
            "services:
- hostname: app.default.svc.cluster.local
  ports:
  - port: 80
    name: http
    cluster: app
    httpRoutes: [{{name: r, clusters: [{{cluster: app}}], retries: {{attempts: 3, retryOn: 5xx, backoff: 1ms}}}}]
clusters:
- name: app
  endpoints: [{{address: \"{failing}\"}}]
{budget}
"
        )
    };
    for (budget, tries) in [("  circuitBreakers: {maxRetries: 0}", 1), ("", 4)] {
        let raw = Snapshot::from_text(&yaml(budget), "retry.yaml").expect("snapshot");
        let p = trellis_proxy::start(
            Config::from_wire(raw, None).expect("converts"),
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
        .expect("proxy");
        let r = http_client::get(p.outbound_addrs[0], "app", "/")
            .await
            .expect("response");
        assert_eq!(r.status, 503);
        let ep = &p.config().clusters[0].endpoints[0];
        let sent = ep.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sent, tries, "budget {budget:?}");
        let overflow = p
            .shared
            .stats
            .retry_overflow_total
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(overflow, if tries == 1 { 1 } else { 0 });
    }
}

/// Three slow requests at once from an outbound proxy to a peer (inbound) proxy: how many
/// HTTP/2 connections the peer sees.
async fn h2_connections_for_three_concurrent(policy: &str) -> u64 {
    let app = HttpServer::start().await.expect("app");
    let inbound = trellis_proxy::start(
        Config::from_wire(
            Snapshot::from_text(
                &format!(
                    "workload: {{name: app, inboundPorts: [{{port: {}, name: http}}]}}\n",
                    app.addr.port()
                ),
                "in.yaml",
            )
            .expect("snapshot"),
            None,
        )
        .expect("converts"),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("inbound proxy");
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
clusters:
- name: app
  endpoints: [{{address: \"{}\", proxied: true}}]
{policy}
",
        inbound.inbound_addrs[0]
    );
    let outbound = serve_app(
        Config::from_wire(
            Snapshot::from_text(&yaml, "out.yaml").expect("snapshot"),
            None,
        )
        .expect("converts"),
    )
    .await;
    let addr = outbound.outbound_addrs[0];
    let slow = || tokio::spawn(async move { http_client::get(addr, "app", "/slow/300").await });
    let tasks = [slow(), slow(), slow()];
    for t in tasks {
        let r = timeout(Duration::from_secs(10), t)
            .await
            .expect("in time")
            .expect("task")
            .expect("response");
        assert_eq!(r.status, 200);
    }
    assert_eq!(app.stats().requests(), 3);
    inbound
        .shared
        .stats
        .downstream_cx_total
        .load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn max_concurrent_streams_opens_more_http2_connections() {
    assert_eq!(
        h2_connections_for_three_concurrent("").await,
        1,
        "one multiplexed connection"
    );
    assert_eq!(
        h2_connections_for_three_concurrent("  circuitBreakers: {maxConcurrentStreams: 1}").await,
        3,
        "one stream per connection"
    );
}
