//! Through two proxies in series (client → outbound proxy → inbound proxy → app), with
//! the fixture apps of trellis-testkit: every protocol arrives intact.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{
    BannerServer, GrpcServer, HttpServer, TcpEchoServer, WsEchoServer, WsMessage,
    grpc_call_pingpong_with, grpc_call_with_authority, http_client, tcp_echo_half_close, ws_echo,
};
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(20);

fn config(yaml: &str) -> Config {
    let raw = Snapshot::from_text(yaml, "test.yaml").expect("snapshot parses");
    Config::from_wire(raw, None).expect("snapshot converts")
}

/// An outbound and an inbound proxy in front of an app listening on `app`.
struct Pair {
    outbound: ProxyHandle,
    inbound: ProxyHandle,
}

impl Pair {
    /// `port_name` declares the protocol as a Kubernetes port name would (`http`, `grpc`,
    /// `tcp-echo`) or not at all (`""`: detected).
    async fn start(app: SocketAddr, port_name: &str) -> Pair {
        let name = if port_name.is_empty() {
            String::new()
        } else {
            format!(", name: {port_name}")
        };
        let inbound_cfg = config(&format!(
            "version: in-1\nworkload:\n  name: app\n  inboundPorts: [{{port: {}{name}}}]\n",
            app.port()
        ));
        let inbound = trellis_proxy::start(
            inbound_cfg,
            ProxyOptions {
                inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), app.port())],
                ..ProxyOptions::default()
            },
        )
        .await
        .expect("inbound proxy starts");
        let outbound = trellis_proxy::start(
            config(&outbound_yaml(inbound.inbound_addrs[0], &name, "out-1")),
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
        .expect("outbound proxy starts");
        Pair { outbound, inbound }
    }

    fn addr(&self) -> SocketAddr {
        self.outbound.outbound_addrs[0]
    }
}

