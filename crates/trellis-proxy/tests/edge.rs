//! Bad input, dead upstreams, interception (with a fake original-destination lookup),
//! the admin server, drain, and curl as a real client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use trellis_proxy::admin::{self, AdminContext};
use trellis_proxy::sockets::FixedOriginalDst;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, TcpEchoServer, http_client, tcp_echo_half_close};
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(20);

fn config(yaml: &str) -> Config {
    let raw = Snapshot::from_text(yaml, "test.yaml").expect("snapshot parses");
    Config::from_wire(raw, None).expect("snapshot converts")
}

fn any_addr() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// An outbound proxy with one explicit listener for `app:80` whose cluster has the given
/// (non-proxied) endpoints.
async fn outbound(endpoints: &[SocketAddr], settings: &str) -> ProxyHandle {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{address: \"{e}\"}}"))
        .collect();
    let yaml = format!(
        "version: v1
services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, name: http, cluster: app}}]
clusters:
- name: app
  endpoints: [{}]
{settings}",
        eps.join(", ")
    );
    trellis_proxy::start(
        config(&yaml),
        ProxyOptions {
            outbound_listen: vec![(any_addr(), "app".to_string(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy starts")
}

/// Writes raw bytes and reads whatever comes back until the peer closes or `wait` ends.
async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http_gets_400() {
    let app = HttpServer::start().await.expect("app");
    let p = outbound(&[app.addr], "").await;
    let resp = raw_exchange(
        p.outbound_addrs[0],
        b"GET / HTTP/1.1\r\nHost: app\r\nthis is not a header\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:?}");
    assert_eq!(app.stats().requests(), 0);
}

#[tokio::test]
async fn oversized_headers_get_431_and_the_limit_is_configurable() {
    let app = HttpServer::start().await.expect("app");
    let p = outbound(&[app.addr], "settings: {maxRequestHeaderBytes: 16384}\n").await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: app\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let resp = raw_exchange(p.outbound_addrs[0], big.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");
    let ok = format!(
        "GET /echo HTTP/1.1\r\nHost: app\r\nx-big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(10_000)
    );
    let resp = raw_exchange(p.outbound_addrs[0], ok.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "{}",
        &resp[..resp.len().min(200)]
    );

    // The default limit is 60 KiB.
    let p = outbound(&[app.addr], "").await;
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: app\r\nx-big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let resp = raw_exchange(p.outbound_addrs[0], big.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:?}");

    // The same limit over HTTP/2.
    let p = outbound(&[app.addr], "settings: {maxRequestHeaderBytes: 16384}\n").await;
    let mut c = http_client::HttpClient::h2c(p.outbound_addrs[0])
        .await
        .expect("h2c");
    let req = c
        .request(http::Method::GET, "app", "/echo")
        .header("x-big", "a".repeat(20_000))
        .body(http_body_util::BodyExt::boxed_unsync(
            http_body_util::Empty::new(),
        ))
        .expect("request");
    let r = timeout(LIMIT, c.send(req)).await.expect("in time");
    assert_eq!(r.expect("a response").status.as_u16(), 431);
    let r = timeout(LIMIT, c.get("app", "/echo"))
        .await
        .expect("in time");
    assert_eq!(r.expect("the connection goes on").status.as_u16(), 200);
}

#[tokio::test]
async fn slowloris_is_closed_after_the_header_timeout() {
    let app = HttpServer::start().await.expect("app");
    let p = outbound(&[app.addr], "settings: {requestHeaderTimeout: 300ms}\n").await;
    let mut s = TcpStream::connect(p.outbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n")
        .await
        .expect("write");
    let start = Instant::now();
    let mut closed = false;
    // Trickle a header line every 100 ms, at most 50 times.
    for i in 0..50 {
        if s.write_all(format!("x-h{i}: v\r\n").as_bytes())
            .await
            .is_err()
        {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {} // a 408, then the close
            Err(_) => {}
        }
    }
    assert!(closed, "connection still open");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

/// A port that refuses connections while the guard lives.
fn closed_port() -> trellis_testkit::RefusedPort {
    trellis_testkit::RefusedPort::new().expect("a refusing port")
}

#[tokio::test]
async fn refused_upstream_gets_503_uf_and_no_endpoint_gets_503_uh() {
    let refused = closed_port();
    let dead = refused.addr;
    let p = outbound(&[dead], "").await;
    let r = timeout(LIMIT, http_client::get(p.outbound_addrs[0], "app", "/"))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-response-flags"), Some("UF"));
    assert!(String::from_utf8_lossy(&r.body).contains("upstream connect error"));
    assert_eq!(
        p.shared
            .stats
            .upstream_connect_failures_total
            .load(Ordering::Relaxed),
        3,
        "tried 3 times: Istio's default policy retries connect failures twice"
    );

    let p = outbound(&[], "").await;
    let r = timeout(LIMIT, http_client::get(p.outbound_addrs[0], "app", "/"))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-trellis-response-flags"), Some("UH"));
}

#[tokio::test]
async fn pooled_connection_closed_by_the_app_is_never_a_503() {
    // The app closes idle keep-alive connections after 50 ms; the proxy keeps them for
    // 3 s by default but must resend a request that met a closed connection.
    let app = HttpServer::start().await.expect("app");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let flaky = listener.local_addr().expect("addr");
    let target = app.addr;
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(target).await else {
                    return;
                };
                // Forward one request/response exchange, then close the idle connection.
                let mut buf = vec![0u8; 65536];
                let Ok(Ok(n)) = timeout(Duration::from_secs(5), down.read(&mut buf)).await else {
                    return;
                };
                let _ = up.write_all(&buf[..n]).await;
                let Ok(Ok(n)) = timeout(Duration::from_secs(5), up.read(&mut buf)).await else {
                    return;
                };
                let _ = down.write_all(&buf[..n]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            });
        }
    });
    let p = outbound(&[flaky], "").await;
    for _ in 0..5 {
        let r = timeout(
            LIMIT,
            http_client::get(p.outbound_addrs[0], "app", "/bytes/10"),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(r.status, 200, "{r:?}");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
}

async fn capture(dst: SocketAddr, yaml: &str) -> ProxyHandle {
    trellis_proxy::start(
        config(yaml),
        ProxyOptions {
            outbound_capture: Some(any_addr()),
            original_dst: Arc::new(FixedOriginalDst(dst)),
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy starts")
}

#[tokio::test]
async fn intercepted_connections_route_by_virtual_ip() {
    let app = HttpServer::start().await.expect("app");
    let yaml = format!(
        "services:
- hostname: app.default.svc.cluster.local
  addresses: [240.240.0.7]
  ports: [{{port: 80, cluster: app}}]
clusters:
- name: app
  endpoints: [{{address: \"{}\"}}]
",
        app.addr
    );
    let p = capture("240.240.0.7:80".parse().expect("addr"), &yaml).await;
    let r = timeout(LIMIT, http_client::get(p.outbound_addrs[0], "app", "/echo"))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(app.stats().requests(), 1);
}

#[tokio::test]
async fn unknown_destinations_pass_through_or_hit_the_black_hole() {
    let echo = TcpEchoServer::start().await.expect("echo");
    let p = capture(echo.addr, "outboundTrafficPolicy: ALLOW_ANY\n").await;
    let got = timeout(
        LIMIT,
        tcp_echo_half_close(p.outbound_addrs[0], b"passthrough"),
    )
    .await
    .expect("in time")
    .expect("echo");
    assert_eq!(got, b"passthrough");
    assert_eq!(p.shared.stats.passthrough_total.load(Ordering::Relaxed), 1);

    let p = capture(echo.addr, "outboundTrafficPolicy: REGISTRY_ONLY\n").await;
    let resp = raw_exchange(p.outbound_addrs[0], b"hello", Duration::from_secs(5)).await;
    assert_eq!(resp, "", "refused: nothing comes back");
    assert_eq!(p.shared.stats.blackhole_total.load(Ordering::Relaxed), 1);
    assert_eq!(
        echo.stats().connections(),
        1,
        "only the passthrough reached the echo server"
    );
}

#[tokio::test]
async fn a_connection_to_the_proxy_itself_is_not_looped() {
    // Bind first to learn the address, then make the fake report it.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let own = l.local_addr().expect("addr");
    drop(l);
    let p = trellis_proxy::start(
        Config::empty(),
        ProxyOptions {
            outbound_capture: Some(own),
            original_dst: Arc::new(FixedOriginalDst(own)),
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy starts");
    let resp = raw_exchange(
        p.outbound_addrs[0],
        b"GET / HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(resp, "");
    assert_eq!(p.shared.stats.passthrough_total.load(Ordering::Relaxed), 0);
}

async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = timeout(LIMIT, http_client::get(addr, "localhost", path))
        .await
        .expect("in time")
        .expect("admin response");
    (
        r.status.as_u16(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

#[tokio::test]
async fn admin_endpoints() {
    let app = HttpServer::start().await.expect("app");
    let p = outbound(&[app.addr], "").await;
    let r = http_client::get(p.outbound_addrs[0], "app", "/bytes/3")
        .await
        .expect("request");
    assert_eq!(r.status, 200);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let admin_addr = listener.local_addr().expect("addr");
    let ctx = Arc::new(AdminContext {
        shared: Arc::clone(&p.shared),
        set_log_level: None,
        quit: Arc::new(tokio::sync::Notify::new()),
        ready: Arc::new(AtomicBool::new(true)),
    });
    tokio::spawn(admin::serve(listener, Arc::clone(&ctx)));

    assert_eq!(
        admin_get(admin_addr, "/ready").await,
        (200, "LIVE\n".to_string())
    );
    let (status, dump) = admin_get(admin_addr, "/config_dump").await;
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["version"], "v1");
    assert_eq!(dump["snapshot"]["clusters"][0]["name"], "app");
    let (_, clusters) = admin_get(admin_addr, "/clusters").await;
    let clusters: serde_json::Value = serde_json::from_str(&clusters).expect("json");
    let ep = &clusters["clusters"][0]["endpoints"][0];
    assert_eq!(ep["address"], app.addr.to_string());
    assert_eq!(ep["requests"], 1);
    assert_eq!(ep["healthy"], true);
    let (_, stats) = admin_get(admin_addr, "/stats/prometheus").await;
    assert!(
        stats.contains("trellis_proxy_requests_total 1\n"),
        "{stats}"
    );
    assert!(
        stats.contains("trellis_proxy_config_info{version=\"v1\"} 1"),
        "{stats}"
    );
    let (status, _) = admin_get(admin_addr, "/nope").await;
    assert_eq!(status, 404);

    let mut c = http_client::HttpClient::http1(admin_addr)
        .await
        .expect("connect");
    let req = c
        .request(http::Method::POST, "localhost", "/logging?level=debug")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    assert_eq!(c.send(req).await.expect("response").status, 501);
    let req = c
        .request(http::Method::POST, "localhost", "/quitquitquit")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    assert_eq!(c.send(req).await.expect("response").status, 200);
    assert_eq!(admin_get(admin_addr, "/healthz/ready").await.0, 503);
}

#[tokio::test]
async fn drain_finishes_requests_in_flight_and_stops_accepting() {
    let app = HttpServer::start().await.expect("app");
    let inbound = trellis_proxy::start(
        config(&format!(
            "workload:\n  name: app\n  inboundPorts: [{{port: {}, name: http}}]\n",
            app.addr.port()
        )),
        ProxyOptions {
            inbound_listen: vec![(any_addr(), app.addr.port())],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy starts");
    let addr = inbound.inbound_addrs[0];
    let slow = tokio::spawn(async move { http_client::get(addr, "app", "/slow/400").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    timeout(LIMIT, inbound.drain(Duration::from_secs(5)))
        .await
        .expect("drain ends");
    let r = slow
        .await
        .expect("task")
        .expect("the request in flight completes");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "no new inbound connections after drain"
    );
}

fn curl() -> Option<&'static str> {
    ["/usr/bin/curl", "/bin/curl"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

#[tokio::test]
async fn curl_http11_and_http2_prior_knowledge() {
    let Some(curl) = curl() else {
        eprintln!("curl not installed; skipping (CI installs it)");
        return;
    };
    let app = HttpServer::start().await.expect("app");
    let p = outbound(&[app.addr], "").await;
    let url = format!("http://{}/echo", p.outbound_addrs[0]);
    for extra in [&["--http1.1"][..], &["--http2-prior-knowledge"][..]] {
        let out = tokio::process::Command::new(curl)
            .args(extra)
            .args([
                "-sS",
                "--max-time",
                "10",
                "-D",
                "-",
                "-H",
                "Host: app",
                "-d",
                "from curl",
                &url,
            ])
            .output();
        let out = timeout(LIMIT, out)
            .await
            .expect("in time")
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status_line = text.lines().next().unwrap_or_default();
        assert!(
            status_line.ends_with("200") || status_line.contains(" 200 "),
            "{extra:?}: {text}"
        );
        assert!(text.ends_with("from curl"), "{extra:?}: {text}");
        assert!(
            text.to_ascii_lowercase()
                .contains("x-echo-h-user-agent: curl/"),
            "{text}"
        );
    }
    assert_eq!(app.stats().http1_requests(), 1);
    assert_eq!(app.stats().http2_requests(), 1);
}
