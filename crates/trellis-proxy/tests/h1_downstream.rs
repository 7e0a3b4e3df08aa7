//! The lean HTTP/1.1 server that faces clients, with a raw client that writes exact bytes:
//! pipelined requests, HEAD, trailers, `Connection: close`, and a connection that is
//! handed to hyper's server half-way (a chunked upload after a plain GET).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::HttpServer;
use trellis_xds::snapshot::Snapshot;

const LIMIT: Duration = Duration::from_secs(20);

async fn inbound(app: SocketAddr) -> ProxyHandle {
    let port = app.port();
    let raw = Snapshot::from_text(
        &format!("workload:\n  name: app\n  inboundPorts: [{{port: {port}, name: http}}]\n"),
        "down.yaml",
    )
    .expect("snapshot");
    trellis_proxy::start(
        Config::from_wire(raw, None).expect("converts"),
        ProxyOptions {
            inbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

/// Reads until `done` says the bytes so far are complete, the peer closes, or time is up.
async fn read_until(s: &mut TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut out = Vec::new();
    let _ = timeout(LIMIT, async {
        // Bounded by the deadline and by the peer closing.
        loop {
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
            if done(&String::from_utf8_lossy(&out)) {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let app = HttpServer::start().await.expect("app");
    let p = inbound(app.addr).await;
    let mut s = TcpStream::connect(p.inbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(
        b"GET /bytes/3 HTTP/1.1\r\nHost: app\r\n\r\nPOST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhelloGET /bytes/4 HTTP/1.1\r\nHost: app\r\n\r\n",
    )
    .await
    .expect("write");
    let resp = read_until(&mut s, |r| {
        r.matches("HTTP/1.1 200").count() == 3 && r.ends_with("aaaa")
    })
    .await;
    let bodies: Vec<&str> = resp
        .split("HTTP/1.1 200 OK\r\n")
        .skip(1)
        .map(|r| r.split("\r\n\r\n").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(bodies, ["aaa", "hello", "aaaa"], "{resp:?}");
    assert!(resp.to_lowercase().contains("date: "), "{resp:?}");
    assert_eq!(app.stats().requests(), 3);
}

#[tokio::test]
async fn head_responses_have_no_body_and_close_is_honoured() {
    let app = HttpServer::start().await.expect("app");
    let p = inbound(app.addr).await;
    let mut s = TcpStream::connect(p.inbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(b"HEAD /bytes/100 HTTP/1.1\r\nHost: app\r\n\r\nGET /bytes/2 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    // Read to the close: the second response says it and the proxy closes after it.
    let resp = read_until(&mut s, |_| false).await;
    let lower = resp.to_lowercase();
    let (first, second) = lower
        .split_once("http/1.1 200 ok\r\n")
        .map_or(("", ""), |(_, rest)| {
            rest.split_once("http/1.1 200 ok\r\n").unwrap_or((rest, ""))
        });
    assert!(first.contains("content-length: 100\r\n"), "{resp:?}");
    assert!(
        first.ends_with("\r\n\r\n"),
        "a HEAD response carries no body: {resp:?}"
    );
    assert!(second.contains("connection: close\r\n"), "{resp:?}");
    assert!(second.ends_with("\r\n\r\naa"), "{resp:?}");
}

/// An app that answers every request with a chunked body and a trailer.
async fn chunked_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // One connection carries at most 10 requests here.
                for _ in 0..10 {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 2048];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                    buf.drain(..end);
                    let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-trailer: yes\r\n\r\n";
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn trailers_go_to_clients_that_accept_them() {
    let app = chunked_app().await;
    let p = inbound(app).await;
    for (te, expect_trailer) in [("TE: trailers\r\n", true), ("", false)] {
        let mut s = TcpStream::connect(p.inbound_addrs[0])
            .await
            .expect("connect");
        s.write_all(
            format!("GET /t HTTP/1.1\r\nHost: app\r\n{te}Connection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let resp = read_until(&mut s, |_| false).await.to_lowercase();
        assert!(resp.starts_with("http/1.1 200"), "{resp:?}");
        assert!(resp.contains("transfer-encoding: chunked\r\n"), "{resp:?}");
        assert!(resp.contains("\r\n\r\n2\r\nok\r\n0\r\n"), "{resp:?}");
        assert_eq!(
            resp.ends_with("0\r\nx-trailer: yes\r\n\r\n"),
            expect_trailer,
            "{resp:?}"
        );
        assert!(resp.ends_with("\r\n\r\n"), "{resp:?}");
    }
}

#[tokio::test]
async fn a_chunked_upload_after_a_plain_request_is_served_on_the_same_connection() {
    let app = HttpServer::start().await.expect("app");
    let p = inbound(app.addr).await;
    let mut s = TcpStream::connect(p.inbound_addrs[0])
        .await
        .expect("connect");
    s.write_all(b"GET /bytes/1 HTTP/1.1\r\nHost: app\r\n\r\n")
        .await
        .expect("write");
    let first = read_until(&mut s, |r| r.ends_with("\r\n\r\na")).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first:?}");
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nGET /bytes/2 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let rest = read_until(&mut s, |_| false).await;
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest:?}");
    assert!(rest.contains("abcde"), "{rest:?}");
    assert!(rest.ends_with("\r\n\r\naa"), "{rest:?}");
    assert_eq!(app.stats().requests(), 3);
    assert_eq!(
        app.stats().connections(),
        2,
        "a kept-alive app connection per client kind"
    );
}
