//! The connection between two proxies: HTTP/2 by default (large streamed bodies both ways
//! under flow control, a peer that goes away and comes back on the same address), or the
//! client's own protocol when the cluster says so.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{HttpServer, http_client};
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(30);

fn config(yaml: &str) -> Config {
    let raw = Snapshot::from_text(yaml, "peer.yaml").expect("snapshot parses");
    Config::from_wire(raw, None).expect("snapshot converts")
}

async fn inbound(listen: SocketAddr, app: SocketAddr) -> ProxyHandle {
    let port = app.port();
    trellis_proxy::start(
        config(&format!(
            "workload:\n  name: app\n  inboundPorts: [{{port: {port}, name: http}}]\n"
        )),
        ProxyOptions {
            inbound_listen: vec![(listen, port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("inbound proxy starts")
}

async fn outbound(peer: SocketAddr) -> ProxyHandle {
    trellis_proxy::start(
        config(&format!(
            "services:\n- hostname: app.default.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  endpoints: [{{address: \"{peer}\", proxied: true}}]\n"
        )),
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "app".to_string(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("outbound proxy starts")
}

#[tokio::test]
async fn large_bodies_stream_both_ways_between_the_proxies() {
    let app = HttpServer::start().await.expect("app");
    let inb = inbound("127.0.0.1:0".parse().expect("addr"), app.addr).await;
    let out = outbound(inb.inbound_addrs[0]).await;
    // Larger than what is buffered for retries (so it streams) and than the HTTP/2
    // windows (so the sender waits for window updates).
    let body: Vec<u8> = (0..6 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let r = timeout(
        LIMIT,
        http_client::post(out.outbound_addrs[0], "app", "/echo", body.clone()),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(r.status.as_u16(), 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body[..] == body[..], "the echoed body differs");
    assert_eq!(
        app.stats().http1_requests(),
        1,
        "the app got HTTP/1.1, as the client spoke"
    );
}

#[tokio::test]
async fn a_peer_that_restarts_is_reached_on_a_new_connection() {
    let app = HttpServer::start().await.expect("app");
    let first = inbound("127.0.0.1:0".parse().expect("addr"), app.addr).await;
    let peer = first.inbound_addrs[0];
    let out = outbound(peer).await;
    let r = timeout(
        LIMIT,
        http_client::get(out.outbound_addrs[0], "app", "/bytes/3"),
    )
    .await
    .expect("in time")
    .expect("response");
    assert_eq!(r.status.as_u16(), 200);
    // The peer goes away (its HTTP/2 connection is closed) and comes back on the same
    // address.
    first.drain(Duration::from_secs(2)).await;
    drop(first);
    let mut second = None;
    for _ in 0..50 {
        let opts = ProxyOptions {
            inbound_listen: vec![(peer, app.addr.port())],
            ..ProxyOptions::default()
        };
        let port = app.addr.port();
        match trellis_proxy::start(
            config(&format!(
                "workload:\n  name: app\n  inboundPorts: [{{port: {port}, name: http}}]\n"
            )),
            opts,
        )
        .await
        {
            Ok(p) => {
                second = Some(p);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let _second = second.expect("the peer restarts on its address");
    for i in 0..3 {
        let r = timeout(
            LIMIT,
            http_client::get(out.outbound_addrs[0], "app", "/bytes/3"),
        )
        .await
        .expect("in time")
        .expect("response");
        assert_eq!(
            r.status.as_u16(),
            200,
            "request {i} after the restart: {:?}",
            r.body
        );
    }
    assert_eq!(app.stats().requests(), 4);
}

#[tokio::test]
async fn keep_client_protocol_sends_http1_to_the_peer_without_the_marker() {
    // The "peer" records the request it gets and answers in HTTP/1.1: with HTTP/2 between
    // the proxies it would see the HTTP/2 preface instead.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let peer = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
            let mut chunk = [0u8; 1024];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    });
    let out = trellis_proxy::start(
        config(&format!(
            "services:\n- hostname: app.default.svc.cluster.local\n  ports: [{{port: 80, name: http, cluster: app}}]\nclusters:\n- name: app\n  keepClientProtocol: true\n  endpoints: [{{address: \"{peer}\", proxied: true}}]\n"
        )),
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "app".to_string(), 80)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("outbound proxy starts");
    let r = timeout(LIMIT, http_client::get(out.outbound_addrs[0], "app", "/x"))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"ok"[..]));
    let head = timeout(LIMIT, rx)
        .await
        .expect("in time")
        .expect("the peer saw a request");
    assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head:?}");
    assert!(
        !head.to_lowercase().contains("x-trellis-downstream-version"),
        "{head:?}"
    );
}

#[tokio::test]
async fn connect_over_http2_is_answered_501() {
    let app = HttpServer::start().await.expect("app");
    let inb = inbound("127.0.0.1:0".parse().expect("addr"), app.addr).await;
    let io = tokio::net::TcpStream::connect(inb.inbound_addrs[0])
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::CONNECT;
    *req.uri_mut() = "db.example:5432".parse().expect("authority");
    let (resp, _stream) = client.send_request(req, false).expect("sent");
    let resp = timeout(LIMIT, resp)
        .await
        .expect("in time")
        .expect("a response");
    assert_eq!(resp.status().as_u16(), 501);
    assert_eq!(app.stats().requests(), 0);
}
