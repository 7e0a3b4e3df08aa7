//! The HTTP fixture, driven by the testkit clients, raw sockets and curl.

mod common;

use bytes::Bytes;
use common::{bounded, curl, run_curl};
use http::{Method, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_testkit::http_client::{self, HttpClient};
use trellis_testkit::{HttpServer, chunked_body};

#[tokio::test]
async fn h1_echo_reflects_method_path_version_headers_and_body() {
    let server = HttpServer::start().await.unwrap();
    let mut client = bounded("connect", HttpClient::http1(server.addr))
        .await
        .unwrap();
    let req = client
        .request(Method::PUT, "app.test", "/echo?x=1&y=2")
        .header("x-custom", "one")
        .header("x-custom", "two")
        .body(http_body_util::Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let resp = bounded("echo", client.send(req)).await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.version, Version::HTTP_11);
    assert_eq!(resp.body, "payload");
    assert_eq!(resp.header("x-echo-method"), Some("PUT"));
    assert_eq!(resp.header("x-echo-path"), Some("/echo?x=1&y=2"));
    assert_eq!(resp.header("x-echo-version"), Some("HTTP/1.1"));
    assert_eq!(resp.header("x-echo-authority"), Some("app.test"));
    assert_eq!(resp.header("x-echo-h-host"), Some("app.test"));
    assert_eq!(resp.header("x-echo-h-content-length"), Some("7"));
    let custom: Vec<_> = resp.headers.get_all("x-echo-h-x-custom").iter().collect();
    assert_eq!(custom, ["one", "two"]);
    assert_eq!(server.stats().http1_requests(), 1);
    assert_eq!(server.stats().http2_requests(), 0);
}

#[tokio::test]
async fn h2c_echo_on_the_same_port() {
    let server = HttpServer::start().await.unwrap();
    let resp = bounded(
        "h2c post",
        http_client::h2c_post(server.addr, "app.test:8080", "/echo", "over h2"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.version, Version::HTTP_2);
    assert_eq!(resp.body, "over h2");
    assert_eq!(resp.header("x-echo-version"), Some("HTTP/2.0"));
    assert_eq!(resp.header("x-echo-method"), Some("POST"));
    assert_eq!(resp.header("x-echo-authority"), Some("app.test:8080"));
    assert_eq!(server.stats().http2_requests(), 1);
    assert_eq!(server.stats().http1_requests(), 0);
}

#[tokio::test]
async fn h1_chunked_request_body_is_reassembled() {
    let server = HttpServer::start().await.unwrap();
    let mut client = HttpClient::http1(server.addr).await.unwrap();
    let chunks = vec![
        Bytes::from_static(b"first,"),
        Bytes::from_static(b"second,"),
        Bytes::from_static(b"third"),
    ];
    let req = client
        .request(Method::POST, "app.test", "/echo")
        .body(chunked_body(chunks))
        .unwrap();
    let resp = bounded("chunked echo", client.send(req)).await.unwrap();
    assert_eq!(resp.body, "first,second,third");
    assert_eq!(resp.header("x-echo-h-transfer-encoding"), Some("chunked"));
    assert_eq!(resp.header("x-echo-h-content-length"), None);
}

#[tokio::test]
async fn h1_keep_alive_reuses_one_connection() {
    let server = HttpServer::start().await.unwrap();
    let mut client = HttpClient::http1(server.addr).await.unwrap();
    for i in 0..3 {
        let resp = bounded("get", client.get("app.test", "/bytes/1024"))
            .await
            .unwrap();
        assert_eq!(resp.status, StatusCode::OK, "request {i}");
        assert_eq!(resp.body.len(), 1024);
        assert!(resp.body.iter().all(|&b| b == b'a'));
    }
    assert_eq!(server.stats().connections(), 1);
    assert_eq!(server.stats().requests(), 3);
}

#[tokio::test]
async fn expect_100_continue_gets_an_interim_response_before_the_body() {
    let server = HttpServer::start().await.unwrap();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\
          Expect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let interim = bounded("100 Continue", read_until(&mut s, b"\r\n\r\n")).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue"),
        "got {interim:?}"
    );
    s.write_all(b"hello").await.unwrap();
    let resp = bounded("final response", read_until(&mut s, b"hello")).await;
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "got {resp:?}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("x-echo-h-expect: 100-continue")
    );
}

