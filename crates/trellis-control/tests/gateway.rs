//! An Istio ingress Gateway with an HTTP server that redirects to HTTPS, a plain HTTP
//! server, an HTTPS server with SIMPLE TLS from a `credentialName`, a TLS passthrough
//! server routed by SNI and a TCP server, plus the VirtualServices bound to it:
//! translated, served by a real gateway proxy, and driven by curl (which checks the
//! certificate against the test CA) and a raw TCP client.

use std::net::SocketAddr;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_api::{LoadOptions, Spec, parse_text};
use trellis_control::translate::{self, GatewayRef, VirtualServiceRef, cluster_name};
use trellis_proxy::{Config, LoadEnv, ProxyOptions};
use trellis_testkit::tls::TestCa;
use trellis_testkit::{HttpServer, TcpEchoServer};
use trellis_xds::snapshot as wire;

const CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: shop-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["shop.example.com"]
    tls: {httpsRedirect: true}
  - port: {number: 8080, name: http-plain, protocol: HTTP}
    hosts: ["*"]
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["shop/shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 8443, name: tls-passthrough, protocol: TLS}
    hosts: ["shop.example.com"]
    tls: {mode: PASSTHROUGH}
  - port: {number: 9000, name: tcp-echo, protocol: TCP}
    hosts: ["*"]
  - port: {number: 9443, name: https-mesh, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: ISTIO_MUTUAL}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: ["shop.example.com"]
  gateways: [shop-gateway]
  tls:
  - match: [{port: 8443, sniHosts: [shop.example.com]}]
    route: [{destination: {host: shop-https, port: {number: 443}}}]
  tcp:
  - match: [{port: 9000}]
    route: [{destination: {host: echo, port: {number: 7}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: ["shop.example.com"]
  gateways: [shop-gateway]
  http:
  - name: api
    match: [{uri: {prefix: /status}}]
    route: [{destination: {host: api, port: {number: 8000}}}]
  - name: mesh-only
    match: [{uri: {prefix: /echo}, gateways: [mesh]}]
    route: [{destination: {host: api, port: {number: 8000}}}]
  - name: web
    route: [{destination: {host: web, port: {number: 80}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: internal, namespace: shop}
spec:
  hosts: ["shop.example.com"]
  http:
  - route: [{destination: {host: api, port: {number: 8000}}}]
"#;

fn cluster(name: String, addr: SocketAddr) -> wire::Cluster {
    wire::Cluster {
        name,
        endpoints: vec![wire::Endpoint {
            address: addr.to_string(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// curl's status code, headers and body for one request; `None` when curl is missing.
fn curl(args: &[&str]) -> Option<(u16, String, String)> {
    let out = match Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("curl: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (rest, code) = text.rsplit_once('\n').expect("status line");
    let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    Some((
        code.trim().parse().unwrap_or(0),
        head.to_ascii_lowercase(),
        format!("{body}{}", String::from_utf8_lossy(&out.stderr)),
    ))
}

// curl runs as a blocking child process: the proxy needs a runtime thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_gateway_serves_https_redirects_and_routes_by_host() {
    let parsed = parse_text(CONFIG, "gateway.yaml", &LoadOptions::default());
    let mut gateways = Vec::new();
    let mut services = Vec::new();
    for p in &parsed {
        let r = p
            .resource()
            .unwrap_or_else(|| panic!("{:?}", p.diagnostics));
        match &r.spec {
            Spec::Gateway(g) => {
                gateways.push((r.namespace().to_string(), r.name().to_string(), g.clone()))
            }
            Spec::VirtualService(v) => {
                services.push((r.namespace().to_string(), r.name().to_string(), v.clone()))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let gw_refs: Vec<GatewayRef<'_>> = gateways
        .iter()
        .map(|(ns, name, g)| GatewayRef {
            namespace: ns,
            name,
            gateway: g,
        })
        .collect();
    let vs_refs: Vec<VirtualServiceRef<'_>> = services
        .iter()
        .map(|(ns, name, vs)| VirtualServiceRef {
            namespace: ns,
            name,
            vs,
        })
        .collect();
    let (ports, problems) = translate::gateway_ports(&gw_refs, &vs_refs);
    // The ISTIO_MUTUAL server is reported and left out; the rest translates.
    assert_eq!(problems.len(), 1, "{problems:?}");
    let problem = problems[0].to_string();
    assert!(problem.contains("servers[5]"), "{problem}");
    assert!(problem.contains("ISTIO_MUTUAL"), "{problem}");
    let numbers: Vec<u32> = ports.iter().map(|p| p.port).collect();
    assert_eq!(numbers, [80, 443, 8080, 8443, 9000]);
    // The passthrough server carries only the L4 routes.
    let pass = &ports[3].servers[0];
    assert_eq!(pass.protocol, wire::Protocol::Tls as i32);
    assert_eq!(pass.virtual_hosts.len(), 1);
    assert_eq!(pass.virtual_hosts[0].tls_routes.len(), 1);
    assert!(pass.virtual_hosts[0].http_routes.is_empty());
    // Only the VirtualService bound to the gateway, and without its mesh-only rule.
    let https = &ports[1].servers[0];
    assert_eq!(https.virtual_hosts.len(), 1);
    assert_eq!(https.virtual_hosts[0].name, "shop/shop");
    let names: Vec<&str> = https.virtual_hosts[0]
        .http_routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["api", "web"]);

    let (api, web) = (
        HttpServer::start().await.expect("api"),
        HttpServer::start().await.expect("web"),
    );
    let echo = TcpEchoServer::start().await.expect("echo");
    let mut snapshot = wire::Snapshot {
        version: "gateway".into(),
        clusters: vec![
            cluster(
                cluster_name(8000, None, "api.shop.svc.cluster.local"),
                api.addr,
            ),
            cluster(
                cluster_name(80, None, "web.shop.svc.cluster.local"),
                web.addr,
            ),
            cluster(
                cluster_name(7, None, "echo.shop.svc.cluster.local"),
                echo.addr,
            ),
        ],
        gateway_ports: ports,
        ..Default::default()
    };
    let creds = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("shop test CA").expect("ca");
    ca.write_credential(creds.path(), "shop-cert", &["shop.example.com"])
        .expect("credential");
    let ca_file = ca.write_ca(&creds.path().join("client")).expect("ca file");
    let env = LoadEnv {
        credentials_dir: creds.path().to_path_buf(),
        ..LoadEnv::default()
    };
    let any = || "127.0.0.1:0".parse::<SocketAddr>().expect("addr");
    let proxy = trellis_proxy::start(
        Config::from_wire_with(snapshot.clone(), None, &env).expect("snapshot converts"),
        ProxyOptions {
            gateway_listen: vec![
                (any(), 80),
                (any(), 443),
                (any(), 8080),
                (any(), 8443),
                (any(), 9000),
            ],
            ..ProxyOptions::default()
        },
    )
    .await
    .expect("gateway");
    let [http80, https443, http8080, pass8443, tcp9000] = proxy.inbound_addrs[..] else {
        panic!("five gateway listeners: {:?}", proxy.inbound_addrs)
    };
    // The passthrough route's destination is this gateway's own HTTPS listener: the
    // handshake on 8443 is carried through untouched and answered there.
    snapshot.clusters.push(cluster(
        cluster_name(443, None, "shop-https.shop.svc.cluster.local"),
        https443,
    ));
    proxy.update(Config::from_wire_with(snapshot.clone(), None, &env).expect("converts"));
    let resolve = |a: SocketAddr| format!("shop.example.com:{}:127.0.0.1", a.port());
    let url = |scheme: &str, a: SocketAddr, path: &str| {
        format!("{scheme}://shop.example.com:{}{path}", a.port())
    };

    // HTTPS with the configured certificate, verified against the CA, over HTTP/2 and
    // HTTP/1.1; routes by path.
    let ca_arg = ca_file.to_str().expect("utf-8 path");
    let Some((code, head, body)) = curl(&[
        "--cacert",
        ca_arg,
        "--resolve",
        &resolve(https443),
        &url("https", https443, "/bytes/5"),
    ]) else {
        eprintln!("curl not installed: skipping the client half of this test");
        return;
    };
    assert_eq!(code, 200, "{head}{body}");
    assert!(head.starts_with("http/2 200"), "ALPN chose h2: {head}");
    assert!(body.starts_with("aaaaa"), "{body}");
    assert_eq!(web.stats().requests(), 1);
    let (code, head, body) = curl(&[
        "--http1.1",
        "--cacert",
        ca_arg,
        "--resolve",
        &resolve(https443),
        &url("https", https443, "/status/201"),
    ])
    .expect("curl");
    assert_eq!(code, 201, "{head}{body}");
    assert!(head.starts_with("http/1.1 201"), "{head}");
    assert_eq!(api.stats().requests(), 1, "the api rule");
    // The app sees the scheme the client used.
    let (code, head, _) = curl(&[
        "--cacert",
        ca_arg,
        "--resolve",
        &resolve(https443),
        &url("https", https443, "/echo"),
    ])
    .expect("curl");
    assert_eq!(code, 200);
    assert!(head.contains("x-echo-h-x-forwarded-proto: https"), "{head}");
    assert_eq!(
        web.stats().requests(),
        2,
        "the mesh-only rule does not apply at the gateway"
    );

    // A client that does not trust the CA refuses the certificate; one that asks for
    // another name gets no certificate for it either.
    let (code, _, err) = curl(&[
        "--resolve",
        &resolve(https443),
        &url("https", https443, "/"),
    ])
    .expect("curl");
    assert_eq!(code, 0, "untrusted certificate must fail: {err}");
    let (code, _, err) = curl(&[
        "--cacert",
        ca_arg,
        "--resolve",
        &format!("other.example.com:{}:127.0.0.1", https443.port()),
        &format!("https://other.example.com:{}/", https443.port()),
    ])
    .expect("curl");
    assert_eq!(
        code, 0,
        "a certificate for shop.example.com does not serve other.example.com: {err}"
    );

    // Port 80 redirects to https, keeping path and query.
    let (code, head, _) = curl(&[
        "--resolve",
        &resolve(http80),
        &url("http", http80, "/a?b=c"),
    ])
    .expect("curl");
    assert_eq!(code, 301, "{head}");
    assert!(
        head.contains("location: https://shop.example.com/a?b=c"),
        "{head}"
    );

    // Port 8080 serves any host the VirtualService names; other hosts get 404 NR.
    let (code, head, _) = curl(&[
        "--resolve",
        &resolve(http8080),
        &url("http", http8080, "/bytes/3"),
    ])
    .expect("curl");
    assert_eq!(code, 200, "{head}");
    assert_eq!(web.stats().requests(), 3);
    let (code, head, body) = curl(&[
        "-H",
        "Host: nobody.example.com",
        &format!("http://127.0.0.1:{}/", http8080.port()),
    ])
    .expect("curl");
    assert_eq!(code, 404, "{head}{body}");
    assert!(head.contains("x-trellis-response-flags: nr"), "{head}");

    // TLS passthrough: routed by SNI without terminating; the certificate curl checks is
    // the one the destination serves.
    let (code, head, body) = curl(&[
        "--cacert",
        ca_arg,
        "--resolve",
        &resolve(pass8443),
        &url("https", pass8443, "/bytes/2"),
    ])
    .expect("curl");
    assert_eq!(code, 200, "{head}{body}");
    assert_eq!(web.stats().requests(), 4);
    // Another SNI has no server on the port: the connection is closed.
    let (code, _, err) = curl(&[
        "-k",
        "--resolve",
        &format!("other.example.com:{}:127.0.0.1", pass8443.port()),
        &format!("https://other.example.com:{}/", pass8443.port()),
    ])
    .expect("curl");
    assert_eq!(code, 0, "{err}");

    // TCP: bytes both ways through the gateway.
    let mut c = tokio::net::TcpStream::connect(tcp9000)
        .await
        .expect("connect");
    c.write_all(b"ping through the gateway")
        .await
        .expect("write");
    c.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), c.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, b"ping through the gateway");

    // A credential that is not there refuses the snapshot, naming the file.
    let mut broken = snapshot;
    if let Some(tls) = broken.gateway_ports[1].servers[0].tls.as_mut() {
        tls.credential_name = Some("missing-cert".into());
    }
    let e = Config::from_wire_with(broken, None, &env).expect_err("missing credential");
    let msg = e.to_string();
    assert!(msg.contains("missing-cert/tls.crt"), "{msg}");
    assert!(msg.contains("shop/shop-gateway"), "{msg}");
}