fn outbound_yaml(peer: SocketAddr, name: &str, version: &str) -> String {
    format!(
        "version: {version}
services:
- hostname: app.default.svc.cluster.local
  ports: [{{port: 80, cluster: app{name}}}]
clusters:
- name: app
  endpoints: [{{address: \"{peer}\", proxied: true}}]
"
    )
}

#[tokio::test]
async fn http1_through_two_proxies_arrives_as_http1_over_one_h2_connection() {
    let app = HttpServer::start().await.expect("app");
    let pair = Pair::start(app.addr, "http").await;
    for i in 0..3 {
        let r = timeout(
            LIMIT,
            http_client::post(
                pair.addr(),
                "app.default",
                "/echo?n=1",
                Bytes::from_static(b"hello"),
            ),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "hello");
        assert_eq!(
            r.header("x-echo-version"),
            Some("HTTP/1.1"),
            "the app gets its own version back"
        );
        assert_eq!(r.header("x-echo-method"), Some("POST"));
        assert_eq!(r.header("x-echo-path"), Some("/echo?n=1"));
        assert_eq!(r.header("x-echo-h-host"), Some("app.default"), "round {i}");
        assert_eq!(r.header("x-echo-h-x-forwarded-proto"), Some("http"));
        assert!(
            r.header("x-echo-h-x-request-id")
                .is_some_and(|id| id.len() == 36)
        );
        assert_eq!(
            r.header("x-echo-h-x-trellis-downstream-version"),
            None,
            "internal header removed"
        );
    }
    // Between the proxies: one multiplexed HTTP/2 connection.
    let (_, h2_peers) = pair.outbound.shared.pools.snapshot();
    assert_eq!(h2_peers, vec![pair.inbound.inbound_addrs[0]]);
    assert_eq!(app.stats().http1_requests(), 3);
}

#[tokio::test]
async fn h2c_client_reaches_app_as_http2_and_keeps_its_request_id() {
    let app = HttpServer::start().await.expect("app");
    let pair = Pair::start(app.addr, "http").await;
    let mut client = http_client::HttpClient::h2c(pair.addr())
        .await
        .expect("h2c connect");
    let req = client
        .request(http::Method::GET, "app", "/echo")
        .header("x-request-id", "fixed-id")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let r = timeout(LIMIT, client.send(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.header("x-echo-version"), Some("HTTP/2.0"));
    assert_eq!(r.header("x-echo-h-x-request-id"), Some("fixed-id"));
    let r = timeout(LIMIT, client.get("app", "/trailers"))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(r.body, "ok");
    let trailers = r.trailers.expect("trailers pass through");
    assert_eq!(
        trailers.get("x-trailer").map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
}

#[tokio::test]
async fn grpc_unary_streaming_and_errors_keep_trailers() {
    let app = GrpcServer::start().await.expect("grpc app");
    for name in ["grpc", ""] {
        let pair = Pair::start(app.addr, name).await;
        let r = timeout(
            LIMIT,
            grpc_call_with_authority(
                pair.addr(),
                "app",
                "/test.Echo/Unary",
                vec![Bytes::from_static(b"ping")],
            ),
        )
        .await
        .expect("in time")
        .expect("call");
        assert_eq!(
            r.grpc_status.as_deref(),
            Some("0"),
            "port name {name:?}: {r:?}"
        );
        assert_eq!(r.messages, vec![Bytes::from_static(b"ping")]);

        let msgs: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("msg-{i}"))).collect();
        let r = timeout(
            LIMIT,
            grpc_call_pingpong_with(
                pair.addr(),
                "app",
                "/test.Echo/Stream",
                msgs.clone(),
                Duration::from_secs(5),
            ),
        )
        .await
        .expect("in time")
        .expect("bidi stream echoes message by message through both proxies");
        assert_eq!(r.messages, msgs);
        assert_eq!(r.grpc_status.as_deref(), Some("0"));

        let r = timeout(
            LIMIT,
            grpc_call_with_authority(
                pair.addr(),
                "app",
                "/test.Echo/Fail",
                vec![Bytes::from_static(b"x")],
            ),
        )
        .await
        .expect("in time")
        .expect("call");
        assert_eq!(r.grpc_status.as_deref(), Some("14"));
        assert_eq!(r.grpc_message.as_deref(), Some("fixture failure"));
    }
}

#[tokio::test]
async fn websocket_echo_through_two_proxies() {
    let app = WsEchoServer::start().await.expect("ws app");
    let pair = Pair::start(app.addr, "http").await;
    let sent = vec![
        WsMessage::Text("hello".into()),
        WsMessage::Binary(Bytes::from(vec![7u8; 70_000])),
        WsMessage::Text("bye".into()),
    ];
    let got = timeout(LIMIT, ws_echo(pair.addr(), "app", sent.clone()))
        .await
        .expect("in time")
        .expect("websocket");
    assert_eq!(got, sent);
    assert_eq!(app.stats().upgrades(), 1);
}

#[tokio::test]
async fn tcp_echo_with_half_close_declared_and_detected() {
    let app = TcpEchoServer::start().await.expect("tcp app");
    for name in ["tcp-echo", ""] {
        let pair = Pair::start(app.addr, name).await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let got = timeout(LIMIT, tcp_echo_half_close(pair.addr(), &data))
            .await
            .expect("in time")
            .expect("echo");
        assert_eq!(got.len(), data.len(), "port name {name:?}");
        assert!(got == data);
    }
    assert_eq!(
        app.stats().eofs_seen(),
        2,
        "the app saw the client's half-close each time"
    );
}

#[tokio::test]
async fn server_first_protocol_is_not_stuck_in_detection() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let app = BannerServer::start(Bytes::from_static(b"220 fixture ready\r\n"))
        .await
        .expect("banner app");
    // Undeclared port: both proxies wait for the client, which says nothing, then fall
    // back to TCP.
    let pair = Pair::start(app.addr, "").await;
    let stream = tokio::net::TcpStream::connect(pair.addr())
        .await
        .expect("connect");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .expect("banner arrives without the client speaking first")
        .expect("read");
    assert_eq!(line, "220 fixture ready\r\n");
    reader
        .get_mut()
        .write_all(b"HELO x\r\n")
        .await
        .expect("write");
    line.clear();
    timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(line, "HELO x\r\n");
    let detections = pair
        .outbound
        .shared
        .stats
        .detection_timeouts_total
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(detections, 1);
}

#[tokio::test]
async fn snapshot_swaps_under_load_lose_no_request() {
    let app = HttpServer::start().await.expect("app");
    let pair = Pair::start(app.addr, "http").await;
    let peer = pair.inbound.inbound_addrs[0];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let addr = pair.addr();
        let stop = Arc::clone(&stop);
        clients.push(tokio::spawn(async move {
            let mut ok = 0u32;
            let mut failed = Vec::new();
            let mut client = http_client::HttpClient::http1(addr).await.expect("connect");
            // Bounded: stops when told, and never runs more than 20k requests.
            for i in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                // Half the clients keep one connection, half open a new one each time.
                let r = if c % 2 == 0 {
                    client.get("app", "/bytes/1024").await
                } else {
                    http_client::get(addr, "app", "/bytes/1024").await
                };
                match r {
                    Ok(r) if r.status == 200 && r.body.len() == 1024 => ok += 1,
                    other => failed.push(format!("request {i}: {other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    for v in 0..100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        pair.outbound.update(config(&outbound_yaml(
            peer,
            ", name: http",
            &format!("swap-{v}"),
        )));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = timeout(LIMIT, c)
            .await
            .expect("in time")
            .expect("client task");
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        total += ok;
    }
    assert!(total > 100, "only {total} requests ran during the swaps");
    assert_eq!(pair.outbound.config().version, "swap-99");
}

#[tokio::test]
async fn expect_100_continue_and_chunked_bodies_through_two_proxies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = HttpServer::start_http1_only().await.expect("app");
    let pair = Pair::start(app.addr, "http").await;
    let mut s = tokio::net::TcpStream::connect(pair.addr())
        .await
        .expect("connect");
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: app\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write head");
    // The body is only sent after the interim response, as a careful client does.
    let mut buf = vec![0u8; 64];
    let n = timeout(LIMIT, s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    s.write_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        .await
        .expect("write body");
    let mut rest = Vec::new();
    timeout(LIMIT, s.read_to_end(&mut rest))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&rest);
    let text = text.trim_start_matches(&interim[..]);
    assert!(text.contains("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("hello world"), "{text}");
}

#[tokio::test]
async fn connect_is_tunnelled() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    // A minimal CONNECT-speaking app: accepts the tunnel, then echoes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((s, _)) = listener.accept().await else {
            return;
        };
        let mut r = BufReader::new(s);
        let mut line = String::new();
        // Read the request head (bounded: 64 lines).
        for _ in 0..64 {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        let mut s = r.into_inner();
        let _ = s
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await;
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    let pair = Pair::start(app, "http").await;
    let mut s = tokio::net::TcpStream::connect(pair.addr())
        .await
        .expect("connect");
    s.write_all(b"CONNECT db.example:5432 HTTP/1.1\r\nHost: db.example:5432\r\n\r\n")
        .await
        .expect("write");
    let mut r = BufReader::new(s);
    let mut status = String::new();
    timeout(LIMIT, r.read_line(&mut status))
        .await
        .expect("in time")
        .expect("read");
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
    let mut line = String::new();
    for _ in 0..16 {
        line.clear();
        timeout(LIMIT, r.read_line(&mut line))
            .await
            .expect("in time")
            .expect("read");
        if line == "\r\n" {
            break;
        }
    }
    r.get_mut()
        .write_all(b"through the tunnel\n")
        .await
        .expect("write");
    line.clear();
    timeout(LIMIT, r.read_line(&mut line))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(line, "through the tunnel\n");
}

#[tokio::test]
async fn inbound_finds_an_app_that_listens_only_on_the_pod_address() {
    // 127.0.0.2 stands in for the pod address (all of 127/8 is loopback on Linux).
    let app = HttpServer::start_on("127.0.0.2:0".parse().expect("addr"), false)
        .await
        .expect("app on the pod address");
    let port = app.addr.port();
    let inbound = trellis_proxy::start(
        config(&format!(
            "workload:\n  name: app\n  addresses: [127.0.0.2]\n  inboundPorts: [{{port: {port}, name: http}}]\n"
        )),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("inbound proxy");
    for _ in 0..2 {
        let r = timeout(
            LIMIT,
            http_client::get(inbound.inbound_addrs[0], "app", "/echo"),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(app.stats().requests(), 2);
}
