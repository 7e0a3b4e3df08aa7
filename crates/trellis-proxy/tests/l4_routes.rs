//! TCP and TLS routes through the proxy: weighted TCP splits, TLS passthrough chosen by
//! the ClientHello's SNI (the bytes go through untouched).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use trellis_proxy::{Config, ProxyHandle, ProxyOptions};
use trellis_testkit::{TcpEchoServer, tcp_echo_half_close};
use trellis_xds::snapshot::Snapshot;

async fn proxy(port_yaml: &str, a: SocketAddr, b: SocketAddr, port: u16) -> ProxyHandle {
    let yaml = format!(
        "services:
- hostname: db.default.svc.cluster.local
  ports:
  - port: {port}
    cluster: a
{port_yaml}
clusters:
- {{name: a, endpoints: [{{address: \"{a}\"}}]}}
- {{name: b, endpoints: [{{address: \"{b}\"}}]}}
"
    );
    let raw = Snapshot::from_text(&yaml, "l4.yaml").expect("snapshot");
    trellis_proxy::start(
        Config::from_wire(raw, None).expect("converts"),
        ProxyOptions {
            outbound_listen: vec![("127.0.0.1:0".parse().expect("addr"), "db".to_string(), port)],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("proxy")
}

#[tokio::test]
async fn tcp_routes_split_by_weight() {
    let a = TcpEchoServer::start().await.expect("a");
    let b = TcpEchoServer::start().await.expect("b");
    let p = proxy(
        "    name: tcp-pg\n    tcpRoutes: [{name: split, clusters: [{cluster: a, weight: 50}, {cluster: b, weight: 50}]}]",
        a.addr,
        b.addr,
        5432,
    )
    .await;
    for i in 0..100 {
        let got = timeout(
            Duration::from_secs(10),
            tcp_echo_half_close(p.outbound_addrs[0], b"ping"),
        )
        .await
        .expect("in time")
        .expect("echo");
        assert_eq!(got, b"ping", "connection {i}");
    }
    let (na, nb) = (a.stats().connections(), b.stats().connections());
    assert_eq!(na + nb, 100);
    assert!((30..=70).contains(&na), "a {na}, b {nb}");
}

/// A minimal TLS ClientHello carrying `host` as SNI.
fn client_hello(host: &str) -> Vec<u8> {
    let name = host.as_bytes();
    let list_len = 3 + name.len();
    let mut sni = vec![0x00, 0x00];
    sni.extend_from_slice(&((2 + list_len) as u16).to_be_bytes());
    sni.extend_from_slice(&(list_len as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[1u8; 32]);
    body.push(0);
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Sends a ClientHello and returns what comes back before the connection closes.
async fn hello(addr: SocketAddr, host: &str) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let ch = client_hello(host);
    s.write_all(&ch).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut out = Vec::new();
    let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni() {
    let a = TcpEchoServer::start().await.expect("a");
    let b = TcpEchoServer::start().await.expect("b");
    let p = proxy(
        "    name: tls\n    tlsRoutes:\n    - {name: exact, match: [{sniHosts: [a.example.com]}], clusters: [{cluster: a}]}\n    - {name: wildcard, match: [{sniHosts: [\"*.b.example.com\"]}], clusters: [{cluster: b}]}",
        a.addr,
        b.addr,
        443,
    )
    .await;
    let addr = p.outbound_addrs[0];
    assert_eq!(
        hello(addr, "a.example.com").await,
        client_hello("a.example.com"),
        "bytes pass untouched"
    );
    assert_eq!((a.stats().connections(), b.stats().connections()), (1, 0));
    assert_eq!(
        hello(addr, "x.b.example.com").await,
        client_hello("x.b.example.com")
    );
    assert_eq!((a.stats().connections(), b.stats().connections()), (1, 1));
    assert!(
        hello(addr, "c.example.com").await.is_empty(),
        "no route: refused"
    );
    assert_eq!((a.stats().connections(), b.stats().connections()), (1, 1));
}
