//! The raw TCP fixtures: half-close echo and server-first banner.

mod common;

use common::bounded;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use trellis_testkit::{BannerServer, TcpEchoServer, tcp_echo_half_close};

#[tokio::test]
async fn echo_survives_half_close_and_records_eof() {
    let server = TcpEchoServer::start().await.unwrap();
    let echoed = bounded(
        "half-close echo",
        tcp_echo_half_close(server.addr, b"ping pong"),
    )
    .await
    .unwrap();
    assert_eq!(echoed, b"ping pong");
    assert_eq!(server.stats().eofs_seen(), 1);
    assert_eq!(server.stats().bytes_echoed(), 9);
}

#[tokio::test]
async fn large_payload_echo_does_not_deadlock() {
    let server = TcpEchoServer::start().await.unwrap();
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let echoed = bounded("4 MiB echo", tcp_echo_half_close(server.addr, &data))
        .await
        .unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data);
}

#[tokio::test]
async fn server_keeps_reading_after_its_reply_until_the_client_half_closes() {
    let server = TcpEchoServer::start().await.unwrap();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    let mut buf = [0u8; 3];
    bounded("first echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"abc");
    assert_eq!(server.stats().eofs_seen(), 0);
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded("server EOF", s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(server.stats().eofs_seen(), 1);
}

#[tokio::test]
async fn banner_arrives_before_the_client_says_anything() {
    let server = BannerServer::start("220 fixture ready\r\n").await.unwrap();
    let s = TcpStream::connect(server.addr).await.unwrap();
    let mut s = BufReader::new(s);
    let mut line = String::new();
    bounded("banner", s.read_line(&mut line)).await.unwrap();
    assert_eq!(line, "220 fixture ready\r\n");
    s.get_mut().write_all(b"HELO there\n").await.unwrap();
    line.clear();
    bounded("line echo", s.read_line(&mut line)).await.unwrap();
    assert_eq!(line, "HELO there\n");
    s.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded("banner EOF", s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty());
    assert_eq!(server.stats().connections(), 1);
    assert_eq!(server.stats().eofs_seen(), 1);
}