/// Reads until `marker` has arrived; returns everything read.
async fn read_until(s: &mut TcpStream, marker: &[u8]) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(marker.len()).any(|w| w == marker) {
        let n = s.read(&mut chunk).await.expect("reading the socket");
        assert!(n > 0, "EOF before {marker:?}; got {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).expect("HTTP/1.1 text")
}

#[tokio::test]
async fn status_bytes_slow_and_not_found_routes() {
    let server = HttpServer::start().await.unwrap();
    let a = server.addr;
    let resp = bounded("status", http_client::get(a, "h", "/status/503"))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.body, "status 503\n");
    let resp = bounded("bytes", http_client::h2c_get(a, "h", "/bytes/100000"))
        .await
        .unwrap();
    assert_eq!(resp.body.len(), 100_000);
    let resp = bounded("bytes0", http_client::get(a, "h", "/bytes/0"))
        .await
        .unwrap();
    assert_eq!((resp.status, resp.body.len()), (StatusCode::OK, 0));
    let started = std::time::Instant::now();
    let resp = bounded("slow", http_client::get(a, "h", "/slow/150"))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(150));
    let resp = bounded("404", http_client::get(a, "h", "/nope"))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::NOT_FOUND);
    let resp = bounded("bad", http_client::get(a, "h", "/status/abc"))
        .await
        .unwrap();
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn trailers_arrive_over_h2() {
    let server = HttpServer::start().await.unwrap();
    let resp = bounded(
        "trailers",
        http_client::h2c_get(server.addr, "h", "/trailers"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.body, "ok");
    let trailers = resp.trailers.expect("h2 response trailers");
    assert_eq!(trailers.get("x-trailer").unwrap(), "yes");
}

#[tokio::test]
async fn http1_only_server_refuses_h2c_and_serves_h1() {
    let server = HttpServer::start_http1_only().await.unwrap();
    let resp = bounded("h1", http_client::get(server.addr, "h", "/echo"))
        .await
        .unwrap();
    assert_eq!(resp.header("x-echo-version"), Some("HTTP/1.1"));
    let h2 = bounded("h2c", http_client::h2c_get(server.addr, "h", "/echo")).await;
    assert!(
        h2.is_err(),
        "an HTTP/1.1-only app must not answer h2c: {h2:?}"
    );
    assert_eq!(server.stats().http2_requests(), 0);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let server = HttpServer::start().await.unwrap();
    let addr = server.addr;
    bounded("get", http_client::get(addr, "h", "/status/200"))
        .await
        .unwrap();
    server.shutdown().await;
    let after = bounded(
        "get after shutdown",
        http_client::get(addr, "h", "/status/200"),
    )
    .await;
    assert!(after.is_err(), "server still answering: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_h1_h2_chunked_and_100_continue() {
    let Some(curl) = curl() else { return };
    let server = HttpServer::start().await.unwrap();
    let url = format!("http://{}/echo?from=curl", server.addr);
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["-i".into(), "-H".into(), "X-Test: 1".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(url.clone());
        v
    };

    let (out, err, ok) = run_curl(curl, args(&["--http1.1", "--data-binary", "h1 body"])).await;
    assert!(ok, "curl h1 failed: {err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("x-echo-version: HTTP/1.1"), "{out}");
    assert!(out.contains("x-echo-h-x-test: 1"), "{out}");
    assert!(out.contains("x-echo-path: /echo?from=curl"), "{out}");
    assert!(out.ends_with("h1 body"), "{out}");

    let (out, err, ok) = run_curl(
        curl,
        args(&["--http2-prior-knowledge", "--data-binary", "h2 body"]),
    )
    .await;
    assert!(ok, "curl h2c failed: {err}");
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-echo-version: HTTP/2.0"), "{out}");
    assert!(out.ends_with("h2 body"), "{out}");

    let chunked = [
        "--http1.1",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "chunky",
    ];
    let (out, err, ok) = run_curl(curl, args(&chunked)).await;
    assert!(ok, "curl chunked failed: {err}");
    assert!(out.contains("x-echo-h-transfer-encoding: chunked"), "{out}");
    assert!(out.ends_with("chunky"), "{out}");

    let expect = [
        "--http1.1",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "later",
    ];
    let (out, err, ok) = run_curl(curl, args(&expect)).await;
    assert!(ok, "curl 100-continue failed: {err}");
    assert!(out.starts_with("HTTP/1.1 100 Continue"), "{out}");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("later"), "{out}");

    assert_eq!(server.stats().http2_requests(), 1);
    assert_eq!(server.stats().http1_requests(), 3);
}
